"""A raw scripted HTTP/1.1 upstream on loopback, and a pool in front of it, for the lean client's tests.

The server answers each request with bytes the test scripts (or closes without answering),
so framing, keep-alive, retry, timeout and cancellation behaviour is seen on the wire. Used by
tests/wire/test_client.py, test_upstream_connection.py and test_upstream_failures.py; the
``scripted`` fixture is in tests/wire/conftest.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Final

from mes_trace_proxy.core.config import ListenerConfig
from mes_trace_proxy.wire.client import UpstreamPool
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
