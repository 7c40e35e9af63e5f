"""The Go fan-out probe (tools/fanout-probe): N NATS connections, each authenticated as its
own node-loader identity, subscribed to the republished snapshot subject, recording when
each connection received each change. It measures what the NATS server(s) do to deliver
one change to N connections, without N Python loaders' own CPU on the same cores.

`find_probe` builds it (tools/install-fanout-probe.sh: the machine's Go toolchain, modules
from the Go module proxy, cached under ~/.cache/apilane by a digest of its sources).
`FanoutProbe` runs it by the pid it started: ready once every connection is subscribed,
`complete` once every subscriber has a given revision, `finish` (its stdin closed) for the
receive times; `delivery_latencies` turns those and the write times into latencies.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

import msgspec

from apilane.model import subjects
from apilane.runtime.natsauth import Role
from apilane.testing.nats import NatsIdentities
from apilane.testing.procs import end_process, start_process, tail

REPO = Path(__file__).resolve().parents[5]
BUILD_SCRIPT = REPO / "tools" / "install-fanout-probe.sh"
BUILD_TIMEOUT = 600.0  # a cold module cache downloads nats.go and its few dependencies


class ProbeError(RuntimeError):
    """The probe could not be built, or did not do what it was started for; the message
    carries what it (or `go build`) printed."""


class ProbeConnection(msgspec.Struct, frozen=True, kw_only=True):
    """What one node-loader connection needs: the URL, its nkey seed, TLS files, its inbox."""

    url: str
    name: str
    seed_file: str
    ca_file: str = ""
    cert: str = ""
    key: str = ""
    inbox_prefix: str = ""


class ProbeSpec(msgspec.Struct, frozen=True, kw_only=True):
    subject: str
    connections: list[ProbeConnection]
    parallel: int = 32  # connections being set up at once
    connect_timeout_s: float = 20.0
    deadline_s: float = 600.0  # the probe ends by itself this long after it started


class ProbeReady(msgspec.Struct, frozen=True, kw_only=True):
    connected: int
    connections: int
    connect_s: float


class ProbeResult(msgspec.Struct, frozen=True, kw_only=True):
    connections: int
    connected: int
    subscribed: list[bool]
    errors: dict[str, int]
    # revision (as text) -> receive time per connection, ns since the epoch, 0 = never
    deliveries: dict[str, list[int]]


class Latencies(msgspec.Struct, frozen=True, kw_only=True):
    samples: list[float]  # seconds, one per (change, subscribed connection) delivered
    missing: int  # (change, subscribed connection) pairs never delivered


def delivery_latencies(result: ProbeResult, written_ns: Mapping[int, int]) -> Latencies:
    """Write→received over every (change, subscribed connection): the pure core."""
    samples: list[float] = []
    missing = 0
    for revision, written in written_ns.items():
        times = result.deliveries.get(str(revision), [0] * len(result.subscribed))
        for received, subscribed in zip(times, result.subscribed, strict=True):
            if not subscribed:
                continue
            if received == 0:
                missing += 1
            else:
                samples.append((received - written) / 1e9)
    return Latencies(samples=samples, missing=missing)


def node_loader_connections(
    identities: NatsIdentities, url: str, cluster: str, nodes: Sequence[str]
) -> list[ProbeConnection]:
    """One connection per node, as that node's loader (identities already listed)."""
    found = []
    for node in nodes:
        identity = identities.identity(Role.NODE_LOADER, cluster, node)
        auth = identities.auth(identity)
        found.append(
            ProbeConnection(
                url=url,
                name=f"fanout-probe-{node}",
                seed_file=auth.nkey_seed_file,
                ca_file=auth.tls_ca_file,
                cert=auth.tls_cert_file,
                key=auth.tls_key_file,
                inbox_prefix=identity.inbox_prefix,
            )
        )
    return found


def snapshot_spec(cluster: str, connections: list[ProbeConnection]) -> ProbeSpec:
    return ProbeSpec(subject=subjects.snapshot_republish_subject(cluster), connections=connections)


def find_probe() -> str:
    """The probe's executable: $APILANE_FANOUT_PROBE, else built (or found cached)."""
    override = os.environ.get("APILANE_FANOUT_PROBE", "").strip()
    if override:
        if os.access(override, os.X_OK):
            return override
        raise ProbeError(f"APILANE_FANOUT_PROBE={override} is not an executable")
    built = subprocess.run(
        ["bash", str(BUILD_SCRIPT)],
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
        check=False,
    )
    if built.returncode != 0:
        raise ProbeError(f"building the fan-out probe failed:\n{built.stderr.strip()}")
    for line in built.stdout.splitlines():
        if line.startswith("fanout-probe="):
            return line.removeprefix("fanout-probe=")
    raise ProbeError(f"{BUILD_SCRIPT} printed no fanout-probe=PATH:\n{built.stdout}")


class FanoutProbe:
    """One run of the probe (see the module docstring); `close` ends it by its pid."""

    def __init__(self, spec: ProbeSpec, work: Path, *, binary: str | None = None) -> None:
        self.spec = spec
        self.binary = binary or find_probe()
        work.mkdir(parents=True, exist_ok=True)
        self.spec_path = work / "fanout-probe-spec.json"
        self.log_path = work / "fanout-probe.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._partial = b""
        self.ready: ProbeReady | None = None
        self.completed: set[int] = set()
        self.result: ProbeResult | None = None

    def start(self, *, timeout: float = 300.0) -> ProbeReady:
        """Start the probe; return once every connection is subscribed (or gave up)."""
        self.spec_path.write_bytes(msgspec.json.encode(self.spec))
        self.log_path.unlink(missing_ok=True)
        self.proc = start_process(
            [self.binary, str(self.spec_path)], log_path=self.log_path, stdin_pipe=True
        )
        self._log = open(self.log_path, "rb")  # noqa: SIM115 - kept open to read as it grows
        self._until(lambda: self.ready is not None, timeout, "every connection subscribed")
        assert self.ready is not None
        return self.ready

    def wait_complete(self, revision: int, timeout: float) -> bool:
        """Whether every subscribed connection received `revision` within `timeout`."""
        try:
            self._until(lambda: revision in self.completed, timeout, f"revision {revision}")
        except TimeoutError:
            return False
        return True

    def finish(self, *, timeout: float = 60.0) -> ProbeResult:
        """Tell the probe to stop (its stdin closed) and return what it received."""
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.close()
        self._until(lambda: self.result is not None, timeout, "the probe's result")
        assert self.result is not None
        return self.result

    def close(self) -> None:
        if self.proc is not None:
            if self.proc.stdin is not None and not self.proc.stdin.closed:
                self.proc.stdin.close()
            end_process(self.proc)
            self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def _until(self, check: object, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self._read_events()
            if check():  # type: ignore[operator]
                return
            if self.proc is not None and self.proc.poll() is not None:
                raise ProbeError(
                    f"the fan-out probe exited ({self.proc.returncode}) before {what}:\n"
                    f"{tail(self.log_path)[-4000:]}"
                )
            if time.monotonic() >= deadline:
                raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {what}")
            time.sleep(0.005)

    def _read_events(self) -> None:
        assert self._log is not None
        chunk = self._log.read()
        if not chunk:
            return
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            if line.startswith(b"{"):  # an event; the rest is the probe's diagnostics
                self._event(json.loads(line))

    def _event(self, event: dict[str, object]) -> None:
        kind = event.pop("event", None)
        if kind == "ready":
            self.ready = msgspec.convert(event, ProbeReady)
        elif kind == "complete":
            self.completed.add(int(str(event["seq"])))
        elif kind == "result":
            self.result = msgspec.convert(event, ProbeResult)

    def __enter__(self) -> FanoutProbe:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
