"""List, then watch: a resilient stream of changes to one kind of Kubernetes object.

`list_then_watch` lists the collection, yields one `LISTED` event carrying the complete list
(so a consumer knows the initial state is complete and can replace what it had), then watches
from the list's resourceVersion with bookmarks. When the server says the resourceVersion is
too old (410 Gone) it lists again and yields a fresh `LISTED`; when the server goes away it
reconnects with exponential backoff and jitter. No change is lost: a resumed watch replays
what happened since the last resourceVersion seen, and a relist replaces the whole state.

`ObjectCache` applies those events and keeps the current objects by namespace/name, so the
caller can compute a full snapshot after every event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

from prometheus_client import Counter

from apilane.kube.client import Gone, KubeClient, KubeError, Unavailable
from apilane.runtime.aio import Backoff

log = logging.getLogger(__name__)

WATCH_RESTARTS = Counter(
    "apilane_watch_restarts_total",
    "Watches that had to be restarted, by resource and reason (gone: relisted after 410; "
    "unavailable: the server went away; error: another API error; expired: the server ended "
    "the watch and it was resumed).",
    ["resource", "reason"],
)

EventType = Literal["LISTED", "ADDED", "MODIFIED", "DELETED"]

# A watch that ends sooner than this without delivering anything is suspicious (a proxy that
# closes at once, for example); resuming it immediately would spin, so it is backed off.
_SHORT_WATCH_SECONDS = 1.0


@dataclass(frozen=True)
class WatchEvent:
    """One change. For `LISTED`, `objects` is the complete current list and `object` is None;
    for the others `object` is the changed object. `resource_version` is the collection's
    resourceVersion after this event."""

    type: EventType
    resource_version: str
    object: dict[str, Any] | None = None
    objects: tuple[dict[str, Any], ...] = ()


def resource_name(path: str) -> str:
    """The metric label for a collection path: its last segment ("endpointslices")."""
    return path.rstrip("/").rsplit("/", 1)[-1] or path


def _resource_version(obj: dict[str, Any]) -> str | None:
    value = (obj.get("metadata") or {}).get("resourceVersion")
    return str(value) if value else None


async def list_then_watch(
    client: KubeClient,
    path: str,
    *,
    label_selector: str | None = None,
    field_selector: str | None = None,
    backoff_max: float = 10.0,
    timeout_seconds: int = 300,
    _iterations: int | None = None,  # used in tests: stop after this many list/watch rounds
) -> AsyncIterator[WatchEvent]:
    """Yield LISTED, then ADDED/MODIFIED/DELETED for ever (see the module docstring).

    Retries what can heal by itself: 410 (relist), Unavailable, 401/403 (credentials may
    rotate, RBAC may be applied later) with backoff. Other API errors (404 for an unknown
    resource, 400 for a bad selector) are the caller's mistake and are raised."""
    rounds = _ListWatchRounds(
        client,
        path,
        label_selector=label_selector,
        field_selector=field_selector,
        backoff=Backoff(maximum=backoff_max),
        timeout_seconds=timeout_seconds,
    )
    done = 0
    while _iterations is None or done < _iterations:
        done += 1
        delay: float | None = None
        try:
            if rounds.resource_version is None:
                yield await rounds.list()
            # aclosing: when our consumer stops early, the HTTP stream is released at once.
            async with contextlib.aclosing(rounds.watch()) as events:
                async for event in events:
                    yield event
            delay = rounds.ended()
        except Gone as exc:
            delay = rounds.gone(exc)
        except Unavailable as exc:
            delay = rounds.unavailable(exc)
        except KubeError as exc:
            delay = rounds.refused(exc)
        if delay is not None:
            await asyncio.sleep(delay)


class _ListWatchRounds:
    """The state of `list_then_watch` between rounds: where the watch resumes from and how
    long to back off after each way a round can end."""

    def __init__(
        self,
        client: KubeClient,
        path: str,
        *,
        label_selector: str | None,
        field_selector: str | None,
        backoff: Backoff,
        timeout_seconds: int,
    ) -> None:
        self.client = client
        self.path = path
        self.label_selector = label_selector
        self.field_selector = field_selector
        self.backoff = backoff
        self.timeout_seconds = timeout_seconds
        self.resource = resource_name(path)
        self.context = {
            "resource": self.resource,
            "path": path,
            "label_selector": label_selector,
            "field_selector": field_selector,
        }
        self.resource_version: str | None = None  # None: list first
        self.gone_again = False  # a 410 right after a fresh list: back off, do not relist at once
        self._started = 0.0
        self._delivered = 0

    async def list(self) -> WatchEvent:
        listing = await self.client.list(
            self.path, label_selector=self.label_selector, field_selector=self.field_selector
        )
        resource_version = str((listing.get("metadata") or {}).get("resourceVersion") or "")
        if not resource_version:
            raise Unavailable(f"LIST {self.path}: the list has no resourceVersion")
        self.resource_version = resource_version
        items = tuple(listing.get("items") or ())
        log.info(
            "listed",
            extra={**self.context, "count": len(items), "resource_version": resource_version},
        )
        if not self.gone_again:
            self.backoff.reset()
        return WatchEvent(type="LISTED", resource_version=resource_version, objects=items)

    async def watch(self) -> AsyncGenerator[WatchEvent, None]:
        """The changes of one watch request, bookmarks applied and not yielded."""
        assert self.resource_version is not None
        self._started = time.monotonic()
        self._delivered = 0
        stream = self.client.watch(
            self.path,
            resource_version=self.resource_version,
            label_selector=self.label_selector,
            field_selector=self.field_selector,
            allow_bookmarks=True,
            timeout_seconds=self.timeout_seconds,
        )
        async with contextlib.aclosing(stream):
            async for raw in stream:
                self._delivered += 1
                event_type = raw.get("type")
                obj = raw["object"]
                self.resource_version = _resource_version(obj) or self.resource_version
                if event_type == "BOOKMARK":
                    continue
                if event_type not in ("ADDED", "MODIFIED", "DELETED"):
                    log.warning(
                        "skipping an unknown watch event type",
                        extra={**self.context, "type": event_type},
                    )
                    continue
                self.backoff.reset()
                self.gone_again = False
                yield WatchEvent(
                    type=event_type, resource_version=self.resource_version, object=obj
                )

    def ended(self) -> float | None:
        """The server ended the watch (its timeout): resume from where we are."""
        WATCH_RESTARTS.labels(self.resource, "expired").inc()
        if self._delivered or time.monotonic() - self._started >= _SHORT_WATCH_SECONDS:
            return None
        delay = self.backoff.next_delay()
        log.warning(
            "watch ended at once, backing off", extra={**self.context, "delay": round(delay, 3)}
        )
        return delay

    def gone(self, exc: Gone) -> float | None:
        WATCH_RESTARTS.labels(self.resource, "gone").inc()
        log.info(
            "resourceVersion expired, listing again", extra={**self.context, "error": exc.message}
        )
        self.resource_version = None
        delay = self.backoff.next_delay() if self.gone_again else None
        self.gone_again = True
        return delay

    def unavailable(self, exc: Unavailable) -> float:
        WATCH_RESTARTS.labels(self.resource, "unavailable").inc()
        delay = self.backoff.next_delay()
        if exc.retry_after is not None:
            delay = max(delay, min(exc.retry_after, self.backoff.maximum))
        log.warning(
            "API server unavailable, retrying",
            extra={
                **self.context,
                "error": str(exc),
                "delay": round(delay, 3),
                "attempt": self.backoff.attempts,
            },
        )
        return delay

    def refused(self, exc: KubeError) -> float:
        """401/403 are retried (credentials rotate, RBAC arrives late); others are raised."""
        if exc.status not in (401, 403):
            raise exc
        WATCH_RESTARTS.labels(self.resource, "error").inc()
        delay = self.backoff.next_delay()
        log.error(
            "not allowed to list/watch, retrying",
            extra={**self.context, "error": str(exc), "delay": round(delay, 3)},
        )
        return delay


def object_key(obj: dict[str, Any]) -> tuple[str, str]:
    metadata = obj.get("metadata") or {}
    return (str(metadata.get("namespace") or ""), str(metadata.get("name") or ""))


class ObjectCache:
    """The current objects of one watched collection, by (namespace, name).

    `synced` turns true at the first LISTED event: before that the cache is not a complete
    picture and must not be published."""

    def __init__(self) -> None:
        self._objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.synced = False
        self.resource_version = ""

    def apply(self, event: WatchEvent) -> bool:
        """Apply one event; returns True when the content changed."""
        self.resource_version = event.resource_version
        if event.type == "LISTED":
            fresh = {object_key(obj): obj for obj in event.objects}
            changed = not self.synced or fresh != self._objects
            self._objects = fresh
            self.synced = True
            return changed
        if event.object is None:
            return False
        key = object_key(event.object)
        if event.type == "DELETED":
            return self._objects.pop(key, None) is not None
        previous = self._objects.get(key)
        self._objects[key] = event.object
        return previous != event.object

    def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._objects.get((namespace, name))

    def objects(self) -> list[dict[str, Any]]:
        """All current objects, ordered by namespace and name."""
        return [self._objects[key] for key in sorted(self._objects)]

    def __len__(self) -> int:
        return len(self._objects)

    def __contains__(self, key: object) -> bool:
        return key in self._objects
