"""list_then_watch against the real kube-apiserver: the initial list, live changes, a forced
410 Gone that must relist without losing a change, and an apiserver crash mid-watch."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from apilane.kube.client import KubeClient
from apilane.kube.watch import WATCH_RESTARTS, ObjectCache, WatchEvent, list_then_watch
from apilane.testing.kube import ControlPlane, endpoint_slice

pytestmark = [pytest.mark.integration, pytest.mark.kube]

EVENT_TIMEOUT = 20.0


def slices_path(namespace: str) -> str:
    return f"/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices"


async def next_event(events: AsyncIterator[WatchEvent]) -> WatchEvent:
    async with asyncio.timeout(EVENT_TIMEOUT):
        return await anext(events)


def restarts(reason: str) -> float:
    return WATCH_RESTARTS.labels("endpointslices", reason)._value.get()  # type: ignore[no-any-return]


def addresses(cache: ObjectCache) -> dict[str, list[str]]:
    return {
        o["metadata"]["name"]: [a for e in o.get("endpoints") or [] for a in e["addresses"]]
        for o in cache.objects()
    }


async def test_lists_first_then_streams_added_modified_deleted(
    kube: KubeClient, kube_namespace: str
) -> None:
    path = slices_path(kube_namespace)
    await kube.create(path, endpoint_slice("before", addresses=["192.0.2.1"]))
    events = list_then_watch(kube, path, label_selector="kubernetes.io/service-name=kubernetes")
    cache = ObjectCache()
    async with contextlib.aclosing(events):
        listed = await next_event(events)
        assert listed.type == "LISTED"
        assert [o["metadata"]["name"] for o in listed.objects] == ["before"]
        cache.apply(listed)

        await kube.create(path, endpoint_slice("after", addresses=["192.0.2.2"]))
        added = await next_event(events)
        assert (added.type, added.object and added.object["metadata"]["name"]) == ("ADDED", "after")
        cache.apply(added)

        await kube.patch(f"{path}/after", {"endpoints": [{"addresses": ["192.0.2.3"]}]})
        modified = await next_event(events)
        assert modified.type == "MODIFIED"
        cache.apply(modified)
        assert addresses(cache) == {"after": ["192.0.2.3"], "before": ["192.0.2.1"]}

        await kube.delete(f"{path}/before")
        deleted = await next_event(events)
        assert deleted.type == "DELETED"
        cache.apply(deleted)
        assert addresses(cache) == {"after": ["192.0.2.3"]}
        assert int(deleted.resource_version) > int(listed.resource_version)


async def test_a_410_gone_relists_without_losing_changes_made_meanwhile(
    control_plane: ControlPlane, kube_namespace: str
) -> None:
    path = slices_path(kube_namespace)
    watcher_client = await control_plane.client()
    gone_before = restarts("gone")
    try:
        setup = await control_plane.client()
        try:
            await setup.create(path, endpoint_slice("kept", addresses=["192.0.2.10"]))
            await setup.create(path, endpoint_slice("removed", addresses=["192.0.2.11"]))
        finally:
            await setup.close()
        events = list_then_watch(watcher_client, path, backoff_max=0.5)
        cache = ObjectCache()
        async with contextlib.aclosing(events):
            cache.apply(await next_event(events))
            assert sorted(addresses(cache)) == ["kept", "removed"]

            # The generator is suspended at its yield; while it is, the apiserver restarts
            # with etcd's history moved on and compacted, and the slices change.
            control_plane.restart_apiserver(expire_watches=True)
            writer = await control_plane.client()
            try:
                await writer.patch(f"{path}/kept", {"endpoints": [{"addresses": ["192.0.2.20"]}]})
                await writer.delete(f"{path}/removed")
                await writer.create(path, endpoint_slice("new", addresses=["192.0.2.30"]))
            finally:
                await writer.close()

            relisted = await next_event(events)
            assert relisted.type == "LISTED"
            cache.apply(relisted)
            assert addresses(cache) == {"kept": ["192.0.2.20"], "new": ["192.0.2.30"]}
        assert restarts("gone") == gone_before + 1
    finally:
        await watcher_client.close()


async def test_an_apiserver_crash_mid_watch_recovers_and_delivers_later_changes(
    control_plane: ControlPlane, kube_namespace: str
) -> None:
    path = slices_path(kube_namespace)
    watcher_client = await control_plane.client()
    unavailable_before = restarts("unavailable")
    collected: list[WatchEvent] = []
    cache = ObjectCache()
    first_listing = asyncio.Event()
    recovered = asyncio.Event()

    async def consume() -> None:
        async for event in list_then_watch(watcher_client, path, backoff_max=0.5):
            collected.append(event)
            cache.apply(event)
            first_listing.set()
            if "after-crash" in addresses(cache):
                recovered.set()

    task = asyncio.create_task(consume())
    try:
        async with asyncio.timeout(EVENT_TIMEOUT):
            await first_listing.wait()
        # SIGKILL: the watch connection breaks without a goodbye while the consumer waits.
        await asyncio.to_thread(control_plane.restart_apiserver, graceful=False)
        writer = await control_plane.client()
        try:
            await writer.create(path, endpoint_slice("after-crash", addresses=["192.0.2.40"]))
        finally:
            await writer.close()
        async with asyncio.timeout(EVENT_TIMEOUT):
            await recovered.wait()
        assert addresses(cache) == {"after-crash": ["192.0.2.40"]}
        assert restarts("unavailable") > unavailable_before
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await watcher_client.close()


async def test_a_watch_the_server_ends_is_resumed_from_the_last_version(
    kube: KubeClient, kube_namespace: str
) -> None:
    path = slices_path(kube_namespace)
    seen: list[tuple[str, Any]] = []
    expired_before = restarts("expired")
    events = list_then_watch(kube, path, timeout_seconds=1, _iterations=3)
    async with contextlib.aclosing(events):
        async with asyncio.timeout(EVENT_TIMEOUT):
            async for event in events:
                seen.append((event.type, event.object and event.object["metadata"]["name"]))
                if event.type == "LISTED":
                    await kube.create(path, endpoint_slice("late", addresses=["192.0.2.50"]))
    # One LISTED, then the ADDED in whichever 1 s watch round saw it; no second LISTED.
    assert seen == [("LISTED", None), ("ADDED", "late")]
    assert restarts("expired") >= expired_before + 2
