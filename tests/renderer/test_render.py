"""render → diff → patch, as tables: formats, ordering, kube-proxy coexistence, odd live objects."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

import pytest

from apilane.model.events import (
    ApiServerEndpoint,
    EndpointSnapshot,
    KubeProxyState,
    ServiceEndpoint,
    canonical_digest,
)
from apilane.renderer.ownership import (
    FIELD_MANAGER,
    MANAGED_ENV_ANNOTATION,
    ManagedEnvError,
    format_managed_env,
    parse_managed_env,
)
from apilane.renderer.render import (
    APISERVER_ENDPOINTS,
    SERVICE_IPS_PORTS,
    RenderError,
    RenderOptions,
    diff,
    render,
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
        "metadata": {
            "annotations": {
                MANAGED_ENV_ANNOTATION: '{"calico-node":{"KUBERNETES_APISERVER_ENDPOINTS":null,'
                '"KUBERNETES_SERVICE_IPS_PORTS":null},"ebpf-bootstrap":'
                '{"KUBERNETES_APISERVER_ENDPOINTS":null,"KUBERNETES_SERVICE_IPS_PORTS":null}}'
            }
        },
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
        },
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
    # Variables someone else set to the wanted value before are not claimed; the one apilane
    # overwrites is recorded with the value it replaced.
    assert patch["metadata"] == {
        "annotations": {
            MANAGED_ENV_ANNOTATION: '{"calico-node":{"KUBERNETES_APISERVER_ENDPOINTS":'
            '"10.0.0.2:6443"},"ebpf-bootstrap":{"KUBERNETES_APISERVER_ENDPOINTS":"10.0.0.2:6443"}}',
            "apilane.dev/applied-generation": "1",
        }
    }
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


# -- Ownership: apilane removes exactly what it set and no longer wants -------------------

IPTABLES_CLEANUP = "FELIX_BPFKUBEPROXYIPTABLESCLEANUPENABLED"
HEALTHZ_PORT = "FELIX_BPFKUBEPROXYHEALTHZPORT"
HELM = "label:app.kubernetes.io/managed-by=Helm"
ENDPOINT_ENV = [
    {"name": SERVICE_IPS_PORTS, "value": "10.96.0.1:443"},
    {"name": APISERVER_ENDPOINTS, "value": "10.0.0.1:6443"},
]
ENDPOINTS_OURS: dict[str, str | None] = {SERVICE_IPS_PORTS: None, APISERVER_ENDPOINTS: None}
KUBE_PROXY_MANAGED = render(snapshot(["10.96.0.1:443"], ["10.0.0.1:6443"], managed_by=HELM))
KUBE_PROXY_NOT_MANAGED = DESIRED


def owned_by(manager: str, *names: str, created: bool = True) -> dict[str, Any]:
    """A managedFields entry: `manager` created these calico-node env entries (or only set
    their value)."""
    fields = {".": {}, "f:name": {}, "f:value": {}} if created else {"f:value": {}}
    env = {f'k:{{"name":"{name}"}}': fields for name in names}
    return {
        "manager": manager,
        "operation": "Update",
        "fieldsType": "FieldsV1",
        "fieldsV1": {
            "f:spec": {
                "f:template": {
                    "f:spec": {"f:containers": {'k:{"name":"calico-node"}': {"f:env": env}}}
                }
            }
        },
    }


def live_with(
    main_env: list[dict[str, Any]],
    *,
    record: dict[str, dict[str, str | None]] | str | None = None,
    managed_fields: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    live = daemonset(init_env=ENDPOINT_ENV, main_env=ENDPOINT_ENV + main_env)
    if record is not None:
        raw = record if isinstance(record, str) else format_managed_env(record)
        live["metadata"]["annotations"] = {MANAGED_ENV_ANNOTATION: raw}
    if managed_fields is not None:
        live["metadata"]["managedFields"] = managed_fields
    return live


OWNERSHIP_CASES = [
    pytest.param(
        live_with([]),
        KUBE_PROXY_MANAGED,
        [(HEALTHZ_PORT, None, "0"), (IPTABLES_CLEANUP, None, "false")],
        [],
        {HEALTHZ_PORT: None, IPTABLES_CLEANUP: None},
        id="added-when-kube-proxy-is-managed-elsewhere",
    ),
    pytest.param(
        live_with(
            [{"name": IPTABLES_CLEANUP, "value": "false"}, {"name": HEALTHZ_PORT, "value": "0"}],
            record={"calico-node": {**ENDPOINTS_OURS, IPTABLES_CLEANUP: None, HEALTHZ_PORT: None}},
        ),
        KUBE_PROXY_NOT_MANAGED,
        [(HEALTHZ_PORT, "0", None), (IPTABLES_CLEANUP, "false", None)],
        [],
        {},
        id="removed-when-no-longer-wanted",
    ),
    pytest.param(
        live_with(
            [{"name": IPTABLES_CLEANUP, "value": "false"}, {"name": HEALTHZ_PORT, "value": "0"}],
            record={"calico-node": {IPTABLES_CLEANUP: None, HEALTHZ_PORT: None}},
        ),
        KUBE_PROXY_MANAGED,
        [],
        [],
        {HEALTHZ_PORT: None, IPTABLES_CLEANUP: None},
        id="still-wanted-stays-ours",
    ),
    pytest.param(
        live_with([{"name": IPTABLES_CLEANUP, "value": "false"}]),
        KUBE_PROXY_MANAGED,
        [(HEALTHZ_PORT, None, "0")],
        [],
        {HEALTHZ_PORT: None},
        id="set-by-hand-to-the-wanted-value-is-never-claimed",
    ),
    pytest.param(
        live_with(
            [{"name": IPTABLES_CLEANUP, "value": "false"}, {"name": HEALTHZ_PORT, "value": "0"}],
            record={"calico-node": {HEALTHZ_PORT: None}},
        ),
        KUBE_PROXY_NOT_MANAGED,
        [(HEALTHZ_PORT, "0", None)],
        [IPTABLES_CLEANUP],
        {},
        id="set-by-hand-before-apilane-is-never-deleted",
    ),
    pytest.param(
        live_with([{"name": HEALTHZ_PORT, "value": "10257"}]),
        KUBE_PROXY_MANAGED,
        [(HEALTHZ_PORT, "10257", "0"), (IPTABLES_CLEANUP, None, "false")],
        [],
        {HEALTHZ_PORT: "10257", IPTABLES_CLEANUP: None},
        id="overwritten-hand-set-value-is-remembered",
    ),
    pytest.param(
        live_with(
            [{"name": HEALTHZ_PORT, "value": "0"}], record={"calico-node": {HEALTHZ_PORT: "10257"}}
        ),
        KUBE_PROXY_NOT_MANAGED,
        [(HEALTHZ_PORT, "0", "10257")],
        [],
        {},
        id="overwritten-hand-set-value-is-given-back",
    ),
    pytest.param(
        live_with(
            [{"name": IPTABLES_CLEANUP, "value": "true"}],
            record={"calico-node": {IPTABLES_CLEANUP: None}},
            managed_fields=[
                owned_by(FIELD_MANAGER, IPTABLES_CLEANUP),
                owned_by("kubectl-edit", IPTABLES_CLEANUP, created=False),
            ],
        ),
        KUBE_PROXY_NOT_MANAGED,
        [],
        [IPTABLES_CLEANUP],
        {},
        id="changed-by-another-manager-since-is-left-alone",
    ),
    pytest.param(
        live_with(
            [
                {
                    "name": IPTABLES_CLEANUP,
                    "valueFrom": {"configMapKeyRef": {"name": "x", "key": "y"}},
                }
            ],
            record={"calico-node": {IPTABLES_CLEANUP: None}},
        ),
        KUBE_PROXY_NOT_MANAGED,
        [],
        [IPTABLES_CLEANUP],
        {},
        id="switched-to-value-from-is-left-alone",
    ),
    pytest.param(
        live_with([], record={"calico-node": {IPTABLES_CLEANUP: None}}),
        KUBE_PROXY_NOT_MANAGED,
        [],
        [],
        {},
        id="already-removed-by-someone-else",
    ),
    pytest.param(
        live_with(
            [{"name": IPTABLES_CLEANUP, "value": "false"}, {"name": HEALTHZ_PORT, "value": "0"}],
            managed_fields=[owned_by(FIELD_MANAGER, IPTABLES_CLEANUP, HEALTHZ_PORT)],
        ),
        KUBE_PROXY_NOT_MANAGED,
        [(HEALTHZ_PORT, "0", None), (IPTABLES_CLEANUP, "false", None)],
        [],
        {},
        id="no-record-yet-our-field-manager-created-them",
    ),
    pytest.param(
        live_with(
            [{"name": IPTABLES_CLEANUP, "value": "false"}],
            managed_fields=[owned_by("kubectl-client-side-apply", IPTABLES_CLEANUP)],
        ),
        KUBE_PROXY_NOT_MANAGED,
        [],
        [IPTABLES_CLEANUP],
        {},
        id="no-record-someone-else-created-it",
    ),
    pytest.param(
        live_with(
            [{"name": IPTABLES_CLEANUP, "value": "false"}],
            record="calico-node=FELIX_X",
            managed_fields=[owned_by(FIELD_MANAGER, IPTABLES_CLEANUP)],
        ),
        KUBE_PROXY_NOT_MANAGED,
        [(IPTABLES_CLEANUP, "false", None)],
        [],
        {},
        id="malformed-record-falls-back-to-managed-fields",
    ),
]


@pytest.mark.parametrize(
    ("live", "desired", "expected_changes", "expected_kept", "expected_ours"), OWNERSHIP_CASES
)
def test_ownership_of_the_kube_proxy_coexistence_env(
    live: dict[str, Any],
    desired: Any,
    expected_changes: list[tuple[str, str | None, str | None]],
    expected_kept: list[str],
    expected_ours: dict[str, str | None],
) -> None:
    result = diff(live, desired)
    main = [c for c in result.changes if c.container == "calico-node"]
    assert [(c.name, c.old, c.new) for c in main] == expected_changes
    assert [k.name for k in result.kept] == expected_kept
    assert all(k.container == "calico-node" for k in result.kept)
    # Endpoint variables that already held the wanted value were never written: not claimed.
    ours = dict(result.managed_env.get("calico-node", {}))
    for name in (SERVICE_IPS_PORTS, APISERVER_ENDPOINTS):
        ours.pop(name, None)
    assert ours == expected_ours
    assert not any(c.container != "calico-node" for c in result.changes)  # init untouched


def test_a_removal_is_a_delete_directive_and_a_minus_line() -> None:
    live = live_with(
        [{"name": IPTABLES_CLEANUP, "value": "false"}, {"name": HEALTHZ_PORT, "value": "0"}],
        record={"calico-node": {IPTABLES_CLEANUP: None, HEALTHZ_PORT: "10257"}},
    )
    result = diff(live, KUBE_PROXY_NOT_MANAGED)
    assert [c.name for c in result.removals] == [IPTABLES_CLEANUP]
    patch = result.patch(annotations={"apilane.dev/applied-generation": "2"})
    assert patch is not None
    assert patch["spec"]["template"]["spec"] == {
        "containers": [
            {
                "name": "calico-node",
                "env": [
                    {"name": HEALTHZ_PORT, "value": "10257"},
                    {"name": IPTABLES_CLEANUP, "$patch": "delete"},
                ],
            }
        ]
    }
    # Nothing left that apilane set: the annotation goes (null deletes it in a merge patch).
    assert patch["metadata"]["annotations"] == {
        MANAGED_ENV_ANNOTATION: None,
        "apilane.dev/applied-generation": "2",
    }
    text = result.text()
    assert f"-{IPTABLES_CLEANUP}=false\n" in text
    assert f"+{IPTABLES_CLEANUP}" not in text
    assert f"-{HEALTHZ_PORT}=0\n+{HEALTHZ_PORT}=10257\n" in text


def test_a_variable_left_alone_is_reported_in_the_diff() -> None:
    live = live_with(
        [{"name": IPTABLES_CLEANUP, "value": "false"}], record={"calico-node": ENDPOINTS_OURS}
    )
    result = diff(live, KUBE_PROXY_NOT_MANAGED)
    assert result.unchanged
    assert result.patch() is None
    assert f" {IPTABLES_CLEANUP}=false  (not set by apilane; left as is)" in result.text()


def test_turning_kube_proxy_management_off_releases_what_apilane_set() -> None:
    desired = render(
        snapshot(["10.96.0.1:443"], ["10.0.0.1:6443"], managed_by=HELM),
        RenderOptions(manage_kube_proxy_cleanup=False),
    )
    live = live_with(
        [{"name": IPTABLES_CLEANUP, "value": "false"}],
        record={"calico-node": {IPTABLES_CLEANUP: None}},
    )
    result = diff(live, desired)
    assert [(c.name, c.new) for c in result.removals] == [(IPTABLES_CLEANUP, None)]


def test_a_container_no_longer_targeted_keeps_its_variables_and_its_record() -> None:
    live = live_with([], record={"sidecar": {SERVICE_IPS_PORTS: None}, "gone": {"X": None}})
    result = diff(live, render(snapshot(["10.96.0.1:443"], ["10.0.0.1:6443"])))
    assert not any(c.container == "sidecar" for c in result.changes)
    assert [(k.container, k.name) for k in result.kept] == [("sidecar", SERVICE_IPS_PORTS)]
    assert result.managed_env["sidecar"] == {SERVICE_IPS_PORTS: None}
    assert "gone" not in result.managed_env  # the container is not there any more


def test_without_managed_fields_the_record_is_trusted() -> None:
    live = live_with(
        [{"name": IPTABLES_CLEANUP, "value": "true"}],
        record={"calico-node": {IPTABLES_CLEANUP: None}},
    )
    result = diff(live, KUBE_PROXY_NOT_MANAGED)
    assert [(c.name, c.old, c.new) for c in result.changes] == [(IPTABLES_CLEANUP, "true", None)]


def test_a_malformed_record_is_reported() -> None:
    live = live_with([], record="not json")
    result = diff(live, KUBE_PROXY_NOT_MANAGED)
    assert any(MANAGED_ENV_ANNOTATION in problem for problem in result.problems)


@pytest.mark.parametrize(
    "raw",
    ["", "[]", '{"c": []}', '{"c": {"X": 1}}', '{"c": "X"}', "{"],
)
def test_parse_managed_env_refuses_what_the_renderer_never_writes(raw: str) -> None:
    with pytest.raises(ManagedEnvError):
        parse_managed_env(raw)


def test_managed_env_round_trips_canonically() -> None:
    record: dict[str, dict[str, str | None]] = {
        "calico-node": {"B": "old", "A": None},
        "empty": {},
    }
    raw = format_managed_env(record)
    assert raw == '{"calico-node":{"A":null,"B":"old"}}'
    assert parse_managed_env(raw) == {"calico-node": {"A": None, "B": "old"}}
    assert format_managed_env({"empty": {}}) is None
