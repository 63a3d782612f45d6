"""The OTLP span export path: spans encoded as they end, sent in batches from the event loop.

The SDK's exporters encode a whole batch at once in a worker thread, which holds the GIL
against the event loop for milliseconds (the p99 in docs/performance.md). Here each span is
encoded when it ends (``otlp_encode``, about 10 µs), and a task on the proxy's own loop joins
and sends the bytes: OTLP/HTTP with aiohttp, OTLP/gRPC with grpc.aio.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gzip
import logging
import random
import ssl
import threading
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol
from urllib.parse import unquote, urlsplit

import aiohttp
from opentelemetry.context import Context
from opentelemetry.sdk.trace import SpanProcessor

from mes_trace_proxy import __version__
from mes_trace_proxy.otlp_encode import EncodableSpan, EncodedSpan, OtlpSpanEncoder, rejected_spans

__all__ = [
    "Attempt",
    "ExportStats",
    "GrpcTransport",
    "HttpTransport",
    "OtlpExportProcessor",
    "OtlpSettings",
    "Transport",
    "otlp_settings",
]

log = logging.getLogger("mes_trace_proxy.export")

#: The SDK's OTLP timeout when no variable sets one (seconds, the Python SDK's unit for it).
DEFAULT_TIMEOUT: Final = 10.0
DEFAULT_HTTP_ENDPOINT: Final = "http://localhost:4318/v1/traces"
DEFAULT_GRPC_ENDPOINT: Final = "http://localhost:4317"
GRPC_METHOD: Final = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
#: OTLP/HTTP §Failures: only these statuses may succeed when sent again.
RETRYABLE_HTTP: Final = frozenset({429, 502, 503, 504})
#: OTLP/gRPC §Failures: the retryable status codes, by name (grpc is imported lazily).
RETRYABLE_GRPC: Final = frozenset(
    {
        "CANCELLED",
        "DEADLINE_EXCEEDED",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNAVAILABLE",
        "DATA_LOSS",
        "RESOURCE_EXHAUSTED",
    }
)
#: First back-off between attempts; doubled each time, with ±50 % jitter so replicas that
#: lost the collector together do not come back in step. Half a second lets a restarting
#: collector come up without the queue filling at the proxy's usual span rate.
FIRST_BACKOFF: Final = 0.5
#: gzip level 6 (zlib's default): most of level 9's ratio for a fraction of its CPU, which is
#: paid on the event loop.
GZIP_LEVEL: Final = 6
#: Exports in flight at once. One would do on an idle loop, but under load every reply waits
#: its turn on the loop behind the requests: at 64 connections, one export at a time could not
#: keep up with about 3,400 spans/s over gRPC and the queue overflowed (docs/performance.md).
#: Four keep the queue short without flooding a collector that is struggling already.
MAX_IN_FLIGHT: Final = 4
#: One connection to the collector per export in flight.
HTTP_POOL: Final = MAX_IN_FLIGHT
#: While the collector keeps failing, one warning per this many seconds instead of per batch.
FAILURE_LOG_INTERVAL: Final = 60.0

_COMPRESSIONS: Final = ("none", "gzip", "deflate")
_PROXY_VARIABLES: Final = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


@dataclass(slots=True)
class ExportStats:
    """Counters of the export path, read by ``/metrics``."""

    queued: int = 0
    exported: int = 0
    dropped_queue_full: int = 0
    failed: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class OtlpSettings:
    """The exporter's ``OTEL_EXPORTER_OTLP_*`` settings, read and checked once at start-up."""

    protocol: str
    endpoint: str
    headers: tuple[tuple[str, str], ...] = ()
    compression: str = "none"
    timeout: float = DEFAULT_TIMEOUT
    certificate: str | None = None
    client_key: str | None = None
    client_certificate: str | None = None
    #: gRPC only: plaintext instead of TLS
    insecure: bool = False
    #: OTLP/HTTP only: honour http(s)_proxy, as requests did (off unless one is set)
    trust_env: bool = False


def _variable(environ: Mapping[str, str], suffix: str) -> tuple[str, str] | None:
    """The traces-specific variable if set, else the generic one, with the name that gave it."""
    for name in (f"OTEL_EXPORTER_OTLP_TRACES_{suffix}", f"OTEL_EXPORTER_OTLP_{suffix}"):
        value = environ.get(name, "").strip()
        if value:
            return name, value
    return None


def _headers(name: str, raw: str) -> tuple[tuple[str, str], ...]:
    """``key=value,key2=value2`` with percent-encoded values (the W3C Baggage format the spec names).

    Raises:
        ValueError: a pair without ``=`` or with an empty key, naming the variable.
    """
    out = []
    for pair in raw.split(","):
        if not pair.strip():
            continue
        key, sep, value = pair.partition("=")
        key = unquote(key).strip().lower()
        if not sep or not key or any(c in key for c in " \t\r\n:"):
            raise ValueError(f"{name}: {pair.strip()!r} is not a key=value pair")
        out.append((key, unquote(value).strip()))
    return tuple(out)


def otlp_settings(environ: Mapping[str, str], protocol: str) -> OtlpSettings:
    """Read the OTLP exporter variables as the specification and the Python SDK define them.

    ``OTEL_EXPORTER_OTLP_TRACES_*`` wins over ``OTEL_EXPORTER_OTLP_*``; the generic endpoint
    gets ``/v1/traces`` appended for OTLP/HTTP, the signal-specific one is used as given.

    Args:
        environ: the environment to read.
        protocol: ``http/protobuf`` or ``grpc``.

    Returns:
        The checked settings.

    Raises:
        ValueError: a value the exporter cannot use, naming its variable.
    """
    if protocol not in ("http/protobuf", "grpc"):
        raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: use grpc or http/protobuf")
    traces = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
    generic = environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    if protocol == "http/protobuf":
        endpoint = traces or (generic.rstrip("/") + "/v1/traces" if generic else DEFAULT_HTTP_ENDPOINT)
        source = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT" if traces else "OTEL_EXPORTER_OTLP_ENDPOINT"
        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{source}={endpoint!r}: OTLP/HTTP needs an http:// or https:// URL")
    else:
        endpoint = traces or generic or DEFAULT_GRPC_ENDPOINT
    found = _variable(environ, "HEADERS")
    headers = _headers(*found) if found else ()
    compression = "none"
    found = _variable(environ, "COMPRESSION")
    if found:
        name, compression = found[0], found[1].lower()
        if compression not in _COMPRESSIONS or (protocol == "grpc" and compression == "deflate"):
            allowed = "none or gzip" if protocol == "grpc" else ", ".join(_COMPRESSIONS)
            raise ValueError(f"{name}={found[1]!r}: use {allowed}")
    timeout = DEFAULT_TIMEOUT
    found = _variable(environ, "TIMEOUT")
    if found:
        try:
            timeout = float(found[1])
        except ValueError:
            raise ValueError(f"{found[0]}={found[1]!r} is not a number of seconds") from None
        if not timeout > 0:
            raise ValueError(f"{found[0]}={found[1]!r} must be positive")
    files = {}
    for suffix in ("CERTIFICATE", "CLIENT_KEY", "CLIENT_CERTIFICATE"):
        found = _variable(environ, suffix)
        files[suffix] = found[1] if found else None
    if (files["CLIENT_KEY"] is None) != (files["CLIENT_CERTIFICATE"] is None):
        raise ValueError(
            "OTEL_EXPORTER_OTLP_CLIENT_KEY and OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE go together: set both"
        )
    found = _variable(environ, "INSECURE")
    insecure_raw = found[1].lower() if found else ""
    scheme = urlsplit(endpoint).scheme if "://" in endpoint else ""
    # The gRPC exporter's rule: the scheme decides when there is one, the variable otherwise.
    insecure = scheme == "http" or (scheme == "" and insecure_raw == "true")
    return OtlpSettings(
        protocol=protocol,
        endpoint=endpoint,
        headers=headers,
        compression=compression,
        timeout=timeout,
        certificate=files["CERTIFICATE"],
        client_key=files["CLIENT_KEY"],
        client_certificate=files["CLIENT_CERTIFICATE"],
        insecure=insecure,
        trust_env=any(environ.get(n) or environ.get(n.upper()) for n in _PROXY_VARIABLES),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class Attempt:
    """What one send of one request came to."""

    ok: bool
    #: a failure the specification says may succeed when sent again
    retryable: bool = False
    #: spans the collector said it dropped although it answered success (partial success)
    rejected: int = 0
    #: the collector's own wait (HTTP ``Retry-After``), seconds
    retry_after: float | None = None
    #: for the log: an exception name, an HTTP status or a gRPC code; never request data
    reason: str = ""


class Transport(Protocol):
    """Sends one encoded ``ExportTraceServiceRequest``; one call at a time."""

    async def send(self, body: bytes, budget: float) -> Attempt:
        """Send ``body`` once, within ``budget`` seconds; never raise for a collector's failure."""

    async def aclose(self) -> None:
        """Release connections and threads."""


def _client_ssl(settings: OtlpSettings) -> ssl.SSLContext | None:
    """A TLS context with the configured CA and client pair, or None for the system defaults.

    Raises:
        ValueError: a certificate or key file cannot be read, naming the variable.
    """
    if settings.certificate is None and settings.client_certificate is None:
        return None
    try:
        context = ssl.create_default_context(cafile=settings.certificate)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"OTEL_EXPORTER_OTLP_CERTIFICATE={settings.certificate!r}: {exc}") from None
    if settings.client_certificate is not None:
        try:
            context.load_cert_chain(settings.client_certificate, settings.client_key)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(
                f"OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE / _CLIENT_KEY={settings.client_certificate!r}: {exc}"
            ) from None
    return context


def _retry_after(value: str | None) -> float | None:
    """``Retry-After`` in seconds; the HTTP-date form is rare from collectors and ignored."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if seconds >= 0 else None


class HttpTransport:
    """OTLP/HTTP with protobuf bodies, sent by aiohttp on the proxy's own event loop."""

    def __init__(self, settings: OtlpSettings) -> None:
        """Check the TLS files now (so a bad one stops start-up); connect on the first send.

        Raises:
            ValueError: a certificate or key file is unusable.
        """
        self._url = settings.endpoint
        self._ssl = _client_ssl(settings)
        self._trust_env = settings.trust_env
        headers = {
            "Content-Type": "application/x-protobuf",
            "User-Agent": f"mes-trace-proxy/{__version__}",
        }
        headers.update(settings.headers)
        self._compress: Callable[[bytes], bytes] | None = None
        if settings.compression == "gzip":
            headers["Content-Encoding"] = "gzip"
            self._compress = _gzip
        elif settings.compression == "deflate":
            headers["Content-Encoding"] = "deflate"
            self._compress = zlib.compress
        self._headers = headers
        self._session: aiohttp.ClientSession | None = None

    async def send(self, body: bytes, budget: float) -> Attempt:
        """POST the request; 2xx is success, with the partial-success count read from the answer."""
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=HTTP_POOL, ssl=self._ssl if self._ssl else True),
                trust_env=self._trust_env,
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        data = self._compress(body) if self._compress is not None else body
        try:
            async with self._session.post(
                self._url,
                data=data,
                headers=self._headers,
                timeout=aiohttp.ClientTimeout(total=budget),
                allow_redirects=False,
            ) as response:
                answer = await response.read()
                status = response.status
                retry_after = response.headers.get("Retry-After")
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return Attempt(ok=False, retryable=True, reason=type(exc).__name__)
        if 200 <= status < 300:
            rejected, message = rejected_spans(answer)
            return Attempt(ok=True, rejected=rejected, reason=message)
        return Attempt(
            ok=False,
            retryable=status in RETRYABLE_HTTP,
            retry_after=_retry_after(retry_after),
            reason=f"HTTP {status}",
        )

    async def aclose(self) -> None:
        """Close the collector connections."""
        if self._session is not None:
            await self._session.close()


def _gzip(body: bytes) -> bytes:
    return gzip.compress(body, compresslevel=GZIP_LEVEL)


class GrpcTransport:
    """OTLP/gRPC through ``grpc.aio`` on the proxy's own event loop.

    The request is already protobuf bytes, so the call has no serializer; grpc's C core does
    the HTTP/2 work. A blocking stub in a thread was tried first: under load that thread waited
    for the GIL after every step and the queue overflowed (docs/performance.md).
    """

    def __init__(self, settings: OtlpSettings) -> None:
        """Read the TLS files now (so a bad one stops start-up); open the channel on the first send.

        Raises:
            ValueError: a certificate or key file is unusable.
        """
        import grpc

        self._grpc: Any = grpc
        target = settings.endpoint
        if "://" in target:
            target = urlsplit(target).netloc
        self._target = target
        self._options: list[tuple[str, Any]] = [("grpc.primary_user_agent", f"mes-trace-proxy/{__version__}")]
        self._compression = grpc.Compression.Gzip if settings.compression == "gzip" else None
        self._credentials: Any = None
        if not settings.insecure:
            self._credentials = grpc.ssl_channel_credentials(
                root_certificates=_read(settings.certificate, "OTEL_EXPORTER_OTLP_CERTIFICATE"),
                private_key=_read(settings.client_key, "OTEL_EXPORTER_OTLP_CLIENT_KEY"),
                certificate_chain=_read(settings.client_certificate, "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE"),
            )
        self._metadata = settings.headers
        self._channel: Any = None
        self._call: Any = None

    def _open(self) -> None:
        aio = self._grpc.aio
        if self._credentials is None:
            self._channel = aio.insecure_channel(
                self._target, options=self._options, compression=self._compression
            )
        else:
            self._channel = aio.secure_channel(
                self._target, self._credentials, options=self._options, compression=self._compression
            )
        # No serializers: the request is already protobuf bytes and the reply is read as bytes.
        self._call = self._channel.unary_unary(GRPC_METHOD)

    async def send(self, body: bytes, budget: float) -> Attempt:
        """One unary Export call."""
        if self._call is None:
            self._open()
        try:
            reply = await self._call(body, timeout=budget, metadata=self._metadata or None)
        except self._grpc.aio.AioRpcError as exc:
            code = exc.code()
            name = getattr(code, "name", str(code))
            return Attempt(ok=False, retryable=name in RETRYABLE_GRPC, reason=f"gRPC {name}")
        rejected, message = rejected_spans(reply if isinstance(reply, bytes) else b"")
        return Attempt(ok=True, rejected=rejected, reason=message)

    async def aclose(self) -> None:
        """Close the channel."""
        if self._channel is not None:
            await self._channel.close()


def _read(path: str | None, variable: str) -> bytes | None:
    if path is None:
        return None
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as exc:
        raise ValueError(f"{variable}={path!r}: {exc.strerror}") from None


def make_transport(settings: OtlpSettings) -> Transport:
    """The transport for ``settings.protocol``.

    Raises:
        ValueError: a certificate or key file is unusable.
    """
    return GrpcTransport(settings) if settings.protocol == "grpc" else HttpTransport(settings)


class SpanEncoder(Protocol):
    """What the processor needs of an encoder: :class:`OtlpSpanEncoder`, or a test's stand-in."""

    # mypyc: a Protocol, so an interpreted stand-in passes (native.py, constraint 2).

    def encode_span(self, span: EncodableSpan) -> EncodedSpan:
        """One finished span, encoded."""
        ...

    def assemble(self, spans: Sequence[EncodedSpan]) -> bytes:
        """An export request of encoded spans."""
        ...


class OtlpExportProcessor(SpanProcessor):
    """Encodes each sampled span as it ends and exports batches from a task on the event loop.

    Bounded like the SDK's batch processor (``OTEL_BSP_*``): a queue of encoded spans, batches
    by size or delay, up to ``MAX_IN_FLIGHT`` exports at once. Every span is counted once as exported, dropped
    (queue full) or failed (the collector refused it, or it could not be sent before its
    deadline or before shutdown ended). :meth:`start` binds it to the running loop; spans
    that end before that wait in the queue.
    """

    def __init__(
        self,
        transport: Transport,
        *,
        max_queue_size: int,
        max_batch: int,
        delay_seconds: float,
        export_timeout_seconds: float,
        send_timeout_seconds: float = DEFAULT_TIMEOUT,
        encoder: SpanEncoder | None = None,
    ) -> None:
        self._transport = transport
        self._encoder = encoder or OtlpSpanEncoder()
        self._queue: collections.deque[EncodedSpan] = collections.deque()
        self._max_queue = max_queue_size
        self._max_batch = max_batch
        self._delay = delay_seconds
        self._shutdown_budget = export_timeout_seconds
        self._send_timeout = send_timeout_seconds
        self.stats = ExportStats()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._flush_task: asyncio.Task[None] | None = None
        self._slots = asyncio.Semaphore(MAX_IN_FLIGHT)
        #: exports in flight and the spans each carries (counted as failed if shutdown cancels it)
        self._in_flight: dict[asyncio.Task[None], int] = {}
        self._stopping = False
        self._closed = False
        self._failing_since: float | None = None
        self._last_warning = 0.0

    # ── SpanProcessor, called wherever a span ends ─────────────────────────────────────────

    def on_start(self, span: object, parent_context: Context | None = None) -> None:
        """Nothing to do at start."""

    def on_end(self, span: EncodableSpan) -> None:
        """Encode a finished sampled span into the queue; count it as dropped when the queue is full.

        Any span the encoder can read will do: the SDK's ``ReadableSpan``, or the proxy's lean
        ``spans.ProxySpan``, which ``SpanFactory`` hands over directly.
        """
        context = span.context
        if context is None or not context.trace_flags.sampled:
            return
        queue = self._queue
        if len(queue) >= self._max_queue or self._closed:
            self.stats.dropped_queue_full += 1
            return
        try:
            encoded = self._encoder.encode_span(span)
        except Exception:
            # A span the encoder cannot read is lost, counted and logged, never raised into
            # the request that ended it.
            log.exception("encoding a span failed; it is not exported")
            self.stats.failed += 1
            return
        queue.append(encoded)
        self.stats.queued += 1
        if len(queue) >= self._max_batch:
            self._notify()

    def _notify(self) -> None:
        wake = self._wake
        if wake is None or wake.is_set():
            return
        if threading.get_ident() == self._loop_thread:
            wake.set()
        elif self._loop is not None:
            # A closed loop raises RuntimeError; the queue is then reported at shutdown.
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(wake.set)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Export what is queued; from another thread, wait for it up to ``timeout_millis``.

        On the loop's own thread nothing can be waited for: the flush is scheduled and the
        answer is whether the queue was already empty. Use :meth:`flush` there.
        """
        loop = self._loop
        if loop is None or loop.is_closed() or not loop.is_running():
            return not self._queue
        if threading.get_ident() == self._loop_thread:
            self._flush_task = loop.create_task(self.flush())
            return not self._queue
        future = asyncio.run_coroutine_threadsafe(self.flush(), loop)
        try:
            future.result(timeout_millis / 1000)
        except TimeoutError:
            return False
        return not self._queue

    def shutdown(self) -> None:
        """Flush and stop, as the SDK's provider asks; :meth:`aclose` is the loop-side form."""
        loop = self._loop
        if self._closed:
            return
        if loop is not None and loop.is_running() and threading.get_ident() != self._loop_thread:
            future = asyncio.run_coroutine_threadsafe(self.aclose(), loop)
            try:
                future.result(self._shutdown_budget + 1)
            except TimeoutError:
                log.error("span export did not finish within OTEL_BSP_EXPORT_TIMEOUT")
            return
        self._close_unstarted()

    # ── the loop side ──────────────────────────────────────────────────────────────────────

    def start(self) -> None:
        """Start the export task on the running loop (call from inside it, once)."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._loop_thread = threading.get_ident()
        self._wake = asyncio.Event()
        self._task = loop.create_task(self._run(), name="otlp-export")
        if len(self._queue) >= self._max_batch:
            self._wake.set()

    async def flush(self) -> None:
        """Export everything queued now and wait until every export in flight has finished."""
        await self._drain()
        while self._in_flight:
            await asyncio.wait(set(self._in_flight))

    async def _drain(self) -> None:
        """Start exports for everything queued, full batches first and then the rest."""
        while self._queue:
            await self._start_batch()

    async def aclose(self) -> None:
        """Export what is queued within ``OTEL_BSP_EXPORT_TIMEOUT``, count the rest as failed, close."""
        if self._closed:
            return
        self._stopping = True
        task = self._task
        if task is None:
            self._close_unstarted()
            return
        assert self._wake is not None
        self._wake.set()
        try:
            await asyncio.wait_for(asyncio.shield(task), self._shutdown_budget)
        except TimeoutError:
            cancelled = dict(self._in_flight)
            for running in (task, *cancelled):
                running.cancel()
            await asyncio.gather(task, *cancelled, return_exceptions=True)
            # The exports cut short never counted their spans; some never even started.
            self.stats.failed += sum(count for export, count in cancelled.items() if export.cancelled())
            log.error(
                "span export did not finish within OTEL_BSP_EXPORT_TIMEOUT (%.1f s)", self._shutdown_budget
            )
        self._closed = True
        lost = len(self._queue)
        if lost:
            self.stats.failed += lost
            self._queue.clear()
            log.error("%d spans were not exported before shutdown", lost)
        await self._transport.aclose()

    def _close_unstarted(self) -> None:
        self._closed = True
        lost = len(self._queue)
        if lost:
            self.stats.failed += lost
            self._queue.clear()
            log.error("%d spans were never exported: the export task was not started", lost)

    async def _run(self) -> None:
        assert self._wake is not None
        wake = self._wake
        while True:
            timed_out = False
            try:
                await asyncio.wait_for(wake.wait(), self._delay)
            except TimeoutError:
                timed_out = True
            wake.clear()
            if self._stopping:
                await self.flush()
                if not self._queue:
                    return
            elif timed_out:
                await self._drain()
            else:
                # Woken by a full batch: send full batches and let the rest wait its delay.
                while len(self._queue) >= self._max_batch:
                    await self._start_batch()

    async def _start_batch(self) -> None:
        """Take one batch off the queue and send it in a task of its own, once a slot is free."""
        await self._slots.acquire()
        queue = self._queue
        count = min(len(queue), self._max_batch)
        if not count:
            self._slots.release()
            return
        batch = [queue.popleft() for _ in range(count)]
        try:
            body = self._encoder.assemble(batch)
        except Exception:
            log.exception("assembling an export request failed; %d spans lost", count)
            self.stats.failed += count
            self._slots.release()
            return
        task = asyncio.get_running_loop().create_task(self._send_batch(body, count))
        self._in_flight[task] = count
        task.add_done_callback(self._export_done)

    def _export_done(self, task: asyncio.Task[None]) -> None:
        self._in_flight.pop(task, None)

    async def _send_batch(self, body: bytes, count: int) -> None:
        try:
            await self._send(body, count)
        finally:
            self._slots.release()

    async def _send(self, body: bytes, count: int) -> None:
        """Send one request, retrying what may succeed later until its deadline."""
        deadline = time.monotonic() + self._send_timeout
        backoff = FIRST_BACKOFF
        while True:
            remaining = deadline - time.monotonic()
            attempt = await self._transport.send(body, max(remaining, 0.001))
            if attempt.ok:
                self.stats.exported += count - attempt.rejected
                self.stats.failed += attempt.rejected
                if attempt.rejected:
                    log.warning(
                        "collector rejected %d of %d spans: %s", attempt.rejected, count, attempt.reason[:200]
                    )
                self._recovered()
                return
            wait = attempt.retry_after
            if wait is None:
                wait = backoff * random.uniform(0.5, 1.5)  # noqa: S311 - jitter, not a secret
            backoff *= 2
            # Retries go on during shutdown too: aclose bounds them by OTEL_BSP_EXPORT_TIMEOUT.
            if not attempt.retryable or time.monotonic() + wait >= deadline:
                self.stats.failed += count
                self._failed(attempt.reason, count)
                return
            await asyncio.sleep(wait)

    def _failed(self, reason: str, count: int) -> None:
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
        if now - self._last_warning >= FAILURE_LOG_INTERVAL:
            self._last_warning = now
            log.warning(
                "span export failed (%s); %d spans lost, %d lost in all so far",
                reason,
                count,
                self.stats.failed,
            )

    def _recovered(self) -> None:
        if self._failing_since is not None:
            log.warning("span export works again after %.0f s", time.monotonic() - self._failing_since)
            self._failing_since = None
            self._last_warning = 0.0
