"""The lean upstream client against a raw scripted HTTP/1.1 server on loopback.

The server answers each request with bytes the test scripts (or closes without answering),
so framing, keep-alive, retry, timeout and cancellation behaviour is seen on the wire.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Final

import aiohttp
import pytest

from mes_trace_proxy.core.config import ListenerConfig
from mes_trace_proxy.core.problems import UpstreamFailure
from mes_trace_proxy.proxy.relay import CHUNK_SIZE, classify_failure
from mes_trace_proxy.wire.bodies import BodyTooLarge, capped
from mes_trace_proxy.wire.client import UpstreamError, UpstreamPool
from tests.conftest import MakeConfig

# Generous bounds for waits on loopback: a healthy run never comes near them.
WAIT: Final = 5.0
# A pool bound and keep-alive for tests; the read buffer matches app.READ_BUFFER's order.
POOL: Final = 4
KEEPALIVE: Final = 30.0
READ_BUFFER: Final = 64 * 1024

#: what the server does with one request: the bytes to send back, or None to close silently
Answer = Callable[["Seen"], bytes | None]


@dataclass(frozen=True, slots=True)
class Seen:
    """One request as it reached the server."""

    connection: int
    method: str
    target: str
    head: bytes
    body: bytes


@dataclass(slots=True)
class Scripted:
    """A raw HTTP/1.1 server: requests are recorded, answers come from ``answers`` in turn."""

    answers: list[Answer]
    seen: list[Seen] = field(default_factory=list)
    connections: int = 0
    closed: int = 0
    #: indexes of requests (0-based, all connections) after whose answer the server hangs up
    close_after: set[int] = field(default_factory=set)
    port: int = 0
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    _server: asyncio.Server | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)

    async def start(self) -> None:
        """Listen on 127.0.0.1, port 0."""
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening and drop every connection."""
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        await self._server.wait_closed()

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        """Until ``predicate()`` holds (bounded)."""
        async with asyncio.timeout(WAIT), self.changed:
            await self.changed.wait_for(predicate)

    async def _note(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        self._writers.add(writer)
        await self._note()
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ")
                fields = {
                    k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:] if x)
                }
                body = b""
                if "content-length" in fields:
                    body = await reader.readexactly(int(fields["content-length"]))
                elif fields.get("transfer-encoding") == "chunked":
                    while True:
                        size = int((await reader.readuntil(b"\r\n"))[:-2], 16)
                        body += (await reader.readexactly(size + 2))[:-2]
                        if size == 0:
                            break
                seen = Seen(number, method, target, head, body)
                self.seen.append(seen)
                await self._note()
                reply = self.answers.pop(0)(seen)
                if reply is None:
                    return
                writer.write(reply)
                await writer.drain()
                if len(self.seen) - 1 in self.close_after:
                    return
        finally:
            writer.close()
            self._writers.discard(writer)
            self.closed += 1
            await self._note()


def ok(body: bytes = b"ok", *extra: str) -> Answer:
    """A 200 with a Content-Length body and extra header lines."""
    head = "".join(f"{line}\r\n" for line in extra)
    return lambda _: f"HTTP/1.1 200 OK\r\n{head}Content-Length: {len(body)}\r\n\r\n".encode() + body


@pytest.fixture
async def scripted() -> AsyncIterator[Scripted]:
    """A started scripted server (answers appended by the test)."""
    server = Scripted(answers=[])
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def listener_for(make_config: MakeConfig, port: int, **timeouts: float | None) -> ListenerConfig:
    """The listener config of a proxy in front of 127.0.0.1:``port``."""
    listener = make_config(f"http://127.0.0.1:{port}").listeners[0]
    if timeouts:
        listener = dataclasses.replace(listener, timeouts=dataclasses.replace(listener.timeouts, **timeouts))
    return listener


@contextlib.asynccontextmanager
async def pool_for(listener: ListenerConfig, size: int = POOL) -> AsyncIterator[UpstreamPool]:
    """A pool, closed on leaving."""
    pool = UpstreamPool(listener, size=size, keepalive=KEEPALIVE, read_buffer=READ_BUFFER)
    try:
        yield pool
    finally:
        await pool.close()


async def fetch(
    pool: UpstreamPool, method: str = "GET", body: bytes | None = None
) -> tuple[int, list[tuple[str, str]], bytes]:
    """One call; status, headers and the whole body."""
    async with pool.request(method, "/t", [("Host", "mes")], body) as answer:
        data = await answer.content.read()
        return answer.status, list(answer.headers.items()), data


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


@pytest.mark.parametrize(
    ("reply", "failure"),
    [
        (lambda _: b"NOT HTTP AT ALL\r\n\r\n", UpstreamFailure.INVALID_RESPONSE),
        (lambda _: None, UpstreamFailure.DISCONNECTED),
    ],
    ids=["garbage", "closed-unanswered"],
)
async def test_failures_before_the_head_map_to_the_failure_table(
    scripted: Scripted, make_config: MakeConfig, reply: Answer, failure: UpstreamFailure
) -> None:
    """A head that is not HTTP is an invalid response; a close before it, a disconnect."""
    scripted.answers.append(reply)
    async with pool_for(listener_for(make_config, scripted.port)) as pool:
        with pytest.raises(aiohttp.ClientError) as raised:
            await fetch(pool, "POST", b"x")
    assert classify_failure(raised.value) is failure


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
