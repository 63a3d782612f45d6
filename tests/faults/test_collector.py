"""Scenario 1: the OTLP collector is down, black-holed or slow; no proxied request notices.

The proxy runs as a child process exporting over OTLP/HTTP; the collector is an OtlpSink in
this process (or a port that refuses connections). Every span is accounted for in /metrics
(exported, failed or dropped), memory stays bounded, and export resumes by itself.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Final

import aiohttp
import pytest

from mes_trace_proxy.sim.otlp_sink import OtlpSink, ReceivedSpan
from tests.faults.faulty_upstream import FaultyUpstream
from tests.faults.harness import (
    LOOPBACK_ARGS,
    Outcome,
    Scrape,
    assert_all_echoed,
    body_for,
    drive,
    echo_request,
    report,
    scrape,
)
from tests.proxy_process import ProxyProcess, proxy_process

# 200 requests, 20 at a time: 400 spans, three times the queue below, in well under a second.
REQUESTS: Final = 200
CONCURRENCY: Final = 20
# A queue of 128 spans overflows during the run, so drops are exercised, not just failures.
QUEUE: Final = 128
# What 400 spans and the exporter's retries may add to the peak RSS: a few MiB in practice;
# 32 MiB is far below what an unbounded queue of a few thousand spans per second would take.
HWM_GROWTH_BOUND_KIB: Final = 32 * 1024


def _env(endpoint: str) -> dict[str, str]:
    return {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "50",
        "OTEL_BSP_MAX_QUEUE_SIZE": str(QUEUE),
        "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": str(QUEUE),
        # One second per export attempt (retries included), so a dead collector costs the
        # export thread a second per batch and the test a few seconds, not the SDK's 10 s.
        "OTEL_EXPORTER_OTLP_TIMEOUT": "1",
        "OTEL_BSP_EXPORT_TIMEOUT": "5000",
    }


async def _run(client: aiohttp.ClientSession, proxy: ProxyProcess, phase: str) -> list[Outcome]:
    async def send(n: int) -> Outcome:
        return await echo_request(client, proxy.url(), f"{phase}-{n}", body_for(n))

    return await drive(REQUESTS, CONCURRENCY, send)


async def _accounted(client: aiohttp.ClientSession, proxy: ProxyProcess, spans: int) -> Scrape:
    """Wait until every span ended so far is exported, failed or dropped; return that scrape."""
    async with asyncio.timeout(20):
        while True:
            metrics = await scrape(client, proxy.admin_url)
            fates = sum(
                metrics.value("mes_proxy_spans_total", outcome=o)
                for o in ("exported", "export_failed", "dropped_queue_full")
            )
            ended = metrics.value("mes_proxy_spans_total", outcome="queued") + metrics.value(
                "mes_proxy_spans_total", outcome="dropped_queue_full"
            )
            if ended == spans and fates == spans:
                return metrics
            await asyncio.sleep(0.05)


def _about(path: str) -> Callable[[ReceivedSpan], bool]:
    """SERVER spans carry url.path, CLIENT spans url.full: match either."""
    return lambda span: path in str(span.attributes.get("url.path", span.attributes.get("url.full", "")))


async def _recovered(client: aiohttp.ClientSession, proxy: ProxyProcess, sink: OtlpSink) -> None:
    """Ten requests after the collector came back reach it as twenty spans, same proxy process."""
    outcomes = await drive(10, 5, lambda n: echo_request(client, proxy.url(), f"recovered-{n}", body_for(n)))
    assert all(o.status == 200 for o in outcomes)
    await sink.wait_for_spans(20, timeout=15, predicate=_about("/echo/recovered-"))
    assert proxy.process.returncode is None


def _memory_and_drops(
    proxy: ProxyProcess, before_kib: int, faulty: Scrape, healthy: Scrape, *, expect_loss: bool = True
) -> None:
    growth = proxy.status_kib("VmHWM") - before_kib
    lost = sum(
        faulty.value("mes_proxy_spans_total", outcome=o) - healthy.value("mes_proxy_spans_total", outcome=o)
        for o in ("export_failed", "dropped_queue_full")
    )
    print(f"[faults] peak RSS growth under the fault: {growth} KiB; spans counted lost: {lost:.0f}")
    assert growth < HWM_GROWTH_BOUND_KIB
    if expect_loss:
        assert lost > 0


async def test_collector_down_for_the_whole_run(
    faulty_upstream: FaultyUpstream, client: aiohttp.ClientSession
) -> None:
    """Collector port closed from start-up: no request fails, every span counts as failed or dropped,
    and spans flow again once a collector listens on that port, with no restart."""
    with socket.socket() as holder:
        # Bound and never listening: connections to it are refused for as long as we hold it.
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]
        endpoint = f"http://127.0.0.1:{port}/v1/traces"
        async with proxy_process(
            [*LOOPBACK_ARGS, "--upstream", faulty_upstream.url], _env(endpoint)
        ) as proxy:
            before = proxy.status_kib("VmHWM")
            faulty = await _run(client, proxy, "down")
            assert_all_echoed(faulty, faulty_upstream.ids)
            during = await _accounted(client, proxy, 2 * REQUESTS)
            assert during.value("mes_proxy_spans_total", outcome="exported") == 0
            _memory_and_drops(proxy, before, during, Scrape({}))
            holder.close()
            async with OtlpSink(grpc=False, http_port=port) as sink:
                await _recovered(client, proxy, sink)
                baseline = await _run(client, proxy, "baseline")
                assert_all_echoed(baseline, faulty_upstream.ids)
    report("collector down", baseline, faulty)


@pytest.mark.parametrize("mode", ["blackhole", "slow"])
async def test_collector_blackholed_or_slow(
    mode: str, faulty_upstream: FaultyUpstream, client: aiohttp.ClientSession
) -> None:
    """A collector that never answers, or answers late, fails no request; spans are accounted for;
    export resumes by itself when it answers again."""
    async with OtlpSink(grpc=False, delay_seconds=0.5) as sink:
        env = _env(sink.http_endpoint)
        async with proxy_process([*LOOPBACK_ARGS, "--upstream", faulty_upstream.url], env) as proxy:
            baseline = await _run(client, proxy, "baseline")
            assert_all_echoed(baseline, faulty_upstream.ids)
            healthy = await _accounted(client, proxy, 2 * REQUESTS)
            before = proxy.status_kib("VmHWM")
            sink.mode = "blackhole" if mode == "blackhole" else "slow"
            faulty = await _run(client, proxy, mode)
            assert_all_echoed(faulty, faulty_upstream.ids)
            during = await _accounted(client, proxy, 4 * REQUESTS)
            if mode == "blackhole":
                assert during.value("mes_proxy_spans_total", outcome="exported") == healthy.value(
                    "mes_proxy_spans_total", outcome="exported"
                )
            # What the proxy counts as exported is what the collector received, no more, no less.
            assert during.value("mes_proxy_spans_total", outcome="exported") == sink.spans_received
            # A collector that never answers loses spans for certain. A slow one (0.5 s per
            # export, inside the exporter's 1 s timeout) loses them only when the proxy makes
            # spans faster than one batch per 0.5 s, which depends on how busy the machine is:
            # there, what is checked is that every span is accounted for (above).
            _memory_and_drops(proxy, before, during, healthy, expect_loss=mode == "blackhole")
            sink.mode = "ok"
            await _recovered(client, proxy, sink)
    report(f"collector {mode}", baseline, faulty)
