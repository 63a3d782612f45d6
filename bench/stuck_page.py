"""Cost of one page of the stuck list with many stuck orders (``python -m bench.stuck_page``).

A mass event (MES down for an hour) leaves ~100k orders past their dwell limit. ``GET
/orders/-/stuck`` and the page at ``/`` each read one page of them on the event loop. Before,
the book built and sorted the whole list for every page; now it merges the per-status lists,
which are kept in order, and stops after the page. Prints one JSON line: stuck orders, the
milliseconds of a first page, of a deep page, and of building the whole list (the old cost).
"""

from __future__ import annotations

import argparse
import json
import time

from mes_trace_proxy.lifecycle import REFERENCE_LIFECYCLE
from mes_trace_proxy.orders import OrderBook, SpanRef

T0 = 1_700_000_000.0
# Statuses with dwell limits, as a mass event leaves them: orders waiting for a price, for
# approval, in production, so the merge has several lists to interleave.
_STATUSES = ("SUBMITTED", "MANUFACTURING_APPROVED", "MANUFACTURING_STARTED", "MANUFACTURING_COMPLETED")


def fill(orders: int) -> tuple[OrderBook, float]:
    """A book with ``orders`` orders, every one reported stuck; returns it and the time to read at."""
    book = OrderBook(REFERENCE_LIFECYCLE)
    span = SpanRef(trace_id=1 << 64 | 1, span_id=1)
    for number in range(orders):
        status = _STATUSES[number % len(_STATUSES)]
        order_id = f"ORD-2025-{number:07d}"
        book.apply(order_id=order_id, status=status, observed=None, now=T0 + number, span=span)
    now = T0 + orders + 30 * 86400
    book.overdue(now)
    assert book.stuck_total() == orders
    return book, now


def _best_ms(run: object, repeat: int) -> float:
    assert callable(run)
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return best * 1000


def measure(orders: int, limit: int = 50, repeat: int = 5) -> dict[str, float]:
    """Time a page of ``limit`` stuck orders at offset 0 and deep in the list, and the whole list.

    Returns:
        ``stuck``, ``limit``, ``first_page_ms``, ``deep_page_ms`` (offset ``orders // 2``),
        ``whole_list_ms`` (every stuck order built and sorted, what each page cost before).
    """
    book, now = fill(orders)
    first = book.stuck(now, offset=0, limit=limit)
    assert first == book.stuck(now)[:limit]  # the page is the head of the whole list
    return {
        "stuck": orders,
        "limit": limit,
        "first_page_ms": round(_best_ms(lambda: book.stuck(now, limit=limit), repeat), 3),
        "deep_page_ms": round(_best_ms(lambda: book.stuck(now, offset=orders // 2, limit=limit), repeat), 3),
        "whole_list_ms": round(_best_ms(lambda: book.stuck(now), repeat), 3),
    }


def main(argv: list[str] | None = None) -> int:
    """Measure and print one JSON line."""
    parser = argparse.ArgumentParser(prog="python -m bench.stuck_page")
    parser.add_argument("--orders", type=int, default=100_000)
    parser.add_argument("--limit", type=int, default=50)
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.orders, args.limit)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
