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
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from apilane.node_loader import reuse
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
    default_source_dir,
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


class CompilerRun:
    """One compile child, started at construction; `result()` waits for it and takes what it
    handed over, once.

    The loader starts it as early as it can (`__main__`, before its own heavy imports), so
    clang compiles while this interpreter imports the rest. The child's stdout and stderr go
    to in-memory files, not pipes: nobody reads them until `result()`, and a child writing a
    lot of warnings must not block on a full pipe meanwhile."""

    def __init__(self, command: Sequence[str], *, timeout: float = 120.0) -> None:
        self.command = list(command)
        self.started = time.monotonic()
        self.finished: float | None = None
        self._deadline = self.started + timeout
        # In memory (memfd): no file system needed, gone with the last descriptor.
        self._stdout = open(os.memfd_create("apilane-compile-stdout"), "w+b")  # noqa: SIM115
        self._stderr = open(os.memfd_create("apilane-compile-stderr"), "w+b")  # noqa: SIM115
        self._channel, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self._child: subprocess.Popen[bytes] | None = subprocess.Popen(
                [*self.command, "--fd-socket", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=self._stdout,
                stderr=self._stderr,
            )
        except OSError as exc:
            self._release()
            raise CompilerError(f"running the compiler: {exc}") from exc
        finally:
            theirs.close()

    @property
    def pid(self) -> int | None:
        return self._child.pid if self._child is not None else None

    @property
    def taken(self) -> bool:
        """True once `result()` or `abandon()` was called."""
        return self._child is None

    def result(self) -> Compiled:
        """Wait for the child (until the timeout given at start); its programs' descriptors,
        pins and layouts, checked. A failed child is a `CompilerError`."""
        child = self._child
        if child is None:
            raise CompilerError("the compiler's result was already taken")
        try:
            returncode = child.wait(timeout=max(0.0, self._deadline - time.monotonic()))
        except subprocess.TimeoutExpired as exc:
            self.abandon()
            raise CompilerError(f"running the compiler: {exc}") from exc
        self.finished = time.monotonic()
        try:
            stdout, stderr = _read_all(self._stdout), _read_all(self._stderr)
            if returncode != 0:
                raise CompilerError(
                    f"the compiler exited with {returncode}", stderr=stderr, returncode=returncode
                )
            program_fds = _receive_programs(self._channel)
        finally:
            self._release()
        compiled = Compiled(pins={}, layout_versions={}, program_ids={}, removed_pins=[])
        compiled.program_fds = program_fds
        try:
            _fill(compiled, stdout)
        except BaseException:
            compiled.close()
            raise
        return compiled

    def abandon(self) -> None:
        """End the child if it still runs (by its pid) and release what it left; a no-op once
        the result was taken. The maps it may have pinned stay: they are the data plane's."""
        child = self._child
        if child is None:
            return
        if child.poll() is None:
            child.kill()
        child.wait()
        # Programs it handed over before it was ended: close this process's copies.
        self._channel.setblocking(False)  # recv_fds ignores its flags argument
        with contextlib.suppress(OSError):
            _, fds, _, _ = socket.recv_fds(self._channel, 4096, len(HOOKS))
            for fd in fds:
                os.close(fd)
        self._release()

    def _release(self) -> None:
        self._child = None
        self._stdout.close()
        self._stderr.close()
        self._channel.close()


def _read_all(file: IO[bytes]) -> str:
    file.seek(0)
    return file.read().decode(errors="replace")


def run_compiler(command: Sequence[str], *, timeout: float = 120.0) -> Compiled:
    """Run the compile child and wait for it: see `CompilerRun.result`."""
    return CompilerRun(command, timeout=timeout).result()


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


def start_compiler(
    *,
    cgroup_path: Path | str,
    pin_dir: Path | str = DEFAULT_PIN_DIR,
    source_dir: Path | str | None = None,
    allow_root_cgroup: bool = False,
) -> CompilerRun:
    """Start the compile child for these settings, after the same safety checks as
    `PinnedLB` (never the root cgroup unless allowed); hand it to `PinnedLB(compiling=...)`."""
    check_cgroup(Path(cgroup_path), allow_root_cgroup=allow_root_cgroup)
    check_pin_dir(Path(pin_dir))
    return CompilerRun(
        compiler_command(
            cgroup_path=Path(cgroup_path),
            pin_dir=Path(pin_dir),
            source_dir=Path(source_dir) if source_dir is not None else None,
            allow_root_cgroup=allow_root_cgroup,
        )
    )


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
        compiling: CompilerRun | None = None,
        build_stamp: Path | None = None,
    ) -> None:
        """`compiling`: a compile child already started for the same settings
        (`start_compiler`); its result is used instead of running another. One started for
        other settings is ended and a fresh one runs.

        `build_stamp`: where to record each compile, and, with no child started, what lets a
        restart reuse the pinned maps and attached programs without compiling (reuse.py)."""
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
        self._source_dir = Path(source_dir) if source_dir is not None else default_source_dir()
        self._build_stamp = build_stamp
        self._compiled: Compiled | None = None
        self.load_error: CompilerError | None = None
        self.reused = False
        try:
            if compiling is None and build_stamp is not None:
                self._compiled = self._reuse(build_stamp)
                self.reused = self._compiled is not None
            if self._compiled is None:
                self._compiled = self._take(compiling)
                self._stamp(self._compiled)
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

    def _reuse(self, stamp_file: Path) -> Compiled | None:
        pins = existing_pins(self.pin_dir)
        stamp, why = reuse.check(
            stamp_file,
            digest=reuse.build_digest(self._source_dir, self.pin_dir),
            pins=pins,
            pin_dir=self.pin_dir,
            cgroup_path=self.cgroup_path,
        )
        reused = reuse.reuse(stamp, pins) if stamp is not None and pins is not None else None
        if reused is None:
            log.info("compiling the programs", extra={"why": why or "a program is gone"})
            return None
        log.info(
            "reusing the pinned maps and the attached programs: they match the build stamp",
            extra={"build_stamp": str(stamp_file), "programs": reused.program_ids},
        )
        compiled = Compiled(
            pins=reused.pins,
            layout_versions=dict(LAYOUT_VERSIONS),
            program_ids=reused.program_ids,
            removed_pins=[],
        )
        compiled.program_fds = reused.program_fds
        return compiled

    def _stamp(self, compiled: Compiled) -> None:
        """Record this compile for the next start; failing to is only a slower restart."""
        if self._build_stamp is None:
            return
        try:
            stamp = reuse.make_stamp(
                reuse.build_digest(self._source_dir, self.pin_dir),
                program_ids=compiled.program_ids,
                pins=compiled.pins,
            )
            reuse.write_stamp(self._build_stamp, stamp)
        except (OSError, ProgramError) as exc:
            log.warning(
                "cannot write the build stamp: the next start compiles again",
                extra={"build_stamp": str(self._build_stamp), "error": str(exc)},
            )

    def _take(self, compiling: CompilerRun | None) -> Compiled:
        if compiling is not None and compiling.command != self._command:
            log.warning(
                "the compiler started early was for other settings; compiling again",
                extra={"started": compiling.command, "wanted": self._command},
            )
            compiling.abandon()
            compiling = None
        run = compiling or CompilerRun(self._command)
        waited_from = time.monotonic()
        try:
            return run.result()
        finally:
            done = run.finished or time.monotonic()
            log.info(
                "compile child done",
                extra={
                    "started_early": compiling is not None,
                    "child_s": round(done - run.started, 3),
                    "waited_s": round(max(0.0, done - waited_from), 3),
                },
            )

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
