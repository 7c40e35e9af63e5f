"""What every benchmark reports, computed one way: percentiles, the machine's load, and a
process's resident memory."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile, `fraction` in [0, 1] (0.5 is the median, 0.99 the p99)."""
    if not values:
        raise ValueError("percentile of no samples")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction {fraction} is outside [0, 1]")
    ordered = sorted(values)
    return float(ordered[round(fraction * (len(ordered) - 1))])


def load_average() -> str:
    """The 1, 5 and 15 minute load averages and the CPU count, for the table's caption."""
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f} ({os.cpu_count()} CPUs)"


def resident_kib(pid: int | str = "self") -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in KiB: resident now, and its peak."""
    fields = dict(
        line.split(":", 1)
        for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        if ":" in line
    )
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def cpu_seconds(pid: int | str = "self") -> float:
    """User plus system CPU time a process has used so far, in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    # Fields after the command name (which may hold spaces): utime and stime are 14th and 15th.
    fields = stat.rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def available_kib() -> int:
    """The memory the kernel says could be allocated without swapping (MemAvailable), KiB."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1])
    raise RuntimeError("no MemAvailable in /proc/meminfo")
