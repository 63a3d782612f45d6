"""OTLP span encoder that writes the protobuf wire format of ``ExportTraceServiceRequest`` directly.

It gives the same message as the SDK's ``encode_spans`` but builds no protobuf objects, and it
memoises the encoded bytes of what repeats: attribute pairs, resources and scopes.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Mapping, Sequence
from typing import Final, NamedTuple

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanKind
from opentelemetry.trace.span import SpanContext
from opentelemetry.util.types import Attributes

__all__ = ["EncodedSpan", "OtlpSpanEncoder", "encode_request", "rejected_spans"]

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

_INT64_MIN: Final = -(1 << 63)
_INT64_MAX: Final = (1 << 63) - 1
_UINT64_MASK: Final = (1 << 64) - 1
# SpanFlags from trace.proto: bit 8 says the is-remote bit is known, bit 9 is that bit.
_FLAGS_HAS_IS_REMOTE: Final = 0x100
_FLAGS_IS_REMOTE: Final = 0x200

_pack_double = struct.Struct("<d").pack
_pack_fixed64 = struct.Struct("<Q").pack
_pack_fixed32 = struct.Struct("<I").pack
# One-byte varints are nearly every length and count; look them up instead of looping.
_SMALL_VARINTS: Final = tuple(bytes((i,)) for i in range(0x80))


def _varint(value: int) -> bytes:
    """The base-128 varint of a non-negative int (negative int64 go through the 64-bit mask)."""
    if value < 0x80:
        if value >= 0:
            return _SMALL_VARINTS[value]
        value &= _UINT64_MASK
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _tag(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5

# AnyValue (common.proto): a oneof, so every member is written even when it is the default.
_ANY_STRING: Final = _tag(1, _LEN)
_ANY_BOOL_FALSE: Final = _tag(2, _VARINT) + b"\x00"
_ANY_BOOL_TRUE: Final = _tag(2, _VARINT) + b"\x01"
_ANY_INT: Final = _tag(3, _VARINT)
_ANY_DOUBLE: Final = _tag(4, _I64)
_ANY_ARRAY: Final = _tag(5, _LEN)
_ANY_KVLIST: Final = _tag(6, _LEN)
_ANY_BYTES: Final = _tag(7, _LEN)
# ArrayValue.values, KeyValueList.values, KeyValue.key / KeyValue.value.
_VALUES: Final = _tag(1, _LEN)
_KV_KEY: Final = _tag(1, _LEN)
_KV_VALUE: Final = _tag(2, _LEN)
# InstrumentationScope and Resource.
_SCOPE_NAME: Final = _tag(1, _LEN)
_SCOPE_VERSION: Final = _tag(2, _LEN)
_SCOPE_ATTRIBUTES: Final = _tag(3, _LEN)
_RESOURCE_ATTRIBUTES: Final = _tag(1, _LEN)
# ExportTraceServiceRequest, ResourceSpans, ScopeSpans (trace.proto / trace_service.proto).
_REQUEST_RESOURCE_SPANS: Final = _tag(1, _LEN)
_RS_RESOURCE: Final = _tag(1, _LEN)
_RS_SCOPE_SPANS: Final = _tag(2, _LEN)
_RS_SCHEMA_URL: Final = _tag(3, _LEN)
_SS_SCOPE: Final = _tag(1, _LEN)
_SS_SPANS: Final = _tag(2, _LEN)
_SS_SCHEMA_URL: Final = _tag(3, _LEN)
# Span.
_SPAN_TRACE_ID: Final = _tag(1, _LEN) + b"\x10"  # always 16 bytes
_SPAN_SPAN_ID: Final = _tag(2, _LEN) + b"\x08"  # always 8 bytes
_SPAN_TRACE_STATE: Final = _tag(3, _LEN)
_SPAN_PARENT_ID: Final = _tag(4, _LEN) + b"\x08"
_SPAN_NAME: Final = _tag(5, _LEN)
_SPAN_START: Final = _tag(7, _I64)
_SPAN_END: Final = _tag(8, _I64)
_SPAN_ATTRIBUTES: Final = _tag(9, _LEN)
_SPAN_DROPPED_ATTRIBUTES: Final = _tag(10, _VARINT)
_SPAN_EVENTS: Final = _tag(11, _LEN)
_SPAN_DROPPED_EVENTS: Final = _tag(12, _VARINT)
_SPAN_LINKS: Final = _tag(13, _LEN)
_SPAN_DROPPED_LINKS: Final = _tag(14, _VARINT)
_SPAN_STATUS: Final = _tag(15, _LEN)
_SPAN_FLAGS_LOCAL: Final = _tag(16, _I32) + _pack_fixed32(_FLAGS_HAS_IS_REMOTE)
_SPAN_FLAGS_REMOTE: Final = _tag(16, _I32) + _pack_fixed32(_FLAGS_HAS_IS_REMOTE | _FLAGS_IS_REMOTE)
#: The OTLP SpanKind is the SDK's value + 1 (0 is SPAN_KIND_UNSPECIFIED).
_SPAN_KIND: Final = {kind: _tag(6, _VARINT) + _varint(kind.value + 1) for kind in SpanKind}
# Span.Event.
_EVENT_TIME: Final = _tag(1, _I64)
_EVENT_NAME: Final = _tag(2, _LEN)
_EVENT_ATTRIBUTES: Final = _tag(3, _LEN)
_EVENT_DROPPED_ATTRIBUTES: Final = _tag(4, _VARINT)
# Span.Link.
_LINK_TRACE_ID: Final = _tag(1, _LEN) + b"\x10"
_LINK_SPAN_ID: Final = _tag(2, _LEN) + b"\x08"
_LINK_ATTRIBUTES: Final = _tag(4, _LEN)
_LINK_DROPPED_ATTRIBUTES: Final = _tag(5, _VARINT)
_LINK_FLAGS_LOCAL: Final = _tag(6, _I32) + _pack_fixed32(_FLAGS_HAS_IS_REMOTE)
_LINK_FLAGS_REMOTE: Final = _tag(6, _I32) + _pack_fixed32(_FLAGS_HAS_IS_REMOTE | _FLAGS_IS_REMOTE)
# Status.
_STATUS_MESSAGE: Final = _tag(2, _LEN)
_STATUS_CODE: Final = _tag(3, _VARINT)

# Types whose (key, value) pairs are memoised. Floats are left out on purpose: 0.0 and -0.0
# are equal dict keys but encode differently. The type is part of the cache key because
# True == 1 and (True,) == (1,) would otherwise share an entry.
_CACHEABLE: Final = frozenset({str, int, bool})


def _delimited(payload: bytes) -> bytes:
    """``payload`` prefixed with its length: the body of a length-delimited field."""
    return _varint(len(payload)) + payload


def _encode_value(value: object) -> bytes:
    """The AnyValue message body for one attribute value, in the SDK's order of type checks.

    Raises:
        ValueError: an int outside int64.
        TypeError: a type OTLP cannot carry.
    """
    if value is None:
        return b""
    if isinstance(value, bool):
        return _ANY_BOOL_TRUE if value else _ANY_BOOL_FALSE
    if isinstance(value, str):
        return _ANY_STRING + _delimited(value.encode("utf-8"))
    if isinstance(value, int):
        if not _INT64_MIN <= value <= _INT64_MAX:
            raise ValueError(f"int {value} is outside int64")
        return _ANY_INT + _varint(value)
    if isinstance(value, float):
        return _ANY_DOUBLE + _pack_double(value)
    if isinstance(value, bytes):
        return _ANY_BYTES + _delimited(value)
    if isinstance(value, Sequence):
        items = b"".join([_VALUES + _delimited(_encode_value(item)) for item in value])
        return _ANY_ARRAY + _delimited(items)
    if isinstance(value, Mapping):
        pairs = b"".join([_VALUES + _delimited(_encode_key_value(str(k), v)) for k, v in value.items()])
        return _ANY_KVLIST + _delimited(pairs)
    raise TypeError(f"invalid type {type(value).__name__} of attribute value")


def _encode_key_value(key: str, value: object) -> bytes:
    """The KeyValue message body."""
    if not isinstance(key, str):
        raise TypeError(f"attribute key {key!r} is not a string")
    return _KV_KEY + _delimited(key.encode("utf-8")) + _KV_VALUE + _delimited(_encode_value(value))


class EncodedSpan(NamedTuple):
    """One span's encoded bytes with the resource and scope it is grouped under."""

    resource: Resource
    scope: InstrumentationScope | None
    #: the ``ScopeSpans.spans`` field: tag, length and the Span message
    field: bytes


class OtlpSpanEncoder:
    """Encodes span batches to ``ExportTraceServiceRequest`` bytes, memoising what repeats.

    One instance per exporter. Its caches are plain dicts without locks: a racing thread can
    at worst encode a pair twice or clear the cache early, never read a wrong entry, since
    every entry is written whole under the GIL.
    """

    def __init__(self) -> None:
        self._pairs: dict[tuple[type, str, object], bytes] = {}
        self._resources: dict[int, tuple[Resource, bytes]] = {}
        self._scopes: dict[int, tuple[InstrumentationScope, bytes]] = {}

    def encode_request(self, spans: Sequence[ReadableSpan]) -> bytes:
        """Serialize ``spans`` as one OTLP ``ExportTraceServiceRequest``.

        Spans are grouped by resource and then by instrumentation scope in order of first
        appearance, as the SDK's encoder does (equal resources or scopes share a group).

        Args:
            spans: finished SDK spans.

        Returns:
            The protobuf wire-format bytes, ready for OTLP/HTTP or to parse for OTLP/gRPC.
        """
        return self.assemble([self.encode_span(span) for span in spans])

    def encode_span(self, span: ReadableSpan) -> EncodedSpan:
        """Encode one finished span now, to be put in a request later by :meth:`assemble`.

        This is the per-span share of the work (about 10 µs for a proxy span), so an exporter
        can pay it as each span ends instead of in one burst per batch.

        Args:
            span: a finished SDK span.

        Returns:
            The span's resource, scope and ``ScopeSpans.spans`` field bytes.
        """
        return EncodedSpan(
            span.resource, span.instrumentation_scope or None, _SS_SPANS + _delimited(self._span(span))
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
                    scope_spans.append(_SS_SCHEMA_URL + _delimited(scope.schema_url.encode("utf-8")))
                body.append(_RS_SCOPE_SPANS + _delimited(b"".join(scope_spans)))
            if resource.schema_url:
                body.append(_RS_SCHEMA_URL + _delimited(resource.schema_url.encode("utf-8")))
            out.append(_REQUEST_RESOURCE_SPANS + _delimited(b"".join(body)))
        return b"".join(out)

    def _span(self, span: ReadableSpan) -> bytes:
        context = span.get_span_context()
        assert context is not None  # a ReadableSpan from the SDK always has one
        parent = span.parent
        parts = [
            _SPAN_TRACE_ID,
            context.trace_id.to_bytes(16, "big"),
            _SPAN_SPAN_ID,
            context.span_id.to_bytes(8, "big"),
        ]
        trace_state = context.trace_state
        if trace_state:
            state = ",".join([f"{key}={value}" for key, value in trace_state.items()])
            parts += (_SPAN_TRACE_STATE, _delimited(state.encode("utf-8")))
        if parent is not None:
            parts += (_SPAN_PARENT_ID, parent.span_id.to_bytes(8, "big"))
        if span.name:
            parts += (_SPAN_NAME, _delimited(span.name.encode("utf-8")))
        parts.append(_SPAN_KIND[span.kind])
        if span.start_time:
            parts += (_SPAN_START, _pack_fixed64(span.start_time))
        if span.end_time:
            parts += (_SPAN_END, _pack_fixed64(span.end_time))
        attributes = span.attributes
        if attributes:
            self._attributes(parts, _SPAN_ATTRIBUTES, attributes)
        if span.dropped_attributes:
            parts += (_SPAN_DROPPED_ATTRIBUTES, _varint(span.dropped_attributes))
        for event in span.events:
            parts += (_SPAN_EVENTS, _delimited(self._event(event)))
        if span.dropped_events:
            parts += (_SPAN_DROPPED_EVENTS, _varint(span.dropped_events))
        for link in span.links:
            parts += (_SPAN_LINKS, _delimited(self._link(link)))
        if span.dropped_links:
            parts += (_SPAN_DROPPED_LINKS, _varint(span.dropped_links))
        status = span.status
        if status is not None:
            status_body = b""
            if status.description:
                status_body = _STATUS_MESSAGE + _delimited(status.description.encode("utf-8"))
            if status.status_code.value:
                status_body += _STATUS_CODE + _varint(status.status_code.value)
            parts += (_SPAN_STATUS, _delimited(status_body))
        parts.append(_flags(parent, _SPAN_FLAGS_LOCAL, _SPAN_FLAGS_REMOTE))
        return b"".join(parts)

    def _event(self, event: Event) -> bytes:
        parts = [_EVENT_TIME, _pack_fixed64(event.timestamp)] if event.timestamp else []
        if event.name:
            parts += (_EVENT_NAME, _delimited(event.name.encode("utf-8")))
        if event.attributes:
            self._attributes(parts, _EVENT_ATTRIBUTES, event.attributes)
        if event.dropped_attributes:
            parts += (_EVENT_DROPPED_ATTRIBUTES, _varint(event.dropped_attributes))
        return b"".join(parts)

    def _link(self, link: Link) -> bytes:
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
            parts += (_LINK_DROPPED_ATTRIBUTES, _varint(link.dropped_attributes))
        parts.append(_flags(context, _LINK_FLAGS_LOCAL, _LINK_FLAGS_REMOTE))
        return b"".join(parts)

    def _attributes(self, parts: list[bytes], tag: bytes, attributes: Attributes) -> None:
        """Append one ``tag``-ged KeyValue per attribute; a bad one is logged and skipped, as in the SDK."""
        assert attributes is not None
        pairs = self._pairs
        for key, value in attributes.items():
            cache_key = (type(value), key, value) if type(value) in _CACHEABLE else None
            if cache_key is not None:
                cached = pairs.get(cache_key)
                if cached is not None:
                    parts += (tag, cached)
                    continue
            try:
                encoded = _delimited(_encode_key_value(key, value))
            except (TypeError, ValueError) as error:  # UnicodeEncodeError is a ValueError
                log.warning("skipped attribute %r that OTLP cannot encode: %s", key, error)
                continue
            if cache_key is not None:
                if len(pairs) >= ATTRIBUTE_CACHE_SIZE:
                    pairs.clear()
                pairs[cache_key] = encoded
            parts += (tag, encoded)

    def _resource(self, resource: Resource) -> bytes:
        """The ``resource`` field of ResourceSpans, cached per resource object."""
        cached = self._resources.get(id(resource))
        if cached is not None and cached[0] is resource:
            return cached[1]
        parts: list[bytes] = []
        self._attributes(parts, _RESOURCE_ATTRIBUTES, resource.attributes)
        encoded = _RS_RESOURCE + _delimited(b"".join(parts))
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
            parts += (_SCOPE_NAME, _delimited(scope.name.encode("utf-8")))
        if scope.version:
            parts += (_SCOPE_VERSION, _delimited(scope.version.encode("utf-8")))
        if scope.attributes:
            self._attributes(parts, _SCOPE_ATTRIBUTES, scope.attributes)
        encoded = _SS_SCOPE + _delimited(b"".join(parts))
        if len(self._scopes) >= OBJECT_CACHE_SIZE:
            self._scopes.clear()
        self._scopes[id(scope)] = (scope, encoded)
        return encoded


def _flags(context: SpanContext | None, local: bytes, remote: bytes) -> bytes:
    """The encoded ``flags`` field as the SDK's ``_span_flags`` computes it."""
    return remote if context is not None and context.is_remote else local


def encode_request(spans: Sequence[ReadableSpan]) -> bytes:
    """Serialize ``spans`` as one OTLP ``ExportTraceServiceRequest`` with a fresh encoder.

    Use an ``OtlpSpanEncoder`` kept per exporter to reuse its caches across batches.

    Args:
        spans: finished SDK spans.

    Returns:
        The protobuf wire-format bytes.
    """
    return OtlpSpanEncoder().encode_request(spans)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    """The varint at ``pos`` and the position after it.

    Raises:
        ValueError: the data ends inside the varint or it is longer than 10 bytes.
    """
    value = shift = 0
    while pos < len(data) and shift < 70:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    raise ValueError("truncated or overlong varint")


def _fields(data: bytes) -> dict[int, int | bytes]:
    """The last value of each field of a protobuf message: varints as int, LEN fields as bytes.

    Raises:
        ValueError: the message is malformed or uses a wire type the responses never carry.
    """
    found: dict[int, int | bytes] = {}
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        field, wire = key >> 3, key & 7
        if wire == _VARINT:
            found[field], pos = _read_varint(data, pos)
        elif wire == _LEN:
            size, pos = _read_varint(data, pos)
            if pos + size > len(data):
                raise ValueError("truncated field")
            found[field], pos = data[pos : pos + size], pos + size
        elif wire in (_I64, _I32):
            pos += 8 if wire == _I64 else 4
        else:
            raise ValueError(f"unexpected wire type {wire}")
    return found


def rejected_spans(response: bytes) -> tuple[int, str]:
    """How many spans a collector says it rejected, from its ``ExportTraceServiceResponse``.

    OTLP answers success even when it dropped part of a batch; the count is in
    ``partial_success.rejected_spans``. An empty or unreadable answer counts as none
    rejected: the collector accepted the request, and its body is only advisory.

    Args:
        response: the response message bytes (OTLP/HTTP body or OTLP/gRPC reply).

    Returns:
        ``(rejected_spans, error_message)``; ``(0, "")`` when nothing was rejected.
    """
    try:
        partial = _fields(response).get(1)
        if not isinstance(partial, bytes):
            return 0, ""
        fields = _fields(partial)
    except ValueError:
        return 0, ""
    count = fields.get(1, 0)
    message = fields.get(2, b"")
    return (
        count if isinstance(count, int) and count <= _INT64_MAX else 0,
        message.decode("utf-8", "replace") if isinstance(message, bytes) else "",
    )
