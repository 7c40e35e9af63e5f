"""Snapshot fan-out to many node-loaders: the real loader code, spread over processes.

N `NodeLoader`s (service.py: intake, admission, reconcile, node-state reporting) on
`MemoryNatMaps`, each with its own NATS connection and its own node identity (a per-node
nkey), spread over `--processes` worker processes (`apilane.testing.fleet`, each worker
`fleet_worker.py` on its own event loop; 1 puts them all in one process, as the first
version of this bench did, the writer and status reader then in this one). Against
`--topology`:

- `single`: one authenticated nats-server;
- `cluster-leaf`: `NatsTopology`, a 3-server JetStream hub (domain hub, every stream with 3
  replicas) and one leaf without JetStream; the loaders attach to the leaf, discovery and
  the status reader to the hub.

For each N (`--sizes`):
- change → applied: a signed snapshot is written as discovery; each loader's latency is its
  `applied_at` minus the write time (wall clock, the same in every process); p50/p99/max
  over every (change, loader) pair; "arrived" is when the value reached the loader's intake;
- CPU used by the loaders' processes over 10 s with no change (housekeeping, pings);
- CPU used during the changes, by the loaders' processes, the nats-servers and this one, as
  a share of one core (the machine has `os.cpu_count()`: near that sum, it is CPU-bound);
- RSS of the loaders' processes and of each nats-server, the consumer count on the snapshot
  stream, and `apilane status`'s node part (read every node's state, summarise), timed;
- restart → all current: a server restarted (single: the server; cluster-leaf: the hub
  server that leads the snapshot stream, then, separately, the leaf), a new generation
  written once it is up; time from the restart until every loader has applied it, and the
  consumer count 8 s later (no leak).

Bounded: every wait has a limit (60 s a change, 120 s after a restart); a memory guard
stops before a size whose estimated footprint would not fit in the memory available; every
worker and server is ended by its pid at the end of each size, also on error.

Targets: p99 <= 30 ms at 50, <= 250 ms at 1000, <= 1 s at 5000; all 1000 current within
10 s of a NATS restart.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import logging
import math
import os
import resource
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from apilane.cli.status import read_nodes, summarise, summary_lines
from apilane.model import subjects
from apilane.runtime.bus import Bus
from apilane.runtime.config import NatsAuth
from apilane.runtime.natsauth import ALL_CLUSTERS, Identity, Role
from apilane.testing.benchstats import (
    available_kib,
    cpu_seconds,
    load_average,
    percentile,
    resident_kib,
)
from apilane.testing.fleet import LoaderSpec, ProcessFleet, Usage, loader_env
from apilane.testing.nats import NatsServer, NatsTopology
from apilane.testing.procs import wait_until
from apilane.testing.sealing import put_retrying, put_sealed, seal
from apilane.testing.snapshots import make_snapshot

CLUSTER = "default"
WORKER = [sys.executable, str(Path(__file__).resolve().parent / "fleet_worker.py")]
SETTLE_TIMEOUT = 60.0
RESTART_TIMEOUT = 120.0
IDLE_S = 10.0
RESERVE_KIB = 2 * 1024 * 1024  # left free for everything else on the machine


# --------------------------------------------------------------------------- the topologies


class Nats(Protocol):
    servers: dict[str, NatsServer]
    loader_url: str
    replicas: int

    def auth(self, node: str) -> NatsAuth: ...
    async def connect(self, role: Role) -> Bus: ...
    async def restarts(self, discovery: Bus) -> list[tuple[str, Callable[[], None]]]: ...
    def close(self) -> None: ...


def node_identities(nodes: list[str]) -> list[Identity]:
    return [Identity(role=Role.NODE_LOADER, cluster=CLUSTER, node=n) for n in nodes]


class SingleNats:
    """One server; the loaders' identities provisioned before it starts (no reload)."""

    replicas = 1

    def __init__(self, work: Path, nodes: list[str]) -> None:
        self.server = NatsServer(store_dir=work / "nats")
        self.server.identities.add_all(node_identities(nodes))
        self.server.start()
        self.servers = {"nats": self.server}
        self.loader_url = self.server.url

    def auth(self, node: str) -> NatsAuth:
        ids = self.server.identities
        return ids.auth(ids.identity(Role.NODE_LOADER, CLUSTER, node))

    async def connect(self, role: Role) -> Bus:
        cluster = ALL_CLUSTERS if role is Role.OPERATOR else CLUSTER
        return await self.server.connect(role, cluster, name=f"bench-{role}", deadline=90.0)

    async def restarts(self, discovery: Bus) -> list[tuple[str, Callable[[], None]]]:
        return [("server", self.server.restart)]

    def close(self) -> None:
        self.server.close()


class ClusterLeafNats:
    """The 3-server hub and one leaf; loaders on the leaf, everything else on the hub."""

    replicas = 3

    def __init__(self, work: Path, nodes: list[str]) -> None:
        self.topology = NatsTopology(cluster=CLUSTER, zones=("zone-a",))
        # Before the leaf connects: its hub-side permissions list every loader's inbox.
        self.topology.identities.add_all(node_identities(nodes))
        self.topology.start()
        self.leaf = self.topology.leaf()
        self.servers = {s.server_name or "?": s for s in self.topology.servers}
        self.loader_url = self.leaf.url

    def auth(self, node: str) -> NatsAuth:
        ids = self.topology.identities
        return ids.auth(ids.identity(Role.NODE_LOADER, CLUSTER, node))

    async def connect(self, role: Role) -> Bus:
        return await self.topology.connect(role, name=f"bench-{role}")

    async def restarts(self, discovery: Bus) -> list[tuple[str, Callable[[], None]]]:
        info = await discovery.js.stream_info(f"KV_{subjects.SNAPSHOT_BUCKET}")
        leader = info.cluster.leader if info.cluster else None
        if leader not in self.servers:
            raise RuntimeError(f"no leader of the snapshot stream among {list(self.servers)}")
        return [(f"hub stream leader {leader}", self.servers[leader].restart), ("leaf", self._leaf)]

    def _leaf(self) -> None:
        self.leaf.restart()
        wait_until(lambda: self.leaf.leafnode_connections() > 0, timeout=30, what="leaf up")

    def close(self) -> None:
        self.topology.close()


TOPOLOGIES: dict[str, Callable[[Path, list[str]], Nats]] = {
    "single": SingleNats,
    "cluster-leaf": ClusterLeafNats,
}


# --------------------------------------------------------------------------- one size


@dataclass
class Run:
    topology: str
    size: int
    changes: int
    processes: int
    fanout: str
    work: Path


def snapshot(generation: int) -> bytes:
    last = generation % 200 + 1
    return seal(make_snapshot(generation=generation, apiservers=(f"10.0.1.{last}:6443",)))


async def consumer_count(bus: Bus) -> int:
    info = await bus.js.stream_info(f"KV_{subjects.SNAPSHOT_BUCKET}")
    return int(info.state.consumer_count)


def specs(nats: Nats, nodes: list[str], run: Run) -> list[LoaderSpec]:
    state_dir = run.work / "state"
    return [
        LoaderSpec(
            node=node,
            env=loader_env(
                url=nats.loader_url,
                auth=nats.auth(node),
                cluster=CLUSTER,
                node=node,
                state_dir=state_dir,
                fanout=run.fanout,
            ),
        )
        for node in nodes
    ]


class CpuMeter:
    """CPU seconds used by the loaders' processes, the servers and this process, between
    `mark()` and `shares()`, each as a share of one core over the wall time between."""

    def __init__(self, fleet: ProcessFleet, nats: Nats) -> None:
        self.fleet, self.nats = fleet, nats

    async def _now(self) -> tuple[float, float, float, float]:
        loaders = sum(u.cpu_s for u in await self.fleet.usage())
        servers = sum(cpu_seconds(pid) for pid in server_pids(self.nats))
        return time.monotonic(), loaders, servers, cpu_seconds()

    async def mark(self) -> None:
        self.start = await self._now()

    async def shares(self) -> dict[str, float]:
        end = await self._now()
        wall = end[0] - self.start[0]
        used = [(b - a) / wall * 100 for a, b in zip(self.start[1:], end[1:], strict=True)]
        return {"wall_s": wall, "cpu_loaders": used[0], "cpu_nats": used[1], "cpu_bench": used[2]}


def server_pids(nats: Nats) -> list[int]:
    return [s.proc.pid for s in nats.servers.values() if s.proc is not None]


async def changes_pass(
    discovery: Bus, fleet: ProcessFleet, last: int, changes: int
) -> tuple[dict[str, float], int]:
    """`changes` new generations after `last`, each waited for on every loader."""
    applied: list[float] = []
    arrived: list[float] = []
    generation = last
    for generation in range(last + 1, last + changes + 1):
        written = time.time()
        revision = await put_sealed(discovery, snapshot(generation))
        settled = await fleet.settle(generation, revision, SETTLE_TIMEOUT)
        if settled.current != fleet.size:
            raise RuntimeError(
                f"generation {generation} on {settled.current} of {fleet.size} loaders "
                f"after {SETTLE_TIMEOUT:.0f} s"
            )
        applied += [t - written for t in settled.applied]
        arrived += [t - written for t in settled.arrived]
    stats = {
        "arrive_p50_ms": percentile(arrived, 0.5) * 1000,
        "arrive_p99_ms": percentile(arrived, 0.99) * 1000,
        "p50_ms": percentile(applied, 0.5) * 1000,
        "p99_ms": percentile(applied, 0.99) * 1000,
        "max_ms": max(applied) * 1000,
    }
    return stats, generation


async def status_pass(nats: Nats, size: int, generation: int) -> tuple[float, str]:
    """`apilane status`'s node part: every node's state read and summarised, timed."""
    operator = await nats.connect(Role.OPERATOR)
    try:
        await asyncio.sleep(1.0)  # the last change's node-state writes land
        began = time.perf_counter()
        nodes = await read_nodes(operator, CLUSTER)
        lines = summary_lines(summarise(nodes, generation, datetime.now(UTC)))
        took = time.perf_counter() - began
    finally:
        await operator.drain()
    if len(nodes) != size:
        raise RuntimeError(f"status read {len(nodes)} nodes of {size}")
    return took, lines[0].strip()


async def restart(
    nats: Nats, fleet: ProcessFleet, label: str, restart_server: Callable[[], None], generation: int
) -> tuple[str, str]:
    """Restart a server, write a new generation once it is up, time until all have it.
    Returns (label: seconds, consumers 8 s later)."""
    began = time.time()
    await asyncio.to_thread(restart_server)
    discovery = await nats.connect(Role.DISCOVERY)
    try:
        revision = await put_retrying(discovery, snapshot(generation), within=60)
        settled = await fleet.settle(generation, revision, RESTART_TIMEOUT)
        took = max(settled.applied) - began if settled.current == fleet.size else math.nan
        await asyncio.sleep(8)  # past the ordered consumers' inactivity threshold (5 s)
        consumers = await consumer_count(discovery)
    finally:
        await discovery.drain()
    missing = "" if settled.current == fleet.size else f" ({settled.current}/{fleet.size})"
    return f"{label}: {took:.2f}{missing}", str(consumers)


def footprint(usage: list[Usage], nats: Nats) -> dict[str, Any]:
    servers = {name: resident_kib(s.proc.pid)[0] for name, s in nats.servers.items() if s.proc}
    return {
        "loaders_rss_kib": sum(u.rss_kib for u in usage),
        "servers_rss_kib": servers,
        "processes": len(usage),
    }


async def measure(run: Run) -> dict[str, Any]:
    nodes = [f"node-{i:05d}" for i in range(run.size)]
    nats = await asyncio.to_thread(TOPOLOGIES[run.topology], run.work, nodes)
    try:
        discovery = await nats.connect(Role.DISCOVERY)
        await discovery.create_streams(replicas=nats.replicas)
        await put_sealed(discovery, snapshot(1))
        fleet = ProcessFleet(
            specs(nats, nodes, run),
            processes=run.processes,
            worker=WORKER,
            log_dir=run.work / "logs",
        )
        try:
            return await measure_fleet(run, nats, discovery, fleet)
        finally:
            await fleet.close()
    finally:
        await asyncio.to_thread(nats.close)


async def measure_fleet(
    run: Run, nats: Nats, discovery: Bus, fleet: ProcessFleet
) -> dict[str, Any]:
    row: dict[str, Any] = {"start_s": await fleet.start()}
    gc.collect()
    meter = CpuMeter(fleet, nats)
    await meter.mark()
    await asyncio.sleep(IDLE_S)  # no change: what the loaders cost doing nothing
    row["idle_cpu_loaders"] = (await meter.shares())["cpu_loaders"]
    await meter.mark()
    stats, generation = await changes_pass(discovery, fleet, 1, run.changes)
    row |= stats | await meter.shares()
    row |= footprint(await fleet.usage(), nats)
    row["status_s"], row["status_line"] = await status_pass(nats, run.size, generation)
    row["consumers"] = await consumer_count(discovery)
    restarts = await nats.restarts(discovery)
    await discovery.drain()
    results = []
    for label, restart_server in restarts:
        generation += 1
        results.append(await restart(nats, fleet, label, restart_server, generation))
    row["restart"] = "; ".join(r[0] for r in results)
    row["consumers_after_restart"] = " / ".join(r[1] for r in results)
    return row


# --------------------------------------------------------------------------- the table


HEADER = (
    "| N | processes | changes | start all s | write→arrived p50 / p99 ms "
    "| write→applied p50 / p99 / max ms | CPU % of a core: loaders / nats / bench (s) "
    "| loader CPU ms a change | idle CPU % (loaders) "
    "| loaders' RSS MiB | nats RSS MiB | consumers | restart→all current s "
    "| consumers after restart | status s | load |\n"
    "|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---|---:|---|---|---:|---|"
)


def table_row(run: Run, row: dict[str, Any]) -> str:
    servers = " / ".join(f"{n} {kib / 1024:.0f}" for n, kib in row["servers_rss_kib"].items())
    return (
        f"| {run.size} | {row['processes']} | {run.changes} | {row['start_s']:.1f} "
        f"| {row['arrive_p50_ms']:.1f} / {row['arrive_p99_ms']:.1f} "
        f"| {row['p50_ms']:.1f} / {row['p99_ms']:.1f} / {row['max_ms']:.1f} "
        f"| {row['cpu_loaders']:.0f} / {row['cpu_nats']:.0f} / {row['cpu_bench']:.0f} "
        f"({row['wall_s']:.1f}) | {per_change_ms(run, row):.2f} | {row['idle_cpu_loaders']:.0f} "
        f"| {row['loaders_rss_kib'] / 1024:.0f} | {servers} "
        f"| {row['consumers']} | {row['restart']} | {row['consumers_after_restart']} "
        f"| {row['status_s']:.3f} | {load_average()} |"
    )


def per_change_ms(run: Run, row: dict[str, Any]) -> float:
    """The loaders' CPU time for one change on one loader (the whole pass, averaged)."""
    return float(row["cpu_loaders"] / 100 * row["wall_s"] / (run.changes * run.size) * 1000)


def total_kib(row: dict[str, Any]) -> int:
    return int(row["loaders_rss_kib"] + sum(row["servers_rss_kib"].values()))


def estimate_kib(measured: list[tuple[int, int]], size: int) -> int | None:
    """A size's footprint, extrapolated from (N, KiB) measured: the slope of the last two
    (the fixed cost of processes and servers taken out), else the last one's per-loader."""
    if not measured:
        return None
    n1, kib1 = measured[-1]
    if len(measured) == 1:
        return kib1 * size // n1
    n0, kib0 = measured[-2]
    slope = max(0.0, (kib1 - kib0) / (n1 - n0)) if n1 != n0 else kib1 / n1
    return int(kib1 + slope * (size - n1))


def memory_refusal(measured: list[tuple[int, int]], size: int) -> str | None:
    need = estimate_kib(measured, size)
    free = available_kib()
    if need is None or need <= free - RESERVE_KIB:
        return None
    return (
        f"N={size} not run: it would need about {need / 1024:.0f} MiB (extrapolated from "
        f"N={', '.join(str(n) for n, _ in measured)}), {free / 1024:.0f} MiB available, "
        f"{RESERVE_KIB / 1024:.0f} MiB kept free"
    )


def run_topology(args: argparse.Namespace, topology: str, fanout: str, work: Path) -> None:
    print(f"\n### {topology}, {fanout}, {args.processes} loader processes\n\n{HEADER}")
    measured: list[tuple[int, int]] = []
    status_lines = []
    for size in args.sizes:
        refusal = memory_refusal(measured, size)
        if refusal:
            print(f"\nstopped: {refusal}")
            break
        changes = args.changes_at.get(size, args.changes)
        run = Run(topology, size, changes, args.processes, fanout, work / f"{topology}-{size}")
        try:
            row = asyncio.run(measure(run))
        except (RuntimeError, TimeoutError) as exc:
            cells = [size, args.processes, changes, f"stopped: {exc}", *[""] * 11, load_average()]
            print("| " + " | ".join(map(str, cells)) + " |", flush=True)
            break
        print(table_row(run, row), flush=True)
        measured.append((size, total_kib(row)))
        status_lines.append(f"- status, N={size}: `{row['status_line']}`")
    print("\n" + "\n".join(status_lines + memory_lines(measured)), flush=True)


def memory_lines(measured: list[tuple[int, int]]) -> list[str]:
    """The footprint's growth per loader between successive sizes (processes, servers)."""
    return [
        f"- memory, N={n0}→{n1}: {(kib1 - kib0) / (n1 - n0):.0f} KiB more per loader "
        "(the loaders' processes and the servers together)"
        for (n0, kib0), (n1, kib1) in itertools.pairwise(measured)
    ]


def sizes_at(text: str) -> dict[int, int]:
    """`5000=20,2000=30`: fewer changes at those sizes."""
    pairs = (item.split("=", 1) for item in text.split(",") if item)
    return {int(size): int(count) for size, count in pairs}


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--sizes", default="50,500,1000,2000,5000")
    parser.add_argument("--changes", type=int, default=50)
    parser.add_argument("--changes-at", type=sizes_at, default={}, help="e.g. 5000=20")
    parser.add_argument("--processes", type=int, default=max(2, os.cpu_count() or 1))
    # (1 and up: the loaders are always in worker processes, the bench in its own)
    parser.add_argument("--topology", default="single,cluster-leaf")
    parser.add_argument("--fanouts", default="republish")
    args = parser.parse_args()
    args.sizes = [int(s) for s in args.sizes.split(",")]
    return args


def main() -> int:
    args = arguments()
    logging.basicConfig(level=logging.ERROR)
    # SIGTERM unwinds like Ctrl-C: every size's `finally` ends its workers and servers.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # inherited by workers, servers
    print(
        f"load before: {load_average()}; fd limit {soft} -> {hard}; "
        f"{available_kib() / 1024:.0f} MiB available; argv: {' '.join(sys.argv[1:])}"
    )
    shm = "/dev/shm" if Path("/dev/shm").is_dir() else None  # tmpfs, like /run
    with tempfile.TemporaryDirectory(prefix="apilane-bench-fanout-", dir=shm) as work:
        for topology in args.topology.split(","):
            for fanout in args.fanouts.split(","):
                run_topology(args, topology, fanout, Path(work))
    return 0


if __name__ == "__main__":
    sys.exit(main())
