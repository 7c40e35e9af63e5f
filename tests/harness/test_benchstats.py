"""The benchmarks' shared statistics."""

from __future__ import annotations

import os
import time

import pytest

from apilane.testing.benchstats import (
    available_kib,
    cpu_seconds,
    load_average,
    percentile,
    resident_kib,
)

pytestmark = [pytest.mark.unit]


def test_percentile_is_nearest_rank_over_the_sorted_samples() -> None:
    samples = [float(v) for v in range(100, 0, -1)]  # 1..100, unsorted
    assert percentile(samples, 0.0) == 1.0
    assert percentile(samples, 0.5) == 51.0
    assert percentile(samples, 0.99) == 99.0
    assert percentile(samples, 1.0) == 100.0
    assert percentile([7.0], 0.99) == 7.0


@pytest.mark.parametrize(("values", "fraction"), [([], 0.5), ([1.0], 1.5), ([1.0], -0.1)])
def test_percentile_refuses_what_has_no_answer(values: list[float], fraction: float) -> None:
    with pytest.raises(ValueError):
        percentile(values, fraction)


def test_resident_memory_of_this_process_and_by_pid() -> None:
    rss, peak = resident_kib()
    assert 0 < rss <= peak
    assert resident_kib(os.getpid())[0] > 0


def test_load_average_names_the_cpu_count() -> None:
    assert load_average().endswith(f"({os.cpu_count()} CPUs)")


def test_cpu_seconds_grow_with_work_done() -> None:
    before = cpu_seconds()
    deadline = time.process_time() + 0.1
    while time.process_time() < deadline:
        pass
    after = cpu_seconds(os.getpid())
    assert after >= before + 0.05  # 100 Hz ticks: some slack


def test_available_memory_is_some_of_the_total() -> None:
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 1024
    assert 0 < available_kib() <= total
