"""A strict recording upstream: a raw asyncio HTTP/1.1 server that parses what reaches it by RFC 9112.

It stands in for the MES behind the proxy in the framing tests. Every message is recorded byte
for byte; anything a lenient server might read in two ways is a *violation*, recorded and
answered 400 with the connection closed:

- a request line or field line that is not exactly ``method SP target SP HTTP/1.x CRLF`` /
  ``token ":" OWS value OWS CRLF`` (RFC 9112 §3, §5): a bare CR or LF, NUL or another control
  in a value, whitespace before the colon, a folded line (obs-fold, §5.2);
- framing that is not exactly one of: one ``Content-Length`` of digits, ``Transfer-Encoding:
  chunked`` alone, or neither (RFC 9112 §6.1-§6.3), or a chunked body that is not well formed
  (§7.1), or a trailer section (the proxy never sends one);
- a hop-by-hop field (RFC 9110 §7.6.1) other than ``Connection``, or a name with ``_`` that a
  CGI/WSGI server would fold onto a framing, hop-by-hop or proxy-written field.

Well-formed requests get ``200`` with a JSON echo: the ``X-Request-Id`` they carried, the
method, target, body length and body hash, so a test can tell whose answer it got.

:func:`read_response` is the client side: one answer from a stream, framed as RFC 9112 §6.3
says, so tests can talk to the proxy over raw sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Final

from mes_trace_proxy.framing import HOP_BY_HOP, LOOKALIKES

__all__ = ["Answer", "Seen", "StrictUpstream", "read_response"]

MAX_HEAD: Final = 64 * 1024
_REQUEST_LINE: Final = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+) ([\x21-\x7e]+) HTTP/1\.[01]")
# RFC 9112 §5.1: field-name ":" OWS field-value OWS, the value VCHAR/obs-text with SP/HTAB inside.
_FIELD_LINE: Final = re.compile(
    rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*((?:[\x21-\x7e\x80-\xff](?:[ \t]*[\x21-\x7e\x80-\xff])*)?)[ \t]*"
)
_DIGITS: Final = re.compile(rb"[0-9]+")
_CHUNK_LINE: Final = re.compile(rb"([0-9A-Fa-f]+)(?:;[\x21-\x7e\t ]*)?")
_HOP_ALLOWED: Final = frozenset({"connection"})


class Violation(Exception):
    """What the upstream received could be read in more than one way."""


@dataclass(frozen=True, slots=True)
class Seen:
    """One well-formed request as it reached the upstream."""

    method: str
    target: str
    fields: tuple[tuple[str, str], ...]
    body: bytes
    #: ``length``, ``chunked`` or ``none``
    framing: str
    #: the exact bytes of the message, head and body as framed
    raw: bytes

    def header(self, name: str) -> str | None:
        """The first value of a field, case-insensitively."""
        for key, value in self.fields:
            if key.lower() == name.lower():
                return value
        return None

    def names(self) -> list[str]:
        """Every field name, lower-cased, in order."""
        return [key.lower() for key, _ in self.fields]


@dataclass(slots=True)
class StrictUpstream:
    """The server; ``async with StrictUpstream() as up`` binds 127.0.0.1 on a free port."""

    seen: list[Seen] = field(default_factory=list)
    #: (reason, the raw bytes read so far of the offending message)
    violations: list[tuple[str, bytes]] = field(default_factory=list)
    connections: int = 0
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def __aenter__(self) -> StrictUpstream:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, limit=MAX_HEAD)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        try:
            while True:
                raw = bytearray()
                try:
                    seen = await _read_request(reader, raw)
                except Violation as exc:
                    self.violations.append((str(exc), bytes(raw)))
                    writer.write(
                        b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    )
                    return
                if seen is None:
                    return
                self.seen.append(seen)
                writer.write(_echo(seen))
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            return
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


def _echo(seen: Seen) -> bytes:
    doc = {
        "id": seen.header("X-Request-Id"),
        "method": seen.method,
        "target": seen.target,
        "length": len(seen.body),
        "sha256": hashlib.sha256(seen.body).hexdigest(),
    }
    body = json.dumps(doc).encode()
    head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


async def _read_line(reader: asyncio.StreamReader, raw: bytearray) -> bytes:
    """One CRLF-terminated line, without the CRLF; a bare CR or LF inside is a violation."""
    line = await reader.readuntil(b"\r\n")
    raw += line
    line = line[:-2]
    if b"\r" in line or b"\n" in line:
        raise Violation("bare CR or LF")
    return line


async def _read_request(reader: asyncio.StreamReader, raw: bytearray) -> Seen | None:
    try:
        first = await _read_line(reader, raw)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise Violation("connection ended inside a request line") from None
        return None  # a clean close between requests
    match = _REQUEST_LINE.fullmatch(first)
    if match is None:
        raise Violation(f"bad request line {first[:60]!r}")
    fields = await _read_fields(reader, raw)
    framing, length = _framing(fields)
    if framing == "chunked":
        body = await _read_chunked(reader, raw)
    else:
        body = await reader.readexactly(length)
        raw += body
    return Seen(
        method=match.group(1).decode(),
        target=match.group(2).decode(),
        fields=tuple((n.decode("latin-1"), v.decode("latin-1")) for n, v in fields),
        body=body,
        framing=framing,
        raw=bytes(raw),
    )


async def _read_fields(reader: asyncio.StreamReader, raw: bytearray) -> list[tuple[bytes, bytes]]:
    fields: list[tuple[bytes, bytes]] = []
    while True:
        line = await _read_line(reader, raw)
        if not line:
            return fields
        if line[:1] in (b" ", b"\t"):
            raise Violation("folded line (obs-fold)")
        match = _FIELD_LINE.fullmatch(line)
        if match is None:
            raise Violation(f"bad field line {line[:60]!r}")
        name = match.group(1)
        lname = name.decode().lower()
        if lname in LOOKALIKES:
            raise Violation(f"lookalike field {lname!r}")
        if lname in HOP_BY_HOP and lname not in _HOP_ALLOWED and lname != "transfer-encoding":
            raise Violation(f"hop-by-hop field {lname!r}")
        fields.append((name, match.group(2)))


def _framing(fields: list[tuple[bytes, bytes]]) -> tuple[str, int]:
    lengths = [v for n, v in fields if n.lower() == b"content-length"]
    codings = [v for n, v in fields if n.lower() == b"transfer-encoding"]
    if lengths and codings:
        raise Violation("Content-Length and Transfer-Encoding")
    if len(codings) > 1 or (codings and codings[0].lower() != b"chunked"):
        raise Violation(f"Transfer-Encoding other than chunked alone: {codings!r}")
    if codings:
        return "chunked", 0
    if len(lengths) > 1 or (lengths and not _DIGITS.fullmatch(lengths[0])):
        raise Violation(f"Content-Length not one number: {lengths!r}")
    if lengths:
        return "length", int(lengths[0])
    return "none", 0


async def _read_chunked(reader: asyncio.StreamReader, raw: bytearray) -> bytes:
    body = bytearray()
    while True:
        line = await _read_line(reader, raw)
        match = _CHUNK_LINE.fullmatch(line)
        if match is None:
            raise Violation(f"bad chunk-size line {line[:40]!r}")
        size = int(match.group(1), 16)
        if size == 0:
            break
        data = await reader.readexactly(size + 2)
        raw += data
        if data[-2:] != b"\r\n":
            raise Violation("chunk data not followed by CRLF")
        body += data[:-2]
    if await _read_line(reader, raw):
        raise Violation("a trailer section")
    return bytes(body)


@dataclass(frozen=True, slots=True)
class Answer:
    """One answer as the client read it."""

    status: int
    fields: tuple[tuple[str, str], ...]
    body: bytes

    def header(self, name: str) -> str | None:
        """The first value of a field, case-insensitively."""
        for key, value in self.fields:
            if key.lower() == name.lower():
                return value
        return None

    @property
    def closes(self) -> bool:
        """The server said it closes the connection after this answer."""
        return (self.header("Connection") or "").lower() == "close"

    def echo_id(self) -> str | None:
        """The ``X-Request-Id`` the upstream echoed, if this is an echo."""
        if self.status != 200:
            return None
        doc = json.loads(self.body)
        value = doc.get("id") if isinstance(doc, dict) else None
        return value if isinstance(value, str) else None


async def read_response(reader: asyncio.StreamReader) -> Answer | None:
    """Read one answer (``None`` when the connection ended before one began)."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise
        return None
    lines = head[:-4].decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    fields = tuple((n, v.strip(" \t")) for n, _, v in (line.partition(":") for line in lines[1:]))
    answer = Answer(status, fields, b"")
    length = answer.header("Content-Length")
    if status < 200 or status in (204, 304):
        body = b""
    elif length is not None:
        body = await reader.readexactly(int(length))
    elif (answer.header("Transfer-Encoding") or "").lower() == "chunked":
        parts = bytearray()
        while True:
            size = int((await reader.readuntil(b"\r\n"))[:-2].split(b";")[0], 16)
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":
                    pass
                break
            parts += (await reader.readexactly(size + 2))[:-2]
        body = bytes(parts)
    else:
        body = await reader.read()
    return Answer(status, fields, body)
