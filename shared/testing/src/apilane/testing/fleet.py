"""Many real node-loaders spread over worker processes, for the fan-out bench and its test.

A worker (`bench/fleet_worker.py`: the harness imports no service, so the loaders live
there) runs its share of the loaders, each the real `NodeLoader` on `MemoryNatMaps` with its
own NATS connection and node identity, on its own event loop. `ProcessFleet` starts the
workers and drives them.

The control protocol is JSON lines: the parent writes one command to a worker's stdin and
reads one answer from its stdout (the worker's own stdout is moved to stderr, so nothing
else can land on the channel): `start` (the specs), `settle` (a generation, a revision, a
timeout), `usage`, `stop`. Times cross processes as wall-clock epoch seconds: on one
machine every process reads the same clock. Every wait is bounded; a worker also ends when
its stdin closes (the parent went away), after its deadline, and with its parent
(PR_SET_PDEATHSIG); the parent ends every worker by its pid when the fleet closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import msgspec

from apilane.runtime.config import NatsAuth
from apilane.testing import loaders
from apilane.testing.benchstats import cpu_seconds, resident_kib
from apilane.testing.nats import auth_env
from apilane.testing.procs import _die_with_parent, pid_alive

START_BATCH = 100  # loaders started at once (their first connect and reconcile)
START_TIMEOUT = 120.0  # per batch
WORKER_DEADLINE = 3600.0  # a worker's whole life
MESSAGE_LIMIT = 256 * 1024 * 1024  # one JSON line: N loaders' specs or times


class LoaderSpec(msgspec.Struct, frozen=True):
    """One loader: its node name and its whole environment (APILANE_* settings)."""

    node: str
    env: dict[str, str]


def loader_env(
    *, url: str, auth: NatsAuth, cluster: str, node: str, state_dir: Path, fanout: str
) -> dict[str, str]:
    """A bench loader's settings: memory maps, node state every 30 s, trusting TEST_KEY, and
    no backend probes: the snapshots' backends are addresses nothing here may connect to."""
    return loaders.loader_env(
        {"APILANE_NATS_URL": url, **auth_env(auth)},
        cluster=cluster,
        node=node,
        workdir=state_dir,
        heartbeat="30s",
        APILANE_BPF_PIN_DIR=f"/bench/{node}",
        APILANE_STATE_DIR=str(state_dir),
        APILANE_SNAPSHOT_FANOUT=fanout,
    )


class Settled(msgspec.Struct):
    """Where a fleet stands for one generation: how many loaders have applied it (or a
    later one), when each of those applied it, and when the write's revision reached each
    loader's intake (epoch seconds)."""

    current: int
    applied: list[float]
    arrived: list[float]

    @staticmethod
    def merge(parts: Sequence[Settled]) -> Settled:
        return Settled(
            current=sum(p.current for p in parts),
            applied=[t for p in parts for t in p.applied],
            arrived=[t for p in parts for t in p.arrived],
        )


class Usage(msgspec.Struct):
    """One process's footprint: its loaders, resident memory, CPU time used so far."""

    pid: int
    loaders: int
    rss_kib: int
    cpu_s: float


def own_usage(loaders: int) -> Usage:
    return Usage(pid=os.getpid(), loaders=loaders, rss_kib=resident_kib()[0], cpu_s=cpu_seconds())


async def until(check: Callable[[], bool], timeout: float, interval: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        await asyncio.sleep(interval)
    return check()


# --------------------------------------------------------------------------- over processes


class Worker:
    """One worker process and its command channel."""

    def __init__(self, proc: asyncio.subprocess.Process, specs: Sequence[LoaderSpec]) -> None:
        self.proc = proc
        self.specs = specs

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def ask(self, command: dict[str, Any], timeout: float) -> Any:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(msgspec.json.encode(command) + b"\n")
        await self.proc.stdin.drain()
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not line:
            raise RuntimeError(f"fleet worker {self.pid} exited (code {self.proc.returncode})")
        answer = msgspec.json.decode(line)
        if "error" in answer:
            raise RuntimeError(f"fleet worker {self.pid}: {answer['error']}")
        return answer["ok"]

    async def end(self, grace: float = 10.0) -> None:
        """Ask it to stop its loaders, then SIGTERM and SIGKILL it by its pid if need be."""
        if self.proc.returncode is None:
            with contextlib.suppress(Exception):
                await self.ask({"op": "stop"}, timeout=grace + 60)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if self.proc.returncode is not None:
                return
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.proc.wait(), grace)


def split(specs: Sequence[LoaderSpec], parts: int) -> list[list[LoaderSpec]]:
    """`specs` dealt round-robin into at most `parts` non-empty shares."""
    shares: list[list[LoaderSpec]] = [[] for _ in range(max(1, min(parts, len(specs))))]
    for spec, share in zip(specs, itertools.cycle(shares), strict=False):
        share.append(spec)
    return shares


class ProcessFleet:
    """Loaders spread over `processes` workers, each on its own event loop."""

    def __init__(
        self,
        specs: Sequence[LoaderSpec],
        *,
        processes: int,
        worker: Sequence[str],
        log_dir: Path,
    ) -> None:
        """`worker`: the command that runs one worker (`python bench/fleet_worker.py`)."""
        self.shares = split(specs, processes)
        self.worker = list(worker)
        self.size = len(specs)
        self.log_dir = log_dir
        self.workers: list[Worker] = []

    async def _spawn(self, index: int, share: Sequence[LoaderSpec]) -> Worker:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = os.open(
            self.log_dir / f"fleet-worker-{index}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND
        )
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.worker,
                "--deadline",
                str(WORKER_DEADLINE),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
                start_new_session=True,
                preexec_fn=_die_with_parent,  # only a prctl, safe before exec
                limit=MESSAGE_LIMIT,
            )
        finally:
            os.close(log)
        return Worker(proc, share)

    async def start(self) -> float:
        """Start every worker and its loaders; seconds until the slowest worker's loaders
        had all first reconciled (counted from when it began starting them)."""
        for index, share in enumerate(self.shares):
            self.workers.append(await self._spawn(index, share))
        bound = START_TIMEOUT * (len(self.shares[0]) // START_BATCH + 1) + 30
        took = await asyncio.gather(
            *(
                w.ask({"op": "start", "specs": msgspec.to_builtins(w.specs)}, bound)
                for w in self.workers
            )
        )
        return float(max(took))

    async def _all(self, command: dict[str, Any], timeout: float) -> list[Any]:
        return list(await asyncio.gather(*(w.ask(command, timeout) for w in self.workers)))

    async def settle(self, generation: int, revision: int, timeout: float) -> Settled:
        command = {"op": "settle", "generation": generation, "revision": revision}
        answers = await self._all({**command, "timeout": timeout}, timeout + 30)
        return Settled.merge([msgspec.convert(a, Settled) for a in answers])

    async def usage(self) -> list[Usage]:
        answers = await self._all({"op": "usage"}, 30)
        return [msgspec.convert(u, Usage) for a in answers for u in a]

    @property
    def pids(self) -> list[int]:
        return [w.pid for w in self.workers]

    def alive(self) -> list[int]:
        return [pid for pid in self.pids if pid_alive(pid)]

    async def close(self) -> None:
        await asyncio.gather(*(w.end() for w in self.workers))
