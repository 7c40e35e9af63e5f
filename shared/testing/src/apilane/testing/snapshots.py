"""Endpoint snapshots for tests and benchmarks, always with a correct digest."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime

from apilane.model import events
from apilane.model.addresses import family_of
from apilane.model.events import (
    ApiServerEndpoint,
    EndpointSnapshot,
    KubeProxyState,
    ServiceEndpoint,
)


def make_snapshot(
    *,
    generation: int,
    services: Iterable[str] = ("10.96.0.1:443",),
    apiservers: Iterable[str] = ("10.0.0.1:6443",),
    cluster: str = "default",
    protocol: events.Protocol = "TCP",
    trigger_times: tuple[datetime, ...] = (),
    kube_proxy: KubeProxyState | None = None,
) -> EndpointSnapshot:
    """A valid snapshot from "ip:port" strings ("[fd00::1]:443" for IPv6)."""
    service_endpoints = tuple(
        ServiceEndpoint(ip=ip, port=port, family=family_of(ip), protocol=protocol)
        for ip, port in map(_split, services)
    )
    apiserver_endpoints = tuple(
        ApiServerEndpoint(ip=ip, port=port, family=family_of(ip))
        for ip, port in map(_split, apiservers)
    )
    return EndpointSnapshot(
        cluster=cluster,
        generation=generation,
        service_endpoints=service_endpoints,
        apiserver_endpoints=apiserver_endpoints,
        digest=events.canonical_digest(service_endpoints, apiserver_endpoints),
        observed_at=datetime.now(UTC),
        trigger_times=trigger_times,
        kube_proxy=kube_proxy or KubeProxyState(),
    )


def _split(host_port: str) -> tuple[str, int]:
    host, _, port = host_port.rpartition(":")
    return host.strip("[]"), int(port)
