"""Only signed snapshots reach the pinned kernel maps: the node-loader in-process on the bpf
backend (compiled, attached to a dedicated test cgroup), fed by a real nats-server, with a
client namespace (no default route) connecting to the service address all along."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from apilane.model import events, signing, subjects
from apilane.model.events import NodeState
from apilane.model.signing import SigningKey
from apilane.node_loader import settings as loader_settings
from apilane.node_loader.programs import HOOKS, detach_pinned_link, link_pin_name
from apilane.node_loader.service import NodeLoader, open_data_plane
from apilane.node_loader.testing import contents_of
from apilane.runtime.bus import Bus
from apilane.runtime.natsauth import Role
from apilane.testing.bpf import SERVICE_VIP4, Agent, BpfLab
from apilane.testing.loaders import loader_env
from apilane.testing.nats_fixtures import ConnectAs
from apilane.testing.sealing import put_sealed, reseal, seal
from apilane.testing.snapshots import make_snapshot

pytestmark = [pytest.mark.integration, pytest.mark.bpf, pytest.mark.nats]

CLUSTER = "signed-kernel"
NODE = "signed-kernel-node"
SERVICE_PORT = 443
BACKEND_PORT = 8080
HOUR = timedelta(hours=1)


def snapshot(generation: int, backend: str) -> events.EndpointSnapshot:
    return make_snapshot(
        cluster=CLUSTER,
        generation=generation,
        services=(f"{SERVICE_VIP4}:{SERVICE_PORT}",),
        apiservers=(f"{backend}:{BACKEND_PORT}",),
    )


class KernelNode:
    def __init__(self, bus: Bus, discovery: Bus, env: dict[str, str]) -> None:
        self.bus = bus  # the operator: reads the node's state
        self.discovery = discovery  # the snapshot key's writer
        self.settings = loader_settings.load(env)
        self.loader: NodeLoader | None = None
        self.registry = CollectorRegistry()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[NodeLoader]:
        """A loader process's life: compile, recover the pinned maps, serve, stop."""
        stopping = asyncio.Event()
        self.registry = CollectorRegistry()
        self.loader = NodeLoader(
            settings=self.settings,
            data_plane=open_data_plane(self.settings),
            registry=self.registry,
        )
        task = asyncio.create_task(self.loader.run(stopping))
        try:
            await self.until(lambda: self.loader.first_reconcile_done, "first reconcile")
            yield self.loader
        finally:
            stopping.set()
            await asyncio.wait_for(task, timeout=20)

    def pinned(self) -> object:
        """What the kernel maps hold, read back through the loader's map adapter."""
        assert self.loader is not None
        return contents_of(self.loader.data_plane.maps)

    def metric(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0

    async def put(self, data: bytes) -> None:
        await put_sealed(self.discovery, data, cluster=CLUSTER)

    async def state(self, check: Callable[[NodeState], bool]) -> NodeState:
        deadline = time.monotonic() + 30
        state = None
        while time.monotonic() < deadline:
            entry = await self.bus.kv_get(
                subjects.NODE_STATE_BUCKET, subjects.node_state_key(CLUSTER, NODE)
            )
            state = events.decode(entry.value) if entry else None
            if isinstance(state, NodeState) and check(state):
                return state
            await asyncio.sleep(0.05)
        raise AssertionError(f"NodeState never matched: {state}")

    async def until(self, check: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if check():
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"timed out waiting for {what}")


def served_by(agent: Agent) -> set[str]:
    results = agent.tcp_request(SERVICE_VIP4, SERVICE_PORT, count=5)
    assert all(r["error"] is None for r in results), results
    return {r["server"][0] for r in results}


async def test_only_signed_snapshots_reach_the_kernel_maps_across_a_restart(
    bpf_lab: BpfLab, bus: Bus, connect_as: ConnectAs, nats_server, tmp_path: Path
) -> None:
    topology = bpf_lab.topology(backends=2)
    for backend in topology.backends:
        bpf_lab.server(netns=backend.netns, addresses=[backend.ipv4], ports=[BACKEND_PORT])
    first, second = (b.ipv4 for b in topology.backends)
    cgroup, pin_dir = bpf_lab.child_cgroup(), bpf_lab.pin_dir()
    agent = bpf_lab.agent(netns=topology.client, cgroup=cgroup)
    node = KernelNode(
        bus,
        await connect_as(Role.DISCOVERY, CLUSTER),
        loader_env(
            nats_server.env(Role.NODE_LOADER, CLUSTER, NODE),  # this node's own identity
            cluster=CLUSTER,
            node=NODE,
            workdir=tmp_path,
            APILANE_MAP_BACKEND="bpf",
            APILANE_CGROUP_PATH=str(cgroup),
            APILANE_BPF_PIN_DIR=str(pin_dir),
            APILANE_DESTROY_STALE_SOCKETS="false",
        ),
    )
    try:
        # Valid for a few seconds only, so that it expires while the test watches.
        valid_for = timedelta(seconds=8)
        original = seal(snapshot(1, first), issued_at=signing.utcnow() - HOUR + valid_for)
        async with node.running():
            await node.put(original)
            await node.state(lambda s: s.generation == 1 and len(s.programs_attached) == 8)
            assert served_by(agent) == {first}
            held = node.pinned()
            applies = node.metric("apilane_node_applies_total", outcome="applied")

            # Signed by a key nobody trusts: refused, the pinned maps stay exactly as they are.
            await node.put(seal(snapshot(2, second), key=SigningKey.generate()))
            await node.until(
                lambda: (
                    node.metric("apilane_node_snapshots_refused_total", reason="unknown-key") == 1
                ),
                "unknown key refused",
            )
            assert node.pinned() == held and served_by(agent) == {first}

            # Expired: kept (the data plane still translates), the node reports stale.
            stale = await node.state(lambda s: s.stale)
            assert stale.generation == 1
            assert node.pinned() == held and served_by(agent) == {first}

            # A refresh of the held generation: not stale any more, and no map write.
            await node.put(reseal(original))
            await node.state(lambda s: s.generation == 1 and not s.stale)
            assert node.metric("apilane_node_snapshot_refreshes_total") == 1
            assert node.metric("apilane_node_applies_total", outcome="applied") == applies
            assert node.pinned() == held

            await node.put(seal(snapshot(3, second)))
            await node.state(lambda s: s.generation == 3)
            assert served_by(agent) == {second}
            latest = node.pinned()

        # While the loader is down, a validly signed older generation becomes the KV value.
        await node.put(seal(snapshot(2, first)))
        async with node.running() as loader:
            await node.until(
                lambda: node.metric("apilane_node_snapshots_refused_total", reason="rollback") == 1,
                "rollback refused after the restart",
            )
            assert loader.reconciler.applied_generation == 3
            assert node.pinned() == latest and served_by(agent) == {second}
            await node.state(lambda s: s.generation == 3 and "rollback" in s.last_error)
    finally:
        # The loader leaves its links pinned on purpose; take them off the test cgroup.
        for hook in HOOKS:
            detach_pinned_link(pin_dir / link_pin_name(hook))
