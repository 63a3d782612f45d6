"""The proxy as a real process (start-up, bounded memory, drain on SIGTERM, bind errors) and in-process."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from prometheus_client import generate_latest

from mes_trace_proxy.core.orders import SpanRef
from mes_trace_proxy.server import BindError, running
from mes_trace_proxy.sim.otlp_sink import OtlpSink
from tests.conftest import MakeConfig, otlp_env
from tests.proxy_process import proxy_process
from tests.upstream import RecordingUpstream

# Streams of this size would show up in RSS many times over if anything buffered them.
STREAM_BYTES = 64 * 1024 * 1024
# What a streaming proxy may grow by while moving 64 MiB: socket buffers, a few 64-256 KiB
# reads in flight, allocator slack. Buffering even one direction would exceed it fourfold.
RSS_GROWTH_BOUND_KIB = 16 * 1024
LOOPBACK_ARGS = ["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--state", "memory"]


async def _pattern(total: int) -> AsyncIterator[bytes]:
    block = bytes(range(256)) * 1024
    sent = 0
    while sent < total:
        piece = block[: min(len(block), total - sent)]
        sent += len(piece)
        yield piece


@pytest.mark.slow
async def test_64_mib_upload_and_download_stream_in_bounded_memory(
    recording_upstream: tuple[str, RecordingUpstream],
) -> None:
    """64 MiB each way pass through intact while the proxy's peak RSS grows by less than 16 MiB."""
    base, upstream = recording_upstream
    async with (
        proxy_process([*LOOPBACK_ARGS, "--upstream", base], {"OTEL_TRACES_EXPORTER": "none"}) as proxy,
        aiohttp.ClientSession(auto_decompress=False) as client,
    ):
        async with client.get(f"{proxy.url()}/api/v1/health") as resp:
            assert resp.status == 200
        before = proxy.status_kib("VmHWM")
        async with client.post(
            f"{proxy.url()}/t/upload",
            data=_pattern(STREAM_BYTES),
            headers={"Content-Type": "application/octet-stream"},
        ) as resp:
            assert resp.status == 200
            answer = await resp.json()
        expected = hashlib.sha256()
        async for piece in _pattern(STREAM_BYTES):
            expected.update(piece)
        assert answer == {"bytes": STREAM_BYTES, "sha256": expected.hexdigest()}
        got = hashlib.sha256()
        received = 0
        async with client.get(f"{proxy.url()}/t/download?size={STREAM_BYTES}&length=1") as resp:
            assert resp.headers["Content-Length"] == str(STREAM_BYTES)
            async for chunk in resp.content.iter_chunked(1024 * 1024):
                got.update(chunk)
                received += len(chunk)
        assert received == STREAM_BYTES
        assert got.hexdigest() == expected.hexdigest()
        growth = proxy.status_kib("VmHWM") - before
        print(f"proxy peak RSS growth for 64 MiB up + 64 MiB down: {growth} KiB")
        assert growth < RSS_GROWTH_BOUND_KIB
    assert upstream.upload[0] == STREAM_BYTES


async def test_sigterm_drains_in_flight_refuses_new_and_flushes_spans(
    recording_upstream: tuple[str, RecordingUpstream], otlp_sink: OtlpSink
) -> None:
    """On SIGTERM an in-flight request still completes, new connections are refused, spans are exported."""
    base, upstream = recording_upstream
    env = otlp_env(otlp_sink) | {"OTEL_BSP_SCHEDULE_DELAY": "60000"}  # only the shutdown flush exports
    async with proxy_process([*LOOPBACK_ARGS, "--upstream", base, "--grace-period", "10s"], env) as proxy:
        async with aiohttp.ClientSession() as client:
            in_flight = asyncio.ensure_future(client.get(f"{proxy.url()}/t/slow"))
            await asyncio.wait_for(upstream.slow_started.wait(), 10)
            proxy.process.send_signal(signal.SIGTERM)
            host, port = proxy.listeners["ingress"].split(":")
            # Once the listening socket is closed, a new connection is refused.
            async with asyncio.timeout(10):
                while True:
                    try:
                        _r, writer = await asyncio.open_connection(host, int(port))
                    except ConnectionRefusedError:
                        break
                    writer.close()
                    await asyncio.sleep(0.02)
            upstream.release.set()
            resp = await asyncio.wait_for(in_flight, 10)
            assert resp.status == 200
            assert await resp.text() == "late"
            resp.release()
        assert await asyncio.wait_for(proxy.process.wait(), 20) == 0
    spans = await otlp_sink.wait_for_spans(2, timeout=10)
    assert {span.kind for span in spans} == {"SERVER", "CLIENT"}
    messages = [line.get("message") for line in proxy.json_lines()]
    assert "mes-trace-proxy stopped" in messages


async def test_busy_port_is_a_clear_error_not_a_traceback() -> None:
    """A listen address already in use stops start-up with exit 1 and a message naming it."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "mes_trace_proxy",
            "serve",
            "--listen",
            f"127.0.0.1:{port}",
            "--admin-listen",
            "127.0.0.1:0",
            "--upstream",
            "http://127.0.0.1:9",
            "--state",
            "memory",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={"OTEL_TRACES_EXPORTER": "none", "PATH": ""},
        )
        _out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 1
    text = err.decode()
    assert f"127.0.0.1:{port}" in text
    assert "listener ingress" in text
    assert "Traceback" not in text


async def test_bad_config_exits_2_naming_the_flag() -> None:
    """A bad --upstream stops start-up with exit status 2 and the flag named."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mes_trace_proxy",
        "serve",
        "--upstream",
        "ftp://mes",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={"PATH": ""},
    )
    _out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 2
    assert "--upstream" in err.decode()


async def test_two_workers_share_the_listen_socket_and_stop_together(
    recording_upstream: tuple[str, RecordingUpstream],
) -> None:
    """--workers 2 starts two processes on one port (SO_REUSEPORT) that answer and drain on SIGTERM."""
    base, upstream = recording_upstream
    # Hold the port with SO_REUSEPORT (bound, not listening) so no one else can take it
    # while both workers bind it too; release it once they are up.
    holders = []
    for _ in range(2):
        holder = socket.socket()
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind(("127.0.0.1", 0))
        holders.append(holder)
    port, admin_port = (h.getsockname()[1] for h in holders)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mes_trace_proxy",
        "serve",
        "--workers",
        "2",
        "--upstream",
        base,
        "--listen",
        f"127.0.0.1:{port}",
        "--admin-listen",
        f"127.0.0.1:{admin_port}",
        "--state",
        "memory",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={"OTEL_TRACES_EXPORTER": "none", "PATH": "", "PYTHONUNBUFFERED": "1"},
    )
    assert process.stdout is not None
    try:
        ready = 0
        seen: list[str] = []
        async with asyncio.timeout(30):
            while ready < 2:
                line = await process.stdout.readline()
                assert line, "the workers exited before they were ready: " + "".join(seen)
                seen.append(line.decode(errors="replace"))
                if json.loads(line).get("message") == "mes-trace-proxy ready":
                    ready += 1
        for holder in holders:
            holder.close()
        async with aiohttp.ClientSession() as client:
            for _ in range(20):
                async with client.get(f"http://127.0.0.1:{port}/api/v1/health") as resp:
                    assert resp.status == 200
        assert len(upstream.received) == 20
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 30) == 0
    finally:
        for holder in holders:
            holder.close()
        if process.returncode is None:
            process.kill()
            await process.wait()


# ── the lifecycle in-process: teardown is start-up in reverse ────────────────────────────────


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _can_bind(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _other_tasks() -> set[asyncio.Task[object]]:
    return {task for task in asyncio.all_tasks() if task is not asyncio.current_task()}


async def test_a_failed_start_unwinds_everything_started_before_it(
    make_config: MakeConfig, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The admin port is taken: both proxy listeners, already bound, are closed again, the store's
    writer, the span export and the access log stop, and the shutdown is logged like any other."""
    ingress, egress = _free_port(), _free_port()
    before = _other_tasks()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        config = make_config(
            "http://127.0.0.1:9",
            listen=f"127.0.0.1:{ingress}",
            egress_listen=f"127.0.0.1:{egress}",
            egress_upstream="http://127.0.0.1:9",
            admin_listen=f"127.0.0.1:{holder.getsockname()[1]}",
            state=f"sqlite:///{tmp_path / 'orders.db'}",
        )
        caplog.set_level(logging.INFO, logger="mes_trace_proxy.server")
        with pytest.raises(BindError, match="admin listener"):
            async with running(config, environ={"OTEL_TRACES_EXPORTER": "none"}):
                pytest.fail("started on a taken port")
    assert _can_bind(ingress)
    assert _can_bind(egress)
    assert _other_tasks() == before
    messages = [record.getMessage() for record in caplog.records]
    assert "mes-trace-proxy ready" not in messages
    assert messages[-1] == "mes-trace-proxy stopped"


async def test_a_clean_exit_marks_draining_first_and_leaves_nothing_running(
    make_config: MakeConfig, recording_upstream: tuple[str, RecordingUpstream]
) -> None:
    """Leaving ``running`` drains and stops every task and socket it started; /readyz turns 503 first."""
    base, _upstream = recording_upstream
    before = _other_tasks()
    async with running(make_config(base), environ={"OTEL_TRACES_EXPORTER": "none"}) as proxy:
        readiness = proxy.shared.readiness
        assert (readiness.listeners_bound, readiness.draining) == (True, False)
        async with aiohttp.ClientSession() as client, client.get(f"{proxy.url('ingress')}/t/ok") as resp:
            assert resp.status == 200
        port = proxy.listeners["ingress"][1]
        assert len(_other_tasks() - before) >= 3  # at least the writer, the watchdog, the log flush
    assert (readiness.listeners_bound, readiness.draining) == (False, True)
    assert _can_bind(port)
    assert _other_tasks() == before


async def test_every_lifecycle_status_is_its_own_metric_label(
    make_config: MakeConfig, recording_upstream: tuple[str, RecordingUpstream]
) -> None:
    """The cancel exit is a lifecycle status too: /metrics never folds CANCELLED into _OTHER."""
    base, _upstream = recording_upstream
    async with running(make_config(base), environ={"OTEL_TRACES_EXPORTER": "none"}) as proxy:
        book = proxy.shared.orders
        assert book is not None
        span = SpanRef(trace_id=1, span_id=2)
        book.apply(order_id="A", status="SUBMITTED", observed=None, now=1.0, span=span)
        book.apply(order_id="A", status="CANCELLED", observed=None, now=2.0, span=span)
        book.apply(order_id="B", status="Petrov Sergei Ivanovich", observed=None, now=2.0, span=span)
        text = generate_latest(proxy.shared.metrics.registry).decode()
    assert 'mes_orders{status="CANCELLED"} 1.0' in text
    assert 'mes_orders{status="_OTHER"} 1.0' in text
    assert "Petrov" not in text
