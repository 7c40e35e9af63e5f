"""Kubernetes Events (core/v1) about the objects apilane looks after.

Events are best effort: `record_event` never raises, it logs. A repeat of the same event
(same object, reason, message and component) reuses one Event whose name is derived from
those, and increments its `count`, as `kubectl describe` expects, instead of piling up new
Events.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
import socket
from typing import Any, Literal

from apilane.kube.client import Conflict, KubeClient, KubeError, NotFound

log = logging.getLogger(__name__)

MAX_MESSAGE = 1024  # what the API server's events.k8s.io view accepts; longer text is cut
_UPDATE_ATTEMPTS = 3


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
    try:
        return await client.create(events_path, body, field_manager=component)
    except Conflict:
        pass  # already recorded: count it up below
    for _ in range(_UPDATE_ATTEMPTS):
        try:
            existing = await client.get(f"{events_path}/{event_name}")
        except NotFound:
            try:
                return await client.create(events_path, body, field_manager=component)
            except Conflict:
                continue
        existing["count"] = int(existing.get("count") or 1) + 1
        existing["lastTimestamp"] = now
        try:
            return await client.replace(
                f"{events_path}/{event_name}", existing, field_manager=component
            )
        except (Conflict, NotFound):
            continue  # raced with another recorder or the event expired: look again
    raise KubeError(
        f"event {namespace}/{event_name}: gave up after {_UPDATE_ATTEMPTS} update conflicts"
    )
