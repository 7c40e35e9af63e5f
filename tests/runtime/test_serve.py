"""The runtime serves probes and metrics, logs JSON, and stops cleanly on a signal."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal

import aiohttp
import pytest
from prometheus_client import CollectorRegistry, Counter

from apilane.runtime.config import load_common
from apilane.runtime.serve import Health, JsonFormatter, ServiceContext, serve, start_http

pytestmark = [pytest.mark.unit]


async def test_probes_reflect_checks_and_metrics_are_exposed() -> None:
    health = Health()
    ready = {"bus": False}
    health.add_live("loop", lambda: True)
    health.add_ready("bus", lambda: ready["bus"])
    health.add_ready("broken", lambda: 1 / 0 == 0)  # a raising check counts as failed
    registry = CollectorRegistry()
    Counter("apilane_test_total", "a test counter", registry=registry).inc(3)
    runner, port = await start_http("127.0.0.1", 0, health, registry)
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/healthz") as r:
                assert r.status == 200
            async with http.get(f"http://127.0.0.1:{port}/readyz") as r:
                assert r.status == 503
                assert (await r.json())["checks"] == {"bus": False, "broken": False}
            health.ready_checks.pop("broken")
            ready["bus"] = True
            async with http.get(f"http://127.0.0.1:{port}/readyz") as r:
                assert r.status == 200
            async with http.get(f"http://127.0.0.1:{port}/metrics") as r:
                assert "apilane_test_total 3.0" in await r.text()
    finally:
        await runner.cleanup()


async def test_sigterm_sets_stopping_and_main_returns() -> None:
    settings = load_common({"APILANE_HTTP_HOST": "127.0.0.1", "APILANE_HTTP_PORT": "0"})
    reached: list[str] = []

    async def main(ctx: ServiceContext) -> None:
        assert ctx.http_port > 0
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(ctx.stopping.wait(), 5)
        reached.append("stopped")

    await serve("test", settings, main)
    assert reached == ["stopped"]
    asyncio.get_running_loop().remove_signal_handler(signal.SIGTERM)
    asyncio.get_running_loop().remove_signal_handler(signal.SIGINT)


def test_json_logs_carry_the_extra_context() -> None:
    record = logging.LogRecord("x", logging.WARNING, __file__, 1, "hello %s", ("world",), None)
    record.generation = 7
    line = json.loads(JsonFormatter("discovery").format(record))
    assert line["msg"] == "hello world"
    assert line["service"] == "discovery"
    assert line["generation"] == 7
    assert line["level"] == "WARNING"


async def test_a_main_stuck_after_the_stop_signal_is_cancelled_after_the_grace_period() -> None:
    settings = load_common({"APILANE_HTTP_HOST": "127.0.0.1", "APILANE_HTTP_PORT": "0"})
    stopping = asyncio.Event()
    cancelled: list[bool] = []

    async def stuck(ctx: ServiceContext) -> None:
        try:
            await asyncio.sleep(3600)  # e.g. waiting for a NATS that never comes
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    loop = asyncio.get_running_loop()
    loop.call_later(0.1, stopping.set)
    began = loop.time()
    await serve("test", settings, stuck, stopping=stopping, stop_grace=0.3)
    assert cancelled == [True]
    assert loop.time() - began < 2


async def test_an_error_in_main_is_raised_by_serve() -> None:
    settings = load_common({"APILANE_HTTP_HOST": "127.0.0.1", "APILANE_HTTP_PORT": "0"})

    async def broken(ctx: ServiceContext) -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        await serve("test", settings, broken, stopping=asyncio.Event())
