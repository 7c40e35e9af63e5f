"""The nats-server fixture talks to a real JetStream server, survives restarts, and clusters.

Each test connects as the role it plays: discovery writes snapshots and warnings, the
renderer and node-loaders watch, the operator reads everything and sends control requests."""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path

import msgspec
import pytest

from apilane.model import events, subjects
from apilane.runtime import natsauth
from apilane.runtime.bus import Bus, BusError, PermissionDenied
from apilane.runtime.config import NatsAuth, load_nats_auth
from apilane.runtime.natsauth import Role
from apilane.testing.nats import NatsCluster, NatsServer, find_nats_server, start_stack_nats
from apilane.testing.nats_credentials import write_stack_credentials
from apilane.testing.nats_fixtures import ConnectAs
from apilane.testing.procs import end_process, free_port, wait_until

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.integration, pytest.mark.nats]


def _warning(n: int) -> events.ClusterWarning:
    return events.ClusterWarning(
        cluster="c1", reason="NoReadyEndpoints", message=f"m{n}", source="test"
    )


async def test_jetstream_publish_then_consume_with_a_durable(
    bus: Bus, connect_as: ConnectAs
) -> None:
    discovery = await connect_as(Role.DISCOVERY, "c1")
    for n in range(3):
        await discovery.publish(subjects.warnings_subject("c1"), _warning(n))
    sub = await bus.js.pull_subscribe(subjects.warnings_subject("c1"), durable="harness")
    msgs = await sub.fetch(3, timeout=5)
    decoded = [events.decode(m.data) for m in msgs]
    assert [w.message for w in decoded if isinstance(w, events.ClusterWarning)] == [
        "m0",
        "m1",
        "m2",
    ]
    for m in msgs:
        await m.ack()


async def test_message_id_deduplicates_a_repeated_publish(bus: Bus, connect_as: ConnectAs) -> None:
    discovery = await connect_as(Role.DISCOVERY, "c1")
    first = await discovery.publish(subjects.warnings_subject("c1"), _warning(1), msg_id="same")
    second = await discovery.publish(subjects.warnings_subject("c1"), _warning(1), msg_id="same")
    assert first == second
    info = await bus.js.stream_info(subjects.EVENTS_STREAM)
    assert info.state.messages == 1


async def test_kv_watch_yields_the_current_value_first_then_updates(
    bus: Bus, connect_as: ConnectAs
) -> None:
    discovery = await connect_as(Role.DISCOVERY, "c1")
    renderer = await connect_as(Role.RENDERER, "c1")
    await discovery.kv_put(subjects.SNAPSHOT_BUCKET, "c1", _warning(1))
    await discovery.kv_put(subjects.SNAPSHOT_BUCKET, "c1", _warning(2))
    seen: list[str] = []

    async def watch() -> None:
        async for entry in renderer.watch_kv(subjects.SNAPSHOT_BUCKET, "c1"):
            warning = events.decode(entry.value)
            assert isinstance(warning, events.ClusterWarning)
            seen.append(warning.message)
            if len(seen) == 2:
                return

    task = asyncio.create_task(watch())
    await asyncio.sleep(0.3)
    assert seen == ["m2"], "only the latest value comes first, not the history"
    await discovery.kv_put(subjects.SNAPSHOT_BUCKET, "c1", _warning(3))
    await asyncio.wait_for(task, 5)
    assert seen == ["m2", "m3"]


async def test_kv_compare_and_set_rejects_a_stale_revision(bus: Bus, connect_as: ConnectAs) -> None:
    from apilane.runtime.bus import RevisionMismatch

    discovery = await connect_as(Role.DISCOVERY, "c2")
    rev = await discovery.kv_put(subjects.SNAPSHOT_BUCKET, "c2", _warning(1), expected_revision=0)
    with pytest.raises(RevisionMismatch):
        await discovery.kv_put(subjects.SNAPSHOT_BUCKET, "c2", _warning(2), expected_revision=0)
    rev2 = await discovery.kv_put(
        subjects.SNAPSHOT_BUCKET, "c2", _warning(2), expected_revision=rev
    )
    assert rev2 > rev
    entry = await bus.kv_get(subjects.SNAPSHOT_BUCKET, "c2")
    assert entry is not None and entry.revision == rev2


async def test_a_deleted_key_reads_as_absent_but_keeps_its_revision_for_cas(
    bus: Bus, connect_as: ConnectAs
) -> None:
    from apilane.runtime.bus import RevisionMismatch

    discovery = await connect_as(Role.DISCOVERY, "c4")
    await discovery.kv_put(subjects.SNAPSHOT_BUCKET, "c4", _warning(1))
    kv = await discovery.js.key_value(subjects.SNAPSHOT_BUCKET)
    await kv.delete("c4")
    assert await bus.kv_get(subjects.SNAPSHOT_BUCKET, "c4") is None
    marker = await discovery.kv_get(subjects.SNAPSHOT_BUCKET, "c4", include_deleted=True)
    assert marker is not None and marker.operation == "DEL"
    with pytest.raises(RevisionMismatch):
        await discovery.kv_put(subjects.SNAPSHOT_BUCKET, "c4", _warning(2), expected_revision=0)
    await discovery.kv_put(
        subjects.SNAPSHOT_BUCKET, "c4", _warning(2), expected_revision=marker.revision
    )


async def test_kv_keys_lists_the_matching_keys_without_creating_a_consumer(
    connect_as: ConnectAs,
) -> None:
    from apilane.runtime.bus import BusError

    operator = await connect_as(Role.OPERATOR, natsauth.ALL_CLUSTERS)
    # Before the provisioner ran, the bucket does not exist.
    with pytest.raises(BusError, match="does not exist"):
        await operator.kv_keys(subjects.NODE_STATE_BUCKET)
    await (await connect_as(Role.DISCOVERY)).create_streams()
    # Each node writes its own key, as its own identity.
    for cluster, node in (("east", "node-b"), ("east", "node-a"), ("west", "node-a")):
        loader = await connect_as(Role.NODE_LOADER, cluster, node)
        key = subjects.node_state_key(cluster, node)
        await loader.kv_put(subjects.NODE_STATE_BUCKET, key, _warning(1))
        if key == "east.node-a":  # one key, twice
            await loader.kv_put(subjects.NODE_STATE_BUCKET, key, _warning(2))
    stream = f"KV_{subjects.NODE_STATE_BUCKET}"
    consumers_before = (await operator.js.stream_info(stream)).state.consumer_count

    assert await operator.kv_keys(subjects.NODE_STATE_BUCKET, "east.>") == [
        "east.node-a",
        "east.node-b",
    ]
    assert await operator.kv_keys(subjects.NODE_STATE_BUCKET) == [
        "east.node-a",
        "east.node-b",
        "west.node-a",
    ]
    assert await operator.kv_keys(subjects.NODE_STATE_BUCKET, "north.>") == []
    assert (await operator.js.stream_info(stream)).state.consumer_count == consumers_before


async def test_requests_are_answered_and_a_failing_handler_answers_an_error(
    bus: Bus, connect_as: ConnectAs
) -> None:
    from apilane.runtime.bus import BusError

    # A node-loader answers on its control subject; the operator asks.
    loader = await connect_as(Role.NODE_LOADER, "c1", "node-1")
    control = subjects.node_control_subject("c1", "node-1")

    async def handler(payload: bytes) -> bytes:
        if payload == b"boom":
            raise ValueError("no")
        return payload.upper()

    await loader.serve_requests(control, handler)
    assert await bus.request(control, b"hi") == b"HI"
    assert b"ValueError: no" in await bus.request(control, b"boom")
    assert await bus.request(control, b"again") == b"AGAIN"
    with pytest.raises(BusError):
        await bus.request(subjects.node_control_subject("c1", "nobody"), b"x", timeout=0.5)


async def test_kv_watch_catches_up_after_a_server_restart(nats_server: NatsServer) -> None:
    provisioner = await nats_server.connect(Role.DISCOVERY, "c3", name="t", deadline=5)
    await provisioner.create_streams()
    await provisioner.drain()
    bus = await nats_server.connect(Role.NODE_LOADER, "c3", "node-1", name="t", deadline=5)
    await bus.wait_for_streams()
    discovery = await nats_server.connect(Role.DISCOVERY, "c3", name="writer-0", deadline=5)
    await discovery.kv_put(subjects.SNAPSHOT_BUCKET, "c3", _warning(1))
    await discovery.drain()
    seen: list[str] = []
    got_two = asyncio.Event()

    async def watch() -> None:
        async for entry in bus.watch_kv(subjects.SNAPSHOT_BUCKET, "c3", stall_check=0.5):
            warning = events.decode(entry.value)
            assert isinstance(warning, events.ClusterWarning)
            seen.append(warning.message)
            if len(seen) == 2:
                got_two.set()
                return

    task = asyncio.create_task(watch())
    await asyncio.sleep(0.3)
    await asyncio.to_thread(nats_server.restart)
    # Write through a second connection while the first is still reconnecting.
    writer = await nats_server.connect(Role.DISCOVERY, "c3", name="writer")
    await writer.kv_put(subjects.SNAPSHOT_BUCKET, "c3", _warning(2))
    await asyncio.wait_for(got_two.wait(), 20)
    await task
    assert seen == ["m1", "m2"]
    await writer.drain()
    await bus.drain()


async def test_connect_waits_for_a_server_that_starts_late(nats_server: NatsServer) -> None:
    nats_server.stop()
    connecting = asyncio.create_task(
        nats_server.connect(Role.RENDERER, "c1", name="late", deadline=15)
    )
    await asyncio.sleep(0.5)
    assert not connecting.done()
    await asyncio.to_thread(nats_server.start)
    bus = await asyncio.wait_for(connecting, 15)
    assert bus.connected
    await bus.drain()


async def test_connect_gives_up_at_its_deadline_when_nothing_answers() -> None:
    from apilane.runtime.bus import BusError
    from apilane.testing.procs import free_port

    started = asyncio.get_running_loop().time()
    with pytest.raises(BusError, match="cannot connect to NATS"):
        await Bus.connect(
            [f"nats://127.0.0.1:{free_port()}"], name="t", initial_attempt_deadline=1.0
        )
    assert asyncio.get_running_loop().time() - started < 10


def test_a_three_node_cluster_elects_a_jetstream_leader() -> None:
    with NatsCluster(3) as cluster:

        async def check() -> int:
            # The provisioner's replicated stream, written through the cluster.
            bus = await cluster.connect(Role.DISCOVERY, "c1")
            await bus.js.add_stream(
                name=subjects.EVENTS_STREAM,
                subjects=list(subjects.EVENTS_STREAM_SUBJECTS),
                num_replicas=3,
            )
            sequence = await bus.publish(subjects.warnings_subject("c1"), _warning(1))
            await bus.drain()
            return sequence

        assert asyncio.run(check()) == 1


async def test_the_local_stack_nats_gives_every_role_its_credentials(tmp_path: Path) -> None:
    stack = await asyncio.to_thread(
        start_stack_nats, tmp_path, cluster="local", nodes=["local-node"], port=free_port()
    )
    try:
        assert set(stack.roles) == {"discovery", "renderer", "operator", "node-loader:local-node"}
        for env in stack.roles.values():
            assert env["APILANE_NATS_URL"] == stack.server.url
            assert env["APILANE_NATS_URL"].startswith("tls://")
            # Read the way a service reads them (the files must be there).
            assert load_nats_auth(env).tls_ca_file == env["APILANE_NATS_TLS_CA_FILE"]

        async def as_role(name: str) -> Bus:
            env = stack.roles[name]
            # What a service knows of itself: its role, and its cluster (APILANE_CLUSTER).
            auth = load_nats_auth(env).as_identity(name, "local")
            return await Bus.connect([env["APILANE_NATS_URL"]], name=name, auth=auth)

        discovery = await as_role("discovery")
        await discovery.create_streams()
        await discovery.kv_put(subjects.SNAPSHOT_BUCKET, "local", _warning(1))
        operator = await as_role("operator")
        entry = await operator.kv_get(subjects.SNAPSHOT_BUCKET, "local")
        assert entry is not None
        for bus in (discovery, operator):
            await bus.drain()
    finally:
        stack.stop()


def test_compose_credentials_run_a_mutual_tls_server_as_compose_does(tmp_path: Path) -> None:
    """What docker compose's nats-auth step writes, with deploy/compose/nats.conf's options
    (paths and the listen address moved here), on the real server."""
    identities = natsauth.load_identities(REPO / "deploy/compose/identities.toml")
    out = tmp_path / "auth"
    assert write_stack_credentials(out, identities, server_hosts=["127.0.0.1", "localhost"])
    assert not write_stack_credentials(out, identities, server_hosts=["127.0.0.1"])  # kept
    profile = natsauth.PROFILES["compose"]
    assert profile.tls is not None and profile.tls.verify  # mutual TLS in compose
    port = free_port()
    server_dir = out / "server"
    options = msgspec.structs.replace(
        profile,
        listen=f"127.0.0.1:{port}",
        http=f"127.0.0.1:{free_port()}",
        store_dir=str(tmp_path / "store"),
        tls=msgspec.structs.replace(
            profile.tls,
            cert_file=str(server_dir / "server.crt"),
            key_file=str(server_dir / "server.key"),
            ca_file=str(server_dir / "ca.crt"),
        ),
        accounts_include=str(Path("..") / "auth" / "server" / "accounts.conf"),
    )
    config = tmp_path / "config" / "nats.conf"
    config.parent.mkdir()
    config.write_text(natsauth.render_server_config(options))
    log = (tmp_path / "nats.log").open("wb")
    proc = subprocess.Popen(
        [find_nats_server(), "-c", str(config)], stdout=log, stderr=subprocess.STDOUT
    )
    url = f"tls://127.0.0.1:{port}"

    def credentials(directory: str, role: Role) -> NatsAuth:
        folder = out / directory
        return NatsAuth(
            nkey_seed_file=str(folder / "seed.nk"),
            tls_ca_file=str(folder / "ca.crt"),
            tls_cert_file=str(folder / "client.crt"),
            tls_key_file=str(folder / "client.key"),
        ).as_identity(role, "compose")

    async def check() -> None:
        discovery = await Bus.connect(
            [url],
            name="d",
            auth=credentials("discovery", Role.DISCOVERY),
            initial_attempt_deadline=15,
        )
        await discovery.create_streams()
        loader = await Bus.connect(
            [url],
            name="n",
            auth=credentials("node-loader-compose-node", Role.NODE_LOADER),
            initial_attempt_deadline=5,
        )
        assert await loader.wait_for_streams()
        key = subjects.node_state_key("compose", "compose-node")
        await loader.kv_put(subjects.NODE_STATE_BUCKET, key, _warning(1))
        with pytest.raises(PermissionDenied):
            await loader.kv_put(subjects.SNAPSHOT_BUCKET, "compose", _warning(2))
        for bus in (discovery, loader):
            await bus.drain()

    try:
        asyncio.run(check())
    finally:
        end_process(proc)
        log.close()


def test_a_mutual_tls_cluster_routes_over_mutual_tls_too() -> None:
    with NatsCluster(3, mutual_tls=True) as cluster:

        async def check() -> int:
            discovery = await cluster.connect(Role.DISCOVERY, "c1")
            await discovery.js.add_stream(
                name=subjects.EVENTS_STREAM,
                subjects=list(subjects.EVENTS_STREAM_SUBJECTS),
                num_replicas=3,
            )
            # A new replicated stream answers once its leader is elected: retried as
            # discovery's publisher does, with a message id so a retry is never a second copy.
            deadline = time.monotonic() + 20
            while True:
                try:
                    sequence = await discovery.publish(
                        subjects.warnings_subject("c1"), _warning(1), msg_id="w1"
                    )
                    break
                except BusError:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.2)
            await discovery.drain()
            return sequence

        assert all(url.startswith("tls://") for url in cluster.urls)
        assert asyncio.run(check()) == 1
        # Every server is routed to the others (routes form in the background: wait for
        # them), and routes require verified certificates.
        for server in cluster.servers:

            def routed(server: NatsServer = server) -> bool:
                return int((server._monitor("routez") or {}).get("num_routes", 0)) >= 2

            wait_until(routed, timeout=15, what=f"routes of {server.server_name}")
            varz = server._monitor("varz") or {}
            assert varz["tls_required"] and varz["tls_verify"]
            assert varz["cluster"]["tls_required"] and varz["cluster"]["tls_verify"]
