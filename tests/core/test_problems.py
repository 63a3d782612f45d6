"""Tests for problems: RFC 9457 bodies and the upstream-failure and client-rejection tables."""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

import pytest

from mes_trace_proxy.core.problems import (
    CLIENT_REJECTIONS,
    PROBLEM_CONTENT_TYPE,
    PROBLEM_TYPE_PREFIX,
    UPSTREAM_FAILURES,
    ClientRejection,
    Rejection,
    UpstreamFailure,
    failure_response,
    problem_body,
    problem_type_uri,
    rejection,
    rejection_response,
)

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"

# Text that only an exception message, a traceback or an address would bring into a body.
_LEAK = re.compile(r"Traceback|Errno|Exception|Error\b|File \"|0x[0-9a-f]+|://|\d+\.\d+\.\d+\.\d+|@")


def _doc(body: bytes) -> dict[str, Any]:
    doc = json.loads(body)
    assert isinstance(doc, dict)
    return doc


def test_content_type_is_problem_json() -> None:
    """The media type is the one RFC 9457 §3 registers."""
    assert PROBLEM_CONTENT_TYPE == "application/problem+json"


@pytest.mark.parametrize(
    ("failure", "status", "error_type"),
    [
        (UpstreamFailure.CONNECT_REFUSED, 502, "upstream_connect_refused"),
        (UpstreamFailure.CONNECT_TIMEOUT, 504, "upstream_connect_timeout"),
        (UpstreamFailure.DNS_FAILURE, 502, "upstream_dns_failure"),
        (UpstreamFailure.READ_TIMEOUT, 504, "upstream_read_timeout"),
        (UpstreamFailure.TOTAL_TIMEOUT, 504, "upstream_total_timeout"),
        (UpstreamFailure.DISCONNECTED, 502, "upstream_disconnected"),
        (UpstreamFailure.INVALID_RESPONSE, 502, "upstream_invalid_response"),
        (UpstreamFailure.TLS_ERROR, 502, "upstream_tls_error"),
        (UpstreamFailure.PAYLOAD_ERROR, 502, "upstream_payload_error"),
    ],
    ids=lambda v: v.name if isinstance(v, UpstreamFailure) else None,
)
def test_failure_response_status_type_and_keys(
    failure: UpstreamFailure, status: int, error_type: str
) -> None:
    """Each upstream failure answers its table status with exactly the RFC 9457 members and our trace id."""
    got_status, body = failure_response(failure, trace_id=TRACE_ID)
    doc = _doc(body)
    assert got_status == status
    assert failure.value == error_type
    assert list(doc) == ["type", "title", "status", "detail", "trace_id"]
    assert doc["type"] == f"urn:mes-trace-proxy:problem:{error_type}"
    assert doc["status"] == status
    assert type(doc["status"]) is int
    assert doc["title"] == UPSTREAM_FAILURES[failure].title
    assert doc["detail"] == UPSTREAM_FAILURES[failure].detail
    assert doc["trace_id"] == TRACE_ID


def test_every_failure_has_a_row() -> None:
    """The table covers the whole enum, so proxy.py can never hit a KeyError."""
    assert set(UPSTREAM_FAILURES) == set(UpstreamFailure)
    assert set(CLIENT_REJECTIONS) == set(ClientRejection)


@pytest.mark.parametrize(
    "text",
    [pytest.param(spec.title, id=f"{f.name}-title") for f, spec in UPSTREAM_FAILURES.items()]
    + [pytest.param(spec.detail, id=f"{f.name}-detail") for f, spec in UPSTREAM_FAILURES.items()]
    + [pytest.param(spec.title, id=f"{k.name}-title") for k, spec in CLIENT_REJECTIONS.items()]
    + [pytest.param(spec.detail, id=f"{k.name}-detail") for k, spec in CLIENT_REJECTIONS.items()],
)
def test_table_texts_carry_no_exception_text_or_address(text: str) -> None:
    """Titles and details are plain sentences: no traceback, errno, repr, URL, IP or e-mail."""
    assert text
    assert not _LEAK.search(text)


def test_failure_body_depends_only_on_the_table() -> None:
    """Two occurrences of one failure give byte-identical bodies apart from the trace id."""
    _, first = failure_response(UpstreamFailure.DISCONNECTED, trace_id=None)
    _, second = failure_response(UpstreamFailure.DISCONNECTED, trace_id=None)
    assert first == second
    assert "trace_id" not in _doc(first)


def test_problem_body_is_compact_json() -> None:
    """The body has no insignificant whitespace between members."""
    body = problem_body(status=400, title="T", detail="D", type_="urn:x", instance="urn:i", trace_id=TRACE_ID)
    assert body == json.dumps(_doc(body), separators=(",", ":")).encode()
    assert list(_doc(body)) == ["type", "title", "status", "detail", "instance", "trace_id"]


@pytest.mark.parametrize(
    ("instance", "trace_id", "keys"),
    [
        (None, None, ["type", "title", "status", "detail"]),
        ("urn:occurrence:1", None, ["type", "title", "status", "detail", "instance"]),
        (None, TRACE_ID, ["type", "title", "status", "detail", "trace_id"]),
    ],
    ids=["bare", "instance", "trace-id"],
)
def test_problem_body_optional_members(instance: str | None, trace_id: str | None, keys: list[str]) -> None:
    """``instance`` and ``trace_id`` appear only when given."""
    body = problem_body(
        status=503, title="T", detail="D", type_="urn:x", instance=instance, trace_id=trace_id
    )
    assert list(_doc(body)) == keys


@pytest.mark.parametrize(("status", "type_"), [(200, "urn:x"), (302, "urn:x"), (600, "urn:x"), (400, "")])
def test_problem_body_rejects_non_error_status_and_empty_type(status: int, type_: str) -> None:
    """Problem details are only made for 4xx/5xx answers and always carry a type."""
    with pytest.raises(ValueError, match="problem"):
        problem_body(status=status, title="T", detail="D", type_=type_)


def test_problem_body_escapes_json_specials() -> None:
    """A quote or newline in a field cannot break the JSON document."""
    body = problem_body(status=400, title='a"b', detail="line\nbreak", type_="urn:x")
    assert _doc(body)["title"] == 'a"b'
    assert _doc(body)["detail"] == "line\nbreak"


@pytest.mark.parametrize(
    ("kind", "status"),
    [
        (ClientRejection.BAD_REQUEST_TARGET, 400),
        (ClientRejection.METHOD_NOT_ALLOWED, 405),
        (ClientRejection.PAYLOAD_TOO_LARGE, 413),
        (ClientRejection.HEADERS_TOO_LARGE, 431),
        (ClientRejection.URI_TOO_LONG, 414),
        (ClientRejection.BAD_REQUEST, 400),
        (ClientRejection.SERVICE_UNAVAILABLE, 503),
        (ClientRejection.REQUEST_TIMEOUT, 408),
    ],
    ids=lambda v: v.name if isinstance(v, ClientRejection) else None,
)
def test_client_rejection_status_and_body(kind: ClientRejection, status: int) -> None:
    """Each client rejection answers its status with the table's type, title and default detail."""
    rej = rejection(kind)
    got_status, body = rejection_response(rej, trace_id=TRACE_ID)
    doc = _doc(body)
    assert got_status == status == rej.status == doc["status"]
    assert doc["type"] == problem_type_uri(kind.value) == CLIENT_REJECTIONS[kind].type_uri
    assert doc["type"].startswith(PROBLEM_TYPE_PREFIX)
    assert doc["title"] == CLIENT_REJECTIONS[kind].title
    assert doc["detail"] == CLIENT_REJECTIONS[kind].detail
    # The slug, not the URN, is the error.type and the metric label of a refusal.
    assert rej.slug == kind.value
    assert list(doc) == ["type", "title", "status", "detail", "trace_id"]


def test_rejection_detail_and_headers_override() -> None:
    """A caller's fixed detail and required headers replace the defaults; the row's status stays."""
    rej = rejection(ClientRejection.METHOD_NOT_ALLOWED, detail="No tunnels.", headers=(("Allow", "GET"),))
    assert rej == Rejection(
        status=405,
        problem_type="urn:mes-trace-proxy:problem:method_not_allowed",
        title="Method not allowed",
        detail="No tunnels.",
        headers=(("Allow", "GET"),),
    )


def test_rejection_is_frozen() -> None:
    """A rejection cannot be altered after it is built, so shared constants stay safe."""
    rej = rejection(ClientRejection.BAD_REQUEST)
    with pytest.raises(dataclasses.FrozenInstanceError):
        rej.status = 200  # type: ignore[misc]
