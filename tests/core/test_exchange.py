"""The request's pure steps, shared by the handler, the WebSocket relay and explain: tables, no sockets."""

from __future__ import annotations

import pytest
from opentelemetry.util.types import AttributeValue

from mes_trace_proxy.core import attributes as A
from mes_trace_proxy.core.exchange import (
    BodyReading,
    body_reading,
    connection_attributes,
    refusal,
    span_attributes,
    user_pseudonym,
)
from mes_trace_proxy.core.extract import NO_FACTS
from mes_trace_proxy.core.framing import DEFAULT_UNDERSCORE, NameAction, UnderscorePolicy, closes_connection
from mes_trace_proxy.core.redact import Redactor, pseudonymize
from mes_trace_proxy.core.rules import RouteMatch, compile_rules

RULES = compile_rules(
    [
        {
            "name": "set-status",
            "route": "/orders/{id}/status",
            "order_id": "path:id",
            "status": "body:/status",
        },
        {"name": "health", "route": "/health"},
    ],
    key="rules",
)
HOST = ("Host", "mes")


def _match(path: str) -> RouteMatch:
    match = RULES.match("PUT", path)
    assert match is not None
    return match


@pytest.mark.parametrize(
    ("method", "target", "headers", "length", "limit", "slug"),
    [
        ("GET", "/x", [HOST], None, None, None),
        ("CONNECT", "mes:443", [HOST], None, None, "method_not_allowed"),
        ("GET", "http://evil.example/", [HOST], None, None, "bad_request_target"),
        ("GET", "/x", [HOST, ("Host", "b")], None, None, "bad_request"),
        (
            "GET",
            "/x",
            [HOST, ("X-Note", b"caf\xe9".decode("utf-8", "surrogateescape"))],
            None,
            None,
            "bad_request",
        ),
        ("PUT", "/x", [HOST], 11, 10, "payload_too_large"),
        ("PUT", "/x", [HOST], 10, 10, None),
        ("PUT", "/x", [HOST], None, 10, None),
        ("PUT", "/x", [HOST], 10**9, None, None),
    ],
    ids=[
        "plain",
        "connect",
        "absolute-form",
        "two-hosts",
        "not-utf8-value",
        "declared-over-limit",
        "declared-at-limit",
        "chunked-checked-later",
        "no-limit",
    ],
)
def test_refusal_table(
    method: str,
    target: str,
    headers: list[tuple[str, str]],
    length: int | None,
    limit: int | None,
    slug: str | None,
) -> None:
    """Each refusal a gateway owes, in the handler's order; its slug is what metrics and logs carry."""
    found = refusal(
        method,
        target,
        headers,
        [v for _, v in headers],
        chunked=False,
        underscore=DEFAULT_UNDERSCORE,
        content_length=length,
        max_body_size=limit,
    )
    assert (found.slug if found is not None else None) == slug
    if found is not None:
        assert found.problem_type == f"urn:mes-trace-proxy:problem:{slug}"


@pytest.mark.parametrize(
    ("path", "has_body", "content_type", "length", "expected"),
    [
        ("/orders/A-1/status", False, "application/json", None, BodyReading.NO_BODY),
        ("/nowhere", True, "application/json", 10, BodyReading.NO_RULE),
        ("/health", True, "application/json", 10, BodyReading.RULE_IGNORES_BODY),
        ("/orders/A-1/status", True, "text/plain", 10, BodyReading.NOT_JSON),
        ("/orders/A-1/status", True, None, 10, BodyReading.NOT_JSON),
        ("/orders/A-1/status", True, "application/json", 101, BodyReading.TOO_LARGE),
        ("/orders/A-1/status", True, "application/json", 100, BodyReading.READ),
        ("/orders/A-1/status", True, "application/merge-patch+json; charset=utf-8", 0, BodyReading.READ),
        ("/orders/A-1/status", True, "application/json", None, BodyReading.READ_UP_TO_LIMIT),
    ],
)
def test_body_reading_table(
    path: str, has_body: bool, content_type: str | None, length: int | None, expected: BodyReading
) -> None:
    """A body is read only when a rule reads it, it is JSON, and it fits inspect_body_limit (100 here)."""
    match = RULES.match("PUT", path)
    got = body_reading(match, has_body=has_body, content_type=content_type, content_length=length, limit=100)
    assert got is expected
    assert got.inspected is (expected in {BodyReading.READ, BodyReading.READ_UP_TO_LIMIT})


def test_every_body_reading_says_why() -> None:
    """The reasons explain shows are sentences, one per member, none empty or repeated."""
    reasons = [member.value for member in BodyReading]
    assert all(len(reason) > 20 for reason in reasons)
    assert len(set(reasons)) == len(reasons)


def test_user_pseudonym_only_with_a_key() -> None:
    """No key: no enduser.id at all; with one, the keyed pseudonym of the configured header's value."""
    headers = [("X-User-Id", "alice@example.com")]
    assert user_pseudonym(None, "x-user-id", headers) is None
    assert user_pseudonym(b"k" * 32, "x-user-id", headers) == pseudonymize(b"k" * 32, "alice@example.com")
    assert user_pseudonym(b"k" * 32, "x-user-id", [("X-Other", "bob")]) is None


def test_span_attributes_name_the_rule_and_redact() -> None:
    """The request attributes carry the route and rule; a personal query value never appears."""
    attrs = span_attributes(
        method="PUT",
        path="/orders/A-1/status",
        query="email=alice@example.com",
        match=_match("/orders/A-1/status"),
        listener="ingress",
        facts=NO_FACTS,
        redactor=Redactor(),
        user=None,
    )
    assert attrs[A.HTTP_ROUTE] == "/orders/{id}/status"
    assert "alice@example.com" not in repr(attrs)


@pytest.mark.parametrize(
    ("host", "address", "port"),
    [("mes:8080", "mes", 8080), ("[::1]:8443", "::1", 8443), ("[::1]", "::1", None), ("mes", "mes", None)],
)
def test_connection_attributes(host: str, address: str, port: int | None) -> None:
    """server.* from Host (IPv6 brackets stripped), client.* from the peer, headers allow-listed."""
    attrs: dict[str, AttributeValue] = {}
    headers = [("User-Agent", "crm/1.0"), ("Authorization", "Bearer secret")]
    connection_attributes(attrs, Redactor(), host=host, peer="127.0.0.1", headers=headers)
    assert attrs[A.SERVER_ADDRESS] == address
    assert attrs.get(A.SERVER_PORT) == port
    assert attrs[A.CLIENT_ADDRESS] == "127.0.0.1"
    assert attrs[A.USER_AGENT_ORIGINAL] == "crm/1.0"
    assert "secret" not in repr(attrs)


@pytest.mark.parametrize(
    ("headers", "chunked", "underscore", "closes"),
    [
        ([("Host", "mes"), ("Transfer-Encoding", "chunked")], True, DEFAULT_UNDERSCORE, None),
        ([("Host", "mes"), ("Transfer-Encoding", "gzip, chunked")], True, DEFAULT_UNDERSCORE, True),
        ([("Host", "mes"), ("Content_Length", "3")], False, DEFAULT_UNDERSCORE, None),
        (
            [("Host", "mes"), ("Content_Length", "3")],
            False,
            UnderscorePolicy(lookalikes=NameAction.REFUSE),
            True,
        ),
        ([("Host", "mes"), ("X_Id", "3")], False, UnderscorePolicy(others=NameAction.REFUSE), True),
    ],
    ids=["chunked", "coding-beside-chunked", "lookalike-dropped", "lookalike-refused", "underscore-refused"],
)
def test_refusal_checks_framing_and_underscore_names(
    headers: list[tuple[str, str]], chunked: bool, underscore: UnderscorePolicy, closes: bool | None
) -> None:
    """framing.check_framing runs in the same chain; its refusals close the connection."""
    found = refusal(
        "POST",
        "/orders",
        headers,
        [v for _, v in headers],
        chunked=chunked,
        underscore=underscore,
        content_length=None,
        max_body_size=None,
    )
    if closes is None:
        assert found is None
    else:
        assert found is not None
        assert found.status == 400
        assert closes_connection(found)
