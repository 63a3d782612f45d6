"""Tests for forwarding: header rewriting both ways, Host policy, forwarding fields, target checks."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mes_trace_proxy.forwarding import (
    HOP_BY_HOP,
    ForwardPolicy,
    HeaderList,
    check_header_values,
    check_host_headers,
    check_target,
    downstream_response_headers,
    upstream_host_value,
    upstream_request_headers,
    websocket_subprotocols,
)
from mes_trace_proxy.framing import LOOKALIKES
from mes_trace_proxy.problems import PROBLEM_TYPE_PREFIX

UPSTREAM = "mes.internal:8080"
# No forwarding fields: isolates hop-by-hop removal and Host handling.
PLAIN = ForwardPolicy(upstream_host=UPSTREAM, forwarded_headers=False)
DEFAULT = ForwardPolicy(upstream_host=UPSTREAM)


def _up(
    headers: HeaderList,
    policy: ForwardPolicy = PLAIN,
    *,
    client_ip: str = "192.0.2.10",
    scheme: str = "http",
    host: str | None = "proxy.example",
    drop_trace_headers: bool = False,
    upgrade: bool = False,
) -> HeaderList:
    return upstream_request_headers(
        headers,
        policy=policy,
        client_ip=client_ip,
        scheme=scheme,
        host=host,
        drop_trace_headers=drop_trace_headers,
        upgrade=upgrade,
    )


def _named(headers: HeaderList, name: str) -> list[str]:
    return [v for n, v in headers if n.lower() == name]


# ── hop-by-hop removal ────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize(
    "name",
    sorted(HOP_BY_HOP | {n.upper() for n in HOP_BY_HOP} | {n.title() for n in HOP_BY_HOP}),
)
def test_every_hop_by_hop_field_is_removed_upstream(name: str) -> None:
    """Each RFC 9110 §7.6.1 hop-by-hop field is removed whatever its case."""
    out = _up([("Accept", "*/*"), (name, "x"), ("X-Keep", "1")])
    assert out == [("Host", UPSTREAM), ("Accept", "*/*"), ("X-Keep", "1")]


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        pytest.param(
            [("Connection", "X-Foo"), ("X-Foo", "1"), ("X-Bar", "2")],
            [("X-Bar", "2")],
            id="single-option",
        ),
        pytest.param(
            [("connection", " x-FOO ,, \tX-bar\t,"), ("X-Foo", "1"), ("x-bar", "2"), ("X-Baz", "3")],
            [("X-Baz", "3")],
            id="odd-spacing-case-empty-elements",
        ),
        pytest.param(
            [("Connection", "keep-alive"), ("X-Foo", "1"), ("CONNECTION", "x-foo")],
            [],
            id="option-in-a-later-connection-line",
        ),
        pytest.param(
            [("X-Foo", "1"), ("X-Foo", "2"), ("Connection", "close, X-Foo")],
            [],
            id="repeated-named-field-all-removed",
        ),
        pytest.param(
            [("Connection", "X-Foo-Bar"), ("X-Foo", "1")],
            [("X-Foo", "1")],
            id="prefix-is-not-a-match",
        ),
        pytest.param(
            [("Connection", "host"), ("Host", "proxy.example"), ("Accept", "*/*")],
            [("Accept", "*/*")],
            id="naming-host-cannot-remove-it",
        ),
        pytest.param(
            [("TE", "trailers"), ("Accept", "*/*")],
            [("Accept", "*/*")],
            id="te-trailers-dropped",
        ),
        pytest.param(
            [
                ("Content-Length", "12"),
                ("Transfer-Encoding", "chunked"),
                ("Content-Type", "application/json"),
            ],
            [("Content-Length", "12"), ("Content-Type", "application/json")],
            id="content-length-kept-transfer-encoding-dropped",
        ),
        pytest.param(
            [("Proxy-Authorization", "Basic eA=="), ("Authorization", "Bearer t")],
            [("Authorization", "Bearer t")],
            id="proxy-credentials-dropped-end-to-end-credentials-kept",
        ),
    ],
)
def test_connection_named_and_hop_by_hop_removed(headers: HeaderList, expected: HeaderList) -> None:
    """Fields named by any Connection option are removed, and nothing else is touched."""
    assert _up(headers) == [("Host", UPSTREAM), *expected]


def test_repeated_fields_kept_in_order_with_original_case() -> None:
    """Repeated and interleaved fields keep their order, name case and exact values."""
    headers = [
        ("Accept", "text/html"),
        ("x-custom", "  spaced value  "),
        ("Accept", "application/json"),
        ("Cookie", "a=1"),
        ("X-CUSTOM", "second"),
        ("Cookie", "b=2"),
    ]
    assert _up(headers) == [("Host", UPSTREAM), *headers]


@pytest.mark.parametrize(
    ("drop", "expected"),
    [(False, ["00-aa-bb-01", "k=v"]), (True, [])],
    ids=["kept-by-default", "dropped-on-request"],
)
def test_trace_headers_dropped_only_when_asked(drop: bool, expected: list[str]) -> None:
    """Incoming traceparent/tracestate pass unless the caller re-injects its own."""
    out = _up([("traceparent", "00-aa-bb-01"), ("tracestate", "k=v")], drop_trace_headers=drop)
    assert [v for n, v in out if n.startswith("trace")] == expected


# ── Host policy ───────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize(
    ("policy", "headers", "host", "expected"),
    [
        pytest.param(
            PLAIN,
            [("Accept", "*/*"), ("host", "proxy.example"), ("X-A", "1")],
            "proxy.example",
            [("Accept", "*/*"), ("host", UPSTREAM), ("X-A", "1")],
            id="upstream-host-replaces-in-place-keeping-name-case",
        ),
        pytest.param(
            dataclasses.replace(PLAIN, preserve_host=True),
            [("Host", "proxy.example:8443"), ("X-A", "1")],
            "proxy.example:8443",
            [("Host", "proxy.example:8443"), ("X-A", "1")],
            id="preserve-host",
        ),
        pytest.param(
            PLAIN,
            [("X-A", "1")],
            None,
            [("Host", UPSTREAM), ("X-A", "1")],
            id="no-client-host-inserted-first",
        ),
        pytest.param(
            dataclasses.replace(PLAIN, preserve_host=True),
            [("X-A", "1")],
            None,
            [("Host", UPSTREAM), ("X-A", "1")],
            id="preserve-host-without-client-host-falls-back",
        ),
        pytest.param(
            PLAIN,
            [("Host", "proxy.example"), ("Host", "evil.example")],
            "proxy.example",
            [("Host", UPSTREAM)],
            id="second-host-never-forwarded",
        ),
    ],
)
def test_host_policy(
    policy: ForwardPolicy, headers: HeaderList, host: str | None, expected: HeaderList
) -> None:
    """Host is the upstream's unless preserve_host, and sits where the client's was."""
    assert _up(headers, policy, host=host) == expected


# ── X-Forwarded-* ─────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize(
    ("headers", "client_ip", "xff"),
    [
        pytest.param([], "192.0.2.10", "192.0.2.10", id="new-chain"),
        pytest.param(
            [("X-Forwarded-For", "203.0.113.7")], "192.0.2.10", "203.0.113.7, 192.0.2.10", id="append"
        ),
        pytest.param(
            [("x-forwarded-for", "203.0.113.7, 198.51.100.2"), ("X-Forwarded-For", "198.51.100.3")],
            "2001:db8::1",
            "203.0.113.7, 198.51.100.2, 198.51.100.3, 2001:db8::1",
            id="several-lines-combined-ipv6-unbracketed",
        ),
        pytest.param(
            [("Connection", "X-Forwarded-For"), ("X-Forwarded-For", "203.0.113.7")],
            "192.0.2.10",
            "192.0.2.10",
            id="connection-named-chain-dropped",
        ),
        pytest.param([], "", "unknown", id="no-peer-address"),
    ],
)
def test_x_forwarded_for_appends(headers: HeaderList, client_ip: str, xff: str) -> None:
    """X-Forwarded-For keeps the client's chain and ends with our peer address, in one field."""
    out = _up(headers, DEFAULT, client_ip=client_ip)
    assert _named(out, "x-forwarded-for") == [xff]


def test_x_forwarded_proto_and_host_overwritten() -> None:
    """A client cannot make MES believe the call came over TLS or to another host."""
    headers = [("X-Forwarded-Proto", "https"), ("X-Forwarded-Host", "bank.example"), ("Accept", "*/*")]
    out = _up(headers, DEFAULT, scheme="http", host="proxy.example:8080")
    assert out == [
        ("Host", UPSTREAM),
        ("Accept", "*/*"),
        ("X-Forwarded-For", "192.0.2.10"),
        ("X-Forwarded-Proto", "http"),
        ("X-Forwarded-Host", "proxy.example:8080"),
        ("Forwarded", 'for=192.0.2.10;proto=http;host="proxy.example:8080"'),
    ]


def test_x_forwarded_host_omitted_without_client_host() -> None:
    """With no client Host there is no X-Forwarded-Host, and a spoofed one is still removed."""
    out = _up([("X-Forwarded-Host", "bank.example")], DEFAULT, host=None)
    assert _named(out, "x-forwarded-host") == []


def test_forwarding_fields_pass_untouched_when_disabled() -> None:
    """With forwarding fields off, the client's own pass through exactly as sent, and none is added."""
    headers = [
        ("X-Forwarded-For", "203.0.113.7"),
        ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Host", "a.example"),
        ("Forwarded", "for=203.0.113.7"),
    ]
    assert _up(headers, PLAIN) == [("Host", UPSTREAM), *headers]


# ── Forwarded (RFC 7239) ──────────────────────────────────────────────────────────────────


@pytest.mark.parametrize(
    ("client_ip", "scheme", "host", "element"),
    [
        pytest.param(
            "192.0.2.10", "http", "proxy.example", "for=192.0.2.10;proto=http;host=proxy.example", id="ipv4"
        ),
        pytest.param(
            "2001:db8::1",
            "https",
            "proxy.example",
            'for="[2001:db8::1]";proto=https;host=proxy.example',
            id="ipv6",
        ),
        pytest.param(
            "::1", "HTTPS", "[::1]:8443", 'for="[::1]";proto=https;host="[::1]:8443"', id="ipv6-host-port"
        ),
        pytest.param(
            "192.0.2.10",
            "http",
            "proxy.example:8080",
            'for=192.0.2.10;proto=http;host="proxy.example:8080"',
            id="port-quoted",
        ),
        pytest.param("192.0.2.10", "http", None, "for=192.0.2.10;proto=http", id="no-host"),
        pytest.param(
            "", "http", "proxy.example", "for=unknown;proto=http;host=proxy.example", id="unix-socket"
        ),
        pytest.param(
            "192.0.2.10", "http", 'a"b', 'for=192.0.2.10;proto=http;host="a\\"b"', id="quote-escaped"
        ),
        pytest.param(
            "192.0.2.10", "http", "a\x01b", "for=192.0.2.10;proto=http", id="unquotable-host-omitted"
        ),
    ],
)
def test_forwarded_element(client_ip: str, scheme: str, host: str | None, element: str) -> None:
    """Forwarded gets one RFC 7239 element; IPv6 and host:port are quoted (§6, §4)."""
    out = _up([], DEFAULT, client_ip=client_ip, scheme=scheme, host=host)
    assert _named(out, "forwarded") == [element]


def test_forwarded_appends_new_line_after_clients() -> None:
    """The client's Forwarded lines stay as sent; ours is a new field line at the end (RFC 7239 §4)."""
    headers = [("Forwarded", "for=203.0.113.7;proto=https"), ("Accept", "*/*")]
    out = _up(headers, DEFAULT)
    assert out == [
        ("Host", UPSTREAM),
        *headers,
        ("X-Forwarded-For", "192.0.2.10"),
        ("X-Forwarded-Proto", "http"),
        ("X-Forwarded-Host", "proxy.example"),
        ("Forwarded", "for=192.0.2.10;proto=http;host=proxy.example"),
    ]


# ── WebSocket upgrade ─────────────────────────────────────────────────────────────────────

WS_REQUEST: HeaderList = [
    ("Host", "proxy.example"),
    ("Connection", "keep-alive, Upgrade"),
    ("Upgrade", "websocket"),
    ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ("Sec-WebSocket-Version", "13"),
    ("Sec-WebSocket-Extensions", "permessage-deflate"),
    ("Sec-WebSocket-Protocol", "mes.v1, mes.v2"),
    ("Sec-WebSocket-Protocol", "json"),
    ("Origin", "https://dashboard.example"),
]


def test_upgrade_keeps_upgrade_and_adds_connection() -> None:
    """On upgrade, Upgrade survives its Connection option and per-connection handshake fields go."""
    assert _up(WS_REQUEST, upgrade=True) == [
        ("Host", UPSTREAM),
        ("Upgrade", "websocket"),
        ("Origin", "https://dashboard.example"),
        ("Connection", "Upgrade"),
    ]


def test_without_upgrade_flag_upgrade_is_dropped() -> None:
    """An ordinary request never forwards Upgrade (RFC 9110 §7.8 is hop-by-hop)."""
    assert _named(_up(WS_REQUEST), "upgrade") == []
    assert _named(_up(WS_REQUEST), "connection") == []


def test_websocket_subprotocols_in_order() -> None:
    """Offered subprotocols come out in order across repeated fields, for ws_connect(protocols=)."""
    assert websocket_subprotocols(WS_REQUEST) == ("mes.v1", "mes.v2", "json")
    assert websocket_subprotocols([("Upgrade", "websocket")]) == ()


# ── responses ─────────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        pytest.param(
            [
                ("Set-Cookie", "a=1; Path=/"),
                ("Content-Type", "text/plain"),
                ("set-cookie", "b=2, c=3; HttpOnly"),
            ],
            [
                ("Set-Cookie", "a=1; Path=/"),
                ("Content-Type", "text/plain"),
                ("set-cookie", "b=2, c=3; HttpOnly"),
            ],
            id="set-cookie-multiplicity",
        ),
        pytest.param(
            [("Content-Length", "5"), ("Transfer-Encoding", "chunked"), ("Keep-Alive", "timeout=5")],
            [("Content-Length", "5")],
            id="content-length-kept-transfer-encoding-dropped",
        ),
        pytest.param(
            [("Connection", " close ,X-Upstream-Debug"), ("X-Upstream-Debug", "1"), ("ETag", '"v1"')],
            [("ETag", '"v1"')],
            id="connection-named",
        ),
        pytest.param(
            [
                ("Proxy-Authenticate", "Basic"),
                ("Trailer", "X-Checksum"),
                ("Upgrade", "h2c"),
                ("Vary", "Accept"),
            ],
            [("Vary", "Accept")],
            id="other-hop-by-hop",
        ),
    ],
)
def test_downstream_response_headers(headers: HeaderList, expected: HeaderList) -> None:
    """Responses lose hop-by-hop and Connection-named fields and keep the rest in order."""
    assert downstream_response_headers(headers) == expected


# ── open-proxy and traversal checks ───────────────────────────────────────────────────────


@pytest.mark.parametrize(
    ("method", "target", "status"),
    [
        ("CONNECT", "mes.internal:443", 405),
        ("CONNECT", "/api/v1/health", 405),
        ("GET", "http://evil.example/", 400),
        ("GET", "https://mes.internal:8080/api/v1/orders", 400),
        ("GET", "HTTP://evil.example", 400),
        ("GET", "ftp://evil.example/x", 400),
        ("GET", "gopher://evil.example:70/", 400),
        ("GET", "file:///etc/passwd", 400),
        ("GET", "mailto:x", 400),
        ("GET", "evil.example:443", 400),
        ("GET", "[::1]:8080", 400),
        ("GET", "evil.example", 400),
        ("GET", "", 400),
        ("GET", "*", 400),
        ("POST", "*", 400),
        ("GET", "//evil.example/api", 400),
        ("GET", "///evil.example", 400),
        ("GET", "/%2Fevil.example/", 400),
        ("GET", "/%2fevil.example/", 400),
        ("GET", "/..%2f..%2fetc/passwd", 400),
        ("GET", "/api/..%2F..%2F..%2Fetc", 400),
        ("GET", "/api/v1/%2e%2e/admin", 400),
        ("GET", "/api/v1/%2E%2E", 400),
        ("GET", "/api/.%2e/x", 400),
        ("GET", "/api/%2e/x", 400),
        ("GET", "/api/v1/orders/a%2F..%2Fb", 400),
        ("GET", "/api/%252e%252e/x", 400),
        ("GET", "/api/%252F", 400),
        ("GET", "/api/%5c..%5cadmin", 400),
        ("GET", "/api\\..\\admin", 400),
        ("GET", "/\\evil.example", 400),
        ("GET", "/api/v1/orders%00.json", 400),
        ("GET", "/api/v1/orders%0d%0aX-Injected:%201", 400),
        ("GET", "/api/v1/orders\r\nX-Injected: 1", 400),
        ("GET", "/api/v1/orders\x00", 400),
        ("GET", "/api/v1/or\x7fders", 400),
        ("GET", "/api/v1/orders\t", 400),
        ("GET", "/api/v1 /orders", 400),
        ("GET", "/api/v1/orders#frag", 400),
        ("GET", "/api/v1/orders?q=%00", 400),
        ("GET", "/api/%zz", 400),
        ("GET", "/api/%2", 400),
        ("GET", "/..", 400),
        ("GET", "/../etc/passwd", 400),
        ("GET", "/api/../../etc", 400),
        ("GET", "/api/./../../x", 400),
        ("GET", "/api/..;/admin", 400),
        ("GET", "/api/.;x/admin", 400),
        ("GET", "/api/%2e%2e;/admin", 400),
    ],
    ids=lambda v: repr(v)[1:-1] if isinstance(v, str) else None,
)
def test_attack_targets_rejected(method: str, target: str, status: int) -> None:
    """Open-proxy, traversal and injection targets are refused before anything goes upstream."""
    rej = check_target(method, target)
    assert rej is not None
    assert rej.status == status
    assert rej.problem_type.startswith(PROBLEM_TYPE_PREFIX)
    # The detail never echoes the target (its query may carry personal data).
    assert target not in rej.detail or not target


def test_connect_rejection_lists_allowed_methods() -> None:
    """The 405 for CONNECT carries the Allow field RFC 9110 §15.5.6 requires, without CONNECT."""
    rej = check_target("CONNECT", "mes.internal:443")
    assert rej is not None
    allow = dict(rej.headers)["Allow"]
    assert "GET" in allow
    assert "CONNECT" not in allow


@pytest.mark.parametrize(
    ("method", "target"),
    [
        ("POST", "/api/v1/orders"),
        ("POST", "/api/v1/orders/ORD-2024-0001/price-calculation"),
        ("PUT", "/api/v1/orders/ORD-2024-0001/status"),
        ("PATCH", "/api/v1/orders/ORD-2024-0001"),
        ("GET", "/api/v1/orders/ORD-2024-0001"),
        ("GET", "/api/v1/orders?status=MANUFACTURING_APPROVED&page=2"),
        ("GET", "/api/v1/orders?status=MANUFACTURING_APPROVED&page=2&sort=-updated"),
        ("POST", "/api/v1/orders/ORD-2024-0001/model"),
        ("GET", "/api/v1/health"),
        ("PUT", "/api/orders/ORD-2024-0001/price"),
        ("POST", "/api/orders/ORD-2024-0001/events"),
        ("GET", "/"),
        ("OPTIONS", "*"),
        ("GET", "/api/v1/orders/ORD%202024"),
        ("GET", "/api/v1/orders/a%2Bb"),
        ("GET", "/api/v1/orders/%D0%97%D0%B0%D0%BA%D0%B0%D0%B7"),
        ("GET", "/api/v1/orders/a%2Fb"),
        ("GET", "/api/v1/orders/100%25"),
        ("GET", "/api/v1/orders/.well-known"),
        ("GET", "/api/v1/orders/..hidden"),
        ("GET", "/api/v1/orders/v1.2"),
        ("GET", "/api/v1/../v2/health"),
        ("GET", "/api/./v1/health"),
        ("GET", "/api//v1/health"),
        ("GET", "/api/v1/orders;jsessionid=1"),
        ("GET", "/api/v1/orders?q=a\\b&x=%0A"),
        ("GET", "/api/v1/orders?next=http://elsewhere.example/"),
        ("GET", "/api/v1/orders?redirect=//x"),
        ("DELETE", "/api/v1/orders/ORD-1"),
        ("connect", "/api/v1/health"),
    ],
    ids=lambda v: repr(v)[1:-1],
)
def test_legitimate_targets_accepted(method: str, target: str) -> None:
    """Reference MES and CRM routes, queries and ordinary encodings are forwarded."""
    assert check_target(method, target) is None


@given(
    segments=st.lists(
        st.text(
            alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_~",
            min_size=1,
            max_size=12,
        ),
        min_size=0,
        max_size=8,
    ),
    query=st.none()
    | st.text(alphabet="abcxyz0123456789=&-_%2B", max_size=30).filter(lambda q: "%00" not in q),
)
@settings(max_examples=200, deadline=None)
def test_unreserved_paths_always_accepted(segments: list[str], query: str | None) -> None:
    """Any path of RFC 3986 unreserved segments, with or without a query, is accepted."""
    target = "/" + "/".join(segments) + ("" if query is None else "?" + query)
    assert check_target("GET", target) is None


# ── Host header checks ────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        pytest.param([("Host", "proxy.example")], None, id="one-host"),
        pytest.param([("Host", "proxy.example:8080")], None, id="host-port"),
        pytest.param([("host", "[2001:db8::1]:8080")], None, id="ipv6-literal"),
        pytest.param([("Host", "")], None, id="empty-allowed"),
        pytest.param([], None, id="none-the-parser-decides"),
        pytest.param([("Host", "a.example"), ("Host", "a.example")], 400, id="duplicate-same"),
        pytest.param([("Host", "a.example"), ("X-A", "1"), ("HOST", "b.example")], 400, id="duplicate-case"),
        pytest.param([("Host", "a.example/evil")], 400, id="slash"),
        pytest.param([("Host", "user@a.example")], 400, id="userinfo"),
        pytest.param([("Host", "a.example b.example")], 400, id="space"),
        pytest.param([("Host", "a.example:80x")], 400, id="bad-port"),
    ],
)
def test_check_host_headers(headers: HeaderList, status: int | None) -> None:
    """Several Host fields or an invalid one get a 400 (RFC 9112 §3.2)."""
    rej = check_host_headers(headers)
    assert (None if rej is None else rej.status) == status


@pytest.mark.parametrize(
    ("raw", "refused"),
    [
        pytest.param(b"plain ascii", False, id="ascii"),
        pytest.param("привет".encode(), False, id="utf8"),
        pytest.param(b"caf\xe9", True, id="latin1"),
        pytest.param(b"\xff\xfe", True, id="not-text"),
        pytest.param(b"ok \xc3\x28", True, id="broken-utf8-sequence"),
    ],
)
def test_check_header_values_refuses_what_cannot_be_forwarded_unchanged(raw: bytes, refused: bool) -> None:
    """A value decoded from bytes that are not UTF-8 gets a 400; UTF-8 and ASCII pass (as aiohttp decodes)."""
    value = raw.decode("utf-8", "surrogateescape")
    rej = check_header_values(["first", value])
    assert (rej is not None and rej.status == 400) is refused


# ── upstream Host value and policy validation ─────────────────────────────────────────────


@pytest.mark.parametrize(
    ("scheme", "host", "port", "expected"),
    [
        ("http", "mes.internal", 80, "mes.internal"),
        ("https", "mes.internal", 443, "mes.internal"),
        ("HTTPS", "mes.internal", 443, "mes.internal"),
        ("http", "mes.internal", 8080, "mes.internal:8080"),
        ("https", "mes.internal", 80, "mes.internal:80"),
        ("http", "::1", 80, "[::1]"),
        ("http", "2001:db8::1", 8081, "[2001:db8::1]:8081"),
        ("http", "[::1]", 8081, "[::1]:8081"),
        ("http", "127.0.0.1", 8081, "127.0.0.1:8081"),
    ],
    ids=lambda v: str(v),
)
def test_upstream_host_value(scheme: str, host: str, port: int, expected: str) -> None:
    """Default ports are omitted and IPv6 addresses bracketed (RFC 9110 §7.2)."""
    assert upstream_host_value(scheme, host, port) == expected


@pytest.mark.parametrize(("host", "port"), [("mes.internal", 0), ("mes.internal", 65536), ("", 80)])
def test_upstream_host_value_rejects_bad_input(host: str, port: int) -> None:
    """An empty host or an out-of-range port is a configuration error."""
    with pytest.raises(ValueError, match=r"host|port"):
        upstream_host_value("http", host, port)


@pytest.mark.parametrize("upstream_host", ["", "mes.internal/api"], ids=["empty-host", "host-with-path"])
def test_policy_rejects_invalid_settings(upstream_host: str) -> None:
    """An invalid ForwardPolicy cannot be built."""
    with pytest.raises(ValueError, match=r"upstream_host"):
        ForwardPolicy(upstream_host=upstream_host)


def test_input_is_not_mutated() -> None:
    """The caller's header sequence is never changed."""
    headers = [("Host", "proxy.example"), ("Connection", "X-A"), ("X-A", "1")]
    before = list(headers)
    _up(headers, DEFAULT)
    assert headers == before


# ── property: everything end to end passes through ────────────────────────────────────────

_TCHAR = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
# The lookalikes ("keep_alive") are dropped by default: tested in test_framing.py.
_NOT_PASSED_THROUGH = HOP_BY_HOP | LOOKALIKES | {"host"}
_field_names = st.text(alphabet=_TCHAR, min_size=1, max_size=24).filter(
    lambda n: n.lower() not in _NOT_PASSED_THROUGH
)
_field_values = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)


@given(headers=st.lists(st.tuples(_field_names, _field_values), max_size=30))
@settings(max_examples=300, deadline=None)
def test_end_to_end_fields_all_kept_in_order(headers: list[tuple[str, str]]) -> None:
    """Any list without hop-by-hop names comes out unchanged and in order, after the upstream Host."""
    assert _up(headers) == [("Host", UPSTREAM), *headers]


def test_downstream_fields_named_in_drop_are_removed_with_the_hop_by_hop_ones() -> None:
    """The fields the proxy sets on answers (traceresponse, X-Trace-Id) replace MES's, whatever their case."""
    fields = (
        ("Content-Type", "application/json"),
        ("TraceResponse", "00-aa-bb-01"),
        ("X-Trace-Id", "mes's"),
        ("Keep-Alive", "timeout=5"),
        ("Set-Cookie", "a=1"),
    )
    assert downstream_response_headers(fields, frozenset({"traceresponse", "x-trace-id"})) == [
        ("Content-Type", "application/json"),
        ("Set-Cookie", "a=1"),
    ]
    assert ("X-Trace-Id", "mes's") in downstream_response_headers(fields)
