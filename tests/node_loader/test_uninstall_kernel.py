"""`python -m apilane.node_loader uninstall` on the live kernel.

A data plane as a stopped loader leaves it (maps pinned and programmed, links pinned and
attached to a dedicated test cgroup, a state file), then the uninstall command, run as an
operator would: a separate process with the loader's settings.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from apilane.node_loader import settings as loader_settings
from apilane.node_loader.programs import HOOKS, ConnectTimeLB, programs_on_cgroup
from apilane.node_loader.reconcile import Reconciler
from apilane.node_loader.settings import NodeLoaderSettings
from apilane.node_loader.statefile import StateFile
from apilane.testing.bpf import SERVICE_VIP4, BpfLab
from apilane.testing.snapshots import make_snapshot

pytestmark = [pytest.mark.integration, pytest.mark.bpf]

SERVICE_PORT = 443
BACKEND_PORT = 8080


def loader_env(*, cgroup: Path, pin_dir: Path, state_dir: Path) -> dict[str, str]:
    return {
        "APILANE_NODE_NAME": "uninstall-node",
        # Backends here are addresses no probe may reach from this host: probing is off.
        "APILANE_BACKEND_PROBE": "off",
        "APILANE_MAP_BACKEND": "bpf",
        "APILANE_CGROUP_PATH": str(cgroup),
        "APILANE_BPF_PIN_DIR": str(pin_dir),
        "APILANE_STATE_DIR": str(state_dir),
    }


def run_uninstall(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "apilane.node_loader", "uninstall"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def install(settings: NodeLoaderSettings, backend_ip: str) -> None:
    """What a loader leaves behind when it stops: programmed pinned maps, pinned links,
    the state file. This process's descriptors are closed."""
    with ConnectTimeLB(cgroup_path=settings.cgroup_path, pin_dir=settings.pin_dir) as lb:
        reconciler = Reconciler(
            maps=lb.nat_maps, cluster="default", state_file=StateFile(settings.state_file)
        )
        reconciler.recover()
        snapshot = make_snapshot(
            generation=1,
            services=(f"{SERVICE_VIP4}:{SERVICE_PORT}",),
            apiservers=(f"{backend_ip}:{BACKEND_PORT}",),
        )
        assert reconciler.apply(snapshot).wrote_maps
        lb.enable()


def bpftool_cgroup_show(cgroup: Path) -> str:
    result = subprocess.run(
        ["bpftool", "cgroup", "show", str(cgroup)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return result.stdout


def test_uninstall_removes_links_maps_and_state_and_is_idempotent(
    bpf_lab: BpfLab, child_cgroup: Path, pin_dir: Path, tmp_path: Path
) -> None:
    topology = bpf_lab.topology(backends=1)
    [backend] = topology.backends
    bpf_lab.server(netns=backend.netns, addresses=[backend.ipv4], ports=[BACKEND_PORT])
    agent = bpf_lab.agent(netns=topology.client, cgroup=child_cgroup)
    env = loader_env(cgroup=child_cgroup, pin_dir=pin_dir, state_dir=tmp_path / "state")
    settings = loader_settings.load(env, serving=False)  # uninstall reads no keys
    install(settings, backend.ipv4)
    [translated] = agent.tcp_request(SERVICE_VIP4, SERVICE_PORT)
    assert translated["error"] is None and translated["server"][0] == backend.ipv4
    assert "apilane_connect" in bpftool_cgroup_show(child_cgroup)
    pins = sorted(p.name for p in pin_dir.iterdir())
    assert len(pins) == len(HOOKS) + 7, pins  # 8 links, 7 maps (fe/be/rev x IPv4/IPv6, conn)
    assert settings.state_file.is_file()

    # An object apilane does not know in the pin dir: refused, nothing touched.
    foreign = pin_dir / "foreign_map"
    map_spec = ("type", "array", "key", "4", "value", "4", "entries", "1", "name", "foreign_map")
    subprocess.run(
        ["bpftool", "map", "create", str(foreign), *map_spec],
        check=True,
        timeout=30,
    )
    refused = run_uninstall(env)
    assert refused.returncode == 3, refused
    assert "foreign_map" in refused.stderr and refused.stdout == ""
    assert sorted(p.name for p in pin_dir.iterdir()) == sorted([*pins, "foreign_map"])
    assert agent.tcp_request(SERVICE_VIP4, SERVICE_PORT)[0]["error"] is None
    foreign.unlink()

    done = run_uninstall(env)
    assert done.returncode == 0, done
    lines = done.stdout.splitlines()
    assert sum(line.startswith("detached link_") for line in lines) == len(HOOKS), lines
    assert sum(line.startswith("unpinned map ") for line in lines) == 7, (
        lines
    )  # fe/be/rev x 2 families, conn
    assert f"removed state file {settings.state_file}" in lines
    assert f"removed pin dir {pin_dir}" in lines
    # Nothing of apilane is left: pins, state, programs on the cgroup, translation.
    assert not pin_dir.exists()
    assert not settings.state_file.exists()
    assert programs_on_cgroup(child_cgroup) == []
    assert "apilane" not in bpftool_cgroup_show(child_cgroup)
    [untranslated] = agent.tcp_request(SERVICE_VIP4, SERVICE_PORT)
    assert untranslated["error"] == "ENETUNREACH"  # no route to the VIP in the namespace

    again = run_uninstall(env)
    assert again.returncode == 0, again
    assert again.stdout.splitlines() == [
        f"nothing to remove: no apilane pins in {pin_dir}, no state file"
    ]


def test_uninstall_refuses_a_pin_dir_that_is_not_on_bpffs(tmp_path: Path) -> None:
    not_bpffs = tmp_path / "pins"
    not_bpffs.mkdir()
    (not_bpffs / "apilane_fe4_v1").write_text("not a pin")
    env = loader_env(cgroup=tmp_path, pin_dir=not_bpffs, state_dir=tmp_path / "state")
    result = run_uninstall(env)
    assert result.returncode == 3, result
    assert "not on a bpf filesystem" in result.stderr
    assert (not_bpffs / "apilane_fe4_v1").exists()
