"""Tests for sim/w3c_service, the W3C suite's test service, alone and behind a real proxy process."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from mes_trace_proxy.sim.w3c_service import W3cTestService, trace_fields
from tests.proxy_process import proxy_process

TRACE = "12345678901234567890123456789012"
TRACEPARENT = f"00-{TRACE}-1234567890123456-01"
ROOT = Path(__file__).resolve().parents[2]


class Recorder:
    """A callback target on loopback that keeps each request's raw header fields."""

    def __init__(self) -> None:
        self.requests: list[tuple[tuple[bytes, bytes], ...]] = []
        self.arrived = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append(tuple(request.raw_headers))
        await request.read()
        self.arrived.set()
        return web.json_response(None)


@pytest.fixture
async def recorder() -> AsyncIterator[tuple[Recorder, str]]:
    """A recording callback server; yields it and its base URL."""
    target = Recorder()
    app = web.Application()
    app.router.add_post("/{tail:.*}", target.handle)
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    try:
        yield target, f"http://127.0.0.1:{server.port}"
    finally:
        await server.close()


def _trace_pairs(raw: tuple[tuple[bytes, bytes], ...]) -> list[tuple[str, str]]:
    return trace_fields(raw)


def test_trace_fields_keep_names_order_and_count() -> None:
    """Only traceparent/tracestate fields are picked, as spelled and in order, repeats included."""
    raw = [
        (b"Host", b"x"),
        (b"TraceState", b"a=1"),
        (b"traceparent", b"tp"),
        (b"tracestate", b""),
        (b"trace-state", b"no"),
        (b"TRACESTATE", b"b=2"),
    ]
    assert trace_fields(raw) == [
        ("TraceState", "a=1"),
        ("traceparent", "tp"),
        ("tracestate", ""),
        ("TRACESTATE", "b=2"),
    ]


async def test_service_forwards_exactly_what_it_received(recorder: tuple[Recorder, str]) -> None:
    """Each callback carries the request's trace fields unchanged: names, values, order and count."""
    target, base = recorder
    sent = [
        ("TraceParent", TRACEPARENT),
        ("tracestate", "foo=1"),
        ("TRACESTATE", ""),
        ("tracestate", "bar=2"),
    ]
    actions = [{"url": f"{base}/cb/0", "arguments": []}, {"url": f"{base}/cb/1", "arguments": [1]}]
    async with (
        W3cTestService() as service,
        aiohttp.ClientSession(headers=sent) as client,
        client.post(service.url, data=json.dumps(actions)) as resp,
    ):
        assert resp.status == 200
        answer = await resp.json()
    assert [r["status"] for r in answer["callbacks"]] == [200, 200]
    assert len(target.requests) == 2
    for raw in target.requests:
        assert _trace_pairs(raw) == sent
    assert service.received == [sent]


async def test_service_reports_an_unreachable_callback() -> None:
    """A callback that cannot connect is reported in the answer, not raised."""
    async with W3cTestService() as service, aiohttp.ClientSession() as client:
        actions = [{"url": "http://127.0.0.1:9/nowhere", "arguments": []}, {"arguments": []}]
        async with client.post(service.url, json=actions) as resp:
            answer = await resp.json()
    assert answer["callbacks"][0]["error"]
    assert answer["callbacks"][1] == {"error": "an action needs a url"}


async def _through_proxy(base: str, sent: list[tuple[str, str]]) -> None:
    async with W3cTestService() as service:
        args = ["--upstream", f"http://127.0.0.1:{service.port}", "--listen", "127.0.0.1:0"]
        args += ["--admin-listen", "127.0.0.1:0", "--state", "memory"]
        async with (
            proxy_process(args, {"OTEL_TRACES_EXPORTER": "none"}) as proxy,
            aiohttp.ClientSession() as client,
        ):
            actions = [{"url": f"{base}/cb", "arguments": []}]
            async with client.post(proxy.url() + "/test", data=json.dumps(actions), headers=sent) as resp:
                assert resp.status == 200, await resp.text()


async def test_through_the_proxy_tracestate_fields_become_one_list(recorder: tuple[Recorder, str]) -> None:
    """Harness → proxy → service: the trace continues and the tracestate fields arrive combined in order."""
    target, base = recorder
    await _through_proxy(
        base,
        [
            ("traceparent", TRACEPARENT),
            ("tracestate", "foo=1,bar=2"),
            ("tracestate", ""),
            ("tracestate", "baz=3"),
        ],
    )
    fields = _trace_pairs(target.requests[0])
    assert [name.lower() for name, _ in fields] == ["traceparent", "tracestate"]
    assert fields[0][1].split("-")[1] == TRACE
    assert fields[0][1] != TRACEPARENT
    assert fields[1][1] == "foo=1,bar=2,baz=3"


async def test_through_the_proxy_two_traceparents_start_a_new_trace(recorder: tuple[Recorder, str]) -> None:
    """Two traceparent fields are invalid: the callback carries one traceparent of a new trace."""
    target, base = recorder
    other = f"00-{'1' * 32}-1234567890123456-01"
    await _through_proxy(base, [("traceparent", other), ("traceparent", TRACEPARENT)])
    fields = _trace_pairs(target.requests[0])
    assert len(fields) == 1
    trace_id = fields[0][1].split("-")[1]
    assert trace_id not in {TRACE, "1" * 32}


SUITE = os.environ.get("W3C_TRACE_CONTEXT_SUITE")


@pytest.mark.skipif(
    not SUITE, reason="set W3C_TRACE_CONTEXT_SUITE to the suite's test/ folder (docs/tracecontext.md)"
)
async def test_the_official_suite_passes_through_the_proxy() -> None:
    """scripts/w3c-trace-context: TraceContextTest 37/37 at STRICT_LEVEL=2 and TraceContext2Test 1/1."""
    assert SUITE is not None
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(ROOT / "scripts" / "w3c-trace-context"),
        SUITE,
        "--export",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), 300)
    text = output.decode()
    assert process.returncode == 0, text
    assert "TraceContextTest: 37/37" in text
    assert "TraceContext2Test (spec level 2): 1/1" in text
