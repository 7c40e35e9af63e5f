"""A real failover through the service VIP: three real kube-apiservers (each in its own network
namespace, registered by their own lease endpoint reconciler), discovery and a node-loader on
real BPF as processes, and a client in a test namespace (no default route, in the loader's
child cgroup) that calls https://10.96.0.1:443/readyz every 50 ms without pause.

One apiserver is SIGKILLed (it leaves the endpoints only when its lease expires), then another
is stopped gracefully (it removes its own lease): the client's requests recover each time, the
dead backends leave the snapshot and the pinned maps, and failures stay bounded. The timings
(kill → lease expiry → snapshot → maps; failure window) are printed for the record.

Twice: with the node-loader's backend probes off (the maps follow the snapshot alone), and with
https probes (GET /readyz, verified against the plane's CA) from a namespace on the plane's
bridge. With probes the killed apiserver leaves the maps before its lease expires, and once the
last apiserver is killed too it stays programmed (fail static: the last backend never goes).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from apilane.model import subjects
from apilane.model.signing import TrustedKeys, open_snapshot
from apilane.runtime.bus import Bus
from apilane.runtime.natsauth import Role
from apilane.testing.bpf import BpfLab
from apilane.testing.failover import (
    APISERVER_PORT,
    VipAnswer,
    VipClient,
    probe_environment,
    programmed_apiservers,
)
from apilane.testing.ha import HAControlPlane
from apilane.testing.nats import NatsServer
from apilane.testing.sealing import signing_environment
from apilane.testing.stack import ServiceProcesses, base_environment

pytestmark = [pytest.mark.e2e, pytest.mark.kube, pytest.mark.nats, pytest.mark.bpf]

CLUSTER = "ha"
NODE = "node-ha"
CLIENT_DURATION = 150.0  # the client's own bound; the test ends it sooner
# The killed apiserver's lease has at most 15 s left and another apiserver's reconcile loop
# runs every 10 s; the bound adds a margin for a loaded machine, it is not a target.
KILL_REMOVAL_BOUND = 60.0
GRACEFUL_REMOVAL_BOUND = 15.0
SETTLE_AFTER_REMOVAL = 1.0
# With probes: how long the last apiserver, killed too, must stay programmed. The loader's
# defaults mark a backend unhealthy after 3 failed probes 300 ms apart; this is several times that.
LAST_BACKEND_WATCH = 4.0


@dataclass
class Removal:
    """One apiserver going away, as seen from the test."""

    index: int
    address: str
    how: str
    stopped_at: float = 0.0
    lease_ttl_at_stop: float | None = None
    left_snapshot_at: float = 0.0
    left_maps_at: float = 0.0
    failures: list[VipAnswer] = field(default_factory=list)
    requests: int = 0

    def report(self) -> str:
        def after(at: float) -> str:
            return f"+{at - self.stopped_at:.2f}s" if at else "never"

        ttl = "none" if self.lease_ttl_at_stop is None else f"{self.lease_ttl_at_stop:.0f}s"
        window = f"{self.failures[-1].at - self.failures[0].at:.2f}s" if self.failures else "0.00s"
        return (
            f"{self.how} {self.address}: lease had {ttl} left; left the snapshot "
            f"{after(self.left_snapshot_at)}, the maps {after(self.left_maps_at)}; "
            f"{len(self.failures)}/{self.requests} requests failed, failure window {window}"
        )


@pytest.fixture
def plane() -> Iterator[HAControlPlane]:
    with HAControlPlane(3) as started:
        yield started


async def eventually(
    check: Callable[[], Awaitable[Any]], *, what: str, stack: ServiceProcesses, timeout: float
) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        stack.check_alive()
        last = await check()
        if last:
            return last
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})\n{stack.logs_text()}")


@pytest.mark.parametrize("probe", ["off", "https"])
async def test_apiservers_fail_behind_the_vip_and_the_client_recovers(
    plane: HAControlPlane,
    nats_server_tls: NatsServer,
    bpf_lab: BpfLab,
    tmp_path: Path,
    probe: str,
) -> None:
    nats_server = nats_server_tls
    env = base_environment(
        cluster=CLUSTER, nats_url=nats_server.url, kubeconfig=str(plane.kubeconfig_paths[0])
    ) | signing_environment(tmp_path)
    cgroup, pins = bpf_lab.child_cgroup(), bpf_lab.pin_dir()
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    # Probes leave from a namespace on the plane's bridge: they reach the apiservers only.
    probes = probe_environment(
        plane.ca_path, plane.client_namespace() if probe != "off" else None, kind=probe
    )
    stack = ServiceProcesses(tmp_path)
    try:
        stack.start(
            "discovery",
            "apilane.discovery",
            env
            | nats_server.env(Role.DISCOVERY, CLUSTER)
            | {
                "APILANE_POD_NAME": "discovery-0",
                "APILANE_LEASE_NAMESPACE": "default",
                "APILANE_COALESCE_WINDOW": "20ms",
            },
        )
        stack.start(
            NODE,
            "apilane.node_loader",
            env
            | nats_server.env(Role.NODE_LOADER, CLUSTER, NODE)
            | {
                "APILANE_NODE_NAME": NODE,
                "APILANE_MAP_BACKEND": "bpf",
                "APILANE_CGROUP_PATH": str(cgroup),
                "APILANE_BPF_PIN_DIR": str(pins),
                "APILANE_STATE_DIR": str(state_dir),
            }
            | probes,
        )
        bus = await nats_server.connect(Role.OPERATOR, CLUSTER, name="ha-test")
        try:
            removals = await run_failover(
                plane=plane,
                bus=bus,
                trusted=TrustedKeys.parse(env["APILANE_TRUSTED_KEYS"]),
                stack=stack,
                cgroup=cgroup,
                pins=pins,
            )
            if probe == "off":
                for removal in removals:
                    # Without probes the maps follow the snapshot, never ahead of it.
                    assert removal.left_maps_at >= removal.left_snapshot_at, removal.report()
            else:
                check_probed_removal(removals[0])
                await check_last_backend_stays(plane, stack, pins)
        finally:
            await bus.drain()
    finally:
        stack.stop()


def check_probed_removal(killed: Removal) -> None:
    """The probes took the SIGKILLed apiserver out of the maps before its lease expired."""
    assert killed.how == "SIGKILL"
    assert killed.lease_ttl_at_stop is not None, "the killed apiserver had no lease"
    assert killed.left_maps_at - killed.stopped_at < killed.lease_ttl_at_stop, killed.report()
    assert killed.left_maps_at < killed.left_snapshot_at, killed.report()


async def check_last_backend_stays(
    plane: HAControlPlane, stack: ServiceProcesses, pins: Path
) -> None:
    """Kill the last apiserver too: its probes fail, and it stays programmed (fail static)."""
    last = plane.addresses[0]
    assert programmed_apiservers(pins) == {last}
    await asyncio.to_thread(plane.kill_apiserver, 0)
    deadline = time.monotonic() + LAST_BACKEND_WATCH
    while time.monotonic() < deadline:
        programmed = programmed_apiservers(pins)
        # An empty read is bpftool mid-update; what was read must be the last backend.
        assert programmed in ({last}, set()), programmed
        await asyncio.sleep(0.05)
    assert programmed_apiservers(pins) == {last}
    unhealthy = [
        line
        for line in stack.log(NODE, lines=400).splitlines()
        if "backend health changed" in line and f"{last}:{APISERVER_PORT}" in line
    ]
    assert unhealthy, f"the loader never saw {last} fail\n{stack.log(NODE)}"


async def run_failover(
    *,
    plane: HAControlPlane,
    bus: Bus,
    trusted: TrustedKeys,
    stack: ServiceProcesses,
    cgroup: Path,
    pins: Path,
) -> list[Removal]:
    async def snapshot_addresses() -> set[str]:
        entry = await bus.kv_get(subjects.SNAPSHOT_BUCKET, subjects.snapshot_key(CLUSTER))
        if entry is None:
            return set()
        return {e.ip for e in open_snapshot(entry.value, trusted).snapshot.apiserver_endpoints}

    def map_addresses() -> set[str]:
        return programmed_apiservers(pins)

    everyone = set(plane.addresses)
    await eventually(
        lambda: _true_when(map_addresses() == everyone),
        what="all three apiservers in the pinned maps",
        stack=stack,
        timeout=60,
    )
    client = VipClient(plane.client_namespace(), cgroup, plane.ca_path, duration=CLIENT_DURATION)
    try:
        await eventually(
            lambda: _true_when(
                {a.server for a in client.seen() if a.ok}
                == {plane.apiserver_name(i) for i in range(3)}
            ),
            what="the client answered by all three apiservers through the VIP",
            stack=stack,
            timeout=30,
        )
        killed = Removal(2, plane.addresses[2], "SIGKILL")
        await remove(plane, killed, snapshot_addresses, map_addresses, stack, KILL_REMOVAL_BOUND)
        stopped = Removal(1, plane.addresses[1], "graceful stop")
        await remove(
            plane, stopped, snapshot_addresses, map_addresses, stack, GRACEFUL_REMOVAL_BOUND
        )
        await asyncio.sleep(2.0)
    finally:
        stderr = client.stop()
    answers = client.seen()
    assert answers, stderr
    check_answers(plane, answers, [killed, stopped])
    return [killed, stopped]


async def remove(
    plane: HAControlPlane,
    removal: Removal,
    snapshot_addresses: Callable[[], Awaitable[set[str]]],
    map_addresses: Callable[[], set[str]],
    stack: ServiceProcesses,
    bound: float,
) -> None:
    """Take one apiserver away and record when it left discovery's snapshot and the maps
    (with probes, the maps may lose it first)."""
    await asyncio.sleep(1.0)  # requests before the change, for contrast
    removal.lease_ttl_at_stop = plane.lease_ttl(removal.index)
    removal.stopped_at = time.time()
    # In the background: a graceful stop takes its time, and the removal is watched meanwhile.
    stopping = asyncio.create_task(
        asyncio.to_thread(
            plane.kill_apiserver if removal.how == "SIGKILL" else plane.stop_apiserver,
            removal.index,
        )
    )
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline and not (removal.left_maps_at and removal.left_snapshot_at):
        stack.check_alive()
        # The maps are read before the snapshot, both stamped with one time: the snapshot
        # changing between two reads in the other order looked like maps ahead of it. Read
        # this way, maps without the address are followed by a snapshot without it unless
        # the maps really are ahead (then the snapshot's time comes from a later round).
        checked_at = time.time()
        programmed = map_addresses()
        in_snapshot = removal.address in await snapshot_addresses()
        if not removal.left_snapshot_at and not in_snapshot:
            removal.left_snapshot_at = checked_at
        # An empty read is bpftool mid-update (the last backend never leaves the maps).
        if not removal.left_maps_at and programmed and removal.address not in programmed:
            removal.left_maps_at = checked_at
        await asyncio.sleep(0.05)
    await stopping
    assert removal.left_snapshot_at, f"{removal.address} still in the snapshot after {bound}s"
    assert removal.left_maps_at, f"{removal.address} still in the pinned maps after {bound}s"
    await asyncio.sleep(SETTLE_AFTER_REMOVAL)


def check_answers(plane: HAControlPlane, answers: list[VipAnswer], removals: list[Removal]) -> None:
    """Failures only while a dead backend was still in the maps; bounded there; none after."""
    windows = [(r.stopped_at, r.left_maps_at + SETTLE_AFTER_REMOVAL, r) for r in removals]
    for answer in answers:
        owner = next((r for start, end, r in windows if start <= answer.at < end), None)
        if owner is not None:
            owner.requests += 1
            if not answer.ok:
                owner.failures.append(answer)
        else:
            assert answer.ok, f"a request failed outside every failover window: {answer}"
    for removal in removals:
        print(removal.report())
        if removal.how == "SIGKILL" and removal.lease_ttl_at_stop is not None:
            # A crashed apiserver says nothing: it leaves only once its lease has expired
            # (the TTL is read in whole seconds, hence the margin).
            assert removal.left_snapshot_at - removal.stopped_at >= removal.lease_ttl_at_stop - 1.5
        # Random picks among three (then two) backends, one of them dead: about a third (a
        # half) fail while the dead one is still programmed; never all of them.
        assert removal.requests > 0
        assert len(removal.failures) < 0.75 * removal.requests, removal.report()
        # The failures a dying backend causes: refused, reset or timed out; or, while one
        # stops gracefully, a connection its listener accepted just before closing, then
        # closed without an answer (RemoteDisconnected).
        assert all(
            f.error in {"ECONNREFUSED", "ECONNRESET", "ETIMEDOUT", "RemoteDisconnected"}
            or f.status >= 500
            for f in removal.failures
        ), [f for f in removal.failures][:5]
    last = removals[-1].left_maps_at + SETTLE_AFTER_REMOVAL
    after = [a for a in answers if a.at >= last]
    assert after, "no requests after the last failover"
    assert {a.server for a in after} == {plane.apiserver_name(0)}
    assert all(a.ok for a in after)
    total_failed = sum(len(r.failures) for r in removals)
    print(f"{len(answers)} requests through the VIP, {total_failed} failed")


async def _true_when(value: bool) -> bool:
    return value
