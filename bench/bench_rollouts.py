"""Renderer: calico-node DaemonSet generations caused per 100 endpoint changes, per mode.

A count, not a timing: every DaemonSet generation is a change of the pod template, and so a
rollout of every calico-node pod. For each mode the renderer service runs in its own process
(`python -m apilane.renderer`, as in production) against a real apiserver and NATS, on a
calico-node DaemonSet of its own:

- literal: the values go into the pod template (every change is a generation);
- configmap (the default): the first snapshot adopts the DaemonSet (one generation), then
  every endpoint change updates the ConfigMap only;
- configmap on a DaemonSet tigera-operator renders: never patched at all.

The generation is read before the first snapshot, after it (adoption), and after CHANGES
endpoint changes (each one waited for: its render result, and the ConfigMap or the pod
template holding its endpoints).

    .venv/bin/python bench/bench_rollouts.py          # CHANGES=100 by default
"""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apilane.kube.client import KubeClient
from apilane.model import events, subjects
from apilane.model.events import EndpointSnapshot
from apilane.model.signing import SigningKey
from apilane.runtime.bus import Bus
from apilane.runtime.natsauth import Role
from apilane.testing.calico import container_env
from apilane.testing.kube import ControlPlane
from apilane.testing.nats import NatsServer
from apilane.testing.observe import Observed
from apilane.testing.procs import end_process
from apilane.testing.sealing import seal
from apilane.testing.snapshots import make_snapshot

CHANGES = int(os.environ.get("CHANGES", "100"))
TIMEOUT = 30.0
OPERATOR_OWNER = {
    "apiVersion": "operator.tigera.io/v1",
    "kind": "Installation",
    "name": "default",
    "uid": "0b6d3c55-8f5e-4a8e-9d0f-6f1c2a7e4b10",
    "controller": True,
}


@dataclass(frozen=True)
class Case:
    name: str
    mode: str
    operator_owned: bool = False
    # Generations allowed per CHANGES changes after the first snapshot; None: no target (the
    # literal row is the comparison: one rollout per change).
    target_after_adoption: int | None = 0


CASES = (
    Case("literal", "literal", target_after_adoption=None),
    Case("configmap", "configmap"),
    Case("configmap, DaemonSet owned by tigera-operator", "configmap", operator_owned=True),
)


def endpoints(n: int) -> list[str]:
    return [f"192.168.{n // 250}.{n % 250 + 1}:6443", "192.168.200.1:6443"]


def snapshot(cluster: str, generation: int) -> EndpointSnapshot:
    return make_snapshot(
        cluster=cluster,
        generation=generation,
        services=("10.96.0.1:443",),
        apiservers=endpoints(generation),
    )


def daemonset(namespace: str, *, operator_owned: bool) -> dict[str, Any]:
    labels = {"k8s-app": "calico-node"}
    container = {"image": "quay.io/calico/node:v3.31.0", "env": [{"name": "X", "value": "y"}]}
    metadata: dict[str, Any] = {"name": "calico-node", "namespace": namespace}
    if operator_owned:
        metadata["ownerReferences"] = [OPERATOR_OWNER]
    return {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": metadata,
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


@dataclass(frozen=True)
class Count:
    case: Case
    adoption: int  # generations the first snapshot caused
    changes: int  # generations the CHANGES endpoint changes caused


async def run_case(case: Case, plane: ControlPlane, nats: NatsServer, work: Path) -> Count:
    cluster = f"bench-{secrets.token_hex(3)}"
    namespace = f"bench-{secrets.token_hex(3)}"
    kube = await plane.client()
    bus = await nats.connect(Role.DISCOVERY, cluster, name="bench")
    await bus.create_streams()
    observer = await nats.connect(Role.OPERATOR, cluster, name="bench-observer")
    await kube.create(
        "/api/v1/namespaces",
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}},
    )
    path = f"/apis/apps/v1/namespaces/{namespace}/daemonsets"
    created = await kube.create(path, daemonset(namespace, operator_owned=case.operator_owned))
    ds_path = f"{path}/calico-node"
    results = await Observed(events.RenderResult).subscribe(
        observer, subjects.renders_subject(cluster)
    )
    key = SigningKey.generate()
    env = renderer_env(
        case, cluster=cluster, namespace=namespace, key=key, nats=nats, plane=plane, work=work
    )
    proc = start_renderer(env, work)
    try:
        for generation in range(1, CHANGES + 2):
            await settle(
                bus,
                kube,
                results=results,
                cluster=cluster,
                key=key,
                ds_path=ds_path,
                generation=generation,
            )
            if generation == 1:  # the first snapshot: adoption in configmap mode
                adopted = await kube.get(ds_path)
        after = await kube.get(ds_path)
    finally:
        end_process(proc, grace=10)
        await bus.drain()
        await observer.drain()
        await kube.close()
    start = created["metadata"]["generation"]
    adopted_generation = adopted["metadata"]["generation"]
    return Count(
        case=case,
        adoption=adopted_generation - start,
        changes=after["metadata"]["generation"] - adopted_generation,
    )


async def settle(
    bus: Bus,
    kube: KubeClient,
    *,
    results: Observed[events.RenderResult],
    cluster: str,
    key: SigningKey,
    ds_path: str,
    generation: int,
) -> None:
    """Publish one snapshot and wait for its result and for its endpoints to be where
    calico-node's init container reads them (unless nobody may put them there)."""
    sealed = seal(snapshot(cluster, generation), key=key)
    await bus.kv_put(subjects.SNAPSHOT_BUCKET, subjects.snapshot_key(cluster), sealed)
    result = await results.next(TIMEOUT)
    if result.generation != generation or result.outcome not in ("applied", "unchanged"):
        raise RuntimeError(f"unexpected result {result.generation} {result.outcome}: {result}")
    live = await kube.get(ds_path)
    if live["metadata"].get("ownerReferences"):
        return
    env = await container_env(kube, live, "initContainers", "ebpf-bootstrap")
    if env.get("KUBERNETES_APISERVER_ENDPOINTS") != ",".join(endpoints(generation)):
        raise RuntimeError(f"generation {generation} is not in calico-node's env: {env}")


def renderer_env(
    case: Case,
    *,
    cluster: str,
    namespace: str,
    key: SigningKey,
    nats: NatsServer,
    plane: ControlPlane,
    work: Path,
) -> dict[str, str]:
    kubeconfig = plane.write_kubeconfig(
        work / f"kubeconfig-{namespace}", user="admin", groups=("system:masters",)
    )
    return {
        **os.environ,
        "KUBECONFIG": str(kubeconfig),
        **nats.env(Role.RENDERER, cluster),
        "APILANE_CLUSTER": cluster,
        "APILANE_TRUSTED_KEYS": key.public_text,
        "APILANE_TARGET_NAMESPACE": namespace,
        "APILANE_RENDER_MODE": case.mode,
        "APILANE_LEASE_NAMESPACE": namespace,
        "APILANE_HTTP_PORT": "0",
        "APILANE_HTTP_HOST": "127.0.0.1",
        "APILANE_COALESCE_DURING_ROLLOUT": "false",
        "APILANE_LOG_LEVEL": "WARNING",
        "OTEL_SDK_DISABLED": "true",
    }


def start_renderer(env: dict[str, str], work: Path) -> subprocess.Popen[bytes]:
    with (work / f"renderer-{env['APILANE_TARGET_NAMESPACE']}.log").open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "apilane.renderer"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


async def measure(plane: ControlPlane, nats: NatsServer, work: Path) -> list[Count]:
    return [await run_case(case, plane, nats, work) for case in CASES]


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="apilane-bench-rollouts-") as scratch:
        work = Path(scratch)
        nats = NatsServer(store_dir=work / "nats")
        nats.start()
        try:
            with ControlPlane() as plane:
                counts = asyncio.run(measure(plane, nats, work))
        finally:
            nats.close()
    print(f"renderer: calico-node DaemonSet generations (= rollouts), {CHANGES} endpoint changes\n")
    print(f"| mode | first snapshot | per {CHANGES} endpoint changes | target | met |")
    print("|---|---:|---:|---:|---|")
    for count in counts:
        target = count.case.target_after_adoption
        shown, met = ("—", "—") if target is None else (str(target), yes(met_by(count)))
        print(f"| {count.case.name} | {count.adoption} | {count.changes} | {shown} | {met} |")
    return 0 if all(met_by(count) for count in counts) else 1


def met_by(count: Count) -> bool:
    target = count.case.target_after_adoption
    return target is None or count.changes <= target


def yes(flag: bool) -> str:
    return "yes" if flag else "NO"


if __name__ == "__main__":
    sys.exit(main())
