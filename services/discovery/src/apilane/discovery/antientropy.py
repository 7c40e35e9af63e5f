"""Anti-entropy: the leader keeps its own signed snapshot in the KV key.

Without it, a key deleted or purged stays empty until the endpoints change (a node-loader
that starts meanwhile gets nothing), and a value someone else wrote stays until then too.
So while it leads, discovery watches its own key and puts its current snapshot back when
the key is missing, holds something discovery cannot verify with its own key, or holds an
older snapshot of discovery's: re-sealed with the same generation and payload bytes (a
later expiry), which consumers holding it take as a refresh and a consumer starting fresh
applies. Consumers never see a generation bump for it.

- `assess` is the pure decision: what the key holds against what discovery asserts;
- `ReassertPace` bounds how often discovery writes the key back: a writer flipping the
  key gets a re-assertion at most every `initial`, then doubling up to `maximum` while the
  flipping lasts, never a hot loop;
- `KeyGuard` is the thin adapter: a core NATS subscription on the key's subject wakes it
  at once (every put, delete and purge is a message there), and a poll every
  `check_interval` catches what no message shows (a purge of the stream, a message missed
  while disconnected). Reads are paced with the shared coalescing rule.

Discovery does not use a JetStream watch here: that needs a push consumer on a stream it
writes, and nats-server does not check a push consumer's deliver subject (docs/security.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Final, Protocol

from apilane.model import events, subjects
from apilane.model.signing import SignatureError, SignedSnapshot
from apilane.runtime.aio import first_of
from apilane.runtime.bus import BusError, KvEntry
from apilane.runtime.coalesce import LeadingEdge

log = logging.getLogger(__name__)

# Reads of the key at most this often, however often it is written.
CHECK_SPACING: Final = 0.1


class Action(Enum):
    KEEP = "keep"  # the key holds discovery's snapshot (or nothing is asserted yet)
    REASSERT = "reassert"  # put discovery's snapshot back, same generation
    RECONCILE = "reconcile"  # a newer snapshot of discovery's: the publisher reads it


@dataclass(frozen=True)
class Assessment:
    action: Action
    reason: str  # a stable label (the metric's)
    detail: str = ""


@dataclass(frozen=True)
class Asserted:
    """What discovery holds the key should contain, and the revision it was verified at
    (None while the publisher is reading the bucket again)."""

    signed: SignedSnapshot
    revision: int | None


_MARKERS: Final = {"DEL": "deleted", "PURGE": "purged"}


def assess(
    entry: KvEntry | None,
    asserted: Asserted | None,
    *,
    cluster: str,
    open_: Callable[[bytes], SignedSnapshot],
) -> Assessment:
    """What to do about the key's latest entry. `open_` verifies with discovery's own key
    (raising SignatureError or MalformedEvent): nothing else counts as discovery's."""
    if asserted is None:
        return Assessment(Action.KEEP, "nothing-asserted")
    if entry is None:
        return Assessment(Action.REASSERT, "missing")
    if entry.operation != "PUT":
        return Assessment(Action.REASSERT, _MARKERS.get(entry.operation, "deleted"))
    if entry.revision == asserted.revision:
        return Assessment(Action.KEEP, "held")
    found = _verified(entry.value, cluster, open_)
    return found if isinstance(found, Assessment) else _compare(found, asserted.signed)


def _verified(
    value: bytes, cluster: str, open_: Callable[[bytes], SignedSnapshot]
) -> SignedSnapshot | Assessment:
    """The value as discovery's snapshot for this cluster, or why it is not."""
    try:
        found = open_(value)
    except SignatureError as exc:
        return Assessment(Action.REASSERT, exc.reason, str(exc))
    except events.MalformedEvent as exc:
        return Assessment(Action.REASSERT, "malformed", str(exc))
    if found.snapshot.cluster != cluster:
        return Assessment(Action.REASSERT, "other-cluster", f"for {found.snapshot.cluster!r}")
    return found


def _compare(found: SignedSnapshot, held: SignedSnapshot) -> Assessment:
    """Both verified as discovery's: generation, then content, then validity."""
    found_generation, held_generation = found.header.generation, held.header.generation
    if found_generation > held_generation:
        return Assessment(Action.RECONCILE, "newer", f"generation {found_generation}")
    if found_generation < held_generation:
        return Assessment(Action.REASSERT, "rollback", f"generation {found_generation}")
    if found.content_digest != held.content_digest:
        return Assessment(Action.REASSERT, "equivocation", f"generation {found_generation}")
    if found.header.expires_at < held.header.expires_at:
        # An older seal of the same snapshot, put back: valid shorter, or expired already.
        return Assessment(Action.REASSERT, "stale", f"expires at {found.header.expires_at}")
    return Assessment(Action.KEEP, "same")


@dataclass
class ReassertPace:
    """How soon discovery may write the key back again: at once the first time; then after
    `initial`, doubling up to `maximum` while re-assertions follow each other; from the
    start again once the key has stayed discovery's for `maximum`."""

    initial: float = 0.5
    maximum: float = 10.0
    clock: Callable[[], float] = time.monotonic
    _last: float | None = None
    _delay: float = 0.0

    def wait(self) -> float:
        """Seconds until the next re-assertion is allowed (0: now)."""
        if self._last is None:
            return 0.0
        return max(0.0, self._last + self._delay - self.clock())

    def reasserted(self) -> None:
        now = self.clock()
        if self._last is None or now - self._last >= self._delay + self.maximum:
            self._delay = self.initial
        else:
            self._delay = min(self.maximum, self._delay * 2)
        self._last = now


class Subscription(Protocol):
    async def unsubscribe(self, limit: int = 0) -> None: ...


class GuardBus(Protocol):
    """The part of `apilane.runtime.bus.Bus` the guard uses."""

    async def kv_get(
        self, bucket: str, key: str, *, include_deleted: bool = False
    ) -> KvEntry | None: ...

    async def notify_on(self, subject: str, on_message: Callable[[], None]) -> Subscription: ...


class Keeper(Protocol):
    """The part of the publisher the guard drives."""

    @property
    def asserted(self) -> Asserted | None: ...

    async def reassert(self, entry: KvEntry | None, assessment: Assessment) -> bool: ...

    def reconcile_with_bucket(self) -> None: ...


class KeyGuard:
    """Watches the snapshot key while this replica leads; one `run` per term."""

    def __init__(
        self,
        *,
        cluster: str,
        bus: GuardBus,
        keeper: Keeper,
        open_: Callable[[bytes], SignedSnapshot],
        pace: ReassertPace,
        check_interval: float = 1.0,
    ) -> None:
        self.cluster = cluster
        self.key = subjects.snapshot_key(cluster)
        self.bus = bus
        self.keeper = keeper
        self.open_ = open_
        self.pace = pace
        self.check_interval = check_interval
        self._reads = LeadingEdge(CHECK_SPACING, clock=pace.clock)
        self._written = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        subscription = await self._subscribe()
        try:
            while not stop.is_set():
                woke = await first_of(
                    self._written.wait(), stop.wait(), timeout=self.check_interval
                )
                if woke == 1 or await self._paced(stop):
                    break
                self._written.clear()  # what was written until now, this read sees
                await self.check()
        finally:
            if subscription is not None:
                with contextlib.suppress(Exception):
                    await subscription.unsubscribe()

    async def _paced(self, stop: asyncio.Event) -> bool:
        """Wait until a read (and a re-assertion) is allowed; True when `stop` came."""
        delay = max(self._reads.delay(), self.pace.wait())
        return delay > 0 and await first_of(stop.wait(), timeout=delay) == 0

    async def _subscribe(self) -> Subscription | None:
        subject = subjects.kv_subject(subjects.SNAPSHOT_BUCKET, self.key)
        try:
            return await self.bus.notify_on(subject, self._written.set)
        except BusError as exc:
            log.warning(
                "cannot subscribe to the snapshot key; checking it every interval only",
                extra={"cluster": self.cluster, "error": str(exc), "every": self.check_interval},
            )
            return None

    async def check(self) -> Assessment | None:
        """Read the key once and act on it; the assessment, or None when nothing was read."""
        if self.keeper.asserted is None:
            return None  # nothing to keep yet
        self._reads.sent()
        try:
            entry = await self.bus.kv_get(subjects.SNAPSHOT_BUCKET, self.key, include_deleted=True)
        except BusError as exc:
            log.info(
                "cannot read the snapshot key; will look again",
                extra={"cluster": self.cluster, "error": str(exc)},
            )
            return None
        # After the read: a write of the publisher's that finished meanwhile counts.
        assessment = assess(entry, self.keeper.asserted, cluster=self.cluster, open_=self.open_)
        if assessment.action is Action.REASSERT:
            self.pace.reasserted()
            try:
                await self.keeper.reassert(entry, assessment)
            except BusError as exc:
                log.warning(
                    "putting the snapshot back failed; will look again",
                    extra={"cluster": self.cluster, "reason": assessment.reason, "error": str(exc)},
                )
        elif assessment.action is Action.RECONCILE:
            self.keeper.reconcile_with_bucket()
        return assessment
