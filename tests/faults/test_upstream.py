"""Scenario 2: MES refuses, hangs, resets, truncates or dribbles; the caller always gets a prompt,
correct answer, the failure is an error span, and the proxy recovers by itself.

The upstream is the raw faulty server (``faulty_upstream.py``); spans go to a real OtlpSink.
Every fault request is a POST with its own ``X-Request-Id``: none may reach MES twice.
"""

from __future__ import annotations

import contextlib
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import aiohttp
import pytest

from mes_trace_proxy.sim.otlp_sink import OtlpSink
from tests.conftest import otlp_env
from tests.faults.faulty_upstream import FaultyUpstream
from tests.faults.harness import (
    LOOPBACK_ARGS,
    Outcome,
    assert_all_echoed,
    body_for,
    drive,
    echo_request,
    write_config,
)
from tests.proxy_process import proxy_process

# One second for connect and read: short enough for a fast suite, long enough that a
# healthy loopback upstream never comes near it.
TIMEOUTS_YAML: Final = "listeners:\n  - name: ingress\n    timeouts: {connect: 1s, read: 1s}\n"
# Each fault is sent this many times, interleaved with as many healthy requests.
EACH: Final = 8
ABORTED: Final = -1  # the caller got the status line, then a cut connection


@dataclass(frozen=True, slots=True)
class Case:
    """A fault the upstream commits and what the caller and the span must show for it."""

    target: str
    status: int  # or ABORTED
    error_type: str


CASES: Final = (
    Case("/hold/x", 504, "upstream_read_timeout"),
    Case("/reset-before/x", 502, "upstream_disconnected"),
    Case("/garbage/x", 502, "upstream_invalid_response"),
    Case("/slow-bytes/x?gap=1.5", 504, "upstream_read_timeout"),
    Case("/reset-mid/x", ABORTED, "upstream_payload_error"),
    Case("/truncated-chunked/x", ABORTED, "upstream_payload_error"),
)


async def _fault_request(client: aiohttp.ClientSession, url: str, request_id: str) -> Outcome:
    started = time.perf_counter()
    try:
        async with client.post(url, data=b"order", headers={"X-Request-Id": request_id}) as resp:
            status = resp.status
            try:
                body = await resp.read()
            except aiohttp.ClientPayloadError:
                return Outcome(request_id, ABORTED, b"", None, time.perf_counter() - started)
            return Outcome(request_id, status, body, None, time.perf_counter() - started)
    except aiohttp.ClientError as exc:
        return Outcome(request_id, None, b"", type(exc).__name__, time.perf_counter() - started)


@pytest.mark.parametrize("case", CASES, ids=[c.target.split("/")[1] for c in CASES])
async def test_upstream_fault_gives_a_correct_answer_and_an_error_span(
    case: Case,
    faulty_upstream: FaultyUpstream,
    otlp_sink: OtlpSink,
    client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """Each fault gives every caller one correct answer (502/504, or a cut stream after the headers),
    an error span with the right error.type, no retry, and healthy calls around it are untouched."""
    config = write_config(tmp_path, TIMEOUTS_YAML)
    args = [*LOOPBACK_ARGS, "--config", config, "--upstream", faulty_upstream.url]
    async with proxy_process(args, otlp_env(otlp_sink)) as proxy:

        async def send(n: int) -> Outcome:
            if n % 2:
                return await echo_request(client, proxy.url(), f"ok-{n}", body_for(n))
            return await _fault_request(client, proxy.url() + case.target, f"fault-{n}")

        outcomes = await drive(2 * EACH, 2 * EACH, send)
        healthy = [o for o in outcomes if o.request_id.startswith("ok-")]
        faults = [o for o in outcomes if o.request_id.startswith("fault-")]
        assert_all_echoed(healthy, faulty_upstream.ids)
        assert [o.status for o in faults] == [case.status] * EACH, faults
        shown = "cut after the status line" if case.status == ABORTED else str(case.status)
        print(
            f"[faults] upstream {case.target.split('/')[1]}: {EACH}/{EACH} callers got {shown}, slowest "
            f"{max(o.seconds for o in faults):.2f} s; {EACH}/{EACH} healthy calls beside them byte-exact"
        )
        assert all(faulty_upstream.ids[o.request_id] == 1 for o in faults), faulty_upstream.ids
        # The proxy needs no restart: the next call goes through.
        after = await echo_request(client, proxy.url(), "after-1", body_for(1))
        assert after.status == 200
        assert after.body == body_for(1)
        path = case.target.split("?")[0]
        spans = await otlp_sink.wait_for_spans(
            2 * EACH,
            predicate=lambda s: path in str(s.attributes.get("url.path", s.attributes.get("url.full"))),
        )
    for kind in ("SERVER", "CLIENT"):
        of_kind = [s for s in spans if s.kind == kind]
        assert len(of_kind) == EACH
        assert {s.attributes.get("error.type") for s in of_kind} == {case.error_type}, kind
        assert {s.status_code for s in of_kind} == {"ERROR"}, kind


async def test_refused_then_back_recovers_without_restart(
    otlp_sink: OtlpSink, client: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """While MES's port refuses connections every caller gets 502 upstream_connect_refused with an
    error span; once MES listens again the same proxy process forwards normally."""
    upstream = FaultyUpstream()
    port = upstream.bind()  # reserved, not listening: refused
    try:
        args = [*LOOPBACK_ARGS, "--config", write_config(tmp_path, TIMEOUTS_YAML), "--upstream", upstream.url]
        async with proxy_process(args, otlp_env(otlp_sink)) as proxy:
            refused = await drive(EACH, EACH, lambda n: _fault_request(client, f"{proxy.url()}/x", f"r-{n}"))
            assert [o.status for o in refused] == [502] * EACH
            print(
                f"[faults] upstream refused: {EACH}/{EACH} got 502, "
                f"slowest {max(o.seconds for o in refused):.3f} s"
            )
            await upstream.start()
            assert upstream.port == port
            back = await drive(
                EACH, EACH, lambda n: echo_request(client, proxy.url(), f"back-{n}", body_for(n))
            )
            assert_all_echoed(back, upstream.ids)
            spans = await otlp_sink.wait_for_spans(
                EACH, predicate=lambda s: s.kind == "SERVER" and s.status_code == "ERROR"
            )
            assert {s.attributes.get("error.type") for s in spans} == {"upstream_connect_refused"}
    finally:
        await upstream.aclose()


async def test_connect_timeout_gives_504(client: aiohttp.ClientSession, tmp_path: Path) -> None:
    """An upstream whose accept queue is full (SYNs dropped) gives 504 upstream_connect_timeout
    within the connect timeout, not a hang."""
    with socket.socket() as full:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        host, port = full.getsockname()
        # Fill the accept queue; the kernel then drops further SYNs, so connect() hangs.
        fillers = []
        for _ in range(4):
            filler = socket.socket()
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):  # the handshake completes in the background
                filler.connect((host, port))
            fillers.append(filler)
        try:
            args = [
                *LOOPBACK_ARGS,
                "--config",
                write_config(tmp_path, TIMEOUTS_YAML),
                "--upstream",
                f"http://{host}:{port}",
            ]
            async with proxy_process(args, {"OTEL_TRACES_EXPORTER": "none"}) as proxy:
                outcome = await _fault_request(client, f"{proxy.url()}/x", "c-1")
        finally:
            for filler in fillers:
                filler.close()
    assert outcome.status == 504
    print(f"[faults] upstream connect timeout (1 s): 504 after {outcome.seconds:.2f} s")
    assert b"upstream_connect_timeout" in outcome.body


async def test_slow_upstream_within_the_read_timeout_passes_byte_exact(
    faulty_upstream: FaultyUpstream, client: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """An upstream answering one byte at a time, each within the read timeout, is relayed intact."""
    args = [
        *LOOPBACK_ARGS,
        "--config",
        write_config(tmp_path, TIMEOUTS_YAML),
        "--upstream",
        faulty_upstream.url,
    ]
    async with proxy_process(args, {"OTEL_TRACES_EXPORTER": "none"}) as proxy:
        outcomes = await drive(
            4, 4, lambda n: _fault_request(client, f"{proxy.url()}/slow-bytes/x?gap=0.005&size=40", f"s-{n}")
        )
    assert [(o.status, o.body) for o in outcomes] == [(200, bytes(range(48, 88)))] * 4
