"""`apilane status` for thousands of nodes: a summary instead of a line per node."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from apilane.cli.status import LIST_NODES_UP_TO, STALE_AFTER, View, node_lines, summarise
from apilane.model import events
from apilane.testing.snapshots import make_snapshot

pytestmark = pytest.mark.unit
NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def node(name: str, generation: int, *, age: float = 1.0, **fields: object) -> events.NodeState:
    return events.NodeState(
        cluster="c",
        node=name,
        generation=generation,
        digest="sha256:x",
        updated_at=NOW - timedelta(seconds=age),
        **fields,  # type: ignore[arg-type]
    )


def fleet() -> list[events.NodeState]:
    nodes = [node(f"node-{i:04d}", 7) for i in range(3000)]
    nodes[10] = node("node-0010", 6)
    nodes[11] = node("node-0011", 5, age=STALE_AFTER.total_seconds() + 1)
    nodes[12] = node("node-0012", 7, stale=True, last_error="expired")
    return nodes


def test_a_summary_counts_generations_and_names_the_laggards_and_the_stale() -> None:
    summary = summarise(fleet(), 7, NOW)
    assert summary.total == 3000
    assert summary.by_generation == {7: 2998, 6: 1, 5: 1}
    assert summary.laggards == ["node-0010", "node-0011"]
    assert summary.silent == ["node-0011"]
    assert summary.expired == ["node-0012"]
    assert summary.with_errors == ["node-0012"]


def test_status_prints_the_summary_past_the_listing_limit() -> None:
    view = View(
        snapshot=make_snapshot(generation=7),
        trace_id="",
        nodes=fleet(),
        calico_env={},
        daemonset_generation=1,
    )
    lines = node_lines(view, NOW)
    assert lines[0] == "  nodes (3000), by generation: 7: 2998, 6: 1, 5: 1"
    assert "    2 behind: node-0010, node-0011" in lines
    assert any(line.startswith("    1 STALE") and "node-0011" in line for line in lines)
    assert len(lines) < 10
    few = View(
        snapshot=make_snapshot(generation=7),
        trace_id="",
        nodes=fleet()[:LIST_NODES_UP_TO],
        calico_env={},
        daemonset_generation=1,
    )
    assert len(node_lines(few, NOW)) == LIST_NODES_UP_TO + 1  # a line per node


def test_many_laggards_are_named_up_to_a_limit() -> None:
    nodes = [node(f"n{i}", 1) for i in range(100)]
    view = View(
        snapshot=make_snapshot(generation=2),
        trace_id="",
        nodes=nodes,
        calico_env={},
        daemonset_generation=1,
    )
    behind = next(line for line in node_lines(view, NOW) if "behind" in line)
    assert behind.startswith("    100 behind: n0, n1") and behind.endswith("and 80 more")


def test_backend_health_shows_per_node_and_in_the_summary() -> None:
    sick = node("node-a", 7, unhealthy_backends=("10.0.0.12:6443",))
    cut_off = node(
        "node-b",
        7,
        unhealthy_backends=("10.0.0.11:6443", "10.0.0.12:6443"),
        health_fail_static=True,
    )
    few = View(
        snapshot=make_snapshot(generation=7),
        trace_id="",
        nodes=[sick, cut_off, node("node-c", 7)],
        calico_env={},
        daemonset_generation=1,
    )
    lines = node_lines(few, NOW)
    assert lines[1].endswith("UNHEALTHY (left out): 10.0.0.12:6443")
    assert lines[2].endswith("every backend UNHEALTHY to its probes (kept them all)")
    assert "UNHEALTHY" not in lines[3]
    summary = summarise([sick, cut_off, *fleet()], 7, NOW)
    assert summary.unhealthy == {
        "10.0.0.11:6443": ["node-b"],
        "10.0.0.12:6443": ["node-a", "node-b"],
    }
    assert summary.health_fail_static == ["node-b"]
    many = View(
        snapshot=make_snapshot(generation=7),
        trace_id="",
        nodes=[sick, cut_off, *fleet()],
        calico_env={},
        daemonset_generation=1,
    )
    text = node_lines(many, NOW)
    assert "    backend 10.0.0.12:6443 UNHEALTHY on 2 node(s): node-a, node-b" in text
    assert "    1 finding every backend unhealthy (kept them all): node-b" in text
