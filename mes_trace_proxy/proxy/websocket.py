"""WebSocket pass-through: the operator dashboard's live channel, with one span per connection.

The listener hands each upgrade, with its connection, to aiohttp's server, which runs
:func:`make_upgrade_handler`. The upgrade is re-done on each side (aiohttp negotiates its own
``Sec-WebSocket-Key``), and frames are relayed unchanged in both directions until either side
closes. The request's checks, forwarded fields and trace context are the handler's:
``exchange.refusal``, ``forwarding.upstream_request_headers(upgrade=True)`` and the listener's
``Propagation`` (an untrusted caller's span becomes a link, as on plain requests).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Final

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from opentelemetry import trace as trace_api
from opentelemetry.trace import Status, StatusCode
from opentelemetry.util.types import AttributeValue
from yarl import URL

from mes_trace_proxy.core import attributes as A
from mes_trace_proxy.core.exchange import refusal
from mes_trace_proxy.core.forwarding import upstream_request_headers, websocket_subprotocols
from mes_trace_proxy.core.problems import (
    PROBLEM_CONTENT_TYPE,
    UpstreamFailure,
    failure_response,
    problem_fields,
    rejection_response,
)
from mes_trace_proxy.core.rules import RouteMatch
from mes_trace_proxy.core.tracecontext import format_span_id, format_trace_id
from mes_trace_proxy.proxy.handler_state import ListenerState, one_spelling
from mes_trace_proxy.proxy.recording import record_own_answer
from mes_trace_proxy.proxy.relay import classify_failure

__all__ = ["EVENT_WS_CLOSED", "make_upgrade_handler", "proxy_websocket"]

EVENT_WS_CLOSED: Final = "websocket.closed"
_Socket = web.WebSocketResponse | aiohttp.ClientWebSocketResponse


def make_upgrade_handler(state: ListenerState) -> Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]:
    """The handler of the WebSocket upgrades the listener hands to aiohttp's server.

    The same checks as ``proxy.handle`` run first. Whatever is not a relayed WebSocket is
    answered and the connection closed: only the upgrade itself was handed over.
    """

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        started = time.perf_counter()
        method = request.method
        raw = request.raw_path
        headers = request.headers
        rejection = refusal(
            method,
            raw,
            tuple(headers.items()),
            headers.values(),
            chunked="Transfer-Encoding" in headers,
            underscore=state.forward_policy.underscore,
            content_length=None,
            max_body_size=None,
        )
        if rejection is not None:
            status, body = rejection_response(rejection, trace_id=None)
            refused = web.Response(status=status, body=body)
            for name, value in problem_fields(rejection):
                refused.headers.add(name, value)
            refused.force_close()
            record_own_answer(state, method, status, rejection.slug, started, len(body))
            return refused
        match = state.config.rules.match(method, raw.partition("?")[0])
        if state.span_mode.instruments_client:
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


async def _pump(source: _Socket, sink: _Socket, counter: list[int]) -> None:
    """Relay one direction's frames unchanged, then the close code."""
    async for message in source:
        if message.type is aiohttp.WSMsgType.TEXT:
            await sink.send_str(message.data)
        elif message.type is aiohttp.WSMsgType.BINARY:
            await sink.send_bytes(message.data)
        elif message.type is aiohttp.WSMsgType.PING:
            await sink.ping(message.data)
        elif message.type is aiohttp.WSMsgType.PONG:
            await sink.pong(message.data)
        else:
            break
        counter[0] += 1
    await sink.close(code=source.close_code or aiohttp.WSCloseCode.OK)


def _start_span(
    request: web.BaseRequest, state: ListenerState, route: str | None
) -> tuple[trace_api.Span, bool]:
    """The connection's SERVER span, parented per the trust policy; and whether the caller is trusted."""
    tracing = state.tracing
    trusted = state.trust.trusts(request.remote)
    parent, links, _ = state.propagation.parent(request.headers, trusted)
    method = request.method
    span = state.span_mode.server(tracing, A.span_name(method, route), parent, links, route, None)
    if span.is_recording():
        attrs: dict[str, AttributeValue] = {
            A.HTTP_REQUEST_METHOD: method,
            A.URL_PATH: state.redactor.path(request.raw_path.partition("?")[0]),
            A.URL_SCHEME: request.scheme,
            A.MES_LISTENER: state.config.name,
        }
        span.set_attributes(attrs)
    return span, trusted


def _upstream_headers(
    request: web.BaseRequest, state: ListenerState, span: trace_api.Span, trusted: bool
) -> CIMultiDict[str]:
    """The upgrade's fields for the upstream: the forwarding policy's, and the SERVER span's context."""
    headers = upstream_request_headers(
        tuple(request.headers.items()),
        policy=state.forward_policy,
        client_ip=request.remote or "unknown",
        scheme=request.scheme,
        host=request.host,
        drop_trace_headers=True,
        upgrade=True,
    )
    headers = state.propagation.for_relay().inject(headers, span, None)
    if not trusted:
        # As on plain requests: untrusted baggage stops here.
        headers = [(n, v) for n, v in headers if n.lower() != "baggage"]
    return CIMultiDict(one_spelling(headers))


async def proxy_websocket(
    request: web.BaseRequest, state: ListenerState, match: RouteMatch | None, started: float
) -> web.StreamResponse:
    """Relay one WebSocket connection; the SERVER span covers the connection's life."""
    route = match.rule.route if match is not None else None
    span, trusted = _start_span(request, state, route)
    upstream = state.config.upstream
    scheme = "wss" if upstream.scheme == "https" else "ws"
    url = URL(f"{scheme}://{upstream.host_header}{upstream.base_path}{request.raw_path}", encoded=True)
    frames = [0]
    status = 101
    try:
        try:
            upstream_ws = await state.session.ws_connect(
                url,
                headers=_upstream_headers(request, state, span, trusted),
                protocols=websocket_subprotocols(tuple(request.headers.items())),
                autoping=False,
            )
        except (TimeoutError, aiohttp.ClientError) as exc:
            failure = (
                UpstreamFailure.INVALID_RESPONSE
                if isinstance(exc, aiohttp.WSServerHandshakeError)
                else classify_failure(exc)
            )
            span.set_attribute(A.ERROR_TYPE, failure.value)
            status, body = failure_response(
                failure, trace_id=format_trace_id(span.get_span_context().trace_id)
            )
            return web.Response(status=status, body=body, content_type=PROBLEM_CONTENT_TYPE)
        async with upstream_ws:
            return await _relay(request, upstream_ws, frames)
    finally:
        # Recorded here, not after the relay: the caller closing its socket cancels the
        # handler mid-close, and the span must still say how much went through.
        _record(state, request, span, route, status, frames[0], started)


async def _relay(
    request: web.BaseRequest, upstream_ws: aiohttp.ClientWebSocketResponse, frames: list[int]
) -> web.WebSocketResponse:
    """Accept the caller's upgrade (the upstream's subprotocol); pump frames both ways until one closes."""
    # autoclose off: the caller's close goes to MES first, and the caller gets its reply after
    # (an immediate reply lets the caller hang up, which cancels this handler before MES is told).
    downstream = web.WebSocketResponse(
        protocols=(upstream_ws.protocol,) if upstream_ws.protocol else (), autoping=False, autoclose=False
    )
    await downstream.prepare(request)
    to_upstream = asyncio.ensure_future(_pump(downstream, upstream_ws, frames))
    to_client = asyncio.ensure_future(_pump(upstream_ws, downstream, frames))
    try:
        await asyncio.wait((to_upstream, to_client), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (to_upstream, to_client):
            task.cancel()
        await asyncio.gather(to_upstream, to_client, return_exceptions=True)
        await downstream.close()
    return downstream


def _record(
    state: ListenerState,
    request: web.BaseRequest,
    span: trace_api.Span,
    route: str | None,
    status: int,
    frames: int,
    started: float,
) -> None:
    """End the connection's span and count it in the metrics and the access log."""
    if status == 101:
        span.add_event(EVENT_WS_CLOSED, {"websocket.frames": frames})
    span.set_attribute(A.HTTP_RESPONSE_STATUS_CODE, status)
    error_type = None if status < 400 else str(status)
    if status >= 500:
        span.set_status(Status(StatusCode.ERROR))
    span.end()
    duration = time.perf_counter() - started
    method = A.method_attribute(request.method)
    state.observer.request_done(
        listener=state.config.name,
        route=route or "",
        method=method,
        status=status,
        duration=duration,
        upstream_duration=None,
        error_type=error_type,
    )
    if state.access_log is not None:
        context = span.get_span_context()
        state.access_log.request(
            state.config.name,
            method,
            route or "",
            status,
            duration * 1000,
            0,
            format_trace_id(context.trace_id),
            format_span_id(context.span_id),
            None,
            error_type,
        )
