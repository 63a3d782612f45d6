"""Order correlation: a chosen root trace id, the mode table, and the three modes through the proxy."""

from __future__ import annotations

import aiohttp
import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from mes_trace_proxy.correlation import OrderTraceIds, order_trace_for
from mes_trace_proxy.sim.otlp_sink import OtlpSink, ReceivedSpan
from mes_trace_proxy.tracecontext import format_trace_id, order_trace_id
from mes_trace_proxy.tracing import Tracing, build_tracing
from tests.conftest import MakeConfig, StartProxy, otlp_env
from tests.upstream import RecordingUpstream

CHOSEN = 0x1234_5678_9ABC_DEF0_1122_3344_5566_7788
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.fixture
def tracing(make_config: MakeConfig) -> Tracing:
    """The proxy's tracing, exporting to memory."""
    config = make_config("http://127.0.0.1:9")
    return build_tracing(
        config,
        {"OTEL_TRACES_EXPORTER": "none"},
        extra_processors=(SimpleSpanProcessor(InMemorySpanExporter()),),
    )


def test_a_root_span_takes_the_chosen_trace_id(tracing: Tracing) -> None:
    """spans.start(trace_id=) makes a root span in that trace; without it, trace ids are random."""
    chosen = tracing.spans.start("chosen", kind=SpanKind.SERVER, parent=None, trace_id=CHOSEN)
    before = tracing.spans.start("a", kind=SpanKind.SERVER, parent=None)
    after = tracing.spans.start("b", kind=SpanKind.SERVER, parent=None, trace_id=None)
    assert chosen.get_span_context().trace_id == CHOSEN
    assert CHOSEN not in {before.get_span_context().trace_id, after.get_span_context().trace_id}
    assert before.get_span_context().trace_id != after.get_span_context().trace_id


def test_no_root_claims_the_random_trace_id_flag(tracing: Tracing) -> None:
    """Derived or random, no root's flags carry Level 2's random bit (a derived id is not random)."""
    assert OrderTraceIds().is_trace_id_random() is False
    for trace_id in (CHOSEN, None):
        span = tracing.spans.start("root", kind=SpanKind.SERVER, parent=None, trace_id=trace_id)
        assert span.get_span_context().trace_flags & 0x02 == 0


def test_a_span_with_a_parent_keeps_the_parent_trace(tracing: Tracing) -> None:
    """The chosen id is for roots only: a child stays in its parent's trace."""
    parent = tracing.spans.start("parent", kind=SpanKind.SERVER, parent=None)
    child = tracing.spans.start(
        "child", kind=SpanKind.CLIENT, parent=parent.get_span_context(), trace_id=CHOSEN
    )
    assert child.get_span_context().trace_id == parent.get_span_context().trace_id != CHOSEN


@pytest.mark.parametrize(
    ("mode", "order_id", "has_parent", "tracked", "derived"),
    [
        ("trace-per-order", "ORD-1", False, True, True),
        ("trace-per-order", "ORD-1", True, True, False),
        ("trace-per-order", "ORD-1", False, False, False),
        ("trace-per-order", None, False, True, False),
        ("trace-per-order", "", False, True, False),
        ("link", "ORD-1", False, True, False),
        ("off", "ORD-1", False, True, False),
    ],
    ids=[
        "per-order-known",
        "caller-context-wins",
        "untracked-order",
        "no-order-id",
        "empty-order-id",
        "link-mode",
        "off-mode",
    ],
)
def test_mode_table(mode: str, order_id: str | None, has_parent: bool, tracked: bool, derived: bool) -> None:
    """Only trace-per-order, without a caller's context, for a tracked order, derives the trace id."""
    got = order_trace_for(mode, order_id, has_parent=has_parent, tracked=tracked)
    assert got == (order_trace_id("ORD-1") if derived else None)


# ── the modes through a real proxy, exported over OTLP ───────────────────────────────────────


async def _calls(url: str, *, traceparent: bool = False) -> list[str]:
    """An order's life as CRM and the dashboard drive it; returns the X-Trace-Id of each call."""
    traces: list[str] = []
    headers = {"traceparent": TRACEPARENT} if traceparent else {}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{url}/api/v1/orders/ORD-T/price-calculation", headers=headers) as resp:
            traces.append(resp.headers["X-Trace-Id"])
        for status in ("PRICE_CALCULATED", "MANUFACTURING_APPROVED"):
            async with http.put(f"{url}/api/v1/orders/ORD-T/status", json={"status": status}) as resp:
                traces.append(resp.headers["X-Trace-Id"])
        async with http.get(f"{url}/api/v1/orders/ORD-T") as resp:
            traces.append(resp.headers["X-Trace-Id"])
        async with http.get(f"{url}/api/v1/orders/ORD-UNSEEN") as resp:
            traces.append(resp.headers["X-Trace-Id"])
    return traces


def _server_spans(spans: list[ReceivedSpan]) -> list[ReceivedSpan]:
    return sorted((s for s in spans if s.kind == "SERVER"), key=lambda s: s.start_ns)


async def test_trace_per_order_puts_the_order_in_one_trace(
    make_config: MakeConfig,
    start_proxy: StartProxy,
    recording_upstream: tuple[str, RecordingUpstream],
    otlp_sink: OtlpSink,
) -> None:
    """Without caller context each call on the order is a root span of the order's trace; others are not."""
    base, upstream = recording_upstream
    proxy = await start_proxy(make_config(base, correlation="trace-per-order"), environ=otlp_env(otlp_sink))
    traces = await _calls(proxy.url("ingress"))
    order_trace = format_trace_id(order_trace_id("ORD-T"))
    assert traces[:4] == [order_trace] * 4
    assert traces[4] != order_trace  # a read of an order nobody set a status for stays random
    servers = _server_spans(await otlp_sink.wait_for_spans(10, timeout=15))
    in_order = [s for s in servers if s.trace_id == order_trace]
    assert len(in_order) == 4
    assert all(s.parent_span_id == "" and s.links == () for s in in_order)
    assert len({s.span_id for s in in_order}) == 4
    # MES sees the order's trace too, so its own spans (if any) join it.
    assert (upstream.received[0].header("traceparent") or "").split("-")[1] == order_trace


async def test_trace_per_order_continues_a_callers_trace(
    make_config: MakeConfig,
    start_proxy: StartProxy,
    recording_upstream: tuple[str, RecordingUpstream],
    otlp_sink: OtlpSink,
) -> None:
    """A call with a trusted traceparent stays in the caller's trace even in trace-per-order mode."""
    base, _ = recording_upstream
    proxy = await start_proxy(make_config(base, correlation="trace-per-order"), environ=otlp_env(otlp_sink))
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{proxy.url('ingress')}/api/v1/orders/ORD-C/price-calculation",
            headers={"traceparent": TRACEPARENT},
        ) as resp,
    ):
        assert resp.headers["X-Trace-Id"] == TRACEPARENT.split("-")[1]
    (server,) = _server_spans(await otlp_sink.wait_for_spans(2, timeout=15))
    assert (server.trace_id, server.parent_span_id) == tuple(TRACEPARENT.split("-")[1:3])


@pytest.mark.parametrize(("mode", "links"), [("link", True), ("off", False)])
async def test_link_and_off_modes(
    make_config: MakeConfig,
    start_proxy: StartProxy,
    recording_upstream: tuple[str, RecordingUpstream],
    otlp_sink: OtlpSink,
    mode: str,
    links: bool,
) -> None:
    """link: each later call's span links the order's first span, in its own trace; off: no links."""
    base, _ = recording_upstream
    proxy = await start_proxy(make_config(base, correlation=mode), environ=otlp_env(otlp_sink))
    traces = await _calls(proxy.url("ingress"))
    assert len(set(traces)) == 5
    servers = _server_spans(await otlp_sink.wait_for_spans(10, timeout=15))
    first, *later = servers[:4]
    for span in later:
        expected = [(first.trace_id, first.span_id)] if links else []
        assert [(link.trace_id, link.span_id) for link in span.links] == expected
    if links:
        assert dict(later[0].links[0].attributes) == {"mes.link.kind": "order.first_span"}
