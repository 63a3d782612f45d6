"""The one place OpenTelemetry's ``SpanContext`` and ``TraceState`` are built without their checks.

The API's constructors validate what they are given: ``SpanContext(...)`` checks the ids'
ranges on every call, and ``TraceState(...)`` re-checks each key against the OpenTelemetry
Level 1 grammar (and drops, with a warning, the keys the W3C editor's draft allows and it does
not: ``foo@@bar``, ``t@`` + 15 characters). The proxy builds these values only from fields it
has already validated (``tracecontext.parse_traceparent``/``parse_tracestate``, its own id
generator, the SDK's sampler result), so the checks would cost per span and, for tracestate,
would undo the proxy's own reading. Both shortcuts lean on the API's internals (``SpanContext``
is a ``tuple`` of six fields; ``TraceState`` keeps its members in ``_dict``), which
``tests/test_span_context.py`` pins against the installed API and pyproject.toml's pin names.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Final

from multidict import CIMultiDictProxy
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import TextMapPropagator
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    TraceFlags,
    TraceState,
    get_current_span,
    set_span_in_context,
)

from mes_trace_proxy.redact import Redactor
from mes_trace_proxy.tracecontext import caller_traceparent, parse_tracestate

__all__ = [
    "EMPTY_TRACE_STATE",
    "caller_span_context",
    "clean_trace_state",
    "incoming_context",
    "span_context",
    "trace_state",
]

_new_tuple: Final = tuple.__new__
_new_object: Final = object.__new__
#: The API's own empty TraceState (what ``TraceState()`` gives), shared.
EMPTY_TRACE_STATE: Final = TraceState()


def span_context(
    trace_id: int,
    span_id: int,
    flags: TraceFlags,
    state: TraceState,
    *,
    remote: bool = False,
    valid: bool = True,
) -> SpanContext:
    """A ``SpanContext`` from fields already known to be valid, without the checked constructor.

    The field order is the API's: trace id, span id, is_remote, flags, trace state, is_valid.
    """
    return _new_tuple(SpanContext, (trace_id, span_id, remote, flags, state, valid))


def trace_state(members: Sequence[tuple[str, str]]) -> TraceState:
    """A ``TraceState`` holding ``members`` (validated by ``tracecontext.parse_tracestate``), in order."""
    if not members:
        return EMPTY_TRACE_STATE
    state: TraceState = _new_object(TraceState)
    state._dict = dict(members)
    return state


def caller_span_context(
    traceparents: Sequence[str],
    tracestates: Sequence[str],
    redactor: Redactor | None = None,
) -> SpanContext | None:
    """The caller's span context from all its ``traceparent`` and ``tracestate`` fields, or ``None``.

    Args:
        traceparents: every ``traceparent`` field's value, in order (exactly one is usable).
        tracestates: every ``tracestate`` field's value, in order (read only when there are some).
        redactor: when given, a tracestate member it would change (an e-mail, a phone or a card
            number in its key or value) is left out; the other members stay.
    """
    ids = caller_traceparent(traceparents)
    if ids is None:
        return None
    state = EMPTY_TRACE_STATE
    if tracestates:
        personal = None if redactor is None else _personal_by(redactor)
        state = trace_state(parse_tracestate(tracestates, personal=personal).members)
    return _new_tuple(SpanContext, (ids[0], ids[1], True, TraceFlags(ids[2]), state, True))


def _personal_by(redactor: Redactor) -> Callable[[str], bool]:
    """Whether ``redactor`` would change a text: it holds an e-mail, a phone or a card number."""

    def personal(text: str) -> bool:
        return redactor.value(text) != text

    return personal


def clean_trace_state(context: SpanContext, redactor: Redactor) -> SpanContext:
    """``context`` without the tracestate members that carry personal data (for other propagators)."""
    state = context.trace_state
    if not state:
        return context
    personal = _personal_by(redactor)
    members = [(key, value) for key, value in state.items() if not personal(f"{key}={value}")]
    if len(members) == len(state):
        return context
    return _new_tuple(
        SpanContext,
        (
            context.trace_id,
            context.span_id,
            context.is_remote,
            context.trace_flags,
            trace_state(members),
            context.is_valid,
        ),
    )


def incoming_context(
    headers: CIMultiDictProxy[str], propagator: TextMapPropagator, *, w3c: bool, redactor: Redactor
) -> Context:
    """The caller's context as a ``Context`` (for code that starts spans through the SDK's tracer).

    With the default W3C propagators it is read as the handler reads it (:func:`caller_span_context`:
    every field, the editor's-draft grammar); with others, by them. Either way the tracestate
    members that carry personal data are left out, as on the handler's spans.
    """
    if w3c:
        found = caller_span_context(
            headers.getall("traceparent", ()), headers.getall("tracestate", ()), redactor
        )
        return Context() if found is None else set_span_in_context(NonRecordingSpan(found), Context())
    context = propagator.extract(headers)
    caller = get_current_span(context).get_span_context()
    cleaned = clean_trace_state(caller, redactor)
    return context if cleaned is caller else set_span_in_context(NonRecordingSpan(cleaned), context)
