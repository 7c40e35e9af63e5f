"""The reconciler: snapshot → validate → desired → plan → NAT maps, fail static.

It owns the node's NAT maps through the `NatMaps` protocol and remembers the last snapshot
it applied completely. Rules:

- A snapshot at or below the applied generation is ignored (replays, a lagging KV watch).
- A snapshot that fails validation, or asks for no backend at all, never reaches the maps:
  the last good state stays and the result says why.
- Invariants are checked on the maps before and after every apply; a violation is
  repaired from the desired state (the plan diffs against what the maps really hold) and
  reported.
- The applied generation, digest and snapshot are written to a small JSON file AFTER the
  maps, atomically (write, fsync, rename). On start `recover()` reads the maps back and
  re-applies that snapshot if the maps differ from it (a `kill -9` mid-apply, a reboot
  that emptied bpffs, a foreign write), so the maps are consistent before the loader
  talks to NATS; the latest KV value is applied after that. The same file keeps the
  operator's live connect-time LB switch (`record_lb_switch`; precedence in settings.py).
- The seal a snapshot was accepted with (content digest, expiry, key) is kept with it:
  what the next value is judged against (admission.py), also after a restart. A refresh
  (same content, later expiry) only replaces the seal; expiry never changes the maps.

The kernel is not a database we can roll back: a map write that fails halfway leaves a
consistent (make-before-break) intermediate state, marks the cached view stale, and the
next apply or audit plans again from a fresh read-back.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum

import msgspec
from opentelemetry import trace

from apilane.model.events import EndpointSnapshot, Finding, MapSummary, WarningReason
from apilane.node_loader.desired import (
    InvalidSnapshot,
    apply_health,
    desired_state,
    target_contents,
)
from apilane.node_loader.nat import (
    FAMILIES,
    BackendValue,
    Family,
    FrontendKey,
    MapContents,
    NatMaps,
)
from apilane.node_loader.plan import (
    Operation,
    Plan,
    Step,
    Violation,
    check_invariants,
    plan,
    removed_backends,
    simulate,
)
from apilane.node_loader.settings import LiveLbSwitch
from apilane.node_loader.statefile import (
    AppliedState,
    PersistedState,
    Seal,
    StateFile,
    StateFileError,
)

log = logging.getLogger(__name__)


class Outcome(StrEnum):
    APPLIED = "applied"  # the maps were written
    UNCHANGED = "unchanged"  # valid and newer, but the maps already held it
    IGNORED = "ignored"  # at or below the applied generation
    REJECTED = "rejected"  # failed validation or empty: maps untouched
    FAILED = "failed"  # a map operation failed; the maps are consistent but not at target


@dataclass(frozen=True, slots=True)
class ApplyResult:
    outcome: Outcome
    generation: int
    digest: str
    reason: str = ""
    warning_reason: str = ""  # a WarningReason value when the outcome deserves a warning
    entries_written: int = 0
    steps: tuple[str, ...] = ()
    findings: tuple[Finding, ...] = ()
    held_families: Mapping[str, str] = field(default_factory=dict)
    violations_before: tuple[Violation, ...] = ()
    violations_after: tuple[Violation, ...] = ()
    removed_backends: tuple[BackendValue, ...] = ()
    # Backends of the snapshot left out because they failed their probes, and the frontends
    # that keep every backend because none passes (fail static).
    health_excluded: tuple[BackendValue, ...] = ()
    health_fail_static: tuple[FrontendKey, ...] = ()
    timings: Mapping[str, float] = field(default_factory=dict)  # seconds per stage
    finished_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    @property
    def repaired(self) -> tuple[Violation, ...]:
        after = set(self.violations_after)
        return tuple(v for v in self.violations_before if v not in after)

    @property
    def wrote_maps(self) -> bool:
        return self.entries_written > 0


def execute_step(maps: NatMaps, step: Step) -> None:
    """One batch call on the maps."""
    match step.operation:
        case Operation.UPDATE_BACKENDS:
            maps.update_backends(step.family, step.backend_updates or {})
        case Operation.UPDATE_FRONTENDS:
            maps.update_frontends(step.family, step.frontend_updates or {})
        case Operation.DELETE_FRONTENDS:
            maps.delete_frontends(step.family, step.frontend_deletes)
        case Operation.DELETE_BACKENDS:
            maps.delete_backends(step.family, step.backend_deletes)


def summarize(contents: Mapping[Family, MapContents]) -> MapSummary:
    by_family: dict[str, int] = {}
    services: set[tuple[str, int]] = set()
    frontends = backends = 0
    for family, maps in contents.items():
        frontends += len(maps.frontends)
        backends += len(maps.backends)
        by_family[f"{family}.frontends"] = len(maps.frontends)
        by_family[f"{family}.backends"] = len(maps.backends)
        services.update((family, v.service_id) for v in maps.frontends.values())
    return MapSummary(
        services=len(services), frontends=frontends, backends=backends, by_family=by_family
    )


class Reconciler:
    """Applies snapshots to one node's NAT maps. Synchronous: each map call is a syscall of
    microseconds, and the event loop calls it from one task only.

    The plan is made against a cached view of the maps: read back at start (`recover`),
    after any failed write, and by `audit()` (which the service runs periodically and which
    repairs drift). `verify_after_apply=True` also reads the maps back after every apply;
    off by default because a kernel map dump costs milliseconds, more than the apply.
    """

    def __init__(
        self,
        *,
        maps: NatMaps,
        cluster: str,
        state_file: StateFile | None = None,
        verify_after_apply: bool = False,
        tracer: trace.Tracer | None = None,
    ) -> None:
        self.maps = maps
        self.cluster = cluster
        self.state_file = state_file
        self.verify_after_apply = verify_after_apply
        self.tracer = tracer or trace.get_tracer("apilane.node_loader")
        self.applied: AppliedState | None = None
        # The operator's live connect-time LB switch and the issue time of the last control
        # request accepted, saved with every applied state.
        self.lb_switch: LiveLbSwitch | None = None
        self.control_issued_at: datetime | None = None
        # The applied state the file held at start, kept for saves made before `applied` is
        # set (a switch recorded while recovery failed must not erase it from the file).
        self._file_applied: AppliedState | None = None
        self.last_error = ""
        # Backends the prober found unhealthy: left out of the programmed sets (apply_health).
        self.unhealthy: frozenset[BackendValue] = frozenset()
        # What health did to the maps at the last apply: left out, and kept whole (fail static).
        self.health_excluded: tuple[BackendValue, ...] = ()
        self.health_fail_static: tuple[FrontendKey, ...] = ()
        self._backends_of: tuple[str, tuple[BackendValue, ...]] = ("", ())
        self._contents: dict[Family, MapContents] | None = None  # our view of the maps
        # The view whose invariants were last checked, and the result (see _check).
        self._checked: tuple[Mapping[Family, MapContents], list[Violation]] | None = None

    @property
    def applied_generation(self) -> int:
        return self.applied.generation if self.applied else 0

    @property
    def applied_digest(self) -> str:
        return self.applied.digest if self.applied else ""

    @property
    def accepted(self) -> AppliedState | None:
        """The highest snapshot accepted: the applied one, or the one the state file holds
        while recovery could not bring the maps to it. New snapshots are judged against it."""
        return self.applied or self._file_applied

    @property
    def seal(self) -> Seal | None:
        """The signature the applied snapshot was accepted with (the latest refresh's)."""
        return self.applied.seal if self.applied else None

    def stale(self, now: datetime) -> bool:
        """The maps hold a snapshot whose signature has expired (they keep it: fail static)."""
        seal = self.seal
        return seal is not None and now >= seal.expires_at

    def contents(self, *, refresh: bool = False) -> dict[Family, MapContents]:
        if refresh or self._contents is None:
            self._contents = {family: self.maps.dump(family) for family in FAMILIES}
        return self._contents

    def summary(self) -> MapSummary:
        return summarize(self.contents())

    # -- start -----------------------------------------------------------------------------

    def recover(self) -> ApplyResult:
        """On start: read the maps back, check them, and bring them to the persisted state.

        Runs before the loader talks to NATS, so the data plane is consistent even when
        NATS is down. Without a state file nothing is changed (there is no desired state
        to repair from); the first snapshot from NATS then repairs whatever is wrong.
        """
        violations = check_invariants(self.contents(refresh=True))
        persisted, problem = self._load_state_file()
        self.lb_switch = persisted.lb_switch if persisted is not None else None
        self.control_issued_at = persisted.control_issued_at if persisted is not None else None
        recorded = persisted.applied if persisted is not None else None
        self._file_applied = recorded
        if recorded is None:
            if violations:
                log.warning(
                    "NAT maps are inconsistent and there is no applied state to repair from",
                    extra={"violations": [str(v) for v in violations]},
                )
            self.last_error = problem
            return ApplyResult(
                outcome=Outcome.UNCHANGED,
                generation=0,
                digest="",
                reason=problem or "no applied state on this node yet",
                violations_before=tuple(violations),
                violations_after=tuple(violations),
            )
        result = self._apply(recorded.snapshot, trigger="recover", seal=recorded.seal)
        if result.outcome in (Outcome.APPLIED, Outcome.UNCHANGED):
            self.applied = recorded
        return result

    def _load_state_file(self) -> tuple[PersistedState | None, str]:
        """The persisted state, or None with the reason it could not be read."""
        if self.state_file is None:
            return None, ""
        try:
            return self.state_file.load(), ""
        except StateFileError as exc:
            return None, str(exc)

    def record_lb_switch(
        self, switch: LiveLbSwitch | None, *, control_issued_at: datetime | None = None
    ) -> None:
        """Keep (or, with None, drop) the live connect-time LB switch in the state file, next
        to the applied state, with the issue time of the control request that asked for it.
        Raises StateFileError; both are remembered either way."""
        self.lb_switch = switch
        if control_issued_at is not None:
            self.control_issued_at = control_issued_at
        if self.state_file is None:
            return
        applied = self.applied or self._file_applied
        if applied is None and switch is None and self.control_issued_at is None:
            # Nothing applied and nothing to keep: no file rather than an empty one.
            with contextlib.suppress(FileNotFoundError):
                self.state_file.remove()
            return
        self.state_file.save(PersistedState.of(applied, switch, self.control_issued_at))

    # -- apply -----------------------------------------------------------------------------

    def apply(self, snapshot: EndpointSnapshot, *, seal: Seal | None = None) -> ApplyResult:
        """Apply a snapshot from the bus (newer generations only), accepted with `seal`."""
        if snapshot.generation <= self.applied_generation:
            return ApplyResult(
                outcome=Outcome.IGNORED,
                generation=snapshot.generation,
                digest=snapshot.digest,
                reason=f"generation {snapshot.generation} is not newer than the applied "
                f"{self.applied_generation}",
            )
        return self._apply(snapshot, trigger="snapshot", seal=seal)

    def refresh(self, seal: Seal) -> str:
        """The applied snapshot, signed again with a later expiry: keep the maps as they are
        (no map write) and persist the new seal. Returns a problem or ""."""
        if self.applied is None:
            raise ValueError("nothing applied to refresh")
        current = self.applied.seal
        if current is not None and seal.expires_at <= current.expires_at:
            return ""  # an older signature of the same content: the held one lasts longer
        self.applied = msgspec.structs.replace(self.applied, seal=seal)
        return self._persist(self.applied)

    def reapply(self) -> ApplyResult | None:
        """Bring the maps back to the applied snapshot (an audit found drift)."""
        if self.applied is None:
            return None
        return self._apply(self.applied.snapshot, trigger="repair", seal=self.applied.seal)

    def snapshot_backends(self) -> tuple[BackendValue, ...]:
        """Every backend the applied snapshot programs (what the prober probes)."""
        applied = self.applied
        if applied is None:
            return ()
        if self._backends_of[0] != applied.digest:
            try:
                desired = desired_state(applied.snapshot, cluster=self.cluster)
            except InvalidSnapshot:
                return ()
            backends = {
                backend
                for frontends in desired.frontends.values()
                for members in frontends.values()
                for backend in members
            }
            self._backends_of = (applied.digest, tuple(sorted(backends)))
        return self._backends_of[1]

    def set_unhealthy(self, unhealthy: frozenset[BackendValue]) -> ApplyResult | None:
        """Program the applied snapshot without these backends (make-before-break, as any
        apply); None when nothing changed or nothing is applied yet."""
        if unhealthy == self.unhealthy:
            return None
        self.unhealthy = unhealthy
        if self.applied is None:
            return None
        return self._apply(self.applied.snapshot, trigger="health", seal=self.applied.seal)

    def audit(self) -> list[Violation]:
        """Read the maps back and check them; repair from the applied snapshot on drift."""
        contents = self.contents(refresh=True)
        violations = check_invariants(contents)
        drift = self.applied is not None and self._drifted(self.applied.snapshot, contents)
        if violations or drift:
            log.warning(
                "NAT maps drifted from the applied state; repairing",
                extra={"violations": [str(v) for v in violations], "drift": drift},
            )
            self.reapply()
        return violations

    def _drifted(self, snapshot: EndpointSnapshot, contents: dict[Family, MapContents]) -> bool:
        try:
            desired = desired_state(snapshot, cluster=self.cluster)
        except InvalidSnapshot:
            return False
        desired = apply_health(desired, self.unhealthy).desired
        return not plan(target_contents(desired, contents), contents).empty

    def _apply(self, snapshot: EndpointSnapshot, *, trigger: str, seal: Seal | None) -> ApplyResult:
        """Validate, plan against the cached view, write, verify, persist."""
        timings: dict[str, float] = {}
        clock = _Stopwatch(timings)
        with clock("validate"):
            try:
                desired = desired_state(snapshot, cluster=self.cluster)
            except InvalidSnapshot as exc:
                return self._rejected(snapshot, exc, timings)
            health = apply_health(desired, self.unhealthy)
            desired = health.desired
        with clock("plan"):
            before = self.contents()
            violations_before = self._check(before)
            target = target_contents(desired, before)
            steps = plan(target, before)
        with clock("write"):
            try:
                entries = self._write(steps)
            except Exception as exc:
                # Any failure of the map layer (OSError from bcc, a full map, a bad value).
                return self._failed(snapshot, exc, steps, violations_before, timings)
        with clock("verify"):
            after = self._view_after(steps, before)
            violations_after = self._check(after)
            mismatched = [f for f in target if after.get(f) != target[f]]
        problem = _problem(mismatched, violations_after)
        if not mismatched:
            self.health_excluded, self.health_fail_static = health.excluded, health.fail_static
            with clock("persist"):
                problem = problem or self._commit(snapshot, seal)
        self.last_error = problem
        timings["total"] = sum(timings.values())
        result = ApplyResult(
            outcome=(
                Outcome.FAILED if mismatched else Outcome.APPLIED if entries else Outcome.UNCHANGED
            ),
            generation=snapshot.generation,
            digest=snapshot.digest,
            reason=problem or (f"{trigger}: {entries} entries written" if entries else trigger),
            warning_reason=WarningReason.APPLY_FAILED if mismatched else "",
            entries_written=entries,
            steps=tuple(steps.describe()),
            findings=desired.findings,
            held_families={str(f): reason for f, reason in desired.held.items()},
            violations_before=tuple(violations_before),
            violations_after=tuple(violations_after),
            removed_backends=removed_backends(before, after),
            health_excluded=health.excluded,
            health_fail_static=health.fail_static,
            timings=timings,
        )
        _log_repairs(result)
        return result

    def _rejected(
        self, snapshot: EndpointSnapshot, exc: InvalidSnapshot, timings: dict[str, float]
    ) -> ApplyResult:
        self.last_error = f"generation {snapshot.generation} rejected: {exc}"
        return ApplyResult(
            outcome=Outcome.REJECTED,
            generation=snapshot.generation,
            digest=snapshot.digest,
            reason=str(exc),
            warning_reason=exc.reason,
            timings=timings,
        )

    def _failed(
        self,
        snapshot: EndpointSnapshot,
        exc: Exception,
        steps: Plan,
        violations_before: list[Violation],
        timings: dict[str, float],
    ) -> ApplyResult:
        # The maps hold a consistent intermediate state; read them back next time.
        self._contents = None
        self.last_error = f"generation {snapshot.generation} failed: {exc}"
        log.exception("applying the plan to the NAT maps failed")
        return ApplyResult(
            outcome=Outcome.FAILED,
            generation=snapshot.generation,
            digest=snapshot.digest,
            reason=str(exc),
            warning_reason=WarningReason.APPLY_FAILED,
            steps=tuple(steps.describe()),
            violations_before=tuple(violations_before),
            timings=timings,
        )

    def _view_after(
        self, steps: Plan, before: dict[Family, MapContents]
    ) -> dict[Family, MapContents]:
        after = self.contents(refresh=True) if self.verify_after_apply else simulate(steps, before)
        self._contents = after
        return after

    def _commit(self, snapshot: EndpointSnapshot, seal: Seal | None) -> str:
        """The maps hold `snapshot`: remember it and persist it. Returns a problem or ""."""
        self.applied = AppliedState(
            generation=snapshot.generation,
            digest=snapshot.digest,
            applied_at=datetime.now(UTC),
            snapshot=snapshot,
            seal=seal,
        )
        return self._persist(self.applied)

    def _persist(self, applied: AppliedState) -> str:
        if self.state_file is None:
            return ""
        try:
            self.state_file.save(PersistedState.of(applied, self.lb_switch, self.control_issued_at))
        except StateFileError as exc:
            # The maps are right; only a restart without NATS would miss it.
            log.warning("cannot persist the applied state", extra={"error": str(exc)})
            return str(exc)
        return ""

    def _check(self, contents: Mapping[Family, MapContents]) -> list[Violation]:
        """check_invariants, without repeating it on the very view it just checked: the
        view after one apply is the view before the next (immutable, replaced on every
        change or read-back), so each apply checks the maps once rather than twice."""
        if self._checked is not None and self._checked[0] is contents:
            return list(self._checked[1])
        violations = check_invariants(contents)
        self._checked = (contents, violations)
        return list(violations)

    def _write(self, steps: Plan) -> int:
        # Always one span, also for no writes, so every apply has the same trace shape.
        with self.tracer.start_as_current_span("map writes") as span:
            if span.is_recording():
                span.set_attribute("entries_written", steps.entries)
                span.set_attribute("steps", len(steps.steps))
            for step in steps.steps:
                execute_step(self.maps, step)
        return steps.entries


def _problem(mismatched: list[Family], violations_after: list[Violation]) -> str:
    if mismatched:
        return f"maps of {', '.join(mismatched)} differ from the target after the apply"
    return "; ".join(str(v) for v in violations_after)


def _log_repairs(result: ApplyResult) -> None:
    if result.repaired:
        log.warning(
            "repaired NAT map invariant violations",
            extra={
                "repaired": [str(v) for v in result.repaired],
                "generation": result.generation,
            },
        )


class _Stopwatch:
    """`with clock("stage"):` adds the block's duration to timings["stage"]. A plain class,
    not @contextmanager: a generator per stage cost more than some of the stages."""

    def __init__(self, timings: dict[str, float]) -> None:
        self.timings = timings
        self._stage = ""
        self._began = 0.0

    def __call__(self, stage: str) -> _Stopwatch:
        self._stage = stage
        return self

    def __enter__(self) -> None:
        self._began = time.perf_counter()

    def __exit__(self, *exc_info: object) -> None:
        elapsed = time.perf_counter() - self._began
        self.timings[self._stage] = self.timings.get(self._stage, 0.0) + elapsed
