"""Tests for the OTLP sink: the real OTel exporters over HTTP and gRPC, faults, JSON lines and the CLI."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import signal
import sys
import threading
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path

import aiohttp
import grpc
import pytest
from google.rpc import code_pb2, status_pb2  # type: ignore[import-untyped]
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpanExporter
from opentelemetry.exporter.otlp.proto.http import Compression as HttpCompression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue, KeyValueList
from opentelemetry.proto.resource.v1.resource_pb2 import Resource as ProtoResource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans
from opentelemetry.proto.trace.v1.trace_pb2 import Span as ProtoSpan
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    Tracer,
    TraceState,
)
from opentelemetry.util.types import AttributeValue

from mes_trace_proxy.sim.otlp_sink import OtlpSink, ReceivedSpan, build_parser, serve

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTOBUF = {"Content-Type": "application/x-protobuf"}
# A fixed 2023 timestamp so start/end times compare exactly, not against a clock.
START_NS = 1_700_000_000_000_000_000
# Generous for loopback, bounded so a broken sink fails the test instead of hanging it.
WAIT_SECONDS = 10.0
# A Python interpreter importing grpc and the SDK can take a few seconds on a busy CI runner.
CLI_READY_SECONDS = 30.0
# Short enough to keep fault tests quick, long enough for a loopback round trip on a busy runner.
SHORT_EXPORT_TIMEOUT = 1.5

TRANSPORTS = ("http", "grpc")

SERVER_ATTRIBUTES: Mapping[str, AttributeValue] = {
    "mes.order.id": "ORD-1001",
    "http.response.status_code": 201,
    "mes.order.dwell_ratio": 0.75,
    "mes.order.overdue": False,
    "mes.order.tags": ("rush", "export"),
    "mes.order.line_numbers": (1, 2, 3),
    "mes.order.weights": (0.5, 1.25),
    "mes.order.checks": (True, False),
}
RESOURCE_ATTRIBUTES: Mapping[str, AttributeValue] = {
    "service.name": "mes-trace-proxy-test",
    "deployment.environment.name": "test",
    "host.cpu.count": 8,
}
LINKED = SpanContext(
    trace_id=0x0AF7651916CD43DD8448EB211C80319C,
    span_id=0xB7AD6B7169203331,
    is_remote=True,
    trace_flags=TraceFlags(TraceFlags.SAMPLED),
)


@pytest.fixture(autouse=True)
def _no_otel_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep OTEL_* variables of the developer's shell out of the exporters under test."""
    for key in [k for k in os.environ if k.startswith("OTEL_")]:
        monkeypatch.delenv(key)


@pytest.fixture
async def sink() -> AsyncIterator[OtlpSink]:
    """A started sink with both receivers on loopback port 0."""
    async with OtlpSink() as started:
        yield started


def make_exporter(sink: OtlpSink, transport: str, *, timeout: float = WAIT_SECONDS) -> SpanExporter:
    """The real OTLP exporter for `transport`, aimed at `sink`."""
    if transport == "http":
        return HttpSpanExporter(endpoint=sink.http_endpoint, timeout=timeout)
    return GrpcSpanExporter(endpoint=sink.grpc_endpoint, insecure=True, timeout=timeout)


async def export_spans(
    exporter: SpanExporter, build: Callable[[Tracer], None], resource: Resource | None = None
) -> None:
    """Create spans with `build` on a private provider, then flush them through `exporter`."""
    provider = TracerProvider(resource=resource or Resource(RESOURCE_ATTRIBUTES))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    build(provider.get_tracer("mes_trace_proxy.tests", "1.0"))
    # shutdown() blocks until the export is answered, and the sink answers on this event loop.
    await asyncio.to_thread(provider.shutdown)


def finished_span(name: str) -> ReadableSpan:
    """One ended SDK span, for calling an exporter's export() directly."""
    span = TracerProvider().get_tracer("mes_trace_proxy.tests").start_span(name)
    span.end()
    assert isinstance(span, ReadableSpan)
    return span


async def export_directly(exporter: SpanExporter, name: str) -> SpanExportResult:
    """One export() call off the event loop, returning what the exporter concluded."""
    try:
        return await asyncio.to_thread(exporter.export, [finished_span(name)])
    finally:
        await asyncio.to_thread(exporter.shutdown)


def value_types(value: object) -> object:
    """The type of a value, with the element types of a tuple, so bool/int and int/float differ."""
    if isinstance(value, tuple):
        return (tuple, tuple(type(item) for item in value))
    return type(value)


def hex_ids(context: SpanContext) -> tuple[str, str]:
    """A span context's ids in the sink's lowercase-hex form."""
    return format(context.trace_id, "032x"), format(context.span_id, "016x")


def raw_request(name: str = "raw") -> bytes:
    """A hand-built export request with values the Python SDK never sends (bytes, kvlist, null)."""
    span = ProtoSpan(
        trace_id=bytes(range(16)),
        span_id=bytes(range(8)),
        name=name,
        kind=ProtoSpan.SPAN_KIND_PRODUCER,
        start_time_unix_nano=START_NS,
        end_time_unix_nano=START_NS + 5,
        attributes=[
            KeyValue(key="blob", value=AnyValue(bytes_value=b"\x00\xff")),
            KeyValue(
                key="nested",
                value=AnyValue(
                    kvlist_value=KeyValueList(values=[KeyValue(key="n", value=AnyValue(int_value=7))])
                ),
            ),
            KeyValue(key="null", value=AnyValue()),
        ],
    )
    request = ExportTraceServiceRequest(
        resource_spans=[
            ResourceSpans(
                resource=ProtoResource(
                    attributes=[KeyValue(key="service.name", value=AnyValue(string_value="raw"))]
                ),
                scope_spans=[ScopeSpans(scope=InstrumentationScope(name="raw-scope"), spans=[span])],
            )
        ]
    )
    data = request.SerializeToString()
    assert isinstance(data, bytes)
    return data


def rpc_status(body: bytes) -> tuple[int, str]:
    """Code and message of a google.rpc.Status body."""
    status = status_pb2.Status.FromString(body)
    return int(status.code), str(status.message)


# ── round trips through the real exporters ────────────────────────────────────────────────────
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_every_field_round_trips_with_exact_values_and_types(sink: OtlpSink, transport: str) -> None:
    """Names, ids, parents, kinds, times, typed attributes, events, links, status, resource, scope survive."""

    def build(tracer: Tracer) -> None:
        server = tracer.start_span(
            "POST /orders/{order_id}/status",
            kind=SpanKind.SERVER,
            attributes=SERVER_ATTRIBUTES,
            links=[Link(LINKED, {"mes.link.reason": "resumed", "mes.link.hops": 2})],
            start_time=START_NS,
        )
        server.set_status(Status(StatusCode.OK))
        client = tracer.start_span(
            "POST",
            context=trace.set_span_in_context(server),
            kind=SpanKind.CLIENT,
            start_time=START_NS + 1_000,
        )
        client.add_event(
            "mes.order.status.changed",
            {"mes.order.status.from": "RELEASED", "attempt": 2, "late": True},
            timestamp=START_NS + 1_500,
        )
        client.set_status(Status(StatusCode.ERROR, "upstream timed out"))
        client.end(end_time=START_NS + 2_000)
        server.end(end_time=START_NS + 3_000)
        sent.update(server=server.get_span_context(), client=client.get_span_context())

    sent: dict[str, SpanContext] = {}
    await export_spans(make_exporter(sink, transport), build)
    received = {span.kind: span for span in await sink.wait_for_spans(2, timeout=WAIT_SECONDS)}
    server, client = received["SERVER"], received["CLIENT"]

    assert server.name == "POST /orders/{order_id}/status"
    assert (server.trace_id, server.span_id, server.parent_span_id) == (*hex_ids(sent["server"]), "")
    assert (server.start_ns, server.end_ns) == (START_NS, START_NS + 3_000)
    assert dict(server.attributes) == SERVER_ATTRIBUTES
    assert {k: value_types(v) for k, v in server.attributes.items()} == {
        k: value_types(v) for k, v in SERVER_ATTRIBUTES.items()
    }
    assert [(li.trace_id, li.span_id, dict(li.attributes)) for li in server.links] == [
        (*hex_ids(LINKED), {"mes.link.reason": "resumed", "mes.link.hops": 2})
    ]
    assert type(server.links[0].attributes["mes.link.hops"]) is int
    assert (server.status_code, server.status_message) == ("OK", "")
    assert server.events == ()

    assert client.name == "POST"
    assert (client.trace_id, client.span_id) == hex_ids(sent["client"])
    assert client.trace_id == server.trace_id
    assert client.parent_span_id == server.span_id
    assert (client.start_ns, client.end_ns) == (START_NS + 1_000, START_NS + 2_000)
    assert dict(client.attributes) == {}
    [event] = client.events
    assert (event.name, event.time_ns) == ("mes.order.status.changed", START_NS + 1_500)
    assert dict(event.attributes) == {"mes.order.status.from": "RELEASED", "attempt": 2, "late": True}
    assert type(event.attributes["attempt"]) is int
    assert event.attributes["late"] is True
    assert (client.status_code, client.status_message) == ("ERROR", "upstream timed out")

    for span in (server, client):
        assert dict(span.resource) == RESOURCE_ATTRIBUTES
        assert type(span.resource["host.cpu.count"]) is int
        assert span.scope_name == "mes_trace_proxy.tests"
        assert span.transport == transport
    assert (sink.spans_received, sink.spans) == (2, tuple(received.values()))


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_every_span_kind_and_unset_status_round_trip(sink: OtlpSink, transport: str) -> None:
    """Each SDK SpanKind arrives as its name, and a span without a status arrives as UNSET."""
    kinds = {kind.name: kind for kind in SpanKind}

    def build(tracer: Tracer) -> None:
        for name, kind in kinds.items():
            tracer.start_span(name, kind=kind).end()

    await export_spans(make_exporter(sink, transport), build)
    spans = await sink.wait_for_spans(len(kinds), timeout=WAIT_SECONDS)
    assert {span.name: span.kind for span in spans} == {name: name for name in kinds}
    assert {span.status_code for span in spans} == {"UNSET"}


@pytest.mark.parametrize(
    ("transport", "compression"),
    [
        pytest.param("http", HttpCompression.Gzip, id="http-gzip"),
        pytest.param("http", HttpCompression.Deflate, id="http-deflate"),
        pytest.param("grpc", grpc.Compression.Gzip, id="grpc-gzip"),
    ],
)
async def test_compressed_exports_are_decoded(sink: OtlpSink, transport: str, compression: object) -> None:
    """The exporters' own gzip/deflate request compression is undone before decoding."""
    exporter: SpanExporter
    if transport == "http":
        assert isinstance(compression, HttpCompression)
        exporter = HttpSpanExporter(
            endpoint=sink.http_endpoint, timeout=WAIT_SECONDS, compression=compression
        )
    else:
        assert isinstance(compression, grpc.Compression)
        exporter = GrpcSpanExporter(
            endpoint=sink.grpc_endpoint, insecure=True, timeout=WAIT_SECONDS, compression=compression
        )
    await export_spans(exporter, lambda tracer: tracer.start_span("compressed", attributes={"n": 1}).end())
    [span] = await sink.wait_for_spans(1, timeout=WAIT_SECONDS)
    assert (span.name, dict(span.attributes), span.transport) == ("compressed", {"n": 1}, transport)


# ── raw HTTP: encodings and refusals ───────────────────────────────────────────────────────────
def _gzip_two_members(data: bytes) -> bytes:
    return gzip.compress(data[:10]) + gzip.compress(data[10:])


ACCEPTED_BODIES = [
    pytest.param({}, lambda d: d, id="identity"),
    pytest.param({"Content-Encoding": "gzip"}, gzip.compress, id="gzip"),
    pytest.param({"Content-Encoding": "GZIP "}, gzip.compress, id="gzip-any-case"),
    pytest.param({"Content-Encoding": "gzip"}, _gzip_two_members, id="gzip-two-members"),
    pytest.param({"Content-Encoding": "deflate"}, zlib.compress, id="deflate"),
]


@pytest.mark.parametrize(("headers", "encode"), ACCEPTED_BODIES)
async def test_http_accepts_protobuf_in_each_content_coding(
    sink: OtlpSink, headers: dict[str, str], encode: Callable[[bytes], bytes]
) -> None:
    """A protobuf body in any supported coding gets 200 with an ExportTraceServiceResponse."""
    async with (
        aiohttp.ClientSession() as session,
        session.post(sink.http_endpoint, data=encode(raw_request()), headers={**PROTOBUF, **headers}) as resp,
    ):
        assert resp.status == 200
        assert resp.content_type == "application/x-protobuf"
        assert ExportTraceServiceResponse.FromString(await resp.read()) == ExportTraceServiceResponse()
    assert [span.name for span in sink.spans] == ["raw"]


REFUSED_BODIES = [
    pytest.param({"Content-Type": "application/json"}, b"{}", 415, code_pb2.INVALID_ARGUMENT, id="json-type"),
    pytest.param({}, raw_request(), 415, code_pb2.INVALID_ARGUMENT, id="no-content-type"),
    pytest.param(
        {**PROTOBUF, "Content-Encoding": "br"}, raw_request(), 415, code_pb2.INVALID_ARGUMENT, id="brotli"
    ),
    pytest.param(PROTOBUF, b"\x0a\x05ab", 400, code_pb2.INVALID_ARGUMENT, id="truncated-protobuf"),
    pytest.param(
        {**PROTOBUF, "Content-Encoding": "gzip"},
        gzip.compress(raw_request())[:-12],
        400,
        code_pb2.INVALID_ARGUMENT,
        id="truncated-gzip",
    ),
    pytest.param(
        {**PROTOBUF, "Content-Encoding": "gzip"}, b"not gzip", 400, code_pb2.INVALID_ARGUMENT, id="not-gzip"
    ),
    pytest.param(
        {**PROTOBUF, "Content-Encoding": "gzip"},
        gzip.compress(bytes(20 * 1024 * 1024 + 1)),
        413,
        code_pb2.RESOURCE_EXHAUSTED,
        id="gzip-bomb",
    ),
]


@pytest.mark.parametrize(("headers", "body", "status", "rpc_code"), REFUSED_BODIES)
async def test_http_refuses_bad_requests_with_a_status_body(
    sink: OtlpSink, headers: dict[str, str], body: bytes, status: int, rpc_code: int
) -> None:
    """Wrong types and codings get 415, undecodable bodies 400, bombs 413; each with a google.rpc.Status."""
    async with (
        aiohttp.ClientSession() as session,
        session.post(sink.http_endpoint, data=body, headers=headers) as resp,
    ):
        assert resp.status == status
        assert resp.content_type == "application/x-protobuf"
        assert rpc_status(await resp.read())[0] == rpc_code
    assert (sink.requests_received, sink.spans_received, sink.spans) == (1, 0, ())


async def test_values_the_sdk_never_sends_are_decoded_and_written(tmp_path: Path) -> None:
    """Bytes, nested key/value lists and null decode to bytes, a mapping and None; JSON gets hex, objects."""
    path = tmp_path / "spans.jsonl"
    async with OtlpSink(jsonl_path=path, grpc=False) as sink:
        async with (
            aiohttp.ClientSession() as session,
            session.post(sink.http_endpoint, data=raw_request(), headers=PROTOBUF) as resp,
        ):
            assert resp.status == 200
        [span] = sink.spans
    assert dict(span.attributes) == {"blob": b"\x00\xff", "nested": {"n": 7}, "null": None}
    assert (span.kind, span.trace_id, span.span_id) == (
        "PRODUCER",
        bytes(range(16)).hex(),
        bytes(range(8)).hex(),
    )
    assert (span.scope_name, dict(span.resource)) == ("raw-scope", {"service.name": "raw"})
    [line] = path.read_text(encoding="utf-8").splitlines()
    assert json.loads(line)["attributes"] == {"blob": "00ff", "nested": {"n": 7}, "null": None}


# ── fault modes ────────────────────────────────────────────────────────────────────────────────
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_error_mode_fails_the_export_then_ok_mode_accepts_it(sink: OtlpSink, transport: str) -> None:
    """In "error" mode the exporter gets 503/UNAVAILABLE and nothing is counted; switching back accepts."""
    sink.mode = "error"
    failed = await export_directly(make_exporter(sink, transport, timeout=SHORT_EXPORT_TIMEOUT), "refused")
    assert failed is SpanExportResult.FAILURE
    assert sink.requests_received >= 1
    assert (sink.spans_received, sink.spans) == (0, ())

    sink.mode = "ok"
    assert await export_directly(make_exporter(sink, transport), "accepted") is SpanExportResult.SUCCESS
    assert [span.name for span in sink.spans] == ["accepted"]


async def test_error_mode_answers_http_503_with_an_unavailable_status(sink: OtlpSink) -> None:
    """The HTTP fault answer is 503 with a google.rpc.Status UNAVAILABLE body, the retryable OTLP failure."""
    sink.mode = "error"
    async with (
        aiohttp.ClientSession() as session,
        session.post(sink.http_endpoint, data=raw_request(), headers=PROTOBUF) as resp,
    ):
        assert resp.status == 503
        assert rpc_status(await resp.read())[0] == code_pb2.UNAVAILABLE


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_blackhole_fails_the_exporter_and_close_does_not_hang(transport: str) -> None:
    """An exporter stuck on a blackhole fails, closing the sink meanwhile is bounded, nothing is counted."""
    sink = await OtlpSink(mode="blackhole").start()
    try:
        exporter = make_exporter(sink, transport, timeout=SHORT_EXPORT_TIMEOUT)
        export = asyncio.ensure_future(export_directly(exporter, "held"))
        await sink.wait_for_requests(1, timeout=WAIT_SECONDS)
    finally:
        async with asyncio.timeout(WAIT_SECONDS):
            await sink.aclose()
    assert await asyncio.wait_for(export, WAIT_SECONDS) is SpanExportResult.FAILURE
    assert (sink.spans_received, sink.spans) == (0, ())


async def _post_http(sink: OtlpSink) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(sink.http_endpoint, data=raw_request(), headers=PROTOBUF) as resp,
    ):
        return resp.status, rpc_status(await resp.read())[1]


async def _call_grpc(sink: OtlpSink) -> tuple[int, str]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{sink.grpc_port}") as channel:
        export = channel.unary_unary(
            "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
            request_serializer=lambda data: data,
            response_deserializer=ExportTraceServiceResponse.FromString,
        )
        try:
            await export(raw_request())
        except grpc.aio.AioRpcError as error:
            return int(error.code().value[0]), str(error.details())
        return 0, ""


RAW_CALLS: Mapping[str, Callable[[OtlpSink], Awaitable[tuple[int, str]]]] = {
    "http": _post_http,
    "grpc": _call_grpc,
}
CLOSING_ANSWERS = {
    "http": (503, "otlp sink is closing"),
    "grpc": (14, "otlp sink is closing"),
}  # 14: UNAVAILABLE


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_blackhole_answers_nothing_until_close_then_unavailable(transport: str) -> None:
    """A blackholed request stays unanswered while the sink runs; closing answers it 503/UNAVAILABLE."""
    sink = await OtlpSink(mode="blackhole").start()
    try:
        call = asyncio.ensure_future(RAW_CALLS[transport](sink))
        await sink.wait_for_requests(1, timeout=WAIT_SECONDS)
        # A negative check: an answer would come within milliseconds on loopback; a slow runner
        # can only make this pass late, never fail wrongly.
        done, _ = await asyncio.wait({call}, timeout=0.2)
        assert not done
    finally:
        async with asyncio.timeout(WAIT_SECONDS):
            await sink.aclose()
    assert await asyncio.wait_for(call, WAIT_SECONDS) == CLOSING_ANSWERS[transport]
    assert sink.spans_received == 0


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_slow_mode_outlasts_a_short_exporter_timeout(transport: str) -> None:
    """A "slow" sink holding longer than the exporter's timeout makes the export fail; close still ends it."""
    # Far beyond SHORT_EXPORT_TIMEOUT, so the exporter always gives up first.
    async with OtlpSink(mode="slow", delay_seconds=60.0) as sink:
        exporter = make_exporter(sink, transport, timeout=SHORT_EXPORT_TIMEOUT)
        assert await export_directly(exporter, "late") is SpanExportResult.FAILURE
        assert sink.requests_received >= 1
    assert sink.spans_received == 0


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_slow_mode_accepts_after_the_delay(sink: OtlpSink, transport: str) -> None:
    """A "slow" sink whose delay fits in the exporter's timeout still accepts the spans."""
    sink.mode = "slow"
    sink.delay_seconds = 0.05  # well inside the exporter's timeout
    assert await export_directly(make_exporter(sink, transport), "eventually") is SpanExportResult.SUCCESS
    assert [span.name for span in sink.spans] == ["eventually"]


def test_unknown_mode_is_refused() -> None:
    """Setting a mode outside ok/error/blackhole/slow raises ValueError instead of silently accepting."""
    sink = OtlpSink()
    with pytest.raises(ValueError, match="unknown OtlpSink mode 'down'"):
        sink.mode = "down"  # type: ignore[assignment]
    assert sink.mode == "ok"


def test_a_sink_without_receivers_is_refused() -> None:
    """OtlpSink(http=False, grpc=False) is a configuration error, not a silent no-op."""
    with pytest.raises(ValueError, match="at least one"):
        OtlpSink(http=False, grpc=False)


# ── waiting, counting, clearing ────────────────────────────────────────────────────────────────
async def test_wait_for_spans_filters_with_the_predicate(sink: OtlpSink) -> None:
    """wait_for_spans returns only matching spans, in arrival order, once enough have arrived."""

    def build(tracer: Tracer) -> None:
        for name, n in (("a", 1), ("b", 2), ("a", 3)):
            tracer.start_span(name, attributes={"n": n}).end()

    await export_spans(make_exporter(sink, "http"), build)
    spans = await sink.wait_for_spans(2, timeout=WAIT_SECONDS, predicate=lambda s: s.name == "a")
    assert [span.attributes["n"] for span in spans] == [1, 3]


async def test_wait_for_spans_wakes_when_spans_arrive_later(sink: OtlpSink) -> None:
    """A waiter started before the export is woken when the spans are stored, without polling."""
    # "slow" suspends between a request's arrival and storing its spans, so only the wake-up
    # after storing can satisfy the waiter.
    sink.mode = "slow"
    sink.delay_seconds = 0.05
    waiter = asyncio.ensure_future(sink.wait_for_spans(1, timeout=WAIT_SECONDS))
    await export_spans(make_exporter(sink, "grpc"), lambda tracer: tracer.start_span("later").end())
    assert [span.name for span in await waiter] == ["later"]


async def test_wait_for_spans_timeout_names_what_arrived(sink: OtlpSink) -> None:
    """On timeout the error says how many matched and lists the span names that did arrive."""
    await export_spans(make_exporter(sink, "http"), lambda tracer: tracer.start_span("GET /orders").end())
    await sink.wait_for_spans(1, timeout=WAIT_SECONDS)
    with pytest.raises(TimeoutError, match=r"0 matched of 1 received .*'GET /orders' x1"):
        # Nothing else is coming, so any short bound proves the timeout path.
        await sink.wait_for_spans(1, timeout=0.05, predicate=lambda s: s.name == "POST /orders")


async def test_clear_forgets_spans_and_counters(sink: OtlpSink) -> None:
    """clear() empties the kept spans and zeroes both counters, so later waits count only new spans."""
    await export_spans(make_exporter(sink, "http"), lambda tracer: tracer.start_span("before").end())
    await sink.wait_for_spans(1, timeout=WAIT_SECONDS)
    sink.clear()
    assert (sink.spans, sink.spans_received, sink.requests_received) == ((), 0, 0)
    await export_spans(make_exporter(sink, "http"), lambda tracer: tracer.start_span("after").end())
    assert [span.name for span in await sink.wait_for_spans(1, timeout=WAIT_SECONDS)] == ["after"]


async def test_keep_false_counts_without_keeping() -> None:
    """With keep=False spans are counted (wait_for_count) but not kept, and wait_for_spans refuses."""
    async with OtlpSink(keep=False) as sink:

        def build(tracer: Tracer) -> None:
            for i in range(3):
                tracer.start_span(f"s{i}").end()

        for transport in TRANSPORTS:
            await export_spans(make_exporter(sink, transport), build)
        assert await sink.wait_for_count(6, timeout=WAIT_SECONDS) == 6
        assert sink.spans == ()
        with pytest.raises(RuntimeError, match="wait_for_count"):
            await sink.wait_for_spans(1)


async def test_jsonl_file_gets_one_object_per_span(tmp_path: Path) -> None:
    """jsonl_path receives one JSON object per span with hex ids, lists for arrays, and every field."""
    path = tmp_path / "spans.jsonl"

    def build(tracer: Tracer) -> None:
        with tracer.start_as_current_span("parent", kind=SpanKind.SERVER, attributes=SERVER_ATTRIBUTES):
            tracer.start_span("child", links=[Link(LINKED)]).end()

    async with OtlpSink(jsonl_path=path, keep=False) as sink:
        await export_spans(make_exporter(sink, "grpc"), build)
        await sink.wait_for_count(2, timeout=WAIT_SECONDS)
    records = {record["name"]: record for record in map(json.loads, path.read_text("utf-8").splitlines())}
    parent, child = records["parent"], records["child"]
    assert set(parent) == set(ReceivedSpan.__dataclass_fields__)
    assert parent["attributes"] == {
        k: list(v) if isinstance(v, tuple) else v for k, v in SERVER_ATTRIBUTES.items()
    }
    assert (parent["kind"], parent["parent_span_id"], parent["transport"]) == ("SERVER", "", "grpc")
    assert child["parent_span_id"] == parent["span_id"]
    assert child["trace_id"] == parent["trace_id"]
    assert child["links"] == [
        {"trace_id": hex_ids(LINKED)[0], "span_id": hex_ids(LINKED)[1], "attributes": {}}
    ]
    assert parent["trace_state"] == ""
    assert parent["resource"] == RESOURCE_ATTRIBUTES


@pytest.mark.parametrize("transport", ["http", "grpc"])
async def test_trace_state_of_spans_and_links_is_decoded(transport: str) -> None:
    """A span's W3C tracestate arrives as the exporter wrote it (the exporters write none on links)."""
    state = TraceState([("rojo", "00f067aa0ba902b7"), ("congo", "t61rcWkgMzE")])
    parent = SpanContext(LINKED.trace_id, LINKED.span_id, True, TraceFlags(1), state)

    def build(tracer: Tracer) -> None:
        context = trace.set_span_in_context(NonRecordingSpan(parent))
        tracer.start_span("child", context=context, links=[Link(parent), Link(LINKED)]).end()

    async with OtlpSink() as sink:
        await export_spans(make_exporter(sink, transport), build)
        (span,) = await sink.wait_for_spans(1, timeout=WAIT_SECONDS)
    assert span.trace_state == "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"
    assert len(span.links) == 2


# ── lifecycle ──────────────────────────────────────────────────────────────────────────────────
async def test_endpoints_name_the_bound_ports_and_close_leaves_nothing_behind() -> None:
    """Endpoints carry the real ports; after aclose no task or thread of ours remains and ports refuse."""
    threads_before = set(threading.enumerate())
    sink = await OtlpSink().start()
    assert sink.http_endpoint == f"http://127.0.0.1:{sink.http_port}/v1/traces"
    assert sink.grpc_endpoint == f"http://127.0.0.1:{sink.grpc_port}"
    assert sink.http_port > 0
    assert sink.grpc_port > 0
    await sink.aclose()
    await sink.aclose()  # idempotent
    assert asyncio.all_tasks() == {asyncio.current_task()}
    assert set(threading.enumerate()) <= threads_before
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", sink.http_port)


async def test_http_only_sink_has_no_grpc_endpoint() -> None:
    """With grpc=False only HTTP binds, and asking for the gRPC endpoint says it is not running."""
    async with OtlpSink(grpc=False) as sink:
        assert sink.http_port > 0
        with pytest.raises(RuntimeError, match="OTLP/grpc receiver is not running"):
            _ = sink.grpc_endpoint


async def test_starting_twice_is_refused(sink: OtlpSink) -> None:
    """A second start() raises instead of binding a second pair of ports."""
    with pytest.raises(RuntimeError, match="already started"):
        await sink.start()


# ── command line ───────────────────────────────────────────────────────────────────────────────
async def test_cli_prints_endpoints_writes_jsonl_and_exits_on_sigterm(tmp_path: Path) -> None:
    """The CLI prints its real endpoints as one JSON line, writes received spans, and exits 0 on SIGTERM."""
    path = tmp_path / "spans.jsonl"
    argv = ("--http-port", "0", "--grpc-port", "0", "--jsonl", str(path))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mes_trace_proxy.sim.otlp_sink",
        *argv,
        cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        ready = json.loads(await asyncio.wait_for(proc.stdout.readline(), CLI_READY_SECONDS))
        assert ready["http_endpoint"] == f"http://127.0.0.1:{ready['http_port']}/v1/traces"
        assert ready["grpc_endpoint"] == f"http://127.0.0.1:{ready['grpc_port']}"
        assert ready["pid"] == proc.pid
        async with (
            aiohttp.ClientSession() as session,
            session.post(ready["http_endpoint"], data=raw_request("via-cli"), headers=PROTOBUF) as resp,
        ):
            assert resp.status == 200
        proc.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(proc.communicate(), CLI_READY_SECONDS)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0
    assert json.loads(stderr.decode().splitlines()[-1]) == {"requests_received": 1, "spans_received": 1}
    assert [json.loads(line)["name"] for line in path.read_text("utf-8").splitlines()] == ["via-cli"]


async def test_serve_returns_1_when_the_port_is_taken(sink: OtlpSink) -> None:
    """serve() reports a port already in use as exit status 1 instead of a traceback."""
    args = build_parser().parse_args(["--http-port", str(sink.http_port), "--grpc-port", "0"])
    assert await serve(args) == 1


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(["--jsonl", "x.jsonl", "--discard"], id="jsonl-and-discard"),
        pytest.param(["--mode", "down"], id="unknown-mode"),
    ],
)
def test_cli_rejects_contradictory_or_unknown_options(argv: list[str]) -> None:
    """--jsonl with --discard, or an unknown --mode, is a usage error (exit 2)."""
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(argv)
    assert exit_info.value.code == 2
