"""The orders API on the admin listener: paging rules as a table, then every route on real sockets."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import aiohttp
import pytest

from mes_trace_proxy.admin import build_admin_app
from mes_trace_proxy.admin_orders import (
    COLLECTION,
    COLLECTION_ACTIONS,
    DEPRECATED_SINCE,
    ROUTE_ACCESS,
    Page,
    order_path,
    page_params,
)
from mes_trace_proxy.admin_page import jaeger_search_url
from mes_trace_proxy.config import load_config
from mes_trace_proxy.server import RunningProxy
from tests.conftest import MakeConfig, ManualClock, StartProxy
from tests.upstream import RecordingUpstream

SUBMITTED_LIMIT = 15 * 60.0


@pytest.mark.parametrize(
    ("query", "page"),
    [
        ({}, Page(limit=50, offset=0)),
        ({"limit": "1"}, Page(limit=1, offset=0)),
        ({"limit": "500", "offset": "1000000"}, Page(limit=500, offset=1_000_000)),
        ({"offset": "0"}, Page(limit=50, offset=0)),
    ],
    ids=["defaults", "smallest", "largest", "zero-offset"],
)
def test_page_params_accepted(query: dict[str, str], page: Page) -> None:
    """Limits from 1 to 500 and any offset from 0 are taken; absent ones default to 50 and 0."""
    assert page_params(query) == page


@pytest.mark.parametrize(
    ("query", "names"),
    [
        ({"limit": "0"}, "limit"),
        ({"limit": "501"}, "limit"),
        ({"limit": "-1"}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"limit": ""}, "limit"),
        ({"limit": "²"}, "limit"),
        ({"limit": "9" * 40}, "limit"),
        ({"offset": "-5"}, "offset"),
        ({"offset": "1.5"}, "offset"),
    ],
    ids=[
        "zero",
        "over-max",
        "negative",
        "word",
        "empty",
        "unicode-digit",
        "huge",
        "neg-offset",
        "float-offset",
    ],
)
def test_page_params_refused(query: dict[str, str], names: str) -> None:
    """A bad limit or offset raises a ValueError naming the parameter and the range."""
    with pytest.raises(ValueError, match=rf"^{names} must be a whole number from"):
        page_params(query)


# ── on real sockets ──────────────────────────────────────────────────────────────────────────


@dataclass(slots=True)
class Admin:
    """A running proxy, its clock, and a client for both listeners."""

    proxy: RunningProxy
    clock: ManualClock
    http: aiohttp.ClientSession

    async def set_status(self, order_id: str, status: str) -> str:
        """Set a status through the ingress listener; returns the call's trace id."""
        url = f"{self.proxy.url('ingress')}/api/v1/orders/{order_id}/status"
        async with self.http.put(url, json={"status": status}) as resp:
            assert resp.status == 200
            return resp.headers["X-Trace-Id"]

    async def get(self, path: str) -> tuple[int, str, dict[str, object]]:
        async with self.http.get(f"{self.proxy.admin_url}{path}") as resp:
            return resp.status, resp.content_type, await resp.json(content_type=None)


@pytest.fixture
async def admin(
    make_config: MakeConfig, start_proxy: StartProxy, recording_upstream: tuple[str, RecordingUpstream]
) -> AsyncIterator[Admin]:
    """A proxy with a one-hour retention, a manual clock and a quiet background watchdog."""
    base, _ = recording_upstream
    clock = ManualClock()
    config = make_config(base, doc={"watchdog": {"retention": "1h"}}, check_interval="1h")
    proxy = await start_proxy(config, clock=clock)
    await proxy.watchdog.first_round.wait()
    async with aiohttp.ClientSession() as http:
        yield Admin(proxy=proxy, clock=clock, http=http)


def _ids(doc: dict[str, object]) -> list[object]:
    orders = doc["orders"]
    assert isinstance(orders, list)
    return [o["order_id"] for o in orders]


async def test_orders_by_status_longest_waiting_first_with_paging(admin: Admin) -> None:
    """?status= lists one status oldest first; no status: all in lifecycle order; pages cross statuses."""
    for order_id, new in [
        ("S1", "SUBMITTED"),
        ("P1", "PACKAGING"),
        ("S2", "SUBMITTED"),
        ("S3", "SUBMITTED"),
    ]:
        await admin.set_status(order_id, new)
        admin.clock.advance(10)
    status, _, doc = await admin.get("/orders?status=SUBMITTED")
    assert status == 200
    assert (_ids(doc), doc["total"], doc["status"]) == (["S1", "S2", "S3"], 3, "SUBMITTED")
    _, _, doc = await admin.get("/orders?status=SUBMITTED&limit=1&offset=1")
    assert _ids(doc) == ["S2"]
    _, _, doc = await admin.get("/orders")
    assert (_ids(doc), doc["total"]) == (["S1", "S2", "S3", "P1"], 4)
    _, _, doc = await admin.get("/orders?limit=2&offset=2")
    assert _ids(doc) == ["S3", "P1"]
    _, _, doc = await admin.get("/orders?status=CLOSED")
    assert (_ids(doc), doc["total"]) == ([], 0)
    _, _, doc = await admin.get("/orders?limit=1")
    orders = doc["orders"]
    assert isinstance(orders, list)
    assert orders[0] == {
        "order_id": "S1",
        "status": "SUBMITTED",
        "since": "2023-11-14T22:13:20.000Z",
        "dwell_seconds": 40.0,
        "dwell_limit_seconds": SUBMITTED_LIMIT,
        "stuck": False,
        "last_trace_id": orders[0]["last_trace_id"],
        "jaeger_url": jaeger_search_url(
            "http://localhost:16686", "mes-api", "S1", start=admin.clock.now - 40, end=admin.clock.now
        ),
    }


@pytest.mark.parametrize(
    "path",
    [
        "/orders?limit=0",
        "/orders?limit=501",
        "/orders?offset=-1",
        "/orders?status=NOT_A_STATUS",
        "/orders/stuck?limit=x",
        "/?refresh=-1",
        "/?refresh=3601",
    ],
)
async def test_bad_parameters_get_a_400_problem(admin: Admin, path: str) -> None:
    """Out-of-range or unknown parameters answer 400 application/problem+json that says what is wrong."""
    status, content_type, doc = await admin.get(path)
    assert (status, content_type) == (400, "application/problem+json")
    assert doc["type"] == "urn:mes-trace-proxy:problem:bad-admin-request"
    assert doc["status"] == 400
    detail = str(doc["detail"])
    assert any(word in detail for word in ("limit", "offset", "status", "refresh"))


async def test_unknown_order_is_a_404_problem_that_does_not_echo_the_id(admin: Admin) -> None:
    """An order the proxy does not track answers 404 problem+json, without repeating the id."""
    status, content_type, doc = await admin.get("/orders/%3Cscript%3Ex")
    assert (status, content_type) == (404, "application/problem+json")
    assert doc["type"] == "urn:mes-trace-proxy:problem:order-not-found"
    assert "script" not in str(doc)


async def test_order_timeline_carries_each_calls_trace_id(admin: Admin) -> None:
    """/orders/{id} lists each change; the first and newest with the trace id the caller got back."""
    traces = []
    for new in ("SUBMITTED", "PRICE_CALCULATED", "MANUFACTURING_APPROVED"):
        traces.append(await admin.set_status("ORD%2F7", new))  # the order id is "ORD/7"
        admin.clock.advance(60)
    admin.clock.advance(2 * 3600)
    status, _, doc = await admin.get("/orders/ORD%2F7")
    assert status == 200
    timeline = doc["timeline"]
    assert isinstance(timeline, list)
    assert [(e["status"], e["trace_id"], e["transition"], e["source"]) for e in timeline] == [
        ("SUBMITTED", traces[0], "first", "ingress"),
        ("PRICE_CALCULATED", None, "forward", "ingress"),  # the book keeps no span between the ends
        ("MANUFACTURING_APPROVED", traces[2], "forward", "ingress"),
    ]
    assert timeline[2]["trace_url"] == f"http://localhost:16686/trace/{traces[2]}"
    assert timeline[1]["span_id"] is None
    middle_search = str(timeline[1]["trace_url"])
    assert middle_search.startswith("http://localhost:16686/search?")
    assert "ORD%2F7" in middle_search
    assert timeline[0]["at"] == "2023-11-14T22:13:20.000Z"
    assert (doc["order_id"], doc["previous_status"], doc["last_trace_id"]) == (
        "ORD/7",
        "PRICE_CALCULATED",
        traces[2],
    )
    assert doc["over_limit_by_seconds"] == 60.0  # 2 h 1 min in a status whose limit is 2 h
    assert doc["stuck"] is False  # over the limit, but the watchdog has not looked yet


async def test_stuck_orders_json(admin: Admin) -> None:
    """/orders/-/stuck gives id, status, since (ISO UTC), seconds over limit, last trace id, Jaeger link."""
    trace = await admin.set_status("LATE", "SUBMITTED")
    admin.clock.advance(60)
    await admin.set_status("LATER", "SUBMITTED")
    admin.clock.advance(SUBMITTED_LIMIT + 30)
    await admin.proxy.watchdog.check_once(admin.clock())
    status, _, doc = await admin.get("/orders/-/stuck")
    assert status == 200
    orders = doc["orders"]
    assert isinstance(orders, list)
    assert (doc["total"], [o["order_id"] for o in orders]) == (2, ["LATE", "LATER"])
    assert orders[0] == {
        "order_id": "LATE",
        "status": "SUBMITTED",
        "since": "2023-11-14T22:13:20.000Z",
        "over_limit_by_seconds": 90.0,
        "limit_seconds": SUBMITTED_LIMIT,
        "last_trace_id": trace,
        "jaeger_url": jaeger_search_url(
            "http://localhost:16686", "mes-api", "LATE", start=ManualClock().now, end=admin.clock.now
        ),
    }
    _, _, doc = await admin.get("/orders/-/stuck?offset=1&limit=1")
    assert _ids(doc) == ["LATER"]


async def test_purge_forgets_closed_orders_past_retention(admin: Admin) -> None:
    """POST /orders/-/purge forgets closed orders older than the retention now; open ones stay."""
    await admin.set_status("DONE", "CLOSED")
    await admin.set_status("OPEN", "SHIPPED")
    async with admin.http.post(f"{admin.proxy.admin_url}/orders/-/purge") as resp:
        assert (resp.status, await resp.json()) == (200, {"purged": 0, "retention_seconds": 3600.0})
        assert "Deprecation" not in resp.headers
    admin.clock.advance(3601)
    async with admin.http.post(f"{admin.proxy.admin_url}/orders/-/purge") as resp:
        assert (await resp.json())["purged"] == 1
    assert (await admin.get("/orders/DONE"))[0] == 404
    assert (await admin.get("/orders/OPEN"))[0] == 200
    async with admin.http.post(f"{admin.proxy.admin_url}/orders/-/stuck") as resp:
        assert resp.status == 405


@pytest.mark.parametrize(
    "order_id",
    ["stuck", "purge", "-", "-/stuck", "ORD/7", "50%", "a b", "Ärger?#1"],
    ids=["stuck", "purge", "dash", "dash-slash-stuck", "slash", "percent", "space", "reserved"],
)
async def test_every_order_id_can_be_fetched(admin: Admin, order_id: str) -> None:
    """Ids that look like the collection's names are orders at /orders/{id}, percent-encoded."""
    await admin.set_status(quote(order_id, safe=""), "SUBMITTED")
    await admin.set_status("OTHER", "SUBMITTED")
    admin.clock.advance(SUBMITTED_LIMIT + 1)
    await admin.proxy.watchdog.check_once(admin.clock())
    async with admin.http.get(f"{admin.proxy.admin_url}{order_path(order_id)}") as resp:
        assert resp.status == 200
        assert (await resp.json())["order_id"] == order_id
        assert "Deprecation" not in resp.headers
    status, _, doc = await admin.get("/orders/-/stuck")
    assert (status, doc["total"]) == (200, 2)


async def test_old_paths_answer_for_one_release_marked_deprecated(admin: Admin) -> None:
    """/orders/stuck, POST /orders/purge and raw-slash ids still work, with Deprecation and a Link."""
    await admin.set_status("LATE", "SUBMITTED")
    await admin.set_status(quote("ORD/7", safe=""), "SUBMITTED")
    admin.clock.advance(SUBMITTED_LIMIT + 1)
    await admin.proxy.watchdog.check_once(admin.clock())
    base = admin.proxy.admin_url
    for method, path, successor in (
        ("GET", "/orders/stuck", "/orders/-/stuck"),
        ("POST", "/orders/purge", "/orders/-/purge"),
        ("GET", "/orders/ORD/7", "/orders/ORD%2F7"),
    ):
        async with admin.http.request(method, base + path) as resp:
            assert resp.status == 200, path
            assert resp.headers["Deprecation"] == f"@{DEPRECATED_SINCE}"
            assert resp.headers["Link"] == f'<{successor}>; rel="successor-version"'
            doc = await resp.json()
        if path == "/orders/stuck":
            assert _ids(doc) == ["LATE", "ORD/7"]
    # Once an order has the id "stuck", /orders/stuck is that order's path.
    await admin.set_status("stuck", "SUBMITTED")
    async with admin.http.get(base + "/orders/stuck") as resp:
        assert (await resp.json())["order_id"] == "stuck"
        assert "Deprecation" not in resp.headers


def test_per_order_actions_and_collection_views_cannot_meet() -> None:
    """/orders/-/{view} is only ever a collection view: its names are reserved from per-order actions."""
    assert COLLECTION == "/orders/-"
    assert {"stuck", "purge"} == COLLECTION_ACTIONS
    assert order_path("-") == "/orders/-"
    assert order_path("-/stuck") == "/orders/-%2Fstuck"  # one segment: never the collection


async def test_page_is_html_with_a_strict_policy(admin: Admin) -> None:
    """/ is an uncached UTF-8 HTML page that may run no script and load nothing."""
    async with admin.http.get(f"{admin.proxy.admin_url}/?refresh=0") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/html; charset=utf-8"
        assert resp.headers["Cache-Control"] == "no-store"
        assert resp.headers["Content-Security-Policy"].startswith("default-src 'none';")
        page = await resp.text()
    assert page.startswith("<!doctype html>")
    assert 'http-equiv="refresh"' not in page


async def test_every_orders_route_is_named_in_the_access_table(admin: Admin) -> None:
    """Each orders route has a name in ROUTE_ACCESS, and only purge and re-drive change state."""
    app = build_admin_app(admin.proxy.shared)
    names = {r.name for r in app.router.routes() if r.name is not None and r.name.startswith("orders.")}
    assert set(ROUTE_ACCESS) == names
    assert {name for name, access in ROUTE_ACCESS.items() if access != "read"} == {
        "orders.purge",
        "orders.purge.deprecated",
        "orders.redrive",
    }
    # Every per-order route has two segments after /orders/: none may be named like a view.
    for resource in app.router.resources():
        parts = resource.canonical.split("/")
        if parts[:2] == ["", "orders"] and len(parts) == 4 and parts[2] == "{order_id}":
            assert parts[3] not in COLLECTION_ACTIONS


VIEWER_TOKEN = "viewer-token-for-orders-0123456789"
ADMIN_TOKEN = "admin-token-for-orders-9876543210"


@pytest.mark.parametrize(
    ("method", "path", "token", "status"),
    [
        ("GET", "/", None, 401),
        ("GET", "/", VIEWER_TOKEN, 200),
        ("GET", "/orders/-/stuck", VIEWER_TOKEN, 200),
        ("GET", "/orders/stuck", VIEWER_TOKEN, 200),
        ("GET", "/orders?status=SUBMITTED", VIEWER_TOKEN, 200),
        ("GET", "/orders/ORD%2F9", VIEWER_TOKEN, 200),
        ("GET", "/orders/ORD%2F9", None, 401),
        ("POST", "/orders/-/purge", VIEWER_TOKEN, 403),
        ("POST", "/orders/-/purge", ADMIN_TOKEN, 200),
        ("POST", "/orders/purge", VIEWER_TOKEN, 403),
        ("POST", "/orders/purge", ADMIN_TOKEN, 200),
    ],
    ids=[
        "page-anon",
        "page",
        "stuck",
        "stuck-old",
        "list",
        "order",
        "order-anon",
        "purge-viewer",
        "purge-admin",
        "purge-old-viewer",
        "purge-old-admin",
    ],
)
async def test_orders_routes_take_their_roles_from_the_admin_table(
    tmp_path: Path,
    default_rules: dict[str, object],
    start_proxy: StartProxy,
    recording_upstream: tuple[str, RecordingUpstream],
    method: str,
    path: str,
    token: str | None,
    status: int,
) -> None:
    """With admin tokens, viewers read the page and the orders API; only admins purge."""
    base, _ = recording_upstream
    tokens = tmp_path / "tokens"
    tokens.write_text(f"viewer:{VIEWER_TOKEN}\nadmin:{ADMIN_TOKEN}\n")
    flags: dict[str, object] = {
        "upstream": base,
        "listen": "127.0.0.1:0",
        "admin_listen": "127.0.0.1:0",
        "state": "memory",
        "admin_token_file": str(tokens),
    }
    config = load_config(
        flags=flags,
        environ={},
        file_doc=None,
        defaults=default_rules,
        read_file=lambda p: Path(p).read_bytes(),
    )
    proxy = await start_proxy(config)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as http:
        order_url = f"{proxy.url('ingress')}/api/v1/orders/ORD%2F9/status"
        async with http.put(order_url, json={"status": "SUBMITTED"}) as created:
            assert created.status == 200
        async with http.request(method, f"{proxy.admin_url}{path}", headers=headers) as resp:
            assert resp.status == status


@pytest.mark.parametrize(
    ("jaeger_url", "warned"),
    [
        ("https://viewer:secret@jaeger.example/ui?token=secret", True),
        ("http://jaeger.example:16686/", False),
        ("http://jaeger.example:16686", False),
    ],
    ids=["credentials", "trailing-slash", "plain"],
)
async def test_start_up_warns_only_when_links_lose_credentials(
    make_config: MakeConfig,
    start_proxy: StartProxy,
    recording_upstream: tuple[str, RecordingUpstream],
    caplog: pytest.LogCaptureFixture,
    jaeger_url: str,
    warned: bool,
) -> None:
    """--jaeger-url with a user, password or query warns once that links leave them out, never
    naming them; an ordinary URL, with or without a trailing '/' (the config drops it), starts quietly."""
    base, _ = recording_upstream
    with caplog.at_level(logging.WARNING):
        proxy = await start_proxy(make_config(base, jaeger_url=jaeger_url))
        async with aiohttp.ClientSession() as http, http.get(f"{proxy.admin_url}/orders") as resp:
            assert resp.status == 200
    notices = [r for r in caplog.records if r.getMessage().startswith("--jaeger-url:")]
    assert len(notices) == (1 if warned else 0)
    assert all("secret" not in r.getMessage() for r in caplog.records)
