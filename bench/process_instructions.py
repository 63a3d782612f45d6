"""User-space instructions per request of the whole proxy process (``python -m bench.process_instructions``).

``bench.handler`` counts the handler alone; this counts everything the ``serve`` process does for
a call: the listener's connection, the handler, the upstream client, span export. The proxy runs
under ``valgrind --tool=callgrind`` against a loopback aiohttp upstream and the discarding OTLP
sink; 8 client workers send the benchmark's status PUT, each with a fresh ``traceparent``. Two
runs, ``--small`` and ``--large`` requests, give (total_large - total_small) / (large - small):
start-up and shutdown cancel out. Instruction counts do not move with the machine's load, so
this is the figure for "which of two builds costs more per request" on a noisy machine.

Start-up compiles any source whose bytecode cache is missing, and that work is counted too: run
once to warm the caches (``--small`` alone is enough) before the pair that is reported.
Give ``--checkout`` to measure another worktree with this one's venv (the proxy is started with
that directory as its working directory, so its package is the one imported).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import sys
import tempfile
from pathlib import Path

import aiohttp
from aiohttp import web

from bench.wrk import STATUS_BODY

WORKERS = 8
READY_TIMEOUT_S = 300.0  # start-up under callgrind is ~50 times slower


def summary_total(callgrind_out: str) -> int:
    """The program's total instruction count from a callgrind output file's text."""
    for line in callgrind_out.splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise ValueError("no summary: or totals: line in the callgrind output")


def per_request(small: tuple[int, int], large: tuple[int, int]) -> float:
    """Instructions per request from two (requests, total) runs; start-up and shutdown cancel out."""
    (n_small, t_small), (n_large, t_large) = small, large
    if n_large <= n_small:
        raise ValueError("the large run must send more requests than the small one")
    return (t_large - t_small) / (n_large - n_small)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _upstream(port: int) -> web.AppRunner:
    async def answer(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=b'{"ok":true}', content_type="application/json")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


async def _send(session: aiohttp.ClientSession, url: str, requests: int) -> None:
    rnd = random.Random(1)

    async def worker(first: int) -> None:
        for i in range(first, requests, WORKERS):
            parent = f"00-{rnd.getrandbits(128) | 1:032x}-{rnd.getrandbits(64) | 1:016x}-01"
            headers = {"Content-Type": "application/json", "traceparent": parent}
            async with session.put(
                f"{url}/api/v1/orders/B-{i % 10_000}/status", data=STATUS_BODY, headers=headers
            ) as r:
                await r.read()
                if r.status != 200:
                    raise RuntimeError(f"the proxy answered {r.status}")

    await asyncio.gather(*(worker(k) for k in range(WORKERS)))


async def _wait_ready(session: aiohttp.ClientSession, admin: str, proxy: asyncio.subprocess.Process) -> None:
    async with asyncio.timeout(READY_TIMEOUT_S):
        while True:
            if proxy.returncode is not None:
                raise RuntimeError("the proxy exited before it was ready")
            try:
                async with session.get(f"{admin}/readyz") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.5)


async def run(checkout: Path, requests: int) -> int:
    """Total instructions of one ``serve`` process that answered ``requests`` calls."""
    up, listen, admin = _free_port(), _free_port(), _free_port()
    upstream = await _upstream(up)
    sink = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "mes_trace_proxy.sim.otlp_sink", "--discard", "--http-port", "0", "--grpc-port", "0"),
        stdout=asyncio.subprocess.PIPE,
        cwd=checkout,
    )
    out = Path(tempfile.mkdtemp(prefix="process-instructions-")) / "callgrind.out"
    proxy: asyncio.subprocess.Process | None = None
    try:
        assert sink.stdout is not None
        endpoint = json.loads(await sink.stdout.readline())["http_endpoint"]
        env = {
            "PATH": os.environ.get("PATH", ""),
            "PYTHONHASHSEED": "0",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        }
        command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable]
        command += ["-m", "mes_trace_proxy", "serve", "--upstream", f"http://127.0.0.1:{up}"]
        command += ["--listen", f"127.0.0.1:{listen}", "--admin-listen", f"127.0.0.1:{admin}"]
        command += ["--state", "memory", "--no-access-log"]
        proxy = await asyncio.create_subprocess_exec(
            *command,
            cwd=checkout,
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        async with aiohttp.ClientSession() as session:
            await _wait_ready(session, f"http://127.0.0.1:{admin}", proxy)
            await _send(session, f"http://127.0.0.1:{listen}", requests)
        proxy.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proxy.wait(), READY_TIMEOUT_S)
        return summary_total(out.read_text(encoding="utf-8"))
    finally:
        if proxy is not None and proxy.returncode is None:
            proxy.kill()
            await proxy.wait()
        if sink.returncode is None:
            sink.terminate()
            await sink.wait()
        await upstream.cleanup()


def main(argv: list[str] | None = None) -> int:
    """Print one JSON line: both runs' totals and the instructions per request."""
    parser = argparse.ArgumentParser(prog="python -m bench.process_instructions", description=__doc__)
    parser.add_argument("--checkout", type=Path, default=Path.cwd(), help="the worktree whose package runs")
    parser.add_argument("--small", type=int, default=200, help="requests in the first run")
    parser.add_argument("--large", type=int, default=1200, help="requests in the second run")
    args = parser.parse_args(argv)
    small = asyncio.run(run(args.checkout, args.small))
    large = asyncio.run(run(args.checkout, args.large))
    figure = per_request((args.small, small), (args.large, large))
    print(
        json.dumps(
            {"checkout": str(args.checkout), "small": small, "large": large, "per_request": round(figure)}
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
