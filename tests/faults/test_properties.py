"""Property-based tests: trace-context parsing, rule matching and extraction, and byte-exactness
through a real proxy.

The byte-exactness property runs a real in-process proxy (``running()``) in front of the raw
faulty upstream, which records the request exactly as it came off the wire and answers with
exactly the bytes the example scripted.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Final
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from opentelemetry import trace
from opentelemetry.propagate import get_global_textmap

from mes_trace_proxy.cli import read_default_rules
from mes_trace_proxy.core.extract import MAX_VALUE_LENGTH, read_pointer, request_facts
from mes_trace_proxy.core.forwarding import HOP_BY_HOP
from mes_trace_proxy.core.rules import compile_rules, format_pointer, parse_pointer
from mes_trace_proxy.core.tracecontext import TrustPolicy, format_span_id, format_trace_id, traceresponse
from tests.conftest import MakeConfig, StartProxy
from tests.faults.faulty_upstream import FaultyUpstream, parse_response

BOUNDED: Final = settings(max_examples=200, deadline=None)
# Each example is a real round trip through two sockets; 50 keep it near a second.
THROUGH_PROXY: Final = settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
PROPAGATOR: Final = get_global_textmap()
W3C_TRACEPARENT: Final = re.compile(r"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}\Z")


# ── trace context ──────────────────────────────────────────────────────────────────────────
@BOUNDED
@given(
    trace_id=st.integers(min_value=1, max_value=2**128 - 1),
    span_id=st.integers(min_value=1, max_value=2**64 - 1),
    sampled=st.booleans(),
)
def test_traceparent_round_trip(trace_id: int, span_id: int, sampled: bool) -> None:
    """What the proxy formats (traceresponse, ids) parses back to the same context and re-injects as sent."""
    header = traceresponse(trace_id, span_id, sampled)
    assert header == f"00-{format_trace_id(trace_id)}-{format_span_id(span_id)}-0{int(sampled)}"
    context = trace.get_current_span(PROPAGATOR.extract({"traceparent": header})).get_span_context()
    assert (context.trace_id, context.span_id, context.trace_flags.sampled) == (trace_id, span_id, sampled)
    carrier: dict[str, str] = {}
    PROPAGATOR.inject(carrier, context=trace.set_span_in_context(trace.NonRecordingSpan(context)))
    assert carrier["traceparent"] == header


_HEADERISH = st.one_of(
    st.text(max_size=120),
    st.from_regex(r"[0-9a-fA-F\-]{0,70}", fullmatch=True),
    st.builds(
        lambda v, t, s, f: f"{v}-{t}-{s}-{f}",
        st.from_regex(r"[0-9a-f]{2}", fullmatch=True),
        st.from_regex(r"[0-9a-f]{30,34}", fullmatch=True),
        st.from_regex(r"[0-9a-f]{14,18}", fullmatch=True),
        st.from_regex(r"[0-9a-f]{1,3}", fullmatch=True),
    ),
)


@BOUNDED
@given(traceparent=_HEADERISH, tracestate=st.text(max_size=200), baggage=st.text(max_size=200))
def test_any_trace_headers_parse_without_raising(traceparent: str, tracestate: str, baggage: str) -> None:
    """Garbage traceparent, tracestate and baggage never raise; a context accepted from them is valid
    and formats as a W3C traceparent again."""
    carrier = {"traceparent": traceparent, "tracestate": tracestate, "baggage": baggage}
    context = trace.get_current_span(PROPAGATOR.extract(carrier)).get_span_context()
    if context.is_valid:
        assert context.trace_id
        assert context.span_id
        assert W3C_TRACEPARENT.match(
            traceresponse(context.trace_id, context.span_id, context.trace_flags.sampled)
        )
        assert traceparent.strip().lower()[3:35] == format_trace_id(context.trace_id)


_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
_networks = st.one_of(
    st.tuples(st.ip_addresses(v=4), st.integers(0, 32)),
    st.tuples(st.ip_addresses(v=6), st.integers(0, 128)),
).map(lambda t: ipaddress.ip_network(f"{t[0]}/{t[1]}", strict=False))


@BOUNDED
@given(network=_networks, address=st.ip_addresses(), text=st.text(max_size=60))
def test_trust_policy_never_raises_and_agrees_with_ipaddress(
    network: ipaddress.IPv4Network | ipaddress.IPv6Network,
    address: ipaddress.IPv4Address | ipaddress.IPv6Address,
    text: str,
) -> None:
    """Any peer text is judged without raising; an address is trusted exactly when it is in the
    network, both taken in canonical form (IPv4-mapped addresses and networks as their IPv4 selves)."""
    policy = TrustPolicy.from_cidrs([str(network)])
    assert policy.trusts(text) in (True, False)
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    canonical = mapped or address
    if isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= 96 and network.subnet_of(_MAPPED):
        network = ipaddress.IPv4Network(f"{network.network_address.ipv4_mapped}/{network.prefixlen - 96}")
    expected = canonical.version == network.version and canonical in network
    assert policy.trusts(str(address)) is expected


# ── rules and extraction ───────────────────────────────────────────────────────────────────
MES_RULES: Final = compile_rules(read_default_rules()["rule_sets"]["mes"], key="rule_sets.mes")  # type: ignore[index]
_ID_TEXT = st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=40)


@BOUNDED
@given(order_id=_ID_TEXT, status=_ID_TEXT, method=st.sampled_from(["PUT", "PATCH"]))
def test_any_order_id_and_status_are_read_back(order_id: str, status: str, method: str) -> None:
    """Whatever the order id (percent-encoded in the path) and the status (in a JSON body), the
    matching rule reads back exactly those values."""
    suffix = "/status" if method == "PUT" else ""
    path = f"/api/v1/orders/{quote(order_id, safe='')}{suffix}"
    match = MES_RULES.match(method, path)
    assert match is not None
    assert match.rule.route == "/api/v1/orders/{orderId}" + suffix
    body = json.dumps({"status": status, "customer": {"name": "x"}}).encode()
    facts = request_facts(match, raw_query="", headers={}, body=body)
    assert facts.order_id == (order_id if len(order_id) <= MAX_VALUE_LENGTH else None)
    assert facts.status == status


@BOUNDED
@given(path=st.text(max_size=80), method=st.sampled_from(["GET", "PUT", "POST", "PATCH", "DELETE", "X"]))
def test_matching_any_path_never_raises(path: str, method: str) -> None:
    """Any path either matches a rule whose template has as many segments, or matches nothing."""
    match = MES_RULES.match(method, path)
    if match is not None:
        assert path.count("/") == match.rule.route.count("/")
        assert match.rule.methods is None or method in match.rule.methods


@BOUNDED
@given(body=st.binary(max_size=300), query=st.text(max_size=60))
def test_extraction_from_any_body_never_raises(body: bytes, query: str) -> None:
    """Bytes that are not JSON, JSON of any shape, any query: extraction gives facts or None, never raises."""
    for method, path in (("PUT", "/api/v1/orders/A-1/status"), ("POST", "/api/v1/orders")):
        match = MES_RULES.match(method, path)
        assert match is not None
        facts = request_facts(match, raw_query=query, headers={"x-test": "1"}, body=body)
        for value in (facts.order_id, facts.status):
            assert value is None or 0 < len(value) <= MAX_VALUE_LENGTH


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=20,
)


@BOUNDED
@given(tokens=st.lists(st.text(max_size=8), max_size=6), leaf=_JSON)
def test_json_pointer_round_trip_and_lookup(tokens: list[str], leaf: object) -> None:
    """A pointer formats and parses back to its tokens (RFC 6901 escapes), and finds a value nested there."""
    assert parse_pointer(format_pointer(tokens)) == tuple(tokens)
    document: object = leaf
    for token in reversed(tokens):
        document = {token: document}
    assert read_pointer(document, tuple(tokens)) == leaf


@BOUNDED
@given(value=st.text(st.characters(exclude_categories=["Cs", "Cc"]), min_size=1, max_size=40))
def test_header_and_query_sources_read_any_value(value: str) -> None:
    """Rules reading a header or a query parameter get the value as sent (query percent-decoded)."""
    rules = compile_rules(
        [
            {
                "name": "h",
                "method": "GET",
                "route": "/h/{x}",
                "order_id": "header:X-Order",
                "status": "query:s",
            },
        ],
        key="rules",
    )
    match = rules.match("GET", "/h/1")
    assert match is not None
    facts = request_facts(
        match, raw_query=f"s={quote(value, safe='')}&t=1", headers={"x-order": value}, body=None
    )
    assert facts.order_id == value
    assert facts.status == value


# ── byte-exactness through a real proxy ────────────────────────────────────────────────────
TCHAR: Final = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
# What the proxy documents it may change in a request: hop-by-hop fields, Host, the
# forwarding fields and the trace context; the body's framing is the client library's.
REQUEST_OWNED: Final = HOP_BY_HOP | {
    "host",
    "content-length",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "forwarded",
    "traceparent",
    "tracestate",
    "baggage",
    "expect",
}
# ... and in a response: hop-by-hop fields, framing, and the trace ids it adds.
RESPONSE_OWNED: Final = HOP_BY_HOP | {"content-length", "traceresponse", "x-trace-id", "date"}
METHODS: Final = ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "PURGE", "REPORT")

_names = st.text(TCHAR, min_size=1, max_size=16)
_values = st.text(
    st.characters(min_codepoint=0x21, max_codepoint=0x7E) | st.characters(categories=["L"]),
    min_size=1,
    max_size=30,
).map(lambda v: v[:1] + v[1:-1].replace("~", " ") + v[-1:] if len(v) > 1 else v)  # inner spaces too
_segment = st.one_of(
    st.text(
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_~!$&'()*+,;=:@",
        min_size=1,
        max_size=10,
    ),
    st.text(st.characters(categories=["L", "N", "Zs"]), min_size=1, max_size=8).map(
        lambda t: quote(t, safe="")
    ),
).filter(lambda s: s != "..") | st.sampled_from(["", "."])  # empty and dot segments pass as they are
_query = st.lists(
    st.tuples(
        st.text("abcxyz_", max_size=5),
        st.text(st.characters(categories=["L", "N", "Zs"]), max_size=8),
    ),
    max_size=4,
).map(lambda pairs: "&".join(f"{k}={quote(v)}" for k, v in pairs))


@dataclass(frozen=True, slots=True)
class Exchange:
    """One generated request and the upstream's scripted answer."""

    method: str
    target: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    chunked: bool
    status: int
    reason: str
    response_headers: tuple[tuple[str, str], ...]
    response_body: bytes
    response_chunked: bool


def _header_lists(owned: frozenset[str]) -> st.SearchStrategy[tuple[tuple[str, str], ...]]:
    return st.lists(
        st.tuples(
            _names.filter(lambda n: n.lower() not in owned and not n.lower().startswith("proxy-")), _values
        ),
        max_size=6,
    ).map(tuple)


exchanges = st.builds(
    Exchange,
    method=st.sampled_from(METHODS),
    target=st.builds(
        lambda segs, q: "/scripted/" + "/".join(segs) + (f"?{q}" if q is not None else ""),
        st.lists(_segment, max_size=4),
        st.none() | _query,
    ),
    headers=_header_lists(frozenset(REQUEST_OWNED)),
    body=st.binary(max_size=2048),
    chunked=st.booleans(),
    status=st.sampled_from([200, 201, 202, 203, 206, 400, 401, 403, 404, 409, 418, 422, 429, 500, 502, 503]),
    reason=st.text("abcdefghij ", min_size=1, max_size=12).map(lambda r: r.strip() or "X"),
    response_headers=_header_lists(frozenset(RESPONSE_OWNED)),
    response_body=st.binary(max_size=2048),
    response_chunked=st.booleans(),
)


def _framed(body: bytes, chunked: bool) -> tuple[bytes, bytes]:
    if chunked:
        cut = len(body) // 2
        parts = [p for p in (body[:cut], body[cut:]) if p]
        return b"Transfer-Encoding: chunked\r\n", b"".join(
            b"%x\r\n%s\r\n" % (len(p), p) for p in parts
        ) + b"0\r\n\r\n"
    return b"Content-Length: %d\r\n" % len(body), body


def _lines(headers: tuple[tuple[str, str], ...]) -> bytes:
    return b"".join(f"{n}: {v}\r\n".encode() for n, v in headers)


def _fields(headers: tuple[tuple[str, str], ...]) -> list[tuple[bytes, bytes]]:
    """Fields as sent, names lower-cased: field names are case-insensitive (RFC 9110 §5.1), and
    aiohttp's parser re-spells well-known ones (``SERVER`` arrives as ``Server``)."""
    return [(n.lower().encode(), v.encode()) for n, v in headers]


def _kept(received: list[tuple[bytes, bytes]], owned: frozenset[str]) -> list[tuple[bytes, bytes]]:
    """The received fields the proxy does not own, names lower-cased, order and values as received."""
    return [(n.lower(), v) for n, v in received if n.decode("latin-1").lower() not in owned]


@dataclass(slots=True)
class Through:
    """The in-process proxy and the raw upstream it forwards to."""

    host: str
    port: int
    upstream: FaultyUpstream


@pytest.fixture
async def through(make_config: MakeConfig, start_proxy: StartProxy) -> AsyncIterator[Through]:
    """A real proxy in this process in front of the raw scripted upstream."""
    async with FaultyUpstream(default="scripted") as upstream:
        proxy = await start_proxy(make_config(upstream.url))
        host, port = proxy.listeners["ingress"]
        yield Through(host, port, upstream)


@THROUGH_PROXY
@given(exchange=exchanges)
async def test_requests_and_responses_pass_byte_exact(exchange: Exchange, through: Through) -> None:
    """Any method, path, query, headers and body (binary, empty, chunked or not) reach MES unchanged,
    and MES's status, reason, headers and body reach the caller unchanged, apart from the
    documented hop-by-hop, forwarding, trace and framing fields (field names compare without case)."""
    assume(not (exchange.method in {"GET", "OPTIONS"} and exchange.body))  # bodies on GET are not portable
    framing, payload = _framed(exchange.response_body, exchange.response_chunked)
    through.upstream.script = (
        f"HTTP/1.1 {exchange.status} {exchange.reason}\r\n".encode()
        + b"Date: Tue, 01 Dec 2026 10:00:00 GMT\r\nServer: mes\r\n"
        + _lines(exchange.response_headers)
        + framing
        + b"\r\n"
        + payload
    )
    request_framing, request_payload = _framed(exchange.body, exchange.chunked)
    request = (
        f"{exchange.method} {exchange.target} HTTP/1.1\r\nHost: caller.example\r\n".encode()
        + _lines(exchange.headers)
        + request_framing
        + b"Connection: close\r\n\r\n"
        + request_payload
    )
    before = len(through.upstream.arrivals)
    reader, writer = await asyncio.open_connection(through.host, through.port)
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(10):
            raw = await reader.read()
    finally:
        writer.close()
    (arrival,) = through.upstream.arrivals[before:]
    # The request as MES got it.
    assert arrival.method == exchange.method
    # The target byte for byte, an empty query ("/p?") included.
    assert arrival.target == exchange.target.encode()
    assert _kept(list(arrival.headers), REQUEST_OWNED) == _fields(exchange.headers)
    assert arrival.body == exchange.body
    # The response as the caller got it.
    status, headers, body = parse_response(raw)
    assert status == exchange.status
    assert raw.split(b"\r\n", 1)[0] == f"HTTP/1.1 {exchange.status} {exchange.reason}".encode()
    # Nothing is added to the answer's fields (no Server of ours, no default Content-Type): the
    # scripted upstream's own "Server: mes" comes first, then the generated fields, in order.
    assert _kept(headers, RESPONSE_OWNED) == [(b"server", b"mes"), *_fields(exchange.response_headers)]
    assert dict((n.lower(), v) for n, v in headers)[b"date"] == b"Tue, 01 Dec 2026 10:00:00 GMT"
    assert body == exchange.response_body


async def test_response_fields_that_are_not_utf8_keep_their_bytes(through: Through) -> None:
    """A Latin-1 byte in a field MES sends reaches the caller as that byte (no field is added either)."""
    through.upstream.script = (
        b"HTTP/1.1 200 OK\r\nDate: Tue, 01 Dec 2026 10:00:00 GMT\r\nX-Name: caf\xe9\r\n"
        b"Content-Length: 2\r\n\r\nok"
    )
    reader, writer = await asyncio.open_connection(through.host, through.port)
    try:
        writer.write(b"GET /scripted/latin1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        await writer.drain()
        async with asyncio.timeout(10):
            raw = await reader.read()
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"\r\nX-Name: caf\xe9\r\n" in head
    assert body == b"ok"
    names = [line.split(b":", 1)[0].lower() for line in head.split(b"\r\n")[1:]]
    assert names == [b"date", b"x-name", b"content-length", b"traceresponse", b"x-trace-id", b"connection"]
