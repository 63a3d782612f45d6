"""``mes-trace-proxy explain-message``: what the proxy would make of one dead letter, with no broker.

Pure: a body, headers (``x-death`` given as JSON, as ``rabbitmqadmin get`` or the management
UI shows it), routing key and ids in; a report out — the rule that matched, the order id and
status, the cause in words, the ``dead_letter`` object, the problem (if any) and the span
attributes after redaction.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Final

from mes_trace_proxy.messages.deadletter import Message, MessageRules
from mes_trace_proxy.messages.record import hold

__all__ = ["explain_message", "format_report", "parse_headers"]

#: An explained message was "received" at this time: reports are the same on every run.
EXPLAIN_TIME: Final = 0.0


def parse_headers(pairs: list[str], x_death_json: str | None) -> dict[str, object]:
    """``NAME:VALUE`` pairs and an optional ``x-death`` JSON list into AMQP headers.

    Raises:
        ValueError: a pair without ``:`` or ``x-death`` that is not a JSON list.
    """
    headers: dict[str, object] = {}
    for pair in pairs:
        name, sep, value = pair.partition(":")
        if not sep or not name.strip():
            raise ValueError(f"header {pair!r}: expected NAME:VALUE")
        headers[name.strip()] = value.strip()
    if x_death_json is not None:
        try:
            deaths = json.loads(x_death_json)
        except ValueError as exc:
            raise ValueError(f"x-death: not JSON ({exc})") from None
        if not isinstance(deaths, list):
            raise ValueError("x-death: expected a JSON list of tables")
        headers["x-death"] = deaths
    return headers


def explain_message(
    rules: MessageRules,
    message: Message,
    *,
    consumed_from: str,
    redact: Callable[[str], str],
) -> dict[str, object]:
    """The report for one message (see the module docstring)."""
    properties = {"message_id": message.message_id} if message.message_id else {}
    held = hold(message, properties, consumed_from=consumed_from, rules=rules, now=EXPLAIN_TIME)
    death = held.death
    attributes: dict[str, object] = {
        "messaging.system": "rabbitmq",
        "messaging.destination.name": consumed_from,
        "messaging.message.body.size": len(message.body),
    }
    if message.message_id:
        attributes["messaging.message.id"] = redact(message.message_id)
    if held.order_id is not None:
        attributes["mes.order.id"] = redact(held.order_id)
    if held.status is not None:
        attributes["mes.order.status"] = redact(held.status)
    if death is not None:
        attributes["messaging.rabbitmq.destination.routing_key"] = redact(death.routing_key)
        attributes["mes.message.death.reason"] = death.reason
        attributes["mes.message.death.queue"] = death.queue
        attributes["mes.message.death.count"] = death.count
    report: dict[str, object] = {
        "rule": held.rule,
        "order_id": held.order_id,
        "status": held.status,
        "cause": held.cause,
        "problem": held.problem,
        # The time only when x-death has one (the explained message was never received).
        "dead_letter": held.dead_letter_object()
        | ({} if death is not None and death.time else {"time": None}),
        "span": {"name": f"receive {consumed_from}", "attributes": attributes},
    }
    return report


def format_report(report: Mapping[str, object]) -> str:
    """The report as indented JSON, for the terminal."""
    return json.dumps(report, indent=2, sort_keys=False, default=str)
