"""What a node-loader tells the cluster: its NodeState in KV and its warnings on the stream.

Both are best effort: with NATS down the data plane does not care, a failed write is logged
and the next heartbeat writes the state again.
"""

from __future__ import annotations

import logging

from apilane.model import subjects
from apilane.model.events import ClusterWarning, NodeState
from apilane.runtime.bus import Bus, BusError

log = logging.getLogger(__name__)

SOURCE = "node-loader"


class Reporter:
    def __init__(self, *, cluster: str, node: str) -> None:
        self.cluster = cluster
        self.node = node
        self.bus: Bus | None = None  # set once connected
        self._state_key = subjects.node_state_key(cluster, node)
        self._warnings = subjects.warnings_subject(cluster)

    async def write_state(self, state: NodeState) -> bool:
        """Put the NodeState; False when NATS did not take it."""
        if self.bus is None:
            return False
        try:
            await self.bus.kv_put(subjects.NODE_STATE_BUCKET, self._state_key, state, timeout=2.0)
        except BusError as exc:
            log.warning("cannot write the node state", extra={"error": str(exc)})
            return False
        return True

    async def warn(self, reason: str, message: str, generation: int, *, detail: str = "") -> None:
        """Publish a warning. JetStream drops a repeat of the same (reason, generation,
        detail) from this node within its duplicate window: a replayed bad snapshot warns
        once, not on every delivery."""
        if self.bus is None:
            return
        warning = ClusterWarning(
            cluster=self.cluster,
            reason=str(reason),
            message=message,
            source=f"{SOURCE}/{self.node}",
            object_ref=f"Node/{self.node}",
            generation=generation,
        )
        msg_id = f"{SOURCE}:{self.node}:{generation}:{reason}" + (f":{detail}" if detail else "")
        try:
            await self.bus.publish(self._warnings, warning, msg_id=msg_id, timeout=2.0)
        except BusError as exc:
            log.warning(
                "cannot publish a warning", extra={"error": str(exc), "reason": str(reason)}
            )
