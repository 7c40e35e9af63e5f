"""A one-node Kubernetes cluster for the run-mode test of deploy/: real pods, real probes.

    etcd (loopback) + N kube-apiservers (each on an address of the test bridge, lease endpoint
    reconciler: the `kubernetes` Service lists every live one)
    kube-controller-manager, kube-scheduler, CoreDNS (on the bridge address, no forwarding)
    a kubelet on a containerd of its own (CRI), pods on a bridge CNI on a test-only subnet

The binaries come from tools/install-kube-binaries.sh (`node`) and tools/install-coredns.sh;
the images are the local ones (apilane.testing.images), imported into containerd under the
names deploy/ uses. There is no kube-proxy: containerd, and so every pod, runs inside a
dedicated child cgroup of the host's cgroup2 hierarchy (the kubelet's cgroupRoot), which is
where the node-loader pod attaches its connect-time programs. Pods reach the API server's
ClusterIP through apilane's own load balancer, and nothing is translated outside that cgroup.

The node's own components (kubelet, controller-manager, scheduler, CoreDNS) and the test's
admin client talk to the first apiserver at the bridge's own address; the others serve only
what reaches them through the `kubernetes` ClusterIP, so `kill_apiserver` can crash any but
the first while the node goes on. Each serving certificate names its apiserver
(`apilane.testing.ha.HAControlPlane.apiserver_name`), so a client can tell which one answered.

The pod network has no default route: pods reach each other, the bridge address (API server,
DNS) and the service range, nothing else. The host changes the kubelet makes (sysctls,
iptables chains, hard-coded directories, mounts, cgroups) are recorded before and undone at
`stop()`; `leftovers()` says what remains.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from apilane.testing.docker import DockerDaemon
from apilane.testing.ha import HAControlPlane
from apilane.testing.kube import (
    KUBERNETES_SANS,
    SERVICE_IPS,
    ApiServer,
    Etcd,
    find_kube_binaries,
    pick_test_subnet,
    stop_process,
)
from apilane.testing.pki import Pki
from apilane.testing.procs import ComponentMissing, pid_alive, start_process, tail

REPO = Path(__file__).resolve().parents[5]
CGROUP2 = Path("/sys/fs/cgroup/unified")
CGROUP_ROOT = Path("/sys/fs/cgroup")
SERVICE_RANGE = "10.96.0.0/16"
API_PORT = 6443
# The top addresses of the test subnet are never a pod's: the apiservers after the first, and
# addresses a test adds to the bridge (counted from the last host down).
RESERVED_ADDRESSES = 16
MAX_APISERVERS = 4
# The kubelet turns these on when it does not protect the kernel defaults; put back at stop.
KUBELET_SYSCTLS = ("kernel/panic", "kernel/panic_on_oops", "vm/overcommit_memory")
# Paths the kubelet and containerd's CNI use whatever their configuration says.
HARD_CODED_DIRS = (
    Path("/var/lib/kubelet"),
    Path("/var/log/pods"),
    Path("/var/log/containers"),
    Path("/var/lib/cni"),
)
NODE_READY_TIMEOUT = 120.0
IMAGE_NAMES = {
    # local image -> the name deploy/ (and containerd's sandbox_image) uses
    "pause": "docker.io/apilane-local/pause:local",
    "nats": "docker.io/library/nats:2.15.1-alpine",
    "discovery": "ghcr.io/apilane/discovery:0.1.0",
    "renderer": "ghcr.io/apilane/renderer:0.1.0",
    "node-loader": "ghcr.io/apilane/node-loader:0.1.0",
}


# --------------------------------------------------------------------------- pure core


def containerd_config(work: Path, *, sandbox_image: str, cni_conf_dir: Path) -> str:
    """containerd 1.6's config: own root/state/socket, CRI on runc with cgroupfs, and the
    one setting this VM needs (no CAP_SYS_RESOURCE: runc may not lower oom_score_adj)."""
    return f"""version = 2
root = "{work}/root"
state = "{work}/state"
[grpc]
  address = "{work}/containerd.sock"
[ttrpc]
  address = "{work}/containerd.sock.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{sandbox_image}"
  enable_selinux = false
  disable_apparmor = true
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{cni_conf_dir}"
"""


def cni_conflist(*, name: str, bridge: str, subnet: str, ipam_dir: Path) -> dict[str, Any]:
    """A bridge network whose routes reach the pod subnet and the service range only."""
    return {
        "cniVersion": "1.0.0",
        "name": name,
        "plugins": [
            {
                "type": "bridge",
                "bridge": bridge,
                "isGateway": True,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "dataDir": str(ipam_dir),
                    "ranges": [[{"subnet": subnet, "rangeEnd": str(pod_range_end(subnet))}]],
                    "routes": [{"dst": subnet}, {"dst": SERVICE_RANGE}],
                },
            }
        ],
    }


def pod_range_end(subnet: str) -> ipaddress.IPv4Address:
    """The last pod address: the RESERVED_ADDRESSES top hosts of the subnet are kept free."""
    return ipaddress.IPv4Network(subnet).broadcast_address - 1 - RESERVED_ADDRESSES


def apiserver_address(subnet: ipaddress.IPv4Network, index: int) -> str:
    """Apiserver `index`'s address: the first is the bridge's own (the subnet's first host),
    the others count down from the top reserved address (the last host stays a test's)."""
    if index == 0:
        return str(subnet.network_address + 1)
    return str(subnet.broadcast_address - 1 - index)


def kubelet_config(
    *, address: str, client_ca: Path, cgroup_root: str, pod_logs: Path, cluster_dns: str
) -> dict[str, Any]:
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": address,
        "port": 10250,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": 0,
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True},
            "x509": {"clientCAFile": str(client_ca)},
        },
        "authorization": {"mode": "Webhook"},
        "cgroupDriver": "cgroupfs",
        # Every pod below the dedicated child cgroup the node-loader attaches to.
        "cgroupRoot": cgroup_root,
        "failSwapOn": False,
        "failCgroupV1": False,
        "makeIPTablesUtilChains": False,
        "podLogsDir": str(pod_logs),
        "resolvConf": "/etc/resolv.conf",
        "registerNode": True,
        "serializeImagePulls": False,
        # Imported images are not pinned in containerd 1.6: never collect them.
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "evictionHard": {
            "memory.available": "100Mi",
            "nodefs.available": "1%",
            "imagefs.available": "1%",
            "nodefs.inodesFree": "1%",
        },
        "maxPods": 50,
        "clusterDNS": [cluster_dns],
        "clusterDomain": "cluster.local",
    }


def corefile(*, address: str, kubeconfig: Path) -> str:
    """Cluster names only: no `forward`, so nothing is looked up off the machine."""
    return f""".:53 {{
    bind {address}
    errors
    kubernetes cluster.local in-addr.arpa ip6.arpa {{
        kubeconfig {kubeconfig}
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }}
}}
"""


def _env(container: dict[str, Any], **values: str) -> None:
    """Set env vars of a container spec (replacing same-named entries, keeping the order)."""
    env = [e for e in container.get("env", []) if e["name"] not in values]
    container["env"] = env + [{"name": k, "value": v} for k, v in values.items()]


def local_values(
    documents: Sequence[dict[str, Any]], *, cgroup_name: str, api_address: str
) -> list[dict[str, Any]]:
    """deploy/ with the values of this one-node test cluster; everything else as shipped.

    - apilane-config: no trace exporter (there is no collector in the cluster);
    - node-loader: the host's cgroup2 hierarchy is at /sys/fs/cgroup/unified here, and the
      programs attach to the cluster's child cgroup, never the root (APILANE_ALLOW_ROOT_CGROUP
      off); its pin dir and state dir are the cluster's own; bpffs without mount
      propagation (the loader mounts nothing, and this host's /sys/fs/bpf is not shared);
    - discovery: it is where the API server endpoints come from, so it bootstraps from the
      API server's own address (every other pod reaches the ClusterIP through the LB);
    - demo DaemonSets (calico-node, kube-proxy): no pods (their images do not exist here).
    """
    out = [json.loads(json.dumps(doc)) for doc in documents]
    for doc in out:
        kind, name = doc["kind"], doc["metadata"]["name"]
        if kind == "ConfigMap" and name == "apilane-config":
            doc["data"]["OTEL_TRACES_EXPORTER"] = "none"
        if kind not in ("DaemonSet", "Deployment"):
            continue
        spec = doc["spec"]["template"]["spec"]
        if name == "apilane-node-loader":
            _node_loader_values(spec, cgroup_name)
        elif name == "apilane-discovery":
            _env(spec["containers"][0], KUBERNETES_SERVICE_HOST=api_address,
                 KUBERNETES_SERVICE_PORT=str(API_PORT))  # fmt: skip
        elif doc["metadata"].get("labels", {}).get("app.kubernetes.io/part-of") == "apilane-demo":
            spec["nodeSelector"] = {"apilane.dev/demo-only": "never-scheduled"}
    return out


def _node_loader_values(spec: dict[str, Any], cgroup_name: str) -> None:
    container = spec["containers"][0]
    _env(
        container,
        APILANE_CGROUP_PATH=f"/host/sys/fs/cgroup/{cgroup_name}",
        APILANE_ALLOW_ROOT_CGROUP="false",
        APILANE_BPF_PIN_DIR=f"/sys/fs/bpf/{cgroup_name}",
    )
    for mount in container["volumeMounts"]:
        if mount["name"] == "bpffs":
            mount.pop("mountPropagation", None)
    for volume in spec["volumes"]:
        if volume["name"] == "cgroup":
            volume["hostPath"]["path"] = str(CGROUP2)
        if volume["name"] == "run-apilane":
            volume["hostPath"]["path"] = f"/run/{cgroup_name}"


# What the stand-in calico-node's containers run: print the two variables the renderer writes
# (the test reads them back from the pod's logs), then wait for SIGTERM, ending at once.
_SHOW_ENDPOINTS = (
    'echo "KUBERNETES_SERVICE_IPS_PORTS=$KUBERNETES_SERVICE_IPS_PORTS'
    ' KUBERNETES_APISERVER_ENDPOINTS=$KUBERNETES_APISERVER_ENDPOINTS"'
)
_WAIT_FOR_TERM = "trap 'exit 0' TERM; while :; do sleep 1 & wait $!; done"


def running_calico_node(documents: Sequence[dict[str, Any]], *, image: str) -> list[dict[str, Any]]:
    """The demo calico-node DaemonSet made to run here: every container on `image` (a local
    one with a shell), printing the two endpoint variables and, but for the init container,
    staying up; on the pod network (it serves nothing); scheduled. Its env is as shipped, so
    the renderer targets it as it would the real one. Everything else is left as it is."""
    out = [json.loads(json.dumps(doc)) for doc in documents]
    for doc in out:
        if (doc["kind"], doc["metadata"]["name"]) != ("DaemonSet", "calico-node"):
            continue
        spec = doc["spec"]["template"]["spec"]
        spec.pop("nodeSelector", None)
        spec["hostNetwork"] = False
        spec["terminationGracePeriodSeconds"] = 2
        for kind in ("initContainers", "containers"):
            for container in spec.get(kind, []):
                script = _SHOW_ENDPOINTS
                if kind == "initContainers":
                    script += ' && test -n "$KUBERNETES_APISERVER_ENDPOINTS"'
                else:
                    script += f"; {_WAIT_FOR_TERM}"
                container["image"] = image
                container["imagePullPolicy"] = "IfNotPresent"
                container["command"] = ["/bin/sh", "-c", script]
                container["resources"] = {"requests": {"cpu": "1m", "memory": "8Mi"}}
    return out


def nats_volumes(
    work: Path, *, replicas: int = 3, namespace: str = "apilane"
) -> list[dict[str, Any]]:
    """hostPath PersistentVolumes pre-bound to the NATS StatefulSet's claims (data-nats-N):
    the test cluster has no storage provisioner."""
    return [
        {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": f"apilane-test-nats-{index}"},
            "spec": {
                "capacity": {"storage": "2Gi"},
                "accessModes": ["ReadWriteOnce"],
                "persistentVolumeReclaimPolicy": "Retain",
                "hostPath": {"path": str(work / f"nats-{index}"), "type": "DirectoryOrCreate"},
                "claimRef": {"namespace": namespace, "name": f"data-nats-{index}"},
            },
        }
        for index in range(replicas)
    ]


BUILTIN_CHAINS = frozenset({"INPUT", "OUTPUT", "FORWARD", "PREROUTING", "POSTROUTING"})


def iptables_chains(saved: str) -> set[tuple[str, str]]:
    """(table, chain) pairs of the user-defined chains in an iptables-save dump (a table's
    built-in chains appear as soon as anything loads the table, so they say nothing)."""
    chains: set[tuple[str, str]] = set()
    table = ""
    for line in saved.splitlines():
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith(":") and line[1:].split()[0] not in BUILTIN_CHAINS:
            chains.add((table, line[1:].split()[0]))
    return chains


def child_cgroups(name: str, root: Path = CGROUP_ROOT) -> list[Path]:
    """Every directory of cgroup `name` (and below) in every hierarchy, deepest first."""
    found: list[Path] = []
    for hierarchy in sorted(root.iterdir()):
        top = hierarchy / name
        if top.is_dir():
            found += [Path(path) for path, _, _ in os.walk(top)]
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


# --------------------------------------------------------------------------- I/O


def _run(argv: Sequence[str], *, check: bool = True, **kwargs: Any) -> str:
    result = subprocess.run(list(argv), capture_output=True, text=True, check=False, **kwargs)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr}")
    return str(result.stdout)


def _saved_chains() -> dict[str, set[tuple[str, str]]]:
    return {
        tool: iptables_chains(_run([f"{tool}-save"], check=False))
        for tool in ("iptables", "ip6tables")
    }


def find_node_binaries() -> dict[str, Path]:
    kube = find_kube_binaries()
    binaries = {
        name: kube / name for name in ("kubelet", "kube-controller-manager", "kube-scheduler")
    }
    missing = [name for name, path in binaries.items() if not os.access(path, os.X_OK)]
    if missing:
        raise ComponentMissing(
            f"{', '.join(missing)} not found in {kube}: run `bash tools/install-kube-binaries.sh node`"
        )
    coredns = _run(["bash", str(REPO / "tools" / "install-coredns.sh")], check=False).strip()
    if not coredns or not os.access(coredns, os.X_OK):
        raise ComponentMissing("CoreDNS could not be built: run `bash tools/install-coredns.sh`")
    binaries["coredns"] = Path(coredns)
    for tool in ("containerd", "ctr", "runc"):
        if shutil.which(tool) is None:
            raise ComponentMissing(f"{tool} is missing: run `make setup` (tools/setup-docker.sh)")
    if not Path("/usr/lib/cni/bridge").exists():
        raise ComponentMissing("the CNI plugins are missing: run `make setup`")
    return binaries


@dataclass
class HostRecord:
    """What the cluster may change on the host, as it was before."""

    sysctls: dict[str, str] = field(default_factory=dict)
    chains: dict[str, set[tuple[str, str]]] = field(default_factory=dict)
    dirs: dict[Path, bool] = field(default_factory=dict)
    netns: set[str] = field(default_factory=set)

    @classmethod
    def take(cls) -> HostRecord:
        netns = Path("/run/netns")
        return cls(
            sysctls={k: Path("/proc/sys", k).read_text().strip() for k in KUBELET_SYSCTLS},
            chains=_saved_chains(),
            dirs={d: d.exists() for d in HARD_CODED_DIRS},
            netns={p.name for p in netns.iterdir()} if netns.is_dir() else set(),
        )


class OneNodeCluster:
    """Start with `start()` (or as a context manager); `stop()` undoes everything."""

    def __init__(
        self, daemon: DockerDaemon, *, node: str = "apilane-node", apiservers: int = 1
    ) -> None:
        if not 1 <= apiservers <= MAX_APISERVERS:
            raise ValueError(f"apiservers must be between 1 and {MAX_APISERVERS}")
        self.daemon = daemon
        self.node = node
        self.binaries = find_node_binaries()
        self.kube_dir = find_kube_binaries()
        self.id = secrets.token_hex(3)
        self.work = Path(tempfile.mkdtemp(prefix="apilane-cluster-", dir="/var/tmp"))
        self.bridge = f"apl{self.id}"
        self.subnet = pick_test_subnet()
        self.address = apiserver_address(self.subnet, 0)
        self.apiserver_count = apiservers
        self.cgroup_name = f"apilane-cluster-{self.id}"
        self.cgroup = CGROUP2 / self.cgroup_name
        self.pin_dir = Path("/sys/fs/bpf") / self.cgroup_name
        self.state_dir = Path("/run") / self.cgroup_name
        self.pki = Pki(self.work / "pki")
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.record: HostRecord | None = None
        self.forward_rule = ["FORWARD", "-i", self.bridge, "-o", self.bridge, "-j", "ACCEPT"]
        self.timings: dict[str, float] = {}
        self.etcd: Etcd | None = None
        # The first is `apiserver`, the one the node's components use; all in start order.
        self.apiservers: list[ApiServer] = []
        self.apiserver_pids: list[int] = []

    # ----------------------------------------------------------------- start

    def start(self) -> OneNodeCluster:
        started = time.monotonic()
        self.record = HostRecord.take()
        try:
            self._network()
            self._control_plane()
            self._containerd()
            self._import_images()
            self._node()
            self._await_apiservers()
        except BaseException:
            self.stop()
            raise
        self.timings["ready"] = time.monotonic() - started
        return self

    def _network(self) -> None:
        _run(["ip", "link", "add", self.bridge, "type", "bridge"])
        _run(["ip", "addr", "add", f"{self.address}/{self.subnet.prefixlen}", "dev", self.bridge])
        _run(["ip", "link", "set", self.bridge, "up"])
        # Bridged frames pass through FORWARD (bridge-nf-call-iptables): let ours through.
        _run(["iptables", "-I", *self.forward_rule[:1], "1", *self.forward_rule[1:]])
        self._cgroups()

    def _cgroups(self) -> None:
        """The child cgroup in every hierarchy: the kubelet refuses a cgroupRoot missing from
        one. A new cpuset starts empty, so it gets its parent's CPUs and memory nodes."""
        for hierarchy in sorted(CGROUP_ROOT.iterdir()):
            if not (hierarchy / "cgroup.procs").exists():
                continue
            child = hierarchy / self.cgroup_name
            child.mkdir()
            for setting in ("cpuset.cpus", "cpuset.mems"):
                if (hierarchy / setting).exists():
                    (child / setting).write_text((hierarchy / setting).read_text())

    def _log(self, name: str) -> Path:
        return self.work / f"{name}.log"

    def _spawn(self, name: str, argv: Sequence[str], *, cgroup: Path | None = None) -> None:
        if cgroup is not None:
            argv = ["sh", "-c", f'echo $$ > {cgroup}/cgroup.procs && exec "$@"', "sh", *argv]
        self.procs[name] = start_process(argv, log_path=self._log(name))

    def kubeconfig(self, user: str, groups: Sequence[str] = ()) -> Path:
        path = self.work / f"{user.replace(':', '-')}.kubeconfig"
        return self.pki.kubeconfig(
            path, server=f"https://{self.address}:{API_PORT}", user=user, groups=groups
        )

    @property
    def apiserver(self) -> ApiServer | None:
        """The first apiserver: the node's components and the admin kubeconfig use it."""
        return self.apiservers[0] if self.apiservers else None

    @property
    def apiserver_addresses(self) -> list[str]:
        """The addresses of the apiservers running now, in start order."""
        return [a.bind_address for a in self.apiservers if a.running]

    def _launch_apiserver(self, sa_keys: tuple[Path, Path]) -> ApiServer:
        assert self.etcd is not None
        index = len(self.apiservers)
        address = apiserver_address(self.subnet, index)
        if index > 0:  # the first is the bridge's own address
            _run(["ip", "addr", "add", f"{address}/32", "dev", self.bridge])
        name = HAControlPlane.apiserver_name(index)
        serving = self.pki.issue(
            name,
            common_name=name,
            dns_names=KUBERNETES_SANS,
            ip_addresses=(address, "127.0.0.1", *SERVICE_IPS),
            server=True,
        )
        apiserver = ApiServer(
            binary_dir=self.kube_dir,
            work_dir=self.work,
            etcd_url=self.etcd.url,
            pki=self.pki,
            serving=serving,
            sa_private=sa_keys[0],
            sa_public=sa_keys[1],
            bind_address=address,
            port=API_PORT,
            reconciler="lease",
            # Its identity Lease is named after its hostname: one of its own but for the first.
            hostname=name if index > 0 else None,
        )
        self.apiservers.append(apiserver)
        apiserver.start()
        assert apiserver.proc is not None
        self.apiserver_pids.append(apiserver.proc.pid)
        return apiserver

    def _await_apiservers(self) -> None:
        """The apiservers after the first (launched with it, ready by now, as a rule)."""
        started = time.monotonic()
        for apiserver in self.apiservers[1:]:
            apiserver.wait_ready()
        self.timings["other apiservers"] = time.monotonic() - started

    def kill_apiserver(self, index: int) -> int:
        """SIGKILL apiserver `index` (by the pid the cluster started): a crash. Returns the pid.
        Never the first: the node's components would lose their API server."""
        if index == 0:
            raise ValueError("the first apiserver is the node's: kill another one")
        proc = self.apiservers[index].proc
        if proc is None or proc.poll() is not None:
            raise RuntimeError(f"apiserver {index} is not running")
        self.apiservers[index].stop(graceful=False)
        return proc.pid

    def _control_plane(self) -> None:
        sa_keys = self.pki.service_account_keys()
        self.etcd = Etcd(binary_dir=self.kube_dir, data_dir=self.work / "etcd")
        self.etcd.start()
        first = self._launch_apiserver(sa_keys)
        first.wait_ready()
        # The others only once the first has bootstrapped etcd (apiservers bootstrapping a fresh
        # etcd together race on the `kubernetes` ClusterIP), and ready by the end of start().
        for _ in range(1, self.apiserver_count):
            self._launch_apiserver(sa_keys)
        sa_private, _ = sa_keys
        self.admin_kubeconfig = self.kubeconfig("admin", ("system:masters",))
        kcm = self.kubeconfig("system:kube-controller-manager")
        self._spawn(
            "kube-controller-manager",
            [
                str(self.binaries["kube-controller-manager"]),
                f"--kubeconfig={kcm}", f"--authentication-kubeconfig={kcm}",
                f"--authorization-kubeconfig={kcm}",
                f"--service-account-private-key-file={sa_private}",
                f"--root-ca-file={self.pki.ca_path}", "--use-service-account-credentials=true",
                "--leader-elect=false", "--bind-address=127.0.0.1", "--secure-port=0",
                f"--cert-dir={self.work / 'kcm-certs'}", "--allocate-node-cidrs=false",
                "--v=1",
            ],
        )  # fmt: skip
        scheduler = self.kubeconfig("system:kube-scheduler")
        self._spawn(
            "kube-scheduler",
            [
                str(self.binaries["kube-scheduler"]),
                f"--kubeconfig={scheduler}", f"--authentication-kubeconfig={scheduler}",
                f"--authorization-kubeconfig={scheduler}", "--leader-elect=false",
                "--bind-address=127.0.0.1", "--secure-port=0",
                f"--cert-dir={self.work / 'scheduler-certs'}", "--v=1",
            ],
        )  # fmt: skip
        (self.work / "Corefile").write_text(
            corefile(address=self.address, kubeconfig=self.admin_kubeconfig)
        )
        self._spawn(
            "coredns", [str(self.binaries["coredns"]), "-conf", str(self.work / "Corefile")]
        )

    @property
    def containerd_socket(self) -> Path:
        return self.work / "containerd" / "containerd.sock"

    def ctr(self, *args: str, stdin: Any = None, check: bool = True) -> str:
        return _run(
            ["ctr", "--address", str(self.containerd_socket), "--namespace", "k8s.io", *args],
            stdin=stdin,
            check=check,
        )

    def _containerd(self) -> None:
        directory = self.work / "containerd"
        cni_dir = self.work / "cni" / "net.d"
        cni_dir.mkdir(parents=True)
        (cni_dir / "10-apilane.conflist").write_text(
            json.dumps(
                cni_conflist(
                    name=f"apilane-{self.id}",
                    bridge=self.bridge,
                    subnet=str(self.subnet),
                    ipam_dir=self.work / "cni" / "ipam",
                )
            )
        )
        directory.mkdir()
        config = directory / "config.toml"
        config.write_text(
            containerd_config(directory, sandbox_image=IMAGE_NAMES["pause"], cni_conf_dir=cni_dir)
        )
        # In the dedicated child cgroup: every shim, so every pod, is below it.
        self._spawn("containerd", ["containerd", "--config", str(config)], cgroup=self.cgroup)
        deadline = time.monotonic() + 30
        while self.ctr("version", check=False) == "":
            if time.monotonic() > deadline or self.procs["containerd"].poll() is not None:
                raise RuntimeError(f"containerd did not start:\n{tail(self._log('containerd'))}")
            time.sleep(0.2)

    def _import_images(self) -> None:
        started = time.monotonic()
        for local, name in IMAGE_NAMES.items():
            saved = subprocess.Popen(
                ["docker", "save", f"apilane-local/{local}:local"],
                env=self.daemon.env(),
                stdout=subprocess.PIPE,
            )
            self.ctr("images", "import", "--no-unpack", "-", stdin=saved.stdout)
            if saved.wait() != 0:
                raise RuntimeError(f"docker save apilane-local/{local}:local failed")
            imported = f"docker.io/apilane-local/{local}:local"
            if imported != name:
                self.ctr("images", "tag", "--force", imported, name)
        self.timings["image import"] = time.monotonic() - started

    def _node(self) -> None:
        kubelet_kubeconfig = self.kubeconfig(f"system:node:{self.node}", ("system:nodes",))
        config = self.work / "kubelet-config.yaml"
        config.write_text(
            yaml.safe_dump(
                kubelet_config(
                    address=self.address,
                    client_ca=self.pki.ca_path,
                    cgroup_root=f"/{self.cgroup_name}",
                    pod_logs=self.work / "pod-logs",
                    cluster_dns=self.address,
                )
            )
        )
        started = time.monotonic()
        self._spawn(
            "kubelet",
            [
                str(self.binaries["kubelet"]),
                f"--config={config}", f"--kubeconfig={kubelet_kubeconfig}",
                f"--root-dir={self.work / 'kubelet'}", f"--cert-dir={self.work / 'kubelet-certs'}",
                f"--hostname-override={self.node}", f"--node-ip={self.address}",
                f"--container-runtime-endpoint=unix://{self.containerd_socket}", "--v=1",
            ],
        )  # fmt: skip
        deadline = time.monotonic() + NODE_READY_TIMEOUT
        while not self._node_ready():
            if time.monotonic() > deadline or self.procs["kubelet"].poll() is not None:
                raise TimeoutError(f"node {self.node} not Ready:\n{tail(self._log('kubelet'))}")
            time.sleep(0.5)
        self.timings["node ready"] = time.monotonic() - started

    def kubectl_get(self, path: str) -> dict[str, Any]:
        """GET an API path with the admin identity (no kubectl: curl with the client cert)."""
        assert self.apiserver is not None and self.apiserver.admin is not None
        admin = self.apiserver.admin
        out = _run(
            [
                "curl", "-sS", "--fail", "--cacert", str(self.pki.ca_path),
                "--cert", str(admin.cert_path), "--key", str(admin.key_path),
                f"{self.apiserver.url}{path}",
            ],
            check=False,
        )  # fmt: skip
        return dict(json.loads(out)) if out else {}

    def _node_ready(self) -> bool:
        node = self.kubectl_get(f"/api/v1/nodes/{self.node}")
        conditions = node.get("status", {}).get("conditions", [])
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

    # ----------------------------------------------------------------- logs

    def pod_logs(self) -> dict[str, str]:
        """Every container log the kubelet wrote, by <namespace>_<pod>/<container>."""
        logs: dict[str, str] = {}
        root = self.work / "pod-logs"
        if root.is_dir():
            for path in sorted(root.glob("*/*/*.log")):
                key = f"{path.parts[-3]}/{path.parts[-2]}"
                logs[key] = logs.get(key, "") + path.read_text(errors="replace")
        return logs

    def component_logs(self) -> dict[str, str]:
        return {p.stem: tail(p, 60) for p in sorted(self.work.glob("*.log"))}

    # ----------------------------------------------------------------- stop

    def _remove_containers(self) -> None:
        if "containerd" not in self.procs or self.procs["containerd"].poll() is not None:
            return
        for task in self.ctr("tasks", "ls", "--quiet", check=False).split():
            self.ctr("tasks", "kill", "--signal", "SIGKILL", task, check=False)
        time.sleep(0.5)
        for task in self.ctr("tasks", "ls", "--quiet", check=False).split():
            self.ctr("tasks", "delete", "--force", task, check=False)
        for container in self.ctr("containers", "ls", "--quiet", check=False).split():
            self.ctr("containers", "delete", container, check=False)

    def stop(self) -> None:
        for name in ("kubelet", "coredns", "kube-scheduler", "kube-controller-manager"):
            stop_process(self.procs.pop(name, None))
        self._remove_containers()
        stop_process(self.procs.pop("containerd", None))
        for apiserver in self.apiservers:
            apiserver.stop()
        if self.etcd is not None:
            self.etcd.stop()
        self._uninstall_data_plane()
        self._restore_host()

    def _uninstall_data_plane(self) -> None:
        env = os.environ | {
            "APILANE_BPF_PIN_DIR": str(self.pin_dir),
            "APILANE_CGROUP_PATH": str(self.cgroup),
            "APILANE_STATE_DIR": str(self.state_dir / "node-loader"),
            "APILANE_NODE_NAME": self.node,
        }
        if self.pin_dir.exists():
            _run(
                [sys.executable, "-m", "apilane.node_loader", "uninstall"],
                env=env,
                check=False,
            )
        shutil.rmtree(self.state_dir, ignore_errors=True)

    def _restore_host(self) -> None:
        record = self.record
        # Mounts: the kubelet's root dir (bound onto itself), pod volumes, netns of pods.
        mountinfo = Path("/proc/self/mountinfo").read_text().splitlines()
        points = [line.split()[4] for line in mountinfo]
        ours = [p for p in points if p.startswith(str(self.work))]
        if record is not None:
            # Only pod namespaces (containerd names them cni-<id>): other tests running at the
            # same time create namespaces of their own, which are not ours to remove.
            ours += [
                p for p in points
                if p.startswith("/run/netns/cni-") and Path(p).name not in record.netns
            ]  # fmt: skip
        for point in sorted(set(ours), key=len, reverse=True):
            _run(["umount", "-l", point], check=False)
        if record is not None:
            for name in {Path(p).name for p in ours if p.startswith("/run/netns/")}:
                with contextlib.suppress(OSError):
                    (Path("/run/netns") / name).unlink()
        for directory in child_cgroups(self.cgroup_name):
            with contextlib.suppress(OSError):
                directory.rmdir()
        _run(["iptables", "-D", *self.forward_rule], check=False)
        _run(["ip", "link", "del", self.bridge], check=False)
        if record is not None:
            self._restore_iptables(record)
            for key, value in record.sysctls.items():
                Path("/proc/sys", key).write_text(value)
            for directory, existed in record.dirs.items():
                if not existed:
                    shutil.rmtree(directory, ignore_errors=True)
        shutil.rmtree(self.work, ignore_errors=True)

    @staticmethod
    def _restore_iptables(record: HostRecord) -> None:
        for tool, before in record.chains.items():
            added = iptables_chains(_run([f"{tool}-save"], check=False)) - before
            for table, chain in sorted(added):
                # Unhook the chain wherever it is jumped to, then flush and delete it.
                rules = _run([f"{tool}-save", "-t", table], check=False).splitlines()
                for rule in rules:
                    if rule.startswith("-A ") and f"-j {chain}" in rule:
                        _run([tool, "-t", table, "-D", *rule[3:].split()], check=False)
                _run([tool, "-t", table, "-F", chain], check=False)
                _run([tool, "-t", table, "-X", chain], check=False)

    def leftovers(self) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {
            "processes": [n for n, p in self.procs.items() if p.poll() is None]
            + [f"kube-apiserver pid {pid}" for pid in self.apiserver_pids if pid_alive(pid)],
            "cgroups": [str(p) for p in child_cgroups(self.cgroup_name)],
            "pins": [str(self.pin_dir)] if self.pin_dir.exists() else [],
            "bridge": [self.bridge] if Path("/sys/class/net", self.bridge).exists() else [],
            "work": [str(self.work)] if self.work.exists() else [],
        }
        if self.record is not None:
            now = _saved_chains()
            found["iptables"] = [
                f"{tool} {t}/{c}"
                for tool in now
                for t, c in sorted(now[tool] - self.record.chains[tool])
            ]
            found["sysctls"] = [
                k
                for k, v in self.record.sysctls.items()
                if Path("/proc/sys", k).read_text().strip() != v
            ]
        return {kind: names for kind, names in found.items() if names}

    def __enter__(self) -> OneNodeCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def pod_address_network(cluster: OneNodeCluster) -> ipaddress.IPv4Network:
    return cluster.subnet
