"""Tests for what the demo reads and prints: ready line, metrics, stuck orders, spans file, summary.

Pure and table-driven; the inputs come from the real producers where one exists (the proxy's
JSON log formatter, its Prometheus registry, the OTLP sink's JSON lines, the MES order store).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from urllib.parse import parse_qs, urlsplit

import pytest
from prometheus_client import generate_latest

from mes_trace_proxy.demo.report import (
    STUCK_REASONS,
    DemoResult,
    MetricsView,
    SpanScan,
    StuckOrder,
    StuckReport,
    choose_stuck,
    jaeger_search_url,
    parse_metrics,
    parse_ready_line,
    parse_stuck,
    problems,
    progress_line,
    scan_spans,
    stuck_in_store,
    summary_lines,
)
from mes_trace_proxy.sim import crm
from mes_trace_proxy.sim.mes import OrderStore
from mes_trace_proxy.sim.otlp_sink import ReceivedSpan
from mes_trace_proxy.telemetry.logs import JsonFormatter
from mes_trace_proxy.telemetry.metrics import ProxyMetrics
from mes_trace_proxy.telemetry.tracing import ExportStats

# ── the proxy's ready line ──────────────────────────────────────────────────────────────────


def _ready_line(listeners: Mapping[str, str], admin: str, message: str = "mes-trace-proxy ready") -> str:
    """The line exactly as server.running logs it: the real JSON formatter over the same extras."""
    record = logging.makeLogRecord(
        {
            "name": "mes_trace_proxy.server",
            "msg": message,
            "levelname": "INFO",
            "listeners": listeners,
            "admin": admin,
        }
    )
    return JsonFormatter().format(record)


def test_ready_line_gives_every_listener_and_admin_as_urls() -> None:
    """The ready line's host:port pairs become base URLs by listener name."""
    line = _ready_line({"ingress": "127.0.0.1:40001", "egress": "127.0.0.1:40002"}, "127.0.0.1:40003")
    addresses = parse_ready_line(line)
    assert addresses is not None
    assert dict(addresses.listeners) == {
        "ingress": "http://127.0.0.1:40001",
        "egress": "http://127.0.0.1:40002",
    }
    assert addresses.admin == "http://127.0.0.1:40003"


def test_ready_line_with_ipv6_gets_brackets() -> None:
    """An IPv6 address (logged as ::1:PORT) becomes http://[::1]:PORT."""
    addresses = parse_ready_line(_ready_line({"ingress": "::1:8080"}, "::1:9901"))
    assert addresses is not None
    assert addresses.listeners["ingress"] == "http://[::1]:8080"
    assert addresses.admin == "http://[::1]:9901"


@pytest.mark.parametrize(
    "line",
    [
        "",
        "not json",
        "[1, 2]",
        _ready_line({"ingress": "127.0.0.1:1"}, "127.0.0.1:2", message="mes-trace-proxy stopped"),
        json.dumps({"message": "mes-trace-proxy ready", "listeners": "127.0.0.1:1", "admin": "127.0.0.1:2"}),
        json.dumps({"message": "mes-trace-proxy ready", "listeners": {"ingress": "127.0.0.1:1"}}),
    ],
    ids=["empty", "text", "array", "other-message", "listeners-not-a-map", "no-admin"],
)
def test_other_lines_are_not_the_ready_line(line: str) -> None:
    """Access-log lines, other messages and malformed ready lines are ignored."""
    assert parse_ready_line(line) is None


# ── /metrics ────────────────────────────────────────────────────────────────────────────────


def _exposition(*, stuck: Mapping[str, int] | None = None, orders: Mapping[str, int] | None = None) -> str:
    """A real exposition from the proxy's own registry, with a few requests recorded."""
    metrics = ProxyMetrics(known_statuses=("SUBMITTED", "CLOSED"))
    for listener, count in (("ingress", 3), ("egress", 2)):
        for _ in range(count):
            metrics.request_done(
                listener=listener,
                route="/r",
                method="GET",
                status=200,
                duration=0.01,
                upstream_duration=0.01,
                error_type=None,
            )
    metrics.bind(
        export_stats=lambda: ExportStats(queued=10, exported=7, dropped_queue_full=1, failed=2),
        order_counts=(lambda: orders) if orders is not None else None,
        stuck_counts=(lambda: stuck) if stuck is not None else None,
    )
    return generate_latest(metrics.registry).decode()


def test_metrics_give_requests_by_listener_and_span_fates() -> None:
    """Requests are summed per listener; span outcomes are read as the proxy counts them."""
    view = parse_metrics(_exposition())
    assert dict(view.requests) == {"ingress": 3, "egress": 2}
    assert dict(view.spans) == {"queued": 10, "exported": 7, "dropped_queue_full": 1, "export_failed": 2}
    assert view.exported == 7
    assert view.settled


def test_order_gauges_are_none_when_the_proxy_has_none() -> None:
    """Without an order book or watchdog the gauges are absent, and the view says so."""
    view = parse_metrics(_exposition())
    assert view.orders is None
    assert view.stuck is None


def test_order_gauges_by_status() -> None:
    """mes_orders and mes_orders_stuck are read by status; an empty gauge is an empty map, not None."""
    view = parse_metrics(_exposition(orders={"SUBMITTED": 4, "CLOSED": 9}, stuck={}))
    assert view.orders == {"SUBMITTED": 4, "CLOSED": 9}
    assert view.stuck == {}


@pytest.mark.parametrize(
    ("spans", "settled"),
    [
        ({"queued": 5, "exported": 5}, True),
        ({"queued": 5, "exported": 3, "dropped_queue_full": 1, "export_failed": 1}, True),
        ({"queued": 5, "exported": 4}, False),
        ({}, True),
    ],
)
def test_settled_when_every_queued_span_met_its_fate(spans: dict[str, int], settled: bool) -> None:
    """The export queue is drained once queued equals exported + dropped + failed."""
    view = MetricsView(requests={}, spans=spans, orders=None, stuck=None)
    assert view.settled is settled


# ── stuck orders ───────────────────────────────────────────────────────────────────────────

_ONE = {"order_id": "A-1", "status": "SUBMITTED", "over_limit_by": 30, "last_trace_id": "ab" * 16}


@pytest.mark.parametrize(
    "doc",
    [
        [_ONE],
        {"orders": [_ONE]},
        {"stuck": [_ONE], "count": 1},
        {"items": [{"orderId": "A-1", "status": "SUBMITTED", "over_by": "30s", "trace_id": "ab" * 16}]},
    ],
    ids=["list", "orders", "stuck", "other-names"],
)
def test_stuck_answer_shapes(doc: object) -> None:
    """The watchdog's answer is read as a list or under orders/stuck/items, with either key style."""
    assert parse_stuck(doc) == (
        StuckOrder(order_id="A-1", status="SUBMITTED", over_by=30.0, trace_id="ab" * 16),
    )


def test_stuck_orders_come_latest_first_and_unknown_lateness_last() -> None:
    """The latest order leads, so the first row is the one to open."""
    doc = [
        {"order_id": "A", "status": "SUBMITTED", "over_limit_by": 5},
        {"order_id": "B", "status": "SUBMITTED"},
        {"order_id": "C", "status": "SUBMITTED", "over_limit_by": "2m"},
    ]
    parsed = parse_stuck(doc)
    assert parsed is not None
    assert [order.order_id for order in parsed] == ["C", "A", "B"]


@pytest.mark.parametrize(
    "doc",
    [None, "stuck", {"count": 3}, [1], [{"status": "SUBMITTED"}], [{"order_id": "A"}], {"orders": "A"}],
    ids=["null", "string", "no-list", "not-objects", "no-id", "no-status", "orders-not-a-list"],
)
def test_unknown_stuck_shapes_are_refused(doc: object) -> None:
    """An answer the demo cannot read is None, so the summary falls back instead of guessing."""
    assert parse_stuck(doc) is None


def test_stuck_in_store_finds_orders_past_their_limit_only() -> None:
    """Orders in a limited status longer than the limit are stuck; others, and fresh ones, are not."""
    now = [1000.0]
    store = OrderStore(lambda: now[0])
    store.set_status("old-submitted", "SUBMITTED")
    store.set_status("old-approved", "MANUFACTURING_APPROVED")
    store.set_status("old-closed", "CLOSED")
    now[0] = 1015.0
    store.set_status("fresh-submitted", "SUBMITTED")
    limits = {"SUBMITTED": 10.0, "MANUFACTURING_APPROVED": 12.0}
    stuck = stuck_in_store(store.records(), limits, now=1020.0)
    assert [(o.order_id, o.status, o.over_by) for o in stuck] == [
        ("old-submitted", "SUBMITTED", 10.0),
        ("old-approved", "MANUFACTURING_APPROVED", 8.0),
    ]


_COMPUTED = (StuckOrder(order_id="C-1", status="SUBMITTED", over_by=3.0, trace_id=None),)
_NO_GAUGE = MetricsView(requests={}, spans={}, orders=None, stuck=None)
_GAUGE = MetricsView(requests={}, spans={}, orders=None, stuck={"SUBMITTED": 2, "MANUFACTURING_APPROVED": 1})
_WATCHDOG_BODY = json.dumps([{"order_id": "W-1", "status": "SUBMITTED", "over_limit_by": 9}]).encode()
# The shape the proxy's GET /orders/-/stuck answers (admin_orders.py): paged, with the total.
_PAGED_BODY = json.dumps(
    {
        "now": "2023-11-14T22:30:20.000Z",
        "total": 120,
        "limit": 50,
        "offset": 0,
        "orders": [
            {
                "order_id": "W-2",
                "status": "SUBMITTED",
                "since": "2023-11-14T22:13:20.000Z",
                "over_limit_by_seconds": 120.0,
                "limit_seconds": 900.0,
                "last_trace_id": "ab" * 16,
                "jaeger_url": "http://localhost:16686/search?service=mes-api",
            }
        ],
    }
).encode()


@pytest.mark.parametrize(
    ("answer", "metrics", "count", "first", "source"),
    [
        ((200, _WATCHDOG_BODY), _GAUGE, 1, "W-1", "watchdog"),
        ((200, _PAGED_BODY), _GAUGE, 120, "W-2", "watchdog"),
        ((404, b"not found"), _GAUGE, 3, "C-1", "gauge"),
        ((404, b"not found"), _NO_GAUGE, 1, "C-1", "MES simulator"),
        (None, None, 1, "C-1", "MES simulator"),
        ((200, b"<html>"), _NO_GAUGE, 1, "C-1", "MES simulator"),
        ((200, b'{"unexpected": true}'), _NO_GAUGE, 1, "C-1", "MES simulator"),
        ((503, b""), _GAUGE, 3, "C-1", "gauge"),
    ],
    ids=[
        "endpoint",
        "paged-endpoint",
        "404-gauge",
        "404-computed",
        "no-answer",
        "not-json",
        "unknown-shape",
        "503-gauge",
    ],
)
def test_stuck_source_prefers_the_proxy_and_degrades(
    answer: tuple[int, bytes] | None, metrics: MetricsView | None, count: int, first: str, source: str
) -> None:
    """/orders/stuck when it answers 200 with a known shape; else the gauge; else the simulator's view."""
    report = choose_stuck(answer, metrics, _COMPUTED)
    assert report.count == count
    assert report.orders[0].order_id == first
    assert source in report.source


# ── the spans file ─────────────────────────────────────────────────────────────────────────


def _span_line(service: str, kind: str, attributes: Mapping[str, object]) -> str:
    """One line exactly as the OtlpSink writes it."""
    span = ReceivedSpan(
        name="PUT /api/v1/orders/{orderId}/status",
        trace_id="a" * 32,
        span_id="b" * 16,
        parent_span_id="",
        kind=kind,
        start_ns=1,
        end_ns=2,
        attributes=MappingProxyType(dict(attributes)),
        events=(),
        links=(),
        status_code="UNSET",
        status_message="",
        resource=MappingProxyType({"service.name": service}),
        scope_name="test",
        transport="http",
    )
    return json.dumps(span.to_json_dict())


def test_scan_counts_services_and_proxy_server_spans_with_an_order() -> None:
    """Spans are counted by service; only the proxy's SERVER spans with mes.order.id count as order spans."""
    lines = [
        _span_line("mes-api", "SERVER", {"mes.order.id": "A-1"}),
        _span_line("mes-api", "SERVER", {"http.route": "/api/v1/health"}),
        _span_line("mes-api", "CLIENT", {"mes.order.id": "A-1"}),
        _span_line("crm-api", "SERVER", {"mes.order.id": "A-1"}),
        "",
    ]
    scan = scan_spans(lines, "mes-api")
    assert scan.total == 4
    assert dict(scan.by_service) == {"mes-api": 3, "crm-api": 1}
    assert scan.server_with_order == 1
    assert scan.personal_data == 0


@pytest.mark.parametrize("field", ["name", "email", "phone"])
@pytest.mark.parametrize("n", [0, 7, 12345])
def test_scan_finds_every_field_of_the_canary_customer(field: str, n: int) -> None:
    """Any of the CRM's canary name, e-mail or phone anywhere in a span counts as a leak."""
    value = crm.canary_customer(n)[field]
    scan = scan_spans([_span_line("mes-api", "SERVER", {"mes.note": f"x {value} y"})], "mes-api")
    assert scan.personal_data == 1


def test_scan_counts_a_broken_line_but_no_service() -> None:
    """A line that is not JSON still counts (and is still searched), without a service."""
    scan = scan_spans(['{"truncated', f"... {crm.CANARY_NAME} ..."], "mes-api")
    assert scan.total == 2
    assert scan.personal_data == 1
    assert dict(scan.by_service) == {}


# ── links and lines ────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize("order_id", ["ORD-0-00003", 'A 1&b="c"/d', "заказ-1"])
def test_jaeger_search_url_round_trips(order_id: str) -> None:
    """The link searches service mes-api with the tag mes.order.id set to exactly the order id."""
    url = jaeger_search_url("http://localhost:16686/", "mes-api", order_id)
    parts = urlsplit(url)
    query = parse_qs(parts.query, strict_parsing=True)
    assert (parts.scheme, parts.netloc, parts.path) == ("http", "localhost:16686", "/search")
    assert query["service"] == ["mes-api"]
    assert json.loads(query["tags"][0]) == {"mes.order.id": order_id}


def _progress(**statuses: int) -> crm.CrmProgress:
    return crm.CrmProgress(orders_started=sum(statuses.values()), statuses=statuses, requests_sent=40)


def test_progress_line_counts_orders_and_proxy_figures() -> None:
    """The line shows time, orders started and finished, and the proxy's requests and spans."""
    metrics = MetricsView(
        requests={"ingress": 30, "egress": 5}, spans={"exported": 70}, orders=None, stuck=None
    )
    line = progress_line(
        elapsed=12.2, total=60, crm_progress=_progress(CLOSED=4, CANCELLED=1, SUBMITTED=5), metrics=metrics
    )
    assert (
        line == "[12/60 s] orders 10 started, 5 closed or cancelled · proxy: 35 requests, 70 spans exported"
    )


def test_progress_line_flags_failed_exports_and_the_tail() -> None:
    """After the traffic's time the clock says finishing; failed exports point at the collector."""
    metrics = MetricsView(requests={}, spans={"export_failed": 3}, orders=None, stuck=None)
    line = progress_line(elapsed=61, total=60, crm_progress=None, metrics=metrics)
    assert line.startswith("[finishing] ")
    assert "3 failed (is the collector up?)" in line
    assert progress_line(elapsed=0, total=60, crm_progress=None, metrics=None) == "[ 0/60 s] starting"


def _result(**changes: object) -> DemoResult:
    base: dict[str, object] = {
        "elapsed": 64.2,
        "crm_summary": crm.CrmSummary(
            orders_started=120,
            final_status={"CLOSED": 100, "SUBMITTED": 12, "MANUFACTURING_APPROVED": 8},
            requests_sent=900,
            responses={200: 900},
            errors={},
            prices_received=100,
            events_received=300,
            elapsed_seconds=60.0,
            stopped_by="duration",
        ),
        "metrics": MetricsView(
            requests={"ingress": 900, "egress": 400},
            spans={"queued": 2600, "exported": 2600},
            orders={"CLOSED": 100, "SUBMITTED": 12},
            stuck=None,
        ),
        "stuck": StuckReport(
            count=2,
            orders=(
                StuckOrder(order_id="ORD-0-00004", status="SUBMITTED", over_by=41.0, trace_id=None),
                StuckOrder(
                    order_id="ORD-0-00017", status="MANUFACTURING_APPROVED", over_by=12.0, trace_id=None
                ),
            ),
            source="found by the proxy's watchdog (GET /orders/-/stuck)",
        ),
        "spans": SpanScan(total=5000, by_service={"mes-api": 2600}, server_with_order=1200, personal_data=0),
        "spans_file": Path("/nowhere/demo-output/spans.jsonl"),
        "endpoint": None,
        "service": "mes-api",
        "jaeger_url": "http://localhost:16686",
        "admin_url": "http://127.0.0.1:9901",
        "admin_page": True,
        "proxy_log": Path("/nowhere/demo-output/proxy.log"),
    }
    base.update(changes)
    return DemoResult(**base)  # type: ignore[arg-type]


def test_summary_with_the_spans_file() -> None:
    """The file summary: every figure, each stuck order with its reason, a grep line and the page."""
    text = "\n".join(summary_lines(_result()))
    assert "requests:        1300 through the proxy (egress 400, ingress 900)" in text
    assert "spans exported:  2600 by the proxy (mes-api); 5000 in /nowhere/demo-output/spans.jsonl" in text
    assert "1200 of the proxy's SERVER spans carry mes.order.id" in text
    assert "orders by status (the proxy's view): SUBMITTED 12, CLOSED 100" in text
    assert "stuck orders:    2 found by the proxy's watchdog" in text
    assert STUCK_REASONS["MANUFACTURING_APPROVED"] in text
    assert "personal data:   none of 5000 spans" in text
    assert 'grep \'"mes.order.id": "ORD-0-00004"\'' in text
    assert "admin:    http://127.0.0.1:9901/ " in text


def test_summary_with_a_collector_links_jaeger() -> None:
    """With a collector the summary links the first stuck order's Jaeger search and says where spans went."""
    lines = summary_lines(
        _result(spans=None, spans_file=None, endpoint="http://jaeger:4318", admin_page=False)
    )
    text = "\n".join(lines)
    assert "spans exported:  2600 by the proxy (mes-api) to http://jaeger:4318" in text
    assert jaeger_search_url("http://localhost:16686", "mes-api", "ORD-0-00004") in text
    assert "personal data" not in text
    assert "(no orders page in this build)" in text


def test_summary_falls_back_to_the_crm_view_and_marks_a_signal() -> None:
    """Without the proxy's order gauge the CRM's statuses are shown; a Ctrl+C run says so."""
    early = crm.CrmSummary(
        orders_started=3,
        final_status={"CLOSED": 3},
        requests_sent=9,
        responses={},
        errors={},
        prices_received=3,
        events_received=0,
        elapsed_seconds=1.0,
        stopped_by="signal",
    )
    metrics = MetricsView(requests={"ingress": 9}, spans={"exported": 9}, orders=None, stuck=None)
    lines = summary_lines(_result(crm_summary=early, metrics=metrics))
    assert lines[0] == "Summary after 64.2 s (stopped early by a signal)"
    assert "  orders by status (the CRM's view): CLOSED 3" in lines


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({}, []),
        ({"metrics": None}, ["/metrics did not answer"]),
        (
            {
                "metrics": MetricsView(requests={}, spans={}, orders=None, stuck=None),
                "spans": None,
                "spans_file": None,
            },
            ["no request went through", "no span was exported"],
        ),
        (
            {"spans": SpanScan(total=9, by_service={}, server_with_order=0, personal_data=2)},
            ["canary personal data"],
        ),
    ],
    ids=["ok", "no-metrics", "nothing", "leak"],
)
def test_problems_make_the_run_fail(changes: dict[str, object], expected: list[str]) -> None:
    """Nothing proxied, nothing exported or personal data in a span fails the run; a good run has none."""
    found = problems(_result(**changes))
    assert len(found) == len(expected)
    for message, fragment in zip(found, expected, strict=True):
        assert fragment in message
