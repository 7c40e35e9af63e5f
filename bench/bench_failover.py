"""Failover through the service VIP: from the SIGKILL of one real kube-apiserver to the last
failed request, with the node-loader's backend probes and without, side by side.

The harness's HA plane (three kube-apiservers in network namespaces of their own, registered
by the lease endpoint reconciler), discovery and two node-loaders on real BPF, as processes:
one probes the apiservers (GET /readyz over TLS every 300 ms, 3 failures in a row: the
defaults) from a namespace on the plane's bridge, the other does not probe (its maps follow
the snapshot, which loses a killed apiserver only when its lease expires). Each loader has a
child cgroup of its own with a client in it (`apilane demo`, a request every 50 ms, from a
namespace of the plane without a default route).

Each run SIGKILLs one apiserver (never the one discovery talks to), waits until the probe-less
node's maps lost it, lets both clients run 2 s more, then starts a new apiserver for the next
run. Figures per node: kill → the last failed request's start, kill → the killed backend out
of the node's maps, and the failed requests (count, and fraction of those sent from the kill
to the end of the run: the same period for both nodes).

Run: `.venv/bin/python bench/bench_failover.py` (root). RUNS=3 by default.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from apilane.model import subjects
from apilane.model.signing import TrustedKeys, open_snapshot
from apilane.runtime import natsauth
from apilane.runtime.bus import Bus
from apilane.runtime.natsauth import Role
from apilane.testing.benchstats import load_average
from apilane.testing.bpf import BpfLab, check_bpf_environment
from apilane.testing.failover import (
    REQUEST_INTERVAL,
    FailureWindow,
    VipClient,
    failure_window,
    median_and_spread,
    probe_environment,
    programmed_apiservers,
)
from apilane.testing.ha import ClientNamespace, HAControlPlane
from apilane.testing.nats import NatsServer
from apilane.testing.sealing import signing_environment
from apilane.testing.stack import ServiceProcesses, base_environment

RUNS = int(os.environ.get("RUNS", "3"))
CLUSTER = "failover"
# A killed apiserver's lease has up to 15 s left, another apiserver's reconcile loop runs every
# 10 s: a bound with a margin for a loaded machine, not a target.
REMOVAL_BOUND = 60.0
SETTLE = 60.0
AFTER_RECOVERY = 2.0
CLIENT_DURATION = 120.0


@dataclass
class Node:
    """One node-loader and its client."""

    name: str
    label: str
    probe: str
    pins: Path
    cgroup: Path
    client: ClientNamespace
    windows: list[FailureWindow] = field(default_factory=list)
    removals: list[float] = field(default_factory=list)  # kill → out of the maps, s


async def wait_for(check: Callable[[], object], what: str, stack: ServiceProcesses) -> None:
    deadline = time.monotonic() + SETTLE
    while time.monotonic() < deadline:
        stack.check_alive()
        if check():
            return
        await asyncio.sleep(0.05)
    raise TimeoutError(f"{what}\n{stack.logs_text()}")


class Bench:
    def __init__(self, plane: HAControlPlane, bus: Bus, trusted: TrustedKeys) -> None:
        self.plane = plane
        self.bus = bus
        self.trusted = trusted
        self.snapshot: set[str] = set()

    async def refresh_snapshot(self) -> set[str]:
        entry = await self.bus.kv_get(subjects.SNAPSHOT_BUCKET, subjects.snapshot_key(CLUSTER))
        self.snapshot = (
            set()
            if entry is None
            else {
                e.ip for e in open_snapshot(entry.value, self.trusted).snapshot.apiserver_endpoints
            }
        )
        return self.snapshot

    async def settle(self, nodes: list[Node], stack: ServiceProcesses) -> None:
        """Until the snapshot and every node's maps hold exactly the running apiservers."""
        running = set(self.plane.running_addresses)
        deadline = time.monotonic() + SETTLE
        while await self.refresh_snapshot() != running:
            stack.check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"snapshot {self.snapshot} != {running}")
            await asyncio.sleep(0.1)
        for node in nodes:
            await wait_for(
                lambda n=node: programmed_apiservers(n.pins) == running,  # type: ignore[misc]
                f"{node.name}'s maps never held {running}",
                stack,
            )

    async def run_once(self, nodes: list[Node], stack: ServiceProcesses) -> None:
        await self.settle(nodes, stack)
        names = {self.plane.apiserver_name(i) for i in self.running_indices()}
        clients = [
            VipClient(node.client, node.cgroup, self.plane.ca_path, duration=CLIENT_DURATION)
            for node in nodes
        ]
        try:
            for client in clients:
                await wait_for(
                    lambda c=client: {a.server for a in c.seen() if a.ok} == names,  # type: ignore[misc]
                    "a client never reached every apiserver through the VIP",
                    stack,
                )
            await asyncio.sleep(1.0)
            victim = self.running_indices()[-1]  # never 0: discovery's apiserver
            address = self.plane.addresses[victim]
            killed_at = time.time()
            self.plane.kill_apiserver(victim)
            left: dict[str, float] = {}
            deadline = time.monotonic() + REMOVAL_BOUND
            while len(left) < len(nodes) and time.monotonic() < deadline:
                stack.check_alive()
                for node in nodes:
                    programmed = programmed_apiservers(node.pins)
                    if node.name not in left and programmed and address not in programmed:
                        left[node.name] = time.time() - killed_at
                await asyncio.sleep(0.05)
            if len(left) < len(nodes):
                raise TimeoutError(f"{address} still programmed after {REMOVAL_BOUND}s")
            await asyncio.sleep(AFTER_RECOVERY)
        finally:
            for client in clients:
                client.stop()
        for node, client in zip(nodes, clients, strict=True):
            node.windows.append(failure_window(client.seen(), killed_at))
            node.removals.append(left[node.name])
        self.plane.add_apiserver()  # three again for the next run

    def running_indices(self) -> list[int]:
        return [i for i, a in enumerate(self.plane.apiservers) if a.running]


def start_services(
    plane: HAControlPlane, nats: NatsServer, lab: BpfLab, workdir: Path, stack: ServiceProcesses
) -> tuple[list[Node], TrustedKeys]:
    env = base_environment(
        cluster=CLUSTER, nats_url=nats.url, kubeconfig=str(plane.kubeconfig_paths[0])
    ) | signing_environment(workdir)
    env |= {"APILANE_LOG_LEVEL": "WARNING"}
    stack.start(
        "discovery",
        "apilane.discovery",
        env
        | nats.env(Role.DISCOVERY, CLUSTER)
        | {
            "APILANE_POD_NAME": "discovery-0",
            "APILANE_LEASE_NAMESPACE": "default",
            "APILANE_COALESCE_WINDOW": "20ms",
        },
    )
    probe_namespace = plane.client_namespace()
    nodes = [
        Node(name, label, probe, lab.pin_dir(), lab.child_cgroup(), plane.client_namespace())
        for name, label, probe in (
            ("node-probed", "https /readyz, 300 ms x 3", "https"),
            ("node-static", "off (lease-bound)", "off"),
        )
    ]
    for node in nodes:
        state_dir = workdir / f"state-{node.name}"
        state_dir.mkdir()
        stack.start(
            node.name,
            "apilane.node_loader",
            env
            | nats.env(Role.NODE_LOADER, CLUSTER, node.name)
            | {
                "APILANE_NODE_NAME": node.name,
                "APILANE_MAP_BACKEND": "bpf",
                "APILANE_CGROUP_PATH": str(node.cgroup),
                "APILANE_BPF_PIN_DIR": str(node.pins),
                "APILANE_STATE_DIR": str(state_dir),
            }
            | probe_environment(plane.ca_path, probe_namespace, kind=node.probe),
        )
    return nodes, TrustedKeys.parse(env["APILANE_TRUSTED_KEYS"])


def spread(values: list[float], unit: str = "", digits: int = 2) -> str:
    median, low, high = median_and_spread(values)
    return f"{median:.{digits}f}{unit} ({low:.{digits}f}-{high:.{digits}f})"


def print_table(nodes: list[Node]) -> None:
    print(f"Failover through the VIP, SIGKILL of one of three kube-apiservers, {RUNS} runs")
    print(
        f"(load average {load_average()}; a request every {REQUEST_INTERVAL * 1000:.0f} ms;"
        " median (min-max) over the runs)\n"
    )
    print(
        "| backend probes | kill → last failed request s | kill → out of the maps s "
        "| failed requests | failed fraction |"
    )
    print("|---|---:|---:|---:|---:|")
    for node in nodes:
        print(
            f"| {node.label} | {spread([w.window for w in node.windows])} "
            f"| {spread(node.removals)} "
            f"| {spread([float(w.failed) for w in node.windows], digits=0)} "
            f"| {spread([w.failed_fraction * 100 for w in node.windows], '%', 1)} |"
        )


async def main() -> int:
    check_bpf_environment()
    with (
        tempfile.TemporaryDirectory(prefix="apilane-bench-failover-") as tmp,
        BpfLab() as lab,
        HAControlPlane(3) as plane,
    ):
        workdir = Path(tmp)
        nats = NatsServer(store_dir=workdir / "nats")
        nats.identities.add_all(natsauth.identities_for(CLUSTER, ["node-probed", "node-static"]))
        nats.start()
        stack = ServiceProcesses(workdir)
        bus: Bus | None = None
        try:
            nodes, trusted = start_services(plane, nats, lab, workdir, stack)
            bus = await nats.connect(Role.OPERATOR, CLUSTER, name="bench-failover")
            bench = Bench(plane, bus, trusted)
            for _ in range(RUNS):
                await bench.run_once(nodes, stack)
        finally:
            stack.stop()
            if bus is not None:
                await bus.drain()
            nats.close()
    print_table(nodes)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
