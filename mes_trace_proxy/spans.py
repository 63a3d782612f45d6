"""Lean recording spans for the proxy's own SERVER and CLIENT spans, made without the SDK's span objects.

Why: the SDK's ``Tracer.start_span``, ``Span``, ``BoundedAttributes`` and the processor fan-out cost
about 45 µs for each of the two spans a request makes (docs/performance.md), most of it generality
the proxy does not use: locks, ``MappingProxyType`` views, a ``ReadableSpan`` copy per span, a
deque per event list. Issue 6 leaves about 27 µs for all tracing work of a request.

What stays the SDK's: the ``TracerProvider`` (its sampler, id generator and resource), the
``SpanLimits``, the propagators, and every other span (watchdog, WebSocket relay), which still go
through ``Tracing.tracer``. :class:`SpanFactory` only replaces the span object and its
bookkeeping, and it is held to the SDK's results:

- **Sampling.** The decision, the flags and the tracestate are exactly those the provider's
  sampler gives through ``Tracer.start_span``. Samplers the factory recognises (``ALWAYS_ON``,
  ``ALWAYS_OFF``, ``TraceIdRatioBased``, ``ParentBased`` over those, and ``RouteSampler`` over
  any of them) are compiled once into five ratio bounds each, so a decision is one comparison;
  any other sampler is asked through ``should_sample`` with the arguments the SDK passes.
- **Recording.** Attribute values are cleaned as ``BoundedAttributes`` cleans them (strings
  truncated to the value-length limit, sequences made tuples, other types through the SDK's own
  ``_clean_attribute_value``), the count limits evict the oldest entry and count it as the SDK
  does, an attribute set again moves to the end, events and links keep the last entries within
  their limits, and the status follows the SDK's rules (a description only with ERROR, OK is
  final, UNSET is ignored). Anything done to an ended span is ignored, with the SDK's warning.
- **Export.** When the span ends it goes straight to every ``OtlpExportProcessor``, which encodes
  it with ``OtlpSpanEncoder`` (duck-typed on the attributes ``ReadableSpan`` has, which
  :class:`ProxySpan` has too). Every other processor (the console exporter, tests' in-memory
  exporters) gets a genuine ``ReadableSpan`` built from it, as the SDK would hand over. Which
  processor gets which is decided once, when the factory is built.

The span object itself and where an ended span goes are in ``proxy_span.py`` (``ProxySpan``,
``SpanSink``), the SDK's attribute rules in ``span_limits.py``, the samplers in
``sampling.py``; this module decides, for each span started, its ids and whether it records.

What is deliberately not copied, because the proxy's processors and configuration do not use it:

- ``SpanProcessor.on_start`` and ``_on_ending`` are not called for these spans (ours do nothing
  there); processors added to the provider after the factory was built never see them.
- The SDK's own span metrics (``OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED``) and tracer
  configurators (``_TracerConfig``) are not consulted. ``OTEL_SDK_DISABLED=true`` is honoured:
  every span is then the invalid span, as the SDK's ``NoOpTracer`` gives.
- No lock: a span is written by the one task that handles its request, on the event loop.
- The parent is always the one given: ``parent=None`` starts a root span, where the SDK would
  fall back to the span of the ambient context.
- No warning per truncated string value; the value is truncated all the same.
- An attribute mapping whose non-``str`` keys collide once converted to ``str`` (``{1: .., "1":
  ..}``) keeps the last value, as the SDK does, without counting the collision as dropped.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from time import time_ns
from typing import Final, NamedTuple

from opentelemetry import trace as trace_api
from opentelemetry.context import Context
from opentelemetry.sdk.trace import SpanLimits, SpanProcessor, Tracer, TracerProvider
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    Decision,
    ParentBased,
    Sampler,
    TraceIdRatioBased,
)
from opentelemetry.sdk.util.instrumentation import InstrumentationInfo, InstrumentationScope
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, SpanKind, TraceFlags
from opentelemetry.trace.span import DEFAULT_TRACE_STATE
from opentelemetry.util.types import AttributeValue

from mes_trace_proxy.attributes import HTTP_ROUTE
from mes_trace_proxy.proxy_span import LeanEvent, LeanLink, ProxySpan, SpanSink
from mes_trace_proxy.sampling import RouteSampler
from mes_trace_proxy.span_context import span_context
from mes_trace_proxy.span_limits import NO_ATTRIBUTES, Limits, bounded, clean_value, fill, is_valid_link

__all__ = ["LeanEvent", "LeanLink", "ProxySpan", "SpanFactory", "SpanSink"]

_TRACE_ID_END: Final = 1 << 128
_SPAN_ID_END: Final = 1 << 64
#: The low 64 bits of a trace id, which ``TraceIdRatioBased`` compares with its bound.
_TRACE_ID_LOW: Final = (1 << 64) - 1
#: A ratio bound no 64-bit value reaches: the sampler that always samples.
_ALWAYS: Final = 1 << 64
_SAMPLED: Final = TraceFlags.SAMPLED
_RANDOM_TRACE_ID: Final = TraceFlags.RANDOM_TRACE_ID
#: The four flag combinations we set, made once: TraceFlags(int) costs a call each time.
_FLAGS: Final = tuple(TraceFlags(bits) for bits in range(4))


class _Plan(NamedTuple):
    """A sampler compiled to ``TraceIdRatioBased`` bounds: one per parent case of ``ParentBased``."""

    root: int
    remote_sampled: int
    remote_not_sampled: int
    local_sampled: int
    local_not_sampled: int


def _bound(sampler: object) -> int | None:
    """The ratio bound equivalent to a leaf sampler, or None for one we do not know."""
    if sampler is ALWAYS_ON:
        return _ALWAYS
    if sampler is ALWAYS_OFF:
        return 0
    if type(sampler) is TraceIdRatioBased:
        return sampler.bound
    return None


#: ParentBased's delegates, in the order of _Plan's fields (private names of the SDK, read once;
#: the sampling tests compare every case with the SDK, so a rename cannot slip through).
_PARENT_BASED_FIELDS: Final = (
    "_root",
    "_remote_parent_sampled",
    "_remote_parent_not_sampled",
    "_local_parent_sampled",
    "_local_parent_not_sampled",
)


def _plan(sampler: object) -> _Plan | None:
    """Compile a sampler whose decision depends only on the parent and the trace id; None otherwise.

    The leaves (``ALWAYS_ON``, ``ALWAYS_OFF``, ``TraceIdRatioBased``) all return the attributes
    they were given and the parent's tracestate, so the bound is all that tells them apart.
    """
    bound = _bound(sampler)
    if bound is not None:
        return _Plan(bound, bound, bound, bound, bound)
    if isinstance(sampler, ParentBased) and type(sampler).should_sample is ParentBased.should_sample:
        bounds = [_bound(getattr(sampler, field, None)) for field in _PARENT_BASED_FIELDS]
        if all(b is not None for b in bounds):
            return _Plan(*(b for b in bounds if b is not None))
    return None


def _bound_for(plan: _Plan, has_parent: bool, remote: bool, parent_flags: int) -> int:
    """The ratio bound of the parent case ``ParentBased`` would delegate to."""
    if not has_parent:
        return plan.root
    if remote:
        return plan.remote_sampled if parent_flags & _SAMPLED else plan.remote_not_sampled
    return plan.local_sampled if parent_flags & _SAMPLED else plan.local_not_sampled


@dataclass(frozen=True, slots=True)
class _Sampling:
    """The provider's sampler, compiled where possible."""

    sampler: Sampler
    #: the plan of every span not routed below; None: ask ``sampler``
    default: _Plan | None
    #: SERVER spans by ``http.route`` (the proxy's ``RouteSampler``); None: ask ``sampler``
    routes: Mapping[str, _Plan | None]


def _compile(sampler: Sampler) -> _Sampling:
    """The provider's sampler compiled: per route when it is the proxy's ``RouteSampler``."""
    if type(sampler) is RouteSampler:
        return _Sampling(
            sampler=sampler,
            default=_plan(sampler.default),
            routes={route: _plan(routed) for route, routed in sampler.per_route.items()},
        )
    return _Sampling(sampler=sampler, default=_plan(sampler), routes={})


class SpanFactory:
    """Starts the proxy's spans on a provider's configuration: :class:`ProxySpan` when sampled.

    Built once per ``Tracing`` (``build_tracing``); see the module docstring for what is the
    SDK's and what is not.
    """

    __slots__ = (
        "_enabled",
        "_new_span_id",
        "_new_trace_id",
        "_provider",
        "_random_root",
        "_sampling",
        "_sink",
        "limits",
    )

    def __init__(
        self,
        provider: TracerProvider,
        *,
        processors: Sequence[SpanProcessor],
        limits: SpanLimits | None = None,
        scope_name: str,
        scope_version: str,
    ) -> None:
        """Take the provider's sampler, id generator and resource; sort the processors once.

        Args:
            provider: the SDK provider whose configuration the spans follow.
            processors: the processors the spans end in, in order: ``OtlpExportProcessor``
                gets the span itself, any other a ``ReadableSpan`` made from it.
            limits: the provider's ``SpanLimits`` (default: read from the environment, as the
                provider does when given none).
            scope_name: the instrumentation scope, as given to ``provider.get_tracer``.
            scope_version: its version.
        """
        self._provider = provider
        ids = provider.id_generator
        self._new_trace_id = ids.generate_trace_id
        self._new_span_id = ids.generate_span_id
        # The SDK asks the generator for each root span; ours answer the same every time.
        self._random_root = _RANDOM_TRACE_ID if ids.is_trace_id_random() else 0
        self._sampling = _compile(provider.sampler)
        self.limits = Limits.of(limits if limits is not None else SpanLimits())
        with warnings.catch_warnings():
            # Deprecated, but the SDK still fills ReadableSpan.instrumentation_info with it.
            warnings.simplefilter("ignore", DeprecationWarning)
            info = InstrumentationInfo(scope_name, scope_version, None)
        scope = InstrumentationScope(scope_name, scope_version, None, None)
        self._sink = SpanSink(processors, self.limits, scope, info)
        # OTEL_SDK_DISABLED makes the provider hand out a NoOpTracer, whose spans are invalid.
        self._enabled = isinstance(provider.get_tracer(scope_name, scope_version), Tracer)

    def start(
        self,
        name: str,
        *,
        kind: SpanKind,
        parent: SpanContext | None,
        route: str | None = None,
        attributes: Mapping[str, AttributeValue] | None = None,
        links: Sequence[Link] = (),
        trace_id: int | None = None,
        start_time: int | None = None,
    ) -> trace_api.Span:
        """Start a span, as ``tracer.start_span`` would with the equivalent arguments.

        The SDK equivalent: ``tracer.start_span(name, context=..., kind=kind,
        attributes={"http.route": route, **attributes}, links=links, start_time=start_time)``
        with the context holding ``NonRecordingSpan(parent)`` (an empty ``Context()`` for no
        parent), with the provider's id generator answering ``trace_id`` for the root's trace id.

        Args:
            name: the span name.
            kind: SERVER, CLIENT, ...
            parent: the parent's context (remote or local); None or an invalid one for a root.
            route: ``http.route``, first among the attributes; the per-route sampler reads it.
            attributes: the span's attributes at start (what the sampler sees, with the route).
            links: links to other spans.
            trace_id: the trace id of a root span (``trace-per-order``); ignored with a valid
                parent.
            start_time: nanoseconds since the epoch (default: now).

        Returns:
            A :class:`ProxySpan` when sampled; else a ``NonRecordingSpan`` with the context the
            SDK would give (new span id, unsampled, the parent's tracestate).
        """
        if not self._enabled:
            return trace_api.INVALID_SPAN
        given = parent
        if parent is not None:
            # A SpanContext is a tuple; one unpacking instead of five property calls.
            trace, _, remote, parent_flags, state, valid = parent
        else:
            trace, remote, parent_flags, state, valid = 0, False, _FLAGS[0], DEFAULT_TRACE_STATE, False
        if valid:
            random_bit = parent_flags & _RANDOM_TRACE_ID
        else:
            parent = None
            trace = trace_id if trace_id is not None else self._new_trace_id()
            random_bit = self._random_root
            state = DEFAULT_TRACE_STATE
        plan = self._plan_for(kind, route, attributes)
        if plan is None:
            return self._start_asking(
                name, kind, given, parent, trace, random_bit, route, attributes, links, start_time
            )
        span_id = self._new_span_id()
        valid = 0 < trace < _TRACE_ID_END and 0 < span_id < _SPAN_ID_END
        if trace & _TRACE_ID_LOW >= _bound_for(plan, parent is not None, remote, parent_flags):
            return NonRecordingSpan(span_context(trace, span_id, _FLAGS[random_bit], state, valid=valid))
        flags = _FLAGS[_SAMPLED | random_bit]
        span = ProxySpan(
            self._sink,
            name,
            kind,
            span_context(trace, span_id, flags, state, valid=valid),
            parent,
            time_ns() if start_time is None else start_time,
            self._provider.resource,
        )
        if route is not None or attributes:
            self._set_start_attributes(span, route, attributes)
        if links:
            self._set_links(span, links)
        return span

    def _plan_for(
        self, kind: SpanKind, route: str | None, attributes: Mapping[str, AttributeValue] | None
    ) -> _Plan | None:
        """The compiled plan of a span: its route's for a SERVER span, else the default (None: ask)."""
        sampling = self._sampling
        plan = sampling.default
        if kind is SpanKind.SERVER and sampling.routes:
            routed = attributes.get(HTTP_ROUTE, route) if attributes else route
            if routed is not None:
                plan = sampling.routes.get(routed if type(routed) is str else str(routed), plan)
        return plan

    def _set_start_attributes(
        self, span: ProxySpan, route: str | None, attributes: Mapping[str, AttributeValue] | None
    ) -> None:
        """``http.route`` first, then the attributes given at start, bounded as the SDK bounds them."""
        limits = self.limits
        if route is None:
            if attributes:
                span.dropped_attributes = fill(
                    span.attributes, attributes, limits.span_attributes, limits.span_value_length
                )
            return
        recorded = span.attributes
        recorded[HTTP_ROUTE] = (
            route
            if type(route) is str and len(route) <= limits.span_value_length
            else clean_value(route, limits.span_value_length)
        )
        if attributes or not limits.span_attributes:
            span.dropped_attributes = fill(
                recorded, attributes or NO_ATTRIBUTES, limits.span_attributes, limits.span_value_length
            )

    def _start_asking(
        self,
        name: str,
        kind: SpanKind,
        given: SpanContext | None,
        parent: SpanContext | None,
        trace: int,
        random_bit: int,
        route: str | None,
        attributes: Mapping[str, AttributeValue] | None,
        links: Sequence[Link],
        start_time: int | None,
    ) -> trace_api.Span:
        """The general path: ask the sampler with the arguments ``Tracer.start_span`` passes it."""
        context = trace_api.set_span_in_context(NonRecordingSpan(given)) if given is not None else Context()
        merged: Mapping[str, AttributeValue] | None = attributes
        if route is not None:
            merged = {HTTP_ROUTE: route, **(attributes or {})}
        result = self._sampling.sampler.should_sample(context, trace, name, kind, merged, links)
        decision = result.decision
        flags = _FLAGS[(_SAMPLED if decision is Decision.RECORD_AND_SAMPLE else 0) | random_bit]
        own = SpanContext(trace, self._new_span_id(), False, flags, result.trace_state)
        if decision is Decision.DROP:
            return NonRecordingSpan(own)
        span = ProxySpan(
            self._sink,
            name,
            kind,
            own,
            parent,
            time_ns() if start_time is None else start_time,
            self._provider.resource,
        )
        if result.attributes:
            limits = self.limits
            span.dropped_attributes = fill(
                span.attributes, result.attributes, limits.span_attributes, limits.span_value_length
            )
        if links:
            self._set_links(span, links)
        return span

    def _set_links(self, span: ProxySpan, links: Sequence[Link]) -> None:
        """The links given at start, kept as ``Span._new_links`` keeps them."""
        limits = self.limits
        kept: list[LeanLink] = []
        for link in links:
            # A None among the links is skipped, as Span._new_links skips it ("if link and ...").
            if link is not None and is_valid_link(link.context, link.attributes):
                cleaned, dropped = bounded(link.attributes, limits.link_attributes, limits.value_length)
                kept.append(LeanLink(link.context, cleaned, dropped))
        excess = len(kept) - limits.links
        if excess > 0:
            # BoundedList.from_seq keeps the last entries.
            kept = kept[excess:]
            span.dropped_links = excess
        span.links = kept
