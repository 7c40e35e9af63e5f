"""Signed messages: proof that a snapshot (or a control request) comes from a trusted key.

NATS authenticates connections, not messages: whoever can write a KV key can write
anything into it. So every snapshot travels as a signed envelope, and every consumer opens
it against its own set of trusted Ed25519 public keys before it looks at the content.

The envelope carries two byte strings and a signature over both, JWS-style:

    header:    the JSON of `Header` (kind, key id, cluster, generation, issued/expires at)
    payload:   the JSON of the message (for a snapshot: every field of `EndpointSnapshot`)
    signature: Ed25519 over  DOMAIN || len(header) || header || payload

Consumers decode only the bytes that were verified, so no re-encoding can differ from what
was signed. The header's kind, cluster and generation must match the payload's, so a
validly signed header cannot be stapled onto another payload.

`judge` is the acceptance policy (rollback, equivocation, expiry), kept pure so that every
consumer applies the same rules.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Final, Literal

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from apilane.model import events
from apilane.model.errors import ApilaneError, ConfigError

DOMAIN: Final = b"apilane-signed-v1\x00"
Kind = Literal["snapshot", "control"]


class SignatureError(ApilaneError):
    """A message that must not be trusted. `reason` is a stable label for metrics and logs."""

    reason: str = "invalid"


class Unsigned(SignatureError):
    reason = "unsigned"


class UnknownKey(SignatureError):
    reason = "unknown-key"


class BadSignature(SignatureError):
    reason = "bad-signature"


class Mismatch(SignatureError):
    """The signed header does not describe the payload it came with."""

    reason = "mismatch"


class Refused(SignatureError):
    """Validly signed, but not acceptable now: see `judge`."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class Header(msgspec.Struct, frozen=True, kw_only=True):
    kind: Kind
    key_id: str
    cluster: str
    generation: int
    issued_at: datetime
    expires_at: datetime


class Envelope(msgspec.Struct, frozen=True, kw_only=True, tag="signed"):
    header: bytes
    payload: bytes
    signature: bytes


_envelope_decoder: Final = msgspec.json.Decoder(Envelope)
_header_decoder: Final = msgspec.json.Decoder(Header)
_encoder: Final = msgspec.json.Encoder()


def key_id_of(public: Ed25519PublicKey) -> str:
    """A short, stable name for a public key: the first 16 hex digits of its SHA-256."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ed25519:" + hashlib.sha256(raw).hexdigest()[:16]


def public_text(public: Ed25519PublicKey) -> str:
    """The form trusted keys are configured in: base64 of the raw 32-byte public key."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


@dataclass(frozen=True)
class SigningKey:
    private: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_pem(cls, pem: bytes, *, source: str = "signing key") -> SigningKey:
        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{source}: not a PEM private key ({exc})") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(f"{source}: an Ed25519 key is required, not {type(key).__name__}")
        return cls(key)

    @classmethod
    def load(cls, path: str | Path) -> SigningKey:
        try:
            pem = Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read signing key {path}: {exc.strerror}") from exc
        return cls.from_pem(pem, source=str(path))

    def to_pem(self) -> bytes:
        return self.private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    @property
    def public(self) -> Ed25519PublicKey:
        return self.private.public_key()

    @property
    def key_id(self) -> str:
        return key_id_of(self.public)

    @property
    def public_text(self) -> str:
        return public_text(self.public)


@dataclass(frozen=True)
class TrustedKeys:
    """The public keys a consumer accepts, by key id. Two at once during a rotation."""

    keys: dict[str, Ed25519PublicKey]

    @classmethod
    def parse(cls, text: str, *, source: str = "trusted keys") -> TrustedKeys:
        """Comma- or newline-separated base64 raw public keys; `#` starts a comment."""
        keys: dict[str, Ed25519PublicKey] = {}
        for line in text.splitlines():
            for item in line.split("#", 1)[0].split(","):
                if item.strip():
                    public = _parse_public(item.strip(), source)
                    keys[key_id_of(public)] = public
        return cls(keys)

    @classmethod
    def of(cls, *keys: SigningKey) -> TrustedKeys:
        return cls({key.key_id: key.public for key in keys})

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(sorted(self.keys))

    def __bool__(self) -> bool:
        return bool(self.keys)


def _parse_public(text: str, source: str) -> Ed25519PublicKey:
    try:
        raw = base64.b64decode(text, validate=True)
        return Ed25519PublicKey.from_public_bytes(raw)
    except (binascii.Error, ValueError) as exc:
        raise ConfigError(f"{source}: {text[:16]!r}… is not a base64 Ed25519 public key") from exc


def _signing_input(header: bytes, payload: bytes) -> bytes:
    return DOMAIN + len(header).to_bytes(4, "big") + header + payload


def seal(key: SigningKey, header: Header, payload: bytes) -> bytes:
    """The encoded envelope for `payload`; `header.key_id` must be this key's."""
    if header.key_id != key.key_id:
        raise ValueError(f"header names key {header.key_id}, signing with {key.key_id}")
    header_bytes = _encoder.encode(header)
    signature = key.private.sign(_signing_input(header_bytes, payload))
    return _encoder.encode(Envelope(header=header_bytes, payload=payload, signature=signature))


@dataclass(frozen=True)
class Opened:
    """A verified envelope: the header, and the payload bytes the signature covers."""

    header: Header
    payload: bytes

    @functools.cached_property
    def content_digest(self) -> str:
        """Identifies the signed content, whatever the validity window it was signed for
        (hashed once: admission, the seal and the logs all ask for it)."""
        return "sha256:" + hashlib.sha256(self.payload).hexdigest()


def open_envelope(data: bytes, trusted: TrustedKeys, *, kind: Kind) -> Opened:
    """Verify `data` against `trusted`; raise a SignatureError subclass when it fails."""
    if len(data) > events.MAX_MESSAGE_BYTES:
        raise events.MalformedEvent(f"message of {len(data)} bytes is too large")
    try:
        envelope = _envelope_decoder.decode(data)
        header = _header_decoder.decode(envelope.header)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
        raise Unsigned(f"not a signed {kind} envelope: {exc}") from exc
    public = trusted.keys.get(header.key_id)
    if public is None:
        raise UnknownKey(f"signed by {header.key_id}, trusted: {', '.join(trusted.ids) or 'none'}")
    try:
        public.verify(envelope.signature, _signing_input(envelope.header, envelope.payload))
    except InvalidSignature as exc:
        raise BadSignature(f"signature by {header.key_id} does not verify") from exc
    if header.kind != kind:
        raise Mismatch(f"a signed {header.kind} where a {kind} was expected")
    return Opened(header=header, payload=envelope.payload)


# --- snapshots ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SignedSnapshot:
    snapshot: events.EndpointSnapshot
    opened: Opened

    @property
    def header(self) -> Header:
        return self.opened.header

    @property
    def content_digest(self) -> str:
        return self.opened.content_digest

    def expired(self, now: datetime) -> bool:
        return now >= self.header.expires_at


def seal_snapshot(
    key: SigningKey, snapshot: events.EndpointSnapshot, *, now: datetime, ttl: timedelta
) -> bytes:
    header = Header(
        kind="snapshot",
        key_id=key.key_id,
        cluster=snapshot.cluster,
        generation=snapshot.generation,
        issued_at=now,
        expires_at=now + ttl,
    )
    return seal(key, header, events.encode(snapshot))


def reseal_snapshot(
    key: SigningKey, held: SignedSnapshot, *, now: datetime, ttl: timedelta
) -> bytes:
    """The same content and generation with a later expiry (the payload bytes are kept, so
    consumers see the same content digest and take it as a refresh)."""
    header = Header(
        kind="snapshot",
        key_id=key.key_id,
        cluster=held.header.cluster,
        generation=held.header.generation,
        issued_at=now,
        expires_at=now + ttl,
    )
    return seal(key, header, held.opened.payload)


def open_snapshot(data: bytes, trusted: TrustedKeys) -> SignedSnapshot:
    """Verify and decode; raises SignatureError or MalformedEvent, nothing else."""
    opened = open_envelope(data, trusted, kind="snapshot")
    snapshot = events.decode_snapshot(opened.payload)
    if (snapshot.cluster, snapshot.generation) != (opened.header.cluster, opened.header.generation):
        raise Mismatch(
            f"header says {opened.header.cluster}@{opened.header.generation}, payload "
            f"{snapshot.cluster}@{snapshot.generation}"
        )
    if events.canonical_digest(snapshot.service_endpoints, snapshot.apiserver_endpoints) != (
        snapshot.digest
    ):
        raise Mismatch("the snapshot's digest does not match its endpoints")
    return SignedSnapshot(snapshot=snapshot, opened=opened)


class Verdict(StrEnum):
    APPLY = "apply"  # a newer generation: program it
    REFRESH = "refresh"  # the generation held, re-signed with a later expiry: keep, don't re-apply


@dataclass(frozen=True)
class Held:
    """What a consumer holds: the highest generation it accepted and that content's digest."""

    generation: int
    content_digest: str


def judge(candidate: SignedSnapshot, held: Held | None, *, now: datetime) -> Verdict:
    """Accept a verified snapshot, or raise Refused with a reason label:

    - `expired`: its validity window is over (what is programmed stays; fail static);
    - `not-yet-valid`: issued in the future (beyond a minute of clock skew);
    - `rollback`: a lower generation than the one held;
    - `equivocation`: the held generation with other content.
    """
    header = candidate.header
    if candidate.expired(now):
        raise Refused("expired", f"generation {header.generation} expired at {header.expires_at}")
    if header.issued_at > now + CLOCK_SKEW:
        raise Refused("not-yet-valid", f"generation {header.generation} issued in the future")
    if held is None or header.generation > held.generation:
        return Verdict.APPLY
    if header.generation < held.generation:
        raise Refused("rollback", f"generation {header.generation} is older than {held.generation}")
    if candidate.content_digest != held.content_digest:
        raise Refused(
            "equivocation", f"generation {header.generation} signed again with other content"
        )
    return Verdict.REFRESH


CLOCK_SKEW: Final = timedelta(seconds=60)


# --- control requests --------------------------------------------------------------------


class ControlRequest(msgspec.Struct, frozen=True, kw_only=True):
    """An operator's request to one node-loader. `issued_at` makes it single-use: a loader
    accepts only requests newer than the last it accepted, within CONTROL_WINDOW of now."""

    cluster: str
    node: str
    connect_time_lb: bool
    issued_at: datetime


CONTROL_WINDOW: Final = timedelta(seconds=30)
_control_decoder: Final = msgspec.json.Decoder(ControlRequest)


def seal_control(key: SigningKey, request: ControlRequest) -> bytes:
    header = Header(
        kind="control",
        key_id=key.key_id,
        cluster=request.cluster,
        generation=0,
        issued_at=request.issued_at,
        expires_at=request.issued_at + CONTROL_WINDOW,
    )
    return seal(key, header, _encoder.encode(request))


def open_control(
    data: bytes,
    trusted: TrustedKeys,
    *,
    cluster: str,
    node: str,
    now: datetime,
    last_accepted: datetime | None,
) -> ControlRequest:
    """Verify an operator's request for this node; refuse replays, stale and misdirected ones."""
    opened = open_envelope(data, trusted, kind="control")
    try:
        request = _control_decoder.decode(opened.payload)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
        raise events.MalformedEvent(f"cannot decode control request: {exc}") from exc
    if (request.cluster, request.issued_at) != (opened.header.cluster, opened.header.issued_at):
        raise Mismatch("the signed header does not describe this request")
    if (request.cluster, request.node) != (cluster, node):
        raise Refused("misdirected", f"for {request.cluster}/{request.node}, not {cluster}/{node}")
    if abs(now - request.issued_at) > CONTROL_WINDOW:
        raise Refused("stale", f"issued at {request.issued_at}, now {now}")
    if last_accepted is not None and request.issued_at <= last_accepted:
        raise Refused("replay", f"not newer than the last accepted request ({last_accepted})")
    return request


def utcnow() -> datetime:
    return datetime.now(UTC)
