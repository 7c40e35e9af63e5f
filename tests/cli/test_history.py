"""`apilane history`'s pure core: kept KV revisions in, verified generations out, each diffed
against the last trusted one before it, with its trace link; and the trace link template."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from apilane.cli import history
from apilane.cli.errors import CliError
from apilane.cli.history import DEFAULT_TRACE_URL, Diff, Generation
from apilane.cli.target import StackInfo
from apilane.model import subjects
from apilane.model.signing import SigningKey, TrustedKeys
from apilane.runtime.bus import KvEntry
from apilane.testing.sealing import seal
from apilane.testing.snapshots import make_snapshot

pytestmark = [pytest.mark.unit]

KEY = SigningKey.generate()
TRUSTED = TrustedKeys.parse(KEY.public_text, source="test")
TRACE = "0af7651916cd43dd8448eb211c80319c"
TRACEPARENT = f"00-{TRACE}-b7ad6b7169203331-01"
AT = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def entry(revision: int, value: bytes, *, traced: bool = True, operation: str = "PUT") -> KvEntry:
    return KvEntry(
        bucket=subjects.SNAPSHOT_BUCKET,
        key="default",
        value=value,
        revision=revision,
        headers={"traceparent": TRACEPARENT} if traced else {},
        operation=operation,
        written_at=AT,
    )


def stack(zipkin_url: str = "") -> StackInfo:
    return StackInfo(cluster="default", nats_urls=(), kubeconfig="", zipkin_url=zipkin_url)


def test_the_trace_template_comes_from_the_environment_the_stack_or_the_default() -> None:
    custom = "https://jaeger.example/trace/{trace_id}?uiFind=x"
    assert history.trace_url_template(stack(), {"APILANE_TRACE_URL_TEMPLATE": custom}) == custom
    local = history.trace_url_template(stack("http://127.0.0.1:19411"), {})
    assert local == "http://127.0.0.1:19411/zipkin/traces/{trace_id}"
    assert history.trace_url_template(stack(), {}) == DEFAULT_TRACE_URL
    assert DEFAULT_TRACE_URL == "http://127.0.0.1:9411/zipkin/traces/{trace_id}"
    assert history.trace_url(custom, TRACE) == f"https://jaeger.example/trace/{TRACE}?uiFind=x"
    assert history.trace_url(custom, "") == ""


def test_a_template_without_the_trace_id_is_refused() -> None:
    with pytest.raises(CliError, match=r"has no \{trace_id\}"):
        history.trace_url_template(stack(), {"APILANE_TRACE_URL_TEMPLATE": "http://x/traces"})


def test_the_first_kept_generation_counts_everything_as_added() -> None:
    first = make_snapshot(generation=1, apiservers=["10.0.0.1:6443", "10.0.0.2:6443"])
    change = history.diff(None, first)
    assert change.apiservers_added == ("10.0.0.1:6443", "10.0.0.2:6443")
    assert change.services_added == ("10.96.0.1:443",)
    assert (change.apiservers_removed, change.ports_before) == ((), ())
    assert change.ports_after == ("443/TCP", "6443/TCP")
    assert change.first
    assert (
        history.diff_lines(change)[0] == "(the first trusted generation kept: all shown as added)"
    )


def test_endpoints_added_removed_and_ports_changed_are_named() -> None:
    before = make_snapshot(generation=1, apiservers=["10.0.0.1:6443", "10.0.0.2:6443"])
    after = make_snapshot(
        generation=2,
        services=["10.96.0.1:443", "[fd00::1]:443"],
        apiservers=["10.0.0.2:6443", "10.0.0.3:8443", "[2001:db8::3]:8443"],
    )
    change = history.diff(before, after)
    assert change.apiservers_added == ("10.0.0.3:8443", "[2001:db8::3]:8443")
    assert change.apiservers_removed == ("10.0.0.1:6443",)
    assert change.services_added == ("[fd00::1]:443",)
    assert change.services_removed == ()
    assert change.ports_changed
    assert (change.ports_before, change.ports_after) == (
        ("443/TCP", "6443/TCP"),
        ("443/TCP", "6443/TCP", "8443/TCP"),
    )
    assert not change.empty and not change.first


def test_the_same_endpoints_are_no_change() -> None:
    same = history.diff(make_snapshot(generation=1), make_snapshot(generation=2))
    assert same.empty and not same.ports_changed
    assert history.diff_lines(same) == ["= no endpoint change (findings or kube-proxy state only)"]


def test_generations_are_verified_and_diffed_against_the_last_trusted_one() -> None:
    one = make_snapshot(generation=1, apiservers=["10.0.0.1:6443"])
    forged = make_snapshot(generation=2, apiservers=["203.0.113.66:6443"])
    three = make_snapshot(generation=3, apiservers=["10.0.0.2:6443"])
    kept = history.generations(
        [
            entry(1, seal(one, key=KEY)),
            entry(2, seal(forged, key=SigningKey.generate()), traced=False),
            entry(3, seal(three, key=KEY)),
            entry(4, b"", operation="DEL"),
            entry(5, b"{not a snapshot"),
        ],
        TRUSTED,
        DEFAULT_TRACE_URL,
    )
    assert [(g.revision, g.trusted, g.operation) for g in kept] == [
        (1, True, "PUT"),
        (2, False, "PUT"),
        (3, True, "PUT"),
        (4, False, "DEL"),
        (5, False, "PUT"),
    ]
    assert kept[0].seal is not None and kept[0].seal.key_id == KEY.key_id
    assert kept[0].trace_url == f"http://127.0.0.1:9411/zipkin/traces/{TRACE}"
    assert kept[1].untrusted.startswith("unknown-key") and kept[1].trace_url == ""
    assert kept[1].snapshot is None and kept[1].diff is None
    # Generation 3 is diffed against 1: the forged one was never applied.
    assert kept[2].diff == Diff(
        apiservers_added=("10.0.0.2:6443",),
        apiservers_removed=("10.0.0.1:6443",),
        ports_before=("443/TCP", "6443/TCP"),
        ports_after=("443/TCP", "6443/TCP"),
    )
    assert kept[4].untrusted.startswith("unsigned: not a signed snapshot envelope")


def test_without_trusted_keys_every_generation_is_untrusted() -> None:
    kept = history.generations(
        [entry(1, seal(make_snapshot(generation=1), key=KEY))], TrustedKeys({}), DEFAULT_TRACE_URL
    )
    assert not kept[0].trusted and "APILANE_TRUSTED_KEYS" in kept[0].untrusted


def test_text_shows_each_revision_its_changes_its_trace_and_the_untrusted_ones() -> None:
    one = make_snapshot(generation=1, apiservers=["10.0.0.1:6443"])
    two = make_snapshot(generation=2, apiservers=["10.0.0.1:6443", "10.0.0.2:6443"])
    kept = history.generations(
        [
            entry(7, seal(one, key=KEY)),
            entry(8, seal(two, key=SigningKey.generate())),
            entry(9, seal(two, key=KEY)),
        ],
        TRUSTED,
        "https://traces.example/{trace_id}",
    )
    text = history.render_text("default", kept)
    lines = text.splitlines()
    assert (
        lines[0]
        == f"cluster 'default': 3 kept revision(s) (the bucket keeps {subjects.SNAPSHOT_HISTORY})"
    )
    assert lines[1].startswith("  revision 7  2026-12-01T12:00:00+00:00  generation 1  sha256:")
    assert lines[1].endswith(f"signed by {KEY.key_id}")
    assert "      + API server 10.0.0.1:6443" in lines
    assert f"      trace: https://traces.example/{TRACE}" in lines
    assert any(
        line.startswith("  revision 8") and "UNTRUSTED, not shown (unknown-key" in line
        for line in lines
    )
    assert "      + API server 10.0.0.2:6443" in lines
    assert lines[-1] == "  1 revision(s) did NOT verify against the trusted keys"
    assert "no snapshot published yet" in history.render_text("default", [])


def test_json_carries_the_same_per_generation() -> None:
    one = make_snapshot(generation=1)
    kept = [
        *history.generations([entry(1, seal(one, key=KEY))], TRUSTED, DEFAULT_TRACE_URL),
        Generation(revision=2, written_at=None, operation="PURGE"),
    ]
    data = json.loads(history.render_json("default", kept))
    assert data["cluster"] == "default" and data["history"] == subjects.SNAPSHOT_HISTORY
    first, purge = data["generations"]
    assert (first["revision"], first["generation"], first["trusted"]) == (1, 1, True)
    assert first["digest"] == one.digest and first["signed_by"] == KEY.key_id
    assert first["trace_id"] == TRACE and first["written_at"] == "2026-12-01T12:00:00+00:00"
    assert first["diff"]["apiservers_added"] == ["10.0.0.1:6443"]
    assert first["snapshot"]["generation"] == 1
    assert purge == {
        "revision": 2,
        "written_at": None,
        "operation": "PURGE",
        "trusted": False,
        "untrusted": "",
        "generation": None,
        "digest": "",
        "signed_by": "",
        "trace_id": "",
        "trace_url": "",
        "diff": None,
        "snapshot": None,
    }
    assert "PURGE: the key was deleted" in history.render_text("default", kept)
