"""The lean upstream client's pool and call against a raw scripted HTTP/1.1 server on loopback.

Keep-alive reuse, request framing, the one retry of an unanswered call, connect/read/total
timeouts, cancellation, the pool bound and streamed uploads, as seen on the wire. The connection
protocol's own tests are in test_upstream_connection.py, the failure rows in test_upstream_failures.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest

from mes_trace_proxy.core.problems import UpstreamFailure
from mes_trace_proxy.proxy.relay import CHUNK_SIZE, classify_failure
from mes_trace_proxy.wire.bodies import BodyTooLarge, capped
from mes_trace_proxy.wire.client import UpstreamError
from tests.conftest import MakeConfig
from tests.wire.scripted_upstream import WAIT, Scripted, Seen, fetch, listener_for, ok, pool_for


async def test_answers_keep_header_order_repetition_and_the_connection_is_reused(
    scripted: Scripted, make_config: MakeConfig
) -> None:
    """Headers come back in order with repeats; a keep-alive answer read whole frees its connection."""
    scripted.answers += [ok(b"one", "Set-Cookie: a=1", "X-Odd: x", "Set-Cookie: b=2"), ok(b"two")]
    async with pool_for(listener_for(make_config, scripted.port)) as pool:
        status, headers, body = await fetch(pool)
        assert (status, body) == (200, b"one")
        assert [h for h in headers if h[0] in ("Set-Cookie", "X-Odd")] == [
            ("Set-Cookie", "a=1"),
            ("X-Odd", "x"),
            ("Set-Cookie", "b=2"),
        ]
        assert (await fetch(pool))[2] == b"two"
    assert [s.connection for s in scripted.seen] == [1, 1]


async def test_request_head_and_body_framing_go_out_as_aiohttp_sent_them(
    scripted: Scripted, make_config: MakeConfig
) -> None:
    """Bytes get a Content-Length, a bodiless POST gets 0, a GET none, a stream is chunked."""
    scripted.answers += [ok(), ok(), ok(), ok()]

    async def stream() -> AsyncIterator[bytes]:
        yield b"abc"
        yield b""
        yield b"defgh"

    async with pool_for(listener_for(make_config, scripted.port)) as pool:
        await fetch(pool, "PUT", b'{"s":1}')
        await fetch(pool, "POST")
        await fetch(pool, "GET")
        async with pool.request("POST", "/s?q=1", [("Host", "mes"), ("x-Case", "v")], stream()) as answer:
            await answer.content.read()
    put, post, get, streamed = scripted.seen
    assert put.head == b"PUT /t HTTP/1.1\r\nHost: mes\r\nContent-Length: 7\r\n\r\n"
    assert put.body == b'{"s":1}'
    assert b"Content-Length: 0\r\n" in post.head
    assert b"Content-Length" not in get.head
    assert (
        streamed.head
        == b"POST /s?q=1 HTTP/1.1\r\nHost: mes\r\nx-Case: v\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    assert streamed.body == b"abcdefgh"


async def test_a_pooled_connection_closed_under_the_request_is_retried_only_when_safe(
    scripted: Scripted, make_config: MakeConfig
) -> None:
    """A GET the upstream drops unanswered on a reused connection goes again once; a POST does not."""
    scripted.answers += [ok(b"a"), lambda _: None, ok(b"again"), ok(b"b"), lambda _: None]
    async with pool_for(listener_for(make_config, scripted.port)) as pool:
        await fetch(pool)
        assert (await fetch(pool))[2] == b"again"
        await fetch(pool)
        with pytest.raises(UpstreamError) as raised:
            await fetch(pool, "POST", b"order")
    assert classify_failure(raised.value) is UpstreamFailure.DISCONNECTED
    assert [s.method for s in scripted.seen] == ["GET", "GET", "GET", "GET", "POST"]
    assert [s.connection for s in scripted.seen] == [1, 1, 2, 2, 2]


async def test_an_idle_connection_the_upstream_closed_is_not_used(
    scripted: Scripted, make_config: MakeConfig
) -> None:
    """A keep-alive connection closed while idle is skipped; even a POST goes out once, fresh."""
    scripted.answers += [ok(), ok(b"fresh")]
    scripted.close_after.add(0)
    async with pool_for(listener_for(make_config, scripted.port)) as pool:
        await fetch(pool)
        await scripted.wait_for(lambda: scripted.closed == 1)
        async with asyncio.timeout(WAIT):
            # The client sees the FIN a loop turn or two later; the pool has no event for a
            # peer's close (nothing but this test would wait on one), so poll, bounded.
            while pool.idle_connections():  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        assert (await fetch(pool, "POST", b"x"))[2] == b"fresh"
    assert [(s.method, s.connection) for s in scripted.seen] == [("GET", 1), ("POST", 2)]


async def test_connect_refused_read_timeout_and_total_timeout(
    scripted: Scripted, make_config: MakeConfig
) -> None:
    """A closed port is refused; silence past read is a read timeout; past total, a total timeout."""
    held = asyncio.Event()

    def hold(_: Seen) -> bytes | None:
        held.set()
        return b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n"  # the body never comes

    scripted.answers += [hold, hold]
    async with (
        pool_for(listener_for(make_config, scripted.port, read=0.2, total=None)) as pool,
        pool.request("GET", "/t", [("Host", "mes")]) as answer,
    ):
        with pytest.raises(aiohttp.ClientError) as read_timeout:
            await answer.content.read()
    assert classify_failure(read_timeout.value) is UpstreamFailure.READ_TIMEOUT
    async with (
        pool_for(listener_for(make_config, scripted.port, read=None, total=0.2)) as pool,
        pool.request("GET", "/t", [("Host", "mes")]) as answer,
    ):
        with pytest.raises(TimeoutError) as total_timeout:
            await answer.content.read()
    assert classify_failure(total_timeout.value) is UpstreamFailure.TOTAL_TIMEOUT
    await scripted.stop()
    async with pool_for(listener_for(make_config, scripted.port)) as pool:
        with pytest.raises(UpstreamError) as refused:
            await fetch(pool)
    assert classify_failure(refused.value) is UpstreamFailure.CONNECT_REFUSED
    await scripted.start()  # for the fixture's stop


async def test_a_cancelled_call_closes_its_connection_and_frees_its_place(
    scripted: Scripted, make_config: MakeConfig
) -> None:
    """Cancelling a caller waiting for the answer closes the upstream connection, never pools it."""
    scripted.answers += [lambda _: b"", ok(b"after")]  # the first request is never answered
    async with pool_for(listener_for(make_config, scripted.port), size=1) as pool:
        task = asyncio.create_task(fetch(pool))
        await scripted.wait_for(lambda: len(scripted.seen) == 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await scripted.wait_for(lambda: scripted.closed == 1)
        assert (await fetch(pool))[2] == b"after"
    assert [s.connection for s in scripted.seen] == [1, 2]


async def test_the_pool_bound_makes_callers_wait_for_a_connection(
    scripted: Scripted, make_config: MakeConfig
) -> None:
    """With a bound of one, concurrent calls share one connection, one after the other."""
    scripted.answers += [ok(b"1"), ok(b"2"), ok(b"3")]
    async with pool_for(listener_for(make_config, scripted.port), size=1) as pool:
        bodies = await asyncio.gather(fetch(pool), fetch(pool), fetch(pool))
    assert sorted(b for _, _, b in bodies) == [b"1", b"2", b"3"]
    assert scripted.connections == 1


async def test_a_capped_stream_fails_with_its_cause_and_the_upstream_never_sees_it_whole(
    scripted: Scripted, make_config: MakeConfig
) -> None:
    """A chunked upload over the cap aborts the call with BodyTooLarge as the cause."""

    async def upload() -> AsyncIterator[bytes]:
        for _ in range(4):
            yield b"x" * 1000

    scripted.answers.append(ok())
    async with pool_for(listener_for(make_config, scripted.port)) as pool:
        with pytest.raises(aiohttp.ClientError) as raised:
            async with pool.request("POST", "/t", [("Host", "mes")], capped(upload(), 2500, CHUNK_SIZE)):
                pass
    assert isinstance(raised.value.__cause__, BodyTooLarge)
    await scripted.wait_for(lambda: scripted.closed == 1)
    assert scripted.seen == []
