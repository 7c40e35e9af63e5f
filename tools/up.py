"""`make up`: the local stack, wired and running until Ctrl-C.

Starts, on this machine and on loopback only:
  nats-server (JetStream) · etcd + kube-apiserver (the test harness's, RBAC on) seeded with a
  demo calico-system/calico-node DaemonSet, a kube-system/kube-proxy DaemonSet and an HA
  `kubernetes` Service with three API server endpoints · discovery, renderer and one
  node-loader through their real entry points, each with its own ServiceAccount identity and
  the RBAC from deploy/ · the Zipkin tracing UI.

The node-loader programs real eBPF maps and attaches to a dedicated, empty child cgroup
(never the root cgroup) when this runs as root with bcc; otherwise it says what is missing
and runs with APILANE_MAP_BACKEND=memory. Everything lives under .apilane/ (`make clean`
removes it); every process is ended by the pid it was started with.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
STATE = REPO / ".apilane"
STACK_FILE = STATE / "stack.json"
CLUSTER = "local"
NAMESPACE = "apilane"
NODE_NAME = "local-node"
PIN_DIR = "/sys/fs/bpf/apilane-local"
CGROUP_NAME = "apilane-local"
FIELD_MANAGER = "apilane-up"
# Ports a person can remember; a free one is taken when something else holds them.
PREFERRED_PORTS = {
    "nats": 4222,
    "zipkin": 9411,
    "discovery": 18081,
    "renderer": 18082,
    "node-loader": 18083,
}
SERVICES = ("discovery", "renderer", "node-loader")
MODULES = {
    "discovery": "apilane.discovery",
    "renderer": "apilane.renderer",
    "node-loader": "apilane.node_loader",
}
READY_TIMEOUT = 90.0
ZIPKIN_TIMEOUT = 120.0

BOLD = "\033[1m" if sys.stdout.isatty() else ""
DIM = "\033[2m" if sys.stdout.isatty() else ""
RESET = "\033[0m" if sys.stdout.isatty() else ""


def say(text: str) -> None:
    print(f"{BOLD}up:{RESET} {text}", flush=True)


class UpError(RuntimeError):
    """The stack cannot start; the message says why and what to do."""


# --------------------------------------------------------------------------- preflight


@dataclass
class DataPlane:
    """How the node-loader will run: real BPF, or in memory with the reasons why not."""

    backend: str
    cgroup2_mount: str = ""
    missing: list[str] = field(default_factory=list)


def cgroup2_mount() -> str:
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            _device, mount_point, fs_type, *_ = line.split()
            if fs_type == "cgroup2":
                return mount_point
    return ""


def bpffs_mounted() -> bool:
    with open("/proc/self/mounts") as mounts:
        return any(line.split()[1:3] == ["/sys/fs/bpf", "bpf"] for line in mounts)


def check_data_plane() -> DataPlane:
    missing = []
    if os.geteuid() != 0:
        missing.append(f"root (running as uid {os.geteuid()}; run `sudo make up`)")
    probe = subprocess.run(
        [sys.executable, "-c", "import bcc"], capture_output=True, text=True, check=False
    )
    if probe.returncode != 0:
        missing.append("bcc for this venv (Debian's python3-bpfcc; `bash tools/setup-bpf.sh`)")
    mount = cgroup2_mount()
    if not mount:
        missing.append("a cgroup2 (unified) hierarchy mounted")
    if not bpffs_mounted():
        missing.append("bpffs at /sys/fs/bpf (`mount -t bpf bpf /sys/fs/bpf`)")
    if missing:
        return DataPlane(backend="memory", missing=missing)
    return DataPlane(backend="bpf", cgroup2_mount=mount)


def pick_port(name: str) -> int:
    preferred = PREFERRED_PORTS[name]
    with socket.socket() as sock:
        # As the servers themselves do: a port in TIME_WAIT from the last run is free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            pass
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_ok(url: str) -> bool:
    with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as response:
        return 200 <= response.status < 300
    return False


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --------------------------------------------------------------------------- processes


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    url: str = ""

    @property
    def running(self) -> bool:
        return self.proc.poll() is None


def spawn(name: str, argv: list[str], *, env: dict[str, str], log: Path) -> Child:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        proc = subprocess.Popen(
            argv,
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            # Its own process group: Ctrl-C in the terminal reaches only this script, which
            # then stops each child in order.
            start_new_session=True,
        )
    return Child(name=name, proc=proc, log=log)


def stop_child(child: Child, *, grace: float = 10.0) -> None:
    """SIGTERM by pid, SIGKILL after `grace` seconds."""
    if not child.running:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(child.proc.pid, signal.SIGTERM)
    try:
        child.proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child.proc.pid, signal.SIGKILL)
        child.proc.wait(timeout=grace)


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def wait_ready(child: Child, url: str, *, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not child.running:
            raise UpError(
                f"{child.name} exited with {child.proc.returncode} while starting; "
                f"its log ({child.log}):\n{tail(child.log)}"
            )
        if http_ok(url):
            return
        time.sleep(0.25)
    raise UpError(f"{child.name} not ready at {url} after {timeout:.0f}s; log:\n{tail(child.log)}")


# --------------------------------------------------------------------------- the stack


class Stack:
    def __init__(self, *, data_plane: DataPlane) -> None:
        self.data_plane = data_plane
        self.children: list[Child] = []
        self.nats: Any = None
        self.control_plane: Any = None
        self.zipkin: Child | None = None
        self.ports = {name: pick_port(name) for name in PREFERRED_PORTS}
        self.kubeconfigs: dict[str, Path] = {}
        self.signing: dict[str, str] = {}  # discovery's key file, everyone else's trusted key
        self.cgroup_path = (
            Path(data_plane.cgroup2_mount) / CGROUP_NAME if data_plane.backend == "bpf" else None
        )

    # -- start

    def start(self) -> None:
        reset_runtime_state()
        from apilane.testing.sealing import signing_environment

        (STATE / "logs").mkdir(parents=True, exist_ok=True)
        self.signing = signing_environment(STATE)
        self.start_zipkin()  # the slowest to start (a JVM): first, and waited for last
        self.start_nats()
        self.start_control_plane()
        asyncio.run(self.seed())
        self.start_services()
        self.wait_zipkin()
        self.write_stack_file()

    def start_zipkin(self) -> None:
        installer = subprocess.run(
            ["bash", str(REPO / "tools/install-tracing-ui.sh")],
            capture_output=True,
            text=True,
            check=False,
        )
        if installer.returncode != 0:
            raise UpError(f"the tracing UI could not be installed:\n{installer.stderr.strip()}")
        jar = installer.stdout.strip().splitlines()[-1]
        port = self.ports["zipkin"]
        say(f"starting Zipkin (tracing UI) on 127.0.0.1:{port}")
        self.zipkin = spawn(
            "zipkin",
            [
                "java",
                "-Xms64m",
                "-Xmx384m",
                "-XX:TieredStopAtLevel=1",  # a quicker start matters more than peak speed
                "-jar",
                jar,
                f"--armeria.ports[0].port={port}",
                "--armeria.ports[0].ip=127.0.0.1",
                "--armeria.ports[0].protocols=http",
            ],
            env={**os.environ, "JAVA_TOOL_OPTIONS": "-Djava.io.tmpdir=" + str(STATE / "tmp")},
            log=STATE / "logs/zipkin.log",
        )
        self.zipkin.url = f"http://127.0.0.1:{port}/zipkin/"
        self.children.append(self.zipkin)

    def wait_zipkin(self) -> None:
        assert self.zipkin is not None
        wait_ready(
            self.zipkin, f"http://127.0.0.1:{self.ports['zipkin']}/health", timeout=ZIPKIN_TIMEOUT
        )

    def start_nats(self) -> None:
        from apilane.testing.nats import NatsServer

        say(f"starting nats-server (JetStream) on 127.0.0.1:{self.ports['nats']}")
        self.nats = NatsServer(
            store_dir=STATE / "nats", port=self.ports["nats"], server_name="apilane-local"
        )
        self.nats.start()

    def start_control_plane(self) -> None:
        from apilane.testing.kube import ControlPlane

        say("starting etcd + kube-apiserver")
        # The harness makes its work directory with tempfile: keep it under .apilane/.
        (STATE / "tmp").mkdir(parents=True, exist_ok=True)
        tempfile.tempdir = str(STATE / "tmp")
        self.control_plane = ControlPlane()
        self.control_plane.start()
        admin = STATE / "kubeconfig"
        shutil.copyfile(self.control_plane.kubeconfig_path, admin)
        admin.chmod(0o600)
        self.kubeconfigs["admin"] = admin
        # Each service gets its ServiceAccount's identity, so deploy/'s RBAC is what it runs
        # with here too (a client certificate for system:serviceaccount:apilane:<name>).
        for service in ("discovery", "renderer"):
            account = f"apilane-{service}"
            self.kubeconfigs[service] = self.control_plane.write_kubeconfig(
                STATE / f"kubeconfig-{service}",
                user=f"system:serviceaccount:{NAMESPACE}:{account}",
                groups=("system:serviceaccounts", f"system:serviceaccounts:{NAMESPACE}"),
            )

    async def seed(self) -> None:
        from apilane.kube.client import Conflict, KubeClient

        say("seeding the demo cluster: calico-node, kube-proxy, 3 API server endpoints, RBAC")
        kube = await KubeClient.from_config(str(self.kubeconfigs["admin"]))
        try:
            for namespace in (NAMESPACE, "calico-system"):
                with contextlib.suppress(Conflict):
                    await kube.create(
                        "/api/v1/namespaces",
                        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}},
                    )
            service = await kube.get("/api/v1/namespaces/default/services/kubernetes")
            target_port = int(service["spec"]["ports"][0]["targetPort"])
            documents = [
                *load_documents(REPO / "deploy/namespace.yaml"),
                *(
                    doc
                    for path in sorted(REPO.glob("deploy/rbac-*.yaml"))
                    for doc in load_documents(path)
                ),
                *(
                    doc
                    for path in sorted(REPO.glob("deploy/demo/*.yaml"))
                    for doc in load_documents(path)
                ),
            ]
            for doc in documents:
                if doc["kind"] == "EndpointSlice":
                    # The demo endpoints use the port the Service's targetPort names.
                    doc["ports"][0]["port"] = target_port
                await kube.patch(
                    object_path(doc),
                    doc,
                    patch_type="apply",
                    field_manager=FIELD_MANAGER,
                    force=True,
                )
            # No controller manager runs here, so nothing reports kube-proxy's pods: say
            # what a healthy one-node cluster would (discovery checks it is ready).
            kube_proxy = "/apis/apps/v1/namespaces/kube-system/daemonsets/kube-proxy"
            current = await kube.get(kube_proxy)
            ready = {
                "desiredNumberScheduled": 1,
                "currentNumberScheduled": 1,
                "updatedNumberScheduled": 1,
                "numberReady": 1,
                "numberAvailable": 1,
                "numberMisscheduled": 0,
                "observedGeneration": current["metadata"].get("generation", 1),
            }
            await kube.patch(f"{kube_proxy}/status", {"status": ready}, patch_type="merge")
        finally:
            await kube.close()

    def service_env(self, service: str) -> dict[str, str]:
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("APILANE_", "OTEL_", "KUBECONFIG"))
        }
        port = self.ports[service]
        env.update(
            {
                "APILANE_CLUSTER": CLUSTER,
                "APILANE_NATS_URL": self.nats.url,
                "APILANE_HTTP_HOST": "127.0.0.1",
                "APILANE_HTTP_PORT": str(port),
                "APILANE_LOG_LEVEL": "INFO",
                "APILANE_POD_NAME": f"{service}-local",
                "OTEL_SERVICE_NAME": f"apilane-{service}",
                "OTEL_TRACES_EXPORTER": "zipkin",
                "OTEL_EXPORTER_ZIPKIN_ENDPOINT": (
                    f"http://127.0.0.1:{self.ports['zipkin']}/api/v2/spans"
                ),
                # Export within half a second, so a change shows up in the UI right away.
                "OTEL_BSP_SCHEDULE_DELAY": "500",
                "PYTHONUNBUFFERED": "1",
                **self.signing,
            }
        )
        if service in ("discovery", "renderer"):
            env["KUBECONFIG"] = str(self.kubeconfigs[service])
            env["APILANE_LEASE_NAMESPACE"] = NAMESPACE
        if service == "renderer":
            env.update(
                {
                    "APILANE_TARGET_NAMESPACE": "calico-system",
                    "APILANE_TARGET_DAEMONSET": "calico-node",
                    "APILANE_TARGET_INIT_CONTAINERS": "ebpf-bootstrap",
                    "APILANE_TARGET_CONTAINERS": "calico-node",
                }
            )
        if service == "node-loader":
            env.update(
                {
                    "APILANE_NODE_NAME": NODE_NAME,
                    "APILANE_MAP_BACKEND": self.data_plane.backend,
                    "APILANE_STATE_DIR": str(STATE / "node-loader"),
                    "APILANE_CONNECT_TIME_LB": "true",
                }
            )
            if self.data_plane.backend == "bpf":
                assert self.cgroup_path is not None
                env["APILANE_BPF_PIN_DIR"] = PIN_DIR
                env["APILANE_CGROUP_PATH"] = str(self.cgroup_path)
        return env

    def start_services(self) -> None:
        if self.cgroup_path is not None:
            # A dedicated child cgroup, empty: the connect-time load balancer applies to the
            # processes moved into it and to nothing else on this machine.
            self.cgroup_path.mkdir(exist_ok=True)
        for service in SERVICES:
            port = self.ports[service]
            say(f"starting {service} (python -m {MODULES[service]}) on 127.0.0.1:{port}")
            child = spawn(
                service,
                [sys.executable, "-m", MODULES[service]],
                env=self.service_env(service),
                log=STATE / f"logs/{service}.log",
            )
            child.url = f"http://127.0.0.1:{port}"
            self.children.append(child)
        for child in self.children:
            if child.name in SERVICES:
                wait_ready(child, f"{child.url}/readyz", timeout=READY_TIMEOUT)
                say(f"{child.name} ready")

    def write_stack_file(self) -> None:
        stack = {
            "pid": os.getpid(),
            "cluster": CLUSTER,
            "nats_url": self.nats.url,
            "kubeconfig": str(self.kubeconfigs["admin"]),
            "apiserver": self.control_plane.url,
            "zipkin_url": f"http://127.0.0.1:{self.ports['zipkin']}",
            "map_backend": self.data_plane.backend,
            "node": NODE_NAME,
            "cgroup": str(self.cgroup_path or ""),
            "pin_dir": PIN_DIR if self.data_plane.backend == "bpf" else "",
            "processes": {
                child.name: {"pid": child.proc.pid, "url": child.url, "log": str(child.log)}
                for child in self.children
            },
        }
        STACK_FILE.write_text(json.dumps(stack, indent=2) + "\n")

    # -- run and stop

    def watch(self) -> int:
        """Until a signal, or until a process dies (then its log is shown)."""
        stop = {"requested": False}

        def on_signal(_signum: int, _frame: object) -> None:
            stop["requested"] = True

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        while not stop["requested"]:
            for child in self.children:
                if not child.running:
                    say(f"{child.name} exited with {child.proc.returncode}; its log ({child.log}):")
                    print(tail(child.log), flush=True)
                    return 1
            if self.nats is not None and not self.nats.running:
                say("nats-server exited")
                return 1
            time.sleep(0.5)
        print()
        return 0

    def stop(self) -> None:
        say("stopping")
        for child in reversed(self.children):
            stop_child(child)
        if self.control_plane is not None:
            self.control_plane.stop()
        if self.nats is not None:
            self.nats.stop()
        remove_bpf_state(self.cgroup_path)
        # The applied-generation record goes with the maps it describes: kept alone, it would
        # claim a generation that the (now removed) maps no longer hold.
        shutil.rmtree(STATE / "node-loader", ignore_errors=True)
        STACK_FILE.unlink(missing_ok=True)
        say("stopped; state is kept in .apilane/ (`make clean` removes it)")

    def summary(self) -> str:
        rows = [
            ("nats-server", self.nats.url, str(self.nats.log_path)),
            ("kube-apiserver", self.control_plane.url, f"KUBECONFIG={self.kubeconfigs['admin']}"),
        ]
        for child in self.children:
            rows.append((child.name, child.url, str(child.log.relative_to(REPO))))
        width = max(len(name) for name, _, _ in rows)
        lines = [f"  {name:<{width}}  {url:<32}  {DIM}{where}{RESET}" for name, url, where in rows]
        data_plane = (
            f"real eBPF maps pinned in {PIN_DIR}, programs on cgroup {self.cgroup_path}"
            if self.data_plane.backend == "bpf"
            else "in-memory maps (APILANE_MAP_BACKEND=memory)"
        )
        assert self.zipkin is not None
        return "\n".join(
            [
                "",
                f"{BOLD}apilane is running{RESET} (cluster {CLUSTER!r}, node {NODE_NAME!r})",
                *lines,
                f"  node-loader data plane: {data_plane}",
                "",
                f"{BOLD}Tracing UI:{RESET} {self.zipkin.url}",
                "",
                f"{BOLD}Try next{RESET} (in another terminal):",
                "  tools/apilane status             # the snapshot, calico-node's env, each node",
                "  tools/apilane simulate failover  # replace one API server endpoint, follow it",
                f"  KUBECONFIG={self.kubeconfigs['admin'].relative_to(REPO)} kubectl -n calico-system "
                "get ds calico-node -o yaml   # the rendered env",
                "",
                "Ctrl-C stops everything.",
            ]
        )


def load_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


# The kinds the seed applies, and where each lives in the API.
_RESOURCES = {
    ("v1", "Namespace"): ("/api/v1", "namespaces", False),
    ("v1", "ServiceAccount"): ("/api/v1", "serviceaccounts", True),
    ("rbac.authorization.k8s.io/v1", "Role"): ("/apis/rbac.authorization.k8s.io/v1", "roles", True),
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): (
        "/apis/rbac.authorization.k8s.io/v1",
        "rolebindings",
        True,
    ),
    ("rbac.authorization.k8s.io/v1", "ClusterRole"): (
        "/apis/rbac.authorization.k8s.io/v1",
        "clusterroles",
        False,
    ),
    ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"): (
        "/apis/rbac.authorization.k8s.io/v1",
        "clusterrolebindings",
        False,
    ),
    ("apps/v1", "DaemonSet"): ("/apis/apps/v1", "daemonsets", True),
    ("discovery.k8s.io/v1", "EndpointSlice"): ("/apis/discovery.k8s.io/v1", "endpointslices", True),
}


def object_path(doc: dict[str, Any]) -> str:
    base, resource, namespaced = _RESOURCES[(doc["apiVersion"], doc["kind"])]
    name = doc["metadata"]["name"]
    if namespaced:
        return f"{base}/namespaces/{doc['metadata']['namespace']}/{resource}/{name}"
    return f"{base}/{resource}/{name}"


def remove_bpf_state(cgroup_path: Path | None) -> None:
    """Unpin the local stack's maps and links, then remove its cgroup (empty by design)."""
    pins = Path(PIN_DIR)
    if pins.is_dir():
        for pin in sorted(pins.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                pin.rmdir() if pin.is_dir() else pin.unlink()
        with contextlib.suppress(OSError):
            pins.rmdir()
    if cgroup_path is not None and cgroup_path.is_dir():
        try:
            cgroup_path.rmdir()
        except OSError as exc:
            say(f"could not remove cgroup {cgroup_path}: {exc.strerror} (processes still in it?)")


def reset_runtime_state() -> None:
    """Each `make up` starts from nothing: a fresh control plane, an empty JetStream store, no
    node-loader record, new logs. (The kubeconfigs are rewritten as the stack starts.)"""
    for name in ("nats", "node-loader", "tmp", "logs"):
        shutil.rmtree(STATE / name, ignore_errors=True)
    (STATE / "nats.log").unlink(missing_ok=True)


def refuse_if_running() -> None:
    if not STACK_FILE.exists():
        return
    with contextlib.suppress(ValueError, OSError):
        previous = json.loads(STACK_FILE.read_text())
        if pid_alive(int(previous.get("pid", 0))):
            raise UpError(f"the stack is already running (pid {previous['pid']}); Ctrl-C it first")
        # A previous run that was killed outright: its children died with it (they are in
        # their own sessions, so end any that did not, by the pids it recorded).
        for name, info in previous.get("processes", {}).items():
            pid = int(info.get("pid", 0))
            if pid and pid_alive(pid):
                say(f"ending {name} (pid {pid}) left over from a previous run")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        cgroup = previous.get("cgroup") or ""
        remove_bpf_state(Path(cgroup) if cgroup else None)
    STACK_FILE.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--memory",
        action="store_true",
        help="run the node-loader on in-memory maps even where real BPF is possible",
    )
    args = parser.parse_args(argv)
    try:
        refuse_if_running()
    except UpError as exc:
        say(str(exc))
        return 1
    data_plane = check_data_plane()
    if args.memory:
        say("--memory: the node-loader runs on in-memory maps (APILANE_MAP_BACKEND=memory)")
        data_plane = DataPlane(backend="memory")
    elif data_plane.missing:
        say("the node-loader cannot program real eBPF here; missing:")
        for item in data_plane.missing:
            print(f"    - {item}", flush=True)
        say("continuing with APILANE_MAP_BACKEND=memory (same reconciler, maps in memory)")
    stack = Stack(data_plane=data_plane)
    try:
        stack.start()
        print(stack.summary(), flush=True)
        return stack.watch()
    except UpError as exc:
        say(str(exc))
        return 1
    except KeyboardInterrupt:
        print()
        return 0
    finally:
        stack.stop()


if __name__ == "__main__":
    raise SystemExit(main())
