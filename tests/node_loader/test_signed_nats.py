"""Only signed snapshots reach the maps, and only operators switch the LB: the node-loader
in-process on MemoryNatMaps against a real nats-server (the kernel maps: test_signed_kernel).

The loader connects as its node's NATS identity. What reaches the snapshot key is written
with discovery's (whoever holds its credentials can write anything there: the signature is
what tells them apart); control requests and reads go as the operator's."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import msgspec
import pytest
from prometheus_client import CollectorRegistry

from apilane.model import events, signing, subjects
from apilane.model.events import ClusterWarning, NodeState
from apilane.model.signing import SigningKey
from apilane.node_loader import settings as loader_settings
from apilane.node_loader.memmaps import MemoryNatMaps, render_resolved
from apilane.node_loader.service import DataPlane, NodeLoader
from apilane.node_loader.testing import RecordedPrograms, contents_of, running
from apilane.runtime.bus import Bus
from apilane.runtime.natsauth import Role
from apilane.testing.loaders import loader_env
from apilane.testing.nats import NatsServer
from apilane.testing.nats_fixtures import ConnectAs
from apilane.testing.sealing import (
    TEST_KEY,
    control_request,
    put_sealed,
    reseal,
    seal,
    trusted_env,
)
from apilane.testing.snapshots import make_snapshot
from apilane.testing.waiting import until

pytestmark = [pytest.mark.integration, pytest.mark.nats]

CLUSTER = "default"
NODE = "signed-node"
HA3 = ("10.0.0.1:6443", "10.0.0.2:6443", "10.0.0.3:6443")
OPERATOR = SigningKey.generate()
HOUR = timedelta(hours=1)


class Node:
    """One node-loader (restartable: maps and state file outlive it) and its view on NATS."""

    def __init__(self, bus: Bus, discovery: Bus, nats_server: NatsServer, tmp_path: Path) -> None:
        self.bus = bus  # the operator: reads node states and warnings, sends control requests
        self.discovery = discovery  # the snapshot key's writer
        self.env = loader_env(
            nats_server.env(Role.NODE_LOADER, CLUSTER, NODE),
            cluster=CLUSTER,
            node=NODE,
            workdir=tmp_path,
            **trusted_env(OPERATOR, name="APILANE_OPERATOR_KEYS"),
        )
        self.maps = MemoryNatMaps()
        self.programs = RecordedPrograms(names=("apilane_connect4",))
        self.registry = CollectorRegistry()
        self.loader: NodeLoader | None = None

    def running(self) -> contextlib.AbstractAsyncContextManager[NodeLoader]:
        self.registry = CollectorRegistry()
        self.loader = NodeLoader(
            settings=loader_settings.load(self.env),
            data_plane=DataPlane(maps=self.maps, programs=self.programs),
            registry=self.registry,
        )
        return running(self.loader)

    async def put(self, data: bytes) -> int:
        return await put_sealed(self.discovery, data, cluster=CLUSTER)

    async def control(self, request: bytes, *, node: str = NODE) -> bytes:
        return await self.bus.request(
            subjects.node_control_subject(CLUSTER, node), request, timeout=5
        )

    def resolved(self) -> list[str]:
        return render_resolved(contents_of(self.maps))

    def metric(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0

    def refused(self, reason: str) -> float:
        return self.metric("apilane_node_snapshots_refused_total", reason=reason)

    async def state(self, check: Callable[[NodeState], bool] = lambda _: True) -> NodeState:
        deadline = time.monotonic() + 15
        state = None
        while time.monotonic() < deadline:
            entry = await self.bus.kv_get(
                subjects.NODE_STATE_BUCKET, subjects.node_state_key(CLUSTER, NODE)
            )
            state = events.decode(entry.value) if entry else None
            if isinstance(state, NodeState) and check(state):
                return state
            await asyncio.sleep(0.05)
        raise AssertionError(f"NodeState never matched: {state}")

    async def warnings(self) -> list[ClusterWarning]:
        sub = await self.bus.js.subscribe(subjects.warnings_subject(CLUSTER), ordered_consumer=True)
        found = []
        try:
            while True:
                try:
                    msg = await sub.next_msg(timeout=0.5)
                except Exception:
                    break
                decoded = events.decode(msg.data)
                assert isinstance(decoded, ClusterWarning)
                found.append(decoded)
        finally:
            await sub.unsubscribe()
        return found


@pytest.fixture
async def node(bus: Bus, connect_as: ConnectAs, nats_server, tmp_path: Path) -> Node:
    discovery = await connect_as(Role.DISCOVERY, CLUSTER)
    return Node(bus, discovery, nats_server, tmp_path)


def snapshot(generation: int, apiservers: tuple[str, ...] = HA3) -> events.EndpointSnapshot:
    return make_snapshot(generation=generation, apiservers=apiservers)


def tampered(data: bytes) -> bytes:
    """The envelope of `data` with another payload under the same signature."""
    envelope = msgspec.json.decode(data, type=signing.Envelope)
    attacker = events.encode(snapshot(envelope_generation(data), ("203.0.113.9:6443",)))
    return msgspec.json.encode(
        signing.Envelope(header=envelope.header, payload=attacker, signature=envelope.signature)
    )


def envelope_generation(data: bytes) -> int:
    envelope = msgspec.json.decode(data, type=signing.Envelope)
    return msgspec.json.decode(envelope.header, type=signing.Header).generation


# --- snapshots ----------------------------------------------------------------------------


async def test_what_no_trusted_key_signed_is_refused_and_changes_nothing(node: Node) -> None:
    async with node.running() as loader:
        await node.put(seal(snapshot(1)))
        await node.state(lambda s: s.generation == 1)
        before, operations = node.resolved(), node.maps.operations
        saved = loader.settings.state_file.read_bytes()

        attacker = SigningKey.generate()
        await node.put(seal(snapshot(2, ("203.0.113.9:6443",)), key=attacker))
        await node.put(events.encode(snapshot(3, ("203.0.113.9:6443",))))  # plain JSON
        await node.put(tampered(seal(snapshot(4))))
        bad_digest = msgspec.structs.replace(snapshot(5), digest="sha256:0")
        await node.put(seal(bad_digest))
        await until(
            lambda: (
                node.refused("unknown-key") == 1
                and node.refused("unsigned") == 1
                and node.refused("bad-signature") == 1
                and node.refused("mismatch") == 1
            ),
            what="four refusals",
        )
        assert node.resolved() == before and node.maps.operations == operations
        assert loader.settings.state_file.read_bytes() == saved
        state = await node.state(lambda s: "mismatch" in s.last_error)
        assert state.generation == 1 and state.signed_by == TEST_KEY.key_id
        refusals = sorted(
            (w.message.split("(")[1].split(")")[0], w.generation)
            for w in await node.warnings()
            if w.reason == "SnapshotRefused"
        )
        assert refusals == [
            ("bad-signature", 0),
            ("mismatch", 0),
            ("unknown-key", 0),
            ("unsigned", 0),
        ]

        # The next snapshot a trusted key signed is applied and clears the error.
        await node.put(seal(snapshot(6, ("10.0.0.7:6443",))))
        state = await node.state(lambda s: s.generation == 6)
        assert state.last_error == ""
        assert node.resolved() == ["IPv4 10.96.0.1:443/6 -> [10.0.0.7:6443]"]


async def test_a_replayed_older_generation_is_refused_also_after_a_restart(node: Node) -> None:
    async with node.running():
        await node.put(seal(snapshot(5)))
        await node.state(lambda s: s.generation == 5)
        held, operations = node.resolved(), node.maps.operations
        old = seal(snapshot(4, ("10.0.0.9:6443",)))
        await node.put(old)
        other = seal(snapshot(5, ("10.0.0.9:6443",)))  # the held generation, other content
        await node.put(other)
        await until(
            lambda: node.refused("rollback") == 1 and node.refused("equivocation") == 1,
            what="rollback and equivocation refused",
        )
        assert node.resolved() == held and node.maps.operations == operations

    # While the loader is down, the KV's latest value becomes the old, validly signed one.
    await node.put(old)
    async with node.running() as loader:
        await until(lambda: node.refused("rollback") == 1, what="rollback after restart")
        assert loader.reconciler.applied_generation == 5
        assert node.resolved() == held and node.maps.operations == operations
        state = await node.state(lambda s: "rollback" in s.last_error)
        assert state.generation == 5


async def test_an_expired_snapshot_is_kept_the_node_stale_until_a_refresh(node: Node) -> None:
    valid_for = timedelta(seconds=5)
    original = seal(snapshot(1), issued_at=signing.utcnow() - HOUR + valid_for, ttl=HOUR)
    async with node.running():
        await node.put(original)
        applied = await node.state(lambda s: s.generation == 1)
        assert applied.stale is False and applied.snapshot_expires_at is not None
        held, operations = node.resolved(), node.maps.operations

        # Expiry removes nothing: the maps keep generation 1; the node says it is stale.
        stale = await node.state(lambda s: s.stale)
        assert stale.generation == 1 and stale.snapshot_expires_at == applied.snapshot_expires_at
        assert node.metric("apilane_node_snapshot_stale") == 1
        assert node.resolved() == held and node.maps.operations == operations
        assert [w.generation for w in await node.warnings() if w.reason == "SnapshotExpired"] == [1]

        # A newer generation that has expired already is not applied as new.
        expired = seal(snapshot(2, ("10.0.0.9:6443",)), issued_at=signing.utcnow() - 2 * HOUR)
        await node.put(expired)
        await until(lambda: node.refused("expired") == 1, what="expired refused")
        assert node.resolved() == held and node.maps.operations == operations
        assert (await node.state(lambda s: "expired" in s.last_error)).stale is True

        # The held generation signed again with a later expiry: taken, without map writes.
        await node.put(reseal(original, ttl=HOUR))
        fresh = await node.state(lambda s: not s.stale)
        assert fresh.generation == 1 and fresh.snapshot_expires_at > applied.snapshot_expires_at
        assert node.metric("apilane_node_snapshot_refreshes_total") == 1
        assert node.metric("apilane_node_snapshot_stale") == 0
        assert node.resolved() == held and node.maps.operations == operations
        assert fresh.last_error == ""


async def test_two_trusted_keys_at_once_during_a_rotation(node: Node) -> None:
    new = SigningKey.generate()
    node.env.update(trusted_env(TEST_KEY, new))
    async with node.running():
        first = seal(snapshot(1))
        await node.put(first)
        await node.state(lambda s: s.generation == 1 and s.signed_by == TEST_KEY.key_id)
        # Discovery switches to the new key: the same content re-signed is a refresh...
        await node.put(reseal(first, key=new))
        await node.state(lambda s: s.generation == 1 and s.signed_by == new.key_id)
        # ...and new generations under either key are applied.
        await node.put(seal(snapshot(2, ("10.0.0.2:6443",)), key=new))
        await node.state(lambda s: s.generation == 2 and s.signed_by == new.key_id)
        await node.put(seal(snapshot(3, ("10.0.0.3:6443",))))
        state = await node.state(lambda s: s.generation == 3)
        assert state.signed_by == TEST_KEY.key_id and state.last_error == ""
        assert node.resolved() == ["IPv4 10.96.0.1:443/6 -> [10.0.0.3:6443]"]
        refused = [
            sample
            for metric in node.registry.collect()
            if metric.name == "apilane_node_snapshots_refused"
            for sample in metric.samples
            if sample.value
        ]
        assert refused == []


# --- control ------------------------------------------------------------------------------


def refusal(reply: bytes) -> str:
    decoded = msgspec.json.decode(reply)
    assert isinstance(decoded, dict) and "bad control request" in decoded["error"], decoded
    return str(decoded["reason"])


async def test_a_replayed_control_request_is_refused_also_after_a_restart(node: Node) -> None:
    switch_off = control_request(node=NODE, connect_time_lb=False, key=OPERATOR)
    async with node.running() as loader:
        state = events.decode(await node.control(switch_off))
        assert isinstance(state, NodeState) and state.connect_time_lb is False
        assert refusal(await node.control(switch_off)) == "replay"
        # Switched back by a fresh request; replaying the old one changes nothing.
        assert events.decode(
            await node.control(control_request(node=NODE, connect_time_lb=True, key=OPERATOR))
        ).connect_time_lb
        assert refusal(await node.control(switch_off)) == "replay"
        assert loader.connect_time_lb is True
    calls = list(node.programs.calls)
    async with node.running() as loader:
        assert refusal(await node.control(switch_off)) == "replay"
        assert loader.connect_time_lb is True
        assert node.metric("apilane_node_control_requests_total", outcome="replay") == 1
    assert node.programs.calls == [*calls, "enable", "close"]  # the restart's own attach only


async def test_control_requests_an_operator_did_not_sign_are_refused(node: Node) -> None:
    await node.put(seal(snapshot(1)))
    async with node.running() as loader:
        cases = {
            # Trusted for snapshots is not trusted for control.
            "unknown-key": control_request(node=NODE, connect_time_lb=False, key=TEST_KEY),
            "unsigned": b'{"connect_time_lb": false}',
            "misdirected": control_request(node="other-node", connect_time_lb=False, key=OPERATOR),
            "stale": control_request(
                node=NODE,
                connect_time_lb=False,
                key=OPERATOR,
                issued_at=signing.utcnow() - timedelta(minutes=5),
            ),
        }
        for reason, request in cases.items():
            assert refusal(await node.control(request)) == reason
            assert node.metric("apilane_node_control_requests_total", outcome=reason) == 1
        assert refusal(await node.control(b"")) == "unsigned"
        assert loader.connect_time_lb is True and node.programs.calls == ["enable"]
        state = loader.node_state()
        assert state.connect_time_lb is True and state.last_error == ""
    assert loader.reconciler.control_issued_at is None


async def test_without_operator_keys_every_control_request_is_refused(node: Node) -> None:
    node.env["APILANE_OPERATOR_KEYS"] = ""
    async with node.running() as loader:
        request = control_request(node=NODE, connect_time_lb=False, key=OPERATOR)
        assert refusal(await node.control(request)) == "disabled"
        assert loader.connect_time_lb is True and node.programs.calls == ["enable"]
