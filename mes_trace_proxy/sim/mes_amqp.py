"""The simulators' RabbitMQ side: the reference topology, CRM sending price requests, MES pricing them.

The demo's message path (docs/mes-api.md, "Reference messages"): the CRM publishes price
requests to ``mes.commands`` / ``price.calculate`` with a per-message TTL; MES consumes
``mes.price.requests`` and answers on ``crm.events`` / ``order.price.calculated``. During a
simulated MES outage nothing consumes, so requests sent then expire and the broker
dead-letters them through ``mes.dlx`` into ``mes.dead-letters``; MES rejects a request it
cannot read, which dead-letters it too. Every outcome is deterministic (no timing races).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass, field

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue
from aiormq.abc import FieldValue

__all__ = [
    "COMMANDS",
    "DEAD_LETTERS",
    "DLX",
    "EVENTS",
    "PRICE_REQUESTS",
    "MesPricer",
    "declare_reference",
    "send_price_requests",
]

COMMANDS = "mes.commands"
EVENTS = "crm.events"
DLX = "mes.dlx"
PRICE_REQUESTS = "mes.price.requests"
APPROVED = "mes.order.approved"
PRICE_RESULTS = "crm.price.results"
DEAD_LETTERS = "mes.dead-letters"


async def declare_reference(channel: AbstractChannel) -> None:
    """Declare the reference topology (what CRM and MES own; the proxy declares none of it)."""
    commands = await channel.declare_exchange(COMMANDS, aio_pika.ExchangeType.DIRECT, durable=True)
    events = await channel.declare_exchange(EVENTS, aio_pika.ExchangeType.TOPIC, durable=True)
    dlx = await channel.declare_exchange(DLX, aio_pika.ExchangeType.FANOUT, durable=True)
    dead = await channel.declare_queue(DEAD_LETTERS, durable=True)
    await dead.bind(dlx)
    bounded: dict[str, FieldValue] = {"x-dead-letter-exchange": DLX}
    price = await channel.declare_queue(PRICE_REQUESTS, durable=True, arguments=bounded)
    await price.bind(commands, routing_key="price.calculate")
    approved = await channel.declare_queue(
        APPROVED, durable=True, arguments={**bounded, "x-max-length": 1000}
    )
    await approved.bind(commands, routing_key="order.approved")
    results = await channel.declare_queue(PRICE_RESULTS, durable=True, arguments=bounded)
    await results.bind(events, routing_key="order.price.calculated")


async def send_price_requests(
    channel: AbstractChannel, order_ids: Sequence[str], *, ttl_s: float, malformed: Sequence[str] = ()
) -> None:
    """The CRM side: one persistent price request per order; ``malformed`` ones lack the model URL."""
    commands = await channel.get_exchange(COMMANDS)
    for order_id in order_ids:
        doc: dict[str, object] = {
            "orderId": order_id, "status": "SUBMITTED", "modelUrl": f"s3://models/{order_id}.stl",
            "customer": {"name": "Demo Customer", "email": "customer@example.com"},
        }  # fmt: skip
        if order_id in malformed:
            del doc["modelUrl"]  # MES cannot price an order without its model: it rejects it
        body = json.dumps(doc).encode()
        await commands.publish(
            aio_pika.Message(
                body,
                message_id=f"price-{order_id}",
                content_type="application/json",
                expiration=ttl_s,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key="price.calculate",
        )


@dataclass
class MesPricer:
    """MES taking price requests off ``mes.price.requests``: answers, or rejects what it cannot read."""

    channel: AbstractChannel
    priced: list[str] = field(default_factory=list)
    rejected: int = 0
    _queue: AbstractQueue | None = None
    _tag: str | None = None
    _priced_event: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self) -> None:
        """Begin consuming (the end of the simulated outage)."""
        self._queue = await self.channel.get_queue(PRICE_REQUESTS)
        self._tag = await self._queue.consume(self._on_message)

    async def stop(self) -> None:
        """Stop consuming (the start of an outage)."""
        if self._queue is not None and self._tag is not None:
            await self._queue.cancel(self._tag)
            self._tag = None

    async def wait_priced(self, order_id: str, *, within: float) -> bool:
        """Whether MES priced ``order_id`` within ``within`` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while order_id not in self.priced:
            self._priced_event.clear()
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            try:
                await asyncio.wait_for(self._priced_event.wait(), remaining)
            except TimeoutError:
                return order_id in self.priced
        return True

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        try:
            doc = json.loads(message.body)
            order_id = str(doc["orderId"])
            if not doc.get("modelUrl"):
                raise KeyError("modelUrl")
        except (ValueError, KeyError, TypeError):
            self.rejected += 1
            await message.reject(requeue=False)  # the broker dead-letters it as "rejected"
            return
        events = await self.channel.get_exchange(EVENTS)
        result = {"orderId": order_id, "status": "PRICE_CALCULATED", "price": 1250.0, "currency": "EUR"}
        await events.publish(
            aio_pika.Message(json.dumps(result).encode(), content_type="application/json"),
            routing_key="order.price.calculated",
        )
        await message.ack()
        self.priced.append(order_id)
        self._priced_event.set()
