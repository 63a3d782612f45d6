"""Tests for span_limits: each attribute rule gives what the SDK's BoundedAttributes gives."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any

import pytest
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.sdk.trace import SpanLimits
from opentelemetry.trace import INVALID_SPAN_CONTEXT, SpanContext, TraceFlags, TraceState

from mes_trace_proxy.span_limits import (
    NO_ATTRIBUTES,
    NO_LIMIT,
    Limits,
    as_bounded_attributes,
    bounded,
    clean_key,
    fill,
    is_valid_link,
    sdk_length,
    update,
)


class Colour(enum.Enum):
    """An Enum value: the SDK stores its str()."""

    RED = 1


#: (id, source mapping, count limit, value length limit)
FILL_CASES: tuple[tuple[str, Mapping[Any, Any], int, int], ...] = (
    ("plain-within-limits", {"a": "x", "b": 1, "c": 2.5, "d": True}, 8, NO_LIMIT),
    ("over-the-count-evicts-oldest", {f"k{i}": i for i in range(6)}, 4, NO_LIMIT),
    ("long-strings-cut", {"s": "q" * 30, "t": ("w" * 30, "e")}, 8, 10),
    ("lists-made-tuples", {"l": [1, 2, 3], "m": ["a", "b"]}, 8, NO_LIMIT),
    ("invalid-keys-dropped", {"": 1, 5: "five", "ok": 1}, 8, NO_LIMIT),
    ("enum-and-none", {"e": Colour.RED, "n": None, "ok": "v"}, 8, NO_LIMIT),
    ("zero-limit", {"a": 1}, 0, NO_LIMIT),
)


@pytest.mark.parametrize(
    ("source", "limit", "length"), [c[1:] for c in FILL_CASES], ids=[c[0] for c in FILL_CASES]
)
def test_fill_keeps_what_bounded_attributes_keeps(source: Mapping[Any, Any], limit: int, length: int) -> None:
    """fill() stores the same pairs, in the same order, and counts the same drops as the SDK."""
    sdk = BoundedAttributes(limit, source, immutable=False, max_value_len=sdk_length(length))
    target: dict[str, Any] = {}
    dropped = fill(target, source, limit, length)
    assert list(target.items()) == list(sdk.items())
    assert dropped == sdk.dropped


def test_update_moves_a_key_set_again_to_the_end_and_evicts_the_oldest() -> None:
    """update() is BoundedAttributes' item assignment on a span that has attributes already."""
    sdk = BoundedAttributes(3, {"a": 1, "b": 2, "c": 3}, immutable=False)
    target: dict[str, Any] = {"a": 1, "b": 2, "c": 3}
    source = {"a": 10, "d": 4}
    for key, value in source.items():
        sdk[key] = value
    assert update(target, source, 3, NO_LIMIT) == sdk.dropped
    assert list(target.items()) == list(sdk.items())


def test_update_with_no_room_drops_everything() -> None:
    """A zero count limit keeps nothing and counts every pair."""
    target: dict[str, Any] = {}
    assert update(target, {"a": 1, "b": 2}, 0, NO_LIMIT) == 2
    assert target == {}


@pytest.mark.parametrize(
    ("key", "expected"),
    [("name", "name"), ("", None), (None, None), (5, "5"), (object(), None)],
    ids=["str", "empty", "none", "int-has-str", "no-str-of-its-own"],
)
def test_clean_key(key: object, expected: str | None) -> None:
    """Keys as the SDK keeps them: str as is, str() only for types with their own __str__/__repr__."""
    assert clean_key(key) == expected


def test_bounded_shares_one_empty_mapping() -> None:
    """An event or link given no attributes shares the read-only empty mapping."""
    assert bounded(None, 4, NO_LIMIT) == (NO_ATTRIBUTES, 0)
    assert bounded({"a": 1, "b": 2}, 1, NO_LIMIT) == ({"b": 2}, 1)


def test_as_bounded_attributes_is_the_sdks_ended_type() -> None:
    """The ReadableSpan's attributes: an immutable BoundedAttributes with limits and drop count."""
    got = as_bounded_attributes({"a": "x"}, 3, 16, 64)
    assert isinstance(got, BoundedAttributes)
    assert (dict(got), got.dropped, got.maxlen, got.max_value_len) == ({"a": "x"}, 3, 16, 64)
    with pytest.raises(TypeError):
        got["b"] = "y"


@pytest.mark.parametrize(
    ("context", "attributes", "valid"),
    [
        (SpanContext(1, 2, False), None, True),
        (INVALID_SPAN_CONTEXT, None, False),
        (INVALID_SPAN_CONTEXT, {"a": 1}, True),
        (SpanContext(0, 0, False, TraceFlags(0), TraceState([("rojo", "1")])), None, True),
    ],
    ids=["valid-context", "invalid-bare", "invalid-with-attributes", "invalid-with-tracestate"],
)
def test_is_valid_link(context: SpanContext, attributes: dict[str, int] | None, valid: bool) -> None:
    """The SDK's rule: a link is kept for a valid context, or for attributes or a tracestate."""
    assert is_valid_link(context, attributes) is valid


def test_limits_as_integers() -> None:
    """None (no limit) becomes NO_LIMIT; the SDK's own object is kept for ReadableSpan."""
    source = SpanLimits(max_span_attributes=7, max_attribute_length=None, max_links=3)
    limits = Limits.of(source)
    assert (limits.span_attributes, limits.links, limits.value_length) == (7, 3, NO_LIMIT)
    assert limits.source is source
    assert sdk_length(NO_LIMIT) is None
    assert sdk_length(12) == 12
