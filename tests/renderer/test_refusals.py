"""How a refused snapshot is reported: the metric's reason label and the warning's reason."""

from __future__ import annotations

from datetime import timedelta

import pytest

from apilane.model import events
from apilane.model.events import WarningReason
from apilane.model.signing import (
    BadSignature,
    Held,
    Mismatch,
    Refused,
    SignatureError,
    SigningKey,
    TrustedKeys,
    UnknownKey,
    Unsigned,
    judge,
    open_snapshot,
    seal_snapshot,
    utcnow,
)
from apilane.renderer.metrics import REFUSAL_REASONS
from apilane.renderer.service import refusal_label, refusal_warning
from apilane.testing.snapshots import make_snapshot

pytestmark = [pytest.mark.unit]


@pytest.mark.parametrize(
    ("error", "label", "warning"),
    [
        (Unsigned("x"), "unsigned", WarningReason.SNAPSHOT_REFUSED),
        (events.MalformedEvent("x"), "malformed", WarningReason.INVALID_SNAPSHOT),
        (UnknownKey("x"), "unknown-key", WarningReason.SNAPSHOT_REFUSED),
        (BadSignature("x"), "bad-signature", WarningReason.SNAPSHOT_REFUSED),
        (Mismatch("x"), "mismatch", WarningReason.SNAPSHOT_REFUSED),
        (Refused("rollback", "x"), "rollback", WarningReason.SNAPSHOT_REFUSED),
        (Refused("other-cluster", "x"), "other-cluster", WarningReason.SNAPSHOT_REFUSED),
    ],
)
def test_each_refusal_has_a_label_and_a_warning(
    error: SignatureError | events.MalformedEvent, label: str, warning: WarningReason
) -> None:
    assert refusal_label(error) == label
    assert refusal_warning(error) is warning
    assert label in REFUSAL_REASONS


def test_every_reason_judge_gives_is_a_known_label() -> None:
    key = SigningKey.generate()
    trusted = TrustedKeys.of(key)
    now = utcnow()

    def signed(
        generation: int, *, issued: timedelta = timedelta(0), apiserver: str = "10.0.0.1:6443"
    ):
        snapshot = make_snapshot(generation=generation, apiservers=[apiserver])
        return open_snapshot(
            seal_snapshot(key, snapshot, now=now + issued, ttl=timedelta(minutes=5)), trusted
        )

    held = Held(generation=5, content_digest=signed(5).content_digest)
    cases = [
        signed(6, issued=timedelta(minutes=-10)),  # expired
        signed(6, issued=timedelta(minutes=10)),  # not yet valid
        signed(4),  # rollback
        signed(5, apiserver="10.0.0.9:6443"),  # equivocation
    ]
    labels = set()
    for candidate in cases:
        with pytest.raises(Refused) as refused:
            judge(candidate, held, now=now)
        labels.add(refusal_label(refused.value))
    assert labels == {"expired", "not-yet-valid", "rollback", "equivocation"}
    assert labels <= set(REFUSAL_REASONS)
