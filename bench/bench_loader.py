"""The real node-loader process on BPF: cold start and resident memory.

`python -m apilane.node_loader` with the bpf map backend and the connect-time programs on
(attached to a dedicated child cgroup), fed by a real nats-server:
- cold start: process start -> its node state reports the latest generation applied (maps
  programmed, 8 programs attached) on fresh pins (nothing compiled yet); the snapshot is in
  the KV bucket before the process starts;
- restart: the same on the pins and links the cold start left (a newer snapshot waiting);
- RUNS (5) of each, side by side (cold, restart, cold, ...), median (min-max); the compile
  child's time and the loader's wait for it are read from the loader's log;
- VmRSS (and VmHWM, the peak) of that process from /proc/<pid>/status: right after the first
  apply, and after SNAPSHOTS more snapshots, each waited for (first run).

BEFORE_PYTHON=/path/to/other/.venv/bin/python compares with another checkout's loader (the
one that interpreter imports), run for run: this loader's cold start and restart, then the
other's, RUNS times, so both see the same load.

Targets: cold start <= 3 s; steady VmRSS <= 64 MB.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

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
RUNS = int(os.environ.get("RUNS", "5"))
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


def start_loader(env: dict[str, str], log: Path, python: str) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [python, "-m", "apilane.node_loader"],
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


def loader_env(nats: NatsServer, *, cgroup: Path, pin_dir: Path, state_dir: Path) -> dict[str, str]:
    return {
        **os.environ,
        **nats.env(Role.NODE_LOADER, CLUSTER, NODE),
        "APILANE_CLUSTER": CLUSTER,
        "APILANE_NODE_NAME": NODE,
        "APILANE_BACKEND_PROBE": "off",  # the backends are addresses nothing may reach
        "APILANE_MAP_BACKEND": "bpf",
        "APILANE_CONNECT_TIME_LB": "true",
        "APILANE_CGROUP_PATH": str(cgroup),
        "APILANE_BPF_PIN_DIR": str(pin_dir),
        "APILANE_STATE_DIR": str(state_dir),
        "APILANE_HTTP_HOST": "127.0.0.1",
        "APILANE_HTTP_PORT": "0",
        "APILANE_NODE_STATE_INTERVAL": "30s",
        "APILANE_LOG_LEVEL": "INFO",  # the compile child's timing line
        "OTEL_SDK_DISABLED": "true",
        **trusted_env(),
    }


class Runs:
    """One nats-server, the discovery and operator connections, and a generation counter."""

    def __init__(self, nats: NatsServer, discovery: Bus, bus: Bus) -> None:
        self.nats, self.discovery, self.bus = nats, discovery, bus
        self.generation = 0

    async def start(
        self, env: dict[str, str], log: Path, python: str
    ) -> tuple[float, subprocess.Popen[bytes]]:
        """Put a newer snapshot, start the loader: seconds until it applied that snapshot."""
        self.generation += 1
        await put_sealed(self.discovery, snapshot(self.generation), cluster=CLUSTER)
        began = time.perf_counter()
        proc = start_loader(env, log, python)
        try:
            state = await wait_generation(self.bus, proc, self.generation, log)
        except BaseException:
            end_process(proc)
            raise
        assert len(state.programs_attached) == 8, state
        return time.perf_counter() - began, proc

    async def memory(self, proc: subprocess.Popen[bytes], log: Path) -> dict[str, float]:
        after_start = status_mb(proc.pid)
        for _ in range(SNAPSHOTS):
            self.generation += 1
            await put_sealed(self.discovery, snapshot(self.generation), cluster=CLUSTER)
            await wait_generation(self.bus, proc, self.generation, log)
        after_snapshots = status_mb(proc.pid)
        return {
            "rss_start_mb": after_start["VmRSS"],
            "rss_steady_mb": after_snapshots["VmRSS"],
            "hwm_mb": after_snapshots["VmHWM"],
        }


def interpreters() -> dict[str, str]:
    """The loaders compared: this interpreter's ("this"), and BEFORE_PYTHON's ("before")."""
    chosen = {"this": sys.executable}
    if os.environ.get("BEFORE_PYTHON"):
        chosen["before"] = os.environ["BEFORE_PYTHON"]
    return chosen


async def measure(lab: BpfLab, workdir: Path) -> dict[str, dict[str, Any]]:
    """RUNS times, side by side: for each loader, a cold start on fresh pins, then a restart
    on those pins."""
    nats = NatsServer(store_dir=workdir / "nats")
    nats.identities.add_all(natsauth.identities_for(CLUSTER, [NODE]))
    nats.start()
    discovery = await nats.connect(Role.DISCOVERY, CLUSTER, name="bench-discovery")
    bus = await nats.connect(Role.OPERATOR, CLUSTER, name="bench")
    runs = Runs(nats, discovery, bus)
    chosen = interpreters()
    figures: dict[str, dict[str, Any]] = {
        label: {"cold": [], "restart": [], "logs": []} for label in chosen
    }
    try:
        await discovery.create_streams()
        for run in range(RUNS):
            for label, python in chosen.items():
                mine = figures[label]
                env = loader_env(
                    nats,
                    cgroup=lab.child_cgroup(),
                    pin_dir=lab.pin_dir(),
                    state_dir=workdir / f"{label}-{run}",
                )
                log = workdir / f"{label}-{run}.log"
                cold, proc = await runs.start(env, log, python)
                try:
                    if run == 0:
                        mine.update(await runs.memory(proc, log))
                finally:
                    end_process(proc)
                restart, proc = await runs.start(env, log, python)
                end_process(proc)
                mine["cold"].append(cold)
                mine["restart"].append(restart)
                mine["logs"].append(log)
    finally:
        await discovery.drain()
        await bus.drain()
        nats.close()
    return figures


def compile_timings(logs: list[Path]) -> tuple[list[float], list[float]]:
    """The compile child's wall time and the loader's wait for it, from the cold starts' logs
    (loaders that log them)."""
    child, waited = [], []
    for log in logs:
        for line in log.read_text().splitlines():
            if '"compile child done"' in line:
                record = json.loads(line)
                child.append(record["child_s"])
                waited.append(record["waited_s"])
                break
    return child, waited


def _met(value: float, target: float) -> str:
    return "met" if value <= target else "MISSED"


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} s ({min(values):.2f}-{max(values):.2f})"


def report(label: str, figures: dict[str, Any]) -> None:
    child, waited = compile_timings(figures["logs"])
    print(f"\n{label}:\n")
    print("| measure | value | target | met? |")
    print("|---|---:|---|---|")
    cold, restart = statistics.median(figures["cold"]), statistics.median(figures["restart"])
    print(
        f"| cold start (no pins): process start → snapshot applied | {_spread(figures['cold'])} "
        f"| <= {TARGET_COLD_START_S} s | {_met(cold, TARGET_COLD_START_S)} |"
    )
    print(
        f"| restart (pins and links present) → newer snapshot applied "
        f"| {_spread(figures['restart'])} | <= {TARGET_COLD_START_S} s "
        f"| {_met(restart, TARGET_COLD_START_S)} |"
    )
    if child:
        print(f"| cold start: compile child's wall time | {_spread(child)} | - | |")
        print(f"| cold start: the loader's wait for it | {_spread(waited)} | - | |")
    steady = figures["rss_steady_mb"]
    print(f"| VmRSS after the first apply | {figures['rss_start_mb']:.1f} MB | - | |")
    print(
        f"| VmRSS after {SNAPSHOTS} more snapshots | {steady:.1f} MB "
        f"| <= {TARGET_RSS_MB:.0f} MB | {_met(steady, TARGET_RSS_MB)} |"
    )
    print(f"| VmHWM (peak of the loader process) | {figures['hwm_mb']:.1f} MB | - | |")


async def main() -> int:
    check_bpf_environment()
    before = load_average()
    with tempfile.TemporaryDirectory(prefix="apilane-bench-loader-") as tmp, BpfLab() as lab:
        figures = await measure(lab, Path(tmp))
        print(
            f"The real loader process on BPF, programs attached; {RUNS} runs, median (min-max);"
            f" load average before {before}, after {load_average()}"
        )
        for label, python in interpreters().items():
            report(f"{label} ({python})", figures[label])
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
