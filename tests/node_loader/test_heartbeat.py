"""The NodeState rate bound: on change at once, unchanged at most once per interval."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from apilane.model.events import NodeState
from apilane.node_loader.heartbeat import Heartbeat

pytestmark = pytest.mark.unit


def state(generation: int = 1, *, at: datetime | None = None, error: str = "") -> NodeState:
    return NodeState(
        cluster="c",
        node="n",
        generation=generation,
        digest="sha256:x",
        last_error=error,
        updated_at=at or datetime.now(UTC),
    )


def test_the_first_state_is_written() -> None:
    assert Heartbeat(interval=30).due(state(), now=0.0)


def test_an_unchanged_state_waits_for_the_interval_whatever_its_write_time() -> None:
    beat = Heartbeat(interval=30)
    first = state()
    beat.written(first, now=100.0)
    later = msgspec.structs.replace(first, updated_at=first.updated_at + timedelta(seconds=5))
    assert not beat.due(later, now=105.0)
    assert not beat.due(later, now=129.9)
    assert beat.due(later, now=130.0)  # the heartbeat


def test_a_changed_state_is_written_at_once() -> None:
    beat = Heartbeat(interval=30)
    beat.written(state(1), now=100.0)
    assert beat.due(state(2), now=100.1)
    assert beat.due(state(1, error="refused"), now=100.1)


def test_a_write_nats_did_not_take_does_not_count() -> None:
    beat = Heartbeat(interval=30)
    beat.written(state(1), now=100.0)
    assert beat.due(state(2), now=101.0)  # not recorded as written: still due
    assert beat.due(state(2), now=102.0)
