"""Events of one kind published on a core subject, queued as they arrive: what a test or a
benchmark watches (render results, warnings) as the operator's identity would."""

from __future__ import annotations

import asyncio
from typing import Any, Generic, TypeVar

from apilane.model import events
from apilane.runtime.bus import Bus

E = TypeVar("E", bound=events.Event)


class Observed(Generic[E]):
    """`queue` holds each decoded `kind` in order; anything else lands in `unexpected`."""

    def __init__(self, kind: type[E]) -> None:
        self.kind = kind
        self.queue: asyncio.Queue[E] = asyncio.Queue()
        self.unexpected: list[object] = []
        self._subscription: Any = None

    async def subscribe(self, bus: Bus, subject: str) -> Observed[E]:
        self._subscription = await bus.nc.subscribe(subject, cb=self._arrived)
        await bus.nc.flush()  # subscribed on the server before anything is published
        return self

    async def _arrived(self, msg: Any) -> None:
        try:
            event = events.decode(msg.data)
        except Exception as exc:  # recorded for the test to see, never lost in a callback
            self.unexpected.append(exc)
            return
        if isinstance(event, self.kind):
            self.queue.put_nowait(event)
        else:
            self.unexpected.append(event)

    async def next(self, timeout: float) -> E:
        return await asyncio.wait_for(self.queue.get(), timeout=timeout)

    async def close(self) -> None:
        if self._subscription is not None:
            await self._subscription.unsubscribe()
            self._subscription = None
