"""The listener's modes, chosen once, and the per-request Call: unit tests with SDK span contexts."""

from __future__ import annotations

from dataclasses import replace

import pytest
from multidict import CIMultiDict, CIMultiDictProxy
from opentelemetry import trace as trace_api
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.trace import Link, SpanContext, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from mes_trace_proxy.cli import read_default_rules
from mes_trace_proxy.core.config import load_config
from mes_trace_proxy.core.redact import Redactor
from mes_trace_proxy.proxy.handler_state import (
    Call,
    Propagation,
    one_spelling,
    propagation_for,
    span_mode_for,
)
from mes_trace_proxy.telemetry.tracing import Tracing, build_tracing

CONFIG = load_config(
    flags={"upstream": "http://mes.internal:8081"}, environ={}, file_doc=None, defaults=read_default_rules()
)
CALLER = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
W3C = Propagation()


def _tracing(*, w3c: bool) -> Tracing:
    """A real Tracing (nothing exported); ``w3c=False`` as OTEL_PROPAGATORS naming another set would give."""
    tracing = build_tracing(CONFIG, {"OTEL_TRACES_EXPORTER": "none"})
    if w3c:
        return tracing
    return replace(tracing, w3c=False, propagator=CompositePropagator([TraceContextTextMapPropagator()]))


def _headers(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ([("X-A", "1"), ("X-B", "2")], [("X-A", "1"), ("X-B", "2")]),
        ([("X-A", "1"), ("x-a", "2")], [("X-A", "1"), ("X-A", "2")]),
        ([("x-a", "1"), ("X-A", "2"), ("X-a", "3")], [("x-a", "1"), ("x-a", "2"), ("x-a", "3")]),
    ],
    ids=["distinct", "respelled", "three-spellings"],
)
def test_one_spelling_keeps_every_value(
    given: list[tuple[str, str]], expected: list[tuple[str, str]]
) -> None:
    """Repeated names take their first spelling, so aiohttp's session drops no value; order stays."""
    assert one_spelling(given) == expected


def test_one_spelling_returns_the_list_itself_when_nothing_changes() -> None:
    """The common case costs no copy."""
    fields = [("Host", "mes"), ("Accept", "*/*")]
    assert one_spelling(fields) is fields


def test_w3c_parent_of_a_trusted_caller_is_the_caller() -> None:
    """A trusted caller's span is the parent: its trace id and flags, remote, no link."""
    parent, links, extracted = W3C.parent(_headers(("traceparent", CALLER)), True)
    assert parent is not None
    assert (format(parent.trace_id, "032x"), parent.is_remote, parent.trace_flags.sampled) == (
        "0af7651916cd43dd8448eb211c80319c",
        True,
        True,
    )
    assert (links, extracted) == ((), None)


def test_w3c_parent_of_an_untrusted_caller_is_a_link() -> None:
    """An untrusted caller starts a new root; the relation survives as a link to its span."""
    parent, links, _ = W3C.parent(_headers(("traceparent", CALLER)), False)
    assert parent is None
    assert len(links) == 1
    assert isinstance(links[0], Link)
    assert links[0].context.span_id == 0xB7AD6B7169203331


@pytest.mark.parametrize("value", ["garbage", "00-" + "0" * 32 + "-" + "0" * 16 + "-01"])
def test_w3c_parent_ignores_what_is_not_a_trace_context(value: str) -> None:
    """A malformed or all-zero traceparent gives a new root and no link."""
    assert W3C.parent(_headers(("traceparent", value)), True) == (None, (), None)


def test_w3c_inject_appends_the_client_span_context() -> None:
    """traceparent (and tracestate when there is one) are appended after the forwarded fields."""
    context = SpanContext(0xAB, 0xCD, is_remote=False, trace_flags=TraceFlags(1))
    out = W3C.inject([("Host", "mes")], trace_api.NonRecordingSpan(context), None)
    assert out == [("Host", "mes"), ("traceparent", f"00-{0xAB:032x}-{0xCD:016x}-01")]


def test_modes_are_chosen_once_from_the_configuration() -> None:
    """Instrumented: the session's hooks inject, the relay injects itself; modes follow the flags."""
    instrumented = propagation_for(_tracing(w3c=True), instrumented=True)
    assert instrumented.inject([("Host", "mes")], trace_api.INVALID_SPAN, None) == [("Host", "mes")]
    assert type(instrumented.for_relay()) is Propagation
    assert type(propagation_for(_tracing(w3c=True), instrumented=False)) is Propagation
    assert type(propagation_for(_tracing(w3c=False), instrumented=False)) is not Propagation
    assert span_mode_for(exporting=True, instrumented=True).instruments_client
    assert not span_mode_for(exporting=True, instrumented=False).instruments_client
    assert not span_mode_for(exporting=False, instrumented=False).instruments_client


def test_call_starts_empty_and_has_no_instance_dict() -> None:
    """One slotted object per request: the path and query split once, nothing answered yet."""
    call = Call(1.0, "PUT", "/orders/A-1/status?x=1")
    assert (call.path, call.query, call.status, call.error_type, call.sent) == (
        "/orders/A-1/status",
        "x=1",
        0,
        None,
        0,
    )
    with pytest.raises(AttributeError):
        call.unknown = 1  # type: ignore[attr-defined]


def test_other_propagators_read_and_write_their_own_fields() -> None:
    """Through the propagator: the caller's fields of its names give way to ours, the rest stay."""
    propagation = propagation_for(_tracing(w3c=False), instrumented=False)
    parent, links, extracted = propagation.parent(_headers(("traceparent", CALLER)), True)
    assert parent is not None
    assert parent.trace_id == 0x0AF7651916CD43DD8448EB211C80319C
    assert links == ()
    assert extracted is not None
    context = SpanContext(0xAB, 0xCD, is_remote=False, trace_flags=TraceFlags(1))
    out = propagation.inject(
        [("Host", "mes"), ("TraceParent", CALLER)], trace_api.NonRecordingSpan(context), None
    )
    assert out == [("Host", "mes"), ("traceparent", f"00-{0xAB:032x}-{0xCD:016x}-01")]


def test_w3c_parent_reads_every_field_and_drops_personal_tracestate() -> None:
    """Two traceparent fields are no trace context; tracestate fields are one list, minus personal data."""
    redacting = Propagation(Redactor())
    twice = _headers(("traceparent", CALLER), ("traceparent", CALLER))
    assert redacting.parent(twice, True) == (None, (), None)
    headers = _headers(
        ("traceparent", CALLER),
        ("tracestate", "vendor=abc,mail=jane.doe@example.com"),
        ("tracestate", "other=1"),
    )
    parent, _, _ = redacting.parent(headers, True)
    assert parent is not None
    assert list(parent.trace_state.items()) == [("vendor", "abc"), ("other", "1")]


def test_other_propagators_drop_personal_tracestate_too() -> None:
    """Through OTEL_PROPAGATORS the caller's tracestate is cleaned the same way."""
    propagation = propagation_for(_tracing(w3c=False), instrumented=False, redactor=Redactor())
    headers = _headers(("traceparent", CALLER), ("tracestate", "vendor=abc,mail=jane.doe@example.com"))
    parent, _, _ = propagation.parent(headers, True)
    assert parent is not None
    assert list(parent.trace_state.items()) == [("vendor", "abc")]
