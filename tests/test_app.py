"""The upstream clients are transparent: no cookie jar, no redirects followed, no decompression.

Both clients a listener can use are held to it: the lean pool (the default) and aiohttp's
session (``tracing.client_span: instrumentation``, which needs spans exported).
"""

from __future__ import annotations

import functools
import gzip

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from mes_trace_proxy.core.config import Config
from mes_trace_proxy.server import RunningProxy
from mes_trace_proxy.sim.otlp_sink import OtlpSink
from tests.conftest import MakeConfig, StartProxy, otlp_env

SEEN = web.AppKey("seen", list)
CLIENTS = ("pool", "session")


async def _start(
    client: str, upstream: str, make_config: MakeConfig, start_proxy: StartProxy, sink: OtlpSink
) -> RunningProxy:
    """A proxy whose plain requests go through the pool (the default) or the session."""
    if client == "pool":
        config: Config = make_config(upstream)
        return await start_proxy(config)
    proxy = await start_proxy(make_config(upstream, client_span="instrumentation"), environ=otlp_env(sink))
    handler = proxy.servers["ingress"].handler
    assert isinstance(handler, functools.partial)
    assert handler.args[0].span_mode.instruments_client
    return proxy


async def _upstream() -> TestServer:
    async def cookie(request: web.Request) -> web.Response:
        request.app[SEEN].append(request.headers.get("Cookie"))
        response = web.Response(text="ok")
        response.set_cookie("session", "caller-one-only")
        return response

    async def redirect(_request: web.Request) -> web.Response:
        return web.Response(status=302, headers={"Location": "/elsewhere"})

    async def packed(_request: web.Request) -> web.Response:
        return web.Response(body=gzip.compress(b"x" * 1000), headers={"Content-Encoding": "gzip"})

    app = web.Application()
    app[SEEN] = []
    app.router.add_get("/cookie", cookie)
    app.router.add_get("/redirect", redirect)
    app.router.add_get("/packed", packed)
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    return server


@pytest.mark.parametrize("client", CLIENTS)
async def test_upstream_cookies_are_never_replayed_to_other_callers(
    client: str, make_config: MakeConfig, start_proxy: StartProxy, otlp_sink: OtlpSink
) -> None:
    """A Set-Cookie from MES goes back to its caller and is not stored and sent on the next call."""
    server = await _upstream()
    try:
        proxy = await _start(client, f"http://127.0.0.1:{server.port}", make_config, start_proxy, otlp_sink)
        async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as caller:
            for _ in range(2):
                async with caller.get(f"{proxy.url('ingress')}/cookie") as resp:
                    assert "session=caller-one-only" in resp.headers["Set-Cookie"]
        assert server.app[SEEN] == [None, None]
    finally:
        await server.close()


@pytest.mark.parametrize("client", CLIENTS)
async def test_redirects_and_compressed_bodies_pass_through_untouched(
    client: str, make_config: MakeConfig, start_proxy: StartProxy, otlp_sink: OtlpSink
) -> None:
    """A 302 reaches the caller as a 302, and a gzip body arrives still gzip-encoded."""
    server = await _upstream()
    try:
        proxy = await _start(client, f"http://127.0.0.1:{server.port}", make_config, start_proxy, otlp_sink)
        async with aiohttp.ClientSession(auto_decompress=False) as caller:
            async with caller.get(f"{proxy.url('ingress')}/redirect", allow_redirects=False) as resp:
                assert resp.status == 302
                assert resp.headers["Location"] == "/elsewhere"
            async with caller.get(f"{proxy.url('ingress')}/packed") as resp:
                assert resp.headers["Content-Encoding"] == "gzip"
                assert gzip.decompress(await resp.read()) == b"x" * 1000
    finally:
        await server.close()
