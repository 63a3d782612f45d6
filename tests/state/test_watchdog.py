"""The stuck-order watchdog: controlled-clock checks, then the whole proxy with MES, SQLite, Redis, OTLP.

No test sleeps: time is a number the test moves, and every wait is on an event with a bound.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from mes_trace_proxy.core.config import Config
from mes_trace_proxy.core.orders import OrderBook, SpanRef
from mes_trace_proxy.core.tracecontext import order_trace_id
from mes_trace_proxy.server import RunningProxy, StartupError, running
from mes_trace_proxy.sim.mes import MES_STATE, MesSimConfig, build_app, share_hit
from mes_trace_proxy.sim.otlp_sink import OtlpSink
from mes_trace_proxy.state.book_sync import BookSync
from mes_trace_proxy.state.store import MemoryStore, StateStore, StoreWriter, open_store
from mes_trace_proxy.state.watchdog import REPORTS_PER_CHECK, STUCK_MESSAGE, UNREPORTED_MESSAGE, Watchdog
from mes_trace_proxy.telemetry.logs import JsonFormatter
from mes_trace_proxy.telemetry.metrics import ProxyMetrics
from mes_trace_proxy.telemetry.tracing import build_tracing
from tests.conftest import MakeConfig, ManualClock, RedisServer, StartProxy, otlp_env
from tests.proxy_process import ProxyProcess, proxy_process
from tests.upstream import RecordingUpstream

SUBMITTED_LIMIT = 15 * 60.0  # the reference dwell limit of SUBMITTED (mes-api.md)
APPROVED_LIMIT = 2 * 3600.0
WAIT = 10.0  # seconds any wait on a server, a task or an exporter may take before the test fails
NO_OTEL = {"OTEL_TRACES_EXPORTER": "none"}
# The background loop runs its first round at start and then only after an hour: every
# later round in these tests is the test's own check_once(now).
QUIET = "1h"


def _span(n: int) -> SpanRef:
    return SpanRef(trace_id=(n << 64) | 0xABC, span_id=n)


def _stuck_lines(caplog: pytest.LogCaptureFixture, order_id: str | None = None) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "mes_trace_proxy.watchdog"
        and r.getMessage() == STUCK_MESSAGE
        and (order_id is None or getattr(r, "order_id", None) == order_id)
    ]


def _sample(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in a Prometheus exposition, or None when absent."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return None


# ── the watchdog alone, over a real book, store, writer and SDK tracer ──────────────────────


@dataclass(slots=True)
class Rig:
    """A watchdog with everything it drives, and the spans it made."""

    watchdog: Watchdog
    book: OrderBook
    store: StateStore
    writer: StoreWriter
    metrics: ProxyMetrics
    spans: InMemorySpanExporter

    def stuck_spans(self) -> list[ReadableSpan]:
        return [s for s in self.spans.get_finished_spans() if s.name == "mes.order.stuck"]

    def metric(self, name: str, **labels: str) -> float | None:
        return _sample(generate_latest(self.metrics.registry).decode(), name, **labels)


MakeRig = Callable[..., Rig]


@pytest.fixture
def make_rig(make_config: MakeConfig) -> MakeRig:
    """A factory of watchdogs on a MemoryStore (or the given store) and an in-memory span exporter."""

    def make(
        correlation: str = "link",
        store: StateStore | None = None,
        retention: str = "1d",
        clock: Callable[[], float] = time.time,
        max_reports: int = REPORTS_PER_CHECK,
        **flags: object,
    ) -> Rig:
        config = make_config(
            "http://127.0.0.1:9", doc={"watchdog": {"retention": retention}}, correlation=correlation, **flags
        )
        exporter = InMemorySpanExporter()
        tracing = build_tracing(config, NO_OTEL, extra_processors=(SimpleSpanProcessor(exporter),))
        book = OrderBook(config.lifecycle)
        store = store if store is not None else MemoryStore()
        writer = StoreWriter(store)
        metrics = ProxyMetrics(known_statuses=config.lifecycle.known)
        sync = BookSync(book=book, store=store, writer=writer)
        watchdog = Watchdog(
            book=book,
            sync=sync,
            tracing=tracing,
            config=config.watchdog,
            metrics=metrics,
            clock=clock,
            max_reports=max_reports,
        )
        metrics.bind(stuck_counts=watchdog.stuck_counts, store_stats=sync.store_stats)
        return Rig(watchdog=watchdog, book=book, store=store, writer=writer, metrics=metrics, spans=exporter)

    return make


T0 = 1_700_000_000.0


def _move(rig: Rig, order_id: str, status: str, at: float, span: int) -> None:
    """Apply one status change the way the proxy does, including the store hook."""
    rig.book.apply(order_id=order_id, status=status, observed=None, now=at, span=_span(span))
    rig.watchdog.sync.order_changed(order_id)


async def test_normal_order_is_never_stuck(make_rig: MakeRig, caplog: pytest.LogCaptureFixture) -> None:
    """An order that leaves every status within its limit is never reported, up to a month after closing."""
    rig = make_rig()
    walk = [
        ("SUBMITTED", 0.0),
        ("PRICE_CALCULATED", 60.0),
        ("MANUFACTURING_APPROVED", 3600.0),
        ("MANUFACTURING_STARTED", 3600.0 + 1800),
        ("MANUFACTURING_COMPLETED", 86400.0),
        ("PACKAGING", 86400.0 * 1.5),
        ("SHIPPED", 86400.0 * 2),
        ("CLOSED", 86400.0 * 5),
    ]
    for span, (status, at) in enumerate(walk, start=1):
        _move(rig, "ORD-OK", status, T0 + at, span)
        report = await rig.watchdog.check_once(T0 + at + 1)
        assert report.found == ()
    report = await rig.watchdog.check_once(T0 + 86400.0 * 30)
    assert report.found == ()
    assert rig.stuck_spans() == []
    assert _stuck_lines(caplog) == []
    assert rig.metric("mes_orders_stuck", status="SUBMITTED") == 0


@pytest.mark.parametrize(
    ("after", "stuck"),
    [(SUBMITTED_LIMIT - 1, False), (SUBMITTED_LIMIT, False), (SUBMITTED_LIMIT + 0.001, True)],
    ids=["under", "exactly-at-limit", "just-over"],
)
async def test_limit_is_exceeded_only_past_it(make_rig: MakeRig, after: float, stuck: bool) -> None:
    """An order is stuck only once its dwell is strictly over the limit."""
    rig = make_rig()
    _move(rig, "ORD-1", "SUBMITTED", T0, 1)
    report = await rig.watchdog.check_once(T0 + after)
    assert [s.order_id for s in report.found] == (["ORD-1"] if stuck else [])


async def test_overdue_order_is_reported_exactly_once(
    make_rig: MakeRig, caplog: pytest.LogCaptureFixture
) -> None:
    """One JSON log line, one linked span, one metric increment and a persisted flag, whatever the rounds."""
    rig = make_rig()
    _move(rig, "ORD-LATE", "SUBMITTED", T0, 7)
    _move(rig, "ORD-FINE", "SUBMITTED", T0 + 600, 8)
    now = T0 + SUBMITTED_LIMIT + 90
    (found,) = (await rig.watchdog.check_once(now)).found
    for later in (now + 1, now + 60):
        assert (await rig.watchdog.check_once(later)).found == ()
    _move(rig, "ORD-FINE", "PRICE_CALCULATED", now + 100, 9)  # within its limit
    assert (await rig.watchdog.check_once(now + 86400)).found == ()

    assert (found.order_id, found.status, found.since, found.limit) == ("ORD-LATE", "SUBMITTED", T0, 900.0)
    (line,) = _stuck_lines(caplog)
    assert line.levelno == logging.WARNING
    doc = json.loads(JsonFormatter().format(line))
    assert {k: v for k, v in doc.items() if k != "time"} == {
        "level": "warning",
        "logger": "mes_trace_proxy.watchdog",
        "message": "order stuck",
        "event": "order.stuck",
        "order_id": "ORD-LATE",
        "status": "SUBMITTED",
        "since": "2023-11-14T22:13:20.000Z",
        "limit_s": 900.0,
        "over_by_s": 90.0,
        "trace_id": _span(7).trace_id_hex,
        "span_id": _span(7).span_id_hex,
    }

    (span,) = rig.stuck_spans()
    assert span.kind.name == "INTERNAL"
    assert span.parent is None
    assert dict(span.attributes or {}) == {
        "mes.order.id": "ORD-LATE",
        "mes.order.status": "SUBMITTED",
        "mes.order.dwell": 990.0,
        "mes.order.dwell_limit": 900.0,
    }
    assert span.start_time == span.end_time == int(now * 1e9)
    assert [(link.context.trace_id, link.context.span_id) for link in span.links] == [
        (_span(7).trace_id, _span(7).span_id)
    ]
    assert rig.metric("mes_order_stuck_found_total", status="SUBMITTED") == 1
    assert rig.metric("mes_orders_stuck", status="SUBMITTED") == 1

    assert await rig.writer.flush()
    assert isinstance(rig.store, MemoryStore)
    assert rig.store.records["ORD-LATE"].stuck_reported
    assert not rig.store.records["ORD-FINE"].stuck_reported


async def test_moving_on_ends_the_stay_and_a_later_stay_is_reported_again(
    make_rig: MakeRig, caplog: pytest.LogCaptureFixture
) -> None:
    """An order that moves on is no longer stuck; stuck again in a later status, it is reported again."""
    rig = make_rig()
    _move(rig, "ORD-2", "SUBMITTED", T0, 1)
    assert len((await rig.watchdog.check_once(T0 + SUBMITTED_LIMIT + 1)).found) == 1
    _move(rig, "ORD-2", "PRICE_CALCULATED", T0 + 2000, 2)
    assert rig.book.stuck(T0 + 2001) == []
    assert rig.metric("mes_orders_stuck", status="SUBMITTED") == 0
    _move(rig, "ORD-2", "MANUFACTURING_APPROVED", T0 + 3000, 3)
    (again,) = (await rig.watchdog.check_once(T0 + 3000 + APPROVED_LIMIT + 1)).found
    assert (again.status, again.span) == ("MANUFACTURING_APPROVED", _span(3))
    assert [getattr(r, "status", None) for r in _stuck_lines(caplog, "ORD-2")] == [
        "SUBMITTED",
        "MANUFACTURING_APPROVED",
    ]
    assert rig.metric("mes_order_stuck_found_total", status="SUBMITTED") == 1
    assert rig.metric("mes_order_stuck_found_total", status="MANUFACTURING_APPROVED") == 1


@pytest.mark.parametrize(
    ("correlation", "first_link", "order_trace"),
    [("link", True, False), ("off", False, False), ("trace-per-order", False, True)],
)
async def test_stuck_span_links_by_correlation_mode(
    make_rig: MakeRig, correlation: str, first_link: bool, order_trace: bool
) -> None:
    """The stuck span links the wait's transition; link mode adds the first span; per-order its trace."""
    rig = make_rig(correlation=correlation)
    _move(rig, "ORD-3", "SUBMITTED", T0, 1)
    _move(rig, "ORD-3", "PRICE_CALCULATED", T0 + 60, 2)
    _move(rig, "ORD-3", "MANUFACTURING_APPROVED", T0 + 120, 3)
    await rig.watchdog.check_once(T0 + 120 + APPROVED_LIMIT + 5)
    (span,) = rig.stuck_spans()
    links = [(link.context.span_id, dict(link.attributes or {})) for link in span.links]
    expected = [(3, {"mes.link.kind": "order.transition"})]
    if first_link:
        expected.append((1, {"mes.link.kind": "order.first_span"}))
    assert links == expected
    assert span.context is not None
    assert (span.context.trace_id == order_trace_id("ORD-3")) is order_trace


async def test_purge_forgets_closed_orders_after_retention_in_book_and_store(make_rig: MakeRig) -> None:
    """Closed and cancelled orders go after the retention, from the book and the store; open ones stay."""
    rig = make_rig(retention="1d")
    _move(rig, "ORD-C", "SUBMITTED", T0, 1)
    _move(rig, "ORD-C", "CANCELLED", T0 + 10, 2)
    _move(rig, "ORD-OPEN", "SHIPPED", T0, 3)
    assert await rig.writer.flush()
    assert (await rig.watchdog.check_once(T0 + 86400)).purged == 0
    report = await rig.watchdog.check_once(T0 + 86400 + 11)
    assert report.purged == 1
    assert "ORD-C" not in rig.book
    assert await rig.writer.flush()
    assert isinstance(rig.store, MemoryStore)
    assert set(rig.store.records) == {"ORD-OPEN"}


async def test_a_mass_event_reports_the_most_late_and_sums_up_the_rest(
    make_rig: MakeRig, caplog: pytest.LogCaptureFixture
) -> None:
    """Past the per-check cap, the most late orders get a line and a span each; one line counts the rest."""
    rig = make_rig(max_reports=3)
    for n in range(10):
        _move(rig, f"ORD-{n}", "SUBMITTED", T0 + n, n + 1)
    _move(rig, "ORD-A", "MANUFACTURING_APPROVED", T0, 20)
    now = T0 + APPROVED_LIMIT + 60
    report = await rig.watchdog.check_once(now)
    assert len(report.found) == 11
    assert report.reported == 3
    # SUBMITTED's limit is 15 min, so ORD-0..2 are hours later than ORD-A (2 h limit).
    assert sorted(getattr(r, "order_id", "") for r in _stuck_lines(caplog)) == ["ORD-0", "ORD-1", "ORD-2"]
    assert sorted(str(dict(s.attributes or {})["mes.order.id"]) for s in rig.stuck_spans()) == [
        "ORD-0",
        "ORD-1",
        "ORD-2",
    ]
    (summary,) = [r for r in caplog.records if r.getMessage() == UNREPORTED_MESSAGE]
    doc = json.loads(JsonFormatter().format(summary))
    assert (doc["count"], doc["reported"], doc["by_status"]) == (
        8,
        3,
        {"MANUFACTURING_APPROVED": 1, "SUBMITTED": 7},
    )
    assert "ORD-" not in json.dumps(doc)  # no order id in the summary
    assert rig.metric("mes_order_stuck_found_total", status="SUBMITTED") == 10
    assert rig.metric("mes_order_stuck_unreported_total", status="SUBMITTED") == 7
    assert rig.metric("mes_order_stuck_unreported_total", status="MANUFACTURING_APPROVED") == 1
    # Every one is flagged and listed, reported one by one or not.
    assert rig.book.stuck_total() == 11
    assert await rig.writer.flush()
    assert isinstance(rig.store, MemoryStore)
    assert all(record.stuck_reported for record in rig.store.records.values())
    # A later check with few new ones reports each of them again one by one.
    _move(rig, "ORD-NEXT", "SUBMITTED", now, 30)
    assert (await rig.watchdog.check_once(now + SUBMITTED_LIMIT + 1)).reported == 1


async def test_restore_keeps_state_and_a_dead_store_starts_empty(
    make_rig: MakeRig, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Stored records come back with their stuck flag; an unreadable store leaves an empty book, counted."""
    first = make_rig()
    _move(first, "ORD-4", "SUBMITTED", T0, 1)
    await first.watchdog.check_once(T0 + SUBMITTED_LIMIT + 1)
    assert await first.writer.flush()

    again = make_rig(store=first.store)
    assert await again.watchdog.sync.restore() == 1
    assert [s.order_id for s in again.book.stuck(T0 + SUBMITTED_LIMIT + 2)] == ["ORD-4"]
    assert (await again.watchdog.check_once(T0 + SUBMITTED_LIMIT + 2)).found == ()

    dead_store = open_store(f"sqlite:///{tmp_path}/no-such-dir/orders.db")
    dead = make_rig(store=dead_store)
    try:
        assert await dead.watchdog.sync.restore() == 0
        assert len(dead.book) == 0
        assert dead.watchdog.sync.store_stats()["errors"] == 1
        assert "state store load failed" in caplog.text
    finally:
        await dead_store.close()


async def test_background_task_checks_at_once_and_stops(make_rig: MakeRig) -> None:
    """start() runs a round at once (catch-up after downtime), stop() ends it; a second start is refused."""
    clock = ManualClock(T0 + SUBMITTED_LIMIT + 1)
    rig = make_rig(check_interval=QUIET, clock=clock)
    _move(rig, "ORD-5", "SUBMITTED", T0, 1)
    rig.watchdog.start()
    try:
        with pytest.raises(RuntimeError, match="already started"):
            rig.watchdog.start()
        async with asyncio.timeout(WAIT):
            await rig.watchdog.first_round.wait()
        assert [s.order_id for s in rig.book.stuck(clock())] == ["ORD-5"]
    finally:
        await rig.watchdog.stop()
    await rig.watchdog.stop()  # a second stop is harmless


# ── the whole proxy: MES simulator on ingress, CRM (recording) behind egress ─────────────────


@dataclass(slots=True)
class Stack:
    """A proxy between CRM (the test), the MES simulator and a recording CRM."""

    proxy: RunningProxy
    mes: web.Application
    clock: ManualClock
    http: aiohttp.ClientSession

    async def submit(self, order_id: str) -> None:
        """CRM asks MES to price an order (SUBMITTED) through the ingress listener."""
        url = f"{self.proxy.url('ingress')}/api/v1/orders/{order_id}/price-calculation"
        async with self.http.post(url, json={"note": "customer details stay out of telemetry"}) as resp:
            assert resp.status == 202

    async def price_reported(self, order_id: str) -> None:
        """MES reports the price to CRM through the egress listener (PRICE_CALCULATED)."""
        url = f"{self.proxy.url('egress')}/api/orders/{order_id}/price"
        async with self.http.put(url, json={"price": 120.5, "currency": "EUR"}) as resp:
            assert resp.status == 200

    async def admin(self, path: str) -> tuple[int, object]:
        async with self.http.get(f"{self.proxy.admin_url}{path}") as resp:
            return resp.status, await resp.json(content_type=None)

    async def metrics(self) -> str:
        async with self.http.get(f"{self.proxy.admin_url}/metrics") as resp:
            return await resp.text()

    async def stuck_ids(self) -> list[str]:
        status, doc = await self.admin("/orders/-/stuck")
        assert status == 200
        assert isinstance(doc, dict)
        return [item["order_id"] for item in doc["orders"]]


def _split_ids(seed: int, rate: float) -> tuple[str, str]:
    """An order id whose price calculation the simulator loses, and one it answers."""
    ids = [f"ORD-{n:03d}" for n in range(200)]
    lost = next(i for i in ids if share_hit(seed, "price-drop", i, rate))
    kept = next(i for i in ids if not share_hit(seed, "price-drop", i, rate))
    return lost, kept


@pytest.fixture
async def mes_sim() -> AsyncIterator[tuple[str, web.Application]]:
    """The MES simulator on loopback, losing half the price calculations (deterministically by id)."""
    # time_scale 0.001: the simulated 1 s price calculation takes a millisecond.
    app = build_app(MesSimConfig(seed=7, price_drop_rate=0.5, time_scale=0.001))
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    try:
        yield f"http://127.0.0.1:{server.port}", app
    finally:
        await server.close()


async def _stack(
    proxy: RunningProxy, mes: web.Application, clock: ManualClock, http: aiohttp.ClientSession
) -> Stack:
    # The simulator's CRM is the proxy's egress listener, whose port exists only now.
    mes[MES_STATE].crm_base = proxy.url("egress")
    async with asyncio.timeout(WAIT):
        await proxy.watchdog.first_round.wait()
    return Stack(proxy=proxy, mes=mes, clock=clock, http=http)


def _stack_config(make_config: MakeConfig, mes_url: str, crm_url: str, **flags: object) -> Config:
    flags = {"check_interval": QUIET, "egress_listen": "127.0.0.1:0", "egress_upstream": crm_url, **flags}
    return make_config(mes_url, doc=None, **flags)


async def test_lifecycle_through_the_proxy_with_mes_simulator(
    make_config: MakeConfig,
    start_proxy: StartProxy,
    mes_sim: tuple[str, web.Application],
    recording_upstream: tuple[str, RecordingUpstream],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A priced order is never stuck; a lost one is listed, counted, logged once till egress prices it."""
    mes_url, mes = mes_sim
    crm_url, crm = recording_upstream
    clock = ManualClock()
    proxy = await start_proxy(_stack_config(make_config, mes_url, crm_url), environ=NO_OTEL, clock=clock)
    lost, kept = _split_ids(seed=7, rate=0.5)
    async with aiohttp.ClientSession() as http:
        stack = await _stack(proxy, mes, clock, http)
        await stack.submit(kept)
        await stack.submit(lost)
        async with asyncio.timeout(WAIT):
            await mes[MES_STATE].tasks.join()  # the simulator's price callbacks are done
        assert [r.raw_path for r in crm.received] == [f"/api/orders/{kept}/price"]
        status, kept_doc = await stack.admin(f"/orders/{kept}")
        assert status == 200
        assert isinstance(kept_doc, dict)
        assert [(e["status"], e["source"]) for e in kept_doc["timeline"]] == [
            ("SUBMITTED", "ingress"),
            ("PRICE_CALCULATED", "egress"),
        ]

        clock.advance(SUBMITTED_LIMIT + 30)
        report = await proxy.watchdog.check_once(clock())
        assert [s.order_id for s in report.found] == [lost]
        for _ in range(3):
            clock.advance(600)
            assert (await proxy.watchdog.check_once(clock())).found == ()
        assert await stack.stuck_ids() == [lost]
        text = await stack.metrics()
        assert _sample(text, "mes_order_stuck_found_total", status="SUBMITTED") == 1
        assert _sample(text, "mes_orders_stuck", status="SUBMITTED") == 1
        assert _sample(text, "mes_state_store_errors_total") == 0
        assert lost not in text
        assert kept not in text  # no order id in any label
        assert len(_stuck_lines(caplog, lost)) == 1
        assert _stuck_lines(caplog, kept) == []

        await stack.price_reported(lost)  # MES's late answer, through the egress side
        assert await stack.stuck_ids() == []
        text = await stack.metrics()
        assert _sample(text, "mes_orders_stuck", status="SUBMITTED") == 0
        assert _sample(text, "mes_order_stuck_found_total", status="SUBMITTED") == 1
        _, lost_doc = await stack.admin(f"/orders/{lost}")
        assert isinstance(lost_doc, dict)
        assert (lost_doc["status"], lost_doc["stuck"]) == ("PRICE_CALCULATED", False)
        clock.advance(86400 * 30)  # PRICE_CALCULATED has no limit: neither order is ever stuck again
        assert (await proxy.watchdog.check_once(clock())).found == ()
    assert len(_stuck_lines(caplog)) == 1
    assert "customer details" not in caplog.text


async def test_stuck_span_links_to_the_transition_span_over_otlp(
    make_config: MakeConfig,
    start_proxy: StartProxy,
    recording_upstream: tuple[str, RecordingUpstream],
    otlp_sink: OtlpSink,
) -> None:
    """Over real OTLP, mes.order.stuck links the SERVER span that began the wait, and the first one."""
    base, _ = recording_upstream
    clock = ManualClock()
    config = make_config(base, check_interval=QUIET)
    proxy = await start_proxy(config, environ=otlp_env(otlp_sink), clock=clock)
    ingress = proxy.url("ingress")
    approved_trace = ""
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{ingress}/api/v1/orders/ORD-L/price-calculation") as resp:
            assert resp.status == 200
        for status in ("PRICE_CALCULATED", "MANUFACTURING_APPROVED"):
            clock.advance(60)
            async with http.put(f"{ingress}/api/v1/orders/ORD-L/status", json={"status": status}) as resp:
                assert resp.status == 200
                approved_trace = resp.headers["X-Trace-Id"]
    async with asyncio.timeout(WAIT):
        await proxy.watchdog.first_round.wait()
    clock.advance(APPROVED_LIMIT + 42)
    assert len((await proxy.watchdog.check_once(clock())).found) == 1

    (stuck,) = await otlp_sink.wait_for_spans(
        1, timeout=WAIT, predicate=lambda s: s.name == "mes.order.stuck"
    )
    servers = await otlp_sink.wait_for_spans(3, timeout=WAIT, predicate=lambda s: s.kind == "SERVER")
    first = next(s for s in servers if s.name.startswith("POST"))
    approved = next(s for s in servers if s.trace_id == approved_trace)
    assert approved.attributes["mes.order.status"] == "MANUFACTURING_APPROVED"
    assert stuck.kind == "INTERNAL"
    assert stuck.parent_span_id == ""
    assert stuck.attributes["mes.order.id"] == "ORD-L"
    assert stuck.attributes["mes.order.status"] == "MANUFACTURING_APPROVED"
    assert stuck.attributes["mes.order.dwell_limit"] == APPROVED_LIMIT
    assert stuck.attributes["mes.order.dwell"] == APPROVED_LIMIT + 42
    assert isinstance(stuck.attributes["mes.order.dwell"], float)
    assert [(link.trace_id, link.span_id, dict(link.attributes)) for link in stuck.links] == [
        (approved.trace_id, approved.span_id, {"mes.link.kind": "order.transition"}),
        (first.trace_id, first.span_id, {"mes.link.kind": "order.first_span"}),
    ]


async def test_restart_with_sqlite_keeps_the_stuck_order(
    make_config: MakeConfig,
    mes_sim: tuple[str, web.Application],
    recording_upstream: tuple[str, RecordingUpstream],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Restarted on the same SQLite file, the proxy lists the stuck order and does not report it again."""
    mes_url, mes = mes_sim
    crm_url, _ = recording_upstream
    clock = ManualClock()
    config = _stack_config(make_config, mes_url, crm_url, state=f"sqlite:///{tmp_path}/orders.db")
    lost, kept = _split_ids(seed=7, rate=0.5)
    async with aiohttp.ClientSession() as http:
        async with running(config, environ=NO_OTEL, clock=clock) as proxy:
            stack = await _stack(proxy, mes, clock, http)
            await stack.submit(lost)
            await stack.submit(kept)
            async with asyncio.timeout(WAIT):
                await mes[MES_STATE].tasks.join()
            clock.advance(SUBMITTED_LIMIT + 5)
            assert [s.order_id for s in (await proxy.watchdog.check_once(clock())).found] == [lost]

        clock.advance(60)
        async with running(config, environ=NO_OTEL, clock=clock) as proxy:
            stack = await _stack(proxy, mes, clock, http)
            assert await stack.stuck_ids() == [lost]
            assert (await proxy.watchdog.check_once(clock())).found == ()
            assert _sample(await stack.metrics(), "mes_orders_stuck", status="SUBMITTED") == 1
            _, doc = await stack.admin(f"/orders/{kept}")
            assert isinstance(doc, dict)
            assert doc["status"] == "PRICE_CALCULATED"
            await stack.price_reported(lost)

        async with running(config, environ=NO_OTEL, clock=clock) as proxy:
            stack = await _stack(proxy, mes, clock, http)
            assert await stack.stuck_ids() == []
            _, doc = await stack.admin(f"/orders/{lost}")
            assert isinstance(doc, dict)
            assert doc["status"] == "PRICE_CALCULATED"
    assert len(_stuck_lines(caplog, lost)) == 1


@pytest.mark.needs_redis
async def test_two_proxies_sharing_redis_agree(
    make_config: MakeConfig,
    recording_upstream: tuple[str, RecordingUpstream],
    redis_server: RedisServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two proxies on one Redis see each other's orders, report a stay once, agree when it ends."""
    base, _ = recording_upstream
    clock = ManualClock()
    config = _stack_config(make_config, base, base, state=redis_server.url)
    async with (
        running(config, environ=NO_OTEL, clock=clock) as a,
        running(config, environ=NO_OTEL, clock=clock) as b,
        aiohttp.ClientSession() as http,
    ):
        for proxy in (a, b):
            async with asyncio.timeout(WAIT):
                await proxy.watchdog.first_round.wait()
        async with http.post(f"{a.url('ingress')}/api/v1/orders/ORD-R/price-calculation") as resp:
            assert resp.status == 200
        assert await a.watchdog.sync.writer.flush()
        assert (await b.watchdog.check_once(clock())).merged == 1

        clock.advance(SUBMITTED_LIMIT + 1)
        assert [s.order_id for s in (await a.watchdog.check_once(clock())).found] == ["ORD-R"]
        assert await a.watchdog.sync.writer.flush()
        assert (await b.watchdog.check_once(clock())).found == ()
        for proxy in (a, b):
            async with http.get(f"{proxy.admin_url}/orders/-/stuck") as resp:
                assert [o["order_id"] for o in (await resp.json())["orders"]] == ["ORD-R"]

        async with http.put(f"{b.url('egress')}/api/orders/ORD-R/price", json={"price": 1}) as resp:
            assert resp.status == 200
        assert await b.watchdog.sync.writer.flush()
        assert (await a.watchdog.check_once(clock())).merged == 1
        views = []
        for proxy in (a, b):
            async with http.get(f"{proxy.admin_url}/orders/-/stuck") as resp:
                assert (await resp.json())["orders"] == []
            async with http.get(f"{proxy.admin_url}/orders/ORD-R") as resp:
                views.append(await resp.json())
        assert views[0]["status"] == views[1]["status"] == "PRICE_CALCULATED"
        assert views[0]["timeline"] == views[1]["timeline"]
    assert len(_stuck_lines(caplog, "ORD-R")) == 1


async def test_failing_store_keeps_requests_flowing_loudly(
    make_config: MakeConfig,
    start_proxy: StartProxy,
    recording_upstream: tuple[str, RecordingUpstream],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """SQLite directory missing: requests succeed; log and /metrics show the failure, then recovery."""
    base, _ = recording_upstream
    missing = tmp_path / "not-yet"
    proxy = await start_proxy(make_config(base, state=f"sqlite:///{missing}/orders.db"), environ=NO_OTEL)
    async with aiohttp.ClientSession() as http:
        for n in range(3):
            async with http.put(
                f"{proxy.url('ingress')}/api/v1/orders/ORD-S{n}/status", json={"status": "SUBMITTED"}
            ) as resp:
                assert resp.status == 200
        assert not await proxy.watchdog.sync.writer.flush()
        async with http.get(f"{proxy.admin_url}/metrics") as resp:
            text = await resp.text()
        assert (_sample(text, "mes_state_store_errors_total") or 0) >= 2  # the load and a write
        assert _sample(text, "mes_state_store_pending") == 3
        async with http.get(f"{proxy.admin_url}/orders/ORD-S1") as resp:
            assert resp.status == 200  # the book in memory carries on
        assert "state store load failed" in caplog.text
        assert "state store write failed" in caplog.text

        missing.mkdir()
        assert await proxy.watchdog.sync.writer.flush()
        async with http.get(f"{proxy.admin_url}/metrics") as resp:
            assert _sample(await resp.text(), "mes_state_store_pending") == 0
    assert "state store recovered" in caplog.text


@pytest.mark.parametrize("state", ["sqlite:///", "redis://:6379/0", "redis://host/zero"])
async def test_unusable_state_url_stops_start_up_naming_the_option(
    make_config: MakeConfig, recording_upstream: tuple[str, RecordingUpstream], state: str
) -> None:
    """A --state URL that names no usable store stops start-up with a StartupError naming the option."""
    base, _ = recording_upstream
    with pytest.raises(StartupError, match=r"^--state / MES_PROXY_STATE / watchdog.state: state URL"):
        async with running(make_config(base, state=state), environ=NO_OTEL):
            pytest.fail("the proxy started")


# ── a real proxy process: a mass event, the stuck page, metrics and links ───────────────────

MASS = REPORTS_PER_CHECK + 30
JAEGER_SECRET = "jaeger-pass-4417"


async def _wait_for_line(proc: ProxyProcess, message: str) -> dict[str, object]:
    """The first JSON line the child printed with ``message`` (its output is pumped by a task)."""
    async with asyncio.timeout(3 * WAIT):
        while True:
            for line in proc.json_lines():
                if line.get("message") == message:
                    return line
            await asyncio.sleep(0.05)


async def test_a_mass_event_in_a_real_proxy_process(
    recording_upstream: tuple[str, RecordingUpstream], otlp_sink: OtlpSink
) -> None:
    """130 orders stuck at once: 100 spans and lines, one summary; pages, metrics and links stay clean."""
    base, _ = recording_upstream
    args = [
        *("--upstream", base, "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"),
        *("--state", "memory", "--dwell-limit", "SUBMITTED=1s", "--check-interval", "4s"),
        *("--jaeger-url", f"https://viewer:{JAEGER_SECRET}@jaeger.example:16686/ui?token={JAEGER_SECRET}"),
    ]
    async with proxy_process(args, otlp_env(otlp_sink)) as proc, aiohttp.ClientSession() as http:
        # The first check ran at start; all orders go in well before the second, 4 s later.
        await asyncio.gather(
            *(_price(http, proc.url(), f"ORD-{n:04d}") for n in range(MASS)),
            _set(http, proc.url(), "ORD-NAMED", "Petrov Sergei Ivanovich"),
        )
        summary = await _wait_for_line(proc, UNREPORTED_MESSAGE)
        spans = await otlp_sink.wait_for_spans(
            REPORTS_PER_CHECK, predicate=lambda s: s.name == "mes.order.stuck"
        )
        async with http.get(f"{proc.admin_url}/orders/-/stuck?limit=5") as resp:
            page = await resp.json()
        async with http.get(f"{proc.admin_url}/") as resp:
            html_page = await resp.text()
        async with http.get(f"{proc.admin_url}/metrics") as resp:
            metrics_text = await resp.text()
    lines = [line for line in proc.json_lines() if line.get("message") == STUCK_MESSAGE]
    assert (summary["count"], summary["reported"]) == (MASS - REPORTS_PER_CHECK, REPORTS_PER_CHECK)
    assert summary["by_status"] == {"SUBMITTED": MASS - REPORTS_PER_CHECK}
    assert len(lines) == len(spans) == REPORTS_PER_CHECK
    # The most late are the ones reported: the first orders sent (all in one check).
    assert (page["total"], len(page["orders"])) == (MASS, 5)
    assert {o["order_id"] for o in page["orders"]} <= {line["order_id"] for line in lines}
    assert _sample(metrics_text, "mes_order_stuck_found_total", status="SUBMITTED") == MASS
    assert _sample(metrics_text, "mes_order_stuck_unreported_total", status="SUBMITTED") == MASS - 100
    assert _sample(metrics_text, "mes_orders", status="_OTHER") == 1
    assert "Petrov" not in metrics_text
    # Links point at the Jaeger UI without the credentials --jaeger-url carries.
    for text in (json.dumps(page), html_page):
        assert JAEGER_SECRET not in text
        assert "viewer@" not in text
    assert page["orders"][0]["jaeger_url"].startswith("https://jaeger.example:16686/ui/search?")
    assert "https://jaeger.example:16686/ui/search?" in html_page


async def _price(http: aiohttp.ClientSession, base: str, order_id: str) -> None:
    async with http.post(f"{base}/api/v1/orders/{order_id}/price-calculation") as resp:
        assert resp.status == 200


async def _set(http: aiohttp.ClientSession, base: str, order_id: str, status: str) -> None:
    async with http.put(f"{base}/api/v1/orders/{order_id}/status", json={"status": status}) as resp:
        assert resp.status == 200
