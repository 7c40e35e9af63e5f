"""For manifest installs: the two env lines and a DaemonSet snippet, pure.

`snapshot_from_objects` is a deliberately small extraction of the `kubernetes` Service and
its EndpointSlices for `apilane-render manifest --kubeconfig`, used when there is no NATS
(and so no discovery) to ask. Discovery's `build_snapshot` is the complete version (findings,
managed providers, port-name matching in every corner); services may not import each other,
so until it moves to apilane.shared this covers the common case: cluster IPs crossed with
TCP ports, ready endpoints (serving-but-terminating ones when none is ready), slice ports
selected by the Service's targetPort.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

import yaml

from apilane.renderer.render import DesiredEnv
from apilane.shared.events import (
    ApiServerEndpoint,
    EndpointSnapshot,
    Family,
    KubeProxyState,
    ServiceEndpoint,
    canonical_digest,
)

# The markers tigera/operator checks, in its order.
_MANAGED_BY_LABELS = ("app.kubernetes.io/managed-by", "addonmanager.kubernetes.io/mode")
_MANAGED_BY_ANNOTATIONS = ("argocd.argoproj.io/tracking-id",)


def snapshot_from_objects(
    *,
    cluster: str,
    service: Mapping[str, Any],
    endpoint_slices: Iterable[Mapping[str, Any]],
    kube_proxy: Mapping[str, Any] | None = None,
) -> EndpointSnapshot:
    """An EndpointSnapshot (generation 0) straight from the API objects."""
    spec = _dict(service.get("spec"))
    cluster_ips = [
        ip for ip in (spec.get("clusterIPs") or [spec.get("clusterIP")]) if ip and ip != "None"
    ]
    ports = [
        p
        for p in _list(spec.get("ports"))
        if isinstance(p, Mapping) and p.get("protocol", "TCP") == "TCP"
    ]
    service_endpoints: set[ServiceEndpoint] = set()
    for ip in cluster_ips:
        ip_family = _family(ip)
        if ip_family is None:
            continue
        for port in ports:
            if isinstance(port.get("port"), int):
                service_endpoints.add(
                    ServiceEndpoint(
                        ip=_compressed(ip),
                        port=int(port["port"]),
                        family=ip_family,
                        port_name=str(port.get("name", "")),
                    )
                )
    targets = [(str(p.get("name", "")), p.get("targetPort", p.get("port"))) for p in ports]

    candidates: list[tuple[ApiServerEndpoint, bool, bool]] = []  # (endpoint, ready, serving)
    for slice_ in endpoint_slices:
        slice_ports = [
            p
            for p in _list(slice_.get("ports"))
            if isinstance(p, Mapping) and isinstance(p.get("port"), int)
        ]
        selected = {
            int(p["port"])
            for p in slice_ports
            for name, target in targets
            if p.get("protocol", "TCP") == "TCP"
            and (p.get("port") == target or p.get("name", "") in (name, target))
        }
        for endpoint in _list(slice_.get("endpoints")):
            if not isinstance(endpoint, Mapping):
                continue
            conditions = _dict(endpoint.get("conditions"))
            ready = conditions.get("ready") is not False
            serving = conditions.get("serving", ready) is not False
            terminating = conditions.get("terminating") is True
            for address in _list(endpoint.get("addresses")):
                family = _family(address)
                if not family:
                    continue
                for port_number in selected:
                    candidates.append(
                        (
                            ApiServerEndpoint(
                                ip=_compressed(address),
                                port=port_number,
                                family=family,
                                ready=ready,
                                serving=serving,
                                terminating=terminating,
                            ),
                            ready,
                            serving,
                        )
                    )
    chosen = [c[0] for c in candidates if c[1]] or [c[0] for c in candidates if c[2]]
    unique = {(e.ip, e.port): e for e in sorted(chosen)}
    service_tuple = tuple(sorted(service_endpoints))
    apiserver_tuple = tuple(sorted(unique.values()))
    return EndpointSnapshot(
        cluster=cluster,
        generation=0,
        service_endpoints=service_tuple,
        apiserver_endpoints=apiserver_tuple,
        digest=canonical_digest(service_tuple, apiserver_tuple),
        observed_at=datetime.now(UTC),
        kube_proxy=_kube_proxy_state(kube_proxy),
    )


def env_lines(desired: DesiredEnv) -> str:
    """`NAME=value` lines, in a stable order."""
    return "".join(f"{name}={desired.env[name]}\n" for name in sorted(desired.env))


def daemonset_snippet(desired: DesiredEnv, *, namespace: str, name: str) -> str:
    """YAML to merge into the calico-node DaemonSet (usable as `kubectl patch --patch-file`)."""
    pod_spec: dict[str, Any] = {}
    for kind, containers in desired.by_kind():
        if containers:
            pod_spec[kind] = [
                {"name": container, "env": [{"name": k, "value": env[k]} for k in sorted(env)]}
                for container, env in containers.items()
            ]
    header = (
        f"# calico-node DaemonSet {namespace}/{name}: merge this env into your manifest, or apply it with\n"
        f"#   kubectl -n {namespace} patch daemonset {name} --type strategic --patch-file <this file>\n"
    )
    return header + yaml.safe_dump(
        {"spec": {"template": {"spec": pod_spec}}}, sort_keys=False, default_flow_style=False
    )


def _kube_proxy_state(ds: Mapping[str, Any] | None) -> KubeProxyState:
    if ds is None:
        return KubeProxyState(present=False)
    metadata = _dict(ds.get("metadata"))
    labels = _dict(metadata.get("labels"))
    annotations = _dict(metadata.get("annotations"))
    markers = [f"label:{k}={labels[k]}" for k in _MANAGED_BY_LABELS if k in labels]
    markers += [f"annotation:{k}" for k in _MANAGED_BY_ANNOTATIONS if k in annotations]
    return KubeProxyState(present=True, managed_by=markers[0] if markers else "")


def _family(raw: Any) -> Family | None:
    try:
        address = ipaddress.ip_address(str(raw).strip())
    except ValueError:
        return None
    return "IPv4" if address.version == 4 else "IPv6"


def _compressed(raw: Any) -> str:
    return ipaddress.ip_address(str(raw).strip()).compressed


def _dict(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else []
