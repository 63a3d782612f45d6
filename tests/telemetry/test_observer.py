"""The handler's observer: a no-op by default, so a subclass overrides only what it needs."""

from __future__ import annotations

from mes_trace_proxy.core.orders import Findings
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


def test_the_default_observer_ignores_everything() -> None:
    observer = Observer()
    observer.request_done(
        listener="ingress",
        route="/x",
        method="GET",
        status=200,
        duration=0.1,
        upstream_duration=None,
        error_type=None,
    )
    observer.order_findings(listener="ingress", findings=Findings())
    assert vars(observer) == {}


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
