"""Wire types: round trips, tag dispatch, schema evolution, and hostile input."""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apilane.model import events

pytestmark = [pytest.mark.unit]

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
SVC = (events.ServiceEndpoint(ip="10.96.0.1", port=443, family="IPv4"),)
API = (
    events.ApiServerEndpoint(ip="192.168.5.5", port=6443, family="IPv4"),
    events.ApiServerEndpoint(ip="fd00::5:5", port=6443, family="IPv6"),
)


def snapshot(**overrides: object) -> events.EndpointSnapshot:
    fields: dict[str, object] = {
        "cluster": "c1",
        "generation": 7,
        "service_endpoints": SVC,
        "apiserver_endpoints": API,
        "digest": events.canonical_digest(SVC, API),
        "observed_at": NOW,
        "resource_versions": ("EndpointSlice/default/kubernetes@12",),
    }
    fields.update(overrides)
    return events.EndpointSnapshot(**fields)  # type: ignore[arg-type]


ALL_EVENTS: list[events.Event] = [
    snapshot(),
    events.RenderResult(
        cluster="c1", generation=7, digest="d", outcome="applied", env={"A": "1"}, at=NOW
    ),
    events.NodeState(cluster="c1", node="n1", generation=7, digest="d", updated_at=NOW),
    events.ClusterWarning(
        cluster="c1", reason="NoReadyEndpoints", message="m", source="discovery", at=NOW
    ),
]


@pytest.mark.parametrize("event", ALL_EVENTS, ids=lambda e: type(e).__name__)
def test_every_event_round_trips_through_the_tagged_union(event: events.Event) -> None:
    assert events.decode(events.encode(event)) == event


def test_the_tag_names_the_message_kind_on_the_wire() -> None:
    wire = msgspec.json.decode(events.encode(ALL_EVENTS[0]))
    assert wire["type"] == "endpoint-snapshot"


def test_unknown_fields_from_a_newer_producer_are_ignored() -> None:
    wire = msgspec.json.decode(events.encode(snapshot()))
    wire["field_from_the_future"] = {"nested": [1, 2, 3]}
    wire["service_endpoints"][0]["new_endpoint_field"] = True
    assert events.decode(msgspec.json.encode(wire)) == snapshot()


def test_fields_added_later_have_defaults_so_old_messages_still_decode() -> None:
    wire = msgspec.json.decode(events.encode(snapshot()))
    for optional in (
        "trigger_times",
        "resource_versions",
        "findings",
        "kube_proxy",
        "managed_provider",
        "schema_version",
    ):
        wire.pop(optional)
    decoded = events.decode_snapshot(msgspec.json.encode(wire))
    assert decoded.findings == () and decoded.schema_version == events.SCHEMA_VERSION


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"{",
        events.encode(snapshot())[:-10],
        b'{"type":"no-such-kind","cluster":"c"}',
        b'{"cluster":"c"}',
        b'{"type":"warning","cluster":1,"reason":"r","message":"m","source":"s"}',
        b'{"type":"endpoint-snapshot","cluster":"c","generation":"seven"}',
        b"[1,2,3]",
        b"null",
        b"\xff\xfe\x00",
        b'{"type":"warning"' + b" " * 10 + b"}",
    ],
    ids=[
        "empty",
        "open-brace",
        "truncated",
        "unknown-tag",
        "no-tag",
        "wrong-type",
        "string-int",
        "array",
        "null",
        "binary",
        "missing-fields",
    ],
)
def test_malformed_input_raises_only_the_typed_error(data: bytes) -> None:
    with pytest.raises(events.MalformedEvent):
        events.decode(data)


def test_a_huge_message_is_refused_before_it_is_parsed() -> None:
    with pytest.raises(events.MalformedEvent, match="exceeds"):
        events.decode(b" " * (events.MAX_MESSAGE_BYTES + 1))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_arbitrary_bytes_never_raise_anything_but_malformed_event(data: bytes) -> None:
    with contextlib.suppress(events.MalformedEvent):
        events.decode(data)


def test_digest_ignores_order_duplicates_conditions_and_textual_ip_forms() -> None:
    reordered = (API[1], API[0], API[0])
    terminating = (
        events.ApiServerEndpoint(
            ip="192.168.5.5", port=6443, family="IPv4", ready=False, terminating=True
        ),
        events.ApiServerEndpoint(ip="fd00:0:0::5:5", port=6443, family="IPv6"),
    )
    assert events.canonical_digest(SVC, API) == events.canonical_digest(SVC, reordered)
    assert events.canonical_digest(SVC, API) == events.canonical_digest(SVC, terminating)


def test_digest_changes_when_a_port_or_address_changes() -> None:
    moved = (events.ApiServerEndpoint(ip="192.168.5.6", port=6443, family="IPv4"), API[1])
    other_port = (events.ApiServerEndpoint(ip="192.168.5.5", port=6444, family="IPv4"), API[1])
    digests = {events.canonical_digest(SVC, a) for a in (API, moved, other_port)}
    assert len(digests) == 3


@pytest.mark.parametrize(
    "data",
    [
        b'{"type":"endpoint-snapshot","cluster":"\xf9"}',
        b'{"type":"warning","cluster":"a\xf9","reason":"x","message":"m","source":"s"}',
    ],
)
def test_invalid_utf8_inside_a_string_is_a_malformed_event(data: bytes) -> None:
    # msgspec raises UnicodeDecodeError (not DecodeError) for these; it must not escape.
    with pytest.raises(events.MalformedEvent):
        events.decode(data)
    with pytest.raises(events.MalformedEvent):
        events.decode_snapshot(data)
