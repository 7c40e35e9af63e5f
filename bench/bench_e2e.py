"""End-to-end programming latency: from the EndpointSlice write to each node's map write.

The services run as separate processes through their real entry points, against the
harness's real kube-apiserver and nats-server. Two runs, side by side in one invocation:

- 2 node-loaders (one on real BPF in a dedicated cgroup, one on in-memory maps);
- 50 node-loaders subscribed (one on real BPF, 49 on in-memory maps).

Each change replaces one address of the `kubernetes` EndpointSlice; the next change waits
until every node has programmed the previous one. A node's latency is its NodeState's
`applied_at` (written right after the map write) minus the time just before the API write.
Discovery's coalescing window (default 100 ms) is part of the figure, as in production: back
to back, each change waits for the end of the window its predecessor's publish opened.

Run: `.venv/bin/python bench/bench_e2e.py` (root: the BPF loader). CHANGES=50 NODES=50 and
COALESCE_WINDOW=100ms by default; COALESCE_WINDOW=0 shows the pipeline without the window;
GAP=0.2 waits that long before each change, so each is the leading edge of a quiet window.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from apilane.kube.client import KubeClient
from apilane.model import events, subjects
from apilane.model.signing import TrustedKeys, open_snapshot
from apilane.runtime import natsauth
from apilane.runtime.bus import Bus
from apilane.runtime.natsauth import Role
from apilane.testing.benchstats import load_average, percentile
from apilane.testing.bpf import BpfLab, check_bpf_environment
from apilane.testing.kube import (
    ControlPlane,
    delete_kubernetes_endpoint_slices,
    endpoint_slice,
)
from apilane.testing.nats import NatsServer
from apilane.testing.sealing import signing_environment
from apilane.testing.stack import ServiceProcesses, base_environment

CHANGES = int(os.environ.get("CHANGES", "50"))
MANY_NODES = int(os.environ.get("NODES", "50"))
# Discovery's coalescing window; the production default is 100ms.
WINDOW = os.environ.get("COALESCE_WINDOW", "100ms")
# Seconds of quiet before each change. 0: back to back, so each change lands inside the
# window its predecessor's publish opened; more than the window: each is a leading edge.
GAP = float(os.environ.get("GAP", "0"))
SLICES = "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices"
WAIT = 120.0


async def wait_nodes(
    bus: Bus, cluster: str, nodes: list[str], generation: int
) -> dict[str, events.NodeState]:
    deadline = time.monotonic() + WAIT
    states: dict[str, events.NodeState] = {}
    while time.monotonic() < deadline:
        for node in nodes:
            if node in states:
                continue
            entry = await bus.kv_get(
                subjects.NODE_STATE_BUCKET, subjects.node_state_key(cluster, node)
            )
            if entry is None:
                continue
            state = events.decode(entry.value)
            if isinstance(state, events.NodeState) and state.generation >= generation:
                states[node] = state
        if len(states) == len(nodes):
            return states
        await asyncio.sleep(0.02)
    missing = sorted(set(nodes) - set(states))
    raise TimeoutError(f"nodes never reached generation {generation}: {missing[:5]}…")


async def latest_generation(bus: Bus, cluster: str, trusted: TrustedKeys) -> int:
    entry = await bus.kv_get(subjects.SNAPSHOT_BUCKET, subjects.snapshot_key(cluster))
    return 0 if entry is None else open_snapshot(entry.value, trusted).snapshot.generation


async def run(
    node_count: int, *, plane: ControlPlane, lab: BpfLab, workdir: Path
) -> dict[str, float]:
    cluster = f"bench{node_count}"
    nodes = [f"node-{i:02d}" for i in range(node_count)]
    nats = NatsServer(store_dir=workdir / f"nats-{node_count}")
    # Every identity up front (one per node-loader): one configuration, no reload per node.
    nats.identities.add_all(natsauth.identities_for(cluster, nodes))
    nats.start()
    stack = ServiceProcesses(workdir)
    kube = await KubeClient.from_config(str(plane.kubeconfig_path))
    bus = await nats.connect(Role.OPERATOR, cluster, name="bench")  # reads every node state
    try:
        await delete_kubernetes_endpoint_slices(kube)
        service = await kube.get("/api/v1/namespaces/default/services/kubernetes")
        port = int(service["spec"]["ports"][0]["targetPort"])
        addresses = ["198.18.200.1", "198.18.200.2", "198.18.200.3"]
        await kube.create(SLICES, endpoint_slice("kubernetes", addresses=addresses, port=port))
        env = base_environment(
            cluster=cluster, nats_url=nats.url, kubeconfig=str(plane.kubeconfig_path)
        ) | signing_environment(workdir)
        trusted = TrustedKeys.parse(env["APILANE_TRUSTED_KEYS"])
        env |= {
            "APILANE_LOG_LEVEL": "WARNING",
            "APILANE_LEADER_ELECTION": "false",
            "APILANE_COALESCE_WINDOW": WINDOW,
        }
        discovery_env = env | nats.env(Role.DISCOVERY, cluster)
        stack.start(f"discovery-{cluster}", "apilane.discovery", discovery_env)
        for i, node in enumerate(nodes):
            state_dir = workdir / f"state-{cluster}-{node}"
            state_dir.mkdir()
            loader_env = env | nats.env(Role.NODE_LOADER, cluster, node)
            loader_env |= {
                "APILANE_NODE_NAME": node,
                # Backends here are addresses no probe may reach from this host: probing is off.
                "APILANE_BACKEND_PROBE": "off",
                "APILANE_STATE_DIR": str(state_dir),
                "APILANE_NODE_STATE_INTERVAL": "30s",
            }
            if i == 0:
                loader_env |= {
                    "APILANE_MAP_BACKEND": "bpf",
                    "APILANE_CGROUP_PATH": str(lab.child_cgroup()),
                    "APILANE_BPF_PIN_DIR": str(lab.pin_dir()),
                }
            else:
                loader_env |= {
                    "APILANE_MAP_BACKEND": "memory",
                    "APILANE_BPF_PIN_DIR": f"/apilane-memory/{cluster}/{node}",
                }
            stack.start(f"{cluster}-{node}", "apilane.node_loader", loader_env)

        # Settle: every node at the first generation.
        deadline = time.monotonic() + WAIT
        while (generation := await latest_generation(bus, cluster, trusted)) == 0:
            stack.check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(stack.logs_text())
            await asyncio.sleep(0.1)
        await wait_nodes(bus, cluster, nodes, generation)

        samples: list[float] = []
        bpf_samples: list[float] = []
        slice_path = f"{SLICES}/kubernetes"
        for change in range(CHANGES):
            addresses = [*addresses[1:], f"198.18.201.{change % 250 + 1}"]
            if GAP:
                await asyncio.sleep(GAP)
            current = await kube.get(slice_path)
            body = endpoint_slice("kubernetes", addresses=addresses, port=port)
            body["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
            written = time.time()
            await kube.replace(slice_path, body)
            generation += 1
            states = await wait_nodes(bus, cluster, nodes, generation)
            for node, state in states.items():
                assert state.applied_at is not None
                latency = state.applied_at.timestamp() - written
                samples.append(latency)
                if node == nodes[0]:
                    bpf_samples.append(latency)
        return {
            "nodes": node_count,
            "samples": len(samples),
            "p50_ms": statistics.median(samples) * 1000,
            "p99_ms": percentile(samples, 0.99) * 1000,
            "bpf_p50_ms": statistics.median(bpf_samples) * 1000,
            "bpf_p99_ms": percentile(bpf_samples, 0.99) * 1000,
        }
    finally:
        stack.stop()
        await bus.drain()
        await delete_kubernetes_endpoint_slices(kube)
        await kube.close()
        nats.close()


async def main() -> int:
    check_bpf_environment()
    with tempfile.TemporaryDirectory(prefix="apilane-bench-e2e-") as tmp, BpfLab() as lab:
        workdir = Path(tmp)
        with ControlPlane() as plane:
            rows = [
                await run(2, plane=plane, lab=lab, workdir=workdir),
                await run(MANY_NODES, plane=plane, lab=lab, workdir=workdir),
            ]
    print(f"End-to-end programming latency, EndpointSlice write → map write, {CHANGES} changes")
    print(
        f"(load average {load_average()}; discovery's {WINDOW} coalescing window;"
        f" {GAP:g} s of quiet before each change)\n"
    )
    print("| node-loaders | samples | p50 ms | p99 ms | BPF node p50 ms | BPF node p99 ms |")
    print("|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['nodes']} | {row['samples']} | {row['p50_ms']:.1f} | {row['p99_ms']:.1f} "
            f"| {row['bpf_p50_ms']:.1f} | {row['bpf_p99_ms']:.1f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
