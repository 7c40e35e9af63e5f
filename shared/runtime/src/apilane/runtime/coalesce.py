"""apilane's one coalescing rule: the leading edge goes out at once, the rest once per window.

A change after a quiet period (no send for a whole window) is sent at once: a lone change
never waits. Changes that come while the window since the last send is open wait for its
end and go out together, as one trailing send of the latest state. A burst therefore gives
at most one send per window: the leading one, then one trailing send per window while it
lasts. Pure apart from the clock, which tests pass in.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class LeadingEdge:
    """When the pending state may be sent: now after a quiet window, else at the window's end."""

    window: float
    clock: Callable[[], float] = time.monotonic
    _last_sent: float | None = None

    def delay(self) -> float:
        """Seconds to wait before sending what is pending (0: send now)."""
        if self._last_sent is None:
            return 0.0
        return max(0.0, self._last_sent + self.window - self.clock())

    def sent(self) -> None:
        """A send started now: it opens the window the next changes coalesce in."""
        self._last_sent = self.clock()

    def reset(self) -> None:
        """Forget the last send: the next change goes out at once."""
        self._last_sent = None
