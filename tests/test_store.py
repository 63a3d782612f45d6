"""Tests for record encoding, MemoryStore, the write-behind StoreWriter and open_store URLs."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import pytest

from mes_trace_proxy.lifecycle import TransitionKind
from mes_trace_proxy.orders import HistoryEntry, OrderRecord, SpanRef
from mes_trace_proxy.store import (
    MemoryStore,
    StateStore,
    StoreWriter,
    open_store,
)
from mes_trace_proxy.store_redis import RedisStore
from mes_trace_proxy.store_sqlite import SqliteStore

T0 = 1_700_000_000.0
WAIT = 5.0  # seconds any wait on the writer may take before the test fails


def record(order_id: str, *statuses: str, stuck: bool = False) -> OrderRecord:
    """A record whose history walks ``statuses`` one second apart."""
    entries = [
        HistoryEntry(
            status=status,
            at=T0 + i,
            span=SpanRef((i + 1) << 70 | 7, i + 1),
            kind=TransitionKind.FIRST if i == 0 else TransitionKind.FORWARD,
            observed=i % 2 == 1,
            source="ingress" if i % 2 == 0 else "egress",
        )
        for i, status in enumerate(statuses or ("SUBMITTED",))
    ]
    return OrderRecord.from_entries(order_id, entries, stuck_reported=stuck)


# ── memory store ─────────────────────────────────────────────────────────────────────────────


async def test_memory_store_round_trip() -> None:
    """MemoryStore keeps the newest record per order and forgets deleted ones."""
    store = MemoryStore()
    await store.save([record("a"), record("b")])
    await store.save([record("a", "SUBMITTED", "PRICE_CALCULATED")])
    await store.delete(["b", "unknown"])
    assert await store.load() == [record("a", "SUBMITTED", "PRICE_CALCULATED")]
    assert await store.changes_since("7") == ([], "7")
    await store.close()


# ── writer ───────────────────────────────────────────────────────────────────────────────────


class FlakyStore(MemoryStore):
    """A MemoryStore that fails on demand and lets tests wait for what it was asked."""

    def __init__(self) -> None:
        super().__init__()
        self.failing = False
        self.calls = 0
        self.failures = 0
        self.batches: list[list[str]] = []
        self.deleted: list[list[str]] = []
        self.gate: asyncio.Event | None = None
        self._changed = asyncio.Condition()

    async def _count(self, *, failed: bool) -> None:
        async with self._changed:
            self.calls += 1
            self.failures += failed
            self._changed.notify_all()

    async def save(self, records: Sequence[OrderRecord]) -> None:
        if self.gate is not None:
            await self._count(failed=False)
            await self.gate.wait()
        if self.failing:
            await self._count(failed=True)
            raise OSError("disk on fire")
        self.batches.append([r.order_id for r in records])
        await super().save(records)
        await self._count(failed=False)

    async def delete(self, order_ids: Sequence[str]) -> None:
        self.deleted.append(list(order_ids))
        await super().delete(order_ids)

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        """Wait (bounded) until ``predicate`` holds after some call."""
        async with asyncio.timeout(WAIT), self._changed:
            await self._changed.wait_for(predicate)


@pytest.fixture
async def writers() -> AsyncIterator[list[StoreWriter]]:
    """Writers a test makes; every one is stopped at its end."""
    made: list[StoreWriter] = []
    yield made
    for writer in made:
        await writer.stop(grace=1.0)


async def test_enqueue_coalesces_by_order(writers: list[StoreWriter]) -> None:
    """Only the newest pending state of each order is written, in one batch."""
    store = FlakyStore()
    writer = StoreWriter(store)
    writers.append(writer)
    writer.enqueue(record("a"))
    writer.enqueue(record("b"))
    writer.enqueue(record("a", "SUBMITTED", "PRICE_CALCULATED"))
    assert writer.pending == 2
    assert await writer.flush()
    assert store.batches == [["b", "a"]]
    assert store.records["a"] == record("a", "SUBMITTED", "PRICE_CALCULATED")
    assert (writer.pending, writer.written_total) == (0, 2)


async def test_background_flush_on_interval(writers: list[StoreWriter]) -> None:
    """A started writer flushes on its own within the interval."""
    store = FlakyStore()
    writer = StoreWriter(store, interval=0.01)
    writers.append(writer)
    writer.start()
    writer.enqueue(record("a"))
    async with asyncio.timeout(WAIT):
        await writer.drained()
    assert store.records.keys() == {"a"}


async def test_full_batch_flushes_before_the_interval(writers: list[StoreWriter]) -> None:
    """Reaching ``max_batch`` wakes the writer even when the interval is an hour."""
    store = FlakyStore()
    writer = StoreWriter(store, interval=3600, max_batch=3)
    writers.append(writer)
    writer.start()
    for name in "abc":
        writer.enqueue(record(name))
    async with asyncio.timeout(WAIT):
        await writer.drained()
    assert store.batches == [["a", "b", "c"]]


async def test_batches_are_bounded(writers: list[StoreWriter]) -> None:
    """One flush writes everything, ``max_batch`` records per store call."""
    store = FlakyStore()
    writer = StoreWriter(store, max_batch=2)
    writers.append(writer)
    for name in "abcde":
        writer.enqueue(record(name))
    assert await writer.flush()
    assert store.batches == [["a", "b"], ["c", "d"], ["e"]]


async def test_deletes_are_written(writers: list[StoreWriter]) -> None:
    """A delete replaces a pending write of the same order and removes it from the store."""
    store = FlakyStore()
    await store.save([record("old")])
    writer = StoreWriter(store)
    writers.append(writer)
    writer.enqueue(record("old", "SUBMITTED", "CLOSED"))
    writer.enqueue_delete("old")
    writer.enqueue(record("new"))
    assert await writer.flush()
    assert store.records.keys() == {"new"}
    assert store.deleted == [["old"]]
    assert writer.deleted_total == 1


async def test_newer_state_enqueued_during_a_write_is_kept(writers: list[StoreWriter]) -> None:
    """A change enqueued while the order's older state is being written is written next."""
    store = FlakyStore()
    store.gate = asyncio.Event()
    writer = StoreWriter(store)
    writers.append(writer)
    writer.enqueue(record("a"))
    flushing = asyncio.get_running_loop().create_task(writer.flush(), name="test-flush")
    await store.wait_for(lambda: store.calls == 1)
    writer.enqueue(record("a", "SUBMITTED", "PRICE_CALCULATED"))
    store.gate.set()
    assert await flushing
    assert store.batches == [["a"], ["a"]]
    assert store.records["a"] == record("a", "SUBMITTED", "PRICE_CALCULATED")


async def test_failing_store_degrades_and_recovers(
    writers: list[StoreWriter], caplog: pytest.LogCaptureFixture
) -> None:
    """A failing store keeps changes pending, logs once, retries, then catches up and says so."""
    store = FlakyStore()
    store.failing = True
    writer = StoreWriter(store, interval=0.001, backoff_cap=0.005)
    writers.append(writer)
    caplog.set_level(logging.INFO, logger="mes_trace_proxy.store")
    writer.start()
    writer.enqueue(record("order-secret-1"))
    await store.wait_for(lambda: store.failures >= 3)
    writer.enqueue(record("order-secret-2"))
    await store.wait_for(lambda: store.failures >= 5)
    assert (writer.healthy, writer.pending) == (False, 2)
    assert writer.errors_total >= 5
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert "OSError: disk on fire" in errors[0].getMessage()

    store.failing = False
    async with asyncio.timeout(WAIT):
        await writer.drained()
    assert writer.healthy
    assert store.records.keys() == {"order-secret-1", "order-secret-2"}
    recovered = [r for r in caplog.records if "recovered" in r.getMessage()]
    assert len(recovered) == 1
    assert "order-secret" not in caplog.text

    store.failing = True  # a second outage is logged again
    before = store.failures
    writer.enqueue(record("c"))
    await store.wait_for(lambda: store.failures > before)
    assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 2


async def test_pending_is_bounded_oldest_dropped(
    writers: list[StoreWriter], caplog: pytest.LogCaptureFixture
) -> None:
    """Past ``max_pending`` the oldest changes are dropped, counted and logged once."""
    store = FlakyStore()
    store.failing = True
    writer = StoreWriter(store, max_pending=3)
    writers.append(writer)
    for name in "abcde":
        writer.enqueue(record(name))
    assert not await writer.flush()
    assert (writer.pending, writer.dropped_total) == (3, 2)
    assert len([r for r in caplog.records if "dropping the oldest" in r.getMessage()]) == 1
    store.failing = False
    assert await writer.flush()
    assert store.records.keys() == {"c", "d", "e"}


async def test_stop_flushes_what_is_pending() -> None:
    """Stopping writes the remaining changes before returning."""
    store = FlakyStore()
    writer = StoreWriter(store, interval=3600)
    writer.start()
    writer.enqueue(record("a"))
    await writer.stop()
    assert store.records.keys() == {"a"}
    unstarted = StoreWriter(store)
    unstarted.enqueue(record("b"))
    await unstarted.stop()
    assert store.records.keys() == {"a", "b"}


async def test_stop_with_a_dead_store_counts_the_loss(caplog: pytest.LogCaptureFixture) -> None:
    """Stopping while the store fails returns, counts the unwritten changes and logs them."""
    store = FlakyStore()
    store.failing = True
    writer = StoreWriter(store, interval=3600)
    writer.start()
    writer.enqueue(record("a"))
    writer.enqueue(record("b"))
    await writer.stop(grace=1.0)
    assert writer.dropped_total == 2
    assert writer.pending == 0
    assert "2 changes could not be written before shutdown" in caplog.text


async def test_start_twice_is_refused(writers: list[StoreWriter]) -> None:
    """A writer has one background task."""
    writer = StoreWriter(MemoryStore())
    writers.append(writer)
    writer.start()
    with pytest.raises(RuntimeError, match="already started"):
        writer.start()


@pytest.mark.parametrize(
    "kwargs",
    [{"interval": 0}, {"max_batch": 0}, {"max_pending": 0}, {"backoff_cap": -1}],
    ids=["interval", "batch", "pending", "backoff"],
)
def test_writer_limits(kwargs: dict[str, float]) -> None:
    """Non-positive writer limits are refused."""
    with pytest.raises(ValueError, match="must be positive"):
        StoreWriter(MemoryStore(), **kwargs)  # type: ignore[arg-type]


# ── URLs ─────────────────────────────────────────────────────────────────────────────────────

GOOD_URLS: tuple[tuple[str, str, type[object]], ...] = (
    ("memory", "memory", MemoryStore),
    ("sqlite-relative", "sqlite:///state/orders.db", SqliteStore),
    ("sqlite-absolute", "sqlite:////var/lib/mes/orders.db", SqliteStore),
    ("redis", "redis://localhost:6379/0", RedisStore),
    ("redis-no-db", "redis://redis", RedisStore),
    ("rediss-password", "rediss://:pw@redis.internal:6380/2", RedisStore),
    ("redis-unix", "unix:///run/redis/redis.sock?db=1", RedisStore),
)


@pytest.mark.parametrize(("url", "kind"), [c[1:] for c in GOOD_URLS], ids=[c[0] for c in GOOD_URLS])
async def test_open_store(url: str, kind: type[object]) -> None:
    """Each supported URL form builds its store without touching disk or network."""
    store: StateStore = open_store(url)
    try:
        assert isinstance(store, kind)
    finally:
        await store.close()


def test_open_store_sqlite_paths() -> None:
    """Three slashes mean a relative path, four an absolute one."""
    relative, absolute = open_store("sqlite:///a/b.db"), open_store("sqlite:////a/b.db")
    assert isinstance(relative, SqliteStore)
    assert isinstance(absolute, SqliteStore)
    assert (relative.path, absolute.path) == (Path("a/b.db"), Path("/a/b.db"))


BAD_URLS = (
    ("empty", "", "expected memory"),
    ("no-scheme", "orders.db", "expected memory"),
    ("unknown-scheme", "postgres://db/orders", "unknown scheme 'postgres'"),
    ("sqlite-two-slashes", "sqlite://orders.db", "three slashes"),
    ("sqlite-no-file", "sqlite:///", "database file name"),
    ("sqlite-directory", "sqlite:///var/lib/", "database file name"),
    ("redis-no-host", "redis:///0", "needs a host"),
    ("redis-bad-port", "redis://localhost:port/0", "bad port"),
    ("redis-bad-db", "redis://localhost:6379/orders", "must be a number"),
    ("unix-no-path", "unix://", "socket path"),
)


@pytest.mark.parametrize(("url", "message"), [c[1:] for c in BAD_URLS], ids=[c[0] for c in BAD_URLS])
def test_open_store_bad_url(url: str, message: str) -> None:
    """A bad state URL is a ValueError that says what is wrong."""
    with pytest.raises(ValueError, match=message):
        open_store(url)


def test_open_store_error_hides_password() -> None:
    """The password of a bad redis URL never appears in the error."""
    with pytest.raises(ValueError, match=r"\*\*\*") as info:
        open_store("redis://:hunter2@localhost:6379/orders")
    assert "hunter2" not in str(info.value)
