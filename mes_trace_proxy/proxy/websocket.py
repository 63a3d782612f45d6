"""WebSocket pass-through: the operator dashboard's live channel, with one span per connection.

The upgrade is re-done on each side (aiohttp negotiates its own ``Sec-WebSocket-Key``),
and frames are relayed unchanged in both directions until either side closes.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Final

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from opentelemetry import trace as trace_api
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.util.types import AttributeValue
from yarl import URL

from mes_trace_proxy.core import attributes as A
from mes_trace_proxy.core.forwarding import upstream_request_headers, websocket_subprotocols
from mes_trace_proxy.core.problems import PROBLEM_CONTENT_TYPE, UpstreamFailure, failure_response
from mes_trace_proxy.core.rules import RouteMatch
from mes_trace_proxy.core.tracecontext import format_trace_id
from mes_trace_proxy.telemetry.span_context import incoming_context

if TYPE_CHECKING:
    from mes_trace_proxy.proxy.handler import ListenerState

__all__ = ["proxy_websocket"]

# The handshake fields each side negotiates for itself; forwarding the client's would make
# the upstream answer a key it was never sent.
_HANDSHAKE: Final = frozenset(
    {"sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions", "sec-websocket-protocol"}
)
EVENT_WS_CLOSED: Final = "websocket.closed"


async def _pump(
    source: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
    sink: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
    counter: list[int],
) -> None:
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


async def proxy_websocket(
    request: web.BaseRequest, state: ListenerState, match: RouteMatch | None, started: float
) -> web.StreamResponse:
    """Relay one WebSocket connection; the SERVER span covers the connection's life."""
    from mes_trace_proxy.proxy.handler import classify_failure, one_spelling

    method = request.method
    path, _, _query = request.raw_path.partition("?")
    route = match.rule.route if match is not None else None
    tracer = state.tracing.tracer
    attrs: dict[str, AttributeValue] = {
        A.HTTP_REQUEST_METHOD: method,
        A.URL_PATH: state.redactor.path(path),
        A.URL_SCHEME: request.scheme,
        A.MES_LISTENER: state.config.name,
    }
    if route:
        attrs[A.HTTP_ROUTE] = route
    tracing = state.tracing
    context = (
        incoming_context(request.headers, tracing.propagator, w3c=tracing.w3c, redactor=state.redactor)
        if state.trust.trusts(request.remote)
        else None
    )
    span = tracer.start_span(
        A.span_name(method, route),
        context=context,
        kind=SpanKind.SERVER,
        attributes=attrs,
        record_exception=False,
        set_status_on_exception=False,
    )
    headers = [
        (name, value)
        for name, value in upstream_request_headers(
            tuple(request.headers.items()),
            policy=state.forward_policy,
            client_ip=request.remote or "unknown",
            scheme=request.scheme,
            host=request.host,
            drop_trace_headers=True,
        )
        if name.lower() not in _HANDSHAKE
    ]
    carrier: dict[str, str] = {}
    state.tracing.propagator.inject(carrier, context=trace_api.set_span_in_context(span))
    out = CIMultiDict(one_spelling(headers))
    out.update(carrier)
    if not state.trust.trusts(request.remote):
        out.popall("baggage", None)  # as in proxy.handle: untrusted baggage stops here
    upstream = state.config.upstream
    scheme = "wss" if upstream.scheme == "https" else "ws"
    url = URL(f"{scheme}://{upstream.host_header}{upstream.base_path}{request.raw_path}", encoded=True)
    frames = [0]
    status = 101
    try:
        try:
            upstream_ws = await state.session.ws_connect(
                url,
                headers=out,
                protocols=websocket_subprotocols(tuple(request.headers.items())),
                autoping=False,
            )
        except aiohttp.WSServerHandshakeError as exc:
            status = exc.status or 502
            failure = UpstreamFailure.INVALID_RESPONSE
            span.set_attribute(A.ERROR_TYPE, failure.value)
            code, body = failure_response(failure, trace_id=format_trace_id(span.get_span_context().trace_id))
            status = code
            return web.Response(status=code, body=body, content_type=PROBLEM_CONTENT_TYPE)
        except (TimeoutError, aiohttp.ClientError) as exc:
            failure = classify_failure(exc)
            span.set_attribute(A.ERROR_TYPE, failure.value)
            span.set_status(Status(StatusCode.ERROR, failure.value))
            code, body = failure_response(failure, trace_id=format_trace_id(span.get_span_context().trace_id))
            status = code
            return web.Response(status=code, body=body, content_type=PROBLEM_CONTENT_TYPE)
        async with upstream_ws:
            downstream = web.WebSocketResponse(
                protocols=(upstream_ws.protocol,) if upstream_ws.protocol else (), autoping=False
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
    finally:
        # Recorded here, not after the relay: the caller closing its socket cancels the
        # handler mid-close, and the span must still say how much went through.
        if status == 101:
            span.add_event(EVENT_WS_CLOSED, {"websocket.frames": frames[0]})
        span.set_attribute(A.HTTP_RESPONSE_STATUS_CODE, status)
        if status >= 500:
            span.set_status(Status(StatusCode.ERROR))
        span.end()
        state.observer.request_done(
            listener=state.config.name,
            route=route or "",
            method=method,
            status=status,
            duration=time.perf_counter() - started,
            upstream_duration=None,
            error_type=None if status < 400 else str(status),
        )
