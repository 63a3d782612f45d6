"""Scenario 7: malformed input on raw sockets gets a clear 4xx or a clean pass-through, never a
crash and never a stuck worker: after every case a normal call still succeeds in the same process.

One proxy process serves the whole table (module-scoped), so a case that wedged or killed it
would fail every case after it, not only its own.
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Final

import aiohttp
import pytest
import pytest_asyncio

from tests.faults.faulty_upstream import Arrival, FaultyUpstream, parse_response
from tests.faults.harness import LOOPBACK_ARGS, body_for, echo_request
from tests.proxy_process import ProxyProcess, proxy_process

TRACEPARENT: Final = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
# W3C Trace Context §3.2: what the proxy's own traceparent must look like upstream.
VALID_TRACEPARENT: Final = re.compile(rb"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}\Z")
PASS: Final = 0  # forwarded: the upstream got the request, the caller its answer
JSON_PUT: Final = b"PUT /api/v1/orders/A-1/status HTTP/1.1\r\nHost: mes\r\nContent-Type: application/json\r\n"


@dataclass(frozen=True, slots=True)
class Case:
    """Raw bytes sent on a fresh connection, and what must come of them."""

    id: str
    data: bytes
    expect: int  # a 4xx status, or PASS
    body: bytes | None = None  # for PASS with a body: what the upstream must receive exactly


def _get(*headers: bytes, target: bytes = b"/echo/m") -> bytes:
    return (
        b"GET "
        + target
        + b" HTTP/1.1\r\nHost: mes\r\n"
        + b"".join(h + b"\r\n" for h in headers)
        + b"Connection: close\r\n\r\n"
    )


def _json(case_id: str, body: bytes) -> Case:
    """A PUT of ``body`` labelled JSON on the status rule, which reads bodies under the cap."""
    data = JSON_PUT + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body
    return Case(case_id, data, PASS, body)


DEEP = b"[" * 60_000  # under the 64 KiB inspection cap, so it is parsed (and must not recurse to death)
HUGE = b'{"status": "' + b"x" * (2 * 1024 * 1024) + b'"}'  # over the cap: streamed, never parsed
CASES: Final = (
    # ── not HTTP, or not HTTP/1.1 as RFC 9112 writes it ──────────────────────────────────────
    Case("garbage", b"HELLO WORLD\r\n\r\n", 400),
    Case("binary", bytes(range(256)) + b"\r\n\r\n", 400),
    Case("tls-client-hello", bytes.fromhex("16030100a5010000a10303") + b"\x00" * 40, 400),
    Case("h2-preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400),
    Case("unknown-version", b"GET /echo/m HTTP/9.9\r\nHost: mes\r\n\r\n", 400),
    Case("lowercase-method", b"get /echo/m HTTP/1.1\r\nHost: mes\r\n\r\n", 400),
    Case("method-with-at", b"G@T /echo/m HTTP/1.1\r\nHost: mes\r\n\r\n", 400),
    Case("bare-lf", b"GET /echo/m HTTP/1.1\nHost: mes\n\n", 400),
    Case("no-colon", _get(b"NoColonHere"), 400),
    Case("space-before-colon", _get(b"X-A : b"), 400),
    Case("obs-fold", _get(b"X-A: b\r\n c"), 400),
    Case("nul-in-value", _get(b"X-A: b\x00c"), 400),
    Case("cr-in-value", _get(b"X-A: b\rc"), 400),
    # ── floods and sizes ────────────────────────────────────────────────────────────────────
    Case("header-flood", _get(*(b"X-H%d: v" % i for i in range(2000))), 431),
    Case("header-100k", _get(b"X-Big: " + b"a" * 100_000), 431),
    Case("target-100k", _get(target=b"/echo/" + b"a" * 100_000), 414),
    # ── framing that smuggles ───────────────────────────────────────────────────────────────
    Case(
        "cl-and-te",
        b"POST /echo/m HTTP/1.1\r\nHost: mes\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    Case(
        "two-content-lengths",
        b"POST /echo/m HTTP/1.1\r\nHost: mes\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        400,
    ),
    Case("negative-length", b"POST /echo/m HTTP/1.1\r\nHost: mes\r\nContent-Length: -1\r\n\r\n", 400),
    Case(
        "bad-chunk-size",
        b"POST /echo/m HTTP/1.1\r\nHost: mes\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\nhello\r\n0\r\n\r\n",
        400,
    ),
    Case("te-gzip-only", b"POST /echo/m HTTP/1.1\r\nHost: mes\r\nTransfer-Encoding: gzip\r\n\r\n", 400),
    Case("two-hosts", b"GET /echo/m HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    # ── not UTF-8, or not ASCII where the grammar wants ASCII ───────────────────────────────
    Case("utf8-raw-in-path", _get(target="/echo/привет".encode()), 400),
    Case("invalid-utf8-path", _get(target=b"/echo/\xff\xfe"), 400),
    Case("invalid-utf8-query", _get(target=b"/echo/m?q=\xff"), 400),
    Case("invalid-utf8-header-name", _get(b"X-\xff: 1"), 400),
    Case("latin1-header-value", _get(b"X-Note: caf\xe9"), 400),
    Case("invalid-utf8-header-value", _get(b"X-Note: \xff\xfe\xc3\x28"), 400),
    Case("invalid-utf8-baggage", _get(b"baggage: k=\xff"), 400),
    Case("utf8-header-value", _get("X-Note: привет".encode()), PASS),
    # ── trace context: garbage is ignored, never trusted, never fatal ────────────────────────
    Case("traceparent-garbled", _get(b"traceparent: 00-zzzz-yyyy-01"), PASS),
    Case("traceparent-8k", _get(b"traceparent: 00-" + b"a" * 8000), PASS),
    Case("traceparent-all-zero", _get(b"traceparent: 00-" + b"0" * 32 + b"-" + b"0" * 16 + b"-01"), PASS),
    Case("traceparent-version-ff", _get(b"traceparent: ff" + TRACEPARENT[2:]), PASS),
    Case(
        "traceparent-twice",
        _get(b"traceparent: " + TRACEPARENT, b"traceparent: " + TRACEPARENT.replace(b"0af", b"1af")),
        PASS,
    ),
    Case(
        "tracestate-64-members",
        _get(b"traceparent: " + TRACEPARENT, b"tracestate: " + b",".join(b"k%d=v" % i for i in range(64))),
        PASS,
    ),
    Case("tracestate-garbled", _get(b"traceparent: " + TRACEPARENT, b"tracestate: ===,,,@@"), PASS),
    Case(
        "tracestate-over-field-limit",
        _get(b"traceparent: " + TRACEPARENT, b"tracestate: " + b",".join(b"k%d=v" % i for i in range(3000))),
        431,
    ),
    Case(
        "baggage-300-members",
        _get(b"baggage: " + b",".join(b"k%d=%s" % (i, b"v" * 20) for i in range(300))),
        PASS,
    ),
    Case("baggage-garbled", _get(b"baggage: ;;;==%%%,"), PASS),
    # ── JSON bodies on a rule that reads them ───────────────────────────────────────────────
    _json("json-deep", DEEP),
    _json("json-not-json", b"not json!"),
    _json("json-invalid-utf8", b'{"status":"\xff"}'),
    _json("json-50k-digit-number", b'{"status":' + b"9" * 50_000 + b"}"),
    _json("json-2mib", HUGE),
    # ── targets and methods the proxy answers itself ────────────────────────────────────────
    Case(
        "absolute-form", b"GET http://evil.example/ HTTP/1.1\r\nHost: mes\r\nConnection: close\r\n\r\n", 400
    ),
    Case("connect", b"CONNECT evil.example:443 HTTP/1.1\r\nHost: mes\r\nConnection: close\r\n\r\n", 405),
    Case("options-asterisk", b"OPTIONS * HTTP/1.1\r\nHost: mes\r\nConnection: close\r\n\r\n", 200),
)


@dataclass(slots=True)
class Stage:
    """The module's proxy, its upstream and a client for the after-each-case check."""

    proxy: ProxyProcess
    upstream: FaultyUpstream
    client: aiohttp.ClientSession
    answers: Counter[str] = field(default_factory=Counter)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stage() -> AsyncIterator[Stage]:
    """One faulty upstream and one proxy child for the whole table."""
    async with (
        FaultyUpstream() as upstream,
        proxy_process(
            [*LOOPBACK_ARGS, "--upstream", upstream.url], {"OTEL_TRACES_EXPORTER": "none"}
        ) as proxy,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as client,
    ):
        stage = Stage(proxy, upstream, client)
        yield stage
    print(
        f"[faults] malformed input: {sum(stage.answers.values())} cases, answers {dict(stage.answers)}, "
        f"proxy PID {proxy.pid} alive through all of them"
    )
    errors = [
        line
        for line in proxy.json_lines()
        if str(line.get("logger", "")).startswith("mes_trace_proxy") and line.get("level") == "error"
    ]
    assert not errors, errors


async def _exchange(proxy: ProxyProcess, data: bytes) -> bytes:
    host, port = proxy.listeners["ingress"].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(10):  # a stuck connection fails the case, not the suite
            return await reader.read()
    finally:
        writer.close()


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
async def test_malformed_input_gets_a_clear_answer(case: Case, stage: Stage) -> None:
    """The case gets its 4xx (and nothing reaches MES) or passes through unchanged; then a normal
    call succeeds and the process is alive."""
    before = len(stage.upstream.arrivals)
    status, headers, _body = parse_response(await _exchange(stage.proxy, case.data))
    arrived = stage.upstream.arrivals[before:]
    stage.answers["passed through" if case.expect == PASS else str(status)] += 1
    if case.expect == PASS:
        assert status == 200
        assert len(arrived) == 1
        _check_pass_through(case, arrived[0])
    else:
        assert status == case.expect
        assert arrived == []
        if status >= 400:  # a clear answer: RFC 9457 problem details, never a bare text page
            assert (b"content-type", b"application/problem+json") in [(n.lower(), v) for n, v in headers]
    n = len(stage.upstream.arrivals)
    after = await echo_request(stage.client, stage.proxy.url(), f"after-{case.id}-{n}", body_for(n))
    assert (after.status, after.body) == (200, body_for(n))
    assert stage.proxy.process.returncode is None


def _check_pass_through(case: Case, arrival: Arrival) -> None:
    """What the caller sent reached MES unchanged; the proxy's own trace context replaced the caller's."""
    if case.body is not None:
        assert arrival.body == case.body
    sent_head = case.data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]
    for line in sent_head:
        name = line.split(b":", 1)[0].lower()
        if name not in {b"host", b"connection", b"traceparent", b"tracestate"}:
            assert line in arrival.head, line[:80]
    forwarded = arrival.header(b"traceparent")
    assert forwarded is not None
    assert VALID_TRACEPARENT.match(forwarded)


def test_every_case_has_a_distinct_id() -> None:
    """The table's ids are unique, so a failure names exactly one case."""
    assert len({c.id for c in CASES}) == len(CASES)
