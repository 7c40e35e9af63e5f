"""The one shape every apilane service has.

    settings -> connect to NATS as the service's identity (retrying)
             -> streams and buckets: created (discovery) or waited for (the others)
             -> [leadership, in apilane.kube.leader.lead] -> work loop -> drain

`command_line` is every service's `main(argv)`; `bus_session` is the NATS part of its body.
Both stop promptly when the service is told to stop at any step.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping, Sequence
from typing import Any, Protocol, TypeVar

from apilane.model.errors import ConfigError
from apilane.runtime import serve
from apilane.runtime.aio import Backoff, unless_stopped
from apilane.runtime.bus import Bus
from apilane.runtime.config import CommonSettings, describe
from apilane.runtime.natsauth import Role

log = logging.getLogger(__name__)

StreamSetup = Callable[[Bus], Awaitable[object]]


class HasCommon(Protocol):
    @property
    def common(self) -> CommonSettings: ...


S = TypeVar("S", bound=HasCommon)
Body = Callable[[serve.ServiceContext, S], Coroutine[Any, Any, None]]


def command_line(
    name: str,
    load: Callable[[], S],
    body: Body[S],
    argv: Sequence[str] | None = None,
    *,
    description: str = "",
    commands: Mapping[str, tuple[str, Callable[[S], int]]] | None = None,
) -> int:
    """Parse `[serve | COMMAND]`, load settings (exit 2 with the variable named when one is
    bad), then run `body(ctx, settings)` under `serve.run`, or the one-shot COMMAND."""
    extra = dict(commands or {})
    parser = argparse.ArgumentParser(prog=f"python -m {_module_of(name)}", description=description)
    parser.add_argument(
        "command",
        nargs="?",
        default="serve",
        choices=("serve", *extra),
        help="serve (the default): run the service"
        + "".join(f"; {command}: {text}" for command, (text, _) in extra.items()),
    )
    command = parser.parse_args(argv).command
    try:
        settings = load()
    except ConfigError as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return 2
    if command != "serve":
        return extra[command][1](settings)
    serve.setup_logging(name, settings.common.log_level)
    serve.log.info("settings", extra={"settings": describe(settings)})
    return serve.run(name, settings.common, lambda ctx: body(ctx, settings))


def _module_of(name: str) -> str:
    return "apilane." + name.removeprefix("apilane-").replace("-", "_")


async def connect_bus(
    common: CommonSettings,
    *,
    role: Role,
    client_name: str,
    setup: StreamSetup,
    stop: asyncio.Event,
) -> Bus | None:
    """Connect as the service's NATS identity (`common.nats_auth`, the `role` of
    `common.cluster`: they name its inbox) and set up the streams (`setup`:
    `Bus.create_streams` for the provisioner, `Bus.wait_for_streams` for the others), each
    retried with backoff; None if `stop` came first. A service started before NATS, or
    before JetStream or the streams are there, waits instead of exiting."""
    auth = common.nats_auth.as_identity(role, common.cluster)
    connecting = Bus.connect(common.nats_urls, name=client_name, auth=auth)
    bus = await unless_stopped(connecting, stop)
    if bus is None:
        return None
    backoff = Backoff(initial=0.2, maximum=5.0)
    while True:
        try:
            await unless_stopped(setup(bus), stop)
            if stop.is_set():
                await bus.drain()
                return None
            return bus
        except Exception as exc:  # nats-py raises its own types besides BusError here
            log.warning("streams not ready yet, retrying", extra={"error": str(exc)})
            if await backoff.sleep(stop):
                await bus.drain()
                return None


@contextlib.asynccontextmanager
async def bus_session(
    ctx: serve.ServiceContext,
    common: CommonSettings,
    *,
    role: Role,
    client_name: str,
    setup: StreamSetup,
) -> AsyncIterator[Bus | None]:
    """The bus for the body of a service, drained on the way out. Yields None when the
    service was stopped before the bus was usable (the body should then just return).
    Registers the `nats-connected` readiness check before connecting, so the probe says
    "not ready" while NATS is away rather than "no checks"."""
    bus: Bus | None = None
    ctx.health.add_ready("nats-connected", lambda: bus is not None and bus.connected)
    bus = await connect_bus(
        common, role=role, client_name=client_name, setup=setup, stop=ctx.stopping
    )
    try:
        yield bus
    finally:
        if bus is not None:
            await bus.drain()
