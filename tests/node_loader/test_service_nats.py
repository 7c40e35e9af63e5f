"""The node-loader service in-process, on MemoryNatMaps, against a real nats-server.

Every snapshot is sealed by a trusted key and written as discovery's NATS identity, every
control request sealed by an operator key and sent as the operator's, as discovery and the
CLI do (refusals are in test_signed_nats.py); the loader connects as its node's identity."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

from apilane.model import events, subjects
from apilane.model.events import ClusterWarning, NodeState
from apilane.model.signing import SigningKey
from apilane.node_loader import settings as loader_settings
from apilane.node_loader.memmaps import MemoryNatMaps, render_resolved
from apilane.node_loader.plan import check_invariants
from apilane.node_loader.service import DataPlane, NodeLoader
from apilane.node_loader.statefile import PersistedState, StateFile
from apilane.node_loader.testing import RecordedPrograms, contents_of, running
from apilane.runtime.bus import Bus
from apilane.runtime.natsauth import Role
from apilane.testing.loaders import loader_env
from apilane.testing.nats import NatsServer
from apilane.testing.nats_fixtures import ConnectAs
from apilane.testing.sealing import (
    control_request,
    put_sealed,
    seal,
    seal_payload,
    trusted_env,
)
from apilane.testing.snapshots import make_snapshot
from apilane.testing.waiting import until

pytestmark = [pytest.mark.integration, pytest.mark.nats]

CLUSTER = "default"
NODE = "node-a.example"
HA3 = ("10.0.0.1:6443", "10.0.0.2:6443", "10.0.0.3:6443")
OPERATOR = SigningKey.generate()


class Harness:
    def __init__(self, nats_server: NatsServer, tmp_path: Path) -> None:
        self.nats_server = nats_server
        # This node's own identity: it may write only its own node-state key.
        self.env = loader_env(
            nats_server.env(Role.NODE_LOADER, CLUSTER, NODE),
            cluster=CLUSTER,
            node=NODE,
            workdir=tmp_path,
            **trusted_env(OPERATOR, name="APILANE_OPERATOR_KEYS"),
        )
        self.settings = loader_settings.load(self.env)
        self.maps = MemoryNatMaps()  # survives loader restarts, like pinned maps
        self.exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.tracer = provider.get_tracer("test")
        self.loader: NodeLoader | None = None
        self.registry = CollectorRegistry()

    def running(self, programs=None) -> contextlib.AbstractAsyncContextManager[NodeLoader]:
        self.registry = CollectorRegistry()
        self.loader = NodeLoader(
            settings=self.settings,
            data_plane=DataPlane(maps=self.maps, programs=programs),
            registry=self.registry,
            tracer=self.tracer,
        )
        return running(self.loader)

    def configure(self, **env: str) -> None:
        """Change APILANE_* variables for the next start (a DaemonSet edit); another node
        name comes with that node's NATS identity."""
        self.env.update(env)
        if "APILANE_NODE_NAME" in env:
            node = env["APILANE_NODE_NAME"]
            self.env.update(self.nats_server.env(Role.NODE_LOADER, CLUSTER, node))
        self.settings = loader_settings.load(self.env)

    def persisted(self) -> PersistedState | None:
        return StateFile(self.settings.state_file).load()

    def resolved(self) -> list[str]:
        return render_resolved(contents_of(self.maps))

    def metric(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0


async def node_state(bus: Bus) -> NodeState | None:
    entry = await bus.kv_get(subjects.NODE_STATE_BUCKET, subjects.node_state_key(CLUSTER, NODE))
    if entry is None:
        return None
    decoded = events.decode(entry.value)
    assert isinstance(decoded, NodeState)
    return decoded


async def wait_node_generation(bus: Bus, generation: int) -> NodeState:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        state = await node_state(bus)
        if state is not None and state.generation == generation:
            return state
        await asyncio.sleep(0.05)
    raise AssertionError(
        f"NodeState never reached generation {generation}: {await node_state(bus)}"
    )


async def put(discovery: Bus, snapshot) -> int:
    """Publish a snapshot as discovery does: sealed by the trusted key, as its identity."""
    return await put_sealed(discovery, seal(snapshot), cluster=CLUSTER)


async def control(bus: Bus, enabled: bool, *, node: str = NODE) -> bytes:
    """An operator's signed request to switch the connect-time LB, as the CLI sends it."""
    request = control_request(node=node, connect_time_lb=enabled, cluster=CLUSTER, key=OPERATOR)
    return await bus.request(subjects.node_control_subject(CLUSTER, node), request, timeout=5)


async def warnings(bus: Bus) -> list[ClusterWarning]:
    subject = subjects.warnings_subject(CLUSTER)
    sub = await bus.js.subscribe(subject, ordered_consumer=True)
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
def harness(nats_server, tmp_path) -> Harness:
    return Harness(nats_server, tmp_path)


@pytest.fixture
async def discovery(bus: Bus, connect_as: ConnectAs) -> Bus:
    """The writer of snapshots: discovery's identity (`bus`, the operator, observes and
    sends control requests)."""
    return await connect_as(Role.DISCOVERY, CLUSTER)


async def test_latest_value_is_applied_at_start_then_every_new_one(bus, discovery, harness):
    await put(discovery, make_snapshot(generation=1))
    async with harness.running() as loader:
        assert harness.resolved() == ["IPv4 10.96.0.1:443/6 -> [10.0.0.1:6443]"]
        ok, checks = loader.health.ready()
        assert ok, checks
        assert loader.health.live()[0]
        state = await wait_node_generation(bus, 1)
        assert state.maps.frontends == 1 and state.maps.backends == 1
        assert state.programs_attached == () and state.last_error == ""

        await put(discovery, make_snapshot(generation=2, apiservers=HA3))
        await until(lambda: len(harness.resolved()[0].split(",")) == 3, what="three backends")
        assert harness.resolved() == [
            "IPv4 10.96.0.1:443/6 -> [10.0.0.1:6443, 10.0.0.2:6443, 10.0.0.3:6443]"
        ]
        assert check_invariants(contents_of(harness.maps)) == []
        state = await wait_node_generation(bus, 2)
        assert state.applied_at is not None
        assert harness.metric("apilane_node_applies_total", outcome="applied") == 2
        assert harness.metric("apilane_node_programming_latency_seconds_count") == 2


async def test_without_any_snapshot_the_loader_is_ready_and_waits(bus, discovery, harness):
    async with harness.running() as loader:
        assert loader.health.ready()[0]
        assert (await wait_node_generation(bus, 0)).maps.frontends == 0
        await put(discovery, make_snapshot(generation=7))
        await wait_node_generation(bus, 7)
        assert harness.resolved() == ["IPv4 10.96.0.1:443/6 -> [10.0.0.1:6443]"]


async def test_an_old_generation_replayed_is_ignored(bus, discovery, harness):
    async with harness.running():
        await put(discovery, make_snapshot(generation=5, apiservers=HA3))
        await wait_node_generation(bus, 5)
        before = harness.resolved()
        await put(discovery, make_snapshot(generation=4, apiservers=("10.0.0.9:6443",)))
        await until(
            lambda: harness.metric("apilane_node_snapshots_ignored_total") == 1, what="ignored"
        )
        assert harness.resolved() == before
        assert (await node_state(bus)).generation == 5
        assert harness.metric("apilane_node_snapshots_refused_total", reason="rollback") == 1


async def test_invalid_empty_and_malformed_snapshots_leave_the_maps_and_warn(
    bus, discovery, harness
):
    async with harness.running():
        await put(discovery, make_snapshot(generation=1, apiservers=HA3))
        await wait_node_generation(bus, 1)
        before, ops = harness.resolved(), harness.maps.operations

        await put(discovery, make_snapshot(generation=2, apiservers=()))
        # Validly signed but invalid for this node (the digest is checked when the envelope
        # is opened: a bad one is a refused signature, see test_signed_nats.py).
        await put(discovery, make_snapshot(generation=3, cluster="elsewhere"))
        await put_sealed(discovery, seal_payload(b'{"truncated', generation=4), cluster=CLUSTER)
        await until(
            lambda: (
                harness.metric("apilane_node_applies_total", outcome="malformed") == 1
                and harness.metric("apilane_node_applies_total", outcome="rejected") == 2
            ),
            what="three refusals",
        )
        assert harness.resolved() == before
        assert harness.maps.operations == ops
        state = await node_state(bus)
        assert state.generation == 1
        assert "generation 3 rejected" in state.last_error

        reasons = sorted((w.reason, w.generation, w.source) for w in await warnings(bus))
        assert reasons == [
            ("InvalidSnapshot", 0, f"node-loader/{NODE}"),
            ("InvalidSnapshot", 3, f"node-loader/{NODE}"),
            ("NoReadyEndpoints", 2, f"node-loader/{NODE}"),
        ]
        # The next good snapshot is applied and clears the error.
        await put(discovery, make_snapshot(generation=4))
        assert (await wait_node_generation(bus, 4)).last_error == ""


async def test_a_restarted_loader_resumes_from_its_state_file(bus, discovery, harness):
    async with harness.running():
        await put(
            discovery,
            make_snapshot(
                generation=3, services=("10.96.0.1:443", "10.96.0.2:443"), apiservers=HA3
            ),
        )
        await wait_node_generation(bus, 3)
    before, ops = harness.resolved(), harness.maps.operations
    ids = sorted(v.service_id for v in contents_of(harness.maps)["IPv4"].frontends.values())

    async with harness.running() as loader:
        assert loader.reconciler.applied_generation == 3
        # The same KV value again: ignored, not re-written.
        await until(
            lambda: harness.metric("apilane_node_snapshots_ignored_total") == 1, what="ignored"
        )
        assert harness.maps.operations == ops
        assert harness.resolved() == before
        assert (
            sorted(v.service_id for v in contents_of(harness.maps)["IPv4"].frontends.values())
            == ids
        )
        await put(
            discovery, make_snapshot(generation=4, services=("10.96.0.1:443", "10.96.0.2:443"))
        )
        await wait_node_generation(bus, 4)
        assert check_invariants(contents_of(harness.maps)) == []


async def test_a_restart_while_nats_is_down_keeps_and_repairs_the_maps(
    nats_server, bus, discovery, harness
):
    async with harness.running():
        await put(discovery, make_snapshot(generation=2, apiservers=HA3))
        await wait_node_generation(bus, 2)
    expected = harness.resolved()
    harness.maps.clear()  # a reboot, or a crash that left the maps empty
    nats_server.stop()
    try:
        stopping = asyncio.Event()
        loader = NodeLoader(
            settings=harness.settings,
            data_plane=DataPlane(maps=harness.maps),
            registry=CollectorRegistry(),
        )
        task = asyncio.create_task(loader.run(stopping))
        await until(lambda: loader.maps_loaded, what="maps recovered")
        assert harness.resolved() == expected  # from the state file, without NATS
        assert not loader.health.ready()[0]  # no first reconcile from NATS yet
        stopping.set()
        await asyncio.wait_for(task, timeout=10)
    finally:
        nats_server.start()


async def test_nats_restart_keeps_the_data_plane_and_the_loader_catches_up(nats_server, harness):
    publisher = await nats_server.connect(Role.DISCOVERY, CLUSTER, name="publisher")
    await publisher.create_streams()
    observer = await nats_server.connect(Role.OPERATOR, CLUSTER, name="observer")
    try:
        async with harness.running():
            await put(publisher, make_snapshot(generation=1, apiservers=HA3))
            await wait_node_generation(observer, 1)
            before = harness.resolved()

            nats_server.stop()
            await asyncio.sleep(1.5)
            assert harness.resolved() == before  # NATS down: the maps stay as they are
            nats_server.start()

            await until(lambda: publisher.connected, what="publisher reconnected")
            await put(publisher, make_snapshot(generation=2, apiservers=("10.0.0.4:6443",)))
            await until(
                lambda: harness.resolved() == ["IPv4 10.96.0.1:443/6 -> [10.0.0.4:6443]"],
                what="catch-up after the NATS restart",
                timeout=30,
            )
            await wait_node_generation(observer, 2)
    finally:
        await publisher.drain()
        await observer.drain()


async def test_one_trace_from_the_publisher_through_apply_to_the_map_writes(
    bus, discovery, harness
):
    async with harness.running():
        with harness.tracer.start_as_current_span("discovery publish") as producer:
            await put(discovery, make_snapshot(generation=1, apiservers=HA3))
        await until(
            lambda: any(
                s.name == "map writes" and s.attributes.get("entries_written")
                for s in harness.exporter.get_finished_spans()
            ),
            what="map writes span",
        )
    spans = {
        s.name: s
        for s in harness.exporter.get_finished_spans()
        if s.context.trace_id == producer.get_span_context().trace_id
    }
    consume, apply, writes = spans["node-loader consume"], spans["apply"], spans["map writes"]
    assert consume.parent.span_id == producer.get_span_context().span_id
    assert consume.kind.name == "CONSUMER"
    assert apply.parent.span_id == consume.context.span_id
    assert writes.parent.span_id == apply.context.span_id
    assert writes.attributes["entries_written"] == 4
    assert consume.attributes["apilane.generation"] == 1


async def test_the_control_subject_switches_the_connect_time_lb_and_keeps_the_maps(
    bus, discovery, harness
):
    programs = RecordedPrograms()
    await put(discovery, make_snapshot(generation=1))
    async with harness.running(programs=programs) as loader:
        before = harness.resolved()
        subject = subjects.node_control_subject(CLUSTER, NODE)
        reply = await control(bus, False)
        state = events.decode(reply)
        assert isinstance(state, NodeState)
        assert state.connect_time_lb is False and state.programs_attached == ()
        assert harness.resolved() == before
        assert loader.health.ready()[0]

        reply = await control(bus, True)
        assert events.decode(reply).programs_attached == (
            "apilane_connect4",
            "apilane_connect6",
        )
        reply = await bus.request(subject, b"not json", timeout=5)
        assert b"bad control request" in reply
    # Stopping the loader never detaches: the data plane outlives the process.
    assert programs.calls == ["enable", "disable", "enable", "close"]


async def wait_node_state(bus: Bus, check: Callable[[NodeState], bool]) -> NodeState:
    """The NodeState the running loader writes (it replaces the last one written before)."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        state = await node_state(bus)
        if state is not None and check(state):
            return state
        await asyncio.sleep(0.05)
    raise AssertionError(f"NodeState never matched: {await node_state(bus)}")


async def switch_lb(bus: Bus, enabled: bool) -> NodeState:
    reply = events.decode(await control(bus, enabled))
    assert isinstance(reply, NodeState)
    assert reply.connect_time_lb is enabled and reply.last_error == "", reply
    return reply


async def test_a_live_switch_holds_across_restarts_until_switched_back(
    bus, discovery, harness, caplog
):
    caplog.set_level(logging.INFO, logger="apilane.node_loader.control")
    # Switched off before any snapshot was applied: the state file keeps the switch alone.
    async with harness.running(programs=RecordedPrograms()):
        await switch_lb(bus, False)
    recorded = harness.persisted()
    assert recorded is not None and recorded.applied is None
    assert recorded.lb_switch is not None and recorded.lb_switch.enabled is False
    assert recorded.lb_switch.env_value is True

    programs = RecordedPrograms()
    caplog.clear()
    async with harness.running(programs=programs) as loader:
        assert programs.calls == ["disable"]  # never attached, not even for a moment
        assert loader.connect_time_lb is False
        reported = loader.node_state()
        assert reported.connect_time_lb is False and reported.programs_attached == ()
        # A snapshot applied now is saved together with the switch.
        await put(discovery, make_snapshot(generation=1, apiservers=HA3))
        await wait_node_generation(bus, 1)
    [decided] = [r for r in caplog.records if r.msg.startswith("connect-time load balancer")]
    assert decided.getMessage() == "connect-time load balancer off (live switch)"
    assert "until the variable changes or the LB is switched back" in decided.rule
    recorded = harness.persisted()
    assert recorded is not None and recorded.generation == 1
    assert recorded.lb_switch is not None and recorded.lb_switch.enabled is False
    maps = harness.resolved()

    programs = RecordedPrograms()
    async with harness.running(programs=programs) as loader:
        assert programs.calls == ["disable"] and loader.reconciler.applied_generation == 1
        assert harness.resolved() == maps  # the maps are untouched by any of it
        # Switched back to what APILANE_CONNECT_TIME_LB says: the record is cleared.
        state = await switch_lb(bus, True)
        assert state.programs_attached == ("apilane_connect4", "apilane_connect6")
    recorded = harness.persisted()
    assert recorded is not None and recorded.lb_switch is None and recorded.generation == 1

    programs = RecordedPrograms()
    async with harness.running(programs=programs) as loader:
        assert programs.calls == ["enable"] and loader.connect_time_lb is True


async def test_a_changed_variable_wins_over_an_earlier_live_switch(bus, discovery, harness, caplog):
    caplog.set_level(logging.INFO, logger="apilane.node_loader.control")
    await put(discovery, make_snapshot(generation=1))
    async with harness.running(programs=RecordedPrograms()):
        await switch_lb(bus, False)

    # The operator then edits the DaemonSet: APILANE_CONNECT_TIME_LB=false. The variable is
    # the newer decision; the switch record is dropped.
    harness.configure(APILANE_CONNECT_TIME_LB="false")
    programs = RecordedPrograms()
    caplog.clear()
    async with harness.running(programs=programs) as loader:
        assert programs.calls == ["disable"] and loader.connect_time_lb is False
    [decided] = [r for r in caplog.records if r.msg.startswith("connect-time load balancer")]
    assert decided.getMessage() == "connect-time load balancer off (env)"
    assert "APILANE_CONNECT_TIME_LB changed from on to off" in decided.rule
    recorded = harness.persisted()
    assert recorded is not None and recorded.lb_switch is None and recorded.generation == 1

    # And back to true: the old switch does not come back to life.
    harness.configure(APILANE_CONNECT_TIME_LB="true")
    programs = RecordedPrograms()
    async with harness.running(programs=programs) as loader:
        assert programs.calls == ["enable"] and loader.connect_time_lb is True
        await wait_node_state(bus, lambda s: s.connect_time_lb and bool(s.programs_attached))


async def test_a_node_name_of_253_characters_works_for_state_and_control(bus, discovery, harness):
    """Kubernetes allows node names of 253 characters: the KV key, the control subject and
    the state file all take one."""
    longest = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])
    harness.configure(APILANE_NODE_NAME=longest)
    await put(discovery, make_snapshot(generation=3))
    async with harness.running(programs=RecordedPrograms()) as loader:
        key = subjects.node_state_key(CLUSTER, longest)
        deadline = time.monotonic() + 15
        entry = None
        while entry is None and time.monotonic() < deadline:
            entry = await bus.kv_get(subjects.NODE_STATE_BUCKET, key)
            await asyncio.sleep(0.05)
        assert entry is not None, "no NodeState under the long node name"
        state = events.decode(entry.value)
        assert isinstance(state, NodeState) and state.node == longest and state.generation == 3
        reply = await control(bus, False, node=longest)
        assert events.decode(reply).connect_time_lb is False
        assert loader.connect_time_lb is False
    assert harness.persisted() is not None and harness.persisted().generation == 3
