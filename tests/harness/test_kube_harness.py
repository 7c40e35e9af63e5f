"""Proof that the kube harness runs the real thing: etcd + kube-apiserver from the pinned
build, RBAC, dual-stack service CIDRs, our own EndpointSlices for Service default/kubernetes,
strategic-merge patches that touch only what they name, and N apiservers with the lease
endpoint reconciler in network namespaces."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import pytest

from apilane.cli.demo import Answer, Target, ask, tls_context
from apilane.kube.client import Forbidden, KubeClient
from apilane.kube.watch import ObjectCache, list_then_watch
from apilane.testing.bpf import NetNamespace, entered_netns
from apilane.testing.ha import HAControlPlane
from apilane.testing.kube import (
    KUBERNETES_SERVICE,
    KUBERNETES_SLICES,
    ControlPlane,
    cache_dir,
    endpoint_slice,
    find_kube_binaries,
)
from apilane.testing.procs import ComponentMissing, pid_alive

pytestmark = [pytest.mark.integration, pytest.mark.kube]


def test_binaries_come_from_kubebuilder_assets_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBEBUILDER_ASSETS", str(tmp_path))
    with pytest.raises(ComponentMissing, match="KUBEBUILDER_ASSETS"):
        find_kube_binaries()
    for name in ("kube-apiserver", "etcd"):
        (tmp_path / name).symlink_to(cache_dir() / name)
    assert find_kube_binaries() == tmp_path
    monkeypatch.delenv("KUBEBUILDER_ASSETS")
    assert find_kube_binaries() == cache_dir()


async def test_the_apiserver_is_the_pinned_release_with_rbac_and_dual_stack_services(
    kube: KubeClient, control_plane: ControlPlane, kube_namespace: str, tmp_path: Path
) -> None:
    assert (await kube.get("/version"))["gitVersion"] == "v1.34.4"
    service = await kube.get(KUBERNETES_SERVICE)
    assert service["spec"]["clusterIP"] == "10.96.0.1"
    dual = await kube.create(
        f"/api/v1/namespaces/{kube_namespace}/services",
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "dual"},
            "spec": {
                "ipFamilyPolicy": "RequireDualStack",
                "ipFamilies": ["IPv4", "IPv6"],
                "ports": [{"name": "https", "port": 443, "targetPort": 6443}],
            },
        },
    )
    v4, v6 = dual["spec"]["clusterIPs"]
    assert v4.startswith("10.96.")
    assert v6.startswith("fd00:10:96::")
    outsider = await KubeClient.from_config(
        str(control_plane.write_kubeconfig(tmp_path / "outsider", user="outsider"))
    )
    try:
        with pytest.raises(Forbidden):
            await outsider.list("/api/v1/nodes")
    finally:
        await outsider.close()


async def test_tests_own_the_kubernetes_endpoint_slices(kubernetes_endpoints: KubeClient) -> None:
    kube = kubernetes_endpoints
    events = list_then_watch(
        kube, KUBERNETES_SLICES, label_selector="kubernetes.io/service-name=kubernetes"
    )
    cache = ObjectCache()
    async with contextlib.aclosing(events), asyncio.timeout(20):
        cache.apply(await anext(events))
        assert len(cache) == 0  # no reconciler: nothing until a test writes it
        await kube.create(
            KUBERNETES_SLICES, endpoint_slice("kubernetes", addresses=["192.0.2.1", "192.0.2.2"])
        )
        cache.apply(await anext(events))
        await kube.create(
            KUBERNETES_SLICES,
            endpoint_slice("kubernetes-v6", addresses=["2001:db8::1"], address_type="IPv6"),
        )
        cache.apply(await anext(events))
    assert [o["metadata"]["name"] for o in cache.objects()] == ["kubernetes", "kubernetes-v6"]
    assert cache.get("default", "kubernetes-v6")["addressType"] == "IPv6"  # type: ignore[index]


def calico_node_daemonset() -> dict[str, object]:
    return {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {"name": "calico-node"},
        "spec": {
            "selector": {"matchLabels": {"k8s-app": "calico-node"}},
            "template": {
                "metadata": {"labels": {"k8s-app": "calico-node"}},
                "spec": {
                    "initContainers": [
                        {
                            "name": "ebpf-bootstrap",
                            "image": "quay.io/calico/node:v3.31.0",
                            "env": [{"name": "KUBERNETES_SERVICE_IPS_PORTS", "value": "old"}],
                        }
                    ],
                    "containers": [
                        {
                            "name": "calico-node",
                            "image": "quay.io/calico/node:v3.31.0",
                            "env": [
                                {"name": "DATASTORE_TYPE", "value": "kubernetes"},
                                {"name": "KUBERNETES_APISERVER_ENDPOINTS", "value": "old"},
                                {
                                    "name": "NODENAME",
                                    "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}},
                                },
                            ],
                            "volumeMounts": [{"name": "bpffs", "mountPath": "/sys/fs/bpf"}],
                        },
                        {
                            "name": "sidecar",
                            "image": "registry.example/sidecar:1.2",
                            "env": [{"name": "X", "value": "1"}],
                        },
                    ],
                    "volumes": [{"name": "bpffs", "hostPath": {"path": "/sys/fs/bpf"}}],
                },
            },
        },
    }


async def test_a_strategic_merge_patch_changes_one_env_var_and_nothing_else(
    kube: KubeClient, kube_namespace: str
) -> None:
    base = f"/apis/apps/v1/namespaces/{kube_namespace}/daemonsets"
    before = await kube.create(base, calico_node_daemonset())
    patch = {
        "spec": {
            "template": {
                "spec": {
                    "containers": [
                        {
                            "name": "calico-node",
                            "env": [
                                {
                                    "name": "KUBERNETES_APISERVER_ENDPOINTS",
                                    "value": "192.0.2.1:6443",
                                }
                            ],
                        }
                    ]
                }
            }
        }
    }
    after = await kube.patch(f"{base}/calico-node", patch, field_manager="apilane-renderer")
    assert after["metadata"]["generation"] == before["metadata"]["generation"] + 1

    def without_endpoints(ds: dict[str, object]) -> object:
        spec = ds["spec"]["template"]["spec"]  # type: ignore[index]
        main = spec["containers"][0]
        main["env"] = [e for e in main["env"] if e["name"] != "KUBERNETES_APISERVER_ENDPOINTS"]
        return spec

    main_after = after["spec"]["template"]["spec"]["containers"][0]
    assert {e["name"]: e.get("value") for e in main_after["env"]}[
        "KUBERNETES_APISERVER_ENDPOINTS"
    ] == "192.0.2.1:6443"
    assert [e["name"] for e in main_after["env"]] == [
        "DATASTORE_TYPE",
        "KUBERNETES_APISERVER_ENDPOINTS",
        "NODENAME",
    ]
    assert without_endpoints(after) == without_endpoints(before)
    # The same patch again is a no-op: no new generation.
    again = await kube.patch(f"{base}/calico-node", patch, field_manager="apilane-renderer")
    assert again["metadata"]["generation"] == after["metadata"]["generation"]


async def wait_for_kubernetes_addresses(
    client: KubeClient, expected: set[str], *, timeout: float
) -> None:
    seen: set[str] = set()
    try:
        async with asyncio.timeout(timeout):
            while seen != expected:
                slices = await client.list(
                    KUBERNETES_SLICES, label_selector="kubernetes.io/service-name=kubernetes"
                )
                seen = {
                    a
                    for s in slices["items"]
                    for e in s.get("endpoints") or []
                    for a in e["addresses"]
                }
                if seen != expected:
                    await asyncio.sleep(0.5)
    except TimeoutError:
        pytest.fail(
            f"kubernetes EndpointSlice addresses {sorted(seen)}, expected {sorted(expected)}"
        )


async def test_ha_apiservers_register_their_addresses_and_a_stopped_one_disappears(
    ha_control_plane: HAControlPlane,
) -> None:
    plane = ha_control_plane
    client = await plane.client(0)
    try:
        await wait_for_kubernetes_addresses(client, set(plane.addresses), timeout=45)
        await asyncio.to_thread(plane.stop_apiserver, 2)
        await wait_for_kubernetes_addresses(client, set(plane.addresses[:2]), timeout=45)
    finally:
        await client.close()


def test_ha_network_namespaces_and_links_are_removed_on_stop() -> None:
    plane = HAControlPlane(2)
    try:
        plane.setup_network()
        client = plane.client_namespace()
        namespaces = [plane.switch_netns, client.name]
        assert all(Path(f"/run/netns/{ns}").exists() for ns in namespaces)
        assert Path(f"/sys/class/net/{plane.host_link}").exists()
    finally:
        plane.stop()
    assert not any(Path(f"/run/netns/{ns}").exists() for ns in namespaces)
    assert not Path(f"/sys/class/net/{plane.host_link}").exists()
    assert not plane.work_dir.exists()


def _ask_from(namespace: str, host: str, port: int, ca: str) -> Answer:
    """One HTTPS request made from inside `namespace` (this thread only)."""
    with entered_netns(NetNamespace(namespace)):
        return ask(Target(host, port, "/readyz", ca), tls_context(ca))


async def test_ha_apiservers_each_serve_their_own_certificate_to_client_namespaces(
    ha_control_plane: HAControlPlane,
) -> None:
    plane = ha_control_plane
    client = plane.client_namespace()
    ca = str(plane.ca_path)
    # Every apiserver is reachable from the client namespace at its own address, verified as
    # kubernetes.default.svc, and names itself by its certificate.
    for index, address in enumerate(plane.addresses):
        answer = await asyncio.to_thread(_ask_from, client.name, address, 6443, ca)
        assert (answer.error, answer.status) == ("", 200), answer
        assert answer.server == plane.apiserver_name(index)
    # No default route: the service VIP is unreachable without a connect-time translation.
    vip = await asyncio.to_thread(_ask_from, client.name, "10.96.0.1", 443, ca)
    assert vip.error == "ENETUNREACH", vip
    # Each apiserver holds an endpoint lease in etcd (the reconciler's TTL is 15 s); one
    # that has just become ready may write its first lease a moment later.
    deadline = time.monotonic() + 20
    while True:
        ttls = [plane.lease_ttl(index) for index in range(plane.count)]
        if all(ttl is not None for ttl in ttls) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert all(ttl is not None and 0 < ttl <= 15 for ttl in ttls), ttls
    # Each has an identity Lease of its own (they are named after the hostname).
    kube = await plane.client(0)
    try:
        async with asyncio.timeout(30):
            while True:
                leases = await kube.list(
                    "/apis/coordination.k8s.io/v1/namespaces/kube-system/leases",
                    label_selector="apiserver.kubernetes.io/identity=kube-apiserver",
                )
                if len(leases["items"]) == plane.count:
                    break
                await asyncio.sleep(0.5)
    finally:
        await kube.close()
    hostnames = {
        lease["metadata"]["labels"].get("kubernetes.io/hostname") for lease in leases["items"]
    }
    assert hostnames == {plane.apiserver_name(i) for i in range(plane.count)}
    state = plane.state()
    assert [a["pid"] for a in state["apiservers"]] == [plane.pid(i) for i in range(plane.count)]
    assert all(pid_alive(a["pid"]) for a in state["apiservers"])


async def test_ha_a_killed_apiserver_leaves_when_its_lease_expires_and_a_new_one_joins(
    ha_control_plane: HAControlPlane,
) -> None:
    plane = ha_control_plane
    kube = await plane.client(0)
    try:
        await wait_for_kubernetes_addresses(kube, set(plane.addresses), timeout=45)
        killed_pid = plane.pid(2)
        assert killed_pid is not None
        await asyncio.to_thread(plane.kill_apiserver, 2)
        assert not pid_alive(killed_pid)
        # 15 s lease TTL plus up to 10 s until another apiserver's reconcile notices.
        await wait_for_kubernetes_addresses(kube, set(plane.addresses[:2]), timeout=45)
        assert plane.lease_ttl(2) is None
        added = await asyncio.to_thread(plane.add_apiserver)
        assert added == 3
        assert plane.addresses[3] not in plane.addresses[:3]
        await wait_for_kubernetes_addresses(
            kube, {plane.addresses[0], plane.addresses[1], plane.addresses[3]}, timeout=45
        )
    finally:
        await kube.close()
