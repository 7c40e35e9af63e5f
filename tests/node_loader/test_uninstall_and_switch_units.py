"""Pure parts of uninstall (which pins are apilane's) and of the connect-time LB switch
(precedence against APILANE_CONNECT_TIME_LB, persistence in the state file)."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import pytest

from apilane.node_loader.programs import HOOKS, default_source_dir
from apilane.node_loader.settings import LiveLbSwitch, resolve_connect_time_lb
from apilane.node_loader.statefile import PersistedState, StateFile
from apilane.node_loader.uninstall import classify_pins, is_map_pin
from apilane.testing.snapshots import make_snapshot

pytestmark = [pytest.mark.unit]

SWITCHED_AT = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)


def test_classify_pins_knows_apilane_links_and_maps_of_any_layout() -> None:
    names = ["apilane_fe4_v1", "apilane_rev6_v2", "link_connect4", "link_getpeername6"]
    inventory = classify_pins([*names, "cilium_lb4", "apilane_fe4", "apilane_other_v1", "x"])
    assert inventory.links == ("link_connect4", "link_getpeername6")
    assert inventory.maps == ("apilane_fe4_v1", "apilane_rev6_v2")
    assert inventory.unknown == ("apilane_fe4", "apilane_other_v1", "cilium_lb4", "x")
    assert classify_pins(f"link_{h.name}" for h in HOOKS).unknown == ()


def test_every_map_pinned_by_the_bpf_sources_is_recognised() -> None:
    """Adding a pinned map to bpf/ without teaching uninstall its name would make uninstall
    refuse every node: this fails first."""
    sources = [p.read_text() for p in sorted(default_source_dir().glob("*.[ch]"))]
    pinned = {n for text in sources for n in re.findall(r'APILANE_\w*PIN\("([^"]+)"\)', text)}
    layouts = {
        v for text in sources for v in re.findall(r'#define APILANE_\w*LAYOUT "([^"]+)"', text)
    }
    assert len(pinned) >= 6 and layouts, (pinned, layouts)
    unknown = [
        f"{n}_{v}" for n in sorted(pinned) for v in sorted(layouts) if not is_map_pin(f"{n}_{v}")
    ]
    assert unknown == []


def switch(*, enabled: bool, env_value: bool) -> LiveLbSwitch:
    return LiveLbSwitch(enabled=enabled, env_value=env_value, switched_at=SWITCHED_AT)


@pytest.mark.parametrize(
    ("env_value", "recorded", "enabled", "source", "kept"),
    [
        (True, None, True, "env", False),
        (False, None, False, "env", False),
        # The switch was made under the variable's current value: the switch holds.
        (True, switch(enabled=False, env_value=True), False, "live switch", True),
        (False, switch(enabled=True, env_value=False), True, "live switch", True),
        # The variable changed since: it wins and the switch is dropped for good.
        (False, switch(enabled=False, env_value=True), False, "env", False),
        (True, switch(enabled=True, env_value=False), True, "env", False),
        # A record asking for what the variable says anyway: nothing to keep.
        (True, switch(enabled=True, env_value=True), True, "env", False),
    ],
)
def test_precedence_of_the_live_switch_over_the_variable(
    env_value: bool, recorded: LiveLbSwitch | None, enabled: bool, source: str, kept: bool
) -> None:
    decision = resolve_connect_time_lb(env_value=env_value, switch=recorded)
    assert (decision.enabled, decision.source) == (enabled, source)
    assert decision.keep_switch == (recorded if kept else None)
    assert decision.rule


def test_state_file_keeps_the_switch_with_or_without_an_applied_state(tmp_path: Path) -> None:
    state_file = StateFile(tmp_path / "x.state.json")
    only_switch = PersistedState(lb_switch=switch(enabled=False, env_value=True))
    state_file.save(only_switch)
    loaded = state_file.load()
    assert loaded == only_switch and loaded.applied is None

    snapshot = make_snapshot(generation=4)
    applied = PersistedState(
        generation=4,
        digest=snapshot.digest,
        applied_at=SWITCHED_AT,
        snapshot=snapshot,
        lb_switch=only_switch.lb_switch,
    )
    state_file.save(applied)
    loaded = state_file.load()
    assert loaded is not None and loaded.lb_switch == only_switch.lb_switch
    assert loaded.applied is not None and loaded.applied.generation == 4

    state_file.remove()
    assert state_file.load() is None
    with pytest.raises(FileNotFoundError):
        state_file.remove()


def test_a_state_file_written_before_the_switch_existed_still_loads(tmp_path: Path) -> None:
    snapshot = make_snapshot(generation=2)
    path = tmp_path / "old.state.json"
    path.write_bytes(
        b'{"version":1,"generation":2,"digest":"%s","applied_at":"2025-01-01T00:00:00Z",'
        b'"snapshot":%s}' % (snapshot.digest.encode(), msgspec.json.encode(snapshot))
    )
    loaded = StateFile(path).load()
    assert loaded is not None and loaded.lb_switch is None
    assert loaded.applied is not None and loaded.applied.snapshot == snapshot
