"""The failover helpers' pure parts: the failure window a client saw, the median and spread the
benchmark prints, and the node-loader's probe settings against an HA plane."""

from __future__ import annotations

from pathlib import Path

import pytest

from apilane.testing.failover import (
    VipAnswer,
    failure_window,
    median_and_spread,
    probe_environment,
)
from apilane.testing.ha import ClientNamespace

pytestmark = [pytest.mark.unit]


def answer(at: float, *, ok: bool = True) -> VipAnswer:
    if ok:
        return VipAnswer(at=at, server="kube-apiserver-0", status=200, latency_ms=3.0)
    return VipAnswer(at=at, server="", status=0, latency_ms=0.4, error="ECONNREFUSED")


def test_the_window_runs_from_the_kill_to_the_last_failed_request() -> None:
    answers = [
        answer(99.0, ok=False),  # before the kill: not this failover's
        answer(100.1),
        answer(100.2, ok=False),
        answer(100.3),
        answer(101.4, ok=False),
        answer(101.5),
    ]
    window = failure_window(answers, since=100.0)
    assert window.window == pytest.approx(1.4)
    assert (window.failed, window.requests) == (2, 5)
    assert window.failed_fraction == pytest.approx(0.4)


def test_no_failure_is_a_window_of_zero() -> None:
    window = failure_window([answer(100.5), answer(101.0)], since=100.0)
    assert (window.window, window.failed, window.requests) == (0.0, 0, 2)
    assert failure_window([], since=100.0).failed_fraction == 0.0


def test_a_redirected_status_is_no_success() -> None:
    assert not VipAnswer(at=1.0, server="kube-apiserver-1", status=503, latency_ms=1.0).ok


def test_median_and_spread() -> None:
    assert median_and_spread([3.0, 1.0, 2.0]) == (2.0, 1.0, 3.0)
    with pytest.raises(ValueError, match="no values"):
        median_and_spread([])


def test_https_probes_verify_against_the_plane_ca_from_a_bridge_namespace() -> None:
    namespace = ClientNamespace("alkube-abc123-c0", "198.18.7.100")
    env = probe_environment(Path("/tmp/ca.pem"), namespace, kind="https")
    assert env == {
        "APILANE_BACKEND_PROBE": "https",
        "APILANE_PROBE_NETNS": "/run/netns/alkube-abc123-c0",
        "APILANE_PROBE_CA_FILE": "/tmp/ca.pem",
    }
    assert probe_environment(Path("/tmp/ca.pem"), namespace, kind="tcp") == {
        "APILANE_BACKEND_PROBE": "tcp",
        "APILANE_PROBE_NETNS": "/run/netns/alkube-abc123-c0",
    }


def test_probes_off_say_so_and_nothing_else() -> None:
    assert probe_environment(Path("/tmp/ca.pem"), None, kind="off") == {
        "APILANE_BACKEND_PROBE": "off"
    }
