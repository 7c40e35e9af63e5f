"""From an endpoint snapshot to calico-node's env, and from there to a patch: pure, no I/O.

    snapshot --render()--> DesiredEnv --diff(live DaemonSet)--> EnvDiff --> patch / text

`render` decides what every target container's env should hold. `diff` compares that with
the live DaemonSet and says what would change, what cannot be changed safely (a variable
the DaemonSet sets through `valueFrom`), which target containers are not there, and which
variables apilane set earlier and no longer wants (removed, or given their old value back;
see "Which variables are ours"). The patch is built from the diff alone, so it names only
variables that change: a strategic merge patch that merges containers and env by name and
touches nothing else.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from apilane.model import envformat
from apilane.model.envformat import EnvFormatError, IpPort
from apilane.model.errors import ApilaneError
from apilane.model.events import EndpointSnapshot

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

ContainerKind = Literal["initContainers", "containers"]
CONTAINER_KINDS: Final[tuple[ContainerKind, ...]] = ("initContainers", "containers")


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


# -- Which variables are ours ---------------------------------------------------------------
#
# The renderer removes a variable only when it put it there. That fact is recorded in an
# annotation on the DaemonSet, written by the same patch that changes the env:
#
#   apilane.dev/managed-env: {"calico-node":{"FELIX_BPFKUBEPROXYHEALTHZPORT":"10256",
#                                            "FELIX_BPFKUBEPROXYIPTABLESCLEANUPENABLED":null}}
#
# per container, each variable apilane set, with the literal value it replaced: null when
# apilane created the variable (released by deleting it), a string when apilane overwrote a
# value someone else had set (released by putting that value back). A variable that already
# held the wanted value is not recorded: apilane never wrote it, so it never takes it away.
#
# The record is checked against managedFields before a variable is released: when another
# field manager has set its value since apilane did, the variable is theirs now and stays.
# A DaemonSet without the annotation (patched by a renderer from before the record existed)
# gets its record from managedFields: the env entries our field manager created are ours.

MANAGED_ENV_ANNOTATION: Final = "apilane.dev/managed-env"
FIELD_MANAGER: Final = "apilane-renderer"

# container name -> variable -> the literal value it had before apilane set it (None: none).
ManagedEnv = Mapping[str, Mapping[str, str | None]]


class ManagedEnvError(ApilaneError):
    """The managed-env annotation is not what this renderer writes."""


def parse_managed_env(raw: str) -> dict[str, dict[str, str | None]]:
    """The record in a managed-env annotation; raises ManagedEnvError."""
    try:
        decoded = json.loads(raw)
    except ValueError as exc:
        raise ManagedEnvError(f"not JSON: {exc}") from exc
    if not isinstance(decoded, dict):
        raise ManagedEnvError("expected an object of containers")
    record: dict[str, dict[str, str | None]] = {}
    for container, variables in decoded.items():
        if not isinstance(variables, dict) or not all(
            isinstance(previous, str | None) for previous in variables.values()
        ):
            raise ManagedEnvError(
                f"container {container!r}: expected an object of variable -> string or null"
            )
        record[container] = dict(variables)
    return record


def format_managed_env(record: ManagedEnv) -> str | None:
    """The annotation value for a record (canonical), or None when apilane owns nothing."""
    kept = {container: dict(env) for container, env in record.items() if env}
    if not kept:
        return None
    return json.dumps(kept, sort_keys=True, separators=(",", ":"))


# -- Comparing with the live DaemonSet ------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class EnvChange:
    kind: ContainerKind
    container: str
    name: str
    old: str | None  # None: the variable is not set yet
    new: str | None  # None: the variable is deleted (apilane created it and needs it no more)


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
        return tuple(change for change in self.changes if change.new is None)

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
            if change.old is not None:
                section.append(f"-{change.name}={change.old}")
            if change.new is not None:
                section.append(f"+{change.name}={change.new}")
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
            entry = (
                {"name": change.name, "$patch": "delete"}
                if change.new is None
                else {"name": change.name, "value": change.new}
            )
            by_container.setdefault((change.kind, change.container), []).append(entry)
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
) -> EnvDiff:
    """What applying `desired` to this DaemonSet would change, including the variables apilane
    set earlier and needs no more. Tolerates any input shape."""
    metadata = _as_dict(live_daemonset.get("metadata"))
    daemonset = f"{_as_str(metadata.get('namespace'))}/{_as_str(metadata.get('name'))}"
    pod_spec = _as_dict(_as_dict(_as_dict(live_daemonset.get("spec")).get("template")).get("spec"))
    record, record_problems = _recorded_ownership(metadata)
    owners = _EnvOwners(metadata)
    live_by_kind: dict[ContainerKind, dict[str, Mapping[str, Any]]] = {
        kind: {
            _as_str(c.get("name")): c
            for c in _as_list(pod_spec.get(kind))
            if isinstance(c, Mapping)
        }
        for kind in CONTAINER_KINDS
    }
    changes: list[EnvChange] = []
    conflicts: list[EnvConflict] = []
    kept: list[EnvKept] = []
    missing: list[tuple[ContainerKind, str]] = []
    present: list[tuple[ContainerKind, str]] = []
    managed: dict[str, dict[str, str | None]] = {}
    for kind, wanted_by_container in desired.by_kind():
        for container_name, wanted_env in wanted_by_container.items():
            container = live_by_kind[kind].get(container_name)
            if container is None:
                # Its variables went with it; a container of that name added later is new.
                missing.append((kind, container_name))
                continue
            present.append((kind, container_name))
            live_env = _env_by_name(container.get("env"))
            if record is None:
                ours: Mapping[str, str | None] = {
                    name: None
                    for name in live_env
                    if field_manager in owners.created_by(kind, container_name, name)
                }
            else:
                ours = record.get(container_name, {})
            plan = _plan_container(
                kind=kind,
                container=container_name,
                live_env=live_env,
                wanted_env=wanted_env,
                ours=ours,
                manageable=desired.manageable,
                owners=owners,
                field_manager=field_manager,
            )
            changes += plan.changes
            conflicts += plan.conflicts
            kept += plan.kept
            managed[container_name] = plan.ours
    # Containers apilane set variables in but no longer targets (the configuration changed):
    # left as they are, and still recorded, rather than stripped because of a typo.
    targeted = {name for _, by_name in desired.by_kind() for name in by_name}
    for container_name, recorded in sorted((record or {}).items()):
        if container_name in targeted:
            continue
        for kind in CONTAINER_KINDS:
            container = live_by_kind[kind].get(container_name)
            if container is None:
                continue
            live_env = _env_by_name(container.get("env"))
            still_there = {name: prev for name, prev in recorded.items() if name in live_env}
            managed[container_name] = still_there
            kept += [
                EnvKept(
                    kind=kind,
                    container=container_name,
                    name=name,
                    value=_shown_value(live_env[name]),
                    why="set by apilane in a container it no longer targets; left as is",
                )
                for name in sorted(still_there)
            ]
    return EnvDiff(
        daemonset=daemonset,
        changes=tuple(changes),
        conflicts=tuple(conflicts),
        kept=tuple(kept),
        missing_containers=tuple(missing),
        present_containers=tuple(present),
        managed_env={name: env for name, env in managed.items() if env},
        record_problems=record_problems,
    )


@dataclass(frozen=True, kw_only=True)
class _ContainerPlan:
    changes: tuple[EnvChange, ...]
    conflicts: tuple[EnvConflict, ...]
    kept: tuple[EnvKept, ...]
    ours: dict[str, str | None]  # the container's record after the changes


def _plan_container(
    *,
    kind: ContainerKind,
    container: str,
    live_env: Mapping[str, Mapping[str, Any]],
    wanted_env: Mapping[str, str],
    ours: Mapping[str, str | None],
    manageable: frozenset[str],
    owners: _EnvOwners,
    field_manager: str,
) -> _ContainerPlan:
    """One container: set what is wanted, release what is ours and not wanted, leave the rest."""
    changes: list[EnvChange] = []
    conflicts: list[EnvConflict] = []
    kept: list[EnvKept] = []
    after: dict[str, str | None] = {}
    present_manageable = {name for name in live_env if name in manageable}
    for name in sorted(set(wanted_env) | set(ours) | present_manageable):
        entry = live_env.get(name)
        source = _value_from_source(entry)
        live_value = None if entry is None else _as_str(entry.get("value"))

        if name in wanted_env:
            value = wanted_env[name]
            if source is not None:
                conflicts.append(
                    EnvConflict(
                        kind=kind, container=container, name=name, source=source, wanted=value
                    )
                )
                continue  # not ours to write, and no longer ours to release
            if entry is None:
                after[name] = None
            elif name in ours:
                after[name] = ours[name]
            elif live_value != value:
                after[name] = live_value  # we replace someone's value: give it back later
            # else: someone else set exactly what we want; we never wrote it, so never take it
            if live_value != value:
                changes.append(
                    EnvChange(kind=kind, container=container, name=name, old=live_value, new=value)
                )
            continue

        if entry is None:
            continue  # recorded as ours, but someone removed it already
        if name not in ours:
            kept.append(
                EnvKept(
                    kind=kind,
                    container=container,
                    name=name,
                    value=_shown_value(entry),
                    why="not set by apilane; left as is",
                )
            )
            continue
        if source is not None:
            others: frozenset[str] | None = frozenset({f"a valueFrom ({source})"})
        else:
            setters = owners.value_set_by(kind, container, name)
            others = None if setters is None else setters - {field_manager}
        if others:
            kept.append(
                EnvKept(
                    kind=kind,
                    container=container,
                    name=name,
                    value=_shown_value(entry),
                    why=f"set by {', '.join(sorted(others))} since apilane set it; left as is",
                )
            )
            continue
        previous = ours[name]
        if previous != live_value:  # None: we created it, so it goes; else its old value returns
            changes.append(
                EnvChange(kind=kind, container=container, name=name, old=live_value, new=previous)
            )
    return _ContainerPlan(
        changes=tuple(changes), conflicts=tuple(conflicts), kept=tuple(kept), ours=after
    )


def _recorded_ownership(
    metadata: Mapping[str, Any],
) -> tuple[dict[str, dict[str, str | None]] | None, tuple[str, ...]]:
    """The record from the annotation; None when there is none to trust (then managedFields)."""
    raw = _as_dict(metadata.get("annotations")).get(MANAGED_ENV_ANNOTATION)
    if raw is None:
        return None, ()
    if not isinstance(raw, str):
        return None, (f"annotation {MANAGED_ENV_ANNOTATION} is not a string; ignored",)
    try:
        return parse_managed_env(raw), ()
    except ManagedEnvError as exc:
        return None, (
            f"annotation {MANAGED_ENV_ANNOTATION} is malformed ({exc}); ownership taken from"
            " managedFields until the next patch rewrites it",
        )


class _EnvOwners:
    """Who owns which env entry, from managedFields (fieldsV1).

    An Update that adds a list entry gives its manager the entry itself (".") and its
    fields; an Update that changes a value gives its manager that value only.
    """

    def __init__(self, metadata: Mapping[str, Any]) -> None:
        self._entries = [
            (_as_str(entry.get("manager")), _as_dict(entry.get("fieldsV1")))
            for entry in _as_list(metadata.get("managedFields"))
            if isinstance(entry, Mapping)
        ]

    def created_by(self, kind: ContainerKind, container: str, name: str) -> frozenset[str]:
        return frozenset(
            manager
            for manager, fields in self._entries
            if "." in _env_entry_fields(fields, kind, container, name)
        )

    def value_set_by(self, kind: ContainerKind, container: str, name: str) -> frozenset[str] | None:
        """Managers owning the entry's value; None when the object carries no managedFields
        (then there is no evidence against the record, and it is trusted)."""
        if not self._entries:
            return None
        return frozenset(
            manager
            for manager, fields in self._entries
            if {"f:value", "f:valueFrom"} & set(_env_entry_fields(fields, kind, container, name))
        )


def _env_entry_fields(
    fields: Mapping[str, Any], kind: ContainerKind, container: str, name: str
) -> Mapping[str, Any]:
    path = ("f:spec", "f:template", "f:spec", f"f:{kind}", _list_key(container), "f:env")
    node = fields
    for step in (*path, _list_key(name)):
        node = _as_dict(node.get(step))
    return node


def _list_key(name: str) -> str:
    """How fieldsV1 names the entry of a list merged by `name`."""
    return "k:" + json.dumps({"name": name}, separators=(",", ":"))


def _value_from_source(entry: Mapping[str, Any] | None) -> str | None:
    if entry is None or entry.get("valueFrom") is None:
        return None
    return next(iter(_as_dict(entry.get("valueFrom"))), "valueFrom")


def _shown_value(entry: Mapping[str, Any]) -> str:
    source = _value_from_source(entry)
    return f"<from {source}>" if source is not None else _as_str(entry.get("value"))


def _env_by_name(raw: Any) -> dict[str, Mapping[str, Any]]:
    """Env entries by name; with duplicate names the last wins, as in the kubelet."""
    return {
        _as_str(entry.get("name")): entry for entry in _as_list(raw) if isinstance(entry, Mapping)
    }


def _as_dict(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else []


def _as_str(value: Any) -> str:
    return value if isinstance(value, str) else ""
