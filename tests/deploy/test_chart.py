"""The Helm chart deploy/helm/apilane, rendered by the pinned helm: lint-clean in strict mode,
its default rendering is exactly deploy/*.yaml (object by object), each value reaches the
objects it should, bad values fail with a message, and every rendering below passes a
server-side dry-run apply and the RBAC matrix on the real kube-apiserver."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from apilane.kube.client import KubeClient
from apilane.model.signing import SigningKey
from apilane.testing import chart
from apilane.testing.manifests import (
    BASE_NAMESPACES,
    access_matrix,
    dry_run_apply_all,
    named_access_matrix,
    named_needs,
    rbac_created,
    service_needs,
    wrong_accesses,
)
from apilane.testing.procs import ComponentMissing

pytestmark = [pytest.mark.helm]

ObjectMap = dict[chart.ObjectKey, dict[str, Any]]

CUSTOM_TOLERATIONS = [
    {"key": "dedicated", "operator": "Equal", "value": "infra", "effect": "NoSchedule"}
]
CUSTOM_RESOURCES = {"requests": {"cpu": "100m", "memory": "96Mi"}, "limits": {"memory": "384Mi"}}
# Named value sets: each is linted, dry-run applied on the apiserver, and checked below.
VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "custom": {
        "clusterName": "prod-eu1",
        "image": {"registry": "registry.example.internal/platform", "tag": "1.2.3"},
        "discovery": {
            "resources": CUSTOM_RESOURCES,
            "tolerations": CUSTOM_TOLERATIONS,
            "nodeSelector": {"node-role.kubernetes.io/infra": ""},
        },
        "renderer": {"resources": CUSTOM_RESOURCES, "tolerations": CUSTOM_TOLERATIONS},
        "nodeLoader": {
            "resources": CUSTOM_RESOURCES,
            "image": {"registry": "mirror.example.internal", "pullPolicy": "Always"},
        },
        "logLevel": "DEBUG",
        "leaderElection": {"leaseDuration": "30s", "renewInterval": "10s"},
    },
    # Calico installed from manifests: calico-node in kube-system, no init container; apilane
    # in a namespace of another name; the renderer only dry-runs.
    "renderer-target": {
        "namespace": {"name": "apilane-system"},
        "renderer": {
            "mode": "dry-run",
            "target": {
                "namespace": "kube-system",
                "daemonSet": "calico-node",
                "containers": ["calico-node"],
                "initContainers": [],
            },
        },
    },
    # Literal env in the pod template: no ConfigMap, so no ConfigMap permissions.
    "renderer-literal": {"renderer": {"envSource": "literal", "target": {"preset": "manifest"}}},
    "tracing-off": {"tracing": {"enabled": False}},
    "tracing-grpc": {
        "tracing": {"endpoint": "http://tempo.monitoring.svc:4317", "protocol": "grpc"}
    },
    "external-nats-signed": {
        "nats": {
            "bundled": {"enabled": False},
            "urls": ["tls://nats-a.example.internal:4222", "tls://nats-b.example.internal:4222"],
            "credentialsSecretPrefix": "acme-nats",
            "tls": {"caSecret": "acme-nats-ca"},
        },
        "signing": {
            "trustedKeys": [SigningKey.generate().public_text],
            "keySecret": "apilane-signing",
        },
    },
}


def rendered(values: Mapping[str, Any], helm: str) -> ObjectMap:
    return chart.by_key(chart.documents(chart.render(values, helm=helm)))


def deploy_objects() -> ObjectMap:
    return chart.by_key(
        [
            doc
            for path in sorted(chart.DEPLOY.glob("*.yaml"))
            for doc in chart.documents(path.read_text())
        ]
    )


def named(objects: ObjectMap, kind: str, name: str) -> dict[str, Any]:
    [found] = [doc for (k, _, n), doc in objects.items() if (k, n) == (kind, name)]
    return found


def container(objects: ObjectMap, kind: str, name: str) -> dict[str, Any]:
    only: dict[str, Any]
    [only] = named(objects, kind, name)["spec"]["template"]["spec"]["containers"]
    return only


def env_of(objects: ObjectMap, kind: str, name: str) -> dict[str, Any]:
    return {item["name"]: item.get("value", item) for item in container(objects, kind, name)["env"]}


WORKLOADS = (
    ("Deployment", "apilane-discovery"),
    ("Deployment", "apilane-renderer"),
    ("DaemonSet", "apilane-node-loader"),
)


# --------------------------------------------------------------------------- the tools


def test_helm_and_promtool_are_the_pinned_builds(helm: str, promtool: str) -> None:
    version = chart.run_tool([helm, "version", "--template", "{{.Version}}"])
    assert version == chart.HELM_VERSION
    assert f"version {chart.PROMETHEUS_VERSION}" in chart.run_tool([promtool, "--version"])
    script = (chart.REPO / "tools/install-chart-tools.sh").read_text()
    assert f"HELM_VERSION={chart.HELM_VERSION}\n" in script
    assert f"PROMETHEUS_VERSION={chart.PROMETHEUS_VERSION}\n" in script


def test_an_override_that_is_not_executable_fails_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, helm: str
) -> None:
    monkeypatch.setenv("APILANE_HELM", str(tmp_path / "helm"))
    with pytest.raises(ComponentMissing, match="APILANE_HELM"):
        chart.find_helm()
    monkeypatch.setenv("APILANE_HELM", helm)
    assert chart.find_helm() == helm
    monkeypatch.delenv("APILANE_HELM")
    monkeypatch.setenv("APILANE_CACHE", str(tmp_path))
    with pytest.raises(ComponentMissing, match="make setup"):
        chart.find_helm()


# --------------------------------------------------------------------------- the chart


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_lint_is_clean_in_strict_mode(name: str, helm: str) -> None:
    output = chart.lint(VALUE_SETS[name], helm=helm)
    assert "0 chart(s) failed" in output
    assert "[WARNING]" not in output and "[ERROR]" not in output


def test_the_default_rendering_is_exactly_deploy(helm: str) -> None:
    """deploy/*.yaml is what the chart renders with its defaults: same objects, same fields
    (order and formatting aside). After changing the chart, `make manifests` rewrites deploy/;
    a change made to deploy/ by hand belongs in deploy/helm/apilane/templates first."""
    differences = chart.compare_objects(
        deploy_objects(), rendered({}, helm), names=("deploy/", "the chart")
    )
    assert not differences, (
        "deploy/ and the chart's default rendering differ (port the change into the chart,"
        " then run `make manifests`):\n" + "\n".join(differences)
    )


def test_the_plain_rules_file_is_the_charts_rendering(helm: str) -> None:
    written = yaml.safe_load(chart.RULES_FILE.read_text())
    assert written == yaml.safe_load(chart.alert_rules(helm=helm)), (
        f"{chart.RULES_FILE.relative_to(chart.REPO)} is stale: run `make manifests`"
    )
    alerts = [rule["alert"] for group in written["groups"] for rule in group["rules"]]
    assert len(alerts) == len(set(alerts)) >= 5


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_every_mount_has_its_volume_and_every_variable_is_set_once(name: str, helm: str) -> None:
    objects = rendered(VALUE_SETS[name], helm)
    for kind, workload in WORKLOADS:
        pod = named(objects, kind, workload)["spec"]["template"]["spec"]
        volumes = {volume["name"] for volume in pod.get("volumes", [])}
        for item in pod["containers"]:
            mounts = {mount["name"] for mount in item.get("volumeMounts", [])}
            assert mounts <= volumes, (workload, mounts - volumes)
            names = [variable["name"] for variable in item["env"]]
            assert len(names) == len(set(names)), (workload, names)


def test_custom_cluster_name_registry_resources_and_scheduling(helm: str) -> None:
    objects = rendered(VALUE_SETS["custom"], helm)
    config = named(objects, "ConfigMap", "apilane-config")["data"]
    assert config["APILANE_CLUSTER"] == "prod-eu1"
    assert config["APILANE_LOG_LEVEL"] == "DEBUG"
    assert container(objects, "Deployment", "apilane-discovery")["image"] == (
        "registry.example.internal/platform/apilane/discovery:1.2.3"
    )
    loader = container(objects, "DaemonSet", "apilane-node-loader")
    assert loader["image"] == "mirror.example.internal/apilane/node-loader:1.2.3"
    assert loader["imagePullPolicy"] == "Always"
    for kind, workload in WORKLOADS:
        assert container(objects, kind, workload)["resources"] == CUSTOM_RESOURCES
    for workload in ("apilane-discovery", "apilane-renderer"):
        pod = named(objects, "Deployment", workload)["spec"]["template"]["spec"]
        assert pod["tolerations"] == CUSTOM_TOLERATIONS
    discovery = named(objects, "Deployment", "apilane-discovery")["spec"]["template"]["spec"]
    assert discovery["nodeSelector"] == {"node-role.kubernetes.io/infra": ""}
    # The node-loader keeps its default: every node, whatever its taints.
    loader_pod = named(objects, "DaemonSet", "apilane-node-loader")["spec"]["template"]["spec"]
    assert loader_pod["tolerations"] == [{"operator": "Exists"}]
    env = env_of(objects, "Deployment", "apilane-discovery")
    assert (env["APILANE_LEASE_DURATION"], env["APILANE_LEASE_RENEW_INTERVAL"]) == ("30s", "10s")
    assert "APILANE_LEASE_RETRY_INTERVAL" not in env


def test_renderer_target_mode_and_namespace(helm: str) -> None:
    objects = rendered(VALUE_SETS["renderer-target"], helm)
    env = env_of(objects, "Deployment", "apilane-renderer")
    assert env["APILANE_TARGET_NAMESPACE"] == "kube-system"
    assert env["APILANE_TARGET_DAEMONSET"] == "calico-node"
    assert env["APILANE_TARGET_CONTAINERS"] == "calico-node"
    assert env["APILANE_TARGET_INIT_CONTAINERS"] == "-"
    assert env["APILANE_DRY_RUN"] == "true"
    assert env["APILANE_RENDER_MODE"] == "configmap"
    assert env["APILANE_CONFIGMAP_NAME"] == "apilane-kubernetes-endpoints"
    roles = {ns for (kind, ns, name) in objects if (kind, name) == ("Role", "apilane-renderer")}
    assert roles == {"kube-system", "apilane-system"}
    namespaced = [key for key in objects if key[0] not in ("Namespace", "ClusterRole")]
    assert {ns for _, ns, _ in namespaced} - {""} == {"apilane-system", "kube-system", "default"}
    assert ("Namespace", "", "apilane-system") in objects
    urls = named(objects, "ConfigMap", "apilane-config")["data"]["APILANE_NATS_URL"]
    # The bundled servers take TLS only (nats.conf: tls with handshake_first).
    assert urls.split(",")[0] == "tls://nats-0.nats-headless.apilane-system.svc:4222"
    assert (
        "apilane-system.svc:6222" in named(objects, "ConfigMap", "nats-config")["data"]["nats.conf"]
    )


def test_stream_replicas_follow_the_bundled_servers_unless_set(helm: str) -> None:
    def replicas(values: Mapping[str, Any]) -> str:
        env = env_of(rendered(values, helm), "Deployment", "apilane-discovery")
        return str(env["APILANE_STREAM_REPLICAS"])

    assert replicas({}) == "3"
    assert replicas({"nats": {"bundled": {"replicas": 1}}}) == "1"
    assert (
        replicas({"nats": {"bundled": {"enabled": False}, "urls": ["nats://10.0.0.1:4222"]}}) == "1"
    )
    assert replicas({"nats": {"streamReplicas": 5}}) == "5"


def test_the_node_loaders_backend_probes_follow_their_values(helm: str) -> None:
    def probes(values: Mapping[str, Any]) -> dict[str, str]:
        env = env_of(rendered(values, helm), "DaemonSet", "apilane-node-loader")
        return {name: str(value) for name, value in env.items() if "PROBE" in name}

    assert probes({}) == {
        "APILANE_BACKEND_PROBE": "tcp",
        "APILANE_PROBE_INTERVAL": "300ms",
        "APILANE_PROBE_TIMEOUT": "1s",
        "APILANE_PROBE_FAILURES": "3",
        "APILANE_PROBE_PASSES": "2",
    }
    https = {"kind": "https", "interval": "1s", "failures": 5}
    assert probes({"nodeLoader": {"backendProbe": https}}) == {
        "APILANE_BACKEND_PROBE": "https",
        "APILANE_PROBE_INTERVAL": "1s",
        "APILANE_PROBE_TIMEOUT": "1s",
        "APILANE_PROBE_FAILURES": "5",
        "APILANE_PROBE_PASSES": "2",
    }


def test_tracing_off_and_on(helm: str) -> None:
    off = named(rendered(VALUE_SETS["tracing-off"], helm), "ConfigMap", "apilane-config")["data"]
    assert off["OTEL_TRACES_EXPORTER"] == "none"
    assert not any(name.startswith("OTEL_EXPORTER") for name in off)
    on = named(rendered(VALUE_SETS["tracing-grpc"], helm), "ConfigMap", "apilane-config")["data"]
    assert on["OTEL_TRACES_EXPORTER"] == "otlp"
    assert on["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://tempo.monitoring.svc:4317"
    assert on["OTEL_EXPORTER_OTLP_PROTOCOL"] == "grpc"


def test_external_nats_credentials_and_signing_keys(helm: str) -> None:
    values = VALUE_SETS["external-nats-signed"]
    objects = rendered(values, helm)
    assert not [key for key in objects if key[2].startswith("nats")], "no bundled NATS"
    config = named(objects, "ConfigMap", "apilane-config")["data"]
    assert config["APILANE_NATS_URL"] == ",".join(values["nats"]["urls"])
    assert config["APILANE_TRUSTED_KEYS"] == values["signing"]["trustedKeys"][0]
    for kind, workload in WORKLOADS:
        env = env_of(objects, kind, workload)
        # Each service's own identity, from the Secret of its own under the prefix.
        assert env["APILANE_NATS_NKEY_SEED_FILE"] == "/etc/apilane/nats/seed.nk"
        assert env["APILANE_NATS_TLS_CA_FILE"] == "/etc/apilane/nats-tls/ca.crt"
        pod = named(objects, kind, workload)["spec"]["template"]["spec"]
        secrets = {v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
        expected = {f"acme-nats-{workload.removeprefix('apilane-')}", "acme-nats-ca"}
        if workload == "apilane-discovery":
            expected.add("apilane-signing")
            assert env["APILANE_SIGNING_KEY_FILE"] == "/etc/apilane/signing/signing-key.pem"
        else:
            assert "APILANE_SIGNING_KEY_FILE" not in env
        assert secrets == expected, workload


def volumes_of(objects: ObjectMap, kind: str, name: str) -> dict[str, dict[str, Any]]:
    pod = named(objects, kind, name)["spec"]["template"]["spec"]
    return {volume["name"]: volume for volume in pod["volumes"]}


def test_by_default_discovery_signs_and_both_consumers_trust_the_configmaps_keys(
    helm: str,
) -> None:
    objects = rendered({}, helm)
    discovery = env_of(objects, "Deployment", "apilane-discovery")
    assert discovery["APILANE_SIGNING_KEY_FILE"] == "/etc/apilane/signing/signing-key.pem"
    assert "APILANE_TRUSTED_KEYS_FILE" not in discovery
    signing_volume = volumes_of(objects, "Deployment", "apilane-discovery")["signing-key"]
    assert signing_volume["secret"]["secretName"] == "apilane-signing-key"
    for kind, workload in WORKLOADS[1:]:
        env = env_of(objects, kind, workload)
        assert env["APILANE_TRUSTED_KEYS_FILE"] == "/etc/apilane/trusted/keys", workload
        assert "APILANE_SIGNING_KEY_FILE" not in env and "APILANE_OPERATOR_KEYS" not in env
        volume = volumes_of(objects, kind, workload)["trusted-keys"]
        assert volume["configMap"] == {"name": "apilane-trusted-keys"}, workload
        mounts = {m["name"]: m for m in container(objects, kind, workload)["volumeMounts"]}
        assert mounts["trusted-keys"]["mountPath"] == "/etc/apilane/trusted"
        assert mounts["trusted-keys"]["readOnly"] is True


def test_operator_keys_reach_the_node_loader_only_and_the_configmap_can_be_left_out(
    helm: str,
) -> None:
    operator = SigningKey.generate().public_text
    values = {"signing": {"operatorKeys": [operator], "trustedKeysConfigMap": ""}}
    objects = rendered(values, helm)
    assert env_of(objects, "DaemonSet", "apilane-node-loader")["APILANE_OPERATOR_KEYS"] == operator
    for kind, workload in WORKLOADS:
        env = env_of(objects, kind, workload)
        if workload != "apilane-node-loader":
            assert "APILANE_OPERATOR_KEYS" not in env, workload
        assert "APILANE_TRUSTED_KEYS_FILE" not in env, workload
        assert "trusted-keys" not in volumes_of(objects, kind, workload), workload


def test_nats_files_follow_the_credentials_and_tls_values(helm: str) -> None:
    plain = {"bundled": {"enabled": False}, "urls": ["nats://nats.example.internal:4222"]}
    # Credentials over plain NATS: the seed, no CA (a CA file would turn TLS on).
    objects = rendered({"nats": plain}, helm)
    for kind, workload in WORKLOADS:
        env = env_of(objects, kind, workload)
        assert env["APILANE_NATS_NKEY_SEED_FILE"] == "/etc/apilane/nats/seed.nk", workload
        assert "APILANE_NATS_TLS_CA_FILE" not in env, workload
    loader = container(objects, "DaemonSet", "apilane-node-loader")
    [seed] = [m for m in loader["volumeMounts"] if m["name"] == "nats-credentials"]
    assert seed["subPathExpr"] == "$(APILANE_NODE_NAME).nk"
    # Neither: nothing of NATS is mounted or set.
    objects = rendered({"nats": plain | {"credentialsSecretPrefix": ""}}, helm)
    for kind, workload in WORKLOADS:
        env = env_of(objects, kind, workload)
        assert not [name for name in env if name.startswith("APILANE_NATS_")], workload
        assert not {"nats-credentials", "nats-tls"} & set(volumes_of(objects, kind, workload))


def test_optional_objects_follow_their_values(helm: str) -> None:
    without = rendered({"namespace": {"create": False}, "renderer": {"replicas": 1}}, helm)
    assert not [key for key in without if key[0] == "Namespace"]
    assert ("PodDisruptionBudget", "apilane", "apilane-renderer") not in without
    assert ("PodDisruptionBudget", "apilane", "apilane-discovery") in without
    defaults = rendered({}, helm)
    assert not [key for key in defaults if key[0] in ("PrometheusRule", "PodMonitor")]
    monitor = rendered({"metrics": {"podMonitor": {"enabled": True}}}, helm)[
        ("PodMonitor", "apilane", "apilane")
    ]
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    assert (endpoint["port"], endpoint["path"]) == ("http", "/metrics")
    for kind, workload in WORKLOADS:
        [port] = container(defaults, kind, workload)["ports"]
        assert port["name"] == "http", workload
    [selector] = monitor["spec"]["selector"]["matchExpressions"]
    assert set(selector["values"]) == {name for _, name in WORKLOADS}
    rule_values = {"alerts": {"prometheusRule": {"enabled": True, "labels": {"release": "kps"}}}}
    rule = rendered(rule_values, helm)[("PrometheusRule", "apilane", "apilane")]
    assert rule["metadata"]["labels"]["release"] == "kps"
    assert rule["spec"] == yaml.safe_load(chart.alert_rules(helm=helm))


@pytest.mark.parametrize(
    ("values", "message"),
    [
        # values.schema.json
        ({"clusterName": "prod eu"}, "/clusterName"),
        ({"renderer": {"mode": "sometimes"}}, "/renderer/mode"),
        ({"logLevel": "LOUD"}, "/logLevel"),
        ({"clustername": "typo"}, "'clustername' not allowed"),
        ({"nats": {"urls": ["nats-0:4222"]}}, "/nats/urls/0"),
        ({"leaderElection": {"leaseDuration": "15 seconds"}}, "/leaderElection/leaseDuration"),
        ({"nodeLoader": {"backendProbe": {"kind": "icmp"}}}, "/nodeLoader/backendProbe/kind"),
        ({"nodeLoader": {"backendProbe": {"failures": 0}}}, "/nodeLoader/backendProbe/failures"),
        # the templates' checks across values
        ({"namespace": {"name": "kube-system"}}, "namespace.name"),
        ({"renderer": {"target": {"namespace": "apilane"}}}, "renderer.target.namespace"),
        ({"nats": {"bundled": {"enabled": False}}}, "nats.urls"),
        ({"tracing": {"endpoint": ""}}, "tracing.endpoint"),
    ],
)
def test_bad_values_fail_with_a_message(values: dict[str, Any], message: str, helm: str) -> None:
    with pytest.raises(chart.ChartError, match=re.escape(message)):
        chart.render(values, helm=helm)


# --------------------------------------------------------------------------- on the apiserver


def test_the_manifest_preset_and_literal_env(helm: str) -> None:
    objects = rendered(VALUE_SETS["renderer-literal"], helm)
    env = env_of(objects, "Deployment", "apilane-renderer")
    assert env["APILANE_TARGET_PRESET"] == "manifest"
    assert env["APILANE_TARGET_NAMESPACE"] == "kube-system"
    assert (env["APILANE_TARGET_INIT_CONTAINERS"], env["APILANE_TARGET_CONTAINERS"]) == (
        "-",
        "calico-node",
    )
    assert env["APILANE_RENDER_MODE"] == "literal"
    role = objects[("Role", "kube-system", "apilane-renderer")]
    assert all("configmaps" not in rule["resources"] for rule in role["rules"])


def install_namespaces(values: Mapping[str, Any]) -> tuple[str, str]:
    """(apilane's namespace, the renderer's target namespace) of a value set."""
    namespace = values.get("namespace", {}).get("name", "apilane")
    target = values.get("renderer", {}).get("target", {})
    preset = "kube-system" if target.get("preset") == "manifest" else "calico-system"
    return namespace, target.get("namespace") or preset


def renderer_configmap(values: Mapping[str, Any]) -> str | None:
    renderer = values.get("renderer", {})
    if renderer.get("envSource", "configmap") != "configmap":
        return None
    return str(renderer.get("configMap", "apilane-kubernetes-endpoints"))


@pytest.mark.integration
@pytest.mark.kube
@pytest.mark.parametrize("name", sorted(VALUE_SETS))
async def test_each_rendering_passes_server_side_dry_run_apply(
    name: str, helm: str, kube: KubeClient
) -> None:
    values = VALUE_SETS[name]
    docs = [(name, doc) for doc in rendered(values, helm).values()]
    applied = await dry_run_apply_all(kube, docs, namespaces=install_namespaces(values))
    assert len(applied) == len(docs)
    assert {"Deployment/apilane-discovery", "DaemonSet/apilane-node-loader"} <= set(applied)


@pytest.mark.integration
@pytest.mark.kube
@pytest.mark.parametrize("name", ["defaults", "renderer-target", "renderer-literal"])
async def test_rbac_of_each_rendering_is_exactly_what_the_services_need(
    name: str, helm: str, kube: KubeClient
) -> None:
    values = VALUE_SETS[name]
    namespace, target = install_namespaces(values)
    configmap = renderer_configmap(values)
    needs = service_needs(namespace=namespace, renderer_target=target, renderer_configmap=configmap)
    rows = access_matrix(needs, (*BASE_NAMESPACES, namespace, target))
    rows += named_access_matrix(
        needs, named_needs(renderer_target=target, renderer_configmap=configmap)
    )
    docs = list(rendered(values, helm).values())
    async with rbac_created(kube, docs, namespaces=(namespace, target)):
        wrong = await wrong_accesses(kube, rows, account_namespace=namespace)
    assert not wrong, f"RBAC of {name} differs from what the services need:\n" + "\n".join(wrong)
    assert any(row.expected for row in rows) and not all(row.expected for row in rows)
