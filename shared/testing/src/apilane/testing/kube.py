"""A real Kubernetes control plane for tests: etcd plus kube-apiserver on loopback.

Binaries come from `tools/install-kube-binaries.sh` (built from the Go module proxy at a
pinned release, cached outside the repository) or from $KUBEBUILDER_ASSETS (the envtest
convention). Nothing here is mocked: certificates are generated per control plane, etcd and
the apiserver run as child processes on free loopback ports (started by
`procs.start_process`), and every process is ended by the pid we started, never by name.

`ControlPlane` is one apiserver with `--endpoint-reconciler-type=none`, so tests own the
EndpointSlices of Service default/kubernetes. Besides its usual serving certificate it has a
second one for SNI_NAME only, from a CA of its own (`sni_pki`): a client that reaches it by IP
and trusts only that CA gets through only when it sends SNI_NAME (kubeconfig
`tls-server-name`). `apilane.testing.ha.HAControlPlane` runs N apiservers on one etcd with
the lease endpoint reconciler, each in a network namespace of its own (EndpointSlice
validation rejects loopback addresses).

Forcing 410 Gone: the apiserver's watch cache starts at etcd's current revision, so after
`restart_apiserver(expire_watches=True)` (stop, write one key straight into etcd outside
/registry to move the revision on, compact, start) any watch resumed from an older
resourceVersion gets 410 "too old resource version" and must relist.
"""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import json
import logging
import os
import secrets
import shutil
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apilane.kube.client import Conflict, KubeClient, NotFound
from apilane.testing.pki import KeyPair, Pki
from apilane.testing.procs import (
    ComponentMissing,
    end_process,
    free_port,
    kill_process,
    start_process,
    tail,
)

log = logging.getLogger(__name__)

KUBE_VERSION = "v1.34.4"
ETCD_VERSION = "v3.6.4"
SERVICE_CIDRS = "10.96.0.0/16,fd00:10:96::/108"
SERVICE_IPS = ("10.96.0.1", "fd00:10:96::1")
KUBERNETES_SANS = (
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
    "localhost",
)
SA_ISSUER = "https://kubernetes.default.svc.cluster.local"
# The one name ControlPlane's second serving certificate (from a CA of its own) is valid for;
# the apiserver presents it to clients that ask for this name by SNI.
SNI_NAME = "apiserver.apilane.test"
READY_TIMEOUT = 90.0
STOP_GRACE = 10.0

# Start times of every control plane started in this process, for the closing report:
# (what, seconds). kube_fixtures prints them in the pytest terminal summary.
START_TIMES: list[tuple[str, float]] = []


def cache_dir() -> Path:
    base = os.environ.get("APILANE_CACHE") or os.path.join(Path.home(), ".cache", "apilane")
    return Path(base) / f"kube-{KUBE_VERSION}-etcd-{ETCD_VERSION}"


def find_kube_binaries() -> Path:
    """The directory holding `kube-apiserver` and `etcd`: $KUBEBUILDER_ASSETS first, then the
    cache of tools/install-kube-binaries.sh. Raises ComponentMissing saying how to get them."""
    candidates: list[tuple[str, Path]] = []
    assets = os.environ.get("KUBEBUILDER_ASSETS", "").strip()
    if assets:
        candidates.append(("KUBEBUILDER_ASSETS", Path(assets)))
    candidates.append(("cache", cache_dir()))
    for origin, directory in candidates:
        if all(os.access(directory / name, os.X_OK) for name in ("kube-apiserver", "etcd")):
            return directory
        if origin == "KUBEBUILDER_ASSETS":
            raise ComponentMissing(
                f"KUBEBUILDER_ASSETS={assets} does not contain executable kube-apiserver and etcd"
            )
    raise ComponentMissing(
        f"kube-apiserver and etcd not found in {cache_dir()}: run `make setup` "
        "(or `bash tools/install-kube-binaries.sh`), or point KUBEBUILDER_ASSETS at a "
        "directory holding both"
    )


# --------------------------------------------------------------------------- processes


def stop_process(proc: subprocess.Popen[bytes] | None, *, grace: float = STOP_GRACE) -> None:
    """SIGTERM the pid we started, SIGKILL after `grace` seconds."""
    end_process(proc, grace=grace)


# --------------------------------------------------------------------------- etcd


class Etcd:
    """One etcd member. Clients reach it over plain HTTP on `client_hosts` (loopback by
    default); `put`, `revision` and `compact` use etcd's JSON gateway, no etcdctl needed."""

    def __init__(
        self, *, binary_dir: Path, data_dir: Path, client_hosts: Sequence[str] = ("127.0.0.1",)
    ) -> None:
        self.binary = binary_dir / "etcd"
        self.data_dir = data_dir
        self.client_hosts = tuple(client_hosts)
        self.client_port = free_port()
        self.peer_port = free_port()
        self.log_path = data_dir.parent / "etcd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    def url_on(self, host: str) -> str:
        return f"http://{host}:{self.client_port}"

    def start(self) -> float:
        started = time.monotonic()
        peer = f"http://127.0.0.1:{self.peer_port}"
        listen = ",".join(
            f"http://{_bracket(host)}:{self.client_port}" for host in self.client_hosts
        )
        self.proc = start_process(
            [
                str(self.binary),
                "--name=apilane",
                f"--data-dir={self.data_dir}",
                f"--listen-client-urls={listen}",
                f"--advertise-client-urls={self.url}",
                f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster=apilane={peer}",
                "--initial-cluster-state=new",
                # Test data is disposable: skipping fsync makes etcd (and so the apiserver) fast.
                "--unsafe-no-fsync",
                "--log-level=warn",
            ],
            log_path=self.log_path,
        )
        self._wait_healthy()
        return time.monotonic() - started

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(
                    f"etcd exited with {self.proc.returncode}:\n{tail(self.log_path)}"
                )
            with (
                contextlib.suppress(OSError, ValueError),
                urllib.request.urlopen(self.url + "/health", timeout=1) as response,
            ):
                if json.loads(response.read()).get("health") == "true":
                    return
            time.sleep(0.05)
        raise TimeoutError(f"etcd not healthy after 30 s:\n{tail(self.log_path)}")

    def _call(self, endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
        request = urllib.request.Request(
            self.url + endpoint,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            result: dict[str, Any] = json.loads(response.read())
            return result

    def put(self, key: str, value: str) -> int:
        """Write one key (outside /registry!); returns the new revision."""
        if key.startswith("/registry"):
            raise ValueError("never write the apiserver's own keys behind its back")
        result = self._call(
            "/v3/kv/put",
            {
                "key": base64.b64encode(key.encode()).decode(),
                "value": base64.b64encode(value.encode()).decode(),
            },
        )
        return int(result["header"]["revision"])

    def revision(self) -> int:
        result = self._call(
            "/v3/kv/range", {"key": base64.b64encode(b"/apilane-test/revision").decode()}
        )
        return int(result["header"]["revision"])

    def compact(self, revision: int | None = None) -> int:
        """Compact etcd's history up to `revision` (default: now); returns that revision."""
        target = revision if revision is not None else self.revision()
        self._call("/v3/kv/compaction", {"revision": str(target), "physical": True})
        return target

    def key_ttl(self, key: str) -> float | None:
        """Seconds until the etcd lease attached to `key` expires (read only); None when the
        key is gone or has no lease."""
        found = self._call("/v3/kv/range", {"key": base64.b64encode(key.encode()).decode()})
        kvs = found.get("kvs") or []
        lease = kvs[0].get("lease") if kvs else None
        if not lease:
            return None
        alive = self._call("/v3/lease/timetolive", {"ID": lease})
        ttl = int(alive.get("TTL", -1))
        return float(ttl) if ttl >= 0 else None

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


# --------------------------------------------------------------------------- kube-apiserver


@dataclass
class ApiServer:
    """One kube-apiserver process; `netns` runs it inside a network namespace."""

    binary_dir: Path
    work_dir: Path
    etcd_url: str
    pki: Pki
    serving: KeyPair
    sa_private: Path
    sa_public: Path
    bind_address: str = "127.0.0.1"
    port: int = 0
    reconciler: str = "none"
    netns: str | None = None
    # A hostname of its own (in a UTS namespace of its own): an apiserver's identity Lease
    # is named after its hostname, so apiservers on one machine would otherwise share one.
    hostname: str | None = None
    extra_args: tuple[str, ...] = ()
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)
    admin: KeyPair | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if not self.port:
            self.port = free_port(self.bind_address) if self.netns is None else 6443
        self.log_path = self.work_dir / f"kube-apiserver-{self.bind_address}.log"
        self.admin = self.pki.issue(
            f"probe-{self.bind_address}",
            common_name="apilane-probe",
            organizations=("system:masters",),
            client=True,
        )

    @property
    def url(self) -> str:
        return f"https://{_bracket(self.bind_address)}:{self.port}"

    def argv(self) -> list[str]:
        argv = [
            str(self.binary_dir / "kube-apiserver"),
            f"--etcd-servers={self.etcd_url}",
            f"--bind-address={self.bind_address}",
            f"--advertise-address={self.bind_address}",
            f"--secure-port={self.port}",
            f"--tls-cert-file={self.serving.cert_path}",
            f"--tls-private-key-file={self.serving.key_path}",
            f"--client-ca-file={self.pki.ca_path}",
            f"--service-account-issuer={SA_ISSUER}",
            f"--service-account-key-file={self.sa_public}",
            f"--service-account-signing-key-file={self.sa_private}",
            f"--service-cluster-ip-range={SERVICE_CIDRS}",
            "--authorization-mode=Node,RBAC",
            f"--endpoint-reconciler-type={self.reconciler}",
            f"--cert-dir={self.work_dir / 'cert-dir'}",
            "--allow-privileged=true",
            "--profiling=false",
            "--v=1",
        ]
        argv += list(self.extra_args)
        if self.hostname is not None:
            # unshare and sh exec in turn, so the pid stays the apiserver's.
            argv = [
                "unshare",
                "--uts",
                "sh",
                "-c",
                'hostname "$0" && exec "$@"',
                self.hostname,
                *argv,
            ]
        if self.netns is not None:
            # `ip netns exec` execs the apiserver in place: the pid we hold is the apiserver's.
            argv = ["ip", "netns", "exec", self.netns, *argv]
        return argv

    def start(self) -> None:
        self.proc = start_process(self.argv(), log_path=self.log_path)

    def wait_ready(self, *, timeout: float = READY_TIMEOUT) -> None:
        assert self.admin is not None
        context = ssl.create_default_context(cafile=str(self.pki.ca_path))
        context.load_cert_chain(str(self.admin.cert_path), str(self.admin.key_path))
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(
                    f"kube-apiserver at {self.url} exited with {self.proc.returncode}:\n{tail(self.log_path)}"
                )
            try:
                # /readyz passes before the bootstrap controller has created the `kubernetes`
                # Service; everything built on this harness needs that Service, so wait for it.
                with (
                    urllib.request.urlopen(
                        self.url + "/readyz", context=context, timeout=2
                    ) as response,
                    urllib.request.urlopen(
                        self.url + "/api/v1/namespaces/default/services/kubernetes",
                        context=context,
                        timeout=2,
                    ) as service,
                ):
                    if response.status == 200 and service.status == 200:
                        return
            except urllib.error.HTTPError as exc:
                last = f"HTTP {exc.code}"
            except (OSError, ssl.SSLError) as exc:
                last = str(exc)
            time.sleep(0.1)
        raise TimeoutError(
            f"kube-apiserver at {self.url} not ready after {timeout:.0f} s ({last}):\n{tail(self.log_path)}"
        )

    def stop(self, *, graceful: bool = True) -> None:
        if graceful:
            stop_process(self.proc)
        else:
            kill_process(self.proc)
        self.proc = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


# --------------------------------------------------------------------------- control planes


class ControlPlane:
    """etcd + one kube-apiserver on loopback; RBAC on, dual-stack service CIDRs, no endpoint
    reconciler (tests own the kubernetes Service's EndpointSlices).

    Use as a context manager, or `start()`/`stop()`. `client()` gives an admin KubeClient.
    Its files live in a fresh directory under `work_parent` (default: the temp directory),
    removed by `stop()`."""

    def __init__(
        self, *, extra_apiserver_args: Sequence[str] = (), work_parent: Path | None = None
    ) -> None:
        self.binary_dir = find_kube_binaries()
        if work_parent is not None:
            work_parent.mkdir(parents=True, exist_ok=True)
        self.work_dir = Path(tempfile.mkdtemp(prefix="apilane-kube-", dir=work_parent))
        self.pki = Pki(self.work_dir / "pki")
        self.sa_private, self.sa_public = self.pki.service_account_keys()
        self.serving = self.pki.issue(
            "apiserver",
            common_name="kube-apiserver",
            dns_names=KUBERNETES_SANS,
            ip_addresses=("127.0.0.1", "::1", *SERVICE_IPS),
            server=True,
        )
        self.sni_pki = Pki(self.work_dir / "sni-pki", common_name="apilane-test-sni-ca")
        sni = self.sni_pki.issue(
            "apiserver-sni", common_name="kube-apiserver", dns_names=(SNI_NAME,), server=True
        )
        self.etcd = Etcd(binary_dir=self.binary_dir, data_dir=self.work_dir / "etcd")
        self.apiserver = ApiServer(
            binary_dir=self.binary_dir,
            work_dir=self.work_dir,
            etcd_url=self.etcd.url,
            pki=self.pki,
            serving=self.serving,
            sa_private=self.sa_private,
            sa_public=self.sa_public,
            extra_args=(
                f"--tls-sni-cert-key={sni.cert_path},{sni.key_path}:{SNI_NAME}",
                *extra_apiserver_args,
            ),
        )
        self.kubeconfig_path = self.work_dir / "admin.kubeconfig"
        self.timings: dict[str, float] = {}

    @property
    def url(self) -> str:
        return self.apiserver.url

    def start(self) -> ControlPlane:
        started = time.monotonic()
        try:
            self.timings["etcd"] = self.etcd.start()
            api_started = time.monotonic()
            self.apiserver.start()
            self.apiserver.wait_ready()
            self.timings["kube-apiserver"] = time.monotonic() - api_started
            self.pki.kubeconfig(self.kubeconfig_path, server=self.url)
        except BaseException:
            self.stop()
            raise
        self.timings["total"] = time.monotonic() - started
        START_TIMES.append(("kube control plane (etcd + kube-apiserver)", self.timings["total"]))
        log.info(
            "kube control plane ready",
            extra={"url": self.url, **{f"{k}_s": round(v, 2) for k, v in self.timings.items()}},
        )
        return self

    async def client(self) -> KubeClient:
        return await KubeClient.from_config(str(self.kubeconfig_path))

    def write_kubeconfig(self, path: Path, *, user: str, groups: Sequence[str] = ()) -> Path:
        """A kubeconfig for another identity (e.g. to test RBAC with a restricted user)."""
        return self.pki.kubeconfig(path, server=self.url, user=user, groups=groups)

    def restart_apiserver(self, *, graceful: bool = True, expire_watches: bool = False) -> float:
        """Stop and start the apiserver on the same port and etcd; returns the seconds it was
        away. With `expire_watches`, etcd's revision is moved on and compacted while the
        apiserver is down, so every watch resumed from an older resourceVersion gets 410."""
        started = time.monotonic()
        self.apiserver.stop(graceful=graceful)
        if expire_watches:
            self.expire_history()
        self.apiserver.start()
        self.apiserver.wait_ready()
        return time.monotonic() - started

    def expire_history(self) -> int:
        """Move etcd's revision on by one write outside /registry and compact up to it."""
        revision = self.etcd.put("/apilane-test/revision-bump", str(time.time()))
        return self.compact_etcd(revision)

    def compact_etcd(self, revision: int | None = None) -> int:
        return self.etcd.compact(revision)

    def stop(self) -> None:
        self.apiserver.stop()
        self.etcd.stop()
        shutil.rmtree(self.work_dir, ignore_errors=True)

    def __enter__(self) -> ControlPlane:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def pick_test_subnet() -> ipaddress.IPv4Network:
    """A /24 from 198.18.0.0/15 (RFC 2544 benchmarking) that no interface or route uses yet."""
    used = subprocess.run(
        ["ip", "-4", "-o", "addr"], capture_output=True, text=True, check=False
    ).stdout
    used += subprocess.run(
        ["ip", "-4", "route", "show", "table", "all"], capture_output=True, text=True, check=False
    ).stdout
    for _ in range(64):
        subnet = ipaddress.IPv4Network(
            f"198.{18 + secrets.randbelow(2)}.{secrets.randbelow(256)}.0/24"
        )
        prefix = str(subnet.network_address).rsplit(".", 1)[0] + "."
        if prefix not in used:
            return subnet
    raise RuntimeError("no free /24 left in 198.18.0.0/15")


# --------------------------------------------------------------------------- API helpers

KUBERNETES_SERVICE = "/api/v1/namespaces/default/services/kubernetes"
KUBERNETES_SLICES = "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices"


ResourcePaths = dict[tuple[str, str], tuple[str, bool]]


async def resource_paths(kube: KubeClient, api_versions: Iterable[str]) -> ResourcePaths:
    """(apiVersion, kind) -> (URL of the collection, namespaced?), from API discovery."""
    found: ResourcePaths = {}
    for api_version in set(api_versions):
        base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
        listing = await kube.get(base)
        for resource in listing["resources"]:
            if "/" not in resource["name"]:  # subresources (status, scale) are not objects
                found[(api_version, resource["kind"])] = (
                    f"{base}/{resource['name']}",
                    bool(resource["namespaced"]),
                )
    return found


def object_path(paths: ResourcePaths, doc: Mapping[str, Any]) -> tuple[str, str]:
    """(collection path, object path) of a manifest document; raises ValueError for a
    namespaced kind without a namespace, KeyError for a kind the server does not serve."""
    collection, namespaced = paths[(doc["apiVersion"], doc["kind"])]
    if namespaced:
        namespace = doc["metadata"].get("namespace")
        if not namespace:
            raise ValueError(f"{doc['kind']}/{doc['metadata']['name']} needs a namespace")
        base, resource = collection.rsplit("/", 1)
        collection = f"{base}/namespaces/{namespace}/{resource}"
    return collection, f"{collection}/{doc['metadata']['name']}"


async def delete_kubernetes_endpoint_slices(client: KubeClient) -> int:
    """Delete every EndpointSlice of Service default/kubernetes (tests own them); returns how
    many there were."""
    listing = await client.list(
        KUBERNETES_SLICES, label_selector="kubernetes.io/service-name=kubernetes"
    )
    for item in listing["items"]:
        with contextlib.suppress(NotFound):
            await client.delete(f"{KUBERNETES_SLICES}/{item['metadata']['name']}")
    return len(listing["items"])


def endpoint_slice(
    name: str,
    *,
    addresses: Sequence[str],
    port: int = 6443,
    port_name: str = "https",
    address_type: str = "IPv4",
    service: str = "kubernetes",
    ready: bool | None = True,
    serving: bool | None = None,
    terminating: bool | None = None,
) -> dict[str, Any]:
    """An EndpointSlice body for Service `service` (one endpoint per address)."""
    conditions: dict[str, bool] = {}
    for key, value in (("ready", ready), ("serving", serving), ("terminating", terminating)):
        if value is not None:
            conditions[key] = value
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": name, "labels": {"kubernetes.io/service-name": service}},
        "addressType": address_type,
        "endpoints": [{"addresses": [address], "conditions": conditions} for address in addresses],
        "ports": [{"name": port_name, "port": port, "protocol": "TCP"}],
    }


async def service_account_token(
    client: KubeClient, namespace: str, name: str, *, expiration_seconds: int = 3600
) -> str:
    """A token the apiserver accepts for ServiceAccount namespace/name (created if missing),
    from the TokenRequest API: there is no token controller in this control plane."""
    with contextlib.suppress(Conflict):
        await client.create(
            f"/api/v1/namespaces/{namespace}/serviceaccounts",
            {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name}},
        )
    issued = await client.create(
        f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token",
        {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {"expirationSeconds": expiration_seconds},
        },
    )
    return str(issued["status"]["token"])
