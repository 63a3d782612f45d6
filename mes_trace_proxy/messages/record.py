"""A held dead letter, pure: the record, its summary, its JSON form, and ``hold`` that builds it.

No I/O: the stores (``held.py``) write these records; ``explain`` and the watcher build them.
"""

from __future__ import annotations

import base64
import datetime
import decimal
import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Final

from mes_trace_proxy.messages.deadletter import (
    DeadLetterError,
    Message,
    MessageRules,
    XDeath,
    cause_in_words,
    held_key,
    message_facts,
    parse_x_death,
)

__all__ = [
    "HELD_FORMAT",
    "FlaggedOrder",
    "HeldMessage",
    "HeldSummary",
    "decode_held",
    "decode_value",
    "encode_held",
    "encode_value",
    "hold",
    "with_span",
]

HELD_FORMAT: Final = 1
"""Version of the JSON layout written by ``encode_held``."""


@dataclass(frozen=True, slots=True, kw_only=True)
class HeldMessage:
    """One dead letter as the proxy keeps it: the message itself and what it says."""

    key: str
    order_id: str | None
    status: str | None
    rule: str | None
    cause: str
    deaths: tuple[XDeath, ...]
    #: the dead-letter queue (own mode) or the proxy's observe queue it was consumed from
    consumed_from: str
    received_at: float
    body: bytes = field(repr=False)
    #: AMQP basic properties other than headers, as JSON-able values (see encode_value)
    properties: Mapping[str, object] = field(default_factory=dict, repr=False)
    headers: Mapping[str, object] = field(default_factory=dict, repr=False)
    exchange: str = ""
    routing_key: str = ""
    #: the dead-letter span, to link the re-drive span to (0, 0 when none was recorded)
    span_trace_id: int = 0
    span_id: int = 0
    #: a metric-safe word when the message could not be read fully (``missing``, ``malformed``,
    #: ``not_json``, ``no_order``), else ``None``
    problem: str | None = None

    @property
    def death(self) -> XDeath | None:
        """The most recent ``x-death`` entry, if any."""
        return self.deaths[0] if self.deaths else None

    def dead_letter_object(self) -> dict[str, object]:
        """The ``dead_letter`` object of ``/orders/stuck`` and ``/orders/{id}`` entries."""
        return self.summary().dead_letter_object()

    def summary(self) -> HeldSummary:
        """What the per-order index keeps: a few hundred bytes instead of the whole message."""
        death = self.death
        message_id = self.properties.get("message_id")
        return HeldSummary(
            key=self.key,
            order_id=self.order_id,
            status=None if self.status is None else sys.intern(self.status),
            received_at=self.received_at,
            # Interned: thousands of dead letters from one queue share these strings.
            queue=None if death is None else sys.intern(death.queue),
            reason=None if death is None else sys.intern(death.reason),
            count=0 if death is None else death.count,
            exchange=None if death is None else sys.intern(death.exchange),
            routing_key=sys.intern(death.routing_key if death is not None else self.routing_key),
            time=death.time if death is not None and death.time is not None else self.received_at,
            message_id=message_id if isinstance(message_id, str) else None,
            cause=sys.intern(self.cause),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class HeldSummary:
    """A held message as the per-order index keeps it: the ``dead_letter`` facts, no body."""

    key: str
    order_id: str | None
    status: str | None
    received_at: float
    queue: str | None
    reason: str | None
    count: int
    exchange: str | None
    routing_key: str
    time: float
    message_id: str | None
    cause: str

    def dead_letter_object(self) -> dict[str, object]:
        """The ``dead_letter`` object of ``/orders/stuck`` and ``/orders/{id}`` entries."""
        return {
            "queue": self.queue,
            "reason": self.reason,
            "count": self.count,
            "exchange": self.exchange,
            "routing_key": self.routing_key,
            "time": datetime.datetime.fromtimestamp(self.time, datetime.UTC)
            .isoformat()
            .replace("+00:00", "Z"),
            "message_id": self.message_id,
            "cause": self.cause,
        }


# ── JSON form ────────────────────────────────────────────────────────────────────────────────


def encode_value(value: object) -> object:
    """An AMQP field value as JSON, tagged where JSON has no type for it (bytes, time, decimal, table)."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, bytes | bytearray):
        return {"$b": base64.b64encode(value).decode("ascii")}
    if isinstance(value, datetime.datetime):
        aware = value if value.tzinfo is not None else value.replace(tzinfo=datetime.UTC)
        return {"$t": aware.timestamp()}
    if isinstance(value, decimal.Decimal):
        return {"$d": str(value)}
    if isinstance(value, Mapping):
        return {"$m": {str(k): encode_value(v) for k, v in value.items()}}
    if isinstance(value, list | tuple):
        return [encode_value(v) for v in value]
    # Anything else a client may decode (an unknown field type) is kept as its text.
    return str(value)


def decode_value(value: object) -> object:
    """The inverse of :func:`encode_value` (datetimes come back timezone-aware, UTC)."""
    if isinstance(value, list):
        return [decode_value(v) for v in value]
    if not isinstance(value, dict):
        return value
    if "$b" in value:
        return base64.b64decode(value["$b"])
    if "$t" in value:
        return datetime.datetime.fromtimestamp(float(value["$t"]), datetime.UTC)
    if "$d" in value:
        return decimal.Decimal(value["$d"])
    if "$m" in value:
        return {str(k): decode_value(v) for k, v in value["$m"].items()}
    raise ValueError(f"unknown tagged value {sorted(value)!r}")


def _death_json(d: XDeath) -> list[object]:
    return [d.queue, d.reason, d.count, d.exchange, list(d.routing_keys), d.time, d.original_expiration]


def encode_held(held: HeldMessage) -> str:
    """The held message as compact JSON (the body base64-encoded)."""
    return json.dumps(
        {
            "v": HELD_FORMAT,
            "key": held.key,
            "order": held.order_id,
            "status": held.status,
            "rule": held.rule,
            "cause": held.cause,
            "deaths": [_death_json(d) for d in held.deaths],
            "from": held.consumed_from,
            "at": held.received_at,
            "body": base64.b64encode(held.body).decode("ascii"),
            "props": {k: encode_value(v) for k, v in held.properties.items()},
            "headers": {k: encode_value(v) for k, v in held.headers.items()},
            "exchange": held.exchange,
            "rk": held.routing_key,
            "span": [held.span_trace_id, held.span_id],
            "problem": held.problem,
        },
        separators=(",", ":"),
    )


def decode_held(data: str | bytes) -> HeldMessage:
    """Parse :func:`encode_held` output.

    Raises:
        ValueError: when the data is not a held message of a known format.
    """
    try:
        doc = json.loads(data)
        if doc["v"] != HELD_FORMAT:
            raise ValueError(f"unknown held-message format {doc['v']!r}")
        deaths = tuple(
            XDeath(
                queue=q,
                reason=r,
                count=int(c),
                exchange=e,
                routing_keys=tuple(k),
                time=t,
                original_expiration=o,
            )
            for q, r, c, e, k, t, o in doc["deaths"]
        )
        props = doc["props"]
        headers = doc["headers"]
        return HeldMessage(
            key=str(doc["key"]),
            order_id=doc["order"],
            status=doc["status"],
            rule=doc["rule"],
            cause=str(doc["cause"]),
            deaths=deaths,
            consumed_from=str(doc["from"]),
            received_at=float(doc["at"]),
            body=base64.b64decode(doc["body"]),
            properties={str(k): decode_value(v) for k, v in props.items()},
            headers={str(k): decode_value(v) for k, v in headers.items()},
            exchange=str(doc["exchange"]),
            routing_key=str(doc["rk"]),
            span_trace_id=int(doc["span"][0]),
            span_id=int(doc["span"][1]),
            problem=doc["problem"],
        )
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise ValueError(f"not a valid held message: {exc}") from exc


def with_span(held: HeldMessage, trace_id: int, span_id: int) -> HeldMessage:
    """The same held message, pointing at its dead-letter span."""
    return replace(held, span_trace_id=trace_id, span_id=span_id)


def hold(
    message: Message,
    properties: Mapping[str, object],
    *,
    consumed_from: str,
    rules: MessageRules,
    now: float,
) -> HeldMessage:
    """Everything the proxy keeps of one dead letter; never raises, whatever the message holds.

    A message without a readable ``x-death`` or whose body is not JSON is still held (nothing
    is lost), with ``problem`` saying what was wrong, so the operator can look at it.
    """
    problem: str | None = None
    try:
        deaths = parse_x_death(message.headers)
    except DeadLetterError as exc:
        deaths, problem = (), exc.kind
    facts = message_facts(rules, message, deaths)
    if problem is None and not facts.body_is_json:
        problem = "not_json"
    if problem is None and facts.order_id is None:
        problem = "no_order"
    label = facts.rule.label if facts.rule is not None else "message"
    if deaths:
        cause = cause_in_words(label, deaths[0])
    else:
        cause = f"{label} in {consumed_from} without an x-death header ({problem})"
    return HeldMessage(
        key=held_key(message, deaths),
        order_id=facts.order_id,
        status=facts.status,
        rule=facts.rule.name if facts.rule is not None else None,
        cause=cause,
        deaths=deaths,
        consumed_from=consumed_from,
        received_at=now,
        body=message.body,
        properties=dict(properties),
        headers={k: v for k, v in message.headers.items()},
        exchange=message.exchange,
        routing_key=message.routing_key,
        problem=problem,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class FlaggedOrder:
    """A dead-lettered order that has not moved on since: for ``/orders/stuck`` and the page."""

    order_id: str
    status: str | None
    since: float
    dead_letter: Mapping[str, object]
