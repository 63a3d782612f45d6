"""Step 7 of a request: the call upstream, the answer streamed back, and a failure's outcome.

Every way the exchange can fail is mapped once, by :func:`failure_outcome`, onto an
:class:`Outcome`: the caller hung up, the request body passed ``max_body_size`` while it
streamed (413), the upstream failed before the answer's head went out (a 502/504 problem), or
after (the connection is cut, so the caller sees a truncated body, not a complete one).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Final

import aiohttp
from opentelemetry.trace import Status, StatusCode

from mes_trace_proxy.core import attributes as A
from mes_trace_proxy.core.extract import is_json_content_type
from mes_trace_proxy.core.forwarding import HeaderList, downstream_response_headers
from mes_trace_proxy.core.problems import (
    PROBLEM_CONTENT_TYPE,
    ClientRejection,
    UpstreamFailure,
    failure_response,
    rejection,
    rejection_response,
)
from mes_trace_proxy.core.tracecontext import traceresponse
from mes_trace_proxy.proxy.handler_state import Call, ListenerState
from mes_trace_proxy.wire.bodies import BodyTooLarge
from mes_trace_proxy.wire.client import Answer, UpstreamError
from mes_trace_proxy.wire.server import IncomingRequest

__all__ = [
    "CHUNK_SIZE",
    "CLIENT_ABORTED",
    "SHUTDOWN_CANCELLED",
    "SMALL_BODY",
    "Outcome",
    "classify_failure",
    "failure_outcome",
    "relay",
    "trace_fields",
    "upstream_error_type",
]

# 64 KiB reads: large enough that a 256 MiB model moves in ~4k writes, small enough that a
# slow client never makes us hold more than a few of them per connection.
CHUNK_SIZE: Final = 64 * 1024
# Answers up to this size with a Content-Length are relayed in one write; larger or chunked
# ones stream. 64 KiB matches the read chunk, so memory per request stays the same bound.
SMALL_BODY: Final = CHUNK_SIZE
#: ``error.type`` of an exchange the caller abandoned (hung up before the answer was complete).
CLIENT_ABORTED: Final = "client_aborted"
#: a request still running when the drain's grace period ended, cancelled by the shutdown
SHUTDOWN_CANCELLED: Final = "shutdown_cancelled"
_NO_BODY_STATUSES: Final = frozenset({204, 304})
_TOO_LARGE: Final = rejection(ClientRejection.PAYLOAD_TOO_LARGE)


def classify_failure(exc: BaseException) -> UpstreamFailure:
    """Map an upstream client exception onto the upstream-failure table (most specific first)."""
    if isinstance(exc, UpstreamError):
        return exc.failure
    if isinstance(exc, aiohttp.ClientConnectorCertificateError | aiohttp.ClientSSLError):
        return UpstreamFailure.TLS_ERROR
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return UpstreamFailure.DNS_FAILURE
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return UpstreamFailure.CONNECT_TIMEOUT
    if isinstance(exc, aiohttp.ClientConnectorError):
        return UpstreamFailure.CONNECT_REFUSED
    if isinstance(exc, aiohttp.SocketTimeoutError | aiohttp.ServerTimeoutError):
        return UpstreamFailure.READ_TIMEOUT
    if isinstance(exc, asyncio.TimeoutError):
        return UpstreamFailure.TOTAL_TIMEOUT
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError):
        return UpstreamFailure.DISCONNECTED
    if isinstance(exc, aiohttp.ClientPayloadError):
        return UpstreamFailure.PAYLOAD_ERROR
    return UpstreamFailure.INVALID_RESPONSE


def upstream_error_type(exc: BaseException, *, draining: bool) -> str:
    """The CLIENT span's ``error.type`` for an upstream call that raised before it answered.

    Args:
        exc: what the call raised.
        draining: whether the process is draining (a cancelled call is then the shutdown's).

    Returns:
        ``client_aborted``/``shutdown_cancelled`` for a cancelled call, ``payload_too_large``
        for a request body over ``max_body_size``, else the upstream-failure value.
    """
    if isinstance(exc, asyncio.CancelledError):
        return SHUTDOWN_CANCELLED if draining else CLIENT_ABORTED
    if isinstance(exc.__cause__, BodyTooLarge):
        return ClientRejection.PAYLOAD_TOO_LARGE.value
    return classify_failure(exc).value


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a failed exchange ends: ``aborted``, ``too_large``, ``cut`` or ``failed`` (a problem answer)."""

    kind: str
    error_type: str
    failure: UpstreamFailure | None = None


_ABORTED: Final = Outcome("aborted", CLIENT_ABORTED)
_BODY_TOO_LARGE: Final = Outcome("too_large", ClientRejection.PAYLOAD_TOO_LARGE.value)


def failure_outcome(exc: BaseException, *, answer_started: bool) -> Outcome:
    """The one mapping of an exchange's exception onto its outcome.

    Args:
        exc: a ``TimeoutError`` or ``aiohttp.ClientError`` from the call or the relay.
        answer_started: whether the answer's head already went to the caller.
    """
    if answer_started and isinstance(exc, ConnectionResetError):
        # Writing to the caller failed: it hung up mid-download. That is raised as
        # ClientConnectionResetError, a ClientError too, but MES did nothing wrong.
        return _ABORTED
    if not answer_started and isinstance(exc.__cause__, BodyTooLarge):
        return _BODY_TOO_LARGE
    failure = classify_failure(exc)
    return Outcome("cut" if answer_started else "failed", failure.value, failure)


def trace_fields(state: ListenerState, call: Call) -> list[tuple[str, str]]:
    """The fields that carry the trace back to the caller, in this order: ``traceresponse``, trace id."""
    config = state.config
    fields: list[tuple[str, str]] = []
    if config.traceresponse:
        context = call.server_context
        fields.append(
            ("traceresponse", traceresponse(context.trace_id, context.span_id, context.trace_flags.sampled))
        )
    if config.trace_id_header:
        fields.append((config.trace_id_header, call.trace_id))
    return fields


async def relay(state: ListenerState, request: IncomingRequest, call: Call, headers: HeaderList) -> None:
    """Send the call upstream and stream the answer back; a failure gets its outcome's answer."""
    started = time.perf_counter()
    try:
        async with state.forwarder.call(call, headers) as answer:
            call.detach()
            call.status = call.upstream_status = answer.status
            await _answer(state, request, call, answer)
            call.upstream_duration = time.perf_counter() - started
    except (TimeoutError, aiohttp.ClientError) as exc:
        _failed(state, request, call, failure_outcome(exc, answer_started=request.started))
    except asyncio.CancelledError:
        # The caller went away, or the drain's grace period ran out (aiohttp cancels both
        # the same way; only our own draining flag tells them apart). Leaving the `async
        # with` cancelled the upstream call; record why and let cancellation go on.
        call.error_type = call.error_type or (SHUTDOWN_CANCELLED if state.draining() else CLIENT_ABORTED)
        if not call.status:
            # MES never answered: the call failed as surely as a refused one.
            call.client_span.set_attribute(A.ERROR_TYPE, call.error_type)
            call.client_span.set_status(Status(StatusCode.ERROR, call.error_type))
        raise


async def _answer(state: ListenerState, request: IncomingRequest, call: Call, answer: Answer) -> None:
    """Relay the answer: a small body with its head in one write, else streamed; teed if the rule reads it."""
    fields = answer.headers
    # Ours (traceresponse, X-Trace-Id) replace what MES sent under the same names.
    headers = downstream_response_headers(tuple(fields.items()), state.own_response_fields)
    headers.extend(trace_fields(state, call))
    match = call.match
    limit = state.config.inspect_body_limit
    captured = (
        bytearray()
        if match is not None
        and match.rule.needs_response_body
        and is_json_content_type(fields.get("Content-Type"))
        else None
    )
    status = call.status
    length = answer.content_length
    if call.method == "HEAD" or status in _NO_BODY_STATUSES:
        # RFC 9110 §6.4.1: no content, whatever Content-Length says.
        request.send(status, answer.reason, headers)
        captured = None
    elif length is not None and length <= SMALL_BODY:
        # A small body with a known length (most MES answers): read it whole and send it
        # with the head in one write instead of a chunk loop.
        whole = await answer.content.readexactly(length) if length else b""
        request.send(status, answer.reason, headers, whole)
        call.sent = length
        if captured is not None and length <= limit:
            captured += whole
        else:
            captured = None
    else:
        await request.start(status, answer.reason, headers)
        async for chunk in answer.content.iter_any():
            if captured is not None:
                if len(captured) + len(chunk) <= limit:
                    captured += chunk
                else:
                    captured = None
            await request.write(chunk)
            call.sent += len(chunk)
        await request.finish()
    call.response_headers = fields
    call.response_body = bytes(captured) if captured is not None else None


def _failed(state: ListenerState, request: IncomingRequest, call: Call, outcome: Outcome) -> None:
    """Act on a failed exchange's outcome: the spans say why, and the caller gets what is left to say."""
    call.error_type = outcome.error_type
    if outcome.kind == "aborted":
        return
    call.client_span.set_attribute(A.ERROR_TYPE, outcome.error_type)
    call.client_span.set_status(Status(StatusCode.ERROR, outcome.error_type))
    if outcome.kind == "cut":
        # Headers already went out: the only honest signal left is to cut the connection.
        request.close_now()
        return
    if outcome.failure is None:
        # The body passed max_body_size while it streamed: the caller's 413.
        call.server_span.set_attribute(A.ERROR_TYPE, outcome.error_type)
        # The rest of the body is not worth reading: close once the answer is out.
        request.force_close()
        status, body = rejection_response(_TOO_LARGE, trace_id=call.trace_id)
    else:
        status, body = failure_response(outcome.failure, trace_id=call.trace_id)
    call.status = status
    fields = [("Content-Type", PROBLEM_CONTENT_TYPE)]
    fields.extend(trace_fields(state, call))
    request.send(status, None, fields, body)
