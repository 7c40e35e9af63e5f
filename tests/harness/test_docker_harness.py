"""Proof that the docker harness runs a real daemon that stays off the host's firewall and
routing, places its containers' cgroups under its own parent, and that the pure helpers
(socket parsing, the dockerd command line, cgroup teardown order) say what they mean."""

from __future__ import annotations

import io
import subprocess
import tarfile
from pathlib import Path

import pytest

from apilane.testing import docker
from apilane.testing.docker import DockerDaemon
from apilane.testing.nats import find_nats_server


@pytest.mark.unit
def test_socket_path_accepts_unix_sockets_only() -> None:
    assert docker.socket_path("unix:///run/x/docker.sock") == "/run/x/docker.sock"
    assert docker.socket_path("/run/x/docker.sock") == "/run/x/docker.sock"
    assert docker.socket_path("tcp://127.0.0.1:2375") is None


@pytest.mark.unit
def test_own_dockerd_touches_no_firewall_routing_or_machine_config(tmp_path: Path) -> None:
    argv = docker.dockerd_argv(
        socket=tmp_path / "s", data=tmp_path / "d", run=tmp_path / "r", config=tmp_path / "c"
    )
    for flag in ("--iptables=false", "--ip-forward=false", "--ip-masq=false", "--bridge=none"):
        assert flag in argv
    assert f"--config-file={tmp_path / 'c'}" in argv
    assert f"--host=unix://{tmp_path / 's'}" in argv
    assert "--exec-opt=native.cgroupdriver=cgroupfs" in argv
    assert f"--cgroup-parent=/{docker.CGROUP_PARENT}" in argv


@pytest.mark.unit
def test_cgroup_dirs_lists_deepest_first(tmp_path: Path) -> None:
    for hierarchy in ("cpu", "memory"):
        (tmp_path / hierarchy / docker.CGROUP_PARENT / "abc" / "inner").mkdir(parents=True)
    (tmp_path / "pids" / "other").mkdir(parents=True)
    found = docker.cgroup_dirs(tmp_path)
    assert len(found) == 6
    depths = [len(p.parts) for p in found]
    assert depths == sorted(depths, reverse=True)
    assert all(docker.CGROUP_PARENT in p.parts for p in found)


@pytest.mark.unit
def test_mount_points_under_lists_only_those_inside_deepest_first() -> None:
    mountinfo = (
        "36 25 0:4 / /run/apilane-docker/exec/netns/default rw - nsfs nsfs rw\n"
        "37 25 0:5 / /run/apilane-docker/exec rw - tmpfs tmpfs rw\n"
        "38 25 0:6 / /run/apilane-docker-other rw - tmpfs tmpfs rw\n"
    )
    assert docker.mount_points_under(Path("/run/apilane-docker/exec"), mountinfo) == [
        Path("/run/apilane-docker/exec/netns/default"),
        Path("/run/apilane-docker/exec"),
    ]


def _ip_forward() -> str:
    return Path("/proc/sys/net/ipv4/ip_forward").read_text().strip()


@pytest.mark.integration
@pytest.mark.docker
def test_daemon_runs_a_container_without_network_under_its_cgroup_parent(
    docker_daemon: DockerDaemon, tmp_path: Path
) -> None:
    info = docker_daemon.api("/info")
    assert info["Driver"] == "overlay2"
    if docker_daemon.started:
        assert info["CgroupDriver"] == "cgroupfs"
        assert _ip_forward() == "0" or docker_daemon.host != "", "dockerd left ip_forward alone"
        rules = subprocess.run(["iptables-save"], capture_output=True, text=True, check=True)
        assert "DOCKER" not in rules.stdout, "our dockerd must add no iptables chains"

    # A one-file image (the static nats-server binary), imported, run with no network.
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        tar.add(find_nats_server(), arcname="nats-server")
    image = "apilane-test/one-binary:harness"
    docker_daemon.docker("import", "-", image, stdin=archive.getvalue())
    try:
        ran = docker_daemon.docker(
            "run", "--rm", "--network=none", "--entrypoint=/nats-server", image, "--version"
        )
        assert ran.stdout.decode().startswith("nats-server: v")
        # A serving container: every cgroup it is in is under our parent, and removing the
        # container removes its cgroups.
        name = docker_daemon.docker(
            "run", "-d", "--network=none", "--entrypoint=/nats-server", image, "-p", "4222",
        ).stdout.decode().strip()  # fmt: skip
        try:
            pid = docker_daemon.docker("inspect", "--format", "{{.State.Pid}}", name).stdout
            lines = Path(f"/proc/{int(pid)}/cgroup").read_text().splitlines()
            paths = {line.split(":", 2)[2] for line in lines}
            if docker_daemon.started:
                assert all(p.startswith(f"/{docker.CGROUP_PARENT}/{name}") for p in paths), paths
        finally:
            docker_daemon.docker("rm", "-f", name)
        if docker_daemon.started:
            assert not [p for p in docker.cgroup_dirs() if name in p.name]
    finally:
        docker_daemon.docker("image", "rm", image, check=False)
