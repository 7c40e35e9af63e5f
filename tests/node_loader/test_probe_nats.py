"""Backend probes for real: the loader in-process on MemoryNatMaps against a real nats-server,
probing real listeners on 127.0.0.x (loopback only) with the production defaults (TCP connect
every 300 ms, out after 3 failures in a row, back after 2 passes)."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import statistics
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

from apilane.model import events, subjects
from apilane.model.events import NodeState
from apilane.node_loader import settings as loader_settings
from apilane.node_loader.health import HealthPolicy, HealthTable
from apilane.node_loader.memmaps import MemoryNatMaps
from apilane.node_loader.nat import BackendValue
from apilane.node_loader.prober import HealthMonitor
from apilane.node_loader.service import DataPlane, NodeLoader
from apilane.node_loader.testing import contents_of, running
from apilane.runtime.bus import Bus
from apilane.runtime.natsauth import Role
from apilane.testing.loaders import loader_env
from apilane.testing.pki import Pki
from apilane.testing.sealing import put_sealed, seal
from apilane.testing.snapshots import make_snapshot
from apilane.testing.waiting import until

CLUSTER = "default"
NODE = "probe-node"
HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")


class Listener:
    """A TCP server on one loopback address that accepts and closes; closable, reopenable
    on the same port."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.port = 0
        self._server: asyncio.Server | None = None

    async def open(self) -> None:
        self._server = await asyncio.start_server(
            _hang_up, self.host, self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    @property
    def backend(self) -> BackendValue:
        return BackendValue(self.host, self.port)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


async def _hang_up(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.close()


def programmed(maps: MemoryNatMaps) -> set[BackendValue]:
    contents = contents_of(maps)["IPv4"]
    (frontend,) = contents.frontends.values()
    return {
        contents.backends[key]
        for key in contents.backends
        if key.service_id == frontend.service_id and key.ordinal < frontend.count
    }


async def node_state(bus: Bus) -> NodeState | None:
    entry = await bus.kv_get(subjects.NODE_STATE_BUCKET, subjects.node_state_key(CLUSTER, NODE))
    decoded = events.decode(entry.value) if entry else None
    assert decoded is None or isinstance(decoded, NodeState)
    return decoded


@contextlib.asynccontextmanager
async def running_loader(
    nats_server, tmp_path: Path, maps: MemoryNatMaps, **extra: str
) -> AsyncIterator[tuple[NodeLoader, CollectorRegistry, InMemorySpanExporter]]:
    # Probing on (its default, tcp): the backends are this test's own listeners on loopback.
    env = loader_env(
        nats_server.env(Role.NODE_LOADER, CLUSTER, NODE),
        cluster=CLUSTER,
        node=NODE,
        workdir=tmp_path,
        **{"APILANE_BACKEND_PROBE": "tcp", **extra},
    )
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    registry = CollectorRegistry()
    loader = NodeLoader(
        settings=loader_settings.load(env),
        data_plane=DataPlane(maps=maps),
        registry=registry,
        tracer=provider.get_tracer("test"),
    )
    async with running(loader):
        yield loader, registry, exporter


@pytest.mark.integration
@pytest.mark.nats
async def test_a_closed_listener_leaves_the_maps_and_returns_when_reopened(
    nats_server, bus, connect_as, tmp_path
):
    listeners = [Listener(host) for host in HOSTS]
    for listener in listeners:
        await listener.open()
    a, b, c = listeners
    everyone = {listener.backend for listener in listeners}
    maps = MemoryNatMaps()
    discovery = await connect_as(Role.DISCOVERY, CLUSTER)
    snapshot = make_snapshot(
        cluster=CLUSTER, generation=1, apiservers=[x.address for x in listeners]
    )
    await put_sealed(discovery, seal(snapshot), cluster=CLUSTER)
    try:
        async with running_loader(nats_server, tmp_path, maps) as (loader, registry, spans):
            await until(lambda: programmed(maps) == everyone, what="three backends")

            def metric(name: str, **labels: str) -> float:
                return registry.get_sample_value(name, labels) or 0.0

            await until(
                lambda: metric("apilane_node_backend_healthy", backend=b.address) == 1,
                what="the health gauge",
            )
            out_times, back_times = [], []
            for _ in range(5):
                await b.close()
                out_times.append(
                    await until(lambda: programmed(maps) == everyone - {b.backend}, what="B out")
                )
                await b.open()
                back_times.append(await until(lambda: programmed(maps) == everyone, what="B back"))
            print(
                f"listener closed -> map change: median {statistics.median(out_times) * 1000:.0f}"
                f" ms (runs {[round(t * 1000) for t in out_times]}); reopened -> back: median "
                f"{statistics.median(back_times) * 1000:.0f} ms"
            )
            # K = 3 failures 300 ms apart: never before the third probe after the close.
            assert min(out_times) >= 0.3
            assert (
                metric(
                    "apilane_node_backend_health_transitions_total",
                    backend=b.address,
                    to="unhealthy",
                )
                == 5
            )
            assert (
                metric(
                    "apilane_node_backend_health_transitions_total", backend=b.address, to="healthy"
                )
                == 5
            )

            # Out: visible in node state, metrics and the trace.
            await b.close()
            await until(lambda: programmed(maps) == everyone - {b.backend}, what="B out again")
            assert metric("apilane_node_backend_healthy", backend=b.address) == 0
            assert metric("apilane_node_backend_healthy", backend=a.address) == 1
            state = None
            for _ in range(100):
                state = await node_state(bus)
                if state is not None and state.unhealthy_backends == (b.address,):
                    break
                await asyncio.sleep(0.05)
            assert state is not None and state.unhealthy_backends == (b.address,), state
            assert not state.health_fail_static
            health_spans = [s for s in spans.get_finished_spans() if s.name == "node-loader health"]
            out_span = health_spans[-1]
            assert out_span.attributes is not None
            assert tuple(out_span.attributes["apilane.health.excluded"]) == (b.address,)
            assert [e.name for e in out_span.events] == ["backend unhealthy"]
            assert out_span.events[0].attributes["apilane.backend"] == b.address

            # Every backend fails: the full set stays (fail static), the node says so.
            await a.close()
            await until(lambda: programmed(maps) == {c.backend}, what="only C left")
            await c.close()
            await until(lambda: loader.reconciler.health_fail_static != (), what="fail static")
            assert programmed(maps) == everyone
            assert metric("apilane_node_health_fail_static") == 1
            for _ in range(100):
                state = await node_state(bus)
                if state is not None and state.health_fail_static:
                    break
                await asyncio.sleep(0.05)
            assert state is not None and state.health_fail_static
            assert set(state.unhealthy_backends) == {x.address for x in listeners}
            await asyncio.sleep(1.5)  # probes go on failing: the set still stays
            assert programmed(maps) == everyone

            # One comes back: only it is programmed until the others pass again.
            await c.open()
            await until(lambda: programmed(maps) == {c.backend}, what="C alone")
            await a.open()
            await b.open()
            await until(lambda: programmed(maps) == everyone, what="all back")
            assert metric("apilane_node_health_fail_static") == 0
    finally:
        for listener in listeners:
            await listener.close()


class ReadyzServer:
    """A TLS server on 127.0.0.x answering GET /readyz with the status it is set to."""

    def __init__(self, context: ssl.SSLContext, host: str = "127.0.0.5") -> None:
        self.context = context
        self.host = host
        self.status = "200 OK"
        self.server: asyncio.Server | None = None

    async def start(self) -> BackendValue:
        self.server = await asyncio.start_server(self._answer, self.host, 0, ssl=self.context)
        return BackendValue(self.host, self.server.sockets[0].getsockname()[1])

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await reader.readuntil(b"\r\n\r\n")
            status = self.status if request.startswith(b"GET /readyz ") else "404 Not Found"
            writer.write(f"HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n".encode())
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@pytest.mark.integration
async def test_https_probes_pass_only_on_readyz_200_and_verify_when_given_a_ca(tmp_path):
    pki = Pki(tmp_path / "pki")
    pair = pki.issue(
        "apiserver", common_name="kube-apiserver", ip_addresses=["127.0.0.5"], server=True
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pair.cert_path, pair.key_path)
    server = ReadyzServer(context)
    backend = await server.start()
    other = Pki(tmp_path / "other")

    def monitor(**overrides) -> HealthMonitor:
        probe = loader_settings.ProbeSettings(kind="https", timeout=2.0, **overrides)
        return HealthMonitor(settings=probe, table=HealthTable(HealthPolicy()), on_change=print)

    try:
        unverified, verified = monitor(), monitor(ca_file=str(pki.ca_path))
        wrong_ca = monitor(ca_file=str(other.ca_path))
        assert await unverified.probe_once(backend) == (True, "")
        assert await verified.probe_once(backend) == (True, "")
        ok, error = await wrong_ca.probe_once(backend)
        assert not ok and "certificate verify failed" in error
        server.status = "500 Internal Server Error"
        ok, error = await verified.probe_once(backend)
        assert not ok and "500" in error
        # A plain TCP probe does not care what the server answers.
        tcp = HealthMonitor(
            settings=loader_settings.ProbeSettings(kind="tcp"),
            table=HealthTable(HealthPolicy()),
            on_change=print,
        )
        assert await tcp.probe_once(backend) == (True, "")
        await server.stop()
        ok, error = await verified.probe_once(backend)
        assert not ok and "refused" in error.lower()
        for m in (unverified, verified, wrong_ca, tcp):
            await m.close()
    finally:
        await server.stop()


@pytest.mark.integration
async def test_a_probe_namespace_that_cannot_be_entered_fails_probes_not_the_loader():
    listener = Listener("127.0.0.6")
    await listener.open()
    monitor = HealthMonitor(
        settings=loader_settings.ProbeSettings(netns="/nonexistent/netns"),
        table=HealthTable(HealthPolicy()),
        on_change=print,
    )
    try:
        ok, error = await monitor.probe_once(listener.backend)
        assert not ok and "/nonexistent/netns" in error, error
    finally:
        await monitor.close()
        await listener.close()
