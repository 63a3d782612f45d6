"""The request handler: wires the pure core to aiohttp, the upstream session and the spans.

How one request flows (docs/architecture.md has the long form):
view → ``rules.match`` → (capped JSON body) ``extract.request_facts`` → redaction → SERVER
span (parent per the trust policy) → forwarded headers + CLIENT span injected → body
streamed upstream → response streamed back (teed when the rule reads it) →
``extract.response_facts`` → order book → spans end → access log and metrics.

Nothing here alters what is forwarded beyond what a proxy must: hop-by-hop headers,
forwarding headers and trace headers.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from contextvars import Token
from dataclasses import dataclass
from typing import Final, cast

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from opentelemetry import context as context_api
from opentelemetry import trace as trace_api
from opentelemetry.context import Context
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState
from opentelemetry.util.types import AttributeValue
from yarl import URL

from mes_trace_proxy.core import attributes as A
from mes_trace_proxy.core.config import ListenerConfig
from mes_trace_proxy.core.extract import (
    NO_FACTS,
    OrderFacts,
    is_json_content_type,
    request_facts,
    response_facts,
)
from mes_trace_proxy.core.forwarding import (
    ALLOWED_METHODS,
    ForwardPolicy,
    check_header_values,
    check_host_headers,
    check_target,
    downstream_response_headers,
    upstream_request_headers,
)
from mes_trace_proxy.core.framing import check_framing, closes_connection
from mes_trace_proxy.core.orders import Findings, OrderBook, SpanRef
from mes_trace_proxy.core.problems import (
    PROBLEM_CONTENT_TYPE,
    ClientRejection,
    Rejection,
    UpstreamFailure,
    failure_response,
)
from mes_trace_proxy.core.problems import rejection as make_rejection
from mes_trace_proxy.core.redact import Redactor, pseudonymize, user_id_from_headers
from mes_trace_proxy.core.rules import RouteMatch
from mes_trace_proxy.core.tracecontext import (
    TrustPolicy,
    format_span_id,
    format_trace_id,
    format_traceparent,
    traceresponse,
)
from mes_trace_proxy.telemetry.client_span import ClientSpanPlan, upstream_context
from mes_trace_proxy.telemetry.correlation import order_trace_for
from mes_trace_proxy.telemetry.logs import AccessLog
from mes_trace_proxy.telemetry.observer import Observer
from mes_trace_proxy.telemetry.span_context import caller_span_context, clean_trace_state, span_context
from mes_trace_proxy.telemetry.spans import ProxySpan
from mes_trace_proxy.telemetry.tracing import Tracing
from mes_trace_proxy.wire.bodies import BodyTooLarge, capped, prefixed
from mes_trace_proxy.wire.client import Answer, RequestBody, UpstreamError, UpstreamPool
from mes_trace_proxy.wire.server import IncomingRequest

__all__ = [
    "ListenerState",
    "classify_failure",
    "handle",
    "make_handler",
    "make_upgrade_handler",
    "one_spelling",
    "own_response_fields",
    "upstream_error_type",
]

log = logging.getLogger("mes_trace_proxy.proxy")

# 64 KiB reads: large enough that a 256 MiB model moves in ~4k writes, small enough that a
# slow client never makes us hold more than a few of them per connection.
CHUNK_SIZE: Final = 64 * 1024
_TRACE_HEADERS: Final = ("traceparent", "tracestate")
_DEFAULT_FLAGS: Final = TraceFlags(TraceFlags.DEFAULT)
_DEFAULT_STATE: Final = TraceState()
_FIRST_SPAN_LINK: Final = {A.MES_LINK_KIND: "order.first_span"}
#: ``error.type`` of an exchange the caller abandoned (hung up before the answer was complete).
CLIENT_ABORTED: Final = "client_aborted"
#: a request still running when the drain's grace period ended, cancelled by the shutdown
SHUTDOWN_CANCELLED: Final = "shutdown_cancelled"
# Answers up to this size with a Content-Length are relayed in one write; larger or chunked
# ones stream. 64 KiB matches the read chunk, so memory per request stays the same bound.
SMALL_BODY: Final = CHUNK_SIZE
_NO_BODY_STATUSES: Final = frozenset({204, 304})
_HTTP_11: Final = aiohttp.HttpVersion(1, 1)
_NO_HEADERS: Final = CIMultiDictProxy(CIMultiDict[str]())
# Semantic conventions, HTTP spans: ``http.request.header.<key>``, lower-case, values as an array.
_HEADER_ATTRIBUTE_PREFIX: Final = "http.request.header."


@dataclass(frozen=True, slots=True, kw_only=True)
class ListenerState:
    """Everything one listener's handler needs, built once by ``app.py``."""

    config: ListenerConfig
    session: aiohttp.ClientSession
    tracing: Tracing
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
    #: the session's trace config (opentelemetry-instrumentation-aiohttp-client) makes the
    #: CLIENT span (``tracing.client_span: instrumentation``); else the handler starts it
    instrumented_client: bool = False
    #: the lean upstream client (the default); ``None``: calls go through ``session``
    upstream: UpstreamPool | None = None
    #: lower-case names of the fields the proxy sets on answers (see :func:`own_response_fields`)
    own_response_fields: frozenset[str] = frozenset()


def own_response_fields(config: ListenerConfig) -> frozenset[str]:
    """Lower-case names of the fields the proxy sets on answers; MES's fields of those names are replaced."""
    names = {"traceresponse"} if config.traceresponse else set()
    if config.trace_id_header:
        names.add(config.trace_id_header.lower())
    return frozenset(names)


def classify_failure(exc: BaseException) -> UpstreamFailure:
    """Map an upstream client exception onto the upstream-failure table (most specific first)."""
    if isinstance(exc, UpstreamError):
        return exc.failure
    if isinstance(exc, aiohttp.ClientConnectorCertificateError | aiohttp.ClientSSLError):
        return UpstreamFailure.TLS_ERROR
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return UpstreamFailure.DNS_FAILURE
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return UpstreamFailure.CONNECT_TIMEOUT
    if isinstance(exc, aiohttp.ClientConnectorError):
        return UpstreamFailure.CONNECT_REFUSED
    if isinstance(exc, aiohttp.SocketTimeoutError | aiohttp.ServerTimeoutError):
        return UpstreamFailure.READ_TIMEOUT
    if isinstance(exc, asyncio.TimeoutError):
        return UpstreamFailure.TOTAL_TIMEOUT
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError):
        return UpstreamFailure.DISCONNECTED
    if isinstance(exc, aiohttp.ClientPayloadError):
        return UpstreamFailure.PAYLOAD_ERROR
    return UpstreamFailure.INVALID_RESPONSE


def upstream_error_type(exc: BaseException, *, draining: bool) -> str:
    """The CLIENT span's ``error.type`` for an upstream call that raised before it answered.

    Args:
        exc: what the call raised.
        draining: whether the process is draining (a cancelled call is then the shutdown's).

    Returns:
        ``client_aborted``/``shutdown_cancelled`` for a cancelled call, ``payload_too_large``
        for a request body over ``max_body_size``, else the upstream-failure value.
    """
    if isinstance(exc, asyncio.CancelledError):
        return SHUTDOWN_CANCELLED if draining else CLIENT_ABORTED
    if isinstance(exc.__cause__, BodyTooLarge):
        return ClientRejection.PAYLOAD_TOO_LARGE.value
    return classify_failure(exc).value


def one_spelling(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Spell every repetition of a field name as its first occurrence was spelled.

    aiohttp's ``ClientSession`` merges request headers with a case-sensitive set of names
    seen, so ``X-A: 1`` then ``x-a: 2`` becomes ``x-a: 2`` alone: a value lost. Field names
    are case-insensitive (RFC 9110 §5.1), values are not, so the name's spelling gives way.

    Args:
        headers: the fields to send upstream, in order.

    Returns:
        ``headers`` itself when no name repeats with another spelling, else a respelled copy.
    """
    first: dict[str, str] = {}
    fixed: list[tuple[str, str]] | None = None
    for index, (name, value) in enumerate(headers):
        spelled = first.setdefault(name.lower(), name)
        if spelled != name:
            if fixed is None:
                fixed = list(headers)
            fixed[index] = (spelled, value)
    return headers if fixed is None else fixed


def _rejection_answer(rejection: Rejection, trace_id: str | None) -> tuple[int, list[tuple[str, str]], bytes]:
    """Status, fields and body of a problem+json answer to a refused request."""
    from mes_trace_proxy.core.problems import problem_body

    body = problem_body(
        status=rejection.status,
        title=rejection.title,
        detail=rejection.detail,
        type_=rejection.problem_type,
        trace_id=trace_id,
    )
    return rejection.status, [("Content-Type", PROBLEM_CONTENT_TYPE), *rejection.headers], body


def _rejection_response(rejection: Rejection, trace_id: str | None) -> web.Response:
    """The same answer for aiohttp's server (the WebSocket relay's connections)."""
    status, headers, body = _rejection_answer(rejection, trace_id)
    response = web.Response(status=status, body=body)
    for name, value in headers:
        response.headers.add(name, value)
    return response


def _body_too_large(length: int | None, limit: int | None) -> Rejection | None:
    """413 before anything goes upstream when the declared length is over the limit."""
    if limit is None or length is None or length <= limit:
        return None
    return make_rejection(ClientRejection.PAYLOAD_TOO_LARGE)


async def _request_body(
    request: IncomingRequest, match: RouteMatch | None, limit: int
) -> tuple[bytes | None, RequestBody]:
    """Decide how the body goes upstream, reading it only when a rule needs it and it is small.

    Returns:
        (the bytes to inspect or ``None``, the ``data`` argument for the upstream request).
    """
    if not request.body_exists:
        return None, None
    if match is None or not match.rule.needs_request_body or not is_json_content_type(request.content_type):
        return None, request.content
    length = request.content_length
    if length is not None and length <= limit:
        body = await request.content.readexactly(length) if length else b""
        return body, body
    if length is not None:
        return None, request.content
    # Chunked and of unknown size: read up to the cap; past it, forward what we read and
    # stream the rest, and do not inspect (a half-read JSON body names nothing reliably).
    buffer = bytearray()
    while len(buffer) <= limit:
        chunk = await request.content.read(CHUNK_SIZE)
        if not chunk:
            return bytes(buffer), bytes(buffer)
        buffer += chunk
    return None, prefixed(bytes(buffer), request.content, CHUNK_SIZE)


def _server_attributes(
    state: ListenerState,
    request: IncomingRequest,
    match: RouteMatch | None,
    path: str,
    query: str,
    facts: OrderFacts,
) -> dict[str, AttributeValue]:
    redactor = state.redactor
    user: str | None = None
    if state.user_id_key is not None:
        user_id = user_id_from_headers(request.headers, header_name=state.user_id_header)
        if user_id:
            user = pseudonymize(state.user_id_key, user_id)
    attrs = A.request_attributes(
        method=request.method,
        path=path,
        query=query,
        route=match.rule.route if match is not None else None,
        rule_name=match.rule.name if match is not None else None,
        listener=state.config.name,
        facts=facts,
        redactor=redactor,
        user_pseudonym=user,
    )
    attrs[A.URL_SCHEME] = request.scheme
    attrs[A.NETWORK_PROTOCOL_VERSION] = f"{request.version.major}.{request.version.minor}"
    host = request.host
    if host:
        name, sep, port = host.rpartition(":")
        if sep and port.isdigit() and not host.endswith("]"):
            attrs[A.SERVER_ADDRESS] = redactor.value(name.strip("[]"))
            attrs[A.SERVER_PORT] = int(port)
        else:
            attrs[A.SERVER_ADDRESS] = redactor.value(host.strip("[]"))
    peer = request.remote
    if peer:
        attrs[A.CLIENT_ADDRESS] = peer
        attrs[A.NETWORK_PEER_ADDRESS] = peer
    # Only allow-listed headers are recorded (privacy.header_allow), values scrubbed.
    for name, values in redactor.headers(request.headers.items()).items():
        if name == "user-agent":
            attrs[A.USER_AGENT_ORIGINAL] = values[0][:256]
        else:
            attrs[f"{_HEADER_ATTRIBUTE_PREFIX}{name}"] = values
    return attrs


def _log_attributes(state: ListenerState, method: str, facts: OrderFacts) -> dict[str, AttributeValue]:
    """The few values the access log and metrics need when the span does not record."""
    attrs: dict[str, AttributeValue] = {A.HTTP_REQUEST_METHOD: A.method_attribute(method)}
    if facts.order_id is not None:
        attrs[A.MES_ORDER_ID] = state.redactor.value(facts.order_id)
    if facts.status is not None:
        attrs[A.MES_ORDER_STATUS] = state.redactor.value(facts.status)
    return attrs


def _parent(
    state: ListenerState, request: IncomingRequest
) -> tuple[SpanContext | None, tuple[Link, ...], Context | None]:
    """The parent per the trust policy: the caller's span, or none and a link to it.

    Returns:
        The parent span context (``None``: a new root), the links of the SERVER span, and, when
        the propagators are not the default W3C pair, the ``Context`` they extracted (which
        they inject from again).
    """
    headers = request.headers
    # Every field: two traceparent fields are no trace context, several tracestate fields one list.
    values = headers.getall("traceparent", ())
    if not values:
        return None, (), None
    tracing = state.tracing
    context: Context | None = None
    if tracing.w3c:
        found = caller_span_context(values, headers.getall("tracestate", ()), state.redactor)
        if found is None:
            return None, (), None
        caller = found
    else:
        context = tracing.propagator.extract(headers)
        caller = clean_trace_state(trace_api.get_current_span(context).get_span_context(), state.redactor)
        if not caller.is_valid:
            return None, (), context
    if state.trust.trusts(request.remote):
        return caller, (), context
    # Untrusted callers' baggage and sampling are dropped; the relation survives as a link.
    return None, (Link(caller),), None


def _order_trace(state: ListenerState, parent: SpanContext | None, facts: OrderFacts) -> int | None:
    """``trace-per-order``: the order's trace id for a call with no usable trace context."""
    if state.correlation != "trace-per-order" or facts.order_id is None:
        return None
    has_parent = parent is not None and parent.is_valid
    order_id = state.redactor.value(facts.order_id)
    tracked = facts.status is not None or (state.orders is not None and order_id in state.orders)
    return order_trace_for(state.correlation, order_id, has_parent=has_parent, tracked=tracked)


def make_handler(state: ListenerState) -> Callable[[IncomingRequest], Awaitable[None]]:
    """The request handler of one listener (for :class:`mes_trace_proxy.wire.server.Http1Server`).

    The proxy has a single handler for every target, so there is no router: targets that
    are not paths (CONNECT's authority-form) still reach :func:`handle` to be refused properly.
    """

    # A partial, not a closure: one coroutine per request instead of two, and the state stays
    # reachable (``.args``) for bench.handler, whether this module is compiled or not.
    return functools.partial(handle, state)


def make_upgrade_handler(state: ListenerState) -> Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]:
    """The handler of the WebSocket upgrades the listener hands to aiohttp's server.

    The same checks as :func:`handle` run first. Whatever is not a relayed WebSocket is
    answered and the connection closed: only the upgrade itself was handed over.
    """

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        from mes_trace_proxy.proxy.websocket import proxy_websocket

        started = time.perf_counter()
        method = request.method
        raw = request.raw_path
        rejection = (
            check_target(method, raw)
            or check_host_headers(tuple(request.headers.items()))
            or check_header_values(request.headers.values())
            or check_framing(
                tuple(request.headers.items()),
                chunked="Transfer-Encoding" in request.headers,
                policy=state.forward_policy.underscore,
            )
        )
        if rejection is not None:
            refused = _rejection_response(rejection, None)
            refused.force_close()
            _refused(state, method, rejection, started)
            return refused
        match = state.config.rules.match(method, raw.partition("?")[0])
        if state.instrumented_client:
            # The relay has a SERVER span only, injected as the upstream's parent; the
            # instrumentation would add a root CLIENT span for the handshake and overwrite it.
            from opentelemetry.instrumentation.utils import suppress_http_instrumentation

            with suppress_http_instrumentation():
                response = await proxy_websocket(request, state, match, started)
        else:
            response = await proxy_websocket(request, state, match, started)
        if not isinstance(response, web.WebSocketResponse):
            response.force_close()
        return response

    return handler


def _refused(state: ListenerState, method: str, rejection: Rejection, started: float) -> None:
    state.observer.request_done(
        listener=state.config.name,
        route="",
        method=A.method_attribute(method),
        status=rejection.status,
        duration=time.perf_counter() - started,
        upstream_duration=None,
        error_type=rejection.problem_type,
    )


async def handle(state: ListenerState, request: IncomingRequest) -> None:
    """Proxy one request to the listener's upstream, trace it, and answer the caller."""
    started = time.perf_counter()
    method = request.method
    raw = request.raw_path
    path, _, query = raw.partition("?")
    header_items = tuple(request.headers.items())

    content_length = request.content_length
    rejection = (
        check_target(method, raw)
        or check_host_headers(header_items)
        or check_header_values(request.headers.values())
        or check_framing(
            header_items, chunked=request.message.chunked, policy=state.forward_policy.underscore
        )
        or _body_too_large(content_length, state.config.limits.max_body_size)
    )
    if rejection is not None:
        if closes_connection(rejection):
            request.force_close()
        status, fields, problem = _rejection_answer(rejection, None)
        request.send(status, None, fields, problem)
        _refused(state, method, rejection, started)
        return
    if raw == "*":
        # OPTIONS * (RFC 9110 §9.3.7) asks about the server, not a resource, and the client
        # library can only send origin-form targets upstream: the proxy answers it itself,
        # as load balancers that ping with it expect.
        request.send(200, None, (("Allow", ALLOWED_METHODS),))
        state.observer.request_done(
            listener=state.config.name,
            route="",
            method=method,
            status=200,
            duration=time.perf_counter() - started,
            upstream_duration=None,
            error_type=None,
        )
        return

    match = state.config.rules.match(method, path)
    if request.version >= _HTTP_11 and request.headers.get("Expect", "").lower() == "100-continue":
        # RFC 9110 §10.1.1: the caller waits for 100 before sending the body. The request
        # passed our checks, so invite the body now rather than leave the caller to time out
        # (curl waits a second); the Expect header still goes upstream, as it was sent.
        request.send_continue()
    body, data = await _request_body(request, match, state.config.inspect_body_limit)
    max_body = state.config.limits.max_body_size
    if max_body is not None and content_length is None and data is not None and body is None:
        # Chunked: the size is known only while it streams. Count, and abort the upstream
        # request the moment it passes the limit, so the upstream never sees a whole body.
        data = capped(data, max_body, CHUNK_SIZE)
    facts = (
        request_facts(match, raw_query=query, headers=request.headers, body=body)
        if match is not None
        else NO_FACTS
    )

    tracing = state.tracing
    route = match.rule.route if match is not None else None
    parent, links, extracted = _parent(state, request)
    exporting = tracing.exporting
    name = A.span_name(method, route)
    order_trace = _order_trace(state, parent, facts)
    server_span: trace_api.Span
    if exporting:
        # Only http.route goes in at start: it is all the sampler reads, and the rest is
        # built only for a span that records (dashboard polling is sampled at 1 %).
        server_span = tracing.spans.start(
            name, kind=SpanKind.SERVER, parent=parent, route=route, links=links, trace_id=order_trace
        )
    else:
        server_span = tracing.passthrough(parent, order_trace)
    recording = server_span.is_recording()
    if recording:
        attrs = _server_attributes(state, request, match, path, query, facts)
        cast(ProxySpan, server_span).set_own_attributes(attrs)
    else:
        attrs = _log_attributes(state, method, facts)
    server_sc = server_span.get_span_context()
    upstream = state.config.upstream
    client_attrs: dict[str, AttributeValue] | None = None
    if recording:
        client_attrs = {
            A.HTTP_REQUEST_METHOD: attrs[A.HTTP_REQUEST_METHOD],
            A.SERVER_ADDRESS: upstream.host,
            A.SERVER_PORT: upstream.port,
            A.URL_FULL: upstream.origin
            + str(attrs[A.URL_PATH])
            + (f"?{attrs[A.URL_QUERY]!s}" if A.URL_QUERY in attrs else ""),
        }
        original = attrs.get(A.HTTP_REQUEST_METHOD_ORIGINAL)
        if original is not None:
            client_attrs[A.HTTP_REQUEST_METHOD_ORIGINAL] = original
    # With the instrumentation the session's trace config makes the CLIENT span (and injects
    # it); the handler's stand-in records nothing.
    instrumented = exporting and state.instrumented_client
    client_span: trace_api.Span
    if not exporting:
        client_span = tracing.passthrough(server_sc)
    elif instrumented:
        client_span = trace_api.INVALID_SPAN
    else:
        client_span = tracing.spans.start(
            name, kind=SpanKind.CLIENT, parent=server_sc, attributes=client_attrs
        )
    out_headers = upstream_request_headers(
        header_items,
        policy=state.forward_policy,
        client_ip=request.remote or "unknown",
        scheme=request.scheme,
        host=request.host,
        drop_trace_headers=True,
    )
    # The incoming trace headers were dropped above, so ours are appended, never merged.
    if instrumented:
        pass
    elif tracing.w3c:
        client_sc = client_span.get_span_context()
        out_headers.append(
            ("traceparent", format_traceparent(client_sc.trace_id, client_sc.span_id, client_sc.trace_flags))
        )
        if client_sc.trace_state:
            out_headers.append(("tracestate", client_sc.trace_state.to_header()))
    else:
        # Other propagators (OTEL_PROPAGATORS): theirs are the fields they write; the caller's
        # fields of those names give way to the ones injected from the CLIENT span's context.
        carrier: dict[str, str] = {}
        tracing.propagator.inject(carrier, context=trace_api.set_span_in_context(client_span, extracted))
        owned = {field.lower() for field in tracing.propagator.fields}
        out_headers = [(n, v) for n, v in out_headers if n.lower() not in owned]
        out_headers.extend(carrier.items())
    if not state.trust.trusts(request.remote):
        # W3C Baggage from a caller we do not trust is not passed on: it could steer what
        # the services behind us record or decide.
        out_headers = [(n, v) for n, v in out_headers if n.lower() != "baggage"]
    # The lean client sends the fields exactly as listed; aiohttp's session needs a multidict
    # with one spelling per name, or it drops repeated values (see one_spelling).
    out = None if state.upstream is not None else CIMultiDict(one_spelling(out_headers))
    plan = (
        ClientSpanPlan(name=name, attributes=client_attrs, headers=out)
        if instrumented and out is not None
        else None
    )

    server_sc = server_span.get_span_context()
    trace_id_hex = format_trace_id(server_sc.trace_id)
    trace_response = (
        traceresponse(server_sc.trace_id, server_sc.span_id, server_sc.trace_flags.sampled)
        if state.config.traceresponse
        else ""
    )
    status_code = 0
    #: what MES answered (0: nothing); status_code may be our own 502/504/413 instead
    upstream_status = 0
    error_type: str | None = None
    upstream_duration: float | None = None
    response_body: bytes | None = None
    response_headers: CIMultiDictProxy[str] | None = None
    sent = 0
    # The instrumentation's span parents on the current context: the SERVER span, attached
    # with the plan its hooks read, until the answer's head is in (its span ends there).
    # A list, not an Optional reset to None: mypyc reads a local in `finally` as the type the
    # try block narrowed it to, which after `= None` would be None even on a path that raised
    # before the reset.
    attached: list[Token[Context]] = (
        [context_api.attach(upstream_context(trace_api.set_span_in_context(server_span), plan))]
        if plan is not None
        else []
    )
    try:
        upstream_started = time.perf_counter()
        try:
            call: AbstractAsyncContextManager[Answer]
            if state.upstream is not None:
                # The target exactly as the caller sent it, an empty query ("/x?") included.
                target = f"{upstream.base_path}{raw}"
                call = state.upstream.request(method, target, out_headers, data)
            else:
                assert out is not None
                call = state.session.request(
                    method,
                    URL(f"{upstream.scheme}://{upstream.host_header}{upstream.base_path}{raw}", encoded=True),
                    headers=out,
                    data=data,
                    allow_redirects=False,
                    skip_auto_headers=_SKIP_AUTO_HEADERS,
                )
            async with call as upstream_response:
                if attached:
                    context_api.detach(attached.pop())
                status_code = upstream_status = upstream_response.status
                upstream_fields = upstream_response.headers
                # Ours (traceresponse, X-Trace-Id) replace what MES sent under the same names.
                headers = downstream_response_headers(
                    tuple(upstream_fields.items()), state.own_response_fields
                )
                if state.config.traceresponse:
                    headers.append(("traceresponse", trace_response))
                if state.config.trace_id_header:
                    headers.append((state.config.trace_id_header, trace_id_hex))
                tee = (
                    match is not None
                    and match.rule.needs_response_body
                    and is_json_content_type(upstream_fields.get("Content-Type"))
                )
                limit = state.config.inspect_body_limit
                captured = bytearray() if tee else None
                length = upstream_response.content_length
                if method == "HEAD" or status_code in _NO_BODY_STATUSES:
                    # RFC 9110 §6.4.1: no content, whatever Content-Length says.
                    request.send(status_code, upstream_response.reason, headers)
                    captured = None
                elif length is not None and length <= SMALL_BODY:
                    # A small body with a known length (most MES answers): read it whole and
                    # send it with the head in one write instead of a chunk loop.
                    whole = await upstream_response.content.readexactly(length) if length else b""
                    request.send(status_code, upstream_response.reason, headers, whole)
                    sent = length
                    if captured is not None and length <= limit:
                        captured += whole
                    else:
                        captured = None
                else:
                    await request.start(status_code, upstream_response.reason, headers)
                    async for chunk in upstream_response.content.iter_any():
                        if captured is not None:
                            if len(captured) + len(chunk) <= limit:
                                captured += chunk
                            else:
                                captured = None
                        await request.write(chunk)
                        sent += len(chunk)
                    await request.finish()
                # Cast to what it was declared: mypyc reads it in `finally` as the type the try
                # block narrowed it to, and a cancelled call never gets here (None stays).
                upstream_duration = cast("float | None", time.perf_counter() - upstream_started)
                response_headers = upstream_fields
                response_body = bytes(captured) if captured is not None else None
        except (TimeoutError, aiohttp.ClientError) as exc:
            if isinstance(exc, ConnectionResetError) and request.started:
                # Writing to the caller failed: it hung up mid-download. That is raised as
                # ClientConnectionResetError, a ClientError too, but MES did nothing wrong;
                # leaving the `async with` above has already dropped the upstream call.
                error_type = CLIENT_ABORTED
                return
            if isinstance(exc.__cause__, BodyTooLarge) and not request.started:
                refused_body = make_rejection(ClientRejection.PAYLOAD_TOO_LARGE)
                error_type = ClientRejection.PAYLOAD_TOO_LARGE.value
                status_code = refused_body.status
                client_span.set_attribute(A.ERROR_TYPE, error_type)
                client_span.set_status(Status(StatusCode.ERROR, error_type))
                server_span.set_attribute(A.ERROR_TYPE, error_type)
                # The rest of the body is not worth reading: close once the answer is out.
                request.force_close()
                _, fields, problem_bytes = _rejection_answer(refused_body, trace_id_hex)
                request.send(status_code, None, fields, problem_bytes)
                return
            failure = classify_failure(exc)
            error_type = failure.value
            client_span.set_attribute(A.ERROR_TYPE, error_type)
            client_span.set_status(Status(StatusCode.ERROR, error_type))
            if request.started:
                # Headers already went out: the only honest signal left is to cut the
                # connection, so the caller sees a truncated body, not a complete one.
                request.close_now()
                return
            status_code, body_bytes = failure_response(failure, trace_id=trace_id_hex)
            fields = [("Content-Type", PROBLEM_CONTENT_TYPE)]
            if state.config.trace_id_header:
                fields.append((state.config.trace_id_header, trace_id_hex))
            if state.config.traceresponse:
                fields.append(("traceresponse", trace_response))
            request.send(status_code, None, fields, body_bytes)
            return
    except asyncio.CancelledError:
        # The caller went away, or the drain's grace period ran out (aiohttp cancels both
        # the same way; only our own draining flag tells them apart). The upstream request
        # was cancelled with the `async with` above; record why and let cancellation go on.
        error_type = error_type or (SHUTDOWN_CANCELLED if state.draining() else CLIENT_ABORTED)
        if not status_code:
            # MES never answered: the call failed as surely as a refused one (the
            # instrumentation's span says the same, from the cancellation it saw).
            client_span.set_attribute(A.ERROR_TYPE, error_type)
            client_span.set_status(Status(StatusCode.ERROR, error_type))
        raise
    finally:
        if attached:
            context_api.detach(attached.pop())
        try:
            now = state.clock()
            findings = None
            logged_order_id = attrs.get(A.MES_ORDER_ID)
            # What the SERVER span learns at the end, set in one call (recording spans only).
            end: dict[str, AttributeValue] = {}
            if match is not None and status_code and error_type is None:
                facts = response_facts(
                    match,
                    facts,
                    raw_query=query,
                    request_headers=request.headers,
                    response_headers=response_headers if response_headers is not None else _NO_HEADERS,
                    response_body=response_body,
                )
                if facts.order_id is not None and A.MES_ORDER_ID not in attrs:
                    logged_order_id = state.redactor.value(facts.order_id)
                    end[A.MES_ORDER_ID] = logged_order_id
                if recording:
                    if facts.observed_status is not None:
                        end[A.MES_ORDER_STATUS_OBSERVED] = state.redactor.value(facts.observed_status)
                    if facts.status is not None and A.MES_ORDER_STATUS not in attrs:
                        end[A.MES_ORDER_STATUS] = state.redactor.value(facts.status)
                findings = _record_order(
                    state, server_span if recording else None, end, facts, status_code, now, server_sc
                )
            if status_code:
                if upstream_status:
                    client_span.set_attribute(A.HTTP_RESPONSE_STATUS_CODE, upstream_status)
                end[A.HTTP_RESPONSE_STATUS_CODE] = status_code
                if status_code >= 400 and error_type is None:
                    client_span.set_attribute(A.ERROR_TYPE, str(status_code))
                    client_span.set_status(Status(StatusCode.ERROR))
                # A stream cut after its status line went out failed the caller as surely
                # as a 502 would have: the SERVER span says so, whatever the status line.
                if status_code >= 500 or error_type is not None:
                    end[A.ERROR_TYPE] = error_type or str(status_code)
                    server_span.set_status(Status(StatusCode.ERROR))
            elif error_type is not None:
                end[A.ERROR_TYPE] = error_type
                server_span.set_status(Status(StatusCode.ERROR, error_type))
            if content_length is not None:
                end[A.HTTP_REQUEST_BODY_SIZE] = content_length
            if sent or status_code:
                end[A.HTTP_RESPONSE_BODY_SIZE] = sent
            if recording:
                cast(ProxySpan, server_span).set_own_attributes(end)
            client_span.end()
            server_span.end()
            duration = time.perf_counter() - started
            state.observer.request_done(
                listener=state.config.name,
                route=route or "",
                method=str(attrs[A.HTTP_REQUEST_METHOD]),
                status=status_code,
                duration=duration,
                upstream_duration=upstream_duration,
                error_type=error_type,
            )
            if findings is not None:
                state.observer.order_findings(listener=state.config.name, findings=findings)
            if state.access_log is not None:
                state.access_log.request(
                    state.config.name,
                    str(attrs[A.HTTP_REQUEST_METHOD]),
                    route or "",
                    status_code,
                    duration * 1000,
                    sent,
                    trace_id_hex,
                    format_span_id(server_sc.span_id),
                    None if logged_order_id is None else str(logged_order_id),
                    error_type,
                )

        except Exception:
            # Recording must never fail a request whose answer is already out; the spans
            # are ended so nothing leaks, and the failure is logged without request data.
            log.exception("recording the exchange failed")
            client_span.end()
            server_span.end()


_SKIP_AUTO_HEADERS: Final = frozenset({"User-Agent", "Accept", "Accept-Encoding", "Content-Type"})


def _record_order(
    state: ListenerState,
    span: trace_api.Span | None,
    end: dict[str, AttributeValue],
    facts: OrderFacts,
    status_code: int,
    now: float,
    context: SpanContext,
) -> Findings | None:
    """Tell the order book what this call did; on a recording span, its verdict too.

    Args:
        state: the listener's state.
        span: the SERVER span when it records (events and links go on it), else ``None``.
        end: the SERVER span's end attributes, which the verdict joins.
        facts: what the call said and MES answered.
        status_code: the status the caller got.
        now: wall-clock seconds.
        context: the SERVER span's context (the order book keeps its ids).
    """
    if facts.order_id is None or (facts.status is None and facts.observed_status is None):
        return None
    # A call MES refused did not change the order; only its observed status (if any) counts.
    status = facts.status if status_code < 400 else None
    if status is None and facts.observed_status is None:
        return None
    redact = state.redactor.value
    order_id = redact(facts.order_id)
    ref = SpanRef(trace_id=context.trace_id, span_id=context.span_id)
    if state.orders is None:
        if status is not None and span is not None:
            span.add_event(A.EVENT_STATUS_CHANGE, {A.MES_ORDER_STATUS: redact(status)})
        return None
    findings = state.orders.apply(
        order_id=order_id,
        status=redact(status) if status is not None else None,
        observed=redact(facts.observed_status) if facts.observed_status is not None else None,
        now=now,
        span=ref,
        source=state.config.name,
    )
    if findings.changed and state.on_order_changed is not None:
        state.on_order_changed(order_id)
    if span is None:
        return findings
    transition = findings.transition
    if status is not None:
        event: dict[str, str | bool] = {A.MES_ORDER_STATUS: redact(status)}
        if transition is not None:
            if transition.prev is not None:
                event[A.MES_ORDER_STATUS_PREVIOUS] = transition.prev
            event[A.MES_ORDER_TRANSITION] = transition.kind.value
        span.add_event(A.EVENT_STATUS_CHANGE, event)
    if transition is not None:
        end[A.MES_ORDER_TRANSITION] = transition.kind.value
        if transition.prev is not None:
            end[A.MES_ORDER_STATUS_PREVIOUS] = transition.prev
    if findings.anomaly or findings.observed_mismatch:
        kind = (
            "observed_mismatch"
            if findings.observed_mismatch
            else transition.kind.value
            if transition
            else "unknown"
        )
        end[A.MES_ORDER_ANOMALY] = kind
        span.add_event(A.EVENT_ANOMALY, {A.MES_ORDER_ANOMALY: kind})
    first = findings.first_span
    if state.correlation == "link" and first is not None and first != ref:
        # SpanContext is a tuple; its checked constructor costs more than the link itself
        # (the ids come from a span this process made, so they are valid).
        span.add_link(
            span_context(first.trace_id, first.span_id, _DEFAULT_FLAGS, _DEFAULT_STATE), _FIRST_SPAN_LINK
        )
    return findings
