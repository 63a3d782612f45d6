"""The pure steps of one request, shared by the handler, the WebSocket relay and ``explain``.

docs/architecture.md, "How one request flows": step 1 (refuse what a gateway must refuse),
step 3's rule for reading the body, and step 4's user-id pseudonym and SERVER-span attributes.
Plain values in, plain values out: ``proxy.py`` runs them on a live request, ``explain.py`` on
a sample one, so the two cannot drift apart.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from typing import Final

from opentelemetry.util.types import AttributeValue

from mes_trace_proxy.core import attributes as A
from mes_trace_proxy.core.extract import OrderFacts, is_json_content_type
from mes_trace_proxy.core.forwarding import Headers, check_header_values, check_host_headers, check_target
from mes_trace_proxy.core.framing import UnderscorePolicy, check_framing
from mes_trace_proxy.core.problems import ClientRejection, Rejection, rejection
from mes_trace_proxy.core.redact import Redactor, pseudonymize, user_id_from_headers
from mes_trace_proxy.core.rules import RouteMatch

__all__ = [
    "BodyReading",
    "body_reading",
    "connection_attributes",
    "refusal",
    "span_attributes",
    "user_pseudonym",
]

_TOO_LARGE: Final = rejection(ClientRejection.PAYLOAD_TOO_LARGE)
# Semantic conventions, HTTP spans: ``http.request.header.<key>``, lower-case, values as an array.
_HEADER_ATTRIBUTE_PREFIX: Final = "http.request.header."


def refusal(
    method: str,
    target: str,
    headers: Headers,
    values: Iterable[str],
    *,
    chunked: bool,
    underscore: UnderscorePolicy,
    content_length: int | None,
    max_body_size: int | None,
) -> Rejection | None:
    """What a gateway must refuse before anything goes upstream, or ``None``.

    Args:
        method: the request method.
        target: the raw request target.
        headers: the request's fields in received order.
        values: their values (a multidict's ``values()`` view, read without a copy).
        chunked: the body is framed by ``Transfer-Encoding: chunked``.
        underscore: the listener's policy for field names with ``_``.
        content_length: the declared body length, if any.
        max_body_size: the listener's ``limits.max_body_size`` (``None``: no limit).

    Returns:
        The first of: a target that is not origin-form or escapes the path, ambiguous Host
        fields, values that cannot be forwarded unchanged, framing MES could read otherwise
        or names with ``_`` the policy refuses (``framing.check_framing``: answer these, then
        close the connection, see ``framing.closes_connection``), a declared body over the limit.
    """
    found = (
        check_target(method, target)
        or check_host_headers(headers)
        or check_header_values(values)
        or check_framing(headers, chunked=chunked, policy=underscore)
    )
    if found is not None:
        return found
    if max_body_size is not None and content_length is not None and content_length > max_body_size:
        return _TOO_LARGE
    return None


class BodyReading(enum.Enum):
    """How a request body goes upstream; the value says why, for ``explain``."""

    NO_BODY = "the request has no body"
    NO_RULE = "no rule matches the request, so nothing is read from its body"
    RULE_IGNORES_BODY = "the matched rule reads nothing from the request body"
    NOT_JSON = (
        "the request's Content-Type is not JSON (application/json or application/*+json),"
        " and only JSON bodies are read"
    )
    TOO_LARGE = "the declared body length is over inspect_body_limit, so it streams unread"
    READ = "read whole (its length is declared and within inspect_body_limit), then forwarded"
    READ_UP_TO_LIMIT = "chunked: read up to inspect_body_limit; inspected only if it ends within it"

    @property
    def inspected(self) -> bool:
        """Whether the body is (or may be) read and inspected."""
        return self is BodyReading.READ or self is BodyReading.READ_UP_TO_LIMIT


def body_reading(
    match: RouteMatch | None,
    *,
    has_body: bool,
    content_type: str | None,
    content_length: int | None,
    limit: int,
) -> BodyReading:
    """Whether the body is read for inspection (step 3): only when a rule reads it and it is small JSON.

    Args:
        match: the matched rule, if any.
        has_body: whether the request has a body at all.
        content_type: the request's ``Content-Type``.
        content_length: the declared length (``None``: chunked).
        limit: the listener's ``inspect_body_limit``.
    """
    if not has_body:
        return BodyReading.NO_BODY
    if match is None:
        return BodyReading.NO_RULE
    if not match.rule.needs_request_body:
        return BodyReading.RULE_IGNORES_BODY
    if not is_json_content_type(content_type):
        return BodyReading.NOT_JSON
    if content_length is None:
        return BodyReading.READ_UP_TO_LIMIT
    if content_length > limit:
        return BodyReading.TOO_LARGE
    return BodyReading.READ


def user_pseudonym(
    key: bytes | None, header_name: str, headers: Mapping[str, str] | Iterable[tuple[str, str]]
) -> str | None:
    """``enduser.id``: the keyed pseudonym of the caller's user id, only when a key is configured."""
    if key is None:
        return None
    user_id = user_id_from_headers(headers, header_name=header_name)
    return pseudonymize(key, user_id) if user_id else None


def span_attributes(
    *,
    method: str,
    path: str,
    query: str,
    match: RouteMatch | None,
    listener: str,
    facts: OrderFacts,
    redactor: Redactor,
    user: str | None,
) -> dict[str, AttributeValue]:
    """The SERVER span's request attributes (step 4), every value from the request redacted."""
    return A.request_attributes(
        method=method,
        path=path,
        query=query,
        route=match.rule.route if match is not None else None,
        rule_name=match.rule.name if match is not None else None,
        listener=listener,
        facts=facts,
        redactor=redactor,
        user_pseudonym=user,
    )


def connection_attributes(
    attrs: dict[str, AttributeValue],
    redactor: Redactor,
    *,
    host: str | None,
    peer: str | None,
    headers: Iterable[tuple[str, str]],
) -> None:
    """Add what the connection says (``server.*``, ``client.*``) and the allow-listed headers to ``attrs``."""
    if host:
        name, sep, port = host.rpartition(":")
        if sep and port.isdigit() and not host.endswith("]"):
            attrs[A.SERVER_ADDRESS] = redactor.value(name.strip("[]"))
            attrs[A.SERVER_PORT] = int(port)
        else:
            attrs[A.SERVER_ADDRESS] = redactor.value(host.strip("[]"))
    if peer:
        attrs[A.CLIENT_ADDRESS] = peer
        attrs[A.NETWORK_PEER_ADDRESS] = peer
    # Only allow-listed headers are recorded (privacy.header_allow), values scrubbed.
    for name, values in redactor.headers(headers).items():
        if name == "user-agent":
            attrs[A.USER_AGENT_ORIGINAL] = values[0][:256]
        else:
            attrs[f"{_HEADER_ATTRIBUTE_PREFIX}{name}"] = values
