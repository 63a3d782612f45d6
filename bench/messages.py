"""The dead-letter watcher's throughput and the held store's memory (``python -m bench.messages``).

Throughput: a private RabbitMQ node (mes_trace_proxy/sim/rabbitmq.py) gets ``--messages`` price
requests published with a zero TTL, so the broker dead-letters every one of them into the
dead-letter queue for real; then a watcher with the SQLite held store consumes them, storing
each before its ack, and the time from its start to the last stored message gives messages
per second. Memory: the RSS growth of a process holding ``--held`` messages in the memory
store (``--state memory``), and the RSS of one holding them in SQLite (on disk, not in RAM).
Prints one JSON line. Needs rabbitmq-server for the first part (skipped without it).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import gc
import json
import tempfile
import time
from pathlib import Path

import aio_pika
from opentelemetry import trace

from bench.procfs import parse_status
from mes_trace_proxy.messages.deadletter import DEFAULT_MESSAGE_RULES, Message, compile_message_rules
from mes_trace_proxy.messages.held import MemoryHeldStore, SqliteHeldStore
from mes_trace_proxy.messages.record import HeldMessage, hold
from mes_trace_proxy.messages.service import MessagePath
from mes_trace_proxy.messages.settings import parse_messages
from mes_trace_proxy.messages.watcher import Watcher, WatcherSettings
from mes_trace_proxy.sim.rabbitmq import RabbitServer, rabbitmq_script

RULES = compile_message_rules(list(DEFAULT_MESSAGE_RULES), key="message_rules")
#: Bound on every wait: a run that has not finished by then has failed.
WAIT_S = 600.0


def _rss() -> int:
    return parse_status(Path("/proc/self/status").read_text()).rss


def _body(number: int) -> bytes:
    # The reference price request's shape and size (customer data included: it is held, not read).
    return json.dumps(
        {"orderId": f"ORD-2026-{number:07d}", "status": "SUBMITTED", "modelUrl": f"s3://models/{number}.stl",
         "customer": {"name": "Test Customer", "email": "customer@example.com"}}
    ).encode()  # fmt: skip


def _held(number: int) -> HeldMessage:
    death = {"queue": "mes.price.requests", "reason": "expired", "count": 1, "exchange": "mes.commands",
             "routing-keys": ["price.calculate"], "original-expiration": "30000",
             "time": datetime.datetime(2026, 12, 7, tzinfo=datetime.UTC)}  # fmt: skip
    message = Message(
        body=_body(number), headers={"x-death": [death]}, exchange="mes.dlx", routing_key="price.calculate",
        message_id=f"msg-{number}",
    )  # fmt: skip
    props = {"message_id": f"msg-{number}", "content_type": "application/json", "delivery_mode": 2}
    return hold(message, props, consumed_from="mes.dead-letters", rules=RULES, now=1_765_000_000.0 + number)


async def _memory(held_count: int, directory: Path) -> dict[str, float]:
    gc.collect()
    before = _rss()
    store = MemoryHeldStore()
    for number in range(held_count):
        await store.put(_held(number))
    gc.collect()
    growth = _rss() - before
    sqlite = SqliteHeldStore(directory / "rss.db")
    for start in range(0, held_count, 1000):
        await asyncio.gather(*(sqlite.put(_held(n)) for n in range(start, min(start + 1000, held_count))))
    assert await sqlite.count() == held_count
    del store
    gc.collect()
    before_index = _rss()
    await sqlite.close()
    # What the proxy keeps in RAM with the SQLite store: the message path's per-order index.
    config = parse_messages({"amqp_url": "amqp://127.0.0.1:1/", "dead_letter_queues": ["mes.dead-letters"]})
    path = MessagePath(
        config, state_url=f"sqlite:///{directory / 'rss.db'}", tracer=trace.get_tracer("bench"), redact=str,
        book=None, environ={},
    )  # fmt: skip
    await path.load_index()
    gc.collect()
    index_growth = _rss() - before_index
    assert path.held_count == held_count
    await path.store.close()
    return {
        "held": held_count,
        "memory_store_rss_growth_bytes": growth,
        "memory_store_bytes_per_message": growth / held_count,
        "sqlite_index_rss_growth_bytes": index_growth,
        "sqlite_index_bytes_per_message": index_growth / held_count,
        "rss_with_sqlite_store_and_index_bytes": _rss(),
        "sqlite_file_bytes": (directory / "rss.db").stat().st_size,
    }


async def _fill(url: str, count: int) -> str:
    """Declare the topology and make ``count`` real dead letters; return the dead-letter queue."""
    queue = "mes.dead-letters"
    connection = await aio_pika.connect(url)
    channel = await connection.channel()
    commands = await channel.declare_exchange("mes.commands", aio_pika.ExchangeType.DIRECT, durable=True)
    dlx = await channel.declare_exchange("mes.dlx", aio_pika.ExchangeType.FANOUT, durable=True)
    dead = await channel.declare_queue("mes.dead-letters", durable=True)
    await dead.bind(dlx)
    work = await channel.declare_queue(
        "mes.price.requests", durable=True, arguments={"x-dead-letter-exchange": "mes.dlx"}
    )
    await work.bind(commands, routing_key="price.calculate")
    for number in range(count):
        message = aio_pika.Message(
            _body(number), message_id=f"msg-{number}", expiration=0, content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )  # fmt: skip
        await commands.publish(message, routing_key="price.calculate")
    deadline = time.monotonic() + WAIT_S
    while ((await channel.declare_queue(queue, passive=True)).declaration_result.message_count or 0) < count:
        if time.monotonic() > deadline:
            raise RuntimeError("the broker did not dead-letter every message in time")
        await asyncio.sleep(0.1)
    await connection.close()
    return queue


async def _throughput(url: str, count: int, directory: Path) -> dict[str, float]:
    queue = await _fill(url, count)
    store = SqliteHeldStore(directory / "watch.db")
    done = asyncio.Event()
    seen = 0

    def stored(_: HeldMessage) -> None:
        nonlocal seen
        seen += 1
        if seen == count:
            done.set()

    watcher = Watcher(
        WatcherSettings(url=url, queues=(queue,)), store, RULES, clock=time.time, on_stored=stored
    )
    started = time.perf_counter()
    watcher.start()
    await asyncio.wait_for(done.wait(), WAIT_S)
    elapsed = time.perf_counter() - started
    await watcher.stop()
    assert await store.count() == count
    await store.close()
    return {"messages": count, "seconds": elapsed, "messages_per_second": count / elapsed}


async def _run(messages: int, held: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="mes-bench-messages-") as tmp:
        directory = Path(tmp)
        result: dict[str, object] = {"rss": await _memory(held, directory)}
        script = rabbitmq_script()
        if script is None:
            result["throughput"] = "skipped: rabbitmq-server is not installed"
            return result
        (directory / "broker").mkdir()
        server = RabbitServer(script, directory / "broker")
        await asyncio.to_thread(server.start)
        try:
            result["throughput"] = await _throughput(server.url, messages, directory)
        finally:
            server.close()
        return result


def main(argv: list[str] | None = None) -> int:
    """Measure and print one JSON line."""
    parser = argparse.ArgumentParser(prog="python -m bench.messages")
    parser.add_argument("--messages", type=int, default=20_000, help="dead letters the watcher consumes")
    parser.add_argument("--held", type=int, default=100_000, help="held messages for the RSS figures")
    args = parser.parse_args(argv)
    print(json.dumps(asyncio.run(_run(args.messages, args.held))), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
