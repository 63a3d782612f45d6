"""What the demo reads and prints: the proxy's ready line, metrics and stuck orders, the spans file.

Pure functions over text and values, table-tested in tests/test_demo_report.py with no sockets;
:mod:`mes_trace_proxy.demo.runner` does the running.
"""

from __future__ import annotations

import collections
import contextlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Final
from urllib.parse import quote

from prometheus_client.parser import text_string_to_metric_families

from mes_trace_proxy.core.config import parse_duration
from mes_trace_proxy.core.lifecycle import REFERENCE_LIFECYCLE
from mes_trace_proxy.sim import crm, mes

__all__ = [
    "DEFAULT_SERVICE",
    "STUCK_REASONS",
    "DemoResult",
    "MetricsView",
    "ProxyAddresses",
    "SpanScan",
    "StuckOrder",
    "StuckReport",
    "choose_stuck",
    "jaeger_search_url",
    "parse_metrics",
    "parse_ready_line",
    "parse_stuck",
    "problems",
    "progress_line",
    "scan_spans",
    "show_path",
    "stuck_in_store",
    "summary_lines",
]

#: The proxy's log line that carries its bound addresses (server.running).
READY_MESSAGE: Final = "mes-trace-proxy ready"
#: The statuses the demo's two MES faults leave orders in, each with why it is stuck there.
STUCK_REASONS: Final = MappingProxyType(
    {
        "SUBMITTED": "price calculation never came back (design note, problem 2)",
        "MANUFACTURING_APPROVED": "no operator took it into work (design note, problem 3)",
    }
)
DEFAULT_SERVICE: Final = "mes-api"  # the proxy's default service.name

# Enough rows to pick one to open in Jaeger without flooding the terminal.
STUCK_SHOWN: Final = 5
# The fake customer crm.canary_customer() plants in bodies: name, e-mail and phone shapes.
_CANARY: Final = re.compile(
    rf"{re.escape(crm.CANARY_NAME)}|canary\.\d+@example\.com|\+7 900 000-00-\d\d", re.IGNORECASE
)


def _base_url(host_port: str) -> str:
    host, _, port = host_port.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@dataclass(frozen=True, slots=True, kw_only=True)
class ProxyAddresses:
    """Where the running proxy listens, as base URLs."""

    listeners: Mapping[str, str]
    admin: str


def parse_ready_line(line: str) -> ProxyAddresses | None:
    """Read the bound addresses from the proxy's ready log line; None for any other line.

    Args:
        line: one line of the proxy's stdout.

    Returns:
        The addresses, or None.
    """
    try:
        doc = json.loads(line)
    except ValueError:
        return None
    if not isinstance(doc, dict) or doc.get("message") != READY_MESSAGE:
        return None
    listeners, admin = doc.get("listeners"), doc.get("admin")
    if not isinstance(listeners, dict) or not isinstance(admin, str):
        return None
    return ProxyAddresses(
        listeners=MappingProxyType({str(name): _base_url(str(hp)) for name, hp in listeners.items()}),
        admin=_base_url(admin),
    )


# ── what the proxy reports: /metrics and /orders/-/stuck ─────────────────────────────────────


@dataclass(frozen=True, slots=True, kw_only=True)
class MetricsView:
    """The few figures the demo reads from the proxy's ``/metrics``."""

    requests: Mapping[str, int]  # by listener
    spans: Mapping[str, int]  # by outcome: queued, exported, dropped_queue_full, export_failed
    orders: Mapping[str, int] | None  # by status; None when the proxy tracks no orders
    stuck: Mapping[str, int] | None  # by status; None when the gauge is not there

    @property
    def exported(self) -> int:
        """Spans the proxy's exporter delivered."""
        return self.spans.get("exported", 0)

    @property
    def settled(self) -> bool:
        """Every span queued so far has been exported, dropped or failed."""
        done = self.exported + self.spans.get("dropped_queue_full", 0) + self.spans.get("export_failed", 0)
        return self.spans.get("queued", 0) <= done


# sample name → (field, label)
_SAMPLES: Final = MappingProxyType(
    {
        "mes_proxy_requests_total": ("requests", "listener"),
        "mes_proxy_spans_total": ("spans", "outcome"),
        "mes_orders": ("orders", "status"),
        "mes_orders_stuck": ("stuck", "status"),
    }
)


def parse_metrics(text: str) -> MetricsView:
    """Read requests, span fates and order gauges from a Prometheus text exposition.

    Args:
        text: the body of ``GET /metrics``.

    Returns:
        The figures; order gauges are None when the proxy does not expose them.

    Raises:
        ValueError: the text is not a Prometheus exposition.
    """
    found: dict[str, collections.Counter[str]] = {
        name: collections.Counter() for name, _ in _SAMPLES.values()
    }
    families = set()
    for family in text_string_to_metric_families(text):
        families.add(family.name)
        for sample in family.samples:
            target = _SAMPLES.get(sample.name)
            if target is not None:
                found[target[0]][sample.labels.get(target[1], "")] += int(sample.value)
    return MetricsView(
        requests=MappingProxyType(dict(found["requests"])),
        spans=MappingProxyType(dict(found["spans"])),
        orders=MappingProxyType(dict(found["orders"])) if "mes_orders" in families else None,
        stuck=MappingProxyType(dict(found["stuck"])) if "mes_orders_stuck" in families else None,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class StuckOrder:
    """One order past its dwell limit."""

    order_id: str
    status: str
    over_by: float | None  # seconds past the limit, when known
    trace_id: str | None


# Field → the names the watchdog's JSON may use for it (its shape is being settled in parallel).
_STUCK_FIELDS: Final = MappingProxyType(
    {
        "order_id": ("order_id", "orderId", "id", "mes.order.id"),
        "status": ("status", "mes.order.status"),
        "over_by": (
            "over_limit_by_seconds",
            "over_limit_by",
            "over_by",
            "over_limit_seconds",
            "overdue_seconds",
            "over_limit_s",
        ),
        "trace_id": ("last_trace_id", "trace_id", "traceId", "trace"),
    }
)
_STUCK_LISTS: Final = ("orders", "stuck", "items")


def _field(item: Mapping[str, object], name: str) -> object:
    return next((item[key] for key in _STUCK_FIELDS[name] if item.get(key) is not None), None)


def parse_stuck(doc: object) -> tuple[StuckOrder, ...] | None:
    """Read ``GET /orders/-/stuck``: a list of orders, or an object holding one.

    Args:
        doc: the parsed JSON answer.

    Returns:
        The orders, latest first; None when the answer has a shape the demo does not know.
    """
    items = doc
    if isinstance(doc, dict):
        items = next((doc[key] for key in _STUCK_LISTS if isinstance(doc.get(key), list)), None)
    if not isinstance(items, list):
        return None
    orders = []
    for item in items:
        if not isinstance(item, dict):
            return None
        order_id, status = _field(item, "order_id"), _field(item, "status")
        if not isinstance(order_id, str) or not isinstance(status, str):
            return None
        over, trace = _field(item, "over_by"), _field(item, "trace_id")
        over_by: float | None
        try:
            over_by = None if over is None else parse_duration(over)
        except ValueError:
            over_by = None
        orders.append(
            StuckOrder(
                order_id=order_id,
                status=status,
                over_by=over_by,
                trace_id=trace if isinstance(trace, str) else None,
            )
        )
    return tuple(sorted(orders, key=lambda order: -(order.over_by or 0.0)))


def stuck_in_store(
    records: Iterable[mes.OrderRecord], limits: Mapping[str, float], now: float
) -> tuple[StuckOrder, ...]:
    """Orders the MES simulator holds in a status longer than its limit, latest first.

    Args:
        records: every order MES has (hidden ones included).
        limits: dwell limit in seconds by status.
        now: wall-clock time, the clock of ``OrderRecord.updated``.

    Returns:
        The stuck orders.
    """
    stuck = [
        StuckOrder(
            order_id=record.order_id,
            status=record.status,
            over_by=now - record.updated - limits[record.status],
            trace_id=None,
        )
        for record in records
        if record.status in limits and now - record.updated > limits[record.status]
    ]
    return tuple(sorted(stuck, key=lambda order: -(order.over_by or 0.0)))


@dataclass(frozen=True, slots=True, kw_only=True)
class StuckReport:
    """How many orders are stuck, which ones, and who said so."""

    count: int
    orders: tuple[StuckOrder, ...]
    source: str


def choose_stuck(
    answer: tuple[int, bytes] | None, metrics: MetricsView | None, computed: tuple[StuckOrder, ...]
) -> StuckReport:
    """Prefer the proxy's own answer; degrade to its gauge, then to the simulator's view.

    Args:
        answer: status and body of ``GET /orders/-/stuck``, or None when the call failed.
        metrics: the proxy's metrics, for the ``mes_orders_stuck`` gauge.
        computed: what :func:`stuck_in_store` found in the MES simulator.

    Returns:
        The report to print.
    """
    if answer is not None and answer[0] == 200:
        try:
            doc = json.loads(answer[1])
        except ValueError:
            doc = None
        parsed = parse_stuck(doc)
        if parsed is not None:
            # The proxy pages its answer and says how many there are in all under "total".
            total = doc.get("total") if isinstance(doc, dict) else None
            count = total if isinstance(total, int) and total >= len(parsed) else len(parsed)
            return StuckReport(
                count=count, orders=parsed, source="found by the proxy's watchdog (GET /orders/-/stuck)"
            )
    if metrics is not None and metrics.stuck is not None:
        return StuckReport(
            count=sum(metrics.stuck.values()),
            orders=computed,
            source="by the proxy's mes_orders_stuck gauge; order ids from the MES simulator",
        )
    return StuckReport(
        count=len(computed),
        orders=computed,
        source="past their dwell limit in the MES simulator (the proxy answers no GET /orders/-/stuck yet)",
    )


# ── what reached the collector ─────────────────────────────────────────────────────────────


@dataclass(frozen=True, slots=True, kw_only=True)
class SpanScan:
    """What the spans file holds: counts by service, proxy SERVER spans with an order id, leaks."""

    total: int
    by_service: Mapping[str, int]
    server_with_order: int
    personal_data: int


def scan_spans(lines: Iterable[str], service: str) -> SpanScan:
    """Count spans by service and look for the CRM's canary customer in every line.

    Args:
        lines: the JSON lines the OtlpSink wrote.
        service: the proxy's service name.

    Returns:
        The counts.
    """
    total = server_with_order = leaks = 0
    by_service: collections.Counter[str] = collections.Counter()
    for line in lines:
        if not line.strip():
            continue
        total += 1
        if _CANARY.search(line):
            leaks += 1
        try:
            span = json.loads(line)
        except ValueError:
            continue
        name = str(span.get("resource", {}).get("service.name", "?"))
        by_service[name] += 1
        if name == service and span.get("kind") == "SERVER" and "mes.order.id" in span.get("attributes", {}):
            server_with_order += 1
    return SpanScan(
        total=total,
        by_service=MappingProxyType(dict(by_service)),
        server_with_order=server_with_order,
        personal_data=leaks,
    )


def jaeger_search_url(base: str, service: str, order_id: str) -> str:
    """The Jaeger UI search for one order's spans: service plus the ``mes.order.id`` tag.

    Args:
        base: the Jaeger UI base URL.
        service: the service to search.
        order_id: the order.

    Returns:
        A URL to open in a browser.
    """
    tags = json.dumps({"mes.order.id": order_id}, separators=(",", ":"))
    return f"{base.rstrip('/')}/search?service={quote(service, safe='')}&tags={quote(tags, safe='')}"


# ── printing ───────────────────────────────────────────────────────────────────────────────

_STATUS_ORDER: Final = (
    "NEW",  # the CRM's own "not sent yet"
    *REFERENCE_LIFECYCLE.statuses,
    *((REFERENCE_LIFECYCLE.cancel,) if REFERENCE_LIFECYCLE.cancel else ()),
)


def _by_status(counts: Mapping[str, int]) -> str:
    def rank(status: str) -> tuple[int, str]:
        return (_STATUS_ORDER.index(status) if status in _STATUS_ORDER else len(_STATUS_ORDER), status)

    shown = [f"{status} {counts[status]}" for status in sorted(counts, key=rank) if counts[status]]
    return ", ".join(shown) or "none"


def progress_line(
    *, elapsed: float, total: float, crm_progress: crm.CrmProgress | None, metrics: MetricsView | None
) -> str:
    """One line on how the run goes: time, the CRM's orders, and what the proxy counted.

    Args:
        elapsed: seconds since the traffic started.
        total: the traffic's planned length.
        crm_progress: the CRM's latest snapshot.
        metrics: the proxy's latest figures.

    Returns:
        The line, without a newline.
    """
    width = len(f"{total:.0f}")
    clock = f"{elapsed:{width}.0f}/{total:.0f} s" if elapsed < total else "finishing"
    parts = []
    if crm_progress is not None:
        statuses = crm_progress.statuses
        done = statuses.get("CLOSED", 0) + statuses.get("CANCELLED", 0)
        parts.append(f"orders {crm_progress.orders_started} started, {done} closed or cancelled")
    if metrics is not None:
        spans = f"{metrics.exported} spans exported"
        if metrics.spans.get("export_failed", 0):
            spans += f", {metrics.spans['export_failed']} failed (is the collector up?)"
        parts.append(f"proxy: {sum(metrics.requests.values())} requests, {spans}")
    return f"[{clock}] " + " · ".join(parts or ["starting"])


@dataclass(frozen=True, slots=True, kw_only=True)
class DemoResult:
    """Everything the summary says."""

    elapsed: float
    crm_summary: crm.CrmSummary
    metrics: MetricsView | None
    stuck: StuckReport
    spans: SpanScan | None  # None when spans went to the user's collector
    spans_file: Path | None
    endpoint: str | None
    service: str
    jaeger_url: str
    admin_url: str
    admin_page: bool
    proxy_log: Path


def show_path(path: Path) -> str:
    """``path`` relative to the working directory when it is under it, else absolute."""
    with contextlib.suppress(ValueError):
        return str(path.relative_to(Path.cwd()))
    return str(path)


def _seconds_text(value: float | None) -> str:
    return "" if value is None else f"over by {value:.0f}s"


def summary_lines(result: DemoResult) -> list[str]:
    """The summary, one string per line.

    Args:
        result: what the run produced.

    Returns:
        The lines to print.
    """
    metrics, crm_summary = result.metrics, result.crm_summary
    early = " (stopped early by a signal)" if crm_summary.stopped_by == "signal" else ""
    lines = [f"Summary after {result.elapsed:.1f} s{early}"]
    if metrics is not None:
        by_listener = ", ".join(f"{name} {count}" for name, count in sorted(metrics.requests.items()))
        total = sum(metrics.requests.values())
        lines.append(
            f"  requests:        {total} through the proxy ({by_listener or 'none'});"
            f" the CRM and its dashboard sent {crm_summary.requests_sent}"
        )
    else:
        lines.append(f"  requests:        the CRM and its dashboard sent {crm_summary.requests_sent}")
    exported = "unknown" if metrics is None else str(metrics.exported)
    if result.spans is not None and result.spans_file is not None:
        services = ", ".join(f"{name} {n}" for name, n in sorted(result.spans.by_service.items()))
        lines.append(
            f"  spans exported:  {exported} by the proxy ({result.service}); {result.spans.total} in "
            f"{show_path(result.spans_file)} ({services or 'none'})"
        )
    else:
        lines.append(f"  spans exported:  {exported} by the proxy ({result.service}) to {result.endpoint}")
    if result.spans is not None:
        order_spans = result.spans.server_with_order
        lines.append(f"                   {order_spans} of the proxy's SERVER spans carry mes.order.id")
    if metrics is not None and metrics.spans.get("export_failed", 0):
        lines.append(f"                   {metrics.spans['export_failed']} failed to export")
    if metrics is not None and metrics.orders is not None:
        lines.append(f"  orders by status (the proxy's view): {_by_status(metrics.orders)}")
    else:
        lines.append(f"  orders by status (the CRM's view): {_by_status(crm_summary.final_status)}")
    stuck = result.stuck
    lines.append(f"  stuck orders:    {stuck.count} {stuck.source}")
    for order in stuck.orders[:STUCK_SHOWN]:
        reason = STUCK_REASONS.get(order.status, "")
        lines.append(
            f"      {order.order_id:<16} {order.status:<24} {_seconds_text(order.over_by):<14} {reason}"
        )
    if len(stuck.orders) > STUCK_SHOWN:
        lines.append(f"      … and {len(stuck.orders) - STUCK_SHOWN} more")
    if result.spans is not None:
        leaks = result.spans.personal_data
        lines.append(
            f"  personal data:   {leaks or 'none'} of {result.spans.total} spans "
            "carry the CRM's canary customer (name, e-mail, phone from the request bodies)"
        )
    lines.append("  open them:")
    example = stuck.orders[0].order_id if stuck.orders else None
    if result.spans_file is None:
        if example is not None:
            lines.append(f"      Jaeger:   {jaeger_search_url(result.jaeger_url, result.service, example)}")
        else:
            lines.append(f"      Jaeger:   {result.jaeger_url}/search?service={result.service}")
    else:
        if example is not None:
            lines.append(
                f'      spans:    grep \'"mes.order.id": "{example}"\' {show_path(result.spans_file)}'
            )
        lines.append(
            "      Jaeger:   start one and run again with OTEL_EXPORTER_OTLP_ENDPOINT set "
            "(README: Find an order in Jaeger)"
        )
    page = f"{result.admin_url}/" if result.admin_page else "(no orders page in this build)"
    lines.append(f"      admin:    {page}   metrics: {result.admin_url}/metrics")
    lines.append(f"      log:      {show_path(result.proxy_log)}")
    return lines


def problems(result: DemoResult) -> list[str]:
    """What makes the run a failure (exit 1): nothing proxied, nothing exported, personal data.

    Args:
        result: what the run produced.

    Returns:
        One message per problem; empty for a successful run.
    """
    found = []
    metrics = result.metrics
    if metrics is None:
        found.append(
            f"the proxy's {result.admin_url}/metrics did not answer; see {show_path(result.proxy_log)}"
        )
    elif sum(metrics.requests.values()) == 0:
        found.append(f"no request went through the proxy; see {show_path(result.proxy_log)}")
    exported = metrics.exported if metrics is not None else 0
    if result.spans is not None:
        exported = max(exported, result.spans.total)
    if exported == 0:
        where = result.endpoint or "the demo's OTLP sink"
        found.append(f"no span was exported to {where}: is the collector running and reachable?")
    if result.spans is not None and result.spans.personal_data:
        found.append(f"{result.spans.personal_data} spans carry the CRM's canary personal data")
    return found
