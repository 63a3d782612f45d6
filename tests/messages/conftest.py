"""A real RabbitMQ broker for the message-path tests (see mes_trace_proxy/sim/rabbitmq.py), and
helpers that make real dead letters: CI fails where the broker is missing, a laptop skips."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel

from mes_trace_proxy.sim.rabbitmq import RabbitServer, rabbitmq_script

__all__ = ["RabbitServer", "Topology", "declare_topology"]


def _script_or_skip() -> str:
    script = rabbitmq_script()
    if script is None:
        if os.environ.get("CI"):
            pytest.fail(
                "rabbitmq-server is not installed, and CI must run the RabbitMQ tests: make system-deps"
            )
        pytest.skip("rabbitmq-server is not installed (apt-get install rabbitmq-server, or make system-deps)")
    return script


@pytest.fixture(scope="session")
def rabbitmq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitServer]:
    """One broker for the session; tests isolate themselves by unique queue and exchange names."""
    server = RabbitServer(_script_or_skip(), tmp_path_factory.mktemp("rabbitmq"))
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def own_rabbitmq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitServer]:
    """A broker of the test's own, for tests that kill and restart it."""
    server = RabbitServer(_script_or_skip(), tmp_path_factory.mktemp("rabbitmq-own"))
    server.start()
    try:
        yield server
    finally:
        server.close()


@dataclass(frozen=True)
class Topology:
    """A private copy of the reference topology: names carry a unique suffix."""

    commands: str  # direct exchange
    dlx: str  # fanout dead-letter exchange
    price_requests: str  # work queue, dead-letters to dlx
    dead_letters: str  # the dead-letter queue
    small: str  # a work queue holding one message (x-max-length 1)


async def declare_topology(channel: AbstractChannel, *, durable: bool = False) -> Topology:
    """Declare the reference topology under unique names, as the CRM/MES side would."""
    tag = uuid.uuid4().hex[:8]
    topo = Topology(
        commands=f"mes.commands.{tag}",
        dlx=f"mes.dlx.{tag}",
        price_requests=f"mes.price.requests.{tag}",
        dead_letters=f"mes.dead-letters.{tag}",
        small=f"mes.small.{tag}",
    )
    commands = await channel.declare_exchange(topo.commands, aio_pika.ExchangeType.DIRECT, durable=durable)
    dlx = await channel.declare_exchange(topo.dlx, aio_pika.ExchangeType.FANOUT, durable=durable)
    dead = await channel.declare_queue(topo.dead_letters, durable=durable)
    await dead.bind(dlx)
    work = await channel.declare_queue(
        topo.price_requests, durable=durable, arguments={"x-dead-letter-exchange": topo.dlx}
    )
    await work.bind(commands, routing_key="price.calculate")
    small = await channel.declare_queue(
        topo.small, durable=durable, arguments={"x-dead-letter-exchange": topo.dlx, "x-max-length": 1}
    )
    await small.bind(commands, routing_key="order.approved")
    return topo


@pytest.fixture
async def amqp_channel(rabbitmq: RabbitServer) -> AsyncIterator[AbstractChannel]:
    """A channel on the session broker, closed after the test."""
    connection = await aio_pika.connect(rabbitmq.url)
    try:
        yield await connection.channel()
    finally:
        await connection.close()
