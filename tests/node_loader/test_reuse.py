"""The build stamp's pure parts: the digest, reading a stamp, what mismatches without pins."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from apilane.node_loader import early, reuse
from apilane.node_loader.programs import default_source_dir

pytestmark = [pytest.mark.unit]


def test_the_digest_follows_the_sources_and_the_pin_dir(tmp_path: Path) -> None:
    sources = tmp_path / "bpf"
    shutil.copytree(default_source_dir(), sources)
    pins = Path("/sys/fs/bpf/apilane")
    digest = reuse.build_digest(sources, pins)
    assert reuse.build_digest(sources, pins) == digest  # deterministic
    assert reuse.build_digest(sources, Path("/sys/fs/bpf/other")) != digest
    header = sources / "nat.h"
    header.write_text(header.read_text() + "\n")
    assert reuse.build_digest(sources, pins) != digest
    (sources / "notes.txt").write_text("not compiled")  # only *.c and *.h count
    changed = reuse.build_digest(sources, pins)
    (sources / "notes.txt").write_text("still not compiled")
    assert reuse.build_digest(sources, pins) == changed


def test_a_stamp_round_trips_and_a_bad_one_reads_as_none(tmp_path: Path) -> None:
    stamp = reuse.BuildStamp(
        digest="d", kernel="k", boot_id="b", program_ids={"connect4": 7}, map_ids={"m": 9}
    )
    path = tmp_path / "state" / "x.build.json"
    reuse.write_stamp(path, stamp)
    assert reuse.read_stamp(path) == stamp
    for garbage in ("", "{", "[]", '{"digest": "d"}', '{"digest": 1, "kernel": 2}'):
        path.write_text(garbage)
        assert reuse.read_stamp(path) is None, garbage
    assert reuse.read_stamp(tmp_path / "missing") is None


def test_without_a_stamp_or_pins_nothing_is_reused(tmp_path: Path) -> None:
    _, why = reuse.check(
        tmp_path / "missing", digest="d", pins=None, pin_dir=tmp_path, cgroup_path=tmp_path
    )
    assert why == "the maps are not pinned"
    stamp, why = reuse.check(
        tmp_path / "missing", digest="d", pins={}, pin_dir=tmp_path, cgroup_path=tmp_path
    )
    assert stamp is None and why == "no build stamp"
    reuse.write_stamp(
        tmp_path / "s",
        reuse.BuildStamp(digest="old", kernel="k", boot_id="b", program_ids={}, map_ids={}),
    )
    _, why = reuse.check(
        tmp_path / "s", digest="d", pins={}, pin_dir=tmp_path, cgroup_path=tmp_path
    )
    assert why == "the sources changed"


def test_the_build_stamp_sits_next_to_the_state_file() -> None:
    state = early.state_file("/run/apilane/node-loader", "/sys/fs/bpf/apilane")
    assert state == Path("/run/apilane/node-loader/sys_fs_bpf_apilane.state.json")
    assert early.build_stamp(state) == state.with_name("sys_fs_bpf_apilane.build.json")
