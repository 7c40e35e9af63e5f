"""The eBPF harness talks to the real kernel: a minimal cgroup/connect4 program compiled by bcc,
a bcc hash map, a child cgroup, and namespaces with no default route."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from apilane.testing.bpf import (
    BPFFS,
    NETNS_DIR,
    SERVICE_VIP4,
    BpfLab,
    cgroup2_mount,
    check_bpf_environment,
)

pytestmark = [pytest.mark.integration, pytest.mark.bpf]

# Independent of bpf/nat.h on purpose: this proves the harness, not apilane's programs.
MINIMAL_CONNECT4 = r"""
#include <uapi/linux/bpf.h>

struct target { u32 ip; u32 port; };  /* both in network byte order */
BPF_HASH(rewrites, u32, struct target, 16);  /* key: destination IPv4, NBO */

int rewrite_connect4(struct bpf_sock_addr *ctx)
{
    u32 destination = ctx->user_ip4;
    struct target *to = rewrites.lookup(&destination);
    if (to) {
        ctx->user_ip4 = to->ip;
        ctx->user_port = to->port;
    }
    return 1;
}
"""
CGROUP_INET4_CONNECT = 10
BPF_F_ALLOW_MULTI = 2


def _nbo_u32(ip: str) -> int:
    return int.from_bytes(bytes(int(part) for part in ip.split(".")), "little")


def _nbo_port(port: int) -> int:
    return int.from_bytes(port.to_bytes(2, "big"), "little")


def test_connect_to_a_vip_is_rewritten_by_a_bcc_connect4_program(bpf_lab: BpfLab) -> None:
    from bcc import BPF

    topology = bpf_lab.topology(backends=1)
    backend = topology.backends[0]
    bpf_lab.server(netns=backend.netns, addresses=[backend.ipv4], ports=[8080])
    cgroup = bpf_lab.child_cgroup()
    client = bpf_lab.agent(netns=topology.client, cgroup=cgroup)
    assert client.tcp_request(SERVICE_VIP4, 443)[0]["error"] == "ENETUNREACH"

    bpf = BPF(text=MINIMAL_CONNECT4.encode())
    program = bpf.load_func(
        b"rewrite_connect4", BPF.CGROUP_SOCK_ADDR, attach_type=CGROUP_INET4_CONNECT
    )
    rewrites = bpf.get_table(b"rewrites")
    target = rewrites.Leaf()
    target.ip, target.port = _nbo_u32(backend.ipv4), _nbo_port(8080)
    rewrites[rewrites.Key(_nbo_u32(SERVICE_VIP4))] = target
    cgroup_fd = os.open(cgroup, os.O_RDONLY)
    try:
        BPF.attach_func(program, cgroup_fd, CGROUP_INET4_CONNECT, BPF_F_ALLOW_MULTI)
        try:
            [result] = client.tcp_request(SERVICE_VIP4, 443)
        finally:
            BPF.detach_func(program, cgroup_fd, CGROUP_INET4_CONNECT)
    finally:
        os.close(cgroup_fd)
        bpf.cleanup()

    assert result["error"] is None
    assert result["server"] == [backend.ipv4, 8080]


def test_the_environment_check_finds_cgroup2_and_bpffs(bpf_environment: Path) -> None:
    assert bpf_environment == cgroup2_mount() == check_bpf_environment()
    assert (bpf_environment / "cgroup.procs").is_file()


def test_fixtures_make_a_child_cgroup_a_bpffs_dir_and_isolated_namespaces(
    child_cgroup: Path, pin_dir: Path, bpf_lab: BpfLab
) -> None:
    assert child_cgroup.parent == cgroup2_mount()
    assert child_cgroup.name.startswith("apilane-test-")
    assert pin_dir.parent == BPFFS and pin_dir.is_dir()

    namespace = bpf_lab.netns("probe")
    routes = subprocess.run(
        ["ip", "-n", namespace.name, "route", "show", "default"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert routes.strip() == ""
    agent = bpf_lab.agent(netns=namespace, cgroup=child_cgroup)
    assert (child_cgroup / "cgroup.procs").read_text().split() == [str(agent.pid)]
    assert agent.tcp_request(SERVICE_VIP4, 443)[0]["error"] == "ENETUNREACH"


def test_the_lab_removes_everything_it_made(bpf_environment: Path) -> None:
    with BpfLab(cgroup_root=bpf_environment) as lab:
        topology = lab.topology(backends=2)
        cgroup = lab.child_cgroup()
        pin_dir = lab.pin_dir()
        (pin_dir / "sub").mkdir()
        agent = lab.agent(netns=topology.client, cgroup=cgroup)
        server = lab.server(
            netns=topology.backends[0].netns, addresses=[topology.backends[0].ipv4], ports=[9]
        )
        names = [topology.client.name, *(b.netns.name for b in topology.backends)]

    assert not cgroup.exists()
    assert not pin_dir.exists()
    assert not any((NETNS_DIR / name).exists() for name in names)
    assert agent.process.poll() is not None
    assert server.process.poll() is not None


def test_agents_never_join_the_root_cgroup(bpf_lab: BpfLab) -> None:
    namespace = bpf_lab.netns("root")
    with pytest.raises(AssertionError, match="root cgroup"):
        bpf_lab.agent(netns=namespace, cgroup=cgroup2_mount())
