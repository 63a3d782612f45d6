"""WebSocket pass-through on real sockets: frames and close codes unchanged, one span per connection,
the handler's refusals and trust policy, and a 502 when MES refuses the upgrade."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client import generate_latest

from mes_trace_proxy.sim.otlp_sink import OtlpSink
from tests.conftest import MakeConfig, StartProxy, otlp_env
from tests.upstream import RecordingUpstream


async def test_websocket_connection_is_one_span_with_frame_count(
    make_config: MakeConfig,
    start_proxy: StartProxy,
    recording_upstream: tuple[str, RecordingUpstream],
    otlp_sink: OtlpSink,
) -> None:
    """The span starts at the upgrade, ends at close, and counts the frames relayed."""
    base, _ = recording_upstream
    proxy = await start_proxy(make_config(base), environ=otlp_env(otlp_sink))
    async with aiohttp.ClientSession() as client, client.ws_connect(f"{proxy.url('ingress')}/t/ws") as ws:
        for text in ("a", "b"):
            await ws.send_str(text)
            assert await ws.receive_str() == f"echo:{text}"
    spans = await otlp_sink.wait_for_spans(1, timeout=15)
    span = spans[0]
    assert span.kind == "SERVER"
    assert span.name == "GET"
    assert span.attributes["http.response.status_code"] == 101
    closed = [event for event in span.events if event.name == "websocket.closed"]
    assert closed
    frames = closed[0].attributes["websocket.frames"]
    assert isinstance(frames, int)
    assert frames >= 4


async def test_upstream_refusing_the_upgrade_gives_502(
    make_config: MakeConfig, start_proxy: StartProxy
) -> None:
    """An upstream that answers the upgrade with a plain 404 makes the proxy answer 502 problem+json."""

    async def not_a_websocket(_request: web.Request) -> web.Response:
        return web.Response(status=404)

    app = web.Application()
    app.router.add_get("/ws", not_a_websocket)
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    try:
        proxy = await start_proxy(make_config(f"http://127.0.0.1:{server.port}"))
        async with aiohttp.ClientSession() as client:
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await client.ws_connect(f"{proxy.url('ingress')}/ws")
            assert refused.value.status == 502
    finally:
        await server.close()


# ── a scripted upstream: records what arrives, speaks first, closes with a code when told ────────

SERVER_TEXT = "from-mes: ünïcode ✓"
SERVER_BYTES = bytes(range(256))
CALLER = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
RECEIVED = web.AppKey("received", list[tuple[aiohttp.WSMsgType, object]])
HANDSHAKES = web.AppKey("handshakes", list[dict[str, str]])
CLOSES = web.AppKey("closes", list[int | None])
#: set once two connections have ended on the upstream's side
CLOSED = web.AppKey("closed", asyncio.Event)


async def _scripted_upstream() -> TestServer:
    """An upstream WebSocket that sends a text and a binary frame first, then records every frame.

    A text frame ``close:<code>`` makes it close with that code; the close code the caller sent
    (through the proxy) is recorded when the caller closes.
    """

    async def socket(request: web.Request) -> web.WebSocketResponse:
        request.app[HANDSHAKES].append(dict(request.headers))
        ws = web.WebSocketResponse(protocols=("mes.v1",))
        await ws.prepare(request)
        await ws.send_str(SERVER_TEXT)
        await ws.send_bytes(SERVER_BYTES)
        async for message in ws:
            request.app[RECEIVED].append((message.type, message.data))
            if message.type is aiohttp.WSMsgType.TEXT and message.data.startswith("close:"):
                await ws.close(code=int(message.data.removeprefix("close:")))
        request.app[CLOSES].append(ws.close_code)
        if len(request.app[CLOSES]) == 2:
            request.app[CLOSED].set()
        return ws

    app = web.Application()
    app[RECEIVED] = []
    app[HANDSHAKES] = []
    app[CLOSES] = []
    app[CLOSED] = asyncio.Event()
    app.router.add_get("/live", socket)
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    return server


async def test_frames_are_relayed_unchanged_both_ways(
    make_config: MakeConfig, start_proxy: StartProxy
) -> None:
    """Text (not ASCII) and binary (every byte value) frames arrive as sent, in either direction."""
    server = await _scripted_upstream()
    try:
        proxy = await start_proxy(make_config(f"http://127.0.0.1:{server.port}"))
        async with (
            aiohttp.ClientSession() as client,
            client.ws_connect(f"{proxy.url('ingress')}/live", protocols=("mes.v1",)) as ws,
        ):
            assert ws.protocol == "mes.v1"
            assert await ws.receive_str(timeout=10) == SERVER_TEXT
            assert await ws.receive_bytes(timeout=10) == SERVER_BYTES
            await ws.send_str("to-mes: ✓")
            await ws.send_bytes(SERVER_BYTES[::-1])
            await ws.send_str("close:1000")
            closing = await ws.receive(timeout=10)
            assert closing.type in {aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED}
        assert server.app[RECEIVED][:2] == [
            (aiohttp.WSMsgType.TEXT, "to-mes: ✓"),
            (aiohttp.WSMsgType.BINARY, SERVER_BYTES[::-1]),
        ]
    finally:
        await server.close()


async def test_close_codes_pass_through_in_both_directions(
    make_config: MakeConfig, start_proxy: StartProxy
) -> None:
    """The upstream's close code reaches the caller, and the caller's reaches the upstream."""
    server = await _scripted_upstream()
    try:
        proxy = await start_proxy(make_config(f"http://127.0.0.1:{server.port}"))
        async with aiohttp.ClientSession() as client:
            async with client.ws_connect(f"{proxy.url('ingress')}/live") as ws:
                await ws.receive_str(timeout=10)
                await ws.receive_bytes(timeout=10)
                await ws.send_str("close:4001")
                message = await ws.receive(timeout=10)
                assert message.type is aiohttp.WSMsgType.CLOSE
                assert message.data == 4001
            async with client.ws_connect(f"{proxy.url('ingress')}/live") as ws:
                await ws.receive_str(timeout=10)
                await ws.receive_bytes(timeout=10)
                await ws.close(code=4002)
        await asyncio.wait_for(server.app[CLOSED].wait(), 10)
        # The first close was MES's own (what it records is the reply); the second, the caller's.
        assert len(server.app[CLOSES]) == 2
        assert server.app[CLOSES][1] == 4002
    finally:
        await server.close()


@pytest.mark.parametrize(("trusted", "continued"), [(["*"], True), ([], False)], ids=["trusted", "untrusted"])
async def test_one_span_per_connection_parented_per_the_trust_policy(
    trusted: list[str],
    continued: bool,
    make_config: MakeConfig,
    start_proxy: StartProxy,
    otlp_sink: OtlpSink,
) -> None:
    """Two connections give two SERVER spans and nothing else; an untrusted caller's span is a link.

    MES's handshake carries the span's own context as its parent, forwarded as the handler does.
    """
    server = await _scripted_upstream()
    try:
        config = make_config(f"http://127.0.0.1:{server.port}", doc={"privacy": {"trusted_callers": trusted}})
        proxy = await start_proxy(config, environ=otlp_env(otlp_sink))
        async with aiohttp.ClientSession() as client:
            for _ in range(2):
                async with client.ws_connect(
                    f"{proxy.url('ingress')}/live", headers={"traceparent": CALLER}
                ) as ws:
                    await ws.receive_str(timeout=10)
                    await ws.receive_bytes(timeout=10)
                    await ws.send_str("close:1000")
                    await ws.receive(timeout=10)
        spans = await otlp_sink.wait_for_spans(2, timeout=15)
        assert [span.kind for span in spans] == ["SERVER", "SERVER"]
        caller_trace = CALLER.split("-")[1]
        handshakes: list[dict[str, str]] = server.app[HANDSHAKES]
        for span, handshake in zip(spans, handshakes, strict=True):
            assert span.attributes["http.response.status_code"] == 101
            assert (span.trace_id == caller_trace) is continued
            assert [(link.trace_id, link.span_id) for link in span.links] == (
                [] if continued else [(caller_trace, CALLER.split("-")[2])]
            )
            assert handshake["traceparent"] == f"00-{span.trace_id}-{span.span_id}-01"
            assert handshake["X-Forwarded-For"] == "127.0.0.1"
        assert len(otlp_sink.spans) == 2
    finally:
        await server.close()


@pytest.mark.parametrize(
    ("request_line", "headers", "slug"),
    [
        (b"GET //evil.example/live HTTP/1.1", b"Host: x\r\n", "bad_request_target"),
        (b"GET /live HTTP/1.1", b"Host: x\r\nX-Note: caf\xe9\r\n", "bad_request"),
    ],
    ids=["network-path", "not-utf8-value"],
)
async def test_refused_upgrades_never_reach_the_upstream(
    request_line: bytes,
    headers: bytes,
    slug: str,
    make_config: MakeConfig,
    start_proxy: StartProxy,
) -> None:
    """An upgrade the handler would refuse gets its 400 problem, is counted by its slug, and goes nowhere."""
    server = await _scripted_upstream()
    try:
        proxy = await start_proxy(make_config(f"http://127.0.0.1:{server.port}"))
        host, port = proxy.listeners["ingress"]
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(
                request_line + b"\r\n" + headers + b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            )
            await writer.drain()
            answer = await asyncio.wait_for(reader.read(), 10)
        finally:
            writer.close()
        assert answer.startswith(b"HTTP/1.1 400 ")
        assert b"application/problem+json" in answer
        assert f"urn:mes-trace-proxy:problem:{slug}".encode() in answer
        assert server.app[HANDSHAKES] == []
        metrics = generate_latest(proxy.shared.metrics.registry).decode()
        assert f'error_type="{slug}"' in metrics
    finally:
        await server.close()
