"""The proxy on real sockets: a recording upstream on loopback, the proxy in between, a real client."""

from __future__ import annotations

import asyncio
import gzip
import json
import socket
from collections.abc import AsyncIterator

import aiohttp
import pytest
from opentelemetry import trace as trace_api
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.context import Context
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.propagators.textmap import (
    CarrierT,
    Getter,
    Setter,
    TextMapPropagator,
    default_getter,
    default_setter,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from mes_trace_proxy.sim.otlp_sink import OtlpSink
from tests.conftest import MakeConfig, StartProxy, otlp_env
from tests.upstream import RecordingUpstream

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    """A plain client that, like CRM, sends exactly what it is given."""
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


async def _proxy_url(make_config: MakeConfig, start_proxy: StartProxy, upstream: str) -> str:
    proxy = await start_proxy(make_config(upstream))
    return proxy.url("ingress")


async def _connect(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw TCP connection to ``http://host:port``, for requests a client library would not send."""
    host, port = url.removeprefix("http://").split(":")
    return await asyncio.open_connection(host, int(port))


async def _raw_exchange(url: str, request: bytes) -> bytes:
    """Send raw request bytes (``Connection: close``) and read the whole answer, bounded in time."""
    reader, writer = await _connect(url)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD", "PURGE"])
async def test_every_method_is_forwarded(
    method: str,
    make_config: MakeConfig,
    start_proxy: StartProxy,
    recording_upstream: tuple[str, RecordingUpstream],
    client: aiohttp.ClientSession,
) -> None:
    """Each method reaches the upstream as sent, and its answer comes back (HEAD without a body)."""
    base, upstream = recording_upstream
    url = await _proxy_url(make_config, start_proxy, base)
    async with client.request(
        method, f"{url}/any/path", data=b"x" if method in {"POST", "PUT"} else None
    ) as resp:
        body = await resp.read()
    assert resp.status == 200
    assert upstream.last().method == method
    if method == "HEAD":
        assert body == b""
        assert resp.headers["Content-Length"] == "42"
    else:
        assert json.loads(body)["method"] == method


@pytest.mark.parametrize(
    "target",
    [
        "/api/v1/orders/A%2F1/status?x=%20a&y=b+c&z=%E2%9C%93&&flag",
        "/api/v1/orders?status=MANUFACTURING_APPROVED&page=2&page=3",
        "/weird/%7Euser/a;b=c/%41%42?q=%zz",
        "/trailing/slash/",
        "/percent%25encoded",
    ],
    ids=["encoded-id-and-query", "repeated-params", "params-and-odd-escapes", "trailing-slash", "percent-25"],
)
async def test_path_and_query_reach_upstream_byte_exact(
    target: str,
    make_config: MakeConfig,
    start_proxy: StartProxy,
    recording_upstream: tuple[str, RecordingUpstream],
) -> None:
    """The request target is forwarded exactly as received: no decoding, re-encoding or normalising."""
    base, upstream = recording_upstream
    url = await _proxy_url(make_config, start_proxy, base)
    answer = await _raw_exchange(
        url, f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    )
    assert answer.startswith(b"HTTP/1.1 200")
    assert upstream.last().raw_path == target


async def test_json_body_forwarded_as_received_and_status_read(
    make_config: MakeConfig,
    start_proxy: StartProxy,
    recording_upstream: tuple[str, RecordingUpstream],
    client: aiohttp.ClientSession,
) -> None:
    """An inspected JSON body goes upstream byte for byte (odd spacing, key order, unicode intact)."""
    base, upstream = recording_upstream
    url = await _proxy_url(make_config, start_proxy, base)
    note = "привет".encode()
    body = b'{ "note" : "' + note + b'",\n  "status":"MANUFACTURING_STARTED" }'
    async with client.put(
        f"{url}/api/v1/orders/A-1/status", data=body, headers={"Content-Type": "application/json"}
    ) as resp:
        assert resp.status == 200
    received = upstream.last()
    assert received.body == body
    assert received.header("Content-Length") == str(len(body))


async def test_chunked_request_and_response_stream(
    make_config: MakeConfig,
    start_proxy: StartProxy,
    recording_upstream: tuple[str, RecordingUpstream],
    client: aiohttp.ClientSession,
) -> None:
    """A chunked upload stays chunked upstream; a chunked download arrives whole."""
    base, upstream = recording_upstream
    url = await _proxy_url(make_config, start_proxy, base)

    async def parts() -> AsyncIterator[bytes]:
        for index in range(5):
            yield f"part-{index};".encode()

    async with client.post(f"{url}/api/v1/orders/A-1/notes", data=parts()) as resp:
        assert resp.status == 200
    assert upstream.last().chunked
    assert upstream.last().body == b"part-0;part-1;part-2;part-3;part-4;"
    async with client.get(f"{url}/t/download?size=300000") as resp:
        data = await resp.read()
    assert resp.headers.get("Transfer-Encoding") == "chunked"
    assert data == (bytes(range(256)) * 1024 * 2)[:300000]


async def test_set_cookie_multiplicity_and_response_hop_by_hop(
    make_config: MakeConfig,
    start_proxy: StartProxy,
    recording_upstream: tuple[str, RecordingUpstream],
    client: aiohttp.ClientSession,
) -> None:
    """Three Set-Cookie headers come back as three; headers the upstream named in Connection do not."""
    base, _ = recording_upstream
    url = await _proxy_url(make_config, start_proxy, base)
    async with client.get(f"{url}/t/cookies") as resp:
        await resp.read()
        cookies = resp.headers.getall("Set-Cookie")
        assert cookies == ["a=1; Path=/", "b=2; Path=/; HttpOnly", "c=3"]
        assert "X-Resp-Hop" not in resp.headers
        assert resp.headers["X-Kept"] == "yes"


async def test_request_hop_by_hop_removed_and_forwarding_headers_added(
    make_config: MakeConfig,
    start_proxy: StartProxy,
    recording_upstream: tuple[str, RecordingUpstream],
    client: aiohttp.ClientSession,
) -> None:
    """Hop-by-hop and Connection-named headers stop at the proxy; X-Forwarded-* and Forwarded are added."""
    base, upstream = recording_upstream
    url = await _proxy_url(make_config, start_proxy, base)
    headers = {
        "Connection": "keep-alive, X-Secret-Hop",
        "X-Secret-Hop": "1",
        "Keep-Alive": "timeout=5",
        "Proxy-Authorization": "Basic Zm9vOmJhcg==",
        "X-Forwarded-For": "10.1.1.1",
        "X-End-To-End": "kept",
    }
    async with client.get(f"{url}/api/v1/health", headers=headers) as resp:
        assert resp.status == 200
    received = upstream.last()
    names = received.header_names()
    assert {"x-secret-hop", "keep-alive", "proxy-authorization"}.isdisjoint(names)
    assert received.header("X-End-To-End") == "kept"
    assert received.header("X-Forwarded-For") == "10.1.1.1, 127.0.0.1"
    assert received.header("X-Forwarded-Proto") == "http"
    assert received.header("Forwarded") is not None
    assert "for=127.0.0.1" in (received.header("Forwarded") or "")
    assert received.header("Host") == base.removeprefix("http://")


async def test_host_preserved_when_configured(
    make_config: MakeConfig,
    start_proxy: StartProxy,
    recording_upstream: tuple[str, RecordingUpstream],
    client: aiohttp.ClientSession,
) -> None:
    """With host_header: preserve, the caller's Host reaches the upstream."""
    base, upstream = recording_upstream
    config = make_config(base, doc={"listeners": [{"host_header": "preserve"}]})
    proxy = await start_proxy(config)
    async with client.get(f"{proxy.url('ingress')}/x", headers={"Host": "mes.example.internal"}) as resp:
        assert resp.status == 200
    assert upstream.last().header("Host") == "mes.example.internal"


async def test_gzip_bodies_pass_unchanged_both_ways(
    make_config: MakeConfig,
    start_proxy: StartProxy,
    recording_upstream: tuple[str, RecordingUpstream],
    client: aiohttp.ClientSession,
) -> None:
    """A gzip request body reaches the upstream as the same gzip bytes (no decompression on the way)."""
    base, upstream = recording_upstream
    url = await _proxy_url(make_config, start_proxy, base)
    packed = gzip.compress(b'{"status": "PACKAGING"}' * 50)
    async with client.post(
        f"{url}/api/v1/orders/A-1/blob", data=packed, headers={"Content-Encoding": "gzip"}
    ) as resp:
        assert resp.status == 200
    assert upstream.last().body == packed
    assert upstream.last().header("Content-Encoding") == "gzip"


async def test_upstream_refused_gives_502_problem(
    make_config: MakeConfig, start_proxy: StartProxy, client: aiohttp.ClientSession
) -> None:
    """A port that refuses connections yields 502 with an application/problem+json body naming it."""
    # A socket bound but never listening refuses connections for as long as we hold it.
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]
        url = await _proxy_url(make_config, start_proxy, f"http://127.0.0.1:{port}")
        async with client.get(f"{url}/api/v1/orders/A-1") as resp:
            body = await resp.json(content_type=None)
            assert resp.status == 502
            assert resp.headers["Content-Type"].startswith("application/problem+json")
            assert body["type"].endswith("upstream_connect_refused")
            assert body["trace_id"] == resp.headers["X-Trace-Id"]
            assert "Traceback" not in json.dumps(body)


async def test_upstream_timeout_gives_504_problem(
    make_config: MakeConfig,
    start_proxy: StartProxy,
    recording_upstream: tuple[str, RecordingUpstream],
    client: aiohttp.ClientSession,
) -> None:
    """An upstream slower than the read timeout yields 504, and the upstream call is abandoned."""
    base, upstream = recording_upstream
    config = make_config(base, doc={"listeners": [{"timeouts": {"read": "200ms"}}]})
    proxy = await start_proxy(config)
    async with client.get(f"{proxy.url('ingress')}/t/slow") as resp:
        body = await resp.json(content_type=None)
    assert resp.status == 504
    assert body["type"].endswith("upstream_read_timeout")
    await asyncio.wait_for(upstream.cancelled.wait(), 5)


async def test_client_abort_cancels_upstream_request(
    make_config: MakeConfig,
    start_proxy: StartProxy,
    recording_upstream: tuple[str, RecordingUpstream],
) -> None:
    """A caller that disconnects mid-request makes the proxy drop the upstream call too."""
    base, upstream = recording_upstream
    url = await _proxy_url(make_config, start_proxy, base)
    _reader, writer = await _connect(url)
    writer.write(b"GET /t/slow HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    await asyncio.wait_for(upstream.slow_started.wait(), 5)
    writer.close()
    await writer.wait_closed()
    await asyncio.wait_for(upstream.cancelled.wait(), 5)


async def test_truncated_small_upstream_body_becomes_502(
    make_config: MakeConfig,
    start_proxy: StartProxy,
    recording_upstream: tuple[str, RecordingUpstream],
    client: aiohttp.ClientSession,
) -> None:
    """A small answer is read whole before it is relayed, so a truncated one is an honest 502."""
    base, _ = recording_upstream
    url = await _proxy_url(make_config, start_proxy, base)
    async with client.get(f"{url}/t/truncated?length=1000") as resp:
        body = await resp.json(content_type=None)
    assert resp.status == 502
    assert body["type"].endswith("upstream_payload_error")


async def test_truncated_large_upstream_body_is_cut_not_completed(
    make_config: MakeConfig,
    start_proxy: StartProxy,
    recording_upstream: tuple[str, RecordingUpstream],
    client: aiohttp.ClientSession,
) -> None:
    """When a streamed answer dies after the headers, the caller sees a broken body, never a complete one."""
    base, _ = recording_upstream
    url = await _proxy_url(make_config, start_proxy, base)
    async with client.get(f"{url}/t/truncated?length=1000000") as resp:
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()


async def test_server_sent_events_are_delivered_incrementally(
    make_config: MakeConfig,
    start_proxy: StartProxy,
    recording_upstream: tuple[str, RecordingUpstream],
    client: aiohttp.ClientSession,
) -> None:
    """The first event reaches the caller while the upstream still holds the second back."""
    base, upstream = recording_upstream
    url = await _proxy_url(make_config, start_proxy, base)
    async with client.get(f"{url}/t/sse") as resp:
        first = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 5)
        assert first == b"data: first\n\n"
        upstream.sse_next.set()
        second = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 5)
        assert second == b"data: second\n\n"


async def test_websocket_echo_through_the_proxy(
    make_config: MakeConfig,
    start_proxy: StartProxy,
    recording_upstream: tuple[str, RecordingUpstream],
    client: aiohttp.ClientSession,
) -> None:
    """A WebSocket upgrade is relayed: subprotocol negotiated, text and binary frames echoed."""
    base, upstream = recording_upstream
    url = await _proxy_url(make_config, start_proxy, base)
    async with client.ws_connect(f"{url}/t/ws", protocols=("mes.v1",), headers={"X-Dash": "1"}) as ws:
        assert ws.protocol == "mes.v1"
        await ws.send_str("hello")
        assert (await ws.receive_str()) == "echo:hello"
        await ws.send_bytes(b"\x00\x01")
        assert (await ws.receive_bytes()) == b"\x00\x01"
    assert upstream.last().header("X-Dash") == "1"
    assert upstream.last().header("traceparent") is not None


@pytest.mark.parametrize(
    ("client_span", "expected"),
    [
        # The lean upstream client sends the fields exactly as they came.
        pytest.param("sdk", [("X-Dup", "1"), ("X-Other", "q"), ("x-DUP", "2")], id="lean-client-as-sent"),
        # aiohttp's session (used with the instrumentation) would drop "x-DUP: 2" as a
        # duplicate of another spelling; one_spelling respells it so the value survives.
        pytest.param(
            "instrumentation", [("X-Dup", "1"), ("X-Other", "q"), ("X-Dup", "2")], id="aiohttp-respelled"
        ),
    ],
)
async def test_repeated_header_spelled_differently_keeps_every_value(
    make_config: MakeConfig,
    start_proxy: StartProxy,
    recording_upstream: tuple[str, RecordingUpstream],
    otlp_sink: OtlpSink,
    client_span: str,
    expected: list[tuple[str, str]],
) -> None:
    """X-Dup: 1, X-Other, x-DUP: 2 reach the upstream as two X-Dup values in order, none lost."""
    base, upstream = recording_upstream
    # Exporting, so that the instrumentation (and with it aiohttp's session) is really in use.
    proxy = await start_proxy(make_config(base, client_span=client_span), environ=otlp_env(otlp_sink))
    answer = await _raw_exchange(
        proxy.url("ingress"),
        b"GET /x HTTP/1.1\r\nHost: x\r\nX-Dup: 1\r\nX-Other: q\r\nx-DUP: 2\r\nConnection: close\r\n\r\n",
    )
    assert answer.startswith(b"HTTP/1.1 200")
    kept = [(k, v) for k, v in upstream.last().headers if k.lower() in {"x-dup", "x-other"}]
    assert kept == expected


async def test_options_asterisk_is_answered_by_the_proxy(
    make_config: MakeConfig,
    start_proxy: StartProxy,
    recording_upstream: tuple[str, RecordingUpstream],
) -> None:
    """OPTIONS * (a load balancer's ping) gets 200 with Allow from the proxy, not a 500."""
    base, upstream = recording_upstream
    url = await _proxy_url(make_config, start_proxy, base)
    answer = await _raw_exchange(url, b"OPTIONS * HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200")
    assert b"\r\nAllow: GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS\r\n" in answer
    assert upstream.received == []


@pytest.mark.parametrize(
    ("request_line", "expected"),
    [
        (b"GET http://evil.example/ HTTP/1.1", 400),
        (b"CONNECT evil.example:443 HTTP/1.1", 405),
        (b"GET //evil.example/x HTTP/1.1", 400),
        (b"GET /api/..%2f..%2fadmin HTTP/1.1", 400),
    ],
    ids=["absolute-form", "connect", "network-path", "encoded-traversal"],
)
async def test_open_proxy_attempts_never_leave(
    request_line: bytes,
    expected: int,
    make_config: MakeConfig,
    start_proxy: StartProxy,
    recording_upstream: tuple[str, RecordingUpstream],
) -> None:
    """Targets that would reach another host or escape the path are refused and nothing goes upstream."""
    base, upstream = recording_upstream
    url = await _proxy_url(make_config, start_proxy, base)
    answer = await _raw_exchange(url, request_line + b"\r\nHost: x\r\nConnection: close\r\n\r\n")
    status = int(answer.split(b" ", 2)[1])
    # RFC 9110 §15.5.6: CONNECT is a method this proxy does not allow (405, with Allow); the
    # other targets are not origin-form or escape the path (400).
    assert status == expected
    assert b"application/problem+json" in answer
    assert (b"\r\nAllow: " in answer) == (expected == 405)
    assert upstream.received == []


async def test_trace_headers_returned_to_caller(
    make_config: MakeConfig,
    start_proxy: StartProxy,
    recording_upstream: tuple[str, RecordingUpstream],
    client: aiohttp.ClientSession,
) -> None:
    """traceresponse and X-Trace-Id carry the caller's trace id back; upstream got a fresh parent id."""
    base, upstream = recording_upstream
    url = await _proxy_url(make_config, start_proxy, base)
    async with client.get(f"{url}/api/v1/orders/A-1", headers={"traceparent": TRACEPARENT}) as resp:
        assert resp.status == 200
        assert resp.headers["X-Trace-Id"] == "0af7651916cd43dd8448eb211c80319c"
        version, trace_id, span_id, flags = resp.headers["traceresponse"].split("-")
    assert (version, trace_id, flags) == ("00", "0af7651916cd43dd8448eb211c80319c", "01")
    sent = upstream.last().header("traceparent") or ""
    assert sent.split("-")[1] == trace_id
    assert sent.split("-")[2] not in (span_id, "b7ad6b7169203331")


@pytest.mark.parametrize("protocol", ["http/protobuf", "grpc"])
async def test_spans_exported_over_otlp_with_shape_and_links(
    protocol: str,
    make_config: MakeConfig,
    start_proxy: StartProxy,
    recording_upstream: tuple[str, RecordingUpstream],
    otlp_sink: OtlpSink,
    client: aiohttp.ClientSession,
) -> None:
    """SERVER and CLIENT spans travel through the real OTLP exporter: names, parents, attributes, resource."""
    base, upstream = recording_upstream
    proxy = await start_proxy(make_config(base), environ=otlp_env(otlp_sink, protocol))
    async with client.put(
        f"{proxy.url('ingress')}/api/v1/orders/ORD-7/status?page=1&email=a%40b.c",
        json={"status": "MANUFACTURING_STARTED", "operator": {"name": "Ivan Canary"}},
        headers={"traceparent": TRACEPARENT, "User-Agent": "crm/1.0"},
    ) as resp:
        assert resp.status == 200
    spans = await otlp_sink.wait_for_spans(2, timeout=15)
    by_kind = {span.kind: span for span in spans}
    server, client_span = by_kind["SERVER"], by_kind["CLIENT"]
    assert server.name == client_span.name == "PUT /api/v1/orders/{orderId}/status"
    assert server.trace_id == client_span.trace_id == "0af7651916cd43dd8448eb211c80319c"
    assert server.parent_span_id == "b7ad6b7169203331"
    assert client_span.parent_span_id == server.span_id
    assert server.transport == ("grpc" if protocol == "grpc" else "http")
    injected = upstream.last().header("traceparent") or ""
    assert injected == f"00-{client_span.trace_id}-{client_span.span_id}-01"
    attrs = server.attributes
    assert attrs["http.request.method"] == "PUT"
    assert attrs["http.route"] == "/api/v1/orders/{orderId}/status"
    assert attrs["url.path"] == "/api/v1/orders/ORD-7/status"
    assert attrs["url.query"] == "page=1"
    assert attrs["url.scheme"] == "http"
    assert attrs["http.response.status_code"] == 200
    assert isinstance(attrs["http.response.status_code"], int)
    assert isinstance(attrs["server.port"], int)
    assert attrs["client.address"] == "127.0.0.1"
    assert attrs["user_agent.original"] == "crm/1.0"
    assert attrs["mes.order.id"] == "ORD-7"
    assert attrs["mes.order.status"] == "MANUFACTURING_STARTED"
    assert attrs["mes.order.status.observed"] == "MANUFACTURING_STARTED"
    assert attrs["network.protocol.version"] == "1.1"
    assert isinstance(attrs["http.request.body.size"], int)
    events = {event.name: event for event in server.events}
    assert events["mes.order.status_change"].attributes["mes.order.status"] == "MANUFACTURING_STARTED"
    # The proxy never saw ORD-7 before, and MANUFACTURING_STARTED is no entry status.
    assert events["mes.order.anomaly"].attributes["mes.order.anomaly"] == "unknown_order"
    assert client_span.attributes["server.address"] == "127.0.0.1"
    assert client_span.attributes["http.response.status_code"] == 200
    assert server.resource["service.name"] == "mes-api"
    assert "service.instance.id" in server.resource
    everything = json.dumps([span.to_json_dict() for span in spans])
    assert "Ivan Canary" not in everything
    assert "a@b.c" not in everything


async def test_upstream_failure_span_is_error_with_error_type(
    make_config: MakeConfig, start_proxy: StartProxy, otlp_sink: OtlpSink, client: aiohttp.ClientSession
) -> None:
    """A refused upstream marks both spans as errors with error.type naming the failure."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]
        proxy = await start_proxy(make_config(f"http://127.0.0.1:{port}"), environ=otlp_env(otlp_sink))
        async with client.get(f"{proxy.url('ingress')}/api/v1/orders/A-1") as resp:
            assert resp.status == 502
    spans = await otlp_sink.wait_for_spans(2, timeout=15)
    for span in spans:
        assert span.status_code == "ERROR"
        assert span.attributes["error.type"] == "upstream_connect_refused"


async def test_new_root_when_no_or_invalid_traceparent(
    make_config: MakeConfig,
    start_proxy: StartProxy,
    recording_upstream: tuple[str, RecordingUpstream],
    otlp_sink: OtlpSink,
    client: aiohttp.ClientSession,
) -> None:
    """An invalid traceparent starts a new trace instead of failing or continuing garbage."""
    base, _ = recording_upstream
    proxy = await start_proxy(make_config(base), environ=otlp_env(otlp_sink))
    bad = "00-00000000000000000000000000000000-b7ad6b7169203331-01"
    async with client.get(f"{proxy.url('ingress')}/api/v1/orders/A-1", headers={"traceparent": bad}) as resp:
        assert resp.status == 200
    spans = await otlp_sink.wait_for_spans(2, timeout=15)
    server = next(span for span in spans if span.kind == "SERVER")
    assert server.parent_span_id == ""
    assert server.trace_id != "0" * 32


async def test_expect_100_continue_is_answered_before_the_body(
    make_config: MakeConfig,
    start_proxy: StartProxy,
    recording_upstream: tuple[str, RecordingUpstream],
) -> None:
    """A caller that waits for 100 Continue gets it from the proxy, then its body reaches MES intact."""
    base, upstream = recording_upstream
    url = await _proxy_url(make_config, start_proxy, base)
    reader, writer = await _connect(url)
    try:
        writer.write(
            b"PUT /api/v1/orders/A-1/status HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 24\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n"
        )
        await writer.drain()
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b'{"status": "PACKAGING"} ')
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 200")
    assert upstream.last().body == b'{"status": "PACKAGING"} '


class _TestPropagator(TextMapPropagator):
    """Stands in for b3 and its kind (OTEL_PROPAGATORS): one field with the span's ids."""

    def extract(
        self, carrier: CarrierT, context: Context | None = None, getter: Getter[CarrierT] = default_getter
    ) -> Context:
        return context if context is not None else Context()

    def inject(
        self, carrier: CarrierT, context: Context | None = None, setter: Setter[CarrierT] = default_setter
    ) -> None:
        span = trace_api.get_current_span(context).get_span_context()
        setter.set(carrier, "x-test-trace", f"{span.trace_id:032x}-{span.span_id:016x}")

    @property
    def fields(self) -> set[str]:
        return {"x-test-trace"}


async def test_other_propagators_inject_their_fields_in_place_of_the_callers(
    monkeypatch: pytest.MonkeyPatch,
    make_config: MakeConfig,
    start_proxy: StartProxy,
    recording_upstream: tuple[str, RecordingUpstream],
    client: aiohttp.ClientSession,
) -> None:
    """With propagators beyond the W3C pair, each writes its fields from the CLIENT span's context,
    and a caller's field of the same name does not reach MES beside ours."""
    composite = CompositePropagator(
        [TraceContextTextMapPropagator(), W3CBaggagePropagator(), _TestPropagator()]
    )
    monkeypatch.setattr("mes_trace_proxy.telemetry.tracing.get_global_textmap", lambda: composite)
    base, upstream = recording_upstream
    url = await _proxy_url(make_config, start_proxy, base)
    headers = {"traceparent": TRACEPARENT, "x-test-trace": "from-the-caller", "baggage": "k=v"}
    async with client.get(f"{url}/api/v1/orders/A-1", headers=headers) as resp:
        assert resp.status == 200
    arrived = upstream.last()
    _, trace_id, span_id, _ = (arrived.header("traceparent") or "").split("-")
    assert trace_id == "0af7651916cd43dd8448eb211c80319c"
    assert [v for k, v in arrived.headers if k.lower() == "x-test-trace"] == [f"{trace_id}-{span_id}"]
    assert [v for k, v in arrived.headers if k.lower() == "baggage"] == ["k=v"]
