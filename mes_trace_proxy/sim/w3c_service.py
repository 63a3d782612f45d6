"""The "test service" the W3C Trace Context suite drives, to run behind the proxy.

The official suite (``test/test.py`` of github.com/w3c/trace-context; docs/tracecontext.md says
how to fetch and run it) plays the caller: it POSTs a JSON list of ``{"url", "arguments"}``
actions, and the service must POST each ``arguments`` to its ``url`` carrying the trace context
it received. With the proxy in front (harness → proxy → this service), what the suite checks is
the proxy's work, so this service adds none of its own: each callback carries exactly the
``traceparent``/``tracestate`` fields of the request it answers — the same names (as spelled),
values, order and count — and nothing else of the trace context.

Run alone: ``python -m mes_trace_proxy.sim.w3c_service --port 0`` prints one JSON line with
the bound address, then serves until interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import Sequence
from typing import Final

import aiohttp
from aiohttp import web

__all__ = ["TRACE_FIELDS", "W3cTestService", "main", "trace_fields"]

#: The fields of W3C Trace Context (lower case, as compared).
TRACE_FIELDS: Final = frozenset({b"traceparent", b"tracestate"})
# The harness waits 5 s for each callback (HARNESS_TIMEOUT); ours must fail before it does.
CALLBACK_TIMEOUT_SECONDS: Final = 4.0


def trace_fields(raw_headers: Sequence[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    """The request's ``traceparent``/``tracestate`` fields as received: names as spelled, in order.

    Args:
        raw_headers: the request's header fields as bytes, in the order they arrived.

    Returns:
        ``(name, value)`` pairs (Latin-1 decoded, so every byte survives the round trip).
    """
    return [
        (name.decode("latin-1"), value.decode("latin-1"))
        for name, value in raw_headers
        if name.lower() in TRACE_FIELDS
    ]


class W3cTestService:
    """The suite's test service on loopback: answers each POST after making its callbacks."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._host = host
        self._port = port
        self._runner: web.AppRunner | None = None
        self.port = 0
        #: every request's trace fields as received, oldest first (what tests read back)
        self.received: list[list[tuple[str, str]]] = []

    @property
    def url(self) -> str:
        """The service's endpoint, as given to the suite (through the proxy in practice)."""
        return f"http://{self._host}:{self.port}/test"

    async def start(self) -> W3cTestService:
        """Bind the listener (port 0: any free port, read back into :attr:`port`)."""
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        await site.start()
        server = site._server  # the bound socket is the only way to learn port 0's choice
        assert isinstance(server, asyncio.Server)
        self.port = server.sockets[0].getsockname()[1]
        return self

    async def aclose(self) -> None:
        """Stop listening."""
        if self._runner is not None:
            await self._runner.cleanup()

    async def __aenter__(self) -> W3cTestService:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def _handle(self, request: web.Request) -> web.Response:
        """Make the callbacks the body lists, each with this request's trace fields, then answer."""
        fields = trace_fields(request.raw_headers)
        self.received.append(fields)
        try:
            actions = await request.json()
        except ValueError:
            return web.json_response({"error": "the body is not JSON"}, status=400)
        if not isinstance(actions, list):
            actions = [actions] if actions else []
        results: list[dict[str, object]] = []
        for action in actions:
            if not isinstance(action, dict) or not isinstance(action.get("url"), str):
                results.append({"error": "an action needs a url"})
                continue
            results.append(await self._callback(action["url"], action.get("arguments") or [], fields))
        return web.json_response({"callbacks": results})

    async def _callback(
        self, url: str, arguments: object, fields: list[tuple[str, str]]
    ) -> dict[str, object]:
        """POST ``arguments`` to ``url`` with ``fields``; the outcome, never an exception."""
        # As session defaults, not per-request headers: aiohttp merges a per-request field whose
        # name differs only in case from an earlier one ("tracestate", then "TRACESTATE"), while
        # the defaults are copied as they are (the suite's own harness sends them this way too).
        timeout = aiohttp.ClientTimeout(total=CALLBACK_TIMEOUT_SECONDS)
        try:
            async with (
                aiohttp.ClientSession(headers=fields, timeout=timeout) as session,
                session.post(
                    url, data=json.dumps(arguments), headers={"Content-Type": "application/json"}
                ) as resp,
            ):
                await resp.read()
                return {"url": url, "status": resp.status}
        except (aiohttp.ClientError, TimeoutError) as exc:
            return {"url": url, "error": type(exc).__name__}


async def _serve(host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with W3cTestService(host, port) as service:
        print(json.dumps({"message": "w3c test service ready", "url": service.url}), flush=True)
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mes_trace_proxy.sim.w3c_service [--host H] [--port P]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (loopback by default)")
    parser.add_argument("--port", type=int, default=0, help="port to bind (0: any free port, printed)")
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
