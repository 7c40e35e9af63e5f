"""PURE: backend health from consecutive probe results (the prober in prober.py feeds it).

Each backend of the applied snapshot starts healthy (a new API server is programmed at once;
probing only ever takes one out). `failures_to_fail` failed probes in a row make it unhealthy,
`passes_to_recover` passed probes in a row make it healthy again; any other result resets the
opposite streak. What an unhealthy backend does to the maps is desired.py's `apply_health`:
it leaves the programmed set, unless every backend of its frontend is unhealthy (fail static).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

from apilane.node_loader.nat import BackendValue


@dataclass(frozen=True, slots=True)
class HealthPolicy:
    failures_to_fail: int = 3
    passes_to_recover: int = 1

    def __post_init__(self) -> None:
        if self.failures_to_fail < 1 or self.passes_to_recover < 1:
            raise ValueError("probe thresholds must be at least 1")


@dataclass(frozen=True, slots=True)
class BackendHealth:
    healthy: bool = True
    failures: int = 0  # consecutive failed probes
    passes: int = 0  # consecutive passed probes
    last_error: str = ""


@dataclass(frozen=True, slots=True)
class Transition:
    backend: BackendValue
    healthy: bool  # the new state
    reason: str  # the failing probe's error, or "passed"


def observe(state: BackendHealth, ok: bool, error: str, policy: HealthPolicy) -> BackendHealth:
    """The state after one probe result."""
    if ok:
        passes = state.passes + 1
        healthy = state.healthy or passes >= policy.passes_to_recover
        return BackendHealth(healthy=healthy, failures=0, passes=passes, last_error="")
    failures = state.failures + 1
    healthy = state.healthy and failures < policy.failures_to_fail
    return BackendHealth(healthy=healthy, failures=failures, passes=0, last_error=error)


class HealthTable:
    """The health of the backends being probed. Not thread-safe: one event loop owns it."""

    def __init__(self, policy: HealthPolicy) -> None:
        self.policy = policy
        self._states: dict[BackendValue, BackendHealth] = {}

    def track(self, backends: Iterable[BackendValue]) -> None:
        """Probe exactly these from now on: new ones start healthy, gone ones are forgotten
        (a backend that comes back in a later snapshot starts healthy again)."""
        wanted = set(backends)
        self._states = {b: self._states.get(b, BackendHealth()) for b in sorted(wanted)}

    @property
    def backends(self) -> tuple[BackendValue, ...]:
        return tuple(self._states)

    def record(self, backend: BackendValue, ok: bool, error: str = "") -> Transition | None:
        """One probe result; the transition when it changed the backend's health. A result for
        a backend no longer tracked (its probe was under way when the snapshot changed) is
        dropped."""
        state = self._states.get(backend)
        if state is None:
            return None
        new = observe(state, ok, error, self.policy)
        self._states[backend] = new
        if new.healthy == state.healthy:
            return None
        return Transition(backend=backend, healthy=new.healthy, reason=error or "passed")

    def state(self, backend: BackendValue) -> BackendHealth | None:
        return self._states.get(backend)

    @property
    def unhealthy(self) -> frozenset[BackendValue]:
        return frozenset(b for b, s in self._states.items() if not s.healthy)

    def states(self) -> dict[BackendValue, BackendHealth]:
        return {b: replace(s) for b, s in self._states.items()}
