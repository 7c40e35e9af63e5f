"""configmap mode, pure: snapshot + live DaemonSet + live ConfigMap -> the writes.

The DaemonSet's entries read apilane's ConfigMap (configMapKeyRef) once adopted, so an endpoint
change is a ConfigMap change only; a DaemonSet tigera-operator renders is recognised; the
ownership record still decides what apilane may take back (`release`).
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from apilane.model.errors import ConfigError
from apilane.model.events import EndpointSnapshot, KubeProxyState
from apilane.model.signing import SigningKey
from apilane.renderer import configmap, controller
from apilane.renderer.configmap import MANAGED_BY, MANAGED_BY_LABEL, DataChange
from apilane.renderer.ownership import FIELD_MANAGER, MANAGED_ENV_ANNOTATION
from apilane.renderer.render import (
    APISERVER_ENDPOINTS,
    SERVICE_IPS_PORTS,
    EnvDiff,
    diff,
    release,
    render,
)
from apilane.renderer.settings import PRESETS, choose_preset, load
from apilane.testing.snapshots import make_snapshot

pytestmark = [pytest.mark.unit]

CM = "apilane-kubernetes-endpoints"
NS = "calico-system"
IPTABLES_CLEANUP = "FELIX_BPFKUBEPROXYIPTABLESCLEANUPENABLED"
HEALTHZ_PORT = "FELIX_BPFKUBEPROXYHEALTHZPORT"


def snap(*endpoints: str, generation: int = 1, managed_by: str = "") -> EndpointSnapshot:
    return make_snapshot(
        cluster="test",
        generation=generation,
        services=["10.96.0.1:443"],
        apiservers=list(endpoints or ("192.168.5.4:6443",)),
        kube_proxy=KubeProxyState(present=True, ready=True, managed_by=managed_by),
    )


def ref(name: str, configmap_name: str = CM) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"configMapKeyRef": {"name": configmap_name, "key": name}}}


def daemonset(
    *,
    init_env: list[dict[str, Any]] | None = None,
    main_env: list[dict[str, Any]] | None = None,
    record: dict[str, dict[str, str | None]] | None = None,
    metadata: dict[str, Any] | None = None,
) -> dict[str, Any]:
    annotations = {MANAGED_ENV_ANNOTATION: json.dumps(record)} if record else {}
    return {
        "metadata": {
            "namespace": NS,
            "name": "calico-node",
            "generation": 3,
            "resourceVersion": "7",
            "annotations": annotations,
            **(metadata or {}),
        },
        "spec": {
            "template": {
                "spec": {
                    "initContainers": [{"name": "ebpf-bootstrap", "env": init_env or []}],
                    "containers": [
                        {"name": "calico-node", "env": main_env or []},
                        {"name": "other", "env": [{"name": "KEEP", "value": "me"}]},
                    ],
                }
            }
        },
    }


def apply_patch(live: dict[str, Any], env_diff: EnvDiff) -> dict[str, Any]:
    """What the API server's strategic merge makes of `env_diff.patch()` for env lists
    merged by name (enough for these tests: no other fields change)."""
    patched = copy.deepcopy(live)
    body = env_diff.patch()
    assert body is not None
    annotations = patched["metadata"].setdefault("annotations", {})
    for key, value in body["metadata"]["annotations"].items():
        if value is None:
            annotations.pop(key, None)
        else:
            annotations[key] = value
    pod_spec = patched["spec"]["template"]["spec"]
    for kind, containers in body["spec"]["template"]["spec"].items():
        for container_patch in containers:
            (container,) = [c for c in pod_spec[kind] if c["name"] == container_patch["name"]]
            for entry in container_patch["env"]:
                current = [e for e in container["env"] if e["name"] == entry["name"]]
                if entry.get("$patch") == "delete":
                    container["env"] = [e for e in container["env"] if e["name"] != entry["name"]]
                    continue
                target = current[0] if current else {"name": entry["name"]}
                if not current:
                    container["env"].append(target)
                for key, value in entry.items():
                    if value is None:
                        target.pop(key, None)
                    elif key != "name":
                        target[key] = value
    return patched


def env(ds: dict[str, Any], kind: str, name: str) -> dict[str, Any]:
    (container,) = [c for c in ds["spec"]["template"]["spec"][kind] if c["name"] == name]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def cm_ref(name: str) -> dict[str, Any]:
    return {"configMapKeyRef": {"name": CM, "key": name}}


# --------------------------------------------------------------------------- adoption


def test_adopting_a_bare_daemonset_adds_refs_and_records_them_as_created() -> None:
    live = daemonset()
    result = diff(live, render(snap()), configmap=CM)
    assert {(c.kind, c.name, c.new_ref) for c in result.changes} == {
        ("initContainers", SERVICE_IPS_PORTS, CM),
        ("initContainers", APISERVER_ENDPOINTS, CM),
        ("containers", SERVICE_IPS_PORTS, CM),
        ("containers", APISERVER_ENDPOINTS, CM),
    }
    assert result.managed_env == {
        "calico-node": {SERVICE_IPS_PORTS: None, APISERVER_ENDPOINTS: None},
        "ebpf-bootstrap": {SERVICE_IPS_PORTS: None, APISERVER_ENDPOINTS: None},
    }
    body = result.patch()
    assert body is not None
    (init,) = body["spec"]["template"]["spec"]["initContainers"]
    # A new entry has no literal value to remove: no `value: null`.
    assert init["env"] == [
        {"name": APISERVER_ENDPOINTS, "valueFrom": cm_ref(APISERVER_ENDPOINTS)},
        {"name": SERVICE_IPS_PORTS, "valueFrom": cm_ref(SERVICE_IPS_PORTS)},
    ]
    assert f"+{SERVICE_IPS_PORTS}=<configMapKeyRef {CM}/{SERVICE_IPS_PORTS}> = 10.96.0.1:443" in (
        result.text()
    )


def test_adopting_literal_values_replaces_them_and_remembers_them() -> None:
    live = daemonset(
        init_env=[{"name": SERVICE_IPS_PORTS, "value": "10.96.0.1:443"}],
        main_env=[{"name": APISERVER_ENDPOINTS, "value": "198.18.0.10:6443"}],
    )
    result = diff(live, render(snap()), configmap=CM)
    # Even a literal that holds the wanted value changes form: it must follow the ConfigMap.
    init = {c.name: c for c in result.changes if c.kind == "initContainers"}
    assert init[SERVICE_IPS_PORTS].old == "10.96.0.1:443"
    assert init[SERVICE_IPS_PORTS].patch_entry() == {
        "name": SERVICE_IPS_PORTS,
        "valueFrom": cm_ref(SERVICE_IPS_PORTS),
        "value": None,
    }
    assert result.managed_env["ebpf-bootstrap"] == {
        SERVICE_IPS_PORTS: "10.96.0.1:443",
        APISERVER_ENDPOINTS: None,
    }
    assert result.managed_env["calico-node"][APISERVER_ENDPOINTS] == "198.18.0.10:6443"


def test_once_adopted_no_endpoint_change_touches_the_daemonset() -> None:
    adopted = apply_patch(daemonset(), diff(daemonset(), render(snap()), configmap=CM))
    for n in range(20):
        desired = render(snap(f"192.168.7.{n}:6443", f"10.0.{n}.1:6443", generation=n + 2))
        result = diff(adopted, desired, configmap=CM)
        assert result.unchanged, result.text()
        assert result.patch() is None


def test_the_values_move_from_apilane_literals_to_refs_keeping_the_original_record() -> None:
    """A DaemonSet rendered in literal mode, then in configmap mode: the record still says
    what was there before apilane, so a release still gives it back."""
    literal = apply_patch(
        daemonset(main_env=[{"name": SERVICE_IPS_PORTS, "value": "10.0.0.1:443"}]),
        diff(
            daemonset(main_env=[{"name": SERVICE_IPS_PORTS, "value": "10.0.0.1:443"}]),
            render(snap()),
        ),
    )
    adopted_diff = diff(literal, render(snap()), configmap=CM)
    assert all(c.new_ref == CM for c in adopted_diff.changes)
    assert adopted_diff.managed_env["calico-node"][SERVICE_IPS_PORTS] == "10.0.0.1:443"
    adopted = apply_patch(literal, adopted_diff)
    back = diff(adopted, render(snap()))  # literal mode again
    assert {c.new for c in back.changes if c.name == SERVICE_IPS_PORTS} == {"10.96.0.1:443"}
    assert all(c.old_ref == CM and c.new_ref is None for c in back.changes)
    assert back.patch() is not None
    assert {"name": SERVICE_IPS_PORTS, "value": "10.96.0.1:443", "valueFrom": None} in (
        back.patch()["spec"]["template"]["spec"]["containers"][0]["env"]  # type: ignore[index]
    )
    assert back.managed_env["calico-node"][SERVICE_IPS_PORTS] == "10.0.0.1:443"


@pytest.mark.parametrize(
    ("entry", "source"),
    [
        pytest.param(ref(SERVICE_IPS_PORTS, "someone-elses"), "configMapKeyRef", id="other-cm"),
        pytest.param(
            {
                "name": SERVICE_IPS_PORTS,
                "valueFrom": {"configMapKeyRef": {"name": CM, "key": "OTHER_KEY"}},
            },
            "configMapKeyRef",
            id="other-key",
        ),
        pytest.param(
            {"name": SERVICE_IPS_PORTS, "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}},
            "secretKeyRef",
            id="secret",
        ),
    ],
)
def test_a_value_from_elsewhere_is_a_conflict_in_configmap_mode(
    entry: dict[str, Any], source: str
) -> None:
    result = diff(daemonset(main_env=[entry]), render(snap()), configmap=CM)
    (conflict,) = result.conflicts
    assert (conflict.container, conflict.name, conflict.source) == (
        "calico-node",
        SERVICE_IPS_PORTS,
        source,
    )
    assert all(c.container != "calico-node" or c.name != SERVICE_IPS_PORTS for c in result.changes)


def test_a_ref_someone_else_made_to_our_configmap_is_taken_as_is_and_never_claimed() -> None:
    live = daemonset(main_env=[ref(SERVICE_IPS_PORTS)])
    result = diff(live, render(snap()), configmap=CM)
    assert all(c.container != "calico-node" or c.name != SERVICE_IPS_PORTS for c in result.changes)
    assert SERVICE_IPS_PORTS not in result.managed_env["calico-node"]
    # And literal mode does not overwrite it either: it is not apilane's.
    literal = diff(live, render(snap()))
    assert [c.name for c in literal.conflicts] == [SERVICE_IPS_PORTS]


def test_a_recorded_ref_to_a_renamed_configmap_moves_to_the_new_name() -> None:
    live = daemonset(
        main_env=[ref(SERVICE_IPS_PORTS, "old-name")],
        record={"calico-node": {SERVICE_IPS_PORTS: None}},
    )
    result = diff(live, render(snap()), configmap=CM)
    main = {c.name: (c.old_ref, c.new_ref) for c in result.changes if c.container == "calico-node"}
    assert main == {SERVICE_IPS_PORTS: ("old-name", CM), APISERVER_ENDPOINTS: (None, CM)}
    assert result.managed_env["calico-node"][SERVICE_IPS_PORTS] is None  # still created by us


def test_coexistence_refs_come_and_go_with_kube_proxys_manager() -> None:
    bare = daemonset()
    managed = render(snap(managed_by="label:app.kubernetes.io/managed-by=Helm"))
    with_felix = apply_patch(bare, diff(bare, managed, configmap=CM))
    assert env(with_felix, "containers", "calico-node")[IPTABLES_CLEANUP] == cm_ref(
        IPTABLES_CLEANUP
    )
    released = diff(with_felix, render(snap()), configmap=CM)
    assert {(c.name, c.new, c.new_ref) for c in released.changes} == {
        (IPTABLES_CLEANUP, None, None),
        (HEALTHZ_PORT, None, None),
    }
    assert {c.name for c in released.removals} == {IPTABLES_CLEANUP, HEALTHZ_PORT}
    # The ConfigMap keeps the keys while the live template still reads them...
    live_cm = configmap.plan(None, managed.env, namespace=NS, name=CM).body()
    assert live_cm is not None
    still_read = configmap.plan(
        live_cm,
        render(snap()).env,
        namespace=NS,
        name=CM,
        referenced=configmap.referenced_keys(with_felix, CM),
    )
    assert still_read.unchanged
    # ...and drops them once nothing does.
    after = apply_patch(with_felix, released)
    dropped = configmap.plan(
        live_cm,
        render(snap()).env,
        namespace=NS,
        name=CM,
        referenced=configmap.referenced_keys(after, CM),
    )
    assert {(c.key, c.new) for c in dropped.changes} == {
        (IPTABLES_CLEANUP, None),
        (HEALTHZ_PORT, None),
    }


# --------------------------------------------------------------------------- release


def test_release_removes_created_refs_and_gives_replaced_values_back() -> None:
    original = daemonset(init_env=[{"name": SERVICE_IPS_PORTS, "value": "10.0.0.1:443"}])
    adopted = apply_patch(original, diff(original, render(snap()), configmap=CM))
    undone = release(adopted)
    restored = apply_patch(adopted, undone)
    assert env(restored, "initContainers", "ebpf-bootstrap") == {SERVICE_IPS_PORTS: "10.0.0.1:443"}
    assert env(restored, "containers", "calico-node") == {}
    assert env(restored, "containers", "other") == {"KEEP": "me"}
    assert MANAGED_ENV_ANNOTATION not in restored["metadata"]["annotations"]
    assert release(restored).unchanged


def test_release_keeping_values_writes_the_configmaps_values_as_literals() -> None:
    adopted = apply_patch(daemonset(), diff(daemonset(), render(snap()), configmap=CM))
    values = {SERVICE_IPS_PORTS: "10.96.0.1:443", APISERVER_ENDPOINTS: "192.168.5.4:6443"}
    undone = release(adopted, keep_values=values)
    literal = apply_patch(adopted, undone)
    assert env(literal, "initContainers", "ebpf-bootstrap") == values
    assert env(literal, "containers", "calico-node") == values
    # Still apilane's (created by it): a plain release afterwards removes them.
    assert {c.name for c in release(literal).removals} == set(values)


def test_release_leaves_a_ref_another_manager_took_over() -> None:
    adopted = apply_patch(daemonset(), diff(daemonset(), render(snap()), configmap=CM))
    adopted["metadata"]["managedFields"] = [
        {
            "manager": "someone",
            "fieldsV1": {
                "f:spec": {
                    "f:template": {
                        "f:spec": {
                            "f:containers": {
                                'k:{"name":"calico-node"}': {
                                    "f:env": {
                                        f'k:{{"name":"{SERVICE_IPS_PORTS}"}}': {"f:valueFrom": {}}
                                    }
                                }
                            }
                        }
                    }
                }
            },
        },
        {"manager": FIELD_MANAGER, "fieldsV1": {}},
    ]
    undone = release(adopted)
    kept = [k for k in undone.kept if k.container == "calico-node"]
    assert [k.name for k in kept] == [SERVICE_IPS_PORTS]
    assert "someone" in kept[0].why


# --------------------------------------------------------------------------- the ConfigMap


def test_a_missing_configmap_is_created_marked_as_apilanes() -> None:
    desired = render(snap())
    result = configmap.plan(None, desired.env, namespace=NS, name=CM)
    body = result.body(annotations={"apilane.dev/applied-generation": "1"})
    assert body == {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": CM,
            "namespace": NS,
            "labels": {MANAGED_BY_LABEL: MANAGED_BY},
            "annotations": {"apilane.dev/applied-generation": "1"},
        },
        "data": dict(desired.env),
    }
    assert "+KUBERNETES_SERVICE_IPS_PORTS=10.96.0.1:443" in result.text()


def test_an_endpoint_change_is_a_merge_patch_of_the_changed_keys_only() -> None:
    live = configmap.plan(None, render(snap()).env, namespace=NS, name=CM).body()
    assert live is not None
    live["metadata"]["resourceVersion"] = "42"
    result = configmap.plan(live, render(snap("192.168.5.9:6443")).env, namespace=NS, name=CM)
    assert result.changes == (
        DataChange(key=APISERVER_ENDPOINTS, old="192.168.5.4:6443", new="192.168.5.9:6443"),
    )
    assert result.body() == {
        "metadata": {"annotations": {}, "resourceVersion": "42"},
        "data": {APISERVER_ENDPOINTS: "192.168.5.9:6443"},
    }
    assert configmap.plan(live, render(snap()).env, namespace=NS, name=CM).body() is None


def test_a_configmap_apilane_did_not_make_is_never_written() -> None:
    foreign = {"metadata": {"name": CM, "namespace": NS}, "data": {"X": "y"}}
    result = configmap.plan(foreign, render(snap()).env, namespace=NS, name=CM)
    assert result.foreign and result.unchanged and result.body() is None
    assert "APILANE_CONFIGMAP_NAME" in result.problems[0]


def test_referenced_keys_are_those_of_this_configmap_in_any_container() -> None:
    live = daemonset(
        init_env=[ref(SERVICE_IPS_PORTS)],
        main_env=[ref(APISERVER_ENDPOINTS, "another"), {"name": "X", "value": "1"}],
    )
    assert configmap.referenced_keys(live, CM) == {SERVICE_IPS_PORTS}
    assert configmap.referenced_keys(None, CM) == frozenset()
    assert configmap.referenced_keys({"spec": "odd"}, CM) == frozenset()


# --------------------------------------------------------------------------- tigera-operator


@pytest.mark.parametrize(
    ("metadata", "evidence"),
    [
        pytest.param(
            {
                "ownerReferences": [
                    {
                        "apiVersion": "operator.tigera.io/v1",
                        "kind": "Installation",
                        "name": "default",
                        "controller": True,
                    }
                ]
            },
            "ownerReference Installation/default (operator.tigera.io/v1)",
            id="owner-reference",
        ),
        pytest.param(
            {"labels": {"app.kubernetes.io/managed-by": "tigera-operator"}},
            "label app.kubernetes.io/managed-by=tigera-operator",
            id="managed-by",
        ),
        pytest.param(
            {"labels": {"app.kubernetes.io/component": "Installation.operator.tigera.io"}},
            "label app.kubernetes.io/component=Installation.operator.tigera.io",
            id="component",
        ),
        pytest.param(
            {
                "labels": {"app.kubernetes.io/managed-by": "tigera-operator"},
                "annotations": {"unsupported.operator.tigera.io/ignore": "true"},
            },
            None,
            id="told-to-ignore",
        ),
        pytest.param(
            {"ownerReferences": [{"apiVersion": "apps/v1", "kind": "Other", "name": "x"}]},
            None,
            id="other-owner",
        ),
        pytest.param({"labels": {"app.kubernetes.io/managed-by": "Helm"}}, None, id="helm"),
        pytest.param({"ownerReferences": "odd", "labels": ["odd"]}, None, id="odd-shapes"),
    ],
)
def test_tigera_operator_is_recognised_by_what_it_leaves_on_its_objects(
    metadata: dict[str, Any], evidence: str | None
) -> None:
    assert controller.operator_evidence({"metadata": metadata}) == evidence


def test_the_message_points_at_bpf_network_bootstrap() -> None:
    message = controller.not_patched_message(
        "calico-system/calico-node", "label x", configmap_ref=f"{NS}/{CM}"
    )
    assert "bpfNetworkBootstrap: Enabled" in message
    assert f"ConfigMap {NS}/{CM} current" in message
    assert "ConfigMap" not in controller.not_patched_message("a/b", "x", configmap_ref=None)


# --------------------------------------------------------------------------- settings

TRUSTED = {"APILANE_TRUSTED_KEYS": SigningKey.generate().public_text}


def test_configmap_mode_and_auto_detection_are_the_defaults() -> None:
    settings = load(TRUSTED)
    assert (settings.render_mode, settings.configmap_name) == ("configmap", CM)
    assert settings.configmap == CM
    assert settings.detect_target and settings.daemonset_ref == "calico-system/calico-node"
    assert settings.configmap_path == f"/api/v1/namespaces/calico-system/configmaps/{CM}"


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        pytest.param(
            {"APILANE_TARGET_PRESET": "manifest"},
            ("kube-system", (), ("calico-node",), False),
            id="manifest",
        ),
        pytest.param(
            {"APILANE_TARGET_PRESET": "operator"},
            ("calico-system", ("ebpf-bootstrap",), ("calico-node",), False),
            id="operator",
        ),
        pytest.param(
            {"APILANE_TARGET_NAMESPACE": "calico"},
            ("calico", ("ebpf-bootstrap",), ("calico-node",), False),
            id="a-given-namespace-is-not-detected",
        ),
        pytest.param(
            {"APILANE_TARGET_PRESET": "manifest", "APILANE_TARGET_INIT_CONTAINERS": "init"},
            ("kube-system", ("init",), ("calico-node",), False),
            id="a-preset-field-overridden",
        ),
        pytest.param(
            {"APILANE_TARGET_CONTAINERS": "main"},
            ("calico-system", ("ebpf-bootstrap",), ("main",), False),
            id="given-containers-are-not-detected",
        ),
    ],
)
def test_presets_and_overrides(
    environ: dict[str, str], expected: tuple[str, tuple[str, ...], tuple[str, ...], bool]
) -> None:
    settings = load(TRUSTED | environ)
    assert (
        settings.target_namespace,
        settings.target_init_containers,
        settings.target_containers,
        settings.detect_target,
    ) == expected


@pytest.mark.parametrize(
    ("environ", "variable"),
    [
        ({"APILANE_RENDER_MODE": "env"}, "APILANE_RENDER_MODE"),
        ({"APILANE_TARGET_PRESET": "kubespray"}, "APILANE_TARGET_PRESET"),
        ({"APILANE_CONFIGMAP_NAME": "Not_A_Name"}, "APILANE_CONFIGMAP_NAME"),
    ],
)
def test_bad_mode_preset_and_configmap_names_are_refused(
    environ: dict[str, str], variable: str
) -> None:
    with pytest.raises(ConfigError, match=variable):
        load(TRUSTED | environ)


def test_literal_mode_has_no_configmap() -> None:
    assert load(TRUSTED | {"APILANE_RENDER_MODE": "literal"}).configmap is None


@pytest.mark.parametrize(
    ("existing", "preset"),
    [
        ({"calico-system/calico-node"}, "operator"),
        ({"kube-system/calico-node"}, "manifest"),
        ({"calico-system/calico-node", "kube-system/calico-node"}, "operator"),
        (set(), None),
        ({"kube-system/kube-proxy"}, None),
    ],
)
def test_detection_takes_the_layout_whose_daemonset_exists(
    existing: set[str], preset: str | None
) -> None:
    found = choose_preset(frozenset(existing))
    assert (found.name if found else None) == preset


def test_a_detected_preset_aims_every_target_field() -> None:
    settings = load(TRUSTED).with_preset(PRESETS["manifest"])
    assert settings.daemonset_ref == "kube-system/calico-node"
    assert (settings.target_init_containers, settings.target_containers) == ((), ("calico-node",))
    assert not settings.detect_target
    assert settings.configmap_ref == f"kube-system/{CM}"
