"""One upstream connection's protocol: answer parsing, framings, reuse, cut-short bodies, read timeout.

The direct tests drive :class:`UpstreamConnection` over a real loopback socket to a raw server;
the others see it through the pool against the scripted upstream (tests/wire/scripted_upstream.py).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Final

import aiohttp
import pytest
from aiohttp.http import HttpResponseParser

from mes_trace_proxy.core.problems import UpstreamFailure
from mes_trace_proxy.proxy.relay import classify_failure
from mes_trace_proxy.wire.upstream_connection import UpstreamConnection
from mes_trace_proxy.wire.upstream_failures import UpstreamError
from tests.conftest import MakeConfig
from tests.wire.scripted_upstream import WAIT, Scripted, Seen, fetch, listener_for, ok, pool_for

REQUEST: Final = b"GET /t HTTP/1.1\r\nHost: mes\r\n\r\n"

#: what the raw server does with one accepted connection
Serve = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def connected(serve: Serve) -> AsyncIterator[tuple[UpstreamConnection, asyncio.Event]]:
    """An UpstreamConnection to a raw loopback server running ``serve``; the event: the server saw EOF."""
    hung_up = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await serve(reader, writer)
            await reader.read()  # until the client closes
        finally:
            hung_up.set()
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    loop = asyncio.get_running_loop()
    port = server.sockets[0].getsockname()[1]
    _, conn = await loop.create_connection(lambda: UpstreamConnection(loop), "127.0.0.1", port)
    try:
        yield conn, hung_up
    finally:
        conn.close()
        server.close()
        await server.wait_closed()


def parser_for(conn: UpstreamConnection) -> HttpResponseParser:
    """A response parser as the client makes one (GET: an answer with a body)."""
    return HttpResponseParser(
        conn,
        asyncio.get_running_loop(),
        64 * 1024,
        max_line_size=8190,
        max_field_size=8190,
        payload_exception=aiohttp.ClientPayloadError,
        response_with_body=True,
        read_until_eof=True,
        auto_decompress=False,
    )


async def test_bytes_on_an_idle_connection_close_it() -> None:
    """An answer nobody asked for means the connection is out of step: it is closed, never pooled."""

    async def unsolicited(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

    async with connected(unsolicited) as (conn, hung_up):
        async with asyncio.timeout(WAIT):
            await hung_up.wait()
        assert conn.closed


async def test_a_second_answer_to_one_request_closes_the_connection() -> None:
    """The first answer is the exchange's; a second one closes the connection, which is not reusable."""

    async def twice(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na" * 2)

    async with connected(twice) as (conn, hung_up):
        head = conn.begin(parser_for(conn))
        assert conn.transport is not None
        conn.transport.write(REQUEST)
        async with asyncio.timeout(WAIT):
            assert (await head).code == 200
            await hung_up.wait()
        assert conn.closed
        assert not conn.reusable()


async def test_a_close_before_the_head_fails_the_exchange_as_disconnected() -> None:
    """The upstream hanging up on a request it read fails the head with the disconnected row."""

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.close()

    async with connected(hang_up) as (conn, _):
        head = conn.begin(parser_for(conn))
        assert conn.transport is not None
        conn.transport.write(REQUEST)
        with pytest.raises(UpstreamError) as raised:
            async with asyncio.timeout(WAIT):
                await head
    assert raised.value.failure is UpstreamFailure.DISCONNECTED
    assert not conn.got_data


async def test_the_armed_read_timeout_fails_a_silent_body_and_closes() -> None:
    """A head whose body never comes: past the read timeout the body read fails and the connection closes."""

    async def head_only(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n")

    async with connected(head_only) as (conn, _):
        head = conn.begin(parser_for(conn))
        assert conn.transport is not None
        conn.transport.write(REQUEST)
        conn.arm_read(0.05)
        async with asyncio.timeout(WAIT):
            await head
            assert conn.payload is not None
            with pytest.raises(aiohttp.SocketTimeoutError):
                await conn.payload.read()
        assert conn.closed
        assert not conn.reusable()


@pytest.mark.parametrize(
    ("reply", "reused"),
    [
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n", True),
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 5\r\n\r\nabcde", False),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nabcde", False),
        (b"HTTP/1.1 200 OK\r\n\r\nabcde", False),  # close-delimited
        (
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early\r\nLink: x\r\n\r\n"
            + b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nabcde",
            True,
        ),
    ],
    ids=["chunked", "connection-close", "http-1.0", "close-delimited", "1xx-skipped"],
)
async def test_body_framings_are_read_whole_and_reuse_follows_keep_alive(
    scripted: Scripted, make_config: MakeConfig, reply: bytes, reused: bool
) -> None:
    """Every framing yields the whole body; only a keep-alive answer's connection is reused."""
    scripted.answers += [lambda _: reply, ok(b"next")]
    if reply.startswith(b"HTTP/1.1 200 OK\r\n\r\n"):
        scripted.close_after.add(0)  # a close-delimited body ends with the connection
    async with pool_for(listener_for(make_config, scripted.port)) as pool:
        status, _, body = await fetch(pool)
        assert (status, body) == (200, b"abcde")
        assert (await fetch(pool))[2] == b"next"
    assert [s.connection for s in scripted.seen] == ([1, 1] if reused else [1, 2])


@pytest.mark.parametrize(("method", "status"), [("HEAD", 200), ("GET", 204), ("GET", 304)])
async def test_answers_without_content_keep_the_connection(
    scripted: Scripted, make_config: MakeConfig, method: str, status: int
) -> None:
    """HEAD, 204 and 304 carry no body whatever Content-Length says, and the connection is reused."""
    scripted.answers += [lambda _: f"HTTP/1.1 {status} X\r\nContent-Length: 9\r\n\r\n".encode(), ok(b"next")]
    async with pool_for(listener_for(make_config, scripted.port)) as pool:
        async with pool.request(method, "/t", [("Host", "mes")]) as answer:
            assert answer.status == status
            assert answer.content.at_eof()
        assert (await fetch(pool))[2] == b"next"
    assert [s.connection for s in scripted.seen] == [1, 1]


@pytest.mark.parametrize(
    "reply",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n",
    ],
    ids=["short-length", "unterminated-chunks"],
)
async def test_a_body_cut_short_is_a_payload_error(
    scripted: Scripted, make_config: MakeConfig, reply: bytes
) -> None:
    """An answer whose body ends early raises ClientPayloadError from the body, not a short read."""
    scripted.answers.append(lambda _: reply)
    scripted.close_after.add(0)
    async with (
        pool_for(listener_for(make_config, scripted.port)) as pool,
        pool.request("GET", "/t", [("Host", "mes")]) as answer,
    ):
        assert answer.status == 200
        with pytest.raises(aiohttp.ClientPayloadError) as raised:
            await answer.content.read()
    assert classify_failure(raised.value) is UpstreamFailure.PAYLOAD_ERROR


async def test_the_read_timeout_holds_on_a_reused_connection(
    scripted: Scripted, make_config: MakeConfig
) -> None:
    """A kept-alive connection's next exchange gets a full read timeout of its own; silence then fails it."""

    def silent_head(_: Seen) -> bytes | None:
        return b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n"  # the body never comes

    scripted.answers += [ok(b"one"), ok(b"two"), silent_head]
    loop = asyncio.get_running_loop()
    async with pool_for(listener_for(make_config, scripted.port, read=0.3, total=None)) as pool:
        assert (await fetch(pool))[2] == b"one"
        await asyncio.sleep(0.2)  # part of a read timeout passes while the connection is idle
        assert (await fetch(pool))[2] == b"two"  # the timer armed by the first call must not cut this one
        async with pool.request("GET", "/t", [("Host", "mes")]) as answer:
            started = loop.time()
            with pytest.raises(aiohttp.ClientError) as read_timeout:
                await answer.content.read()
            waited = loop.time() - started
    assert classify_failure(read_timeout.value) is UpstreamFailure.READ_TIMEOUT
    assert waited >= 0.25  # a full read timeout from the last byte, not what was left of an old one
    assert [s.connection for s in scripted.seen] == [1, 1, 1]
