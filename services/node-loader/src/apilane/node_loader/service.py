"""The node-loader service: NATS in, NAT maps and connect-time programs out.

Start-up order (the data plane first, the bus second):
1. open the maps (compile and load the programs for `bpf`, or in-memory maps);
2. `Reconciler.recover()`: read the maps back, check invariants, bring them to the
   persisted applied state (no NATS needed);
3. decide the connect-time LB setting (APILANE_CONNECT_TIME_LB, or the operator's live switch
   recorded in the state file: precedence in settings.py), then attach the connect-time
   programs if it says on, detach them if off (control.py);
4. connect to NATS (`lifecycle.bus_session`: retrying for as long as it takes), apply the
   latest KV value, then watch the snapshot key and apply every new revision.

Stopping (SIGTERM) keeps the maps pinned and the programs attached: every connect() on
the node depends on them, and a loader restart or upgrade must not open a window without
translation. The programs are detached only when the connect-time LB is switched off
(setting at start, or live through the node's control subject; a live switch is persisted
and holds across restarts). With NATS down, nothing changes in the data plane; the KV watch
resubscribes and catches up when NATS is back. Removing apilane from a node is
`python -m apilane.node_loader uninstall` (uninstall.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from opentelemetry import trace
from prometheus_client import REGISTRY, CollectorRegistry

from apilane.model import events, subjects
from apilane.model.events import EndpointSnapshot, NodeState, WarningReason
from apilane.node_loader.control import ConnectTimeLb, ControlServer, ProgramsControl
from apilane.node_loader.metrics import LoaderMetrics
from apilane.node_loader.nat import BackendValue, NatMaps
from apilane.node_loader.reconcile import ApplyResult, Outcome, Reconciler
from apilane.node_loader.reporting import SOURCE, Reporter
from apilane.node_loader.settings import SERVICE_NAME, NodeLoaderSettings
from apilane.node_loader.statefile import StateFile
from apilane.runtime import tracing
from apilane.runtime.aio import Backoff, first_of
from apilane.runtime.bus import Bus, BusError, KvEntry
from apilane.runtime.lifecycle import bus_session
from apilane.runtime.serve import Health, ServiceContext

log = logging.getLogger(__name__)

_TICK = 1.0  # the housekeeping loop's period: liveness heartbeat, retries, state writes


@dataclass
class DataPlane:
    maps: NatMaps
    programs: ProgramsControl | None = None


def open_data_plane(settings: NodeLoaderSettings) -> DataPlane:
    """The maps (and programs, for `bpf`) the settings ask for. bcc is imported only here."""
    if settings.map_backend == "memory":
        from apilane.node_loader.memmaps import MemoryNatMaps

        return DataPlane(maps=MemoryNatMaps())
    from apilane.node_loader.programs import ConnectTimeLB

    lb = ConnectTimeLB(
        cgroup_path=Path(settings.cgroup_path),
        pin_dir=Path(settings.pin_dir),
        allow_root_cgroup=settings.allow_root_cgroup,
    )
    return DataPlane(maps=lb.nat_maps, programs=lb)


class NodeLoader:
    def __init__(
        self,
        *,
        settings: NodeLoaderSettings,
        data_plane: DataPlane,
        health: Health | None = None,
        registry: CollectorRegistry = REGISTRY,
        tracer: trace.Tracer | None = None,
    ) -> None:
        self.settings = settings
        self.cluster = settings.common.cluster
        self.node = settings.node_name
        self.data_plane = data_plane
        self.tracer = tracer or tracing.tracer("apilane.node_loader")
        self.reconciler = Reconciler(
            maps=data_plane.maps,
            cluster=self.cluster,
            state_file=StateFile(settings.state_file),
            tracer=self.tracer,
        )
        self.lb = ConnectTimeLb(
            env_value=settings.connect_time_lb,
            programs=data_plane.programs,
            reconciler=self.reconciler,
        )
        self.control = ControlServer(
            lb=self.lb,
            cluster=self.cluster,
            node=self.node,
            node_state=self.node_state,
            publish_state=self.write_node_state,
        )
        self.reporter = Reporter(cluster=self.cluster, node=self.node)
        self.metrics = LoaderMetrics(registry)
        self.registry = registry
        self.health = health or Health()
        self.bus: Bus | None = None
        self.maps_loaded = False
        self.first_reconcile_done = False
        self._heartbeat = time.monotonic()
        self._initial_revision = 0
        self._retry: EndpointSnapshot | None = None  # a snapshot whose map write failed
        self._retry_at = 0.0
        self._retry_backoff = Backoff(initial=0.5, maximum=30.0)
        self._state_due = 0.0
        self._audit_due = 0.0
        self.health.add_live("loop", lambda: time.monotonic() - self._heartbeat < 10 * _TICK + 5)
        self.health.add_ready("maps", lambda: self.maps_loaded)
        self.health.add_ready("programs", self.lb.ready)
        self.health.add_ready("first_reconcile", lambda: self.first_reconcile_done)

    @property
    def connect_time_lb(self) -> bool:
        return self.lb.enabled

    # -- lifecycle ---------------------------------------------------------------------------

    async def run(self, stopping: asyncio.Event) -> None:
        try:
            self._start_data_plane()
            async with bus_session(
                self._context(stopping), self.settings.common, client_name=f"{SOURCE}-{self.node}"
            ) as bus:
                if bus is None:
                    return  # stopped before NATS was there: the data plane stays as it is
                self.bus = self.reporter.bus = bus
                try:
                    await self._serve(stopping)
                finally:
                    # The maps stay pinned and the programs attached: see the module docstring.
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(self.write_node_state(), timeout=2.0)
        finally:
            self.lb.close()

    def _context(self, stopping: asyncio.Event) -> ServiceContext:
        return ServiceContext(
            name=SERVICE_NAME,
            settings=self.settings.common,
            stopping=stopping,
            health=self.health,
            registry=self.registry,
        )

    def _start_data_plane(self) -> None:
        result = self.reconciler.recover()
        self.metrics.count_violations(result.violations_before)
        self.metrics.generation.set(self.reconciler.applied_generation)
        log.info(
            "NAT maps recovered",
            extra={
                "generation": self.reconciler.applied_generation,
                "outcome": str(result.outcome),
                "entries_written": result.entries_written,
                "violations": [str(v) for v in result.violations_before],
                "reason": result.reason,
            },
        )
        self.maps_loaded = True
        self.lb.start()

    async def _serve(self, stopping: asyncio.Event) -> None:
        """The latest KV value first, then the watch, the heartbeat and the control subject."""
        if not await self._initial_reconcile(stopping):
            return
        control = await self.control.serve(self._bus)
        try:
            await first_of(self._watch(), self._housekeeping(stopping), stopping.wait())
        finally:
            with contextlib.suppress(Exception):
                await control.unsubscribe()

    @property
    def _bus(self) -> Bus:
        assert self.bus is not None, "only used once connected"
        return self.bus

    async def _initial_reconcile(self, stopping: asyncio.Event) -> bool:
        """Apply the latest KV value before watching: the state a fresh node must reach.
        False when stopped first."""
        backoff = Backoff(initial=0.2, maximum=5.0)
        key = subjects.snapshot_key(self.cluster)
        while True:
            try:
                entry = await self._bus.kv_get(subjects.SNAPSHOT_BUCKET, key)
            except BusError as exc:
                log.warning(
                    "cannot read the latest snapshot yet, retrying", extra={"error": str(exc)}
                )
                if await backoff.sleep(stopping):
                    return False
                continue
            if entry is not None:
                self._initial_revision = entry.revision
                await self.handle_entry(entry)
            else:
                await self.write_node_state()
            self.first_reconcile_done = True
            return True

    async def _watch(self) -> None:
        key = subjects.snapshot_key(self.cluster)
        async for entry in self._bus.watch_kv(subjects.SNAPSHOT_BUCKET, key):
            if entry.revision == self._initial_revision:
                continue  # the watch starts with the value the initial reconcile applied
            try:
                await self.handle_entry(entry)
            except Exception:  # a bug in handling one revision must not end the watch
                log.exception("handling a snapshot failed", extra={"revision": entry.revision})

    async def _housekeeping(self, stopping: asyncio.Event) -> None:
        """Liveness heartbeat, retry of a failed write, periodic NodeState and map audit."""
        interval = self.settings.node_state_interval
        self._state_due = self._audit_due = time.monotonic() + interval
        while not stopping.is_set():
            self._heartbeat = now = time.monotonic()
            if self._retry is not None and now >= self._retry_at:
                snapshot, self._retry = self._retry, None
                log.info("retrying a failed apply", extra={"generation": snapshot.generation})
                await self.apply_snapshot(snapshot, headers={})
            if now >= self._audit_due:
                self._audit_due = now + interval
                self._audit()
            if now >= self._state_due:
                await self.write_node_state()
            await first_of(stopping.wait(), timeout=min(_TICK, interval))

    def _audit(self) -> None:
        try:
            violations = self.reconciler.audit()
        except Exception:
            log.exception("auditing the NAT maps failed")
        else:
            self.metrics.count_violations(violations)

    # -- snapshots ---------------------------------------------------------------------------

    async def handle_entry(self, entry: KvEntry) -> None:
        """One KV revision of the snapshot key: decode, apply, report."""
        if entry.operation != "PUT":
            # A deleted or purged key is not an empty cluster: keep the maps (fail static).
            log.warning(
                "snapshot key deleted; keeping the maps", extra={"revision": entry.revision}
            )
            return
        try:
            snapshot = events.decode_snapshot(entry.value)
        except events.MalformedEvent as exc:
            await self._malformed(entry, exc)
            return
        await self.apply_snapshot(snapshot, headers=entry.headers, attrs=self._attrs(entry))

    async def _malformed(self, entry: KvEntry, exc: events.MalformedEvent) -> None:
        with tracing.consuming(
            self.tracer, "node-loader consume", entry.headers, self._attrs(entry)
        ) as span:
            span.set_status(trace.Status(trace.StatusCode.ERROR, str(exc)))
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

    def _attrs(self, entry: KvEntry) -> dict[str, str | int]:
        return {
            "messaging.system": "nats",
            "messaging.operation": "process",
            "messaging.destination.name": subjects.kv_subject(entry.bucket, entry.key),
            "apilane.kv.revision": entry.revision,
            "apilane.node": self.node,
        }

    async def apply_snapshot(
        self,
        snapshot: EndpointSnapshot,
        *,
        headers: dict[str, str],
        attrs: dict[str, str | int] | None = None,
    ) -> ApplyResult:
        span_attrs = {
            **(attrs or {}),
            "apilane.generation": snapshot.generation,
            "apilane.digest": snapshot.digest,
            "apilane.node": self.node,
        }
        with tracing.consuming(self.tracer, "node-loader consume", headers, span_attrs) as span:
            with self.tracer.start_as_current_span("apply") as apply_span:
                result = self.reconciler.apply(snapshot)
                apply_span.set_attribute("apilane.outcome", str(result.outcome))
                apply_span.set_attribute("entries_written", result.entries_written)
                if result.outcome in (Outcome.REJECTED, Outcome.FAILED):
                    apply_span.set_status(trace.Status(trace.StatusCode.ERROR, result.reason))
            span.set_attribute("apilane.outcome", str(result.outcome))
        await self._after_apply(snapshot, result)
        return result

    async def _after_apply(self, snapshot: EndpointSnapshot, result: ApplyResult) -> None:
        self.metrics.applies.labels(outcome=str(result.outcome)).inc()
        self.metrics.count_violations(result.violations_before)
        log_extra = _log_extra(snapshot, result)
        if result.outcome is Outcome.IGNORED:
            self.metrics.ignored.inc()
            log.info("snapshot ignored", extra=log_extra)
        elif result.outcome in (Outcome.REJECTED, Outcome.FAILED):
            log.warning("snapshot not applied; the maps keep the last good state", extra=log_extra)
            await self._not_applied(snapshot, result)
        else:
            log.info("snapshot applied", extra=log_extra)
            await self._applied(snapshot, result)

    async def _not_applied(self, snapshot: EndpointSnapshot, result: ApplyResult) -> None:
        self.metrics.failures.labels(reason=result.warning_reason or str(result.outcome)).inc()
        await self.reporter.warn(
            result.warning_reason or WarningReason.APPLY_FAILED,
            f"node {self.node} did not apply generation {snapshot.generation}: {result.reason}",
            snapshot.generation,
        )
        if result.outcome is Outcome.FAILED:
            self._retry = snapshot
            self._retry_at = time.monotonic() + self._retry_backoff.next_delay()
        await self.write_node_state()

    async def _applied(self, snapshot: EndpointSnapshot, result: ApplyResult) -> None:
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
        if result.removed_backends and self.settings.destroy_stale_sockets:
            await self._destroy_sockets(result.removed_backends)
        await self.write_node_state()

    async def _destroy_sockets(self, backends: tuple[BackendValue, ...]) -> None:
        """Close host sockets still connected to removed backends, so clients reconnect
        through the service address to a live one. Best effort: never fails the apply."""
        if self.data_plane.programs is None:
            return  # in-memory maps: no kernel socket was ever translated by us
        from apilane.node_loader import sockets

        try:
            # A netlink dump of every socket on a busy node: off the event loop.
            report = await asyncio.to_thread(
                sockets.destroy_connected, [sockets.Destination(b.ip, b.port) for b in backends]
            )
        except Exception as exc:
            log.warning("destroying sockets to removed backends failed", extra={"error": str(exc)})
            return
        if not report.supported:
            log.warning("cannot destroy sockets here", extra={"reason": report.reason})
            return
        self.metrics.sockets_destroyed.inc(report.destroyed)
        log.info(
            "destroyed sockets to removed backends",
            extra={
                "backends": [f"{b.ip}:{b.port}" for b in backends],
                "destroyed": report.destroyed,
                "already_gone": report.already_gone,
                "failures": report.failures,
            },
        )

    # -- reporting ---------------------------------------------------------------------------

    def node_state(self) -> NodeState:
        applied = self.reconciler.applied
        errors = [e for e in (self.reconciler.last_error, *self.lb.errors) if e]
        return NodeState(
            cluster=self.cluster,
            node=self.node,
            generation=self.reconciler.applied_generation,
            digest=self.reconciler.applied_digest,
            maps=self.reconciler.summary(),
            programs_attached=self.lb.attached(),
            connect_time_lb=self.lb.enabled,
            last_error="; ".join(errors),
            applied_at=applied.applied_at if applied else None,
        )

    async def write_node_state(self) -> None:
        interval = self.settings.node_state_interval
        self._state_due = time.monotonic() + interval
        if not await self.reporter.write_state(self.node_state()) and self.bus is not None:
            # NATS is down: the data plane does not care; try again soon.
            self._state_due = time.monotonic() + min(interval, 2.0)


def _log_extra(snapshot: EndpointSnapshot, result: ApplyResult) -> dict[str, Any]:
    return {
        "generation": snapshot.generation,
        "digest": snapshot.digest,
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


async def main(
    ctx: Any,
    *,
    settings: NodeLoaderSettings,
    data_plane_factory: Callable[[NodeLoaderSettings], DataPlane] = open_data_plane,
) -> None:
    """The body run by `runtime.serve`."""
    began = time.perf_counter()
    data_plane = data_plane_factory(settings)
    loader = NodeLoader(
        settings=settings, data_plane=data_plane, health=ctx.health, registry=ctx.registry
    )
    # Everything alive now (modules, bcc, the compiled program's tables) lives as long as
    # the process: move it out of the collector's reach. A full collection over it takes
    # ~20 ms, ten times the apply latency budget, whenever it happens to hit an apply.
    gc.collect()
    gc.freeze()
    log.info(
        "node-loader starting",
        extra={
            "node": settings.node_name,
            "map_backend": settings.map_backend,
            "pin_dir": settings.pin_dir,
            "state_file": str(settings.state_file),
            # The value in force is logged after recovery: a live switch may override this.
            "env_connect_time_lb": settings.connect_time_lb,
            "open_ms": round((time.perf_counter() - began) * 1000, 1),
        },
    )
    await loader.run(ctx.stopping)
