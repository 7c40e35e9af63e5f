"""pytest fixtures for a real nats-server; loaded as a plugin by tests/conftest.py.

The servers run the production authentication and permissions (`apilane.runtime.natsauth`):
a test connects as the role it plays, with `connect_as(Role.DISCOVERY, cluster=…)`, and
hands a service process its credentials with `nats_server.env(Role.NODE_LOADER, …)`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from apilane.runtime.bus import Bus
from apilane.runtime.natsauth import ALL_CLUSTERS, Role
from apilane.testing.nats import NatsCluster, NatsServer
from apilane.testing.procs import ComponentMissing

ConnectAs = Callable[..., Awaitable[Bus]]


def _started(store: Path, *, tls: bool = False, mutual_tls: bool = False) -> NatsServer:
    try:
        server = NatsServer(store_dir=store, tls=tls, mutual_tls=mutual_tls)
    except ComponentMissing as exc:
        pytest.fail(str(exc))
    return server.start()


@pytest.fixture
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """An isolated, authenticated nats-server per test (JetStream, free port, temp store)."""
    server = _started(tmp_path_factory.mktemp("nats-store"))
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def nats_server_tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """As `nats_server`, with mutual TLS on the client port (every client shows a cert)."""
    server = _started(tmp_path_factory.mktemp("nats-store"), mutual_tls=True)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
async def connect_as(nats_server: NatsServer) -> AsyncIterator[ConnectAs]:
    """`await connect_as(role, cluster="default", node="")`: a Bus with that identity,
    drained when the test ends."""
    opened: list[Bus] = []

    async def connect(
        role: Role, cluster: str = "default", node: str = "", *, name: str | None = None
    ) -> Bus:
        bus = await nats_server.connect(role, cluster, node, name=name)
        opened.append(bus)
        return bus

    try:
        yield connect
    finally:
        for bus in opened:
            await bus.drain()


@pytest.fixture
async def bus(nats_server: NatsServer, connect_as: ConnectAs) -> Bus:
    """The operator's connection (it reads everything), once discovery's identity, the
    provisioner, has created every apilane stream and bucket."""
    provisioner = await connect_as(Role.DISCOVERY, name="test-provisioner")
    await provisioner.create_streams()
    return await connect_as(Role.OPERATOR, ALL_CLUSTERS, name="test-operator")


@pytest.fixture
def nats_cluster() -> Iterator[NatsCluster]:
    try:
        cluster = NatsCluster(3)
    except ComponentMissing as exc:
        pytest.fail(str(exc))
    with cluster:
        yield cluster
