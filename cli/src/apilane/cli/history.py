"""`apilane history`: the generations of the snapshot the bucket still keeps, read-only.

The snapshot KV key keeps its last `subjects.SNAPSHOT_HISTORY` revisions. Each is shown as
the services would take it: opened against the trusted keys (`status.open_value`); one
that does not verify is marked UNTRUSTED, with the reason and none of its content. A
trusted generation is diffed against the trusted one before it (what a consumer applied
last): API server endpoints and service VIPs added and removed, ports that changed. Each
links to the trace its writer started (the traceparent of the KV message), through the
template APILANE_TRACE_URL_TEMPLATE (`{trace_id}` in it), by default the local stack's
Zipkin. `--output json` prints the same for scripts.

It reads with the operator's identity (APILANE_NATS_*, or the local stack's), which may get
messages of every apilane stream and may write none of the KV keys.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, TextIO

import msgspec

from apilane.cli.errors import CliError
from apilane.cli.status import Seal, connect_bus, open_value
from apilane.cli.target import StackInfo
from apilane.model import events, subjects
from apilane.model.signing import TrustedKeys
from apilane.runtime import tracing
from apilane.runtime.bus import KvEntry

TRACE_URL_VARIABLE: Final = "APILANE_TRACE_URL_TEMPLATE"
DEFAULT_TRACE_URL: Final = "http://127.0.0.1:9411/zipkin/traces/{trace_id}"


def trace_url_template(info: StackInfo, environ: Mapping[str, str]) -> str:
    """APILANE_TRACE_URL_TEMPLATE, else the local stack's Zipkin, else the default one."""
    template = environ.get(TRACE_URL_VARIABLE, "").strip()
    if not template:
        if info.zipkin_url:
            return f"{info.zipkin_url.rstrip('/')}/zipkin/traces/{{trace_id}}"
        return DEFAULT_TRACE_URL
    if "{trace_id}" not in template:
        raise CliError(f"{TRACE_URL_VARIABLE}={template!r} has no {{trace_id}} to fill in")
    return template


def trace_url(template: str, trace_id: str) -> str:
    return template.replace("{trace_id}", trace_id) if trace_id else ""


@dataclass(frozen=True)
class Diff:
    """What a generation changed, against the trusted one before it."""

    apiservers_added: tuple[str, ...] = ()
    apiservers_removed: tuple[str, ...] = ()
    services_added: tuple[str, ...] = ()
    services_removed: tuple[str, ...] = ()
    ports_before: tuple[str, ...] = ()
    ports_after: tuple[str, ...] = ()  # equal to ports_before when they did not change
    first: bool = False  # no trusted generation before it is kept: everything is "added"

    @property
    def ports_changed(self) -> bool:
        return self.ports_before != self.ports_after

    @property
    def empty(self) -> bool:
        return not (
            self.apiservers_added
            or self.apiservers_removed
            or self.services_added
            or self.services_removed
            or self.ports_changed
        )


def _address(endpoint: events.ApiServerEndpoint | events.ServiceEndpoint) -> str:
    host = f"[{endpoint.ip}]" if endpoint.family == "IPv6" else endpoint.ip
    suffix = "" if endpoint.protocol == "TCP" else f"/{endpoint.protocol}"
    return f"{host}:{endpoint.port}{suffix}"


def _ports(endpoints: Sequence[events.ApiServerEndpoint | events.ServiceEndpoint]) -> list[str]:
    return sorted(
        {f"{e.port}/{e.protocol}" for e in endpoints}, key=lambda p: (int(p.split("/")[0]), p)
    )


def _ordered(items: set[str], order: Sequence[str]) -> tuple[str, ...]:
    return tuple(item for item in order if item in items)


def diff(previous: events.EndpointSnapshot | None, current: events.EndpointSnapshot) -> Diff:
    """Against nothing (the first kept generation), everything counts as added."""
    old_api = [_address(e) for e in previous.apiserver_endpoints] if previous else []
    new_api = [_address(e) for e in current.apiserver_endpoints]
    old_svc = [_address(e) for e in previous.service_endpoints] if previous else []
    new_svc = [_address(e) for e in current.service_endpoints]
    ports_before = (
        tuple(_ports([*previous.service_endpoints, *previous.apiserver_endpoints]))
        if previous
        else ()
    )
    return Diff(
        apiservers_added=_ordered(set(new_api) - set(old_api), new_api),
        apiservers_removed=_ordered(set(old_api) - set(new_api), old_api),
        services_added=_ordered(set(new_svc) - set(old_svc), new_svc),
        services_removed=_ordered(set(old_svc) - set(new_svc), old_svc),
        ports_before=ports_before,
        ports_after=tuple(_ports([*current.service_endpoints, *current.apiserver_endpoints])),
        first=previous is None,
    )


@dataclass(frozen=True)
class Generation:
    """One kept revision of the snapshot key."""

    revision: int  # the KV revision (stream sequence)
    written_at: datetime | None
    operation: str  # PUT, DEL or PURGE
    trace_id: str = ""
    trace_url: str = ""
    snapshot: events.EndpointSnapshot | None = None  # only when it verified
    seal: Seal | None = None
    untrusted: str = ""  # why it did not verify
    diff: Diff | None = None  # trusted PUTs only

    @property
    def trusted(self) -> bool:
        return self.snapshot is not None


def generations(
    entries: Sequence[KvEntry], trusted: TrustedKeys, template: str
) -> list[Generation]:
    """The kept revisions, oldest first, each verified and diffed against the last trusted
    snapshot before it."""
    result: list[Generation] = []
    last: events.EndpointSnapshot | None = None
    for entry in entries:
        trace_id = tracing.trace_id(entry.headers)
        common: dict[str, Any] = {
            "revision": entry.revision,
            "written_at": entry.written_at,
            "operation": entry.operation,
            "trace_id": trace_id,
            "trace_url": trace_url(template, trace_id),
        }
        if entry.operation != "PUT":
            result.append(Generation(**common))
            continue
        opened = open_value(entry.value, trusted)
        if opened.snapshot is None:
            result.append(Generation(**common, untrusted=opened.untrusted))
            continue
        result.append(
            Generation(
                **common,
                snapshot=opened.snapshot,
                seal=opened.seal,
                diff=diff(last, opened.snapshot),
            )
        )
        last = opened.snapshot
    return result


# --------------------------------------------------------------------------- output


def _when(moment: datetime | None) -> str:
    return moment.isoformat(timespec="seconds") if moment else "unknown time"


def diff_lines(change: Diff) -> list[str]:
    lines = ["(the first trusted generation kept: all shown as added)"] if change.first else []
    lines += [f"+ API server {a}" for a in change.apiservers_added]
    lines += [f"- API server {a}" for a in change.apiservers_removed]
    lines += [f"+ service VIP {a}" for a in change.services_added]
    lines += [f"- service VIP {a}" for a in change.services_removed]
    if change.ports_changed and change.ports_before:
        lines.append(f"~ ports {', '.join(change.ports_before)} -> {', '.join(change.ports_after)}")
    return lines or ["= no endpoint change (findings or kube-proxy state only)"]


def generation_lines(generation: Generation) -> list[str]:
    head = f"revision {generation.revision}  {_when(generation.written_at)}"
    if generation.operation != "PUT":
        lines = [f"{head}  {generation.operation}: the key was deleted"]
    elif generation.snapshot is None:
        lines = [f"{head}  UNTRUSTED, not shown ({generation.untrusted})"]
    else:
        snapshot, seal = generation.snapshot, generation.seal
        signer = f"  signed by {seal.key_id}" if seal else ""
        lines = [f"{head}  generation {snapshot.generation}  {snapshot.digest[:19]}…{signer}"]
        lines += [f"    {line}" for line in diff_lines(generation.diff or Diff())]
    if generation.trace_url:
        lines.append(f"    trace: {generation.trace_url}")
    return lines


def render_text(cluster: str, kept: Sequence[Generation]) -> str:
    lines = [
        f"cluster {cluster!r}: {len(kept)} kept revision(s) "
        f"(the bucket keeps {subjects.SNAPSHOT_HISTORY})"
    ]
    if not kept:
        lines.append("  no snapshot published yet")
    for generation in kept:
        lines += [f"  {line}" for line in generation_lines(generation)]
    untrusted = sum(1 for g in kept if g.operation == "PUT" and not g.trusted)
    if untrusted:
        lines.append(f"  {untrusted} revision(s) did NOT verify against the trusted keys")
    return "\n".join(lines)


def generation_json(generation: Generation) -> dict[str, Any]:
    snapshot = generation.snapshot
    return {
        "revision": generation.revision,
        "written_at": generation.written_at.isoformat() if generation.written_at else None,
        "operation": generation.operation,
        "trusted": generation.trusted,
        "untrusted": generation.untrusted,
        "generation": snapshot.generation if snapshot else None,
        "digest": snapshot.digest if snapshot else "",
        "signed_by": generation.seal.key_id if generation.seal else "",
        "trace_id": generation.trace_id,
        "trace_url": generation.trace_url,
        "diff": (
            {
                "apiservers_added": list(generation.diff.apiservers_added),
                "apiservers_removed": list(generation.diff.apiservers_removed),
                "services_added": list(generation.diff.services_added),
                "services_removed": list(generation.diff.services_removed),
                "ports_before": list(generation.diff.ports_before),
                "ports_after": list(generation.diff.ports_after),
                "first": generation.diff.first,
            }
            if generation.diff
            else None
        ),
        "snapshot": msgspec.to_builtins(snapshot) if snapshot else None,
    }


def render_json(cluster: str, kept: Sequence[Generation]) -> str:
    return json.dumps(
        {
            "cluster": cluster,
            "history": subjects.SNAPSHOT_HISTORY,
            "generations": [generation_json(g) for g in kept],
        },
        indent=2,
    )


# --------------------------------------------------------------------------- the command


async def read_history(info: StackInfo) -> list[KvEntry]:
    bus = await connect_bus(info)
    try:
        return await bus.kv_history(subjects.SNAPSHOT_BUCKET, subjects.snapshot_key(info.cluster))
    finally:
        await bus.drain()


async def history(
    info: StackInfo, *, as_json: bool, out: TextIO, environ: Mapping[str, str] | None = None
) -> int:
    template = trace_url_template(info, os.environ if environ is None else environ)
    kept = generations(await read_history(info), info.trusted_keys, template)
    print(render_json(info.cluster, kept) if as_json else render_text(info.cluster, kept), file=out)
    return 0
