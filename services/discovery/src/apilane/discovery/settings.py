"""discovery's settings, read once at start from APILANE_* (see `apilane.runtime.config`).

Every variable is listed with its default in docs/configuration.md. Discovery signs every
snapshot with the Ed25519 key in APILANE_SIGNING_KEY_FILE (required), valid for
APILANE_SNAPSHOT_TTL and re-signed at half of it.
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from apilane.kube.leader import LeaseSettings, load_lease_settings
from apilane.model import subjects
from apilane.model.errors import ConfigError
from apilane.model.signing import SigningKey
from apilane.runtime.config import PREFIX, CommonSettings, Env, load_common, load_signing_key

SERVICE_NAME: Final = "apilane-discovery"


@dataclass(frozen=True, kw_only=True)
class DiscoverySettings:
    signing_key: SigningKey
    snapshot_ttl: float = 3600.0  # seconds a signed snapshot is valid; re-signed at half
    common: CommonSettings = field(default_factory=CommonSettings)
    service_namespace: str = "default"
    service_name: str = "kubernetes"
    kube_proxy_namespace: str = "kube-system"
    kube_proxy_name: str = "kube-proxy"
    coalesce_window: float = 0.1
    publish_retry_max: float = 5.0
    stream_replicas: int = 1  # copies of each stream in a JetStream cluster (3 survives one)
    watch_backoff_max: float = 10.0
    # Anti-entropy: how often the leader reads its KV key besides being told of each write,
    # and how often it may put its snapshot back (`antientropy.ReassertPace`).
    key_check_interval: float = 1.0
    reassert_interval: float = 0.5
    reassert_interval_max: float = 10.0
    # `load` names the Lease after the cluster; a caller building settings by hand sets it.
    lease: LeaseSettings = field(
        default_factory=lambda: LeaseSettings(
            name=subjects.discovery_lease("default"), identity=_default_identity()
        )
    )

    @property
    def cluster(self) -> str:
        return self.common.cluster

    @property
    def identity(self) -> str:
        """The replica's name: the pod name, unique per replica."""
        return self.lease.identity


def load(environ: Mapping[str, str] | None = None) -> DiscoverySettings:
    """Raise ConfigError naming the variable when a value is bad."""
    env = Env(environ)
    common = load_common(environ)
    reassert_interval = env.seconds("REASSERT_INTERVAL", 0.5, low=0.05)
    reassert_interval_max = env.seconds("REASSERT_INTERVAL_MAX", 10.0, low=0.05)
    if reassert_interval_max < reassert_interval:
        raise ConfigError(
            f"{PREFIX}REASSERT_INTERVAL_MAX ({reassert_interval_max}s) is below"
            f" {PREFIX}REASSERT_INTERVAL ({reassert_interval}s)"
        )
    return DiscoverySettings(
        signing_key=load_signing_key(env),
        snapshot_ttl=env.seconds("SNAPSHOT_TTL", 3600.0, low=1.0),
        common=common,
        service_namespace=env.str("SERVICE_NAMESPACE", "default"),
        service_name=env.str("SERVICE_NAME", "kubernetes"),
        kube_proxy_namespace=env.str("KUBE_PROXY_NAMESPACE", "kube-system"),
        kube_proxy_name=env.str("KUBE_PROXY_NAME", "kube-proxy"),
        coalesce_window=env.seconds("COALESCE_WINDOW", 0.1),
        publish_retry_max=env.seconds("PUBLISH_RETRY_MAX", 5.0, low=0.05),
        stream_replicas=env.int("STREAM_REPLICAS", 1, low=1, high=5),
        watch_backoff_max=env.seconds("WATCH_BACKOFF_MAX", 10.0, low=0.05),
        key_check_interval=env.seconds("KEY_CHECK_INTERVAL", 1.0, low=0.05),
        reassert_interval=reassert_interval,
        reassert_interval_max=reassert_interval_max,
        lease=load_lease_settings(
            env,
            name=subjects.discovery_lease(common.cluster),
            identity=env.str("POD_NAME", "") or _default_identity(),
        ),
    )


def _default_identity() -> str:
    # Outside a pod: unique per process, so two local replicas never share an identity.
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
