"""The API server's endpoints from the raw API objects: a pure function, no I/O.

`build_snapshot` takes the `kubernetes` Service, its EndpointSlices, the kube-proxy
DaemonSet and the Nodes exactly as the API server sent them (plain dicts) and returns the
canonical endpoint state, with every problem it noticed as a typed `Finding`. Discovery
publishes it; `apilane render manifest --kubeconfig` renders it straight away; both must
apply the same rules, so they live here once. The input comes from outside the process, so
every field may be missing or of the wrong type: a bad entry is rejected with a finding,
never with an exception.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, NotRequired, TypedDict, TypeGuard

from apilane.model import events
from apilane.model.events import (
    ApiServerEndpoint,
    EndpointSnapshot,
    Family,
    Finding,
    KubeProxyState,
    ServiceEndpoint,
    WarningReason,
)
from apilane.model.objects import as_dict, as_int, as_items, as_list, as_str

# -- The parts of the API objects we read (kopf-style: documentation, not validation) -------


class ObjectMeta(TypedDict, total=False):
    name: str
    namespace: str
    uid: str
    resourceVersion: str
    generation: int
    labels: dict[str, str]
    annotations: dict[str, str]


class ServicePortBody(TypedDict, total=False):
    name: str
    port: int
    protocol: str
    targetPort: int | str


class ServiceBody(TypedDict, total=False):
    metadata: ObjectMeta
    spec: dict[str, Any]  # clusterIP, clusterIPs, ports: list[ServicePortBody]


class EndpointConditionsBody(TypedDict, total=False):
    ready: bool | None
    serving: bool | None
    terminating: bool | None


class EndpointBody(TypedDict, total=False):
    addresses: list[str]
    conditions: EndpointConditionsBody
    nodeName: str
    zone: str


class EndpointPortBody(TypedDict, total=False):
    name: str
    port: int
    protocol: str


class EndpointSliceBody(TypedDict):
    metadata: ObjectMeta
    addressType: NotRequired[str]
    endpoints: NotRequired[list[EndpointBody]]
    ports: NotRequired[list[EndpointPortBody]]


Body = Mapping[str, Any]

# -- Well-known markers --------------------------------------------------------------------

TRIGGER_TIME_ANNOTATION: Final = "endpoints.kubernetes.io/last-change-trigger-time"

# Checked in this order; the first one found is the one `KubeProxyState.managed_by` names.
MANAGED_BY_LABELS: Final = (
    "app.kubernetes.io/managed-by",
    "addonmanager.kubernetes.io/mode",
    "kustomize.toolkit.fluxcd.io/name",
    "helm.toolkit.fluxcd.io/name",
)
MANAGED_BY_ANNOTATIONS: Final = ("argocd.argoproj.io/tracking-id",)

# Node labels only a managed offering puts on its nodes: strong evidence, always reported.
MANAGED_NODE_LABELS: Final = (
    ("eks.amazonaws.com/nodegroup", "eks"),
    ("eks.amazonaws.com/compute-type", "eks"),
    ("alpha.eksctl.io/cluster-name", "eks"),
    ("cloud.google.com/gke-nodepool", "gke"),
    ("cloud.google.com/gke-os-distribution", "gke"),
    ("kubernetes.azure.com/cluster", "aks"),
    ("kubernetes.azure.com/agentpool", "aks"),
    ("node.openshift.io/os_id", "openshift"),
    ("doks.digitalocean.com/node-id", "doks"),
    ("lke.linode.com/pool-id", "lke"),
    ("ibm-cloud.kubernetes.io/worker-id", "iks"),
    ("oci.oraclecloud.com/fault-domain", "oke"),
)
# A cloud providerID says "runs on that cloud", which is also true of a self-managed cluster
# there; it only counts when no node is a control-plane node (see `_managed_provider`).
MANAGED_PROVIDER_ID_PREFIXES: Final = (
    ("aws://", "aws"),
    ("gce://", "gce"),
    ("azure://", "azure"),
    ("digitalocean://", "digitalocean"),
    ("linode://", "linode"),
    ("oci://", "oci"),
    ("ibm://", "ibm"),
)
CONTROL_PLANE_NODE_LABELS: Final = (
    "node-role.kubernetes.io/control-plane",
    "node-role.kubernetes.io/master",
)

_PROTOCOLS: Final = ("TCP", "UDP", "SCTP")
_FAMILY_ORDER: Final = {"IPv4": 0, "IPv6": 1}


@dataclass(frozen=True, kw_only=True)
class SnapshotInputs:
    """Where the objects live; defaults are the well-known names."""

    service_namespace: str = "default"
    service_name: str = "kubernetes"
    kube_proxy_namespace: str = "kube-system"
    kube_proxy_name: str = "kube-proxy"


@dataclass(frozen=True, kw_only=True)
class SnapshotResult:
    """Everything derived from one view of the API objects."""

    service_endpoints: tuple[ServiceEndpoint, ...]
    apiserver_endpoints: tuple[ApiServerEndpoint, ...]
    digest: str
    findings: tuple[Finding, ...]
    kube_proxy: KubeProxyState
    managed_provider: str = ""
    # "EndpointSlice/default/kubernetes-abc@1234", sorted; the Service's too.
    resource_versions: tuple[str, ...] = ()
    trigger_times: tuple[datetime, ...] = ()
    # Per slice: its last-change-trigger-time, so a change can be timed from it.
    slice_trigger_times: Mapping[str, datetime] = field(default_factory=dict)

    @property
    def has_endpoints(self) -> bool:
        return bool(self.apiserver_endpoints)

    def endpoints_by_family(self) -> dict[str, tuple[ApiServerEndpoint, ...]]:
        grouped: dict[str, list[ApiServerEndpoint]] = {}
        for endpoint in self.apiserver_endpoints:
            grouped.setdefault(endpoint.family, []).append(endpoint)
        return {family: tuple(items) for family, items in grouped.items()}

    def to_event(
        self,
        *,
        cluster: str,
        generation: int,
        observed_at: datetime,
        more_resource_versions: Iterable[str] = (),
        more_trigger_times: Iterable[datetime] = (),
    ) -> EndpointSnapshot:
        """The wire event for this view; `more_*` adds what the caller saw besides the objects
        (e.g. the resource versions of deletions coalesced into it)."""
        return EndpointSnapshot(
            cluster=cluster,
            generation=generation,
            service_endpoints=self.service_endpoints,
            apiserver_endpoints=self.apiserver_endpoints,
            digest=self.digest,
            observed_at=observed_at,
            trigger_times=tuple(sorted({*self.trigger_times, *more_trigger_times})),
            resource_versions=tuple(sorted({*self.resource_versions, *more_resource_versions})),
            findings=self.findings,
            kube_proxy=self.kube_proxy,
            managed_provider=self.managed_provider,
        )


def build_snapshot(
    *,
    service: Body | None,
    endpoint_slices: Iterable[Body],
    kube_proxy: Body | None,
    nodes: Iterable[Body],
    inputs: SnapshotInputs = SnapshotInputs(),
) -> SnapshotResult:
    """The canonical endpoint state of these objects. Never raises on any input."""
    findings: list[Finding] = []
    service_ref = f"Service/{inputs.service_namespace}/{inputs.service_name}"
    slices = [s for s in as_items(endpoint_slices) if isinstance(s, Mapping)]

    service_endpoints, service_ports = _service_endpoints(service, service_ref, findings)
    candidates = _apiserver_candidates(slices, service_ports, findings)
    apiserver_endpoints = _select_usable(candidates, service_ref, findings)
    if service is not None and not apiserver_endpoints:
        findings.append(
            Finding(
                reason=WarningReason.NO_READY_ENDPOINTS,
                message="no ready or serving API server endpoint in the EndpointSlices",
                object_ref=service_ref,
            )
        )
    _check_families(service_endpoints, apiserver_endpoints, service_ref, findings)

    kube_proxy_state = _kube_proxy_state(kube_proxy, inputs, findings)
    managed_provider = _managed_provider(as_items(nodes), findings)

    resource_versions = [_resource_version("EndpointSlice", s) for s in slices]
    if isinstance(service, Mapping):
        resource_versions.append(_resource_version("Service", service))
    slice_trigger_times = {
        _object_ref("EndpointSlice", s): when
        for s in slices
        if (when := _trigger_time(s)) is not None
    }
    return SnapshotResult(
        service_endpoints=service_endpoints,
        apiserver_endpoints=apiserver_endpoints,
        digest=events.canonical_digest(service_endpoints, apiserver_endpoints),
        findings=_dedupe_findings(findings),
        kube_proxy=kube_proxy_state,
        managed_provider=managed_provider,
        resource_versions=tuple(sorted({rv for rv in resource_versions if rv})),
        trigger_times=tuple(sorted(set(slice_trigger_times.values()))),
        slice_trigger_times=slice_trigger_times,
    )


# -- The Service -------------------------------------------------------------------------


@dataclass(frozen=True)
class _ServicePort:
    port: int
    protocol: str
    name: str
    target: int | str  # a number, or the name of a port


def _service_endpoints(
    service: Body | None, service_ref: str, findings: list[Finding]
) -> tuple[tuple[ServiceEndpoint, ...], list[_ServicePort]]:
    if not isinstance(service, Mapping):
        findings.append(
            Finding(
                reason=WarningReason.SERVICE_MISSING,
                message=f"the Service {service_ref.removeprefix('Service/')} does not exist",
                object_ref=service_ref,
            )
        )
        return (), []
    spec = as_dict(service.get("spec"))
    raw_ips = spec.get("clusterIPs")
    if not isinstance(raw_ips, list) or not raw_ips:
        raw_ips = [spec.get("clusterIP")] if spec.get("clusterIP") is not None else []

    ips: list[tuple[str, Family]] = []
    for raw_ip in raw_ips:
        if raw_ip == "None":  # a headless Service has no cluster IP to program
            continue
        parsed = _parse_ip(raw_ip)
        if parsed is None:
            findings.append(_invalid(service_ref, f"cluster IP {raw_ip!r} is not an IP address"))
            continue
        ips.append(parsed)

    ports: list[_ServicePort] = []
    for index, raw_port in enumerate(as_list(spec.get("ports"))):
        port = _service_port(raw_port)
        if isinstance(port, str):
            findings.append(_invalid(service_ref, f"port #{index}: {port}"))
            continue
        ports.append(port)

    endpoints = {
        ServiceEndpoint(
            ip=ip,
            port=port.port,
            family=family,
            protocol=port.protocol,  # type: ignore[arg-type]  # checked in _service_port
            port_name=port.name,
            target_port=str(port.target),
        )
        for ip, family in ips
        for port in ports
    }
    return tuple(sorted(endpoints, key=_endpoint_sort_key)), ports


def _service_port(raw: Any) -> _ServicePort | str:
    """A valid Service port, or why it is not one."""
    if not isinstance(raw, Mapping):
        return f"not an object: {raw!r}"
    port: Any = raw.get("port")
    protocol = raw.get("protocol", "TCP")
    name = raw.get("name", "")
    target = _target_port(raw.get("targetPort"), port)
    problems = (
        None if _valid_port(port) else f"port {port!r} is not in 1-65535",
        None
        if protocol in _PROTOCOLS
        else f"protocol {protocol!r} is not one of {', '.join(_PROTOCOLS)}",
        None if isinstance(name, str) else f"name {name!r} is not a string",
        _target_port_problem(target),
    )
    problem = next((p for p in problems if p is not None), None)
    if problem is not None:
        return problem
    return _ServicePort(port=port, protocol=protocol, name=name, target=target)


def _target_port(raw: Any, port: Any) -> Any:
    """The targetPort as the API means it: unset is the port itself, a numeric string a number."""
    if raw is None or raw in ("", 0):  # a tuple: raw may be unhashable
        return port
    if isinstance(raw, str) and raw.isdigit():
        return int(raw)  # an IntOrString sent as a numeric string
    return raw


def _target_port_problem(target: Any) -> str | None:
    if isinstance(target, bool) or not isinstance(target, int | str):
        return f"targetPort {target!r} is neither a number nor a name"
    if isinstance(target, int) and not _valid_port(target):
        return f"targetPort {target!r} is not in 1-65535"
    return None


# -- The EndpointSlices ------------------------------------------------------------------


@dataclass(frozen=True)
class _Candidate:
    endpoint: ApiServerEndpoint
    ready: bool
    serving: bool


def _apiserver_candidates(
    slices: Sequence[Body], service_ports: Sequence[_ServicePort], findings: list[Finding]
) -> list[_Candidate]:
    candidates: list[_Candidate] = []
    for slice_ in slices:
        ref = _object_ref("EndpointSlice", slice_)
        address_type = slice_.get("addressType")
        if address_type not in ("IPv4", "IPv6"):
            findings.append(
                Finding(
                    reason=WarningReason.UNSUPPORTED_ADDRESS_TYPE,
                    message=f"addressType {address_type!r} is ignored: only IPv4 and IPv6 can be programmed",
                    object_ref=ref,
                    detail={"addressType": str(address_type)},
                )
            )
            continue
        ports = _matching_slice_ports(slice_, service_ports, ref, findings)
        for index, raw_endpoint in enumerate(as_list(slice_.get("endpoints"))):
            if not isinstance(raw_endpoint, Mapping):
                findings.append(_invalid(ref, f"endpoint #{index} is not an object"))
                continue
            where = _SliceEndpoint(ref=ref, index=index, address_type=address_type, ports=ports)
            candidates += _endpoint_candidates(where, raw_endpoint, findings)
    return candidates


@dataclass(frozen=True, kw_only=True)
class _SliceEndpoint:
    """Where an endpoint entry is: its slice, its position, what the slice says of it."""

    ref: str
    index: int
    address_type: str
    ports: list[tuple[int, str]]


def _endpoint_candidates(
    where: _SliceEndpoint, raw: Mapping[str, Any], findings: list[Finding]
) -> list[_Candidate]:
    """One endpoint entry: each of its valid addresses on each selected port."""
    ready, serving, terminating = _conditions(raw.get("conditions"))
    node_name = as_str(raw.get("nodeName"))
    zone = as_str(raw.get("zone"))
    candidates: list[_Candidate] = []
    for raw_ip in as_list(raw.get("addresses")):
        parsed = _parse_endpoint_ip(raw_ip)
        if isinstance(parsed, str):
            findings.append(_invalid(where.ref, f"endpoint #{where.index}: {parsed}"))
            continue
        ip, family = parsed
        if family != where.address_type:
            findings.append(
                _invalid(
                    where.ref,
                    f"endpoint #{where.index}: {ip} is {family} in a slice of addressType"
                    f" {where.address_type}",
                )
            )
            continue
        candidates += [
            _Candidate(
                endpoint=ApiServerEndpoint(
                    ip=ip,
                    port=port,
                    family=family,
                    protocol=protocol,  # type: ignore[arg-type]  # checked
                    ready=ready,
                    serving=serving,
                    terminating=terminating,
                    node_name=node_name,
                    zone=zone,
                ),
                ready=ready,
                serving=serving,
            )
            for port, protocol in where.ports
        ]
    return candidates


def _matching_slice_ports(
    slice_: Body, service_ports: Sequence[_ServicePort], ref: str, findings: list[Finding]
) -> list[tuple[int, str]]:
    """The (port, protocol) pairs of this slice that the Service's target ports select.

    A named targetPort matches a slice port of that name; the EndpointSlice controller names
    slice ports after the Service port, so the Service port's own name matches too. A numeric
    targetPort matches by number. Protocols must agree.
    """
    valid = _valid_slice_ports(slice_, ref, findings)
    selected: set[tuple[int, str]] = set()
    for service_port in service_ports:
        if isinstance(service_port.target, str):
            names = {service_port.target, service_port.name}
            matches = [
                (p, proto) for n, p, proto in valid if n in names and proto == service_port.protocol
            ]
        else:
            matches = [
                (p, proto)
                for _, p, proto in valid
                if p == service_port.target and proto == service_port.protocol
            ]
        if not matches and valid:
            findings.append(
                _invalid(
                    ref,
                    f"no slice port matches the Service's targetPort {service_port.target!r}"
                    f" ({service_port.protocol})",
                )
            )
        selected.update(matches)
    return sorted(selected)


def _valid_slice_ports(
    slice_: Body, ref: str, findings: list[Finding]
) -> list[tuple[str, int, str]]:
    """(name, port, protocol) of each slice port that can be programmed."""
    valid: list[tuple[str, int, str]] = []
    for index, raw in enumerate(as_list(slice_.get("ports"))):
        if not isinstance(raw, Mapping):
            findings.append(_invalid(ref, f"port #{index} is not an object"))
            continue
        port = raw.get("port")
        if port is None:
            continue  # "all ports" in the API: nothing we can program for a given target
        protocol = raw.get("protocol", "TCP")
        name = raw.get("name") or ""
        if not _valid_port(port):
            findings.append(
                _invalid(ref, f"port #{index} ({name or 'unnamed'}): {port!r} is not in 1-65535")
            )
            continue
        if protocol not in _PROTOCOLS or not isinstance(name, str):
            findings.append(
                _invalid(ref, f"port #{index}: protocol {protocol!r} or name {name!r} is invalid")
            )
            continue
        valid.append((name, port, protocol))
    return valid


def _conditions(raw: Any) -> tuple[bool, bool, bool]:
    """(ready, serving, terminating) with the API's defaults for unset values.

    ready unset counts as ready; serving unset defers to ready; terminating unset is false.
    A value of the wrong type counts as unset.
    """
    conditions = as_dict(raw)
    ready_raw = conditions.get("ready")
    ready = ready_raw if isinstance(ready_raw, bool) else True
    serving_raw = conditions.get("serving")
    serving = serving_raw if isinstance(serving_raw, bool) else ready
    terminating_raw = conditions.get("terminating")
    terminating = terminating_raw if isinstance(terminating_raw, bool) else False
    return ready, serving, terminating


def _select_usable(
    candidates: list[_Candidate], service_ref: str, findings: list[Finding]
) -> tuple[ApiServerEndpoint, ...]:
    """Ready endpoints; when none is ready, the serving-but-terminating ones. Deduplicated."""
    ready = [c for c in candidates if c.ready]
    chosen = ready
    if not ready:
        chosen = [c for c in candidates if c.serving and c.endpoint.terminating]
        if chosen:
            findings.append(
                Finding(
                    reason=WarningReason.TERMINATING_FALLBACK,
                    message="no API server endpoint is ready; using the serving-but-terminating ones",
                    object_ref=service_ref,
                    detail={"endpoints": str(len({_identity(c.endpoint) for c in chosen}))},
                )
            )
    # The same address may appear in several slices (e.g. during a slice split); one wins,
    # the one with the best conditions, so the result does not depend on slice order.
    best: dict[tuple[str, str, int, str], ApiServerEndpoint] = {}
    for candidate in chosen:
        key = _identity(candidate.endpoint)
        current = best.get(key)
        if current is None or _preference(candidate.endpoint) < _preference(current):
            best[key] = candidate.endpoint
    return tuple(sorted(best.values(), key=_endpoint_sort_key))


def _identity(endpoint: ApiServerEndpoint) -> tuple[str, str, int, str]:
    return (endpoint.family, endpoint.ip, endpoint.port, endpoint.protocol)


def _preference(endpoint: ApiServerEndpoint) -> tuple[Any, ...]:
    return (
        not endpoint.ready,
        not endpoint.serving,
        endpoint.terminating,
        endpoint.node_name,
        endpoint.zone,
    )


def _check_families(
    service_endpoints: tuple[ServiceEndpoint, ...],
    apiserver_endpoints: tuple[ApiServerEndpoint, ...],
    service_ref: str,
    findings: list[Finding],
) -> None:
    service_families = {e.family for e in service_endpoints}
    endpoint_families = {e.family for e in apiserver_endpoints}
    if not service_families or not endpoint_families or service_families == endpoint_families:
        return
    findings.append(
        Finding(
            reason=WarningReason.FAMILY_MISMATCH,
            message=(
                f"the Service has {'+'.join(sorted(service_families))} cluster IPs"
                f" but the API server endpoints are {'+'.join(sorted(endpoint_families))}"
            ),
            object_ref=service_ref,
            detail={
                "serviceFamilies": ",".join(sorted(service_families)),
                "endpointFamilies": ",".join(sorted(endpoint_families)),
            },
        )
    )


# -- kube-proxy --------------------------------------------------------------------------


def _kube_proxy_state(
    ds: Body | None, inputs: SnapshotInputs, findings: list[Finding]
) -> KubeProxyState:
    ref = f"DaemonSet/{inputs.kube_proxy_namespace}/{inputs.kube_proxy_name}"
    if not isinstance(ds, Mapping):
        findings.append(
            Finding(
                reason=WarningReason.KUBE_PROXY_MISSING,
                message=f"the DaemonSet {ref.removeprefix('DaemonSet/')} does not exist",
                object_ref=ref,
            )
        )
        return KubeProxyState(
            present=False, namespace=inputs.kube_proxy_namespace, name=inputs.kube_proxy_name
        )

    metadata = as_dict(ds.get("metadata"))
    ready = _kube_proxy_ready(metadata, as_dict(ds.get("status")), ref, findings)
    markers = _management_markers(metadata)
    if markers:
        findings.append(
            Finding(
                reason=WarningReason.EXTERNALLY_MANAGED_KUBE_PROXY,
                message=f"kube-proxy is managed by something else ({markers[0]}); it must not be patched",
                object_ref=ref,
                detail={"marker": markers[0], "markers": ",".join(markers)},
            )
        )
    return KubeProxyState(
        present=True,
        ready=ready,
        managed_by=markers[0] if markers else "",
        namespace=inputs.kube_proxy_namespace,
        name=inputs.kube_proxy_name,
    )


def _kube_proxy_ready(
    metadata: Mapping[str, Any], status: Mapping[str, Any], ref: str, findings: list[Finding]
) -> bool:
    """Every scheduled pod is ready, for the DaemonSet's current spec."""
    desired = as_int(status.get("desiredNumberScheduled"))
    ready_count = as_int(status.get("numberReady"))
    generation = as_int(metadata.get("generation"))
    observed = as_int(status.get("observedGeneration"))
    if desired > 0 and ready_count >= desired and observed >= generation:
        return True
    findings.append(
        Finding(
            reason=WarningReason.KUBE_PROXY_NOT_READY,
            message=f"kube-proxy has {ready_count} of {desired} pods ready",
            object_ref=ref,
            detail={
                "numberReady": str(ready_count),
                "desiredNumberScheduled": str(desired),
                "observedGeneration": str(observed),
                "generation": str(generation),
            },
        )
    )
    return False


def _management_markers(metadata: Mapping[str, Any]) -> list[str]:
    labels = as_dict(metadata.get("labels"))
    annotations = as_dict(metadata.get("annotations"))
    markers = [f"label:{key}={labels[key]}" for key in MANAGED_BY_LABELS if key in labels]
    markers += [f"annotation:{key}" for key in MANAGED_BY_ANNOTATIONS if key in annotations]
    return markers


# -- Managed control plane -----------------------------------------------------------------


def _managed_provider(nodes: list[Any], findings: list[Finding]) -> str:
    """Which managed offering runs the API server outside the cluster, or "".

    Provider labels are decisive. A cloud providerID alone only counts when no node is a
    control-plane node: kubeadm on EC2 also has aws:// IDs, but its API server is in-cluster.
    """
    label_hits: list[tuple[str, str, str]] = []  # (provider, marker, node)
    provider_id_hits: list[tuple[str, str, str]] = []
    has_control_plane_node = False
    for node in nodes:
        if not isinstance(node, Mapping):
            continue
        metadata = as_dict(node.get("metadata"))
        name = as_str(metadata.get("name"))
        labels = as_dict(metadata.get("labels"))
        if any(key in labels for key in CONTROL_PLANE_NODE_LABELS):
            has_control_plane_node = True
        for key, provider in MANAGED_NODE_LABELS:
            if key in labels:
                label_hits.append((provider, f"label:{key}", name))
        provider_id = as_str(as_dict(node.get("spec")).get("providerID"))
        for prefix, provider in MANAGED_PROVIDER_ID_PREFIXES:
            if provider_id.startswith(prefix):
                provider_id_hits.append((provider, f"providerID:{prefix}", name))

    hits = label_hits or ([] if has_control_plane_node else provider_id_hits)
    if not hits:
        return ""
    provider, marker, node_name = min(hits)  # deterministic whatever the node order
    findings.append(
        Finding(
            reason=WarningReason.MANAGED_CONTROL_PLANE,
            message=(
                f"nodes look like {provider} ({marker} on node {node_name}): the API server may"
                " live outside the cluster and its endpoints may change without notice"
            ),
            object_ref=f"Node/{node_name}",
            detail={"provider": provider, "marker": marker, "node": node_name},
        )
    )
    return provider


# -- Helpers -----------------------------------------------------------------------------


def _parse_ip(raw: Any) -> tuple[str, Family] | None:
    if not isinstance(raw, str):
        return None
    try:
        address = ipaddress.ip_address(raw.strip())
    except ValueError:
        return None
    return address.compressed, "IPv4" if address.version == 4 else "IPv6"


def _parse_endpoint_ip(raw: Any) -> tuple[str, Family] | str:
    """An address the data plane can send to, or why not (mirrors the API's own validation)."""
    parsed = _parse_ip(raw)
    if parsed is None:
        return f"{raw!r} is not an IP address"
    address = ipaddress.ip_address(parsed[0])
    if (
        address.is_unspecified
        or address.is_loopback
        or address.is_multicast
        or address.is_link_local
    ):
        return f"{parsed[0]} is an unspecified, loopback, multicast or link-local address"
    return parsed


def _valid_port(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 65535


def _invalid(object_ref: str, message: str) -> Finding:
    return Finding(reason=WarningReason.INVALID_ENDPOINT, message=message, object_ref=object_ref)


def _endpoint_sort_key(endpoint: ServiceEndpoint | ApiServerEndpoint) -> tuple[Any, ...]:
    return (
        _FAMILY_ORDER.get(endpoint.family, 9),
        int(ipaddress.ip_address(endpoint.ip)),
        endpoint.port,
        endpoint.protocol,
    )


def _object_ref(kind: str, obj: Body) -> str:
    return f"{kind}/{_object_key_suffix(obj)}"


def _object_key_suffix(obj: Body) -> str:
    metadata = as_dict(obj.get("metadata"))
    namespace = as_str(metadata.get("namespace"))
    name = as_str(metadata.get("name")) or "?"
    return f"{namespace}/{name}" if namespace else name


def _resource_version(kind: str, obj: Body) -> str:
    rv = as_str(as_dict(obj.get("metadata")).get("resourceVersion"))
    return f"{_object_ref(kind, obj)}@{rv}" if rv else ""


def _trigger_time(obj: Body) -> datetime | None:
    annotations = as_dict(as_dict(obj.get("metadata")).get("annotations"))
    return parse_trigger_time(annotations.get(TRIGGER_TIME_ANNOTATION))


def parse_trigger_time(raw: Any) -> datetime | None:
    """An RFC 3339 timestamp as the EndpointSlice controller writes it, or None."""
    if not isinstance(raw, str) or not raw:
        return None
    try:
        parsed = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def _dedupe_findings(findings: list[Finding]) -> tuple[Finding, ...]:
    seen: dict[tuple[str, str, str], Finding] = {}
    for finding in findings:
        seen.setdefault((finding.reason, finding.object_ref, finding.message), finding)
    return tuple(sorted(seen.values(), key=lambda f: (f.reason, f.object_ref, f.message)))


__all__ = [
    "TRIGGER_TIME_ANNOTATION",
    "EndpointSliceBody",
    "ServiceBody",
    "SnapshotInputs",
    "SnapshotResult",
    "build_snapshot",
    "parse_trigger_time",
]
