"""`apilane simulate failover`: replace one API server endpoint of the demo cluster with a new
address, as when a control-plane machine is replaced, then follow the change until every node
has programmed it."""

from __future__ import annotations

import asyncio
import ipaddress
import time
from typing import Any, TextIO

from apilane.cli.errors import CliError
from apilane.cli.status import View, connected, read_view, render_view
from apilane.cli.target import StackInfo
from apilane.kube.client import KubeClient, NotFound

DEMO_SLICE = "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices/kubernetes-ha"
# The demo endpoints live in 198.18.0.0/15 (RFC 2544): never routed, never contacted.
DEMO_RANGE = ipaddress.ip_network("198.18.0.0/24")
FOLLOW_TIMEOUT = 30.0
POLL_INTERVAL = 0.2


def next_address(in_use: set[str]) -> str:
    """The address after the highest one in use: a replaced machine gets a new address."""
    hosts = [h for h in DEMO_RANGE.hosts() if h.packed[-1] >= 10]
    highest = max((ipaddress.ip_address(a) for a in in_use), default=hosts[0])
    for host in hosts[hosts.index(highest) + 1 :] + hosts if highest in hosts else hosts:
        if str(host) not in in_use:
            return str(host)
    raise CliError(f"no free demo address left in {DEMO_RANGE}")


def done(view: View, old_generation: int, added: str) -> bool:
    """The change is everywhere: a newer snapshot has the address, calico-node's env has it,
    and every node (at least one) has programmed that snapshot."""
    snapshot = view.snapshot
    if snapshot is None or snapshot.generation <= old_generation:
        return False
    if added not in {e.ip for e in snapshot.apiserver_endpoints}:
        return False
    if added not in view.calico_env.get("KUBERNETES_APISERVER_ENDPOINTS", ""):
        return False
    return bool(view.nodes) and all(n.generation >= snapshot.generation for n in view.nodes)


def replaced_endpoints(endpoints: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str, str]:
    """(the new endpoint list, the retired address, the added one). History is kept in the
    slice's ordering: the oldest is retired, the new one goes last."""
    if not endpoints:
        raise CliError("the demo EndpointSlice has no endpoints left")
    in_use = {address for e in endpoints for address in e.get("addresses", [])}
    retired = endpoints[0]["addresses"][0]
    added = next_address(in_use)
    return [*endpoints[1:], {"addresses": [added], "conditions": {"ready": True}}], retired, added


async def replace_one_endpoint(kube: KubeClient) -> tuple[str, str]:
    try:
        demo = await kube.get(DEMO_SLICE)
    except NotFound as exc:
        raise CliError("the demo EndpointSlice default/kubernetes-ha is missing") from exc
    endpoints, retired, added = replaced_endpoints(demo.get("endpoints") or [])
    await kube.patch(DEMO_SLICE, {"endpoints": endpoints}, patch_type="merge")
    return retired, added


async def simulate_failover(info: StackInfo, *, out: TextIO) -> int:
    async with connected(info) as (bus, kube):
        before = await read_view(bus, kube, info)
        old_generation = before.snapshot.generation if before.snapshot else 0
        started = time.monotonic()
        retired, added = await replace_one_endpoint(kube)
        print(f"failover: API server {retired} replaced by {added}", file=out)
        print("following the change (discovery → NATS → renderer, node-loader) …", file=out)
        view = before
        while time.monotonic() < started + FOLLOW_TIMEOUT:
            await asyncio.sleep(POLL_INTERVAL)
            view = await read_view(bus, kube, info)
            if done(view, old_generation, added):
                generation = view.snapshot.generation if view.snapshot else 0
                elapsed = time.monotonic() - started
                print(
                    f"every node programmed generation {generation} in {elapsed:.2f}s\n", file=out
                )
                print(render_view(view, info), file=out)
                return 0
    print(f"not everywhere after {FOLLOW_TIMEOUT:.0f}s; current state:\n", file=out)
    print(render_view(view, info), file=out)
    return 1
