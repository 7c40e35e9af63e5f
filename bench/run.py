"""`make bench`: run every bench/bench_*.py in turn and print their tables.

Each benchmark prints its own markdown table (median and p99, and ratios measured side by
side in one run: the machine is shared and noisy). Select some with `make bench BENCH=apply`; give the selected one arguments with
`make bench BENCH=fanout BENCH_ARGS="--sizes 50,500"`.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    wanted = os.environ.get("BENCH", "")
    # Passed to each selected script: meant for one (`BENCH=fanout BENCH_ARGS="--sizes 50"`).
    arguments = shlex.split(os.environ.get("BENCH_ARGS", ""))
    # The end-to-end run starts dozens of processes and leaves the load average high for a
    # while: it goes last so it does not disturb the others' figures.
    scripts = sorted(
        (p for p in HERE.glob("bench_*.py") if wanted in p.stem),
        key=lambda p: (p.stem == "bench_e2e", p.stem),
    )
    # A name that is a script's own selects that script alone (BENCH=fanout is not also
    # bench_fanout_delivery, whose options differ); any other part of a name selects all.
    exact = [p for p in scripts if p.stem == f"bench_{wanted}"]
    scripts = exact or scripts
    failures = []
    for script in scripts:
        print(f"\n## {script.stem}\n", flush=True)
        began = time.monotonic()
        result = subprocess.run([sys.executable, str(script), *arguments], check=False)
        print(
            f"\n({script.name}: {time.monotonic() - began:.1f}s, exit {result.returncode})",
            flush=True,
        )
        if result.returncode != 0:
            failures.append(script.name)
    if failures:
        print(f"\nfailed: {', '.join(failures)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
