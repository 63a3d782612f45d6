"""The operations page: pure rendering from an order book, then the real page in headless Chromium."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

import aiohttp
import pytest

from mes_trace_proxy.admin_page import (
    dashboard_data,
    human_duration,
    iso_utc,
    jaeger_link_base,
    jaeger_search_url,
    jaeger_trace_url,
    render,
)
from mes_trace_proxy.lifecycle import REFERENCE_LIFECYCLE
from mes_trace_proxy.orders import OrderBook, SpanRef
from tests.conftest import MakeConfig, ManualClock, StartProxy
from tests.upstream import RecordingUpstream

T0 = 1_700_000_000.0
JAEGER = "http://jaeger.example:16686"
# Chromium starts, loads a local page and exits in a second or two; the bound only stops a hang.
CHROMIUM_TIMEOUT_S = 60.0
HOSTILE = "<b>bold</b>&\"'"


# ── pure parts ───────────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0 s"),
        (-5, "0 s"),
        (45.9, "45 s"),
        (60, "1 min"),
        (61, "1 min 1 s"),
        (3900, "1 h 5 min"),
        (3659, "1 h"),
        (7200, "2 h"),
        (86400 * 2 + 3 * 3600 + 59, "2 d 3 h"),
    ],
)
def test_human_duration(seconds: float, text: str) -> None:
    """Durations read as their two largest units, never negative."""
    assert human_duration(seconds) == text


def test_iso_utc_is_utc_with_milliseconds() -> None:
    """Times are ISO 8601 in UTC with a Z, to the millisecond."""
    assert iso_utc(T0 + 0.25) == "2023-11-14T22:13:20.250Z"


def test_jaeger_search_url_matches_the_jaeger_ui_format() -> None:
    """The link names the service, tags {"mes.order.id": id} as JSON and a custom range in microseconds."""
    url = jaeger_search_url(JAEGER, "mes-api", "ORD 1/ü", start=T0, end=T0 + 60)
    assert url.startswith(
        f"{JAEGER}/search?service=mes-api&tags=%7B%22mes.order.id%22%3A%22ORD%201%2F%C3%BC%22%7D&"
    )
    query = {k: v[0] for k, v in parse_qs(urlsplit(url).query, strict_parsing=True).items()}
    assert query == {
        "service": "mes-api",
        "tags": '{"mes.order.id":"ORD 1/ü"}',
        "lookback": "custom",
        "start": str(int((T0 - 3600) * 1e6)),
        "end": str(int((T0 + 60 + 3600) * 1e6)),
        "limit": "100",
    }
    assert jaeger_trace_url(JAEGER, "ab" * 16) == f"{JAEGER}/trace/{'ab' * 16}"


@pytest.mark.parametrize(
    ("configured", "link_base"),
    [
        ("http://jaeger:16686", "http://jaeger:16686"),
        ("https://user:secret@jaeger.example/ui/", "https://jaeger.example/ui"),
        ("https://user@jaeger.example:8443", "https://jaeger.example:8443"),
        ("https://u:p@ss@[::1]:16686/x?token=secret#frag", "https://[::1]:16686/x"),
    ],
    ids=["plain", "user-password", "user-only", "at-in-password-query-fragment"],
)
def test_links_never_carry_the_jaeger_urls_credentials(configured: str, link_base: str) -> None:
    """The base links use has no user, password, query or fragment, whatever --jaeger-url holds."""
    assert jaeger_link_base(configured) == link_base


def _book() -> OrderBook:
    book = OrderBook(REFERENCE_LIFECYCLE)
    moves = [
        ("ORD-A", "SUBMITTED", T0, 1),
        ("ORD-B", "SUBMITTED", T0 + 300, 2),
        ("ORD-B", "PRICE_CALCULATED", T0 + 400, 3),
        ("ORD-B", "MANUFACTURING_APPROVED", T0 + 500, 4),
        ("ORD-C", "SUBMITTED", T0 + 600, 5),
        (HOSTILE, "SUBMITTED", T0 + 100, 6),
        ("ORD-OK", "SHIPPED", T0, 7),
    ]
    for order_id, status, at, span in moves:
        book.apply(order_id=order_id, status=status, observed=None, now=at, span=SpanRef(span << 80, span))
    return book


class _Dom(HTMLParser):
    """Collects what the tests look at: stuck rows, their links, count rows, escaped-markup leaks."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[str] = []
        self.jaeger: list[str] = []
        self.traces: list[str] = []
        self.counts: dict[str, list[str]] = {}
        self.bold = 0
        self.meta: dict[str, str] = {}
        self._count_row: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        classes = a.get("class", "").split()
        if tag == "li" and "order" in classes:
            self.rows.append(a["data-order-id"])
        elif tag == "a" and "jaeger" in classes:
            self.jaeger.append(a["href"])
        elif tag == "a" and "/trace/" in a.get("href", ""):
            self.traces.append(a["href"])
        elif tag == "tr" and "data-status" in a:
            self._count_row = a["data-status"]
            self.counts[self._count_row] = []
        elif tag == "b":
            self.bold += 1
        elif tag == "meta" and "name" in a:
            self.meta[a["name"]] = a.get("content", "")
        elif tag == "meta" and "http-equiv" in a:
            self.meta[a["http-equiv"]] = a.get("content", "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "tr":
            self._count_row = None

    def handle_data(self, data: str) -> None:
        if self._count_row is not None and data.strip():
            self.counts[self._count_row].append(data.strip())


def _parse(page: str) -> _Dom:
    dom = _Dom()
    dom.feed(page)
    return dom


def test_render_lists_stuck_orders_most_late_first_with_links() -> None:
    """Counts per status, then stuck orders by lateness, each with its Jaeger search and timeline links."""
    book = _book()
    now = T0 + 86400
    book.stuck(now)  # nothing flagged until the watchdog reports
    assert {s.order_id for s in book.overdue(now)} == {"ORD-A", "ORD-B", "ORD-C", HOSTILE}
    data = dashboard_data(book, now, jaeger_url=JAEGER, service="mes-api")
    dom = _parse(render(data))
    # SUBMITTED limit 15 min, MANUFACTURING_APPROVED 2 h: B is the least late although it waits.
    assert dom.rows == ["ORD-A", HOSTILE, "ORD-C", "ORD-B"]
    assert dom.jaeger[0] == jaeger_search_url(JAEGER, "mes-api", "ORD-A", start=T0, end=now)
    assert dom.jaeger[3] == jaeger_search_url(JAEGER, "mes-api", "ORD-B", start=T0 + 300, end=now)
    assert f"{JAEGER}/trace/{SpanRef(4 << 80, 4).trace_id_hex}" in dom.traces
    assert dom.counts["SUBMITTED"] == ["SUBMITTED", "3", "3"]
    assert dom.counts["SHIPPED"] == ["SHIPPED", "1", "0"]
    assert list(dom.counts)[:3] == ["FILE_UPLOADED", "SUBMITTED", "PRICE_CALCULATED"]
    assert dom.meta["viewport"] == "width=device-width, initial-scale=1"
    assert dom.meta["refresh"] == "30"


def test_render_escapes_everything_from_the_book() -> None:
    """An order id full of markup is shown as text: no element, no broken attribute."""
    book = _book()
    book.overdue(T0 + 86400)
    page = render(dashboard_data(book, T0 + 86400, jaeger_url=JAEGER, service='svc"><b>x</b>'))
    dom = _parse(page)
    assert dom.bold == 0
    assert HOSTILE in dom.rows
    assert "<b>" not in page
    assert quote(json.dumps({"mes.order.id": HOSTILE}, separators=(",", ":")), safe="") in page.replace(
        "&amp;", "&"
    )


def test_render_without_stuck_orders_and_without_refresh() -> None:
    """An empty book says nothing is stuck; refresh 0 leaves out the reload."""
    data = dashboard_data(OrderBook(REFERENCE_LIFECYCLE), T0, jaeger_url=JAEGER, service="mes-api", refresh=0)
    page = render(data)
    dom = _parse(page)
    assert dom.rows == []
    assert "No order is past its dwell limit." in page
    assert "refresh" not in dom.meta


def test_page_caps_the_stuck_list_and_points_to_the_api() -> None:
    """Past 100 stuck orders the page shows the 100 most late and says where the rest are."""
    book = OrderBook(REFERENCE_LIFECYCLE)
    for n in range(105):
        book.apply(order_id=f"O-{n:03d}", status="SUBMITTED", observed=None, now=T0 + n, span=SpanRef(1, 1))
    book.overdue(T0 + 86400)
    page = render(dashboard_data(book, T0 + 86400, jaeger_url=JAEGER, service="mes-api"))
    dom = _parse(page)
    assert dom.rows == [f"O-{n:03d}" for n in range(100)]
    assert "5 more" in page


# ── the real page in headless Chromium ───────────────────────────────────────────────────────


def _chromium() -> str:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed, and CI must run the page test: apt-get install chromium")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return binary


@dataclass(slots=True)
class Browser:
    """Headless Chromium run once per page, as a child process this test owns."""

    binary: str
    profile: Path

    async def run(self, *args: str) -> str:
        proc = await asyncio.create_subprocess_exec(
            self.binary,
            "--headless",
            "--no-sandbox",  # root in a container has no user namespace for the sandbox
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={self.profile}",
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            async with asyncio.timeout(CHROMIUM_TIMEOUT_S):
                out, err = await proc.communicate()
        except TimeoutError:
            proc.kill()  # ours, by PID
            await proc.wait()
            raise
        assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
        return out.decode()


@pytest.mark.needs_chromium
async def test_page_in_headless_chromium_shows_the_stuck_order_and_its_jaeger_link(
    make_config: MakeConfig,
    start_proxy: StartProxy,
    recording_upstream: tuple[str, RecordingUpstream],
    tmp_path: Path,
) -> None:
    """A real browser renders the stuck order's row, its Jaeger search link and no injected markup."""
    binary = _chromium()
    base, _ = recording_upstream
    clock = ManualClock()
    config = make_config(base, check_interval="1h", jaeger_url="http://jaeger.internal:16686")
    proxy = await start_proxy(config, clock=clock)
    hostile_path = quote(HOSTILE, safe="")
    async with aiohttp.ClientSession() as http:
        for order_id in ("ORD-LATE", hostile_path, "ORD-FINE"):
            async with http.post(
                f"{proxy.url('ingress')}/api/v1/orders/{order_id}/price-calculation"
            ) as resp:
                assert resp.status == 200
            clock.advance(60)
    await proxy.watchdog.first_round.wait()
    clock.advance(15 * 60 - 60)  # ORD-LATE and the hostile one are past 15 min; ORD-FINE is not
    assert len((await proxy.watchdog.check_once(clock())).found) == 2

    browser = Browser(binary, tmp_path / "profile")
    dom = _parse(await browser.run("--dump-dom", f"{proxy.admin_url}/"))
    assert dom.rows == ["ORD-LATE", HOSTILE]
    assert dom.bold == 0
    assert dom.jaeger[0] == jaeger_search_url(
        "http://jaeger.internal:16686", "mes-api", "ORD-LATE", start=ManualClock().now, end=clock()
    )
    assert dom.counts["SUBMITTED"] == ["SUBMITTED", "3", "2"]
    screenshot = os.environ.get("MES_PAGE_SCREENSHOT")
    if screenshot:  # a person looks at the phone rendering once: MES_PAGE_SCREENSHOT=/tmp/page.png
        await browser.run("--window-size=412,915", f"--screenshot={screenshot}", f"{proxy.admin_url}/")


# ── the page on a phone: headless Chromium driven over the DevTools protocol ─────────────────

PHONE_WIDTH = 390  # CSS pixels: a common phone (iPhone 12-15) in portrait


@dataclass(slots=True)
class DevTools:
    """One page of a headless Chromium this test started, driven over the DevTools protocol."""

    ws: aiohttp.ClientWebSocketResponse
    last_id: int = 0

    async def call(self, method: str, **params: object) -> dict[str, object]:
        """Send one command and return its result; events that arrive meanwhile are dropped."""
        self.last_id += 1
        await self.ws.send_json({"id": self.last_id, "method": method, "params": params})
        while True:
            message = json.loads(await self.ws.receive_str())
            if message.get("id") == self.last_id:
                assert "error" not in message, message
                result = message["result"]
                assert isinstance(result, dict)
                return result

    async def open(self, url: str, width: int) -> None:
        """Load ``url`` in a phone-sized viewport and wait for its load event."""
        await self.call(
            "Emulation.setDeviceMetricsOverride", width=width, height=844, deviceScaleFactor=1, mobile=True
        )
        await self.call("Page.enable")
        await self.call("Page.navigate", url=url)
        while json.loads(await self.ws.receive_str()).get("method") != "Page.loadEventFired":
            pass

    async def evaluate(self, expression: str) -> object:
        """The value of a JavaScript expression in the page (the page itself runs no script)."""
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        value = result["result"]
        assert isinstance(value, dict)
        return value.get("value")


async def _devtools_page(
    binary: str, profile: Path, http: aiohttp.ClientSession
) -> tuple[asyncio.subprocess.Process, str]:
    """Start Chromium with a DevTools port; return it and the websocket URL of its blank page."""
    proc = await asyncio.create_subprocess_exec(
        binary,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--remote-debugging-address=127.0.0.1",
        "--remote-debugging-port=0",
        f"--user-data-dir={profile}",
        "about:blank",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    async with asyncio.timeout(CHROMIUM_TIMEOUT_S):
        line = ""
        while not line.startswith("DevTools listening on ws://"):  # said once they listen
            line = (await proc.stderr.readline()).decode(errors="replace")
            assert line, "chromium exited before its DevTools were up"
        port = int(line.split("ws://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])
        async with http.get(f"http://127.0.0.1:{port}/json/list") as resp:
            targets = await resp.json()
    page = next(t for t in targets if t["type"] == "page")
    return proc, str(page["webSocketDebuggerUrl"])


@pytest.mark.needs_chromium
async def test_page_fits_a_phone_without_sideways_scrolling(
    make_config: MakeConfig,
    start_proxy: StartProxy,
    recording_upstream: tuple[str, RecordingUpstream],
    tmp_path: Path,
) -> None:
    """At 390 px the page is no wider than the screen: long ids, long statuses and the counts table fold."""
    binary = _chromium()
    base, _ = recording_upstream
    clock = ManualClock()
    proxy = await start_proxy(make_config(base, check_interval="1h"), clock=clock)
    long_id = "ORD-" + "7" * 120  # ids are kept up to 128 characters
    async with aiohttp.ClientSession() as http:
        for order_id, status in (
            (long_id, "SUBMITTED"),
            ("ORD-1", "MANUFACTURING_APPROVED"),
            ("ORD-2", "MANUFACTURING_COMPLETED"),
            ("ORD-3", "WAITING_FOR_CUSTOMER_CONFIRMATION_OF_THE_REVISED_PRICE"),
        ):
            url = f"{proxy.url('ingress')}/api/v1/orders/{order_id}/status"
            async with http.put(url, json={"status": status}) as resp:
                assert resp.status == 200
        await proxy.watchdog.first_round.wait()
        clock.advance(86400 + 60)  # past every one's limit (MANUFACTURING_COMPLETED: 1 day)
        assert len((await proxy.watchdog.check_once(clock())).found) == 3

        chromium, page_ws = await _devtools_page(binary, tmp_path / "profile", http)
        try:
            async with http.ws_connect(page_ws, max_msg_size=0) as ws:
                tools = DevTools(ws)
                await tools.open(f"{proxy.admin_url}/?refresh=0", PHONE_WIDTH)
                width = await tools.evaluate("document.documentElement.scrollWidth")
                rows = await tools.evaluate("document.querySelectorAll('li.order').length")
                shot = await tools.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        finally:
            chromium.kill()  # ours, by PID
            await chromium.wait()
    assert rows == 3  # the page did render the stuck orders it is measured with
    assert isinstance(width, int)
    assert width <= PHONE_WIDTH
    screenshot = os.environ.get("MES_PAGE_SCREENSHOT")
    if screenshot:  # a person looks at the phone rendering: MES_PAGE_SCREENSHOT=/tmp/phone.png
        await asyncio.to_thread(Path(screenshot).write_bytes, base64.b64decode(str(shot["data"])))
