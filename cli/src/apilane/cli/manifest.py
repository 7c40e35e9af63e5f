"""`apilane render manifest`: the env for people who install Calico from manifests.

    apilane render manifest [--nats-url URL] [--cluster NAME]    # latest snapshot on the bus
    apilane render manifest --kubeconfig PATH                     # straight from the API server

Prints the two env lines, then a YAML snippet for the calico-node DaemonSet. With neither
option it uses APILANE_NATS_URL when set, else KUBECONFIG (or the in-cluster account). A
snapshot from the bus is used only when it verifies against APILANE_TRUSTED_KEYS(_FILE); the
bus is read as the operator identity APILANE_NATS_* names (of that cluster). For the local stack's NATS (`apilane up`),
its operator identity and trusted keys serve when the environment names none. The snapshot is rendered by the renderer's own pure core (`apilane.renderer.render`), and read
from the API objects by `apilane.model.endpoints.build_snapshot`: the rules discovery
publishes by. Exit codes: 0 printed, 1 nothing usable to print (no snapshot, no endpoints),
2 bad usage.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

import yaml

from apilane.cli.errors import CliError, UsageError
from apilane.cli.target import Flags, local_stack
from apilane.kube.client import KubeClient, KubeError, NotFound
from apilane.model import endpoints, events, signing, subjects
from apilane.model.signing import SignatureError, TrustedKeys
from apilane.renderer import render
from apilane.renderer.render import DesiredEnv
from apilane.renderer.settings import RendererSettings
from apilane.renderer.settings import load as load_settings
from apilane.runtime.bus import Bus, BusError
from apilane.runtime.config import NatsAuth
from apilane.runtime.natsauth import Role

Format = Literal["all", "env", "yaml"]
FORMATS: tuple[Format, ...] = ("all", "env", "yaml")

# --------------------------------------------------------------------------- pure


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
        "# Not for a DaemonSet tigera-operator renders (calico-system): it reverts outside edits;\n"
        "# set spec.calicoNetwork.bpfNetworkBootstrap: Enabled in its Installation instead.\n"
    )
    return header + yaml.safe_dump(
        {"spec": {"template": {"spec": pod_spec}}}, sort_keys=False, default_flow_style=False
    )


@dataclass(frozen=True)
class Source:
    """Where the snapshot comes from: the bus (`nats_urls`) or the API server (`kubeconfig`,
    empty for $KUBECONFIG or the in-cluster account)."""

    nats_urls: tuple[str, ...] = ()
    kubeconfig: str = ""

    @classmethod
    def choose(cls, flags: Flags, settings: RendererSettings, environ: Mapping[str, str]) -> Source:
        if flags.nats_urls and flags.kubeconfig:
            raise UsageError("--nats-url and --kubeconfig name two sources: give one")
        if flags.nats_urls:
            return cls(nats_urls=flags.nats_urls)
        if not flags.kubeconfig and environ.get("APILANE_NATS_URL"):
            return cls(nats_urls=settings.common.nats_urls)
        return cls(kubeconfig=flags.kubeconfig)


def write(
    out: TextIO, desired: DesiredEnv, *, origin: str, fmt: Format, daemonset: tuple[str, str]
) -> None:
    if fmt == "all":
        out.write(f"# {origin}\n")
    if fmt in ("all", "env"):
        out.write(env_lines(desired))
    if fmt == "all":
        out.write("---\n")
    if fmt in ("all", "yaml"):
        namespace, name = daemonset
        out.write(daemonset_snippet(desired, namespace=namespace, name=name))


# --------------------------------------------------------------------------- I/O


async def manifest(flags: Flags, *, fmt: Format, out: TextIO) -> int:
    settings = load_settings(serving=False)
    cluster = subjects.snapshot_key(flags.cluster or settings.cluster)
    source = Source.choose(flags, settings, os.environ)
    if source.nats_urls:
        # The local stack's NATS: its operator identity and keys, unless the environment names some.
        local = local_stack(source.nats_urls)
        auth = settings.common.nats_auth
        if local is not None and auth == NatsAuth():
            auth = local.nats_auth
        elif auth.nkey_seed_file:
            auth = auth.as_identity(Role.OPERATOR, cluster)
        trusted = settings.trusted_keys or (local.trusted_keys if local else TrustedKeys({}))
        snapshot = await from_bus(source.nats_urls, cluster, auth, trusted)
        origin = f"cluster {cluster}: snapshot generation {snapshot.generation} from NATS"
    else:
        snapshot = await from_kube(source.kubeconfig, cluster)
        origin = f"cluster {cluster}: read from the API server just now"
    try:
        desired = render.render(snapshot, settings.render_options())
    except render.RenderError as exc:
        raise CliError(str(exc)) from exc
    namespace, _, name = flags.daemonset.partition("/")
    daemonset = (
        (namespace, name) if name else (settings.target_namespace, settings.target_daemonset)
    )
    write(out, desired, origin=origin, fmt=fmt, daemonset=daemonset)
    return 0


async def from_bus(
    urls: tuple[str, ...], cluster: str, auth: NatsAuth, trusted: TrustedKeys
) -> events.EndpointSnapshot:
    try:
        bus = await Bus.connect(urls, name="apilane-cli", auth=auth, initial_attempt_deadline=5.0)
    except BusError as exc:
        raise CliError(str(exc)) from exc
    try:
        entry = await bus.kv_get(subjects.SNAPSHOT_BUCKET, cluster)
    finally:
        await bus.drain()
    if entry is None:
        raise CliError(
            f"no snapshot for cluster {cluster!r} in {subjects.SNAPSHOT_BUCKET}: is discovery running?"
        )
    return verified(entry.value, trusted)


def verified(data: bytes, trusted: TrustedKeys) -> events.EndpointSnapshot:
    """Only a snapshot a trusted key signed is rendered: anyone who can write the KV key
    could have written any other."""
    if not trusted:
        raise CliError(
            "the snapshot on the bus is signed: name the keys that may sign it with "
            "APILANE_TRUSTED_KEYS (or APILANE_TRUSTED_KEYS_FILE)"
        )
    try:
        signed = signing.open_snapshot(data, trusted)
    except (SignatureError, events.MalformedEvent) as exc:
        raise CliError(f"the snapshot on the bus is not trusted: {exc}") from exc
    if signed.expired(signing.utcnow()):
        # What the renderer would refuse too: nobody vouches for these endpoints any more.
        raise CliError(
            f"the snapshot on the bus expired at {signed.header.expires_at:%Y-%m-%d %H:%M:%S}Z:"
            " is discovery running?"
        )
    return signed.snapshot


async def from_kube(kubeconfig: str, cluster: str) -> events.EndpointSnapshot:
    kube = await KubeClient.from_config(kubeconfig)
    try:
        try:
            service = await kube.get("/api/v1/namespaces/default/services/kubernetes")
        except NotFound as exc:
            raise CliError("Service default/kubernetes does not exist") from exc
        slices = await kube.list(
            "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices",
            label_selector="kubernetes.io/service-name=kubernetes",
        )
        try:
            kube_proxy: dict[str, object] | None = await kube.get(
                "/apis/apps/v1/namespaces/kube-system/daemonsets/kube-proxy"
            )
        except KubeError:
            kube_proxy = None  # not there, or not readable: nothing to say about it
    finally:
        await kube.close()
    # Nodes are not read: the managed-provider finding does not change what is rendered.
    result = endpoints.build_snapshot(
        service=service,
        endpoint_slices=slices.get("items") or [],
        kube_proxy=kube_proxy,
        nodes=(),
    )
    return result.to_event(cluster=cluster, generation=0, observed_at=datetime.now(UTC))
