"""`apilane doctor` against a real kube-apiserver: each scenario's objects are created for real
(kube-proxy managed by the addon manager, the Service's slices missing, calico-node owned
by the operator or installed from a manifest, EKS-like nodes) and the command's verdicts
and exit code are asserted, in text and JSON; and the node checks on this machine.

The objects the doctor reads have fixed, cluster-wide names (kube-system/kube-proxy,
calico-system/calico-node, the Nodes), so `cluster` removes them before and after each test
(nothing runs a kubelet or a controller here: they are plain objects)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from apilane.cli import doctor_collect
from apilane.cli.doctor_collect import DoctorOptions
from apilane.cli.main import main
from apilane.kube.client import Conflict, KubeClient, KubeError, NotFound
from apilane.testing.kube import (
    ControlPlane,
    delete_kubernetes_endpoint_slices,
    endpoint_slice,
    service_account_token,
)
from apilane.testing.procs import free_port

pytestmark = [pytest.mark.integration, pytest.mark.kube]

DAEMONSETS = "/apis/apps/v1/namespaces/{namespace}/daemonsets"
SLICES = "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices"
NODES = "/api/v1/nodes"
INSTALLATIONS = "/apis/operator.tigera.io/v1/installations"
CRDS = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
APISERVER = "198.18.0.10"
FIXED = ("kube-system/kube-proxy", "calico-system/calico-node", "kube-system/calico-node")
INSTALLATION = {
    "apiVersion": "operator.tigera.io/v1",
    "kind": "Installation",
    "name": "default",
    "uid": "6f1d1c5e-0000-4000-8000-000000000001",
}


async def clear(kube: KubeClient) -> None:
    await delete_kubernetes_endpoint_slices(kube)
    for name in FIXED:
        namespace, _, ds = name.partition("/")
        with contextlib.suppress(NotFound):
            await kube.delete(f"{DAEMONSETS.format(namespace=namespace)}/{ds}")
    for item in (await kube.list(NODES))["items"]:
        with contextlib.suppress(NotFound):
            await kube.delete(f"{NODES}/{item['metadata']['name']}")
    with contextlib.suppress(NotFound):  # also when the CRD is not there
        await kube.delete(f"{INSTALLATIONS}/default")


@pytest.fixture
async def cluster(kube: KubeClient) -> AsyncIterator[KubeClient]:
    with contextlib.suppress(Conflict):  # the namespace outlives a test (no namespace controller)
        await kube.create(
            "/api/v1/namespaces",
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "calico-system"}},
        )
    await clear(kube)
    try:
        yield kube
    finally:
        with contextlib.suppress(KubeError):
            await clear(kube)


def daemonset(
    namespace: str,
    name: str,
    *,
    labels: Mapping[str, str] | None = None,
    owners: Sequence[Mapping[str, str]] = (),
) -> dict[str, Any]:
    selector = {"k8s-app": name}
    metadata: dict[str, Any] = {"name": name, "labels": {**selector, **(labels or {})}}
    if owners:
        metadata["ownerReferences"] = [dict(o) for o in owners]
    container = {"name": name, "image": f"registry.example/{name}:v1"}
    return {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": metadata,
        "spec": {
            "selector": {"matchLabels": selector},
            "template": {"metadata": {"labels": selector}, "spec": {"containers": [container]}},
        },
    }


async def create_daemonset(
    kube: KubeClient, namespace: str, body: dict[str, Any], *, ready: int = 0
) -> None:
    """Create it and, with `ready`, write the status a DaemonSet controller would."""
    collection = DAEMONSETS.format(namespace=namespace)
    created = await kube.create(collection, body)
    if ready:
        created["status"] = {
            "desiredNumberScheduled": ready,
            "currentNumberScheduled": ready,
            "numberReady": ready,
            "numberMisscheduled": 0,
            "observedGeneration": created["metadata"]["generation"],
        }
        await kube.replace(f"{collection}/{body['metadata']['name']}/status", created)


async def create_node(
    kube: KubeClient,
    name: str,
    *,
    ip: str,
    labels: Mapping[str, str] | None = None,
    provider_id: str = "",
    pod_cidr: str = "",
) -> None:
    spec: dict[str, Any] = {}
    if provider_id:
        spec["providerID"] = provider_id
    if pod_cidr:
        spec["podCIDR"], spec["podCIDRs"] = pod_cidr, [pod_cidr]
    body = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": dict(labels or {})},
        "spec": spec,
    }
    created = await kube.create(NODES, body)
    created["status"] = {"addresses": [{"type": "InternalIP", "address": ip}]}
    await kube.replace(f"{NODES}/{name}/status", created)


async def apiserver_slice(kube: KubeClient, address: str) -> int:
    """The kubernetes Service's slice, on the port its targetPort names (the test API
    server's own port); returns that port."""
    service = await kube.get("/api/v1/namespaces/default/services/kubernetes")
    port = int(service["spec"]["ports"][0]["targetPort"])
    await kube.create(SLICES, endpoint_slice("kubernetes", addresses=[address], port=port))
    return port


async def kubeadm_like(kube: KubeClient) -> None:
    """A cluster ready for eBPF: the API server on its control-plane node, kube-proxy ready
    and unmanaged, calico-node installed by the operator."""
    await apiserver_slice(kube, APISERVER)
    await create_node(
        kube,
        "cp-1",
        ip=APISERVER,
        labels={"node-role.kubernetes.io/control-plane": ""},
        pod_cidr="10.244.0.0/24",
    )
    await create_daemonset(kube, "kube-system", daemonset("kube-system", "kube-proxy"), ready=1)
    await create_daemonset(
        kube,
        "calico-system",
        daemonset("calico-system", "calico-node", owners=[INSTALLATION]),
        ready=1,
    )


async def install_installation_crd(kube: KubeClient) -> None:
    """The Tigera operator's Installation CRD (its schema left open), once per control plane."""
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "installations.operator.tigera.io"},
        "spec": {
            "group": "operator.tigera.io",
            "scope": "Cluster",
            "names": {
                "plural": "installations",
                "singular": "installation",
                "kind": "Installation",
            },
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "x-kubernetes-preserve-unknown-fields": True,
                        }
                    },
                }
            ],
        },
    }
    with contextlib.suppress(Conflict):
        await kube.create(CRDS, crd)
    for _ in range(100):
        with contextlib.suppress(NotFound):
            await kube.list(INSTALLATIONS)
            return
        await asyncio.sleep(0.1)
    raise AssertionError("the Installation CRD is not served after 10 s")


async def doctor(
    control_plane: ControlPlane, capsys: pytest.CaptureFixture[str], *args: str
) -> tuple[int, dict[str, dict[str, str]]]:
    """The command's exit code and its checks by name (from --output json)."""
    argv = ["doctor", "--kubeconfig", str(control_plane.kubeconfig_path), "--no-node", *args]
    code = await asyncio.to_thread(main, [*argv, "--output", "json"])
    report = json.loads(capsys.readouterr().out)
    assert report["exit_code"] == code
    return code, {check["name"]: check for check in report["checks"]}


def levels(checks: Mapping[str, Mapping[str, str]]) -> dict[str, str]:
    return {name: check["level"] for name, check in checks.items() if check["level"] != "ok"}


async def test_a_cluster_ready_for_ebpf_is_all_ok_in_text_and_json(
    cluster: KubeClient, control_plane: ControlPlane, capsys: pytest.CaptureFixture[str]
) -> None:
    await kubeadm_like(cluster)
    code, checks = await doctor(control_plane, capsys)
    assert (code, levels(checks)) == (0, {})
    assert (
        f"1 ready endpoint(s) in 1 slice: {APISERVER}:"
        in (checks["kubernetes-endpointslices"]["summary"])
    )
    assert checks["calico-node"]["summary"] == (
        "operator install: calico-system/calico-node (owner: Installation/default)"
    )
    argv = ["--kubeconfig", str(control_plane.kubeconfig_path), "doctor", "--no-node"]
    assert await asyncio.to_thread(main, argv) == 0  # --kubeconfig before the command
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(checks) + 1
    assert lines[0].startswith("ok    kubernetes-service ")
    assert lines[-1] == f"ok: {len(checks)} ok, 0 warn, 0 fail (exit 0)"


async def test_kube_proxy_managed_by_the_addon_manager_warns_and_exits_1(
    cluster: KubeClient, control_plane: ControlPlane, capsys: pytest.CaptureFixture[str]
) -> None:
    await kubeadm_like(cluster)
    await cluster.patch(
        f"{DAEMONSETS.format(namespace='kube-system')}/kube-proxy",
        {"metadata": {"labels": {"addonmanager.kubernetes.io/mode": "Reconcile"}}},
    )
    code, checks = await doctor(control_plane, capsys)
    assert (code, levels(checks)) == (1, {"kube-proxy-manager": "warn"})
    manager = checks["kube-proxy-manager"]
    assert manager["summary"] == (
        "kube-proxy is managed externally: label:addonmanager.kubernetes.io/mode=Reconcile"
    )
    assert "kubeProxyManagement to Disabled" in manager["advice"]


async def test_kube_proxy_applied_by_eks_is_a_manager_the_operator_would_miss(
    cluster: KubeClient, control_plane: ControlPlane, capsys: pytest.CaptureFixture[str]
) -> None:
    await kubeadm_like(cluster)
    # What an EKS add-on looks like: its label, and server-side apply as field manager "eks".
    await cluster.patch(
        f"{DAEMONSETS.format(namespace='kube-system')}/kube-proxy",
        {
            "apiVersion": "apps/v1",
            "kind": "DaemonSet",
            "metadata": {
                "name": "kube-proxy",
                "labels": {"eks.amazonaws.com/component": "kube-proxy"},
            },
        },
        patch_type="apply",
        field_manager="eks",
    )
    code, checks = await doctor(control_plane, capsys)
    assert code == 1
    manager = checks["kube-proxy-manager"]
    assert manager["summary"] == (
        "kube-proxy is managed externally: label:eks.amazonaws.com/component=kube-proxy, "
        "fieldManager:eks(eks)"
    )
    assert "does not recognise" in manager["advice"]


async def test_kube_proxy_management_over_a_managed_kube_proxy_fails(
    cluster: KubeClient, control_plane: ControlPlane, capsys: pytest.CaptureFixture[str]
) -> None:
    """Calico v3.31's third condition: an Installation that would disable a kube-proxy
    someone else manages."""
    await kubeadm_like(cluster)
    await install_installation_crd(cluster)
    network = {"linuxDataplane": "BPF", "kubeProxyManagement": "Enabled"}
    await cluster.create(
        INSTALLATIONS,
        {
            "apiVersion": "operator.tigera.io/v1",
            "kind": "Installation",
            "metadata": {"name": "default"},
            "spec": {"calicoNetwork": network},
        },
    )
    code, checks = await doctor(control_plane, capsys)
    assert (code, levels(checks)) == (0, {})
    assert checks["calico-installation"]["summary"] == (
        "Installation default: linuxDataplane BPF, bpfNetworkBootstrap Disabled, "
        "kubeProxyManagement Enabled"
    )
    await cluster.patch(
        f"{DAEMONSETS.format(namespace='kube-system')}/kube-proxy",
        {"metadata": {"labels": {"app.kubernetes.io/managed-by": "Helm"}}},
    )
    code, checks = await doctor(control_plane, capsys)
    assert code == 2
    assert levels(checks) == {"kube-proxy-manager": "warn", "calico-installation": "fail"}
    assert "set kubeProxyManagement Disabled" in checks["calico-installation"]["advice"]


async def test_missing_service_slices_fail_and_exit_2(
    cluster: KubeClient, control_plane: ControlPlane, capsys: pytest.CaptureFixture[str]
) -> None:
    await kubeadm_like(cluster)
    await delete_kubernetes_endpoint_slices(cluster)
    code, checks = await doctor(control_plane, capsys)
    assert code == 2
    assert levels(checks) == {"kubernetes-endpointslices": "fail", "kubernetes-ports": "warn"}
    assert "endpoint reconciler" in checks["kubernetes-endpointslices"]["advice"]


async def test_a_manifest_install_fails_the_renderer_target_until_it_is_pointed_there(
    cluster: KubeClient, control_plane: ControlPlane, capsys: pytest.CaptureFixture[str]
) -> None:
    await kubeadm_like(cluster)
    await cluster.delete(f"{DAEMONSETS.format(namespace='calico-system')}/calico-node")
    await create_daemonset(cluster, "kube-system", daemonset("kube-system", "calico-node"))
    code, checks = await doctor(control_plane, capsys)
    assert (code, levels(checks)) == (2, {"renderer-target": "fail"})
    assert checks["calico-node"]["summary"].startswith(
        "manifest install: kube-system/calico-node (owner: none)"
    )
    code, checks = await doctor(control_plane, capsys, "--daemonset", "kube-system/calico-node")
    assert (code, levels(checks)) == (0, {})


async def test_calico_system_without_the_operator_and_no_kube_proxy_warn(
    cluster: KubeClient, control_plane: ControlPlane, capsys: pytest.CaptureFixture[str]
) -> None:
    await kubeadm_like(cluster)
    await cluster.delete(f"{DAEMONSETS.format(namespace='kube-system')}/kube-proxy")
    await cluster.delete(f"{DAEMONSETS.format(namespace='calico-system')}/calico-node")
    await create_daemonset(cluster, "calico-system", daemonset("calico-system", "calico-node"))
    code, checks = await doctor(control_plane, capsys)
    assert (code, levels(checks)) == (1, {"kube-proxy": "warn", "calico-node": "warn"})
    assert "tigera-operator/tigera-operator is missing" in checks["calico-node"]["summary"]


async def test_eks_like_nodes_and_an_external_api_server_warn(
    cluster: KubeClient, control_plane: ControlPlane, capsys: pytest.CaptureFixture[str]
) -> None:
    await apiserver_slice(cluster, "198.51.100.20")
    for index in (1, 2):
        await create_node(
            cluster,
            f"ip-10-0-1-{index}.ec2.internal",
            ip=f"10.0.1.{index}",
            labels={"eks.amazonaws.com/nodegroup": "ng-1"},
            provider_id=f"aws:///us-east-1a/i-0{index}",
        )
    await create_daemonset(
        cluster,
        "kube-system",
        daemonset(
            "kube-system", "kube-proxy", labels={"eks.amazonaws.com/component": "kube-proxy"}
        ),
        ready=2,
    )
    await create_daemonset(
        cluster,
        "calico-system",
        daemonset("calico-system", "calico-node", owners=[INSTALLATION]),
        ready=2,
    )
    code, checks = await doctor(control_plane, capsys)
    assert code == 1
    assert levels(checks) == {
        "kube-proxy-manager": "warn",
        "managed-provider": "warn",
        "apiserver-location": "warn",
    }
    assert checks["managed-provider"]["summary"] == (
        "managed Kubernetes: eks (label:eks.amazonaws.com/nodegroup on node "
        "ip-10-0-1-1.ec2.internal)"
    )
    assert checks["apiserver-location"]["summary"] == (
        "API server endpoint(s) outside the node and pod addresses: 198.51.100.20"
    )


async def test_the_context_flag_picks_the_kubeconfig_context(
    cluster: KubeClient,
    control_plane: ControlPlane,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    await kubeadm_like(cluster)
    config = yaml.safe_load(control_plane.kubeconfig_path.read_text())
    good = config["current-context"]
    cluster_entry = dict(config["clusters"][0])
    cluster_entry["name"] = "nowhere"
    cluster_entry["cluster"] = {
        **cluster_entry["cluster"],
        "server": f"https://127.0.0.1:{free_port()}",
    }
    config["clusters"].append(cluster_entry)
    user = config["contexts"][0]["context"]["user"]
    config["contexts"].append({"name": "nowhere", "context": {"cluster": "nowhere", "user": user}})
    config["current-context"] = "nowhere"
    path = tmp_path / "two-contexts.kubeconfig"
    path.write_text(yaml.safe_dump(config))

    argv = ["doctor", "--kubeconfig", str(path), "--no-node", "--output", "json"]
    assert await asyncio.to_thread(main, argv) == 2
    report = json.loads(capsys.readouterr().out)
    assert [c["name"] for c in report["checks"]] == ["api-access"]
    assert report["checks"][0]["summary"].startswith("cannot read the cluster:")
    assert await asyncio.to_thread(main, [*argv, "--context", good]) == 0
    capsys.readouterr()


async def test_the_node_checks_read_this_machine(
    cluster: KubeClient, control_plane: ControlPlane, capsys: pytest.CaptureFixture[str]
) -> None:
    """`make setup` mounts bpffs; this kernel has cgroup v2 and headers bcc compiles with."""
    await kubeadm_like(cluster)
    argv = ["doctor", "--kubeconfig", str(control_plane.kubeconfig_path), "--output", "json"]
    code = await asyncio.to_thread(main, argv)
    checks = {c["name"]: c for c in json.loads(capsys.readouterr().out)["checks"]}
    assert {name: checks[name]["level"] for name in ("bpffs", "cgroup2", "kernel")} == {
        "bpffs": "ok",
        "cgroup2": "ok",
        "kernel": "ok",
    }
    assert checks["kernel-headers"]["level"] in ("ok", "warn")  # a mismatch only warns
    assert code == (1 if checks["kernel-headers"]["level"] == "warn" else 0)


RBAC = "/apis/rbac.authorization.k8s.io/v1"


def cluster_role(name: str, reads: Sequence[tuple[str, str, str]]) -> dict[str, Any]:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": name},
        "rules": [
            {"apiGroups": [group], "resources": [resource], "verbs": [verb]}
            for group, resource, verb in reads
        ],
    }


async def doctor_in_a_pod(mounted: Path, control_plane: ControlPlane) -> dict[str, Any]:
    environ = {
        "KUBERNETES_SERVICE_HOST": "127.0.0.1",
        "KUBERNETES_SERVICE_PORT": str(control_plane.apiserver.port),
    }
    out = io.StringIO()
    options = DoctorOptions(node=False, as_json=True, in_cluster_dir=mounted)
    code = await doctor_collect.run(options, out=out, environ=environ)
    report: dict[str, Any] = json.loads(out.getvalue())
    assert report["exit_code"] == code
    return report


async def test_in_a_pod_it_reads_as_its_service_account_with_only_the_documented_rules(
    cluster: KubeClient,
    kube_namespace: str,
    control_plane: ControlPlane,
    tmp_path: Path,
) -> None:
    await kubeadm_like(cluster)
    await install_installation_crd(cluster)
    role = f"apilane-doctor-{kube_namespace}"
    await cluster.create(f"{RBAC}/clusterroles", cluster_role(role, doctor_collect.READS))
    subject = {"kind": "ServiceAccount", "name": "doctor", "namespace": kube_namespace}
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": role},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
        "subjects": [subject],
    }
    await cluster.create(f"{RBAC}/clusterrolebindings", binding)
    mounted = tmp_path / "serviceaccount"
    mounted.mkdir()
    (mounted / "ca.crt").write_bytes(control_plane.pki.ca_pem)
    (mounted / "token").write_text(await service_account_token(cluster, kube_namespace, "doctor"))
    try:
        report = await doctor_in_a_pod(mounted, control_plane)
        assert report["result"] == "ok", report
        # One read fewer (Nodes) and the doctor says it cannot read the cluster.
        without_nodes = [r for r in doctor_collect.READS if r[1] != "nodes"]
        current = await cluster.get(f"{RBAC}/clusterroles/{role}")
        await cluster.replace(
            f"{RBAC}/clusterroles/{role}",
            cluster_role(role, without_nodes) | {"metadata": current["metadata"]},
        )
        for _ in range(50):  # the authorizer sees the change through its informer
            report = await doctor_in_a_pod(mounted, control_plane)
            if report["exit_code"] == 2:
                break
            await asyncio.sleep(0.1)
        assert [c["name"] for c in report["checks"]] == ["api-access"]
        assert "403 Forbidden" in report["checks"][0]["summary"]
        assert "nodes" in report["checks"][0]["summary"]
    finally:
        for kind in ("clusterrolebindings", "clusterroles"):
            with contextlib.suppress(NotFound):
                await cluster.delete(f"{RBAC}/{kind}/{role}")


async def test_doctor_takes_no_nats_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert await asyncio.to_thread(main, ["doctor", "--nats-url", "nats://x:4222"]) == 2
    assert "doctor reads the API server only" in capsys.readouterr().err
