"""`apilane status`: the snapshot, the calico-node env and each node's state, read from NATS
and the API server (`--json` prints the same view for scripts).

The snapshot is shown as what the services would take it for: opened against the stack's
trusted keys (the stack file's, or APILANE_TRUSTED_KEYS), with the key that signed it and
until when. One that does not verify is shown as untrusted, with the reason, and none of its
content."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TextIO

import msgspec

from apilane.cli.errors import CliError
from apilane.cli.target import StackInfo
from apilane.kube.client import KubeClient, NotFound
from apilane.model import events, signing, subjects
from apilane.model.signing import SignatureError, TrustedKeys
from apilane.runtime import tracing
from apilane.runtime.bus import Bus, BusError


@dataclass(frozen=True)
class Seal:
    """Who signed the snapshot on the bus, and its validity window."""

    key_id: str
    issued_at: datetime
    expires_at: datetime


@dataclass(frozen=True)
class View:
    """What the stack holds right now, read from NATS and the API server. `snapshot` is set
    only when it verified; `untrusted` says why the one on the bus did not."""

    snapshot: events.EndpointSnapshot | None
    trace_id: str
    nodes: list[events.NodeState]
    calico_env: dict[str, str]
    daemonset_generation: int
    seal: Seal | None = None
    untrusted: str = ""


@dataclass(frozen=True)
class SnapshotValue:
    snapshot: events.EndpointSnapshot | None = None
    seal: Seal | None = None
    untrusted: str = ""


def open_value(data: bytes, trusted: TrustedKeys) -> SnapshotValue:
    """The snapshot KV value as a consumer sees it: verified, or untrusted and why."""
    if not trusted:
        return SnapshotValue(untrusted="no trusted keys: set APILANE_TRUSTED_KEYS (or _FILE)")
    try:
        signed = signing.open_snapshot(data, trusted)
    except SignatureError as exc:
        return SnapshotValue(untrusted=f"{exc.reason}: {exc}")
    except events.MalformedEvent as exc:
        return SnapshotValue(untrusted=f"malformed: {exc}")
    header = signed.header
    seal = Seal(key_id=header.key_id, issued_at=header.issued_at, expires_at=header.expires_at)
    return SnapshotValue(snapshot=signed.snapshot, seal=seal)


async def connect_bus(info: StackInfo) -> Bus:
    """This stack's NATS, connected as the operator's identity (`info.nats_auth`)."""
    try:
        return await Bus.connect(
            list(info.nats_urls),
            name="apilane-cli",
            auth=info.nats_auth,
            initial_attempt_deadline=3,
        )
    except BusError as exc:
        where = ", ".join(info.nats_urls)
        raise CliError(
            f"cannot reach NATS at {where}: is the stack (`apilane up`) running? ({exc})"
        ) from exc


@contextlib.asynccontextmanager
async def connected(info: StackInfo) -> AsyncIterator[tuple[Bus, KubeClient]]:
    """A bus and an API server client for this stack, both closed afterwards."""
    bus = await connect_bus(info)
    try:
        kube = await KubeClient.from_config(info.kubeconfig)
        try:
            yield bus, kube
        finally:
            await kube.close()
    finally:
        await bus.drain()


async def read_view(bus: Bus, kube: KubeClient, info: StackInfo) -> View:
    entry = await bus.kv_get(subjects.SNAPSHOT_BUCKET, subjects.snapshot_key(info.cluster))
    daemonset = await kube.get(info.daemonset_path)
    configmaps = await read_configmaps(kube, daemonset)
    opened = open_value(entry.value, info.trusted_keys) if entry is not None else SnapshotValue()
    return View(
        snapshot=opened.snapshot,
        # The trace the snapshot's writer started, from its traceparent header.
        trace_id=tracing.trace_id(entry.headers) if entry is not None else "",
        nodes=await read_nodes(bus, info.cluster),
        calico_env=calico_env(daemonset, configmaps),
        daemonset_generation=int(daemonset["metadata"].get("generation", 0)),
        seal=opened.seal,
        untrusted=opened.untrusted,
    )


async def read_nodes(bus: Bus, cluster: str) -> list[events.NodeState]:
    """Every node's state in this cluster, by node name; unreadable entries are left out.
    One pass over the bucket (`Bus.kv_latest`), not one request per node."""
    nodes: list[events.NodeState] = []
    prefix = f"{subjects.snapshot_key(cluster)}.>"
    for entry in await bus.kv_latest(subjects.NODE_STATE_BUCKET, prefix):
        with contextlib.suppress(events.MalformedEvent):
            decoded = events.decode(entry.value)
            if isinstance(decoded, events.NodeState):
                nodes.append(decoded)
    return sorted(nodes, key=lambda n: n.node)


def calico_env(
    daemonset: dict[str, Any], configmaps: Mapping[str, Mapping[str, str]] | None = None
) -> dict[str, str]:
    """The KUBERNETES_* env of the calico-node container, as the kubelet gives it: literal
    values, and configMapKeyRefs (apilane's configmap mode) looked up in `configmaps` (name
    -> data); a reference to a missing key is shown as such."""
    for container in daemonset["spec"]["template"]["spec"]["containers"]:
        if container["name"] == "calico-node":
            return {
                item["name"]: _env_value(item, configmaps or {})
                for item in container.get("env", [])
                if item["name"].startswith("KUBERNETES_")
            }
    return {}


def _env_value(item: Mapping[str, Any], configmaps: Mapping[str, Mapping[str, str]]) -> str:
    ref = _configmap_ref(item)
    if ref is None:
        return str(item.get("value", ""))
    name, key = ref
    value = configmaps.get(name, {}).get(key)
    return value if value is not None else f"<missing: ConfigMap {name} key {key}>"


def _configmap_ref(item: Mapping[str, Any]) -> tuple[str, str] | None:
    value_from = item.get("valueFrom")
    ref = value_from.get("configMapKeyRef") if isinstance(value_from, Mapping) else None
    if not isinstance(ref, Mapping):
        return None
    return str(ref.get("name", "")), str(ref.get("key", ""))


async def read_configmaps(kube: KubeClient, daemonset: dict[str, Any]) -> dict[str, dict[str, str]]:
    """The data of every ConfigMap calico-node's env reads (missing ones left out)."""
    namespace = daemonset["metadata"]["namespace"]
    names = {
        ref[0]
        for container in daemonset["spec"]["template"]["spec"]["containers"]
        for item in container.get("env", [])
        if (ref := _configmap_ref(item)) is not None
    }
    found: dict[str, dict[str, str]] = {}
    for name in sorted(names):
        with contextlib.suppress(NotFound):
            configmap = await kube.get(f"/api/v1/namespaces/{namespace}/configmaps/{name}")
            found[name] = {str(k): str(v) for k, v in (configmap.get("data") or {}).items()}
    return found


def age(moment: datetime | None) -> str:
    if moment is None:
        return "never"
    seconds = (datetime.now(UTC) - moment).total_seconds()
    return f"{seconds:.0f}s ago" if seconds < 120 else f"{seconds / 60:.0f}m ago"


def until(moment: datetime) -> str:
    seconds = (moment - datetime.now(UTC)).total_seconds()
    if seconds <= 0:
        return f"EXPIRED {age(moment)}"
    return f"expires in {seconds:.0f}s" if seconds < 120 else f"expires in {seconds / 60:.0f}m"


def render_view(view: View, info: StackInfo) -> str:
    lines = [f"cluster {info.cluster!r}"]
    lines += snapshot_lines(view, info)
    lines.append(f"  {info.daemonset} (generation {view.daemonset_generation}):")
    lines += [f"    {name}={value}" for name, value in sorted(view.calico_env.items())]
    lines += node_lines(view)
    return "\n".join(lines)


def snapshot_lines(view: View, info: StackInfo) -> list[str]:
    snapshot = view.snapshot
    if view.untrusted:
        return [f"  snapshot: UNTRUSTED, not shown ({view.untrusted})"]
    if snapshot is None:
        return ["  snapshot: none published yet"]
    apiservers = ", ".join(f"{e.ip}:{e.port}" for e in snapshot.apiserver_endpoints)
    services = ", ".join(f"{e.ip}:{e.port}" for e in snapshot.service_endpoints)
    lines = [
        f"  snapshot generation {snapshot.generation}  {snapshot.digest[:19]}…  "
        f"observed {age(snapshot.observed_at)}",
        f"    service VIPs:          {services}",
        f"    API server endpoints:  {apiservers}",
    ]
    if view.seal is not None:
        lines.append(f"    signed by {view.seal.key_id}, {until(view.seal.expires_at)}")
    lines += [f"    finding: {f.reason}: {f.message}" for f in snapshot.findings]
    if view.trace_id and info.zipkin_url:
        lines.append(f"    trace: {info.zipkin_url}/zipkin/traces/{view.trace_id}")
    elif view.trace_id:
        lines.append(f"    trace id: {view.trace_id}")
    return lines


# More nodes than this: a summary (counts per generation, the laggards, the stale) instead of
# a line per node.
LIST_NODES_UP_TO = 50
# A node that has not written its state for this long is stale: its heartbeat (30 s by
# default, APILANE_NODE_STATE_INTERVAL) stopped. The bucket drops it after an hour.
STALE_AFTER = timedelta(seconds=120)
NAMES_SHOWN = 20


@dataclass(frozen=True)
class NodeSummary:
    """Thousands of nodes at a glance (`summarise`)."""

    total: int
    by_generation: dict[int, int]  # generation -> how many nodes hold it
    laggards: list[str]  # nodes not at the snapshot's generation, by name
    silent: list[str]  # no state written for STALE_AFTER: gone, or cut off from NATS
    expired: list[str]  # holding a snapshot whose signature expired (fail static)
    with_errors: list[str]
    # backend -> the nodes whose probes find it unhealthy (they left it out of their maps)
    unhealthy: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    health_fail_static: list[str] = dataclasses.field(default_factory=list)


def summarise(nodes: list[events.NodeState], generation: int | None, now: datetime) -> NodeSummary:
    by_generation: dict[int, int] = {}
    unhealthy: dict[str, list[str]] = {}
    for node in nodes:
        by_generation[node.generation] = by_generation.get(node.generation, 0) + 1
        for backend in node.unhealthy_backends:
            unhealthy.setdefault(backend, []).append(node.node)
    return NodeSummary(
        total=len(nodes),
        by_generation=dict(sorted(by_generation.items(), reverse=True)),
        laggards=[n.node for n in nodes if generation is not None and n.generation != generation],
        silent=[n.node for n in nodes if now - _aware(n.updated_at) > STALE_AFTER],
        expired=[n.node for n in nodes if n.stale],
        with_errors=[n.node for n in nodes if n.last_error],
        unhealthy=dict(sorted(unhealthy.items())),
        health_fail_static=[n.node for n in nodes if n.health_fail_static],
    )


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:NAMES_SHOWN])
    return shown + (f" and {len(names) - NAMES_SHOWN} more" if len(names) > NAMES_SHOWN else "")


def summary_lines(summary: NodeSummary) -> list[str]:
    generations = ", ".join(f"{g}: {count}" for g, count in summary.by_generation.items())
    lines = [f"  nodes ({summary.total}), by generation: {generations}"]
    for label, names in (
        ("behind", summary.laggards),
        (f"STALE (no state for over {STALE_AFTER.seconds}s)", summary.silent),
        ("holding an EXPIRED snapshot", summary.expired),
        ("with errors", summary.with_errors),
    ):
        if names:
            lines.append(f"    {len(names)} {label}: {_names(names)}")
    for backend, names in summary.unhealthy.items():
        lines.append(f"    backend {backend} UNHEALTHY on {len(names)} node(s): {_names(names)}")
    if summary.health_fail_static:
        names = summary.health_fail_static
        lines.append(
            f"    {len(names)} finding every backend unhealthy (kept them all): {_names(names)}"
        )
    if not (summary.laggards or summary.silent or summary.expired):
        lines.append("    every node in sync")
    return lines


def node_lines(view: View, now: datetime | None = None) -> list[str]:
    if len(view.nodes) > LIST_NODES_UP_TO:
        generation = view.snapshot.generation if view.snapshot else None
        return summary_lines(summarise(view.nodes, generation, now or datetime.now(UTC)))
    lines = [f"  nodes ({len(view.nodes)}):"]
    if not view.nodes:
        lines.append("    none has reported yet")
    snapshot = view.snapshot
    for node in view.nodes:
        current = snapshot is not None and node.generation == snapshot.generation
        state = "in sync" if current else "behind"
        programs = len(node.programs_attached)
        lines.append(
            f"    {node.node:<16} generation {node.generation:<4} {state:<8} "
            f"{node.maps.frontends} frontends, {node.maps.backends} backends, "
            f"{programs} programs attached, applied {age(node.applied_at)}"
            + ("  STALE (its snapshot expired)" if node.stale else "")
            + (f"  last error: {node.last_error}" if node.last_error else "")
            + _health_note(node)
        )
    return lines


def _health_note(node: events.NodeState) -> str:
    if node.health_fail_static:
        return "  every backend UNHEALTHY to its probes (kept them all)"
    if node.unhealthy_backends:
        return f"  UNHEALTHY (left out): {', '.join(node.unhealthy_backends)}"
    return ""


def view_as_json(view: View, info: StackInfo) -> str:
    snapshot = view.snapshot
    return json.dumps(
        {
            "cluster": info.cluster,
            "generation": snapshot.generation if snapshot else 0,
            "digest": snapshot.digest if snapshot else "",
            "trace_id": view.trace_id,
            "trusted": snapshot is not None,
            "untrusted": view.untrusted,
            "signed_by": view.seal.key_id if view.seal else "",
            "expires_at": view.seal.expires_at.isoformat() if view.seal else "",
            "snapshot": msgspec.to_builtins(snapshot) if snapshot else None,
            "daemonset": info.daemonset,
            "daemonset_generation": view.daemonset_generation,
            "calico_env": view.calico_env,
            "nodes": [msgspec.to_builtins(node) for node in view.nodes],
            "summary": dataclasses.asdict(
                summarise(view.nodes, snapshot.generation if snapshot else None, datetime.now(UTC))
            ),
        },
        indent=2,
    )


async def status(info: StackInfo, *, as_json: bool, out: TextIO) -> int:
    async with connected(info) as (bus, kube):
        view = await read_view(bus, kube, info)
    print(view_as_json(view, info) if as_json else render_view(view, info), file=out)
    return 0
