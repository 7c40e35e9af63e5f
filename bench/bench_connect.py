"""Benchmark: connect() latency through the service address versus directly to the backend.

Measured side by side in one run, inside test namespaces (no default route): a client in the
load balancer's cgroup alternates connects to the VIP (translated) and to the backend (the
programs run and miss), and a client in a second cgroup without programs connects directly
(baseline). Rounds alternate between the two clients. Bounded: --count connects per target.
Target: VIP / direct <= 1.10.

    sudo .venv/bin/python bench/bench_connect.py [--count 6000] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics

from apilane.node_loader.nat import BackendKey, BackendValue, FrontendKey, FrontendValue
from apilane.node_loader.programs import ConnectTimeLB
from apilane.testing.benchstats import load_average, percentile
from apilane.testing.bpf import SERVICE_VIP4, BpfLab, check_bpf_environment

BACKEND_PORT = 8080
SERVICE_PORT = 443
ROUNDS = 10
TARGET_RATIO = 1.10


def run(count: int) -> list[dict[str, object]]:
    per_round = max(1, count // ROUNDS)
    samples: dict[str, list[int]] = {"VIP (translated)": [], "direct, programs attached": [],
                                      "direct, no programs": []}  # fmt: skip
    with BpfLab(cgroup_root=check_bpf_environment()) as lab:
        topology = lab.topology(backends=1)
        backend = topology.backends[0]
        lab.server(netns=backend.netns, addresses=[backend.ipv4], ports=[BACKEND_PORT])
        lb_cgroup, plain_cgroup = lab.child_cgroup(), lab.child_cgroup()
        lb = ConnectTimeLB(cgroup_path=lb_cgroup, pin_dir=lab.pin_dir())
        try:
            lb.nat_maps.update_backends(
                "IPv4", {BackendKey(1, 0): BackendValue(backend.ipv4, BACKEND_PORT)}
            )
            lb.nat_maps.update_frontends(
                "IPv4", {FrontendKey(SERVICE_VIP4, SERVICE_PORT): FrontendValue(1, 1)}
            )
            lb.enable()
            translated = lab.agent(netns=topology.client, cgroup=lb_cgroup)
            plain = lab.agent(netns=topology.client, cgroup=plain_cgroup)
            direct = (backend.ipv4, BACKEND_PORT)
            for client in (translated, plain):  # warm up caches, neighbour entries, code paths
                client.connect_latency([direct], count=50)
            for _ in range(ROUNDS):
                vip_ns, attached_ns = translated.connect_latency(
                    [(SERVICE_VIP4, SERVICE_PORT), direct], count=per_round
                )
                [plain_ns] = plain.connect_latency([direct], count=per_round)
                samples["VIP (translated)"] += vip_ns
                samples["direct, programs attached"] += attached_ns
                samples["direct, no programs"] += plain_ns
            lb.disable()
        finally:
            lb.close()
    baseline = statistics.median(samples["direct, no programs"])
    return [
        {
            "path": path,
            "connects": len(values),
            "median_us": statistics.median(values) / 1000,
            "p99_us": percentile(values, 0.99) / 1000,
            "ratio_to_direct": statistics.median(values) / baseline,
        }
        for path, values in samples.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=6000, help="connects per path (<= 20000)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    load_before = load_average()
    rows = run(max(ROUNDS, min(args.count, 20_000)))
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"load average before: {load_before}")
    print()
    print("| path | connects | median us | p99 us | median / direct | target | met? |")
    print("|---|---:|---:|---:|---:|---|---|")
    for row in rows:
        graded = row["path"] == "VIP (translated)"
        ratio = float(row["ratio_to_direct"])  # type: ignore[arg-type]
        verdict = ("met" if ratio <= TARGET_RATIO else "MISSED") if graded else ""
        print(
            f"| {row['path']} | {row['connects']} | {row['median_us']:.1f} | "
            f"{row['p99_us']:.1f} | {ratio:.3f} | {f'<= {TARGET_RATIO}' if graded else '-'} | "
            f"{verdict} |"
        )
    print()
    print(
        f"target: connect() through the VIP / directly to the backend (medians, "
        f"measured in one run) <= {TARGET_RATIO}. load average after: {load_average()}"
    )


if __name__ == "__main__":
    main()
