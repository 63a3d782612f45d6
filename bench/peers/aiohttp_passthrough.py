"""The Python floor: a minimal aiohttp + uvloop reverse proxy with no tracing, no rules, no logs.

One ``web.Application`` catch-all route and one ``ClientSession``; bodies stream both ways in
64 KiB pieces. It prints ``{"port": N}`` once listening (port 0 picks a free one) and runs
until SIGTERM/SIGINT. It is what "plain aiohttp passthrough" means in the issue's targets.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from collections.abc import AsyncIterator
from typing import Final

import aiohttp
import uvloop
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

SESSION: Final = web.AppKey("session", aiohttp.ClientSession)
UPSTREAM: Final = web.AppKey("upstream", str)
# RFC 9110 §7.6.1: connection-specific fields a proxy must not forward.
HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
# Same read size as mes-trace-proxy's, so streaming figures compare like for like.
CHUNK: Final = 64 * 1024
# Same pool size as mes-trace-proxy's upstream connector.
POOL: Final = 256


def _forwardable(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        if name.lower() not in HOP_BY_HOP:
            out.add(name, value)
    return out


async def passthrough(request: web.Request) -> web.StreamResponse:
    """Forward the request as it came and stream the answer back."""
    session = request.app[SESSION]
    headers = _forwardable(request.headers)
    if request.content_length is not None:
        headers["Content-Length"] = str(request.content_length)
    async with session.request(
        request.method,
        request.app[UPSTREAM] + request.raw_path,
        headers=headers,
        data=request.content if request.body_exists else None,
        allow_redirects=False,
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
    ) as upstream:
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        response.headers.extend(_forwardable(upstream.headers))
        if upstream.content_length is not None:
            response.content_length = upstream.content_length
        await response.prepare(request)
        async for chunk in upstream.content.iter_chunked(CHUNK):
            await response.write(chunk)
        await response.write_eof()
        return response


async def _session(app: web.Application) -> AsyncIterator[None]:
    connector = aiohttp.TCPConnector(limit=POOL, limit_per_host=POOL)
    app[SESSION] = aiohttp.ClientSession(
        connector=connector,
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        read_bufsize=256 * 1024,
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=60),
    )
    yield
    await app[SESSION].close()


def build_app(upstream: str) -> web.Application:
    """The passthrough application for ``upstream`` (``http://host:port``)."""
    app = web.Application(client_max_size=0)
    app[UPSTREAM] = upstream.rstrip("/")
    app.cleanup_ctx.append(_session)
    app.router.add_route("*", "/{tail:.*}", passthrough)
    return app


async def serve(upstream: str, host: str, port: int) -> None:
    """Listen until SIGTERM/SIGINT, printing the bound port as one JSON line."""
    runner = web.AppRunner(build_app(upstream), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(json.dumps({"port": runner.addresses[0][1]}), flush=True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments and serve."""
    parser = argparse.ArgumentParser(prog="python -m bench.peers.aiohttp_passthrough")
    parser.add_argument("--upstream", required=True, help="http://host:port")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (printed)")
    args = parser.parse_args(argv)
    uvloop.run(serve(args.upstream, args.host, args.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
