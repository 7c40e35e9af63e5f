"""`PinnedLB`: the loader's side of the data plane, on pins only (bcc stays in a child).

bcc keeps clang/LLVM mapped for the life of the process that imports it (~140 MB resident).
The loader runs for the node's lifetime, so it never imports bcc: `run_compiler` runs
`python -m apilane.node_loader.compile` (compile.py), which pins the maps and hands over the
loaded programs' descriptors; this process then opens the maps by their pins
(pinnedmaps.py) and attaches the programs through pinned links (programs.attach_all, the
same atomic BPF_LINK_UPDATE as before).

Fail static: a child that fails (compile error, kernel refusal, wrong layout) is a
`CompilerError` carrying its stderr tail. At start, when the maps are already pinned from an
earlier run, the loader opens them anyway and keeps serving (the programs attached by the
earlier run stay attached); `enable()` then retries the child and reports its error while
the links stay as they were. Nothing here clears a map or detaches on a failure.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from apilane.node_loader.bpfmaps import CONNECTION_TABLE_NAME
from apilane.node_loader.libbpf import ProgramError
from apilane.node_loader.mounts import check_cgroup, check_pin_dir
from apilane.node_loader.pinnedmaps import LAYOUTS, PinnedConnections, PinnedNatMaps, check_layouts
from apilane.node_loader.programs import (
    DEFAULT_PIN_DIR,
    HOOKS,
    AttachedProgram,
    attach_all,
    attached_programs,
    detach_all,
)

log = logging.getLogger(__name__)

COMPILER_MODULE = "apilane.node_loader.compile"
# The pin suffixes bpf/nat.h gives each map (APILANE_*_LAYOUT): what a loader whose child
# failed opens to keep serving. The child's report is checked against them.
LAYOUT_VERSIONS: dict[str, str] = {
    "apilane_fe4": "v1",
    "apilane_fe6": "v1",
    "apilane_be4": "v1",
    "apilane_be6": "v1",
    CONNECTION_TABLE_NAME: "v1",
}
_STDERR_TAIL = 2000  # characters of the child's stderr kept in the error


class CompilerError(ProgramError):
    """The compile child failed; `stderr` is the tail of what it wrote."""

    def __init__(self, message: str, *, stderr: str = "", returncode: int | None = None) -> None:
        tail = stderr.strip()[-_STDERR_TAIL:]
        super().__init__(f"{message}: {tail}" if tail else message)
        self.stderr = tail
        self.returncode = returncode


@dataclass
class Compiled:
    """What one compile child handed over."""

    pins: dict[str, Path]
    layout_versions: dict[str, str]
    program_ids: dict[str, int]
    removed_pins: list[str]
    program_fds: dict[str, int] = field(default_factory=dict)

    def close(self) -> None:
        fds, self.program_fds = self.program_fds, {}
        for fd in fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)


def compiler_command(
    *, cgroup_path: Path, pin_dir: Path, source_dir: Path | None, allow_root_cgroup: bool
) -> list[str]:
    command = [sys.executable, "-m", COMPILER_MODULE, "--cgroup", str(cgroup_path)]
    command += ["--pin-dir", str(pin_dir)]
    if source_dir is not None:
        command += ["--source-dir", str(source_dir)]
    if allow_root_cgroup:
        command.append("--allow-root-cgroup")
    return command


def run_compiler(command: Sequence[str], *, timeout: float = 120.0) -> Compiled:
    """Run the compile child; its programs' descriptors, pins and layouts, checked."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with ours:
        try:
            child = subprocess.run(
                [*command, "--fd-socket", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise CompilerError(f"running the compiler: {exc}") from exc
        finally:
            theirs.close()
        if child.returncode != 0:
            raise CompilerError(
                f"the compiler exited with {child.returncode}",
                stderr=child.stderr,
                returncode=child.returncode,
            )
        program_fds = _receive_programs(ours)
    compiled = Compiled(pins={}, layout_versions={}, program_ids={}, removed_pins=[])
    compiled.program_fds = program_fds
    try:
        _fill(compiled, child.stdout)
    except BaseException:
        compiled.close()
        raise
    return compiled


def _receive_programs(channel: socket.socket) -> dict[str, int]:
    channel.setblocking(False)
    try:
        message, fds, _, _ = socket.recv_fds(channel, 4096, len(HOOKS))
    except OSError as exc:
        raise CompilerError(f"the compiler handed over no programs: {exc}") from exc
    hooks = json.loads(message)
    if sorted(hooks) != sorted(h.name for h in HOOKS) or len(fds) != len(hooks):
        for fd in fds:
            os.close(fd)
        raise CompilerError(f"the compiler handed over {len(fds)} programs for {hooks}")
    return dict(zip(hooks, fds, strict=True))


def _fill(compiled: Compiled, stdout: str) -> None:
    try:
        result: dict[str, Any] = json.loads(stdout.strip().splitlines()[-1])
        check_layouts(result["layouts"])
        compiled.pins = {name: Path(result["pins"][name]) for name in LAYOUTS}
        compiled.layout_versions = {name: result["layout_versions"][name] for name in LAYOUTS}
        compiled.program_ids = dict(result["programs"])
        compiled.removed_pins = list(result["removed_pins"])
    except ProgramError as exc:
        raise CompilerError(str(exc)) from exc
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise CompilerError(f"unreadable compiler result {stdout[-_STDERR_TAIL:]!r}") from exc
    if compiled.layout_versions != LAYOUT_VERSIONS:
        raise CompilerError(
            f"map layout versions {compiled.layout_versions} != the loader's {LAYOUT_VERSIONS}"
        )


def existing_pins(pin_dir: Path) -> dict[str, Path] | None:
    """The pins this loader's layouts use, when every one of them exists."""
    pins = {name: pin_dir / f"{name}_{LAYOUT_VERSIONS[name]}" for name in LAYOUTS}
    return pins if all(pin.exists() for pin in pins.values()) else None


class PinnedLB:
    """The connect-time load balancer of one node, driven through its pins.

    Same interface as `programs.ConnectTimeLB` (what control.ProgramsControl needs, plus
    `nat_maps` and `connections`), without bcc in this process."""

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
        check_cgroup(self.cgroup_path, allow_root_cgroup=allow_root_cgroup)
        check_pin_dir(self.pin_dir)
        self._command = compiler_command(
            cgroup_path=self.cgroup_path,
            pin_dir=self.pin_dir,
            source_dir=Path(source_dir) if source_dir is not None else None,
            allow_root_cgroup=allow_root_cgroup,
        )
        self._compiled: Compiled | None = None
        self.load_error: CompilerError | None = None
        try:
            self._compiled = run_compiler(self._command)
            pins = self._compiled.pins
        except CompilerError as exc:
            found = existing_pins(self.pin_dir)
            if found is None:
                raise
            # Fail static: serve the maps the data plane already uses.
            self.load_error = exc
            pins = found
            log.error(
                "compiling the programs failed; serving the pinned maps as they are",
                extra={"error": str(exc), "pin_dir": str(self.pin_dir)},
            )
        self.pins: dict[str, Path] = dict(pins)  # map name -> the pin this loader uses
        self.nat_maps = PinnedNatMaps(pins, use_batch=use_batch)
        self.connections = PinnedConnections(pins[CONNECTION_TABLE_NAME])

    @property
    def removed_pins(self) -> list[str]:
        return self._compiled.removed_pins if self._compiled is not None else []

    @property
    def program_ids(self) -> Mapping[str, int]:
        return self._compiled.program_ids if self._compiled is not None else {}

    def enable(self) -> None:
        """Attach every hook (or switch the pinned links to these programs); when the start's
        compile failed, compile again first (its error is raised, the links stay as they
        were)."""
        if self._compiled is None:
            self._compiled = run_compiler(self._command)
            self.load_error = None
        attach_all(self._compiled.program_fds, cgroup_path=self.cgroup_path, pin_dir=self.pin_dir)

    def disable(self) -> None:
        detach_all(self.pin_dir)

    def attached_programs(self) -> list[AttachedProgram]:
        return attached_programs(cgroup_path=self.cgroup_path, pin_dir=self.pin_dir)

    @property
    def enabled(self) -> bool:
        return len(self.attached_programs()) == len(HOOKS)

    def close(self) -> None:
        """Release this process's descriptors. Pinned maps and links (the data plane) stay."""
        self.nat_maps.close()
        self.connections.close()
        if self._compiled is not None:
            self._compiled.close()

    def __enter__(self) -> PinnedLB:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
