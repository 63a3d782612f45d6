"""Held dead letters: the stores that keep them (records and their JSON form: ``record.py``).

The stores sit beside the order records of ``--state``: ``memory``, a ``held_messages`` table in
the same SQLite file, or ``{prefix}held*`` keys in the same Redis (shared by replicas, so any
replica can show and re-drive any dead letter). A held message is claimed before a re-drive
(``claim``) so two calls, on one replica or on two, never publish it twice.
"""

from __future__ import annotations

import asyncio
import functools
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Final, Protocol, TypeVar

from mes_trace_proxy.messages.record import HeldMessage, HeldSummary, decode_held, encode_held

__all__ = [
    "CLAIM_TTL_S",
    "HeldStore",
    "MemoryHeldStore",
    "RedisHeldStore",
    "SqliteHeldStore",
    "open_held_store",
]

#: A claim older than this is taken to belong to a replica that died mid re-drive; 60 s is far
#: longer than a publisher confirm takes on a live broker.
CLAIM_TTL_S: Final = 60.0

_T = TypeVar("_T")


# ── stores ───────────────────────────────────────────────────────────────────────────────────


class HeldStore(Protocol):
    """Where held dead letters live until they are re-driven."""

    async def put(self, held: HeldMessage) -> None:
        """Insert or replace (by key) one held message; returns once it is durable."""
        ...

    async def get(self, key: str) -> HeldMessage | None:
        """One held message by key."""
        ...

    async def for_order(self, order_id: str) -> list[HeldMessage]:
        """The held messages of one order, oldest first."""
        ...

    async def all(self, limit: int) -> list[HeldMessage]:
        """Up to ``limit`` held messages, oldest first."""
        ...

    async def count(self) -> int:
        """How many messages are held."""
        ...

    async def summaries(self, limit: int) -> list[HeldSummary]:
        """Up to ``limit`` summaries, oldest first, decoding one message at a time (start-up index)."""
        ...

    async def claim(self, key: str, now: float) -> bool:
        """Take a held message for a re-drive; ``False`` when it is gone or already claimed."""
        ...

    async def release(self, key: str) -> None:
        """Give a claim back after a failed re-drive, so the message can be re-driven again."""
        ...

    async def remove(self, key: str) -> None:
        """Forget a held message (after its re-drive was confirmed); unknown keys are ignored."""
        ...

    async def close(self) -> None:
        """Release connections and threads."""
        ...


def _sorted(items: Sequence[HeldMessage]) -> list[HeldMessage]:
    return sorted(items, key=lambda h: (h.received_at, h.key))


class MemoryHeldStore:
    """Held messages in this process only (``--state memory``: lost on restart, as the orders are)."""

    def __init__(self) -> None:
        self.held: dict[str, HeldMessage] = {}
        self._claims: dict[str, float] = {}

    async def put(self, held: HeldMessage) -> None:
        """Keep one message."""
        self.held[held.key] = held

    async def get(self, key: str) -> HeldMessage | None:
        """One message by key."""
        return self.held.get(key)

    async def for_order(self, order_id: str) -> list[HeldMessage]:
        """The messages of one order."""
        return _sorted([h for h in self.held.values() if h.order_id == order_id])

    async def all(self, limit: int) -> list[HeldMessage]:
        """Up to ``limit`` messages."""
        return _sorted(list(self.held.values()))[:limit]

    async def count(self) -> int:
        """How many are held."""
        return len(self.held)

    async def summaries(self, limit: int) -> list[HeldSummary]:
        """Summaries of up to ``limit`` messages."""
        return [h.summary() for h in _sorted(list(self.held.values()))[:limit]]

    async def claim(self, key: str, now: float) -> bool:
        """Claim unless gone or claimed less than CLAIM_TTL_S ago."""
        if key not in self.held:
            return False
        since = self._claims.get(key)
        if since is not None and now - since < CLAIM_TTL_S:
            return False
        self._claims[key] = now
        return True

    async def release(self, key: str) -> None:
        """Drop the claim."""
        self._claims.pop(key, None)

    async def remove(self, key: str) -> None:
        """Forget the message and its claim."""
        self.held.pop(key, None)
        self._claims.pop(key, None)

    async def close(self) -> None:
        """Nothing to release."""


_SQLITE_SCHEMA: Final = (
    """CREATE TABLE IF NOT EXISTS held_messages (
        key TEXT PRIMARY KEY,
        order_id TEXT,
        received_at REAL NOT NULL,
        claimed_at REAL,
        record TEXT NOT NULL
    ) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS held_messages_order ON held_messages (order_id)",
)
_SQLITE_UPSERT: Final = """
    INSERT INTO held_messages (key, order_id, received_at, claimed_at, record) VALUES (?, ?, ?, NULL, ?)
    ON CONFLICT (key) DO UPDATE SET order_id = excluded.order_id, record = excluded.record
"""


class SqliteHeldStore:
    """Held messages in a ``held_messages`` table of the ``--state`` SQLite file (one replica).

    Like :class:`mes_trace_proxy.store_sqlite.SqliteStore`: WAL, one worker thread owning the
    connection, reopened after an error; each ``put`` is its own committed transaction, since
    the watcher acks the message only after it.
    """

    def __init__(self, path: str | Path) -> None:
        self._path = Path(path)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mes-held-sqlite")
        self._conn: sqlite3.Connection | None = None
        self._closed = False
        self._pending: list[tuple[tuple[str, str | None, float, str], asyncio.Future[None]]] = []
        self._flusher: asyncio.Future[None] | None = None

    async def _call(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        if self._closed:
            raise RuntimeError("SqliteHeldStore is closed")
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._guarded, fn)

    def _guarded(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        conn = self._conn
        if conn is None:
            conn = sqlite3.connect(self._path, timeout=5.0, isolation_level=None)
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                for statement in _SQLITE_SCHEMA:
                    conn.execute(statement)
            except BaseException:
                conn.close()
                raise
            self._conn = conn
        try:
            return fn(conn)
        except sqlite3.Error:
            self._conn = None
            conn.close()
            raise

    @staticmethod
    def _rows(conn: sqlite3.Connection, sql: str, args: tuple[Any, ...]) -> list[HeldMessage]:
        return [decode_held(row[0]) for row in conn.execute(sql, args)]

    async def put(self, held: HeldMessage) -> None:
        """Upsert one message; returns once the transaction that holds it has committed.

        Puts that arrive while a commit is running wait for the next one, which takes them
        all (group commit): one commit per batch, not per message, under load.
        """
        row = (held.key, held.order_id, held.received_at, encode_held(held))
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((row, done))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.ensure_future(self._flush())
        await done

    async def _flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            rows = [row for row, _ in batch]
            try:
                await self._call(functools.partial(_upsert_all, rows=rows))
            except Exception as exc:  # every put of the batch fails alike; the callers decide
                for _, done in batch:
                    if not done.done():
                        done.set_exception(exc)
            else:
                for _, done in batch:
                    if not done.done():
                        done.set_result(None)

    async def get(self, key: str) -> HeldMessage | None:
        """One message by key."""
        found = await self._call(
            lambda c: self._rows(c, "SELECT record FROM held_messages WHERE key = ?", (key,))
        )
        return found[0] if found else None

    async def for_order(self, order_id: str) -> list[HeldMessage]:
        """The messages of one order, by the order index."""
        sql = "SELECT record FROM held_messages WHERE order_id = ? ORDER BY received_at, key"
        return await self._call(lambda c: self._rows(c, sql, (order_id,)))

    async def all(self, limit: int) -> list[HeldMessage]:
        """Up to ``limit`` messages, oldest first."""
        sql = "SELECT record FROM held_messages ORDER BY received_at, key LIMIT ?"
        return await self._call(lambda c: self._rows(c, sql, (limit,)))

    async def count(self) -> int:
        """How many are held."""
        return await self._call(lambda c: int(c.execute("SELECT count(*) FROM held_messages").fetchone()[0]))

    async def summaries(self, limit: int) -> list[HeldSummary]:
        """Summaries of up to ``limit`` messages, decoded row by row on the worker thread."""
        sql = "SELECT record FROM held_messages ORDER BY received_at, key LIMIT ?"
        return await self._call(lambda c: [decode_held(row[0]).summary() for row in c.execute(sql, (limit,))])

    async def claim(self, key: str, now: float) -> bool:
        """One UPDATE that succeeds only for an unclaimed (or stale-claimed) message."""
        sql = (
            "UPDATE held_messages SET claimed_at = ? WHERE key = ? AND (claimed_at IS NULL OR claimed_at < ?)"
        )
        return await self._call(lambda c: c.execute(sql, (now, key, now - CLAIM_TTL_S)).rowcount == 1)

    async def release(self, key: str) -> None:
        """Clear the claim."""
        await self._call(
            lambda c: c.execute("UPDATE held_messages SET claimed_at = NULL WHERE key = ?", (key,))
        )

    async def remove(self, key: str) -> None:
        """Delete the row."""
        await self._call(lambda c: c.execute("DELETE FROM held_messages WHERE key = ?", (key,)))

    async def close(self) -> None:
        """Close the connection and the worker thread."""
        if self._closed:
            return

        def disconnect(conn: sqlite3.Connection) -> None:
            conn.close()
            self._conn = None

        try:
            if self._conn is not None:
                await self._call(disconnect)
        finally:
            self._closed = True
            self._executor.shutdown(wait=True)


def _upsert_all(conn: sqlite3.Connection, rows: Sequence[tuple[str, str | None, float, str]]) -> None:
    """All rows in one transaction, or none."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.executemany(_SQLITE_UPSERT, rows)
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


class RedisHeldStore:
    """Held messages in Redis, shared by replicas.

    Keys: ``{prefix}held`` (hash key → JSON), ``{prefix}held-order:{order id}`` (set of keys of
    one order), ``{prefix}held-claim:{key}`` (``SET NX`` with a CLAIM_TTL_S expiry, so a
    replica that dies mid re-drive does not hold the claim for ever).
    """

    def __init__(self, url: str, *, prefix: str = "mes:") -> None:
        import redis.asyncio as aioredis  # imported here: only Redis deployments load it

        self._redis = aioredis.Redis.from_url(url, socket_timeout=5.0, socket_connect_timeout=2.0)
        self._hash = f"{prefix}held"
        self._order = f"{prefix}held-order:"
        self._claim = f"{prefix}held-claim:"

    async def put(self, held: HeldMessage) -> None:
        """Write the message and its order index in one MULTI/EXEC."""
        async with self._redis.pipeline(transaction=True) as pipe:
            _ = pipe.hset(self._hash, held.key, encode_held(held))
            if held.order_id is not None:
                _ = pipe.sadd(self._order + held.order_id, held.key)
            await pipe.execute()

    async def get(self, key: str) -> HeldMessage | None:
        """One message by key."""
        raw = await self._redis.hget(self._hash, key)
        return None if raw is None else decode_held(raw)

    async def _many(self, keys: Sequence[bytes | str]) -> list[HeldMessage]:
        if not keys:
            return []
        rows = await self._redis.hmget(self._hash, list(keys))
        return _sorted([decode_held(row) for row in rows if row is not None])

    async def for_order(self, order_id: str) -> list[HeldMessage]:
        """The messages of one order, through its index set."""
        return await self._many(list(await self._redis.smembers(self._order + order_id)))

    async def all(self, limit: int) -> list[HeldMessage]:
        """Up to ``limit`` messages (read in HSCAN pages), oldest first."""
        found: list[HeldMessage] = []
        async for _, raw in self._redis.hscan_iter(self._hash, count=1000):
            found.append(decode_held(raw))
        return _sorted(found)[:limit]

    async def count(self) -> int:
        """HLEN of the hash."""
        return int(await self._redis.hlen(self._hash))

    async def summaries(self, limit: int) -> list[HeldSummary]:
        """Summaries of up to ``limit`` messages (HSCAN pages, each message decoded and dropped)."""
        found: list[HeldSummary] = []
        async for _, raw in self._redis.hscan_iter(self._hash, count=1000):
            found.append(decode_held(raw).summary())
        found.sort(key=lambda h: (h.received_at, h.key))
        return found[:limit]

    async def claim(self, key: str, now: float) -> bool:
        """SET NX on the claim key, only while the message exists."""
        if not await self._redis.hexists(self._hash, key):
            return False
        return bool(await self._redis.set(self._claim + key, repr(now), nx=True, ex=int(CLAIM_TTL_S)))

    async def release(self, key: str) -> None:
        """Delete the claim key."""
        await self._redis.delete(self._claim + key)

    async def remove(self, key: str) -> None:
        """Delete the message, its index entry and its claim."""
        raw = await self._redis.hget(self._hash, key)
        async with self._redis.pipeline(transaction=True) as pipe:
            _ = pipe.hdel(self._hash, key)
            if raw is not None:
                held = decode_held(raw)
                if held.order_id is not None:
                    _ = pipe.srem(self._order + held.order_id, key)
            _ = pipe.delete(self._claim + key)
            await pipe.execute()

    async def close(self) -> None:
        """Close the connection pool."""
        await self._redis.aclose()


def open_held_store(state_url: str) -> HeldStore:
    """The held-message store beside the order store a ``--state`` URL names.

    Raises:
        ValueError: for a URL ``store.open_store`` would refuse too.
    """
    if state_url == "memory":
        return MemoryHeldStore()
    scheme, _, rest = state_url.partition("://")
    if scheme == "sqlite" and rest.startswith("/") and len(rest) > 1:
        return SqliteHeldStore(rest[1:])
    if scheme in {"redis", "rediss", "unix"}:
        return RedisHeldStore(state_url)
    raise ValueError("state URL: expected memory, sqlite:///PATH or redis://HOST:PORT/DB")
