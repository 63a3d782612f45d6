"""WebSocket pass-through: one SERVER span covers the connection; a refused upgrade is a 502."""

from __future__ import annotations

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

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
