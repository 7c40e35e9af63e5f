"""The one-node cluster's pure parts, checked without starting anything: the values applied
to deploy/ change exactly what this machine needs, the pod network has no default route, the
kubelet puts every pod below the dedicated child cgroup, and the host-state helpers parse
what iptables-save and the cgroup tree look like."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import pytest
import yaml

from apilane.testing import cluster

pytestmark = [pytest.mark.unit]

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def shipped() -> list[dict[str, Any]]:
    paths = sorted(DEPLOY.glob("*.yaml")) + sorted((DEPLOY / "demo").glob("*.yaml"))
    return [doc for path in paths for doc in yaml.safe_load_all(path.read_text()) if doc]


def by_name(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def env_of(doc: dict[str, Any]) -> dict[str, str]:
    container = doc["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


def test_local_values_change_only_what_this_machine_needs() -> None:
    before = shipped()
    after = cluster.local_values(before, cgroup_name="apilane-cluster-x", api_address="198.18.7.1")
    assert before == shipped(), "the shipped documents are not modified in place"
    loader = by_name(after, "DaemonSet", "apilane-node-loader")
    env = env_of(loader)
    assert env["APILANE_CGROUP_PATH"] == "/host/sys/fs/cgroup/apilane-cluster-x"
    assert env["APILANE_ALLOW_ROOT_CGROUP"] == "false"
    assert env["APILANE_BPF_PIN_DIR"] == "/sys/fs/bpf/apilane-cluster-x"
    spec = loader["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["cgroup"]["hostPath"]["path"] == "/sys/fs/cgroup/unified"
    assert volumes["run-apilane"]["hostPath"]["path"] == "/run/apilane-cluster-x"
    bpffs = next(m for m in spec["containers"][0]["volumeMounts"] if m["name"] == "bpffs")
    assert "mountPropagation" not in bpffs
    discovery = env_of(by_name(after, "Deployment", "apilane-discovery"))
    assert (discovery["KUBERNETES_SERVICE_HOST"], discovery["KUBERNETES_SERVICE_PORT"]) == (
        "198.18.7.1",
        "6443",
    )
    assert "KUBERNETES_SERVICE_HOST" not in env_of(by_name(after, "Deployment", "apilane-renderer"))
    assert by_name(after, "ConfigMap", "apilane-config")["data"]["OTEL_TRACES_EXPORTER"] == "none"
    calico = by_name(after, "DaemonSet", "calico-node")["spec"]["template"]["spec"]
    assert calico["nodeSelector"]
    # Everything else is as shipped.
    changed = {
        "apilane-node-loader",
        "apilane-discovery",
        "apilane-config",
        "calico-node",
        "kube-proxy",
    }
    assert [d for d in after if d["metadata"]["name"] not in changed] == [
        d for d in before if d["metadata"]["name"] not in changed
    ]


def test_pod_network_routes_the_pod_subnet_and_service_range_only(tmp_path: Path) -> None:
    conflist = cluster.cni_conflist(name="n", bridge="b", subnet="198.18.9.0/24", ipam_dir=tmp_path)
    routes = conflist["plugins"][0]["ipam"]["routes"]
    assert {r["dst"] for r in routes} == {"198.18.9.0/24", cluster.SERVICE_RANGE}
    assert conflist["plugins"][0]["ipMasq"] is False


def test_kubelet_puts_pods_below_the_child_cgroup_and_leaves_iptables_alone(tmp_path: Path) -> None:
    config = cluster.kubelet_config(
        address="198.18.9.1",
        client_ca=tmp_path / "ca.crt",
        cgroup_root="/apilane-cluster-x",
        pod_logs=tmp_path / "logs",
        cluster_dns="198.18.9.1",
    )
    assert config["cgroupRoot"] == "/apilane-cluster-x"
    assert config["makeIPTablesUtilChains"] is False
    assert config["clusterDNS"] == ["198.18.9.1"]


def test_containerd_clamps_oom_score_adj_and_uses_its_own_socket(tmp_path: Path) -> None:
    text = cluster.containerd_config(tmp_path, sandbox_image="x/pause:1", cni_conf_dir=tmp_path)
    assert "restrict_oom_score_adj = true" in text
    assert f'address = "{tmp_path}/containerd.sock"' in text


def test_corefile_answers_cluster_names_only(tmp_path: Path) -> None:
    text = cluster.corefile(address="198.18.9.1", kubeconfig=tmp_path / "k")
    assert "bind 198.18.9.1" in text and "forward" not in text


def test_iptables_chains_lists_user_chains_by_table() -> None:
    saved = "*filter\n:INPUT ACCEPT [0:0]\n:KUBE-FIREWALL - [0:0]\nCOMMIT\n*nat\n:KUBE-X - [0:0]\n"
    assert cluster.iptables_chains(saved) == {
        ("filter", "KUBE-FIREWALL"),
        ("nat", "KUBE-X"),
    }


def test_child_cgroups_lists_every_hierarchy_deepest_first(tmp_path: Path) -> None:
    for hierarchy in ("unified", "memory"):
        (tmp_path / hierarchy / "c1" / "kubepods" / "pod1").mkdir(parents=True)
    (tmp_path / "cpu" / "other").mkdir(parents=True)
    found = cluster.child_cgroups("c1", tmp_path)
    assert len(found) == 6 and all("c1" in p.parts for p in found)
    assert [len(p.parts) for p in found] == sorted((len(p.parts) for p in found), reverse=True)


def test_nats_volumes_are_pre_bound_to_the_statefulset_claims(tmp_path: Path) -> None:
    volumes = cluster.nats_volumes(tmp_path)
    assert [v["spec"]["claimRef"]["name"] for v in volumes] == [f"data-nats-{i}" for i in range(3)]


def test_running_calico_node_runs_every_container_and_keeps_the_env_as_shipped() -> None:
    before = cluster.local_values(shipped(), cgroup_name="c", api_address="198.18.7.1")
    after = cluster.running_calico_node(before, image="ghcr.io/apilane/renderer:0.1.0")
    shipped_calico = by_name(shipped(), "DaemonSet", "calico-node")["spec"]["template"]["spec"]
    spec = by_name(after, "DaemonSet", "calico-node")["spec"]["template"]["spec"]
    assert "nodeSelector" not in spec and spec["hostNetwork"] is False
    for kind in ("initContainers", "containers"):
        assert [c["name"] for c in spec[kind]] == [c["name"] for c in shipped_calico[kind]]
        for container, original in zip(spec[kind], shipped_calico[kind], strict=True):
            assert container["image"] == "ghcr.io/apilane/renderer:0.1.0"
            assert container["env"] == original["env"]
            script = container["command"][-1]
            assert "$KUBERNETES_APISERVER_ENDPOINTS" in script
            assert ("trap" in script) == (kind == "containers")
    assert [d for d in after if d["metadata"]["name"] != "calico-node"] == [
        d for d in before if d["metadata"]["name"] != "calico-node"
    ]
    assert by_name(before, "DaemonSet", "calico-node")["spec"]["template"]["spec"]["nodeSelector"]


def test_apiserver_addresses_are_on_the_subnet_and_never_a_pods() -> None:
    subnet = ipaddress.IPv4Network("198.18.9.0/24")
    conflist = cluster.cni_conflist(name="n", bridge="b", subnet=str(subnet), ipam_dir=Path("/x"))
    [[pod_range]] = conflist["plugins"][0]["ipam"]["ranges"]
    pod_end = ipaddress.IPv4Address(pod_range["rangeEnd"])
    addresses = [cluster.apiserver_address(subnet, i) for i in range(cluster.MAX_APISERVERS)]
    assert addresses[0] == "198.18.9.1"  # the bridge's own, the pods' gateway
    assert len(set(addresses)) == cluster.MAX_APISERVERS
    assert all(ipaddress.IPv4Address(a) in subnet for a in addresses)
    assert all(ipaddress.IPv4Address(a) > pod_end for a in addresses[1:])
    # The last host stays free for a test's own address.
    assert str(subnet.broadcast_address - 1) not in addresses
    assert int(pod_end) - int(subnet.network_address) > 200


def test_a_cluster_runs_one_to_max_apiservers() -> None:
    with pytest.raises(ValueError, match="apiservers"):
        cluster.OneNodeCluster(None, apiservers=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="apiservers"):
        cluster.OneNodeCluster(None, apiservers=cluster.MAX_APISERVERS + 1)  # type: ignore[arg-type]
