"""The admin route POST /orders/{id}/redrive over a running message path and a real broker."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest
from aio_pika.abc import AbstractChannel
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from mes_trace_proxy.admin_auth import TokenTable, parse_tokens
from mes_trace_proxy.messages.admin import add_message_routes, caller
from mes_trace_proxy.messages.redrive import Redriver
from tests.rabbitmq import Running, expire

ADMIN = "a" * 32
VIEWER = "v" * 32


async def rabbit_gone(running: Running) -> None:
    """Point the re-driver at a port nothing listens on, as if the broker had gone away."""
    await running.path.redriver.close()
    running.path.redriver = Redriver(
        "amqp://guest:guest@127.0.0.1:1/",
        running.path.store,
        running.path.redriver._tracer,
        redact=str,
        clock=time.time,
    )


def test_caller_is_role_and_token_fingerprint() -> None:
    table = parse_tokens(f"admin:{ADMIN}\nviewer:{VIEWER}\n")
    who = caller(table, f"Bearer {ADMIN}")
    assert who.startswith("admin:sha256:")
    assert len(who) == len("admin:sha256:") + 8
    assert ADMIN not in who
    assert caller(table, f"Bearer {VIEWER}").startswith("viewer:")
    assert caller(table, "Bearer nope") == "anonymous"
    assert caller(TokenTable(), f"Bearer {ADMIN}") == "anonymous"


@pytest.fixture
async def client(running: Running) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    app = web.Application()
    add_message_routes(app, lambda: running.path, TokenTable)
    async with TestClient(TestServer(app)) as test_client:
        yield test_client


async def test_redrive_route_answers_each_outcome(
    running: Running, amqp_channel: AbstractChannel, client: TestClient[web.Request, web.Application]
) -> None:
    await expire(amqp_channel, running.topo, "ORD-S4")
    await running.next()
    ok = await client.post("/orders/ORD-S4/redrive")
    assert ok.status == 200
    body = await ok.json()
    assert (body["outcome"], len(body["messages"]), len(body["traceparents"])) == ("redriven", 1, 1)
    again = await client.post("/orders/ORD-S4/redrive")
    assert again.status == 404
    assert again.content_type == "application/problem+json"
    assert (await again.json())["type"].endswith("nothing-held")


async def test_redrive_route_from_the_page_form(
    running: Running, amqp_channel: AbstractChannel, client: TestClient[web.Request, web.Application]
) -> None:
    await expire(amqp_channel, running.topo, "ORD-S5")
    await running.next()
    cross = await client.post(
        "/orders/ORD-S5/redrive",
        data={"go": "1"},
        headers={"Origin": "https://evil.example"},
        allow_redirects=False,
    )
    assert cross.status == 403
    assert running.path.dead_letter("ORD-S5") is not None
    same = await client.post(
        "/orders/ORD-S5/redrive",
        data={"go": "1"},
        headers={"Sec-Fetch-Site": "same-origin"},
        allow_redirects=False,
    )
    assert (same.status, same.headers["Location"]) == (303, "/?redrive=redriven")


async def test_redrive_route_when_the_message_path_is_off() -> None:
    app = web.Application()
    add_message_routes(app, lambda: None, TokenTable)
    async with TestClient(TestServer(app)) as test_client:
        answer = await test_client.post("/orders/X/redrive")
        assert answer.status == 404
        assert (await answer.json())["type"].endswith("messages-off")


async def test_broker_gone_redrive_is_503_and_keeps_the_message(
    running: Running, amqp_channel: AbstractChannel, client: TestClient[web.Request, web.Application]
) -> None:
    await expire(amqp_channel, running.topo, "ORD-S6")
    await running.next()
    await rabbit_gone(running)
    answer = await client.post("/orders/ORD-S6/redrive")
    assert answer.status == 503
    assert running.path.dead_letter("ORD-S6") is not None
