"""Benchmark: writing K NAT entries into the pinned kernel maps, with and without batch ops.

Each run programs K entries into empty maps (K/100 frontends with 100 backends each, backends
first as the reconciler does), reads them back, then deletes them; repeated --runs times.
Reported per phase: median and p99 duration and the entries/s at the median.
Target: batch reconcile >= 500k entries/s.

    sudo .venv/bin/python bench/bench_maps.py [--sizes 1000 10000 100000] [--runs 5] [--json]

Needs root, bcc and bpffs (tools/setup-bpf.sh). Uses a throwaway pin directory and cgroup;
nothing is attached.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from apilane.node_loader.bpfmaps import BccNatMaps
from apilane.node_loader.nat import BackendKey, BackendValue, FrontendKey, FrontendValue
from apilane.node_loader.programs import ConnectTimeLB
from apilane.testing.benchstats import load_average, percentile
from apilane.testing.bpf import BpfLab, check_bpf_environment

BACKENDS_PER_SERVICE = 100
TARGET_ENTRIES_PER_S = 500_000


def _entries(
    total: int,
) -> tuple[dict[FrontendKey, FrontendValue], dict[BackendKey, BackendValue]]:
    services = max(1, total // (BACKENDS_PER_SERVICE + 1))
    frontends: dict[FrontendKey, FrontendValue] = {}
    backends: dict[BackendKey, BackendValue] = {}
    for service in range(services):
        service_id = service + 1
        vip = f"10.{96 + service // 65536}.{service // 256 % 256}.{service % 256}"
        frontends[FrontendKey(vip, 443)] = FrontendValue(service_id, BACKENDS_PER_SERVICE)
        for ordinal in range(BACKENDS_PER_SERVICE):
            n = service * BACKENDS_PER_SERVICE + ordinal
            backends[BackendKey(service_id, ordinal)] = BackendValue(
                f"172.{16 + n // 65536 % 16}.{n // 256 % 256}.{n % 256}", 6443
            )
    return frontends, backends


def run(sizes: list[int], runs: int) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    with BpfLab(cgroup_root=check_bpf_environment()) as lab:
        lb = ConnectTimeLB(cgroup_path=lab.child_cgroup(), pin_dir=lab.pin_dir())
        try:
            for size in sizes:
                frontends, backends = _entries(size)
                count = len(frontends) + len(backends)
                for mode, use_batch in (("batch", None), ("per-element", False)):
                    maps = BccNatMaps(lb._bpf, use_batch=use_batch)
                    maps.clear()
                    phases: dict[str, list[float]] = {"update": [], "dump": [], "delete": []}
                    for _ in range(runs):
                        started = time.perf_counter()
                        maps.update_backends("IPv4", backends)
                        maps.update_frontends("IPv4", frontends)
                        phases["update"].append(time.perf_counter() - started)
                        started = time.perf_counter()
                        maps.dump("IPv4")
                        phases["dump"].append(time.perf_counter() - started)
                        started = time.perf_counter()
                        maps.delete_frontends("IPv4", frontends)
                        maps.delete_backends("IPv4", backends)
                        phases["delete"].append(time.perf_counter() - started)
                    for phase, durations in phases.items():
                        median = statistics.median(durations)
                        rows.append(
                            {
                                "entries": count,
                                "mode": mode,
                                "phase": phase,
                                "median_ms": median * 1000,
                                "p99_ms": percentile(durations, 0.99) * 1000,
                                "entries_per_s": count / median if median else 0.0,
                                "batch_used": maps.batch_supported is not False
                                and use_batch is not False,
                            }
                        )
        finally:
            lb.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000, 100_000])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    args = parser.parse_args()
    if max(args.sizes) > 200_000:
        parser.error("sizes above 200000 do not fit the backend map (262144 entries)")
    load_before = load_average()
    rows = run(args.sizes, max(1, min(args.runs, 50)))
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    target = f">= {TARGET_ENTRIES_PER_S:,}/s"
    print(f"load average before: {load_before}")
    print()
    print("| entries | mode | phase | median ms | p99 ms | entries/s (median) | target | met? |")
    print("|---:|---|---|---:|---:|---:|---|---|")
    for row in rows:
        graded = row["mode"] == "batch" and row["phase"] == "update"
        rate = float(row["entries_per_s"])  # type: ignore[arg-type]
        verdict = ("met" if rate >= TARGET_ENTRIES_PER_S else "MISSED") if graded else ""
        print(
            f"| {row['entries']} | {row['mode']} | {row['phase']} | {row['median_ms']:.2f} | "
            f"{row['p99_ms']:.2f} | {rate:,.0f} | {target if graded else '-'} | {verdict} |"
        )
    print()
    print(
        f"target: batch reconcile >= {TARGET_ENTRIES_PER_S:,} entries/s, graded on the"
        " batch update phase (encode + write of backends, then frontends, into empty maps)."
        f" p99 over {args.runs} runs per size. load average after: {load_average()}"
    )


if __name__ == "__main__":
    main()
