"""The renderer service: snapshots from the KV bucket in, ConfigMap writes (configmap mode;
literal mode: DaemonSet patches) and render results out.

Flow, while this replica leads:

0. With no target configured (`APILANE_TARGET_PRESET` auto), find which Calico layout's
   calico-node DaemonSet exists (operator's calico-system, else manifest's kube-system);
   when neither does yet, follow the operator's and look again, backing off, until one does.
1. Read the DaemonSet and the ConfigMap once to recover what they hold: the applied snapshot
   generation and its signed content digest (annotations written by our writes).
2. Render the latest snapshot in the KV bucket, before anything else.
3. Then follow the bucket (`Bus.watch_kv`) and the DaemonSet (a list-then-watch): every new
   snapshot is rendered and applied in order, one at a time; a DaemonSet event only matters
   when a snapshot is waiting (the DaemonSet did not exist, or our rollout was running).

Before anything else every snapshot is verified (`signing.open_snapshot`, against the
trusted keys) and judged (`signing.judge`, against the generation and content held). One
that is unsigned, signed by an unknown key or badly, an older generation, the held one with
other content, or expired, is refused: a metric by reason, a log line, a SnapshotRefused
warning on the bus, and nothing changes on the DaemonSet. A re-signed copy of the held generation is a refresh:
taken, never patched again.

Every verified snapshot gets a RenderResult on `subjects.renders_subject(cluster)`: applied,
unchanged, dry-run, waiting (DaemonSet missing or coalescing), failed (with the reason) or
ignored (refused, or a refresh of what is held). A waiting snapshot gets a second result
when it is finally applied; when a newer snapshot arrives first, the newer one takes its
place (that is the coalescing) and the waiting one's `waiting` stays its last word.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, Literal

from opentelemetry import trace
from prometheus_client import CollectorRegistry

from apilane.kube.client import KubeClient, KubeError, NotFound
from apilane.kube.leader import LeaderElector, elector_for, lead
from apilane.kube.recorder import record_event
from apilane.kube.watch import list_then_watch
from apilane.model import events, subjects
from apilane.model.events import EndpointSnapshot, RenderOutcome, RenderResult, WarningReason
from apilane.model.signing import (
    Held,
    Refused,
    SignatureError,
    SignedSnapshot,
    Verdict,
    judge,
    open_snapshot,
    utcnow,
)
from apilane.renderer import render as rendering
from apilane.renderer.applier import (
    Applier,
    ApplyReport,
    PatchHook,
    applied_content_digest,
    applied_generation,
)
from apilane.renderer.metrics import RendererMetrics
from apilane.renderer.settings import (
    DETECTION_ORDER,
    PRESETS,
    SERVICE_NAME,
    RendererSettings,
    choose_preset,
)
from apilane.runtime import tracing
from apilane.runtime.aio import Backoff
from apilane.runtime.bus import Bus, BusError, KvEntry
from apilane.runtime.lifecycle import bus_session
from apilane.runtime.natsauth import Role
from apilane.runtime.serve import ServiceContext

log = logging.getLogger(__name__)

SOURCE: Final = "renderer"
# How long to wait before trying a held snapshot again when nothing else wakes us (the
# API server was unavailable, or the DaemonSet watch is not delivering).
RETRY_DELAY_INITIAL: Final = 1.0
RETRY_DELAY_MAX: Final = 30.0
# Looking again for a Calico layout that did not exist at start.
DETECT_RETRY_INITIAL: Final = 2.0
DETECT_RETRY_MAX: Final = 60.0
WAITING_BACKSTOP: Final = 30.0


@dataclass
class _Waiting:
    """A snapshot that could not be applied yet, and will be when something changes."""

    signed: SignedSnapshot
    desired: rendering.DesiredEnv
    since: float
    retry_at: float | None = None  # monotonic time of the next timed attempt, if any
    # Carried from attempt to attempt of the same snapshot; a new snapshot starts afresh.
    backoff: Backoff = field(
        default_factory=lambda: Backoff(initial=RETRY_DELAY_INITIAL, maximum=RETRY_DELAY_MAX)
    )
    outcome: str = ""  # the last outcome published for it

    @property
    def snapshot(self) -> EndpointSnapshot:
        return self.signed.snapshot

    @property
    def held(self) -> Held:
        return Held(generation=self.snapshot.generation, content_digest=self.signed.content_digest)


class Renderer:
    """The leader's work loop. `run(stop)` returns when `stop` is set; safe to run again."""

    def __init__(
        self,
        *,
        bus: Bus,
        kube: KubeClient,
        settings: RendererSettings,
        registry: CollectorRegistry | None = None,
        before_patch: PatchHook | None = None,
    ) -> None:
        """`before_patch` is the applier's test hook (see `Applier`); production passes None."""
        self.bus = bus
        self.kube = kube
        self.applier = Applier(kube, settings, before_patch=before_patch)
        self.metrics = RendererMetrics(registry or CollectorRegistry())
        self.tracer = tracing.tracer("apilane.renderer")
        # What the DaemonSet holds (applied, or found unchanged): the generation and content
        # new snapshots are judged against. Recovered from the DaemonSet at start.
        self.accepted: Held | None = None
        self.waiting: _Waiting | None = None
        self.running = False  # readiness: the loop is following the bucket
        self._queue: asyncio.Queue[KvEntry | None] = asyncio.Queue()
        self._last_revision = 0
        self._wake_queued = False
        self._background: set[asyncio.Task[Any]] = set()
        self._daemonset_follower: asyncio.Task[None] | None = None

    @property
    def settings(self) -> RendererSettings:
        """The settings, aimed at the detected target once detection ran."""
        return self.applier.settings

    @property
    def options(self) -> rendering.RenderOptions:
        return self.settings.render_options()

    # -- the loop -------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        self._queue = asyncio.Queue()
        self._wake_queued = False
        tasks: list[asyncio.Task[None]] = []
        try:
            await self._detect_target()
            await self._recover()
            latest = await self._kv_get_latest(stop)
            if latest is not None:
                await self.handle_entry(latest)
            self._daemonset_follower = self._follow(self._follow_daemonset(), "daemonset")
            tasks = [
                self._follow(self._follow_bucket(stop), "bucket"),
                self._follow(self._detect_until_found(stop), "layout"),
            ]
            self.running = True
            await self._process(stop)
        finally:
            self.running = False
            if self._background:  # Kubernetes Events still being written: give them a moment
                await asyncio.wait(self._background, timeout=2.0)
            if self._daemonset_follower is not None:
                tasks.append(self._daemonset_follower)
                self._daemonset_follower = None
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    @staticmethod
    def _follow(work: Coroutine[Any, Any, None], what: str) -> asyncio.Task[None]:
        return asyncio.create_task(work, name=f"renderer-follow-{what}")

    async def _detect_until_found(self, stop: asyncio.Event) -> None:
        """Neither layout existed at start: look again, backing off, until one does, then aim
        at it and try what is held there (no restart needed after installing Calico)."""
        backoff = Backoff(initial=DETECT_RETRY_INITIAL, maximum=DETECT_RETRY_MAX)
        while self.settings.detect_target:
            if await backoff.sleep(stop):
                return
            if not await self._detect_target(quiet=True):
                continue
            if self._daemonset_follower is not None:
                self._daemonset_follower.cancel()
            self._daemonset_follower = self._follow(self._follow_daemonset(), "daemonset")
            await self._recover()
            self._wake()

    async def _detect_target(self, *, quiet: bool = False) -> bool:
        """With no target configured, take the layout whose calico-node DaemonSet exists;
        True once one is taken. `quiet`: a look again, which says nothing when none is."""
        if not self.settings.detect_target:
            return False
        found = choose_preset(await self._existing_layouts())
        if found is None:
            if not quiet:
                log.warning(
                    "no calico-node DaemonSet found in either layout; following the operator's"
                    " and looking again until one appears",
                    extra={"daemonset": self.settings.daemonset_ref},
                )
            return False
        self.applier.settings = self.settings.with_preset(found)
        log.info(
            "detected the Calico layout",
            extra={"preset": found.name, "daemonset": self.settings.daemonset_ref},
        )
        return True

    async def _existing_layouts(self) -> frozenset[str]:
        existing = set()
        for name in DETECTION_ORDER:
            preset = PRESETS[name]
            ref = f"{preset.namespace}/{preset.daemonset}"
            path = f"/apis/apps/v1/namespaces/{preset.namespace}/daemonsets/{preset.daemonset}"
            try:
                await self.kube.get(path)
            except NotFound:
                continue
            except KubeError as exc:
                log.warning(
                    "cannot look for a calico-node layout",
                    extra={"daemonset": ref, "error": str(exc)},
                )
                continue
            existing.add(ref)
        return frozenset(existing)

    async def _recover(self) -> None:
        """What the DaemonSet holds, from its annotations (nothing when they are absent).

        Only a patch writes them: a later generation found unchanged is held in memory, so a
        restarted renderer judges against the last patched one. Any generation between the
        two renders the env the DaemonSet already has."""
        try:
            live = await self.applier.get_daemonset()
        except KubeError as exc:
            log.warning(
                "cannot read the DaemonSet at start; nothing recovered", extra={"error": str(exc)}
            )
            return
        try:
            live_cm = await self.applier.get_configmap()
        except KubeError:
            live_cm = None  # the DaemonSet's record serves
        # The newest record wins: the ConfigMap's in configmap mode, the DaemonSet's in
        # literal mode (each mode writes its own; a switch of modes keeps the older one).
        records = [obj for obj in (live, live_cm) if obj is not None]
        if not records:
            return
        newest = max(records, key=applied_generation)
        recovered = Held(
            generation=applied_generation(newest), content_digest=applied_content_digest(newest)
        )
        if recovered.generation > 0 and (
            self.accepted is None or recovered.generation > self.accepted.generation
        ):
            self._accept(recovered)
            log.info(
                "recovered the applied generation",
                extra={"generation": recovered.generation, "content": recovered.content_digest},
            )

    async def _kv_get_latest(self, stop: asyncio.Event) -> KvEntry | None:
        key = subjects.snapshot_key(self.settings.cluster)
        backoff = Backoff(initial=0.2, maximum=5.0)
        while not stop.is_set():
            try:
                return await self.bus.kv_get(subjects.SNAPSHOT_BUCKET, key)
            except BusError as exc:
                log.warning("cannot read the latest snapshot yet", extra={"error": str(exc)})
                await backoff.sleep(stop)
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
                    if self.waiting is not None and (event.type != "LISTED" or event.objects):
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
        if self.waiting is None:
            return None
        deadlines = []
        if self.waiting.retry_at is not None:
            deadlines.append(self.waiting.retry_at)
        if self.settings.coalesce_during_rollout:
            deadlines.append(self.waiting.since + self.settings.coalesce_max_wait)
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - time.monotonic())

    # -- one snapshot ---------------------------------------------------------------------

    async def handle_entry(self, entry: KvEntry) -> None:
        """Verify, judge, render, apply and report one KV entry. Never raises on bad input."""
        if entry.revision <= self._last_revision:
            return  # already seen (the watch starts with the value kv_get returned)
        self._last_revision = entry.revision
        if entry.operation != "PUT":
            log.info(
                "snapshot deleted from the bucket; nothing to render",
                extra={"revision": entry.revision},
            )
            return
        signed = await self._verified(entry)
        if signed is None:
            return
        snapshot = signed.snapshot
        # The API servers discovery saw are the client's fallbacks when its own server fails.
        self.kube.use_endpoints((e.ip, e.port) for e in snapshot.apiserver_endpoints)
        attributes: dict[str, str | int | float | bool] = {
            "apilane.cluster": snapshot.cluster,
            "apilane.generation": snapshot.generation,
            "apilane.digest": snapshot.digest,
            "apilane.key_id": signed.header.key_id,
            "messaging.destination.name": entry.bucket,
        }
        with tracing.consuming(self.tracer, "renderer consume", entry.headers, attributes) as span:
            await self.handle_snapshot(signed, revision=entry.revision)
            span.set_attribute("apilane.render.held", self.waiting is not None)

    async def _verified(self, entry: KvEntry) -> SignedSnapshot | None:
        """The entry's snapshot if a trusted key signed it for this cluster; else reported."""
        try:
            signed = open_snapshot(entry.value, self.settings.trusted_keys)
        except (SignatureError, events.MalformedEvent) as exc:
            await self._refuse(exc, revision=entry.revision)
            return None
        if signed.snapshot.cluster != self.settings.cluster:
            await self._refuse(
                Refused("other-cluster", f"names cluster {signed.snapshot.cluster!r}"),
                revision=entry.revision,
                generation=signed.snapshot.generation,
            )
            return None
        return signed

    async def handle_snapshot(self, signed: SignedSnapshot, *, revision: int = 0) -> None:
        snapshot = signed.snapshot
        try:
            verdict = judge(signed, self._judged_against(), now=utcnow())
        except Refused as exc:
            await self._refuse(exc, revision=revision, generation=snapshot.generation)
            await self._publish(
                snapshot, outcome="ignored", reason=f"refused ({exc.reason}): {exc}"
            )
            return
        if verdict is Verdict.REFRESH:
            await self._refreshed(signed)
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
                return  # a waiting, valid snapshot stays waiting
        since = self.waiting.since if self.waiting is not None else time.monotonic()
        self.waiting = None
        await self._attempt(signed, desired, since=since)

    def _judged_against(self) -> Held | None:
        """The highest generation taken: held by the DaemonSet, or waiting to be applied."""
        if self.waiting is not None and (
            self.accepted is None or self.waiting.held.generation > self.accepted.generation
        ):
            return self.waiting.held
        return self.accepted

    async def _refreshed(self, signed: SignedSnapshot) -> None:
        """A re-signed copy of what is held or waiting: taken, not applied again."""
        generation = signed.snapshot.generation
        self.metrics.refreshes.inc()
        if self.waiting is not None and self.waiting.snapshot.generation == generation:
            self.waiting.signed = signed  # keeps it valid while it waits
            reason = f"generation {generation} is already waiting to be applied"
        else:
            reason = f"generation {generation} is applied already; this is a refresh"
        log.info(
            "snapshot refreshed",
            extra={"generation": generation, "expires_at": signed.header.expires_at.isoformat()},
        )
        await self._publish(signed.snapshot, outcome="ignored", reason=reason)

    async def _refuse(
        self, exc: SignatureError | events.MalformedEvent, *, revision: int, generation: int = 0
    ) -> None:
        """Report a snapshot that must not be used; the DaemonSet is left as it is."""
        reason = refusal_label(exc)
        self.metrics.refused.labels(reason).inc()
        if refusal_warning(exc) is WarningReason.INVALID_SNAPSHOT:
            self.metrics.failures.labels("decode").inc()
        log.warning(
            "snapshot refused; the DaemonSet is left as it is",
            extra={
                "reason": reason,
                "revision": revision,
                "generation": generation,
                "error": str(exc),
            },
        )
        await self._warn(
            refusal_warning(exc),
            f"snapshot at revision {revision} refused ({reason}): {exc}",
            generation=generation,
        )

    async def retry_held(self) -> None:
        if self.waiting is None:
            return
        waiting = self.waiting
        if waiting.signed.expired(utcnow()):
            # Its validity ended while it waited, and no refresh came: not applied.
            self.waiting = None
            exc = Refused("expired", f"expired at {waiting.signed.header.expires_at} while waiting")
            await self._refuse(exc, revision=0, generation=waiting.snapshot.generation)
            await self._publish(waiting.snapshot, outcome="ignored", reason=f"refused: {exc}")
            return
        await self._attempt(waiting.signed, waiting.desired, since=waiting.since, previous=waiting)

    async def _attempt(
        self,
        signed: SignedSnapshot,
        desired: rendering.DesiredEnv,
        *,
        since: float,
        previous: _Waiting | None = None,
    ) -> None:
        snapshot = signed.snapshot
        may_hold = (
            self.settings.coalesce_during_rollout
            and time.monotonic() - since < self.settings.coalesce_max_wait
        )
        with self.tracer.start_as_current_span("patch") as span:
            report = await self.applier.apply(signed, desired, may_hold=may_hold)
            span.set_attribute("apilane.render.outcome", report.outcome)
            if report.daemonset_generation is not None:
                span.set_attribute("k8s.daemonset.generation", report.daemonset_generation)
            if report.outcome == "failed":
                span.set_status(trace.Status(trace.StatusCode.ERROR, report.reason))
        if not self._wait_or_release(signed, desired, report, since=since, previous=previous):
            return  # already reported for this snapshot
        await self._account(signed, report)
        self._record_event(snapshot, report)
        if report.not_patched:
            log.warning(
                "DaemonSet not patched: a controller renders it",
                extra={"daemonset": self.settings.daemonset_ref, "reason": report.not_patched},
            )
        elif report.adopted:
            log.info(
                "DaemonSet adopted: calico-node reads the values from the ConfigMap",
                extra={
                    "daemonset": self.settings.daemonset_ref,
                    "configmap": self.settings.configmap_ref,
                    "daemonset_generation": report.daemonset_generation,
                },
            )
        log.info(
            "snapshot rendered",
            extra={
                "generation": snapshot.generation,
                "outcome": report.outcome,
                "reason": report.reason,
                "daemonset_generation": report.daemonset_generation,
                "daemonset_patched": report.daemonset_patched,
            },
        )
        await self._publish(
            snapshot, outcome=report.outcome, reason=report.reason, report=report, desired=desired
        )

    def _wait_or_release(
        self,
        signed: SignedSnapshot,
        desired: rendering.DesiredEnv,
        report: ApplyReport,
        *,
        since: float,
        previous: _Waiting | None,
    ) -> bool:
        """Keep the snapshot for another attempt when it is waiting or may heal; False when
        this outcome was reported for it already (a snapshot reports its waiting or its
        failure once, not on every retry)."""
        if report.outcome != "waiting" and not report.retryable:
            self.waiting = None
            return True
        waiting = _Waiting(signed=signed, desired=desired, since=since, outcome=report.outcome)
        if report.retryable:
            if previous is not None:
                waiting.backoff = previous.backoff
            delay = waiting.backoff.next_delay()
        else:
            delay = WAITING_BACKSTOP  # the DaemonSet watch normally wakes us long before
        waiting.retry_at = time.monotonic() + delay
        self.waiting = waiting
        repeated = (
            previous is not None
            and previous.snapshot.generation == signed.snapshot.generation
            and previous.outcome == report.outcome
        )
        return not repeated

    async def _account(self, signed: SignedSnapshot, report: ApplyReport) -> None:
        """Metrics, what the DaemonSet now holds, and a warning for a failure."""
        snapshot = signed.snapshot
        held = Held(generation=snapshot.generation, content_digest=signed.content_digest)
        if report.patched:
            self._accept(held)
            if report.daemonset_patched:
                self.metrics.patches.inc()
            if report.configmap is not None and not report.configmap.unchanged:
                self.metrics.configmap_writes.inc()
            self.metrics.latency.observe(
                max(0.0, (datetime.now(UTC) - snapshot.observed_at).total_seconds())
            )
        elif report.outcome == "unchanged":
            self._accept(held)
            self.metrics.noop.inc()
        elif report.outcome == "failed":
            self.metrics.failures.labels("apply").inc()
            await self._warn(
                WarningReason.APPLY_FAILED, report.reason, generation=snapshot.generation
            )

    def _accept(self, held: Held) -> None:
        self.accepted = held
        self.metrics.applied_generation.set(held.generation)

    def _record_event(self, snapshot: EndpointSnapshot, report: ApplyReport) -> None:
        """A Kubernetes Event on the DaemonSet for what a person may look for with
        `kubectl describe`: a write, an adoption, a DaemonSet left to its controller, or a
        failure to apply. Off the hot path, best effort."""
        if report.daemonset is None:
            return
        described = event_for(snapshot, report, configmap_ref=self.settings.configmap_ref)
        if described is None:
            return
        reason, type_, message = described
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


async def main(ctx: ServiceContext, settings: RendererSettings) -> None:
    """The service body for `apilane.runtime.lifecycle.command_line`: connect, elect, render
    until stopped."""
    renderer: Renderer | None = None
    elector: LeaderElector | None = None

    def ready() -> bool:
        # A follower is ready (it can take over); a leader once it follows the bucket.
        return renderer is not None and (renderer.running or not _leading(elector))

    ctx.health.add_live("event-loop", lambda: True)
    ctx.health.add_ready("renderer", ready)
    kube = await KubeClient.from_config(settings.common.kubeconfig or None)
    try:
        # Discovery provisions the streams; the renderer's identity may only look them up.
        async with bus_session(
            ctx,
            settings.common,
            role=Role.RENDERER,
            client_name=SERVICE_NAME,
            setup=Bus.wait_for_streams,
        ) as bus:
            if bus is None:
                return  # stopped before NATS was there
            elector = elector_for(kube, settings.lease)
            renderer = Renderer(bus=bus, kube=kube, settings=settings, registry=ctx.registry)
            await lead(elector, renderer.run, ctx.stopping)
    finally:
        await kube.close()


def refusal_label(exc: SignatureError | events.MalformedEvent) -> str:
    """The `reason` label of apilane_renderer_snapshots_refused_total for a refusal."""
    return exc.reason if isinstance(exc, SignatureError) else "malformed"


def refusal_warning(exc: SignatureError | events.MalformedEvent) -> WarningReason:
    """As every consumer reports it: SnapshotRefused for what a trusted key did not sign or
    that is not acceptable now (unsigned, unknown key, bad signature, rollback, expired...);
    InvalidSnapshot for a validly signed payload that is not a snapshot (a producer bug)."""
    if isinstance(exc, events.MalformedEvent):
        return WarningReason.INVALID_SNAPSHOT
    return WarningReason.SNAPSHOT_REFUSED


EventType = Literal["Normal", "Warning"]


def event_for(
    snapshot: EndpointSnapshot, report: ApplyReport, *, configmap_ref: str
) -> tuple[str, EventType, str] | None:
    """(reason, type, message) of the Event a report deserves, or None."""
    generation = snapshot.generation
    if report.not_patched:
        return "ApiServerEndpointsNotPatched", "Warning", report.not_patched
    if report.outcome == "failed":
        return (
            "ApiServerEndpointsNotRendered",
            "Warning",
            f"snapshot generation {generation} not applied: {report.reason}",
        )
    if report.outcome != "applied":
        return None
    if report.adopted:
        return "ApiServerEndpointsAdopted", "Normal", report.reason
    values = ", ".join(f"{k}={v}" for k, v in sorted(report_values(report).items()))
    where = f"ConfigMap {configmap_ref}" if not report.daemonset_patched else "the pod template"
    message = (
        f"apilane set the API server endpoints of snapshot generation {generation} in"
        f" {where}: {values}"
    )
    if removed := report_removed(report):
        message += "; removed " + ", ".join(removed)
    return "ApiServerEndpointsRendered", "Normal", message


def report_values(report: ApplyReport) -> dict[str, str]:
    """The values a report wrote: the ConfigMap's changed data, else the patched env."""
    if report.configmap is not None and not report.daemonset_patched:
        return report.configmap.data()
    return report_env(report)


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
