"""The node-loader's Prometheus metrics, one registry per loader."""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from apilane.node_loader.plan import Violation

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class LoaderMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self._define_apply(registry)
        self._define_admission(registry)
        self._define_health(registry)

    def _define_apply(self, registry: CollectorRegistry) -> None:
        """What the reconciler did with the snapshots it was given."""
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

    def _define_admission(self, registry: CollectorRegistry) -> None:
        """What was let through to the reconciler, and the control subject."""
        self.ignored = Counter(
            "apilane_node_snapshots_ignored_total",
            "Snapshots at or below the applied generation: refused (rollback, equivocation) "
            "or taken as a refresh, never applied",
            registry=registry,
        )
        self.refused = Counter(
            "apilane_node_snapshots_refused_total",
            "Snapshots refused before they reached the maps, by reason (unsigned, "
            "unknown-key, bad-signature, mismatch, expired, not-yet-valid, rollback, "
            "equivocation)",
            ["reason"],
            registry=registry,
        )
        self.refreshes = Counter(
            "apilane_node_snapshot_refreshes_total",
            "The held snapshot signed again with a later expiry: taken without map writes",
            registry=registry,
        )
        self.stale = Gauge(
            "apilane_node_snapshot_stale",
            "1 while the maps hold a snapshot whose signature has expired (kept: fail static)",
            registry=registry,
        )
        self.expires_at = Gauge(
            "apilane_node_snapshot_expires_at_seconds",
            "When the held snapshot's signature expires, Unix time (0: unknown)",
            registry=registry,
        )
        self.control_requests = Counter(
            "apilane_node_control_requests_total",
            "Requests on the node's control subject: accepted, or the reason they were refused",
            ["outcome"],
            registry=registry,
        )

    def _define_health(self, registry: CollectorRegistry) -> None:
        """What the backend probes found."""
        self.backend_healthy = Gauge(
            "apilane_node_backend_healthy",
            "1 while the backend passes this node's probes, 0 while it is left out of the maps "
            "(or kept only because every backend fails: apilane_node_health_fail_static)",
            ["backend"],
            registry=registry,
        )
        self.health_transitions = Counter(
            "apilane_node_backend_health_transitions_total",
            "Backend health changes seen by this node's probes, by backend and new state",
            ["backend", "to"],
            registry=registry,
        )
        self.health_fail_static = Gauge(
            "apilane_node_health_fail_static",
            "1 while some frontend keeps all its backends because none passes the probes",
            registry=registry,
        )
        self._health_series: set[str] = set()

    def set_backend_health(self, healthy: Mapping[str, bool], *, fail_static: bool) -> None:
        """The gauges for exactly these backends; series of backends no longer probed go."""
        for backend in self._health_series - set(healthy):
            self.backend_healthy.remove(backend)
        for backend, ok in healthy.items():
            self.backend_healthy.labels(backend=backend).set(1 if ok else 0)
        self._health_series = set(healthy)
        self.health_fail_static.set(1 if fail_static else 0)

    def count_violations(self, violations: tuple[Violation, ...] | list[Violation]) -> None:
        for violation in violations:
            self.violations.labels(kind=str(violation.kind)).inc()
