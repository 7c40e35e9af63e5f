"""Apply latency of one snapshot change, loader cold start and resident memory.

- apply: the reconciler's whole path for one change (validate, plan against the cached
  view of the maps, write, persist the state file), alternating between two
  snapshots that differ in one backend, for 1..16 API server endpoints. On MemoryNatMaps
  always; on the kernel maps (BccNatMaps) when run as root with bcc. The "signed" rows
  add what the loader does first with every KV value: verify the Ed25519 envelope, decode
  the verified payload and judge it against the held generation (admission.py).
- cold start (kernel only): a fresh process compiles the programs, attaches them to a
  test cgroup, and does its first reconcile; plus the resident memory of that process.

Targets: apply p99 <= 2 ms for up to 16 endpoints; cold start <= 3 s; RSS <= 150 MB.
Kernel runs use a dedicated child cgroup and pin dir (never the root cgroup), removed after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from apilane.model.signing import TrustedKeys, utcnow
from apilane.node_loader.admission import Admitted, admit
from apilane.node_loader.memmaps import MemoryNatMaps
from apilane.node_loader.nat import NatMaps
from apilane.node_loader.reconcile import Outcome, Reconciler
from apilane.node_loader.statefile import StateFile
from apilane.testing.benchstats import load_average, percentile, resident_kib
from apilane.testing.sealing import TEST_KEY, seal
from apilane.testing.snapshots import make_snapshot

SIZES = (1, 3, 8, 16)
ITERATIONS = 2000
WARMUP = 50
TARGET_APPLY_P99_MS = 2.0
TARGET_COLD_START_S = 3.0
TARGET_RSS_MB = 150.0
STATE_DIR_BASE = "/dev/shm" if Path("/dev/shm").is_dir() else None  # tmpfs, like /run


def apply_latencies(
    maps: NatMaps,
    endpoints: int,
    *,
    iterations: int = ITERATIONS,
    verify: bool = False,
    signed: bool = False,
) -> list[float]:
    """Seconds per apply; each apply replaces one backend (a real change, real writes).
    `signed`: each change arrives sealed and is admitted before it is applied."""
    base = [f"10.0.{i // 250}.{i % 250 + 1}:6443" for i in range(endpoints - 1)]
    variants = [(*base, "10.9.0.1:6443"), (*base, "10.9.0.2:6443")]
    with tempfile.TemporaryDirectory(dir=STATE_DIR_BASE) as state_dir:
        reconciler = Reconciler(
            maps=maps,
            cluster="default",
            state_file=StateFile(Path(state_dir) / "state.json"),
            verify_after_apply=verify,
        )
        samples = []
        trusted = TrustedKeys.of(TEST_KEY)
        for generation in range(1, iterations + WARMUP + 1):
            snapshot = make_snapshot(
                generation=generation,
                services=("10.96.0.1:443", "[fd00:96::1]:443")[:1],
                apiservers=variants[generation % 2],
            )
            data = seal(snapshot) if signed else b""
            began = time.perf_counter()
            if signed:
                admitted = admit(data, trusted, reconciler.accepted, now=utcnow())
                if not isinstance(admitted, Admitted):
                    raise RuntimeError(f"admit {generation}: {admitted.reason}")
                result = reconciler.apply(admitted.signed.snapshot, seal=admitted.seal)
            else:
                result = reconciler.apply(snapshot)
            elapsed = time.perf_counter() - began
            if result.outcome is not Outcome.APPLIED:
                raise RuntimeError(f"apply {generation}: {result.outcome} {result.reason}")
            if generation > WARMUP:
                samples.append(elapsed)
    return samples


def row(backend: str, endpoints: int, samples: list[float]) -> str:
    p50, p99 = statistics.median(samples) * 1000, percentile(samples, 0.99) * 1000
    verdict = "met" if p99 <= TARGET_APPLY_P99_MS else "MISSED"
    return (
        f"| {backend} | {endpoints} | {len(samples)} | {p50:.3f} | {p99:.3f} "
        f"| <= {TARGET_APPLY_P99_MS} | {verdict} |"
    )


def _met(value: float, target: float) -> str:
    return "met" if value <= target else "MISSED"


def kernel_available() -> str:
    """Empty when the kernel benchmarks can run, else why not."""
    if os.geteuid() != 0:
        return "needs root"
    try:
        import bcc  # noqa: F401
    except ImportError:
        return "bcc is not importable (tools/setup-bpf.sh)"
    return ""


def cold_start_child(args: argparse.Namespace) -> None:
    """Runs in a fresh process: compile, attach, first reconcile; prints JSON."""
    began = time.perf_counter()
    from apilane.node_loader.programs import ConnectTimeLB

    imported = time.perf_counter()
    lb = ConnectTimeLB(cgroup_path=Path(args.cgroup), pin_dir=Path(args.pin_dir))
    compiled = time.perf_counter()
    reconciler = Reconciler(
        maps=lb.nat_maps, cluster="default", state_file=StateFile(Path(args.state_dir) / "s.json")
    )
    reconciler.recover()
    lb.enable()
    attached = time.perf_counter()
    result = reconciler.apply(
        make_snapshot(generation=1, apiservers=("10.0.0.1:6443", "10.0.0.2:6443", "10.0.0.3:6443"))
    )
    done = time.perf_counter()
    rss_kib, peak_kib = resident_kib()
    rss = {"VmRSS": rss_kib, "VmHWM": peak_kib}
    lb.disable()
    lb.close()
    print(
        json.dumps(
            {
                "import": imported - began,
                "compile_load": compiled - imported,
                "recover_attach": attached - compiled,
                "first_apply": done - attached,
                "total_in_process": done - began,
                "outcome": str(result.outcome),
                "rss_mb": rss["VmRSS"] / 1024,
                "hwm_mb": rss["VmHWM"] / 1024,
            }
        )
    )


def kernel_benchmarks(lines: list[str]) -> list[str]:
    from apilane.node_loader.programs import ConnectTimeLB
    from apilane.testing.bpf import BpfLab

    extra: list[str] = []
    with BpfLab() as lab:
        cgroup, pin_dir = lab.child_cgroup(), lab.pin_dir()
        with ConnectTimeLB(cgroup_path=cgroup, pin_dir=pin_dir) as lb:
            for signed in (False, True):
                for endpoints in SIZES:
                    samples = apply_latencies(lb.nat_maps, endpoints, signed=signed)
                    name = "kernel (bcc), signed" if signed else "kernel (bcc)"
                    lines.append(row(name, endpoints, samples))
                    lb.nat_maps.clear()
        cold_pin = lab.pin_dir()
        with tempfile.TemporaryDirectory(dir=STATE_DIR_BASE) as state_dir:
            began = time.perf_counter()
            child = subprocess.run(
                [sys.executable, __file__, "--cold-start-child", "--cgroup", str(cgroup),
                 "--pin-dir", str(cold_pin), "--state-dir", state_dir],
                capture_output=True, text=True, check=False, timeout=120,
            )  # fmt: skip
            wall = time.perf_counter() - began
        if child.returncode != 0:
            return [f"cold start failed: {child.stderr.strip()[-2000:]}"]
        figures: dict[str, Any] = json.loads(child.stdout.strip().splitlines()[-1])
        total, rss = figures["total_in_process"], figures["rss_mb"]
        extra += [
            "",
            "| loader cold start (fresh process) | seconds | target | met? |",
            "|---|---:|---|---|",
            f"| python imports (loader) | {figures['import']:.3f} | - | |",
            f"| compile + load (bcc/clang) | {figures['compile_load']:.3f} | - | |",
            f"| recover maps + attach 8 programs | {figures['recover_attach']:.3f} | - | |",
            f"| first reconcile | {figures['first_apply']:.4f} | - | |",
            f"| in-process total | {total:.3f} | <= {TARGET_COLD_START_S} "
            f"| {_met(total, TARGET_COLD_START_S)} |",
            f"| wall clock incl. interpreter start | {wall:.3f} | - | |",
            "",
            "| loader resident memory (same process) | MB | target | met? |",
            "|---|---:|---|---|",
            f"| VmRSS after first reconcile | {rss:.1f} | <= {TARGET_RSS_MB:.0f} "
            f"| {_met(rss, TARGET_RSS_MB)} |",
            f"| VmHWM (peak, during compile) | {figures['hwm_mb']:.1f} | - | |",
        ]
    return extra


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cold-start-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cgroup")
    parser.add_argument("--pin-dir")
    parser.add_argument("--state-dir")
    parser.add_argument("--iterations", type=int, default=ITERATIONS)
    args = parser.parse_args()
    if args.cold_start_child:
        cold_start_child(args)
        return 0

    lines = [
        f"load average before: {load_average()}",
        "",
        "| maps | API server endpoints | applies | p50 (median) ms | p99 ms | target p99 ms "
        "| met? |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    for signed in (False, True):
        for endpoints in SIZES:
            samples = apply_latencies(
                MemoryNatMaps(), endpoints, iterations=args.iterations, signed=signed
            )
            lines.append(row("memory, signed" if signed else "memory", endpoints, samples))
    unavailable = kernel_available()
    extra: list[str] = []
    if unavailable:
        lines.append(f"| kernel (bcc) | - | - | - | - | - | not run: {unavailable} |")
    else:
        extra = kernel_benchmarks(lines)
    print("\n".join(lines + extra))
    print(
        "\napply = validate + plan + write + state file (fsync, tmpfs), against the cached view"
        " of the maps (the periodic audit reads them back, not every apply);"
        " one backend replaced per apply (fresh service id, make-before-break)."
        f"\nload average after: {load_average()}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
