"""The listeners' HTTP/1.1 server on real sockets: framing, keep-alive, pipelining, closing, hand-off.

The proxy's own behaviour through it is tested in test_proxy.py, test_limits.py and the fault
suite; here the server is driven with small handlers, so each rule of the protocol is seen alone.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace

import aiohttp
import pytest
from aiohttp import web

from mes_trace_proxy.config import Limits
from mes_trace_proxy.http1 import Http1Server, IncomingRequest
from mes_trace_proxy.limits import GuardedServer

WAIT = 10.0
LIMITS = Limits(
    max_line_size=8190,
    max_header_size=8190,
    max_headers=128,
    max_body_size=None,
    header_read_timeout=5.0,
    idle_timeout=30.0,
    max_connections=100,
)

Handler = Callable[[IncomingRequest], Awaitable[None]]


async def _ws_echo(request: web.BaseRequest) -> web.StreamResponse:
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    async for message in ws:
        await ws.send_str(f"echo:{message.data}")
    return ws


@contextlib.asynccontextmanager
async def serving(handler: Handler, limits: Limits = LIMITS) -> AsyncIterator[tuple[Http1Server, int]]:
    """An Http1Server on 127.0.0.1 port 0, shut down (grace 1 s) on the way out."""
    upgrades = GuardedServer(_ws_echo, limits=limits, access_log=None)
    server = Http1Server(handler, limits=limits, upgrade_server=upgrades)
    listening = await asyncio.get_running_loop().create_server(server, "127.0.0.1", 0)
    port = listening.sockets[0].getsockname()[1]
    try:
        yield server, port
    finally:
        listening.close()
        await server.shutdown(1.0)
        await listening.wait_closed()


async def _exchange(port: int, data: bytes, *, read_until_close: bool = True) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(WAIT):
            return await reader.read() if read_until_close else await reader.readuntil(b"\r\n\r\n")
    finally:
        writer.close()


async def _until(condition: Callable[[], bool]) -> None:
    """Poll a counter of the server until it holds (callers bound the wait with asyncio.timeout)."""
    while True:
        if condition():
            return
        await asyncio.sleep(0.01)


async def echo_path(request: IncomingRequest) -> None:
    """Answers the target, whole, with a Content-Length."""
    request.send(200, None, [("Content-Type", "text/plain")], request.raw_path.encode())


async def test_pipelined_requests_are_answered_in_order_on_one_connection() -> None:
    """Three requests in one write get three answers, in order, and the connection stays open."""
    async with serving(echo_path) as (_, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"".join(b"GET /%d HTTP/1.1\r\nHost: x\r\n\r\n" % n for n in range(3)))
            bodies = []
            async with asyncio.timeout(WAIT):
                for _ in range(3):
                    head = await reader.readuntil(b"\r\n\r\n")
                    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
                    assert b"Connection: close" not in head
                    bodies.append(await reader.readexactly(2))
            assert bodies == [b"/0", b"/1", b"/2"]
        finally:
            writer.close()


@pytest.mark.parametrize(
    ("request_bytes", "connection", "stays_open"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", None, True),
        (b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", b"close", False),
        (b"GET / HTTP/1.0\r\n\r\n", b"close", False),
        (b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", b"keep-alive", True),
    ],
    ids=["1.1", "1.1-close", "1.0", "1.0-keep-alive"],
)
async def test_keep_alive_follows_the_callers_version_and_connection_field(
    request_bytes: bytes, connection: bytes | None, stays_open: bool
) -> None:
    """HTTP/1.1 stays open unless asked to close; HTTP/1.0 closes unless it asked to keep alive."""
    async with serving(echo_path) as (_, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(request_bytes)
            async with asyncio.timeout(WAIT):
                head = await reader.readuntil(b"\r\n\r\n")
                await reader.readexactly(1)
                fields = dict(line.split(b": ", 1) for line in head.split(b"\r\n")[1:-2])
                assert fields.get(b"Connection") == connection
                if stays_open:
                    writer.write(request_bytes)
                    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
                else:
                    assert await reader.read() == b""
        finally:
            writer.close()


async def streamed(request: IncomingRequest) -> None:
    """Answers in three pieces without a length."""
    await request.start(200, None, [("Content-Type", "text/plain")])
    for piece in (b"ab", b"cde", b"f"):
        await request.write(piece)
    await request.finish()


async def test_a_body_without_length_is_chunked_for_http11_and_close_delimited_for_http10() -> None:
    """HTTP/1.1 gets chunked coding; HTTP/1.0 (no chunked coding) gets the body then the close."""
    async with serving(streamed) as (_, port):
        raw = await _exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        head, _, body = raw.partition(b"\r\n\r\n")
        assert b"Transfer-Encoding: chunked" in head
        assert body == b"2\r\nab\r\n3\r\ncde\r\n1\r\nf\r\n0\r\n\r\n"
        raw = await _exchange(port, b"GET / HTTP/1.0\r\n\r\n")
        head, _, body = raw.partition(b"\r\n\r\n")
        assert b"Transfer-Encoding" not in head
        assert b"Content-Length" not in head
        assert b"Connection: close" in head
        assert body == b"abcdef"


async def relayed_head(request: IncomingRequest) -> None:
    """Answers as a proxy relays MES: its fields, its Content-Length, its Date when it has one."""
    fields = [("Content-Length", "5"), ("X-Mes", "1")]
    if request.raw_path == "/dated":
        fields.append(("Date", "Tue, 01 Dec 2026 10:00:00 GMT"))
    request.send(200, "Fine", fields, b"" if request.method == "HEAD" else b"hello")


async def test_fields_are_relayed_as_given_with_date_added_only_when_missing() -> None:
    """No Server or Content-Type is added; Date only when the answer has none; HEAD keeps its length."""
    async with serving(relayed_head) as (_, port):
        raw = await _exchange(port, b"GET /dated HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert raw == (
            b"HTTP/1.1 200 Fine\r\nContent-Length: 5\r\nX-Mes: 1\r\nDate: Tue, 01 Dec 2026 10:00:00 GMT\r\n"
            b"Connection: close\r\n\r\nhello"
        )
        raw = await _exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        head = raw.partition(b"\r\n\r\n")[0].split(b"\r\n")
        assert [line.split(b":")[0] for line in head[1:]] == [
            b"Content-Length",
            b"X-Mes",
            b"Date",
            b"Connection",
        ]
        assert b"Server" not in raw
        raw = await _exchange(port, b"HEAD / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert raw.endswith(b"\r\n\r\n")
        assert b"Content-Length: 5\r\n" in raw


async def test_a_failing_handler_gets_500_before_the_head_and_a_cut_connection_after() -> None:
    """An exception before anything was sent is a 500; after the head, the caller sees a truncated body."""

    async def failing(request: IncomingRequest) -> None:
        if request.raw_path == "/late":
            await request.start(200, None, [("Content-Length", "10")])
            await request.write(b"abc")
        raise RuntimeError("handler bug")

    async with serving(failing) as (_, port):
        raw = await _exchange(port, b"GET /early HTTP/1.1\r\nHost: x\r\n\r\n")
        assert raw.startswith(b"HTTP/1.1 500 Internal Server Error\r\n")
        assert b"Connection: close" in raw
        raw = await _exchange(port, b"GET /late HTTP/1.1\r\nHost: x\r\n\r\n")
        assert raw.startswith(b"HTTP/1.1 200 OK\r\n")
        assert raw.endswith(b"\r\n\r\nabc")


async def test_an_answer_before_the_body_is_read_is_delivered_and_the_rest_drained() -> None:
    """A 413-style early answer reaches a caller still sending 1 MiB, and the connection then closes."""

    async def early(request: IncomingRequest) -> None:
        request.send(413, None, [("Content-Type", "text/plain")], b"too big")

    async with serving(early) as (_, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1048576\r\n\r\n")
            for _ in range(16):
                writer.write(b"x" * 65536)
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            async with asyncio.timeout(WAIT):
                raw = await reader.read()
        finally:
            writer.close()
    assert raw.startswith(b"HTTP/1.1 413 Request Entity Too Large\r\n")
    assert raw.endswith(b"too big")


async def test_a_caller_that_hangs_up_cancels_its_handler() -> None:
    """Closing the connection mid-request cancels the handler (and so its upstream call)."""
    entered = asyncio.Event()
    cancelled = asyncio.Event()

    async def slow(request: IncomingRequest) -> None:
        entered.set()
        try:
            await asyncio.sleep(WAIT)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async with serving(slow) as (server, port):
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        async with asyncio.timeout(WAIT):
            await entered.wait()
            writer.close()
            await cancelled.wait()
            await _until(lambda: server.open_connections == 0)


async def test_shutdown_lets_requests_finish_within_grace_and_cancels_the_rest() -> None:
    """Idle connections close at once; a short request completes; one past the grace is cancelled."""
    outcomes: dict[str, str] = {}
    started = {"/short": asyncio.Event(), "/long": asyncio.Event()}

    async def timed(request: IncomingRequest) -> None:
        path = request.raw_path
        started[path].set()
        try:
            await asyncio.sleep(0.2 if path == "/short" else WAIT)
            request.send(200, None, [], b"done")
            outcomes[path] = "answered"
        except asyncio.CancelledError:
            outcomes[path] = "cancelled"
            raise

    upgrades = GuardedServer(_ws_echo, limits=LIMITS, access_log=None)
    server = Http1Server(timed, limits=LIMITS, upgrade_server=upgrades)
    listening = await asyncio.get_running_loop().create_server(server, "127.0.0.1", 0)
    port = listening.sockets[0].getsockname()[1]
    idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", port)
    short = asyncio.create_task(_exchange(port, b"GET /short HTTP/1.1\r\nHost: x\r\n\r\n"))
    long = asyncio.create_task(_exchange(port, b"GET /long HTTP/1.1\r\nHost: x\r\n\r\n"))
    async with asyncio.timeout(WAIT):
        await _until(lambda: server.open_connections == 3)
        await started["/short"].wait()
        await started["/long"].wait()
        listening.close()
        await server.shutdown(0.5)
        assert await idle_reader.read() == b""
        short_raw, long_raw = await asyncio.gather(short, long)
    idle_writer.close()
    assert outcomes == {"/short": "answered", "/long": "cancelled"}
    assert short_raw.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"Connection: close" in short_raw
    assert long_raw == b""


async def test_websocket_upgrade_is_handed_to_aiohttp_with_the_connection() -> None:
    """An upgrade reaches aiohttp's server on the same connection; the count of open connections holds."""
    async with serving(echo_path) as (server, port), aiohttp.ClientSession() as client:
        async with client.ws_connect(f"http://127.0.0.1:{port}/live") as ws:
            await ws.send_str("hi")
            message = await asyncio.wait_for(ws.receive(), WAIT)
            assert message.data == "echo:hi"
            assert server.handed_off == 1
            assert server.open_connections == 1
        async with client.get(f"http://127.0.0.1:{port}/after") as resp:
            assert await resp.text() == "/after"


async def test_connections_beyond_the_cap_are_refused_and_not_counted() -> None:
    """Past max_connections, with no connection idle, a new connection gets 503 and closes."""
    async with serving(echo_path, replace(LIMITS, max_connections=1)) as (server, port):
        held = await asyncio.open_connection("127.0.0.1", port)
        held[1].write(b"GET / HTTP/1.1\r\nHo")  # a head in progress: not idle, not evictable
        async with asyncio.timeout(WAIT):
            await _until(
                lambda: len(server.connections) == 1 and next(iter(server.connections)).idle_since is None
            )
        raw = await _exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        held[1].close()
    assert raw.startswith(b"HTTP/1.1 503")
    assert server.refused_connections == 1
