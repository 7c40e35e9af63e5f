"""The renderer against a real kube-apiserver and a real nats-server, run in-process.

Each test has its own cluster name (its own KV key and result subject) and its own
namespace (its own calico-node DaemonSet). The test apiserver runs no controllers, so a
DaemonSet's status only changes when a test writes it through the status subresource.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
from prometheus_client import CollectorRegistry

from apilane.kube.client import KubeClient
from apilane.kube.leader import LeaderElector, LeaseSettings, lead
from apilane.model import events, subjects
from apilane.model.envformat import IpPort, render_ip_ports
from apilane.model.events import (
    EndpointSnapshot,
    KubeProxyState,
    RenderResult,
)
from apilane.model.signing import (
    Envelope,
    SigningKey,
    TrustedKeys,
    open_snapshot,
    reseal_snapshot,
    utcnow,
)
from apilane.renderer import service
from apilane.renderer.applier import APPLIED_CONTENT_DIGEST, APPLIED_GENERATION
from apilane.renderer.metrics import REFUSAL_REASONS
from apilane.renderer.ownership import MANAGED_ENV_ANNOTATION
from apilane.renderer.render import APISERVER_ENDPOINTS, SERVICE_IPS_PORTS
from apilane.renderer.service import Renderer
from apilane.renderer.settings import FIELD_MANAGER, SERVICE_NAME, RendererSettings
from apilane.renderer.settings import load as load_settings
from apilane.runtime import serve
from apilane.runtime.bus import Bus
from apilane.runtime.config import CommonSettings
from apilane.runtime.natsauth import Role
from apilane.testing.calico import container_env
from apilane.testing.kube import ControlPlane
from apilane.testing.nats import NatsServer
from apilane.testing.nats_fixtures import ConnectAs
from apilane.testing.observe import Observed
from apilane.testing.sealing import seal, seal_payload
from apilane.testing.snapshots import make_snapshot

pytestmark = [pytest.mark.integration, pytest.mark.kube, pytest.mark.nats]

RESULT_TIMEOUT = 10.0
IMAGE = "quay.io/calico/node:v3.31.0"
INSTALLER = "kubectl-client-side-apply"  # the field manager that creates the DaemonSet
HELM = "label:app.kubernetes.io/managed-by=Helm"
IPTABLES_CLEANUP = "FELIX_BPFKUBEPROXYIPTABLESCLEANUPENABLED"
HEALTHZ_PORT = "FELIX_BPFKUBEPROXYHEALTHZPORT"


def snapshot(
    cluster: str,
    generation: int,
    *,
    services: tuple[str, ...] = ("10.96.0.1",),
    endpoints: tuple[str, ...] = ("192.168.5.4",),
    managed_by: str = "",
) -> EndpointSnapshot:
    return make_snapshot(
        cluster=cluster,
        generation=generation,
        services=[str(IpPort.of(ip, 443)) for ip in services],
        apiservers=[str(IpPort.of(ip, 6443)) for ip in endpoints],
        kube_proxy=KubeProxyState(present=True, ready=True, managed_by=managed_by),
    )


def calico_node(namespace: str, *, main_env: tuple[dict[str, Any], ...] = ()) -> dict[str, Any]:
    """A calico-node DaemonSet as an installer writes it; `main_env` adds variables to the
    calico-node container, as a person would by hand."""
    labels = {"k8s-app": "calico-node"}
    return {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {"name": "calico-node", "namespace": namespace},
        "spec": {
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "initContainers": [
                        {
                            "name": "ebpf-bootstrap",
                            "image": IMAGE,
                            "env": [{"name": "CALICO_CGROUP_PATH", "value": "/run/calico/cgroup"}],
                        }
                    ],
                    "containers": [
                        {
                            "name": "calico-node",
                            "image": IMAGE,
                            "env": [
                                {"name": "DATASTORE_TYPE", "value": "kubernetes"},
                                {
                                    "name": "NODENAME",
                                    "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}},
                                },
                                *main_env,
                            ],
                            "volumeMounts": [{"name": "bpffs", "mountPath": "/sys/fs/bpf"}],
                        },
                        {
                            "name": "csi-sidecar",
                            "image": "registry.k8s.io/sig-storage/csi-node-driver-registrar:v2.9.0",
                            "env": [{"name": "SIDECAR", "value": "keep-me"}],
                        },
                    ],
                    "volumes": [{"name": "bpffs", "hostPath": {"path": "/sys/fs/bpf"}}],
                },
            },
        },
    }


def env_of(daemonset: dict[str, Any], kind: str, container: str) -> dict[str, Any]:
    for entry in daemonset["spec"]["template"]["spec"].get(kind, []):
        if entry["name"] == container:
            return {e["name"]: e.get("value", e.get("valueFrom")) for e in entry.get("env", [])}
    raise AssertionError(f"{kind}[{container}] not found")


class Harness:
    """One test's renderer world: a cluster name, a namespace, results as they arrive.

    Each part connects as whom it plays: the renderer with its identity (`bus`), snapshots
    are written with discovery's (`discovery`), results are watched by the operator's."""

    def __init__(
        self, *, server: NatsServer, observer: Bus, kube: KubeClient, namespace: str
    ) -> None:
        self.server = server
        self.observer = observer
        self.bus = observer  # replaced by the renderer's own connection in `connect`
        self.discovery = observer
        self.kube = kube
        self.namespace = namespace
        self.cluster = f"c-{secrets.token_hex(4)}"
        self.key = SigningKey.generate()  # discovery's, as far as these tests go
        self.registry = CollectorRegistry()  # the metrics of the renderer started last
        self.results = Observed(RenderResult)
        self.warnings = Observed(events.ClusterWarning)
        self._renderers: list[tuple[asyncio.Event, asyncio.Task[None]]] = []

    @property
    def ds_path(self) -> str:
        return f"/apis/apps/v1/namespaces/{self.namespace}/daemonsets/calico-node"

    async def connect(self, connect_as: ConnectAs) -> None:
        self.bus = await connect_as(Role.RENDERER, self.cluster)
        self.discovery = await connect_as(Role.DISCOVERY, self.cluster)

    async def subscribe(self) -> None:
        await self.results.subscribe(self.observer, subjects.renders_subject(self.cluster))
        await self.warnings.subscribe(self.observer, subjects.warnings_subject(self.cluster))

    def settings(self, **overrides: Any) -> RendererSettings:
        values: dict[str, Any] = {
            "trusted_keys": TrustedKeys.of(self.key),
            "common": CommonSettings(cluster=self.cluster),
            "target_namespace": self.namespace,
            "lease": LeaseSettings(
                enabled=False, name=subjects.renderer_lease(self.cluster), identity="renderer-test"
            ),
            "coalesce_during_rollout": False,
            # The tests below were written for literal env and keep it; configmap mode (the
            # default) has its own, in test_renderer_configmap.py.
            "render_mode": "literal",
        }
        values.update(overrides)
        return RendererSettings(**values)

    async def start(
        self, *, before_patch: Callable[[int], Awaitable[None]] | None = None, **overrides: Any
    ) -> Renderer:
        self.registry = CollectorRegistry()
        renderer = Renderer(
            bus=self.bus,
            kube=self.kube,
            settings=self.settings(**overrides),
            registry=self.registry,
            before_patch=before_patch,
        )
        stop = asyncio.Event()
        self._renderers.append((stop, asyncio.create_task(renderer.run(stop))))
        return renderer

    async def stop(self) -> None:
        for stop, task in self._renderers:
            stop.set()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(task, timeout=10)
        self._renderers.clear()

    async def close(self) -> None:
        await self.stop()
        for observed in (self.results, self.warnings):
            with contextlib.suppress(Exception):
                await observed.close()
        assert not self.results.unexpected, self.results.unexpected
        assert not self.warnings.unexpected, self.warnings.unexpected

    async def publish(
        self, snap: EndpointSnapshot, *, key: SigningKey | None = None, **sealing: Any
    ) -> bytes:
        """Seal `snap` as discovery does (with `key`, else the trusted one) and put it."""
        value = seal(snap, key=key or self.key, **sealing)
        await self.put(value)
        return value

    async def put(self, value: bytes) -> None:
        """Put raw bytes into the snapshot key, as anyone who may write it can (discovery's
        identity, or whoever holds its credentials)."""
        await self.discovery.kv_put(
            subjects.SNAPSHOT_BUCKET, subjects.snapshot_key(self.cluster), value
        )

    def metric(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0

    async def result(self, timeout: float = RESULT_TIMEOUT) -> RenderResult:
        return await self.results.next(timeout)

    async def no_more_results(self, within: float = 0.5) -> None:
        with contextlib.suppress(TimeoutError):
            extra = await self.results.next(within)
            raise AssertionError(f"unexpected render result: {extra}")

    async def create_daemonset(
        self, *, main_env: tuple[dict[str, Any], ...] = ()
    ) -> dict[str, Any]:
        return await self.kube.create(
            f"/apis/apps/v1/namespaces/{self.namespace}/daemonsets",
            calico_node(self.namespace, main_env=main_env),
            field_manager=INSTALLER,
        )

    async def daemonset(self) -> dict[str, Any]:
        return await self.kube.get(self.ds_path)

    async def set_status(self, **status: int) -> None:
        live = await self.daemonset()
        body = {
            "status": {
                "currentNumberScheduled": 0,
                "numberMisscheduled": 0,
                "numberReady": 0,
                **status,
            }
        }
        body["status"].setdefault("observedGeneration", live["metadata"]["generation"])
        await self.kube.patch(self.ds_path + "/status", body, patch_type="merge")


@pytest.fixture
async def world(
    nats_server: NatsServer,
    bus: Bus,
    connect_as: ConnectAs,
    kube: KubeClient,
    kube_namespace: str,
) -> AsyncIterator[Harness]:
    harness = Harness(server=nats_server, observer=bus, kube=kube, namespace=kube_namespace)
    await harness.connect(connect_as)
    await harness.subscribe()
    try:
        yield harness
    finally:
        await harness.close()


async def test_the_patch_keeps_other_containers_env_vars_and_images(world: Harness) -> None:
    before = await world.create_daemonset()
    await world.start()
    await world.publish(snapshot(world.cluster, 1))

    result = await world.result()
    assert result.outcome == "applied", result.reason
    assert result.daemonset_generation == before["metadata"]["generation"] + 1
    assert "+KUBERNETES_SERVICE_IPS_PORTS=10.96.0.1:443" in result.diff

    after = await world.daemonset()
    wanted = {SERVICE_IPS_PORTS: "10.96.0.1:443", APISERVER_ENDPOINTS: "192.168.5.4:6443"}
    assert env_of(after, "initContainers", "ebpf-bootstrap") == {
        "CALICO_CGROUP_PATH": "/run/calico/cgroup",
        **wanted,
    }
    main_env = env_of(after, "containers", "calico-node")
    assert main_env == {
        "DATASTORE_TYPE": "kubernetes",
        "NODENAME": {"fieldRef": {"apiVersion": "v1", "fieldPath": "spec.nodeName"}},
        **wanted,
    }
    # Everything else is exactly as it was.
    strip = copy.deepcopy(after["spec"]["template"]["spec"])
    original = copy.deepcopy(before["spec"]["template"]["spec"])
    for spec in (strip, original):
        for container in spec["initContainers"] + spec["containers"]:
            container["env"] = [e for e in container["env"] if e["name"] not in wanted]
    assert strip == original
    assert after["metadata"]["annotations"][APPLIED_GENERATION] == "1"
    managers = {entry["manager"] for entry in after["metadata"]["managedFields"]}
    assert FIELD_MANAGER in managers
    for _ in range(50):  # the Kubernetes Event is written off the hot path
        listed = await world.kube.list(f"/api/v1/namespaces/{world.namespace}/events")
        if listed["items"]:
            break
        await asyncio.sleep(0.05)
    assert [e["reason"] for e in listed["items"]] == ["ApiServerEndpointsRendered"]


async def test_an_unchanged_snapshot_makes_no_new_generation(world: Harness) -> None:
    await world.create_daemonset()
    await world.start()
    await world.publish(snapshot(world.cluster, 1))
    assert (await world.result()).outcome == "applied"
    applied = await world.daemonset()

    await world.publish(snapshot(world.cluster, 2))  # same endpoints, newer generation
    result = await world.result()
    assert result.outcome == "unchanged"
    assert result.patch is None
    now = await world.daemonset()
    assert now["metadata"]["generation"] == applied["metadata"]["generation"]
    assert now["metadata"]["resourceVersion"] == applied["metadata"]["resourceVersion"]


async def test_dry_run_changes_nothing_and_reports_the_diff(world: Harness) -> None:
    before = await world.create_daemonset()
    await world.start(dry_run=True)
    await world.publish(snapshot(world.cluster, 1, endpoints=("192.168.5.5", "192.168.5.4")))

    result = await world.result()
    assert result.outcome == "dry-run", result.reason
    assert "+KUBERNETES_APISERVER_ENDPOINTS=192.168.5.4:6443,192.168.5.5:6443" in result.diff
    assert "@@ initContainers[ebpf-bootstrap].env @@" in result.diff
    assert result.patch is not None
    init = result.patch["spec"]["template"]["spec"]["initContainers"][0]
    assert init["name"] == "ebpf-bootstrap"
    after = await world.daemonset()
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]
    assert SERVICE_IPS_PORTS not in env_of(after, "initContainers", "ebpf-bootstrap")


async def test_a_missing_daemonset_is_patched_when_it_appears(world: Harness) -> None:
    await world.start()
    await world.publish(snapshot(world.cluster, 1))
    waiting = await world.result()
    assert waiting.outcome == "waiting"
    assert "does not exist" in waiting.reason
    await world.no_more_results(0.3)  # waits quietly, no error loop

    await world.create_daemonset()
    applied = await world.result()
    assert applied.outcome == "applied", applied.reason
    assert applied.generation == 1
    live = await world.daemonset()
    assert env_of(live, "initContainers", "ebpf-bootstrap")[SERVICE_IPS_PORTS] == "10.96.0.1:443"


async def test_a_conflicting_concurrent_update_is_retried(world: Harness) -> None:
    await world.create_daemonset()
    attempts: list[int] = []

    async def change_it_first(attempt: int) -> None:
        attempts.append(attempt)
        if attempt == 1:  # someone else writes between our read and our patch
            await world.kube.patch(
                world.ds_path,
                {"metadata": {"labels": {"touched-by": "someone-else"}}},
                patch_type="merge",
            )

    await world.start(before_patch=change_it_first)
    await world.publish(snapshot(world.cluster, 1))
    result = await world.result()
    assert result.outcome == "applied", result.reason
    assert attempts == [1, 2]
    live = await world.daemonset()
    assert live["metadata"]["labels"]["touched-by"] == "someone-else"
    assert env_of(live, "containers", "calico-node")[SERVICE_IPS_PORTS] == "10.96.0.1:443"


async def test_ipv6_and_dual_stack_are_formatted_like_calico(world: Harness) -> None:
    await world.create_daemonset()
    await world.start()
    await world.publish(
        snapshot(world.cluster, 1, services=("fd00:10:96::1",), endpoints=("fd00::5:5",))
    )
    assert (await world.result()).outcome == "applied"
    live = await world.daemonset()
    assert (
        env_of(live, "initContainers", "ebpf-bootstrap")[SERVICE_IPS_PORTS] == "[fd00:10:96::1]:443"
    )
    assert (
        env_of(live, "initContainers", "ebpf-bootstrap")[APISERVER_ENDPOINTS] == "[fd00::5:5]:6443"
    )

    dual = snapshot(
        world.cluster,
        2,
        services=("fd00:10:96::1", "10.96.0.1"),
        endpoints=("fd00::5:5", "192.168.5.5", "192.168.5.4"),
    )
    await world.publish(dual)
    result = await world.result()
    assert result.outcome == "applied"
    assert result.env == {
        SERVICE_IPS_PORTS: "10.96.0.1:443,[fd00:10:96::1]:443",
        APISERVER_ENDPOINTS: "192.168.5.4:6443,192.168.5.5:6443,[fd00::5:5]:6443",
    }
    live = await world.daemonset()
    assert env_of(live, "containers", "calico-node")[APISERVER_ENDPOINTS] == (
        "192.168.5.4:6443,192.168.5.5:6443,[fd00::5:5]:6443"
    )


async def test_an_old_generation_is_ignored(world: Harness) -> None:
    await world.create_daemonset()
    await world.start()
    await world.publish(snapshot(world.cluster, 5, endpoints=("192.168.5.5",)))
    assert (await world.result()).outcome == "applied"
    applied = await world.daemonset()

    await world.publish(snapshot(world.cluster, 3, endpoints=("192.168.5.3",)))
    result = await world.result()
    assert result.outcome == "ignored"
    assert result.generation == 3
    now = await world.daemonset()
    assert now["metadata"]["resourceVersion"] == applied["metadata"]["resourceVersion"]


async def test_a_restart_renders_the_latest_snapshot_once_and_does_not_patch_twice(
    world: Harness,
) -> None:
    await world.create_daemonset()
    await world.start()
    await world.publish(snapshot(world.cluster, 1))
    assert (await world.result()).outcome == "applied"
    await world.publish(snapshot(world.cluster, 2, endpoints=("192.168.5.9",)))
    assert (await world.result()).outcome == "applied"
    await world.stop()
    before = await world.daemonset()

    await world.start()  # a new process: nothing in memory
    result = await world.result()
    assert result.generation == 2  # the latest, not the history
    assert result.outcome == "ignored"  # the DaemonSet's annotation says it holds generation 2
    await world.no_more_results()
    after = await world.daemonset()
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]

    # And the restarted renderer goes on with new snapshots.
    await world.publish(snapshot(world.cluster, 3, endpoints=("192.168.5.10",)))
    assert (await world.result()).outcome == "applied"


async def test_a_restart_without_a_record_compares_and_does_not_patch(world: Harness) -> None:
    await world.create_daemonset()
    await world.start()
    await world.publish(snapshot(world.cluster, 1))
    assert (await world.result()).outcome == "applied"
    await world.stop()
    # Someone strips our annotation: the renderer must compare, not blindly patch again.
    await world.kube.patch(
        world.ds_path, {"metadata": {"annotations": {APPLIED_GENERATION: None}}}, patch_type="merge"
    )
    before = await world.daemonset()
    await world.start()
    assert (await world.result()).outcome == "unchanged"
    await world.no_more_results()
    after = await world.daemonset()
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]


async def test_snapshots_during_our_rollout_are_coalesced_into_one_patch(world: Harness) -> None:
    await world.create_daemonset()
    await world.start(coalesce_during_rollout=True)
    await world.publish(snapshot(world.cluster, 1))
    first = await world.result()
    assert first.outcome == "applied"
    # The controller has seen the new generation; no pod is updated yet.
    await world.set_status(desiredNumberScheduled=3, updatedNumberScheduled=0, numberAvailable=3)

    await world.publish(snapshot(world.cluster, 2, endpoints=("192.168.5.2",)))
    await world.publish(snapshot(world.cluster, 3, endpoints=("192.168.5.3",)))
    held = [await world.result(), await world.result()]
    assert [(r.generation, r.outcome) for r in held] == [(2, "waiting"), (3, "waiting")]
    assert all("coalescing" in r.reason for r in held)
    assert (await world.daemonset())["metadata"]["generation"] == first.daemonset_generation

    # The rollout finishes: one patch, with the newest snapshot.
    await world.set_status(desiredNumberScheduled=3, updatedNumberScheduled=3, numberAvailable=3)
    final = await world.result()
    assert (final.generation, final.outcome) == (3, "applied")
    assert final.daemonset_generation == (first.daemonset_generation or 0) + 1
    live = await world.daemonset()
    assert (
        env_of(live, "initContainers", "ebpf-bootstrap")[APISERVER_ENDPOINTS] == "192.168.5.3:6443"
    )


async def test_malformed_and_unrenderable_snapshots_are_reported_without_a_crash(
    world: Harness,
) -> None:
    before = await world.create_daemonset()
    await world.start()
    # Garbage is not even an envelope: refused as unsigned.
    await world.discovery.js.publish(
        subjects.kv_subject(subjects.SNAPSHOT_BUCKET, world.cluster), b'{"not": "a snapshot"'
    )
    warning = await world.warnings.next(RESULT_TIMEOUT)
    assert warning.reason == events.WarningReason.SNAPSHOT_REFUSED
    assert "(unsigned)" in warning.message
    # Validly signed, but not a snapshot: a producer bug, reported as invalid.
    await world.put(
        seal_payload(b'{"not": "a snapshot"', generation=1, cluster=world.cluster, key=world.key)
    )
    warning = await world.warnings.next(RESULT_TIMEOUT)
    assert warning.reason == events.WarningReason.INVALID_SNAPSHOT

    await world.publish(snapshot(world.cluster, 1, endpoints=()))
    failed = await world.result()
    assert failed.outcome == "failed"
    assert "no usable API server endpoint" in failed.reason
    assert (await world.daemonset())["metadata"]["resourceVersion"] == before["metadata"][
        "resourceVersion"
    ]

    await world.publish(snapshot(world.cluster, 2))
    assert (await world.result()).outcome == "applied"


async def test_externally_managed_kube_proxy_turns_off_felix_cleanup(world: Harness) -> None:
    await world.create_daemonset()
    await world.start()
    await world.publish(
        snapshot(world.cluster, 1, managed_by="label:app.kubernetes.io/managed-by=Helm")
    )
    assert (await world.result()).outcome == "applied"
    live = await world.daemonset()
    assert (
        env_of(live, "containers", "calico-node")["FELIX_BPFKUBEPROXYIPTABLESCLEANUPENABLED"]
        == "false"
    )
    assert "FELIX_BPFKUBEPROXYIPTABLESCLEANUPENABLED" not in env_of(
        live, "initContainers", "ebpf-bootstrap"
    )


async def test_coexistence_env_is_removed_when_kube_proxy_is_no_longer_managed_elsewhere(
    world: Harness,
) -> None:
    # A person tuned the healthz port by hand before apilane ever ran.
    before = await world.create_daemonset(main_env=({"name": HEALTHZ_PORT, "value": "10257"},))
    await world.start()
    await world.publish(snapshot(world.cluster, 1, managed_by=HELM))
    added = await world.result()
    assert added.outcome == "applied", added.reason
    main_env = env_of(await world.daemonset(), "containers", "calico-node")
    assert (main_env[IPTABLES_CLEANUP], main_env[HEALTHZ_PORT]) == ("false", "0")

    await world.publish(snapshot(world.cluster, 2))  # kube-proxy is not managed elsewhere now
    removed = await world.result()
    assert removed.outcome == "applied", removed.reason
    assert f"-{IPTABLES_CLEANUP}=false\n" in removed.diff
    assert f"+{IPTABLES_CLEANUP}" not in removed.diff
    assert f"-{HEALTHZ_PORT}=0\n+{HEALTHZ_PORT}=10257\n" in removed.diff
    after = await world.daemonset()
    assert env_of(after, "containers", "calico-node") == {
        "DATASTORE_TYPE": "kubernetes",
        "NODENAME": {"fieldRef": {"apiVersion": "v1", "fieldPath": "spec.nodeName"}},
        HEALTHZ_PORT: "10257",  # the person's value, given back
        SERVICE_IPS_PORTS: "10.96.0.1:443",
        APISERVER_ENDPOINTS: "192.168.5.4:6443",
    }
    # Apart from the endpoint variables, the pod template is exactly as the installer wrote it.
    endpoints = {SERVICE_IPS_PORTS, APISERVER_ENDPOINTS}
    now, original = after["spec"]["template"]["spec"], before["spec"]["template"]["spec"]
    for spec in (now, original):
        for container in spec["initContainers"] + spec["containers"]:
            container["env"] = [e for e in container["env"] if e["name"] not in endpoints]
    assert now == original
    record = json.loads(after["metadata"]["annotations"][MANAGED_ENV_ANNOTATION])
    assert record == {
        "calico-node": {SERVICE_IPS_PORTS: None, APISERVER_ENDPOINTS: None},
        "ebpf-bootstrap": {SERVICE_IPS_PORTS: None, APISERVER_ENDPOINTS: None},
    }

    await world.publish(snapshot(world.cluster, 3))  # and that is stable
    assert (await world.result()).outcome == "unchanged"


async def test_a_variable_a_person_set_before_apilane_managed_it_is_never_deleted(
    world: Harness,
) -> None:
    await world.create_daemonset(main_env=({"name": IPTABLES_CLEANUP, "value": "false"},))
    await world.start()
    await world.publish(snapshot(world.cluster, 1, managed_by=HELM))
    assert (await world.result()).outcome == "applied"
    main_env = env_of(await world.daemonset(), "containers", "calico-node")
    assert (main_env[IPTABLES_CLEANUP], main_env[HEALTHZ_PORT]) == ("false", "0")

    await world.publish(snapshot(world.cluster, 2))
    result = await world.result()
    assert result.outcome == "applied", result.reason
    assert f" {IPTABLES_CLEANUP}=false  (not set by apilane; left as is)" in result.diff
    main_env = env_of(await world.daemonset(), "containers", "calico-node")
    assert main_env[IPTABLES_CLEANUP] == "false"  # the person's, still there
    assert HEALTHZ_PORT not in main_env  # apilane's, gone


async def test_a_variable_another_field_manager_changed_since_is_left_alone(
    world: Harness,
) -> None:
    await world.create_daemonset()
    await world.start()
    await world.publish(snapshot(world.cluster, 1, managed_by=HELM))
    assert (await world.result()).outcome == "applied"
    # A person overrides apilane's value with `kubectl edit`: the variable is theirs now.
    await world.kube.patch(
        world.ds_path,
        {
            "spec": {
                "template": {
                    "spec": {
                        "containers": [
                            {
                                "name": "calico-node",
                                "env": [{"name": HEALTHZ_PORT, "value": "10300"}],
                            }
                        ]
                    }
                }
            }
        },
        field_manager="kubectl-edit",
    )

    await world.publish(snapshot(world.cluster, 2))
    result = await world.result()
    assert result.outcome == "applied", result.reason
    assert "set by kubectl-edit since apilane set it; left as is" in result.diff
    live = await world.daemonset()
    main_env = env_of(live, "containers", "calico-node")
    assert main_env[HEALTHZ_PORT] == "10300"
    assert IPTABLES_CLEANUP not in main_env
    assert HEALTHZ_PORT not in live["metadata"]["annotations"][MANAGED_ENV_ANNOTATION]


async def test_variables_set_before_the_record_existed_are_found_in_managed_fields(
    world: Harness,
) -> None:
    """A DaemonSet patched by a renderer from before the record: its field manager created the
    entries, and that is enough to release them."""
    await world.create_daemonset(main_env=({"name": "FELIX_LOGSEVERITYSCREEN", "value": "info"},))
    await world.start()
    await world.publish(snapshot(world.cluster, 1, managed_by=HELM))
    assert (await world.result()).outcome == "applied"
    await world.stop()
    await world.kube.patch(
        world.ds_path,
        {"metadata": {"annotations": {MANAGED_ENV_ANNOTATION: None}}},
        patch_type="merge",
    )

    await world.start()
    assert (await world.result()).outcome == "ignored"  # generation 1 is applied already
    await world.publish(snapshot(world.cluster, 2))
    result = await world.result()
    assert result.outcome == "applied", result.reason
    main_env = env_of(await world.daemonset(), "containers", "calico-node")
    assert IPTABLES_CLEANUP not in main_env and HEALTHZ_PORT not in main_env
    assert main_env["FELIX_LOGSEVERITYSCREEN"] == "info"


async def test_dry_run_reports_a_removal_and_changes_nothing(world: Harness) -> None:
    await world.create_daemonset()
    await world.start()
    await world.publish(snapshot(world.cluster, 1, managed_by=HELM))
    assert (await world.result()).outcome == "applied"
    await world.stop()
    before = await world.daemonset()

    await world.start(dry_run=True)
    assert (await world.result()).outcome == "ignored"
    await world.publish(snapshot(world.cluster, 2))
    result = await world.result()
    assert result.outcome == "dry-run", result.reason
    assert f"-{IPTABLES_CLEANUP}=false\n" in result.diff
    assert result.patch is not None
    main = result.patch["spec"]["template"]["spec"]["containers"][0]
    assert {"name": IPTABLES_CLEANUP, "$patch": "delete"} in main["env"]
    after = await world.daemonset()
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]


async def test_only_the_leader_patches_and_a_follower_takes_over(world: Harness) -> None:
    await world.create_daemonset()
    await world.publish(snapshot(world.cluster, 1))
    stops: list[asyncio.Event] = []
    tasks: list[asyncio.Task[None]] = []
    electors: list[LeaderElector] = []
    for identity in ("renderer-a", "renderer-b"):
        renderer = Renderer(bus=world.bus, kube=world.kube, settings=world.settings())
        elector = LeaderElector(
            world.kube,
            namespace=world.namespace,
            name=subjects.renderer_lease(world.cluster),
            identity=identity,
            lease_duration=3.0,
            renew_interval=0.5,
            retry_interval=0.1,
        )
        stop = asyncio.Event()
        stops.append(stop)
        electors.append(elector)
        tasks.append(asyncio.create_task(lead(elector, renderer.run, stop)))
        if identity == "renderer-a":
            await asyncio.wait_for(elector.wait_until_leader(), timeout=5)

    first = await world.result()
    assert first.outcome == "applied"
    await world.no_more_results()  # the follower did nothing
    assert electors[0].is_leader and not electors[1].is_leader

    stops[0].set()  # the leader stops and releases the Lease
    await asyncio.wait_for(tasks[0], timeout=10)
    await asyncio.wait_for(electors[1].wait_until_leader(), timeout=5)
    takeover = await world.result()
    assert (takeover.generation, takeover.outcome) == (1, "ignored")  # no second patch
    await world.publish(snapshot(world.cluster, 2, endpoints=("192.168.5.7",)))
    assert (await world.result()).outcome == "applied"
    stops[1].set()
    await asyncio.wait_for(tasks[1], timeout=10)


async def test_the_service_elects_renders_and_serves_probes_and_metrics(
    world: Harness, control_plane: ControlPlane, tmp_path: Path
) -> None:
    await world.create_daemonset()
    await world.publish(snapshot(world.cluster, 1))
    url = world.bus.nc.connected_url
    assert url is not None
    kubeconfig = control_plane.write_kubeconfig(
        tmp_path / "kubeconfig", user="admin", groups=("system:masters",)
    )
    settings = world.settings(
        common=CommonSettings(
            cluster=world.cluster,
            nats_urls=(f"nats://{url.hostname}:{url.port}",),
            nats_auth=world.server.credentials(Role.RENDERER, world.cluster),
            kubeconfig=str(kubeconfig),
            http_host="127.0.0.1",
            http_port=0,
        ),
        lease=LeaseSettings(
            namespace=world.namespace,
            name=subjects.renderer_lease(world.cluster),
            identity="renderer-under-test",
        ),
    )
    stop = asyncio.Event()
    contexts: list[serve.ServiceContext] = []

    async def body(ctx: serve.ServiceContext) -> None:
        contexts.append(ctx)
        await service.main(ctx, settings)

    task = asyncio.create_task(serve.serve(SERVICE_NAME, settings.common, body, stopping=stop))
    try:
        assert (await world.result()).outcome == "applied"
        port = contexts[0].http_port
        async with aiohttp.ClientSession() as http:
            # The first snapshot is rendered before the loop follows the bucket and reports
            # ready, so the result can arrive a moment before readiness.
            for _ in range(100):
                async with http.get(f"http://127.0.0.1:{port}/readyz") as response:
                    ready, body = response.status, await response.text()
                if ready == 200:
                    break
                await asyncio.sleep(0.05)
            assert ready == 200, body
            async with http.get(f"http://127.0.0.1:{port}/metrics") as response:
                text = await response.text()
        assert 'apilane_renderer_renders_total{outcome="applied"} 1.0' in text
        assert "apilane_renderer_patches_total 1.0" in text
        assert "apilane_renderer_snapshot_to_patch_seconds_count 1.0" in text
        lease = await world.kube.get(
            f"/apis/coordination.k8s.io/v1/namespaces/{world.namespace}/leases/"
            + subjects.renderer_lease(world.cluster)
        )
        assert lease["spec"]["holderIdentity"] == settings.identity
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=15)


async def test_readiness_is_false_while_nats_is_unreachable_at_start(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    from apilane.testing.procs import free_port

    kubeconfig = control_plane.write_kubeconfig(
        tmp_path / "kubeconfig", user="admin", groups=("system:masters",)
    )
    settings = load_settings(
        {
            "APILANE_CLUSTER": "unreachable",
            # Nothing listens here: the renderer keeps retrying the first connect.
            "APILANE_NATS_URL": f"nats://127.0.0.1:{free_port()}",
            "APILANE_HTTP_HOST": "127.0.0.1",
            "APILANE_HTTP_PORT": "0",
            "APILANE_LEADER_ELECTION": "false",
            "APILANE_TRUSTED_KEYS": SigningKey.generate().public_text,
            "KUBECONFIG": str(kubeconfig),
        }
    )
    stop = asyncio.Event()
    contexts: list[serve.ServiceContext] = []

    async def body(ctx: serve.ServiceContext) -> None:
        contexts.append(ctx)
        await service.main(ctx, settings)

    task = asyncio.create_task(serve.serve(SERVICE_NAME, settings.common, body, stopping=stop))
    try:
        for _ in range(100):
            if contexts and contexts[0].http_port:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.5)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{contexts[0].http_port}/readyz") as response:
                assert response.status == 503
                assert (await response.json())["checks"] == {
                    "nats-connected": False,
                    "renderer": False,
                }
            async with http.get(f"http://127.0.0.1:{contexts[0].http_port}/healthz") as response:
                assert response.status == 200
    finally:
        stop.set()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(task, timeout=15)


# -- signed snapshots ---------------------------------------------------------------------------


async def wait_warning(world: Harness, reason: str) -> events.ClusterWarning:
    while True:
        warning = await world.warnings.next(RESULT_TIMEOUT)
        if warning.reason == reason:
            return warning


def tampered(value: bytes) -> bytes:
    """A validly signed envelope with one address changed in its payload."""
    envelope = msgspec.json.decode(value, type=Envelope)
    payload = envelope.payload.replace(b"192.168.5.4", b"192.168.5.66")
    assert payload != envelope.payload
    return msgspec.json.encode(
        Envelope(header=envelope.header, payload=payload, signature=envelope.signature)
    )


@pytest.mark.parametrize(
    ("forge", "reason", "warning"),
    [
        pytest.param(
            lambda world, snap: seal(snap, key=SigningKey.generate()),
            "unknown-key",
            events.WarningReason.SNAPSHOT_REFUSED,
            id="unknown-key",
        ),
        pytest.param(
            lambda world, snap: tampered(seal(snap, key=world.key)),
            "bad-signature",
            events.WarningReason.SNAPSHOT_REFUSED,
            id="tampered",
        ),
        pytest.param(
            lambda world, snap: events.encode(snap),
            "unsigned",
            events.WarningReason.SNAPSHOT_REFUSED,
            id="unsigned",
        ),
    ],
)
async def test_a_snapshot_not_signed_by_a_trusted_key_changes_nothing(
    world: Harness, forge: Any, reason: str, warning: str
) -> None:
    await world.create_daemonset()
    await world.start()
    await world.publish(snapshot(world.cluster, 1))
    assert (await world.result()).outcome == "applied"
    before = await world.daemonset()

    # Written through a connection that may write the key (as discovery's may): a newer
    # generation with other endpoints.
    await world.put(
        forge(world, snapshot(world.cluster, 7, endpoints=("192.168.5.4", "203.0.113.9")))
    )
    refused = await wait_warning(world, warning)
    assert f"({reason})" in refused.message
    await world.no_more_results()  # nothing verified, nothing to report a result for
    after = await world.daemonset()
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]
    assert world.metric("apilane_renderer_snapshots_refused_total", reason=reason) == 1

    # The next valid snapshot is applied as usual.
    await world.publish(snapshot(world.cluster, 2, endpoints=("192.168.5.8",)))
    assert (await world.result()).outcome == "applied"


async def test_a_replayed_older_snapshot_is_ignored_also_after_a_restart(world: Harness) -> None:
    await world.create_daemonset()
    await world.start()
    first = await world.publish(snapshot(world.cluster, 1))
    assert (await world.result()).outcome == "applied"
    await world.publish(snapshot(world.cluster, 2, endpoints=("192.168.5.9",)))
    assert (await world.result()).outcome == "applied"
    before = await world.daemonset()

    await world.put(first)  # the very bytes of generation 1, validly signed
    replayed = await world.result()
    assert (replayed.generation, replayed.outcome) == (1, "ignored")
    assert "rollback" in replayed.reason
    await wait_warning(world, events.WarningReason.SNAPSHOT_REFUSED)
    assert world.metric("apilane_renderer_snapshots_refused_total", reason="rollback") == 1

    # A new process, with the replay as the latest value: the DaemonSet's record says 2.
    await world.stop()
    await world.start()
    again = await world.result()
    assert (again.generation, again.outcome) == (1, "ignored")
    assert world.metric("apilane_renderer_snapshots_refused_total", reason="rollback") == 1
    after = await world.daemonset()
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]
    env = env_of(after, "initContainers", "ebpf-bootstrap")
    assert env[APISERVER_ENDPOINTS] == "192.168.5.9:6443"


async def test_the_held_generation_with_other_content_is_refused(world: Harness) -> None:
    await world.create_daemonset()
    await world.start()
    await world.publish(snapshot(world.cluster, 3))
    assert (await world.result()).outcome == "applied"
    before = await world.daemonset()
    await world.publish(snapshot(world.cluster, 3, endpoints=("192.168.5.77",)))
    result = await world.result()
    assert (result.generation, result.outcome) == (3, "ignored")
    assert world.metric("apilane_renderer_snapshots_refused_total", reason="equivocation") == 1
    after = await world.daemonset()
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]


async def test_an_expired_snapshot_is_not_applied(world: Harness) -> None:
    before = await world.create_daemonset()
    await world.start()
    issued = utcnow() - timedelta(hours=2)
    await world.publish(snapshot(world.cluster, 1), ttl=timedelta(hours=1), issued_at=issued)
    result = await world.result()
    assert (result.generation, result.outcome) == (1, "ignored")
    assert "expired" in result.reason
    await wait_warning(world, events.WarningReason.SNAPSHOT_REFUSED)
    assert world.metric("apilane_renderer_snapshots_refused_total", reason="expired") == 1
    after = await world.daemonset()
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]


async def test_a_snapshot_that_expires_while_it_waits_is_not_applied(world: Harness) -> None:
    await world.start()
    await world.publish(snapshot(world.cluster, 1), ttl=timedelta(seconds=1))
    assert (await world.result()).outcome == "waiting"  # no DaemonSet yet
    await asyncio.sleep(1.2)
    before = await world.create_daemonset()
    result = await world.result()
    assert (result.generation, result.outcome) == (1, "ignored")
    assert "expired" in result.reason
    assert world.metric("apilane_renderer_snapshots_refused_total", reason="expired") == 1
    after = await world.daemonset()
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]


async def test_a_re_signed_copy_of_the_applied_generation_is_taken_without_a_patch(
    world: Harness,
) -> None:
    await world.create_daemonset()
    await world.start()
    first = await world.publish(snapshot(world.cluster, 1), ttl=timedelta(minutes=10))
    assert (await world.result()).outcome == "applied"
    applied = await world.daemonset()
    held = open_snapshot(first, TrustedKeys.of(world.key))
    await world.put(reseal_snapshot(world.key, held, now=utcnow(), ttl=timedelta(minutes=10)))
    refreshed = await world.result()
    assert (refreshed.generation, refreshed.outcome) == (1, "ignored")
    assert "refresh" in refreshed.reason
    assert world.metric("apilane_renderer_refreshes_total") == 1
    assert world.metric("apilane_renderer_patches_total") == 1
    now = await world.daemonset()
    assert now["metadata"]["resourceVersion"] == applied["metadata"]["resourceVersion"]


async def test_a_key_rotation_with_two_trusted_keys_refuses_nothing(world: Harness) -> None:
    old, new = world.key, SigningKey.generate()
    await world.create_daemonset()
    await world.start(trusted_keys=TrustedKeys.of(old, new))
    await world.publish(snapshot(world.cluster, 1), key=old)
    assert (await world.result()).outcome == "applied"
    # Discovery switches key: the next generation (same endpoints), then a new set.
    await world.publish(snapshot(world.cluster, 2), key=new)
    assert (await world.result()).outcome == "unchanged"
    await world.publish(snapshot(world.cluster, 3, endpoints=("192.168.5.30",)), key=new)
    assert (await world.result()).outcome == "applied"
    refused = sum(
        world.metric("apilane_renderer_snapshots_refused_total", reason=reason)
        for reason in REFUSAL_REASONS
    )
    assert refused == 0
    live = await world.daemonset()
    assert live["metadata"]["annotations"][APPLIED_CONTENT_DIGEST].startswith("sha256:")


# -- configmap mode (the default) and controllers -------------------------------------------

CONFIGMAP = "apilane-kubernetes-endpoints"
OPERATOR_OWNER = {
    "apiVersion": "operator.tigera.io/v1",
    "kind": "Installation",
    "name": "default",
    "uid": "7a0c6b8e-2f4d-4c1e-9a57-3f1f3b0c9d11",
    "controller": True,
    "blockOwnerDeletion": True,
}


async def events_with(world: Harness, reason: str) -> list[dict[str, Any]]:
    for _ in range(100):  # the Kubernetes Event is written off the hot path
        listed = await world.kube.list(f"/api/v1/namespaces/{world.namespace}/events")
        found = [e for e in listed["items"] if e["reason"] == reason]
        if found:
            return found
        await asyncio.sleep(0.05)
    raise AssertionError(f"no {reason} Event in {world.namespace}")


async def configmap_data(world: Harness) -> dict[str, str]:
    cm = await world.kube.get(f"/api/v1/namespaces/{world.namespace}/configmaps/{CONFIGMAP}")
    return dict(cm["data"])


def nth_endpoints(n: int) -> tuple[str, ...]:
    return (f"192.168.7.{n}", f"10.0.{n}.1") if n % 2 else (f"192.168.7.{n}",)


async def test_configmap_mode_adopts_with_one_generation_and_then_never_moves_it(
    world: Harness,
) -> None:
    before = await world.create_daemonset()
    await world.start(render_mode="configmap")
    await world.publish(snapshot(world.cluster, 1))
    adoption = await world.result()
    assert adoption.outcome == "applied", adoption.reason
    assert "adopted DaemonSet" in adoption.reason and "rolls calico-node once" in adoption.reason
    adopted = await world.daemonset()
    assert adopted["metadata"]["generation"] == before["metadata"]["generation"] + 1
    assert adoption.daemonset_generation == adopted["metadata"]["generation"]
    ref = {"configMapKeyRef": {"name": CONFIGMAP, "key": SERVICE_IPS_PORTS}}
    assert env_of(adopted, "initContainers", "ebpf-bootstrap")[SERVICE_IPS_PORTS] == ref
    assert env_of(adopted, "containers", "csi-sidecar") == {"SIDECAR": "keep-me"}
    (event,) = await events_with(world, "ApiServerEndpointsAdopted")
    assert CONFIGMAP in event["message"]

    for n in range(2, 22):  # 20 endpoint changes
        endpoints = nth_endpoints(n)
        await world.publish(snapshot(world.cluster, n, endpoints=endpoints))
        result = await world.result()
        assert result.outcome == "applied", result.reason
        assert result.patch is None  # nothing for the DaemonSet
        assert f"ConfigMap {world.namespace}/{CONFIGMAP} updated" in result.reason
        wanted = render_ip_ports(IpPort.of(ip, 6443) for ip in endpoints)
        assert (await configmap_data(world))[APISERVER_ENDPOINTS] == wanted
    now = await world.daemonset()
    assert now["metadata"]["generation"] == adopted["metadata"]["generation"]
    assert now["spec"]["template"] == adopted["spec"]["template"]
    wanted_env = {
        SERVICE_IPS_PORTS: "10.96.0.1:443",
        APISERVER_ENDPOINTS: (await configmap_data(world))[APISERVER_ENDPOINTS],
    }
    assert "192.168.7.21:6443" in wanted_env[APISERVER_ENDPOINTS]
    init = await container_env(world.kube, now, "initContainers", "ebpf-bootstrap")
    assert init == {"CALICO_CGROUP_PATH": "/run/calico/cgroup", **wanted_env}
    main = await container_env(world.kube, now, "containers", "calico-node")
    assert main == {"DATASTORE_TYPE": "kubernetes", **wanted_env}
    cm = await world.kube.get(f"/api/v1/namespaces/{world.namespace}/configmaps/{CONFIGMAP}")
    assert cm["metadata"]["annotations"][APPLIED_GENERATION] == "21"
    assert world.metric("apilane_renderer_patches_total") == 1.0  # the adoption: one rollout
    assert world.metric("apilane_renderer_configmap_writes_total") == 21.0


@pytest.mark.parametrize("mode", ["literal", "configmap"])
async def test_either_mode_gives_calico_node_the_current_endpoints(
    world: Harness, mode: str
) -> None:
    await world.create_daemonset()
    await world.start(render_mode=mode)
    for generation, endpoints in ((1, ("192.168.5.4",)), (2, ("192.168.5.5", "192.168.5.4"))):
        await world.publish(snapshot(world.cluster, generation, endpoints=endpoints))
        assert (await world.result()).outcome == "applied"
    live = await world.daemonset()
    for kind, container in (("initContainers", "ebpf-bootstrap"), ("containers", "calico-node")):
        env = await container_env(world.kube, live, kind, container)
        assert env[APISERVER_ENDPOINTS] == "192.168.5.4:6443,192.168.5.5:6443"
        assert env[SERVICE_IPS_PORTS] == "10.96.0.1:443"


async def test_a_restart_in_configmap_mode_recovers_from_the_configmap_and_does_not_write(
    world: Harness,
) -> None:
    await world.create_daemonset()
    await world.start(render_mode="configmap")
    await world.publish(snapshot(world.cluster, 1))
    assert (await world.result()).outcome == "applied"
    await world.publish(snapshot(world.cluster, 2, endpoints=("192.168.5.9",)))
    assert (await world.result()).outcome == "applied"
    await world.stop()
    cm = await world.kube.get(f"/api/v1/namespaces/{world.namespace}/configmaps/{CONFIGMAP}")

    renderer = await world.start(render_mode="configmap")
    result = await world.result()  # the latest snapshot again: a refresh of what is held
    assert result.outcome == "ignored", result.reason
    assert renderer.accepted is not None and renderer.accepted.generation == 2
    again = await world.kube.get(f"/api/v1/namespaces/{world.namespace}/configmaps/{CONFIGMAP}")
    assert again["metadata"]["resourceVersion"] == cm["metadata"]["resourceVersion"]


async def test_dry_run_in_configmap_mode_creates_nothing(world: Harness) -> None:
    before = await world.create_daemonset()
    await world.start(render_mode="configmap", dry_run=True)
    await world.publish(snapshot(world.cluster, 1))
    result = await world.result()
    assert result.outcome == "dry-run", result.reason
    assert f"+++ ConfigMap/{world.namespace}/{CONFIGMAP} (desired)" in result.diff
    after = await world.daemonset()
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]
    listed = await world.kube.list(f"/api/v1/namespaces/{world.namespace}/configmaps")
    assert CONFIGMAP not in [item["metadata"]["name"] for item in listed["items"]]


async def test_a_configmap_of_that_name_apilane_did_not_make_is_left_alone(world: Harness) -> None:
    before = await world.create_daemonset()
    theirs = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": CONFIGMAP},
        "data": {"A": "b"},
    }
    await world.kube.create(f"/api/v1/namespaces/{world.namespace}/configmaps", theirs)
    await world.start(render_mode="configmap")
    await world.publish(snapshot(world.cluster, 1))
    result = await world.result()
    assert result.outcome == "failed"
    assert "was not made by apilane" in result.reason
    assert await configmap_data(world) == {"A": "b"}
    after = await world.daemonset()
    assert after["metadata"]["generation"] == before["metadata"]["generation"]


@pytest.mark.parametrize("mode", ["configmap", "literal"])
async def test_a_daemonset_tigera_operator_renders_is_never_patched(
    world: Harness, mode: str
) -> None:
    manifest = calico_node(world.namespace)
    manifest["metadata"]["ownerReferences"] = [OPERATOR_OWNER]
    manifest["metadata"]["labels"] = {"app.kubernetes.io/managed-by": "tigera-operator"}
    before = await world.kube.create(
        f"/apis/apps/v1/namespaces/{world.namespace}/daemonsets", manifest, field_manager="operator"
    )
    await world.start(render_mode=mode)
    for generation in (1, 2, 3):
        endpoints = nth_endpoints(generation)
        await world.publish(snapshot(world.cluster, generation, endpoints=endpoints))
        result = await world.result()
        assert "bpfNetworkBootstrap: Enabled" in result.reason
        assert "ownerReference Installation/default" in result.reason
        assert result.patch is None
        if mode == "configmap":
            assert result.outcome == "applied", result.reason
            data = await configmap_data(world)
            wanted = render_ip_ports(IpPort.of(ip, 6443) for ip in endpoints)
            assert data[APISERVER_ENDPOINTS] == wanted
        else:
            assert result.outcome == "failed"
    after = await world.daemonset()
    assert after["metadata"]["generation"] == before["metadata"]["generation"]
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]
    assert after["spec"]["template"] == before["spec"]["template"]
    (event, *_) = await events_with(world, "ApiServerEndpointsNotPatched")
    assert event["type"] == "Warning"
    assert "bpfNetworkBootstrap" in event["message"]
    assert event["involvedObject"]["name"] == "calico-node"


async def test_the_operators_ignore_annotation_makes_the_daemonset_patchable(
    world: Harness,
) -> None:
    manifest = calico_node(world.namespace)
    manifest["metadata"]["ownerReferences"] = [OPERATOR_OWNER]
    manifest["metadata"]["annotations"] = {"unsupported.operator.tigera.io/ignore": "true"}
    await world.kube.create(f"/apis/apps/v1/namespaces/{world.namespace}/daemonsets", manifest)
    await world.start(render_mode="configmap")
    await world.publish(snapshot(world.cluster, 1))
    result = await world.result()
    assert result.outcome == "applied" and "adopted" in result.reason, result.reason


async def test_unadopt_gives_the_original_env_back(
    world: Harness, control_plane: ControlPlane, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from apilane.cli.main import main as apilane

    original = await world.create_daemonset(
        main_env=({"name": APISERVER_ENDPOINTS, "value": "198.18.0.10:6443"},)
    )
    await world.start(render_mode="configmap")
    await world.publish(snapshot(world.cluster, 1))
    assert (await world.result()).outcome == "applied"
    await world.stop()
    adopted = await world.daemonset()
    kubeconfig = control_plane.write_kubeconfig(
        tmp_path / "kubeconfig", user="admin", groups=("system:masters",)
    )
    argv = ["render", "unadopt", "--kubeconfig", str(kubeconfig)]
    argv += ["--daemonset", f"{world.namespace}/calico-node"]

    code = await asyncio.to_thread(apilane, argv)
    out = capsys.readouterr().out
    assert code == 0, out
    generation = adopted["metadata"]["generation"]
    assert f"generation {generation} -> {generation + 1}" in out
    assert "removed calico-node.KUBERNETES_SERVICE_IPS_PORTS" in out
    restored = await world.daemonset()
    assert restored["spec"]["template"] == original["spec"]["template"]
    assert MANAGED_ENV_ANNOTATION not in restored["metadata"].get("annotations", {})

    code = await asyncio.to_thread(apilane, argv)
    assert code == 0
    assert "nothing of apilane's to undo" in capsys.readouterr().out


async def test_unadopt_keeping_values_leaves_the_current_endpoints_as_literals(
    world: Harness, control_plane: ControlPlane, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from apilane.cli.main import main as apilane

    await world.create_daemonset()
    await world.start(render_mode="configmap")
    await world.publish(snapshot(world.cluster, 1, endpoints=("192.168.5.7",)))
    assert (await world.result()).outcome == "applied"
    await world.stop()
    kubeconfig = control_plane.write_kubeconfig(
        tmp_path / "kubeconfig", user="admin", groups=("system:masters",)
    )
    argv = ["render", "unadopt", "--keep-values", "--kubeconfig", str(kubeconfig)]
    code = await asyncio.to_thread(
        apilane, [*argv, "--daemonset", f"{world.namespace}/calico-node"]
    )
    assert code == 0, capsys.readouterr()
    live = await world.daemonset()
    assert (
        env_of(live, "initContainers", "ebpf-bootstrap")[APISERVER_ENDPOINTS] == "192.168.5.7:6443"
    )
    assert env_of(live, "containers", "calico-node")[SERVICE_IPS_PORTS] == "10.96.0.1:443"


@contextlib.asynccontextmanager
async def calico_node_in(kube: KubeClient, namespace: str) -> AsyncIterator[str]:
    """A calico-node DaemonSet in one of the fixed layout namespaces of the shared control
    plane, removed again with apilane's ConfigMap beside it."""
    with contextlib.suppress(Exception):
        await kube.create(
            "/api/v1/namespaces",
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}},
        )
    path = f"/apis/apps/v1/namespaces/{namespace}/daemonsets"
    await kube.create(path, calico_node(namespace), field_manager=INSTALLER)
    try:
        yield f"{path}/calico-node"
    finally:
        for leftover in (
            f"{path}/calico-node",
            f"/api/v1/namespaces/{namespace}/configmaps/{CONFIGMAP}",
        ):
            with contextlib.suppress(Exception):
                await kube.delete(leftover)


async def test_auto_detection_looks_again_until_a_layout_appears_and_applies_what_waits(
    world: Harness,
) -> None:
    """Calico installed after the renderer started: no restart, the waiting snapshot lands."""
    renderer = await world.start(render_mode="configmap", detect_target=True)
    await world.publish(snapshot(world.cluster, 1))
    waiting = await world.result()
    assert (waiting.outcome, waiting.daemonset) == ("waiting", f"{world.namespace}/calico-node")
    async with calico_node_in(world.kube, "kube-system") as manifest_ds:
        result = await world.result(timeout=20.0)  # looks again within 1-2 s, then 2-4 s
        assert (result.generation, result.outcome) == (1, "applied"), result.reason
        assert result.daemonset == "kube-system/calico-node"
        assert renderer.settings.target_preset == "manifest"
        live = await world.kube.get(manifest_ds)
        env = await container_env(world.kube, live, "containers", "calico-node")
        assert env[APISERVER_ENDPOINTS] == "192.168.5.4:6443"
        await world.publish(snapshot(world.cluster, 2, endpoints=("192.168.5.5",)))
        second = await world.result()
        assert (second.generation, second.outcome) == (2, "applied"), second.reason
        await world.stop()


async def test_auto_detection_takes_the_layout_whose_daemonset_exists(world: Harness) -> None:
    async with calico_node_in(world.kube, "kube-system") as manifest_ds:
        renderer = await world.start(render_mode="configmap", detect_target=True)
        await world.publish(snapshot(world.cluster, 1))
        result = await world.result()
        assert result.outcome == "applied", result.reason
        assert result.daemonset == "kube-system/calico-node"
        assert renderer.settings.target_preset == "manifest"
        live = await world.kube.get(manifest_ds)
        # The manifest layout: calico-node reads the values itself; no init container is aimed at.
        env = await container_env(world.kube, live, "containers", "calico-node")
        assert env[APISERVER_ENDPOINTS] == "192.168.5.4:6443"
        assert SERVICE_IPS_PORTS not in env_of(live, "initContainers", "ebpf-bootstrap")
        await world.stop()

        async with calico_node_in(world.kube, "calico-system") as operator_ds:
            renderer = await world.start(render_mode="configmap", detect_target=True)
            first = await world.result()  # the bucket's latest, new to this DaemonSet
            assert (first.generation, first.outcome) == (1, "applied"), first.reason
            await world.publish(snapshot(world.cluster, 2, endpoints=("192.168.5.5",)))
            result = await world.result()
            assert result.outcome == "applied", result.reason
            assert result.daemonset == "calico-system/calico-node"
            assert renderer.settings.target_preset == "operator"
            live = await world.kube.get(operator_ds)
            env = await container_env(world.kube, live, "initContainers", "ebpf-bootstrap")
            assert env[APISERVER_ENDPOINTS] == "192.168.5.5:6443"
            await world.stop()
