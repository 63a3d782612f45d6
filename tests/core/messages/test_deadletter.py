"""The pure dead-letter core: x-death, message rules, causes in words, stable keys (tables, no sockets)."""

from __future__ import annotations

import ast
import datetime
from pathlib import Path

import pytest

from mes_trace_proxy.core.messages import deadletter
from mes_trace_proxy.core.messages.deadletter import (
    DEFAULT_MESSAGE_RULES,
    DeadLetterError,
    Message,
    XDeath,
    cause_in_words,
    compile_message_rules,
    held_key,
    message_facts,
    parse_x_death,
)
from mes_trace_proxy.core.rules import RuleError

T0 = datetime.datetime(2026, 12, 7, 12, 0, 0, tzinfo=datetime.UTC)


def _death(**over: object) -> dict[str, object]:
    entry: dict[str, object] = {
        "queue": "mes.price.requests",
        "reason": "expired",
        "count": 1,
        "exchange": "mes.commands",
        "routing-keys": ["price.calculate"],
        "time": T0,
        "original-expiration": "30000",
    }
    entry.update(over)
    return entry


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        (_death(), XDeath(queue="mes.price.requests", reason="expired", count=1, exchange="mes.commands",
                          routing_keys=("price.calculate",), time=T0.timestamp(), original_expiration="30000")),  # noqa: E501
        # bytes as some clients hand back long strings; a naive datetime is UTC
        (_death(queue=b"q", reason=b"rejected", exchange=b"", **{"routing-keys": [b"k1", b"k2"]},
                time=T0.replace(tzinfo=None), **{"original-expiration": None}),
         XDeath(queue="q", reason="rejected", count=1, exchange="", routing_keys=("k1", "k2"),
                time=T0.timestamp())),
        # integer seconds, no routing keys, an unknown reason kept as written
        (_death(reason="something_new", time=1_700_000_000, count=3, **{"routing-keys": "notalist"}),
         XDeath(queue="mes.price.requests", reason="something_new", count=3, exchange="mes.commands",
                routing_keys=(), time=1_700_000_000.0, original_expiration="30000")),
    ],
)  # fmt: skip
def test_parse_x_death_reads_each_entry(entry: dict[str, object], expected: XDeath) -> None:
    assert parse_x_death({"x-death": [entry]}) == (expected,)


@pytest.mark.parametrize(
    ("headers", "kind"),
    [
        ({}, "missing"),
        ({"x-death": []}, "malformed"),
        ({"x-death": "expired"}, "malformed"),
        ({"x-death": ["not a table"]}, "malformed"),
        ({"x-death": [_death(queue=None)]}, "malformed"),
        ({"x-death": [_death(reason="")]}, "malformed"),
        ({"x-death": [_death(count=-1)]}, "malformed"),
        ({"x-death": [_death(count=True)]}, "malformed"),
    ],
)
def test_parse_x_death_refuses_with_a_kind(headers: dict[str, object], kind: str) -> None:
    with pytest.raises(DeadLetterError) as caught:
        parse_x_death(headers)
    assert caught.value.kind == kind


def test_parse_x_death_keeps_the_broker_order() -> None:
    deaths = parse_x_death({"x-death": [_death(queue="second"), _death(queue="first")]})
    assert [d.queue for d in deaths] == ["second", "first"]


@pytest.mark.parametrize(
    ("death", "words"),
    [
        (XDeath(queue="mes.price.requests", reason="expired", count=1, exchange="x", routing_keys=(), time=None,  # noqa: E501
                original_expiration="30000"),
         "price request expired in mes.price.requests after 30 s"),
        (XDeath(queue="q", reason="expired", count=1, exchange="x", routing_keys=(), time=None,
                original_expiration="1500"), "price request expired in q after 1.5 s"),
        (XDeath(queue="q", reason="expired", count=1, exchange="x", routing_keys=(), time=None,
                original_expiration="250"), "price request expired in q after 250 ms"),
        (XDeath(queue="q", reason="expired", count=1, exchange="x", routing_keys=(), time=None),
         "price request expired in q (queue TTL)"),
        (XDeath(queue="q", reason="rejected", count=2, exchange="x", routing_keys=(), time=None),
         "price request rejected by a consumer of q (2 times)"),
        (XDeath(queue="q", reason="maxlen", count=1, exchange="x", routing_keys=(), time=None),
         "price request dropped from q: the queue was full"),
        (XDeath(queue="q", reason="delivery_limit", count=1, exchange="x", routing_keys=(), time=None),
         "price request given up in q: delivery limit reached"),
        (XDeath(queue="q", reason="novel", count=1, exchange="x", routing_keys=(), time=None),
         "price request dead-lettered from q (novel)"),
    ],
)  # fmt: skip
def test_cause_in_words(death: XDeath, words: str) -> None:
    assert cause_in_words("price request", death) == words


RULES = compile_message_rules(list(DEFAULT_MESSAGE_RULES), key="message_rules")


def _message(body: bytes, **over: object) -> Message:
    fields: dict[str, object] = {
        "body": body,
        "headers": {},
        "exchange": "mes.dlx",
        "routing_key": "price.calculate",
    }
    fields.update(over)
    return Message(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("queue", "body", "order_id", "status", "rule", "is_json"),
    [
        ("mes.price.requests", b'{"orderId":"ORD-1","status":"SUBMITTED","customer":{"name":"Jo"}}',
         "ORD-1", "SUBMITTED", "price-request", True),
        ("mes.order.approved", b'{"orderId":"ORD-2","status":"MANUFACTURING_APPROVED"}',
         "ORD-2", "MANUFACTURING_APPROVED", "approved-order", True),
        ("some.other.queue", b'{"orderId":42,"status":"X"}', "42", "X", "any", True),
        ("mes.price.requests", b"not json", None, None, "price-request", False),
        # objects and arrays are never read out as facts
        ("mes.price.requests", b'{"orderId":{"nested":1},"status":["A"]}', None, None, "price-request", True),
        ("mes.price.requests", b'{"orderId":"' + b"x" * 201 + b'"}', None, None, "price-request", True),
    ],
)  # fmt: skip
def test_default_rules_read_the_reference_bodies(
    queue: str, body: bytes, order_id: str | None, status: str | None, rule: str, is_json: bool
) -> None:
    death = XDeath(queue=queue, reason="expired", count=1, exchange="e", routing_keys=("rk",), time=None)
    facts = message_facts(RULES, _message(body), (death,))
    assert (facts.order_id, facts.status, facts.rule.name if facts.rule else None, facts.body_is_json) == (
        order_id, status, rule, is_json,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("header:x-order-id", "ORD-H"),
        ("routing_key", "order.ORD-RK"),
        ("message_id", "ORD-MID"),
        ("correlation_id", "ORD-CID"),
        ("const:fixed", "fixed"),
        ("body:/items/1/id", "second"),
        ("header:absent", None),
    ],
)
def test_every_source_kind(source: str, expected: str | None) -> None:
    rules = compile_message_rules([{"name": "r", "order_id": source}], key="message_rules")
    message = _message(
        b'{"items":[{"id":"first"},{"id":"second"}]}',
        headers={"x-order-id": b"ORD-H"},
        routing_key="ignored-when-x-death-has-one",
        message_id="ORD-MID",
        correlation_id="ORD-CID",
    )
    death = XDeath(
        queue="q", reason="rejected", count=1, exchange="e", routing_keys=("order.ORD-RK",), time=None
    )
    assert message_facts(rules, message, (death,)).order_id == expected


def test_routing_key_falls_back_to_the_message_without_x_death() -> None:
    rules = compile_message_rules([{"order_id": "routing_key"}], key="k")
    assert message_facts(rules, _message(b"", routing_key="rk-1"), ()).order_id == "rk-1"


def test_rules_match_by_queue_and_routing_key_first_wins() -> None:
    rules = compile_message_rules(
        [
            {"name": "by-both", "queue": "q", "routing_key": "a", "order_id": "const:1"},
            {"name": "by-queue", "queue": "q", "order_id": "const:2"},
            {"name": "by-key", "routing_key": "b", "order_id": "const:3"},
        ],
        key="k",
    )
    assert [r.name if r else None for r in (rules.match("q", "a"), rules.match("q", "b"), rules.match("p", "b"),  # noqa: E501
                                            rules.match("p", "c"))] == ["by-both", "by-queue", "by-key", None]  # fmt: skip  # noqa: E501


@pytest.mark.parametrize(
    ("raw", "key", "needle"),
    [
        ("not a list", "message_rules", "expected a list"),
        (["x"], "message_rules[0]", "must be a mapping"),
        ([{"oops": 1}], "message_rules[0].oops", "unknown key"),
        ([{"order_id": "path:x"}], "message_rules[0].order_id", "unknown message source kind"),
        ([{"order_id": "body:noslash"}], "message_rules[0].order_id", "must start with '/'"),
        ([{"order_id": "routing_key:x"}], "message_rules[0].order_id", "takes no argument"),
        ([{"order_id": "header:"}], "message_rules[0].order_id", "needs a name"),
        ([{"status": "const:"}], "message_rules[0].status", "needs a value"),
        ([{"queue": ""}], "message_rules[0].queue", "non-empty string"),
        ([{"order_id": 5}], "message_rules[0].order_id", "expected a source"),
    ],
)
def test_bad_rules_name_the_key(raw: object, key: str, needle: str) -> None:
    with pytest.raises(RuleError) as caught:
        compile_message_rules(raw, key="message_rules")
    assert caught.value.key == key
    assert needle in caught.value.message


def test_held_key_is_stable_and_tells_messages_apart() -> None:
    death = parse_x_death({"x-death": [_death()]})
    one = _message(b'{"orderId":"A"}', message_id="m1")
    assert held_key(one, death) == held_key(_message(b'{"orderId":"A"}', message_id="m1"), death)
    assert held_key(one, death) != held_key(_message(b'{"orderId":"B"}', message_id="m1"), death)
    assert held_key(one, death) != held_key(one, parse_x_death({"x-death": [_death(count=2)]}))
    assert held_key(one, ()) != held_key(one, death)


def test_the_core_module_imports_no_io() -> None:
    """deadletter.py is pure: no broker client, asyncio, clock, environment or disk."""
    tree = ast.parse(Path(deadletter.__file__).read_text(encoding="utf-8"))
    names = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    names |= {
        (node.module or "").split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
    }
    assert names.isdisjoint(
        {"aio_pika", "aiormq", "asyncio", "os", "time", "socket", "sqlite3", "redis", "pathlib"}
    )
