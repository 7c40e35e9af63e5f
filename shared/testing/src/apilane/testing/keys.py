"""Signing keys for tests, benches and the local stack: a fresh Ed25519 key per run, its PEM
written where discovery reads it (APILANE_SIGNING_KEY_FILE), and snapshots sealed with it
as discovery seals them."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

from apilane.model import events
from apilane.model.signing import SigningKey, seal_snapshot, utcnow

DEFAULT_TTL = timedelta(hours=1)


def write_signing_key(directory: Path, name: str = "discovery") -> tuple[SigningKey, Path]:
    """A new key and the PEM file holding it (readable by its owner only)."""
    key = SigningKey.generate()
    path = directory / f"{name}-signing-key.pem"
    path.write_bytes(key.to_pem())
    path.chmod(0o600)
    return key, path


def sealed(
    key: SigningKey,
    snapshot: events.EndpointSnapshot,
    *,
    ttl: timedelta = DEFAULT_TTL,
    now: datetime | None = None,
) -> bytes:
    """The KV value discovery would write for `snapshot`."""
    return seal_snapshot(key, snapshot, now=now or utcnow(), ttl=ttl)


def signing_environment(directory: Path) -> dict[str, str]:
    """For services run as processes: a fresh key, named to discovery by its PEM file
    (APILANE_SIGNING_KEY_FILE) and to the snapshot consumers by its public key
    (APILANE_TRUSTED_KEYS). Each service reads only its own of the two."""
    key, path = write_signing_key(directory)
    return {"APILANE_SIGNING_KEY_FILE": str(path), "APILANE_TRUSTED_KEYS": key.public_text}
