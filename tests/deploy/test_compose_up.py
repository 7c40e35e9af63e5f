"""`docker compose up` for real: docker-compose.yml + docker-compose.local.yml on images built
on this machine, on a real Docker daemon (the harness's own when none runs).

Every healthcheck must pass (`up --wait`); then one change to the `kubernetes` Service's
endpoints, made through the kube-api container's apiserver from the host, must reach the
snapshot, calico-node's DaemonSet env and the node-loader's state in NATS KV, and show in
Zipkin as ONE trace from discovery's publish through the renderer's patch to the node-loader's
map writes. Taking the stack down must leave nothing behind: containers, networks, volumes,
the node-loader's child cgroup and its pinned maps.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from apilane.kube.client import KubeClient
from apilane.model import events, subjects
from apilane.model.signing import TrustedKeys, open_snapshot
from apilane.runtime.bus import Bus
from apilane.runtime.config import NatsAuth
from apilane.runtime.natsauth import Role
from apilane.testing.calico import container_env
from apilane.testing.compose import ComposeStack, host_kubeconfig
from apilane.testing.docker import DockerDaemon
from apilane.testing.images import BuildReport
from apilane.testing.kube import endpoint_slice

pytestmark = [pytest.mark.integration, pytest.mark.docker, pytest.mark.bpf]

CLUSTER = "compose"  # APILANE_CLUSTER in docker-compose.yml
NODE = "compose-node"  # the node-loader's APILANE_NODE_NAME
SLICES = "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices"
DAEMONSET = "/apis/apps/v1/namespaces/calico-system/daemonsets/calico-node"
# Added to the endpoints: an address from the benchmarking range that nothing ever contacts.
ADDED = "198.18.0.20"
WAIT = 90.0

T = TypeVar("T")


async def eventually(check: Callable[[], Awaitable[T | None]], *, what: str) -> T:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        found = await check()
        if found:
            return found
        await asyncio.sleep(0.5)
    raise AssertionError(f"timed out after {WAIT:.0f} s waiting for {what}")


def zipkin_traces(port: int, service: str) -> list[list[dict[str, Any]]]:
    query = urllib.parse.urlencode({"serviceName": service, "limit": 100, "lookback": 3600000})
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v2/traces?{query}", timeout=5) as r:
        traces: list[list[dict[str, Any]]] = json.load(r)
    return traces


def trace_of_generation(
    traces: list[list[dict[str, Any]]], generation: int
) -> list[dict[str, Any]]:
    """The trace whose `discovery publish` span carries `generation`, complete: the renderer's
    patch and the node-loader's map writes in it too. Empty until then."""
    for trace in traces:
        names = {(s.get("localEndpoint", {}).get("serviceName"), s.get("name")) for s in trace}
        published = any(
            s.get("name") == "discovery publish"
            and s.get("tags", {}).get("apilane.generation") == str(generation)
            for s in trace
        )
        if (
            published
            and {("apilane-renderer", "patch"), ("apilane-node-loader", "map writes")} <= names
        ):
            return trace
    return []


@pytest.fixture
def stack(docker_daemon: DockerDaemon, local_images: BuildReport, tmp_path: Path) -> ComposeStack:
    return ComposeStack(docker_daemon)


async def test_compose_up_change_flows_to_node_state_and_one_zipkin_trace_then_down_is_clean(
    stack: ComposeStack, tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    try:
        seconds = await asyncio.to_thread(stack.up)
        record_property("compose_up_healthy_s", round(seconds, 1))
        print(f"compose stack healthy in {seconds:.1f} s")
        await change_flows_through(stack, tmp_path)
        check_data_plane_placement(stack)
    except BaseException:
        logs = await asyncio.to_thread(stack.logs)
        (tmp_path / "compose.log").write_text(logs)
        print(f"compose logs (also in {tmp_path / 'compose.log'}):\n{logs[-20000:]}")
        raise
    finally:
        problems = await asyncio.to_thread(stack.down)
    assert problems == []
    assert stack.leftovers() == {}


def attached_programs(cgroup: Path) -> list[str]:
    shown = subprocess.run(
        ["bpftool", "-j", "cgroup", "show", str(cgroup)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    listed = json.loads(shown.stdout.strip() or "[]")
    return [str(entry.get("name", "")) for entry in listed]


def check_data_plane_placement(stack: ComposeStack) -> None:
    """The loader pinned its maps under the stack's own pin dir and attached its programs to
    the stack's own child cgroup, and to nothing above it: so `down` has something to remove,
    and the host's cgroup2 root never carried a program."""
    assert sorted(p.name for p in stack.pin_dir.iterdir()), f"nothing pinned in {stack.pin_dir}"
    assert [n for n in attached_programs(stack.cgroup) if n.startswith("apilane_")]
    assert not [n for n in attached_programs(stack.cgroup2) if n.startswith("apilane_")]


async def change_flows_through(stack: ComposeStack, tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        host_kubeconfig(
            stack.read("kube-api", "/output/kubeconfig.yaml"), stack.port("kube-api", 6443)
        )
    )
    kube = await KubeClient.from_config(str(kubeconfig))
    try:
        # As the stack's operator (its seed and client certificate, from the nats-auth step),
        # over mutual TLS.
        operator = tmp_path / "operator"
        await asyncio.to_thread(stack.copy_out, "nats-auth", "/auth/operator", operator)
        auth = NatsAuth(
            nkey_seed_file=str(operator / "seed.nk"),
            tls_ca_file=str(operator / "ca.crt"),
            tls_cert_file=str(operator / "client.crt"),
            tls_key_file=str(operator / "client.key"),
        ).as_identity(Role.OPERATOR, "compose")
        bus = await Bus.connect(
            [f"tls://127.0.0.1:{stack.port('nats', 4222)}"], name="compose-test", auth=auth
        )
        # The stack's own signing key, made by its signing-key step: the only one trusted.
        trusted = TrustedKeys.parse(stack.read("renderer", "/trusted/keys"))
        try:
            await check_change(kube, bus, trusted, zipkin_port=stack.port("zipkin", 9411))
        finally:
            await bus.drain()
    finally:
        await kube.close()


async def check_change(
    kube: KubeClient, bus: Bus, trusted: TrustedKeys, *, zipkin_port: int
) -> None:
    async def snapshot() -> events.EndpointSnapshot | None:
        entry = await bus.kv_get(subjects.SNAPSHOT_BUCKET, subjects.snapshot_key(CLUSTER))
        return None if entry is None else open_snapshot(entry.value, trusted).snapshot

    async def node_generation() -> int:
        entry = await bus.kv_get(subjects.NODE_STATE_BUCKET, subjects.node_state_key(CLUSTER, NODE))
        if entry is None:
            return 0
        state = events.decode(entry.value)
        assert isinstance(state, events.NodeState)
        return state.generation

    async def settled(with_added: bool) -> events.EndpointSnapshot | None:
        current = await snapshot()
        if current is None or (ADDED in {e.ip for e in current.apiserver_endpoints}) != with_added:
            return None
        daemonset = await kube.get(DAEMONSET)
        init = daemonset["spec"]["template"]["spec"]["initContainers"][0]["name"]
        env = await container_env(kube, daemonset, "initContainers", init)
        if (ADDED in env.get("KUBERNETES_APISERVER_ENDPOINTS", "")) != with_added:
            return None
        return current if await node_generation() == current.generation else None

    # The stack settles on the kube-api container's own address (the lease reconciler's).
    first = await eventually(lambda: settled(False), what="the initial endpoints everywhere")
    assert len(first.apiserver_endpoints) == 1

    # One change, from the host: a second EndpointSlice for Service default/kubernetes.
    added = endpoint_slice("kubernetes-compose-test", addresses=[ADDED], port=6443)
    await kube.create(SLICES, added)
    second = await eventually(lambda: settled(True), what="the added endpoint everywhere")
    assert second.generation > first.generation
    assert {e.ip for e in second.apiserver_endpoints} == {
        *(e.ip for e in first.apiserver_endpoints),
        ADDED,
    }

    # ONE trace in Zipkin: discovery's publish, the renderer's patch, the loader's map writes.
    async def trace() -> list[dict[str, Any]]:
        traces = await asyncio.to_thread(zipkin_traces, zipkin_port, "apilane-discovery")
        return trace_of_generation(traces, second.generation)

    spans = await eventually(trace, what=f"one Zipkin trace for generation {second.generation}")
    by_id = {s["id"]: s for s in spans}
    publish = next(s for s in spans if s["name"] == "discovery publish")
    consumers = [s for s in spans if s.get("kind") == "CONSUMER"]
    assert {s["localEndpoint"]["serviceName"] for s in consumers} == {
        "apilane-renderer",
        "apilane-node-loader",
    }
    assert all(by_id.get(s.get("parentId", "")) is publish for s in consumers), spans
