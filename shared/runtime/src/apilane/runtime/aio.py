"""Small asyncio helpers every service uses: one backoff, one "whichever comes first"."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass
class Backoff:
    """Exponential backoff with jitter: initial, 2x, 4x ... up to `maximum`, each delay drawn
    from [delay/2, delay] so that many clients do not reconnect in lockstep."""

    initial: float = 0.2
    maximum: float = 10.0
    attempts: int = 0
    rng: random.Random = field(default_factory=random.Random)

    def next_delay(self) -> float:
        ceiling = min(self.maximum, self.initial * 2.0**self.attempts)
        self.attempts += 1
        return ceiling / 2 + self.rng.random() * ceiling / 2

    def reset(self) -> None:
        self.attempts = 0

    async def sleep(self, stop: asyncio.Event | None = None) -> bool:
        """Wait the next delay; True if `stop` was set meanwhile (the caller should give up)."""
        delay = self.next_delay()
        if stop is None:
            await asyncio.sleep(delay)
            return False
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=delay)
        return stop.is_set()


async def first_of(*waits: Awaitable[object], timeout: float | None = None) -> int | None:
    """Wait until the first of `waits` finishes; cancel the rest. Returns the index of the one
    that finished first, or None on timeout. Exceptions of the cancelled ones are dropped;
    the winner's exception is raised."""
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        done, _ = await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    if not done:
        return None
    winner = next(i for i, task in enumerate(tasks) if task in done)
    if not tasks[winner].cancelled() and (exc := tasks[winner].exception()) is not None:
        raise exc
    return winner


async def unless_stopped(work: Awaitable[T], stop: asyncio.Event) -> T | None:
    """Await `work` unless `stop` comes first; then cancel it and return None.

    Cancelling the caller cancels `work` too and propagates: the work never outlives its
    caller, and the caller's cancellation is never mistaken for the work's."""
    task = asyncio.ensure_future(work)
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        stopper.cancel()
    if task.done():
        return task.result()
    await _cancel_until_done(task)
    return None


CANCEL_RETRY = 0.5  # seconds between two cancellations of work that has not ended yet


async def _cancel_until_done(task: asyncio.Future[Any]) -> None:
    """Cancel `task` and wait until it has ended, cancelling it again while it runs on: a
    cancellation can be lost (Python 3.11's `wait_for` drops one that races the inner
    result, and nats-py's connect loop then retries as if nothing happened)."""
    try:
        while not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=CANCEL_RETRY)
    except asyncio.CancelledError:
        task.cancel()  # the caller was cancelled meanwhile: so is the work, and it propagates
        raise
    if not task.cancelled():
        with contextlib.suppress(Exception):  # the work was abandoned: its failure is moot
            task.result()


async def set_when_any(target: asyncio.Event, *sources: asyncio.Event) -> None:
    """Set `target` as soon as any of `sources` is set."""
    await first_of(*(source.wait() for source in sources))
    target.set()
