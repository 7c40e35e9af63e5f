"""Process and port helpers shared by the component fixtures and the local stack.

`start_process` is the one way a child process is started here (etcd, kube-apiserver,
nats-server, the services, the tracing UI): in a session of its own, so Ctrl-C in a terminal
reaches only its owner, which then stops each child in order; and killed with its owner, so a
test runner or `apilane up` killed outright leaves nothing behind. Every process is ended by
the pid we started, never by name.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path


class ComponentMissing(RuntimeError):
    """A real component a test needs is not installed; the message says how to install it."""


class ProcessExited(RuntimeError):
    """A process we started has exited while it was expected to run; the message has its log."""


def _die_with_parent() -> None:
    # If the owner is killed outright, its children must not outlive it.
    PR_SET_PDEATHSIG = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


# PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, not the process. Tests
# often restart components from short-lived threads (asyncio.to_thread), so every child is
# forked from this one long-lived thread instead.
_SPAWNER = concurrent.futures.ThreadPoolExecutor(
    max_workers=1, thread_name_prefix="apilane-spawner"
)


def start_process(
    argv: Sequence[str],
    *,
    log_path: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    stdin_pipe: bool = False,
) -> subprocess.Popen[bytes]:
    """Start `argv` with stdout and stderr appended to `log_path`; no stdin unless
    `stdin_pipe` (a pipe the caller closes to tell the process to finish)."""

    def spawn() -> subprocess.Popen[bytes]:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log_file:
            return subprocess.Popen(
                list(argv),
                env=None if env is None else dict(env),
                cwd=cwd,
                stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,  # noqa: PLW1509 - only a prctl, safe before exec
            )

    return _SPAWNER.submit(spawn).result()


def end_process(proc: subprocess.Popen[bytes] | None, *, grace: float = 5.0) -> None:
    """SIGTERM the process we started (by its pid), then SIGKILL after `grace` seconds."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=grace)


def kill_process(proc: subprocess.Popen[bytes] | None, *, grace: float = 10.0) -> None:
    """SIGKILL the pid we started: a crash, no graceful shutdown."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=grace)


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (one we may not be allowed to signal counts)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def free_port(host: str = "127.0.0.1", *, prefer: int | None = None) -> int:
    """A TCP port that was free a moment ago: `prefer` when it is, else one the kernel picks."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if prefer:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            # As the servers themselves do: a port in TIME_WAIT from the last run is free.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            with contextlib.suppress(OSError):
                sock.bind((host, prefer))
                return prefer
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_until(
    check: Callable[[], bool], *, timeout: float, interval: float = 0.05, what: str
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {what}")


def port_open(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
        return True
    return False


def http_ok(url: str, *, timeout: float = 1.0) -> bool:
    """Whether a plain-HTTP GET of `url` answers 2xx right now."""
    with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=timeout) as response:
        return bool(200 <= response.status < 300)
    return False


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
