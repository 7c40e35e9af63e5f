"""The renderer's settings, read once at start from APILANE_* variables.

Every variable is listed with its default in docs/configuration.md. Besides its own, the
renderer reads the common ones (`config.load_common`) and the Lease settings every
leader-elected service shares (`apilane.kube.leader.load_lease_settings`). It verifies
every snapshot against the public keys in APILANE_TRUSTED_KEYS and/or
APILANE_TRUSTED_KEYS_FILE (at least one is required; two at once during a key rotation).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Literal

import msgspec

from apilane.kube.leader import LeaseSettings, load_lease_settings
from apilane.model import subjects
from apilane.model.errors import ConfigError
from apilane.model.signing import TrustedKeys
from apilane.renderer import ownership
from apilane.renderer.render import RenderOptions
from apilane.runtime import config
from apilane.runtime.config import CommonSettings, Env

SERVICE_NAME = "apilane-renderer"
# Also how render recognises, in managedFields, the env entries the renderer created.
FIELD_MANAGER = ownership.FIELD_MANAGER

RenderMode = Literal["configmap", "literal"]
RENDER_MODES: Final[tuple[RenderMode, ...]] = ("configmap", "literal")
DEFAULT_CONFIGMAP: Final = "apilane-kubernetes-endpoints"


@dataclass(frozen=True, kw_only=True)
class TargetPreset:
    """Where one of Calico's two install layouts keeps calico-node, and which of its
    containers read the API server endpoints at start."""

    name: str
    namespace: str
    daemonset: str = "calico-node"
    init_containers: tuple[str, ...]
    containers: tuple[str, ...]


# The operator renders calico-system/calico-node with the `ebpf-bootstrap` init container that
# fills the NAT table at pod start; calico.yaml keeps calico-node in kube-system, where the
# calico-node container reads the variables itself.
PRESETS: Final = {
    "operator": TargetPreset(
        name="operator",
        namespace="calico-system",
        init_containers=("ebpf-bootstrap",),
        containers=("calico-node",),
    ),
    "manifest": TargetPreset(
        name="manifest", namespace="kube-system", init_containers=(), containers=("calico-node",)
    ),
}
PRESET_CHOICES: Final = ("auto", *PRESETS)
# What auto-detection tries, in order: the first layout whose DaemonSet exists wins.
DETECTION_ORDER: Final = ("operator", "manifest")


class RendererSettings(msgspec.Struct, frozen=True, kw_only=True):
    trusted_keys: TrustedKeys
    common: CommonSettings = CommonSettings()
    target_namespace: str = "calico-system"
    target_daemonset: str = "calico-node"
    target_init_containers: tuple[str, ...] = ("ebpf-bootstrap",)
    target_containers: tuple[str, ...] = ("calico-node",)
    dry_run: bool = False
    coalesce_during_rollout: bool = True
    coalesce_max_wait: float = 300.0
    manage_kube_proxy_cleanup: bool = True
    conflict_retries: int = 5
    # configmap: the values live in ConfigMap `configmap_name` beside the DaemonSet, which reads
    # them with configMapKeyRef (an endpoint change rolls nothing); literal: the values are in
    # the pod template (every change rolls calico-node).
    render_mode: RenderMode = "configmap"
    configmap_name: str = DEFAULT_CONFIGMAP
    # The layout the target came from; with `detect_target` the renderer looks, at start,
    # which layout's DaemonSet exists and takes that preset's target.
    target_preset: str = "operator"
    detect_target: bool = False
    # `load` names the Lease after the cluster; a caller building settings by hand sets it.
    lease: LeaseSettings = msgspec.field(
        default_factory=lambda: LeaseSettings(
            name=subjects.renderer_lease("default"), identity=_default_identity(Env({}))
        )
    )

    @property
    def cluster(self) -> str:
        return self.common.cluster

    @property
    def identity(self) -> str:
        return self.lease.identity

    @property
    def daemonset_ref(self) -> str:
        return f"{self.target_namespace}/{self.target_daemonset}"

    @property
    def configmap_ref(self) -> str:
        return f"{self.target_namespace}/{self.configmap_name}"

    @property
    def configmap_path(self) -> str:
        return f"/api/v1/namespaces/{self.target_namespace}/configmaps/{self.configmap_name}"

    @property
    def configmap(self) -> str | None:
        """The ConfigMap the DaemonSet's entries read, or None in literal mode."""
        return self.configmap_name if self.render_mode == "configmap" else None

    def with_preset(self, preset: TargetPreset) -> RendererSettings:
        """These settings aimed at a preset's target (what auto-detection found)."""
        return msgspec.structs.replace(
            self,
            target_preset=preset.name,
            target_namespace=preset.namespace,
            target_daemonset=preset.daemonset,
            target_init_containers=preset.init_containers,
            target_containers=preset.containers,
            detect_target=False,
        )

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


def load(environ: Mapping[str, str] | None = None, *, serving: bool = True) -> RendererSettings:
    """Read and validate everything; raises ConfigError naming the bad variable. Serving
    needs a trusted key; a tool that only renders (`apilane render manifest` from the API
    server) reads the keys when given and needs none."""
    env = Env(environ)
    preset_name = env.choice("TARGET_PRESET", "auto", PRESET_CHOICES)
    # auto: detected at start, unless the target is given by name (nothing left to detect).
    detect = preset_name == "auto" and all(
        env.raw(name) is None
        for name in (
            "TARGET_NAMESPACE",
            "TARGET_DAEMONSET",
            "TARGET_INIT_CONTAINERS",
            "TARGET_CONTAINERS",
        )
    )
    preset = PRESETS["operator" if preset_name == "auto" else preset_name]
    init_containers = _names("TARGET_INIT_CONTAINERS", env, preset.init_containers, allow_none=True)
    containers = _names("TARGET_CONTAINERS", env, preset.containers, allow_none=True)
    if not init_containers and not containers:
        raise ConfigError(
            "APILANE_TARGET_INIT_CONTAINERS and APILANE_TARGET_CONTAINERS are both empty:"
            " nothing to patch"
        )
    common = config.load_common(environ)
    lease = load_lease_settings(
        env, name=subjects.renderer_lease(common.cluster), identity=_default_identity(env)
    )
    _check_dns_label("LEASE_NAMESPACE", lease.namespace)
    return RendererSettings(
        trusted_keys=(
            config.require_trusted_keys(env) if serving else config.load_trusted_keys(env)
        ),
        common=common,
        target_namespace=_dns_label("TARGET_NAMESPACE", env, default=preset.namespace),
        target_daemonset=_dns_label("TARGET_DAEMONSET", env, default=preset.daemonset),
        target_init_containers=init_containers,
        target_containers=containers,
        dry_run=env.bool("DRY_RUN", False),
        coalesce_during_rollout=env.bool("COALESCE_DURING_ROLLOUT", True),
        coalesce_max_wait=env.seconds("COALESCE_MAX_WAIT", 300.0),
        manage_kube_proxy_cleanup=env.bool("MANAGE_KUBE_PROXY_CLEANUP", True),
        conflict_retries=env.int("CONFLICT_RETRIES", 5, low=1, high=100),
        render_mode=_render_mode(env),
        configmap_name=_dns_label("CONFIGMAP_NAME", env, default=DEFAULT_CONFIGMAP),
        target_preset=preset.name,
        detect_target=detect,
        lease=lease,
    )


def _render_mode(env: Env) -> RenderMode:
    mode = env.choice("RENDER_MODE", "configmap", RENDER_MODES)
    return "literal" if mode == "literal" else "configmap"


def choose_preset(existing: frozenset[str]) -> TargetPreset | None:
    """The preset whose DaemonSet exists (`existing`: "namespace/name" refs), by
    DETECTION_ORDER; None when neither does."""
    for name in DETECTION_ORDER:
        preset = PRESETS[name]
        if f"{preset.namespace}/{preset.daemonset}" in existing:
            return preset
    return None


def _default_identity(env: Env) -> str:
    """The Lease holder name: the pod's name in a cluster, else host and process."""
    named = (env.raw("POD_NAME") or env.environ.get("HOSTNAME") or "").strip()
    return named or f"{socket.gethostname()}-{os.getpid()}"


def _dns_label(name: str, env: Env, *, default: str) -> str:
    return _check_dns_label(name, env.str(name, default))


def _check_dns_label(name: str, value: str) -> str:
    if not _is_dns_label(value):
        raise ConfigError(f"{config.PREFIX}{name}={value!r}: expected a DNS label (a-z, 0-9, '-')")
    return value


def _names(name: str, env: Env, default: tuple[str, ...], *, allow_none: bool) -> tuple[str, ...]:
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
