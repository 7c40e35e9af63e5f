"""deploy/: what the manifests say, checked without an apiserver (the apiserver checks are in
test_manifests.py): probes, replicas, security settings, host mounts, that every
APILANE_* variable they set is read by the service that gets it, and NATS: the committed
server config is the generator's, and each service mounts only its own identity."""

from __future__ import annotations

import posixpath
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from apilane.runtime import natsauth

pytestmark = [pytest.mark.unit]

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
SERVICE_SOURCES = {
    "apilane-discovery": REPO / "services/discovery/src",
    "apilane-renderer": REPO / "services/renderer/src",
    "apilane-node-loader": REPO / "services/node-loader/src",
}


def manifest_files() -> list[Path]:
    return sorted(DEPLOY.glob("*.yaml"))


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def all_documents() -> list[tuple[Path, dict[str, Any]]]:
    return [(path, doc) for path in manifest_files() for doc in documents(path)]


def by_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for _, doc in all_documents() if doc["kind"] == kind}


def test_every_manifest_is_well_formed() -> None:
    files = manifest_files()
    assert files, "deploy/ holds no manifests"
    seen: set[tuple[str, str, str]] = set()
    for path, doc in all_documents():
        for field in ("apiVersion", "kind", "metadata"):
            assert field in doc, f"{path.name}: a document without {field}"
        meta = doc["metadata"]
        key = (doc["kind"], meta.get("namespace", ""), meta["name"])
        assert key not in seen, f"{path.name}: {key} defined twice"
        seen.add(key)
        assert meta.get("labels", {}).get("app.kubernetes.io/part-of") == "apilane", (
            f"{path.name}: {doc['kind']}/{meta['name']} lacks app.kubernetes.io/part-of=apilane"
        )


@pytest.mark.parametrize("name", ["apilane-discovery", "apilane-renderer"])
def test_controllers_run_two_leader_elected_restricted_replicas(name: str) -> None:
    deployment = by_kind("Deployment")[name]
    spec = deployment["spec"]
    assert spec["replicas"] == 2
    pod = spec["template"]["spec"]
    assert pod["serviceAccountName"] == name
    assert pod["securityContext"]["runAsNonRoot"] is True
    [container] = pod["containers"]
    env = {item["name"]: item for item in container["env"]}
    assert env["APILANE_LEADER_ELECTION"]["value"] == "true"
    assert env["APILANE_POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["OTEL_SERVICE_NAME"]["value"] == name
    port = int(env["APILANE_HTTP_PORT"]["value"])
    assert port == 8080
    [declared] = container["ports"]
    assert declared["containerPort"] == port
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]


def test_node_loader_runs_privileged_on_every_node() -> None:
    daemonset = by_kind("DaemonSet")["apilane-node-loader"]
    pod = daemonset["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True
    # Socket destruction enters every pod's network namespace through /proc/<pid>/ns/net.
    assert pod["hostPID"] is True
    assert pod["automountServiceAccountToken"] is False
    assert {"operator": "Exists"} in pod["tolerations"], "must tolerate every taint"
    [container] = pod["containers"]
    assert container["securityContext"]["privileged"] is True
    env = {item["name"]: item for item in container["env"]}
    assert env["APILANE_NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert env["APILANE_ALLOW_ROOT_CGROUP"]["value"] == "true"
    assert env["APILANE_MAP_BACKEND"]["value"] == "bpf"
    port = int(env["APILANE_HTTP_PORT"]["value"])
    assert container["ports"][0]["containerPort"] == port
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["port"] == "http"
    host_paths = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert host_paths == {
        "bpffs": "/sys/fs/bpf",
        "cgroup": "/sys/fs/cgroup",
        "lib-modules": "/lib/modules",
        "usr-src": "/usr/src",
        "run-apilane": "/run/apilane",
    }
    for read_only in ("cgroup", "lib-modules", "usr-src"):
        assert mounts[read_only]["readOnly"] is True
    assert env["APILANE_CGROUP_PATH"]["value"] == mounts["cgroup"]["mountPath"]


def test_every_apilane_variable_is_read_by_its_service() -> None:
    """A variable the code never reads is a setting that silently does nothing."""
    config = by_kind("ConfigMap")["apilane-config"]["data"]
    workloads = {**by_kind("Deployment"), **by_kind("DaemonSet")}
    for name, source in SERVICE_SOURCES.items():
        pod = workloads[name]["spec"]["template"]["spec"]
        names = set(config) | {item["name"] for c in pod["containers"] for item in c["env"]}
        code = source_text(source) + "".join(
            source_text(REPO / "shared" / library / "src")
            for library in ("model", "runtime", "kube")
        )
        for variable in sorted(n for n in names if n.startswith("APILANE_")):
            assert reads_variable(code, variable), f"{name}: nothing reads {variable}"


def source_text(root: Path) -> str:
    return "\n".join(p.read_text() for p in root.rglob("*.py") if "testing" not in p.parts)


def reads_variable(code: str, variable: str) -> bool:
    """`Env` reads drop the APILANE_ prefix (env.int("HTTP_PORT", ...)); accept both forms."""
    short = variable.removeprefix("APILANE_")
    return variable in code or re.search(rf"""\(\s*["']{re.escape(short)}["']""", code) is not None


# --------------------------------------------------------------------------- NATS


def nats_statefulset() -> dict[str, Any]:
    return by_kind("StatefulSet")["nats"]


def test_the_nats_config_is_the_generators_output() -> None:
    committed = by_kind("ConfigMap")["nats-config"]["data"]["nats.conf"]
    assert committed == natsauth.render_server_config(natsauth.PROFILES["kubernetes"]), (
        "regenerate it: python -m apilane.runtime.natsauth server-config kubernetes"
    )


def test_nats_mounts_its_config_the_generated_accounts_and_its_certificate() -> None:
    pod = nats_statefulset()["spec"]["template"]["spec"]
    [container] = pod["containers"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    secrets = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    assert secrets == {"accounts": "apilane-nats-accounts", "tls": "apilane-nats-tls"}
    config_file = posixpath.join(mounts["config"], "nats.conf")
    assert container["args"] == ["--config", config_file]
    profile = natsauth.PROFILES["kubernetes"]
    # nats-server resolves an include against the config file's directory.
    included = posixpath.normpath(posixpath.join(mounts["config"], profile.accounts_include))
    assert included == posixpath.join(mounts["accounts"], "accounts.conf")
    assert profile.tls is not None and profile.cluster is not None
    for tls in (profile.tls, profile.cluster.tls):
        assert tls is not None
        for path in (tls.cert_file, tls.key_file, tls.ca_file):
            assert posixpath.dirname(path) == mounts["tls"], path
    assert profile.cluster.tls is not None  # routes are mutual TLS (verify is forced on)


def test_clients_reach_nats_over_tls_only() -> None:
    urls = by_kind("ConfigMap")["apilane-config"]["data"]["APILANE_NATS_URL"].split(",")
    assert urls and all(url.startswith("tls://") for url in urls)


def nats_credentials(pod: dict[str, Any]) -> list[dict[str, Any]]:
    """The pod's Secret volumes of NATS identities (discovery also mounts its signing key)."""
    return [
        v
        for v in pod["volumes"]
        if v.get("secret", {}).get("secretName", "").startswith("apilane-nats")
    ]


def _container_and_pod(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    workloads = {**by_kind("Deployment"), **by_kind("DaemonSet")}
    pod = workloads[name]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    return container, pod


@pytest.mark.parametrize("service", ["discovery", "renderer"])
def test_each_controller_mounts_only_its_own_nats_identity(service: str) -> None:
    container, pod = _container_and_pod(f"apilane-{service}")
    env = {item["name"]: item.get("value") for item in container["env"]}
    [credentials] = nats_credentials(pod)
    assert credentials["secret"]["secretName"] == f"apilane-nats-{service}"
    [mount] = [m for m in container["volumeMounts"] if m["name"] == credentials["name"]]
    assert mount["readOnly"] is True
    assert env["APILANE_NATS_NKEY_SEED_FILE"] == posixpath.join(mount["mountPath"], "seed.nk")
    assert env["APILANE_NATS_TLS_CA_FILE"] == posixpath.join(mount["mountPath"], "ca.crt")


def test_each_node_loader_mounts_only_its_own_nodes_seed() -> None:
    container, pod = _container_and_pod("apilane-node-loader")
    env = {item["name"]: item.get("value") for item in container["env"]}
    [credentials] = nats_credentials(pod)
    assert credentials["secret"]["secretName"] == "apilane-nats-node-loader"
    mounts = [m for m in container["volumeMounts"] if m["name"] == credentials["name"]]
    by_path = {m["mountPath"]: m for m in mounts}
    seed = by_path[env["APILANE_NATS_NKEY_SEED_FILE"]]
    # The one key named after this pod's node, never the whole Secret.
    assert seed["subPathExpr"] == "$(APILANE_NODE_NAME).nk" and seed["readOnly"] is True
    # subPathExpr expands variables of the container's own env (the downward API here).
    assert "APILANE_NODE_NAME" in env
    assert by_path[env["APILANE_NATS_TLS_CA_FILE"]]["subPath"] == "ca.crt"
    assert all("subPath" in m or "subPathExpr" in m for m in mounts)


def test_every_nats_secret_a_workload_mounts_is_one_the_generator_makes(tmp_path: Path) -> None:
    nodes = ["node-a.example", "node-b"]
    made = natsauth.kubernetes_secrets(
        natsauth.identities_for("default", nodes), tmp_path, ca_pem=b"a CA"
    )
    generated = {item["metadata"]["name"]: item["data"] for item in made["items"]}
    mounted: dict[str, set[str]] = {}
    workloads = {**by_kind("Deployment"), **by_kind("DaemonSet"), **by_kind("StatefulSet")}
    for workload in workloads.values():
        pod = workload["spec"]["template"]["spec"]
        secrets = {v["name"]: v["secret"]["secretName"] for v in nats_credentials(pod)}
        for container in pod["containers"]:
            for mount in container["volumeMounts"]:
                if mount["name"] in secrets:
                    keys = mounted.setdefault(secrets[mount["name"]], set())
                    keys.add(mount.get("subPath") or mount.get("subPathExpr") or "")
    # The server's certificate comes from cert-manager or your CA (README.md), not from us.
    assert mounted.pop("apilane-nats-tls") == {""}
    assert set(mounted) <= set(generated)
    for name, keys in mounted.items():
        for key in keys - {"", "$(APILANE_NODE_NAME).nk"}:
            assert key in generated[name], (name, key)
    node_keys = set(generated["apilane-nats-node-loader"]) - {"ca.crt"}
    assert node_keys == {f"{node}.nk" for node in nodes}
    assert set(generated["apilane-nats-accounts"]) == {"accounts.conf"}
