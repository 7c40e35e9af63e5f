"""admission.py and the reconciler's side of it: which signed values reach the maps, what is
persisted so that a restart cannot be rolled back, refresh and expiry without map writes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from apilane.model import events, signing
from apilane.model.signing import SigningKey, TrustedKeys, Verdict
from apilane.node_loader.admission import Admitted, Refusal, admit, held
from apilane.node_loader.memmaps import MemoryNatMaps
from apilane.node_loader.reconcile import Outcome, Reconciler
from apilane.node_loader.statefile import AppliedState, PersistedState, StateFile
from apilane.testing.sealing import TEST_KEY, reseal, seal, seal_payload
from apilane.testing.snapshots import make_snapshot

pytestmark = [pytest.mark.unit]

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
HOUR = timedelta(hours=1)
TRUSTED = TrustedKeys.of(TEST_KEY)
HA3 = ("10.0.0.1:6443", "10.0.0.2:6443", "10.0.0.3:6443")


def sealed(generation: int, *, key: SigningKey = TEST_KEY, at: datetime = NOW, **kw) -> bytes:
    return seal(make_snapshot(generation=generation, **kw), key=key, issued_at=at, ttl=HOUR)


def admitted(data: bytes, accepted: AppliedState | None = None, now: datetime = NOW) -> Admitted:
    result = admit(data, TRUSTED, accepted, now=now)
    assert isinstance(result, Admitted), result
    return result


def refused(data: bytes, accepted: AppliedState | None = None, now: datetime = NOW) -> Refusal:
    result = admit(data, TRUSTED, accepted, now=now)
    assert isinstance(result, Refusal), result
    return result


def applied_state(data: bytes) -> AppliedState:
    accepted = admitted(data)
    snapshot = accepted.signed.snapshot
    return AppliedState(
        generation=snapshot.generation,
        digest=snapshot.digest,
        applied_at=NOW,
        snapshot=snapshot,
        seal=accepted.seal,
    )


def test_a_sealed_snapshot_is_admitted_with_its_seal() -> None:
    result = admitted(sealed(5))
    assert result.verdict is Verdict.APPLY and result.generation == 5
    assert result.seal.key_id == TEST_KEY.key_id
    assert result.seal.expires_at == NOW + HOUR
    assert result.seal.content_digest == result.signed.content_digest


@pytest.mark.parametrize(
    ("data", "reason", "error"),
    [
        (events.encode(make_snapshot(generation=5)), "unsigned", signing.Unsigned),
        (b'{"truncated', "unsigned", signing.Unsigned),
        (sealed(5, key=SigningKey.generate()), "unknown-key", signing.UnknownKey),
        (
            seal(msgspec.structs.replace(make_snapshot(generation=5), digest="sha256:0")),
            "mismatch",
            signing.Mismatch,
        ),
    ],
    ids=["plain-json", "garbage", "unknown-key", "bad-digest"],
)
def test_what_no_trusted_key_vouches_for_is_refused_with_the_typed_error(
    data: bytes, reason: str, error: type[signing.SignatureError]
) -> None:
    refusal = refused(data)
    assert refusal.reason == reason and isinstance(refusal.error, error)
    assert refusal.generation == 0 and refusal.key_id == ""  # an unverified header says nothing


def test_a_tampered_payload_is_a_bad_signature() -> None:
    data = sealed(5)
    envelope = msgspec.json.decode(data, type=signing.Envelope)
    attacker = events.encode(make_snapshot(generation=5, apiservers=("203.0.113.9:6443",)))
    forged = msgspec.json.encode(
        signing.Envelope(header=envelope.header, payload=attacker, signature=envelope.signature)
    )
    assert refused(forged).reason == "bad-signature"


def test_rollback_equivocation_and_expiry_are_judged_against_what_is_held() -> None:
    original = sealed(5, apiservers=HA3)
    holding = applied_state(original)
    older = refused(sealed(4), holding)
    assert older.reason == "rollback" and older.generation == 4
    assert older.key_id == TEST_KEY.key_id
    assert refused(sealed(5, apiservers=("10.0.0.9:6443",)), holding).reason == "equivocation"
    assert refused(sealed(6), holding, now=NOW + HOUR).reason == "expired"
    assert refused(sealed(6, at=NOW + HOUR), holding).reason == "not-yet-valid"
    assert admitted(sealed(6), holding).verdict is Verdict.APPLY
    again = reseal(original, issued_at=NOW + HOUR / 2, ttl=HOUR)
    assert admitted(again, holding, now=NOW + HOUR).verdict is Verdict.REFRESH


def test_a_validly_signed_payload_that_is_no_snapshot_is_malformed() -> None:
    with pytest.raises(events.MalformedEvent):
        admit(seal_payload(b'{"truncated', generation=5), TRUSTED, None, now=NOW)


def test_a_state_file_from_before_signing_adopts_the_same_content_only() -> None:
    """Applied by an older loader: no seal. The same generation and endpoints, now signed,
    is its refresh; other content under that generation is equivocation."""
    legacy = msgspec.structs.replace(applied_state(sealed(5, apiservers=HA3)), seal=None)
    # Signed anew by discovery: another observation time, so other payload bytes, but the
    # endpoints (and so the snapshot's digest) are the ones applied.
    resigned = sealed(5, apiservers=HA3)
    same = open_signed(resigned)
    assert held(legacy, same) == signing.Held(generation=5, content_digest=same.content_digest)
    assert admitted(resigned, legacy).verdict is Verdict.REFRESH
    assert refused(sealed(5), legacy).reason == "equivocation"
    assert refused(sealed(4, apiservers=HA3), legacy).reason == "rollback"
    assert admitted(sealed(6), legacy).verdict is Verdict.APPLY


def open_signed(data: bytes) -> signing.SignedSnapshot:
    return signing.open_snapshot(data, TRUSTED)


# --- the reconciler's side: seal persisted with the applied state ----------------------


def test_the_seal_is_persisted_with_the_applied_state_and_survives_a_restart(tmp_path) -> None:
    state_file = StateFile(tmp_path / "state.json")
    maps = MemoryNatMaps()
    first = Reconciler(maps=maps, cluster="default", state_file=state_file)
    accepted = admitted(sealed(5, apiservers=HA3))
    assert first.apply(accepted.signed.snapshot, seal=accepted.seal).outcome is Outcome.APPLIED
    saved = state_file.load()
    assert saved is not None and saved.seal == accepted.seal and saved.generation == 5

    second = Reconciler(maps=maps, cluster="default", state_file=state_file)
    second.recover()
    assert second.accepted is not None and second.accepted.seal == accepted.seal
    # After the restart, a replay of an older generation is still a rollback.
    assert refused(sealed(4), second.accepted).reason == "rollback"


def test_a_refresh_keeps_the_maps_and_persists_the_later_expiry(tmp_path) -> None:
    state_file = StateFile(tmp_path / "state.json")
    maps = MemoryNatMaps()
    reconciler = Reconciler(maps=maps, cluster="default", state_file=state_file)
    original = sealed(5, apiservers=HA3)
    first = admitted(original)
    reconciler.apply(first.signed.snapshot, seal=first.seal)
    assert not reconciler.stale(NOW + HOUR / 2) and reconciler.stale(NOW + HOUR)
    operations = maps.operations

    resealed = reseal(original, issued_at=NOW + HOUR)
    later = admitted(resealed, first_state(first), now=NOW + HOUR)
    assert later.verdict is Verdict.REFRESH
    assert reconciler.refresh(later.seal) == ""
    assert maps.operations == operations
    assert not reconciler.stale(NOW + HOUR) and reconciler.stale(NOW + 2 * HOUR)
    saved = state_file.load()
    assert saved is not None and saved.seal is not None
    assert saved.seal.expires_at == NOW + 2 * HOUR
    # An older signature of the same content never shortens what is held.
    assert reconciler.refresh(first.seal) == ""
    assert reconciler.seal is not None and reconciler.seal.expires_at == NOW + 2 * HOUR


def first_state(accepted: Admitted) -> AppliedState:
    snapshot = accepted.signed.snapshot
    return AppliedState(
        generation=snapshot.generation,
        digest=snapshot.digest,
        applied_at=NOW,
        snapshot=snapshot,
        seal=accepted.seal,
    )


def test_the_last_control_request_is_persisted_with_or_without_an_applied_state(tmp_path):
    state_file = StateFile(tmp_path / "state.json")
    reconciler = Reconciler(maps=MemoryNatMaps(), cluster="default", state_file=state_file)
    reconciler.recover()
    reconciler.record_lb_switch(None, control_issued_at=NOW)
    saved = state_file.load()
    assert saved == PersistedState(control_issued_at=NOW)
    accepted = admitted(sealed(1))
    reconciler.apply(accepted.signed.snapshot, seal=accepted.seal)
    saved = state_file.load()
    assert saved is not None and saved.control_issued_at == NOW and saved.generation == 1
    again = Reconciler(maps=MemoryNatMaps(), cluster="default", state_file=state_file)
    again.recover()
    assert again.control_issued_at == NOW
