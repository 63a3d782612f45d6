"""Redis state store: order records shared by proxy replicas, with a change feed so they converge."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final, cast

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from mes_trace_proxy.orders import OrderRecord
from mes_trace_proxy.store_codec import decode_all, encode_record

__all__ = ["RedisStore"]

# Atomic per batch: each record gets the next sequence number as its score in the change
# feed *in the same step* as its write, so a reader never sees a score and then, later, a
# lower one appear (which a separate INCR then ZADD from two replicas would allow).
_SAVE_SCRIPT: Final = """
for i = 1, #ARGV, 2 do
  local seq = redis.call('INCR', KEYS[1])
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
  redis.call('ZADD', KEYS[3], seq, ARGV[i])
end
return #ARGV / 2
"""
_DELETE_SCRIPT: Final = """
for i = 1, #ARGV do
  redis.call('HDEL', KEYS[1], ARGV[i])
  redis.call('ZREM', KEYS[2], ARGV[i])
end
return #ARGV
"""
# Hash fields per HSCAN round trip on load: large enough for few round trips, small enough
# that one reply stays around a megabyte.
_SCAN_COUNT: Final = 1000
# Records per changes_since call: the caller loops while records come back.
_FEED_PAGE: Final = 1000
# 5 s: a flush must fail (and the writer degrade) rather than hang on a stalled server.
_SOCKET_TIMEOUT_S: Final = 5.0
# 2 s: connecting on a LAN or a local socket takes milliseconds; longer means it is down.
_CONNECT_TIMEOUT_S: Final = 2.0


class RedisStore:
    """Order records in Redis, shared between replicas.

    Keys (``prefix`` defaults to ``mes:``): ``{prefix}orders`` is a hash of order id → JSON
    record; ``{prefix}changes`` is a sorted set of order id scored by ``{prefix}seq`` (INCR) at
    its last write, so ``changes_since(cursor)`` returns what was written after ``cursor``.
    Each id appears once in the feed, so it is as large as the hash, not as the write history.

    Args:
        url: ``redis://``, ``rediss://`` or ``unix://`` URL, as redis-py reads it.
        prefix: Key prefix, to share one Redis database between deployments.
    """

    def __init__(self, url: str, *, prefix: str = "mes:") -> None:
        self._redis = aioredis.Redis.from_url(
            url,
            socket_timeout=_SOCKET_TIMEOUT_S,
            socket_connect_timeout=_CONNECT_TIMEOUT_S,
            # One immediate retry replaces a pooled connection that died with a restarted
            # server; longer outages are the StoreWriter's to back off from, not the driver's.
            retry=Retry(NoBackoff(), 1),
        )
        self._orders = f"{prefix}orders"
        self._changes = f"{prefix}changes"
        self._seq = f"{prefix}seq"
        self._save_script = self._redis.register_script(_SAVE_SCRIPT)
        self._delete_script = self._redis.register_script(_DELETE_SCRIPT)
        self._load_cursor = 0

    async def load(self) -> list[OrderRecord]:
        """Every stored record; also fixes where ``changes_since(None)`` starts.

        Raises:
            redis.exceptions.RedisError: when Redis cannot be reached or answers an error.
        """
        # Read the sequence first: what is written during the scan comes again from the feed.
        self._load_cursor = int(await self._redis.get(self._seq) or 0)
        rows: dict[bytes | str, bytes | str] = {}
        cursor = 0
        while True:
            cursor, page = await self._redis.hscan(self._orders, cursor, count=_SCAN_COUNT)
            if isinstance(page, dict):
                rows.update(page)  # HSCAN may repeat a field; the dict keeps one
            if cursor == 0:
                break
        return decode_all(list(rows.values()), "redis")

    async def save(self, records: Sequence[OrderRecord]) -> None:
        """Write the records and append them to the change feed, atomically.

        Raises:
            redis.exceptions.RedisError: when Redis cannot be reached or answers an error.
        """
        if not records:
            return
        args: list[str] = []
        for record in records:
            args += (record.order_id, encode_record(record))
        await self._save_script(keys=[self._seq, self._orders, self._changes], args=args)

    async def delete(self, order_ids: Sequence[str]) -> None:
        """Remove the orders from the hash and the feed, atomically.

        Raises:
            redis.exceptions.RedisError: when Redis cannot be reached or answers an error.
        """
        if not order_ids:
            return
        await self._delete_script(keys=[self._orders, self._changes], args=list(order_ids))

    async def changes_since(self, cursor: str | None) -> tuple[list[OrderRecord], str | None]:
        """Records written after ``cursor`` (by any replica, this one included), oldest first.

        Args:
            cursor: A cursor from an earlier call; None starts where ``load()`` did.

        Returns:
            Up to 1,000 records and the cursor for the next call.

        Raises:
            ValueError: for a cursor this store did not hand out.
            redis.exceptions.RedisError: when Redis cannot be reached or answers an error.
        """
        start = self._load_cursor if cursor is None else _parse_cursor(cursor)
        feed = await self._redis.zrangebyscore(
            self._changes, f"({start}", "+inf", start=0, num=_FEED_PAGE, withscores=True
        )
        if not feed:
            return [], str(start)
        # withscores=True answers (member, score) pairs; the stub's union type cannot say so.
        pairs = cast("list[tuple[bytes, float]]", feed)
        values = await self._redis.hmget(self._orders, [member for member, _ in pairs])
        records = decode_all([v for v in values if v is not None], "redis feed")
        return records, str(int(pairs[-1][1]))

    async def close(self) -> None:
        """Close the connection pool."""
        await self._redis.aclose()


def _parse_cursor(cursor: str) -> int:
    if not cursor.isdigit():
        raise ValueError(f"not a redis change-feed cursor: {cursor!r}")
    return int(cursor)
