"""OrderBook: per-order status state, transition findings and exactly-once stuck detection.

Pure: time is an argument (``now``, wall-clock epoch seconds); ``apply`` is O(1) on the hot path.
"""

from __future__ import annotations

import itertools
import math
import struct
from array import array
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final

from mes_trace_proxy.lifecycle import Lifecycle, TransitionKind

__all__ = [
    "OTHER",
    "BookSnapshot",
    "Findings",
    "HistoryEntry",
    "OrderBook",
    "OrderRecord",
    "OrderView",
    "SpanRef",
    "StuckOrder",
    "Transition",
]

OTHER: Final = "(other)"
"""Stands for any status or source past the book's name-table cap (bounds memory and labels)."""

# A packed history is the first entry in full, the entries between as compact ones, and the
# newest in full (one entry alone is just the full one). Full: at (f64), trace id (2 x u64),
# span id (u64), status, kind, flags, source. Compact: at and the four codes only; its span is
# not kept (24 of its 36 bytes), as only the first span (links) and the newest one (the span
# that started the current wait) are ever used; a flag keeps "same trace as the first entry".
# Both end with the codes, so the current status is always the last-but-three byte.
_ENTRY: Final = struct.Struct("<dQQQBBBB")
_E: Final = _ENTRY.size
_MID: Final = struct.Struct("<dBBBB")
_M: Final = _MID.size
_AT: Final = struct.Struct("<d")
_SPAN: Final = struct.Struct("<QQQ")  # trace hi, trace lo, span; at offset 8 of a full entry
# The book's own bytes start with the order's slot in the queue links (u32); records do not.
_SLOT: Final = struct.Struct("<I")
_H: Final = _SLOT.size
_U64: Final = (1 << 64) - 1
_FLAG_OBSERVED: Final = 1
_FLAG_FIRST_TRACE: Final = 2
_KINDS: Final = tuple(TransitionKind)
_KIND_CODE: Final[Mapping[TransitionKind, int]] = MappingProxyType({k: i for i, k in enumerate(_KINDS)})
# A code is one byte; one value stays free so the tables can always hold OTHER.
_MAX_NAMES: Final = 255
_NO_SPAN: Final[tuple[int, int]] = (0, 0)


@dataclass(frozen=True, slots=True)
class SpanRef:
    """The trace and span ids of one proxied call (W3C sizes: 128-bit trace, 64-bit span)."""

    trace_id: int
    span_id: int

    def __post_init__(self) -> None:
        if not (0 <= self.trace_id <= (1 << 128) - 1 and 0 <= self.span_id <= _U64):
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
class Transition:
    """One status move; ``observed`` when the new status came from MES's response."""

    prev: str | None
    new: str
    kind: TransitionKind
    observed: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Findings:
    """What one ``apply`` call found.

    ``transition`` is None for a read that confirmed the known status or carried none.
    ``changed`` says the book's state changed (the caller then schedules a store write).
    """

    transition: Transition | None = None
    observed_mismatch: bool = False
    was_stuck: bool = False
    changed: bool = False
    dwell: float | None = None
    """Seconds the order spent in the status this call moved it out of (None: no move)."""
    # The book's bytes for the order (slot, then packed history): ``first_span`` decodes them
    # only when asked, which keeps ``apply`` to one small allocation when the caller does not link.
    history: bytes = field(default=b"", repr=False)

    @property
    def first_span(self) -> SpanRef | None:
        """The order's first recorded span (for span links), or None for an untracked order."""
        return _span_at(self.history, _H) if self.history else None

    @property
    def anomaly(self) -> bool:
        """True when the transition is an anomaly (skip, backward, after terminal, unknown)."""
        return self.transition is not None and self.transition.kind.anomaly


@dataclass(frozen=True, slots=True, kw_only=True)
class HistoryEntry:
    """One recorded status change of an order."""

    status: str
    at: float
    span: SpanRef
    kind: TransitionKind
    observed: bool = False
    source: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class StuckOrder:
    """An order over its dwell limit; ``span`` started the wait, ``first_span`` is for links."""

    order_id: str
    status: str
    since: float
    limit: float
    over_by: float
    span: SpanRef
    first_span: SpanRef


@dataclass(frozen=True, slots=True, kw_only=True)
class OrderView:
    """A read-only copy of one order's state, for the admin API and page."""

    order_id: str
    status: str
    prev: str | None
    since: float
    stuck: bool
    dwell_limit: float | None
    span: SpanRef
    first_span: SpanRef
    history: tuple[HistoryEntry, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class BookSnapshot:
    """Book-wide figures for metrics and the admin page, computed in O(statuses + stuck)."""

    orders: int
    capacity: int
    by_status: Mapping[str, int]
    stuck_by_status: Mapping[str, int]
    oldest_since: Mapping[str, float]
    evicted_total: int
    purged_total: int
    ignored_total: int
    removed_lost_total: int


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
        if not (size == _E or (size >= 2 * _E and (size - 2 * _E) % _M == 0)):
            raise ValueError(
                f"OrderRecord: packed history must be one {_E}-byte entry, or two and {_M}-byte ones between"
            )
        for *_, status, kind, _flags, source in _rows(self.packed, 0):
            if status >= len(self.statuses) or kind >= len(_KINDS) or source >= len(self.sources):
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
        if len(statuses) > _MAX_NAMES or len(sources) > _MAX_NAMES:
            raise ValueError("OrderRecord: more than 255 distinct statuses or sources")
        status_code = {name: code for code, name in enumerate(statuses)}
        source_code = {name: code for code, name in enumerate(sources)}
        return cls(
            order_id=order_id,
            stuck_reported=stuck_reported,
            packed=_pack_all(entries, status_code.__getitem__, source_code.__getitem__),
            statuses=tuple(statuses),
            sources=tuple(sources),
        )

    @property
    def entries(self) -> tuple[HistoryEntry, ...]:
        """The history, oldest first; the entries between the first and newest carry no span id."""
        return _unpack_all(self.packed, 0, self.statuses, self.sources)

    @property
    def status(self) -> str:
        """The current status (the newest entry's)."""
        return self.statuses[self.packed[-4]]

    @property
    def since(self) -> float:
        """When the current status began."""
        return _since(self.packed)

    @property
    def updated_at(self) -> float:
        """When the record last changed status; the newer one wins when replicas merge."""
        return _since(self.packed)

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


def _trusted_record(
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
    return _ENTRY.pack(
        entry.at,
        trace >> 64,
        trace & _U64,
        entry.span.span_id,
        status_code,
        _KIND_CODE[entry.kind],
        _FLAG_OBSERVED if entry.observed else 0,
        source_code,
    )


def _pack_all(
    entries: Sequence[HistoryEntry], status_code: Callable[[str], int], source_code: Callable[[str], int]
) -> bytes:
    first = entries[0]
    parts = [_full(first, status_code(first.status), source_code(first.source))]
    if len(entries) > 1:
        first_trace = first.span.trace_id
        for e in entries[1:-1]:
            flags = _FLAG_OBSERVED if e.observed else 0
            if first_trace and e.span.trace_id == first_trace:
                flags |= _FLAG_FIRST_TRACE
            parts.append(
                _MID.pack(e.at, status_code(e.status), _KIND_CODE[e.kind], flags, source_code(e.source))
            )
        last = entries[-1]
        parts.append(_full(last, status_code(last.status), source_code(last.source)))
    return b"".join(parts)


def _rows(packed: bytes, start: int) -> Iterator[tuple[float, int, int, int, int, int, int]]:
    """(at, trace, span, status, kind, flags, source) per entry of the history at ``start``."""
    at, hi, lo, span, status, kind, flags, source = _ENTRY.unpack_from(packed, start)
    first_trace = (hi << 64) | lo
    yield at, first_trace, span, status, kind, flags, source
    end = len(packed) - _E
    if end == start:
        return
    for offset in range(start + _E, end, _M):
        at, status, kind, flags, source = _MID.unpack_from(packed, offset)
        yield at, first_trace if flags & _FLAG_FIRST_TRACE else 0, 0, status, kind, flags, source
    at, hi, lo, span, status, kind, flags, source = _ENTRY.unpack_from(packed, end)
    yield at, (hi << 64) | lo, span, status, kind, flags, source


def _unpack_all(
    packed: bytes, start: int, statuses: tuple[str, ...], sources: tuple[str, ...]
) -> tuple[HistoryEntry, ...]:
    return tuple(
        HistoryEntry(
            status=statuses[status],
            at=at,
            span=SpanRef(trace, span),
            kind=_KINDS[kind],
            observed=bool(flags & _FLAG_OBSERVED),
            source=sources[source],
        )
        for at, trace, span, status, kind, flags, source in _rows(packed, start)
    )


def _since(hist: bytes) -> float:
    at: float = _AT.unpack_from(hist, len(hist) - _E)[0]
    return at


def _span_at(hist: bytes, offset: int) -> SpanRef:
    hi, lo, span = _SPAN.unpack_from(hist, offset + 8)
    return SpanRef((hi << 64) | lo, span)


def _unite(*histories: Iterable[HistoryEntry]) -> list[HistoryEntry]:
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


class _Names:
    """An append-only string table: one canonical object per name, one byte per code."""

    __slots__ = ("_cap", "_codes", "names")

    def __init__(self, initial: Iterable[str], extra: int) -> None:
        # mypyc: tuple(), not () (native.py, constraint 6).
        self.names: tuple[str, ...] = tuple()
        self._codes: dict[str, int] = {}
        for name in initial:
            self._add(name)
        self._cap = min(len(self.names) + extra, _MAX_NAMES - 1)

    def _add(self, name: str) -> int:
        code = len(self.names)
        self._codes[name] = code
        # A new tuple per added name: rare (bounded by the cap) and records may share the old one.
        self.names = (*self.names, name)
        return code

    def code(self, name: str) -> int:
        code = self._codes.get(name)
        if code is not None:
            return code
        if len(self.names) < self._cap:
            return self._add(name)
        other = self._codes.get(OTHER)
        return self._add(OTHER) if other is None else other


_NIL: Final = 0xFFFFFFFF  # no slot: the end of a chain


class _Links:
    """The book's order slots: slot -> order id, stuck flag and chain links, in flat arrays.

    About 17 bytes per order (two u32 links, one flag byte, one list pointer) where a dict
    entry per order and status would cost 40-60; freed slots are reused.
    """

    __slots__ = ("free", "ids", "next", "prev", "stuck")

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.next = array("I")
        self.prev = array("I")
        self.stuck = bytearray()
        self.free = _NIL

    def alloc(self, order_id: str) -> int:
        slot = self.free
        if slot != _NIL:
            self.free = self.next[slot]
            self.ids[slot] = order_id
            return slot
        slot = len(self.ids)
        self.ids.append(order_id)
        self.next.append(_NIL)
        self.prev.append(_NIL)
        self.stuck.append(0)
        return slot

    def release(self, slot: int) -> None:
        self.ids[slot] = ""
        self.next[slot] = self.free
        self.free = slot


class _Chain:
    """A doubly linked list of slots over the shared ``_Links``, oldest first."""

    __slots__ = ("head", "next", "prev", "size", "tail")

    def __init__(self, links: _Links) -> None:
        # The arrays themselves, not ``links``: one attribute lookup less per step on the hot path.
        self.next = links.next
        self.prev = links.prev
        self.head = self.tail = _NIL
        self.size = 0

    def push(self, slot: int) -> None:
        tail = self.tail
        self.next[slot] = _NIL
        self.prev[slot] = tail
        if tail == _NIL:
            self.head = slot
        else:
            self.next[tail] = slot
        self.tail = slot
        self.size += 1

    def unlink(self, slot: int) -> None:
        before, after = self.prev[slot], self.next[slot]
        if before == _NIL:
            self.head = after
        else:
            self.next[before] = after
        if after == _NIL:
            self.tail = before
        else:
            self.prev[after] = before
        self.size -= 1

    def __iter__(self) -> Iterator[int]:
        # Callers do not change the chain while they walk it (they collect, then act).
        after = self.next
        slot = self.head
        while slot != _NIL:
            yield slot
            slot = after[slot]

    def relink(self, slots: Sequence[int]) -> None:
        self.head = self.tail = _NIL
        self.size = 0
        for slot in slots:
            self.push(slot)


class _Queue:
    """The orders in one status, oldest first: ``waiting``, and ``stuck`` (reported).

    Orders enter a status at ``now``, so appending keeps each chain ordered. An insertion
    older than the tail (clock step, merge from a replica) marks the queue ``dirty``, and the
    next ordered read re-sorts it.
    """

    __slots__ = ("dirty", "flags", "links", "stuck", "tail", "waiting")

    def __init__(self, links: _Links) -> None:
        self.links = links
        self.flags = links.stuck
        self.waiting = _Chain(links)
        self.stuck = _Chain(links)
        self.tail = -math.inf
        self.dirty = False

    def add(self, slot: int, since: float, *, stuck: bool = False) -> None:
        self.flags[slot] = stuck
        (self.stuck if stuck else self.waiting).push(slot)
        if since < self.tail:
            self.dirty = True
        else:
            self.tail = since

    def remove(self, slot: int) -> bool:
        """Remove the order; return True when it was reported stuck."""
        if self.flags[slot]:
            self.stuck.unlink(slot)
            return True
        self.waiting.unlink(slot)
        return False

    def flag_stuck(self, slot: int) -> None:
        self.waiting.unlink(slot)
        self.stuck.push(slot)
        self.flags[slot] = True

    def ordered(self, orders: Mapping[str, bytes]) -> None:
        if self.dirty:
            ids = self.links.ids
            for chain in (self.waiting, self.stuck):
                chain.relink(sorted(chain, key=lambda s: _since(orders[ids[s]])))
            self.dirty = False

    def slots(self) -> Iterator[int]:
        """Reported stuck orders first, then waiting ones (call ``ordered`` first)."""
        return itertools.chain(self.stuck, self.waiting)

    def __len__(self) -> int:
        return self.waiting.size + self.stuck.size


_NOTHING: Final = Findings()
# Name tables past the lifecycle: a MES with local changes adds a handful of statuses, and
# every one becomes a metric label; 32 leaves room and still bounds the label set.
_EXTRA_STATUSES: Final = 32
# Sources are listener or rule names from the config: a handful.
_MAX_SOURCES: Final = 32
# UUIDs are 36 characters and ERP ids shorter; 128 leaves slack while one bogus path
# segment cannot cost kilobytes per tracked order.
_MAX_ID_LENGTH: Final = 128
# Ids removed by purge or eviction wait here for the shell to delete them from the store;
# the bound only bites if nobody drains them (the store then keeps them until next purge).
_REMOVED_BUFFER: Final = 100_000


class OrderBook:
    """Every tracked order's status, with findings per call and exactly-once stuck reports.

    Memory: an order is one entry ``order id -> bytes`` (its slot, then its history: the first
    and newest entries at 36 bytes with time, trace id, span id and status/kind/flags/source
    codes, the ones between at 12 bytes without their span; its status is the newest entry's)
    and one slot in its status's queue, a linked list in flat arrays: about 270 bytes with 4-5
    changes, id string included (``tests/test_orders.py::test_memory_per_order`` prints the
    figure). Status and source strings live once, in the book's name tables. ``bytes`` are not
    tracked by the garbage collector, so a million orders add no GC pauses. History records
    status *changes* only and keeps the first entry (the span later calls link to) plus the
    newest ones.

    Args:
        lifecycle: The status table.
        history_limit: Entries kept per order (the first one plus the newest); at least 2.
        max_orders: Orders tracked at most. At the cap, 1 % of them are evicted at once
            (amortising the scan for the oldest): terminal orders first, oldest first; only
            when none is left, the orders whose status began longest ago. Evictions are
            counted in ``evicted_total`` and their ids go to ``drain_removed``.

    Raises:
        ValueError: when a limit is out of range.
    """

    def __init__(
        self,
        lifecycle: Lifecycle,
        *,
        # 16: a full reference lifecycle is 10 statuses; room for a few anomalies while one
        # order's history stays under 250 bytes.
        history_limit: int = 16,
        # 2,000,000: twice the million orders the memory budget is sized for, so the cap
        # only bites when retention or purging is misconfigured.
        max_orders: int = 2_000_000,
    ) -> None:
        if history_limit < 2:
            raise ValueError(f"history_limit must be at least 2, got {history_limit}")
        if max_orders < 1:
            raise ValueError(f"max_orders must be at least 1, got {max_orders}")
        self._lifecycle = lifecycle
        self._history_limit = history_limit
        # Bytes of a full history: slot, first and newest entries in full, the rest compact.
        self._hist_max = _H + 2 * _E + (history_limit - 2) * _M
        self._max_orders = max_orders
        # 1 %: amortises the scan for the oldest over many inserts and keeps 99 % of state.
        self._evict_batch = max(1, max_orders // 100)
        self._orders: dict[str, bytes] = {}
        self._statuses = _Names(lifecycle.known, _EXTRA_STATUSES)
        self._sources = _Names(("",), _MAX_SOURCES)
        self._links = _Links()
        self._queues: dict[str, _Queue] = {status: _Queue(self._links) for status in lifecycle.known}
        self._limits: Mapping[str, float] = lifecycle.dwell_limits
        self._transitions: dict[tuple[str | None, str, bool], Transition] = {}
        self._removed: deque[str] = deque()
        self.evicted_total = 0
        self.purged_total = 0
        self.ignored_total = 0
        self.removed_lost_total = 0

    @property
    def lifecycle(self) -> Lifecycle:
        """The status table this book classifies with."""
        return self._lifecycle

    def __len__(self) -> int:
        return len(self._orders)

    def __contains__(self, order_id: object) -> bool:
        return order_id in self._orders

    def _status(self, hist: bytes) -> str:
        return self._statuses.names[hist[-4]]

    # ── hot path ────────────────────────────────────────────────────────────────────────────

    def apply(
        self,
        *,
        order_id: str,
        status: str | None,
        observed: str | None,
        now: float,
        span: SpanRef,
        source: str = "",
    ) -> Findings:
        """Record one proxied call that touched ``order_id``.

        The effective new status is ``observed`` when MES reported one that differs from what
        the call set (or, for a read, from what we knew): a change made behind the proxy's
        back, adopted and flagged. A read of an unknown order registers it only when it
        carries an observed status. Repeats change nothing and are not kept in history.
        Callers should pass ``status`` only for calls MES accepted (2xx).

        Args:
            order_id: The order the call is about.
            status: The status the call sets, or None.
            observed: The status MES reported in its response, or None.
            now: Wall-clock epoch seconds of the call.
            span: The call's span, recorded when it changes the status.
            source: Where the call came from (listener or rule name), kept in history.

        Returns:
            The findings; a shared empty value when there is nothing to say.
        """
        hist = self._orders.get(order_id)
        if hist is None:
            return self._first_sighting(order_id, status, observed, now, span, source)
        current = self._statuses.names[hist[-4]]
        if observed is not None and observed != (current if status is None else status):
            new, mismatch = observed, True
        elif status is not None:
            new, mismatch = status, False
        else:
            return Findings(history=hist)
        code = self._statuses.code(new)
        new = self._statuses.names[code]
        transition = self._transition(current, new, mismatch)
        if new == current:
            return Findings(transition=transition, observed_mismatch=mismatch, history=hist)
        dwell = now - _since(hist)
        slot: int = _SLOT.unpack_from(hist)[0]
        was_stuck = self._queues[current].remove(slot)
        if not was_stuck:
            limit = self._limits.get(current)
            was_stuck = limit is not None and dwell > limit
        trace = span.trace_id
        hist = self._append(
            hist,
            _ENTRY.pack(
                now,
                trace >> 64,
                trace & _U64,
                span.span_id,
                code,
                _KIND_CODE[transition.kind],
                _FLAG_OBSERVED if mismatch else 0,
                self._sources.code(source),
            ),
        )
        self._orders[order_id] = hist
        self._queue(new).add(slot, now)
        return Findings(
            transition=transition,
            observed_mismatch=mismatch,
            history=hist,
            was_stuck=was_stuck,
            dwell=dwell,
            changed=True,
        )

    def _first_sighting(
        self, order_id: str, status: str | None, observed: str | None, now: float, span: SpanRef, source: str
    ) -> Findings:
        new = observed if observed is not None else status
        if new is None:
            return _NOTHING
        if not order_id or len(order_id) > _MAX_ID_LENGTH:
            self.ignored_total += 1
            return _NOTHING
        from_observed = observed is not None and observed != status
        code = self._statuses.code(new)
        transition = self._transition(None, self._statuses.names[code], from_observed)
        trace = span.trace_id
        entry = _ENTRY.pack(
            now,
            trace >> 64,
            trace & _U64,
            span.span_id,
            code,
            _KIND_CODE[transition.kind],
            _FLAG_OBSERVED if from_observed else 0,
            self._sources.code(source),
        )
        hist = self._insert(order_id, entry, now)
        return Findings(
            transition=transition,
            observed_mismatch=from_observed and status is not None,
            history=hist,
            changed=True,
        )

    def _append(self, hist: bytes, entry: bytes) -> bytes:
        # The newest full entry becomes a compact one (its span goes) and ``entry`` the newest;
        # past the limit, the oldest compact entry goes too (or, at a limit of 2, the old newest).
        size = len(hist)
        if size == _H + _E:
            return hist + entry
        newest = size - _E
        codes = hist[-4:]
        if hist[newest + 8 : newest + 24] == hist[_H + 8 : _H + 24]:
            codes = bytes((codes[0], codes[1], codes[2] | _FLAG_FIRST_TRACE, codes[3]))
        if size < self._hist_max:
            return b"".join((hist[:newest], hist[newest : newest + 8], codes, entry))
        if newest == _H + _E:
            return hist[:newest] + entry
        return b"".join(
            (hist[: _H + _E], hist[_H + _E + _M : newest], hist[newest : newest + 8], codes, entry)
        )

    def _transition(self, prev: str | None, new: str, observed: bool) -> Transition:
        # Cached: the pairs are bounded by the name table, and a frozen value costs more to
        # build than the rest of ``apply``.
        key = (prev, new, observed)
        transition = self._transitions.get(key)
        if transition is None:
            kind = self._lifecycle.classify(prev, new)
            transition = self._transitions[key] = Transition(prev=prev, new=new, kind=kind, observed=observed)
        return transition

    def _queue(self, status: str) -> _Queue:
        queue = self._queues.get(status)
        if queue is None:
            # Only for statuses outside the lifecycle; bounded by the name table's cap.
            queue = self._queues[status] = _Queue(self._links)
        return queue

    def _insert(self, order_id: str, packed: bytes, since: float, *, stuck: bool = False) -> bytes:
        if len(self._orders) >= self._max_orders:
            self._evict(self._evict_batch)
        slot = self._links.alloc(order_id)
        hist = _SLOT.pack(slot) + packed
        self._orders[order_id] = hist
        self._queue(self._status(hist)).add(slot, since, stuck=stuck)
        return hist

    def _remove(self, order_id: str) -> None:
        hist = self._orders.pop(order_id)
        slot: int = _SLOT.unpack_from(hist)[0]
        self._queues[self._status(hist)].remove(slot)
        self._links.release(slot)
        if len(self._removed) >= _REMOVED_BUFFER:
            self._removed.popleft()
            self.removed_lost_total += 1
        self._removed.append(order_id)

    def _evict(self, count: int) -> None:
        is_terminal = self._lifecycle.is_terminal
        ids = self._links.ids
        victims: list[str] = []
        for terminal in (True, False):
            need = count - len(victims)
            if need <= 0:
                break
            # The oldest `need` of each queue's front, then the oldest `need` of those.
            candidates: list[tuple[float, str]] = []
            for status, queue in self._queues.items():
                if is_terminal(status) != terminal:
                    continue
                queue.ordered(self._orders)
                for slot in itertools.islice(queue.slots(), need):
                    order_id = ids[slot]
                    candidates.append((_since(self._orders[order_id]), order_id))
            candidates.sort()
            victims.extend(order_id for _, order_id in candidates[:need])
        for order_id in victims:
            self._remove(order_id)
        self.evicted_total += len(victims)

    # ── watchdog ────────────────────────────────────────────────────────────────────────────

    def overdue(self, now: float) -> list[StuckOrder]:
        """Orders that went over their status's dwell limit since the last call.

        Each stay in a status is reported exactly once: the order is then flagged stuck
        until it moves on; stuck again in a later status, it is reported again. Only the
        newly overdue orders (and one more per status) are touched. The caller persists the
        flag (``to_record``) so a restart or another replica does not report the stay again.

        Args:
            now: Wall-clock epoch seconds.

        Returns:
            The newly stuck orders, oldest first within each status.
        """
        orders = self._orders
        ids = self._links.ids
        found: list[StuckOrder] = []
        for status, limit in self._limits.items():
            queue = self._queues[status]
            queue.ordered(orders)
            due: list[int] = []
            for slot in queue.waiting:
                if now - _since(orders[ids[slot]]) <= limit:
                    break
                due.append(slot)
            for slot in due:
                queue.flag_stuck(slot)
                found.append(self._stuck_order(ids[slot], status, limit, now))
        return found

    def stuck(self, now: float) -> list[StuckOrder]:
        """Every order currently flagged stuck, the longest over its limit first."""
        ids = self._links.ids
        found = [
            self._stuck_order(ids[slot], status, limit, now)
            for status, limit in self._limits.items()
            for slot in self._queues[status].stuck
        ]
        found.sort(key=lambda s: s.over_by, reverse=True)
        return found

    def _stuck_order(self, order_id: str, status: str, limit: float, now: float) -> StuckOrder:
        hist = self._orders[order_id]
        since = _since(hist)
        return StuckOrder(
            order_id=order_id,
            status=status,
            since=since,
            limit=limit,
            over_by=now - since - limit,
            span=_span_at(hist, len(hist) - _E),
            first_span=_span_at(hist, _H),
        )

    def purge(self, now: float, retention: float) -> int:
        """Forget terminal orders whose terminal status began more than ``retention`` ago.

        Removed ids become available to ``drain_removed`` for deletion from the store.

        Args:
            now: Wall-clock epoch seconds.
            retention: Seconds a terminal order is kept.

        Returns:
            How many orders were removed.
        """
        victims: list[str] = []
        for status, queue in self._queues.items():
            if not self._lifecycle.is_terminal(status):
                continue
            queue.ordered(self._orders)
            for slot in queue.waiting:
                order_id = self._links.ids[slot]
                if now - _since(self._orders[order_id]) <= retention:
                    break
                victims.append(order_id)
        for order_id in victims:
            self._remove(order_id)
        self.purged_total += len(victims)
        return len(victims)

    def drain_removed(self) -> tuple[str, ...]:
        """Ids purged or evicted since the last call, for the shell to delete from the store."""
        removed = tuple(self._removed)
        self._removed.clear()
        return removed

    # ── reads ───────────────────────────────────────────────────────────────────────────────

    def get(self, order_id: str) -> OrderView | None:
        """The order's state and history, or None when it is not tracked."""
        hist = self._orders.get(order_id)
        if hist is None:
            return None
        history = _unpack_all(hist, _H, self._statuses.names, self._sources.names)
        status = history[-1].status
        return OrderView(
            order_id=order_id,
            status=status,
            prev=history[-2].status if len(history) > 1 else None,
            since=history[-1].at,
            stuck=bool(self._links.stuck[_SLOT.unpack_from(hist)[0]]),
            dwell_limit=self._limits.get(status),
            span=history[-1].span,
            first_span=history[0].span,
            history=history,
        )

    def by_status(self, status: str, limit: int = 100, offset: int = 0) -> list[OrderView]:
        """Orders in ``status``, those waiting longest first (reported stuck ones lead).

        Raises:
            ValueError: for a negative ``limit`` or ``offset``.
        """
        if limit < 0 or offset < 0:
            raise ValueError("limit and offset must not be negative")
        queue = self._queues.get(status)
        if queue is None:
            return []
        queue.ordered(self._orders)
        ids = self._links.ids
        slots = itertools.islice(queue.slots(), offset, offset + limit)
        return [view for slot in slots if (view := self.get(ids[slot])) is not None]

    def counts(self) -> Mapping[str, int]:
        """Orders per status, every known status included (zeros keep gauges alive)."""
        return MappingProxyType({status: len(queue) for status, queue in self._queues.items()})

    def snapshot(self) -> BookSnapshot:
        """Book-wide figures for metrics and the admin page, in O(statuses)."""
        oldest: dict[str, float] = {}
        for status, queue in self._queues.items():
            queue.ordered(self._orders)
            front = next(queue.slots(), None)
            if front is not None:
                oldest[status] = _since(self._orders[self._links.ids[front]])
        return BookSnapshot(
            orders=len(self._orders),
            capacity=self._max_orders,
            by_status=self.counts(),
            stuck_by_status=MappingProxyType({s: self._queues[s].stuck.size for s in self._limits}),
            oldest_since=MappingProxyType(oldest),
            evicted_total=self.evicted_total,
            purged_total=self.purged_total,
            ignored_total=self.ignored_total,
            removed_lost_total=self.removed_lost_total,
        )

    # ── persistence and replicas ────────────────────────────────────────────────────────────

    def to_record(self, order_id: str) -> OrderRecord:
        """The order's persistable state: one copy of its packed history, not decoded or checked.

        Raises:
            KeyError: when the order is not tracked.
        """
        hist = self._orders[order_id]
        return _trusted_record(
            order_id,
            bool(self._links.stuck[_SLOT.unpack_from(hist)[0]]),
            hist[_H:],
            self._statuses.names,
            self._sources.names,
        )

    def load(self, records: Iterable[OrderRecord]) -> int:
        """Merge many records (start-up restore), oldest first; returns how many changed the book."""
        return sum(self.merge(record) for record in sorted(records, key=lambda r: r.since))

    def merge(self, record: OrderRecord) -> bool:
        """Merge one order's record, from the store or from another replica.

        The histories are united (an entry is unique per call; a compact copy of an entry, kept
        without its span, yields to the full one) and sorted by time, so the newest status
        change wins whichever replica saw it, and replicas converge on the same record. The
        stuck flag belongs to a stay: it is kept when the merged newest entry is the newest
        entry of a side that had reported the stay, so a stay reported by one replica is not
        reported again by another that learns of it.

        Returns:
            True when the book changed.
        """
        incoming = record.entries
        hist = self._orders.get(record.order_id)
        if hist is None:
            if not record.order_id or len(record.order_id) > _MAX_ID_LENGTH:
                self.ignored_total += 1
                return False
            entries = self._trim(incoming)
            self._place(
                record.order_id, None, self._pack(entries), entries[-1].at, stuck=record.stuck_reported
            )
            return True
        local = _unpack_all(hist, _H, self._statuses.names, self._sources.names)
        local_stuck = bool(self._links.stuck[_SLOT.unpack_from(hist)[0]])
        merged = self._trim(_unite(local, incoming))
        newest = merged[-1]
        stuck = (record.stuck_reported and incoming[-1] == newest) or (local_stuck and local[-1] == newest)
        packed = self._pack(merged)
        if packed == hist[_H:] and stuck == local_stuck:
            return False
        self._place(record.order_id, hist, packed, merged[-1].at, stuck=stuck)
        return True

    def _trim(self, entries: Sequence[HistoryEntry]) -> tuple[HistoryEntry, ...]:
        if len(entries) <= self._history_limit:
            return tuple(entries)
        return (entries[0], *entries[len(entries) - self._history_limit + 1 :])

    def _pack(self, entries: Sequence[HistoryEntry]) -> bytes:
        return _pack_all(entries, self._statuses.code, self._sources.code)

    def _place(self, order_id: str, old: bytes | None, packed: bytes, since: float, *, stuck: bool) -> None:
        # A flag for a status without a dwell limit here (replicas configured apart) is moot.
        stuck = stuck and self._status(packed) in self._limits
        if old is None:
            self._insert(order_id, packed, since, stuck=stuck)
            return
        slot: int = _SLOT.unpack_from(old)[0]
        self._queues[self._status(old)].remove(slot)
        hist = old[:_H] + packed
        self._orders[order_id] = hist
        self._queue(self._status(hist)).add(slot, since, stuck=stuck)
