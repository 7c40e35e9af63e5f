"""The local stack's command line, run as `tools/apilane` (`make up` must be running).

  tools/apilane status              the snapshot, the calico-node env, each node's generation
  tools/apilane simulate failover   replace one API server endpoint, then follow the change
                                    until every node has programmed it

It reads where things are from .apilane/stack.json, which `make up` writes; against another
stack (a cluster, a test), `--nats-url`, `--cluster`, `--kubeconfig` and `--daemonset` (or
APILANE_NATS_URL, APILANE_CLUSTER, KUBECONFIG) say where instead. `status --json` prints the
same view as JSON for scripts. (This module is not named apilane.py: in tools/ that name would
shadow the `apilane` package.)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import msgspec

from apilane.kube.client import KubeClient, KubeError, NotFound
from apilane.model import events, subjects
from apilane.runtime.bus import Bus, BusError

REPO = Path(__file__).resolve().parents[1]
STACK_FILE = REPO / ".apilane" / "stack.json"
DEMO_SLICE = "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices/kubernetes-ha"
CALICO_NODE = "calico-system/calico-node"
# The demo endpoints live in 198.18.0.0/15 (RFC 2544): never routed, never contacted.
DEMO_RANGE = ipaddress.ip_network("198.18.0.0/24")
FOLLOW_TIMEOUT = 30.0


class CliError(RuntimeError):
    """Something the user can fix; printed without a traceback."""


@dataclass(frozen=True)
class StackInfo:
    cluster: str
    nats_url: str
    kubeconfig: str
    zipkin_url: str
    daemonset: str = CALICO_NODE  # namespace/name of calico-node

    @property
    def daemonset_path(self) -> str:
        namespace, _, name = self.daemonset.partition("/")
        return f"/apis/apps/v1/namespaces/{namespace}/daemonsets/{name}"

    @classmethod
    def load(cls, overrides: dict[str, str | None] | None = None) -> StackInfo:
        """From flags (or their environment variables) when NATS is named there, else from
        the stack file `make up` writes."""
        given = {k: v for k, v in (overrides or {}).items() if v}
        if "nats_url" in given:
            return cls(
                cluster=given.get("cluster", "default"),
                nats_url=given["nats_url"],
                kubeconfig=given.get("kubeconfig", ""),
                zipkin_url=given.get("zipkin_url", ""),
                daemonset=given.get("daemonset", CALICO_NODE),
            )
        try:
            data = json.loads(STACK_FILE.read_text())
        except FileNotFoundError as exc:
            raise CliError(
                "the local stack is not running: start it with `make up` "
                "(or name a stack with --nats-url)"
            ) from exc
        return cls(
            cluster=given.get("cluster", data["cluster"]),
            nats_url=data["nats_url"],
            kubeconfig=given.get("kubeconfig", data["kubeconfig"]),
            zipkin_url=data["zipkin_url"],
            daemonset=given.get("daemonset", CALICO_NODE),
        )


@dataclass(frozen=True)
class View:
    """What the stack holds right now, read from NATS and the API server."""

    snapshot: events.EndpointSnapshot | None
    trace_id: str
    nodes: list[events.NodeState]
    calico_env: dict[str, str]
    daemonset_generation: int


async def connect(info: StackInfo) -> tuple[Bus, KubeClient]:
    try:
        bus = await Bus.connect([info.nats_url], name="apilane-cli", initial_attempt_deadline=3)
    except BusError as exc:
        raise CliError(f"cannot reach NATS at {info.nats_url}: is `make up` running?") from exc
    return bus, await KubeClient.from_config(info.kubeconfig)


async def read_view(bus: Bus, kube: KubeClient, info: StackInfo) -> View:
    cluster = info.cluster
    entry = await bus.kv_get(subjects.SNAPSHOT_BUCKET, subjects.snapshot_key(cluster))
    snapshot = events.decode_snapshot(entry.value) if entry is not None else None
    trace_id = ""
    if entry is not None:
        # W3C traceparent: version-traceid-spanid-flags.
        parts = entry.headers.get("traceparent", "").split("-")
        trace_id = parts[1] if len(parts) == 4 else ""
    nodes: list[events.NodeState] = []
    for key in await node_keys(bus, cluster):
        node_entry = await bus.kv_get(subjects.NODE_STATE_BUCKET, key)
        if node_entry is None:
            continue
        with contextlib.suppress(events.MalformedEvent):
            decoded = events.decode(node_entry.value)
            if isinstance(decoded, events.NodeState):
                nodes.append(decoded)
    daemonset = await kube.get(info.daemonset_path)
    calico_env: dict[str, str] = {}
    for container in daemonset["spec"]["template"]["spec"]["containers"]:
        if container["name"] == "calico-node":
            calico_env = {
                item["name"]: item.get("value", "")
                for item in container.get("env", [])
                if item["name"].startswith("KUBERNETES_")
            }
    return View(
        snapshot=snapshot,
        trace_id=trace_id,
        nodes=sorted(nodes, key=lambda n: n.node),
        calico_env=calico_env,
        daemonset_generation=int(daemonset["metadata"].get("generation", 0)),
    )


async def node_keys(bus: Bus, cluster: str) -> list[str]:
    """The node-state keys of this cluster, from the bucket's stream subjects (no consumer is
    created, so polling this is cheap)."""
    bucket_prefix = subjects.kv_subject(subjects.NODE_STATE_BUCKET, "")
    info = await bus.js.stream_info(
        f"KV_{subjects.NODE_STATE_BUCKET}", subjects_filter=f"{bucket_prefix}{cluster}.>"
    )
    return sorted(subject.removeprefix(bucket_prefix) for subject in info.state.subjects or {})


def age(moment: datetime | None) -> str:
    if moment is None:
        return "never"
    seconds = (datetime.now(UTC) - moment).total_seconds()
    return f"{seconds:.0f}s ago" if seconds < 120 else f"{seconds / 60:.0f}m ago"


def render_view(view: View, info: StackInfo) -> str:
    lines = [f"cluster {info.cluster!r}"]
    snapshot = view.snapshot
    if snapshot is None:
        lines.append("  snapshot: none published yet")
    else:
        apiservers = ", ".join(f"{e.ip}:{e.port}" for e in snapshot.apiserver_endpoints)
        services = ", ".join(f"{e.ip}:{e.port}" for e in snapshot.service_endpoints)
        lines += [
            f"  snapshot generation {snapshot.generation}  {snapshot.digest[:19]}…  "
            f"observed {age(snapshot.observed_at)}",
            f"    service VIPs:          {services}",
            f"    API server endpoints:  {apiservers}",
        ]
        for finding in snapshot.findings:
            lines.append(f"    finding: {finding.reason}: {finding.message}")
        if view.trace_id:
            lines.append(f"    trace: {info.zipkin_url}/zipkin/traces/{view.trace_id}")
    lines.append(f"  {info.daemonset} (generation {view.daemonset_generation}):")
    for name, value in sorted(view.calico_env.items()):
        lines.append(f"    {name}={value}")
    lines.append(f"  nodes ({len(view.nodes)}):")
    if not view.nodes:
        lines.append("    none has reported yet")
    for node in view.nodes:
        current = snapshot is not None and node.generation == snapshot.generation
        state = "in sync" if current else "behind"
        programs = len(node.programs_attached)
        lines.append(
            f"    {node.node:<16} generation {node.generation:<4} {state:<8} "
            f"{node.maps.frontends} frontends, {node.maps.backends} backends, "
            f"{programs} programs attached, applied {age(node.applied_at)}"
            + (f"  last error: {node.last_error}" if node.last_error else "")
        )
    return "\n".join(lines)


def view_as_json(view: View, info: StackInfo) -> str:
    snapshot = view.snapshot
    return json.dumps(
        {
            "cluster": info.cluster,
            "generation": snapshot.generation if snapshot else 0,
            "digest": snapshot.digest if snapshot else "",
            "trace_id": view.trace_id,
            "snapshot": msgspec.to_builtins(snapshot) if snapshot else None,
            "daemonset": info.daemonset,
            "daemonset_generation": view.daemonset_generation,
            "calico_env": view.calico_env,
            "nodes": [msgspec.to_builtins(node) for node in view.nodes],
        },
        indent=2,
    )


async def status(info: StackInfo, *, as_json: bool = False) -> int:
    bus, kube = await connect(info)
    try:
        view = await read_view(bus, kube, info)
        print(view_as_json(view, info) if as_json else render_view(view, info))
    finally:
        await kube.close()
        await bus.drain()
    return 0


def next_address(in_use: set[str]) -> str:
    """The address after the highest one in use: a replaced machine gets a new address."""
    hosts = [h for h in DEMO_RANGE.hosts() if h.packed[-1] >= 10]
    highest = max((ipaddress.ip_address(a) for a in in_use), default=hosts[0])
    for host in hosts[hosts.index(highest) + 1 :] + hosts if highest in hosts else hosts:
        if str(host) not in in_use:
            return str(host)
    raise CliError(f"no free demo address left in {DEMO_RANGE}")


async def simulate_failover(info: StackInfo) -> int:
    """Replace the first API server endpoint with a new address, as when a control-plane
    machine is replaced, then follow the change to every node."""
    bus, kube = await connect(info)
    try:
        before = await read_view(bus, kube, info)
        try:
            demo = await kube.get(DEMO_SLICE)
        except NotFound as exc:
            raise CliError("the demo EndpointSlice default/kubernetes-ha is missing") from exc
        endpoints = demo.get("endpoints") or []
        if not endpoints:
            raise CliError("the demo EndpointSlice has no endpoints left")
        in_use = {address for e in endpoints for address in e.get("addresses", [])}
        # History is kept in the slice's ordering: retire the oldest, add a new one last.
        retired = endpoints[0]["addresses"][0]
        added = next_address(in_use)
        new_endpoints = [*endpoints[1:], {"addresses": [added], "conditions": {"ready": True}}]
        started = time.monotonic()
        await kube.patch(DEMO_SLICE, {"endpoints": new_endpoints}, patch_type="merge")
        print(f"failover: API server {retired} replaced by {added}")
        print("following the change (discovery → NATS → renderer, node-loader) …")
        old_generation = before.snapshot.generation if before.snapshot else 0
        view = before
        deadline = started + FOLLOW_TIMEOUT
        while time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            view = await read_view(bus, kube, info)
            if done(view, old_generation, added):
                elapsed = time.monotonic() - started
                print(
                    f"every node programmed generation {view.snapshot.generation} "  # type: ignore[union-attr]
                    f"in {elapsed:.2f}s\n"
                )
                print(render_view(view, info))
                return 0
        print(f"not everywhere after {FOLLOW_TIMEOUT:.0f}s; current state:\n")
        print(render_view(view, info))
        return 1
    finally:
        await kube.close()
        await bus.drain()


def done(view: View, old_generation: int, added: str) -> bool:
    snapshot = view.snapshot
    if snapshot is None or snapshot.generation <= old_generation:
        return False
    if added not in {e.ip for e in snapshot.apiserver_endpoints}:
        return False
    if added not in view.calico_env.get("KUBERNETES_APISERVER_ENDPOINTS", ""):
        return False
    return bool(view.nodes) and all(n.generation >= snapshot.generation for n in view.nodes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="apilane", description="The local stack's command line (`make up` must be running)."
    )
    parser.add_argument("--nats-url", default=os.environ.get("APILANE_NATS_URL"))
    parser.add_argument("--cluster", default=os.environ.get("APILANE_CLUSTER"))
    parser.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG"))
    parser.add_argument(
        "--daemonset", default=None, help=f"namespace/name of calico-node (default {CALICO_NODE})"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    status_parser = commands.add_parser(
        "status", help="the snapshot, the calico-node env and each node's state"
    )
    status_parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    simulate = commands.add_parser("simulate", help="simulate a change in the cluster")
    simulate.add_argument("what", choices=["failover"], help="failover: replace one API server")
    args = parser.parse_args(argv)
    # The bus logs reconnects and disconnects for services; a CLI's own messages say enough.
    logging.basicConfig(level=logging.ERROR)
    try:
        info = StackInfo.load(
            {
                "nats_url": args.nats_url,
                "cluster": args.cluster,
                "kubeconfig": args.kubeconfig,
                "daemonset": args.daemonset,
            }
        )
        if args.command == "status":
            return asyncio.run(status(info, as_json=args.json))
        return asyncio.run(simulate_failover(info))
    except (CliError, KubeError, BusError) as exc:
        print(f"apilane: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
