"""``make soak``: the real proxy under mixed CRM traffic for SOAK_MINUTES, watched for leaks.

The proxy runs as a child process with SQLite order state; the MES simulator, the CRM and
dashboard simulator and an OTLP receiver run in this process. Every 10 s the proxy's /metrics
is scraped (RSS, open descriptors, event-loop tasks); a line is printed every minute, and the
run fails when one of them grows without bound (see :func:`verdict` for the rule).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import signal
import socket
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TextIO

import aiohttp
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from mes_trace_proxy.sim import crm, mes
from mes_trace_proxy.sim.otlp_sink import OtlpSink

__all__ = ["BUDGETS", "Budget", "Sample", "Trend", "build_parser", "main", "run", "trend", "verdict"]

# Half an hour: long enough for slow leaks to rise above allocator noise, short enough for CI.
DEFAULT_MINUTES: Final = 30.0
# Six points a minute: the second half of even a 5-minute run has 15 to fit a line through.
SAMPLE_SECONDS: Final = 10.0
# Ten new orders a second, each about a dozen calls with dashboard polling and uploads beside:
# roughly 150 proxied requests a second, a busy plant, on two cores shared with the simulators.
ORDERS_PER_SECOND: Final = 10.0
# Simulated lifecycle delays at a tenth: an order runs from submission to CLOSED in seconds.
TIME_SCALE: Final = 0.1
# One round of traffic a minute; order ids repeat every POOLS rounds, so the set of live
# orders (and with it the order book and the SQLite file) reaches a steady size after
# POOLS minutes, as it does in production once retention purges closed orders.
ROUND_SECONDS: Final = 60.0
POOLS: Final = 2
# Starting the proxy and the simulators takes about a second; 30 s means something is wrong.
READY_TIMEOUT: Final = 30.0
SCRAPE_TIMEOUT: Final = 5.0
# A steady series wobbles (GC, pooled connections); a trend below this t-statistic is noise.
SIGNIFICANT_T: Final = 3.0
# Warm-up lasts at least this long whatever the run's length: POOLS rounds fill the order book,
# and the SQLite page cache and WAL take about a minute more (measured: flat from minute 4 of
# a 20-minute run, still rising at minute 2.5 of a 5-minute one).
WARM_UP_MINUTES: Final = 3.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Budget:
    """How much a series may grow per hour, in its own unit, before it counts as unbounded."""

    name: str
    unit: str
    per_hour: float


#: Per-hour growth allowed in the second half of the run. RSS: 32 MiB/h leaves room for the
#: allocator's slow creep and the SQLite page cache, and catches a leak of ~60 bytes per
#: request at 150 requests/s. Descriptors and tasks: a steady proxy holds a fixed pool of
#: each; 16 an hour is a leak of one every four minutes, which nothing legitimate does.
BUDGETS: Final = (
    Budget(name="rss_mib", unit="MiB", per_hour=32.0),
    Budget(name="fds", unit="fds", per_hour=16.0),
    Budget(name="tasks", unit="tasks", per_hour=16.0),
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Sample:
    """One scrape of the proxy's /metrics."""

    minute: float
    rss_mib: float
    fds: float
    tasks: float
    orders: float
    requests: float
    spans_exported: float
    spans_lost: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Trend:
    """A least-squares line through (minute, value) points."""

    per_hour: float
    t_stat: float
    points: int


def trend(points: Sequence[tuple[float, float]]) -> Trend:
    """Fit ``value = a + b * minute`` by least squares.

    Args:
        points: (minute, value) pairs.

    Returns:
        The slope per hour, its t-statistic (slope / standard error; ``inf`` for a perfect
        rising line, 0 for fewer than three points or a flat one) and the point count.
    """
    n = len(points)
    if n < 3:
        return Trend(per_hour=0.0, t_stat=0.0, points=n)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx == 0:
        return Trend(per_hour=0.0, t_stat=0.0, points=n)
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx
    residual = sum((y - (my + slope * (x - mx))) ** 2 for x, y in points)
    stderr = math.sqrt(residual / (n - 2) / sxx)
    # A perfect line has no error: its t-statistic is infinite in the slope's direction.
    t_stat = slope / stderr if stderr else (0.0 if slope == 0 else math.copysign(math.inf, slope))
    return Trend(per_hour=slope * 60.0, t_stat=t_stat, points=n)


def verdict(samples: Sequence[Sample], budgets: Sequence[Budget] = BUDGETS) -> dict[str, tuple[Trend, bool]]:
    """Judge each series over the second half of the run.

    The first half, and at least :data:`WARM_UP_MINUTES`, is warm-up: pools fill, the
    allocator finds its arenas, the order book and the SQLite file grow to the size of the id
    pools. A series then grows without bound when its least-squares slope over the rest is
    significant (t-statistic above
    :data:`SIGNIFICANT_T`, so noise around a flat line does not count) **and** larger than
    its hourly budget. Both must hold: a tiny but steady creep passes, and so does a noisy
    series whose fitted slope is large by chance.

    Args:
        samples: every sample of the run, in time order.
        budgets: the series to judge and their hourly budgets.

    Returns:
        Series name → (its trend, True when it grows without bound).
    """
    if not samples:
        return {}
    start = max(samples[-1].minute / 2, WARM_UP_MINUTES)
    second = [s for s in samples if s.minute >= start]
    out: dict[str, tuple[Trend, bool]] = {}
    for budget in budgets:
        fitted = trend([(s.minute, float(getattr(s, budget.name))) for s in second])
        unbounded = fitted.t_stat > SIGNIFICANT_T and fitted.per_hour > budget.per_hour
        out[budget.name] = (fitted, unbounded)
    return out


def _sample(text: str, minute: float) -> Sample:
    values: defaultdict[str, float] = defaultdict(float)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = sample.name
            if key == "mes_proxy_spans_total":
                key = f"spans_{sample.labels.get('outcome', '')}"
            values[key] += sample.value
    return Sample(
        minute=minute,
        rss_mib=values["process_resident_memory_bytes"] / 2**20,
        fds=values["process_open_fds"],
        tasks=values["mes_proxy_event_loop_tasks"],
        orders=values["mes_orders"],
        requests=values["mes_proxy_requests_total"],
        spans_exported=values["spans_exported"],
        spans_lost=values["spans_export_failed"] + values["spans_dropped_queue_full"],
    )


class _Proxy:
    """The proxy child: started with a command line, ready when it logs its addresses."""

    def __init__(self, process: asyncio.subprocess.Process, log: TextIO) -> None:
        self.process = process
        self._log = log
        self._pump: asyncio.Task[None] | None = None

    @classmethod
    async def start(
        cls, argv: Sequence[str], env: Mapping[str, str], log: TextIO
    ) -> tuple[_Proxy, dict[str, object]]:
        process = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=dict(env)
        )
        proxy = cls(process, log)
        assert process.stdout is not None
        async with asyncio.timeout(READY_TIMEOUT):
            while True:
                raw = await process.stdout.readline()
                if not raw:
                    raise RuntimeError(
                        f"the proxy exited before it was ready (status {await process.wait()})"
                    )
                log.write(raw.decode("utf-8", "replace"))
                with contextlib.suppress(ValueError):
                    record = json.loads(raw)
                    if isinstance(record, dict) and record.get("message") == "mes-trace-proxy ready":
                        break
        proxy._pump = asyncio.ensure_future(proxy._drain(process.stdout))
        return proxy, record

    async def _drain(self, stream: asyncio.StreamReader) -> None:
        # Kept flowing so a full pipe never stalls the proxy's access log; written to a file
        # that the temporary directory removes.
        while raw := await stream.readline():
            self._log.write(raw.decode("utf-8", "replace"))

    async def stop(self) -> int:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), 60)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        if self._pump is not None:
            await self._pump
        return self.process.returncode or 0


async def _scrape(session: aiohttp.ClientSession, admin: str, minute: float) -> Sample:
    async with session.get(f"{admin}/metrics", timeout=aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT)) as resp:
        return _sample(await resp.text(), minute)


def _line(sample: Sample, previous: Sample | None) -> str:
    rate = ""
    if previous is not None and sample.minute > previous.minute:
        rate = f" (+{(sample.requests - previous.requests) / (sample.minute - previous.minute):.0f}/min)"
    return (
        f"minute {sample.minute:5.1f}: RSS {sample.rss_mib:6.1f} MiB, fds {sample.fds:4.0f}, "
        f"tasks {sample.tasks:4.0f}, orders tracked {sample.orders:6.0f}, "
        f"requests {sample.requests:8.0f}{rate}, spans exported {sample.spans_exported:.0f}, "
        f"lost {sample.spans_lost:.0f}"
    )


async def _traffic(ingress: str, crm_sock: socket.socket, sink: OtlpSink, deadline: float) -> Counter[str]:
    """Rounds of CRM traffic until the deadline; returns response codes and errors over all rounds."""
    totals: Counter[str] = Counter()
    round_number = 0
    while (left := deadline - time.monotonic()) > 1:
        seconds = min(ROUND_SECONDS, left)
        summary = await crm.run_traffic(
            crm.CrmSimConfig(
                target_url=ingress,
                orders=max(1, int(ORDERS_PER_SECOND * seconds)),
                rate=ORDERS_PER_SECOND,
                duration=seconds,
                time_scale=TIME_SCALE,
                seed=round_number % POOLS,
                order_prefix="SOAK",
                otlp_endpoint=sink.http_endpoint,
            ),
            # A duplicate of the one listening socket: each round's server closes its copy,
            # the socket stays bound, and MES's callbacks in between wait in its backlog.
            callback_sock=crm_sock.dup(),
        )
        round_number += 1
        totals.update({f"http_{code}": n for code, n in summary.responses.items()})
        totals.update({f"error_{kind}": n for kind, n in summary.errors.items()})
        totals["requests"] += summary.requests_sent
    return totals


async def run(minutes: float, out: TextIO) -> int:
    """Run the soak; print a line a minute and the verdict.

    Args:
        minutes: how long the traffic runs.
        out: where the report goes.

    Returns:
        0 when nothing grew without bound and no call failed, else 1.
    """
    samples: list[Sample] = []
    with tempfile.TemporaryDirectory(prefix="mes-soak-") as tmp:
        async with contextlib.AsyncExitStack() as stack:
            log = stack.enter_context(
                await asyncio.to_thread((Path(tmp) / "proxy.log").open, "w", encoding="utf-8")
            )
            sink = await stack.enter_async_context(OtlpSink(grpc=False, keep=False))
            mes_sock = socket.create_server(("127.0.0.1", 0))
            crm_sock = socket.create_server(("127.0.0.1", 0))
            stack.callback(mes_sock.close)
            stack.callback(crm_sock.close)
            mes_url = mes.bound_url([mes_sock.getsockname()])
            crm_url = mes.bound_url([crm_sock.getsockname()])
            argv = [sys.executable, "-m", "mes_trace_proxy", "serve"]
            argv += ["--listen", "127.0.0.1:0", "--upstream", mes_url, "--admin-listen", "127.0.0.1:0"]
            argv += ["--egress-listen", "127.0.0.1:0", "--egress-upstream", crm_url]
            argv += ["--state", f"sqlite:///{tmp}/orders.db", "--check-interval", "1s"]
            env = {k: v for k, v in os.environ.items() if not k.startswith(("MES_PROXY_", "OTEL_"))}
            env |= {
                "OTEL_TRACES_EXPORTER": "otlp",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": sink.http_endpoint,
                "PYTHONUNBUFFERED": "1",
            }
            proxy, ready = await _Proxy.start(argv, env, log)
            stack.push_async_callback(proxy.stop)
            listeners = ready["listeners"]
            assert isinstance(listeners, dict)
            ingress, egress, admin = (
                f"http://{listeners['ingress']}",
                f"http://{listeners['egress']}",
                f"http://{ready['admin']}",
            )
            app = mes.build_app(mes.MesSimConfig(crm_url=egress, time_scale=TIME_SCALE))
            runner = web.AppRunner(app, handle_signals=False, access_log=None)
            await runner.setup()
            stack.push_async_callback(runner.cleanup)
            await web.SockSite(runner, mes_sock.dup()).start()
            session = await stack.enter_async_context(aiohttp.ClientSession())
            print(
                f"soak: {minutes:g} min of CRM traffic through the proxy (PID {proxy.process.pid}), "
                f"{ORDERS_PER_SECOND:g} orders/s, SQLite state in {tmp}",
                file=out,
                flush=True,
            )

            started = time.monotonic()
            deadline = started + minutes * 60
            traffic = asyncio.ensure_future(_traffic(ingress, crm_sock, sink, deadline))
            previous: Sample | None = None
            next_print = 1.0
            try:
                while not traffic.done():
                    minute = (time.monotonic() - started) / 60
                    sample = await _scrape(session, admin, minute)
                    samples.append(sample)
                    if minute >= next_print:
                        print(_line(sample, previous), file=out, flush=True)
                        previous, next_print = sample, next_print + 1
                    if proxy.process.returncode is not None:
                        raise RuntimeError(
                            f"the proxy exited during the soak (status {proxy.process.returncode})"
                        )
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(asyncio.shield(traffic), SAMPLE_SECONDS)
                totals = await traffic
            finally:
                traffic.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await traffic
            final = await _scrape(session, admin, (time.monotonic() - started) / 60)
            samples.append(final)
            print(_line(final, previous), file=out, flush=True)
    return _report(samples, totals, out)


def _report(samples: Sequence[Sample], totals: Mapping[str, int], out: TextIO) -> int:
    judged = verdict(samples)
    failed = False
    print("after warm-up (the second half, from minute 3 at the earliest), trend per series:", file=out)
    for budget in BUDGETS:
        fitted, unbounded = judged[budget.name]
        failed |= unbounded
        print(
            f"  {budget.name:8} {fitted.per_hour:+9.2f} {budget.unit}/h (t={fitted.t_stat:+.1f}, "
            f"{fitted.points} points; budget {budget.per_hour:g} {budget.unit}/h) "
            f"{'GROWS WITHOUT BOUND' if unbounded else 'bounded'}",
            file=out,
        )
    bad = {k: v for k, v in totals.items() if k.startswith("error_") or k.startswith("http_5")}
    print(f"CRM calls: {dict(sorted(totals.items()))}", file=out)
    if bad:
        print(f"soak: calls failed: {bad}", file=out)
    peak = max(s.rss_mib for s in samples)
    print(f"peak RSS {peak:.1f} MiB; {'FAIL' if failed or bad else 'PASS'}", file=out, flush=True)
    return 1 if failed or bad else 0


def build_parser(default_minutes: float = DEFAULT_MINUTES) -> argparse.ArgumentParser:
    """The ``python -m bench.soak`` argument parser.

    Args:
        default_minutes: ``--minutes`` when not given (``main`` passes ``SOAK_MINUTES``).

    Returns:
        The parser.
    """
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    parser.add_argument(
        "--minutes",
        type=float,
        default=default_minutes,
        help="how long the traffic runs (env SOAK_MINUTES, default 30); 1 to 1440",
    )
    return parser


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """``python -m bench.soak [--minutes N]``; ``SOAK_MINUTES`` is the default.

    Args:
        argv: arguments without the program name; None reads ``sys.argv``.
        environ: where ``SOAK_MINUTES`` is read (default ``os.environ``).

    Returns:
        The exit status: 0 pass, 1 a series grew without bound or calls failed, 2 bad usage.
    """
    env = os.environ if environ is None else environ
    try:
        default = float(env.get("SOAK_MINUTES", DEFAULT_MINUTES))
    except ValueError:
        print(f"soak: SOAK_MINUTES={env['SOAK_MINUTES']!r} is not a number of minutes", file=sys.stderr)
        return 2
    args = build_parser(default).parse_args(argv)
    if not 1 <= args.minutes <= 24 * 60:
        print("soak: --minutes / SOAK_MINUTES must be from 1 to 1440 (a day)", file=sys.stderr)
        return 2
    return asyncio.run(run(args.minutes, sys.stdout))


if __name__ == "__main__":
    raise SystemExit(main())
