"""The upstream session is transparent: no cookie jar, no redirects followed, no decompression."""

from __future__ import annotations

import gzip

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.conftest import MakeConfig, StartProxy

SEEN = web.AppKey("seen", list)


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


async def test_upstream_cookies_are_never_replayed_to_other_callers(
    make_config: MakeConfig, start_proxy: StartProxy
) -> None:
    """A Set-Cookie from MES goes back to its caller and is not stored and sent on the next call."""
    server = await _upstream()
    try:
        proxy = await start_proxy(make_config(f"http://127.0.0.1:{server.port}"))
        async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as client:
            for _ in range(2):
                async with client.get(f"{proxy.url('ingress')}/cookie") as resp:
                    assert "session=caller-one-only" in resp.headers["Set-Cookie"]
        assert server.app[SEEN] == [None, None]
    finally:
        await server.close()


async def test_redirects_and_compressed_bodies_pass_through_untouched(
    make_config: MakeConfig, start_proxy: StartProxy
) -> None:
    """A 302 reaches the caller as a 302, and a gzip body arrives still gzip-encoded."""
    server = await _upstream()
    try:
        proxy = await start_proxy(make_config(f"http://127.0.0.1:{server.port}"))
        async with aiohttp.ClientSession(auto_decompress=False) as client:
            async with client.get(f"{proxy.url('ingress')}/redirect", allow_redirects=False) as resp:
                assert resp.status == 302
                assert resp.headers["Location"] == "/elsewhere"
            async with client.get(f"{proxy.url('ingress')}/packed") as resp:
                assert resp.headers["Content-Encoding"] == "gzip"
                assert gzip.decompress(await resp.read()) == b"x" * 1000
    finally:
        await server.close()
