"""The proxy's recording span: what ``ReadableSpan`` exposes, kept in plain slots, and where it ends.

``spans.SpanFactory`` starts these spans (spans.py's docstring says why they are not the SDK's
and how they are held to it); this module is the span object itself -- attributes, events,
links and status under the SDK's rules (``span_limits``) -- and :class:`SpanSink`, which hands
an ended span to the processors.
"""

from __future__ import annotations

import _abc  # type: ignore[import-not-found]  # abc's C half: no stubs
import logging
import traceback
from collections.abc import Mapping, Sequence
from time import time_ns
from typing import Final, NamedTuple

from opentelemetry import trace as trace_api
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanProcessor
from opentelemetry.sdk.util import BoundedList
from opentelemetry.sdk.util.instrumentation import InstrumentationInfo, InstrumentationScope
from opentelemetry.semconv.attributes.exception_attributes import (
    EXCEPTION_ESCAPED,
    EXCEPTION_MESSAGE,
    EXCEPTION_STACKTRACE,
    EXCEPTION_TYPE,
)
from opentelemetry.trace import Link, SpanContext, SpanKind
from opentelemetry.trace.status import Status, StatusCode
from opentelemetry.util.types import Attributes, AttributeValue

from mes_trace_proxy.telemetry.export import ExportStats, OtlpExportProcessor
from mes_trace_proxy.telemetry.span_limits import (
    NO_LIMIT,
    Limits,
    as_bounded_attributes,
    bounded,
    clean_value,
    is_valid_link,
    update,
)

__all__ = ["LeanEvent", "LeanLink", "ProxySpan", "SpanSink"]

# One logger for the span machinery (the factory and its spans), as before the split.
log = logging.getLogger("mes_trace_proxy.spans")

#: ``tuple.__new__``: makes a LeanEvent from its fields without its Python-level ``__new__``
#: (SpanContexts come from span_context.span_context, which does the same).
_new_tuple: Final = tuple.__new__
_UNSET_STATUS: Final = Status(StatusCode.UNSET)


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


class SpanSink:
    """Where the proxy's spans end: the processors, sorted once, and what every span shares.

    ``OtlpExportProcessor`` gets the span itself; any other processor a ``ReadableSpan`` made
    from it. A failing processor is logged once and counted, never raised into the request.
    """

    __slots__ = ("_direct", "_logged", "_readable", "info", "limits", "scope")

    def __init__(
        self,
        processors: Sequence[SpanProcessor],
        limits: Limits,
        scope: InstrumentationScope,
        info: InstrumentationInfo,
    ) -> None:
        """Sort ``processors`` by what they take; keep the spans' limits and scope."""
        self.limits = limits
        self.scope = scope
        self.info = info
        self._direct = tuple(p for p in processors if isinstance(p, OtlpExportProcessor))
        self._readable = tuple(p for p in processors if not isinstance(p, OtlpExportProcessor))
        self._logged: set[int] = set()

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


def _warn_ended(what: str) -> None:
    log.warning("Tried calling %s on an ended span.", what)


class ProxySpan(trace_api.Span):
    """A recording span of the proxy's hot path; its public fields are those ``ReadableSpan`` exposes.

    Made only by ``spans.SpanFactory.start``. Read the fields, do not assign them: they are what
    the OTLP encoder reads after :meth:`end`.
    """

    __slots__ = (
        "_sink",
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
        sink: SpanSink,
        name: str,
        kind: SpanKind,
        context: SpanContext,
        parent: SpanContext | None,
        start_time: int,
        resource: Resource,
    ) -> None:
        self._sink = sink
        self.name = name
        self.kind = kind
        self.context = context
        self.parent = parent
        self.start_time: int = start_time
        self.end_time: int | None = None
        self.resource = resource
        self.instrumentation_scope: InstrumentationScope = sink.scope
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
        limits = self._sink.limits
        limit = limits.span_attributes
        if not limit or not key or not isinstance(key, str):
            self.dropped_attributes += 1
            return
        kind = type(value)
        if kind is str:
            if len(value) > limits.span_value_length:  # type: ignore[arg-type]
                value = value[: limits.span_value_length]  # type: ignore[index]
        elif kind is not int and kind is not bool and kind is not float:
            value = clean_value(value, limits.span_value_length)
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
        limits = self._sink.limits
        self.dropped_attributes += update(
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
        limits = self._sink.limits
        recorded = self.attributes
        if (
            self.end_time is None
            and limits.span_value_length == NO_LIMIT
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
        limits = self._sink.limits
        cleaned, dropped = bounded(attributes, limits.event_attributes, limits.value_length)
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
        if not is_valid_link(context, attributes):
            return
        if self.end_time is not None:
            _warn_ended("_add_link")
            return
        limits = self._sink.limits
        cleaned, dropped = bounded(attributes, limits.link_attributes, limits.value_length)
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
        self._sink.finish(self)

    # ── for processors that need the SDK's type ────────────────────────────────────────────

    def to_readable(self) -> ReadableSpan:
        """The SDK's ``ReadableSpan`` of this span, equal field by field to what the SDK would hand over."""
        sink = self._sink
        limits = sink.limits.source
        attributes = as_bounded_attributes(
            self.attributes,
            self.dropped_attributes,
            limits.max_span_attributes,
            limits.max_span_attribute_length,
        )
        events: BoundedList[Event] = BoundedList(limits.max_events)
        for event in self.events:
            recorded = as_bounded_attributes(
                event.attributes,
                event.dropped_attributes,
                limits.max_event_attributes,
                limits.max_attribute_length,
            )
            events.append(Event(event.name, recorded, event.timestamp))
        events.dropped = self.dropped_events
        links: BoundedList[Link] = BoundedList(limits.max_links)
        for link in self.links:
            recorded = as_bounded_attributes(
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
            instrumentation_info=sink.info,
            status=self.status,
            start_time=self.start_time,
            end_time=self.end_time,
            instrumentation_scope=self.instrumentation_scope,
        )


# mypyc: ProxySpan's own ABC cache (native.py, constraint 8); without it, it would share
# trace_api.Span's, and isinstance(any_span, ProxySpan) would answer True once the base had
# seen that span's class. In the pure build it has one already, and this only empties it.
_abc._abc_init(ProxySpan)
