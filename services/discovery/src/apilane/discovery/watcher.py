"""The four watches discovery needs, each a `list_then_watch` into an `ObjectCache`.

The watches themselves (list, LISTED, watch with bookmarks, 410 → relist, backoff on
outages) are `apilane.kube.watch`; this module only says what to watch, keeps the parts
of each object discovery reads (so a Node heartbeat is not a change), and tells the service
when its view changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, replace
from typing import Any, cast

from apilane.kube.client import KubeClient
from apilane.kube.watch import ObjectCache, WatchEvent, list_then_watch

from .settings import DiscoverySettings

log = logging.getLogger(__name__)

Projection = Callable[[dict[str, Any]], dict[str, Any]]


def _whole(obj: dict[str, Any]) -> dict[str, Any]:
    return obj


def _node_projection(obj: dict[str, Any]) -> dict[str, Any]:
    # Only what the managed-control-plane check reads: Node status updates are frequent
    # and must not count as changes.
    metadata = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": metadata.get("name"),
            "uid": metadata.get("uid"),
            "labels": metadata.get("labels") or {},
            "resourceVersion": metadata.get("resourceVersion"),
        },
        "spec": {"providerID": spec.get("providerID")} if isinstance(spec, dict) else {},
    }


def _daemonset_projection(obj: dict[str, Any]) -> dict[str, Any]:
    metadata = obj.get("metadata") or {}
    status = obj.get("status") or {}
    return {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {
            key: metadata.get(key)
            for key in (
                "name",
                "namespace",
                "uid",
                "generation",
                "labels",
                "annotations",
                "resourceVersion",
            )
        },
        "status": {
            key: status.get(key)
            for key in ("desiredNumberScheduled", "numberReady", "observedGeneration")
        }
        if isinstance(status, dict)
        else {},
    }


def _without_resource_version(obj: dict[str, Any]) -> dict[str, Any]:
    """For change detection: a new resourceVersion alone (a no-op update) is not a change."""
    metadata = dict(obj.get("metadata") or {})
    metadata.pop("resourceVersion", None)
    metadata.pop("managedFields", None)
    return {**obj, "metadata": metadata}


@dataclass(frozen=True, kw_only=True)
class WatchTarget:
    kind: str  # "EndpointSlice"
    api_version: str
    path: str  # the collection
    label_selector: str | None = None
    field_selector: str | None = None
    project: Projection = _whole


def targets_for(settings: DiscoverySettings) -> tuple[WatchTarget, ...]:
    svc_ns, svc_name = settings.service_namespace, settings.service_name
    kp_ns, kp_name = settings.kube_proxy_namespace, settings.kube_proxy_name
    return (
        WatchTarget(
            kind="Service",
            api_version="v1",
            path=f"/api/v1/namespaces/{svc_ns}/services",
            field_selector=f"metadata.name={svc_name}",
        ),
        WatchTarget(
            kind="EndpointSlice",
            api_version="discovery.k8s.io/v1",
            path=f"/apis/discovery.k8s.io/v1/namespaces/{svc_ns}/endpointslices",
            label_selector=f"kubernetes.io/service-name={svc_name}",
        ),
        WatchTarget(
            kind="DaemonSet",
            api_version="apps/v1",
            path=f"/apis/apps/v1/namespaces/{kp_ns}/daemonsets",
            field_selector=f"metadata.name={kp_name}",
            project=_daemonset_projection,
        ),
        WatchTarget(kind="Node", api_version="v1", path="/api/v1/nodes", project=_node_projection),
    )


ChangeCallback = Callable[[WatchTarget, WatchEvent], None]


class ClusterWatcher:
    """Runs the watches; calls `on_change(target, event)` after each event that changed a cache.

    `synced` turns true once every watch has completed its first list."""

    def __init__(
        self,
        client: KubeClient,
        targets: tuple[WatchTarget, ...],
        *,
        on_change: ChangeCallback,
        backoff_max: float = 10.0,
    ) -> None:
        self.client = client
        self.targets = {target.kind: target for target in targets}
        self.caches = {target.kind: ObjectCache() for target in targets}
        # Change detection ignores resourceVersion-only updates; the cache keeps full objects.
        self._shadow = {target.kind: ObjectCache() for target in targets}
        self.on_change = on_change
        self.backoff_max = backoff_max

    @property
    def synced(self) -> bool:
        return all(cache.synced for cache in self.caches.values())

    def objects(self, kind: str) -> list[dict[str, Any]]:
        return self.caches[kind].objects()

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        return self.caches[kind].get(namespace, name)

    async def run(self) -> None:
        """Until cancelled."""
        async with asyncio.TaskGroup() as group:
            for target in self.targets.values():
                group.create_task(self._watch(target), name=f"watch-{target.kind}")

    async def _watch(self, target: WatchTarget) -> None:
        cache, shadow = self.caches[target.kind], self._shadow[target.kind]
        while True:
            try:
                # An async generator (typed as an iterator): aclosing ends its HTTP stream.
                stream = cast(
                    AsyncGenerator[WatchEvent, None],
                    list_then_watch(
                        self.client,
                        target.path,
                        label_selector=target.label_selector,
                        field_selector=target.field_selector,
                        backoff_max=self.backoff_max,
                    ),
                )
                async with contextlib.aclosing(stream):
                    async for raw_event in stream:
                        event = _project(raw_event, target.project)
                        cache.apply(event)
                        if shadow.apply(_project(event, _without_resource_version)):
                            self.on_change(target, event)
            except asyncio.CancelledError:
                raise
            except Exception:
                # list_then_watch retries what can heal; anything else (a 404 for a missing
                # API group, a bug) must not end discovery: log it and start over slowly.
                delay = self.backoff_max * (0.5 + random.random() / 2)
                log.exception(
                    "watch failed, restarting",
                    extra={"kind": target.kind, "delay": round(delay, 2)},
                )
                await asyncio.sleep(delay)


def _project(event: WatchEvent, project: Projection) -> WatchEvent:
    if event.object is not None:
        return replace(event, object=project(event.object))
    return replace(event, objects=tuple(project(obj) for obj in event.objects))
