"""Destroy host sockets still connected to removed backends (sock_diag SOCK_DESTROY).

A connect-time load balancer only acts when a socket connects: a client already connected to
a backend that has been removed keeps talking to it (or waits for a timeout). Destroying those
sockets makes the clients see an error (ECONNABORTED) at once and reconnect through the service
address to a live backend.

Scope: the network namespace of the calling thread (for the node-loader, the host's). TCP
sockets in every state except LISTEN, TIME_WAIT and CLOSE; connected UDP sockets. IPv4-mapped
destinations of IPv6 sockets match their IPv4 backend.

Needs CAP_NET_ADMIN and a kernel built with CONFIG_INET_DIAG_DESTROY; `probe()` tells whether
it works here, and `destroy_connected()` reports `supported=False` instead of failing when not.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from apilane.model.errors import ApilaneError

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


class SocketDiagError(ApilaneError):
    """The sock_diag netlink conversation itself failed (not a single socket)."""


@dataclass(frozen=True, slots=True)
class Destination:
    ip: str
    port: int


@dataclass(frozen=True, slots=True)
class DiagSocket:
    family: int
    protocol: int
    state: int
    source: tuple[str, int]
    destination: tuple[str, int]
    interface: int
    cookie: bytes  # as the kernel gave it; identifies the socket for SOCK_DESTROY


@dataclass
class DestroyReport:
    supported: bool = True
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


def connected_sockets(
    destinations: Iterable[Destination],
    *,
    protocols: Iterable[int] = (socket.IPPROTO_TCP, socket.IPPROTO_UDP),
) -> list[DiagSocket]:
    """Sockets of this network namespace whose peer is one of `destinations`."""
    wanted = {(_normalized(d.ip), d.port) for d in destinations}
    if not wanted:
        return []
    found = []
    with _SockDiag() as diag:
        for protocol in protocols:
            for family in (socket.AF_INET, socket.AF_INET6):
                for candidate in diag.dump(family, protocol):
                    ip, port = candidate.destination
                    if (_normalized(ip), port) in wanted:
                        found.append(candidate)
    return found


def destroy_connected(
    destinations: Iterable[Destination],
    *,
    protocols: Iterable[int] = (socket.IPPROTO_TCP, socket.IPPROTO_UDP),
) -> DestroyReport:
    """Destroy every socket of this network namespace connected to one of `destinations`.

    Never raises for one socket: per-socket failures are listed in the report; an unsupported
    kernel gives `supported=False` with the reason.
    """
    report = DestroyReport()
    wanted = list(destinations)
    if not wanted:
        return report
    supported, reason = probe()
    if not supported:
        report.supported, report.reason = False, reason
        return report
    protocols = tuple(protocols)
    targets = connected_sockets(wanted, protocols=protocols)
    report.matched = len(targets)
    with _SockDiag() as diag:
        for target in targets:
            code = diag.destroy(target)
            if code == 0:
                report.destroyed += 1
            elif code == errno.ENOENT:
                report.already_gone += 1
            else:
                report.failures.append(
                    f"{target.source} -> {target.destination}: {errno.errorcode.get(code, code)}"
                )
    return report
