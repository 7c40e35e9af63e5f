"""discovery's I/O wiring: watches → pure snapshot → publisher, under a leader Lease.

`run(settings, stop)` is the whole service; `__main__` runs it under `apilane.runtime.serve`
and tests run it in-process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, Final

from opentelemetry import trace
from prometheus_client import CollectorRegistry

from apilane.kube import recorder
from apilane.kube.client import KubeClient
from apilane.kube.leader import LeaderElector
from apilane.kube.watch import WatchEvent
from apilane.model.endpoints import (
    TRIGGER_TIME_ANNOTATION,
    SnapshotInputs,
    build_snapshot,
    parse_trigger_time,
)
from apilane.model.events import Finding
from apilane.runtime.bus import Bus, BusError
from apilane.runtime.serve import Health

from .metrics import DiscoveryMetrics
from .publisher import ObservedChange, Publisher
from .settings import SERVICE_NAME, DiscoverySettings
from .watcher import ClusterWatcher, WatchTarget, targets_for

log = logging.getLogger(__name__)
tracer = trace.get_tracer("apilane.discovery")

COMPONENT: Final = "apilane-discovery"
_API_VERSIONS: Final = {
    "Service": "v1",
    "EndpointSlice": "discovery.k8s.io/v1",
    "DaemonSet": "apps/v1",
    "Node": "v1",
}


class DiscoveryService:
    """The running pieces, kept together so tests and probes can look at them."""

    def __init__(
        self,
        settings: DiscoverySettings,
        *,
        client: KubeClient,
        bus: Bus,
        metrics: DiscoveryMetrics,
    ) -> None:
        self.settings = settings
        self.client = client
        self.bus = bus
        self.inputs = SnapshotInputs(
            service_namespace=settings.service_namespace,
            service_name=settings.service_name,
            kube_proxy_namespace=settings.kube_proxy_namespace,
            kube_proxy_name=settings.kube_proxy_name,
        )
        self.elector: LeaderElector | None = None
        if settings.leader_election:
            self.elector = LeaderElector(
                client,
                namespace=settings.lease_namespace,
                name=settings.lease_name,
                identity=settings.identity,
                lease_duration=settings.lease_duration,
                renew_interval=settings.lease_renew_interval,
                retry_interval=settings.lease_retry_interval,
                on_change=self._leadership_changed,
            )
        self.watcher = ClusterWatcher(
            client,
            targets_for(settings),
            on_change=self._observed,
            backoff_max=settings.watch_backoff_max,
        )
        self.publisher = Publisher(
            cluster=settings.cluster,
            bus=bus,
            metrics=metrics,
            recorder=_KubeEventRecorder(client, self.watcher),
            coalesce_window=settings.coalesce_window,
            is_leader=self.is_leader,
            retry_max=settings.publish_retry_max,
        )

    def is_leader(self) -> bool:
        return self.elector is None or self.elector.is_leader

    @property
    def ready(self) -> bool:
        return self.watcher.synced and self.bus.connected

    def _leadership_changed(self, leading: bool) -> None:
        if leading:
            self.publisher.wake()  # continue the generations from the bucket

    def _observed(self, target: WatchTarget, event: WatchEvent) -> None:
        """A watch changed the view: recompute the snapshot and hand it to the publisher."""
        if not self.watcher.synced:
            return  # nothing is published before every initial list has completed
        observed_at = time.time()
        if event.object is not None:
            metadata = event.object.get("metadata") or {}
            namespace = metadata.get("namespace")
            name = metadata.get("name") or "?"
            object_ref = (
                f"{target.kind}/{namespace}/{name}" if namespace else f"{target.kind}/{name}"
            )
            resource_version = str(metadata.get("resourceVersion") or event.resource_version)
        else:
            object_ref = f"{target.kind}List"
            resource_version = event.resource_version
        trigger_time = None
        if target.kind == "EndpointSlice" and event.type != "DELETED" and event.object is not None:
            annotations = (event.object.get("metadata") or {}).get("annotations") or {}
            trigger_time = parse_trigger_time(annotations.get(TRIGGER_TIME_ANNOTATION))

        with tracer.start_as_current_span(
            "discovery observe",
            context=trace.set_span_in_context(
                trace.INVALID_SPAN
            ),  # a root: a change starts a trace
            attributes={
                "apilane.cluster": self.settings.cluster,
                "apilane.event": event.type,
                "apilane.object": object_ref,
                "apilane.resource_versions": [f"{object_ref}@{resource_version}"],
                "apilane.base_generation": self.publisher.last_generation,
            },
        ) as span:
            result = build_snapshot(
                service=self._service(),
                endpoint_slices=self.watcher.objects("EndpointSlice"),
                kube_proxy=self.watcher.get(
                    "DaemonSet", self.settings.kube_proxy_namespace, self.settings.kube_proxy_name
                ),
                nodes=self.watcher.objects("Node"),
                inputs=self.inputs,
            )
            span.set_attribute("apilane.digest", result.digest)
            span.set_attribute("apilane.endpoints", len(result.apiserver_endpoints))
            if trigger_time is not None:
                span.set_attribute("apilane.trigger_time", trigger_time.isoformat())
            change = ObservedChange(
                object_ref=object_ref,
                resource_version=resource_version,
                observed_at=observed_at,
                trigger_time=trigger_time,
                span_context=span.get_span_context(),
            )
        self.publisher.offer(result, change)

    def _service(self) -> dict[str, Any] | None:
        return self.watcher.get(
            "Service", self.settings.service_namespace, self.settings.service_name
        )


class _KubeEventRecorder:
    """Findings as Kubernetes Events on the object they concern (a reference when it is gone)."""

    def __init__(self, client: KubeClient, watcher: ClusterWatcher) -> None:
        self.client = client
        self.watcher = watcher

    async def record(self, finding: Finding) -> None:
        kind, _, rest = finding.object_ref.partition("/")
        namespace, _, name = rest.rpartition("/")
        if kind not in _API_VERSIONS or not name:
            return  # nothing to attach it to; the bus warning carries it
        involved = self.watcher.get(kind, namespace, name) or {
            "metadata": {"name": name, **({"namespace": namespace} if namespace else {})}
        }
        recorded = await recorder.record_event(
            self.client,
            involved=involved,
            reason=finding.reason,
            message=finding.message,
            type_="Warning",
            component=COMPONENT,
            api_version=_API_VERSIONS[kind],
            kind=kind,
        )
        if recorded is None:
            raise RuntimeError(f"Event {finding.reason} on {finding.object_ref} not recorded")


async def run(
    settings: DiscoverySettings,
    stop: asyncio.Event,
    *,
    registry: CollectorRegistry | None = None,
    health: Health | None = None,
    started: asyncio.Future[DiscoveryService] | None = None,  # used in tests to look inside
) -> None:
    """Run discovery until `stop` is set; then release the Lease and close connections."""
    metrics = DiscoveryMetrics(registry if registry is not None else CollectorRegistry())
    log.info(
        "discovery starting", extra={"cluster": settings.cluster, "identity": settings.identity}
    )
    client = await KubeClient.from_config(settings.common.kubeconfig or None)
    bus: Bus | None = None
    service: DiscoveryService | None = None
    if health is not None:
        # Before connecting: the probes are served from the start, and while NATS is not
        # there yet (nothing watched either) they must say "not ready", not "no checks".
        health.add_ready("watches-listed", lambda: service is not None and service.watcher.synced)
        health.add_ready("nats-connected", lambda: bus is not None and bus.connected)
    try:
        bus = await _until_stopped(_connect_bus(settings), stop)
        if bus is None:
            return
        service = DiscoveryService(settings, client=client, bus=bus, metrics=metrics)
        if started is not None and not started.done():
            started.set_result(service)
        await _serve(service, stop, health)
    finally:
        if bus is not None:
            await bus.drain()
        await client.close()
        log.info(
            "discovery stopped", extra={"cluster": settings.cluster, "identity": settings.identity}
        )


async def _serve(service: DiscoveryService, stop: asyncio.Event, health: Health | None) -> None:
    publisher_stop = asyncio.Event()
    watch_task = asyncio.create_task(service.watcher.run(), name="discovery-watches")
    publish_task = asyncio.create_task(
        service.publisher.run(publisher_stop), name="discovery-publisher"
    )
    elector_task = (
        asyncio.create_task(service.elector.run(stop), name="discovery-leader")
        if service.elector is not None
        else None
    )
    tasks = [t for t in (watch_task, publish_task, elector_task) if t is not None]
    if health is not None:
        health.add_live("tasks-running", lambda: not any(t.done() for t in tasks))
    try:
        await stop.wait()
    finally:
        # Stop publishing first, then give the Lease up, so the next leader takes over from
        # a bucket nobody writes to any more.
        publisher_stop.set()
        watch_task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(publish_task, timeout=5)
        if elector_task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(elector_task, timeout=5)
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await watch_task


async def _connect_bus(settings: DiscoverySettings) -> Bus:
    bus = await Bus.connect(
        settings.common.nats_urls,
        name=f"{COMPONENT}-{settings.identity}",
        auth=settings.common.nats_auth,
    )
    delay = 0.2
    while True:
        try:
            await bus.ensure_streams()
            return bus
        except (BusError, Exception) as exc:  # nats-py raises its own types here too
            log.warning("cannot create the streams yet, retrying", extra={"error": str(exc)})
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


async def _until_stopped(work: Any, stop: asyncio.Event) -> Any:
    """Await `work` unless `stop` comes first (then cancel it and return None)."""
    task = asyncio.ensure_future(work)
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait([task, stopper], return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    return None


__all__ = ["SERVICE_NAME", "DiscoveryService", "run"]
