"""Discovery never depends on one API server: with three real apiservers (the HA plane) and
discovery configured for one of them, SIGKILL that one — discovery keeps watching through
another, within seconds, and publishes the next change."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from apilane.model import subjects
from apilane.model.signing import TrustedKeys, open_snapshot
from apilane.runtime.natsauth import Role
from apilane.testing.ha import HAControlPlane
from apilane.testing.nats import NatsServer
from apilane.testing.sealing import signing_environment
from apilane.testing.stack import ServiceProcesses, base_environment

pytestmark = [pytest.mark.integration, pytest.mark.kube, pytest.mark.nats]

CLUSTER = "ha-discovery"
# Discovery's watches back off (at most 1 s here) before reconnecting through the next
# server; the bound leaves room for a loaded machine.
RESUME_BOUND = 15.0


@pytest.fixture
def plane() -> Iterator[HAControlPlane]:
    with HAControlPlane(3) as started:
        yield started


async def test_discovery_keeps_watching_through_another_apiserver_when_its_own_is_killed(
    plane: HAControlPlane, nats_server_tls: NatsServer, tmp_path: Path
) -> None:
    env = base_environment(
        cluster=CLUSTER, nats_url=nats_server_tls.url, kubeconfig=str(plane.kubeconfig_paths[0])
    ) | signing_environment(tmp_path)
    trusted = TrustedKeys.parse(env["APILANE_TRUSTED_KEYS"])
    stack = ServiceProcesses(tmp_path)
    bus = await nats_server_tls.connect(Role.OPERATOR, CLUSTER, name="discovery-ha-test")

    async def published() -> set[str]:
        entry = await bus.kv_get(subjects.SNAPSHOT_BUCKET, subjects.snapshot_key(CLUSTER))
        if entry is None:
            return set()
        return {e.ip for e in open_snapshot(entry.value, trusted).snapshot.apiserver_endpoints}

    async def wait_for(addresses: set[str], timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            stack.check_alive()
            if await published() == addresses:
                return time.monotonic()
            await asyncio.sleep(0.05)
        raise AssertionError(
            f"published {sorted(await published())}, not {sorted(addresses)}\n{stack.logs_text()}"
        )

    try:
        stack.start(
            "discovery",
            "apilane.discovery",
            env
            | nats_server_tls.env(Role.DISCOVERY, CLUSTER)
            | {
                "APILANE_POD_NAME": "discovery-0",
                "APILANE_LEASE_NAMESPACE": "default",
                "APILANE_WATCH_BACKOFF_MAX": "1s",
            },
        )
        await wait_for(set(plane.addresses), timeout=60)
        await asyncio.to_thread(plane.kill_apiserver, 0)
        killed = time.monotonic()
        # The next change, made where discovery is not connected: apiserver 2 stops gracefully
        # and removes its own lease at once.
        await asyncio.to_thread(plane.stop_apiserver, 2)
        published_at = await wait_for(
            {plane.addresses[0], plane.addresses[1]}, timeout=RESUME_BOUND
        )
        assert published_at - killed < RESUME_BOUND
        print(f"discovery published the next change {published_at - killed:.2f}s after the kill")
        log = stack.log("discovery", lines=400)
        assert "API server unreachable, trying the next" in log
        assert plane.apiservers[1].url in log
    finally:
        await bus.drain()
        stack.stop()
