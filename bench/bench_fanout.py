"""Snapshot fan-out to many node-loaders, in one process: the real loader code.

N `NodeLoader`s (service.py: intake, admission, reconcile, node-state reporting) on
`MemoryNatMaps`, each with its own NATS connection and its own node identity (a per-node
nkey), against one authenticated nats-server. For each N:

- change → applied: a signed snapshot is written as discovery; each loader's latency is its
  `applied_at` minus the write time; p50/p99/max over every (change, loader) pair;
- the nats-server's RSS and the consumer count on the snapshot stream, in steady state;
- restart: the nats-server restarted, then a new generation written once it is up: time
  until every loader has applied it, and the consumer count once settled (no leak).

Bounded: N loaders (`--sizes`), `--changes` changes per N, each waited for at most 60 s;
every loader and the server are stopped at the end. The loaders share this process's one
event loop and one core, so at large N the figures include the loaders' own queueing (a
real node runs one loader on its own); the load average is printed beside them.

Targets: p99 <= 30 ms at 50, <= 250 ms at 1000, <= 1 s at 5000; all 1000 current within
10 s of a NATS restart.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import logging
import resource
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from apilane.cli.status import read_nodes, summarise, summary_lines
from apilane.model import subjects
from apilane.node_loader import settings as loader_settings
from apilane.node_loader.memmaps import MemoryNatMaps
from apilane.node_loader.service import DataPlane, NodeLoader
from apilane.runtime.bus import Bus, KvEntry
from apilane.runtime.natsauth import ALL_CLUSTERS, Identity, Role
from apilane.testing.benchstats import load_average, percentile, resident_kib
from apilane.testing.nats import NatsServer, auth_env
from apilane.testing.sealing import put_sealed, seal, trusted_env
from apilane.testing.snapshots import make_snapshot

CLUSTER = "default"
SETTLE_TIMEOUT = 60.0
START_BATCH = 100  # loaders started at once (their first connect and reconcile)


class Fleet:
    """N loaders in this process, each as its own node."""

    def __init__(self, server: NatsServer, size: int, work: Path, fanout: str) -> None:
        self.server = server
        self.fanout = fanout
        self.nodes = [f"node-{i:05d}" for i in range(size)]
        self.arrivals: dict[str, dict[int, datetime]] = {}
        server.identities.add_all(
            [Identity(role=Role.NODE_LOADER, cluster=CLUSTER, node=n) for n in self.nodes]
        )
        server.reload()  # once for every new identity, not once each
        self.loaders = [self._loader(node, work, size) for node in self.nodes]
        self.stopping = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []

    def _loader(self, node: str, work: Path, size: int) -> NodeLoader:
        identity = self.server.identities.identity(Role.NODE_LOADER, CLUSTER, node)
        env = {
            # Not server.env(): that re-renders the whole config (N users) for each loader.
            "APILANE_NATS_URL": self.server.url,
            **auth_env(self.server.identities.auth(identity)),
            "APILANE_CLUSTER": CLUSTER,
            "APILANE_NODE_NAME": node,
            "APILANE_MAP_BACKEND": "memory",
            "APILANE_BPF_PIN_DIR": f"/bench/{node}",
            "APILANE_STATE_DIR": str(work / f"state-{self.fanout}-{size}"),
            "APILANE_NODE_STATE_INTERVAL": "30s",
            "APILANE_SNAPSHOT_FANOUT": self.fanout,
            # The snapshots name made-up backends (10.0.1.x): nothing here may connect to them.
            "APILANE_BACKEND_PROBE": "off",
            **trusted_env(),
        }
        loader = NodeLoader(
            settings=loader_settings.load(env),
            data_plane=DataPlane(maps=MemoryNatMaps()),
            registry=CollectorRegistry(),
        )
        self.arrivals[node] = {}
        handle = loader.handle_entry

        async def arrived(entry: KvEntry) -> None:
            # When the value reached this loader, before admission and apply: the fan-out's
            # own share of the latency (apply is the same code either way).
            self.arrivals[node][entry.revision] = datetime.now(UTC)
            await handle(entry)

        loader.handle_entry = arrived  # type: ignore[method-assign]
        return loader

    async def start(self) -> float:
        began = time.monotonic()
        for first in range(0, len(self.loaders), START_BATCH):
            batch = self.loaders[first : first + START_BATCH]
            self.tasks += [asyncio.create_task(loader.run(self.stopping)) for loader in batch]
            if not await self.until(lambda b=batch: all(x.first_reconcile_done for x in b), 120):
                ready = sum(1 for x in self.loaders if x.first_reconcile_done)
                raise RuntimeError(f"only {ready} of {len(self.loaders)} loaders started in time")
        return time.monotonic() - began

    async def stop(self) -> None:
        self.stopping.set()
        await asyncio.wait_for(asyncio.gather(*self.tasks, return_exceptions=True), 60)

    def current(self, generation: int) -> int:
        return sum(1 for x in self.loaders if x.reconciler.applied_generation >= generation)

    async def until(self, check: object, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():  # type: ignore[operator]
                return True
            await asyncio.sleep(0.01)
        return False

    def arrival_latencies(self, revision: int, written_at: datetime) -> list[float]:
        return [
            (got[revision] - written_at).total_seconds()
            for got in self.arrivals.values()
            if revision in got
        ]

    def latencies(self, written_at: datetime) -> list[float]:
        return [
            (x.reconciler.applied.applied_at - written_at).total_seconds()
            for x in self.loaders
            if x.reconciler.applied is not None
        ]


def snapshot(generation: int) -> bytes:
    last = generation % 200 + 1
    return seal(make_snapshot(generation=generation, apiservers=(f"10.0.1.{last}:6443",)))


async def consumer_count(bus: Bus) -> int:
    info = await bus.js.stream_info(f"KV_{subjects.SNAPSHOT_BUCKET}")
    return int(info.state.consumer_count)


async def measure(size: int, changes: int, work: Path, fanout: str) -> dict[str, Any]:
    server = NatsServer(store_dir=work / f"nats-{fanout}-{size}").start()
    try:
        discovery = await server.connect(Role.DISCOVERY, CLUSTER, name="bench-discovery")
        await discovery.create_streams()
        generation = 1
        await put_sealed(discovery, snapshot(generation))
        fleet = Fleet(server, size, work, fanout)
        started = await fleet.start()
        gc.collect()
        samples: list[float] = []
        arrivals: list[float] = []
        for _ in range(changes):
            generation += 1
            written_at = datetime.now(UTC)
            revision = await put_sealed(discovery, snapshot(generation))
            if not await fleet.until(lambda g=generation: fleet.current(g) == size, 60):
                raise RuntimeError(f"N={size}: generation {generation} not everywhere in 60 s")
            samples += fleet.latencies(written_at)
            arrivals += fleet.arrival_latencies(revision, written_at)
        status_s, status_line = await status_pass(server, size, generation)
        assert server.proc is not None
        rss_kib, _ = resident_kib(server.proc.pid)
        consumers = await consumer_count(discovery)
        await discovery.drain()
        restarted = await restart(server, fleet, generation + 1)
        await fleet.stop()
        return {
            "n": size,
            "start_s": started,
            "arrive_p50_ms": percentile(arrivals, 0.5) * 1000,
            "arrive_p99_ms": percentile(arrivals, 0.99) * 1000,
            "status_s": status_s,
            "status_line": status_line,
            "p50_ms": percentile(samples, 0.5) * 1000,
            "p99_ms": percentile(samples, 0.99) * 1000,
            "max_ms": max(samples) * 1000,
            "rss_mib": rss_kib / 1024,
            "consumers": consumers,
            **restarted,
        }
    finally:
        server.close()


async def status_pass(server: NatsServer, size: int, generation: int) -> tuple[float, str]:
    """`apilane status`'s node part: every node's state read and summarised, timed."""
    operator = await server.connect(Role.OPERATOR, ALL_CLUSTERS, name="bench-status")
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


async def restart(server: NatsServer, fleet: Fleet, generation: int) -> dict[str, float]:
    """Restart the server, write a new generation once it is up, time until all have it."""
    began = time.monotonic()
    await asyncio.to_thread(server.restart)
    # The writer connects while N loaders reconnect through this same event loop.
    discovery = await server.connect(Role.DISCOVERY, CLUSTER, name="bench-discovery", deadline=90.0)
    await put_sealed(discovery, snapshot(generation))
    settled = await fleet.until(lambda: fleet.current(generation) == len(fleet.loaders), 120)
    all_current = time.monotonic() - began
    await asyncio.sleep(8)  # past the ordered consumers' inactivity threshold (5 s)
    consumers = await consumer_count(discovery)
    await discovery.drain()
    return {
        "restart_all_current_s": all_current if settled else float("nan"),
        "consumers_after_restart": consumers,
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="50,500,1000")
    parser.add_argument("--changes", type=int, default=50)
    parser.add_argument("--fanouts", default="watch,republish")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    print(f"load before: {load_average()}; fd limit {soft} -> {hard}")
    print(
        "| fan-out | N | start all s | write→arrived p50 / p99 ms | write→applied p50 ms "
        "| p99 ms | max ms | nats RSS MiB | consumers | restart→all current s "
        "| consumers after restart | status s | load |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    shm = "/dev/shm" if Path("/dev/shm").is_dir() else None  # tmpfs, like /run
    status_lines = []
    with tempfile.TemporaryDirectory(prefix="apilane-bench-fanout-", dir=shm) as work:
        for size, fanout in itertools.product(
            (int(s) for s in args.sizes.split(",")), args.fanouts.split(",")
        ):
            row = asyncio.run(measure(size, args.changes, Path(work), fanout))
            print(
                f"| {fanout} | {size} | {row['start_s']:.1f} "
                f"| {row['arrive_p50_ms']:.1f} / {row['arrive_p99_ms']:.1f} "
                f"| {row['p50_ms']:.1f} | {row['p99_ms']:.1f} "
                f"| {row['max_ms']:.1f} | {row['rss_mib']:.1f} | {row['consumers']:.0f} "
                f"| {row['restart_all_current_s']:.2f} | {row['consumers_after_restart']:.0f} "
                f"| {row['status_s']:.3f} | {load_average()} |",
                flush=True,
            )
            status_lines.append(f"- status, {fanout}, N={size}: `{row['status_line']}`")
    print("\n" + "\n".join(status_lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
