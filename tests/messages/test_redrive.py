"""Re-drive: what is published (a table), and at-most-once publishing with confirms against a real broker."""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import time
from collections.abc import Iterator

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from mes_trace_proxy.messages.deadletter import DEFAULT_MESSAGE_RULES, Message, XDeath, compile_message_rules
from mes_trace_proxy.messages.held import HeldMessage, MemoryHeldStore, hold
from mes_trace_proxy.messages.redrive import REDRIVE_COUNT_HEADER, Redriver, outgoing
from mes_trace_proxy.messages.spans import dead_letter_span
from mes_trace_proxy.tracecontext import parse_traceparent
from tests.messages.conftest import RabbitServer, Topology, declare_topology
from tests.messages.test_watcher import WAIT_S, _expire, _next, watching

RULES = compile_message_rules(list(DEFAULT_MESSAGE_RULES), key="message_rules")
T0 = datetime.datetime(2026, 12, 7, 12, 0, 0, tzinfo=datetime.UTC)
TP = "00-" + "1" * 32 + "-" + "2" * 16 + "-01"


def _death(
    queue: str, exchange: str = "mes.commands", key: str = "price.calculate", **over: object
) -> dict[str, object]:
    entry: dict[str, object] = {"queue": queue, "reason": "expired", "count": 1, "exchange": exchange,
                                "routing-keys": [key], "time": T0, "original-expiration": "30000"}  # fmt: skip  # noqa: E501
    entry.update(over)
    return entry


def _held(x_death: list[dict[str, object]] | None, **headers: object) -> HeldMessage:
    all_headers: dict[str, object] = {"traceparent": TP, "tracestate": "v=1", "x-app": "kept"}
    if x_death is not None:
        all_headers["x-death"] = x_death
        all_headers["x-first-death-queue"] = x_death[-1]["queue"]
        all_headers["x-first-death-reason"] = "expired"
        all_headers["x-first-death-exchange"] = "mes.commands"
    all_headers.update(headers)
    props = {
        "message_id": "m-1",
        "content_type": "application/json",
        "user_id": "crm",
        "timestamp": T0,
        "priority": 3,
    }
    message = Message(
        body=b'{"orderId":"ORD-1"}', headers=all_headers, exchange="mes.dlx", routing_key="price.calculate"
    )
    return hold(message, props, consumed_from="mes.dead-letters", rules=RULES, now=1.0)


NEW_TP = "00-" + "3" * 32 + "-" + "4" * 16 + "-01"


@pytest.mark.parametrize(
    ("held", "restore", "exchange", "key", "expiration", "count"),
    [
        (_held([_death("mes.price.requests")]), False, "mes.commands", "price.calculate", None, 1),
        (_held([_death("mes.price.requests")]), True, "mes.commands", "price.calculate", "30000", 1),
        # died twice (work queue, then the dead-letter queue's own TTL): goes to the work queue's exchange
        (_held([_death("mes.dead-letters", exchange="mes.dlx", key="x"), _death("mes.price.requests")]), False,  # noqa: E501
         "mes.commands", "price.calculate", None, 1),
        # the default exchange: routing key = queue name
        (_held([_death("q1", exchange="", key="q1")], **{REDRIVE_COUNT_HEADER: 2}), False, "", "q1", None, 3),
    ],
)  # fmt: skip
def test_outgoing_message(
    held: HeldMessage, restore: bool, exchange: str, key: str, expiration: str | None, count: int
) -> None:
    out = outgoing(held, traceparent=NEW_TP, restore_expiration=restore)
    assert out is not None
    assert (out.exchange, out.routing_key, out.body) == (exchange, key, held.body)
    assert out.headers == {
        "traceparent": NEW_TP,
        "tracestate": "v=1",
        "x-app": "kept",
        REDRIVE_COUNT_HEADER: count,
    }
    expected_props = {"message_id": "m-1", "content_type": "application/json", "timestamp": T0, "priority": 3}
    if expiration:
        expected_props["expiration"] = expiration
    assert out.properties == expected_props


@pytest.mark.parametrize("held", [_held(None), _held([_death("q", exchange="", key="")])])
def test_outgoing_without_a_destination(held: HeldMessage) -> None:
    assert outgoing(held, traceparent=None) is None


@pytest.fixture
def exporter() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    yield provider, spans
    provider.shutdown()


def _count_in(channel: AbstractChannel, name: str) -> asyncio.Future[int]:
    async def count() -> int:
        queue = await channel.declare_queue(name, passive=True)
        return int(queue.declaration_result.message_count or 0)

    return asyncio.ensure_future(count())


async def _held_expired(
    rabbitmq: RabbitServer, channel: AbstractChannel, store: MemoryHeldStore
) -> tuple[Topology, HeldMessage]:
    topo = await declare_topology(channel)
    async with watching(rabbitmq.url, store, queues=(topo.dead_letters,)) as (_, arrived):
        await _expire(channel, topo, "ORD-RD", customer={"name": "Anna Canary", "email": "anna@example.com"})
        held = await _next(arrived)
    return topo, held


async def test_redrive_puts_the_message_back_once(
    rabbitmq: RabbitServer,
    amqp_channel: AbstractChannel,
    exporter: tuple[TracerProvider, InMemorySpanExporter],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    provider, spans = exporter
    store = MemoryHeldStore()
    topo, held = await _held_expired(rabbitmq, amqp_channel, store)
    redriver = Redriver(rabbitmq.url, store, provider.get_tracer("t"), redact=str, clock=time.time)
    try:
        # two calls at once: one publishes, the other finds the message claimed
        first, second = await asyncio.gather(
            redriver.redrive_order("ORD-RD", who="admin:alice"),
            redriver.redrive_order("ORD-RD", who="admin:bob"),
        )
        assert sorted([first.outcome, second.outcome]) == ["in_progress", "redriven"]
        third = await redriver.redrive_order("ORD-RD", who="admin:alice")
        assert third.outcome == "nothing_held"
    finally:
        await redriver.close()
    assert await store.count() == 0
    assert await _count_in(amqp_channel, topo.price_requests) == 1
    work = await amqp_channel.get_queue(topo.price_requests)
    again = await work.get(timeout=WAIT_S)
    assert again is not None
    assert again.body == held.body
    assert json.loads(again.body)["orderId"] == "ORD-RD"
    assert (again.message_id, again.content_type) == ("msg-ORD-RD", "application/json")
    assert again.expiration is None  # the TTL that expired once is not restored
    headers = dict(again.headers)
    assert "x-death" not in headers
    assert "x-first-death-queue" not in headers
    assert headers[REDRIVE_COUNT_HEADER] == 1
    parsed = parse_traceparent(str(headers["traceparent"]))
    assert parsed is not None
    (producer,) = [s for s in spans.get_finished_spans() if s.kind is SpanKind.PRODUCER]
    assert (parsed[0], parsed[1]) == (producer.context.trace_id, producer.context.span_id)
    assert producer.attributes is not None
    assert producer.attributes["mes.message.redrive.outcome"] == "redriven"
    await again.ack()
    assert redriver.outcomes["redriven"] == 1
    assert redriver.outcomes["in_progress"] == 1
    audit = [r.getMessage() for r in caplog.records if r.name == "mes_trace_proxy.audit"]
    assert len(audit) == 3
    assert any(
        "order=ORD-RD" in line and "outcome=redriven" in line and "by=admin:" in line for line in audit
    )
    # the canary: the customer's name and e-mail in the body reach no span and no log line
    everything = " ".join(caplog.text.split()) + repr(
        [(s.name, s.attributes, s.status) for s in spans.get_finished_spans()]
    )
    assert "Anna" not in everything
    assert "anna@example.com" not in everything


async def test_unroutable_and_unreachable_redrives_keep_the_message(
    rabbitmq: RabbitServer,
    amqp_channel: AbstractChannel,
    exporter: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, _ = exporter
    store = MemoryHeldStore()
    topo, held = await _held_expired(rabbitmq, amqp_channel, store)
    work = await amqp_channel.get_queue(topo.price_requests)
    await work.unbind(topo.commands, routing_key="price.calculate")
    redriver = Redriver(rabbitmq.url, store, provider.get_tracer("t"), redact=str, clock=time.time)
    nowhere = Redriver(
        "amqp://guest:guest@127.0.0.1:1/", store, provider.get_tracer("t"), redact=str, clock=time.time
    )
    try:
        assert (await redriver.redrive_order("ORD-RD", who="admin:a")).outcome == "unroutable"
        assert (await nowhere.redrive_order("ORD-RD", who="admin:a")).outcome == "broker_unavailable"
        assert await store.get(held.key) == held  # kept, and claimable again
        await work.bind(topo.commands, routing_key="price.calculate")
        assert (await redriver.redrive_order("ORD-RD", who="admin:a")).outcome == "redriven"
    finally:
        await redriver.close()
        await nowhere.close()


async def test_a_deleted_exchange_is_unroutable_then_recovers(
    rabbitmq: RabbitServer,
    amqp_channel: AbstractChannel,
    exporter: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, _ = exporter
    store = MemoryHeldStore()
    topo, _held_message = await _held_expired(rabbitmq, amqp_channel, store)
    await amqp_channel.exchange_delete(topo.commands)
    redriver = Redriver(rabbitmq.url, store, provider.get_tracer("t"), redact=str, clock=time.time)
    try:
        assert (await redriver.redrive_order("ORD-RD", who="admin:a")).outcome == "unroutable"
        commands = await amqp_channel.declare_exchange(topo.commands, aio_pika.ExchangeType.DIRECT)
        work = await amqp_channel.get_queue(topo.price_requests)
        await work.bind(commands, routing_key="price.calculate")
        assert (await redriver.redrive_order("ORD-RD", who="admin:a")).outcome == "redriven"
    finally:
        await redriver.close()


def test_dead_letter_span_follows_the_messaging_conventions(
    exporter: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    from mes_trace_proxy.orders import SpanRef

    provider, spans = exporter
    held = _held([_death("mes.price.requests")])
    ref = dead_letter_span(provider.get_tracer("t"), held, order_span=SpanRef(5, 6), redact=str)
    (span,) = spans.get_finished_spans()
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


def test_dead_letter_span_without_links_or_x_death(
    exporter: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, spans = exporter
    held = hold(
        Message(body=b"{}", headers={"traceparent": "garbage"}), {}, consumed_from="dlq", rules=RULES, now=1.0
    )
    dead_letter_span(provider.get_tracer("t"), held, order_span=None, redact=str)
    (span,) = spans.get_finished_spans()
    assert span.links == ()
    assert span.attributes is not None
    assert span.attributes["error.type"] == "missing"


def test_xdeath_routing_key_property() -> None:
    assert XDeath(queue="q", reason="r", count=1, exchange="", routing_keys=(), time=None).routing_key == ""
