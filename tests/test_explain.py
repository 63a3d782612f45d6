"""Tests for explain: the rule, span name and attributes of a request, with no socket and no personal data."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mes_trace_proxy.cli import read_default_rules
from mes_trace_proxy.core.config import Config, ConfigError, load_config
from mes_trace_proxy.core.redact import pseudonymize
from mes_trace_proxy.explain import explain

USER_KEY = b"explain-test-key-0123456789abcdef"
CONFIG = load_config(
    flags={
        "upstream": "http://mes.internal:8081",
        "egress_listen": "127.0.0.1:8090",
        "egress_upstream": "http://crm.internal:8080",
    },
    environ={"MES_PROXY_USER_ID_KEY": USER_KEY.decode()},
    file_doc=None,
    defaults=read_default_rules(),
)
JSON = ("Content-Type", "application/json")


@dataclass(frozen=True, slots=True, kw_only=True)
class ExplainCase:
    """A request and the parts of the report it must produce."""

    id: str
    method: str
    target: str
    headers: tuple[tuple[str, str], ...] = (JSON,)
    body: bytes | None = None
    response_body: bytes | None = None
    listener: str | None = None
    rule: str | None
    span_name: str
    attributes: dict[str, str] = field(default_factory=dict)
    inspected: bool = False


CASES: tuple[ExplainCase, ...] = (
    ExplainCase(
        id="set-status",
        method="PUT",
        target="/api/v1/orders/A-1001/status",
        body=b'{"status": "SHIPPED"}',
        response_body=b'{"orderId": "A-1001", "status": "SHIPPED"}',
        rule="set-status",
        span_name="PUT /api/v1/orders/{orderId}/status",
        attributes={
            "http.request.method": "PUT",
            "http.route": "/api/v1/orders/{orderId}/status",
            "mes.order.id": "A-1001",
            "mes.order.status": "SHIPPED",
            "mes.order.status.observed": "SHIPPED",
            "mes.proxy.listener": "ingress",
            "mes.rule": "set-status",
            "url.path": "/api/v1/orders/A-1001/status",
        },
        inspected=True,
    ),
    ExplainCase(
        id="create-order",
        method="POST",
        target="/api/v1/orders",
        body=b'{"orderId": "A-2", "status": "MANUFACTURING_APPROVED"}',
        rule="create-order",
        span_name="POST /api/v1/orders",
        attributes={"mes.order.id": "A-2", "mes.order.status": "MANUFACTURING_APPROVED"},
        inspected=True,
    ),
    ExplainCase(
        id="body-not-json-is-not-inspected",
        method="PUT",
        target="/api/v1/orders/A-1/status",
        headers=(("Content-Type", "text/plain"),),
        body=b'{"status": "SHIPPED"}',
        rule="set-status",
        span_name="PUT /api/v1/orders/{orderId}/status",
        attributes={"mes.order.id": "A-1"},
    ),
    ExplainCase(
        id="body-over-limit-is-not-inspected",
        method="PUT",
        target="/api/v1/orders/A-1/status",
        body=b'{"status": "SHIPPED", "pad": "' + b"x" * (64 * 1024) + b'"}',
        rule="set-status",
        span_name="PUT /api/v1/orders/{orderId}/status",
        attributes={"mes.order.id": "A-1"},
    ),
    ExplainCase(
        id="price-calculation-const-status",
        method="POST",
        target="/api/v1/orders/A-3/price-calculation",
        rule="price-calculation",
        span_name="POST /api/v1/orders/{orderId}/price-calculation",
        attributes={"mes.order.id": "A-3", "mes.order.status": "SUBMITTED"},
    ),
    ExplainCase(
        id="list-orders-query-allow-list",
        method="GET",
        target="/api/v1/orders?status=MANUFACTURING_APPROVED&page=2&customer=Jane",
        rule="list-orders",
        span_name="GET /api/v1/orders",
        attributes={"url.query": "status=MANUFACTURING_APPROVED&page=2", "url.path": "/api/v1/orders"},
    ),
    ExplainCase(
        id="no-rule",
        method="GET",
        target="/internal/debug",
        rule=None,
        span_name="GET",
        attributes={"url.path": "/internal/debug", "mes.proxy.listener": "ingress"},
    ),
    ExplainCase(
        id="unknown-method",
        method="PURGE",
        target="/api/v1/orders/A-1",
        rule=None,
        span_name="HTTP",
        attributes={"http.request.method": "_OTHER", "http.request.method_original": "PURGE"},
    ),
    ExplainCase(
        id="egress-listener",
        method="POST",
        target="/api/orders/A-4/events",
        body=b'{"status": "PACKAGING"}',
        listener="egress",
        rule="status-reported",
        span_name="POST /api/orders/{orderId}/events",
        attributes={"mes.proxy.listener": "egress", "mes.order.status": "PACKAGING"},
        inspected=True,
    ),
)


def _report(case: ExplainCase, config: Config = CONFIG) -> dict[str, object]:
    return explain(
        config,
        method=case.method,
        target=case.target,
        headers=case.headers,
        body=case.body,
        response_body=case.response_body,
        listener=case.listener,
    )


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_explain_table(case: ExplainCase) -> None:
    """Each request is reported with its rule, span name, body inspection and attributes."""
    report = _report(case)
    assert report["rule"] == case.rule
    assert report["span_name"] == case.span_name
    assert report["body_inspected"] is case.inspected
    attributes = report["attributes"]
    assert isinstance(attributes, dict)
    assert {key: attributes.get(key) for key in case.attributes} == case.attributes
    assert json.loads(json.dumps(report)) == report


def test_status_change_event_and_sampling_are_reported() -> None:
    """A status-setting call shows its span event; a sampled-down rule shows its ratio."""
    status = _report(CASES[0])
    assert status["event"] == {
        "name": "mes.order.status_change",
        "attributes": {"mes.order.status": "SHIPPED"},
    }
    listing = _report(CASES[5])
    assert listing["sample"] == 0.01
    assert "event" not in listing


CANARIES = ("Jane Roe", "jane.roe@example.com", "+44 20 7946 0958", "221B Baker Street", "user-42")


def test_personal_data_never_reaches_the_report() -> None:
    """A body, query, path and headers full of personal data leave no trace of it in the report."""
    body = json.dumps(
        {
            "orderId": "A-5",
            "status": "SUBMITTED",
            "customer": {"name": CANARIES[0], "email": CANARIES[1], "phone": CANARIES[2]},
            "address": CANARIES[3],
        }
    ).encode()
    report = explain(
        CONFIG,
        method="POST",
        target="/api/v1/orders?status=jane.roe%40example.com&email=jane.roe@example.com",
        headers=[JSON, ("X-User-Id", CANARIES[4]), ("Authorization", "Bearer secret-token")],
        body=body,
        response_body=json.dumps({"orderId": "A-5", "status": "SUBMITTED", "email": CANARIES[1]}).encode(),
    )
    dump = json.dumps(report)
    for canary in (*CANARIES, "jane.roe%40example.com", "secret-token"):
        assert canary not in dump
    attributes = report["attributes"]
    assert isinstance(attributes, dict)
    assert attributes["mes.order.id"] == "A-5"
    # The caller is recorded only as the keyed pseudonym.
    assert attributes["enduser.id"] == pseudonymize(USER_KEY, CANARIES[4])


def test_personal_order_id_in_path_is_redacted() -> None:
    """An e-mail used as an order id in the path is redacted in url.path and mes.order.id."""
    report = explain(
        CONFIG, method="GET", target="/api/v1/orders/jane.roe@example.com", headers=[], body=None
    )
    assert "jane.roe" not in json.dumps(report)
    assert report["rule"] == "get-order"


def test_no_user_key_no_user_id() -> None:
    """Without a configured key, enduser.id is never recorded."""
    config = load_config(
        flags={"upstream": "http://mes"}, environ={}, file_doc=None, defaults=read_default_rules()
    )
    report = explain(config, method="GET", target="/api/v1/health", headers=[("X-User-Id", "u-1")], body=None)
    attributes = report["attributes"]
    assert isinstance(attributes, dict)
    assert "enduser.id" not in attributes


@pytest.mark.parametrize(
    ("method", "target", "headers", "status"),
    [
        pytest.param("GET", "//evil.example/api", [], 400, id="network-path"),
        pytest.param("CONNECT", "evil.example:443", [], 405, id="connect"),
        pytest.param("GET", "evil.example:443", [], 400, id="authority-form"),
        pytest.param("GET", "/api/v1/orders/..%2f..%2fadmin", [], 400, id="encoded-dot-segments"),
        pytest.param("GET", "/api/../../etc/passwd", [], 400, id="climb-above-root"),
        pytest.param("GET", "/api/v1/health", [("Host", "a"), ("Host", "b")], 400, id="two-hosts"),
    ],
)
def test_refused_targets_are_reported(
    method: str, target: str, headers: list[tuple[str, str]], status: int
) -> None:
    """A request the proxy would refuse is reported as refused, with the answer's status and type."""
    report = explain(CONFIG, method=method, target=target, headers=headers, body=None)
    refused = report["refused"]
    assert isinstance(refused, dict)
    assert refused["status"] == status
    assert str(refused["type"]).startswith("urn:mes-trace-proxy:problem:")
    assert "rule" not in report


def test_unknown_listener_names_the_flag() -> None:
    """--listener naming no listener is a ConfigError on --listener listing the ones there are."""
    with pytest.raises(ConfigError) as info:
        explain(CONFIG, method="GET", target="/", headers=[], body=None, listener="erp")
    assert info.value.key == "--listener"
    assert "ingress, egress" in info.value.message


_SEGMENTS = st.one_of(
    st.sampled_from(["api", "v1", "orders", "A-1", "status", "model", "health", "", "%2F", "%zz", ".."]),
    st.text(max_size=6),
)


# 200 examples keep the property under a second while still mixing odd segments, bytes and queries.
@settings(max_examples=200, deadline=None)
@given(
    method=st.sampled_from(["GET", "PUT", "POST", "PATCH", "PURGE", "get"]),
    segments=st.lists(_SEGMENTS, max_size=6),
    query=st.text(max_size=20),
    body=st.binary(max_size=64) | st.text(max_size=40).map(str.encode),
)
def test_explain_never_raises(method: str, segments: list[str], query: str, body: bytes) -> None:
    """Any method, path, query and body gives a JSON-ready report (matched, unmatched or refused)."""
    target = "/" + "/".join(segments) + (f"?{query}" if query else "")
    report = explain(CONFIG, method=method, target=target, headers=[JSON], body=body, response_body=body)
    assert json.loads(json.dumps(report)) == report
    assert ("refused" in report) != ("span_name" in report)


def test_a_body_not_inspected_says_why_and_how_to_fix_it() -> None:
    """Issue 15: a JSON body sent without a JSON Content-Type is not read, and the report says so."""
    report = explain(
        CONFIG,
        method="PUT",
        target="/api/v1/orders/A-1001/status",
        headers=[],
        body=b'{"status": "SHIPPED"}',
    )
    assert report["body_inspected"] is False
    why = report["body_not_inspected"]
    assert isinstance(why, dict)
    assert "Content-Type is not JSON" in str(why["reason"])
    assert "Content-Type: application/json" in str(why["fix"])
    assert "mes.order.status" not in report["attributes"]  # type: ignore[operator]


def test_a_json_file_is_assumed_json_and_the_report_says_so() -> None:
    """--body status.json with no Content-Type is read as JSON; the assumption is reported."""
    report = explain(
        CONFIG,
        method="PUT",
        target="/api/v1/orders/A-1001/status",
        headers=[],
        body=b'{"status": "SHIPPED"}',
        body_file="samples/Status.JSON",
    )
    assert report["body_inspected"] is True
    assert "application/json" in str(report["assumed"])
    assert "body_not_inspected" not in report
    attributes = report["attributes"]
    assert isinstance(attributes, dict)
    assert attributes["mes.order.status"] == "SHIPPED"


def test_a_declared_content_type_wins_over_the_file_name() -> None:
    """A Content-Type the user gave is never replaced: text/plain stays text/plain, and is not read."""
    report = explain(
        CONFIG,
        method="PUT",
        target="/api/v1/orders/A-1001/status",
        headers=[("Content-Type", "text/plain")],
        body=b'{"status": "SHIPPED"}',
        body_file="status.json",
    )
    assert report["body_inspected"] is False
    assert "assumed" not in report


def test_explain_refuses_what_the_handler_refuses() -> None:
    """The handler's refusals, all of them: a header value that is not UTF-8 and a body over max_body_size."""
    latin1 = b"caf\xe9".decode("utf-8", "surrogateescape")
    refused = explain(CONFIG, method="GET", target="/api/v1/health", headers=[("X-Note", latin1)], body=None)
    assert refused["refused"] == {
        "status": 400,
        "type": "urn:mes-trace-proxy:problem:bad_request",
        "title": "Bad request",
    }
    small = load_config(
        flags={"upstream": "http://mes.internal:8081", "max_body_size": "16"},
        environ={},
        file_doc=None,
        defaults=read_default_rules(),
    )
    too_large = explain(
        small, method="PUT", target="/api/v1/orders/A-1/status", headers=[JSON], body=b"x" * 17
    )
    assert isinstance(too_large["refused"], dict)
    assert too_large["refused"]["status"] == 413
