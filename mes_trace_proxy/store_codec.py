"""The JSON form of an order record, shared by the SQLite and Redis stores.

Pure: a record in, compact JSON out, and back; readable with ``sqlite3`` or ``redis-cli``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Final

from mes_trace_proxy.lifecycle import TransitionKind
from mes_trace_proxy.order_records import HistoryEntry, OrderRecord, SpanRef

__all__ = ["RECORD_FORMAT", "decode_all", "decode_record", "encode_record"]

_log = logging.getLogger("mes_trace_proxy.store")

RECORD_FORMAT: Final = 1
"""Version of the JSON record layout written by ``encode_record``."""


def encode_record(record: OrderRecord) -> str:
    """The record as compact JSON, readable with ``sqlite3`` or ``redis-cli`` when debugging."""
    return json.dumps(
        {
            "v": RECORD_FORMAT,
            "id": record.order_id,
            "stuck": record.stuck_reported,
            "history": [
                [e.status, e.at, e.span.trace_id_hex, e.span.span_id_hex, e.kind.value, e.observed, e.source]
                for e in record.entries
            ],
        },
        separators=(",", ":"),
    )


def decode_record(data: str | bytes) -> OrderRecord:
    """Parse ``encode_record`` output.

    Raises:
        ValueError: when the data is not a valid record of a known format.
    """
    try:
        doc = json.loads(data)
        if doc["v"] != RECORD_FORMAT:
            raise ValueError(f"unknown record format {doc['v']!r}")
        entries = [
            HistoryEntry(
                status=str(status),
                at=float(at),
                span=SpanRef(int(trace, 16), int(span, 16)),
                kind=TransitionKind(kind),
                observed=bool(observed),
                source=str(source),
            )
            for status, at, trace, span, kind, observed, source in doc["history"]
        ]
        order_id = doc["id"]
        if not isinstance(order_id, str):
            raise TypeError("order id is not a string")
        return OrderRecord.from_entries(order_id, entries, stuck_reported=bool(doc["stuck"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"not a valid order record: {exc}") from exc


def decode_all(rows: Sequence[str | bytes], where: str) -> list[OrderRecord]:
    """Decode rows, skipping (and logging once, without ids) those that do not parse."""
    records: list[OrderRecord] = []
    bad = 0
    for row in rows:
        try:
            records.append(decode_record(row))
        except ValueError:
            bad += 1
    if bad:
        _log.warning("state store %s: skipped %d unreadable order records", where, bad)
    return records
