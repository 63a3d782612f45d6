"""One request and its answer: what the handler reads of a parsed request, and the bytes it writes.

The requests are parsed by aiohttp's own parser from raw bytes; the connection is a recorder of
what would go on the wire (the socket side is tested in test_http1.py).
"""

from __future__ import annotations

import asyncio
import email.utils
from collections.abc import Iterable

import pytest
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http import HttpRequestParser

from mes_trace_proxy.wire.request import DateField, IncomingRequest


class _Server:
    def __init__(self) -> None:
        self.date = DateField()


class _Wire:
    """What IncomingRequest needs of its connection, recording every write."""

    def __init__(self, *, closing: bool = False) -> None:
        self.server = _Server()
        self.remote = "127.0.0.1"
        self.scheme = "http"
        self.closing = closing
        self.writing_paused = False
        self.transport = None
        self.sent = b""
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.sent += data

    def writelines(self, data: Iterable[bytes]) -> None:
        self.sent += b"".join(data)

    async def drain(self) -> None:
        return None

    def abort(self) -> None:
        self.aborted = True


def _request(raw: bytes, wire: _Wire) -> IncomingRequest:
    loop = asyncio.get_running_loop()
    messages, _, _ = HttpRequestParser(BaseProtocol(loop), loop, 2**16).feed_data(raw)
    message, payload = messages[0]
    return IncomingRequest(wire, message, payload)


async def test_what_the_handler_reads() -> None:
    """Host, a declared length (digits only), the content type, the caller's address."""
    wire = _Wire()
    request = _request(
        b"POST /a?b HTTP/1.1\r\nHost: mes:8080\r\nContent-Length: 3\r\n"
        b"Content-Type: application/json\r\n\r\nabc",
        wire,
    )
    assert (request.method, request.raw_path, request.host) == ("POST", "/a?b", "mes:8080")
    assert (request.content_length, request.content_type, request.remote) == (
        3,
        "application/json",
        "127.0.0.1",
    )
    assert request.body_exists
    assert await request.content.read() == b"abc"
    bare = _request(b"GET / HTTP/1.0\r\n\r\n", wire)
    assert (bare.host, bare.content_length, bare.body_exists) == (None, None, False)


async def test_chunked_is_read_from_the_parsed_message() -> None:
    """``chunked`` is a plain attribute: compiled handler code never reads the parser's message."""
    wire = _Wire()
    chunked = _request(
        b"POST / HTTP/1.1\r\nHost: mes\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", wire
    )
    declared = _request(b"POST / HTTP/1.1\r\nHost: mes\r\nContent-Length: 3\r\n\r\nabc", wire)
    assert (chunked.chunked, declared.chunked) == (True, False)
    assert await chunked.content.read() == b"abc"


@pytest.mark.parametrize(
    ("raw", "closing", "expect_close"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", False, False),
        (b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", False, True),
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", True, True),
    ],
    ids=["keep-alive", "caller-asked-close", "connection-closing"],
)
async def test_a_whole_answer_is_one_write(raw: bytes, closing: bool, expect_close: bool) -> None:
    """send() writes head and body at once; Connection: close when the caller or the proxy closes."""
    wire = _Wire(closing=closing)
    request = _request(raw, wire)
    request.send(200, None, [("X-A", "1")], b"hi")
    head, _, body = wire.sent.partition(b"\r\n\r\n")
    assert body == b"hi"
    assert b"Content-Length: 2" in head
    assert (b"Connection: close" in head) is expect_close
    assert request.close_after is expect_close
    assert request.started


async def test_a_streamed_answer_is_chunked_for_http11_and_closes_for_http10() -> None:
    """start/write/finish: chunks and the last chunk on HTTP/1.1; raw bytes and a close on HTTP/1.0."""
    wire = _Wire()
    request = _request(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", wire)
    await request.start(200, None, [])
    await request.write(b"abc")
    await request.write(b"")
    await request.finish()
    assert wire.sent.endswith(b"\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in wire.sent
    old = _Wire()
    request = _request(b"GET / HTTP/1.0\r\n\r\n", old)
    await request.start(200, None, [])
    await request.write(b"abc")
    await request.finish()
    assert old.sent.endswith(b"Connection: close\r\n\r\nabc")
    assert request.close_after


async def test_head_answers_carry_no_body_and_continue_and_close_now() -> None:
    """HEAD gets the head alone; close_now cuts the connection."""
    wire = _Wire()
    request = _request(b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n", wire)
    request.send(200, None, [("Content-Length", "42")], b"ignored")
    assert wire.sent.endswith(b"Content-Length: 42\r\nDate: " + wire.server.date.now().encode() + b"\r\n\r\n")
    request.close_now()
    assert wire.aborted
    assert request.close_after


def test_the_date_field_is_an_http_date_of_now() -> None:
    """RFC 9110 §5.6.7 IMF-fixdate, in GMT."""
    field = DateField()
    value = field.now()
    assert email.utils.parsedate_to_datetime(value).tzname() == "UTC"
    assert value.endswith(" GMT")
