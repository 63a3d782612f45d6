"""The message path in a real proxy process, with a real broker: flag, re-drive, broker loss, privacy."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import aio_pika
import aiohttp
from aio_pika.abc import AbstractChannel

from mes_trace_proxy.sim.otlp_sink import OtlpSink
from tests.conftest import otlp_env
from tests.proxy_process import ProxyProcess, proxy_process
from tests.rabbitmq import RabbitServer, Topology, declare_topology
from tests.test_privacy_canary import CARD, EMAIL, NAME, NAME_RU, PHONE_RU, leaks
from tests.upstream import RecordingUpstream

WAIT_S = 30.0
PASSWORD = "amqp-password-canary-9090"


def _args(upstream: str, amqp_url: str, topo: Topology) -> list[str]:
    return [
        "--upstream", upstream, "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0",
        "--state", "memory", "--amqp-url", amqp_url, "--dead-letter-queue", topo.dead_letters,
    ]  # fmt: skip


async def _stuck_dead_letters(
    client: aiohttp.ClientSession, proxy: ProxyProcess
) -> dict[str, dict[str, object]]:
    async with client.get(proxy.admin_url + "/orders/-/stuck") as answer:
        doc = await answer.json()
    return {str(o["order_id"]): o["dead_letter"] for o in doc["orders"] if o.get("dead_letter")}


async def _wait_dead_letter(
    client: aiohttp.ClientSession, proxy: ProxyProcess, order_id: str
) -> dict[str, object]:
    deadline = time.monotonic() + WAIT_S
    while True:  # the proxy offers no event to wait on from outside: poll its API, bounded
        found = await _stuck_dead_letters(client, proxy)
        if order_id in found:
            return found[order_id]
        assert time.monotonic() < deadline, f"{order_id} never appeared in /orders/-/stuck"
        await asyncio.sleep(0.05)


async def expire_with_canaries(channel: AbstractChannel, topo: Topology, order_id: str) -> None:
    """A dead letter carrying the privacy suite's canaries (tests/test_privacy_canary.py)."""
    customer = {"name": NAME, "nameRu": NAME_RU, "email": EMAIL, "phone": PHONE_RU, "card": CARD}
    body = {"orderId": order_id, "status": "SUBMITTED", "customer": customer}
    tp = "00-" + "c" * 32 + "-" + "d" * 16 + "-01"
    exchange = await channel.get_exchange(topo.commands)
    await exchange.publish(
        aio_pika.Message(json.dumps(body).encode(), message_id=f"m-{order_id}", expiration=0.01,
                         headers={"traceparent": tp, "x-customer": EMAIL}),
        routing_key="price.calculate",
    )  # fmt: skip


async def test_dead_letter_is_flagged_redriven_and_leaks_nothing(
    rabbitmq: RabbitServer,
    amqp_channel: AbstractChannel,
    recording_upstream: tuple[str, RecordingUpstream],
    otlp_sink: OtlpSink,
) -> None:
    topo = await declare_topology(amqp_channel)
    url = rabbitmq.url.replace("guest:guest@", "guest@")  # the password comes from the environment
    env = otlp_env(otlp_sink) | {"MES_PROXY_AMQP_PASSWORD": "guest"}
    async with (
        proxy_process(_args(recording_upstream[0], url, topo), env) as proxy,
        aiohttp.ClientSession() as client,
    ):
        # the order is known to the book from its HTTP call first
        async with client.put(
            proxy.url() + "/api/v1/orders/ORD-E2E-1/status", json={"status": "SUBMITTED"}
        ) as answer:
            assert answer.status == 200
        await expire_with_canaries(amqp_channel, topo, "ORD-E2E-1")
        dead = await _wait_dead_letter(client, proxy, "ORD-E2E-1")
        assert (dead["queue"], dead["reason"], dead["message_id"]) == (
            topo.price_requests,
            "expired",
            "m-ORD-E2E-1",
        )
        assert dead["cause"] == f"message expired in {topo.price_requests} after 10 ms"
        async with client.get(proxy.admin_url + "/orders/ORD-E2E-1") as answer:
            assert (await answer.json())["dead_letter"]["reason"] == "expired"
        async with client.get(proxy.admin_url + "/metrics") as answer:
            metrics = await answer.text()
        assert (
            f'mes_messages_dead_lettered_total{{queue="{topo.price_requests}",reason="expired"}} 1.0'
            in metrics
        )
        assert "mes_messages_held 1.0" in metrics
        async with client.get(proxy.admin_url + "/config") as answer:
            config_text = await answer.text()
        async with client.post(proxy.admin_url + "/orders/ORD-E2E-1/redrive") as answer:
            assert answer.status == 200, await answer.text()
            assert (await answer.json())["outcome"] == "redriven"
        async with client.post(proxy.admin_url + "/orders/ORD-E2E-1/redrive") as answer:
            assert answer.status == 404  # idempotent: nothing is sent twice
        assert "ORD-E2E-1" not in await _stuck_dead_letters(client, proxy)
        work = await amqp_channel.get_queue(topo.price_requests)
        again = await work.get(timeout=WAIT_S)
        assert again is not None
        assert json.loads(again.body)["orderId"] == "ORD-E2E-1"
        await again.ack()
        await otlp_sink.wait_for_spans(1, timeout=WAIT_S, predicate=lambda s: s.name.startswith("publish "))
        spans = list(otlp_sink.spans)
    log_text = "\n".join(proxy.lines)
    span_text = json.dumps([s.to_json_dict() for s in spans], ensure_ascii=False, default=str)
    receive = [s for s in spans if s.name == f"receive {topo.dead_letters}"]
    assert len(receive) == 1
    assert receive[0].attributes["mes.order.id"] == "ORD-E2E-1"
    assert any(s.name == f"publish {topo.commands}" for s in spans)
    for text in (log_text, span_text, metrics, config_text):
        assert leaks(text) == []
    assert "order dead-lettered" in log_text
    assert "outcome=redriven" in log_text


async def test_the_proxy_serves_while_the_broker_is_down_and_reconnects(
    own_rabbitmq: RabbitServer, recording_upstream: tuple[str, RecordingUpstream]
) -> None:
    connection = await aio_pika.connect(own_rabbitmq.url)
    topo = await declare_topology(await connection.channel(), durable=True)
    await connection.close()
    args = _args(recording_upstream[0], own_rabbitmq.url, topo)
    async with proxy_process(args) as proxy, aiohttp.ClientSession() as client:
        own_rabbitmq.kill()  # mid-run
        for _ in range(5):
            async with client.get(proxy.url() + "/api/v1/orders/ORD-UP") as answer:
                assert answer.status == 200
            async with client.get(proxy.admin_url + "/healthz") as answer:
                assert answer.status == 200
        await asyncio.to_thread(own_rabbitmq.start)
        connection = await aio_pika.connect(own_rabbitmq.url)
        try:
            channel = await connection.channel()
            await expire_with_canaries(channel, topo, "ORD-AFTER-RESTART")
            dead = await _wait_dead_letter(client, proxy, "ORD-AFTER-RESTART")
            assert dead["reason"] == "expired"
        finally:
            await connection.close()


async def test_no_broker_at_start_does_not_delay_the_listeners(
    recording_upstream: tuple[str, RecordingUpstream],
) -> None:
    topo = Topology(commands="c", dlx="d", price_requests="p", dead_letters="dl", small="s")
    url = f"amqp://guest:{PASSWORD}@127.0.0.1:1/"
    async with (
        proxy_process(_args(recording_upstream[0], url, topo)) as proxy,
        aiohttp.ClientSession() as client,
    ):
        async with client.get(proxy.url() + "/api/v1/orders/ORD-NB") as answer:
            assert answer.status == 200
        async with client.get(proxy.admin_url + "/metrics") as answer:
            assert "mes_messages_broker_connected 0.0" in await answer.text()
        async with client.get(proxy.admin_url + "/config") as answer:
            assert PASSWORD not in await answer.text()
    assert PASSWORD not in "\n".join(proxy.lines)


ADMIN_TOKEN = "admin-token-for-messages-0123456789"
VIEWER_TOKEN = "viewer-token-for-messages-0123456789"


async def test_only_admins_redrive_and_see_the_button(
    rabbitmq: RabbitServer,
    amqp_channel: AbstractChannel,
    recording_upstream: tuple[str, RecordingUpstream],
    tmp_path: Path,
) -> None:
    topo = await declare_topology(amqp_channel)
    tokens = tmp_path / "tokens"
    tokens.write_text(f"viewer:{VIEWER_TOKEN}\nadmin:{ADMIN_TOKEN}\n")
    args = [*_args(recording_upstream[0], rabbitmq.url, topo), "--admin-token-file", str(tokens)]
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    viewer = {"Authorization": f"Bearer {VIEWER_TOKEN}"}
    async with proxy_process(args) as proxy, aiohttp.ClientSession() as client:
        await expire_with_canaries(amqp_channel, topo, "ORD-ROLE")
        deadline = time.monotonic() + WAIT_S
        while True:  # poll the page (bounded) until the dead letter is on it
            async with client.get(proxy.admin_url + "/", headers=viewer) as answer:
                viewer_page = await answer.text()
            if "ORD-ROLE" in viewer_page:
                break
            assert time.monotonic() < deadline, "the dead letter never reached the page"
            await asyncio.sleep(0.05)
        assert "Re-drive" not in viewer_page.split('id="dead-letters"')[1]
        async with client.get(proxy.admin_url + "/", headers=admin) as answer:
            assert 'action="/orders/ORD-ROLE/redrive"' in await answer.text()
            assert "form-action 'self'" in answer.headers["Content-Security-Policy"]
        # An order the proxy saw no HTTP call for: what the dead letter says, not a 404.
        async with client.get(proxy.admin_url + "/orders/ORD-ROLE", headers=viewer) as answer:
            assert answer.status == 200
            doc = await answer.json()
        assert (doc["status"], doc["dead_letter"]["reason"], doc["timeline"]) == ("SUBMITTED", "expired", [])
        async with client.post(proxy.admin_url + "/orders/ORD-ROLE/redrive", headers=viewer) as answer:
            assert answer.status == 403
        async with client.post(proxy.admin_url + "/orders/ORD-ROLE/redrive") as answer:
            assert answer.status == 401
        async with client.post(proxy.admin_url + "/orders/ORD-ROLE/redrive", headers=admin) as answer:
            assert answer.status == 200
    audit = [line for line in proxy.lines if "outcome=redriven" in line]
    assert len(audit) == 1
    assert "by=admin:sha256:" in audit[0]
    assert ADMIN_TOKEN not in "\n".join(proxy.lines)
