"""The admin listener: liveness, readiness, metrics, config dump, orders API and page, behind bearer tokens.

``/healthz`` answers while the process runs; ``/readyz`` only when every listener is bound
and each upstream has answered recently or accepts a TCP connection now; ``/metrics`` is
the Prometheus exposition of the process's own registry; ``/config`` the effective
configuration with secrets masked. With ``admin.tokens_file`` set, every route but the two
probes needs a bearer token whose role :data:`ROUTE_ROLES` names.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Final

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from mes_trace_proxy.admin_auth import (
    ANSWERS,
    Role,
    TokenError,
    TokenTable,
    Verdict,
    WarningGate,
    authorize,
    parse_tokens,
)
from mes_trace_proxy.admin_orders import add_order_routes
from mes_trace_proxy.app import Shared
from mes_trace_proxy.limits import GuardedAppRunner, admin_limits
from mes_trace_proxy.messages.admin import add_message_routes
from mes_trace_proxy.metrics import ConnectionStats
from mes_trace_proxy.problems import PROBLEM_CONTENT_TYPE, problem_body, problem_type_uri

__all__ = ["ROUTE_ROLES", "SHARED", "TOKENS", "TokenStore", "build_admin_app", "make_admin_runner"]

log = logging.getLogger("mes_trace_proxy.admin")

SHARED: Final = web.AppKey("shared", Shared)

#: The role each admin route needs, by (method, route pattern); ``None`` is open to everyone.
#: A route not listed needs ``admin``: a new endpoint stays closed until someone decides.
#: HEAD is checked as GET. Unknown paths need ``viewer``, so a 404 tells nothing to strangers.
ROUTE_ROLES: Final[Mapping[tuple[str, str], Role | None]] = MappingProxyType(
    {
        # Kubernetes probes carry no credentials.
        ("GET", "/healthz"): None,
        ("GET", "/readyz"): None,
        ("GET", "/metrics"): Role.VIEWER,
        ("GET", "/config"): Role.ADMIN,
        # The watchdog's order pages and API: lookups are for viewers, the purge for admins.
        ("GET", "/"): Role.VIEWER,
        ("GET", "/orders"): Role.VIEWER,
        ("GET", "/orders/-/stuck"): Role.VIEWER,
        ("GET", "/orders/{order_id}"): Role.VIEWER,
        ("POST", "/orders/-/purge"): Role.ADMIN,
        # Re-drive a dead-lettered order's held messages (docs/messages.md): it publishes.
        ("POST", "/orders/{order_id}/redrive"): Role.ADMIN,
        # The old paths (admin_orders.py), deprecated for one release.
        ("GET", "/orders/stuck"): Role.VIEWER,
        ("POST", "/orders/purge"): Role.ADMIN,
    }
)


class TokenStore:
    """The admin tokens in force: read at start-up, read again on SIGHUP."""

    def __init__(self, table: TokenTable, path: str | None) -> None:
        """Start with the tokens the config loaded from ``path``."""
        self.table = table
        self._path = path

    def reload(self) -> bool:
        """Read the tokens file again; a bad file keeps the tokens in force.

        Returns:
            Whether the new tokens are in force.
        """
        if self._path is None:
            return False
        try:
            table = parse_tokens(Path(self._path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, TokenError) as exc:
            # TokenError names a line, never a token; OSError its reason.
            reason = exc.strerror if isinstance(exc, OSError) else str(exc)
            log.error("admin tokens reload failed; keeping the current tokens", extra={"error": reason})
            return False
        self.table = table
        log.info("admin tokens reloaded", extra={"tokens": len(table.entries)})
        return True


TOKENS: Final = web.AppKey("tokens", TokenStore)
# One "unknown token" warning a minute at most; the rest are counted into it and in /metrics.
_UNKNOWN_TOKEN_WARNING_INTERVAL: Final = 60.0
UNKNOWN_TOKEN_WARNINGS: Final = web.AppKey("unknown_token_warnings", WarningGate)


def _required_role(request: web.Request) -> Role | None:
    resource = request.match_info.route.resource
    if resource is None:
        return Role.VIEWER
    method = "GET" if request.method == "HEAD" else request.method
    return ROUTE_ROLES.get((method, resource.canonical), Role.ADMIN)


@web.middleware
async def _require_token(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Refuse a request whose bearer token is missing, unknown or of too low a role."""
    table = request.app[TOKENS].table
    if not table.enabled:
        return await handler(request)
    verdict = authorize(table, request.headers.get("Authorization"), _required_role(request))
    if verdict is Verdict.ALLOWED:
        return await handler(request)
    answer = ANSWERS[verdict]
    request.app[SHARED].metrics.refused("admin", answer.slug)
    if verdict is Verdict.INVALID:
        # Worth an operator's eye (a guessing client), once a minute; the token is never logged.
        held_back = request.app[UNKNOWN_TOKEN_WARNINGS].allow(time.monotonic())
        if held_back is not None:
            log.warning(
                "admin request with an unknown token",
                extra={"client": request.remote, "held_back": held_back},
            )
    body = problem_body(
        status=answer.status, title=answer.title, detail=answer.detail, type_=problem_type_uri(answer.slug)
    )
    response = web.Response(status=answer.status, body=body, content_type=PROBLEM_CONTENT_TYPE)
    if answer.www_authenticate is not None:
        response.headers["WWW-Authenticate"] = answer.www_authenticate
    return response


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
    for index, listener in enumerate(shared.config.listeners):
        last = readiness.last_upstream_answer.get(listener.name)
        if last is not None and now - last < READY_WINDOW:
            upstreams[listener.name] = "answering"
            continue
        reachable = await _probe(listener.upstream.host, listener.upstream.port)
        upstreams[listener.name] = "reachable" if reachable else "unreachable"
        # Only the first listener's upstream (MES, beside us in the pod) gates readiness: a
        # CRM outage on the egress side must not take MES out of its Service as well.
        if not reachable and index == 0:
            problems.append(f"upstream of {listener.name} unreachable")
    status = 200 if not problems else 503
    return web.json_response(
        {"status": "ready" if not problems else "not ready", "upstreams": upstreams, "problems": problems},
        status=status,
    )


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text exposition of this process's registry."""
    proxy_metrics = request.app[SHARED].metrics
    # Counted here, on the loop, because the exposition itself runs in a worker thread.
    proxy_metrics.loop_tasks.set(len(asyncio.all_tasks()))
    registry = proxy_metrics.registry
    body = await asyncio.get_running_loop().run_in_executor(None, generate_latest, registry)
    response = web.Response(body=body)
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response


async def config_dump(request: web.Request) -> web.Response:
    """The effective configuration, secrets masked (``Config.describe``)."""
    return web.json_response(request.app[SHARED].config.describe())


def build_admin_app(shared: Shared) -> web.Application:
    """Build the admin application over the process's shared objects."""
    app = web.Application(middlewares=[_require_token])
    app[SHARED] = shared
    app[TOKENS] = TokenStore(shared.config.admin.tokens, shared.config.admin.tokens_file)
    app[UNKNOWN_TOKEN_WARNINGS] = WarningGate(_UNKNOWN_TOKEN_WARNING_INTERVAL)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    add_order_routes(app, shared)
    add_message_routes(app, lambda: shared.messages, lambda: app[TOKENS].table)
    app.router.add_get("/config", config_dump)
    return app


def make_admin_runner(app: web.Application) -> GuardedAppRunner:
    """The admin listener's runner: the proxy listeners' limits with a connection cap of its own.

    A head timeout from the accept, the idle timeout and :data:`~mes_trace_proxy.limits.ADMIN_MAX_CONNECTIONS`
    keep whatever reaches the admin port from holding the descriptors the proxy listeners need;
    its refusals are counted in ``/metrics`` under ``listener="admin"``.
    """
    shared = app[SHARED]
    runner = GuardedAppRunner(
        app, limits=admin_limits(shared.config.listeners[0].limits), handle_signals=False, access_log=None
    )

    def stats() -> ConnectionStats:
        guarded = runner.guarded
        if guarded is None:
            return ConnectionStats(open=0, refused_cap=0, header_timeouts=0, malformed=0)
        return ConnectionStats(
            open=guarded.open_connections,
            refused_cap=guarded.refused_connections,
            header_timeouts=guarded.head_timeouts,
            malformed=guarded.parse_refusals,
            refused=guarded.refusals.snapshot(),
        )

    shared.metrics.bind(admin_stats=stats)
    return runner
