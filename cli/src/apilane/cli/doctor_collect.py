"""`apilane doctor`'s collectors: the API objects and the node, read into the pure core's
facts (`apilane.cli.doctor`). Read-only: GETs and LISTs, nothing else."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TextIO

from apilane.cli import doctor
from apilane.cli.doctor import Check, ClusterFacts, Mount, NodeFacts
from apilane.kube.client import KubeClient, KubeError, NotFound
from apilane.kube.credentials import (
    IN_CLUSTER_DIR,
    kubeconfig_paths,
    load_in_cluster,
    load_kubeconfig,
)
from apilane.model.errors import ConfigError

SERVICE = "/api/v1/namespaces/default/services/kubernetes"
SLICES = "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices"
KUBE_SYSTEM_PODS = "/api/v1/namespaces/kube-system/pods"
NODES = "/api/v1/nodes"
INSTALLATION = "/apis/operator.tigera.io/v1/installations/default"
KUBE_PROXY_POD_SELECTORS = ("k8s-app=kube-proxy", "component=kube-proxy")
# Everything the collectors read, as RBAC rules (API group, resource, verb): a ClusterRole
# with these is all the doctor needs (README: apilane doctor; a test runs it with just these).
READS: Final = (
    ("", "services", "get"),
    ("discovery.k8s.io", "endpointslices", "list"),
    ("apps", "daemonsets", "get"),
    ("apps", "deployments", "get"),
    ("", "pods", "list"),
    ("", "nodes", "list"),
    ("operator.tigera.io", "installations", "get"),
)


def daemonset_path(namespaced_name: str) -> str:
    namespace, _, name = namespaced_name.partition("/")
    return f"/apis/apps/v1/namespaces/{namespace}/daemonsets/{name}"


def deployment_path(namespaced_name: str) -> str:
    namespace, _, name = namespaced_name.partition("/")
    return f"/apis/apps/v1/namespaces/{namespace}/deployments/{name}"


async def get_or_none(kube: KubeClient, path: str) -> dict[str, Any] | None:
    try:
        return await kube.get(path)
    except NotFound:
        return None


async def collect_cluster(kube: KubeClient, *, renderer_target: str) -> ClusterFacts:
    slices = await kube.list(SLICES, label_selector="kubernetes.io/service-name=kubernetes")
    pods: dict[str, dict[str, Any]] = {}
    for selector in KUBE_PROXY_POD_SELECTORS:
        for pod in (await kube.list(KUBE_SYSTEM_PODS, label_selector=selector))["items"]:
            pods[pod["metadata"]["name"]] = pod
    calico_nodes = {}
    for name in dict.fromkeys(
        (doctor.OPERATOR_CALICO_NODE, doctor.MANIFEST_CALICO_NODE, renderer_target)
    ):
        found = await get_or_none(kube, daemonset_path(name))
        if found is not None:
            calico_nodes[name] = found
    return ClusterFacts(
        service=await get_or_none(kube, SERVICE),
        endpoint_slices=slices["items"],
        kube_proxy=await get_or_none(kube, daemonset_path(doctor.KUBE_PROXY)),
        kube_proxy_pods=list(pods.values()),
        nodes=(await kube.list(NODES))["items"],
        calico_nodes=calico_nodes,
        tigera_operator=await get_or_none(kube, deployment_path(doctor.TIGERA_OPERATOR)),
        # Without the operator's CRD the path is unknown to the server: also a 404.
        installation=await get_or_none(kube, INSTALLATION),
        renderer_target=renderer_target,
    )


# --------------------------------------------------------------------------- the node

_UTS_RELEASE = re.compile(rb'#define\s+UTS_RELEASE\s+"([^"]+)"')


def parse_mountinfo(text: str) -> list[Mount]:
    """/proc/<pid>/mountinfo: the mount point is field 5, the type the first after " - "."""
    mounts = []
    for line in text.splitlines():
        before, separator, after = line.partition(" - ")
        fields, rest = before.split(), after.split()
        if separator and len(fields) >= 5 and rest:
            mounts.append(Mount(point=_unescape(fields[4]), fstype=rest[0]))
    return mounts


def _unescape(path: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as octal.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), path)


@dataclass(frozen=True)
class NodePaths:
    """Where the node's facts are read from (a test or a pod with the host mounted moves them)."""

    mountinfo: Path = Path("/proc/self/mountinfo")
    modules: Path = Path("/lib/modules")
    kheaders: Path = Path("/sys/kernel/kheaders.tar.xz")


def headers_release(build: Path) -> str:
    """The release the headers under `build` were made for ("" when it does not say)."""
    for candidate in ("include/generated/utsrelease.h", "include/config/kernel.release"):
        with contextlib.suppress(OSError):
            data = (build / candidate).read_bytes()
            match = _UTS_RELEASE.search(data)
            if match:
                return match.group(1).decode(errors="replace")
            if candidate.endswith("kernel.release"):
                return data.decode(errors="replace").strip()
    return ""


def collect_node(paths: NodePaths = NodePaths(), *, kernel_release: str | None = None) -> NodeFacts:
    release = kernel_release or os.uname().release
    try:
        mounts = parse_mountinfo(paths.mountinfo.read_text())
    except OSError:
        mounts = []
    build = paths.modules / release / "build"
    present = build.is_dir()
    return NodeFacts(
        mounts=mounts,
        kernel_release=release,
        headers_dir=str(build),
        headers_present=present,
        headers_release=headers_release(build) if present else "",
        kheaders=paths.kheaders.exists(),
    )


# --------------------------------------------------------------------------- the command


def kubeconfig_files(kubeconfig: str, environ: Mapping[str, str]) -> list[str]:
    """The kubeconfig files to read; none means the pod's service account."""
    paths = kubeconfig_paths(kubeconfig or environ.get("KUBECONFIG", ""))
    if paths or environ.get("KUBERNETES_SERVICE_HOST"):
        return paths
    default = Path(environ.get("HOME", "~")).expanduser() / ".kube" / "config"
    return [str(default)] if default.is_file() else []


async def kube_client(
    kubeconfig: str,
    context: str,
    environ: Mapping[str, str],
    *,
    in_cluster_dir: Path = IN_CLUSTER_DIR,
) -> KubeClient:
    """As kubectl finds its credentials: --kubeconfig, else $KUBECONFIG, else the pod's
    service account inside a pod, else ~/.kube/config."""
    paths = kubeconfig_files(kubeconfig, environ)
    if paths:
        configuration = await load_kubeconfig(paths, context=context or None)
        return KubeClient(configuration, source=f"kubeconfig {', '.join(paths)}")
    return KubeClient(
        load_in_cluster(environ, base=in_cluster_dir), source="in-cluster service account"
    )


@dataclass(frozen=True, kw_only=True)
class DoctorOptions:
    kubeconfig: str = ""
    context: str = ""
    renderer_target: str = doctor.OPERATOR_CALICO_NODE
    node: bool = True  # also check the machine the command runs on
    as_json: bool = False
    in_cluster_dir: Path = IN_CLUSTER_DIR  # the service account's mount, inside a pod


async def cluster_checks(options: DoctorOptions, environ: Mapping[str, str]) -> list[Check]:
    """The cluster's checks; one failed `api-access` check when the objects cannot be read."""
    try:
        kube = await kube_client(
            options.kubeconfig, options.context, environ, in_cluster_dir=options.in_cluster_dir
        )
        try:
            facts = await collect_cluster(kube, renderer_target=options.renderer_target)
        finally:
            await kube.close()
    except (KubeError, ConfigError) as exc:
        return [doctor.access_failed(str(exc))]
    return doctor.cluster_checks(facts)


async def run(
    options: DoctorOptions, *, out: TextIO, environ: Mapping[str, str] | None = None
) -> int:
    checks = await cluster_checks(options, os.environ if environ is None else environ)
    if options.node:
        checks += doctor.node_checks(collect_node())
    print(doctor.render_json(checks) if options.as_json else doctor.render_text(checks), file=out)
    return doctor.exit_code(checks)
