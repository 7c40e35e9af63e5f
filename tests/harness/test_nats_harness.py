"""The nats-server fixture talks to a real JetStream server, survives restarts, and clusters."""

from __future__ import annotations

import asyncio

import nats
import pytest

from apilane.model import events, subjects
from apilane.runtime.bus import Bus
from apilane.testing.nats import NatsCluster, NatsServer

pytestmark = [pytest.mark.integration, pytest.mark.nats]


def _warning(n: int) -> events.ClusterWarning:
    return events.ClusterWarning(
        cluster="c1", reason="NoReadyEndpoints", message=f"m{n}", source="test"
    )


async def test_jetstream_publish_then_consume_with_a_durable(bus: Bus) -> None:
    for n in range(3):
        await bus.publish(subjects.warnings_subject("c1"), _warning(n))
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


async def test_message_id_deduplicates_a_repeated_publish(bus: Bus) -> None:
    first = await bus.publish(subjects.warnings_subject("c1"), _warning(1), msg_id="same")
    second = await bus.publish(subjects.warnings_subject("c1"), _warning(1), msg_id="same")
    assert first == second
    info = await bus.js.stream_info(subjects.EVENTS_STREAM)
    assert info.state.messages == 1


async def test_kv_watch_yields_the_current_value_first_then_updates(bus: Bus) -> None:
    await bus.kv_put(subjects.SNAPSHOT_BUCKET, "c1", _warning(1))
    await bus.kv_put(subjects.SNAPSHOT_BUCKET, "c1", _warning(2))
    seen: list[str] = []

    async def watch() -> None:
        async for entry in bus.watch_kv(subjects.SNAPSHOT_BUCKET, "c1"):
            warning = events.decode(entry.value)
            assert isinstance(warning, events.ClusterWarning)
            seen.append(warning.message)
            if len(seen) == 2:
                return

    task = asyncio.create_task(watch())
    await asyncio.sleep(0.3)
    assert seen == ["m2"], "only the latest value comes first, not the history"
    await bus.kv_put(subjects.SNAPSHOT_BUCKET, "c1", _warning(3))
    await asyncio.wait_for(task, 5)
    assert seen == ["m2", "m3"]


async def test_kv_compare_and_set_rejects_a_stale_revision(bus: Bus) -> None:
    from apilane.runtime.bus import RevisionMismatch

    rev = await bus.kv_put(subjects.SNAPSHOT_BUCKET, "c2", _warning(1), expected_revision=0)
    with pytest.raises(RevisionMismatch):
        await bus.kv_put(subjects.SNAPSHOT_BUCKET, "c2", _warning(2), expected_revision=0)
    rev2 = await bus.kv_put(subjects.SNAPSHOT_BUCKET, "c2", _warning(2), expected_revision=rev)
    assert rev2 > rev
    entry = await bus.kv_get(subjects.SNAPSHOT_BUCKET, "c2")
    assert entry is not None and entry.revision == rev2


async def test_a_deleted_key_reads_as_absent_but_keeps_its_revision_for_cas(bus: Bus) -> None:
    from apilane.runtime.bus import RevisionMismatch

    await bus.kv_put(subjects.SNAPSHOT_BUCKET, "c4", _warning(1))
    kv = await bus.js.key_value(subjects.SNAPSHOT_BUCKET)
    await kv.delete("c4")
    assert await bus.kv_get(subjects.SNAPSHOT_BUCKET, "c4") is None
    marker = await bus.kv_get(subjects.SNAPSHOT_BUCKET, "c4", include_deleted=True)
    assert marker is not None and marker.operation == "DEL"
    with pytest.raises(RevisionMismatch):
        await bus.kv_put(subjects.SNAPSHOT_BUCKET, "c4", _warning(2), expected_revision=0)
    await bus.kv_put(subjects.SNAPSHOT_BUCKET, "c4", _warning(2), expected_revision=marker.revision)


async def test_kv_keys_lists_the_matching_keys_without_creating_a_consumer(bus: Bus) -> None:
    from apilane.runtime.bus import BusError

    for key in ("east.node-b", "east.node-a", "west.node-a"):
        await bus.kv_put(subjects.NODE_STATE_BUCKET, key, _warning(1))
    await bus.kv_put(subjects.NODE_STATE_BUCKET, "east.node-a", _warning(2))  # one key, twice
    stream = f"KV_{subjects.NODE_STATE_BUCKET}"
    consumers_before = (await bus.js.stream_info(stream)).state.consumer_count

    assert await bus.kv_keys(subjects.NODE_STATE_BUCKET, "east.>") == [
        "east.node-a",
        "east.node-b",
    ]
    assert await bus.kv_keys(subjects.NODE_STATE_BUCKET) == [
        "east.node-a",
        "east.node-b",
        "west.node-a",
    ]
    assert await bus.kv_keys(subjects.NODE_STATE_BUCKET, "north.>") == []
    assert (await bus.js.stream_info(stream)).state.consumer_count == consumers_before
    with pytest.raises(BusError, match="does not exist"):
        await bus.kv_keys("apilane_no_such_bucket")


async def test_requests_are_answered_and_a_failing_handler_answers_an_error(bus: Bus) -> None:
    from apilane.runtime.bus import BusError

    async def handler(payload: bytes) -> bytes:
        if payload == b"boom":
            raise ValueError("no")
        return payload.upper()

    await bus.serve_requests("apilane.test.echo", handler)
    assert await bus.request("apilane.test.echo", b"hi") == b"HI"
    assert b"ValueError: no" in await bus.request("apilane.test.echo", b"boom")
    assert await bus.request("apilane.test.echo", b"again") == b"AGAIN"
    with pytest.raises(BusError):
        await bus.request("apilane.test.nobody", b"x", timeout=0.5)


async def test_kv_watch_catches_up_after_a_server_restart(nats_server: NatsServer) -> None:
    bus = await Bus.connect([nats_server.url], name="t", initial_attempt_deadline=5)
    await bus.ensure_streams()
    await bus.kv_put(subjects.SNAPSHOT_BUCKET, "c3", _warning(1))
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
    writer = await Bus.connect([nats_server.url], name="writer", initial_attempt_deadline=10)
    await writer.kv_put(subjects.SNAPSHOT_BUCKET, "c3", _warning(2))
    await asyncio.wait_for(got_two.wait(), 20)
    await task
    assert seen == ["m1", "m2"]
    await writer.drain()
    await bus.drain()


async def test_connect_waits_for_a_server_that_starts_late(nats_server: NatsServer) -> None:
    nats_server.stop()
    connecting = asyncio.create_task(
        Bus.connect([nats_server.url], name="late", initial_attempt_deadline=15)
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
            nc = await nats.connect(cluster.urls)
            js = nc.jetstream()
            await js.add_stream(name="CLUSTERED", subjects=["clustered.>"], num_replicas=3)
            ack = await js.publish("clustered.x", b"1")
            await nc.drain()
            return int(ack.seq)

        assert asyncio.run(check()) == 1
