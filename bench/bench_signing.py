"""Signed snapshots: what sealing and opening cost per snapshot, in-process.

Sealing is what discovery adds to every publish and refresh (`seal_snapshot`: encode and
sign); opening is what the renderer adds before anything else (`open_snapshot`: verify,
decode, check header and digest, then `judge`). Both for 3 API server endpoints (a usual
control plane) and 100 (far beyond any real one), ROUNDS times each.

    .venv/bin/python bench/bench_signing.py          # ROUNDS=3000 by default
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from datetime import timedelta

from apilane.model.signing import (
    Held,
    SigningKey,
    TrustedKeys,
    judge,
    open_snapshot,
    seal_snapshot,
    utcnow,
)
from apilane.testing.benchstats import load_average, percentile
from apilane.testing.snapshots import make_snapshot

ROUNDS = int(os.environ.get("ROUNDS", "3000"))
TTL = timedelta(hours=1)


def timed(work: Callable[[], object]) -> list[float]:
    """Microseconds per call, after a warm-up."""
    for _ in range(min(200, ROUNDS)):
        work()
    samples = []
    for _ in range(ROUNDS):
        began = time.perf_counter_ns()
        work()
        samples.append((time.perf_counter_ns() - began) / 1000)
    return samples


def main() -> int:
    key = SigningKey.generate()
    trusted = TrustedKeys.of(key, SigningKey.generate())  # two keys, as during a rotation
    now = utcnow()
    held = Held(generation=6, content_digest="sha256:" + "0" * 64)  # the generation before
    rows = []
    for count in (3, 100):
        snapshot = make_snapshot(
            generation=7,
            services=("10.96.0.1:443", "[fd00:10:96::1]:443"),
            apiservers=[f"192.168.{i // 250}.{i % 250 + 1}:6443" for i in range(count)],
        )
        sealed = seal_snapshot(key, snapshot, now=now, ttl=TTL)
        seal = timed(lambda s=snapshot: seal_snapshot(key, s, now=now, ttl=TTL))
        verify = timed(lambda d=sealed: judge(open_snapshot(d, trusted), held, now=now))
        rows.append((count, len(sealed), seal, verify))

    print(f"signed snapshots: {ROUNDS} rounds per cell, one process, Ed25519 (cryptography)\n")
    print(
        "| endpoints | envelope bytes | seal p50 µs | seal p99 µs | open+judge p50 µs | open+judge p99 µs |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    for count, size, seal, verify in rows:
        print(
            f"| {count} | {size} | {percentile(seal, 0.5):.1f} | {percentile(seal, 0.99):.1f}"
            f" | {percentile(verify, 0.5):.1f} | {percentile(verify, 0.99):.1f} |"
        )
    print(f"\nload average after: {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
