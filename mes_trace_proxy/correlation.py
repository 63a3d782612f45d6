"""Order correlation across traces: the modes, and which calls take the order's trace id.

In ``trace-per-order`` mode a call that arrives with no usable trace context and names an
order starts a *root* span whose trace id is derived from the order id, so Jaeger shows the
order's whole life as one trace with one root span per call (see docs/watchdog.md). The id
is given to ``SpanFactory.start(trace_id=...)``, the one way a span's trace id is chosen (the
proxy's SERVER spans and the watchdog's ``mes.order.stuck`` spans alike).

Why a chosen root trace id rather than a synthetic remote parent: every call of the order
becomes a true root span of the order's trace. A synthetic parent would give every span a
parent span id that is never exported (Jaeger flags those as missing parents), and would make
the sampling decision ours; with real roots the configured sampler decides, on the order's
trace id, so a ratio sampler keeps or drops an order's whole life together.
"""

from __future__ import annotations

from typing import Final

from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

from mes_trace_proxy.tracecontext import order_trace_id

__all__ = ["CORRELATION_MODES", "OrderTraceIds", "order_trace_for"]

CORRELATION_MODES: Final = ("link", "trace-per-order", "off")
"""``link``: spans link to the order's first span; ``trace-per-order``: one trace per order."""


class OrderTraceIds(RandomIdGenerator):
    """The SDK's random ids, without claiming W3C Level 2's random trace-id flag.

    In ``trace-per-order`` mode some root spans take a trace id derived from the order id, not
    a random one, so the generator does not tell the SDK (``is_trace_id_random``) that every
    trace id is random: no root span sets the flag, derived or not.
    """

    def is_trace_id_random(self) -> bool:
        """False: a root's trace id may be the order's (see the class docstring)."""
        return False


def order_trace_for(mode: str, order_id: str | None, *, has_parent: bool, tracked: bool) -> int | None:
    """The trace id a call's SERVER span should take, or None for the usual random one.

    ``trace-per-order`` applies to calls that bring no usable trace context (none, or an
    untrusted caller's) and name an order the proxy tracks, or that set a status and so
    start tracking it: the call that creates the order is then part of the order's trace.

    Args:
        mode: The correlation mode (``link``, ``trace-per-order`` or ``off``).
        order_id: The (redacted) order id the request names, or None.
        has_parent: The span continues a caller's trace.
        tracked: The order book tracks the order, or the call sets its status.

    Returns:
        ``tracecontext.order_trace_id(order_id)`` when the mode applies, else None.
    """
    if mode != "trace-per-order" or has_parent or not order_id or not tracked:
        return None
    return order_trace_id(order_id)
