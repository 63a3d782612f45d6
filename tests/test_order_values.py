"""The order book's answers: findings name their anomaly and decode the first span only when asked."""

from __future__ import annotations

import pytest

from mes_trace_proxy.lifecycle import REFERENCE_LIFECYCLE, TransitionKind
from mes_trace_proxy.order_values import Findings, Transition
from mes_trace_proxy.orders import OrderBook, SpanRef

T0 = 1_700_000_000.0


@pytest.mark.parametrize(
    ("kind", "anomaly"),
    [
        (TransitionKind.FORWARD, False),
        (TransitionKind.SKIP, True),
        (TransitionKind.BACKWARD, True),
        (TransitionKind.UNKNOWN_STATUS, True),
    ],
    ids=lambda v: str(v),
)
def test_findings_anomaly_follows_the_transition_kind(kind: TransitionKind, anomaly: bool) -> None:
    """A finding is an anomaly exactly when its transition's kind is one."""
    findings = Findings(transition=Transition(prev="A", new="B", kind=kind))
    assert findings.anomaly is anomaly
    assert Findings().anomaly is False


def test_first_span_is_the_orders_first_call() -> None:
    """``first_span`` reads the first call's span from the book's bytes; none without history."""
    book = OrderBook(REFERENCE_LIFECYCLE)
    book.apply(order_id="o", status="SUBMITTED", observed=None, now=T0, span=SpanRef(7, 1))
    later = book.apply(order_id="o", status="PRICE_CALCULATED", observed=None, now=T0 + 1, span=SpanRef(8, 2))
    assert later.first_span == SpanRef(7, 1)
    assert Findings().first_span is None
