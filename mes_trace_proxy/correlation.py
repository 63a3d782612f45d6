"""Order correlation across traces: the ``trace-per-order`` trace ids, chosen by an IdGenerator.

In ``trace-per-order`` mode a call that arrives with no usable trace context and names an
order starts a *root* span whose trace id is derived from the order id, so Jaeger shows the
order's whole life as one trace with one root span per call (see docs/watchdog.md).
"""

from __future__ import annotations

import contextvars
from types import TracebackType
from typing import Final

from opentelemetry.sdk.trace.id_generator import IdGenerator, RandomIdGenerator

from mes_trace_proxy.tracecontext import order_trace_id

__all__ = ["CORRELATION_MODES", "OrderTraceIds", "order_trace_for"]

CORRELATION_MODES: Final = ("link", "trace-per-order", "off")
"""``link``: spans link to the order's first span; ``trace-per-order``: one trace per order."""


class _Chosen:
    """Context manager that makes the next root span in this context use ``trace_id``."""

    __slots__ = ("_token", "_trace_id", "_var")

    def __init__(self, var: contextvars.ContextVar[int | None], trace_id: int) -> None:
        self._var = var
        self._trace_id = trace_id
        self._token: contextvars.Token[int | None] | None = None

    def __enter__(self) -> None:
        self._token = self._var.set(self._trace_id)

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._token is not None:
            self._var.reset(self._token)


class _Unchanged:
    """The no-op twin of ``_Chosen``, shared: random ids as usual."""

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None


_UNCHANGED: Final = _Unchanged()


class OrderTraceIds(IdGenerator):
    """The SDK's random ids, except a trace id chosen for the root span being started.

    Why an IdGenerator rather than a synthetic remote parent: the SDK asks the generator for
    a trace id only for a root span, so every call of the order becomes a true root span of
    the order's trace. A synthetic parent would give every span a parent span id that is
    never exported (Jaeger flags those as missing parents), and would make the sampling
    decision ours; with real roots the configured sampler decides, on the order's trace id,
    so a ratio sampler keeps or drops an order's whole life together.

    The choice lives in a context variable, so it applies only to spans started inside
    ``with ids.using(trace_id):`` in the same task, never to a concurrent request.
    """

    def __init__(self) -> None:
        self._random = RandomIdGenerator()
        # One variable per generator, i.e. per tracer provider (per proxy), not per process.
        self._chosen: contextvars.ContextVar[int | None] = contextvars.ContextVar(
            "mes_trace_proxy_order_trace_id", default=None
        )

    def using(self, trace_id: int | None) -> _Chosen | _Unchanged:
        """A context manager under which a new root span gets ``trace_id`` (None: random).

        Args:
            trace_id: A valid (non-zero, 128-bit) W3C trace id, or None to change nothing.

        Returns:
            A context manager; entering it is O(1).

        Raises:
            ValueError: when ``trace_id`` is zero or wider than 128 bits.
        """
        if trace_id is None:
            return _UNCHANGED
        if not 0 < trace_id < 1 << 128:
            raise ValueError("a W3C trace id is a non-zero 128-bit number")
        return _Chosen(self._chosen, trace_id)

    def generate_span_id(self) -> int:
        """A random span id, as the SDK's default generator makes it."""
        return self._random.generate_span_id()

    def generate_trace_id(self) -> int:
        """The chosen trace id inside ``using``; otherwise a random one."""
        chosen = self._chosen.get()
        return chosen if chosen is not None else self._random.generate_trace_id()


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
