"""Request bodies on their way upstream: ``prefixed`` and ``capped`` pass bytes through unchanged."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp.base_protocol import BaseProtocol

from mes_trace_proxy.wire.bodies import BodyTooLarge, capped, prefixed


async def _collect(chunks: AsyncIterator[bytes]) -> list[bytes]:
    return [chunk async for chunk in chunks]


async def _pieces(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


def _stream(data: bytes) -> aiohttp.StreamReader:
    loop = asyncio.get_running_loop()
    reader = aiohttp.StreamReader(BaseProtocol(loop), 2**16, loop=loop)
    reader.feed_data(data)
    reader.feed_eof()
    return reader


async def test_prefixed_gives_the_inspected_bytes_then_the_rest() -> None:
    chunks = await _collect(prefixed(b'{"status":', _stream(b'"SUBMITTED"}' * 3), 5))
    assert chunks[0] == b'{"status":'
    assert all(len(chunk) <= 5 for chunk in chunks[1:])
    assert b"".join(chunks) == b'{"status":' + b'"SUBMITTED"}' * 3


@pytest.mark.parametrize(
    ("make", "limit", "expected"),
    [
        (lambda: b"abcdef", 6, [b"abcdef"]),
        (lambda: b"", 0, [b""]),
        (lambda: _pieces(b"ab", b"cd", b"ef"), 6, [b"ab", b"cd", b"ef"]),
    ],
    ids=["bytes at the limit", "empty bytes", "an iterator at the limit"],
)
async def test_capped_passes_a_body_within_the_limit_unchanged(
    make: object, limit: int, expected: list[bytes]
) -> None:
    assert callable(make)
    assert await _collect(capped(make(), limit, 4)) == expected


async def test_capped_reads_a_stream_in_chunks_of_the_given_size() -> None:
    assert await _collect(capped(_stream(b"x" * 10), 10, 4)) == [b"xxxx", b"xxxx", b"xx"]


@pytest.mark.parametrize("limit", [0, 3, 5])
async def test_capped_raises_once_the_limit_is_passed_and_not_before(limit: int) -> None:
    passed: list[bytes] = []

    async def drain() -> None:
        async for chunk in capped(_pieces(b"ab", b"cd", b"ef"), limit, 4):
            passed.append(chunk)

    with pytest.raises(BodyTooLarge):
        await drain()
    # Every chunk that still fitted went on; the one that crossed the limit did not.
    assert sum(map(len, passed)) <= limit
    assert len(b"".join(passed)) + 2 > limit
