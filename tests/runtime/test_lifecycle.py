"""The one service shape: command_line and bus_session, against a real nats-server that
authenticates every client (each test connects as the identity it plays)."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import msgspec
import pytest

from apilane.model import subjects
from apilane.model.errors import ApilaneError, ConfigError
from apilane.runtime.bus import Bus
from apilane.runtime.config import CommonSettings
from apilane.runtime.lifecycle import bus_session, command_line, connect_bus
from apilane.runtime.natsauth import Role
from apilane.runtime.serve import Health, ServiceContext
from apilane.testing.nats import NatsServer
from apilane.testing.procs import free_port


def _ctx(stopping: asyncio.Event) -> ServiceContext:
    return ServiceContext(
        name="test", settings=CommonSettings(), stopping=stopping, health=Health()
    )


@pytest.mark.unit
def test_a_bad_setting_exits_2_naming_it(capsys: pytest.CaptureFixture[str]) -> None:
    def load() -> CommonSettings:
        raise ConfigError("APILANE_CLUSTER: 'a b' is not a token")

    async def body(ctx: ServiceContext, settings: object) -> None:
        raise AssertionError("must not run")

    assert command_line("apilane-test", load, body, []) == 2  # type: ignore[arg-type]
    assert "APILANE_CLUSTER" in capsys.readouterr().err


@pytest.mark.unit
def test_a_one_shot_command_runs_instead_of_the_service() -> None:
    class Loaded:
        common = CommonSettings()

    async def body(ctx: ServiceContext, settings: Loaded) -> None:
        raise AssertionError("must not run")

    ran: list[Loaded] = []
    commands = {"once": ("do it once", lambda s: ran.append(s) or 5)}
    assert command_line("apilane-test", Loaded, body, ["once"], commands=commands) == 5
    assert len(ran) == 1
    with pytest.raises(SystemExit):
        command_line("apilane-test", Loaded, body, ["unknown"], commands=commands)


@pytest.mark.unit
def test_a_typed_error_that_ends_the_service_is_a_log_line_and_exit_1(
    capsys: pytest.CaptureFixture[str],
) -> None:
    class ProgramError(ApilaneError):
        """As the node-loader's, when its programs cannot be compiled."""

    class Loaded(msgspec.Struct):
        common: CommonSettings = CommonSettings()

    async def body(ctx: ServiceContext, settings: Loaded) -> None:
        raise ProgramError("compiling the connect-time programs failed: clang: not found")

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level  # serve.run sets the service's logging up
    try:
        assert command_line("apilane-test", Loaded, body, []) == 1
    finally:
        root.handlers[:], root.level = handlers, level
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line]
    [stopped] = [line for line in lines if line.get("msg") == "stopped: it cannot go on"]
    assert stopped["level"] == "ERROR"
    assert stopped["error_type"] == "ProgramError"
    assert "clang: not found" in stopped["error"]


@pytest.mark.integration
@pytest.mark.nats
async def test_bus_session_waits_for_nats_started_later_and_sets_streams_up(
    tmp_path: Path,
) -> None:
    port = free_port()
    server = NatsServer(store_dir=tmp_path / "js", port=port)
    # Discovery's identity: the provisioner, which creates the streams.
    auth = server.credentials(Role.DISCOVERY)
    common = CommonSettings(nats_urls=(f"nats://127.0.0.1:{port}",), nats_auth=auth)
    ctx = _ctx(asyncio.Event())

    async def start_later() -> None:
        await asyncio.sleep(0.5)
        await asyncio.to_thread(server.start)

    starter = asyncio.create_task(start_later())
    try:
        async with bus_session(
            ctx, common, role=Role.DISCOVERY, client_name="lifecycle-test", setup=Bus.create_streams
        ) as bus:
            assert bus is not None and bus.connected
            assert ctx.health.ready()[0]
            info = await bus.js.stream_info(subjects.EVENTS_STREAM)
            assert info.config.name == subjects.EVENTS_STREAM
        assert not ctx.health.ready()[0]  # drained: not ready any more
    finally:
        await starter
        server.stop()


@pytest.mark.integration
@pytest.mark.nats
async def test_setup_is_retried_until_it_succeeds(nats_server: NatsServer) -> None:
    attempts: list[int] = []

    async def flaky_setup(bus: Bus) -> None:
        attempts.append(1)
        if len(attempts) < 3:
            raise RuntimeError("JetStream not ready")

    stop = asyncio.Event()
    auth = nats_server.credentials(Role.RENDERER)
    common = CommonSettings(nats_urls=(nats_server.url,), nats_auth=auth)
    bus = await connect_bus(
        common, role=Role.RENDERER, client_name="t", setup=flaky_setup, stop=stop
    )
    assert bus is not None and len(attempts) == 3
    await bus.drain()


@pytest.mark.unit
async def test_a_stop_while_nats_is_away_ends_the_session_promptly() -> None:
    stopping = asyncio.Event()
    common = CommonSettings(nats_urls=(f"nats://127.0.0.1:{free_port()}",))
    asyncio.get_running_loop().call_later(0.3, stopping.set)
    async with asyncio.timeout(10):
        async with bus_session(
            _ctx(stopping), common, role=Role.RENDERER, client_name="t", setup=Bus.wait_for_streams
        ) as bus:
            assert bus is None


@pytest.mark.integration
@pytest.mark.nats
async def test_a_consumer_waits_for_the_streams_the_provisioner_creates(
    nats_server: NatsServer,
) -> None:
    """The renderer's identity may not create streams: its session waits until discovery's
    has, and a stop while it waits ends the session promptly."""
    renderer = CommonSettings(
        nats_urls=(nats_server.url,), nats_auth=nats_server.credentials(Role.RENDERER)
    )
    stopping = asyncio.Event()
    asyncio.get_running_loop().call_later(0.5, stopping.set)
    async with asyncio.timeout(10):
        async with bus_session(
            _ctx(stopping),
            renderer,
            role=Role.RENDERER,
            client_name="early",
            setup=Bus.wait_for_streams,
        ) as bus:
            assert bus is None  # stopped while the streams were still missing

    ctx = _ctx(asyncio.Event())
    provisioner = await nats_server.connect(Role.DISCOVERY)

    async def create_later() -> None:
        await asyncio.sleep(0.5)
        await provisioner.create_streams()

    creating = asyncio.create_task(create_later())
    try:
        async with asyncio.timeout(30):
            async with bus_session(
                ctx, renderer, role=Role.RENDERER, client_name="waiting", setup=Bus.wait_for_streams
            ) as bus:
                assert creating.done() and bus is not None and bus.connected
                info = await bus.js.stream_info(subjects.EVENTS_STREAM)
                assert info.config.name == subjects.EVENTS_STREAM
    finally:
        await creating
        await provisioner.drain()
