"""Anti-entropy's pure parts: what to do about the key's entry, and how often to write it back."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from apilane.discovery.antientropy import Action, Asserted, Assessment, ReassertPace, assess
from apilane.discovery.sealing import Sealer
from apilane.model import signing
from apilane.model.signing import SignedSnapshot, SigningKey
from apilane.runtime.bus import KvEntry
from apilane.testing.sealing import seal, seal_payload
from apilane.testing.snapshots import make_snapshot

pytestmark = [pytest.mark.unit]

CLUSTER = "c1"
KEY = SigningKey.generate()
SEALER = Sealer(KEY, timedelta(hours=1))
NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
HELD_REVISION = 7


def sealed(
    generation: int = 5,
    *,
    apiserver: str = "192.0.2.1:6443",
    key: SigningKey = KEY,
    issued_at: datetime | None = None,
) -> bytes:
    snapshot = make_snapshot(cluster=CLUSTER, generation=generation, apiservers=[apiserver])
    return seal(snapshot, key=key, issued_at=issued_at)


HELD_BYTES = sealed(issued_at=NOW)
HELD: SignedSnapshot = SEALER.open(HELD_BYTES)
ASSERTED = Asserted(HELD, HELD_REVISION)


def held_sealed_at(moment: datetime) -> bytes:
    """The held snapshot's payload bytes, sealed at another moment."""
    return signing.reseal_snapshot(KEY, HELD, now=moment, ttl=timedelta(hours=1))


def entry(value: bytes = HELD_BYTES, *, revision: int = 9, operation: str = "PUT") -> KvEntry:
    return KvEntry(bucket="b", key=CLUSTER, value=value, revision=revision, operation=operation)


def judged(found: KvEntry | None, asserted: Asserted | None = ASSERTED) -> Assessment:
    return assess(found, asserted, cluster=CLUSTER, open_=SEALER.open)


def tampered_signature(data: bytes) -> bytes:
    envelope = msgspec.json.decode(data, type=signing.Envelope)
    flipped = bytes([envelope.signature[0] ^ 1]) + envelope.signature[1:]
    return msgspec.json.encode(
        signing.Envelope(header=envelope.header, payload=envelope.payload, signature=flipped)
    )


def header_for_another_generation(data: bytes) -> bytes:
    """Discovery's key, but a header that does not describe the payload."""
    envelope = msgspec.json.decode(data, type=signing.Envelope)
    return seal_payload(envelope.payload, generation=6, cluster=CLUSTER, key=KEY)


@pytest.mark.parametrize(
    ("found", "action", "reason"),
    [
        pytest.param(None, Action.REASSERT, "missing", id="no-entry"),
        pytest.param(entry(b"", operation="DEL"), Action.REASSERT, "deleted", id="deleted"),
        pytest.param(entry(b"", operation="PURGE"), Action.REASSERT, "purged", id="purged"),
        pytest.param(entry(b"", operation="ODD"), Action.REASSERT, "deleted", id="other-marker"),
        pytest.param(entry(revision=HELD_REVISION), Action.KEEP, "held", id="held-revision"),
        pytest.param(entry(), Action.KEEP, "same", id="same-seal-elsewhere"),
        pytest.param(entry(b"garbage"), Action.REASSERT, "unsigned", id="garbage"),
        pytest.param(
            entry(sealed(key=SigningKey.generate())),
            Action.REASSERT,
            "unknown-key",
            id="another-key",
        ),
        pytest.param(
            entry(tampered_signature(HELD_BYTES)), Action.REASSERT, "bad-signature", id="tampered"
        ),
        pytest.param(
            entry(header_for_another_generation(HELD_BYTES)),
            Action.REASSERT,
            "mismatch",
            id="stapled-header",
        ),
        pytest.param(
            entry(seal_payload(b"{}", generation=5, cluster=CLUSTER, key=KEY)),
            Action.REASSERT,
            "malformed",
            id="signed-not-a-snapshot",
        ),
        pytest.param(
            entry(
                seal(
                    make_snapshot(cluster="c2", generation=5, apiservers=["192.0.2.1:6443"]),
                    key=KEY,
                )
            ),
            Action.REASSERT,
            "other-cluster",
            id="other-cluster",
        ),
        pytest.param(entry(sealed(6)), Action.RECONCILE, "newer", id="newer-generation"),
        pytest.param(entry(sealed(4)), Action.REASSERT, "rollback", id="older-generation"),
        pytest.param(
            entry(sealed(5, apiserver="192.0.2.9:6443", issued_at=NOW)),
            Action.REASSERT,
            "equivocation",
            id="same-generation-other-content",
        ),
        pytest.param(
            entry(held_sealed_at(NOW - timedelta(minutes=10))),
            Action.REASSERT,
            "stale",
            id="an-older-seal-of-the-same-snapshot",
        ),
        pytest.param(
            entry(held_sealed_at(NOW - timedelta(hours=2))),
            Action.REASSERT,
            "stale",
            id="an-expired-seal-of-the-same-snapshot",
        ),
    ],
)
def test_every_kind_of_entry(found: KvEntry | None, action: Action, reason: str) -> None:
    assessment = judged(found)
    assert (assessment.action, assessment.reason) == (action, reason)


def test_a_later_seal_of_the_same_snapshot_is_kept() -> None:
    """A refresh of discovery's own that the publisher has not recorded yet."""
    assert judged(entry(held_sealed_at(NOW + timedelta(minutes=5)))) == Assessment(
        Action.KEEP, "same"
    )


def test_the_same_content_sealed_again_is_same_content_for_consumers() -> None:
    """What a re-assertion writes: the generation and payload bytes held, a later expiry."""
    resealed = SEALER.open(SEALER.reseal(HELD))
    assert resealed.header.generation == HELD.header.generation
    assert resealed.content_digest == HELD.content_digest
    held = signing.Held(HELD.header.generation, HELD.content_digest)
    assert signing.judge(resealed, held, now=signing.utcnow()) is signing.Verdict.REFRESH


def test_nothing_is_done_before_anything_is_asserted() -> None:
    for found in (None, entry(b"garbage"), entry(b"", operation="PURGE"), entry()):
        assert judged(found, None) == Assessment(Action.KEEP, "nothing-asserted")


def test_without_a_revision_the_held_value_is_verified() -> None:
    """While the publisher re-reads the bucket it knows no revision: nothing is taken on trust."""
    unknown = Asserted(HELD, None)
    assert judged(entry(revision=HELD_REVISION), unknown).reason == "same"
    assert judged(entry(b"garbage", revision=HELD_REVISION), unknown).reason == "unsigned"


def test_a_refusal_carries_what_was_wrong() -> None:
    assessment = judged(entry(sealed(key=SigningKey.generate())))
    assert "signed by ed25519:" in assessment.detail
    assert judged(entry(sealed(4))).detail == "generation 4"


class Clock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


def test_the_first_reassertion_is_at_once_then_the_wait_doubles_up_to_the_maximum() -> None:
    clock = Clock()
    pace = ReassertPace(initial=0.5, maximum=4.0, clock=clock)
    assert pace.wait() == 0.0
    waits = []
    for _ in range(6):
        clock.now += pace.wait()
        pace.reasserted()
        waits.append(pace.wait())
    assert waits == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


def test_a_key_that_stayed_discoverys_for_a_while_starts_the_pace_over() -> None:
    clock = Clock()
    pace = ReassertPace(initial=0.5, maximum=4.0, clock=clock)
    for _ in range(4):
        clock.now += pace.wait()
        pace.reasserted()
    assert pace.wait() == 4.0
    clock.now += 4.0 + 4.0  # the wait, and the maximum without another re-assertion
    pace.reasserted()
    assert pace.wait() == 0.5


def test_a_flipping_writer_gets_a_bounded_number_of_reassertions() -> None:
    """The guard re-asserts whenever the pace allows and the key was flipped again."""
    clock = Clock()
    pace = ReassertPace(initial=0.5, maximum=10.0, clock=clock)
    start, count = clock.now, 0
    while clock.now - start < 60:  # the writer flips the key every 10 ms for a minute
        if pace.wait() == 0:
            pace.reasserted()
            count += 1
        clock.now += 0.01
    # 0, 0.5, 1.5, 3.5, 7.5, 15.5, then every 10 s
    assert count <= 10
