"""`apilane up` (`make up`): the local stack, wired and running until Ctrl-C.

Starts, on this machine and on loopback only:
  nats-server (JetStream; every client with its own nkey identity and least privilege, over
  mutual TLS, as in a cluster) · etcd + three real kube-apiservers (the harness's HA plane,
  RBAC on), each in a network namespace of its own on a test bridge and registered as the
  `kubernetes` Service's endpoints by its own lease reconciler, seeded with a demo
  calico-system/calico-node DaemonSet and a kube-system/kube-proxy DaemonSet · discovery,
  renderer and one node-loader through their real entry points, each with its own
  ServiceAccount identity and the RBAC from deploy/ · the Zipkin tracing UI · a client network
  namespace on the bridge (no default route) for `apilane demo`.

Network namespaces need root: without it there is one apiserver on loopback and three demo
endpoints from deploy/demo/ in the benchmarking range, which nothing ever contacts.

`apilane simulate failover` SIGKILLs one of the real apiservers by the pid recorded in the stack
file; with --replace it asks this process (a file under .apilane/requests/) to start a new one
at a new address, since the processes are this one's to start and end.

Keys are made fresh for each run under .apilane/keys/: discovery signs snapshots with
signing.pem, the renderer and the node-loader trust its public key, and the node-loader
accepts control requests (`apilane node lb`) sealed with operator.pem, which the CLI finds
through the stack file. The NATS identities (seeds, a throwaway CA, client certificates) are
made under .apilane/nats/; each service gets only its own, and the stack file records the
operator's, which the CLI commands connect as.

The node-loader programs real eBPF maps and attaches to a dedicated, empty child cgroup
(never the root cgroup) when this runs as root with bcc; otherwise it says what is missing
and runs with APILANE_MAP_BACKEND=memory. Everything lives under .apilane/ (`make clean`
removes it).

Every process is started by the harness (`apilane.testing`: procs, nats, kube, stack), which
is why this is the one CLI module that imports it, and why `apilane up` needs the
`apilane-cli[local]` extra: each child runs in a session of its own (Ctrl-C reaches only this
process, which then stops them in order), dies with this process if it is killed outright, and
is ended by the pid it was started with.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import yaml

from apilane.cli.errors import CliError
from apilane.cli.keys import write_private
from apilane.cli.target import STATE_DIR, find_checkout, stack_file
from apilane.kube.client import Conflict, KubeClient
from apilane.model.errors import ApilaneError
from apilane.model.signing import SigningKey
from apilane.runtime.natsauth import Role
from apilane.testing import bpf, procs
from apilane.testing.failover import probe_environment
from apilane.testing.ha import HAControlPlane
from apilane.testing.kube import ControlPlane, object_path, resource_paths
from apilane.testing.nats import StackNats, start_stack_nats
from apilane.testing.stack import ServiceProcesses, base_environment

CLUSTER = "local"
NAMESPACE = "apilane"
NODE_NAME = "local-node"
PIN_DIR = Path("/sys/fs/bpf/apilane-local")
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
SERVICES = {
    "discovery": "apilane.discovery",
    "renderer": "apilane.renderer",
    "node-loader": "apilane.node_loader",
}
# Each service gets its ServiceAccount's identity, so deploy/'s RBAC is what it runs with
# here too (a client certificate for system:serviceaccount:apilane:apilane-<name>).
KUBE_SERVICES = ("discovery", "renderer")
READY_TIMEOUT = 90.0
ZIPKIN_TIMEOUT = 120.0

BOLD = "\033[1m" if sys.stdout.isatty() else ""
DIM = "\033[2m" if sys.stdout.isatty() else ""
RESET = "\033[0m" if sys.stdout.isatty() else ""


def say(text: str) -> None:
    print(f"{BOLD}up:{RESET} {text}", flush=True)


class UpError(CliError):
    """The stack cannot start or stopped running; the message says why and what to do."""


# --------------------------------------------------------------------------- where and how


@dataclass(frozen=True)
class Layout:
    """The checkout the stack runs from, and its state under .apilane/."""

    repo: Path

    @property
    def state(self) -> Path:
        return self.repo / STATE_DIR

    @property
    def logs(self) -> Path:
        return self.state / "logs"

    @property
    def stack_file(self) -> Path:
        return stack_file(self.repo)

    @property
    def node_loader_state(self) -> Path:
        return self.state / "node-loader"

    @property
    def keys(self) -> Path:
        return self.state / "keys"

    @property
    def requests(self) -> Path:
        """Where `apilane simulate failover --replace` asks for a new apiserver."""
        return self.state / "requests"


@dataclass(frozen=True)
class StackKeys:
    """Discovery's signing key and the operator's control key (PEM files), with the public
    halves the services trust."""

    signing_key_file: Path
    trusted_keys: str
    operator_key_file: Path
    operator_keys: str

    @classmethod
    def generate(cls, directory: Path) -> StackKeys:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        signing, operator = SigningKey.generate(), SigningKey.generate()
        write_private(directory / "signing.pem", signing.to_pem())
        write_private(directory / "operator.pem", operator.to_pem())
        return cls(
            signing_key_file=directory / "signing.pem",
            trusted_keys=signing.public_text,
            operator_key_file=directory / "operator.pem",
            operator_keys=operator.public_text,
        )


@dataclass(frozen=True)
class DataPlane:
    """How the node-loader runs: real eBPF on a dedicated cgroup, or in-memory maps with the
    reasons why not."""

    backend: str
    cgroup: Path | None = None
    missing: tuple[str, ...] = ()


def check_data_plane(*, memory: bool) -> DataPlane:
    if memory:
        return DataPlane(backend="memory")
    problems = bpf.bpf_environment_problems()
    if problems:
        return DataPlane(backend="memory", missing=tuple(problems))
    return DataPlane(backend="bpf", cgroup=bpf.cgroup2_mount() / CGROUP_NAME)


@dataclass(frozen=True)
class Wiring:
    """What the services are told: where NATS, the API server and the tracing UI are."""

    layout: Layout
    data_plane: DataPlane
    ports: dict[str, int]
    nats_url: str
    keys: StackKeys
    # APILANE_NATS_URL and APILANE_NATS_* of each role ("discovery", "renderer", "operator",
    # "node-loader:<node>"), as `start_stack_nats` made them.
    nats_roles: dict[str, dict[str, str]] = field(default_factory=dict)
    kubeconfigs: dict[str, Path] = field(default_factory=dict)
    # The node-loader's APILANE_BACKEND_PROBE and APILANE_PROBE_*: empty, probes off (the
    # demo endpoints of the one-apiserver stack are addresses nothing may contact).
    probe_env: dict[str, str] = field(default_factory=dict)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"


def service_env(wiring: Wiring, service: str) -> dict[str, str]:
    """The environment of one service process (nothing of this shell's APILANE_*, OTEL_* or
    KUBECONFIG leaks in)."""
    kubeconfig = wiring.kubeconfigs.get(service)
    env = base_environment(
        cluster=CLUSTER,
        nats_url=wiring.nats_url,
        kubeconfig=str(kubeconfig) if kubeconfig else "",
        zipkin_endpoint=f"{wiring.url('zipkin')}/api/v2/spans",
    )
    env.update(
        {
            "APILANE_HTTP_PORT": str(wiring.ports[service]),
            "APILANE_LOG_LEVEL": "INFO",
            "APILANE_POD_NAME": f"{service}-local",
            "OTEL_SERVICE_NAME": f"apilane-{service}",
            "PYTHONUNBUFFERED": "1",
        }
    )
    if service in KUBE_SERVICES:
        env["APILANE_LEASE_NAMESPACE"] = NAMESPACE
    env.update(wiring.nats_roles.get(nats_role(service), {}))
    env.update(signing_env(wiring.keys, service))
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
        env.update(node_loader_env(wiring))
    return env


def nats_role(service: str) -> str:
    """The NATS identity a service connects as: the node-loader's is its node's."""
    return f"{Role.NODE_LOADER}:{NODE_NAME}" if service == "node-loader" else service


def signing_env(keys: StackKeys, service: str) -> dict[str, str]:
    """Each service gets only its own part: discovery the private signing key, the snapshot
    consumers its public key, the node-loader also the operator's public key."""
    if service == "discovery":
        return {"APILANE_SIGNING_KEY_FILE": str(keys.signing_key_file)}
    env = {"APILANE_TRUSTED_KEYS": keys.trusted_keys}
    if service == "node-loader":
        env["APILANE_OPERATOR_KEYS"] = keys.operator_keys
    return env


def node_loader_env(wiring: Wiring) -> dict[str, str]:
    env = {
        "APILANE_NODE_NAME": NODE_NAME,
        "APILANE_MAP_BACKEND": wiring.data_plane.backend,
        "APILANE_STATE_DIR": str(wiring.layout.node_loader_state),
        "APILANE_CONNECT_TIME_LB": "true",
        "APILANE_BPF_DIR": str(wiring.layout.repo / "bpf"),
    }
    env.update(wiring.probe_env or {"APILANE_BACKEND_PROBE": "off"})
    if wiring.data_plane.cgroup is not None:
        env["APILANE_BPF_PIN_DIR"] = str(PIN_DIR)
        env["APILANE_CGROUP_PATH"] = str(wiring.data_plane.cgroup)
    return env


def demo_documents(repo: Path, *, demo_endpoints: bool = True) -> list[dict[str, Any]]:
    """What the demo cluster is seeded with, in apply order: the namespace, deploy/'s RBAC,
    then deploy/demo/ (calico-node, kube-proxy and — without real apiservers registering
    themselves, `demo_endpoints` — the demo API server endpoints)."""
    paths = [
        repo / "deploy/namespace.yaml",
        *sorted(repo.glob("deploy/rbac-*.yaml")),
        *sorted(repo.glob("deploy/demo/*.yaml")),
    ]
    documents = [doc for path in paths for doc in yaml.safe_load_all(path.read_text()) if doc]
    return [doc for doc in documents if demo_endpoints or doc["kind"] != "EndpointSlice"]


# --------------------------------------------------------------------------- the components


def start_nats(layout: Layout, port: int) -> StackNats:
    """nats-server with JetStream on loopback, its store and the identities of this cluster
    (discovery, renderer, operator, the node's loader) under .apilane/nats, mutual TLS."""
    say(f"starting nats-server (JetStream, nkeys, mutual TLS) on 127.0.0.1:{port}")
    return start_stack_nats(
        layout.state / "nats",
        cluster=CLUSTER,
        nodes=(NODE_NAME,),
        port=port,
        server_name="apilane-local",
        mutual_tls=True,
    )


Plane = ControlPlane | HAControlPlane


def start_control_plane(layout: Layout, *, ha: bool) -> tuple[Plane, dict[str, Path]]:
    """etcd + three kube-apiservers in network namespaces (`ha`), else one on loopback; the
    admin kubeconfig at .apilane/kubeconfig and one per service identity beside it."""
    plane: Plane
    if ha:
        say("starting etcd + 3 kube-apiservers, each in a network namespace of its own")
        plane = HAControlPlane(3, work_parent=layout.state / "tmp")
    else:
        say("starting etcd + kube-apiserver (one: network namespaces need root)")
        plane = ControlPlane(work_parent=layout.state / "tmp")
    plane.start()
    kubeconfigs = {
        "admin": plane.write_kubeconfig(
            layout.state / "kubeconfig", user="admin", groups=("system:masters",)
        )
    }
    for service in KUBE_SERVICES:
        kubeconfigs[service] = plane.write_kubeconfig(
            layout.state / f"kubeconfig-{service}",
            user=f"system:serviceaccount:{NAMESPACE}:apilane-{service}",
            groups=("system:serviceaccounts", f"system:serviceaccounts:{NAMESPACE}"),
        )
    return plane, kubeconfigs


async def seed(kubeconfig: Path, repo: Path, *, demo_endpoints: bool) -> None:
    endpoints = "3 demo API server endpoints" if demo_endpoints else "the real endpoints"
    say(f"seeding the demo cluster: calico-node, kube-proxy, RBAC ({endpoints})")
    kube = await KubeClient.from_config(str(kubeconfig))
    try:
        for namespace in (NAMESPACE, "calico-system"):
            with contextlib.suppress(Conflict):
                await kube.create(
                    "/api/v1/namespaces",
                    {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}},
                )
        service = await kube.get("/api/v1/namespaces/default/services/kubernetes")
        target_port = int(service["spec"]["ports"][0]["targetPort"])
        documents = demo_documents(repo, demo_endpoints=demo_endpoints)
        paths = await resource_paths(kube, {doc["apiVersion"] for doc in documents})
        for doc in documents:
            if doc["kind"] == "EndpointSlice":
                # The demo endpoints use the port the Service's targetPort names.
                doc["ports"][0]["port"] = target_port
            _, path = object_path(paths, doc)
            await kube.patch(path, doc, patch_type="apply", field_manager=FIELD_MANAGER, force=True)
        await report_kube_proxy_ready(kube)
    finally:
        await kube.close()


async def report_kube_proxy_ready(kube: KubeClient) -> None:
    """No controller manager runs here, so nothing reports kube-proxy's pods: say what a
    healthy one-node cluster would (discovery checks that it is ready)."""
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


def zipkin_command(layout: Layout, port: int) -> list[str]:
    """The tracing UI's command line (the jar is fetched and cached by the installer)."""
    installer = subprocess.run(
        ["bash", str(layout.repo / "tools/install-tracing-ui.sh")],
        capture_output=True,
        text=True,
        check=False,
    )
    if installer.returncode != 0:
        raise UpError(f"the tracing UI could not be installed:\n{installer.stderr.strip()}")
    jar = installer.stdout.strip().splitlines()[-1]
    return [
        "java",
        "-Xms64m",
        "-Xmx384m",
        "-XX:TieredStopAtLevel=1",  # a quicker start matters more than peak speed
        f"-Djava.io.tmpdir={layout.state / 'tmp'}",
        "-jar",
        jar,
        f"--armeria.ports[0].port={port}",
        "--armeria.ports[0].ip=127.0.0.1",
        "--armeria.ports[0].protocols=http",
    ]


# --------------------------------------------------------------------------- the stack


class LocalStack:
    def __init__(self, layout: Layout, data_plane: DataPlane) -> None:
        self.layout = layout
        self.data_plane = data_plane
        self.ports = {name: procs.free_port(prefer=port) for name, port in PREFERRED_PORTS.items()}
        self.processes = ServiceProcesses(layout.logs, cwd=layout.repo)
        self.nats: StackNats | None = None
        self.control_plane: Plane | None = None
        self.wiring: Wiring | None = None
        self._recorded: dict[str, Any] = {}

    def start(self) -> Wiring:
        reset_runtime_state(self.layout)
        zipkin = self.ports["zipkin"]
        say(f"starting Zipkin (tracing UI) on 127.0.0.1:{zipkin}")
        # The slowest to start (a JVM): first, and waited for last.
        self.processes.start_command("zipkin", zipkin_command(self.layout, zipkin), os.environ)
        self.nats = start_nats(self.layout, self.ports["nats"])
        self.control_plane, kubeconfigs = start_control_plane(self.layout, ha=os.geteuid() == 0)
        ha = isinstance(self.control_plane, HAControlPlane)
        probes: dict[str, str] = {}
        if isinstance(self.control_plane, HAControlPlane):
            # For `apilane demo`; on the plane's bridge, so the node-loader probes the
            # apiservers' /readyz from there too and drops a dead one within about a second.
            demo_namespace = self.control_plane.client_namespace()
            probes = probe_environment(self.control_plane.ca_path, demo_namespace, kind="https")
        asyncio.run(seed(kubeconfigs["admin"], self.layout.repo, demo_endpoints=not ha))
        keys = StackKeys.generate(self.layout.keys)
        wiring = Wiring(
            self.layout,
            self.data_plane,
            self.ports,
            self.nats.server.url,
            keys,
            nats_roles=self.nats.roles,
            kubeconfigs=kubeconfigs,
            probe_env=probes,
        )
        self.start_services(wiring)
        self.processes.wait_ready(
            "zipkin", f"{wiring.url('zipkin')}/health", timeout=ZIPKIN_TIMEOUT
        )
        self.wiring = wiring
        self.layout.requests.mkdir(exist_ok=True)
        write_stack_file(self, wiring)
        return wiring

    def start_services(self, wiring: Wiring) -> None:
        if self.data_plane.cgroup is not None:
            # A dedicated child cgroup, empty: the connect-time load balancer applies to the
            # processes moved into it and to nothing else on this machine.
            self.data_plane.cgroup.mkdir(exist_ok=True)
        for service, module in SERVICES.items():
            say(f"starting {service} (python -m {module}) on {wiring.url(service)}")
            self.processes.start(service, module, service_env(wiring, service))
        for service in SERVICES:
            self.processes.wait_ready(
                service, f"{wiring.url(service)}/readyz", timeout=READY_TIMEOUT
            )
            say(f"{service} ready")

    def watch(self) -> NoReturn:
        """Until a signal (KeyboardInterrupt), or until a process dies (UpError, with its log)."""
        while True:
            try:
                self.processes.check_alive()
            except procs.ProcessExited as exc:
                raise UpError(str(exc)) from exc
            server = self.nats.server if self.nats is not None else None
            if server is not None and not server.running:
                raise UpError(f"nats-server exited; its log:\n{procs.tail(server.log_path)}")
            self.serve_requests()
            time.sleep(0.5)

    def serve_requests(self) -> None:
        """Start an apiserver for each replace request; keep the stack file current (an
        apiserver `simulate failover` killed shows there without a pid)."""
        plane, wiring = self.control_plane, self.wiring
        if not isinstance(plane, HAControlPlane) or wiring is None:
            return
        for request in sorted(self.layout.requests.glob("replace-*")):
            request.unlink(missing_ok=True)
            index = plane.add_apiserver()
            say(f"started {plane.apiserver_name(index)} at {plane.addresses[index]}")
        write_stack_file(self, wiring)

    def stop(self) -> None:
        say("stopping")
        self.processes.stop()
        if self.control_plane is not None:
            self.control_plane.stop()
        if self.nats is not None:
            self.nats.stop()
        if self.data_plane.cgroup is not None:
            remove_bpf_state(pin_dir=PIN_DIR, cgroup=self.data_plane.cgroup)
        # The applied-generation record goes with the maps it describes: kept alone, it would
        # claim a generation that the (now removed) maps no longer hold.
        shutil.rmtree(self.layout.node_loader_state, ignore_errors=True)
        self.layout.stack_file.unlink(missing_ok=True)
        say("stopped; state is kept in .apilane/ (`make clean` removes it)")


def write_stack_file(stack: LocalStack, wiring: Wiring) -> None:
    """.apilane/stack.json: where everything runs, for `apilane status` and for a later
    `apilane up` cleaning up after this one."""
    assert stack.control_plane is not None
    pids = {name: process.pid for name, process in stack.processes.processes.items()}
    record = stack_record(wiring, apiserver=stack.control_plane.url, pids=pids)
    if isinstance(stack.control_plane, HAControlPlane):
        record["ha"] = stack.control_plane.state()
        record["requests"] = str(wiring.layout.requests)
    if record != stack._recorded:
        stack._recorded = record
        temporary = wiring.layout.stack_file.with_suffix(".tmp")
        temporary.write_text(json.dumps(record, indent=2) + "\n")
        temporary.replace(wiring.layout.stack_file)  # readers never see half a file


def stack_record(wiring: Wiring, *, apiserver: str, pids: dict[str, int]) -> dict[str, Any]:
    bpf_backend = wiring.data_plane.cgroup is not None
    return {
        "pid": os.getpid(),
        "cluster": CLUSTER,
        "nats_url": wiring.nats_url,
        # What the CLI connects as: the operator's identity (APILANE_NATS_*).
        "operator_nats": {
            name: value
            for name, value in wiring.nats_roles.get(str(Role.OPERATOR), {}).items()
            if name != "APILANE_NATS_URL"
        },
        "kubeconfig": str(wiring.kubeconfigs["admin"]),
        "apiserver": apiserver,
        "zipkin_url": wiring.url("zipkin"),
        "trusted_keys": wiring.keys.trusted_keys,
        "operator_key_file": str(wiring.keys.operator_key_file),
        "map_backend": wiring.data_plane.backend,
        "node": NODE_NAME,
        "cgroup": str(wiring.data_plane.cgroup) if bpf_backend else "",
        "pin_dir": str(PIN_DIR) if bpf_backend else "",
        "processes": {
            name: {
                "pid": pid,
                "url": wiring.url(name),
                "log": str(wiring.layout.logs / f"{name}.log"),
            }
            for name, pid in pids.items()
        },
    }


def summary(wiring: Wiring, *, apiserver: str, nats_log: Path) -> str:
    repo = wiring.layout.repo
    rows = [
        ("nats-server", wiring.nats_url, str(nats_log.relative_to(repo))),
        (
            "kube-apiserver",
            apiserver,
            f"KUBECONFIG={wiring.kubeconfigs['admin'].relative_to(repo)}",
        ),
    ]
    for name in ("zipkin", *SERVICES):
        rows.append(
            (name, wiring.url(name), str((wiring.layout.logs / f"{name}.log").relative_to(repo)))
        )
    width = max(len(name) for name, _, _ in rows)
    lines = [f"  {name:<{width}}  {url:<32}  {DIM}{where}{RESET}" for name, url, where in rows]
    data_plane = (
        f"real eBPF maps pinned in {PIN_DIR}, programs on cgroup {wiring.data_plane.cgroup}"
        if wiring.data_plane.cgroup is not None
        else "in-memory maps (APILANE_MAP_BACKEND=memory)"
    )
    return "\n".join(
        [
            "",
            f"{BOLD}apilane is running{RESET} (cluster {CLUSTER!r}, node {NODE_NAME!r})",
            *lines,
            f"  node-loader data plane: {data_plane}",
            "",
            f"{BOLD}Tracing UI:{RESET} {wiring.url('zipkin')}/zipkin/",
            "",
            f"{BOLD}Try next{RESET} (in another terminal, with .venv/bin on PATH):",
            "  apilane status             # the snapshot, calico-node's env, each node",
            "  apilane demo               # call the API server through the VIP every 100 ms",
            "  apilane simulate failover  # kill one API server (--replace: start a new one)",
            f"  apilane node lb off {NODE_NAME}  # switch its connect-time LB (signed request)",
            f"  KUBECONFIG={wiring.kubeconfigs['admin'].relative_to(repo)} kubectl -n calico-system "
            "get ds calico-node -o yaml   # the rendered env",
            "",
            "Ctrl-C stops everything.",
        ]
    )


# --------------------------------------------------------------------------- state


def remove_bpf_state(*, pin_dir: Path | None, cgroup: Path | None) -> None:
    """Unpin the local stack's maps and links, then remove its cgroup (empty by design)."""
    if pin_dir is not None and pin_dir.is_dir():
        shutil.rmtree(pin_dir, ignore_errors=True)
    if cgroup is not None and cgroup.is_dir():
        try:
            cgroup.rmdir()
        except OSError as exc:
            say(f"could not remove cgroup {cgroup}: {exc.strerror} (processes still in it?)")


def reset_runtime_state(layout: Layout) -> None:
    """Each `apilane up` starts from nothing: a fresh control plane, an empty JetStream store,
    no node-loader record, new logs. (The kubeconfigs are rewritten as the stack starts.)"""
    for name in ("nats", "node-loader", "tmp", "logs", "keys"):
        shutil.rmtree(layout.state / name, ignore_errors=True)
    layout.logs.mkdir(parents=True)
    (layout.state / "tmp").mkdir()  # the tracing UI's and the control plane's temp files


def clean_up_after_previous_run(layout: Layout) -> None:
    """Refuse while another `apilane up` runs; after one that was killed outright (its
    children died with it), remove the eBPF state it left behind."""
    if not layout.stack_file.exists():
        return
    with contextlib.suppress(ValueError, OSError):
        previous = json.loads(layout.stack_file.read_text())
        if procs.pid_alive(int(previous.get("pid", 0))):
            raise UpError(f"the stack is already running (pid {previous['pid']}); Ctrl-C it first")
        pin_dir, cgroup = previous.get("pin_dir") or "", previous.get("cgroup") or ""
        remove_bpf_state(
            pin_dir=Path(pin_dir) if pin_dir else None, cgroup=Path(cgroup) if cgroup else None
        )
    layout.stack_file.unlink(missing_ok=True)


# --------------------------------------------------------------------------- the command


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def preflight(*, memory: bool) -> tuple[Layout, DataPlane]:
    repo = find_checkout()
    if repo is None:
        raise UpError("`apilane up` runs in an apilane checkout (it seeds deploy/ and runs bpf/)")
    missing = [module for module in SERVICES.values() if importlib.util.find_spec(module) is None]
    if missing:
        raise UpError(f"not installed: {', '.join(missing)} (run `make setup`)")
    layout = Layout(repo)
    clean_up_after_previous_run(layout)
    data_plane = check_data_plane(memory=memory)
    if memory:
        say("--memory: the node-loader runs on in-memory maps (APILANE_MAP_BACKEND=memory)")
    elif data_plane.missing:
        say("the node-loader cannot program real eBPF here:")
        for problem in data_plane.missing:
            print(f"    - {problem}", flush=True)
        say(f"{bpf.SETUP_HINT} (and run `sudo make up`)")
        say("continuing with APILANE_MAP_BACKEND=memory (same reconciler, maps in memory)")
    return layout, data_plane


def run(*, memory: bool) -> int:
    layout, data_plane = preflight(memory=memory)
    # Ctrl-C and SIGTERM stop the stack alike (SIGINT too when a shell started this in the
    # background, with SIGINT ignored). Every child is in a session of its own, so neither
    # reaches them: this process stops them in order.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _interrupt)
    stack = LocalStack(layout, data_plane)
    try:
        wiring = stack.start()
        assert stack.nats is not None and stack.control_plane is not None
        print(
            summary(wiring, apiserver=stack.control_plane.url, nats_log=stack.nats.server.log_path),
            flush=True,
        )
        if isinstance(stack.control_plane, HAControlPlane):
            plane = stack.control_plane
            for index, address in enumerate(plane.addresses):
                print(
                    f"  {plane.apiserver_name(index)}  https://{address}:6443  "
                    f"{DIM}netns {plane.netns[index]}, pid {plane.pid(index)}{RESET}"
                )
        stack.watch()
    except KeyboardInterrupt:
        print()
        return 0
    except (ApilaneError, RuntimeError, TimeoutError) as exc:
        # The harness's own failures: a component missing, exited or not ready in time.
        say(str(exc))
        return 1
    finally:
        # A second Ctrl-C must not cut the clean-up short (each stop is bounded).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stack.stop()
