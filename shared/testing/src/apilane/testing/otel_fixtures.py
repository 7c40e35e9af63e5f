"""pytest fixture for spans made in the test process itself (in-process service runs).

OpenTelemetry allows one global TracerProvider per process, so the first use installs one
with an in-memory exporter and every later test just clears it. Spans from services started
as separate processes are collected with `apilane.testing.otlp.OtlpReceiver` instead.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

_exporter: InMemorySpanExporter | None = None


def _installed_exporter() -> InMemorySpanExporter:
    global _exporter  # noqa: PLW0603 - one provider per process, by OTel's design
    if _exporter is None:
        provider = trace.get_tracer_provider()
        if not isinstance(provider, TracerProvider):
            provider = TracerProvider()
            trace.set_tracer_provider(provider)
        _exporter = InMemorySpanExporter()
        provider.add_span_processor(SimpleSpanProcessor(_exporter))
    return _exporter


@pytest.fixture
def span_exporter() -> Iterator[InMemorySpanExporter]:
    exporter = _installed_exporter()
    exporter.clear()
    yield exporter
    exporter.clear()
