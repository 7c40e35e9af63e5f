"""Kubernetes Events (core/v1) about the objects apilane looks after.

Events are best effort: `record_event` never raises, it logs. A repeat of the same event
(same object, reason, message and component) reuses one Event whose name is derived from
those, and increments its `count`, as `kubectl describe` expects, instead of piling up new
Events.

Only `create` and `patch` are needed on Events (the chart grants no more: reading Events
would show every component's): a repeat is a JSON patch that tests the count this process
last wrote and increments it. A count not known here (a restart, another replica) is learnt
from the answer to a patch of `lastTimestamp` alone.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
import socket
from collections import OrderedDict
from typing import Any, Literal

from apilane.kube.client import Conflict, Invalid, KubeClient, KubeError, NotFound

log = logging.getLogger(__name__)

MAX_MESSAGE = 1024  # what the API server's events.k8s.io view accepts; longer text is cut
_UPDATE_ATTEMPTS = 3
_KNOWN_COUNTS_MAX = 4096  # Events whose count this process remembers (the oldest forgotten)


class _KnownCounts:
    """The count this process last wrote to each Event, bounded."""

    def __init__(self) -> None:
        self._counts: OrderedDict[str, int] = OrderedDict()

    def get(self, path: str) -> int | None:
        return self._counts.get(path)

    def remember(self, path: str, count: int) -> None:
        self._counts[path] = count
        self._counts.move_to_end(path)
        while len(self._counts) > _KNOWN_COUNTS_MAX:
            self._counts.popitem(last=False)

    def forget(self, path: str) -> None:
        self._counts.pop(path, None)


_KNOWN = _KnownCounts()


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _event_name(involved_name: str, key: str) -> str:
    # Object names may be up to 253 characters; keep the suffix and stay within the limit.
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return f"{involved_name[: 253 - 17]}.{digest}"


async def record_event(
    client: KubeClient,
    *,
    involved: dict[str, Any],
    reason: str,
    message: str,
    type_: Literal["Normal", "Warning"],
    component: str,
    api_version: str | None = None,
    kind: str | None = None,
) -> dict[str, Any] | None:
    """Create (or count up) an Event about `involved`; returns the Event, or None when it
    could not be recorded. Items of a List carry no apiVersion/kind: pass them explicitly."""
    try:
        return await _record(
            client,
            involved=involved,
            reason=reason,
            message=message,
            type_=type_,
            component=component,
            api_version=api_version,
            kind=kind,
        )
    except Exception as exc:
        log.warning(
            "could not record a Kubernetes event",
            extra={
                "reason": reason,
                "component": component,
                "error": f"{type(exc).__name__}: {exc}",
            },
        )
        return None


async def _record(
    client: KubeClient,
    *,
    involved: dict[str, Any],
    reason: str,
    message: str,
    type_: str,
    component: str,
    api_version: str | None,
    kind: str | None,
) -> dict[str, Any] | None:
    metadata = involved.get("metadata") or {}
    name = metadata.get("name")
    object_kind = kind or involved.get("kind")
    object_api_version = api_version or involved.get("apiVersion")
    if not name or not object_kind or not object_api_version:
        log.warning(
            "event not recorded: the involved object lacks name, kind or apiVersion",
            extra={"reason": reason, "involved_name": name, "kind": object_kind},
        )
        return None
    # Cluster-scoped objects (Nodes) get their events in "default", as client-go does.
    namespace = metadata.get("namespace") or "default"
    text = message if len(message) <= MAX_MESSAGE else message[: MAX_MESSAGE - 3] + "..."
    key = "\x00".join(
        (str(metadata.get("uid") or ""), object_kind, namespace, name, reason, text, component)
    )
    event_name = _event_name(name, key)
    events_path = f"/api/v1/namespaces/{namespace}/events"
    now = _now()
    involved_ref = {
        "apiVersion": object_api_version,
        "kind": object_kind,
        "name": name,
        "namespace": metadata.get("namespace") or "",
        "uid": metadata.get("uid") or "",
        "resourceVersion": metadata.get("resourceVersion") or "",
    }
    body = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": event_name, "namespace": namespace},
        "involvedObject": {k: v for k, v in involved_ref.items() if v},
        "reason": reason,
        "message": text,
        "type": type_,
        "source": {"component": component, "host": socket.gethostname()},
        "reportingComponent": component,
        "reportingInstance": os.environ.get("HOSTNAME") or socket.gethostname(),
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    }
    return await _create_or_count_up(client, events_path, body, component)


async def _create_or_count_up(
    client: KubeClient, events_path: str, body: dict[str, Any], component: str
) -> dict[str, Any]:
    path = f"{events_path}/{body['metadata']['name']}"
    for _ in range(_UPDATE_ATTEMPTS):
        if _KNOWN.get(path) is None:
            try:
                created = await client.create(events_path, body, field_manager=component)
            except Conflict:
                pass  # recorded before: count it up
            else:
                _KNOWN.remember(path, 1)
                return created
        try:
            return await _count_up(client, path, body["lastTimestamp"], component)
        except NotFound:
            _KNOWN.forget(path)  # expired meanwhile: create it again
        except Invalid:
            _KNOWN.forget(path)  # someone else counted it up: learn its count again
    raise KubeError(f"event {path}: gave up after {_UPDATE_ATTEMPTS} attempts")


async def _count_up(client: KubeClient, path: str, now: str, component: str) -> dict[str, Any]:
    known = _KNOWN.get(path)
    if known is None:
        touched = await client.patch(
            path, {"lastTimestamp": now}, patch_type="merge", field_manager=component
        )
        known = int(touched.get("count") or 1)
    operations = [
        {"op": "test", "path": "/count", "value": known},  # a failed test is a 422
        {"op": "replace", "path": "/count", "value": known + 1},
        {"op": "replace", "path": "/lastTimestamp", "value": now},
    ]
    counted = await client.patch(path, operations, patch_type="json", field_manager=component)
    _KNOWN.remember(path, known + 1)
    return counted
