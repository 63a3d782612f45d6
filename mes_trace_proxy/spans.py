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

import _abc  # type: ignore[import-not-found]  # abc's C half: no stubs
import logging
import sys
import traceback
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from time import time_ns
from types import MappingProxyType
from typing import Any, Final, NamedTuple

from opentelemetry import trace as trace_api
from opentelemetry.attributes import BoundedAttributes, _clean_attribute_value
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanLimits, SpanProcessor, Tracer, TracerProvider
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    Decision,
    ParentBased,
    Sampler,
    TraceIdRatioBased,
)
from opentelemetry.sdk.util import BoundedList
from opentelemetry.sdk.util.instrumentation import InstrumentationInfo, InstrumentationScope
from opentelemetry.semconv.attributes.exception_attributes import (
    EXCEPTION_ESCAPED,
    EXCEPTION_MESSAGE,
    EXCEPTION_STACKTRACE,
    EXCEPTION_TYPE,
)
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, SpanKind, TraceFlags
from opentelemetry.trace.span import DEFAULT_TRACE_STATE
from opentelemetry.trace.status import Status, StatusCode
from opentelemetry.util.types import Attributes, AttributeValue

from mes_trace_proxy.attributes import HTTP_ROUTE
from mes_trace_proxy.export import ExportStats, OtlpExportProcessor

__all__ = ["LeanEvent", "LeanLink", "ProxySpan", "SpanFactory"]

log = logging.getLogger("mes_trace_proxy.spans")

#: Stands for "no limit" in the integer comparisons of the hot path (the SDK's None).
_NO_LIMIT: Final = sys.maxsize
#: Attribute value types the SDK stores unchanged (exact types: subclasses take the SDK's path).
_PLAIN: Final = frozenset({str, int, float, bool})
#: ``tuple.__new__``: makes a SpanContext, LeanEvent or LeanLink from its fields without their
#: Python-level ``__new__`` (SpanContext's only computes ``is_valid``, which is done here).
_new_tuple: Final = tuple.__new__
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
_UNSET_STATUS: Final = Status(StatusCode.UNSET)
#: The attributes of an event or link given none; read-only, so it can be shared.
_NO_ATTRIBUTES: Final[Mapping[str, AttributeValue]] = MappingProxyType({})


class LeanEvent(NamedTuple):
    """A span event as the OTLP encoder reads it (the fields of the SDK's ``Event`` it uses)."""

    name: str
    timestamp: int
    attributes: Mapping[str, AttributeValue]
    dropped_attributes: int


class LeanLink(NamedTuple):
    """A span link as the OTLP encoder reads it (the fields of the API's ``Link`` it uses)."""

    context: SpanContext
    attributes: Mapping[str, AttributeValue]
    dropped_attributes: int


@dataclass(frozen=True, slots=True)
class _Limits:
    """``SpanLimits`` as integers for the hot path, with the SDK's own values kept for ``ReadableSpan``."""

    source: SpanLimits
    span_attributes: int
    span_value_length: int
    event_attributes: int
    link_attributes: int
    #: events' and links' attribute values are cut at the global length limit, as in the SDK
    value_length: int
    events: int
    links: int

    @classmethod
    def of(cls, limits: SpanLimits) -> _Limits:
        def number(value: int | None) -> int:
            return _NO_LIMIT if value is None else value

        return cls(
            source=limits,
            span_attributes=number(limits.max_span_attributes),
            span_value_length=number(limits.max_span_attribute_length),
            event_attributes=number(limits.max_event_attributes),
            link_attributes=number(limits.max_link_attributes),
            value_length=number(limits.max_attribute_length),
            events=number(limits.max_events),
            links=number(limits.max_links),
        )


def _sdk_length(length: int) -> int | None:
    return None if length == _NO_LIMIT else length


def _clean_key(key: object) -> str | None:
    """A mapping key as the SDK's ``_clean_attribute_value`` keeps it, or None when it drops it."""
    if not key:
        return None
    if isinstance(key, str):
        return key
    kind = type(key)
    # The SDK's rule: str() only when the type has a __str__ or __repr__ of its own.
    if kind.__str__ is not object.__str__ or kind.__repr__ is not object.__repr__:
        return str(key)
    return None


def _clean_value(value: Any, length: int) -> AttributeValue:
    """One value as ``BoundedAttributes`` stores it; the proxy's common types without the SDK's call."""
    kind = type(value)
    if kind is str:
        return value if len(value) <= length else value[:length]  # type: ignore[no-any-return]
    if kind is int or kind is bool or kind is float:
        return value  # type: ignore[no-any-return]
    if kind is tuple or kind is list:
        for item in value:
            item_kind = type(item)
            if item_kind is str:
                if len(item) > length:
                    break
            elif item_kind is not int and item_kind is not bool and item_kind is not float:
                break
        else:
            # A flat sequence of clean scalars: the SDK would make the same tuple.
            return value if kind is tuple else tuple(value)
    return _clean_attribute_value(value, _sdk_length(length))  # type: ignore[no-any-return]


def _plain_tuple(value: tuple[object, ...]) -> bool:
    """Whether every item is a plain str, int, float or bool (the SDK keeps such a tuple as it is)."""
    for item in value:  # noqa: SIM110 - a loop is cheaper than all() over a generator
        if type(item) not in _PLAIN:
            return False
    return True


def _clean_pair(key: object, value: Any, length: int) -> tuple[str, AttributeValue] | None:
    """One pair as ``BoundedAttributes`` keeps it, or ``None`` when the SDK drops its key."""
    if type(key) is not str or not key:
        key = _clean_key(key)
        if key is None:
            return None
    kind = type(value)
    if kind is str:
        if len(value) > length:
            value = value[:length]
    elif kind is not int and kind is not bool and kind is not float:
        value = _clean_value(value, length)
    return key, value


def _stored_as_is(source: Mapping[Any, Any]) -> bool:
    """Whether the SDK would store every pair as given: non-empty str keys, plain values or tuples of them."""
    for key, value in source.items():
        if type(key) is not str or not key:
            return False
        kind = type(value)
        if kind not in _PLAIN and (kind is not tuple or not _plain_tuple(value)):
            return False
    return True


def _fill(target: dict[str, AttributeValue], source: Mapping[Any, Any], limit: int, length: int) -> int:
    """Fill a new ``target`` from ``source`` as ``BoundedAttributes(limit, source)`` does; the count dropped.

    ``target`` may already hold ``http.route``: the source is then taken as merged after it,
    keeping that first position, as the SDK receives one merged mapping.
    """
    if length == _NO_LIMIT and len(target) + len(source) <= limit and _stored_as_is(source):
        # The common case (no length limit, within the count): stored as the SDK would store it.
        target.update(source)
        return 0
    dropped = 0
    for raw_key, raw_value in source.items():
        cleaned = _clean_pair(raw_key, raw_value, length)
        if cleaned is None:
            dropped += 1
            continue
        key, value = cleaned
        target[key] = value
    excess = len(target) - limit
    if excess > 0:
        # Inserted one by one, a bounded dict would have evicted the oldest entries.
        kept = list(target.items())[excess:]
        target.clear()
        target.update(kept)
        dropped += excess
    return dropped


def _update(target: dict[str, AttributeValue], source: Mapping[Any, Any], limit: int, length: int) -> int:
    """``BoundedAttributes._set_items`` on a span that has attributes already; the count dropped."""
    if not limit:
        return len(source)
    if (
        length == _NO_LIMIT
        and len(target) + len(source) <= limit
        and target.keys().isdisjoint(source)
        and _stored_as_is(source)
    ):
        # New keys, within the count, no length limit: stored as the SDK would store them.
        target.update(source)
        return 0
    dropped = 0
    for raw_key, raw_value in source.items():
        cleaned = _clean_pair(raw_key, raw_value, length)
        if cleaned is None:
            dropped += 1
            continue
        key, value = cleaned
        if key in target:
            # The SDK deletes and inserts again: a key set anew moves to the end.
            del target[key]
        elif len(target) >= limit:
            del target[next(iter(target))]
            dropped += 1
        target[key] = value
    return dropped


def _bounded(source: Attributes, limit: int, length: int) -> tuple[Mapping[str, AttributeValue], int]:
    """An event's or link's attributes as the SDK bounds them, and the count dropped."""
    if not source:
        return _NO_ATTRIBUTES, 0
    target: dict[str, AttributeValue] = {}
    return target, _fill(target, source, limit, length)


def _recorded(
    attributes: Mapping[str, AttributeValue], dropped: int, limit: int | None, length: int | None
) -> BoundedAttributes:
    """Cleaned attributes as the SDK's ended ``BoundedAttributes``, with their limits and drop count."""
    # Filled without a length limit: cleaning clean values again changes nothing, except that a
    # value the SDK turned into a string (an Enum, a Decimal) would be cut now, where it was not.
    bounded = BoundedAttributes(limit, attributes, immutable=True, max_value_len=None)
    bounded.max_value_len = length
    bounded.dropped = dropped
    return bounded


def _is_valid_link(context: SpanContext, attributes: Attributes) -> bool:
    """The SDK's test for a link worth keeping (``opentelemetry.sdk.trace._is_valid_link``)."""
    return bool(context and (context.is_valid or (attributes or context.trace_state)))


def _warn_ended(what: str) -> None:
    log.warning("Tried calling %s on an ended span.", what)


class ProxySpan(trace_api.Span):
    """A recording span of the proxy's hot path; its public fields are those ``ReadableSpan`` exposes.

    Made only by :meth:`SpanFactory.start`. Read the fields, do not assign them: they are what
    the OTLP encoder reads after :meth:`end`.
    """

    __slots__ = (
        "_factory",
        "attributes",
        "context",
        "dropped_attributes",
        "dropped_events",
        "dropped_links",
        "end_time",
        "events",
        "instrumentation_scope",
        "kind",
        "links",
        "name",
        "parent",
        "resource",
        "start_time",
        "status",
    )

    def __init__(
        self,
        factory: SpanFactory,
        name: str,
        kind: SpanKind,
        context: SpanContext,
        parent: SpanContext | None,
        start_time: int,
        resource: Resource,
    ) -> None:
        self._factory = factory
        self.name = name
        self.kind = kind
        self.context = context
        self.parent = parent
        self.start_time: int = start_time
        self.end_time: int | None = None
        self.resource = resource
        self.instrumentation_scope: InstrumentationScope = factory.scope
        self.attributes: dict[str, AttributeValue] = {}
        self.dropped_attributes = 0
        self.events: list[LeanEvent] | tuple[()] = ()
        self.dropped_events = 0
        self.links: list[LeanLink] | tuple[()] = ()
        self.dropped_links = 0
        self.status = _UNSET_STATUS

    def __repr__(self) -> str:
        return f'ProxySpan(name="{self.name}", context={self.context})'

    # ── trace_api.Span ─────────────────────────────────────────────────────────────────────

    def get_span_context(self) -> SpanContext:
        """The span's own context (trace id, span id, flags, tracestate)."""
        return self.context

    def is_recording(self) -> bool:
        """True until the span ends, as in the SDK."""
        return self.end_time is None

    def set_attribute(self, key: object, value: AttributeValue) -> None:
        """Set one attribute; an invalid key is dropped and counted, as ``BoundedAttributes`` does.

        ``key`` is typed ``object``, wider than the API's ``str``, so a non-string key is
        counted, not refused.
        """
        # mypyc: ``object``, as arguments are type-checked at the call (native.py, constraint 7).
        if self.end_time is not None:
            log.warning("Setting attribute on ended span.")
            return
        limits = self._factory.limits
        limit = limits.span_attributes
        if not limit or not key or not isinstance(key, str):
            self.dropped_attributes += 1
            return
        kind = type(value)
        if kind is str:
            if len(value) > limits.span_value_length:  # type: ignore[arg-type]
                value = value[: limits.span_value_length]  # type: ignore[index]
        elif kind is not int and kind is not bool and kind is not float:
            value = _clean_value(value, limits.span_value_length)
        attributes = self.attributes
        if key in attributes:
            del attributes[key]
        elif len(attributes) >= limit:
            del attributes[next(iter(attributes))]
            self.dropped_attributes += 1
        attributes[key] = value

    def set_attributes(self, attributes: Mapping[str, AttributeValue]) -> None:
        """Set several attributes, in order, as the SDK sets a mapping.

        As in :meth:`set_attribute`, except for keys: an empty one is dropped and counted, but a
        key that is not a ``str`` and has a ``__str__`` or ``__repr__`` of its own is converted.
        """
        if self.end_time is not None:
            log.warning("Setting attribute on ended span.")
            return
        limits = self._factory.limits
        self.dropped_attributes += _update(
            self.attributes, attributes, limits.span_attributes, limits.span_value_length
        )

    def set_own_attributes(self, attributes: dict[str, AttributeValue]) -> None:
        """Set attributes the proxy built itself, skipping the per-value checks when it can.

        For the proxy's own attribute tables (``attributes.py``, the handler): keys are
        non-empty strings and values are str, bool, int, float or tuples of str, by
        construction. With no value-length limit and room within the count limit, they are
        stored as :meth:`set_attributes` would store them, without looking at each value (a
        key set again keeps its place instead of moving last; the exported values are the same);
        otherwise this is :meth:`set_attributes`.
        """
        limits = self._factory.limits
        recorded = self.attributes
        if (
            self.end_time is None
            and limits.span_value_length == _NO_LIMIT
            and len(recorded) + len(attributes) <= limits.span_attributes
        ):
            recorded.update(attributes)
            return
        self.set_attributes(attributes)

    def add_event(self, name: str, attributes: Attributes = None, timestamp: int | None = None) -> None:
        """Record an event (now, unless ``timestamp`` is given); past the limit the oldest goes."""
        if self.end_time is not None:
            _warn_ended("_add_event")
            return
        limits = self._factory.limits
        cleaned, dropped = _bounded(attributes, limits.event_attributes, limits.value_length)
        event = _new_tuple(LeanEvent, (name, time_ns() if timestamp is None else timestamp, cleaned, dropped))
        events = self.events
        if not events:
            self.events = events = []
        if len(events) >= limits.events:
            self.dropped_events += 1
            if not limits.events:
                return
            del events[0]
        events.append(event)

    def add_link(self, context: SpanContext, attributes: Attributes = None) -> None:
        """Link another span; a link to an invalid context without attributes or tracestate is ignored."""
        if not _is_valid_link(context, attributes):
            return
        if self.end_time is not None:
            _warn_ended("_add_link")
            return
        limits = self._factory.limits
        cleaned, dropped = _bounded(attributes, limits.link_attributes, limits.value_length)
        links = self.links
        if not links:
            self.links = links = []
        if len(links) >= limits.links:
            self.dropped_links += 1
            if not limits.links:
                return
            del links[0]
        links.append(LeanLink(context, cleaned, dropped))

    def update_name(self, name: str) -> None:
        """Rename the span (until it ends)."""
        if self.end_time is not None:
            _warn_ended("update_name")
            return
        self.name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        """Set the status with the SDK's rules: OK is final, UNSET is ignored, a description needs ERROR."""
        if self.end_time is not None:
            _warn_ended("set_status")
            return
        if isinstance(status, Status):
            if self.status.status_code is StatusCode.OK or status.status_code is StatusCode.UNSET:
                return
            if description is not None:
                log.warning(
                    "Description %s ignored. Use either `Status` or `(StatusCode, Description)`", description
                )
            self.status = status
        elif isinstance(status, StatusCode):
            if self.status.status_code is StatusCode.OK or status is StatusCode.UNSET:
                return
            self.status = Status(status, description)

    def record_exception(
        self,
        exception: BaseException,
        attributes: Attributes = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        """Record ``exception`` as an ``exception`` event with the SDK's attributes."""
        kind = type(exception)
        module = kind.__module__
        recorded: dict[str, AttributeValue] = {
            EXCEPTION_TYPE: f"{module}.{kind.__qualname__}"
            if module and module != "builtins"
            else kind.__qualname__,
            EXCEPTION_MESSAGE: str(exception),
            EXCEPTION_STACKTRACE: "".join(traceback.format_exception(exception)),
            EXCEPTION_ESCAPED: str(escaped),
        }
        if attributes:
            recorded.update(attributes)
        self.add_event("exception", recorded, timestamp)

    def end(self, end_time: int | None = None) -> None:
        """End the span (now, unless ``end_time`` is given) and hand it to the processors; once only."""
        if self.end_time is not None:
            log.warning("Calling end() on an ended span.")
            return
        self.end_time = time_ns() if end_time is None else end_time
        self._factory.finish(self)

    # ── for processors that need the SDK's type ────────────────────────────────────────────

    def to_readable(self) -> ReadableSpan:
        """The SDK's ``ReadableSpan`` of this span, equal field by field to what the SDK would hand over."""
        factory = self._factory
        limits = factory.limits.source
        attributes = _recorded(
            self.attributes,
            self.dropped_attributes,
            limits.max_span_attributes,
            limits.max_span_attribute_length,
        )
        events: BoundedList[Event] = BoundedList(limits.max_events)
        for event in self.events:
            recorded = _recorded(
                event.attributes,
                event.dropped_attributes,
                limits.max_event_attributes,
                limits.max_attribute_length,
            )
            events.append(Event(event.name, recorded, event.timestamp))
        events.dropped = self.dropped_events
        links: BoundedList[Link] = BoundedList(limits.max_links)
        for link in self.links:
            recorded = _recorded(
                link.attributes,
                link.dropped_attributes,
                limits.max_link_attributes,
                limits.max_attribute_length,
            )
            links.append(Link(link.context, recorded))
        links.dropped = self.dropped_links
        return ReadableSpan(
            name=self.name,
            context=self.context,
            parent=self.parent,
            resource=self.resource,
            attributes=attributes,
            events=events,
            links=links,
            kind=self.kind,
            instrumentation_info=factory.info,
            status=self.status,
            start_time=self.start_time,
            end_time=self.end_time,
            instrumentation_scope=self.instrumentation_scope,
        )


# mypyc: ProxySpan's own ABC cache (native.py, constraint 8); without it, it would share
# trace_api.Span's, and isinstance(any_span, ProxySpan) would answer True once the base had
# seen that span's class. In the pure build it has one already, and this only empties it.
_abc._abc_init(ProxySpan)


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


@dataclass(frozen=True, slots=True)
class _Sampling:
    """The provider's sampler, compiled where possible."""

    sampler: Sampler
    #: the plan of every span not routed below; None: ask ``sampler``
    default: _Plan | None
    #: SERVER spans by ``http.route`` (the proxy's ``RouteSampler``); None: ask ``sampler``
    routes: Mapping[str, _Plan | None]


def _compile(sampler: Sampler) -> _Sampling:
    # Imported here: tracing.py builds the factory, so it imports this module first.
    from mes_trace_proxy.tracing import RouteSampler

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
        "_direct",
        "_enabled",
        "_logged",
        "_new_span_id",
        "_new_trace_id",
        "_provider",
        "_random_root",
        "_readable",
        "_sampling",
        "info",
        "limits",
        "scope",
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
        self.limits = _Limits.of(limits if limits is not None else SpanLimits())
        self.scope = InstrumentationScope(scope_name, scope_version, None, None)
        with warnings.catch_warnings():
            # Deprecated, but the SDK still fills ReadableSpan.instrumentation_info with it.
            warnings.simplefilter("ignore", DeprecationWarning)
            self.info = InstrumentationInfo(scope_name, scope_version, None)
        # OTEL_SDK_DISABLED makes the provider hand out a NoOpTracer, whose spans are invalid.
        self._enabled = isinstance(provider.get_tracer(scope_name, scope_version), Tracer)
        self._direct = tuple(p for p in processors if isinstance(p, OtlpExportProcessor))
        self._readable = tuple(p for p in processors if not isinstance(p, OtlpExportProcessor))
        self._logged: set[int] = set()

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
        parent), inside ``tracing.ids.using(trace_id)``.

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
        sampling = self._sampling
        plan = sampling.default
        if kind is SpanKind.SERVER and sampling.routes:
            routed = attributes.get(HTTP_ROUTE, route) if attributes else route
            if routed is not None:
                plan = sampling.routes.get(routed if type(routed) is str else str(routed), plan)
        if plan is None:
            return self._start_asking(
                name, kind, given, parent, trace, random_bit, route, attributes, links, start_time
            )
        if parent is None:
            bound = plan.root
        elif remote:
            bound = plan.remote_sampled if parent_flags & _SAMPLED else plan.remote_not_sampled
        else:
            bound = plan.local_sampled if parent_flags & _SAMPLED else plan.local_not_sampled
        span_id = self._new_span_id()
        valid = 0 < trace < _TRACE_ID_END and 0 < span_id < _SPAN_ID_END
        if trace & _TRACE_ID_LOW >= bound:
            flags = _FLAGS[random_bit]
            return NonRecordingSpan(_new_tuple(SpanContext, (trace, span_id, False, flags, state, valid)))
        flags = _FLAGS[_SAMPLED | random_bit]
        span = ProxySpan(
            self,
            name,
            kind,
            _new_tuple(SpanContext, (trace, span_id, False, flags, state, valid)),
            parent,
            time_ns() if start_time is None else start_time,
            self._provider.resource,
        )
        if route is not None:
            limits = self.limits
            recorded = span.attributes
            recorded[HTTP_ROUTE] = (
                route
                if type(route) is str and len(route) <= limits.span_value_length
                else _clean_value(route, limits.span_value_length)
            )
            if attributes or not limits.span_attributes:
                span.dropped_attributes = _fill(
                    recorded, attributes or _NO_ATTRIBUTES, limits.span_attributes, limits.span_value_length
                )
        elif attributes:
            limits = self.limits
            span.dropped_attributes = _fill(
                span.attributes, attributes, limits.span_attributes, limits.span_value_length
            )
        if links:
            self._set_links(span, links)
        return span

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
        span_context = SpanContext(trace, self._new_span_id(), False, flags, result.trace_state)
        if decision is Decision.DROP:
            return NonRecordingSpan(span_context)
        span = ProxySpan(
            self,
            name,
            kind,
            span_context,
            parent,
            time_ns() if start_time is None else start_time,
            self._provider.resource,
        )
        if result.attributes:
            limits = self.limits
            span.dropped_attributes = _fill(
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
            attributes = link.attributes
            if link is not None and _is_valid_link(link.context, attributes):
                cleaned, dropped = _bounded(attributes, limits.link_attributes, limits.value_length)
                kept.append(LeanLink(link.context, cleaned, dropped))
        excess = len(kept) - limits.links
        if excess > 0:
            # BoundedList.from_seq keeps the last entries.
            kept = kept[excess:]
            span.dropped_links = excess
        span.links = kept

    def finish(self, span: ProxySpan) -> None:
        """Hand an ended span to the processors; a failing one is logged once and counted, never raised."""
        for processor in self._direct:
            try:
                processor.on_end(span)
            except Exception:
                self._failed(processor)
        if self._readable:
            try:
                readable = span.to_readable()
            except Exception:
                for other in self._readable:
                    self._failed(other)
                return
            for other in self._readable:
                try:
                    other.on_end(readable)
                except Exception:
                    self._failed(other)

    def _failed(self, processor: SpanProcessor) -> None:
        stats = getattr(processor, "stats", None)
        if isinstance(stats, ExportStats):
            stats.failed += 1
        if id(processor) not in self._logged:
            self._logged.add(id(processor))
            log.exception("span processor %s failed on a proxy span; it is not exported", processor)
