"""`python -m apilane.node_loader uninstall`: remove apilane's data plane from a node.

The pinned maps and links outlive the loader on purpose (a restart or upgrade must not open
a window without translation), so deleting the DaemonSet leaves them in place. This command,
run once per node after the DaemonSet is gone, with the same settings (APILANE_BPF_PIN_DIR,
APILANE_CGROUP_PATH, APILANE_STATE_DIR), removes them in the order that never leaves a
program pointing at a missing map:

1. detach the connect-time programs (every pinned link, wherever it is attached) and remove
   the link pins: from here on connect() is no longer translated;
2. unpin the NAT maps (the kernel frees them once nothing references them);
3. remove the applied-state file (and with it a recorded live switch);
4. remove the pin dir itself when it is empty and not a mount point;
5. check the cgroup: no program named apilane_* may remain attached there.

It refuses to touch a pin dir that holds anything but apilane's own pin names (the pin dir
is a setting: pointed at bpffs' root or another tool's directory, it must not delete what
is there) and changes nothing in that case. Running it again removes nothing and succeeds.

Exit status: 0 done (or nothing to do), 1 something could not be removed, 2 bad settings,
3 refused (unknown objects in the pin dir).
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from apilane.model.errors import ApilaneError
from apilane.node_loader.bpfmaps import CONNECTION_TABLE_NAME, REVERSE_TABLE_NAMES, TABLE_NAMES
from apilane.node_loader.libbpf import ProgramError
from apilane.node_loader.mounts import check_pin_dir
from apilane.node_loader.programs import (
    HOOKS,
    PROGRAM_PREFIX,
    CgroupProgram,
    detach_pinned_link,
    link_pin_name,
    programs_on_cgroup,
)
from apilane.node_loader.settings import NodeLoaderSettings
from apilane.node_loader.statefile import StateFile, StateFileError

EXIT_OK = 0
EXIT_INCOMPLETE = 1
EXIT_REFUSED = 3

MAP_NAMES: frozenset[str] = frozenset(
    {name for pair in TABLE_NAMES.values() for name in pair}
    | set(REVERSE_TABLE_NAMES.values())
    | {CONNECTION_TABLE_NAME}
)
LINK_PIN_NAMES: frozenset[str] = frozenset(link_pin_name(hook) for hook in HOOKS)
# bpf/nat.h pins each map as <name>_<layout version> (APILANE_NAT_LAYOUT for the NAT maps,
# APILANE_REV_LAYOUT for the reverse maps, APILANE_CONN_LAYOUT for the connections); any layout version is ours, so an
# uninstall also cleans up after a loader built with an older layout.
_MAP_PIN = re.compile(r"^(?P<name>[a-z0-9_]+)_v(?P<layout>[0-9]+)$")


class UninstallRefused(ApilaneError):
    """The pin dir holds objects that are not apilane's: nothing was touched."""


@dataclass(frozen=True, slots=True)
class PinInventory:
    links: tuple[str, ...]
    maps: tuple[str, ...]
    unknown: tuple[str, ...]


def is_map_pin(name: str) -> bool:
    match = _MAP_PIN.match(name)
    return match is not None and match["name"] in MAP_NAMES


def classify_pins(names: Iterable[str]) -> PinInventory:
    """Sort a pin dir's entries into apilane's links, apilane's maps and everything else."""
    links, maps, unknown = [], [], []
    for name in sorted(names):
        if name in LINK_PIN_NAMES:
            links.append(name)
        elif is_map_pin(name):
            maps.append(name)
        else:
            unknown.append(name)
    return PinInventory(links=tuple(links), maps=tuple(maps), unknown=tuple(unknown))


@dataclass
class UninstallReport:
    pin_dir: Path
    detached_links: list[str] = field(default_factory=list)  # one description per link
    unpinned_maps: list[str] = field(default_factory=list)
    removed_state_file: Path | None = None
    removed_pin_dir: bool = False
    still_attached: list[CgroupProgram] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def removed_anything(self) -> bool:
        return bool(
            self.detached_links
            or self.unpinned_maps
            or self.removed_state_file
            or self.removed_pin_dir
        )

    @property
    def complete(self) -> bool:
        return not self.failures and not self.still_attached

    def lines(self) -> list[str]:
        out = [f"detached {link}" for link in self.detached_links]
        out += [f"unpinned map {self.pin_dir / name}" for name in self.unpinned_maps]
        if self.removed_state_file is not None:
            out.append(f"removed state file {self.removed_state_file}")
        if self.removed_pin_dir:
            out.append(f"removed pin dir {self.pin_dir}")
        out += [
            f"STILL ATTACHED: {p.program} (id {p.program_id}) at {p.hook}"
            for p in self.still_attached
        ]
        out += [f"FAILED: {failure}" for failure in self.failures]
        if not self.removed_anything and self.complete:
            out.append(f"nothing to remove: no apilane pins in {self.pin_dir}, no state file")
        return out


def uninstall(settings: NodeLoaderSettings) -> UninstallReport:
    """Remove apilane's pinned links and maps, and its state file. Raises UninstallRefused
    (before touching anything) when the pin dir holds objects that are not apilane's."""
    pin_dir = Path(settings.pin_dir)
    report = UninstallReport(pin_dir=pin_dir)
    inventory = _inventory(pin_dir)

    for name in inventory.links:
        try:
            detached = detach_pinned_link(pin_dir / name)
        except ProgramError as exc:
            report.failures.append(str(exc))
            continue
        if detached is not None:
            what = detached.program or "a defunct link"
            report.detached_links.append(
                f"{name} ({what}, cgroup inode {detached.cgroup_id})"
                if detached.cgroup_id
                else f"{name} ({what})"
            )
    if report.failures:
        # A program may still be attached and using the maps: keep them pinned (and the
        # state file), so a loader can still manage them and a rerun can finish the job.
        return report

    for name in inventory.maps:
        try:
            (pin_dir / name).unlink()
        except FileNotFoundError:
            continue
        except OSError as exc:
            report.failures.append(f"unpinning {pin_dir / name}: {exc}")
            continue
        report.unpinned_maps.append(name)

    state_file = StateFile(settings.state_file)
    try:
        state_file.remove()
        report.removed_state_file = state_file.path
    except FileNotFoundError:
        pass
    except StateFileError as exc:
        report.failures.append(str(exc))

    report.removed_pin_dir = _remove_empty_dir(pin_dir, report)
    report.still_attached = _apilane_programs_on(settings.cgroup_path, report)
    return report


def _inventory(pin_dir: Path) -> PinInventory:
    if not pin_dir.exists():
        return PinInventory(links=(), maps=(), unknown=())
    if not pin_dir.is_dir():
        raise UninstallRefused(f"{pin_dir} is not a directory")
    try:
        check_pin_dir(pin_dir)
    except ProgramError as exc:
        raise UninstallRefused(str(exc)) from exc
    inventory = classify_pins(entry.name for entry in os.scandir(pin_dir))
    if inventory.unknown:
        raise UninstallRefused(
            f"{pin_dir} holds objects apilane does not recognise: {', '.join(inventory.unknown)}; "
            "nothing was removed (is APILANE_BPF_PIN_DIR right?)"
        )
    return inventory


def _remove_empty_dir(pin_dir: Path, report: UninstallReport) -> bool:
    if not pin_dir.is_dir():
        return False
    try:
        pin_dir.rmdir()
    except OSError as exc:
        # A mount point (bpffs mounted at the pin dir itself) stays; so does a directory
        # something else pinned into since the inventory.
        if exc.errno not in (errno.EBUSY, errno.ENOTEMPTY):
            report.failures.append(f"removing {pin_dir}: {exc}")
        return False
    return True


def _apilane_programs_on(cgroup_path: str, report: UninstallReport) -> list[CgroupProgram]:
    """apilane programs still attached to the cgroup (another pin dir's links, say)."""
    if not cgroup_path or not Path(cgroup_path).is_dir():
        return []
    try:
        attached = programs_on_cgroup(Path(cgroup_path))
    except (ProgramError, OSError) as exc:
        report.failures.append(f"checking {cgroup_path}: {exc}")
        return []
    return [p for p in attached if p.program.startswith(PROGRAM_PREFIX)]


def main(settings: NodeLoaderSettings, *, out: TextIO, err: TextIO) -> int:
    """The `uninstall` command: print what was removed, return the exit status."""
    try:
        report = uninstall(settings)
    except UninstallRefused as exc:
        print(f"refused: {exc}", file=err)
        return EXIT_REFUSED
    for line in report.lines():
        print(line, file=out)
    return EXIT_OK if report.complete else EXIT_INCOMPLETE
