"""discovery against a real kube-apiserver + etcd and a real nats-server, run in-process.

Most tests watch a Service of their own in a fresh namespace (discovery's Service, kube-proxy
and Lease names are settings), so they never disturb each other; the HA test uses the real
default/kubernetes Service, whose EndpointSlices the fixture empties before and after.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from nats.js.errors import NotFoundError
from prometheus_client import CollectorRegistry

from apilane.discovery import service
from apilane.discovery.antientropy import KeyGuard, ReassertPace
from apilane.discovery.metrics import DiscoveryMetrics
from apilane.discovery.publisher import Outcome, Publisher
from apilane.discovery.sealing import Sealer
from apilane.discovery.settings import DiscoverySettings
from apilane.kube.client import KubeClient, KubeError, NotFound
from apilane.kube.leader import LeaseSettings
from apilane.kube.watch import WATCH_RESTARTS
from apilane.model import events, subjects
from apilane.model.endpoints import SnapshotResult, build_snapshot
from apilane.model.events import ClusterWarning, EndpointSnapshot, WarningReason
from apilane.model.signing import SignatureError, SigningKey, TrustedKeys, open_snapshot
from apilane.node_loader import settings as loader_settings
from apilane.node_loader.memmaps import MemoryNatMaps, render_resolved
from apilane.node_loader.service import DataPlane, NodeLoader
from apilane.node_loader.testing import contents_of
from apilane.renderer.metrics import REFUSAL_REASONS
from apilane.renderer.render import APISERVER_ENDPOINTS
from apilane.renderer.service import Renderer
from apilane.renderer.settings import RendererSettings
from apilane.runtime.bus import Bus, KvEntry
from apilane.runtime.config import CommonSettings
from apilane.runtime.natsauth import Role
from apilane.runtime.serve import Health, ServiceContext, start_http
from apilane.testing.kube import ControlPlane, endpoint_slice
from apilane.testing.loaders import loader_env
from apilane.testing.nats import NatsServer
from apilane.testing.nats_fixtures import ConnectAs
from apilane.testing.sealing import seal
from apilane.testing.snapshots import make_snapshot

pytestmark = [pytest.mark.integration, pytest.mark.kube, pytest.mark.nats]

SLICES = "/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices"
WAIT = 15.0
# Discovery's signing key, shared by its replicas (as a Secret is); snapshots are read back
# by verifying with it, as the renderer does.
DISCOVERY_KEY = SigningKey.generate()
TRUSTED = TrustedKeys.of(DISCOVERY_KEY)


# -- helpers -----------------------------------------------------------------------------------


def settings_for(
    control_plane: ControlPlane,
    nats_server: NatsServer,
    namespace: str,
    *,
    service_namespace: str | None = None,
    service_name: str = "apiserver",
    identity: str = "replica-a",
    cluster: str | None = None,
    signing_key: SigningKey = DISCOVERY_KEY,
    snapshot_ttl: float = 3600.0,
) -> DiscoverySettings:
    cluster = cluster or f"c-{secrets.token_hex(4)}"
    return DiscoverySettings(
        signing_key=signing_key,
        snapshot_ttl=snapshot_ttl,
        common=CommonSettings(
            cluster=cluster,
            nats_urls=(nats_server.url,),
            # Discovery's own identity: the one writer of this cluster's snapshot key.
            nats_auth=nats_server.credentials(Role.DISCOVERY, cluster),
            kubeconfig=str(control_plane.kubeconfig_path),
        ),
        service_namespace=service_namespace or namespace,
        service_name=service_name,
        kube_proxy_namespace=namespace,
        kube_proxy_name="kube-proxy",
        coalesce_window=0.05,
        publish_retry_max=0.5,
        watch_backoff_max=1.0,
        lease=LeaseSettings(
            namespace=namespace,
            name=subjects.discovery_lease(cluster),
            identity=identity,
            duration=3.0,
            renew_interval=0.5,
            retry_interval=0.2,
        ),
    )


@contextlib.asynccontextmanager
async def running(
    settings: DiscoverySettings,
    registry: CollectorRegistry | None = None,
    *,
    health: Health | None = None,
) -> AsyncIterator[service.DiscoveryService]:
    stop = asyncio.Event()
    started: asyncio.Future[service.DiscoveryService] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(
        service.main(
            context(settings, stop, registry, health), settings, started=started.set_result
        )
    )
    try:
        done, _ = await asyncio.wait(
            [started, task], timeout=WAIT, return_when=asyncio.FIRST_COMPLETED
        )
        if task in done:
            task.result()
        assert started.done(), "discovery did not start"
        yield started.result()
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=15)


def context(
    settings: DiscoverySettings,
    stop: asyncio.Event,
    registry: CollectorRegistry | None = None,
    health: Health | None = None,
) -> ServiceContext:
    """What `serve` hands a service body, for an in-process run."""
    return ServiceContext(
        name=service.SERVICE_NAME,
        settings=settings.common,
        stopping=stop,
        health=health if health is not None else Health(),
        registry=registry if registry is not None else CollectorRegistry(),
    )


async def create_service(
    kube: KubeClient, namespace: str, *, families: list[str], name: str = "apiserver"
) -> dict[str, Any]:
    return await kube.create(
        f"/api/v1/namespaces/{namespace}/services",
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name},
            "spec": {
                "ipFamilyPolicy": "SingleStack" if len(families) == 1 else "RequireDualStack",
                "ipFamilies": families,
                "ports": [{"name": "https", "port": 443, "protocol": "TCP", "targetPort": 6443}],
            },
        },
    )


async def put_slice(kube: KubeClient, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
    path = SLICES.format(ns=namespace)
    name = body["metadata"]["name"]
    try:
        current = await kube.get(f"{path}/{name}")
    except NotFound:
        return await kube.create(path, body)
    body = {
        **body,
        "metadata": {**body["metadata"], "resourceVersion": current["metadata"]["resourceVersion"]},
    }
    return await kube.replace(f"{path}/{name}", body)


async def delete_slice(kube: KubeClient, namespace: str, name: str) -> None:
    await kube.delete(f"{SLICES.format(ns=namespace)}/{name}")


def kube_proxy_body(
    *, labels: dict[str, str] | None = None, annotations: dict[str, str] | None = None
) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {
            "name": "kube-proxy",
            "labels": {"k8s-app": "kube-proxy", **(labels or {})},
            "annotations": annotations or {},
        },
        "spec": {
            "selector": {"matchLabels": {"k8s-app": "kube-proxy"}},
            "template": {
                "metadata": {"labels": {"k8s-app": "kube-proxy"}},
                "spec": {
                    "containers": [
                        {"name": "kube-proxy", "image": "registry.k8s.io/kube-proxy:v1.34.4"}
                    ]
                },
            },
        },
    }


async def create_kube_proxy(
    kube: KubeClient, namespace: str, *, ready: bool = True, **meta: Any
) -> dict[str, Any]:
    created = await kube.create(
        f"/apis/apps/v1/namespaces/{namespace}/daemonsets", kube_proxy_body(**meta)
    )
    await set_kube_proxy_status(kube, namespace, ready=ready)
    return created


async def set_kube_proxy_status(kube: KubeClient, namespace: str, *, ready: bool) -> None:
    await kube.patch(
        f"/apis/apps/v1/namespaces/{namespace}/daemonsets/kube-proxy/status",
        {
            "status": {
                "desiredNumberScheduled": 2,
                "currentNumberScheduled": 2,
                "numberMisscheduled": 0,
                "numberReady": 2 if ready else 1,
                "observedGeneration": 1,
            }
        },
        patch_type="merge",
    )


async def read_snapshot(bus: Bus, cluster: str) -> tuple[EndpointSnapshot | None, int]:
    entry = await bus.kv_get(subjects.SNAPSHOT_BUCKET, subjects.snapshot_key(cluster))
    if entry is None:
        return None, 0
    return open_snapshot(entry.value, TRUSTED).snapshot, entry.revision


async def wait_snapshot(
    bus: Bus, cluster: str, predicate: Callable[[EndpointSnapshot], bool], *, timeout: float = WAIT
) -> EndpointSnapshot:
    deadline = time.monotonic() + timeout
    last: EndpointSnapshot | None = None
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            last, _ = await read_snapshot(bus, cluster)
        if last is not None and predicate(last):
            return last
        await asyncio.sleep(0.05)
    raise AssertionError(f"no matching snapshot for {cluster} within {timeout}s; last: {last}")


def ips(*wanted: str) -> Callable[[EndpointSnapshot], bool]:
    return lambda s: sorted(e.ip for e in s.apiserver_endpoints) == sorted(wanted)


class Warnings:
    """Every ClusterWarning on the cluster's warnings subject (core NATS subscription)."""

    def __init__(self) -> None:
        self.items: list[ClusterWarning] = []

    async def start(self, bus: Bus, cluster: str) -> Warnings:
        async def handle(msg: Any) -> None:
            event = events.decode(msg.data)
            assert isinstance(event, ClusterWarning)
            self.items.append(event)

        await bus.nc.subscribe(subjects.warnings_subject(cluster), cb=handle)
        await bus.nc.flush()
        return self

    async def wait_for(
        self, reason: str, *, containing: str = "", timeout: float = WAIT
    ) -> ClusterWarning:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for item in self.items:
                if item.reason == reason and containing in item.message:
                    return item
            await asyncio.sleep(0.05)
        raise AssertionError(
            f"no {reason} warning containing {containing!r}; got {[(w.reason, w.message) for w in self.items]}"
        )

    def reasons(self) -> list[str]:
        return [w.reason for w in self.items]


async def generations(bus: Bus, cluster: str) -> list[int]:
    """Every generation the bucket holds for this cluster, oldest first (from the KV history)."""
    kv = await bus.js.key_value(subjects.SNAPSHOT_BUCKET)
    history = await kv.history(subjects.snapshot_key(cluster))
    return [
        open_snapshot(entry.value, TRUSTED).snapshot.generation for entry in history if entry.value
    ]


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture
async def own_service(kube: KubeClient, kube_namespace: str) -> str:
    """A dual-stack-capable per-test namespace with Service 'apiserver' (IPv4) and a ready kube-proxy."""
    await create_service(kube, kube_namespace, families=["IPv4"])
    await create_kube_proxy(kube, kube_namespace)
    return kube_namespace


# -- tests -------------------------------------------------------------------------------------


async def test_ha_endpoints_three_to_two_to_three_with_a_new_ip(
    control_plane: ControlPlane,
    nats_server: NatsServer,
    bus: Bus,
    kubernetes_endpoints: KubeClient,
    kube_namespace: str,
) -> None:
    kube = kubernetes_endpoints
    await create_kube_proxy(kube, kube_namespace)
    settings = settings_for(
        control_plane,
        nats_server,
        kube_namespace,
        service_namespace="default",
        service_name="kubernetes",
    )
    # The apiserver's port is what the kubernetes Service targets (a free port in this harness).
    target = (await kube.get("/api/v1/namespaces/default/services/kubernetes"))["spec"]["ports"][0][
        "targetPort"
    ]

    def kubernetes_slice(*addresses: str) -> dict[str, Any]:
        return endpoint_slice("kubernetes", addresses=list(addresses), port=target)

    await put_slice(
        kube,
        "default",
        kubernetes_slice("192.0.2.1", "192.0.2.2", "192.0.2.3"),
    )
    registry = CollectorRegistry()
    async with running(settings, registry):
        first = await wait_snapshot(
            bus, settings.cluster, ips("192.0.2.1", "192.0.2.2", "192.0.2.3")
        )
        assert [(e.ip, e.port) for e in first.service_endpoints] == [("10.96.0.1", 443)]
        assert {e.port for e in first.apiserver_endpoints} == {target}
        await put_slice(kube, "default", kubernetes_slice("192.0.2.1", "192.0.2.3"))
        second = await wait_snapshot(bus, settings.cluster, ips("192.0.2.1", "192.0.2.3"))
        await put_slice(
            kube,
            "default",
            kubernetes_slice("192.0.2.1", "192.0.2.3", "192.0.2.4"),
        )
        third = await wait_snapshot(
            bus, settings.cluster, ips("192.0.2.1", "192.0.2.3", "192.0.2.4")
        )
    assert first.generation < second.generation < third.generation
    assert len({first.digest, second.digest, third.digest}) == 3
    assert any(rv.startswith("EndpointSlice/default/kubernetes@") for rv in third.resource_versions)
    assert await generations(bus, settings.cluster) == [
        first.generation,
        second.generation,
        third.generation,
    ]
    assert (registry.get_sample_value("apilane_discovery_publishes_total") or 0) == 3
    assert (
        registry.get_sample_value("apilane_discovery_change_to_publish_seconds_count") or 0
    ) >= 2


async def test_reordering_only_publishes_nothing(
    control_plane: ControlPlane,
    nats_server: NatsServer,
    bus: Bus,
    kube: KubeClient,
    own_service: str,
) -> None:
    ns = own_service
    # The reshuffle below is two writes: between them the view really lacks 192.0.2.1. A
    # first change after a quiet window is published at once, so the writes are made inside
    # the window the first publish opens, where they coalesce into one trailing view.
    settings = dataclasses.replace(
        settings_for(control_plane, nats_server, ns), coalesce_window=1.0
    )
    await put_slice(
        kube, ns, endpoint_slice("a", service="apiserver", addresses=["192.0.2.1", "192.0.2.2"])
    )
    await put_slice(kube, ns, endpoint_slice("b", service="apiserver", addresses=["192.0.2.3"]))
    registry = CollectorRegistry()
    async with running(settings, registry):
        first = await wait_snapshot(
            bus, settings.cluster, ips("192.0.2.1", "192.0.2.2", "192.0.2.3")
        )
        # Same addresses, other order, spread differently over the slices.
        await put_slice(
            kube, ns, endpoint_slice("a", service="apiserver", addresses=["192.0.2.3", "192.0.2.2"])
        )
        await put_slice(kube, ns, endpoint_slice("b", service="apiserver", addresses=["192.0.2.1"]))
        await asyncio.sleep(settings.coalesce_window + 0.5)
        _, revision_after = await read_snapshot(bus, settings.cluster)
    assert await generations(bus, settings.cluster) == [first.generation]
    assert revision_after > 0
    assert (registry.get_sample_value("apilane_discovery_suppressed_total") or 0) >= 2
    assert (registry.get_sample_value("apilane_discovery_publishes_total") or 0) == 1


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(
            (["IPv4"], "IPv6", "2001:db8::10", "IPv4"), id="ipv6-endpoint-ipv4-only-service"
        ),
        pytest.param(
            (["IPv6"], "IPv4", "192.0.2.10", "IPv6"), id="ipv4-endpoint-ipv6-only-service"
        ),
    ],
)
async def test_dual_stack_family_mismatch_is_published_with_a_warning(
    control_plane: ControlPlane,
    nats_server: NatsServer,
    bus: Bus,
    kube: KubeClient,
    kube_namespace: str,
    case: tuple[list[str], str, str, str],
) -> None:
    service_families, address_type, address, service_ip_family = case
    ns = kube_namespace
    await create_service(kube, ns, families=service_families)
    await create_kube_proxy(kube, ns)
    settings = settings_for(control_plane, nats_server, ns)
    warnings = await Warnings().start(bus, settings.cluster)
    await put_slice(
        kube,
        ns,
        endpoint_slice("a", service="apiserver", addresses=[address], address_type=address_type),
    )
    async with running(settings):
        snapshot = await wait_snapshot(bus, settings.cluster, ips(address))
        warning = await warnings.wait_for(WarningReason.FAMILY_MISMATCH)
    assert [e.family for e in snapshot.service_endpoints] == [service_ip_family]
    assert [e.family for e in snapshot.apiserver_endpoints] == [address_type]
    assert warning.object_ref == f"Service/{ns}/apiserver"
    assert WarningReason.FAMILY_MISMATCH in {f.reason for f in snapshot.findings}


async def test_dual_stack_service_with_both_families(
    control_plane: ControlPlane,
    nats_server: NatsServer,
    bus: Bus,
    kube: KubeClient,
    kube_namespace: str,
) -> None:
    ns = kube_namespace
    await create_service(kube, ns, families=["IPv4", "IPv6"])
    await create_kube_proxy(kube, ns)
    settings = settings_for(control_plane, nats_server, ns)
    await put_slice(kube, ns, endpoint_slice("v4", service="apiserver", addresses=["192.0.2.1"]))
    await put_slice(
        kube,
        ns,
        endpoint_slice("v6", service="apiserver", addresses=["2001:db8::1"], address_type="IPv6"),
    )
    async with running(settings):
        snapshot = await wait_snapshot(bus, settings.cluster, ips("192.0.2.1", "2001:db8::1"))
    assert [e.family for e in snapshot.service_endpoints] == ["IPv4", "IPv6"]
    assert [e.family for e in snapshot.apiserver_endpoints] == ["IPv4", "IPv6"]
    assert WarningReason.FAMILY_MISMATCH not in {f.reason for f in snapshot.findings}


async def test_terminating_only_endpoints_fall_back_with_a_warning(
    control_plane: ControlPlane,
    nats_server: NatsServer,
    bus: Bus,
    kube: KubeClient,
    own_service: str,
) -> None:
    ns = own_service
    settings = settings_for(control_plane, nats_server, ns)
    warnings = await Warnings().start(bus, settings.cluster)
    await put_slice(
        kube, ns, endpoint_slice("a", service="apiserver", addresses=["192.0.2.1", "192.0.2.2"])
    )
    async with running(settings):
        await wait_snapshot(bus, settings.cluster, ips("192.0.2.1", "192.0.2.2"))
        await put_slice(
            kube,
            ns,
            endpoint_slice(
                "a",
                service="apiserver",
                addresses=["192.0.2.5"],
                ready=False,
                serving=True,
                terminating=True,
            ),
        )
        snapshot = await wait_snapshot(bus, settings.cluster, ips("192.0.2.5"))
        await warnings.wait_for(WarningReason.TERMINATING_FALLBACK)
    assert snapshot.apiserver_endpoints[0].terminating


async def test_zero_endpoints_publish_nothing_and_warn(
    control_plane: ControlPlane,
    nats_server: NatsServer,
    bus: Bus,
    kube: KubeClient,
    own_service: str,
) -> None:
    ns = own_service
    settings = settings_for(control_plane, nats_server, ns)
    warnings = await Warnings().start(bus, settings.cluster)
    await put_slice(kube, ns, endpoint_slice("a", service="apiserver", addresses=["192.0.2.1"]))
    async with running(settings):
        good = await wait_snapshot(bus, settings.cluster, ips("192.0.2.1"))
        await put_slice(
            kube,
            ns,
            endpoint_slice(
                "a", service="apiserver", addresses=["192.0.2.1"], ready=False, serving=False
            ),
        )
        await warnings.wait_for(WarningReason.NO_READY_ENDPOINTS)
        await delete_slice(kube, ns, "a")
        await asyncio.sleep(0.4)
        still, _ = await read_snapshot(bus, settings.cluster)
    assert still == good  # the last good snapshot stays
    assert await generations(bus, settings.cluster) == [good.generation]


async def test_invalid_entries_are_warned_about_and_the_valid_ones_published(
    control_plane: ControlPlane,
    nats_server: NatsServer,
    bus: Bus,
    kube: KubeClient,
    own_service: str,
) -> None:
    ns = own_service
    settings = settings_for(control_plane, nats_server, ns)
    warnings = await Warnings().start(bus, settings.cluster)
    await put_slice(kube, ns, endpoint_slice("good", service="apiserver", addresses=["192.0.2.1"]))
    # What the API server accepts but discovery cannot use: a port the Service does not
    # target, and an FQDN slice.
    await put_slice(
        kube,
        ns,
        endpoint_slice(
            "wrong-port",
            service="apiserver",
            addresses=["192.0.2.9"],
            port=8443,
            port_name="metrics",
        ),
    )
    fqdn = endpoint_slice(
        "fqdn", service="apiserver", addresses=["api.example.com"], address_type="FQDN"
    )
    await put_slice(kube, ns, fqdn)
    async with running(settings):
        snapshot = await wait_snapshot(bus, settings.cluster, ips("192.0.2.1"))
        invalid = await warnings.wait_for(WarningReason.INVALID_ENDPOINT, containing="targetPort")
        fqdn_warning = await warnings.wait_for(WarningReason.UNSUPPORTED_ADDRESS_TYPE)
        events_list = await wait_events(kube, ns, WarningReason.INVALID_ENDPOINT)
    assert invalid.object_ref == f"EndpointSlice/{ns}/wrong-port"
    assert fqdn_warning.object_ref == f"EndpointSlice/{ns}/fqdn"
    assert events_list[0]["involvedObject"]["name"] == "wrong-port"
    assert events_list[0]["type"] == "Warning"
    assert {f.reason for f in snapshot.findings} >= {
        WarningReason.INVALID_ENDPOINT,
        WarningReason.UNSUPPORTED_ADDRESS_TYPE,
    }


async def wait_events(
    kube: KubeClient, namespace: str, reason: str, *, timeout: float = WAIT
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listing = await kube.list(f"/api/v1/namespaces/{namespace}/events")
        found = [e for e in listing["items"] if e.get("reason") == reason]
        if found:
            return found
        await asyncio.sleep(0.1)
    raise AssertionError(f"no {reason} Event in {namespace}")


async def test_kube_proxy_missing_not_ready_and_externally_managed_by_each_marker(
    control_plane: ControlPlane,
    nats_server: NatsServer,
    bus: Bus,
    kube: KubeClient,
    kube_namespace: str,
) -> None:
    ns = kube_namespace
    await create_service(kube, ns, families=["IPv4"])
    settings = settings_for(control_plane, nats_server, ns)
    warnings = await Warnings().start(bus, settings.cluster)
    await put_slice(kube, ns, endpoint_slice("a", service="apiserver", addresses=["192.0.2.1"]))
    ds_path = f"/apis/apps/v1/namespaces/{ns}/daemonsets/kube-proxy"
    async with running(settings):
        await wait_snapshot(bus, settings.cluster, ips("192.0.2.1"))
        missing = await warnings.wait_for(WarningReason.KUBE_PROXY_MISSING)
        assert missing.object_ref == f"DaemonSet/{ns}/kube-proxy"

        await create_kube_proxy(kube, ns, ready=False)
        await warnings.wait_for(WarningReason.KUBE_PROXY_NOT_READY, containing="1 of 2")
        await set_kube_proxy_status(kube, ns, ready=True)

        markers = [
            ("labels", "app.kubernetes.io/managed-by", "Helm"),
            ("labels", "addonmanager.kubernetes.io/mode", "Reconcile"),
            ("labels", "kustomize.toolkit.fluxcd.io/name", "infra"),
            ("labels", "helm.toolkit.fluxcd.io/name", "kube-proxy"),
            (
                "annotations",
                "argocd.argoproj.io/tracking-id",
                "app:apps/DaemonSet:kube-system/kube-proxy",
            ),
        ]
        for field, key, value in markers:
            # Exactly one marker at a time: add this one, remove the previous ones.
            patch = {
                "metadata": {
                    "labels": {k: None for f, k, _ in markers if f == "labels"},
                    "annotations": {k: None for f, k, _ in markers if f == "annotations"},
                }
            }
            patch["metadata"][field][key] = value
            await kube.patch(ds_path, patch, patch_type="merge")
            warning = await warnings.wait_for(
                WarningReason.EXTERNALLY_MANAGED_KUBE_PROXY, containing=key
            )
            assert warning.object_ref == f"DaemonSet/{ns}/kube-proxy"
        snapshot, _ = await read_snapshot(bus, settings.cluster)
        events_list = await wait_events(kube, ns, WarningReason.EXTERNALLY_MANAGED_KUBE_PROXY)
    # Missing and not-ready are warnings only; each change of the external-management marker
    # is a new generation, because the renderer acts on it.
    assert snapshot is not None and snapshot.generation == 1 + len(markers)
    assert snapshot.kube_proxy.managed_by.startswith("annotation:argocd.argoproj.io/tracking-id")
    assert {e["involvedObject"]["kind"] for e in events_list} == {"DaemonSet"}
    assert len(events_list) == len(markers)


async def test_a_forced_410_relists_without_losing_a_change(
    control_plane: ControlPlane,
    nats_server: NatsServer,
    bus: Bus,
    kube: KubeClient,
    own_service: str,
) -> None:
    ns = own_service
    settings = settings_for(control_plane, nats_server, ns)
    await put_slice(kube, ns, endpoint_slice("a", service="apiserver", addresses=["192.0.2.1"]))
    gone = WATCH_RESTARTS.labels("endpointslices", "gone")
    gone_before = gone._value.get()
    async with running(settings):
        await wait_snapshot(bus, settings.cluster, ips("192.0.2.1"))
        await asyncio.to_thread(
            control_plane.restart_apiserver, graceful=False, expire_watches=True
        )
        # Written before the watches are back: the resumed watch gets 410 and only a relist sees it.
        await put_slice(
            kube, ns, endpoint_slice("a", service="apiserver", addresses=["192.0.2.1", "192.0.2.7"])
        )
        snapshot = await wait_snapshot(
            bus, settings.cluster, ips("192.0.2.1", "192.0.2.7"), timeout=30
        )
    assert snapshot.generation == 2
    assert gone._value.get() > gone_before  # it really was a 410 and a relist


async def test_an_apiserver_restart_in_the_middle_of_a_watch(
    control_plane: ControlPlane,
    nats_server: NatsServer,
    bus: Bus,
    kube: KubeClient,
    own_service: str,
) -> None:
    ns = own_service
    settings = settings_for(control_plane, nats_server, ns)
    await put_slice(kube, ns, endpoint_slice("a", service="apiserver", addresses=["192.0.2.1"]))
    async with running(settings) as discovery:
        await wait_snapshot(bus, settings.cluster, ips("192.0.2.1"))
        await asyncio.to_thread(control_plane.restart_apiserver, graceful=False)
        await put_slice(kube, ns, endpoint_slice("a", service="apiserver", addresses=["192.0.2.2"]))
        snapshot = await wait_snapshot(bus, settings.cluster, ips("192.0.2.2"), timeout=30)
        assert discovery.ready
    assert snapshot.generation == 2


async def test_leader_failover_keeps_generations_increasing(
    control_plane: ControlPlane,
    nats_server: NatsServer,
    bus: Bus,
    kube: KubeClient,
    own_service: str,
) -> None:
    ns = own_service
    cluster = f"c-{secrets.token_hex(4)}"
    await put_slice(kube, ns, endpoint_slice("a", service="apiserver", addresses=["192.0.2.1"]))
    async with contextlib.AsyncExitStack() as replica_b_scope:
        async with contextlib.AsyncExitStack() as replica_a_scope:
            replica_a = await replica_a_scope.enter_async_context(
                running(
                    settings_for(
                        control_plane, nats_server, ns, identity="replica-a", cluster=cluster
                    )
                )
            )
            await wait_until(replica_a.is_leader)
            first = await wait_snapshot(bus, cluster, ips("192.0.2.1"))
            replica_b = await replica_b_scope.enter_async_context(
                running(
                    settings_for(
                        control_plane, nats_server, ns, identity="replica-b", cluster=cluster
                    )
                )
            )
            await wait_until(lambda: replica_b.watcher.synced)
            assert not replica_b.is_leader()
            await put_slice(
                kube,
                ns,
                endpoint_slice("a", service="apiserver", addresses=["192.0.2.1", "192.0.2.2"]),
            )
            second = await wait_snapshot(bus, cluster, ips("192.0.2.1", "192.0.2.2"))
        # replica-a stopped and released the Lease: replica-b takes over at once.
        await wait_until(replica_b.is_leader, timeout=5)
        await put_slice(kube, ns, endpoint_slice("a", service="apiserver", addresses=["192.0.2.3"]))
        third = await wait_snapshot(bus, cluster, ips("192.0.2.3"))
    assert (first.generation, second.generation, third.generation) == (1, 2, 3)
    assert await generations(bus, cluster) == [1, 2, 3]


async def wait_until(predicate: Callable[[], bool], *, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not met in time")


async def test_a_nats_restart_while_changes_happen_loses_nothing(
    control_plane: ControlPlane,
    nats_server: NatsServer,
    bus: Bus,
    kube: KubeClient,
    own_service: str,
) -> None:
    ns = own_service
    settings = settings_for(control_plane, nats_server, ns)
    await put_slice(kube, ns, endpoint_slice("a", service="apiserver", addresses=["192.0.2.1"]))
    async with running(settings) as discovery:
        first = await wait_snapshot(bus, settings.cluster, ips("192.0.2.1"))
        await asyncio.to_thread(nats_server.stop)
        await wait_until(lambda: not discovery.bus.connected)
        for n in range(2, 6):
            await put_slice(
                kube,
                ns,
                endpoint_slice("a", service="apiserver", addresses=["192.0.2.1", f"192.0.2.{n}"]),
            )
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.3)
        await asyncio.to_thread(nats_server.start)
        last = await wait_snapshot(bus, settings.cluster, ips("192.0.2.1", "192.0.2.5"), timeout=30)
    assert last.generation > first.generation
    rvs = {rv for rv in last.resource_versions if rv.startswith(f"EndpointSlice/{ns}/a@")}
    assert len(rvs) >= 2  # the publish names the changes made while NATS was down


# -- managed control plane: cluster-scoped Nodes -------------------------------------------------

NODES = "/api/v1/nodes"
EKS_NODEGROUP = "eks.amazonaws.com/nodegroup"
CONTROL_PLANE_ROLE = "node-role.kubernetes.io/control-plane"
MANAGED = WarningReason.MANAGED_CONTROL_PLANE


class ClusterNodes:
    """The Nodes one test makes. Nodes are cluster-scoped and the control plane is shared by
    the session: unique names, deleted (with their Events) when the test ends."""

    def __init__(self, kube: KubeClient) -> None:
        self.kube = kube
        self.prefix = f"n-{secrets.token_hex(4)}"
        self.names: set[str] = set()

    def name(self, role: str) -> str:
        return f"{self.prefix}-{role}"

    async def create(
        self, role: str, *, labels: dict[str, str] | None = None, provider_id: str = ""
    ) -> dict[str, Any]:
        """A Node as the API accepts it without a kubelet (nothing in the harness runs one)."""
        name = self.name(role)
        self.names.add(name)
        return await self.kube.create(
            NODES,
            {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {"name": name, "labels": labels or {}},
                "spec": {"providerID": provider_id} if provider_id else {},
            },
        )

    async def label(self, name: str, labels: dict[str, str | None]) -> dict[str, Any]:
        return await self.kube.patch(
            f"{NODES}/{name}", {"metadata": {"labels": labels}}, patch_type="merge"
        )

    async def heartbeat(self, name: str, beat: int) -> dict[str, Any]:
        """What a kubelet writes all the time: a Ready condition, then an annotation."""
        at = datetime.now(UTC) + timedelta(seconds=beat)  # distinct even within one second
        stamp = at.strftime("%Y-%m-%dT%H:%M:%SZ")
        await self.kube.patch(
            f"{NODES}/{name}/status",
            {
                "status": {
                    "conditions": [
                        {
                            "type": "Ready",
                            "status": "True",
                            "reason": "KubeletReady",
                            "message": "kubelet is posting ready status",
                            "lastHeartbeatTime": stamp,
                            "lastTransitionTime": stamp,
                        }
                    ]
                }
            },
            patch_type="merge",
        )
        return await self.kube.patch(
            f"{NODES}/{name}",
            {"metadata": {"annotations": {"apilane.test/heartbeat": stamp}}},
            patch_type="merge",
        )

    async def delete(self, name: str) -> None:
        await self.kube.delete(f"{NODES}/{name}")

    async def cleanup(self) -> None:
        for name in sorted(self.names):
            with contextlib.suppress(NotFound):
                await self.delete(name)
        for event in await node_events(self.kube, self.names):
            with contextlib.suppress(KubeError):
                await self.kube.delete(
                    f"/api/v1/namespaces/default/events/{event['metadata']['name']}"
                )


@pytest.fixture
async def cluster_nodes(kube: KubeClient) -> AsyncIterator[ClusterNodes]:
    # The managed-control-plane rule looks at every Node: a leftover would change the outcome.
    leftovers = [node["metadata"]["name"] for node in (await kube.list(NODES))["items"]]
    assert not leftovers, f"Nodes left over by another test: {leftovers}"
    nodes = ClusterNodes(kube)
    try:
        yield nodes
    finally:
        await nodes.cleanup()


async def node_events(
    kube: KubeClient, names: set[str], reason: str | None = None
) -> list[dict[str, Any]]:
    """Events about these Nodes (a cluster-scoped object's Events live in "default")."""
    listing = await kube.list("/api/v1/namespaces/default/events")
    return [
        event
        for event in listing["items"]
        if event["involvedObject"].get("kind") == "Node"
        and event["involvedObject"].get("name") in names
        and (reason is None or event.get("reason") == reason)
    ]


async def wait_node_events(
    kube: KubeClient, name: str, reason: str, *, count: int = 1, timeout: float = WAIT
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    found: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        found = await node_events(kube, {name}, reason)
        if len(found) >= count:
            return found
        await asyncio.sleep(0.1)
    raise AssertionError(f"{len(found)} {reason} Events on Node/{name}, expected {count}")


async def stored_warnings(bus: Bus, cluster: str) -> list[ClusterWarning]:
    """The warnings the events stream kept for this cluster: what a durable consumer reads
    (a core subscription also sees publishes JetStream dropped as duplicates)."""
    subject = subjects.warnings_subject(cluster)
    info = await bus.js.stream_info(subjects.EVENTS_STREAM)
    stored: list[ClusterWarning] = []
    for sequence in range(info.state.first_seq, info.state.last_seq + 1):
        try:
            raw = await bus.js.get_msg(subjects.EVENTS_STREAM, seq=sequence)
        except NotFoundError:
            continue  # deleted from the stream
        if raw.subject != subject or raw.data is None:
            continue
        event = events.decode(raw.data)
        assert isinstance(event, ClusterWarning)
        stored.append(event)
    return stored


def managed_findings(snapshot: EndpointSnapshot) -> list[events.Finding]:
    return [finding for finding in snapshot.findings if finding.reason == MANAGED]


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(
            (
                {EKS_NODEGROUP: "ng-1", "eks.amazonaws.com/capacityType": "ON_DEMAND"},
                "",
                "eks",
                f"label:{EKS_NODEGROUP}",
            ),
            id="eks-node-group-labels",
        ),
        pytest.param(
            ({}, "aws:///us-east-1a/i-0123456789abcdef0", "aws", "providerID:aws://"),
            id="aws-provider-id",
        ),
    ],
)
async def test_a_managed_control_plane_is_published_warned_and_recorded_on_the_node(
    control_plane: ControlPlane,
    nats_server: NatsServer,
    bus: Bus,
    kube: KubeClient,
    own_service: str,
    cluster_nodes: ClusterNodes,
    case: tuple[dict[str, str], str, str, str],
) -> None:
    labels, provider_id, provider, marker = case
    ns = own_service
    node = await cluster_nodes.create("worker", labels=labels, provider_id=provider_id)
    name = node["metadata"]["name"]
    settings = settings_for(control_plane, nats_server, ns)
    warnings = await Warnings().start(bus, settings.cluster)
    await put_slice(kube, ns, endpoint_slice("a", service="apiserver", addresses=["192.0.2.1"]))
    async with running(settings):
        snapshot = await wait_snapshot(bus, settings.cluster, ips("192.0.2.1"))
        warning = await warnings.wait_for(MANAGED)
        recorded = await wait_node_events(kube, name, MANAGED)
        stored = await stored_warnings(bus, settings.cluster)

    assert snapshot.managed_provider == provider
    [finding] = managed_findings(snapshot)
    assert finding.object_ref == f"Node/{name}"
    assert finding.detail == {"provider": provider, "marker": marker, "node": name}

    assert warning.cluster == settings.cluster
    assert warning.source == "discovery"
    assert warning.object_ref == f"Node/{name}"
    assert warning.generation == snapshot.generation
    assert f"look like {provider} ({marker} on node {name})" in warning.message
    assert [w.reason for w in stored].count(MANAGED) == 1

    [event] = recorded
    assert event["type"] == "Warning"
    assert event["message"] == warning.message
    assert event["count"] == 1
    assert event["source"]["component"] == service.COMPONENT
    involved = event["involvedObject"]
    assert (involved["apiVersion"], involved["kind"], involved["name"]) == ("v1", "Node", name)
    assert involved["uid"] == node["metadata"]["uid"]


async def test_the_managed_control_plane_warning_is_emitted_once_while_it_lasts(
    control_plane: ControlPlane,
    nats_server: NatsServer,
    bus: Bus,
    kube: KubeClient,
    own_service: str,
    cluster_nodes: ClusterNodes,
) -> None:
    ns = own_service
    settings = settings_for(control_plane, nats_server, ns)
    warnings = await Warnings().start(bus, settings.cluster)
    await put_slice(kube, ns, endpoint_slice("a", service="apiserver", addresses=["192.0.2.1"]))
    registry = CollectorRegistry()

    def managed_warnings() -> int:
        return warnings.reasons().count(MANAGED)

    async with running(settings, registry) as discovery:
        publisher = discovery.publisher
        first = await wait_snapshot(bus, settings.cluster, ips("192.0.2.1"))
        assert first.managed_provider == ""
        assert not managed_findings(first)

        # The condition appears while discovery runs.
        node = await cluster_nodes.create("eks", labels={EKS_NODEGROUP: "ng-1"})
        name = node["metadata"]["name"]
        await warnings.wait_for(MANAGED, containing=name)
        await wait_node_events(kube, name, MANAGED)
        await wait_until(lambda: not publisher.pending)

        # Heartbeats (status, annotations) and a label the rule does not read: the watch sees
        # every one of them, none of them is a change.
        updated = node
        for beat in range(3):
            updated = await cluster_nodes.heartbeat(name, beat)
        updated = await cluster_nodes.label(name, {"topology.kubernetes.io/zone": "us-east-1a"})
        last_version = updated["metadata"]["resourceVersion"]
        node_cache = discovery.watcher.caches["Node"]
        await wait_until(
            lambda: (
                (node_cache.get("", name) or {}).get("metadata", {}).get("resourceVersion")
                == last_version
            )
        )
        await asyncio.sleep(10 * settings.coalesce_window)
        assert managed_warnings() == 1
        [event] = await node_events(kube, {name}, MANAGED)
        assert event["count"] == 1
        assert await generations(bus, settings.cluster) == [first.generation]

        # The condition goes away (the Node is deleted) ...
        await cluster_nodes.delete(name)
        await wait_until(
            lambda: (
                publisher.latest is not None
                and publisher.latest.managed_provider == ""
                and not publisher.pending
            )
        )
        assert managed_warnings() == 1

        # ... and comes back: a new warning, and an Event on the new Node (a new uid).
        again = await cluster_nodes.create("eks", labels={EKS_NODEGROUP: "ng-1"})
        await wait_until(lambda: managed_warnings() == 2)
        recorded = await wait_node_events(kube, name, MANAGED, count=2)
        await wait_until(lambda: not publisher.pending)
        await asyncio.sleep(10 * settings.coalesce_window)
        stored = await stored_warnings(bus, settings.cluster)

    assert managed_warnings() == 2
    assert {e["involvedObject"]["uid"] for e in recorded} == {
        node["metadata"]["uid"],
        again["metadata"]["uid"],
    }
    assert all(e["count"] == 1 for e in recorded)
    # The stream keeps both: the recurrence is not mistaken for a retried duplicate.
    assert [w.reason for w in stored].count(MANAGED) == 2
    # Warnings only, never a new generation: the endpoints did not change.
    assert await generations(bus, settings.cluster) == [first.generation]
    assert (registry.get_sample_value("apilane_discovery_publishes_total") or 0) == 1


async def test_a_cloud_provider_id_counts_only_when_no_node_is_a_control_plane_node(
    control_plane: ControlPlane,
    nats_server: NatsServer,
    bus: Bus,
    kube: KubeClient,
    own_service: str,
    cluster_nodes: ClusterNodes,
) -> None:
    """kubeadm on EC2 has aws:// providerIDs too, but runs its API server on its own
    control-plane nodes; provider labels are decisive whatever the roles."""
    ns = own_service
    control = await cluster_nodes.create(
        "cp", labels={CONTROL_PLANE_ROLE: ""}, provider_id="aws:///us-east-1a/i-0c0c0c0c0c0c0c0c0"
    )
    worker = await cluster_nodes.create(
        "worker", provider_id="aws:///us-east-1b/i-0a0a0a0a0a0a0a0a0"
    )
    control_name, worker_name = control["metadata"]["name"], worker["metadata"]["name"]
    settings = settings_for(control_plane, nats_server, ns)
    warnings = await Warnings().start(bus, settings.cluster)
    await put_slice(kube, ns, endpoint_slice("a", service="apiserver", addresses=["192.0.2.1"]))

    def latest_provider(discovery: service.DiscoveryService) -> str | None:
        latest = discovery.publisher.latest
        return None if latest is None or discovery.publisher.pending else latest.managed_provider

    async with running(settings) as discovery:
        first = await wait_snapshot(bus, settings.cluster, ips("192.0.2.1"))
        await wait_until(lambda: not discovery.publisher.pending)
        await asyncio.sleep(10 * settings.coalesce_window)
        assert first.managed_provider == ""
        assert not managed_findings(first)
        assert MANAGED not in warnings.reasons()

        # Without the control-plane node, the worker's providerID alone says "managed".
        await cluster_nodes.delete(control_name)
        by_provider_id = await warnings.wait_for(MANAGED)
        assert by_provider_id.object_ref == f"Node/{worker_name}"
        assert "providerID:aws://" in by_provider_id.message
        await wait_until(lambda: latest_provider(discovery) == "aws")

        # The legacy role label makes a control-plane node too: not managed any more.
        await cluster_nodes.label(worker_name, {"node-role.kubernetes.io/master": ""})
        await wait_until(lambda: latest_provider(discovery) == "")

        # A provider label is decisive even on a control-plane node.
        await cluster_nodes.label(worker_name, {EKS_NODEGROUP: "ng-1"})
        by_label = await warnings.wait_for(MANAGED, containing=f"label:{EKS_NODEGROUP}")
        await wait_until(lambda: latest_provider(discovery) == "eks")

    assert by_label.object_ref == f"Node/{worker_name}"
    assert warnings.reasons().count(MANAGED) == 2
    assert await generations(bus, settings.cluster) == [first.generation]


# -- health ------------------------------------------------------------------------------------


async def test_readiness_follows_the_watches_and_the_nats_connection(
    control_plane: ControlPlane,
    nats_server: NatsServer,
    bus: Bus,
    kube: KubeClient,
    own_service: str,
) -> None:
    ns = own_service
    settings = settings_for(control_plane, nats_server, ns)
    await put_slice(kube, ns, endpoint_slice("a", service="apiserver", addresses=["192.0.2.1"]))
    health = Health()
    runner, port = await start_http("127.0.0.1", 0, health, CollectorRegistry())

    async def probe(path: str) -> tuple[int, dict[str, Any]]:
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{port}{path}") as response,
        ):
            return response.status, await response.json()

    async def wait_probe(path: str, status: int, checks: dict[str, bool]) -> None:
        deadline = time.monotonic() + WAIT
        last: tuple[int, dict[str, Any]] = (0, {})
        while time.monotonic() < deadline:
            last = await probe(path)
            if last[0] == status and checks.items() <= last[1]["checks"].items():
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"{path}: wanted {status} with {checks}, last {last}")

    await asyncio.to_thread(nats_server.stop)
    stop = asyncio.Event()
    task = asyncio.create_task(service.main(context(settings, stop, health=health), settings))
    try:
        # Starting without NATS: nothing connected, nothing listed, so not ready.
        await asyncio.sleep(0.5)
        assert not task.done()
        await wait_probe("/readyz", 503, {"nats-connected": False, "watches-listed": False})

        await asyncio.to_thread(nats_server.start)
        await wait_probe("/readyz", 200, {"nats-connected": True, "watches-listed": True})
        await wait_snapshot(bus, settings.cluster, ips("192.0.2.1"))
        await wait_probe("/healthz", 200, {"tasks-running": True})

        # NATS goes away: not ready (the watches still are); back: ready again.
        await asyncio.to_thread(nats_server.stop)
        await wait_probe("/readyz", 503, {"nats-connected": False, "watches-listed": True})
        await wait_probe("/healthz", 200, {"tasks-running": True})
        await asyncio.to_thread(nats_server.start)
        await wait_probe("/readyz", 200, {"nats-connected": True, "watches-listed": True})
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=15)
        await runner.cleanup()


# -- signed snapshots, discovery to renderer ---------------------------------------------------


def calico_node() -> dict[str, Any]:
    labels = {"k8s-app": "calico-node"}
    container = {"image": "quay.io/calico/node:v3.31.0", "env": [{"name": "X", "value": "y"}]}
    return {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {"name": "calico-node"},
        "spec": {
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "initContainers": [{"name": "ebpf-bootstrap", **container}],
                    "containers": [{"name": "calico-node", **container}],
                },
            },
        },
    }


class RendererRun:
    """A renderer in-process, trusting `trusted`, patching calico-node in `namespace`; `bus`
    is the renderer's own NATS identity."""

    def __init__(self, bus: Bus, kube: KubeClient, namespace: str, cluster: str) -> None:
        self.bus, self.kube, self.namespace, self.cluster = bus, kube, namespace, cluster
        self.registry = CollectorRegistry()
        self.path = f"/apis/apps/v1/namespaces/{namespace}/daemonsets/calico-node"

    @contextlib.asynccontextmanager
    async def running(self, trusted: TrustedKeys) -> AsyncIterator[Renderer]:
        settings = RendererSettings(
            trusted_keys=trusted,
            common=CommonSettings(cluster=self.cluster),
            target_namespace=self.namespace,
            coalesce_during_rollout=False,
            # Literal env: each endpoint change is a DaemonSet patch, which these tests count.
            render_mode="literal",
            lease=LeaseSettings(
                enabled=False, name=subjects.renderer_lease(self.cluster), identity="renderer"
            ),
        )
        renderer = Renderer(bus=self.bus, kube=self.kube, settings=settings, registry=self.registry)
        stop = asyncio.Event()
        task = asyncio.create_task(renderer.run(stop))
        try:
            yield renderer
        finally:
            stop.set()
            await asyncio.wait_for(task, timeout=10)

    def metric(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0

    def refused(self) -> float:
        return sum(
            self.metric("apilane_renderer_snapshots_refused_total", reason=reason)
            for reason in REFUSAL_REASONS
        )

    async def endpoints(self) -> str:
        daemonset = await self.kube.get(self.path)
        init = daemonset["spec"]["template"]["spec"]["initContainers"][0]
        return next((e["value"] for e in init["env"] if e["name"] == APISERVER_ENDPOINTS), "")


async def wait_for_async(check: Callable[[], Any], *, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not met in time")


@pytest.fixture
async def calico(kube: KubeClient, own_service: str) -> str:
    await kube.create(f"/apis/apps/v1/namespaces/{own_service}/daemonsets", calico_node())
    return own_service


async def test_discovery_re_signs_before_expiry_and_the_renderer_does_not_patch_again(
    control_plane: ControlPlane,
    nats_server: NatsServer,
    bus: Bus,
    connect_as: ConnectAs,
    kube: KubeClient,
    calico: str,
) -> None:
    ns = calico
    await put_slice(kube, ns, endpoint_slice("a", service="apiserver", addresses=["192.0.2.1"]))
    settings = settings_for(control_plane, nats_server, ns, snapshot_ttl=2.0)
    registry = CollectorRegistry()
    renderer = RendererRun(
        await connect_as(Role.RENDERER, settings.cluster), kube, ns, settings.cluster
    )
    async with running(settings, registry), renderer.running(TRUSTED):
        await wait_for_async(lambda: _equals(renderer.endpoints(), "192.0.2.1:6443"))
        patched = await kube.get(renderer.path)
        # Three refreshes at about one second each: the first snapshot would have expired.
        await wait_until(
            lambda: (registry.get_sample_value("apilane_discovery_refreshes_total") or 0) >= 3,
            timeout=10,
        )
        await wait_until(lambda: renderer.metric("apilane_renderer_refreshes_total") >= 2)
        now = await kube.get(renderer.path)
    assert now["metadata"]["resourceVersion"] == patched["metadata"]["resourceVersion"]
    assert renderer.metric("apilane_renderer_patches_total") == 1
    assert renderer.refused() == 0
    kv = await bus.js.key_value(subjects.SNAPSHOT_BUCKET)
    history = [
        open_snapshot(entry.value, TRUSTED)
        for entry in await kv.history(subjects.snapshot_key(settings.cluster))
        if entry.value
    ]
    assert len(history) >= 4
    assert {s.header.generation for s in history} == {1}
    assert len({s.content_digest for s in history}) == 1
    expiries = [s.header.expires_at for s in history]
    assert expiries == sorted(expiries) and len(set(expiries)) == len(expiries)


async def _equals(value: Awaitable[str], wanted: str) -> bool:
    return await value == wanted


async def test_a_key_rotation_refuses_nothing_while_the_renderer_trusts_both_keys(
    control_plane: ControlPlane,
    nats_server: NatsServer,
    bus: Bus,
    connect_as: ConnectAs,
    kube: KubeClient,
    calico: str,
) -> None:
    ns = calico
    rotated = SigningKey.generate()
    await put_slice(kube, ns, endpoint_slice("a", service="apiserver", addresses=["192.0.2.1"]))
    old = settings_for(control_plane, nats_server, ns)
    new = settings_for(control_plane, nats_server, ns, cluster=old.cluster, signing_key=rotated)
    registry = CollectorRegistry()
    renderer = RendererRun(await connect_as(Role.RENDERER, old.cluster), kube, ns, old.cluster)
    async with renderer.running(TrustedKeys.of(DISCOVERY_KEY, rotated)):
        async with running(old):
            await wait_for_async(lambda: _equals(renderer.endpoints(), "192.0.2.1:6443"))
        # Discovery restarts with the new key: the bucket's value is not its own any more.
        async with running(new, registry):
            entry = None
            for _ in range(200):
                entry = await bus.kv_get(subjects.SNAPSHOT_BUCKET, old.cluster)
                if entry is not None and _verifies(entry.value, TrustedKeys.of(rotated)):
                    break
                await asyncio.sleep(0.05)
            assert entry is not None
            taken_over = open_snapshot(entry.value, TrustedKeys.of(rotated)).snapshot
            await wait_until(lambda: renderer.metric("apilane_renderer_noop_total") >= 1)
            await put_slice(
                kube, ns, endpoint_slice("a", service="apiserver", addresses=["192.0.2.2"])
            )
            await wait_for_async(lambda: _equals(renderer.endpoints(), "192.0.2.2:6443"))
    assert taken_over.generation > 1
    assert (
        registry.get_sample_value(
            "apilane_discovery_untrusted_entries_total", {"reason": "unknown-key"}
        )
        == 1
    )
    assert renderer.refused() == 0
    assert renderer.metric("apilane_renderer_patches_total") == 2


def _verifies(value: bytes, trusted: TrustedKeys) -> bool:
    try:
        open_snapshot(value, trusted)
    except (SignatureError, events.MalformedEvent):
        return False
    return True


async def test_a_forged_value_with_a_huge_generation_moves_nothing(
    control_plane: ControlPlane,
    nats_server: NatsServer,
    bus: Bus,
    connect_as: ConnectAs,
    kube: KubeClient,
    calico: str,
) -> None:
    """Written with the same rights discovery has, before it starts, claiming the very
    endpoints discovery will see and generation 2**62: the renderer refuses it, discovery
    replaces it with a generation just above its revision, and the renderer applies that."""
    ns = calico
    await put_slice(kube, ns, endpoint_slice("a", service="apiserver", addresses=["192.0.2.1"]))
    settings = settings_for(control_plane, nats_server, ns)
    registry = CollectorRegistry()
    renderer = RendererRun(
        await connect_as(Role.RENDERER, settings.cluster), kube, ns, settings.cluster
    )
    forged = make_snapshot(
        cluster=settings.cluster,
        generation=2**62,
        services=["10.96.0.1:443"],
        apiservers=["192.0.2.1:6443"],
    )
    async with renderer.running(TRUSTED):
        # Discovery's own identity: the signature, not the NATS account, tells them apart.
        intruder = await connect_as(Role.DISCOVERY, settings.cluster)
        forged_revision = await intruder.kv_put(
            subjects.SNAPSHOT_BUCKET, settings.cluster, seal(forged, key=SigningKey.generate())
        )
        await wait_until(
            lambda: (
                renderer.metric("apilane_renderer_snapshots_refused_total", reason="unknown-key")
                == 1
            )
        )
        async with running(settings, registry):
            published = await wait_snapshot(bus, settings.cluster, ips("192.0.2.1"))
            await wait_for_async(lambda: _equals(renderer.endpoints(), "192.0.2.1:6443"))
    assert published.generation == forged_revision + 1
    assert renderer.refused() == 1
    assert renderer.metric("apilane_renderer_patches_total") == 1


async def test_a_lone_change_goes_out_at_once_and_a_burst_gives_two_publishes_per_window(
    control_plane: ControlPlane,
    nats_server: NatsServer,
    bus: Bus,
    kube: KubeClient,
    own_service: str,
) -> None:
    """A 2 s window: a lone change after a quiet window is published well before it would
    have ended; a burst of changes is the leading publish and one trailing publish of the
    last state."""
    ns = own_service
    window = 2.0
    settings = dataclasses.replace(
        settings_for(control_plane, nats_server, ns), coalesce_window=window
    )
    await put_slice(kube, ns, endpoint_slice("a", service="apiserver", addresses=["192.0.2.1"]))
    registry = CollectorRegistry()

    def publishes() -> float:
        return registry.get_sample_value("apilane_discovery_publishes_total") or 0

    async with running(settings, registry):
        await wait_snapshot(bus, settings.cluster, ips("192.0.2.1"))
        await asyncio.sleep(window + 0.2)  # a quiet window
        began = time.monotonic()
        await put_slice(kube, ns, endpoint_slice("a", service="apiserver", addresses=["192.0.2.2"]))
        lone = await wait_snapshot(bus, settings.cluster, ips("192.0.2.2"))
        assert time.monotonic() - began < window, "the lone change waited for the window"
        await asyncio.sleep(window + 0.2)
        before_burst = publishes()
        burst = [f"192.0.2.{n}" for n in range(10, 16)]
        for address in burst:
            await put_slice(kube, ns, endpoint_slice("a", service="apiserver", addresses=[address]))
        last = await wait_snapshot(bus, settings.cluster, ips(burst[-1]), timeout=WAIT)
        await asyncio.sleep(window + 0.2)  # nothing else comes after the trailing publish
        burst_publishes = publishes() - before_burst
    history = await generations(bus, settings.cluster)
    assert 1 <= burst_publishes <= 2
    assert history[-1] == last.generation and lone.generation < last.generation
    assert len(history) == 2 + burst_publishes  # the first, the lone one, the burst's
    assert last.generation == lone.generation + burst_publishes


# -- anti-entropy: the leader keeps its snapshot in the key ------------------------------------


class LateNode:
    """A node-loader in-process on in-memory maps, trusting discovery's key."""

    def __init__(self, nats_server: NatsServer, cluster: str, node: str, tmp_path: Path) -> None:
        self.env = loader_env(
            nats_server.env(Role.NODE_LOADER, cluster, node),
            cluster=cluster,
            node=node,
            workdir=tmp_path / node,
            heartbeat="30s",  # the default
            APILANE_TRUSTED_KEYS=DISCOVERY_KEY.public_text,
        )
        self.maps = MemoryNatMaps()
        self.registry = CollectorRegistry()
        self.loader: NodeLoader | None = None

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[NodeLoader]:
        stopping = asyncio.Event()
        self.loader = NodeLoader(
            settings=loader_settings.load(self.env),
            data_plane=DataPlane(maps=self.maps),
            registry=self.registry,
        )
        task = asyncio.create_task(self.loader.run(stopping))
        try:
            yield self.loader
        finally:
            stopping.set()
            await asyncio.wait_for(task, timeout=10)

    @property
    def generation(self) -> int:
        return self.loader.reconciler.applied_generation if self.loader else 0

    def backends(self) -> list[str]:
        return render_resolved(contents_of(self.maps))

    def metric(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0


async def held_again(bus: Bus, cluster: str, generation: int, *, timeout: float = WAIT) -> float:
    """Seconds until the key holds discovery's snapshot of `generation` again."""
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        entry = await bus.kv_get(subjects.SNAPSHOT_BUCKET, subjects.snapshot_key(cluster))
        if _generation_of(entry) == generation:
            return time.monotonic() - began
        await asyncio.sleep(0.02)
    raise AssertionError(f"the key did not hold generation {generation} again in {timeout}s")


def _generation_of(entry: KvEntry | None) -> int | None:
    if entry is None or not _verifies(entry.value, TRUSTED):
        return None
    return open_snapshot(entry.value, TRUSTED).header.generation


async def generations_since(bus: Bus, cluster: str, revision: int) -> list[int | None]:
    """The generation of every KV entry after `revision` (None: not discovery's, or a marker)."""
    kv = await bus.js.key_value(subjects.SNAPSHOT_BUCKET)
    found: list[int | None] = []
    for entry in await kv.history(subjects.snapshot_key(cluster)):
        if entry.revision <= revision:
            continue
        ok = entry.value and _verifies(entry.value, TRUSTED)
        found.append(open_snapshot(entry.value, TRUSTED).header.generation if ok else None)
    return found


def reasserts(registry: CollectorRegistry, reason: str) -> float:
    return registry.get_sample_value("apilane_discovery_reasserts_total", {"reason": reason}) or 0.0


async def test_a_purged_key_is_put_back_at_once_with_the_same_generation_for_a_late_node(
    control_plane: ControlPlane,
    nats_server: NatsServer,
    bus: Bus,
    connect_as: ConnectAs,
    kube: KubeClient,
    own_service: str,
    tmp_path: Path,
) -> None:
    ns = own_service
    await put_slice(kube, ns, endpoint_slice("a", service="apiserver", addresses=["192.0.2.1"]))
    # No poll within the test: the purge is noticed by the subscription to the key.
    settings = dataclasses.replace(
        settings_for(control_plane, nats_server, ns), key_check_interval=60.0
    )
    registry = CollectorRegistry()
    early = LateNode(nats_server, settings.cluster, "early", tmp_path)
    late = LateNode(nats_server, settings.cluster, "late", tmp_path)
    async with running(settings, registry), early.running():
        published = await wait_snapshot(bus, settings.cluster, ips("192.0.2.1"))
        await wait_until(lambda: early.generation == published.generation)
        programmed = early.backends()
        # Discovery's own NATS identity may purge its key (only it may write there).
        intruder = await connect_as(Role.DISCOVERY, settings.cluster)
        kv = await intruder.js.key_value(subjects.SNAPSHOT_BUCKET)
        _, before = await read_snapshot(bus, settings.cluster)
        await kv.purge(subjects.snapshot_key(settings.cluster))
        assert await held_again(bus, settings.cluster, published.generation) < 2.0
        async with late.running():
            await wait_until(lambda: late.generation == published.generation)
            assert late.backends() == programmed
        await wait_until(lambda: early.metric("apilane_node_snapshot_refreshes_total") >= 1)
    assert reasserts(registry, "purged") == 1
    # The purge marker, then the same generation again, nothing newer.
    assert await generations_since(bus, settings.cluster, before) == [None, published.generation]
    assert early.metric("apilane_node_applies_total", outcome="applied") == 1
    assert early.metric("apilane_node_snapshots_refused_total", reason="rollback") == 0
    assert (registry.get_sample_value("apilane_discovery_publishes_total") or 0) == 1


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        pytest.param(lambda s: seal(s, key=SigningKey.generate()), "unknown-key", id="other-key"),
        pytest.param(lambda s: b"garbage", "unsigned", id="garbage"),
    ],
)
async def test_a_tampered_key_is_put_back_at_once_with_the_same_generation(
    control_plane: ControlPlane,
    nats_server: NatsServer,
    bus: Bus,
    connect_as: ConnectAs,
    kube: KubeClient,
    own_service: str,
    tmp_path: Path,
    value: Callable[[EndpointSnapshot], bytes],
    reason: str,
) -> None:
    ns = own_service
    await put_slice(kube, ns, endpoint_slice("a", service="apiserver", addresses=["192.0.2.1"]))
    settings = settings_for(control_plane, nats_server, ns)
    registry = CollectorRegistry()
    node = LateNode(nats_server, settings.cluster, "node", tmp_path)
    async with running(settings, registry), node.running():
        published = await wait_snapshot(bus, settings.cluster, ips("192.0.2.1"))
        await wait_until(lambda: node.generation == published.generation)
        programmed = node.backends()
        intruder = await connect_as(Role.DISCOVERY, settings.cluster)
        # The very endpoints discovery sees, a generation far ahead: it still is not its own.
        forged = make_snapshot(
            cluster=settings.cluster,
            generation=published.generation + 1000,
            services=[f"{e.ip}:{e.port}" for e in published.service_endpoints],
            apiservers=["203.0.113.9:6443"],
        )
        tampered = await intruder.kv_put(subjects.SNAPSHOT_BUCKET, settings.cluster, value(forged))
        assert await held_again(bus, settings.cluster, published.generation) < 2.0
        await wait_until(lambda: node.metric("apilane_node_snapshot_refreshes_total") >= 1)
        assert node.backends() == programmed
    assert reasserts(registry, reason) == 1
    assert await generations_since(bus, settings.cluster, tampered) == [published.generation]
    assert node.generation == published.generation
    assert node.metric("apilane_node_applies_total", outcome="applied") == 1
    assert (registry.get_sample_value("apilane_discovery_publishes_total") or 0) == 1


async def test_a_writer_flipping_the_key_gets_a_bounded_number_of_reassertions(
    control_plane: ControlPlane,
    nats_server: NatsServer,
    bus: Bus,
    connect_as: ConnectAs,
    kube: KubeClient,
    own_service: str,
) -> None:
    """Garbage every 20 ms for 3 s: discovery puts its snapshot back at once, then after
    0.5 s, 1 s, 2 s (the maximum here) — a handful of writes, not one per flip — and holds
    the key again within the maximum once the writer stops."""
    ns = own_service
    await put_slice(kube, ns, endpoint_slice("a", service="apiserver", addresses=["192.0.2.1"]))
    settings = dataclasses.replace(
        settings_for(control_plane, nats_server, ns),
        reassert_interval=0.5,
        reassert_interval_max=2.0,
    )
    registry = CollectorRegistry()
    async with running(settings, registry):
        published = await wait_snapshot(bus, settings.cluster, ips("192.0.2.1"))
        intruder = await connect_as(Role.DISCOVERY, settings.cluster)
        _, before = await read_snapshot(bus, settings.cluster)
        flips, began = 0, time.monotonic()
        while time.monotonic() - began < 3.0:
            await intruder.kv_put(subjects.SNAPSHOT_BUCKET, settings.cluster, b"garbage")
            flips += 1
            await asyncio.sleep(0.02)
        flipped_for = time.monotonic() - began
        during = reasserts(registry, "unsigned")
        healed_in = await held_again(bus, settings.cluster, published.generation, timeout=10)
    assert flips >= 20
    # At 0, 0.5, 1.5 and 3.5 s: three or four in three seconds, whatever the number of flips.
    assert flipped_for < 4.0
    assert 1 <= during <= 5
    assert healed_in <= 2.0 + 2.0
    history = await generations_since(bus, settings.cluster, before)
    assert {g for g in history if g is not None} == {published.generation}
    assert (registry.get_sample_value("apilane_discovery_publishes_total") or 0) == 1


async def test_without_its_subscription_the_guard_still_checks_the_key_every_interval(
    nats_server: NatsServer, bus: Bus, connect_as: ConnectAs
) -> None:
    """The guard reads as an identity the server refuses the key's subject to (the
    operator's): it says so and falls back to reading the key every interval."""
    cluster = f"c-{secrets.token_hex(4)}"
    writer = await connect_as(Role.DISCOVERY, cluster)
    reader = await connect_as(Role.OPERATOR, cluster)
    registry = CollectorRegistry()
    publisher = Publisher(
        cluster=cluster,
        bus=writer,
        metrics=DiscoveryMetrics(registry),
        sealer=Sealer(DISCOVERY_KEY, timedelta(hours=1)),
    )
    publisher.offer(one_endpoint_view("192.0.2.1"))
    assert await publisher.flush() is Outcome.PUBLISHED
    guard = KeyGuard(
        cluster=cluster,
        bus=reader,
        keeper=publisher,
        open_=publisher.sealer.open,
        pace=ReassertPace(),
        check_interval=0.3,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(guard.run(stop))
    try:
        await wait_until(lambda: bool(reader.permission_violations))
        kv = await writer.js.key_value(subjects.SNAPSHOT_BUCKET)
        await kv.delete(cluster)
        assert await held_again(bus, cluster, 1) < 2.0
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
    assert reasserts(registry, "deleted") == 1
    assert await generations(bus, cluster) == [1, 1]


def one_endpoint_view(address: str) -> SnapshotResult:
    return build_snapshot(
        service={
            "metadata": {"name": "kubernetes"},
            "spec": {
                "clusterIPs": ["10.96.0.1"],
                "ports": [{"name": "https", "port": 443, "targetPort": 6443}],
            },
        },
        endpoint_slices=[
            {
                "metadata": {"name": "kubernetes", "namespace": "default"},
                "addressType": "IPv4",
                "endpoints": [{"addresses": [address]}],
                "ports": [{"name": "https", "port": 6443}],
            }
        ],
        kube_proxy=None,
        nodes=[],
    )
