"""The Go fan-out probe (tools/fanout-probe): built or cached, it connects as node-loaders
with their own nkeys over TLS, receives the republished snapshot, and reports when."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from apilane.runtime.natsauth import Identity, Role
from apilane.testing.fanout_probe import (
    FanoutProbe,
    ProbeConnection,
    ProbeResult,
    delivery_latencies,
    find_probe,
    node_loader_connections,
    snapshot_spec,
)
from apilane.testing.nats import NatsServer
from apilane.testing.sealing import put_sealed, seal
from apilane.testing.snapshots import make_snapshot

CLUSTER = "default"


def _result(subscribed: list[bool], deliveries: dict[str, list[int]]) -> ProbeResult:
    return ProbeResult(
        connections=len(subscribed),
        connected=sum(subscribed),
        subscribed=subscribed,
        errors={},
        deliveries=deliveries,
    )


@pytest.mark.unit
def test_latencies_cover_every_change_and_subscribed_connection() -> None:
    result = _result(
        [True, True, False],
        {"7": [1_010_000_000, 1_250_000_000, 0], "8": [2_005_000_000, 0, 0]},
    )
    latencies = delivery_latencies(result, {7: 1_000_000_000, 8: 2_000_000_000})
    assert latencies.samples == pytest.approx([0.010, 0.250, 0.005])
    # Connection 1 never had revision 8; connection 2 never subscribed (not counted).
    assert latencies.missing == 1


@pytest.mark.unit
def test_a_change_nobody_received_is_missing_everywhere() -> None:
    latencies = delivery_latencies(_result([True, True], {}), {3: 1})
    assert latencies.samples == []
    assert latencies.missing == 2


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(store_dir=tmp_path / "nats", tls=True).start()
    try:
        yield server
    finally:
        server.close()


@pytest.mark.integration
@pytest.mark.nats
async def test_probe_receives_each_change_on_every_node_loader_connection(
    tls_server: NatsServer, tmp_path: Path
) -> None:
    binary = find_probe()  # built once, then cached by a digest of its sources
    nodes = [f"node-{i}" for i in range(5)]
    tls_server.identities.add_all(
        [Identity(role=Role.NODE_LOADER, cluster=CLUSTER, node=n) for n in nodes]
    )
    # A renderer may not receive the republished copies: the probe says it is not subscribed.
    renderer = tls_server.identities.identity(Role.RENDERER, CLUSTER)
    tls_server.reload()
    discovery = await tls_server.connect(Role.DISCOVERY, CLUSTER, name="test-discovery")
    await discovery.create_streams()
    connections = node_loader_connections(tls_server.identities, tls_server.url, CLUSTER, nodes)
    renderer_auth = tls_server.identities.auth(renderer)
    connections.append(
        ProbeConnection(
            url=tls_server.url,
            name="fanout-probe-renderer",
            seed_file=renderer_auth.nkey_seed_file,
            ca_file=renderer_auth.tls_ca_file,
            inbox_prefix=renderer.inbox_prefix,
        )
    )
    try:
        with FanoutProbe(snapshot_spec(CLUSTER, connections), tmp_path, binary=binary) as probe:
            ready = probe.start(timeout=10)
            assert (ready.connected, ready.connections) == (5, 6)
            written: dict[int, int] = {}
            for generation in (1, 2):
                data = seal(make_snapshot(generation=generation))
                at = time.time_ns()
                written[await put_sealed(discovery, data)] = at
            for revision in written:
                assert probe.wait_complete(revision, timeout=5), revision
            result = probe.finish(timeout=5)
    finally:
        await discovery.drain()
    assert result.subscribed == [True] * 5 + [False]
    assert any("Permissions Violation" in error for error in result.errors), result.errors
    latencies = delivery_latencies(result, written)
    assert latencies.missing == 0
    assert len(latencies.samples) == 10
    assert all(0 < sample < 5 for sample in latencies.samples)
