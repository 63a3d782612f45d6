"""The packed history: entries in, the same entries out, and appending keeps the ends in full."""

from __future__ import annotations

import pytest

from mes_trace_proxy.lifecycle import TransitionKind
from mes_trace_proxy.order_records import (
    COMPACT_SIZE,
    ENTRY,
    ENTRY_SIZE,
    HistoryEntry,
    OrderRecord,
    SpanRef,
    append_entry,
    since_of,
    span_at,
    unite,
    unpack_all,
)

K = TransitionKind
T0 = 1_700_000_000.0
STATUSES = ("SUBMITTED", "PRICE_CALCULATED", "MANUFACTURING_APPROVED", "SHIPPED")


def _entry(at: float, trace: int, span: int, status: int, kind: int = 0) -> bytes:
    return ENTRY.pack(at, trace >> 64, trace & ((1 << 64) - 1), span, status, kind, 0, 0)


def _grow(count: int, max_size: int, start: int = 0) -> bytes:
    hist = b"\x00" * start + _entry(T0, 7 << 64 | 1, 1, 0)
    for n in range(1, count):
        hist = append_entry(hist, start, max_size, _entry(T0 + n, (7 << 64) | (n + 1), n + 1, n % 4))
    return hist


@pytest.mark.parametrize("start", [0, 4], ids=["record", "behind-a-slot"])
@pytest.mark.parametrize(
    ("count", "kept"),
    [(1, 1), (2, 2), (3, 3), (4, 4), (5, 4), (9, 4)],
    ids=lambda v: str(v),
)
def test_append_keeps_the_first_and_the_newest_in_full(start: int, count: int, kept: int) -> None:
    """Past the cap the oldest compact entry goes; the first and newest keep time and span."""
    max_size = start + 2 * ENTRY_SIZE + 2 * COMPACT_SIZE  # room for four entries
    hist = _grow(count, max_size, start)
    assert len(hist) <= max_size
    entries = unpack_all(hist, start, STATUSES, ("",))
    assert len(entries) == kept
    assert entries[0].at == T0
    assert entries[0].span == SpanRef(7 << 64 | 1, 1)
    assert entries[-1].at == T0 + count - 1
    assert since_of(hist) == T0 + count - 1
    assert span_at(hist, len(hist) - ENTRY_SIZE) == SpanRef((7 << 64) | count, count)
    # The entries between carry no span, and are the newest ones (time order kept).
    assert [e.at for e in entries[1:-1]] == [T0 + n for n in range(count - kept + 1, count - 1)]
    assert all(e.span.span_id == 0 for e in entries[1:-1])


def test_record_round_trip_and_validation() -> None:
    """A record built from entries gives them back; bytes naming missing codes are refused."""
    entries = [
        HistoryEntry(status="SUBMITTED", at=T0, span=SpanRef(5, 1), kind=K.FIRST, source="ingress"),
        HistoryEntry(status="PRICE_CALCULATED", at=T0 + 1, span=SpanRef(5, 0), kind=K.FORWARD),
        HistoryEntry(status="SHIPPED", at=T0 + 2, span=SpanRef(6, 3), kind=K.SKIP, observed=True),
    ]
    record = OrderRecord.from_entries("o-1", entries, stuck_reported=True)
    # The middle entry keeps the first trace (same trace as the first call), not its span.
    assert record.entries == tuple(entries)
    assert record.status == "SHIPPED"
    assert record.since == record.updated_at == T0 + 2
    with pytest.raises(ValueError, match="outside its tables"):
        OrderRecord(
            order_id="o", stuck_reported=False, packed=_entry(T0, 1, 1, 9), statuses=STATUSES, sources=("",)
        )
    with pytest.raises(ValueError, match="packed history must be"):
        OrderRecord(order_id="o", stuck_reported=False, packed=b"\x00" * 7, statuses=STATUSES, sources=("",))


def test_unite_prefers_the_full_copy_of_an_entry() -> None:
    """The union of two histories keeps each call once, and a full entry over its compact copy."""
    full = HistoryEntry(status="PRICE_CALCULATED", at=T0 + 1, span=SpanRef(9, 4), kind=K.FORWARD)
    compact = HistoryEntry(status="PRICE_CALCULATED", at=T0 + 1, span=SpanRef(0, 0), kind=K.FORWARD)
    first = HistoryEntry(status="SUBMITTED", at=T0, span=SpanRef(9, 1), kind=K.FIRST)
    assert unite([first, compact], [first, full]) == [first, full]
