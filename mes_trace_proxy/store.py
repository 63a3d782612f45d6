"""Order-state persistence: the StateStore protocol, MemoryStore, and the write-behind StoreWriter.

The hot path only calls ``StoreWriter.enqueue`` (sync, O(1)); a background task writes batches
and degrades (keeps, bounds, counts, logs once, retries) while the store is failing.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections import OrderedDict
from collections.abc import Sequence
from typing import Final, Protocol
from urllib.parse import urlsplit

from mes_trace_proxy.orders import OrderRecord

# Re-exported: the JSON form of a record lives in store_codec, which the backends import
# (importing it from here made store <-> store_sqlite / store_redis a cycle).
from mes_trace_proxy.store_codec import RECORD_FORMAT, decode_all, decode_record, encode_record

__all__ = [
    "RECORD_FORMAT",
    "MemoryStore",
    "StateStore",
    "StoreWriter",
    "decode_all",
    "decode_record",
    "encode_record",
    "open_store",
]

_log = logging.getLogger(__name__)


class StateStore(Protocol):
    """Where order records live between restarts, and between replicas for shared stores."""

    async def load(self) -> list[OrderRecord]:
        """Every stored record (start-up restore)."""
        ...

    async def save(self, records: Sequence[OrderRecord]) -> None:
        """Insert or replace these records, all or none."""
        ...

    async def delete(self, order_ids: Sequence[str]) -> None:
        """Forget these orders; unknown ids are ignored."""
        ...

    async def changes_since(self, cursor: str | None) -> tuple[list[OrderRecord], str | None]:
        """Records other writers saved after ``cursor``, and the cursor to pass next time.

        ``None`` means "since ``load()`` began" (or since the beginning, without a load).
        Stores not shared between processes return no records and the cursor unchanged.
        """
        ...

    async def close(self) -> None:
        """Release connections and threads; the store is unusable afterwards."""
        ...


# ── memory ───────────────────────────────────────────────────────────────────────────────────


class MemoryStore:
    """A store that keeps records in this process only (tests, ``--state memory``)."""

    def __init__(self) -> None:
        self.records: dict[str, OrderRecord] = {}

    async def load(self) -> list[OrderRecord]:
        """Every record saved so far."""
        return list(self.records.values())

    async def save(self, records: Sequence[OrderRecord]) -> None:
        """Keep these records, replacing older ones of the same orders."""
        self.records.update((r.order_id, r) for r in records)

    async def delete(self, order_ids: Sequence[str]) -> None:
        """Forget these orders."""
        for order_id in order_ids:
            self.records.pop(order_id, None)

    async def changes_since(self, cursor: str | None) -> tuple[list[OrderRecord], str | None]:
        """Nothing: no other process writes here."""
        return [], cursor

    async def close(self) -> None:
        """Nothing to release."""


# ── write-behind ─────────────────────────────────────────────────────────────────────────────

_DELETE: Final = None  # a pending value meaning "delete this order"
_ABSENT: Final = object()


class StoreWriter:
    """Writes order records behind the hot path, in batches, and survives a failing store.

    ``enqueue`` coalesces by order id (only the newest state of an order is written) and
    never blocks. While the store fails, changes stay pending up to ``max_pending``; past it
    the oldest are dropped and counted. The failure is logged once per outage, writes are
    retried with doubling backoff up to ``backoff_cap``, and recovery is logged.

    Attributes (for metrics): ``errors_total``, ``dropped_total``, ``written_total``,
    ``deleted_total``, ``pending``, ``healthy``.

    Args:
        store: Where to write.
        interval: Seconds between flushes. 0.5 s: a crash loses at most half a second of
            changes, while at 1,000 changes/s one round trip still carries ~500 records.
        max_batch: Records per store call; a full batch flushes at once. 500: one SQLite
            transaction or Redis script of 500 records takes milliseconds.
        max_pending: Changes kept while the store fails. 100,000: about 100 s of outage
            at 1,000 changes/s; a pending record shares the book's bytes, so ~20 MiB at most.
        backoff_cap: Longest wait between retries. 5 s: a dead store is probed often enough
            to catch up soon after it returns, rarely enough not to flood the log or network.
        logger: Where the outage and recovery lines go.
    """

    def __init__(
        self,
        store: StateStore,
        *,
        interval: float = 0.5,
        max_batch: int = 500,
        max_pending: int = 100_000,
        backoff_cap: float = 5.0,
        logger: logging.Logger | None = None,
    ) -> None:
        if interval <= 0 or backoff_cap <= 0 or max_batch < 1 or max_pending < 1:
            raise ValueError("StoreWriter: interval, backoff_cap, max_batch and max_pending must be positive")
        self._store = store
        self._interval = interval
        self._max_batch = max_batch
        self._max_pending = max_pending
        self._backoff_cap = backoff_cap
        self._log = logger or _log
        self._pending: OrderedDict[str, OrderRecord | None] = OrderedDict()
        self._wake = asyncio.Event()
        self._empty = asyncio.Event()
        self._empty.set()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._failing = False
        self._dropping = False
        self._outage_errors = 0
        self._outage_dropped = 0
        self.errors_total = 0
        self.dropped_total = 0
        self.written_total = 0
        self.deleted_total = 0

    @property
    def pending(self) -> int:
        """Changes not yet written."""
        return len(self._pending)

    @property
    def healthy(self) -> bool:
        """False from a failed write until the next successful one."""
        return not self._failing

    def enqueue(self, record: OrderRecord) -> None:
        """Schedule ``record`` for writing; replaces any pending state of the same order."""
        self._put(record.order_id, record)

    def enqueue_delete(self, order_id: str) -> None:
        """Schedule the order's deletion (after purge or eviction)."""
        self._put(order_id, _DELETE)

    def _put(self, order_id: str, value: OrderRecord | None) -> None:
        pending = self._pending
        pending[order_id] = value
        pending.move_to_end(order_id)
        self._empty.clear()
        if len(pending) > self._max_pending:
            pending.popitem(last=False)
            self.dropped_total += 1
            self._outage_dropped += 1
            if not self._dropping:
                self._dropping = True
                self._log.error(
                    "state store: more than %d changes pending; dropping the oldest until it recovers",
                    self._max_pending,
                )
        if len(pending) >= self._max_batch and not self._failing:
            self._wake.set()

    def start(self) -> None:
        """Start the background flush task (needs a running event loop).

        Raises:
            RuntimeError: when already started, or outside a running loop.
        """
        if self._task is not None:
            raise RuntimeError("StoreWriter already started")
        self._task = asyncio.get_running_loop().create_task(self._run(), name="mes-trace-proxy.store-writer")

    async def stop(self, grace: float = 5.0) -> None:
        """Flush what is pending (one attempt) and stop the task.

        Args:
            grace: Seconds allowed for the final flush; changes still pending after it are
                counted as dropped and logged. 5 s: well inside the server's 20 s drain grace
                period, which must still leave time to flush spans.
        """
        self._stopping = True
        self._wake.set()
        task, self._task = self._task, None
        if task is not None:
            try:
                async with asyncio.timeout(grace):
                    await asyncio.shield(task)
            except TimeoutError:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        else:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    await self.flush()
        if self._pending:
            lost = len(self._pending)
            self.dropped_total += lost
            self._pending.clear()
            self._empty.set()
            self._log.error("state store: %d changes could not be written before shutdown", lost)

    async def drained(self) -> None:
        """Wait until nothing is pending (wrap it in a timeout)."""
        await self._empty.wait()

    async def flush(self) -> bool:
        """Write everything pending now, in batches.

        Returns:
            True when all was written; False when the store failed (changes stay pending).
        """
        while self._pending:
            batch = list(itertools.islice(self._pending.items(), self._max_batch))
            saves = [value for _, value in batch if value is not None]
            deletes = [order_id for order_id, value in batch if value is None]
            try:
                if saves:
                    await self._store.save(saves)
                if deletes:
                    await self._store.delete(deletes)
            except Exception as exc:  # any store failure degrades; it must never reach callers
                self._failed(exc)
                return False
            for order_id, value in batch:
                # Re-enqueued while we wrote: keep the newer state for the next flush.
                if self._pending.get(order_id, _ABSENT) is value:
                    del self._pending[order_id]
            self.written_total += len(saves)
            self.deleted_total += len(deletes)
            self._recovered()
        self._empty.set()
        return True

    def _failed(self, exc: Exception) -> None:
        self.errors_total += 1
        self._outage_errors += 1
        if not self._failing:
            self._failing = True
            # The exception's type and text only: driver messages name files and hosts, not orders.
            self._log.error(
                "state store write failed; keeping %d changes pending and retrying with backoff: %s: %s",
                len(self._pending),
                type(exc).__name__,
                str(exc)[:200],
            )

    def _recovered(self) -> None:
        if self._failing:
            self._log.warning(
                "state store recovered after %d failed writes; %d changes dropped during the outage",
                self._outage_errors,
                self._outage_dropped,
            )
        self._failing = self._dropping = False
        self._outage_errors = self._outage_dropped = 0

    async def _run(self) -> None:
        delay = self._interval
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            self._wake.clear()
            if self._stopping:
                break
            delay = (
                self._interval
                if await self.flush()
                else min(max(delay, self._interval) * 2, self._backoff_cap)
            )
        await self.flush()


# ── URLs ─────────────────────────────────────────────────────────────────────────────────────

_URL_FORMS: Final = "memory, sqlite:///relative.db, sqlite:////absolute.db or redis://HOST:PORT/DB"


def open_store(url: str) -> StateStore:
    """Build the store a ``--state`` URL names; nothing is opened until first use.

    ``memory``; ``sqlite:///relative/path.db`` or ``sqlite:////absolute/path.db``;
    ``redis://[:password@]host[:port][/db]``, ``rediss://…`` (TLS) or
    ``unix:///path/to/redis.sock[?db=N]``.

    Raises:
        ValueError: naming what is wrong with the URL (the password never appears).
    """
    if url == "memory":
        return MemoryStore()
    scheme, sep, rest = url.partition("://")
    shown = _without_password(url)
    if not sep:
        raise ValueError(f"state URL {shown!r}: expected {_URL_FORMS}")
    if scheme == "sqlite":
        if not rest.startswith("/"):
            raise ValueError(
                f"state URL {shown!r}: sqlite URLs have three slashes before the path ({_URL_FORMS})"
            )
        path = rest[1:]
        if not path or path.endswith("/") or "?" in path:
            raise ValueError(f"state URL {shown!r}: the sqlite URL must end in a database file name")
        # Imported here: unused backends (and their drivers) stay unloaded.
        from mes_trace_proxy.store_sqlite import SqliteStore

        return SqliteStore(path)
    if scheme in {"redis", "rediss", "unix"}:
        _check_redis_url(url, shown)
        from mes_trace_proxy.store_redis import RedisStore

        return RedisStore(url)
    raise ValueError(f"state URL {shown!r}: unknown scheme {scheme!r}; expected {_URL_FORMS}")


def _check_redis_url(url: str, shown: str) -> None:
    parts = urlsplit(url)
    try:
        parts.port  # noqa: B018  (urlsplit checks the port only when asked)
    except ValueError as exc:
        raise ValueError(f"state URL {shown!r}: bad port ({exc})") from exc
    if parts.scheme == "unix":
        if not parts.path:
            raise ValueError(f"state URL {shown!r}: a unix URL needs the socket path")
        return
    if not parts.hostname:
        raise ValueError(f"state URL {shown!r}: the redis URL needs a host")
    db = parts.path.strip("/")
    if db and not db.isdigit():
        raise ValueError(f"state URL {shown!r}: the redis database must be a number, got {db!r}")


def _without_password(url: str) -> str:
    parts = urlsplit(url) if "://" in url else None
    if parts is None or parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()
