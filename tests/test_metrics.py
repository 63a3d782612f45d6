"""Metrics: bounded labels, order findings counted, scrape-time gauges from their sources."""

from __future__ import annotations

from prometheus_client import generate_latest

from mes_trace_proxy.lifecycle import REFERENCE_LIFECYCLE, TransitionKind
from mes_trace_proxy.metrics import ProxyMetrics
from mes_trace_proxy.orders import Findings, OrderBook, SpanRef, Transition
from mes_trace_proxy.tracing import ExportStats


def _text(metrics: ProxyMetrics) -> str:
    return generate_latest(metrics.registry).decode()


def test_request_counts_and_errors_by_route_and_type() -> None:
    """Requests count by listener, route template, method and code; errors by type."""
    metrics = ProxyMetrics(known_statuses=REFERENCE_LIFECYCLE.statuses)
    for code in (200, 200, 502):
        metrics.request_done(
            listener="ingress",
            route="/api/v1/orders/{orderId}",
            method="GET",
            status=code,
            duration=0.01,
            upstream_duration=0.005 if code == 200 else None,
            error_type="upstream_connect_refused" if code == 502 else None,
        )
    text = _text(metrics)
    route = 'route="/api/v1/orders/{orderId}"'
    assert f'mes_proxy_requests_total{{code="200",listener="ingress",method="GET",{route}}} 2.0' in text
    assert 'mes_proxy_errors_total{error_type="upstream_connect_refused",listener="ingress"} 1.0' in text
    assert (
        'mes_proxy_upstream_duration_seconds_count{listener="ingress",route="/api/v1/orders/{orderId}"} 2.0'
        in text
    )


def test_unknown_statuses_fold_into_one_label_value() -> None:
    """A status outside the lifecycle is labelled _OTHER, so callers cannot grow series without bound."""
    metrics = ProxyMetrics(known_statuses=REFERENCE_LIFECYCLE.statuses)
    for made_up in ("X1", "X2", "X3"):
        findings = Findings(
            transition=Transition(prev="SUBMITTED", new=made_up, kind=TransitionKind.UNKNOWN_STATUS),
            changed=True,
            dwell=30.0,
        )
        metrics.order_findings(listener="ingress", findings=findings)
    text = _text(metrics)
    assert 'to_status="_OTHER"' in text
    assert "X1" not in text
    assert 'mes_order_anomalies_total{kind="unknown_status"} 3.0' in text
    assert 'mes_order_dwell_seconds_count{status="SUBMITTED"} 3.0' in text


def test_findings_from_a_real_order_book_are_counted() -> None:
    """A forward move and a skip from the order book become transition and anomaly counts."""
    book = OrderBook(REFERENCE_LIFECYCLE)
    metrics = ProxyMetrics(known_statuses=REFERENCE_LIFECYCLE.statuses)
    span = SpanRef(trace_id=1, span_id=2)
    for status, now in (("SUBMITTED", 0.0), ("PRICE_CALCULATED", 60.0), ("MANUFACTURING_STARTED", 120.0)):
        findings = book.apply(order_id="A-1", status=status, observed=None, now=now, span=span)
        metrics.order_findings(listener="ingress", findings=findings)
    text = _text(metrics)
    assert 'from_status="SUBMITTED",kind="forward",listener="ingress",to_status="PRICE_CALCULATED"' in text
    assert 'mes_order_anomalies_total{kind="skip"} 1.0' in text


def test_scrape_time_gauges_read_their_sources() -> None:
    """Order, stuck, span-export and store figures are computed when scraped, from the bound callables."""
    metrics = ProxyMetrics()
    metrics.bind(
        export_stats=lambda: ExportStats(queued=5, exported=3, dropped_queue_full=2, failed=0),
        order_counts=lambda: {"SUBMITTED": 4},
        stuck_counts=lambda: {"SUBMITTED": 1},
        store_stats=lambda: {"errors": 7, "dropped": 0, "pending": 2},
    )
    text = _text(metrics)
    assert 'mes_proxy_spans_total{outcome="dropped_queue_full"} 2.0' in text
    assert 'mes_orders{status="SUBMITTED"} 4.0' in text
    assert 'mes_orders_stuck{status="SUBMITTED"} 1.0' in text
    assert "mes_state_store_errors_total 7.0" in text
    assert "mes_state_store_pending 2.0" in text


def test_process_figures_are_exposed() -> None:
    """RSS, open descriptors and the event-loop task gauge are on the proxy's own registry."""
    metrics = ProxyMetrics()
    metrics.loop_tasks.set(3)
    text = _text(metrics)
    assert "process_resident_memory_bytes " in text
    assert "process_open_fds " in text
    assert "mes_proxy_event_loop_tasks 3.0" in text
