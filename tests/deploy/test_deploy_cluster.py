"""deploy/ as real pods on a one-node cluster (apilane.testing.cluster), with the values of
this machine (apilane.testing.cluster.local_values) and the images built here.

Proves: the three NATS pods form one JetStream cluster; discovery and renderer run two
replicas each and exactly one of each leads; the node-loader DaemonSet pod pins its maps and
attaches its programs to the cluster's child cgroup (and nothing to the host's cgroup2 root);
every probe passes; and one endpoint change (a second API server address) flows to the
snapshot, calico-node's env (written by the renderer, which reaches the API server at its
ClusterIP through apilane's own connect-time load balancer) and the node's state.

calico-node is a stand-in (apilane.testing.cluster.running_calico_node) whose pod really runs
and prints the two variables it starts with. In configmap mode (deploy/'s default) adopting it
is its one rollout, and the endpoint change then updates the ConfigMap only: the same pod
runs on, unrestarted, the DaemonSet's generation unchanged. Switched to literal mode (the
renderer Deployment's APILANE_RENDER_MODE), the next change (the second address removed)
patches the pod template, and a new pod starts with the new value.

The control plane runs three kube-apiservers (lease endpoint reconciler); the node's own
components use the first. Before the switch to literal mode, a client pod
(apilane.testing.apiserver_client) talks to the API server at the `kubernetes` ClusterIP; the
apiserver its connection is on (by the serving certificate it saw, and by the host's view of
the connection) is SIGKILLed, and its next requests are served by a live one within
KILL_RECOVERY (the node-loader's probes), no pod restarted; the dead one then leaves the
endpoints (its lease expired) in the snapshot, calico-node's env and the node's state.
Pod and component logs are kept under the test's tmp_path when it fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from apilane.kube.client import KubeClient, NotFound
from apilane.model import envformat, events, subjects
from apilane.model.signing import TrustedKeys, open_snapshot
from apilane.runtime.bus import Bus
from apilane.testing import apiserver_client
from apilane.testing.apiserver_client import ClientLine, client_objects, recovery, served_on
from apilane.testing.calico import container_env
from apilane.testing.cluster import (
    API_PORT,
    IMAGE_NAMES,
    OneNodeCluster,
    local_values,
    nats_volumes,
    running_calico_node,
)
from apilane.testing.deploy_secrets import DeploySecrets, make_deploy_secrets
from apilane.testing.docker import DockerDaemon
from apilane.testing.ha import HAControlPlane
from apilane.testing.images import BuildReport
from apilane.testing.kube import endpoint_slice
from apilane.testing.procs import ComponentMissing

pytestmark = [pytest.mark.integration, pytest.mark.docker, pytest.mark.kube, pytest.mark.bpf]

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
NAMESPACE = "apilane"
CLUSTER = "default"  # APILANE_CLUSTER in deploy/config.yaml
WAIT = 240.0
CALICO_NAMESPACE = "calico-system"
CALICO_DS = f"/apis/apps/v1/namespaces/{CALICO_NAMESPACE}/daemonsets/calico-node"
INIT = "ebpf-bootstrap"  # the stand-in calico-node's init container (deploy/demo)
APISERVER_ENDPOINTS = "KUBERNETES_APISERVER_ENDPOINTS"
ENDPOINTS_CONFIGMAP = "apilane-kubernetes-endpoints"  # APILANE_CONFIGMAP_NAME in deploy/
RENDERER_DEPLOYMENT = f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments/apilane-renderer"
# After an endpoint change has settled: how long a restart of calico-node would have to show.
QUIET = 10.0
# The control plane: the node's apiserver and two more, the ones a kill may hit.
APISERVERS = 3
# From the SIGKILL of the apiserver the client pod talks to until a live one serves its next
# request: the node-loader's tcp probes (deploy/'s default: every 300 ms, 3 failures) leave
# the dead backend out long before its endpoint lease expires.
KILL_RECOVERY = 10.0
# Requests in a row served after the recovery: two new connections at least (the client opens
# one every PER_CONNECTION requests), each a new pick of the load balancer.
RECOVERED_RUN = 2 * apiserver_client.PER_CONNECTION
T = TypeVar("T")

# The order `kubectl apply` would need on a fresh cluster (deploy/README.md).
APPLY_ORDER = (
    "namespace.yaml",
    "config.yaml",
    "nats.yaml",
    # The renderer's Role lives in calico-system: the demo Calico objects come first.
    "demo/calico-system.yaml",
    "demo/kube-proxy.yaml",
    "rbac-discovery.yaml",
    "rbac-renderer.yaml",
    "rbac-node-loader.yaml",
    "discovery.yaml",
    "renderer.yaml",
    "node-loader.yaml",
)


async def eventually(check: Callable[[], Awaitable[T | None]], *, what: str) -> T:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        found = await check()
        if found:
            return found
        await asyncio.sleep(1.0)
    raise AssertionError(f"timed out after {WAIT:.0f} s waiting for {what}")


def manifests(cluster: OneNodeCluster) -> list[dict[str, Any]]:
    docs = [
        doc
        for name in APPLY_ORDER
        for doc in yaml.safe_load_all((DEPLOY / name).read_text())
        if doc
    ]
    here = local_values(docs, cgroup_name=cluster.cgroup_name, api_address=cluster.address)
    return running_calico_node(here, image=IMAGE_NAMES["renderer"])


async def collection_of(kube: KubeClient, doc: dict[str, Any], cache: dict[str, Any]) -> str:
    api = doc["apiVersion"]
    base = "/api/v1" if api == "v1" else f"/apis/{api}"
    if base not in cache:
        cache[base] = {
            r["kind"]: r for r in (await kube.get(base))["resources"] if "/" not in r["name"]
        }
    resource = cache[base][doc["kind"]]
    if resource["namespaced"]:
        return f"{base}/namespaces/{doc['metadata']['namespace']}/{resource['name']}"
    return f"{base}/{resource['name']}"


async def apply_all(kube: KubeClient, docs: list[dict[str, Any]]) -> None:
    cache: dict[str, Any] = {}
    for doc in docs:
        await kube.create(await collection_of(kube, doc, cache), doc)


class Relay:
    """A second "API server" address: a TCP relay on the bridge from a new address to the real
    one, so the changed endpoint set is all live (connections may pick either)."""

    def __init__(self, listen: str, target: tuple[str, int]) -> None:
        self.server = socket.create_server((listen, target[1]))
        self.target = target
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = self.server.accept()
                threading.Thread(target=self.pipe_pair, args=(client,), daemon=True).start()

    def pipe_pair(self, client: socket.socket) -> None:
        with contextlib.suppress(OSError), client, socket.create_connection(self.target, 5) as up:
            threading.Thread(target=self.pipe, args=(up, client), daemon=True).start()
            self.pipe(client, up)

    @staticmethod
    def pipe(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.server.close()


@pytest.fixture
def cluster(
    docker_daemon: DockerDaemon, local_images: BuildReport, tmp_path: Path
) -> Iterator[OneNodeCluster]:
    try:
        node = OneNodeCluster(docker_daemon, apiservers=APISERVERS)
    except ComponentMissing as exc:
        pytest.fail(f"the one-node cluster cannot run here: {exc}")
    node.start()
    print(f"one-node cluster ready in {node.timings['ready']:.1f} s ({node.timings})")
    try:
        yield node
    finally:
        # A failing test keeps them itself: pytest does not raise its failure in here.
        if os.environ.get("APILANE_KEEP_POD_LOGS"):
            keep_logs(node, tmp_path / "cluster-logs")
        node.stop()
        assert node.leftovers() == {}


def keep_logs(node: OneNodeCluster, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for key, text in {**node.pod_logs(), **node.component_logs()}.items():
        (directory / (key.replace("/", "__") + ".log")).write_text(text)
    print(f"pod and component logs kept in {directory}")


async def pods(kube: KubeClient, selector: str, namespace: str = NAMESPACE) -> list[dict[str, Any]]:
    listing = await kube.get(
        f"/api/v1/namespaces/{namespace}/pods", params={"labelSelector": selector}
    )
    return list(listing["items"])


def ready(pod: dict[str, Any]) -> bool:
    conditions = pod.get("status", {}).get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


async def all_ready(kube: KubeClient, selector: str, count: int) -> list[dict[str, Any]] | None:
    found = [
        p for p in await pods(kube, selector) if p["metadata"].get("deletionTimestamp") is None
    ]
    return found if len(found) == count and all(map(ready, found)) else None


def jetstream_meta(pod_ip: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://{pod_ip}:8222/jsz", timeout=5) as response:
        meta: dict[str, Any] = json.load(response).get("meta_cluster", {})
        return meta


def attached_programs(cgroup: Path) -> list[str]:
    shown = subprocess.run(
        ["bpftool", "-j", "cgroup", "show", str(cgroup)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return [str(entry.get("name", "")) for entry in json.loads(shown.stdout.strip() or "[]")]


# Cluster start, deploy/ Ready, then three rollouts (calico-node's adoption, the renderer's
# switch of modes, calico-node's literal patch) and an apiserver's kill on a 2-core machine.
@pytest.mark.timeout(600)
async def test_deploy_runs_as_real_pods_and_an_endpoint_change_flows_through(
    cluster: OneNodeCluster, tmp_path: Path
) -> None:
    for index in range(3):  # the NATS pods run as uid 1000
        (cluster.work / f"nats-{index}").mkdir()
        os.chown(cluster.work / f"nats-{index}", 1000, 1000)
    docs = manifests(cluster)
    namespaces = [doc for doc in docs if doc["kind"] == "Namespace"]
    # What an installer makes between the namespace and the workloads (deploy/README.md).
    secrets = make_deploy_secrets(
        cluster.work / "secrets", nodes=[cluster.node], pod_subnet=cluster.subnet,
        cluster=CLUSTER, namespace=NAMESPACE,
    )  # fmt: skip
    kube = await KubeClient.from_config(str(cluster.admin_kubeconfig))
    try:
        await apply_all(
            kube,
            nats_volumes(cluster.work)
            + namespaces
            + secrets.objects
            + [doc for doc in docs if doc["kind"] != "Namespace"],
        )
        await check_workloads(kube, cluster, secrets)
    except BaseException:
        keep_logs(cluster, tmp_path / "cluster-logs")
        raise
    finally:
        await kube.close()


async def one_leader(
    kube: KubeClient, cluster: OneNodeCluster, service: str, lease: str
) -> str | None:
    names = {p["metadata"]["name"] for p in await pods(kube, f"app.kubernetes.io/name={service}")}
    with contextlib.suppress(NotFound):
        held = await kube.get(f"/apis/coordination.k8s.io/v1/namespaces/{NAMESPACE}/leases/{lease}")
        holder = held["spec"].get("holderIdentity")
        leading = [
            key for key, text in cluster.pod_logs().items()
            if key.startswith(f"{NAMESPACE}_{service}") and "became the leader" in text
        ]  # fmt: skip
        if holder in names and len(leading) == 1 and holder in leading[0]:
            return str(holder)
    return None


async def check_workloads(
    kube: KubeClient, cluster: OneNodeCluster, secrets: DeploySecrets
) -> None:
    started = time.monotonic()
    nats = await eventually(
        lambda: all_ready(kube, "app.kubernetes.io/name=nats", 3), what="3 NATS pods Ready"
    )
    for name, count in (
        ("apilane-discovery", 2),
        ("apilane-renderer", 2),
        ("apilane-node-loader", 1),
    ):
        await eventually(
            lambda n=name, c=count: all_ready(kube, f"app.kubernetes.io/name={n}", c),  # type: ignore[misc]
            what=f"{count} {name} pods Ready",
        )
    print(f"deploy/ Ready {time.monotonic() - started:.1f} s after apply")

    # One JetStream cluster of three, with a leader, seen from every server.
    for pod in nats:
        meta = await asyncio.to_thread(jetstream_meta, pod["status"]["podIP"])
        assert meta.get("cluster_size") == 3 and meta.get("leader"), meta

    # Exactly one leader each: the Lease names one of the two Ready pods, and one pod's log
    # says it leads. (Ready does not wait for leadership; the renderer reaches the API server
    # only through the ClusterIP, so its Lease also proves the connect-time LB works.)
    for service, lease in (
        ("apilane-discovery", subjects.discovery_lease(CLUSTER)),
        ("apilane-renderer", subjects.renderer_lease(CLUSTER)),
    ):
        await eventually(
            lambda s=service, n=lease: one_leader(kube, cluster, s, n),  # type: ignore[misc]
            what=f"exactly one {service} leader",
        )

    # The node-loader programmed its maps, on the cluster's child cgroup only.
    assert sorted(p.name for p in cluster.pin_dir.iterdir()), cluster.pin_dir
    assert [n for n in attached_programs(cluster.cgroup) if n.startswith("apilane_")]
    assert not [n for n in attached_programs(cluster.cgroup.parent) if n.startswith("apilane_")]

    await check_endpoint_change(kube, cluster, secrets, nats_ip=nats[0]["status"]["podIP"])


def bridge_address(action: str, address: str, bridge: str) -> None:
    subprocess.run(["ip", "addr", action, address, "dev", bridge], check=True, timeout=10)


def envformat_hosts(text: str) -> list[str]:
    """The addresses in a KUBERNETES_APISERVER_ENDPOINTS value (empty: none)."""
    return [str(entry.ip) for entry in envformat.parse_ip_ports(text, allow_empty=True)]


@dataclass(frozen=True)
class CalicoNode:
    """The stand-in calico-node as rolled out: its DaemonSet's generation, its one pod."""

    generation: int
    uid: str
    restarts: tuple[tuple[str, int], ...]


async def calico_rolled_out(kube: KubeClient) -> CalicoNode | None:
    """The DaemonSet's latest template runs, Ready, in its one pod (None until then)."""
    ds = await kube.get(CALICO_DS)
    status = ds.get("status", {})
    found = [
        p for p in await pods(kube, "k8s-app=calico-node", CALICO_NAMESPACE)
        if p["metadata"].get("deletionTimestamp") is None
    ]  # fmt: skip
    if not (
        status.get("observedGeneration") == ds["metadata"]["generation"]
        and status.get("desiredNumberScheduled") == 1
        and status.get("updatedNumberScheduled") == 1
        and status.get("numberReady") == 1
        and len(found) == 1
        and ready(found[0])
    ):
        return None
    statuses = found[0]["status"].get("initContainerStatuses", []) + found[0]["status"].get(
        "containerStatuses", []
    )
    return CalicoNode(
        generation=int(ds["metadata"]["generation"]),
        uid=str(found[0]["metadata"]["uid"]),
        restarts=tuple(sorted((c["name"], int(c["restartCount"])) for c in statuses)),
    )


def calico_saw(cluster: OneNodeCluster, node: CalicoNode) -> str:
    """What the stand-in's init container printed: the endpoints it started with."""
    logs = cluster.pod_logs()
    return next((text for key, text in logs.items() if key.endswith(f"_{node.uid}/{INIT}")), "")


def reads_configmap(ds: dict[str, Any], kind: str, container: str) -> bool:
    for entry in ds["spec"]["template"]["spec"][kind]:
        if entry["name"] == container:
            env = {e["name"]: e for e in entry.get("env", [])}
            ref = env[APISERVER_ENDPOINTS].get("valueFrom", {}).get("configMapKeyRef", {})
            return bool(ref.get("name") == ENDPOINTS_CONFIGMAP)
    raise AssertionError(f"no {kind} {container} in {ds['metadata']['name']}")


async def renderer_rolled_out(kube: KubeClient, cluster: OneNodeCluster, mode: str) -> str | None:
    """The renderer Deployment runs `mode` in both pods, no older one left, and one of them
    holds the Lease and says it leads: its name (None until then)."""
    deployment = await kube.get(RENDERER_DEPLOYMENT)
    status = deployment.get("status", {})
    env = {e["name"]: e.get("value") for e in
           deployment["spec"]["template"]["spec"]["containers"][0]["env"]}  # fmt: skip
    assert env["APILANE_RENDER_MODE"] == mode
    if not (
        status.get("observedGeneration") == deployment["metadata"]["generation"]
        and status.get("replicas") == status.get("updatedReplicas") == 2
        and status.get("readyReplicas") == 2
    ):
        return None
    current = await all_ready(kube, "app.kubernetes.io/name=apilane-renderer", 2)
    if current is None:
        return None
    lease = await kube.get(
        f"/apis/coordination.k8s.io/v1/namespaces/{NAMESPACE}/leases/"
        + subjects.renderer_lease(CLUSTER)
    )
    holder = lease["spec"].get("holderIdentity")
    if holder not in {p["metadata"]["name"] for p in current}:
        return None
    logs = cluster.pod_logs()
    leads = any(
        key.startswith(f"{NAMESPACE}_{holder}_") and "became the leader" in text
        for key, text in logs.items()
    )
    return str(holder) if leads else None


async def check_endpoint_change(
    kube: KubeClient, cluster: OneNodeCluster, secrets: DeploySecrets, *, nats_ip: str
) -> None:
    # As the cluster's operator, over TLS checked against the CA the test made.
    bus = await Bus.connect([f"tls://{nats_ip}:4222"], name="deploy-test", auth=secrets.operator)
    trusted = TrustedKeys.of(secrets.signing_key)
    second = str(list(cluster.subnet.hosts())[-1])
    await asyncio.to_thread(bridge_address, "add", f"{second}/32", cluster.bridge)
    relay = Relay(second, (cluster.address, 6443))
    try:

        async def settled(addresses: set[str]) -> events.EndpointSnapshot | None:
            entry = await bus.kv_get(subjects.SNAPSHOT_BUCKET, subjects.snapshot_key(CLUSTER))
            # Signed by discovery with the key the test made: it opens with that key only.
            snapshot = None if entry is None else open_snapshot(entry.value, trusted).snapshot
            if snapshot is None or {e.ip for e in snapshot.apiserver_endpoints} != addresses:
                return None
            ds = await kube.get(CALICO_DS)
            env = await container_env(kube, ds, "initContainers", INIT)
            shown = set(envformat_hosts(env.get(APISERVER_ENDPOINTS, "")))
            if shown != addresses:
                return None
            state = await bus.kv_get(
                subjects.NODE_STATE_BUCKET, subjects.node_state_key(CLUSTER, cluster.node)
            )
            node = None if state is None else events.decode(state.value)
            assert node is None or isinstance(node, events.NodeState)
            return snapshot if node is not None and node.generation == snapshot.generation else None

        # configmap mode (deploy/'s default): adopting calico-node is its one rollout.
        apiservers = set(cluster.apiserver_addresses)
        first = await eventually(lambda: settled(apiservers), what="the initial endpoints")
        adopted = await eventually(lambda: calico_rolled_out(kube), what="calico-node adopted")
        ds = await kube.get(CALICO_DS)
        assert reads_configmap(ds, "initContainers", INIT)
        assert reads_configmap(ds, "containers", "calico-node")
        assert cluster.address in calico_saw(cluster, adopted), "it read the ConfigMap at start"

        started = time.monotonic()
        await kube.create(
            "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices",
            endpoint_slice("kubernetes-second", addresses=[second], port=6443),
        )
        changed = await eventually(
            lambda: settled(apiservers | {second}), what="the second API server everywhere"
        )
        assert changed.generation > first.generation
        print(f"configmap mode: the change settled in {time.monotonic() - started:.1f} s")
        configmap = await kube.get(
            f"/api/v1/namespaces/{CALICO_NAMESPACE}/configmaps/{ENDPOINTS_CONFIGMAP}"
        )
        assert set(envformat_hosts(configmap["data"][APISERVER_ENDPOINTS])) == apiservers | {second}
        await asyncio.sleep(QUIET)
        assert await calico_rolled_out(kube) == adopted, "configmap mode restarted calico-node"

        # Still in configmap mode: the dead apiserver leaving the endpoints restarts nothing.
        changed = await check_apiserver_kill(kube, cluster, settled, extra={second})
        assert await calico_rolled_out(kube) == adopted, "the apiserver kill restarted calico-node"

        await check_literal_mode(
            kube, cluster, settled, second=second, after=changed, adopted=adopted
        )
    finally:
        relay.close()
        await bus.drain()
        await asyncio.to_thread(bridge_address, "del", f"{second}/32", cluster.bridge)


async def check_literal_mode(
    kube: KubeClient,
    cluster: OneNodeCluster,
    settled: Callable[[set[str]], Awaitable[events.EndpointSnapshot | None]],
    *,
    second: str,
    after: events.EndpointSnapshot,
    adopted: CalicoNode,
) -> None:
    """The renderer switched to literal mode (its Deployment's env, as the chart's
    renderer.envSource would set it): the next endpoint change rolls calico-node."""
    await kube.patch(
        RENDERER_DEPLOYMENT,
        {"spec": {"template": {"spec": {"containers": [
            {"name": "renderer", "env": [{"name": "APILANE_RENDER_MODE", "value": "literal"}]}
        ]}}}},
        field_manager="deploy-test",
    )  # fmt: skip
    await eventually(
        lambda: renderer_rolled_out(kube, cluster, "literal"), what="the renderer in literal mode"
    )
    # Whatever the switch itself wrote has rolled out before the change is made.
    await asyncio.sleep(QUIET)
    before = await eventually(lambda: calico_rolled_out(kube), what="calico-node rolled out")
    print(f"literal mode: the switch alone restarted calico-node: {before != adopted}")

    started = time.monotonic()
    await kube.delete(
        "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices/kubernetes-second"
    )
    removed = await eventually(
        lambda: settled(set(cluster.apiserver_addresses)),
        what="the second API server gone everywhere",
    )
    assert removed.generation > after.generation
    ds = await kube.get(CALICO_DS)
    assert not reads_configmap(ds, "initContainers", INIT)
    assert not reads_configmap(ds, "containers", "calico-node")

    async def restarted() -> CalicoNode | None:
        now = await calico_rolled_out(kube)
        return now if now is not None and now.uid != before.uid else None

    rolled = await eventually(restarted, what="calico-node restarted by the literal patch")
    print(f"literal mode: the change settled and rolled in {time.monotonic() - started:.1f} s")
    assert rolled.generation > before.generation
    saw = calico_saw(cluster, rolled)
    assert cluster.address in saw and second not in saw, saw


def client_log(cluster: OneNodeCluster) -> list[ClientLine]:
    """The client pod's requests so far (from the log file the kubelet writes)."""
    pattern = f"{NAMESPACE}_{apiserver_client.NAME}_*/client/*.log"
    files = sorted((cluster.work / "pod-logs").glob(pattern))
    return apiserver_client.parse_lines("".join(f.read_text(errors="replace") for f in files))


def established(local: str, peer: str) -> bool:
    """Whether the host (where the apiservers run) holds an established connection local-peer."""
    shown = subprocess.run(
        ["ss", "-Htn", "state", "established", "src", local, "dst", peer],
        capture_output=True, text=True, timeout=10, check=True,
    )  # fmt: skip
    return bool(shown.stdout.strip())


async def pod_restarts(kube: KubeClient) -> dict[str, tuple[str, int]]:
    """Every pod of the cluster by uid: its name and its containers' restarts."""
    listing = await kube.get("/api/v1/pods")
    return {
        p["metadata"]["uid"]: (
            f"{p['metadata']['namespace']}/{p['metadata']['name']}",
            sum(int(c["restartCount"]) for c in p["status"].get("containerStatuses", [])),
        )
        for p in listing["items"]
        if p["metadata"].get("deletionTimestamp") is None
    }


async def check_apiserver_kill(
    kube: KubeClient,
    cluster: OneNodeCluster,
    settled: Callable[[set[str]], Awaitable[events.EndpointSnapshot | None]],
    *,
    extra: set[str],
) -> events.EndpointSnapshot:
    """A client pod talks to the API server at the ClusterIP; the apiserver its connection is
    on is SIGKILLed; its next requests are served by a live one within KILL_RECOVERY, with no
    pod restarted, and once the dead one's lease expires it leaves the endpoints everywhere
    (`settled`: the snapshot, calico-node's env, the node's state; `extra` are the endpoints
    that are no apiserver's). Returns that snapshot."""
    started = time.monotonic()
    names = [HAControlPlane.apiserver_name(i) for i in range(len(cluster.apiservers))]
    await apply_all(kube, client_objects(namespace=NAMESPACE, image=IMAGE_NAMES["renderer"]))
    ready_pods = await eventually(
        lambda: all_ready(kube, f"app.kubernetes.io/name={apiserver_client.NAME}", 1),
        what="the API client pod Ready",
    )
    pod_ip = ready_pods[0]["status"]["podIP"]
    before = await pod_restarts(kube)

    async def on_killable() -> ClientLine | None:
        """The client's last request, if served by an apiserver but the node's, on a connection
        with requests to go, which the host sees established (pod address to apiserver)."""
        lines = client_log(cluster)
        last = lines[-1] if lines else None
        if last is None or not last.ok or last.server not in names[1:]:
            return None
        if served_on(lines, last.connection) > apiserver_client.PER_CONNECTION - 3:
            return None
        address = cluster.apiservers[names.index(last.server)].bind_address
        local, peer = f"{address}:{API_PORT}", f"{pod_ip}:{last.local_port}"
        return last if await asyncio.to_thread(established, local, peer) else None

    talking = await eventually(on_killable, what="the client on an apiserver that may be killed")
    index = names.index(talking.server)
    killed_address = cluster.apiservers[index].bind_address
    killed_at = time.time()  # when the kill is sent: the client may see it before it returns
    pid = cluster.kill_apiserver(index)
    live = {name for name, a in zip(names, cluster.apiservers, strict=True) if a.running}
    print(
        f"apiserver kill: SIGKILLed {talking.server} (pid {pid}, {killed_address}) while the"
        f" client's connection {talking.connection} (port {talking.local_port}) was on it"
    )

    async def recovered() -> apiserver_client.Recovery | None:
        return recovery(
            client_log(cluster), connection=talking.connection,
            killed_at=killed_at, run=RECOVERED_RUN,
        )  # fmt: skip

    result = await eventually(recovered, what="the client served again after the kill")
    took = result.first_ok.at - killed_at
    print(
        f"apiserver kill: {talking.server} -> {result.first_ok.server} in {took:.2f} s,"
        f" {result.errors} failed request(s) in between"
    )
    assert result.broken, "the client's connection to the killed apiserver broke"
    assert took < KILL_RECOVERY, f"{took:.1f} s until a live apiserver served the client"
    assert result.first_ok.server in live and result.first_ok.status == 200
    assert [line for line in result.after if not line.ok] == []
    assert {line.server for line in result.after} <= live
    assert len({line.connection for line in result.after}) >= 2

    # The dead apiserver's lease expires: discovery drops it, the client sees it gone.
    snapshot = await eventually(
        lambda: settled(set(cluster.apiserver_addresses) | extra),
        what="the killed apiserver gone everywhere",
    )
    print(f"apiserver kill: gone from the endpoints everywhere {time.time() - killed_at:.1f} s on")

    async def client_sees_it_gone() -> ClientLine | None:
        last = client_log(cluster)[-1]
        return last if last.ok and killed_address not in last.endpoints else None

    seen = await eventually(client_sees_it_gone, what="the client reading the endpoints without it")
    assert set(seen.endpoints) == set(cluster.apiserver_addresses), seen
    assert await pod_restarts(kube) == before, "a pod restarted"
    print(f"apiserver kill: the whole step took {time.monotonic() - started:.1f} s")
    return snapshot
