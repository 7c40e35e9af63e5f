"""Lease-based leader election between two electors on the real kube-apiserver."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from apilane.kube.client import KubeClient
from apilane.kube.leader import (
    LeaderElector,
    LeaseSettings,
    elector_for,
    lead,
    load_lease_settings,
)
from apilane.model.errors import ConfigError
from apilane.runtime.config import Env
from apilane.testing.kube import ControlPlane

pytestmark = [pytest.mark.integration, pytest.mark.kube]

# Short timings keep the test quick; the ratios are the production ones (15 / 10 / 5 / 2).
LEASE = 3.0
DEADLINE = 2.0
RENEW = 0.5
RETRY = 0.3


class CuttableProxy:
    """A loopback TCP relay to the apiserver whose `cut()` drops every connection and refuses
    new ones: a network partition for the one elector that uses it."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self.writers.update((writer, up_writer))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def cut(self) -> None:
        if self.server is not None:
            self.server.close()
        for writer in self.writers:
            writer.transport.abort()
        self.writers.clear()


def elector(client: KubeClient, namespace: str, identity: str) -> LeaderElector:
    return LeaderElector(
        client,
        namespace=namespace,
        name="apilane-test",
        identity=identity,
        lease_duration=LEASE,
        renew_interval=RENEW,
        retry_interval=RETRY,
        renew_deadline=DEADLINE,
    )


def leading_gauge(elector: LeaderElector) -> float | None:
    """What /metrics says of this elector (apilane_leader, read by ApilaneLeaderMissing)."""
    return REGISTRY.get_sample_value(
        "apilane_leader", {"lease": elector.name, "identity": elector.identity}
    )


async def test_exactly_one_leader_and_a_released_lease_is_taken_over_at_once(
    control_plane: ControlPlane, kube_namespace: str
) -> None:
    clients = [await control_plane.client(), await control_plane.client()]
    a, b = elector(clients[0], kube_namespace, "a"), elector(clients[1], kube_namespace, "b")
    stop_a, stop_b = asyncio.Event(), asyncio.Event()
    tasks = [asyncio.create_task(a.run(stop_a)), asyncio.create_task(b.run(stop_b))]
    try:
        async with asyncio.timeout(10):
            await asyncio.wait(
                [
                    asyncio.create_task(a.wait_until_leader()),
                    asyncio.create_task(b.wait_until_leader()),
                ],
                return_when=asyncio.FIRST_COMPLETED,
            )
        # Sample for a few renew periods: never two leaders, never none once elected.
        for _ in range(20):
            assert [a.is_leader, b.is_leader].count(True) == 1
            await asyncio.sleep(0.1)
        leader, follower, stop_leader = (a, b, stop_a) if a.is_leader else (b, a, stop_b)
        assert (leading_gauge(leader), leading_gauge(follower)) == (1.0, 0.0)

        released_at = time.monotonic()
        stop_leader.set()
        async with asyncio.timeout(LEASE):
            await follower.wait_until_leader()
        takeover = time.monotonic() - released_at
        assert leader.lost.is_set()
        assert not leader.is_leader
        assert takeover < LEASE  # a released lease needs no expiry wait
        assert follower.transitions >= 1
        assert (leading_gauge(leader), leading_gauge(follower)) == (0.0, 1.0)
    finally:
        stop_a.set()
        stop_b.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        for client in clients:
            await client.close()


async def test_a_partitioned_leader_steps_down_before_the_other_takes_over(
    control_plane: ControlPlane, kube_namespace: str, tmp_path: Path
) -> None:
    proxy = CuttableProxy(control_plane.apiserver.port)
    await proxy.start()
    partitioned_client = await KubeClient.from_config(
        str(
            control_plane.pki.kubeconfig(
                tmp_path / "via-proxy", server=f"https://127.0.0.1:{proxy.port}"
            )
        )
    )
    healthy_client = await control_plane.client()
    first = elector(partitioned_client, kube_namespace, "first")
    second = elector(healthy_client, kube_namespace, "second")
    stop = asyncio.Event()
    first_task = asyncio.create_task(first.run(stop))
    second_task: asyncio.Task[None] | None = None
    try:
        async with asyncio.timeout(10):
            await first.wait_until_leader()
        second_task = asyncio.create_task(second.run(stop))
        await asyncio.sleep(RENEW * 3)
        assert first.is_leader and not second.is_leader

        cut_at = time.monotonic()
        await proxy.cut()
        async with asyncio.timeout(LEASE + DEADLINE + 2):
            await first.lost.wait()
        stepped_down = time.monotonic() - cut_at
        async with asyncio.timeout(LEASE + 3):
            await second.wait_until_leader()
        took_over = time.monotonic() - cut_at
        assert stepped_down <= DEADLINE + RETRY + 0.5
        assert stepped_down < took_over  # never two leaders at once
        assert took_over <= LEASE + RENEW + 2 * RETRY + 1
        assert not first.is_leader
    finally:
        stop.set()
        await asyncio.gather(first_task, *(t for t in [second_task] if t), return_exceptions=True)
        await partitioned_client.close()
        await healthy_client.close()
        await proxy.cut()


async def test_invalid_timings_are_rejected(kube: KubeClient) -> None:
    with pytest.raises(ValueError, match="renew_interval < renew_deadline < lease_duration"):
        LeaderElector(
            kube, namespace="x", name="y", identity="z", lease_duration=5, renew_interval=5
        )


async def test_lead_runs_one_term_per_leadership_and_hands_over_on_stop(
    control_plane: ControlPlane, kube_namespace: str
) -> None:
    clients = [await control_plane.client(), await control_plane.client()]
    lease = {
        "namespace": kube_namespace,
        "name": "lead-helper",
        "duration": LEASE,
        "renew_interval": RENEW,
        "retry_interval": RETRY,
    }
    electors = [
        elector_for(client, LeaseSettings(identity=f"candidate-{i}", **lease))  # type: ignore[arg-type]
        for i, client in enumerate(clients)
    ]
    terms: list[str] = []
    term_started = asyncio.Condition()

    def work_for(identity: str) -> Callable[[asyncio.Event], Awaitable[None]]:
        async def work(term_over: asyncio.Event) -> None:
            async with term_started:
                terms.append(identity)
                term_started.notify_all()
            await term_over.wait()

        return work

    stops = [asyncio.Event(), asyncio.Event()]
    runs = [
        asyncio.create_task(lead(elector, work_for(f"candidate-{i}"), stops[i]))
        for i, elector in enumerate(electors)
    ]
    try:
        async with asyncio.timeout(15), term_started:
            await term_started.wait_for(lambda: len(terms) >= 1)
        first = terms[0]
        assert terms == [first]  # exactly one leader works
        stops[int(first[-1])].set()  # the leader stops: it releases, the other takes over
        async with asyncio.timeout(15), term_started:
            await term_started.wait_for(lambda: len(terms) >= 2)
        assert terms[1] != first
    finally:
        for stop in stops:
            stop.set()
        await asyncio.gather(*runs)
        for client in clients:
            await client.close()


async def test_lead_without_an_elector_is_one_term_until_stop() -> None:
    stop = asyncio.Event()
    seen: list[asyncio.Event] = []

    async def work(term_over: asyncio.Event) -> None:
        seen.append(term_over)

    await lead(None, work, stop)
    assert seen == [stop]


@pytest.mark.unit
def test_lease_settings_are_read_and_checked() -> None:
    env = Env({"APILANE_LEASE_DURATION": "9s", "APILANE_LEASE_RENEW_INTERVAL": "2s"})
    settings = load_lease_settings(env, name="l", identity="me")
    assert (settings.duration, settings.renew_interval, settings.retry_interval) == (9.0, 2.0, 2.0)
    assert elector_for(None, LeaseSettings(enabled=False)) is None  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="APILANE_LEASE_RENEW_INTERVAL"):
        load_lease_settings(
            Env({"APILANE_LEASE_DURATION": "3s", "APILANE_LEASE_RENEW_INTERVAL": "2.5s"}),
            name="l",
            identity="me",
        )
