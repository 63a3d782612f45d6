"""Held-message records: the JSON form, and ``hold`` on good and bad input (tables, no I/O)."""

from __future__ import annotations

import decimal

import pytest

from mes_trace_proxy.messages.deadletter import Message
from mes_trace_proxy.messages.record import (
    decode_held,
    decode_value,
    encode_held,
    encode_value,
    hold,
)
from tests.message_samples import RULES, T0, X_DEATH, sample_held


@pytest.mark.parametrize(
    "value",
    [None, True, 3, 2.5, "text", b"\x00\xffbytes", T0, decimal.Decimal("1.25"), [1, b"a", {"k": T0}],
     {"nested": {"$b": "looks like a tag"}}],
)  # fmt: skip
def test_field_values_round_trip(value: object) -> None:
    assert decode_value(encode_value(value)) == value


def test_held_message_round_trips_through_json() -> None:
    held = sample_held()
    again = decode_held(encode_held(held))
    assert again == held
    assert again.body == held.body
    assert again.headers == held.headers
    assert again.properties == held.properties


@pytest.mark.parametrize("data", ["{}", '{"v": 99}', "not json", '{"v":1,"key":"k"}'])
def test_decode_refuses_what_is_not_a_held_message(data: str) -> None:
    with pytest.raises(ValueError, match="not a valid held message"):
        decode_held(data)


def test_hold_reads_order_cause_and_dead_letter_object() -> None:
    held = sample_held()
    assert (held.order_id, held.status, held.rule, held.problem) == (
        "ORD-1",
        "SUBMITTED",
        "price-request",
        None,
    )
    assert held.cause == "price request expired in mes.price.requests after 30 s"
    assert held.dead_letter_object() == {
        "queue": "mes.price.requests", "reason": "expired", "count": 1, "exchange": "mes.commands",
        "routing_key": "price.calculate", "time": "2026-12-07T12:00:00Z", "message_id": "m-1",
        "cause": "price request expired in mes.price.requests after 30 s",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("headers", "body", "problem", "order_id"),
    [
        ({}, b'{"orderId":"A"}', "missing", "A"),
        ({"x-death": "garbage"}, b'{"orderId":"A"}', "malformed", "A"),
        ({"x-death": X_DEATH}, b"\xff not json", "not_json", None),
        ({"x-death": X_DEATH}, b'{"status":"SUBMITTED"}', "no_order", None),
    ],
)
def test_hold_keeps_bad_input_with_a_problem_word(
    headers: dict[str, object], body: bytes, problem: str, order_id: str | None
) -> None:
    held = hold(Message(body=body, headers=headers), {}, consumed_from="dlq", rules=RULES, now=1.0)
    assert (held.problem, held.order_id, held.body) == (problem, order_id, body)
    assert held.cause
