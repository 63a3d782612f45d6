"""Keeps the order book and its state store in step: restore at start, write behind, merge replicas.

The order book is the truth the proxy answers from; the store is where it survives a restart
and, when shared (Redis), how replicas learn each other's changes. Nothing here ever raises
into the request path or the watchdog: a failing store is counted, logged once, and retried.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Final

from mes_trace_proxy.orders import OrderBook
from mes_trace_proxy.store import StateStore, StoreWriter

__all__ = ["BookSync"]

log = logging.getLogger("mes_trace_proxy.book_sync")

# Feed pages merged per call (1,000 records each, store_redis._FEED_PAGE): a replica that
# fell far behind catches up over a few watchdog checks instead of stalling one for minutes.
_SYNC_PAGES: Final = 100


class BookSync:
    """The order book's traffic with its store: restore, write-behind, replica merge, deletions.

    Args:
        book: The process's order book.
        store: Where order records persist (``store.open_store``); also the replicas' change feed.
        writer: The write-behind writer over ``store`` (started and stopped by the caller).
    """

    def __init__(self, *, book: OrderBook, store: StateStore, writer: StoreWriter) -> None:
        self.book = book
        self.store = store
        self.writer = writer
        self._cursor: str | None = None
        self._feed_failing = False
        self.load_errors = 0
        self.sync_errors = 0

    async def restore(self) -> int:
        """Load the stored records into the book; a failing store leaves it empty, loudly.

        Returns:
            How many records changed the book (0 when the store could not be read).
        """
        try:
            records = await self.store.load()
        except Exception as exc:  # a dead store must not stop the proxy from starting
            self.load_errors += 1
            log.error(
                "state store load failed; starting with no order state (writes retry in the "
                "background): %s: %s",
                type(exc).__name__,
                str(exc)[:200],
            )
            return 0
        changed = self.book.load(records)
        log.info("order state restored", extra={"orders": len(self.book), "records": len(records)})
        return changed

    def order_changed(self, order_id: str) -> None:
        """Schedule the order's record for writing (O(1); called on the request path)."""
        if order_id in self.book:
            self.writer.enqueue(self.book.to_record(order_id))

    def forget_removed(self) -> int:
        """Schedule the deletion of every order the book purged or evicted; returns how many."""
        removed = self.book.drain_removed()
        for order_id in removed:
            self.writer.enqueue_delete(order_id)
        return len(removed)

    async def merge_changes(self) -> tuple[int, bool]:
        """Merge the records other replicas wrote since the last call.

        Returns:
            How many records changed the book, and False when reading the feed failed (the
            next call retries from the same cursor).
        """
        merged = 0
        try:
            for _ in range(_SYNC_PAGES):
                records, self._cursor = await self.store.changes_since(self._cursor)
                if not records:
                    break
                merged += sum(self.book.merge(record) for record in records)
        except Exception as exc:  # the feed fails with the store; retried next check
            self.sync_errors += 1
            if not self._feed_failing:
                self._feed_failing = True
                log.error(
                    "state store change feed failed; replicas may disagree until it recovers: %s: %s",
                    type(exc).__name__,
                    str(exc)[:200],
                )
            return merged, False
        if self._feed_failing:
            self._feed_failing = False
            log.warning("state store change feed recovered")
        return merged, True

    def store_stats(self) -> Mapping[str, int]:
        """Store failures (load, write, feed), dropped and pending writes (``mes_state_store_*``)."""
        writer = self.writer
        return {
            "errors": writer.errors_total + self.load_errors + self.sync_errors,
            "dropped": writer.dropped_total,
            "pending": writer.pending,
        }
