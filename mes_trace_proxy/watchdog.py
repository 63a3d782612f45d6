"""The stuck-order watchdog: every ``check_interval``, report each newly stuck order once, then purge.

One owned background task runs ``check_once``: it merges other replicas' changes
(``book_sync.BookSync``), reports each newly stuck order (a JSON log line, a ``mes.order.stuck``
span linked to the call that started the wait, a metric), persists the stuck flag, and purges
closed orders past their retention. A mass event (MES down for an hour: thousands of orders
at once) is reported as the most late orders one by one and one summary line for the rest, so
the span queue and the log stay usable. Time is an argument: tests call ``check_once(now)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from opentelemetry.trace import Link, SpanContext, SpanKind, TraceFlags

from mes_trace_proxy import attributes as A
from mes_trace_proxy.admin_page import iso_utc
from mes_trace_proxy.book_sync import BookSync
from mes_trace_proxy.config import WatchdogConfig
from mes_trace_proxy.metrics import ProxyMetrics
from mes_trace_proxy.orders import OrderBook, SpanRef, StuckOrder
from mes_trace_proxy.tracecontext import order_trace_id
from mes_trace_proxy.tracing import Tracing

__all__ = ["REPORTS_PER_CHECK", "STUCK_MESSAGE", "UNREPORTED_MESSAGE", "CheckReport", "Watchdog"]

log = logging.getLogger("mes_trace_proxy.watchdog")

STUCK_MESSAGE: Final = "order stuck"
"""The message of the one log line per newly stuck order (search the logs for it)."""
UNREPORTED_MESSAGE: Final = "orders stuck, not reported one by one"
"""The message of the summary line of a check that found more stuck orders than it reports."""
# Newly stuck orders one check reports one by one (log line and span): a real incident's few
# dozen all get theirs; past it (a mass event), the most late 100 do and one summary line
# counts the rest, which stay in /orders/-/stuck and mes_orders_stuck. 100 spans are a
# twentieth of the export queue (2,048), so a mass event cannot push out the proxied calls'.
REPORTS_PER_CHECK: Final = 100
_NS: Final = 1_000_000_000


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckReport:
    """What one check did."""

    found: tuple[StuckOrder, ...] = ()
    """Orders found stuck by this check (each stay in a status is found once)."""
    reported: int = 0
    """Of ``found``, how many got their own log line and span (the rest: one summary line)."""
    merged: int = 0
    """Records from other replicas that changed this book."""
    purged: int = 0
    """Closed or cancelled orders forgotten after their retention."""
    synced: bool = True
    """False when reading the shared store's change feed failed (retried next check)."""


class Watchdog:
    """Finds and reports stuck orders, and purges closed ones, every ``check_interval``.

    Args:
        book: The process's order book.
        sync: The book's store traffic: the stuck flag and purges go through it.
        tracing: Where the ``mes.order.stuck`` spans go.
        config: ``check_interval``, ``retention`` and ``correlation``.
        metrics: Counts ``mes_order_stuck_found`` and ``mes_order_stuck_unreported`` (None: no metric).
        clock: Wall clock (epoch seconds) for the background loop; tests inject theirs.
        max_reports: Newly stuck orders reported one by one per check (see ``REPORTS_PER_CHECK``).
    """

    def __init__(
        self,
        *,
        book: OrderBook,
        sync: BookSync,
        tracing: Tracing,
        config: WatchdogConfig,
        metrics: ProxyMetrics | None = None,
        clock: Callable[[], float] = time.time,
        max_reports: int = REPORTS_PER_CHECK,
    ) -> None:
        if max_reports < 0:
            raise ValueError(f"max_reports must not be negative, got {max_reports}")
        self.book = book
        self.sync = sync
        self._tracing = tracing
        self._interval = config.check_interval
        self._retention = config.retention
        self._correlation = config.correlation
        self._metrics = metrics
        self._clock = clock
        self._max_reports = max_reports
        self._task: asyncio.Task[None] | None = None
        #: set once the background task finished its first round (start-up catch-up done)
        self.first_round = asyncio.Event()
        self.check_errors = 0

    # ── the check ───────────────────────────────────────────────────────────────────────────

    async def check_once(self, now: float) -> CheckReport:
        """One watchdog round: sync, report newly stuck orders, persist their flag, purge.

        Args:
            now: Wall-clock epoch seconds.

        Returns:
            What the round did; reporting never raises for a failing store or exporter.
        """
        merged, synced = await self.sync.merge_changes()
        # From here to the end no await: the book does not change under the report.
        found = tuple(self.book.overdue(now))
        reported = self._report_all(found, now)
        for stuck in found:
            self.sync.order_changed(stuck.order_id)
        return CheckReport(
            found=found, reported=reported, merged=merged, purged=self.purge(now), synced=synced
        )

    def purge(self, now: float) -> int:
        """Forget closed and cancelled orders older than the retention; delete them from the store.

        Args:
            now: Wall-clock epoch seconds.

        Returns:
            How many orders were purged.
        """
        purged = self.book.purge(now, self._retention)
        # Evicted orders (memory cap) come out here too: the store follows the book.
        self.sync.forget_removed()
        return purged

    def _report_all(self, found: Sequence[StuckOrder], now: float) -> int:
        """Count every found order; report the most late ``max_reports`` one by one, sum up the rest."""
        by_status = Counter(stuck.status for stuck in found)
        if self._metrics is not None:
            for status, count in by_status.items():
                # Only statuses with a dwell limit get stuck: lifecycle statuses, a bounded label set.
                self._metrics.stuck_found.labels(status).inc(count)
        chosen: Sequence[StuckOrder] = found
        if len(found) > self._max_reports:
            chosen = heapq.nlargest(self._max_reports, found, key=lambda stuck: stuck.over_by)
        for stuck in chosen:
            self._report(stuck, now)
        if len(chosen) < len(found):
            self._sum_up(by_status - Counter(stuck.status for stuck in chosen), len(chosen))
        return len(chosen)

    def _sum_up(self, rest: Mapping[str, int], reported: int) -> None:
        """One line (and a metric) for the newly stuck orders not reported one by one."""
        count = sum(rest.values())
        log.warning(
            UNREPORTED_MESSAGE,
            extra={
                "event": "order.stuck.unreported",
                "count": count,
                "reported": reported,
                "by_status": dict(sorted(rest.items())),
                "see": "/orders/-/stuck",
            },
        )
        if self._metrics is not None:
            for status, unreported in rest.items():
                self._metrics.stuck_unreported.labels(status).inc(unreported)

    def _report(self, stuck: StuckOrder, now: float) -> None:
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
                    A.MES_ORDER_DWELL: stuck.limit + stuck.over_by,
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

    # ── scrape-time source ──────────────────────────────────────────────────────────────────

    def stuck_counts(self) -> Mapping[str, int]:
        """Orders flagged stuck per status (``mes_orders_stuck``)."""
        return self.book.snapshot().stuck_by_status


def _link(ref: SpanRef, kind: str) -> Link | None:
    """A span link to a recorded call's span, or None for the all-zero ids of an unsampled one."""
    if not ref.is_valid:
        return None
    sampled = TraceFlags(TraceFlags.SAMPLED)
    context = SpanContext(ref.trace_id, ref.span_id, is_remote=False, trace_flags=sampled)
    return Link(context, {A.MES_LINK_KIND: kind})
