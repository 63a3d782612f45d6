"""Prometheus metrics: one registry per process, every instrument defined here, bounded labels.

Labels are listener names, route templates, methods, status codes, status names, transition
kinds and error types — never an order id or a user. Order gauges are computed at scrape
time from the order book, so the request path does no bookkeeping for them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from mes_trace_proxy.observer import Observer
from mes_trace_proxy.orders import Findings
from mes_trace_proxy.tracing import ExportStats

__all__ = ["ConnectionStats", "ProxyMetrics"]

# Latency buckets for a sidecar in front of a business API: sub-millisecond proxy overhead
# up to the 60 s read timeout.
_LATENCY_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# Dwell buckets span the reference limits: 15 min (SUBMITTED) to 14 days (SHIPPED).
# Transition label children kept resolved; statuses come from requests, so the cache is bounded
# (past it, labels are resolved per call, as before).
_MAX_CACHED_CHILDREN: Final = 4096
_DWELL_BUCKETS: Final = (60, 300, 900, 1800, 3600, 7200, 21600, 86400, 259200, 604800, 1209600)


class _CallbackCollector(Collector):
    """Yields metric families computed at scrape time by a callback."""

    def __init__(self, callback: Callable[[], Iterable[Metric]]) -> None:
        self._callback = callback

    def collect(self) -> Iterable[Metric]:
        return self._callback()


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionStats:
    """One listener's connection counters, read from its server at scrape time."""

    open: int
    refused_cap: int
    header_timeouts: int
    malformed: int


class ProxyMetrics(Observer):
    """Every instrument of the proxy, on a registry of its own."""

    def __init__(
        self, *, known_statuses: Iterable[str] = (), registry: CollectorRegistry | None = None
    ) -> None:
        # Statuses come from requests; any name outside the lifecycle is folded into one
        # label value so a caller cannot grow the series count without bound.
        self._known = frozenset(known_statuses)
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "mes_proxy_requests",
            "Proxied requests by listener, route template, method and status code.",
            ("listener", "route", "method", "code"),
            registry=r,
        )
        self.duration = Histogram(
            "mes_proxy_request_duration_seconds",
            "Time from request received to response sent.",
            ("listener", "route"),
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_duration = Histogram(
            "mes_proxy_upstream_duration_seconds",
            "Time the upstream took to answer and stream its body.",
            ("listener", "route"),
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.errors = Counter(
            "mes_proxy_errors",
            "Requests that failed, by error type (upstream failures, aborts, rejections).",
            ("listener", "error_type"),
            registry=r,
        )
        self.transitions = Counter(
            "mes_order_transitions",
            "Order status transitions seen, by previous and new status.",
            ("listener", "from_status", "to_status", "kind"),
            registry=r,
        )
        self.anomalies = Counter(
            "mes_order_anomalies",
            "Lifecycle anomalies: skipped, backward, unknown status or order, "
            "change after a terminal status, status changed behind the proxy's back.",
            ("kind",),
            registry=r,
        )
        self.dwell = Histogram(
            "mes_order_dwell_seconds",
            "How long orders stayed in a status before leaving it.",
            ("status",),
            buckets=_DWELL_BUCKETS,
            registry=r,
        )
        self.stuck_found = Counter(
            "mes_order_stuck_found",
            "Orders newly found past their status's dwell limit.",
            ("status",),
            registry=r,
        )
        self.loop_tasks = Gauge(
            "mes_proxy_event_loop_tasks",
            "Unfinished asyncio tasks on the event loop, counted at scrape time (a leak grows it).",
            registry=r,
        )
        # process_resident_memory_bytes, process_open_fds, process_cpu_seconds_total, ...:
        # with the task gauge, what a soak run watches for unbounded growth.
        ProcessCollector(registry=r)
        self._children: dict[tuple[str, str, str, int], tuple[Any, Any, Any]] = {}
        self._transition_children: dict[tuple[str, str | None, str, object], tuple[Any, Any, Any]] = {}
        self._export_stats: Callable[[], ExportStats] | None = None
        self._order_counts: Callable[[], Mapping[str, int]] | None = None
        self._stuck_counts: Callable[[], Mapping[str, int]] | None = None
        self._store_stats: Callable[[], Mapping[str, int]] | None = None
        self._connection_stats: Callable[[], Mapping[str, ConnectionStats]] | None = None
        r.register(_CallbackCollector(self._collect))

    def bind(
        self,
        *,
        export_stats: Callable[[], ExportStats] | None = None,
        order_counts: Callable[[], Mapping[str, int]] | None = None,
        stuck_counts: Callable[[], Mapping[str, int]] | None = None,
        store_stats: Callable[[], Mapping[str, int]] | None = None,
        connection_stats: Callable[[], Mapping[str, ConnectionStats]] | None = None,
    ) -> None:
        """Attach the scrape-time sources (set once by the composition root)."""
        self._export_stats = export_stats or self._export_stats
        self._order_counts = order_counts or self._order_counts
        self._stuck_counts = stuck_counts or self._stuck_counts
        self._store_stats = store_stats or self._store_stats
        self._connection_stats = connection_stats or self._connection_stats

    def _collect(self) -> Iterable[Metric]:
        if self._export_stats is not None:
            stats = self._export_stats()
            spans = CounterMetricFamily(
                "mes_proxy_spans", "Spans by fate in the export path.", labels=("outcome",)
            )
            spans.add_metric(("queued",), stats.queued)
            spans.add_metric(("exported",), stats.exported)
            spans.add_metric(("dropped_queue_full",), stats.dropped_queue_full)
            spans.add_metric(("export_failed",), stats.failed)
            yield spans
        if self._order_counts is not None:
            gauge = GaugeMetricFamily("mes_orders", "Tracked orders by current status.", labels=("status",))
            for status, count in sorted(self._order_counts().items()):
                gauge.add_metric((status,), count)
            yield gauge
        if self._stuck_counts is not None:
            gauge = GaugeMetricFamily(
                "mes_orders_stuck", "Orders past the dwell limit of their current status.", labels=("status",)
            )
            for status, count in sorted(self._stuck_counts().items()):
                gauge.add_metric((status,), count)
            yield gauge
        if self._store_stats is not None:
            stats_map = self._store_stats()
            yield CounterMetricFamily(
                "mes_state_store_errors", "Order-state store failures.", value=stats_map.get("errors", 0)
            )
            yield CounterMetricFamily(
                "mes_state_store_dropped",
                "Order records dropped while the store was down.",
                value=stats_map.get("dropped", 0),
            )
            yield GaugeMetricFamily(
                "mes_state_store_pending",
                "Order records waiting to be written.",
                value=stats_map.get("pending", 0),
            )

        if self._connection_stats is not None:
            by_listener = sorted(self._connection_stats().items())
            open_now = GaugeMetricFamily(
                "mes_proxy_open_connections",
                "Client connections open now, per listener.",
                labels=("listener",),
            )
            refused = CounterMetricFamily(
                "mes_proxy_connections_refused",
                "Client connections and requests the listener's limits refused before the handler: "
                "over the connection cap (503), a head not read in time (408), or an unparsable or "
                "oversized head (400, 414, 431).",
                labels=("listener", "reason"),
            )
            for listener, counts in by_listener:
                open_now.add_metric((listener,), counts.open)
                refused.add_metric((listener, "connection_cap"), counts.refused_cap)
                refused.add_metric((listener, "header_timeout"), counts.header_timeouts)
                refused.add_metric((listener, "malformed_head"), counts.malformed)
            yield open_now
            yield refused

    def _label(self, status: str) -> str:
        return status if status in self._known else "_OTHER"

    def request_done(
        self,
        *,
        listener: str,
        route: str,
        method: str,
        status: int,
        duration: float,
        upstream_duration: float | None,
        error_type: str | None,
    ) -> None:
        """Count one request (called by the handler after the response went out)."""
        key = (listener, route, method, status)
        children = self._children.get(key)
        if children is None:
            # labels() validates and hashes every call; the label sets are few and bounded
            # (routes are templates, codes a small set), so resolve each once and keep it.
            children = self._children[key] = (
                self.requests.labels(listener, route, method, str(status)),
                self.duration.labels(listener, route),
                self.upstream_duration.labels(listener, route),
            )
        children[0].inc()
        children[1].observe(duration)
        if upstream_duration is not None:
            children[2].observe(upstream_duration)
        if error_type is not None:
            self.errors.labels(listener, error_type).inc()

    def order_findings(self, *, listener: str, findings: Findings) -> None:
        """Count transitions, anomalies and dwell times the order book reported."""
        transition = findings.transition
        if transition is not None:
            key = (listener, transition.prev, transition.new, transition.kind)
            children = self._transition_children.get(key)
            if children is None:
                # As for request_done: the label sets are bounded (known statuses, "_OTHER").
                prev = self._label(transition.prev) if transition.prev is not None else ""
                kind = transition.kind.value
                children = (
                    self.transitions.labels(listener, prev, self._label(transition.new), kind),
                    self.anomalies.labels(kind),
                    self.dwell.labels(prev) if transition.prev is not None else None,
                )
                if len(self._transition_children) < _MAX_CACHED_CHILDREN:
                    self._transition_children[key] = children
            children[0].inc()
            if findings.anomaly:
                children[1].inc()
            if findings.dwell is not None and children[2] is not None:
                children[2].observe(findings.dwell)
        if findings.observed_mismatch:
            self.anomalies.labels("observed_mismatch").inc()
