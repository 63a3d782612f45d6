"""OrderBook: per-order status state, transition findings and exactly-once stuck detection.

Pure: time is an argument (``now``, wall-clock epoch seconds); ``apply`` is O(1) on the hot path.
The book's rules live here; how an order's history is packed into bytes is ``order_records``,
the name tables, slots and per-status queues the book indexes orders with are ``order_index``,
and the values it answers with are ``order_values`` (all re-exported here).
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Final

from mes_trace_proxy.lifecycle import Lifecycle
from mes_trace_proxy.order_index import NIL, OTHER, SLOT, SLOT_SIZE, NameTable, Slots, StatusQueue
from mes_trace_proxy.order_records import (
    COMPACT_SIZE,
    ENTRY,
    ENTRY_SIZE,
    FLAG_OBSERVED,
    KIND_CODE,
    U64,
    HistoryEntry,
    OrderRecord,
    SpanRef,
    append_entry,
    first_at,
    pack_all,
    since_of,
    span_at,
    trusted_record,
    unite,
    unpack_all,
)
from mes_trace_proxy.order_values import BookSnapshot, Findings, OrderView, StuckOrder, Transition

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
        self._hist_max = SLOT_SIZE + 2 * ENTRY_SIZE + (history_limit - 2) * COMPACT_SIZE
        self._max_orders = max_orders
        # 1 %: amortises the scan for the oldest over many inserts and keeps 99 % of state.
        self._evict_batch = max(1, max_orders // 100)
        self._orders: dict[str, bytes] = {}
        self._statuses = NameTable(lifecycle.known, _EXTRA_STATUSES)
        self._sources = NameTable(("",), _MAX_SOURCES)
        self._links = Slots()
        self._queues: dict[str, StatusQueue] = {
            status: StatusQueue(self._links) for status in lifecycle.known
        }
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
        dwell = now - since_of(hist)
        slot: int = SLOT.unpack_from(hist)[0]
        was_stuck = self._queues[current].remove(slot)
        if not was_stuck:
            limit = self._limits.get(current)
            was_stuck = limit is not None and dwell > limit
        trace = span.trace_id
        hist = append_entry(
            hist,
            SLOT_SIZE,
            self._hist_max,
            ENTRY.pack(
                now,
                trace >> 64,
                trace & U64,
                span.span_id,
                code,
                KIND_CODE[transition.kind],
                FLAG_OBSERVED if mismatch else 0,
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
        entry = ENTRY.pack(
            now,
            trace >> 64,
            trace & U64,
            span.span_id,
            code,
            KIND_CODE[transition.kind],
            FLAG_OBSERVED if from_observed else 0,
            self._sources.code(source),
        )
        hist = self._insert(order_id, entry, now)
        return Findings(
            transition=transition,
            observed_mismatch=from_observed and status is not None,
            history=hist,
            changed=True,
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

    def _queue(self, status: str) -> StatusQueue:
        queue = self._queues.get(status)
        if queue is None:
            # Only for statuses outside the lifecycle; bounded by the name table's cap.
            queue = self._queues[status] = StatusQueue(self._links)
        return queue

    def _insert(self, order_id: str, packed: bytes, since: float, *, stuck: bool = False) -> bytes:
        if len(self._orders) >= self._max_orders:
            self._evict(self._evict_batch)
        slot = self._links.alloc(order_id)
        hist = SLOT.pack(slot) + packed
        self._orders[order_id] = hist
        self._queue(self._status(hist)).add(slot, since, stuck=stuck)
        return hist

    def _remove(self, order_id: str) -> None:
        hist = self._orders.pop(order_id)
        slot: int = SLOT.unpack_from(hist)[0]
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
                    candidates.append((since_of(self._orders[order_id]), order_id))
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
            due: list[tuple[int, float]] = []
            for slot in queue.waiting:
                since = since_of(orders[ids[slot]])
                if now - since <= limit:
                    break
                due.append((slot, since))
            for slot, since in due:
                queue.flag_stuck(slot, since)
                found.append(self._stuck_order(ids[slot], status, limit, now))
        return found

    def stuck_total(self) -> int:
        """How many orders are flagged stuck now, in O(statuses)."""
        queues = self._queues
        return sum(queues[status].stuck.size for status in self._limits)

    def stuck(self, now: float, *, offset: int = 0, limit: int | None = None) -> list[StuckOrder]:
        """Orders flagged stuck, the longest over its limit first: a page, or every one.

        Each status keeps its stuck orders oldest first, so they are already in order of
        lateness within the status; the page is a merge of those lists that stops after
        ``offset + limit`` orders and builds only the page's: O(offset + limit) for the few
        statuses with a dwell limit, whatever the total.

        Args:
            now: Wall-clock epoch seconds.
            offset: Orders to skip.
            limit: Orders to return at most (None: all from ``offset`` on).

        Raises:
            ValueError: for a negative ``offset`` or ``limit``.
        """
        if offset < 0 or (limit is not None and limit < 0):
            raise ValueError("limit and offset must not be negative")
        orders = self._orders
        ids = self._links.ids
        after = self._links.next
        # One run per status with stuck orders: its next slot, that order's lateness, and the
        # status's name and limit. Few statuses have limits, so a scan picks the next order.
        slots: list[int] = []
        lateness: list[float] = []
        names: list[str] = []
        limits: list[float] = []
        for status, dwell_limit in self._limits.items():
            queue = self._queues[status]
            if queue.stuck.size:
                queue.ordered(orders)
                head = queue.stuck.head
                slots.append(head)
                lateness.append(now - since_of(orders[ids[head]]) - dwell_limit)
                names.append(status)
                limits.append(dwell_limit)
        end = self.stuck_total() if limit is None else offset + limit
        page: list[StuckOrder] = []
        for taken in range(end):
            run = -1
            most = -math.inf
            for i, late in enumerate(lateness):
                if late > most:  # strictly: on a tie the earlier status goes first
                    run, most = i, late
            if run < 0:
                break
            slot = slots[run]
            if taken >= offset:
                page.append(self._stuck_order(ids[slot], names[run], limits[run], now))
            slot = after[slot]
            slots[run] = slot
            lateness[run] = -math.inf if slot == NIL else now - since_of(orders[ids[slot]]) - limits[run]
        return page

    def _stuck_order(self, order_id: str, status: str, limit: float, now: float) -> StuckOrder:
        hist = self._orders[order_id]
        since = since_of(hist)
        return StuckOrder(
            order_id=order_id,
            status=status,
            since=since,
            limit=limit,
            over_by=now - since - limit,
            span=span_at(hist, len(hist) - ENTRY_SIZE),
            first_span=span_at(hist, SLOT_SIZE),
            first_seen=first_at(hist, SLOT_SIZE),
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
                if now - since_of(self._orders[order_id]) <= retention:
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
        history = unpack_all(hist, SLOT_SIZE, self._statuses.names, self._sources.names)
        status = history[-1].status
        return OrderView(
            order_id=order_id,
            status=status,
            prev=history[-2].status if len(history) > 1 else None,
            since=history[-1].at,
            stuck=bool(self._links.stuck[SLOT.unpack_from(hist)[0]]),
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
                oldest[status] = since_of(self._orders[self._links.ids[front]])
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
        return trusted_record(
            order_id,
            bool(self._links.stuck[SLOT.unpack_from(hist)[0]]),
            hist[SLOT_SIZE:],
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
        local = unpack_all(hist, SLOT_SIZE, self._statuses.names, self._sources.names)
        local_stuck = bool(self._links.stuck[SLOT.unpack_from(hist)[0]])
        merged = self._trim(unite(local, incoming))
        newest = merged[-1]
        stuck = (record.stuck_reported and incoming[-1] == newest) or (local_stuck and local[-1] == newest)
        packed = self._pack(merged)
        if packed == hist[SLOT_SIZE:] and stuck == local_stuck:
            return False
        self._place(record.order_id, hist, packed, merged[-1].at, stuck=stuck)
        return True

    def _trim(self, entries: Sequence[HistoryEntry]) -> tuple[HistoryEntry, ...]:
        if len(entries) <= self._history_limit:
            return tuple(entries)
        return (entries[0], *entries[len(entries) - self._history_limit + 1 :])

    def _pack(self, entries: Sequence[HistoryEntry]) -> bytes:
        return pack_all(entries, self._statuses.code, self._sources.code)

    def _place(self, order_id: str, old: bytes | None, packed: bytes, since: float, *, stuck: bool) -> None:
        # A flag for a status without a dwell limit here (replicas configured apart) is moot.
        stuck = stuck and self._status(packed) in self._limits
        if old is None:
            self._insert(order_id, packed, since, stuck=stuck)
            return
        slot: int = SLOT.unpack_from(old)[0]
        self._queues[self._status(old)].remove(slot)
        hist = old[:SLOT_SIZE] + packed
        self._orders[order_id] = hist
        self._queue(self._status(hist)).add(slot, since, stuck=stuck)
