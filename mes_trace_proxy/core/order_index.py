"""The order book's indexes: the status and source name tables, order slots, and per-status queues.

Pure and allocation-lean: flat arrays and linked lists of slots, so a million orders cost a few
bytes each here and nothing for the garbage collector to walk.
"""

from __future__ import annotations

import itertools
import math
import struct
from array import array
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Final

from mes_trace_proxy.core.order_records import MAX_NAMES, since_of

__all__ = ["OTHER", "Chain", "NameTable", "Slots", "StatusQueue"]

OTHER: Final = "(other)"
"""Stands for any status or source past the book's name-table cap (bounds memory and labels)."""

# The book's own bytes start with the order's slot in the queue links (u32); records do not.
SLOT: Final = struct.Struct("<I")
SLOT_SIZE: Final = SLOT.size


class NameTable:
    """An append-only string table: one canonical object per name, one byte per code."""

    __slots__ = ("_cap", "_codes", "names")

    def __init__(self, initial: Iterable[str], extra: int) -> None:
        # mypyc: tuple(), not () (native.py, constraint 6).
        self.names: tuple[str, ...] = tuple()
        self._codes: dict[str, int] = {}
        for name in initial:
            self._add(name)
        self._cap = min(len(self.names) + extra, MAX_NAMES - 1)

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


NIL: Final = 0xFFFFFFFF  # no slot: the end of a chain


class Slots:
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
        self.free = NIL

    def alloc(self, order_id: str) -> int:
        slot = self.free
        if slot != NIL:
            self.free = self.next[slot]
            self.ids[slot] = order_id
            return slot
        slot = len(self.ids)
        self.ids.append(order_id)
        self.next.append(NIL)
        self.prev.append(NIL)
        self.stuck.append(0)
        return slot

    def release(self, slot: int) -> None:
        self.ids[slot] = ""
        self.next[slot] = self.free
        self.free = slot


class Chain:
    """A doubly linked list of slots over the shared ``Slots``, oldest first."""

    __slots__ = ("head", "next", "prev", "size", "tail")

    def __init__(self, links: Slots) -> None:
        # The arrays themselves, not ``links``: one attribute lookup less per step on the hot path.
        self.next = links.next
        self.prev = links.prev
        self.head = self.tail = NIL
        self.size = 0

    def push(self, slot: int) -> None:
        tail = self.tail
        self.next[slot] = NIL
        self.prev[slot] = tail
        if tail == NIL:
            self.head = slot
        else:
            self.next[tail] = slot
        self.tail = slot
        self.size += 1

    def unlink(self, slot: int) -> None:
        before, after = self.prev[slot], self.next[slot]
        if before == NIL:
            self.head = after
        else:
            self.next[before] = after
        if after == NIL:
            self.tail = before
        else:
            self.prev[after] = before
        self.size -= 1

    def __iter__(self) -> Iterator[int]:
        # Callers do not change the chain while they walk it (they collect, then act).
        after = self.next
        slot = self.head
        while slot != NIL:
            yield slot
            slot = after[slot]

    def relink(self, slots: Sequence[int]) -> None:
        self.head = self.tail = NIL
        self.size = 0
        for slot in slots:
            self.push(slot)


class StatusQueue:
    """The orders in one status, oldest first: ``waiting``, and ``stuck`` (reported).

    Orders enter a status at ``now``, so appending keeps each chain ordered. An insertion
    older than a chain's newest (clock step, merge from a replica, an order flagged stuck
    after a replica's newer one) marks the queue ``dirty``, and the next ordered read
    re-sorts it. Both chains sorted is what lets the stuck list be read a page at a time.
    """

    __slots__ = ("dirty", "flags", "links", "stuck", "stuck_tail", "tail", "waiting")

    def __init__(self, links: Slots) -> None:
        self.links = links
        self.flags = links.stuck
        self.waiting = Chain(links)
        self.stuck = Chain(links)
        # The newest ``since`` added to either chain, and to the stuck chain (upper bounds:
        # removals leave them as they are, which at worst costs one needless re-sort).
        self.tail = -math.inf
        self.stuck_tail = -math.inf
        self.dirty = False

    def add(self, slot: int, since: float, *, stuck: bool = False) -> None:
        self.flags[slot] = stuck
        (self.stuck if stuck else self.waiting).push(slot)
        if since < self.tail:
            self.dirty = True
        else:
            self.tail = since
        if stuck and since > self.stuck_tail:
            self.stuck_tail = since

    def remove(self, slot: int) -> bool:
        """Remove the order; return True when it was reported stuck."""
        if self.flags[slot]:
            self.stuck.unlink(slot)
            return True
        self.waiting.unlink(slot)
        return False

    def flag_stuck(self, slot: int, since: float) -> None:
        """Move the order from waiting to stuck (``since``: when it entered the status)."""
        self.waiting.unlink(slot)
        self.stuck.push(slot)
        self.flags[slot] = True
        if since < self.stuck_tail:
            self.dirty = True
        else:
            self.stuck_tail = since

    def ordered(self, orders: Mapping[str, bytes]) -> None:
        if self.dirty:
            ids = self.links.ids
            for chain in (self.waiting, self.stuck):
                chain.relink(sorted(chain, key=lambda s: since_of(orders[ids[s]])))
            self.dirty = False

    def slots(self) -> Iterator[int]:
        """Reported stuck orders first, then waiting ones (call ``ordered`` first)."""
        return itertools.chain(self.stuck, self.waiting)

    def __len__(self) -> int:
        return self.waiting.size + self.stuck.size
