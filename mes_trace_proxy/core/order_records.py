"""The compact form of an order's history: packed entries, ``OrderRecord`` and their codecs.

Pure: bytes and frozen values in, bytes and frozen values out. The order book (``orders.py``)
keeps each order as these bytes; the stores persist them through ``OrderRecord``.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

from mes_trace_proxy.core.lifecycle import TransitionKind

__all__ = ["HistoryEntry", "OrderRecord", "SpanRef"]

# A packed history is the first entry in full, the entries between as compact ones, and the
# newest in full (one entry alone is just the full one). Full: at (f64), trace id (2 x u64),
# span id (u64), status, kind, flags, source. Compact: at and the four codes only; its span is
# not kept (24 of its 36 bytes), as only the first span (links) and the newest one (the span
# that started the current wait) are ever used; a flag keeps "same trace as the first entry".
# Both end with the codes, so the current status is always the last-but-three byte.
ENTRY: Final = struct.Struct("<dQQQBBBB")
ENTRY_SIZE: Final = ENTRY.size
COMPACT: Final = struct.Struct("<dBBBB")
COMPACT_SIZE: Final = COMPACT.size
_AT: Final = struct.Struct("<d")
_SPAN: Final = struct.Struct("<QQQ")  # trace hi, trace lo, span; at offset 8 of a full entry
U64: Final = (1 << 64) - 1
FLAG_OBSERVED: Final = 1
FLAG_FIRST_TRACE: Final = 2
KINDS: Final = tuple(TransitionKind)
KIND_CODE: Final[Mapping[TransitionKind, int]] = MappingProxyType({k: i for i, k in enumerate(KINDS)})
# A code is one byte; one value stays free so the tables can always hold OTHER.
MAX_NAMES: Final = 255
_NO_SPAN: Final[tuple[int, int]] = (0, 0)


@dataclass(frozen=True, slots=True)
class SpanRef:
    """The trace and span ids of one proxied call (W3C sizes: 128-bit trace, 64-bit span)."""

    trace_id: int
    span_id: int

    def __post_init__(self) -> None:
        if not (0 <= self.trace_id <= (1 << 128) - 1 and 0 <= self.span_id <= U64):
            raise ValueError("SpanRef: trace_id must fit 128 bits and span_id 64 bits, unsigned")

    @property
    def trace_id_hex(self) -> str:
        """32 lower-case hex digits, as in ``traceparent`` and Jaeger URLs."""
        return format(self.trace_id, "032x")

    @property
    def span_id_hex(self) -> str:
        """16 lower-case hex digits."""
        return format(self.span_id, "016x")

    @property
    def is_valid(self) -> bool:
        """False for the all-zero ids of an invalid span context (nothing to link to)."""
        return self.trace_id != 0 and self.span_id != 0


@dataclass(frozen=True, slots=True, kw_only=True)
class HistoryEntry:
    """One recorded status change of an order."""

    status: str
    at: float
    span: SpanRef
    kind: TransitionKind
    observed: bool = False
    source: str = ""


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class OrderRecord:
    """The persistable state of one order, cheap to make on the hot path.

    ``packed`` is the history in the book's layout (the first and the newest entry in full,
    36 bytes each, the ones between compact, 12 bytes, without their span); its status and
    source codes index ``statuses`` and ``sources``. ``to_record`` shares the book's name
    tuples and skips the validation of bytes the book made itself, so it is O(1) apart from
    one copy of the bytes. Equality compares the decoded content, not the tables.
    ``updated_at`` is the time of the last status change, the version replicas compare.

    Raises:
        ValueError: when the packed history is empty, misaligned or names a missing code.
    """

    order_id: str
    stuck_reported: bool
    packed: bytes
    statuses: tuple[str, ...]
    sources: tuple[str, ...]

    def __post_init__(self) -> None:
        size = len(self.packed)
        between = size - 2 * ENTRY_SIZE
        if not (size == ENTRY_SIZE or (between >= 0 and between % COMPACT_SIZE == 0)):
            raise ValueError(
                f"OrderRecord: packed history must be one {ENTRY_SIZE}-byte entry, "
                f"or two and {COMPACT_SIZE}-byte ones between"
            )
        for *_, status, kind, _flags, source in _rows(self.packed, 0):
            if status >= len(self.statuses) or kind >= len(KINDS) or source >= len(self.sources):
                raise ValueError("OrderRecord: packed history names a code outside its tables")

    @classmethod
    def from_entries(
        cls, order_id: str, entries: Iterable[HistoryEntry], *, stuck_reported: bool = False
    ) -> OrderRecord:
        """Build a record from decoded entries (store loading, tests).

        The spans of the entries between the first and the newest are not kept (see the class).

        Raises:
            ValueError: when ``entries`` is empty or holds more than 255 distinct names.
        """
        entries = tuple(entries)
        if not entries:
            raise ValueError("OrderRecord: a record needs at least one entry")
        statuses = {e.status: None for e in entries}
        sources = {"": None} | {e.source: None for e in entries}
        if len(statuses) > MAX_NAMES or len(sources) > MAX_NAMES:
            raise ValueError("OrderRecord: more than 255 distinct statuses or sources")
        status_code = {name: code for code, name in enumerate(statuses)}
        source_code = {name: code for code, name in enumerate(sources)}
        return cls(
            order_id=order_id,
            stuck_reported=stuck_reported,
            packed=pack_all(entries, status_code.__getitem__, source_code.__getitem__),
            statuses=tuple(statuses),
            sources=tuple(sources),
        )

    @property
    def entries(self) -> tuple[HistoryEntry, ...]:
        """The history, oldest first; the entries between the first and newest carry no span id."""
        return unpack_all(self.packed, 0, self.statuses, self.sources)

    @property
    def status(self) -> str:
        """The current status (the newest entry's)."""
        return self.statuses[self.packed[-4]]

    @property
    def since(self) -> float:
        """When the current status began."""
        return since_of(self.packed)

    @property
    def updated_at(self) -> float:
        """When the record last changed status; the newer one wins when replicas merge."""
        return since_of(self.packed)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, OrderRecord):
            return NotImplemented
        return (self.order_id, self.stuck_reported, self.entries) == (
            other.order_id,
            other.stuck_reported,
            other.entries,
        )

    def __hash__(self) -> int:
        return hash((self.order_id, self.stuck_reported, self.entries))


def trusted_record(
    order_id: str, stuck_reported: bool, packed: bytes, statuses: tuple[str, ...], sources: tuple[str, ...]
) -> OrderRecord:
    # For bytes the book packed itself: the same fields without ``__post_init__``'s decoding
    # of every entry, which would cost more than the rest of a change on the hot path.
    # mypyc: OrderRecord.__new__, not object.__new__ (native.py, constraint 8).
    record = OrderRecord.__new__(OrderRecord)
    setattr_ = object.__setattr__
    setattr_(record, "order_id", order_id)
    setattr_(record, "stuck_reported", stuck_reported)
    setattr_(record, "packed", packed)
    setattr_(record, "statuses", statuses)
    setattr_(record, "sources", sources)
    return record


def _full(entry: HistoryEntry, status_code: int, source_code: int) -> bytes:
    trace = entry.span.trace_id
    return ENTRY.pack(
        entry.at,
        trace >> 64,
        trace & U64,
        entry.span.span_id,
        status_code,
        KIND_CODE[entry.kind],
        FLAG_OBSERVED if entry.observed else 0,
        source_code,
    )


def pack_all(
    entries: Sequence[HistoryEntry], status_code: Callable[[str], int], source_code: Callable[[str], int]
) -> bytes:
    first = entries[0]
    parts = [_full(first, status_code(first.status), source_code(first.source))]
    if len(entries) > 1:
        first_trace = first.span.trace_id
        for e in entries[1:-1]:
            flags = FLAG_OBSERVED if e.observed else 0
            if first_trace and e.span.trace_id == first_trace:
                flags |= FLAG_FIRST_TRACE
            parts.append(
                COMPACT.pack(e.at, status_code(e.status), KIND_CODE[e.kind], flags, source_code(e.source))
            )
        last = entries[-1]
        parts.append(_full(last, status_code(last.status), source_code(last.source)))
    return b"".join(parts)


def _rows(packed: bytes, start: int) -> Iterator[tuple[float, int, int, int, int, int, int]]:
    """(at, trace, span, status, kind, flags, source) per entry of the history at ``start``."""
    at, hi, lo, span, status, kind, flags, source = ENTRY.unpack_from(packed, start)
    first_trace = (hi << 64) | lo
    yield at, first_trace, span, status, kind, flags, source
    end = len(packed) - ENTRY_SIZE
    if end == start:
        return
    for offset in range(start + ENTRY_SIZE, end, COMPACT_SIZE):
        at, status, kind, flags, source = COMPACT.unpack_from(packed, offset)
        yield at, first_trace if flags & FLAG_FIRST_TRACE else 0, 0, status, kind, flags, source
    at, hi, lo, span, status, kind, flags, source = ENTRY.unpack_from(packed, end)
    yield at, (hi << 64) | lo, span, status, kind, flags, source


def unpack_all(
    packed: bytes, start: int, statuses: tuple[str, ...], sources: tuple[str, ...]
) -> tuple[HistoryEntry, ...]:
    return tuple(
        HistoryEntry(
            status=statuses[status],
            at=at,
            span=SpanRef(trace, span),
            kind=KINDS[kind],
            observed=bool(flags & FLAG_OBSERVED),
            source=sources[source],
        )
        for at, trace, span, status, kind, flags, source in _rows(packed, start)
    )


def since_of(hist: bytes) -> float:
    at: float = _AT.unpack_from(hist, len(hist) - ENTRY_SIZE)[0]
    return at


def first_at(hist: bytes, start: int) -> float:
    """When the first entry of the history at ``start`` was recorded."""
    at: float = _AT.unpack_from(hist, start)[0]
    return at


def span_at(hist: bytes, offset: int) -> SpanRef:
    hi, lo, span = _SPAN.unpack_from(hist, offset + 8)
    return SpanRef((hi << 64) | lo, span)


def unite(*histories: Iterable[HistoryEntry]) -> list[HistoryEntry]:
    """The union of histories, oldest first; a compact copy of an entry yields to the full one.

    A full entry is unique per call (its span). An entry kept compact by one side (no span id)
    is the same call as the entry with the same time, status, kind, flags and source.
    """
    full: set[HistoryEntry] = set()
    compact: dict[tuple[float, str, TransitionKind, bool, str], HistoryEntry] = {}
    for e in itertools.chain(*histories):
        if e.span.span_id:
            full.add(e)
            continue
        key = (e.at, e.status, e.kind, e.observed, e.source)
        known = compact.get(key)
        if known is None or (e.span.trace_id and not known.span.trace_id):
            compact[key] = e
    covered = {(e.at, e.status, e.kind, e.observed, e.source) for e in full}
    united = [*full, *(e for key, e in compact.items() if key not in covered)]
    united.sort(key=lambda e: (e.at, e.span.trace_id, e.span.span_id, e.status))
    return united


def append_entry(hist: bytes, start: int, max_size: int, entry: bytes) -> bytes:
    """``hist`` (a packed history from offset ``start``) with ``entry`` appended as the newest.

    The newest full entry becomes a compact one (its span goes, a flag keeps "same trace as
    the first entry") and ``entry`` the newest; at ``max_size`` bytes the oldest compact entry
    goes too (or, when only the first and the newest fit, the old newest). The bytes before
    ``start`` are kept as they are.
    """
    size = len(hist)
    first_end = start + ENTRY_SIZE
    if size == first_end:
        return hist + entry
    newest = size - ENTRY_SIZE
    codes = hist[-4:]
    if hist[newest + 8 : newest + 24] == hist[start + 8 : start + 24]:
        codes = bytes((codes[0], codes[1], codes[2] | FLAG_FIRST_TRACE, codes[3]))
    if size < max_size:
        return b"".join((hist[:newest], hist[newest : newest + 8], codes, entry))
    if newest == first_end:
        return hist[:newest] + entry
    return b"".join(
        (hist[:first_end], hist[first_end + COMPACT_SIZE : newest], hist[newest : newest + 8], codes, entry)
    )
