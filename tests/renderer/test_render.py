"""render → diff → patch, as tables: formats, ordering, kube-proxy coexistence, odd live objects."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

import pytest

from apilane.renderer.render import (
    APISERVER_ENDPOINTS,
    SERVICE_IPS_PORTS,
    RenderError,
    RenderOptions,
    diff,
    render,
)
from apilane.shared.events import (
    ApiServerEndpoint,
    EndpointSnapshot,
    KubeProxyState,
    ServiceEndpoint,
    canonical_digest,
)

pytestmark = [pytest.mark.unit]


def snapshot(
    services: list[str],
    endpoints: list[str],
    *,
    generation: int = 1,
    managed_by: str = "",
    protocol: str = "TCP",
) -> EndpointSnapshot:
    """`services` / `endpoints` as "ip:port" with IPv6 written bare before the last colon."""

    def split(text: str) -> tuple[str, int, str]:
        ip, _, port = text.rpartition(":")
        return ip, int(port), "IPv6" if ":" in ip else "IPv4"

    svc = tuple(
        ServiceEndpoint(ip=ip, port=port, family=fam, protocol=protocol)  # type: ignore[arg-type]
        for ip, port, fam in map(split, services)
    )
    api = tuple(
        ApiServerEndpoint(ip=ip, port=port, family=fam)  # type: ignore[arg-type]
        for ip, port, fam in map(split, endpoints)
    )
    return EndpointSnapshot(
        cluster="test",
        generation=generation,
        service_endpoints=svc,
        apiserver_endpoints=api,
        digest=canonical_digest(svc, api),
        observed_at=datetime.now(UTC),
        kube_proxy=KubeProxyState(present=True, ready=True, managed_by=managed_by),
    )


@pytest.mark.parametrize(
    ("services", "endpoints", "expected_service", "expected_endpoints"),
    [
        pytest.param(
            ["10.96.0.1:443"], ["192.168.5.5:6443"], "10.96.0.1:443", "192.168.5.5:6443", id="ipv4"
        ),
        pytest.param(
            ["fd00:10:96::1:443"],
            ["fd00::5:5:6443", "fd00::5:4:6443"],
            "[fd00:10:96::1]:443",
            "[fd00::5:4]:6443,[fd00::5:5]:6443",
            id="ipv6",
        ),
        pytest.param(
            ["fd00:10:96::1:443", "10.96.0.1:443"],
            ["fd00::5:5:6443", "192.168.5.5:6443", "192.168.5.4:6443"],
            "10.96.0.1:443,[fd00:10:96::1]:443",
            "192.168.5.4:6443,192.168.5.5:6443,[fd00::5:5]:6443",
            id="dual-stack",
        ),
        pytest.param(
            ["10.96.0.1:443"],
            ["10.0.0.10:6443", "10.0.0.9:6443", "10.0.0.9:6443"],
            "10.96.0.1:443",
            "10.0.0.9:6443,10.0.0.10:6443",
            id="numeric-order-and-dedup",
        ),
    ],
)
def test_render_formats_like_calico(
    services: list[str], endpoints: list[str], expected_service: str, expected_endpoints: str
) -> None:
    desired = render(snapshot(services, endpoints))
    assert desired.env == {
        SERVICE_IPS_PORTS: expected_service,
        APISERVER_ENDPOINTS: expected_endpoints,
    }
    assert desired.init_containers == {"ebpf-bootstrap": desired.env}
    assert desired.containers == {"calico-node": desired.env}
    # Same set, other order: same strings.
    again = render(snapshot(list(reversed(services)), list(reversed(endpoints))))
    assert again.env == desired.env


def test_endpoints_of_a_family_without_a_service_ip_are_left_out_with_a_note() -> None:
    desired = render(snapshot(["10.96.0.1:443"], ["10.0.0.1:6443", "fd00::1:6443"]))
    assert desired.env[APISERVER_ENDPOINTS] == "10.0.0.1:6443"
    assert desired.notes and "[fd00::1]:6443" in desired.notes[0]


@pytest.mark.parametrize(
    ("services", "endpoints", "protocol"),
    [
        pytest.param([], ["10.0.0.1:6443"], "TCP", id="no-service-ip"),
        pytest.param(["10.96.0.1:443"], [], "TCP", id="no-endpoint"),
        pytest.param(["10.96.0.1:443"], ["fd00::1:6443"], "TCP", id="only-other-family"),
        pytest.param(["10.96.0.1:443"], ["10.0.0.1:6443"], "UDP", id="udp-service"),
        pytest.param(["10.96.0.1:0"], ["10.0.0.1:6443"], "TCP", id="port-zero"),
        pytest.param(["not-an-ip:443"], ["10.0.0.1:6443"], "TCP", id="bad-ip"),
    ],
)
def test_render_refuses_what_would_break_calico_node(
    services: list[str], endpoints: list[str], protocol: str
) -> None:
    with pytest.raises(RenderError):
        render(snapshot(services, endpoints, protocol=protocol))


@pytest.mark.parametrize(
    ("managed_by", "manage", "expected_extra"),
    [
        pytest.param(
            "label:app.kubernetes.io/managed-by=Helm",
            True,
            {
                "FELIX_BPFKUBEPROXYIPTABLESCLEANUPENABLED": "false",
                "FELIX_BPFKUBEPROXYHEALTHZPORT": "0",
            },
            id="managed-elsewhere",
        ),
        pytest.param(
            "label:app.kubernetes.io/managed-by=Helm", False, {}, id="managed-but-disabled"
        ),
        pytest.param("", True, {}, id="not-managed"),
    ],
)
def test_externally_managed_kube_proxy_disables_felix_cleanup_on_the_main_container(
    managed_by: str, manage: bool, expected_extra: dict[str, str]
) -> None:
    desired = render(
        snapshot(["10.96.0.1:443"], ["10.0.0.1:6443"], managed_by=managed_by),
        RenderOptions(manage_kube_proxy_cleanup=manage),
    )
    endpoints = {SERVICE_IPS_PORTS: "10.96.0.1:443", APISERVER_ENDPOINTS: "10.0.0.1:6443"}
    assert desired.containers["calico-node"] == endpoints | expected_extra
    assert desired.init_containers["ebpf-bootstrap"] == endpoints  # init container: never


def daemonset(
    *,
    init_env: list[dict[str, Any]] | None = None,
    main_env: list[dict[str, Any]] | None = None,
    with_init: bool = True,
    with_main: bool = True,
) -> dict[str, Any]:
    init = [{"name": "ebpf-bootstrap", "image": "calico/node:v3.31", "env": init_env or []}]
    main = [
        {"name": "calico-node", "image": "calico/node:v3.31", "env": main_env or []},
        {"name": "sidecar", "image": "busybox", "env": [{"name": SERVICE_IPS_PORTS, "value": "x"}]},
    ]
    return {
        "metadata": {"namespace": "calico-system", "name": "calico-node", "generation": 3},
        "spec": {
            "template": {
                "spec": {
                    "initContainers": init if with_init else [],
                    "containers": main if with_main else [],
                }
            }
        },
    }


DESIRED = render(snapshot(["10.96.0.1:443"], ["10.0.0.1:6443"]))


def test_diff_of_a_fresh_daemonset_adds_both_variables_to_both_containers() -> None:
    result = diff(daemonset(main_env=[{"name": "FOO", "value": "bar"}]), DESIRED)
    assert not result.unchanged
    assert {(c.kind, c.container, c.name, c.old) for c in result.changes} == {
        ("initContainers", "ebpf-bootstrap", APISERVER_ENDPOINTS, None),
        ("initContainers", "ebpf-bootstrap", SERVICE_IPS_PORTS, None),
        ("containers", "calico-node", APISERVER_ENDPOINTS, None),
        ("containers", "calico-node", SERVICE_IPS_PORTS, None),
    }
    assert result.patch() == {
        "spec": {
            "template": {
                "spec": {
                    "initContainers": [
                        {
                            "name": "ebpf-bootstrap",
                            "env": [
                                {"name": APISERVER_ENDPOINTS, "value": "10.0.0.1:6443"},
                                {"name": SERVICE_IPS_PORTS, "value": "10.96.0.1:443"},
                            ],
                        }
                    ],
                    "containers": [
                        {
                            "name": "calico-node",
                            "env": [
                                {"name": APISERVER_ENDPOINTS, "value": "10.0.0.1:6443"},
                                {"name": SERVICE_IPS_PORTS, "value": "10.96.0.1:443"},
                            ],
                        }
                    ],
                }
            }
        }
    }


def test_diff_of_an_up_to_date_daemonset_is_unchanged_and_has_no_patch() -> None:
    env = [
        {"name": "FOO", "value": "bar"},
        {"name": SERVICE_IPS_PORTS, "value": "10.96.0.1:443"},
        {"name": APISERVER_ENDPOINTS, "value": "10.0.0.1:6443"},
    ]
    result = diff(daemonset(init_env=env, main_env=env), DESIRED)
    assert result.unchanged
    assert result.patch() is None
    assert "(no change)" in result.text()


def test_patch_names_only_the_variables_that_change() -> None:
    env = [
        {"name": SERVICE_IPS_PORTS, "value": "10.96.0.1:443"},
        {"name": APISERVER_ENDPOINTS, "value": "10.0.0.2:6443"},
    ]
    result = diff(daemonset(init_env=env, main_env=env), DESIRED)
    patch = result.patch(annotations={"apilane.dev/applied-generation": "1"})
    assert patch is not None
    assert patch["metadata"] == {"annotations": {"apilane.dev/applied-generation": "1"}}
    for kind in ("initContainers", "containers"):
        (container,) = patch["spec"]["template"]["spec"][kind]
        assert container["env"] == [{"name": APISERVER_ENDPOINTS, "value": "10.0.0.1:6443"}]
        assert set(container) == {"name", "env"}  # no image, no other fields
    text = result.text(generation=3)
    assert "-KUBERNETES_APISERVER_ENDPOINTS=10.0.0.2:6443" in text
    assert "+KUBERNETES_APISERVER_ENDPOINTS=10.0.0.1:6443" in text
    assert "@@ initContainers[ebpf-bootstrap].env @@" in text
    assert "generation 3" in text


def test_containers_missing_from_the_live_object_are_reported_not_created() -> None:
    result = diff(daemonset(with_init=False), DESIRED)
    assert result.missing_containers == (("initContainers", "ebpf-bootstrap"),)
    patch = result.patch()
    assert patch is not None
    assert "initContainers" not in patch["spec"]["template"]["spec"]
    assert any("ebpf-bootstrap" in p and "does not exist" in p for p in result.problems)


def test_a_variable_set_from_value_from_is_never_clobbered_but_reported() -> None:
    from_config_map = {
        "name": SERVICE_IPS_PORTS,
        "valueFrom": {"configMapKeyRef": {"name": "kubernetes-services-endpoint", "key": "x"}},
    }
    result = diff(daemonset(init_env=[from_config_map]), DESIRED)
    assert [(c.container, c.name, c.source) for c in result.conflicts] == [
        ("ebpf-bootstrap", SERVICE_IPS_PORTS, "configMapKeyRef")
    ]
    patch = result.patch()
    assert patch is not None
    (init,) = patch["spec"]["template"]["spec"]["initContainers"]
    assert [e["name"] for e in init["env"]] == [APISERVER_ENDPOINTS]
    assert "configMapKeyRef; not overwritten" in result.text()


def test_diff_tolerates_malformed_live_objects() -> None:
    for live in ({}, {"spec": None}, {"spec": {"template": {"spec": {"containers": "x"}}}}):
        result = diff(live, DESIRED)
        assert len(result.missing_containers) == 2
        assert result.patch() is None


def test_diff_does_not_modify_the_live_object() -> None:
    live = daemonset()
    before = copy.deepcopy(live)
    diff(live, DESIRED)
    assert live == before
