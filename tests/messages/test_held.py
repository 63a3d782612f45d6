"""Held messages: the JSON form, ``hold`` on good and bad input, and one contract for every store."""

from __future__ import annotations

import datetime
import decimal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mes_trace_proxy.messages.deadletter import DEFAULT_MESSAGE_RULES, Message, compile_message_rules
from mes_trace_proxy.messages.held import (
    CLAIM_TTL_S,
    HeldMessage,
    HeldStore,
    MemoryHeldStore,
    RedisHeldStore,
    SqliteHeldStore,
    decode_held,
    decode_value,
    encode_held,
    encode_value,
    hold,
    open_held_store,
)
from tests.conftest import RedisServer

RULES = compile_message_rules(list(DEFAULT_MESSAGE_RULES), key="message_rules")
T0 = datetime.datetime(2026, 12, 7, 12, 0, 0, tzinfo=datetime.UTC)
X_DEATH = [
    {"queue": "mes.price.requests", "reason": "expired", "count": 1, "exchange": "mes.commands",
     "routing-keys": ["price.calculate"], "time": T0, "original-expiration": "30000"},
]  # fmt: skip


def _held(
    order_id: str = "ORD-1", body: bytes | None = None, message_id: str = "m-1", at: float = 100.0
) -> HeldMessage:
    message = Message(
        body=body if body is not None else f'{{"orderId":"{order_id}","status":"SUBMITTED"}}'.encode(),
        headers={"x-death": X_DEATH, "traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"},
        exchange="mes.dlx",
        routing_key="price.calculate",
        message_id=message_id,
    )
    props = {
        "message_id": message_id,
        "content_type": "application/json",
        "delivery_mode": 2,
        "timestamp": T0,
    }
    return hold(message, props, consumed_from="mes.dead-letters", rules=RULES, now=at)


@pytest.mark.parametrize(
    "value",
    [None, True, 3, 2.5, "text", b"\x00\xffbytes", T0, decimal.Decimal("1.25"), [1, b"a", {"k": T0}],
     {"nested": {"$b": "looks like a tag"}}],
)  # fmt: skip
def test_field_values_round_trip(value: object) -> None:
    assert decode_value(encode_value(value)) == value


def test_held_message_round_trips_through_json() -> None:
    held = _held()
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
    held = _held()
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


# ── one contract, three stores ──────────────────────────────────────────────────────────────


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[HeldStore]:
    made: HeldStore
    if request.param == "memory":
        made = MemoryHeldStore()
    elif request.param == "sqlite":
        made = SqliteHeldStore(tmp_path / "state.db")
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        made = RedisHeldStore(server.url, prefix="t:")
    try:
        yield made
    finally:
        await made.close()


async def test_store_put_get_for_order_all_count_remove(store: HeldStore) -> None:
    a1, a2, b1 = _held("A", message_id="1", at=1.0), _held("A", message_id="2", at=2.0), _held("B", at=3.0)
    for held in (a2, b1, a1):
        await store.put(held)
    await store.put(a1)  # a redelivered copy: same key, no duplicate
    assert await store.count() == 3
    assert await store.get(a1.key) == a1
    assert await store.get("nope") is None
    assert [h.key for h in await store.for_order("A")] == [a1.key, a2.key]
    assert await store.for_order("nobody") == []
    assert [h.key for h in await store.all(2)] == [a1.key, a2.key]
    assert await store.summaries(10) == [a1.summary(), a2.summary(), b1.summary()]
    assert (await store.summaries(1))[0].dead_letter_object() == a1.dead_letter_object()
    await store.remove(a1.key)
    await store.remove("unknown")
    assert [h.key for h in await store.for_order("A")] == [a2.key]
    assert await store.count() == 2


async def test_store_claims_once_until_released_or_stale(store: HeldStore) -> None:
    held = _held()
    await store.put(held)
    assert await store.claim("absent", 10.0) is False
    assert await store.claim(held.key, 10.0) is True
    assert await store.claim(held.key, 11.0) is False
    await store.release(held.key)
    assert await store.claim(held.key, 12.0) is True
    if not isinstance(store, RedisHeldStore):  # Redis expires claims by its own clock (SET EX)
        assert await store.claim(held.key, 12.0 + CLAIM_TTL_S + 1) is True
    await store.remove(held.key)
    assert await store.claim(held.key, 100.0) is False


async def test_sqlite_store_keeps_messages_across_reopen(tmp_path: Path) -> None:
    first = SqliteHeldStore(tmp_path / "state.db")
    await first.put(_held())
    await first.close()
    second = open_held_store(f"sqlite:///{tmp_path / 'state.db'}")
    try:
        assert [h.order_id for h in await second.all(10)] == ["ORD-1"]
    finally:
        await second.close()


@pytest.mark.parametrize("url", ["memory", "sqlite:///x.db", "redis://127.0.0.1:1/0"])
def test_open_held_store_follows_the_state_url(url: str) -> None:
    kind = {"memory": MemoryHeldStore, "sqlite": SqliteHeldStore, "redis": RedisHeldStore}[url.split(":")[0]]
    assert isinstance(open_held_store(url), kind)


def test_open_held_store_refuses_other_urls() -> None:
    with pytest.raises(ValueError, match="state URL"):
        open_held_store("ftp://x")
