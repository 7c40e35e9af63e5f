"""CPU per node-loader per snapshot change: the real loader code, N of them in one process.

N `NodeLoader`s on `MemoryNatMaps`, each with its own NATS connection and node identity, on
the default fan-out (`republish`), against one authenticated nats-server (a process of its
own: its CPU is not counted). Each change is a signed snapshot written as discovery and
waited for on every loader; the process's CPU time over the changes, less what the same
loaders burn idle over as long (housekeeping ticks, feed timeouts), divided by N x changes,
is one loader's cost of one change: delivery, verification, admission, apply, node-state
write, spans, metrics and logs.

Two set-ups, each in a process of its own (a tracer provider is set once per process):

- `bench`: as bench_fanout.py, no tracer provider and logging at ERROR;
- `node`: what `runtime.serve` sets up in a node-loader pod with the chart's tracing off
  (OTEL_TRACES_EXPORTER=none): `tracing.setup` and the JSON logs at INFO (to /dev/null).

Backend probes are off: the snapshots name made-up backends, which nothing here may
connect to. Bounded: `--changes` changes, each waited for at most 60 s.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from prometheus_client import CollectorRegistry

from apilane.node_loader import settings as loader_settings
from apilane.node_loader.memmaps import MemoryNatMaps
from apilane.node_loader.service import DataPlane, NodeLoader
from apilane.runtime import tracing
from apilane.runtime.natsauth import Identity, Role
from apilane.runtime.serve import setup_logging
from apilane.testing.benchstats import load_average, percentile
from apilane.testing.nats import NatsServer, auth_env
from apilane.testing.sealing import put_sealed, seal, trusted_env
from apilane.testing.snapshots import make_snapshot

CLUSTER = "default"
IDLE_WINDOW = 3.0  # seconds of idle CPU measured, to subtract from the changes' CPU


def snapshot(generation: int) -> bytes:
    last = generation % 200 + 1
    return seal(make_snapshot(generation=generation, apiservers=(f"10.0.1.{last}:6443",)))


def loader(server: NatsServer, node: str, state_dir: Path) -> NodeLoader:
    identity = server.identities.identity(Role.NODE_LOADER, CLUSTER, node)
    env = {
        "APILANE_NATS_URL": server.url,
        **auth_env(server.identities.auth(identity)),
        "APILANE_CLUSTER": CLUSTER,
        "APILANE_NODE_NAME": node,
        "APILANE_MAP_BACKEND": "memory",
        "APILANE_BPF_PIN_DIR": f"/bench/{node}",
        "APILANE_STATE_DIR": str(state_dir),
        "APILANE_BACKEND_PROBE": "off",
        **trusted_env(),
    }
    return NodeLoader(
        settings=loader_settings.load(env),
        data_plane=DataPlane(maps=MemoryNatMaps()),
        registry=CollectorRegistry(),
    )


async def until(check: object, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return True
        await asyncio.sleep(0.01)
    return False


async def measure(size: int, changes: int, work: Path) -> dict[str, float]:
    server = NatsServer(store_dir=work / "nats").start()
    stopping = asyncio.Event()
    try:
        discovery = await server.connect(Role.DISCOVERY, CLUSTER, name="bench-discovery")
        await discovery.create_streams()
        await put_sealed(discovery, snapshot(1))
        nodes = [f"node-{i:05d}" for i in range(size)]
        server.identities.add_all(
            [Identity(role=Role.NODE_LOADER, cluster=CLUSTER, node=n) for n in nodes]
        )
        server.reload()
        loaders = [loader(server, node, work / "state") for node in nodes]
        tasks = [asyncio.create_task(x.run(stopping)) for x in loaders]
        if not await until(lambda: all(x.first_reconcile_done for x in loaders), 120):
            raise RuntimeError("the loaders did not start in time")
        await asyncio.sleep(2.0)  # start-up writes and reads settle
        gc.collect()
        cpu, wall = time.process_time(), time.monotonic()
        await asyncio.sleep(IDLE_WINDOW)
        idle_rate = (time.process_time() - cpu) / (time.monotonic() - wall)
        busy = spent = 0.0
        latencies: list[float] = []
        for generation in range(2, changes + 2):
            cpu, wall = time.process_time(), time.monotonic()
            written_at = datetime.now(UTC)
            await put_sealed(discovery, snapshot(generation))
            if not await until(
                lambda g=generation: all(x.reconciler.applied_generation >= g for x in loaders), 60
            ):
                raise RuntimeError(f"generation {generation} not everywhere in 60 s")
            busy += time.process_time() - cpu
            spent += time.monotonic() - wall
            latencies += [
                (x.reconciler.applied.applied_at - written_at).total_seconds()
                for x in loaders
                if x.reconciler.applied is not None
            ]
            await asyncio.sleep(0.3)  # the node-state writes land outside the window
        await discovery.drain()
        stopping.set()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)
    finally:
        server.close()
    per_change = (busy - idle_rate * spent) / (size * changes)
    return {
        "cpu_us": per_change * 1e6,
        "idle_us_per_s": idle_rate / size * 1e6,
        "p50_ms": percentile(latencies, 0.5) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
    }


def set_up(mode: str) -> None:
    if mode == "bench":
        logging.basicConfig(level=logging.ERROR)
        return
    os.environ["OTEL_TRACES_EXPORTER"] = "none"
    tracing.setup(loader_settings.SERVICE_NAME)
    setup_logging(loader_settings.SERVICE_NAME, "INFO")
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(open(os.devnull, "w"))  # noqa: SIM115 - for the life of the process


def run_one(mode: str, size: int, changes: int) -> None:
    set_up(mode)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    shm = "/dev/shm" if Path("/dev/shm").is_dir() else None  # tmpfs, like /run
    with tempfile.TemporaryDirectory(prefix="apilane-bench-loader-cpu-", dir=shm) as work:
        row = asyncio.run(measure(size, changes, Path(work)))
    print(
        f"| {mode} | {size} | {changes} | {row['cpu_us']:.0f} | {row['idle_us_per_s']:.0f} "
        f"| {row['p50_ms']:.1f} / {row['p99_ms']:.1f} | {load_average()} |",
        flush=True,
    )


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="200")
    parser.add_argument("--changes", type=int, default=20)
    parser.add_argument("--modes", default="bench,node")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a child: this mode only
    args = parser.parse_args()
    if args.one:
        run_one(args.one, int(args.sizes), args.changes)
        return 0
    print(
        "| set-up | N | changes | CPU µs per loader per change | idle CPU µs/s per loader "
        "| write→applied p50 / p99 ms | load |"
    )
    print("|---|---:|---:|---:|---:|---:|---|")
    failed = False
    for size in (int(s) for s in args.sizes.split(",")):
        for mode in args.modes.split(","):
            command = [sys.executable, __file__, "--one", mode, "--sizes", str(size)]
            child = subprocess.run([*command, "--changes", str(args.changes)], check=False)
            failed |= child.returncode != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
