"""PURE: which KV values may reach the maps. Every snapshot is verified before anything else.

A value is opened against the trusted keys (`signing.open_snapshot`: a trusted Ed25519
signature over exactly these bytes, header and payload consistent) and judged against the
snapshot this node accepted last (`signing.judge`: no rollback to an older generation, no
other content under the held generation, nothing expired or issued in the future). What is
held survives restarts in the state file, so a replay is refused after a restart as well.

A state file written before snapshots were signed has no content digest: the first signed
snapshot of that same generation whose endpoints are the ones applied is adopted as its
refresh; any other content under that generation is refused as equivocation.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from apilane.model import signing
from apilane.model.signing import Held, SignatureError, SignedSnapshot, TrustedKeys, Verdict
from apilane.node_loader.statefile import AppliedState, Seal


@dataclass(frozen=True, slots=True)
class Admitted:
    """A verified snapshot and what to do with it."""

    signed: SignedSnapshot
    verdict: Verdict

    @property
    def seal(self) -> Seal:
        return Seal(
            content_digest=self.signed.content_digest,
            expires_at=self.signed.header.expires_at,
            key_id=self.signed.header.key_id,
        )

    @property
    def generation(self) -> int:
        return self.signed.snapshot.generation


@dataclass(frozen=True, slots=True)
class Refusal:
    """A value that must not reach the maps, with the typed error that says why."""

    error: SignatureError
    signed: SignedSnapshot | None = None  # set when it verified but was judged unacceptable

    @property
    def reason(self) -> str:
        """unsigned, unknown-key, bad-signature, mismatch (the signature), or expired,
        not-yet-valid, rollback, equivocation (the judgement of a verified snapshot)."""
        return self.error.reason

    @property
    def generation(self) -> int:
        """The refused generation; 0 when the signature did not verify (nothing in an
        unverified header is to be believed)."""
        return self.signed.snapshot.generation if self.signed else 0

    @property
    def key_id(self) -> str:
        return self.signed.header.key_id if self.signed else ""


def admit(
    data: bytes, trusted: TrustedKeys, accepted: AppliedState | None, *, now: datetime
) -> Admitted | Refusal:
    """Verify and judge one KV value against the snapshot accepted last. Raises only
    `events.MalformedEvent` (validly signed, but not a snapshot)."""
    try:
        signed = signing.open_snapshot(data, trusted)
    except SignatureError as exc:
        return Refusal(error=exc)
    try:
        verdict = signing.judge(signed, held(accepted, signed), now=now)
    except SignatureError as exc:
        return Refusal(error=exc, signed=signed)
    return Admitted(signed=signed, verdict=verdict)


def held(accepted: AppliedState | None, candidate: SignedSnapshot) -> Held | None:
    """What `candidate` is judged against: the accepted generation and its content digest."""
    if accepted is None:
        return None
    if accepted.seal is not None:
        return Held(generation=accepted.generation, content_digest=accepted.seal.content_digest)
    adoptable = (
        candidate.snapshot.generation == accepted.generation
        and candidate.snapshot.digest == accepted.digest
    )
    return Held(
        generation=accepted.generation,
        content_digest=candidate.content_digest if adoptable else "",
    )
