"""Connection-level limits of a listener: header sizes, slow heads, idle and too many connections.

Shared by the proxy listeners (``http1.py``) and the two aiohttp servers beside them, the
WebSocket relay's and the admin listener's (:class:`GuardedServer`, :class:`GuardedAppRunner`):

- parser refusals become problem+json answers: 414 for the request target, 431 for a header
  field or too many of them, 400 for anything else;
- a request head (first byte to the blank line) that takes longer than
  ``header_read_timeout`` gets 408 and the connection is closed (slow-loris); a connection that
  sends nothing at all is closed ``header_read_timeout`` after it was accepted;
- at ``max_connections`` open connections, the longest-idle one is closed to admit a new one
  (:class:`Admission`); only when none is idle is the new one answered 503 and closed;
  ``max_connections_per_client`` caps what one source address holds;
- every refusal is counted by its problem slug (:class:`Refusals`, for ``/metrics``).

:class:`GuardedServer` relies on a few ``RequestHandler`` internals (``_request_count``,
``_messages``, ``_request_in_progress``, ``_upgraded``); ``tests/test_limits.py`` exercises each
of them on real sockets, so an aiohttp upgrade that changes them fails there, not in production.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import replace
from http import HTTPStatus
from typing import Any, Final, Protocol, cast

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

__all__ = [
    "ADMIN_MAX_CONNECTIONS",
    "CLIENT_OVERLOADED_ANSWER",
    "OVERLOADED_ANSWER",
    "TIMEOUT_ANSWER",
    "Admission",
    "GuardedAppRunner",
    "GuardedServer",
    "Refusals",
    "admin_limits",
    "classify_parse_error",
    "raw_problem",
    "refuse",
    "refused_by_parser",
]

log = logging.getLogger("mes_trace_proxy.limits")

# aiohttp's parsers (C and pure Python) raise this exact message past max_headers.
_TOO_MANY_HEADERS: Final = "Too many headers received"
# A refused connection stays half-open this long so the 503 is read, not lost to a TCP reset
# of the request bytes we never read; then it is closed whatever the caller does.
REFUSED_LINGER: Final = 2.0
# At most this many refused connections linger at once per listener; past it a refused one is
# closed as soon as its 503 is written (a flood must not hold descriptors for the linger).
MAX_LINGERING_REFUSALS: Final = 64
# RFC 9110 §10.2.3: how soon a refused caller may try again; connections free up within
# the idle and header timeouts, and one second spreads the retries of a burst.
_RETRY_AFTER_SECONDS: Final = 1
_OVERLOADED_DETAIL: Final = "This listener has as many connections open as it accepts; retry shortly."
_CLIENT_OVERLOADED_DETAIL: Final = (
    "This listener has as many connections open from your address as it accepts from one; "
    "reuse one, or retry shortly."
)
#: The admin listener's own connection cap: probes, a Prometheus scraper and a few people's
#: browsers need a handful; whatever happens there, it can never take the descriptors the
#: proxy listeners need (docs/security.md).
ADMIN_MAX_CONNECTIONS: Final = 64
_PARSE_SLUGS: Final = frozenset(
    {
        ClientRejection.BAD_REQUEST.value,
        ClientRejection.URI_TOO_LONG.value,
        ClientRejection.HEADERS_TOO_LARGE.value,
    }
)


class Refusals:
    """Refusals of one listener by problem slug; they only ever grow (``/metrics`` reads them)."""

    __slots__ = ("counts",)

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def add(self, kind: ClientRejection) -> None:
        """Count one refusal."""
        slug = kind.value
        self.counts[slug] = self.counts.get(slug, 0) + 1

    def get(self, kind: ClientRejection) -> int:
        """How many refusals of one kind so far."""
        return self.counts.get(kind.value, 0)

    def parse_refusals(self) -> int:
        """Heads the parser refused: 400, 414 and 431."""
        return sum(n for slug, n in self.counts.items() if slug in _PARSE_SLUGS)

    def snapshot(self) -> Mapping[str, int]:
        """A copy for the scrape."""
        return dict(self.counts)


class _Evictable(Protocol):
    """A connection as :class:`Admission` sees it."""

    @property
    def remote(self) -> str | None: ...

    @property
    def idle_since(self) -> float | None: ...

    def evict(self) -> None: ...


class Admission:
    """Who may connect: the listener's cap, one address's share, and room made by idle ones.

    Runs once per connection, never per request; the scan for an idle connection runs only
    at the cap.
    """

    def __init__(self, limits: Limits, refusals: Refusals) -> None:
        self._limits = limits
        self._refusals = refusals
        self._per_client: dict[str, int] = {}
        #: idle connections closed to admit a new one at the cap
        self.evicted = 0
        #: refused connections half-open now (see :func:`refuse`)
        self.lingering = 0

    def admit(
        self, conn: _Evictable, open_now: int, connections: Iterable[_Evictable]
    ) -> tuple[bytes | None, _Evictable | None]:
        """Say whether ``conn`` may stay: ``(None, evicted)`` to serve it, ``(answer, None)`` to refuse it.

        At the cap the longest-idle connection is closed to make room (and returned, so the
        caller forgets it): a caller that holds connections it does not use cannot keep
        others out while one of them is idle.
        """
        limits = self._limits
        per_client = limits.max_connections_per_client
        remote = conn.remote
        if per_client is not None and remote is not None and self._per_client.get(remote, 0) >= per_client:
            self._refusals.add(ClientRejection.SERVICE_UNAVAILABLE)
            return CLIENT_OVERLOADED_ANSWER, None
        evicted = None
        if open_now >= limits.max_connections:
            evicted = _longest_idle(connections)
            if evicted is None:
                self._refusals.add(ClientRejection.SERVICE_UNAVAILABLE)
                return OVERLOADED_ANSWER, None
            self.evicted += 1
            evicted.evict()
        if per_client is not None and remote is not None:
            self._per_client[remote] = self._per_client.get(remote, 0) + 1
        return None, evicted

    def refused_closed(self) -> None:
        """A refused connection that lingered is closed."""
        self.lingering -= 1

    def release(self, conn: _Evictable) -> None:
        """An admitted connection is gone: its address's share goes down by one."""
        remote = conn.remote
        if self._limits.max_connections_per_client is None or remote is None:
            return
        left = self._per_client.get(remote, 1) - 1
        if left > 0:
            self._per_client[remote] = left
        else:
            self._per_client.pop(remote, None)


def refuse(transport: asyncio.Transport, answer: bytes, admission: Admission) -> asyncio.TimerHandle | None:
    """Answer a refused connection and close it.

    It stays half-open for :data:`REFUSED_LINGER` so the answer is read, not lost to a reset
    of the request bytes never read; past :data:`MAX_LINGERING_REFUSALS` lingering at once it
    closes at once. Call :meth:`Admission.refused_closed` from ``connection_lost`` when this
    returned a timer.
    """
    transport.write(answer)
    if transport.can_write_eof():
        transport.write_eof()
    if admission.lingering >= MAX_LINGERING_REFUSALS:
        transport.close()
        return None
    admission.lingering += 1
    return asyncio.get_running_loop().call_later(REFUSED_LINGER, transport.close)


def _longest_idle(connections: Iterable[_Evictable]) -> _Evictable | None:
    oldest: _Evictable | None = None
    since = 0.0
    for conn in connections:
        idle = conn.idle_since
        if idle is not None and (oldest is None or idle < since):
            oldest, since = conn, idle
    return oldest


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


def refused_by_parser(exc: BaseException | None, limits: Limits, refusals: Refusals) -> ClientRejection:
    """Say which limit a parser error broke, count it, and log the verdict (never the message).

    The parser's message quotes the offending bytes, so only the rejection's slug is logged.
    """
    kind = classify_parse_error(
        exc, max_line_size=limits.max_line_size, max_field_size=limits.max_header_size
    )
    log.debug("request refused by the parser", extra={"error_type": kind.value})
    refusals.add(kind)
    return kind


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
#: a connection beyond ``max_connections_per_client`` from one address: 503, then it closes
CLIENT_OVERLOADED_ANSWER: Final = raw_problem(
    ClientRejection.SERVICE_UNAVAILABLE,
    detail=_CLIENT_OVERLOADED_DETAIL,
    extra=f"Retry-After: {_RETRY_AFTER_SECONDS}\r\n",
)
#: a request head slower than ``header_read_timeout``: 408, then the connection closes
TIMEOUT_ANSWER: Final = raw_problem(ClientRejection.REQUEST_TIMEOUT)


def admin_limits(listener: Limits) -> Limits:
    """The admin listener's limits: the first proxy listener's, with a cap of its own."""
    return replace(
        listener, max_connections=ADMIN_MAX_CONNECTIONS, max_connections_per_client=None, max_body_size=None
    )


class _GuardedHandler(RequestHandler):
    """aiohttp's per-connection protocol plus the head timer, the cap check and problem answers."""

    __slots__ = (
        "_body",
        "_guard",
        "_head_count",
        "_head_started",
        "_head_timer",
        "_idle_since",
        "_refused",
        "_refused_timer",
    )

    def __init__(self, manager: GuardedServer, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._guard = manager
        #: the body of the last request head parsed: while it is open, bytes are body, not head
        self._body: StreamReader | None = None
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_count = 0
        self._refused_timer: asyncio.TimerHandle | None = None
        self._refused = False
        self._idle_since = 0.0
        #: bytes of a head arrived and no request completed yet
        self._head_started = False

    # ── connection cap ──────────────────────────────────────────────────────────────────────

    @property
    def remote(self) -> str | None:
        """No per-address share here (see :func:`admin_limits`)."""
        return None

    @property
    def idle_since(self) -> float | None:
        """When the connection went idle (between requests, or since accepted), else ``None``."""
        if self._request_in_progress or self._messages or self._head_started:
            return None
        if self._force_close or self._close or self._upgraded or self.transport is None:
            return None
        return self._idle_since

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Serve the connection, or answer 503 when the listener is full."""
        guard = self._guard
        answer = guard.admit(self)
        if answer is None:
            super().connection_made(transport)
            self._idle_since = self._loop.time()
            # A connection that sends nothing gets the head timeout from its accept.
            self._head_timer = self._loop.call_later(guard.limits.header_read_timeout, self._head_timeout)
            return
        # Never registered with the server: connection_lost has nothing of aiohttp's to undo.
        self._manager = None
        self._force_close = True
        self._refused = True
        # (uvloop's transports are not asyncio.Transport subclasses: no isinstance check here.)
        self._refused_timer = refuse(cast(asyncio.Transport, transport), answer, guard.admission)

    def connection_lost(self, exc: BaseException | None) -> None:
        """Stop this connection's timers, then let aiohttp clean up."""
        if self._refused:
            if self._refused_timer is not None:
                self._refused_timer.cancel()
                self._refused_timer = None
                self._guard.admission.refused_closed()
            return
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)

    def evict(self) -> None:
        """Close this idle connection now, to make room for a new one."""
        self.force_close()

    # ── header-read timeout ─────────────────────────────────────────────────────────────────

    def data_received(self, data: bytes) -> None:
        """Feed aiohttp's parser; time a request head that did not complete in this read."""
        body = self._body
        body_open = body is not None and not body.is_eof()
        before = self._request_count
        super().data_received(data)
        if self._request_count != before:
            self._head_started = False
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
            last = self._messages[-1][1] if self._messages else None
            self._body = last if isinstance(last, StreamReader) else None
        elif data and not body_open and not self._upgraded and not self._force_close:
            self._head_started = True
            if self._head_timer is None:
                # Bytes that were no body and made no complete head: a head has begun.
                self._head_count = before
                self._head_timer = self._loop.call_later(
                    self._guard.limits.header_read_timeout, self._head_timeout
                )

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self._force_close or self.transport is None or self._request_count != self._head_count:
            return
        self._guard.refusals.add(ClientRejection.REQUEST_TIMEOUT)
        if self._request_in_progress or self._messages:
            # A response is on its way on this connection: finish it, then close.
            self.close()
            return
        if self._head_started:
            # (A connection that sent nothing since its accept is closed without an answer.)
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
        kind = refused_by_parser(exc, self._guard.limits, self._guard.refusals)
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
        self.refusals = Refusals()
        self.admission = Admission(limits, self.refusals)
        self.overloaded_answer: Final = OVERLOADED_ANSWER
        self.timeout_answer: Final = TIMEOUT_ANSWER

    @property
    def refused_connections(self) -> int:
        """Connections answered 503."""
        return self.refusals.get(ClientRejection.SERVICE_UNAVAILABLE)

    @property
    def head_timeouts(self) -> int:
        """Heads not read in time, and connections that sent nothing in time."""
        return self.refusals.get(ClientRejection.REQUEST_TIMEOUT)

    @property
    def parse_refusals(self) -> int:
        """Heads the parser refused (400, 414, 431)."""
        return self.refusals.parse_refusals()

    def __call__(self) -> RequestHandler:
        """A protocol for one new connection."""
        return _GuardedHandler(self, loop=self._loop, **self._kwargs)

    def admit(self, handler: _GuardedHandler) -> bytes | None:
        """``None`` to serve a new connection, else the 503 to answer it with (see :class:`Admission`)."""
        handlers = (h for h in self._connections if isinstance(h, _GuardedHandler))
        answer, _ = self.admission.admit(handler, self.open_connections, handlers)
        return answer

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        """Count an accepted connection."""
        self.open_connections += 1
        super().connection_made(handler, transport)

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        """Count a closed connection."""
        self.open_connections -= 1
        super().connection_lost(handler, exc)


class GuardedAppRunner(web.AppRunner):
    """An ``AppRunner`` whose server is a :class:`GuardedServer`: the admin listener's limits.

    Args:
        app: the application.
        limits: the limits to apply (:func:`admin_limits`).
        kwargs: as for ``web.AppRunner``.
    """

    def __init__(self, app: web.Application, *, limits: Limits, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._limits = limits
        #: the server, once ``setup()`` built it (its counters feed /metrics)
        self.guarded: GuardedServer | None = None

    async def _make_server(self) -> web.Server:
        # aiohttp starts the application and builds its plain server; the same handler and
        # request factory then serve through the guarded one.
        plain = await super()._make_server()
        guarded = GuardedServer(
            plain.request_handler,
            limits=self._limits,
            request_factory=plain.request_factory,
            **plain._kwargs,
        )
        self.guarded = guarded
        return guarded
