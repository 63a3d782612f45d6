"""Re-drive: what is published (a table), and at-most-once publishing with confirms against a real broker."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from mes_trace_proxy.messages.held import MemoryHeldStore
from mes_trace_proxy.messages.record import HeldMessage
from mes_trace_proxy.messages.redrive import REDRIVE_COUNT_HEADER, Redriver, outgoing
from mes_trace_proxy.tracecontext import parse_traceparent
from tests.message_samples import T0, death, redrive_sample
from tests.rabbitmq import WAIT_S, RabbitServer, Topology, declare_topology, expire, next_held, watching

NEW_TP = "00-" + "3" * 32 + "-" + "4" * 16 + "-01"


@pytest.mark.parametrize(
    ("held", "restore", "exchange", "key", "expiration", "count"),
    [
        (redrive_sample([death("mes.price.requests")]), False, "mes.commands", "price.calculate", None, 1),
        (redrive_sample([death("mes.price.requests")]), True, "mes.commands", "price.calculate", "30000", 1),
        # died twice (work queue, then the dead-letter queue's own TTL): goes to the work queue's exchange
        (redrive_sample([death("mes.dead-letters", exchange="mes.dlx", key="x"), death("mes.price.requests")]), False,  # noqa: E501
         "mes.commands", "price.calculate", None, 1),
        # the default exchange: routing key = queue name
        (redrive_sample([death("q1", exchange="", key="q1")], **{REDRIVE_COUNT_HEADER: 2}), False, "", "q1", None, 3),  # noqa: E501
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


@pytest.mark.parametrize("held", [redrive_sample(None), redrive_sample([death("q", exchange="", key="")])])
def test_outgoing_without_a_destination(held: HeldMessage) -> None:
    assert outgoing(held, traceparent=None) is None


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
        await expire(channel, topo, "ORD-RD", customer={"name": "Anna Canary", "email": "anna@example.com"})
        held = await next_held(arrived)
    return topo, held


async def test_redrive_puts_the_message_back_once(
    rabbitmq: RabbitServer,
    amqp_channel: AbstractChannel,
    spans: tuple[TracerProvider, InMemorySpanExporter],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    provider, exported = spans
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
    (producer,) = [s for s in exported.get_finished_spans() if s.kind is SpanKind.PRODUCER]
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
        [(s.name, s.attributes, s.status) for s in exported.get_finished_spans()]
    )
    assert "Anna" not in everything
    assert "anna@example.com" not in everything


async def test_unroutable_and_unreachable_redrives_keep_the_message(
    rabbitmq: RabbitServer,
    amqp_channel: AbstractChannel,
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, _ = spans
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
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, _ = spans
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
