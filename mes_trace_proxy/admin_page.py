"""The operations page at ``/`` on the admin listener: a pure render from the order book.

Plain server-side HTML (every value through ``html.escape``), no template engine, no script,
readable on a phone. Also the Jaeger UI links and time formats the orders API shares.
"""

from __future__ import annotations

import datetime
import html
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final
from urllib.parse import quote, urlencode, urlsplit, urlunsplit

from mes_trace_proxy.orders import HistoryEntry, OrderBook, StuckOrder

__all__ = [
    "DashboardData",
    "StuckEntry",
    "dashboard_data",
    "human_duration",
    "iso_utc",
    "jaeger_link_base",
    "jaeger_search_url",
    "jaeger_trace_url",
    "render",
]

# A search window around the order's life: an hour either side absorbs clock skew between
# the proxy and Jaeger's storage, and the calls (model uploads, reads) around its first status.
_SEARCH_MARGIN_S: Final = 3600.0
# Traces per Jaeger search: an order has one trace per call (a dozen status changes and a
# few reads); 100 keeps the newest of a chatty order without a slow search.
_SEARCH_LIMIT: Final = 100
# Stuck orders drawn on the page: enough for any real incident; the JSON API has them all.
PAGE_STUCK_LIMIT: Final = 100
# Timelines shown unfolded: the latest few need no tap; the rest fold to keep the page short.
_OPEN_TIMELINES: Final = 3
_MICROS: Final = 1_000_000
_UNITS: Final = (("d", 86400), ("h", 3600), ("min", 60), ("s", 1))


def iso_utc(epoch: float) -> str:
    """``2024-05-01T12:00:00.000Z``: ISO 8601 in UTC, to the millisecond."""
    moment = datetime.datetime.fromtimestamp(epoch, datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def human_duration(seconds: float) -> str:
    """A duration for people, in its largest unit and the next one: ``2 d 3 h``, ``1 h``, ``45 s``."""
    total = max(0, int(seconds))
    for index, (name, size) in enumerate(_UNITS):
        if total >= size or size == 1:
            text = f"{total // size} {name}"
            if index + 1 < len(_UNITS):
                next_name, next_size = _UNITS[index + 1]
                rest = total % size // next_size
                if rest:
                    text += f" {rest} {next_name}"
            return text
    raise AssertionError("unreachable: the last unit is one second")


def jaeger_link_base(url: str) -> str:
    """The Jaeger UI base URL as links may carry it: no user, password, query or fragment.

    ``--jaeger-url`` may hold credentials (``https://user:secret@jaeger``) for a proxy in front
    of Jaeger; links go to every viewer of the page and the orders API, so they never do.
    The browser asks the viewer to sign in instead.
    """
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, host, parts.path.rstrip("/"), "", ""))


def jaeger_search_url(base: str, service: str, order_id: str, *, start: float, end: float) -> str:
    """The Jaeger UI search for every span tagged with the order id, over the order's life.

    Jaeger UI's search page reads ``service``, ``tags`` (a JSON object of tag → value),
    ``lookback`` (``custom`` to use ``start``/``end``, in microseconds) and ``limit`` from
    its URL and runs the search on load; without a range it looks back one hour only.

    Args:
        base: The Jaeger UI base URL (``--jaeger-url``), no trailing slash.
        service: ``service.name`` of the proxy's spans.
        order_id: The order id as the spans carry it in ``mes.order.id``.
        start: Epoch seconds the order was first seen.
        end: Epoch seconds to search up to (now).

    Returns:
        The URL, every parameter percent-encoded.
    """
    tags = json.dumps({"mes.order.id": order_id}, separators=(",", ":"), ensure_ascii=False)
    query = urlencode(
        {
            "service": service,
            "tags": tags,
            "lookback": "custom",
            "start": int((start - _SEARCH_MARGIN_S) * _MICROS),
            "end": int((end + _SEARCH_MARGIN_S) * _MICROS),
            "limit": _SEARCH_LIMIT,
        },
        quote_via=quote,
        safe="",
    )
    return f"{base}/search?{query}"


def jaeger_trace_url(base: str, trace_id_hex: str) -> str:
    """The Jaeger UI page of one trace."""
    return f"{base}/trace/{quote(trace_id_hex, safe='')}"


@dataclass(frozen=True, slots=True, kw_only=True)
class StuckEntry:
    """One stuck order as the page shows it: the finding and its timeline."""

    stuck: StuckOrder
    history: tuple[HistoryEntry, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class DashboardData:
    """Everything the page shows, copied out of the book at one instant."""

    now: float
    statuses: tuple[str, ...]
    """Statuses in lifecycle order, then any others the book has seen."""
    counts: Mapping[str, int]
    stuck_counts: Mapping[str, int]
    stuck: tuple[StuckEntry, ...]
    """The most late first, at most ``PAGE_STUCK_LIMIT``."""
    stuck_total: int
    tracked: int
    jaeger_url: str
    service: str
    refresh: int
    """Seconds between automatic reloads; 0 for none."""


def dashboard_data(
    book: OrderBook, now: float, *, jaeger_url: str, service: str, refresh: int = 30
) -> DashboardData:
    """Copy what the page needs out of the book (O(statuses + ``PAGE_STUCK_LIMIT``)).

    Args:
        book: The order book.
        now: Wall-clock epoch seconds.
        jaeger_url: Jaeger UI base URL.
        service: ``service.name`` the spans carry.
        refresh: Seconds between reloads of the page; 0 turns it off.

    Returns:
        The page's data.
    """
    snapshot = book.snapshot()
    entries = []
    for item in book.stuck(now, limit=PAGE_STUCK_LIMIT):
        view = book.get(item.order_id)
        entries.append(StuckEntry(stuck=item, history=view.history if view is not None else ()))
    known = book.lifecycle.known
    statuses = (*known, *sorted(s for s in snapshot.by_status if s not in known))
    return DashboardData(
        now=now,
        statuses=statuses,
        counts=snapshot.by_status,
        stuck_counts=snapshot.stuck_by_status,
        stuck=tuple(entries),
        stuck_total=sum(snapshot.stuck_by_status.values()),
        tracked=snapshot.orders,
        jaeger_url=jaeger_url,
        service=service,
        refresh=refresh,
    )


_CSS: Final = """
:root{color-scheme:light dark;--late:#b3261e;--muted:#666;--line:#8884}
*{box-sizing:border-box}
body{font:16px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;
max-width:60rem;padding:1rem}
h1{font-size:1.4rem;margin:0 0 .25rem}h2{font-size:1.15rem;margin:1.5rem 0 .5rem}
.meta,.since,time{color:var(--muted)}.meta{margin:0;font-size:.9rem}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:.35rem .5rem;border-bottom:1px solid var(--line);overflow-wrap:anywhere}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums;overflow-wrap:normal;white-space:nowrap}
tr.has-stuck td{color:var(--late);font-weight:600}
ol.stuck{list-style:none;padding:0;margin:0}
li.order{border:1px solid var(--line);border-left:.35rem solid var(--late);border-radius:.4rem;
padding:.6rem .8rem;margin:0 0 .75rem}
.head{display:flex;flex-wrap:wrap;gap:.25rem .75rem;align-items:baseline}
.id{font-family:ui-monospace,monospace;font-weight:700;word-break:break-all}
.status{font-size:.85rem;padding:0 .4rem;border:1px solid var(--line);border-radius:.3rem;
overflow-wrap:anywhere}
.since,ol.timeline li{overflow-wrap:anywhere}
.late{color:var(--late);font-weight:600}
a.jaeger{display:inline-block;margin:.4rem 0;padding:.3rem .6rem;border-radius:.3rem;
border:1px solid currentColor;text-decoration:none}
ol.timeline{margin:.3rem 0 0;padding-left:1.2rem;font-size:.9rem}
ol.timeline a{font-family:ui-monospace,monospace}
.kind-anomaly{color:var(--late)}
.empty{padding:1rem;border:1px dashed var(--line);border-radius:.4rem}
@media (max-width:30rem){body{padding:.6rem}th,td{padding:.3rem .25rem}}
"""


def render(data: DashboardData, *, extra: str = "") -> str:
    """The whole page as one HTML string; every value from the book is escaped.

    Args:
        data: What to show (``dashboard_data``).
        extra: Sections drawn after the stuck orders, already escaped (the message path's
            "Dead letters", messages/page.py).

    Returns:
        An HTML5 document.
    """
    esc = html.escape
    refresh = f'<meta http-equiv="refresh" content="{data.refresh}">' if data.refresh > 0 else ""
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        refresh,
        f"<title>{data.stuck_total} stuck · MES orders</title>",
        f"<style>{_CSS}</style></head><body>",
        "<header><h1>MES orders</h1>",
        f'<p class="meta">{data.tracked} tracked · {data.stuck_total} stuck · as of '
        f'<time datetime="{iso_utc(data.now)}">{esc(_clock(data.now))}</time> UTC</p></header>',
        # Stuck orders first: on a phone they are what the page is opened for.
        f'<section><h2 id="stuck">Stuck orders ({data.stuck_total})</h2>',
        _stuck_list(data),
        "</section>",
        extra,
        _counts_table(data),
        "</body></html>",
    ]
    return "\n".join(part for part in parts if part)


def _clock(epoch: float) -> str:
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")


def _breakable(name: str) -> str:
    """An escaped status name that a narrow screen may break after each ``_`` (MANUFACTURING_…)."""
    return html.escape(name).replace("_", "_<wbr>")


def _counts_table(data: DashboardData) -> str:
    rows = []
    for status in data.statuses:
        count = data.counts.get(status, 0)
        stuck = data.stuck_counts.get(status, 0)
        css = ' class="has-stuck"' if stuck else ""
        rows.append(
            f'<tr{css} data-status="{html.escape(status)}"><td>{_breakable(status)}</td>'
            f'<td class="n">{count}</td><td class="n">{stuck}</td></tr>'
        )
    return (
        '<section><h2>Orders by status</h2><table class="counts">'
        '<thead><tr><th>Status</th><th class="n">Orders</th><th class="n">Stuck</th></tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></section>"
    )


def _stuck_list(data: DashboardData) -> str:
    if not data.stuck:
        return '<p class="empty">No order is past its dwell limit.</p>'
    items = [_stuck_item(data, entry, index < _OPEN_TIMELINES) for index, entry in enumerate(data.stuck)]
    more = data.stuck_total - len(data.stuck)
    tail = (
        f'<p class="meta">{more} more: <a href="orders/-/stuck">orders/-/stuck</a> lists every one.</p>'
        if more > 0
        else ""
    )
    return f'<ol class="stuck">{"".join(items)}</ol>{tail}'


def _stuck_item(data: DashboardData, entry: StuckEntry, unfold: bool) -> str:
    esc = html.escape
    stuck = entry.stuck
    first = entry.history[0].at if entry.history else stuck.since
    search = jaeger_search_url(data.jaeger_url, data.service, stuck.order_id, start=first, end=data.now)
    return (
        f'<li class="order" data-order-id="{esc(stuck.order_id)}">'
        f'<div class="head"><span class="id">{esc(stuck.order_id)}</span>'
        f'<span class="status">{_breakable(stuck.status)}</span>'
        f'<span class="late">{esc(human_duration(stuck.over_by))} over limit</span></div>'
        f'<div class="since">in {esc(stuck.status)} since '
        f'<time datetime="{iso_utc(stuck.since)}">{esc(_clock(stuck.since))}</time> UTC '
        f"(limit {esc(human_duration(stuck.limit))})</div>"
        f'<a class="jaeger" href="{esc(search)}" rel="noopener" target="_blank">Open its spans in Jaeger</a>'
        f"{_timeline(data.jaeger_url, entry.history, unfold)}</li>"
    )


def _timeline(jaeger_url: str, history: Sequence[HistoryEntry], unfold: bool) -> str:
    esc = html.escape
    rows = []
    for entry in history:
        trace = entry.span.trace_id_hex
        kind = entry.kind.value + (", observed" if entry.observed else "")
        css = "kind-anomaly" if entry.kind.anomaly else "kind"
        link = (
            f'<a href="{esc(jaeger_trace_url(jaeger_url, trace))}" rel="noopener" target="_blank">'
            f"trace {esc(trace[:8])}…</a>"
            if entry.span.is_valid
            else ""
        )
        rows.append(
            f'<li><time datetime="{iso_utc(entry.at)}">{esc(_clock(entry.at))}</time> '
            f'<strong>{esc(entry.status)}</strong> <span class="{css}">{esc(kind)}</span> {link}</li>'
        )
    open_attr = " open" if unfold else ""
    return (
        f"<details{open_attr}><summary>Timeline ({len(history)})</summary>"
        f'<ol class="timeline">{"".join(rows)}</ol></details>'
    )
