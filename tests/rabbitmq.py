"""A real RabbitMQ broker for the message-path tests (mes_trace_proxy/sim/rabbitmq.py), and helpers
that make real dead letters and watch them arrive. CI fails where the broker is missing; a laptop
without it skips. tests/conftest.py imports the fixtures, so every test module can use them."""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from mes_trace_proxy.lifecycle import REFERENCE_LIFECYCLE
from mes_trace_proxy.messages.deadletter import DEFAULT_MESSAGE_RULES, compile_message_rules
from mes_trace_proxy.messages.held import HeldStore
from mes_trace_proxy.messages.record import HeldMessage
from mes_trace_proxy.messages.service import MessagePath
from mes_trace_proxy.messages.settings import parse_messages
from mes_trace_proxy.messages.watcher import Watcher, WatcherSettings
from mes_trace_proxy.orders import OrderBook
from mes_trace_proxy.sim.rabbitmq import RabbitServer, rabbitmq_script

__all__ = [
    "WAIT_S",
    "RabbitServer",
    "Running",
    "Topology",
    "amqp_channel",
    "body",
    "declare_topology",
    "expire",
    "next_held",
    "own_rabbitmq",
    "rabbitmq",
    "running_path",
    "script_or_skip",
    "start_path",
    "until",
    "watching",
]


def script_or_skip() -> str:
    """The broker's start script; a skip on a laptop without it, a failure in CI."""
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
    server = RabbitServer(script_or_skip(), tmp_path_factory.mktemp("rabbitmq"))
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def own_rabbitmq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitServer]:
    """A broker of the test's own, for tests that kill and restart it."""
    server = RabbitServer(script_or_skip(), tmp_path_factory.mktemp("rabbitmq-own"))
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


RULES = compile_message_rules(list(DEFAULT_MESSAGE_RULES), key="message_rules")
#: Bound for every wait on the broker: far above the milliseconds each step takes.
WAIT_S = 20.0


def body(order_id: str, **extra: object) -> bytes:
    """A reference price request body."""
    doc: dict[str, object] = {"orderId": order_id, "status": "SUBMITTED", "modelUrl": "s3://m/1.stl"}
    doc.update(extra)
    return json.dumps(doc).encode()


@asynccontextmanager
async def watching(
    url: str, store: HeldStore, *, queues: tuple[str, ...] = (), observe_exchange: str | None = None,
    observe_queue: str = "mes-trace-proxy.dead-letters",
) -> AsyncIterator[tuple[Watcher, asyncio.Queue[HeldMessage]]]:  # fmt: skip
    """A running watcher whose stored messages arrive on a queue, stopped afterwards."""
    arrived: asyncio.Queue[HeldMessage] = asyncio.Queue()
    settings = WatcherSettings(
        url=url, queues=queues, observe_exchange=observe_exchange, observe_queue=observe_queue,
        backoff_initial_s=0.05, backoff_max_s=0.5,
    )  # fmt: skip
    watcher = Watcher(settings, store, RULES, clock=time.time, on_stored=arrived.put_nowait)
    watcher.start()
    try:
        yield watcher, arrived
    finally:
        await watcher.stop()


async def next_held(arrived: asyncio.Queue[HeldMessage]) -> HeldMessage:
    """The next message the watcher stored (bounded wait)."""
    return await asyncio.wait_for(arrived.get(), WAIT_S)


async def until(predicate: Callable[[], bool]) -> None:
    """Poll a condition the code under test offers no event for, bounded in time."""
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def expire(channel: AbstractChannel, topo: Topology, order_id: str, **extra: object) -> None:
    """A price request with a 10 ms TTL and no consumer: the broker dead-letters it as expired."""
    exchange = await channel.get_exchange(topo.commands)
    await exchange.publish(
        aio_pika.Message(body(order_id, **extra), message_id=f"msg-{order_id}", expiration=0.01,
                         content_type="application/json", headers={"traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01"}),  # noqa: E501
        routing_key="price.calculate",
    )  # fmt: skip


# ── a running message path ───────────────────────────────────────────────────────────────────


class Running:
    """A started MessagePath over a private topology, with a queue of what it stored."""

    def __init__(self, path: MessagePath, topo: Topology, book: OrderBook) -> None:
        self.path, self.topo, self.book = path, topo, book
        self.stored: asyncio.Queue[HeldMessage] = asyncio.Queue()

    async def next(self) -> HeldMessage:
        """The next held message it stored (bounded wait)."""
        return await asyncio.wait_for(self.stored.get(), WAIT_S)


async def start_path(
    rabbitmq: RabbitServer, channel: AbstractChannel, provider: TracerProvider, state: str, **extra: object
) -> Running:
    """A MessagePath on a fresh private topology, started; the caller stops it."""
    topo = await declare_topology(channel)
    config = parse_messages({"amqp_url": rabbitmq.url, "dead_letter_queues": [topo.dead_letters], **extra})
    book = OrderBook(REFERENCE_LIFECYCLE)
    path = MessagePath(
        config, state_url=state, tracer=provider.get_tracer("t"), redact=str, book=book, environ={}
    )
    running = Running(path, topo, book)
    path.listeners.append(running.stored.put_nowait)
    await path.start()
    return running


@pytest.fixture(name="running")
async def running_path(
    rabbitmq: RabbitServer,
    amqp_channel: AbstractChannel,
    spans: tuple[TracerProvider, InMemorySpanExporter],
    tmp_path: Path,
) -> AsyncIterator[Running]:
    """A started message path over SQLite, stopped after the test."""
    started = await start_path(rabbitmq, amqp_channel, spans[0], f"sqlite:///{tmp_path / 'state.db'}")
    try:
        yield started
    finally:
        await started.path.stop()
