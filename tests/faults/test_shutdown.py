"""Scenario 5: SIGTERM under load drains in-flight calls, refuses new ones and flushes every span.

A request either reached MES and got its whole answer, or never reached MES and failed at
the connection (safe to retry): no third outcome, however the signal falls.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Final

import aiohttp
import pytest

from mes_trace_proxy.sim.otlp_sink import OtlpSink
from tests.conftest import otlp_env
from tests.faults.faulty_upstream import FaultyUpstream
from tests.faults.harness import LOOPBACK_ARGS, Outcome, body_for, echo_request, poll, scrape
from tests.proxy_process import ProxyProcess, proxy_process

HELD: Final = 20  # calls in flight at the signal, held by MES until after it
WORKERS: Final = 10
# The load stops long before this; the cap only keeps a runaway loop finite.
MAX_LOAD: Final = 5000
# Connection-level failures a caller can see when the listener closes under it; none of
# them can happen after MES received the request.
REFUSED: Final = frozenset({"ClientConnectorError", "ServerDisconnectedError", "ClientOSError"})


async def _refusing(proxy: ProxyProcess) -> None:
    """Return once a new connection to the ingress listener is refused."""
    host, port = proxy.listeners["ingress"].split(":")
    async with asyncio.timeout(10):
        while True:
            try:
                _reader, writer = await asyncio.open_connection(host, int(port))
            except ConnectionRefusedError:
                return
            writer.close()
            await asyncio.sleep(0.02)


async def _held(client: aiohttp.ClientSession, url: str, n: int) -> Outcome:
    async with client.post(f"{url}/hold/h-{n}", data=b"order", headers={"X-Request-Id": f"h-{n}"}) as resp:
        return Outcome(f"h-{n}", resp.status, await resp.read(), None, 0.0)


async def test_sigterm_under_load_drains_refuses_and_flushes(
    faulty_upstream: FaultyUpstream, otlp_sink: OtlpSink, client: aiohttp.ClientSession
) -> None:
    """SIGTERM with 20 calls held in MES and 10 callers hammering: every held call completes, new
    connections are refused, every load call either got its echo or never reached MES, the exit is
    clean, and the shutdown flush exports exactly two spans per answered call."""
    env = otlp_env(otlp_sink) | {"OTEL_BSP_SCHEDULE_DELAY": "60000"}  # only the shutdown flush exports
    args = [*LOOPBACK_ARGS, "--upstream", faulty_upstream.url, "--grace-period", "10s"]
    load: list[Outcome] = []
    async with proxy_process(args, env) as proxy:
        held = [asyncio.ensure_future(_held(client, proxy.url(), n)) for n in range(HELD)]
        await faulty_upstream.wait_for(
            lambda: sum(faulty_upstream.ids[f"h-{n}"] for n in range(HELD)) == HELD
        )
        stop = asyncio.Event()
        flowing = asyncio.Event()
        counter = iter(range(MAX_LOAD))

        async def worker(fresh: aiohttp.ClientSession) -> None:
            for n in counter:
                if stop.is_set():
                    return
                load.append(await echo_request(fresh, proxy.url(), f"load-{n}", body_for(n)))
                if len(load) >= 50:  # the load is flowing: time for the signal
                    flowing.set()

        # A new connection per call, so the signal meets calls at every stage of a connection.
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True), timeout=aiohttp.ClientTimeout(total=20)
        ) as fresh:
            workers = [asyncio.ensure_future(worker(fresh)) for _ in range(WORKERS)]
            await asyncio.wait_for(flowing.wait(), 20)
            answered_before = len(load)
            proxy.process.send_signal(signal.SIGTERM)
            await _refusing(proxy)
            faulty_upstream.release.set()
            outcomes = await asyncio.wait_for(asyncio.gather(*held), 15)
            stop.set()
            await asyncio.wait_for(asyncio.gather(*workers), 20)
        assert await asyncio.wait_for(proxy.process.wait(), 20) == 0
    assert [(o.status, o.body) for o in outcomes] == [(200, b"released")] * HELD
    answered = [o for o in load if o.status == 200]
    failed = [o for o in load if o.status != 200]
    for outcome in answered:
        assert outcome.body == body_for(int(outcome.request_id.split("-")[1]))
        assert faulty_upstream.ids[outcome.request_id] == 1
    for outcome in failed:
        assert outcome.error in REFUSED, outcome
        assert faulty_upstream.ids[outcome.request_id] == 0, (
            f"{outcome.request_id} reached MES, lost its answer"
        )
    print(
        f"[faults] SIGTERM under load: {HELD} held calls completed; {len(answered)} load calls answered "
        f"({len(answered) - answered_before} completed after the signal), {len(failed)} refused before MES"
    )
    await otlp_sink.wait_for_spans(2 * (HELD + len(answered)), timeout=10)
    assert len(otlp_sink.spans) == 2 * (HELD + len(answered))
    assert "mes-trace-proxy stopped" in [line.get("message") for line in proxy.json_lines()]


async def test_grace_period_bounds_the_drain(
    faulty_upstream: FaultyUpstream, client: aiohttp.ClientSession
) -> None:
    """A call MES never answers cannot hold the exit beyond the grace period: it is cut, and the
    upstream call with it."""
    args = [*LOOPBACK_ARGS, "--upstream", faulty_upstream.url, "--grace-period", "1s"]
    async with proxy_process(args, {"OTEL_TRACES_EXPORTER": "none"}) as proxy:
        stuck = asyncio.ensure_future(_held(client, proxy.url(), 0))
        await faulty_upstream.wait_for(lambda: faulty_upstream.ids["h-0"] == 1)
        proxy.process.send_signal(signal.SIGTERM)
        # One second of grace plus start-to-exit overhead; 10 s means the bound did not hold.
        assert await asyncio.wait_for(proxy.process.wait(), 10) == 0
    # Cut, not completed: the caller must never take a truncated call for an answer.
    with pytest.raises(aiohttp.ClientError):
        await asyncio.wait_for(stuck, 10)
    await faulty_upstream.wait_for(lambda: faulty_upstream.aborted["hold"] == 1)
    # Recorded as the shutdown's doing, not as a caller that hung up.
    errors = [line.get("error_type") for line in proxy.json_lines() if line.get("route") is not None]
    assert errors == ["shutdown_cancelled"]


STUCK_EVENT: Final = "order.stuck"
# One second in SUBMITTED makes an order stuck; the watchdog looks five times a second.
WATCHDOG_ARGS: Final = ("--dwell-limit", "SUBMITTED=1s", "--check-interval", "200ms")


def _stuck_reports(proxy: ProxyProcess) -> list[str]:
    return [str(line["order_id"]) for line in proxy.json_lines() if line.get("event") == STUCK_EVENT]


async def _put(client: aiohttp.ClientSession, proxy: ProxyProcess, order_id: str, status: str) -> int:
    async with client.put(f"{proxy.url()}/api/v1/orders/{order_id}/status", json={"status": status}) as resp:
        await resp.read()
        return resp.status


async def _admin(client: aiohttp.ClientSession, proxy: ProxyProcess, path: str) -> dict[str, object]:
    async with client.get(f"{proxy.admin_url}{path}") as resp:
        assert resp.status == 200
        body = await resp.json()
        assert isinstance(body, dict)
        return body


async def test_sigkill_and_restart_keeps_sqlite_state_exactly(
    faulty_upstream: FaultyUpstream, client: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """SIGKILL after the writer flushed, restart on the same SQLite file: every order is back once in
    its last status, stuck flags survive, and no stuck order is reported a second time."""
    state = f"sqlite:///{tmp_path}/orders.db"
    args = ["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--upstream", faulty_upstream.url]
    args += ["--state", state, *WATCHDOG_ARGS]
    stuck = [f"K-STUCK-{n}" for n in range(20)]
    moving = [f"K-MOVING-{n}" for n in range(20)]
    env = {"OTEL_TRACES_EXPORTER": "none"}
    async with proxy_process(args, env) as first:
        for order_id in stuck:
            assert await _put(client, first, order_id, "SUBMITTED") == 200
        for order_id in moving:  # statuses with hour-long limits: never stuck in this test
            for status in ("MANUFACTURING_APPROVED", "MANUFACTURING_STARTED"):
                assert await _put(client, first, order_id, status) == 200
        reports = await poll(_lines_of(first), lambda r: sorted(r) == sorted(stuck))
        assert sorted(reports) == sorted(stuck)
        await poll(_pending_of(client, first), lambda pending: pending == 0)
        first.process.kill()  # SIGKILL, by PID: no drain, no flush
        assert await asyncio.wait_for(first.process.wait(), 10) == -signal.SIGKILL
    async with proxy_process(args, env) as second:
        listing = await _admin(client, second, "/orders?limit=500")
        orders = listing["orders"]
        assert isinstance(orders, list)
        seen = [str(o["order_id"]) for o in orders]
        assert sorted(seen) == sorted(stuck + moving)  # none forgotten, none twice
        assert {str(o["order_id"]): o["status"] for o in orders} == {
            **dict.fromkeys(stuck, "SUBMITTED"),
            **dict.fromkeys(moving, "MANUFACTURING_STARTED"),
        }
        assert (await _admin(client, second, "/orders/-/stuck"))["total"] == len(stuck)
        # A new order going stuck proves the watchdog has run rounds since the restore...
        assert await _put(client, second, "K-AFTER", "SUBMITTED") == 200
        reports = await poll(_lines_of(second), lambda r: "K-AFTER" in r)
        # ...and in none of them did it report an order it had reported before the kill.
        assert reports == ["K-AFTER"]
    print(
        f"[faults] SIGKILL and restart: {len(seen)}/{len(stuck) + len(moving)} orders restored once each, "
        f"{len(stuck)} stuck flags kept, 0 stuck orders reported twice"
    )


def _lines_of(proxy: ProxyProcess) -> Callable[[], Awaitable[list[str]]]:
    async def read() -> list[str]:
        return _stuck_reports(proxy)

    return read


def _pending_of(client: aiohttp.ClientSession, proxy: ProxyProcess) -> Callable[[], Awaitable[float]]:
    async def read() -> float:
        return (await scrape(client, proxy.admin_url)).value("mes_state_store_pending")

    return read
