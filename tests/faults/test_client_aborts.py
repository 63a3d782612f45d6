"""Scenario 3: callers that hang up mid-upload or mid-download cost nothing that outlives them.

Each abort must cancel the upstream call (the faulty upstream sees its body or its reader cut
short), be recorded as the caller's abort (never blamed on MES), and leave no descriptor or
task behind once the connection pool has settled.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections import Counter
from typing import Final

import aiohttp

from tests.faults.faulty_upstream import FaultyUpstream
from tests.faults.harness import (
    LOOPBACK_ARGS,
    access_lines,
    assert_all_echoed,
    body_for,
    drive,
    echo_request,
    open_fds,
    poll,
    scrape,
)
from tests.proxy_process import ProxyProcess, proxy_process

# Enough aborts that a leak of one descriptor or task each is unmistakable above the noise
# of a few pooled connections, few enough to run in a couple of seconds.
ABORTS: Final = 40
FIRST_ROUND: Final = 5
CONCURRENCY: Final = 10
# Pooled keep-alive connections come and go by a couple while the pool settles.
SLACK: Final = 3
DECLARED: Final = 8 * 1024 * 1024  # an upload that is never finished
PIECE: Final = 256 * 1024


def _hang_up(writer: asyncio.StreamWriter, n: int) -> None:
    """Half the callers leave with a FIN, half with an RST (a killed client or a dropped route)."""
    if n % 2:
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
    else:
        writer.close()


async def _abort_upload(proxy: ProxyProcess, upstream: FaultyUpstream, n: int) -> None:
    host, port = proxy.listeners["ingress"].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    request_id = f"up-{n}"
    writer.write(
        f"POST /sink/{request_id} HTTP/1.1\r\nHost: mes\r\nX-Request-Id: {request_id}\r\n"
        f"Content-Type: application/octet-stream\r\nContent-Length: {DECLARED}\r\n\r\n".encode()
        + b"u" * PIECE
    )
    await writer.drain()
    # Hang up only once MES is receiving the body: the abort is truly mid-upload.
    await upstream.wait_for(lambda: upstream.ids[request_id] == 1)
    _hang_up(writer, n)
    del reader


async def _abort_download(proxy: ProxyProcess, n: int) -> None:
    host, port = proxy.listeners["ingress"].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    request_id = f"down-{n}"
    writer.write(
        f"GET /stream/{request_id}?size={64 * 1024 * 1024} HTTP/1.1\r\nHost: mes\r\n"
        f"X-Request-Id: {request_id}\r\n\r\n".encode()
    )
    await writer.drain()
    got = 0
    while got < PIECE:
        chunk = await reader.read(65536)
        assert chunk, "the download ended before the caller hung up"
        got += len(chunk)
    _hang_up(writer, n)


async def test_aborted_uploads_and_downloads_cancel_upstream_and_leak_nothing(
    faulty_upstream: FaultyUpstream, client: aiohttp.ClientSession
) -> None:
    """Uploads and downloads abandoned mid-way: each upstream call is cut, each is logged and counted
    as client_aborted (never as an upstream error), and 80 more aborts leave descriptors and tasks
    where a first round of 10 left them."""
    args = [*LOOPBACK_ARGS, "--upstream", faulty_upstream.url]
    async with proxy_process(args, {"OTEL_TRACES_EXPORTER": "none"}) as proxy:
        warm = await drive(
            20, CONCURRENCY, lambda n: echo_request(client, proxy.url(), f"warm-{n}", body_for(n))
        )
        assert_all_echoed(warm, faulty_upstream.ids)

        async def tasks() -> float:
            return (await scrape(client, proxy.admin_url)).value("mes_proxy_event_loop_tasks")

        async def fds() -> float:
            return open_fds(proxy.pid)

        gate = asyncio.Semaphore(CONCURRENCY)

        async def one(n: int, upload: bool) -> None:
            async with gate:
                await (_abort_upload(proxy, faulty_upstream, n) if upload else _abort_download(proxy, n))

        async def round_of(first: int, each: int) -> None:
            async with asyncio.timeout(30):
                await asyncio.gather(
                    *(one(n, up) for n in range(first, first + each) for up in (True, False))
                )
            # Every upstream call was cut short from the proxy's side: it was cancelled.
            await faulty_upstream.wait_for(
                lambda: (
                    faulty_upstream.aborted["sink"] == first + each
                    and faulty_upstream.aborted["stream"] == first + each
                )
            )

        # A first round leaves the pool in its steady state (warm-up connections reused and
        # closed by aborted calls); leaks are measured against that, not against a warm pool.
        await round_of(0, FIRST_ROUND)
        fds_before = await fds()
        tasks_before = await tasks()
        await round_of(FIRST_ROUND, ABORTS)
        fds_after = await poll(fds, lambda v: v <= fds_before + SLACK)
        tasks_after = await poll(tasks, lambda v: v <= tasks_before + SLACK)
        print(
            f"[faults] {2 * ABORTS} more aborts: fds {fds_before:.0f} -> {fds_after:.0f}, "
            f"tasks {tasks_before:.0f} -> {tasks_after:.0f}"
        )
        assert fds_after <= fds_before + SLACK
        assert tasks_after <= tasks_before + SLACK
        metrics = await scrape(client, proxy.admin_url)
        after = await drive(
            10, CONCURRENCY, lambda n: echo_request(client, proxy.url(), f"after-{n}", body_for(n))
        )
        assert_all_echoed(after, faulty_upstream.ids)
    total = 2 * (FIRST_ROUND + ABORTS)
    aborted = [line for line in access_lines(proxy) if line["error_type"]]
    kinds = Counter(str(line["error_type"]) for line in aborted)
    assert kinds == Counter({"client_aborted": total}), kinds
    assert metrics.total("mes_proxy_errors_total", error_type="client_aborted") == total
    assert not [k for k in metrics.samples if k[0] == "mes_proxy_errors_total" and "upstream" in str(k[1])]
