"""Prometheus metrics: one registry per process, every instrument defined here, bounded labels.

Labels are listener names, route templates, methods, status codes, status names, transition
kinds and error types — never an order id or a user. Order gauges are computed at scrape
time from the order book, so the request path does no bookkeeping for them.
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, ProcessCollector
from prometheus_client import metrics as _prometheus_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from mes_trace_proxy.observer import Observer
from mes_trace_proxy.orders import Findings
from mes_trace_proxy.problems import ClientRejection, problem_type_uri
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
# The handler reports a refusal's error type as the problem slug or its type URI; both name
# one refusal reason, the slug (docs/operations.md).
_REFUSAL_REASONS: Final[Mapping[str, str]] = {
    **{kind.value: kind.value for kind in ClientRejection},
    **{problem_type_uri(kind.value): kind.value for kind in ClientRejection},
}


def _with_created() -> bool:
    """Whether ``_created`` series are exposed, as prometheus_client decides for its own.

    ``PROMETHEUS_DISABLE_CREATED_SERIES`` or ``disable_created_metrics()`` turn them off;
    the flag is read at each scrape, like the library's own instruments do.
    """
    return bool(getattr(_prometheus_metrics, "_use_created", True))


class _Count:
    """One counter series: a plain number the request path adds to."""

    def __init__(self) -> None:
        self.value = 0
        self.created = time.time()


class _Observations:
    """One histogram series: per-bucket counts (not cumulative) and the sum."""

    def __init__(self, buckets: int) -> None:
        self.counts = [0] * buckets
        self.total = 0.0
        self.created = time.time()


class _CounterFamily:
    """A labelled counter kept as plain integers and exposed at scrape time.

    The request path of a sidecar counts several series per call. prometheus_client's
    ``Counter`` takes a lock and goes through two interpreted calls per increment; these are
    one attribute add, read by the scrape (which runs in a worker thread: it copies the series
    with C-level calls that do not let the event loop's thread in halfway).
    """

    def __init__(self, name: str, documentation: str, labelnames: tuple[str, ...]) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = labelnames
        self.series: dict[tuple[str, ...], _Count] = {}

    def child(self, labels: tuple[str, ...]) -> _Count:
        """The series for these label values, created at its first use."""
        count = self.series.get(labels)
        if count is None:
            count = self.series[labels] = _Count()
        return count

    def metric(self) -> Metric:
        """The family as prometheus_client exposes a ``Counter`` of the same name."""
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        created = _with_created()
        for labels, count in list(self.series.items()):
            family.add_metric(labels, count.value, created=count.created if created else None)
        return family


class _HistogramFamily:
    """A labelled histogram kept as plain per-bucket counts; see :class:`_CounterFamily`."""

    def __init__(
        self, name: str, documentation: str, labelnames: tuple[str, ...], buckets: tuple[float, ...]
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = labelnames
        # The upper bounds with +Inf last; an observation lands in the first bound >= it
        # (Prometheus's "le"), which is what bisect_left finds.
        self.bounds: tuple[float, ...] = (*(float(b) for b in buckets), math.inf)
        self.le = tuple(str(floatToGoString(b)) for b in self.bounds)  # type: ignore[no-untyped-call]
        self.series: dict[tuple[str, ...], _Observations] = {}

    def child(self, labels: tuple[str, ...]) -> _Observations:
        """The series for these label values, created at its first use."""
        observed = self.series.get(labels)
        if observed is None:
            observed = self.series[labels] = _Observations(len(self.bounds))
        return observed

    def observe(self, observed: _Observations, value: float) -> None:
        """Count one observation in a series of this family."""
        observed.counts[bisect_left(self.bounds, value)] += 1
        observed.total += value

    def metric(self) -> Metric:
        """The family as prometheus_client exposes a ``Histogram`` of the same name."""
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        created = _with_created()
        for labels, observed in list(self.series.items()):
            counts = tuple(observed.counts)
            total = observed.total
            cumulative = 0
            buckets: list[tuple[str, float]] = []
            for le, count in zip(self.le, counts, strict=True):
                cumulative += count
                buckets.append((le, float(cumulative)))
            family.add_metric(labels, buckets, total)
            if created:
                family.samples.append(
                    Sample(
                        f"{self.name}_created",
                        dict(zip(self.labelnames, labels, strict=True)),
                        observed.created,
                    )
                )
        return family


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
    #: every refusal before the handler, by problem slug (503, 408, 400, 414, 431)
    refused: Mapping[str, int] = field(default_factory=dict)


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
        # The per-call families are plain numbers (see _CounterFamily), exposed by _collect.
        self.requests = _CounterFamily(
            "mes_proxy_requests",
            "Proxied requests by listener, route template, method and status code.",
            ("listener", "route", "method", "code"),
        )
        self.duration = _HistogramFamily(
            "mes_proxy_request_duration_seconds",
            "Time from request received to response sent.",
            ("listener", "route"),
            _LATENCY_BUCKETS,
        )
        self.upstream_duration = _HistogramFamily(
            "mes_proxy_upstream_duration_seconds",
            "Time the upstream took to answer and stream its body.",
            ("listener", "route"),
            _LATENCY_BUCKETS,
        )
        self.errors = Counter(
            "mes_proxy_errors",
            "Requests that failed, by error type (upstream failures, aborts, rejections).",
            ("listener", "error_type"),
            registry=r,
        )
        self.transitions = _CounterFamily(
            "mes_order_transitions",
            "Order status transitions seen, by previous and new status.",
            ("listener", "from_status", "to_status", "kind"),
        )
        self.anomalies = _CounterFamily(
            "mes_order_anomalies",
            "Lifecycle anomalies: skipped, backward, unknown status or order, "
            "change after a terminal status, status changed behind the proxy's back.",
            ("kind",),
        )
        self.dwell = _HistogramFamily(
            "mes_order_dwell_seconds",
            "How long orders stayed in a status before leaving it.",
            ("status",),
            _DWELL_BUCKETS,
        )
        self.stuck_found = Counter(
            "mes_order_stuck_found",
            "Orders newly found past their status's dwell limit.",
            ("status",),
            registry=r,
        )
        self.stuck_unreported = Counter(
            "mes_order_stuck_unreported",
            "Newly stuck orders a check counted but did not report one by one (a mass event past "
            "the watchdog's per-check cap); each is still listed by /orders/-/stuck.",
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
        self._children: dict[tuple[str, str, str, int], _RequestSeries] = {}
        self._transition_children: dict[tuple[str, str | None, str, object], _TransitionSeries] = {}
        self._export_stats: Callable[[], ExportStats] | None = None
        self._order_counts: Callable[[], Mapping[str, int]] | None = None
        self._stuck_counts: Callable[[], Mapping[str, int]] | None = None
        self._store_stats: Callable[[], Mapping[str, int]] | None = None
        self._connection_stats: Callable[[], Mapping[str, ConnectionStats]] | None = None
        self._admin_stats: Callable[[], ConnectionStats] | None = None
        self.handler_refusals = _CounterFamily("mes_proxy_refusals", "", ("listener", "reason"))  # _refusals
        self._upstream_answers: dict[str, float] | None = None
        r.register(_CallbackCollector(self._collect))

    def bind(
        self,
        *,
        export_stats: Callable[[], ExportStats] | None = None,
        order_counts: Callable[[], Mapping[str, int]] | None = None,
        stuck_counts: Callable[[], Mapping[str, int]] | None = None,
        store_stats: Callable[[], Mapping[str, int]] | None = None,
        connection_stats: Callable[[], Mapping[str, ConnectionStats]] | None = None,
        upstream_answers: dict[str, float] | None = None,
        admin_stats: Callable[[], ConnectionStats] | None = None,
    ) -> None:
        """Attach the scrape-time sources (set once by the composition root).

        ``upstream_answers`` is readiness's map of listener → ``time.monotonic()`` of the
        last upstream answer: kept here, where every request is counted anyway, rather than
        by one more observer call per request.
        """
        self._export_stats = export_stats or self._export_stats
        self._order_counts = order_counts or self._order_counts
        self._stuck_counts = stuck_counts or self._stuck_counts
        self._store_stats = store_stats or self._store_stats
        self._connection_stats = connection_stats or self._connection_stats
        self._admin_stats = admin_stats or self._admin_stats
        if upstream_answers is not None:
            self._upstream_answers = upstream_answers

    def _collect(self) -> Iterable[Metric]:
        yield self.requests.metric()
        yield self.duration.metric()
        yield self.upstream_duration.metric()
        yield self.transitions.metric()
        yield self.anomalies.metric()
        yield self.dwell.metric()
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
            for status, count in self._folded(self._order_counts()):
                gauge.add_metric((status,), count)
            yield gauge
        if self._stuck_counts is not None:
            gauge = GaugeMetricFamily(
                "mes_orders_stuck", "Orders past the dwell limit of their current status.", labels=("status",)
            )
            for status, count in self._folded(self._stuck_counts()):
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

        listeners = self._listener_stats()
        if listeners:
            by_listener = sorted(listeners.items())
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
        yield self._refusals(listeners)

    def _listener_stats(self) -> dict[str, ConnectionStats]:
        """Each listener's connection counters, the admin listener's under ``admin``."""
        listeners = dict(self._connection_stats()) if self._connection_stats is not None else {}
        if self._admin_stats is not None:
            listeners["admin"] = self._admin_stats()
        return listeners

    def _refusals(self, listeners: Mapping[str, ConnectionStats]) -> Metric:
        """``mes_proxy_refusals_total``: every refusal, by listener and problem slug."""
        counts: dict[tuple[str, ...], float] = {
            labels: float(count.value) for labels, count in list(self.handler_refusals.series.items())
        }
        for listener, stats in listeners.items():
            for reason, count in stats.refused.items():
                counts[(listener, reason)] = counts.get((listener, reason), 0.0) + count
        family = CounterMetricFamily(
            "mes_proxy_refusals",
            "Connections and requests the proxy refused itself, by listener and reason (the problem "
            "slug): the listener's limits (503 over the connection cap, 408, 400, 414, 431) and the "
            "handler's checks (413, refused targets and framing).",
            labels=("listener", "reason"),
        )
        for labels in sorted(counts):
            family.add_metric(labels, counts[labels])
        return family

    def refused(self, listener: str, reason: str) -> None:
        """Count one refusal outside the proxy handler (the admin listener's 401 and 403)."""
        self.handler_refusals.child((listener, reason)).value += 1

    def _label(self, status: str) -> str:
        return status if status in self._known else "_OTHER"

    def _folded(self, counts: Mapping[str, int]) -> list[tuple[str, int]]:
        """Per-status counts with every status outside the lifecycle summed under ``_OTHER``.

        The book keeps the names calls sent (a status is whatever a caller wrote), so a label
        per name would let a caller put any text, a person's name included, into /metrics.
        """
        folded: dict[str, int] = {}
        for status, count in counts.items():
            label = self._label(status)
            folded[label] = folded.get(label, 0) + count
        return sorted(folded.items())

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
        series = self._children.get(key)
        if series is None:
            # The label sets are few and bounded (routes are templates, codes a small set):
            # resolve each once and keep it.
            series = self._children[key] = _RequestSeries(
                self.requests.child((listener, route, method, str(status))),
                self.duration.child((listener, route)),
                self.upstream_duration.child((listener, route)),
            )
        series.count.value += 1
        self.duration.observe(series.duration, duration)
        if upstream_duration is not None:
            self.upstream_duration.observe(series.upstream, upstream_duration)
            if self._upstream_answers is not None:
                self._upstream_answers[listener] = time.monotonic()
        if error_type is not None:
            self.errors.labels(listener, error_type).inc()
            reason = _REFUSAL_REASONS.get(error_type)
            if reason is not None:
                self.handler_refusals.child((listener, reason)).value += 1

    def order_findings(self, *, listener: str, findings: Findings) -> None:
        """Count transitions, anomalies and dwell times the order book reported."""
        transition = findings.transition
        if transition is not None:
            key = (listener, transition.prev, transition.new, transition.kind)
            series = self._transition_children.get(key)
            if series is None:
                # As for request_done: the label sets are bounded (known statuses, "_OTHER").
                prev = self._label(transition.prev) if transition.prev is not None else ""
                kind = transition.kind.value
                series = _TransitionSeries(
                    self.transitions.child((listener, prev, self._label(transition.new), kind)),
                    self.anomalies.child((kind,)),
                    self.dwell.child((prev,)) if transition.prev is not None else None,
                )
                if len(self._transition_children) < _MAX_CACHED_CHILDREN:
                    self._transition_children[key] = series
            series.transitions.value += 1
            if findings.anomaly:
                series.anomalies.value += 1
            if findings.dwell is not None and series.dwell is not None:
                self.dwell.observe(series.dwell, findings.dwell)
        if findings.observed_mismatch:
            self.anomalies.child(("observed_mismatch",)).value += 1


class _RequestSeries:
    """The series one (listener, route, method, code) counts into."""

    def __init__(self, count: _Count, duration: _Observations, upstream: _Observations) -> None:
        self.count = count
        self.duration = duration
        self.upstream = upstream


class _TransitionSeries:
    """The series one (listener, from, to, kind) transition counts into."""

    def __init__(self, transitions: _Count, anomalies: _Count, dwell: _Observations | None) -> None:
        self.transitions = transitions
        self.anomalies = anomalies
        self.dwell = dwell
