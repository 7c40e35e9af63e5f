"""sockets.py's pure core: which sock_diag rows are destroyed, given the recorded connections."""

from __future__ import annotations

import itertools
import os
import socket
import struct
from pathlib import Path

import pytest

from apilane.node_loader.nat import BackendValue
from apilane.node_loader.sockets import (
    DiagSocket,
    connected_to,
    network_namespaces,
    sockets_to_destroy,
)

pytestmark = [pytest.mark.unit]

B1, B2 = BackendValue("10.0.0.1", 6443), BackendValue("10.0.0.2", 6443)
B6 = BackendValue("fd00::1", 6443)


def row(cookie: int, ip: str, port: int = 6443, *, family: int = socket.AF_INET) -> DiagSocket:
    return DiagSocket(
        family=family,
        protocol=socket.IPPROTO_TCP,
        state=1,
        source=("10.1.0.5" if family == socket.AF_INET else "fd00:1::5", 40000 + cookie % 1000),
        destination=(ip, port),
        interface=0,
        cookie=struct.pack("=II", cookie & 0xFFFFFFFF, cookie >> 32),
    )


def test_the_cookie_is_read_as_the_kernel_writes_it():
    big = (7 << 32) | 0x89ABCDEF
    assert row(big, "10.0.0.1").cookie_value == big
    assert row(5, "10.0.0.1").cookie_value == 5


def test_only_recorded_connections_to_a_removed_backend_are_chosen():
    rows = [
        row(1, "10.0.0.1"),  # through the service to B1
        row(2, "10.0.0.1"),  # direct to B1: not recorded
        row(3, "10.0.0.2"),  # through the service to B2, which stays
        row(4, "fd00::1", family=socket.AF_INET6),  # through the service to B6
        row(5, "10.0.0.2"),  # recorded for B1, but connected to B2 since (UDP re-connect)
        row(6, "::ffff:10.0.0.1", family=socket.AF_INET6),  # a mapped socket through to B1
        row(7, "10.0.0.1", 6444),  # recorded for B1, connected to another port
    ]
    recorded = {1: B1, 3: B2, 4: B6, 5: B1, 6: B1, 7: B1, 99: B1}
    chosen = sockets_to_destroy(recorded, rows, [B1, B6])
    assert [r.cookie_value for r in chosen] == [1, 4, 6]
    assert sockets_to_destroy(recorded, rows, []) == ()
    assert sockets_to_destroy({}, rows, [B1, B2, B6]) == ()
    assert [r.cookie_value for r in sockets_to_destroy(recorded, rows, [B2])] == [3]


def test_every_combination_of_recorded_backend_and_peer():
    """For each row: destroyed iff recorded, recorded backend removed, and still its peer."""
    backends = (B1, B2, B6, None)
    peers = ("10.0.0.1", "10.0.0.2", "fd00::1", "::ffff:10.0.0.2")
    for removed_count in range(4):
        for removed in itertools.combinations((B1, B2, B6), removed_count):
            rows, recorded, expected = [], {}, set()
            for cookie, (backend, peer) in enumerate(itertools.product(backends, peers), 1):
                family = socket.AF_INET6 if ":" in peer else socket.AF_INET
                rows.append(row(cookie, peer, family=family))
                if backend is None:
                    continue
                recorded[cookie] = backend
                same = peer.removeprefix("::ffff:") == backend.ip
                if backend in removed and same:
                    expected.add(cookie)
            got = {r.cookie_value for r in sockets_to_destroy(recorded, rows, removed)}
            assert got == expected, removed


def test_the_prefilter_keeps_rows_connected_to_the_backends():
    rows = [row(1, "10.0.0.1"), row(2, "10.0.0.2"), row(3, "::ffff:10.0.0.1", family=10)]
    assert [r.cookie_value for r in connected_to(rows, [B1])] == [1, 3]
    assert connected_to(rows, []) == []


def test_network_namespaces_lists_each_namespace_once(tmp_path: Path):
    """Three fake processes, two sharing a namespace file, and a named one."""
    proc, named = tmp_path / "proc", tmp_path / "netns"
    shared, other = tmp_path / "ns-a", tmp_path / "ns-b"
    shared.write_text("")
    other.write_text("")
    named.mkdir()
    os.link(other, named / "pod-b")
    for pid, target in (("1", shared), ("20", shared), ("300", other)):
        (proc / pid / "ns").mkdir(parents=True)
        (proc / pid / "ns" / "net").symlink_to(target)
    (proc / "self").mkdir()  # not a pid: ignored
    (proc / "4000" / "ns").mkdir(parents=True)  # a process that exited: no net file

    found = network_namespaces(proc, [named, tmp_path / "absent"])

    assert sorted(len(n.paths) for n in found) == [2, 2]
    by_inode = {n.inode: n.paths for n in found}
    assert by_inode[shared.stat().st_ino] == (str(proc / "1/ns/net"), str(proc / "20/ns/net"))
    assert by_inode[other.stat().st_ino] == (str(proc / "300/ns/net"), str(named / "pod-b"))
