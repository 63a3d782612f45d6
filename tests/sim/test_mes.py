"""Tests for the reference MES simulator: routes, callbacks, faults and streaming, on real sockets."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from pytest_aiohttp import AiohttpClient, AiohttpServer

from mes_trace_proxy.sim import mes
from mes_trace_proxy.sim.mes import MES_STATE, MesSimConfig, build_app, share_hit

# Every wait in these tests is bounded; 5 s is far above any loopback round trip.
WAIT = 5.0

MesClient = TestClient[web.Request, web.Application]
MakeMes = Callable[..., Awaitable[MesClient]]


@pytest.fixture
def make_mes(aiohttp_client: AiohttpClient) -> MakeMes:
    """Factory: a real MES simulator on 127.0.0.1:0 with the given config fields."""

    async def make(**fields: Any) -> MesClient:
        return await aiohttp_client(build_app(MesSimConfig(**fields)))

    return make


@dataclass(frozen=True, slots=True)
class Callback:
    method: str
    path: str
    body: Any


@dataclass(frozen=True, slots=True)
class FakeCrm:
    url: str
    calls: asyncio.Queue[Callback]


@pytest.fixture
async def fake_crm(aiohttp_server: AiohttpServer) -> FakeCrm:
    """A real CRM stand-in on 127.0.0.1:0 that queues every callback it receives."""
    calls: asyncio.Queue[Callback] = asyncio.Queue()

    async def record(request: web.Request) -> web.Response:
        await calls.put(Callback(request.method, request.path, await request.json()))
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_route("*", "/api/orders/{orderId}/{what}", record)
    server: TestServer = await aiohttp_server(app)
    return FakeCrm(str(server.make_url("")), calls)


async def _json(resp: aiohttp.ClientResponse) -> Any:
    return await resp.json()


async def test_health_answers_ok(make_mes: MakeMes) -> None:
    """GET /api/v1/health answers 200 {"status": "ok"}."""
    client = await make_mes()
    resp = await client.get("/api/v1/health")
    assert (resp.status, await _json(resp)) == (200, {"status": "ok"})


async def test_order_lifecycle_routes_happy_path(make_mes: MakeMes) -> None:
    """Create, read, PUT status and PATCH all answer {"orderId","status"} and update the store."""
    client = await make_mes()
    resp = await client.post("/api/v1/orders", json={"orderId": "A1", "status": "MANUFACTURING_APPROVED"})
    assert (resp.status, await _json(resp)) == (201, {"orderId": "A1", "status": "MANUFACTURING_APPROVED"})
    resp = await client.put("/api/v1/orders/A1/status", json={"status": "MANUFACTURING_STARTED"})
    assert (resp.status, await _json(resp)) == (200, {"orderId": "A1", "status": "MANUFACTURING_STARTED"})
    resp = await client.patch("/api/v1/orders/A1", json={"status": "PACKAGING", "note": "box 3"})
    assert (resp.status, await _json(resp)) == (200, {"orderId": "A1", "status": "PACKAGING"})
    resp = await client.get("/api/v1/orders/A1")
    assert (resp.status, await _json(resp)) == (200, {"orderId": "A1", "status": "PACKAGING"})


async def test_create_order_keeps_no_customer_data(make_mes: MakeMes) -> None:
    """The customer part of a hand-over body is not stored anywhere in MES state."""
    client = await make_mes()
    body = {"orderId": "A2", "status": "MANUFACTURING_APPROVED", "customer": {"name": "Ivan Canary"}}
    assert (await client.post("/api/v1/orders", json=body)).status == 201
    record = client.app[MES_STATE].store.get("A2")
    assert record is not None
    assert "Canary" not in repr(record)


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        pytest.param("GET", "/api/v1/orders/NOPE", None, 404, id="get-unknown"),
        pytest.param("PUT", "/api/v1/orders/NOPE/status", {"status": "CLOSED"}, 404, id="put-unknown"),
        pytest.param("PATCH", "/api/v1/orders/NOPE", {"status": "CLOSED"}, 404, id="patch-unknown"),
        pytest.param("GET", "/api/v1/orders/NOPE/model", None, 404, id="download-unknown"),
        pytest.param("PUT", "/api/v1/orders/K/status", b"{not json", 400, id="put-bad-json"),
        pytest.param("PUT", "/api/v1/orders/K/status", {"state": "CLOSED"}, 400, id="put-no-status"),
        pytest.param("PUT", "/api/v1/orders/K/status", {"status": 7}, 400, id="put-status-not-text"),
        pytest.param("PATCH", "/api/v1/orders/K", {"note": "x"}, 400, id="patch-no-status"),
        pytest.param("PATCH", "/api/v1/orders/K", [1, 2], 400, id="patch-not-object"),
        pytest.param("POST", "/api/v1/orders", {"status": "X"}, 400, id="create-no-order-id"),
        pytest.param("POST", "/api/v1/orders", {"orderId": "Z"}, 400, id="create-no-status"),
        pytest.param("GET", "/api/v1/orders?page=-1", None, 400, id="list-negative-page"),
        pytest.param("GET", "/api/v1/orders?size=0", None, 400, id="list-zero-size"),
        pytest.param("GET", "/api/v1/orders?page=x", None, 400, id="list-page-not-int"),
        pytest.param("GET", "/api/v1/orders/K/model?size=-5", None, 400, id="download-negative-size"),
        pytest.param("POST", "/api/v1/orders/K/model", {"a": 1}, 415, id="upload-json"),
    ],
)
async def test_errors(make_mes: MakeMes, method: str, path: str, body: object, status: int) -> None:
    """Unknown orders are 404, malformed input 400 (415 for a non-octet-stream model)."""
    client = await make_mes()
    assert (await client.post("/api/v1/orders", json={"orderId": "K", "status": "SUBMITTED"})).status == 201
    kwargs: dict[str, Any] = {"data": body} if isinstance(body, bytes) else {"json": body}
    resp = await client.request(method, path, **({} if body is None else kwargs))
    assert resp.status == status
    assert "error" in await _json(resp)


async def test_listing_filters_by_status_and_pages(make_mes: MakeMes) -> None:
    """GET /api/v1/orders filters by ?status= and pages oldest first by ?page= and ?size=."""
    client = await make_mes()
    for n in range(5):
        status = "MANUFACTURING_APPROVED" if n % 2 == 0 else "SUBMITTED"
        await client.post("/api/v1/orders", json={"orderId": f"L{n}", "status": status})
    resp = await client.get("/api/v1/orders", params={"status": "MANUFACTURING_APPROVED", "size": "2"})
    assert await _json(resp) == {
        "items": [
            {"orderId": "L0", "status": "MANUFACTURING_APPROVED"},
            {"orderId": "L2", "status": "MANUFACTURING_APPROVED"},
        ],
        "page": 0,
    }
    resp = await client.get(
        "/api/v1/orders", params={"status": "MANUFACTURING_APPROVED", "page": "1", "size": "2"}
    )
    assert await _json(resp) == {"items": [{"orderId": "L4", "status": "MANUFACTURING_APPROVED"}], "page": 1}
    resp = await client.get("/api/v1/orders")
    assert [item["orderId"] for item in (await _json(resp))["items"]] == ["L0", "L1", "L2", "L3", "L4"]


async def test_price_calculation_calls_crm_back(make_mes: MakeMes, fake_crm: FakeCrm) -> None:
    """Price calculation answers 202 SUBMITTED, PUTs the price to CRM, then reads PRICE_CALCULATED."""
    client = await make_mes(crm_url=fake_crm.url, time_scale=0.01)
    resp = await client.post("/api/v1/orders/P1/price-calculation", json={"customer": {"name": "x"}})
    assert (resp.status, await _json(resp)) == (202, {"orderId": "P1", "status": "SUBMITTED"})
    call = await asyncio.wait_for(fake_crm.calls.get(), WAIT)
    assert (call.method, call.path, call.body["currency"]) == ("PUT", "/api/orders/P1/price", "EUR")
    assert 50.0 <= call.body["price"] <= 5000.0
    state = client.app[MES_STATE]
    await asyncio.wait_for(state.tasks.join(), WAIT)
    assert await _json(await client.get("/api/v1/orders/P1")) == {
        "orderId": "P1",
        "status": "PRICE_CALCULATED",
    }


async def test_price_is_not_calculated_twice_after_approval(make_mes: MakeMes, fake_crm: FakeCrm) -> None:
    """An approval that overtakes the price callback is never moved back to PRICE_CALCULATED."""
    client = await make_mes(crm_url=fake_crm.url, time_scale=0.01)
    await client.post("/api/v1/orders/P2/price-calculation")
    await client.post("/api/v1/orders", json={"orderId": "P2", "status": "MANUFACTURING_APPROVED"})
    await asyncio.wait_for(fake_crm.calls.get(), WAIT)
    state = client.app[MES_STATE]
    await asyncio.wait_for(state.tasks.join(), WAIT)
    record = state.store.get("P2")
    assert record is not None
    assert record.status == "MANUFACTURING_APPROVED"


async def test_price_drop_never_calls_back(make_mes: MakeMes, fake_crm: FakeCrm) -> None:
    """With price-drop-rate 1.0 no callback is even scheduled and the order stays SUBMITTED."""
    client = await make_mes(crm_url=fake_crm.url, time_scale=0.01, price_drop_rate=1.0)
    assert (await client.post("/api/v1/orders/D1/price-calculation")).status == 202
    state = client.app[MES_STATE]
    assert (state.stats.prices_dropped, len(state.tasks), fake_crm.calls.qsize()) == (1, 0, 0)
    assert (await _json(await client.get("/api/v1/orders/D1")))["status"] == "SUBMITTED"


async def test_status_changes_are_reported_to_crm_in_order(make_mes: MakeMes, fake_crm: FakeCrm) -> None:
    """PUT status and PATCH POST each new status to CRM's events route, in the order they happened."""
    client = await make_mes(crm_url=fake_crm.url)
    await client.post("/api/v1/orders", json={"orderId": "E1", "status": "MANUFACTURING_APPROVED"})
    statuses = ("MANUFACTURING_STARTED", "MANUFACTURING_COMPLETED", "PACKAGING", "SHIPPED", "CLOSED")
    for status in statuses:
        if status == "PACKAGING":
            await client.patch("/api/v1/orders/E1", json={"status": status})
        else:
            await client.put("/api/v1/orders/E1/status", json={"status": status})
    calls = [await asyncio.wait_for(fake_crm.calls.get(), WAIT) for _ in statuses]
    assert {(c.method, c.path) for c in calls} == {("POST", "/api/orders/E1/events")}
    assert tuple(c.body["status"] for c in calls) == statuses


async def test_pickup_drop_hides_approved_orders(make_mes: MakeMes) -> None:
    """With pickup-drop-rate 1.0 an approved order exists but never appears in the approved listing."""
    client = await make_mes(pickup_drop_rate=1.0)
    await client.post("/api/v1/orders", json={"orderId": "H1", "status": "MANUFACTURING_APPROVED"})
    listing = await _json(await client.get("/api/v1/orders", params={"status": "MANUFACTURING_APPROVED"}))
    assert listing == {"items": [], "page": 0}
    assert (await _json(await client.get("/api/v1/orders/H1")))["status"] == "MANUFACTURING_APPROVED"


async def test_overload_answers_503_with_retry_after(make_mes: MakeMes) -> None:
    """With overload-rate 1.0 API calls get 503 and Retry-After; health is never faulted."""
    client = await make_mes(overload_rate=1.0)
    resp = await client.get("/api/v1/orders")
    assert (resp.status, resp.headers["Retry-After"]) == (503, "1")
    assert (await client.get("/api/v1/health")).status == 200


async def test_reset_closes_the_connection(make_mes: MakeMes) -> None:
    """With reset-rate 1.0 the client sees the connection dropped, not an HTTP answer."""
    client = await make_mes(reset_rate=1.0)
    with pytest.raises((aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
        await client.get("/api/v1/orders")
    assert client.app[MES_STATE].stats.resets == 1


async def test_slow_requests_are_counted(make_mes: MakeMes) -> None:
    """With slow-rate 1.0 each API call is delayed (scaled) and still answered."""
    client = await make_mes(slow_rate=1.0, slow_seconds=1.0, time_scale=0.01, latency_ms=1.0)
    assert (await client.get("/api/v1/orders")).status == 200
    assert client.app[MES_STATE].stats.slowed == 1


@pytest.mark.parametrize(
    ("rate", "expected"),
    [
        pytest.param(0.0, 0, id="never"),
        pytest.param(1.0, 1000, id="always"),
        pytest.param(0.3, 300, id="share"),
    ],
)
def test_share_hit_is_deterministic_and_proportional(rate: float, expected: int) -> None:
    """share_hit hits about rate of the keys, the same keys every time."""
    hits = [share_hit(7, "price-drop", f"ORD-{n}", rate) for n in range(1000)]
    assert hits == [share_hit(7, "price-drop", f"ORD-{n}", rate) for n in range(1000)]
    assert abs(sum(hits) - expected) <= 50


def test_fault_draws_depend_only_on_the_seed() -> None:
    """Two MES states with the same seed draw the same fault sequence."""
    cfg = MesSimConfig(seed=3, reset_rate=0.3, overload_rate=0.3, slow_rate=0.3, latency_ms=5.0)
    first, second = mes.MesState(cfg), mes.MesState(cfg)
    assert [first.draw_fault() for _ in range(50)] == [second.draw_fault() for _ in range(50)]


async def _chunks(total: int, chunk: int) -> AsyncIterator[bytes]:
    for offset in range(0, total, chunk):
        yield bytes([offset // chunk % 251]) * min(chunk, total - offset)


async def test_model_upload_is_streamed_counted_and_hashed(make_mes: MakeMes) -> None:
    """A 3 MiB chunked upload (over aiohttp's 1 MiB read cap) is counted and hashed exactly."""
    client = await make_mes()
    total, chunk = 3 * 1024 * 1024, 100_000
    expected = hashlib.sha256()
    async for part in _chunks(total, chunk):
        expected.update(part)
    resp = await client.post(
        "/api/v1/orders/M1/model",
        data=_chunks(total, chunk),
        headers={"Content-Type": "application/octet-stream"},
    )
    body = await _json(resp)
    assert (resp.status, body) == (200, {"orderId": "M1", "bytes": total, "sha256": expected.hexdigest()})
    assert (await _json(await client.get("/api/v1/orders/M1")))["status"] == "FILE_UPLOADED"


async def test_model_download_streams_the_asked_size(make_mes: MakeMes) -> None:
    """GET model?size=N streams exactly N octet-stream bytes with a Content-Length."""
    client = await make_mes()
    await client.post("/api/v1/orders", json={"orderId": "M2", "status": "SUBMITTED"})
    resp = await client.get("/api/v1/orders/M2/model", params={"size": "200000"})
    assert (resp.status, resp.content_type, resp.content_length) == (200, "application/octet-stream", 200000)
    assert len(await resp.read()) == 200000


async def test_sse_events_arrive_one_by_one(make_mes: MakeMes) -> None:
    """The first SSE event arrives while the server is still waiting to send the second."""
    client = await make_mes()
    # 60 s between events: a buffered stream would hold the first event far past WAIT.
    async with client.get("/api/v1/events", params={"count": "2", "interval_ms": "60000"}) as resp:
        assert resp.headers["Content-Type"] == "text/event-stream"
        first = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), WAIT)
    assert first.startswith(b"id: 0\ndata: ")
    assert json.loads(first.split(b"data: ", 1)[1]) == {"seq": 0, "orders": 0}


async def test_sse_stream_ends_after_count_events(make_mes: MakeMes) -> None:
    """?count=3 yields exactly three data: events, then the stream ends."""
    client = await make_mes()
    resp = await client.get("/api/v1/events", params={"count": "3", "interval_ms": "0"})
    text = (await asyncio.wait_for(resp.read(), WAIT)).decode()
    assert [line for line in text.splitlines() if line.startswith("data: ")] == [
        f'data: {{"seq": {n}, "orders": 0}}' for n in range(3)
    ]


async def test_websocket_echoes_text_and_binary(make_mes: MakeMes) -> None:
    """The dashboard WebSocket echoes text and binary frames."""
    client = await make_mes()
    async with client.ws_connect("/api/v1/ws") as ws:
        await ws.send_str("ping")
        assert await asyncio.wait_for(ws.receive_str(), WAIT) == "ping"
        await ws.send_bytes(b"\x00\x01")
        assert await asyncio.wait_for(ws.receive_bytes(), WAIT) == b"\x00\x01"


async def test_received_requests_record_traceparent(make_mes: MakeMes) -> None:
    """MES records each request's method, path, traceparent and user id header."""
    client = await make_mes()
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    await client.get("/api/v1/orders", headers={"traceparent": traceparent, "X-User-Id": "user-001"})
    assert client.app[MES_STATE].received[-1] == mes.ReceivedRequest(
        method="GET", path="/api/v1/orders", traceparent=traceparent, user_id="user-001"
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        pytest.param(["--listen", "nohost"], "HOST:PORT", id="listen-without-port"),
        pytest.param(["--listen", "h:99999"], "HOST:PORT", id="listen-port-too-big"),
        pytest.param(["--price-drop-rate", "1.5"], "between 0 and 1", id="share-above-one"),
        pytest.param(["--slow-seconds", "-1"], ">= 0", id="negative-seconds"),
    ],
)
def test_cli_rejects_bad_flags(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Invalid flags stop argument parsing with a message naming the expected form."""
    parser = argparse.ArgumentParser()
    mes.add_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(argv)
    assert message in capsys.readouterr().err


def test_cli_flags_become_config() -> None:
    """Parsed flags map one to one onto MesSimConfig fields."""
    parser = argparse.ArgumentParser()
    mes.add_arguments(parser)
    args = parser.parse_args(
        ["--listen", "[::1]:0", "--crm-url", "http://127.0.0.1:8090", "--seed", "9", "--reset-rate", "0.2"]
    )
    assert args.listen == ("::1", 0)
    assert mes.config_from_args(args) == MesSimConfig(crm_url="http://127.0.0.1:8090", seed=9, reset_rate=0.2)


def test_invalid_config_is_refused() -> None:
    """A share out of 0..1 or a non-http CRM URL cannot make a config."""
    with pytest.raises(ValueError, match="reset_rate"):
        MesSimConfig(reset_rate=2.0)
    with pytest.raises(ValueError, match="crm_url"):
        MesSimConfig(crm_url="ftp://crm")


async def test_module_runs_until_sigterm() -> None:
    """`python -m mes_trace_proxy.sim.mes` prints its bound URL, serves, and exits 0 on SIGTERM."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mes_trace_proxy.sim.mes", "--listen", "127.0.0.1:0",
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONWARNINGS": "error"},
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        ready = json.loads(await asyncio.wait_for(proc.stdout.readline(), 20.0))
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{ready['listen']}/api/v1/health") as resp,
        ):
            assert resp.status == 200
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), WAIT) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
