"""A real OTLP trace receiver (HTTP/protobuf and gRPC) that decodes spans into frozen values.

Shaped like OpenTelemetry's `OtlpProtoTestServer`, plus gRPC, fault modes and waiting without sleeps;
used by the tests, by `make demo` (JSON lines) and by the benchmark (counting only).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import signal
import sys
import zlib
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import AsyncExitStack, suppress
from dataclasses import dataclass, field, fields
from http import HTTPStatus
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, Literal, Self, TextIO, get_args

import grpc
from aiohttp import hdrs, web

# Neither google.protobuf (types-protobuf) nor googleapis-common-protos (no py.typed) is typed here.
from google.protobuf.message import DecodeError  # type: ignore[import-untyped]
from google.rpc import code_pb2, status_pb2  # type: ignore[import-untyped]
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

SinkMode = Literal["ok", "error", "blackhole", "slow"]
Transport = Literal["http", "grpc"]

TRACES_PATH: Final = "/v1/traces"
PROTOBUF: Final = "application/x-protobuf"

# The OpenTelemetry Collector's confighttp default (defaultMaxRequestBodySize = 20 MiB), applied to
# the body as sent and again after decompression so a small gzip bomb cannot blow up memory.
MAX_BODY_BYTES: Final = 20 * 1024 * 1024
# In-flight exports get this long to finish when the sink closes; blackholed and slow ones are
# released before the grace starts, so a clean close takes milliseconds and a stuck one 1 s at most.
SHUTDOWN_GRACE_SECONDS: Final = 1.0
# Enough distinct names to recognise what did arrive without flooding a test failure message.
NAMES_IN_TIMEOUT_MESSAGE: Final = 20
# The IANA-registered OTLP ports, so an exporter left on its defaults finds the CLI sink.
DEFAULT_HTTP_PORT: Final = 4318
DEFAULT_GRPC_PORT: Final = 4317

_MODES: Final[frozenset[str]] = frozenset(get_args(SinkMode))
_UNAVAILABLE_MESSAGE: Final = "otlp sink is in fault mode"
_CLOSING_MESSAGE: Final = "otlp sink is closing"


@dataclass(frozen=True, slots=True, kw_only=True)
class ReceivedEvent:
    """A span event as received: name, time and typed attributes."""

    name: str
    time_ns: int
    attributes: Mapping[str, object] = field(hash=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class ReceivedLink:
    """A span link as received: the linked context (hex ids) and typed attributes."""

    trace_id: str
    span_id: str
    attributes: Mapping[str, object] = field(hash=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class ReceivedSpan:
    """One decoded span, with attribute values in the type the exporter sent.

    Strings, ints, floats and bools stay themselves, arrays become tuples, nested key/value lists
    become read-only mappings and bytes stay bytes; ids are lowercase hex ("" for no parent).
    """

    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: str
    start_ns: int
    end_ns: int
    attributes: Mapping[str, object] = field(hash=False)
    events: tuple[ReceivedEvent, ...]
    links: tuple[ReceivedLink, ...]
    status_code: str
    status_message: str
    resource: Mapping[str, object] = field(hash=False)
    scope_name: str
    transport: Transport
    #: the span's W3C tracestate as exported ("" for none)
    trace_state: str = ""

    def to_json_dict(self) -> dict[str, object]:
        """Return the span as JSON-ready data: field names as keys, tuples as lists, bytes as hex.

        Returns:
            A dict that `json.dumps` accepts as is.
        """
        return _fields_as_json(self)


def _fields_as_json(value: ReceivedSpan | ReceivedEvent | ReceivedLink) -> dict[str, object]:
    return {f.name: _jsonable(getattr(value, f.name)) for f in fields(value)}


def _jsonable(value: object) -> object:
    if isinstance(value, ReceivedEvent | ReceivedLink):
        return _fields_as_json(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, bytes):
        return value.hex()
    return value


# ── protobuf → values ──────────────────────────────────────────────────────────────────────────
# Enum names come from the generated descriptors once, so a new kind or code needs no edit here.
_SPAN_KINDS: Final[Mapping[int, str]] = MappingProxyType(
    {number: name.removeprefix("SPAN_KIND_") for name, number in Span.SpanKind.items()}
)
_STATUS_CODES: Final[Mapping[int, str]] = MappingProxyType(
    {number: name.removeprefix("STATUS_CODE_") for name, number in Status.StatusCode.items()}
)


def _decode_array(value: AnyValue) -> object:
    return tuple(_decode_any(item) for item in value.array_value.values)


def _decode_kvlist(value: AnyValue) -> object:
    return _decode_attributes(value.kvlist_value.values)


# One entry per member of the AnyValue `value` oneof (opentelemetry/proto/common/v1/common.proto).
_ANY_VALUE_DECODERS: Final[Mapping[str, Callable[[AnyValue], object]]] = MappingProxyType(
    {
        "string_value": lambda v: v.string_value,
        "bool_value": lambda v: v.bool_value,
        "int_value": lambda v: v.int_value,
        "double_value": lambda v: v.double_value,
        "bytes_value": lambda v: v.bytes_value,
        "array_value": _decode_array,
        "kvlist_value": _decode_kvlist,
    }
)


def _decode_any(value: AnyValue) -> object:
    member = value.WhichOneof("value")
    # An AnyValue with no member set is the protocol's null.
    return None if member is None else _ANY_VALUE_DECODERS[member](value)


def _decode_attributes(pairs: Sequence[KeyValue]) -> Mapping[str, object]:
    return MappingProxyType({pair.key: _decode_any(pair.value) for pair in pairs})


def _enum_name(table: Mapping[int, str], number: int) -> str:
    return table.get(number, f"UNKNOWN({number})")


def decode_request(request: ExportTraceServiceRequest, transport: Transport) -> Iterator[ReceivedSpan]:
    """Decode every span of one export request, in the order the request holds them.

    Args:
        request: the parsed `ExportTraceServiceRequest`.
        transport: which receiver it came in on, recorded on each span.

    Returns:
        An iterator of `ReceivedSpan`.
    """
    for resource_spans in request.resource_spans:
        resource = _decode_attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            scope_name = scope_spans.scope.name
            for span in scope_spans.spans:
                yield ReceivedSpan(
                    name=span.name,
                    trace_id=span.trace_id.hex(),
                    span_id=span.span_id.hex(),
                    parent_span_id=span.parent_span_id.hex(),
                    kind=_enum_name(_SPAN_KINDS, span.kind),
                    start_ns=span.start_time_unix_nano,
                    end_ns=span.end_time_unix_nano,
                    attributes=_decode_attributes(span.attributes),
                    events=tuple(
                        ReceivedEvent(
                            name=event.name,
                            time_ns=event.time_unix_nano,
                            attributes=_decode_attributes(event.attributes),
                        )
                        for event in span.events
                    ),
                    links=tuple(
                        ReceivedLink(
                            trace_id=link.trace_id.hex(),
                            span_id=link.span_id.hex(),
                            attributes=_decode_attributes(link.attributes),
                        )
                        for link in span.links
                    ),
                    status_code=_enum_name(_STATUS_CODES, span.status.code),
                    status_message=span.status.message,
                    resource=resource,
                    scope_name=scope_name,
                    transport=transport,
                    trace_state=span.trace_state,
                )


def _count_spans(request: ExportTraceServiceRequest) -> int:
    return sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)


# ── HTTP body decoding ─────────────────────────────────────────────────────────────────────────
class _BodyTooLarge(Exception):
    """The decompressed body passed MAX_BODY_BYTES."""


def _identity(body: bytes) -> bytes:
    return body


def _inflate(body: bytes, *, wbits: int) -> bytes:
    """Decompress a zlib-family body, refusing output past MAX_BODY_BYTES.

    gzip allows several members back to back (RFC 1952 section 2.2), hence the loop.
    """
    out = bytearray()
    pending = body
    while True:
        inflater = zlib.decompressobj(wbits)
        out += inflater.decompress(pending, MAX_BODY_BYTES + 1 - len(out))
        if len(out) > MAX_BODY_BYTES:
            raise _BodyTooLarge
        if not inflater.eof:
            raise zlib.error("compressed body is truncated")
        pending = inflater.unused_data
        if not pending:
            return bytes(out)


# RFC 9110 section 8.4.1 codings the OTLP exporters send; "deflate" is the zlib format (RFC 1950),
# as zlib.compress writes it. wbits 16+15 selects the gzip wrapper.
_CONTENT_DECODERS: Final[Mapping[str, Callable[[bytes], bytes]]] = MappingProxyType(
    {
        "identity": _identity,
        "gzip": functools.partial(_inflate, wbits=16 + zlib.MAX_WBITS),
        "deflate": functools.partial(_inflate, wbits=zlib.MAX_WBITS),
    }
)

# OTLP/HTTP: a 4xx/5xx body is a protobuf google.rpc.Status; the code mirrors the HTTP answer.
_RPC_CODES: Final[Mapping[HTTPStatus, int]] = MappingProxyType(
    {
        HTTPStatus.BAD_REQUEST: code_pb2.INVALID_ARGUMENT,
        HTTPStatus.REQUEST_ENTITY_TOO_LARGE: code_pb2.RESOURCE_EXHAUSTED,
        HTTPStatus.UNSUPPORTED_MEDIA_TYPE: code_pb2.INVALID_ARGUMENT,
        HTTPStatus.SERVICE_UNAVAILABLE: code_pb2.UNAVAILABLE,
    }
)


def _http_failure(status: HTTPStatus, message: str) -> web.Response:
    body = status_pb2.Status(code=_RPC_CODES[status], message=message).SerializeToString()
    return web.Response(status=status, body=body, content_type=PROTOBUF)


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    """gRPC servicer that hands every Export call to the sink."""

    def __init__(self, export: Callable[[ExportTraceServiceRequest, Any], Awaitable[object]]) -> None:
        self._export = export

    async def Export(self, request: ExportTraceServiceRequest, context: Any) -> object:
        return await self._export(request, context)


class OtlpSink:
    """OTLP/HTTP and OTLP/gRPC trace receiver on loopback ports, for tests, the demo and the bench.

    Use as `async with OtlpSink() as sink:`; point an exporter at `sink.http_endpoint` or
    `sink.grpc_endpoint`, then `await sink.wait_for_spans(n)`. Both receivers run on the caller's
    event loop, so flush a blocking exporter off the loop: `await asyncio.to_thread(provider.shutdown)`.

    `mode` may change at any time and applies to requests that arrive afterwards: "ok" accepts,
    "error" answers HTTP 503 / gRPC UNAVAILABLE, "blackhole" never answers until the sink closes,
    "slow" waits `delay_seconds` and then accepts. Rejected requests count in `requests_received`
    but their spans are neither kept nor counted.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        http: bool = True,
        grpc: bool = True,
        http_port: int = 0,
        grpc_port: int = 0,
        jsonl_path: Path | None = None,
        keep: bool = True,
        mode: SinkMode = "ok",
        # Long enough to outlast a test exporter's short timeout, short enough not to drag a demo.
        delay_seconds: float = 1.0,
    ) -> None:
        """Configure the sink; nothing binds until `start()`.

        Args:
            host: address both receivers bind to.
            http: run the OTLP/HTTP receiver.
            grpc: run the OTLP/gRPC receiver.
            http_port: HTTP port; 0 lets the OS choose (read it back from `http_endpoint`).
            grpc_port: gRPC port; 0 lets the OS choose (read it back from `grpc_endpoint`).
            jsonl_path: when set, append one JSON object per accepted span, flushed per request.
            keep: keep decoded spans in memory; False only counts them (the benchmark).
            mode: initial fault mode.
            delay_seconds: how long "slow" mode holds each request.

        Raises:
            ValueError: for an unknown mode or no receiver at all.
        """
        if not (http or grpc):
            raise ValueError("OtlpSink needs at least one of http or grpc")
        self._host = host
        self._serve_http = http
        self._serve_grpc = grpc
        self._http_port_wanted = http_port
        self._grpc_port_wanted = grpc_port
        self._jsonl_path = jsonl_path
        self._keep = keep
        self.mode = mode
        self.delay_seconds = delay_seconds
        self._admission: Final[Mapping[str, Callable[[], Awaitable[bool]]]] = MappingProxyType(
            {
                "ok": self._admit_ok,
                "error": self._admit_error,
                "blackhole": self._admit_blackhole,
                "slow": self._admit_slow,
            }
        )
        self._spans: list[ReceivedSpan] = []
        self._requests_received = 0
        self._spans_received = 0
        self._changed = asyncio.Condition()
        self._closing = asyncio.Event()
        self._jsonl: TextIO | None = None
        self._stack: AsyncExitStack | None = None
        self._http_port: int | None = None
        self._grpc_port: int | None = None

    # ── lifecycle ──────────────────────────────────────────────────────────────────────────────
    async def start(self) -> Self:
        """Bind the receivers and read their real ports back.

        Returns:
            The sink itself.

        Raises:
            RuntimeError: if already started, or gRPC cannot bind.
            OSError: if HTTP cannot bind.
        """
        if self._stack is not None:
            raise RuntimeError("OtlpSink already started")
        self._closing = asyncio.Event()
        stack = AsyncExitStack()
        self._stack = stack
        try:
            if self._jsonl_path is not None:
                self._jsonl = stack.enter_context(
                    await asyncio.to_thread(self._jsonl_path.open, "a", encoding="utf-8")
                )
            if self._serve_http:
                await self._start_http(stack)
            if self._serve_grpc:
                await self._start_grpc(stack)
            # Pushed last so it runs first: held requests answer before the servers drain.
            stack.callback(self._closing.set)
        except BaseException:
            await self.aclose()
            raise
        return self

    async def _start_http(self, stack: AsyncExitStack) -> None:
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.router.add_post(TRACES_PATH, self._handle_http)
        # auto_decompress=False: the handler decodes Content-Encoding itself, with a size cap.
        runner = web.AppRunner(
            app, access_log=None, auto_decompress=False, shutdown_timeout=SHUTDOWN_GRACE_SECONDS
        )
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        await web.TCPSite(runner, self._host, self._http_port_wanted).start()
        self._http_port = int(runner.addresses[0][1])

    async def _start_grpc(self, stack: AsyncExitStack) -> None:
        server = grpc.aio.server()
        stack.push_async_callback(server.stop, SHUTDOWN_GRACE_SECONDS)
        # The generated grpc module is untyped; this is its one registration helper.
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(  # type: ignore[no-untyped-call]
            _TraceService(self._export_grpc), server
        )
        port = int(server.add_insecure_port(f"{_url_host(self._host)}:{self._grpc_port_wanted}"))
        if port == 0:  # older grpcio reports a failed bind as port 0 instead of raising
            raise RuntimeError(f"gRPC could not bind {self._host}:{self._grpc_port_wanted}")
        await server.start()
        self._grpc_port = port

    async def aclose(self) -> None:
        """Release held requests, stop both receivers and close the JSON-lines file; idempotent."""
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.aclose()

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # ── addresses ──────────────────────────────────────────────────────────────────────────────
    @property
    def http_port(self) -> int:
        """The bound OTLP/HTTP port (RuntimeError before start or with http=False)."""
        return _bound(self._http_port, "http")

    @property
    def grpc_port(self) -> int:
        """The bound OTLP/gRPC port (RuntimeError before start or with grpc=False)."""
        return _bound(self._grpc_port, "grpc")

    @property
    def http_endpoint(self) -> str:
        """Full OTLP/HTTP traces URL, e.g. `http://127.0.0.1:43125/v1/traces`."""
        return f"http://{_url_host(self._host)}:{self.http_port}{TRACES_PATH}"

    @property
    def grpc_endpoint(self) -> str:
        """OTLP/gRPC target URL, e.g. `http://127.0.0.1:43127` (use insecure=True)."""
        return f"http://{_url_host(self._host)}:{self.grpc_port}"

    # ── fault mode ─────────────────────────────────────────────────────────────────────────────
    @property
    def mode(self) -> SinkMode:
        """How the next export request is answered: "ok", "error", "blackhole" or "slow"."""
        return self._mode

    @mode.setter
    def mode(self, value: SinkMode) -> None:
        if value not in _MODES:
            raise ValueError(f"unknown OtlpSink mode {value!r}; expected one of {sorted(_MODES)}")
        self._mode = value

    async def _admit_ok(self) -> bool:
        return True

    async def _admit_error(self) -> bool:
        return False

    async def _admit_blackhole(self) -> bool:
        await self._closing.wait()
        return False

    async def _admit_slow(self) -> bool:
        with suppress(TimeoutError):
            await asyncio.wait_for(self._closing.wait(), self.delay_seconds)
        return not self._closing.is_set()

    # ── results ────────────────────────────────────────────────────────────────────────────────
    @property
    def spans(self) -> tuple[ReceivedSpan, ...]:
        """Every kept span so far, in arrival order (always empty with keep=False)."""
        return tuple(self._spans)

    @property
    def requests_received(self) -> int:
        """Export requests that reached a receiver, whatever the answer."""
        return self._requests_received

    @property
    def spans_received(self) -> int:
        """Spans in accepted requests (counted even with keep=False)."""
        return self._spans_received

    def clear(self) -> None:
        """Forget kept spans and zero both counters, e.g. between phases of one test."""
        self._spans.clear()
        self._requests_received = 0
        self._spans_received = 0

    async def wait_for_spans(
        self,
        count: int,
        *,
        # The OTLP exporters' own default export timeout: one full export attempt fits inside.
        # ASYNC109: a test helper states its own bound; asyncio.timeout() around it would hide it.
        timeout: float = 10.0,  # noqa: ASYNC109
        predicate: Callable[[ReceivedSpan], bool] | None = None,
    ) -> list[ReceivedSpan]:
        """Wait until at least `count` kept spans match `predicate` (all spans when None).

        Args:
            count: how many matching spans to wait for.
            timeout: seconds to wait at most.
            predicate: which spans count; None counts every span.

        Returns:
            Every matching span received so far, in arrival order (may be more than `count`).

        Raises:
            TimeoutError: when fewer arrived in time; the message lists the span names seen.
            RuntimeError: with keep=False, where no span is kept (use `wait_for_count`).
        """
        if not self._keep:
            raise RuntimeError("OtlpSink(keep=False) keeps no spans; use wait_for_count()")

        def matching() -> list[ReceivedSpan]:
            return [s for s in self._spans if predicate is None or predicate(s)]

        async with self._changed:
            try:
                async with asyncio.timeout(timeout):
                    await self._changed.wait_for(lambda: len(matching()) >= count)
            except TimeoutError:
                raise TimeoutError(self._shortfall(count, len(matching()), timeout, predicate)) from None
            return matching()

    async def wait_for_count(self, count: int, *, timeout: float = 10.0) -> int:  # noqa: ASYNC109
        """Wait until `spans_received` reaches `count`; works with keep=False.

        Args:
            count: the span count to reach.
            timeout: seconds to wait at most (default: the OTLP exporters' export timeout).

        Returns:
            `spans_received` at that moment.

        Raises:
            TimeoutError: when the count is not reached in time.
        """
        return await self._wait_for_counter(lambda: self._spans_received, count, "span(s)", timeout)

    async def wait_for_requests(self, count: int, *, timeout: float = 10.0) -> int:  # noqa: ASYNC109
        """Wait until `requests_received` reaches `count`, whatever the answers were.

        Fault tests use it to know an export is being held before they act.

        Args:
            count: the request count to reach.
            timeout: seconds to wait at most (default: the OTLP exporters' export timeout).

        Returns:
            `requests_received` at that moment.

        Raises:
            TimeoutError: when the count is not reached in time.
        """
        return await self._wait_for_counter(lambda: self._requests_received, count, "request(s)", timeout)

    async def _wait_for_counter(self, read: Callable[[], int], count: int, what: str, limit: float) -> int:
        async with self._changed:
            try:
                async with asyncio.timeout(limit):
                    await self._changed.wait_for(lambda: read() >= count)
            except TimeoutError:
                raise TimeoutError(
                    f"waited {limit}s for {count} {what}; {self._spans_received} span(s) received "
                    f"in {self._requests_received} request(s), mode={self._mode!r}"
                ) from None
            return read()

    def _shortfall(
        self, count: int, matched: int, timeout: float, predicate: Callable[[ReceivedSpan], bool] | None
    ) -> str:
        names = Counter(s.name for s in self._spans).most_common(NAMES_IN_TIMEOUT_MESSAGE)
        seen = ", ".join(f"{name!r} x{n}" for name, n in names) or "none"
        which = " matching the predicate" if predicate is not None else ""
        return (
            f"waited {timeout}s for {count} span(s){which}; {matched} matched of {len(self._spans)} "
            f"received in {self._requests_received} request(s), mode={self._mode!r}; names seen: {seen}"
        )

    # ── receiving ──────────────────────────────────────────────────────────────────────────────
    async def _handle_http(self, request: web.Request) -> web.StreamResponse:
        await self._count_request()
        if request.content_type != PROTOBUF:
            return _http_failure(
                HTTPStatus.UNSUPPORTED_MEDIA_TYPE, f"content type {request.content_type!r}; want {PROTOBUF}"
            )
        coding = request.headers.get(hdrs.CONTENT_ENCODING, "identity").strip().lower()
        decode = _CONTENT_DECODERS.get(coding)
        if decode is None:
            return _http_failure(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, f"content encoding {coding!r}")
        body = await request.read()
        try:
            message = ExportTraceServiceRequest.FromString(decode(body))
        except _BodyTooLarge:
            return _http_failure(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body inflates past {MAX_BODY_BYTES}")
        except (zlib.error, DecodeError) as error:
            return _http_failure(HTTPStatus.BAD_REQUEST, f"undecodable body: {error}")
        if not await self._admission[self._mode]():
            reason = _CLOSING_MESSAGE if self._closing.is_set() else _UNAVAILABLE_MESSAGE
            return _http_failure(HTTPStatus.SERVICE_UNAVAILABLE, reason)
        await self._ingest(message, "http")
        return web.Response(body=ExportTraceServiceResponse().SerializeToString(), content_type=PROTOBUF)

    async def _export_grpc(self, request: ExportTraceServiceRequest, context: Any) -> object:
        await self._count_request()
        if not await self._admission[self._mode]():
            reason = _CLOSING_MESSAGE if self._closing.is_set() else _UNAVAILABLE_MESSAGE
            await context.abort(grpc.StatusCode.UNAVAILABLE, reason)  # raises; never returns
        await self._ingest(request, "grpc")
        return ExportTraceServiceResponse()

    async def _count_request(self) -> None:
        self._requests_received += 1
        async with self._changed:
            self._changed.notify_all()

    async def _ingest(self, request: ExportTraceServiceRequest, transport: Transport) -> None:
        if self._keep or self._jsonl is not None:
            spans = tuple(decode_request(request, transport))
            self._write_jsonl(spans)
            if self._keep:
                self._spans.extend(spans)
            self._spans_received += len(spans)
        else:
            self._spans_received += _count_spans(request)
        async with self._changed:
            self._changed.notify_all()

    def _write_jsonl(self, spans: Sequence[ReceivedSpan]) -> None:
        # Written on the loop on purpose: a local append of a few KB per request is cheaper than a
        # thread hop, and keeps lines in arrival order without a lock.
        if self._jsonl is None or not spans:
            return
        self._jsonl.write("".join(json.dumps(s.to_json_dict()) + "\n" for s in spans))
        self._jsonl.flush()


def _bound(port: int | None, receiver: str) -> int:
    if port is None:
        raise RuntimeError(f"the OTLP/{receiver} receiver is not running")
    return port


def _url_host(host: str) -> str:
    # RFC 3986 section 3.2.2: an IPv6 literal goes in brackets inside a URL or host:port.
    return f"[{host}]" if ":" in host else host


# ── command line ───────────────────────────────────────────────────────────────────────────────
def build_parser() -> argparse.ArgumentParser:
    """Build the `python -m mes_trace_proxy.sim.otlp_sink` argument parser.

    Returns:
        The parser.
    """
    parser = argparse.ArgumentParser(
        prog="python -m mes_trace_proxy.sim.otlp_sink",
        description="OTLP trace receiver; prints its endpoints as one JSON line once ready.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    parser.add_argument("--http-port", type=int, default=DEFAULT_HTTP_PORT, help="0 picks a free port")
    parser.add_argument("--grpc-port", type=int, default=DEFAULT_GRPC_PORT, help="0 picks a free port")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--jsonl", type=Path, help="append one JSON object per span to this file")
    output.add_argument(
        "--discard", action="store_true", help="only count spans (the default without --jsonl)"
    )
    parser.add_argument("--mode", choices=sorted(_MODES), default="ok", help="fault mode (default ok)")
    parser.add_argument("--delay-seconds", type=float, default=1.0, help="hold time for --mode slow")
    return parser


async def serve(args: argparse.Namespace) -> int:
    """Run the sink until SIGINT or SIGTERM; print the endpoints as one JSON line when ready.

    Args:
        args: parsed `build_parser()` arguments.

    Returns:
        The exit status: 0 after a signal, 1 when a port cannot be bound.
    """
    # The CLI keeps nothing in memory: nobody could read it, and a long demo would grow unbounded.
    sink = OtlpSink(
        host=args.host,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        jsonl_path=args.jsonl,
        keep=False,
        mode=args.mode,
        delay_seconds=args.delay_seconds,
    )
    try:
        await sink.start()
    except (OSError, RuntimeError) as error:
        print(json.dumps({"error": f"cannot bind: {error}"}), file=sys.stderr, flush=True)
        return 1
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGINT, signal.SIGTERM)
    for signum in signals:
        loop.add_signal_handler(signum, stop.set)
    try:
        ready = {
            "http_endpoint": sink.http_endpoint,
            "grpc_endpoint": sink.grpc_endpoint,
            "http_port": sink.http_port,
            "grpc_port": sink.grpc_port,
            "pid": os.getpid(),
        }
        print(json.dumps(ready), flush=True)
        await stop.wait()
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)
        await sink.aclose()
    summary = {"requests_received": sink.requests_received, "spans_received": sink.spans_received}
    print(json.dumps(summary), file=sys.stderr, flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments and run `serve`.

    Args:
        argv: arguments without the program name; None reads `sys.argv`.

    Returns:
        The exit status.
    """
    return asyncio.run(serve(build_parser().parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
