"""The leading-edge coalescing rule, on a clock the test moves."""

from __future__ import annotations

import itertools

import pytest

from apilane.runtime.coalesce import LeadingEdge

pytestmark = [pytest.mark.unit]

WINDOW = 1.0


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def sends_for(arrivals: list[float], window: float = WINDOW) -> list[tuple[float, float]]:
    """Drive the rule as a service loop does: each send covers every change up to it.
    Returns (send time, the latest change it carried)."""
    clock = Clock()
    pace = LeadingEdge(window, clock=clock)
    sends: list[tuple[float, float]] = []
    queue = sorted(arrivals)
    while queue:
        clock.now = max(clock.now, queue[0])  # the loop sleeps until a change comes
        clock.now += pace.delay()  # then for what is left of the window
        carried = [a for a in queue if a <= clock.now]
        queue = queue[len(carried) :]
        pace.sent()
        sends.append((clock.now, carried[-1]))
    return sends


def test_a_lone_change_goes_out_at_once() -> None:
    assert sends_for([100.0]) == [(100.0, 100.0)]


def test_changes_a_quiet_window_apart_each_go_out_at_once() -> None:
    assert sends_for([100.0, 101.5, 103.0]) == [(100.0, 100.0), (101.5, 101.5), (103.0, 103.0)]


def test_a_burst_is_the_leading_send_and_one_trailing_send_of_the_latest_state() -> None:
    burst = [100.0 + i * 0.05 for i in range(10)]
    assert sends_for(burst) == [(100.0, 100.0), (101.0, burst[-1])]


def test_a_long_burst_gives_at_most_one_send_per_window() -> None:
    burst = [100.0 + i * 0.01 for i in range(500)]  # five seconds of changes
    sends = sends_for(burst)
    times = [t for t, _ in sends]
    assert all(b - a >= WINDOW for a, b in itertools.pairwise(times))
    assert len(sends) <= 1 + 5 / WINDOW + 1
    assert sends[-1][1] == burst[-1]  # the last state wins


def test_the_delay_is_what_is_left_of_the_window_since_the_last_send() -> None:
    clock = Clock()
    pace = LeadingEdge(WINDOW, clock=clock)
    assert pace.delay() == 0.0
    pace.sent()
    clock.now += 0.25
    assert pace.delay() == pytest.approx(0.75)
    clock.now += 0.75
    assert pace.delay() == 0.0
    clock.now += 10
    assert pace.delay() == 0.0


def test_reset_forgets_the_last_send() -> None:
    clock = Clock()
    pace = LeadingEdge(WINDOW, clock=clock)
    pace.sent()
    assert pace.delay() == WINDOW
    pace.reset()
    assert pace.delay() == 0.0


def test_a_zero_window_never_waits() -> None:
    clock = Clock()
    pace = LeadingEdge(0.0, clock=clock)
    pace.sent()
    assert pace.delay() == 0.0
    assert sends_for([100.0, 100.0, 100.1], window=0.0) == [
        (100.0, 100.0),
        (100.1, 100.1),
    ]
