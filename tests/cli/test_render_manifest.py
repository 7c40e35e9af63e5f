"""`apilane render manifest` against a real nats-server and a real kube-apiserver: the env
lines and the DaemonSet snippet, from the latest sealed snapshot on the bus (only when a
trusted key signed it and it has not expired) or straight from the API objects. Run through the console script's `main`, in a thread of its own (it runs its own
event loop, as from a shell)."""

from __future__ import annotations

import asyncio
import secrets
from datetime import timedelta
from pathlib import Path

import pytest
import yaml

from apilane.cli.main import main
from apilane.kube.client import KubeClient
from apilane.model import signing
from apilane.model.envformat import IpPort
from apilane.model.events import EndpointSnapshot, KubeProxyState
from apilane.model.signing import SigningKey
from apilane.renderer.render import APISERVER_ENDPOINTS, SERVICE_IPS_PORTS
from apilane.runtime.bus import Bus
from apilane.runtime.natsauth import Role
from apilane.testing.kube import ControlPlane
from apilane.testing.nats import NatsServer
from apilane.testing.nats_fixtures import ConnectAs
from apilane.testing.sealing import put_sealed, seal
from apilane.testing.snapshots import make_snapshot

pytestmark = [pytest.mark.integration, pytest.mark.nats]


def snapshot(cluster: str, generation: int, *, services: tuple[str, ...]) -> EndpointSnapshot:
    return make_snapshot(
        cluster=cluster,
        generation=generation,
        services=[str(IpPort.of(ip, 443)) for ip in services],
        apiservers=[str(IpPort.of("192.168.5.4", 6443))],
        kube_proxy=KubeProxyState(present=True, ready=True),
    )


def server_url(bus: Bus) -> str:
    url = bus.nc.connected_url
    assert url is not None
    return f"nats://{url.hostname}:{url.port}"


async def apilane(*argv: str) -> int:
    return await asyncio.to_thread(main, list(argv))


@pytest.fixture
def signer(monkeypatch: pytest.MonkeyPatch) -> SigningKey:
    """The key discovery signs with; the command trusts it through APILANE_TRUSTED_KEYS."""
    key = SigningKey.generate()
    monkeypatch.setenv("APILANE_TRUSTED_KEYS", key.public_text)
    return key


@pytest.fixture
def cluster(nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh cluster name; the command connects as its operator (APILANE_NATS_*)."""
    name = f"c-{secrets.token_hex(4)}"
    for variable, value in nats_server.env(Role.OPERATOR, name).items():
        monkeypatch.setenv(variable, value)
    return name


@pytest.fixture
async def discovery(bus: Bus, connect_as: ConnectAs, cluster: str) -> Bus:
    """The snapshot key's writer (`bus` has created the streams)."""
    return await connect_as(Role.DISCOVERY, cluster)


async def test_manifest_prints_env_lines_and_a_snippet_from_the_bus(
    bus: Bus,
    discovery: Bus,
    cluster: str,
    signer: SigningKey,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    namespace = f"t-{secrets.token_hex(4)}"
    sealed = seal(snapshot(cluster, 4, services=("10.96.0.1", "fd00:10:96::1")), key=signer)
    await put_sealed(discovery, sealed, cluster=cluster)
    monkeypatch.setenv("APILANE_TARGET_NAMESPACE", namespace)
    code = await apilane("render", "manifest", "--nats-url", server_url(bus), "--cluster", cluster)
    assert code == 0
    text = capsys.readouterr().out
    assert "KUBERNETES_SERVICE_IPS_PORTS=10.96.0.1:443,[fd00:10:96::1]:443\n" in text
    assert "KUBERNETES_APISERVER_ENDPOINTS=192.168.5.4:6443\n" in text
    assert f"kubectl -n {namespace} patch daemonset calico-node" in text
    assert f"# cluster {cluster}: snapshot generation 4 from NATS\n" in text
    snippet = yaml.safe_load(text.split("---\n", 1)[1])
    init = snippet["spec"]["template"]["spec"]["initContainers"][0]
    assert init["name"] == "ebpf-bootstrap"
    assert {"name": SERVICE_IPS_PORTS, "value": "10.96.0.1:443,[fd00:10:96::1]:443"} in init["env"]


async def test_manifest_options_go_before_the_command_too_and_name_the_daemonset(
    bus: Bus, discovery: Bus, cluster: str, signer: SigningKey, capsys: pytest.CaptureFixture[str]
) -> None:
    sealed = seal(snapshot(cluster, 2, services=("10.96.0.1",)), key=signer)
    await put_sealed(discovery, sealed, cluster=cluster)
    code = await apilane(
        "--nats-url",
        server_url(bus),
        "--cluster",
        cluster,
        "--daemonset",
        "kube-system/calico",
        "render",
        "manifest",
        "--format",
        "yaml",
    )
    assert code == 0
    text = capsys.readouterr().out
    assert "kubectl -n kube-system patch daemonset calico " in text
    assert "KUBERNETES_SERVICE_IPS_PORTS=" not in text  # --format yaml: the snippet only
    assert (
        yaml.safe_load(text)["spec"]["template"]["spec"]["containers"][0]["name"] == "calico-node"
    )


async def test_manifest_renders_no_snapshot_it_cannot_trust(
    bus: Bus, discovery: Bus, cluster: str, signer: SigningKey, capsys: pytest.CaptureFixture[str]
) -> None:
    forged = seal(snapshot(cluster, 5, services=("10.96.0.1",)), key=SigningKey.generate())
    await put_sealed(discovery, forged, cluster=cluster)
    argv = ("render", "manifest", "--nats-url", server_url(bus), "--cluster", cluster)
    assert await apilane(*argv) == 1
    captured = capsys.readouterr()
    assert "apilane: the snapshot on the bus is not trusted: signed by ed25519:" in captured.err
    assert "KUBERNETES_" not in captured.out

    expired = seal(
        snapshot(cluster, 6, services=("10.96.0.1",)),
        key=signer,
        issued_at=signing.utcnow() - timedelta(hours=2),
        ttl=timedelta(hours=1),
    )
    await put_sealed(discovery, expired, cluster=cluster)
    assert await apilane(*argv) == 1
    captured = capsys.readouterr()
    assert "apilane: the snapshot on the bus expired at " in captured.err
    assert "KUBERNETES_" not in captured.out


async def test_manifest_from_the_bus_without_trusted_keys_says_which_to_set(
    bus: Bus,
    discovery: Bus,
    cluster: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    key = SigningKey.generate()
    await put_sealed(
        discovery, seal(snapshot(cluster, 1, services=("10.96.0.1",)), key=key), cluster=cluster
    )
    monkeypatch.delenv("APILANE_TRUSTED_KEYS", raising=False)
    monkeypatch.delenv("APILANE_TRUSTED_KEYS_FILE", raising=False)
    # Run where no local stack's keys can be found either.
    # (This server is not the local stack's, so its keys do not count either.)
    code = await apilane("render", "manifest", "--nats-url", server_url(bus), "--cluster", cluster)
    assert code == 1
    assert "name the keys that may sign it with APILANE_TRUSTED_KEYS" in capsys.readouterr().err


async def test_manifest_without_a_snapshot_says_so_and_exits_1(
    bus: Bus, cluster: str, signer: SigningKey, capsys: pytest.CaptureFixture[str]
) -> None:
    code = await apilane(
        "render", "manifest", "--nats-url", server_url(bus), "--cluster", "never-published"
    )
    assert code == 1
    err = capsys.readouterr().err
    assert "apilane: no snapshot for cluster 'never-published'" in err
    assert "is discovery running?" in err


@pytest.mark.kube
async def test_manifest_reads_a_cluster_straight_from_a_kubeconfig(
    kubernetes_endpoints: KubeClient,
    control_plane: ControlPlane,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    kube = kubernetes_endpoints
    service = await kube.get("/api/v1/namespaces/default/services/kubernetes")
    # The slice port is the Service's numeric targetPort (the apiserver's secure port), as the
    # endpoint reconciler writes it: a numeric targetPort selects by number only.
    target_port = service["spec"]["ports"][0]["targetPort"]
    await kube.create(
        "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices",
        {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": "kubernetes",
                "labels": {"kubernetes.io/service-name": "kubernetes"},
            },
            "addressType": "IPv4",
            "endpoints": [
                {"addresses": ["192.168.5.5"], "conditions": {"ready": True}},
                {"addresses": ["192.168.5.4"], "conditions": {"ready": True}},
                {"addresses": ["192.168.5.6"], "conditions": {"ready": False}},
            ],
            "ports": [{"name": "https", "port": target_port, "protocol": "TCP"}],
        },
    )
    kubeconfig = control_plane.write_kubeconfig(
        tmp_path / "kubeconfig", user="admin", groups=("system:masters",)
    )
    monkeypatch.delenv("APILANE_NATS_URL", raising=False)
    code = await apilane("render", "manifest", "--kubeconfig", str(kubeconfig), "--format", "env")
    assert code == 0
    cluster_ips = service["spec"].get("clusterIPs") or [service["spec"]["clusterIP"]]
    families = {"IPv6" if ":" in ip else "IPv4" for ip in cluster_ips}
    assert "IPv4" in families
    lines = dict(line.split("=", 1) for line in capsys.readouterr().out.splitlines())
    assert lines[APISERVER_ENDPOINTS] == f"192.168.5.4:{target_port},192.168.5.5:{target_port}"
    assert lines[SERVICE_IPS_PORTS].startswith(f"{service['spec']['clusterIP']}:443")
