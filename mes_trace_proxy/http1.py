"""The proxy listeners' HTTP/1.1 server: asyncio protocols around aiohttp's C request parser.

aiohttp's ``web.Server`` builds a ``BaseRequest``, a ``StreamResponse``, a payload writer and a
task for every request, and adds ``Server``, ``Date`` and ``Content-Type`` fields to answers.
The proxy needs none of that: it has one handler, relays an upstream's head as it came, and pays
for every microsecond on every MES call (docs/performance.md). Here each connection is one
protocol object and one task that serves its requests in order; a request is a slotted view of
the parser's message, and an answer is written as bytes (head and a small body in one write).

What a caller sees is what aiohttp's server gave it, minus the fields it added:

- the parser, its limits (request line, header field, header count) and its refusals are
  aiohttp's: 414/431/400 come back as problem+json and the connection closes;
- a head that takes longer than ``header_read_timeout`` gets 408 (slow-loris), an idle
  keep-alive connection closes after ``idle_timeout``, and beyond ``max_connections`` a new
  connection is answered 503 with ``Retry-After`` and closed;
- pipelined requests are answered in order; a caller that hangs up cancels its handler (and
  with it the upstream call);
- a WebSocket upgrade is handed, connection and all, to aiohttp's own server (the relay in
  ``websocket.py`` is built on aiohttp's WebSocket classes; it is rare and long-lived, so its
  per-request cost does not matter);
- on shutdown, listening stops, idle connections close, in-flight requests get the grace period
  and are cancelled after it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import email.utils
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from http import HTTPStatus
from typing import Final

from aiohttp import HttpVersion
from aiohttp.base_protocol import BaseProtocol
from aiohttp.client_exceptions import ClientConnectionResetError
from aiohttp.http import HttpRequestParser, RawRequestMessage
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from aiohttp.web_protocol import RequestPayloadError
from multidict import CIMultiDictProxy

from mes_trace_proxy.config import Limits
from mes_trace_proxy.limits import (
    OVERLOADED_ANSWER,
    REFUSED_LINGER,
    TIMEOUT_ANSWER,
    GuardedServer,
    classify_parse_error,
    raw_problem,
)

__all__ = ["Handler", "Http1Server", "IncomingRequest"]

log = logging.getLogger("mes_trace_proxy.http1")

#: One request, answered by writing to it; raising after the head went out closes the connection.
Handler = Callable[["IncomingRequest"], Awaitable[None]]

# Bytes of a request body buffered before the caller is paused; aiohttp's server default.
READ_BUFFER: Final = 2**16
# Pipelined requests parsed ahead of the one being answered before reading pauses.
MAX_QUEUED: Final = 16
# After an answer whose request body was not read, the rest of the body is read and thrown
# away for up to this long, so the caller reads the answer instead of a reset (lingering close).
LINGER: Final = 2.0
_HTTP_11: Final = HttpVersion(1, 1)
# RFC 9110 §6.4.1 and §15.2: answers that never carry content, whatever their fields say.
_NO_BODY_STATUSES: Final = frozenset({204, 304})
_CHUNK_END: Final = b"0\r\n\r\n"
_REASONS: Final = {status.value: status.phrase for status in HTTPStatus}
# Pieces of an upgrade kept for the hand-off before reading pauses (a caller should wait for 101).
_MAX_TAIL: Final = READ_BUFFER


class _DateField:
    """The ``Date`` field value (RFC 9110 §6.6.1), formatted once per second."""

    __slots__ = ("_second", "_value")

    def __init__(self) -> None:
        self._second = -1
        self._value = ""

    def now(self) -> str:
        second = int(time.time())
        if second != self._second:
            self._second = second
            self._value = email.utils.formatdate(second, usegmt=True)
        return self._value


class IncomingRequest:
    """One request as the parser read it, and the means to answer it.

    The head is aiohttp's ``RawRequestMessage``; the body is its ``StreamReader`` (or the
    shared empty one). An answer is either :meth:`send` (whole, in one write) or
    :meth:`start`, any number of :meth:`write`, then :meth:`finish`.
    """

    __slots__ = (
        "_chunked",
        "_conn",
        "_head_only",
        "body_exists",
        "close_after",
        "content",
        "headers",
        "message",
        "method",
        "raw_path",
        "remote",
        "scheme",
        "started",
        "version",
    )

    def __init__(self, conn: _Connection, message: RawRequestMessage, payload: StreamReader) -> None:
        self._conn = conn
        self.message = message
        self.method: str = message.method
        self.raw_path: str = message.path
        self.version: HttpVersion = message.version
        self.headers: CIMultiDictProxy[str] = message.headers
        self.content = payload
        self.body_exists = payload is not EMPTY_PAYLOAD
        self.remote = conn.remote
        self.scheme = conn.scheme
        #: the connection closes once this answer is out (the caller or the proxy asked so)
        self.close_after: bool = message.should_close
        #: whether the head of the answer went out
        self.started = False
        self._chunked = False
        self._head_only = False

    @property
    def host(self) -> str | None:
        """The ``Host`` field as received, or ``None`` when the caller sent none."""
        return self.headers.get("Host")

    @property
    def content_length(self) -> int | None:
        """The declared body length, or ``None`` (chunked, or no body)."""
        raw = self.headers.get("Content-Length")
        return int(raw) if raw is not None and raw.isdigit() else None

    @property
    def content_type(self) -> str | None:
        """The ``Content-Type`` field as received."""
        return self.headers.get("Content-Type")

    @property
    def transport(self) -> asyncio.Transport | None:
        """The caller's connection, while it is open."""
        return self._conn.transport

    def force_close(self) -> None:
        """Close the connection once this answer is out, whatever the caller asked."""
        self.close_after = True

    def close_now(self) -> None:
        """Cut the connection now: the caller sees a truncated answer, not a complete one."""
        self.close_after = True
        self._conn.abort()

    def send_continue(self) -> None:
        """``100 Continue`` (RFC 9110 §10.1.1): invite the body the caller holds back."""
        transport = self._conn.transport
        if transport is not None and not transport.is_closing():
            transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def _head(
        self, status: int, reason: str | None, headers: Iterable[tuple[str, str]], length: int | None
    ) -> bytes:
        """The status line and fields; decides the framing of what follows.

        Args:
            status: the status code.
            reason: the reason phrase (``None``: the standard one).
            headers: the fields, in order, sent as they are.
            length: the body's length when the whole body is in hand; it replaces the value
                of a ``Content-Length`` field, in that field's place. ``None``: the fields' own
                ``Content-Length`` frames the body, else chunked coding (HTTP/1.1) or the end
                of the connection (HTTP/1.0) does.
        """
        no_body = self.method == "HEAD" or status in _NO_BODY_STATUSES or status < 200
        self._head_only = no_body
        framed = length is not None and not no_body
        lines = [f"HTTP/1.1 {status} {reason or _REASONS.get(status, 'Unknown')}\r\n"]
        has_length = False
        has_date = False
        for name, value in headers:
            if len(name) == 14 and name.lower() == "content-length":
                if has_length:
                    continue  # one length only (a repeated field said the same, or was refused)
                has_length = True
                if framed:
                    value = str(length)
            elif len(name) == 4 and name.lower() == "date":
                has_date = True
            lines.append(f"{name}: {value}\r\n")
        if not has_date:
            # RFC 9110 §6.6.1: a recipient with a clock adds Date to a message that lacks it.
            lines.append(f"Date: {self._conn.server.date.now()}\r\n")
        if framed and not has_length:
            lines.append(f"Content-Length: {length}\r\n")
        elif not has_length and not no_body and length is None:
            if self.version >= _HTTP_11:
                self._chunked = True
                lines.append("Transfer-Encoding: chunked\r\n")
            else:
                # HTTP/1.0 has no chunked coding: the end of the connection ends the body.
                self.close_after = True
        if self.close_after or self._conn.closing:
            self.close_after = True
            lines.append("Connection: close\r\n\r\n")
        elif self.version < _HTTP_11:
            lines.append("Connection: keep-alive\r\n\r\n")
        else:
            lines.append("\r\n")
        # surrogateescape gives back the exact bytes a non-UTF-8 field arrived with.
        return "".join(lines).encode("utf-8", "surrogateescape")

    def send(
        self, status: int, reason: str | None, headers: Iterable[tuple[str, str]], body: bytes = b""
    ) -> None:
        """Answer whole: head and body in one write, framed by ``Content-Length``.

        Raises:
            ClientConnectionResetError: the caller is gone.
        """
        head = self._head(status, reason, headers, len(body))
        self.started = True
        self._conn.write(head + body if body and not self._head_only else head)

    async def start(self, status: int, reason: str | None, headers: Iterable[tuple[str, str]]) -> None:
        """Send the head of an answer whose body follows through :meth:`write`.

        Raises:
            ClientConnectionResetError: the caller is gone.
        """
        head = self._head(status, reason, headers, None)
        self.started = True
        self._conn.write(head)

    async def write(self, chunk: bytes) -> None:
        """Send a piece of the body, waiting while the caller reads slower than we send.

        Raises:
            ClientConnectionResetError: the caller is gone.
        """
        if not chunk or self._head_only:
            return
        conn = self._conn
        if self._chunked:
            conn.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
        else:
            conn.write(chunk)
        if conn.writing_paused:
            await conn.drain()

    async def finish(self) -> None:
        """End the body (the last chunk of a chunked one).

        Raises:
            ClientConnectionResetError: the caller is gone.
        """
        if self._chunked and not self._head_only:
            self._conn.write(_CHUNK_END)
        conn = self._conn
        if conn.writing_paused:
            await conn.drain()


class _Connection(BaseProtocol):
    """One caller's connection: parses requests and serves them one after another in one task.

    aiohttp's ``BaseProtocol`` brings the flow control its parser's body ``StreamReader``
    calls (pause/resume reading) and the write-side pause and drain.
    """

    __slots__ = (
        "_head_count",
        "_head_timer",
        "_idle_since",
        "_idle_timer",
        "_last_payload",
        "_linger_timer",
        "_lingering",
        "_parse_error",
        "_queue",
        "_refused",
        "_requests",
        "_tail",
        "_task",
        "_upgrade",
        "_waiter",
        "busy",
        "closing",
        "remote",
        "scheme",
        "server",
    )

    def __init__(self, server: Http1Server) -> None:
        super().__init__(server.loop)
        self.server = server
        limits = server.limits
        self._parser = HttpRequestParser(
            self,
            server.loop,
            READ_BUFFER,
            max_line_size=limits.max_line_size,
            max_field_size=limits.max_header_size,
            max_headers=limits.max_headers,
            payload_exception=RequestPayloadError,
            # A gzip request body must reach MES as the gzip bytes it was.
            auto_decompress=False,
        )
        self._queue: collections.deque[tuple[RawRequestMessage, StreamReader]] = collections.deque()
        self._task: asyncio.Task[None] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._parse_error: BaseException | None = None
        #: an upgrade head was parsed: what follows is not HTTP/1.1 and is kept for the hand-off
        self._upgrade = False
        self._tail = b""
        self._requests = 0
        self._head_count = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._idle_since = 0.0
        self._linger_timer: asyncio.TimerHandle | None = None
        self._lingering = False
        self._refused = False
        #: the body of the last head parsed: while it is open, bytes are body, not head
        self._last_payload: StreamReader | None = None
        #: a request is being answered
        self.busy = False
        #: no further request will be served (shutdown, a close asked for, a broken stream)
        self.closing = False
        self.remote: str | None = None
        self.scheme = "http"

    # ── asyncio protocol ────────────────────────────────────────────────────────────────────

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Serve the connection, or answer 503 when the listener is full."""
        super().connection_made(transport)
        # BaseProtocol keeps it as an asyncio.Transport (uvloop's are not subclasses of it).
        tr = self.transport
        assert tr is not None
        server = self.server
        if server.open_connections >= server.limits.max_connections:
            server.refused_connections += 1
            self._refused = True
            self.closing = True
            tr.write(server.overloaded_answer)
            if tr.can_write_eof():
                tr.write_eof()
            # Half-open long enough for the 503 to be read, not lost to a reset.
            self._linger_timer = self._loop.call_later(REFUSED_LINGER, tr.close)
            return
        server.connections.add(self)
        peer = tr.get_extra_info("peername")
        if isinstance(peer, tuple) and peer:
            self.remote = str(peer[0])
        elif isinstance(peer, str) and peer:
            self.remote = peer
        if tr.get_extra_info("sslcontext") is not None:
            self.scheme = "https"
        self._idle_since = self._loop.time()
        self._idle_timer = self._loop.call_at(self._idle_since + server.limits.idle_timeout, self._on_idle)

    def connection_lost(self, exc: BaseException | None) -> None:
        """Cancel the request in progress (a caller that hung up cancels its upstream call)."""
        super().connection_lost(exc)
        for timer in (self._head_timer, self._idle_timer, self._linger_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._idle_timer = self._linger_timer = None
        if self._refused:
            return
        server = self.server
        server.connections.discard(self)
        self.closing = True
        parser = self._parser
        if parser is not None:
            self._parser = None
            with contextlib.suppress(HttpProcessingError):
                # A body cut short: its reader gets the error.
                parser.feed_eof()
        task = self._task
        if task is not None and not task.done():
            task.cancel()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.cancel()
        self._queue.clear()

    def eof_received(self) -> bool | None:
        """The caller closed its side: close ours, cancelling a request in progress (as aiohttp does)."""
        return None

    def data_received(self, data: bytes) -> None:
        """Feed the parser; queue each complete request; time a head that did not complete."""
        if self._lingering or self._refused:
            return  # the rest of an unread body, or a refused connection: thrown away
        if self._upgrade:
            self._tail += data
            if len(self._tail) > _MAX_TAIL and not self._reading_paused:
                self.pause_reading()
            return
        parser = self._parser
        if parser is None or self._parse_error is not None:
            return
        last = self._last_payload
        body_open = last is not None and not last.is_eof()
        try:
            messages, upgraded, tail = parser.feed_data(data)
        except HttpProcessingError as exc:
            self._on_parse_error(exc)
            return
        if messages:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
            self._requests += len(messages)
            payload = messages[-1][1]
            self._last_payload = None if payload is EMPTY_PAYLOAD else payload
            queue = self._queue
            queue.extend(messages)
            if self._task is None:
                self._task = self._loop.create_task(self._serve())
            else:
                waiter = self._waiter
                if waiter is not None and not waiter.done():
                    waiter.set_result(None)
            if len(queue) >= MAX_QUEUED:
                self.pause_reading()
            if upgraded:
                self._upgrade = True
                self._tail = bytes(tail) if tail else b""
        elif data and self._head_timer is None and not body_open:
            # Bytes that were no body and made no complete head: a head has begun. (A read
            # that ends a body and starts a pipelined head is timed from its next read.)
            self._head_count = self._requests
            self._head_timer = self._loop.call_later(
                self.server.limits.header_read_timeout, self._on_head_timeout
            )

    # ── serving ─────────────────────────────────────────────────────────────────────────────

    async def _serve(self) -> None:
        server = self.server
        queue = self._queue
        loop = self._loop
        try:
            while True:
                while queue:
                    message, payload = queue.popleft()
                    if self._reading_paused and len(queue) < MAX_QUEUED // 2 and not self._upgrade:
                        self.resume_reading()
                    if message.upgrade and self._hand_off(message):
                        return
                    request = IncomingRequest(self, message, payload)
                    if self.closing:
                        request.close_after = True
                    self.busy = True
                    try:
                        await server.handler(request)
                    except asyncio.CancelledError:
                        raise
                    except Exception:
                        log.exception("the request handler failed")
                        request.close_after = True
                        if not request.started and self.transport is not None:
                            request.send(
                                500, None, (("Content-Type", "text/plain"),), b"Internal Server Error"
                            )
                    finally:
                        self.busy = False
                    if self._upgrade and not queue:
                        request.close_after = True  # what follows an upgrade head is not HTTP/1.1
                    if request.close_after or self.closing or self.transport is None:
                        self._close_after_answer(payload)
                        return
                    if payload is not EMPTY_PAYLOAD and not payload.is_eof():
                        # The handler did not read the whole body: the connection cannot carry
                        # another request in step.
                        self._close_after_answer(payload)
                        return
                if self._parse_error is not None:
                    self._answer_parse_error()
                    return
                self._idle_since = loop.time()
                if self._idle_timer is None:
                    self._idle_timer = loop.call_at(
                        self._idle_since + server.limits.idle_timeout, self._on_idle
                    )
                waiter = loop.create_future()
                self._waiter = waiter
                try:
                    await waiter
                finally:
                    self._waiter = None
        except asyncio.CancelledError:
            pass
        finally:
            self._task = None

    def _hand_off(self, message: RawRequestMessage) -> bool:
        """Give a WebSocket upgrade, with the connection, to aiohttp's server; ``False``: not one."""
        upgrade = message.headers.get("Upgrade", "")
        transport = self.transport
        if upgrade.lower() != "websocket" or message.method != "GET" or transport is None:
            return False
        server = self.server
        # The head again, as it arrived (field names and values are the parser's exact bytes).
        head = b"%s %s HTTP/%d.%d\r\n" % (
            message.method.encode("ascii"),
            message.path.encode("utf-8", "surrogateescape"),
            message.version.major,
            message.version.minor,
        )
        head += b"".join(name + b": " + value + b"\r\n" for name, value in message.raw_headers) + b"\r\n"
        tail = self._tail
        self._tail = b""
        self._parser = None
        for timer in (self._head_timer, self._idle_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._idle_timer = None
        server.connections.discard(self)
        server.handed_off += 1
        if self._reading_paused:
            self.resume_reading()
        protocol = server.upgrade_server()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        protocol.data_received(head + tail)
        self.transport = None
        return True

    def write(self, data: bytes) -> None:
        """Write to the caller, or raise as aiohttp does when it is gone."""
        transport = self.transport
        if transport is None or transport.is_closing():
            raise ClientConnectionResetError("Cannot write to closing transport")
        transport.write(data)

    def writelines(self, data: Iterable[bytes]) -> None:
        """Write pieces to the caller, or raise as aiohttp does when it is gone."""
        transport = self.transport
        if transport is None or transport.is_closing():
            raise ClientConnectionResetError("Cannot write to closing transport")
        transport.writelines(data)

    @property
    def writing_paused(self) -> bool:
        """Whether the caller's buffer is full (the writer should drain)."""
        return self._paused

    async def drain(self) -> None:
        """Wait until the caller read enough of what was written."""
        if self.transport is None:
            raise ClientConnectionResetError("Connection lost")
        await self._drain_helper()

    def abort(self) -> None:
        """Close the connection now, dropping what is unsent."""
        self.closing = True
        transport = self.transport
        if transport is not None:
            transport.abort()

    def close(self) -> None:
        """Close once the answer in progress (if any) is out; an idle connection closes now."""
        self.closing = True
        if not self.busy and not self._queue:
            transport = self.transport
            if transport is not None:
                transport.close()
            waiter = self._waiter
            if waiter is not None and not waiter.done():
                waiter.cancel()

    def _close_after_answer(self, payload: StreamReader) -> None:
        """Close after the answer; if the request body is still arriving, read and drop it first."""
        self.closing = True
        transport = self.transport
        if transport is None:
            return
        if payload is EMPTY_PAYLOAD or payload.is_eof():
            transport.close()
            return
        self._linger()

    def _linger(self) -> None:
        """Close once the caller has had the answer, whatever it still sends (a lingering close).

        Closing with unread bytes would reset the connection, and the caller could lose the
        answer with it: stop sending (FIN after what is written), drop whatever still comes,
        and close when the caller does or after :data:`LINGER` seconds.
        """
        self.closing = True
        self._lingering = True
        self._parser = None
        transport = self.transport
        if transport is None:
            return
        if self._reading_paused:
            self.resume_reading()
        if transport.can_write_eof():
            transport.write_eof()
        if self._linger_timer is None:
            self._linger_timer = self._loop.call_later(LINGER, transport.close)

    # ── limits ──────────────────────────────────────────────────────────────────────────────

    def _on_idle(self) -> None:
        self._idle_timer = None
        transport = self.transport
        if transport is None:
            return
        loop = self._loop
        timeout = self.server.limits.idle_timeout
        if self.busy or self._queue:
            # Not idle; the timer comes back one period later (cheaper than re-arming per request).
            self._idle_timer = loop.call_at(loop.time() + timeout, self._on_idle)
            return
        due = self._idle_since + timeout
        if loop.time() < due:
            self._idle_timer = loop.call_at(due, self._on_idle)
            return
        if self._head_timer is not None:
            return  # a head is arriving: its own timer governs
        self.closing = True
        transport.close()

    def _on_head_timeout(self) -> None:
        self._head_timer = None
        transport = self.transport
        if transport is None or self.closing or self._requests != self._head_count:
            return
        self.server.head_timeouts += 1
        self.closing = True
        if self.busy or self._queue:
            return  # an answer is on its way: it goes out with Connection: close, then we close
        transport.write(self.server.timeout_answer)
        self._linger()

    def _on_parse_error(self, exc: HttpProcessingError) -> None:
        self._parse_error = exc
        self._parser = None
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        if self._task is None:
            self._answer_parse_error()
        else:
            waiter = self._waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    def _answer_parse_error(self) -> None:
        limits = self.server.limits
        kind = classify_parse_error(
            self._parse_error, max_line_size=limits.max_line_size, max_field_size=limits.max_header_size
        )
        # The parser's message quotes the offending bytes; only the verdict is logged.
        log.debug("request refused by the parser", extra={"error_type": kind.value})
        self.server.parse_refusals += 1
        self.closing = True
        transport = self.transport
        if transport is not None:
            transport.write(raw_problem(kind))
            self._linger()


class Http1Server:
    """A proxy listener's protocol factory, its limits and its counters (for ``/metrics`` and tests).

    Args:
        handler: answers each request.
        limits: the listener's limits.
        upgrade_server: aiohttp's server that WebSocket upgrades are handed to.
    """

    def __init__(self, handler: Handler, *, limits: Limits, upgrade_server: GuardedServer) -> None:
        self.handler = handler
        self.limits: Final = limits
        self.upgrade_server = upgrade_server
        self.loop = asyncio.get_running_loop()
        self.date = _DateField()
        self.connections: set[_Connection] = set()
        self.refused_connections = 0
        self.head_timeouts = 0
        self.parse_refusals = 0
        #: connections given to ``upgrade_server`` (WebSocket)
        self.handed_off = 0
        self.overloaded_answer: Final = OVERLOADED_ANSWER
        self.timeout_answer: Final = TIMEOUT_ANSWER

    @property
    def open_connections(self) -> int:
        """Connections open now: served here, and handed to the WebSocket relay."""
        return len(self.connections) + self.upgrade_server.open_connections

    def __call__(self) -> _Connection:
        """A protocol for one new connection."""
        return _Connection(self)

    async def shutdown(self, grace: float) -> None:
        """Close idle connections, let requests in progress finish within ``grace`` seconds, then cancel them.

        Call after the listening socket stopped accepting.
        """
        for conn in list(self.connections):
            conn.close()
        tasks = {c._task for c in self.connections if c._task is not None}
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=grace)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late)
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.close()
        await self.upgrade_server.shutdown(grace)
