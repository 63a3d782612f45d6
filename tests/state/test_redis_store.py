"""Tests for the Redis store against a real redis-server: round trip, change feed, replicas, outage."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from mes_trace_proxy.core.lifecycle import REFERENCE_LIFECYCLE, TransitionKind
from mes_trace_proxy.core.orders import HistoryEntry, OrderBook, OrderRecord, SpanRef
from mes_trace_proxy.state.redis_store import RedisStore
from mes_trace_proxy.state.store import StoreWriter, open_store
from tests.conftest import RedisServer

pytestmark = pytest.mark.needs_redis

T0 = 1_700_000_000.0
WAIT = 5.0  # seconds any wait on the writer may take before the test fails
SUBMITTED_LIMIT = 15 * 60.0


@pytest.fixture
async def open_redis(redis_server: RedisServer) -> AsyncIterator[Callable[[], RedisStore]]:
    """Factory of stores on ``redis_server``; every one is closed at the end."""
    made: list[RedisStore] = []

    def factory() -> RedisStore:
        store = open_store(redis_server.url)
        assert isinstance(store, RedisStore)
        made.append(store)
        return store

    yield factory
    for store in reversed(made):
        await store.close()


def record(order_id: str, *statuses: str, stuck: bool = False) -> OrderRecord:
    """A record whose history walks ``statuses`` one second apart."""
    entries = [
        HistoryEntry(
            status=status,
            at=T0 + i,
            span=SpanRef((i + 1) << 70 | 5, i + 1),
            kind=TransitionKind.FIRST if i == 0 else TransitionKind.FORWARD,
        )
        for i, status in enumerate(statuses or ("SUBMITTED",))
    ]
    return OrderRecord.from_entries(order_id, entries, stuck_reported=stuck)


async def test_round_trip(open_redis: Callable[[], RedisStore]) -> None:
    """Saved records load back equal; saves replace, deletes remove."""
    store = open_redis()
    await store.save([record("a"), record("b", stuck=True)])
    await store.save([record("a", "SUBMITTED", "PRICE_CALCULATED")])
    loaded = {r.order_id: r for r in await store.load()}
    assert loaded == {"a": record("a", "SUBMITTED", "PRICE_CALCULATED"), "b": record("b", stuck=True)}
    await store.delete(["a", "unknown"])
    assert [r.order_id for r in await store.load()] == ["b"]
    await store.save([])
    await store.delete([])


async def test_load_pages_through_many_orders(open_redis: Callable[[], RedisStore]) -> None:
    """Load returns every record even when the hash needs several HSCAN pages."""
    store = open_redis()
    await store.save([record(f"o-{i}") for i in range(2500)])
    assert len({r.order_id for r in await store.load()}) == 2500


async def test_change_feed(open_redis: Callable[[], RedisStore]) -> None:
    """Another store sees each write after its cursor once, in write order, deletes excluded."""
    writer, reader = open_redis(), open_redis()
    await writer.save([record("before")])
    assert [r.order_id for r in await reader.load()] == ["before"]
    records, cursor = await reader.changes_since(None)  # starts where load() did
    assert records == []
    await writer.save([record("a")])
    records, cursor = await reader.changes_since(cursor)
    assert [r.order_id for r in records] == ["a"]
    assert await reader.changes_since(cursor) == ([], cursor)
    await writer.save([record("b"), record("a", "SUBMITTED", "PRICE_CALCULATED"), record("c")])
    await writer.delete(["c"])
    records, cursor = await reader.changes_since(cursor)
    assert [(r.order_id, r.status) for r in records] == [("b", "SUBMITTED"), ("a", "PRICE_CALCULATED")]
    with pytest.raises(ValueError, match="cursor"):
        await reader.changes_since("not-a-cursor")


async def sync(book: OrderBook, store: RedisStore, cursor: str | None) -> str | None:
    """What a replica's sync loop does: merge every change after ``cursor``."""
    while True:
        records, cursor = await store.changes_since(cursor)
        if not records:
            return cursor
        for rec in records:
            book.merge(rec)


async def test_two_replicas_converge(open_redis: Callable[[], RedisStore]) -> None:
    """Two books sharing Redis through their own stores agree on status and stuck flags."""
    store_a, store_b = open_redis(), open_redis()
    book_a, book_b = OrderBook(REFERENCE_LIFECYCLE), OrderBook(REFERENCE_LIFECYCLE)
    writer_a, writer_b = StoreWriter(store_a), StoreWriter(store_b)
    book_a.load(await store_a.load())
    book_b.load(await store_b.load())
    cursor_a, cursor_b = await sync(book_a, store_a, None), await sync(book_b, store_b, None)

    book_a.apply(order_id="o-1", status="SUBMITTED", observed=None, now=T0, span=SpanRef(1, 1))
    writer_a.enqueue(book_a.to_record("o-1"))
    assert await writer_a.flush()
    cursor_b = await sync(book_b, store_b, cursor_b)
    assert book_b.get("o-1") == book_a.get("o-1")

    # A reports the stay stuck and persists the flag; B must not report it again.
    (stuck,) = book_a.overdue(T0 + SUBMITTED_LIMIT + 1)
    writer_a.enqueue(book_a.to_record(stuck.order_id))
    assert await writer_a.flush()
    cursor_b = await sync(book_b, store_b, cursor_b)
    assert book_b.overdue(T0 + SUBMITTED_LIMIT + 2) == []
    assert [s.order_id for s in book_b.stuck(T0 + SUBMITTED_LIMIT + 2)] == ["o-1"]

    # The next call lands on B; A learns of it and the stuck flag ends on both.
    found = book_b.apply(
        order_id="o-1", status="PRICE_CALCULATED", observed=None, now=T0 + 1000, span=SpanRef(2, 2)
    )
    assert found.was_stuck
    writer_b.enqueue(book_b.to_record("o-1"))
    assert await writer_b.flush()
    cursor_a = await sync(book_a, store_a, cursor_a)
    await sync(book_b, store_b, cursor_b)
    assert book_a.to_record("o-1") == book_b.to_record("o-1")
    view = book_a.get("o-1")
    assert view is not None
    assert (view.status, view.stuck) == ("PRICE_CALCULATED", False)
    await writer_a.stop()
    await writer_b.stop()


async def test_writer_survives_redis_outage(
    redis_server: RedisServer, open_redis: Callable[[], RedisStore], caplog: pytest.LogCaptureFixture
) -> None:
    """With Redis down the writer keeps changes and raises nothing; after a restart it catches up."""
    store = open_redis()
    await store.save([record("before")])
    writer = StoreWriter(store, interval=0.001, backoff_cap=0.005)
    writer.start()
    try:
        redis_server.kill()
        writer.enqueue(record("o-written-late"))
        assert not await writer.flush()
        assert (writer.healthy, writer.pending) == (False, 1)
        assert writer.errors_total >= 1
        assert "state store write failed" in caplog.text

        redis_server.start()  # same socket; an empty server (no persistence)
        async with asyncio.timeout(WAIT):
            await writer.drained()
        assert writer.healthy
    finally:
        await writer.stop()
    assert [r.order_id for r in await open_redis().load()] == ["o-written-late"]
    assert "recovered" in caplog.text
    assert "o-written-late" not in caplog.text
