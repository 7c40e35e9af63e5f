"""discovery against a real kube-apiserver + etcd and a real nats-server, run in-process.

Most tests watch a Service of their own in a fresh namespace (discovery's Service, kube-proxy
and Lease names are settings), so they never disturb each other; the HA test uses the real
default/kubernetes Service, whose EndpointSlices the fixture empties before and after.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from apilane.discovery import service
from apilane.discovery.settings import DiscoverySettings
from apilane.shared import events, subjects
from apilane.shared.bus import Bus
from apilane.shared.config import CommonSettings
from apilane.shared.events import ClusterWarning, EndpointSnapshot, WarningReason
from apilane.shared.kube import KubeClient, NotFound
from apilane.shared.testing.kube import ControlPlane, endpoint_slice
from apilane.shared.testing.nats import NatsServer
from apilane.shared.watching import WATCH_RESTARTS

pytestmark = [pytest.mark.integration, pytest.mark.kube, pytest.mark.nats]

SLICES = "/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices"
WAIT = 15.0


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
) -> DiscoverySettings:
    return DiscoverySettings(
        common=CommonSettings(
            cluster=cluster or f"c-{secrets.token_hex(4)}",
            nats_urls=(nats_server.url,),
            kubeconfig=str(control_plane.kubeconfig_path),
        ),
        service_namespace=service_namespace or namespace,
        service_name=service_name,
        kube_proxy_namespace=namespace,
        kube_proxy_name="kube-proxy",
        lease_namespace=namespace,
        identity=identity,
        coalesce_window=0.05,
        lease_duration=3.0,
        lease_renew_interval=0.5,
        lease_retry_interval=0.2,
        publish_retry_max=0.5,
        watch_backoff_max=1.0,
    )


@contextlib.asynccontextmanager
async def running(
    settings: DiscoverySettings, registry: CollectorRegistry | None = None
) -> AsyncIterator[service.DiscoveryService]:
    stop = asyncio.Event()
    started: asyncio.Future[service.DiscoveryService] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(service.run(settings, stop, registry=registry, started=started))
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
    return events.decode_snapshot(entry.value), entry.revision


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
    return [events.decode_snapshot(entry.value).generation for entry in history if entry.value]


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
    settings = settings_for(control_plane, nats_server, ns)
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
        await asyncio.sleep(0.5)
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
    assert snapshot is not None and snapshot.generation == 1  # warnings, never new generations
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
