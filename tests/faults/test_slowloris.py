"""Scenario 4: hundreds of idle and trickling connections do not starve normal traffic.

Header-read timeouts and connection caps are the listener limits' job (issue 4); whatever
they do to the loris connections, ordinary callers must keep getting byte-exact answers,
and the loris connections must leave no descriptor behind once they are gone.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Final

import aiohttp

from tests.faults.faulty_upstream import FaultyUpstream
from tests.faults.harness import (
    LOOPBACK_ARGS,
    assert_all_echoed,
    body_for,
    drive,
    echo_request,
    open_fds,
    poll,
    report,
)
from tests.proxy_process import ProxyProcess, proxy_process

# Hundreds, as the issue asks; a third each idle, trickling headers and trickling a body.
LORIS: Final = 300
REQUESTS: Final = 200
CONCURRENCY: Final = 10
# A byte every 200 ms per trickling connection: 1,000 bytes a second in all, each
# connection forever "almost" sending a request.
TRICKLE_GAP: Final = 0.2
SLACK: Final = 3


async def _loris(proxy: ProxyProcess, n: int, stop: asyncio.Event) -> bool:
    """One slow connection until ``stop``; returns whether the proxy was still holding it."""
    host, port = proxy.listeners["ingress"].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    kind = n % 3
    try:
        if kind == 1:
            writer.write(b"GET /echo/loris-head HTTP/1.1\r\nHost: mes\r\n")
        elif kind == 2:
            writer.write(b"POST /echo/loris-body HTTP/1.1\r\nHost: mes\r\nContent-Length: 100000\r\n\r\n")
        while not stop.is_set():
            if kind:
                writer.write(b"X-Slow: 1\r\n" if kind == 1 else b"b")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), TRICKLE_GAP)
        return not reader.at_eof()
    except ConnectionError:
        return False
    finally:
        writer.close()


async def test_slow_loris_connections_do_not_starve_normal_traffic(
    faulty_upstream: FaultyUpstream, client: aiohttp.ClientSession
) -> None:
    """With 300 idle or trickling connections open, 200 ordinary calls all succeed byte-exact, and
    closing the slow connections returns the proxy's descriptors to where they were."""
    async with proxy_process(
        [*LOOPBACK_ARGS, "--upstream", faulty_upstream.url], {"OTEL_TRACES_EXPORTER": "none"}
    ) as proxy:
        baseline = await drive(
            REQUESTS, CONCURRENCY, lambda n: echo_request(client, proxy.url(), f"base-{n}", body_for(n))
        )
        assert_all_echoed(baseline, faulty_upstream.ids)

        async def fds() -> float:
            return open_fds(proxy.pid)

        fds_before = await fds()
        stop = asyncio.Event()
        slow = [asyncio.ensure_future(_loris(proxy, n, stop)) for n in range(LORIS)]
        try:
            # Every slow connection is accepted before the measured traffic starts.
            await poll(fds, lambda v: v >= fds_before + LORIS)
            loaded = await drive(
                REQUESTS, CONCURRENCY, lambda n: echo_request(client, proxy.url(), f"loris-{n}", body_for(n))
            )
        finally:
            stop.set()
            held = await asyncio.gather(*slow, return_exceptions=True)
        assert_all_echoed(loaded, faulty_upstream.ids)
        fds_after = await poll(fds, lambda v: v <= fds_before + SLACK)
        still_open = sum(1 for h in held if h is True)
        print(f"[faults] slow-loris: {still_open} of {LORIS} slow connections still held at the end")
        assert fds_after <= fds_before + SLACK
        # A half-sent head never reaches MES; a trickled body streams to it and is cut when
        # its caller leaves, like any aborted upload.
        assert not [a for a in faulty_upstream.arrivals if a.target == b"/echo/loris-head"]
        await faulty_upstream.wait_for(lambda: faulty_upstream.aborted["echo"] == LORIS // 3)
    report(f"{LORIS} slow-loris connections", baseline, loaded)
