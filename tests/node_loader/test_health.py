"""health.py and desired.apply_health: probe streaks → health, health → programmed sets."""

from __future__ import annotations

import itertools

import pytest

from apilane.node_loader.desired import apply_health, desired_state, target_contents
from apilane.node_loader.health import BackendHealth, HealthPolicy, HealthTable, observe
from apilane.node_loader.memmaps import MemoryNatMaps
from apilane.node_loader.nat import BackendValue, FrontendKey, MapContents
from apilane.node_loader.plan import (
    Step,
    apply_step_to,
    check_invariants,
    dangling_references,
    plan,
)
from apilane.node_loader.reconcile import Outcome, Reconciler
from apilane.node_loader.testing import contents_of
from apilane.testing.snapshots import make_snapshot

pytestmark = [pytest.mark.unit]

A, B, C = (BackendValue(f"10.0.0.{i}", 6443) for i in (1, 2, 3))
D6 = BackendValue("fd00::1", 6443)
SNAPSHOT = make_snapshot(
    generation=1,
    services=("10.96.0.1:443", "10.96.0.2:443", "[fd00:96::1]:443"),
    apiservers=("10.0.0.1:6443", "10.0.0.2:6443", "10.0.0.3:6443", "[fd00::1]:6443"),
)


def test_policy_rejects_thresholds_below_one():
    with pytest.raises(ValueError, match="at least 1"):
        HealthPolicy(failures_to_fail=0)
    with pytest.raises(ValueError, match="at least 1"):
        HealthPolicy(passes_to_recover=0)


@pytest.mark.parametrize("k", [1, 2, 3, 5])
@pytest.mark.parametrize("m", [1, 2, 3])
def test_k_failures_in_a_row_fail_and_m_passes_in_a_row_recover(k, m):
    policy = HealthPolicy(failures_to_fail=k, passes_to_recover=m)
    state = BackendHealth()
    for n in range(1, k):
        state = observe(state, False, "refused", policy)
        assert state.healthy and state.failures == n
    # A pass in between resets the streak: k - 1 more failures still do not fail it.
    state = observe(state, True, "", policy)
    assert state.healthy and state.failures == 0
    for _ in range(k - 1):
        state = observe(state, False, "refused", policy)
    assert state.healthy
    state = observe(state, False, "timed out", policy)
    assert not state.healthy and state.last_error == "timed out"
    for n in range(1, m):
        state = observe(state, True, "", policy)
        assert not state.healthy and state.passes == n
    # A failure in between resets the passes.
    if m > 1:
        state = observe(state, False, "refused", policy)
        for _ in range(m - 1):
            state = observe(state, True, "", policy)
        assert not state.healthy
    state = observe(state, True, "", policy)
    assert state.healthy and state.passes >= 1 and state.last_error == ""


def test_every_result_sequence_matches_a_streak_reference():
    """All 2^8 result sequences against a direct streak count."""
    policy = HealthPolicy(failures_to_fail=3, passes_to_recover=2)
    for results in itertools.product((True, False), repeat=8):
        state, healthy = BackendHealth(), True
        for i, ok in enumerate(results):
            state = observe(state, ok, "" if ok else "x", policy)
            history = results[: i + 1]
            run = 0
            for r in reversed(history):
                if r != ok:
                    break
                run += 1
            if ok and run >= policy.passes_to_recover:
                healthy = True
            if not ok and run >= policy.failures_to_fail:
                healthy = False
            assert state.healthy == healthy, results[: i + 1]


def test_table_reports_transitions_and_forgets_untracked_backends():
    table = HealthTable(HealthPolicy(failures_to_fail=2, passes_to_recover=1))
    table.track([A, B])
    assert table.backends == (A, B) and table.unhealthy == frozenset()
    assert table.record(A, False, "refused") is None
    transition = table.record(A, False, "refused")
    assert transition is not None and not transition.healthy and transition.reason == "refused"
    assert table.unhealthy == {A}
    assert table.record(C, False, "refused") is None  # not tracked: dropped
    assert table.state(C) is None
    back = table.record(A, True)
    assert back is not None and back.healthy and back.reason == "passed"
    table.record(B, False, "x")
    table.record(B, False, "x")
    assert table.unhealthy == {B}
    # B leaves the snapshot and comes back: it starts healthy again.
    table.track([A])
    assert table.unhealthy == frozenset() and table.backends == (A,)
    table.track([A, B])
    state = table.state(B)
    assert state is not None and state.healthy and state.failures == 0


ALL = (A, B, C, D6)


@pytest.mark.parametrize(
    "unhealthy", [frozenset(c) for n in range(len(ALL) + 1) for c in itertools.combinations(ALL, n)]
)
def test_apply_health_for_every_subset_of_unhealthy_backends(unhealthy):
    desired = desired_state(SNAPSHOT)
    outcome = apply_health(desired, unhealthy)
    excluded: set[BackendValue] = set()
    for family, frontends in desired.frontends.items():
        for key, full in frontends.items():
            got = outcome.desired.frontends[family][key]
            healthy = tuple(b for b in full if b not in unhealthy)
            if healthy:
                assert got == healthy  # the healthy ones, in canonical order
                assert key not in outcome.fail_static
                excluded.update(b for b in full if b in unhealthy)
            else:
                assert got == full  # fail static: the full set, never empty
                assert key in outcome.fail_static
    assert set(outcome.excluded) == excluded
    assert outcome.desired.generation == desired.generation
    assert outcome.desired.held == desired.held


@pytest.mark.parametrize(
    ("before", "after"),
    [
        (frozenset(), frozenset({A})),
        (frozenset({A}), frozenset()),
        (frozenset({A}), frozenset({A, B})),
        (frozenset({A, B}), frozenset({A, B, C})),  # all fail: back to the full set
        (frozenset({A, B, C}), frozenset({C})),
        (frozenset({B}), frozenset({C})),
    ],
)
def test_health_changes_are_make_before_break(before, after):
    """Replayed element by element, the plan between two health states never leaves a
    frontend pointing at a missing ordinal, and ends consistent."""
    desired = desired_state(SNAPSHOT)
    start = target_contents(apply_health(desired, before).desired, {})
    target = target_contents(apply_health(desired, after).desired, start)
    steps = plan(target, start)
    state = {f: (dict(c.frontends), dict(c.backends)) for f, c in start.items()}
    for step in steps.steps:
        for single in _elements(step):
            frontends, backends = state[single.family]
            apply_step_to(single, frontends, backends)
            view = {f: MapContents(frontends=fe, backends=be) for f, (fe, be) in state.items()}
            assert dangling_references(view) == []
    final = {f: MapContents(frontends=fe, backends=be) for f, (fe, be) in state.items()}
    assert check_invariants(final) == []
    assert final == target


def _elements(step):
    step_type = Step
    for key, value in (step.backend_updates or {}).items():
        yield step_type(step.phase, step.operation, step.family, backend_updates={key: value})
    for fkey, fvalue in (step.frontend_updates or {}).items():
        yield step_type(step.phase, step.operation, step.family, frontend_updates={fkey: fvalue})
    for dkey in step.frontend_deletes:
        yield step_type(step.phase, step.operation, step.family, frontend_deletes=(dkey,))
    for bkey in step.backend_deletes:
        yield step_type(step.phase, step.operation, step.family, backend_deletes=(bkey,))


def _programmed(maps) -> dict[FrontendKey, set[BackendValue]]:
    result: dict[FrontendKey, set[BackendValue]] = {}
    for contents in contents_of(maps).values():
        for key, value in contents.frontends.items():
            result[key] = {
                b for k, b in contents.backends.items() if k.service_id == value.service_id
            }
    return result


def test_reconciler_programs_health_and_reports_removed_backends():
    maps = MemoryNatMaps()
    reconciler = Reconciler(maps=maps, cluster="default")
    assert reconciler.set_unhealthy(frozenset({A})) is None  # nothing applied yet
    assert reconciler.apply(SNAPSHOT).outcome is Outcome.APPLIED
    v4 = FrontendKey("10.96.0.1", 443)
    assert _programmed(maps)[v4] == {B, C}  # health known before the first apply counts

    result = reconciler.set_unhealthy(frozenset({A, B}))
    assert result is not None and result.outcome is Outcome.APPLIED
    assert _programmed(maps)[v4] == {C}
    assert result.removed_backends == (B,)
    assert result.health_excluded == (A, B)
    assert reconciler.set_unhealthy(frozenset({A, B})) is None  # no change, no apply

    # Every IPv4 backend fails: the full set (fail static); IPv6 is untouched.
    result = reconciler.set_unhealthy(frozenset({A, B, C}))
    assert result is not None and _programmed(maps)[v4] == {A, B, C}
    assert result.removed_backends == ()
    assert v4 in result.health_fail_static
    assert _programmed(maps)[FrontendKey("fd00:96::1", 443)] == {D6}

    # An audit does not undo health: the maps match the healthy target, no drift.
    reconciler.set_unhealthy(frozenset({C}))
    before = contents_of(maps)
    assert reconciler.audit() == []
    assert contents_of(maps) == before
    # A newer snapshot keeps the health filter.
    newer = make_snapshot(
        generation=2, apiservers=("10.0.0.2:6443", "10.0.0.3:6443"), services=("10.96.0.1:443",)
    )
    assert reconciler.apply(newer).outcome is Outcome.APPLIED
    assert _programmed(maps) == {v4: {B}}
