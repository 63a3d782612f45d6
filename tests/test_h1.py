"""The sans-I/O HTTP/1.1 codec: tables of heads, chunks and read boundaries, no sockets.

What the listeners and the upstream client put on the wire is checked here field by field,
and against aiohttp's own parser reading it back (the reference the proxy's peers use).
"""

from __future__ import annotations

import asyncio

import pytest
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http import HttpRequestParser, HttpResponseParser

from mes_trace_proxy import h1

DATE = "Mon, 07 Dec 2026 16:00:00 GMT"


def _head(
    status: int = 200,
    headers: tuple[tuple[str, str], ...] = (),
    *,
    length: int | None = None,
    head_request: bool = False,
    http11: bool = True,
    close: bool = False,
) -> tuple[list[str], int, bool]:
    raw, framing, closes = h1.response_head(
        status,
        None,
        headers,
        length=length,
        head_request=head_request,
        http11=http11,
        close=close,
        date=DATE,
    )
    assert raw.endswith(b"\r\n\r\n")
    return raw.decode().split("\r\n")[:-2], framing, closes


@pytest.mark.parametrize(
    ("kwargs", "lines", "framing", "closes"),
    [
        (
            {"length": 2},
            ["HTTP/1.1 200 OK", f"Date: {DATE}", "Content-Length: 2"],
            h1.LENGTH,
            False,
        ),
        (
            {"length": 5, "headers": (("X-A", "1"), ("content-length", "99"), ("Content-Length", "7"))},
            ["HTTP/1.1 200 OK", "X-A: 1", "content-length: 5", f"Date: {DATE}"],
            h1.LENGTH,
            False,
        ),
        (
            {"headers": (("Content-Length", "12"),)},
            ["HTTP/1.1 200 OK", "Content-Length: 12", f"Date: {DATE}"],
            h1.LENGTH,
            False,
        ),
        (
            {},
            ["HTTP/1.1 200 OK", f"Date: {DATE}", "Transfer-Encoding: chunked"],
            h1.CHUNKED,
            False,
        ),
        (
            {"http11": False},
            ["HTTP/1.1 200 OK", f"Date: {DATE}", "Connection: close"],
            h1.TO_CLOSE,
            True,
        ),
        (
            {"http11": False, "length": 0},
            ["HTTP/1.1 200 OK", f"Date: {DATE}", "Content-Length: 0", "Connection: keep-alive"],
            h1.LENGTH,
            False,
        ),
        (
            {"length": 3, "head_request": True, "headers": (("Content-Length", "3"),)},
            ["HTTP/1.1 200 OK", "Content-Length: 3", f"Date: {DATE}"],
            h1.NO_BODY,
            False,
        ),
        ({"status": 204}, ["HTTP/1.1 204 No Content", f"Date: {DATE}"], h1.NO_BODY, False),
        ({"status": 304, "length": 9}, ["HTTP/1.1 304 Not Modified", f"Date: {DATE}"], h1.NO_BODY, False),
        ({"status": 103}, ["HTTP/1.1 103 Early Hints", f"Date: {DATE}"], h1.NO_BODY, False),
        (
            {"status": 599, "length": 0, "headers": (("date", "then"),), "close": True},
            ["HTTP/1.1 599 Unknown", "date: then", "Content-Length: 0", "Connection: close"],
            h1.LENGTH,
            True,
        ),
    ],
    ids=[
        "length-added",
        "length-replaced-in-place-once",
        "fields-own-length",
        "chunked-1.1",
        "to-close-1.0",
        "keep-alive-1.0",
        "head",
        "204",
        "304",
        "1xx",
        "unknown-status-date-kept-close",
    ],
)
def test_response_heads(kwargs: dict[str, object], lines: list[str], framing: int, closes: bool) -> None:
    """Each answer gets one framing, a Date when it lacks one, and the connection header it needs."""
    assert _head(**kwargs) == (lines, framing, closes)  # type: ignore[arg-type]


def test_field_bytes_go_out_as_they_came() -> None:
    """A non-UTF-8 value (kept as surrogates by the parser) is written back byte for byte."""
    value = b"caf\xe9".decode("utf-8", "surrogateescape")
    raw, _, _ = h1.response_head(
        200, "Fine", (("X-Name", value),), length=0, head_request=False, http11=True, close=False, date=DATE
    )
    assert raw.startswith(b"HTTP/1.1 200 Fine\r\nX-Name: caf\xe9\r\n")


@pytest.mark.parametrize(
    ("method", "headers", "has_body", "length", "extra", "chunked"),
    [
        ("GET", (), False, None, [], False),
        ("DELETE", (), False, None, ["Content-Length: 0"], False),
        ("POST", (), True, 4, ["Content-Length: 4"], False),
        ("PUT", (), True, None, ["Transfer-Encoding: chunked"], True),
        ("POST", (("content-length", "4"),), True, None, [], False),
    ],
    ids=["get", "delete-no-body", "bytes", "stream", "callers-length"],
)
def test_request_heads(
    method: str,
    headers: tuple[tuple[str, str], ...],
    has_body: bool,
    length: int | None,
    extra: list[str],
    chunked: bool,
) -> None:
    """A request upstream carries exactly one framing: the caller's length, one added, or chunked."""
    raw, is_chunked = h1.request_head(
        method, "/a?b", (("Host", "mes"), *headers), has_body=has_body, length=length
    )
    lines = raw.decode().split("\r\n")
    assert lines[:2] == [f"{method} /a?b HTTP/1.1", "Host: mes"]
    assert lines[2:-2] == [f"{n}: {v}" for n, v in headers] + extra
    assert is_chunked is chunked


def test_chunks() -> None:
    """Chunk sizes are hex; the last chunk ends the body with an empty trailer section."""
    assert b"".join(h1.chunk(b"x" * 26)) == b"1a\r\n" + b"x" * 26 + b"\r\n"
    assert h1.LAST_CHUNK == b"0\r\n\r\n"


async def test_what_we_write_reads_back_through_aiohttps_parsers() -> None:
    """The reference parsers read our answers and requests back with the same bodies."""
    loop = asyncio.get_running_loop()
    protocol = BaseProtocol(loop)
    head, _, _ = h1.response_head(
        200, None, (), length=None, head_request=False, http11=True, close=False, date=DATE
    )
    wire = head + b"".join(h1.chunk(b"hello ")) + b"".join(h1.chunk(b"world")) + h1.LAST_CHUNK
    messages, _, _ = HttpResponseParser(protocol, loop, 2**16).feed_data(wire)
    assert await messages[0][1].read() == b"hello world"
    request, _ = h1.request_head("POST", "/x", (("Host", "mes"),), has_body=True, length=3)
    parsed, _, _ = HttpRequestParser(protocol, loop, 2**16).feed_data(request + b"abc")
    assert parsed[0][0].path == "/x"
    assert await parsed[0][1].read() == b"abc"


HEAD = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
POST = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\n"


@pytest.mark.parametrize(
    ("data", "before", "body_in_read", "head_in_read", "pending"),
    [
        (HEAD, b"", None, True, False),
        (HEAD + HEAD, b"", None, True, False),
        (HEAD + b"GET /b HT", b"", None, True, True),
        (HEAD + b"\r\n", b"", None, True, False),
        (b"\n", b"x\r\n\r", None, True, False),
        (b"\n", b"1\r\nH", None, True, True),
        (POST + b"abcd", b"", 4, True, False),
        (POST + b"ab\r\n\r\n", b"", 4, True, False),
        (POST + b"abcdGET /b", b"", 4, True, True),
        (POST + b"abcd\r\n", b"", 4, True, False),
        (b"cd", b"", 2, False, False),
        (b"cdGET", b"", 2, False, True),
        (b"cd\r\n", b"", 2, False, False),
        (POST[:-2], b"", None, True, True),
    ],
    ids=[
        "one-head",
        "two-heads",
        "partial-second-head",
        "stray-crlf",
        "blank-line-split-across-reads",
        "short-read-mid-head",
        "length-body-ends-read",
        "body-holding-a-blank-line",
        "head-after-body",
        "crlf-after-body",
        "body-from-earlier-read",
        "head-after-body-from-earlier-read",
        "crlf-after-body-from-earlier-read",
        "head-without-blank-line",
    ],
)
def test_head_pending(
    data: bytes, before: bytes, body_in_read: int | None, head_in_read: bool, pending: bool
) -> None:
    """Only bytes beyond the last complete message, other than empty lines, are a head begun."""
    assert h1.head_pending(data, before, body_in_read, head_in_read=head_in_read) is pending


def test_a_head_goes_again_as_it_came() -> None:
    """The hand-off rewrites the parser's exact bytes, spelling and all."""
    raw = h1.head_again("GET", "/live?x=%41", (1, 1), ((b"HoSt", b"mes"), (b"Upgrade", b"websocket")))
    assert raw == b"GET /live?x=%41 HTTP/1.1\r\nHoSt: mes\r\nUpgrade: websocket\r\n\r\n"
