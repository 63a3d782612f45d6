"""Fixtures of the fault suite: the purpose-built faulty upstream and a plain client."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest

from tests.faults.faulty_upstream import FaultyUpstream


@pytest.fixture
async def faulty_upstream() -> AsyncIterator[FaultyUpstream]:
    """A started faulty upstream on 127.0.0.1 (echo by default)."""
    async with FaultyUpstream() as upstream:
        yield upstream


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    """A client with its own pool, no decompression and a bound on every request."""
    async with aiohttp.ClientSession(
        auto_decompress=False,
        # Forty in flight at most: the suite's traffic is bounded, and so is its pool.
        connector=aiohttp.TCPConnector(limit=40),
        timeout=aiohttp.ClientTimeout(total=20),
    ) as session:
        yield session
