"""The renderer service: snapshots from the KV bucket in, DaemonSet patches and render results out.

Flow, while this replica leads:

1. Read the DaemonSet once to recover the last applied snapshot generation (annotation).
2. Render the latest snapshot in the KV bucket, before anything else.
3. Then follow the bucket (`Bus.watch_kv`) and the DaemonSet (a list-then-watch): every new
   snapshot is rendered and applied in order, one at a time; a DaemonSet event only matters
   when a snapshot is pending (the DaemonSet did not exist, or our rollout was running).

Every snapshot gets a RenderResult on `subjects.renders_subject(cluster)`: applied,
unchanged, dry-run, waiting (held: DaemonSet missing or coalescing), failed (with the
reason) or ignored (at or below the last applied generation). A held snapshot gets a
second result when it is finally applied; when a newer snapshot arrives first, the newer one
takes its place (that is the coalescing) and the held one's `waiting` stays its last word.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Literal

from opentelemetry import trace
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from apilane.kube.client import KubeClient, KubeError
from apilane.kube.leader import LeaderElector
from apilane.kube.recorder import record_event
from apilane.kube.watch import list_then_watch
from apilane.model import events, subjects
from apilane.model.events import EndpointSnapshot, RenderOutcome, RenderResult, WarningReason
from apilane.renderer import render as rendering
from apilane.renderer.applier import Applier, ApplyReport, applied_generation
from apilane.renderer.settings import SERVICE_NAME, RendererSettings
from apilane.runtime import config, tracing
from apilane.runtime.bus import Bus, BusError, KvEntry
from apilane.runtime.serve import ServiceContext

log = logging.getLogger(__name__)

SOURCE: Final = "renderer"
# How long to wait before trying a held snapshot again when nothing else wakes us (the
# API server was unavailable, or the DaemonSet watch is not delivering).
RETRY_DELAY_INITIAL: Final = 1.0
RETRY_DELAY_MAX: Final = 30.0
WAITING_BACKSTOP: Final = 30.0


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.renders = Counter(
            "apilane_renderer_renders_total",
            "Render results published, by outcome.",
            ["outcome"],
            registry=registry,
        )
        self.patches = Counter(
            "apilane_renderer_patches_total",
            "DaemonSet patches accepted by the API server (dry runs excluded).",
            registry=registry,
        )
        self.noop = Counter(
            "apilane_renderer_noop_total",
            "Snapshots that needed no patch: the live DaemonSet already held their env.",
            registry=registry,
        )
        self.failures = Counter(
            "apilane_renderer_failures_total",
            "Snapshots that could not be rendered or applied, and malformed bus messages.",
            ["stage"],
            registry=registry,
        )
        self.latency = Histogram(
            "apilane_renderer_snapshot_to_patch_seconds",
            "From a snapshot's observed_at to the accepted patch.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=registry,
        )
        self.applied_generation = Gauge(
            "apilane_renderer_applied_generation",
            "The snapshot generation the DaemonSet holds, as far as this replica knows.",
            registry=registry,
        )
        for outcome in ("applied", "unchanged", "dry-run", "failed", "ignored", "waiting"):
            self.renders.labels(outcome)
        for stage in ("decode", "render", "apply", "publish"):
            self.failures.labels(stage)


@dataclass
class _Held:
    """A snapshot that could not be applied yet, and will be when something changes."""

    snapshot: EndpointSnapshot
    desired: rendering.DesiredEnv
    since: float
    retry_at: float | None = None  # monotonic time of the next timed attempt, if any
    retry_delay: float = RETRY_DELAY_INITIAL
    outcome: str = ""  # the last outcome published for it


class Renderer:
    """The leader's work loop. `run(stop)` returns when `stop` is set; safe to run again."""

    def __init__(
        self,
        *,
        bus: Bus,
        kube: KubeClient,
        settings: RendererSettings,
        registry: CollectorRegistry | None = None,
        _before_patch: Callable[[int], Awaitable[None]] | None = None,  # used in tests
    ) -> None:
        self.bus = bus
        self.kube = kube
        self.settings = settings
        self.options = settings.render_options()
        self.applier = Applier(kube, settings, _before_patch=_before_patch)
        self.metrics = Metrics(registry or CollectorRegistry())
        self.tracer = tracing.tracer("apilane.renderer")
        self.last_applied_generation = 0
        self.held: _Held | None = None
        self.running = False  # readiness: the loop is following the bucket
        self._queue: asyncio.Queue[KvEntry | None] = asyncio.Queue()
        self._last_revision = 0
        self._wake_queued = False
        self._background: set[asyncio.Task[Any]] = set()

    # -- the loop -------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        self._queue = asyncio.Queue()
        self._wake_queued = False
        tasks: list[asyncio.Task[None]] = []
        try:
            await self._recover()
            latest = await self._kv_get_latest(stop)
            if latest is not None:
                await self.handle_entry(latest)
            tasks = [
                asyncio.create_task(self._follow_bucket(stop), name="renderer-follow-bucket"),
                asyncio.create_task(self._follow_daemonset(), name="renderer-follow-daemonset"),
            ]
            self.running = True
            await self._process(stop)
        finally:
            self.running = False
            if self._background:  # Kubernetes Events still being written: give them a moment
                await asyncio.wait(self._background, timeout=2.0)
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    async def _recover(self) -> None:
        """The last applied generation, from the DaemonSet's annotation (0 if absent)."""
        try:
            live = await self.applier.get_daemonset()
        except KubeError as exc:
            log.warning(
                "cannot read the DaemonSet at start; nothing recovered", extra={"error": str(exc)}
            )
            return
        if live is not None:
            recovered = applied_generation(live)
            if recovered > self.last_applied_generation:
                self.last_applied_generation = recovered
                self.metrics.applied_generation.set(recovered)
                log.info("recovered the last applied generation", extra={"generation": recovered})

    async def _kv_get_latest(self, stop: asyncio.Event) -> KvEntry | None:
        key = subjects.snapshot_key(self.settings.cluster)
        delay = 0.2
        while not stop.is_set():
            try:
                return await self.bus.kv_get(subjects.SNAPSHOT_BUCKET, key)
            except BusError as exc:
                log.warning("cannot read the latest snapshot yet", extra={"error": str(exc)})
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=delay)
                delay = min(delay * 2, 5.0)
        return None

    async def _follow_bucket(self, stop: asyncio.Event) -> None:
        key = subjects.snapshot_key(self.settings.cluster)
        async for entry in self.bus.watch_kv(subjects.SNAPSHOT_BUCKET, key, _stop=stop):
            self._queue.put_nowait(entry)

    async def _follow_daemonset(self) -> None:
        """Wake the loop when the DaemonSet changes while a snapshot is held."""
        path = f"/apis/apps/v1/namespaces/{self.settings.target_namespace}/daemonsets"
        selector = f"metadata.name={self.settings.target_daemonset}"
        while True:
            try:
                async for event in list_then_watch(self.kube, path, field_selector=selector):
                    if event.type == "DELETED":
                        continue
                    if self.held is not None and (event.type != "LISTED" or event.objects):
                        self._wake()
            except KubeError as exc:
                # The timed backstop in `_process` keeps held snapshots moving meanwhile.
                log.warning("cannot watch the DaemonSet, retrying", extra={"error": str(exc)})
                await asyncio.sleep(RETRY_DELAY_MAX)

    async def _process(self, stop: asyncio.Event) -> None:
        stop_wait = asyncio.create_task(stop.wait())
        try:
            while not stop.is_set():
                get = asyncio.create_task(self._queue.get())
                timeout = self._next_timed_attempt()
                done, _ = await asyncio.wait(
                    {get, stop_wait}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
                if get not in done:
                    get.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await get
                    if stop.is_set():
                        return
                    await self.retry_held()
                    continue
                item = get.result()
                if item is None:
                    self._wake_queued = False
                    await self.retry_held()
                else:
                    await self.handle_entry(item)
        finally:
            stop_wait.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await stop_wait

    def _wake(self) -> None:
        """Queue one "the DaemonSet changed, try the held snapshot again" (None); a burst of
        DaemonSet events while one is queued needs no second attempt."""
        if not self._wake_queued:
            self._wake_queued = True
            self._queue.put_nowait(None)

    def _next_timed_attempt(self) -> float | None:
        if self.held is None:
            return None
        deadlines = []
        if self.held.retry_at is not None:
            deadlines.append(self.held.retry_at)
        if self.settings.coalesce_during_rollout:
            deadlines.append(self.held.since + self.settings.coalesce_max_wait)
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - time.monotonic())

    # -- one snapshot ---------------------------------------------------------------------

    async def handle_entry(self, entry: KvEntry) -> None:
        """Decode, render, apply and report one KV entry. Never raises on bad input."""
        if entry.revision <= self._last_revision:
            return  # already seen (the watch starts with the value kv_get returned)
        self._last_revision = entry.revision
        if entry.operation != "PUT":
            log.info(
                "snapshot deleted from the bucket; nothing to render",
                extra={"revision": entry.revision},
            )
            return
        try:
            snapshot = events.decode_snapshot(entry.value)
        except events.MalformedEvent as exc:
            self.metrics.failures.labels("decode").inc()
            log.warning(
                "malformed snapshot on the bus, skipped",
                extra={"revision": entry.revision, "error": str(exc)},
            )
            await self._warn(
                WarningReason.INVALID_SNAPSHOT,
                f"malformed snapshot at revision {entry.revision}: {exc}",
            )
            return
        if snapshot.cluster != self.settings.cluster:
            log.warning(
                "snapshot for another cluster, skipped",
                extra={"snapshot_cluster": snapshot.cluster},
            )
            await self._warn(
                WarningReason.INVALID_SNAPSHOT,
                f"snapshot at revision {entry.revision} names cluster {snapshot.cluster!r}",
                generation=snapshot.generation,
            )
            return
        attributes: dict[str, str | int | float | bool] = {
            "apilane.cluster": snapshot.cluster,
            "apilane.generation": snapshot.generation,
            "apilane.digest": snapshot.digest,
            "messaging.destination.name": entry.bucket,
        }
        with tracing.consuming(self.tracer, "renderer consume", entry.headers, attributes) as span:
            await self.handle_snapshot(snapshot)
            span.set_attribute("apilane.render.held", self.held is not None)

    async def handle_snapshot(self, snapshot: EndpointSnapshot) -> None:
        if snapshot.generation <= self.last_applied_generation:
            await self._publish(
                snapshot,
                outcome="ignored",
                reason=f"generation {snapshot.generation} is at or below the last applied"
                f" generation {self.last_applied_generation}",
            )
            return
        if self.held is not None and snapshot.generation <= self.held.snapshot.generation:
            await self._publish(
                snapshot,
                outcome="ignored",
                reason=f"generation {self.held.snapshot.generation} is already waiting to be applied",
            )
            return
        with self.tracer.start_as_current_span("render") as span:
            try:
                desired = rendering.render(snapshot, self.options)
            except rendering.RenderError as exc:
                span.set_status(trace.Status(trace.StatusCode.ERROR, str(exc)))
                self.metrics.failures.labels("render").inc()
                log.warning(
                    "snapshot not rendered",
                    extra={"generation": snapshot.generation, "error": str(exc)},
                )
                await self._publish(snapshot, outcome="failed", reason=f"render: {exc}")
                await self._warn(
                    WarningReason.RENDER_FAILED, str(exc), generation=snapshot.generation
                )
                return  # a held, valid snapshot stays held
        since = self.held.since if self.held is not None else time.monotonic()
        self.held = None
        await self._attempt(snapshot, desired, since=since)

    async def retry_held(self) -> None:
        if self.held is None:
            return
        held = self.held
        await self._attempt(held.snapshot, held.desired, since=held.since, previous=held)

    async def _attempt(
        self,
        snapshot: EndpointSnapshot,
        desired: rendering.DesiredEnv,
        *,
        since: float,
        previous: _Held | None = None,
    ) -> None:
        may_hold = (
            self.settings.coalesce_during_rollout
            and time.monotonic() - since < self.settings.coalesce_max_wait
        )
        with self.tracer.start_as_current_span("patch") as span:
            report = await self.applier.apply(snapshot, desired, may_hold=may_hold)
            span.set_attribute("apilane.render.outcome", report.outcome)
            if report.daemonset_generation is not None:
                span.set_attribute("k8s.daemonset.generation", report.daemonset_generation)
            if report.outcome == "failed":
                span.set_status(trace.Status(trace.StatusCode.ERROR, report.reason))

        if report.outcome == "waiting" or report.retryable:
            held = _Held(snapshot=snapshot, desired=desired, since=since)
            if report.retryable:
                delay = (
                    RETRY_DELAY_INITIAL
                    if previous is None
                    else min(previous.retry_delay * 2, RETRY_DELAY_MAX)
                )
            else:
                delay = WAITING_BACKSTOP  # the DaemonSet watch normally wakes us long before
            held.retry_delay = delay
            held.retry_at = time.monotonic() + delay
            held.outcome = report.outcome
            self.held = held
            # A snapshot reports its waiting or its failure once, not on every retry.
            if (
                previous is not None
                and previous.snapshot.generation == snapshot.generation
                and previous.outcome == report.outcome
            ):
                return
        else:
            self.held = None

        if report.patched:
            self.last_applied_generation = snapshot.generation
            self.metrics.applied_generation.set(snapshot.generation)
            self.metrics.patches.inc()
            self.metrics.latency.observe(
                max(0.0, (datetime.now(UTC) - snapshot.observed_at).total_seconds())
            )
        elif report.outcome == "unchanged":
            self.last_applied_generation = max(self.last_applied_generation, snapshot.generation)
            self.metrics.applied_generation.set(self.last_applied_generation)
            self.metrics.noop.inc()
        elif report.outcome == "failed":
            self.metrics.failures.labels("apply").inc()
            await self._warn(
                WarningReason.APPLY_FAILED, report.reason, generation=snapshot.generation
            )
        self._record_event(snapshot, report)
        log.info(
            "snapshot rendered",
            extra={
                "generation": snapshot.generation,
                "outcome": report.outcome,
                "reason": report.reason,
                "daemonset_generation": report.daemonset_generation,
            },
        )
        await self._publish(
            snapshot, outcome=report.outcome, reason=report.reason, report=report, desired=desired
        )

    def _record_event(self, snapshot: EndpointSnapshot, report: ApplyReport) -> None:
        """A Kubernetes Event on the DaemonSet for what a person may look for with
        `kubectl describe`: a patch, or a failure to apply. Off the hot path, best effort."""
        if report.daemonset is None or report.outcome not in ("applied", "failed"):
            return
        type_: Literal["Normal", "Warning"]
        if report.outcome == "applied":
            reason, type_ = "ApiServerEndpointsRendered", "Normal"
            message = (
                f"apilane set the API server endpoints of snapshot generation"
                f" {snapshot.generation}: "
                + ", ".join(f"{k}={v}" for k, v in sorted(report_env(report).items()))
            )
            if removed := report_removed(report):
                message += "; removed " + ", ".join(removed)
        else:
            reason, type_ = "ApiServerEndpointsNotRendered", "Warning"
            message = f"snapshot generation {snapshot.generation} not applied: {report.reason}"
        task = asyncio.create_task(
            record_event(
                self.kube,
                involved=dict(report.daemonset),
                reason=reason,
                message=message,
                type_=type_,
                component=SERVICE_NAME,
                api_version="apps/v1",
                kind="DaemonSet",
            )
        )
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- output ---------------------------------------------------------------------------

    async def _publish(
        self,
        snapshot: EndpointSnapshot,
        *,
        outcome: RenderOutcome,
        reason: str = "",
        report: ApplyReport | None = None,
        desired: rendering.DesiredEnv | None = None,
    ) -> None:
        self.metrics.renders.labels(outcome).inc()
        notes = "; ".join(desired.notes) if desired is not None else ""
        result = RenderResult(
            cluster=snapshot.cluster,
            generation=snapshot.generation,
            digest=snapshot.digest,
            outcome=outcome,
            reason="; ".join(part for part in (reason, notes) if part),
            daemonset=self.settings.daemonset_ref,
            daemonset_generation=report.daemonset_generation if report else None,
            env=dict(desired.env) if desired is not None else {},
            diff=report.diff_text if report else "",
            patch=report.patch if report else None,
        )
        try:
            await self.bus.publish(subjects.renders_subject(snapshot.cluster), result)
        except BusError as exc:
            # The DaemonSet is the source of truth; a lost result is logged, never retried forever.
            self.metrics.failures.labels("publish").inc()
            log.warning(
                "render result not published",
                extra={"generation": snapshot.generation, "error": str(exc)},
            )

    async def _warn(self, reason: WarningReason, message: str, *, generation: int = 0) -> None:
        warning = events.ClusterWarning(
            cluster=self.settings.cluster,
            reason=reason,
            message=message,
            source=SOURCE,
            object_ref=f"DaemonSet/{self.settings.daemonset_ref}",
            generation=generation,
        )
        try:
            await self.bus.publish(subjects.warnings_subject(self.settings.cluster), warning)
        except BusError as exc:
            log.warning("warning not published", extra={"error": str(exc)})


async def lead_and_render(
    renderer: Renderer, elector: LeaderElector | None, stop: asyncio.Event
) -> None:
    """Render while leading; between terms, wait. Without an elector, render until stopped."""
    if elector is None:
        await renderer.run(stop)
        return
    campaign = asyncio.create_task(elector.run(stop), name="renderer-leader-election")
    try:
        while not stop.is_set():
            await _first_of(elector.leading.wait(), stop.wait())
            if stop.is_set():
                break
            term_over = asyncio.Event()
            watcher = asyncio.create_task(_set_when_any(term_over, elector.lost, stop))
            try:
                log.info("leading: rendering", extra={"identity": elector.identity})
                await renderer.run(term_over)
            finally:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await campaign


async def _first_of(*waits: Awaitable[Any]) -> None:
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _set_when_any(target: asyncio.Event, *sources: asyncio.Event) -> None:
    await _first_of(*(source.wait() for source in sources))
    target.set()


async def main(ctx: ServiceContext, settings: RendererSettings) -> None:
    """The service body for `runtime.serve`: connect, elect, render until stopped."""
    log.info("starting", extra={"settings": config.describe(settings)})
    # Probes are served from the start: until NATS and the renderer exist, not ready.
    started: dict[str, Any] = {}
    ctx.health.add_live("event-loop", lambda: True)
    ctx.health.add_ready("nats", lambda: "bus" in started and started["bus"].connected)
    # A follower is ready (it can take over); a leader once it follows the bucket.
    ctx.health.add_ready(
        "renderer",
        lambda: (
            "renderer" in started
            and (started["renderer"].running or not _leading(started["elector"]))
        ),
    )
    kube = await KubeClient.from_config(settings.common.kubeconfig or None)
    bus = await Bus.connect(
        settings.common.nats_urls, name=SERVICE_NAME, auth=settings.common.nats_auth
    )
    started["bus"] = bus
    try:
        # Discovery provisions the streams; the renderer's identity may only look them up.
        if not await bus.wait_for_streams(stop=ctx.stopping):
            return
        renderer = Renderer(bus=bus, kube=kube, settings=settings, registry=ctx.registry)
        elector = None
        if settings.leader_election:
            elector = LeaderElector(
                kube,
                namespace=settings.lease_namespace,
                name=subjects.renderer_lease(settings.cluster),
                identity=settings.identity,
            )
        started.update(renderer=renderer, elector=elector)
        await lead_and_render(renderer, elector, ctx.stopping)
    finally:
        await bus.drain()
        await kube.close()


def report_env(report: ApplyReport) -> dict[str, str]:
    """The values a report's patch sets, by variable name (the same in every container)."""
    if report.diff is None:
        return {}
    return {change.name: change.new for change in report.diff.changes if change.new is not None}


def report_removed(report: ApplyReport) -> list[str]:
    """The variables a report's patch deletes (apilane had added them and needs them no more)."""
    if report.diff is None:
        return []
    return sorted({change.name for change in report.diff.removals})


def _leading(elector: LeaderElector | None) -> bool:
    return elector is None or elector.leading.is_set()
