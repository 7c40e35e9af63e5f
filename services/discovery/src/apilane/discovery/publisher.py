"""When and what discovery publishes: coalescing, no-op suppression, generations, warnings.

The watcher calls `offer(result, change)` for every observed change; `run` turns those into
KV writes while this replica leads. The rules:

- every snapshot is sealed with discovery's key (`sealing`), valid for a TTL, and re-signed
  at half of it (same generation and payload bytes, a later expiry) while this replica
  leads, so consumers can refuse an expired one without a quiet cluster expiring;
- coalescing (`apilane.runtime.coalesce`): the first change after a quiet window is
  published at once; changes within the window after a publish become one trailing publish
  of the latest view, naming every resourceVersion;
- a publish happens only when the bucket does not hold the same data-plane inputs already,
  judged by what discovery can verify with its own key: a value it cannot verify is not
  its own, whatever digest it claims, and is overwritten;
- when the bucket lost the snapshot this term asserted (deleted, purged, overwritten) and
  the view still has its data-plane inputs, that snapshot is put back re-sealed with its
  generation (`reassert`), not published as a new one: consumers see a refresh. The
  leader's `antientropy.KeyGuard` watches the key for this between publishes;
- an empty endpoint set is never published: the last good snapshot stays, a
  `NoReadyEndpoints` warning goes out instead;
- the generation only increases, across restarts and leader changes: it continues from the
  snapshot in the bucket that discovery verified, else from the entry's KV revision, and is
  written with compare-and-set on that revision (see `_read_back`);
- when NATS is down the latest state stays pending and is retried with backoff, so once
  NATS is back the latest state is published (intermediate states may be skipped: every
  snapshot is complete, so nothing is lost by skipping);
- a view is done when its snapshot, its bus warnings and its Kubernetes Events are all out:
  a warning or an Event that failed keeps the view pending, retried on the same backoff
  (the snapshot itself is then suppressed: the bucket holds it already).

The bus and the Kubernetes event recorder are small protocols, so the whole state machine
runs in tests without NATS.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from typing import Final, Protocol

from opentelemetry import trace

from apilane.model import events, subjects
from apilane.model.endpoints import SnapshotResult
from apilane.model.events import ClusterWarning, EndpointSnapshot, Finding
from apilane.model.signing import Refused, SignatureError, SignedSnapshot
from apilane.runtime.aio import Backoff, first_of
from apilane.runtime.bus import BusError, KvEntry, RevisionMismatch
from apilane.runtime.coalesce import LeadingEdge

from .antientropy import Action, Asserted, Assessment, assess
from .metrics import DiscoveryMetrics
from .sealing import Sealer

log = logging.getLogger(__name__)
tracer = trace.get_tracer("apilane.discovery")

SOURCE: Final = "discovery"
# More than this many lost compare-and-set races in a row is not contention, it is a bug
# (or a key deleted under us); back off and try again later.
MAX_CAS_ATTEMPTS: Final = 8
# Pending changes kept for metrics and span links while NATS is down; older ones are
# dropped from the bookkeeping only (the state itself is always the latest).
MAX_PENDING_CHANGES: Final = 1024


class SnapshotBus(Protocol):
    """The part of `apilane.runtime.bus.Bus` the publisher uses."""

    async def kv_get(
        self, bucket: str, key: str, *, include_deleted: bool = False
    ) -> KvEntry | None: ...

    async def kv_put(
        self,
        bucket: str,
        key: str,
        value: events.Event | bytes,
        *,
        expected_revision: int | None = None,
        msg_id: str | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 5.0,
    ) -> int: ...

    async def publish(
        self,
        subject: str,
        event: events.Event,
        *,
        msg_id: str | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 5.0,
    ) -> int: ...


class EventRecorder(Protocol):
    """Puts a finding onto the object it concerns as a Kubernetes Event.

    Raising means "try again later"; an adapter swallows errors that retrying cannot fix."""

    async def record(self, finding: Finding) -> None: ...


@dataclass(frozen=True, kw_only=True)
class ObservedChange:
    """One watch event that changed discovery's view, with what is needed to time it."""

    object_ref: str  # "EndpointSlice/default/kubernetes-abc"
    resource_version: str
    observed_at: float  # wall clock, seconds since the epoch
    trigger_time: datetime | None = None  # the slice's last-change-trigger-time, when set
    span_context: trace.SpanContext | None = None

    @property
    def versioned_ref(self) -> str:
        return f"{self.object_ref}@{self.resource_version}"

    @property
    def started_at(self) -> float:
        """When the change happened: the trigger time when plausible, else when observed."""
        if self.trigger_time is not None:
            triggered = self.trigger_time.timestamp()
            if triggered <= self.observed_at:
                return triggered
        return self.observed_at


class Outcome(Enum):
    IDLE = "idle"  # nothing to do
    PUBLISHED = "published"
    REFRESHED = "refreshed"  # the current snapshot re-signed with a later expiry
    REASSERTED = "reasserted"  # this term's snapshot put back, same generation
    SUPPRESSED = "suppressed"  # same digest as the KV entry
    REFUSED_EMPTY = "refused-empty"
    NOT_LEADER = "not-leader"
    RETRY = "retry"  # the bus failed; the state stays pending


class Publisher:
    def __init__(
        self,
        *,
        cluster: str,
        bus: SnapshotBus,
        metrics: DiscoveryMetrics,
        sealer: Sealer,
        recorder: EventRecorder | None = None,
        coalesce_window: float = 0.1,
        is_leader: Callable[[], bool] = lambda: True,
        retry_initial: float = 0.2,
        retry_max: float = 5.0,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cluster = subjects.check_token(cluster, "cluster name")
        self.key = subjects.snapshot_key(cluster)
        self.bus = bus
        self.metrics = metrics
        self.sealer = sealer
        self.recorder = recorder
        self.coalesce_window = coalesce_window
        self._pace = LeadingEdge(coalesce_window, clock=monotonic)
        self.is_leader = is_leader
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self.clock = clock

        self.latest: SnapshotResult | None = None  # the newest view offered
        self.last_published: EndpointSnapshot | None = (
            None  # what the KV bucket holds, as far as we know
        )
        self.last_generation = 0
        self._dirty = False  # `latest` has not been reconciled with the bucket yet
        self._changes: list[ObservedChange] = []
        self._wakeup = asyncio.Event()
        self._warned_bus: set[tuple[str, str, str]] = set()
        self._warned_kube: set[tuple[str, str, str]] = set()
        # One id per appearance of a finding, for the warning's JetStream message id.
        self._warning_ids: dict[tuple[str, str, str], str] = {}
        self._reconciled: SnapshotResult | None = None  # the last view fully handled
        # What the bucket holds as far as discovery verified it, and at which revision: the
        # snapshot to re-sign before it expires.
        self.current: tuple[SignedSnapshot, int] | None = None
        # The newest snapshot of discovery's this term wrote or verified in the bucket: what
        # the key should hold until the next publish (kept while `current` is re-read).
        self._own: SignedSnapshot | None = None

    # -- input

    def offer(self, result: SnapshotResult, change: ObservedChange | None = None) -> None:
        """A new complete view; never blocks. The publish happens in `run`."""
        if (
            not self._dirty
            and self._reconciled is not None
            and _same_view(result, self._reconciled)
            and self.is_leader()
        ):
            # Nothing that matters changed (a reordering, a status field we do not read):
            # the bucket already holds this digest and its warnings are out.
            self.latest = result
            if change is not None:
                self.metrics.suppressed.inc()
            return
        self.latest = result
        self._dirty = True
        # A follower keeps the latest view (to publish when it leads) but does not account
        # changes it will never publish.
        if change is not None and self.is_leader():
            if len(self._changes) >= MAX_PENDING_CHANGES:
                del self._changes[0]
            self._changes.append(change)
        self._wakeup.set()

    def wake(self) -> None:
        """Reconcile again and announce every finding again (this replica just became the
        leader: the previous one may not have announced them)."""
        if self.latest is not None:
            self._warned_bus.clear()
            self._warned_kube.clear()
            self._warning_ids.clear()  # announce again, not a duplicate JetStream drops
        self._own = None  # a new term: only what the bucket holds now is known to be ours
        self._reconcile_again()

    def _reconcile_again(self) -> None:
        """Read the bucket again before publishing or re-signing anything."""
        self.current = None
        if self.latest is not None:
            self._dirty = True
        self._wakeup.set()

    def reconcile_with_bucket(self) -> None:
        """The key holds a newer snapshot of discovery's than this replica knows: read it."""
        self._reconcile_again()

    @property
    def pending(self) -> bool:
        return self._dirty

    @property
    def asserted(self) -> Asserted | None:
        """What the key should hold while this replica leads, and the revision it was
        verified at (None while the bucket is being read again)."""
        if self._own is None or not self.is_leader():
            return None
        current = self.current
        revision = current[1] if current is not None and current[0] is self._own else None
        return Asserted(self._own, revision)

    # -- the loop

    async def run(self, stop: asyncio.Event) -> None:
        """Publish pending state, and re-sign the current snapshot when it is due, until
        `stop` is set (the end of this replica's term)."""
        backoff = Backoff(initial=self.retry_initial, maximum=self.retry_max)
        while not stop.is_set():
            woke = await first_of(self._wakeup.wait(), stop.wait(), timeout=self._refresh_in())
            if woke == 1:
                break
            if woke is None:
                outcome = await self.refresh()
            else:
                if await self._coalesce(stop):
                    break
                self._wakeup.clear()  # what came while coalescing is in this flush
                outcome = await self.flush()
            if outcome is not Outcome.RETRY:
                backoff.reset()
                continue
            # Newer changes do not cut the backoff short: NATS is down for all of them.
            if await backoff.sleep(stop):
                break
            self._wakeup.set()

    def _refresh_in(self) -> float | None:
        return None if self.current is None else self.sealer.refresh_in(self.current[0])

    async def _coalesce(self, stop: asyncio.Event) -> bool:
        """Wait out what is left of the window since the last publish (nothing after a quiet
        one); True when `stop` came meanwhile."""
        remaining = self._pace.delay()
        return remaining > 0 and await first_of(stop.wait(), timeout=remaining) == 0

    async def flush(self) -> Outcome:
        """Reconcile the latest view with the bucket once (the loop's body; tests call it)."""
        if not self._dirty or self.latest is None:
            return Outcome.IDLE
        self._pace.sent()  # what comes from now on waits for the window's end
        if not self.is_leader():
            # A follower keeps the latest view (to publish if it becomes the leader) but
            # does not account changes it will never publish.
            self._changes.clear()
            self._dirty = False
            self._reconciled = None
            return Outcome.NOT_LEADER
        result = self.latest
        try:
            outcome = await self._publish(result)
        except BusError as exc:
            self.metrics.publish_failures.inc()
            log.warning(
                "publishing the snapshot failed, will retry",
                extra={"error": str(exc), "cluster": self.cluster},
            )
            outcome = Outcome.RETRY
        # After the snapshot, so a warning carries the generation it was raised at.
        if not await self._emit_warnings(result) and outcome is not Outcome.RETRY:
            outcome = Outcome.RETRY
        if outcome is not Outcome.RETRY:
            self._reconciled = result
            if result is self.latest:
                self._dirty = False  # unless something newer arrived while we were writing
        return outcome

    async def _publish(self, result: SnapshotResult) -> Outcome:
        changes = list(self._changes)
        for _attempt in range(MAX_CAS_ATTEMPTS):
            entry = await self.bus.kv_get(subjects.SNAPSHOT_BUCKET, self.key, include_deleted=True)
            current = self._read_back(entry)
            if current is not None and self._older_than_own(current):
                current = None  # an older snapshot of ours, put back: a replay
            # Even while nothing new can be published, the last good snapshot is kept valid.
            if entry is not None and current is not None:
                self._hold(current, entry.revision)
            else:
                self.current = None
            if not result.apiserver_endpoints or not result.service_endpoints:
                return self._refuse_empty(result, changes)
            if put_back := self._put_back_instead(current, entry, result):
                if not await self.reassert(entry, put_back):
                    continue  # someone else wrote: read again
                self.metrics.suppressed.inc(len(changes))
                self._forget_changes(changes)
                return Outcome.REASSERTED
            if current is not None and _same_data_plane_inputs(current.snapshot, result):
                self.last_published = current.snapshot
                self.metrics.suppressed.inc(len(changes))
                self._forget_changes(changes)
                return Outcome.SUPPRESSED
            snapshot = self._snapshot(result, generation=self.last_generation + 1, changes=changes)
            sealed = self.sealer.seal(snapshot)
            expected = entry.revision if entry is not None else 0
            revision = await self._write(snapshot, sealed, changes, expected_revision=expected)
            if revision is None:
                continue  # someone else wrote: read again, the generation moves on
            self._hold(self.sealer.open(sealed), revision)
            self._published(snapshot, revision, changes)
            return Outcome.PUBLISHED
        raise BusError(
            f"compare-and-set on {subjects.SNAPSHOT_BUCKET}/{self.key} lost"
            f" {MAX_CAS_ATTEMPTS} times in a row"
        )

    async def refresh(self) -> Outcome:
        """Re-sign the current snapshot: the same generation and payload bytes, a later
        expiry, written with compare-and-set on the revision it was verified at. Consumers
        holding that generation take it as a refresh, not as something to apply."""
        if self.current is None:
            return Outcome.IDLE
        if not self.is_leader():
            return Outcome.RETRY  # a slow renewal; look again after the backoff
        held, revision = self.current
        sealed = self.sealer.reseal(held)
        refreshed = self.sealer.open(sealed)
        issued = int(refreshed.header.issued_at.timestamp() * 1000)
        try:
            new_revision = await self.bus.kv_put(
                subjects.SNAPSHOT_BUCKET,
                self.key,
                sealed,
                expected_revision=revision,
                msg_id=f"{self.cluster}:{held.header.generation}:{held.snapshot.digest}:{issued}",
            )
        except RevisionMismatch:
            # Someone wrote since: reconcile with the bucket first (verify, keep or replace).
            self._reconcile_again()
            return Outcome.IDLE
        except BusError as exc:
            self.metrics.publish_failures.inc()
            log.warning(
                "re-signing the snapshot failed, will retry",
                extra={"error": str(exc), "cluster": self.cluster},
            )
            return Outcome.RETRY
        self._hold(refreshed, new_revision)
        self.metrics.refreshes.inc()
        log.info(
            "re-signed the snapshot",
            extra={
                "cluster": self.cluster,
                "generation": held.header.generation,
                "revision": new_revision,
                "expires_at": refreshed.header.expires_at.isoformat(),
            },
        )
        return Outcome.REFRESHED

    def _hold(self, signed: SignedSnapshot, revision: int) -> None:
        self.current = (signed, revision)
        self._own = signed

    def _older_than_own(self, found: SignedSnapshot) -> bool:
        return self._own is not None and found.header.generation < self._own.header.generation

    def _put_back_instead(
        self, current: SignedSnapshot | None, entry: KvEntry | None, result: SnapshotResult
    ) -> Assessment | None:
        """Why to put this term's snapshot back rather than publish a new generation: the
        bucket lost it while nothing changed for consumers. None: publish as usual."""
        if current is not None or self._own is None:
            return None
        if not _same_data_plane_inputs(self._own.snapshot, result):
            return None
        assessment = assess(entry, self.asserted, cluster=self.cluster, open_=self.sealer.open)
        return assessment if assessment.action is Action.REASSERT else None

    async def reassert(self, entry: KvEntry | None, assessment: Assessment) -> bool:
        """Put this term's snapshot back into the key: re-sealed with the same generation
        and payload bytes, written with compare-and-set on the entry observed (`entry`).
        False when there is nothing to put back or it lost the race (the caller looks
        again); BusError when the bus failed."""
        own = self._own
        if own is None or not self.is_leader():
            return False
        sealed = self.sealer.reseal(own)
        resealed = self.sealer.open(sealed)
        issued = int(resealed.header.issued_at.timestamp() * 1000)
        observed = entry.revision if entry is not None else 0
        try:
            revision = await self.bus.kv_put(
                subjects.SNAPSHOT_BUCKET,
                self.key,
                sealed,
                expected_revision=observed,
                msg_id=f"{self.cluster}:{own.header.generation}:{own.snapshot.digest}:{issued}",
            )
        except RevisionMismatch:
            return False
        self._hold(resealed, revision)
        self.last_published = own.snapshot
        self.metrics.reasserts.labels(assessment.reason).inc()
        log.warning(
            "the snapshot key did not hold discovery's snapshot; put it back",
            extra={
                "cluster": self.cluster,
                "reason": assessment.reason,
                "detail": assessment.detail,
                "observed_revision": observed,
                "observed_operation": entry.operation if entry is not None else "none",
                "revision": revision,
                "generation": own.header.generation,
                "expires_at": resealed.header.expires_at.isoformat(),
            },
        )
        return True

    def _refuse_empty(self, result: SnapshotResult, changes: list[ObservedChange]) -> Outcome:
        # Never an empty set: the data plane would drop the API server. The finding
        # (NoReadyEndpoints / ServiceMissing) goes out as a warning instead.
        self.metrics.refused_empty.inc()
        self._forget_changes(changes)
        log.warning(
            "not publishing a snapshot without endpoints; the last good one stays",
            extra={"cluster": self.cluster, "digest": result.digest},
        )
        return Outcome.REFUSED_EMPTY

    def _read_back(self, entry: KvEntry | None) -> SignedSnapshot | None:
        """The snapshot in the bucket if discovery signed it, and the generation to go on from.

        Generations come only from what discovery can verify, or from the entry's revision:
        a revision is assigned by the server, grows by one per write and bounds every
        generation discovery ever wrote to this key (each one was written at a revision at
        least as high as itself). A forged value claiming generation 2**62 therefore moves
        the next generation only past its revision, never to its number, and a value
        discovery cannot verify (tampered, unsigned, the key before a rotation) is replaced
        by a generation above every one it may have displaced, which consumers accept.
        """
        if entry is None:
            return None
        if entry.operation != "PUT":
            # Someone deleted or purged the key: its marker's revision is the CAS base, and
            # generations stay above every revision the key has had.
            self.last_generation = max(self.last_generation, entry.revision)
            return None
        try:
            verified = self.sealer.open(entry.value)
            if verified.snapshot.cluster != self.cluster:
                raise Refused("other-cluster", f"signed for {verified.snapshot.cluster!r}")
        except (SignatureError, events.MalformedEvent) as exc:
            reason = exc.reason if isinstance(exc, SignatureError) else "malformed"
            self.metrics.untrusted_entries.labels(reason).inc()
            self.last_generation = max(self.last_generation, entry.revision)
            log.error(
                "the KV entry is not a snapshot discovery signed; it will be replaced",
                extra={
                    "cluster": self.cluster,
                    "revision": entry.revision,
                    "reason": reason,
                    "error": str(exc),
                },
            )
            return None
        self.last_generation = max(self.last_generation, verified.header.generation)
        return verified

    async def _write(
        self,
        snapshot: EndpointSnapshot,
        sealed: bytes,
        changes: list[ObservedChange],
        *,
        expected_revision: int,
    ) -> int | None:
        """The compare-and-set write, traced; its revision, or None when it lost the race."""
        observed = [c.span_context for c in changes if c.span_context is not None]
        # The publish continues the trace of the first change it covers (one change, one
        # trace); every other change it coalesced is a link.
        parent = (
            trace.set_span_in_context(trace.NonRecordingSpan(observed[0])) if observed else None
        )
        with tracer.start_as_current_span(
            "discovery publish",
            context=parent,
            kind=trace.SpanKind.PRODUCER,
            links=[trace.Link(context) for context in observed][-128:],
            attributes={
                "messaging.system": "nats",
                "messaging.destination.name": subjects.kv_subject(
                    subjects.SNAPSHOT_BUCKET, self.key
                ),
                "apilane.cluster": self.cluster,
                "apilane.generation": snapshot.generation,
                "apilane.digest": snapshot.digest,
                "apilane.coalesced_changes": len(changes),
                "apilane.resource_versions": list(snapshot.resource_versions),
            },
        ) as span:
            try:
                return await self.bus.kv_put(
                    subjects.SNAPSHOT_BUCKET,
                    self.key,
                    sealed,
                    expected_revision=expected_revision,
                    msg_id=f"{self.cluster}:{snapshot.generation}:{snapshot.digest}",
                )
            except RevisionMismatch:
                span.set_attribute("apilane.cas_lost", True)
                return None

    def _published(
        self, snapshot: EndpointSnapshot, revision: int, changes: list[ObservedChange]
    ) -> None:
        published_at = self.clock()
        self.last_generation = snapshot.generation
        self.last_published = snapshot
        self.metrics.publishes.inc()
        if len(changes) > 1:
            self.metrics.coalesced.inc(len(changes) - 1)
        for change in changes:
            self.metrics.change_to_publish.observe(max(0.0, published_at - change.started_at))
        self._forget_changes(changes)
        log.info(
            "published endpoint snapshot",
            extra={
                "cluster": self.cluster,
                "generation": snapshot.generation,
                "revision": revision,
                "digest": snapshot.digest,
                "endpoints": [f"{e.ip}:{e.port}" for e in snapshot.apiserver_endpoints],
                "changes": len(changes),
            },
        )

    def _snapshot(
        self, result: SnapshotResult, *, generation: int, changes: list[ObservedChange]
    ) -> EndpointSnapshot:
        return result.to_event(
            cluster=self.cluster,
            generation=generation,
            observed_at=datetime.fromtimestamp(self.clock(), UTC),
            # A change may name an object the view no longer has (a deleted slice).
            more_resource_versions=(c.versioned_ref for c in changes),
            more_trigger_times=(c.trigger_time for c in changes if c.trigger_time is not None),
        )

    def _forget_changes(self, covered: list[ObservedChange]) -> None:
        # Changes offered while we were writing stay for the next round.
        covered_ids = {id(c) for c in covered}
        self._changes = [c for c in self._changes if id(c) not in covered_ids]

    # -- warnings

    async def _emit_warnings(self, result: SnapshotResult) -> bool:
        """Emit each finding once while it lasts (again if it goes away and comes back), on
        the bus and as a Kubernetes Event. False when one of them failed (retried with the
        snapshot's backoff; what went out already is not sent again)."""
        current = {_finding_key(f): f for f in result.findings}
        self._warned_bus &= current.keys()
        self._warned_kube &= current.keys()
        # The duplicate window must drop a retried publish of a warning, but not the same
        # finding coming back after it went away (it would have the same text and, when the
        # endpoints did not change meanwhile, the same generation).
        self._warning_ids = {
            key: self._warning_ids.get(key) or secrets.token_hex(6) for key in current
        }
        ok = True
        for key, finding in sorted(current.items()):
            if key not in self._warned_bus:
                ok = await self._announce(key, finding) and ok
            if self.recorder is not None and key not in self._warned_kube:
                ok = await self._record(self.recorder, key, finding) and ok
        return ok

    async def _announce(self, key: tuple[str, str, str], finding: Finding) -> bool:
        warning = ClusterWarning(
            cluster=self.cluster,
            reason=finding.reason,
            message=finding.message,
            source=SOURCE,
            object_ref=finding.object_ref,
            generation=self.last_generation,
        )
        digest = hashlib.sha256("\x00".join(key).encode()).hexdigest()[:16]
        msg_id = f"{self.cluster}:warning:{digest}:{self.last_generation}:{self._warning_ids[key]}"
        try:
            await self.bus.publish(subjects.warnings_subject(self.cluster), warning, msg_id=msg_id)
        except BusError as exc:
            log.warning(
                "publishing a warning failed, will retry",
                extra={"reason": finding.reason, "error": str(exc)},
            )
            return False
        self._warned_bus.add(key)
        self.metrics.warnings.labels(finding.reason).inc()
        log.warning(
            "finding",
            extra={
                "reason": finding.reason,
                "object_ref": finding.object_ref,
                "detail": finding.message,
            },
        )
        return True

    async def _record(
        self, recorder: EventRecorder, key: tuple[str, str, str], finding: Finding
    ) -> bool:
        try:
            await recorder.record(finding)
        except Exception as exc:  # retried on the next round; never stops publishing
            log.warning(
                "recording a Kubernetes Event failed, will retry",
                extra={"reason": finding.reason, "error": str(exc)},
            )
            return False
        self._warned_kube.add(key)
        return True


def _same_view(a: SnapshotResult, b: SnapshotResult) -> bool:
    return (
        a.digest == b.digest
        and a.findings == b.findings
        and a.kube_proxy == b.kube_proxy
        and a.managed_provider == b.managed_provider
    )


def _same_data_plane_inputs(published: EndpointSnapshot, result: SnapshotResult) -> bool:
    """Whether the bucket already holds everything consumers act on: the endpoints (digest)
    and whether kube-proxy is managed by something else (the renderer then switches Felix's
    kube-proxy clean-up off). Other findings are warnings only, never a new generation."""
    return (
        published.digest == result.digest
        and published.kube_proxy.managed_by == result.kube_proxy.managed_by
    )


def _finding_key(finding: Finding) -> tuple[str, str, str]:
    return (finding.reason, finding.object_ref, finding.message)
