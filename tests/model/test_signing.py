"""Signed envelopes: who may be trusted, and which signed snapshots and requests are accepted."""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime, timedelta

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apilane.model import events, signing
from apilane.model.errors import ConfigError
from apilane.model.signing import (
    ControlRequest,
    Held,
    SigningKey,
    TrustedKeys,
    Verdict,
    judge,
    open_control,
    open_snapshot,
    reseal_snapshot,
    seal_control,
    seal_snapshot,
)
from apilane.testing.snapshots import make_snapshot

pytestmark = [pytest.mark.unit]

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
HOUR = timedelta(hours=1)
KEY = SigningKey.generate()
TRUSTED = TrustedKeys.of(KEY)


def sealed(
    generation: int = 5, *, key: SigningKey = KEY, now: datetime = NOW, **kw: object
) -> bytes:
    return seal_snapshot(key, make_snapshot(generation=generation, **kw), now=now, ttl=HOUR)  # type: ignore[arg-type]


def test_a_sealed_snapshot_opens_to_the_same_snapshot() -> None:
    snapshot = make_snapshot(generation=5, apiservers=("10.0.0.1:6443", "[fd00::2]:6443"))
    opened = open_snapshot(seal_snapshot(KEY, snapshot, now=NOW, ttl=HOUR), TRUSTED)
    assert opened.snapshot == snapshot
    assert opened.header.key_id == KEY.key_id
    assert opened.header.expires_at == NOW + HOUR
    assert not opened.expired(NOW) and opened.expired(NOW + HOUR)


def test_an_unsigned_snapshot_is_refused() -> None:
    raw = events.encode(make_snapshot(generation=5))
    with pytest.raises(signing.Unsigned):
        open_snapshot(raw, TRUSTED)
    with pytest.raises(signing.Unsigned):
        open_snapshot(b"\x00garbage", TRUSTED)


def test_a_snapshot_signed_by_an_unknown_key_is_refused() -> None:
    with pytest.raises(signing.UnknownKey, match=KEY.key_id):
        open_snapshot(sealed(key=SigningKey.generate()), TrustedKeys.of(KEY))
    with pytest.raises(signing.UnknownKey):
        open_snapshot(sealed(), TrustedKeys({}))


def _tamper(data: bytes, *, header: bytes | None = None, payload: bytes | None = None) -> bytes:
    envelope = msgspec.json.decode(data, type=signing.Envelope)
    changed = signing.Envelope(
        header=header if header is not None else envelope.header,
        payload=payload if payload is not None else envelope.payload,
        signature=envelope.signature,
    )
    return msgspec.json.encode(changed)


def test_any_change_to_the_payload_or_header_breaks_the_signature() -> None:
    data = sealed()
    envelope = msgspec.json.decode(data, type=signing.Envelope)
    attacker = events.encode(make_snapshot(generation=5, apiservers=("203.0.113.9:6443",)))
    with pytest.raises(signing.BadSignature):
        open_snapshot(_tamper(data, payload=attacker), TRUSTED)
    later = envelope.header.replace(b"2026-12-01T13", b"2027-12-01T13")
    with pytest.raises(signing.BadSignature):
        open_snapshot(_tamper(data, header=later), TRUSTED)


def test_a_header_for_another_generation_or_cluster_is_a_mismatch() -> None:
    snapshot = make_snapshot(generation=5)
    header = signing.Header(
        kind="snapshot",
        key_id=KEY.key_id,
        cluster="default",
        generation=6,
        issued_at=NOW,
        expires_at=NOW + HOUR,
    )
    with pytest.raises(signing.Mismatch):
        open_snapshot(signing.seal(KEY, header, events.encode(snapshot)), TRUSTED)


def test_a_payload_whose_digest_does_not_match_its_endpoints_is_a_mismatch() -> None:
    snapshot = msgspec.structs.replace(make_snapshot(generation=5), digest="sha256:00")
    with pytest.raises(signing.Mismatch, match="digest"):
        open_snapshot(seal_snapshot(KEY, snapshot, now=NOW, ttl=HOUR), TRUSTED)


def test_a_control_envelope_is_not_a_snapshot() -> None:
    request = ControlRequest(cluster="default", node="n1", connect_time_lb=False, issued_at=NOW)
    with pytest.raises(signing.Mismatch):
        open_snapshot(seal_control(KEY, request), TRUSTED)


def test_trusted_keys_parse_and_two_keys_at_once_for_a_rotation() -> None:
    new = SigningKey.generate()
    trusted = TrustedKeys.parse(f"{KEY.public_text}, # old\n{new.public_text}\n")
    assert set(trusted.ids) == {KEY.key_id, new.key_id}
    assert open_snapshot(sealed(key=KEY), trusted).header.key_id == KEY.key_id
    assert open_snapshot(sealed(key=new), trusted).header.key_id == new.key_id
    with pytest.raises(ConfigError, match="not a base64 Ed25519"):
        TrustedKeys.parse("bm90IGEga2V5")


def test_a_key_round_trips_through_pem_and_bad_pem_is_a_config_error() -> None:
    again = SigningKey.from_pem(KEY.to_pem())
    assert again.key_id == KEY.key_id
    with pytest.raises(ConfigError, match="PEM"):
        SigningKey.from_pem(b"-----BEGIN PRIVATE KEY-----\nxx\n-----END PRIVATE KEY-----\n")


def test_judge_applies_newer_refreshes_the_same_and_refuses_older_or_other_content() -> None:
    first = open_snapshot(sealed(5), TRUSTED)
    held = Held(generation=5, content_digest=first.content_digest)
    assert judge(first, None, now=NOW) is Verdict.APPLY
    assert judge(open_snapshot(sealed(6), TRUSTED), held, now=NOW) is Verdict.APPLY
    refreshed = open_snapshot(reseal_snapshot(KEY, first, now=NOW + HOUR / 2, ttl=HOUR), TRUSTED)
    assert refreshed.content_digest == first.content_digest
    assert judge(refreshed, held, now=NOW + HOUR) is Verdict.REFRESH
    with pytest.raises(signing.Refused) as rollback:
        judge(open_snapshot(sealed(4), TRUSTED), held, now=NOW)
    assert rollback.value.reason == "rollback"
    other = open_snapshot(sealed(5, apiservers=("10.0.0.9:6443",)), TRUSTED)
    with pytest.raises(signing.Refused) as equivocation:
        judge(other, held, now=NOW)
    assert equivocation.value.reason == "equivocation"


def test_judge_refuses_expired_and_future_snapshots() -> None:
    with pytest.raises(signing.Refused) as expired:
        judge(open_snapshot(sealed(6), TRUSTED), None, now=NOW + HOUR)
    assert expired.value.reason == "expired"
    with pytest.raises(signing.Refused) as future:
        judge(open_snapshot(sealed(6, now=NOW + HOUR / 2), TRUSTED), None, now=NOW)
    assert future.value.reason == "not-yet-valid"


def _control(at: datetime, *, node: str = "n1") -> bytes:
    request = ControlRequest(cluster="default", node=node, connect_time_lb=False, issued_at=at)
    return seal_control(KEY, request)


def test_control_requests_are_single_use_fresh_and_for_this_node() -> None:
    accepted = open_control(
        _control(NOW), TRUSTED, cluster="default", node="n1", now=NOW, last_accepted=None
    )
    assert accepted.connect_time_lb is False
    cases = {
        "replay": dict(data=_control(NOW), now=NOW, last_accepted=NOW),
        "stale": dict(data=_control(NOW - timedelta(minutes=5)), now=NOW, last_accepted=None),
        "misdirected": dict(data=_control(NOW, node="n2"), now=NOW, last_accepted=None),
    }
    for reason, case in cases.items():
        with pytest.raises(signing.Refused) as refused:
            open_control(
                case["data"],  # type: ignore[arg-type]
                TRUSTED,
                cluster="default",
                node="n1",
                now=case["now"],  # type: ignore[arg-type]
                last_accepted=case["last_accepted"],  # type: ignore[arg-type]
            )
        assert refused.value.reason == reason
    with pytest.raises(signing.UnknownKey):
        open_control(
            _control(NOW),
            TrustedKeys.of(SigningKey.generate()),
            cluster="default",
            node="n1",
            now=NOW,
            last_accepted=None,
        )


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_opening_arbitrary_bytes_raises_only_our_errors(data: bytes) -> None:
    with contextlib.suppress(signing.SignatureError, events.MalformedEvent):
        open_snapshot(data, TRUSTED)


SEALED = sealed()


@settings(max_examples=300, deadline=None)
@given(st.integers(0, len(SEALED) - 1), st.integers(1, 255))
def test_flipping_any_byte_of_a_sealed_snapshot_never_yields_a_different_snapshot(
    position: int, flip: int
) -> None:
    data = bytearray(SEALED)
    data[position] ^= flip
    try:
        opened = open_snapshot(bytes(data), TRUSTED)
    except (signing.SignatureError, events.MalformedEvent):
        return
    # JSON may tolerate some changes (e.g. in whitespace-free escapes); the content may not.
    assert opened.snapshot == open_snapshot(SEALED, TRUSTED).snapshot
