"""The SDK's attribute limits and value cleaning, as integers and exact-type checks for the hot path.

``BoundedAttributes`` and ``SpanLimits`` rules, copied (not called) so the proxy's spans pay
for them only when a value needs it: strings truncated to the value-length limit, sequences
made tuples, other types through the SDK's own ``_clean_attribute_value``, the count limits
evicting the oldest entry and counting it as the SDK does. ``tests/test_spans.py`` holds
every rule to the SDK's result.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final

from opentelemetry.attributes import BoundedAttributes, _clean_attribute_value
from opentelemetry.sdk.trace import SpanLimits
from opentelemetry.trace import SpanContext
from opentelemetry.util.types import Attributes, AttributeValue

__all__ = [
    "NO_ATTRIBUTES",
    "NO_LIMIT",
    "Limits",
    "as_bounded_attributes",
    "bounded",
    "clean_key",
    "clean_pair",
    "clean_value",
    "fill",
    "is_valid_link",
    "sdk_length",
    "update",
]

#: Stands for "no limit" in the integer comparisons of the hot path (the SDK's None).
NO_LIMIT: Final = sys.maxsize
#: Attribute value types the SDK stores unchanged (exact types: subclasses take the SDK's path).
_PLAIN: Final = frozenset({str, int, float, bool})
#: The attributes of an event or link given none; read-only, so it can be shared.
NO_ATTRIBUTES: Final[Mapping[str, AttributeValue]] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Limits:
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
    def of(cls, limits: SpanLimits) -> Limits:
        """The integer form of ``limits``."""

        def number(value: int | None) -> int:
            return NO_LIMIT if value is None else value

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


def sdk_length(length: int) -> int | None:
    """The SDK's form of a length limit: None for no limit."""
    return None if length == NO_LIMIT else length


def clean_key(key: object) -> str | None:
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


def clean_value(value: Any, length: int) -> AttributeValue:
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
    return _clean_attribute_value(value, sdk_length(length))  # type: ignore[no-any-return]


def _plain_tuple(value: tuple[object, ...]) -> bool:
    """Whether every item is a plain str, int, float or bool (the SDK keeps such a tuple as it is)."""
    for item in value:  # noqa: SIM110 - a loop is cheaper than all() over a generator
        if type(item) not in _PLAIN:
            return False
    return True


def clean_pair(key: object, value: Any, length: int) -> tuple[str, AttributeValue] | None:
    """One pair as ``BoundedAttributes`` keeps it, or ``None`` when the SDK drops its key."""
    if type(key) is not str or not key:
        key = clean_key(key)
        if key is None:
            return None
    kind = type(value)
    if kind is str:
        if len(value) > length:
            value = value[:length]
    elif kind is not int and kind is not bool and kind is not float:
        value = clean_value(value, length)
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


def fill(target: dict[str, AttributeValue], source: Mapping[Any, Any], limit: int, length: int) -> int:
    """Fill a new ``target`` from ``source`` as ``BoundedAttributes(limit, source)`` does; the count dropped.

    ``target`` may already hold ``http.route``: the source is then taken as merged after it,
    keeping that first position, as the SDK receives one merged mapping.
    """
    if length == NO_LIMIT and len(target) + len(source) <= limit and _stored_as_is(source):
        # The common case (no length limit, within the count): stored as the SDK would store it.
        target.update(source)
        return 0
    dropped = 0
    for raw_key, raw_value in source.items():
        cleaned = clean_pair(raw_key, raw_value, length)
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


def update(target: dict[str, AttributeValue], source: Mapping[Any, Any], limit: int, length: int) -> int:
    """``BoundedAttributes._set_items`` on a span that has attributes already; the count dropped."""
    if not limit:
        return len(source)
    if (
        length == NO_LIMIT
        and len(target) + len(source) <= limit
        and target.keys().isdisjoint(source)
        and _stored_as_is(source)
    ):
        # New keys, within the count, no length limit: stored as the SDK would store them.
        target.update(source)
        return 0
    dropped = 0
    for raw_key, raw_value in source.items():
        cleaned = clean_pair(raw_key, raw_value, length)
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


def bounded(source: Attributes, limit: int, length: int) -> tuple[Mapping[str, AttributeValue], int]:
    """An event's or link's attributes as the SDK bounds them, and the count dropped."""
    if not source:
        return NO_ATTRIBUTES, 0
    target: dict[str, AttributeValue] = {}
    return target, fill(target, source, limit, length)


def as_bounded_attributes(
    attributes: Mapping[str, AttributeValue], dropped: int, limit: int | None, length: int | None
) -> BoundedAttributes:
    """Cleaned attributes as the SDK's ended ``BoundedAttributes``, with their limits and drop count."""
    # Filled without a length limit: cleaning clean values again changes nothing, except that a
    # value the SDK turned into a string (an Enum, a Decimal) would be cut now, where it was not.
    bounded = BoundedAttributes(limit, attributes, immutable=True, max_value_len=None)
    bounded.max_value_len = length
    bounded.dropped = dropped
    return bounded


def is_valid_link(context: SpanContext, attributes: Attributes) -> bool:
    """The SDK's test for a link worth keeping (``opentelemetry.sdk.trace._is_valid_link``)."""
    return bool(context and (context.is_valid or (attributes or context.trace_state)))
