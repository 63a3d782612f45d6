"""RSS of the order book with N orders tracked, measured in a fresh process (``python -m bench.orders_rss``).

Each order gets an id shaped like the CRM's (``ORD-2025-0001234``) and walks the reference
lifecycle to a random stage, each change with its own span, as a book with orders in every
stage holds. Prints one JSON line: orders, status changes, VmRSS growth and apply time.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import time
from pathlib import Path

from bench.procfs import parse_status
from mes_trace_proxy.core.lifecycle import REFERENCE_LIFECYCLE
from mes_trace_proxy.core.orders import OrderBook, SpanRef


def _rss() -> int:
    return parse_status(Path("/proc/self/status").read_text()).rss


def measure(orders: int, seed: int = 6) -> dict[str, float]:
    """Fill one book with ``orders`` orders; the RSS growth it caused and the apply cost.

    Args:
        orders: how many orders to track.
        seed: random seed for the walks and span ids (a fixed seed keeps runs comparable).

    Returns:
        ``orders``, ``changes``, ``rss_growth_bytes``, ``bytes_per_order``, ``apply_us``.
    """
    rng = random.Random(seed)
    path = REFERENCE_LIFECYCLE.statuses[1:]
    gc.collect()
    before = _rss()
    book = OrderBook(REFERENCE_LIFECYCLE)
    changes = 0
    spent = 0.0
    now = 1_700_000_000.0
    for number in range(orders):
        order_id = f"ORD-2025-{number:07d}"
        stage = rng.randint(1, len(path))
        for status in path[:stage]:
            span = SpanRef(trace_id=rng.getrandbits(128) | 1, span_id=rng.getrandbits(64) | 1)
            started = time.perf_counter()
            book.apply(order_id=order_id, status=status, observed=None, now=now, span=span, source="ingress")
            spent += time.perf_counter() - started
            changes += 1
            now += 0.01
    gc.collect()
    growth = _rss() - before
    assert len(book) == orders
    return {
        "orders": orders,
        "changes": changes,
        "rss_growth_bytes": growth,
        "bytes_per_order": growth / orders,
        "apply_us": spent / changes * 1e6,
    }


def main(argv: list[str] | None = None) -> int:
    """Measure and print one JSON line."""
    parser = argparse.ArgumentParser(prog="python -m bench.orders_rss")
    parser.add_argument("--orders", type=int, default=1_000_000)
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.orders)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
