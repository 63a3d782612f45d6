"""``explain-message``: the report for one dead letter, with no broker (tables)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mes_trace_proxy import cli
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


def test_the_cli_explains_a_message_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    body = tmp_path / "body.json"
    body.write_text('{"orderId":"ORD-CLI","status":"SUBMITTED","customer":{"email":"jo@example.com"}}')
    x_death = tmp_path / "x-death.json"
    x_death.write_text(X_DEATH)
    argv = ["explain-message", "--body", str(body), "--x-death", str(x_death), "--message-id", "m-1"]
    assert cli.main(argv, environ={}) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["order_id"], report["dead_letter"]["message_id"]) == ("ORD-CLI", "m-1")
    assert report["dead_letter"]["time"] == "2025-12-07T12:00:00Z"
    assert "jo@example.com" not in json.dumps(report)


def test_the_cli_names_an_unreadable_body(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["explain-message", "--body", str(tmp_path / "missing.json")], environ={}) == 2
    assert "--body" in capsys.readouterr().err
