"""`apilane-render manifest`: the env for people who install Calico from manifests.

    apilane-render manifest [--nats-url URL] [--cluster NAME]     # latest snapshot on the bus
    apilane-render manifest --kubeconfig PATH                      # straight from the API server

Prints the two env lines, then a YAML snippet for the calico-node DaemonSet. With neither
option it uses APILANE_NATS_URL when set, else KUBECONFIG (or the in-cluster account).
Exit codes: 0 printed, 1 nothing usable to print (no snapshot, no endpoints), 2 bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TextIO

from apilane.kube.client import KubeClient, KubeError, NotFound
from apilane.model import endpoints, events, subjects
from apilane.model.errors import ApilaneError
from apilane.renderer import manifest, render
from apilane.renderer.settings import RendererSettings
from apilane.renderer.settings import load as load_settings
from apilane.runtime.bus import Bus, BusError


class CliError(ApilaneError):
    """Nothing to print, for a reason the message explains."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="apilane-render", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    cmd = commands.add_parser("manifest", help="print the env lines and a DaemonSet snippet")
    source = cmd.add_mutually_exclusive_group()
    source.add_argument(
        "--nats-url", action="append", help="read the latest snapshot from NATS (repeatable)"
    )
    source.add_argument(
        "--kubeconfig", help="read the Service and EndpointSlices from this cluster"
    )
    cmd.add_argument(
        "--cluster", help="cluster name on the bus (default: APILANE_CLUSTER or 'default')"
    )
    cmd.add_argument("--format", choices=("all", "env", "yaml"), default="all")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The console script: parse, run, print; see the module docstring for exit codes."""
    return asyncio.run(run(argv, out=sys.stdout))


async def run(argv: Sequence[str] | None, *, out: TextIO) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse has printed the usage already
        return int(exc.code or 0) and 2
    try:
        settings = load_settings()
        desired, origin = await _desired(args, settings)
    except ApilaneError as exc:
        print(f"apilane-render: {exc}", file=sys.stderr)
        return 1
    if args.format in ("all", "env"):
        if args.format == "all":
            out.write(f"# {origin}\n")
        out.write(manifest.env_lines(desired))
    if args.format == "all":
        out.write("---\n")
    if args.format in ("all", "yaml"):
        out.write(
            manifest.daemonset_snippet(
                desired, namespace=settings.target_namespace, name=settings.target_daemonset
            )
        )
    return 0


async def _desired(
    args: argparse.Namespace, settings: RendererSettings
) -> tuple[render.DesiredEnv, str]:
    cluster = subjects.snapshot_key(args.cluster or settings.cluster)
    use_bus = bool(args.nats_url) or (
        not args.kubeconfig and bool(os.environ.get("APILANE_NATS_URL"))
    )
    if use_bus:
        urls = tuple(args.nats_url or settings.common.nats_urls)
        snapshot = await _from_bus(urls, cluster)
        origin = f"cluster {cluster}: snapshot generation {snapshot.generation} from NATS"
    else:
        snapshot = await _from_kube(args.kubeconfig, cluster)
        origin = f"cluster {cluster}: read from the API server just now"
    try:
        return render.render(snapshot, settings.render_options()), origin
    except render.RenderError as exc:
        raise CliError(str(exc)) from exc


async def _from_bus(urls: tuple[str, ...], cluster: str) -> events.EndpointSnapshot:
    try:
        bus = await Bus.connect(urls, name="apilane-render-cli", initial_attempt_deadline=5.0)
    except BusError as exc:
        raise CliError(str(exc)) from exc
    try:
        entry = await bus.kv_get(subjects.SNAPSHOT_BUCKET, subjects.snapshot_key(cluster))
    finally:
        await bus.drain()
    if entry is None:
        raise CliError(
            f"no snapshot for cluster {cluster!r} in {subjects.SNAPSHOT_BUCKET}: is discovery running?"
        )
    return events.decode_snapshot(entry.value)


async def _from_kube(kubeconfig: str | None, cluster: str) -> events.EndpointSnapshot:
    kube = await KubeClient.from_config(kubeconfig)
    try:
        try:
            service = await kube.get("/api/v1/namespaces/default/services/kubernetes")
        except NotFound as exc:
            raise CliError("Service default/kubernetes does not exist") from exc
        slices = await kube.list(
            "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices",
            label_selector="kubernetes.io/service-name=kubernetes",
        )
        try:
            kube_proxy: dict[str, object] | None = await kube.get(
                "/apis/apps/v1/namespaces/kube-system/daemonsets/kube-proxy"
            )
        except KubeError:
            kube_proxy = None  # not there, or not readable: nothing to say about it
    finally:
        await kube.close()
    # Nodes are not read: the managed-provider finding does not change what is rendered.
    result = endpoints.build_snapshot(
        service=service,
        endpoint_slices=slices.get("items") or [],
        kube_proxy=kube_proxy,
        nodes=(),
    )
    return result.to_event(cluster=cluster, generation=0, observed_at=datetime.now(UTC))


if __name__ == "__main__":
    raise SystemExit(main())
