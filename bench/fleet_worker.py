"""A fan-out fleet worker: its share of the loaders on its own event loop, driven over stdin.

Started by `apilane.testing.fleet.ProcessFleet` (`python bench/fleet_worker.py`), which
describes the protocol; `LocalFleet` is also usable on its own, in one process. Each loader
is the real `NodeLoader` (intake, admission, reconcile, node-state reporting) on
`MemoryNatMaps`, with its own NATS connection and node identity.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import resource
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import msgspec
from prometheus_client import CollectorRegistry

from apilane.node_loader import settings as loader_settings
from apilane.node_loader.memmaps import MemoryNatMaps
from apilane.node_loader.service import DataPlane, NodeLoader
from apilane.runtime.bus import KvEntry
from apilane.testing.fleet import (
    MESSAGE_LIMIT,
    START_BATCH,
    START_TIMEOUT,
    WORKER_DEADLINE,
    LoaderSpec,
    Settled,
    Usage,
    own_usage,
    until,
)


def all_started(loaders: Sequence[NodeLoader]) -> bool:
    return all(x.first_reconcile_done for x in loaders)


class LocalFleet:
    """Loaders on the calling event loop."""

    def __init__(self, specs: Sequence[LoaderSpec]) -> None:
        self.arrivals: dict[str, dict[int, float]] = {}
        self.loaders = [self._loader(spec) for spec in specs]
        self.size = len(self.loaders)
        self.stopping = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []

    def _loader(self, spec: LoaderSpec) -> NodeLoader:
        loader = NodeLoader(
            settings=loader_settings.load(spec.env),
            data_plane=DataPlane(maps=MemoryNatMaps()),
            registry=CollectorRegistry(),
        )
        arrivals = self.arrivals.setdefault(spec.node, {})
        handle = loader.handle_entry

        async def arrived(entry: KvEntry) -> None:
            # When the value reached this loader, before admission and apply: the fan-out's
            # own share of the latency (apply is the same code either way).
            arrivals[entry.revision] = time.time()
            await handle(entry)

        loader.handle_entry = arrived  # type: ignore[method-assign]
        return loader

    async def start(self) -> float:
        """Start every loader, a batch at a time; seconds until all first reconciled."""
        began = time.monotonic()
        for first in range(0, self.size, START_BATCH):
            batch = self.loaders[first : first + START_BATCH]
            self.tasks += [asyncio.create_task(loader.run(self.stopping)) for loader in batch]
            if not await until(functools.partial(all_started, batch), START_TIMEOUT):
                ready = sum(1 for x in self.loaders if x.first_reconcile_done)
                raise RuntimeError(f"only {ready} of {self.size} loaders started in time")
        return time.monotonic() - began

    def current(self, generation: int) -> int:
        return sum(1 for x in self.loaders if x.reconciler.applied_generation >= generation)

    async def settle(self, generation: int, revision: int, timeout: float) -> Settled:
        """Wait (at most `timeout` s) until every loader has applied `generation`."""
        await until(lambda: self.current(generation) == self.size, timeout)
        applied = [
            x.reconciler.applied.applied_at.timestamp()
            for x in self.loaders
            if x.reconciler.applied is not None and x.reconciler.applied_generation >= generation
        ]
        arrived = [got[revision] for got in self.arrivals.values() if revision in got]
        return Settled(current=self.current(generation), applied=applied, arrived=arrived)

    async def usage(self) -> list[Usage]:
        return [own_usage(self.size)]

    async def close(self) -> None:
        self.stopping.set()
        if self.tasks:
            await asyncio.wait_for(asyncio.gather(*self.tasks, return_exceptions=True), 60)


class WorkerLoop:
    """A worker's side of the protocol: one `LocalFleet`, driven by the parent's commands."""

    def __init__(self) -> None:
        self.fleet: LocalFleet | None = None

    async def handle(self, command: dict[str, Any]) -> Any:
        op = command["op"]
        if op == "start":
            self.fleet = LocalFleet(msgspec.convert(command["specs"], list[LoaderSpec]))
            return await self.fleet.start()
        fleet = self.fleet
        if fleet is None:
            raise RuntimeError(f"{op!r} before 'start'")
        if op == "settle":
            got = await fleet.settle(command["generation"], command["revision"], command["timeout"])
            return msgspec.to_builtins(got)
        if op == "usage":
            return msgspec.to_builtins(await fleet.usage())
        if op == "stop":
            await fleet.close()
            return True
        raise RuntimeError(f"unknown command {op!r}")

    async def serve(self, reader: asyncio.StreamReader, out: Any) -> None:
        while line := await reader.readline():
            try:
                answer = {"ok": await self.handle(msgspec.json.decode(line))}
            except Exception as exc:  # reported to the parent, which raises
                answer = {"error": f"{type(exc).__name__}: {exc}"}
            out.write(msgspec.json.encode(answer) + b"\n")
            out.flush()
        if self.fleet is not None:  # the parent went away
            await self.fleet.close()


async def serve_stdin(deadline: float) -> None:
    # The channel is a private copy of stdout; fd 1 goes to stderr from here on.
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=MESSAGE_LIMIT)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    await asyncio.wait_for(WorkerLoop().serve(reader, out), deadline)


def main() -> int:
    parser = argparse.ArgumentParser(description="A fleet worker: loaders driven over stdin")
    parser.add_argument("--deadline", type=float, default=WORKER_DEADLINE)
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    print(f"fleet worker {os.getpid()} up at {datetime.now(UTC).isoformat()}", file=sys.stderr)
    asyncio.run(serve_stdin(args.deadline))
    return 0


if __name__ == "__main__":
    sys.exit(main())
