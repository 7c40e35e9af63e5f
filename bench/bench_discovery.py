"""Discovery: change-to-publish latency and resident memory, on a real apiserver and NATS.

Runs the service as it runs in production (`python -m apilane.discovery`, its own process,
leader election on, the default 100 ms coalescing window), then changes the `kubernetes`
Service's EndpointSlice CHANGES times, one after another, each to a new endpoint set, and
times each from just before the API write to the new snapshot arriving from the KV bucket.
Back to back, each change comes within the window its predecessor's publish opened, so it
waits for that window's end (the trailing publish). Then LONE_CHANGES changes each after a
quiet window: the leading edge, published at once. Then reorder-only updates (the digest does not change: no publish). Resident memory
is the service process's VmRSS after the runs (and its peak, VmHWM). Snapshots are read
back as the renderer reads them: verified against discovery's key.

    .venv/bin/python bench/bench_discovery.py          # CHANGES=120 by default
"""

from __future__ import annotations

import asyncio
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from apilane.kube.client import KubeClient, NotFound
from apilane.model import subjects
from apilane.model.signing import TrustedKeys, open_snapshot
from apilane.runtime.natsauth import Role
from apilane.testing.benchstats import percentile, resident_kib
from apilane.testing.kube import ControlPlane, endpoint_slice
from apilane.testing.nats import NatsServer
from apilane.testing.procs import end_process
from apilane.testing.sealing import write_signing_key

CHANGES = int(os.environ.get("CHANGES", "120"))
LONE_CHANGES = int(os.environ.get("LONE_CHANGES", "40"))
WINDOW = os.environ.get("APILANE_COALESCE_WINDOW", "100ms")
TIMEOUT = 30.0
SLICES = "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices"


async def put_slice(kube: KubeClient, body: dict[str, Any]) -> None:
    name = body["metadata"]["name"]
    try:
        current = await kube.get(f"{SLICES}/{name}")
    except NotFound:
        await kube.create(SLICES, body)
        return
    body["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
    await kube.replace(f"{SLICES}/{name}", body)


async def run(plane: ControlPlane, nats: NatsServer) -> int:
    cluster = f"bench-{secrets.token_hex(3)}"
    kube = await plane.client()
    provisioner = await nats.connect(Role.DISCOVERY, cluster, name="bench-provisioner")
    await provisioner.create_streams()
    await provisioner.drain()
    # The bench follows the bucket as a renderer would; discovery runs with its own identity.
    bus = await nats.connect(Role.RENDERER, cluster, name="bench")
    target = (await kube.get("/api/v1/namespaces/default/services/kubernetes"))["spec"]["ports"][0][
        "targetPort"
    ]

    def body(addresses: list[str]) -> dict[str, Any]:
        return endpoint_slice("kubernetes", addresses=addresses, port=target)

    await put_slice(kube, body(["192.0.2.1", "192.0.2.2"]))
    scratch = tempfile.TemporaryDirectory(prefix="apilane-bench-discovery-")
    signing_key, key_file = write_signing_key(Path(scratch.name))
    trusted = TrustedKeys.of(signing_key)
    env = {
        **os.environ,
        "APILANE_SIGNING_KEY_FILE": str(key_file),
        **nats.env(Role.DISCOVERY, cluster),
        "APILANE_CLUSTER": cluster,
        "KUBECONFIG": str(plane.kubeconfig_path),
        "APILANE_LEASE_NAMESPACE": "default",
        "APILANE_POD_NAME": "bench-discovery",
        "APILANE_HTTP_PORT": "0",
        "APILANE_HTTP_HOST": "127.0.0.1",
        "APILANE_LOG_LEVEL": "WARNING",
        "APILANE_COALESCE_WINDOW": WINDOW,
        "OTEL_SDK_DISABLED": "true",
    }
    proc = subprocess.Popen(  # noqa: ASYNC220 - a bench: started once, before timing
        [sys.executable, "-m", "apilane.discovery"], env=env, start_new_session=True
    )
    seen: dict[str, float] = {}  # apiserver endpoint set → when its snapshot arrived
    generations: list[int] = []
    stop = asyncio.Event()

    async def watch() -> None:
        async for entry in bus.watch_kv(
            subjects.SNAPSHOT_BUCKET, subjects.snapshot_key(cluster), _stop=stop
        ):
            snap = open_snapshot(entry.value, trusted).snapshot
            key = ",".join(sorted(e.ip for e in snap.apiserver_endpoints))
            seen.setdefault(key, time.monotonic())
            generations.append(snap.generation)

    watcher = asyncio.create_task(watch())

    async def wait_for(key: str) -> float:
        deadline = time.monotonic() + TIMEOUT
        while key not in seen:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"no snapshot with {key} (service exit code {proc.poll()})")
            await asyncio.sleep(0.002)
        return seen[key]

    try:
        await wait_for("192.0.2.1,192.0.2.2")
        latencies: list[float] = []
        for i in range(CHANGES):
            addresses = ["192.0.2.1", f"198.51.100.{i % 250 + 1}", f"203.0.113.{i // 250 + 1}"]
            began = time.monotonic()
            await put_slice(kube, body(addresses))
            latencies.append(await wait_for(",".join(sorted(addresses))) - began)
        # Lone changes, each after a quiet window: the leading edge, published at once.
        lone: list[float] = []
        for i in range(LONE_CHANGES):
            await asyncio.sleep(_seconds(WINDOW) + 0.05)
            addresses = ["192.0.2.1", f"198.51.100.{i % 250 + 1}", "203.0.113.250"]
            began = time.monotonic()
            await put_slice(kube, body(addresses))
            lone.append(await wait_for(",".join(sorted(addresses))) - began)
        published = len(generations)
        # Reorder-only updates: new resourceVersions, same digest, so nothing is published.
        for _ in range(CHANGES // 4):
            await put_slice(kube, body(list(reversed(addresses))))
            await put_slice(kube, body(addresses))
        await asyncio.sleep(1.0)
        suppressed_publishes = len(generations) - published
        rss, peak = resident_kib(proc.pid)
    finally:
        stop.set()
        watcher.cancel()
        end_process(proc, grace=10)
        await bus.drain()
        await kube.close()
        scratch.cleanup()

    ms = [v * 1000 for v in latencies]
    print(
        f"discovery, real kube-apiserver + nats-server, coalescing window {WINDOW}, {CHANGES} changes\n"
    )
    print("| measure | value |")
    print("|---|---|")
    print(f"| change-to-publish p50 | {statistics.median(ms):.1f} ms |")
    print(f"| change-to-publish p90 | {percentile(ms, 0.90):.1f} ms |")
    print(f"| change-to-publish p99 | {percentile(ms, 0.99):.1f} ms |")
    print(f"| change-to-publish max | {max(ms):.1f} ms |")
    lone_ms = [v * 1000 for v in lone]
    print(
        f"| lone change (after a quiet window, {LONE_CHANGES} changes) p50 / p99 |"
        f" {statistics.median(lone_ms):.1f} / {percentile(lone_ms, 0.99):.1f} ms |"
    )
    print(f"| generations strictly increasing | {generations == sorted(set(generations))} |")
    print(f"| publishes for {2 * (CHANGES // 4)} reorder-only updates | {suppressed_publishes} |")
    print(f"| service resident memory (VmRSS) | {rss / 1024:.1f} MiB |")
    print(f"| service peak resident memory (VmHWM) | {peak / 1024:.1f} MiB |")
    return 0


def _seconds(text: str) -> float:
    return float(text[:-2]) / 1000 if text.endswith("ms") else float(text.rstrip("s"))


def main() -> int:
    with NatsServer() as nats, ControlPlane() as plane:
        return asyncio.run(run(plane, nats))


if __name__ == "__main__":
    sys.exit(main())
