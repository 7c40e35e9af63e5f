"""`apilane demo`: a client that calls the API server through the service VIP every 100 ms and
prints each answer — which API server answered, the HTTP status, the latency — one line each.

The client runs as a pod's process would: it joins the node-loader's cgroup (where the
connect-time load balancer is attached) and a network namespace without a default route, so
a connect() to the VIP reaches an API server only when the node's eBPF maps translate it.
Each request is a new TLS connection (one load-balancing decision each) verified against the
CA and a name every serving certificate carries (`kubernetes.default.svc`); the answering
apiserver is named by its serving certificate's CN, the one thing the VIP does not hide
(getpeername() returns the VIP after a connect-time translation).

Also runnable as `python -m apilane.cli.demo` (with --netns/--cgroup/--ca/--vip), which tests
use to put the same client into a test namespace; `--json` prints one JSON object per line.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import http.client
import json
import os
import socket
import ssl
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

from apilane.cli.errors import CliError

CLONE_NEWNET = 0x40000000
DEFAULT_INTERVAL = 0.1
DEFAULT_DURATION = 60.0
# Bounds on one run, whatever is asked: it is a demo and a fault test, not a load generator.
MAX_DURATION = 600.0
MIN_INTERVAL = 0.01
REQUEST_TIMEOUT = 2.0
VERIFY_NAME = "kubernetes.default.svc"


@dataclass(frozen=True)
class Target:
    """Where and how to ask: the VIP, the path, the CA and the name to verify."""

    host: str
    port: int
    path: str
    ca_file: str
    server_name: str = VERIFY_NAME


@dataclass(frozen=True)
class Answer:
    """One request: when it started (Unix time), who answered (the serving certificate's CN),
    the HTTP status (0: none), the latency in ms, and the error (empty: none)."""

    at: float
    server: str
    status: int
    latency_ms: float
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and 200 <= self.status < 300


def format_answer(answer: Answer) -> str:
    """`12:00:01.123  kube-apiserver-1  200  3.2 ms` or `…  -  ECONNREFUSED  0.4 ms`."""
    seconds, millis = divmod(round(answer.at * 1000), 1000)
    clock = time.strftime("%H:%M:%S", time.localtime(seconds))
    outcome = str(answer.status) if not answer.error else answer.error
    return (
        f"{clock}.{millis:03d}  {answer.server or '-':<18} {outcome:<14} "
        f"{answer.latency_ms:7.1f} ms"
    )


def error_name(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "ETIMEDOUT"
    if isinstance(exc, ssl.SSLError):
        return f"TLS:{exc.reason or type(exc).__name__}"
    if isinstance(exc, OSError) and exc.errno:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    return type(exc).__name__


def common_name(certificate: Mapping[str, Any] | None) -> str:
    """The CN of a certificate as `SSLSocket.getpeercert()` returns it."""
    for rdn in (certificate or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return ""


def tls_context(ca_file: str) -> ssl.SSLContext:
    try:
        return ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise CliError(f"the API server CA {ca_file} is not usable: {exc}") from exc


def ask(target: Target, context: ssl.SSLContext, *, timeout: float = REQUEST_TIMEOUT) -> Answer:
    """One GET over a new connection; errors are an Answer too, never raised."""
    at = time.time()
    started = time.perf_counter()
    server = ""
    try:
        with (
            socket.create_connection((target.host, target.port), timeout=timeout) as raw,
            context.wrap_socket(raw, server_hostname=target.server_name) as tls,
        ):
            server = common_name(tls.getpeercert())
            connection = http.client.HTTPConnection(target.host, target.port, timeout=timeout)
            connection.sock = tls
            connection.request("GET", target.path, headers={"Connection": "close"})
            response = connection.getresponse()
            response.read()
            status = response.status
    except (OSError, ssl.SSLError, http.client.HTTPException) as exc:
        latency = (time.perf_counter() - started) * 1000
        return Answer(at, server, 0, latency, error_name(exc))
    return Answer(at, server, status, (time.perf_counter() - started) * 1000)


def answers(
    target: Target, *, interval: float, duration: float, count: int | None = None
) -> Iterator[Answer]:
    """Ask every `interval` seconds (without pause after a failure) for at most `duration`
    seconds and `count` answers; both bounded by MIN_INTERVAL and MAX_DURATION."""
    interval = max(interval, MIN_INTERVAL)
    deadline = time.monotonic() + min(duration, MAX_DURATION)
    context = tls_context(target.ca_file)
    asked = 0
    next_at = time.monotonic()
    while time.monotonic() < deadline and (count is None or asked < count):
        yield ask(target, context)
        asked += 1
        next_at += interval
        time.sleep(max(0.0, next_at - time.monotonic()))


def summary(seen: Sequence[Answer]) -> str:
    failed = [a for a in seen if not a.ok]
    servers = sorted({a.server for a in seen if a.ok})
    return (
        f"{len(seen)} requests, {len(failed)} failed "
        f"({100 * len(failed) / max(len(seen), 1):.1f}%); answered by {', '.join(servers) or '-'}"
    )


def run(
    target: Target,
    *,
    interval: float,
    duration: float,
    count: int | None,
    as_json: bool,
    out: TextIO,
) -> int:
    """Print every answer as it arrives, then a summary (not with --json); 0 when one
    succeeded."""
    seen: list[Answer] = []
    try:
        for answer in answers(target, interval=interval, duration=duration, count=count):
            seen.append(answer)
            line = json.dumps(asdict(answer)) if as_json else format_answer(answer)
            print(line, file=out, flush=True)
    except KeyboardInterrupt:
        pass
    if not as_json:
        print(summary(seen), file=out, flush=True)
    return 0 if any(a.ok for a in seen) else 1


# --------------------------------------------------------------------------- joining


def join(netns: Path, cgroup: Path) -> None:
    """Join `cgroup` (a socket belongs to its creator's cgroup: the LB's programs see it) and
    then network namespace `netns`. Refuses a cgroup2 root: the LB never runs there."""
    if not (cgroup / "cgroup.procs").is_file():
        raise CliError(f"{cgroup} is not a cgroup")
    if not (cgroup / "cgroup.events").exists():
        # Only a cgroup2 root lacks cgroup.events: the client never joins the machine's root.
        raise CliError(f"{cgroup} is a cgroup root; the demo joins only a child cgroup")
    (cgroup / "cgroup.procs").write_text(str(os.getpid()))
    fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, CLONE_NEWNET) != 0:
            code = ctypes.get_errno()
            raise CliError(f"cannot enter network namespace {netns}: {os.strerror(code)}")
    finally:
        os.close(fd)
    if default_route_present():
        raise CliError(f"network namespace {netns} has a default route; the demo needs none")


def default_route_present() -> bool:
    """Whether the current network namespace has an IPv4 default route (/proc/net/route)."""
    lines = Path("/proc/net/route").read_text().splitlines()[1:]
    return any(line.split()[1] == "00000000" for line in lines if len(line.split()) > 1)


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m apilane.cli.demo", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument("--netns", type=Path, required=True, help="network namespace path")
    parser.add_argument("--cgroup", type=Path, required=True, help="the LB's child cgroup")
    parser.add_argument("--ca", required=True, help="the API server CA (PEM)")
    add_request_options(parser)
    return parser


def add_request_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vip", default="10.96.0.1", help="the kubernetes Service's ClusterIP")
    parser.add_argument("--port", type=int, default=443)
    parser.add_argument("--path", default="/readyz")
    parser.add_argument("--interval", type=float, default=DEFAULT_INTERVAL, help="seconds")
    parser.add_argument("--duration", type=float, default=DEFAULT_DURATION, help="seconds")
    parser.add_argument("--count", type=int, default=None, help="stop after this many")
    parser.add_argument("--json", action="store_true", help="one JSON object per answer")


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        join(args.netns, args.cgroup)
        target = Target(args.vip, args.port, args.path, args.ca)
        return run(
            target,
            interval=args.interval,
            duration=args.duration,
            count=args.count,
            as_json=args.json,
            out=sys.stdout,
        )
    except CliError as exc:
        print(f"apilane demo: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
