"""Tests for rules: the default rule sets against every reference route, matching, and schema errors."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
from multidict import CIMultiDict

from mes_trace_proxy.cli import read_default_rules
from mes_trace_proxy.core.extract import request_facts, response_facts
from mes_trace_proxy.core.rules import CompiledRules, RuleError, SourceKind, compile_rules, parse_pointer

ORDER = "A-1001"
JSON = (("Content-Type", "application/json"),)


def _default_set(name: str) -> CompiledRules:
    rule_sets = read_default_rules()["rule_sets"]
    assert isinstance(rule_sets, dict)
    return compile_rules(rule_sets[name], key=f"rule_sets.{name}")


MES = _default_set("mes")
CRM = _default_set("crm")
SETS = {"mes": MES, "crm": CRM}


@dataclass(frozen=True, slots=True, kw_only=True)
class RouteCase:
    """One reference call of docs/mes-api.md and what the default rules must read from it."""

    id: str
    rule_set: str
    method: str
    target: str
    body: object = None
    response: object = None
    rule: str | None
    route: str | None = None
    order_id: str | None = None
    status: str | None = None
    observed: str | None = None


# Bodies carry the personal fields a real CRM sends, to prove rules read only what they name.
_CUSTOMER = {"name": "Jane Roe", "email": "jane.roe@example.com", "phone": "+44 20 7946 0958"}

REFERENCE_ROUTES: tuple[RouteCase, ...] = (
    RouteCase(
        id="create-order",
        rule_set="mes",
        method="POST",
        target="/api/v1/orders",
        body={"orderId": ORDER, "status": "MANUFACTURING_APPROVED", "customer": _CUSTOMER, "qty": 2},
        response={"orderId": ORDER, "status": "MANUFACTURING_APPROVED"},
        rule="create-order",
        route="/api/v1/orders",
        order_id=ORDER,
        status="MANUFACTURING_APPROVED",
        observed="MANUFACTURING_APPROVED",
    ),
    RouteCase(
        id="price-calculation",
        rule_set="mes",
        method="POST",
        target=f"/api/v1/orders/{ORDER}/price-calculation",
        response={"orderId": ORDER, "status": "SUBMITTED"},
        rule="price-calculation",
        route="/api/v1/orders/{orderId}/price-calculation",
        order_id=ORDER,
        status="SUBMITTED",
    ),
    RouteCase(
        id="set-status",
        rule_set="mes",
        method="PUT",
        target=f"/api/v1/orders/{ORDER}/status",
        body={"status": "MANUFACTURING_STARTED"},
        response={"orderId": ORDER, "status": "MANUFACTURING_STARTED"},
        rule="set-status",
        route="/api/v1/orders/{orderId}/status",
        order_id=ORDER,
        status="MANUFACTURING_STARTED",
        observed="MANUFACTURING_STARTED",
    ),
    RouteCase(
        id="set-status-refused-by-mes",
        rule_set="mes",
        method="PUT",
        target=f"/api/v1/orders/{ORDER}/status",
        body={"status": "SHIPPED"},
        response={"orderId": ORDER, "status": "PACKAGING"},
        rule="set-status",
        route="/api/v1/orders/{orderId}/status",
        order_id=ORDER,
        status="SHIPPED",
        observed="PACKAGING",
    ),
    RouteCase(
        id="patch-order",
        rule_set="mes",
        method="PATCH",
        target=f"/api/v1/orders/{ORDER}",
        body={"status": "PACKAGING", "note": "fragile", "customer": _CUSTOMER},
        response={"orderId": ORDER, "status": "PACKAGING"},
        rule="patch-order",
        route="/api/v1/orders/{orderId}",
        order_id=ORDER,
        status="PACKAGING",
        observed="PACKAGING",
    ),
    RouteCase(
        id="get-order",
        rule_set="mes",
        method="GET",
        target=f"/api/v1/orders/{ORDER}",
        response={"orderId": ORDER, "status": "SHIPPED"},
        rule="get-order",
        route="/api/v1/orders/{orderId}",
        order_id=ORDER,
        observed="SHIPPED",
    ),
    RouteCase(
        id="list-orders",
        rule_set="mes",
        method="GET",
        target="/api/v1/orders?status=MANUFACTURING_APPROVED&page=3",
        response={"items": [{"orderId": ORDER, "status": "MANUFACTURING_APPROVED"}], "page": 3},
        rule="list-orders",
        route="/api/v1/orders",
    ),
    RouteCase(
        id="model-upload-post",
        rule_set="mes",
        method="POST",
        target=f"/api/v1/orders/{ORDER}/model",
        response={"orderId": ORDER, "bytes": 3, "sha256": "ab"},
        rule="model-upload",
        route="/api/v1/orders/{orderId}/model",
        order_id=ORDER,
    ),
    RouteCase(
        id="model-upload-put",
        rule_set="mes",
        method="PUT",
        target=f"/api/v1/orders/{ORDER}/model",
        rule="model-upload",
        route="/api/v1/orders/{orderId}/model",
        order_id=ORDER,
    ),
    RouteCase(
        id="model-download",
        rule_set="mes",
        method="GET",
        target=f"/api/v1/orders/{ORDER}/model",
        rule="model-download",
        route="/api/v1/orders/{orderId}/model",
        order_id=ORDER,
    ),
    RouteCase(
        id="health",
        rule_set="mes",
        method="GET",
        target="/api/v1/health",
        response={"status": "ok"},
        rule="health",
        route="/api/v1/health",
    ),
    RouteCase(
        id="crm-price-reported",
        rule_set="crm",
        method="PUT",
        target=f"/api/orders/{ORDER}/price",
        body={"price": 1250.5, "currency": "EUR"},
        rule="price-reported",
        route="/api/orders/{orderId}/price",
        order_id=ORDER,
        status="PRICE_CALCULATED",
    ),
    RouteCase(
        id="crm-status-reported",
        rule_set="crm",
        method="POST",
        target=f"/api/orders/{ORDER}/events",
        body={"status": "MANUFACTURING_COMPLETED"},
        rule="status-reported",
        route="/api/orders/{orderId}/events",
        order_id=ORDER,
        status="MANUFACTURING_COMPLETED",
    ),
    RouteCase(
        id="mes-route-on-crm-listener",
        rule_set="crm",
        method="PUT",
        target=f"/api/v1/orders/{ORDER}/status",
        rule=None,
    ),
    RouteCase(
        id="unknown-method-on-known-route",
        rule_set="mes",
        method="DELETE",
        target=f"/api/v1/orders/{ORDER}",
        rule=None,
    ),
)


def _encode(doc: object) -> bytes | None:
    return None if doc is None else json.dumps(doc).encode()


@pytest.mark.parametrize("case", REFERENCE_ROUTES, ids=[c.id for c in REFERENCE_ROUTES])
def test_reference_routes(case: RouteCase) -> None:
    """Every reference route of docs/mes-api.md yields its rule, template, order id and statuses."""
    path, _, query = case.target.partition("?")
    match = SETS[case.rule_set].match(case.method, path)
    if case.rule is None:
        assert match is None
        return
    assert match is not None
    assert (match.rule.name, match.rule.route) == (case.rule, case.route)
    headers = CIMultiDict(JSON)
    before = request_facts(match, raw_query=query, headers=headers, body=_encode(case.body))
    after = response_facts(
        match,
        before,
        raw_query=query,
        request_headers=headers,
        response_headers=CIMultiDict(JSON),
        response_body=_encode(case.response),
    )
    assert (after.order_id, after.status, after.observed_status) == (
        case.order_id,
        case.status,
        case.observed,
    )


def test_reference_table_covers_every_default_rule() -> None:
    """The reference table exercises each rule of both default rule sets at least once."""
    covered = {(c.rule_set, c.rule) for c in REFERENCE_ROUTES if c.rule is not None}
    defined = {(name, rule.name) for name, rules in SETS.items() for rule in rules.rules}
    assert covered == defined


def test_default_sampling_matches_the_docs() -> None:
    """Polling and health checks are sampled down; every other default rule leaves it to the SDK."""
    samples = {rule.name: rule.sample for rule in (*MES.rules, *CRM.rules)}
    assert samples.pop("list-orders") == 0.01
    assert samples.pop("health") == 0.0
    assert set(samples.values()) == {None}


def test_body_needs_are_precomputed() -> None:
    """Only rules with body:/response: sources ask the proxy to buffer a body."""
    needs = {r.name: (r.needs_request_body, r.needs_response_body) for r in MES.rules}
    assert needs["create-order"] == (True, True)
    assert needs["price-calculation"] == (False, False)
    assert needs["get-order"] == (False, True)
    assert needs["model-upload"] == (False, False)


# ── matching ──────────────────────────────────────────────────────────────────────────────

PRECEDENCE = compile_rules(
    [
        {"name": "by-id", "method": "*", "route": "/orders/{id}"},
        {"name": "health", "method": "GET", "route": "/orders/health"},
        {"name": "bulk", "method": ["POST", "put"], "route": "/orders/bulk"},
        {"name": "id-status", "method": "PUT", "route": "/orders/{id}/status"},
        {"name": "any-status", "route": "/orders/{id}/status"},
        {"name": "root", "method": "GET", "route": "/"},
        {"name": "nested", "method": "GET", "route": "/a/{x}/b/{y}"},
    ],
    key="rules",
)

MATCH_CASES: tuple[tuple[str, str, str, str | None, dict[str, str]], ...] = (
    ("literal-beats-param", "GET", "/orders/health", "health", {}),
    ("param-when-literal-refuses-method", "DELETE", "/orders/health", "by-id", {"id": "health"}),
    ("star-method", "OPTIONS", "/orders/A-1", "by-id", {"id": "A-1"}),
    ("list-method", "POST", "/orders/bulk", "bulk", {}),
    ("list-method-lowercase-in-config", "PUT", "/orders/bulk", "bulk", {}),
    ("list-method-miss-falls-back", "GET", "/orders/bulk", "by-id", {"id": "bulk"}),
    ("first-listed-wins", "PUT", "/orders/A-1/status", "id-status", {"id": "A-1"}),
    ("absent-method-is-any", "POST", "/orders/A-1/status", "any-status", {"id": "A-1"}),
    ("root", "GET", "/", "root", {}),
    ("two-params", "GET", "/a/1/b/2", "nested", {"x": "1", "y": "2"}),
    # The literal branch ("health") dead-ends one segment later: the parameter branch wins.
    ("backtrack-past-a-literal", "PUT", "/orders/health/status", "id-status", {"id": "health"}),
    ("trailing-slash-is-another-path", "GET", "/orders/A-1/", None, {}),
    ("trailing-slash-on-literal", "GET", "/orders/health/", None, {}),
    ("empty-segment-binds-nothing", "GET", "/orders/", None, {}),
    ("empty-inner-segment", "PUT", "/orders//status", None, {}),
    ("double-slash-start", "GET", "//orders/A-1", None, {}),
    ("prefix-only", "GET", "/orders", None, {}),
    ("too-long", "GET", "/orders/A-1/status/extra", None, {}),
    ("no-leading-slash", "GET", "orders/A-1", None, {}),
    ("asterisk-form", "OPTIONS", "*", None, {}),
    ("empty-path", "GET", "", None, {}),
    ("case-sensitive-literal", "GET", "/Orders/A-1", None, {}),
    ("method-is-case-sensitive", "put", "/orders/A-1/status", "any-status", {"id": "A-1"}),
    ("params-stay-encoded", "GET", "/orders/A%2F1", "by-id", {"id": "A%2F1"}),
)


@pytest.mark.parametrize(
    ("method", "path", "rule", "params"),
    [c[1:] for c in MATCH_CASES],
    ids=[c[0] for c in MATCH_CASES],
)
def test_match(method: str, path: str, rule: str | None, params: dict[str, str]) -> None:
    """Literal segments beat parameters, methods filter, and odd paths do not match."""
    match = PRECEDENCE.match(method, path)
    if rule is None:
        assert match is None
        return
    assert match is not None
    assert match.rule.name == rule
    assert dict(match.params) == params


@pytest.mark.parametrize(
    ("raw", "decoded"),
    [
        pytest.param("A%2F1", "A/1", id="encoded-slash"),
        pytest.param("A%2f1", "A/1", id="lower-case-hex"),
        pytest.param("A%201", "A 1", id="space"),
        pytest.param("%D0%90-1", "\u0410-1", id="utf8"),
        pytest.param("A+1", "A+1", id="plus-is-not-space-in-a-path"),
        pytest.param("A%FF1", "A\ufffd1", id="invalid-utf8-replaced"),
        pytest.param("A%zz", "A%zz", id="malformed-escape-kept"),
    ],
)
def test_path_parameters_are_percent_decoded(raw: str, decoded: str) -> None:
    """A path parameter is matched raw and handed out percent-decoded."""
    match = MES.match("GET", f"/api/v1/orders/{raw}")
    assert match is not None
    assert match.rule.name == "get-order"
    assert match.param("orderId") == decoded
    assert match.param("missing") is None


def test_encoded_id_becomes_the_order_id() -> None:
    """request_facts sees the decoded id, so A%2F1 and the body's "A/1" are the same order."""
    match = MES.match("PUT", "/api/v1/orders/A%2F1/status")
    assert match is not None
    facts = request_facts(match, raw_query="", headers=CIMultiDict(), body=b'{"status":"PACKAGING"}')
    assert facts.order_id == "A/1"


def test_empty_rule_set_matches_nothing() -> None:
    """A listener without rules matches no request."""
    assert CompiledRules([]).match("GET", "/") is None
    assert compile_rules([], key="rules").rules == ()


def test_rule_name_defaults_to_the_route() -> None:
    """A rule without a name is named by its route template."""
    rules = compile_rules([{"route": "/x/{id}"}], key="rules")
    assert rules.rules[0].name == "/x/{id}"
    assert rules.rules[0].methods is None


@pytest.mark.parametrize(
    ("spec", "kind", "canonical"),
    [
        pytest.param("path:orderId", SourceKind.PATH, "path:orderId", id="path"),
        pytest.param("query:order", SourceKind.QUERY, "query:order", id="query"),
        pytest.param("header:X-Order-Id", SourceKind.HEADER, "header:x-order-id", id="header-lowered"),
        pytest.param("body:/a~1b/~0c", SourceKind.BODY, "body:/a~1b/~0c", id="body-escapes-roundtrip"),
        pytest.param("response:/status", SourceKind.RESPONSE, "response:/status", id="response"),
        pytest.param("response_header:ETag", SourceKind.RESPONSE_HEADER, "response_header:etag", id="rh"),
        pytest.param("const:SUBMITTED", SourceKind.CONST, "const:SUBMITTED", id="const"),
        pytest.param("const:a:b", SourceKind.CONST, "const:a:b", id="const-with-colon"),
        pytest.param("body:", SourceKind.BODY, "body:", id="whole-body-pointer"),
    ],
)
def test_source_specs(spec: str, kind: SourceKind, canonical: str) -> None:
    """Each source kind compiles and prints back in its canonical spelling."""
    rules = compile_rules([{"route": "/o/{orderId}", "order_id": spec}], key="rules")
    source = rules.rules[0].order_id
    assert source is not None
    assert source.kind is kind
    assert source.spec == canonical


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        pytest.param("", (), id="whole-document"),
        pytest.param("/", ("",), id="empty-key"),
        pytest.param("/a/0", ("a", "0"), id="plain"),
        pytest.param("/a~1b", ("a/b",), id="tilde-one"),
        pytest.param("/m~0n", ("m~n",), id="tilde-zero"),
        pytest.param("/~01", ("~1",), id="tilde-zero-then-one-is-not-slash"),
        pytest.param("//", ("", ""), id="two-empty-keys"),
    ],
)
def test_parse_pointer(text: str, tokens: tuple[str, ...]) -> None:
    """RFC 6901 §4: '~1' becomes '/' before '~0' becomes '~'."""
    assert parse_pointer(text) == tokens


@pytest.mark.parametrize("text", ["a", "/a~2", "/a~", "/~a", "#/a"])
def test_parse_pointer_rejects(text: str) -> None:
    """A pointer must start with '/' and use '~' only as '~0' or '~1' (RFC 6901 §3)."""
    with pytest.raises(ValueError, match="RFC 6901"):
        parse_pointer(text)


# ── schema errors ─────────────────────────────────────────────────────────────────────────


def _rule(**fields: object) -> dict[str, object]:
    return {"name": "r", "method": "GET", "route": "/o/{orderId}", **fields}


BAD_RULES: tuple[tuple[str, object, str, str], ...] = (
    ("not-a-list", {"route": "/x"}, "rules", "list"),
    ("rule-not-mapping", ["/x"], "rules[0]", "mapping"),
    ("unknown-key", [_rule(sampl=0.5)], "rules[0].sampl", "unknown key"),
    ("route-missing", [{"name": "x"}], "rules[0].route", "starting with '/'"),
    ("route-relative", [_rule(route="api/x")], "rules[0].route", "starting with '/'"),
    ("route-not-string", [_rule(route=5)], "rules[0].route", "starting with '/'"),
    ("route-with-query", [_rule(route="/o?status=X")], "rules[0].route", "query"),
    ("route-with-fragment", [_rule(route="/o#x")], "rules[0].route", "query"),
    ("partial-segment-param", [_rule(route="/o/order-{id}")], "rules[0].route", "whole segment"),
    ("unclosed-param", [_rule(route="/o/{id")], "rules[0].route", "whole segment"),
    ("param-bad-name", [_rule(route="/o/{1d}")], "rules[0].route", "whole segment"),
    ("duplicate-param", [_rule(route="/o/{id}/x/{id}")], "rules[0].route", "twice"),
    (
        "conflicting-param-names",
        [_rule(route="/o/{orderId}"), _rule(name="s", route="/o/{id}/status", order_id="path:id")],
        "rules[1].route",
        "conflicts",
    ),
    ("source-not-string", [_rule(order_id=5)], "rules[0].order_id", "KIND:ARG"),
    ("source-no-colon", [_rule(order_id="orderId")], "rules[0].order_id", "KIND:ARG"),
    ("unknown-source-kind", [_rule(order_id="cookie:sid")], "rules[0].order_id", "unknown source kind"),
    ("path-missing-param", [_rule(order_id="path:id")], "rules[0].order_id", "not in the route"),
    ("path-without-name", [_rule(order_id="path:")], "rules[0].order_id", "needs a name"),
    ("const-without-value", [_rule(status="const:")], "rules[0].status", "needs a value"),
    ("bad-pointer-escape", [_rule(status="body:/a~2b")], "rules[0].status", "escape"),
    ("pointer-without-slash", [_rule(observed_status="response:status")], "rules[0].observed_status", "'/'"),
    ("bad-header-name", [_rule(order_id="header:X Order")], "rules[0].order_id", "header name"),
    ("bad-response-header", [_rule(status="response_header:a:b")], "rules[0].status", "header name"),
    ("sample-above-one", [_rule(sample=1.5)], "rules[0].sample", "0 to 1"),
    ("sample-negative", [_rule(sample=-0.1)], "rules[0].sample", "0 to 1"),
    ("sample-bool", [_rule(sample=True)], "rules[0].sample", "0 to 1"),
    ("sample-string", [_rule(sample="0.5")], "rules[0].sample", "0 to 1"),
    ("method-with-space", [_rule(method="GE T")], "rules[0].method", "not an HTTP method"),
    ("method-number", [_rule(method=5)], "rules[0].method", "list of methods"),
    ("method-empty-list", [_rule(method=[])], "rules[0].method", "list of methods"),
    ("method-list-with-number", [_rule(method=["GET", 1])], "rules[0].method", "not an HTTP method"),
    ("name-empty", [_rule(name="")], "rules[0].name", "non-empty"),
    ("second-rule-named", [_rule(), _rule(route="/p/{x")], "rules[1].route", "whole segment"),
)


@pytest.mark.parametrize(("raw", "key", "message"), [c[1:] for c in BAD_RULES], ids=[c[0] for c in BAD_RULES])
def test_bad_rules_name_the_key(raw: object, key: str, message: str) -> None:
    """Each invalid rule file fails with a RuleError naming exactly the key at fault."""
    with pytest.raises(RuleError) as info:
        compile_rules(raw, key="rules")
    assert info.value.key == key
    assert message in info.value.message
    assert str(info.value).startswith(f"{key}: ")


def test_same_parameter_name_in_two_routes_is_fine() -> None:
    """Routes sharing a parameter position compile when they name it alike."""
    rules = compile_rules(
        [_rule(route="/o/{orderId}"), _rule(name="s", route="/o/{orderId}/status")], key="rules"
    )
    match = rules.match("GET", "/o/A-1/status")
    assert match is not None
    assert match.rule.name == "s"
