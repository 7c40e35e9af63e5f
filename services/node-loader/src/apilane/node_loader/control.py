"""The connect-time LB setting of one node, and the control subject that switches it live.

`ConnectTimeLb` decides at start between APILANE_CONNECT_TIME_LB and a live switch recorded
in the state file (precedence in settings.py), attaches or detaches the programs, and
switches them live; the maps are kept either way. `ControlServer` answers requests on the
node's control subject: a switch is an operator action, authorized by an operator's
signature, and the reply (the node state afterwards) says whether it worked.

The wire format (what `apilane node lb` sends): the request is the JSON envelope of
`signing.seal_control(key, ControlRequest(cluster=, node=, connect_time_lb=, issued_at=now))`
published as a core NATS request on `subjects.node_control_subject(cluster, node)`; the reply
is a NodeState (`events.decode`) or `{"error": "...", "reason": "<label>"}`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

import msgspec

from apilane.model import events, subjects
from apilane.model.events import NodeState
from apilane.model.signing import (
    ControlRequest,
    SignatureError,
    TrustedKeys,
    open_control,
    utcnow,
)
from apilane.node_loader.reconcile import Reconciler
from apilane.node_loader.settings import LiveLbSwitch, resolve_connect_time_lb
from apilane.node_loader.statefile import StateFileError
from apilane.runtime.bus import Bus

log = logging.getLogger(__name__)


class ProgramsControl(Protocol):
    """What the loader needs from `programs.ConnectTimeLB`."""

    def enable(self) -> None: ...

    def disable(self) -> None: ...

    def attached_programs(self) -> Sequence[Any]: ...

    def close(self) -> None: ...


class ConnectTimeLb:
    """The connect-time LB setting in force on this node, and the programs it implies."""

    def __init__(
        self, *, env_value: bool, programs: ProgramsControl | None, reconciler: Reconciler
    ) -> None:
        self.env_value = env_value  # APILANE_CONNECT_TIME_LB
        self.enabled = env_value
        self.programs = programs
        self.reconciler = reconciler  # keeps the live switch in the state file
        self.programs_error = ""
        self.switch_error = ""  # a live switch that could not be persisted

    def start(self) -> None:
        """Decide (variable or persisted live switch), then attach or detach accordingly."""
        recorded = self.reconciler.lb_switch
        decision = resolve_connect_time_lb(env_value=self.env_value, switch=recorded)
        self.enabled = decision.enabled
        log.info(
            "connect-time load balancer %s (%s)",
            "on" if decision.enabled else "off",
            decision.source,
            extra={
                "connect_time_lb": decision.enabled,
                "source": decision.source,
                "rule": decision.rule,
                "env_connect_time_lb": self.env_value,
                "live_switch": msgspec.to_builtins(recorded) if recorded else None,
            },
        )
        if decision.keep_switch != recorded:
            self._record(decision.keep_switch)
        self._apply()

    def switch(self, enabled: bool, *, issued_at: datetime) -> None:
        """An operator's request, issued at `issued_at`: switch live (programs attached or
        detached, maps kept) unless already so. The choice and the request's issue time are
        persisted; switching back to APILANE_CONNECT_TIME_LB clears the choice's record."""
        if enabled != self.enabled:
            log.warning(
                "switching the connect-time load balancer",
                extra={"enabled": enabled, "env_connect_time_lb": self.env_value},
            )
            self.enabled = enabled
            self._apply()
        self._record(
            None
            if enabled == self.env_value
            else LiveLbSwitch(
                enabled=enabled, env_value=self.env_value, switched_at=datetime.now(UTC)
            ),
            control_issued_at=issued_at,
        )

    def _record(
        self, switch: LiveLbSwitch | None, *, control_issued_at: datetime | None = None
    ) -> None:
        try:
            self.reconciler.record_lb_switch(switch, control_issued_at=control_issued_at)
            self.switch_error = ""
        except StateFileError as exc:
            # Applied live all the same; only a restart would fall back to the variable.
            self.switch_error = f"persisting the connect-time LB switch: {exc}"
            log.warning("cannot persist the connect-time LB switch", extra={"error": str(exc)})

    def _apply(self) -> None:
        if self.programs is None:
            return
        try:
            if self.enabled:
                self.programs.enable()
            else:
                self.programs.disable()
            self.programs_error = ""
        except Exception as exc:  # a kernel refusal must not kill the loader: report it
            self.programs_error = f"{'attaching' if self.enabled else 'detaching'} programs: {exc}"
            log.exception("changing the connect-time programs failed")

    def attached(self) -> tuple[str, ...]:
        if self.programs is None:
            return ()
        try:
            return tuple(
                sorted(str(getattr(p, "program", p)) for p in self.programs.attached_programs())
            )
        except Exception as exc:
            log.warning("cannot list attached programs", extra={"error": str(exc)})
            return ()

    def ready(self) -> bool:
        if self.programs is None or not self.enabled:
            return True
        return not self.programs_error and bool(self.attached())

    @property
    def errors(self) -> tuple[str, ...]:
        return tuple(e for e in (self.programs_error, self.switch_error) if e)

    def close(self) -> None:
        """Release this process's descriptors; the programs stay attached (see service.py)."""
        if self.programs is not None:
            try:
                self.programs.close()
            except Exception as exc:
                log.warning("closing the programs failed", extra={"error": str(exc)})


class ControlDisabled(SignatureError):
    """No operator key is configured: no control request can be authorized."""

    reason = "disabled"


class ControlServer:
    """Request/reply on `apilane.v1.<cluster>.nodes.<node>.control`.

    Only a `signing.ControlRequest` sealed by an operator key (APILANE_OPERATOR_KEYS) is
    acted on, and only once: it must be for this cluster and node, issued within
    `signing.CONTROL_WINDOW` of now and later than the last request accepted (persisted in
    the state file, so a replay is refused after a restart too). Anything else is answered
    `{"error": ..., "reason": ...}` and changes nothing. An accepted request is answered
    with the NodeState afterwards.
    """

    def __init__(
        self,
        *,
        lb: ConnectTimeLb,
        operators: TrustedKeys,
        cluster: str,
        node: str,
        node_state: Callable[[], NodeState],
        publish_state: Callable[[], Awaitable[None]],
        count: Callable[[str], None],
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.lb = lb
        self.operators = operators
        self.cluster = cluster
        self.node = node
        self.subject = subjects.node_control_subject(cluster, node)
        self.node_state = node_state
        self.publish_state = publish_state
        self.count = count  # by outcome: "accepted" or the reason of a refusal
        self.clock = clock

    async def serve(self, bus: Bus) -> Any:
        return await bus.serve_requests(self.subject, self.handle)

    async def handle(self, data: bytes) -> bytes:
        try:
            request = self._open(data)
        except (SignatureError, events.MalformedEvent) as exc:
            reason = exc.reason if isinstance(exc, SignatureError) else "malformed"
            self.count(reason)
            log.warning(
                "control request refused",
                extra={"reason": reason, "error": str(exc), "bytes": len(data)},
            )
            return msgspec.json.encode({"error": f"bad control request: {exc}", "reason": reason})
        self.count("accepted")
        log.warning(
            "control request accepted",
            extra={
                "issued_at": request.issued_at.isoformat(),
                "connect_time_lb": request.connect_time_lb,
            },
        )
        self.lb.switch(request.connect_time_lb, issued_at=request.issued_at)
        await self.publish_state()
        return events.encode(self.node_state())

    def _open(self, data: bytes) -> ControlRequest:
        if not self.operators:
            raise ControlDisabled("no operator key is configured (APILANE_OPERATOR_KEYS)")
        return open_control(
            data,
            self.operators,
            cluster=self.cluster,
            node=self.node,
            now=self.clock(),
            last_accepted=self.lb.reconciler.control_issued_at,
        )
