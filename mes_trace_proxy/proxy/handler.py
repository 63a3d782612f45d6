"""The request handler: ``handle`` runs the steps of docs/architecture.md, "How one request flows".

1. :func:`refuse` — what a gateway must refuse (``exchange.refusal``), and ``OPTIONS *``.
2-4. :func:`plan` — the rule, ``Expect: 100-continue``, the body plan, the order facts.
5. :func:`open_spans` — the parent per the trust policy, the SERVER span, its CLIENT child.
6. :func:`outbound_headers` — the forwarding policy's fields and our trace context.
7. ``relay.relay`` — the call upstream and the answer streamed back; failures as outcomes.
8. ``recording.record`` — once, from ``finally``: order book, spans, metrics, access log.

The modes (exporting or pass-through, SDK or instrumented CLIENT span, W3C or other
propagators, pool or session) were chosen when the listener was built: ``handler_state.py``.
Nothing here alters what is forwarded beyond what a proxy must: hop-by-hop headers,
forwarding headers and trace headers.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable
from typing import Final, cast

import aiohttp
from opentelemetry.trace import SpanContext
from opentelemetry.util.types import AttributeValue

from mes_trace_proxy.core import attributes as A
from mes_trace_proxy.core.exchange import (
    BodyReading,
    body_reading,
    connection_attributes,
    refusal,
    span_attributes,
    user_pseudonym,
)
from mes_trace_proxy.core.extract import OrderFacts, request_facts
from mes_trace_proxy.core.forwarding import ALLOWED_METHODS, HeaderList, upstream_request_headers
from mes_trace_proxy.core.framing import closes_connection
from mes_trace_proxy.core.problems import problem_fields, rejection_response
from mes_trace_proxy.core.tracecontext import format_trace_id
from mes_trace_proxy.proxy.handler_state import Call, ListenerState
from mes_trace_proxy.proxy.recording import record, record_own_answer
from mes_trace_proxy.proxy.relay import CHUNK_SIZE, relay
from mes_trace_proxy.telemetry.correlation import order_trace_for
from mes_trace_proxy.telemetry.spans import ProxySpan
from mes_trace_proxy.wire.bodies import capped, prefixed
from mes_trace_proxy.wire.server import IncomingRequest

__all__ = ["handle", "make_handler", "open_spans", "outbound_headers", "plan", "refuse"]

_HTTP_11: Final = aiohttp.HttpVersion(1, 1)


def make_handler(state: ListenerState) -> Callable[[IncomingRequest], Awaitable[None]]:
    """The request handler of one listener (for :class:`mes_trace_proxy.wire.server.Http1Server`).

    The proxy has a single handler for every target, so there is no router: targets that
    are not paths (CONNECT's authority-form) still reach :func:`handle` to be refused properly.
    """
    # A partial, not a closure: one coroutine per request instead of two.
    # mypyc: .args keeps the state reachable for bench.handler (native.py, constraint 9).
    return functools.partial(handle, state)


async def handle(state: ListenerState, request: IncomingRequest) -> None:
    """Proxy one request to the listener's upstream, trace it, and answer the caller."""
    call = Call(time.perf_counter(), request.method, request.raw_path)
    if refuse(state, request, call):
        return
    await plan(state, request, call)
    open_spans(state, request, call)
    headers = outbound_headers(state, request, call)
    try:
        await relay(state, request, call, headers)
    finally:
        record(state, request, call)


def refuse(state: ListenerState, request: IncomingRequest, call: Call) -> bool:
    """Step 1: answer what a gateway must refuse, and ``OPTIONS *``, itself; true when answered."""
    headers = request.headers
    call.content_length = request.content_length
    call.fields = tuple(headers.items())
    rejection = refusal(
        call.method,
        call.raw,
        call.fields,
        headers.values(),
        chunked=request.chunked,
        underscore=state.forward_policy.underscore,
        content_length=call.content_length,
        max_body_size=state.config.limits.max_body_size,
    )
    if rejection is not None:
        if closes_connection(rejection):
            # The caller and the proxy may disagree on where this request ends.
            request.force_close()
        status, body = rejection_response(rejection, trace_id=None)
        request.send(status, None, problem_fields(rejection), body)
        record_own_answer(state, call.method, status, rejection.slug, call.started, len(body))
        return True
    if call.raw == "*":
        # OPTIONS * (RFC 9110 §9.3.7) asks about the server, not a resource, and the upstream
        # clients send only origin-form targets: the proxy answers it itself, as load
        # balancers that ping with it expect.
        request.send(200, None, (("Allow", ALLOWED_METHODS),))
        record_own_answer(state, call.method, 200, None, call.started, 0)
        return True
    return False


async def plan(state: ListenerState, request: IncomingRequest, call: Call) -> None:
    """Steps 2-4: the rule, ``Expect: 100-continue``, the body plan and the order facts."""
    match = state.config.rules.match(call.method, call.path)
    call.match = match
    if match is not None:
        call.route = match.rule.route
    if request.version >= _HTTP_11 and request.headers.get("Expect", "").lower() == "100-continue":
        # RFC 9110 §10.1.1: the caller waits for 100 before sending the body. The request
        # passed our checks, so invite the body now rather than leave the caller to time out
        # (curl waits a second); the Expect header still goes upstream, as it was sent.
        request.send_continue()
    await _request_body(state, request, call)
    if match is not None:
        call.facts = request_facts(match, raw_query=call.query, headers=request.headers, body=call.body)


async def _request_body(state: ListenerState, request: IncomingRequest, call: Call) -> None:
    """Decide how the body goes upstream, reading it only when a rule needs it and it is small."""
    config = state.config
    limit = config.inspect_body_limit
    reading = body_reading(
        call.match,
        has_body=request.body_exists,
        content_type=request.content_type,
        content_length=call.content_length,
        limit=limit,
    )
    if reading is BodyReading.NO_BODY:
        return
    content = request.content
    if reading is BodyReading.READ:
        length = call.content_length
        call.body = call.data = await content.readexactly(length) if length else b""
        return
    if reading is BodyReading.READ_UP_TO_LIMIT:
        # Chunked and of unknown size: read up to the cap; past it, forward what we read and
        # stream the rest, and do not inspect (a half-read JSON body names nothing reliably).
        buffer = bytearray()
        while len(buffer) <= limit:
            chunk = await content.read(CHUNK_SIZE)
            if not chunk:
                call.body = call.data = bytes(buffer)
                return
            buffer += chunk
        call.data = prefixed(bytes(buffer), content, CHUNK_SIZE)
    else:
        call.data = content
    max_body = config.limits.max_body_size
    if max_body is not None and call.content_length is None:
        # Chunked: the size is known only while it streams. Count, and abort the upstream
        # request the moment it passes the limit, so the upstream never sees a whole body.
        call.data = capped(call.data, max_body, CHUNK_SIZE)


def open_spans(state: ListenerState, request: IncomingRequest, call: Call) -> None:
    """Step 5: the parent per the trust policy, the SERVER span, then its CLIENT child."""
    tracing = state.tracing
    mode = state.span_mode
    call.trusted = state.trust.trusts(request.remote)
    parent, links, call.extracted = state.propagation.parent(request.headers, call.trusted)
    call.name = A.span_name(call.method, call.route)
    server = mode.server(
        tracing, call.name, parent, links, call.route, _order_trace(state, parent, call.facts)
    )
    call.server_span = server
    call.recording = server.is_recording()
    if call.recording:
        # Built only for a span that records (dashboard polling is sampled at 1 %).
        call.attrs = _server_attributes(state, request, call)
        cast(ProxySpan, server).set_own_attributes(call.attrs)
        call.client_attrs = _client_attributes(state, call.attrs)
    else:
        call.attrs = _log_attributes(state, call.method, call.facts)
    context = server.get_span_context()
    call.server_context = context
    call.trace_id = format_trace_id(context.trace_id)
    call.client_span = mode.client(tracing, call.name, context, call.client_attrs)


def outbound_headers(state: ListenerState, request: IncomingRequest, call: Call) -> HeaderList:
    """Step 6: the upstream's fields: the forwarding policy's, then our CLIENT span's trace context."""
    headers = upstream_request_headers(
        call.fields,
        policy=state.forward_policy,
        client_ip=request.remote or "unknown",
        scheme=request.scheme,
        host=request.host,
        drop_trace_headers=True,
    )
    headers = state.propagation.inject(headers, call.client_span, call.extracted)
    if not call.trusted:
        # W3C Baggage from a caller we do not trust is not passed on: it could steer what
        # the services behind us record or decide.
        headers = [(n, v) for n, v in headers if n.lower() != "baggage"]
    return headers


def _order_trace(state: ListenerState, parent: SpanContext | None, facts: OrderFacts) -> int | None:
    """``trace-per-order``: the order's trace id for a call with no usable trace context."""
    if state.correlation != "trace-per-order" or facts.order_id is None:
        return None
    has_parent = parent is not None and parent.is_valid
    order_id = state.redactor.value(facts.order_id)
    tracked = facts.status is not None or (state.orders is not None and order_id in state.orders)
    return order_trace_for(state.correlation, order_id, has_parent=has_parent, tracked=tracked)


def _server_attributes(
    state: ListenerState, request: IncomingRequest, call: Call
) -> dict[str, AttributeValue]:
    """The recording SERVER span's attributes: the request's (``exchange``), then the connection's."""
    headers = request.headers
    attrs = span_attributes(
        method=call.method,
        path=call.path,
        query=call.query,
        match=call.match,
        listener=state.config.name,
        facts=call.facts,
        redactor=state.redactor,
        user=user_pseudonym(state.user_id_key, state.user_id_header, headers),
    )
    attrs[A.URL_SCHEME] = request.scheme
    attrs[A.NETWORK_PROTOCOL_VERSION] = f"{request.version.major}.{request.version.minor}"
    connection_attributes(
        attrs, state.redactor, host=request.host, peer=request.remote, headers=headers.items()
    )
    return attrs


def _client_attributes(state: ListenerState, attrs: dict[str, AttributeValue]) -> dict[str, AttributeValue]:
    """The recording CLIENT span's start attributes, from the SERVER span's."""
    upstream = state.config.upstream
    client: dict[str, AttributeValue] = {
        A.HTTP_REQUEST_METHOD: attrs[A.HTTP_REQUEST_METHOD],
        A.SERVER_ADDRESS: upstream.host,
        A.SERVER_PORT: upstream.port,
        A.URL_FULL: upstream.origin
        + str(attrs[A.URL_PATH])
        + (f"?{attrs[A.URL_QUERY]!s}" if A.URL_QUERY in attrs else ""),
    }
    original = attrs.get(A.HTTP_REQUEST_METHOD_ORIGINAL)
    if original is not None:
        client[A.HTTP_REQUEST_METHOD_ORIGINAL] = original
    return client


def _log_attributes(state: ListenerState, method: str, facts: OrderFacts) -> dict[str, AttributeValue]:
    """The few values the access log and metrics need when the span does not record."""
    attrs: dict[str, AttributeValue] = {A.HTTP_REQUEST_METHOD: A.method_attribute(method)}
    if facts.order_id is not None:
        attrs[A.MES_ORDER_ID] = state.redactor.value(facts.order_id)
    if facts.status is not None:
        attrs[A.MES_ORDER_STATUS] = state.redactor.value(facts.status)
    return attrs
