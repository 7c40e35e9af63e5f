"""`ConnectTimeLB`: compile bpf/connect_lb.c with bcc, attach its cgroup programs, detach them.

The long-running loader does not use this class (bcc would keep LLVM resident there): it runs
compile.py, a short-lived child that builds a `ConnectTimeLB` and hands the programs over, and
works on the pins (pinned.py). Tests and benchmarks use it directly. `attach_all`,
`detach_all` and `attached_programs` below need libbpf only; both sides share them.

Lifecycle and restart behaviour:
- The NAT maps are pinned by bcc (BPF_TABLE_PINNED in bpf/nat.h) under `pin_dir`; a new process
  compiling the same source reuses them with their contents. Nothing here ever clears them.
- Programs are attached through BPF links pinned next to the maps (`<pin_dir>/link_<hook>`),
  so the data plane keeps running while the loader is down or restarting. On `enable()`, an
  existing pinned link on the same cgroup is switched to the new program with
  BPF_LINK_UPDATE: an atomic replace, no window without a program and no duplicate program
  stacked on the hook. A pinned link on another cgroup (the setting changed) is detached first.
- `disable()` detaches the links and removes their pins; the maps stay.
- `close()` releases this process's file descriptors only: pinned maps and links stay.
- A map's pin name carries its layout version (bpf/nat.h). After compiling, pins of the same
  map under another version (a superseded layout) are removed: nothing will read them again,
  and a preallocated LRU map would otherwise hold its memory for the node's lifetime. Programs
  still attached with the old layout keep their reference, so the data plane is unaffected
  until `enable()` replaces them.
- Removing all of it from a node (links, maps, state file) is uninstall.py's job.

Safety: the cgroup is a required argument, and the cgroup2 root (the mount point itself) is
refused unless `allow_root_cgroup=True`, which only production configuration sets.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from apilane.node_loader import libbpf
from apilane.node_loader.bpfmaps import (
    CONNECTION_TABLE_NAME,
    REVERSE_TABLE_NAMES,
    TABLE_NAMES,
    BccConnections,
    BccNatMaps,
)
from apilane.node_loader.libbpf import ProgramError
from apilane.node_loader.mounts import check_cgroup, check_pin_dir

DEFAULT_PIN_DIR = Path("/sys/fs/bpf/apilane")
SOURCE_FILE = "connect_lb.c"
PROGRAM_PREFIX = "apilane_"


@dataclass(frozen=True, slots=True)
class Hook:
    name: str  # e.g. "connect4"; the C function is "apilane_connect4"
    attach_type: int  # enum bpf_attach_type

    @property
    def program(self) -> str:
        return PROGRAM_PREFIX + self.name


HOOKS: tuple[Hook, ...] = (
    Hook("connect4", 10),  # BPF_CGROUP_INET4_CONNECT
    Hook("connect6", 11),  # BPF_CGROUP_INET6_CONNECT
    Hook("sendmsg4", 14),  # BPF_CGROUP_UDP4_SENDMSG
    Hook("sendmsg6", 15),  # BPF_CGROUP_UDP6_SENDMSG
    Hook("recvmsg4", 19),  # BPF_CGROUP_UDP4_RECVMSG
    Hook("recvmsg6", 20),  # BPF_CGROUP_UDP6_RECVMSG
    Hook("getpeername4", 29),  # BPF_CGROUP_INET4_GETPEERNAME
    Hook("getpeername6", 30),  # BPF_CGROUP_INET6_GETPEERNAME
)


@dataclass(frozen=True, slots=True)
class AttachedProgram:
    hook: str
    program: str  # the name the kernel reports for the attached program
    program_id: int
    link_id: int


def default_source_dir() -> Path:
    """bpf/ of this checkout, or $APILANE_BPF_DIR (container images copy bpf/ elsewhere)."""
    configured = os.environ.get("APILANE_BPF_DIR")
    if configured:
        return Path(configured)
    return Path(__file__).resolve().parents[5] / "bpf"


class ConnectTimeLB:
    """The compiled connect-time load balancer of one node, its pinned maps and links."""

    def __init__(
        self,
        *,
        cgroup_path: Path | str,
        pin_dir: Path | str = DEFAULT_PIN_DIR,
        source_dir: Path | str | None = None,
        allow_root_cgroup: bool = False,
        use_batch: bool | None = None,
    ) -> None:
        self.cgroup_path = Path(cgroup_path)
        self.pin_dir = Path(pin_dir)
        self.source_dir = Path(source_dir) if source_dir is not None else default_source_dir()
        check_cgroup(self.cgroup_path, allow_root_cgroup=allow_root_cgroup)
        check_pin_dir(self.pin_dir)
        self.pin_dir.mkdir(parents=True, exist_ok=True)
        self._bpf = _compile(self.source_dir, self.pin_dir)
        self._program_fds: dict[str, int] = {}
        try:
            for hook in HOOKS:
                function = self._bpf.load_func(
                    hook.program.encode(),
                    libbpf.BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
                    attach_type=hook.attach_type,
                )
                self._program_fds[hook.name] = int(function.fd)
            self.nat_maps = BccNatMaps(self._bpf, use_batch=use_batch)
            self.connections = BccConnections(self._bpf)
        except Exception as exc:
            self._bpf.cleanup()
            raise ProgramError(f"loading {self.source_dir / SOURCE_FILE}: {exc}") from exc
        self.removed_pins = remove_superseded_pins(self._bpf, self.pin_dir)
        release_free_heap()

    # --- attach / detach --------------------------------------------------------------------

    @property
    def program_fds(self) -> Mapping[str, int]:
        """hook name -> the descriptor of its loaded program (this process's)."""
        return self._program_fds

    def enable(self) -> None:
        """Attach every hook to the cgroup (or switch existing pinned links to these programs)."""
        attach_all(self._program_fds, cgroup_path=self.cgroup_path, pin_dir=self.pin_dir)

    def disable(self) -> None:
        """Detach every hook; the maps and their contents stay."""
        detach_all(self.pin_dir)

    def attached_programs(self) -> list[AttachedProgram]:
        """The hooks attached to this instance's cgroup, as the kernel reports them."""
        return attached_programs(cgroup_path=self.cgroup_path, pin_dir=self.pin_dir)

    @property
    def enabled(self) -> bool:
        return len(self.attached_programs()) == len(HOOKS)

    # --- lifetime ---------------------------------------------------------------------------

    def close(self) -> None:
        """Release this process's descriptors. Pinned maps and links (the data plane) stay."""
        bpf, self._bpf = self._bpf, None
        if bpf is not None:
            bpf.cleanup()

    def __enter__(self) -> ConnectTimeLB:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def attach_all(program_fds: Mapping[str, int], *, cgroup_path: Path, pin_dir: Path) -> None:
    """Attach every hook's program (`program_fds`: hook name -> fd) to the cgroup through a
    link pinned in `pin_dir`, or switch an existing pinned link to it (BPF_LINK_UPDATE)."""
    cgroup_id = os.stat(cgroup_path).st_ino
    cgroup_fd = os.open(cgroup_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for hook in HOOKS:
            _attach(
                hook,
                program_fds[hook.name],
                pin=pin_dir / link_pin_name(hook),
                cgroup=(cgroup_fd, cgroup_id, cgroup_path),
            )
    finally:
        os.close(cgroup_fd)


def _attach(hook: Hook, program_fd: int, *, pin: Path, cgroup: tuple[int, int, Path]) -> None:
    cgroup_fd, cgroup_id, cgroup_path = cgroup
    existing = libbpf.open_pinned(pin)
    if existing is not None:
        try:
            info = libbpf.link_info(existing)
            same_hook = (
                info is not None
                and info.cgroup_id == cgroup_id
                and info.attach_type == hook.attach_type
            )
            if same_hook and libbpf.lib().bpf_link_update(existing, program_fd, None) == 0:
                return
            # Another cgroup, or a link gone defunct (its cgroup was removed): replace it.
            libbpf.lib().bpf_link_detach(existing)
        finally:
            os.close(existing)
        pin.unlink(missing_ok=True)
    link_fd = libbpf.lib().bpf_link_create(program_fd, cgroup_fd, hook.attach_type, None)
    if link_fd < 0:
        raise ProgramError(f"attaching {hook.program} to {cgroup_path}: {libbpf.strerror(link_fd)}")
    try:
        result = libbpf.lib().bpf_obj_pin(link_fd, os.fsencode(pin))
        if result < 0:
            raise ProgramError(f"pinning the {hook.name} link at {pin}: {libbpf.strerror(result)}")
    finally:
        os.close(link_fd)


def detach_all(pin_dir: Path) -> None:
    """Detach every hook's pinned link in `pin_dir`; the maps and their contents stay."""
    failures = []
    for hook in HOOKS:
        try:
            detach_pinned_link(pin_dir / link_pin_name(hook))
        except ProgramError as exc:
            failures.append(f"{hook.name}: {exc}")
    if failures:
        raise ProgramError("detaching: " + "; ".join(failures))


def attached_programs(*, cgroup_path: Path, pin_dir: Path) -> list[AttachedProgram]:
    """The hooks whose pinned link in `pin_dir` is attached to the cgroup, as the kernel
    reports them."""
    cgroup_id = os.stat(cgroup_path).st_ino
    attached = []
    for hook in HOOKS:
        link_fd = libbpf.open_pinned(pin_dir / link_pin_name(hook))
        if link_fd is None:
            continue
        try:
            info = libbpf.link_info(link_fd)
        finally:
            os.close(link_fd)
        if info is None or info.cgroup_id != cgroup_id or info.attach_type != hook.attach_type:
            continue
        attached.append(
            AttachedProgram(
                hook=hook.name,
                program=libbpf.program_name(info.program_id, expected=hook.program),
                program_id=info.program_id,
                link_id=info.link_id,
            )
        )
    return attached


def link_pin_name(hook: Hook) -> str:
    """The name of a hook's pinned link in the pin dir."""
    return f"link_{hook.name}"


@dataclass(frozen=True, slots=True)
class DetachedLink:
    program: str  # the program the link held ("" when it was already defunct)
    program_id: int
    cgroup_id: int  # the inode of the cgroup it was attached to (0 when unknown)


def detach_pinned_link(pin: Path) -> DetachedLink | None:
    """Detach the BPF link pinned at `pin` and remove the pin; None when there is no pin.

    Detaching (not only unpinning) takes the program off the cgroup even if some process
    still holds a descriptor of the link. An already defunct link (its cgroup was removed)
    counts as detached."""
    link_fd = libbpf.open_pinned(pin)
    if link_fd is None:
        return None
    try:
        info = libbpf.link_info(link_fd)
        # Named before the detach: afterwards the program may be gone.
        detached = (
            DetachedLink(
                program=libbpf.program_name(
                    info.program_id, expected=_hook_program(info.attach_type)
                ),
                program_id=info.program_id,
                cgroup_id=info.cgroup_id,
            )
            if info is not None
            else DetachedLink(program="", program_id=0, cgroup_id=0)
        )
        result = libbpf.lib().bpf_link_detach(link_fd)
        if result < 0 and -result != errno.ENOLINK:
            raise ProgramError(f"detaching the link pinned at {pin}: {libbpf.strerror(result)}")
    finally:
        os.close(link_fd)
    pin.unlink(missing_ok=True)
    return detached


@dataclass(frozen=True, slots=True)
class CgroupProgram:
    hook: str
    program: str  # the kernel's name for it (15 characters at most, or our full name)
    program_id: int


def programs_on_cgroup(cgroup_path: Path) -> list[CgroupProgram]:
    """Every program attached directly to the cgroup at one of apilane's hooks, whoever
    attached it and however (link or legacy attach). Read-only: BPF_PROG_QUERY."""
    cgroup_fd = os.open(cgroup_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    found = []
    try:
        for hook in HOOKS:
            try:
                program_ids = libbpf.query_programs(cgroup_fd, hook.attach_type)
            except ProgramError as exc:
                raise ProgramError(
                    f"querying {hook.name} programs of {cgroup_path}: {exc}"
                ) from exc
            for program_id in program_ids:
                name = libbpf.program_name(program_id, expected=hook.program)
                found.append(CgroupProgram(hook=hook.name, program=name, program_id=program_id))
    finally:
        os.close(cgroup_fd)
    return found


def _hook_program(attach_type: int) -> str:
    return next((h.program for h in HOOKS if h.attach_type == attach_type), "")


# --- bcc -----------------------------------------------------------------------------------


def _compile(source_dir: Path, pin_dir: Path) -> Any:
    source = source_dir / SOURCE_FILE
    if not source.is_file():
        raise ProgramError(f"{source} not found (set APILANE_BPF_DIR)")
    try:
        from bcc import BPF
    except ImportError as exc:
        raise ProgramError("bcc is not importable: run tools/setup-bpf.sh") from exc
    pin_text = str(pin_dir).replace("\\", "\\\\").replace('"', '\\"')
    try:
        return BPF(
            src_file=os.fsencode(source),
            cflags=[f'-DAPILANE_PIN_DIR="{pin_text}"', f"-I{source_dir}"],
        )
    except Exception as exc:
        raise ProgramError(f"compiling {source}: {exc}") from exc


def _map_names() -> list[str]:
    names = [name for pair in TABLE_NAMES.values() for name in pair]
    return [*names, *REVERSE_TABLE_NAMES.values(), CONNECTION_TABLE_NAME]


def remove_superseded_pins(bpf: Any, pin_dir: Path) -> list[str]:
    """Unlink `<map>_<version>` pins in `pin_dir` that are not the maps `bpf` uses (their
    layout was superseded); returns the names removed. The pin name is never parsed: a pin is
    superseded when it holds another map than the one bcc opened for that name."""
    removed = []
    for name in _map_names():
        current = libbpf.map_id(int(bpf.get_table(name.encode()).map_fd))
        for pin in sorted(pin_dir.glob(f"{name}_*")):
            try:
                fd = libbpf.open_pinned(pin)
            except ProgramError:
                continue  # not a BPF object: not ours to remove
            if fd is None:
                continue
            try:
                pinned = libbpf.map_id(fd)
            finally:
                os.close(fd)
            if current is not None and pinned is not None and pinned != current:
                with contextlib.suppress(FileNotFoundError):
                    pin.unlink()
                    removed.append(pin.name)
    return removed


def release_free_heap() -> None:
    """Give the memory the compiler freed back to the kernel (glibc's malloc_trim).

    clang/LLVM allocate ~40 MB of heap while compiling and free it when bcc is done, but
    glibc keeps freed heap pages mapped (they stay resident) unless they happen to sit at the
    top of the heap. The loader compiles once and then runs for the node's lifetime, so
    trimming once after the compile is what keeps its resident memory near the Python
    baseline. A no-op on a C library without malloc_trim (musl).
    """
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):
        return
    trim.argtypes = [ctypes.c_size_t]
    trim(0)
