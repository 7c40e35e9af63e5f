"""A restarted loader reuses what is pinned, without compiling, when it provably matches.

After a compile, the loader writes a build stamp next to its state file (the state dir is a
host tmpfs: cleared at reboot, like bpffs): what the programs were compiled from (a digest of
bpf/*.c, bpf/*.h, the pin dir and the Python that compiles them), on which kernel and boot,
and the kernel ids of the programs loaded and of the maps pinned. A restart reuses the pins
and the attached programs only when all of it still holds:

- the same digest, kernel release and boot id;
- every map pin of this loader's layout versions holds the stamped map (same id);
- every hook's pinned link is attached to this cgroup and runs the stamped program.

Kernel ids are not reused within a boot, so a program replaced by another loader version
(an upgrade, a rollback) never passes for the stamped one. Anything else (no stamp, an
unreadable one, one pin or link changed) means compiling as usual: reuse only saves time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from apilane.node_loader import libbpf
from apilane.node_loader.libbpf import ProgramError
from apilane.node_loader.programs import HOOKS, attached_programs

_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
# The Python that decides how the programs are compiled (flags, pinning, what is loaded).
_COMPILING_MODULES = ("compile.py", "programs.py")


@dataclass(frozen=True, slots=True)
class BuildStamp:
    digest: str
    kernel: str
    boot_id: str
    program_ids: dict[str, int]  # hook name -> program id
    map_ids: dict[str, int]  # map name -> map id


@dataclass(frozen=True, slots=True)
class Reused:
    """The attached programs (this process's descriptors of them) and the map pins."""

    pins: dict[str, Path]
    program_ids: dict[str, int]
    program_fds: dict[str, int]


def build_digest(source_dir: Path, pin_dir: Path) -> str:
    """What the programs are compiled from: the C sources, the pin dir (a compile flag) and
    the modules that compile them."""
    digest = hashlib.sha256()
    here = Path(__file__).parent
    files = [*sorted(source_dir.glob("*.[ch]")), *(here / name for name in _COMPILING_MODULES)]
    for file in files:
        digest.update(file.name.encode() + b"\0" + file.read_bytes() + b"\0")
    digest.update(os.fsencode(pin_dir))
    return digest.hexdigest()


def _boot() -> tuple[str, str]:
    return os.uname().release, _BOOT_ID.read_text().strip()


def make_stamp(
    digest: str, *, program_ids: Mapping[str, int], pins: Mapping[str, Path]
) -> BuildStamp:
    """The stamp of a compile whose programs and pinned maps are given."""
    kernel, boot_id = _boot()
    return BuildStamp(
        digest=digest,
        kernel=kernel,
        boot_id=boot_id,
        program_ids=dict(program_ids),
        map_ids={name: _pinned_map_id(pin) for name, pin in pins.items()},
    )


def write_stamp(path: Path, stamp: BuildStamp) -> None:
    """Atomically (a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(asdict(stamp)))
    os.replace(temporary, path)


def read_stamp(path: Path) -> BuildStamp | None:
    try:
        raw = json.loads(path.read_text())
        return BuildStamp(
            digest=str(raw["digest"]),
            kernel=str(raw["kernel"]),
            boot_id=str(raw["boot_id"]),
            program_ids={str(k): int(v) for k, v in raw["program_ids"].items()},
            map_ids={str(k): int(v) for k, v in raw["map_ids"].items()},
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def mismatch(
    stamp: BuildStamp | None,
    *,
    digest: str,
    pins: Mapping[str, Path],
    pin_dir: Path,
    cgroup_path: Path,
) -> str:
    """Why the pinned maps and attached programs are not the stamped ones; "" when they are."""
    if stamp is None:
        return "no build stamp"
    if stamp.digest != digest:
        return "the sources changed"
    if (stamp.kernel, stamp.boot_id) != _boot():
        return "another kernel or boot"
    for name, pin in pins.items():
        if stamp.map_ids.get(name) != _pinned_map_id(pin):
            return f"{pin.name} holds another map"
    attached = {
        p.hook: p.program_id for p in attached_programs(cgroup_path=cgroup_path, pin_dir=pin_dir)
    }
    if attached != stamp.program_ids or set(attached) != {h.name for h in HOOKS}:
        return "the attached programs are not the stamped ones"
    return ""


def check(
    stamp_file: Path,
    *,
    digest: str,
    pins: Mapping[str, Path] | None,
    pin_dir: Path,
    cgroup_path: Path,
) -> tuple[BuildStamp | None, str]:
    """The stamp and "" when the pins and attached programs match it; else why not."""
    if pins is None:
        return None, "the maps are not pinned"
    stamp = read_stamp(stamp_file)
    try:
        why = mismatch(stamp, digest=digest, pins=pins, pin_dir=pin_dir, cgroup_path=cgroup_path)
    except (OSError, ProgramError) as exc:
        why = f"reading the pins: {exc}"
    return (stamp, "") if not why else (None, why)


def reuse(stamp: BuildStamp, pins: Mapping[str, Path]) -> Reused | None:
    """This process's descriptors of the stamped programs (checked by `check`); None when one
    is gone meanwhile."""
    fds: dict[str, int] = {}
    for hook, program_id in stamp.program_ids.items():
        fd = libbpf.lib().bpf_prog_get_fd_by_id(program_id)
        if fd < 0:  # gone since the check
            for opened in fds.values():
                os.close(opened)
            return None
        fds[hook] = int(fd)
    return Reused(pins=dict(pins), program_ids=dict(stamp.program_ids), program_fds=fds)


def _pinned_map_id(pin: Path) -> int:
    fd = libbpf.open_pinned(pin)
    if fd is None:
        return 0
    try:
        return libbpf.map_id(fd) or 0
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
