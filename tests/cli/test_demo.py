"""`apilane demo`'s pure parts: how an answer is printed, who answered (the serving
certificate's CN), the summary, and the bounds on a run. The client itself runs through the
VIP in tests/e2e/test_ha_failover.py and against each apiserver in tests/harness."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest

from apilane.cli.demo import (
    MAX_DURATION,
    Answer,
    Target,
    answers,
    common_name,
    error_name,
    format_answer,
    join,
    run,
    summary,
)
from apilane.cli.errors import CliError

pytestmark = [pytest.mark.unit]

AT = time.mktime((2026, 12, 1, 12, 0, 1, 0, 0, -1)) + 0.123


def test_an_answer_names_the_apiserver_its_status_and_latency() -> None:
    line = format_answer(Answer(AT, "kube-apiserver-1", 200, 3.25))
    assert line.startswith("12:00:01.123  kube-apiserver-1")
    assert " 200 " in line and line.endswith("3.2 ms")


def test_a_failed_answer_shows_its_error_and_no_server() -> None:
    line = format_answer(Answer(AT, "", 0, 0.4, "ECONNREFUSED"))
    assert "  -  " in line and "ECONNREFUSED" in line
    assert not Answer(AT, "", 0, 0.4, "ECONNREFUSED").ok
    assert not Answer(AT, "kube-apiserver-0", 503, 1.0).ok
    assert Answer(AT, "kube-apiserver-0", 200, 1.0).ok


def test_the_common_name_comes_from_the_certificate_subject() -> None:
    certificate = {
        "subject": ((("organizationName", "apilane"),), (("commonName", "kube-apiserver-2"),))
    }
    assert common_name(certificate) == "kube-apiserver-2"
    assert common_name({"subject": ()}) == ""
    assert common_name(None) == ""


def test_errors_are_named_by_errno() -> None:
    assert error_name(ConnectionRefusedError(111, "refused")) == "ECONNREFUSED"
    assert error_name(TimeoutError()) == "ETIMEDOUT"
    assert error_name(OSError(101, "unreachable")) == "ENETUNREACH"


def test_the_summary_counts_failures_and_names_who_answered() -> None:
    seen = [
        Answer(AT, "kube-apiserver-0", 200, 1.0),
        Answer(AT, "", 0, 0.5, "ECONNREFUSED"),
        Answer(AT, "kube-apiserver-1", 200, 1.0),
        Answer(AT, "kube-apiserver-0", 200, 1.0),
    ]
    assert summary(seen) == (
        "4 requests, 1 failed (25.0%); answered by kube-apiserver-0, kube-apiserver-1"
    )


def test_a_run_is_bounded_by_its_count(tmp_path: Path) -> None:
    # Nothing listens on this loopback port: every answer is a quick ECONNREFUSED.
    ca = tmp_path / "ca.pem"
    ca.write_text("")
    with pytest.raises(CliError, match="CA"):
        list(answers(Target("127.0.0.1", 9, "/readyz", str(ca)), interval=0, duration=1))
    certifi_ca = Path("/etc/ssl/certs/ca-certificates.crt")
    target = Target("127.0.0.1", 9, "/readyz", str(certifi_ca))
    out = io.StringIO()
    assert run(target, interval=0, duration=MAX_DURATION * 10, count=3, as_json=True, out=out) == 1
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and all('"ECONNREFUSED"' in line for line in lines)


def test_the_client_never_joins_a_cgroup_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "cgroup.procs").write_text("")
    with pytest.raises(CliError, match="cgroup root"):
        join(tmp_path / "netns", root)
    with pytest.raises(CliError, match="not a cgroup"):
        join(tmp_path / "netns", tmp_path)
