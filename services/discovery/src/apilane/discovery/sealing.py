"""How discovery signs what it publishes, and reads its own signatures back. Pure.

Discovery trusts only itself: the only key it verifies the bucket's value with is its own
signing key (replicas share it). Anything else in the key (unsigned, another key, altered)
is not discovery's, whatever it claims, and is replaced.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cached_property

from apilane.model import events
from apilane.model.signing import (
    SignedSnapshot,
    SigningKey,
    TrustedKeys,
    open_snapshot,
    reseal_snapshot,
    seal_snapshot,
    utcnow,
)


@dataclass(frozen=True)
class Sealer:
    """Discovery's key, the validity window of what it signs, and the wall clock."""

    key: SigningKey
    ttl: timedelta
    now: Callable[[], datetime] = utcnow

    @cached_property
    def itself(self) -> TrustedKeys:
        return TrustedKeys.of(self.key)

    def seal(self, snapshot: events.EndpointSnapshot) -> bytes:
        return seal_snapshot(self.key, snapshot, now=self.now(), ttl=self.ttl)

    def reseal(self, held: SignedSnapshot) -> bytes:
        """The same generation and payload bytes, valid for another `ttl` from now."""
        return reseal_snapshot(self.key, held, now=self.now(), ttl=self.ttl)

    def open(self, data: bytes) -> SignedSnapshot:
        """Verify against discovery's own key; raises SignatureError or MalformedEvent."""
        return open_snapshot(data, self.itself)

    def refresh_in(self, held: SignedSnapshot) -> float:
        """Seconds until `held` is due to be re-signed: half its validity window after it
        was issued, so a missed refresh or two still leave it valid (0 when overdue)."""
        header = held.header
        due = header.issued_at + (header.expires_at - header.issued_at) / 2
        return max(0.0, (due - self.now()).total_seconds())
