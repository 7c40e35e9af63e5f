"""discovery's settings, read once at start from APILANE_* (see `apilane.runtime.config`)."""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from apilane.model import subjects
from apilane.model.errors import ConfigError
from apilane.runtime.config import CommonSettings, Env, load_common

SERVICE_NAME: Final = "apilane-discovery"


@dataclass(frozen=True, kw_only=True)
class DiscoverySettings:
    common: CommonSettings = field(default_factory=CommonSettings)
    service_namespace: str = "default"
    service_name: str = "kubernetes"
    kube_proxy_namespace: str = "kube-system"
    kube_proxy_name: str = "kube-proxy"
    lease_namespace: str = "apilane"
    identity: str = ""  # the pod name; unique per replica
    coalesce_window: float = 0.1
    leader_election: bool = True
    lease_duration: float = 15.0
    lease_renew_interval: float = 5.0
    lease_retry_interval: float = 2.0
    publish_retry_max: float = 5.0
    watch_backoff_max: float = 10.0

    @property
    def cluster(self) -> str:
        return self.common.cluster

    @property
    def lease_name(self) -> str:
        return subjects.discovery_lease(self.common.cluster)


def load(environ: Mapping[str, str] | None = None) -> DiscoverySettings:
    """Raise ConfigError naming the variable when a value is bad."""
    env = Env(environ)
    identity = env.str("POD_NAME", "") or _default_identity()
    settings = DiscoverySettings(
        common=load_common(environ),
        service_namespace=env.str("SERVICE_NAMESPACE", "default"),
        service_name=env.str("SERVICE_NAME", "kubernetes"),
        kube_proxy_namespace=env.str("KUBE_PROXY_NAMESPACE", "kube-system"),
        kube_proxy_name=env.str("KUBE_PROXY_NAME", "kube-proxy"),
        lease_namespace=env.str("LEASE_NAMESPACE", "apilane"),
        identity=identity,
        coalesce_window=env.seconds("COALESCE_WINDOW", 0.1),
        leader_election=env.bool("LEADER_ELECTION", True),
        lease_duration=env.seconds("LEASE_DURATION", 15.0, low=1.0),
        lease_renew_interval=env.seconds("LEASE_RENEW_INTERVAL", 5.0, low=0.05),
        lease_retry_interval=env.seconds("LEASE_RETRY_INTERVAL", 2.0, low=0.05),
        publish_retry_max=env.seconds("PUBLISH_RETRY_MAX", 5.0, low=0.05),
        watch_backoff_max=env.seconds("WATCH_BACKOFF_MAX", 10.0, low=0.05),
    )
    if not settings.lease_renew_interval < settings.lease_duration * 2 / 3:
        raise ConfigError(
            "APILANE_LEASE_RENEW_INTERVAL must be shorter than two thirds of APILANE_LEASE_DURATION"
        )
    return settings


def _default_identity() -> str:
    # Outside a pod: unique per process, so two local replicas never share an identity.
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
