"""A thin adapter over nats-py: connect, streams and buckets, publish, KV put and watch.

Services never touch nats-py directly; they speak in `events` and `subjects`. Trace context
rides in the message headers (`tracing.inject_headers` / `tracing.extract_context`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Final

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
    StorageType,
    StreamConfig,
)
from nats.js.errors import APIError, BadRequestError, NotFoundError

from apilane.model import events, subjects
from apilane.model.errors import ApilaneError
from apilane.runtime import tracing

log = logging.getLogger(__name__)

# JetStream's error code for a failed Nats-Expected-Last-Subject-Sequence check.
_WRONG_LAST_SEQUENCE: Final = 10071


class BusError(ApilaneError):
    """The bus could not do what was asked (after the client's own retries)."""


class RevisionMismatch(BusError):
    """A compare-and-set KV write lost: someone else wrote the key first."""


class KvEntry(msgspec.Struct, frozen=True, kw_only=True):
    bucket: str
    key: str
    value: bytes
    revision: int
    headers: dict[str, str] = {}
    operation: str = "PUT"  # PUT, DEL or PURGE


class Bus:
    """One NATS connection with JetStream, shared by a service's components."""

    def __init__(self, nc: NatsClient, js: JetStreamContext) -> None:
        self.nc = nc
        self.js = js

    @classmethod
    async def connect(
        cls,
        servers: Sequence[str],
        *,
        name: str,
        connect_timeout: float = 2.0,
        max_reconnect_wait: float = 5.0,
        initial_attempt_deadline: float | None = None,
    ) -> Bus:
        """Connect, retrying with backoff and jitter until connected or the deadline passes.

        nats-py only reconnects after a first successful connect, so the first one is ours
        to retry: a service started before NATS must wait for it, not crash. (With unlimited
        reconnects nats-py itself retries a first connect forever: the deadline bounds it.)
        """
        loop = asyncio.get_running_loop()
        deadline = (
            None if initial_attempt_deadline is None else loop.time() + initial_attempt_deadline
        )
        delay = 0.1
        while True:
            remaining = None if deadline is None else max(deadline - loop.time(), delay)
            try:
                connecting = nats.connect(
                    servers=list(servers),
                    name=name,
                    connect_timeout=connect_timeout,
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=min(1.0, max_reconnect_wait),
                    error_cb=_log_error,
                    disconnected_cb=_log_event("disconnected from NATS"),
                    reconnected_cb=_log_event("reconnected to NATS"),
                )
                nc = await asyncio.wait_for(connecting, timeout=remaining)
                break
            except (OSError, NatsError, TimeoutError) as exc:
                if deadline is not None and loop.time() + delay > deadline:
                    detail = str(exc) or "no answer in time"
                    raise BusError(f"cannot connect to NATS at {list(servers)}: {detail}") from exc
                log.warning(
                    "NATS not reachable yet, retrying",
                    extra={"servers": list(servers), "error": str(exc)},
                )
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, max_reconnect_wait)
        return cls(nc, nc.jetstream())

    @property
    def connected(self) -> bool:
        return bool(self.nc.is_connected)

    async def ensure_streams(self) -> None:
        """Create (or leave as they are) every stream and bucket apilane uses. Idempotent."""
        await self._ensure_kv(
            KeyValueConfig(
                bucket=subjects.SNAPSHOT_BUCKET,
                history=subjects.SNAPSHOT_HISTORY,
                storage=StorageType.FILE,
                description="apilane: the API-server endpoint snapshot of each cluster",
            )
        )
        await self._ensure_kv(
            KeyValueConfig(
                bucket=subjects.NODE_STATE_BUCKET,
                history=1,
                storage=StorageType.FILE,
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
            description="apilane: warnings and render results",
        )
        try:
            await self.js.add_stream(config)
        except BadRequestError:
            # Already there with another config (an older apilane): converge it.
            await self.js.update_stream(config)

    async def _ensure_kv(self, config: KeyValueConfig) -> None:
        try:
            await self.js.key_value(config.bucket)
        except (NotFoundError, BadRequestError):
            await self.js.create_key_value(config)
        except Exception as exc:  # nats-py raises BucketNotFoundError, an APIError subtype
            if "not found" not in str(exc).lower():
                raise
            await self.js.create_key_value(config)

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
            ack = await self.js.publish(
                subject, events.encode(event), headers=hdrs or None, timeout=timeout
            )
        except (NatsError, TimeoutError) as exc:
            raise BusError(f"publish to {subject} failed: {exc}") from exc
        return int(ack.seq)

    async def kv_get(
        self, bucket: str, key: str, *, include_deleted: bool = False
    ) -> KvEntry | None:
        """The latest value of a key, with its headers, or None when there is none.

        A deleted or purged key leaves a marker with a revision of its own; compare-and-set
        writers need it (`include_deleted=True` returns the marker, `operation` says which)."""
        try:
            raw = await self.js.get_last_msg(_kv_stream(bucket), subjects.kv_subject(bucket, key))
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
        )

    async def kv_keys(self, bucket: str, key: str = ">") -> list[str]:
        """The keys of `bucket` that match `key` (a subject pattern: `local.>`), sorted.

        Read from the bucket's stream state, so no consumer is created and polling is cheap.
        A deleted key is listed until its marker is purged; `kv_get` then returns None."""
        subject = subjects.kv_subject(bucket, "")
        try:
            info = await self.js.stream_info(
                _kv_stream(bucket), subjects_filter=subjects.kv_subject(bucket, key)
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
        try:
            ack = await self.js.publish(
                subjects.kv_subject(bucket, key),
                value if isinstance(value, bytes) else events.encode(value),
                headers=hdrs or None,
                timeout=timeout,
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

        return await self.nc.subscribe(subject, cb=on_request)

    async def request(self, subject: str, payload: bytes, *, timeout: float = 2.0) -> bytes:
        try:
            response = await self.nc.request(subject, payload, timeout=timeout)
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
    )


def _log_event(text: str) -> Any:
    async def callback() -> None:
        log.warning(text)

    return callback


async def _log_error(exc: Exception) -> None:
    log.warning("NATS client error", extra={"error": str(exc)})
