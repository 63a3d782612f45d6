"""The watcher against a real broker: real dead letters from TTL, rejects and length limits."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel

from mes_trace_proxy.messages.held import MemoryHeldStore, SqliteHeldStore
from mes_trace_proxy.messages.watcher import WatcherSettings
from tests.rabbitmq import WAIT_S, RabbitServer, body, declare_topology, expire, next_held, until, watching


async def test_expired_message_is_held_with_its_cause_and_acked(
    rabbitmq: RabbitServer, amqp_channel: AbstractChannel, tmp_path: Path
) -> None:
    topo = await declare_topology(amqp_channel)
    store = SqliteHeldStore(tmp_path / "state.db")
    async with watching(rabbitmq.url, store, queues=(topo.dead_letters,)) as (watcher, arrived):
        await expire(amqp_channel, topo, "ORD-EXP")
        held = await next_held(arrived)
        assert (held.order_id, held.status, held.problem) == ("ORD-EXP", "SUBMITTED", None)
        death = held.death
        assert death is not None
        assert (death.queue, death.reason, death.exchange, death.routing_keys, death.count) == (
            topo.price_requests, "expired", topo.commands, ("price.calculate",), 1,
        )  # fmt: skip
        assert held.cause == f"message expired in {topo.price_requests} after 10 ms"
        assert held.properties["message_id"] == "msg-ORD-EXP"
        assert await store.get(held.key) == held
        assert watcher.stats.dead_lettered[(topo.price_requests, "expired")] == 1
    # acked: after the watcher's connection closed (an unacked message would go back to the
    # queue), the dead-letter queue is empty
    queue = await amqp_channel.declare_queue(topo.dead_letters, passive=True)
    assert queue.declaration_result.message_count == 0
    await store.close()


async def test_rejected_and_maxlen_messages_are_held(
    rabbitmq: RabbitServer, amqp_channel: AbstractChannel
) -> None:
    topo = await declare_topology(amqp_channel)
    store = MemoryHeldStore()
    commands = await amqp_channel.get_exchange(topo.commands)
    async with watching(rabbitmq.url, store, queues=(topo.dead_letters,)) as (_, arrived):
        await commands.publish(aio_pika.Message(body("ORD-REJ")), routing_key="price.calculate")
        work = await amqp_channel.get_queue(topo.price_requests)
        incoming = await work.get(timeout=WAIT_S)
        assert incoming is not None
        await incoming.reject(requeue=False)
        rejected = await next_held(arrived)
        assert (rejected.order_id, rejected.death and rejected.death.reason) == ("ORD-REJ", "rejected")
        assert rejected.cause == f"message rejected by a consumer of {topo.price_requests}"

        # x-max-length 1: the second message pushes the first out at the head
        for order_id in ("ORD-FULL-1", "ORD-FULL-2"):
            await commands.publish(aio_pika.Message(body(order_id)), routing_key="order.approved")
        full = await next_held(arrived)
        assert (full.order_id, full.death and full.death.reason) == ("ORD-FULL-1", "maxlen")
        assert full.cause == f"message dropped from {topo.small}: the queue was full"


async def test_bad_messages_are_held_and_counted_not_lost(
    rabbitmq: RabbitServer, amqp_channel: AbstractChannel
) -> None:
    topo = await declare_topology(amqp_channel)
    store = MemoryHeldStore()
    async with watching(rabbitmq.url, store, queues=(topo.dead_letters,)) as (watcher, arrived):
        # published straight to the dead-letter queue: no x-death
        await amqp_channel.default_exchange.publish(
            aio_pika.Message(body("ORD-DIRECT")), routing_key=topo.dead_letters
        )
        direct = await next_held(arrived)
        assert (direct.problem, direct.order_id, direct.deaths) == ("missing", "ORD-DIRECT", ())
        # a body that is not JSON, dead-lettered for real
        commands = await amqp_channel.get_exchange(topo.commands)
        await commands.publish(
            aio_pika.Message(b"\x00binary", expiration=0.01), routing_key="price.calculate"
        )
        binary = await next_held(arrived)
        assert (binary.problem, binary.order_id, binary.body) == ("not_json", None, b"\x00binary")
        assert watcher.stats.problems == {"missing": 1, "not_json": 1}
        assert await store.count() == 2


async def test_a_missing_queue_is_reported_and_retried(
    rabbitmq: RabbitServer, amqp_channel: AbstractChannel
) -> None:
    store = MemoryHeldStore()
    name = f"not-yet-{time.monotonic_ns()}"
    async with watching(rabbitmq.url, store, queues=(name,)) as (watcher, arrived):
        await until(lambda: watcher.stats.problems["missing_queue"] >= 1)
        queue = await amqp_channel.declare_queue(name, auto_delete=True)
        await asyncio.wait_for(watcher.wait_connected(), WAIT_S)
        await amqp_channel.default_exchange.publish(
            aio_pika.Message(body("ORD-LATE")), routing_key=queue.name
        )
        assert (await next_held(arrived)).order_id == "ORD-LATE"


async def test_a_failing_store_leaves_the_message_on_the_broker(
    rabbitmq: RabbitServer, amqp_channel: AbstractChannel, tmp_path: Path
) -> None:
    topo = await declare_topology(amqp_channel)
    # A real failure: the database's directory does not exist yet, so every write fails.
    store = SqliteHeldStore(tmp_path / "later" / "state.db")
    async with watching(rabbitmq.url, store, queues=(topo.dead_letters,)) as (watcher, arrived):
        await expire(amqp_channel, topo, "ORD-WAIT")
        await until(lambda: watcher.stats.store_failures >= 1)
        assert arrived.empty()
        (tmp_path / "later").mkdir()
        held = await next_held(arrived)  # redelivered by the broker, stored once the store works
        assert held.order_id == "ORD-WAIT"
        assert [h.order_id for h in await store.all(10)] == ["ORD-WAIT"]
    await store.close()


async def test_observe_mode_takes_a_copy_and_leaves_the_dead_letter_queue_alone(
    rabbitmq: RabbitServer, amqp_channel: AbstractChannel
) -> None:
    topo = await declare_topology(amqp_channel)
    store = MemoryHeldStore()
    own_queue = f"mes-trace-proxy.observe.{topo.dlx}"
    async with watching(rabbitmq.url, store, observe_exchange=topo.dlx, observe_queue=own_queue) as (
        watcher, arrived,
    ):  # fmt: skip
        await asyncio.wait_for(watcher.wait_connected(), WAIT_S)
        await expire(amqp_channel, topo, "ORD-OBS")
        held = await next_held(arrived)
        assert (held.order_id, held.consumed_from) == ("ORD-OBS", own_queue)
    # the existing dead-letter consumer's queue still got its copy
    existing = await amqp_channel.get_queue(topo.dead_letters)
    original = await existing.get(timeout=WAIT_S)
    assert original is not None
    assert json.loads(original.body)["orderId"] == "ORD-OBS"
    await original.ack()
    await amqp_channel.queue_delete(own_queue)


async def test_watcher_reconnects_after_the_broker_restarts(
    own_rabbitmq: RabbitServer, tmp_path: Path
) -> None:
    connection = await aio_pika.connect(own_rabbitmq.url)
    topo = await declare_topology(await connection.channel(), durable=True)
    await connection.close()
    store = SqliteHeldStore(tmp_path / "state.db")
    async with watching(own_rabbitmq.url, store, queues=(topo.dead_letters,)) as (watcher, arrived):
        await asyncio.wait_for(watcher.wait_connected(), WAIT_S)
        own_rabbitmq.kill()
        await until(lambda: not watcher.stats.connected)
        await asyncio.to_thread(own_rabbitmq.start)
        connection = await aio_pika.connect(own_rabbitmq.url)
        try:
            await expire(await connection.channel(), topo, "ORD-AFTER")
            assert (await next_held(arrived)).order_id == "ORD-AFTER"
        finally:
            await connection.close()
        assert watcher.stats.connects >= 2
    await store.close()


@pytest.mark.parametrize("url", ["amqp://guest:secret@127.0.0.1:1/", "amqp://127.0.0.1:1/"])
def test_the_shown_url_has_no_credentials(url: str) -> None:
    shown = WatcherSettings(url=url).shown_url
    assert shown == "amqp://127.0.0.1:1/"
    assert "secret" not in shown


async def test_a_quorum_queue_delivery_limit_is_a_dead_letter(
    rabbitmq: RabbitServer, amqp_channel: AbstractChannel
) -> None:
    topo = await declare_topology(amqp_channel)
    limited = f"{topo.price_requests}.quorum"
    queue = await amqp_channel.declare_queue(
        limited, durable=True,
        arguments={"x-queue-type": "quorum", "x-delivery-limit": 1, "x-dead-letter-exchange": topo.dlx},
    )  # fmt: skip
    store = MemoryHeldStore()
    async with watching(rabbitmq.url, store, queues=(topo.dead_letters,)) as (_, arrived):
        await amqp_channel.default_exchange.publish(aio_pika.Message(body("ORD-LIMIT")), routing_key=limited)
        for _ in range(2):  # delivered, returned; delivered again, returned: over the limit of 1
            incoming = await queue.get(timeout=WAIT_S)
            assert incoming is not None
            await incoming.nack(requeue=True)
        held = await next_held(arrived)
        assert (held.order_id, held.death and held.death.reason) == ("ORD-LIMIT", "delivery_limit")
        assert held.cause == f"message given up in {limited}: delivery limit reached"
    await amqp_channel.queue_delete(limited)
