"""One KV value of the snapshot key, from the bus to the maps: admit, then apply or refresh.

Nothing reaches the reconciler unverified (admission.py). A refused value — unsigned, signed
by an unknown key, tampered with, a rollback, an equivocation, expired, from the future —
changes nothing in the data plane: it is counted (`apilane_node_snapshots_refused_total`),
logged with its context, warned about on the bus and shown in the NodeState's last error
until a value is accepted. A re-signed refresh of the held snapshot is taken without any
map write. Expiry never removes what is programmed: the node keeps its last snapshot and
reports itself stale until a newer or refreshed one arrives.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from opentelemetry import trace

from apilane.model import events, subjects
from apilane.model.events import WarningReason
from apilane.model.signing import TrustedKeys, Verdict, utcnow
from apilane.node_loader import sockets
from apilane.node_loader.admission import Admitted, Refusal, admit
from apilane.node_loader.metrics import LoaderMetrics
from apilane.node_loader.nat import BackendValue
from apilane.node_loader.reconcile import ApplyResult, Outcome, Reconciler
from apilane.node_loader.reporting import Reporter
from apilane.node_loader.sockets import ConnectionLookup
from apilane.node_loader.statefile import Seal
from apilane.runtime import tracing
from apilane.runtime.aio import Backoff
from apilane.runtime.bus import KvEntry

log = logging.getLogger(__name__)

_CONSUME = "node-loader consume"
# Refusals of a value at or below the held generation: counted as ignored as well.
_AT_OR_BELOW = frozenset({"rollback", "equivocation"})


class SnapshotIntake:
    def __init__(
        self,
        *,
        reconciler: Reconciler,
        trusted: TrustedKeys,
        metrics: LoaderMetrics,
        reporter: Reporter,
        tracer: trace.Tracer,
        publish_state: Callable[[], Awaitable[None]],
        connections: ConnectionLookup | None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.reconciler = reconciler
        self.trusted = trusted
        self.metrics = metrics
        self.reporter = reporter
        self.node = reporter.node
        self.tracer = tracer
        self.publish_state = publish_state
        # The connections through a service address; None: no socket is ever destroyed.
        self.connections = connections
        self.clock = clock
        self.refusal = ""  # why the latest value was refused, until one is accepted
        self.stale = False
        self._retry: Admitted | None = None  # admitted, but its map write failed
        self._retry_at = 0.0
        self._retry_backoff = Backoff(initial=0.5, maximum=30.0)

    async def handle(self, entry: KvEntry) -> None:
        if entry.operation != "PUT":
            # A deleted or purged key is not an empty cluster: keep the maps (fail static).
            log.warning(
                "snapshot key deleted; keeping the maps", extra={"revision": entry.revision}
            )
            return
        try:
            admission = admit(entry.value, self.trusted, self.reconciler.accepted, now=self.clock())
        except events.MalformedEvent as exc:
            await self._malformed(entry, exc)
            return
        if isinstance(admission, Refusal):
            await self._refused(entry, admission)
        elif admission.verdict is Verdict.REFRESH and self.reconciler.applied is not None:
            await self._refresh(entry, admission)
        else:  # newer; or the held one while recovery could not bring the maps to it
            await self.apply(admission, headers=entry.headers, attrs=self._attrs(entry))

    def _attrs(self, entry: KvEntry) -> dict[str, str | int]:
        return {
            "messaging.system": "nats",
            "messaging.operation": "process",
            "messaging.destination.name": subjects.kv_subject(entry.bucket, entry.key),
            "apilane.kv.revision": entry.revision,
            "apilane.node": self.node,
        }

    # -- not accepted ------------------------------------------------------------------------

    async def _malformed(self, entry: KvEntry, exc: events.MalformedEvent) -> None:
        """Validly signed, but not a snapshot (a producer bug)."""
        self._error_span(entry, str(exc))
        log.warning(
            "malformed snapshot ignored", extra={"revision": entry.revision, "error": str(exc)}
        )
        self.metrics.failures.labels(reason=WarningReason.INVALID_SNAPSHOT).inc()
        self.metrics.applies.labels(outcome="malformed").inc()
        await self.reporter.warn(
            WarningReason.INVALID_SNAPSHOT,
            f"malformed snapshot at revision {entry.revision}: {exc}",
            0,
        )

    async def _refused(self, entry: KvEntry, refusal: Refusal) -> None:
        reason = refusal.reason
        self._error_span(entry, f"refused ({reason}): {refusal.error}")
        self.metrics.refused.labels(reason=reason).inc()
        if reason in _AT_OR_BELOW:
            self.metrics.ignored.inc()
        held = self.reconciler.accepted
        log.warning(
            "snapshot refused; the maps keep the last good state",
            extra={
                "revision": entry.revision,
                "reason": reason,
                "error": str(refusal.error),
                "generation": refusal.generation,
                "key_id": refusal.key_id,
                "held_generation": held.generation if held else 0,
                "trusted_keys": list(self.trusted.ids),
            },
        )
        self.refusal = f"revision {entry.revision} refused ({reason}): {refusal.error}"
        await self.reporter.warn(
            WarningReason.SNAPSHOT_REFUSED,
            f"node {self.node} refused the snapshot at revision {entry.revision} "
            f"({reason}): {refusal.error}",
            refusal.generation,
            detail=reason,
        )
        await self.publish_state()

    def _error_span(self, entry: KvEntry, message: str) -> None:
        with tracing.consuming(self.tracer, _CONSUME, entry.headers, self._attrs(entry)) as span:
            span.set_status(trace.Status(trace.StatusCode.ERROR, message))

    # -- accepted ----------------------------------------------------------------------------

    async def _refresh(self, entry: KvEntry, admitted: Admitted) -> None:
        """The held generation and content with a later expiry: no map write."""
        attrs = {**self._attrs(entry), "apilane.generation": admitted.generation}
        with tracing.consuming(self.tracer, _CONSUME, entry.headers, attrs) as span:
            problem = self.reconciler.refresh(admitted.seal)
            span.set_attribute("apilane.outcome", "refreshed")
        self.refusal = ""
        self.metrics.refreshes.inc()
        self.metrics.ignored.inc()
        log.info(
            "snapshot refreshed: same content, later expiry; the maps are unchanged",
            extra={
                "revision": entry.revision,
                "generation": admitted.generation,
                "expires_at": admitted.seal.expires_at.isoformat(),
                "key_id": admitted.seal.key_id,
                "problem": problem,
            },
        )
        await self.check_expiry()
        await self.publish_state()

    async def apply(
        self,
        admitted: Admitted,
        *,
        headers: dict[str, str],
        attrs: dict[str, str | int] | None = None,
    ) -> ApplyResult:
        snapshot = admitted.signed.snapshot
        seal = admitted.seal
        with tracing.consuming(self.tracer, _CONSUME, headers) as span:
            if span.is_recording():  # tracing off: the attributes would be built for nothing
                span.set_attributes(
                    {
                        **(attrs or {}),
                        "apilane.generation": snapshot.generation,
                        "apilane.digest": snapshot.digest,
                        "apilane.node": self.node,
                    }
                )
            with self.tracer.start_as_current_span("apply") as apply_span:
                result = self.reconciler.apply(snapshot, seal=seal)
                if apply_span.is_recording():
                    apply_span.set_attribute("apilane.outcome", str(result.outcome))
                    apply_span.set_attribute("entries_written", result.entries_written)
                    set_health_attributes(apply_span, result)
                if result.outcome in (Outcome.REJECTED, Outcome.FAILED):
                    apply_span.set_status(trace.Status(trace.StatusCode.ERROR, result.reason))
            span.set_attribute("apilane.outcome", str(result.outcome))
        self.refusal = ""
        await self._after_apply(admitted, seal, result)
        return result

    async def _after_apply(self, admitted: Admitted, seal: Seal, result: ApplyResult) -> None:
        self.metrics.applies.labels(outcome=str(result.outcome)).inc()
        self.metrics.count_violations(result.violations_before)
        if result.outcome is Outcome.IGNORED:
            self.metrics.ignored.inc()
            if log.isEnabledFor(logging.INFO):
                log.info("snapshot ignored", extra=_log_extra(admitted, seal, result))
        elif result.outcome in (Outcome.REJECTED, Outcome.FAILED):
            log.warning(
                "snapshot not applied; the maps keep the last good state",
                extra=_log_extra(admitted, seal, result),
            )
            await self._not_applied(admitted, result)
        else:
            if log.isEnabledFor(logging.INFO):
                log.info("snapshot applied", extra=_log_extra(admitted, seal, result))
            await self._applied(admitted, result)

    async def _not_applied(self, admitted: Admitted, result: ApplyResult) -> None:
        self.metrics.failures.labels(reason=result.warning_reason or str(result.outcome)).inc()
        await self.reporter.warn(
            result.warning_reason or WarningReason.APPLY_FAILED,
            f"node {self.node} did not apply generation {admitted.generation}: {result.reason}",
            admitted.generation,
        )
        if result.outcome is Outcome.FAILED:
            self._retry = admitted
            self._retry_at = time.monotonic() + self._retry_backoff.next_delay()
        await self.publish_state()

    async def _applied(self, admitted: Admitted, result: ApplyResult) -> None:
        snapshot = admitted.signed.snapshot
        self._retry = None
        self._retry_backoff.reset()
        self.metrics.apply_duration.observe(result.timings.get("total", 0.0))
        self.metrics.generation.set(self.reconciler.applied_generation)
        if result.outcome is Outcome.APPLIED:
            self.metrics.entries_written.inc(result.entries_written)
            for trigger in snapshot.trigger_times or (snapshot.observed_at,):
                latency = (result.finished_at - _aware(trigger)).total_seconds()
                self.metrics.programming_latency.observe(max(latency, 0.0))
        for finding in result.findings:
            await self.reporter.warn(
                finding.reason, f"node {self.node}: {finding.message}", snapshot.generation
            )
        if result.removed_backends:
            await self.destroy_sockets_to(result.removed_backends)
        await self.check_expiry()
        await self.publish_state()

    async def retry_if_due(self) -> None:
        if self._retry is not None and time.monotonic() >= self._retry_at:
            admitted, self._retry = self._retry, None
            log.info("retrying a failed apply", extra={"generation": admitted.generation})
            await self.apply(admitted, headers={})

    # -- expiry ------------------------------------------------------------------------------

    async def check_expiry(self) -> bool:
        """Track whether the held snapshot has expired; True when that changed. Turning
        stale is logged and warned about; the maps stay as they are either way."""
        seal = self.reconciler.seal
        self.metrics.expires_at.set(seal.expires_at.timestamp() if seal else 0)
        stale = self.reconciler.stale(self.clock())
        self.metrics.stale.set(1 if stale else 0)
        if stale == self.stale:
            return False
        self.stale = stale
        generation = self.reconciler.applied_generation
        if not stale or seal is None:
            log.info("the held snapshot is valid again", extra={"generation": generation})
            return True
        log.warning(
            "the held snapshot has expired; the maps keep it (fail static)",
            extra={"generation": generation, "expires_at": seal.expires_at.isoformat()},
        )
        await self.reporter.warn(
            WarningReason.SNAPSHOT_EXPIRED,
            f"node {self.node} holds generation {generation}, expired at "
            f"{seal.expires_at.isoformat()}: kept until a newer or refreshed snapshot arrives",
            generation,
        )
        return True

    async def after_health_apply(self, result: ApplyResult) -> None:
        """Count an apply the prober caused; close the sockets to the backends it removed."""
        self.metrics.applies.labels(outcome=str(result.outcome)).inc()
        self.metrics.count_violations(result.violations_before)
        if result.outcome is Outcome.APPLIED:
            self.metrics.entries_written.inc(result.entries_written)
            self.metrics.apply_duration.observe(result.timings.get("total", 0.0))
        if result.removed_backends:
            await self.destroy_sockets_to(result.removed_backends)

    async def destroy_sockets_to(self, backends: tuple[BackendValue, ...]) -> None:
        """Close the sockets that connected through a service address to these (removed or
        unhealthy) backends, in every network namespace of the node, so their clients
        reconnect to a live one. Best effort: never fails the apply."""
        if self.connections is None:
            return
        began = time.perf_counter()
        try:
            # Netlink dumps of every namespace's sockets on a busy node: off the event loop.
            report = await asyncio.to_thread(sockets.destroy_recorded, backends, self.connections)
        except Exception as exc:
            log.warning("destroying sockets to removed backends failed", extra={"error": str(exc)})
            return
        if not report.supported:
            log.warning("cannot destroy sockets here", extra={"reason": report.reason})
            return
        self.metrics.sockets_destroyed.inc(report.destroyed)
        log.info(
            "destroyed sockets that connected through the service to removed backends",
            extra={
                "backends": [f"{b.ip}:{b.port}" for b in backends],
                "namespaces": report.namespaces,
                "destroyed": report.destroyed,
                "already_gone": report.already_gone,
                "failures": report.failures[:20],
                "ms": round((time.perf_counter() - began) * 1000, 1),
            },
        )


def set_health_attributes(span: trace.Span, result: ApplyResult) -> None:
    """Say on the span when probes changed the programmed set."""
    if result.health_excluded:
        span.set_attribute(
            "apilane.health.excluded", [f"{b.ip}:{b.port}" for b in result.health_excluded]
        )
    if result.health_fail_static:
        span.set_attribute(
            "apilane.health.fail_static",
            [f"{k.ip}:{k.port}/{k.proto}" for k in result.health_fail_static],
        )


def _log_extra(admitted: Admitted, seal: Seal, result: ApplyResult) -> dict[str, Any]:
    snapshot = admitted.signed.snapshot
    return {
        "generation": snapshot.generation,
        "digest": snapshot.digest,
        "key_id": seal.key_id,
        "expires_at": seal.expires_at.isoformat(),
        "outcome": str(result.outcome),
        "entries_written": result.entries_written,
        "reason": result.reason,
        "timings_ms": {k: round(v * 1000, 3) for k, v in result.timings.items()},
        "findings": [
            {"reason": str(f.reason), "object_ref": f.object_ref, "message": f.message}
            for f in result.findings
        ],
    }


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
