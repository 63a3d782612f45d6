"""The stuck-order watchdog and the order book's persistence: restore, write behind, check, purge, sync.

Every ``check_interval`` one owned background task merges other replicas' changes (shared
stores), reports each newly stuck order once (a JSON log line, a ``mes.order.stuck`` span
linked to the call that started the wait, a metric), persists the stuck flag, and purges
closed orders past their retention. Time is an argument: tests call ``check_once(now)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final

from opentelemetry.trace import Link, SpanContext, SpanKind, TraceFlags

from mes_trace_proxy import attributes as A
from mes_trace_proxy.admin_page import iso_utc
from mes_trace_proxy.config import WatchdogConfig
from mes_trace_proxy.metrics import ProxyMetrics
from mes_trace_proxy.orders import OrderBook, SpanRef, StuckOrder
from mes_trace_proxy.store import StateStore, StoreWriter
from mes_trace_proxy.tracecontext import order_trace_id
from mes_trace_proxy.tracing import Tracing

__all__ = ["CheckReport", "Watchdog"]

log = logging.getLogger("mes_trace_proxy.watchdog")

STUCK_MESSAGE: Final = "order stuck"
"""The message of the one log line per newly stuck order (search the logs for it)."""
# Feed pages merged per check (1,000 records each, store_redis._FEED_PAGE): a replica that
# fell far behind catches up over a few checks instead of stalling one for minutes.
_SYNC_PAGES: Final = 100
_NS: Final = 1_000_000_000


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckReport:
    """What one check did."""

    found: tuple[StuckOrder, ...] = ()
    """Orders reported stuck by this check (each stay in a status is reported once)."""
    merged: int = 0
    """Records from other replicas that changed this book."""
    purged: int = 0
    """Closed or cancelled orders forgotten after their retention."""
    synced: bool = True
    """False when reading the shared store's change feed failed (retried next check)."""


class Watchdog:
    """Owns the order book's store traffic and the periodic stuck-order check.

    Args:
        book: The process's order book.
        store: Where order records persist (``open_store``); also the replicas' change feed.
        writer: The write-behind writer over ``store`` (started and stopped by the caller).
        tracing: Where the ``mes.order.stuck`` spans go.
        config: ``check_interval``, ``retention`` and ``correlation``.
        metrics: Counts ``mes_order_stuck_found`` (None: no metric).
        clock: Wall clock (epoch seconds) for the background loop; tests inject theirs.
    """

    def __init__(
        self,
        *,
        book: OrderBook,
        store: StateStore,
        writer: StoreWriter,
        tracing: Tracing,
        config: WatchdogConfig,
        metrics: ProxyMetrics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.book = book
        self.store = store
        self.writer = writer
        self._tracing = tracing
        self._interval = config.check_interval
        self._retention = config.retention
        self._correlation = config.correlation
        self._metrics = metrics
        self._clock = clock
        self._cursor: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._sync_failing = False
        #: set once the background task finished its first round (start-up catch-up done)
        self.first_round = asyncio.Event()
        self.load_errors = 0
        self.sync_errors = 0
        self.check_errors = 0

    # ── start-up and the hot-path hook ──────────────────────────────────────────────────────

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

    # ── the check ───────────────────────────────────────────────────────────────────────────

    async def check_once(self, now: float) -> CheckReport:
        """One watchdog round: sync, report newly stuck orders, persist their flag, purge.

        Args:
            now: Wall-clock epoch seconds.

        Returns:
            What the round did; reporting never raises for a failing store or exporter.
        """
        merged, synced = await self._sync()
        # From here to the end no await: the book does not change under the report.
        found = tuple(self.book.overdue(now))
        for stuck in found:
            self._report(stuck, now)
            self.writer.enqueue(self.book.to_record(stuck.order_id))
        return CheckReport(found=found, merged=merged, purged=self.purge(now), synced=synced)

    def purge(self, now: float) -> int:
        """Forget closed and cancelled orders older than the retention; delete them from the store.

        Args:
            now: Wall-clock epoch seconds.

        Returns:
            How many orders were purged.
        """
        purged = self.book.purge(now, self._retention)
        # Evicted orders (memory cap) come out here too: the store follows the book.
        for order_id in self.book.drain_removed():
            self.writer.enqueue_delete(order_id)
        return purged

    async def _sync(self) -> tuple[int, bool]:
        merged = 0
        try:
            for _ in range(_SYNC_PAGES):
                records, self._cursor = await self.store.changes_since(self._cursor)
                if not records:
                    break
                merged += sum(self.book.merge(record) for record in records)
        except Exception as exc:  # the feed fails with the store; retried next check
            self.sync_errors += 1
            if not self._sync_failing:
                self._sync_failing = True
                log.error(
                    "state store change feed failed; replicas may disagree until it recovers: %s: %s",
                    type(exc).__name__,
                    str(exc)[:200],
                )
            return merged, False
        if self._sync_failing:
            self._sync_failing = False
            log.warning("state store change feed recovered")
        return merged, True

    def _report(self, stuck: StuckOrder, now: float) -> None:
        dwell = stuck.limit + stuck.over_by
        log.warning(
            STUCK_MESSAGE,
            extra={
                "event": "order.stuck",
                "order_id": stuck.order_id,
                "status": stuck.status,
                "since": iso_utc(stuck.since),
                "limit_s": round(stuck.limit, 3),
                "over_by_s": round(stuck.over_by, 3),
                "trace_id": stuck.span.trace_id_hex,
                "span_id": stuck.span.span_id_hex,
            },
        )
        if self._metrics is not None:
            # Only statuses with a dwell limit get stuck: lifecycle statuses, a bounded label set.
            self._metrics.stuck_found.labels(stuck.status).inc()
        links = [_link(stuck.span, "order.transition")]
        if self._correlation == "link" and stuck.first_span != stuck.span:
            links.append(_link(stuck.first_span, "order.first_span"))
        at = int(now * _NS)
        trace_id = order_trace_id(stuck.order_id) if self._correlation == "trace-per-order" else None
        try:
            span = self._tracing.spans.start(
                A.SPAN_ORDER_STUCK,
                kind=SpanKind.INTERNAL,
                parent=None,  # a root span: the watchdog acts on its own, not for a caller
                attributes={
                    A.MES_ORDER_ID: stuck.order_id,
                    A.MES_ORDER_STATUS: stuck.status,
                    A.MES_ORDER_DWELL: dwell,
                    A.MES_ORDER_DWELL_LIMIT: stuck.limit,
                },
                links=[link for link in links if link is not None],
                trace_id=trace_id,
                start_time=at,
            )
            span.end(end_time=at)
        except Exception:  # telemetry never fails the check; the log line above went out
            log.exception("recording the stuck-order span failed")

    # ── background task ─────────────────────────────────────────────────────────────────────

    def start(self) -> None:
        """Start the periodic check (first round at once: it catches what went stuck while down).

        Raises:
            RuntimeError: when already started, or outside a running loop.
        """
        if self._task is not None:
            raise RuntimeError("Watchdog already started")
        self._task = asyncio.get_running_loop().create_task(self._run(), name="mes-trace-proxy.watchdog")

    async def stop(self) -> None:
        """Cancel the periodic check and wait for it; a check cut short loses nothing stored."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def _run(self) -> None:
        while True:
            try:
                await self.check_once(self._clock())
            except Exception:  # a bug in one round must not end the watchdog
                self.check_errors += 1
                log.exception("watchdog check failed")
            self.first_round.set()
            await asyncio.sleep(self._interval)

    # ── scrape-time sources ─────────────────────────────────────────────────────────────────

    def stuck_counts(self) -> Mapping[str, int]:
        """Orders flagged stuck per status (``mes_orders_stuck``)."""
        return self.book.snapshot().stuck_by_status

    def store_stats(self) -> Mapping[str, int]:
        """Store failures (load, write, feed), dropped and pending writes (``mes_state_store_*``)."""
        writer = self.writer
        return {
            "errors": writer.errors_total + self.load_errors + self.sync_errors,
            "dropped": writer.dropped_total,
            "pending": writer.pending,
        }


def _link(ref: SpanRef, kind: str) -> Link | None:
    """A span link to a recorded call's span, or None for the all-zero ids of an unsampled one."""
    if not ref.is_valid:
        return None
    sampled = TraceFlags(TraceFlags.SAMPLED)
    context = SpanContext(ref.trace_id, ref.span_id, is_remote=False, trace_flags=sampled)
    return Link(context, {A.MES_LINK_KIND: kind})
