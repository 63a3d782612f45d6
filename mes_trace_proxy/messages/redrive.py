"""Re-drive: publish a held dead letter back where it came from, with publisher confirms, at most once.

What is sent (:func:`outgoing`, pure):

- to the exchange and routing key of the message's last death in a queue other than the one
  it was consumed from (``x-death``), so a message dead-lettered twice still goes home;
- the original body, byte for byte, and the original properties, except ``user_id`` (the
  broker refuses a ``user_id`` other than the publishing connection's user) and ``expiration``
  (a per-message TTL that has already run out once would expire the re-driven message again
  before anyone could take it; ``restore_expiration=True`` puts the original TTL back);
- the original headers, except the broker's death headers (``x-death``, ``x-first-death-*``,
  ``x-last-death-*``: the broker starts a fresh history, and the old one stays in the audit
  log and the dead-letter span), with a fresh ``traceparent`` (from a PRODUCER span linked to
  the dead-letter span; ``tracestate`` is kept) and ``x-mes-redrive-count``, the number of
  re-drives of this message so far, so consumers and the automatic policy can tell.

At most once: the held copy is claimed first (a second call, on any replica, finds it
claimed or gone), published with ``mandatory`` and a publisher confirm, and removed only after
the broker acked it. A failed publish gives the claim back, so the operator can try again.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Final

import aio_pika
import aiormq.exceptions
from aio_pika.abc import AbstractChannel, AbstractConnection
from opentelemetry import trace as trace_api
from opentelemetry.trace import Status, StatusCode
from pamqp.commands import Basic

from mes_trace_proxy.messages.held import HeldStore
from mes_trace_proxy.messages.record import HeldMessage
from mes_trace_proxy.messages.spans import MES_MESSAGE_REDRIVE_OUTCOME, redrive_span, traceparent_of

__all__ = [
    "DEATH_HEADERS",
    "Outgoing",
    "RedriveResult",
    "Redriver",
    "outgoing",
]

_log = logging.getLogger(__name__)
#: One line per re-drive: who, what, when, and how it ended (docs/messages.md, "Audit").
audit_log = logging.getLogger("mes_trace_proxy.audit")

DEATH_HEADERS: Final = frozenset(
    {
        "x-death",
        "x-first-death-queue",
        "x-first-death-reason",
        "x-first-death-exchange",
        "x-last-death-queue",
        "x-last-death-reason",
        "x-last-death-exchange",
    }
)
REDRIVE_COUNT_HEADER: Final = "x-mes-redrive-count"
#: 10 s for a confirm: a live broker confirms in milliseconds; past that, say so and keep the copy.
CONFIRM_TIMEOUT_S: Final = 10.0
#: Every outcome a re-drive can have: the metric's label values.
OUTCOMES: Final = (
    "redriven",
    "nothing_held",
    "in_progress",
    "no_destination",
    "unroutable",
    "nacked",
    "broker_unavailable",
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Outgoing:
    """A message ready to publish."""

    exchange: str
    routing_key: str
    body: bytes = field(repr=False)
    properties: Mapping[str, object] = field(default_factory=dict, repr=False)
    headers: Mapping[str, object] = field(default_factory=dict, repr=False)


def _count(value: object) -> int:
    if isinstance(value, bytes):
        value = value.decode("ascii", errors="replace")
    try:
        return int(str(value)) if value is not None else 0
    except ValueError:
        return 0


def outgoing(
    held: HeldMessage, *, traceparent: str | None, restore_expiration: bool = False
) -> Outgoing | None:
    """What a re-drive of ``held`` publishes, or ``None`` when the message says nowhere to go."""
    deaths = [d for d in held.deaths if d.queue != held.consumed_from] or list(held.deaths)
    if not deaths:
        return None
    home = deaths[0]
    if not home.exchange and not home.routing_key:
        return None
    headers = {k: v for k, v in held.headers.items() if k not in DEATH_HEADERS and k != "traceparent"}
    if traceparent is not None:
        headers["traceparent"] = traceparent
    headers[REDRIVE_COUNT_HEADER] = _count(held.headers.get(REDRIVE_COUNT_HEADER)) + 1
    properties = {k: v for k, v in held.properties.items() if k not in {"user_id", "expiration"}}
    if restore_expiration and home.original_expiration:
        properties["expiration"] = home.original_expiration
    return Outgoing(
        exchange=home.exchange,
        routing_key=home.routing_key,
        body=held.body,
        properties=properties,
        headers=headers,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class RedriveResult:
    """How a re-drive of one order ended: one outcome per held message."""

    order_id: str
    outcomes: tuple[tuple[str, str], ...]  # (held key, outcome)
    traceparents: tuple[str, ...] = ()

    @property
    def outcome(self) -> str:
        """``redriven`` when every message went; the first other outcome otherwise."""
        if not self.outcomes:
            return "nothing_held"
        for _, outcome in self.outcomes:
            if outcome != "redriven":
                return outcome
        return "redriven"


def _seconds(value: object) -> datetime.datetime | None:
    if isinstance(value, datetime.datetime):
        return value
    return None


class Redriver:
    """Publishes held messages back, over a connection of its own opened on first use.

    Args:
        url: the AMQP URL (the watcher's).
        store: the held store.
        tracer: for the re-drive's PRODUCER span.
        redact: the privacy redactor's ``value``, for ids on the span.
        clock: wall-clock seconds, for claims and the audit line.
    """

    def __init__(
        self,
        url: str,
        store: HeldStore,
        tracer: trace_api.Tracer,
        *,
        redact: Callable[[str], str],
        clock: Callable[[], float],
        ssl_context: ssl.SSLContext | None = None,
        restore_expiration: bool = False,
    ) -> None:
        self._url = url
        self._store = store
        self._tracer = tracer
        self._redact = redact
        self._clock = clock
        self._ssl_context = ssl_context
        self._restore_expiration = restore_expiration
        self._connection: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        self._lock = asyncio.Lock()
        self.outcomes: dict[str, int] = dict.fromkeys(OUTCOMES, 0)

    async def _open(self) -> AbstractChannel:
        async with self._lock:
            if self._channel is not None and not self._channel.is_closed:
                return self._channel
            if self._connection is None or self._connection.is_closed:
                self._connection = await aio_pika.connect(
                    self._url, timeout=5.0, ssl_context=self._ssl_context,
                    client_properties={"connection_name": "mes-trace-proxy re-drive"},
                )  # fmt: skip
            self._channel = await self._connection.channel(publisher_confirms=True, on_return_raises=True)
            return self._channel

    async def close(self) -> None:
        """Close the publishing connection."""
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.close()

    async def redrive_order(self, order_id: str, *, who: str) -> RedriveResult:
        """Re-drive every held message of one order; writes one audit line per message.

        Args:
            order_id: the order.
            who: the caller, as the audit log names it ("admin:alice", the token's role and name).
        """
        held_messages = await self._store.for_order(order_id)
        outcomes: list[tuple[str, str]] = []
        traceparents: list[str] = []
        for held in held_messages:
            outcome, traceparent = await self._redrive_one(held)
            outcomes.append((held.key, outcome))
            if traceparent is not None and outcome == "redriven":
                traceparents.append(traceparent)
            self._audit(held, who, outcome)
        if not held_messages:
            self.outcomes["nothing_held"] += 1
            audit_log.info(
                "redrive order=%s by=%s at=%s outcome=nothing_held", self._redact(order_id), who, self._when()
            )
        return RedriveResult(order_id=order_id, outcomes=tuple(outcomes), traceparents=tuple(traceparents))

    def _when(self) -> str:
        return datetime.datetime.fromtimestamp(self._clock(), datetime.UTC).isoformat(timespec="seconds")

    def _audit(self, held: HeldMessage, who: str, outcome: str) -> None:
        death = held.death
        audit_log.info(
            "redrive order=%s message=%s by=%s at=%s outcome=%s from=%s reason=%s",
            self._redact(held.order_id or "-"), held.key, who, self._when(), outcome,
            death.queue if death else "-", death.reason if death else "-",
        )  # fmt: skip

    async def _redrive_one(self, held: HeldMessage) -> tuple[str, str | None]:
        if not await self._store.claim(held.key, self._clock()):
            outcome = "in_progress" if await self._store.get(held.key) is not None else "nothing_held"
            self.outcomes[outcome] += 1
            return outcome, None
        span = redrive_span(self._tracer, held, redact=self._redact)
        traceparent = traceparent_of(span)
        try:
            outcome = await self._publish(held, traceparent)
        except BaseException:
            # Unexpected (or cancelled): the message was maybe not sent; keep it re-drivable.
            span.set_status(Status(StatusCode.ERROR, "error"))
            span.end()
            with contextlib.suppress(Exception):
                await self._store.release(held.key)
            raise
        span.set_attribute(MES_MESSAGE_REDRIVE_OUTCOME, outcome)
        if outcome != "redriven":
            span.set_status(Status(StatusCode.ERROR, outcome))
        span.end()
        if outcome == "redriven":
            await self._store.remove(held.key)
        else:
            await self._store.release(held.key)
        self.outcomes[outcome] += 1
        return outcome, traceparent

    async def _publish(self, held: HeldMessage, traceparent: str | None) -> str:
        message = outgoing(held, traceparent=traceparent, restore_expiration=self._restore_expiration)
        if message is None:
            return "no_destination"
        props = message.properties
        amqp_message = aio_pika.Message(
            message.body,
            headers=dict(message.headers),  # type: ignore[arg-type]  # values came from the broker
            content_type=_text(props.get("content_type")),
            content_encoding=_text(props.get("content_encoding")),
            delivery_mode=_int(props.get("delivery_mode")),
            priority=_int(props.get("priority")),
            correlation_id=_text(props.get("correlation_id")),
            reply_to=_text(props.get("reply_to")),
            expiration=_expiration_s(props.get("expiration")),
            message_id=_text(props.get("message_id")),
            timestamp=_seconds(props.get("timestamp")),
            type=_text(props.get("type")),
            app_id=_text(props.get("app_id")),
        )
        try:
            channel = await self._open()
            exchange = (
                channel.default_exchange
                if not message.exchange
                else await channel.get_exchange(message.exchange, ensure=False)
            )
            confirm = await exchange.publish(
                amqp_message, message.routing_key, mandatory=True, timeout=CONFIRM_TIMEOUT_S
            )
        except aio_pika.exceptions.DeliveryError:
            return "unroutable"
        except aiormq.exceptions.ChannelNotFoundEntity:
            # The exchange is gone: the channel is closed by the broker, reopened next time.
            return "unroutable"
        except (TimeoutError, OSError, aiormq.exceptions.AMQPError) as exc:
            _log.warning("re-drive: broker unavailable (%s)", type(exc).__name__)
            await self.close()
            return "broker_unavailable"
        return "redriven" if isinstance(confirm, Basic.Ack) else "nacked"


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _expiration_s(value: object) -> float | None:
    """AMQP ``expiration`` is milliseconds as text; the client takes seconds."""
    ms = _int(value)
    return None if ms is None else ms / 1000


def _int(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None
