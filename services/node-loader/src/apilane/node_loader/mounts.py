"""Which filesystem holds a path, and the checks that keep the programs off the wrong cgroup
and the pins on bpffs. Read-only: /proc/self/mountinfo and stat.
"""

from __future__ import annotations

from pathlib import Path

from apilane.node_loader.libbpf import ProgramError


class CgroupRefusedError(ProgramError):
    """The cgroup is not acceptable (not cgroup2, or the root without explicit permission)."""


def mounts() -> list[tuple[Path, str]]:
    """(mount point, filesystem type) from /proc/self/mountinfo."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        before, _, after = line.partition(" - ")
        fields = before.split()
        mount_point = fields[4].encode().decode("unicode_escape")
        found.append((Path(mount_point), after.split()[0]))
    return found


def filesystem_of(path: Path) -> tuple[Path, str] | None:
    """The mount (point, type) that holds `path`: the longest mount point containing it."""
    resolved = path.resolve()
    best: tuple[Path, str] | None = None
    for mount_point, fstype in mounts():
        contains = resolved == mount_point or mount_point in resolved.parents
        if contains and (best is None or len(mount_point.parts) >= len(best[0].parts)):
            best = (mount_point, fstype)
    return best


def check_cgroup(path: Path, *, allow_root_cgroup: bool) -> None:
    """A cgroup2 directory, and not the hierarchy's root unless explicitly allowed."""
    if not (path / "cgroup.procs").is_file():
        raise CgroupRefusedError(f"{path} is not a cgroup directory")
    mount = filesystem_of(path)
    if mount is None or mount[1] != "cgroup2":
        raise CgroupRefusedError(f"{path} is not on a cgroup2 (unified) hierarchy")
    if path.resolve() == mount[0] and not allow_root_cgroup:
        raise CgroupRefusedError(
            f"{path} is the root of the cgroup2 hierarchy: attaching there affects every process "
            "on the machine; only production configuration may allow it (allow_root_cgroup=True)"
        )


def check_pin_dir(path: Path) -> None:
    anchor = path
    while not anchor.exists():
        anchor = anchor.parent
    mount = filesystem_of(anchor)
    if mount is None or mount[1] != "bpf":
        raise ProgramError(f"{path} is not on a bpf filesystem (mount bpffs at /sys/fs/bpf)")
