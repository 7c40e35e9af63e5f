"""A thin adapter over nats-py: connect, streams and buckets, publish, KV put and watch.

Services never touch nats-py directly; they speak in `events` and `subjects`. Trace context
rides in the message headers (`tracing.inject_headers` / `tracing.extract_context`).

Every connection authenticates with the identity in `config.NatsAuth` (an nkey seed, TLS
with an optional client certificate) and uses its own inbox prefix, the only one its
identity may subscribe to (`natsauth`). Only the provisioner (discovery) creates streams
(`create_streams`); everyone else waits until they exist (`wait_for_streams`). When the
server refuses a subject (a permission violation), the call fails at once with
`PermissionDenied` carrying the server's words, instead of timing out.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import re
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any, Final, TypeVar

import msgspec
import nats
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.api import (
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    KeyValueConfig,
    RePublish,
    StorageType,
    StreamConfig,
)
from nats.js.errors import APIError, BadRequestError, NotFoundError

from apilane.model import events, subjects
from apilane.model.errors import ApilaneError
from apilane.runtime import natsauth, tracing
from apilane.runtime.aio import Backoff
from apilane.runtime.config import NatsAuth, load_nats_auth

log = logging.getLogger(__name__)
T = TypeVar("T")

# JetStream's error code for a failed Nats-Expected-Last-Subject-Sequence check.
_WRONG_LAST_SEQUENCE: Final = 10071
_STREAM_NOT_FOUND: Final = 10059


class BusError(ApilaneError):
    """The bus could not do what was asked (after the client's own retries)."""


class RevisionMismatch(BusError):
    """A compare-and-set KV write lost: someone else wrote the key first."""


class PermissionDenied(BusError):
    """The server refused a subject to this connection's identity (a permissions violation)."""


# nats-py hands the server's -ERR to the error callback, lower-cased.
_VIOLATION = re.compile(r'permissions violation for (publish|subscription) to "([^"]+)"')


class _Violations:
    """The permission violations the server reports, matched to the calls waiting on them."""

    def __init__(self) -> None:
        self.seen: list[str] = []  # the server's messages, oldest first (the last 100)
        self.last_error = ""  # of any kind (a refused TLS handshake, say)
        self._waiting: dict[str, list[asyncio.Future[str]]] = {}

    def report(self, message: str) -> bool:
        self.last_error = message
        match = _VIOLATION.search(message.lower())
        if match is None:
            return False
        self.seen = [*self.seen[-99:], message]
        for waiter in self._waiting.pop(match.group(2), []):
            if not waiter.done():
                waiter.set_result(message)
        return True

    def watch(self, subject: str) -> asyncio.Future[str]:
        waiter: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(subject.lower(), []).append(waiter)
        return waiter

    def forget(self, subject: str, waiter: asyncio.Future[str]) -> None:
        waiters = self._waiting.get(subject.lower(), [])
        if waiter in waiters:
            waiters.remove(waiter)
        if not waiters:
            self._waiting.pop(subject.lower(), None)


class KvEntry(msgspec.Struct, frozen=True, kw_only=True):
    bucket: str
    key: str
    value: bytes
    revision: int
    headers: dict[str, str] = {}
    operation: str = "PUT"  # PUT, DEL or PURGE
    written_at: datetime | None = None  # when the server stored it


class CoreMessage(msgspec.Struct, frozen=True, kw_only=True):
    subject: str
    data: bytes
    headers: dict[str, str] = {}


class CoreSubscription:
    """A core NATS subscription, read one message at a time."""

    def __init__(self, subscription: Subscription) -> None:
        self._subscription = subscription

    async def next(self, timeout: float) -> CoreMessage | None:
        """The next message, or None when none came within `timeout` seconds."""
        try:
            msg = await self._subscription.next_msg(timeout=timeout)
        except (TimeoutError, nats.errors.TimeoutError):
            return None
        return CoreMessage(
            subject=msg.subject, data=msg.data or b"", headers=dict(msg.headers or {})
        )

    async def unsubscribe(self) -> None:
        with contextlib.suppress(NatsError):
            await self._subscription.unsubscribe()


class Bus:
    """One NATS connection with JetStream, shared by a service's components."""

    def __init__(
        self, nc: NatsClient, js: JetStreamContext, violations: _Violations | None = None
    ) -> None:
        self.nc = nc
        self.js = js
        self._violations = violations or _Violations()
        self._reconnect_listeners: list[Callable[[], None]] = []

    @classmethod
    async def connect(
        cls,
        servers: Sequence[str],
        *,
        name: str,
        auth: NatsAuth | None = None,
        connect_timeout: float = 2.0,
        max_reconnect_wait: float = 5.0,
        initial_attempt_deadline: float | None = None,
    ) -> Bus:
        """Connect, retrying with backoff and jitter until connected or the deadline passes.

        nats-py only reconnects after a first successful connect, so the first one is ours
        to retry: a service started before NATS must wait for it, not crash. (With unlimited
        reconnects nats-py itself retries a first connect forever: the deadline bounds it.)
        `auth` is the identity to connect as; None means this process's own, from
        APILANE_NATS_* (what a command-line tool wants).
        """
        try:
            base = connect_options(servers, load_nats_auth() if auth is None else auth)
        except ApilaneError as exc:  # a setting, a seed or the identity's role
            raise BusError(str(exc)) from exc
        violations = _Violations()
        reconnect_listeners: list[Callable[[], None]] = []
        options = base | {
            "name": name,
            "connect_timeout": connect_timeout,
            "allow_reconnect": True,
            "max_reconnect_attempts": -1,
            # Jittered per connection: after a server restart, thousands of clients do not
            # all come back in the same instant (nats-py has no jitter of its own).
            "reconnect_time_wait": min(1.0, max_reconnect_wait) * random.uniform(0.5, 1.5),
            "error_cb": _error_logger(violations),
            "disconnected_cb": _log_event("disconnected from NATS"),
            "reconnected_cb": _on_reconnect(reconnect_listeners),
        }
        loop = asyncio.get_running_loop()
        deadline = (
            None if initial_attempt_deadline is None else loop.time() + initial_attempt_deadline
        )
        delay = 0.1
        while True:
            remaining = None if deadline is None else max(deadline - loop.time(), delay)
            try:
                attempt = nats.connect(servers=list(servers), **options)
                nc = await asyncio.wait_for(attempt, timeout=remaining)
                break
            except (OSError, NatsError, TimeoutError) as exc:
                if deadline is not None and loop.time() + delay > deadline:
                    why = violations.last_error or str(exc) or "no answer in time"
                    raise BusError(f"cannot connect to NATS at {list(servers)}: {why}") from exc
                log.warning(
                    # An identity the server does not list yet (its config reloads later).
                    "NATS refused our credentials, retrying"
                    if "authorization violation" in str(exc).lower()
                    else "NATS not reachable yet, retrying",
                    extra={"servers": list(servers), "error": str(exc) or type(exc).__name__},
                )
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, max_reconnect_wait)
        bus = cls(nc, nc.jetstream(), violations)
        bus._reconnect_listeners = reconnect_listeners
        return bus

    def on_reconnect(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call `listener` after each reconnect (what was sent meanwhile on core subjects is
        lost); returns the function that removes it."""
        self._reconnect_listeners.append(listener)
        return lambda: self._reconnect_listeners.remove(listener)

    async def subscribe(self, subject: str) -> CoreSubscription:
        """A core NATS subscription (no JetStream), refused at once if not permitted."""
        subscription = await self.nc.subscribe(subject)
        await self._guarded(subject, self.nc.flush())
        return CoreSubscription(subscription)

    @property
    def connected(self) -> bool:
        return bool(self.nc.is_connected)

    @property
    def permission_violations(self) -> list[str]:
        """What the server refused this connection, in its words (the last 100)."""
        return list(self._violations.seen)

    async def _guarded(self, subject: str, call: Awaitable[T]) -> T:
        """Await `call`; if the server refuses `subject` meanwhile, raise PermissionDenied
        at once (a refused publish is otherwise only a request that times out)."""
        refused = self._violations.watch(subject)
        task: asyncio.Future[T] = asyncio.ensure_future(call)
        pending: set[asyncio.Future[Any]] = {task, refused}
        try:
            await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            raise
        finally:
            self._violations.forget(subject, refused)
        if not refused.done():
            refused.cancel()
            return await task
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, NatsError, TimeoutError):
            await task
        raise PermissionDenied(f"NATS refused {subject}: {refused.result()}")

    async def create_streams(self, *, replicas: int = 1) -> None:
        """Create (or converge) every stream and bucket apilane uses. Idempotent. Only the
        provisioner's identity (discovery) may; for the others, see `wait_for_streams`.
        `replicas`: copies of each stream in a JetStream cluster (3 survives one server).

        The snapshot bucket republishes each new value onto the cluster's core subject
        (`subjects.snapshot_republish_subject`) and answers direct gets: the fan-out that
        needs no consumer per node (node-loader's APILANE_SNAPSHOT_FANOUT=republish)."""
        await self._ensure_kv(
            KeyValueConfig(
                bucket=subjects.SNAPSHOT_BUCKET,
                history=subjects.SNAPSHOT_HISTORY,
                storage=StorageType.FILE,
                replicas=replicas,
                direct=True,
                republish=RePublish(
                    src=subjects.SNAPSHOT_REPUBLISH_SOURCE,
                    dest=subjects.SNAPSHOT_REPUBLISH_DESTINATION,
                ),
                description="apilane: the API-server endpoint snapshot of each cluster",
            )
        )
        await self._ensure_kv(
            KeyValueConfig(
                bucket=subjects.NODE_STATE_BUCKET,
                history=1,
                storage=StorageType.FILE,
                replicas=replicas,
                # A node gone from the cluster stops its heartbeat: the server removes its
                # key this long after its last write (no one needs delete rights for it).
                ttl=subjects.NODE_STATE_MAX_AGE,
                description="apilane: what each node-loader has programmed",
            )
        )
        config = StreamConfig(
            name=subjects.EVENTS_STREAM,
            subjects=list(subjects.EVENTS_STREAM_SUBJECTS),
            storage=StorageType.FILE,
            max_msgs_per_subject=10_000,
            max_age=7 * 24 * 3600,
            duplicate_window=120,
            discard=DiscardPolicy.OLD,
            num_replicas=replicas,
            description="apilane: warnings and render results",
        )
        create = f"$JS.API.STREAM.CREATE.{config.name}"
        try:
            await self._guarded(create, self.js.add_stream(config))
        except BadRequestError:
            # Already there with another config (an older apilane): converge it.
            update = f"$JS.API.STREAM.UPDATE.{config.name}"
            await self._guarded(update, self.js.update_stream(config))

    async def _ensure_kv(self, config: KeyValueConfig) -> None:
        stream = _kv_stream(config.bucket)
        try:
            await self._guarded(f"$JS.API.STREAM.INFO.{stream}", self.js.key_value(config.bucket))
            await self._converge_kv(stream, config)
            return
        except PermissionDenied:
            raise
        except (NotFoundError, BadRequestError):
            pass
        except Exception as exc:  # nats-py raises BucketNotFoundError, an APIError subtype
            if "not found" not in str(exc).lower():
                raise
        await self._guarded(f"$JS.API.STREAM.CREATE.{stream}", self.js.create_key_value(config))

    async def _converge_kv(self, stream: str, config: KeyValueConfig) -> None:
        """A bucket made by an older apilane keeps its data but takes today's settings
        (history, max age, direct gets, republish, replicas): without this an upgraded
        install would never republish, and its node-loaders would stay on the watch."""
        info = await self._guarded(f"$JS.API.STREAM.INFO.{stream}", self.js.stream_info(stream))
        current = info.config
        wanted: dict[str, Any] = {
            "max_msgs_per_subject": config.history,
            "max_age": config.ttl or None,
            "allow_direct": config.direct,
            "republish": config.republish,
            "num_replicas": config.replicas,
            "description": config.description,
        }
        differs = [
            name for name, value in wanted.items() if _differs(getattr(current, name), value)
        ]
        if not differs:
            return
        log.info("converging a bucket's settings", extra={"stream": stream, "fields": differs})
        updated = dataclasses.replace(current, **wanted)
        await self._guarded(f"$JS.API.STREAM.UPDATE.{stream}", self.js.update_stream(updated))

    async def wait_for_streams(
        self,
        streams: Sequence[str] = natsauth.STREAMS,
        *,
        retry_max: float = 5.0,
        stop: asyncio.Event | None = None,
    ) -> bool:
        """Until every stream in `streams` exists (looked up, never created: for identities
        that may not create them). Retries with backoff and jitter while they are missing or
        JetStream is not ready; True once they exist, False if `stop` was set first. A
        permission violation is raised: waiting would not change it."""
        backoff = Backoff(initial=0.2, maximum=retry_max)
        missing = list(streams)
        while missing:
            try:
                for stream in list(missing):
                    await self._guarded(
                        f"$JS.API.STREAM.INFO.{stream}", self.js.stream_info(stream)
                    )
                    missing.remove(stream)
                continue
            except (NatsError, OSError, TimeoutError) as exc:
                log.info(
                    "waiting for the apilane streams",
                    extra={"missing": missing, "error": str(exc) or type(exc).__name__},
                )
            if await backoff.sleep(stop):
                return False
        return True

    async def publish(
        self,
        subject: str,
        event: events.Event,
        *,
        msg_id: str | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 5.0,
    ) -> int:
        """Publish to a stream; return the stream sequence. `msg_id` lets JetStream drop repeats."""
        hdrs = dict(headers or {})
        tracing.inject_headers(hdrs)
        if msg_id:
            hdrs["Nats-Msg-Id"] = msg_id
        try:
            ack = await self._guarded(
                subject,
                self.js.publish(
                    subject, events.encode(event), headers=hdrs or None, timeout=timeout
                ),
            )
        except (NatsError, TimeoutError) as exc:
            raise BusError(f"publish to {subject} failed: {exc}") from exc
        return int(ack.seq)

    async def kv_get(
        self, bucket: str, key: str, *, include_deleted: bool = False, direct: bool = False
    ) -> KvEntry | None:
        """The latest value of a key, with its headers, or None when there is none.

        A deleted or purged key leaves a marker with a revision of its own; compare-and-set
        writers need it (`include_deleted=True` returns the marker, `operation` says which).
        `direct`: answered by any replica (a direct get), not only the stream leader."""
        stream = _kv_stream(bucket)
        subject = subjects.kv_subject(bucket, key)
        api = (
            f"$JS.API.DIRECT.GET.{stream}.{subject}"
            if direct
            else f"$JS.API.STREAM.MSG.GET.{stream}"
        )
        try:
            raw = await self._guarded(api, self.js.get_last_msg(stream, subject, direct=direct))
        except NotFoundError:
            return None
        except (NatsError, TimeoutError) as exc:
            raise BusError(f"reading {bucket}/{key} failed: {exc}") from exc
        headers = dict(raw.headers or {})
        operation = headers.get("KV-Operation", "PUT")
        if operation != "PUT" and not include_deleted:
            return None
        return KvEntry(
            bucket=bucket,
            key=key,
            value=raw.data or b"",
            revision=int(raw.seq or 0),
            headers=headers,
            operation=operation,
            written_at=raw.time,
        )

    async def kv_history(self, bucket: str, key: str) -> list[KvEntry]:
        """Every revision of a key the bucket still keeps (its `history` setting), oldest
        first, deletes and purges included. One direct message get per revision (the
        next message of the key's subject from a sequence on), so no consumer is made and
        an identity that may only read messages can call it."""
        stream = _kv_stream(bucket)
        subject = subjects.kv_subject(bucket, key)
        found: list[KvEntry] = []
        sequence = 1
        while True:
            try:
                raw = await self._guarded(
                    f"$JS.API.STREAM.MSG.GET.{stream}",
                    self.js.get_msg(stream, seq=sequence, subject=subject, next=True),
                )
            except NotFoundError as exc:
                if exc.err_code == _STREAM_NOT_FOUND:
                    raise BusError(f"bucket {bucket} does not exist") from exc
                return found  # no message of the key from `sequence` on
            except (NatsError, TimeoutError) as exc:
                raise BusError(f"reading the history of {bucket}/{key} failed: {exc}") from exc
            headers = dict(raw.headers or {})
            revision = int(raw.seq or 0)
            found.append(
                KvEntry(
                    bucket=bucket,
                    key=key,
                    value=raw.data or b"",
                    revision=revision,
                    headers=headers,
                    operation=headers.get("KV-Operation", "PUT"),
                    written_at=raw.time,
                )
            )
            if revision < sequence:  # a server that sent no sequence: do not ask again
                return found
            sequence = revision + 1

    async def kv_latest(
        self, bucket: str, key: str = ">", *, timeout: float = 10.0
    ) -> list[KvEntry]:
        """The latest value of every key matching `key`, in one pass: one ordered consumer
        delivering the last message per subject (not one request per key), each with the
        time it was written (`written_at`). Deleted keys are left out."""
        subject = subjects.kv_subject(bucket, key)
        stream = _kv_stream(bucket)
        expected = len(await self.kv_keys(bucket, key))
        if expected == 0:
            return []
        config = ConsumerConfig(deliver_policy=DeliverPolicy.LAST_PER_SUBJECT)
        found: dict[str, KvEntry] = {}
        try:
            sub = await self._guarded(
                f"$JS.API.CONSUMER.CREATE.{stream}",
                self.js.subscribe(subject, stream=stream, ordered_consumer=True, config=config),
            )
        except (NatsError, TimeoutError) as exc:
            raise BusError(f"reading the keys of {bucket} failed: {exc}") from exc
        try:
            while True:
                try:
                    msg = await sub.next_msg(timeout=timeout)
                except (TimeoutError, nats.errors.TimeoutError) as exc:
                    raise BusError(f"reading the keys of {bucket} timed out") from exc
                entry = _kv_entry(bucket, msg)
                if entry is not None:
                    found[entry.key] = entry
                if msg.metadata.num_pending == 0:
                    break
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        return sorted((e for e in found.values() if e.operation == "PUT"), key=lambda e: e.key)

    async def kv_republish(self, bucket: str) -> tuple[str, str] | None:
        """The bucket stream's RePublish (source, destination), or None if it has none."""
        stream = _kv_stream(bucket)
        try:
            info = await self._guarded(f"$JS.API.STREAM.INFO.{stream}", self.js.stream_info(stream))
        except (NatsError, TimeoutError) as exc:
            raise BusError(f"looking up {bucket} failed: {exc}") from exc
        republish = info.config.republish
        if republish is None or not republish.src or not republish.dest:
            return None
        return republish.src, republish.dest

    async def kv_keys(self, bucket: str, key: str = ">") -> list[str]:
        """The keys of `bucket` that match `key` (a subject pattern: `local.>`), sorted.

        Read from the bucket's stream state, so no consumer is created and polling is cheap.
        A deleted key is listed until its marker is purged; `kv_get` then returns None."""
        subject = subjects.kv_subject(bucket, "")
        stream = _kv_stream(bucket)
        try:
            info = await self._guarded(
                f"$JS.API.STREAM.INFO.{stream}",
                self.js.stream_info(stream, subjects_filter=subjects.kv_subject(bucket, key)),
            )
        except NotFoundError as exc:
            raise BusError(f"bucket {bucket} does not exist") from exc
        except (NatsError, TimeoutError) as exc:
            raise BusError(f"listing the keys of {bucket} failed: {exc}") from exc
        return sorted(name.removeprefix(subject) for name in info.state.subjects or {})

    async def kv_put(
        self,
        bucket: str,
        key: str,
        value: events.Event | bytes,
        *,
        expected_revision: int | None = None,
        msg_id: str | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 5.0,
    ) -> int:
        """Write a KV value with headers; with `expected_revision`, only if nobody wrote since.

        `value` is an event (encoded here) or bytes already encoded (a signed envelope).
        `expected_revision=0` means the key must not exist yet. Returns the new revision.
        """
        hdrs = dict(headers or {})
        tracing.inject_headers(hdrs)
        if expected_revision is not None:
            hdrs["Nats-Expected-Last-Subject-Sequence"] = str(expected_revision)
        if msg_id:
            hdrs["Nats-Msg-Id"] = msg_id
        subject = subjects.kv_subject(bucket, key)
        try:
            ack = await self._guarded(
                subject,
                self.js.publish(
                    subject,
                    value if isinstance(value, bytes) else events.encode(value),
                    headers=hdrs or None,
                    timeout=timeout,
                ),
            )
        except APIError as exc:
            if exc.err_code == _WRONG_LAST_SEQUENCE:
                raise RevisionMismatch(
                    f"{bucket}/{key} changed since revision {expected_revision}"
                ) from exc
            raise BusError(f"write to {bucket}/{key} failed: {exc}") from exc
        except (NatsError, TimeoutError) as exc:
            raise BusError(f"write to {bucket}/{key} failed: {exc}") from exc
        return int(ack.seq)

    async def watch_kv(
        self,
        bucket: str,
        key: str = ">",
        *,
        stall_check: float = 2.0,
        _stop: asyncio.Event | None = None,  # used in tests
    ) -> AsyncIterator[KvEntry]:
        """Yield the current value of each matching key first, then every update.

        Survives NATS restarts and reconnects: when nothing arrives for `stall_check`
        seconds it compares the stream's last sequence with the last one it delivered and,
        if it fell behind (an ephemeral consumer lost with the server), subscribes again
        from where it was. Deletes and purges are yielded with their operation.
        """
        subject = subjects.kv_subject(bucket, key)
        stream = _kv_stream(bucket)
        last_seq = 0
        while _stop is None or not _stop.is_set():
            sub = None
            try:
                if last_seq == 0:
                    config = ConsumerConfig(deliver_policy=DeliverPolicy.LAST_PER_SUBJECT)
                else:
                    config = ConsumerConfig(
                        deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=last_seq + 1
                    )
                sub = await self.js.subscribe(
                    subject, stream=stream, ordered_consumer=True, config=config, idle_heartbeat=1.0
                )
                while _stop is None or not _stop.is_set():
                    try:
                        msg = await sub.next_msg(timeout=stall_check)
                    except (TimeoutError, nats.errors.TimeoutError):
                        if await self._fell_behind(stream, last_seq):
                            log.info(
                                "KV watch fell behind, resubscribing",
                                extra={"bucket": bucket, "from_seq": last_seq + 1},
                            )
                            break
                        continue
                    entry = _kv_entry(bucket, msg)
                    if entry is None or entry.revision <= last_seq:
                        continue
                    last_seq = entry.revision
                    yield entry
            except (NatsError, OSError, TimeoutError) as exc:
                log.warning(
                    "KV watch interrupted, retrying", extra={"bucket": bucket, "error": str(exc)}
                )
                await asyncio.sleep(0.5 + random.random() * 0.5)
            finally:
                if sub is not None:
                    with contextlib.suppress(Exception):
                        await sub.unsubscribe()

    async def _fell_behind(self, stream: str, last_seq: int) -> bool:
        try:
            info = await self.js.stream_info(stream)
        except (NatsError, TimeoutError, OSError):
            return False  # unreachable: nothing to catch up with yet
        return int(info.state.last_seq) > last_seq

    async def serve_requests(
        self, subject: str, handler: Callable[[bytes], Awaitable[bytes]]
    ) -> Subscription:
        """Answer core NATS requests on `subject` with `handler(payload)`.

        For operator actions that want an answer now (not JetStream: nothing to replay). A
        handler that raises is answered with a JSON error and logged; it never kills the
        subscription.
        """

        async def on_request(msg: Msg) -> None:
            try:
                reply = await handler(msg.data or b"")
            except Exception as exc:
                log.exception("request handler failed", extra={"subject": subject})
                reply = msgspec.json.encode({"error": f"{type(exc).__name__}: {exc}"})
            if msg.reply:
                await msg.respond(reply)

        subscription = await self.nc.subscribe(subject, cb=on_request)
        # A refused subscription is reported asynchronously: ask now, while it is known.
        await self._guarded(subject, self.nc.flush())
        return subscription

    async def notify_on(self, subject: str, on_message: Callable[[], None]) -> Subscription:
        """Call `on_message()` for every message published on `subject`, a KV key's
        included (its puts, deletes and purges). Core NATS: no replay and no revision, so
        a hint to look, never the data itself; nats-py subscribes again after a reconnect.
        A subscription the server refuses raises PermissionDenied."""

        async def on_msg(_msg: Msg) -> None:
            on_message()

        # The server answers a refused SUB with an error before the PONG of a later PING,
        # and nats-py reports the error before it takes that PONG. But nats-py writes a PING
        # at once and the SUB from its flusher task, so the first flush's PING may overtake
        # the SUB; by its PONG the SUB is out, and the second PING is behind it. (Not
        # `_guarded`: a cancelled flush leaves nats-py a cancelled PONG future, which breaks
        # its read loop.)
        refused = self._violations.watch(subject)
        try:
            subscription = await self.nc.subscribe(subject, cb=on_msg)
            await self.nc.flush()
            await self.nc.flush()
        except (NatsError, TimeoutError) as exc:
            raise BusError(f"subscribing to {subject} failed: {exc}") from exc
        finally:
            self._violations.forget(subject, refused)
        if refused.done():
            with contextlib.suppress(NatsError):
                await subscription.unsubscribe()
            raise PermissionDenied(f"NATS refused {subject}: {refused.result()}")
        return subscription

    async def request(self, subject: str, payload: bytes, *, timeout: float = 2.0) -> bytes:
        try:
            response = await self._guarded(
                subject, self.nc.request(subject, payload, timeout=timeout)
            )
        except (NatsError, TimeoutError) as exc:
            raise BusError(f"request to {subject} failed: {exc}") from exc
        return response.data or b""

    async def drain(self) -> None:
        """Finish in-flight work and close; safe to call twice or when never connected."""
        if self.nc.is_closed:
            return
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.nc.drain(), timeout=5.0)
        if not self.nc.is_closed:
            with contextlib.suppress(Exception):
                await self.nc.close()


def _differs(current: object, wanted: object) -> bool:
    # The server reports an unset max age as 0 and an unset republish as None.
    if isinstance(wanted, RePublish) and isinstance(current, RePublish):
        return (current.src, current.dest, bool(current.headers_only)) != (
            wanted.src,
            wanted.dest,
            bool(wanted.headers_only),
        )
    return (current or None) != (wanted or None)


def _kv_stream(bucket: str) -> str:
    return f"KV_{bucket}"


def _kv_entry(bucket: str, msg: Msg) -> KvEntry | None:
    prefix = f"$KV.{bucket}."
    if not msg.subject.startswith(prefix):
        return None
    headers = dict(msg.headers or {})
    meta = msg.metadata
    return KvEntry(
        bucket=bucket,
        key=msg.subject[len(prefix) :],
        value=msg.data or b"",
        revision=int(meta.sequence.stream),
        headers=headers,
        operation=headers.get("KV-Operation", "PUT"),
        written_at=meta.timestamp,
    )


def connect_options(servers: Sequence[str], auth: NatsAuth) -> dict[str, Any]:
    """nats-py's options for connecting as `auth`'s identity. TLS, when used, comes first
    (before the server's INFO), so a man in the middle cannot talk the client down to plain
    text; the server's config has the matching `handshake_first`."""
    options: dict[str, Any] = {}
    if auth.nkey_seed_file:
        options["nkeys_seed"] = auth.nkey_seed_file
    inbox = auth.resolved_inbox_prefix()
    if inbox:
        options["inbox_prefix"] = inbox
    if auth.wants_tls or any(url.startswith("tls://") for url in servers):
        options["tls"] = tls_context(auth)
        options["tls_handshake_first"] = True
    return options


def tls_context(auth: NatsAuth) -> ssl.SSLContext:
    """Verify the server against `tls_ca_file` (else the system's store); with a client
    certificate, present it (mutual TLS)."""
    context = ssl.create_default_context(cafile=auth.tls_ca_file or None)
    if auth.tls_cert_file:
        context.load_cert_chain(auth.tls_cert_file, auth.tls_key_file)
    return context


def _on_reconnect(listeners: list[Callable[[], None]]) -> Any:
    async def callback() -> None:
        log.warning("reconnected to NATS")
        for listener in list(listeners):
            listener()

    return callback


def _log_event(text: str) -> Any:
    async def callback() -> None:
        log.warning(text)

    return callback


def _error_logger(violations: _Violations) -> Callable[[Exception], Awaitable[None]]:
    async def on_error(exc: Exception) -> None:
        text = str(exc) or type(exc).__name__
        if violations.report(text):
            log.error("NATS refused a subject to this identity", extra={"error": text})
        else:
            log.warning("NATS client error", extra={"error": text})

    return on_error
