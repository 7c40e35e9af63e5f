"""Running a service: asyncio, graceful stop on SIGTERM/SIGINT, JSON logs, probes, metrics.

A service provides `main(ctx)`; it runs until `ctx.stopping` is set, then returns, and the
runtime closes what it opened (HTTP server, tracing) in reverse order.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest

from apilane.model.errors import ApilaneError
from apilane.runtime import tracing
from apilane.runtime.config import CommonSettings

log = logging.getLogger(__name__)

# Attributes every LogRecord has; anything else was passed through `extra=` and is context.
_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with the `extra=` context as top-level keys."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup_logging(service: str, level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # The JSON lines leave these out: not looked up for every record either.
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    # nats-py logs every reconnect attempt at ERROR with a traceback; our callbacks say it once.
    logging.getLogger("nats").setLevel(logging.CRITICAL)


@dataclass
class Health:
    """Named checks: liveness fails only when the process is wedged, readiness when a
    dependency (watch, bus connection) is not usable right now."""

    live_checks: dict[str, Callable[[], bool]] = field(default_factory=dict)
    ready_checks: dict[str, Callable[[], bool]] = field(default_factory=dict)

    def add_live(self, name: str, check: Callable[[], bool]) -> None:
        self.live_checks[name] = check

    def add_ready(self, name: str, check: Callable[[], bool]) -> None:
        self.ready_checks[name] = check

    @staticmethod
    def _evaluate(checks: dict[str, Callable[[], bool]]) -> tuple[bool, dict[str, bool]]:
        results: dict[str, bool] = {}
        for name, check in checks.items():
            try:
                results[name] = bool(check())
            except Exception:  # a failing check is a failed check, not a crashed probe
                results[name] = False
        return all(results.values()), results

    def live(self) -> tuple[bool, dict[str, bool]]:
        return self._evaluate(self.live_checks)

    def ready(self) -> tuple[bool, dict[str, bool]]:
        return self._evaluate(self.ready_checks)


@dataclass
class ServiceContext:
    name: str
    settings: CommonSettings
    stopping: asyncio.Event
    health: Health
    registry: CollectorRegistry = REGISTRY
    http_port: int = 0  # the port actually bound (useful when settings asked for 0)


def build_http_app(health: Health, registry: CollectorRegistry) -> web.Application:
    async def healthz(_: web.Request) -> web.Response:
        ok, checks = health.live()
        return web.json_response({"ok": ok, "checks": checks}, status=200 if ok else 503)

    async def readyz(_: web.Request) -> web.Response:
        ok, checks = health.ready()
        return web.json_response({"ok": ok, "checks": checks}, status=200 if ok else 503)

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app


async def start_http(
    host: str, port: int, health: Health, registry: CollectorRegistry
) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(build_http_app(health, registry), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = port
    server = getattr(site, "_server", None)
    if server is not None and server.sockets:
        bound = int(server.sockets[0].getsockname()[1])
    return runner, bound


async def serve(
    name: str,
    settings: CommonSettings,
    main: Callable[[ServiceContext], Coroutine[Any, Any, None]],
    *,
    stopping: asyncio.Event | None = None,
    stop_grace: float = 10.0,
) -> None:
    """Run `main` with probes and metrics until it returns or a stop signal arrives.

    After a stop signal `main` has `stop_grace` seconds to return by itself (drain, release
    its lease); then it is cancelled, so a service stuck waiting for a dependency that never
    came (NATS, the API server) still stops promptly."""
    ctx = ServiceContext(
        name=name, settings=settings, stopping=stopping or asyncio.Event(), health=Health()
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, ctx.stopping.set)
    runner, ctx.http_port = await start_http(
        settings.http_host, settings.http_port, ctx.health, ctx.registry
    )
    log.info("service started", extra={"http_port": ctx.http_port})
    body = asyncio.create_task(main(ctx))
    try:
        await _until_done_or_stopped(body, ctx.stopping, grace=stop_grace)
    finally:
        await runner.cleanup()
        tracing.shutdown()
        log.info("service stopped")


async def _until_done_or_stopped(
    body: asyncio.Task[None], stopping: asyncio.Event, *, grace: float
) -> None:
    stop_wait = asyncio.create_task(stopping.wait())
    try:
        await asyncio.wait({body, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop_wait.cancel()
    if not body.done():
        done, _ = await asyncio.wait({body}, timeout=grace)
        if not done:
            log.warning(
                "did not stop within the grace period; cancelling", extra={"grace_s": grace}
            )
            body.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await body
            return
    await body  # re-raises what main raised


def run(
    name: str, settings: CommonSettings, main: Callable[[ServiceContext], Coroutine[Any, Any, None]]
) -> int:
    """The body of every `__main__`: logs, tracing, then `serve` in a fresh event loop.
    A typed error that ends the service (it cannot do its job: no programs, no API server
    credentials) is one log line and exit status 1, not a traceback."""
    setup_logging(name, settings.log_level)
    tracing.setup(name)
    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve(name, settings, main))
    except ApilaneError as exc:
        log.error(
            "stopped: it cannot go on",
            extra={"error": str(exc), "error_type": type(exc).__name__},
        )
        return 1
    return 0
