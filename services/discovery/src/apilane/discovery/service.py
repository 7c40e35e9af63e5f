"""discovery's I/O wiring: watches → pure snapshot → publisher, under a leader Lease.

`main(ctx, settings)` is the whole service; `__main__` runs it through
`apilane.runtime.lifecycle.command_line` and tests run it in-process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Final

from opentelemetry import trace

from apilane.kube import recorder
from apilane.kube.client import KubeClient
from apilane.kube.leader import elector_for, lead
from apilane.kube.watch import WatchEvent
from apilane.model.endpoints import (
    TRIGGER_TIME_ANNOTATION,
    SnapshotInputs,
    SnapshotResult,
    build_snapshot,
    parse_trigger_time,
)
from apilane.model.events import Finding
from apilane.model.objects import as_dict, as_str
from apilane.runtime.bus import Bus
from apilane.runtime.lifecycle import bus_session
from apilane.runtime.natsauth import Role
from apilane.runtime.serve import Health, ServiceContext

from .antientropy import KeyGuard, ReassertPace
from .metrics import DiscoveryMetrics
from .publisher import ObservedChange, Publisher
from .sealing import Sealer
from .settings import SERVICE_NAME, DiscoverySettings
from .watcher import ClusterWatcher, WatchTarget, targets_for

log = logging.getLogger(__name__)
tracer = trace.get_tracer("apilane.discovery")

COMPONENT: Final = "apilane-discovery"


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
        self.elector = elector_for(client, settings.lease)
        self.watcher = ClusterWatcher(
            client,
            targets_for(settings),
            on_change=self._observed,
            backoff_max=settings.watch_backoff_max,
        )
        sealer = Sealer(settings.signing_key, timedelta(seconds=settings.snapshot_ttl))
        self.publisher = Publisher(
            cluster=settings.cluster,
            bus=bus,
            metrics=metrics,
            sealer=sealer,
            recorder=_KubeEventRecorder(client, self.watcher),
            coalesce_window=settings.coalesce_window,
            is_leader=self.is_leader,
            retry_max=settings.publish_retry_max,
        )
        self.guard = KeyGuard(
            cluster=settings.cluster,
            bus=bus,
            keeper=self.publisher,
            open_=sealer.open,
            pace=ReassertPace(
                initial=settings.reassert_interval, maximum=settings.reassert_interval_max
            ),
            check_interval=settings.key_check_interval,
        )

    def is_leader(self) -> bool:
        return self.elector is None or self.elector.is_leader

    @property
    def ready(self) -> bool:
        return self.watcher.synced and self.bus.connected

    async def serve(self, stop: asyncio.Event, health: Health) -> None:
        """Watch always; publish while leading; until `stop`, then give the Lease up.

        The watches run outside `lead`, for every replica: a follower keeps its caches
        listed and current, so a takeover only has to reconcile the latest view with the
        bucket (one KV read and, if needed, one write) instead of listing every Service,
        EndpointSlice, DaemonSet and Node first, which takes seconds in a large cluster
        while nobody publishes. Only the publisher is the leader's work, one run per term.
        """
        watch_task = asyncio.create_task(self.watcher.run(), name="discovery-watches")
        lead_task = asyncio.create_task(
            lead(self.elector, self._publish_while_leading, stop), name="discovery-lead"
        )
        health.add_live("tasks-running", lambda: not (watch_task.done() or lead_task.done()))
        try:
            await stop.wait()
        finally:
            # `lead` ends the term (the publisher stops) before it releases the Lease. A
            # write still in flight when the next leader starts is harmless: both write
            # with compare-and-set on the KV revision, so one of them re-reads.
            watch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(lead_task, timeout=10)
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await watch_task

    async def _publish_while_leading(self, term_over: asyncio.Event) -> None:
        self.publisher.wake()  # continue the generations from the bucket
        # The guard keeps what the publisher asserts in the key between publishes.
        await asyncio.gather(self.publisher.run(term_over), self.guard.run(term_over))

    def _observed(self, target: WatchTarget, event: WatchEvent) -> None:
        """A watch changed the view: recompute the snapshot and hand it to the publisher."""
        if not self.watcher.synced:
            return  # nothing is published before every initial list has completed
        observed_at = time.time()
        object_ref, resource_version = _versioned_ref(target, event)
        trigger_time = _trigger_time(target, event)
        root = trace.set_span_in_context(trace.INVALID_SPAN)  # a change starts a trace
        with tracer.start_as_current_span(
            "discovery observe",
            context=root,
            attributes={
                "apilane.cluster": self.settings.cluster,
                "apilane.event": event.type,
                "apilane.object": object_ref,
                "apilane.resource_versions": [f"{object_ref}@{resource_version}"],
                "apilane.base_generation": self.publisher.last_generation,
            },
        ) as span:
            result = self._view()
            # The API servers it sees are the client's fallbacks when its own server fails.
            self.client.use_endpoints((e.ip, e.port) for e in result.apiserver_endpoints)
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

    def _view(self) -> SnapshotResult:
        """The snapshot of what the watches hold now."""
        return build_snapshot(
            service=self.watcher.get(
                "Service", self.settings.service_namespace, self.settings.service_name
            ),
            endpoint_slices=self.watcher.objects("EndpointSlice"),
            kube_proxy=self.watcher.get(
                "DaemonSet", self.settings.kube_proxy_namespace, self.settings.kube_proxy_name
            ),
            nodes=self.watcher.objects("Node"),
            inputs=self.inputs,
        )


def _versioned_ref(target: WatchTarget, event: WatchEvent) -> tuple[str, str]:
    """("EndpointSlice/default/kubernetes-abc", its resourceVersion) of what the event is about."""
    if event.object is None:
        return f"{target.kind}List", event.resource_version
    metadata = as_dict(event.object.get("metadata"))
    namespace = as_str(metadata.get("namespace"))
    name = as_str(metadata.get("name")) or "?"
    object_ref = f"{target.kind}/{namespace}/{name}" if namespace else f"{target.kind}/{name}"
    return object_ref, str(metadata.get("resourceVersion") or event.resource_version)


def _trigger_time(target: WatchTarget, event: WatchEvent) -> datetime | None:
    """An EndpointSlice change's last-change-trigger-time, when it has one."""
    if target.kind != "EndpointSlice" or event.type == "DELETED" or event.object is None:
        return None
    annotations = as_dict(as_dict(event.object.get("metadata")).get("annotations"))
    return parse_trigger_time(annotations.get(TRIGGER_TIME_ANNOTATION))


class _KubeEventRecorder:
    """Findings as Kubernetes Events on the object they concern (a reference when it is gone)."""

    def __init__(self, client: KubeClient, watcher: ClusterWatcher) -> None:
        self.client = client
        self.watcher = watcher

    async def record(self, finding: Finding) -> None:
        kind, _, rest = finding.object_ref.partition("/")
        namespace, _, name = rest.rpartition("/")
        target = self.watcher.targets.get(kind)
        if target is None or not name:
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
            api_version=target.api_version,
            kind=kind,
        )
        if recorded is None:
            raise RuntimeError(f"Event {finding.reason} on {finding.object_ref} not recorded")


Started = Callable[[DiscoveryService], None]


async def main(
    ctx: ServiceContext, settings: DiscoverySettings, *, started: Started | None = None
) -> None:
    """The service body for `apilane.runtime.lifecycle.command_line`: run discovery until
    `ctx.stopping` is set; then release the Lease and close connections.

    `started(service)` is a test hook, called once the running pieces exist so that an
    in-process test can look inside them; production passes None."""
    context = {"cluster": settings.cluster, "identity": settings.identity}
    log.info("discovery starting", extra=context)
    service: DiscoveryService | None = None
    # Before connecting: probes are served from the start, and while NATS is not there yet
    # (nothing watched either) they must say "not ready", not "no checks".
    ctx.health.add_ready("watches-listed", lambda: service is not None and service.watcher.synced)
    client = await KubeClient.from_config(settings.common.kubeconfig or None)
    try:
        client_name = f"{COMPONENT}-{settings.identity}"

        # Discovery is the provisioner: its identity alone may create the streams.
        async def provision(bus: Bus) -> None:
            await bus.create_streams(replicas=settings.stream_replicas)

        async with bus_session(
            ctx, settings.common, role=Role.DISCOVERY, client_name=client_name, setup=provision
        ) as bus:
            if bus is None:
                return  # stopped before NATS was there
            metrics = DiscoveryMetrics(ctx.registry)
            service = DiscoveryService(settings, client=client, bus=bus, metrics=metrics)
            if started is not None:
                started(service)
            await service.serve(ctx.stopping, ctx.health)
    finally:
        await client.close()
        log.info("discovery stopped", extra=context)


__all__ = ["SERVICE_NAME", "DiscoveryService", "main"]
