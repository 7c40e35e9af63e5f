"""Trace propagation over NATS headers, and the SDK set-up each service calls once.

Configuration is only the standard `OTEL_*` variables (OTEL_SERVICE_NAME,
OTEL_TRACES_EXPORTER, OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_SDK_DISABLED, …). Exporting goes
through a batch span processor so it never sits on the hot path.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping, MutableMapping
from typing import TYPE_CHECKING

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.context import Context

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import SpanProcessor
    from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider

log = logging.getLogger(__name__)

_provider_installed = False


def setup(service_name: str) -> None:
    """Install a TracerProvider for this process from the OTEL_* variables. Idempotent."""
    global _provider_installed  # noqa: PLW0603 - one provider per process, by OTel's design
    if _provider_installed or os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return
    trace.set_tracer_provider(provider(service_name, os.environ))
    _provider_installed = True


def provider(service_name: str, env: Mapping[str, str]) -> SdkTracerProvider:
    """The TracerProvider the OTEL_* variables in `env` ask for.

    With no exporter (OTEL_TRACES_EXPORTER=none), spans still carry trace ids (a
    snapshot's traceparent is what `apilane history` and `status` show) but none is
    recorded: an SDK span that no processor receives costs tens of microseconds for
    nothing, several times per snapshot change on every node (docs/benchmarks.md). Its
    traces go out unsampled, so a consumer that does export drops them as well."""
    from opentelemetry.sdk.resources import OTELResourceDetector, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

    resource = Resource.create({"service.name": env.get("OTEL_SERVICE_NAME", service_name)})
    resource = resource.merge(OTELResourceDetector().detect())
    processors = [
        p
        for name in env.get("OTEL_TRACES_EXPORTER", "otlp").split(",")
        if (p := _processor(name.strip())) is not None
    ]
    if not processors:
        return TracerProvider(resource=resource, sampler=ALWAYS_OFF)
    sdk_provider = TracerProvider(resource=resource)
    for processor in processors:
        sdk_provider.add_span_processor(processor)
    return sdk_provider


def _processor(name: str) -> SpanProcessor | None:
    """The batch processor for one OTEL_TRACES_EXPORTER entry; None for none (or unknown)."""
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    if name in ("", "none"):
        return None
    if name == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return BatchSpanProcessor(OTLPSpanExporter())
    if name == "zipkin":
        # Zipkin's JSON v2 API; the endpoint is OTEL_EXPORTER_ZIPKIN_ENDPOINT (the SDK's
        # default is http://localhost:9411/api/v2/spans). Used by `make up`'s tracing UI.
        from opentelemetry.exporter.zipkin.json import ZipkinExporter

        return BatchSpanProcessor(ZipkinExporter())
    if name == "console":
        return BatchSpanProcessor(ConsoleSpanExporter())
    log.warning("unknown OTEL_TRACES_EXPORTER entry ignored", extra={"exporter": name})
    return None


def shutdown() -> None:
    """Flush spans still in the batch processor; called on graceful stop."""
    provider = trace.get_tracer_provider()
    shutdown_fn = getattr(provider, "shutdown", None)
    if shutdown_fn is not None:
        with contextlib.suppress(Exception):
            shutdown_fn()


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)


def inject_headers(headers: MutableMapping[str, str]) -> None:
    """Write the current trace context (W3C traceparent) into NATS message headers."""
    propagate.inject(headers)


def extract_context(headers: Mapping[str, str] | None) -> Context:
    """The trace context a producer put into these headers (empty when none)."""
    return propagate.extract(dict(headers or {}))


def trace_id(headers: Mapping[str, str] | None) -> str:
    """The id of the trace these headers continue, as 32 hex digits ("" when they carry none:
    no or a malformed traceparent)."""
    span_context = trace.get_current_span(extract_context(headers)).get_span_context()
    return trace.format_trace_id(span_context.trace_id) if span_context.is_valid else ""


@contextlib.contextmanager
def consuming(
    tracer_: trace.Tracer,
    name: str,
    headers: Mapping[str, str] | None,
    attributes: Mapping[str, str | int | float | bool] | None = None,
) -> Iterator[trace.Span]:
    """A CONSUMER span that continues the producer's trace; the context is detached after."""
    token = otel_context.attach(extract_context(headers))
    try:
        with tracer_.start_as_current_span(
            name, kind=trace.SpanKind.CONSUMER, attributes=dict(attributes or {})
        ) as span:
            yield span
    finally:
        otel_context.detach(token)
