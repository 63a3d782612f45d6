"""One request on a proxy listener, as the parser read it, and the means to answer it.

The connection (``http1.py``) parses and queues requests; the handler gets one
:class:`IncomingRequest` at a time and answers through it, whole (:meth:`IncomingRequest.send`,
head and body in one write) or streamed (:meth:`~IncomingRequest.start`, any number of
:meth:`~IncomingRequest.write`, :meth:`~IncomingRequest.finish`). The framing of what it writes
is decided by :func:`mes_trace_proxy.core.h1.response_head`.
"""

from __future__ import annotations

import asyncio
import email.utils
import time
from collections.abc import Iterable
from typing import Final, Protocol

from aiohttp import HttpVersion
from aiohttp.http import RawRequestMessage
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from multidict import CIMultiDictProxy

from mes_trace_proxy.core import h1

__all__ = ["DateField", "IncomingRequest", "Wire"]

_HTTP_11: Final = HttpVersion(1, 1)


class DateField:
    """The ``Date`` field value (RFC 9110 §6.6.1), formatted once per second."""

    __slots__ = ("_second", "_value")

    def __init__(self) -> None:
        self._second = -1
        self._value = ""

    def now(self) -> str:
        """Today's ``Date`` value, e.g. ``Mon, 07 Dec 2026 16:00:00 GMT``."""
        second = int(time.time())
        if second != self._second:
            self._second = second
            self._value = email.utils.formatdate(second, usegmt=True)
        return self._value


class _Clock(Protocol):
    @property
    def date(self) -> DateField: ...


class Wire(Protocol):
    """What a request needs of its connection (``connection.Connection``; the benchmark's stand-in)."""

    @property
    def server(self) -> _Clock: ...

    @property
    def remote(self) -> str | None: ...

    @property
    def scheme(self) -> str: ...

    @property
    def closing(self) -> bool: ...

    @property
    def writing_paused(self) -> bool: ...

    @property
    def transport(self) -> asyncio.Transport | None: ...

    def write(self, data: bytes) -> None: ...

    def writelines(self, data: Iterable[bytes]) -> None: ...

    async def drain(self) -> None: ...

    def abort(self) -> None: ...


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
        "chunked",
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

    def __init__(self, conn: Wire, message: RawRequestMessage, payload: StreamReader) -> None:
        self._conn = conn
        self.message = message
        self.method: str = message.method
        self.raw_path: str = message.path
        self.version: HttpVersion = message.version
        self.headers: CIMultiDictProxy[str] = message.headers
        self.content = payload
        self.body_exists = payload is not EMPTY_PAYLOAD
        #: the request body is framed by ``Transfer-Encoding: chunked``. Read here, in pure
        #: Python: compiled code reading ``message.chunked`` checks that ``message`` is the
        #: NamedTuple aiohttp's stubs declare, and the C parser's message is not one.
        self.chunked: bool = message.chunked
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
            transport.write(h1.CONTINUE)

    def _head(
        self, status: int, reason: str | None, headers: Iterable[tuple[str, str]], length: int | None
    ) -> bytes:
        """The status line and fields (see :func:`mes_trace_proxy.core.h1.response_head`)."""
        conn = self._conn
        head, framing, close = h1.response_head(
            status,
            reason,
            headers,
            length=length,
            head_request=self.method == "HEAD",
            http11=self.version >= _HTTP_11,
            close=self.close_after or conn.closing,
            date=conn.server.date.now(),
        )
        self._head_only = framing == h1.NO_BODY
        self._chunked = framing == h1.CHUNKED
        self.close_after = close
        return head

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
            conn.writelines(h1.chunk(chunk))
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
            self._conn.write(h1.LAST_CHUNK)
        conn = self._conn
        if conn.writing_paused:
            await conn.drain()
