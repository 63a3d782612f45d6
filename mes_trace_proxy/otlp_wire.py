"""The protobuf wire format, as much of it as OTLP needs: varints, tags, AnyValue, KeyValue.

Written directly (no protobuf objects) for the span encoder (``otlp_encode``), and read back
for the one answer the exporter looks into: ``ExportTraceServiceResponse``'s partial success.
Field numbers are those of opentelemetry-proto's ``common.proto`` and ``trace_service.proto``.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from typing import Final

__all__ = [
    "ANY_STRING",
    "I32",
    "I64",
    "INT64_MAX",
    "KV_KEY",
    "KV_VALUE",
    "LEN",
    "VALUES",
    "VARINT",
    "delimited",
    "encode_key_value",
    "encode_value",
    "message_fields",
    "pack_double",
    "pack_fixed32",
    "pack_fixed64",
    "pack_times",
    "read_varint",
    "rejected_spans",
    "tag",
    "varint",
]

INT64_MIN: Final = -(1 << 63)
INT64_MAX: Final = (1 << 63) - 1
UINT64_MASK: Final = (1 << 64) - 1
pack_double = struct.Struct("<d").pack
#: a span's start and end time fields in one call: tag, fixed64, tag, fixed64
pack_times = struct.Struct("<BQBQ").pack
pack_fixed64 = struct.Struct("<Q").pack
pack_fixed32 = struct.Struct("<I").pack
# One-byte varints are nearly every length and count; look them up instead of looping.
_SMALL_VARINTS: Final = tuple(bytes((i,)) for i in range(0x80))


def varint(value: int) -> bytes:
    """The base-128 varint of a non-negative int (negative int64 go through the 64-bit mask)."""
    if value < 0x80:
        if value >= 0:
            return _SMALL_VARINTS[value]
        value &= UINT64_MASK
    elif value < 0x4000:
        # Two bytes: the length of nearly every span body (128 bytes to 16 KiB).
        return bytes(((value & 0x7F) | 0x80, value >> 7))
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def tag(field: int, wire_type: int) -> bytes:
    return varint(field << 3 | wire_type)


VARINT, I64, LEN, I32 = 0, 1, 2, 5

# AnyValue (common.proto): a oneof, so every member is written even when it is the default.
ANY_STRING: Final = tag(1, LEN)
_ANY_BOOL_FALSE: Final = tag(2, VARINT) + b"\x00"
_ANY_BOOL_TRUE: Final = tag(2, VARINT) + b"\x01"
_ANY_INT: Final = tag(3, VARINT)
_ANY_DOUBLE: Final = tag(4, I64)
_ANY_ARRAY: Final = tag(5, LEN)
_ANY_KVLIST: Final = tag(6, LEN)
_ANY_BYTES: Final = tag(7, LEN)
# ArrayValue.values, KeyValueList.values, KeyValue.key / KeyValue.value.
VALUES: Final = tag(1, LEN)
KV_KEY: Final = tag(1, LEN)
KV_VALUE: Final = tag(2, LEN)


def delimited(payload: bytes) -> bytes:
    """``payload`` prefixed with its length: the body of a length-delimited field."""
    return varint(len(payload)) + payload


def encode_value(value: object) -> bytes:
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
        return ANY_STRING + delimited(value.encode("utf-8"))
    if isinstance(value, int):
        if not INT64_MIN <= value <= INT64_MAX:
            raise ValueError(f"int {value} is outside int64")
        return _ANY_INT + varint(value)
    if isinstance(value, float):
        return _ANY_DOUBLE + pack_double(value)
    if isinstance(value, bytes):
        return _ANY_BYTES + delimited(value)
    if isinstance(value, Sequence):
        items = b"".join([VALUES + delimited(encode_value(item)) for item in value])
        return _ANY_ARRAY + delimited(items)
    if isinstance(value, Mapping):
        pairs = b"".join([VALUES + delimited(encode_key_value(str(k), v)) for k, v in value.items()])
        return _ANY_KVLIST + delimited(pairs)
    raise TypeError(f"invalid type {type(value).__name__} of attribute value")


def encode_key_value(key: object, value: object) -> bytes:
    """The KeyValue message body."""
    if not isinstance(key, str):
        raise TypeError(f"attribute key {key!r} is not a string")
    return KV_KEY + delimited(key.encode("utf-8")) + KV_VALUE + delimited(encode_value(value))


def read_varint(data: bytes, pos: int) -> tuple[int, int]:
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


def message_fields(data: bytes) -> dict[int, int | bytes]:
    """The last value of each field of a protobuf message: varints as int, LEN fields as bytes.

    Raises:
        ValueError: the message is malformed or uses a wire type the responses never carry.
    """
    found: dict[int, int | bytes] = {}
    pos = 0
    while pos < len(data):
        key, pos = read_varint(data, pos)
        field, wire = key >> 3, key & 7
        if wire == VARINT:
            found[field], pos = read_varint(data, pos)
        elif wire == LEN:
            size, pos = read_varint(data, pos)
            if pos + size > len(data):
                raise ValueError("truncated field")
            found[field], pos = data[pos : pos + size], pos + size
        elif wire in (I64, I32):
            pos += 8 if wire == I64 else 4
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
        partial = message_fields(response).get(1)
        if not isinstance(partial, bytes):
            return 0, ""
        fields = message_fields(partial)
    except ValueError:
        return 0, ""
    count = fields.get(1, 0)
    message = fields.get(2, b"")
    return (
        count if isinstance(count, int) and count <= INT64_MAX else 0,
        message.decode("utf-8", "replace") if isinstance(message, bytes) else "",
    )
