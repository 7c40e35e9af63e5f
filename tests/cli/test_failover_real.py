"""`apilane simulate failover` against real apiservers: which one it kills, that it signals
only a pid that still is that kube-apiserver, and when a removal counts as done everywhere.
Killing by the recorded pid runs here against the harness's real apiservers; the whole
command is what `make up` offers (README, Quick start)."""

from __future__ import annotations

import asyncio
import json
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from apilane.cli.errors import CliError
from apilane.cli.failover import (
    RecordedApiServer,
    choose_victim,
    kill_recorded,
    left_everywhere,
    new_apiserver_in,
    recorded_apiservers,
    request_replacement,
)
from apilane.cli.status import View
from apilane.model import events
from apilane.testing.ha import HAControlPlane
from apilane.testing.procs import pid_alive

RECORDED: dict[str, Any] = {
    "apiservers": [
        {
            "index": 0,
            "name": "kube-apiserver-0",
            "address": "198.18.7.10",
            "url": "https://198.18.7.10:6443",
            "pid": None,
        },
        {
            "index": 1,
            "name": "kube-apiserver-1",
            "address": "198.18.7.11",
            "url": "https://198.18.7.11:6443",
            "pid": 4242,
        },
        {
            "index": 2,
            "name": "kube-apiserver-2",
            "address": "198.18.7.12",
            "url": "https://198.18.7.12:6443",
            "pid": 4343,
        },
    ]
}


def view(ips: tuple[str, ...], env: str, node_generations: tuple[int, ...]) -> View:
    snapshot = events.EndpointSnapshot(
        cluster="local",
        generation=5,
        service_endpoints=(),
        apiserver_endpoints=tuple(
            events.ApiServerEndpoint(ip=ip, port=6443, family="IPv4") for ip in ips
        ),
        digest="sha256:x",
        observed_at=datetime.now(UTC),
    )
    return View(
        snapshot=snapshot,
        trace_id="",
        nodes=[
            events.NodeState(cluster="local", node=f"n{i}", generation=g, digest="sha256:x")
            for i, g in enumerate(node_generations)
        ],
        calico_env={"KUBERNETES_APISERVER_ENDPOINTS": env},
        daemonset_generation=1,
    )


@pytest.mark.unit
def test_the_victim_is_the_oldest_running_endpoint() -> None:
    apiservers = recorded_apiservers(RECORDED)
    assert [a.pid for a in apiservers] == [None, 4242, 4343]
    assert apiservers[1].port == 6443
    assert choose_victim(apiservers, {"198.18.7.10", "198.18.7.11", "198.18.7.12"}).index == 1
    assert choose_victim(apiservers, {"198.18.7.12"}).index == 2
    assert choose_victim(apiservers, set()).index == 1
    with pytest.raises(CliError, match="no running"):
        choose_victim(apiservers[:1], set())


@pytest.mark.unit
def test_a_removal_is_done_when_snapshot_env_and_every_node_have_it() -> None:
    gone = "198.18.7.10"
    kept = ("198.18.7.11", "198.18.7.12")
    env = "198.18.7.11:6443,198.18.7.12:6443"
    assert left_everywhere(view(kept, env, (5, 5)), gone)
    assert not left_everywhere(view((gone, *kept), env, (5,)), gone)
    assert not left_everywhere(view(kept, f"{gone}:6443,{env}", (5,)), gone)
    assert not left_everywhere(view(kept, env, (5, 4)), gone)
    assert not left_everywhere(view(kept, env, ()), gone)


@pytest.mark.unit
def test_a_replacement_is_asked_for_by_file_and_found_in_the_stack_file(tmp_path: Path) -> None:
    victim = recorded_apiservers(RECORDED)[1]
    request_replacement(tmp_path, victim)
    assert [p.read_text() for p in tmp_path.glob("replace-*")] == ["kube-apiserver-1\n"]
    stack_file = tmp_path / "stack.json"
    known = {"198.18.7.10", "198.18.7.11", "198.18.7.12"}
    assert new_apiserver_in(stack_file, known) is None  # no file yet
    added = {
        "index": 3,
        "name": "kube-apiserver-3",
        "address": "198.18.7.13",
        "url": "https://198.18.7.13:6443",
        "pid": 4444,
    }
    stack_file.write_text(json.dumps({"ha": {"apiservers": [*RECORDED["apiservers"], added]}}))
    found = new_apiserver_in(stack_file, known)
    assert found is not None and (found.name, found.pid) == ("kube-apiserver-3", 4444)


@pytest.mark.unit
def test_only_a_pid_that_still_is_that_apiserver_is_signalled() -> None:
    other = subprocess.Popen(["sleep", "30"])
    try:
        impostor = RecordedApiServer(0, "kube-apiserver-0", "198.18.7.10", 6443, other.pid)
        with pytest.raises(CliError, match="no longer"):
            kill_recorded(impostor)
        assert other.poll() is None  # untouched
    finally:
        other.kill()
        other.wait()
    with pytest.raises(CliError, match="gone"):
        kill_recorded(RecordedApiServer(0, "kube-apiserver-0", "198.18.7.10", 6443, other.pid))


@pytest.mark.integration
@pytest.mark.kube
async def test_a_real_apiserver_is_killed_by_its_recorded_pid(
    ha_control_plane: HAControlPlane,
) -> None:
    plane = ha_control_plane
    apiservers = recorded_apiservers(plane.state())
    pid = apiservers[1].pid
    assert pid is not None
    wrong_address = RecordedApiServer(1, "kube-apiserver-1", plane.addresses[0], 6443, pid)
    with pytest.raises(CliError, match="no longer"):
        kill_recorded(wrong_address)
    assert pid_alive(pid)
    kill_recorded(apiservers[1])
    for _ in range(100):
        if not plane.apiservers[1].running:
            break
        await asyncio.sleep(0.05)
    assert not plane.apiservers[1].running
    assert plane.state()["apiservers"][1]["pid"] is None
    assert plane.apiservers[0].running and plane.apiservers[2].running
