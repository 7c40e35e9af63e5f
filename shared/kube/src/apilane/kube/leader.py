"""Leader election with a coordination.k8s.io/v1 Lease, in client-go's manner.

A candidate takes the Lease when it is free (no holder) or expired; the holder renews it
every `renew_interval`. Updates carry the Lease's resourceVersion, so two candidates racing
for it cannot both win: the loser gets 409 Conflict and stays a follower.

Expiry is judged on the candidate's own monotonic clock, from the moment it last saw the
Lease record change, never from the timestamps inside it, so clock skew between machines
does not matter. The holder steps down when it has not renewed for `renew_deadline`
(default two thirds of `lease_duration`): that is before any other candidate can consider
the Lease expired, so two leaders never overlap.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client import Gauge

from apilane.kube.client import Conflict, KubeClient, KubeError, NotFound
from apilane.model.errors import ConfigError
from apilane.runtime.aio import first_of, set_when_any
from apilane.runtime.config import Env

log = logging.getLogger(__name__)

# Per replica: 1 while it leads, 0 while it stands by. All replicas at 0 means no leader
# (the ApilaneLeaderMissing alert); the identity label tells replicas in one process apart.
LEADING = Gauge(
    "apilane_leader",
    "1 while this replica holds the leader Lease, 0 while it stands by.",
    ["lease", "identity"],
)


def _micro_time(now: datetime.datetime | None = None) -> str:
    """Kubernetes MicroTime: RFC 3339 with microseconds, in UTC."""
    moment = now or datetime.datetime.now(datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    """Run `run(stop)` as a task; check `is_leader` (or await `wait_until_leader()`) before
    acting as the leader, and stop acting when `lost` is set."""

    def __init__(
        self,
        client: KubeClient,
        *,
        namespace: str,
        name: str,
        identity: str,
        lease_duration: float = 15.0,
        renew_interval: float = 5.0,
        retry_interval: float = 2.0,
        renew_deadline: float | None = None,
        on_change: Callable[[bool], None] | None = None,
    ) -> None:
        deadline = renew_deadline if renew_deadline is not None else lease_duration * 2 / 3
        if not 0 < renew_interval < deadline < lease_duration:
            raise ValueError(
                "need 0 < renew_interval < renew_deadline < lease_duration, got "
                f"{renew_interval}, {deadline}, {lease_duration}"
            )
        if not identity:
            raise ValueError("identity must not be empty")
        self.client = client
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.lease_duration = lease_duration
        self.renew_interval = renew_interval
        self.retry_interval = retry_interval
        self.renew_deadline = deadline
        self.on_change = on_change
        self.path = f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases/{name}"
        self.leading = asyncio.Event()  # set while we are the leader
        self.lost = asyncio.Event()  # set when we stop leading (cleared when we lead again)
        self.transitions = 0  # the Lease's leaseTransitions when we took it: a fencing term
        self._observed_record: tuple[Any, ...] | None = None
        self._observed_at = 0.0
        self._last_renew = 0.0
        self._context = {"lease": f"{namespace}/{name}", "identity": identity}
        self._gauge = LEADING.labels(lease=name, identity=identity)
        self._gauge.set(0)

    @property
    def is_leader(self) -> bool:
        # Also checks the deadline, so a leader stuck in a slow request stops acting in time.
        return self.leading.is_set() and time.monotonic() - self._last_renew < self.renew_deadline

    async def wait_until_leader(self) -> None:
        await self.leading.wait()

    async def run(self, stop: asyncio.Event) -> None:
        """Campaign and renew until `stop` is set; then release the Lease if we hold it, so
        another candidate can take over at once."""
        try:
            while not stop.is_set():
                if self.leading.is_set():
                    renewed = await self._renew_once()
                    # After a failed renewal, try again soon rather than at the next period.
                    interval = self.renew_interval if renewed else self.retry_interval
                else:
                    await self._try_acquire()
                    interval = self.renew_interval if self.leading.is_set() else self.retry_interval
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=interval)
        finally:
            if self.leading.is_set():
                await self._release()

    # -- steps

    async def _renew_once(self) -> bool:
        remaining = self.renew_deadline - (time.monotonic() - self._last_renew)
        try:
            # A renewal that cannot finish before the deadline is as good as a failed one.
            renewed = await asyncio.wait_for(self._acquire_or_renew(), timeout=max(remaining, 0.01))
        except (TimeoutError, KubeError) as exc:
            renewed = False
            log.warning(
                "lease renewal failed",
                extra={**self._context, "error": str(exc) or type(exc).__name__},
            )
        if renewed:
            return True
        if (
            time.monotonic() - self._last_renew >= self.renew_deadline
            or not await self._still_ours()
        ):
            self._set_leading(False)
        return False

    async def _still_ours(self) -> bool:
        """After a failed renewal: is the Lease still ours (a transient error) or did someone
        else take it (we must step down now)?"""
        try:
            lease = await asyncio.wait_for(self.client.get(self.path), timeout=self.retry_interval)
        except (TimeoutError, KubeError):
            return time.monotonic() - self._last_renew < self.renew_deadline
        return (lease.get("spec") or {}).get("holderIdentity") == self.identity

    async def _try_acquire(self) -> None:
        try:
            acquired = await asyncio.wait_for(self._acquire_or_renew(), timeout=self.renew_deadline)
        except (TimeoutError, KubeError) as exc:
            log.debug("lease acquisition failed", extra={**self._context, "error": str(exc)})
            return
        if acquired:
            self._set_leading(True)

    async def _acquire_or_renew(self) -> bool:
        """One attempt; True when we hold the Lease afterwards. Raises KubeError on API errors
        other than a lost race."""
        attempt_started = time.monotonic()
        now = datetime.datetime.now(datetime.UTC)
        try:
            lease = await self.client.get(self.path)
        except NotFound:
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": self._spec(now=now, acquire_time=_micro_time(now), transitions=0),
            }
            try:
                created = await self.client.create(
                    f"/apis/coordination.k8s.io/v1/namespaces/{self.namespace}/leases", body
                )
            except Conflict:
                return False  # another candidate created it first
            self._observe(created)
            self._last_renew = attempt_started
            self.transitions = 0
            return True

        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity") or ""
        self._observe(lease)
        ours = holder == self.identity
        if (
            holder
            and not ours
            and time.monotonic() - self._observed_at < self._lease_duration_of(spec)
        ):
            return False  # held by someone else and not expired
        transitions = int(spec.get("leaseTransitions") or 0) + (0 if ours else 1)
        updated_body = dict(lease)
        acquire_time = spec.get("acquireTime") if ours else None
        updated_body["spec"] = self._spec(
            now=now, acquire_time=str(acquire_time or _micro_time(now)), transitions=transitions
        )
        try:
            updated = await self.client.replace(self.path, updated_body)
        except Conflict:
            return False  # someone else updated it in between (resourceVersion moved on)
        self._observe(updated)
        self._last_renew = attempt_started
        if not ours:
            log.info(
                "took over the lease",
                extra={**self._context, "previous": holder or None, "term": transitions},
            )
        self.transitions = transitions
        return True

    def _spec(
        self, *, now: datetime.datetime, acquire_time: str, transitions: int
    ) -> dict[str, Any]:
        return {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": max(1, round(self.lease_duration)),
            "acquireTime": acquire_time,
            "renewTime": _micro_time(now),
            "leaseTransitions": transitions,
        }

    def _lease_duration_of(self, spec: dict[str, Any]) -> float:
        value = spec.get("leaseDurationSeconds")
        return float(value) if isinstance(value, int) and value > 0 else self.lease_duration

    def _observe(self, lease: dict[str, Any]) -> None:
        """Remember when the record last changed, on our clock."""
        spec = lease.get("spec") or {}
        record = (
            spec.get("holderIdentity"),
            spec.get("renewTime"),
            spec.get("acquireTime"),
            spec.get("leaseTransitions"),
            spec.get("leaseDurationSeconds"),
        )
        if record != self._observed_record:
            self._observed_record = record
            self._observed_at = time.monotonic()

    async def _release(self) -> None:
        """Give the Lease up: no holder and a 1 s duration, so the next candidate needs no wait."""
        self._set_leading(False)
        try:
            lease = await asyncio.wait_for(self.client.get(self.path), timeout=self.retry_interval)
            spec = lease.get("spec") or {}
            if spec.get("holderIdentity") != self.identity:
                return
            released = dict(lease)
            released["spec"] = {
                **spec,
                "holderIdentity": None,
                "leaseDurationSeconds": 1,
                "renewTime": _micro_time(),
            }
            await asyncio.wait_for(
                self.client.replace(self.path, released), timeout=self.retry_interval
            )
            log.info("released the lease", extra=self._context)
        except (TimeoutError, KubeError) as exc:
            log.warning(
                "could not release the lease; it expires by itself",
                extra={**self._context, "error": str(exc)},
            )

    def _set_leading(self, leading: bool) -> None:
        if leading == self.leading.is_set():
            return
        self._gauge.set(1 if leading else 0)
        if leading:
            self.leading.set()
            self.lost.clear()
            log.info("became the leader", extra={**self._context, "term": self.transitions})
        else:
            self.leading.clear()
            self.lost.set()
            log.warning("stopped being the leader", extra=self._context)
        if self.on_change is not None:
            try:
                self.on_change(leading)
            except Exception:
                log.exception("leader on_change callback failed", extra=self._context)


@dataclass(frozen=True, kw_only=True)
class LeaseSettings:
    """The same Lease settings for every leader-elected service (APILANE_LEASE_*)."""

    enabled: bool = True
    namespace: str = "apilane"
    name: str = ""
    identity: str = ""  # the pod name; unique per replica
    duration: float = 15.0
    renew_interval: float = 5.0
    retry_interval: float = 2.0


def load_lease_settings(env: Env, *, name: str, identity: str) -> LeaseSettings:
    """Raise ConfigError naming the variable when a value is bad or the intervals conflict."""
    settings = LeaseSettings(
        enabled=env.bool("LEADER_ELECTION", True),
        namespace=env.str("LEASE_NAMESPACE", "apilane"),
        name=name,
        identity=identity,
        duration=env.seconds("LEASE_DURATION", 15.0, low=1.0),
        renew_interval=env.seconds("LEASE_RENEW_INTERVAL", 5.0, low=0.05),
        retry_interval=env.seconds("LEASE_RETRY_INTERVAL", 2.0, low=0.05),
    )
    if not settings.renew_interval < settings.duration * 2 / 3:
        raise ConfigError(
            "APILANE_LEASE_RENEW_INTERVAL must be below two thirds of APILANE_LEASE_DURATION "
            f"({settings.renew_interval} >= {settings.duration * 2 / 3:.2f})"
        )
    return settings


def elector_for(
    client: KubeClient,
    lease: LeaseSettings,
    *,
    on_change: Callable[[bool], None] | None = None,
) -> LeaderElector | None:
    """The elector a service's settings ask for; None when leader election is off."""
    if not lease.enabled:
        return None
    return LeaderElector(
        client,
        namespace=lease.namespace,
        name=lease.name,
        identity=lease.identity,
        lease_duration=lease.duration,
        renew_interval=lease.renew_interval,
        retry_interval=lease.retry_interval,
        on_change=on_change,
    )


async def lead(
    elector: LeaderElector | None,
    work: Callable[[asyncio.Event], Awaitable[None]],
    stop: asyncio.Event,
) -> None:
    """Run `work(term_over)` for each term this replica leads, until `stop`. Without an
    elector, one term that lasts until `stop`. The Lease is released when `stop` is set."""
    if elector is None:
        await work(stop)
        return
    campaign = asyncio.create_task(elector.run(stop), name=f"lease-{elector.name}")
    try:
        while not stop.is_set():
            await first_of(elector.leading.wait(), stop.wait())
            if stop.is_set():
                break
            term_over = asyncio.Event()
            watcher = asyncio.create_task(set_when_any(term_over, elector.lost, stop))
            try:
                log.info("leading", extra={"lease": elector.name, "identity": elector.identity})
                await work(term_over)
            finally:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await campaign
