"""Metrics: bounded labels, order findings counted, scrape-time gauges from their sources."""

from __future__ import annotations

from prometheus_client import generate_latest

from mes_trace_proxy.lifecycle import REFERENCE_LIFECYCLE, TransitionKind
from mes_trace_proxy.metrics import ConnectionStats, ProxyMetrics
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
    metrics = ProxyMetrics(known_statuses=REFERENCE_LIFECYCLE.statuses)
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


def test_order_gauges_fold_statuses_outside_the_lifecycle() -> None:
    """mes_orders and mes_orders_stuck sum every status the lifecycle does not name under _OTHER."""
    metrics = ProxyMetrics(known_statuses=REFERENCE_LIFECYCLE.statuses)
    book = OrderBook(REFERENCE_LIFECYCLE)
    span = SpanRef(trace_id=1, span_id=2)
    for order_id, status in (("A", "SUBMITTED"), ("B", "Petrov Sergei Ivanovich"), ("C", "ON_HOLD")):
        book.apply(order_id=order_id, status=status, observed=None, now=0.0, span=span)
    book.overdue(86400.0)
    metrics.bind(order_counts=book.counts, stuck_counts=lambda: book.snapshot().stuck_by_status)
    text = _text(metrics)
    assert "Petrov" not in text
    assert "ON_HOLD" not in text
    assert 'mes_orders{status="_OTHER"} 2.0' in text
    assert 'mes_orders{status="SUBMITTED"} 1.0' in text
    assert 'mes_orders{status="CLOSED"} 0.0' in text  # known statuses keep their zero
    assert 'mes_orders_stuck{status="SUBMITTED"} 1.0' in text


def test_process_figures_are_exposed() -> None:
    """RSS, open descriptors and the event-loop task gauge are on the proxy's own registry."""
    metrics = ProxyMetrics()
    metrics.loop_tasks.set(3)
    text = _text(metrics)
    assert "process_resident_memory_bytes " in text
    assert "process_open_fds " in text
    assert "mes_proxy_event_loop_tasks 3.0" in text


def _without_created_values(text: str, families: tuple[str, ...]) -> list[str]:
    """The lines of these families, with each ``_created`` sample's time blanked out."""
    lines = []
    for line in text.splitlines():
        name = line.split(" ")[2] if line.startswith("#") else line.split("{")[0].split(" ")[0]
        if not any(name.startswith(family) for family in families):
            continue
        if "_created" in name and not line.startswith("#"):
            line = line.rsplit(" ", 1)[0] + " T"
        lines.append(line)
    return lines


def test_exposition_matches_prometheus_clients_own_instruments() -> None:
    """The plain-number counters and histograms print exactly as prometheus_client's would.

    The request path counts into plain numbers instead of the library's locked instruments;
    dashboards and alerts must not see any difference: same names, help, types, label order,
    buckets (``le`` spelt the library's way), counts and sums.
    """
    from prometheus_client import CollectorRegistry, Counter, Histogram

    from mes_trace_proxy.metrics import _DWELL_BUCKETS, _LATENCY_BUCKETS

    metrics = ProxyMetrics(known_statuses=REFERENCE_LIFECYCLE.statuses)
    reference = CollectorRegistry()
    requests = Counter(
        "mes_proxy_requests",
        "Proxied requests by listener, route template, method and status code.",
        ("listener", "route", "method", "code"),
        registry=reference,
    )
    duration = Histogram(
        "mes_proxy_request_duration_seconds",
        "Time from request received to response sent.",
        ("listener", "route"),
        buckets=_LATENCY_BUCKETS,
        registry=reference,
    )
    upstream = Histogram(
        "mes_proxy_upstream_duration_seconds",
        "Time the upstream took to answer and stream its body.",
        ("listener", "route"),
        buckets=_LATENCY_BUCKETS,
        registry=reference,
    )
    dwell = Histogram(
        "mes_order_dwell_seconds",
        "How long orders stayed in a status before leaving it.",
        ("status",),
        buckets=_DWELL_BUCKETS,
        registry=reference,
    )
    # Values on bucket bounds, between them, past the last one and zero.
    durations = (0.0, 0.001, 0.0011, 0.0025, 0.3, 1.0, 7.5, 60.0, 61.0, 0.0004)
    for n, value in enumerate(durations):
        route = "/api/v1/orders/{orderId}" if n % 3 else "/api/v1/orders"
        code = 200 if n % 4 else 404
        up = value / 2 if n % 5 else None
        metrics.request_done(
            listener="ingress",
            route=route,
            method="PUT",
            status=code,
            duration=value,
            upstream_duration=up,
            error_type=None,
        )
        # As the proxy did with these instruments: all three series resolved at a label set's
        # first request, an upstream answer or not.
        series = (
            requests.labels("ingress", route, "PUT", str(code)),
            duration.labels("ingress", route),
            upstream.labels("ingress", route),
        )
        series[0].inc()
        series[1].observe(value)
        if up is not None:
            series[2].observe(up)
    for seconds in (60.0, 59.0, 86400.0, 2_000_000.0):
        metrics.order_findings(
            listener="ingress",
            findings=Findings(
                transition=Transition(prev="SUBMITTED", new="PRICE_CALCULATED", kind=TransitionKind.FORWARD),
                changed=True,
                dwell=seconds,
            ),
        )
        dwell.labels("SUBMITTED").observe(seconds)

    families = (
        "mes_proxy_requests",
        "mes_proxy_request_duration_seconds",
        "mes_proxy_upstream_duration_seconds",
        "mes_order_dwell_seconds",
    )
    ours = _without_created_values(_text(metrics), families)
    theirs = _without_created_values(generate_latest(reference).decode(), families)
    assert any("_bucket" in line for line in ours)
    assert sorted(ours) == sorted(theirs)
    # The families' own order of samples too (buckets ascending, then count, sum, created).
    for family in families:
        assert [line for line in ours if line.startswith(family)] == [
            line for line in theirs if line.startswith(family)
        ]


def test_created_series_follow_prometheus_clients_switch() -> None:
    """``disable_created_metrics()`` (or PROMETHEUS_DISABLE_CREATED_SERIES) drops ours as well."""
    from prometheus_client import disable_created_metrics, enable_created_metrics

    metrics = ProxyMetrics()
    metrics.request_done(
        listener="ingress",
        route="/x",
        method="GET",
        status=200,
        duration=0.1,
        upstream_duration=0.05,
        error_type=None,
    )
    assert "mes_proxy_requests_created{" in _text(metrics)
    assert "mes_proxy_request_duration_seconds_created{" in _text(metrics)
    disable_created_metrics()  # type: ignore[no-untyped-call]
    try:
        text = _text(metrics)
    finally:
        enable_created_metrics()  # type: ignore[no-untyped-call]
    assert "mes_proxy_requests_total{" in text
    assert "_created" not in text


def test_refusals_count_by_listener_and_slug_from_every_source() -> None:
    """The handler's refusals (slug or type URI alike), each listener's limits, the admin's: one family."""
    metrics = ProxyMetrics()
    for error_type in (
        "payload_too_large",
        "urn:mes-trace-proxy:problem:payload_too_large",
        "upstream_dns_failure",
    ):
        metrics.request_done(
            listener="ingress",
            route="",
            method="POST",
            status=413,
            duration=0.001,
            upstream_duration=None,
            error_type=error_type,
        )
    metrics.refused("admin", "admin_invalid_token")
    metrics.bind(
        connection_stats=lambda: {
            "ingress": ConnectionStats(
                open=1,
                refused_cap=2,
                header_timeouts=1,
                malformed=0,
                refused={"service_unavailable": 2, "request_timeout": 1},
            )
        },
        admin_stats=lambda: ConnectionStats(
            open=0, refused_cap=0, header_timeouts=3, malformed=0, refused={"request_timeout": 3}
        ),
    )
    text = _text(metrics)
    assert 'mes_proxy_refusals_total{listener="ingress",reason="payload_too_large"} 2.0' in text
    assert 'mes_proxy_refusals_total{listener="ingress",reason="service_unavailable"} 2.0' in text
    assert 'mes_proxy_refusals_total{listener="ingress",reason="request_timeout"} 1.0' in text
    assert 'mes_proxy_refusals_total{listener="admin",reason="request_timeout"} 3.0' in text
    assert 'mes_proxy_refusals_total{listener="admin",reason="admin_invalid_token"} 1.0' in text
    assert 'mes_proxy_open_connections{listener="admin"} 0.0' in text
    assert "upstream_dns_failure" not in "".join(line for line in text.splitlines() if "refusals" in line)
