"""Waiting for a condition in tests, bounded, failing with what was waited for."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def until(
    check: Callable[[], object], *, what: str, timeout: float = 20.0, every: float = 0.01
) -> float:
    """Poll `check` every `every` seconds until it is true; the seconds that took."""
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        if check():
            return time.monotonic() - began
        await asyncio.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


async def until_found(
    check: Callable[[], Awaitable[T | None]],
    *,
    what: str,
    timeout: float = 15.0,
    every: float = 0.05,
) -> T:
    """Await `check` every `every` seconds until it gives something true; that value."""
    deadline = time.monotonic() + timeout
    found: T | None = None
    while time.monotonic() < deadline:
        found = await check()
        if found:
            return found
        await asyncio.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {found!r})")
