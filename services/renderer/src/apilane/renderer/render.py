"""From an endpoint snapshot to calico-node's env, and from there to a patch: pure, no I/O.

    snapshot --render()--> DesiredEnv --diff(live DaemonSet)--> EnvDiff --> patch / text

`render` decides what every target container's env should hold. `diff` compares that with
the live DaemonSet and says what would change, what cannot be changed safely (a variable
the DaemonSet sets through `valueFrom`), which target containers are not there, and which
variables apilane set earlier and no longer wants (removed, or given their old value back;
`apilane.renderer.ownership` says which are apilane's). The patch is built from the diff
alone, so it names only variables that change: a strategic merge patch that merges
containers and env by name and touches nothing else.

In configmap mode (`diff(..., configmap=NAME)`) each wanted entry reads its value from that
ConfigMap (`valueFrom.configMapKeyRef`, key = the variable's name) instead of holding it:
the entries change when the set of variables does, never when a value does
(`apilane.renderer.configmap` plans the ConfigMap's data). `release` gives back what the
ownership record says apilane took (`apilane render unadopt`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from apilane.model import envformat
from apilane.model.envformat import EnvFormatError, IpPort
from apilane.model.errors import ApilaneError
from apilane.model.events import EndpointSnapshot
from apilane.model.objects import as_dict, as_list, as_str
from apilane.renderer.ownership import (
    CONTAINER_KINDS,
    FIELD_MANAGER,
    MANAGED_ENV_ANNOTATION,
    ContainerKind,
    EnvOwners,
    ManagedEnv,
    Record,
    format_managed_env,
    recorded_ownership,
)

SERVICE_IPS_PORTS: Final = "KUBERNETES_SERVICE_IPS_PORTS"
APISERVER_ENDPOINTS: Final = "KUBERNETES_APISERVER_ENDPOINTS"

# What the operator's `kubeProxyManagement: Disabled` plus `bpfKubeProxyIptablesCleanupEnabled:
# false` amount to on calico-node when kube-proxy keeps running under someone else's control:
# Felix must not delete kube-proxy's iptables rules, and must not bind kube-proxy's healthz port
# (10256; calico#10748), which is what the operator does with `bpfKubeProxyHealthzPort: 0`.
KUBE_PROXY_COEXISTENCE_ENV: Final = (
    ("FELIX_BPFKUBEPROXYIPTABLESCLEANUPENABLED", "false"),
    ("FELIX_BPFKUBEPROXYHEALTHZPORT", "0"),
)


class RenderError(ApilaneError):
    """A snapshot that must not be rendered: writing it would break calico-node."""


@dataclass(frozen=True, kw_only=True)
class RenderOptions:
    """Which containers get which variables."""

    init_containers: tuple[str, ...] = ("ebpf-bootstrap",)
    containers: tuple[str, ...] = ("calico-node",)
    # Add KUBE_PROXY_COEXISTENCE_ENV to the main containers when kube-proxy is managed elsewhere.
    manage_kube_proxy_cleanup: bool = True
    kube_proxy_coexistence_env: tuple[tuple[str, str], ...] = KUBE_PROXY_COEXISTENCE_ENV


@dataclass(frozen=True, kw_only=True)
class DesiredEnv:
    """The env each target container should hold; only the variables we manage."""

    init_containers: Mapping[str, Mapping[str, str]]
    containers: Mapping[str, Mapping[str, str]]
    # Everything rendered, flattened (what a RenderResult reports and the manifest prints).
    env: Mapping[str, str]
    # What render left out on purpose, for the result's reason and the logs.
    notes: tuple[str, ...] = ()
    # Every variable these options can ever render: one of them that is present but neither
    # wanted nor set by apilane is reported in the diff as left alone.
    manageable: frozenset[str] = frozenset()

    def by_kind(self) -> tuple[tuple[ContainerKind, Mapping[str, Mapping[str, str]]], ...]:
        return (("initContainers", self.init_containers), ("containers", self.containers))


def render_endpoints(snapshot: EndpointSnapshot) -> tuple[str, str, tuple[str, ...]]:
    """(KUBERNETES_SERVICE_IPS_PORTS, KUBERNETES_APISERVER_ENDPOINTS, notes) of a snapshot.

    Only TCP is rendered: calico-node programs TCP frontends only. Every API server endpoint
    in the snapshot is rendered (discovery already chose which ones may take traffic), except
    those of a family without a service IP: calico-node creates the IPv6 maps only for an
    IPv6 service IP and would crash writing an IPv6 backend without them.
    """
    try:
        services = [
            IpPort.of(e.ip, e.port) for e in snapshot.service_endpoints if e.protocol == "TCP"
        ]
        endpoints = [
            IpPort.of(e.ip, e.port) for e in snapshot.apiserver_endpoints if e.protocol == "TCP"
        ]
    except EnvFormatError as exc:
        raise RenderError(f"snapshot {snapshot.generation} has an invalid address: {exc}") from exc
    if not services:
        raise RenderError(f"snapshot {snapshot.generation} has no TCP service IP")
    service_families = {entry.family for entry in services}
    notes: list[str] = []
    dropped = sorted({str(e) for e in endpoints if e.family not in service_families})
    if dropped:
        notes.append(
            "left out API server endpoints of a family without a service IP: " + ",".join(dropped)
        )
        endpoints = [e for e in endpoints if e.family in service_families]
    if not endpoints:
        # calico-node would skip its bootstrap, and the data plane would lose its last
        # known path to the API server: keep what is there.
        raise RenderError(f"snapshot {snapshot.generation} has no usable API server endpoint")
    return envformat.render_ip_ports(services), envformat.render_ip_ports(endpoints), tuple(notes)


def render(snapshot: EndpointSnapshot, options: RenderOptions = RenderOptions()) -> DesiredEnv:
    """The env every target container should hold for this snapshot; raises RenderError."""
    service_ips_ports, apiserver_endpoints, notes = render_endpoints(snapshot)
    endpoint_env = {SERVICE_IPS_PORTS: service_ips_ports, APISERVER_ENDPOINTS: apiserver_endpoints}
    main_env = dict(endpoint_env)
    if options.manage_kube_proxy_cleanup and snapshot.kube_proxy.managed_by:
        main_env.update(options.kube_proxy_coexistence_env)
    return DesiredEnv(
        init_containers={name: dict(endpoint_env) for name in options.init_containers},
        containers={name: dict(main_env) for name in options.containers},
        env=main_env,
        notes=tuple(notes),
        manageable=manageable_env(options),
    )


def manageable_env(options: RenderOptions) -> frozenset[str]:
    """The names of every variable `render` may produce with these options."""
    names = {SERVICE_IPS_PORTS, APISERVER_ENDPOINTS}
    if options.manage_kube_proxy_cleanup:
        names |= {name for name, _ in options.kube_proxy_coexistence_env}
    return frozenset(names)


# -- Comparing with the live DaemonSet ------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class EnvChange:
    """One env entry that changes. A literal value is `old`/`new`; an entry that reads the
    value from apilane's ConfigMap names it in `old_ref`/`new_ref` (and `new` is the value
    it resolves to, for reports)."""

    kind: ContainerKind
    container: str
    name: str
    old: str | None  # None: the variable is not set yet (or `old_ref` is its source)
    new: str | None  # None: the variable is deleted (apilane created it and needs it no more)
    old_ref: str | None = None  # the ConfigMap the live entry reads, when it reads one
    new_ref: str | None = None  # the ConfigMap the entry reads after the change

    @property
    def old_shown(self) -> str | None:
        return _ref_shown(self.old_ref, self.name) if self.old_ref is not None else self.old

    @property
    def new_shown(self) -> str | None:
        if self.new_ref is not None:
            return f"{_ref_shown(self.new_ref, self.name)} = {self.new}"
        return self.new

    def patch_entry(self) -> dict[str, Any]:
        """The entry of a strategic merge patch; null removes the other form of the value
        (an entry may not carry both `value` and `valueFrom`)."""
        if self.new is None and self.new_ref is None:
            return {"name": self.name, "$patch": "delete"}
        entry: dict[str, Any] = {"name": self.name}
        if self.new_ref is not None:
            entry["valueFrom"] = {"configMapKeyRef": {"name": self.new_ref, "key": self.name}}
            if self.old is not None:
                entry["value"] = None
        else:
            entry["value"] = self.new
            if self.old_ref is not None:
                entry["valueFrom"] = None
        return entry


def _ref_shown(configmap: str, key: str) -> str:
    return f"<configMapKeyRef {configmap}/{key}>"


@dataclass(frozen=True, kw_only=True)
class EnvConflict:
    """A variable we would set that the DaemonSet takes from `valueFrom`: left alone."""

    kind: ContainerKind
    container: str
    name: str
    source: str  # which valueFrom kind, e.g. "configMapKeyRef"
    wanted: str


@dataclass(frozen=True, kw_only=True)
class EnvKept:
    """A variable apilane could manage but that is not apilane's to change: left alone."""

    kind: ContainerKind
    container: str
    name: str
    value: str  # the literal value, or "<from configMapKeyRef>"
    why: str


@dataclass(frozen=True, kw_only=True)
class EnvDiff:
    daemonset: str  # "namespace/name"
    changes: tuple[EnvChange, ...] = ()
    conflicts: tuple[EnvConflict, ...] = ()
    kept: tuple[EnvKept, ...] = ()
    missing_containers: tuple[tuple[ContainerKind, str], ...] = ()
    present_containers: tuple[tuple[ContainerKind, str], ...] = field(default=())
    # What apilane owns once the changes are applied; written by the same patch.
    managed_env: ManagedEnv = field(default_factory=dict)
    record_problems: tuple[str, ...] = ()

    @property
    def unchanged(self) -> bool:
        """Nothing to patch (conflicts and missing containers may still need reporting).

        A record that only needs tidying (a variable someone else removed) is not worth a
        patch of its own: it is written with the next env change, and a stale entry is
        harmless because nothing is released without checking the live object first.
        """
        return not self.changes

    @property
    def removals(self) -> tuple[EnvChange, ...]:
        return tuple(
            change for change in self.changes if change.new is None and change.new_ref is None
        )

    @property
    def problems(self) -> tuple[str, ...]:
        found = [
            f"{c.kind}[{c.container}] sets {c.name} from {c.source}; not overwritten"
            f" (wanted {c.name}={c.wanted})"
            for c in self.conflicts
        ]
        found += [
            f"{kind}[{name}] does not exist in DaemonSet {self.daemonset}"
            for kind, name in self.missing_containers
        ]
        return (*found, *self.record_problems)

    def text(self, *, generation: int | None = None) -> str:
        """A unified-diff-like view of the env change, for people and for render results.

        `-X=old` alone is a removal; a line starting with a space is a variable apilane
        could manage but leaves alone, with the reason.
        """
        where = f", generation {generation}" if generation is not None else ""
        lines = [
            f"--- DaemonSet/{self.daemonset} (live{where})",
            f"+++ DaemonSet/{self.daemonset} (desired)",
        ]
        sections: dict[tuple[ContainerKind, str], list[str]] = {}
        for change in self.changes:
            section = sections.setdefault((change.kind, change.container), [])
            if change.old_shown is not None:
                section.append(f"-{change.name}={change.old_shown}")
            if change.new_shown is not None:
                section.append(f"+{change.name}={change.new_shown}")
        for kept in self.kept:
            sections.setdefault((kept.kind, kept.container), []).append(
                f" {kept.name}={kept.value}  ({kept.why})"
            )
        for (kind, container), section in sections.items():
            lines.append(f"@@ {kind}[{container}].env @@")
            lines += section
        lines += [f"! {problem}" for problem in self.problems]
        if not self.changes:
            lines.append("  (no change)")
        return "\n".join(lines) + "\n"

    def patch(self, *, annotations: Mapping[str, str] | None = None) -> dict[str, Any] | None:
        """The strategic merge patch for these changes, or None when there is nothing to do.

        Containers and env are lists merged by `name`, so naming only what changes leaves
        every other container, variable, image and volume untouched; a variable apilane
        releases is named with `$patch: delete`. No `$setElementOrder`, because the order of
        existing entries does not matter to anyone. The ownership record travels in the same
        patch, so it can never disagree with the env it describes.
        """
        if not self.changes:
            return None
        by_container: dict[tuple[ContainerKind, str], list[dict[str, str]]] = {}
        for change in self.changes:
            by_container.setdefault((change.kind, change.container), []).append(
                change.patch_entry()
            )
        pod_spec: dict[str, list[dict[str, Any]]] = {}
        for (kind, container), env in by_container.items():
            pod_spec.setdefault(kind, []).append({"name": container, "env": env})
        # None deletes the annotation once apilane owns nothing.
        all_annotations: dict[str, str | None] = {
            MANAGED_ENV_ANNOTATION: format_managed_env(self.managed_env),
            **(annotations or {}),
        }
        return {
            "metadata": {"annotations": all_annotations},
            "spec": {"template": {"spec": pod_spec}},
        }


def diff(
    live_daemonset: Mapping[str, Any],
    desired: DesiredEnv,
    *,
    field_manager: str = FIELD_MANAGER,
    configmap: str | None = None,
) -> EnvDiff:
    """What applying `desired` to this DaemonSet would change, including the variables apilane
    set earlier and needs no more. Tolerates any input shape.

    With `configmap`, every wanted variable reads its value from that ConfigMap (key: the
    variable's name) instead of holding it literally: the entries then change only when the
    set of variables does, never when a value does."""
    live = _LiveDaemonSet.read(live_daemonset, field_manager=field_manager)
    found = _Found()
    for kind, wanted_by_container in desired.by_kind():
        for container, wanted_env in wanted_by_container.items():
            live_env = live.env(kind, container)
            if live_env is None:
                # Its variables went with it; a container of that name added later is new.
                found.missing.append((kind, container))
                continue
            found.present.append((kind, container))
            planner = _ContainerPlanner(
                kind=kind,
                container=container,
                live_env=live_env,
                ours=live.ours(kind, container, live_env),
                owners=live.owners,
                field_manager=field_manager,
                configmap=configmap,
            )
            found.add(container, planner.plan(wanted_env, desired.manageable))
    targeted = {name for _, by_name in desired.by_kind() for name in by_name}
    _keep_untargeted(live, targeted, found)
    return EnvDiff(
        daemonset=live.ref,
        changes=tuple(found.changes),
        conflicts=tuple(found.conflicts),
        kept=tuple(found.kept),
        missing_containers=tuple(found.missing),
        present_containers=tuple(found.present),
        managed_env={name: env for name, env in found.managed.items() if env},
        record_problems=live.record_problems,
    )


def release(
    live_daemonset: Mapping[str, Any],
    *,
    keep_values: Mapping[str, str] | None = None,
    field_manager: str = FIELD_MANAGER,
) -> EnvDiff:
    """Undo what apilane did to the DaemonSet's env, as its ownership record says: each
    variable apilane created is removed, each value it replaced comes back.

    With `keep_values` (the ConfigMap's data), an entry that reads apilane's ConfigMap gets
    that value as literal env instead (and stays apilane's, so a later release still gives
    the original back): calico-node keeps booting with the current endpoints."""
    live = _LiveDaemonSet.read(live_daemonset, field_manager=field_manager)
    wanted: dict[ContainerKind, dict[str, dict[str, str]]] = {}
    for kind in CONTAINER_KINDS:
        wanted[kind] = {}
        for container in live.containers[kind]:
            live_env = live.env(kind, container) or {}
            ours = live.ours(kind, container, live_env)
            wanted[kind][container] = {
                name: keep_values[name]
                for name in ours
                if keep_values is not None
                and name in keep_values
                and _configmap_ref(live_env.get(name), name) is not None
            }
    desired = DesiredEnv(
        init_containers=wanted["initContainers"], containers=wanted["containers"], env={}
    )
    return diff(live_daemonset, desired, field_manager=field_manager)


@dataclass(frozen=True, kw_only=True)
class _LiveDaemonSet:
    """The parts of the live object a diff reads, each read once and tolerantly."""

    ref: str  # "namespace/name"
    containers: Mapping[ContainerKind, Mapping[str, Mapping[str, Any]]]
    record: Record | None  # None: no trustworthy annotation, ownership from managedFields
    record_problems: tuple[str, ...]
    owners: EnvOwners
    field_manager: str

    @classmethod
    def read(cls, daemonset: Mapping[str, Any], *, field_manager: str) -> _LiveDaemonSet:
        metadata = as_dict(daemonset.get("metadata"))
        pod_spec = as_dict(as_dict(as_dict(daemonset.get("spec")).get("template")).get("spec"))
        record, problems = recorded_ownership(metadata)
        return cls(
            ref=f"{as_str(metadata.get('namespace'))}/{as_str(metadata.get('name'))}",
            containers={
                kind: {
                    as_str(c.get("name")): c
                    for c in as_list(pod_spec.get(kind))
                    if isinstance(c, Mapping)
                }
                for kind in CONTAINER_KINDS
            },
            record=record,
            record_problems=problems,
            owners=EnvOwners(metadata),
            field_manager=field_manager,
        )

    def env(self, kind: ContainerKind, container: str) -> dict[str, Mapping[str, Any]] | None:
        """The container's env entries by name; None when there is no such container."""
        found = self.containers[kind].get(container)
        return None if found is None else _env_by_name(found.get("env"))

    def ours(
        self, kind: ContainerKind, container: str, live_env: Mapping[str, Any]
    ) -> Mapping[str, str | None]:
        """What apilane owns in this container: the record, else what our manager created."""
        if self.record is not None:
            return self.record.get(container, {})
        return {
            name: None
            for name in live_env
            if self.field_manager in self.owners.created_by(kind, container, name)
        }


@dataclass
class _Found:
    """A diff being collected, container by container."""

    changes: list[EnvChange] = field(default_factory=list)
    conflicts: list[EnvConflict] = field(default_factory=list)
    kept: list[EnvKept] = field(default_factory=list)
    missing: list[tuple[ContainerKind, str]] = field(default_factory=list)
    present: list[tuple[ContainerKind, str]] = field(default_factory=list)
    managed: dict[str, dict[str, str | None]] = field(default_factory=dict)

    def add(self, container: str, plan: _ContainerPlan) -> None:
        self.changes += plan.changes
        self.conflicts += plan.conflicts
        self.kept += plan.kept
        self.managed[container] = plan.ours


def _keep_untargeted(live: _LiveDaemonSet, targeted: set[str], found: _Found) -> None:
    """Containers apilane set variables in but no longer targets (the configuration changed):
    left as they are, and still recorded, rather than stripped because of a typo."""
    for container, recorded in sorted((live.record or {}).items()):
        if container in targeted:
            continue
        for kind in CONTAINER_KINDS:
            live_env = live.env(kind, container)
            if live_env is None:
                continue
            still_there = {name: prev for name, prev in recorded.items() if name in live_env}
            found.managed[container] = still_there
            found.kept += [
                EnvKept(
                    kind=kind,
                    container=container,
                    name=name,
                    value=_shown_value(live_env[name]),
                    why="set by apilane in a container it no longer targets; left as is",
                )
                for name in sorted(still_there)
            ]


@dataclass(frozen=True, kw_only=True)
class _ContainerPlan:
    changes: tuple[EnvChange, ...]
    conflicts: tuple[EnvConflict, ...]
    kept: tuple[EnvKept, ...]
    ours: dict[str, str | None]  # the container's record after the changes


@dataclass(kw_only=True)
class _ContainerPlanner:
    """One container: set what is wanted, release what is ours and not wanted, leave the rest."""

    kind: ContainerKind
    container: str
    live_env: Mapping[str, Mapping[str, Any]]
    ours: Mapping[str, str | None]
    owners: EnvOwners
    field_manager: str
    configmap: str | None = None  # wanted variables read from this ConfigMap; None: literal
    changes: list[EnvChange] = field(default_factory=list)
    conflicts: list[EnvConflict] = field(default_factory=list)
    kept: list[EnvKept] = field(default_factory=list)
    after: dict[str, str | None] = field(default_factory=dict)

    def plan(self, wanted_env: Mapping[str, str], manageable: frozenset[str]) -> _ContainerPlan:
        present_manageable = {name for name in self.live_env if name in manageable}
        for name in sorted(set(wanted_env) | set(self.ours) | present_manageable):
            if name in wanted_env:
                self._want(name, wanted_env[name])
            elif name in self.live_env:  # else recorded as ours, but someone removed it already
                self._release(name, self.live_env[name])
        return _ContainerPlan(
            changes=tuple(self.changes),
            conflicts=tuple(self.conflicts),
            kept=tuple(self.kept),
            ours=self.after,
        )

    def _want(self, name: str, value: str) -> None:
        entry = self.live_env.get(name)
        live_ref = _configmap_ref(entry, name)
        ours = name in self.ours
        source = _value_from_source(entry)
        if source is not None and not (
            live_ref is not None and (ours or live_ref == self.configmap)
        ):
            # Not ours to write, and no longer ours to release.
            self.conflicts.append(
                EnvConflict(
                    kind=self.kind, container=self.container, name=name, source=source, wanted=value
                )
            )
            return
        live_value = None if entry is None or live_ref is not None else as_str(entry.get("value"))
        same = (
            live_ref == self.configmap
            if self.configmap is not None
            else (live_ref is None and live_value == value)
        )
        if entry is None:
            self.after[name] = None
        elif ours:
            self.after[name] = self.ours[name]
        elif not same and live_ref is None:
            self.after[name] = live_value  # we replace someone's value: give it back later
        # else: someone else set exactly what we want; we never wrote it, so never take it
        if not same:
            self.changes.append(
                EnvChange(
                    kind=self.kind,
                    container=self.container,
                    name=name,
                    old=live_value,
                    new=value,
                    old_ref=live_ref,
                    new_ref=self.configmap,
                )
            )

    def _release(self, name: str, entry: Mapping[str, Any]) -> None:
        if name not in self.ours:
            self._keep(name, entry, "not set by apilane; left as is")
            return
        if others := self._set_by_others(name, entry):
            self._keep(
                name, entry, f"set by {', '.join(sorted(others))} since apilane set it; left as is"
            )
            return
        previous, live_ref = self.ours[name], _configmap_ref(entry, name)
        live_value = None if live_ref is not None else as_str(entry.get("value"))
        if live_ref is not None or previous != live_value:
            # None: we created it, so it goes; else its old value returns
            self.changes.append(
                EnvChange(
                    kind=self.kind,
                    container=self.container,
                    name=name,
                    old=live_value,
                    new=previous,
                    old_ref=live_ref,
                )
            )

    def _set_by_others(self, name: str, entry: Mapping[str, Any]) -> frozenset[str]:
        """Who else has set this variable's value since apilane did (empty: nobody)."""
        source = _value_from_source(entry)
        if source is not None and _configmap_ref(entry, name) is None:
            return frozenset({f"a valueFrom ({source})"})
        setters = self.owners.value_set_by(self.kind, self.container, name)
        return frozenset() if setters is None else setters - {self.field_manager}

    def _keep(self, name: str, entry: Mapping[str, Any], why: str) -> None:
        self.kept.append(
            EnvKept(
                kind=self.kind,
                container=self.container,
                name=name,
                value=_shown_value(entry),
                why=why,
            )
        )


def _value_from_source(entry: Mapping[str, Any] | None) -> str | None:
    if entry is None or entry.get("valueFrom") is None:
        return None
    return next(iter(as_dict(entry.get("valueFrom"))), "valueFrom")


def _configmap_ref(entry: Mapping[str, Any] | None, name: str) -> str | None:
    """The ConfigMap an entry reads its value from under its own name (the form apilane
    writes), or None when it does not."""
    if entry is None:
        return None
    ref = as_dict(as_dict(entry.get("valueFrom")).get("configMapKeyRef"))
    if not ref or as_str(ref.get("key")) != name or not as_str(ref.get("name")):
        return None
    return as_str(ref.get("name"))


def _shown_value(entry: Mapping[str, Any]) -> str:
    source = _value_from_source(entry)
    return f"<from {source}>" if source is not None else as_str(entry.get("value"))


def _env_by_name(raw: Any) -> dict[str, Mapping[str, Any]]:
    """Env entries by name; with duplicate names the last wins, as in the kubelet."""
    return {
        as_str(entry.get("name")): entry for entry in as_list(raw) if isinstance(entry, Mapping)
    }
