"""The services as separate processes, started through their real entry points (`python -m
apilane.<service>`), for end-to-end tests, benchmarks and the local stack (`apilane up`). Each
is started by `procs.start_process` and ended by the pid we started."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from apilane.testing.procs import (
    ProcessExited,
    end_process,
    free_port,
    http_ok,
    start_process,
    tail,
    wait_until,
)

REPO = Path(__file__).resolve().parents[5]


def base_environment(
    *,
    cluster: str,
    nats_url: str,
    kubeconfig: str = "",
    otlp_endpoint: str | None = None,
    zipkin_endpoint: str | None = None,
) -> dict[str, str]:
    """The variables every service needs, on top of this process's environment with any
    APILANE_*, OTEL_* and KUBECONFIG removed (so a developer's shell cannot leak into a test or
    the local stack). Spans go to an OTLP/HTTP endpoint or a Zipkin one; with neither, tracing
    is off. Without `kubeconfig`, KUBECONFIG is not set (a node-loader needs none)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("APILANE_", "OTEL_")) and k != "KUBECONFIG"
    }
    env.update(
        {
            "APILANE_CLUSTER": cluster,
            "APILANE_NATS_URL": nats_url,
            "APILANE_HTTP_HOST": "127.0.0.1",
        }
    )
    if kubeconfig:
        env["KUBECONFIG"] = kubeconfig
    if otlp_endpoint:
        env.update(
            {
                "OTEL_TRACES_EXPORTER": "otlp",
                "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_endpoint,
                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                "OTEL_BSP_SCHEDULE_DELAY": "100",
            }
        )
    elif zipkin_endpoint:
        env.update(
            {
                "OTEL_TRACES_EXPORTER": "zipkin",
                "OTEL_EXPORTER_ZIPKIN_ENDPOINT": zipkin_endpoint,
                # Export within half a second, so a change shows up in the UI right away.
                "OTEL_BSP_SCHEDULE_DELAY": "500",
            }
        )
    else:
        env["OTEL_SDK_DISABLED"] = "true"
    return env


class ServiceProcesses:
    """Named processes with their logs in one directory: the services, and anything a stack
    runs beside them (`start_command`, e.g. a tracing UI)."""

    def __init__(self, logs: Path, *, cwd: Path = REPO) -> None:
        self.logs = logs
        self.cwd = cwd
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, module: str, env: Mapping[str, str]) -> None:
        """`python -m <module>` with `env` (on a free APILANE_HTTP_PORT unless it names one)."""
        environment = dict(env)
        environment.setdefault("APILANE_HTTP_PORT", str(free_port()))
        self.start_command(name, [sys.executable, "-m", module], environment)

    def start_command(self, name: str, argv: Sequence[str], env: Mapping[str, str]) -> None:
        self.processes[name] = start_process(
            argv, log_path=self.log_path(name), env=env, cwd=self.cwd
        )

    def log_path(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def check_alive(self) -> None:
        """Raise ProcessExited, with its log, for the first process that is no longer running."""
        for name, process in self.processes.items():
            if process.poll() is not None:
                raise ProcessExited(f"{name} exited with {process.returncode}:\n{self.log(name)}")

    def wait_ready(self, name: str, url: str, *, timeout: float) -> None:
        """Until `url` answers 2xx. ProcessExited when a process exits first; TimeoutError,
        with the log, when it is not ready in time."""

        def ready() -> bool:
            self.check_alive()
            return http_ok(url)

        try:
            wait_until(ready, timeout=timeout, interval=0.25, what=f"{name} at {url}")
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}; its log:\n{self.log(name)}") from exc

    def log(self, name: str, lines: int = 40) -> str:
        return tail(self.log_path(name), lines)

    def logs_text(self) -> str:
        return "\n".join(f"--- {name} ---\n{self.log(name)}" for name in self.processes)

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()  # all at once: a graceful drain each, in parallel
        for process in self.processes.values():
            end_process(process, grace=10)
