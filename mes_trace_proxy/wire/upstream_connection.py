"""One keep-alive connection of the lean upstream client: an asyncio protocol around aiohttp's C parser.

:class:`UpstreamConnection` parses the answer to the request in flight (skipping 1xx), feeds its
body to aiohttp's ``StreamReader`` with aiohttp's flow control, runs the exchange's read timeout,
finishes a body at the connection's end, and says whether the connection may be pooled again.
The call and the pool that drive it are in :mod:`mes_trace_proxy.wire.client`.
"""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http import HttpResponseParser, RawResponseMessage

from mes_trace_proxy.core.problems import UpstreamFailure
from mes_trace_proxy.wire.upstream_failures import UpstreamError, parse_failure

__all__ = ["UpstreamConnection"]


class UpstreamConnection(BaseProtocol):
    """One keep-alive connection; parses the answer to the request in flight, if any.

    aiohttp's ``BaseProtocol`` brings the flow control its parser and StreamReader call
    (``pause_reading``/``resume_reading``, ``pause_writing``/``resume_writing``, drain).
    """

    __slots__ = (
        "_read_timer",
        "closed",
        "got_data",
        "head",
        "last_read",
        "message",
        "payload",
        "read_armed",
        "read_timeout",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        #: resolved with the final (non-1xx) answer's head, or failed
        self.head: asyncio.Future[RawResponseMessage] | None = None
        self.message: RawResponseMessage | None = None
        self.payload: aiohttp.StreamReader | None = None
        self.closed = False
        #: any byte of an answer arrived on this exchange (a retry is then never safe)
        self.got_data = False
        self.last_read = 0.0
        #: the read timeout runs for the exchange in flight (armed once its request is all out)
        self.read_armed = False
        self.read_timeout = 0.0
        # One timer per connection, re-armed only when it fires: a call_at and a cancel per
        # request cost 1.6 % of the proxy's CPU in the profile (docs/performance.md).
        self._read_timer: asyncio.TimerHandle | None = None

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        if parser is None:
            if data:
                # Bytes on an idle connection: it is out of step with us.
                self.close()
            return
        if data:
            self.got_data = True
            self.last_read = self._loop.time()
        try:
            messages, _, _ = parser.feed_data(data)
        except Exception as exc:
            self.fail(parse_failure(exc, head_done=self.message is not None))
            return
        for message, payload in messages:
            if self.message is not None:
                # A second answer to one request: the connection is out of step.
                self.close()
                return
            if 100 <= message.code < 200 and message.code != 101:
                continue  # 1xx informational (100 Continue, 103 Early Hints): the final one follows
            self.message = message
            self.payload = payload
            head = self.head
            if head is not None and not head.done():
                head.set_result(message)

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost finishes the exchange

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        self.closed = True
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None
        parser = self._parser
        if parser is None:
            return
        head = self.head
        if head is not None and not head.done():
            head.set_exception(
                UpstreamError(UpstreamFailure.DISCONNECTED, "upstream closed before answering")
            )
            return
        payload = self.payload
        if payload is None or payload.is_eof():
            return
        try:
            # A close-delimited body ends here; a length or chunked one is cut short.
            parser.feed_eof()
        except Exception as cut:
            payload.set_exception(aiohttp.ClientPayloadError(f"upstream answer cut short: {cut}"))
            return
        if not payload.is_eof():
            payload.set_exception(aiohttp.ClientPayloadError("upstream closed the connection mid-answer"))

    def resume_reading(self, resume_parser: bool = True) -> None:
        """The caller drained the answer's buffer: the read timeout counts from now again."""
        self.last_read = self._loop.time()
        super().resume_reading(resume_parser)

    @property
    def reading_paused(self) -> bool:
        """Whether we paused reading the upstream because the caller is slow."""
        return self._reading_paused

    def begin(self, parser: HttpResponseParser) -> asyncio.Future[RawResponseMessage]:
        """Start an exchange: the head future the answer resolves."""
        self._parser = parser
        self.message = None
        self.payload = None
        self.got_data = False
        self.last_read = self._loop.time()
        head: asyncio.Future[RawResponseMessage] = self._loop.create_future()
        self.head = head
        return head

    def arm_read(self, timeout: float) -> None:
        """Start the read timeout of the exchange in flight: ``timeout`` seconds without a byte fail it."""
        loop = self._loop
        self.last_read = loop.time()
        self.read_timeout = timeout
        self.read_armed = True
        if self._read_timer is None:
            self._read_timer = loop.call_at(self.last_read + timeout, self._on_read_timer)

    def _on_read_timer(self) -> None:
        self._read_timer = None
        if not self.read_armed or self.closed:
            return  # idle, or the exchange ended: the next exchange arms it again
        payload = self.payload
        if payload is not None and payload.is_eof():
            return  # the answer is all in; the caller reads at its own pace
        loop = self._loop
        now = loop.time()
        if self._reading_paused:
            # We paused the upstream (the caller is slow): not the upstream's silence.
            self._read_timer = loop.call_at(now + self.read_timeout, self._on_read_timer)
            return
        due = self.last_read + self.read_timeout
        if now < due:
            self._read_timer = loop.call_at(due, self._on_read_timer)
            return
        self.fail(aiohttp.SocketTimeoutError("upstream sent nothing within the read timeout"))

    def finish(self) -> None:
        """End the exchange; the connection is idle (or closed) from here on."""
        self.read_armed = False
        self._parser = None
        self.head = None
        self.message = None
        self.payload = None

    def reusable(self) -> bool:
        """The answer arrived whole, was read whole, and neither side asked to close."""
        message = self.message
        payload = self.payload
        return (
            not self.closed
            and message is not None
            and not message.should_close
            and payload is not None
            and payload.at_eof()
            and not self._reading_paused
        )

    def fail(self, exc: BaseException) -> None:
        """Fail the exchange in flight with ``exc`` and close the connection."""
        head = self.head
        if head is not None and not head.done():
            head.set_exception(exc)
        else:
            payload = self.payload
            if payload is not None and not payload.is_eof():
                payload.set_exception(exc)
        self.close()

    def close(self) -> None:
        """Close the connection now (the exchange in flight, if any, sees it as lost)."""
        self.closed = True
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None
        if self.transport is not None:
            self.transport.close()

    async def drain(self) -> None:
        """Wait until the transport's write buffer is below its high-water mark again."""
        await self._drain_helper()
