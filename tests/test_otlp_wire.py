"""Tests for otlp_wire: the protobuf primitives give protobuf's own bytes; answers are read safely."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTracePartialSuccess,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue

from mes_trace_proxy.otlp_wire import (
    INT64_MAX,
    encode_key_value,
    encode_value,
    message_fields,
    read_varint,
    rejected_spans,
    varint,
)


@given(st.integers(min_value=0, max_value=(1 << 64) - 1))
def test_varint_round_trips(value: int) -> None:
    """read_varint(varint(n)) is n, and uses every byte."""
    encoded = varint(value)
    assert read_varint(encoded, 0) == (value, len(encoded))


@given(st.integers(min_value=-(1 << 63), max_value=INT64_MAX))
def test_int_values_are_protobufs_int64(value: int) -> None:
    """A negative int64 is its two's complement in ten bytes, as protobuf writes it."""
    assert encode_value(value) == AnyValue(int_value=value).SerializeToString()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param("text", AnyValue(string_value="text"), id="str"),
        pytest.param("", AnyValue(string_value=""), id="empty-str"),
        pytest.param(True, AnyValue(bool_value=True), id="true"),
        pytest.param(False, AnyValue(bool_value=False), id="false"),
        pytest.param(2.5, AnyValue(double_value=2.5), id="float"),
        pytest.param(b"\x00\x01", AnyValue(bytes_value=b"\x00\x01"), id="bytes"),
        pytest.param(
            ("a", 1),
            AnyValue(array_value=ArrayValue(values=[AnyValue(string_value="a"), AnyValue(int_value=1)])),
            id="tuple",
        ),
    ],
)
def test_any_value_is_protobufs(value: object, expected: Any) -> None:
    """Each attribute value type encodes to the AnyValue bytes protobuf gives (a oneof: defaults written)."""
    assert encode_value(value) == expected.SerializeToString()


def test_key_value_is_protobufs() -> None:
    """A KeyValue body equals protobuf's message bytes."""
    expected = KeyValue(key="http.route", value=AnyValue(string_value="/x")).SerializeToString()
    assert encode_key_value("http.route", "/x") == expected


@pytest.mark.parametrize(
    ("value", "error"),
    [(1 << 63, ValueError), (object(), TypeError)],
    ids=["beyond-int64", "unknown-type"],
)
def test_values_otlp_cannot_carry_are_refused(value: object, error: type[Exception]) -> None:
    """An int outside int64 or a type OTLP has no AnyValue for raises (the encoder skips the pair)."""
    with pytest.raises(error):
        encode_value(value)


@pytest.mark.parametrize(
    "data", [b"\x80", b"\x0a\x05ab", b"\x0b"], ids=["truncated-varint", "short-field", "group"]
)
def test_malformed_messages_raise_value_error(data: bytes) -> None:
    """message_fields refuses what it cannot read with ValueError only."""
    with pytest.raises(ValueError, match=r"varint|truncated|wire type"):
        message_fields(data)


def _response(rejected: int, message: str) -> bytes:
    partial = ExportTracePartialSuccess(rejected_spans=rejected, error_message=message)
    encoded: bytes = ExportTraceServiceResponse(partial_success=partial).SerializeToString()
    return encoded


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        pytest.param(b"", (0, ""), id="empty-full-success"),
        pytest.param(_response(0, ""), (0, ""), id="explicit-none"),
        pytest.param(_response(7, "spans too old"), (7, "spans too old"), id="partial"),
        pytest.param(_response(0, "warning only"), (0, "warning only"), id="message-only"),
        pytest.param(b"\x0a\x05\x08", (0, ""), id="truncated"),
        pytest.param(b"\xff\xff\xff", (0, ""), id="garbage"),
        pytest.param(b"<html>ok</html>", (0, ""), id="not-protobuf"),
    ],
)
def test_rejected_spans_reads_partial_success(answer: bytes, expected: tuple[int, str]) -> None:
    """The rejected count and message come from partial_success; unreadable answers reject nothing."""
    assert rejected_spans(answer) == expected
