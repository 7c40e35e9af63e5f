"""The services as separate processes, started through their real entry points (`python -m
apilane.<service>`), for end-to-end tests and benchmarks. Each is ended by the pid we started."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from apilane.testing.procs import end_process, free_port, tail

REPO = Path(__file__).resolve().parents[5]


def base_environment(
    *,
    cluster: str,
    nats_url: str,
    kubeconfig: str,
    otlp_endpoint: str | None = None,
) -> dict[str, str]:
    """The variables every service needs, on top of this process's environment with any
    APILANE_* and OTEL_* removed (so a developer's shell cannot leak into a test)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("APILANE_", "OTEL_"))}
    env.update(
        {
            "APILANE_CLUSTER": cluster,
            "APILANE_NATS_URL": nats_url,
            "APILANE_HTTP_HOST": "127.0.0.1",
            "KUBECONFIG": kubeconfig,
        }
    )
    if otlp_endpoint:
        env.update(
            {
                "OTEL_TRACES_EXPORTER": "otlp",
                "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_endpoint,
                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                "OTEL_BSP_SCHEDULE_DELAY": "100",
            }
        )
    else:
        env["OTEL_SDK_DISABLED"] = "true"
    return env


class ServiceProcesses:
    """Named service processes with their logs in one directory."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, module: str, env: Mapping[str, str]) -> None:
        environment = dict(env)
        environment.setdefault("APILANE_HTTP_PORT", str(free_port()))
        with (self.logs / f"{name}.log").open("wb") as log:
            self.processes[name] = subprocess.Popen(
                [sys.executable, "-m", module],
                env=environment,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
            )

    def check_alive(self) -> None:
        for name, process in self.processes.items():
            if process.poll() is not None:
                raise AssertionError(f"{name} exited with {process.returncode}:\n{self.log(name)}")

    def log(self, name: str, lines: int = 40) -> str:
        return tail(self.logs / f"{name}.log", lines)

    def logs_text(self) -> str:
        return "\n".join(f"--- {name} ---\n{self.log(name)}" for name in self.processes)

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()  # all at once: a graceful drain each, in parallel
        for process in self.processes.values():
            end_process(process, grace=10)
