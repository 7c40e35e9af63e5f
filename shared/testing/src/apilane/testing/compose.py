"""`docker compose` of docker-compose.yml + docker-compose.local.yml on a daemon of the harness.

One `ComposeStack` is one compose project with a name of its own, its loopback ports picked by
the daemon (so two stacks, or a stack and `make up`, never collide), its node-loader's pin dir
and child cgroup named after it, and a teardown that removes everything it created: the
node-loader's pinned maps and links (`uninstall`), containers, networks and volumes
(`down --volumes`), and the child cgroup. `leftovers()` says what is still there.
"""

from __future__ import annotations

import contextlib
import secrets
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from apilane.testing.docker import DockerDaemon, labelled

REPO = Path(__file__).resolve().parents[5]
COMPOSE_FILES = (REPO / "docker-compose.yml", REPO / "docker-compose.local.yml")
HOST_CGROUP2 = Path("/sys/fs/cgroup/unified")
BPF_FS = Path("/sys/fs/bpf")
UP_TIMEOUT = 600
DOWN_TIMEOUT = 20


def project_environment(instance: str, cgroup2: Path = HOST_CGROUP2) -> dict[str, str]:
    """The variables docker-compose.local.yml reads, for one instance on this host."""
    return {
        "APILANE_COMPOSE_INSTANCE": instance,
        "APILANE_HOST_CGROUP2": str(cgroup2),
        "APILANE_NATS_PORT": "0",
        "APILANE_KUBE_API_PORT": "0",
        "APILANE_ZIPKIN_PORT": "0",
    }


def host_kubeconfig(in_container: str, port: int) -> str:
    """The kube-api container's own kubeconfig (https://127.0.0.1:6443), re-pointed at the
    loopback port the daemon published it on."""
    document = yaml.safe_load(in_container)
    for cluster in document["clusters"]:
        cluster["cluster"]["server"] = f"https://127.0.0.1:{port}"
    return str(yaml.safe_dump(document, sort_keys=False))


@dataclass
class ComposeStack:
    daemon: DockerDaemon
    instance: str = field(default_factory=lambda: f"apilane-compose-{secrets.token_hex(3)}")
    cgroup2: Path = HOST_CGROUP2
    up_seconds: float = 0.0

    @property
    def pin_dir(self) -> Path:
        return BPF_FS / self.instance

    @property
    def cgroup(self) -> Path:
        return self.cgroup2 / self.instance

    def compose(
        self, *args: str, check: bool = True, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        argv = ["docker", "compose", "--project-name", self.instance]
        for path in COMPOSE_FILES:
            argv += ["--file", str(path)]
        result = subprocess.run(
            [*argv, *args],
            cwd=REPO,
            env=self.daemon.env() | project_environment(self.instance, self.cgroup2),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise RuntimeError(
                f"docker compose {' '.join(args)} failed ({result.returncode}):\n"
                f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
            )
        return result

    def up(self) -> float:
        """`up --wait`: returns once every service is healthy (or completed, for the seed)."""
        started = time.monotonic()
        self.compose(
            "up", "--detach", "--wait", "--wait-timeout", str(UP_TIMEOUT), "--no-build",
            timeout=UP_TIMEOUT + 60,
        )  # fmt: skip
        self.up_seconds = time.monotonic() - started
        return self.up_seconds

    def port(self, service: str, container_port: int) -> int:
        out = self.compose("port", service, str(container_port)).stdout.strip()
        return int(out.rsplit(":", 1)[1])

    def read(self, service: str, path: str) -> str:
        return self.compose("exec", "-T", service, "cat", path).stdout

    def copy_out(self, service: str, path: str, target: Path) -> None:
        """`docker compose cp` out of a service's container, a finished one-shot's too."""
        self.compose("cp", f"{service}:{path}", str(target))

    def logs(self) -> str:
        result = self.compose("logs", "--no-color", "--timestamps", check=False, timeout=60)
        return result.stdout + result.stderr

    def uninstall_data_plane(self) -> subprocess.CompletedProcess[str]:
        """The node-loader's `uninstall`, in a container with the loader's own settings."""
        return self.compose(
            "run", "--rm", "--no-deps", "--entrypoint", "python", "node-loader",
            "-m", "apilane.node_loader", "uninstall",
            check=False, timeout=120,
        )  # fmt: skip

    def down(self) -> list[str]:
        """Everything the stack made, removed; returns what could not be (empty when clean)."""
        problems: list[str] = []
        uninstalled = self.uninstall_data_plane()
        if uninstalled.returncode != 0:
            problems.append(f"node-loader uninstall: {uninstalled.stdout}{uninstalled.stderr}")
        down = self.compose(
            "down", "--volumes", "--remove-orphans", "--timeout", str(DOWN_TIMEOUT),
            check=False, timeout=180,
        )  # fmt: skip
        if down.returncode != 0:
            problems.append(f"compose down: {down.stderr}")
        with contextlib.suppress(FileNotFoundError):
            self.cgroup.rmdir()
        return problems

    def leftovers(self) -> dict[str, list[str]]:
        label = f"com.docker.compose.project={self.instance}"
        found = {kind: labelled(self.daemon, kind, label) for kind in ("container", "network")}
        found["volume"] = labelled(self.daemon, "volume", label)
        found["cgroup"] = [str(self.cgroup)] if self.cgroup.exists() else []
        found["pins"] = [str(self.pin_dir)] if self.pin_dir.exists() else []
        return {kind: names for kind, names in found.items() if names}
