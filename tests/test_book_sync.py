"""BookSync: the book's records reach the store, purged orders leave it, a failing feed is retried."""

from __future__ import annotations

import logging

import pytest

from mes_trace_proxy.book_sync import BookSync
from mes_trace_proxy.lifecycle import REFERENCE_LIFECYCLE
from mes_trace_proxy.orders import OrderBook, SpanRef
from mes_trace_proxy.store import MemoryStore, StoreWriter, open_store

T0 = 1_700_000_000.0


def _sync(store: MemoryStore | None = None) -> tuple[BookSync, OrderBook, MemoryStore]:
    store = store if store is not None else MemoryStore()
    book = OrderBook(REFERENCE_LIFECYCLE)
    return BookSync(book=book, store=store, writer=StoreWriter(store)), book, store


async def test_changes_and_purges_reach_the_store() -> None:
    """A changed order is written; an unknown id is not; a purged order is deleted."""
    sync, book, store = _sync()
    book.apply(order_id="A", status="CLOSED", observed=None, now=T0, span=SpanRef(1, 1))
    book.apply(order_id="B", status="SUBMITTED", observed=None, now=T0, span=SpanRef(2, 2))
    for order_id in ("A", "B", "never-seen"):
        sync.order_changed(order_id)
    assert await sync.writer.flush()
    assert set(store.records) == {"A", "B"}
    assert book.purge(T0 + 86400, retention=60) == 1
    assert sync.forget_removed() == 1
    assert sync.forget_removed() == 0  # drained once
    assert await sync.writer.flush()
    assert set(store.records) == {"B"}
    restored, restored_book, _ = _sync(store)
    assert await restored.restore() == 1
    assert restored_book.get("B") == book.get("B")


async def test_a_failing_change_feed_is_counted_logged_once_and_retried(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Reading another replica's changes from a dead Redis fails softly: counted, one line per outage."""
    # Port 9 on loopback: nothing listens (discard), so every connect is refused at once.
    store = open_store("redis://127.0.0.1:9/0")
    book = OrderBook(REFERENCE_LIFECYCLE)
    sync = BookSync(book=book, store=store, writer=StoreWriter(store))
    try:
        with caplog.at_level(logging.ERROR, logger="mes_trace_proxy.book_sync"):
            assert await sync.merge_changes() == (0, False)
            assert await sync.merge_changes() == (0, False)
        assert sync.store_stats()["errors"] == 2
        assert len([r for r in caplog.records if "change feed failed" in r.getMessage()]) == 1
    finally:
        await store.close()
