"""Renderer: snapshot-to-patch latency and resident memory, on a real apiserver and NATS.

Runs the service as it runs in production (`python -m apilane.renderer`, its own process,
leader election on), publishes SNAPSHOTS snapshots one after another into the KV bucket,
each with a different endpoint set so that each one is a real patch, and times each from
the KV put to the `applied` render result arriving on the bus. Then publishes as many
unchanged snapshots (no patch: compare only). Each snapshot is sealed as discovery seals it
(before the clock starts) and verified by the renderer (inside the measured time). Resident memory is the service process's
VmRSS after the runs (and its peak, VmHWM).

    .venv/bin/python bench/bench_renderer.py          # SNAPSHOTS=200 by default
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

from apilane.model import events, subjects
from apilane.model.events import EndpointSnapshot
from apilane.model.signing import SigningKey
from apilane.runtime.natsauth import Role
from apilane.testing.benchstats import percentile, resident_kib
from apilane.testing.kube import ControlPlane
from apilane.testing.nats import NatsServer
from apilane.testing.observe import Observed
from apilane.testing.procs import end_process
from apilane.testing.sealing import seal
from apilane.testing.snapshots import make_snapshot

SNAPSHOTS = int(os.environ.get("SNAPSHOTS", "200"))
RENDER_MODE = os.environ.get("RENDER_MODE", "literal")
TIMEOUT = 30.0


def snapshot(cluster: str, generation: int, endpoint_count: int) -> EndpointSnapshot:
    ipv4 = [f"192.168.{i // 250}.{i % 250 + 1}:6443" for i in range(endpoint_count)]
    return make_snapshot(
        cluster=cluster,
        generation=generation,
        services=("10.96.0.1:443", "[fd00:10:96::1]:443"),
        apiservers=(*ipv4, "[fd00::5:5]:6443"),
    )


def daemonset(namespace: str) -> dict[str, Any]:
    labels = {"k8s-app": "calico-node"}
    container = {"image": "quay.io/calico/node:v3.31.0", "env": [{"name": "X", "value": "y"}]}
    return {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {"name": "calico-node", "namespace": namespace},
        "spec": {
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "initContainers": [{"name": "ebpf-bootstrap", **container}],
                    "containers": [{"name": "calico-node", **container}],
                },
            },
        },
    }


def start_renderer(env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "apilane.renderer"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


async def measure(plane: ControlPlane, nats: NatsServer, work: Path) -> None:
    cluster = f"bench-{secrets.token_hex(3)}"
    namespace = f"bench-{secrets.token_hex(3)}"
    kube = await plane.client()
    # The bench writes snapshots as discovery and reads results as the operator; the renderer
    # runs with its own identity.
    bus = await nats.connect(Role.DISCOVERY, cluster, name="bench")
    await bus.create_streams()
    observer = await nats.connect(Role.OPERATOR, cluster, name="bench-observer")
    for ns in (namespace, "apilane"):
        try:
            await kube.create(
                "/api/v1/namespaces",
                {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}},
            )
        except Exception as exc:  # "apilane" may exist from an earlier run on the same plane
            if "AlreadyExists" not in str(exc):
                raise
    await kube.create(f"/apis/apps/v1/namespaces/{namespace}/daemonsets", daemonset(namespace))

    results = await Observed(events.RenderResult).subscribe(
        observer, subjects.renders_subject(cluster)
    )
    kubeconfig = plane.write_kubeconfig(
        work / "kubeconfig", user="admin", groups=("system:masters",)
    )
    signing_key = SigningKey.generate()
    env = {
        **os.environ,
        "KUBECONFIG": str(kubeconfig),
        **nats.env(Role.RENDERER, cluster),
        "APILANE_CLUSTER": cluster,
        "APILANE_TRUSTED_KEYS": signing_key.public_text,
        "APILANE_TARGET_NAMESPACE": namespace,
        # Literal env by default, so every row is a DaemonSet patch as in earlier runs
        # (RENDER_MODE=configmap: a ConfigMap update each); rollouts are bench_rollouts.py's.
        "APILANE_RENDER_MODE": RENDER_MODE,
        "APILANE_HTTP_PORT": "0",
        "APILANE_HTTP_HOST": "127.0.0.1",
        "APILANE_COALESCE_DURING_ROLLOUT": "false",
        "APILANE_LOG_LEVEL": "WARNING",
        "OTEL_SDK_DISABLED": "true",
    }
    proc = start_renderer(env, work / "renderer.log")
    try:
        key = subjects.snapshot_key(cluster)
        # Warm-up: the service is up (leader, following the bucket) once it answers this one.
        await bus.kv_put(
            subjects.SNAPSHOT_BUCKET, key, seal(snapshot(cluster, 1, 1), key=signing_key)
        )
        first = await results.next(60)
        assert first.outcome == "applied", first

        def timed_runs(start_generation: int, changing: bool) -> Any:
            async def run() -> list[float]:
                latencies = []
                for offset in range(SNAPSHOTS):
                    generation = start_generation + offset
                    count = 2 + offset % 3 if changing else 2 + (SNAPSHOTS - 1) % 3
                    value = seal(snapshot(cluster, generation, count), key=signing_key)
                    began = time.perf_counter()
                    await bus.kv_put(subjects.SNAPSHOT_BUCKET, key, value)
                    result = await results.next(TIMEOUT)
                    latencies.append(time.perf_counter() - began)
                    expected = "applied" if changing else "unchanged"
                    if result.generation != generation or result.outcome != expected:
                        raise RuntimeError(
                            f"unexpected result {result.generation} {result.outcome}: {result.reason}"
                        )
                return latencies

            return run()

        patched = await timed_runs(2, changing=True)
        unchanged = await timed_runs(2 + SNAPSHOTS, changing=False)
        rss, peak = resident_kib(proc.pid)
    finally:
        end_process(proc, grace=10)
        await bus.drain()
        await observer.drain()
        await kube.close()

    print(
        f"renderer ({RENDER_MODE} mode): {SNAPSHOTS} snapshots per row, one at a time, service"
        " in its own process\n"
    )
    print("| case | p50 ms | p99 ms | max ms | mean ms |")
    print("|---|---:|---:|---:|---:|")
    for name, values in (
        ("snapshot → applied patch", patched),
        ("snapshot → unchanged (no patch)", unchanged),
    ):
        print(
            f"| {name} | {percentile(values, 0.50) * 1000:.1f} | {percentile(values, 0.99) * 1000:.1f}"
            f" | {max(values) * 1000:.1f} | {statistics.fmean(values) * 1000:.1f} |"
        )
    print(
        f"\nresident memory of the renderer process: {rss / 1024:.1f} MiB (peak {peak / 1024:.1f} MiB)"
    )


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="apilane-bench-renderer-") as scratch:
        work = Path(scratch)
        nats = NatsServer(store_dir=work / "nats")
        nats.start()
        try:
            with ControlPlane() as plane:
                asyncio.run(measure(plane, nats, work))
        finally:
            nats.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
