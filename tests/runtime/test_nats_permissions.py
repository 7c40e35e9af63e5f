"""The generated NATS configuration on the real nats-server: who may write what.

Every refusal is asserted on the server's own permission-violation error (`-ERR
'Permissions Violation for Publish to …'`, or 'Authorization Violation' for a client that
cannot authenticate), which arrives as soon as the server drops the message; never on a
timeout alone.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator

import msgspec
import nats
import pytest
from nats.aio.client import Client as NatsClient
from nats.js.api import ConsumerConfig, DeliverPolicy

from apilane.model import events, subjects
from apilane.runtime import natsauth
from apilane.runtime.bus import Bus, PermissionDenied, connect_options
from apilane.runtime.config import NatsAuth
from apilane.runtime.natsauth import ALL_CLUSTERS, Role
from apilane.testing.nats import NatsServer
from apilane.testing.nats_fixtures import ConnectAs

pytestmark = [pytest.mark.integration, pytest.mark.nats]

CLUSTER = "c1"
NODE, OTHER_NODE = "node-a", "node-b"
SNAPSHOTS = f"KV_{subjects.SNAPSHOT_BUCKET}"
NODES = f"KV_{subjects.NODE_STATE_BUCKET}"
SNAPSHOT_KEY = subjects.kv_subject(subjects.SNAPSHOT_BUCKET, CLUSTER)
OWN_STATE = subjects.kv_subject(subjects.NODE_STATE_BUCKET, subjects.node_state_key(CLUSTER, NODE))
OTHER_STATE = subjects.kv_subject(
    subjects.NODE_STATE_BUCKET, subjects.node_state_key(CLUSTER, OTHER_NODE)
)
CONTROL = subjects.node_control_subject(CLUSTER, NODE)
SWITCH_OFF = msgspec.json.encode({"connect_time_lb": False})

# Everyone who is not discovery of CLUSTER, as (role, cluster, node).
NOT_DISCOVERY = [
    (Role.RENDERER, CLUSTER, ""),
    (Role.NODE_LOADER, CLUSTER, NODE),
    (Role.OPERATOR, CLUSTER, ""),
    (Role.OPERATOR, ALL_CLUSTERS, ""),
    (Role.DISCOVERY, "c2", ""),
]
READERS = [(Role.RENDERER, CLUSTER, ""), (Role.NODE_LOADER, CLUSTER, NODE)]


def _snapshot() -> events.ClusterWarning:
    return events.ClusterWarning(cluster=CLUSTER, reason="Test", message="m", source="test")


class RawClient:
    """A plain nats-py client that records what the server refuses, as the server says it."""

    def __init__(self) -> None:
        self.nc = NatsClient()
        self.refusals: asyncio.Queue[str] = asyncio.Queue()

    async def connect(self, server: NatsServer, auth: NatsAuth | None) -> RawClient:
        async def on_error(exc: Exception) -> None:
            await self.refusals.put(str(exc))

        options = connect_options([server.url], auth or NatsAuth())
        await self.nc.connect(
            servers=[server.url], error_cb=on_error, allow_reconnect=False, **options
        )
        return self

    async def refused(self, action: str, subject: str) -> str:
        """The server's violation for `subject` (publish or subscription), waited for."""
        wanted = f'permissions violation for {action} to "{subject.lower()}"'
        while True:
            message = await asyncio.wait_for(self.refusals.get(), timeout=10)
            if wanted in message.lower():
                return message

    async def publish_refused(self, subject: str, payload: bytes = b"x") -> str:
        await self.nc.publish(subject, payload, reply=self.nc.new_inbox())
        await self.nc.flush()
        return await self.refused("publish", subject)

    async def subscribe_refused(self, subject: str) -> str:
        await self.nc.subscribe(subject)
        await self.nc.flush()
        return await self.refused("subscription", subject)


@pytest.fixture
async def raw(nats_server: NatsServer) -> AsyncIterator[dict[tuple[Role, str, str], RawClient]]:
    """One raw client per identity, connected lazily: `await client_for(...)`."""
    clients: dict[tuple[Role, str, str], RawClient] = {}
    yield clients
    for client in clients.values():
        await client.nc.close()


async def client_for(
    clients: dict[tuple[Role, str, str], RawClient],
    server: NatsServer,
    role: Role,
    cluster: str,
    node: str = "",
) -> RawClient:
    key = (role, cluster, node)
    if key not in clients:
        clients[key] = await RawClient().connect(server, server.credentials(role, cluster, node))
    return clients[key]


@pytest.fixture
async def streams(connect_as: ConnectAs) -> Bus:
    """The streams, made by the provisioner (discovery of CLUSTER)."""
    discovery = await connect_as(Role.DISCOVERY, CLUSTER)
    await discovery.create_streams()
    return discovery


# --------------------------------------------------------------------------- authentication


async def test_an_unauthenticated_client_is_refused(nats_server: NatsServer) -> None:
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await nats.connect(nats_server.url, allow_reconnect=False, connect_timeout=2)


async def test_a_seed_nobody_listed_is_refused(nats_server: NatsServer, tmp_path: object) -> None:
    from pathlib import Path

    seed = Path(str(tmp_path)) / "stranger.nk"
    natsauth.write_seed(seed, natsauth.new_user_seed())
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await nats.connect(
            nats_server.url, nkeys_seed=str(seed), allow_reconnect=False, connect_timeout=2
        )


# --------------------------------------------------------------------------- the snapshot key


@pytest.mark.parametrize(("role", "cluster", "node"), NOT_DISCOVERY)
async def test_only_discovery_of_the_cluster_may_write_its_snapshot_key(
    nats_server: NatsServer,
    streams: Bus,
    connect_as: ConnectAs,
    role: Role,
    cluster: str,
    node: str,
) -> None:
    intruder = await connect_as(role, cluster, node)
    with pytest.raises(PermissionDenied, match=r"(?i)permissions violation for publish"):
        await intruder.kv_put(subjects.SNAPSHOT_BUCKET, CLUSTER, _snapshot())
    assert any(SNAPSHOT_KEY.lower() in v.lower() for v in intruder.permission_violations)
    assert await streams.kv_get(subjects.SNAPSHOT_BUCKET, CLUSTER) is None
    # The rightful writer can.
    assert await streams.kv_put(subjects.SNAPSHOT_BUCKET, CLUSTER, _snapshot()) > 0


async def test_a_raw_client_of_another_role_cannot_put_delete_or_purge_the_snapshot(
    nats_server: NatsServer, streams: Bus, raw: dict[tuple[Role, str, str], RawClient]
) -> None:
    renderer = await client_for(raw, nats_server, Role.RENDERER, CLUSTER)
    message = await renderer.publish_refused(SNAPSHOT_KEY, b'{"type":"snapshot"}')
    assert "Publish" in message or "publish" in message
    # A KV delete or purge is a publish to the key with a header: the same refusal.
    kv = await renderer.nc.jetstream().key_value(subjects.SNAPSHOT_BUCKET)
    deleting = asyncio.create_task(kv.delete(CLUSTER))
    assert await renderer.refused("publish", SNAPSHOT_KEY)
    deleting.cancel()


# --------------------------------------------------------------------------- node state


async def test_a_node_loader_writes_only_its_own_node_state(
    nats_server: NatsServer, streams: Bus, connect_as: ConnectAs
) -> None:
    loader = await connect_as(Role.NODE_LOADER, CLUSTER, NODE)
    own = subjects.node_state_key(CLUSTER, NODE)
    assert await loader.kv_put(subjects.NODE_STATE_BUCKET, own, _snapshot()) > 0
    with pytest.raises(PermissionDenied, match=r"(?i)permissions violation for publish"):
        await loader.kv_put(
            subjects.NODE_STATE_BUCKET, subjects.node_state_key(CLUSTER, OTHER_NODE), _snapshot()
        )
    assert OTHER_STATE.lower() in loader.permission_violations[-1].lower()


@pytest.mark.parametrize(
    ("role", "cluster", "node"),
    [
        (Role.DISCOVERY, CLUSTER, ""),
        (Role.RENDERER, CLUSTER, ""),
        (Role.OPERATOR, ALL_CLUSTERS, ""),
        (Role.NODE_LOADER, CLUSTER, OTHER_NODE),
        (Role.NODE_LOADER, "c2", NODE),  # the same node name in another cluster
    ],
)
async def test_nobody_else_writes_a_nodes_state(
    nats_server: NatsServer,
    streams: Bus,
    raw: dict[tuple[Role, str, str], RawClient],
    role: Role,
    cluster: str,
    node: str,
) -> None:
    intruder = await client_for(raw, nats_server, role, cluster, node)
    assert await intruder.publish_refused(OWN_STATE)


# --------------------------------------------------------------------------- the control subject


@pytest.mark.parametrize(
    ("role", "cluster", "node"),
    [
        (Role.DISCOVERY, CLUSTER, ""),
        (Role.RENDERER, CLUSTER, ""),
        (Role.NODE_LOADER, CLUSTER, NODE),
        (Role.NODE_LOADER, CLUSTER, OTHER_NODE),
        (Role.OPERATOR, "c2", ""),  # another cluster's operator
    ],
)
async def test_only_an_operator_of_the_cluster_may_send_on_a_control_subject(
    nats_server: NatsServer,
    connect_as: ConnectAs,
    raw: dict[tuple[Role, str, str], RawClient],
    role: Role,
    cluster: str,
    node: str,
) -> None:
    loader = await connect_as(Role.NODE_LOADER, CLUSTER, NODE)
    received: list[bytes] = []

    async def handler(payload: bytes) -> bytes:
        received.append(payload)
        return b"state"

    await loader.serve_requests(CONTROL, handler)
    intruder = await client_for(raw, nats_server, role, cluster, node)
    assert await intruder.publish_refused(CONTROL, SWITCH_OFF)
    operator = await connect_as(Role.OPERATOR, CLUSTER)
    assert await operator.request(CONTROL, b"{}") == b"state"
    # Only the operator's request got through (the refused one never reached the node).
    assert received == [b"{}"]


@pytest.mark.parametrize(
    ("role", "cluster", "node"),
    [(Role.NODE_LOADER, CLUSTER, OTHER_NODE), (Role.RENDERER, CLUSTER, ""), *NOT_DISCOVERY[3:4]],
)
async def test_nobody_else_may_receive_a_nodes_control_subject(
    nats_server: NatsServer,
    raw: dict[tuple[Role, str, str], RawClient],
    role: Role,
    cluster: str,
    node: str,
) -> None:
    eavesdropper = await client_for(raw, nats_server, role, cluster, node)
    assert await eavesdropper.subscribe_refused(CONTROL)


async def test_a_node_loader_answers_its_control_requests_and_nothing_else(
    nats_server: NatsServer, raw: dict[tuple[Role, str, str], RawClient]
) -> None:
    """allow_responses: a reply only to a request it received, not to any subject."""
    loader = await client_for(raw, nats_server, Role.NODE_LOADER, CLUSTER, NODE)
    assert await loader.publish_refused(subjects.node_control_subject(CLUSTER, OTHER_NODE))
    assert await loader.publish_refused("_INBOX.anyone")


# --------------------------------------------------------------------------- streams and buckets


def _admin_requests(stream: str) -> list[tuple[str, bytes]]:
    config = msgspec.json.encode({"name": stream, "subjects": ["apilane.v1.x.>"]})
    return [
        (f"$JS.API.STREAM.CREATE.{stream}", config),
        (f"$JS.API.STREAM.UPDATE.{stream}", config),
        (f"$JS.API.STREAM.DELETE.{stream}", b""),
        (f"$JS.API.STREAM.PURGE.{stream}", b""),
        (f"$JS.API.STREAM.MSG.DELETE.{stream}", b'{"seq": 1}'),
    ]


@pytest.mark.parametrize(("role", "cluster", "node"), READERS)
@pytest.mark.parametrize("stream", natsauth.STREAMS)
async def test_renderer_and_node_loader_cannot_create_update_purge_or_delete_streams(
    nats_server: NatsServer,
    streams: Bus,
    raw: dict[tuple[Role, str, str], RawClient],
    role: Role,
    cluster: str,
    node: str,
    stream: str,
) -> None:
    reader = await client_for(raw, nats_server, role, cluster, node)
    for subject, payload in _admin_requests(stream):
        assert await reader.publish_refused(subject, payload), subject
    # Looking a stream up is allowed, and the stream is intact.
    info = await reader.nc.jetstream().stream_info(stream)
    assert info.config.name == stream


@pytest.mark.parametrize(("role", "cluster", "node"), READERS)
async def test_readers_create_streams_only_by_waiting_for_the_provisioner(
    nats_server: NatsServer, connect_as: ConnectAs, role: Role, cluster: str, node: str
) -> None:
    reader = await connect_as(role, cluster, node)
    with pytest.raises(PermissionDenied, match=r"STREAM\.CREATE"):
        await reader.create_streams()
    waiting = asyncio.create_task(reader.wait_for_streams(retry_max=0.2))
    await asyncio.sleep(0.3)
    assert not waiting.done(), "nothing exists yet: the reader waits"
    discovery = await connect_as(Role.DISCOVERY, CLUSTER)
    await discovery.create_streams()
    assert await asyncio.wait_for(waiting, 10) is True


async def test_discovery_provisions_but_never_deletes_or_purges(
    nats_server: NatsServer, streams: Bus, raw: dict[tuple[Role, str, str], RawClient]
) -> None:
    discovery = await client_for(raw, nats_server, Role.DISCOVERY, CLUSTER)
    for subject, payload in _admin_requests(SNAPSHOTS)[2:]:
        assert await discovery.publish_refused(subject, payload), subject


async def test_discovery_is_told_of_every_write_to_its_own_key_and_nobody_else_is(
    nats_server: NatsServer, streams: Bus, connect_as: ConnectAs
) -> None:
    """A core subscription (no consumer) on its own key: how the leader notices a purge."""
    discovery = await connect_as(Role.DISCOVERY, CLUSTER)
    written = asyncio.Event()
    await discovery.notify_on(SNAPSHOT_KEY, written.set)
    await streams.kv_put(subjects.SNAPSHOT_BUCKET, CLUSTER, _snapshot())
    await asyncio.wait_for(written.wait(), 5)
    written.clear()
    kv = await streams.js.key_value(subjects.SNAPSHOT_BUCKET)
    await kv.purge(CLUSTER)
    await asyncio.wait_for(written.wait(), 5)
    with pytest.raises(PermissionDenied):
        await discovery.notify_on(subjects.kv_subject(subjects.SNAPSHOT_BUCKET, "c2"), written.set)
    for role, cluster, node in NOT_DISCOVERY:
        other = await connect_as(role, cluster, node)
        with pytest.raises(PermissionDenied):
            await other.notify_on(SNAPSHOT_KEY, written.set)


@pytest.mark.parametrize(("role", "cluster", "node"), READERS)
@pytest.mark.parametrize("stream", [NODES, subjects.EVENTS_STREAM])
async def test_readers_may_not_create_consumers_on_streams_others_can_write(
    nats_server: NatsServer,
    streams: Bus,
    raw: dict[tuple[Role, str, str], RawClient],
    role: Role,
    cluster: str,
    node: str,
    stream: str,
) -> None:
    """nats-server does not check a push consumer's deliver subject against its creator's
    permissions: a renderer that could consume the events stream (where it writes) could
    have its own `{"connect_time_lb": false}` delivered onto a node's control subject."""
    reader = await client_for(raw, nats_server, role, cluster, node)
    request = msgspec.json.encode(
        {"stream_name": stream, "config": {"deliver_subject": CONTROL, "ack_policy": "none"}}
    )
    assert await reader.publish_refused(f"$JS.API.CONSUMER.CREATE.{stream}", request)


# --------------------------------------------------------------------------- inboxes


@pytest.mark.parametrize(("role", "cluster", "node"), [*READERS, (Role.DISCOVERY, CLUSTER, "")])
async def test_no_identity_can_read_another_identitys_replies(
    nats_server: NatsServer,
    raw: dict[tuple[Role, str, str], RawClient],
    role: Role,
    cluster: str,
    node: str,
) -> None:
    operator = nats_server.identities.identity(Role.OPERATOR, ALL_CLUSTERS)
    snoop = await client_for(raw, nats_server, role, cluster, node)
    assert await snoop.subscribe_refused(f"{operator.inbox_prefix}.>")
    assert await snoop.subscribe_refused("_INBOX.>")
    assert await snoop.subscribe_refused(">")


async def test_a_node_loader_cannot_read_another_node_loaders_replies_in_its_cluster(
    nats_server: NatsServer, raw: dict[tuple[Role, str, str], RawClient]
) -> None:
    """The cluster and role tokens of the inbox prefix name a pattern for the leaf's hub
    side; they give a node-loader nothing beyond its own key's inbox."""
    other = nats_server.identities.identity(Role.NODE_LOADER, CLUSTER, OTHER_NODE)
    snoop = await client_for(raw, nats_server, Role.NODE_LOADER, CLUSTER, NODE)
    assert await snoop.subscribe_refused(f"{other.inbox_prefix}.>")
    assert await snoop.subscribe_refused(f"_INBOX.apilane.{CLUSTER}.node-loader.>")
    assert await snoop.subscribe_refused(f"_INBOX.apilane.{CLUSTER}.*.>")
    assert await snoop.subscribe_refused("_INBOX.apilane.>")


# --------------------------------------------------------------------------- what each role needs


async def test_each_role_can_do_what_it_needs(
    nats_server: NatsServer, connect_as: ConnectAs
) -> None:
    discovery = await connect_as(Role.DISCOVERY, CLUSTER)
    await discovery.create_streams()
    await discovery.create_streams()  # idempotent, with only create/update rights
    first = await discovery.kv_put(
        subjects.SNAPSHOT_BUCKET, CLUSTER, _snapshot(), expected_revision=0
    )
    marker = await discovery.kv_get(subjects.SNAPSHOT_BUCKET, CLUSTER, include_deleted=True)
    assert marker is not None and marker.revision == first
    await discovery.publish(subjects.warnings_subject(CLUSTER), _snapshot(), msg_id="w1")

    renderer = await connect_as(Role.RENDERER, CLUSTER)
    loader = await connect_as(Role.NODE_LOADER, CLUSTER, NODE)
    for reader in (renderer, loader):
        assert await reader.wait_for_streams()
        entry = await reader.kv_get(subjects.SNAPSHOT_BUCKET, CLUSTER)
        assert entry is not None and entry.revision == first
        watch = reader.watch_kv(subjects.SNAPSHOT_BUCKET, CLUSTER)
        assert (await anext(watch)).revision == first
        await watch.aclose()
        await reader.publish(subjects.warnings_subject(CLUSTER), _snapshot())
    await renderer.publish(subjects.renders_subject(CLUSTER), _snapshot())
    own = subjects.node_state_key(CLUSTER, NODE)
    await loader.kv_put(subjects.NODE_STATE_BUCKET, own, _snapshot())

    async def answer(payload: bytes) -> bytes:
        return b"ok " + payload

    await loader.serve_requests(CONTROL, answer)
    operator = await connect_as(Role.OPERATOR, CLUSTER)
    assert await operator.request(CONTROL, b"{}") == b"ok {}"
    state = await operator.kv_get(subjects.NODE_STATE_BUCKET, own)
    assert state is not None
    kv = await operator.js.key_value(subjects.SNAPSHOT_BUCKET)
    assert [e.revision for e in await kv.history(CLUSTER)] == [first]
    durable = await operator.js.pull_subscribe(
        subjects.warnings_subject(CLUSTER), durable="audit", stream=subjects.EVENTS_STREAM
    )
    assert len(await durable.fetch(2, timeout=5)) == 2
    for bus in (discovery, renderer, loader, operator):
        assert bus.permission_violations == []


async def test_a_watch_survives_flow_control(
    nats_server: NatsServer, streams: Bus, connect_as: ConnectAs
) -> None:
    """Enough data for the server to ask for flow control: the watcher may answer it."""
    renderer = await connect_as(Role.RENDERER, CLUSTER)
    big = events.ClusterWarning(cluster=CLUSTER, reason="Big", message="x" * 60_000, source="t")
    for _ in range(40):
        await streams.kv_put(subjects.SNAPSHOT_BUCKET, CLUSTER, big)
    sub = await renderer.js.subscribe(
        SNAPSHOT_KEY,
        stream=SNAPSHOTS,
        ordered_consumer=True,
        config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL),
        idle_heartbeat=1.0,
    )
    for _ in range(40):
        await sub.next_msg(timeout=10)
    await sub.unsubscribe()
    assert renderer.permission_violations == []


# --------------------------------------------------------------------------- TLS


async def test_mutual_tls_refuses_clients_without_tls_or_without_a_certificate(
    nats_server_tls: NatsServer,
) -> None:
    auth = nats_server_tls.credentials(Role.OPERATOR, CLUSTER)
    plain = nats_server_tls.url.replace("tls://", "nats://")
    with pytest.raises((nats.errors.Error, OSError, asyncio.TimeoutError)):
        await nats.connect(
            plain, nkeys_seed=auth.nkey_seed_file, allow_reconnect=False, connect_timeout=2
        )
    no_cert = ssl.create_default_context(cafile=auth.tls_ca_file)
    with pytest.raises((nats.errors.Error, ssl.SSLError, OSError, asyncio.TimeoutError)):
        await nats.connect(
            nats_server_tls.url,
            nkeys_seed=auth.nkey_seed_file,
            tls=no_cert,
            tls_handshake_first=True,
            allow_reconnect=False,
            connect_timeout=2,
        )
    bus = await Bus.connect([nats_server_tls.url], name="t", auth=auth, initial_attempt_deadline=5)
    assert bus.connected
    await bus.drain()


async def test_a_client_checks_the_servers_certificate(
    nats_server_tls: NatsServer, tmp_path: object
) -> None:
    from pathlib import Path

    from apilane.testing.pki import Pki

    other_ca = Pki(Path(str(tmp_path)) / "other", common_name="not-the-nats-ca")
    auth = nats_server_tls.credentials(Role.OPERATOR, CLUSTER)
    misled = msgspec.structs.replace(auth, tls_ca_file=str(other_ca.ca_path))
    with pytest.raises(Exception, match=r"(?i)certificate verify failed|cannot connect"):
        await Bus.connect([nats_server_tls.url], name="t", auth=misled, initial_attempt_deadline=1)


async def test_kv_latest_reads_every_key_once_with_its_write_time(
    bus: Bus, connect_as: ConnectAs
) -> None:
    """One pass over the node-state bucket: the latest value of each key, deletes left out;
    the bucket removes a key an hour after its last write (nodes gone from the cluster)."""
    for node in ("node-a", "node-b"):
        loader = await connect_as(Role.NODE_LOADER, "east", node)
        key = subjects.node_state_key("east", node)
        await loader.kv_put(subjects.NODE_STATE_BUCKET, key, b"first")
        await loader.kv_put(subjects.NODE_STATE_BUCKET, key, f"{node} now".encode())
    west = await connect_as(Role.NODE_LOADER, "west", "node-c")
    await west.kv_put(subjects.NODE_STATE_BUCKET, subjects.node_state_key("west", "node-c"), b"x")
    entries = await bus.kv_latest(subjects.NODE_STATE_BUCKET, "east.>")
    assert [(e.key, e.value) for e in entries] == [
        ("east.node-a", b"node-a now"),
        ("east.node-b", b"node-b now"),
    ]
    assert all(e.written_at is not None for e in entries)
    assert await bus.kv_latest(subjects.NODE_STATE_BUCKET, "south.>") == []
    info = await bus.js.stream_info(f"KV_{subjects.NODE_STATE_BUCKET}")
    assert info.config.max_age == subjects.NODE_STATE_MAX_AGE
