"""One change, end to end: the three services as separate processes through their real entry
points, the harness's real kube-apiserver and nats-server, two node-loaders on real BPF (each in
its own cgroup, with a test namespace as its client), and an OTLP receiver collecting the spans
the processes export.

NATS runs as in production: mutual TLS on the client port and nkey authentication, each
process with its own identity (discovery, the renderer, one per node-loader), the test and
`apilane status` as the operator.

The `kubernetes` EndpointSlice goes from an HA set of three backends to a set where one was
replaced; the test then checks the DaemonSet env, both nodes' pinned maps (read with bpftool,
independently of our own codec), connects through the VIP from each node's cgroup, `apilane
status`, and that the exported spans form ONE trace across discovery, renderer and both loaders.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from apilane.kube.client import KubeClient
from apilane.model import envformat, events, subjects
from apilane.model.signing import TrustedKeys, open_snapshot
from apilane.runtime.bus import Bus
from apilane.runtime.natsauth import Role
from apilane.testing.bpf import BpfLab, Topology, pinned_v4_nat
from apilane.testing.calico import container_env
from apilane.testing.kube import ControlPlane, endpoint_slice
from apilane.testing.nats import NatsServer
from apilane.testing.otlp import OtlpReceiver, ReceivedSpan, dump
from apilane.testing.sealing import signing_environment
from apilane.testing.stack import ServiceProcesses, base_environment

pytestmark = [pytest.mark.e2e, pytest.mark.kube, pytest.mark.nats, pytest.mark.bpf]

REPO = Path(__file__).resolve().parents[2]
CLUSTER = "e2e"
VIP = "10.96.0.1"
VIP_PORT = 443
NODES = ("node-a", "node-b")
WAIT = 60.0  # bound for each step; a healthy run takes well under a second per step
SLICES = "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices"


async def eventually(
    check: Callable[[], Awaitable[Any]],
    *,
    what: str,
    stack: ServiceProcesses,
    timeout: float = WAIT,
) -> Any:
    """Poll `check` until it returns something truthy; fail with the services' logs."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        stack.check_alive()
        last = await check()
        if last:
            return last
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})\n{stack.logs_text()}")


def calico_node_daemonset(name: str = "calico-node") -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {"name": name},
        "spec": {
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "initContainers": [
                        {
                            "name": "ebpf-bootstrap",
                            "image": "calico/node:v3.31.0",
                            "env": [{"name": "CALICO_CGROUP_PATH", "value": "/run/calico/cgroup"}],
                        }
                    ],
                    "containers": [
                        {
                            "name": "calico-node",
                            "image": "calico/node:v3.31.0",
                            "env": [{"name": "DATASTORE_TYPE", "value": "kubernetes"}],
                        },
                        {"name": "csi-sidecar", "image": "example/sidecar:1.0"},
                    ],
                },
            },
        },
    }


@pytest.fixture
def otlp() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as receiver:
        yield receiver


async def test_one_endpoint_change_reaches_the_daemonset_both_nodes_and_forms_one_trace(
    control_plane: ControlPlane,
    kubernetes_endpoints: KubeClient,
    kube_namespace: str,
    nats_server_tls: NatsServer,
    bpf_lab: BpfLab,
    otlp: OtlpReceiver,
    tmp_path: Path,
) -> None:
    kube = kubernetes_endpoints
    service = await kube.get("/api/v1/namespaces/default/services/kubernetes")
    target_port = int(service["spec"]["ports"][0]["targetPort"])

    # Four backend namespaces, each a listener that answers with its own address.
    topology: Topology = bpf_lab.topology(backends=4)
    for backend in topology.backends:
        bpf_lab.server(netns=backend.netns, addresses=[backend.ipv4], ports=[target_port])
    first_set = [b.ipv4 for b in topology.backends[:3]]
    removed, added = topology.backends[2].ipv4, topology.backends[3].ipv4
    second_set = [*first_set[:2], added]

    await kube.create(SLICES, endpoint_slice("kubernetes", addresses=first_set, port=target_port))
    daemonset_path = f"/apis/apps/v1/namespaces/{kube_namespace}/daemonsets/calico-node"
    await kube.create(
        f"/apis/apps/v1/namespaces/{kube_namespace}/daemonsets", calico_node_daemonset()
    )

    # The services, through their real entry points, each with its own NATS identity.
    nats_server = nats_server_tls
    env = base_environment(
        cluster=CLUSTER,
        nats_url=nats_server.url,
        kubeconfig=str(control_plane.kubeconfig_path),
        otlp_endpoint=otlp.endpoint,
    ) | signing_environment(tmp_path)
    stack = ServiceProcesses(tmp_path)
    cgroups: dict[str, Path] = {}
    pins: dict[str, Path] = {}
    try:
        stack.start(
            "discovery",
            "apilane.discovery",
            env
            | nats_server.env(Role.DISCOVERY, CLUSTER)
            | {
                "APILANE_LEASE_NAMESPACE": kube_namespace,
                "APILANE_POD_NAME": "discovery-0",
                "APILANE_COALESCE_WINDOW": "50ms",
            },
        )
        stack.start(
            "apilane-renderer",
            "apilane.renderer",
            env
            | nats_server.env(Role.RENDERER, CLUSTER)
            | {
                "APILANE_LEASE_NAMESPACE": kube_namespace,
                "APILANE_POD_NAME": "renderer-0",
                "APILANE_TARGET_NAMESPACE": kube_namespace,
            },
        )
        for node in NODES:
            cgroups[node], pins[node] = bpf_lab.child_cgroup(), bpf_lab.pin_dir()
            state_dir = tmp_path / f"state-{node}"
            state_dir.mkdir()
            stack.start(
                node,
                "apilane.node_loader",
                env
                | nats_server.env(Role.NODE_LOADER, CLUSTER, node)
                | {
                    "APILANE_NODE_NAME": node,
                    # Backends here are addresses no probe may reach from this host: probing is off.
                    "APILANE_BACKEND_PROBE": "off",
                    "APILANE_MAP_BACKEND": "bpf",
                    "APILANE_CGROUP_PATH": str(cgroups[node]),
                    "APILANE_BPF_PIN_DIR": str(pins[node]),
                    "APILANE_STATE_DIR": str(state_dir),
                    "APILANE_NODE_STATE_INTERVAL": "1s",
                    "OTEL_RESOURCE_ATTRIBUTES": f"k8s.node.name={node}",
                },
            )

        bus = await nats_server.connect(Role.OPERATOR, CLUSTER, name="e2e-test")
        try:
            await run_scenario(
                kube=kube,
                bus=bus,
                trusted_keys=env["APILANE_TRUSTED_KEYS"],
                stack=stack,
                otlp=otlp,
                bpf_lab=bpf_lab,
                topology=topology,
                cgroups=cgroups,
                pins=pins,
                daemonset_path=daemonset_path,
                target_port=target_port,
                first_set=first_set,
                second_set=second_set,
                removed=removed,
                nats_env=nats_server.env(Role.OPERATOR, CLUSTER),
                kubeconfig=str(control_plane.kubeconfig_path),
                namespace=kube_namespace,
                tmp_path=tmp_path,
            )
        finally:
            await bus.drain()
    finally:
        stack.stop()


async def run_scenario(
    *,
    kube: KubeClient,
    bus: Bus,
    trusted_keys: str,
    stack: ServiceProcesses,
    otlp: OtlpReceiver,
    bpf_lab: BpfLab,
    topology: Topology,
    cgroups: dict[str, Path],
    pins: dict[str, Path],
    daemonset_path: str,
    target_port: int,
    first_set: list[str],
    second_set: list[str],
    removed: str,
    nats_env: dict[str, str],
    kubeconfig: str,
    namespace: str,
    tmp_path: Path,
) -> None:
    async def latest_snapshot() -> events.EndpointSnapshot | None:
        entry = await bus.kv_get(subjects.SNAPSHOT_BUCKET, subjects.snapshot_key(CLUSTER))
        if entry is None:
            return None
        return open_snapshot(entry.value, TrustedKeys.parse(trusted_keys)).snapshot

    async def node_generations() -> dict[str, int]:
        found = {}
        for node in NODES:
            entry = await bus.kv_get(
                subjects.NODE_STATE_BUCKET, subjects.node_state_key(CLUSTER, node)
            )
            if entry is not None:
                state = events.decode(entry.value)
                assert isinstance(state, events.NodeState)
                found[node] = state.generation
        return found

    async def daemonset_env() -> dict[str, str]:
        # Literal, or read from the renderer's ConfigMap (configmap mode, the default).
        daemonset = await kube.get(daemonset_path)
        return await container_env(kube, daemonset, "initContainers", "ebpf-bootstrap")

    def expected_endpoints(addresses: list[str]) -> str:
        return envformat.render_ip_ports([envformat.IpPort.of(ip, target_port) for ip in addresses])

    async def settled_at(addresses: list[str]) -> int:
        """The generation at which discovery, renderer and both nodes agree on `addresses`."""
        snapshot = await latest_snapshot()
        if snapshot is None or sorted(e.ip for e in snapshot.apiserver_endpoints) != sorted(
            addresses
        ):
            return 0
        env = await daemonset_env()
        if env.get("KUBERNETES_APISERVER_ENDPOINTS") != expected_endpoints(addresses):
            return 0
        generations = await node_generations()
        if any(generations.get(node) != snapshot.generation for node in NODES):
            return 0
        return snapshot.generation

    # 1. The initial HA set flows everywhere.
    first_generation = await eventually(
        lambda: settled_at(first_set), what="the initial set everywhere", stack=stack
    )
    for node in NODES:
        assert pinned_v4_nat(pins[node])[(VIP, VIP_PORT)] == {(ip, target_port) for ip in first_set}

    # 2. Replace one API server: one write to the EndpointSlice.
    slice_path = f"{SLICES}/kubernetes"
    current = await kube.get(slice_path)
    replacement = endpoint_slice("kubernetes", addresses=second_set, port=target_port)
    replacement["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
    replaced = await kube.replace(slice_path, replacement)
    slice_version = replaced["metadata"]["resourceVersion"]

    second_generation = await eventually(
        lambda: settled_at(second_set), what="the replaced set everywhere", stack=stack
    )
    assert second_generation > first_generation

    # The DaemonSet: both env vars, other containers, env vars and images untouched.
    daemonset = await kube.get(daemonset_path)
    spec = daemonset["spec"]["template"]["spec"]
    env = await daemonset_env()
    assert env["KUBERNETES_SERVICE_IPS_PORTS"] == f"{VIP}:{VIP_PORT}"
    assert env["CALICO_CGROUP_PATH"] == "/run/calico/cgroup"
    main = next(c for c in spec["containers"] if c["name"] == "calico-node")
    assert {"name": "DATASTORE_TYPE", "value": "kubernetes"} in main["env"]
    assert [c["image"] for c in spec["containers"]] == [
        "calico/node:v3.31.0",
        "example/sidecar:1.0",
    ]

    # Both nodes' kernel maps hold exactly the new set.
    for node in NODES:
        assert pinned_v4_nat(pins[node])[(VIP, VIP_PORT)] == {
            (ip, target_port) for ip in second_set
        }

    # A connect to the VIP from each node's cgroup reaches only live backends, and the
    # application sees the VIP as its peer. Bounded: 30 connects per node.
    for node in NODES:
        agent = bpf_lab.agent(netns=topology.client, cgroup=cgroups[node])
        results = agent.tcp_request(VIP, VIP_PORT, count=30)
        assert all(r["error"] is None for r in results), results
        reached = {r["server"][0] for r in results}
        assert reached <= set(second_set) and removed not in reached, reached
        assert len(reached) >= 2, f"30 random picks among 3 backends reached only {reached}"
        assert {tuple(r["peer"][:2]) for r in results} == {(VIP, VIP_PORT)}
        bpf_lab.end(agent)

    # `apilane status` shows both nodes at the new generation.
    status = await asyncio.to_thread(
        subprocess.run,
        [
            str(Path(sys.executable).parent / "apilane"),  # the operator CLI's console script
            f"--daemonset={namespace}/calico-node",
            "status",
            "--json",
        ],
        # The operator's identity (APILANE_NATS_URL and its credentials): what a person has.
        env=os.environ
        | nats_env
        | {
            "APILANE_CLUSTER": CLUSTER,
            # What `apilane status` verifies the snapshot with.
            "APILANE_TRUSTED_KEYS": trusted_keys,
            "KUBECONFIG": kubeconfig,
            "APILANE_TARGET_NAMESPACE": namespace,
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["generation"] == second_generation
    # Opened with the trusted key: discovery's signature, shown with its key id.
    assert (report["trusted"], report["untrusted"]) == (True, "")
    assert (report["signed_by"],) == TrustedKeys.parse(trusted_keys).ids
    assert {n["node"]: n["generation"] for n in report["nodes"]} == dict.fromkeys(
        NODES, second_generation
    )

    # ONE trace: discovery observe → publish (PRODUCER) → renderer consume → render/patch, and
    # each node-loader consume → apply → map writes.
    def publish_of(spans: list[ReceivedSpan]) -> ReceivedSpan | None:
        return next(
            (
                s
                for s in spans
                if s.name == "discovery publish"
                and s.attributes.get("apilane.generation") == second_generation
            ),
            None,
        )

    def complete(spans: list[ReceivedSpan]) -> bool:
        publish = publish_of(spans)
        if publish is None:
            return False
        in_trace = [s for s in spans if s.trace_id == publish.trace_id]
        names = {(s.service, s.name) for s in in_trace}
        writes = [s for s in in_trace if s.name == "map writes"]
        return ("apilane-renderer", "patch") in names and len(writes) >= len(NODES)

    spans = await asyncio.to_thread(otlp.wait_for, complete, timeout=30)
    publish = publish_of(spans)
    assert publish is not None
    trace = [s for s in spans if s.trace_id == publish.trace_id]
    by_id = {s.span_id: s for s in trace}
    tree = dump(trace)

    def parent(span: ReceivedSpan) -> ReceivedSpan:
        assert span.parent_span_id in by_id, f"{span.name} has no parent in the trace:\n{tree}"
        return by_id[span.parent_span_id]

    observe = parent(publish)
    assert (observe.service, observe.name, observe.parent_span_id) == (
        "apilane-discovery",
        "discovery observe",
        "",
    ), tree
    assert publish.kind == "PRODUCER"
    assert (
        f"EndpointSlice/default/kubernetes@{slice_version}"
        in publish.attributes["apilane.resource_versions"]
    )
    assert publish.attributes["apilane.digest"]

    renderer_consume = next(
        s for s in trace if s.service == "apilane-renderer" and s.kind == "CONSUMER"
    )
    assert parent(renderer_consume) is publish, tree
    render = next(s for s in trace if s.service == "apilane-renderer" and s.name == "render")
    patch = next(s for s in trace if s.service == "apilane-renderer" and s.name == "patch")
    assert parent(render) is renderer_consume and parent(patch) is renderer_consume, tree

    loader_consumes = [
        s for s in trace if s.service == "apilane-node-loader" and s.kind == "CONSUMER"
    ]
    assert sorted(s.resource.get("k8s.node.name") for s in loader_consumes) == sorted(NODES), tree
    for consume in loader_consumes:
        assert parent(consume) is publish, tree
        apply = next(s for s in trace if s.name == "apply" and s.parent_span_id == consume.span_id)
        writes = next(
            s for s in trace if s.name == "map writes" and s.parent_span_id == apply.span_id
        )
        assert int(writes.attributes["entries_written"]) > 0, tree
