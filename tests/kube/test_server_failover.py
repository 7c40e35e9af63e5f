"""The client never depends on one API server: against three real apiservers (the HA plane),
a client configured for one of them goes on through the others when it is SIGKILLed — for
requests and for watches — and verifies each by the name its certificate carries."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from apilane.kube.client import Unavailable
from apilane.kube.watch import list_then_watch
from apilane.testing.ha import APISERVER_PORT, HAControlPlane

pytestmark = [pytest.mark.integration, pytest.mark.kube]


def endpoints(plane: HAControlPlane) -> list[tuple[str, int]]:
    return [(address, APISERVER_PORT) for address in plane.addresses]


async def test_requests_go_on_through_another_apiserver_when_the_configured_one_dies(
    ha_control_plane: HAControlPlane,
) -> None:
    plane = ha_control_plane
    kube = await plane.client(0)
    try:
        kube.use_endpoints([("not-an-ip", 6443), *endpoints(plane)])  # the bad one is skipped
        assert len(kube.servers.urls) == 3  # the configured one is also an endpoint
        assert (await kube.get("/version"))["major"]
        await asyncio.to_thread(plane.kill_apiserver, 0)
        started = time.monotonic()
        # The refused connection is retried on the next server at once, not after a backoff.
        assert (await kube.get("/version"))["major"]
        assert time.monotonic() - started < 5
        assert kube.server == plane.apiservers[1].url
        namespaces = await kube.list("/api/v1/namespaces")
        assert {"default", "kube-system"} <= {n["metadata"]["name"] for n in namespaces["items"]}
    finally:
        await kube.close()


async def test_the_endpoints_are_verified_against_the_name_never_unverified(
    ha_control_plane: HAControlPlane,
) -> None:
    plane = ha_control_plane
    kube = await plane.client(0)
    try:
        kube.endpoint_server_name = "no-such-name.apilane.test"  # in no serving certificate
        kube.use_endpoints(endpoints(plane)[1:])
        await asyncio.to_thread(plane.kill_apiserver, 0)
        with pytest.raises(Unavailable, match="certificate"):
            await kube.get("/version")
    finally:
        await kube.close()


async def test_a_watch_goes_on_through_another_apiserver_when_its_own_dies(
    ha_control_plane: HAControlPlane,
) -> None:
    plane = ha_control_plane
    kube = await plane.client(0)
    admin = await plane.client(2)
    listed, arrived = asyncio.Event(), asyncio.Event()

    async def follow() -> None:
        async for event in list_then_watch(kube, "/api/v1/namespaces/default/configmaps"):
            if event.type == "LISTED":
                listed.set()
            elif event.object is not None and event.object["metadata"]["name"] == "after-the-kill":
                arrived.set()

    task = asyncio.create_task(follow())
    try:
        kube.use_endpoints(endpoints(plane))
        await asyncio.wait_for(listed.wait(), timeout=30)
        await asyncio.to_thread(plane.kill_apiserver, 0)
        killed_at = time.monotonic()
        await admin.create(
            "/api/v1/namespaces/default/configmaps",
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "after-the-kill"}},
        )
        await asyncio.wait_for(arrived.wait(), timeout=30)
        print(f"watch resumed through {kube.server} {time.monotonic() - killed_at:.2f}s after")
        assert kube.server != plane.apiservers[0].url
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await kube.close()
        await admin.close()
