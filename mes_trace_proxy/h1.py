"""HTTP/1.1 message framing, sans I/O: the heads and chunks the proxy writes, and where a read ends.

One place for the framing both sides of the proxy write: the listeners' answers
(:func:`response_head`, used by ``http1.py``) and the requests sent upstream
(:func:`request_head`, used by ``upstream.py``), the chunked coding of a body whose length is
not known (:func:`chunk`, :data:`LAST_CHUNK`), and the one question the listener's head timer
asks of a read the parser consumed whole (:func:`head_pending`). Parsing stays aiohttp's (its
C parser); this module only writes, and reads nothing but the bytes it is given.

Field values are sent exactly as given: ``surrogateescape`` gives back the bytes a non-UTF-8
field arrived with, and nothing here adds, folds or drops a field except the framing ones it
names (RFC 9112 §6: one framing per message).
"""

from __future__ import annotations

from collections.abc import Iterable
from http import HTTPStatus
from typing import Final

__all__ = [
    "CHUNKED",
    "CONTINUE",
    "LAST_CHUNK",
    "LENGTH",
    "NO_BODY",
    "TO_CLOSE",
    "chunk",
    "head_again",
    "head_pending",
    "request_head",
    "response_head",
]

#: The body framing a head chose (:func:`response_head`): none at all (HEAD, 1xx, 204, 304) ...
NO_BODY: Final = 0
#: ... a ``Content-Length`` (given, or the fields' own) ...
LENGTH: Final = 1
#: ... the chunked coding (HTTP/1.1, length unknown) ...
CHUNKED: Final = 2
#: ... or the end of the connection (HTTP/1.0, length unknown).
TO_CLOSE: Final = 3

#: RFC 9110 §10.1.1: the interim answer that invites a held-back body.
CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
#: RFC 9112 §7.1: the last chunk and the empty trailer section.
LAST_CHUNK: Final = b"0\r\n\r\n"

_REASONS: Final = {status.value: status.phrase for status in HTTPStatus}
# RFC 9110 §6.4.1 and §15.2: answers that never carry content, whatever their fields say.
_NO_BODY_STATUSES: Final = frozenset({204, 304})
# Methods for which a request without a body carries no Content-Length (aiohttp's client
# sends ``0`` for the rest, and MES's servers were tested against that).
_BODYLESS_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS", "CONNECT", "TRACE"})
_BLANK_LINE: Final = b"\r\n\r\n"
# Empty lines a client may send between messages (RFC 9112 §2.2) that are not a head begun.
_MAX_STRAY_CRLF: Final = 8


def response_head(
    status: int,
    reason: str | None,
    headers: Iterable[tuple[str, str]],
    *,
    length: int | None,
    head_request: bool,
    http11: bool,
    close: bool,
    date: str,
) -> tuple[bytes, int, bool]:
    """The status line and fields of an answer, and the framing of the body that follows.

    Args:
        status: the status code.
        reason: the reason phrase (``None``: the standard one).
        headers: the fields, in order, sent as they are (a repeated ``Content-Length`` once).
        length: the body's length when the whole body is in hand; it replaces the value of a
            ``Content-Length`` field, in that field's place. ``None``: the fields' own
            ``Content-Length`` frames the body, else chunked coding (HTTP/1.1) or the end of
            the connection (HTTP/1.0) does.
        head_request: the request was ``HEAD`` (the answer has no body).
        http11: the request was HTTP/1.1 or later (else HTTP/1.0).
        close: the connection closes after this answer.
        date: the ``Date`` value to add when the fields carry none (RFC 9110 §6.6.1).

    Returns:
        ``(head, framing, close)``: the bytes, one of :data:`NO_BODY`, :data:`LENGTH`,
        :data:`CHUNKED`, :data:`TO_CLOSE`, and whether the connection closes after it
        (``close``, or a body only the end of the connection can frame).
    """
    no_body = head_request or status in _NO_BODY_STATUSES or status < 200
    framed = length is not None and not no_body
    lines = [f"HTTP/1.1 {status} {reason or _REASONS.get(status, 'Unknown')}\r\n"]
    has_length = False
    has_date = False
    for name, value in headers:
        if len(name) == 14 and name.lower() == "content-length":
            if has_length:
                continue  # one length only (a repeated field said the same, or was refused)
            has_length = True
            if framed:
                value = str(length)
        elif len(name) == 4 and name.lower() == "date":
            has_date = True
        lines.append(f"{name}: {value}\r\n")
    if not has_date:
        lines.append(f"Date: {date}\r\n")
    framing = LENGTH
    if no_body:
        framing = NO_BODY
    elif framed and not has_length:
        lines.append(f"Content-Length: {length}\r\n")
    elif not has_length and length is None:
        if http11:
            framing = CHUNKED
            lines.append("Transfer-Encoding: chunked\r\n")
        else:
            framing = TO_CLOSE
            close = True
    if close:
        lines.append("Connection: close\r\n\r\n")
    elif not http11:
        lines.append("Connection: keep-alive\r\n\r\n")
    else:
        lines.append("\r\n")
    return "".join(lines).encode("utf-8", "surrogateescape"), framing, close


def request_head(
    method: str, target: str, headers: Iterable[tuple[str, str]], *, has_body: bool, length: int | None
) -> tuple[bytes, bool]:
    """The request line and fields of a request sent upstream, and whether its body is chunked.

    Args:
        method: the method, sent as is.
        target: the origin-form request target, sent as is.
        headers: the fields, in order, sent as they are.
        has_body: the request carries a body.
        length: the body's length when it is in hand (``None``: a stream of unknown length).

    Returns:
        ``(head, chunked)``. A ``Content-Length`` among ``headers`` frames the body as given;
        otherwise one is added for a body in hand (``0`` for no body, except for the methods
        that never carry one) and a stream goes chunked.
    """
    lines = [f"{method} {target} HTTP/1.1\r\n"]
    has_length = False
    for name, value in headers:
        if not has_length and len(name) == 14 and name.lower() == "content-length":
            has_length = True
        lines.append(f"{name}: {value}\r\n")
    chunked = False
    if not has_length:
        if not has_body:
            if method not in _BODYLESS_METHODS:
                lines.append("Content-Length: 0\r\n")
        elif length is not None:
            lines.append(f"Content-Length: {length}\r\n")
        else:
            chunked = True
            lines.append("Transfer-Encoding: chunked\r\n")
    lines.append("\r\n")
    return "".join(lines).encode("utf-8", "surrogateescape"), chunked


def chunk(data: bytes) -> tuple[bytes, bytes, bytes]:
    """One chunk of a chunked body (RFC 9112 §7.1), as pieces for ``writelines``; ``data`` is not empty."""
    return b"%x\r\n" % len(data), data, b"\r\n"


def head_again(
    method: str, target: str, version: tuple[int, int], raw_headers: Iterable[tuple[bytes, bytes]]
) -> bytes:
    """A request head written again as it arrived: the parser's exact name and value bytes.

    For the WebSocket hand-off: the server the connection goes to parses the head itself.
    """
    head = b"%s %s HTTP/%d.%d\r\n" % (
        method.encode("ascii"),
        target.encode("utf-8", "surrogateescape"),
        version[0],
        version[1],
    )
    return head + b"".join(name + b": " + value + b"\r\n" for name, value in raw_headers) + b"\r\n"


def head_pending(data: bytes, before: bytes, body_in_read: int | None, *, head_in_read: bool) -> bool:
    """Whether a read that completed a message also began the next head (a pipelined one).

    The parser consumes a read whole; when its last message ended inside the read, what came
    after is the start of the next request's head, and the head timer must run for it.

    Args:
        data: the read.
        before: the last bytes of the reads before it (up to 4; only needed when ``data`` is
            shorter than the blank line that ends a head).
        body_in_read: how many bytes of the last message's body were in this read when the
            body was framed by ``Content-Length``; ``None`` when the message ends with an
            empty line (no body, or chunked with its trailer section).
        head_in_read: the last message's head ended in this read.

    Returns:
        ``True`` when bytes other than empty lines follow the last complete message.
    """
    if body_in_read is None:
        if len(data) < len(_BLANK_LINE):
            data = before + data
        return not data.endswith(_BLANK_LINE) and bool(data.rstrip(b"\r\n"))
    if not head_in_read:
        return bool(data[body_in_read:].strip(b"\r\n"))
    end = len(data) - body_in_read
    # The body ends the read when the head's blank line is right before it; empty lines a
    # client sends after a body (RFC 9112 §2.2 asks servers to ignore one) are not a head.
    stray = len(data) - len(data.rstrip(b"\r\n"))
    for extra in range(min(stray, _MAX_STRAY_CRLF) + 1):
        if data.endswith(_BLANK_LINE, 0, end - extra):
            return False
    return True
