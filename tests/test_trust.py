"""Incoming trace context through the real proxy: trusted callers continue, others start a linked trace.

Baggage from an untrusted caller stops at the proxy; malformed or huge context headers never
break a request.
"""

from __future__ import annotations

import aiohttp
import pytest

from mes_trace_proxy.sim.otlp_sink import OtlpSink
from tests.conftest import MakeConfig, StartProxy, otlp_env
from tests.upstream import RecordingUpstream

CALLER_TRACE = "0af7651916cd43dd8448eb211c80319c"
TRACEPARENT = f"00-{CALLER_TRACE}-b7ad6b7169203331-01"
BAGGAGE = "tenant=acme,experiment=canary-7"


@pytest.mark.parametrize(
    ("trusted_callers", "continued"),
    [(["*"], True), (["127.0.0.0/8"], True), (["10.0.0.0/8"], False), ([], False)],
    ids=["all", "loopback-cidr", "other-network", "nobody"],
)
async def test_trust_decides_parent_link_and_baggage(
    trusted_callers: list[str],
    continued: bool,
    make_config: MakeConfig,
    start_proxy: StartProxy,
    recording_upstream: tuple[str, RecordingUpstream],
    otlp_sink: OtlpSink,
) -> None:
    """A trusted caller's trace and baggage go on; an untrusted one gets a new trace linked to its
    context, and its baggage never reaches the upstream."""
    base, upstream = recording_upstream
    config = make_config(base, doc={"privacy": {"trusted_callers": trusted_callers}})
    proxy = await start_proxy(config, environ=otlp_env(otlp_sink))
    headers = {"traceparent": TRACEPARENT, "baggage": BAGGAGE}
    async with (
        aiohttp.ClientSession() as client,
        client.get(f"{proxy.url('ingress')}/api/v1/orders/A-1", headers=headers) as resp,
    ):
        assert resp.status == 200
    spans = await otlp_sink.wait_for_spans(2, timeout=15)
    server = next(span for span in spans if span.kind == "SERVER")
    forwarded = upstream.last()
    if continued:
        assert server.trace_id == CALLER_TRACE
        assert server.parent_span_id == "b7ad6b7169203331"
        assert forwarded.header("baggage") == BAGGAGE
    else:
        assert server.trace_id != CALLER_TRACE
        assert server.parent_span_id == ""
        assert [(link.trace_id, link.span_id) for link in server.links] == [
            (CALLER_TRACE, "b7ad6b7169203331")
        ]
        assert forwarded.header("baggage") is None
        assert (forwarded.header("traceparent") or "").split("-")[1] == server.trace_id


@pytest.mark.parametrize(
    "headers",
    [
        {"traceparent": "00-" + "f" * 5000 + "-b7ad6b7169203331-01"},
        {"traceparent": TRACEPARENT, "tracestate": ",".join(f"k{i}=v{i}" for i in range(2000))[:8000]},
        {"traceparent": TRACEPARENT, "baggage": ("k=" + "v" * 7000)},
        {"traceparent": "zz-garbage", "tracestate": "===", "baggage": "%%%;;;=,,"},
    ],
    ids=["long-traceparent", "long-tracestate", "long-baggage", "garbage"],
)
async def test_malformed_or_huge_context_never_breaks_a_request(
    headers: dict[str, str],
    make_config: MakeConfig,
    start_proxy: StartProxy,
    recording_upstream: tuple[str, RecordingUpstream],
) -> None:
    """Over-long or malformed traceparent, tracestate and baggage still get the request through."""
    base, upstream = recording_upstream
    proxy = await start_proxy(make_config(base, doc={"privacy": {"trusted_callers": ["10.0.0.0/8"]}}))
    async with (
        aiohttp.ClientSession() as client,
        client.get(f"{proxy.url('ingress')}/api/v1/health", headers=headers) as resp,
    ):
        assert resp.status == 200
    assert upstream.last().header("baggage") is None
