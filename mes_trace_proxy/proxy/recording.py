"""Step 8 of a request: what the call did, recorded once — order book, spans, metrics, access log.

``proxy.handle`` calls :func:`record` from its ``finally``, so every call that opened its spans
is recorded exactly once, whatever way it ended; :func:`record_own_answer` records the calls
the proxy answered itself before any span (refusals, ``OPTIONS *``) in the same metric series
and access log.
"""

from __future__ import annotations

import logging
import time
from typing import Final, cast

from multidict import CIMultiDict, CIMultiDictProxy
from opentelemetry import trace as trace_api
from opentelemetry.trace import SpanContext, Status, StatusCode, TraceFlags, TraceState
from opentelemetry.util.types import AttributeValue

from mes_trace_proxy.core import attributes as A
from mes_trace_proxy.core.extract import OrderFacts, response_facts
from mes_trace_proxy.core.orders import Findings, SpanRef
from mes_trace_proxy.core.tracecontext import format_span_id
from mes_trace_proxy.proxy.handler_state import Call, ListenerState
from mes_trace_proxy.telemetry.span_context import span_context
from mes_trace_proxy.telemetry.spans import ProxySpan
from mes_trace_proxy.wire.server import IncomingRequest

__all__ = ["record", "record_own_answer"]

log = logging.getLogger("mes_trace_proxy.proxy")

_DEFAULT_FLAGS: Final = TraceFlags(TraceFlags.DEFAULT)
_DEFAULT_STATE: Final = TraceState()
_FIRST_SPAN_LINK: Final = {A.MES_LINK_KIND: "order.first_span"}
_NO_HEADERS: Final = CIMultiDictProxy(CIMultiDict[str]())


def record_own_answer(
    state: ListenerState, method: str, status: int, error_type: str | None, started: float, sent: int
) -> None:
    """Count and log an answer the proxy gave itself before any span (a refusal, ``OPTIONS *``).

    Args:
        error_type: the problem's slug (``payload_too_large``), as on every other path.
        sent: the answer body's length.
    """
    method = A.method_attribute(method)
    duration = time.perf_counter() - started
    name = state.config.name
    state.observer.request_done(
        listener=name,
        route="",
        method=method,
        status=status,
        duration=duration,
        upstream_duration=None,
        error_type=error_type,
    )
    if state.access_log is not None:
        state.access_log.request(name, method, "", status, duration * 1000, sent, "", "", None, error_type)


def record(state: ListenerState, request: IncomingRequest, call: Call) -> None:
    """Record a call whose spans were opened: the order book, both spans ended, metrics, access log."""
    call.detach()
    try:
        _record(state, request, call)
    except Exception:
        # Recording must never fail a request whose answer is already out; the spans are
        # ended so nothing leaks, and the failure is logged without request data.
        log.exception("recording the exchange failed")
        call.client_span.end()
        call.server_span.end()


def _record(state: ListenerState, request: IncomingRequest, call: Call) -> None:
    attrs = call.attrs
    status = call.status
    error_type = call.error_type
    client_span = call.client_span
    server_span = call.server_span
    findings = None
    logged_order_id = attrs.get(A.MES_ORDER_ID)
    # What the SERVER span learns at the end, set in one call (recording spans only).
    end: dict[str, AttributeValue] = {}
    match = call.match
    if match is not None and status and error_type is None:
        facts = response_facts(
            match,
            call.facts,
            raw_query=call.query,
            request_headers=request.headers,
            response_headers=call.response_headers if call.response_headers is not None else _NO_HEADERS,
            response_body=call.response_body,
        )
        if facts.order_id is not None and A.MES_ORDER_ID not in attrs:
            logged_order_id = state.redactor.value(facts.order_id)
            end[A.MES_ORDER_ID] = logged_order_id
        if call.recording:
            if facts.observed_status is not None:
                end[A.MES_ORDER_STATUS_OBSERVED] = state.redactor.value(facts.observed_status)
            if facts.status is not None and A.MES_ORDER_STATUS not in attrs:
                end[A.MES_ORDER_STATUS] = state.redactor.value(facts.status)
        findings = _record_order(
            state,
            server_span if call.recording else None,
            end,
            facts,
            status,
            state.clock(),
            call.server_context,
        )
    if status:
        if call.upstream_status:
            client_span.set_attribute(A.HTTP_RESPONSE_STATUS_CODE, call.upstream_status)
        end[A.HTTP_RESPONSE_STATUS_CODE] = status
        if status >= 400 and error_type is None:
            client_span.set_attribute(A.ERROR_TYPE, str(status))
            client_span.set_status(Status(StatusCode.ERROR))
        # A stream cut after its status line went out failed the caller as surely as a 502
        # would have: the SERVER span says so, whatever the status line.
        if status >= 500 or error_type is not None:
            end[A.ERROR_TYPE] = error_type or str(status)
            server_span.set_status(Status(StatusCode.ERROR))
    elif error_type is not None:
        end[A.ERROR_TYPE] = error_type
        server_span.set_status(Status(StatusCode.ERROR, error_type))
    if call.content_length is not None:
        end[A.HTTP_REQUEST_BODY_SIZE] = call.content_length
    if call.sent or status:
        end[A.HTTP_RESPONSE_BODY_SIZE] = call.sent
    if call.recording:
        cast(ProxySpan, server_span).set_own_attributes(end)
    client_span.end()
    server_span.end()
    _count(state, call, findings, None if logged_order_id is None else str(logged_order_id))


def _count(state: ListenerState, call: Call, findings: Findings | None, order_id: str | None) -> None:
    """The metrics, the readiness note and the access-log line of a finished call."""
    duration = time.perf_counter() - call.started
    name = state.config.name
    method = str(call.attrs[A.HTTP_REQUEST_METHOD])
    route = call.route or ""
    state.observer.request_done(
        listener=name,
        route=route,
        method=method,
        status=call.status,
        duration=duration,
        upstream_duration=call.upstream_duration,
        error_type=call.error_type,
    )
    if findings is not None:
        state.observer.order_findings(listener=name, findings=findings)
    if state.access_log is not None:
        state.access_log.request(
            name,
            method,
            route,
            call.status,
            duration * 1000,
            call.sent,
            call.trace_id,
            format_span_id(call.server_context.span_id),
            order_id,
            call.error_type,
        )


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
    if span is not None:
        _verdict(state, span, end, findings, ref, None if status is None else redact(status))
    return findings


def _verdict(
    state: ListenerState,
    span: trace_api.Span,
    end: dict[str, AttributeValue],
    findings: Findings,
    ref: SpanRef,
    status: str | None,
) -> None:
    """The order book's verdict on a recording SERVER span: events, end attributes, the first-span link."""
    transition = findings.transition
    if status is not None:
        event: dict[str, str | bool] = {A.MES_ORDER_STATUS: status}
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
