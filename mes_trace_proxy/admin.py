"""The admin listener: liveness, readiness, Prometheus metrics, and the orders API and page.

``/healthz`` answers while the process runs; ``/readyz`` only when every listener is bound
and each upstream has answered recently or accepts a TCP connection now; ``/metrics`` is
the Prometheus exposition of the process's own registry.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Final

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from mes_trace_proxy.admin_orders import add_order_routes
from mes_trace_proxy.app import Shared

__all__ = ["SHARED", "build_admin_app"]

SHARED: Final = web.AppKey("shared", Shared)
# An upstream that answered within this window counts as reachable without a probe; about
# three Kubernetes readiness periods (10 s default).
READY_WINDOW: Final = 30.0
# A TCP connect to a sidecar's upstream on loopback takes microseconds; one second means down.
PROBE_TIMEOUT: Final = 1.0


async def _probe(host: str, port: int) -> bool:
    try:
        _reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), PROBE_TIMEOUT)
    except (TimeoutError, OSError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


async def healthz(_request: web.Request) -> web.Response:
    """The process is alive and its event loop turns."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready to take traffic: listeners bound, not draining, every upstream reachable."""
    shared = request.app[SHARED]
    readiness = shared.readiness
    problems: list[str] = []
    if not readiness.listeners_bound:
        problems.append("listeners not bound yet")
    if readiness.draining:
        problems.append("draining for shutdown")
    now = time.monotonic()
    upstreams: dict[str, str] = {}
    for listener in shared.config.listeners:
        last = readiness.last_upstream_answer.get(listener.name)
        if last is not None and now - last < READY_WINDOW:
            upstreams[listener.name] = "answering"
            continue
        reachable = await _probe(listener.upstream.host, listener.upstream.port)
        upstreams[listener.name] = "reachable" if reachable else "unreachable"
        if not reachable:
            problems.append(f"upstream of {listener.name} unreachable")
    status = 200 if not problems else 503
    return web.json_response(
        {"status": "ready" if not problems else "not ready", "upstreams": upstreams, "problems": problems},
        status=status,
    )


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text exposition of this process's registry."""
    registry = request.app[SHARED].metrics.registry
    body = await asyncio.get_running_loop().run_in_executor(None, generate_latest, registry)
    response = web.Response(body=body)
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response


def build_admin_app(shared: Shared) -> web.Application:
    """Build the admin application over the process's shared objects."""
    app = web.Application()
    app[SHARED] = shared
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    add_order_routes(app, shared)
    return app
