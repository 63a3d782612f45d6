"""How the lean upstream client's low-level failures become rows of the upstream-failure table.

:class:`UpstreamError` carries its row (:class:`~mes_trace_proxy.core.problems.UpstreamFailure`);
the mapping functions here turn what asyncio, ``ssl`` and aiohttp's parser raise into one, so the
relay answers the client with the right problem whichever step failed. Used by
:mod:`mes_trace_proxy.wire.upstream_connection` (answers) and :mod:`mes_trace_proxy.wire.client`
(connects, sends).
"""

from __future__ import annotations

import socket
import ssl

import aiohttp

from mes_trace_proxy.core.problems import UpstreamFailure

__all__ = ["UpstreamError", "connect_failure", "parse_failure"]


class UpstreamError(aiohttp.ClientError):
    """An upstream call failed; ``failure`` is its row of the upstream-failure table."""

    def __init__(self, failure: UpstreamFailure, message: str) -> None:
        super().__init__(message)
        self.failure = failure


def parse_failure(exc: Exception, *, head_done: bool) -> aiohttp.ClientError:
    """What aiohttp's response parser raising ``exc`` means for the exchange.

    Args:
        exc: what the parser raised.
        head_done: whether the final answer's head had already been parsed.

    Returns:
        A ``ClientPayloadError`` (the body is unusable) once the head is in, else an
        ``UpstreamError`` with the invalid-response row.
    """
    if head_done:
        # A broken chunk framing or an over-long body: the answer's body is unusable.
        return aiohttp.ClientPayloadError(f"upstream answer body is malformed: {exc}")
    return UpstreamError(UpstreamFailure.INVALID_RESPONSE, f"upstream answer is not HTTP/1.1: {exc}")


def connect_failure(exc: BaseException) -> UpstreamError:
    """The row of a failed connect: TLS, name resolution, or (anything else) refused."""
    if isinstance(exc, ssl.SSLError | ssl.CertificateError):
        return UpstreamError(UpstreamFailure.TLS_ERROR, f"TLS to the upstream failed: {exc}")
    if isinstance(exc, socket.gaierror):
        return UpstreamError(UpstreamFailure.DNS_FAILURE, f"upstream host not found: {exc}")
    return UpstreamError(UpstreamFailure.CONNECT_REFUSED, f"cannot connect to the upstream: {exc}")
