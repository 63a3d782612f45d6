"""Extraction: a matched request (and its response) → the order facts its rule points at.

Everything here works on plain values: a method, a raw path and query, a header lookup and
body bytes. Bodies are parsed only when they are JSON and no larger than the cap; what is
forwarded is never what was parsed, but the bytes as received.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Final, Protocol
from urllib.parse import parse_qsl

import orjson

from mes_trace_proxy.core.rules import RouteMatch, Source, SourceKind

__all__ = [
    "MAX_VALUE_LENGTH",
    "HeaderLookup",
    "OrderFacts",
    "is_json_content_type",
    "read_pointer",
    "request_facts",
    "response_facts",
]

# Ids and status names are short tokens; anything longer is not an id and would only bloat
# spans (and could smuggle a body fragment into telemetry).
MAX_VALUE_LENGTH: Final = 128

# RFC 6901 §4: array-index = %x30 / ( %x31-39 *(%x30-39) )
_ARRAY_INDEX: Final = re.compile(r"0|[1-9][0-9]*")


class HeaderLookup(Protocol):
    """Case-insensitive header access (aiohttp's ``CIMultiDictProxy``, or a lower-cased dict)."""

    def get(self, key: str, /) -> str | None: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class OrderFacts:
    """What a call says about an order (values not yet redacted)."""

    order_id: str | None = None
    #: the status the call sets
    status: str | None = None
    #: the status MES reported in its response
    observed_status: str | None = None


NO_FACTS: Final = OrderFacts()


def is_json_content_type(value: str | None) -> bool:
    """True for ``application/json`` and ``application/*+json`` (RFC 6839 §3.1), any parameters."""
    if not value:
        return False
    media = value.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


# A run of 19 digits, found as 19 zeros once every digit is a zero: two C-speed passes, where
# a regular expression walks the body in Python's engine at several times the cost. Shorter
# runs are integers orjson reads exactly (it keeps 64 bits).
_DIGITS_AS_ZERO: Final = bytes.maketrans(b"123456789", b"000000000")
_LONG_DIGITS: Final = b"0" * 19


def _parse_json(body: bytes | None) -> object:
    """Parse a body; ``None`` for anything that is not JSON (never raises).

    orjson reads the usual body about four times as fast as the standard library, whose
    reading is the contract: what orjson refuses (UTF-16 and UTF-32 bodies, a UTF-8 BOM,
    ``NaN``, lone surrogates) goes to ``json.loads``, and so does a body with a run of 19
    digits or more, since orjson would quietly read an integer past 64 bits as a float.
    """
    if not body:
        return None
    if _LONG_DIGITS not in body.translate(_DIGITS_AS_ZERO):
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            pass
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        # ValueError covers JSONDecodeError and UnicodeDecodeError; RecursionError a body
        # nested deeper than the interpreter's limit. Either way: not an order we can read.
        return None


def read_pointer(document: object, pointer: tuple[str, ...]) -> object:
    """Evaluate an RFC 6901 pointer; ``None`` where it does not resolve (§7 leaves that to us)."""
    current = document
    for token in pointer:
        if isinstance(current, dict):
            if token not in current:
                return None
            current = current[token]
        elif isinstance(current, list):
            # §4: array indexes are ASCII decimal without leading zeros; '-' names no element.
            # str.isdigit() would also accept superscript and Arabic-Indic digits. An index
            # longer than the length's digits is out of range, and int() of 5000 digits raises.
            if _ARRAY_INDEX.fullmatch(token) is None or len(token) > len(str(len(current))):
                return None
            index = int(token)
            if index >= len(current):
                return None
            current = current[index]
        else:
            return None
    return current


def _scalar(value: object) -> str | None:
    """Only scalars become facts; objects and arrays are never exported."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = value
    elif isinstance(value, int | float):
        text = str(value)
    else:
        return None
    if not text or len(text) > MAX_VALUE_LENGTH:
        return None
    return text


def _query_value(raw_query: str, name: str) -> str | None:
    if not raw_query:
        return None
    for key, value in parse_qsl(raw_query, keep_blank_values=False):
        if key == name:
            return value
    return None


class _Inputs:
    """The parsed inputs of one side, so a body is parsed at most once per call."""

    __slots__ = ("_body", "_doc", "_parsed", "headers", "match", "raw_query")

    def __init__(self, match: RouteMatch, raw_query: str, headers: HeaderLookup, body: bytes | None) -> None:
        self.match = match
        self.raw_query = raw_query
        self.headers = headers
        self._body = body
        self._doc: object = None
        self._parsed = False

    def document(self) -> object:
        if not self._parsed:
            self._doc = _parse_json(self._body)
            self._parsed = True
        return self._doc


def _read(source: Source | None, request: _Inputs, response: _Inputs | None) -> str | None:
    if source is None:
        return None
    kind = source.kind
    if kind is SourceKind.CONST:
        return source.value
    if kind is SourceKind.PATH:
        return _scalar(request.match.param(source.name))
    if kind is SourceKind.QUERY:
        return _scalar(_query_value(request.raw_query, source.name))
    if kind is SourceKind.HEADER:
        return _scalar(request.headers.get(source.name))
    if kind is SourceKind.BODY:
        return _scalar(read_pointer(request.document(), source.pointer))
    if response is None:
        return None
    if kind is SourceKind.RESPONSE:
        return _scalar(read_pointer(response.document(), source.pointer))
    return _scalar(response.headers.get(source.name))  # RESPONSE_HEADER


def request_facts(
    match: RouteMatch, *, raw_query: str, headers: HeaderLookup, body: bytes | None
) -> OrderFacts:
    """Facts known before the call is forwarded.

    Args:
        match: the matched rule and path parameters.
        raw_query: the query string as received, without ``?``.
        headers: the request headers.
        body: the request body when the rule reads it and it is JSON under the cap, else ``None``.

    Returns:
        The order id and the status the call sets, where the rule's sources resolve.
    """
    rule = match.rule
    if rule.order_id is None and rule.status is None:
        return NO_FACTS
    inputs = _Inputs(match, raw_query, headers, body)
    return OrderFacts(order_id=_read(rule.order_id, inputs, None), status=_read(rule.status, inputs, None))


def response_facts(
    match: RouteMatch,
    before: OrderFacts,
    *,
    raw_query: str,
    request_headers: HeaderLookup,
    response_headers: HeaderLookup,
    response_body: bytes | None,
) -> OrderFacts:
    """Facts once the response is known: the observed status, and ids only the response names.

    Args:
        match: the matched rule.
        before: what :func:`request_facts` returned.
        raw_query: the request's query string.
        request_headers: the request headers.
        response_headers: the response headers.
        response_body: the response body when the rule reads it and it is JSON under the cap.

    Returns:
        ``before`` completed with the response's values.
    """
    rule = match.rule
    needs_id = before.order_id is None and rule.order_id is not None and rule.order_id.kind in _RESPONSE_KINDS
    needs_status = before.status is None and rule.status is not None and rule.status.kind in _RESPONSE_KINDS
    if rule.observed_status is None and not needs_id and not needs_status:
        return before
    request = _Inputs(match, raw_query, request_headers, None)
    response = _Inputs(match, "", response_headers, response_body)
    return OrderFacts(
        order_id=_read(rule.order_id, request, response) if needs_id else before.order_id,
        status=_read(rule.status, request, response) if needs_status else before.status,
        observed_status=_read(rule.observed_status, request, response),
    )


_RESPONSE_KINDS: Final = frozenset({SourceKind.RESPONSE, SourceKind.RESPONSE_HEADER})
