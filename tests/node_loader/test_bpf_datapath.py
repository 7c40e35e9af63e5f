"""The connect-time load balancer in the live kernel, through BccNatMaps and ConnectTimeLB.

One client namespace linked to three backend namespaces (no default route anywhere); the
service addresses are not routable in the client namespace, so an untranslated connect()
fails with ENETUNREACH. The programs are compiled once for the module (bcc takes ~2 s);
every test starts from empty maps and attached programs.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from apilane.node_loader.bpfmaps import REVERSE_TABLE_NAMES, StructCodec, layout_of
from apilane.node_loader.nat import (
    PROTO_UDP,
    BackendKey,
    BackendValue,
    Family,
    FrontendKey,
    FrontendValue,
)
from apilane.node_loader.programs import HOOKS, ConnectTimeLB, remove_superseded_pins
from apilane.node_loader.sockets import destroy_recorded, network_namespaces
from apilane.testing.bpf import (
    SERVICE_VIP4,
    SERVICE_VIP6,
    Agent,
    BpfLab,
    Topology,
)

pytestmark = [pytest.mark.integration, pytest.mark.bpf]

SERVICE_PORT = 443
BACKEND_PORT = 8080
MAPPED_VIP4 = f"::ffff:{SERVICE_VIP4}"


@dataclass
class Datapath:
    lab: BpfLab
    topology: Topology
    cgroup: Path
    pin_dir: Path
    lb: ConnectTimeLB
    agent: Agent

    def backend_ips(self, family: Family) -> list[str]:
        return [b.ipv4 if family == "IPv4" else b.ipv6 for b in self.topology.backends]

    def program(
        self,
        family: Family,
        backends: list[str],
        *,
        service_id: int = 1,
        vip: str | None = None,
        proto: int = 6,
    ) -> None:
        """Make-before-break: backends first, then the frontend's count, then stale ordinals."""
        vip = vip or (SERVICE_VIP4 if family == "IPv4" else SERVICE_VIP6)
        maps = self.lb.nat_maps
        maps.update_backends(
            family,
            {
                BackendKey(service_id, i): BackendValue(ip, BACKEND_PORT)
                for i, ip in enumerate(backends)
            },
        )
        maps.update_frontends(
            family,
            {FrontendKey(vip, SERVICE_PORT, proto): FrontendValue(service_id, len(backends))},
        )
        stale = [
            key
            for key in maps.dump(family).backends
            if key.service_id == service_id and key.ordinal >= len(backends)
        ]
        maps.delete_backends(family, stale)

    def reverse_entries(self, family: Family, sock: socket.socket) -> dict[tuple[str, int], Any]:
        """The socket's reverse-translation entries: backend (ip, port) -> (service id, ordinal)
        of the hint. Mapped IPv6 sockets use the IPv4 map."""
        table = self.lb._bpf.get_table(REVERSE_TABLE_NAMES[family].encode())
        key_codec = StructCodec(table.Key)
        hint_codec = StructCodec(table.Leaf, ["service_id", "ordinal"])
        cookie = _socket_cookie(sock)
        entries = {}
        for key, value in table.items():
            fields = key_codec.unpack(key)
            if fields["cookie"] != cookie:
                continue
            address_family = socket.AF_INET if family == "IPv4" else socket.AF_INET6
            backend = (
                socket.inet_ntop(address_family, fields["addr"]),
                socket.ntohs(fields["port"]),
            )
            hint = hint_codec.unpack(value)
            entries[backend] = (hint["service_id"], hint["ordinal"])
        return entries


@pytest.fixture(scope="module")
def datapath(bpf_module_lab: BpfLab) -> Iterator[Datapath]:
    lab = bpf_module_lab
    topology = lab.topology(backends=3)
    for backend in topology.backends:
        lab.server(
            netns=backend.netns, addresses=[backend.ipv4, backend.ipv6], ports=[BACKEND_PORT]
        )
    cgroup = lab.child_cgroup()
    pin_dir = lab.pin_dir()
    lb = ConnectTimeLB(cgroup_path=cgroup, pin_dir=pin_dir)
    agent = lab.agent(netns=topology.client, cgroup=cgroup)
    try:
        yield Datapath(lab, topology, cgroup, pin_dir, lb, agent)
    finally:
        lb.disable()
        lb.close()


@pytest.fixture
def dp(datapath: Datapath) -> Datapath:
    datapath.lb.nat_maps.clear()
    datapath.lb.enable()
    return datapath


def _servers(results: list[dict[str, object]]) -> list[str]:
    assert all(r["error"] is None for r in results), results
    return [r["server"][0] for r in results]  # type: ignore[index]


def test_tcp_connect_to_vip_reaches_backend_in_other_namespace(dp: Datapath) -> None:
    backend = dp.topology.backends[0]
    assert dp.agent.tcp_request(SERVICE_VIP4, SERVICE_PORT)[0]["error"] == "ENETUNREACH"

    dp.program("IPv4", [backend.ipv4])

    [result] = dp.agent.tcp_request(SERVICE_VIP4, SERVICE_PORT)
    assert result["error"] is None
    assert result["server"] == [backend.ipv4, BACKEND_PORT]


def test_getpeername_shows_the_service_address_not_the_backend(dp: Datapath) -> None:
    dp.program("IPv4", dp.backend_ips("IPv4")[:1])

    [result] = dp.agent.tcp_request(SERVICE_VIP4, SERVICE_PORT)

    assert result["peer"] == [SERVICE_VIP4, SERVICE_PORT]
    assert result["server"] == [dp.topology.backends[0].ipv4, BACKEND_PORT]


@pytest.mark.parametrize("connected", [False, True], ids=["sendto", "connected"])
def test_udp_reply_appears_to_come_from_the_service(dp: Datapath, connected: bool) -> None:
    backend = dp.topology.backends[1]
    dp.program("IPv4", [backend.ipv4], proto=PROTO_UDP)

    answer = dp.agent.udp_request(SERVICE_VIP4, SERVICE_PORT, connected=connected)

    assert answer["error"] is None
    assert answer["server"] == [backend.ipv4, BACKEND_PORT]
    assert answer["source"] == [SERVICE_VIP4, SERVICE_PORT]
    if connected:
        assert answer["peer"] == [SERVICE_VIP4, SERVICE_PORT]


def test_all_three_backends_are_used(dp: Datapath) -> None:
    dp.program("IPv4", dp.backend_ips("IPv4"))

    # P(some backend unused in 60 uniform draws) = 3 * (2/3)**60 < 1e-10.
    servers = _servers(dp.agent.tcp_request(SERVICE_VIP4, SERVICE_PORT, count=60))

    assert set(servers) == set(dp.backend_ips("IPv4"))


def test_removed_backend_gets_no_new_connections(dp: Datapath) -> None:
    ips = dp.backend_ips("IPv4")
    dp.program("IPv4", ips)

    dp.program("IPv4", ips[:2])

    servers = _servers(dp.agent.tcp_request(SERVICE_VIP4, SERVICE_PORT, count=60))
    assert set(servers) == set(ips[:2])
    assert dp.lb.nat_maps.dump("IPv4").backends.keys() == {BackendKey(1, 0), BackendKey(1, 1)}


def test_socket_destroy_closes_connections_to_the_removed_backend(dp: Datapath) -> None:
    ips = dp.backend_ips("IPv4")
    dp.program("IPv4", ips)
    opened: dict[str, str] = {}  # connection name -> backend
    for attempt in range(60):  # bounded: stop once every backend holds a connection
        name = f"c{attempt}"
        opened[name] = dp.agent.tcp_open(name, SERVICE_VIP4, SERVICE_PORT)["server"][0]
        if set(opened.values()) == set(ips):
            break
    assert set(opened.values()) == set(ips)
    removed = ips[2]

    dp.program("IPv4", ips[:2])
    # Every namespace of this machine is searched, as on a node; only sockets that our
    # programs recorded can match.
    report = destroy_recorded([BackendValue(removed, BACKEND_PORT)], dp.lb.connections)

    assert report.supported, report.reason
    assert report.failures == []
    assert report.namespaces >= 2  # the host's and the client's at least
    assert report.destroyed == sum(1 for ip in opened.values() if ip == removed)
    for name, ip in opened.items():
        probe = dp.agent.tcp_probe(name)
        if ip == removed:
            assert probe == {"alive": False, "error": "ECONNABORTED"}
        else:
            assert probe == {"alive": True, "error": None}


@pytest.mark.parametrize("vip", [SERVICE_VIP4, MAPPED_VIP4, SERVICE_VIP6])
def test_only_the_connection_through_the_service_is_destroyed(dp: Datapath, vip: str) -> None:
    """A pod-like namespace (no default route) holds a connection through the service to B
    and a direct one to B (as a kubelet's would be): removing B closes the first only."""
    family: Family = "IPv6" if vip == SERVICE_VIP6 else "IPv4"
    a, b = dp.backend_ips(family)[:2]
    # A fresh client: connections other tests kept open through the service would match too.
    dp.lab.end(dp.agent)
    dp.agent = dp.lab.agent(netns=dp.topology.client, cgroup=dp.cgroup)
    dp.program(family, [b])
    through = dp.agent.tcp_open("through", vip, SERVICE_PORT)
    direct_host = f"::ffff:{b}" if vip == MAPPED_VIP4 else b
    direct = dp.agent.tcp_open("direct", direct_host, BACKEND_PORT)
    assert through["error"] is None and through["server"][0] == b
    assert through["peer"] == [vip, SERVICE_PORT]
    assert direct["error"] is None and direct["server"][0] == b
    recorded = _recorded(dp)
    assert BackendValue(b, BACKEND_PORT) in recorded.values()

    dp.program(family, [a])  # B removed
    report = destroy_recorded(
        [BackendValue(b, BACKEND_PORT)],
        dp.lb.connections,
        namespaces=[n for n in network_namespaces() if str(dp.topology.client.path) in n.paths],
    )

    assert report.supported, report.reason
    assert (report.namespaces, report.matched, report.destroyed) == (1, 1, 1), report
    assert report.failures == []
    assert dp.agent.tcp_probe("through") == {"alive": False, "error": "ECONNABORTED"}
    assert dp.agent.tcp_probe("direct") == {"alive": True, "error": None}
    # A new connection through the service goes to the live backend.
    assert _servers(dp.agent.tcp_request(vip, SERVICE_PORT, count=5)) == [a] * 5


def _recorded(dp: Datapath) -> dict[int, BackendValue]:
    """Every recorded connection: the cookies listed from the map, read back by lookup."""
    table = dp.lb._bpf.get_table(b"apilane_conn")
    return dp.lb.connections.lookup(int(key.value) for key in table)


def test_sendmsg_records_no_connection(dp: Datapath) -> None:
    backend = dp.topology.backends[1]
    dp.program("IPv4", [backend.ipv4], proto=PROTO_UDP)
    before = set(_recorded(dp))

    assert dp.agent.udp_request(SERVICE_VIP4, SERVICE_PORT, connected=False)["error"] is None
    assert set(_recorded(dp)) == before
    assert dp.agent.udp_request(SERVICE_VIP4, SERVICE_PORT, connected=True)["error"] is None
    assert len(set(_recorded(dp)) - before) == 1


def test_ipv6_tcp_udp_and_getpeername(dp: Datapath) -> None:
    ips = dp.backend_ips("IPv6")
    dp.program("IPv6", ips)
    dp.program("IPv6", ips[:1], service_id=2, proto=PROTO_UDP)

    results = dp.agent.tcp_request(SERVICE_VIP6, SERVICE_PORT, count=30)
    answer = dp.agent.udp_request(SERVICE_VIP6, SERVICE_PORT)

    assert set(_servers(results)) == set(ips)
    assert {tuple(r["peer"]) for r in results} == {(SERVICE_VIP6, SERVICE_PORT)}
    assert answer["server"] == [ips[0], BACKEND_PORT]
    assert answer["source"] == [SERVICE_VIP6, SERVICE_PORT]


def test_ipv4_mapped_ipv6_uses_the_ipv4_maps(dp: Datapath) -> None:
    backend = dp.topology.backends[2]
    dp.program("IPv4", [backend.ipv4])
    dp.program("IPv4", [backend.ipv4], service_id=2, proto=PROTO_UDP)

    [result] = dp.agent.tcp_request(MAPPED_VIP4, SERVICE_PORT)
    answer = dp.agent.udp_request(MAPPED_VIP4, SERVICE_PORT)

    assert result["server"] == [backend.ipv4, BACKEND_PORT]
    assert result["peer"] == [MAPPED_VIP4, SERVICE_PORT]
    assert answer["server"] == [backend.ipv4, BACKEND_PORT]
    assert answer["source"] == [MAPPED_VIP4, SERVICE_PORT]


def test_empty_frontend_leaves_the_connect_untranslated(dp: Datapath) -> None:
    # Documented choice (bpf/connect_lb.c): count == 0 passes through instead of EPERM.
    dp.lb.nat_maps.update_frontends(
        "IPv4", {FrontendKey(SERVICE_VIP4, SERVICE_PORT): FrontendValue(service_id=1, count=0)}
    )

    [result] = dp.agent.tcp_request(SERVICE_VIP4, SERVICE_PORT)

    assert result["error"] == "ENETUNREACH"


def test_disable_detaches_and_keeps_maps_enable_translates_again(dp: Datapath) -> None:
    dp.program("IPv4", dp.backend_ips("IPv4"))
    before = dp.lb.nat_maps.dump("IPv4")

    dp.lb.disable()
    assert dp.lb.attached_programs() == []
    assert _kernel_attached(dp.cgroup) == []
    [untranslated] = dp.agent.tcp_request(SERVICE_VIP4, SERVICE_PORT)
    assert untranslated["error"] == "ENETUNREACH"
    assert dp.lb.nat_maps.dump("IPv4") == before

    dp.lb.enable()
    [translated] = dp.agent.tcp_request(SERVICE_VIP4, SERVICE_PORT)
    assert translated["error"] is None
    assert [p.program for p in dp.lb.attached_programs()] == [h.program for h in HOOKS]


def test_a_restarted_loader_reuses_maps_and_replaces_programs_without_stacking(
    dp: Datapath,
) -> None:
    dp.program("IPv4", dp.backend_ips("IPv4"))
    dp.program("IPv6", dp.backend_ips("IPv6")[:2], service_id=7)
    before = {family: dp.lb.nat_maps.dump(family) for family in ("IPv4", "IPv6")}
    old_ids = {p.hook: p.program_id for p in dp.lb.attached_programs()}

    restarted = ConnectTimeLB(cgroup_path=dp.cgroup, pin_dir=dp.pin_dir)
    try:
        assert {f: restarted.nat_maps.dump(f) for f in ("IPv4", "IPv6")} == before
        restarted.enable()
        attached = _kernel_attached(dp.cgroup)
        assert sorted(name for name, _ in attached) == sorted(h.program for h in HOOKS)
        assert {p.hook: p.program_id for p in restarted.attached_programs()} != old_ids
        [result] = dp.agent.tcp_request(SERVICE_VIP4, SERVICE_PORT)
        assert result["error"] is None
    finally:
        restarted.close()
    # The pinned links outlive the process that made them: still translated.
    [result] = dp.agent.tcp_request(SERVICE_VIP4, SERVICE_PORT)
    assert result["error"] is None


def test_bcc_generated_types_match_the_nat_h_layout(datapath: Datapath) -> None:
    expected = {
        # table: (key size, {field: offset}, leaf size, {field: offset})
        "apilane_fe4": (8, {"addr": 0, "port": 4, "proto": 6, "pad": 7}, 12,
                        {"service_id": 0, "count": 4, "flags": 8}),
        "apilane_fe6": (20, {"addr": 0, "port": 16, "proto": 18, "pad": 19}, 12,
                        {"service_id": 0, "count": 4, "flags": 8}),
        "apilane_be4": (8, {"service_id": 0, "ordinal": 4}, 8, {"addr": 0, "port": 4, "pad": 6}),
        "apilane_be6": (8, {"service_id": 0, "ordinal": 4}, 20, {"addr": 0, "port": 16, "pad": 18}),
        "apilane_rev4": (16, {"cookie": 0, "addr": 8, "port": 12, "pad": 14}, 16,
                         {"frontend": 0, "service_id": 8, "ordinal": 12}),
        "apilane_rev6": (32, {"cookie": 0, "addr": 8, "port": 24, "pad": 26, "pad2": 28}, 28,
                         {"frontend": 0, "service_id": 20, "ordinal": 24}),
        "apilane_conn": (8, None, 20, {"addr": 0, "port": 16, "family": 18, "pad": 19}),
    }  # fmt: skip
    bpf = datapath.lb._bpf
    for name, (key_size, key_offsets, leaf_size, leaf_offsets) in expected.items():
        table = bpf.get_table(name.encode())
        assert ctypes.sizeof(table.Key) == key_size, name
        assert ctypes.sizeof(table.Leaf) == leaf_size, name
        if key_offsets is not None:  # a struct; apilane_conn's key is a plain __u64
            assert {f.name: f.offset for f in layout_of(table.Key)} == key_offsets, name
        assert {f.name: f.offset for f in layout_of(table.Leaf)} == leaf_offsets, name
        # The byte codecs are derived from the same types and agree on the size.
        if key_offsets is not None:
            assert StructCodec(table.Key).size == key_size
        assert StructCodec(table.Leaf).size == leaf_size
    # A reverse entry names its frontend with the frontend map's own key type.
    for family in ("4", "6"):
        reverse = bpf.get_table(f"apilane_rev{family}".encode()).Leaf
        frontend = bpf.get_table(f"apilane_fe{family}".encode()).Key
        nested = {field[0]: field[1] for field in reverse._fields_}["frontend"]
        assert layout_of(nested) == layout_of(frontend)


# --- reverse translation holds only while the backend is in the service's current set ------


@dataclass(frozen=True)
class ReverseCase:
    """A service as one client socket family sees it."""

    family: Family  # of the maps
    vip: str  # the service address the client uses
    mapped: bool = False  # an AF_INET6 socket using IPv4 addresses as ::ffff:a.b.c.d

    def ip(self, backend: Any) -> str:
        """The backend's address in the maps (and as the backend itself reports it)."""
        return str(backend.ipv4 if self.family == "IPv4" else backend.ipv6)

    def seen(self, backend: Any) -> str:
        """The backend's address as the client socket reports it."""
        return f"::ffff:{self.ip(backend)}" if self.mapped else self.ip(backend)


_REVERSE_CASES = {
    "IPv4": ReverseCase("IPv4", SERVICE_VIP4),
    "IPv6": ReverseCase("IPv6", SERVICE_VIP6),
    "mapped": ReverseCase("IPv4", MAPPED_VIP4, mapped=True),
}


def _remove_backend(dp: Datapath, family: Family, how: str, *, kept: str) -> None:
    """Take the UDP service's only backend (service id 1) out of the maps, as `how` says."""
    if how == "new id":  # what the reconciler does: the new set under a fresh id, then break
        dp.program(family, [kept], service_id=2, proto=PROTO_UDP)
        dp.lb.nat_maps.delete_backends(family, [BackendKey(1, 0)])
    elif how == "same id":  # the ordinal rewritten in place under the same id
        dp.program(family, [kept], service_id=1, proto=PROTO_UDP)
    else:  # the service is gone
        vip = SERVICE_VIP4 if family == "IPv4" else SERVICE_VIP6
        dp.lb.nat_maps.delete_frontends(family, [FrontendKey(vip, SERVICE_PORT, PROTO_UDP)])
        dp.lb.nat_maps.delete_backends(family, [BackendKey(1, 0)])


@pytest.mark.parametrize(
    ("case", "how"),
    [
        ("IPv4", "new id"),
        ("IPv4", "same id"),
        ("IPv4", "frontend deleted"),
        ("IPv6", "new id"),
        ("mapped", "new id"),
    ],
)
def test_a_datagram_from_a_removed_backend_shows_its_real_source(
    dp: Datapath, case: str, how: str
) -> None:
    c = _REVERSE_CASES[case]
    kept, removed = dp.topology.backends[0], dp.topology.backends[1]
    dp.program(c.family, [c.ip(removed)], proto=PROTO_UDP)

    with _client_udp_socket(dp, c.vip) as sock:
        assert _exchange(sock, (c.vip, SERVICE_PORT)) == ([c.vip, SERVICE_PORT], c.ip(removed))
        assert dp.reverse_entries(c.family, sock).keys() == {(c.ip(removed), BACKEND_PORT)}

        _remove_backend(dp, c.family, how, kept=c.ip(kept))
        # A datagram from the removed backend (its answer to one sent to its real address).
        source, server = _exchange(sock, (c.seen(removed), BACKEND_PORT))

        assert source == [c.seen(removed), BACKEND_PORT]
        assert server == c.ip(removed)
        assert dp.reverse_entries(c.family, sock) == {}


@pytest.mark.parametrize("case", ["IPv4", "IPv6", "mapped"])
def test_getpeername_reports_the_backend_once_it_left_the_service(dp: Datapath, case: str) -> None:
    # Decided: the translation no longer holds, so a connected socket reports where it really
    # sends (the removed backend), as recvmsg reports where its datagrams come from. The two
    # agree; reporting the VIP would hide that the socket no longer reaches the service.
    c = _REVERSE_CASES[case]
    kept, removed = dp.topology.backends[0], dp.topology.backends[1]
    dp.program(c.family, [c.ip(removed)], proto=PROTO_UDP)

    with _client_udp_socket(dp, c.vip) as sock:
        sock.connect((c.vip, SERVICE_PORT))
        assert _peer(sock) == [c.vip, SERVICE_PORT]

        _remove_backend(dp, c.family, "new id", kept=c.ip(kept))

        assert _peer(sock) == [c.seen(removed), BACKEND_PORT]
        assert dp.reverse_entries(c.family, sock) == {}
        # Still connected to the removed backend (socket destruction is the loader's business):
        # its answers show their real source, the address getpeername reports.
        assert _exchange(sock, None) == ([c.seen(removed), BACKEND_PORT], c.ip(removed))


@pytest.mark.parametrize("case", ["IPv4", "IPv6"])
def test_a_backend_still_in_a_changed_set_keeps_its_translation(dp: Datapath, case: str) -> None:
    c = _REVERSE_CASES[case]
    other, backend = dp.topology.backends[0], dp.topology.backends[1]
    dp.program(c.family, [c.ip(backend)], proto=PROTO_UDP)

    with _client_udp_socket(dp, c.vip) as sock:
        sock.connect((c.vip, SERVICE_PORT))
        assert _exchange(sock, None) == ([c.vip, SERVICE_PORT], c.ip(backend))
        entry = (c.ip(backend), BACKEND_PORT)
        assert dp.reverse_entries(c.family, sock) == {entry: (1, 0)}

        # The reconciler's way: the new set (the backend now at ordinal 1) under a fresh id.
        dp.program(c.family, [c.ip(other), c.ip(backend)], service_id=2, proto=PROTO_UDP)
        dp.lb.nat_maps.delete_backends(c.family, [BackendKey(1, 0)])

        assert _peer(sock) == [c.vip, SERVICE_PORT]
        assert _exchange(sock, None) == ([c.vip, SERVICE_PORT], c.ip(backend))
        # The hint was refreshed to the backend's place in the current set.
        assert dp.reverse_entries(c.family, sock) == {entry: (2, 1)}


def test_pins_of_a_superseded_layout_are_removed(dp: Datapath) -> None:
    old_layout = dp.pin_dir / "apilane_rev4_v1"
    subprocess.run(
        ["bpftool", "map", "create", str(old_layout), "type", "lru_hash",
         "key", "16", "value", "8", "entries", "16", "name", "apilane_rev4"],
        check=True, capture_output=True,
    )  # fmt: skip
    current = sorted(p.name for p in dp.pin_dir.glob("apilane_*") if p != old_layout)
    try:
        removed = remove_superseded_pins(dp.lb._bpf, dp.pin_dir)
    finally:
        old_layout.unlink(missing_ok=True)

    assert removed == ["apilane_rev4_v1"]
    assert sorted(p.name for p in dp.pin_dir.glob("apilane_*")) == current
    assert "apilane_rev4_v2" in current


# A child process in the load balancer's cgroup, inside the client namespace (nsenter), makes
# the socket and hands it over: a socket keeps the cgroup and namespace it was made in, and the
# hooks run for the socket's cgroup, so the test drives it directly across map changes.
_MAKE_SOCKET = """
import os, socket, sys
cgroup, family, channel = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
with open(os.path.join(cgroup, "cgroup.procs"), "w") as procs:
    procs.write(str(os.getpid()))
made = socket.socket(family, socket.SOCK_DGRAM)
socket.send_fds(socket.socket(fileno=channel), [b"socket"], [made.fileno()])
"""


@contextlib.contextmanager
def _client_udp_socket(dp: Datapath, service: str) -> Iterator[socket.socket]:
    family = socket.AF_INET6 if ":" in service else socket.AF_INET
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with ours, theirs:
        ours.settimeout(10.0)
        subprocess.run(
            ["nsenter", f"--net={dp.topology.client.path}", sys.executable, "-c", _MAKE_SOCKET,
             str(dp.cgroup), str(int(family)), str(theirs.fileno())],
            pass_fds=[theirs.fileno()], check=True, timeout=30,
        )  # fmt: skip
        _, fds, _, _ = socket.recv_fds(ours, 16, 1)
    with socket.socket(fileno=fds[0]) as sock:
        sock.settimeout(3.0)
        yield sock


def _exchange(sock: socket.socket, to: tuple[str, int] | None) -> tuple[list[Any], str]:
    """Send one datagram (to `to`, or to the connected peer) and read the answer: its source as
    the socket reports it, and the server address the backend says it is."""
    if to is None:
        sock.send(b"hello")
    else:
        sock.sendto(b"hello", to)
    data, source = sock.recvfrom(4096)
    return [source[0], source[1]], json.loads(data)["server"][0]


def _peer(sock: socket.socket) -> list[Any]:
    peer = sock.getpeername()
    return [peer[0], peer[1]]


def _socket_cookie(sock: socket.socket) -> int:
    so_cookie = getattr(socket, "SO_COOKIE", 57)  # Linux; Python 3.11 lacks the constant
    cookie: int = int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, so_cookie, 8), sys.byteorder)
    return cookie


def _kernel_attached(cgroup: Path) -> list[tuple[str, str]]:
    """(program name, attach type) for every program on the cgroup, as bpftool reports."""
    output = subprocess.run(
        ["bpftool", "-j", "cgroup", "show", str(cgroup)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [(entry["name"], entry["attach_type"]) for entry in json.loads(output.strip() or "[]")]
