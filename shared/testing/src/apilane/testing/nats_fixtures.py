"""pytest fixtures for a real nats-server; loaded as a plugin by tests/conftest.py."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from apilane.runtime.bus import Bus
from apilane.testing.nats import NatsCluster, NatsServer
from apilane.testing.procs import ComponentMissing


@pytest.fixture
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """An isolated nats-server per test (JetStream, free port, temp store); ~0.1 s to start."""
    try:
        server = NatsServer(store_dir=tmp_path_factory.mktemp("nats-store"))
    except ComponentMissing as exc:
        pytest.fail(str(exc))
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
async def bus(nats_server: NatsServer) -> AsyncIterator[Bus]:
    """A connected Bus with every apilane stream and bucket created."""
    connected = await Bus.connect(
        [nats_server.url], name="apilane-test", initial_attempt_deadline=10
    )
    await connected.ensure_streams()
    try:
        yield connected
    finally:
        await connected.drain()


@pytest.fixture
def nats_cluster() -> Iterator[NatsCluster]:
    try:
        cluster = NatsCluster(3)
    except ComponentMissing as exc:
        pytest.fail(str(exc))
    with cluster:
        yield cluster
