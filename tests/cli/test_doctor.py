"""`apilane doctor`'s pure core: collected facts in, one verdict per check out, and the exit
code of the worst. Every check's every outcome, on API objects shaped as the server sends them."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from apilane.cli import doctor
from apilane.cli.doctor import Check, ClusterFacts, Level, Mount, NodeFacts
from apilane.cli.doctor_collect import headers_release, kubeconfig_files, parse_mountinfo
from apilane.testing.kube import endpoint_slice

pytestmark = [pytest.mark.unit]

Obj = dict[str, Any]


def service(*ips: str, port: int = 443, target: int | str = 6443) -> Obj:
    return {
        "metadata": {"name": "kubernetes", "namespace": "default"},
        "spec": {
            "clusterIP": ips[0] if ips else None,
            "clusterIPs": list(ips),
            "ports": [{"name": "https", "port": port, "protocol": "TCP", "targetPort": target}],
        },
    }


def daemonset(
    namespace: str,
    name: str,
    *,
    labels: Mapping[str, str] | None = None,
    annotations: Mapping[str, str] | None = None,
    owners: Sequence[Obj] = (),
    managers: Sequence[str] = (),
    node_selector: Mapping[str, str] | None = None,
    ready: int = 2,
    desired: int = 2,
) -> Obj:
    metadata: Obj = {
        "name": name,
        "namespace": namespace,
        "generation": 1,
        "labels": dict(labels or {}),
        "annotations": dict(annotations or {}),
    }
    if owners:
        metadata["ownerReferences"] = list(owners)
    if managers:
        metadata["managedFields"] = [{"manager": m, "operation": "Apply"} for m in managers]
    return {
        "metadata": metadata,
        "spec": {"template": {"spec": {"nodeSelector": dict(node_selector or {})}}},
        "status": {
            "desiredNumberScheduled": desired,
            "numberReady": ready,
            "observedGeneration": 1,
        },
    }


def node(
    name: str,
    *,
    ip: str = "",
    pod_cidr: str = "",
    labels: Mapping[str, str] | None = None,
    provider_id: str = "",
) -> Obj:
    spec: Obj = {}
    if pod_cidr:
        spec["podCIDR"], spec["podCIDRs"] = pod_cidr, [pod_cidr]
    if provider_id:
        spec["providerID"] = provider_id
    addresses = [{"type": "Hostname", "address": name}]
    if ip:
        addresses.append({"type": "InternalIP", "address": ip})
    return {
        "metadata": {"name": name, "labels": dict(labels or {})},
        "spec": spec,
        "status": {"addresses": addresses},
    }


INSTALLATION = {"apiVersion": "operator.tigera.io/v1", "kind": "Installation", "name": "default"}
CONTROL_PLANE = {"node-role.kubernetes.io/control-plane": ""}


def healthy(**changes: Any) -> ClusterFacts:
    """A kubeadm cluster ready for eBPF: one API server on its control-plane node, kube-proxy
    ready and unmanaged, calico-node installed by the operator."""
    facts: dict[str, Any] = {
        "service": service("10.96.0.1"),
        "endpoint_slices": [endpoint_slice("kubernetes", addresses=["192.0.2.10"])],
        "kube_proxy": daemonset("kube-system", "kube-proxy", labels={"k8s-app": "kube-proxy"}),
        "nodes": [
            node("cp-1", ip="192.0.2.10", pod_cidr="10.244.0.0/24", labels=CONTROL_PLANE),
            node("worker-1", ip="192.0.2.11", pod_cidr="10.244.1.0/24"),
        ],
        "calico_nodes": {
            doctor.OPERATOR_CALICO_NODE: daemonset(
                "calico-system", "calico-node", owners=[INSTALLATION]
            )
        },
    }
    facts.update(changes)
    return ClusterFacts(**facts)


def by_name(checks: Sequence[Check]) -> dict[str, Check]:
    return {check.name: check for check in checks}


def verdict(facts: ClusterFacts, name: str) -> Check:
    return by_name(doctor.cluster_checks(facts))[name]


# --------------------------------------------------------------------------- exit code


@pytest.mark.parametrize(
    ("levels", "code"),
    [
        ((), 0),
        ((Level.OK, Level.OK), 0),
        ((Level.OK, Level.WARN), 1),
        ((Level.WARN, Level.FAIL, Level.OK), 2),
    ],
)
def test_the_exit_code_is_the_worst_result(levels: tuple[Level, ...], code: int) -> None:
    assert doctor.exit_code(Check(f"c{i}", level, "") for i, level in enumerate(levels)) == code


def test_a_cluster_ready_for_ebpf_passes_every_check() -> None:
    checks = doctor.cluster_checks(healthy())
    assert [c.name for c in checks] == [
        "kubernetes-service",
        "kubernetes-endpointslices",
        "kubernetes-ports",
        "address-families",
        "kube-proxy",
        "kube-proxy-ready",
        "kube-proxy-manager",
        "managed-provider",
        "apiserver-location",
        "calico-node",
        "calico-installation",
        "renderer-target",
    ]
    assert {c.name: c.level for c in checks if c.level is not Level.OK} == {}
    assert all(c.advice == "" for c in checks)
    assert doctor.exit_code(checks) == 0
    found = by_name(checks)
    assert found["kubernetes-service"].summary == "Service default/kubernetes: 10.96.0.1:443 (IPv4)"
    assert (
        "1 ready endpoint(s) in 1 slice: 192.0.2.10:6443"
        in found["kubernetes-endpointslices"].summary
    )
    assert found["kubernetes-ports"].summary == "Service 443/TCP -> endpoints 6443/TCP"
    assert found["address-families"].summary == "IPv4 (single-stack)"
    assert found["calico-node"].summary.endswith("(owner: Installation/default)")


# --------------------------------------------------------------------------- the Service and slices


def test_a_missing_kubernetes_service_fails() -> None:
    check = verdict(healthy(service=None), "kubernetes-service")
    assert check.level is Level.FAIL
    assert "does not exist" in check.summary and "kube-apiserver" in check.advice


def test_a_service_without_a_cluster_ip_fails() -> None:
    check = verdict(healthy(service=service("None")), "kubernetes-service")
    assert (check.level, check.summary) == (
        Level.FAIL,
        "Service default/kubernetes has no usable cluster IP and port",
    )


def test_no_endpoint_slices_fail_and_say_who_writes_them() -> None:
    check = verdict(healthy(endpoint_slices=[]), "kubernetes-endpointslices")
    assert check.level is Level.FAIL
    assert "endpoint reconciler" in check.advice


def test_slices_without_a_ready_endpoint_fail() -> None:
    slices = [endpoint_slice("kubernetes", addresses=["192.0.2.10"], ready=False)]
    check = verdict(healthy(endpoint_slices=slices), "kubernetes-endpointslices")
    assert (check.level, check.summary) == (Level.FAIL, "no ready API server endpoint in 1 slice")


def test_only_terminating_endpoints_warn() -> None:
    slices = [
        endpoint_slice(
            "kubernetes", addresses=["192.0.2.10"], ready=False, serving=True, terminating=True
        )
    ]
    check = verdict(healthy(endpoint_slices=slices), "kubernetes-endpointslices")
    assert check.level is Level.WARN
    assert "only terminating ones" in check.summary and "192.0.2.10:6443" in check.summary


def test_entries_the_data_plane_cannot_program_warn_with_the_first_one() -> None:
    slices = [endpoint_slice("kubernetes", addresses=["192.0.2.10", "127.0.0.1"])]
    check = verdict(healthy(endpoint_slices=slices), "kubernetes-ports")
    assert check.level is Level.WARN
    assert "1 entry(ies) left out" in check.summary and "127.0.0.1" in check.summary


def test_slice_ports_that_do_not_match_the_target_port_leave_nothing_to_program() -> None:
    slices = [endpoint_slice("kubernetes", addresses=["192.0.2.10"], port=8443, port_name="x")]
    checks = by_name(doctor.cluster_checks(healthy(endpoint_slices=slices)))
    assert checks["kubernetes-ports"].level is Level.WARN
    assert (
        "no slice port matches the Service's targetPort 6443" in checks["kubernetes-ports"].summary
    )
    assert checks["kubernetes-endpointslices"].level is Level.FAIL


def test_a_slice_of_an_unsupported_address_type_warns() -> None:
    slices = [
        endpoint_slice("kubernetes", addresses=["192.0.2.10"]),
        endpoint_slice("kubernetes-fqdn", addresses=["api.example"], address_type="FQDN"),
    ]
    check = verdict(healthy(endpoint_slices=slices), "kubernetes-ports")
    assert check.level is Level.WARN and "addressType 'FQDN'" in check.summary


def test_ipv6_endpoints_behind_an_ipv4_only_service_fail() -> None:
    slices = [endpoint_slice("kubernetes", addresses=["2001:db8::10"], address_type="IPv6")]
    check = verdict(healthy(endpoint_slices=slices), "address-families")
    assert check.level is Level.FAIL
    assert "IPv4 cluster IPs but the API server endpoints are IPv6" in check.summary
    assert "init container" in check.advice


def test_a_dual_stack_service_and_endpoints_pass() -> None:
    slices = [
        endpoint_slice("kubernetes", addresses=["192.0.2.10"]),
        endpoint_slice("kubernetes-v6", addresses=["2001:db8::10"], address_type="IPv6"),
    ]
    facts = healthy(service=service("10.96.0.1", "fd00::1"), endpoint_slices=slices)
    checks = by_name(doctor.cluster_checks(facts))
    assert (checks["address-families"].level, checks["address-families"].summary) == (
        Level.OK,
        "IPv4+IPv6 (dual-stack)",
    )
    assert "[2001:db8::10]:6443" in checks["kubernetes-endpointslices"].summary
    assert checks["kubernetes-service"].summary.endswith("(IPv4+IPv6)")


# --------------------------------------------------------------------------- kube-proxy


def static_pod(name: str) -> Obj:
    return {
        "metadata": {
            "name": name,
            "namespace": "kube-system",
            "annotations": {"kubernetes.io/config.mirror": "abc"},
            "ownerReferences": [{"kind": "Node", "name": name.removeprefix("kube-proxy-")}],
        }
    }


def test_kube_proxy_turned_off_by_calicos_operator_is_fine() -> None:
    ds = daemonset(
        "kube-system", "kube-proxy", node_selector={doctor.DISABLE_KUBE_PROXY_SELECTOR: "true"}
    )
    check = verdict(healthy(kube_proxy=ds), "kube-proxy")
    assert check.level is Level.OK and "disabled by Calico's operator" in check.summary


def test_kube_proxy_as_static_pods_warns_that_the_operator_cannot_turn_it_off() -> None:
    facts = healthy(
        kube_proxy=None, kube_proxy_pods=[static_pod("kube-proxy-n1"), static_pod("kube-proxy-n2")]
    )
    checks = by_name(doctor.cluster_checks(facts))
    assert checks["kube-proxy"].level is Level.WARN
    assert "2 static pod(s)" in checks["kube-proxy"].summary
    assert "manifest" in checks["kube-proxy"].advice
    assert checks["kube-proxy-ready"].level is Level.OK
    assert checks["kube-proxy-manager"].level is Level.OK


def test_pods_of_a_daemonset_are_not_static_pods() -> None:
    pod = {
        "metadata": {
            "name": "kube-proxy-x",
            "ownerReferences": [{"kind": "DaemonSet", "name": "kube-proxy"}],
        }
    }
    facts = healthy(kube_proxy=None, kube_proxy_pods=[pod], calico_nodes={})
    assert verdict(facts, "kube-proxy").level is Level.FAIL


def test_no_kube_proxy_beside_calico_node_warns() -> None:
    check = verdict(healthy(kube_proxy=None), "kube-proxy")
    assert check.level is Level.WARN and "Calico's eBPF data plane" in check.advice


def test_no_kube_proxy_and_no_calico_fails() -> None:
    check = verdict(healthy(kube_proxy=None, calico_nodes={}), "kube-proxy")
    assert (
        check.level is Level.FAIL and "nothing implements the kubernetes Service" in check.summary
    )


def test_kube_proxy_with_pods_not_ready_warns() -> None:
    ds = daemonset("kube-system", "kube-proxy", ready=1, desired=3)
    check = verdict(healthy(kube_proxy=ds), "kube-proxy-ready")
    assert (check.level, check.summary.split(" (")[0]) == (
        Level.WARN,
        "1 of 3 kube-proxy pods ready",
    )


@pytest.mark.parametrize(
    ("labels", "annotations", "owners", "managers", "marker", "operator_sees_it"),
    [
        (
            {"addonmanager.kubernetes.io/mode": "Reconcile"},
            {},
            [],
            [],
            "label:addonmanager.kubernetes.io/mode=Reconcile",
            True,
        ),
        (
            {"app.kubernetes.io/managed-by": "Helm"},
            {},
            [],
            [],
            "label:app.kubernetes.io/managed-by=Helm",
            True,
        ),
        (
            {},
            {"argocd.argoproj.io/tracking-id": "a:apps/DaemonSet:kube-system/kube-proxy"},
            [],
            [],
            "annotation:argocd.argoproj.io/tracking-id",
            True,
        ),
        (
            {"kustomize.toolkit.fluxcd.io/name": "infra"},
            {},
            [],
            [],
            "label:kustomize.toolkit.fluxcd.io/name=infra",
            False,
        ),
        (
            {"helm.toolkit.fluxcd.io/name": "kp"},
            {},
            [],
            [],
            "label:helm.toolkit.fluxcd.io/name=kp",
            False,
        ),
        (
            {"eks.amazonaws.com/component": "kube-proxy"},
            {},
            [],
            [],
            "label:eks.amazonaws.com/component=kube-proxy",
            False,
        ),
        (
            {"kubernetes.azure.com/managedby": "aks"},
            {},
            [],
            [],
            "label:kubernetes.azure.com/managedby=aks",
            False,
        ),
        (
            {"kubernetes.io/cluster-service": "true"},
            {},
            [],
            [],
            "label:kubernetes.io/cluster-service=true",
            False,
        ),
        (
            {"helm.sh/chart": "kube-proxy-1.0"},
            {},
            [],
            [],
            "label:helm.sh/chart=kube-proxy-1.0",
            False,
        ),
        (
            {},
            {"meta.helm.sh/release-name": "kp"},
            [],
            [],
            "annotation:meta.helm.sh/release-name",
            False,
        ),
        (
            {},
            {},
            [{"kind": "Addon", "name": "kube-proxy"}],
            [],
            "ownerReference:Addon/kube-proxy",
            False,
        ),
        ({}, {}, [], ["eks", "kubectl"], "fieldManager:eks(eks)", False),
    ],
)
def test_every_known_manager_of_kube_proxy_is_named(
    labels: dict[str, str],
    annotations: dict[str, str],
    owners: list[Obj],
    managers: list[str],
    marker: str,
    operator_sees_it: bool,
) -> None:
    ds = daemonset(
        "kube-system",
        "kube-proxy",
        labels=labels,
        annotations=annotations,
        owners=owners,
        managers=managers,
    )
    assert doctor.management_markers(ds) == [marker]
    check = verdict(healthy(kube_proxy=ds), "kube-proxy-manager")
    assert check.level is Level.WARN
    assert check.summary == f"kube-proxy is managed externally: {marker}"
    assert "kubeProxyManagement to Disabled" in check.advice
    assert "bpfKubeProxyIptablesCleanupEnabled to false" in check.advice
    assert ("does not recognise" in check.advice) is not operator_sees_it


def test_a_field_manager_nobody_owns_is_no_marker() -> None:
    ds = daemonset("kube-system", "kube-proxy", managers=["kubeadm", "kube-controller-manager"])
    assert doctor.management_markers(ds) == []
    assert verdict(healthy(kube_proxy=ds), "kube-proxy-manager").level is Level.OK


def test_several_markers_are_all_named_in_order() -> None:
    ds = daemonset(
        "kube-system",
        "kube-proxy",
        labels={
            "eks.amazonaws.com/component": "kube-proxy",
            "addonmanager.kubernetes.io/mode": "Reconcile",
        },
    )
    check = verdict(healthy(kube_proxy=ds), "kube-proxy-manager")
    assert check.summary.endswith(
        "label:addonmanager.kubernetes.io/mode=Reconcile, "
        "label:eks.amazonaws.com/component=kube-proxy"
    )
    # The operator sees one of them, so it would leave kube-proxy alone.
    assert "does not recognise" not in check.advice


# --------------------------------------------------------------------------- provider and location


@pytest.mark.parametrize(
    ("labels", "provider_id", "provider"),
    [
        ({"eks.amazonaws.com/nodegroup": "ng-1"}, "aws:///us-east-1a/i-0123", "eks"),
        ({"cloud.google.com/gke-nodepool": "default-pool"}, "gce://p/z/n", "gke"),
        ({"kubernetes.azure.com/cluster": "MC_rg"}, "azure:///subscriptions/x", "aks"),
        ({}, "aws:///us-east-1a/i-0123", "aws"),
    ],
)
def test_a_managed_offering_is_named_with_its_marker(
    labels: dict[str, str], provider_id: str, provider: str
) -> None:
    nodes = [node("n1", ip="10.0.1.5", labels=labels, provider_id=provider_id)]
    check = verdict(healthy(nodes=nodes), "managed-provider")
    assert check.level is Level.WARN
    assert check.summary.startswith(f"managed Kubernetes: {provider} (")
    assert "on node n1" in check.summary and "outside the cluster" in check.advice


def test_a_cloud_provider_id_beside_a_control_plane_node_is_self_managed() -> None:
    nodes = [
        node("cp", ip="192.0.2.10", labels=CONTROL_PLANE, provider_id="aws:///a/i-1"),
        node("w", ip="192.0.2.11", provider_id="aws:///a/i-2"),
    ]
    assert verdict(healthy(nodes=nodes), "managed-provider").level is Level.OK


def test_an_api_server_inside_a_pod_cidr_is_in_the_cluster() -> None:
    slices = [endpoint_slice("kubernetes", addresses=["10.244.1.7"])]
    check = verdict(healthy(endpoint_slices=slices), "apiserver-location")
    assert check.level is Level.OK and "10.244.1.7" in check.summary


def test_an_api_server_outside_the_node_and_pod_addresses_warns() -> None:
    slices = [endpoint_slice("kubernetes", addresses=["192.0.2.10", "198.51.100.7"])]
    check = verdict(healthy(endpoint_slices=slices), "apiserver-location")
    assert check.level is Level.WARN
    assert (
        check.summary == "API server endpoint(s) outside the node and pod addresses: 198.51.100.7"
    )


def test_without_nodes_the_location_is_unknown() -> None:
    check = verdict(healthy(nodes=[]), "apiserver-location")
    assert check.level is Level.WARN and "cannot tell" in check.summary


def test_without_endpoints_there_is_nothing_to_locate() -> None:
    assert verdict(healthy(endpoint_slices=[]), "apiserver-location").level is Level.OK


def test_unparseable_node_addresses_and_cidrs_are_skipped() -> None:
    bad = node("n", ip="not-an-ip", pod_cidr="10.244.0.0/99")
    check = verdict(healthy(nodes=[bad]), "apiserver-location")
    assert check.level is Level.WARN and "cannot tell" in check.summary


# --------------------------------------------------------------------------- calico-node


def test_no_calico_node_warns() -> None:
    facts = healthy(calico_nodes={})
    checks = by_name(doctor.cluster_checks(facts))
    assert checks["calico-node"].level is Level.WARN
    assert doctor.calico_node_layout(facts) == "none"
    assert checks["renderer-target"].level is Level.OK
    assert "not there yet" in checks["renderer-target"].summary


def test_a_manifest_install_is_named_and_the_renderer_pointed_at_it() -> None:
    manifest = {doctor.MANIFEST_CALICO_NODE: daemonset("kube-system", "calico-node")}
    facts = healthy(calico_nodes=manifest)
    checks = by_name(doctor.cluster_checks(facts))
    assert doctor.calico_node_layout(facts) == "manifest"
    assert checks["calico-node"].level is Level.OK
    assert checks["calico-node"].summary.startswith(
        "manifest install: kube-system/calico-node (owner: none)"
    )
    # The renderer still targets calico-system: it would patch nothing.
    assert checks["renderer-target"].level is Level.FAIL
    assert "= kube-system/calico-node" in checks["renderer-target"].advice
    pointed = healthy(calico_nodes=manifest, renderer_target=doctor.MANIFEST_CALICO_NODE)
    assert verdict(pointed, "renderer-target").level is Level.OK


def test_calico_system_without_the_operator_warns() -> None:
    orphan = {doctor.OPERATOR_CALICO_NODE: daemonset("calico-system", "calico-node")}
    check = verdict(healthy(calico_nodes=orphan), "calico-node")
    assert (
        check.level is Level.WARN and "tigera-operator/tigera-operator is missing" in check.summary
    )
    with_operator = healthy(
        calico_nodes=orphan, tigera_operator={"metadata": {"name": "tigera-operator"}}
    )
    assert verdict(with_operator, "calico-node").level is Level.OK


def test_two_calico_node_daemonsets_warn() -> None:
    both = {
        doctor.OPERATOR_CALICO_NODE: daemonset(
            "calico-system", "calico-node", owners=[INSTALLATION]
        ),
        doctor.MANIFEST_CALICO_NODE: daemonset("kube-system", "calico-node"),
    }
    facts = healthy(calico_nodes=both)
    assert doctor.calico_node_layout(facts) == "both"
    assert verdict(facts, "calico-node").level is Level.WARN


def installation(**network: str) -> Obj:
    return {"metadata": {"name": "default"}, "spec": {"calicoNetwork": network}}


def test_an_installation_with_the_defaults_is_named() -> None:
    check = verdict(healthy(installation={"metadata": {"name": "default"}}), "calico-installation")
    assert (check.level, check.summary) == (
        Level.OK,
        "Installation default: linuxDataplane Iptables, bpfNetworkBootstrap Disabled, "
        "kubeProxyManagement Disabled",
    )
    assert verdict(healthy(), "calico-installation").summary.startswith("no Tigera operator")


def test_kube_proxy_management_over_an_externally_managed_kube_proxy_fails() -> None:
    managed = daemonset(
        "kube-system", "kube-proxy", labels={"addonmanager.kubernetes.io/mode": "Reconcile"}
    )
    facts = healthy(kube_proxy=managed, installation=installation(kubeProxyManagement="Enabled"))
    check = verdict(facts, "calico-installation")
    assert check.level is Level.FAIL
    assert "managed by label:addonmanager.kubernetes.io/mode=Reconcile" in check.summary
    assert "set kubeProxyManagement Disabled" in check.advice
    unmanaged = healthy(installation=installation(kubeProxyManagement="Enabled"))
    assert verdict(unmanaged, "calico-installation").level is Level.OK


@pytest.mark.parametrize(
    ("network", "changes", "expected"),
    [
        ({"bpfNetworkBootstrap": "Enabled"}, {}, "with linuxDataplane Iptables"),
        (
            {"bpfNetworkBootstrap": "Enabled", "linuxDataplane": "BPF"},
            {"kube_proxy": None},
            "no kube-proxy DaemonSet",
        ),
        (
            {"bpfNetworkBootstrap": "Enabled", "linuxDataplane": "BPF"},
            {},
            "both write KUBERNETES_SERVICE_IPS_PORTS",
        ),
    ],
)
def test_the_automatic_bootstrap_warns_where_its_conditions_do_not_hold(
    network: dict[str, str], changes: dict[str, Any], expected: str
) -> None:
    check = verdict(healthy(installation=installation(**network), **changes), "calico-installation")
    assert check.level is Level.WARN and expected in check.summary


def test_the_bootstrap_beside_a_renderer_aimed_elsewhere_is_fine() -> None:
    facts = healthy(
        installation=installation(bpfNetworkBootstrap="Enabled", linuxDataplane="BPF"),
        renderer_target="apilane-test/calico-node",
    )
    check = verdict(facts, "calico-installation")
    assert check.level is Level.OK and "bpfNetworkBootstrap Enabled" in check.summary


def test_access_failure_is_one_failed_check() -> None:
    check = doctor.access_failed("401 Unauthorized: nope")
    assert (check.name, check.level) == ("api-access", Level.FAIL)
    assert "401 Unauthorized" in check.summary and "--kubeconfig" in check.advice


# --------------------------------------------------------------------------- the node


def node_facts(**changes: Any) -> NodeFacts:
    facts: dict[str, Any] = {
        "mounts": [
            Mount(point="/sys/fs/cgroup", fstype="cgroup2"),
            Mount(point="/sys/fs/bpf", fstype="bpf"),
        ],
        "kernel_release": "6.1.0-57-amd64",
        "headers_dir": "/lib/modules/6.1.0-57-amd64/build",
        "headers_present": True,
        "headers_release": "6.1.0-57-amd64",
    }
    facts.update(changes)
    return NodeFacts(**facts)


def node_verdict(facts: NodeFacts, name: str) -> Check:
    return by_name(doctor.node_checks(facts))[name]


def test_a_node_ready_for_the_loader_passes() -> None:
    checks = doctor.node_checks(node_facts())
    assert [(c.name, c.level) for c in checks] == [
        ("bpffs", Level.OK),
        ("cgroup2", Level.OK),
        ("kernel", Level.OK),
        ("kernel-headers", Level.OK),
    ]
    assert "(unified)" in checks[1].summary


def test_no_bpffs_fails_and_a_bpf_mount_elsewhere_does_not_count() -> None:
    mounts = [
        Mount(point="/sys/fs/cgroup", fstype="cgroup2"),
        Mount(point="/run/bpf", fstype="bpf"),
    ]
    check = node_verdict(node_facts(mounts=mounts), "bpffs")
    assert check.level is Level.FAIL and "mount -t bpf bpffs /sys/fs/bpf" in check.advice


def test_a_hybrid_cgroup_layout_passes_and_none_fails() -> None:
    hybrid = [
        Mount(point="/sys/fs/cgroup", fstype="tmpfs"),
        Mount(point="/sys/fs/cgroup/unified", fstype="cgroup2"),
    ]
    check = node_verdict(node_facts(mounts=hybrid), "cgroup2")
    assert (check.level, check.summary) == (
        Level.OK,
        "cgroup v2 at /sys/fs/cgroup/unified (hybrid)",
    )
    v1 = [Mount(point="/sys/fs/cgroup/cpu", fstype="cgroup")]
    assert node_verdict(node_facts(mounts=v1), "cgroup2").level is Level.FAIL


@pytest.mark.parametrize(
    ("release", "level"),
    [
        ("6.18.44-fc-v973", Level.OK),
        ("5.8.0", Level.OK),
        ("5.15.0-91-generic", Level.OK),
        ("5.4.0-150-generic", Level.FAIL),
        ("4.19.0", Level.FAIL),
        ("weird", Level.WARN),
    ],
)
def test_the_kernel_must_have_every_hook(release: str, level: Level) -> None:
    check = node_verdict(node_facts(kernel_release=release, headers_release=release), "kernel")
    assert check.level is level
    if level is not Level.OK:
        assert "5.8" in check.advice


def test_headers_for_another_kernel_warn() -> None:
    check = node_verdict(node_facts(kernel_release="6.18.44-fc-v973"), "kernel-headers")
    assert check.level is Level.WARN
    assert "headers for 6.1.0-57-amd64, not for the running 6.18.44-fc-v973" in check.summary
    assert "linux-headers-6.18.44-fc-v973" in check.advice


def test_headers_of_unknown_release_are_taken_as_they_are() -> None:
    assert node_verdict(node_facts(headers_release=""), "kernel-headers").level is Level.OK


def test_kheaders_stand_in_for_missing_headers_and_neither_fails() -> None:
    kheaders = node_facts(headers_present=False, headers_release="", kheaders=True)
    assert node_verdict(kheaders, "kernel-headers").level is Level.OK
    none = node_verdict(node_facts(headers_present=False, headers_release=""), "kernel-headers")
    assert none.level is Level.FAIL and "linux-headers-6.1.0-57-amd64" in none.advice


def test_mountinfo_is_parsed_with_escapes_and_optional_fields() -> None:
    text = (
        "31 23 0:28 / /sys/fs/cgroup rw,relatime - cgroup2 cgroup2 rw\n"
        "42 23 0:39 / /sys/fs/bpf rw,relatime shared:9 master:2 - bpf bpf rw\n"
        "50 23 0:40 / /mnt/with\\040space rw - tmpfs tmpfs rw\n"
        "garbage line\n"
    )
    assert parse_mountinfo(text) == [
        Mount(point="/sys/fs/cgroup", fstype="cgroup2"),
        Mount(point="/sys/fs/bpf", fstype="bpf"),
        Mount(point="/mnt/with space", fstype="tmpfs"),
    ]


def test_the_headers_release_comes_from_utsrelease_or_kernel_release(tmp_path: Path) -> None:
    generated = tmp_path / "a" / "include" / "generated"
    generated.mkdir(parents=True)
    (generated / "utsrelease.h").write_text('#define UTS_RELEASE "6.1.0-57-amd64"\n')
    assert headers_release(tmp_path / "a") == "6.1.0-57-amd64"
    config = tmp_path / "b" / "include" / "config"
    config.mkdir(parents=True)
    (config / "kernel.release").write_text("6.1.192\n")
    assert headers_release(tmp_path / "b") == "6.1.192"
    assert headers_release(tmp_path / "missing") == ""


def test_kubeconfig_is_found_as_kubectl_finds_it(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / ".kube").mkdir(parents=True)
    (home / ".kube" / "config").write_text("{}")
    assert kubeconfig_files("/a:/b", {"KUBECONFIG": "/c"}) == ["/a", "/b"]
    assert kubeconfig_files("", {"KUBECONFIG": "/c"}) == ["/c"]
    assert kubeconfig_files("", {"HOME": str(home)}) == [str(home / ".kube" / "config")]
    # Inside a pod the service account wins over a stray ~/.kube/config.
    assert kubeconfig_files("", {"HOME": str(home), "KUBERNETES_SERVICE_HOST": "10.96.0.1"}) == []
    assert kubeconfig_files("", {"HOME": str(tmp_path / "nobody")}) == []


# --------------------------------------------------------------------------- output


def test_text_has_one_line_per_check_its_advice_and_the_result() -> None:
    checks = [
        Check("bpffs", Level.OK, "bpffs is mounted at /sys/fs/bpf"),
        Check("kube-proxy-manager", Level.WARN, "managed", "turn it off through its manager"),
        Check("kernel", Level.FAIL, "too old", "upgrade"),
    ]
    lines = doctor.render_text(checks).splitlines()
    assert lines[0] == "ok    bpffs               bpffs is mounted at /sys/fs/bpf"
    assert lines[1] == "warn  kube-proxy-manager  managed"
    assert lines[2].strip() == "-> turn it off through its manager"
    assert lines[3].startswith("fail  kernel")
    assert lines[-1] == "fail: 1 ok, 1 warn, 1 fail (exit 2)"


def test_json_carries_every_check_and_the_exit_code() -> None:
    checks = [Check("a", Level.OK, "fine"), Check("b", Level.WARN, "hm", "do x")]
    data = json.loads(doctor.render_json(checks))
    assert data == {
        "result": "warn",
        "exit_code": 1,
        "checks": [
            {"name": "a", "level": "ok", "summary": "fine", "advice": ""},
            {"name": "b", "level": "warn", "summary": "hm", "advice": "do x"},
        ],
    }
