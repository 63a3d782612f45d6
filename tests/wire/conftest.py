"""Fixtures of the wire tests: the scripted raw upstream of the lean client's tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.wire.scripted_upstream import Scripted


@pytest.fixture
async def scripted() -> AsyncIterator[Scripted]:
    """A started scripted server (answers appended by the test)."""
    server = Scripted(answers=[])
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
