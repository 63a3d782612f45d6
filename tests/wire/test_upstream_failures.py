"""How the lean client's low-level failures map to rows of the upstream-failure table.

The mapping functions as tables of cases (no sockets), each checked against the relay's
``classify_failure`` too (what the client is answered with); then the failures before an answer's
head as a caller sees them against the scripted upstream.
"""

from __future__ import annotations

import socket
import ssl

import aiohttp
import pytest

from mes_trace_proxy.core.problems import UpstreamFailure
from mes_trace_proxy.proxy.relay import classify_failure
from mes_trace_proxy.wire.upstream_failures import UpstreamError, connect_failure, parse_failure
from tests.conftest import MakeConfig
from tests.wire.scripted_upstream import Answer, Scripted, fetch, listener_for, pool_for


@pytest.mark.parametrize(
    ("exc", "failure"),
    [
        (ssl.SSLCertVerificationError(1, "certificate verify failed"), UpstreamFailure.TLS_ERROR),
        (ssl.SSLError(1, "wrong version number"), UpstreamFailure.TLS_ERROR),
        (socket.gaierror(socket.EAI_NONAME, "Name or service not known"), UpstreamFailure.DNS_FAILURE),
        (ConnectionRefusedError(111, "Connection refused"), UpstreamFailure.CONNECT_REFUSED),
        (OSError(101, "Network is unreachable"), UpstreamFailure.CONNECT_REFUSED),
    ],
    ids=["cert-verify", "tls", "dns", "refused", "other-os-error"],
)
def test_connect_failures_get_their_row_and_keep_the_cause_text(
    exc: BaseException, failure: UpstreamFailure
) -> None:
    """TLS errors, name resolution and anything else a connect raises: each its own row, its text kept."""
    error = connect_failure(exc)
    assert error.failure is failure
    assert classify_failure(error) is failure
    assert str(exc) in str(error)


def test_a_parse_failure_before_the_head_is_an_invalid_response() -> None:
    """A parser error on the head: the answer is not HTTP/1.1."""
    error = parse_failure(ValueError("bad status line"), head_done=False)
    assert isinstance(error, UpstreamError)
    assert error.failure is UpstreamFailure.INVALID_RESPONSE
    assert classify_failure(error) is UpstreamFailure.INVALID_RESPONSE
    assert "bad status line" in str(error)


def test_a_parse_failure_in_the_body_is_a_payload_error() -> None:
    """A parser error after the head (broken chunks): the body is unusable, a payload error."""
    error = parse_failure(ValueError("bad chunk size"), head_done=True)
    assert isinstance(error, aiohttp.ClientPayloadError)
    assert not isinstance(error, UpstreamError)
    assert classify_failure(error) is UpstreamFailure.PAYLOAD_ERROR
    assert "bad chunk size" in str(error)


def test_an_upstream_error_is_an_aiohttp_client_error() -> None:
    """Callers that catch aiohttp.ClientError (the relay, the WebSocket path) catch it too."""
    error = UpstreamError(UpstreamFailure.DISCONNECTED, "gone")
    assert isinstance(error, aiohttp.ClientError)
    assert (error.failure, str(error)) == (UpstreamFailure.DISCONNECTED, "gone")


@pytest.mark.parametrize(
    ("reply", "failure"),
    [
        (lambda _: b"NOT HTTP AT ALL\r\n\r\n", UpstreamFailure.INVALID_RESPONSE),
        (lambda _: None, UpstreamFailure.DISCONNECTED),
    ],
    ids=["garbage", "closed-unanswered"],
)
async def test_failures_before_the_head_map_to_the_failure_table(
    scripted: Scripted, make_config: MakeConfig, reply: Answer, failure: UpstreamFailure
) -> None:
    """A head that is not HTTP is an invalid response; a close before it, a disconnect."""
    scripted.answers.append(reply)
    async with pool_for(listener_for(make_config, scripted.port)) as pool:
        with pytest.raises(aiohttp.ClientError) as raised:
            await fetch(pool, "POST", b"x")
    assert classify_failure(raised.value) is failure
