"""The asyncio helpers: backoff, first_of, unless_stopped, set_when_any."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from apilane.runtime.aio import CANCEL_RETRY, Backoff, first_of, set_when_any, unless_stopped

pytestmark = [pytest.mark.unit]


def test_backoff_doubles_up_to_the_maximum_with_jitter_in_the_upper_half() -> None:
    backoff = Backoff(initial=0.1, maximum=0.8, rng=random.Random(3))
    delays = [backoff.next_delay() for _ in range(6)]
    ceilings = [0.1, 0.2, 0.4, 0.8, 0.8, 0.8]
    for delay, ceiling in zip(delays, ceilings, strict=True):
        assert ceiling / 2 <= delay <= ceiling
    backoff.reset()
    assert backoff.next_delay() <= 0.1


async def test_backoff_sleep_returns_early_and_true_when_stopped() -> None:
    stop = asyncio.Event()
    backoff = Backoff(initial=30.0, maximum=30.0)
    asyncio.get_running_loop().call_later(0.05, stop.set)
    began = asyncio.get_running_loop().time()
    assert await backoff.sleep(stop) is True
    assert asyncio.get_running_loop().time() - began < 5
    assert await Backoff(initial=0.001, maximum=0.001).sleep(asyncio.Event()) is False


async def test_first_of_returns_the_winner_and_cancels_the_rest() -> None:
    slow_cancelled = asyncio.Event()

    async def slow() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            slow_cancelled.set()
            raise

    assert await first_of(slow(), asyncio.sleep(0.01)) == 1
    assert slow_cancelled.is_set()
    assert await first_of(asyncio.sleep(30), timeout=0.01) is None


async def test_first_of_raises_the_winners_exception() -> None:
    async def fails() -> None:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        await first_of(fails(), asyncio.sleep(30))


async def test_unless_stopped_gives_the_result_or_none_when_stopped_first() -> None:
    async def value() -> int:
        return 7

    assert await unless_stopped(value(), asyncio.Event()) == 7
    stop = asyncio.Event()
    stop.set()
    assert await unless_stopped(asyncio.sleep(30, result=1), stop) is None


async def test_unless_stopped_cancels_again_work_that_lost_a_cancellation() -> None:
    """As nats-py's connect loop does when Python 3.11's wait_for drops a cancellation that
    raced a failed attempt: the work carries on as if never cancelled."""
    cancellations = 0

    async def retries_forever() -> int:
        nonlocal cancellations
        while True:
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancellations += 1
                if cancellations == 1:
                    continue  # the first cancellation is lost
                raise

    stop = asyncio.Event()
    stop.set()
    began = time.monotonic()
    assert await unless_stopped(retries_forever(), stop) is None
    assert cancellations == 2
    assert time.monotonic() - began < 5 * CANCEL_RETRY


async def test_set_when_any_sets_the_target_once_one_source_is_set() -> None:
    target, first, second = asyncio.Event(), asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(set_when_any(target, first, second))
    await asyncio.sleep(0)
    assert not target.is_set()
    second.set()
    await asyncio.wait_for(task, 2)
    assert target.is_set()


async def test_cancelling_the_caller_of_unless_stopped_cancels_the_work_and_propagates() -> None:
    started = asyncio.Event()
    work_cancelled = asyncio.Event()

    async def work() -> int:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            work_cancelled.set()
            raise
        return 1

    caller = asyncio.ensure_future(unless_stopped(work(), asyncio.Event()))
    await started.wait()
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert work_cancelled.is_set()


async def test_a_caller_cancelled_while_the_stopped_work_winds_down_stays_cancelled() -> None:
    winding_down = asyncio.Event()

    async def slow_to_stop() -> int:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            winding_down.set()
            await asyncio.sleep(30)
            raise
        return 1

    stop = asyncio.Event()
    caller = asyncio.ensure_future(unless_stopped(slow_to_stop(), stop))
    await asyncio.sleep(0)
    stop.set()
    await winding_down.wait()
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(caller, timeout=5)
