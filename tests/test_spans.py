"""The lean spans: the same bytes, sampling decisions, limits and status rules as the SDK's spans.

Every case runs twice on one provider: once through the SDK tracer, once through the span
factory, with the id generator reset in between, and the two results are compared.
"""

from __future__ import annotations

import itertools
import logging
import random
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import pytest
from opentelemetry import trace as trace_api
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    AlwaysRecordSampler,
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
    TraceIdRatioBased,
)
from opentelemetry.trace import (
    INVALID_SPAN_CONTEXT,
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
    set_span_in_context,
)
from opentelemetry.util.types import Attributes, AttributeValue

from mes_trace_proxy import __version__
from mes_trace_proxy.config import Config
from mes_trace_proxy.export import Attempt, OtlpExportProcessor
from mes_trace_proxy.otlp_encode import OtlpSpanEncoder
from mes_trace_proxy.sim.otlp_sink import OtlpSink
from mes_trace_proxy.spans import ProxySpan, SpanFactory
from mes_trace_proxy.tracing import RouteSampler, Tracing, build_tracing
from tests.conftest import MakeConfig, otlp_env

SCOPE = "mes_trace_proxy"
STATUS_ROUTE = "/api/v1/orders/{orderId}/status"
POLL_ROUTE = "/poll"
NAME = f"PUT {STATUS_ROUTE}"
T0 = 1_764_000_000_000_000_000

# ── deterministic ids ────────────────────────────────────────────────────────────────────────


class _SeededRandom(IdGenerator):
    """Random-looking ids from a seeded generator: the same sequence again after ``reset``."""

    def __init__(self, random_ids: bool = False) -> None:
        self._random_ids = random_ids
        self.reset()

    def reset(self) -> None:
        self._rng = random.Random(6)

    def generate_span_id(self) -> int:
        return self._rng.getrandbits(64) or 1

    def generate_trace_id(self) -> int:
        return self._rng.getrandbits(128) or 1

    def is_trace_id_random(self) -> bool:
        return self._random_ids


class _SeededIds(_SeededRandom):
    """Seeded ids whose next root trace id can be chosen: the SDK tracer's side of a comparison
    with ``spans.start(trace_id=)`` (the SDK asks the generator for a root span's trace id)."""

    def __init__(self) -> None:
        super().__init__()
        self.chosen: int | None = None

    def generate_trace_id(self) -> int:
        return self.chosen if self.chosen is not None else super().generate_trace_id()


@pytest.fixture
def seeded(monkeypatch: pytest.MonkeyPatch) -> None:
    """``build_tracing`` gets a resettable id generator."""
    monkeypatch.setattr("mes_trace_proxy.tracing.OrderTraceIds", _SeededIds)


def _reset(tracing: Tracing) -> None:
    ids = tracing.ids
    assert isinstance(ids, _SeededIds)
    ids.reset()


# ── what is compared ─────────────────────────────────────────────────────────────────────────


def _shape(span: ReadableSpan) -> dict[str, object]:
    """Every field of a ReadableSpan, in comparable form (Status, Event and Link have no __eq__)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        info = span.instrumentation_info
    return {
        "name": span.name,
        "context": span.context,
        "parent": span.parent,
        "kind": span.kind,
        "start_time": span.start_time,
        "end_time": span.end_time,
        "attributes": list((span.attributes or {}).items()),
        "dropped_attributes": span.dropped_attributes,
        "events": [
            (e.name, e.timestamp, list((e.attributes or {}).items()), e.dropped_attributes)
            for e in span.events
        ],
        "dropped_events": span.dropped_events,
        "links": [
            (li.context, list((li.attributes or {}).items()), li.dropped_attributes) for li in span.links
        ],
        "dropped_links": span.dropped_links,
        "status": (span.status.status_code, span.status.description),
        "resource": span.resource,
        "scope": span.instrumentation_scope,
        "info": info,
        "json": _json(span),
    }


def _json(span: ReadableSpan) -> str:
    """The SDK's own rendering (what the console exporter prints), where JSON can hold the values."""
    try:
        return str(span.to_json())
    except TypeError:  # bytes values
        return "not JSON"


def _context_of(parent: SpanContext | None) -> Context:
    """The context the SDK tracer is given for a factory's ``parent``."""
    return set_span_in_context(NonRecordingSpan(parent)) if parent is not None else Context()


# ── 1. shape: the same bytes and the same ReadableSpan ───────────────────────────────────────

REMOTE = SpanContext(
    0x0AF7651916CD43DD8448EB211C80319C,
    0xB7AD6B7169203331,
    is_remote=True,
    trace_flags=TraceFlags(TraceFlags.SAMPLED),
    trace_state=TraceState([("vendor", "opaque"), ("crm", "p1")]),
)
FIRST_SPAN = SpanContext(0x11112222333344445555666677778888, 0x1234567890ABCDEF, is_remote=False)
CALLER = SpanContext(0x99990000AAAABBBBCCCCDDDDEEEEFFFF, 0x0FEDCBA987654321, is_remote=True)

SERVER_ATTRIBUTES: dict[str, AttributeValue] = {
    "http.request.method": "PUT",
    "url.path": "/api/v1/orders/ORD-0-00004/status",
    "url.query": "dry_run=false",
    "url.scheme": "http",
    "network.protocol.version": "1.1",
    "server.address": "mes.factory.internal",
    "server.port": 8080,
    "client.address": "10.0.0.7",
    "network.peer.address": "10.0.0.7",
    "user_agent.original": "crm-api/2.4",
    "mes.rule": "set-status",
    "mes.listener": "ingress",
    "mes.order.id": "ORD-0-00004",
    "mes.order.status": "MANUFACTURING_APPROVED",
    "http.request.header.content-type": ("application/json",),
    "http.request.header.x-request-id": ["r-1", "r-2"],  # a list: both make it a tuple
    "http.request.body.size": 151,
    "mes.order.first_sighting": True,
    "mes.retry": False,
    "mes.ratio": 0.25,
}
CLIENT_ATTRIBUTES: dict[str, AttributeValue] = {
    "http.request.method": "PUT",
    "server.address": "127.0.0.1",
    "server.port": 8081,
    "url.full": "http://127.0.0.1:8081/api/v1/orders/ORD-0-00004/status?dry_run=false",
}


def _sdk_request(tracing: Tracing) -> None:
    """One proxied call's SERVER and CLIENT spans, made by the SDK tracer."""
    tracer = tracing.tracer
    server = tracer.start_span(
        NAME,
        context=_context_of(REMOTE),
        kind=SpanKind.SERVER,
        attributes={"http.route": STATUS_ROUTE, **SERVER_ATTRIBUTES},
        links=[Link(CALLER, {"mes.link.kind": "caller"})],
        start_time=T0,
    )
    _server_rest(server)
    client = tracer.start_span(
        NAME,
        context=set_span_in_context(server),
        kind=SpanKind.CLIENT,
        attributes=CLIENT_ATTRIBUTES,
        start_time=T0 + 10_000,
    )
    _client_rest(client)
    server.end(T0 + 900_000)


def _lean_request(tracing: Tracing) -> list[trace_api.Span]:
    """The same call's spans made by the span factory; returns them (SERVER first)."""
    factory = tracing.spans
    server = factory.start(
        NAME,
        kind=SpanKind.SERVER,
        parent=REMOTE,
        route=STATUS_ROUTE,
        attributes=SERVER_ATTRIBUTES,
        links=[Link(CALLER, {"mes.link.kind": "caller"})],
        start_time=T0,
    )
    _server_rest(server)
    client = factory.start(
        NAME,
        kind=SpanKind.CLIENT,
        parent=server.get_span_context(),
        attributes=CLIENT_ATTRIBUTES,
        start_time=T0 + 10_000,
    )
    _client_rest(client)
    server.end(T0 + 900_000)
    return [server, client]


def _server_rest(span: trace_api.Span) -> None:
    span.set_attribute("http.response.status_code", 504)
    span.add_event(
        "mes.order.status_change",
        {"mes.order.status.from": "SUBMITTED", "mes.order.status.to": "MANUFACTURING_APPROVED"},
        timestamp=T0 + 500_000,
    )
    span.add_link(FIRST_SPAN, {"mes.link.kind": "order.first_span"})
    span.set_attribute("error.type", "timeout")
    span.set_status(Status(StatusCode.ERROR, "upstream timed out"))


def _client_rest(span: trace_api.Span) -> None:
    span.set_attribute("error.type", "timeout")
    span.set_status(StatusCode.ERROR, "timeout")
    span.end(T0 + 800_000)


@dataclass
class _Capture:
    """An OTLP transport that keeps each request body instead of sending it."""

    bodies: list[bytes] = field(default_factory=list)

    async def send(self, body: bytes, budget: float) -> Attempt:
        self.bodies.append(body)
        return Attempt(ok=True)

    async def aclose(self) -> None:
        return None


def _otlp_processor(transport: _Capture) -> OtlpExportProcessor:
    return OtlpExportProcessor(
        transport,
        max_queue_size=100,
        max_batch=100,
        delay_seconds=60,
        export_timeout_seconds=5,
    )


def _config(make_config: MakeConfig) -> Config:
    """Default rules plus a polling route sampled at 50 % (per-route ratio)."""
    return make_config(
        "http://127.0.0.1:1",
        doc={
            "rule_sets": {
                "mes": [
                    {"name": "poll", "method": "GET", "route": POLL_ROUTE, "sample": 0.5},
                    {
                        "name": "set-status",
                        "method": "PUT",
                        "route": STATUS_ROUTE,
                        "order_id": "path:orderId",
                        "status": "body:/status",
                    },
                ]
            }
        },
    )


@pytest.mark.usefixtures("seeded")
async def test_a_proxied_call_gives_the_sdk_bytes_and_readable_spans(make_config: MakeConfig) -> None:
    """SERVER + CLIENT spans with 20 attributes, an event, links and errors: identical to the SDK's."""
    capture = _Capture()
    otlp = _otlp_processor(capture)
    memory = InMemorySpanExporter()
    tracing = build_tracing(
        _config(make_config),
        {"OTEL_TRACES_EXPORTER": "none"},
        extra_processors=[otlp, SimpleSpanProcessor(memory)],
    )
    otlp.start()
    try:
        _reset(tracing)
        _sdk_request(tracing)
        await otlp.flush()
        _reset(tracing)
        lean = _lean_request(tracing)
        await otlp.flush()
    finally:
        await otlp.aclose()
        tracing.shutdown()

    assert all(isinstance(span, ProxySpan) for span in lean)
    sdk_body, lean_body = capture.bodies
    assert lean_body == sdk_body
    sdk_spans, lean_spans = memory.get_finished_spans()[:2], memory.get_finished_spans()[2:]
    assert [_shape(s) for s in lean_spans] == [_shape(s) for s in sdk_spans]
    # The lean spans themselves (in the order they ended) encode as the ReadableSpans made from them.
    server_span, client_span = lean
    assert isinstance(server_span, ProxySpan)
    assert isinstance(client_span, ProxySpan)
    encoder = OtlpSpanEncoder()
    assert encoder.encode_request([client_span, server_span]) == encoder.encode_request(lean_spans)
    # What the proxy relies on: the route first, the list made a tuple, the parent's tracestate kept.
    server = lean_spans[1]
    assert server.kind is SpanKind.SERVER
    assert next(iter(server.attributes or {})) == "http.route"
    assert (server.attributes or {})["http.request.header.x-request-id"] == ("r-1", "r-2")
    assert server.context is not None
    assert server.context.trace_state == REMOTE.trace_state


# ── 2. sampling: the same decision, flags and tracestate as the SDK ──────────────────────────

_LOW = (1 << 64) - 1
_RATIO_01_BOUND = TraceIdRatioBased.get_bound_for_rate(0.01)
#: Trace ids around the ratio bounds of 0.5 and 0.01, and a few ordinary ones.
TRACE_IDS = (
    1,
    (1 << 63) - 1,
    1 << 63,
    _LOW,
    (0xABC << 64) | (_RATIO_01_BOUND - 1),
    (0xABC << 64) | _RATIO_01_BOUND,
    0x0AF7651916CD43DD8448EB211C80319C,
    0xFFFFFFFFFFFFFFFF0000000000000000,
)
STATE = TraceState([("vendor", "x")])


def _parents(trace_id: int) -> dict[str, SpanContext | None]:
    span_id = 0x00F067AA0BA902B7
    return {
        "none": None,
        "remote sampled": SpanContext(trace_id, span_id, True, TraceFlags(0x01)),
        "remote unsampled": SpanContext(trace_id, span_id, True, TraceFlags(0x00)),
        "remote sampled, tracestate": SpanContext(trace_id, span_id, True, TraceFlags(0x01), STATE),
        "remote unsampled, tracestate": SpanContext(trace_id, span_id, True, TraceFlags(0x00), STATE),
        "remote sampled, random trace id": SpanContext(trace_id, span_id, True, TraceFlags(0x03)),
        "local sampled": SpanContext(trace_id, span_id, False, TraceFlags(0x01), STATE),
        "local unsampled": SpanContext(trace_id, span_id, False, TraceFlags(0x00)),
        "invalid": INVALID_SPAN_CONTEXT,
    }


@dataclass(frozen=True)
class _Start:
    """One ``SpanFactory.start`` call, and its SDK equivalent."""

    kind: SpanKind
    route: str | None = None
    attributes: Mapping[str, AttributeValue] | None = None
    links: Sequence[Link] = ()

    def merged(self) -> Mapping[str, AttributeValue] | None:
        if self.route is None:
            return self.attributes
        return {"http.route": self.route, **(self.attributes or {})}


STARTS = {
    "server, per-route ratio": _Start(SpanKind.SERVER, POLL_ROUTE, {"mes.listener": "ingress"}),
    "server, per-route always": _Start(SpanKind.SERVER, STATUS_ROUTE),
    "server, unknown route": _Start(SpanKind.SERVER, "/other", links=(Link(CALLER),)),
    "server, no route": _Start(SpanKind.SERVER, None, {"mes.listener": "ingress"}),
    "server, route among the attributes": _Start(SpanKind.SERVER, None, {"http.route": POLL_ROUTE}),
    "server, attributes override the route": _Start(
        SpanKind.SERVER, STATUS_ROUTE, {"http.route": POLL_ROUTE}
    ),
    "client with a status route": _Start(SpanKind.CLIENT, STATUS_ROUTE, {"url.full": "http://mes/x"}),
    "internal": _Start(SpanKind.INTERNAL),
}

SAMPLERS = {
    "always_on": {"OTEL_TRACES_SAMPLER": "always_on"},
    "always_off": {"OTEL_TRACES_SAMPLER": "always_off"},
    "traceidratio 0.5": {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.5"},
    "traceidratio 0.01": {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.01"},
    "parentbased_always_on (default)": {},
    "parentbased_always_off": {"OTEL_TRACES_SAMPLER": "parentbased_always_off"},
    "parentbased_traceidratio 0.5": {
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": "0.5",
    },
    "nothing exported (ALWAYS_OFF)": {"export": "none"},
}


def _build(make_config: MakeConfig, environ: Mapping[str, str]) -> Tracing:
    env = {"OTEL_TRACES_EXPORTER": "none", **{k: v for k, v in environ.items() if k != "export"}}
    extra: list[SpanProcessor] = [] if "export" in environ else [SimpleSpanProcessor(InMemorySpanExporter())]
    return build_tracing(_config(make_config), env, extra_processors=extra)


def _compare_start(
    tracing: Tracing, start: _Start, parent: SpanContext | None, trace_id: int | None, where: str
) -> None:
    """Start the span both ways from the same ids and compare what a caller can see of it."""
    _reset(tracing)
    ids = tracing.ids
    assert isinstance(ids, _SeededIds)
    ids.chosen = trace_id
    try:
        sdk = tracing.tracer.start_span(
            NAME, context=_context_of(parent), kind=start.kind, attributes=start.merged(), links=start.links
        )
    finally:
        ids.chosen = None
    _reset(tracing)
    lean = tracing.spans.start(
        NAME,
        kind=start.kind,
        parent=parent,
        route=start.route,
        attributes=start.attributes,
        links=start.links,
        trace_id=trace_id,
    )
    assert lean.is_recording() == sdk.is_recording(), where
    assert isinstance(lean, ProxySpan) == sdk.is_recording(), where
    if not sdk.is_recording():
        assert type(lean) is NonRecordingSpan, where
    sdk_context, lean_context = sdk.get_span_context(), lean.get_span_context()
    assert lean_context == sdk_context, where  # ids, is_remote, flags, tracestate, validity
    assert lean_context.trace_flags == sdk_context.trace_flags, where
    assert dict(lean_context.trace_state) == dict(sdk_context.trace_state), where
    if isinstance(lean, ProxySpan):
        assert list(lean.attributes.items()) == list((sdk.attributes or {}).items()), where  # type: ignore[attr-defined]
        assert lean.parent == sdk.parent, where  # type: ignore[attr-defined]
        assert [li.context for li in lean.links] == [li.context for li in sdk.links], where  # type: ignore[attr-defined]
    sdk.end()
    lean.end()


@pytest.mark.usefixtures("seeded")
@pytest.mark.parametrize("start", list(STARTS.values()), ids=list(STARTS))
@pytest.mark.parametrize("environ", list(SAMPLERS.values()), ids=list(SAMPLERS))
def test_sampling_matches_the_sdk_and_asks_no_sampler(
    make_config: MakeConfig, environ: Mapping[str, str], start: _Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    """For every sampler, parent and trace id the factory's span is the SDK's, decided without a call."""
    tracing = _build(make_config, environ)
    asked: list[str] = []
    sampler = tracing.provider.sampler
    real = sampler.should_sample

    def counting(*args: Any, **kwargs: Any) -> SamplingResult:
        asked.append("asked")
        return real(*args, **kwargs)

    monkeypatch.setattr(sampler, "should_sample", counting)
    try:
        for trace_id in TRACE_IDS:
            for label, parent in _parents(trace_id).items():
                roots = (None, trace_id) if parent is None or not parent.is_valid else (None,)
                for forced in roots:
                    asked.clear()
                    _compare_start(tracing, start, parent, forced, f"{label}, trace id {trace_id:032x}")
                    # Two starts: the SDK's asks once; the factory's compiled plan never does.
                    assert len(asked) == 1, label
    finally:
        tracing.shutdown()


class _Custom(Sampler):
    """A sampler the factory cannot compile: samples even trace ids, adds an attribute, edits tracestate."""

    def __init__(self) -> None:
        self.calls: list[tuple[object, ...]] = []

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: TraceState | None = None,
    ) -> SamplingResult:
        parent = trace_api.get_current_span(parent_context).get_span_context()
        self.calls.append((parent, trace_id, name, kind, dict(attributes or {}), tuple(links or ())))
        state = (parent.trace_state if parent.is_valid else TraceState()).add("mes", "seen")
        decision = Decision.RECORD_AND_SAMPLE if trace_id % 2 == 0 else Decision.DROP
        return SamplingResult(decision, {**(attributes or {}), "sampler.note": "custom"}, state)

    def get_description(self) -> str:
        return "Custom"


GENERAL_SAMPLERS: dict[str, Callable[[], Sampler]] = {
    "custom": _Custom,
    "record only (AlwaysRecordSampler)": lambda: AlwaysRecordSampler(ALWAYS_OFF),
    "parent-based over a record-only root": lambda: ParentBased(AlwaysRecordSampler(TraceIdRatioBased(0.5))),
    "route sampler with a custom route": lambda: RouteSampler(
        ParentBased(ALWAYS_ON), {POLL_ROUTE: _Custom()}
    ),
    "route sampler with a custom default": lambda: RouteSampler(_Custom(), {STATUS_ROUTE: ALWAYS_ON}),
    "parent-based with ratio delegates": lambda: ParentBased(
        TraceIdRatioBased(0.5),
        remote_parent_sampled=TraceIdRatioBased(0.01),
        remote_parent_not_sampled=ALWAYS_ON,
        local_parent_sampled=ALWAYS_OFF,
        local_parent_not_sampled=TraceIdRatioBased(0.5),
    ),
}


def _provider_and_factory(
    sampler: Sampler,
    ids: IdGenerator,
    processors: Sequence[SpanProcessor] = (),
    limits: SpanLimits | None = None,
) -> tuple[TracerProvider, SpanFactory]:
    provider = TracerProvider(
        resource=Resource.create({"service.name": "spans-test"}),
        sampler=sampler,
        id_generator=ids,
        span_limits=limits,
        shutdown_on_exit=False,
    )
    for processor in processors:
        provider.add_span_processor(processor)
    factory = SpanFactory(
        provider, processors=processors, limits=limits, scope_name=SCOPE, scope_version=__version__
    )
    return provider, factory


@pytest.mark.parametrize("random_ids", [False, True], ids=["plain ids", "random-trace-id ids"])
@pytest.mark.parametrize("make", list(GENERAL_SAMPLERS.values()), ids=list(GENERAL_SAMPLERS))
def test_other_samplers_are_asked_as_the_sdk_asks_them(make: Callable[[], Sampler], random_ids: bool) -> None:
    """Samplers without a fast path get the SDK's arguments; their decision, attributes and state hold."""
    ids = _SeededRandom(random_ids)
    sampler = make()
    provider, factory = _provider_and_factory(sampler, ids)
    tracer = provider.get_tracer(SCOPE, __version__)
    customs = [s for s in _samplers_within(sampler) if isinstance(s, _Custom)]
    for trace_id, start in itertools.product(TRACE_IDS, STARTS.values()):
        for label, parent in _parents(trace_id).items():
            where = f"{label}, {start}, trace id {trace_id:032x}"
            for custom in customs:
                custom.calls.clear()
            ids.reset()
            sdk = tracer.start_span(
                NAME,
                context=_context_of(parent),
                kind=start.kind,
                attributes=start.merged(),
                links=start.links,
            )
            ids.reset()
            lean = factory.start(
                NAME,
                kind=start.kind,
                parent=parent,
                route=start.route,
                attributes=start.attributes,
                links=start.links,
            )
            assert lean.get_span_context() == sdk.get_span_context(), where
            assert lean.is_recording() == sdk.is_recording(), where
            if isinstance(lean, ProxySpan):
                assert list(lean.attributes.items()) == list(sdk.attributes.items()), where  # type: ignore[attr-defined]
            for custom in customs:
                if custom.calls:
                    assert len(custom.calls) == 2, where
                    assert custom.calls[0] == custom.calls[1], where
            sdk.end()
            lean.end()


def _samplers_within(sampler: Sampler) -> Iterator[Sampler]:
    yield sampler
    if isinstance(sampler, RouteSampler):
        yield sampler.default
        yield from sampler.per_route.values()


# ── 3. limits, validation, status rules, ending ──────────────────────────────────────────────

LIMITS = SpanLimits(
    max_span_attributes=6,
    max_event_attributes=2,
    max_link_attributes=2,
    max_events=3,
    max_links=2,
    max_attribute_length=8,
    max_span_attribute_length=12,
)


class _NoStr:
    """A value with neither __str__ nor __repr__ of its own: the SDK replaces it with None."""

    __slots__ = ()


Ops = Callable[[trace_api.Span], None]


def _many_attributes(span: trace_api.Span) -> None:
    for index in range(9):
        span.set_attribute(f"a{index}", index)


def _overwrite_moves_to_end(span: trace_api.Span) -> None:
    span.set_attributes({"a": 1, "b": 2, "c": 3})
    span.set_attribute("a", 4)
    span.set_attributes({"b": "again", "d": 5})


def _invalid_keys(span: trace_api.Span) -> None:
    span.set_attribute("", 1)
    span.set_attribute(7, 1)  # type: ignore[arg-type]
    span.set_attributes({"": 1, 8: "eight", _NoStr(): 1, "ok": True})  # type: ignore[dict-item]


def _values_cleaned(span: trace_api.Span) -> None:
    span.set_attributes(
        {
            "long": "x" * 40,
            "list": ["a", "b"],
            "long items": ("y" * 20, "z"),
            "mixed": [1, "two", 3.0, True],
            "nested": [["a"], ("b",)],
        }
    )
    span.set_attribute("decimal", Decimal("1.50"))  # type: ignore[arg-type]
    span.set_attribute("object", _NoStr())  # type: ignore[arg-type]
    span.set_attribute("bytes", b"\x00\x01")


def _mapping_and_none_values(span: trace_api.Span) -> None:
    span.set_attributes({"map": {"k": "v" * 30, 3: 4}, "none": None, "enum": SpanKind.SERVER})  # type: ignore[dict-item]


def _events_over_limits(span: trace_api.Span) -> None:
    for index in range(5):
        span.add_event(
            f"e{index}",
            {"a": "long value here", "b": index, "c": [1, 2], "": 0},
            timestamp=T0 + index,
        )
    span.add_event("no attributes", timestamp=T0 + 9)


def _links_over_limits(span: trace_api.Span) -> None:
    span.add_link(FIRST_SPAN, {"a": "x" * 20, "b": 1, "c": 2})
    span.add_link(INVALID_SPAN_CONTEXT)  # ignored: invalid, no attributes, no tracestate
    span.add_link(INVALID_SPAN_CONTEXT, {"kept": "because attributes"})
    span.add_link(CALLER)


def _status_ok_is_final(span: trace_api.Span) -> None:
    span.set_status(Status(StatusCode.OK))
    span.set_status(Status(StatusCode.ERROR, "too late"))


def _status_unset_ignored(span: trace_api.Span) -> None:
    span.set_status(StatusCode.ERROR, "first")
    span.set_status(Status(StatusCode.UNSET))
    span.set_status(StatusCode.UNSET)


def _status_description_only_with_error(span: trace_api.Span) -> None:
    span.set_status(StatusCode.OK, "ignored")


def _status_both_forms(span: trace_api.Span) -> None:
    span.set_status(Status(StatusCode.ERROR, "a"), "ignored too")
    span.set_status(StatusCode.ERROR, "b")


def _status_ok_with_description(span: trace_api.Span) -> None:
    span.set_status(Status(StatusCode.OK, "ok is not described"))


def _renamed(span: trace_api.Span) -> None:
    span.update_name("GET /renamed")


def _after_end_ignored(span: trace_api.Span) -> None:
    span.set_attribute("before", 1)
    span.end(T0 + 100)
    span.end(T0 + 200)
    span.set_attribute("after", 1)
    span.set_attributes({"after": 2})
    span.add_event("after", timestamp=T0 + 300)
    span.add_link(FIRST_SPAN)
    span.set_status(StatusCode.ERROR, "after")
    span.update_name("after")


def _exception(span: trace_api.Span) -> None:
    try:
        raise ConnectionResetError("upstream reset")
    except ConnectionResetError as error:
        span.record_exception(error, {"mes.extra": "x"}, timestamp=T0 + 5, escaped=True)
    span.record_exception(ValueError("plain"), timestamp=T0 + 6)


LIMIT_CASES: dict[str, tuple[dict[str, AttributeValue] | None, Sequence[Link], Ops]] = {
    "over the count limit at start": ({f"s{i}": i for i in range(9)}, (), lambda span: None),
    "over the count limit by set_attribute": (None, (), _many_attributes),
    "an attribute set again moves to the end": ({"z": 0}, (), _overwrite_moves_to_end),
    "invalid keys dropped and counted": (None, (), _invalid_keys),
    "invalid keys at start": ({"": 1, 5: "five", "ok": 1}, (), lambda span: None),  # type: ignore[dict-item]
    "values truncated, sequences made tuples": (None, (), _values_cleaned),
    "long values at start": ({"long": "q" * 30, "tuple": ("w" * 30,)}, (), lambda span: None),
    "mappings, None and enums": (None, (), _mapping_and_none_values),
    "events over their limits": (None, (), _events_over_limits),
    "links over their limits at start": (
        None,
        (
            Link(FIRST_SPAN, {"a": 1, "b": 2, "c": 3}),
            Link(INVALID_SPAN_CONTEXT),
            Link(CALLER),
            Link(REMOTE, {"k": "v"}),
        ),
        lambda span: None,
    ),
    "links over their limits by add_link": (None, (), _links_over_limits),
    # Regression: _set_links read link.attributes before checking for None (AttributeError).
    "a None among the links is skipped": (None, (None, Link(CALLER), None), lambda span: None),  # type: ignore[dict-item]
    "status OK is final": (None, (), _status_ok_is_final),
    "status UNSET ignored": (None, (), _status_unset_ignored),
    "status description only with ERROR": (None, (), _status_description_only_with_error),
    "status object and description": (None, (), _status_both_forms),
    "status OK with a description": (None, (), _status_ok_with_description),
    "renamed": (None, (), _renamed),
    "nothing after end, ended once": (None, (), _after_end_ignored),
    "exceptions recorded": (None, (), _exception),
}


@pytest.mark.parametrize("case", list(LIMIT_CASES.values()), ids=list(LIMIT_CASES))
def test_limits_validation_and_status_rules_match_the_sdk(
    case: tuple[dict[str, AttributeValue] | None, Sequence[Link], Ops], caplog: pytest.LogCaptureFixture
) -> None:
    """Counts, eviction order, cleaned values, status rules and ending: equal ReadableSpans."""
    attributes, links, ops = case
    ids = _SeededRandom()
    memory = InMemorySpanExporter()
    provider, factory = _provider_and_factory(ALWAYS_ON, ids, [SimpleSpanProcessor(memory)], LIMITS)
    tracer = provider.get_tracer(SCOPE, __version__)
    caplog.set_level(logging.ERROR)  # both sides warn about what they drop; the spans say it all
    for make in ("sdk", "lean"):
        ids.reset()
        # Links are rebuilt: the SDK replaces the attributes of the Link objects it is given.
        fresh = [None if li is None else Link(li.context, li.attributes) for li in links]
        if make == "sdk":
            span = tracer.start_span(
                NAME,
                context=Context(),
                kind=SpanKind.SERVER,
                attributes=attributes,
                links=fresh,
                start_time=T0,
            )
        else:
            span = factory.start(
                NAME, kind=SpanKind.SERVER, parent=None, attributes=attributes, links=fresh, start_time=T0
            )
        ops(span)
        span.end(T0 + 1_000)
    sdk, lean = memory.get_finished_spans()
    assert _shape(lean) == _shape(sdk)


def test_route_first_and_counted_against_the_limit() -> None:
    """``http.route`` is the first attribute and counts like the others (here: evicted first)."""
    ids = _SeededRandom()
    memory = InMemorySpanExporter()
    provider, factory = _provider_and_factory(ALWAYS_ON, ids, [SimpleSpanProcessor(memory)], LIMITS)
    attributes: dict[str, AttributeValue] = {f"k{i}": i for i in range(6)}
    ids.reset()
    provider.get_tracer(SCOPE, __version__).start_span(
        NAME, context=Context(), attributes={"http.route": STATUS_ROUTE, **attributes}, start_time=T0
    ).end(T0 + 1)
    ids.reset()
    factory.start(
        NAME, kind=SpanKind.INTERNAL, parent=None, route=STATUS_ROUTE, attributes=attributes, start_time=T0
    ).end(T0 + 1)
    sdk, lean = memory.get_finished_spans()
    assert _shape(lean) == _shape(sdk)
    assert lean.dropped_attributes == 1
    assert "http.route" not in (lean.attributes or {})


def test_sdk_disabled_gives_the_invalid_span(monkeypatch: pytest.MonkeyPatch) -> None:
    """OTEL_SDK_DISABLED=true: the SDK's NoOpTracer gives the invalid span, and so does the factory."""
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    _, factory = _provider_and_factory(ALWAYS_ON, _SeededRandom())
    span = factory.start(NAME, kind=SpanKind.SERVER, parent=REMOTE)
    assert span is trace_api.INVALID_SPAN


def test_the_trace_id_is_forced_only_for_roots() -> None:
    """``trace_id`` picks a root span's trace id and is ignored under a valid parent."""
    _, factory = _provider_and_factory(ALWAYS_ON, _SeededRandom())
    root = factory.start(NAME, kind=SpanKind.SERVER, parent=None, trace_id=0xABC)
    child = factory.start(NAME, kind=SpanKind.SERVER, parent=REMOTE, trace_id=0xABC)
    assert root.get_span_context().trace_id == 0xABC
    assert child.get_span_context().trace_id == REMOTE.trace_id


# ── 4. the real export path: lean spans reach a real OTLP receiver whole ─────────────────────


async def test_lean_spans_reach_a_real_receiver_whole(make_config: MakeConfig, otlp_sink: OtlpSink) -> None:
    """Through build_tracing's own OTLP/HTTP exporter to the sink: every field decoded intact."""
    tracing = build_tracing(_config(make_config), otlp_env(otlp_sink))
    tracing.start()
    try:
        server, _ = _lean_request(tracing)
        received = {span.kind: span for span in await otlp_sink.wait_for_spans(2)}
    finally:
        await tracing.aclose()
        tracing.shutdown()
    got_server, got_client = received["SERVER"], received["CLIENT"]
    assert isinstance(server, ProxySpan)
    context = server.get_span_context()
    assert got_server.name == NAME
    assert got_server.trace_id == f"{REMOTE.trace_id:032x}"
    assert got_server.span_id == f"{context.span_id:016x}"
    assert got_server.parent_span_id == f"{REMOTE.span_id:016x}"
    assert got_client.parent_span_id == got_server.span_id
    assert (got_server.start_ns, got_server.end_ns) == (T0, T0 + 900_000)
    expected = {
        "http.route": STATUS_ROUTE,
        **SERVER_ATTRIBUTES,
        "http.request.header.x-request-id": ("r-1", "r-2"),
        "http.response.status_code": 504,
        "error.type": "timeout",
    }
    assert dict(got_server.attributes) == expected
    (event,) = got_server.events
    assert (event.name, event.time_ns) == ("mes.order.status_change", T0 + 500_000)
    assert dict(event.attributes) == {
        "mes.order.status.from": "SUBMITTED",
        "mes.order.status.to": "MANUFACTURING_APPROVED",
    }
    assert [(link.span_id, dict(link.attributes)) for link in got_server.links] == [
        (f"{CALLER.span_id:016x}", {"mes.link.kind": "caller"}),
        (f"{FIRST_SPAN.span_id:016x}", {"mes.link.kind": "order.first_span"}),
    ]
    assert (got_server.status_code, got_server.status_message) == ("ERROR", "upstream timed out")
    assert dict(got_client.attributes) == {**CLIENT_ATTRIBUTES, "error.type": "timeout"}
    assert got_server.resource["service.name"] == "mes-api"
    assert got_server.scope_name == SCOPE
    assert tracing.export_stats().exported == 2


@pytest.mark.parametrize(
    "limits",
    [None, LIMITS, SpanLimits(max_span_attribute_length=4)],
    ids=["no limits", "count limit", "length limit"],
)
def test_own_attributes_export_as_set_attributes_would(limits: SpanLimits | None) -> None:
    """set_own_attributes (the proxy's tables, unchecked) gives the exported values set_attributes
    gives, and falls back to it whenever a limit could apply."""
    own: dict[str, AttributeValue] = {
        "http.route": STATUS_ROUTE,
        "url.path": "/api/v1/orders/A-1/status",
        "server.port": 8080,
        "http.request.header.content-type": ("application/json",),
        "mes.order.id": "A-1",
    }
    got = []
    for setter in ("set_attributes", "set_own_attributes"):
        memory = InMemorySpanExporter()
        ids = _SeededRandom()
        _, factory = _provider_and_factory(ALWAYS_ON, ids, [SimpleSpanProcessor(memory)], limits)
        span = factory.start(NAME, kind=SpanKind.SERVER, parent=None, route=STATUS_ROUTE, start_time=T0)
        getattr(span, setter)(own)
        getattr(span, setter)({"http.response.status_code": 200, "http.response.body.size": 50})
        span.end(T0 + 1)
        (finished,) = memory.get_finished_spans()
        got.append((dict(finished.attributes or {}), finished.dropped_attributes))
    assert got[0] == got[1]
