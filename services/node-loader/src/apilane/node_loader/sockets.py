"""Destroy the sockets that connected through a service address to a backend that was
removed or failed its probes (sock_diag SOCK_DESTROY).

A connect-time load balancer only acts when a socket connects: a client already connected to
a backend that has been removed keeps talking to it (or waits for a timeout). Destroying those
sockets makes the clients see an error (ECONNABORTED) at once and reconnect through the service
address to a live backend.

Exactly those sockets: the connect programs record each translated socket's cookie with the
backend it went to (apilane_conn, bpf/nat.h). A socket is destroyed only when its cookie is
recorded, the backend recorded is removed, and the socket is still connected to it
(`sockets_to_destroy`, the pure core). A kubelet's (or anyone's) direct connection to the same
address and port is never touched.

Scope: every network namespace on the node, the host's and every pod's: the unique namespaces
of /proc/*/ns/net and the named ones in /run/netns (`network_namespaces`), each entered by a
thread of its own (setns changes the calling thread only, so the event loop and the thread
pool never leave the loader's namespace). TCP sockets in every state except LISTEN, TIME_WAIT
and CLOSE; connected UDP sockets. IPv4-mapped destinations of IPv6 sockets match their IPv4
backend.

Needs CAP_NET_ADMIN and CAP_SYS_ADMIN (setns) and a kernel built with
CONFIG_INET_DIAG_DESTROY; `probe()` tells whether it works here, and `destroy_recorded()`
reports `supported=False` instead of failing when not.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import ipaddress
import os
import socket
import struct
import threading
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from apilane.model.errors import ApilaneError
from apilane.node_loader.nat import BackendValue

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
SOCK_DESTROY = 21
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_DUMP = 0x300

_TCP_LISTEN, _TCP_TIME_WAIT, _TCP_CLOSE, _TCP_ESTABLISHED = 10, 6, 7, 1
# Every TCP state (1..12) but those with no live peer to reset.
_TCP_STATES = sum(
    1 << s for s in range(1, 13) if s not in (_TCP_LISTEN, _TCP_TIME_WAIT, _TCP_CLOSE)
)
# Connected UDP sockets report TCP_ESTABLISHED.
_UDP_STATES = 1 << _TCP_ESTABLISHED

_NLMSGHDR = struct.Struct("=IHHII")
# struct inet_diag_sockid: sport, dport (NBO), src[16], dst[16], if, cookie[2]
_SOCKID = struct.Struct("!HH16s16s")
_SOCKID_TAIL = struct.Struct("=I8s")
_SOCKID_SIZE = _SOCKID.size + _SOCKID_TAIL.size  # 48
# struct inet_diag_req_v2: family, protocol, ext, pad, states, id
_REQ_HEAD = struct.Struct("=BBBxI")
# struct inet_diag_msg: family, state, timer, retrans, id, expires, rqueue, wqueue, uid, inode
_MSG_HEAD = struct.Struct("=BBBB")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
CLONE_NEWNET = 0x40000000
# Processes come and go: a namespace file that cannot be read any more is skipped.
_GONE = (FileNotFoundError, NotADirectoryError, PermissionError, ProcessLookupError)
_COOKIE = struct.Struct("=II")  # idiag_cookie: __u32[2], the low word first


class SocketDiagError(ApilaneError):
    """The sock_diag netlink conversation itself failed (not a single socket)."""


@dataclass(frozen=True, slots=True)
class DiagSocket:
    family: int
    protocol: int
    state: int
    source: tuple[str, int]
    destination: tuple[str, int]
    interface: int
    cookie: bytes  # as the kernel gave it; identifies the socket for SOCK_DESTROY

    @property
    def cookie_value(self) -> int:
        """The cookie as bpf_get_socket_cookie() returns it."""
        low, high = _COOKIE.unpack(self.cookie)
        return int(low | high << 32)


@dataclass
class DestroyReport:
    supported: bool = True
    namespaces: int = 0  # network namespaces searched
    matched: int = 0
    destroyed: int = 0
    already_gone: int = 0
    failures: list[str] = field(default_factory=list)
    reason: str = ""  # why unsupported


def _normalized(ip: str | IPAddress) -> IPAddress:
    address = ipaddress.ip_address(ip)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class _SockDiag:
    """One NETLINK_SOCK_DIAG socket in the caller's network namespace."""

    def __init__(self) -> None:
        try:
            self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG)
        except OSError as exc:
            raise SocketDiagError(f"opening a sock_diag netlink socket: {exc}") from exc
        self._sock.settimeout(5.0)
        self._seq = 0

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> _SockDiag:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _send(self, message_type: int, flags: int, payload: bytes) -> int:
        self._seq += 1
        header = _NLMSGHDR.pack(_NLMSGHDR.size + len(payload), message_type, flags, self._seq, 0)
        self._sock.send(header + payload)
        return self._seq

    def _messages(self, seq: int) -> Iterator[tuple[int, bytes]]:
        """(type, payload) of every answer to `seq` until DONE or an ERROR/ACK."""
        while True:
            data = self._sock.recv(1 << 17)
            offset = 0
            while offset + _NLMSGHDR.size <= len(data):
                length, message_type, _flags, message_seq, _pid = _NLMSGHDR.unpack_from(
                    data, offset
                )
                if length < _NLMSGHDR.size:
                    raise SocketDiagError(f"malformed netlink message (length {length})")
                payload = data[offset + _NLMSGHDR.size : offset + length]
                offset += (length + 3) & ~3
                if message_seq != seq:
                    continue
                yield message_type, payload
                if message_type in (NLMSG_DONE, NLMSG_ERROR):
                    return

    @staticmethod
    def _request(family: int, protocol: int, states: int, sock_id: bytes) -> bytes:
        return _REQ_HEAD.pack(family, protocol, 0, states) + sock_id

    def dump(self, family: int, protocol: int) -> list[DiagSocket]:
        states = _TCP_STATES if protocol == socket.IPPROTO_TCP else _UDP_STATES
        seq = self._send(
            SOCK_DIAG_BY_FAMILY,
            NLM_F_REQUEST | NLM_F_DUMP,
            self._request(family, protocol, states, b"\0" * _SOCKID_SIZE),
        )
        sockets = []
        for message_type, payload in self._messages(seq):
            if message_type == NLMSG_ERROR:
                code = -struct.unpack_from("=i", payload)[0]
                if code:
                    raise SocketDiagError(f"dumping sockets: {os.strerror(code)}")
                continue
            if message_type != SOCK_DIAG_BY_FAMILY:
                continue
            msg_family, state, _timer, _retrans = _MSG_HEAD.unpack_from(payload)
            sport, dport, src, dst = _SOCKID.unpack_from(payload, _MSG_HEAD.size)
            interface, cookie = _SOCKID_TAIL.unpack_from(payload, _MSG_HEAD.size + _SOCKID.size)
            size = 4 if msg_family == socket.AF_INET else 16
            sockets.append(
                DiagSocket(
                    family=msg_family,
                    protocol=protocol,
                    state=state,
                    source=(socket.inet_ntop(msg_family, src[:size]), sport),
                    destination=(socket.inet_ntop(msg_family, dst[:size]), dport),
                    interface=interface,
                    cookie=cookie,
                )
            )
        return sockets

    def destroy(self, target: DiagSocket) -> int:
        """SOCK_DESTROY one socket; returns 0 or the errno the kernel answered."""
        src = socket.inet_pton(target.family, target.source[0]).ljust(16, b"\0")[:16]
        dst = socket.inet_pton(target.family, target.destination[0]).ljust(16, b"\0")[:16]
        sock_id = _SOCKID.pack(
            target.source[1], target.destination[1], src, dst
        ) + _SOCKID_TAIL.pack(target.interface, target.cookie)
        return self._ack(
            self._request(target.family, target.protocol, 0xFFFFFFFF, sock_id), what="destroy"
        )

    def _ack(self, request: bytes, *, what: str) -> int:
        seq = self._send(SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, request)
        for message_type, payload in self._messages(seq):
            if message_type == NLMSG_ERROR:
                return int(-struct.unpack_from("=i", payload)[0])
        raise SocketDiagError(f"no answer to {what}")

    def probe(self) -> int:
        """SOCK_DESTROY of a socket that cannot exist: ENOENT when destroy is supported."""
        request = self._request(
            socket.AF_INET, socket.IPPROTO_TCP, 0xFFFFFFFF, b"\0" * _SOCKID_SIZE
        )
        return self._ack(request, what="probe")


def probe() -> tuple[bool, str]:
    """(supported, reason): can this process destroy sockets in its network namespace?"""
    try:
        with _SockDiag() as diag:
            code = diag.probe()
    except (SocketDiagError, OSError) as exc:
        return False, str(exc)
    if code in (0, errno.ENOENT):
        return True, ""
    if code == errno.EOPNOTSUPP:
        return False, "the kernel lacks CONFIG_INET_DIAG_DESTROY"
    if code == errno.EPERM:
        return False, "CAP_NET_ADMIN is needed"
    return False, f"SOCK_DESTROY answered {errno.errorcode.get(code, code)}"


# --- the pure core ------------------------------------------------------------------------


def _endpoint(ip: str, port: int) -> tuple[IPAddress, int]:
    return _normalized(ip), port


def connected_to(
    rows: Iterable[DiagSocket], backends: Collection[BackendValue]
) -> list[DiagSocket]:
    """The rows whose peer is one of `backends` (the only cookies worth looking up)."""
    wanted = {_endpoint(b.ip, b.port) for b in backends}
    return [row for row in rows if _endpoint(*row.destination) in wanted]


def sockets_to_destroy(
    recorded: Mapping[int, BackendValue],
    rows: Iterable[DiagSocket],
    removed: Collection[BackendValue],
) -> tuple[DiagSocket, ...]:
    """PURE: the sockets to destroy, given the recorded connections (cookie → the backend its
    connect through a service address went to), the sock_diag rows of one namespace and the
    backends removed. A row qualifies when its cookie is recorded, the recorded backend is
    removed, and the row is still connected to that very backend (a UDP socket connected
    again elsewhere since is not)."""
    gone = {_endpoint(b.ip, b.port) for b in removed}
    chosen = []
    for row in rows:
        backend = recorded.get(row.cookie_value)
        if backend is None:
            continue  # a direct connection: never through the service address
        through = _endpoint(backend.ip, backend.port)
        if through in gone and _endpoint(*row.destination) == through:
            chosen.append(row)
    return tuple(chosen)


# --- namespaces ---------------------------------------------------------------------------


class ConnectionLookup(Protocol):
    """The recorded connections (bpfmaps.BccConnections)."""

    def lookup(self, cookies: Iterable[int]) -> Mapping[int, BackendValue]: ...


@dataclass(frozen=True, slots=True)
class Namespace:
    """One network namespace, by identity, with the files that name it (any one will do;
    a process may exit between the listing and the visit)."""

    device: int
    inode: int
    paths: tuple[str, ...]


def network_namespaces(
    proc: Path = Path("/proc"), named: Iterable[Path] = (Path("/run/netns"), Path("/var/run/netns"))
) -> list[Namespace]:
    """Every network namespace on the node, once each: those of the running processes and
    the named ones (which may have no process)."""
    found: dict[tuple[int, int], list[str]] = {}
    candidates = [entry / "ns" / "net" for entry in _pids(proc)]
    for directory in named:
        with contextlib.suppress(*_GONE):
            candidates.extend(sorted(directory.iterdir()))
    for path in candidates:
        with contextlib.suppress(*_GONE):
            status = os.stat(path)
            found.setdefault((status.st_dev, status.st_ino), []).append(str(path))
    return [Namespace(dev, ino, tuple(paths)) for (dev, ino), paths in found.items()]


def _pids(proc: Path) -> list[Path]:
    with contextlib.suppress(*_GONE):
        return sorted((p for p in proc.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    return []


def _enter(namespace: Namespace) -> str:
    """setns() the calling thread into the namespace; "" or why it could not."""
    libc = ctypes.CDLL(None, use_errno=True)
    problem = "no path"
    for path in namespace.paths:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            problem = str(exc)
            continue
        try:
            if libc.setns(fd, CLONE_NEWNET) == 0:
                return ""
            problem = f"setns {path}: {os.strerror(ctypes.get_errno())}"
        finally:
            os.close(fd)
    return problem


# --- the adapter --------------------------------------------------------------------------


def destroy_recorded(
    removed: Collection[BackendValue],
    connections: ConnectionLookup,
    *,
    namespaces: Iterable[Namespace] | None = None,
) -> DestroyReport:
    """Destroy, in every network namespace, the sockets that connected through a service
    address to one of `removed` (see the module docstring). Blocks; each namespace is
    searched by a fresh thread. Never raises for one socket or namespace: failures are listed
    in the report; an unsupported kernel gives `supported=False` with the reason."""
    report = DestroyReport()
    if not removed:
        return report
    supported, reason = probe()
    if not supported:
        report.supported, report.reason = False, reason
        return report
    for namespace in network_namespaces() if namespaces is None else namespaces:
        worker = threading.Thread(
            target=_destroy_in,
            args=(namespace, removed, connections, report),
            name="apilane-sock-destroy",
        )
        worker.start()
        worker.join()
    return report


def _destroy_in(
    namespace: Namespace,
    removed: Collection[BackendValue],
    connections: ConnectionLookup,
    report: DestroyReport,
) -> None:
    """In a thread of its own, which it leaves in `namespace` and which then ends."""
    problem = _enter(namespace)
    if problem:
        report.failures.append(f"netns {namespace.inode}: {problem}")
        return
    report.namespaces += 1
    try:
        with _SockDiag() as diag:
            rows = [
                row
                for protocol in (socket.IPPROTO_TCP, socket.IPPROTO_UDP)
                for family in (socket.AF_INET, socket.AF_INET6)
                for row in diag.dump(family, protocol)
            ]
            candidates = connected_to(rows, removed)
            if not candidates:
                return
            recorded = connections.lookup({row.cookie_value for row in candidates})
            targets = sockets_to_destroy(recorded, candidates, removed)
            report.matched += len(targets)
            for target in targets:
                _destroy_one(diag, target, report)
    except (SocketDiagError, OSError) as exc:
        report.failures.append(f"netns {namespace.inode}: {exc}")


def _destroy_one(diag: _SockDiag, target: DiagSocket, report: DestroyReport) -> None:
    code = diag.destroy(target)
    if code == 0:
        report.destroyed += 1
    elif code == errno.ENOENT:
        report.already_gone += 1
    else:
        report.failures.append(
            f"{target.source} -> {target.destination}: {errno.errorcode.get(code, code)}"
        )
