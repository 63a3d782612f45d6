"""SQLite state store: one WAL-mode database file, driven from one worker thread off the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Final, TypeVar
from urllib.request import pathname2url

from mes_trace_proxy.orders import OrderRecord
from mes_trace_proxy.store_codec import decode_all, encode_record

__all__ = ["SCHEMA_VERSION", "SqliteStore"]

SCHEMA_VERSION: Final = 1
"""Layout of the tables below; a database written by a newer version is refused."""

_T = TypeVar("_T")

_SCHEMA: Final = (
    "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)",
    # One row per order; `record` is the JSON of store.encode_record, the other columns are
    # there for ad-hoc queries (`sqlite3 db "select status, count(*) from orders group by 1"`).
    """CREATE TABLE IF NOT EXISTS orders (
        order_id TEXT PRIMARY KEY,
        status TEXT NOT NULL,
        since REAL NOT NULL,
        stuck INTEGER NOT NULL,
        record TEXT NOT NULL
    ) WITHOUT ROWID""",
)
_UPSERT: Final = """
    INSERT INTO orders (order_id, status, since, stuck, record) VALUES (?, ?, ?, ?, ?)
    ON CONFLICT (order_id) DO UPDATE SET
        status = excluded.status, since = excluded.since, stuck = excluded.stuck, record = excluded.record
"""
# 5 s: another process holding the write lock (a second worker, a backup) finishes a batch in
# milliseconds; past 5 s something is wrong and the writer should degrade instead of hang.
_BUSY_TIMEOUT_S: Final = 5.0


class SqliteStore:
    """Order records in a SQLite file (WAL, ``synchronous=NORMAL``), one transaction per batch.

    Every database call runs on one dedicated worker thread, which alone owns the connection.
    The connection is opened on first use and again after a database error, so a store whose
    file could not be opened (missing directory, read-only disk) recovers once the cause is
    fixed. WAL with ``synchronous=NORMAL`` may lose the last transactions on power loss but
    never corrupts the file: the right trade for state that the next calls rebuild anyway.

    Args:
        path: Database file; its directory must exist.
        read_only: Open with ``mode=ro`` (inspection; every write then fails).
    """

    def __init__(self, path: str | Path, *, read_only: bool = False) -> None:
        self._path = Path(path)
        self._read_only = read_only
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mes-store-sqlite")
        self._conn: sqlite3.Connection | None = None  # touched only on the worker thread
        self._closed = False

    @property
    def path(self) -> Path:
        """The database file."""
        return self._path

    async def _call(self, fn: Callable[[], _T]) -> _T:
        if self._closed:
            raise RuntimeError("SqliteStore is closed")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    async def load(self) -> list[OrderRecord]:
        """Every stored record.

        Raises:
            sqlite3.Error: when the database cannot be opened or read.
            RuntimeError: when the database was written by a newer schema version.
        """
        rows = await self._call(self._load)
        return decode_all(rows, f"sqlite {self._path.name}")

    async def save(self, records: Sequence[OrderRecord]) -> None:
        """Upsert the records in one transaction.

        Raises:
            sqlite3.Error: on any database failure (nothing of the batch is kept).
        """
        if records:
            await self._call(lambda: self._save(records))

    async def delete(self, order_ids: Sequence[str]) -> None:
        """Delete the orders in one transaction.

        Raises:
            sqlite3.Error: on any database failure.
        """
        if order_ids:
            await self._call(lambda: self._delete(order_ids))

    async def changes_since(self, cursor: str | None) -> tuple[list[OrderRecord], str | None]:
        """Nothing: a SQLite file is not shared between replicas."""
        return [], cursor

    async def close(self) -> None:
        """Close the connection and stop the worker thread; later calls raise RuntimeError."""
        if self._closed:
            return
        try:
            await self._call(self._disconnect)
        finally:
            self._closed = True
            self._executor.shutdown(wait=True)

    # ── worker thread only ──────────────────────────────────────────────────────────────────

    def _connection(self) -> sqlite3.Connection:
        if self._conn is not None:
            return self._conn
        if self._read_only:
            uri = f"file:{pathname2url(str(self._path.resolve()))}?mode=ro"
            conn = sqlite3.connect(uri, uri=True, timeout=_BUSY_TIMEOUT_S, isolation_level=None)
        else:
            conn = sqlite3.connect(self._path, timeout=_BUSY_TIMEOUT_S, isolation_level=None)
        try:
            self._prepare(conn)
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        return conn

    def _prepare(self, conn: sqlite3.Connection) -> None:
        if not self._read_only:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            with _transaction(conn):
                for statement in _SCHEMA:
                    conn.execute(statement)
                if conn.execute("SELECT version FROM schema_version").fetchone() is None:
                    conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
        row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
        if row is not None and row[0] is not None and row[0] > SCHEMA_VERSION:
            raise RuntimeError(
                f"{self._path}: database schema version {row[0]} is newer than this program's "
                f"{SCHEMA_VERSION}; upgrade mes-trace-proxy or point --state elsewhere"
            )

    def _guarded(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        conn = self._connection()
        try:
            return fn(conn)
        except sqlite3.Error:
            # Reopen next time: the file may have been replaced, or the disk remounted.
            self._disconnect()
            raise

    def _load(self) -> list[str]:
        return self._guarded(lambda conn: [row[0] for row in conn.execute("SELECT record FROM orders")])

    def _save(self, records: Sequence[OrderRecord]) -> None:
        rows = [(r.order_id, r.status, r.since, int(r.stuck_reported), encode_record(r)) for r in records]

        def write(conn: sqlite3.Connection) -> None:
            with _transaction(conn):
                conn.executemany(_UPSERT, rows)

        self._guarded(write)

    def _delete(self, order_ids: Sequence[str]) -> None:
        def write(conn: sqlite3.Connection) -> None:
            with _transaction(conn):
                conn.executemany("DELETE FROM orders WHERE order_id = ?", [(i,) for i in order_ids])

        self._guarded(write)

    def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE … COMMIT, or ROLLBACK on any exception (autocommit connections)."""
    # IMMEDIATE takes the write lock up front, so a busy database fails here, not mid-batch.
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
