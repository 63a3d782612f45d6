"""Tracing set-up: exporters chosen by OTEL_* variables, per-route sampling, counted drops, resource."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest
from opentelemetry import trace as trace_api
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.propagators.textmap import TextMapPropagator
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from mes_trace_proxy.config import Config
from mes_trace_proxy.sim.otlp_sink import OtlpSink
from mes_trace_proxy.tracing import (
    BatchExportProcessor,
    build_tracing,
    is_default_w3c,
    resource_attributes,
)
from tests.conftest import MakeConfig, otlp_env


class _Recording(SpanExporter):
    """Keeps exported batches; can be told to fail."""

    def __init__(self, result: SpanExportResult = SpanExportResult.SUCCESS) -> None:
        self.batches: list[int] = []
        self.result = result
        self.shut = False

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.batches.append(len(spans))
        return self.result

    def shutdown(self) -> None:
        self.shut = True


def _config(make_config: MakeConfig) -> Config:
    return make_config("http://127.0.0.1:1")


def test_status_routes_always_sampled_and_polling_at_its_ratio(make_config: MakeConfig) -> None:
    """With the default rules, every status change is kept even when the SDK default drops all."""
    tracing = build_tracing(
        _config(make_config), {"OTEL_TRACES_EXPORTER": "console", "OTEL_TRACES_SAMPLER": "always_off"}
    )
    try:
        tracer = tracing.tracer
        kept = tracer.start_span(
            "PUT x", kind=SpanKind.SERVER, attributes={"http.route": "/api/v1/orders/{orderId}/status"}
        )
        health = tracer.start_span(
            "GET /api/v1/health", kind=SpanKind.SERVER, attributes={"http.route": "/api/v1/health"}
        )
        other = tracer.start_span("GET", kind=SpanKind.SERVER, attributes={})
        assert kept.get_span_context().trace_flags.sampled
        assert not health.get_span_context().trace_flags.sampled
        assert not other.get_span_context().trace_flags.sampled
        for span in (kept, health, other):
            span.end()
    finally:
        tracing.shutdown()


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER"),
        (
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"},
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_BSP_MAX_QUEUE_SIZE": "lots"}, None),
        ({"OTEL_TRACES_EXPORTER": "console", "OTEL_BSP_MAX_QUEUE_SIZE": "-1"}, "OTEL_BSP_MAX_QUEUE_SIZE"),
    ],
    ids=["unknown-exporter", "unsupported-protocol", "bad-bsp-ignored-without-exporter", "negative-queue"],
)
def test_bad_otel_variables_are_named(
    make_config: MakeConfig, environ: dict[str, str], message: str | None
) -> None:
    """An OTEL_* value the SDK would not accept stops start-up with the variable named."""
    if message is None:
        build_tracing(_config(make_config), environ).shutdown()
        return
    with pytest.raises(ValueError, match=message):
        build_tracing(_config(make_config), environ)


def test_none_exporter_builds_no_processor(make_config: MakeConfig) -> None:
    """OTEL_TRACES_EXPORTER=none means spans are created (for headers) but never exported."""
    tracing = build_tracing(_config(make_config), {"OTEL_TRACES_EXPORTER": "none"})
    assert tracing.processors == ()
    tracing.shutdown()


def test_resource_carries_service_and_kubernetes_facts(make_config: MakeConfig) -> None:
    """service.* and k8s.* resource attributes come from the config and the downward-API variables."""
    config = make_config(
        "http://127.0.0.1:1", doc={"service": {"namespace": "jewellery", "environment": "prod"}}
    )
    attrs = resource_attributes(
        config, {"K8S_POD_NAME": "mes-0", "K8S_NAMESPACE_NAME": "factory", "K8S_NODE_NAME": "node-3"}
    )
    assert attrs["service.name"] == "mes-api"
    assert attrs["service.namespace"] == "jewellery"
    assert attrs["deployment.environment.name"] == "prod"
    assert attrs["k8s.pod.name"] == "mes-0"
    assert attrs["k8s.namespace.name"] == "factory"
    assert attrs["k8s.node.name"] == "node-3"
    assert attrs["service.instance.id"]


def _spans(provider: TracerProvider, count: int) -> None:
    tracer = provider.get_tracer("t")
    for index in range(count):
        tracer.start_span(f"s{index}").end()


def test_batch_processor_counts_queue_overflow_and_flushes() -> None:
    """A full queue drops spans and counts them; force_flush and shutdown export the rest."""
    exporter = _Recording()
    processor = BatchExportProcessor(
        exporter, max_queue_size=10, max_batch=4, delay_seconds=60, export_timeout_seconds=5
    )
    # A worker that is mid-export cannot drain; hold it by not waking it (60 s delay) and
    # fill past the bound: 10 fit (batches of 4 wake the worker, so fill fast and count).
    provider = TracerProvider()
    provider.add_span_processor(processor)
    _spans(provider, 200)
    assert processor.force_flush(5000)
    stats = processor.stats
    assert stats.queued + stats.dropped_queue_full == 200
    assert stats.exported == stats.queued
    assert sum(exporter.batches) == stats.exported
    assert all(size <= 4 for size in exporter.batches)
    provider.shutdown()
    assert exporter.shut


def test_batch_processor_counts_failed_exports() -> None:
    """An exporter that reports failure has its spans counted as failed, not exported."""
    exporter = _Recording(SpanExportResult.FAILURE)
    processor = BatchExportProcessor(
        exporter, max_queue_size=100, max_batch=10, delay_seconds=60, export_timeout_seconds=5
    )
    provider = TracerProvider()
    provider.add_span_processor(processor)
    _spans(provider, 25)
    assert processor.force_flush(5000)
    assert processor.stats.failed == 25
    assert processor.stats.exported == 0
    provider.shutdown()


def test_unsampled_spans_are_not_queued() -> None:
    """Spans the sampler dropped never reach the exporter or the counters."""
    exporter = _Recording()
    processor = BatchExportProcessor(
        exporter, max_queue_size=100, max_batch=10, delay_seconds=60, export_timeout_seconds=5
    )
    provider = TracerProvider(sampler=ALWAYS_OFF)
    provider.add_span_processor(processor)
    _spans(provider, 5)
    assert processor.force_flush(5000)
    assert processor.stats.queued == 0
    provider.shutdown()


async def test_dead_collector_does_not_block_and_is_counted(make_config: MakeConfig) -> None:
    """With the collector black-holed, spans pile up and are dropped and counted, never blocking."""
    async with OtlpSink(mode="blackhole") as sink:
        env = otlp_env(sink) | {
            "OTEL_BSP_MAX_QUEUE_SIZE": "8",
            "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "4",
            "OTEL_EXPORTER_OTLP_TIMEOUT": "1",
        }
        tracing = build_tracing(_config(make_config), env)
        tracer = tracing.tracer
        for index in range(100):
            tracer.start_span(
                f"s{index}",
                kind=SpanKind.SERVER,
                attributes={"http.route": "/api/v1/orders/{orderId}/status"},
            ).end()
        stats = tracing.export_stats()
        assert stats.dropped_queue_full > 0
        assert stats.queued + stats.dropped_queue_full == 100
        await asyncio.to_thread(tracing.shutdown)


def test_nothing_exported_means_pass_through_spans(make_config: MakeConfig) -> None:
    """With no exporter, spans record nothing but continue the caller's trace id and flags."""
    tracing = build_tracing(_config(make_config), {"OTEL_TRACES_EXPORTER": "none"})
    try:
        assert not tracing.exporting
        parent = trace_api.get_current_span(
            TraceContextTextMapPropagator().extract(
                {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
            )
        ).get_span_context()
        span = tracing.passthrough(parent)
        context = span.get_span_context()
        assert not span.is_recording()
        assert context.trace_id == 0x0AF7651916CD43DD8448EB211C80319C
        assert context.trace_flags.sampled
        assert context.span_id not in (0, 0xB7AD6B7169203331)
        root = tracing.passthrough(None).get_span_context()
        assert root.is_valid
        assert not root.trace_flags.sampled
        ordered = tracing.passthrough(None, trace_id=0x1234).get_span_context()
        assert ordered.trace_id == 0x1234
        assert tracing.passthrough(parent, trace_id=0x1234).get_span_context().trace_id == parent.trace_id
    finally:
        tracing.shutdown()


@pytest.mark.parametrize(
    ("propagator", "expected"),
    [
        (CompositePropagator([TraceContextTextMapPropagator(), W3CBaggagePropagator()]), True),
        (CompositePropagator([TraceContextTextMapPropagator()]), True),
        (TraceContextTextMapPropagator(), True),
        (CompositePropagator([W3CBaggagePropagator(), TraceContextTextMapPropagator()]), False),
        (CompositePropagator([W3CBaggagePropagator()]), False),
        (W3CBaggagePropagator(), False),
        (CompositePropagator([]), False),
    ],
    ids=["default", "tracecontext", "bare-tracecontext", "reordered", "baggage-only", "bare-baggage", "none"],
)
def test_the_request_path_reads_traceparent_itself_only_for_the_default_propagators(
    propagator: TextMapPropagator, expected: bool
) -> None:
    """Anything but W3C trace context (optionally then baggage) keeps the propagators in charge."""
    assert is_default_w3c(propagator) is expected
