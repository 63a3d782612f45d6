"""Tests for proxy_span: a span ends once, and SpanSink hands it to every processor without ever raising.

The span's recording rules are held to the SDK's in tests/test_spans.py (LIMIT_CASES), where
spans are made both ways; these tests are about the end of a span's life.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from opentelemetry.trace import SpanKind

from mes_trace_proxy.export import ExportStats, OtlpExportProcessor
from mes_trace_proxy.proxy_span import ProxySpan
from tests.test_spans import NAME, T0, _Capture, _provider_and_factory, _SeededRandom


def test_a_span_ends_once_and_reaches_each_processor_once() -> None:
    """A second end() neither moves the end time nor exports again."""
    memory = InMemorySpanExporter()
    _, factory = _provider_and_factory(ALWAYS_ON, _SeededRandom(), [SimpleSpanProcessor(memory)])
    span = factory.start(NAME, kind=SpanKind.SERVER, parent=None, start_time=T0)
    assert span.is_recording()
    span.end(T0 + 5)
    assert not span.is_recording()
    span.end(T0 + 9)
    (finished,) = memory.get_finished_spans()
    assert finished.end_time == T0 + 5


class _Exploding(SpanProcessor):
    """A processor that raises on every span, with the counters /metrics reads."""

    def __init__(self) -> None:
        self.stats = ExportStats()

    def on_end(self, span: ReadableSpan) -> None:
        raise RuntimeError("broken processor")


class _BrokenEncoder:
    """Not a subclass: with the native build OtlpSpanEncoder is compiled, and cannot be one."""

    def encode_span(self, span: Any) -> Any:
        raise RuntimeError("broken encoder")

    def assemble(self, spans: Any) -> bytes:
        raise AssertionError("nothing was encoded")


def test_failing_processors_never_reach_the_request(caplog: pytest.LogCaptureFixture) -> None:
    """A raising processor is logged once and counted; the others still get every span."""
    exploding = _Exploding()
    memory = InMemorySpanExporter()
    otlp = OtlpExportProcessor(
        _Capture(),
        max_queue_size=10,
        max_batch=10,
        delay_seconds=60,
        export_timeout_seconds=1,
        encoder=_BrokenEncoder(),
    )
    _, factory = _provider_and_factory(
        ALWAYS_ON, _SeededRandom(), [otlp, exploding, SimpleSpanProcessor(memory)]
    )
    with caplog.at_level(logging.ERROR):
        for _ in range(3):
            factory.start(NAME, kind=SpanKind.SERVER, parent=None).end()
    assert len(memory.get_finished_spans()) == 3
    assert exploding.stats.failed == 3
    assert otlp.stats.failed == 3  # the processor's own guard counted the encoder's failure
    failures = [r for r in caplog.records if r.name == "mes_trace_proxy.spans"]
    assert len(failures) == 1
    assert "broken processor" in caplog.text


def test_a_span_that_cannot_be_made_readable_is_counted_per_processor(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If building the ReadableSpan fails, each processor that needed it counts a failure."""
    exploding = _Exploding()
    _, factory = _provider_and_factory(ALWAYS_ON, _SeededRandom(), [exploding])

    def broken(self: ProxySpan) -> ReadableSpan:
        raise RuntimeError("no readable span")

    monkeypatch.setattr(ProxySpan, "to_readable", broken)
    with caplog.at_level(logging.ERROR):
        factory.start(NAME, kind=SpanKind.SERVER, parent=None).end()
    assert exploding.stats.failed == 1


def test_the_sink_sorts_processors_once() -> None:
    """The OTLP processor gets the span itself; every other processor a ReadableSpan of it."""
    memory = InMemorySpanExporter()
    otlp = OtlpExportProcessor(
        _Capture(), max_queue_size=10, max_batch=10, delay_seconds=60, export_timeout_seconds=1
    )
    _, factory = _provider_and_factory(ALWAYS_ON, _SeededRandom(), [otlp, SimpleSpanProcessor(memory)])
    span = factory.start(NAME, kind=SpanKind.SERVER, parent=None, start_time=T0)
    assert isinstance(span, ProxySpan)
    span.end(T0 + 1)
    (readable,) = memory.get_finished_spans()
    assert type(readable) is ReadableSpan
    assert readable.context == span.get_span_context()
    assert otlp.stats.queued == 1
