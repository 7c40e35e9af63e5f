"""The reconciler on MemoryNatMaps: fail static, generations, invariants, the state file."""

from __future__ import annotations

import json
import shutil

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apilane.node_loader.memmaps import MapWriteError, MemoryNatMaps, render, render_resolved
from apilane.node_loader.nat import BackendKey, BackendValue, FrontendKey, FrontendValue
from apilane.node_loader.plan import check_invariants, dangling_references
from apilane.node_loader.reconcile import Outcome, Reconciler
from apilane.node_loader.statefile import StateFile
from apilane.node_loader.testing import check_nat_maps_contract, contents_of
from apilane.testing.snapshots import make_snapshot

pytestmark = [pytest.mark.unit]

HA3 = ("10.0.0.1:6443", "10.0.0.2:6443", "10.0.0.3:6443")


@pytest.fixture
def maps() -> MemoryNatMaps:
    return MemoryNatMaps()


@pytest.fixture
def state_file(tmp_path) -> StateFile:
    return StateFile(tmp_path / "pins" / "node-loader-state.json")


@pytest.fixture(params=[False, True], ids=["cached-view", "read-back"])
def reconciler(request, maps, state_file) -> Reconciler:
    return Reconciler(
        maps=maps, cluster="default", state_file=state_file, verify_after_apply=request.param
    )


def test_memory_maps_honour_the_nat_maps_contract(maps):
    check_nat_maps_contract(maps)


def test_memory_maps_refuse_what_the_kernel_maps_cannot_hold():
    maps = MemoryNatMaps(max_entries=1)
    with pytest.raises(MapWriteError, match="IPv6, not IPv4"):
        maps.update_frontends("IPv4", {FrontendKey("fd00::1", 443): FrontendValue(1, 1)})
    with pytest.raises(MapWriteError, match="32 bits"):
        maps.update_backends("IPv4", {BackendKey(2**32, 0): BackendValue("10.0.0.1", 1)})
    maps.update_backends("IPv4", {BackendKey(1, 0): BackendValue("10.0.0.1", 1)})
    maps.update_backends("IPv4", {BackendKey(1, 0): BackendValue("10.0.0.2", 1)})  # replace: fine
    with pytest.raises(MapWriteError, match="map full"):
        maps.update_backends("IPv4", {BackendKey(1, 1): BackendValue("10.0.0.1", 1)})


def test_first_snapshot_programs_the_maps(reconciler, maps):
    result = reconciler.apply(make_snapshot(generation=1, apiservers=HA3))
    assert result.outcome is Outcome.APPLIED
    assert result.entries_written == 4
    assert render(contents_of(maps)) == [
        "IPv4 fe 10.96.0.1:443/6 -> id=1 count=3 flags=0",
        "IPv4 be id=1 #0 -> 10.0.0.1:6443",
        "IPv4 be id=1 #1 -> 10.0.0.2:6443",
        "IPv4 be id=1 #2 -> 10.0.0.3:6443",
    ]
    assert reconciler.applied_generation == 1
    assert set(result.timings) >= {"validate", "plan", "write", "verify", "persist", "total"}


def test_replacing_one_backend_switches_to_a_fresh_id_and_reports_the_removed_one(reconciler, maps):
    reconciler.apply(make_snapshot(generation=1, apiservers=HA3))
    result = reconciler.apply(
        make_snapshot(generation=2, apiservers=("10.0.0.1:6443", "10.0.0.2:6443", "10.0.0.4:6443"))
    )
    assert result.outcome is Outcome.APPLIED
    assert result.removed_backends == (BackendValue("10.0.0.3", 6443),)
    assert render_resolved(contents_of(maps)) == [
        "IPv4 10.96.0.1:443/6 -> [10.0.0.1:6443, 10.0.0.2:6443, 10.0.0.4:6443]"
    ]
    assert check_invariants(contents_of(maps)) == []


def test_same_content_at_a_new_generation_writes_nothing(reconciler, maps):
    reconciler.apply(make_snapshot(generation=1, apiservers=HA3))
    ops = maps.operations
    result = reconciler.apply(make_snapshot(generation=2, apiservers=HA3))
    assert result.outcome is Outcome.UNCHANGED
    assert maps.operations == ops
    assert reconciler.applied_generation == 2


@pytest.mark.parametrize("generation", [1, 2])
def test_generations_at_or_below_the_applied_one_are_ignored(reconciler, maps, generation):
    reconciler.apply(make_snapshot(generation=2, apiservers=HA3))
    before = render(contents_of(maps))
    result = reconciler.apply(make_snapshot(generation=generation, apiservers=("10.0.0.9:6443",)))
    assert result.outcome is Outcome.IGNORED
    assert render(contents_of(maps)) == before


@pytest.mark.parametrize(
    ("snapshot", "reason"),
    [
        (make_snapshot(generation=5, apiservers=()), "NoReadyEndpoints"),
        (make_snapshot(generation=5, services=()), "NoReadyEndpoints"),
        (
            msgspec.structs.replace(make_snapshot(generation=5), digest="sha256:bad"),
            "InvalidSnapshot",
        ),
        (make_snapshot(generation=5, cluster="elsewhere"), "InvalidSnapshot"),
    ],
    ids=["no-backends", "no-service", "digest", "other-cluster"],
)
def test_invalid_and_empty_snapshots_leave_the_maps_and_state_unchanged(
    reconciler, maps, state_file, snapshot, reason
):
    reconciler.apply(make_snapshot(generation=1, apiservers=HA3))
    before, saved = render(contents_of(maps)), state_file.path.read_bytes()
    result = reconciler.apply(snapshot)
    assert result.outcome is Outcome.REJECTED
    assert result.warning_reason == reason
    assert render(contents_of(maps)) == before
    assert state_file.path.read_bytes() == saved
    assert reconciler.applied_generation == 1
    assert reconciler.last_error.startswith("generation 5 rejected")
    # A later valid snapshot is applied as usual and clears the error.
    assert reconciler.apply(make_snapshot(generation=6)).outcome is Outcome.APPLIED
    assert reconciler.last_error == ""


def test_family_mismatch_holds_that_family_and_programs_the_other(reconciler, maps):
    reconciler.apply(
        make_snapshot(
            generation=1,
            services=("10.96.0.1:443", "[fd00:96::1]:443"),
            apiservers=("10.0.0.1:6443", "[fd00::a]:6443"),
        )
    )
    result = reconciler.apply(
        make_snapshot(
            generation=2,
            services=("10.96.0.1:443", "[fd00:96::1]:443"),
            apiservers=("10.0.0.2:6443",),
        )
    )
    assert result.outcome is Outcome.APPLIED
    assert set(result.held_families) == {"IPv6"}
    assert render_resolved(contents_of(maps)) == [
        "IPv4 10.96.0.1:443/6 -> [10.0.0.2:6443]",
        "IPv6 [fd00:96::1]:443/6 -> [[fd00::a]:6443]",  # held: the last good IPv6 state
    ]


def test_violations_found_before_an_apply_are_repaired_and_reported(reconciler, maps):
    # Calico issue 13279: a foreign or buggy writer put another service under our id.
    maps.update_backends("IPv4", {BackendKey(1, 0): BackendValue("10.1.1.1", 80)})
    maps.update_frontends(
        "IPv4",
        {
            FrontendKey("10.96.0.1", 443): FrontendValue(1, 1),
            FrontendKey("10.96.0.50", 80): FrontendValue(1, 1),
        },
    )
    result = reconciler.apply(make_snapshot(generation=1))
    assert [v.kind for v in result.violations_before] == ["duplicate-id"]
    assert result.violations_after == ()
    assert result.repaired == result.violations_before
    assert render_resolved(contents_of(maps)) == ["IPv4 10.96.0.1:443/6 -> [10.0.0.1:6443]"]


class FailingMaps(MemoryNatMaps):
    """Memory maps that fail the n-th batch call (a full map, an EPERM from the kernel)."""

    def __init__(self, fail_at: int) -> None:
        super().__init__()
        self.calls = 0
        self.fail_at = fail_at

    def _maybe_fail(self):
        self.calls += 1
        if self.calls == self.fail_at:
            raise OSError(28, "No space left on device")

    def update_backends(self, family, items):
        self._maybe_fail()
        super().update_backends(family, items)

    def update_frontends(self, family, items):
        self._maybe_fail()
        super().update_frontends(family, items)

    def delete_backends(self, family, keys):
        self._maybe_fail()
        super().delete_backends(family, keys)


@pytest.mark.parametrize("fail_at", [3, 4, 5])
def test_a_failing_map_write_leaves_consistent_maps_and_the_next_apply_converges(
    state_file, fail_at
):
    maps = FailingMaps(fail_at=fail_at)
    reconciler = Reconciler(maps=maps, cluster="default", state_file=state_file)
    assert reconciler.apply(make_snapshot(generation=1, apiservers=HA3)).outcome is Outcome.APPLIED
    result = reconciler.apply(make_snapshot(generation=2, apiservers=("10.0.0.7:6443",)))
    assert result.outcome is Outcome.FAILED
    assert result.warning_reason == "ApplyFailed"
    assert dangling_references(contents_of(maps)) == []
    assert reconciler.applied_generation == 1
    assert json.loads(state_file.path.read_bytes())["generation"] == 1
    retry = reconciler.apply(make_snapshot(generation=2, apiservers=("10.0.0.7:6443",)))
    assert retry.outcome is Outcome.APPLIED
    assert render_resolved(contents_of(maps)) == ["IPv4 10.96.0.1:443/6 -> [10.0.0.7:6443]"]
    assert check_invariants(contents_of(maps)) == []


# --- restart ---------------------------------------------------------------------------


def test_restart_resumes_from_the_state_file_and_keeps_ids(maps, state_file):
    first = Reconciler(maps=maps, cluster="default", state_file=state_file)
    first.apply(make_snapshot(generation=1, services=("10.96.0.1:443", "10.96.0.2:443")))
    first.apply(
        make_snapshot(generation=2, services=("10.96.0.1:443", "10.96.0.2:443"), apiservers=HA3)
    )
    before, ops = render(contents_of(maps)), maps.operations

    second = Reconciler(maps=maps, cluster="default", state_file=state_file)
    result = second.recover()
    assert result.outcome is Outcome.UNCHANGED
    assert maps.operations == ops  # the pinned maps are not touched
    assert render(contents_of(maps)) == before
    assert second.applied_generation == 2
    assert second.apply(make_snapshot(generation=2, apiservers=HA3)).outcome is Outcome.IGNORED
    ids = sorted(v.service_id for v in contents_of(maps)["IPv4"].frontends.values())
    assert len(set(ids)) == len(ids) == 2


def test_restart_after_a_crash_mid_apply_restores_the_last_complete_state(maps, state_file):
    first = Reconciler(maps=maps, cluster="default", state_file=state_file)
    first.apply(make_snapshot(generation=1, apiservers=HA3))
    # A crash after the make phase of generation 2: new backends written, nothing switched.
    maps.update_backends("IPv4", {BackendKey(2, 0): BackendValue("10.0.0.9", 6443)})
    second = Reconciler(maps=maps, cluster="default", state_file=state_file)
    result = second.recover()
    assert [v.kind for v in result.violations_before] == ["orphan-backends"]
    assert result.violations_after == ()
    assert second.applied_generation == 1
    assert (
        second.apply(make_snapshot(generation=2, apiservers=("10.0.0.9:6443",))).outcome
        is Outcome.APPLIED
    )
    assert render_resolved(contents_of(maps)) == ["IPv4 10.96.0.1:443/6 -> [10.0.0.9:6443]"]


def test_restart_with_empty_maps_reprograms_from_the_state_file(state_file):
    Reconciler(maps=MemoryNatMaps(), cluster="default", state_file=state_file).apply(
        make_snapshot(generation=4, apiservers=HA3)
    )
    fresh = MemoryNatMaps()  # a reboot emptied bpffs
    reconciler = Reconciler(maps=fresh, cluster="default", state_file=state_file)
    assert reconciler.recover().outcome is Outcome.APPLIED
    assert len(contents_of(fresh)["IPv4"].backends) == 3
    assert reconciler.applied_generation == 4


def test_recover_without_state_file_changes_nothing(maps, state_file):
    maps.update_frontends("IPv4", {FrontendKey("10.96.0.1", 443): FrontendValue(1, 2)})
    result = Reconciler(maps=maps, cluster="default", state_file=state_file).recover()
    assert result.outcome is Outcome.UNCHANGED
    assert [v.kind for v in result.violations_after] == ["count-mismatch", "dangling-ordinal"]
    assert len(contents_of(maps)["IPv4"].frontends) == 1


def test_a_corrupt_state_file_is_reported_not_fatal(maps, state_file):
    state_file.path.parent.mkdir(parents=True)
    state_file.path.write_text("{not json")
    reconciler = Reconciler(maps=maps, cluster="default", state_file=state_file)
    result = reconciler.recover()
    assert "not a node-loader state file" in result.reason
    assert reconciler.apply(make_snapshot(generation=1)).outcome is Outcome.APPLIED


def test_state_file_is_replaced_atomically(state_file, reconciler):
    reconciler.apply(make_snapshot(generation=1))
    reconciler.apply(make_snapshot(generation=2, apiservers=HA3))
    assert [p.name for p in state_file.path.parent.iterdir()] == [state_file.path.name]
    saved = state_file.load()
    assert saved is not None and saved.generation == 2 and saved.snapshot.generation == 2


def test_audit_repairs_drift_from_the_applied_state(reconciler, maps):
    reconciler.apply(make_snapshot(generation=1, apiservers=HA3))
    maps.delete_backends("IPv4", [BackendKey(1, 2)])  # someone deleted an entry
    violations = reconciler.audit()
    assert [v.kind for v in violations] == ["count-mismatch", "dangling-ordinal"]
    assert check_invariants(contents_of(maps)) == []
    assert len(contents_of(maps)["IPv4"].backends) == 3


# --- property: any sequence of snapshots --------------------------------------------------

service_sets = st.sets(
    st.sampled_from(["10.96.0.1:443", "10.96.0.2:443", "[fd00:96::1]:443", "[fd00:96::2]:6443"]),
    min_size=1,
)
apiserver_sets = st.sets(
    st.sampled_from(
        [
            "10.0.0.1:6443",
            "10.0.0.2:6443",
            "10.0.0.3:6443",
            "10.0.0.4:443",
            "[fd00::a]:6443",
            "[fd00::b]:6443",
        ]
    ),
    min_size=1,
)


class RecordingMaps(MemoryNatMaps):
    """Checks, after every single element written, that no frontend dangles."""

    def __init__(self) -> None:
        super().__init__()
        self.checks = 0

    def _store(self, table, key, value):
        super()._store(table, key, value)
        self._check()

    def delete_frontends(self, family, keys):
        for key in keys:
            super().delete_frontends(family, [key])
            self._check()

    def delete_backends(self, family, keys):
        for key in keys:
            super().delete_backends(family, [key])
            self._check()

    def _check(self):
        self.checks += 1
        assert dangling_references(contents_of(self)) == []


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(service_sets, apiserver_sets, st.booleans()), min_size=1, max_size=8))
def test_after_every_apply_the_maps_hold_the_desired_state(changes):
    maps = RecordingMaps()
    reconciler = Reconciler(maps=maps, cluster="default")
    generation = 0
    expected: dict[str, list[str]] = {}
    for services, apiservers, replay_old in changes:
        generation += 1
        snapshot = make_snapshot(
            generation=generation, services=sorted(services), apiservers=sorted(apiservers)
        )
        result = reconciler.apply(snapshot)
        assert result.outcome in (Outcome.APPLIED, Outcome.UNCHANGED)
        after = contents_of(maps)
        assert check_invariants(after) == []
        for family in ("IPv4", "IPv6"):
            if family in result.held_families:
                continue  # fail static: the family keeps its last good entries
            wanted_backends = sorted(
                (a for a in apiservers if (":" in a.rsplit(":", 1)[0]) == (family == "IPv6")),
            )
            wanted_frontends = [
                s for s in services if (":" in s.rsplit(":", 1)[0]) == (family == "IPv6")
            ]
            expected[family] = sorted(
                f"{family} {s}/6 -> [{', '.join(_canonical(wanted_backends))}]"
                for s in wanted_frontends
            )
        assert render_resolved(after) == expected.get("IPv4", []) + expected.get("IPv6", [])
        if replay_old and generation > 1:
            old = make_snapshot(generation=generation - 1, apiservers=("10.0.0.9:6443",))
            assert reconciler.apply(old).outcome is Outcome.IGNORED


def _canonical(host_ports):
    import ipaddress

    def key(hp):
        host, port = hp.rsplit(":", 1)
        return int(ipaddress.ip_address(host.strip("[]"))), int(port)

    return sorted(host_ports, key=key)


def test_the_state_file_directory_is_recreated_when_removed_between_applies(state_file):
    reconciler = Reconciler(maps=MemoryNatMaps(), cluster="default", state_file=state_file)
    reconciler.apply(make_snapshot(generation=1))
    shutil.rmtree(state_file.path.parent)  # e.g. /run cleaned under a running loader
    result = reconciler.apply(make_snapshot(generation=2, apiservers=HA3))
    assert result.outcome is Outcome.APPLIED and result.reason.startswith("snapshot")
    saved = state_file.load()
    assert saved is not None and saved.generation == 2


def test_a_state_file_that_cannot_be_written_is_reported_and_leaves_no_temporary(tmp_path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    maps = MemoryNatMaps()
    reconciler = Reconciler(
        maps=maps, cluster="default", state_file=StateFile(blocker / "state.json")
    )
    result = reconciler.apply(make_snapshot(generation=1))
    assert result.outcome is Outcome.APPLIED  # the maps are right; only the file failed
    assert "cannot write" in result.reason and reconciler.last_error == result.reason
    assert [p.name for p in tmp_path.iterdir()] == ["not-a-directory"]


def test_each_apply_reports_the_invariants_of_the_maps_it_started_from(maps):
    reconciler = Reconciler(maps=maps, cluster="default")
    reconciler.apply(make_snapshot(generation=1, apiservers=HA3))
    assert reconciler.apply(make_snapshot(generation=2)).violations_before == ()
    # Drift the cached view cannot see: the audit reads the maps back, reports and repairs.
    [key] = contents_of(maps)["IPv4"].backends
    maps.delete_backends("IPv4", [key])
    assert [v.kind for v in reconciler.audit()] == ["count-mismatch", "dangling-ordinal"]
    third = reconciler.apply(make_snapshot(generation=3, apiservers=HA3))
    assert third.violations_before == () and third.violations_after == ()
    assert check_invariants(contents_of(maps)) == []
