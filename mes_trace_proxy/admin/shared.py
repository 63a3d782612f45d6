"""The process's shared objects, as the admin listener reads them.

``app.py`` (the composition root) builds one :class:`Shared` per process and hands it to every
listener's state and to the admin application; the admin listener serves what it holds
(readiness, metrics, the order book, the watchdog, the message path). It lives here, below the
composition root, so the admin part never imports the module that assembles it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mes_trace_proxy.core.config import Config
from mes_trace_proxy.core.orders import OrderBook
from mes_trace_proxy.core.redact import Redactor
from mes_trace_proxy.telemetry.logs import AccessLog
from mes_trace_proxy.telemetry.metrics import ProxyMetrics
from mes_trace_proxy.telemetry.tracing import Tracing

if TYPE_CHECKING:
    from mes_trace_proxy.messages.service import MessagePath
    from mes_trace_proxy.state.watchdog import Watchdog

__all__ = ["Readiness", "Shared"]


@dataclass(slots=True)
class Readiness:
    """What ``/readyz`` reports: listeners bound, upstreams answering lately."""

    listeners_bound: bool = False
    draining: bool = False
    #: listener name → time.monotonic() of the last upstream answer of any status
    last_upstream_answer: dict[str, float] = field(default_factory=dict)


@dataclass(slots=True, kw_only=True)
class Shared:
    """Process-wide objects every listener and the admin app share."""

    config: Config
    tracing: Tracing
    metrics: ProxyMetrics
    redactor: Redactor
    orders: OrderBook | None
    access_log: AccessLog | None = None
    readiness: Readiness = field(default_factory=Readiness)
    clock: Callable[[], float] = time.time
    #: called when an order's state changed, so the store can write it behind the hot path
    on_order_changed: Callable[[str], None] | None = None
    #: the stuck-order watchdog; its ``sync`` keeps the book and the store in step (None: no order state)
    watchdog: Watchdog | None = None
    #: the message path: dead letters held, shown and re-driven (None: no --amqp-url)
    messages: MessagePath | None = None
