"""`apilane doctor`: the preconditions of an eBPF kube-proxy replacement, checked. Pure core.

The collectors (`apilane.cli.doctor_collect`) read the API objects and the node into
`ClusterFacts` and `NodeFacts`; here those facts become one `Check` per question, each ok,
warn or fail with what to do. The questions are the ones Calico's operator asks before it
bootstraps eBPF (the `kubernetes` Service and its EndpointSlices are there and usable,
kube-proxy runs and nobody else manages it, the API server is not external) and the ones
apilane's own programs need on a node (bpffs, cgroup v2, a kernel with every hook, the
headers bcc compiles against). The Service, slice, kube-proxy and provider rules are
`apilane.model.endpoints`' own, so the doctor sees what discovery would publish.

Exit code: the worst result, 0 all ok, 1 a warning, 2 a failure (`exit_code`).
"""

from __future__ import annotations

import enum
import ipaddress
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Final

from apilane.model import endpoints
from apilane.model.endpoints import SnapshotResult
from apilane.model.events import Finding, WarningReason
from apilane.model.objects import as_dict, as_int, as_list, as_str

Body = Mapping[str, Any]


class Level(enum.IntEnum):
    OK = 0
    WARN = 1
    FAIL = 2

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class Check:
    """One question's answer: `summary` what was found, `advice` what to do (empty if ok)."""

    name: str
    level: Level
    summary: str
    advice: str = ""


def exit_code(checks: Iterable[Check]) -> int:
    """0 when every check is ok, 1 when the worst is a warning, 2 when one failed."""
    return int(max((check.level for check in checks), default=Level.OK))


# --------------------------------------------------------------------------- cluster facts

KUBE_PROXY: Final = "kube-system/kube-proxy"
# Where calico-node lives: the operator's namespace first, then the manifest install's.
OPERATOR_CALICO_NODE: Final = "calico-system/calico-node"
MANIFEST_CALICO_NODE: Final = "kube-system/calico-node"
TIGERA_OPERATOR: Final = "tigera-operator/tigera-operator"
# The operator's nodeSelector on kube-proxy once eBPF has replaced it.
DISABLE_KUBE_PROXY_SELECTOR: Final = "operator.tigera.io/disable-kube-proxy"

# Markers Calico's operator looks for itself (kubeproxy controller, validateDaemonSetUnmanaged):
# with one of them it leaves kube-proxy alone.
OPERATOR_SEEN_MARKERS: Final = (
    "label:app.kubernetes.io/managed-by",
    "label:addonmanager.kubernetes.io/mode",
    "annotation:argocd.argoproj.io/tracking-id",
)
# Markers of other managers, which the operator does not look for: it would patch kube-proxy
# and fight them. The labels and annotations of apilane.model.endpoints come first.
EXTRA_MANAGED_BY_LABELS: Final = (
    "eks.amazonaws.com/component",  # EKS's kube-proxy (self-managed or add-on)
    "kubernetes.azure.com/managedby",  # AKS
    "kubernetes.io/cluster-service",  # the addon manager's older label (GKE, AKS)
    "tectonic-operators.coreos.com/managed-by",
    "helm.sh/chart",
)
EXTRA_MANAGED_BY_ANNOTATIONS: Final = ("meta.helm.sh/release-name",)
# Server-side apply field managers of a managed offering (EKS add-ons apply as "eks").
MANAGER_FIELD_OWNERS: Final = (("eks", "eks"),)


@dataclass(frozen=True, kw_only=True)
class ClusterFacts:
    """What the API server holds, as it sent it (None: the object does not exist)."""

    service: Body | None
    endpoint_slices: Sequence[Body] = ()
    kube_proxy: Body | None = None
    # kube-proxy pods in kube-system (k8s-app=kube-proxy or component=kube-proxy): static
    # pods where there is no DaemonSet.
    kube_proxy_pods: Sequence[Body] = ()
    nodes: Sequence[Body] = ()
    # "namespace/name" -> DaemonSet, for each calico-node found.
    calico_nodes: Mapping[str, Body] = field(default_factory=dict)
    tigera_operator: Body | None = None
    # The Tigera operator's Installation "default" (operator.tigera.io/v1), if there is one.
    installation: Body | None = None
    # The DaemonSet apilane's renderer patches ("namespace/name").
    renderer_target: str = OPERATOR_CALICO_NODE


def access_failed(error: str) -> Check:
    """When the API objects cannot be read at all, that is the one cluster check."""
    return Check(
        "api-access",
        Level.FAIL,
        f"cannot read the cluster: {error}",
        "check --kubeconfig/--context (or KUBECONFIG), that the API server answers, and that "
        "the identity may read what the doctor reads (README: apilane doctor)",
    )


def cluster_checks(facts: ClusterFacts) -> list[Check]:
    snapshot = endpoints.build_snapshot(
        service=facts.service,
        endpoint_slices=facts.endpoint_slices,
        kube_proxy=facts.kube_proxy,
        nodes=facts.nodes,
    )
    return [
        service_check(facts.service, snapshot),
        endpoint_slices_check(facts.endpoint_slices, snapshot),
        ports_check(snapshot),
        families_check(snapshot),
        kube_proxy_check(facts),
        kube_proxy_ready_check(facts.kube_proxy, snapshot),
        kube_proxy_manager_check(facts.kube_proxy),
        provider_check(snapshot),
        apiserver_location_check(facts.nodes, snapshot),
        calico_node_check(facts),
        installation_check(facts),
        renderer_target_check(facts),
    ]


def _findings(snapshot: SnapshotResult, *reasons: str) -> list[Finding]:
    return [finding for finding in snapshot.findings if finding.reason in reasons]


def _addresses(items: Iterable[Any]) -> str:
    return ", ".join(
        f"[{e.ip}]:{e.port}" if e.family == "IPv6" else f"{e.ip}:{e.port}" for e in items
    )


def service_check(service: Body | None, snapshot: SnapshotResult) -> Check:
    if service is None:
        return Check(
            "kubernetes-service",
            Level.FAIL,
            "Service default/kubernetes does not exist",
            "the API server creates it at start: check that kube-apiserver runs and that "
            "nothing deletes the Service",
        )
    if not snapshot.service_endpoints:
        return Check(
            "kubernetes-service",
            Level.FAIL,
            "Service default/kubernetes has no usable cluster IP and port",
            "check its spec.clusterIPs and spec.ports (kubectl get svc kubernetes -o yaml)",
        )
    families = sorted({e.family for e in snapshot.service_endpoints})
    return Check(
        "kubernetes-service",
        Level.OK,
        f"Service default/kubernetes: {_addresses(snapshot.service_endpoints)} "
        f"({'+'.join(families)})",
    )


def endpoint_slices_check(slices: Sequence[Body], snapshot: SnapshotResult) -> Check:
    name = "kubernetes-endpointslices"
    if not slices:
        return Check(
            name,
            Level.FAIL,
            "no EndpointSlice for Service default/kubernetes",
            "the API server's endpoint reconciler writes them (--endpoint-reconciler-type "
            "lease, the default); without them nothing knows where the API server is",
        )
    usable = snapshot.apiserver_endpoints
    where = f"{len(slices)} slice{'s' if len(slices) != 1 else ''}"
    if not usable:
        return Check(
            name,
            Level.FAIL,
            f"no ready API server endpoint in {where}",
            "the API servers are not ready or not reconciled: check kube-apiserver's health "
            "and its --advertise-address",
        )
    if _findings(snapshot, WarningReason.TERMINATING_FALLBACK):
        return Check(
            name,
            Level.WARN,
            f"no ready endpoint; only terminating ones still serve: {_addresses(usable)}",
            "an API server is shutting down and none replaced it yet: check the control plane",
        )
    return Check(
        name, Level.OK, f"{len(usable)} ready endpoint(s) in {where}: {_addresses(usable)}"
    )


def ports_check(snapshot: SnapshotResult) -> Check:
    bad = _findings(
        snapshot, WarningReason.INVALID_ENDPOINT, WarningReason.UNSUPPORTED_ADDRESS_TYPE
    )
    service_ports = sorted({f"{e.port}/{e.protocol}" for e in snapshot.service_endpoints})
    endpoint_ports = sorted({f"{e.port}/{e.protocol}" for e in snapshot.apiserver_endpoints})
    summary = (
        f"Service {', '.join(service_ports) or 'none'} -> "
        f"endpoints {', '.join(endpoint_ports) or 'none'}"
    )
    if bad:
        return Check(
            "kubernetes-ports",
            Level.WARN,
            f"{summary}; {len(bad)} entry(ies) left out, "
            f"first: {bad[0].object_ref}: {bad[0].message}",
            "fix or remove the entries the data plane cannot program (they are ignored)",
        )
    if not endpoint_ports:
        return Check("kubernetes-ports", Level.WARN, f"{summary}: nothing to program yet")
    return Check("kubernetes-ports", Level.OK, summary)


def families_check(snapshot: SnapshotResult) -> Check:
    mismatch = _findings(snapshot, WarningReason.FAMILY_MISMATCH)
    if mismatch:
        return Check(
            "address-families",
            Level.FAIL,
            mismatch[0].message,
            "give the Service a cluster IP of every endpoint family (dual-stack) or advertise "
            "the API server in the Service's family: Calico's init container crashes on IPv6 "
            "endpoints behind an IPv4-only Service",
        )
    families = sorted({e.family for e in snapshot.service_endpoints})
    families += [
        f for f in sorted({e.family for e in snapshot.apiserver_endpoints}) if f not in families
    ]
    stack = "dual-stack" if len(families) == 2 else "single-stack"
    return Check("address-families", Level.OK, f"{'+'.join(families) or 'none'} ({stack})")


def _is_static_pod(pod: Body) -> bool:
    metadata = as_dict(pod.get("metadata"))
    if "kubernetes.io/config.mirror" in as_dict(metadata.get("annotations")):
        return True
    return any(
        as_str(as_dict(o).get("kind")) == "Node" for o in as_list(metadata.get("ownerReferences"))
    )


def kube_proxy_check(facts: ClusterFacts) -> Check:
    name = "kube-proxy"
    ds = facts.kube_proxy
    static = [p for p in facts.kube_proxy_pods if _is_static_pod(p)]
    if ds is not None:
        selector = as_dict(as_dict(as_dict(ds.get("spec")).get("template")).get("spec")).get(
            "nodeSelector"
        )
        if DISABLE_KUBE_PROXY_SELECTOR in as_dict(selector):
            return Check(
                name,
                Level.OK,
                f"DaemonSet {KUBE_PROXY} is disabled by Calico's operator "
                f"(nodeSelector {DISABLE_KUBE_PROXY_SELECTOR}): eBPF replaces it",
            )
        return Check(name, Level.OK, f"DaemonSet {KUBE_PROXY} is present")
    if static:
        return Check(
            name,
            Level.WARN,
            f"kube-proxy runs as {len(static)} static pod(s), not a DaemonSet",
            "the operator cannot turn static pods off: remove kube-proxy's manifest from each "
            "node's kubelet manifest directory once eBPF serves the Services",
        )
    if facts.calico_nodes:
        return Check(
            name,
            Level.WARN,
            f"no kube-proxy (no DaemonSet {KUBE_PROXY}, no static pods)",
            "fine once Calico's eBPF data plane serves the Services; before that, Calico's "
            "bootstrap needs kube-proxy running to reach the API server",
        )
    return Check(
        name,
        Level.FAIL,
        "no kube-proxy and no calico-node: nothing implements the kubernetes Service",
        "install kube-proxy before Calico: the eBPF bootstrap reads the Service through it",
    )


def kube_proxy_ready_check(ds: Body | None, snapshot: SnapshotResult) -> Check:
    if ds is None:
        return Check("kube-proxy-ready", Level.OK, "no kube-proxy DaemonSet to wait for")
    status = as_dict(ds.get("status"))
    ready, desired = as_int(status.get("numberReady")), as_int(status.get("desiredNumberScheduled"))
    if snapshot.kube_proxy.ready:
        return Check("kube-proxy-ready", Level.OK, f"{ready} of {desired} kube-proxy pods ready")
    return Check(
        "kube-proxy-ready",
        Level.WARN,
        f"{ready} of {desired} kube-proxy pods ready (or its rollout is not observed yet)",
        "until every node runs a ready kube-proxy, some nodes cannot reach Services: check "
        "`kubectl -n kube-system get pods -l k8s-app=kube-proxy`",
    )


def management_markers(ds: Body) -> list[str]:
    """Every sign that something outside the cluster's admins owns this object, in the order
    apilane.model.endpoints checks its own, then the others."""
    metadata = as_dict(ds.get("metadata"))
    labels, annotations = as_dict(metadata.get("labels")), as_dict(metadata.get("annotations"))
    label_keys = (*endpoints.MANAGED_BY_LABELS, *EXTRA_MANAGED_BY_LABELS)
    annotation_keys = (*endpoints.MANAGED_BY_ANNOTATIONS, *EXTRA_MANAGED_BY_ANNOTATIONS)
    markers = [f"label:{key}={labels[key]}" for key in label_keys if key in labels]
    markers += [f"annotation:{key}" for key in annotation_keys if key in annotations]
    for owner in as_list(metadata.get("ownerReferences")):
        ref = as_dict(owner)
        markers.append(f"ownerReference:{as_str(ref.get('kind'))}/{as_str(ref.get('name'))}")
    managers = {
        as_str(as_dict(entry).get("manager")) for entry in as_list(metadata.get("managedFields"))
    }
    markers += [f"fieldManager:{m}({who})" for m, who in MANAGER_FIELD_OWNERS if m in managers]
    return markers


def _seen_by_operator(marker: str) -> bool:
    return any(marker.startswith(seen) for seen in OPERATOR_SEEN_MARKERS)


def kube_proxy_manager_check(ds: Body | None) -> Check:
    name = "kube-proxy-manager"
    if ds is None:
        return Check(name, Level.OK, "no kube-proxy DaemonSet: nothing manages one")
    markers = management_markers(ds)
    if not markers:
        return Check(
            name,
            Level.OK,
            "kube-proxy is not managed by anything else: Calico's operator may disable it "
            "(kubeProxyManagement: Enabled)",
        )
    unseen = [m for m in markers if not _seen_by_operator(m)]
    advice = (
        "set the Installation's kubeProxyManagement to Disabled and "
        "bpfKubeProxyIptablesCleanupEnabled to false, and turn kube-proxy off through its "
        "manager instead"
    )
    if unseen and len(unseen) == len(markers):
        advice += (
            f"; the operator does not recognise {', '.join(unseen)}: with kubeProxyManagement "
            "Enabled it would patch kube-proxy and fight that manager"
        )
    return Check(
        name, Level.WARN, f"kube-proxy is managed externally: {', '.join(markers)}", advice
    )


def provider_check(snapshot: SnapshotResult) -> Check:
    found = _findings(snapshot, WarningReason.MANAGED_CONTROL_PLANE)
    if not snapshot.managed_provider or not found:
        return Check("managed-provider", Level.OK, "no managed Kubernetes offering detected")
    detail = found[0].detail
    return Check(
        "managed-provider",
        Level.WARN,
        f"managed Kubernetes: {snapshot.managed_provider} ({detail.get('marker', '')} on node "
        f"{detail.get('node', '')})",
        "the API server lives outside the cluster and its endpoints may change without "
        "notice: Calico warns that its automatic eBPF bootstrap may misbehave here; keep "
        "apilane's discovery running so every change reaches the nodes",
    )


def _node_networks(
    nodes: Sequence[Body],
) -> tuple[set[str], list[ipaddress.IPv4Network | ipaddress.IPv6Network]]:
    addresses: set[str] = set()
    networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    for node in nodes:
        for address in as_list(as_dict(node.get("status")).get("addresses")):
            value = as_str(as_dict(address).get("address"))
            try:
                addresses.add(ipaddress.ip_address(value).compressed)
            except ValueError:
                continue  # a Hostname entry
        spec = as_dict(node.get("spec"))
        for cidr in {*map(as_str, as_list(spec.get("podCIDRs"))), as_str(spec.get("podCIDR"))} - {
            ""
        }:
            try:
                networks.append(ipaddress.ip_network(cidr, strict=False))
            except ValueError:
                continue
    return addresses, networks


def _inside(
    ip: str, addresses: set[str], networks: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]
) -> bool:
    address = ipaddress.ip_address(ip)
    return ip in addresses or any(address in network for network in networks)


def apiserver_location_check(nodes: Sequence[Body], snapshot: SnapshotResult) -> Check:
    name = "apiserver-location"
    ips = sorted({e.ip for e in snapshot.apiserver_endpoints})
    if not ips:
        return Check(name, Level.OK, "no API server endpoint to locate")
    addresses, networks = _node_networks(nodes)
    if not addresses and not networks:
        return Check(
            name,
            Level.WARN,
            "no Node reports an address or a pod CIDR: cannot tell whether the API server is "
            "in the cluster",
            "register the nodes (or run the doctor once they are)",
        )
    outside = [ip for ip in ips if not _inside(ip, addresses, networks)]
    if not outside:
        return Check(
            name, Level.OK, f"every API server endpoint is a node or pod address: {', '.join(ips)}"
        )
    return Check(
        name,
        Level.WARN,
        f"API server endpoint(s) outside the node and pod addresses: {', '.join(outside)}",
        "an external API server (a managed control plane, a load balancer) can change its "
        "addresses without the cluster seeing it: keep discovery running and check the "
        "endpoints it publishes (apilane status)",
    )


def _owner(ds: Body) -> str:
    owners = [as_dict(o) for o in as_list(as_dict(ds.get("metadata")).get("ownerReferences"))]
    return ", ".join(f"{as_str(o.get('kind'))}/{as_str(o.get('name'))}" for o in owners) or "none"


def calico_node_layout(facts: ClusterFacts) -> str:
    """ "operator" (calico-system, owned by the operator's Installation or with the operator
    running), "manifest" (kube-system), "both" or "none"."""
    operator = OPERATOR_CALICO_NODE in facts.calico_nodes
    manifest = MANIFEST_CALICO_NODE in facts.calico_nodes
    return {(True, False): "operator", (False, True): "manifest", (True, True): "both"}.get(
        (operator, manifest), "none"
    )


def calico_node_check(facts: ClusterFacts) -> Check:
    layout = calico_node_layout(facts)
    name = "calico-node"
    if layout == "none":
        return Check(
            name,
            Level.WARN,
            f"no calico-node DaemonSet ({OPERATOR_CALICO_NODE} or {MANIFEST_CALICO_NODE})",
            "install Calico (operator: Installation with linuxDataplane BPF; manifest: "
            "calico.yaml) before apilane has anything to render into",
        )
    if layout == "both":
        return Check(
            name,
            Level.WARN,
            f"two calico-node DaemonSets: {OPERATOR_CALICO_NODE} and {MANIFEST_CALICO_NODE}",
            "an operator install beside a manifest one (a half-done migration?): remove one",
        )
    if layout == "manifest":
        ds = facts.calico_nodes[MANIFEST_CALICO_NODE]
        return Check(
            name,
            Level.OK,
            f"manifest install: {MANIFEST_CALICO_NODE} (owner: {_owner(ds)}); the operator's "
            "bootstrap does not apply, apilane's renderer (or `apilane render manifest`) sets "
            "the env",
        )
    ds = facts.calico_nodes[OPERATOR_CALICO_NODE]
    owner = _owner(ds)
    if "Installation/" not in owner and facts.tigera_operator is None:
        return Check(
            name,
            Level.WARN,
            f"{OPERATOR_CALICO_NODE} (owner: {owner}) without the Tigera operator "
            f"({TIGERA_OPERATOR} is missing)",
            "calico-system is the operator's namespace: install the operator, or move to a "
            "manifest install",
        )
    return Check(name, Level.OK, f"operator install: {OPERATOR_CALICO_NODE} (owner: {owner})")


@dataclass(frozen=True)
class InstallationSettings:
    """The Installation's eBPF settings, with the operator's defaults for unset ones."""

    dataplane: str
    bootstrap: str
    kube_proxy_management: str

    @classmethod
    def of(cls, installation: Body) -> InstallationSettings:
        network = as_dict(as_dict(installation.get("spec")).get("calicoNetwork"))
        return cls(
            dataplane=as_str(network.get("linuxDataplane")) or "Iptables",
            bootstrap=as_str(network.get("bpfNetworkBootstrap")) or "Disabled",
            kube_proxy_management=as_str(network.get("kubeProxyManagement")) or "Disabled",
        )

    def __str__(self) -> str:
        return (
            f"linuxDataplane {self.dataplane}, bpfNetworkBootstrap {self.bootstrap}, "
            f"kubeProxyManagement {self.kube_proxy_management}"
        )


def installation_problem(facts: ClusterFacts, settings: InstallationSettings) -> Check | None:
    """The first way these settings contradict the cluster (Calico v3.31's three conditions
    for its automatic bootstrap, and apilane's renderer writing the same env), or None."""
    name = "calico-installation"
    markers = management_markers(facts.kube_proxy) if facts.kube_proxy is not None else []
    if settings.kube_proxy_management == "Enabled" and markers:
        return Check(
            name,
            Level.FAIL,
            f"kubeProxyManagement is Enabled but kube-proxy is managed by {', '.join(markers)}",
            "set kubeProxyManagement Disabled and bpfKubeProxyIptablesCleanupEnabled false: "
            "the operator goes Degraded on the markers it knows and fights the others",
        )
    if settings.bootstrap != "Enabled":
        return None
    if settings.dataplane != "BPF":
        return Check(
            name,
            Level.WARN,
            f"bpfNetworkBootstrap is Enabled with linuxDataplane {settings.dataplane}",
            "the bootstrap only applies to linuxDataplane BPF: set it, or the bootstrap off",
        )
    if facts.kube_proxy is None:
        return Check(
            name,
            Level.WARN,
            "bpfNetworkBootstrap is Enabled but no kube-proxy DaemonSet runs",
            "the operator learns the API server through kube-proxy's Service before it turns "
            "kube-proxy off: install kube-proxy first, or configure the endpoints by hand",
        )
    if facts.renderer_target == OPERATOR_CALICO_NODE:
        return Check(
            name,
            Level.WARN,
            "bpfNetworkBootstrap is Enabled and apilane's renderer patches "
            f"{OPERATOR_CALICO_NODE}: both write KUBERNETES_SERVICE_IPS_PORTS and "
            "KUBERNETES_APISERVER_ENDPOINTS",
            "let one of them own the env: set bpfNetworkBootstrap Disabled to keep apilane's "
            "watched values (the operator refreshes its own only on a reconcile)",
        )
    return None


def installation_check(facts: ClusterFacts) -> Check:
    if facts.installation is None:
        return Check(
            "calico-installation",
            Level.OK,
            "no Tigera operator Installation (not an operator install)",
        )
    settings = InstallationSettings.of(facts.installation)
    problem = installation_problem(facts, settings)
    return problem or Check("calico-installation", Level.OK, f"Installation default: {settings}")


def renderer_target_check(facts: ClusterFacts) -> Check:
    target = facts.renderer_target
    if target in facts.calico_nodes or not facts.calico_nodes:
        present = "present" if target in facts.calico_nodes else "not there yet"
        return Check(
            "renderer-target", Level.OK, f"apilane's renderer patches {target} ({present})"
        )
    found = ", ".join(sorted(facts.calico_nodes))
    return Check(
        "renderer-target",
        Level.FAIL,
        f"apilane's renderer patches {target}, which does not exist (calico-node is {found})",
        "point the renderer at it: APILANE_TARGET_NAMESPACE and APILANE_TARGET_DAEMONSET "
        f"(the chart's renderer.target) = {found.split(', ')[0]}",
    )


# --------------------------------------------------------------------------- node facts

# Every cgroup hook the node-loader attaches; getpeername4/6 came last, in Linux 5.8.
MIN_KERNEL: Final = (5, 8)
MIN_KERNEL_WHY: Final = "the cgroup connect, sendmsg, recvmsg and getpeername hooks"
BPFFS: Final = "/sys/fs/bpf"


@dataclass(frozen=True, kw_only=True)
class Mount:
    point: str
    fstype: str


@dataclass(frozen=True, kw_only=True)
class NodeFacts:
    """What the machine the doctor runs on offers."""

    mounts: Sequence[Mount]
    kernel_release: str  # uname -r
    # /lib/modules/<release>/build: whether it exists, and the release its headers are for
    # ("" when unreadable).
    headers_dir: str = ""
    headers_present: bool = False
    headers_release: str = ""
    # CONFIG_IKHEADERS: /sys/kernel/kheaders.tar.xz (bcc can use it instead).
    kheaders: bool = False


def node_checks(facts: NodeFacts) -> list[Check]:
    return [bpffs_check(facts), cgroup2_check(facts), kernel_check(facts), headers_check(facts)]


def bpffs_check(facts: NodeFacts) -> Check:
    if any(m.point == BPFFS and m.fstype == "bpf" for m in facts.mounts):
        return Check("bpffs", Level.OK, f"bpffs is mounted at {BPFFS}")
    return Check(
        "bpffs",
        Level.FAIL,
        f"no bpffs at {BPFFS}: pinned NAT maps would not outlive the loader",
        f"mount -t bpf bpffs {BPFFS} (and add it to /etc/fstab, or mount it from the DaemonSet)",
    )


def cgroup2_check(facts: NodeFacts) -> Check:
    found = sorted(m.point for m in facts.mounts if m.fstype == "cgroup2")
    if not found:
        return Check(
            "cgroup2",
            Level.FAIL,
            "no cgroup v2 hierarchy is mounted: connect-time programs have nowhere to attach",
            "boot with systemd.unified_cgroup_hierarchy=1, or mount -t cgroup2 none "
            "/sys/fs/cgroup/unified",
        )
    mode = "unified" if "/sys/fs/cgroup" in found else "hybrid"
    return Check("cgroup2", Level.OK, f"cgroup v2 at {', '.join(found)} ({mode})")


_RELEASE: Final = re.compile(r"^(\d+)\.(\d+)")


def kernel_version(release: str) -> tuple[int, int] | None:
    match = _RELEASE.match(release)
    return (int(match.group(1)), int(match.group(2))) if match else None


def kernel_check(facts: NodeFacts) -> Check:
    version = kernel_version(facts.kernel_release)
    need = ".".join(map(str, MIN_KERNEL))
    if version is None:
        return Check(
            "kernel",
            Level.WARN,
            f"cannot read a version from the kernel release {facts.kernel_release!r}",
            f"make sure the kernel is {need} or later ({MIN_KERNEL_WHY})",
        )
    if version < MIN_KERNEL:
        return Check(
            "kernel",
            Level.FAIL,
            f"kernel {facts.kernel_release} is older than {need}",
            f"upgrade to {need} or later: {MIN_KERNEL_WHY} need it",
        )
    return Check(
        "kernel", Level.OK, f"kernel {facts.kernel_release} (needs {need}: {MIN_KERNEL_WHY})"
    )


def headers_check(facts: NodeFacts) -> Check:
    if facts.headers_present:
        if facts.headers_release and facts.headers_release != facts.kernel_release:
            return Check(
                "kernel-headers",
                Level.WARN,
                f"{facts.headers_dir} holds headers for {facts.headers_release}, not for the "
                f"running {facts.kernel_release}",
                "install the headers of the running kernel "
                f"(linux-headers-{facts.kernel_release}): "
                "bcc compiles against these, and struct layouts may differ",
            )
        return Check("kernel-headers", Level.OK, f"kernel headers at {facts.headers_dir}")
    if facts.kheaders:
        return Check("kernel-headers", Level.OK, "kernel headers from /sys/kernel/kheaders.tar.xz")
    return Check(
        "kernel-headers",
        Level.FAIL,
        f"no kernel headers for {facts.kernel_release} "
        f"(no {facts.headers_dir or '/lib/modules/<release>/build'}, "
        "no /sys/kernel/kheaders.tar.xz): bcc cannot compile the programs",
        f"install linux-headers-{facts.kernel_release} (or load the kheaders module)",
    )


# --------------------------------------------------------------------------- output


def render_text(checks: Sequence[Check]) -> str:
    width = max((len(check.name) for check in checks), default=0)
    lines = []
    for check in checks:
        line = f"{check.level.label:<4}  {check.name:<{width}}  {check.summary}"
        if check.advice:
            line += f"\n{'':<4}  {'':<{width}}  -> {check.advice}"
        lines.append(line)
    worst = Level(exit_code(checks))
    counts = {level: sum(1 for c in checks if c.level is level) for level in Level}
    lines.append(
        f"{worst.label}: {counts[Level.OK]} ok, {counts[Level.WARN]} warn, "
        f"{counts[Level.FAIL]} fail (exit {int(worst)})"
    )
    return "\n".join(lines)


def render_json(checks: Sequence[Check]) -> str:
    worst = Level(exit_code(checks))
    return json.dumps(
        {
            "result": worst.label,
            "exit_code": int(worst),
            "checks": [asdict(check) | {"level": check.level.label} for check in checks],
        },
        indent=2,
    )
