"""One caller's connection to a proxy listener: parse, queue, serve in order, and enforce the limits.

The protocol object :class:`~mes_trace_proxy.http1.Http1Server` makes for each accepted
connection. It feeds aiohttp's C request parser, queues the requests it completes and serves
them one after another in one task; it holds the socket when the queue is full (pipelining
back-pressure) and times what the listener's limits bound: the first head from the accept,
a later head from its first byte, a stalled request body, an idle keep-alive connection.
What it needs of its server is :class:`Listener`; the framing of what it writes is ``h1.py``'s.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Final, Protocol

from aiohttp.base_protocol import BaseProtocol
from aiohttp.client_exceptions import ClientConnectionResetError
from aiohttp.http import HttpRequestParser, RawRequestMessage
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from aiohttp.web_protocol import RequestHandler, RequestPayloadError

from mes_trace_proxy import h1
from mes_trace_proxy.config import Limits
from mes_trace_proxy.incoming import DateField, IncomingRequest
from mes_trace_proxy.limits import Admission, Refusals, raw_problem, refuse, refused_by_parser
from mes_trace_proxy.problems import ClientRejection

__all__ = ["LINGER", "MAX_QUEUED", "READ_BUFFER", "Connection", "Listener"]

log = logging.getLogger("mes_trace_proxy.http1")

# Bytes of a request body buffered before the caller is paused; aiohttp's server default.
READ_BUFFER: Final = 2**16
# Pipelined requests parsed ahead of the one being answered before reading pauses; reading
# resumes once the handler has taken half of them (aiohttp's own server does the same).
MAX_QUEUED: Final = 16
# After an answer whose request body was not read, the rest of the body is read and thrown
# away for up to this long, so the caller reads the answer instead of a reset (lingering close).
LINGER: Final = 2.0
# Pieces of an upgrade kept for the hand-off before reading pauses (a caller should wait for 101).
_MAX_TAIL: Final = READ_BUFFER
_READ_PAUSE_ERRORS: Final = (AttributeError, NotImplementedError, RuntimeError)


class Listener(Protocol):
    """What a connection needs of its listener (:class:`~mes_trace_proxy.http1.Http1Server`)."""

    handed_off: int
    admission: Admission
    loop: asyncio.AbstractEventLoop
    date: DateField
    refusals: Refusals
    handler: Callable[[IncomingRequest], Awaitable[None]]

    @property
    def limits(self) -> Limits: ...

    @property
    def timeout_answer(self) -> bytes: ...

    def upgrade_server(self) -> RequestHandler: ...

    def admit(self, conn: Connection) -> bytes | None: ...

    def release(self, conn: Connection) -> None: ...


class Connection(BaseProtocol):
    """One caller's connection: parses requests and serves them one after another in one task.

    aiohttp's ``BaseProtocol`` brings the flow control its parser's body ``StreamReader``
    calls (pause/resume reading while a body is buffered) and the write-side pause and drain.
    The queue of parsed requests and an upgrade's tail hold the transport on their own
    (``_held``): the parser's pause is only for a body it is in the middle of.
    """

    __slots__ = (
        "_before",
        "_body_mark",
        "_body_timer",
        "_current",
        "_head_count",
        "_head_timer",
        "_held",
        "_idle_since",
        "_idle_timer",
        "_last_chunked",
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

    def __init__(self, server: Listener) -> None:
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
        #: the transport is paused for the queue or the upgrade tail (not for a body)
        self._held = False
        self._requests = 0
        self._head_count = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._idle_since = 0.0
        self._linger_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._body_mark = 0
        self._lingering = False
        self._refused = False
        #: the last bytes of a read that left a head unfinished (see h1.head_pending)
        self._before = b""
        #: the body of the last head parsed: while it is open, bytes are body, not head
        self._last_payload: StreamReader | None = None
        self._last_chunked = False
        #: the request being answered
        self._current: IncomingRequest | None = None
        #: a request is being answered
        self.busy = False
        #: no further request will be served (shutdown, a close asked for, a broken stream)
        self.closing = False
        self.remote: str | None = None
        self.scheme = "http"

    # ── asyncio protocol ────────────────────────────────────────────────────────────────────

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Serve the connection, or answer 503 when the listener (or this caller's share) is full."""
        super().connection_made(transport)
        # BaseProtocol keeps it as an asyncio.Transport (uvloop's are not subclasses of it).
        tr = self.transport
        assert tr is not None
        server = self.server
        peer = tr.get_extra_info("peername")
        if isinstance(peer, tuple) and peer:
            self.remote = str(peer[0])
        elif isinstance(peer, str) and peer:
            self.remote = peer
        refusal = server.admit(self)
        if refusal is not None:
            self._refused = True
            self.closing = True
            self._linger_timer = refuse(tr, refusal, server.admission)
            return
        if tr.get_extra_info("sslcontext") is not None:
            self.scheme = "https"
        self._idle_since = self._loop.time()
        # Until its first request, a connection has header_read_timeout to send it (_on_idle).
        limits = server.limits
        first = min(limits.header_read_timeout, limits.idle_timeout)
        self._idle_timer = self._loop.call_at(self._idle_since + first, self._on_idle)

    def connection_lost(self, exc: BaseException | None) -> None:
        """Cancel the request in progress (a caller that hung up cancels its upstream call)."""
        super().connection_lost(exc)
        if self._refused and self._linger_timer is not None:
            self.server.admission.refused_closed()
        for timer in (self._head_timer, self._idle_timer, self._linger_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._idle_timer = self._linger_timer = self._body_timer = None
        if self._refused:
            return
        self.server.release(self)
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

    def resume_reading(self, resume_parser: bool = True) -> None:
        """A body's reader drained: parse what the parser kept, and read again unless held."""
        self._reading_paused = False
        if resume_parser:
            self.data_received(b"")
        if not self._reading_paused and not self._held:
            self._transport_reading(True)

    def data_received(self, data: bytes) -> None:
        """Feed the parser; queue each complete request; time a head that did not complete."""
        if self._lingering or self._refused:
            return  # the rest of an unread body, or a refused connection: thrown away
        if self._upgrade:
            self._tail += data
            if len(self._tail) > _MAX_TAIL:
                self._hold()
            return
        parser = self._parser
        if parser is None or self._parse_error is not None:
            return
        last = self._last_payload
        body_open = last is not None and not last.is_eof()
        received = last.total_bytes if body_open and last is not None else 0
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
            message, payload = messages[-1]
            queue = self._queue
            queue.extend(messages)
            if self._task is None:
                self._task = self._loop.create_task(self._serve())
            else:
                waiter = self._waiter
                if waiter is not None and not waiter.done():
                    waiter.set_result(None)
            if len(queue) >= MAX_QUEUED:
                self._hold()
            if upgraded:
                self._upgrade = True
                self._tail = bytes(tail) if tail else b""
            if payload is EMPTY_PAYLOAD:
                self._last_payload = None
                if not data.endswith(b"\r\n\r\n"):  # (the common case costs one test)
                    self._after_message(data, message, payload, 0, head_in_read=True)
            else:
                self._last_payload = payload
                self._last_chunked = bool(message.chunked)
                if payload.is_eof():
                    self._after_message(data, message, payload, 0, head_in_read=True)
                else:
                    self._start_body_timer(payload)
        elif body_open and last is not None and last.is_eof():
            self._after_message(data, None, last, received, head_in_read=False)
        elif data and not body_open:
            # Bytes that were no body and made no complete head: a head has begun.
            self._before = (self._before + data)[-4:]
            if self._head_timer is None:
                self._start_head_timer()

    def _after_message(
        self,
        data: bytes,
        message: RawRequestMessage | None,
        payload: StreamReader,
        received: int,
        *,
        head_in_read: bool,
    ) -> None:
        """A read ended a message: start the head timer if it also began the next head."""
        if self._upgrade or not data:
            return
        chunked = message.chunked if message is not None else self._last_chunked
        length_framed = payload is not EMPTY_PAYLOAD and not chunked
        body_in_read = payload.total_bytes - received if length_framed else None
        if h1.head_pending(data, self._before, body_in_read, head_in_read=head_in_read):
            self._before = data[-4:]
            self._start_head_timer()

    def _start_head_timer(self) -> None:
        # A connection's first head counts from its accept; a later one from its first byte.
        start = self._idle_since if self._requests == 0 else self._loop.time()
        self._head_count = self._requests
        timeout = self.server.limits.header_read_timeout
        self._head_timer = self._loop.call_at(start + timeout, self._on_head_timeout)

    # ── serving ─────────────────────────────────────────────────────────────────────────────

    async def _serve(self) -> None:
        # One loop for the connection's life: the steps stay inline (no coroutine per request).
        server = self.server
        queue = self._queue
        loop = self._loop
        try:
            while True:
                while queue:
                    message, payload = queue.popleft()
                    if self._held and len(queue) <= MAX_QUEUED // 2 and not self._upgrade:
                        self._release()
                    if message.upgrade and self._hand_off(message):
                        return
                    request = IncomingRequest(self, message, payload)
                    if self.closing:
                        request.close_after = True
                    self.busy = True
                    self._current = request
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
                        self._current = None
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
        head = h1.head_again(
            message.method, message.path, (message.version.major, message.version.minor), message.raw_headers
        )
        tail = self._tail
        self._tail = b""
        self._parser = None
        for timer in (self._head_timer, self._idle_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._idle_timer = self._body_timer = None
        server.release(self)
        server.handed_off += 1
        self._held = False
        self._reading_paused = False
        self._transport_reading(True)
        protocol = server.upgrade_server()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        protocol.data_received(head + tail)
        self.transport = None
        return True

    # ── writing and closing ─────────────────────────────────────────────────────────────────

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

    #: an idle connection closes at once, making room for a new one (``limits.Admission``)
    evict = close

    @property
    def idle_since(self) -> float | None:
        """When this connection last went idle, or ``None`` while it is doing anything at all."""
        if self.busy or self._queue or self.closing or self._head_timer is not None or self.transport is None:
            return None
        last = self._last_payload
        if self._upgrade or (last is not None and not last.is_eof()):
            return None
        return self._idle_since

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
        self._held = False
        self._reading_paused = False
        self._transport_reading(True)
        if transport.can_write_eof():
            transport.write_eof()
        if self._linger_timer is None:
            self._linger_timer = self._loop.call_later(LINGER, transport.close)

    def _hold(self) -> None:
        """Pause the transport for a buffer of ours (the queue, an upgrade's tail)."""
        if not self._held:
            self._held = True
            self._transport_reading(False)

    def _release(self) -> None:
        """Let go of :meth:`_hold`, reading again unless a body's reader still pauses it."""
        self._held = False
        if not self._reading_paused:
            self._transport_reading(True)

    def _transport_reading(self, on: bool) -> None:
        transport = self.transport
        if transport is None:
            return
        try:
            if on:
                transport.resume_reading()
            else:
                transport.pause_reading()
        except _READ_PAUSE_ERRORS:
            pass  # a transport without flow control, or one already closing

    # ── limits ──────────────────────────────────────────────────────────────────────────────

    def _on_idle(self) -> None:
        self._idle_timer = None
        transport = self.transport
        if transport is None or self._head_timer is not None:
            return  # gone, or a head is arriving: its own timer governs (_serve re-arms this one)
        loop = self._loop
        limits = self.server.limits
        if self.idle_since is None:
            # Not idle; the timer comes back one period later (cheaper than re-arming per request).
            self._idle_timer = loop.call_at(loop.time() + limits.idle_timeout, self._on_idle)
            return
        fresh = self._requests == 0
        timeout = min(limits.header_read_timeout, limits.idle_timeout) if fresh else limits.idle_timeout
        due = self._idle_since + timeout
        if loop.time() < due:
            self._idle_timer = loop.call_at(due, self._on_idle)
            return
        if fresh:
            # Accepted, and not a byte since: nothing to answer, but the caller held a slot.
            self.server.refusals.add(ClientRejection.REQUEST_TIMEOUT)
        self.closing = True
        transport.close()

    def _on_head_timeout(self) -> None:
        self._head_timer = None
        transport = self.transport
        if transport is None or self.closing or self._requests != self._head_count:
            return
        if self._held:
            # We stopped reading (our queue is full): the rest of the head waits for us.
            self._start_head_timer()
            return
        self.server.refusals.add(ClientRejection.REQUEST_TIMEOUT)
        self.closing = True
        if self.busy or self._queue:
            return  # an answer is on its way: it goes out with Connection: close, then we close
        transport.write(self.server.timeout_answer)
        self._linger()

    def _start_body_timer(self, payload: StreamReader) -> None:
        timeout = self.server.limits.body_read_timeout
        if timeout is not None and self._body_timer is None:
            self._body_mark = payload.total_bytes
            self._body_timer = self._loop.call_later(timeout, self._on_body_timer)

    def _on_body_timer(self) -> None:
        """A body that stopped arriving for ``body_read_timeout`` (checked once per period)."""
        self._body_timer = None
        payload = self._last_payload
        if payload is None or payload.is_eof() or self.transport is None or self._lingering:
            return
        if payload.total_bytes != self._body_mark or self._reading_paused or self._held:
            # Bytes came, or we paused the caller (the handler reads slower, or the queue is
            # full): not the caller's stall.
            self._start_body_timer(payload)
            return
        self.server.refusals.add(ClientRejection.REQUEST_TIMEOUT)
        self.closing = True
        task = self._task
        current = self._current
        if current is not None and current.content is payload and not current.started and task is not None:
            # The handler is waiting for this body (reading it, or sending it upstream):
            # cancel it, as a caller that hung up would, and say why.
            self.transport.write(self.server.timeout_answer)
            self._linger()
            task.cancel()
            return
        payload.set_exception(RequestPayloadError("the request body stopped arriving"))

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
        kind = refused_by_parser(self._parse_error, self.server.limits, self.server.refusals)
        self.closing = True
        transport = self.transport
        if transport is not None:
            transport.write(raw_problem(kind))
            self._linger()
