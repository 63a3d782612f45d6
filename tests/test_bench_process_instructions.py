"""The whole-process instruction count's arithmetic: the callgrind total and the per-request difference."""

from __future__ import annotations

import pytest

from bench.process_instructions import per_request, summary_total


def test_the_total_is_read_from_the_summary_line() -> None:
    text = "version: 1\ncreator: callgrind-3.19.0\nevents: Ir\nsummary: 2857887332\ntotals: 1\n"
    assert summary_total(text) == 2_857_887_332
    assert summary_total("events: Ir\ntotals: 42\n") == 42


def test_an_output_without_a_total_is_an_error() -> None:
    with pytest.raises(ValueError, match="no summary"):
        summary_total("events: Ir\nfn=main\n")


def test_start_up_cancels_out_of_the_difference() -> None:
    # 2,000,000 of start-up in both runs, 600 instructions per request.
    assert per_request((200, 2_000_000 + 200 * 600), (1200, 2_000_000 + 1200 * 600)) == 600.0


def test_the_large_run_must_be_larger() -> None:
    with pytest.raises(ValueError, match="more requests"):
        per_request((200, 10), (200, 20))
