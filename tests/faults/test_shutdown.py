"""Scenario 5: SIGTERM under load drains in-flight calls, refuses new ones and flushes every span.

A request either reached MES and got its whole answer, or never reached MES and failed at
the connection (safe to retry): no third outcome, however the signal falls.
"""

from __future__ import annotations

import asyncio
import signal
from typing import Final

import aiohttp
import pytest

from mes_trace_proxy.sim.otlp_sink import OtlpSink
from tests.conftest import otlp_env
from tests.faults.faulty_upstream import FaultyUpstream
from tests.faults.harness import LOOPBACK_ARGS, Outcome, body_for, echo_request
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
