"""Tests for span_context: unchecked SpanContext/TraceState values equal the API's checked ones."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict, CIMultiDictProxy
from opentelemetry import trace
from opentelemetry.propagate import get_global_textmap
from opentelemetry.trace import SpanContext, TraceFlags, TraceState

from mes_trace_proxy.redact import Redactor
from mes_trace_proxy.span_context import (
    EMPTY_TRACE_STATE,
    caller_span_context,
    clean_trace_state,
    incoming_context,
    span_context,
    trace_state,
)

TRACE = "0af7651916cd43dd8448eb211c80319c"
SPAN = "b7ad6b7169203331"
VALID = f"00-{TRACE}-{SPAN}-01"
REDACTOR = Redactor()


def test_span_context_equals_the_checked_constructor() -> None:
    """The unchecked SpanContext is field for field what the API's constructor builds."""
    state = TraceState([("rojo", "1")])
    for remote in (False, True):
        fast = span_context(int(TRACE, 16), int(SPAN, 16), TraceFlags(1), state, remote=remote)
        checked = SpanContext(int(TRACE, 16), int(SPAN, 16), remote, TraceFlags(1), state)
        assert fast == checked
        assert (fast.is_valid, fast.is_remote, fast.trace_state) == (True, remote, state)
        assert type(fast) is SpanContext


def test_trace_state_equals_the_api_for_keys_both_grammars_accept() -> None:
    """Built unchecked, a TraceState reads, iterates and serialises as the API's own."""
    members = [("rojo", "00f067aa0ba902b7"), ("congo", "t61rcWkgMzE"), ("fw529a3039@dt", "x")]
    fast = trace_state(members)
    checked = TraceState(members)
    assert list(fast.items()) == list(checked.items())
    assert (
        fast.to_header() == checked.to_header() == "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE,fw529a3039@dt=x"
    )
    assert len(fast) == 3
    assert fast["congo"] == "t61rcWkgMzE"
    # The API's own operations work on it (update moves the key first, as the spec asks).
    assert fast.update("congo", "new").to_header().startswith("congo=new,")


def test_trace_state_keeps_the_editors_draft_keys_the_api_drops() -> None:
    """Keys the suite accepts and the SDK's Level 1 check refuses survive (docs/tracecontext.md)."""
    members = [("foo@@bar", "1"), ("t@" + "v" * 15, "2"), ("foo@", "3")]
    assert len(TraceState(members)) == 0
    assert list(trace_state(members).items()) == members


def test_no_members_is_the_shared_empty_state() -> None:
    """An empty list gives the one empty TraceState, not a new object per request."""
    assert trace_state([]) is EMPTY_TRACE_STATE
    assert len(EMPTY_TRACE_STATE) == 0


@pytest.mark.parametrize(
    ("tracestates", "expected"),
    [
        pytest.param([], "", id="no-tracestate"),
        pytest.param(["rojo=1", "congo=2"], "rojo=1,congo=2", id="two-fields"),
        pytest.param(["rojo=1,Bad=2"], "", id="invalid-member"),
        pytest.param([",".join(f"k{i}=1" for i in range(33))], "", id="33-members"),
        pytest.param(["rojo=1,rojo=2,congo=3"], "rojo=1,congo=3", id="duplicate-key"),
    ],
)
def test_tracestate_never_costs_the_trace(tracestates: list[str], expected: str) -> None:
    """Whatever the tracestate, a valid traceparent is continued; a bad list is discarded alone."""
    context = caller_span_context([VALID], tracestates)
    assert context is not None
    assert (f"{context.trace_id:032x}", f"{context.span_id:016x}") == (TRACE, SPAN)
    assert context.is_remote
    assert context.is_valid
    assert context.trace_flags.sampled
    assert context.trace_state.to_header() == expected


def test_two_traceparents_are_no_caller() -> None:
    """Two traceparent fields give no context at all (the proxy starts a new trace)."""
    assert caller_span_context([VALID, VALID], ["rojo=1"]) is None
    assert caller_span_context([], ["rojo=1"]) is None


def test_redactor_drops_personal_members_only() -> None:
    """A member holding an e-mail or a phone number is left out; the vendor entries around it stay."""
    context = caller_span_context(
        [VALID],
        ["rojo=00f067aa0ba902b7,crm=canary@example.com", "tel=+79001234567,congo=t61rcWkgMzE"],
        REDACTOR,
    )
    assert context is not None
    assert context.trace_state.to_header() == "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"


def test_clean_trace_state_for_other_propagators() -> None:
    """Another propagator's context loses only its personal members; a clean one comes back as is."""
    dirty = SpanContext(1, 2, True, TraceFlags(1), TraceState([("crm", "anna@example.org"), ("rojo", "1")]))
    cleaned = clean_trace_state(dirty, REDACTOR)
    assert cleaned.trace_state.to_header() == "rojo=1"
    assert (cleaned.trace_id, cleaned.span_id, cleaned.is_remote) == (1, 2, True)
    clean = SpanContext(1, 2, True, TraceFlags(1), TraceState([("rojo", "1")]))
    assert clean_trace_state(clean, REDACTOR) is clean


def _headers(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


@pytest.mark.parametrize("w3c", [True, False], ids=["w3c-reading", "propagator-reading"])
def test_incoming_context_reads_like_the_handler(w3c: bool) -> None:
    """The WebSocket relay's context: the caller's span, with the personal tracestate member left out."""
    headers = _headers(("traceparent", VALID), ("tracestate", "rojo=1,crm=anna@example.org"))
    context = incoming_context(headers, get_global_textmap(), w3c=w3c, redactor=REDACTOR)
    caller = trace.get_current_span(context).get_span_context()
    assert f"{caller.trace_id:032x}" == TRACE
    assert caller.trace_state.to_header() == "rojo=1"


def test_incoming_context_without_a_usable_traceparent_is_empty() -> None:
    """Two traceparent fields (W3C reading) give a context with no span."""
    headers = _headers(("traceparent", VALID), ("traceparent", VALID))
    context = incoming_context(headers, get_global_textmap(), w3c=True, redactor=REDACTOR)
    assert not trace.get_current_span(context).get_span_context().is_valid
