"""The connect-time LB setting of one node, and the control subject that switches it live.

`ConnectTimeLb` decides at start between APILANE_CONNECT_TIME_LB and a live switch recorded
in the state file (precedence in settings.py), attaches or detaches the programs, and
switches them live; the maps are kept either way. `ControlServer` answers requests on the
node's control subject: a switch is an operator action, and the reply (the node state
afterwards) says whether it worked.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

import msgspec

from apilane.model import events, subjects
from apilane.model.events import NodeState
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

    def switch(self, enabled: bool) -> None:
        """Switch live: programs attached or detached, maps kept. The choice is persisted;
        switching back to APILANE_CONNECT_TIME_LB clears the record."""
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
            )
        )

    def _record(self, switch: LiveLbSwitch | None) -> None:
        try:
            self.reconciler.record_lb_switch(switch)
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


class ControlRequest(msgspec.Struct, frozen=True, kw_only=True):
    """A request on the node's control subject; the reply is the node's NodeState.
    An empty request only asks for the state. A live switch is persisted in the state file
    and holds across loader restarts until APILANE_CONNECT_TIME_LB changes or the LB is
    switched back (settings.py has the precedence rule)."""

    connect_time_lb: bool | None = None


class ControlServer:
    """Request/reply on `apilane.v1.<cluster>.nodes.<node>.control`."""

    def __init__(
        self,
        *,
        lb: ConnectTimeLb,
        cluster: str,
        node: str,
        node_state: Callable[[], NodeState],
        publish_state: Callable[[], Awaitable[None]],
    ) -> None:
        self.lb = lb
        self.subject = subjects.node_control_subject(cluster, node)
        self.node_state = node_state
        self.publish_state = publish_state
        self._decoder = msgspec.json.Decoder(ControlRequest)

    async def serve(self, bus: Bus) -> Any:
        return await bus.serve_requests(self.subject, self.handle)

    async def handle(self, data: bytes) -> bytes:
        try:
            request = self._decoder.decode(data) if data else ControlRequest()
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            return msgspec.json.encode({"error": f"bad control request: {exc}"})
        if request.connect_time_lb is not None and request.connect_time_lb != self.lb.enabled:
            self.lb.switch(request.connect_time_lb)
            await self.publish_state()
        return events.encode(self.node_state())
