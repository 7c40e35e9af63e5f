"""`apilane simulate failover`: against the local stack's real apiservers (`apilane up` as
root), SIGKILL one by the pid the stack recorded and follow it out of every node (--replace:
a new one at a new address, followed in); elsewhere, replace one endpoint of the demo
EndpointSlice with a new address, as when a control-plane machine is replaced, and follow
the change until every node has programmed it."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from apilane.cli.errors import CliError
from apilane.cli.status import View, connected, read_view, render_view
from apilane.cli.target import StackInfo
from apilane.kube.client import KubeClient, KubeError, NotFound
from apilane.runtime.bus import Bus

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


# --------------------------------------------------------------------------- real apiservers

REAL_REMOVAL_TIMEOUT = 60.0  # a killed apiserver's lease (15 s) plus a reconcile (10 s), and room
REAL_REPLACE_TIMEOUT = 120.0


@dataclass(frozen=True)
class RecordedApiServer:
    """One real apiserver of the local stack, as `apilane up` recorded it."""

    index: int
    name: str
    address: str
    port: int
    pid: int | None


def recorded_apiservers(ha: dict[str, Any]) -> list[RecordedApiServer]:
    found = []
    for entry in ha.get("apiservers") or []:
        url = str(entry.get("url", ""))
        port = int(url.rsplit(":", 1)[1]) if url.count(":") >= 2 else 6443
        pid = entry.get("pid")
        found.append(
            RecordedApiServer(
                index=int(entry["index"]),
                name=str(entry["name"]),
                address=str(entry["address"]),
                port=port,
                pid=int(pid) if isinstance(pid, int) else None,
            )
        )
    return found


def choose_victim(apiservers: list[RecordedApiServer], serving: set[str]) -> RecordedApiServer:
    """The oldest running apiserver that is an endpoint now (else the oldest running)."""
    running = [a for a in apiservers if a.pid is not None]
    if not running:
        raise CliError("no running API server is recorded in the stack file")
    return next((a for a in running if a.address in serving), running[0])


def kill_recorded(apiserver: RecordedApiServer, *, proc: Path = Path("/proc")) -> None:
    """SIGKILL the apiserver by its recorded pid, after checking that the pid still is that
    kube-apiserver (pids are reused): never anything else."""
    if apiserver.pid is None:
        raise CliError(f"{apiserver.name} is not running")
    try:
        argv = (proc / str(apiserver.pid) / "cmdline").read_bytes().decode().split("\0")
    except OSError as exc:
        raise CliError(f"{apiserver.name} (pid {apiserver.pid}) is gone") from exc
    if not argv[0].endswith("kube-apiserver") or (
        f"--advertise-address={apiserver.address}" not in argv
    ):
        raise CliError(f"pid {apiserver.pid} is no longer {apiserver.name}; not signalled")
    try:
        os.kill(apiserver.pid, signal.SIGKILL)
    except ProcessLookupError as exc:
        raise CliError(f"{apiserver.name} (pid {apiserver.pid}) is gone") from exc


def endpoint_addresses(view: View) -> set[str]:
    return {e.ip for e in view.snapshot.apiserver_endpoints} if view.snapshot else set()


def left_everywhere(view: View, gone: str) -> bool:
    """`gone` is out of the snapshot and calico-node's env, and every node programmed it."""
    snapshot = view.snapshot
    if snapshot is None or gone in endpoint_addresses(view):
        return False
    if f"{gone}:" in view.calico_env.get("KUBERNETES_APISERVER_ENDPOINTS", ""):
        return False
    return bool(view.nodes) and all(n.generation >= snapshot.generation for n in view.nodes)


def probe_changes(view: View, shown: set[tuple[str, str]]) -> list[str]:
    """PURE: what changed in the nodes' probe verdicts since `shown` (updated in place): a
    node's probes take a dead backend out of its maps before the snapshot loses it."""
    now = {(n.node, backend) for n in view.nodes for backend in n.unhealthy_backends}
    lines = [
        f"{node}: probes took {backend} out of its maps" for node, backend in sorted(now - shown)
    ]
    lines += [f"{node}: {backend} passes its probes again" for node, backend in sorted(shown - now)]
    shown.clear()
    shown.update(now)
    return lines


async def follow(
    bus: Bus,
    kube: KubeClient,
    info: StackInfo,
    *,
    until: Callable[[View], bool],
    timeout: float,
    started: float,
    out: TextIO,
) -> View | None:
    """Poll the stack's view until `until(view)`; print each change of the endpoint set and
    of the nodes' probe verdicts."""
    shown: set[str] | None = None
    unhealthy: set[tuple[str, str]] = set()
    while time.monotonic() < started + timeout:
        try:
            view = await read_view(bus, kube, info)
        except KubeError as exc:  # one apiserver gone: the client moves on to the next
            print(f"  +{time.monotonic() - started:5.1f}s  API server: {exc}", file=out)
            await asyncio.sleep(POLL_INTERVAL)
            continue
        addresses = endpoint_addresses(view)
        if addresses != shown:
            shown = addresses
            generation = view.snapshot.generation if view.snapshot else 0
            print(
                f"  +{time.monotonic() - started:5.1f}s  snapshot {generation}: "
                f"{', '.join(sorted(addresses)) or '-'}",
                file=out,
            )
        for line in probe_changes(view, unhealthy):
            print(f"  +{time.monotonic() - started:5.1f}s  {line}", file=out)
        if until(view):
            return view
        await asyncio.sleep(POLL_INTERVAL)
    return None


def new_apiserver_in(stack_file: Path, known: set[str]) -> RecordedApiServer | None:
    """A running apiserver in the stack file at an address not in `known`, if any."""
    with contextlib.suppress(OSError, ValueError):
        ha = json.loads(stack_file.read_text()).get("ha") or {}
        for apiserver in recorded_apiservers(ha):
            if apiserver.address not in known and apiserver.pid is not None:
                return apiserver
    return None


def request_replacement(requests: Path, victim: RecordedApiServer) -> None:
    """Ask `apilane up` (which owns the processes) for a new apiserver: one file per request."""
    (requests / f"replace-{time.time_ns()}").write_text(victim.name + "\n")


async def wait_for_new_apiserver(
    stack_file: Path, known: set[str], *, timeout: float
) -> RecordedApiServer:
    """The apiserver `apilane up` started on request, once it shows in the stack file."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        added = await asyncio.to_thread(new_apiserver_in, stack_file, known)
        if added is not None:
            return added
        await asyncio.sleep(POLL_INTERVAL)
    raise CliError(f"`apilane up` started no new API server within {timeout:.0f}s")


@dataclass(frozen=True)
class Session:
    """What the real failover's steps share: the bus, the API client, the stack, the output."""

    bus: Bus
    kube: KubeClient
    info: StackInfo
    out: TextIO

    async def follow(
        self, until: Callable[[View], bool], *, timeout: float, started: float
    ) -> View | None:
        return await follow(
            self.bus,
            self.kube,
            self.info,
            until=until,
            timeout=timeout,
            started=started,
            out=self.out,
        )


async def simulate_real_failover(
    info: StackInfo, stack: dict[str, Any], *, stack_file: Path, replace: bool, out: TextIO
) -> int:
    """SIGKILL one real apiserver of the local stack and follow it out of every node; with
    `replace`, have `apilane up` start a new one at a new address and follow it in."""
    apiservers = recorded_apiservers(stack["ha"])
    async with connected(info) as (bus, kube):
        session = Session(bus, kube, info, out)
        # The CLI's own client must survive the kill too: every apiserver is a fallback.
        kube.use_endpoints((a.address, a.port) for a in apiservers if a.pid is not None)
        before = await read_view(bus, kube, info)
        victim = choose_victim(apiservers, endpoint_addresses(before))
        view = await kill_and_follow(session, victim)
        if view is not None and replace:
            view = await replace_and_follow(
                session,
                view,
                apiservers,
                victim,
                requests=Path(stack["requests"]),
                stack_file=stack_file,
            )
        if view is None:
            return 1
        print("", file=out)
        print(render_view(view, info), file=out)
    return 0


async def kill_and_follow(session: Session, victim: RecordedApiServer) -> View | None:
    out = session.out
    started = time.monotonic()
    kill_recorded(victim)
    print(f"failover: SIGKILL {victim.name} at {victim.address} (pid {victim.pid})", file=out)
    print(
        "the node's probes take it out of its maps within about a second; its lease expires"
        " in up to 15 s, then another apiserver removes it from the endpoints …",
        file=out,
    )
    view = await session.follow(
        lambda v: left_everywhere(v, victim.address),
        timeout=REAL_REMOVAL_TIMEOUT,
        started=started,
    )
    if view is None:
        print(f"{victim.address} still programmed after {REAL_REMOVAL_TIMEOUT:.0f}s", file=out)
    else:
        elapsed = time.monotonic() - started
        print(f"{victim.name} left every node {elapsed:.2f}s after the kill", file=out)
    return view


async def replace_and_follow(
    session: Session,
    view: View,
    apiservers: list[RecordedApiServer],
    victim: RecordedApiServer,
    *,
    requests: Path,
    stack_file: Path,
) -> View | None:
    out = session.out
    asked = time.monotonic()
    await asyncio.to_thread(request_replacement, requests, victim)
    print("replace: asking `apilane up` for a new API server …", file=out)
    added = await wait_for_new_apiserver(
        stack_file, {a.address for a in apiservers}, timeout=REAL_REPLACE_TIMEOUT
    )
    print(f"replace: {added.name} up at {added.address} (pid {added.pid})", file=out)
    live = [a for a in [*apiservers, added] if a is not victim and a.pid is not None]
    session.kube.use_endpoints((a.address, a.port) for a in live)
    old_generation = view.snapshot.generation if view.snapshot else 0
    followed = await session.follow(
        lambda v: done(v, old_generation, added.address),
        timeout=REAL_REPLACE_TIMEOUT,
        started=asked,
    )
    if followed is None:
        print(f"{added.address} not everywhere after {REAL_REPLACE_TIMEOUT:.0f}s", file=out)
    else:
        elapsed = time.monotonic() - asked
        print(f"{added.name} programmed on every node {elapsed:.2f}s after the request", file=out)
    return followed
