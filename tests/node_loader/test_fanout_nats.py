"""The two snapshot fan-outs (feed.py) against a real nats-server: the KV watch and the
stream's republished copies. Both go through the same intake (signature, generation, fail
static); what differs is what the server holds per loader and how a loader catches up."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from nats.js.api import KeyValueConfig
from prometheus_client import CollectorRegistry

from apilane.model import subjects
from apilane.node_loader import settings as loader_settings
from apilane.node_loader.feed import RepublishFeed
from apilane.node_loader.memmaps import MemoryNatMaps
from apilane.node_loader.service import DataPlane, NodeLoader
from apilane.runtime.bus import Bus, KvEntry
from apilane.runtime.natsauth import Identity, Role
from apilane.testing.loaders import loader_env
from apilane.testing.nats import NatsServer
from apilane.testing.sealing import put_sealed, seal
from apilane.testing.snapshots import make_snapshot
from apilane.testing.waiting import until

pytestmark = [pytest.mark.integration, pytest.mark.nats]

CLUSTER = "default"
SNAPSHOTS = f"KV_{subjects.SNAPSHOT_BUCKET}"


@contextlib.asynccontextmanager
async def loaders(
    server: NatsServer, tmp_path: Path, *, count: int, fanout: str
) -> AsyncIterator[list[NodeLoader]]:
    nodes = [f"node-{i}" for i in range(count)]
    if server.identities.add_all(
        [Identity(role=Role.NODE_LOADER, cluster=CLUSTER, node=n) for n in nodes]
    ):
        server.reload()
    started = []
    for node in nodes:
        env = loader_env(
            server.env(Role.NODE_LOADER, CLUSTER, node),
            cluster=CLUSTER,
            node=node,
            workdir=tmp_path,
            heartbeat="30s",
            APILANE_BPF_PIN_DIR=f"/test/{node}",
            APILANE_SNAPSHOT_FANOUT=fanout,
        )
        started.append(
            NodeLoader(
                settings=loader_settings.load(env),
                data_plane=DataPlane(maps=MemoryNatMaps()),
                registry=CollectorRegistry(),
            )
        )
    stopping = asyncio.Event()
    tasks = [asyncio.create_task(loader.run(stopping)) for loader in started]
    try:
        await until(lambda: all(x.first_reconcile_done for x in started), what="first reconciles")
        yield started
    finally:
        stopping.set()
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=30)


def generation_everywhere(fleet: list[NodeLoader], generation: int) -> Callable[[], bool]:
    return lambda: all(x.reconciler.applied_generation == generation for x in fleet)


async def consumers(bus: Bus) -> int:
    return int((await bus.js.stream_info(SNAPSHOTS)).state.consumer_count)


async def put(bus: Bus, generation: int) -> int:
    apiserver = f"10.0.0.{generation % 200 + 1}:6443"
    return await put_sealed(
        bus, seal(make_snapshot(generation=generation, apiservers=(apiserver,)))
    )


async def settled_consumers(bus: Bus, expected: int, *, within: float) -> int:
    """The consumer count once it stops changing at `expected`, or the last one seen."""
    deadline = time.monotonic() + within
    count = await consumers(bus)
    while count != expected and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        count = await consumers(bus)
    return count


@pytest.mark.parametrize("fanout", ["watch", "republish"])
async def test_after_a_nats_restart_every_loader_catches_up_and_no_consumer_leaks(
    nats_server: NatsServer, tmp_path: Path, fanout: str
) -> None:
    discovery = await nats_server.connect(Role.DISCOVERY, CLUSTER, name="discovery")
    await discovery.create_streams()
    await put(discovery, 1)
    try:
        async with loaders(nats_server, tmp_path, count=20, fanout=fanout) as fleet:
            await put(discovery, 2)
            await until(generation_everywhere(fleet, 2), what="generation 2 everywhere")
            steady = await consumers(discovery)
            # One ordered consumer per loader for the watch; none for the republished copies.
            assert steady == (20 if fanout == "watch" else 0)

            await asyncio.to_thread(nats_server.restart)
            await until(lambda: discovery.connected, what="discovery reconnected")
            await put(discovery, 3)
            await until(
                generation_everywhere(fleet, 3), what="generation 3 after the restart", timeout=40
            )
            # Consumers lost with the server and recreated: back to the steady count (the
            # ordered consumers of before the restart are gone after their inactivity limit).
            assert await settled_consumers(discovery, steady, within=30) == steady
    finally:
        await discovery.drain()


async def test_a_loader_on_republished_copies_refuses_an_unsigned_value_and_keeps_its_maps(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    discovery = await nats_server.connect(Role.DISCOVERY, CLUSTER, name="discovery")
    await discovery.create_streams()
    await put(discovery, 1)
    try:
        async with loaders(nats_server, tmp_path, count=1, fanout="republish") as [loader]:
            held = loader.reconciler.applied_digest
            await put_sealed(discovery, b'{"generation": 9}')  # not signed
            await until(lambda: bool(loader.intake.refusal), what="the refusal")
            assert loader.reconciler.applied_generation == 1
            assert loader.reconciler.applied_digest == held
            await put(discovery, 2)
            await until(generation_everywhere([loader], 2), what="generation 2")
    finally:
        await discovery.drain()


async def test_republished_copies_chain_per_key_so_other_keys_cause_no_resync(
    nats_server: NatsServer,
) -> None:
    """`Nats-Last-Sequence` on a copy is the previous revision of the same key: writes to
    another cluster's key in between are no gap."""
    ours = await nats_server.connect(Role.DISCOVERY, "east", name="east")
    await ours.create_streams()
    theirs = await nats_server.connect(Role.DISCOVERY, "west", name="west")
    reader = await nats_server.connect(Role.NODE_LOADER, "east", "node-a", name="reader")
    feed = RepublishFeed(
        reader,
        subjects.SNAPSHOT_BUCKET,
        subjects.snapshot_key("east"),
        subjects.snapshot_republish_subject("east"),
    )
    seen: list[KvEntry] = []

    async def follow() -> None:
        async for entry in feed.entries():
            seen.append(entry)

    task = asyncio.create_task(follow())
    try:
        first = await put_sealed(ours, b"east-1", cluster="east")
        await until(lambda: len(seen) == 1, what="the first value")
        await put_sealed(theirs, b"west-1", cluster="west")
        await put_sealed(theirs, b"west-2", cluster="west")
        second = await put_sealed(ours, b"east-2", cluster="east")
        await until(lambda: len(seen) == 2, what="the second value")
        assert [(e.revision, e.value) for e in seen] == [(first, b"east-1"), (second, b"east-2")]
        assert feed.resyncs <= 1  # the read at start (which may see the first value) only
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        for bus in (ours, theirs, reader):
            await bus.drain()


async def test_republish_falls_back_to_the_watch_on_a_bucket_made_without_republish(
    nats_server: NatsServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An older provisioner made the bucket: no copies to follow, so the watch it is."""
    discovery = await nats_server.connect(Role.DISCOVERY, CLUSTER, name="discovery")
    await discovery.create_streams()
    # ...and an older discovery, not yet upgraded, put the bucket back the way it made it.
    info = await discovery.js.stream_info(SNAPSHOTS)
    await discovery.js.update_stream(dataclasses.replace(info.config, republish=None))
    assert await discovery.kv_republish(subjects.SNAPSHOT_BUCKET) is None
    await put(discovery, 1)
    try:
        async with loaders(nats_server, tmp_path, count=1, fanout="republish") as fleet:
            await put(discovery, 2)
            await until(generation_everywhere(fleet, 2), what="generation 2 by the watch")
            assert await consumers(discovery) == 1
        assert "does not republish its values" in caplog.text
    finally:
        await discovery.drain()


async def test_create_streams_converges_buckets_an_older_apilane_made_and_keeps_their_values(
    nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    """An upgrade takes today's bucket settings (republish, history, a node-state max age)
    without losing what the buckets hold."""
    caplog.set_level(logging.INFO, logger="apilane.runtime.bus")
    discovery = await nats_server.connect(Role.DISCOVERY, CLUSTER, name="discovery")
    try:
        await discovery.js.create_key_value(
            KeyValueConfig(bucket=subjects.SNAPSHOT_BUCKET, history=1, direct=False)
        )
        await discovery.js.create_key_value(KeyValueConfig(bucket=subjects.NODE_STATE_BUCKET))
        revision = await put(discovery, 7)
        await discovery.create_streams()
        snapshots = (await discovery.js.stream_info(SNAPSHOTS)).config
        nodes = (await discovery.js.stream_info(f"KV_{subjects.NODE_STATE_BUCKET}")).config
        assert await discovery.kv_republish(subjects.SNAPSHOT_BUCKET) is not None
        assert snapshots.max_msgs_per_subject == subjects.SNAPSHOT_HISTORY
        assert snapshots.allow_direct is True
        assert nodes.max_age == subjects.NODE_STATE_MAX_AGE
        kept = await discovery.js.get_msg(SNAPSHOTS, seq=revision)
        assert kept.data
        assert "converging a bucket's settings" in caplog.text
        # Converged once: a second call finds nothing to change and sends no update.
        caplog.clear()
        await discovery.create_streams()
        assert "converging a bucket's settings" not in caplog.text
    finally:
        await discovery.drain()
