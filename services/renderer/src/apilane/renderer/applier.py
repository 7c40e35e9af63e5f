"""Bringing the live DaemonSet (and its ConfigMap) to a desired env: read, compare, write,
retry on conflict.

One call to `Applier.apply` is one decision about one snapshot. It reads the live
DaemonSet (and, in configmap mode, the endpoints ConfigMap), compares, and then either does
nothing (unchanged), holds the snapshot (the DaemonSet is missing, or our previous rollout
is still running and the DaemonSet itself would change), or writes: the ConfigMap first,
then the DaemonSet patch if its entries change (adoption, or a variable coming or going),
server-side dry run or for real, with the field manager, guarded by the resourceVersions it
compared against. A 409 means something changed between read and write: read again,
compare again, and try again, a bounded number of times.

A DaemonSet that tigera-operator renders (`apilane.renderer.controller`) is never patched:
the ConfigMap is still kept current, and the report says why the DaemonSet was left alone.

Where the last applied snapshot generation is kept: in annotations on what the write
changes (the ConfigMap in configmap mode, the DaemonSet in literal mode), written by the
same request. That makes the record atomic with the change (the render-result stream could
miss a result if we stopped between write and publish, and would then let a restart write
twice), keeps it when NATS loses its data, and drops it with the object (a recreated one
must be rendered again). The record of which env entries apilane set
(ownership.MANAGED_ENV_ANNOTATION, so it can give them back when they are no longer wanted)
travels in the DaemonSet patch for the same reasons.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from apilane.kube.client import Conflict, KubeClient, KubeError, NotFound, Unavailable
from apilane.model.events import RenderOutcome
from apilane.model.objects import as_dict, as_int
from apilane.model.signing import SignedSnapshot
from apilane.renderer import configmap
from apilane.renderer.configmap import ConfigMapPlan
from apilane.renderer.controller import not_patched_message, operator_evidence
from apilane.renderer.render import DesiredEnv, EnvDiff, diff
from apilane.renderer.settings import FIELD_MANAGER, RendererSettings
from apilane.runtime.aio import Backoff

log = logging.getLogger(__name__)

# The snapshot generation, endpoint digest and signed content digest whose env the DaemonSet
# holds (the generation and content digest are what a restarted renderer judges new
# snapshots against), and the DaemonSet generation that our patch produced (to tell our
# own rollout from someone else's).
APPLIED_GENERATION: Final = "apilane.dev/applied-generation"
APPLIED_DIGEST: Final = "apilane.dev/applied-digest"
APPLIED_CONTENT_DIGEST: Final = "apilane.dev/applied-content-digest"
PATCHED_DAEMONSET_GENERATION: Final = "apilane.dev/daemonset-generation"


@dataclass(frozen=True, kw_only=True)
class ApplyReport:
    """What one apply decided, ready to become a RenderResult."""

    outcome: RenderOutcome
    reason: str = ""
    daemonset_generation: int | None = None
    diff: EnvDiff | None = None
    patch: dict[str, Any] | None = None
    retryable: bool = False  # failed for a reason that may heal (server unavailable)
    patched: bool = False  # a real (not dry-run) write was accepted (DaemonSet or ConfigMap)
    daemonset: Mapping[str, Any] | None = None  # the object, for Kubernetes Events about it
    configmap: ConfigMapPlan | None = None  # configmap mode: what the ConfigMap needed
    daemonset_patched: bool = False  # the pod template changed: calico-node rolls
    adopted: bool = False  # that patch made the DaemonSet read apilane's ConfigMap
    not_patched: str = ""  # why the DaemonSet was left alone (a controller renders it)

    @property
    def diff_text(self) -> str:
        parts = []
        if self.not_patched:
            parts.append(f"! DaemonSet not patched: {self.not_patched}\n")
        if self.diff is not None:
            parts.append(self.diff.text(generation=self.daemonset_generation))
        if self.configmap is not None:
            parts.append(self.configmap.text())
        return "".join(parts)


def applied_generation(daemonset: Mapping[str, Any]) -> int:
    """The snapshot generation recorded on the DaemonSet by our last patch (0: none)."""
    raw = _annotations(daemonset).get(APPLIED_GENERATION, "")
    return int(raw) if isinstance(raw, str) and raw.isdigit() else 0


def applied_content_digest(daemonset: Mapping[str, Any]) -> str:
    """The signed content digest recorded with the applied generation ("": none)."""
    raw = _annotations(daemonset).get(APPLIED_CONTENT_DIGEST, "")
    return raw if isinstance(raw, str) else ""


def rollout_in_progress(daemonset: Mapping[str, Any]) -> str | None:
    """Why our own last rollout is still running, or None when it is not (or not ours).

    Only a rollout that our patch started counts: someone else's, or a node that is simply
    unavailable, must not hold our patches back. A DaemonSet whose status the controller has
    not written yet gives no evidence either way, and does not hold anything.
    """
    metadata = as_dict(daemonset.get("metadata"))
    status = as_dict(daemonset.get("status"))
    generation = as_int(metadata.get("generation"))
    if _annotations(daemonset).get(PATCHED_DAEMONSET_GENERATION) != str(generation):
        return None
    if "observedGeneration" not in status:
        return None
    observed = as_int(status.get("observedGeneration"))
    if observed < generation:
        return f"the controller has not observed generation {generation} yet (observed {observed})"
    desired = as_int(status.get("desiredNumberScheduled"))
    updated = as_int(status.get("updatedNumberScheduled"))
    available = as_int(status.get("numberAvailable"))
    if updated < desired or available < desired:
        return f"rollout of generation {generation}: {updated} updated, {available} available of {desired}"
    return None


PatchHook = Callable[[int], Awaitable[None]]


@dataclass(frozen=True, kw_only=True)
class _PlannedPatch:
    """A decision to write: the diffs it comes from and the request bodies (the ConfigMap
    first, so a pod that starts from the adopted template finds the values)."""

    generation: int  # the DaemonSet's, as read
    diff: EnvDiff
    body: dict[str, Any] | None  # the DaemonSet patch; None: the DaemonSet stays
    configmap: ConfigMapPlan | None = None
    configmap_body: dict[str, Any] | None = None
    holding: str = ""  # why the DaemonSet patch waits (our rollout runs); the ConfigMap goes
    not_patched: str = ""

    @property
    def adopts(self) -> bool:
        return self.body is not None and any(
            change.new_ref is not None and change.old_ref is None for change in self.diff.changes
        )

    def report(
        self, outcome: RenderOutcome, reason: str, *, retryable: bool = False
    ) -> ApplyReport:
        return ApplyReport(
            outcome=outcome,
            reason=reason,
            daemonset_generation=self.generation,
            diff=self.diff,
            patch=self.body,
            retryable=retryable,
            configmap=self.configmap,
            not_patched=self.not_patched,
        )


class Applier:
    def __init__(
        self,
        kube: KubeClient,
        settings: RendererSettings,
        *,
        before_patch: PatchHook | None = None,
    ) -> None:
        """`before_patch(attempt)` is a test hook: awaited after the DaemonSet was read and
        compared, just before the patch is sent, so a test can change the DaemonSet in
        between and see the conflict handling. Production passes None."""
        self.kube = kube
        self.settings = settings
        self.before_patch = before_patch

    async def get_daemonset(self) -> dict[str, Any] | None:
        try:
            return await self.kube.get(self.settings.daemonset_path)
        except NotFound:
            return None

    async def get_configmap(self) -> dict[str, Any] | None:
        try:
            return await self.kube.get(self.settings.configmap_path)
        except NotFound:
            return None

    async def apply(
        self, accepted: SignedSnapshot, desired: DesiredEnv, *, may_hold: bool
    ) -> ApplyReport:
        """Decide and act for one verified snapshot. Never raises for API trouble: it is
        reported."""
        try:
            return await self._apply(accepted, desired, may_hold=may_hold)
        except Unavailable as exc:
            return ApplyReport(
                outcome="failed", reason=f"API server unavailable: {exc}", retryable=True
            )
        except KubeError as exc:
            # Forbidden and Invalid need a person; they are reported, not retried in a loop.
            return ApplyReport(outcome="failed", reason=f"{type(exc).__name__}: {exc}")

    async def _apply(
        self, accepted: SignedSnapshot, desired: DesiredEnv, *, may_hold: bool
    ) -> ApplyReport:
        seen: list[dict[str, Any]] = []  # the last DaemonSet read, for the report
        report = await self._decide_and_patch(accepted, desired, may_hold=may_hold, seen=seen)
        return dataclasses.replace(report, daemonset=seen[-1]) if seen else report

    async def _decide_and_patch(
        self,
        accepted: SignedSnapshot,
        desired: DesiredEnv,
        *,
        may_hold: bool,
        seen: list[dict[str, Any]],
    ) -> ApplyReport:
        """Read, compare, patch; on a 409 read and compare again, up to conflict_retries."""
        attempts = self.settings.conflict_retries
        backoff = Backoff(initial=0.05, maximum=1.0)
        for attempt in range(1, attempts + 1):
            live = await self.get_daemonset()
            if live is None:
                return ApplyReport(
                    outcome="waiting",
                    reason=f"DaemonSet {self.settings.daemonset_ref} does not exist yet;"
                    " it will be patched when it appears",
                )
            seen.append(live)
            live_cm = await self.get_configmap() if self.settings.configmap else None
            planned = self._decide(accepted, desired, live, live_cm, may_hold=may_hold)
            if isinstance(planned, ApplyReport):
                return planned
            try:
                return await self._send(planned, attempt)
            except Conflict as exc:
                if attempt == attempts:
                    return planned.report(
                        "failed",
                        f"the DaemonSet or ConfigMap kept changing: {attempts} conflicts in a row"
                        f" ({exc.message})",
                        retryable=True,
                    )
                delay = backoff.next_delay()
                log.info(
                    "DaemonSet changed under us, reading it again",
                    extra={
                        "daemonset": self.settings.daemonset_ref,
                        "attempt": attempt,
                        "delay": round(delay, 3),
                    },
                )
                await asyncio.sleep(delay)
        raise AssertionError("unreachable: the loop returns on its last attempt")

    def _decide(
        self,
        accepted: SignedSnapshot,
        desired: DesiredEnv,
        live: Mapping[str, Any],
        live_cm: Mapping[str, Any] | None,
        *,
        may_hold: bool,
    ) -> ApplyReport | _PlannedPatch:
        """What to do with this live DaemonSet (and ConfigMap): a report when there is
        nothing to send."""
        metadata = as_dict(live.get("metadata"))
        generation = as_int(metadata.get("generation"))
        settings = self.settings
        env_diff = diff(live, desired, field_manager=FIELD_MANAGER, configmap=settings.configmap)
        if not env_diff.present_containers:
            return ApplyReport(
                outcome="failed",
                reason="none of the target containers exists: " + "; ".join(env_diff.problems),
                daemonset_generation=generation,
                diff=env_diff,
            )
        cm_plan = self._configmap_plan(desired, live, live_cm)
        evidence = operator_evidence(live)
        not_patched = (
            not_patched_message(
                settings.daemonset_ref,
                evidence,
                configmap_ref=settings.configmap_ref if cm_plan is not None else None,
            )
            if evidence is not None
            else ""
        )
        planned = _PlannedPatch(
            generation=generation,
            diff=env_diff,
            body=None,
            configmap=cm_plan,
            not_patched=not_patched,
        )
        if cm_plan is not None and cm_plan.foreign:
            # Adopting would make calico-node read someone else's data.
            return planned.report("failed", "; ".join(cm_plan.problems))
        patch_daemonset = not env_diff.unchanged and not not_patched
        if not patch_daemonset and (cm_plan is None or cm_plan.unchanged):
            return self._unchanged(planned)
        holding = (may_hold and patch_daemonset and rollout_in_progress(live)) or ""
        if holding and (cm_plan is None or cm_plan.unchanged):
            return planned.report("waiting", f"coalescing: {holding}")
        applied = {
            APPLIED_GENERATION: str(accepted.snapshot.generation),
            APPLIED_DIGEST: accepted.snapshot.digest,
            APPLIED_CONTENT_DIGEST: accepted.content_digest,
        }
        body = None
        if patch_daemonset and not holding:
            # Changing the pod template bumps the generation by exactly one, and the
            # resourceVersion below guarantees nobody else changes it in between.
            body = env_diff.patch(
                annotations={**applied, PATCHED_DAEMONSET_GENERATION: str(generation + 1)}
            )
            if body is None:  # there are changes, so there is a patch
                raise AssertionError("a diff with changes made no patch")
            body["metadata"]["resourceVersion"] = metadata.get("resourceVersion")
        return dataclasses.replace(
            planned,
            body=body,
            configmap_body=cm_plan.body(annotations=applied) if cm_plan is not None else None,
            holding=holding,
        )

    def _configmap_plan(
        self, desired: DesiredEnv, live: Mapping[str, Any], live_cm: Mapping[str, Any] | None
    ) -> ConfigMapPlan | None:
        name = self.settings.configmap
        if name is None:
            return None
        return configmap.plan(
            live_cm,
            desired.env,
            namespace=self.settings.target_namespace,
            name=name,
            referenced=configmap.referenced_keys(live, name),
        )

    async def _send(self, planned: _PlannedPatch, attempt: int) -> ApplyReport:
        """Write the ConfigMap, then patch the DaemonSet (raises Conflict when either changed
        since it was read)."""
        if self.before_patch is not None:
            await self.before_patch(attempt)
        await self._write_configmap(planned)
        result: Mapping[str, Any] = {}
        if planned.body is not None:
            result = await self.kube.patch(
                self.settings.daemonset_path,
                planned.body,
                patch_type="strategic",
                field_manager=FIELD_MANAGER,
                dry_run=self.settings.dry_run,
            )
        if self.settings.dry_run:
            return planned.report(
                "dry-run",
                _with_problems("server-side dry run accepted the patch; nothing changed", planned),
            )
        if planned.holding:
            return planned.report(
                "waiting",
                _with_problems(
                    f"ConfigMap {self.settings.configmap_ref} updated; the DaemonSet patch is"
                    f" coalescing: {planned.holding}",
                    planned,
                ),
            )
        patched_generation = as_int(as_dict(result.get("metadata")).get("generation"))
        return ApplyReport(
            outcome="applied",
            reason=_with_problems(self._applied_reason(planned), planned),
            daemonset_generation=patched_generation or planned.generation or None,
            diff=planned.diff,
            patch=planned.body,
            patched=True,
            configmap=planned.configmap,
            daemonset_patched=planned.body is not None,
            adopted=planned.adopts,
            not_patched=planned.not_patched,
        )

    async def _write_configmap(self, planned: _PlannedPatch) -> None:
        if planned.configmap is None or planned.configmap_body is None:
            return
        if planned.configmap.exists:
            await self.kube.patch(
                self.settings.configmap_path,
                planned.configmap_body,
                patch_type="merge",
                field_manager=FIELD_MANAGER,
                dry_run=self.settings.dry_run,
            )
            return
        await self.kube.create(
            f"/api/v1/namespaces/{self.settings.target_namespace}/configmaps",
            planned.configmap_body,
            field_manager=FIELD_MANAGER,
            dry_run=self.settings.dry_run,
        )

    def _applied_reason(self, planned: _PlannedPatch) -> str:
        settings = self.settings
        if planned.adopts:
            return (
                f"adopted DaemonSet {settings.daemonset_ref}: its containers now read the"
                f" values from ConfigMap {settings.configmap_ref} (configMapKeyRef); this patch"
                " rolls calico-node once, later endpoint changes update only the ConfigMap"
            )
        if planned.body is None and planned.configmap is not None:
            return (
                f"ConfigMap {settings.configmap_ref} updated; DaemonSet"
                f" {settings.daemonset_ref} unchanged (generation {planned.generation})"
            )
        return ""

    def _unchanged(self, planned: _PlannedPatch) -> ApplyReport:
        env_diff = planned.diff
        if env_diff.conflicts:
            # The DaemonSet does not hold what it should, and we may not fix it: say so.
            return planned.report("failed", _with_problems("", planned))
        if planned.not_patched and planned.configmap is None and not env_diff.unchanged:
            # Literal mode has nowhere else to put the values: nothing is rendered.
            return planned.report("failed", planned.not_patched)
        return ApplyReport(
            outcome="unchanged",
            reason=_with_problems("", planned),
            daemonset_generation=planned.generation,
            diff=env_diff,
            configmap=planned.configmap,
            not_patched=planned.not_patched,
        )


def _with_problems(reason: str, planned: _PlannedPatch) -> str:
    problems = planned.configmap.problems if planned.configmap is not None else ()
    parts = (reason, planned.not_patched, *planned.diff.problems, *problems)
    return "; ".join(part for part in parts if part)


def _annotations(daemonset: Mapping[str, Any]) -> Mapping[str, Any]:
    return as_dict(as_dict(daemonset.get("metadata")).get("annotations"))
