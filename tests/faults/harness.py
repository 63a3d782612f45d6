"""Shared pieces of the fault suite: bounded traffic with per-request ids, outcome checks, scrapes.

Every request a scenario sends carries ``X-Request-Id: <n>`` so the upstream's arrival
counts can prove that nothing was lost, duplicated or retried.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TypeVar

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.proxy_process import ProxyProcess

__all__ = [
    "LOOPBACK_ARGS",
    "STEP_TIMEOUT",
    "Outcome",
    "Scrape",
    "access_lines",
    "assert_all_echoed",
    "body_for",
    "drive",
    "echo_request",
    "latency",
    "open_fds",
    "poll",
    "report",
    "scrape",
    "write_config",
]

T = TypeVar("T")

LOOPBACK_ARGS: Final = ("--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--state", "memory")
# Every wait in the suite is bounded by this unless a scenario says otherwise: ten times
# what any healthy step takes on a loaded CI machine, so only a real hang trips it.
STEP_TIMEOUT: Final = 20.0


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one request ended with: a status and body, or the exception that ended it."""

    request_id: str
    status: int | None
    body: bytes
    error: str | None
    seconds: float


async def echo_request(
    client: aiohttp.ClientSession, url: str, request_id: str, body: bytes, method: str = "POST"
) -> Outcome:
    """Send ``body`` to the upstream's echo behaviour and read the whole answer."""
    started = time.perf_counter()
    try:
        async with client.request(
            method, f"{url}/echo/{request_id}", data=body, headers={"X-Request-Id": request_id}
        ) as resp:
            data = await resp.read()
            return Outcome(request_id, resp.status, data, None, time.perf_counter() - started)
    except (aiohttp.ClientError, TimeoutError) as exc:
        return Outcome(request_id, None, b"", type(exc).__name__, time.perf_counter() - started)


async def drive(
    count: int,
    concurrency: int,
    send: Callable[[int], Awaitable[Outcome]],
    *,
    timeout: float = STEP_TIMEOUT,  # noqa: ASYNC109
) -> list[Outcome]:
    """Run ``send(0..count-1)`` with at most ``concurrency`` in flight; all within ``timeout``."""
    gate = asyncio.Semaphore(concurrency)

    async def one(n: int) -> Outcome:
        async with gate:
            return await send(n)

    async with asyncio.timeout(timeout):
        return list(await asyncio.gather(*(one(n) for n in range(count))))


def body_for(n: int) -> bytes:
    """A deterministic body of a few hundred bytes to a few KiB, binary, different per request."""
    return bytes((n * 7 + i) % 256 for i in range(200 + (n * 37) % 3000))


def assert_all_echoed(outcomes: Iterable[Outcome], ids: Counter[str]) -> None:
    """Every request got exactly its own 200 echo back, and reached the upstream exactly once."""
    outcomes = list(outcomes)
    failed = [o for o in outcomes if o.status != 200]
    assert not failed, f"{len(failed)} of {len(outcomes)} failed, first: {failed[0]}"
    for outcome in outcomes:
        assert outcome.body == body_for(int(outcome.request_id.rsplit("-", 1)[1])), outcome.request_id
        assert ids[outcome.request_id] == 1, (
            f"{outcome.request_id} reached the upstream {ids[outcome.request_id]}x"
        )


def latency(outcomes: Iterable[Outcome]) -> tuple[float, float]:
    """(median, 99th percentile) in milliseconds."""
    seconds = sorted(o.seconds for o in outcomes)
    p99 = seconds[min(len(seconds) - 1, round(0.99 * (len(seconds) - 1)))]
    return statistics.median(seconds) * 1000, p99 * 1000


def report(label: str, baseline: Iterable[Outcome], faulty: Iterable[Outcome]) -> str:
    """Print and return the latency of a fault run beside its baseline (no assertion: figures only)."""
    b50, b99 = latency(baseline)
    f50, f99 = latency(faulty)
    line = (
        f"[faults] {label}: p50 {f50:.1f} ms vs {b50:.1f} ms baseline (x{f50 / b50:.2f}), "
        f"p99 {f99:.1f} ms vs {b99:.1f} ms (x{f99 / b99:.2f})"
    )
    print(line)
    return line


@dataclass(frozen=True, slots=True)
class Scrape:
    """One /metrics scrape: sample values by name and labels."""

    samples: Mapping[tuple[str, frozenset[tuple[str, str]]], float]

    def value(self, name: str, **labels: str) -> float:
        """The sample's value, 0 when absent (a counter never incremented)."""
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def total(self, name: str, **labels: str) -> float:
        """The sum over every sample of ``name`` whose labels include ``labels``."""
        wanted = set(labels.items())
        return sum(v for (n, ls), v in self.samples.items() if n == name and wanted <= ls)


async def scrape(client: aiohttp.ClientSession, admin_url: str) -> Scrape:
    """Scrape the proxy's /metrics."""
    async with client.get(f"{admin_url}/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return Scrape(samples)


def open_fds(pid: int) -> int:
    """How many file descriptors the process holds now (``/proc/<pid>/fd``)."""
    return len(os.listdir(f"/proc/{pid}/fd"))


async def poll(
    read: Callable[[], Awaitable[T]],
    done: Callable[[T], bool],
    *,
    timeout: float = STEP_TIMEOUT,  # noqa: ASYNC109
) -> T:
    """Read until ``done(value)`` or the bounded wait ends; return the last value read.

    Descriptor, task and store counts have no event to wait on: connections close and the
    store writer flushes asynchronously in another process, so the figure is read until it
    reaches the expected level; the caller asserts on the value returned.
    """
    deadline = time.monotonic() + timeout
    while True:
        current = await read()
        if done(current) or time.monotonic() > deadline:
            return current
        await asyncio.sleep(0.05)


def write_config(directory: Path, document: str) -> str:
    """Write a YAML config file for a proxy child; return its path."""
    path = directory / "proxy.yaml"
    path.write_text(document, encoding="utf-8")
    return str(path)


def access_lines(proxy: ProxyProcess) -> list[Mapping[str, object]]:
    """The proxy's access-log records so far."""
    return [line for line in proxy.json_lines() if line.get("logger") == "mes_trace_proxy.access"]
