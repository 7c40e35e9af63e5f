"""Test harness for the live kernel's eBPF through bcc: cgroups, namespaces, pins, processes.

Safety rules, enforced here (README "Development"):
- BPF programs are attached only to a fresh child cgroup under the cgroup2 mount
  (`<mount>/apilane-test-<id>`), never to the root; only processes we start join it.
- Every connect() to a service address is made by an *agent* process that first joins the test
  cgroup and then a network namespace we created; namespaces have no default route, so an
  untranslated service address is unreachable (ENETUNREACH). Host-namespace addresses are
  never used.
- `BpfLab.close()` removes everything it created, in reverse order: processes (ended by the pid
  we started), cgroups (after moving our processes back out), namespaces, pinned objects.

The agent and the backend servers are this module run as `python -m apilane.testing.bpf`;
they speak JSON lines on stdin/stdout. Only the standard library is used here, so pure tests
import it freely; `bpf_fixtures.py` wraps it for pytest.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import importlib.util
import json
import os
import platform
import selectors
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apilane.testing.procs import ComponentMissing, end_process

BPFFS = Path("/sys/fs/bpf")
NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
# Test-only address space (RFC 2544 benchmarking range, and a ULA prefix).
TEST_V4_PREFIX = "198.18"
TEST_V6_PREFIX = "fd00:a11a"
# Service addresses: not routable inside the test namespaces.
SERVICE_VIP4 = "10.96.0.1"
SERVICE_VIP6 = "fd00:10:96::1"
SETUP_HINT = "run `tools/setup-bpf.sh` as root (it installs and links everything needed)"


# --- environment checks ---------------------------------------------------------------------


def _mounts() -> list[tuple[Path, str]]:
    mounts = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        before, _, after = line.partition(" - ")
        mounts.append((Path(before.split()[4]), after.split()[0]))
    return mounts


def cgroup2_mount() -> Path:
    """Where the unified (cgroup2) hierarchy is mounted: /sys/fs/cgroup/unified on hybrid hosts."""
    candidates = [point for point, fstype in _mounts() if fstype == "cgroup2"]
    if not candidates:
        raise ComponentMissing("no cgroup2 hierarchy is mounted; mount one (mount -t cgroup2)")
    return min(candidates, key=lambda point: len(point.parts))


def bpf_environment_problems() -> list[str]:
    """What keeps real eBPF from working here (root, Debian's bcc importable, kernel headers,
    bpffs, cgroup2, iproute2); empty when nothing does."""
    problems = []
    if os.geteuid() != 0:
        problems.append("not running as root (eBPF, cgroups and namespaces need it)")
    if importlib.util.find_spec("bcc") is None:
        problems.append("`import bcc` fails (Debian python3-bpfcc linked into the venv)")
    build = Path("/lib/modules") / platform.release() / "build"
    if not (build / "include").exists():
        problems.append(f"no kernel headers at {build}")
    if not any(point == BPFFS and fstype == "bpf" for point, fstype in _mounts()):
        problems.append(f"bpffs is not mounted at {BPFFS}")
    if shutil.which("ip") is None:
        problems.append("`ip` (iproute2) is not installed")
    try:
        cgroup2_mount()
    except ComponentMissing as exc:
        problems.append(str(exc))
    return problems


def check_bpf_environment() -> Path:
    """Returns the cgroup2 mount; raises ComponentMissing naming what is missing (see
    `bpf_environment_problems`) and how to fix it."""
    problems = bpf_environment_problems()
    if problems:
        raise ComponentMissing("eBPF tests cannot run: " + "; ".join(problems) + f"; {SETUP_HINT}")
    return cgroup2_mount()


# --- namespaces -----------------------------------------------------------------------------


def _run(*args: str) -> None:
    result = subprocess.run(args, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {result.stderr.strip()}")


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"setns: {os.strerror(code)}")


@dataclass(frozen=True)
class NetNamespace:
    name: str

    @property
    def path(self) -> Path:
        return NETNS_DIR / self.name

    def ip(self, *args: str) -> None:
        _run("ip", "-n", self.name, *args)


@contextlib.contextmanager
def entered_netns(namespace: NetNamespace) -> Iterator[None]:
    """Run the block with the *calling thread* inside `namespace` (sockets created there stay
    there); the thread's own namespace is restored afterwards."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    target = os.open(namespace.path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(target)
        os.close(own)


@dataclass(frozen=True)
class Backend:
    """A backend namespace and its addresses on the link to the client."""

    netns: NetNamespace
    ipv4: str
    ipv6: str


@dataclass(frozen=True)
class Topology:
    """One client namespace with a veth to each backend namespace; no default route anywhere.

    Link i: client 198.18.i.1/24 and fd00:a11a:i::1/64, backend 198.18.i.2 and fd00:a11a:i::2.
    """

    client: NetNamespace
    backends: tuple[Backend, ...]


# --- agent and server processes -------------------------------------------------------------


class AgentError(RuntimeError):
    pass


class _JsonProcess:
    """A child process that answers one JSON line per JSON line we send."""

    def __init__(self, args: Sequence[str], *, what: str) -> None:
        self.what = what
        self.process = subprocess.Popen(
            [sys.executable, "-m", "apilane.testing.bpf", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self._selector = selectors.DefaultSelector()
        assert self.process.stdout is not None
        self._selector.register(self.process.stdout, selectors.EVENT_READ)
        self._buffer = b""
        try:
            ready = self._read(timeout=15.0)
            if not ready.get("ready"):
                raise AgentError(f"{what} did not start: {ready}")
        except BaseException:
            self.close()
            raise
        self.info = ready

    @property
    def pid(self) -> int:
        return self.process.pid

    def _read(self, *, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        assert self.process.stdout is not None
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._selector.select(remaining):
                raise AgentError(f"{self.what}: no answer within {timeout:.1f}s")
            chunk = os.read(self.process.stdout.fileno(), 65536)
            if not chunk:
                stderr = (
                    self.process.stderr.read().decode(errors="replace")
                    if self.process.stderr
                    else ""
                )
                raise AgentError(f"{self.what} exited: {stderr[-2000:]}")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def call(self, op: str, *, timeout: float = 20.0, **params: Any) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"op": op, **params}).encode() + b"\n")
        self.process.stdin.flush()
        answer = self._read(timeout=timeout)
        if "fault" in answer:
            raise AgentError(f"{self.what} {op}: {answer['fault']}")
        return answer

    def close(self) -> None:
        with contextlib.suppress(OSError):
            if self.process.stdin is not None:
                self.process.stdin.close()
        end_process(self.process, grace=3.0)
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()
        self._selector.close()


class Agent(_JsonProcess):
    """A client process inside a test cgroup and network namespace. Every method returns plain
    JSON data; addresses are [host, port] lists, errors are errno names ("ENETUNREACH")."""

    def tcp_request(self, host: str, port: int, *, count: int = 1) -> list[dict[str, Any]]:
        """`count` times: connect, getpeername, send a line, read the server's answer, close."""
        return list(self.call("tcp_request", host=host, port=port, count=count)["results"])

    def udp_request(self, host: str, port: int, *, connected: bool = False) -> dict[str, Any]:
        return self.call("udp_request", host=host, port=port, connected=connected)

    def tcp_open(self, name: str, host: str, port: int) -> dict[str, Any]:
        """Open and keep a connection named `name`; returns what tcp_request returns."""
        return self.call("tcp_open", name=name, host=host, port=port)

    def tcp_probe(self, name: str) -> dict[str, Any]:
        """Use the kept connection again: {"alive": bool, "error": errno name or None}."""
        return self.call("tcp_probe", name=name)

    def connect_latency(self, targets: Sequence[tuple[str, int]], *, count: int) -> list[list[int]]:
        """connect() durations in ns per target, targets interleaved round-robin."""
        answer = self.call(
            "connect_latency", targets=[list(t) for t in targets], count=count, timeout=120.0
        )
        return [list(map(int, durations)) for durations in answer["durations"]]


class BackendServer(_JsonProcess):
    """TCP and UDP echo servers inside a namespace, answering with their own address."""


# --- reading pinned maps independently of the loader's codec ------------------------------


def pinned_v4_nat(pin_dir: Path) -> dict[tuple[str, int], set[tuple[str, int]]]:
    """The IPv4 NAT table of one node as the kernel holds it: frontend → backend set.

    Read with bpftool from the pins, so the check does not trust our own map codec.
    """

    def dump_map(name: str) -> list[dict[str, Any]]:
        out = subprocess.run(
            ["bpftool", "-j", "map", "dump", "pinned", str(pin_dir / name)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        return list(json.loads(out))

    def raw(field: list[str]) -> bytes:
        return bytes(int(b, 16) for b in field)

    backends: dict[tuple[int, int], tuple[str, int]] = {}
    for entry in dump_map("apilane_be4_v1"):
        key, value = raw(entry["key"]), raw(entry["value"])
        service_id, ordinal = int.from_bytes(key[0:4], "little"), int.from_bytes(key[4:8], "little")
        ip = ".".join(str(b) for b in value[0:4])
        backends[(service_id, ordinal)] = (ip, int.from_bytes(value[4:6], "big"))
    table: dict[tuple[str, int], set[tuple[str, int]]] = {}
    for entry in dump_map("apilane_fe4_v1"):
        key, value = raw(entry["key"]), raw(entry["value"])
        vip = ".".join(str(b) for b in key[0:4])
        port = int.from_bytes(key[4:6], "big")
        service_id, count = (
            int.from_bytes(value[0:4], "little"),
            int.from_bytes(value[4:8], "little"),
        )
        table[(vip, port)] = {backends[(service_id, n)] for n in range(count)}
    return table


# --- the lab: everything one test (or benchmark) creates ------------------------------------


@dataclass
class BpfLab:
    """Creates cgroups, namespaces, pin directories and processes, and removes them all."""

    cgroup_root: Path = field(default_factory=cgroup2_mount)
    _cgroups: list[Path] = field(default_factory=list)
    _namespaces: list[NetNamespace] = field(default_factory=list)
    _pin_dirs: list[Path] = field(default_factory=list)
    _processes: list[_JsonProcess] = field(default_factory=list)

    def child_cgroup(self) -> Path:
        path = self.cgroup_root / f"apilane-test-{uuid.uuid4().hex[:12]}"
        if path.resolve() == self.cgroup_root.resolve():  # pragma: no cover - defensive
            raise AssertionError("refusing to use the root cgroup")
        path.mkdir()
        self._cgroups.append(path)
        return path

    def pin_dir(self) -> Path:
        path = BPFFS / f"apilane-test-{uuid.uuid4().hex[:12]}"
        path.mkdir()
        self._pin_dirs.append(path)
        return path

    def netns(self, hint: str = "ns") -> NetNamespace:
        namespace = NetNamespace(f"apl-{hint[:6]}-{uuid.uuid4().hex[:8]}")
        _run("ip", "netns", "add", namespace.name)
        self._namespaces.append(namespace)
        namespace.ip("link", "set", "lo", "up")
        return namespace

    def link(
        self,
        a: NetNamespace,
        b: NetNamespace,
        *,
        a_addresses: Sequence[str],
        b_addresses: Sequence[str],
        a_device: str = "veth0",
        b_device: str = "veth0",
    ) -> None:
        """A veth pair between two namespaces (created inside them, never in the host's)."""
        a.ip("link", "add", a_device, "type", "veth", "peer", "name", b_device, "netns", b.name)
        for namespace, device, addresses in (
            (a, a_device, a_addresses),
            (b, b_device, b_addresses),
        ):
            for address in addresses:
                extra = ("nodad",) if ":" in address else ()
                namespace.ip("addr", "add", address, "dev", device, *extra)
            namespace.ip("link", "set", device, "up")

    def topology(self, *, backends: int = 1) -> Topology:
        client = self.netns("client")
        made = []
        for i in range(1, backends + 1):
            backend = self.netns(f"be{i}")
            self.link(
                client,
                backend,
                a_addresses=[f"{TEST_V4_PREFIX}.{i}.1/24", f"{TEST_V6_PREFIX}:{i}::1/64"],
                b_addresses=[f"{TEST_V4_PREFIX}.{i}.2/24", f"{TEST_V6_PREFIX}:{i}::2/64"],
                a_device=f"veth{i}",
            )
            made.append(Backend(backend, f"{TEST_V4_PREFIX}.{i}.2", f"{TEST_V6_PREFIX}:{i}::2"))
        return Topology(client=client, backends=tuple(made))

    def agent(self, *, netns: NetNamespace, cgroup: Path) -> Agent:
        if cgroup.resolve() == self.cgroup_root.resolve():
            raise AssertionError("test processes never join the root cgroup")
        agent = Agent(
            ["agent", "--netns", str(netns.path), "--cgroup", str(cgroup)],
            what=f"agent in {netns.name}",
        )
        self._processes.append(agent)
        return agent

    def server(
        self, *, netns: NetNamespace, addresses: Sequence[str], ports: Sequence[int]
    ) -> BackendServer:
        args = ["serve", "--netns", str(netns.path)]
        for address in addresses:
            args += ["--address", address]
        for port in ports:
            args += ["--port", str(port)]
        server = BackendServer(args, what=f"server in {netns.name}")
        self._processes.append(server)
        return server

    def end(self, process: _JsonProcess) -> None:
        process.close()
        if process in self._processes:
            self._processes.remove(process)

    def close(self) -> None:
        errors: list[str] = []
        for process in reversed(self._processes):
            try:
                process.close()
            except Exception as exc:  # keep cleaning up
                errors.append(f"{process.what}: {exc}")
        self._processes.clear()
        for cgroup in reversed(self._cgroups):
            try:
                _remove_cgroup(cgroup, parent=self.cgroup_root)
            except OSError as exc:
                errors.append(f"cgroup {cgroup}: {exc}")
        self._cgroups.clear()
        for namespace in reversed(self._namespaces):
            result = subprocess.run(
                ["ip", "netns", "delete", namespace.name],
                capture_output=True,
                text=True,
                check=False,
            )
            if result.returncode != 0 and namespace.path.exists():
                errors.append(f"netns {namespace.name}: {result.stderr.strip()}")
        self._namespaces.clear()
        for pin_dir in reversed(self._pin_dirs):
            try:
                shutil.rmtree(pin_dir)
            except FileNotFoundError:
                pass
            except OSError as exc:
                errors.append(f"pin dir {pin_dir}: {exc}")
        self._pin_dirs.clear()
        if errors:
            raise RuntimeError("cleanup incomplete: " + "; ".join(errors))

    def __enter__(self) -> BpfLab:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _remove_cgroup(path: Path, *, parent: Path) -> None:
    """Move what is left (only processes we started ever join) back out, then remove it."""
    if not path.exists():
        return
    deadline = time.monotonic() + 5.0
    while True:
        for pid in (path / "cgroup.procs").read_text().split():
            with contextlib.suppress(ProcessLookupError, OSError):
                (parent / "cgroup.procs").write_text(pid)
        try:
            path.rmdir()
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


# --- the child side: agent and server main loops --------------------------------------------


def _errno_name(exc: OSError) -> str:
    if isinstance(exc, TimeoutError):  # socket.timeout is an alias
        return "ETIMEDOUT"
    return errno.errorcode.get(exc.errno or 0, str(exc))


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _address(sockaddr: Any) -> list[Any]:
    return [sockaddr[0], sockaddr[1]]


def _read_line(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def _tcp_exchange(sock: socket.socket, host: str, port: int) -> dict[str, Any]:
    sock.connect((host, port))
    peer = _address(sock.getpeername())
    sock.sendall(b"hello\n")
    answer = json.loads(_read_line(sock) or b"{}")
    return {"peer": peer, "server": answer.get("server"), "error": None}


class _AgentState:
    def __init__(self) -> None:
        self.kept: dict[str, socket.socket] = {}

    def tcp_request(self, host: str, port: int, count: int) -> dict[str, Any]:
        results = []
        for _ in range(min(count, 10_000)):
            try:
                with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
                    sock.settimeout(3.0)
                    results.append(_tcp_exchange(sock, host, port))
            except OSError as exc:
                results.append({"peer": None, "server": None, "error": _errno_name(exc)})
        return {"results": results}

    def udp_request(self, host: str, port: int, connected: bool) -> dict[str, Any]:
        with socket.socket(_family(host), socket.SOCK_DGRAM) as sock:
            sock.settimeout(3.0)
            try:
                peer = None
                if connected:
                    sock.connect((host, port))
                    peer = _address(sock.getpeername())
                    sock.send(b"hello")
                else:
                    sock.sendto(b"hello", (host, port))
                data, source = sock.recvfrom(4096)
            except OSError as exc:
                return {"error": _errno_name(exc), "source": None, "server": None, "peer": None}
            return {
                "error": None,
                "source": _address(source),
                "peer": peer,
                "server": json.loads(data).get("server"),
            }

    def tcp_open(self, name: str, host: str, port: int) -> dict[str, Any]:
        sock = socket.socket(_family(host), socket.SOCK_STREAM)
        sock.settimeout(3.0)
        try:
            result = _tcp_exchange(sock, host, port)
        except OSError as exc:
            sock.close()
            return {"peer": None, "server": None, "error": _errno_name(exc)}
        self.kept[name] = sock
        return result

    def tcp_probe(self, name: str) -> dict[str, Any]:
        sock = self.kept[name]
        try:
            sock.sendall(b"again\n")
            line = _read_line(sock)
        except OSError as exc:
            return {"alive": False, "error": _errno_name(exc)}
        return {"alive": bool(line), "error": None if line else "EOF"}

    def connect_latency(self, targets: list[list[Any]], count: int) -> dict[str, Any]:
        durations: list[list[int]] = [[] for _ in targets]
        linger = b"\x01\x00\x00\x00\x00\x00\x00\x00"  # SO_LINGER on, 0 s: RST, no TIME_WAIT
        for _ in range(min(count, 20_000)):
            for index, (host, port) in enumerate(targets):
                sock = socket.socket(_family(host), socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
                started = time.perf_counter_ns()
                sock.connect((host, port))
                durations[index].append(time.perf_counter_ns() - started)
                sock.close()
        return {"durations": durations}


def _join(netns_path: str, cgroup: str | None) -> None:
    if cgroup is not None:
        # Join the cgroup first: a socket belongs to the cgroup of the task that creates it.
        Path(cgroup, "cgroup.procs").write_text(str(os.getpid()))
    fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(fd)
    finally:
        os.close(fd)


def _reply(payload: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(payload) + "\n")
    sys.stdout.flush()


def _agent_main(netns_path: str, cgroup: str) -> None:
    _join(netns_path, cgroup)
    state = _AgentState()
    _reply({"ready": True, "pid": os.getpid()})
    for line in sys.stdin:
        request = json.loads(line)
        op = request.pop("op")
        request.pop("timeout", None)
        try:
            _reply(getattr(state, op)(**request))
        except Exception as exc:
            _reply({"fault": f"{type(exc).__name__}: {exc}"})


def _serve_tcp(listener: socket.socket, stop: threading.Event) -> None:
    local = _address(listener.getsockname())
    while not stop.is_set():
        try:
            conn, client = listener.accept()
        except OSError:
            return
        threading.Thread(target=_tcp_session, args=(conn, local, client), daemon=True).start()


def _tcp_session(conn: socket.socket, local: list[Any], client: Any) -> None:
    answer = json.dumps({"server": local, "client": _address(client)}).encode() + b"\n"
    with conn, contextlib.suppress(OSError):
        while _read_line(conn):
            conn.sendall(answer)


def _serve_udp(sock: socket.socket) -> None:
    local = _address(sock.getsockname())
    while True:
        try:
            _, client = sock.recvfrom(4096)
            sock.sendto(json.dumps({"server": local, "client": _address(client)}).encode(), client)
        except OSError:
            return


def _server_main(netns_path: str, addresses: list[str], ports: list[int]) -> None:
    _join(netns_path, None)
    stop = threading.Event()
    for address in addresses:
        for port in ports:
            family = _family(address)
            listener = socket.socket(family, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((address, port))
            listener.listen(1024)
            threading.Thread(target=_serve_tcp, args=(listener, stop), daemon=True).start()
            datagram = socket.socket(family, socket.SOCK_DGRAM)
            datagram.bind((address, port))
            threading.Thread(target=_serve_udp, args=(datagram,), daemon=True).start()
    _reply({"ready": True, "pid": os.getpid()})
    for _ in sys.stdin:  # runs until our parent closes stdin or ends us
        pass
    stop.set()


def main(argv: Sequence[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="apilane.testing.bpf")
    sub = parser.add_subparsers(dest="mode", required=True)
    agent = sub.add_parser("agent")
    agent.add_argument("--netns", required=True)
    agent.add_argument("--cgroup", required=True)
    serve = sub.add_parser("serve")
    serve.add_argument("--netns", required=True)
    serve.add_argument("--address", action="append", required=True)
    serve.add_argument("--port", action="append", type=int, required=True)
    args = parser.parse_args(argv)
    if args.mode == "agent":
        _agent_main(args.netns, args.cgroup)
    else:
        _server_main(args.netns, args.address, args.port)


if __name__ == "__main__":
    main()
