"""The order book's indexes: name tables fold past their cap, queues stay oldest first."""

from __future__ import annotations

from mes_trace_proxy.order_index import OTHER, SLOT, NameTable, Slots, StatusQueue
from mes_trace_proxy.order_records import ENTRY

T0 = 1_700_000_000.0


def test_name_table_is_canonical_and_folds_past_its_cap() -> None:
    """A name keeps its code; past the cap every new name is OTHER, one code for all."""
    table = NameTable(("A", "B"), extra=2)
    assert (table.code("A"), table.code("B")) == (0, 1)
    assert table.code("C") == 2
    assert table.code("D") == 3
    assert table.code("E") == table.code("F") == 4
    assert table.names == ("A", "B", "C", "D", OTHER)


def test_slots_are_reused() -> None:
    """A released slot is handed out again before the arrays grow."""
    slots = Slots()
    assert [slots.alloc(x) for x in ("a", "b", "c")] == [0, 1, 2]
    slots.release(1)
    assert slots.alloc("d") == 1
    assert slots.ids == ["a", "d", "c"]


def _dirty(queue: StatusQueue) -> bool:
    # A call, not the attribute: mypy would narrow ``queue.dirty`` across the calls between.
    return queue.dirty


def _hist(slot: int, since: float) -> bytes:
    return SLOT.pack(slot) + ENTRY.pack(since, 0, 1, 1, 0, 0, 0, 0)


def test_queue_is_oldest_first_and_resorts_after_an_older_insert() -> None:
    """Appending in time order keeps the chain sorted; an older insert is sorted on the next read."""
    slots = Slots()
    queue = StatusQueue(slots)
    orders: dict[str, bytes] = {}
    for order_id, since in (("b", T0 + 2), ("c", T0 + 3), ("a", T0 + 1)):
        slot = slots.alloc(order_id)
        orders[order_id] = _hist(slot, since)
        queue.add(slot, since)
    assert _dirty(queue)
    queue.ordered(orders)
    assert [slots.ids[s] for s in queue.slots()] == ["a", "b", "c"]
    queue.flag_stuck(2, T0 + 1)  # "a" (slot 2) is reported stuck
    assert [slots.ids[s] for s in queue.stuck] == ["a"]
    assert not _dirty(queue)
    assert [slots.ids[s] for s in queue.slots()] == ["a", "b", "c"]
    assert queue.remove(2) is True
    assert queue.remove(0) is False
    assert len(queue) == 1


def test_flagging_an_order_older_than_a_stuck_one_marks_the_queue_for_sorting() -> None:
    """A replica's newer stuck order ahead of an older local one is put back in order."""
    slots = Slots()
    queue = StatusQueue(slots)
    orders: dict[str, bytes] = {}
    newer = slots.alloc("replica")
    orders["replica"] = _hist(newer, T0 + 50)
    older = slots.alloc("local")
    orders["local"] = _hist(older, T0 + 10)
    queue.add(older, T0 + 10)
    queue.add(newer, T0 + 50, stuck=True)
    assert not _dirty(queue)
    queue.flag_stuck(older, T0 + 10)
    assert _dirty(queue)
    queue.ordered(orders)
    assert [slots.ids[s] for s in queue.stuck] == ["local", "replica"]
