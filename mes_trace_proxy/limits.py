"""Connection-level limits of a proxy listener: header sizes, slow heads, idle and too many connections.

aiohttp's low-level server already bounds the request line (``max_line_size``), each header
field (``max_field_size``), the header count (``max_headers``) and idle keep-alive
connections (``keepalive_timeout``), but answers every parser refusal with a bare
``400 text/plain`` and has no header-read timeout or connection cap. :class:`GuardedServer`
adds those on top of aiohttp's ``RequestHandler``:

- parser refusals become problem+json answers: 414 for the request target, 431 for a header
  field or too many of them, 400 for anything else;
- a request head (first byte to the blank line) that takes longer than
  ``header_read_timeout`` gets 408 and the connection is closed (slow-loris);
- beyond ``max_connections`` open connections, a new one is answered 503 and closed.

It relies on a few ``RequestHandler`` internals (``_request_count``, ``_messages``,
``_request_in_progress``); ``tests/test_limits.py`` exercises each of them on real sockets, so
an aiohttp upgrade that changes them fails there, not in production.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any, Final

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, HttpProcessingError, LineTooLong
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler

from mes_trace_proxy.config import Limits
from mes_trace_proxy.problems import (
    PROBLEM_CONTENT_TYPE,
    ClientRejection,
    rejection,
    rejection_response,
)

__all__ = ["OVERLOADED_ANSWER", "TIMEOUT_ANSWER", "GuardedServer", "classify_parse_error", "raw_problem"]

log = logging.getLogger("mes_trace_proxy.limits")

# aiohttp's parsers (C and pure Python) raise this exact message past max_headers.
_TOO_MANY_HEADERS: Final = "Too many headers received"
# A refused connection stays half-open this long so the 503 is read, not lost to a TCP reset
# of the request bytes we never read; then it is closed whatever the caller does.
REFUSED_LINGER: Final = 2.0
# RFC 9110 §10.2.3: how soon a refused caller may try again; connections free up within
# the idle and header timeouts, and one second spreads the retries of a burst.
_RETRY_AFTER_SECONDS: Final = 1
_OVERLOADED_DETAIL: Final = "This listener has as many connections open as it accepts; retry shortly."


def classify_parse_error(
    exc: BaseException | None, *, max_line_size: int, max_field_size: int
) -> ClientRejection:
    """Say which limit or rule an aiohttp parser error broke.

    aiohttp raises the same ``LineTooLong`` for the request target and for a header field; the
    limit it carries tells them apart. When both limits are set to the same number that is
    ambiguous, and the answer is 431 (docs/configuration.md says so).

    Args:
        exc: the parser's exception.
        max_line_size: the listener's request-target limit as given to aiohttp.
        max_field_size: the listener's header-field limit as given to aiohttp.

    Returns:
        The rejection row to answer with.
    """
    if isinstance(exc, LineTooLong):
        limit = exc.args[1] if len(exc.args) > 1 else None
        if limit == max_line_size and limit != max_field_size:
            return ClientRejection.URI_TOO_LONG
        return ClientRejection.HEADERS_TOO_LARGE
    if isinstance(exc, BadHttpMessage) and exc.message == _TOO_MANY_HEADERS:
        return ClientRejection.HEADERS_TOO_LARGE
    return ClientRejection.BAD_REQUEST


def raw_problem(kind: ClientRejection, *, detail: str | None = None, extra: str = "") -> bytes:
    """A complete ``Connection: close`` HTTP/1.1 problem+json answer, for writing to a bare transport.

    Args:
        kind: the rejection row.
        detail: a fixed detail instead of the row's.
        extra: further header lines, each ending in CRLF.

    Returns:
        The bytes of the status line, headers and body.
    """
    status, body = rejection_response(rejection(kind, detail=detail), trace_id=None)
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
        f"Content-Type: {PROBLEM_CONTENT_TYPE}\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"{extra}"
        "Connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


# Built once: the answers written straight to a transport, by this module's server and http1's.
#: a connection beyond ``max_connections``: 503 with Retry-After, then the connection closes
OVERLOADED_ANSWER: Final = raw_problem(
    ClientRejection.SERVICE_UNAVAILABLE,
    detail=_OVERLOADED_DETAIL,
    extra=f"Retry-After: {_RETRY_AFTER_SECONDS}\r\n",
)
#: a request head slower than ``header_read_timeout``: 408, then the connection closes
TIMEOUT_ANSWER: Final = raw_problem(ClientRejection.REQUEST_TIMEOUT)


class _GuardedHandler(RequestHandler):
    """aiohttp's per-connection protocol plus the head timer, the cap check and problem answers."""

    __slots__ = ("_body", "_guard", "_head_count", "_head_timer", "_refused_timer")

    def __init__(self, manager: GuardedServer, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._guard = manager
        #: the body of the last request head parsed: while it is open, bytes are body, not head
        self._body: StreamReader | None = None
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_count = 0
        self._refused_timer: asyncio.TimerHandle | None = None

    # ── connection cap ──────────────────────────────────────────────────────────────────────

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Serve the connection, or answer 503 when the listener is full."""
        guard = self._guard
        if guard.open_connections < guard.limits.max_connections:
            super().connection_made(transport)
            return
        guard.refused_connections += 1
        # Never registered with the server: connection_lost has nothing of aiohttp's to undo.
        self._manager = None
        self._force_close = True
        assert isinstance(transport, asyncio.Transport)
        transport.write(guard.overloaded_answer)
        if transport.can_write_eof():
            transport.write_eof()
        self._refused_timer = self._loop.call_later(REFUSED_LINGER, transport.close)

    def connection_lost(self, exc: BaseException | None) -> None:
        """Stop this connection's timers, then let aiohttp clean up."""
        if self._refused_timer is not None:
            self._refused_timer.cancel()
            self._refused_timer = None
            return
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)

    # ── header-read timeout ─────────────────────────────────────────────────────────────────

    def data_received(self, data: bytes) -> None:
        """Feed aiohttp's parser; time a request head that did not complete in this read."""
        body = self._body
        body_open = body is not None and not body.is_eof()
        before = self._request_count
        super().data_received(data)
        if self._request_count != before:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
            last = self._messages[-1][1] if self._messages else None
            self._body = last if isinstance(last, StreamReader) else None
        elif (
            data
            and not body_open
            and self._head_timer is None
            and not self._upgraded
            and not self._force_close
        ):
            # Bytes that were no body and made no complete head: a head has begun. (A read
            # that ends a body and starts a pipelined head is timed from its next read.)
            self._head_count = before
            self._head_timer = self._loop.call_later(
                self._guard.limits.header_read_timeout, self._head_timeout
            )

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self._force_close or self.transport is None or self._request_count != self._head_count:
            return
        self._guard.head_timeouts += 1
        if self._request_in_progress or self._messages:
            # A response is on its way on this connection: finish it, then close.
            self.close()
            return
        self.transport.write(self._guard.timeout_answer)
        self.force_close()

    # ── parser refusals ─────────────────────────────────────────────────────────────────────

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """Answer a request the parser refused with problem+json; anything else as aiohttp does."""
        if status != HTTPStatus.BAD_REQUEST or not isinstance(exc, HttpProcessingError):
            return super().handle_error(request, status, exc, message)
        kind = classify_parse_error(exc, max_line_size=self.max_line_size, max_field_size=self.max_field_size)
        # The parser's message quotes the offending bytes; only the verdict is logged.
        log.debug("request refused by the parser", extra={"error_type": kind.value})
        self._guard.parse_refusals += 1
        code, body = rejection_response(rejection(kind), trace_id=None)
        response = web.Response(status=code, body=body, content_type=PROBLEM_CONTENT_TYPE)
        response.force_close()
        return response


class GuardedServer(web.Server):
    """aiohttp's low-level server with a listener's :class:`~mes_trace_proxy.config.Limits` applied.

    The counters are for tests and metrics; they only ever grow, except ``open_connections``.
    """

    def __init__(
        self,
        handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]],
        *,
        limits: Limits,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            handler,
            max_line_size=limits.max_line_size,
            max_field_size=limits.max_header_size,
            max_headers=limits.max_headers,
            keepalive_timeout=limits.idle_timeout,
            **kwargs,
        )
        self.limits: Final = limits
        self.open_connections = 0
        self.refused_connections = 0
        self.head_timeouts = 0
        self.parse_refusals = 0
        self.overloaded_answer: Final = OVERLOADED_ANSWER
        self.timeout_answer: Final = TIMEOUT_ANSWER

    def __call__(self) -> RequestHandler:
        """A protocol for one new connection."""
        return _GuardedHandler(self, loop=self._loop, **self._kwargs)

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        """Count an accepted connection."""
        self.open_connections += 1
        super().connection_made(handler, transport)

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        """Count a closed connection."""
        self.open_connections -= 1
        super().connection_lost(handler, exc)
