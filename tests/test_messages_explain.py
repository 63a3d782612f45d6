"""``explain-message``: the report for one dead letter, with no broker (tables)."""

from __future__ import annotations

import json

import pytest

from mes_trace_proxy.messages.deadletter import DEFAULT_MESSAGE_RULES, Message, compile_message_rules
from mes_trace_proxy.messages.explain import explain_message, format_report, parse_headers
from mes_trace_proxy.redact import PrivacyPolicy, Redactor

RULES = compile_message_rules(list(DEFAULT_MESSAGE_RULES), key="message_rules")
X_DEATH = json.dumps(
    [{"queue": "mes.price.requests", "reason": "expired", "count": 1, "exchange": "mes.commands",
      "routing-keys": ["price.calculate"], "time": 1765108800, "original-expiration": "30000"}]
)  # fmt: skip


def test_a_reference_dead_letter_is_explained_without_personal_data() -> None:
    body = (
        b'{"orderId":"ORD-9","status":"SUBMITTED","customer":{"email":"jo@example.com","name":"Jo Canary"}}'
    )
    message = Message(
        body=body, headers=parse_headers([], X_DEATH), routing_key="price.calculate", message_id="m-9"
    )
    report = explain_message(
        RULES, message, consumed_from="mes.dead-letters", redact=Redactor(PrivacyPolicy()).value
    )
    assert (report["rule"], report["order_id"], report["status"], report["problem"]) == (
        "price-request", "ORD-9", "SUBMITTED", None,
    )  # fmt: skip
    assert report["cause"] == "price request expired in mes.price.requests after 30 s"
    text = format_report(report)
    assert "jo@example.com" not in text
    assert "Jo Canary" not in text
    assert '"mes.message.death.reason": "expired"' in text


def test_a_message_without_x_death_says_so() -> None:
    report = explain_message(RULES, Message(body=b"{}", headers={}), consumed_from="dlq", redact=str)
    assert report["problem"] == "missing"
    assert report["cause"] == "message in dlq without an x-death header (missing)"


@pytest.mark.parametrize(
    ("pairs", "x_death", "needle"),
    [
        (["novalue"], None, "NAME:VALUE"),
        ([":x"], None, "NAME:VALUE"),
        ([], "{", "not JSON"),
        ([], "{}", "JSON list"),
    ],
)
def test_bad_headers_are_refused(pairs: list[str], x_death: str | None, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        parse_headers(pairs, x_death)


def test_headers_are_read() -> None:
    assert parse_headers(["x-order-id: A-1", "traceparent:00-x"], None) == {
        "x-order-id": "A-1",
        "traceparent": "00-x",
    }
