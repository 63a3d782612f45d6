"""The request handler's state: what a listener decides once, and what one call learns on its way.

``ListenerState`` is built once per listener by ``app.build_proxy_server``. The handler's modes
are chosen there and held as objects, so no request tests them again:

* :class:`SpanMode` — exporting (the SDK makes the SERVER and CLIENT spans), pass-through
  (non-recording spans carry the trace on, nothing is built that nobody would see), or
  instrumented (``tracing.client_span: instrumentation``: the contrib's trace config on the
  session makes the CLIENT span).
* :class:`Propagation` — the default W3C pair, read and written by the handler itself, or any
  other ``OTEL_PROPAGATORS``, through the propagator; instrumented, the trace config injects.
* :class:`Forwarder` — the lean ``upstream.UpstreamPool`` (the default) or aiohttp's
  ``ClientSession``, which only ``tracing.client_span: instrumentation`` chooses (its hooks live
  there).

:class:`Call` is the one per-request object the steps of ``proxy.handle`` fill in.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from contextvars import Token
from dataclasses import dataclass
from typing import Final

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy
from opentelemetry import context as context_api
from opentelemetry import trace as trace_api
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import TextMapPropagator
from opentelemetry.trace import Link, SpanContext, SpanKind
from opentelemetry.util.types import AttributeValue
from yarl import URL

from mes_trace_proxy.core.config import ListenerConfig
from mes_trace_proxy.core.extract import NO_FACTS, OrderFacts
from mes_trace_proxy.core.forwarding import ForwardPolicy, HeaderList
from mes_trace_proxy.core.orders import OrderBook
from mes_trace_proxy.core.redact import Redactor
from mes_trace_proxy.core.rules import RouteMatch
from mes_trace_proxy.core.tracecontext import TrustPolicy, format_traceparent
from mes_trace_proxy.telemetry.client_span import ClientSpanPlan, upstream_context
from mes_trace_proxy.telemetry.logs import AccessLog
from mes_trace_proxy.telemetry.observer import Observer
from mes_trace_proxy.telemetry.span_context import caller_span_context, clean_trace_state
from mes_trace_proxy.telemetry.tracing import Tracing
from mes_trace_proxy.wire.client import Answer, RequestBody, UpstreamPool

__all__ = [
    "Call",
    "Forwarder",
    "ListenerState",
    "Parent",
    "PoolForwarder",
    "Propagation",
    "SessionForwarder",
    "SpanMode",
    "one_spelling",
    "own_response_fields",
    "propagation_for",
    "span_mode_for",
]

# aiohttp's session adds these unless told not to; the proxy forwards only what the caller sent.
_SKIP_AUTO_HEADERS: Final = frozenset({"User-Agent", "Accept", "Accept-Encoding", "Content-Type"})

#: The parent per the trust policy: the parent span context (``None``: a new root), the SERVER
#: span's links, and the ``Context`` a non-W3C propagator extracted (it injects from it again).
Parent = tuple[SpanContext | None, tuple[Link, ...], Context | None]
_NO_PARENT: Final[Parent] = (None, (), None)


class SpanMode:
    """How the SERVER and CLIENT spans are made: exporting, with the SDK (the base)."""

    @property
    def instruments_client(self) -> bool:
        """The session's trace config makes the CLIENT span (``tracing.client_span: instrumentation``)."""
        return False

    def server(
        self,
        tracing: Tracing,
        name: str,
        parent: SpanContext | None,
        links: tuple[Link, ...],
        route: str | None,
        trace_id: int | None,
    ) -> trace_api.Span:
        """Start the SERVER span; only ``http.route`` goes in (all the sampler reads)."""
        return tracing.spans.start(
            name, kind=SpanKind.SERVER, parent=parent, route=route, links=links, trace_id=trace_id
        )

    def client(
        self,
        tracing: Tracing,
        name: str,
        server: SpanContext,
        attributes: dict[str, AttributeValue] | None,
    ) -> trace_api.Span:
        """Start the CLIENT span, child of the SERVER span."""
        return tracing.spans.start(name, kind=SpanKind.CLIENT, parent=server, attributes=attributes)


class _PassThrough(SpanMode):
    """Nothing is exported: non-recording spans carry the caller's trace on to MES."""

    def server(
        self,
        tracing: Tracing,
        name: str,
        parent: SpanContext | None,
        links: tuple[Link, ...],
        route: str | None,
        trace_id: int | None,
    ) -> trace_api.Span:
        return tracing.passthrough(parent, trace_id)

    def client(
        self,
        tracing: Tracing,
        name: str,
        server: SpanContext,
        attributes: dict[str, AttributeValue] | None,
    ) -> trace_api.Span:
        return tracing.passthrough(server)


class _Instrumented(SpanMode):
    """The session's trace config makes the CLIENT span; the handler's stand-in records nothing."""

    @property
    def instruments_client(self) -> bool:
        return True

    def client(
        self,
        tracing: Tracing,
        name: str,
        server: SpanContext,
        attributes: dict[str, AttributeValue] | None,
    ) -> trace_api.Span:
        return trace_api.INVALID_SPAN


def span_mode_for(*, exporting: bool, instrumented: bool) -> SpanMode:
    """The span mode of a listener: pass-through unless exporting; instrumented only when chosen."""
    if not exporting:
        return _PassThrough()
    return _Instrumented() if instrumented else SpanMode()


class Propagation:
    """Reads the caller's trace context and writes ours: the default W3C pair (the base)."""

    def __init__(self, redactor: Redactor | None = None) -> None:
        #: drops the tracestate members that carry personal data (``None``: keeps them all)
        self.redactor = redactor

    def parent(self, headers: CIMultiDictProxy[str], trusted: bool) -> Parent:
        """The parent per the trust policy: the caller's span, or a new root and a link to it."""
        # Every field: two traceparent fields are no trace context, several tracestate fields one list.
        values = headers.getall("traceparent", ())
        if not values:
            return _NO_PARENT
        caller = caller_span_context(values, headers.getall("tracestate", ()), self.redactor)
        if caller is None:
            return _NO_PARENT
        if trusted:
            return caller, (), None
        # Untrusted callers' baggage and sampling are dropped; the relation survives as a link.
        return None, (Link(caller),), None

    def inject(self, headers: HeaderList, span: trace_api.Span, extracted: Context | None) -> HeaderList:
        """Append the CLIENT span's context (the caller's trace fields were dropped already)."""
        context = span.get_span_context()
        headers.append(
            ("traceparent", format_traceparent(context.trace_id, context.span_id, context.trace_flags))
        )
        if context.trace_state:
            headers.append(("tracestate", context.trace_state.to_header()))
        return headers

    def for_relay(self) -> Propagation:
        """What the WebSocket relay injects with: itself (the instrumentation never runs there)."""
        return self


class _Propagators(Propagation):
    """Other propagators (``OTEL_PROPAGATORS``): theirs are the fields they read and write."""

    def __init__(self, propagator: TextMapPropagator, redactor: Redactor | None = None) -> None:
        super().__init__(redactor)
        self.propagator = propagator
        self.owned = frozenset(field.lower() for field in propagator.fields)

    def parent(self, headers: CIMultiDictProxy[str], trusted: bool) -> Parent:
        if "traceparent" not in headers:
            return _NO_PARENT
        context = self.propagator.extract(headers)
        caller = trace_api.get_current_span(context).get_span_context()
        if self.redactor is not None:
            caller = clean_trace_state(caller, self.redactor)
        if not caller.is_valid:
            return None, (), context
        if trusted:
            return caller, (), context
        return None, (Link(caller),), None

    def inject(self, headers: HeaderList, span: trace_api.Span, extracted: Context | None) -> HeaderList:
        # The caller's fields of the propagator's names give way to those injected from the
        # CLIENT span's context.
        carrier: dict[str, str] = {}
        self.propagator.inject(carrier, context=trace_api.set_span_in_context(span, extracted))
        owned = self.owned
        kept = [(n, v) for n, v in headers if n.lower() not in owned]
        kept.extend(carrier.items())
        return kept


class _InjectedByInstrumentation(Propagation):
    """Instrumented: the session's trace config injects the CLIENT span's context itself."""

    def __init__(self, reads: Propagation) -> None:
        super().__init__(reads.redactor)
        self.reads = reads

    def parent(self, headers: CIMultiDictProxy[str], trusted: bool) -> Parent:
        return self.reads.parent(headers, trusted)

    def inject(self, headers: HeaderList, span: trace_api.Span, extracted: Context | None) -> HeaderList:
        return headers

    def for_relay(self) -> Propagation:
        return self.reads


def propagation_for(tracing: Tracing, *, instrumented: bool, redactor: Redactor | None = None) -> Propagation:
    """The propagation of a listener, from ``Tracing.w3c`` and the CLIENT-span choice.

    ``redactor``: the tracestate members it would change (personal data) are left out of the
    caller's context, so they reach neither our spans nor the upstream.
    """
    reads = Propagation(redactor) if tracing.w3c else _Propagators(tracing.propagator, redactor)
    return _InjectedByInstrumentation(reads) if instrumented else reads


class Call:
    """What one call through the proxy learned, step by step (``proxy.handle`` fills it in)."""

    # A native class's attributes are slots already; the pure build gets the same.
    __slots__ = (
        "attached",
        "attrs",
        "body",
        "client_attrs",
        "client_span",
        "content_length",
        "data",
        "error_type",
        "extracted",
        "facts",
        "fields",
        "match",
        "method",
        "name",
        "path",
        "query",
        "raw",
        "recording",
        "response_body",
        "response_headers",
        "route",
        "sent",
        "server_context",
        "server_span",
        "started",
        "status",
        "trace_id",
        "trusted",
        "upstream_duration",
        "upstream_status",
    )

    def __init__(self, started: float, method: str, raw: str) -> None:
        self.started = started
        self.method = method
        self.raw = raw
        path, _, query = raw.partition("?")
        self.path = path
        self.query = query
        self.content_length: int | None = None
        #: the request's fields in received order, names as received
        self.fields: tuple[tuple[str, str], ...] = ()
        self.match: RouteMatch | None = None
        self.route: str | None = None
        self.facts: OrderFacts = NO_FACTS
        #: the request body read for inspection, if it was
        self.body: bytes | None = None
        #: the body as it goes upstream
        self.data: RequestBody = None
        self.name = ""
        self.server_span: trace_api.Span = trace_api.INVALID_SPAN
        self.client_span: trace_api.Span = trace_api.INVALID_SPAN
        self.recording = False
        self.attrs: dict[str, AttributeValue] = {}
        self.client_attrs: dict[str, AttributeValue] | None = None
        self.server_context: SpanContext = trace_api.INVALID_SPAN_CONTEXT
        self.extracted: Context | None = None
        #: the trust policy trusts the caller's address (its parent, its baggage)
        self.trusted = False
        self.trace_id = ""
        #: the context attached for the instrumentation's hooks until the answer's head is in
        #: (an attribute, so ``finally`` may read it: native.py, constraint 5)
        self.attached: Token[Context] | None = None
        #: the status the caller got (0: none yet); may be our own 413/502/504
        self.status = 0
        #: what MES answered (0: nothing)
        self.upstream_status = 0
        self.error_type: str | None = None
        self.upstream_duration: float | None = None
        self.response_headers: CIMultiDictProxy[str] | None = None
        self.response_body: bytes | None = None
        self.sent = 0

    def detach(self) -> None:
        """Leave the context attached for the instrumentation's hooks, if it still is."""
        if self.attached is not None:
            context_api.detach(self.attached)
            self.attached = None


class Forwarder:
    """Sends one call upstream: :class:`PoolForwarder` (the default) or :class:`SessionForwarder`."""

    def call(self, call: Call, headers: HeaderList) -> AbstractAsyncContextManager[Answer]:
        """The upstream call, used as ``async with``; entering it waits for the answer's head."""
        raise NotImplementedError("a Forwarder is a PoolForwarder or a SessionForwarder")


class PoolForwarder(Forwarder):
    """The default: the lean ``UpstreamPool`` sends the fields exactly as listed."""

    def __init__(self, pool: UpstreamPool, base_path: str) -> None:
        self.pool = pool
        self.base_path = base_path

    def call(self, call: Call, headers: HeaderList) -> AbstractAsyncContextManager[Answer]:
        # The target exactly as the caller sent it, an empty query ("/x?") included.
        return self.pool.request(call.method, f"{self.base_path}{call.raw}", headers, call.data)


class SessionForwarder(Forwarder):
    """``tracing.client_span: instrumentation``: aiohttp's session; its trace config makes the CLIENT span."""

    def __init__(self, session: aiohttp.ClientSession, config: ListenerConfig) -> None:
        self.session = session
        upstream = config.upstream
        self.origin = f"{upstream.scheme}://{upstream.host_header}{upstream.base_path}"

    def call(self, call: Call, headers: HeaderList) -> AbstractAsyncContextManager[Answer]:
        out = CIMultiDict(one_spelling(headers))
        plan = ClientSpanPlan(name=call.name, attributes=call.client_attrs, headers=out)
        # The instrumentation's span parents on the current context: the SERVER span, attached
        # with the plan its hooks read, until the answer's head is in (Call.detach).
        server = trace_api.set_span_in_context(call.server_span)
        call.attached = context_api.attach(upstream_context(server, plan))
        return self.session.request(
            call.method,
            URL(f"{self.origin}{call.raw}", encoded=True),
            headers=out,
            data=call.data,
            allow_redirects=False,
            skip_auto_headers=_SKIP_AUTO_HEADERS,
        )


def one_spelling(headers: HeaderList) -> HeaderList:
    """Spell every repetition of a field name as its first occurrence was spelled.

    aiohttp's ``ClientSession`` merges request headers with a case-sensitive set of names
    seen, so ``X-A: 1`` then ``x-a: 2`` becomes ``x-a: 2`` alone: a value lost. Field names
    are case-insensitive (RFC 9110 §5.1), values are not, so the name's spelling gives way.
    Only the session needs it (the pool sends the fields as listed).

    Returns:
        ``headers`` itself when no name repeats with another spelling, else a respelled copy.
    """
    first: dict[str, str] = {}
    fixed: HeaderList | None = None
    for index, (name, value) in enumerate(headers):
        spelled = first.setdefault(name.lower(), name)
        if spelled != name:
            if fixed is None:
                fixed = list(headers)
            fixed[index] = (spelled, value)
    return headers if fixed is None else fixed


def own_response_fields(config: ListenerConfig) -> frozenset[str]:
    """Lower-case names of the fields the proxy sets on answers; MES's fields of those names are replaced."""
    names = {"traceresponse"} if config.traceresponse else set()
    if config.trace_id_header:
        names.add(config.trace_id_header.lower())
    return frozenset(names)


@dataclass(frozen=True, slots=True, kw_only=True)
class ListenerState:
    """Everything one listener's handler needs, built once by ``app.build_proxy_server``."""

    config: ListenerConfig
    #: aiohttp's session: the WebSocket relay's client (and the forwarder's, instrumented)
    session: aiohttp.ClientSession
    forwarder: Forwarder
    tracing: Tracing
    span_mode: SpanMode
    propagation: Propagation
    redactor: Redactor
    trust: TrustPolicy
    forward_policy: ForwardPolicy
    user_id_header: str
    user_id_key: bytes | None
    orders: OrderBook | None
    observer: Observer
    access_log: AccessLog | None
    clock: Callable[[], float] = time.time
    correlation: str = "link"
    #: told the id of an order whose state changed, so it is stored behind the hot path
    on_order_changed: Callable[[str], None] | None = None
    #: true once the process drains for shutdown (read when a handler is cancelled)
    draining: Callable[[], bool] = lambda: False
    #: lower-case names of the fields the proxy sets on answers (see :func:`own_response_fields`)
    own_response_fields: frozenset[str] = frozenset()
