"""The stuck-page benchmark runs and measures what it says (no timing asserted)."""

from __future__ import annotations

from bench import stuck_page


def test_stuck_page_bench_reads_a_page_of_a_full_book() -> None:
    """A small run fills the book with stuck orders and reports the three timings."""
    figures = stuck_page.measure(400, limit=10, repeat=1)
    assert figures["stuck"] == 400
    assert figures["limit"] == 10
    assert {"first_page_ms", "deep_page_ms", "whole_list_ms"} <= set(figures)
    assert all(figures[k] >= 0 for k in ("first_page_ms", "deep_page_ms", "whole_list_ms"))
