"""The exchange's outcomes: one mapping of exceptions, and trace fields in one order on every answer."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator

import aiohttp
import pytest

from mes_trace_proxy.core.problems import UpstreamFailure
from mes_trace_proxy.proxy.relay import classify_failure, failure_outcome, upstream_error_type
from mes_trace_proxy.wire.bodies import BodyTooLarge
from mes_trace_proxy.wire.client import UpstreamError
from tests.conftest import MakeConfig, StartProxy
from tests.upstream import RecordingUpstream


def _too_large() -> aiohttp.ClientError:
    exc = aiohttp.ClientPayloadError("body")
    exc.__cause__ = BodyTooLarge()
    return exc


@pytest.mark.parametrize(
    ("exc", "started", "kind", "error_type"),
    [
        (aiohttp.ClientConnectionResetError("reset"), True, "aborted", "client_aborted"),
        (aiohttp.ServerDisconnectedError(), False, "failed", "upstream_disconnected"),
        (_too_large(), False, "too_large", "payload_too_large"),
        (UpstreamError(UpstreamFailure.READ_TIMEOUT, "slow"), False, "failed", "upstream_read_timeout"),
        (UpstreamError(UpstreamFailure.PAYLOAD_ERROR, "cut"), True, "cut", "upstream_payload_error"),
        (TimeoutError(), False, "failed", "upstream_total_timeout"),
    ],
    ids=[
        "caller-hung-up",
        "upstream-hung-up",
        "body-too-large",
        "read-timeout",
        "cut-mid-body",
        "total-timeout",
    ],
)
def test_failure_outcome_table(exc: BaseException, started: bool, kind: str, error_type: str) -> None:
    """Every failure becomes one outcome: what the caller is told and the error.type, decided in one place."""
    outcome = failure_outcome(exc, answer_started=started)
    assert (outcome.kind, outcome.error_type) == (kind, error_type)
    assert (outcome.failure is not None) == (kind in {"failed", "cut"})


def test_upstream_error_type_matches_the_outcomes() -> None:
    """The instrumentation's error.type for a call agrees with the handler's outcome mapping."""
    assert upstream_error_type(asyncio.CancelledError(), draining=False) == "client_aborted"
    assert upstream_error_type(asyncio.CancelledError(), draining=True) == "shutdown_cancelled"
    assert upstream_error_type(_too_large(), draining=False) == "payload_too_large"
    assert (
        upstream_error_type(aiohttp.ServerDisconnectedError(), draining=False)
        == classify_failure(aiohttp.ServerDisconnectedError()).value
    )


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port nothing listens on (held, not listening, for the test's duration)."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        yield holder.getsockname()[1]


async def test_trace_fields_come_in_one_order_on_success_and_failure(
    make_config: MakeConfig,
    start_proxy: StartProxy,
    recording_upstream: tuple[str, RecordingUpstream],
    closed_port: int,
) -> None:
    """traceresponse then X-Trace-Id, on MES's answer and on the proxy's own 502 alike."""
    base, _ = recording_upstream
    live = await start_proxy(make_config(base))
    dead = await start_proxy(make_config(f"http://127.0.0.1:{closed_port}"))
    orders = []
    async with aiohttp.ClientSession() as client:
        for proxy, status in ((live, 200), (dead, 502)):
            async with client.get(f"{proxy.url('ingress')}/api/v1/orders/A-1") as resp:
                assert resp.status == status
                names = [
                    name.lower() for name in resp.headers if name.lower() in {"traceresponse", "x-trace-id"}
                ]
                orders.append(names)
    assert orders == [["traceresponse", "x-trace-id"], ["traceresponse", "x-trace-id"]]
