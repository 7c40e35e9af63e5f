"""The loader's bcc-free side on the live kernel: a compile child pins and loads, this side
works on the pins (PinnedLB, PinnedNatMaps, PinnedConnections).

Programs are attached only to the lab's dedicated child cgroup; no traffic is sent here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from apilane.node_loader.memmaps import MapWriteError
from apilane.node_loader.nat import BackendKey, BackendValue, FrontendKey, FrontendValue
from apilane.node_loader.pinned import (
    CompilerError,
    PinnedLB,
    compiler_command,
    run_compiler,
    start_compiler,
)
from apilane.node_loader.pinnedmaps import PinnedNatMaps
from apilane.node_loader.programs import HOOKS, default_source_dir
from apilane.node_loader.testing import check_nat_maps_contract, contents_of
from apilane.testing.bpf import BpfLab

pytestmark = [pytest.mark.integration, pytest.mark.bpf]


@pytest.fixture(scope="module")
def pinned(bpf_module_lab: BpfLab) -> Iterator[PinnedLB]:
    loaded = PinnedLB(cgroup_path=bpf_module_lab.child_cgroup(), pin_dir=bpf_module_lab.pin_dir())
    try:
        yield loaded
    finally:
        loaded.close()


@pytest.fixture(params=["batch", "per-element"])
def maps(request: pytest.FixtureRequest, pinned: PinnedLB) -> Iterator[PinnedNatMaps]:
    adapter = PinnedNatMaps(pinned.pins, use_batch=None if request.param == "batch" else False)
    adapter.clear()
    try:
        yield adapter
    finally:
        adapter.close()


def test_pinned_maps_keep_the_nat_maps_contract(maps: PinnedNatMaps) -> None:
    check_nat_maps_contract(maps)


def test_pinned_maps_use_batch_operations_and_refuse_bad_values(pinned: PinnedLB) -> None:
    maps = pinned.nat_maps
    maps.update_backends("IPv4", {BackendKey(1, 0): BackendValue("198.18.0.2", 80)})
    maps.delete_backends("IPv4", [BackendKey(1, 0)])
    assert maps.batch_supported is True
    with pytest.raises(MapWriteError):
        maps.update_frontends("IPv4", {FrontendKey("10.96.0.1", 70000): FrontendValue(1, 1)})
    assert not maps.dump("IPv4").frontends


def test_the_compiler_reports_the_pins_and_bccs_layouts_match_the_mirrored_structs(
    bpf_module_lab: BpfLab, pinned: PinnedLB
) -> None:
    # run_compiler checks the reported (bcc-derived) layouts against pinnedmaps.LAYOUTS.
    command = compiler_command(
        cgroup_path=bpf_module_lab.child_cgroup(),
        pin_dir=pinned.pin_dir,
        source_dir=None,
        allow_root_cgroup=False,
    )
    compiled = run_compiler(command)
    try:
        assert set(compiled.program_fds) == {hook.name for hook in HOOKS}
        assert all(program_id > 0 for program_id in compiled.program_ids.values())
        assert compiled.pins == pinned.pins
        assert compiled.pins["apilane_conn"] == pinned.pin_dir / "apilane_conn_v1"
        assert all(pin.parent == pinned.pin_dir for pin in compiled.pins.values())
    finally:
        compiled.close()


def test_enable_attaches_the_handed_over_programs_and_disable_detaches(
    pinned: PinnedLB,
) -> None:
    pinned.enable()
    try:
        attached = pinned.attached_programs()
        assert sorted(p.hook for p in attached) == sorted(h.name for h in HOOKS)
        assert {p.hook: p.program_id for p in attached} == dict(pinned.program_ids)
        pinned.enable()  # again: the pinned links are updated in place, not stacked
        assert len(pinned.attached_programs()) == len(HOOKS)
    finally:
        pinned.disable()
    assert pinned.attached_programs() == []


def test_the_compiler_refuses_the_root_cgroup(bpf_module_lab: BpfLab, tmp_path: Path) -> None:
    root = bpf_module_lab.child_cgroup().parent
    while (root.parent / "cgroup.procs").exists() and root.parent != root:
        root = root.parent
    command = compiler_command(
        cgroup_path=root, pin_dir=bpf_module_lab.pin_dir(), source_dir=None, allow_root_cgroup=False
    )
    with pytest.raises(CompilerError, match="root"):
        run_compiler(command)


def test_a_failing_compile_is_a_typed_error_and_leaves_the_maps_as_they_were(
    bpf_module_lab: BpfLab, pinned: PinnedLB, tmp_path: Path
) -> None:
    pinned.nat_maps.clear()
    pinned.nat_maps.update_backends("IPv4", {BackendKey(5, 0): BackendValue("198.18.0.9", 80)})
    pinned.nat_maps.update_frontends("IPv4", {FrontendKey("10.96.0.5", 443): FrontendValue(5, 1)})
    before = contents_of(pinned.nat_maps)
    broken = tmp_path / "bpf"
    shutil.copytree(default_source_dir(), broken)
    source = broken / "connect_lb.c"
    source.write_text(source.read_text() + "\nthis is not C;\n")
    with pytest.raises(CompilerError) as raised:
        PinnedLB(
            cgroup_path=bpf_module_lab.child_cgroup(),
            pin_dir=bpf_module_lab.pin_dir(),
            source_dir=broken,
        )
    assert raised.value.returncode == 1
    assert "connect_lb.c" in raised.value.stderr

    # With the maps already pinned, the loader keeps serving them (fail static).
    survivor = PinnedLB(
        cgroup_path=bpf_module_lab.child_cgroup(), pin_dir=pinned.pin_dir, source_dir=broken
    )
    try:
        assert isinstance(survivor.load_error, CompilerError)
        assert contents_of(survivor.nat_maps) == before
        with pytest.raises(CompilerError):
            survivor.enable()
        assert survivor.attached_programs() == []
    finally:
        survivor.close()
    assert contents_of(pinned.nat_maps) == before
    pinned.nat_maps.clear()


def test_a_compiler_started_early_gives_what_one_run_at_open_gives(
    bpf_module_lab: BpfLab, pinned: PinnedLB
) -> None:
    early = start_compiler(cgroup_path=pinned.cgroup_path, pin_dir=pinned.pin_dir)
    assert early.pid is not None and not early.taken
    loaded = PinnedLB(cgroup_path=pinned.cgroup_path, pin_dir=pinned.pin_dir, compiling=early)
    try:
        assert early.taken and loaded.load_error is None
        assert loaded.pins == pinned.pins  # the same pinned maps, reused
        assert set(loaded.program_ids) == set(pinned.program_ids) == {h.name for h in HOOKS}
        loaded.enable()
        attached = loaded.attached_programs()
        assert {p.hook: p.program_id for p in attached} == dict(loaded.program_ids)
    finally:
        loaded.disable()
        loaded.close()
    with pytest.raises(CompilerError, match="already taken"):
        early.result()


def test_a_compiler_started_for_other_settings_is_ended_and_compiled_again(
    bpf_module_lab: BpfLab, pinned: PinnedLB, tmp_path: Path
) -> None:
    elsewhere = tmp_path / "bpf"
    shutil.copytree(default_source_dir(), elsewhere)
    other = start_compiler(
        cgroup_path=pinned.cgroup_path, pin_dir=pinned.pin_dir, source_dir=elsewhere
    )
    loaded = PinnedLB(cgroup_path=pinned.cgroup_path, pin_dir=pinned.pin_dir, compiling=other)
    try:
        assert other.taken and loaded.load_error is None
        assert set(loaded.program_ids) == {h.name for h in HOOKS}
        assert loaded.pins == pinned.pins
    finally:
        loaded.close()


def test_abandoning_a_running_compiler_ends_it(bpf_module_lab: BpfLab) -> None:
    early = start_compiler(
        cgroup_path=bpf_module_lab.child_cgroup(), pin_dir=bpf_module_lab.pin_dir()
    )
    pid = early.pid
    assert pid is not None
    early.abandon()
    assert early.taken
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # ended and reaped: the pid is gone
    early.abandon()  # again: nothing left to do


def test_a_failing_early_compiler_is_a_typed_error(bpf_module_lab: BpfLab, tmp_path: Path) -> None:
    broken = tmp_path / "bpf"
    shutil.copytree(default_source_dir(), broken)
    (broken / "connect_lb.c").write_text("this is not C;\n")
    cgroup, pins = bpf_module_lab.child_cgroup(), bpf_module_lab.pin_dir()
    early = start_compiler(cgroup_path=cgroup, pin_dir=pins, source_dir=broken)
    with pytest.raises(CompilerError) as raised:
        PinnedLB(cgroup_path=cgroup, pin_dir=pins, source_dir=broken, compiling=early)
    assert raised.value.returncode == 1
    assert "connect_lb.c" in raised.value.stderr
    assert early.taken


def test_a_restart_reuses_the_pins_and_programs_its_build_stamp_matches(
    bpf_module_lab: BpfLab, tmp_path: Path
) -> None:
    cgroup, pin_dir, stamp = bpf_module_lab.child_cgroup(), bpf_module_lab.pin_dir(), tmp_path / "s"
    first = PinnedLB(cgroup_path=cgroup, pin_dir=pin_dir, build_stamp=stamp)
    try:
        assert not first.reused and stamp.is_file()
        first.enable()
        compiled_ids = dict(first.program_ids)
    finally:
        first.close()
    try:
        restarted = PinnedLB(cgroup_path=cgroup, pin_dir=pin_dir, build_stamp=stamp)
        try:
            assert restarted.reused and restarted.load_error is None
            assert dict(restarted.program_ids) == compiled_ids
            assert restarted.pins == first.pins
            restarted.enable()  # the same programs: the links stay on them
            attached = {p.hook: p.program_id for p in restarted.attached_programs()}
            assert attached == compiled_ids
        finally:
            restarted.close()

        # Changed sources compile again (and stamp the new programs once attached).
        changed = tmp_path / "bpf"
        shutil.copytree(default_source_dir(), changed)
        source = changed / "connect_lb.c"
        source.write_text(source.read_text() + "\n/* changed */\n")
        recompiled = PinnedLB(
            cgroup_path=cgroup, pin_dir=pin_dir, source_dir=changed, build_stamp=stamp
        )
        try:
            assert not recompiled.reused
            assert set(recompiled.program_ids.values()).isdisjoint(compiled_ids.values())
        finally:
            recompiled.close()
        # Its programs were never attached: the stamp does not match the links.
        again = PinnedLB(cgroup_path=cgroup, pin_dir=pin_dir, source_dir=changed, build_stamp=stamp)
        try:
            assert not again.reused
        finally:
            again.close()

        # Programs replaced by another loader (no stamp of its own): never taken for ours.
        other = PinnedLB(cgroup_path=cgroup, pin_dir=pin_dir)
        try:
            other.enable()
        finally:
            other.close()
        after_other = PinnedLB(
            cgroup_path=cgroup, pin_dir=pin_dir, source_dir=changed, build_stamp=stamp
        )
        try:
            assert not after_other.reused
        finally:
            after_other.disable()
            after_other.close()
    finally:
        first.disable()


_PROBE = """
import json, sys
from pathlib import Path
from apilane.node_loader.pinned import PinnedLB
lb = PinnedLB(cgroup_path=sys.argv[1], pin_dir=sys.argv[2])
lb.nat_maps.dump("IPv4")
mapped = Path("/proc/self/maps").read_text()
print(json.dumps({
    "bcc_modules": sorted(m for m in sys.modules if m == "bcc" or m.startswith("bcc.")),
    "libbcc": "libbcc" in mapped,
    "libllvm": "libLLVM" in mapped or "libclang" in mapped,
}))
lb.close()
"""


def test_the_loader_process_never_loads_bcc_or_llvm(bpf_module_lab: BpfLab) -> None:
    # A fresh interpreter: this test process imports bcc for other tests.
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            _PROBE,
            str(bpf_module_lab.child_cgroup()),
            str(bpf_module_lab.pin_dir()),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        env={**os.environ},
    )
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen == {"bcc_modules": [], "libbcc": False, "libllvm": False}
