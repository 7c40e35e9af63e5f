"""Backend probes and socket destruction through the whole loader, on the live kernel.

The loader runs in-process on the bpf data plane (programs attached to a dedicated child
cgroup), fed by a real nats-server, and probes from the client namespace (APILANE_PROBE_NETNS):
the client namespace stands for the node, with a veth to each backend namespace and no
default route. The client process (the lab's agent, in the cgroup and the client namespace)
connects through the service address.

Backend B is a listener this test opens inside B's namespace: closing its listening socket
makes B's probes fail while the connections it accepted stay open, so the test can see that
the loader destroys the client's connection through the service to B and leaves its direct
connection to B alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from apilane.node_loader import settings as loader_settings
from apilane.node_loader.nat import BackendValue
from apilane.node_loader.service import NodeLoader, open_data_plane
from apilane.runtime.natsauth import Role
from apilane.testing.bpf import SERVICE_VIP4, BpfLab, NetNamespace, entered_netns
from apilane.testing.loaders import loader_env
from apilane.testing.sealing import put_sealed, seal
from apilane.testing.snapshots import make_snapshot
from apilane.testing.waiting import until

pytestmark = [pytest.mark.integration, pytest.mark.bpf, pytest.mark.nats]

CLUSTER = "probe-kern"
NODE = "probe-kernel-node"
SERVICE_PORT = 443
BACKEND_PORT = 8080


class EchoBackend:
    """The agent's protocol (one JSON line naming the server per line received), served by
    this test's event loop from a listening socket made inside the backend's namespace."""

    def __init__(self, netns: NetNamespace, ip: str) -> None:
        self.netns, self.ip = netns, ip
        self.server: asyncio.Server | None = None
        self.connections: list[asyncio.StreamWriter] = []

    async def listen(self) -> None:
        with entered_netns(self.netns):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.ip, BACKEND_PORT))
        self.server = await asyncio.start_server(self._serve, sock=sock)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections.append(writer)
        answer = json.dumps({"server": [self.ip, BACKEND_PORT]}).encode() + b"\n"
        with contextlib.suppress(ConnectionError):
            while await reader.readline():
                writer.write(answer)
                await writer.drain()

    async def stop_listening(self) -> None:
        """Close the listening socket only: accepted connections stay open."""
        assert self.server is not None
        self.server.close()  # (3.11: does not close accepted connections)
        self.server = None

    def close(self) -> None:
        for writer in self.connections:
            writer.close()
        if self.server is not None:
            self.server.close()


async def in_thread(function: Callable[..., object], *args: object) -> object:
    """Agent calls block: keep the event loop (the backend B, the loader) running."""
    return await asyncio.to_thread(function, *args)


async def test_a_dead_backend_leaves_the_maps_and_only_its_service_connections_are_closed(
    bpf_lab: BpfLab, nats_server, bus, connect_as, tmp_path: Path
):
    lab = bpf_lab
    topology = lab.topology(backends=3)
    live, dying, b = topology.backends
    servers = {
        backend.ipv4: lab.server(
            netns=backend.netns, addresses=[backend.ipv4], ports=[BACKEND_PORT]
        )
        for backend in (live, dying)
    }
    echo = EchoBackend(b.netns, b.ipv4)
    await echo.listen()
    cgroup, pin_dir = lab.child_cgroup(), lab.pin_dir()
    # Probing on (its default, tcp): the backends are this test's own, inside its namespaces.
    env = loader_env(
        nats_server.env(Role.NODE_LOADER, CLUSTER, NODE),
        cluster=CLUSTER,
        node=NODE,
        workdir=tmp_path,
        heartbeat="1s",
        APILANE_BACKEND_PROBE="tcp",
        APILANE_MAP_BACKEND="bpf",
        APILANE_CGROUP_PATH=str(cgroup),
        APILANE_BPF_PIN_DIR=str(pin_dir),
        APILANE_PROBE_NETNS=str(topology.client.path),
    )
    settings = loader_settings.load(env)
    data_plane = open_data_plane(settings)
    registry = CollectorRegistry()
    loader = NodeLoader(settings=settings, data_plane=data_plane, registry=registry)
    agent = lab.agent(netns=topology.client, cgroup=cgroup)
    stopping = asyncio.Event()
    task = asyncio.create_task(loader.run(stopping))
    everyone = {BackendValue(x.ipv4, BACKEND_PORT) for x in topology.backends}

    def programmed() -> set[BackendValue]:
        contents = data_plane.maps.dump("IPv4")
        (frontend,) = contents.frontends.values()
        return {
            value
            for key, value in contents.backends.items()
            if key.service_id == frontend.service_id and key.ordinal < frontend.count
        }

    try:
        discovery = await connect_as(Role.DISCOVERY, CLUSTER)
        snapshot = make_snapshot(
            cluster=CLUSTER,
            generation=1,
            apiservers=[f"{x.ipv4}:{BACKEND_PORT}" for x in topology.backends],
        )
        await put_sealed(discovery, seal(snapshot), cluster=CLUSTER)
        await until(lambda: loader.first_reconcile_done and programmed() == everyone, what="maps")

        # Connections through the service until one lands on B; one direct to B.
        through: dict[str, str] = {}
        for attempt in range(60):
            name = f"through{attempt}"
            opened = await in_thread(agent.tcp_open, name, SERVICE_VIP4, SERVICE_PORT)
            assert isinstance(opened, dict) and opened["error"] is None, opened
            through[name] = opened["server"][0]
            if b.ipv4 in through.values() and live.ipv4 in through.values():
                break
        assert b.ipv4 in through.values() and live.ipv4 in through.values()
        direct = await in_thread(agent.tcp_open, "direct", b.ipv4, BACKEND_PORT)
        assert isinstance(direct, dict) and direct["error"] is None

        # B stops answering probes (its accepted connections stay): out of the maps, and
        # the connections through the service to B are destroyed; the rest stay open.
        await echo.stop_listening()
        took = await until(lambda: b.ipv4 not in {x.ip for x in programmed()}, what="B out")
        print(f"listener closed -> map change: {took * 1000:.0f} ms")
        await until(
            lambda: (
                (registry.get_sample_value("apilane_node_sockets_destroyed_total") or 0)
                >= sum(1 for ip in through.values() if ip == b.ipv4)
            ),
            what="sockets destroyed",
        )
        for name, ip in through.items():
            probe = await in_thread(agent.tcp_probe, name)
            expected = (
                {"alive": False, "error": "ECONNABORTED"}
                if ip == b.ipv4
                else {"alive": True, "error": None}
            )
            assert probe == expected, (name, ip)
        assert await in_thread(agent.tcp_probe, "direct") == {"alive": True, "error": None}

        # A backend dies outright: new connections through the service go to the live one.
        lab.end(servers[dying.ipv4])
        await until(
            lambda: programmed() == {BackendValue(live.ipv4, BACKEND_PORT)}, what="only live"
        )
        results = await in_thread(lambda: agent.tcp_request(SERVICE_VIP4, SERVICE_PORT, count=30))
        assert isinstance(results, list)
        assert [r["error"] for r in results] == [None] * 30
        assert {r["server"][0] for r in results} == {live.ipv4}
        state = loader.node_state()
        assert set(state.unhealthy_backends) == {
            f"{dying.ipv4}:{BACKEND_PORT}",
            f"{b.ipv4}:{BACKEND_PORT}",
        }
        assert not state.health_fail_static
    finally:
        stopping.set()
        await asyncio.wait_for(task, timeout=10)
        echo.close()
        if data_plane.programs is not None:
            data_plane.programs.disable()  # the lab removes the pins and the cgroup
