"""The republish feed's pure core: what a loader does with each republished copy."""

from __future__ import annotations

import pytest

from apilane.model.errors import ConfigError
from apilane.node_loader import settings as loader_settings
from apilane.node_loader.feed import Republished, Step, next_step, republished
from apilane.runtime.bus import CoreMessage
from apilane.testing.sealing import trusted_env

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("held", "revision", "previous", "step"),
    [
        (0, 1, 0, Step.TAKE),  # the first value of the key
        (5, 9, 5, Step.TAKE),  # the next value (other keys' writes in between: 6..8)
        (5, 5, 3, Step.SKIP),  # the one held, again
        (5, 4, 3, Step.SKIP),  # older
        (5, 9, 7, Step.RESYNC),  # revision 7 was missed
        (0, 9, 7, Step.RESYNC),  # nothing held yet, and the copy is not the first
    ],
)
def test_each_copy_is_taken_skipped_or_makes_the_loader_read_the_key(
    held: int, revision: int, previous: int, step: Step
) -> None:
    assert next_step(held, Republished(revision=revision, previous=previous)) is step


def test_the_sequences_come_from_the_republish_headers() -> None:
    copy = CoreMessage(
        subject="apilane.v1.c.snapshot",
        data=b"",
        headers={"Nats-Sequence": "12", "Nats-Last-Sequence": "10"},
    )
    assert republished(copy) == Republished(revision=12, previous=10)
    assert republished(CoreMessage(subject="s", data=b"", headers={})) is None
    bad = CoreMessage(subject="s", data=b"", headers={"Nats-Sequence": "x"})
    assert republished(bad) is None


def test_the_fanout_is_a_setting_with_the_republished_copies_as_default() -> None:
    env = {"APILANE_MAP_BACKEND": "memory", "APILANE_NODE_NAME": "n1", **trusted_env()}
    assert loader_settings.load(env).snapshot_fanout == "republish"
    chosen = loader_settings.load({**env, "APILANE_SNAPSHOT_FANOUT": "watch"})
    assert chosen.snapshot_fanout == "watch"
    with pytest.raises(ConfigError):
        loader_settings.load({**env, "APILANE_SNAPSHOT_FANOUT": "carrier-pigeon"})
