"""`apilane up`: the pure parts — what each service is told, what the demo cluster is seeded
with, the stack file `apilane status` reads, and refusing to start a second stack. The stack
itself is `make up` (see README, Quick start); its processes are the harness's, tested in
tests/harness."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from apilane.cli import up
from apilane.cli.target import Flags, StackInfo, local_stack
from apilane.model.signing import SigningKey, TrustedKeys
from apilane.runtime import natsauth
from apilane.testing.nats import NatsIdentities, auth_env

pytestmark = [pytest.mark.unit]

REPO = Path(__file__).resolve().parents[2]


def nats_roles(tmp_path: Path) -> dict[str, dict[str, str]]:
    """Each role's NATS environment, as `start_stack_nats` makes it (without a server)."""
    identities = NatsIdentities(
        tmp_path / ".apilane/nats/store-auth",
        mutual_tls=True,
        identities=natsauth.identities_for(up.CLUSTER, [up.NODE_NAME]),
    )
    url = {"APILANE_NATS_URL": "tls://127.0.0.1:4222"}
    return {
        (f"{i.role}:{i.node}" if i.node else str(i.role)): url | auth_env(identities.auth(i))
        for i in identities.identities
        if i.cluster == up.CLUSTER
    }


def wiring(tmp_path: Path, data_plane: up.DataPlane) -> up.Wiring:
    return up.Wiring(
        layout=up.Layout(tmp_path),
        data_plane=data_plane,
        ports=dict(up.PREFERRED_PORTS),
        nats_url="tls://127.0.0.1:4222",
        keys=up.StackKeys.generate(tmp_path / ".apilane/keys"),
        nats_roles=nats_roles(tmp_path),
        kubeconfigs={
            "admin": tmp_path / ".apilane/kubeconfig",
            "discovery": tmp_path / ".apilane/kubeconfig-discovery",
            "renderer": tmp_path / ".apilane/kubeconfig-renderer",
        },
    )


def test_each_service_gets_its_own_port_identity_and_the_tracing_ui(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Nothing of the shell's own settings may reach the services.
    monkeypatch.setenv("APILANE_MAP_BACKEND", "bpf")
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    monkeypatch.setenv("KUBECONFIG", "/home/me/.kube/config")
    wired = wiring(tmp_path, up.DataPlane(backend="memory"))
    for service in up.SERVICES:
        env = up.service_env(wired, service)
        assert env["APILANE_CLUSTER"] == "local"
        assert env["APILANE_NATS_URL"] == "tls://127.0.0.1:4222"
        assert env["APILANE_HTTP_HOST"] == "127.0.0.1"
        assert env["APILANE_HTTP_PORT"] == str(up.PREFERRED_PORTS[service])
        assert env["OTEL_SERVICE_NAME"] == f"apilane-{service}"
        assert env["OTEL_TRACES_EXPORTER"] == "zipkin"
        assert env["OTEL_EXPORTER_ZIPKIN_ENDPOINT"] == "http://127.0.0.1:9411/api/v2/spans"
        assert "OTEL_SDK_DISABLED" not in env
    for service in ("discovery", "renderer"):
        env = up.service_env(wired, service)
        assert env["KUBECONFIG"] == str(tmp_path / f".apilane/kubeconfig-{service}")
        assert env["APILANE_LEASE_NAMESPACE"] == "apilane"
    loader = up.service_env(wired, "node-loader")
    assert "KUBECONFIG" not in loader
    assert loader["APILANE_MAP_BACKEND"] == "memory"
    assert "APILANE_CGROUP_PATH" not in loader and "APILANE_BPF_PIN_DIR" not in loader
    assert loader["APILANE_STATE_DIR"] == str(tmp_path / ".apilane/node-loader")
    assert up.service_env(wired, "renderer")["APILANE_TARGET_DAEMONSET"] == "calico-node"


def test_discovery_signs_with_a_fresh_key_the_others_trust_and_only_it_holds(
    tmp_path: Path,
) -> None:
    wired = wiring(tmp_path, up.DataPlane(backend="memory"))
    discovery = up.service_env(wired, "discovery")
    key_file = Path(discovery["APILANE_SIGNING_KEY_FILE"])
    assert key_file.stat().st_mode & 0o777 == 0o600
    signer = SigningKey.load(key_file)
    assert "APILANE_TRUSTED_KEYS" not in discovery
    assert "APILANE_OPERATOR_KEYS" not in discovery
    for service in ("renderer", "node-loader"):
        env = up.service_env(wired, service)
        assert "APILANE_SIGNING_KEY_FILE" not in env
        assert TrustedKeys.parse(env["APILANE_TRUSTED_KEYS"]).ids == (signer.key_id,)
    # Control requests: the node-loader trusts the operator's key, which is not the signer's.
    operator = SigningKey.load(wired.keys.operator_key_file)
    assert wired.keys.operator_key_file.stat().st_mode & 0o777 == 0o600
    loader = up.service_env(wired, "node-loader")
    assert TrustedKeys.parse(loader["APILANE_OPERATOR_KEYS"]).ids == (operator.key_id,)
    assert operator.key_id != signer.key_id
    assert "APILANE_OPERATOR_KEYS" not in up.service_env(wired, "renderer")


def test_each_service_connects_as_its_own_nats_identity_over_mutual_tls(tmp_path: Path) -> None:
    wired = wiring(tmp_path, up.DataPlane(backend="memory"))
    seeds = {}
    for service in up.SERVICES:
        env = up.service_env(wired, service)
        role = f"node-loader:{up.NODE_NAME}" if service == "node-loader" else service
        assert (
            env["APILANE_NATS_NKEY_SEED_FILE"]
            == wired.nats_roles[role]["APILANE_NATS_NKEY_SEED_FILE"]
        )
        for variable in ("TLS_CA_FILE", "TLS_CERT_FILE", "TLS_KEY_FILE"):
            assert Path(env[f"APILANE_NATS_{variable}"]).is_file(), (service, variable)
        seeds[service] = env["APILANE_NATS_NKEY_SEED_FILE"]
    assert len(set(seeds.values())) == 3  # nobody shares an identity
    assert wired.nats_roles["operator"]["APILANE_NATS_NKEY_SEED_FILE"] not in seeds.values()


def test_on_real_ebpf_the_node_loader_gets_a_dedicated_cgroup_and_pin_dir(tmp_path: Path) -> None:
    cgroup = Path("/sys/fs/cgroup") / up.CGROUP_NAME
    loader = up.service_env(
        wiring(tmp_path, up.DataPlane(backend="bpf", cgroup=cgroup)), "node-loader"
    )
    assert loader["APILANE_MAP_BACKEND"] == "bpf"
    assert loader["APILANE_CGROUP_PATH"] == "/sys/fs/cgroup/apilane-local"
    assert loader["APILANE_BPF_PIN_DIR"] == "/sys/fs/bpf/apilane-local"
    assert loader["APILANE_BPF_DIR"] == str(tmp_path / "bpf")
    assert "APILANE_ALLOW_ROOT_CGROUP" not in loader


def test_without_real_apiservers_the_node_loader_does_not_probe(tmp_path: Path) -> None:
    # The demo endpoints are addresses nothing may contact.
    loader = up.service_env(wiring(tmp_path, up.DataPlane(backend="memory")), "node-loader")
    assert loader["APILANE_BACKEND_PROBE"] == "off"


def test_against_the_ha_plane_the_node_loader_probes_what_it_was_told(tmp_path: Path) -> None:
    probes = {
        "APILANE_BACKEND_PROBE": "https",
        "APILANE_PROBE_NETNS": "/run/netns/alkube-abc123-c0",
        "APILANE_PROBE_CA_FILE": str(tmp_path / "ca.pem"),
    }
    base = wiring(tmp_path, up.DataPlane(backend="memory"))
    loader = up.service_env(dataclasses.replace(base, probe_env=probes), "node-loader")
    assert {k: loader[k] for k in probes} == probes
    assert "APILANE_BACKEND_PROBE" not in up.service_env(base, "discovery")


def test_forcing_memory_maps_skips_the_ebpf_checks() -> None:
    assert up.check_data_plane(memory=True) == up.DataPlane(backend="memory")


def test_the_demo_cluster_is_seeded_from_deploy_namespace_first() -> None:
    documents = up.demo_documents(REPO)
    assert (documents[0]["kind"], documents[0]["metadata"]["name"]) == ("Namespace", "apilane")
    names = {(doc["kind"], doc["metadata"]["name"]) for doc in documents}
    assert ("EndpointSlice", "kubernetes-ha") in names
    assert ("DaemonSet", "calico-node") in names
    assert ("DaemonSet", "kube-proxy") in names
    assert {
        ("ServiceAccount", "apilane-discovery"),
        ("ServiceAccount", "apilane-renderer"),
    } <= names
    # RBAC comes before the demo objects that the services then read.
    kinds = [doc["kind"] for doc in documents]
    assert kinds.index("Role") < kinds.index("EndpointSlice")


def test_with_real_apiservers_the_demo_endpoints_are_not_seeded() -> None:
    # The real apiservers register themselves; the demo addresses would only be dead ends.
    documents = up.demo_documents(REPO, demo_endpoints=False)
    kinds = {doc["kind"] for doc in documents}
    assert "EndpointSlice" not in kinds
    assert {"Namespace", "DaemonSet", "Role"} <= kinds


def test_status_reads_the_stack_file_up_writes(tmp_path: Path) -> None:
    (tmp_path / "cli").mkdir()
    (tmp_path / "cli/pyproject.toml").write_text("")
    (tmp_path / "deploy/demo").mkdir(parents=True)
    wired = wiring(tmp_path, up.DataPlane(backend="memory"))
    record = up.stack_record(wired, apiserver="https://127.0.0.1:6443", pids={"discovery": 7})
    assert record["processes"]["discovery"] == {
        "pid": 7,
        "url": "http://127.0.0.1:18081",
        "log": str(tmp_path / ".apilane/logs/discovery.log"),
    }
    assert (record["cgroup"], record["pin_dir"]) == ("", "")
    wired.layout.stack_file.parent.mkdir(exist_ok=True)
    wired.layout.stack_file.write_text(json.dumps(record))
    info = StackInfo.load(Flags(), environ={}, checkout=tmp_path)
    assert info.cluster == "local"
    assert info.nats_urls == ("tls://127.0.0.1:4222",)
    assert info.kubeconfig == str(tmp_path / ".apilane/kubeconfig")
    assert info.zipkin_url == "http://127.0.0.1:9411"
    # What status opens the snapshot with, and what control requests are sealed with.
    signer = SigningKey.load(wired.keys.signing_key_file)
    assert info.trusted_keys.ids == (signer.key_id,)
    assert info.operator_key_file == str(wired.keys.operator_key_file)
    # ...and whom the commands connect to NATS as: the operator, never a service.
    operator = wired.nats_roles["operator"]
    assert "APILANE_NATS_URL" not in record["operator_nats"]
    assert info.nats_auth.nkey_seed_file == operator["APILANE_NATS_NKEY_SEED_FILE"]
    assert info.nats_auth.tls_cert_file == operator["APILANE_NATS_TLS_CERT_FILE"]


def test_render_manifest_knows_the_local_stack_by_its_nats_url(tmp_path: Path) -> None:
    (tmp_path / "cli").mkdir()
    (tmp_path / "cli/pyproject.toml").write_text("")
    (tmp_path / "deploy/demo").mkdir(parents=True)
    wired = wiring(tmp_path, up.DataPlane(backend="memory"))
    record = up.stack_record(wired, apiserver="https://127.0.0.1:6443", pids={})
    wired.layout.stack_file.write_text(json.dumps(record))
    local = local_stack(("tls://127.0.0.1:4222",), checkout=tmp_path)
    assert local is not None
    assert (
        local.nats_auth.nkey_seed_file
        == wired.nats_roles["operator"]["APILANE_NATS_NKEY_SEED_FILE"]
    )
    assert local.trusted_keys.ids == (SigningKey.load(wired.keys.signing_key_file).key_id,)
    # Another server is not the local stack: none of its identity or keys apply there.
    assert local_stack(("tls://nats.example.internal:4222",), checkout=tmp_path) is None


def test_a_second_stack_is_refused_while_the_first_runs(tmp_path: Path) -> None:
    layout = up.Layout(tmp_path)
    layout.stack_file.parent.mkdir()
    layout.stack_file.write_text(json.dumps({"pid": os.getpid()}))
    with pytest.raises(up.UpError, match=f"already running \\(pid {os.getpid()}\\)"):
        up.clean_up_after_previous_run(layout)
    assert layout.stack_file.exists()


def test_after_a_stack_killed_outright_its_leftovers_are_removed(tmp_path: Path) -> None:
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    leftovers = tmp_path / "leftovers"
    pin_dir, cgroup = leftovers / "pins", leftovers / "cgroup"
    (pin_dir / "links").mkdir(parents=True)
    (pin_dir / "links" / "connect4").write_text("")
    cgroup.mkdir()
    layout = up.Layout(tmp_path)
    layout.stack_file.parent.mkdir()
    record = {"pid": ended.pid, "pin_dir": str(pin_dir), "cgroup": str(cgroup)}
    layout.stack_file.write_text(json.dumps(record))
    up.clean_up_after_previous_run(layout)
    assert not pin_dir.exists() and not cgroup.exists()
    assert not layout.stack_file.exists()
