"""Where the snapshot key's values come from: a KV watch, or the stream's republished copies.

Two fan-outs of the same KV values, chosen by APILANE_SNAPSHOT_FANOUT (settings.py); both
yield `KvEntry`s that go through the same intake (admission: signature, generation; fail
static), so what reaches the maps does not depend on the choice.

- `watch`: one ordered JetStream consumer per loader (`Bus.watch_kv`). The
  server keeps a consumer per node, and every loader recreates its consumer after a
  server restart.
- `republish` (the default, docs/benchmarks.md "fan-out"): the snapshot stream republishes each new value onto a core subject
  (`subjects.snapshot_republish_subject`, JetStream RePublish on the KV stream); the loader
  subscribes to it and reads the key directly (a direct get, answered by any replica) at
  start, after each reconnect (jittered, so thousands of loaders do not ask at once), on a
  sequence gap (a republished copy whose `Nats-Last-Sequence` is not the revision held:
  one was missed), and every `resync_interval` (30 s) as a backstop. No consumer on the server.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from apilane.model import subjects
from apilane.runtime.aio import Backoff
from apilane.runtime.bus import (
    Bus,
    BusError,
    CoreMessage,
    CoreSubscription,
    KvEntry,
    PermissionDenied,
)

log = logging.getLogger(__name__)


class Step(enum.StrEnum):
    TAKE = "take"  # the next value after the one held: hand it on
    SKIP = "skip"  # at or below the held revision: a repeat
    RESYNC = "resync"  # a value was missed: read the key


@dataclass(frozen=True, slots=True)
class Republished:
    """What the republish headers say of one copy: its stream sequence (the KV revision)
    and the sequence of the previous value of the same key (0: none)."""

    revision: int
    previous: int


def next_step(held: int, copy: Republished) -> Step:
    """The pure core of the republish feed: what to do with a copy, holding `held`."""
    if copy.revision <= held:
        return Step.SKIP
    if copy.previous == held:
        return Step.TAKE
    return Step.RESYNC


def republished(msg: CoreMessage) -> Republished | None:
    """The sequences in a republished copy's headers; None when they are missing."""
    headers = msg.headers
    try:
        return Republished(
            revision=int(headers["Nats-Sequence"]),
            previous=int(headers.get("Nats-Last-Sequence", "0")),
        )
    except (KeyError, ValueError):
        return None


def entry_of(bucket: str, key: str, msg: CoreMessage, copy: Republished) -> KvEntry:
    headers = dict(msg.headers)
    return KvEntry(
        bucket=bucket,
        key=key,
        value=msg.data,
        revision=copy.revision,
        headers=headers,
        operation=headers.get("KV-Operation", "PUT"),
    )


class RepublishFeed:
    """The `republish` fan-out of one KV key (see the module docstring)."""

    def __init__(
        self,
        bus: Bus,
        bucket: str,
        key: str,
        subject: str,
        *,
        reconnect_jitter: float = 2.0,
        resync_interval: float = 30.0,
    ) -> None:
        self.bus = bus
        self.bucket = bucket
        self.key = key
        self.subject = subject
        self.reconnect_jitter = reconnect_jitter
        self.resync_interval = resync_interval
        self.held = 0  # the revision last handed on
        self.resyncs = 0  # direct reads, after the first one
        self._resync_due = asyncio.Event()

    def _reconnected(self) -> None:
        self._resync_due.set()

    async def entries(
        self, *, start_after: int = 0, subscription: CoreSubscription | None = None
    ) -> AsyncIterator[KvEntry]:
        """Every new value of the key after revision `start_after`, for as long as it runs
        (on `subscription` to the subject, when the caller made it already)."""
        self.held = start_after
        subscription = subscription or await self.bus.subscribe(self.subject)
        forget = self.bus.on_reconnect(self._reconnected)
        try:
            # Subscribed first, then read: nothing written in between is missed.
            async for entry in self._read():
                yield entry
            async for entry in self._follow(subscription):
                yield entry
        finally:
            forget()
            await subscription.unsubscribe()

    async def _follow(self, subscription: CoreSubscription) -> AsyncIterator[KvEntry]:
        next_backstop = time.monotonic() + self.resync_interval
        while True:
            if self._resync_due.is_set():
                self._resync_due.clear()
                # After a reconnect every loader asks at once otherwise: spread them out.
                await asyncio.sleep(random.uniform(0, self.reconnect_jitter))
                async for entry in self._read():
                    yield entry
            if time.monotonic() >= next_backstop:
                next_backstop = time.monotonic() + self.resync_interval
                async for entry in self._read():
                    yield entry
            msg = await subscription.next(timeout=1.0)
            if msg is None:
                continue
            copy = republished(msg)
            if copy is None:
                log.warning(
                    "republished snapshot without its sequences", extra={"subject": msg.subject}
                )
                continue
            step = next_step(self.held, copy)
            if step is Step.TAKE:
                self.held = copy.revision
                yield entry_of(self.bucket, self.key, msg, copy)
            elif step is Step.RESYNC:
                log.info(
                    "a snapshot revision was missed, reading the key",
                    extra={"held": self.held, "revision": copy.revision, "previous": copy.previous},
                )
                async for entry in self._read():
                    yield entry

    async def _read(self) -> AsyncIterator[KvEntry]:
        """The key's latest value, if newer than the one held; retried until read."""
        backoff = Backoff(initial=0.2, maximum=5.0)
        while True:
            try:
                entry = await self.bus.kv_get(
                    self.bucket, self.key, include_deleted=True, direct=True
                )
                break
            except (BusError, OSError, TimeoutError) as exc:
                log.info("cannot read the snapshot key yet, retrying", extra={"error": str(exc)})
                await asyncio.sleep(backoff.next_delay())
        self.resyncs += 1
        if entry is not None and entry.revision > self.held:
            self.held = entry.revision
            yield entry


async def snapshot_feed(
    bus: Bus, cluster: str, fanout: str, *, start_after: int = 0
) -> AsyncIterator[KvEntry]:
    """The snapshot key's values for `fanout` ("watch" or "republish"). A bucket made
    without RePublish (by an older provisioner) has no copies to follow: the watch then,
    with a warning, rather than a loader that hears of changes only at its backstop."""
    key = subjects.snapshot_key(cluster)
    destination = subjects.snapshot_republish_subject(cluster)
    subscription = None
    if fanout == "republish":
        subscription = await _republished_copies(bus, destination)
    if subscription is not None:
        feed = RepublishFeed(bus, subjects.SNAPSHOT_BUCKET, key, destination)
        entries = feed.entries(start_after=start_after, subscription=subscription)
    else:
        entries = bus.watch_kv(subjects.SNAPSHOT_BUCKET, key)
    async for entry in entries:
        yield entry


async def _republished_copies(bus: Bus, destination: str) -> CoreSubscription | None:
    """A subscription to the copies, or None (with a warning) when there are none to have:
    the bucket does not republish, or this identity may not receive them (an accounts
    file generated before the copies existed)."""
    why = "the snapshot bucket does not republish its values"
    if await _republishes(bus):
        try:
            return await bus.subscribe(destination)
        except PermissionDenied as exc:
            why = f"NATS refuses this node the republished copies ({exc})"
    log.warning(f"{why}: using the KV watch", extra={"subject": destination})
    return None


async def _republishes(bus: Bus) -> bool:
    wanted = (subjects.SNAPSHOT_REPUBLISH_SOURCE, subjects.SNAPSHOT_REPUBLISH_DESTINATION)
    backoff = Backoff(initial=0.2, maximum=5.0)
    while True:
        try:
            return await bus.kv_republish(subjects.SNAPSHOT_BUCKET) == wanted
        except BusError as exc:
            log.info("cannot look the snapshot bucket up yet, retrying", extra={"error": str(exc)})
            await asyncio.sleep(backoff.next_delay())
