"""Held-message stores: one contract for memory, SQLite and Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mes_trace_proxy.messages.held import (
    CLAIM_TTL_S,
    HeldStore,
    MemoryHeldStore,
    RedisHeldStore,
    SqliteHeldStore,
    open_held_store,
)
from tests.conftest import RedisServer
from tests.message_samples import sample_held

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
    a1, a2, b1 = (
        sample_held("A", message_id="1", at=1.0),
        sample_held("A", message_id="2", at=2.0),
        sample_held("B", at=3.0),
    )
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
    held = sample_held()
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
    await first.put(sample_held())
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
