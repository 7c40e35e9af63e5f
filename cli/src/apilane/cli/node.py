"""`apilane node lb on|off NODE`: switch one node's connect-time load balancer, live.

The request is a `signing.ControlRequest` sealed with the operator's key (the local stack's,
from its stack file, or APILANE_OPERATOR_KEY_FILE), sent as a core NATS request to the node's
control subject as the operator's NATS identity. The node-loader opens it against its
APILANE_OPERATOR_KEYS, switches the programs (its maps stay as they are) and answers with its
NodeState, or refuses with `{"error": ..., "reason": ...}` and changes nothing. Exit codes: 0
switched, 1 refused or not done, 2 bad usage.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TextIO

import msgspec

from apilane.cli.errors import CliError
from apilane.cli.status import connect_bus
from apilane.cli.target import StackInfo
from apilane.model import events, signing, subjects
from apilane.model.errors import ConfigError
from apilane.model.events import NodeState
from apilane.model.signing import ControlRequest, SigningKey
from apilane.runtime.bus import BusError, PermissionDenied

REPLY_TIMEOUT = 5.0

# --------------------------------------------------------------------------- pure


@dataclass(frozen=True)
class Refusal:
    """The node's answer when it did not act on the request."""

    reason: str
    error: str


def sealed_request(
    key: SigningKey, *, cluster: str, node: str, enabled: bool, now: datetime
) -> bytes:
    """What the node-loader accepts: for this cluster and node, issued now, single use."""
    request = ControlRequest(cluster=cluster, node=node, connect_time_lb=enabled, issued_at=now)
    return signing.seal_control(key, request)


def parse_reply(data: bytes) -> NodeState | Refusal:
    """A NodeState (accepted) or a Refusal; CliError for anything else."""
    try:
        decoded = events.decode(data)
    except events.MalformedEvent:
        decoded = None
    if isinstance(decoded, NodeState):
        return decoded
    try:
        answer = msgspec.json.decode(data)
    except msgspec.DecodeError:
        answer = None
    if isinstance(answer, dict) and "reason" in answer:
        return Refusal(reason=str(answer["reason"]), error=str(answer.get("error", "")))
    raise CliError(f"the node answered something that is not a node state: {data[:200]!r}")


def outcome(node: str, enabled: bool, reply: NodeState | Refusal) -> tuple[int, str]:
    """The exit code and what to print."""
    wanted = "on" if enabled else "off"
    if isinstance(reply, Refusal):
        return 1, f"node {node} refused the request ({reply.reason}): {reply.error}"
    programs = len(reply.programs_attached)
    summary = (
        f"node {node}: connect-time LB {'on' if reply.connect_time_lb else 'off'}, "
        f"{programs} programs attached, generation {reply.generation}"
    )
    if reply.connect_time_lb is not enabled or reply.last_error:
        detail = f": {reply.last_error}" if reply.last_error else ""
        return 1, f"{summary}; asked for {wanted}, not done{detail}"
    return 0, summary


# --------------------------------------------------------------------------- I/O


def operator_key(info: StackInfo) -> SigningKey:
    if not info.operator_key_file:
        raise CliError(
            "no operator key: set APILANE_OPERATOR_KEY_FILE to the private key whose public "
            "key the node-loaders trust (APILANE_OPERATOR_KEYS; `apilane keys generate DIR "
            "--name operator` makes one)"
        )
    try:
        return SigningKey.load(info.operator_key_file)
    except ConfigError as exc:
        raise CliError(f"the operator key: {exc}") from exc


async def switch_lb(info: StackInfo, node: str, *, enabled: bool, out: TextIO) -> int:
    key = operator_key(info)
    try:
        subject = subjects.node_control_subject(info.cluster, node)
    except ConfigError as exc:
        raise CliError(str(exc)) from exc
    payload = sealed_request(
        key, cluster=info.cluster, node=node, enabled=enabled, now=signing.utcnow()
    )
    bus = await connect_bus(info)
    try:
        data = await bus.request(subject, payload, timeout=REPLY_TIMEOUT)
    except PermissionDenied as exc:
        raise CliError(f"NATS refused the request to this identity: {exc}") from exc
    except BusError as exc:
        raise CliError(
            f"no answer from node {node} in cluster {info.cluster!r} (is its node-loader "
            f"running?): {exc}"
        ) from exc
    finally:
        await bus.drain()
    code, text = outcome(node, enabled, parse_reply(data))
    print(text, file=out)
    return code
