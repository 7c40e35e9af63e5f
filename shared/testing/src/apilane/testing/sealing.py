"""Signed snapshots and control requests for tests: what discovery and the CLI produce.

`TEST_KEY` is generated once per test process; tests that need a second key (rotation, an
unknown signer) generate their own with `SigningKey.generate()`. Services run as processes
get a key of their own from `signing_environment`.
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timedelta
from pathlib import Path

import msgspec
from nats.errors import Error as NatsError

from apilane.model import events, signing, subjects
from apilane.model.signing import ControlRequest, SigningKey
from apilane.runtime import tracing
from apilane.runtime.bus import Bus

TEST_KEY = SigningKey.generate()
HOUR = timedelta(hours=1)


def write_signing_key(directory: Path, name: str = "discovery") -> tuple[SigningKey, Path]:
    """A new key and the PEM file holding it (readable by its owner only), as discovery reads
    it from APILANE_SIGNING_KEY_FILE."""
    key = SigningKey.generate()
    path = directory / f"{name}-signing-key.pem"
    path.write_bytes(key.to_pem())
    path.chmod(0o600)
    return key, path


def signing_environment(directory: Path) -> dict[str, str]:
    """For services run as processes: a fresh key, named to discovery by its PEM file
    (APILANE_SIGNING_KEY_FILE) and to the snapshot consumers by its public key
    (APILANE_TRUSTED_KEYS). Each service reads only its own of the two."""
    key, path = write_signing_key(directory)
    return {"APILANE_SIGNING_KEY_FILE": str(path), "APILANE_TRUSTED_KEYS": key.public_text}


def trusted_env(*keys: SigningKey, name: str = "APILANE_TRUSTED_KEYS") -> dict[str, str]:
    """The variable that makes a service trust `keys` (TEST_KEY when none are given)."""
    return {name: ",".join(key.public_text for key in keys or (TEST_KEY,))}


def seal(
    snapshot: events.EndpointSnapshot,
    *,
    key: SigningKey = TEST_KEY,
    issued_at: datetime | None = None,
    ttl: timedelta = HOUR,
) -> bytes:
    """The KV value discovery writes for `snapshot`: its sealed envelope."""
    return signing.seal_snapshot(key, snapshot, now=issued_at or signing.utcnow(), ttl=ttl)


def reseal(
    data: bytes,
    *,
    key: SigningKey = TEST_KEY,
    issued_at: datetime | None = None,
    ttl: timedelta = HOUR,
) -> bytes:
    """A refresh of a sealed snapshot: the same payload bytes under a later expiry."""
    envelope = msgspec.json.decode(data, type=signing.Envelope)
    opened = signing.Opened(
        header=msgspec.json.decode(envelope.header, type=signing.Header),
        payload=envelope.payload,
    )
    held = signing.SignedSnapshot(snapshot=events.decode_snapshot(opened.payload), opened=opened)
    return signing.reseal_snapshot(key, held, now=issued_at or signing.utcnow(), ttl=ttl)


def seal_payload(
    payload: bytes,
    *,
    generation: int,
    cluster: str = "default",
    key: SigningKey = TEST_KEY,
    issued_at: datetime | None = None,
    ttl: timedelta = HOUR,
) -> bytes:
    """A validly signed envelope around arbitrary bytes: a producer bug, not an attack."""
    now = issued_at or signing.utcnow()
    header = signing.Header(
        kind="snapshot",
        key_id=key.key_id,
        cluster=cluster,
        generation=generation,
        issued_at=now,
        expires_at=now + ttl,
    )
    return signing.seal(key, header, payload)


async def put_sealed(bus: Bus, data: bytes, *, cluster: str = "default") -> int:
    """Write a sealed snapshot (or any bytes) as the cluster's snapshot KV value, with the
    trace context of the caller, as discovery does. Returns the KV revision."""
    headers: dict[str, str] = {}
    tracing.inject_headers(headers)
    ack = await bus.js.publish(
        subjects.kv_subject(subjects.SNAPSHOT_BUCKET, subjects.snapshot_key(cluster)),
        data,
        headers=headers or None,
        timeout=5.0,
    )
    return int(ack.seq)


async def put_retrying(
    bus: Bus, data: bytes, *, within: float = 20.0, cluster: str = "default"
) -> int:
    """`put_sealed` as discovery's publisher does it: retried while the servers restart or
    a JetStream cluster elects a new stream leader, for at most `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        try:
            return await put_sealed(bus, data, cluster=cluster)
        except (NatsError, TimeoutError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


def control_request(
    *,
    node: str,
    connect_time_lb: bool,
    cluster: str = "default",
    key: SigningKey = TEST_KEY,
    issued_at: datetime | None = None,
) -> bytes:
    """A sealed control request, as `apilane node lb` sends it to one node-loader."""
    request = ControlRequest(
        cluster=cluster,
        node=node,
        connect_time_lb=connect_time_lb,
        issued_at=issued_at or signing.utcnow(),
    )
    return signing.seal_control(key, request)
