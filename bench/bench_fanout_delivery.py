"""NATS delivery of one snapshot change to N node-loader connections, with Go subscribers.

bench_fanout runs N real Python loaders, whose own CPU (1-2 ms per loader per change) is
serialised on this machine's cores; on a cluster each loader has a node of its own. This
measures the NATS side alone: the Go probe (tools/fanout-probe) opens N connections, each
authenticated as its own node-loader identity (its nkey, TLS with the server's CA, its
inbox prefix) and subscribed to the republished snapshot subject, and records when each
connection received each change. For each N and topology:

- `single`: one nats-server with JetStream, the subscribers on it;
- `leaf`: a JetStream hub of `--hub-size` routed servers (streams replicated on all) and
  one leaf server without JetStream, the subscribers on the leaf, discovery on the hub.

K signed snapshots (`--changes`) are written as discovery, ~100 ms apart (`--spacing`);
write→delivered p50/p99/max over every (change, connection), and the servers' RSS with the
N connections open. Bounded: each N's connections get 300 s to subscribe, each change 60 s
to reach them all; every server and the probe are ended by their pid; 127.0.0.1 only. The
probe itself runs on the same cores (its TLS reads included); the load average is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import resource
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from apilane.runtime.bus import Bus
from apilane.runtime.natsauth import Identity, Role
from apilane.testing.benchstats import cpu_seconds, load_average, percentile, resident_kib
from apilane.testing.fanout_probe import (
    FanoutProbe,
    ProbeError,
    delivery_latencies,
    find_probe,
    node_loader_connections,
    snapshot_spec,
)
from apilane.testing.nats import NatsIdentities, NatsServer, NatsTopology
from apilane.testing.procs import tail
from apilane.testing.sealing import put_sealed, seal
from apilane.testing.snapshots import make_snapshot

CLUSTER = "default"
READY_TIMEOUT = 300.0
CHANGE_TIMEOUT = 60.0
WARMUP_TRIES = 5  # a leaf's interest reaches the hub a moment after the subscribe


@dataclass
class Row:
    topology: str
    n: int
    connected: int = 0
    connect_s: float = 0.0
    p50_ms: float = float("nan")
    p99_ms: float = float("nan")
    max_ms: float = float("nan")
    missing: int = 0
    rss: dict[str, float] = field(default_factory=dict)
    nats_cpu_ms: float = float("nan")  # every server's CPU per measured change
    probe_cpu_ms: float = float("nan")
    note: str = ""

    def line(self) -> str:
        rss = ", ".join(f"{name} {mib:.0f}" for name, mib in self.rss.items()) or "—"
        figures = (self.p50_ms, self.p99_ms, self.max_ms)
        latencies = " | ".join(_figure(value) for value in figures)
        return (
            f"| {self.topology} | {self.n} | {self.connected} | {self.connect_s:.1f} "
            f"| {latencies} | {self.missing} | {rss} | {_figure(self.nats_cpu_ms)} "
            f"| {_figure(self.probe_cpu_ms)} | {load_average()} | {self.note} |"
        )


def _figure(value: float) -> str:
    return "—" if math.isnan(value) else f"{value:.1f}"


def snapshot(generation: int) -> bytes:
    last = generation % 200 + 1
    return seal(make_snapshot(generation=generation, apiservers=(f"10.0.1.{last}:6443",)))


def node_identities(nodes: Sequence[str]) -> list[Identity]:
    return [Identity(role=Role.NODE_LOADER, cluster=CLUSTER, node=n) for n in nodes]


def rss_mib(servers: dict[str, NatsServer]) -> dict[str, float]:
    found = {}
    for name, server in servers.items():
        assert server.proc is not None
        found[name] = resident_kib(server.proc.pid)[0] / 1024
    return found


class Changes:
    """Discovery's writes, and when each was made (ns since the epoch, as the probe's)."""

    def __init__(self, discovery: Bus) -> None:
        self.discovery = discovery
        self.generation = 1
        self.written: dict[int, int] = {}

    async def write(self) -> int:
        self.generation += 1
        data = snapshot(self.generation)
        at = time.time_ns()
        revision = await put_sealed(self.discovery, data)
        self.written[revision] = at
        return revision


async def warm_up(probe: FanoutProbe, changes: Changes) -> bool:
    """A change every subscriber receives, before the measured ones (not counted)."""
    for _ in range(WARMUP_TRIES):
        revision = await changes.write()
        changes.written.pop(revision)
        if await asyncio.to_thread(probe.wait_complete, revision, 10.0):
            return True
    return False


def cpu_of(servers: dict[str, NatsServer], probe: FanoutProbe) -> tuple[float, float]:
    """CPU seconds used so far by the servers (together) and by the probe."""
    assert probe.proc is not None
    pids = [server.proc.pid for server in servers.values() if server.proc is not None]
    return sum(cpu_seconds(pid) for pid in pids), cpu_seconds(probe.proc.pid)


async def deliver(
    row: Row,
    probe: FanoutProbe,
    changes: Changes,
    servers: dict[str, NatsServer],
    args: argparse.Namespace,
) -> None:
    """`--changes` changes `--spacing` apart, until each is on every connection; the CPU
    the servers and the probe used for them into `row`."""
    if not await warm_up(probe, changes):
        row.note = "warm-up change not delivered to every connection: stopped"
        return
    count, spacing = args.changes, args.spacing
    nats_before, probe_before = cpu_of(servers, probe)
    for _ in range(count):
        began = time.monotonic()
        await changes.write()
        await asyncio.sleep(max(0.0, spacing - (time.monotonic() - began)))
    for revision in changes.written:
        if not await asyncio.to_thread(probe.wait_complete, revision, CHANGE_TIMEOUT):
            row.note = f"revision {revision} not on every connection in {CHANGE_TIMEOUT:.0f} s"
            break
    nats_after, probe_after = cpu_of(servers, probe)
    row.nats_cpu_ms = (nats_after - nats_before) / count * 1000
    row.probe_cpu_ms = (probe_after - probe_before) / count * 1000


def finish(row: Row, probe: FanoutProbe, changes: Changes) -> None:
    result = probe.finish(timeout=60)
    latencies = delivery_latencies(result, changes.written)
    row.missing = latencies.missing
    if latencies.samples:
        row.p50_ms = percentile(latencies.samples, 0.5) * 1000
        row.p99_ms = percentile(latencies.samples, 0.99) * 1000
        row.max_ms = max(latencies.samples) * 1000
    refused = {error: count for error, count in result.errors.items() if "deadline" not in error}
    if refused and not row.note:
        first = next(iter(refused))
        row.note = f"{sum(refused.values())} errors, e.g. {first[:120]}"


async def run_probe(
    row: Row,
    *,
    identities: NatsIdentities,
    url: str,
    nodes: Sequence[str],
    discovery: Bus,
    servers: dict[str, NatsServer],
    args: argparse.Namespace,
    work: Path,
) -> None:
    connections = node_loader_connections(identities, url, CLUSTER, nodes)
    with FanoutProbe(snapshot_spec(CLUSTER, connections), work, binary=args.probe) as probe:
        ready = await asyncio.to_thread(probe.start, timeout=READY_TIMEOUT)
        row.connected, row.connect_s = ready.connected, ready.connect_s
        changes = Changes(discovery)
        await deliver(row, probe, changes, servers, args)
        row.rss = rss_mib(servers)  # with the N connections still open
        finish(row, probe, changes)


async def measure_single(size: int, args: argparse.Namespace, work: Path) -> Row:
    row = Row(topology="single", n=size)
    nodes = [f"node-{i:05d}" for i in range(size)]
    server = NatsServer(store_dir=work / f"nats-single-{size}", tls=True).start()
    try:
        server.identities.add_all(node_identities(nodes))
        server.reload()  # once for every new identity, not once each
        discovery = await server.connect(Role.DISCOVERY, CLUSTER, name="bench-discovery")
        try:
            await discovery.create_streams()
            await put_sealed(discovery, snapshot(1))
            await run_probe(
                row,
                identities=server.identities,
                url=server.url,
                nodes=nodes,
                discovery=discovery,
                servers={"server": server},
                args=args,
                work=work / f"probe-single-{size}",
            )
        finally:
            await discovery.drain()
    finally:
        server.close()
    return row


async def measure_leaf(size: int, args: argparse.Namespace, work: Path) -> Row:
    row = Row(topology=f"leaf (hub of {args.hub_size})", n=size)
    nodes = [f"node-{i:05d}" for i in range(size)]
    topology = NatsTopology(size=args.hub_size, tls=True).start()
    try:
        try:
            topology.provision(node_identities(nodes))  # one reload; the leaf reconnects
        except TimeoutError:
            leaf = topology.leaf()
            row.note = "leaf did not connect to the hub: " + leaf_error(leaf.log_path)
            return row
        discovery = await topology.connect(Role.DISCOVERY, name="bench-discovery")
        try:
            await discovery.create_streams(replicas=topology.replicas)
            await put_sealed(discovery, snapshot(1))
            servers = {
                "leaf": topology.leaf(),
                **{s.server_name or "": s for s in topology.hub.servers},
            }
            await run_probe(
                row,
                identities=topology.identities,
                url=topology.leaf().url,
                nodes=nodes,
                discovery=discovery,
                servers=servers,
                args=args,
                work=topology.hub.base / "probe",
            )
        finally:
            await discovery.drain()
    finally:
        topology.close()
    return row


def leaf_error(log_path: Path) -> str:
    """The leaf log's last error line (why it could not connect), shortened."""
    errors = [line for line in tail(log_path, 200).splitlines() if "[ERR]" in line]
    return errors[-1].split("[ERR]", 1)[1].strip()[:200] if errors else "no error logged"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="50,500,1000,2000,5000")
    parser.add_argument("--changes", type=int, default=50)
    parser.add_argument("--spacing", type=float, default=0.1, help="seconds between changes")
    parser.add_argument("--topologies", default="single,leaf")
    parser.add_argument("--hub-size", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the servers and probe inherit it
    try:
        args.probe = find_probe()
    except ProbeError as exc:
        print(f"bench_fanout_delivery: {exc}", file=sys.stderr)
        return 1
    print(f"load before: {load_average()}; fd limit {soft} -> {hard}; probe {args.probe}")
    print(
        "| topology | N | subscribed | connect s | write→delivered p50 ms | p99 ms | max ms "
        "| missing | nats RSS MiB | nats CPU ms/change | probe CPU ms/change "
        "| load (1/5/15 min) | note |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---|---|")
    measures = {"single": measure_single, "leaf": measure_leaf}
    shm = "/dev/shm" if Path("/dev/shm").is_dir() else None  # tmpfs, like /run
    with tempfile.TemporaryDirectory(prefix="apilane-bench-delivery-", dir=shm) as work:
        for topology in args.topologies.split(","):
            for size in (int(s) for s in args.sizes.split(",")):
                row = asyncio.run(measures[topology](size, args, Path(work)))
                print(row.line(), flush=True)
                if row.note.startswith("leaf did not connect"):
                    break  # a larger N has more identities still
    return 0


if __name__ == "__main__":
    sys.exit(main())
