"""OTLP transports: one encoded export request sent once, over HTTP (aiohttp) or gRPC (grpc.aio).

Each ``send`` is one attempt, answered as an :class:`Attempt` (accepted, retryable, partially
rejected), never an exception for a collector's failure; retrying, back-off and counting are
the processor's (export.py). Up to :data:`MAX_IN_FLIGHT` sends run at once.
"""

from __future__ import annotations

import gzip
import ssl
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol
from urllib.parse import urlsplit

import aiohttp

from mes_trace_proxy import __version__
from mes_trace_proxy.otlp_settings import OtlpSettings
from mes_trace_proxy.otlp_wire import rejected_spans

__all__ = [
    "HTTP_POOL",
    "MAX_IN_FLIGHT",
    "Attempt",
    "GrpcTransport",
    "HttpTransport",
    "Transport",
    "make_transport",
]

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
    """Sends encoded ``ExportTraceServiceRequest``s, one per call, several calls at once.

    The processor keeps up to :data:`MAX_IN_FLIGHT` calls running together, so an
    implementation must take concurrent calls: ``HttpTransport`` has a pool of
    :data:`HTTP_POOL` connections, ``GrpcTransport`` multiplexes them on one channel.
    """

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
