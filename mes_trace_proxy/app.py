"""Composition root: builds the shared objects and each listener's server from one Config.

Nothing here runs anything; :mod:`mes_trace_proxy.server` owns the order in which things
start and stop. Every resource built here comes with the coroutine that closes it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

import aiohttp

from mes_trace_proxy.admin.shared import Readiness, Shared
from mes_trace_proxy.core.config import ListenerConfig
from mes_trace_proxy.core.forwarding import ForwardPolicy
from mes_trace_proxy.core.framing import UnderscorePolicy
from mes_trace_proxy.core.tracecontext import TrustPolicy
from mes_trace_proxy.proxy.handler import make_handler
from mes_trace_proxy.proxy.handler_state import (
    Forwarder,
    ListenerState,
    PoolForwarder,
    SessionForwarder,
    own_response_fields,
    propagation_for,
    span_mode_for,
)
from mes_trace_proxy.proxy.relay import upstream_error_type
from mes_trace_proxy.proxy.websocket import make_upgrade_handler
from mes_trace_proxy.telemetry.observer import Observer
from mes_trace_proxy.wire.client import UpstreamPool
from mes_trace_proxy.wire.limits import GuardedServer
from mes_trace_proxy.wire.server import Http1Server
from mes_trace_proxy.wire.tls import client_context

if TYPE_CHECKING:
    pass

__all__ = ["Readiness", "Shared", "build_proxy_server", "make_pool", "make_session", "trust_policy"]

log = logging.getLogger("mes_trace_proxy.app")

# Upstream connection pool per listener: MES is one host behind a sidecar, so the per-host
# limit is the pool. 256 covers a busy dashboard's polling without letting one listener
# open thousands of sockets to MES when it slows down.
UPSTREAM_POOL_SIZE: Final = 256
# Keep idle upstream connections a little under common server keep-alive timeouts
# (nginx 75 s, Tomcat/Spring 60 s) so we rarely reuse a socket the server is closing.
UPSTREAM_KEEPALIVE: Final = 30.0
# A socket read buffer that lets 256 MiB uploads and downloads move in large pieces.
READ_BUFFER: Final = 256 * 1024


def make_session(
    listener: ListenerConfig, trace_configs: Sequence[aiohttp.TraceConfig] = ()
) -> aiohttp.ClientSession:
    """The one upstream session of a listener: pooled, transparent, no cookies, no redirects.

    Args:
        listener: the listener whose upstream the session calls.
        trace_configs: aiohttp trace configs (the CLIENT-span instrumentation, when chosen).

    Raises:
        ConfigError: the listener's ``upstream_tls`` files are unusable.
    """
    timeouts = listener.timeouts
    connector = aiohttp.TCPConnector(
        limit=UPSTREAM_POOL_SIZE,
        limit_per_host=UPSTREAM_POOL_SIZE,
        keepalive_timeout=UPSTREAM_KEEPALIVE,
        enable_cleanup_closed=False,
        # https:// without upstream_tls verifies against the system's CA bundle.
        ssl=client_context(listener.upstream_tls) if listener.upstream_tls is not None else True,
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(
            total=timeouts.total, sock_connect=timeouts.connect, sock_read=timeouts.read
        ),
        # The proxy is transparent: a cookie jar would replay one caller's cookies to
        # another, and decompression would change the bytes the caller receives.
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
        read_bufsize=READ_BUFFER,
        raise_for_status=False,
        trust_env=False,
        trace_configs=list(trace_configs) or None,
    )


def make_pool(listener: ListenerConfig) -> UpstreamPool:
    """The lean upstream client of a listener: the same pool bound, keep-alive and read buffer.

    Args:
        listener: the listener whose upstream the pool calls; call inside a running loop.

    Raises:
        ConfigError: the listener's ``upstream_tls`` files are unusable.
    """
    return UpstreamPool(
        listener, size=UPSTREAM_POOL_SIZE, keepalive=UPSTREAM_KEEPALIVE, read_buffer=READ_BUFFER
    )


def trust_policy(cidrs: tuple[str, ...]) -> TrustPolicy:
    """The trust policy for ``privacy.trusted_callers``: ``*`` trusts all, an empty list none."""
    if not cidrs:
        return TrustPolicy(trust_all=False)
    return TrustPolicy.from_cidrs(cidrs)


def build_proxy_server(
    listener: ListenerConfig, shared: Shared
) -> tuple[Http1Server, aiohttp.ClientSession, UpstreamPool | None]:
    """Build one listener's server and its upstream clients; call inside a running loop.

    Requests are served by the lean HTTP/1.1 server (``http1.py``), WebSocket upgrades by
    aiohttp's, which it hands them to. The handler's modes are chosen here, once (see
    ``handler_state.py``). The upstream client of plain requests is the lean ``UpstreamPool``
    by default; aiohttp's session only with ``tracing.client_span: instrumentation`` (its
    hooks live there; the pool is then ``None``). The session always serves the WebSocket
    relay. The caller (``server.py``) owns all three: it closes the session and the pool
    after the server drained.
    """
    config = shared.config
    tracing = shared.tracing
    # tracing.client_span: instrumentation — only when spans are exported; otherwise the
    # handler's pass-through span carries the trace on, as in SDK mode.
    instrumented = config.tracing.client_span == "instrumentation" and tracing.exporting
    trace_configs: tuple[aiohttp.TraceConfig, ...] = ()
    if instrumented:
        from mes_trace_proxy.telemetry.client_span import instrumentation_trace_configs

        readiness = shared.readiness
        trace_configs = instrumentation_trace_configs(
            tracing.provider,
            tracing.propagator,
            error_type=lambda exc: upstream_error_type(exc, draining=readiness.draining),
        )
    session = make_session(listener, trace_configs)
    # The default upstream client: the pool. The session only when its hooks make the CLIENT span.
    pool = None if instrumented else make_pool(listener)
    forwarder: Forwarder = (
        SessionForwarder(session, listener)
        if pool is None
        else PoolForwarder(pool, listener.upstream.base_path)
    )
    # The metrics also note each upstream answer for /readyz (ProxyMetrics.bind).
    observer: Observer = shared.metrics
    state = ListenerState(
        config=listener,
        session=session,
        forwarder=forwarder,
        tracing=tracing,
        span_mode=span_mode_for(exporting=tracing.exporting, instrumented=instrumented),
        propagation=propagation_for(tracing, instrumented=instrumented, redactor=shared.redactor),
        redactor=shared.redactor,
        trust=trust_policy(config.privacy.trusted_callers),
        forward_policy=ForwardPolicy(
            upstream_host=listener.upstream.host_header,
            preserve_host=listener.preserve_host,
            forwarded_headers=listener.forwarded_headers,
            underscore=UnderscorePolicy(
                lookalikes=listener.underscore_lookalikes, others=listener.underscore_headers
            ),
        ),
        user_id_header=config.privacy.user_id_header,
        user_id_key=config.privacy.user_id_key,
        orders=shared.orders,
        observer=observer,
        access_log=shared.access_log,
        clock=shared.clock,
        correlation=config.watchdog.correlation,
        on_order_changed=shared.on_order_changed,
        draining=lambda: shared.readiness.draining,
        own_response_fields=own_response_fields(listener),
    )
    upgrades = GuardedServer(
        make_upgrade_handler(state),
        limits=listener.limits,
        # A caller that goes away cancels its handler, and with it the upstream call.
        handler_cancellation=True,
        # A gzip request body must reach MES as the gzip bytes it was.
        auto_decompress=False,
        access_log=None,
    )
    server = Http1Server(make_handler(state), limits=listener.limits, upgrade_server=upgrades)
    return server, session, pool
