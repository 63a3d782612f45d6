"""Listener limits on real sockets: 414/431/400 answers, 413 bodies, 408 slow heads, idle, connection cap."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong

from mes_trace_proxy.cli import read_default_rules
from mes_trace_proxy.config import ConfigError, load_config
from mes_trace_proxy.http1 import Http1Server
from mes_trace_proxy.limits import classify_parse_error, raw_problem
from mes_trace_proxy.problems import ClientRejection
from mes_trace_proxy.server import RunningProxy
from tests.conftest import MakeConfig, StartProxy
from tests.upstream import RecordingUpstream

# Every wait below is bounded; on this machine each condition is met in milliseconds.
WAIT = 10.0
LINE, FIELD = 8192, 16384


@pytest.mark.parametrize(
    ("exc", "line", "field", "expected"),
    [
        (LineTooLong(b"/x...", LINE), LINE, FIELD, ClientRejection.URI_TOO_LONG),
        (LineTooLong(b"Cookie...", FIELD), LINE, FIELD, ClientRejection.HEADERS_TOO_LARGE),
        (LineTooLong(b"/x...", 4096), 4096, 4096, ClientRejection.HEADERS_TOO_LARGE),
        (LineTooLong(b"odd"), LINE, FIELD, ClientRejection.HEADERS_TOO_LARGE),
        (BadHttpMessage("Too many headers received"), LINE, FIELD, ClientRejection.HEADERS_TOO_LARGE),
        (BadHttpMessage("Bad line ending, expected CRLF"), LINE, FIELD, ClientRejection.BAD_REQUEST),
        (None, LINE, FIELD, ClientRejection.BAD_REQUEST),
    ],
    ids=["target", "header-field", "equal-limits", "no-limit-given", "header-count", "other", "none"],
)
def test_parse_errors_map_to_their_limit(
    exc: BaseException | None, line: int, field: int, expected: ClientRejection
) -> None:
    """aiohttp's parser errors are told apart by the limit they carry; equal limits answer 431."""
    assert classify_parse_error(exc, max_line_size=line, max_field_size=field) is expected


def test_raw_problem_is_a_complete_closing_answer() -> None:
    """The bytes written to a bare transport are a whole HTTP/1.1 answer with a problem+json body."""
    raw = raw_problem(ClientRejection.SERVICE_UNAVAILABLE, extra="Retry-After: 1\r\n")
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "HTTP/1.1 503 Service Unavailable"
    assert "Connection: close" in lines
    assert "Retry-After: 1" in lines
    assert f"Content-Length: {len(body)}" in lines
    assert json.loads(body)["status"] == 503


def _address(proxy: RunningProxy) -> tuple[str, int]:
    host, port = proxy.listeners["ingress"]
    return host, port


async def _exchange(address: tuple[str, int], data: bytes) -> bytes:
    """Send raw bytes, then read until the proxy closes the connection."""
    reader, writer = await asyncio.open_connection(*address)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), WAIT)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _refused(proxy: RunningProxy, reason: str) -> float:
    """The listener's refusal counter for ``reason``, read from the real /metrics page."""
    host, port = proxy.admin
    async with aiohttp.ClientSession() as session, session.get(f"http://{host}:{port}/metrics") as response:
        text = await response.text()
    wanted = f'mes_proxy_connections_refused_total{{listener="ingress",reason="{reason}"}} '
    for line in text.splitlines():
        if line.startswith(wanted):
            return float(line[len(wanted) :])
    raise AssertionError(f"no {wanted!r} in /metrics")


def _status_and_problem(answer: bytes) -> tuple[int, dict[str, object]]:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"application/problem+json" in head
    return int(head.split(b" ", 2)[1]), json.loads(body)


StartLimited = Callable[..., Awaitable[RunningProxy]]


@pytest.fixture
def limited(
    make_config: MakeConfig, start_proxy: StartProxy, recording_upstream: tuple[str, RecordingUpstream]
) -> StartLimited:
    """A factory: a proxy in front of the recording upstream with the given ``limits``."""
    base, _ = recording_upstream

    async def start(**limits: object) -> RunningProxy:
        return await start_proxy(make_config(base, doc={"listeners": [{"limits": limits}]}))

    return start


@pytest.mark.parametrize(
    ("request_bytes", "status", "slug"),
    [
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "uri_too_long"),
        (b"GET / HTTP/1.1\r\nHost: x\r\nCookie: " + b"c" * 17000 + b"\r\n\r\n", 431, "headers_too_large"),
        (
            b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(200)) + b"\r\n",
            431,
            "headers_too_large",
        ),
        (b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n", 400, "bad_request"),
    ],
    ids=["long-target", "long-header", "many-headers", "malformed"],
)
async def test_oversized_or_malformed_heads_get_problem_answers(
    request_bytes: bytes,
    status: int,
    slug: str,
    limited: StartLimited,
    recording_upstream: tuple[str, RecordingUpstream],
) -> None:
    """Heads past the default limits get 414/431, bad ones 400, as problem+json; nothing goes upstream."""
    _, upstream = recording_upstream
    proxy = await limited()
    answer = await _exchange(_address(proxy), request_bytes)
    got, problem = _status_and_problem(answer)
    assert (got, problem["status"]) == (status, status)
    assert str(problem["type"]).endswith(slug)
    # The parser's message quotes the offending bytes; the answer does not echo them.
    assert b"aaaa" not in answer
    assert b"cccc" not in answer
    assert upstream.received == []
    assert await _refused(proxy, "malformed_head") == 1
    assert await _refused(proxy, "header_timeout") == 0


async def test_declared_body_over_the_limit_is_refused_before_upstream(
    limited: StartLimited, recording_upstream: tuple[str, RecordingUpstream]
) -> None:
    """A Content-Length over max_body_size gets 413 problem+json and the upstream hears nothing."""
    _, upstream = recording_upstream
    proxy = await limited(max_body_size="1KiB")
    answer = await _exchange(
        _address(proxy),
        b"POST /t/upload HTTP/1.1\r\nHost: x\r\nContent-Length: 1025\r\nConnection: close\r\n\r\n"
        + b"x" * 1025,
    )
    status, problem = _status_and_problem(answer)
    assert status == 413
    assert str(problem["type"]).endswith("payload_too_large")
    assert upstream.received == []


async def test_body_at_the_limit_passes(
    limited: StartLimited, recording_upstream: tuple[str, RecordingUpstream]
) -> None:
    """A body of exactly max_body_size bytes, declared or chunked, reaches the upstream whole."""
    _, upstream = recording_upstream
    proxy = await limited(max_body_size="1KiB")
    host, port = _address(proxy)

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(4):
            yield b"y" * 256

    async with aiohttp.ClientSession() as client:
        async with client.post(f"http://{host}:{port}/t/upload", data=b"x" * 1024) as resp:
            assert resp.status == 200
        assert upstream.upload[0] == 1024
        async with client.post(f"http://{host}:{port}/t/upload", data=chunks()) as resp:
            assert resp.status == 200
        assert upstream.upload[0] == 1024


async def test_chunked_body_crossing_the_limit_aborts_the_upstream_request(
    limited: StartLimited, recording_upstream: tuple[str, RecordingUpstream]
) -> None:
    """A chunked body that grows past the limit gets 413, and the upstream never receives a whole body."""
    _, upstream = recording_upstream
    proxy = await limited(max_body_size="1KiB")
    host, port = _address(proxy)

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(8):
            yield b"z" * 512

    async with (
        aiohttp.ClientSession() as client,
        client.post(f"http://{host}:{port}/t/upload", data=chunks()) as resp,
    ):
        problem = await resp.json(content_type=None)
    assert resp.status == 413
    assert str(problem["type"]).endswith("payload_too_large")
    # The upload handler records only a body it read to its end.
    assert upstream.upload == (0, "")


async def test_slow_request_head_gets_408_and_is_closed(
    limited: StartLimited, recording_upstream: tuple[str, RecordingUpstream]
) -> None:
    """A head that stalls past header_read_timeout is answered 408 and the connection closed."""
    _, upstream = recording_upstream
    proxy = await limited(header_read_timeout="200ms")
    answer = await _exchange(_address(proxy), b"GET /api/v1/orders/A-1 HTTP/1.1\r\nHost: x\r\nX-Slo")
    status, problem = _status_and_problem(answer)
    assert status == 408
    assert str(problem["type"]).endswith("request_timeout")
    assert proxy.servers["ingress"].head_timeouts == 1
    assert upstream.received == []
    assert await _refused(proxy, "header_timeout") == 1


async def test_head_timer_does_not_touch_bodies_or_idle_connections(
    limited: StartLimited, recording_upstream: tuple[str, RecordingUpstream]
) -> None:
    """A slow body and a quiet kept-alive connection are not head timeouts (the idle timeout governs)."""
    _, upstream = recording_upstream
    proxy = await limited(header_read_timeout="100ms", idle_timeout="30s")
    reader, writer = await asyncio.open_connection(*_address(proxy))
    try:
        writer.write(b"POST /t/upload HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n\r\nabc")
        await writer.drain()
        await asyncio.sleep(0.3)  # longer than the head timeout, on purpose: a slow body is allowed
        writer.write(b"def")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
        assert head.startswith(b"HTTP/1.1 200")
        assert upstream.upload[0] == 6
        await asyncio.sleep(0.3)  # idle between requests, again past the head timeout
        writer.write(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        rest = await asyncio.wait_for(reader.read(), WAIT)
        assert b"HTTP/1.1 200" in rest
    finally:
        writer.close()
    assert proxy.servers["ingress"].head_timeouts == 0


async def test_idle_connection_is_closed_after_idle_timeout(
    limited: StartLimited,
) -> None:
    """A connection that never sends a byte is closed once idle_timeout passes."""
    proxy = await limited(idle_timeout="200ms")
    reader, writer = await asyncio.open_connection(*_address(proxy))
    try:
        assert await asyncio.wait_for(reader.read(), WAIT) == b""
    finally:
        writer.close()


async def test_connections_beyond_the_cap_get_503_until_one_closes(
    limited: StartLimited,
) -> None:
    """With max_connections busy, a new one is answered 503 with Retry-After; after one closes, it works."""
    proxy = await limited(max_connections=3)
    address = _address(proxy)
    server: Http1Server = proxy.servers["ingress"]
    held = [await asyncio.open_connection(*address) for _ in range(3)]
    for _, writer in held:
        writer.write(b"GET /api/v1/health HTTP/1.1\r\nHo")  # a head in progress: not idle
    try:
        async with asyncio.timeout(WAIT):
            while True:  # accepted and reading a head, not just queued in the kernel's backlog
                if server.open_connections == 3 and all(c.idle_since is None for c in server.connections):
                    break
                await asyncio.sleep(0.01)
        answer = await _exchange(address, b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
        status, _ = _status_and_problem(answer)
        assert status == 503
        assert b"Retry-After: 1" in answer
        assert server.refused_connections == 1
        assert await _refused(proxy, "connection_cap") == 1
    finally:
        for _, writer in held:
            writer.close()
    async with asyncio.timeout(WAIT):
        while True:
            if server.open_connections == 0:
                break
            await asyncio.sleep(0.01)
    answer = await _exchange(address, b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200")


async def test_500_half_open_connections_do_not_stop_normal_traffic(
    limited: StartLimited,
) -> None:
    """500 connections stalled mid request line leave the listener serving ordinary requests."""
    proxy = await limited()  # the defaults: 4096 connections, 10 s to send a head
    address = _address(proxy)
    server: Http1Server = proxy.servers["ingress"]
    stalled: list[asyncio.StreamWriter] = []
    try:
        for _ in range(500):
            _reader, writer = await asyncio.open_connection(*address)
            writer.write(b"GET /api/v1/orders/A-1 HT")
            stalled.append(writer)
        async with asyncio.timeout(WAIT):
            while True:
                if server.open_connections >= 500:
                    break
                await asyncio.sleep(0.01)
        host, port = address
        async with aiohttp.ClientSession() as client:
            for index in range(20):
                async with client.get(f"http://{host}:{port}/api/v1/orders/N-{index}") as resp:
                    assert resp.status == 200
                    assert (await resp.json())["path"] == f"/api/v1/orders/N-{index}"
        assert server.head_timeouts == 0
    finally:
        for writer in stalled:
            writer.close()
        await asyncio.gather(*(w.wait_closed() for w in stalled), return_exceptions=True)


@pytest.mark.parametrize(
    ("limits", "per_client", "body_timeout"),
    [
        ({}, None, 60.0),
        ({"max_connections_per_client": 8, "body_read_timeout": "5s"}, 8, 5.0),
        ({"max_connections_per_client": 0, "body_read_timeout": "0s"}, None, None),
    ],
    ids=["defaults", "set", "zero-turns-off"],
)
def test_the_new_limits_are_read_from_the_config_file(
    limits: dict[str, object], per_client: int | None, body_timeout: float | None
) -> None:
    """max_connections_per_client and body_read_timeout: defaults, values, 0 for off; /config shows them."""
    config = load_config(
        flags={"upstream": "http://127.0.0.1:1"},
        environ={},
        file_doc={"listeners": [{"name": "ingress", "limits": limits}]},
        defaults=read_default_rules(),
    )
    got = config.listeners[0].limits
    assert (got.max_connections_per_client, got.body_read_timeout) == (per_client, body_timeout)
    described = config.describe()["listeners"][0]["limits"]  # type: ignore[index]
    assert described["max_connections_per_client"] == (per_client or 0)
    assert described["body_read_timeout"] == (body_timeout or 0.0)


@pytest.mark.parametrize(
    ("limits", "key"),
    [
        ({"max_connections_per_client": -1}, "listeners[0].limits.max_connections_per_client"),
        ({"max_connections_per_client": "many"}, "listeners[0].limits.max_connections_per_client"),
        ({"body_read_timeout": "soon"}, "listeners[0].limits.body_read_timeout"),
    ],
    ids=["negative", "not-a-number", "not-a-duration"],
)
def test_a_bad_new_limit_stops_start_up_naming_its_key(limits: dict[str, object], key: str) -> None:
    """A bad value names its key, as every config error does."""
    with pytest.raises(ConfigError) as info:
        load_config(
            flags={"upstream": "http://127.0.0.1:1"},
            environ={},
            file_doc={"listeners": [{"name": "ingress", "limits": limits}]},
            defaults=read_default_rules(),
        )
    assert key in str(info.value)
