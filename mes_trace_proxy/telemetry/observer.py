"""What the request handler reports each finished exchange to."""

from __future__ import annotations

from mes_trace_proxy.core.orders import Findings

__all__ = ["Observer"]


class Observer:
    """Receives every finished exchange (metrics, order book side effects); a no-op by default."""

    # mypyc: interpreted, so interpreted classes may extend it (native.py, constraint 2).

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
        """Called once per proxied request, after the response was sent."""

    def order_findings(self, *, listener: str, findings: Findings) -> None:
        """Called when a call told the order book something (transitions, anomalies)."""
