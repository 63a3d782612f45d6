"""The request handler alone, in one process: ``python -m bench.handler``.

``bench.run`` measures the whole proxy beside nginx, and its figures move with the machine's
load by ±10 %. This measures only what the proxy adds to each call, in-process and without
sockets: :func:`mes_trace_proxy.proxy.handle` for the benchmark's status change (a PUT with a
``traceparent``, the order book, metrics, the access log and both spans), against an upstream
that answers from memory and a caller connection that throws the answer away. It is the tool
for one optimisation step at a time: a change of a few microseconds shows here in seconds.

The figure is wall time per request on one core, so run it on an idle machine and compare runs
made one after the other (``--rounds`` takes the median of several).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import statistics
import sys
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import replace
from types import TracebackType
from typing import Final

from aiohttp.base_protocol import BaseProtocol
from aiohttp.http import HttpRequestParser, HttpResponseParser, RawRequestMessage
from aiohttp.streams import StreamReader
from multidict import CIMultiDictProxy

from bench.wrk import STATUS_BODY
from mes_trace_proxy.cli import read_default_rules
from mes_trace_proxy.core.config import load_config
from mes_trace_proxy.proxy.handler import handle
from mes_trace_proxy.proxy.handler_state import ListenerState, PoolForwarder
from mes_trace_proxy.server import running
from mes_trace_proxy.wire.server import IncomingRequest

__all__ = ["main"]

#: What the benchmark's upstream answers to a status change (bench/nginx.py).
ANSWER: Final = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Fri, 04 Dec 2026 15:00:00 GMT\r\n"
    b"Content-Type: application/json\r\nContent-Length: 50\r\nConnection: keep-alive\r\n\r\n"
    b'{"orderId":"A-1","status":"MANUFACTURING_STARTED"}'
)
ORDER_IDS: Final = 10_000
#: requests between two turns of the event loop (other tasks: span export, access-log flush)
YIELD_EVERY: Final = 16


class _Sink:
    """A caller connection that accepts every write and never pauses."""

    def __init__(self) -> None:
        self.transport = None
        self.remote = "127.0.0.1"
        self.scheme = "http"
        self.closing = False
        self.writing_paused = False
        self.written = 0
        self.server = _Server()

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def writelines(self, data: Iterable[bytes]) -> None:
        for piece in data:
            self.written += len(piece)

    async def drain(self) -> None:
        return None

    def abort(self) -> None:
        self.closing = True


class _Server:
    def __init__(self) -> None:
        from mes_trace_proxy.wire.server import _DateField

        self.date = _DateField()


class _Answer:
    """The upstream's answer, parsed by aiohttp's C parser from :data:`ANSWER`."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        protocol = BaseProtocol(loop)
        parser = HttpResponseParser(protocol, loop, 2**16, auto_decompress=False)
        messages, _, _ = parser.feed_data(ANSWER)
        message, payload = messages[0]
        self.status = message.code
        self.reason = message.reason
        self.headers: CIMultiDictProxy[str] = message.headers
        self.content_length = 50
        self.content: StreamReader = payload

    async def __aenter__(self) -> _Answer:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None


class _Upstream:
    """Stands in for ``UpstreamPool`` (behind ``PoolForwarder``): every request gets :data:`ANSWER`."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def request(self, method: str, target: str, headers: object, body: object = None) -> _Answer:
        return _Answer(self.loop)


def _requests(count: int, loop: asyncio.AbstractEventLoop) -> list[tuple[RawRequestMessage, StreamReader]]:
    """``count`` parsed status changes, each with its own order id and trace context."""
    protocol = BaseProtocol(loop)
    parser = HttpRequestParser(protocol, loop, 2**16, auto_decompress=False)
    body = STATUS_BODY.encode()
    out = []
    rng = random.Random(7)
    for n in range(count):
        traceparent = f"00-{rng.getrandbits(128) | 1:032x}-{rng.getrandbits(64) | 1:016x}-01"
        raw = (
            f"PUT /api/v1/orders/B-{n % ORDER_IDS}/status HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
            f"Content-Type: application/json\r\ntraceparent: {traceparent}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        messages, _, _ = parser.feed_data(raw)
        out.extend(messages)
    return out


async def _one_round(state: ListenerState, count: int) -> float:
    loop = asyncio.get_running_loop()
    conn = _Sink()
    requests = _requests(count, loop)
    started = time.perf_counter()
    for n, (message, payload) in enumerate(requests):
        await handle(state, IncomingRequest(conn, message, payload))
        if n % YIELD_EVERY == 0:
            # The handler never waits here (the upstream answers at once): let the export task
            # and the access-log flush run, as they would between requests under load.
            await asyncio.sleep(0)
    await asyncio.sleep(0)
    return (time.perf_counter() - started) / count


def _state(proxy: object) -> ListenerState:
    server = proxy.servers["ingress"]  # type: ignore[attr-defined]
    state = server.handler.args[0]
    assert isinstance(state, ListenerState)
    return state


@contextlib.asynccontextmanager
async def _proxy(exporter: str, sink: str | None, access_log: bool = True) -> AsyncIterator[ListenerState]:
    config = load_config(
        flags={
            "listen": "127.0.0.1:0",
            "admin_listen": "127.0.0.1:0",
            "state": "memory",
            "upstream": "http://127.0.0.1:9",
            "access_log": access_log,
        },
        environ={},
        file_doc={},
        defaults=read_default_rules(),
    )
    environ = {"OTEL_TRACES_EXPORTER": exporter}
    if sink is not None:
        environ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] = sink
    async with running(config, environ=environ) as proxy:
        state = _state(proxy)
        upstream = _Upstream(asyncio.get_running_loop())
        base_path = state.config.upstream.base_path
        yield replace(state, forwarder=PoolForwarder(upstream, base_path))  # type: ignore[arg-type]


async def _run(args: argparse.Namespace) -> dict[str, float]:
    async with _proxy(args.exporter, args.sink, args.access_log) as state:
        # Warm-up: every order id seen once (then each call is a repeat, as under steady load).
        await _one_round(state, ORDER_IDS)
        figures = [await _one_round(state, args.requests) for _ in range(args.rounds)]
    return {
        "us_per_request": statistics.median(figures) * 1e6,
        "min_us": min(figures) * 1e6,
        "max_us": max(figures) * 1e6,
    }


def main(argv: list[str] | None = None) -> int:
    """Measure and print one JSON line."""
    parser = argparse.ArgumentParser(prog="python -m bench.handler", description=__doc__)
    parser.add_argument("--requests", type=int, default=20_000, help="requests per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--exporter", choices=("none", "otlp"), default="none")
    parser.add_argument("--sink", help="OTLP/HTTP endpoint when --exporter otlp (a discarding sink)")
    parser.add_argument("--profile", help="write cProfile stats of one round to this file")
    parser.add_argument(
        "--no-access-log", dest="access_log", action="store_false", help="as serve --no-access-log"
    )
    args = parser.parse_args(argv)
    import logging

    logging.disable(logging.INFO)
    import uvloop

    if args.profile:
        import cProfile

        async def profiled() -> None:
            async with _proxy(args.exporter, args.sink, args.access_log) as state:
                await _one_round(state, ORDER_IDS)
                profiler = cProfile.Profile()
                profiler.enable()
                await _one_round(state, args.requests)
                profiler.disable()
                profiler.dump_stats(args.profile)

        uvloop.run(profiled())
        return 0
    result = uvloop.run(_run(args))
    figures = {k: round(v, 2) for k, v in result.items()}
    print(json.dumps({"exporter": args.exporter, "access_log": args.access_log, **figures}))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
