"""The node-loader service: NATS in, NAT maps and connect-time programs out.

Start-up order (the data plane first, the bus second):
1. open the maps (compile and load the programs for `bpf`, or in-memory maps);
2. `Reconciler.recover()`: read the maps back, check invariants, bring them to the
   persisted applied state (no NATS needed);
3. decide the connect-time LB setting (APILANE_CONNECT_TIME_LB, or the operator's live switch
   recorded in the state file: precedence in settings.py), then attach the connect-time
   programs if it says on, detach them if off (control.py);
4. connect to NATS as this node's own identity (`lifecycle.bus_session`: retrying for as
   long as it takes), wait for the streams discovery creates, take the latest KV value, then follow the snapshot key (feed.py: its republished
   copies, or a KV watch) and take every new revision. Each value is
   verified and judged before anything else (admission.py, intake.py): only snapshots
   signed by a trusted key, newer than the one held, reach the reconciler.

Stopping (SIGTERM) keeps the maps pinned and the programs attached: every connect() on
the node depends on them, and a loader restart or upgrade must not open a window without
translation. The programs are detached only when the connect-time LB is switched off
(setting at start, or live through the node's control subject; a live switch is persisted
and holds across restarts). With NATS down, nothing changes in the data plane; the feed
catches up when NATS is back (feed.py). Removing apilane from a node is
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
from pathlib import Path
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from prometheus_client import REGISTRY, CollectorRegistry

from apilane.model import subjects
from apilane.model.events import NodeState
from apilane.node_loader.control import ConnectTimeLb, ControlServer, ProgramsControl
from apilane.node_loader.feed import snapshot_feed
from apilane.node_loader.health import HealthPolicy, HealthTable, Transition
from apilane.node_loader.heartbeat import Heartbeat
from apilane.node_loader.intake import SnapshotIntake, set_health_attributes
from apilane.node_loader.metrics import LoaderMetrics
from apilane.node_loader.nat import BackendValue, NatMaps
from apilane.node_loader.prober import HealthMonitor
from apilane.node_loader.reconcile import Reconciler
from apilane.node_loader.reporting import SOURCE, Reporter
from apilane.node_loader.settings import SERVICE_NAME, NodeLoaderSettings
from apilane.node_loader.sockets import ConnectionLookup
from apilane.node_loader.statefile import StateFile
from apilane.runtime import tracing
from apilane.runtime.aio import Backoff, first_of
from apilane.runtime.bus import Bus, BusError, KvEntry
from apilane.runtime.lifecycle import bus_session
from apilane.runtime.natsauth import Role
from apilane.runtime.serve import Health, ServiceContext

if TYPE_CHECKING:
    from apilane.node_loader.pinned import CompilerRun

log = logging.getLogger(__name__)

_TICK = 1.0  # the housekeeping loop's period: liveness heartbeat, retries, state writes


@dataclass
class DataPlane:
    maps: NatMaps
    programs: ProgramsControl | None = None
    # The connections made through a service address (with the programs): what socket
    # destruction matches against.
    connections: ConnectionLookup | None = None


def open_data_plane(
    settings: NodeLoaderSettings, *, compiling: CompilerRun | None = None
) -> DataPlane:
    """The maps (and programs, for `bpf`) the settings ask for. bcc is never imported in this
    process: a child compiles and loads (pinned.py), this one works on the pins.
    `compiling`: that child, when `__main__` started it early."""
    if settings.map_backend == "memory":
        from apilane.node_loader.memmaps import MemoryNatMaps

        return DataPlane(maps=MemoryNatMaps())
    from apilane.node_loader.pinned import PinnedLB

    lb = PinnedLB(
        cgroup_path=Path(settings.cgroup_path),
        pin_dir=Path(settings.pin_dir),
        allow_root_cgroup=settings.allow_root_cgroup,
        compiling=compiling,
        build_stamp=settings.build_stamp,
    )
    return DataPlane(maps=lb.nat_maps, programs=lb, connections=lb.connections)


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
        self.metrics = LoaderMetrics(registry)
        self.reporter = Reporter(cluster=self.cluster, node=self.node)
        self.control = self._control_server()
        self.intake = SnapshotIntake(
            reconciler=self.reconciler,
            trusted=settings.trusted(),
            metrics=self.metrics,
            reporter=self.reporter,
            tracer=self.tracer,
            publish_state=self.write_node_state,
            connections=data_plane.connections if settings.destroy_stale_sockets else None,
        )
        self.registry = registry
        probe = settings.probe
        self.backend_health = HealthTable(
            HealthPolicy(
                failures_to_fail=probe.failures_to_fail, passes_to_recover=probe.passes_to_recover
            )
        )
        self._health_changed = asyncio.Event()
        self._transitions: list[Transition] = []
        self.health = health or Health()
        self.bus: Bus | None = None
        self.maps_loaded = False
        self.first_reconcile_done = False
        self._heartbeat = time.monotonic()
        self._initial_revision = 0
        self._state_due = 0.0
        self._audit_due = 0.0
        self.heartbeat = Heartbeat(interval=settings.node_state_interval)
        self.health.add_live("loop", lambda: time.monotonic() - self._heartbeat < 10 * _TICK + 5)
        self.health.add_ready("maps", lambda: self.maps_loaded)
        self.health.add_ready("programs", self.lb.ready)
        self.health.add_ready("first_reconcile", lambda: self.first_reconcile_done)

    def _control_server(self) -> ControlServer:
        requests = self.metrics.control_requests
        return ControlServer(
            lb=self.lb,
            operators=self.settings.operators(),
            cluster=self.cluster,
            node=self.node,
            node_state=self.node_state,
            publish_state=self.write_node_state,
            count=lambda outcome: requests.labels(outcome=outcome).inc(),
        )

    @property
    def connect_time_lb(self) -> bool:
        return self.lb.enabled

    # -- lifecycle ---------------------------------------------------------------------------

    async def run(self, stopping: asyncio.Event) -> None:
        try:
            self._start_data_plane()
            # Discovery provisions the streams; this node's identity may only look them up.
            async with bus_session(
                self._context(stopping),
                self.settings.common,
                role=Role.NODE_LOADER,
                client_name=f"{SOURCE}-{self.node}",
                setup=Bus.wait_for_streams,
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
        await self.intake.check_expiry()  # now that a warning can reach the bus
        if not await self._initial_reconcile(stopping):
            return
        control = await self.control.serve(self._bus)
        try:
            await first_of(
                self._watch(), self._housekeeping(stopping), self._probe(), stopping.wait()
            )
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
        feed = snapshot_feed(
            self._bus,
            self.cluster,
            self.settings.snapshot_fanout,
            start_after=self._initial_revision,
        )
        async for entry in feed:
            if entry.revision == self._initial_revision:
                continue  # a watch starts with the value the initial reconcile applied
            try:
                await self.handle_entry(entry)
            except Exception:  # a bug in handling one revision must not end the feed
                log.exception("handling a snapshot failed", extra={"revision": entry.revision})

    async def _housekeeping(self, stopping: asyncio.Event) -> None:
        """Liveness heartbeat, retry of a failed write, periodic NodeState and map audit."""
        interval = self.settings.node_state_interval
        self._state_due = self._audit_due = time.monotonic() + interval
        while not stopping.is_set():
            self._heartbeat = now = time.monotonic()
            await self.intake.retry_if_due()
            if now >= self._audit_due:
                self._audit_due = now + interval
                self._audit()
            if await self.intake.check_expiry() or now >= self._state_due:
                await self.write_node_state()
            await first_of(stopping.wait(), timeout=min(_TICK, interval))

    def _audit(self) -> None:
        try:
            violations = self.reconciler.audit()
        except Exception:
            log.exception("auditing the NAT maps failed")
        else:
            self.metrics.count_violations(violations)

    # -- backend health ----------------------------------------------------------------------

    async def _probe(self) -> None:
        """Probe the applied snapshot's backends; reprogram when their health changes."""
        if not self.settings.probe.enabled:
            await asyncio.Event().wait()  # off: the maps follow the snapshots alone
        monitor = HealthMonitor(
            settings=self.settings.probe, table=self.backend_health, on_change=self._on_health
        )
        try:
            while True:
                monitor.track(self.reconciler.snapshot_backends())
                self._publish_health_metrics()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.settings.probe.interval):
                        await self._health_changed.wait()
                if self._health_changed.is_set():
                    self._health_changed.clear()
                    transitions, self._transitions = tuple(self._transitions), []
                    await self._program_health(transitions)
        finally:
            await monitor.close()

    def _on_health(self, transitions: tuple[Transition, ...]) -> None:
        self._transitions.extend(transitions)
        for transition in transitions:
            self.metrics.health_transitions.labels(
                backend=_name(transition.backend),
                to="healthy" if transition.healthy else "unhealthy",
            ).inc()
        self._health_changed.set()

    async def _program_health(self, transitions: tuple[Transition, ...]) -> None:
        """One trace per health change: the transitions as events, then the apply."""
        unhealthy = self.backend_health.unhealthy
        with self.tracer.start_as_current_span(
            "node-loader health",
            attributes={
                "apilane.node": self.node,
                "apilane.health.unhealthy": sorted(_name(b) for b in unhealthy),
            },
        ) as span:
            for transition in transitions:
                span.add_event(
                    "backend healthy" if transition.healthy else "backend unhealthy",
                    {"apilane.backend": _name(transition.backend), "reason": transition.reason},
                )
            try:
                result = self.reconciler.set_unhealthy(unhealthy)
            except Exception:  # a bug here must not end the probes
                log.exception("programming backend health failed")
                return
            if result is not None:
                span.set_attribute("apilane.outcome", str(result.outcome))
                span.set_attribute("entries_written", result.entries_written)
                set_health_attributes(span, result)
        self._publish_health_metrics()
        if result is not None:
            log.info(
                "backend health reprogrammed the maps",
                extra={
                    "unhealthy": sorted(_name(b) for b in unhealthy),
                    "outcome": str(result.outcome),
                    "entries_written": result.entries_written,
                    "removed": [_name(b) for b in result.removed_backends],
                    "fail_static": [f"{k.ip}:{k.port}" for k in result.health_fail_static],
                },
            )
            await self.intake.after_health_apply(result)
        await self.write_node_state()

    def _publish_health_metrics(self) -> None:
        states = self.backend_health.states()
        self.metrics.set_backend_health(
            {_name(b): s.healthy for b, s in states.items()},
            fail_static=bool(self.reconciler.health_fail_static),
        )

    async def handle_entry(self, entry: KvEntry) -> None:
        """One KV revision of the snapshot key: admit, apply or refresh, report."""
        await self.intake.handle(entry)

    # -- reporting ---------------------------------------------------------------------------

    def node_state(self) -> NodeState:
        applied = self.reconciler.applied
        seal = self.reconciler.seal
        errors = [
            e for e in (self.intake.refusal, self.reconciler.last_error, *self.lb.errors) if e
        ]
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
            snapshot_expires_at=seal.expires_at if seal else None,
            stale=self.reconciler.stale(self.intake.clock()),
            signed_by=seal.key_id if seal else "",
            unhealthy_backends=tuple(_name(b) for b in sorted(self.reconciler.unhealthy)),
            health_fail_static=bool(self.reconciler.health_fail_static),
        )

    async def write_node_state(self) -> None:
        """Write the NodeState if it changed or the heartbeat interval passed (heartbeat.py)."""
        interval = self.settings.node_state_interval
        state = self.node_state()
        now = time.monotonic()
        if not self.heartbeat.due(state, now):
            return
        self._state_due = now + interval
        if await self.reporter.write_state(state):
            self.heartbeat.written(state, now)
        elif self.bus is not None:
            # NATS is down: the data plane does not care; try again soon.
            self._state_due = time.monotonic() + min(interval, 2.0)


def _name(backend: BackendValue) -> str:
    return f"[{backend.ip}]:{backend.port}" if ":" in backend.ip else f"{backend.ip}:{backend.port}"


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
    # Everything alive now (modules, the pinned maps' tables and codecs) lives as long as
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
