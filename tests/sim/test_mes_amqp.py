"""Tests for the simulators' RabbitMQ side (mes_trace_proxy/sim/mes_amqp.py), on the session broker.

The reference topology has fixed names (docs/mes-api.md, "Reference messages"), so every test
starts from a broker without it and removes it afterwards; tests in one session run one at a time.
Passive declares show what exists; a redeclare with the documented type and arguments shows they
are what the docs say (the broker refuses an inequivalent one), and messages show the routing.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import aiormq
import pytest
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage, AbstractQueue

from mes_trace_proxy.sim import mes_amqp
from mes_trace_proxy.sim.mes_amqp import MesPricer, declare_reference, send_price_requests
from mes_trace_proxy.sim.rabbitmq import RabbitServer
from tests.rabbitmq import WAIT_S

DLX_ARGS = {"x-dead-letter-exchange": "mes.dlx"}
#: docs/mes-api.md: exchange → type.
EXCHANGES = {
    "mes.commands": aio_pika.ExchangeType.DIRECT,
    "crm.events": aio_pika.ExchangeType.TOPIC,
    "mes.dlx": aio_pika.ExchangeType.FANOUT,
}
#: Queue → its arguments as declared: every work queue dead-letters to mes.dlx.
QUEUES: dict[str, dict[str, Any]] = {
    "mes.price.requests": DLX_ARGS,
    "mes.order.approved": {**DLX_ARGS, "x-max-length": 1000},
    "crm.price.results": DLX_ARGS,
    "mes.dead-letters": {},
}
#: docs/mes-api.md: (exchange, routing key) → the queue it reaches.
ROUTES = [
    ("mes.commands", "price.calculate", "mes.price.requests"),
    ("mes.commands", "order.approved", "mes.order.approved"),
    ("crm.events", "order.price.calculated", "crm.price.results"),
    ("mes.dlx", "any.key.at.all", "mes.dead-letters"),
]


async def _remove_reference(connection: AbstractConnection) -> None:
    channel = await connection.channel()
    for queue in QUEUES:
        await channel.queue_delete(queue)
    for exchange in EXCHANGES:
        await channel.exchange_delete(exchange)
    await channel.close()


@pytest.fixture
async def connection(rabbitmq: RabbitServer) -> AsyncIterator[AbstractConnection]:
    """A connection to the session broker with no reference topology on it, before and after."""
    conn = await aio_pika.connect(rabbitmq.url, timeout=WAIT_S)
    try:
        await _remove_reference(conn)
        yield conn
        await _remove_reference(conn)
    finally:
        await conn.close()


@pytest.fixture
async def channel(connection: AbstractConnection) -> AbstractChannel:
    """A channel on which the reference topology has been declared."""
    chan = await connection.channel()
    await declare_reference(chan)
    return chan


async def _collect(queue: AbstractQueue) -> asyncio.Queue[AbstractIncomingMessage]:
    """Consume ``queue`` into an asyncio queue (acknowledged on arrival)."""
    arrived: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()

    async def on_message(message: AbstractIncomingMessage) -> None:
        await message.ack()
        arrived.put_nowait(message)

    await queue.consume(on_message)
    return arrived


async def _next(arrived: asyncio.Queue[AbstractIncomingMessage]) -> AbstractIncomingMessage:
    return await asyncio.wait_for(arrived.get(), WAIT_S)


def _death(message: AbstractIncomingMessage) -> dict[str, Any]:
    """The broker's first x-death entry of a dead-lettered message."""
    deaths = message.headers["x-death"]
    assert isinstance(deaths, list)
    assert deaths
    first = deaths[0]
    assert isinstance(first, dict)
    return first


# ── declare_reference ───────────────────────────────────────────────────────────────────────


async def test_declare_reference_declares_the_documented_names(connection: AbstractConnection) -> None:
    probe = await connection.channel()
    with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity):  # nothing before it runs
        await probe.declare_exchange("mes.commands", passive=True)

    await declare_reference(await connection.channel())

    probe = await connection.channel()
    for exchange in EXCHANGES:
        await probe.declare_exchange(exchange, passive=True)
    for queue in QUEUES:
        await probe.declare_queue(queue, passive=True)
    assert tuple(EXCHANGES) == (mes_amqp.COMMANDS, mes_amqp.EVENTS, mes_amqp.DLX)
    assert (mes_amqp.PRICE_REQUESTS, mes_amqp.DEAD_LETTERS) == ("mes.price.requests", "mes.dead-letters")


async def test_declare_reference_is_idempotent(channel: AbstractChannel) -> None:
    await declare_reference(channel)  # CRM and MES both declaring it must not clash


@pytest.mark.parametrize(("name", "kind"), EXCHANGES.items())
async def test_exchanges_have_the_documented_type_and_are_durable(
    channel: AbstractChannel, connection: AbstractConnection, name: str, kind: aio_pika.ExchangeType
) -> None:
    await (await connection.channel()).declare_exchange(name, kind, durable=True)  # equivalent: accepted
    other = next(k for k in EXCHANGES.values() if k != kind)
    with pytest.raises(aiormq.exceptions.ChannelPreconditionFailed, match="inequivalent arg 'type'"):
        await (await connection.channel()).declare_exchange(name, other, durable=True)
    with pytest.raises(aiormq.exceptions.ChannelPreconditionFailed, match="durable"):
        await (await connection.channel()).declare_exchange(name, kind, durable=False)


@pytest.mark.parametrize(("name", "arguments"), QUEUES.items())
async def test_queues_are_durable_with_the_documented_arguments(
    channel: AbstractChannel, connection: AbstractConnection, name: str, arguments: dict[str, Any]
) -> None:
    await (await connection.channel()).declare_queue(name, durable=True, arguments=arguments)
    wrong = {**arguments, "x-dead-letter-exchange": "elsewhere"}
    with pytest.raises(aiormq.exceptions.ChannelPreconditionFailed, match="x-dead-letter-exchange"):
        await (await connection.channel()).declare_queue(name, durable=True, arguments=wrong)
    with pytest.raises(aiormq.exceptions.ChannelPreconditionFailed, match="durable"):
        await (await connection.channel()).declare_queue(name, durable=False, arguments=arguments)


@pytest.mark.parametrize(("exchange", "routing_key", "queue"), ROUTES)
async def test_bindings_route_as_documented(
    channel: AbstractChannel, connection: AbstractConnection, exchange: str, routing_key: str, queue: str
) -> None:
    strict = await connection.channel(on_return_raises=True)  # an unroutable message is an error
    body = f"{exchange}/{routing_key}".encode()
    await (await strict.get_exchange(exchange)).publish(aio_pika.Message(body), routing_key=routing_key)
    for name in QUEUES:
        got = await (await channel.get_queue(name)).get(fail=False, timeout=WAIT_S)
        assert (got.body if got is not None else None) == (body if name == queue else None), name


@pytest.mark.parametrize("exchange", ["mes.commands", "crm.events"])
async def test_other_routing_keys_reach_no_queue(connection: AbstractConnection, exchange: str) -> None:
    strict = await connection.channel(on_return_raises=True)
    await declare_reference(strict)
    with pytest.raises(aio_pika.exceptions.DeliveryError):  # returned unroutable: the bindings are exact
        await (await strict.get_exchange(exchange)).publish(
            aio_pika.Message(b"lost"), routing_key="order.other"
        )


# ── send_price_requests ─────────────────────────────────────────────────────────────────────


async def test_send_price_requests_publishes_one_persistent_request_per_order(
    channel: AbstractChannel,
) -> None:
    await send_price_requests(channel, ["ORD-1", "ORD-2", "ORD-3"], ttl_s=30.0, malformed=["ORD-2"])
    queue = await channel.get_queue("mes.price.requests")
    received = []
    while (message := await queue.get(fail=False, timeout=WAIT_S)) is not None:
        await message.ack()
        received.append(message)
    assert [m.message_id for m in received] == ["price-ORD-1", "price-ORD-2", "price-ORD-3"]
    for message in received:
        assert (message.exchange, message.routing_key) == ("mes.commands", "price.calculate")
        assert message.content_type == "application/json"
        assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        assert message.expiration == pytest.approx(30.0)  # seconds, sent as "30000" ms
    docs = [json.loads(m.body) for m in received]
    assert [d["orderId"] for d in docs] == ["ORD-1", "ORD-2", "ORD-3"]
    assert {d["status"] for d in docs} == {"SUBMITTED"}
    assert all(isinstance(d["customer"], dict) and d["customer"] for d in docs)
    assert docs[0]["modelUrl"] == "s3://models/ORD-1.stl"
    assert "modelUrl" not in docs[1]  # the malformed one: MES cannot price it
    assert docs[2]["modelUrl"] == "s3://models/ORD-3.stl"


async def test_send_price_requests_needs_the_declared_exchange(connection: AbstractConnection) -> None:
    with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity):
        await send_price_requests(await connection.channel(), ["ORD-1"], ttl_s=1.0)


# ── MesPricer ───────────────────────────────────────────────────────────────────────────────


async def test_mes_prices_a_request_and_answers_on_crm_events(
    channel: AbstractChannel, connection: AbstractConnection
) -> None:
    results = await _collect(await channel.get_queue("crm.price.results"))
    mes_channel = await connection.channel()
    pricer = MesPricer(mes_channel)
    await pricer.start()
    try:
        await send_price_requests(channel, ["ORD-7"], ttl_s=30.0)
        assert await pricer.wait_priced("ORD-7", within=WAIT_S)
        answer = await _next(results)
    finally:
        await pricer.stop()
        await mes_channel.close()  # an unacknowledged request would go back to the queue now
    assert (answer.exchange, answer.routing_key) == ("crm.events", "order.price.calculated")
    doc = json.loads(answer.body)
    assert doc["orderId"] == "ORD-7"
    assert doc["status"] == "PRICE_CALCULATED"
    assert isinstance(doc["price"], float)
    assert doc["price"] > 0
    assert isinstance(doc["currency"], str)
    assert len(doc["currency"]) == 3
    assert (pricer.priced, pricer.rejected) == (["ORD-7"], 0)
    # The request was acknowledged: the next one sent is the first on the work queue.
    await send_price_requests(channel, ["ORD-NEXT"], ttl_s=30.0)
    first = await (await channel.get_queue("mes.price.requests")).get(fail=False, timeout=WAIT_S)
    assert first is not None
    assert first.message_id == "price-ORD-NEXT"
    await first.ack()


async def test_mes_rejects_what_it_cannot_read_into_the_dead_letter_queue(channel: AbstractChannel) -> None:
    dead = await _collect(await channel.get_queue("mes.dead-letters"))
    results = await _collect(await channel.get_queue("crm.price.results"))
    pricer = MesPricer(channel)
    await pricer.start()
    try:
        await send_price_requests(channel, ["ORD-BAD", "ORD-OK"], ttl_s=30.0, malformed=["ORD-BAD"])
        letter = await _next(dead)
        assert await pricer.wait_priced("ORD-OK", within=WAIT_S)
        assert json.loads((await _next(results)).body)["orderId"] == "ORD-OK"
    finally:
        await pricer.stop()
    assert (pricer.priced, pricer.rejected) == (["ORD-OK"], 1)
    assert letter.message_id == "price-ORD-BAD"
    assert json.loads(letter.body)["orderId"] == "ORD-BAD"  # body kept as sent
    death = _death(letter)
    assert (death["reason"], death["queue"]) == ("rejected", "mes.price.requests")
    assert (death["exchange"], death["routing-keys"]) == ("mes.commands", ["price.calculate"])
    assert dead.empty()


async def test_requests_sent_during_an_outage_expire_into_the_dead_letter_queue(
    channel: AbstractChannel,
) -> None:
    dead = await _collect(await channel.get_queue("mes.dead-letters"))
    pricer = MesPricer(channel)
    await pricer.start()
    await pricer.stop()  # the outage: nothing consumes the work queue now
    await send_price_requests(channel, ["ORD-A", "ORD-B"], ttl_s=0.05)
    letters = [await _next(dead), await _next(dead)]
    assert [m.message_id for m in letters] == ["price-ORD-A", "price-ORD-B"]
    for letter in letters:
        death = _death(letter)
        assert (death["reason"], death["queue"]) == ("expired", "mes.price.requests")
        assert letter.headers["x-first-death-reason"] == "expired"
    # MES back: it prices what is sent now, and priced nothing of the expired ones.
    await pricer.start()
    try:
        await send_price_requests(channel, ["ORD-C"], ttl_s=30.0)
        assert await pricer.wait_priced("ORD-C", within=WAIT_S)
    finally:
        await pricer.stop()
    assert (pricer.priced, pricer.rejected) == (["ORD-C"], 0)


async def test_wait_priced_answers_at_once_when_settled(channel: AbstractChannel) -> None:
    pricer = MesPricer(channel)
    assert not await pricer.wait_priced("ORD-NONE", within=0.0)  # no time left: not priced
    pricer.priced.append("ORD-DONE")
    assert await pricer.wait_priced("ORD-DONE", within=0.0)
    await pricer.stop()  # stopping a pricer that never started is harmless
