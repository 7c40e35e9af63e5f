"""How often a node-loader writes its NodeState: on every change, else once per interval.

Thousands of loaders write into one node-state bucket. A write that says nothing new (the
same refusal again, a housekeeping tick) is skipped unless the interval has passed since the
last one: the periodic write is the heartbeat, by which `apilane status` tells a live node
from a stale one (its `updated_at`), and which keeps its key from expiring (the bucket's max
age removes nodes gone from the cluster, see `Bus.create_streams`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import msgspec

from apilane.model.events import NodeState

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _content(state: NodeState) -> NodeState:
    """The state without its write time: what a reader learns from it."""
    return msgspec.structs.replace(state, updated_at=_EPOCH)


@dataclass
class Heartbeat:
    """The rate bound: `due(state, now)` says whether to write `state` at monotonic `now`;
    `written(state, now)` records a write that NATS took."""

    interval: float
    _last: NodeState | None = None
    _last_at: float = float("-inf")

    def due(self, state: NodeState, now: float) -> bool:
        if self._last is None or now - self._last_at >= self.interval:
            return True
        return _content(state) != _content(self._last)

    def written(self, state: NodeState, now: float) -> None:
        self._last, self._last_at = state, now
