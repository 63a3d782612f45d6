"""Tests for the SQLite store: round trip, restart, schema, unwritable files and recovery."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from mes_trace_proxy.core.lifecycle import REFERENCE_LIFECYCLE, TransitionKind
from mes_trace_proxy.core.orders import HistoryEntry, OrderBook, OrderRecord, SpanRef
from mes_trace_proxy.state.sqlite_store import SCHEMA_VERSION, SqliteStore
from mes_trace_proxy.state.store import StoreWriter, open_store

T0 = 1_700_000_000.0
WAIT = 5.0  # seconds any wait on the writer may take before the test fails


def record(order_id: str, *statuses: str, stuck: bool = False) -> OrderRecord:
    """A record whose history walks ``statuses`` one second apart."""
    entries = [
        HistoryEntry(
            status=status,
            at=T0 + i,
            span=SpanRef((i + 1) << 70 | 9, i + 1),
            kind=TransitionKind.FIRST if i == 0 else TransitionKind.FORWARD,
        )
        for i, status in enumerate(statuses or ("SUBMITTED",))
    ]
    return OrderRecord.from_entries(order_id, entries, stuck_reported=stuck)


@pytest.fixture
async def open_sqlite() -> AsyncIterator[Callable[..., SqliteStore]]:
    """Factory of SQLite stores; every store made is closed at the end, newest first."""
    made: list[SqliteStore] = []

    def factory(path: Path, *, read_only: bool = False) -> SqliteStore:
        store = SqliteStore(path, read_only=read_only)
        made.append(store)
        return store

    yield factory
    for store in reversed(made):
        await store.close()


async def test_round_trip(tmp_path: Path, open_sqlite: Callable[..., SqliteStore]) -> None:
    """Saved records load back equal; upserts replace and deletes remove."""
    store = open_sqlite(tmp_path / "orders.db")
    await store.save([record("a"), record("b", stuck=True)])
    await store.save([record("a", "SUBMITTED", "PRICE_CALCULATED")])
    await store.delete(["unknown"])
    loaded = {r.order_id: r for r in await store.load()}
    assert loaded == {"a": record("a", "SUBMITTED", "PRICE_CALCULATED"), "b": record("b", stuck=True)}
    await store.delete(["a"])
    assert [r.order_id for r in await store.load()] == ["b"]
    assert await store.changes_since(None) == ([], None)
    await store.save([])
    await store.delete([])


async def test_restart_keeps_state(tmp_path: Path, open_sqlite: Callable[..., SqliteStore]) -> None:
    """A book restored from the file after a restart has the same orders and stuck flags."""
    path = tmp_path / "orders.db"
    book = OrderBook(REFERENCE_LIFECYCLE)
    book.apply(order_id="o-1", status="SUBMITTED", observed=None, now=T0, span=SpanRef(1, 1))
    book.apply(order_id="o-2", status="SUBMITTED", observed=None, now=T0 + 1, span=SpanRef(2, 2))
    book.apply(order_id="o-2", status="PRICE_CALCULATED", observed=None, now=T0 + 2, span=SpanRef(3, 3))
    book.overdue(T0 + 3600)
    first = open_sqlite(path)
    await first.save([book.to_record("o-1"), book.to_record("o-2")])
    await first.close()

    restored = OrderBook(REFERENCE_LIFECYCLE)
    assert restored.load(await open_sqlite(path).load()) == 2
    assert restored.get("o-1") == book.get("o-1")
    assert restored.get("o-2") == book.get("o-2")
    assert restored.overdue(T0 + 7200) == []


async def test_file_settings(tmp_path: Path, open_sqlite: Callable[..., SqliteStore]) -> None:
    """The file is in WAL mode and records its schema version."""
    path = tmp_path / "orders.db"
    await open_sqlite(path).save([record("a")])
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
        assert conn.execute("SELECT order_id, status, stuck FROM orders").fetchall() == [
            ("a", "SUBMITTED", 0)
        ]
    conn.close()


async def test_newer_schema_is_refused(tmp_path: Path, open_sqlite: Callable[..., SqliteStore]) -> None:
    """A database written by a newer schema version is not touched."""
    path = tmp_path / "orders.db"
    await open_sqlite(path).load()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    conn.close()
    with pytest.raises(RuntimeError, match="newer than this program"):
        await open_sqlite(path).load()


async def test_unreadable_rows_are_skipped(
    tmp_path: Path, open_sqlite: Callable[..., SqliteStore], caplog: pytest.LogCaptureFixture
) -> None:
    """A corrupt row is skipped with a warning; the rest loads."""
    path = tmp_path / "orders.db"
    store = open_sqlite(path)
    await store.save([record("good")])
    with sqlite3.connect(path) as conn:
        conn.execute("INSERT INTO orders VALUES ('bad', 'X', 0, 0, '{not json')")
    conn.close()
    assert [r.order_id for r in await store.load()] == ["good"]
    assert "skipped 1" in caplog.text


async def test_read_only_database_fails_writes(
    tmp_path: Path, open_sqlite: Callable[..., SqliteStore]
) -> None:
    """Opened read-only, the store loads but every write raises (even as root)."""
    path = tmp_path / "orders.db"
    writable = open_sqlite(path)
    await writable.save([record("a")])
    await writable.close()
    store = open_sqlite(path, read_only=True)
    assert [r.order_id for r in await store.load()] == ["a"]
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        await store.save([record("b")])
    assert [r.order_id for r in await store.load()] == ["a"]


async def test_path_inside_a_file_fails(tmp_path: Path, open_sqlite: Callable[..., SqliteStore]) -> None:
    """A database path under a regular file cannot be opened, whoever runs the test."""
    (tmp_path / "blocker").write_text("not a directory")
    store = open_sqlite(tmp_path / "blocker" / "orders.db")
    with pytest.raises(sqlite3.OperationalError, match="unable to open"):
        await store.save([record("a")])


async def test_writer_degrades_and_recovers_when_the_path_is_fixed(
    tmp_path: Path, open_sqlite: Callable[..., SqliteStore], caplog: pytest.LogCaptureFixture
) -> None:
    """The writer keeps changes while the file cannot be opened, and writes them once it can."""
    blocker = tmp_path / "state"
    blocker.write_text("not a directory")
    store = open_sqlite(blocker / "orders.db")
    writer = StoreWriter(store, interval=0.001, backoff_cap=0.005)
    writer.start()
    try:
        writer.enqueue(record("a"))
        assert not await writer.flush()  # the background task keeps retrying meanwhile
        assert (writer.healthy, writer.pending) == (False, 1)
        assert "unable to open database file" in caplog.text
        blocker.unlink()
        blocker.mkdir()
        async with asyncio.timeout(WAIT):
            await writer.drained()
    finally:
        await writer.stop()
    assert writer.errors_total >= 1
    assert [r.order_id for r in await open_sqlite(blocker / "orders.db").load()] == ["a"]
    assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 1


async def test_closed_store(tmp_path: Path) -> None:
    """A closed store refuses calls; closing twice is harmless."""
    store = SqliteStore(tmp_path / "orders.db")
    await store.load()
    await store.close()
    await store.close()
    with pytest.raises(RuntimeError, match="closed"):
        await store.load()


async def test_open_store_relative_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``sqlite:///name.db`` is relative to the working directory."""
    monkeypatch.chdir(tmp_path)
    store = open_store("sqlite:///state.db")
    try:
        await store.save([record("a")])
    finally:
        await store.close()
    assert (tmp_path / "state.db").is_file()
