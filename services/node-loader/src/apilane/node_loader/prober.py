"""Active backend probes from this node: the thin asyncio adapter around health.py.

One task per backend of the applied snapshot probes it every `interval`: a TCP connect, or an
HTTPS GET /readyz that must answer 200. Each result goes to the `HealthTable`; a change of any
backend's health calls `on_change`, and the service reprograms the maps from the table
(reconcile.Reconciler.set_unhealthy, make-before-break like every apply).

Probes leave from the network namespace the settings name (APILANE_PROBE_NETNS), else the
loader's own (the node's, for a hostNetwork DaemonSet): a socket belongs to the namespace it
was created in, so one worker thread that entered that namespace creates the sockets and
the event loop uses them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import logging
import os
import socket
import ssl
import time
from collections.abc import Callable, Iterable

from apilane.node_loader.health import HealthTable, Transition
from apilane.node_loader.nat import BackendValue
from apilane.node_loader.settings import ProbeSettings

log = logging.getLogger(__name__)

CLONE_NEWNET = 0x40000000
_READYZ_ANSWER_LIMIT = 4096


def _enter_netns(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"setns {path}: {os.strerror(code)}")
    finally:
        os.close(fd)


class SocketFactory:
    """Creates probe sockets in the configured network namespace (or this one). A namespace
    that cannot be entered makes every probe fail with the reason (never the loader)."""

    def __init__(self, netns: str = "") -> None:
        self.netns = netns
        self._problem: OSError | None = None
        self._executor = (
            concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="apilane-probe-netns", initializer=self._enter
            )
            if netns
            else None
        )

    def _enter(self) -> None:
        try:
            _enter_netns(self.netns)
        except OSError as exc:
            self._problem = exc

    def _socket(self, family: int) -> socket.socket:
        if self._problem is not None:
            raise OSError(f"cannot probe from {self.netns}: {self._problem}")
        return socket.socket(family, socket.SOCK_STREAM)

    async def create(self, family: int) -> socket.socket:
        if self._executor is None:
            sock = socket.socket(family, socket.SOCK_STREAM)
        else:
            loop = asyncio.get_running_loop()
            sock = await loop.run_in_executor(self._executor, self._socket, family)
        sock.setblocking(False)
        return sock

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)


def _address(backend: BackendValue) -> tuple[int, tuple[str, int]]:
    family = socket.AF_INET6 if ":" in backend.ip else socket.AF_INET
    return family, (backend.ip, backend.port)


async def probe_tcp(backend: BackendValue, sockets: SocketFactory) -> None:
    """Raises OSError unless a TCP connection to the backend opens."""
    family, address = _address(backend)
    sock = await sockets.create(family)
    try:
        await asyncio.get_running_loop().sock_connect(sock, address)
    finally:
        sock.close()


async def probe_readyz(backend: BackendValue, sockets: SocketFactory, tls: ssl.SSLContext) -> None:
    """Raises OSError (or ssl.SSLError) unless GET /readyz over TLS answers 200."""
    family, address = _address(backend)
    sock = await sockets.create(family)
    try:
        await asyncio.get_running_loop().sock_connect(sock, address)
    except BaseException:
        sock.close()
        raise
    reader, writer = await asyncio.open_connection(sock=sock, ssl=tls, server_hostname="")
    try:
        host = f"[{backend.ip}]" if family == socket.AF_INET6 else backend.ip
        writer.write(
            f"GET /readyz HTTP/1.1\r\nHost: {host}:{backend.port}\r\n"
            "User-Agent: apilane-node-loader\r\nConnection: close\r\n\r\n".encode()
        )
        await writer.drain()
        status_line = await reader.readline()
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    parts = status_line[:_READYZ_ANSWER_LIMIT].decode("latin-1").split()
    if len(parts) < 2 or parts[1] != "200":
        raise OSError(f"/readyz answered {status_line.strip()[:80]!r}")


def tls_context(ca_file: str) -> ssl.SSLContext:
    """Verify against `ca_file` when given; else only that TLS and /readyz answer."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file or None)
    context.check_hostname = False  # backends are addressed by IP, as in the EndpointSlice
    if not ca_file:
        context.verify_mode = ssl.CERT_NONE
    return context


ProbeResult = tuple[bool, str]


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno and not isinstance(exc, ssl.SSLError):
        return os.strerror(exc.errno)  # asyncio's own text names only the address
    return str(exc) or type(exc).__name__


class HealthMonitor:
    """Keeps one probe task per tracked backend and feeds the results to the table."""

    def __init__(
        self,
        *,
        settings: ProbeSettings,
        table: HealthTable,
        on_change: Callable[[tuple[Transition, ...]], None],
    ) -> None:
        self.settings = settings
        self.table = table
        self.on_change = on_change
        self.sockets = SocketFactory(settings.netns)
        self._tls = tls_context(settings.ca_file) if settings.kind == "https" else None
        self._tasks: dict[BackendValue, asyncio.Task[None]] = {}

    def track(self, backends: Iterable[BackendValue]) -> None:
        """Probe exactly these backends from now on (idempotent)."""
        wanted = set(backends)
        if wanted == set(self._tasks):
            return
        before = self.table.unhealthy
        self.table.track(wanted)
        for backend in set(self._tasks) - wanted:
            self._tasks.pop(backend).cancel()
        for backend in sorted(wanted - set(self._tasks)):
            self._tasks[backend] = asyncio.create_task(
                self._probe_forever(backend), name=f"probe {backend.ip}:{backend.port}"
            )
        if self.table.unhealthy != before:
            self.on_change(())  # an unhealthy backend left the snapshot

    async def probe_once(self, backend: BackendValue) -> ProbeResult:
        try:
            async with asyncio.timeout(self.settings.timeout):
                if self._tls is not None:
                    await probe_readyz(backend, self.sockets, self._tls)
                else:
                    await probe_tcp(backend, self.sockets)
        except TimeoutError:
            return False, f"no answer within {self.settings.timeout:g}s"
        except Exception as exc:  # refused, reset, TLS, or a namespace that cannot be entered
            return False, _reason(exc)
        return True, ""

    async def _probe_forever(self, backend: BackendValue) -> None:
        while True:
            began = time.monotonic()
            ok, error = await self.probe_once(backend)
            transition = self.table.record(backend, ok, error)
            if transition is not None:
                log.warning(
                    "backend health changed",
                    extra={
                        "backend": f"{backend.ip}:{backend.port}",
                        "healthy": transition.healthy,
                        "reason": transition.reason,
                    },
                )
                self.on_change((transition,))
            await asyncio.sleep(max(0.0, self.settings.interval - (time.monotonic() - began)))

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.sockets.close()
