"""Spans of the message path: the dead-letter CONSUMER span's shape and links (in-memory exporter)."""

from __future__ import annotations

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from mes_trace_proxy.messages.deadletter import Message, XDeath
from mes_trace_proxy.messages.record import hold
from mes_trace_proxy.messages.spans import dead_letter_span
from tests.message_samples import RULES, death, redrive_sample


def test_dead_letter_span_follows_the_messaging_conventions(
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    from mes_trace_proxy.orders import SpanRef

    provider, exported = spans
    held = redrive_sample([death("mes.price.requests")])
    ref = dead_letter_span(provider.get_tracer("t"), held, order_span=SpanRef(5, 6), redact=str)
    (span,) = exported.get_finished_spans()
    assert (span.name, span.kind) == ("receive mes.dead-letters", SpanKind.CONSUMER)
    assert (ref.trace_id, ref.span_id) == (span.context.trace_id, span.context.span_id)
    assert span.parent is None
    assert dict(span.attributes or {}) == {
        "messaging.system": "rabbitmq",
        "messaging.operation.type": "receive",
        "messaging.operation.name": "receive",
        "messaging.destination.name": "mes.dead-letters",
        "messaging.rabbitmq.destination.routing_key": "price.calculate",
        "messaging.message.id": "m-1",
        "messaging.message.body.size": len(held.body),
        "mes.order.id": "ORD-1",
        "mes.message.death.reason": "expired",
        "mes.message.death.queue": "mes.price.requests",
        "mes.message.death.count": 1,
        "error.type": "expired",
    }
    links = {
        (link.context.trace_id, link.context.span_id): dict(link.attributes or {}) for link in span.links
    }
    assert links == {(int("1" * 32, 16), int("2" * 16, 16)): {"mes.link.kind": "producer"},
                     (5, 6): {"mes.link.kind": "order"}}  # fmt: skip
    assert span.status.description == "price request expired in mes.price.requests after 30 s"


def test_dead_letter_span_without_links_or_xdeath(
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exported = spans
    held = hold(
        Message(body=b"{}", headers={"traceparent": "garbage"}), {}, consumed_from="dlq", rules=RULES, now=1.0
    )
    dead_letter_span(provider.get_tracer("t"), held, order_span=None, redact=str)
    (span,) = exported.get_finished_spans()
    assert span.links == ()
    assert span.attributes is not None
    assert span.attributes["error.type"] == "missing"


def test_xdeath_routing_key_property() -> None:
    assert XDeath(queue="q", reason="r", count=1, exchange="", routing_keys=(), time=None).routing_key == ""
