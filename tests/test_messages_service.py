"""The message path as the proxy runs it: index, flags, moving on, auto policy, metrics, replicas."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry, generate_latest

from mes_trace_proxy.messages.record import HeldMessage
from mes_trace_proxy.messages.service import METRIC_FAMILIES, MessagePath, amqp_url_with_secret
from mes_trace_proxy.messages.settings import parse_messages
from mes_trace_proxy.orders import SpanRef
from tests.certs import TestCA
from tests.conftest import RedisServer
from tests.rabbitmq import WAIT_S, RabbitServer, Running, declare_topology, expire, script_or_skip, start_path


async def test_a_dead_letter_flags_its_order_until_it_moves_on(
    running: Running, amqp_channel: AbstractChannel, spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    book = running.book
    book.apply(
        order_id="ORD-S1",
        status="SUBMITTED",
        observed=None,
        now=time.time() - 5,
        span=SpanRef(7, 8),
        source="ingress",
    )
    await expire(amqp_channel, running.topo, "ORD-S1")
    held = await running.next()
    (flag,) = running.path.flagged()
    assert (flag.order_id, flag.status) == ("ORD-S1", "SUBMITTED")
    assert flag.dead_letter["reason"] == "expired"
    assert running.path.dead_letter("ORD-S1") == held.dead_letter_object()
    # the dead-letter span links to the order's last HTTP span
    (span,) = [s for s in spans[1].get_finished_spans() if s.name.startswith("receive ")]
    assert (7, 8) in {(link.context.trace_id, link.context.span_id) for link in span.links}
    assert (held.span_trace_id, held.span_id) == (span.context.trace_id, span.context.span_id)
    # the order moves on: no longer flagged, still held (and re-drivable)
    book.apply(
        order_id="ORD-S1",
        status="PRICE_CALCULATED",
        observed=None,
        now=time.time() + 1,
        span=SpanRef(7, 9),
        source="ingress",
    )
    assert running.path.flagged() == []
    assert running.path.dead_letter("ORD-S1") is not None


async def test_redrive_clears_the_flag_and_counts(running: Running, amqp_channel: AbstractChannel) -> None:
    await expire(amqp_channel, running.topo, "ORD-S2")
    await running.next()
    assert [f.order_id for f in running.path.flagged()] == ["ORD-S2"]
    assert (await running.path.redrive("ORD-S2", who="admin:x")).outcome == "redriven"
    assert running.path.flagged() == []
    assert running.path.dead_letter("ORD-S2") is None
    registry = CollectorRegistry()
    registry.register(running.path.collector)
    text = generate_latest(registry).decode()
    assert (
        f'mes_messages_dead_lettered_total{{queue="{running.topo.price_requests}",reason="expired"}} 1.0'
        in text
    )
    assert 'mes_messages_redrives_total{outcome="redriven"} 1.0' in text
    assert "mes_messages_held 0.0" in text
    assert "mes_messages_broker_connected 1.0" in text
    assert "ORD-S2" not in text  # no order id in any label
    assert {f.name: f.type for f in registry.collect()} == METRIC_FAMILIES


async def test_held_messages_survive_a_restart_of_the_proxy(
    rabbitmq: RabbitServer,
    amqp_channel: AbstractChannel,
    spans: tuple[TracerProvider, InMemorySpanExporter],
    tmp_path: Path,
) -> None:
    state = f"sqlite:///{tmp_path / 'state.db'}"
    first = await start_path(rabbitmq, amqp_channel, spans[0], state)
    await expire(amqp_channel, first.topo, "ORD-S3")
    await first.next()
    await first.path.stop()
    again = await start_path(rabbitmq, amqp_channel, spans[0], state)
    try:
        assert again.path.dead_letter("ORD-S3") is not None
        assert again.path.held_count == 1
    finally:
        await again.path.stop()


async def test_auto_policy_redrives_transient_dead_letters(
    rabbitmq: RabbitServer, amqp_channel: AbstractChannel, spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    # the policy names the work queue the message dies in, with a short back-off
    topo = await declare_topology(amqp_channel)
    config = parse_messages({
        "amqp_url": rabbitmq.url, "dead_letter_queues": [topo.dead_letters],
        "auto_redrive": {topo.price_requests: {"attempts": 1, "backoff": "10ms"}},
    })  # fmt: skip
    path = MessagePath(
        config, state_url="memory", tracer=spans[0].get_tracer("t"), redact=str, book=None, environ={}
    )
    await path.start()
    try:
        held: asyncio.Queue[HeldMessage] = asyncio.Queue()
        path.listeners.append(held.put_nowait)
        await expire(amqp_channel, topo, "ORD-AUTO")
        await asyncio.wait_for(held.get(), WAIT_S)  # dead-lettered, so no longer on the work queue
        work = await amqp_channel.get_queue(topo.price_requests)
        deadline = time.monotonic() + WAIT_S
        again = None
        while again is None:  # the automatic re-drive lands on the work queue after its back-off
            assert time.monotonic() < deadline, "no automatic re-drive"
            again = await work.get(fail=False)
            if again is None:
                await asyncio.sleep(0.05)
        assert again.headers["x-mes-redrive-count"] == 1
        await again.ack()
        assert path.redriver.outcomes["redriven"] == 1
    finally:
        await path.stop()


def test_password_comes_from_a_file_or_the_environment(tmp_path: Path) -> None:
    secret = tmp_path / "amqp-password"
    secret.write_text("p@ss/word\n")
    assert amqp_url_with_secret("amqp://proxy@h/v", str(secret), {}) == "amqp://proxy:p%40ss%2Fword@h/v"
    assert amqp_url_with_secret("amqp://h/v", None, {"MES_PROXY_AMQP_PASSWORD": "x"}) == "amqp://guest:x@h/v"
    assert amqp_url_with_secret("amqp://u:given@h/", str(secret), {}) == "amqp://u:given@h/"
    assert amqp_url_with_secret("amqp://h/", None, {}) == "amqp://h/"


# ── the admin route ─────────────────────────────────────────────────────────────────────────


async def test_replicas_sharing_redis_redrive_each_others_dead_letters_once(
    rabbitmq: RabbitServer,
    amqp_channel: AbstractChannel,
    spans: tuple[TracerProvider, InMemorySpanExporter],
    redis_server: RedisServer,
) -> None:
    topo = await declare_topology(amqp_channel)
    config = parse_messages({"amqp_url": rabbitmq.url, "dead_letter_queues": [topo.dead_letters]})
    tracer = spans[0].get_tracer("t")
    replicas = [
        MessagePath(config, state_url=redis_server.url, tracer=tracer, redact=str, book=None, environ={})
        for _ in range(2)
    ]
    stored: asyncio.Queue[HeldMessage] = asyncio.Queue()
    for replica in replicas:
        replica.listeners.append(stored.put_nowait)
        await replica.start()
    try:
        order_ids = [f"ORD-R{n}" for n in range(4)]
        for order_id in order_ids:
            await expire(amqp_channel, topo, order_id)
        held = [await asyncio.wait_for(stored.get(), WAIT_S) for _ in order_ids]
        assert sorted(h.order_id or "" for h in held) == order_ids  # competing consumers: each once
        results = await asyncio.gather(
            *(replica.redrive(order_id, who="admin:x") for order_id in order_ids for replica in replicas)
        )
        by_order: dict[str, list[str]] = {}
        for result in results:
            by_order.setdefault(result.order_id, []).append(result.outcome)
        for order_id in order_ids:
            assert sorted(by_order[order_id]) in (["nothing_held", "redriven"], ["in_progress", "redriven"])
        queue = await amqp_channel.declare_queue(topo.price_requests, passive=True)
        assert queue.declaration_result.message_count == len(order_ids)
    finally:
        for replica in replicas:
            await replica.stop()


async def test_amqps_with_a_client_certificate(
    tmp_path_factory: pytest.TempPathFactory, spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    """messages.tls: the watcher connects over amqps:// with the CA and a client certificate."""
    script = script_or_skip()
    directory = tmp_path_factory.mktemp("rabbitmq-tls")
    ca = TestCA()
    ca_file = ca.write(directory)
    server_cert, server_key = ca.issue("rabbitmq").write(directory, "server")
    client_cert, client_key = ca.issue("mes-trace-proxy", client=True).write(directory, "client")
    broker = RabbitServer(script, directory, tls=(ca_file, server_cert, server_key))
    await asyncio.to_thread(broker.start)
    try:
        connection = await aio_pika.connect(broker.url)
        channel = await connection.channel()
        topo = await declare_topology(channel)
        config = parse_messages({
            "amqp_url": f"amqps://guest:guest@127.0.0.1:{broker.tls_port}/",
            "tls": {"ca": str(ca_file), "cert": str(client_cert), "key": str(client_key)},
            "dead_letter_queues": [topo.dead_letters],
        })  # fmt: skip
        path = MessagePath(config, state_url="memory", tracer=spans[0].get_tracer("t"), redact=str, book=None)
        stored: asyncio.Queue[HeldMessage] = asyncio.Queue()
        path.listeners.append(stored.put_nowait)
        await path.start()
        try:
            await expire(channel, topo, "ORD-TLS")
            held = await asyncio.wait_for(stored.get(), WAIT_S)
            assert held.order_id == "ORD-TLS"
        finally:
            await path.stop()
            await connection.close()
    finally:
        await asyncio.to_thread(broker.close)
