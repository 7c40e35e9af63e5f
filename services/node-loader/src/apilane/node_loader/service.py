"""The node-loader service: NATS in, NAT maps and connect-time programs out.

Start-up order (the data plane first, the bus second):
1. open the maps (compile and load the programs for `bpf`, or in-memory maps);
2. `Reconciler.recover()`: read the maps back, check invariants, bring them to the
   persisted applied state (no NATS needed);
3. decide the connect-time LB setting (APILANE_CONNECT_TIME_LB, or the operator's live switch
   recorded in the state file: precedence in settings.py), then attach the connect-time
   programs if it says on, detach them if off;
4. connect to NATS (retrying for as long as it takes), apply the latest KV value, then
   watch the snapshot key and apply every new revision.

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import msgspec
from opentelemetry import trace
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from apilane.model import events, subjects
from apilane.model.events import ClusterWarning, EndpointSnapshot, NodeState, WarningReason
from apilane.node_loader.nat import BackendValue, NatMaps
from apilane.node_loader.reconcile import (
    ApplyResult,
    Outcome,
    Reconciler,
    StateFile,
    StateFileError,
)
from apilane.node_loader.settings import (
    LiveLbSwitch,
    NodeLoaderSettings,
    resolve_connect_time_lb,
)
from apilane.runtime import tracing
from apilane.runtime.bus import Bus, BusError, KvEntry
from apilane.runtime.serve import Health

log = logging.getLogger(__name__)

SOURCE = "node-loader"
_TICK = 1.0  # the housekeeping loop's period: liveness heartbeat, retries, state writes
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class ProgramsControl(Protocol):
    """What the service needs from `programs.ConnectTimeLB`."""

    def enable(self) -> None: ...

    def disable(self) -> None: ...

    def attached_programs(self) -> Sequence[Any]: ...

    def close(self) -> None: ...


@dataclass
class DataPlane:
    maps: NatMaps
    programs: ProgramsControl | None = None
    timings: dict[str, float] = field(default_factory=dict)  # cold-start stages, seconds


def open_data_plane(settings: NodeLoaderSettings) -> DataPlane:
    """The maps (and programs, for `bpf`) the settings ask for. bcc is imported only here."""
    began = time.perf_counter()
    if settings.map_backend == "memory":
        from apilane.node_loader.memmaps import MemoryNatMaps

        return DataPlane(maps=MemoryNatMaps(), timings={"open": time.perf_counter() - began})
    from apilane.node_loader.programs import ConnectTimeLB

    lb = ConnectTimeLB(
        cgroup_path=Path(settings.cgroup_path),
        pin_dir=Path(settings.pin_dir),
        allow_root_cgroup=settings.allow_root_cgroup,
    )
    return DataPlane(
        maps=lb.nat_maps, programs=lb, timings={"compile": time.perf_counter() - began}
    )


class ControlRequest(msgspec.Struct, frozen=True, kw_only=True):
    """A request on the node's control subject; the reply is the node's NodeState.
    An empty request only asks for the state. A live switch is persisted in the state file
    and holds across loader restarts until APILANE_CONNECT_TIME_LB changes or the LB is
    switched back (settings.py has the precedence rule)."""

    connect_time_lb: bool | None = None


class LoaderMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.programming_latency = Histogram(
            "apilane_node_programming_latency_seconds",
            "From the EndpointSlice change (trigger time, else observation) to the map write",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.apply_duration = Histogram(
            "apilane_node_apply_duration_seconds",
            "Time to validate, plan, write and verify one snapshot",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.applies = Counter(
            "apilane_node_applies_total",
            "Snapshots handled, by outcome",
            ["outcome"],
            registry=registry,
        )
        self.failures = Counter(
            "apilane_node_apply_failures_total",
            "Snapshots not applied: rejected, malformed or a failed map write",
            ["reason"],
            registry=registry,
        )
        self.ignored = Counter(
            "apilane_node_snapshots_ignored_total",
            "Snapshots at or below the applied generation",
            registry=registry,
        )
        self.entries_written = Counter(
            "apilane_node_map_entries_written_total",
            "Map elements written or deleted",
            registry=registry,
        )
        self.violations = Counter(
            "apilane_node_invariant_violations_total",
            "Map invariant violations found (and repaired where possible)",
            ["kind"],
            registry=registry,
        )
        self.generation = Gauge(
            "apilane_node_applied_generation",
            "The snapshot generation the maps hold",
            registry=registry,
        )
        self.sockets_destroyed = Counter(
            "apilane_node_sockets_destroyed_total",
            "Sockets destroyed because their backend was removed",
            registry=registry,
        )


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
        self.metrics = LoaderMetrics(registry)
        self.health = health or Health()
        self.connect_time_lb = settings.connect_time_lb
        self.bus: Bus | None = None
        self.maps_loaded = False
        self.first_reconcile_done = False
        self.programs_error = ""
        self.switch_error = ""  # a live switch that could not be persisted
        self._heartbeat = time.monotonic()
        self._initial_revision = 0
        self._retry: EndpointSnapshot | None = None  # a snapshot whose map write failed
        self._retry_at = 0.0
        self._retry_delay = 0.5
        self._state_due = 0.0
        self._audit_due = 0.0
        self.health.add_live("loop", lambda: time.monotonic() - self._heartbeat < 10 * _TICK + 5)
        self.health.add_ready("maps", lambda: self.maps_loaded)
        self.health.add_ready("programs", self._programs_ready)
        self.health.add_ready("first_reconcile", lambda: self.first_reconcile_done)

    # -- lifecycle ---------------------------------------------------------------------------

    async def run(self, stopping: asyncio.Event) -> None:
        try:
            self._start_data_plane()
            connect = asyncio.create_task(self._connect())
            stop_wait = asyncio.create_task(stopping.wait())
            done, _ = await asyncio.wait({connect, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
            if connect not in done:
                connect.cancel()
                with contextlib.suppress(asyncio.CancelledError, BusError):
                    await connect
                return
            stop_wait.cancel()
            self.bus = connect.result()
            await self._initial_reconcile(stopping)
            tasks = [
                asyncio.create_task(self._watch(), name="watch"),
                asyncio.create_task(self._housekeeping(stopping), name="housekeeping"),
            ]
            control = await self._serve_control()
            try:
                await stopping.wait()
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                if control is not None:
                    with contextlib.suppress(Exception):
                        await control.unsubscribe()
        finally:
            await self._shutdown()

    def _start_data_plane(self) -> None:
        result = self.reconciler.recover()
        self._count_violations(result)
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
        self._decide_lb_setting()
        self._apply_lb_setting()

    def _decide_lb_setting(self) -> None:
        """APILANE_CONNECT_TIME_LB or the persisted live switch: see settings.py."""
        env_value = self.settings.connect_time_lb
        recorded = self.reconciler.lb_switch
        decision = resolve_connect_time_lb(env_value=env_value, switch=recorded)
        self.connect_time_lb = decision.enabled
        log.info(
            "connect-time load balancer %s (%s)",
            "on" if decision.enabled else "off",
            decision.source,
            extra={
                "connect_time_lb": decision.enabled,
                "source": decision.source,
                "rule": decision.rule,
                "env_connect_time_lb": env_value,
                "live_switch": msgspec.to_builtins(recorded) if recorded else None,
            },
        )
        if decision.keep_switch != recorded:
            self._record_switch(decision.keep_switch)

    def _record_switch(self, switch: LiveLbSwitch | None) -> None:
        try:
            self.reconciler.record_lb_switch(switch)
            self.switch_error = ""
        except StateFileError as exc:
            # Applied live all the same; only a restart would fall back to the variable.
            self.switch_error = f"persisting the connect-time LB switch: {exc}"
            log.warning("cannot persist the connect-time LB switch", extra={"error": str(exc)})

    def _apply_lb_setting(self) -> None:
        programs = self.data_plane.programs
        if programs is None:
            return
        try:
            if self.connect_time_lb:
                programs.enable()
            else:
                programs.disable()
            self.programs_error = ""
        except Exception as exc:  # a kernel refusal must not kill the loader: report it
            self.programs_error = (
                f"{'attaching' if self.connect_time_lb else 'detaching'} programs: {exc}"
            )
            log.exception("changing the connect-time programs failed")

    def _programs_ready(self) -> bool:
        if self.data_plane.programs is None or not self.connect_time_lb:
            return True
        return not self.programs_error and bool(self.programs_attached())

    def programs_attached(self) -> tuple[str, ...]:
        programs = self.data_plane.programs
        if programs is None:
            return ()
        try:
            return tuple(
                sorted(str(getattr(p, "program", p)) for p in programs.attached_programs())
            )
        except Exception as exc:
            log.warning("cannot list attached programs", extra={"error": str(exc)})
            return ()

    async def _connect(self) -> Bus:
        bus = await Bus.connect(
            self.settings.common.nats_urls,
            name=f"{SOURCE}-{self.node}",
            auth=self.settings.common.nats_auth,
        )
        while True:
            try:
                # Discovery provisions the streams; this node's identity may only look them up.
                await bus.wait_for_streams()
                return bus
            except Exception as exc:  # JetStream not ready yet (cluster forming, restart)
                log.warning("cannot set up JetStream yet, retrying", extra={"error": str(exc)})
                await asyncio.sleep(1.0)

    async def _initial_reconcile(self, stopping: asyncio.Event) -> None:
        """Apply the latest KV value before watching: the state a fresh node must reach."""
        assert self.bus is not None
        delay = 0.2
        while not stopping.is_set():
            try:
                entry = await self.bus.kv_get(
                    subjects.SNAPSHOT_BUCKET, subjects.snapshot_key(self.cluster)
                )
            except BusError as exc:
                log.warning(
                    "cannot read the latest snapshot yet, retrying", extra={"error": str(exc)}
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), timeout=delay)
                delay = min(delay * 2, 5.0)
                continue
            if entry is not None:
                self._initial_revision = entry.revision
                await self.handle_entry(entry)
            else:
                await self.write_node_state()
            break
        self.first_reconcile_done = True

    async def _watch(self) -> None:
        assert self.bus is not None
        async for entry in self.bus.watch_kv(
            subjects.SNAPSHOT_BUCKET, subjects.snapshot_key(self.cluster)
        ):
            if entry.revision == self._initial_revision:
                continue  # the watch starts with the value the initial reconcile applied
            await self.handle_entry(entry)

    async def _housekeeping(self, stopping: asyncio.Event) -> None:
        """Liveness heartbeat, retry of a failed write, periodic NodeState and map audit."""
        interval = self.settings.node_state_interval
        now = time.monotonic()
        self._state_due = now + interval
        self._audit_due = now + interval
        while not stopping.is_set():
            self._heartbeat = now = time.monotonic()
            if self._retry is not None and now >= self._retry_at:
                snapshot, self._retry = self._retry, None
                log.info("retrying a failed apply", extra={"generation": snapshot.generation})
                await self.apply_snapshot(snapshot, headers={})
            if now >= self._audit_due:
                self._audit_due = now + interval
                try:
                    violations = self.reconciler.audit()
                except Exception:
                    log.exception("auditing the NAT maps failed")
                else:
                    for violation in violations:
                        self.metrics.violations.labels(kind=str(violation.kind)).inc()
            if now >= self._state_due:
                await self.write_node_state()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), timeout=min(_TICK, interval))

    async def _shutdown(self) -> None:
        # The maps stay pinned and the programs attached: see the module docstring.
        if self.bus is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.write_node_state(), timeout=2.0)
            await self.bus.drain()
        programs = self.data_plane.programs
        if programs is not None:
            with contextlib.suppress(Exception):
                programs.close()

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
            with tracing.consuming(
                self.tracer, "node-loader consume", entry.headers, self._attrs(entry)
            ) as span:
                span.set_status(trace.Status(trace.StatusCode.ERROR, str(exc)))
            log.warning(
                "malformed snapshot ignored", extra={"revision": entry.revision, "error": str(exc)}
            )
            self.metrics.failures.labels(reason=WarningReason.INVALID_SNAPSHOT).inc()
            self.metrics.applies.labels(outcome="malformed").inc()
            await self._warn(
                WarningReason.INVALID_SNAPSHOT,
                f"malformed snapshot at revision {entry.revision}: {exc}",
                0,
            )
            return
        await self.apply_snapshot(snapshot, headers=entry.headers, attrs=self._attrs(entry))

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
        self._count_violations(result)
        log_extra = {
            "generation": snapshot.generation,
            "digest": snapshot.digest,
            "outcome": str(result.outcome),
            "entries_written": result.entries_written,
            "reason": result.reason,
            "timings_ms": {k: round(v * 1000, 3) for k, v in result.timings.items()},
        }
        if result.outcome is Outcome.IGNORED:
            self.metrics.ignored.inc()
            log.info("snapshot ignored", extra=log_extra)
            return
        if result.outcome in (Outcome.REJECTED, Outcome.FAILED):
            self.metrics.failures.labels(reason=result.warning_reason or str(result.outcome)).inc()
            log.warning("snapshot not applied; the maps keep the last good state", extra=log_extra)
            await self._warn(
                result.warning_reason or WarningReason.APPLY_FAILED,
                f"node {self.node} did not apply generation {snapshot.generation}: {result.reason}",
                snapshot.generation,
            )
            if result.outcome is Outcome.FAILED:
                self._schedule_retry(snapshot)
            await self.write_node_state()
            return
        self._retry, self._retry_delay = None, 0.5
        self.metrics.apply_duration.observe(result.timings.get("total", 0.0))
        self.metrics.generation.set(self.reconciler.applied_generation)
        if result.outcome is Outcome.APPLIED:
            self.metrics.entries_written.inc(result.entries_written)
            for trigger in snapshot.trigger_times or (snapshot.observed_at,):
                latency = (result.finished_at - _aware(trigger)).total_seconds()
                self.metrics.programming_latency.observe(max(latency, 0.0))
        log.info("snapshot applied", extra=log_extra)
        for finding in result.findings:
            await self._warn(
                finding.reason, f"node {self.node}: {finding.message}", snapshot.generation
            )
        if result.removed_backends and self.settings.destroy_stale_sockets:
            await self._destroy_sockets(result.removed_backends)
        await self.write_node_state()

    def _schedule_retry(self, snapshot: EndpointSnapshot) -> None:
        self._retry = snapshot
        self._retry_at = time.monotonic() + self._retry_delay
        self._retry_delay = min(self._retry_delay * 2, 30.0)

    def _count_violations(self, result: ApplyResult) -> None:
        for violation in result.violations_before:
            self.metrics.violations.labels(kind=str(violation.kind)).inc()

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
        errors = [
            e for e in (self.reconciler.last_error, self.programs_error, self.switch_error) if e
        ]
        return NodeState(
            cluster=self.cluster,
            node=self.node,
            generation=self.reconciler.applied_generation,
            digest=self.reconciler.applied_digest,
            maps=self.reconciler.summary(),
            programs_attached=self.programs_attached(),
            connect_time_lb=self.connect_time_lb,
            last_error="; ".join(errors),
            applied_at=applied.applied_at if applied else None,
        )

    async def write_node_state(self) -> None:
        self._state_due = time.monotonic() + self.settings.node_state_interval
        if self.bus is None:
            return
        try:
            await self.bus.kv_put(
                subjects.NODE_STATE_BUCKET,
                subjects.node_state_key(self.cluster, self.node),
                self.node_state(),
                timeout=2.0,
            )
        except BusError as exc:
            # NATS is down: the data plane does not care; the next tick tries again.
            log.warning("cannot write the node state", extra={"error": str(exc)})
            self._state_due = time.monotonic() + min(self.settings.node_state_interval, 2.0)

    async def _warn(self, reason: str, message: str, generation: int) -> None:
        if self.bus is None:
            return
        warning = ClusterWarning(
            cluster=self.cluster,
            reason=str(reason),
            message=message,
            source=f"{SOURCE}/{self.node}",
            object_ref=f"Node/{self.node}",
            generation=generation,
        )
        try:
            await self.bus.publish(
                subjects.warnings_subject(self.cluster),
                warning,
                msg_id=f"{SOURCE}:{self.node}:{generation}:{reason}",
                timeout=2.0,
            )
        except BusError as exc:
            log.warning(
                "cannot publish a warning", extra={"error": str(exc), "reason": str(reason)}
            )

    # -- control -----------------------------------------------------------------------------

    async def _serve_control(self) -> Any:
        """Request/reply on the node's control subject: a switch is an operator action, and the
        reply (the node state afterwards) says whether it worked."""
        assert self.bus is not None
        decoder = msgspec.json.Decoder(ControlRequest)

        async def on_request(data: bytes) -> bytes:
            try:
                request = decoder.decode(data) if data else ControlRequest()
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                return msgspec.json.encode({"error": f"bad control request: {exc}"})
            if (
                request.connect_time_lb is not None
                and request.connect_time_lb != self.connect_time_lb
            ):
                self.set_connect_time_lb(request.connect_time_lb)
                await self.write_node_state()
            return events.encode(self.node_state())

        return await self.bus.serve_requests(
            subjects.node_control_subject(self.cluster, self.node), on_request
        )

    def set_connect_time_lb(self, enabled: bool) -> None:
        """Switch the connect-time LB live: programs attached or detached, maps kept. The
        choice is persisted; switching back to APILANE_CONNECT_TIME_LB clears the record."""
        env_value = self.settings.connect_time_lb
        log.warning(
            "switching the connect-time load balancer",
            extra={"enabled": enabled, "env_connect_time_lb": env_value},
        )
        self.connect_time_lb = enabled
        self._apply_lb_setting()
        self._record_switch(
            None
            if enabled == env_value
            else LiveLbSwitch(enabled=enabled, env_value=env_value, switched_at=datetime.now(UTC))
        )


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
