"""Spans of the message path, by the OpenTelemetry messaging conventions (``messaging.system`` = rabbitmq).

One CONSUMER span per dead letter (``receive mes.dead-letters``), linked to the producer's span
when the message carries ``traceparent`` and to the order's last HTTP span; one PRODUCER span
per re-drive (``publish mes.commands``), the root of a fresh trace linked to the dead-letter
span, whose context becomes the re-driven message's ``traceparent``. Bodies are never
recorded, only their size; ids pass through the privacy redactor.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from opentelemetry import trace as trace_api
from opentelemetry.semconv._incubating.attributes.messaging_attributes import (
    MESSAGING_DESTINATION_NAME,
    MESSAGING_MESSAGE_BODY_SIZE,
    MESSAGING_MESSAGE_ID,
    MESSAGING_OPERATION_NAME,
    MESSAGING_OPERATION_TYPE,
    MESSAGING_RABBITMQ_DESTINATION_ROUTING_KEY,
    MESSAGING_SYSTEM,
)
from opentelemetry.semconv.attributes.error_attributes import ERROR_TYPE
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.util.types import AttributeValue

from mes_trace_proxy.attributes import MES_LINK_KIND, MES_ORDER_ID, MES_ORDER_STATUS
from mes_trace_proxy.messages.record import HeldMessage
from mes_trace_proxy.orders import SpanRef
from mes_trace_proxy.tracecontext import format_traceparent, parse_traceparent

__all__ = [
    "MES_MESSAGE_DEATH_COUNT",
    "MES_MESSAGE_DEATH_QUEUE",
    "MES_MESSAGE_DEATH_REASON",
    "MES_MESSAGE_REDRIVE_OUTCOME",
    "dead_letter_span",
    "redrive_span",
    "traceparent_of",
]

MES_MESSAGE_DEATH_REASON: Final = "mes.message.death.reason"
MES_MESSAGE_DEATH_QUEUE: Final = "mes.message.death.queue"
MES_MESSAGE_DEATH_COUNT: Final = "mes.message.death.count"
MES_MESSAGE_REDRIVE_OUTCOME: Final = "mes.message.redrive.outcome"
_RABBITMQ: Final = "rabbitmq"


def _producer_link(held: HeldMessage) -> Link | None:
    raw = held.headers.get("traceparent")
    text = raw.decode("ascii", errors="replace") if isinstance(raw, bytes) else raw
    if not isinstance(text, str):
        return None
    parsed = parse_traceparent(text)
    if parsed is None:
        return None
    trace_id, span_id, flags = parsed
    context = SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(flags & 0x01))
    return Link(context, {MES_LINK_KIND: "producer"})


def _link(ref: SpanRef | None, kind: str) -> Link | None:
    if ref is None or not ref.is_valid:
        return None
    return Link(SpanContext(ref.trace_id, ref.span_id, is_remote=False), {MES_LINK_KIND: kind})


def _common(held: HeldMessage, redact: Callable[[str], str]) -> dict[str, AttributeValue]:
    attrs: dict[str, AttributeValue] = {
        MESSAGING_SYSTEM: _RABBITMQ,
        MESSAGING_MESSAGE_BODY_SIZE: len(held.body),
    }
    message_id = held.properties.get("message_id")
    if isinstance(message_id, str) and message_id:
        attrs[MESSAGING_MESSAGE_ID] = redact(message_id)
    if held.order_id is not None:
        attrs[MES_ORDER_ID] = redact(held.order_id)
    if held.status is not None:
        attrs[MES_ORDER_STATUS] = redact(held.status)
    death = held.death
    if death is not None:
        attrs[MESSAGING_RABBITMQ_DESTINATION_ROUTING_KEY] = redact(death.routing_key)
        attrs[MES_MESSAGE_DEATH_REASON] = death.reason
        attrs[MES_MESSAGE_DEATH_QUEUE] = death.queue
        attrs[MES_MESSAGE_DEATH_COUNT] = death.count
    return attrs


def dead_letter_span(
    tracer: trace_api.Tracer,
    held: HeldMessage,
    *,
    order_span: SpanRef | None,
    redact: Callable[[str], str],
) -> SpanRef:
    """Record the CONSUMER span of one dead letter; returns its reference (invalid when not sampled)."""
    links = [link for link in (_producer_link(held), _link(order_span, "order")) if link is not None]
    attrs = _common(held, redact)
    attrs[MESSAGING_OPERATION_TYPE] = "receive"
    attrs[MESSAGING_OPERATION_NAME] = "receive"
    attrs[MESSAGING_DESTINATION_NAME] = held.consumed_from
    at = int(held.received_at * 1e9)
    span = tracer.start_span(
        f"receive {held.consumed_from}",
        context=trace_api.set_span_in_context(trace_api.INVALID_SPAN),  # a root: a new trace
        kind=SpanKind.CONSUMER,
        attributes=attrs,
        links=links,
        start_time=at,
    )
    death = held.death
    span.set_attribute(ERROR_TYPE, death.reason if death is not None else (held.problem or "unknown"))
    span.set_status(Status(StatusCode.ERROR, held.cause))
    span.end(end_time=at)
    context = span.get_span_context()
    return SpanRef(context.trace_id, context.span_id)


def redrive_span(
    tracer: trace_api.Tracer, held: HeldMessage, *, redact: Callable[[str], str]
) -> trace_api.Span:
    """Start the PRODUCER span of a re-drive (the caller sets the outcome and ends it)."""
    links = [link for link in (_link(SpanRef(held.span_trace_id, held.span_id), "dead_letter"),) if link]
    death = held.death
    exchange = death.exchange if death is not None else held.exchange
    attrs = _common(held, redact)
    attrs[MESSAGING_OPERATION_TYPE] = "send"
    attrs[MESSAGING_OPERATION_NAME] = "publish"
    attrs[MESSAGING_DESTINATION_NAME] = exchange or "amq.default"
    return tracer.start_span(
        f"publish {exchange or 'amq.default'}",
        context=trace_api.set_span_in_context(trace_api.INVALID_SPAN),
        kind=SpanKind.PRODUCER,
        attributes=attrs,
        links=links,
    )


def traceparent_of(span: trace_api.Span) -> str | None:
    """The ``traceparent`` to put on a message published under ``span`` (``None`` when invalid)."""
    context = span.get_span_context()
    if not context.is_valid:
        return None
    return format_traceparent(context.trace_id, context.span_id, int(context.trace_flags))
