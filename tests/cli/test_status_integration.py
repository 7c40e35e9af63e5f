"""`apilane status` against a real nats-server and a real kube-apiserver: the sealed snapshot,
opened with the trusted keys, with the key that signed it and the trace its writer started
(read through the OpenTelemetry propagator), every node of this cluster only (listed by the
bus's KV key listing), and calico-node's env."""

from __future__ import annotations

import asyncio
import json
import secrets

import pytest
from opentelemetry.sdk.trace import TracerProvider

from apilane.cli.main import main
from apilane.kube.client import KubeClient
from apilane.model import events, subjects
from apilane.model.signing import SigningKey
from apilane.runtime.bus import Bus
from apilane.runtime.natsauth import Role
from apilane.testing.kube import ControlPlane
from apilane.testing.nats import NatsServer
from apilane.testing.nats_fixtures import ConnectAs
from apilane.testing.sealing import put_sealed, seal
from apilane.testing.snapshots import make_snapshot

pytestmark = [pytest.mark.integration, pytest.mark.nats, pytest.mark.kube]


def calico_node(namespace: str, endpoints: str) -> dict[str, object]:
    labels = {"k8s-app": "calico-node"}
    env = [
        {"name": "KUBERNETES_APISERVER_ENDPOINTS", "value": endpoints},
        {"name": "DATASTORE_TYPE", "value": "kubernetes"},
    ]
    container = {"name": "calico-node", "image": "quay.io/calico/node:v3.31.0", "env": env}
    return {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {"name": "calico-node", "namespace": namespace},
        "spec": {
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": {"containers": [container]}},
        },
    }


def node_state(cluster: str, node: str, generation: int) -> events.NodeState:
    return events.NodeState(cluster=cluster, node=node, generation=generation, digest="sha256:x")


def target_flags(bus: Bus, control_plane: ControlPlane, cluster: str, namespace: str) -> list[str]:
    """The command line's flags naming this test's NATS, API server, cluster and DaemonSet."""
    url = bus.nc.connected_url
    assert url is not None
    return [
        "--nats-url",
        f"nats://{url.hostname}:{url.port}",
        "--kubeconfig",
        str(control_plane.kubeconfig_path),
        "--cluster",
        cluster,
        "--daemonset",
        f"{namespace}/calico-node",
    ]


def as_operator(monkeypatch: pytest.MonkeyPatch, nats_server: NatsServer, cluster: str) -> None:
    """The command connects as the identity its environment names: the operator's."""
    for name, value in nats_server.env(Role.OPERATOR, cluster).items():
        monkeypatch.setenv(name, value)


async def test_status_shows_the_snapshot_its_trace_the_env_and_this_clusters_nodes(
    bus: Bus,
    kube: KubeClient,
    kube_namespace: str,
    control_plane: ControlPlane,
    nats_server: NatsServer,
    connect_as: ConnectAs,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cluster, other = f"c-{secrets.token_hex(4)}", f"c-{secrets.token_hex(4)}"
    key = SigningKey.generate()
    monkeypatch.setenv("APILANE_TRUSTED_KEYS", key.public_text)
    as_operator(monkeypatch, nats_server, cluster)
    discovery = await connect_as(Role.DISCOVERY, cluster)
    await kube.create(
        f"/apis/apps/v1/namespaces/{kube_namespace}/daemonsets",
        calico_node(kube_namespace, "198.18.0.10:6443"),
    )
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("publish snapshot") as span:
        snapshot = make_snapshot(cluster=cluster, generation=3, apiservers=["198.18.0.10:6443"])
        await put_sealed(discovery, seal(snapshot, key=key), cluster=cluster)
    trace_id = f"{span.get_span_context().trace_id:032x}"
    # Each node writes its own state, as its own identity.
    for where, node, generation in (
        (cluster, "node-b", 3),
        (cluster, "node-a", 2),
        (other, "node-z", 9),
    ):
        loader = await connect_as(Role.NODE_LOADER, where, node)
        state = node_state(where, node, generation)
        await loader.kv_put(subjects.NODE_STATE_BUCKET, subjects.node_state_key(where, node), state)
    # An entry that is not a NodeState is left out, not fatal.
    garbage = await connect_as(Role.NODE_LOADER, cluster, "garbage")
    await garbage.js.publish(
        subjects.kv_subject(subjects.NODE_STATE_BUCKET, f"{cluster}.garbage"), b"not json"
    )
    stack = target_flags(bus, control_plane, cluster, kube_namespace)

    assert await asyncio.to_thread(main, [*stack, "status", "--json"]) == 0
    view = json.loads(capsys.readouterr().out)
    assert view["generation"] == 3
    assert view["digest"] == snapshot.digest
    assert (view["trusted"], view["signed_by"]) == (True, key.key_id)
    assert view["trace_id"] == trace_id
    assert view["calico_env"] == {"KUBERNETES_APISERVER_ENDPOINTS": "198.18.0.10:6443"}
    assert view["daemonset"] == f"{kube_namespace}/calico-node"
    assert [(n["node"], n["generation"]) for n in view["nodes"]] == [("node-a", 2), ("node-b", 3)]

    assert await asyncio.to_thread(main, ["status", *stack]) == 0  # options after the command
    text = capsys.readouterr().out
    assert "snapshot generation 3" in text
    assert f"signed by {key.key_id}, expires in 60m" in text
    assert f"trace id: {trace_id}" in text
    assert "nodes (2):" in text
    assert "node-a" in text and "behind" in text and "in sync" in text
    assert "node-z" not in text


async def test_status_shows_a_snapshot_signed_by_an_unknown_key_as_untrusted(
    bus: Bus,
    kube: KubeClient,
    kube_namespace: str,
    control_plane: ControlPlane,
    nats_server: NatsServer,
    connect_as: ConnectAs,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cluster = f"c-{secrets.token_hex(4)}"
    as_operator(monkeypatch, nats_server, cluster)
    await kube.create(
        f"/apis/apps/v1/namespaces/{kube_namespace}/daemonsets",
        calico_node(kube_namespace, "198.18.0.10:6443"),
    )
    monkeypatch.setenv("APILANE_TRUSTED_KEYS", SigningKey.generate().public_text)
    forged = make_snapshot(cluster=cluster, generation=9, apiservers=["198.18.0.99:6443"])
    intruder = await connect_as(Role.DISCOVERY, cluster)
    await put_sealed(intruder, seal(forged, key=SigningKey.generate()), cluster=cluster)
    stack = target_flags(bus, control_plane, cluster, kube_namespace)
    assert await asyncio.to_thread(main, [*stack, "status"]) == 0
    text = capsys.readouterr().out
    assert "snapshot: UNTRUSTED, not shown (unknown-key: signed by ed25519:" in text
    assert "198.18.0.99" not in text
    assert await asyncio.to_thread(main, [*stack, "status", "--json"]) == 0
    view = json.loads(capsys.readouterr().out)
    assert (view["trusted"], view["generation"], view["snapshot"]) == (False, 0, None)
    assert view["untrusted"].startswith("unknown-key:")


async def test_status_against_an_unreachable_nats_says_so(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from apilane.testing.procs import free_port

    code = await asyncio.to_thread(
        main, ["--nats-url", f"nats://127.0.0.1:{free_port()}", "status"]
    )
    assert code == 1
    assert "apilane: cannot reach NATS at nats://127.0.0.1:" in capsys.readouterr().err
