"""plan.py: make-before-break ordering, minimal writes, invariants; with property tests."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apilane.node_loader.desired import DesiredState, target_contents
from apilane.node_loader.nat import (
    BackendKey,
    BackendValue,
    FrontendKey,
    FrontendValue,
    MapContents,
)
from apilane.node_loader.plan import (
    Operation,
    Phase,
    ViolationKind,
    apply_step_to,
    check_invariants,
    dangling_references,
    plan,
    removed_backends,
    simulate,
)

pytestmark = [pytest.mark.unit]

FE_A = FrontendKey("10.96.0.1", 443)
FE_B = FrontendKey("10.96.0.2", 443)
FE6 = FrontendKey("fd00::1", 443)
B1, B2, B3 = (
    BackendValue("10.0.0.1", 6443),
    BackendValue("10.0.0.2", 6443),
    BackendValue("10.0.0.3", 6443),
)
B6 = BackendValue("fd00::a", 6443)


def contents(frontends=None, backends=None) -> MapContents:
    return MapContents(frontends=dict(frontends or {}), backends=dict(backends or {}))


def programmed(frontends, backends_by_id):
    """Contents where each frontend (key → id) leads to the given backends."""
    fe = {}
    be = {}
    for key, service_id in frontends.items():
        members = backends_by_id[service_id]
        fe[key] = FrontendValue(service_id, len(members))
        for ordinal, backend in enumerate(members):
            be[BackendKey(service_id, ordinal)] = backend
    return contents(fe, be)


def desired(**families) -> DesiredState:
    return DesiredState(generation=1, digest="", frontends=families)


def test_nothing_to_do_when_the_maps_already_match():
    actual = {"IPv4": programmed({FE_A: 1}, {1: (B1, B2)})}
    target = target_contents(desired(IPv4={FE_A: (B1, B2)}), actual)
    assert plan(target, actual).empty


def test_first_programming_writes_backends_then_frontends():
    target = target_contents(desired(IPv4={FE_A: (B1, B2)}, IPv6={FE6: (B6,)}), {})
    steps = plan(target, {}).steps
    assert [(s.phase, s.operation, s.family) for s in steps] == [
        (Phase.MAKE, Operation.UPDATE_BACKENDS, "IPv4"),
        (Phase.MAKE, Operation.UPDATE_BACKENDS, "IPv6"),
        (Phase.SWITCH, Operation.UPDATE_FRONTENDS, "IPv4"),
        (Phase.SWITCH, Operation.UPDATE_FRONTENDS, "IPv6"),
    ]
    assert plan(target, {}).entries == 5


@pytest.mark.parametrize(
    ("before", "after", "expected"),
    [
        # (backends before, backends after, [(phase, op, size)])
        ((B1,), (B1, B2), [("make", "update_backends", 2), ("switch", "update_frontends", 1), ("break", "delete_backends", 1)]),
        ((B1, B2, B3), (B1, B3), [("make", "update_backends", 2), ("switch", "update_frontends", 1), ("break", "delete_backends", 3)]),
        ((B1, B2), (B3,), [("make", "update_backends", 1), ("switch", "update_frontends", 1), ("break", "delete_backends", 2)]),
    ],
    ids=["scale-out", "scale-in", "replace-all"],
)  # fmt: skip
def test_a_changed_set_is_made_under_a_fresh_id_then_switched_then_broken(before, after, expected):
    actual = {"IPv4": programmed({FE_A: 1}, {1: before})}
    target = target_contents(desired(IPv4={FE_A: after}), actual)
    steps = plan(target, actual).steps
    assert [(s.phase, s.operation, s.size) for s in steps] == expected
    # The make phase never writes under an id a frontend references.
    referenced = {v.service_id for v in actual["IPv4"].frontends.values()}
    assert all(k.service_id not in referenced for k in steps[0].backend_updates)


def test_removed_frontend_is_deleted_before_its_backends():
    actual = {"IPv4": programmed({FE_A: 1, FE_B: 2}, {1: (B1,), 2: (B1,)})}
    target = target_contents(desired(IPv4={FE_A: (B1,)}), actual)
    steps = plan(target, actual).steps
    assert [(s.operation, s.size) for s in steps] == [
        (Operation.DELETE_FRONTENDS, 1),
        (Operation.DELETE_BACKENDS, 1),
    ]


def test_families_absent_from_the_target_are_not_touched():
    actual = {"IPv6": programmed({FE6: 1}, {1: (B6,)})}
    target = target_contents(desired(IPv4={FE_A: (B1,)}), actual)  # IPv6 held
    assert {s.family for s in plan(target, actual).steps} == {"IPv4"}


def test_an_empty_family_target_clears_that_family():
    actual = {"IPv6": programmed({FE6: 1}, {1: (B6,)})}
    target = target_contents(desired(IPv6={}), actual)
    assert simulate(plan(target, actual), actual)["IPv6"] == contents()


def test_removed_backends_are_those_no_frontend_leads_to_any_more():
    before = {"IPv4": programmed({FE_A: 1}, {1: (B1, B2)})}
    after = {"IPv4": programmed({FE_A: 2}, {2: (B2, B3)})}
    assert removed_backends(before, after) == (B1,)


# --- invariants --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("maps", "kinds"),
    [
        (programmed({FE_A: 1, FE_B: 2}, {1: (B1,), 2: (B2,)}), []),
        (contents({FE_A: FrontendValue(1, 1), FE_B: FrontendValue(1, 1)}, {BackendKey(1, 0): B1}), [ViolationKind.DUPLICATE_ID]),
        (contents({FE_A: FrontendValue(1, 0)}), [ViolationKind.EMPTY_FRONTEND]),
        (contents({FE_A: FrontendValue(1, 2)}, {BackendKey(1, 0): B1}), [ViolationKind.COUNT_MISMATCH, ViolationKind.DANGLING_ORDINAL]),
        (contents({FE_A: FrontendValue(1, 1)}, {BackendKey(1, 0): B1, BackendKey(1, 1): B2}), [ViolationKind.COUNT_MISMATCH]),
        (contents({FE_A: FrontendValue(1, 2)}, {BackendKey(1, 0): B1, BackendKey(1, 5): B2}), [ViolationKind.COUNT_MISMATCH, ViolationKind.DANGLING_ORDINAL]),
        (contents({FE_A: FrontendValue(1, 1)}, {BackendKey(1, 0): B1, BackendKey(9, 0): B2}), [ViolationKind.ORPHAN_BACKENDS]),
        (contents({FE_A: FrontendValue(1, 1)}, {BackendKey(1, 0): B6}), [ViolationKind.WRONG_FAMILY]),
        (contents({FE6: FrontendValue(1, 1)}, {BackendKey(1, 0): B1}), [ViolationKind.WRONG_FAMILY]),
    ],
    ids=["consistent", "duplicate-id", "count-0", "dangling", "stale-extra", "gap", "orphan", "wrong-family-backend", "wrong-family-frontend"],
)  # fmt: skip
def test_check_invariants(maps, kinds):
    violations = check_invariants({"IPv4": maps})
    assert sorted(v.kind for v in violations) == sorted(kinds), violations
    assert all(v.family == "IPv4" and str(v) for v in violations)


@pytest.mark.parametrize(
    "broken",
    [
        contents({FE_A: FrontendValue(1, 1), FE_B: FrontendValue(1, 1)}, {BackendKey(1, 0): B1}),
        contents({FE_A: FrontendValue(1, 3)}, {BackendKey(1, 0): B1}),
        contents({FE_A: FrontendValue(1, 0)}, {BackendKey(1, 0): B3}),
        contents({FE_A: FrontendValue(1, 1)}, {BackendKey(1, 0): B1, BackendKey(1, 1): B2, BackendKey(7, 0): B3}),
        contents({FE6: FrontendValue(1, 1)}, {BackendKey(1, 0): B6}),
    ],
    ids=["duplicate-id", "dangling", "count-0", "stale-and-orphan", "wrong-family"],
)  # fmt: skip
def test_planning_against_broken_maps_repairs_them(broken):
    actual = {"IPv4": broken}
    want = {FE_A: (B1, B2), FE_B: (B1, B2)}
    target = target_contents(desired(IPv4=want), actual)
    steps = plan(target, actual)
    after = simulate(steps, actual)
    assert check_invariants(after) == []
    assert after["IPv4"] == target["IPv4"]


# --- properties --------------------------------------------------------------------------

ips4 = st.integers(1, 40).map(lambda n: f"10.0.0.{n}")
ips6 = st.integers(1, 40).map(lambda n: f"fd00::{n:x}")
ports = st.sampled_from([443, 6443, 8443])
frontends4 = st.builds(
    FrontendKey,
    st.integers(1, 4).map(lambda n: f"10.96.0.{n}"),
    st.sampled_from([443, 53]),
    st.sampled_from([6, 17]),
)
frontends6 = st.builds(
    FrontendKey,
    st.integers(1, 4).map(lambda n: f"fd00:96::{n}"),
    st.sampled_from([443, 53]),
    st.sampled_from([6, 17]),
)


@st.composite
def family_desired(draw, frontends, ips):
    keys = draw(st.sets(frontends, max_size=4))
    backends = tuple(
        sorted(draw(st.sets(st.builds(BackendValue, ips, ports), min_size=1, max_size=6)))
    )
    return {key: backends for key in keys}


desired_states = st.builds(
    lambda v4, v6: desired(IPv4=v4, IPv6=v6),
    family_desired(frontends4, ips4),
    family_desired(frontends6, ips6),
)


@st.composite
def arbitrary_maps(draw):
    """Any junk the maps could hold after a crash or a foreign writer (right families)."""
    result = {}
    for family, fronts, ips in (("IPv4", frontends4, ips4), ("IPv6", frontends6, ips6)):
        fe = draw(
            st.dictionaries(
                fronts, st.builds(FrontendValue, st.integers(1, 6), st.integers(0, 4)), max_size=4
            )
        )
        be = draw(
            st.dictionaries(
                st.builds(BackendKey, st.integers(1, 6), st.integers(0, 5)),
                st.builds(BackendValue, ips, ports),
                max_size=10,
            )
        )
        result[family] = contents(fe, be)
    return result


def replay_elementwise(steps, actual, *, reverse_within_batches: bool):
    """Apply a plan one element at a time and yield the maps after each element."""
    state = {f: (dict(c.frontends), dict(c.backends)) for f, c in actual.items()}
    for step in steps.steps:
        items = []
        items += [("be", k, v) for k, v in (step.backend_updates or {}).items()]
        items += [("fe", k, v) for k, v in (step.frontend_updates or {}).items()]
        items += [("fe-del", k, None) for k in step.frontend_deletes]
        items += [("be-del", k, None) for k in step.backend_deletes]
        if reverse_within_batches:
            items.reverse()
        fe, be = state.setdefault(step.family, ({}, {}))
        for kind, key, value in items:
            if kind == "be":
                be[key] = value
            elif kind == "fe":
                fe[key] = value
            elif kind == "fe-del":
                fe.pop(key, None)
            else:
                be.pop(key, None)
            yield {f: contents(a, b) for f, (a, b) in state.items()}


@settings(max_examples=300, deadline=None)
@given(st.lists(desired_states, min_size=1, max_size=6), st.booleans())
def test_any_sequence_of_changes_never_exposes_a_dangling_ordinal(sequence, reverse):
    actual = {"IPv4": contents(), "IPv6": contents()}
    for want in sequence:
        target = target_contents(want, actual)
        steps = plan(target, actual)
        for intermediate in replay_elementwise(steps, actual, reverse_within_batches=reverse):
            assert dangling_references(intermediate) == []
        after = simulate(steps, actual)
        assert after == target
        assert check_invariants(after) == []
        # A second plan from the result is empty: minimal and idempotent.
        assert plan(target_contents(want, after), after).empty
        actual = after


@settings(max_examples=300, deadline=None)
@given(arbitrary_maps(), desired_states)
def test_any_broken_maps_are_repaired_to_the_desired_state(broken, want):
    target = target_contents(want, broken)
    steps = plan(target, broken)
    after = simulate(steps, broken)
    assert after == target
    assert check_invariants(after) == []
    # Frontends that were consistent before stay consistent during the repair.
    fine_before = {
        (f, k)
        for f, c in broken.items()
        for k, v in c.frontends.items()
        if v.count and all(BackendKey(v.service_id, o) in c.backends for o in range(v.count))
    }
    for intermediate in replay_elementwise(steps, broken, reverse_within_batches=False):
        for family, key in fine_before:
            value = intermediate[family].frontends.get(key)
            if value is not None:
                assert all(
                    BackendKey(value.service_id, o) in intermediate[family].backends
                    for o in range(value.count)
                ), (family, key)


def test_ids_stay_bounded_over_many_changes():
    actual = {"IPv4": contents()}
    sets = [(B1,), (B1, B2), (B2,), (B2, B3), (B1, B2, B3)]
    for backends in itertools.islice(itertools.cycle(sets), 100):
        target = target_contents(desired(IPv4={FE_A: backends, FE_B: backends}), actual)
        actual = simulate(plan(target, actual), actual)
    assert max(v.service_id for v in actual["IPv4"].frontends.values()) <= 4


def test_apply_step_to_matches_simulate():
    actual = {"IPv4": programmed({FE_A: 1}, {1: (B1,)})}
    target = target_contents(desired(IPv4={FE_A: (B2,)}), actual)
    steps = plan(target, actual)
    fe, be = dict(actual["IPv4"].frontends), dict(actual["IPv4"].backends)
    for step in steps.steps:
        apply_step_to(step, fe, be)
    assert contents(fe, be) == simulate(steps, actual)["IPv4"]


def test_removed_backends_follow_counts_not_stale_ordinals_and_shared_ids():
    # Id 1 is shared by two frontends (a violation the reconciler repairs): ordinals below
    # either count are reachable. Ordinal 2 of id 2 is beyond its count: never reachable.
    before = {
        "IPv4": contents(
            {FE_A: FrontendValue(1, 1), FE_B: FrontendValue(1, 2), FE6: FrontendValue(2, 1)},
            {
                BackendKey(1, 0): B1,
                BackendKey(1, 1): B2,
                BackendKey(2, 0): B3,
                BackendKey(2, 2): B6,
                BackendKey(9, 0): BackendValue("10.0.0.9", 6443),  # orphan
            },
        )
    }
    after = {"IPv4": contents()}
    assert removed_backends(before, after) == (B1, B2, B3)
