"""Tests for attributes: span names, the method attribute, and request attributes' exact keys and types."""

from __future__ import annotations

import pytest
from opentelemetry.semconv.attributes.http_attributes import HttpRequestMethodValues
from opentelemetry.util.types import AttributeValue

from mes_trace_proxy.core import attributes as A
from mes_trace_proxy.core.extract import NO_FACTS, OrderFacts
from mes_trace_proxy.core.redact import DEFAULT_MARKER, Redactor

REDACTOR = Redactor()
EMAIL = "jane.roe@example.com"
PHONE = "+44 20 7946 0958"

SPAN_NAMES: tuple[tuple[str, str, str | None, str], ...] = (
    ("get-route", "GET", "/api/v1/orders/{orderId}", "GET /api/v1/orders/{orderId}"),
    ("put-route", "PUT", "/api/v1/orders/{orderId}/status", "PUT /api/v1/orders/{orderId}/status"),
    ("patch-route", "PATCH", "/api/v1/orders/{orderId}", "PATCH /api/v1/orders/{orderId}"),
    ("post-no-route", "POST", None, "POST"),
    ("empty-route", "DELETE", "", "DELETE"),
    ("options", "OPTIONS", "/api/v1/health", "OPTIONS /api/v1/health"),
    ("unknown-method", "PURGE", "/api/v1/orders/{orderId}", "HTTP /api/v1/orders/{orderId}"),
    ("unknown-no-route", "PROPFIND", None, "HTTP"),
    ("lower-case-is-unknown", "get", None, "HTTP"),
    ("garbage-method", "G\u00c9T" * 50, None, "HTTP"),
)


@pytest.mark.parametrize(
    ("method", "route", "name"), [c[1:] for c in SPAN_NAMES], ids=[c[0] for c in SPAN_NAMES]
)
def test_span_name(method: str, route: str | None, name: str) -> None:
    """Span names are "{method} {route}", the method alone without a route, and "HTTP" for unknown methods."""
    assert A.span_name(method, route) == name


@pytest.mark.parametrize("method", [m.value for m in HttpRequestMethodValues if m.value != "_OTHER"])
def test_every_semconv_method_is_known(method: str) -> None:
    """Each method the semantic conventions list is recorded as itself."""
    assert A.method_attribute(method) == method


@pytest.mark.parametrize("method", ["PURGE", "get", "Get", "", "X" * 100])
def test_other_methods(method: str) -> None:
    """Anything else (methods are case-sensitive) is recorded as _OTHER."""
    assert A.method_attribute(method) == "_OTHER"


def _attrs(
    *,
    method: str = "PUT",
    path: str = "/api/v1/orders/A-1001/status",
    query: str = "",
    route: str | None = "/api/v1/orders/{orderId}/status",
    rule_name: str | None = "set-status",
    facts: OrderFacts = NO_FACTS,
    user: str | None = None,
) -> dict[str, AttributeValue]:
    return A.request_attributes(
        method=method,
        path=path,
        query=query,
        route=route,
        rule_name=rule_name,
        listener="ingress",
        facts=facts,
        redactor=REDACTOR,
        user_pseudonym=user,
    )


def _typed(attrs: dict[str, AttributeValue]) -> dict[str, tuple[type, AttributeValue]]:
    return {key: (type(value), value) for key, value in attrs.items()}


def test_full_request_attributes_keys_and_types() -> None:
    """A matched status change records exactly these keys, every value a str (no ints sneak in)."""
    attrs = _attrs(
        query="status=SHIPPED&page=2&token=abc",
        facts=OrderFacts(order_id="A-1001", status="SHIPPED", observed_status="PACKAGING"),
        user="5f2b" * 8,
    )
    assert _typed(attrs) == {
        "http.request.method": (str, "PUT"),
        "url.path": (str, "/api/v1/orders/A-1001/status"),
        "url.query": (str, "status=SHIPPED&page=2"),
        "http.route": (str, "/api/v1/orders/{orderId}/status"),
        "mes.rule": (str, "set-status"),
        "mes.proxy.listener": (str, "ingress"),
        "mes.order.id": (str, "A-1001"),
        "mes.order.status": (str, "SHIPPED"),
        "enduser.id": (str, "5f2b" * 8),
    }


def test_unmatched_request_has_no_route_or_order() -> None:
    """Without a rule there is no http.route, rule or order key; the observed status is the shell's."""
    attrs = _attrs(method="GET", path="/metrics", route=None, rule_name=None)
    assert _typed(attrs) == {
        "http.request.method": (str, "GET"),
        "url.path": (str, "/metrics"),
        "mes.proxy.listener": (str, "ingress"),
    }


def test_unknown_method_keeps_the_original_bounded() -> None:
    """An unknown method is _OTHER with the original (cut to 32 characters) beside it."""
    attrs = _attrs(method="PURGE" + "X" * 100)
    assert attrs["http.request.method"] == "_OTHER"
    original = attrs["http.request.method_original"]
    assert isinstance(original, str)
    assert original == ("PURGE" + "X" * 100)[:32]
    assert "http.request.method_original" not in _attrs(method="GET")


def test_query_with_nothing_allowed_is_omitted() -> None:
    """A query with no allow-listed parameter leaves url.query out instead of recording ""."""
    assert "url.query" not in _attrs(query=f"email={EMAIL}&token=abc")


@pytest.mark.parametrize(
    ("kwargs", "canary"),
    [
        pytest.param({"path": f"/api/v1/orders/{EMAIL}/status"}, EMAIL, id="email-in-path"),
        pytest.param(
            {"path": "/api/v1/orders/jane.roe%40example.com"}, "jane.roe", id="encoded-email-in-path"
        ),
        pytest.param({"query": f"status={EMAIL}&page=1"}, EMAIL, id="email-in-allowed-query"),
        pytest.param({"query": "status=%2B44%2020%207946%200958"}, "7946", id="phone-in-allowed-query"),
        pytest.param({"query": f"email={EMAIL}"}, EMAIL, id="disallowed-query-name"),
        pytest.param({"facts": OrderFacts(order_id=EMAIL)}, EMAIL, id="email-as-order-id"),
        pytest.param({"facts": OrderFacts(order_id="A-1", status=PHONE)}, "7946", id="phone-as-status"),
        pytest.param({"method": f"{EMAIL}"}, EMAIL, id="email-as-method"),
    ],
)
def test_personal_data_never_reaches_attributes(kwargs: dict[str, object], canary: str) -> None:
    """E-mails and phones in the path, an allow-listed query value, an id or a status are redacted."""
    attrs = _attrs(**kwargs)  # type: ignore[arg-type]
    assert all(canary not in str(value) for value in attrs.values())


def test_redacted_values_show_the_marker() -> None:
    """A redacted path segment becomes the marker, keeping the path's shape for debugging."""
    attrs = _attrs(path=f"/api/v1/orders/{EMAIL}/status")
    assert attrs["url.path"] == f"/api/v1/orders/{DEFAULT_MARKER}/status"


def test_route_template_is_recorded_not_the_path() -> None:
    """http.route is the rule's template, so the order id never becomes a route label."""
    attrs = _attrs(path="/api/v1/orders/A-77/status")
    assert attrs["http.route"] == "/api/v1/orders/{orderId}/status"
    assert "A-77" not in str(attrs["http.route"])


def test_own_keys_are_namespaced() -> None:
    """Our keys live under mes.*; the semconv ones come from the semconv package."""
    own = {
        A.MES_ORDER_ID,
        A.MES_ORDER_STATUS,
        A.MES_ORDER_STATUS_OBSERVED,
        A.MES_ORDER_STATUS_PREVIOUS,
        A.MES_ORDER_TRANSITION,
        A.MES_ORDER_ANOMALY,
        A.MES_RULE,
        A.MES_LISTENER,
    }
    assert all(key.startswith("mes.") for key in own)
    assert len(own) == 8
    assert (A.HTTP_ROUTE, A.URL_PATH, A.ENDUSER_ID) == ("http.route", "url.path", "enduser.id")
