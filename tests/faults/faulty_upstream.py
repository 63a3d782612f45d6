"""A purpose-built misbehaving upstream: a raw asyncio HTTP/1.1 server that fails on request.

The first path segment picks the behaviour (``/echo/...``, ``/hold/...``, ``/reset-mid/...``);
everything the server saw is counted per ``X-Request-Id`` so tests can prove that nothing
was lost or retried. Raw sockets, not aiohttp, so it can send exactly the broken bytes a
real network or a crashing MES sends: resets, truncated chunks, garbage, one byte at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import parse_qsl

__all__ = ["Arrival", "FaultyUpstream", "parse_response"]

# Bigger than any request head the proxy forwards (its limit is 16 KiB a field); a head past
# it ends the connection.
MAX_HEAD: Final = 256 * 1024
# Streamed bodies move in 64 KiB pieces, like the proxy's own reads.
PIECE: Final = 64 * 1024
REQUEST_ID: Final = b"x-request-id"


@dataclass(frozen=True, slots=True)
class Arrival:
    """One request head (and, for echo and scripted requests, body) as it reached the upstream."""

    method: str
    target: bytes
    headers: tuple[tuple[bytes, bytes], ...]
    head: bytes
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        """The first value of a header, case-insensitively."""
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None


class _Closed(Exception):
    """The peer went away before a whole request arrived."""


@dataclass(slots=True)
class FaultyUpstream:
    """The server and its counters. Bind with :meth:`bind`, serve with :meth:`start`.

    Between ``bind`` and ``start`` the port is reserved but refuses connections (a socket
    bound and not listening), which is exactly "the upstream is down"; ``start`` brings it
    up on the same port with no window for another process to take it.
    """

    host: str = "127.0.0.1"
    #: what a path whose first segment names no behaviour gets
    default: str = "echo"
    #: the raw response ``/scripted/`` paths answer with (property tests set it per example)
    script: bytes = b"HTTP/1.1 204 No Content\r\n\r\n"
    arrivals: list[Arrival] = field(default_factory=list)
    ids: Counter[str] = field(default_factory=Counter)
    #: behaviour name → how many of its requests the peer abandoned mid-way
    aborted: Counter[str] = field(default_factory=Counter)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    _sock: socket.socket | None = None
    _server: asyncio.Server | None = None
    _handlers: set[asyncio.Task[None]] = field(default_factory=set)

    # ── lifecycle ──────────────────────────────────────────────────────────────────────────
    def bind(self) -> int:
        """Reserve a loopback port (refusing connections until :meth:`start`); return it."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, 0))
        self._sock = sock
        return int(sock.getsockname()[1])

    @property
    def port(self) -> int:
        """The bound port."""
        assert self._sock is not None, "bind() first"
        return int(self._sock.getsockname()[1])

    @property
    def url(self) -> str:
        """``http://host:port``."""
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        """Start accepting on the bound port (binding one first if needed)."""
        if self._sock is None:
            self.bind()
        assert self._sock is not None
        self._sock.listen(1024)
        self._server = await asyncio.start_server(self._connection, sock=self._sock, limit=MAX_HEAD)

    async def aclose(self) -> None:
        """Stop accepting, release held requests and end every connection handler."""
        self.release.set()
        if self._server is not None:
            self._server.close()
        elif self._sock is not None:
            self._sock.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> FaultyUpstream:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # ── waiting ────────────────────────────────────────────────────────────────────────────
    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:  # noqa: ASYNC109
        """Wait until ``predicate()`` holds; it is re-checked whenever a counter changes."""
        async with self._changed, asyncio.timeout(timeout):
            await self._changed.wait_for(predicate)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    # ── serving ────────────────────────────────────────────────────────────────────────────
    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            while True:
                try:
                    arrival, framing = await _read_head(reader)
                except _Closed:
                    return
                behaviour = _behaviour(arrival.target, self.default)
                request_id = arrival.header(REQUEST_ID)
                if request_id is not None:
                    self.ids[request_id.decode("latin-1")] += 1
                await self._notify()
                handler = BEHAVIOURS[behaviour]
                try:
                    keep = await handler(self, arrival, framing, reader, writer)
                except (_Closed, ConnectionError, asyncio.IncompleteReadError):
                    self.aborted[behaviour] += 1
                    keep = False
                await self._notify()
                if not keep or writer.is_closing():
                    return
        finally:
            self._handlers.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()
            await self._notify()


_Behaviour = Callable[
    [FaultyUpstream, Arrival, "_Framing", asyncio.StreamReader, asyncio.StreamWriter], Awaitable[bool]
]


@dataclass(frozen=True, slots=True)
class _Framing:
    """How the request body is framed (RFC 9112 §6)."""

    length: int | None
    chunked: bool
    keep_alive: bool


def _behaviour(target: bytes, default: str) -> str:
    path = target.split(b"?", 1)[0]
    first = path.split(b"/", 2)[1] if path.count(b"/") >= 1 else b""
    name = first.decode("latin-1")
    return name if name in BEHAVIOURS else default


def _query(target: bytes) -> dict[str, str]:
    _, _, query = target.decode("latin-1").partition("?")
    return dict(parse_qsl(query))


async def _read_head(reader: asyncio.StreamReader) -> tuple[Arrival, _Framing]:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError) as exc:
        raise _Closed from exc
    lines = head[:-4].split(b"\r\n")
    method, target, _version = lines[0].split(b" ", 2)
    headers = tuple(
        (name.strip(), value.strip()) for name, _, value in (line.partition(b":") for line in lines[1:])
    )
    length: int | None = None
    chunked = False
    keep_alive = True
    for name, value in headers:
        lname = name.lower()
        if lname == b"content-length":
            length = int(value)
        elif lname == b"transfer-encoding" and value.lower() == b"chunked":
            chunked = True
        elif lname == b"connection" and b"close" in value.lower():
            keep_alive = False
    arrival = Arrival(method=method.decode("latin-1"), target=target, headers=headers, head=head, body=b"")
    return arrival, _Framing(length=length, chunked=chunked, keep_alive=keep_alive)


async def _iter_body(reader: asyncio.StreamReader, framing: _Framing) -> AsyncIterator[bytes]:
    """The body's pieces as they arrive; raises _Closed when the peer leaves first."""
    try:
        if framing.chunked:
            while True:
                size_line = await reader.readuntil(b"\r\n")
                size = int(size_line.split(b";", 1)[0], 16)
                if size == 0:
                    # Trailer section (RFC 9112 §7.1.2): lines until an empty one.
                    while await reader.readuntil(b"\r\n") != b"\r\n":
                        pass
                    return
                yield await reader.readexactly(size)
                await reader.readexactly(2)
        elif framing.length:
            remaining = framing.length
            while remaining:
                piece = await reader.read(min(PIECE, remaining))
                if not piece:
                    raise _Closed
                remaining -= len(piece)
                yield piece
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
        raise _Closed from exc


async def _read_body(reader: asyncio.StreamReader, framing: _Framing) -> bytes:
    return b"".join([piece async for piece in _iter_body(reader, framing)])


def _head(status: str, *fields: tuple[str, str]) -> bytes:
    lines = [f"HTTP/1.1 {status}", *(f"{name}: {value}" for name, value in fields)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _answer(status: str, body: bytes, *extra: tuple[str, str], keep_alive: bool = True) -> bytes:
    fields = [("Content-Length", str(len(body))), *extra]
    if not keep_alive:
        fields.append(("Connection", "close"))
    return _head(status, *fields) + body


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with an RST instead of a FIN: SO_LINGER on, zero seconds (socket(7))."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def _record(upstream: FaultyUpstream, arrival: Arrival, body: bytes) -> None:
    upstream.arrivals.append(
        Arrival(
            method=arrival.method,
            target=arrival.target,
            headers=arrival.headers,
            head=arrival.head,
            body=body,
        )
    )


# ── behaviours: each returns whether the connection may be kept alive ──────────────────────────
async def _echo(
    upstream: FaultyUpstream,
    arrival: Arrival,
    framing: _Framing,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
) -> bool:
    """200 with the request body as the response body and the request id echoed."""
    body = await _read_body(reader, framing)
    _record(upstream, arrival, body)
    request_id = (arrival.header(REQUEST_ID) or b"").decode("latin-1")
    writer.write(
        _answer(
            "200 OK",
            body,
            ("Content-Type", "application/octet-stream"),
            ("X-Request-Id", request_id),
            keep_alive=framing.keep_alive,
        )
    )
    await writer.drain()
    return framing.keep_alive


async def _scripted(
    upstream: FaultyUpstream,
    arrival: Arrival,
    framing: _Framing,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
) -> bool:
    """Record the request exactly, answer with ``upstream.script`` and close."""
    body = await _read_body(reader, framing)
    _record(upstream, arrival, body)
    writer.write(upstream.script)
    await writer.drain()
    return False


async def _hold(
    upstream: FaultyUpstream,
    arrival: Arrival,
    framing: _Framing,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
) -> bool:
    """Answer only once the test sets ``release``; a peer that leaves first counts as aborted."""
    body = await _read_body(reader, framing)
    _record(upstream, arrival, body)
    await upstream._notify()
    released = asyncio.ensure_future(upstream.release.wait())
    gone = asyncio.ensure_future(reader.read(1))  # b"" once the proxy closes the connection
    try:
        await asyncio.wait((released, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        released.cancel()
        if not gone.done():
            gone.cancel()
    if not upstream.release.is_set():
        raise _Closed
    request_id = (arrival.header(REQUEST_ID) or b"").decode("latin-1")
    writer.write(_answer("200 OK", b"released", ("X-Request-Id", request_id), keep_alive=False))
    await writer.drain()
    return False


async def _reset_before(
    upstream: FaultyUpstream,
    arrival: Arrival,
    framing: _Framing,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
) -> bool:
    """Read the request, then reset the connection without a byte of answer."""
    _record(upstream, arrival, await _read_body(reader, framing))
    _reset(writer)
    return False


async def _reset_mid(
    upstream: FaultyUpstream,
    arrival: Arrival,
    framing: _Framing,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
) -> bool:
    """Promise 100000 bytes, send 1000, then reset."""
    _record(upstream, arrival, await _read_body(reader, framing))
    writer.write(_head("200 OK", ("Content-Length", "100000")) + b"m" * 1000)
    await writer.drain()
    _reset(writer)
    return False


async def _truncated_chunked(
    upstream: FaultyUpstream,
    arrival: Arrival,
    framing: _Framing,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
) -> bool:
    """A chunked answer that stops after one chunk, with a clean FIN and no last chunk."""
    _record(upstream, arrival, await _read_body(reader, framing))
    writer.write(
        _head("200 OK", ("Transfer-Encoding", "chunked"), ("Content-Type", "text/plain")) + b"5\r\nhello\r\n"
    )
    await writer.drain()
    writer.close()
    return False


async def _slow_bytes(
    upstream: FaultyUpstream,
    arrival: Arrival,
    framing: _Framing,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
) -> bool:
    """The whole answer one byte at a time, ``gap`` seconds apart (query ``gap``, ``size``)."""
    _record(upstream, arrival, await _read_body(reader, framing))
    query = _query(arrival.target)
    gap = float(query.get("gap", "0.01"))
    body = bytes(range(48, 48 + int(query.get("size", "10"))))
    for byte in _answer("200 OK", body, keep_alive=False):
        writer.write(bytes((byte,)))
        await writer.drain()
        await asyncio.sleep(gap)
    return False


async def _garbage(
    upstream: FaultyUpstream,
    arrival: Arrival,
    framing: _Framing,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
) -> bool:
    """Answer with bytes that are not HTTP at all."""
    _record(upstream, arrival, await _read_body(reader, framing))
    writer.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
    await writer.drain()
    writer.close()
    return False


async def _sink(
    upstream: FaultyUpstream,
    arrival: Arrival,
    framing: _Framing,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
) -> bool:
    """Consume a body piece by piece without keeping it; a body cut short counts as aborted."""
    _record(upstream, arrival, b"")
    total = 0
    async for piece in _iter_body(reader, framing):
        total += len(piece)
    writer.write(_answer("200 OK", str(total).encode(), keep_alive=framing.keep_alive))
    await writer.drain()
    return framing.keep_alive


async def _stream(
    upstream: FaultyUpstream,
    arrival: Arrival,
    framing: _Framing,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
) -> bool:
    """Send ``size`` bytes (query) with a Content-Length; a reader that leaves counts as aborted."""
    _record(upstream, arrival, await _read_body(reader, framing))
    size = int(_query(arrival.target).get("size", "0"))
    writer.write(_head("200 OK", ("Content-Length", str(size)), ("Content-Type", "application/octet-stream")))
    block = bytes(range(256)) * (PIECE // 256)
    sent = 0
    while sent < size:
        if reader.at_eof():  # the proxy hung up: it cancelled the download
            raise _Closed
        piece = block[: min(PIECE, size - sent)]
        writer.write(piece)
        await writer.drain()
        sent += len(piece)
    return framing.keep_alive


BEHAVIOURS: Final[dict[str, _Behaviour]] = {
    "echo": _echo,
    "scripted": _scripted,
    "hold": _hold,
    "reset-before": _reset_before,
    "reset-mid": _reset_mid,
    "truncated-chunked": _truncated_chunked,
    "slow-bytes": _slow_bytes,
    "garbage": _garbage,
    "sink": _sink,
    "stream": _stream,
}


def parse_response(raw: bytes) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """Split a raw HTTP/1.1 response read until EOF into status, headers and de-chunked body."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    headers = [
        (name.strip(), value.strip()) for name, _, value in (line.partition(b":") for line in lines[1:])
    ]
    if any(n.lower() == b"transfer-encoding" and v.lower() == b"chunked" for n, v in headers):
        body = bytearray()
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";", 1)[0], 16)
            if size == 0:
                break
            body += rest[:size]
            rest = rest[size + 2 :]
        return status, headers, bytes(body)
    return status, headers, rest
