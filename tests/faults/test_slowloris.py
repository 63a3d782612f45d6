"""Scenario 4: hundreds of idle and trickling connections do not starve normal traffic.

The listener limits (header-read and idle timeouts) shed stalled heads and idle sockets;
ordinary callers keep getting byte-exact answers meanwhile, and the slow connections leave no
descriptor behind once they are gone.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from pathlib import Path
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
    write_config,
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
# The listener limits (docs/configuration.md) shortened so the test sees them act: a head
# must be complete 3 s after its first byte, an idle connection is closed after 4 s.
LIMITS_YAML: Final = (
    "listeners:\n  - name: ingress\n    limits: {header_read_timeout: 3s, idle_timeout: 4s}\n"
)
IDLE, HEAD, BODY = 0, 1, 2
START: Final = {
    IDLE: b"",
    HEAD: b"GET /echo/loris-head HTTP/1.1\r\nHost: mes\r\n",
    BODY: b"POST /echo/loris-body HTTP/1.1\r\nHost: mes\r\nContent-Length: 100000\r\n\r\n",
}
DRIP: Final = {IDLE: b"", HEAD: b"X-Slow: 1\r\n", BODY: b"b"}


@dataclass(frozen=True, slots=True)
class Loris:
    """How one slow connection ended: cut by the proxy (with what answer) or by us."""

    kind: int
    cut_by_proxy: bool
    answer: bytes


async def _loris(proxy: ProxyProcess, kind: int, stop: asyncio.Event, cut: asyncio.Event) -> Loris:
    """One slow connection until ``stop`` or until the proxy closes it (then ``cut`` is set)."""
    host, port = proxy.listeners["ingress"].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    answer = asyncio.ensure_future(reader.read())  # completes when the proxy closes
    try:
        writer.write(START[kind])
        while not stop.is_set() and not answer.done():
            writer.write(DRIP[kind])
            with contextlib.suppress(TimeoutError):  # no answer yet: time for the next byte
                await asyncio.wait_for(asyncio.shield(answer), TRICKLE_GAP)
    except ConnectionError:
        pass
    finally:
        writer.close()
    if answer.done() and not answer.cancelled() and answer.exception() is None:
        cut.set()
        return Loris(kind, True, answer.result()[:12])
    answer.cancel()
    return Loris(kind, False, b"")


async def test_slow_loris_connections_do_not_starve_normal_traffic(
    faulty_upstream: FaultyUpstream, client: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """With 300 idle or trickling connections open, 200 ordinary calls all succeed byte-exact; the
    header-read and idle timeouts cut the stalled heads and idle sockets; closing the rest returns
    the proxy's descriptors to where they were."""
    args = [
        *LOOPBACK_ARGS,
        "--config",
        write_config(tmp_path, LIMITS_YAML),
        "--upstream",
        faulty_upstream.url,
    ]
    async with proxy_process(args, {"OTEL_TRACES_EXPORTER": "none"}) as proxy:
        baseline = await drive(
            REQUESTS, CONCURRENCY, lambda n: echo_request(client, proxy.url(), f"base-{n}", body_for(n))
        )
        assert_all_echoed(baseline, faulty_upstream.ids)

        async def fds() -> float:
            return open_fds(proxy.pid)

        fds_before = await fds()
        stop = asyncio.Event()
        cuts = {kind: [asyncio.Event() for _ in range(LORIS // 3)] for kind in (IDLE, HEAD, BODY)}
        slow = [
            asyncio.ensure_future(_loris(proxy, kind, stop, cut))
            for kind, events in cuts.items()
            for cut in events
        ]
        try:
            # Every slow connection is accepted before the measured traffic starts.
            # The limits (3 s, 4 s) outlast opening them all even on a loaded machine, so none is
            # cut before this count is reached.
            await poll(fds, lambda v: v >= fds_before + LORIS, timeout=20)
            loaded = await drive(
                REQUESTS, CONCURRENCY, lambda n: echo_request(client, proxy.url(), f"loris-{n}", body_for(n))
            )
            # The limits act within their timeouts (3 s and 4 s), whatever the traffic did meanwhile.
            async with asyncio.timeout(20):
                for event in cuts[HEAD] + cuts[IDLE]:
                    await event.wait()
        finally:
            stop.set()
            ended = await asyncio.gather(*slow)
        assert_all_echoed(loaded, faulty_upstream.ids)
        fds_after = await poll(fds, lambda v: v <= fds_before + SLACK)
        by_kind = {kind: [e for e in ended if e.kind == kind] for kind in (IDLE, HEAD, BODY)}
        print(
            "[faults] slow-loris: cut by the proxy: "
            + ", ".join(
                f"{name} {sum(e.cut_by_proxy for e in by_kind[k])}/{len(by_kind[k])}"
                for name, k in (("idle", IDLE), ("trickling head", HEAD), ("trickling body", BODY))
            )
            + f"; answers to stalled heads: {sorted({e.answer for e in by_kind[HEAD]})}"
        )
        assert fds_after <= fds_before + SLACK
        assert {e.answer for e in by_kind[HEAD]} == {b"HTTP/1.1 408"}
        # A half-sent head never reaches MES; a trickled body streams to it (a slow upload is
        # legitimate) and is cut when its caller leaves, like any aborted upload.
        assert not [a for a in faulty_upstream.arrivals if a.target == b"/echo/loris-head"]
        await faulty_upstream.wait_for(lambda: faulty_upstream.aborted["echo"] == LORIS // 3)
    report(f"{LORIS} slow-loris connections", baseline, loaded)
