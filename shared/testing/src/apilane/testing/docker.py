"""A Docker daemon for the run-mode tests: the one already reachable, else our own dockerd.

No daemon runs on the development machines by default, so when neither $DOCKER_HOST nor
/var/run/docker.sock answers, `DockerDaemon` starts Debian's dockerd (tools/setup-docker.sh
installs it) on a socket, exec-root and pidfile of its own, with a data-root that outlives the
daemon (images built once stay cached). It is ended by the pid we started, and the cgroups
its containers lived in are removed after it.

The daemon stays off the host's firewall and routing: no iptables rules, no masquerade, no
ip_forward, no default bridge. Containers on a compose network reach each other over their
bridge and the host through published loopback ports (docker-proxy); nothing they send can be
routed off the machine. Builds that need the package registries use the host's network.

Only one of our daemons can own a data-root, so a session holds an exclusive lock on it for
as long as its daemon runs; a second session waits for the first.
"""

from __future__ import annotations

import contextlib
import fcntl
import http.client
import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from apilane.testing.procs import ComponentMissing, end_process, start_process, tail

DEFAULT_SOCKET = "/var/run/docker.sock"
READY_TIMEOUT = 60.0
STOP_GRACE = 30.0
LOCK_TIMEOUT = 1200.0
# Compose networks of our daemon come from here: a range nothing else on the machine uses.
ADDRESS_POOL = "10.213.0.0/16"
# Containers' cgroups live under this parent in every hierarchy, so teardown finds them.
CGROUP_PARENT = "apilane-docker"
CGROUP_ROOT = Path("/sys/fs/cgroup")


def data_root() -> Path:
    return Path(os.environ.get("APILANE_DOCKER_DATA_ROOT", "/var/lib/apilane-docker"))


def run_dir() -> Path:
    return Path(os.environ.get("APILANE_DOCKER_RUN_DIR", "/run/apilane-docker"))


# --------------------------------------------------------------------------- pure core


def socket_path(docker_host: str) -> str | None:
    """The unix socket a DOCKER_HOST value names, or None for anything else (tcp://, ssh://)."""
    if docker_host.startswith("unix://"):
        return docker_host.removeprefix("unix://")
    if docker_host.startswith("/"):
        return docker_host
    return None


def dockerd_argv(*, socket: Path, data: Path, run: Path, config: Path) -> list[str]:
    """dockerd's command line: own socket/state, overlay2, cgroupfs, no firewall or routing."""
    return [
        "dockerd",
        f"--host=unix://{socket}",
        f"--data-root={data}",
        f"--exec-root={run / 'exec'}",
        f"--pidfile={run / 'dockerd.pid'}",
        f"--config-file={config}",
        "--storage-driver=overlay2",
        "--exec-opt=native.cgroupdriver=cgroupfs",
        f"--cgroup-parent=/{CGROUP_PARENT}",
        "--iptables=false",
        "--ip-forward=false",
        "--ip-masq=false",
        "--bridge=none",
        f"--default-address-pool=base={ADDRESS_POOL},size=24",
        "--userland-proxy=true",
        "--log-level=warn",
    ]


def cgroup_dirs(root: Path = CGROUP_ROOT) -> list[Path]:
    """Every `apilane-docker` cgroup directory under `root`, deepest first (rmdir order)."""
    found = [
        Path(path)
        for hierarchy in sorted(root.iterdir())
        if (hierarchy / CGROUP_PARENT).is_dir()
        for path, _, _ in os.walk(hierarchy / CGROUP_PARENT)
    ]
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


# --------------------------------------------------------------------------- I/O


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.socket_path)
        self.sock = sock


def api_get(path: str, request: str, *, timeout: float = 5.0) -> Any:
    """GET `request` from the Docker API on the unix socket `path`; JSON decoded when it is."""
    connection = _UnixConnection(path, timeout)
    try:
        connection.request("GET", request)
        response = connection.getresponse()
        body = response.read()
    finally:
        connection.close()
    if response.status != 200:
        raise OSError(f"docker API {request}: HTTP {response.status} {body[:200]!r}")
    if response.getheader("Content-Type", "").startswith("application/json"):
        return json.loads(body)
    return body.decode()


def answers(path: str) -> bool:
    with contextlib.suppress(OSError):
        return bool(api_get(path, "/_ping", timeout=2.0) == "OK")
    return False


@dataclass
class DockerDaemon:
    """A reachable Docker daemon: `host` is its DOCKER_HOST, `env` an environment for the
    docker CLI and compose pointing at it. `started` is True when we run it ourselves."""

    host: str = ""
    started: bool = False
    log_path: Path | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    lock: IO[str] | None = field(default=None, repr=False)
    start_seconds: float = 0.0

    @property
    def socket(self) -> str:
        path = socket_path(self.host)
        assert path is not None, self.host
        return path

    def env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        return {**(os.environ if base is None else base), "DOCKER_HOST": self.host}

    def docker(
        self, *args: str, check: bool = True, timeout: float = 600.0, stdin: bytes | None = None
    ) -> subprocess.CompletedProcess[bytes]:
        """Run the docker CLI against this daemon; raises with its stderr when it fails."""
        result = subprocess.run(
            ["docker", *args],
            env=self.env(),
            input=stdin,
            capture_output=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise RuntimeError(
                f"docker {' '.join(args)} failed ({result.returncode}):\n"
                f"{result.stderr.decode(errors='replace').strip()}"
            )
        return result

    def api(self, request: str) -> Any:
        return api_get(self.socket, request)

    def stop(self) -> None:
        """End the dockerd we started (by its pid) and remove its containers' cgroups."""
        if self.proc is not None:
            end_process(self.proc, grace=STOP_GRACE)
            self.proc = None
            remove_cgroups()
            # dockerd leaves the host's netns bind-mounted under its exec-root.
            unmount_under(run_dir() / "exec")
            shutil.rmtree(run_dir() / "exec", ignore_errors=True)
        if self.lock is not None:
            self.lock.close()
            self.lock = None


def mount_points_under(directory: Path, mountinfo: str) -> list[Path]:
    """Mount points at or below `directory` in a /proc/self/mountinfo text, deepest first."""
    points = [Path(line.split()[4]) for line in mountinfo.splitlines() if len(line.split()) > 4]
    inside = [p for p in points if p == directory or directory in p.parents]
    return sorted(set(inside), key=lambda p: len(p.parts), reverse=True)


def unmount_under(directory: Path) -> None:
    mountinfo = Path("/proc/self/mountinfo").read_text()
    for point in mount_points_under(directory, mountinfo):
        subprocess.run(["umount", str(point)], capture_output=True, check=False)


def remove_cgroups() -> list[Path]:
    """rmdir the apilane-docker cgroups (deepest first); returns those still there."""
    for directory in cgroup_dirs():
        with contextlib.suppress(OSError):
            directory.rmdir()
    return cgroup_dirs()


def reachable_daemon() -> DockerDaemon | None:
    """The daemon $DOCKER_HOST or the default socket names, when one answers."""
    configured = os.environ.get("DOCKER_HOST", "")
    if configured:
        path = socket_path(configured)
        if path is None:
            raise ComponentMissing(f"DOCKER_HOST={configured}: only unix sockets are supported")
        return DockerDaemon(host=f"unix://{path}") if answers(path) else None
    if answers(DEFAULT_SOCKET):
        return DockerDaemon(host=f"unix://{DEFAULT_SOCKET}")
    return None


def _take_lock(path: Path, *, timeout: float) -> IO[str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a")  # noqa: SIM115 - held for the daemon's lifetime
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return handle
        except BlockingIOError as exc:
            if time.monotonic() > deadline:
                handle.close()
                raise TimeoutError(
                    f"{path} stayed locked by another session for {timeout:.0f} s"
                ) from exc
            time.sleep(1.0)


def start_own_daemon(*, lock_timeout: float = LOCK_TIMEOUT) -> DockerDaemon:
    """Start dockerd on our own socket; raises ComponentMissing when it cannot run here."""
    if shutil.which("dockerd") is None or shutil.which("docker") is None:
        raise ComponentMissing(
            "no Docker daemon is reachable and dockerd is not installed: run `make setup` "
            "(tools/setup-docker.sh installs Debian's docker.io)"
        )
    if os.geteuid() != 0:
        raise ComponentMissing("no Docker daemon is reachable, and starting one needs root")
    data, run = data_root(), run_dir()
    lock = _take_lock(data.parent / f".{data.name}.lock", timeout=lock_timeout)
    run.mkdir(parents=True, exist_ok=True)
    sock = run / "docker.sock"
    config = run / "daemon.json"
    config.write_text("{}\n")  # never the machine's /etc/docker/daemon.json
    log_path = run / "dockerd.log"
    started = time.monotonic()
    # Forked like every harness child: it dies with the test runner if that is killed.
    proc = start_process(
        dockerd_argv(socket=sock, data=data, run=run, config=config), log_path=log_path
    )
    daemon = DockerDaemon(
        host=f"unix://{sock}", started=True, log_path=log_path, proc=proc, lock=lock
    )
    deadline = time.monotonic() + READY_TIMEOUT
    while not answers(str(sock)):
        if proc.poll() is not None or time.monotonic() > deadline:
            daemon.stop()
            raise ComponentMissing(
                f"dockerd did not start (exit {proc.returncode}); its log {log_path}:\n"
                f"{tail(log_path)}"
            )
        time.sleep(0.1)
    daemon.start_seconds = time.monotonic() - started
    return daemon


@contextlib.contextmanager
def docker_daemon() -> Iterator[DockerDaemon]:
    """The reachable daemon, else our own for the duration of the block."""
    daemon = reachable_daemon() or start_own_daemon()
    try:
        yield daemon
    finally:
        daemon.stop()


def labelled(daemon: DockerDaemon, kind: str, label: str) -> list[str]:
    """Names (or ids) of the containers, networks or volumes carrying `label` (k=v)."""
    listing: Sequence[str] = {
        "container": ["ps", "-a", "--format", "{{.Names}}"],
        "network": ["network", "ls", "--format", "{{.Name}}"],
        "volume": ["volume", "ls", "--format", "{{.Name}}"],
    }[kind]
    result = daemon.docker(*listing, "--filter", f"label={label}")
    return result.stdout.decode().split()
