"""Tests for otlp_transport: one send is one attempt, answered, never raised; several run at once.

Against the real OtlpSink on loopback (HTTP and gRPC); the processor's use of the transports
(retries, counts, TLS, proxies, scripted answers) is in tests/test_export.py.
"""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from mes_trace_proxy.otlp_encode import encode_request
from mes_trace_proxy.otlp_settings import OtlpSettings, otlp_settings
from mes_trace_proxy.otlp_transport import (
    MAX_IN_FLIGHT,
    GrpcTransport,
    HttpTransport,
    Transport,
    make_transport,
)
from mes_trace_proxy.sim.otlp_sink import OtlpSink

HTTP = "http/protobuf"
# Generous: a busy two-core runner with nine sessions on it.
BUDGET = 10.0


def _spans(count: int) -> list[ReadableSpan]:
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("test")
    for index in range(count):
        tracer.start_span(f"span-{index}").end()
    return list(memory.get_finished_spans())


def _transport(sink: OtlpSink, protocol: str) -> Transport:
    endpoint = sink.http_endpoint if protocol == HTTP else sink.grpc_endpoint
    return make_transport(otlp_settings({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": endpoint}, protocol))


@pytest.mark.parametrize("protocol", [HTTP, "grpc"])
def test_make_transport_follows_the_protocol(protocol: str) -> None:
    """http/protobuf gives the aiohttp transport, grpc the grpc.aio one."""
    settings = otlp_settings({}, protocol)
    expected = HttpTransport if protocol == HTTP else GrpcTransport
    assert type(make_transport(settings)) is expected


@pytest.mark.parametrize("protocol", [HTTP, "grpc"])
async def test_sends_run_at_once_and_each_is_accepted(otlp_sink: OtlpSink, protocol: str) -> None:
    """MAX_IN_FLIGHT sends started together all arrive: a transport takes concurrent calls."""
    transport = _transport(otlp_sink, protocol)
    try:
        bodies = [encode_request(_spans(3)) for _ in range(MAX_IN_FLIGHT)]
        attempts = await asyncio.gather(*(transport.send(body, BUDGET) for body in bodies))
    finally:
        await transport.aclose()
    assert [attempt.ok for attempt in attempts] == [True] * MAX_IN_FLIGHT
    assert await otlp_sink.wait_for_count(3 * MAX_IN_FLIGHT) == 3 * MAX_IN_FLIGHT


@pytest.mark.parametrize(("protocol", "reason"), [(HTTP, "HTTP 503"), ("grpc", "gRPC UNAVAILABLE")])
async def test_an_unavailable_collector_is_a_retryable_attempt(
    otlp_sink: OtlpSink, protocol: str, reason: str
) -> None:
    """The sink's fault mode answers 503 / UNAVAILABLE: not ok, retryable, the reason named."""
    otlp_sink.mode = "error"
    transport = _transport(otlp_sink, protocol)
    try:
        attempt = await transport.send(encode_request(_spans(1)), BUDGET)
    finally:
        await transport.aclose()
    assert (attempt.ok, attempt.retryable) == (False, True)
    assert attempt.reason == reason


@pytest.mark.parametrize("protocol", [HTTP, "grpc"])
async def test_nobody_listening_is_an_attempt_not_an_exception(protocol: str) -> None:
    """A refused connection comes back as a failed attempt with its exception's name."""
    async with OtlpSink() as sink:
        settings = dataclasses.replace(
            otlp_settings(
                {
                    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": sink.http_endpoint
                    if protocol == HTTP
                    else sink.grpc_endpoint
                },
                protocol,
            )
        )
    # The sink is closed now: its ports refuse.
    transport = make_transport(settings)
    try:
        attempt = await transport.send(encode_request(_spans(1)), 2.0)
    finally:
        await transport.aclose()
    assert not attempt.ok
    assert attempt.reason


def test_unreadable_certificate_is_refused_at_start() -> None:
    """A CA file that cannot be read stops start-up naming OTEL_EXPORTER_OTLP_CERTIFICATE."""
    settings = OtlpSettings(protocol=HTTP, endpoint="https://c/v1/traces", certificate="/nonexistent/ca.pem")
    with pytest.raises(ValueError, match="OTEL_EXPORTER_OTLP_CERTIFICATE"):
        make_transport(settings)
    with pytest.raises(ValueError, match="OTEL_EXPORTER_OTLP_CERTIFICATE"):
        make_transport(dataclasses.replace(settings, protocol="grpc"))
