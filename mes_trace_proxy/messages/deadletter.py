"""Dead letters, pure: the broker's ``x-death`` header, the order a message is about, the cause in words.

Plain values in, frozen values out; no broker client, no clock, no I/O (the watcher converts
an incoming AMQP message into :class:`Message` and passes the time in).

Message rules use the same source syntax as the HTTP rules (``KIND:ARG``, RFC 6901 pointers
parsed by :func:`mes_trace_proxy.rules.parse_pointer`), with the kinds a message has:
``body:/pointer``, ``header:NAME`` (an AMQP application header), ``routing_key``,
``message_id``, ``correlation_id`` and ``const:VALUE``.
"""

from __future__ import annotations

import datetime
import enum
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from mes_trace_proxy.extract import read_pointer
from mes_trace_proxy.rules import RuleError, parse_pointer

__all__ = [
    "DEFAULT_MESSAGE_RULES",
    "KNOWN_REASONS",
    "DeadLetterError",
    "Message",
    "MessageFacts",
    "MessageRule",
    "MessageRules",
    "MessageSource",
    "MessageSourceKind",
    "XDeath",
    "cause_in_words",
    "compile_message_rules",
    "held_key",
    "message_facts",
    "parse_x_death",
]

#: The reasons RabbitMQ writes into ``x-death`` (3.10+): a consumer rejected or nacked the
#: message without requeue, its TTL ran out, the queue was full, or a quorum queue's delivery
#: limit was reached.
KNOWN_REASONS: Final = frozenset({"rejected", "expired", "maxlen", "delivery_limit"})
#: Longest fact (order id, status) taken from a message; longer values are not ids.
MAX_VALUE_LENGTH: Final = 200


class DeadLetterError(ValueError):
    """A message's ``x-death`` header is missing or malformed; ``kind`` is a metric-safe word."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True, slots=True, kw_only=True)
class XDeath:
    """One entry of the ``x-death`` header: one queue the message died in, and how often."""

    queue: str
    reason: str
    count: int
    exchange: str
    routing_keys: tuple[str, ...]
    #: seconds since the epoch of the last death in this queue, or ``None`` when absent
    time: float | None
    #: the per-message TTL (milliseconds, as the producer wrote it) when the reason is ``expired``
    original_expiration: str | None = None

    @property
    def routing_key(self) -> str:
        """The first routing key the message was published with (re-drive uses it)."""
        return self.routing_keys[0] if self.routing_keys else ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Message:
    """An incoming AMQP message, as plain values (the watcher builds it from the client's object)."""

    body: bytes
    headers: Mapping[str, object]
    exchange: str = ""
    routing_key: str = ""
    message_id: str | None = None
    correlation_id: str | None = None


class MessageSourceKind(enum.Enum):
    """Where a message fact is read from."""

    BODY = "body"
    HEADER = "header"
    ROUTING_KEY = "routing_key"
    MESSAGE_ID = "message_id"
    CORRELATION_ID = "correlation_id"
    CONST = "const"


@dataclass(frozen=True, slots=True, kw_only=True)
class MessageSource:
    """A compiled message source such as ``body:/orderId`` or ``header:x-order-id``."""

    kind: MessageSourceKind
    name: str = ""
    pointer: tuple[str, ...] = ()
    value: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class MessageRule:
    """Which dead letters a rule covers (by the queue they died in and/or routing key), and its sources."""

    name: str
    #: what the message is, in words: "price request" ("price request expired in …")
    label: str
    queue: str | None = None
    routing_key: str | None = None
    order_id: MessageSource | None = None
    status: MessageSource | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class MessageFacts:
    """What a dead letter says about its order."""

    order_id: str | None
    status: str | None
    rule: MessageRule | None
    #: ``False`` when a body source was asked for and the body is not JSON (counted, not fatal)
    body_is_json: bool = True


class MessageRules:
    """Compiled message rules; the first rule whose queue and routing key match wins."""

    __slots__ = ("rules",)

    def __init__(self, rules: Sequence[MessageRule]) -> None:
        self.rules: tuple[MessageRule, ...] = tuple(rules)

    def match(self, queue: str, routing_key: str) -> MessageRule | None:
        """The first rule for a message that died in ``queue`` published with ``routing_key``."""
        for rule in self.rules:
            if rule.queue is not None and rule.queue != queue:
                continue
            if rule.routing_key is not None and rule.routing_key != routing_key:
                continue
            return rule
        return None


#: The reference topology (docs/mes-api.md, "Reference messages"): every body carries
#: ``orderId`` and ``status``; the last rule covers dead letters from any other queue.
DEFAULT_MESSAGE_RULES: Final[tuple[Mapping[str, str], ...]] = (
    {"name": "price-request", "label": "price request", "queue": "mes.price.requests",
     "order_id": "body:/orderId", "status": "body:/status"},
    {"name": "approved-order", "label": "approved order", "queue": "mes.order.approved",
     "order_id": "body:/orderId", "status": "body:/status"},
    {"name": "price-result", "label": "price result", "queue": "crm.price.results",
     "order_id": "body:/orderId", "status": "body:/status"},
    {"name": "any", "label": "message", "order_id": "body:/orderId", "status": "body:/status"},
)  # fmt: skip

_KINDS: Final = {kind.value: kind for kind in MessageSourceKind}
_NO_ARG: Final = frozenset(
    {MessageSourceKind.ROUTING_KEY, MessageSourceKind.MESSAGE_ID, MessageSourceKind.CORRELATION_ID}
)
_RULE_KEYS: Final = frozenset({"name", "label", "queue", "routing_key", "order_id", "status"})


def _parse_source(key: str, raw: object) -> MessageSource:
    if not isinstance(raw, str):
        raise RuleError(key, f"expected a source such as 'body:/orderId'; got {raw!r}")
    kind_text, _, arg = raw.partition(":")
    kind = _KINDS.get(kind_text.strip())
    if kind is None:
        raise RuleError(key, f"unknown message source kind {kind_text!r}; use one of {', '.join(_KINDS)}")
    if kind in _NO_ARG:
        if arg:
            raise RuleError(key, f"{kind.value} takes no argument; write just '{kind.value}'")
        return MessageSource(kind=kind)
    if kind is MessageSourceKind.BODY:
        try:
            return MessageSource(kind=kind, pointer=parse_pointer(arg))
        except ValueError as exc:
            raise RuleError(key, str(exc)) from None
    if not arg:
        raise RuleError(
            key, f"{kind.value}: needs a {'value' if kind is MessageSourceKind.CONST else 'name'}"
        )
    if kind is MessageSourceKind.CONST:
        return MessageSource(kind=kind, value=arg)
    # AMQP header names are case-sensitive short strings: kept as written.
    return MessageSource(kind=kind, name=arg)


def _optional_text(key: str, raw: Mapping[str, object], name: str) -> str | None:
    value = raw.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise RuleError(f"{key}.{name}", "must be a non-empty string")
    return value


def compile_message_rules(raw: object, *, key: str) -> MessageRules:
    """Compile a list of message-rule mappings (YAML ``message_rules``, or the defaults).

    Raises:
        RuleError: naming the key of the first invalid rule.
    """
    if not isinstance(raw, list | tuple):
        raise RuleError(key, "expected a list of message rules")
    rules: list[MessageRule] = []
    for index, item in enumerate(raw):
        item_key = f"{key}[{index}]"
        if not isinstance(item, Mapping):
            raise RuleError(item_key, "a message rule must be a mapping")
        unknown = sorted(set(item) - _RULE_KEYS)
        if unknown:
            raise RuleError(
                f"{item_key}.{unknown[0]}", f"unknown key; allowed: {', '.join(sorted(_RULE_KEYS))}"
            )
        name = _optional_text(item_key, item, "name") or f"rule-{index}"
        rules.append(
            MessageRule(
                name=name,
                label=_optional_text(item_key, item, "label") or "message",
                queue=_optional_text(item_key, item, "queue"),
                routing_key=_optional_text(item_key, item, "routing_key"),
                order_id=None
                if item.get("order_id") is None
                else _parse_source(f"{item_key}.order_id", item["order_id"]),
                status=None
                if item.get("status") is None
                else _parse_source(f"{item_key}.status", item["status"]),
            )
        )
    return MessageRules(rules)


# ── x-death ──────────────────────────────────────────────────────────────────────────────────


def _text(value: object) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, str):
        return value
    return None


def _seconds(value: object) -> float | None:
    if isinstance(value, datetime.datetime):
        # AMQP timestamps are UTC seconds; the client may hand back a naive datetime.
        aware = value if value.tzinfo is not None else value.replace(tzinfo=datetime.UTC)
        return aware.timestamp()
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def _one_death(index: int, entry: object) -> XDeath:
    if not isinstance(entry, Mapping):
        raise DeadLetterError("malformed", f"x-death[{index}] is not a table")
    queue = _text(entry.get("queue"))
    reason = _text(entry.get("reason"))
    if not queue or not reason:
        raise DeadLetterError("malformed", f"x-death[{index}] has no queue or reason")
    count = entry.get("count", 1)
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise DeadLetterError("malformed", f"x-death[{index}].count is not a count")
    keys_raw = entry.get("routing-keys", ())
    keys = (
        tuple(t for t in (_text(k) for k in keys_raw) if t is not None)
        if isinstance(keys_raw, list | tuple)
        else ()
    )
    return XDeath(
        queue=queue,
        reason=reason,
        count=count,
        exchange=_text(entry.get("exchange")) or "",
        routing_keys=keys,
        time=_seconds(entry.get("time")),
        original_expiration=_text(entry.get("original-expiration")),
    )


def parse_x_death(headers: Mapping[str, object]) -> tuple[XDeath, ...]:
    """The ``x-death`` entries of a dead letter, most recent first (the broker's order).

    Raises:
        DeadLetterError: ``kind`` ``missing`` when there is no ``x-death`` header (the message
            was published to the dead-letter queue directly), ``malformed`` when it is not a
            list of tables with a queue and a reason.
    """
    raw = headers.get("x-death")
    if raw is None:
        raise DeadLetterError("missing", "the message has no x-death header")
    if not isinstance(raw, list | tuple) or not raw:
        raise DeadLetterError("malformed", "x-death is not a non-empty list")
    return tuple(_one_death(index, entry) for index, entry in enumerate(raw))


def _duration(milliseconds: str) -> str:
    try:
        ms = int(milliseconds)
    except ValueError:
        return f"{milliseconds} ms"
    if ms % 1000 == 0:
        return f"{ms // 1000} s"
    return f"{ms / 1000:g} s" if ms >= 1000 else f"{ms} ms"


def cause_in_words(label: str, death: XDeath) -> str:
    """The cause as an operator reads it: "price request expired in mes.price.requests after 30 s"."""
    queue = death.queue
    if death.reason == "expired":
        after = (
            f" after {_duration(death.original_expiration)}" if death.original_expiration else " (queue TTL)"
        )
        text = f"{label} expired in {queue}{after}"
    elif death.reason == "rejected":
        text = f"{label} rejected by a consumer of {queue}"
    elif death.reason == "maxlen":
        text = f"{label} dropped from {queue}: the queue was full"
    elif death.reason == "delivery_limit":
        text = f"{label} given up in {queue}: delivery limit reached"
    else:
        text = f"{label} dead-lettered from {queue} ({death.reason})"
    return text if death.count <= 1 else f"{text} ({death.count} times)"


# ── facts ────────────────────────────────────────────────────────────────────────────────────


def _scalar(value: object) -> str | None:
    """Only short scalars become facts; objects, arrays and long strings are never read out."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, bytes):
        text = value.decode("utf-8", errors="replace")
    elif isinstance(value, str):
        text = value
    elif isinstance(value, int | float):
        text = str(value)
    else:
        return None
    return text if text and len(text) <= MAX_VALUE_LENGTH else None


class _Body:
    """The body parsed at most once, and only when a rule reads it."""

    __slots__ = ("_body", "_doc", "_parsed", "is_json")

    def __init__(self, body: bytes) -> None:
        self._body = body
        self._doc: object = None
        self._parsed = False
        self.is_json = True

    def document(self) -> object:
        if not self._parsed:
            self._parsed = True
            try:
                self._doc = json.loads(self._body)
            except (ValueError, UnicodeDecodeError):
                self.is_json = False
        return self._doc


def _read(source: MessageSource | None, message: Message, routing_key: str, body: _Body) -> str | None:
    if source is None:
        return None
    kind = source.kind
    if kind is MessageSourceKind.BODY:
        return _scalar(read_pointer(body.document(), source.pointer))
    if kind is MessageSourceKind.HEADER:
        return _scalar(message.headers.get(source.name))
    if kind is MessageSourceKind.ROUTING_KEY:
        return _scalar(routing_key)
    if kind is MessageSourceKind.MESSAGE_ID:
        return _scalar(message.message_id)
    if kind is MessageSourceKind.CORRELATION_ID:
        return _scalar(message.correlation_id)
    return source.value


def message_facts(rules: MessageRules, message: Message, deaths: Sequence[XDeath]) -> MessageFacts:
    """Order id and status of a dead letter, by the first rule that covers where it died.

    The queue and routing key are those of the first (most recent) ``x-death`` entry; without
    one, the message's own routing key and no queue.
    """
    queue = deaths[0].queue if deaths else ""
    routing_key = deaths[0].routing_key if deaths and deaths[0].routing_keys else message.routing_key
    rule = rules.match(queue, routing_key)
    if rule is None:
        return MessageFacts(order_id=None, status=None, rule=None)
    body = _Body(message.body)
    return MessageFacts(
        order_id=_read(rule.order_id, message, routing_key, body),
        status=_read(rule.status, message, routing_key, body),
        rule=rule,
        body_is_json=body.is_json,
    )


def held_key(message: Message, deaths: Sequence[XDeath]) -> str:
    """A stable key for one dead letter, so a redelivered copy overwrites rather than duplicates.

    From what the broker keeps across a redelivery: the body, the message id, the routing key
    and the first death's queue, reason, count and time.
    """
    digest = hashlib.sha256()
    digest.update(message.body)
    first = deaths[0] if deaths else None
    parts = (
        message.message_id or "",
        message.routing_key,
        first.queue if first else "",
        first.reason if first else "",
        str(first.count) if first else "",
        repr(first.time) if first else "",
    )
    digest.update(b"\x00" + "\x00".join(parts).encode("utf-8", errors="replace"))
    return digest.hexdigest()[:32]
