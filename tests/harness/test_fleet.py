"""The fan-out bench's fleet: real node-loaders spread over worker processes
(apilane.testing.fleet driving bench/fleet_worker.py)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from apilane.model import subjects
from apilane.node_loader import settings as loader_settings
from apilane.runtime.natsauth import Identity, Role
from apilane.testing.fleet import LoaderSpec, ProcessFleet, loader_env, split
from apilane.testing.nats import NatsIdentities, NatsServer
from apilane.testing.sealing import put_sealed, seal
from apilane.testing.snapshots import make_snapshot

CLUSTER = "default"
# The worker lives with the bench: the harness imports no service.
WORKER = [sys.executable, str(Path(__file__).resolve().parents[2] / "bench" / "fleet_worker.py")]


@pytest.mark.unit
def test_loaders_are_dealt_round_robin_into_non_empty_shares() -> None:
    specs = [LoaderSpec(node=f"n{i}", env={}) for i in range(5)]
    assert [[s.node for s in share] for share in split(specs, 2)] == [
        ["n0", "n2", "n4"],
        ["n1", "n3"],
    ]
    assert len(split(specs, 8)) == 5
    assert len(split(specs, 0)) == 1


@pytest.mark.unit
def test_bench_loaders_never_probe_their_backends(tmp_path: Path) -> None:
    identities = NatsIdentities(tmp_path / "auth")
    env = loader_env(
        url="nats://127.0.0.1:4222",
        auth=identities.auth(identities.identity(Role.NODE_LOADER, CLUSTER, "n0")),
        cluster=CLUSTER,
        node="n0",
        state_dir=tmp_path / "state",
        fanout="republish",
    )
    assert not loader_settings.load(env).probe.enabled


def specs_for(server: NatsServer, nodes: list[str], state_dir: Path) -> list[LoaderSpec]:
    server.identities.add_all(
        [Identity(role=Role.NODE_LOADER, cluster=CLUSTER, node=n) for n in nodes]
    )
    return [
        LoaderSpec(
            node=node,
            env=loader_env(
                url=server.url,
                auth=server.identities.auth(
                    server.identities.identity(Role.NODE_LOADER, CLUSTER, node)
                ),
                cluster=CLUSTER,
                node=node,
                state_dir=state_dir,
                fanout="watch",
            ),
        )
        for node in nodes
    ]


@pytest.mark.integration
@pytest.mark.nats
async def test_two_workers_apply_a_change_on_every_loader_and_are_gone_after(
    tmp_path: Path,
) -> None:
    nodes = [f"fleet-node-{i}" for i in range(10)]
    server = NatsServer(store_dir=tmp_path / "nats")
    specs = specs_for(server, nodes, tmp_path / "state")  # provisioned before the start
    with server:
        discovery = await server.connect(Role.DISCOVERY, CLUSTER)
        await discovery.create_streams()
        await put_sealed(discovery, seal(make_snapshot(generation=1)))
        fleet = ProcessFleet(specs, processes=2, worker=WORKER, log_dir=tmp_path / "logs")
        try:
            await fleet.start()
            written = time.time()
            change = make_snapshot(generation=2, apiservers=("10.0.1.2:6443",))
            revision = await put_sealed(discovery, seal(change))
            settled = await fleet.settle(2, revision, timeout=30)
            assert settled.current == len(nodes)
            assert len(settled.applied) == len(settled.arrived) == len(nodes)
            assert all(written <= t < written + 30 for t in settled.applied + settled.arrived)
            usage = await fleet.usage()
            assert sorted(u.pid for u in usage) == sorted(fleet.pids)
            assert [u.loaders for u in usage] == [5, 5]
            assert all(u.rss_kib > 0 and u.cpu_s > 0 for u in usage)
            # One watch (an ordered consumer) per loader, each on its own connection.
            info = await discovery.js.stream_info(f"KV_{subjects.SNAPSHOT_BUCKET}")
            assert info.state.consumer_count == len(nodes)
        finally:
            await fleet.close()
            await discovery.drain()
        assert len(fleet.pids) == 2
        assert fleet.alive() == []
