"""Scenario 6: the order-state store fails (SQLite unwritable, Redis killed) and comes back.

Requests keep flowing byte-exact while it is down; the failure shows in the log and in
``mes_state_store_errors_total``/``mes_state_store_pending``; once the store is back, every
change made during the outage is written without a restart.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Final

import aiohttp
import pytest

from mes_trace_proxy.state.sqlite_store import SqliteStore
from mes_trace_proxy.state.store import open_store
from tests.conftest import RedisServer
from tests.faults.faulty_upstream import FaultyUpstream
from tests.faults.harness import Outcome, drive, poll, scrape
from tests.proxy_process import ProxyProcess, proxy_process

ORDERS: Final = 60
CONCURRENCY: Final = 10
ARGS: Final = ("--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0")


async def set_status(
    client: aiohttp.ClientSession, proxy: ProxyProcess, order_id: str, status: str
) -> Outcome:
    """PUT the order's status through the proxy (the rule that reads the status from the body)."""
    body = json.dumps({"status": status}).encode()
    async with client.put(
        f"{proxy.url()}/api/v1/orders/{order_id}/status",
        data=body,
        headers={"Content-Type": "application/json", "X-Request-Id": f"{order_id}:{status}"},
    ) as resp:
        return Outcome(f"{order_id}:{status}", resp.status, await resp.read(), None, 0.0)


async def _store_figures(client: aiohttp.ClientSession, proxy: ProxyProcess) -> tuple[float, float]:
    metrics = await scrape(client, proxy.admin_url)
    return metrics.value("mes_state_store_errors_total"), metrics.value("mes_state_store_pending")


async def _drained(client: aiohttp.ClientSession, proxy: ProxyProcess) -> float:
    """Wait until the writer has nothing pending (it flushes every 0.5 s); return the seconds waited."""
    started = time.monotonic()
    _errors, pending = await poll(lambda: _store_figures(client, proxy), lambda f: f[1] == 0)
    assert pending == 0
    return time.monotonic() - started


def _messages(proxy: ProxyProcess) -> list[str]:
    return [str(line.get("message", "")) for line in proxy.json_lines()]


async def _orders_through(
    client: aiohttp.ClientSession, proxy: ProxyProcess, upstream: FaultyUpstream, prefix: str
) -> None:
    outcomes = await drive(
        ORDERS, CONCURRENCY, lambda n: set_status(client, proxy, f"{prefix}-{n}", "SUBMITTED")
    )
    body = b'{"status": "SUBMITTED"}'
    assert [(o.status, o.body) for o in outcomes] == [(200, body)] * ORDERS
    assert all(upstream.ids[o.request_id] == 1 for o in outcomes)


async def test_sqlite_unwritable_then_writable(
    faulty_upstream: FaultyUpstream, client: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """SQLite file under a path whose parent is a regular file (unwritable even for root): calls
    succeed, errors and pending writes show in /metrics and the log; once the directory exists,
    every pending order reaches the file, with no restart."""
    blocker = tmp_path / "state"
    blocker.write_text("a regular file where the state directory should be\n")
    database = blocker / "orders.db"
    args = [*ARGS, "--upstream", faulty_upstream.url, "--state", f"sqlite:///{database}"]
    async with proxy_process(args, {"OTEL_TRACES_EXPORTER": "none"}) as proxy:
        await _orders_through(client, proxy, faulty_upstream, "SQ")
        # The writer fails (the load and at least one write), keeps every change, and says so.
        errors, pending = await poll(
            lambda: _store_figures(client, proxy), lambda f: f[0] >= 2 and f[1] == ORDERS
        )
        assert (errors >= 2, pending) == (True, ORDERS)
        messages = _messages(proxy)
        assert any(m.startswith("state store load failed") for m in messages)
        assert any(m.startswith("state store write failed") for m in messages)
        blocker.unlink()
        blocker.mkdir()
        caught_up = await _drained(client, proxy)
        print(
            f"[faults] SQLite unwritable: {ORDERS}/{ORDERS} calls answered, {errors:.0f} store errors "
            f"counted, {pending:.0f} changes pending; written {caught_up:.1f} s after the directory appeared"
        )
        assert any(m.startswith("state store recovered") for m in _messages(proxy))
        assert proxy.process.returncode is None
    stored = await _load(database)
    assert stored == {f"SQ-{n}": "SUBMITTED" for n in range(ORDERS)}


async def _load(database: Path) -> dict[str, str]:
    store = SqliteStore(database, read_only=True)
    try:
        return {record.order_id: record.status for record in await store.load()}
    finally:
        await store.close()


@pytest.mark.needs_redis
async def test_redis_killed_and_restarted(
    faulty_upstream: FaultyUpstream, client: aiohttp.ClientSession, redis_server: RedisServer
) -> None:
    """Redis killed by PID mid-run: calls succeed, the failure shows in /metrics and the log; a new
    redis-server on the same socket receives every change made during the outage."""
    args = [*ARGS, "--upstream", faulty_upstream.url, "--state", redis_server.url]
    async with proxy_process(args, {"OTEL_TRACES_EXPORTER": "none"}) as proxy:
        await _orders_through(client, proxy, faulty_upstream, "BEFORE")
        await _drained(client, proxy)
        errors_before, _ = await _store_figures(client, proxy)
        redis_server.kill()
        await _orders_through(client, proxy, faulty_upstream, "DURING")
        errors, pending = await poll(
            lambda: _store_figures(client, proxy), lambda f: f[0] > errors_before and f[1] == ORDERS
        )
        assert (errors > errors_before, pending) == (True, ORDERS)
        assert any(m.startswith("state store write failed") for m in _messages(proxy))
        redis_server.start()  # same socket, empty (the test server keeps nothing on disk)
        caught_up = await _drained(client, proxy)
        print(
            f"[faults] Redis killed: {ORDERS}/{ORDERS} calls answered, {errors - errors_before:.0f} store "
            f"errors counted, {pending:.0f} changes pending; written {caught_up:.1f} s after restart"
        )
        assert any(m.startswith("state store recovered") for m in _messages(proxy))
        assert proxy.process.returncode is None
    store = open_store(redis_server.url)
    try:
        stored = {record.order_id: record.status for record in await store.load()}
    finally:
        await store.close()
    assert stored == {f"DURING-{n}": "SUBMITTED" for n in range(ORDERS)}
