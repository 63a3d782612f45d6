"""A lean pooled HTTP/1.1 client for a listener's one upstream: asyncio protocols, aiohttp's C parser.

The default path of :func:`mes_trace_proxy.proxy.handler.handle`; aiohttp's ``ClientSession`` stays for
the WebSocket relay and for ``tracing.client_span: instrumentation``.

Here: the pool and its call (connect, acquire and release, send the request, timeouts, the one
retry). One connection's protocol is in :mod:`mes_trace_proxy.wire.upstream_connection`; how a
failure becomes a row of the failure table, in :mod:`mes_trace_proxy.wire.upstream_failures`.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import AsyncIterable, Iterable
from types import TracebackType
from typing import Final, Protocol

import aiohttp
from aiohttp.http import HttpResponseParser, RawResponseMessage
from multidict import CIMultiDictProxy

from mes_trace_proxy.core import h1
from mes_trace_proxy.core.config import ListenerConfig
from mes_trace_proxy.core.problems import UpstreamFailure
from mes_trace_proxy.wire.tls import ClientCertReloader
from mes_trace_proxy.wire.upstream_connection import UpstreamConnection
from mes_trace_proxy.wire.upstream_failures import UpstreamError, connect_failure

__all__ = ["Answer", "RequestBody", "UpstreamError", "UpstreamPool"]

#: what a request body may be: none, bytes (replayable), or a stream sent as it arrives
RequestBody = bytes | aiohttp.StreamReader | AsyncIterable[bytes] | None

# RFC 9110 §9.2.2; the same set aiohttp retries on a reused connection. A POST that may have
# reached MES is never sent twice.
_IDEMPOTENT: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
# Head and body go out in one write up to this size; a larger body is written after the head
# instead of copied into one buffer with it.
_ONE_WRITE: Final = 64 * 1024
# aiohttp's client defaults: a status line or one header field longer than 8 KiB is refused.
_MAX_LINE: Final = 8190


class Answer(Protocol):
    """What :func:`mes_trace_proxy.proxy.handler.handle` reads of an answer (aiohttp's ClientResponse too)."""

    @property
    def status(self) -> int: ...

    @property
    def reason(self) -> str | None: ...

    @property
    def headers(self) -> CIMultiDictProxy[str]: ...

    @property
    def content_length(self) -> int | None: ...

    @property
    def content(self) -> aiohttp.StreamReader: ...


class _Call:
    """One request: ``async with pool.request(...) as answer``; leaving returns or closes the connection."""

    __slots__ = (
        "_body",
        "_conn",
        "_deadline",
        "_headers",
        "_method",
        "_pool",
        "_sent",
        "_target",
        "_total_timer",
        "_writer",
        "content",
        "content_length",
        "headers",
        "reason",
        "status",
    )

    def __init__(
        self,
        pool: UpstreamPool,
        method: str,
        target: str,
        headers: Iterable[tuple[str, str]],
        body: RequestBody,
    ) -> None:
        self._pool = pool
        self._method = method
        self._target = target
        self._headers = headers
        self._body = body
        self._conn: UpstreamConnection | None = None
        self._writer: asyncio.Task[None] | None = None
        self._total_timer: asyncio.TimerHandle | None = None
        self._deadline: float | None = None
        #: whether any byte of the request was written (a pooled connection found closed: not)
        self._sent = False
        self.status = 0
        self.reason: str | None = None
        self.headers: CIMultiDictProxy[str]
        self.content_length: int | None = None
        self.content: aiohttp.StreamReader

    async def __aenter__(self) -> _Call:
        pool = self._pool
        loop = pool.loop
        total = pool.timeouts.total
        if total is not None:
            self._deadline = loop.time() + total
            self._total_timer = loop.call_at(self._deadline, self._on_total_timeout)
        try:
            conn, reused = await pool.acquire(self._deadline)
            try:
                message = await self._exchange(conn)
            except UpstreamError as exc:
                # A pooled connection the upstream closed while idle: nothing of an answer came,
                # so the request can go again on a fresh connection, once, if sending it twice
                # cannot matter (idempotent method, body still in hand).
                if not (
                    reused
                    and exc.failure is UpstreamFailure.DISCONNECTED
                    and not conn.got_data
                    and (
                        not self._sent
                        or (
                            self._method in _IDEMPOTENT
                            and (self._body is None or isinstance(self._body, bytes))
                        )
                    )
                ):
                    raise
                self._drop(keep_deadline=True)
                conn, _ = await pool.acquire(self._deadline, fresh=True)
                message = await self._exchange(conn)
        except BaseException:
            self._drop()
            raise
        self.status = message.code
        self.reason = message.reason
        headers = message.headers
        self.headers = headers
        length = headers.get("Content-Length")
        self.content_length = int(length) if length is not None and length.isdigit() else None
        payload = conn.payload
        assert payload is not None
        self.content = payload
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        conn = self._conn
        if conn is None:
            return
        writer = self._writer
        if exc_type is None and conn.reusable() and (writer is None or writer.done()):
            self._stop_timers()
            self._conn = None
            conn.finish()
            self._pool.release(conn)
            return
        self._drop()

    async def _exchange(self, conn: UpstreamConnection) -> RawResponseMessage:
        """Send the request on ``conn`` and wait for the final answer's head."""
        self._conn = conn
        pool = self._pool
        method = self._method
        parser = HttpResponseParser(
            conn,
            pool.loop,
            pool.read_buffer,
            max_line_size=_MAX_LINE,
            max_field_size=_MAX_LINE,
            payload_exception=aiohttp.ClientPayloadError,
            response_with_body=method != "HEAD",
            read_until_eof=True,
            auto_decompress=False,
        )
        head = conn.begin(parser)
        body = self._body
        data, chunked = h1.request_head(
            method,
            self._target,
            self._headers,
            has_body=body is not None,
            length=len(body) if isinstance(body, bytes) else None,
        )
        transport = conn.transport
        if transport is None or conn.closed:
            raise UpstreamError(UpstreamFailure.DISCONNECTED, "upstream closed the pooled connection")
        self._sent = True
        if body is None:
            transport.write(data)
            self._arm_read_timer()
        elif isinstance(body, bytes):
            if len(body) <= _ONE_WRITE:
                transport.write(data + body)
            else:
                transport.write(data)
                transport.write(body)
            self._arm_read_timer()
        else:
            transport.write(data)
            # The answer may come before the body is all sent (an early 413): read meanwhile.
            self._writer = pool.loop.create_task(self._send_stream(conn, body, chunked=chunked))
        return await head

    async def _send_stream(self, conn: UpstreamConnection, body: RequestBody, *, chunked: bool) -> None:
        chunks: AsyncIterable[bytes]
        if isinstance(body, aiohttp.StreamReader):
            chunks = body.iter_any()
        else:
            assert body is not None
            assert not isinstance(body, bytes)
            chunks = body
        try:
            async for chunk in chunks:
                if not chunk:
                    continue
                transport = conn.transport
                if transport is None or conn.closed:
                    raise ConnectionResetError("upstream connection lost while sending the body")
                if chunked:
                    transport.writelines(h1.chunk(chunk))
                else:
                    transport.write(chunk)
                if conn.writing_paused:
                    await conn.drain()
            if chunked and conn.transport is not None:
                conn.transport.write(h1.LAST_CHUNK)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # As aiohttp reports it: the cause (BodyTooLarge, the caller's cut upload) is kept.
            failure = (
                UpstreamFailure.DISCONNECTED if isinstance(exc, OSError) else UpstreamFailure.INVALID_RESPONSE
            )
            error = UpstreamError(failure, "could not send the request body upstream")
            error.__cause__ = exc
            conn.fail(error)
            return
        # Like aiohttp: the read timeout runs once the whole request is out.
        self._arm_read_timer()

    # -- timeouts -----------------------------------------------------------------------------

    def _arm_read_timer(self) -> None:
        read = self._pool.timeouts.read
        conn = self._conn
        if read is not None and conn is not None:
            conn.arm_read(read)

    def _on_total_timeout(self) -> None:
        self._total_timer = None
        conn = self._conn
        if conn is not None:
            conn.fail(TimeoutError("the upstream call passed its total timeout"))
        # (while waiting for a free connection, acquire's own deadline applies)

    def _stop_timers(self) -> None:
        if self._total_timer is not None:
            self._total_timer.cancel()
            self._total_timer = None

    def _drop(self, *, keep_deadline: bool = False) -> None:
        """Give up the connection in use (closed, never pooled) and everything running for it.

        Args:
            keep_deadline: the call goes on (a retry): its total timeout keeps running.
        """
        if not keep_deadline:
            self._stop_timers()
        writer = self._writer
        self._writer = None
        if writer is not None and not writer.done():
            writer.cancel()
        conn = self._conn
        self._conn = None
        if conn is not None:
            conn.finish()
            self._pool.discard(conn)


class UpstreamPool:
    """Keep-alive connections to one listener's upstream, at most ``size`` open at once.

    Args:
        listener: the listener (upstream address, ``upstream_tls``, timeouts).
        size: most connections open at once; callers over it wait for one to be released.
        keepalive: seconds an idle connection is kept before it is closed.
        read_buffer: bytes of an answer buffered before the upstream is paused.

    Raises:
        ConfigError: the listener's ``upstream_tls`` files are unusable.
    """

    def __init__(self, listener: ListenerConfig, *, size: int, keepalive: float, read_buffer: int) -> None:
        upstream = listener.upstream
        self.loop = asyncio.get_running_loop()
        self.timeouts = listener.timeouts
        self.read_buffer = read_buffer
        self._host = upstream.host
        self._port = upstream.port
        self._ssl: ssl.SSLContext | None = None
        #: upstream_tls's files, reloaded on change and SIGHUP: each new connection takes its context
        self.tls: ClientCertReloader | None = None
        if upstream.scheme == "https":
            if listener.upstream_tls is not None:
                self.tls = ClientCertReloader(listener.name, listener.upstream_tls)
                self.tls.start()
            else:
                # https:// without upstream_tls verifies against the system's CA bundle.
                self._ssl = ssl.create_default_context()
        self._size = size
        self._keepalive = keepalive
        #: idle connections, most recently used last (reused first: its socket is warm)
        self._idle: list[tuple[UpstreamConnection, float]] = []
        self._open = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False

    def request(
        self, method: str, target: str, headers: Iterable[tuple[str, str]], body: RequestBody = None
    ) -> _Call:
        """One call upstream, used as ``async with pool.request(...) as answer``.

        Args:
            method: the request method, sent as is.
            target: the origin-form request target, sent as is.
            headers: the fields to send, in order; ``Content-Length`` (or, for a stream without
                one, ``Transfer-Encoding: chunked``) is added when the body needs it.
            body: ``None``, bytes (sent with the head in one write when small), or a stream.

        Returns:
            The call; entering it sends the request and waits for the answer's head.

        Raises:
            UpstreamError: (on entering) connect, read or send failures, with their failure row.
            aiohttp.SocketTimeoutError: the read timeout passed (also while reading the body).
            TimeoutError: the total timeout passed.
        """
        return _Call(self, method, target, headers, body)

    def idle_connections(self) -> int:
        """How many pooled connections are idle and still open."""
        return sum(1 for conn, _ in self._idle if not conn.closed)

    async def acquire(
        self, deadline: float | None, *, fresh: bool = False
    ) -> tuple[UpstreamConnection, bool]:
        """A connection for one request, and whether it was reused from the pool."""
        if self._closed:
            raise UpstreamError(UpstreamFailure.DISCONNECTED, "the upstream pool is closed")
        if not fresh:
            idle = self._idle
            now = self.loop.time()
            while idle:
                conn, since = idle.pop()
                if not conn.closed and now - since < self._keepalive:
                    return conn, True
                conn.close()
                self._open -= 1
        while self._open >= self._size:
            waiter: asyncio.Future[None] = self.loop.create_future()
            self._waiters.append(waiter)
            try:
                async with asyncio.timeout_at(deadline):
                    await waiter
            except BaseException:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
                elif waiter.done() and not waiter.cancelled():
                    self._wake()  # we were woken but leave: the wake-up goes to the next in line
                raise
            if self._idle and not fresh:
                conn, since = self._idle.pop()
                if not conn.closed:
                    return conn, True
                self._open -= 1
        self._open += 1
        try:
            return await self._connect(deadline), False
        except BaseException:
            self._open -= 1
            self._wake()
            raise

    async def _connect(self, deadline: float | None) -> UpstreamConnection:
        loop = self.loop
        connect = self.timeouts.connect
        limit = connect
        if deadline is not None:
            left = deadline - loop.time()
            limit = left if limit is None else min(limit, left)
        context = self.tls.context if self.tls is not None else self._ssl
        try:
            async with asyncio.timeout(limit):
                _, conn = await loop.create_connection(
                    lambda: UpstreamConnection(loop),
                    self._host,
                    self._port,
                    ssl=context,
                    server_hostname=self._host if context is not None else None,
                )
        except TimeoutError:
            if connect is not None and (deadline is None or loop.time() < deadline - 1e-3):
                raise UpstreamError(
                    UpstreamFailure.CONNECT_TIMEOUT, "connecting to the upstream timed out"
                ) from None
            raise
        except OSError as exc:
            raise connect_failure(exc) from exc
        return conn

    def release(self, conn: UpstreamConnection) -> None:
        """Put a connection whose exchange ended cleanly back in the pool."""
        if self._closed or conn.closed:
            self.discard(conn)
            return
        self._idle.append((conn, self.loop.time()))
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(self._keepalive, self._sweep)
        self._wake()

    def discard(self, conn: UpstreamConnection) -> None:
        """Give up a busy connection: close it (never pooled again) and free its place."""
        conn.close()
        self._open -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _sweep(self) -> None:
        self._sweeper = None
        now = self.loop.time()
        keep: list[tuple[UpstreamConnection, float]] = []
        for conn, since in self._idle:
            if conn.closed or now - since >= self._keepalive:
                conn.close()
                self._open -= 1
            else:
                keep.append((conn, since))
        self._idle = keep
        if keep:
            self._sweeper = self.loop.call_later(self._keepalive, self._sweep)
        self._wake()

    async def close(self) -> None:
        """Close every idle connection; busy ones close when their call ends."""
        self._closed = True
        if self.tls is not None:
            await self.tls.aclose()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for conn, _ in self._idle:
            conn.close()
        self._open -= len(self._idle)
        self._idle = []
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(
                    UpstreamError(UpstreamFailure.DISCONNECTED, "the upstream pool is closed")
                )
