"""From an endpoint snapshot to calico-node's env, and from there to a patch: pure, no I/O.

    snapshot --render()--> DesiredEnv --diff(live DaemonSet)--> EnvDiff --> patch / text

`render` decides what every target container's env should hold. `diff` compares that with
the live DaemonSet and says what would change, what cannot be changed safely (a variable
the DaemonSet sets through `valueFrom`), and which target containers are not there. The
patch is built from the diff alone, so it names only variables that change: a strategic
merge patch that merges containers and env by name and touches nothing else.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from apilane.shared import envformat
from apilane.shared.envformat import EnvFormatError, IpPort
from apilane.shared.errors import ApilaneError
from apilane.shared.events import EndpointSnapshot

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
    )


# -- Comparing with the live DaemonSet ------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class EnvChange:
    kind: ContainerKind
    container: str
    name: str
    old: str | None  # None: the variable is not set yet
    new: str


@dataclass(frozen=True, kw_only=True)
class EnvConflict:
    """A variable we would set that the DaemonSet takes from `valueFrom`: left alone."""

    kind: ContainerKind
    container: str
    name: str
    source: str  # which valueFrom kind, e.g. "configMapKeyRef"
    wanted: str


@dataclass(frozen=True, kw_only=True)
class EnvDiff:
    daemonset: str  # "namespace/name"
    changes: tuple[EnvChange, ...] = ()
    conflicts: tuple[EnvConflict, ...] = ()
    missing_containers: tuple[tuple[ContainerKind, str], ...] = ()
    present_containers: tuple[tuple[ContainerKind, str], ...] = field(default=())

    @property
    def unchanged(self) -> bool:
        """Nothing to patch (conflicts and missing containers may still need reporting)."""
        return not self.changes

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
        return tuple(found)

    def text(self, *, generation: int | None = None) -> str:
        """A unified-diff-like view of the env change, for people and for render results."""
        where = f", generation {generation}" if generation is not None else ""
        lines = [
            f"--- DaemonSet/{self.daemonset} (live{where})",
            f"+++ DaemonSet/{self.daemonset} (desired)",
        ]
        current: tuple[str, str] | None = None
        for change in self.changes:
            if current != (change.kind, change.container):
                current = (change.kind, change.container)
                lines.append(f"@@ {change.kind}[{change.container}].env @@")
            if change.old is not None:
                lines.append(f"-{change.name}={change.old}")
            lines.append(f"+{change.name}={change.new}")
        lines += [f"! {problem}" for problem in self.problems]
        if len(lines) == 2:
            lines.append("  (no change)")
        return "\n".join(lines) + "\n"

    def patch(self, *, annotations: Mapping[str, str] | None = None) -> dict[str, Any] | None:
        """The strategic merge patch for these changes, or None when there is nothing to do.

        Containers and env are lists merged by `name`, so naming only what changes leaves
        every other container, variable, image and volume untouched; no `$setElementOrder`,
        because the order of existing entries does not matter to anyone.
        """
        if not self.changes:
            return None
        by_container: dict[tuple[ContainerKind, str], list[dict[str, str]]] = {}
        for change in self.changes:
            by_container.setdefault((change.kind, change.container), []).append(
                {"name": change.name, "value": change.new}
            )
        pod_spec: dict[str, list[dict[str, Any]]] = {}
        for (kind, container), env in by_container.items():
            pod_spec.setdefault(kind, []).append({"name": container, "env": env})
        body: dict[str, Any] = {"spec": {"template": {"spec": pod_spec}}}
        if annotations:
            body["metadata"] = {"annotations": dict(annotations)}
        return body


def diff(live_daemonset: Mapping[str, Any], desired: DesiredEnv) -> EnvDiff:
    """What applying `desired` to this DaemonSet would change. Tolerates any input shape."""
    metadata = _as_dict(live_daemonset.get("metadata"))
    daemonset = f"{_as_str(metadata.get('namespace'))}/{_as_str(metadata.get('name'))}"
    pod_spec = _as_dict(_as_dict(_as_dict(live_daemonset.get("spec")).get("template")).get("spec"))
    changes: list[EnvChange] = []
    conflicts: list[EnvConflict] = []
    missing: list[tuple[ContainerKind, str]] = []
    present: list[tuple[ContainerKind, str]] = []
    for kind, wanted_by_container in desired.by_kind():
        live_containers = {
            _as_str(c.get("name")): c
            for c in _as_list(pod_spec.get(kind))
            if isinstance(c, Mapping)
        }
        for container_name, wanted_env in wanted_by_container.items():
            container = live_containers.get(container_name)
            if container is None:
                missing.append((kind, container_name))
                continue
            present.append((kind, container_name))
            live_env = _env_by_name(container.get("env"))
            for name in sorted(wanted_env):
                value = wanted_env[name]
                entry = live_env.get(name)
                if entry is not None and entry.get("valueFrom") is not None:
                    source = next(iter(_as_dict(entry.get("valueFrom"))), "valueFrom")
                    conflicts.append(
                        EnvConflict(
                            kind=kind,
                            container=container_name,
                            name=name,
                            source=source,
                            wanted=value,
                        )
                    )
                    continue
                old = None if entry is None else _as_str(entry.get("value"))
                if old != value:
                    changes.append(
                        EnvChange(
                            kind=kind, container=container_name, name=name, old=old, new=value
                        )
                    )
    return EnvDiff(
        daemonset=daemonset,
        changes=tuple(changes),
        conflicts=tuple(conflicts),
        missing_containers=tuple(missing),
        present_containers=tuple(present),
    )


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
