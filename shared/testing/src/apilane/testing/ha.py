"""N real kube-apiservers on one etcd, each in a network namespace of its own (needs root).

The apiservers run with `--endpoint-reconciler-type=lease` and a distinct `--advertise-address`,
so they register themselves as the endpoints of Service default/kubernetes, exactly as in a
cluster: a gracefully stopped one removes its own lease at once, a killed one leaves when its
lease expires (15 s, the apiserver's fixed TTL) and another apiserver's reconcile loop (every
10 s) notices.

Topology, all on one test /24 from the benchmarking range 198.18.0.0/15 (RFC 2544) that no
interface or route of the machine uses yet:

    host  --veth-- [switch namespace: bridge] --veth-- apiserver namespace i  (.10+i)
    .1 (etcd listens here and on loopback)    --veth-- client namespace k     (.100+k)

The bridge lives in a namespace of its own (empty firewall), so nothing on the host forwards or
filters between namespaces. No namespace has a default route: an apiserver reaches only etcd,
and a client namespace reaches only the apiservers — a connect() to the service VIP from there
fails with ENETUNREACH unless a connect-time load balancer translated it.

Each apiserver has a serving certificate of its own (CN `kube-apiserver-<i>`), valid for the
`kubernetes` Service's names, the ClusterIPs and its own address, from one CA: a client verifies
any of them against `kubernetes.default.svc` and can tell from the certificate which one
answered. `state()` describes everything (pids, addresses, names) as plain JSON data.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apilane.kube.client import KubeClient
from apilane.testing.kube import (
    KUBERNETES_SANS,
    SERVICE_IPS,
    START_TIMES,
    ApiServer,
    Etcd,
    find_kube_binaries,
    pick_test_subnet,
)
from apilane.testing.pki import Pki
from apilane.testing.procs import ComponentMissing

log = logging.getLogger(__name__)

NETNS_DIR = Path("/run/netns")
APISERVER_PORT = 6443
# Host .1; apiservers from .10 (at most 80 over a plane's life); client namespaces from .100.
HOST_OFFSET = 1
APISERVER_OFFSET = 10
CLIENT_OFFSET = 100
MAX_APISERVERS = 80
MAX_CLIENTS = 100
# What every serving certificate is valid for besides its own address: what clients verify.
VERIFY_NAME = "kubernetes.default.svc"


def _run(argv: Sequence[str]) -> None:
    result = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {result.stderr.strip()}")


@dataclass(frozen=True)
class ClientNamespace:
    """A namespace on the plane's bridge for clients: its name, path and address."""

    name: str
    address: str

    @property
    def path(self) -> Path:
        return NETNS_DIR / self.name


class HAControlPlane:
    """etcd plus `count` kube-apiservers, each in its own namespace (see the module docstring).

    `kill_apiserver(i)` SIGKILLs one (a crash), `stop_apiserver(i)` stops one gracefully,
    `add_apiserver()` starts another at a new address; `client_namespace()` makes a namespace
    for clients. `stop()` ends every process by the pid it started and removes every namespace
    and link it created."""

    def __init__(self, count: int = 3, *, work_parent: Path | None = None) -> None:
        if os.geteuid() != 0:
            raise ComponentMissing("HAControlPlane needs root (network namespaces)")
        if not 1 <= count <= 8:
            raise ValueError("count must be between 1 and 8")
        self.count = count
        self.run_id = secrets.token_hex(3)
        self.binary_dir = find_kube_binaries()
        if work_parent is not None:
            work_parent.mkdir(parents=True, exist_ok=True)
        self.work_dir = Path(tempfile.mkdtemp(prefix="apilane-kube-ha-", dir=work_parent))
        self.subnet = pick_test_subnet()
        self.switch_netns = f"alkube-{self.run_id}-sw"
        self.host_link = f"al{self.run_id}h"
        self.host_address = self._address(HOST_OFFSET)
        self.pki = Pki(self.work_dir / "pki")
        self.sa_private, self.sa_public = self.pki.service_account_keys()
        self.etcd: Etcd | None = None
        self.apiservers: list[ApiServer] = []
        self.netns: list[str] = []
        self.kubeconfig_paths: list[Path] = []
        self.clients: list[ClientNamespace] = []
        self._created_netns: list[str] = []
        self._created_links: list[str] = []
        self.timings: dict[str, float] = {}

    # -- addresses and names

    def _address(self, offset: int) -> str:
        return str(self.subnet.network_address + offset)

    @property
    def prefix_length(self) -> int:
        return self.subnet.prefixlen

    @property
    def addresses(self) -> list[str]:
        """Every apiserver's address, in start order (stopped ones included)."""
        return [apiserver.bind_address for apiserver in self.apiservers]

    @property
    def running_addresses(self) -> list[str]:
        return [apiserver.bind_address for apiserver in self.apiservers if apiserver.running]

    @staticmethod
    def apiserver_name(index: int) -> str:
        """The CN of apiserver `index`'s serving certificate."""
        return f"kube-apiserver-{index}"

    @property
    def ca_path(self) -> Path:
        return self.pki.ca_path

    # -- network

    def setup_network(self) -> None:
        """The switch namespace with its bridge and the host's link to it (done by `start`)."""
        ns = self.switch_netns
        _run(["ip", "netns", "add", ns])
        self._created_netns.append(ns)
        _run(["ip", "-n", ns, "link", "add", "br0", "type", "bridge"])
        _run(["ip", "-n", ns, "link", "set", "br0", "up"])
        _run(["ip", "link", "add", self.host_link, "type", "veth", "peer", "name", "up0"])
        self._created_links.append(self.host_link)
        _run(["ip", "link", "set", "up0", "netns", ns])
        _run(["ip", "-n", ns, "link", "set", "up0", "master", "br0", "up"])
        _run(
            [
                "ip",
                "addr",
                "add",
                f"{self.host_address}/{self.prefix_length}",
                "dev",
                self.host_link,
            ]
        )
        _run(["ip", "link", "set", self.host_link, "up"])

    def _attach(self, ns: str, port: str, address: str) -> None:
        """A new namespace `ns` with `address` on a veth whose other end is bridge port `port`."""
        _run(["ip", "netns", "add", ns])
        self._created_netns.append(ns)
        switch = self.switch_netns
        _run(
            [
                "ip",
                "-n",
                switch,
                "link",
                "add",
                port,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                ns,
            ]
        )
        _run(["ip", "-n", switch, "link", "set", port, "master", "br0", "up"])
        _run(["ip", "-n", ns, "link", "set", "lo", "up"])
        _run(["ip", "-n", ns, "addr", "add", f"{address}/{self.prefix_length}", "dev", "eth0"])
        _run(["ip", "-n", ns, "link", "set", "eth0", "up"])

    def client_namespace(self) -> ClientNamespace:
        """A namespace on the bridge for a client (no default route; removed by `stop`)."""
        index = len(self.clients)
        if index >= MAX_CLIENTS:
            raise RuntimeError("no client addresses left on this plane")
        client = ClientNamespace(
            f"alkube-{self.run_id}-c{index}", self._address(CLIENT_OFFSET + index)
        )
        self._attach(client.name, f"c{index}", client.address)
        self.clients.append(client)
        return client

    # -- processes

    def start(self) -> HAControlPlane:
        started = time.monotonic()
        try:
            self.setup_network()
            self.etcd = Etcd(
                binary_dir=self.binary_dir,
                data_dir=self.work_dir / "etcd",
                client_hosts=("127.0.0.1", self.host_address),
            )
            self.timings["etcd"] = self.etcd.start()
            api_started = time.monotonic()
            # The first alone: apiservers bootstrapping one fresh etcd together race on the
            # `kubernetes` Service's ClusterIP allocation, and the loser exits.
            self.add_apiserver()
            for _ in range(1, self.count):
                self._launch_apiserver()
            for index in range(1, self.count):
                self._await_apiserver(index)
            self.timings["kube-apiservers"] = time.monotonic() - api_started
        except BaseException:
            self.stop()
            raise
        self.timings["total"] = time.monotonic() - started
        START_TIMES.append(
            (f"HA kube control plane ({self.count} apiservers)", self.timings["total"])
        )
        log.info("HA kube control plane ready", extra={"addresses": self.addresses, **self.timings})
        return self

    def _launch_apiserver(self) -> int:
        assert self.etcd is not None, "start() first"
        index = len(self.apiservers)
        if index >= MAX_APISERVERS:
            raise RuntimeError("no apiserver addresses left on this plane")
        address = self._address(APISERVER_OFFSET + index)
        ns = f"alkube-{self.run_id}-{index}"
        self._attach(ns, f"a{index}", address)
        self.netns.append(ns)
        serving = self.pki.issue(
            f"apiserver-{index}",
            common_name=self.apiserver_name(index),
            dns_names=KUBERNETES_SANS,
            ip_addresses=("127.0.0.1", "::1", *SERVICE_IPS, address),
            server=True,
        )
        apiserver = ApiServer(
            binary_dir=self.binary_dir,
            work_dir=self.work_dir,
            etcd_url=self.etcd.url_on(self.host_address),
            pki=self.pki,
            serving=serving,
            sa_private=self.sa_private,
            sa_public=self.sa_public,
            bind_address=address,
            port=APISERVER_PORT,
            reconciler="lease",
            netns=ns,
            hostname=self.apiserver_name(index),
        )
        self.apiservers.append(apiserver)
        apiserver.start()
        return index

    def _await_apiserver(self, index: int) -> None:
        apiserver = self.apiservers[index]
        apiserver.wait_ready()
        path = self.work_dir / f"admin-{index}.kubeconfig"
        self.pki.kubeconfig(path, server=apiserver.url)
        self.kubeconfig_paths.append(path)

    def add_apiserver(self) -> int:
        """Start one more apiserver at the next free address; returns its index once ready."""
        index = self._launch_apiserver()
        self._await_apiserver(index)
        return index

    def kill_apiserver(self, index: int) -> None:
        """SIGKILL apiserver `index` (by the pid we started): it leaves no word behind."""
        self.apiservers[index].stop(graceful=False)

    def stop_apiserver(self, index: int, *, graceful: bool = True) -> None:
        self.apiservers[index].stop(graceful=graceful)

    def pid(self, index: int) -> int | None:
        proc = self.apiservers[index].proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def lease_ttl(self, index: int) -> float | None:
        """Seconds until apiserver `index`'s endpoint lease expires in etcd (None: gone)."""
        assert self.etcd is not None, "start() first"
        return self.etcd.key_ttl(master_lease_key(self.apiservers[index].bind_address))

    async def client(self, index: int = 0) -> KubeClient:
        return await KubeClient.from_config(str(self.kubeconfig_paths[index]))

    @property
    def url(self) -> str:
        """The first apiserver's URL: what kubeconfigs name (clients fall back on the rest)."""
        return self.apiservers[0].url

    def write_kubeconfig(self, path: Path, *, user: str, groups: Sequence[str] = ()) -> Path:
        """A kubeconfig for another identity, naming the first apiserver."""
        return self.pki.kubeconfig(path, server=self.url, user=user, groups=groups)

    def state(self) -> dict[str, Any]:
        """Plain JSON data: what runs where (for a stack's state file and other processes)."""
        return {
            "subnet": str(self.subnet),
            "host_address": self.host_address,
            "ca": str(self.ca_path),
            "verify_name": VERIFY_NAME,
            "service_ips": list(SERVICE_IPS),
            "apiservers": [
                {
                    "index": index,
                    "name": self.apiserver_name(index),
                    "address": apiserver.bind_address,
                    "url": apiserver.url,
                    "netns": self.netns[index],
                    "pid": self.pid(index),
                    "kubeconfig": str(self.kubeconfig_paths[index])
                    if index < len(self.kubeconfig_paths)
                    else None,
                }
                for index, apiserver in enumerate(self.apiservers)
            ],
            "clients": [
                {"netns": client.name, "path": str(client.path), "address": client.address}
                for client in self.clients
            ],
        }

    def stop(self) -> None:
        for apiserver in self.apiservers:
            apiserver.stop()
        if self.etcd is not None:
            self.etcd.stop()
        for ns in reversed(self._created_netns):
            # Deleting a namespace destroys the veth ends inside it, and so the pairs.
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        for link in self._created_links:
            if Path(f"/sys/class/net/{link}").exists():
                subprocess.run(["ip", "link", "del", link], capture_output=True, check=False)
        self._created_netns.clear()
        self._created_links.clear()
        shutil.rmtree(self.work_dir, ignore_errors=True)

    def __enter__(self) -> HAControlPlane:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def master_lease_key(address: str) -> str:
    """Where the lease endpoint reconciler keeps an apiserver's lease in etcd."""
    return f"/registry/masterleases/{address}"
