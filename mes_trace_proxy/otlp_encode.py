"""OTLP span encoder that writes the protobuf wire format of ``ExportTraceServiceRequest`` directly.

It gives the same message as the SDK's ``encode_spans`` but builds no protobuf objects, and it
memoises the encoded bytes of what repeats: attribute pairs, resources and scopes. The wire
format's primitives (varints, tags, AnyValue) are ``otlp_wire``'s; this module knows the
messages: ``ExportTraceServiceRequest``, ``ResourceSpans``, ``ScopeSpans``, ``Span``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, Final, NamedTuple, Protocol, TypeVar

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanKind
from opentelemetry.trace.span import DEFAULT_TRACE_STATE, SpanContext
from opentelemetry.trace.status import Status, StatusCode
from opentelemetry.util.types import Attributes

from mes_trace_proxy.otlp_wire import (
    ANY_STRING,
    I32,
    I64,
    KV_KEY,
    KV_VALUE,
    LEN,
    VARINT,
    delimited,
    encode_key_value,
    pack_fixed32,
    pack_fixed64,
    pack_times,
    rejected_spans,
    tag,
    varint,
)

__all__ = [
    "EncodableEvent",
    "EncodableLink",
    "EncodableSpan",
    "EncodedSpan",
    "OtlpSpanEncoder",
    "encode_request",
    "rejected_spans",
]

log = logging.getLogger("mes_trace_proxy.otlp_encode")

#: Memoised (key, value) attribute pairs. The proxy's repeating pairs are about ten per route
#: (method, route, listener, server.address/port, scheme, protocol version, rule, status code),
#: so even a rules file with a hundred routes needs about 1000 entries; 4096 leaves room for
#: that while the one-off values (order ids, sizes) churn through. At roughly 100 bytes an
#: entry the cache stays well under 1 MiB. When it is full it is cleared, so the repeating
#: pairs come back after one miss each instead of one-off values pinning it forever.
ATTRIBUTE_CACHE_SIZE: Final = 4096
#: Encoded resources and scopes, kept by object identity. A provider has one resource and
#: the proxy a handful of tracers; 64 only guards against a caller making new ones per span.
OBJECT_CACHE_SIZE: Final = 64
#: Encoded span and event names. A span name is ``{method} {route}``, so there are a few per
#: rule; 1024 covers a large rules file, and the cache is cleared when full, like the pairs'.
NAME_CACHE_SIZE: Final = 1024

_K = TypeVar("_K")

# SpanFlags from trace.proto: bit 8 says the is-remote bit is known, bit 9 is that bit.
_FLAGS_HAS_IS_REMOTE: Final = 0x100
_FLAGS_IS_REMOTE: Final = 0x200

# InstrumentationScope and Resource.
_SCOPE_NAME: Final = tag(1, LEN)
_SCOPE_VERSION: Final = tag(2, LEN)
_SCOPE_ATTRIBUTES: Final = tag(3, LEN)
_RESOURCE_ATTRIBUTES: Final = tag(1, LEN)
# ExportTraceServiceRequest, ResourceSpans, ScopeSpans (trace.proto / trace_service.proto).
_REQUEST_RESOURCE_SPANS: Final = tag(1, LEN)
_RS_RESOURCE: Final = tag(1, LEN)
_RS_SCOPE_SPANS: Final = tag(2, LEN)
_RS_SCHEMA_URL: Final = tag(3, LEN)
_SS_SCOPE: Final = tag(1, LEN)
_SS_SPANS: Final = tag(2, LEN)
_SS_SCHEMA_URL: Final = tag(3, LEN)
# Span.
_SPAN_TRACE_ID: Final = tag(1, LEN) + b"\x10"  # always 16 bytes
_SPAN_SPAN_ID: Final = tag(2, LEN) + b"\x08"  # always 8 bytes
_SPAN_TRACE_STATE: Final = tag(3, LEN)
_SPAN_PARENT_ID: Final = tag(4, LEN) + b"\x08"
_SPAN_NAME: Final = tag(5, LEN)
_SPAN_START: Final = tag(7, I64)
_SPAN_END: Final = tag(8, I64)
_SPAN_START_BYTE: Final = _SPAN_START[0]
_SPAN_END_BYTE: Final = _SPAN_END[0]
_SPAN_ATTRIBUTES: Final = tag(9, LEN)
_SPAN_DROPPED_ATTRIBUTES: Final = tag(10, VARINT)
_SPAN_EVENTS: Final = tag(11, LEN)
_SPAN_DROPPED_EVENTS: Final = tag(12, VARINT)
_SPAN_LINKS: Final = tag(13, LEN)
_SPAN_DROPPED_LINKS: Final = tag(14, VARINT)
_SPAN_STATUS: Final = tag(15, LEN)
_SPAN_FLAGS_LOCAL: Final = tag(16, I32) + pack_fixed32(_FLAGS_HAS_IS_REMOTE)
_SPAN_FLAGS_REMOTE: Final = tag(16, I32) + pack_fixed32(_FLAGS_HAS_IS_REMOTE | _FLAGS_IS_REMOTE)
#: The OTLP SpanKind is the SDK's value + 1 (0 is SPAN_KIND_UNSPECIFIED). Indexed by the enum's
#: value (``_value_``, a plain attribute): hashing an Enum member runs Python code.
_SPAN_KIND: Final = tuple(
    tag(6, VARINT) + varint(value + 1) for value in range(max(k.value for k in SpanKind) + 1)
)
# Span.Event.
_EVENT_TIME: Final = tag(1, I64)
_EVENT_NAME: Final = tag(2, LEN)
_EVENT_ATTRIBUTES: Final = tag(3, LEN)
_EVENT_DROPPED_ATTRIBUTES: Final = tag(4, VARINT)
# Span.Link.
_LINK_TRACE_ID: Final = tag(1, LEN) + b"\x10"
_LINK_SPAN_ID: Final = tag(2, LEN) + b"\x08"
_LINK_ATTRIBUTES: Final = tag(4, LEN)
_LINK_DROPPED_ATTRIBUTES: Final = tag(5, VARINT)
_LINK_FLAGS_LOCAL: Final = tag(6, I32) + pack_fixed32(_FLAGS_HAS_IS_REMOTE)
_LINK_FLAGS_REMOTE: Final = tag(6, I32) + pack_fixed32(_FLAGS_HAS_IS_REMOTE | _FLAGS_IS_REMOTE)
# Status.
_STATUS_MESSAGE: Final = tag(2, LEN)
_STATUS_CODE: Final = tag(3, VARINT)
#: The whole ``status`` field of a status without a message, by StatusCode value (nearly every span).
_SPAN_STATUS_PLAIN: Final = tuple(
    _SPAN_STATUS + bytes((len(body),)) + body
    for body in (_STATUS_CODE + varint(code.value) if code.value else b"" for code in StatusCode)
)


class EncodableEvent(Protocol):
    """What the encoder reads of a span event: the SDK's ``Event`` and ``spans.LeanEvent`` have it."""

    @property
    def name(self) -> str: ...
    @property
    def timestamp(self) -> int: ...
    @property
    def attributes(self) -> Attributes: ...
    @property
    def dropped_attributes(self) -> int: ...


class EncodableLink(Protocol):
    """What the encoder reads of a span link: the API's ``Link`` and ``spans.LeanLink`` have it."""

    @property
    def context(self) -> SpanContext: ...
    @property
    def attributes(self) -> Attributes: ...
    @property
    def dropped_attributes(self) -> int: ...


class EncodableSpan(Protocol):
    """What the encoder reads of a finished span: ``ReadableSpan`` and ``spans.ProxySpan`` have it."""

    @property
    def name(self) -> str: ...
    @property
    def context(self) -> Any: ...  # the SDK leaves ReadableSpan.context untyped
    @property
    def parent(self) -> SpanContext | None: ...
    @property
    def kind(self) -> SpanKind: ...
    @property
    def start_time(self) -> int | None: ...
    @property
    def end_time(self) -> int | None: ...
    @property
    def attributes(self) -> Attributes: ...
    @property
    def dropped_attributes(self) -> int: ...
    @property
    def events(self) -> Sequence[EncodableEvent]: ...
    @property
    def dropped_events(self) -> int: ...
    @property
    def links(self) -> Sequence[EncodableLink]: ...
    @property
    def dropped_links(self) -> int: ...
    @property
    def status(self) -> Status: ...
    @property
    def resource(self) -> Resource: ...
    @property
    def instrumentation_scope(self) -> InstrumentationScope | None: ...
    def get_span_context(self) -> SpanContext | None: ...


class EncodedSpan(NamedTuple):
    """One span's encoded bytes with the resource and scope it is grouped under."""

    resource: Resource
    scope: InstrumentationScope | None
    #: the ``ScopeSpans.spans`` field: tag, length and the Span message
    field: bytes


#: Makes an ``EncodedSpan`` from its fields without its Python-level ``__new__`` (half the cost).
_new_tuple: Final = tuple.__new__


class _PairCaches(NamedTuple):
    """The memoised attribute pairs of one field tag (see ``OtlpSpanEncoder.__init__``)."""

    plain: dict[tuple[object, object], bytes]
    typed: dict[tuple[type, object, object], bytes]


class OtlpSpanEncoder:
    """Encodes span batches to ``ExportTraceServiceRequest`` bytes, memoising what repeats.

    One instance per exporter. Its caches are plain dicts without locks: a racing thread can
    at worst encode a pair twice or clear the cache early, never read a wrong entry, since
    every entry is written whole under the GIL.
    """

    def __init__(self) -> None:
        #: per field tag: the tagged KeyValue bytes of pairs whose value is a str or a tuple of
        #: str, keyed by the ``(key, value)`` item itself, and of int and bool pairs, keyed by
        #: ``(type, key, value)``
        self._pairs: dict[bytes, _PairCaches] = {}
        self._span_pairs = self._caches(_SPAN_ATTRIBUTES)
        self._event_pairs = self._caches(_EVENT_ATTRIBUTES)
        #: the KeyValue ``key`` field by attribute key
        self._keys: dict[str, bytes] = {}
        #: the tagged, length-prefixed span and event names by name
        self._span_names: dict[str, bytes] = {}
        self._event_names: dict[str, bytes] = {}
        self._resources: dict[int, tuple[Resource, bytes]] = {}
        self._scopes: dict[int, tuple[InstrumentationScope, bytes]] = {}

    def _caches(self, tag: bytes) -> _PairCaches:
        caches = self._pairs.get(tag)
        if caches is None:
            caches = self._pairs[tag] = _PairCaches({}, {})
        return caches

    def encode_request(self, spans: Sequence[EncodableSpan]) -> bytes:
        """Serialize ``spans`` as one OTLP ``ExportTraceServiceRequest``.

        Spans are grouped by resource and then by instrumentation scope in order of first
        appearance, as the SDK's encoder does (equal resources or scopes share a group).

        Args:
            spans: finished SDK spans.

        Returns:
            The protobuf wire-format bytes, ready for OTLP/HTTP or to parse for OTLP/gRPC.
        """
        return self.assemble([self.encode_span(span) for span in spans])

    def encode_span(self, span: EncodableSpan) -> EncodedSpan:
        """Encode one finished span now, to be put in a request later by :meth:`assemble`.

        This is the per-span share of the work (about 5 µs for a proxy span), so an exporter
        can pay it as each span ends instead of in one burst per batch.

        Args:
            span: a finished SDK span.

        Returns:
            The span's resource, scope and ``ScopeSpans.spans`` field bytes.
        """
        body = self._span(span)
        return _new_tuple(
            EncodedSpan,
            (span.resource, span.instrumentation_scope or None, _SS_SPANS + varint(len(body)) + body),
        )

    def assemble(self, spans: Sequence[EncodedSpan]) -> bytes:
        """Join encoded spans into one ``ExportTraceServiceRequest``, grouped as the SDK groups them.

        Args:
            spans: spans from :meth:`encode_span`, in the order they ended.

        Returns:
            The protobuf wire-format bytes.
        """
        # resource group → scope group → encoded spans; keyed by identity, merged by equality.
        groups: list[tuple[Resource, list[tuple[InstrumentationScope | None, list[bytes]]]]] = []
        resource_index: dict[int, int] = {}
        scope_index: dict[tuple[int, int], int] = {}
        for resource, scope, field in spans:
            r = resource_index.get(id(resource))
            if r is None:
                r = next((i for i, (known, _) in enumerate(groups) if known == resource), len(groups))
                if r == len(groups):
                    groups.append((resource, []))
                resource_index[id(resource)] = r
            scope_groups = groups[r][1]
            s = scope_index.get((r, id(scope)))
            if s is None:
                s = next(
                    (i for i, (known, _) in enumerate(scope_groups) if known == scope), len(scope_groups)
                )
                if s == len(scope_groups):
                    scope_groups.append((scope, []))
                scope_index[(r, id(scope))] = s
            scope_groups[s][1].append(field)

        out = []
        for resource, scope_groups in groups:
            body = [self._resource(resource)]
            for scope, encoded_spans in scope_groups:
                scope_spans = [self._scope(scope), *encoded_spans]
                if scope is not None and scope.schema_url:
                    scope_spans.append(_SS_SCHEMA_URL + delimited(scope.schema_url.encode("utf-8")))
                body.append(_RS_SCOPE_SPANS + delimited(b"".join(scope_spans)))
            if resource.schema_url:
                body.append(_RS_SCHEMA_URL + delimited(resource.schema_url.encode("utf-8")))
            out.append(_REQUEST_RESOURCE_SPANS + delimited(b"".join(body)))
        return b"".join(out)

    def _span(self, span: EncodableSpan) -> bytes:
        context = span.get_span_context()
        assert context is not None  # a finished span always has one
        # A SpanContext is a tuple: one unpacking instead of three property calls.
        trace_id, span_id, _, _, trace_state, _ = context
        parent = span.parent
        parts = [_SPAN_TRACE_ID, trace_id.to_bytes(16, "big"), _SPAN_SPAN_ID, span_id.to_bytes(8, "big")]
        # DEFAULT_TRACE_STATE (no tracestate) is nearly every span's: skip the Mapping's __len__.
        if trace_state is not DEFAULT_TRACE_STATE and trace_state:
            state = ",".join([f"{key}={value}" for key, value in trace_state.items()])
            parts += (_SPAN_TRACE_STATE, delimited(state.encode("utf-8")))
        if parent is not None:
            parts.append(_SPAN_PARENT_ID)
            parts.append(parent[1].to_bytes(8, "big"))
        name = span.name
        if name:
            encoded_name = self._span_names.get(name)
            if encoded_name is None:
                encoded_name = _remember(self._span_names, name, _SPAN_NAME + delimited(name.encode("utf-8")))
            parts.append(encoded_name)
        parts.append(_SPAN_KIND[span.kind._value_])
        start_time = span.start_time
        end_time = span.end_time
        if start_time and end_time:
            parts.append(pack_times(_SPAN_START_BYTE, start_time, _SPAN_END_BYTE, end_time))
        else:
            if start_time:
                parts += (_SPAN_START, pack_fixed64(start_time))
            if end_time:
                parts += (_SPAN_END, pack_fixed64(end_time))
        attributes = span.attributes
        if attributes:
            self._attributes(parts, _SPAN_ATTRIBUTES, attributes, self._span_pairs)
        dropped = span.dropped_attributes
        if dropped:
            parts += (_SPAN_DROPPED_ATTRIBUTES, varint(dropped))
        for event in span.events:
            event_body = self._event(event)
            parts += (_SPAN_EVENTS, varint(len(event_body)), event_body)
        dropped = span.dropped_events
        if dropped:
            parts += (_SPAN_DROPPED_EVENTS, varint(dropped))
        for link in span.links:
            link_body = self._link(link)
            parts += (_SPAN_LINKS, varint(len(link_body)), link_body)
        dropped = span.dropped_links
        if dropped:
            parts += (_SPAN_DROPPED_LINKS, varint(dropped))
        status = span.status
        if status is not None:
            description = status.description
            if description:
                status_body = _STATUS_MESSAGE + delimited(description.encode("utf-8"))
                code = status.status_code._value_
                if code:
                    status_body += _STATUS_CODE + varint(code)
                parts += (_SPAN_STATUS, delimited(status_body))
            else:
                parts.append(_SPAN_STATUS_PLAIN[status.status_code._value_])
        parts.append(_SPAN_FLAGS_REMOTE if parent is not None and parent[2] else _SPAN_FLAGS_LOCAL)
        return b"".join(parts)

    def _event(self, event: EncodableEvent) -> bytes:
        timestamp = event.timestamp
        parts = [_EVENT_TIME, pack_fixed64(timestamp)] if timestamp else []
        name = event.name
        if name:
            encoded_name = self._event_names.get(name)
            if encoded_name is None:
                encoded_name = _remember(
                    self._event_names, name, _EVENT_NAME + delimited(name.encode("utf-8"))
                )
            parts.append(encoded_name)
        attributes = event.attributes
        if attributes:
            self._attributes(parts, _EVENT_ATTRIBUTES, attributes, self._event_pairs)
        dropped = event.dropped_attributes
        if dropped:
            parts += (_EVENT_DROPPED_ATTRIBUTES, varint(dropped))
        return b"".join(parts)

    def _link(self, link: EncodableLink) -> bytes:
        context = link.context
        parts = [
            _LINK_TRACE_ID,
            context.trace_id.to_bytes(16, "big"),
            _LINK_SPAN_ID,
            context.span_id.to_bytes(8, "big"),
        ]
        if link.attributes:
            self._attributes(parts, _LINK_ATTRIBUTES, link.attributes)
        if link.dropped_attributes:
            parts += (_LINK_DROPPED_ATTRIBUTES, varint(link.dropped_attributes))
        parts.append(_LINK_FLAGS_REMOTE if context.is_remote else _LINK_FLAGS_LOCAL)
        return b"".join(parts)

    def _attributes(
        self,
        parts: list[bytes],
        tag: bytes,
        attributes: Mapping[str, object],
        caches: _PairCaches | None = None,
    ) -> None:
        """Append one ``tag``-ged KeyValue per attribute; a bad one is logged and skipped, as in the SDK."""
        plain, typed = caches or self._caches(tag)
        # parts.append and plain.get are written out, not bound to locals: the native build
        # turns them into direct C calls, which a bound method would hide from it.
        for item in attributes.items():
            # Only pairs with a str value (or a tuple of str) are in ``plain``, and a str equals
            # only a str, so the item itself can be the key: True == 1 and 0.0 == -0.0 never
            # meet an entry there. Most pairs of a proxy span hit here.
            try:
                cached = plain.get(item)
            except TypeError:  # an unhashable value (a mapping): encoded every time
                encoded = _encode_pair(tag, *item)
                if encoded is not None:
                    parts.append(encoded)
                continue
            if cached is not None:
                parts.append(cached)
                continue
            key, value = item
            kind = type(value)
            if kind is int or kind is bool:
                # The type is part of this key: True == 1 would otherwise share an entry.
                typed_key = (kind, key, value)
                cached = typed.get(typed_key)
                if cached is None:
                    cached = _encode_pair(tag, key, value)
                    if cached is None:
                        continue
                    _remember(typed, typed_key, cached, ATTRIBUTE_CACHE_SIZE)
                parts.append(cached)
                continue
            if isinstance(value, str) and type(key) is str:
                # A one-off value (an order id, a path): only the key's bytes are reused.
                try:
                    prefix = self._keys.get(key)
                    if prefix is None:
                        prefix = _remember(self._keys, key, KV_KEY + delimited(key.encode("utf-8")))
                    encoded_value = value.encode("utf-8")
                except UnicodeEncodeError as error:
                    log.warning("skipped attribute %r that OTLP cannot encode: %s", key, error)
                    continue
                any_value = ANY_STRING + varint(len(encoded_value)) + encoded_value
                pair = prefix + KV_VALUE + varint(len(any_value)) + any_value
                parts.append(
                    _remember(plain, (key, value), tag + varint(len(pair)) + pair, ATTRIBUTE_CACHE_SIZE)
                )
                continue
            encoded = _encode_pair(tag, key, value)
            if encoded is None:
                continue
            # Floats are never cached: 0.0 and -0.0 are equal keys but encode differently.
            if kind is tuple and _all_str(value):
                _remember(plain, (key, value), encoded, ATTRIBUTE_CACHE_SIZE)
            parts.append(encoded)

    def _resource(self, resource: Resource) -> bytes:
        """The ``resource`` field of ResourceSpans, cached per resource object."""
        cached = self._resources.get(id(resource))
        if cached is not None and cached[0] is resource:
            return cached[1]
        parts: list[bytes] = []
        self._attributes(parts, _RESOURCE_ATTRIBUTES, resource.attributes)
        encoded = _RS_RESOURCE + delimited(b"".join(parts))
        if len(self._resources) >= OBJECT_CACHE_SIZE:
            self._resources.clear()
        # The object is kept with its bytes so its id cannot be reused while cached.
        self._resources[id(resource)] = (resource, encoded)
        return encoded

    def _scope(self, scope: InstrumentationScope | None) -> bytes:
        """The ``scope`` field of ScopeSpans (present and empty for no scope), cached per object."""
        if scope is None:
            return _SS_SCOPE + b"\x00"
        cached = self._scopes.get(id(scope))
        if cached is not None and cached[0] is scope:
            return cached[1]
        parts: list[bytes] = []
        if scope.name:
            parts += (_SCOPE_NAME, delimited(scope.name.encode("utf-8")))
        if scope.version:
            parts += (_SCOPE_VERSION, delimited(scope.version.encode("utf-8")))
        if scope.attributes:
            self._attributes(parts, _SCOPE_ATTRIBUTES, scope.attributes)
        encoded = _SS_SCOPE + delimited(b"".join(parts))
        if len(self._scopes) >= OBJECT_CACHE_SIZE:
            self._scopes.clear()
        self._scopes[id(scope)] = (scope, encoded)
        return encoded


def _encode_pair(tag: bytes, key: object, value: object) -> bytes | None:
    """``tag`` and the length-prefixed KeyValue; None (logged) for a pair OTLP cannot carry, as in the SDK."""
    try:
        return tag + delimited(encode_key_value(key, value))
    except (TypeError, ValueError) as error:  # UnicodeEncodeError is a ValueError
        log.warning("skipped attribute %r that OTLP cannot encode: %s", key, error)
        return None


def _remember(cache: dict[_K, bytes], key: _K, encoded: bytes, size: int = NAME_CACHE_SIZE) -> bytes:
    """Store ``encoded`` under ``key``; a full cache is cleared first, so what repeats comes back."""
    if len(cache) >= size:
        cache.clear()
    cache[key] = encoded
    return encoded


def _all_str(value: object) -> bool:
    """Whether a tuple holds only strings (whose cached encoding no other equal tuple shares)."""
    return isinstance(value, tuple) and all(type(item) is str for item in value)


def encode_request(spans: Sequence[EncodableSpan]) -> bytes:
    """Serialize ``spans`` as one OTLP ``ExportTraceServiceRequest`` with a fresh encoder.

    Use an ``OtlpSpanEncoder`` kept per exporter to reuse its caches across batches.

    Args:
        spans: finished SDK spans.

    Returns:
        The protobuf wire-format bytes.
    """
    return OtlpSpanEncoder().encode_request(spans)
