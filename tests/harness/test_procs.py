"""The harness's one process spawner and its port helpers, with real processes: a child runs
in a session of its own, logs to its file, takes the environment it is given, dies with its
owner, and readiness waits fail fast with the log when the process exits."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from apilane.testing import procs
from apilane.testing.stack import ServiceProcesses

pytestmark = [pytest.mark.integration]


def test_a_child_has_its_own_session_its_log_and_the_given_environment(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "child.log"
    script = "import os; print(os.environ['GREETING'], os.getsid(0) == os.getpid())"
    child = procs.start_process(
        [sys.executable, "-c", script], log_path=log, env={"GREETING": "hello"}, cwd=tmp_path
    )
    assert child.wait(timeout=30) == 0
    again = procs.start_process([sys.executable, "-c", "print('again')"], log_path=log)
    assert again.wait(timeout=30) == 0
    assert log.read_text().splitlines() == ["hello True", "again"]  # appended, not replaced


def test_a_child_dies_with_its_owner(tmp_path: Path) -> None:
    owner_script = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        from apilane.testing.procs import start_process
        child = start_process(["sleep", "60"], log_path=Path({str(tmp_path / "sleep.log")!r}))
        print(child.pid, flush=True)
        time.sleep(60)
        """
    )
    owner = subprocess.Popen([sys.executable, "-c", owner_script], stdout=subprocess.PIPE)
    try:
        assert owner.stdout is not None
        child_pid = int(owner.stdout.readline())
        assert procs.pid_alive(child_pid)
        procs.kill_process(owner)  # killed outright: no clean-up of its own runs
        deadline = time.monotonic() + 10
        while _running(child_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _running(child_pid), "the child outlived its owner"
    finally:
        procs.kill_process(owner)
        if owner.stdout is not None:
            owner.stdout.close()


def _running(pid: int) -> bool:
    """Alive and not a zombie waiting for init to reap it."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def test_a_preferred_port_is_taken_when_free_and_another_when_not() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        held = holder.getsockname()[1]
        other = procs.free_port(prefer=held)
        assert other != held
    free = procs.free_port()
    assert procs.free_port(prefer=free) == free


def test_pid_alive_tells_a_running_process_from_an_ended_one() -> None:
    assert procs.pid_alive(os.getpid())
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    assert not procs.pid_alive(ended.pid)
    assert not procs.pid_alive(0)


def test_wait_ready_returns_once_the_process_answers(tmp_path: Path) -> None:
    port = procs.free_port()
    stack = ServiceProcesses(tmp_path, cwd=tmp_path)
    try:
        stack.start_command(
            "web",
            [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
            os.environ,
        )
        stack.wait_ready("web", f"http://127.0.0.1:{port}/", timeout=30)
        assert procs.http_ok(f"http://127.0.0.1:{port}/")
    finally:
        stack.stop()
    assert stack.processes["web"].poll() is not None


def test_wait_ready_fails_fast_with_the_log_when_the_process_exits(tmp_path: Path) -> None:
    stack = ServiceProcesses(tmp_path, cwd=tmp_path)
    script = "import sys; print('cannot start: no config'); sys.exit(3)"
    try:
        stack.start_command("broken", [sys.executable, "-c", script], os.environ)
        started = time.monotonic()
        with pytest.raises(procs.ProcessExited, match="broken exited with 3") as raised:
            stack.wait_ready("broken", "http://127.0.0.1:9/", timeout=30)
        assert time.monotonic() - started < 15
        assert "cannot start: no config" in str(raised.value)
    finally:
        stack.stop()
