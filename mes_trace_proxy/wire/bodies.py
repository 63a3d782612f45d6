"""Request bodies as they go upstream: async generators over the caller's stream."""

# mypyc: async generators, so an interpreted module (native.py, constraint 1).

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp

from mes_trace_proxy.wire.client import RequestBody

__all__ = ["BodyTooLarge", "capped", "prefixed"]


class BodyTooLarge(Exception):
    """A streamed request body passed the listener's ``max_body_size``."""


async def prefixed(prefix: bytes, rest: aiohttp.StreamReader, chunk_size: int) -> AsyncIterator[bytes]:
    """The bytes already read for inspection, then the rest of the stream, unchanged."""
    yield prefix
    while True:
        chunk = await rest.read(chunk_size)
        if not chunk:
            return
        yield chunk


async def capped(source: RequestBody, limit: int, chunk_size: int) -> AsyncIterator[bytes]:
    """The body, unchanged, raising :class:`BodyTooLarge` once more than ``limit`` bytes passed."""
    chunks: AsyncIterator[bytes]
    if isinstance(source, aiohttp.StreamReader):
        chunks = source.iter_chunked(chunk_size)
    elif isinstance(source, bytes):
        chunks = _once(source)
    else:
        assert isinstance(source, AsyncIterator)
        chunks = source
    total = 0
    async for chunk in chunks:
        total += len(chunk)
        if total > limit:
            raise BodyTooLarge
        yield chunk


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data
