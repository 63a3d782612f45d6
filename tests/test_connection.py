"""One connection's limits on real sockets: back-pressure, body stalls, idle eviction, one address's share.

The listener is an Http1Server on 127.0.0.1 with small handlers (tests/test_http1.py's
``serving``), so each limit is seen alone; test_listener_hardening.py checks the same through a
real proxy process.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

from mes_trace_proxy.connection import MAX_QUEUED
from mes_trace_proxy.http1 import IncomingRequest
from tests.test_http1 import LIMITS, WAIT, _until, echo_path, serving


async def _answers(reader: asyncio.StreamReader, count: int) -> list[bytes]:
    out = []
    for _ in range(count):
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
        out.append(await reader.readexactly(length))
    return out


async def test_a_full_queue_pauses_the_socket_and_every_request_is_answered() -> None:
    """With the handler held, the queue stops at its bound and reading pauses; released, all are answered."""
    gate = asyncio.Event()

    async def held(request: IncomingRequest) -> None:
        await gate.wait()
        await echo_path(request)

    count = MAX_QUEUED * 8
    async with serving(held) as (server, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"".join(b"GET /%d HTTP/1.1\r\nHost: x\r\n\r\n" % n for n in range(count)))
            async with asyncio.timeout(WAIT):
                await _until(lambda: bool(server.connections) and next(iter(server.connections))._held)
                gate.set()
                assert await _answers(reader, count) == [b"/%d" % n for n in range(count)]
        finally:
            writer.close()


async def test_a_stalled_body_gets_408_and_cancels_its_handler() -> None:
    """A body that stops arriving for body_read_timeout: 408, the handler reading it is cancelled."""
    cancelled = asyncio.Event()

    async def reads_body(request: IncomingRequest) -> None:
        try:
            body = await request.content.read()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        request.send(200, None, [], body)

    limits = replace(LIMITS, body_read_timeout=0.2)
    async with serving(reads_body, limits) as (server, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
            async with asyncio.timeout(WAIT):
                head = await reader.readuntil(b"\r\n\r\n")
                await cancelled.wait()
        finally:
            writer.close()
    assert head.startswith(b"HTTP/1.1 408")
    assert server.head_timeouts == 1


async def test_a_slow_body_that_keeps_coming_is_not_a_stall() -> None:
    """Bytes every half period keep the body timer quiet, past several periods."""

    async def reads_body(request: IncomingRequest) -> None:
        request.send(200, None, [], await request.content.read())

    limits = replace(LIMITS, body_read_timeout=0.5)
    async with serving(reads_body, limits) as (server, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 8\r\n\r\n")
            for piece in (b"ab", b"cd", b"ef", b"gh"):
                await asyncio.sleep(0.3)  # the pace of a slow caller, on purpose: below the timeout
                writer.write(piece)
            async with asyncio.timeout(WAIT):
                assert await _answers(reader, 1) == [b"abcdefgh"]
        finally:
            writer.close()
    assert server.head_timeouts == 0


async def test_at_the_cap_the_longest_idle_connection_makes_room() -> None:
    """Two idle keep-alive connections at a cap of 2: a third caller closes the one idle longest."""
    async with serving(echo_path, replace(LIMITS, max_connections=2)) as (server, port):
        first = await asyncio.open_connection("127.0.0.1", port)
        second = await asyncio.open_connection("127.0.0.1", port)
        for n, (reader, writer) in enumerate((first, second)):
            writer.write(b"GET /%d HTTP/1.1\r\nHost: x\r\n\r\n" % n)
            async with asyncio.timeout(WAIT):
                assert await _answers(reader, 1) == [b"/%d" % n]
        third = await asyncio.open_connection("127.0.0.1", port)
        third[1].write(b"GET /3 HTTP/1.1\r\nHost: x\r\n\r\n")
        async with asyncio.timeout(WAIT):
            assert await _answers(third[0], 1) == [b"/3"]
            assert await first[0].read() == b""  # idle since its answer, the longest
        second[1].write(b"GET /again HTTP/1.1\r\nHost: x\r\n\r\n")
        async with asyncio.timeout(WAIT):
            assert await _answers(second[0], 1) == [b"/again"]
        for _, writer in (first, second, third):
            writer.close()
    assert server.admission.evicted == 1
    assert server.refused_connections == 0


async def test_one_address_gets_its_share_and_no_more() -> None:
    """max_connections_per_client: the next connection from the same address gets 503, until one closes."""
    async with serving(echo_path, replace(LIMITS, max_connections_per_client=2)) as (server, port):
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
        async with asyncio.timeout(WAIT):
            await _until(lambda: len(server.connections) == 2)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        async with asyncio.timeout(WAIT):
            refused = await reader.read()
        writer.close()
        assert refused.startswith(b"HTTP/1.1 503")
        assert b"from your address" in refused
        held[0][1].close()
        async with asyncio.timeout(WAIT):
            await _until(lambda: len(server.connections) == 1)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n")
        async with asyncio.timeout(WAIT):
            assert await _answers(reader, 1) == [b"/ok"]
        writer.close()
        held[1][1].close()
    assert server.refused_connections == 1


async def test_a_head_held_back_by_our_full_queue_is_not_timed_out() -> None:
    """A partial head behind a full queue waits for the proxy, not the caller: no 408 while we are slow."""
    gate = asyncio.Event()

    async def held(request: IncomingRequest) -> None:
        await gate.wait()
        await echo_path(request)

    count = MAX_QUEUED + 4
    async with serving(held, replace(LIMITS, header_read_timeout=0.2)) as (server, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            requests = b"".join(b"GET /%d HTTP/1.1\r\nHost: x\r\n\r\n" % n for n in range(count))
            writer.write(requests + b"GET /last HTTP/1.1\r\nHo")
            async with asyncio.timeout(WAIT):
                await _until(lambda: bool(server.connections) and next(iter(server.connections))._held)
                await asyncio.sleep(0.5)  # past the head timeout, on purpose, while the queue is full
                gate.set()
                assert await _answers(reader, count) == [b"/%d" % n for n in range(count)]
                writer.write(b"st: x\r\n\r\n")
                assert await _answers(reader, 1) == [b"/last"]
        finally:
            writer.close()
    assert server.head_timeouts == 0
