"""The direct OTLP encoder: its bytes parse to the very message the SDK's encoder builds."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import (
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
from opentelemetry.util.types import Attributes

from mes_trace_proxy.otlp_encode import ATTRIBUTE_CACHE_SIZE, OtlpSpanEncoder, encode_request

_REMOTE = SpanContext(
    trace_id=0x0AF7651916CD43DD8448EB211C80319C,
    span_id=0xB7AD6B7169203331,
    is_remote=True,
    trace_flags=TraceFlags(TraceFlags.SAMPLED),
    trace_state=TraceState([("vendor", "opaque"), ("mes", "p1")]),
)
_LOCAL_LINKED = SpanContext(trace_id=0x1234, span_id=0x5678, is_remote=False)

_ATTRIBUTES: Attributes = {
    "http.request.method": "POST",
    "http.route": "/orders/{id}/status",
    "server.port": 8080,
    "negative": -42,
    "big": (1 << 63) - 1,
    "ratio": 0.25,
    "minus.zero": -0.0,
    "infinite": float("inf"),
    "flag": True,
    "off": False,
    "empty": "",
    "zero": 0,
    "names": ("a", "b", ""),
    "numbers": (1, -2, 3),
    "floats": (1.5, -0.0),
    "bools": (True, False),
    "unicode": "Ünïcødé ✓",
}


def _provider(resource: Resource) -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def _spans_of(
    make: Callable[[TracerProvider], None], resource: Resource | None = None
) -> tuple[ReadableSpan, ...]:
    provider, exporter = _provider(resource or Resource.create({"service.name": "mes-trace-proxy"}))
    make(provider)
    provider.shutdown()
    return exporter.get_finished_spans()


def _root_server(provider: TracerProvider) -> None:
    with provider.get_tracer("mes_trace_proxy", "1.0").start_as_current_span(
        "POST /orders/{id}/status", kind=SpanKind.SERVER, attributes=_ATTRIBUTES
    ):
        pass


def _remote_parent_and_child(provider: TracerProvider) -> None:
    tracer = provider.get_tracer("mes_trace_proxy")
    parent = set_span_in_context(NonRecordingSpan(_REMOTE))
    with (
        tracer.start_as_current_span("server", context=parent, kind=SpanKind.SERVER),
        tracer.start_as_current_span("client", kind=SpanKind.CLIENT, attributes={"url.full": "http://mes/x"}),
    ):
        pass


def _events_links_error(provider: TracerProvider) -> None:
    tracer = provider.get_tracer("mes_trace_proxy", schema_url="https://opentelemetry.io/schemas/1.26.0")
    span = tracer.start_span(
        "stuck order",
        kind=SpanKind.INTERNAL,
        links=[Link(_REMOTE, {"mes.link": "first"}), Link(_LOCAL_LINKED)],
    )
    span.add_event("status changed", {"mes.order.status.from": "RELEASED", "mes.order.status.to": "STARTED"})
    span.add_event("empty event")
    span.set_status(Status(StatusCode.ERROR, "upstream timed out"))
    span.end()


def _ok_status_and_kinds(provider: TracerProvider) -> None:
    tracer = provider.get_tracer("other", "2.0", attributes={"scope.attr": "x", "scope.n": 3})
    for kind in (SpanKind.PRODUCER, SpanKind.CONSUMER):
        span = tracer.start_span(kind.name, kind=kind)
        span.set_status(Status(StatusCode.OK))
        span.end()


def _dropped_counts(provider: TracerProvider) -> None:
    # The SDK's default limits are 128 attributes and events; go past both.
    span = provider.get_tracer("mes_trace_proxy").start_span("many")
    for i in range(130):
        span.set_attribute(f"a{i}", i)
        span.add_event(f"e{i}")
    span.end()


def _several_scopes(provider: TracerProvider) -> None:
    for name in ("first", "second", "first"):
        provider.get_tracer(name).start_span(f"from {name}").end()


_CASES: dict[str, Callable[[TracerProvider], None]] = {
    "root server, every attribute type": _root_server,
    "remote parent with tracestate, local child": _remote_parent_and_child,
    "events, links, error status with message": _events_links_error,
    "ok status, producer and consumer, scope attributes": _ok_status_and_kinds,
    "dropped attributes and events": _dropped_counts,
    "several scopes interleaved": _several_scopes,
}


def _assert_same_as_sdk(spans: Sequence[ReadableSpan], encoder: OtlpSpanEncoder | None = None) -> None:
    ours = (encoder or OtlpSpanEncoder()).encode_request(spans)
    assert ExportTraceServiceRequest.FromString(ours) == encode_spans(spans)


@pytest.mark.parametrize("make", list(_CASES.values()), ids=list(_CASES))
def test_each_span_shape_matches_the_sdk_encoder(make: Callable[[TracerProvider], None]) -> None:
    """Each span shape encodes to a message equal to the SDK encoder's."""
    spans = _spans_of(make)
    assert spans
    _assert_same_as_sdk(spans)


def test_mixed_resources_and_scopes_group_like_the_sdk() -> None:
    """Spans from two resources and several scopes, interleaved, group in the SDK's order."""
    first = _spans_of(_several_scopes, Resource.create({"service.name": "a"}))
    second = _spans_of(
        _ok_status_and_kinds, Resource({"service.name": "b"}, schema_url="https://example/schema")
    )
    equal_copy = _spans_of(_root_server, Resource.create({"service.name": "a"}))
    mixed = [first[0], *second, first[1], *equal_copy, first[2]]
    _assert_same_as_sdk(mixed)
    assert len(ExportTraceServiceRequest.FromString(encode_request(mixed)).resource_spans) == 2


def test_cached_bytes_stay_correct_across_batches_and_a_cache_reset() -> None:
    """One encoder reused over many batches, past its cache bound, still matches the SDK."""
    encoder = OtlpSpanEncoder()
    spans = [span for make in _CASES.values() for span in _spans_of(make)]
    _assert_same_as_sdk(spans, encoder)
    _assert_same_as_sdk(spans, encoder)  # every repeating pair now comes from the cache

    def unique_values(provider: TracerProvider) -> None:
        tracer = provider.get_tracer("mes_trace_proxy")
        for i in range(ATTRIBUTE_CACHE_SIZE // 100 + 1):
            tracer.start_span("s", attributes={f"k{j}": f"v{i}" for j in range(100)}).end()

    _assert_same_as_sdk(_spans_of(unique_values), encoder)
    _assert_same_as_sdk(spans, encoder)


def test_equal_bool_and_int_values_do_not_share_a_cache_entry() -> None:
    """True and 1 (equal in Python) are cached apart, so each keeps its own OTLP type."""
    encoder = OtlpSpanEncoder()
    for value in (1, True, 0, False, 1):

        def one_attribute(provider: TracerProvider, value: bool | int = value) -> None:
            provider.get_tracer("t").start_span("s", attributes={"k": value}).end()

        _assert_same_as_sdk(_spans_of(one_attribute), encoder)


def test_unencodable_attribute_is_skipped_like_the_sdk(caplog: pytest.LogCaptureFixture) -> None:
    """An int beyond int64 is logged and left out, the rest of the span kept, as the SDK does."""
    span = ReadableSpan(
        name="raw",
        context=_LOCAL_LINKED,
        attributes={"too.big": 1 << 64, "kept": "yes", "nothing": None},
        start_time=1,
        end_time=2,
    )
    with caplog.at_level(logging.CRITICAL, logger="opentelemetry"):
        expected = encode_spans([span])
    with caplog.at_level(logging.WARNING, logger="mes_trace_proxy.otlp_encode"):
        ours = encode_request([span])
    assert ExportTraceServiceRequest.FromString(ours) == expected
    assert "too.big" in caplog.text


_SCALARS = st.one_of(
    st.text(max_size=20),
    st.booleans(),
    st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1),
    st.floats(allow_nan=False),
    st.binary(max_size=20),
)
_VALUES = st.one_of(
    _SCALARS,
    st.lists(st.text(max_size=5), max_size=4).map(tuple),
    st.lists(st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1), max_size=4).map(tuple),
    st.lists(st.floats(allow_nan=False), max_size=4).map(tuple),
    st.lists(st.booleans(), max_size=4).map(tuple),
)


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.text(min_size=1, max_size=12), _VALUES, max_size=12))
def test_random_attributes_match_the_sdk_encoder(attributes: dict[str, object]) -> None:
    """Any bounded dict of OTLP attribute values encodes to the SDK encoder's message."""
    span = ReadableSpan(
        name="random",
        context=_REMOTE,
        parent=_LOCAL_LINKED,
        attributes=attributes,  # type: ignore[arg-type]  # hypothesis gives object, the SDK types it narrower
        start_time=1_700_000_000_000_000_000,
        end_time=1_700_000_000_000_100_000,
    )
    _assert_same_as_sdk([span])


@pytest.mark.parametrize(
    "attributes",
    [
        {"bad.value": "\udc80", "kept": "yes"},
        {"\udc80": "bad key", "kept": "yes"},
        {"mapping": {"k": "v", "n": 1}, "kept": "yes"},
        {"strings": ("a", "b"), "ints": (1, 0), "bools": (True, False), "kept": "yes"},
    ],
    ids=["surrogate-value", "surrogate-key", "mapping-value", "tuples"],
)
def test_uncacheable_and_unencodable_pairs_match_the_sdk_twice(attributes: dict[str, object]) -> None:
    """Surrogates are skipped, mappings encoded each time, equal tuples of other types kept apart."""
    span = ReadableSpan(
        name="edge",
        context=_LOCAL_LINKED,
        attributes=attributes,  # type: ignore[arg-type]  # the SDK types values narrower than it accepts
        start_time=1,
        end_time=2,
    )
    encoder = OtlpSpanEncoder()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(logging.getLogger("opentelemetry"), "disabled", True)
        for _ in range(2):  # the second time from the caches
            _assert_same_as_sdk([span], encoder)
    # (True, False) and (1, 0) are equal tuples: each still keeps its own OTLP type.
    swapped = {"bools": (1, 0), "ints": (True, False)} if "bools" in attributes else None
    if swapped is not None:
        other = ReadableSpan(name="edge", context=_LOCAL_LINKED, attributes=swapped, start_time=1, end_time=2)
        _assert_same_as_sdk([other], encoder)
