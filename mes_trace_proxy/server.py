"""Lifecycle in one place: start everything in order, serve, and on a signal drain and flush.

Start: tracing → order book and its store (records loaded, writer started) → metrics → one
runner and site per listener → admin → watchdog. Stop (SIGTERM/SIGINT): stop the watchdog,
mark not ready, stop accepting, let in-flight requests finish within the grace period, flush
the store's writer, close the store, flush spans. SIGHUP re-reads the listeners' TLS
certificates and the admin tokens without a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import ssl
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Final

from aiohttp import web

from mes_trace_proxy import native
from mes_trace_proxy.admin import TOKENS, build_admin_app
from mes_trace_proxy.app import Shared, build_proxy_server
from mes_trace_proxy.config import Config, ConfigError, HostPort, is_loopback
from mes_trace_proxy.http1 import Http1Server
from mes_trace_proxy.logs import AccessLog
from mes_trace_proxy.metrics import ConnectionStats, ProxyMetrics
from mes_trace_proxy.orders import OrderBook
from mes_trace_proxy.redact import Redactor
from mes_trace_proxy.store import MemoryStore, StoreWriter, open_store
from mes_trace_proxy.tls import CertReloader, ClientCertReloader
from mes_trace_proxy.tracing import build_tracing
from mes_trace_proxy.upstream import UpstreamPool
from mes_trace_proxy.watchdog import Watchdog

__all__ = ["BindError", "RunningProxy", "StartupError", "run", "running"]

log = logging.getLogger("mes_trace_proxy.server")

#: Sent by Ctrl+C (SIGINT) and by `kill`/Kubernetes (SIGTERM): both mean "drain and exit".
HANDLED_SIGNALS: Final = (signal.SIGINT, signal.SIGTERM)


class StartupError(Exception):
    """The proxy cannot start; the message says why and what to change."""


class BindError(StartupError):
    """A listen address could not be bound (port busy, no permission)."""


@dataclass(slots=True)
class RunningProxy:
    """A started proxy: its bound addresses and shared objects (used by tests and the demo)."""

    shared: Shared
    listeners: dict[str, tuple[str, int]]
    admin: tuple[str, int]
    watchdog: Watchdog
    #: listener name → its certificate reloader, for listeners that serve TLS
    certificates: dict[str, CertReloader] = field(default_factory=dict)
    admin_app: web.Application | None = None
    #: listener name → its server, whose counters show connections open and refused
    servers: dict[str, Http1Server] = field(default_factory=dict)
    #: listener name → its upstream client certificate (upstream_tls), reloaded like the listeners'
    upstream_certificates: dict[str, ClientCertReloader] = field(default_factory=dict)

    def url(self, listener: str) -> str:
        """``http://host:port`` (``https://`` when it serves TLS) of a listener."""
        host, port = self.listeners[listener]
        scheme = "https" if listener in self.certificates else "http"
        return f"{scheme}://{host}:{port}" if ":" not in host else f"{scheme}://[{host}]:{port}"

    def reload(self) -> None:
        """What SIGHUP does: read the TLS certificates and the admin tokens again."""
        log.info("SIGHUP: reloading certificates and admin tokens")
        for reloader in self.certificates.values():
            reloader.reload()
        for client in self.upstream_certificates.values():
            client.reload()
        if self.admin_app is not None:
            self.admin_app[TOKENS].reload()

    @property
    def admin_url(self) -> str:
        """``http://host:port`` of the admin listener."""
        host, port = self.admin
        return f"http://{host}:{port}" if ":" not in host else f"http://[{host}]:{port}"


async def _start_site(
    runner: web.BaseRunner,
    address: HostPort,
    reuse_port: bool,
    what: str,
    ssl_context: ssl.SSLContext | None = None,
) -> tuple[str, int]:
    site = web.TCPSite(
        runner,
        address.host,
        address.port,
        reuse_port=reuse_port or None,
        backlog=1024,
        ssl_context=ssl_context,
    )
    try:
        await site.start()
    except OSError as exc:
        raise BindError(f"{what}: cannot listen on {address}: {exc.strerror or exc}") from None
    # One site per runner: its first address is this site's, with the real port (port 0 in tests).
    bound = runner.addresses[0]
    return str(bound[0]), int(bound[1])


async def _listen(
    server: Http1Server,
    address: HostPort,
    reuse_port: bool,
    what: str,
    ssl_context: ssl.SSLContext | None = None,
) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    try:
        return await loop.create_server(
            server,
            address.host,
            address.port,
            reuse_port=reuse_port or None,
            backlog=1024,
            ssl=ssl_context,
        )
    except OSError as exc:
        raise BindError(f"{what}: cannot listen on {address}: {exc.strerror or exc}") from None


@contextlib.asynccontextmanager
async def running(
    config: Config,
    *,
    environ: Mapping[str, str] | None = None,
    reuse_port: bool = False,
    clock: Callable[[], float] | None = None,
) -> AsyncIterator[RunningProxy]:
    """Start the whole proxy inside the running loop; on exit, drain and flush it all.

    Args:
        config: the validated configuration.
        environ: where ``OTEL_*`` and Kubernetes variables are read (default ``os.environ``).
        reuse_port: share the listen sockets with sibling worker processes.
        clock: wall clock for order state (tests pass a controllable one).

    Yields:
        The running proxy with its bound addresses.

    Raises:
        BindError: a listen address is busy or not allowed.
        StartupError: the ``--state`` URL names no usable store.
        ConfigError: a TLS certificate, key or CA file is unusable.
    """
    env = os.environ if environ is None else environ
    try:
        store = open_store(config.watchdog.state)
    except ValueError as exc:
        raise StartupError(f"--state / MES_PROXY_STATE / watchdog.state: {exc}") from None
    tracing = build_tracing(config, env)
    access_log = AccessLog() if config.server.access_log else None
    metrics = ProxyMetrics(known_statuses=config.lifecycle.statuses)
    book = OrderBook(config.lifecycle)
    writer = StoreWriter(store)
    shared = Shared(
        config=config,
        tracing=tracing,
        metrics=metrics,
        redactor=Redactor(config.privacy.policy()),
        orders=book,
        access_log=access_log,
    )
    if clock is not None:
        shared.clock = clock
    metrics.bind(upstream_answers=shared.readiness.last_upstream_answer)
    watchdog = Watchdog(
        book=book,
        store=store,
        writer=writer,
        tracing=tracing,
        config=config.watchdog,
        metrics=metrics,
        clock=shared.clock,
    )
    shared.watchdog = watchdog
    # The hot path only enqueues; the writer's task does the I/O (store.StoreWriter). With
    # --state memory the order book is the state: copying each change into a MemoryStore would
    # keep every order twice and cost every status change a record for nobody to read.
    if not isinstance(store, MemoryStore):
        shared.on_order_changed = watchdog.order_changed
    metrics.bind(
        export_stats=tracing.export_stats,
        order_counts=book.counts,
        stuck_counts=watchdog.stuck_counts,
        store_stats=watchdog.store_stats,
    )
    runners: list[web.BaseRunner] = []
    sessions = []
    pools: list[UpstreamPool] = []
    listeners: dict[str, tuple[str, int]] = {}
    certificates: dict[str, CertReloader] = {}
    upstream_certificates: dict[str, ClientCertReloader] = {}
    servers: dict[str, Http1Server] = {}
    listening: list[tuple[asyncio.Server, Http1Server]] = []
    metrics.bind(
        connection_stats=lambda: {
            name: ConnectionStats(
                open=server.open_connections,
                refused_cap=server.refused_connections,
                header_timeouts=server.head_timeouts,
                malformed=server.parse_refusals,
            )
            for name, server in servers.items()
        }
    )
    await watchdog.restore()
    # Spans are encoded as they end and sent by tasks on this loop (export.py).
    tracing.start()
    writer.start()
    log_task = asyncio.create_task(access_log.run(), name="access-log-flush") if access_log else None
    try:
        for listener in config.listeners:
            if listener.tls is not None:
                certificates[listener.name] = CertReloader(listener.name, listener.tls)
            proxy_server, session, pool = build_proxy_server(listener, shared)
            servers[listener.name] = proxy_server
            sessions.append(session)
            if pool is not None:
                pools.append(pool)
                if pool.tls is not None:
                    upstream_certificates[listener.name] = pool.tls
            reloader = certificates.get(listener.name)
            socket_server = await _listen(
                proxy_server,
                listener.listen,
                reuse_port,
                f"listener {listener.name}",
                reloader.context if reloader is not None else None,
            )
            listening.append((socket_server, proxy_server))
            bound = socket_server.sockets[0].getsockname()
            listeners[listener.name] = (str(bound[0]), int(bound[1]))
            if reloader is not None:
                reloader.start()
        admin_app = build_admin_app(shared)
        admin_runner = web.AppRunner(admin_app, handle_signals=False, access_log=None)
        await admin_runner.setup()
        runners.append(admin_runner)
        admin = await _start_site(admin_runner, config.admin.listen, reuse_port, "admin listener")
        shared.readiness.listeners_bound = True
        _log_exposure(config)
        log.info(
            "mes-trace-proxy ready",
            extra={
                "listeners": {k: f"{h}:{p}" for k, (h, p) in listeners.items()},
                "admin": f"{admin[0]}:{admin[1]}",
                "build": native.current().state,
            },
        )
        if native.current().state == "stale":
            # Not fatal: the sources run, correct and slower, until the build is redone.
            log.warning(native.current().reason)
        watchdog.start()
        yield RunningProxy(
            shared=shared,
            listeners=listeners,
            admin=admin,
            watchdog=watchdog,
            certificates=certificates,
            admin_app=admin_app,
            servers=servers,
            upstream_certificates=upstream_certificates,
        )
    finally:
        await watchdog.stop()
        for reloader in certificates.values():
            await reloader.aclose()
        shared.readiness.draining = True
        shared.readiness.listeners_bound = False
        # Every listener drains at once: stop accepting, wait for in-flight requests up to
        # the grace period, cancel what is left, then close the upstream sessions.
        for socket_server, _ in listening:
            socket_server.close()
        await asyncio.gather(
            *(proxy_server.shutdown(config.server.grace_period) for _, proxy_server in listening),
            *(r.cleanup() for r in runners),
            return_exceptions=True,
        )
        for session in sessions:
            await session.close()
        for pool in pools:
            await pool.close()
        if log_task is not None:
            # The drained requests' lines are queued by now; cancelling flushes them.
            log_task.cancel()
            await asyncio.gather(log_task, return_exceptions=True)
        # The drained requests' last changes are queued by now: write them, then let go.
        await writer.stop()
        try:
            await store.close()
        except Exception as exc:  # a store that fails to close must not keep spans unflushed
            log.error("closing the state store failed: %s", type(exc).__name__)
        # The OTLP exporters flush on this loop, within OTEL_BSP_EXPORT_TIMEOUT; what is left
        # (a console exporter, test processors) blocks, so it runs off the loop.
        await tracing.aclose()
        await asyncio.get_running_loop().run_in_executor(None, tracing.shutdown)
        log.info("mes-trace-proxy stopped")


def _log_exposure(config: Config) -> None:
    """Say once at start-up what leaves the process about users and who can reach the admin API."""
    if config.privacy.user_id_key is None:
        log.info("no user-id key configured: enduser.id is not recorded (privacy.user_id_key_file)")
    if not config.admin.tokens.enabled and not is_loopback(config.admin.listen.host):
        log.warning(
            "the admin listener is reachable beyond loopback without tokens (admin.tokens_file)",
            extra={"admin": str(config.admin.listen)},
        )


# Young objects collected after this many allocations (CPython's default is 700). A request
# allocates a few hundred container objects, nearly all freed by reference counting; a larger
# first generation runs the collector a tenth as often for the same garbage found.
GC_THRESHOLD_0: Final = 7000


def _settle_garbage_collector() -> None:
    """Keep the collector off what start-up built, and run it less often (docs/performance.md).

    Everything alive once the proxy is ready (modules, the SDK, aiohttp, compiled rules) lives
    as long as the process; ``gc.freeze`` moves it out of the generations the collector scans,
    so a full collection walks only what requests left behind, not some hundred thousand
    start-up objects. Done in the serving process only, not by ``running`` (tests start many
    proxies in one process).
    """
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_THRESHOLD_0, gen1, gen2)


async def _serve_until_signal(config: Config, reuse_port: bool) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in HANDLED_SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    try:
        async with running(config, reuse_port=reuse_port) as proxy:
            loop.add_signal_handler(signal.SIGHUP, proxy.reload)
            _settle_garbage_collector()
            await stop.wait()
            log.info("signal received: draining", extra={"grace_period_s": config.server.grace_period})
    finally:
        for sig in (*HANDLED_SIGNALS, signal.SIGHUP):
            loop.remove_signal_handler(sig)


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux and macOS
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def _worker(config: Config) -> None:
    _install_uvloop()
    asyncio.run(_serve_until_signal(config, reuse_port=True))


def run(config: Config) -> int:
    """Serve until SIGTERM/SIGINT; with ``workers > 1``, as that many processes sharing the sockets.

    Returns:
        The process exit status: 0 after a clean drain, 1 when a listener cannot bind or the
        state store URL is unusable.
    """
    if config.server.workers == 1:
        _install_uvloop()
        try:
            asyncio.run(_serve_until_signal(config, reuse_port=False))
        except StartupError as exc:
            print(f"mes-trace-proxy: {exc}", file=sys.stderr)
            return 1
        return 0
    return _run_workers(config)


def _run_workers(config: Config) -> int:
    """Fork the workers; forward signals; exit with the worst worker status."""
    if not hasattr(socket, "SO_REUSEPORT"):
        print("mes-trace-proxy: --workers > 1 needs SO_REUSEPORT (Linux, macOS)", file=sys.stderr)
        return 2
    children: list[int] = []
    for _ in range(config.server.workers):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            code = 0
            try:
                _worker(config)
            except StartupError as exc:
                print(f"mes-trace-proxy: {exc}", file=sys.stderr)
                code = 1
            except ConfigError as exc:
                print(f"mes-trace-proxy: configuration error: {exc}", file=sys.stderr)
                code = 2
            finally:
                os._exit(code)
        children.append(pid)

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signum)

    # SIGHUP too: each worker reloads its own certificates and tokens.
    for sig in (*HANDLED_SIGNALS, signal.SIGHUP):
        signal.signal(sig, forward)
    worst = 0
    for child in children:
        _pid, status = os.waitpid(child, 0)
        worst = max(worst, os.waitstatus_to_exitcode(status))
    return worst
