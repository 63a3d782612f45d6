"""The OTLP export path: the processor's queue, retries and counts (settings: test_otlp_settings.py).

Spans travel through real transports to real receivers on loopback: the OtlpSink (HTTP and
gRPC, decoded with opentelemetry-proto) and, where a test needs to see headers or script the
collector's answers, a small aiohttp collector in this file.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import threading
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTracePartialSuccess,
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.trace import SpanKind

from mes_trace_proxy.export import (
    MAX_IN_FLIGHT,
    Attempt,
    HttpTransport,
    OtlpExportProcessor,
    make_transport,
    otlp_settings,
)
from mes_trace_proxy.sim.otlp_sink import OtlpSink
from tests.certs import TestCA

HTTP = "http/protobuf"

# ── spans through the processor ─────────────────────────────────────────────────────────────


def _provider(processor: OtlpExportProcessor) -> TracerProvider:
    provider = TracerProvider(resource=Resource.create({"service.name": "export-test"}))
    provider.add_span_processor(processor)
    return provider


def _spans(provider: TracerProvider, count: int, prefix: str = "span") -> None:
    tracer = provider.get_tracer("export-test")
    for number in range(count):
        with tracer.start_as_current_span(
            f"{prefix}-{number}", kind=SpanKind.SERVER, attributes={"mes.order.id": f"ORD-{number}"}
        ):
            pass


def _processor(transport: object, **overrides: float) -> OtlpExportProcessor:
    settings: dict[str, float] = {
        "max_queue_size": 100,
        "max_batch": 10,
        "delay_seconds": 0.05,
        "export_timeout_seconds": 5.0,
        "send_timeout_seconds": 2.0,
    }
    settings.update(overrides)
    return OtlpExportProcessor(
        transport,  # type: ignore[arg-type]
        max_queue_size=int(settings["max_queue_size"]),
        max_batch=int(settings["max_batch"]),
        delay_seconds=settings["delay_seconds"],
        export_timeout_seconds=settings["export_timeout_seconds"],
        send_timeout_seconds=settings["send_timeout_seconds"],
    )


@pytest.mark.parametrize("compression", ["none", "gzip"])
@pytest.mark.parametrize("protocol", [HTTP, "grpc"])
async def test_spans_reach_a_real_receiver_over_both_protocols(
    otlp_sink: OtlpSink, protocol: str, compression: str
) -> None:
    """Spans are encoded as they end and arrive whole, grouped under their resource and scope."""
    endpoint = otlp_sink.http_endpoint if protocol == HTTP else otlp_sink.grpc_endpoint
    environ = {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": endpoint, "OTEL_EXPORTER_OTLP_COMPRESSION": compression}
    processor = _processor(make_transport(otlp_settings(environ, protocol)))
    processor.start()
    provider = _provider(processor)
    _spans(provider, 25)
    received = await otlp_sink.wait_for_spans(25)
    await processor.aclose()
    assert sorted(s.name for s in received) == sorted(f"span-{n}" for n in range(25))
    assert {s.resource["service.name"] for s in received} == {"export-test"}
    assert {s.attributes["mes.order.id"] for s in received} == {f"ORD-{n}" for n in range(25)}
    assert (processor.stats.queued, processor.stats.exported, processor.stats.failed) == (25, 25, 0)


@dataclass
class Collector:
    """A scripted OTLP/HTTP collector: answers come from ``answers`` in turn, then 200."""

    answers: list[Callable[[], web.Response]] = field(default_factory=list)
    requests: list[tuple[Mapping[str, str], bytes]] = field(default_factory=list)
    url: str = ""
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    #: the client ends of the connections requests came on
    peers: set[object] = field(default_factory=set)

    async def handle(self, request: web.Request) -> web.Response:
        # aiohttp's server has already inflated a gzip body; the header says it came so.
        body = await request.read()
        self.requests.append((dict(request.headers), body))
        assert request.transport is not None
        self.peers.add(request.transport.get_extra_info("peername"))
        self.arrived.set()
        if self.answers:
            return self.answers.pop(0)()
        return web.Response(body=ExportTraceServiceResponse().SerializeToString())

    def spans(self) -> list[str]:
        names = []
        for _, body in self.requests:
            message = ExportTraceServiceRequest.FromString(body)
            names += [s.name for rs in message.resource_spans for ss in rs.scope_spans for s in ss.spans]
        return names


@pytest.fixture
async def collector() -> AsyncIterator[Collector]:
    """A scripted collector on loopback."""
    found = Collector()
    runner = await _serve(found)
    yield found
    await runner.cleanup()


def _http(collector: Collector, **environ: str) -> HttpTransport:
    return HttpTransport(
        otlp_settings({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": collector.url, **environ}, HTTP)
    )


async def test_headers_and_gzip_reach_the_collector(collector: Collector) -> None:
    """Configured headers go with every export, and gzip bodies decode to the same request."""
    processor = _processor(
        _http(
            collector, OTEL_EXPORTER_OTLP_HEADERS="x-tenant=jewellery", OTEL_EXPORTER_OTLP_COMPRESSION="gzip"
        )
    )
    processor.start()
    _spans(_provider(processor), 3)
    await processor.aclose()
    headers, _ = collector.requests[0]
    assert headers["x-tenant"] == "jewellery"
    assert headers["Content-Encoding"] == "gzip"
    assert headers["Content-Type"] == "application/x-protobuf"
    assert sorted(collector.spans()) == ["span-0", "span-1", "span-2"]


async def test_retryable_answers_are_retried_until_accepted(collector: Collector) -> None:
    """A 503 (with Retry-After) and a 429 are sent again; the batch then counts as exported once."""
    collector.answers = [
        lambda: web.Response(status=503, headers={"Retry-After": "0"}),
        lambda: web.Response(status=429, headers={"Retry-After": "0.01"}),
    ]
    processor = _processor(_http(collector))
    processor.start()
    _spans(_provider(processor), 4)
    await processor.aclose()
    assert len(collector.requests) == 3
    assert (processor.stats.exported, processor.stats.failed) == (4, 0)


async def test_a_refused_batch_is_not_retried_and_is_counted(collector: Collector) -> None:
    """A 400 is final: the batch's spans count as failed, and later batches still go."""
    collector.answers = [lambda: web.Response(status=400)]
    processor = _processor(_http(collector), max_batch=2)
    processor.start()
    provider = _provider(processor)
    _spans(provider, 2, "refused")
    await asyncio.wait_for(collector.arrived.wait(), 5)
    _spans(provider, 2, "kept")
    await processor.aclose()
    assert (processor.stats.failed, processor.stats.exported) == (2, 2)
    assert sorted(collector.spans()) == ["kept-0", "kept-1", "refused-0", "refused-1"]
    assert len(collector.requests) == 2


async def test_partial_success_counts_the_rejected_spans(collector: Collector) -> None:
    """Spans a collector says it rejected inside a success answer are counted as failed."""
    partial = ExportTraceServiceResponse(
        partial_success=ExportTracePartialSuccess(rejected_spans=3, error_message="too old")
    )
    collector.answers = [lambda: web.Response(body=partial.SerializeToString())]
    processor = _processor(_http(collector))
    processor.start()
    _spans(_provider(processor), 5)
    await processor.aclose()
    assert (processor.stats.exported, processor.stats.failed) == (2, 3)


async def test_a_dead_collector_costs_counted_spans_and_nothing_else() -> None:
    """With nothing listening, every span ends up counted as failed within the send timeout."""
    transport = HttpTransport(
        otlp_settings({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:9/v1/traces"}, HTTP)
    )
    processor = _processor(transport, send_timeout_seconds=0.3)
    processor.start()
    _spans(_provider(processor), 12)
    await processor.aclose()
    assert processor.stats.queued == 12
    assert (processor.stats.exported, processor.stats.failed) == (0, 12)


class HeldTransport:
    """A transport whose sends wait until released, to fill the queue behind them."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.sending = asyncio.Event()
        self.sent: list[bytes] = []

    async def send(self, body: bytes, budget: float) -> Attempt:
        self.sending.set()
        await self.release.wait()
        self.sent.append(body)
        return Attempt(ok=True)

    async def aclose(self) -> None:
        """Nothing to close."""


async def test_a_full_queue_drops_and_counts_never_blocks() -> None:
    """Past the queue bound spans are dropped and counted; every span is accounted for once."""
    transport = HeldTransport()
    processor = _processor(transport, max_queue_size=20, max_batch=5)
    processor.start()
    provider = _provider(processor)
    _spans(provider, 5)
    await asyncio.wait_for(transport.sending.wait(), 5)  # the first batch is out of the queue
    _spans(provider, 30)
    transport.release.set()
    await processor.aclose()
    stats = processor.stats
    assert stats.dropped_queue_full == 10
    assert stats.queued == 25
    assert stats.exported + stats.failed == stats.queued
    assert stats.exported == 25


async def test_shutdown_flushes_what_is_queued() -> None:
    """Spans queued below the batch size and before their delay are sent at shutdown."""
    transport = HeldTransport()
    transport.release.set()
    processor = _processor(transport, max_batch=50, delay_seconds=60)
    processor.start()
    _spans(_provider(processor), 7)
    await processor.aclose()
    assert processor.stats.exported == 7
    assert len(transport.sent) == 1


async def test_force_flush_from_another_thread_waits_for_the_export() -> None:
    """The SDK's blocking force_flush, called off the loop, returns after the queue went out."""
    transport = HeldTransport()
    transport.release.set()
    processor = _processor(transport, max_batch=50, delay_seconds=60)
    processor.start()
    _spans(_provider(processor), 3)
    flushed = await asyncio.to_thread(processor.force_flush, 5000)
    assert flushed
    assert processor.stats.exported == 3
    await processor.aclose()


async def test_spans_ended_on_another_thread_wake_the_exporter() -> None:
    """A full batch ended on a worker thread is sent without waiting for the delay."""
    transport = HeldTransport()
    transport.release.set()
    processor = _processor(transport, max_batch=4, delay_seconds=60)
    processor.start()
    provider = _provider(processor)
    worker = threading.Thread(target=_spans, args=(provider, 4))
    worker.start()
    await asyncio.to_thread(worker.join, 5)
    for _ in range(200):
        if processor.stats.exported == 4:
            break
        await asyncio.sleep(0.01)
    assert processor.stats.exported == 4
    await processor.aclose()


def test_an_unstarted_processor_counts_its_queue_as_failed_at_shutdown() -> None:
    """Spans queued by a processor whose task never ran are counted as failed, not lost silently."""
    processor = _processor(HeldTransport())
    provider = _provider(processor)
    _spans(provider, 3)
    provider.shutdown()
    assert (processor.stats.queued, processor.stats.failed, processor.stats.exported) == (3, 3, 0)
    _spans(provider, 1)
    assert processor.stats.queued == 3


def test_unsampled_spans_are_not_queued() -> None:
    """Only sampled spans are encoded and queued."""
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

    processor = _processor(HeldTransport())
    provider = TracerProvider(sampler=ALWAYS_OFF)
    provider.add_span_processor(processor)
    _spans(provider, 3)
    assert processor.stats.queued == 0
    provider.shutdown()


class CountingTransport:
    """A transport that holds each send until released and records how many ran at once."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.running = 0
        self.most = 0
        self.sends = 0

    async def send(self, body: bytes, budget: float) -> Attempt:
        self.running += 1
        self.most = max(self.most, self.running)
        self.sends += 1
        try:
            await self.release.wait()
        finally:
            self.running -= 1
        return Attempt(ok=True)

    async def aclose(self) -> None:
        """Nothing to close."""


async def test_exports_overlap_up_to_the_limit_and_no_further() -> None:
    """Full batches go out concurrently, at most MAX_IN_FLIGHT at once; the rest wait their turn."""
    transport = CountingTransport()
    processor = _processor(transport, max_batch=2, max_queue_size=100, delay_seconds=60)
    processor.start()
    _spans(_provider(processor), 2 * (MAX_IN_FLIGHT + 3))
    for _ in range(200):
        if transport.running == MAX_IN_FLIGHT:
            break
        await asyncio.sleep(0.005)
    assert transport.running == MAX_IN_FLIGHT
    transport.release.set()
    await processor.aclose()
    assert transport.most == MAX_IN_FLIGHT
    assert transport.sends == MAX_IN_FLIGHT + 3
    assert processor.stats.exported == 2 * (MAX_IN_FLIGHT + 3)


async def test_shutdown_out_of_time_counts_exports_in_flight_and_queued_as_failed() -> None:
    """When OTEL_BSP_EXPORT_TIMEOUT runs out, every span still in flight or queued counts as failed."""
    transport = CountingTransport()  # never released: a collector that never answers
    processor = _processor(transport, max_batch=2, max_queue_size=100, export_timeout_seconds=0.2)
    processor.start()
    _spans(_provider(processor), 2 * (MAX_IN_FLIGHT + 3))
    await processor.aclose()
    stats = processor.stats
    assert (stats.queued, stats.exported, stats.failed) == (
        2 * (MAX_IN_FLIGHT + 3),
        0,
        2 * (MAX_IN_FLIGHT + 3),
    )


class Unreadable:
    """A sampled span the encoder cannot read (no attributes where it expects them)."""

    def __init__(self, good: ReadableSpan) -> None:
        self.context = good.context
        self.resource = good.resource
        self.instrumentation_scope = good.instrumentation_scope

    def get_span_context(self) -> object:
        return self.context


class Recording(SpanProcessor):
    """Keeps the ended spans, to hand them to the processor under test as it pleases."""

    def __init__(self) -> None:
        self.spans: list[ReadableSpan] = []

    def on_end(self, span: ReadableSpan) -> None:
        self.spans.append(span)


def _ended(count: int) -> list[ReadableSpan]:
    recording = Recording()
    provider = TracerProvider(resource=Resource.create({"service.name": "export-test"}))
    provider.add_span_processor(recording)
    _spans(provider, count)
    return recording.spans


async def test_a_span_the_encoder_cannot_read_is_counted_and_its_batch_still_goes() -> None:
    """A span the encoder cannot read is failed as it ends; the others are still exported."""
    transport = HeldTransport()
    transport.release.set()
    processor = _processor(transport, max_batch=5, delay_seconds=60)
    processor.start()
    good = _ended(4)
    processor.on_end(good[0])
    processor.on_end(Unreadable(good[1]))  # type: ignore[arg-type]
    for span in good[2:]:
        processor.on_end(span)
    await processor.aclose()
    assert (processor.stats.queued, processor.stats.exported, processor.stats.failed) == (3, 3, 1)
    (body,) = transport.sent
    message = ExportTraceServiceRequest.FromString(body)
    names = [s.name for rs in message.resource_spans for ss in rs.scope_spans for s in ss.spans]
    assert names == ["span-0", "span-2", "span-3"]


async def _serve(collector: Collector, context: ssl.SSLContext | None = None) -> web.AppRunner:
    """Run ``collector`` on loopback (over TLS with ``context``); its url is set."""
    app = web.Application()
    app.router.add_post("/v1/traces", collector.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    scheme = "https" if context is not None else "http"
    collector.url = f"{scheme}://127.0.0.1:{runner.addresses[0][1]}/v1/traces"
    return runner


async def test_exports_reuse_one_connection_and_name_the_collector_in_host(collector: Collector) -> None:
    """Batches one after another go over one kept-alive connection, with Host as in the endpoint."""
    processor = _processor(_http(collector), max_batch=1)
    processor.start()
    provider = _provider(processor)
    for number in range(3):
        _spans(provider, 1, prefix=f"batch{number}")
        await processor.flush()
    await processor.aclose()
    assert collector.spans() == ["batch0-0", "batch1-0", "batch2-0"]
    port = collector.url.split(":")[2].split("/")[0]
    assert {headers["Host"] for headers, _ in collector.requests} == {f"127.0.0.1:{port}"}
    assert len(collector.peers) == 1


async def test_an_https_collector_is_verified_against_the_configured_ca(tmp_path: Path) -> None:
    """OTLP/HTTP over TLS: the CA from OTEL_EXPORTER_OTLP_CERTIFICATE; without it, nothing goes."""
    ca = TestCA()
    cert, key = ca.issue("127.0.0.1").write(tmp_path, "collector")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    found = Collector()
    runner = await _serve(found, context)
    try:
        trusted = _processor(
            _http(found, OTEL_EXPORTER_OTLP_CERTIFICATE=str(ca.write(tmp_path))), send_timeout_seconds=5
        )
        trusted.start()
        _spans(_provider(trusted), 2)
        await trusted.aclose()
        assert sorted(found.spans()) == ["span-0", "span-1"]
        untrusted = _processor(_http(found), send_timeout_seconds=0.5)
        untrusted.start()
        _spans(_provider(untrusted), 1, prefix="unverified")
        await untrusted.aclose()
        assert (untrusted.stats.exported, untrusted.stats.failed) == (0, 1)
        assert "unverified-0" not in found.spans()
    finally:
        await runner.cleanup()


async def test_a_proxy_variable_sends_exports_through_that_proxy(
    collector: Collector, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With http_proxy set, exports go to the proxy (here the collector itself answers as one)."""
    for name in ("no_proxy", "NO_PROXY", "HTTP_PROXY"):
        monkeypatch.delenv(name, raising=False)
    # aiohttp reads the proxy from the process environment, as the proxy's own start-up does.
    monkeypatch.setenv("http_proxy", collector.url.removesuffix("/v1/traces"))
    # A name that resolves nowhere: only the proxy can deliver this.
    environ = {**os.environ, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector.invalid:4318/v1/traces"}
    transport = HttpTransport(otlp_settings(environ, HTTP))
    processor = _processor(transport)
    processor.start()
    _spans(_provider(processor), 2)
    await processor.aclose()
    assert sorted(collector.spans()) == ["span-0", "span-1"]
    assert {headers["Host"] for headers, _ in collector.requests} == {"collector.invalid:4318"}
