"""The proxy listeners' HTTP/1.1 server: asyncio protocols around aiohttp's C request parser.

aiohttp's ``web.Server`` builds a ``BaseRequest``, a ``StreamResponse``, a payload writer and a
task for every request, and adds ``Server``, ``Date`` and ``Content-Type`` fields to answers.
The proxy needs none of that: it has one handler, relays an upstream's head as it came, and pays
for every microsecond on every MES call (docs/performance.md). Here each connection is one
protocol object and one task that serves its requests in order; a request is a slotted view of
the parser's message (``incoming.py``), and an answer is written as bytes (``h1.py`` frames it).

What a caller sees is what aiohttp's server gave it, minus the fields it added:

- the parser, its limits (request line, header field, header count) and its refusals are
  aiohttp's: 414/431/400 come back as problem+json and the connection closes;
- a head that takes longer than ``header_read_timeout`` gets 408 (slow-loris), counted from its
  first byte, or from the accept for a connection that has sent nothing yet (which is closed
  without an answer); a request body that stops arriving for ``body_read_timeout`` gets 408;
  an idle keep-alive connection closes after ``idle_timeout``;
- beyond ``max_connections`` the longest-idle connection (keep-alive, or one that has sent
  nothing) is closed to admit a new one; only when none is idle is the new one answered 503
  with ``Retry-After`` and closed; ``max_connections_per_client`` caps one source address;
- pipelined requests are answered in order; past :data:`MAX_QUEUED` parsed ahead, reading
  pauses until the handler catches up (back-pressure, never a dropped answer); a caller that
  hangs up cancels its handler (and with it the upstream call);
- a WebSocket upgrade is handed, connection and all, to aiohttp's own server (the relay in
  ``websocket.py`` is built on aiohttp's WebSocket classes; it is rare and long-lived, so its
  per-request cost does not matter);
- on shutdown, listening stops, idle connections close, in-flight requests get the grace period
  and are cancelled after it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Final

from mes_trace_proxy.config import Limits
from mes_trace_proxy.connection import Connection
from mes_trace_proxy.incoming import DateField, IncomingRequest
from mes_trace_proxy.limits import (
    OVERLOADED_ANSWER,
    TIMEOUT_ANSWER,
    Admission,
    GuardedServer,
    Refusals,
)
from mes_trace_proxy.problems import ClientRejection

__all__ = ["Handler", "Http1Server", "IncomingRequest"]

# Kept for the benchmark's stand-ins (bench/handler.py).
_DateField = DateField

#: One request, answered by writing to it; raising after the head went out closes the connection.
Handler = Callable[[IncomingRequest], Awaitable[None]]


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
        self.date = DateField()
        self.connections: set[Connection] = set()
        #: refusals by problem slug (503, 408, 400, 414, 431): the listener's share of /metrics
        self.refusals = Refusals()
        self.admission = Admission(limits, self.refusals)
        #: connections given to ``upgrade_server`` (WebSocket)
        self.handed_off = 0
        self.overloaded_answer: Final = OVERLOADED_ANSWER
        self.timeout_answer: Final = TIMEOUT_ANSWER

    @property
    def open_connections(self) -> int:
        """Connections open now: served here, and handed to the WebSocket relay."""
        return len(self.connections) + self.upgrade_server.open_connections

    @property
    def refused_connections(self) -> int:
        """Connections answered 503 (the listener's cap, or a caller's share of it)."""
        return self.refusals.get(ClientRejection.SERVICE_UNAVAILABLE)

    @property
    def head_timeouts(self) -> int:
        """Heads (and bodies) not read in time, and connections that sent nothing in time."""
        return self.refusals.get(ClientRejection.REQUEST_TIMEOUT)

    @property
    def parse_refusals(self) -> int:
        """Heads the parser refused (400, 414, 431)."""
        return self.refusals.parse_refusals()

    def __call__(self) -> Connection:
        """A protocol for one new connection."""
        return Connection(self)

    def admit(self, conn: Connection) -> bytes | None:
        """``None`` to serve a new connection, else the 503 to answer it with (see :class:`Admission`)."""
        answer, evicted = self.admission.admit(conn, self.open_connections, self.connections)
        if evicted is not None:
            self.release(evicted)  # type: ignore[arg-type]
        if answer is None:
            self.connections.add(conn)
        return answer

    def release(self, conn: Connection) -> None:
        """A connection closed (or went to the WebSocket relay): its place is free."""
        if conn in self.connections:
            self.connections.discard(conn)
            self.admission.release(conn)

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
