"""The renderer's settings, read once at start from APILANE_* variables.

| Variable                               | Default          | Meaning                                                |
|----------------------------------------|------------------|--------------------------------------------------------|
| APILANE_TARGET_NAMESPACE               | calico-system    | namespace of the DaemonSet to patch                    |
| APILANE_TARGET_DAEMONSET               | calico-node      | the DaemonSet to patch                                 |
| APILANE_TARGET_INIT_CONTAINERS         | ebpf-bootstrap   | init containers that get the two endpoint variables    |
| APILANE_TARGET_CONTAINERS              | calico-node      | containers that get them (and the kube-proxy settings) |
| APILANE_DRY_RUN                        | false            | server-side dry run only; publish the diff             |
| APILANE_COALESCE_DURING_ROLLOUT        | true             | hold new patches while our last rollout runs           |
| APILANE_COALESCE_MAX_WAIT              | 5m               | stop holding after this long (a stuck rollout)         |
| APILANE_MANAGE_KUBE_PROXY_CLEANUP      | true             | Felix kube-proxy coexistence env when kube-proxy is    |
|                                        |                  | managed by something else                              |
| APILANE_LEASE_NAMESPACE                | apilane          | namespace of the leader-election Lease                 |
| APILANE_LEADER_ELECTION                | true             | only the Lease holder patches                          |
| APILANE_CONFLICT_RETRIES               | 5                | attempts per snapshot when the DaemonSet changed under us |
| APILANE_POD_NAME / HOSTNAME            | (host name)      | identity in the Lease                                  |

Plus the common ones (`config.load_common`): APILANE_CLUSTER, APILANE_NATS_URL, KUBECONFIG, ...
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

import msgspec

from apilane.model.errors import ConfigError
from apilane.renderer import render
from apilane.renderer.render import RenderOptions
from apilane.runtime import config
from apilane.runtime.config import CommonSettings, Env

SERVICE_NAME = "apilane-renderer"
# Also how render recognises, in managedFields, the env entries the renderer created.
FIELD_MANAGER = render.FIELD_MANAGER


class RendererSettings(msgspec.Struct, frozen=True, kw_only=True):
    common: CommonSettings = CommonSettings()
    target_namespace: str = "calico-system"
    target_daemonset: str = "calico-node"
    target_init_containers: tuple[str, ...] = ("ebpf-bootstrap",)
    target_containers: tuple[str, ...] = ("calico-node",)
    dry_run: bool = False
    coalesce_during_rollout: bool = True
    coalesce_max_wait: float = 300.0
    manage_kube_proxy_cleanup: bool = True
    lease_namespace: str = "apilane"
    leader_election: bool = True
    conflict_retries: int = 5
    identity: str = msgspec.field(default_factory=lambda: _default_identity(Env({})))

    @property
    def cluster(self) -> str:
        return self.common.cluster

    @property
    def daemonset_ref(self) -> str:
        return f"{self.target_namespace}/{self.target_daemonset}"

    @property
    def daemonset_path(self) -> str:
        return (
            f"/apis/apps/v1/namespaces/{self.target_namespace}/daemonsets/{self.target_daemonset}"
        )

    def render_options(self) -> RenderOptions:
        return RenderOptions(
            init_containers=self.target_init_containers,
            containers=self.target_containers,
            manage_kube_proxy_cleanup=self.manage_kube_proxy_cleanup,
        )


def load(environ: Mapping[str, str] | None = None) -> RendererSettings:
    """Read and validate everything; raises ConfigError naming the bad variable."""
    env = Env(environ)
    init_containers = _names(env, "TARGET_INIT_CONTAINERS", ("ebpf-bootstrap",), allow_none=True)
    containers = _names(env, "TARGET_CONTAINERS", ("calico-node",), allow_none=True)
    if not init_containers and not containers:
        raise ConfigError(
            "APILANE_TARGET_INIT_CONTAINERS and APILANE_TARGET_CONTAINERS are both empty:"
            " nothing to patch"
        )
    return RendererSettings(
        common=config.load_common(environ),
        target_namespace=_dns_label(env, "TARGET_NAMESPACE", "calico-system"),
        target_daemonset=_dns_label(env, "TARGET_DAEMONSET", "calico-node"),
        target_init_containers=init_containers,
        target_containers=containers,
        dry_run=env.bool("DRY_RUN", False),
        coalesce_during_rollout=env.bool("COALESCE_DURING_ROLLOUT", True),
        coalesce_max_wait=env.seconds("COALESCE_MAX_WAIT", 300.0),
        manage_kube_proxy_cleanup=env.bool("MANAGE_KUBE_PROXY_CLEANUP", True),
        lease_namespace=_dns_label(env, "LEASE_NAMESPACE", "apilane"),
        leader_election=env.bool("LEADER_ELECTION", True),
        conflict_retries=env.int("CONFLICT_RETRIES", 5, low=1, high=100),
        identity=_default_identity(env),
    )


def _default_identity(env: Env) -> str:
    """The Lease holder name: the pod's name in a cluster, else host and process."""
    named = (env.raw("POD_NAME") or env.environ.get("HOSTNAME") or "").strip()
    return named or f"{socket.gethostname()}-{os.getpid()}"


def _dns_label(env: Env, name: str, default: str) -> str:
    value = env.str(name, default)
    if not _is_dns_label(value):
        raise ConfigError(f"{config.PREFIX}{name}={value!r}: expected a DNS label (a-z, 0-9, '-')")
    return value


def _names(env: Env, name: str, default: tuple[str, ...], *, allow_none: bool) -> tuple[str, ...]:
    """A comma-separated list of container names; "-" (or "none") means none at all."""
    raw = env.raw(name)
    if allow_none and raw is not None and raw.lower() in ("-", "none"):
        return ()
    values = env.list(name, default)
    for value in values:
        if not _is_dns_label(value):
            raise ConfigError(f"{config.PREFIX}{name}: {value!r} is not a container name")
    return tuple(dict.fromkeys(values))


def _is_dns_label(value: str) -> bool:
    return (
        0 < len(value) <= 63
        and value[0].isalnum()
        and value[-1].isalnum()
        and all(c.isascii() and (c.islower() or c.isdigit() or c == "-") for c in value)
    )
