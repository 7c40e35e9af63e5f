"""Table tests for apilane.model.endpoints, the pure extraction: one case per rule."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from apilane.model.endpoints import SnapshotInputs, build_snapshot
from apilane.model.events import WarningReason

pytestmark = [pytest.mark.unit]


def service(
    ips: list[str] | None = None,
    *,
    cluster_ip: str | None = None,
    ports: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "ports": ports
        if ports is not None
        else [{"name": "https", "port": 443, "protocol": "TCP", "targetPort": 6443}]
    }
    if ips is not None:
        spec["clusterIPs"] = ips
    if cluster_ip is not None:
        spec["clusterIP"] = cluster_ip
    return {
        "metadata": {"name": "kubernetes", "namespace": "default", "resourceVersion": "7"},
        "spec": spec,
    }


def endpoint(
    *addresses: Any, ready: Any = None, serving: Any = None, terminating: Any = None, **extra: Any
) -> dict[str, Any]:
    conditions = {
        key: value
        for key, value in (("ready", ready), ("serving", serving), ("terminating", terminating))
        if value is not None
    }
    return {"addresses": list(addresses), "conditions": conditions, **extra}


def eps(
    name: str,
    *endpoints: dict[str, Any],
    address_type: str = "IPv4",
    ports: list[dict[str, Any]] | None = None,
    rv: str = "10",
    trigger: str | None = None,
) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name, "namespace": "default", "resourceVersion": rv}
    if trigger is not None:
        metadata["annotations"] = {"endpoints.kubernetes.io/last-change-trigger-time": trigger}
    return {
        "metadata": metadata,
        "addressType": address_type,
        "endpoints": list(endpoints),
        "ports": ports
        if ports is not None
        else [{"name": "https", "port": 6443, "protocol": "TCP"}],
    }


def kube_proxy(
    *,
    ready: int = 3,
    desired: int = 3,
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    return {
        "metadata": {
            "name": "kube-proxy",
            "namespace": "kube-system",
            "generation": 2,
            "labels": labels or {"k8s-app": "kube-proxy"},
            "annotations": annotations or {},
        },
        "status": {
            "desiredNumberScheduled": desired,
            "numberReady": ready,
            "observedGeneration": 2,
        },
    }


def node(
    name: str, *, labels: dict[str, str] | None = None, provider_id: str | None = None
) -> dict[str, Any]:
    body: dict[str, Any] = {"metadata": {"name": name, "labels": labels or {}}, "spec": {}}
    if provider_id is not None:
        body["spec"]["providerID"] = provider_id
    return body


def snap(svc: Any = None, slices: Any = (), ds: Any = "default", nodes: Any = ()) -> Any:
    return build_snapshot(
        service=service(["10.96.0.1"]) if svc is None else svc,
        endpoint_slices=slices,
        kube_proxy=kube_proxy() if ds == "default" else ds,
        nodes=nodes,
    )


def pairs(result: Any) -> list[tuple[str, int]]:
    return [(e.ip, e.port) for e in result.apiserver_endpoints]


def reasons(result: Any) -> list[str]:
    return [f.reason for f in result.findings]


# -- service endpoints -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("svc", "expected"),
    [
        pytest.param(service(["10.96.0.1"]), [("10.96.0.1", 443, "IPv4")], id="single-stack"),
        pytest.param(
            service(["fd00:10:96::1", "10.96.0.1"]),
            [("10.96.0.1", 443, "IPv4"), ("fd00:10:96::1", 443, "IPv6")],
            id="dual-stack-grouped-ipv4-first",
        ),
        pytest.param(
            service(None, cluster_ip="10.96.0.1"),
            [("10.96.0.1", 443, "IPv4")],
            id="clusterIP-fallback",
        ),
        pytest.param(
            service([], cluster_ip="10.96.0.1"),
            [("10.96.0.1", 443, "IPv4")],
            id="empty-clusterIPs-fallback",
        ),
        pytest.param(
            service(
                ["10.96.0.1"],
                ports=[
                    {"name": "https", "port": 443},
                    {"name": "alt", "port": 8443, "protocol": "TCP"},
                ],
            ),
            [("10.96.0.1", 443, "IPv4"), ("10.96.0.1", 8443, "IPv4")],
            id="each-ip-times-each-port",
        ),
        pytest.param(
            service(["fd00:10:96:0::0:1"]), [("fd00:10:96::1", 443, "IPv6")], id="ipv6-normalised"
        ),
        pytest.param(service(None, cluster_ip="None"), [], id="headless"),
    ],
)
def test_service_endpoints_are_each_cluster_ip_times_each_port(
    svc: Any, expected: list[Any]
) -> None:
    result = snap(svc, [eps("a", endpoint("192.0.2.1"))])
    assert [(e.ip, e.port, e.family) for e in result.service_endpoints] == expected


@pytest.mark.parametrize(
    ("ports", "message_part"),
    [
        ([{"port": 0}], "port 0"),
        ([{"port": 70000}], "port 70000"),
        ([{"port": "443"}], "port '443'"),
        ([{"port": True}], "port True"),
        ([{"port": 443, "protocol": "ICMP"}], "protocol"),
        ([{"port": 443, "targetPort": 0.5}], "targetPort"),
        ([{"port": 443, "targetPort": 99999}], "targetPort"),
        (["garbage"], "not an object"),
    ],
)
def test_an_invalid_service_port_is_a_finding_not_a_crash(
    ports: list[Any], message_part: str
) -> None:
    result = snap(service(["10.96.0.1"], ports=ports), [eps("a", endpoint("192.0.2.1"))])
    assert result.service_endpoints == ()
    invalid = [f for f in result.findings if f.reason == WarningReason.INVALID_ENDPOINT]
    assert invalid and message_part in invalid[0].message
    assert invalid[0].object_ref == "Service/default/kubernetes"


def test_an_unparsable_cluster_ip_is_rejected_and_the_others_kept() -> None:
    result = snap(service(["10.96.0.1", "10.96.0.999", 7]), [eps("a", endpoint("192.0.2.1"))])
    assert [e.ip for e in result.service_endpoints] == ["10.96.0.1"]
    assert reasons(result).count(WarningReason.INVALID_ENDPOINT) == 2


def test_a_missing_service_is_a_finding() -> None:
    result = build_snapshot(
        service=None,
        endpoint_slices=[eps("a", endpoint("192.0.2.1"))],
        kube_proxy=kube_proxy(),
        nodes=[],
    )
    assert WarningReason.SERVICE_MISSING in reasons(result)
    assert result.service_endpoints == ()


# -- target port matching ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("service_ports", "slice_ports", "expected_ports"),
    [
        pytest.param(
            [{"name": "https", "port": 443, "targetPort": 6443}],
            [{"name": "https", "port": 6443}],
            [6443],
            id="by-number",
        ),
        pytest.param(
            [{"name": "https", "port": 443, "targetPort": 6443}],
            [{"name": "https", "port": 6443}, {"name": "metrics", "port": 9000}],
            [6443],
            id="by-number-ignores-other-ports",
        ),
        pytest.param(
            [{"name": "https", "port": 443, "targetPort": 6443}],
            [{"name": "https", "port": 7443}],
            [],
            id="a-numeric-targetPort-does-not-match-by-the-service-port-name",
        ),
        pytest.param(
            [{"name": "https", "port": 443, "targetPort": "api"}],
            [{"name": "api", "port": 7443}, {"name": "other", "port": 6443}],
            [7443],
            id="by-name",
        ),
        pytest.param(
            [{"name": "https", "port": 443, "targetPort": "secure"}],
            [{"name": "https", "port": 7443}],
            [7443],
            id="by-name-of-service-port-as-the-endpointslice-controller-names-it",
        ),
        pytest.param(
            [{"name": "https", "port": 6443}],
            [{"name": "https", "port": 6443}],
            [6443],
            id="targetPort-unset-means-port",
        ),
        pytest.param(
            [{"name": "https", "port": 443, "targetPort": "6443"}],
            [{"name": "https", "port": 6443}],
            [6443],
            id="numeric-string-targetPort",
        ),
        pytest.param(
            [{"name": "https", "port": 443, "targetPort": 6443, "protocol": "TCP"}],
            [{"name": "https", "port": 6443, "protocol": "UDP"}],
            [],
            id="protocol-must-agree",
        ),
        pytest.param(
            [{"name": "https", "port": 443, "targetPort": 6443}],
            [{"name": "https", "port": None}],
            [],
            id="slice-port-without-number",
        ),
    ],
)
def test_the_slice_port_is_the_one_the_service_target_port_selects(
    service_ports: list[Any], slice_ports: list[Any], expected_ports: list[int]
) -> None:
    result = snap(
        service(["10.96.0.1"], ports=service_ports),
        [eps("a", endpoint("192.0.2.1"), ports=slice_ports)],
    )
    assert [e.port for e in result.apiserver_endpoints] == expected_ports


def test_no_matching_slice_port_is_an_invalid_endpoint_finding() -> None:
    result = snap(slices=[eps("a", endpoint("192.0.2.1"), ports=[{"name": "other", "port": 9000}])])
    assert result.apiserver_endpoints == ()
    assert any(
        "targetPort" in f.message
        for f in result.findings
        if f.reason == WarningReason.INVALID_ENDPOINT
    )
    assert WarningReason.NO_READY_ENDPOINTS in reasons(result)


# -- readiness ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("endpoints", "expected", "fallback"),
    [
        pytest.param([endpoint("192.0.2.1")], ["192.0.2.1"], False, id="ready-unset-is-ready"),
        pytest.param([endpoint("192.0.2.1", ready=True)], ["192.0.2.1"], False, id="ready"),
        pytest.param(
            [endpoint("192.0.2.1", ready=True), endpoint("192.0.2.2", ready=False)],
            ["192.0.2.1"],
            False,
            id="not-ready-dropped",
        ),
        pytest.param(
            [
                endpoint("192.0.2.1", ready=True),
                endpoint("192.0.2.2", ready=False, serving=True, terminating=True),
            ],
            ["192.0.2.1"],
            False,
            id="terminating-dropped-while-something-is-ready",
        ),
        pytest.param(
            [
                endpoint("192.0.2.2", ready=False, serving=True, terminating=True),
                endpoint("192.0.2.3", ready=False, serving=False, terminating=True),
            ],
            ["192.0.2.2"],
            True,
            id="fallback-to-serving-terminating",
        ),
        pytest.param(
            [endpoint("192.0.2.2", ready=False, terminating=True)],
            [],
            False,
            id="serving-unset-defers-to-ready",
        ),
        pytest.param(
            [endpoint("192.0.2.2", ready=False, serving=True)],
            [],
            False,
            id="serving-but-not-terminating-is-not-a-fallback",
        ),
        pytest.param(
            [endpoint("192.0.2.1", ready="yes")],
            ["192.0.2.1"],
            False,
            id="wrong-type-counts-as-unset",
        ),
    ],
)
def test_ready_endpoints_then_serving_terminating_ones(
    endpoints: list[Any], expected: list[str], fallback: bool
) -> None:
    result = snap(slices=[eps("a", *endpoints)])
    assert [e.ip for e in result.apiserver_endpoints] == expected
    assert (WarningReason.TERMINATING_FALLBACK in reasons(result)) is fallback
    assert (WarningReason.NO_READY_ENDPOINTS in reasons(result)) is (not expected)


def test_zero_endpoints_is_a_no_ready_endpoints_finding() -> None:
    result = snap(slices=[eps("a")])
    assert result.apiserver_endpoints == ()
    assert not result.has_endpoints
    assert WarningReason.NO_READY_ENDPOINTS in reasons(result)


# -- dedupe, sort, families ----------------------------------------------------------------------


def test_duplicates_across_slices_collapse_and_the_best_conditions_win() -> None:
    result = snap(
        slices=[
            eps("a", endpoint("192.0.2.2", "192.0.2.1", ready=True, nodeName="n1")),
            eps("b", endpoint("192.0.2.1", ready=True, nodeName="n1"), endpoint("192.0.2.10")),
        ]
    )
    assert pairs(result) == [("192.0.2.1", 6443), ("192.0.2.2", 6443), ("192.0.2.10", 6443)]


def test_sorted_numerically_and_grouped_by_family() -> None:
    result = snap(
        service(["10.96.0.1", "fd00:10:96::1"]),
        [
            eps("v6", endpoint("2001:db8::10", "2001:db8::9"), address_type="IPv6"),
            eps("v4", endpoint("192.0.2.10", "192.0.2.9")),
        ],
    )
    assert [e.ip for e in result.apiserver_endpoints] == [
        "192.0.2.9",
        "192.0.2.10",
        "2001:db8::9",
        "2001:db8::10",
    ]
    grouped = result.endpoints_by_family()
    assert list(grouped) == ["IPv4", "IPv6"]
    assert WarningReason.FAMILY_MISMATCH not in reasons(result)


@pytest.mark.parametrize(
    ("cluster_ips", "address_type", "address"),
    [
        pytest.param(["10.96.0.1"], "IPv6", "2001:db8::1", id="ipv6-endpoint-ipv4-service"),
        pytest.param(["fd00:10:96::1"], "IPv4", "192.0.2.1", id="ipv4-endpoint-ipv6-service"),
    ],
)
def test_family_mismatch_between_service_and_endpoints(
    cluster_ips: list[str], address_type: str, address: str
) -> None:
    result = snap(service(cluster_ips), [eps("a", endpoint(address), address_type=address_type)])
    mismatch = [f for f in result.findings if f.reason == WarningReason.FAMILY_MISMATCH]
    assert len(mismatch) == 1
    assert mismatch[0].object_ref == "Service/default/kubernetes"
    assert pairs(result) == [(address, 6443)]  # still published: the data plane decides


def test_fqdn_slices_are_ignored_with_a_finding() -> None:
    result = snap(
        slices=[
            eps("a", endpoint("192.0.2.1")),
            eps("f", endpoint("api.example.com"), address_type="FQDN"),
        ]
    )
    assert pairs(result) == [("192.0.2.1", 6443)]
    fqdn = [f for f in result.findings if f.reason == WarningReason.UNSUPPORTED_ADDRESS_TYPE]
    assert fqdn[0].object_ref == "EndpointSlice/default/f"


# -- invalid entries -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad_slice", "message_part"),
    [
        pytest.param(eps("x", endpoint("192.0.2.300")), "not an IP", id="unparsable-ip"),
        pytest.param(eps("x", endpoint(12345)), "not an IP", id="ip-of-wrong-type"),
        pytest.param(
            eps("x", endpoint("2001:db8::1")),
            "is IPv6 in a slice of addressType IPv4",
            id="ipv6-in-ipv4-slice",
        ),
        pytest.param(
            eps("x", endpoint("192.0.2.7"), address_type="IPv6"),
            "is IPv4 in a slice of addressType IPv6",
            id="ipv4-in-ipv6-slice",
        ),
        pytest.param(eps("x", endpoint("0.0.0.0")), "unspecified", id="unspecified"),
        pytest.param(eps("x", endpoint("127.0.0.1")), "loopback", id="loopback"),
        pytest.param(
            eps("x", endpoint("192.0.2.7"), ports=[{"name": "https", "port": 0}]),
            "not in 1-65535",
            id="port-0",
        ),
        pytest.param(
            eps("x", endpoint("192.0.2.7"), ports=[{"name": "https", "port": 65536}]),
            "not in 1-65535",
            id="port-too-big",
        ),
        pytest.param(
            eps("x", endpoint("192.0.2.7"), ports=[{"name": "https", "port": "6443"}]),
            "not in 1-65535",
            id="port-string",
        ),
        pytest.param(eps("x", "not-an-endpoint"), "not an object", id="endpoint-not-object"),
        pytest.param(
            eps("x", endpoint("192.0.2.7"), ports=["nope"]), "not an object", id="port-not-object"
        ),
    ],
)
def test_invalid_entries_are_rejected_with_a_typed_finding(
    bad_slice: dict[str, Any], message_part: str
) -> None:
    result = snap(slices=[eps("good", endpoint("192.0.2.1")), bad_slice])
    assert pairs(result) == [("192.0.2.1", 6443)]
    invalid = [f for f in result.findings if f.reason == WarningReason.INVALID_ENDPOINT]
    assert any(message_part in f.message for f in invalid), invalid
    assert all(f.object_ref == "EndpointSlice/default/x" for f in invalid)


def test_slices_of_the_wrong_shape_are_skipped() -> None:
    result = snap(
        slices=[
            None,
            "x",
            3,
            {"metadata": "nope", "addressType": "IPv4", "endpoints": "nope"},
            eps("a", endpoint("192.0.2.1")),
        ]
    )
    assert pairs(result) == [("192.0.2.1", 6443)]


# -- kube-proxy ----------------------------------------------------------------------------------


def test_kube_proxy_present_and_ready_is_no_finding() -> None:
    result = snap(slices=[eps("a", endpoint("192.0.2.1"))])
    assert (
        result.kube_proxy.present and result.kube_proxy.ready and result.kube_proxy.managed_by == ""
    )
    assert not [r for r in reasons(result) if "KubeProxy" in r]


def test_kube_proxy_missing() -> None:
    result = snap(slices=[eps("a", endpoint("192.0.2.1"))], ds=None)
    assert not result.kube_proxy.present
    finding = next(f for f in result.findings if f.reason == WarningReason.KUBE_PROXY_MISSING)
    assert finding.object_ref == "DaemonSet/kube-system/kube-proxy"


@pytest.mark.parametrize(
    "ds",
    [
        pytest.param(kube_proxy(ready=2, desired=3), id="some-pods-not-ready"),
        pytest.param(kube_proxy(ready=0, desired=0), id="nothing-scheduled"),
        pytest.param(
            {
                "metadata": {"name": "kube-proxy", "generation": 3},
                "status": {"desiredNumberScheduled": 1, "numberReady": 1, "observedGeneration": 2},
            },
            id="spec-not-observed-yet",
        ),
        pytest.param({"metadata": {"name": "kube-proxy"}}, id="no-status"),
    ],
)
def test_kube_proxy_not_ready(ds: dict[str, Any]) -> None:
    result = snap(slices=[eps("a", endpoint("192.0.2.1"))], ds=ds)
    assert result.kube_proxy.present and not result.kube_proxy.ready
    assert WarningReason.KUBE_PROXY_NOT_READY in reasons(result)


@pytest.mark.parametrize(
    ("labels", "annotations", "marker"),
    [
        ({"app.kubernetes.io/managed-by": "Helm"}, {}, "label:app.kubernetes.io/managed-by=Helm"),
        (
            {"addonmanager.kubernetes.io/mode": "Reconcile"},
            {},
            "label:addonmanager.kubernetes.io/mode=Reconcile",
        ),
        (
            {"kustomize.toolkit.fluxcd.io/name": "infra"},
            {},
            "label:kustomize.toolkit.fluxcd.io/name=infra",
        ),
        ({"helm.toolkit.fluxcd.io/name": "kp"}, {}, "label:helm.toolkit.fluxcd.io/name=kp"),
        (
            {},
            {"argocd.argoproj.io/tracking-id": "app:apps/DaemonSet:kube-system/kube-proxy"},
            "annotation:argocd.argoproj.io/tracking-id",
        ),
    ],
)
def test_kube_proxy_externally_managed_names_the_marker(
    labels: dict[str, str], annotations: dict[str, str], marker: str
) -> None:
    result = snap(
        slices=[eps("a", endpoint("192.0.2.1"))],
        ds=kube_proxy(labels=labels, annotations=annotations),
    )
    assert result.kube_proxy.managed_by == marker
    finding = next(
        f for f in result.findings if f.reason == WarningReason.EXTERNALLY_MANAGED_KUBE_PROXY
    )
    assert finding.detail["marker"] == marker
    assert marker in finding.message


def test_custom_kube_proxy_name_is_used_in_refs() -> None:
    result = build_snapshot(
        service=service(["10.96.0.1"]),
        endpoint_slices=[],
        kube_proxy=None,
        nodes=[],
        inputs=SnapshotInputs(kube_proxy_namespace="net", kube_proxy_name="kp"),
    )
    assert any(f.object_ref == "DaemonSet/net/kp" for f in result.findings)
    assert (result.kube_proxy.namespace, result.kube_proxy.name) == ("net", "kp")


# -- managed control plane -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("nodes", "provider"),
    [
        pytest.param(
            [node("n", labels={"eks.amazonaws.com/nodegroup": "ng"})], "eks", id="eks-label"
        ),
        pytest.param(
            [node("n", labels={"cloud.google.com/gke-nodepool": "p"})], "gke", id="gke-label"
        ),
        pytest.param(
            [node("n", labels={"kubernetes.azure.com/cluster": "c"})], "aks", id="aks-label"
        ),
        pytest.param(
            [node("n", labels={"node.openshift.io/os_id": "rhcos"})],
            "openshift",
            id="openshift-label",
        ),
        pytest.param(
            [node("n", provider_id="aws:///eu-west-1a/i-0abc")], "aws", id="aws-provider-id"
        ),
        pytest.param([node("n", provider_id="gce://proj/zone/vm")], "gce", id="gce-provider-id"),
        pytest.param(
            [node("n", provider_id="azure:///subscriptions/x")], "azure", id="azure-provider-id"
        ),
        pytest.param(
            [
                node(
                    "cp",
                    labels={"node-role.kubernetes.io/control-plane": ""},
                    provider_id="aws:///a/i-1",
                ),
                node("w", provider_id="aws:///a/i-2"),
            ],
            "",
            id="self-managed-on-a-cloud",
        ),
        pytest.param(
            [
                node("cp", labels={"node-role.kubernetes.io/control-plane": ""}),
                node("w", labels={"eks.amazonaws.com/nodegroup": "x"}),
            ],
            "eks",
            id="labels-win-over-control-plane-nodes",
        ),
        pytest.param([node("n", provider_id="kind://docker/kind/n")], "", id="kind"),
        pytest.param([], "", id="no-nodes"),
    ],
)
def test_managed_control_plane_names_the_provider(nodes: list[Any], provider: str) -> None:
    result = snap(slices=[eps("a", endpoint("192.0.2.1"))], nodes=nodes)
    assert result.managed_provider == provider
    found = [f for f in result.findings if f.reason == WarningReason.MANAGED_CONTROL_PLANE]
    assert bool(found) is bool(provider)
    if provider:
        assert found[0].detail["provider"] == provider


# -- trigger times, resource versions, digest ----------------------------------------------------


def test_trigger_times_and_resource_versions_are_collected() -> None:
    result = snap(
        slices=[
            eps("a", endpoint("192.0.2.1"), rv="11", trigger="2025-01-02T03:04:05Z"),
            eps("b", endpoint("192.0.2.2"), rv="12", trigger="garbage"),
        ]
    )
    assert result.resource_versions == (
        "EndpointSlice/default/a@11",
        "EndpointSlice/default/b@12",
        "Service/default/kubernetes@7",
    )
    when = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert result.trigger_times == (when,)
    assert result.slice_trigger_times == {"EndpointSlice/default/a": when}


def test_the_wire_event_carries_the_view_plus_what_the_caller_adds() -> None:
    result = snap(
        slices=[eps("a", endpoint("192.0.2.1"), rv="11", trigger="2025-01-02T03:04:05Z")],
        nodes=[node("n1", labels={"eks.amazonaws.com/nodegroup": "ng"})],
    )
    observed = datetime(2025, 1, 2, 3, 4, 6, tzinfo=UTC)
    earlier = datetime(2025, 1, 2, 3, 4, 0, tzinfo=UTC)
    event = result.to_event(
        cluster="c1",
        generation=4,
        observed_at=observed,
        more_resource_versions=["EndpointSlice/default/gone@9", "EndpointSlice/default/a@11"],
        more_trigger_times=[earlier],
    )
    assert (event.cluster, event.generation, event.observed_at) == ("c1", 4, observed)
    assert event.service_endpoints == result.service_endpoints
    assert event.apiserver_endpoints == result.apiserver_endpoints
    assert event.digest == result.digest
    assert event.findings == result.findings
    assert (event.kube_proxy, event.managed_provider) == (result.kube_proxy, "eks")
    assert event.resource_versions == (
        "EndpointSlice/default/a@11",
        "EndpointSlice/default/gone@9",
        "Service/default/kubernetes@7",
    )
    assert event.trigger_times == (earlier, datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC))


def test_digest_changes_with_content_but_not_with_conditions() -> None:
    base = snap(slices=[eps("a", endpoint("192.0.2.1"), endpoint("192.0.2.2"))])
    other_ip = snap(slices=[eps("a", endpoint("192.0.2.1"), endpoint("192.0.2.3"))])
    terminating = snap(
        slices=[
            eps(
                "a",
                endpoint("192.0.2.1", ready=False, serving=True, terminating=True),
                endpoint("192.0.2.2", ready=False, serving=True, terminating=True),
            )
        ]
    )
    assert base.digest != other_ip.digest
    assert base.digest == terminating.digest
    assert base.digest.startswith("sha256:")


# -- properties ----------------------------------------------------------------------------------

_ipv4 = st.ip_addresses(v=4, network="192.0.2.0/24").map(str)
_ipv6 = st.ip_addresses(v=6, network="2001:db8::/120").map(str)


@st.composite
def _slices(draw: st.DrawFn) -> list[dict[str, Any]]:
    result = []
    for index in range(draw(st.integers(1, 4))):
        v6 = draw(st.booleans())
        addresses = draw(st.lists(_ipv6 if v6 else _ipv4, min_size=0, max_size=5))
        endpoints = [
            endpoint(a, ready=draw(st.sampled_from([None, True, False]))) for a in addresses
        ]
        result.append(eps(f"s{index}", *endpoints, address_type="IPv6" if v6 else "IPv4"))
    return result


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(slices=_slices(), seed=st.integers(0, 2**32))
def test_digest_is_independent_of_slice_and_address_order(
    slices: list[dict[str, Any]], seed: int
) -> None:
    shuffler = random.Random(seed)
    shuffled = [
        dict(s, endpoints=shuffler.sample(s["endpoints"], len(s["endpoints"]))) for s in slices
    ]
    shuffler.shuffle(shuffled)
    svc = service(["10.96.0.1", "fd00:10:96::1"])
    first = snap(svc, slices)
    second = snap(svc, shuffled)
    assert first.digest == second.digest
    assert first.apiserver_endpoints == second.apiserver_endpoints
    assert first.findings == second.findings


_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=25,
)
_keys = st.sampled_from(
    [
        "metadata",
        "spec",
        "status",
        "ports",
        "endpoints",
        "addresses",
        "conditions",
        "addressType",
        "clusterIPs",
        "clusterIP",
        "port",
        "targetPort",
        "name",
        "protocol",
        "labels",
        "annotations",
        "providerID",
        "ready",
        "serving",
        "terminating",
    ]
)
_shaped = st.recursive(
    _json,
    lambda children: st.dictionaries(_keys, children, max_size=6) | st.lists(children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(svc=_shaped, slices=_shaped, ds=_shaped, nodes=_shaped)
def test_never_raises_on_arbitrary_input(svc: Any, slices: Any, ds: Any, nodes: Any) -> None:
    result = build_snapshot(
        service=svc,
        endpoint_slices=slices if isinstance(slices, list) else [slices],
        kube_proxy=ds,
        nodes=nodes if isinstance(nodes, list) else [nodes],
    )
    assert result.digest.startswith("sha256:")
