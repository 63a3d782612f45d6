"""Sample dead letters for the message-path tests: records built by the real ``hold``, a span exporter."""

from __future__ import annotations

import datetime
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from mes_trace_proxy.messages.deadletter import DEFAULT_MESSAGE_RULES, Message, compile_message_rules
from mes_trace_proxy.messages.record import HeldMessage, hold

__all__ = ["RULES", "T0", "TP", "X_DEATH", "death", "redrive_sample", "sample_held", "span_recorder"]

RULES = compile_message_rules(list(DEFAULT_MESSAGE_RULES), key="message_rules")
T0 = datetime.datetime(2026, 12, 7, 12, 0, 0, tzinfo=datetime.UTC)
X_DEATH = [
    {"queue": "mes.price.requests", "reason": "expired", "count": 1, "exchange": "mes.commands",
     "routing-keys": ["price.calculate"], "time": T0, "original-expiration": "30000"},
]  # fmt: skip


def sample_held(
    order_id: str = "ORD-1", body: bytes | None = None, message_id: str = "m-1", at: float = 100.0
) -> HeldMessage:
    message = Message(
        body=body if body is not None else f'{{"orderId":"{order_id}","status":"SUBMITTED"}}'.encode(),
        headers={"x-death": X_DEATH, "traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"},
        exchange="mes.dlx",
        routing_key="price.calculate",
        message_id=message_id,
    )
    props = {
        "message_id": message_id,
        "content_type": "application/json",
        "delivery_mode": 2,
        "timestamp": T0,
    }
    return hold(message, props, consumed_from="mes.dead-letters", rules=RULES, now=at)


TP = "00-" + "1" * 32 + "-" + "2" * 16 + "-01"


def death(
    queue: str, exchange: str = "mes.commands", key: str = "price.calculate", **over: object
) -> dict[str, object]:
    entry: dict[str, object] = {"queue": queue, "reason": "expired", "count": 1, "exchange": exchange,
                                "routing-keys": [key], "time": T0, "original-expiration": "30000"}  # fmt: skip  # noqa: E501
    entry.update(over)
    return entry


def redrive_sample(x_death: list[dict[str, object]] | None, **headers: object) -> HeldMessage:
    all_headers: dict[str, object] = {"traceparent": TP, "tracestate": "v=1", "x-app": "kept"}
    if x_death is not None:
        all_headers["x-death"] = x_death
        all_headers["x-first-death-queue"] = x_death[-1]["queue"]
        all_headers["x-first-death-reason"] = "expired"
        all_headers["x-first-death-exchange"] = "mes.commands"
    all_headers.update(headers)
    props = {
        "message_id": "m-1",
        "content_type": "application/json",
        "user_id": "crm",
        "timestamp": T0,
        "priority": 3,
    }
    message = Message(
        body=b'{"orderId":"ORD-1"}', headers=all_headers, exchange="mes.dlx", routing_key="price.calculate"
    )
    return hold(message, props, consumed_from="mes.dead-letters", rules=RULES, now=1.0)


@pytest.fixture(name="spans")
def span_recorder() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    """A tracer provider whose finished spans are kept in memory (span shape only)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()
