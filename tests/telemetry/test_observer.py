"""The handler's observer: the metrics implement every hook; a subclass overrides only what it needs."""

from __future__ import annotations

import pytest

from mes_trace_proxy.core.orders import Findings
from mes_trace_proxy.telemetry.metrics import ProxyMetrics
from mes_trace_proxy.telemetry.observer import Observer


class _Counting(Observer):
    def __init__(self) -> None:
        self.done: list[tuple[str, int, str | None]] = []

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
        self.done.append((route, status, error_type))


@pytest.mark.parametrize("hook", [name for name in vars(Observer) if not name.startswith("_")])
def test_the_metrics_observer_overrides_every_hook(hook: str) -> None:
    """ProxyMetrics, the observer app.py installs, implements each hook: none falls back to the no-op.

    A hook added to Observer and forgotten in ProxyMetrics would silently count nothing.
    """
    assert getattr(ProxyMetrics, hook) is not getattr(Observer, hook)


def test_a_subclass_keeps_the_defaults_it_does_not_override() -> None:
    observer = _Counting()
    observer.request_done(
        listener="ingress",
        route="/api/v1/orders/{orderId}/status",
        method="PUT",
        status=502,
        duration=0.2,
        upstream_duration=None,
        error_type="upstream_unreachable",
    )
    observer.order_findings(listener="ingress", findings=Findings())
    assert observer.done == [("/api/v1/orders/{orderId}/status", 502, "upstream_unreachable")]
