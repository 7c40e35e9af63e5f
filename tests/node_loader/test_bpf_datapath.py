"""The connect-time load balancer in the live kernel, through BccNatMaps and ConnectTimeLB.

One client namespace linked to three backend namespaces (no default route anywhere); the
service addresses are not routable in the client namespace, so an untranslated connect()
fails with ENETUNREACH. The programs are compiled once for the module (bcc takes ~2 s);
every test starts from empty maps and attached programs.
"""

from __future__ import annotations

import ctypes
import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from apilane.node_loader.bpfmaps import StructCodec, layout_of
from apilane.node_loader.nat import (
    PROTO_UDP,
    BackendKey,
    BackendValue,
    Family,
    FrontendKey,
    FrontendValue,
)
from apilane.node_loader.programs import HOOKS, ConnectTimeLB
from apilane.node_loader.sockets import Destination, destroy_connected
from apilane.shared.testing.bpf import (
    SERVICE_VIP4,
    SERVICE_VIP6,
    Agent,
    BpfLab,
    Topology,
    entered_netns,
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
    with entered_netns(dp.topology.client):
        report = destroy_connected([Destination(removed, BACKEND_PORT)])

    assert report.supported, report.reason
    assert report.failures == []
    assert report.destroyed == sum(1 for ip in opened.values() if ip == removed)
    for name, ip in opened.items():
        probe = dp.agent.tcp_probe(name)
        if ip == removed:
            assert probe == {"alive": False, "error": "ECONNABORTED"}
        else:
            assert probe == {"alive": True, "error": None}


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
        "apilane_rev4": (16, {"cookie": 0, "addr": 8, "port": 12, "pad": 14}, 8,
                         {"addr": 0, "port": 4, "pad": 6}),
        "apilane_rev6": (32, {"cookie": 0, "addr": 8, "port": 24, "pad": 26, "pad2": 28}, 20,
                         {"addr": 0, "port": 16, "pad": 18}),
    }  # fmt: skip
    bpf = datapath.lb._bpf
    for name, (key_size, key_offsets, leaf_size, leaf_offsets) in expected.items():
        table = bpf.get_table(name.encode())
        assert ctypes.sizeof(table.Key) == key_size, name
        assert ctypes.sizeof(table.Leaf) == leaf_size, name
        assert {f.name: f.offset for f in layout_of(table.Key)} == key_offsets, name
        assert {f.name: f.offset for f in layout_of(table.Leaf)} == leaf_offsets, name
        # The byte codecs are derived from the same types and agree on the size.
        assert StructCodec(table.Key).size == key_size
        assert StructCodec(table.Leaf).size == leaf_size


def _kernel_attached(cgroup: Path) -> list[tuple[str, str]]:
    """(program name, attach type) for every program on the cgroup, as bpftool reports."""
    output = subprocess.run(
        ["bpftool", "-j", "cgroup", "show", str(cgroup)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [(entry["name"], entry["attach_type"]) for entry in json.loads(output.strip() or "[]")]
