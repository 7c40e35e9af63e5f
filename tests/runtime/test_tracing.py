"""Trace context crosses NATS headers: a consumer continues the producer's trace, detaches its
context afterwards, and spans reach a real OTLP/HTTP endpoint through the SDK exporter."""

from __future__ import annotations

import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from apilane.runtime import tracing
from apilane.testing.otlp import OtlpReceiver

pytestmark = [pytest.mark.unit]


@pytest.fixture
def receiver_and_tracer() -> tuple[OtlpReceiver, trace.Tracer]:
    receiver = OtlpReceiver().start()
    provider = TracerProvider(resource=Resource.create({"service.name": "unit"}))
    provider.add_span_processor(
        SimpleSpanProcessor(OTLPSpanExporter(endpoint=receiver.endpoint + "/v1/traces"))
    )
    yield receiver, provider.get_tracer("test")
    provider.shutdown()
    receiver.stop()


def test_consumer_span_continues_the_producer_trace_over_headers(receiver_and_tracer) -> None:  # type: ignore[no-untyped-def]
    receiver, tracer = receiver_and_tracer
    headers: dict[str, str] = {}
    with tracer.start_as_current_span("publish", kind=trace.SpanKind.PRODUCER) as producer:
        tracing.inject_headers(headers)
    assert headers["traceparent"].startswith("00-")
    before = otel_context.get_current()
    with tracing.consuming(tracer, "consume", headers, {"generation": 3}) as consumer:
        assert consumer.get_span_context().trace_id == producer.get_span_context().trace_id
    assert otel_context.get_current() == before, "the extracted context must be detached"
    spans = receiver.wait_for(lambda s: len(s) == 2, timeout=5)
    by_name = {s.name: s for s in spans}
    assert by_name["consume"].parent_span_id == by_name["publish"].span_id
    assert by_name["consume"].kind == "CONSUMER"
    assert by_name["consume"].attributes == {"generation": 3}
    assert by_name["publish"].service == "unit"


def test_headers_without_context_start_a_new_trace(receiver_and_tracer) -> None:  # type: ignore[no-untyped-def]
    _, tracer = receiver_and_tracer
    with tracing.consuming(tracer, "consume", {"traceparent": "garbage"}) as span:
        assert span.get_span_context().is_valid
    with tracing.consuming(tracer, "consume", None) as span:
        assert span.get_span_context().is_valid


def test_the_trace_id_is_read_from_headers_through_the_propagator() -> None:
    tracer = TracerProvider().get_tracer("test")
    headers: dict[str, str] = {}
    with tracer.start_as_current_span("publish") as span:
        tracing.inject_headers(headers)
    assert tracing.trace_id(headers) == f"{span.get_span_context().trace_id:032x}"
    assert len(tracing.trace_id(headers)) == 32
    for carries_none in ({"traceparent": "garbage"}, {"traceparent": "00-0-0-01"}, {}, None):
        assert tracing.trace_id(carries_none) == ""


def test_without_an_exporter_spans_carry_trace_ids_but_record_nothing() -> None:
    tracer = tracing.provider("unit", {"OTEL_TRACES_EXPORTER": "none"}).get_tracer("test")
    headers: dict[str, str] = {}
    with tracer.start_as_current_span("publish", kind=trace.SpanKind.PRODUCER) as producer:
        assert not producer.is_recording()
        assert producer.get_span_context().is_valid
        tracing.inject_headers(headers)
    trace_id = f"{producer.get_span_context().trace_id:032x}"
    assert tracing.trace_id(headers) == trace_id, "history and status still show the trace"
    flags = int(headers["traceparent"].rsplit("-", 1)[1], 16)
    assert not flags & trace.TraceFlags.SAMPLED, "sent unsampled: nothing records it"
    with tracing.consuming(tracer, "consume", headers, {"generation": 3}) as consumer:
        assert not consumer.is_recording()
        assert consumer.get_span_context().trace_id == producer.get_span_context().trace_id


def test_with_an_exporter_spans_are_recorded_and_exported(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    receiver = OtlpReceiver().start()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
    sdk_provider = tracing.provider("unit", {"OTEL_TRACES_EXPORTER": "none, otlp"})
    try:
        with sdk_provider.get_tracer("test").start_as_current_span("publish") as span:
            assert span.is_recording()
        sdk_provider.force_flush()
        (exported,) = receiver.wait_for(lambda s: len(s) == 1, timeout=5)
        assert (exported.name, exported.service) == ("publish", "unit")
    finally:
        sdk_provider.shutdown()
        receiver.stop()
