"""``tracing.client_span``: the instrumentation's CLIENT span has the SDK-mode span's shape.

The same requests go through a real proxy in each mode, the spans through the real OTLP
exporter to the sink, and the CLIENT spans are compared field by field (ids and times aside).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Final

import aiohttp
import opentelemetry.propagate
import pytest
from multidict import CIMultiDict
from opentelemetry import context as context_api
from opentelemetry import trace as trace_api
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import (
    CarrierT,
    Getter,
    Setter,
    TextMapPropagator,
    default_getter,
    default_setter,
)
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from mes_trace_proxy.app import make_session
from mes_trace_proxy.sim.otlp_sink import OtlpSink, ReceivedSpan
from mes_trace_proxy.telemetry.client_span import (
    ClientSpanPlan,
    instrumentation_trace_configs,
    upstream_context,
)
from tests.conftest import MakeConfig, StartProxy, otlp_env
from tests.upstream import RecordingUpstream

MODES: Final = ("sdk", "instrumentation")
SCOPES: Final = {"sdk": "mes_trace_proxy", "instrumentation": "opentelemetry.instrumentation.aiohttp_client"}
# 300 ms: long enough for a loopback answer on a loaded machine, short enough to keep the test quick.
READ_TIMEOUT: Final = "300ms"
# A chunked upload over this limit is refused mid-stream (413), after the upstream call began.
BODY_LIMIT: Final = "1KiB"


@dataclass(frozen=True, slots=True, kw_only=True)
class Case:
    """One request sent through each mode's proxy."""

    name: str
    method: str
    target: str
    status: int
    refused_upstream: bool = False
    headers: Mapping[str, str] | None = None
    json: object = None
    chunked_bytes: int = 0


CASES: Final = (
    Case(
        name="status-change",
        method="PUT",
        target="/api/v1/orders/ORD-7/status?page=1&email=a%40b.c",
        status=200,
        json={"status": "MANUFACTURING_STARTED"},
    ),
    Case(name="unmatched", method="GET", target="/other/thing", status=200),
    Case(name="unknown-method", method="PURGE", target="/api/v1/orders/A-9", status=200),
    Case(
        name="not-found",
        method="GET",
        target="/api/v1/orders/A-2",
        status=404,
        headers={"X-Test-Answer": "404"},
    ),
    Case(name="refused", method="GET", target="/api/v1/orders/A-3", status=502, refused_upstream=True),
    Case(name="timeout", method="GET", target="/t/slow", status=504),
    Case(name="too-large", method="PUT", target="/t/upload", status=413, chunked_bytes=4096),
)


def _traceparent(mode: str, index: int) -> tuple[str, str]:
    """A distinct sampled caller context per mode and case, so spans group by trace id."""
    trace_id = f"{MODES.index(mode) + 1:02x}{index + 1:02x}" + "ab" * 14
    return trace_id, f"00-{trace_id}-b7ad6b7169203331-01"


def _in(trace_ids: Mapping[str, str]) -> Callable[[ReceivedSpan], bool]:
    """A sink predicate: spans of these traces only."""
    ours = frozenset(trace_ids)
    return lambda span: span.trace_id in ours


async def _chunks(size: int) -> AsyncIterator[bytes]:
    for _ in range(size // 512):
        yield b"x" * 512


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port nothing listens on (held, not listening, for the test's duration)."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        yield holder.getsockname()[1]


async def _send(client: aiohttp.ClientSession, url: str, case: Case, traceparent: str) -> None:
    headers = {"traceparent": traceparent, **(case.headers or {})}
    data = _chunks(case.chunked_bytes) if case.chunked_bytes else None
    async with client.request(
        case.method, url + case.target, headers=headers, json=case.json, data=data
    ) as resp:
        await resp.read()
        assert resp.status == case.status, case.name


async def _aborted(url: str, upstream: RecordingUpstream, traceparent: str) -> None:
    """A caller that hangs up while MES has not answered yet."""
    upstream.slow_started.clear()
    host, port = url.removeprefix("http://").split(":")
    _reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(f"GET /t/slow HTTP/1.1\r\nHost: x\r\ntraceparent: {traceparent}\r\n\r\n".encode())
        await writer.drain()
        await asyncio.wait_for(upstream.slow_started.wait(), 10)
    finally:
        writer.close()


async def test_instrumentation_client_span_has_the_sdk_span_shape(
    make_config: MakeConfig,
    start_proxy: StartProxy,
    recording_upstream: tuple[str, RecordingUpstream],
    otlp_sink: OtlpSink,
    closed_port: int,
) -> None:
    """Success, 404, refused, timeout, too large, aborted: same CLIENT name, parent, attributes, status."""
    base, upstream = recording_upstream
    doc = {"listeners": [{"timeouts": {"read": READ_TIMEOUT}}]}
    clients: dict[tuple[str, str], ReceivedSpan] = {}
    servers: dict[tuple[str, str], ReceivedSpan] = {}
    sent_parent: dict[tuple[str, str], str] = {}
    async with aiohttp.ClientSession(auto_decompress=False) as client:
        for mode in MODES:
            env = otlp_env(otlp_sink)
            flags = {"client_span": mode, "max_body_size": BODY_LIMIT}
            proxy = await start_proxy(make_config(base, doc=doc, **flags), environ=env)
            dead = await start_proxy(
                make_config(f"http://127.0.0.1:{closed_port}", doc=doc, **flags), environ=env
            )
            traces: dict[str, str] = {}
            for index, case in enumerate(CASES):
                trace_id, traceparent = _traceparent(mode, index)
                traces[trace_id] = case.name
                target = dead if case.refused_upstream else proxy
                await _send(client, target.url("ingress"), case, traceparent)
            trace_id, traceparent = _traceparent(mode, len(CASES))
            traces[trace_id] = "aborted"
            await _aborted(proxy.url("ingress"), upstream, traceparent)
            spans = await otlp_sink.wait_for_spans(2 * len(traces), timeout=15, predicate=_in(traces))
            for span in spans:
                key = (mode, traces[span.trace_id])
                (clients if span.kind == "CLIENT" else servers)[key] = span
            for received in upstream.received:
                parts = (received.header("traceparent") or "").split("-")
                if len(parts) == 4 and parts[1] in traces:
                    sent_parent[(mode, traces[parts[1]])] = parts[2]
            upstream.received.clear()

    for name in (*(case.name for case in CASES), "aborted"):
        sdk, inst = clients[("sdk", name)], clients[("instrumentation", name)]
        for mode, span in (("sdk", sdk), ("instrumentation", inst)):
            assert span.scope_name == SCOPES[mode], name
            assert span.parent_span_id == servers[(mode, name)].span_id, (mode, name)
            if (mode, name) in sent_parent:
                # MES is told the CLIENT span is its parent, in both modes.
                assert sent_parent[(mode, name)] == span.span_id, (mode, name)
        assert inst.name == sdk.name, name
        assert inst.kind == sdk.kind == "CLIENT", name
        assert dict(inst.attributes) == dict(sdk.attributes), name
        assert (inst.status_code, inst.status_message) == (sdk.status_code, sdk.status_message), name
        assert sdk.events == ()
        # Documented difference: the instrumentation records the exception of a failed call.
        assert {event.name for event in inst.events} <= {"exception"}, name
    assert {name for mode, name in sent_parent if mode == "instrumentation"} >= {"status-change", "not-found"}
    ok = clients[("sdk", "status-change")]
    assert ok.name == "PUT /api/v1/orders/{orderId}/status"
    assert ok.attributes["url.full"] == f"{base}/api/v1/orders/ORD-7/status?page=1"
    assert ok.attributes["http.response.status_code"] == 200
    assert clients[("sdk", "unknown-method")].attributes["http.request.method_original"] == "PURGE"
    assert clients[("sdk", "not-found")].attributes["error.type"] == "404"
    assert clients[("sdk", "refused")].attributes["error.type"] == "upstream_connect_refused"
    assert clients[("sdk", "timeout")].attributes["error.type"] == "upstream_read_timeout"
    assert clients[("sdk", "too-large")].attributes["error.type"] == "payload_too_large"
    assert clients[("sdk", "aborted")].attributes["error.type"] == "client_aborted"
    assert clients[("instrumentation", "refused")].events


async def test_websocket_relay_gets_no_instrumentation_span(
    make_config: MakeConfig,
    start_proxy: StartProxy,
    recording_upstream: tuple[str, RecordingUpstream],
    otlp_sink: OtlpSink,
) -> None:
    """With the instrumentation a WebSocket handshake gets no CLIENT span; MES's parent is the SERVER span."""
    base, upstream = recording_upstream
    proxy = await start_proxy(make_config(base, client_span="instrumentation"), environ=otlp_env(otlp_sink))
    async with aiohttp.ClientSession() as client, client.ws_connect(f"{proxy.url('ingress')}/t/ws") as ws:
        await ws.send_str("a")
        assert await ws.receive_str() == "echo:a"
    # A plain request after it: its two spans arriving means the relay's span was exported too.
    async with (
        aiohttp.ClientSession() as client,
        client.get(f"{proxy.url('ingress')}/api/v1/orders/A-1") as resp,
    ):
        assert resp.status == 200
    spans = await otlp_sink.wait_for_spans(3, timeout=15)
    relay = [span for span in spans if span.name == "GET" and span.kind == "SERVER"]
    assert len(relay) == 1
    assert not [span for span in spans if span.trace_id == relay[0].trace_id and span.kind == "CLIENT"]
    handshake = next(item for item in upstream.received if item.raw_path == "/t/ws")
    assert (handshake.header("traceparent") or "").split("-")[2] == relay[0].span_id


class _GlobalOnly(TextMapPropagator):
    """Stands for a global propagator set by OTEL_PROPAGATORS that the proxy does not use."""

    def extract(
        self, carrier: CarrierT, context: Context | None = None, getter: Getter[CarrierT] = default_getter
    ) -> Context:
        return context or Context()

    def inject(
        self, carrier: CarrierT, context: Context | None = None, setter: Setter[CarrierT] = default_setter
    ) -> None:
        setter.set(carrier, "x-global-trace", "from-global")
        TraceContextTextMapPropagator().inject(carrier, context, setter)

    @property
    def fields(self) -> set[str]:
        return {"x-global-trace", "traceparent", "tracestate"}


async def test_global_propagator_does_not_decide_what_mes_receives(
    make_config: MakeConfig,
    recording_upstream: tuple[str, RecordingUpstream],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A global propagator other than the proxy's: its extra fields are undone, traceparent is ours."""
    base, upstream = recording_upstream
    monkeypatch.setattr(opentelemetry.propagate, "propagator", _GlobalOnly())
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    configs = instrumentation_trace_configs(
        provider, TraceContextTextMapPropagator(), error_type=lambda exc: type(exc).__name__
    )
    assert len(configs) == 2
    listener = make_config(base).listeners[0]
    server = provider.get_tracer("test").start_span("server")
    headers = CIMultiDict({"x-global-trace": "from-caller"})
    plan = ClientSpanPlan(name="GET /x", attributes={"url.full": f"{base}/x"}, headers=headers)
    session = make_session(listener, configs)
    token = context_api.attach(upstream_context(trace_api.set_span_in_context(server), plan))
    try:
        async with session.get(f"{base}/x", headers=headers) as resp:
            assert resp.status == 200
    finally:
        context_api.detach(token)
        await session.close()
        server.end()
    (client,) = [span for span in exporter.get_finished_spans() if span.name == "GET /x"]
    received = upstream.last()
    assert received.header("x-global-trace") == "from-caller"
    assert client.context is not None
    sent = (received.header("traceparent") or "").split("-")
    assert sent[1:3] == [f"{client.context.trace_id:032x}", f"{client.context.span_id:016x}"]
    assert client.parent is not None
    assert client.parent.span_id == server.get_span_context().span_id
