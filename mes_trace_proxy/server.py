"""Lifecycle in one place: start everything in order, serve, and on a signal drain and flush.

:func:`running` starts each resource on one :class:`contextlib.AsyncExitStack`, in this order:

1. order state: the stored orders loaded into the order book, the store's writer started;
2. span export: the OTLP export tasks on this loop;
3. the access log's flush task (the metrics need no start: they are read at scrape time);
4. the proxy listeners: each one's upstream clients, then its server, bound and accepting;
5. the admin listener;
6. the stuck-order watchdog;
7. the message path, when ``--amqp-url`` is set: its watcher connects in the background, so
   nothing here or in the listeners ever waits on RabbitMQ (docs/messages.md);
8. ready: ``/readyz`` says so and the ``mes-trace-proxy ready`` line is logged.

Teardown (SIGTERM/SIGINT, or a later step failing) is the same list in reverse, by
construction: mark draining, stop the message path and the watchdog, close the admin listener,
stop accepting and let every listener's in-flight requests finish within the grace period,
close the upstream clients, flush the access log, flush spans, write the orders' last changes
and close the store. SIGHUP re-reads the listeners' TLS certificates and the admin tokens without a restart.
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
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Final

from aiohttp import web

from mes_trace_proxy import native
from mes_trace_proxy.admin.app import TOKENS, build_admin_app, make_admin_runner
from mes_trace_proxy.app import Shared, build_proxy_server
from mes_trace_proxy.core.config import Config, ConfigError, HostPort, ListenerConfig, is_loopback
from mes_trace_proxy.core.orders import OrderBook
from mes_trace_proxy.core.redact import Redactor
from mes_trace_proxy.messages.service import MessagePath
from mes_trace_proxy.state.book_sync import BookSync
from mes_trace_proxy.state.store import MemoryStore, StateStore, StoreWriter, open_store
from mes_trace_proxy.state.watchdog import Watchdog
from mes_trace_proxy.telemetry.logs import AccessLog
from mes_trace_proxy.telemetry.metrics import ConnectionStats, ProxyMetrics
from mes_trace_proxy.telemetry.tracing import Tracing, build_tracing
from mes_trace_proxy.wire.server import Http1Server
from mes_trace_proxy.wire.tls import CertReloader, ClientCertReloader

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


async def _listen(
    protocol_factory: Callable[[], asyncio.BaseProtocol],
    address: HostPort,
    reuse_port: bool,
    what: str,
    ssl_context: ssl.SSLContext | None = None,
) -> asyncio.Server:
    """Bind and listen; a busy or forbidden address is a :class:`BindError` naming ``what``."""
    loop = asyncio.get_running_loop()
    try:
        return await loop.create_server(
            protocol_factory,
            address.host,
            address.port,
            reuse_port=reuse_port or None,
            backlog=1024,
            ssl=ssl_context,
        )
    except OSError as exc:
        raise BindError(f"{what}: cannot listen on {address}: {exc.strerror or exc}") from None


def _bound(socket_server: asyncio.Server) -> tuple[str, int]:
    """The address a listening socket got (the real port when port 0 was asked for)."""
    name = socket_server.sockets[0].getsockname()
    return str(name[0]), int(name[1])


@dataclass(slots=True)
class _Parts:
    """What start-up builds before anything runs: plain objects, no task, no socket."""

    store: StateStore
    writer: StoreWriter
    tracing: Tracing
    shared: Shared
    watchdog: Watchdog
    #: listener name → its server and socket, filled as the listeners start (the metrics read it)
    listening: dict[str, _Listening] = field(default_factory=dict)
    #: listener name → its upstream client certificate (upstream_tls), reloaded on SIGHUP
    upstream_certificates: dict[str, ClientCertReloader] = field(default_factory=dict)


@contextlib.asynccontextmanager
async def running(
    config: Config,
    *,
    environ: Mapping[str, str] | None = None,
    reuse_port: bool = False,
    clock: Callable[[], float] | None = None,
) -> AsyncIterator[RunningProxy]:
    """Start the whole proxy inside the running loop; on exit, drain and flush it all.

    Each step below starts one resource and registers how to stop it on one exit stack, so
    teardown is start-up in reverse, also when a later step fails: a resource is one
    ``await stack.enter_async_context(...)`` line.

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
    parts = _assemble(config, os.environ if environ is None else environ, clock)
    shared = parts.shared
    async with contextlib.AsyncExitStack() as stack:
        stack.callback(log.info, "mes-trace-proxy stopped")
        await stack.enter_async_context(_order_state(parts))
        await stack.enter_async_context(_span_export(parts.tracing))
        await stack.enter_async_context(_access_log(shared.access_log))
        certificates = await stack.enter_async_context(_proxy_listeners(shared, parts, reuse_port))
        admin_app, admin = await stack.enter_async_context(_admin_listener(shared, reuse_port))
        await stack.enter_async_context(_watchdog(parts.watchdog))
        await stack.enter_async_context(_message_path(shared.messages))
        stack.enter_context(_ready(shared, parts.listening, admin))
        yield RunningProxy(
            shared=shared,
            listeners={name: item.address for name, item in parts.listening.items()},
            admin=admin,
            watchdog=parts.watchdog,
            certificates=certificates,
            admin_app=admin_app,
            servers={name: item.server for name, item in parts.listening.items()},
            upstream_certificates=parts.upstream_certificates,
        )


def _assemble(config: Config, environ: Mapping[str, str], clock: Callable[[], float] | None) -> _Parts:
    """Build the shared objects and wire the metrics to them; nothing starts yet.

    Raises:
        StartupError: the ``--state`` URL names no usable store.
    """
    try:
        store = open_store(config.watchdog.state)
    except ValueError as exc:
        raise StartupError(f"--state / MES_PROXY_STATE / watchdog.state: {exc}") from None
    tracing = build_tracing(config, environ)
    metrics = ProxyMetrics(known_statuses=config.lifecycle.known)
    book = OrderBook(config.lifecycle)
    writer = StoreWriter(store)
    shared = Shared(
        config=config,
        tracing=tracing,
        metrics=metrics,
        redactor=Redactor(config.privacy.policy()),
        orders=book,
        access_log=AccessLog() if config.server.access_log else None,
    )
    if clock is not None:
        shared.clock = clock
    sync = BookSync(book=book, store=store, writer=writer)
    watchdog = Watchdog(
        book=book,
        sync=sync,
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
        shared.on_order_changed = sync.order_changed
    parts = _Parts(store=store, writer=writer, tracing=tracing, shared=shared, watchdog=watchdog)
    if config.messages.enabled:
        shared.messages = _build_message_path(config, environ, shared)
        metrics.registry.register(shared.messages.collector)
    metrics.bind(
        upstream_answers=shared.readiness.last_upstream_answer,
        export_stats=tracing.export_stats,
        order_counts=book.counts,
        stuck_counts=watchdog.stuck_counts,
        store_stats=sync.store_stats,
        connection_stats=lambda: {
            name: ConnectionStats(
                open=item.server.open_connections,
                refused_cap=item.server.refused_connections,
                header_timeouts=item.server.head_timeouts,
                malformed=item.server.parse_refusals,
                refused=item.server.refusals.snapshot(),
            )
            for name, item in parts.listening.items()
        },
    )
    return parts


@contextlib.asynccontextmanager
async def _order_state(parts: _Parts) -> AsyncIterator[None]:
    """Load the stored orders and start the writer; on exit write what the drain left queued, then close."""
    try:
        await parts.watchdog.sync.restore()
        parts.writer.start()
        yield
    finally:
        await parts.writer.stop()
        try:
            await parts.store.close()
        except Exception as exc:  # a store that fails to close must not keep spans unflushed
            log.error("closing the state store failed: %s", type(exc).__name__)


@contextlib.asynccontextmanager
async def _span_export(tracing: Tracing) -> AsyncIterator[None]:
    """Spans are encoded as they end and sent by tasks on this loop (export.py); flushed on exit."""
    tracing.start()
    try:
        yield
    finally:
        # The OTLP exporters flush on this loop, within OTEL_BSP_EXPORT_TIMEOUT; what is left
        # (a console exporter, test processors) blocks, so it runs off the loop.
        await tracing.aclose()
        await asyncio.get_running_loop().run_in_executor(None, tracing.shutdown)


@contextlib.asynccontextmanager
async def _access_log(access_log: AccessLog | None) -> AsyncIterator[None]:
    """The access log's flush task; cancelling it writes the drained requests' lines."""
    if access_log is None:
        yield
        return
    task = asyncio.create_task(access_log.run(), name="access-log-flush")
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@dataclass(slots=True)
class _Listening:
    """One proxy listener that is accepting connections."""

    server: Http1Server
    socket: asyncio.Server
    address: tuple[str, int]


@contextlib.asynccontextmanager
async def _proxy_listeners(
    shared: Shared, parts: _Parts, reuse_port: bool
) -> AsyncIterator[dict[str, CertReloader]]:
    """Every proxy listener: its upstream clients, then its server, accepting; yields the TLS reloaders.

    On exit, in reverse: the certificate watchers stop; every listener stops accepting and
    drains at once (in-flight requests finish within the grace period, the rest is cancelled);
    then the upstream clients close, when nothing uses them any more.
    """
    config, listening = shared.config, parts.listening
    async with contextlib.AsyncExitStack() as stack:
        certificates = {lst.name: CertReloader(lst.name, lst.tls) for lst in config.listeners if lst.tls}
        built: list[tuple[ListenerConfig, Http1Server]] = []
        for listener in config.listeners:
            server, session, pool = build_proxy_server(listener, shared)
            stack.push_async_callback(session.close)
            if pool is not None:
                stack.push_async_callback(pool.close)
                if pool.tls is not None:
                    parts.upstream_certificates[listener.name] = pool.tls
            built.append((listener, server))
        await stack.enter_async_context(_draining(listening, config.server.grace_period))
        for listener, server in built:
            reloader = certificates.get(listener.name)
            what = f"listener {listener.name}"
            context = reloader.context if reloader is not None else None
            socket_server = await _listen(server, listener.listen, reuse_port, what, context)
            listening[listener.name] = _Listening(server, socket_server, _bound(socket_server))
            if reloader is not None:
                reloader.start()
                stack.push_async_callback(reloader.aclose)
        yield certificates


@contextlib.asynccontextmanager
async def _draining(listening: Mapping[str, _Listening], grace_period: float) -> AsyncIterator[None]:
    """On exit, every listener stops accepting, then all drain at once within one grace period."""
    try:
        yield
    finally:
        for item in listening.values():
            item.socket.close()
        await asyncio.gather(
            *(item.server.shutdown(grace_period) for item in listening.values()), return_exceptions=True
        )


@contextlib.asynccontextmanager
async def _admin_listener(
    shared: Shared, reuse_port: bool
) -> AsyncIterator[tuple[web.Application, tuple[str, int]]]:
    """The admin application, listening; on exit it stops accepting and finishes its requests."""
    app = build_admin_app(shared)
    runner = make_admin_runner(app)  # the listeners' limits, with a connection cap of its own
    await runner.setup()
    try:
        assert runner.server is not None  # set by setup()
        socket_server = await _listen(runner.server, shared.config.admin.listen, reuse_port, "admin listener")
        try:
            yield app, _bound(socket_server)
        finally:
            socket_server.close()
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def _watchdog(watchdog: Watchdog) -> AsyncIterator[None]:
    """The periodic stuck-order check (its first round at once)."""
    watchdog.start()
    try:
        yield
    finally:
        await watchdog.stop()


def _build_message_path(config: Config, environ: Mapping[str, str], shared: Shared) -> MessagePath:
    """The message path over the same state store URL; nothing connects yet.

    Raises:
        StartupError: the AMQP password file or the TLS files cannot be read.
    """
    try:
        return MessagePath(
            config.messages, state_url=config.watchdog.state, tracer=shared.tracing.tracer,
            redact=shared.redactor.value, book=shared.orders, environ=environ, clock=shared.clock,
        )  # fmt: skip
    except (OSError, ssl.SSLError) as exc:
        raise StartupError(f"messages.amqp_password_file / messages.tls: {exc}") from None


@contextlib.asynccontextmanager
async def _message_path(messages: MessagePath | None) -> AsyncIterator[None]:
    """The dead-letter watcher and re-drive: started in the background, stopped before the listeners."""
    if messages is None:
        yield
        return
    await messages.start()
    try:
        yield
    finally:
        await messages.stop()


@contextlib.contextmanager
def _ready(shared: Shared, listening: Mapping[str, _Listening], admin: tuple[str, int]) -> Iterator[None]:
    """Mark the proxy ready and say so; on exit mark it draining, the first step of every shutdown.

    Draining first: /readyz answers 503 from then on, and an upstream call the drain cancels is
    recorded as the shutdown's (``shutdown_cancelled``), not as a caller that hung up.
    """
    shared.readiness.listeners_bound = True
    _log_exposure(shared.config)
    log.info(
        "mes-trace-proxy ready",
        extra={
            "listeners": {name: f"{item.address[0]}:{item.address[1]}" for name, item in listening.items()},
            "admin": f"{admin[0]}:{admin[1]}",
            "build": native.current().state,
        },
    )
    if native.current().state == "stale":
        # Not fatal: the sources run, correct and slower, until the build is redone.
        log.warning(native.current().reason)
    try:
        yield
    finally:
        shared.readiness.draining = True
        shared.readiness.listeners_bound = False


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
