"""The frozen values the order book answers with: a call's findings, stuck orders, views, snapshots.

Pure and small: built by ``orders.OrderBook``, read by the handler, the watchdog, the admin
API and the metrics.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from mes_trace_proxy.lifecycle import TransitionKind
from mes_trace_proxy.order_index import SLOT_SIZE
from mes_trace_proxy.order_records import HistoryEntry, SpanRef, span_at

__all__ = ["BookSnapshot", "Findings", "OrderView", "StuckOrder", "Transition"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Transition:
    """One status move; ``observed`` when the new status came from MES's response."""

    prev: str | None
    new: str
    kind: TransitionKind
    observed: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Findings:
    """What one ``apply`` call found.

    ``transition`` is None for a read that confirmed the known status or carried none.
    ``changed`` says the book's state changed (the caller then schedules a store write).
    """

    transition: Transition | None = None
    observed_mismatch: bool = False
    was_stuck: bool = False
    changed: bool = False
    dwell: float | None = None
    """Seconds the order spent in the status this call moved it out of (None: no move)."""
    # The book's bytes for the order (slot, then packed history): ``first_span`` decodes them
    # only when asked, which keeps ``apply`` to one small allocation when the caller does not link.
    history: bytes = field(default=b"", repr=False)

    @property
    def first_span(self) -> SpanRef | None:
        """The order's first recorded span (for span links), or None for an untracked order."""
        return span_at(self.history, SLOT_SIZE) if self.history else None

    @property
    def anomaly(self) -> bool:
        """True when the transition is an anomaly (skip, backward, after terminal, unknown)."""
        return self.transition is not None and self.transition.kind.anomaly


@dataclass(frozen=True, slots=True, kw_only=True)
class StuckOrder:
    """An order over its dwell limit; ``span`` started the wait, ``first_span`` is for links."""

    order_id: str
    status: str
    since: float
    limit: float
    over_by: float
    span: SpanRef
    first_span: SpanRef
    first_seen: float
    """When the book first saw the order (the start of a search for its spans)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class OrderView:
    """A read-only copy of one order's state, for the admin API and page."""

    order_id: str
    status: str
    prev: str | None
    since: float
    stuck: bool
    dwell_limit: float | None
    span: SpanRef
    first_span: SpanRef
    history: tuple[HistoryEntry, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class BookSnapshot:
    """Book-wide figures for metrics and the admin page, computed in O(statuses + stuck)."""

    orders: int
    capacity: int
    by_status: Mapping[str, int]
    stuck_by_status: Mapping[str, int]
    oldest_since: Mapping[str, float]
    evicted_total: int
    purged_total: int
    ignored_total: int
    removed_lost_total: int
