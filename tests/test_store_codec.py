"""The JSON form of order records: round trips, older layouts, garbage refused and skipped."""

from __future__ import annotations

import json
import logging

import pytest

from mes_trace_proxy.order_records import SpanRef
from mes_trace_proxy.store_codec import decode_all, decode_record, encode_record
from tests.test_store import T0, record


def test_encode_decode_round_trip() -> None:
    """A record survives JSON encoding with every field intact."""
    original = record("o-1", "SUBMITTED", "PRICE_CALCULATED", "MANUFACTURING_APPROVED", stuck=True)
    text = encode_record(original)
    assert decode_record(text) == original
    assert decode_record(text.encode()) == original
    doc = json.loads(text)
    assert doc["history"][2][2:4] == [f"{(3 << 70) | 7:032x}", f"{3:016x}"]


def test_records_stored_with_every_span_still_load() -> None:
    """A record written when every entry kept its span loads; the spans between the ends go."""
    spans = [[f"{(i << 70) | 7:032x}", f"{i:016x}"] for i in (1, 2, 3)]
    doc = {
        "v": 1,
        "id": "o-1",
        "stuck": False,
        "history": [
            ["SUBMITTED", T0, *spans[0], "first", False, "ingress"],
            ["PRICE_CALCULATED", T0 + 1, *spans[1], "forward", True, "egress"],
            ["MANUFACTURING_APPROVED", T0 + 2, *spans[2], "forward", False, "ingress"],
        ],
    }
    loaded = decode_record(json.dumps(doc))
    assert [e.span for e in loaded.entries] == [
        SpanRef(1 << 70 | 7, 1),
        SpanRef(0, 0),
        SpanRef(3 << 70 | 7, 3),
    ]
    assert [(e.status, e.at, e.observed, e.source) for e in loaded.entries][1] == (
        "PRICE_CALCULATED",
        T0 + 1,
        True,
        "egress",
    )


BAD_RECORDS = (
    ("not-json", "{"),
    ("future-format", json.dumps({"v": 99, "id": "o", "stuck": False, "history": []})),
    ("missing-history", json.dumps({"v": 1, "id": "o", "stuck": False})),
    ("empty-history", json.dumps({"v": 1, "id": "o", "stuck": False, "history": []})),
    (
        "bad-hex",
        json.dumps({"v": 1, "id": "o", "stuck": False, "history": [["S", 1.0, "zz", "1", "first", 0, ""]]}),
    ),
    (
        "bad-kind",
        json.dumps({"v": 1, "id": "o", "stuck": False, "history": [["S", 1.0, "1", "1", "nope", 0, ""]]}),
    ),
    (
        "id-not-string",
        json.dumps({"v": 1, "id": 5, "stuck": False, "history": [["S", 1.0, "1", "1", "first", 0, ""]]}),
    ),
    ("short-entry", json.dumps({"v": 1, "id": "o", "stuck": False, "history": [["S", 1.0]]})),
)


@pytest.mark.parametrize("data", [c[1] for c in BAD_RECORDS], ids=[c[0] for c in BAD_RECORDS])
def test_decode_rejects_garbage(data: str) -> None:
    """Anything but a valid record of the current format is a ValueError."""
    with pytest.raises(ValueError, match="not a valid order record"):
        decode_record(data)


def test_decode_all_skips_and_logs_without_ids(caplog: pytest.LogCaptureFixture) -> None:
    """Unreadable rows are skipped with one warning that names no order."""
    rows = [encode_record(record("o-1")), "{", json.dumps({"v": 1, "id": "secret-id"})]
    with caplog.at_level(logging.WARNING):
        assert [r.order_id for r in decode_all(rows, "test")] == ["o-1"]
    assert len(caplog.records) == 1
    assert "skipped 2" in caplog.text
    assert "secret-id" not in caplog.text
