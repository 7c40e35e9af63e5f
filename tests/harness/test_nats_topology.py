"""The scaled-out NATS topology on loopback: a 3-server JetStream hub (every stream with 3
replicas) and a leaf server that node-loaders attach to, all with production auth (per-role
nkeys; the leaf itself authenticates to the hub as its zone's LEAF identity)."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from apilane.model import subjects
from apilane.node_loader import settings as loader_settings
from apilane.node_loader.memmaps import MemoryNatMaps
from apilane.node_loader.service import DataPlane, NodeLoader
from apilane.node_loader.testing import running
from apilane.runtime.bus import Bus
from apilane.runtime.natsauth import Identity, Role
from apilane.testing.loaders import loader_env
from apilane.testing.nats import NatsTopology
from apilane.testing.sealing import put_retrying, put_sealed, seal
from apilane.testing.snapshots import make_snapshot
from apilane.testing.waiting import until

pytestmark = [pytest.mark.integration, pytest.mark.nats]

CLUSTER = "default"
NODE = "node-on-leaf"


@pytest.fixture
def topology() -> Iterator[NatsTopology]:
    topology = NatsTopology(cluster=CLUSTER, zones=("zone-a",))
    topology.identities.add_all([Identity(role=Role.NODE_LOADER, cluster=CLUSTER, node=NODE)])
    with topology:
        yield topology


@contextlib.asynccontextmanager
async def loader_on_leaf(
    topology: NatsTopology, tmp_path: Path, node: str = NODE
) -> AsyncIterator[NodeLoader]:
    credentials = topology.env(Role.NODE_LOADER, node, via=topology.leaf())
    # Derived by the service from its role and APILANE_CLUSTER, as in production.
    del credentials["APILANE_NATS_INBOX_PREFIX"]
    env = loader_env(credentials, cluster=CLUSTER, node=node, workdir=tmp_path, heartbeat="1s")
    loader = NodeLoader(
        settings=loader_settings.load(env),
        data_plane=DataPlane(maps=MemoryNatMaps()),
        registry=CollectorRegistry(),
    )
    async with running(loader) as started:
        yield started


async def provisioned_discovery(topology: NatsTopology) -> Bus:
    discovery = await topology.connect(Role.DISCOVERY)
    await discovery.create_streams(replicas=topology.replicas)
    return discovery


async def test_every_stream_is_replicated_on_the_three_hub_servers(
    topology: NatsTopology,
) -> None:
    discovery = await provisioned_discovery(topology)
    try:
        for stream in (
            f"KV_{subjects.SNAPSHOT_BUCKET}",
            f"KV_{subjects.NODE_STATE_BUCKET}",
            subjects.EVENTS_STREAM,
        ):
            info = await discovery.js.stream_info(stream)
            assert info.config.num_replicas == 3, stream
            assert info.cluster is not None and len(info.cluster.replicas or []) == 2, stream
    finally:
        await discovery.drain()


async def test_a_loader_on_the_leaf_is_programmed_from_discovery_on_the_hub(
    topology: NatsTopology, tmp_path: Path
) -> None:
    discovery = await provisioned_discovery(topology)
    try:
        async with loader_on_leaf(topology, tmp_path) as loader:
            await put_sealed(discovery, seal(make_snapshot(generation=1)))
            await until(
                lambda: loader.reconciler.applied_generation == 1, what="generation 1 applied"
            )
            # Its node state crossed the leaf into the hub's bucket.
            operator = await topology.connect(Role.OPERATOR)
            try:
                key = subjects.node_state_key(CLUSTER, NODE)
                entry = await operator.kv_get(subjects.NODE_STATE_BUCKET, key)
                assert entry is not None
            finally:
                await operator.drain()
            assert topology.leaf().leafnode_connections() == 1
    finally:
        await discovery.drain()


async def test_killing_one_hub_server_keeps_publishing_and_consuming(
    topology: NatsTopology, tmp_path: Path
) -> None:
    discovery = await provisioned_discovery(topology)
    try:
        async with loader_on_leaf(topology, tmp_path) as loader:
            await put_sealed(discovery, seal(make_snapshot(generation=1)))
            await until(
                lambda: loader.reconciler.applied_generation == 1, what="generation 1 applied"
            )
            victim = topology.hub.servers[0]
            assert victim.proc is not None
            os.kill(victim.proc.pid, signal.SIGKILL)  # the pid we started, nothing else
            victim.proc.wait(timeout=10)
            # Replicas 3: the two left hold a quorum; writes and the watch go on (once the
            # client has moved to a live server and a stream leader is elected there).
            await put_retrying(
                discovery, seal(make_snapshot(generation=2, apiservers=("10.0.0.2:6443",)))
            )
            await until(
                lambda: loader.reconciler.applied_generation == 2,
                what="generation 2 applied with one hub server down",
                timeout=40,
            )
    finally:
        await discovery.drain()


def leaf_connections(topology: NatsTopology) -> set[tuple[str, str, int]]:
    """The hub's ends of the leaves' connections: (hub server, leaf's address, leaf's port).
    A reconnect comes from a new source port."""
    found = set()
    for server in topology.hub.servers:
        for leaf in (server.monitor("leafz") or {}).get("leafs") or []:
            found.add((str(server.server_name), str(leaf["ip"]), int(leaf["port"])))
    return found


async def test_a_node_added_after_the_leaf_connected_is_served_through_the_same_connection(
    topology: NatsTopology, tmp_path: Path
) -> None:
    """The leaf's hub side allows every inbox of the cluster's node-loaders with one pattern:
    a node-loader added later gets its replies (a direct get, the KV watch) through the
    connection the leaf made before it existed. Every server reloads its accounts (SIGHUP);
    the leaf neither restarts nor reconnects."""
    discovery = await provisioned_discovery(topology)
    leaf = topology.leaf()
    try:
        await put_sealed(discovery, seal(make_snapshot(generation=1)))
        assert leaf.proc is not None
        pid, connections = leaf.proc.pid, leaf_connections(topology)
        assert len(connections) == 1
        loaded_before = [s.monitor("varz")["config_load_time"] for s in topology.servers]

        late = "node-added-later"
        topology.provision([Identity(role=Role.NODE_LOADER, cluster=CLUSTER, node=late)])
        loaded_after = [s.monitor("varz")["config_load_time"] for s in topology.servers]
        assert all(a != b for a, b in zip(loaded_before, loaded_after, strict=True))

        # Its snapshot, by a direct get answered to its inbox through the leaf.
        bus = await topology.connect(Role.NODE_LOADER, late, via=leaf)
        try:
            entry = await bus.kv_get(subjects.SNAPSHOT_BUCKET, subjects.snapshot_key(CLUSTER))
            assert entry is not None and entry.value
        finally:
            await bus.drain()
        # And the service itself: its first reconcile (a KV get), then the watch.
        async with loader_on_leaf(topology, tmp_path, late) as loader:
            assert loader.reconciler.applied_generation == 1
            await put_sealed(
                discovery, seal(make_snapshot(generation=2, apiservers=("10.0.0.2:6443",)))
            )
            await until(
                lambda: loader.reconciler.applied_generation == 2, what="generation 2 watched"
            )
        assert leaf.proc is not None and leaf.proc.pid == pid and leaf.running
        assert leaf_connections(topology) == connections
    finally:
        await discovery.drain()
