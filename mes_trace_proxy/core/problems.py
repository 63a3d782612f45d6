"""RFC 9457 problem+json answers the proxy itself gives: upstream failures and client rejections.

Every title and detail comes from the tables below, never from an exception message, so no
traceback, host name or personal data from a request can leak into an answer.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final, TypeAlias

__all__ = [
    "CLIENT_REJECTIONS",
    "PROBLEM_CONTENT_TYPE",
    "PROBLEM_TYPE_PREFIX",
    "UPSTREAM_FAILURES",
    "ClientRejection",
    "HeaderTuple",
    "ProblemSpec",
    "Rejection",
    "UpstreamFailure",
    "failure_response",
    "problem_body",
    "problem_fields",
    "problem_type_uri",
    "rejection",
    "rejection_response",
]

HeaderTuple: TypeAlias = tuple[tuple[str, str], ...]

# RFC 9457 §3: the media type that marks a body as a problem details object.
PROBLEM_CONTENT_TYPE: Final = "application/problem+json"

# RFC 9457 §3.1.1: "type" is a URI reference; a relative one would be resolved against the
# MES URL the client called and so look like a MES document. An absolute URN names our
# problems without pretending they can be dereferenced; consumers compare it as an opaque
# string (§3.1.1 says they SHOULD NOT dereference it automatically). The NID is not
# IANA-registered (RFC 8141 §5.1): change this prefix if your organisation has one.
PROBLEM_TYPE_PREFIX: Final = "urn:mes-trace-proxy:problem:"

# RFC 9457 §3 defines problem details for error answers; we never make one for 1xx-3xx.
_MIN_PROBLEM_STATUS: Final = 400
_MAX_PROBLEM_STATUS: Final = 599

# RFC 9457 §3.2 allows extension members; the trace id lets an operator find the spans.
_TRACE_ID_MEMBER: Final = "trace_id"


def problem_type_uri(slug: str) -> str:
    """Return the RFC 9457 ``type`` URI for one of our problem slugs.

    Args:
        slug: the stable, low-cardinality name (also the span's ``error.type``).

    Returns:
        ``urn:mes-trace-proxy:problem:<slug>``.
    """
    return PROBLEM_TYPE_PREFIX + slug


@dataclass(frozen=True, slots=True, kw_only=True)
class ProblemSpec:
    """One row of a problem table: the fixed answer for one kind of failure."""

    status: int
    slug: str
    title: str
    detail: str

    @property
    def type_uri(self) -> str:
        """The RFC 9457 §3.1.1 ``type`` member for this row."""
        return problem_type_uri(self.slug)


@dataclass(frozen=True, slots=True, kw_only=True)
class Rejection:
    """A request the proxy refuses itself, before anything is sent upstream.

    ``headers`` carries fields the answer must have, such as ``Allow`` on a 405
    (RFC 9110 §15.5.6).
    """

    status: int
    problem_type: str
    title: str
    detail: str
    headers: HeaderTuple = ()

    @property
    def slug(self) -> str:
        """The problem's slug: the span's ``error.type`` and the metric label (``payload_too_large``)."""
        return self.problem_type.removeprefix(PROBLEM_TYPE_PREFIX)


def problem_body(
    *,
    status: int,
    title: str,
    detail: str,
    type_: str,
    instance: str | None = None,
    trace_id: str | None = None,
) -> bytes:
    """Encode an RFC 9457 problem details object as compact UTF-8 JSON.

    Members appear in the order ``type``, ``title``, ``status``, ``detail``, then
    ``instance`` and ``trace_id`` only when given.

    Args:
        status: the HTTP status code, repeated in the body as RFC 9457 §3.1.2 advises.
        title: the short summary; §3.1.3 says it stays the same for every occurrence.
        detail: the occurrence's explanation (§3.1.4); pass a table text, never an
            exception message.
        type_: the problem type URI (§3.1.1).
        instance: a URI for this occurrence (§3.1.5); never the raw request URI, whose
            query may carry personal data.
        trace_id: the W3C trace id of the request, as an extension member (§3.2).

    Returns:
        The JSON document as bytes.

    Raises:
        ValueError: if ``status`` is not a 4xx or 5xx code, or ``type_`` is empty.
    """
    if not _MIN_PROBLEM_STATUS <= status <= _MAX_PROBLEM_STATUS:
        raise ValueError(f"problem details are for 4xx/5xx answers, not {status}")
    if not type_:
        raise ValueError("a problem type URI is required")
    doc: dict[str, str | int] = {"type": type_, "title": title, "status": status, "detail": detail}
    if instance is not None:
        doc["instance"] = instance
    if trace_id is not None:
        doc[_TRACE_ID_MEMBER] = trace_id
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


class UpstreamFailure(enum.Enum):
    """Why the upstream gave no usable answer; the value is the span's ``error.type``."""

    CONNECT_REFUSED = "upstream_connect_refused"
    CONNECT_TIMEOUT = "upstream_connect_timeout"
    DNS_FAILURE = "upstream_dns_failure"
    READ_TIMEOUT = "upstream_read_timeout"
    TOTAL_TIMEOUT = "upstream_total_timeout"
    DISCONNECTED = "upstream_disconnected"
    INVALID_RESPONSE = "upstream_invalid_response"
    TLS_ERROR = "upstream_tls_error"
    PAYLOAD_ERROR = "upstream_payload_error"


def _upstream(failure: UpstreamFailure, status: int, title: str, detail: str) -> ProblemSpec:
    return ProblemSpec(status=status, slug=failure.value, title=title, detail=detail)


# RFC 9110 §15.6.3: 502 when the upstream's answer (or lack of one) was invalid;
# §15.6.5: 504 when it did not answer in time. Details name no host: the upstream's
# address is internal topology the caller has no need for.
UPSTREAM_FAILURES: Final[Mapping[UpstreamFailure, ProblemSpec]] = MappingProxyType(
    {
        f: _upstream(f, status, title, detail)
        for f, status, title, detail in (
            (
                UpstreamFailure.CONNECT_REFUSED,
                502,
                "Upstream connection refused",
                "The upstream service refused the connection.",
            ),
            (
                UpstreamFailure.CONNECT_TIMEOUT,
                504,
                "Upstream connection timed out",
                "The upstream service did not accept a connection in time.",
            ),
            (
                UpstreamFailure.DNS_FAILURE,
                502,
                "Upstream name not resolved",
                "The upstream service's host name could not be resolved.",
            ),
            (
                UpstreamFailure.READ_TIMEOUT,
                504,
                "Upstream read timed out",
                "The upstream service stopped sending data for longer than the read timeout.",
            ),
            (
                UpstreamFailure.TOTAL_TIMEOUT,
                504,
                "Upstream request timed out",
                "The upstream service did not complete its answer within the total timeout.",
            ),
            (
                UpstreamFailure.DISCONNECTED,
                502,
                "Upstream connection lost",
                "The upstream service closed or reset the connection before answering.",
            ),
            (
                UpstreamFailure.INVALID_RESPONSE,
                502,
                "Invalid upstream response",
                "The upstream service sent an answer that is not valid HTTP.",
            ),
            (
                UpstreamFailure.TLS_ERROR,
                502,
                "Upstream TLS failure",
                "The TLS handshake with the upstream service failed.",
            ),
            (
                UpstreamFailure.PAYLOAD_ERROR,
                502,
                "Upstream body incomplete",
                "The upstream service's answer body ended early or was malformed.",
            ),
        )
    }
)


def failure_response(
    failure: UpstreamFailure, *, trace_id: str | None, instance: str | None = None
) -> tuple[int, bytes]:
    """Build the answer for an upstream failure from its table row.

    Args:
        failure: the classified failure (``proxy.py`` maps aiohttp exceptions onto it).
        trace_id: the request's trace id, or ``None`` when the request is not traced.
        instance: an optional RFC 9457 §3.1.5 occurrence URI.

    Returns:
        ``(status, body)``; send the body with ``Content-Type: application/problem+json``.
    """
    spec = UPSTREAM_FAILURES[failure]
    return spec.status, problem_body(
        status=spec.status,
        title=spec.title,
        detail=spec.detail,
        type_=spec.type_uri,
        instance=instance,
        trace_id=trace_id,
    )


class ClientRejection(enum.Enum):
    """Why the proxy refuses a request itself; the value is the problem slug."""

    BAD_REQUEST_TARGET = "bad_request_target"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    HEADERS_TOO_LARGE = "headers_too_large"
    URI_TOO_LONG = "uri_too_long"
    BAD_REQUEST = "bad_request"
    SERVICE_UNAVAILABLE = "service_unavailable"
    REQUEST_TIMEOUT = "request_timeout"


def _client(kind: ClientRejection, status: int, title: str, detail: str) -> ProblemSpec:
    return ProblemSpec(status=status, slug=kind.value, title=title, detail=detail)


# Status codes per RFC 9110 §15.5 (4xx, 408 in §15.5.9) and §15.6.4 (503) and RFC 6585 §5 (431). The
# details are defaults; forwarding.py picks a more precise fixed text for target checks.
CLIENT_REJECTIONS: Final[Mapping[ClientRejection, ProblemSpec]] = MappingProxyType(
    {
        k: _client(k, status, title, detail)
        for k, status, title, detail in (
            (
                ClientRejection.BAD_REQUEST_TARGET,
                400,
                "Request target not accepted",
                "This proxy only forwards origin-form request targets to its configured upstream.",
            ),
            (
                ClientRejection.METHOD_NOT_ALLOWED,
                405,
                "Method not allowed",
                "This proxy does not accept this method.",
            ),
            (
                ClientRejection.PAYLOAD_TOO_LARGE,
                413,
                "Request body too large",
                "The request body is larger than this proxy accepts.",
            ),
            (
                ClientRejection.HEADERS_TOO_LARGE,
                431,
                "Request header fields too large",
                "The request header section is larger than this proxy accepts.",
            ),
            (
                ClientRejection.URI_TOO_LONG,
                414,
                "Request target too long",
                "The request target is longer than this proxy accepts.",
            ),
            (
                ClientRejection.BAD_REQUEST,
                400,
                "Bad request",
                "The request is not valid HTTP.",
            ),
            (
                ClientRejection.SERVICE_UNAVAILABLE,
                503,
                "Service unavailable",
                "This proxy is shutting down and accepts no new requests; retry on another instance.",
            ),
            (
                ClientRejection.REQUEST_TIMEOUT,
                408,
                "Request timeout",
                "The request header section did not arrive in time.",
            ),
        )
    }
)


def rejection(kind: ClientRejection, *, detail: str | None = None, headers: HeaderTuple = ()) -> Rejection:
    """Build a :class:`Rejection` from its table row.

    Args:
        kind: the row.
        detail: a fixed, more precise text than the row's default; never a value taken
            from the request.
        headers: fields the answer must carry (``Allow`` for 405, ``Retry-After``...).

    Returns:
        The rejection, with the row's status, type URI and title.
    """
    spec = CLIENT_REJECTIONS[kind]
    return Rejection(
        status=spec.status,
        problem_type=spec.type_uri,
        title=spec.title,
        detail=spec.detail if detail is None else detail,
        headers=headers,
    )


def problem_fields(rej: Rejection) -> list[tuple[str, str]]:
    """The header fields of a rejection's answer: the problem media type, then ``rej.headers``."""
    return [("Content-Type", PROBLEM_CONTENT_TYPE), *rej.headers]


def rejection_response(
    rej: Rejection, *, trace_id: str | None, instance: str | None = None
) -> tuple[int, bytes]:
    """Build the problem+json answer for a rejection.

    Args:
        rej: the rejection, from :func:`rejection` or ``forwarding.check_target``.
        trace_id: the request's trace id, or ``None``.
        instance: an optional RFC 9457 §3.1.5 occurrence URI.

    Returns:
        ``(status, body)``; also send ``rej.headers``.
    """
    return rej.status, problem_body(
        status=rej.status,
        title=rej.title,
        detail=rej.detail,
        type_=rej.problem_type,
        instance=instance,
        trace_id=trace_id,
    )
