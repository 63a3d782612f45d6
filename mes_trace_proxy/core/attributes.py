"""Span attribute keys and span names: OpenTelemetry's stable HTTP names, and ours under ``mes.order.*``.

Keys come from ``opentelemetry.semconv`` imports, never from string literals, except our own
which are defined here once.
"""

from __future__ import annotations

from typing import Final

from opentelemetry.semconv._incubating.attributes.enduser_attributes import ENDUSER_ID
from opentelemetry.semconv._incubating.attributes.http_attributes import (
    HTTP_REQUEST_BODY_SIZE,
    HTTP_RESPONSE_BODY_SIZE,
)
from opentelemetry.semconv.attributes.client_attributes import CLIENT_ADDRESS
from opentelemetry.semconv.attributes.error_attributes import ERROR_TYPE
from opentelemetry.semconv.attributes.http_attributes import (
    HTTP_REQUEST_METHOD,
    HTTP_REQUEST_METHOD_ORIGINAL,
    HTTP_RESPONSE_STATUS_CODE,
    HTTP_ROUTE,
)
from opentelemetry.semconv.attributes.network_attributes import (
    NETWORK_PEER_ADDRESS,
    NETWORK_PROTOCOL_VERSION,
)
from opentelemetry.semconv.attributes.server_attributes import SERVER_ADDRESS, SERVER_PORT
from opentelemetry.semconv.attributes.url_attributes import URL_FULL, URL_PATH, URL_QUERY, URL_SCHEME
from opentelemetry.semconv.attributes.user_agent_attributes import USER_AGENT_ORIGINAL
from opentelemetry.util.types import AttributeValue

from mes_trace_proxy.core.extract import OrderFacts
from mes_trace_proxy.core.redact import Redactor

__all__ = [
    "CLIENT_ADDRESS",
    "ENDUSER_ID",
    "ERROR_TYPE",
    "EVENT_ANOMALY",
    "EVENT_STATUS_CHANGE",
    "HTTP_REQUEST_BODY_SIZE",
    "HTTP_REQUEST_METHOD",
    "HTTP_REQUEST_METHOD_ORIGINAL",
    "HTTP_RESPONSE_BODY_SIZE",
    "HTTP_RESPONSE_STATUS_CODE",
    "HTTP_ROUTE",
    "MES_LINK_KIND",
    "MES_LISTENER",
    "MES_ORDER_ANOMALY",
    "MES_ORDER_DWELL",
    "MES_ORDER_DWELL_LIMIT",
    "MES_ORDER_ID",
    "MES_ORDER_STATUS",
    "MES_ORDER_STATUS_OBSERVED",
    "MES_ORDER_STATUS_PREVIOUS",
    "MES_ORDER_TRANSITION",
    "MES_RULE",
    "NETWORK_PEER_ADDRESS",
    "NETWORK_PROTOCOL_VERSION",
    "SERVER_ADDRESS",
    "SERVER_PORT",
    "SPAN_ORDER_STUCK",
    "URL_FULL",
    "URL_PATH",
    "URL_QUERY",
    "URL_SCHEME",
    "USER_AGENT_ORIGINAL",
    "method_attribute",
    "request_attributes",
    "span_name",
]

MES_ORDER_ID: Final = "mes.order.id"
#: the status the call sets
MES_ORDER_STATUS: Final = "mes.order.status"
#: the status MES reported in its response
MES_ORDER_STATUS_OBSERVED: Final = "mes.order.status.observed"
MES_ORDER_STATUS_PREVIOUS: Final = "mes.order.status.previous"
#: the lifecycle's verdict on the move: forward, skip, backward, cancel, …
MES_ORDER_TRANSITION: Final = "mes.order.transition"
MES_ORDER_ANOMALY: Final = "mes.order.anomaly"
MES_RULE: Final = "mes.rule"
MES_LISTENER: Final = "mes.proxy.listener"
#: seconds (double) the order has been in its status, on the watchdog's stuck span
MES_ORDER_DWELL: Final = "mes.order.dwell"
#: the status's dwell limit in seconds (double), on the watchdog's stuck span
MES_ORDER_DWELL_LIMIT: Final = "mes.order.dwell_limit"
#: on a span link: why it links (``order.first_span``, ``order.transition``)
MES_LINK_KIND: Final = "mes.link.kind"

SPAN_ORDER_STUCK: Final = "mes.order.stuck"
EVENT_STATUS_CHANGE: Final = "mes.order.status_change"
EVENT_ANOMALY: Final = "mes.order.anomaly"

# Semantic conventions, HTTP spans §"HTTP request method": these are recorded as sent; any
# other method becomes "_OTHER" with the original in http.request.method_original.
KNOWN_METHODS: Final = frozenset(
    {"CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "TRACE"}
)


def method_attribute(method: str) -> str:
    """The value for ``http.request.method``: the method, or ``_OTHER`` when not a known one."""
    return method if method in KNOWN_METHODS else "_OTHER"


def span_name(method: str, route: str | None) -> str:
    """``{method} {route}``, or just the method when no rule matched (semconv: no raw paths).

    Unknown methods are named ``HTTP`` so a client cannot inflate span-name cardinality.
    """
    name = method if method in KNOWN_METHODS else "HTTP"
    return f"{name} {route}" if route else name


def request_attributes(
    *,
    method: str,
    path: str,
    query: str,
    route: str | None,
    rule_name: str | None,
    listener: str,
    facts: OrderFacts,
    redactor: Redactor,
    user_pseudonym: str | None,
) -> dict[str, AttributeValue]:
    """The SERVER span's request attributes that depend only on the request line and the rule.

    Every value that came from the request passes the redactor. The shell adds the
    connection facts (addresses, scheme, protocol version, user agent).

    Args:
        method: the request method as received.
        path: the raw path (no query).
        query: the raw query string (no ``?``).
        route: the matched rule's route template, if any.
        rule_name: the matched rule's name, if any.
        listener: the listener's name.
        facts: the order facts read from the request.
        redactor: the privacy redactor.
        user_pseudonym: the keyed pseudonym of the caller, if a key is configured.

    Returns:
        A fresh attribute dict.
    """
    method_value = method_attribute(method)
    attrs: dict[str, AttributeValue] = {
        HTTP_REQUEST_METHOD: method_value,
        URL_PATH: redactor.path(path),
        MES_LISTENER: listener,
    }
    if method_value == "_OTHER":
        attrs[HTTP_REQUEST_METHOD_ORIGINAL] = redactor.value(method[:32])
    if route is not None:
        attrs[HTTP_ROUTE] = route
    if rule_name is not None:
        attrs[MES_RULE] = rule_name
    if query:
        kept = redactor.query(query)
        if kept:
            attrs[URL_QUERY] = kept
    if user_pseudonym is not None:
        attrs[ENDUSER_ID] = user_pseudonym
    if facts.order_id is not None:
        attrs[MES_ORDER_ID] = redactor.value(facts.order_id)
    if facts.status is not None:
        attrs[MES_ORDER_STATUS] = redactor.value(facts.status)
    return attrs
