"""The orders API and the operations page on the admin listener.

The path scheme keeps every order id fetchable, whatever it is:

- ``GET /orders/{id}``: one order. ``{id}`` is exactly one path segment: an id holding ``/``
  (or any reserved character) is percent-encoded (``/orders/ORD%2F7``). Nothing else lives
  at ``/orders/{segment}``, so ``stuck``, ``purge`` and ``-`` are ids like any other.
- ``/orders/{id}/{action}``: acts on one order (``POST /orders/{id}/redrive``, issue 17).
- ``/orders/-/{view}``: views and actions over all orders: ``GET /orders/-/stuck``,
  ``POST /orders/-/purge``. ``-`` is the collection's segment (as in Google's API design, where
  ``-`` stands for "every parent"); a per-order action never takes a name in
  ``COLLECTION_ACTIONS``, so ``/orders/-/stuck`` cannot mean order ``-``'s action.
- ``GET /orders?status=&limit=&offset=`` lists orders; ``GET /`` is the HTML page.

Deprecated for one release, answered with ``Deprecation`` and a ``Link`` to the new path:
``GET /orders/stuck`` (an order with the id ``stuck`` wins: it is that order's path now),
``POST /orders/purge``, and an id with a raw ``/`` across segments (``/orders/ORD/7``).
Route names (``ROUTE_ACCESS``) say which routes only read and which act.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final
from urllib.parse import quote

from aiohttp import web

from mes_trace_proxy.admin_page import (
    dashboard_data,
    iso_utc,
    jaeger_link_base,
    jaeger_search_url,
    jaeger_trace_url,
    render,
)
from mes_trace_proxy.app import Shared
from mes_trace_proxy.messages.admin import flagged_json, page_section
from mes_trace_proxy.orders import HistoryEntry, OrderBook, OrderView, SpanRef, StuckOrder
from mes_trace_proxy.problems import PROBLEM_CONTENT_TYPE, problem_body, problem_type_uri

__all__ = [
    "COLLECTION",
    "COLLECTION_ACTIONS",
    "DEPRECATED_SINCE",
    "ROUTE_ACCESS",
    "Page",
    "add_order_routes",
    "order_path",
    "page_params",
]

log = logging.getLogger("mes_trace_proxy.admin_orders")

COLLECTION: Final = "/orders/-"
"""The prefix of the views and actions over all orders (``-`` is never read as an id here)."""
COLLECTION_ACTIONS: Final = frozenset({"stuck", "purge"})
"""Names under ``COLLECTION``; a per-order action (``/orders/{id}/NAME``) never takes one."""

ROUTE_ACCESS: Final[Mapping[str, str]] = {
    "orders.page": "read",
    "orders.stuck": "read",
    "orders.list": "read",
    "orders.get": "read",
    "orders.purge": "admin",
    "orders.stuck.deprecated": "read",
    "orders.purge.deprecated": "admin",
    # Added by messages/admin.py: republishes an order's held dead letters (docs/messages.md).
    "orders.redrive": "admin",
}
"""Route name → ``read`` (looks) or ``admin`` (changes state): what each route needs."""

# RFC 9745 ``Deprecation: @epoch``: when the old paths became deprecated (2026-12-07, the
# release that added /orders/-/…). They go in the release after next; CHANGELOG says so.
DEPRECATED_SINCE: Final = 1_796_601_600
_ORDERS_PREFIX: Final = "/orders/"

# A phone screen or a script's page: a few dozen rows by default.
DEFAULT_LIMIT: Final = 50
# One answer stays under about half a MiB (an order with its timeline is ~1 KiB of JSON).
MAX_LIMIT: Final = 500
# The page reloads itself this often; an operator watching an incident sees changes within
# half a minute, and a forgotten tab costs one cheap render per 30 s.
DEFAULT_REFRESH_S: Final = 30
# Reload periods above an hour are a typo; 0 turns reloading off.
MAX_REFRESH_S: Final = 3600
# The page runs no script and loads nothing: a strict policy costs nothing and stops any
# injected markup from running or calling out. Inline CSS is the page's only resource.
_PAGE_CSP: Final = (
    # Forms only to this origin: the Re-drive buttons post to /orders/{id}/redrive.
    "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Page:
    """A validated ``limit``/``offset`` pair."""

    limit: int
    offset: int


def page_params(query: Mapping[str, str]) -> Page:
    """Read ``limit`` (1..500, default 50) and ``offset`` (>= 0, default 0) from a query.

    Raises:
        ValueError: naming the parameter and the accepted range.
    """
    return Page(
        limit=_int_param(query, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT),
        offset=_int_param(query, "offset", 0, 0, None),
    )


def _int_param(query: Mapping[str, str], name: str, default: int, low: int, high: int | None) -> int:
    raw = query.get(name)
    if raw is None:
        return default
    wanted = f"a whole number from {low}" + (f" to {high}" if high is not None else " up")
    # isdigit() alone would accept "²" and other Unicode digits int() refuses.
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 18:
        raise ValueError(f"{name} must be {wanted}, got {raw[:40]!r}")
    value = int(raw)
    if value < low or (high is not None and value > high):
        raise ValueError(f"{name} must be {wanted}, got {value}")
    return value


def order_path(order_id: str) -> str:
    """The path of one order: ``/orders/`` and the id as one percent-encoded segment."""
    return _ORDERS_PREFIX + quote(order_id, safe="")


def _deprecated(response: web.StreamResponse, successor: str) -> web.StreamResponse:
    """Mark an answer of a deprecated path (RFC 9745) and name the path to use instead."""
    response.headers["Deprecation"] = f"@{DEPRECATED_SINCE}"
    response.headers["Link"] = f'<{successor}>; rel="successor-version"'
    return response


def _problem(status: int, slug: str, title: str, detail: str) -> web.Response:
    body = problem_body(status=status, title=title, detail=detail, type_=problem_type_uri(slug))
    return web.Response(status=status, body=body, content_type=PROBLEM_CONTENT_TYPE)


def _bad_request(detail: str) -> web.Response:
    return _problem(400, "bad-admin-request", "Bad request", detail)


class _Orders:
    """The handlers, over the process's shared objects."""

    def __init__(self, shared: Shared) -> None:
        self._shared = shared
        configured = shared.config.watchdog.jaeger_url
        # Links are shown to every viewer: never with the credentials --jaeger-url may carry.
        self._jaeger = jaeger_link_base(configured)
        if self._jaeger != configured:
            log.warning("--jaeger-url: user, password, query and fragment are left out of links")

    @property
    def _service(self) -> str:
        return self._shared.tracing.service_name

    def _book(self) -> OrderBook | None:
        return self._shared.orders

    def _search(self, order_id: str, first: float, now: float) -> str:
        return jaeger_search_url(self._jaeger, self._service, order_id, start=first, end=now)

    async def page(self, request: web.Request) -> web.StreamResponse:
        """The operations page: counts per status, stuck orders by lateness, timelines, links."""
        book = self._book()
        if book is None:
            return _not_tracking()
        try:
            refresh = _int_param(request.query, "refresh", DEFAULT_REFRESH_S, 0, MAX_REFRESH_S)
        except ValueError as exc:
            return _bad_request(str(exc))
        data = dashboard_data(
            book, self._shared.clock(), jaeger_url=self._jaeger, service=self._service, refresh=refresh
        )
        text = render(data, extra=page_section(request))
        response = web.Response(text=text, content_type="text/html", charset="utf-8")
        response.headers["Cache-Control"] = "no-store"
        response.headers["Content-Security-Policy"] = _PAGE_CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        return response

    async def stuck(self, request: web.Request) -> web.StreamResponse:
        """Every order flagged stuck, the most late first (paged)."""
        book = self._book()
        if book is None:
            return _not_tracking()
        try:
            page = page_params(request.query)
        except ValueError as exc:
            return _bad_request(str(exc))
        now = self._shared.clock()
        # Dead-lettered orders come first, flagged at once (docs/messages.md); then the book's.
        dead = self._dead_lettered(book, now)
        items = dead[page.offset : page.offset + page.limit]
        want = page.limit - len(items)
        # A page costs its own orders, not the whole stuck list (a mass event can hold 100k).
        found = book.stuck(now, offset=max(0, page.offset - len(dead)), limit=want) if want > 0 else []
        return web.json_response(
            {
                "now": iso_utc(now),
                "total": book.stuck_total() + len(dead),
                "limit": page.limit,
                "offset": page.offset,
                "orders": items + [self._stuck_json(s, now) for s in found],
            }
        )

    def _dead_lettered(self, book: OrderBook, now: float) -> list[dict[str, object]]:
        """Dead-lettered orders the book does not list as stuck already (those carry it too)."""
        messages = self._shared.messages
        if messages is None:
            return []
        entries = []
        for flagged in messages.flagged():
            view = book.get(flagged.order_id)
            if view is not None and view.stuck:
                continue
            entry = self._summary(view, now) if view is not None else flagged_json(flagged, iso_utc)
            entry["dead_letter"] = dict(flagged.dead_letter)
            entries.append(entry)
        return entries

    def _entry(
        self, order_id: str, status: str, since: float, span: SpanRef, first_seen: float, now: float
    ) -> dict[str, object]:
        """The fields every order entry of the API carries: the one place to add one to all."""
        entry: dict[str, object] = {
            "order_id": order_id,
            "status": status,
            "since": iso_utc(since),
            "last_trace_id": span.trace_id_hex,
            "jaeger_url": self._search(order_id, first_seen, now),
        }
        messages = self._shared.messages
        if messages is not None:  # the message path is on: the cause, when a message died
            entry["dead_letter"] = messages.dead_letter(order_id)
        return entry

    def _stuck_json(self, stuck: StuckOrder, now: float) -> dict[str, object]:
        entry = self._entry(stuck.order_id, stuck.status, stuck.since, stuck.span, stuck.first_seen, now)
        entry["over_limit_by_seconds"] = round(stuck.over_by, 3)
        entry["limit_seconds"] = stuck.limit
        return entry

    async def by_status(self, request: web.Request) -> web.StreamResponse:
        """Orders in one status (``?status=``) or in all, the longest waiting first (paged)."""
        book = self._book()
        if book is None:
            return _not_tracking()
        try:
            page = page_params(request.query)
        except ValueError as exc:
            return _bad_request(str(exc))
        counts = book.counts()
        status = request.query.get("status")
        if status is not None and status not in counts:
            known = ", ".join(counts)
            return _bad_request(f"status must be one of the statuses the book knows ({known})")
        known_order = book.lifecycle.known
        statuses = (
            [status]
            if status is not None
            else [*known_order, *sorted(s for s in counts if s not in known_order)]
        )
        views: list[OrderView] = []
        skip, want = page.offset, page.limit
        for name in statuses:
            size = counts.get(name, 0)
            if skip >= size:
                skip -= size
                continue
            got = book.by_status(name, limit=want, offset=skip)
            views.extend(got)
            skip, want = 0, want - len(got)
            if want <= 0:
                break
        now = self._shared.clock()
        return web.json_response(
            {
                "status": status,
                "total": sum(counts.get(name, 0) for name in statuses),
                "limit": page.limit,
                "offset": page.offset,
                "orders": [self._summary(view, now) for view in views],
            }
        )

    def _summary(self, view: OrderView, now: float) -> dict[str, object]:
        entry = self._entry(view.order_id, view.status, view.since, view.span, view.history[0].at, now)
        entry["dwell_seconds"] = round(now - view.since, 3)
        entry["dwell_limit_seconds"] = view.dwell_limit
        entry["stuck"] = view.stuck
        return entry

    async def get(self, request: web.Request) -> web.StreamResponse:
        """One order: its state and timeline with trace ids; 404 problem for an unknown id."""
        order_id = request.match_info["order_id"]
        response = self._order(order_id)
        raw = request.rel_url.raw_path[len(_ORDERS_PREFIX) :]
        if "/" in raw and response.status == 200:  # the id across raw segments: the old form
            return _deprecated(response, order_path(order_id))
        return response

    async def stuck_or_order(self, request: web.Request) -> web.StreamResponse:
        """``GET /orders/stuck``: the order ``stuck`` if the book has it, else (deprecated) the list."""
        book = self._book()
        if book is not None and "stuck" in book:
            return self._order("stuck")
        return _deprecated(await self.stuck(request), f"{COLLECTION}/stuck")

    async def purge_deprecated(self, request: web.Request) -> web.StreamResponse:
        """``POST /orders/purge``: the purge, at its old path (deprecated)."""
        return _deprecated(await self.purge(request), f"{COLLECTION}/purge")

    def _order(self, order_id: str) -> web.Response:
        book = self._book()
        if book is None:
            return _not_tracking()
        view = book.get(order_id)
        messages = self._shared.messages
        held = messages.held_for(order_id) if view is None and messages is not None else []
        if held:  # known only from a dead letter (no HTTP call seen): what the message says
            return web.json_response(
                {"order_id": order_id, "status": held[-1].status, "since": iso_utc(held[0].received_at),
                 "dead_letter": held[-1].dead_letter_object(), "timeline": []}
            )  # fmt: skip
        if view is None:
            # The id is not echoed: it came from the URL and may be anything.
            return _problem(
                404, "order-not-found", "Order not found", "The proxy tracks no order with this id."
            )
        now = self._shared.clock()
        doc = self._summary(view, now)
        doc["previous_status"] = view.prev
        limit = view.dwell_limit
        doc["over_limit_by_seconds"] = round(now - view.since - limit, 3) if limit is not None else None
        doc["timeline"] = [self._timeline_entry(view.order_id, entry) for entry in view.history]
        return web.json_response(doc)

    def _timeline_entry(self, order_id: str, entry: HistoryEntry) -> dict[str, object]:
        # The book keeps the span of the first and the newest change only; for the ones between
        # the ids are null (the trace id stays when it is the first change's) and the link
        # searches the order's spans around that change instead.
        span = entry.span
        trace = span.trace_id_hex if span.trace_id else None
        return {
            "status": entry.status,
            "at": iso_utc(entry.at),
            "transition": entry.kind.value,
            "observed": entry.observed,
            "source": entry.source,
            "trace_id": trace,
            "span_id": span.span_id_hex if span.span_id else None,
            "trace_url": (
                jaeger_trace_url(self._jaeger, trace)
                if trace is not None
                else self._search(order_id, entry.at, entry.at)
            ),
        }

    async def purge(self, _request: web.Request) -> web.StreamResponse:
        """Forget closed and cancelled orders past the retention now, as the watchdog does."""
        watchdog = self._shared.watchdog
        if watchdog is None:
            return _not_tracking()
        purged = watchdog.purge(self._shared.clock())
        retention = self._shared.config.watchdog.retention
        return web.json_response({"purged": purged, "retention_seconds": retention})


def _not_tracking() -> web.Response:
    return _problem(503, "orders-not-tracked", "Order tracking is off", "This proxy keeps no order state.")


def add_order_routes(app: web.Application, shared: Shared) -> None:
    """Add the page and the orders API to the admin application, named as in ``ROUTE_ACCESS``."""
    orders = _Orders(shared)
    router = app.router
    router.add_get("/", orders.page, name="orders.page")
    router.add_get("/orders", orders.by_status, name="orders.list")
    router.add_get(f"{COLLECTION}/stuck", orders.stuck, name="orders.stuck")
    router.add_post(f"{COLLECTION}/purge", orders.purge, name="orders.purge")
    # The old paths, for one release. GET /orders/purge is not among them: a POST-only
    # route lets the GET fall through to the order with the id "purge".
    router.add_get("/orders/stuck", orders.stuck_or_order, name="orders.stuck.deprecated")
    router.add_post("/orders/purge", orders.purge_deprecated, name="orders.purge.deprecated")
    # One segment is the id (percent-encoded); ``.+`` still takes an id with raw slashes,
    # answered as deprecated. Per-order actions (``/orders/{id}/redrive``) are other methods.
    router.add_get("/orders/{order_id:.+}", orders.get, name="orders.get")
