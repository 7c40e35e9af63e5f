"""The real loader process on the live kernel: restarts and `kill -9` mid-apply.

The loader runs through its entry point (`python -m apilane.node_loader`) with the bpf map
backend, attached to a dedicated test cgroup, fed by a real nats-server. The test process
opens the same pinned maps (a second ConnectTimeLB, never attached) to read them back, and
connects to the service address from a client namespace with no default route.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from apilane.model import events, subjects
from apilane.model.events import NodeState
from apilane.node_loader.desired import desired_state, target_contents
from apilane.node_loader.memmaps import render_resolved
from apilane.node_loader.plan import check_invariants, dangling_references
from apilane.node_loader.programs import ConnectTimeLB
from apilane.node_loader.testing import contents_of
from apilane.runtime.bus import Bus
from apilane.runtime.natsauth import Role
from apilane.testing.bpf import SERVICE_VIP4, BpfLab
from apilane.testing.procs import end_process, tail
from apilane.testing.sealing import put_sealed, seal, trusted_env
from apilane.testing.snapshots import make_snapshot

pytestmark = [pytest.mark.integration, pytest.mark.bpf, pytest.mark.nats]

CLUSTER = "kern"
NODE = "kernel-node"
BACKEND_PORT = 8080
SERVICE_PORT = 443
# Enough frontends that one change is thousands of map operations: a kill lands mid-apply.
BUSY_SERVICES = tuple(f"10.96.{i // 200 + 1}.{i % 200 + 1}:{SERVICE_PORT}" for i in range(3000))


class LoaderProcess:
    def __init__(
        self, *, nats_env: dict[str, str], cgroup: Path, pin_dir: Path, state_dir: Path, log: Path
    ) -> None:
        self.env = {
            **os.environ,
            **nats_env,  # APILANE_NATS_URL and this node's own credentials
            "APILANE_CLUSTER": CLUSTER,
            "APILANE_NODE_NAME": NODE,
            # Backends here are addresses no probe may reach from this host: probing is off.
            "APILANE_BACKEND_PROBE": "off",
            "APILANE_MAP_BACKEND": "bpf",
            "APILANE_CGROUP_PATH": str(cgroup),
            "APILANE_BPF_PIN_DIR": str(pin_dir),
            "APILANE_STATE_DIR": str(state_dir),
            "APILANE_HTTP_HOST": "127.0.0.1",
            "APILANE_HTTP_PORT": "0",
            "APILANE_NODE_STATE_INTERVAL": "500ms",
            "OTEL_SDK_DISABLED": "true",
            **trusted_env(),
        }
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "apilane.node_loader"],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def stop(self) -> None:
        if self.proc is not None:
            end_process(self.proc)
            self.proc = None

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)  # by the pid we started
        self.proc.wait(timeout=10)
        self.proc = None

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(
                f"loader exited with {self.proc.returncode}:\n{tail(self.log, 60)}"
            )


@pytest.fixture
def kernel_lab() -> Iterator[BpfLab]:
    from apilane.testing.bpf import check_bpf_environment
    from apilane.testing.procs import ComponentMissing

    try:
        root = check_bpf_environment()
    except ComponentMissing as exc:
        pytest.fail(str(exc), pytrace=False)
    with BpfLab(cgroup_root=root) as lab:
        yield lab


def mapped_compiler_libraries(pid: int) -> list[str]:
    """The bcc / LLVM / clang libraries mapped into process `pid`."""
    mapped = Path(f"/proc/{pid}/maps").read_text()
    return sorted({n for n in ("libbcc", "libLLVM", "libclang") if n in mapped})


async def node_state(bus: Bus) -> NodeState | None:
    entry = await bus.kv_get(subjects.NODE_STATE_BUCKET, subjects.node_state_key(CLUSTER, NODE))
    decoded = events.decode(entry.value) if entry else None
    assert decoded is None or isinstance(decoded, NodeState)
    return decoded


async def wait_generation(
    bus: Bus, loader: LoaderProcess, generation: int, timeout: float = 60
) -> NodeState:
    deadline = time.monotonic() + timeout
    state = None
    while time.monotonic() < deadline:
        loader.check_alive()
        state = await node_state(bus)
        if state is not None and state.generation >= generation:
            return state
        await asyncio.sleep(0.05)
    raise AssertionError(
        f"loader never reached generation {generation}: {state}\n{tail(loader.log, 40)}"
    )


async def wait_log(loader: LoaderProcess, text: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while text not in loader.log.read_text():
        loader.check_alive()
        if time.monotonic() > deadline:
            raise AssertionError(f"never logged {text!r}:\n{tail(loader.log, 40)}")
        await asyncio.sleep(0.05)


async def put(discovery: Bus, snapshot) -> None:
    await put_sealed(discovery, seal(snapshot), cluster=CLUSTER)


def resolved_target(snapshot) -> list[str]:
    return render_resolved(target_contents(desired_state(snapshot), {}))


def assert_unique_ids(contents) -> None:
    for family, maps in contents.items():
        ids = [v.service_id for v in maps.frontends.values()]
        assert len(ids) == len(set(ids)), f"duplicate {family} ids: {sorted(ids)}"


async def test_restart_and_kill_minus_9_mid_apply_converge(
    kernel_lab, bus, connect_as, nats_server, tmp_path
):
    lab = kernel_lab
    discovery = await connect_as(Role.DISCOVERY, CLUSTER)  # writes; `bus` (the operator) reads
    topology = lab.topology(backends=3)
    for backend in topology.backends:
        lab.server(netns=backend.netns, addresses=[backend.ipv4], ports=[BACKEND_PORT])
    backends = [b.ipv4 for b in topology.backends]
    cgroup, pin_dir = lab.child_cgroup(), lab.pin_dir()
    agent = lab.agent(netns=topology.client, cgroup=cgroup)
    loader = LoaderProcess(
        nats_env=nats_server.env(Role.NODE_LOADER, CLUSTER, NODE),
        cgroup=cgroup,
        pin_dir=pin_dir,
        state_dir=tmp_path / "state",
        log=tmp_path / "loader.log",
    )
    reader = ConnectTimeLB(
        cgroup_path=cgroup, pin_dir=pin_dir
    )  # reads the pinned maps; never attached
    try:
        loader.start()
        first = make_snapshot(
            cluster=CLUSTER, generation=1, apiservers=[f"{ip}:{BACKEND_PORT}" for ip in backends]
        )
        await put(discovery, first)
        state = await wait_generation(bus, loader, 1)
        assert len(state.programs_attached) == 8, state
        # The long-running process works on the pins: bcc and LLVM stay in the compile child.
        assert loader.proc is not None
        assert mapped_compiler_libraries(loader.proc.pid) == []
        # __main__ started the compile child before its own imports, and the loader used it.
        assert '"started_early": true' in loader.log.read_text()
        servers = {r["server"][0] for r in agent.tcp_request(SERVICE_VIP4, SERVICE_PORT, count=30)}
        assert servers == set(backends)

        # A graceful restart keeps the maps exactly as they are, with the same ids.
        before = contents_of(reader.nat_maps)
        loader.stop()
        assert agent.tcp_request(SERVICE_VIP4, SERVICE_PORT)[0]["error"] is None  # loader down
        loader.start()
        await asyncio.sleep(0.5)
        await wait_generation(bus, loader, 1)
        await asyncio.sleep(1.0)  # it has read the KV value (same generation: ignored)
        # The restart compiled nothing: pins and attached programs matched its build stamp.
        await wait_log(loader, "reusing the pinned maps and the attached programs")
        assert loader.log.read_text().count('"msg": "compile child done"') == 1
        assert contents_of(reader.nat_maps) == before
        assert_unique_ids(before)

        # Keep the loader busy with big changes, then kill -9 it while it works through them.
        generation = 1
        for _ in range(6):
            generation += 1
            chosen = backends[: 1 + generation % 3]
            await put(
                discovery,
                make_snapshot(
                    cluster=CLUSTER,
                    generation=generation,
                    services=(f"{SERVICE_VIP4}:{SERVICE_PORT}", *BUSY_SERVICES),
                    apiservers=[f"{ip}:{BACKEND_PORT}" for ip in chosen],
                ),
            )
        # Watch the maps and kill the moment they show an apply in progress (new backends
        # written, old ones not yet deleted); bounded, and the test holds either way.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not check_invariants(contents_of(reader.nat_maps)):
            loader.check_alive()
        loader.kill9()

        # At the kill point, make-before-break held: no frontend references a missing ordinal,
        # and the data plane still translates.
        at_kill = contents_of(reader.nat_maps)
        assert dangling_references(at_kill) == []
        # Whether the kill landed mid-apply (usually: stale entries not yet deleted, or
        # frontends partly switched), for the log; the assertions hold either way.
        print(
            f"state at kill -9: {sorted({str(v.kind) for v in check_invariants(at_kill)}) or 'consistent'}"
        )
        assert agent.tcp_request(SERVICE_VIP4, SERVICE_PORT)[0]["error"] is None

        latest = make_snapshot(
            cluster=CLUSTER,
            generation=generation + 1,
            services=(f"{SERVICE_VIP4}:{SERVICE_PORT}", *BUSY_SERVICES[:50]),
            apiservers=[f"{backends[0]}:{BACKEND_PORT}", f"{backends[2]}:{BACKEND_PORT}"],
        )
        await put(discovery, latest)
        loader.start()
        await wait_generation(bus, loader, latest.generation)
        loader.stop()

        after = contents_of(reader.nat_maps)
        assert check_invariants(after) == []
        assert_unique_ids(after)
        assert render_resolved(after) == resolved_target(latest)
        servers = {r["server"][0] for r in agent.tcp_request(SERVICE_VIP4, SERVICE_PORT, count=30)}
        assert servers == {backends[0], backends[2]}
        # The state file holds the latest generation: a further restart would change nothing.
        saved = list((tmp_path / "state").glob("*.state.json"))
        assert len(saved) == 1 and f'"generation":{latest.generation}' in saved[0].read_text()
    finally:
        loader.stop()
        reader.disable()  # detaches the links the loader pinned; the lab removes pins and cgroup
        reader.close()
