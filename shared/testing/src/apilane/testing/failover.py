"""What the HA failover test and the failover benchmark share: a client that calls the service
VIP from a test namespace, the node's programmed backends read from the pins, the node-loader's
probe settings against an HAControlPlane, and the failure window of a run.

The client is `python -m apilane.cli.demo --json` (the `apilane demo` client) in a client
namespace of the plane (no default route) and the loader's child cgroup: a connect() to the VIP
reaches an apiserver only when the node's maps translate it.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from apilane.testing.bpf import pinned_v4_nat
from apilane.testing.ha import ClientNamespace
from apilane.testing.procs import end_process

VIP, VIP_PORT = "10.96.0.1", 443
APISERVER_PORT = 6443
REQUEST_INTERVAL = 0.05


@dataclass(frozen=True)
class VipAnswer:
    """One request of the client, as `apilane demo --json` prints it."""

    at: float  # Unix time the request started
    server: str  # the answering apiserver's certificate CN ("" when none answered)
    status: int
    latency_ms: float
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and 200 <= self.status < 300


class VipClient:
    """The demo client in `namespace` and `cgroup`, a request every `interval` for at most
    `duration` s; a reader thread collects its answers."""

    def __init__(
        self,
        namespace: ClientNamespace,
        cgroup: Path,
        ca: Path,
        *,
        interval: float = REQUEST_INTERVAL,
        duration: float = 150.0,
    ) -> None:
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "apilane.cli.demo",
                f"--netns={namespace.path}",
                f"--cgroup={cgroup}",
                f"--ca={ca}",
                f"--vip={VIP}",
                f"--port={VIP_PORT}",
                f"--interval={interval}",
                f"--duration={duration}",
                "--json",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.answers: list[VipAnswer] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._lock:
                self.answers.append(VipAnswer(**json.loads(line)))

    def seen(self) -> list[VipAnswer]:
        with self._lock:
            return list(self.answers)

    def stop(self) -> str:
        """Ends the client (by its pid); returns its stderr."""
        end_process(self.process, grace=5.0)
        self._reader.join(timeout=5)
        assert self.process.stderr is not None
        return self.process.stderr.read().decode(errors="replace")


def programmed_apiservers(pins: Path) -> set[str]:
    """The apiserver addresses the node's pinned maps hold behind the VIP (read by bpftool);
    empty while nothing is pinned yet or mid-update (an entry deleted between bpftool's
    next-key and lookup dumps as an error instead of bytes: a ValueError here)."""
    try:
        backends = pinned_v4_nat(pins).get((VIP, VIP_PORT), set())
    except (subprocess.CalledProcessError, FileNotFoundError, KeyError, ValueError):
        return set()
    return {ip for ip, port in backends if port == APISERVER_PORT}


def probe_environment(
    ca: Path, namespace: ClientNamespace | None, *, kind: str = "https"
) -> dict[str, str]:
    """The node-loader's probe settings against an HAControlPlane: `kind` ("off", "tcp",
    "https": GET /readyz verified against the plane's CA `ca`) from `namespace`, one of the
    plane's client namespaces: on its bridge, so probes reach only the apiservers' namespaces."""
    if kind == "off":
        return {"APILANE_BACKEND_PROBE": "off"}
    env = {"APILANE_BACKEND_PROBE": kind}
    if namespace is not None:
        env["APILANE_PROBE_NETNS"] = str(namespace.path)
    if kind == "https":
        env["APILANE_PROBE_CA_FILE"] = str(ca)
    return env


@dataclass(frozen=True)
class FailureWindow:
    """A client's view of one failover that began at `since`."""

    window: float  # from `since` to the start of the last failed request (0: none failed)
    failed: int
    requests: int  # from `since` to the end of the run

    @property
    def failed_fraction(self) -> float:
        return self.failed / self.requests if self.requests else 0.0


def failure_window(answers: Sequence[VipAnswer], since: float) -> FailureWindow:
    """PURE: the failures among the requests started at or after `since`."""
    after = [a for a in answers if a.at >= since]
    failures = [a for a in after if not a.ok]
    window = failures[-1].at - since if failures else 0.0
    return FailureWindow(window=max(0.0, window), failed=len(failures), requests=len(after))


def median_and_spread(values: Sequence[float]) -> tuple[float, float, float]:
    """PURE: (median, min, max) of at least one value."""
    if not values:
        raise ValueError("no values")
    return statistics.median(values), min(values), max(values)
