"""The real node-loader process on BPF: cold start and resident memory.

`python -m apilane.node_loader` with the bpf map backend and the connect-time programs on
(attached to a dedicated child cgroup), fed by a real nats-server:
- cold start: process start -> its node state reports generation 1 applied (maps programmed,
  8 programs attached); the snapshot is in the KV bucket before the process starts;
- VmRSS (and VmHWM, the peak) of that process from /proc/<pid>/status: right after the first
  apply, and after SNAPSHOTS more snapshots, each waited for.

Run it with another checkout's interpreter (`/path/to/.venv/bin/python bench/bench_loader.py`)
to compare: the loader measured is the one that interpreter imports.

Targets: cold start <= 3 s; steady VmRSS <= 64 MB.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from apilane.model import events, subjects
from apilane.model.events import NodeState
from apilane.runtime import natsauth
from apilane.runtime.bus import Bus
from apilane.runtime.natsauth import Role
from apilane.testing.benchstats import load_average
from apilane.testing.bpf import BpfLab, check_bpf_environment
from apilane.testing.nats import NatsServer
from apilane.testing.procs import end_process, tail
from apilane.testing.sealing import put_sealed, seal, trusted_env
from apilane.testing.snapshots import make_snapshot

CLUSTER = "benchload"
NODE = "bench-node"
SNAPSHOTS = int(os.environ.get("SNAPSHOTS", "200"))
TARGET_COLD_START_S = 3.0
TARGET_RSS_MB = 64.0
WAIT = 60.0


def status_mb(pid: int) -> dict[str, float]:
    figures = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in {"VmRSS", "VmHWM"}:
            figures[key] = int(value.split()[0]) / 1024
    return figures


async def wait_generation(
    bus: Bus, proc: subprocess.Popen[bytes], generation: int, log: Path
) -> NodeState:
    deadline = time.monotonic() + WAIT
    key = subjects.node_state_key(CLUSTER, NODE)
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"loader exited with {proc.returncode}:\n{tail(log, 40)}")
        entry = await bus.kv_get(subjects.NODE_STATE_BUCKET, key)
        state = events.decode(entry.value) if entry else None
        if isinstance(state, NodeState) and state.generation >= generation:
            return state
        await asyncio.sleep(0.01)
    raise TimeoutError(f"generation {generation} never applied:\n{tail(log, 40)}")


def start_loader(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "apilane.node_loader"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def snapshot(generation: int) -> bytes:
    backend = f"198.18.0.{generation % 250 + 1}:6443"
    return seal(
        make_snapshot(
            cluster=CLUSTER, generation=generation, apiservers=("198.18.1.1:6443", backend)
        )
    )


async def measure(lab: BpfLab, workdir: Path) -> dict[str, float]:
    nats = NatsServer(store_dir=workdir / "nats")
    nats.identities.add_all(natsauth.identities_for(CLUSTER, [NODE]))
    nats.start()
    log = workdir / "loader.log"
    env = {
        **os.environ,
        **nats.env(Role.NODE_LOADER, CLUSTER, NODE),
        "APILANE_CLUSTER": CLUSTER,
        "APILANE_NODE_NAME": NODE,
        "APILANE_BACKEND_PROBE": "off",  # the backends are addresses nothing may reach
        "APILANE_MAP_BACKEND": "bpf",
        "APILANE_CONNECT_TIME_LB": "true",
        "APILANE_CGROUP_PATH": str(lab.child_cgroup()),
        "APILANE_BPF_PIN_DIR": str(lab.pin_dir()),
        "APILANE_STATE_DIR": str(workdir / "state"),
        "APILANE_HTTP_HOST": "127.0.0.1",
        "APILANE_HTTP_PORT": "0",
        "APILANE_NODE_STATE_INTERVAL": "30s",
        "APILANE_LOG_LEVEL": "WARNING",
        "OTEL_SDK_DISABLED": "true",
        **trusted_env(),
    }
    discovery = await nats.connect(Role.DISCOVERY, CLUSTER, name="bench-discovery")
    bus = await nats.connect(Role.OPERATOR, CLUSTER, name="bench")
    proc = None
    try:
        await discovery.create_streams()
        await put_sealed(discovery, snapshot(1), cluster=CLUSTER)
        began = time.perf_counter()
        proc = start_loader(env, log)
        state = await wait_generation(bus, proc, 1, log)
        cold = time.perf_counter() - began
        assert len(state.programs_attached) == 8, state
        after_start = status_mb(proc.pid)
        for generation in range(2, SNAPSHOTS + 2):
            await put_sealed(discovery, snapshot(generation), cluster=CLUSTER)
            await wait_generation(bus, proc, generation, log)
        after_snapshots = status_mb(proc.pid)
    finally:
        if proc is not None:
            end_process(proc)
        await discovery.drain()
        await bus.drain()
        nats.close()
    return {
        "cold_start_s": cold,
        "rss_start_mb": after_start["VmRSS"],
        "rss_steady_mb": after_snapshots["VmRSS"],
        "hwm_mb": after_snapshots["VmHWM"],
    }


def _met(value: float, target: float) -> str:
    return "met" if value <= target else "MISSED"


async def main() -> int:
    check_bpf_environment()
    with tempfile.TemporaryDirectory(prefix="apilane-bench-loader-") as tmp, BpfLab() as lab:
        figures = await measure(lab, Path(tmp))
    print(f"The real loader process on BPF, programs attached (load average {load_average()})\n")
    print("| measure | value | target | met? |")
    print("|---|---:|---|---|")
    cold, steady = figures["cold_start_s"], figures["rss_steady_mb"]
    print(
        f"| cold start: process start → generation 1 applied | {cold:.2f} s "
        f"| <= {TARGET_COLD_START_S} s | {_met(cold, TARGET_COLD_START_S)} |"
    )
    print(f"| VmRSS after the first apply | {figures['rss_start_mb']:.1f} MB | - | |")
    print(
        f"| VmRSS after {SNAPSHOTS} more snapshots | {steady:.1f} MB "
        f"| <= {TARGET_RSS_MB:.0f} MB | {_met(steady, TARGET_RSS_MB)} |"
    )
    print(f"| VmHWM (peak of the loader process) | {figures['hwm_mb']:.1f} MB | - | |")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
