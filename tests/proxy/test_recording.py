"""Recording: every answer, the proxy's own included, counted in one metric series per error and logged."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import aiohttp
import pytest
from prometheus_client import generate_latest

from mes_trace_proxy.server import RunningProxy
from tests.conftest import MakeConfig, StartProxy
from tests.upstream import RecordingUpstream

LIMIT = 1024


async def _chunks(total: int) -> AsyncIterator[bytes]:
    for _ in range(total // 512):
        yield b"x" * 512


async def _raw_exchange(url: str, request: bytes) -> bytes:
    """Send raw request bytes (a target a client library would not send) and read the whole answer."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


def _errors(proxy: RunningProxy) -> dict[str, float]:
    """``mes_proxy_errors_total`` by error_type, as /metrics shows it."""
    found: dict[str, float] = {}
    for line in generate_latest(proxy.shared.metrics.registry).decode().splitlines():
        if line.startswith("mes_proxy_errors_total{"):
            labels, value = line.rsplit(" ", 1)
            error_type = labels.split('error_type="', 1)[1].split('"', 1)[0]
            found[error_type] = float(value)
    return found


def _access_lines(proxy: RunningProxy, capsys: pytest.CaptureFixture[str]) -> list[dict[str, object]]:
    assert proxy.shared.access_log is not None
    proxy.shared.access_log.flush()
    return [
        json.loads(line)
        for line in capsys.readouterr().out.splitlines()
        if '"mes_trace_proxy.access"' in line
    ]


async def test_payload_too_large_is_one_metric_series_whatever_the_framing(
    make_config: MakeConfig,
    start_proxy: StartProxy,
    recording_upstream: tuple[str, RecordingUpstream],
) -> None:
    """A 413 for a declared length and a 413 while a chunked body streams count as the same error_type.

    Regression: the declared-length refusal was labelled with the problem's URN, the streamed
    one with its slug, which made two series for one error.
    """
    base, _ = recording_upstream
    proxy = await start_proxy(make_config(base, max_body_size=LIMIT))
    async with aiohttp.ClientSession() as client:
        url = f"{proxy.url('ingress')}/t/upload"
        async with client.put(url, data=b"x" * (LIMIT + 1)) as resp:
            assert resp.status == 413
        async with client.put(url, data=_chunks(4 * LIMIT)) as resp:
            assert resp.status == 413
    assert _errors(proxy) == {"payload_too_large": 2.0}


async def test_refusals_and_options_star_write_an_access_log_line(
    make_config: MakeConfig,
    start_proxy: StartProxy,
    recording_upstream: tuple[str, RecordingUpstream],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An answer the proxy gives itself is logged like any other: status, and the slug as error_type."""
    base, _ = recording_upstream
    proxy = await start_proxy(make_config(base, max_body_size=LIMIT, access_log=True))
    async with (
        aiohttp.ClientSession() as client,
        client.put(f"{proxy.url('ingress')}/t/upload", data=b"x" * (LIMIT + 1)) as resp,
    ):
        assert resp.status == 413
    for request_line, status in ((b"GET http://evil.example/ HTTP/1.1", 400), (b"OPTIONS * HTTP/1.1", 200)):
        answer = await _raw_exchange(
            proxy.url("ingress"), request_line + b"\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        assert answer.startswith(b"HTTP/1.1 %d " % status)
    lines = _access_lines(proxy, capsys)
    assert [(line["status"], line["error_type"]) for line in lines] == [
        (413, "payload_too_large"),
        (400, "bad_request_target"),
        (200, None),
    ]
    assert lines[0]["method"] == "PUT"
    assert lines[0]["route"] == ""
    assert _errors(proxy) == {"payload_too_large": 1.0, "bad_request_target": 1.0}
