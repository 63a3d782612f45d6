"""Medians, ratios, the issue's targets and the markdown tables: pure functions over the figures.

Figures are ``config name -> metric name -> value`` (seconds, bytes, requests/s, µs); a metric a
config has no value for is simply absent and prints as ``—``.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

__all__ = [
    "AIOHTTP",
    "CONFIGS",
    "NGINX",
    "Figures",
    "Verdict",
    "evaluate_targets",
    "medians",
    "ratio",
    "render_markdown",
]

Figures = Mapping[str, Mapping[str, float]]

#: Table order and labels of the configurations ``bench.run`` measures.
CONFIGS: Final = (
    ("direct", "direct to nginx (floor)"),
    ("nginx", "nginx proxy_pass, keep-alive pool"),
    ("aiohttp", "plain aiohttp + uvloop passthrough"),
    ("proxy-off", "mes-trace-proxy, tracing off"),
    ("proxy-http", "mes-trace-proxy, tracing on, OTLP/HTTP"),
    ("proxy-grpc", "mes-trace-proxy, tracing on, OTLP/gRPC"),
    ("proxy-watchdog", "mes-trace-proxy, tracing on (HTTP), watchdog every 1 s"),
    ("proxy-sqlite", "mes-trace-proxy, tracing on (HTTP), watchdog 1 s, SQLite store"),
    ("proxy-nolog", "mes-trace-proxy, tracing on (HTTP), no access log"),
    ("proxy-contrib", "mes-trace-proxy, tracing on (HTTP), contrib aiohttp-client CLIENT span"),
    ("proxy-pure", "mes-trace-proxy, tracing on (HTTP), pure Python (native build off)"),
)
AIOHTTP: Final = "aiohttp"
NGINX: Final = "nginx"
TRACING_ON: Final = ("proxy-http", "proxy-grpc")
PROXIES: Final = (
    "proxy-off",
    "proxy-http",
    "proxy-grpc",
    "proxy-watchdog",
    "proxy-sqlite",
    "proxy-nolog",
    "proxy-contrib",
    "proxy-pure",
)
WORKERS: Final = (("workers-1", "1 worker, not pinned"), ("workers-2", "--workers 2, not pinned"))
MIB: Final = 1024 * 1024
# Other processes using more than a tenth of a core during a run is worth a warning.
NOISY_LOAD: Final = 0.1

# The targets (issue 6, "Targets").
MAX_TRACING_CPU_RATIO: Final = 1.15
MAX_P99_EXTRA: Final = 0.5e-3
MAX_OFF_CPU_RATIO: Final = 1.0
MIN_STREAM_SHARE: Final = 0.5
MAX_STREAM_GROWTH: Final = 16 * MIB
MIN_WORKERS_SPEEDUP: Final = 1.7
MAX_IDLE_RSS: Final = 80 * MIB
MAX_STARTUP: Final = 1.0
MAX_ORDERS_RSS: Final = 300 * MIB


def medians(rounds: Mapping[str, Sequence[Mapping[str, float]]]) -> dict[str, dict[str, float]]:
    """The median of every metric over the rounds of each configuration.

    Args:
        rounds: config name → one mapping of metric → value per round.

    Returns:
        config name → metric → median of the rounds that have it.
    """
    out: dict[str, dict[str, float]] = {}
    for config, per_round in rounds.items():
        values: dict[str, list[float]] = {}
        for one in per_round:
            for metric, value in one.items():
                values.setdefault(metric, []).append(value)
        out[config] = {metric: statistics.median(vs) for metric, vs in values.items()}
    return out


def ratio(figures: Figures, config: str, base: str, metric: str) -> float | None:
    """``figures[config][metric] / figures[base][metric]``, or None when either is missing or zero."""
    value = figures.get(config, {}).get(metric)
    reference = figures.get(base, {}).get(metric)
    if value is None or not reference:
        return None
    return value / reference


@dataclass(frozen=True, slots=True, kw_only=True)
class Verdict:
    """One target: what it asks, what was measured, and whether it held (None: not measured)."""

    target: str
    measured: str
    passed: bool | None


def _fmt(value: float | None, digits: int = 0, scale: float = 1.0, suffix: str = "") -> str:
    if value is None:
        return "—"
    return f"{value * scale:,.{digits}f}{suffix}"


def _get(figures: Figures, config: str, metric: str) -> float | None:
    return figures.get(config, {}).get(metric)


def _check(
    target: str, value: float | None, text: Callable[[float], str], ok: Callable[[float], bool]
) -> Verdict:
    if value is None:
        return Verdict(target=target, measured="not measured", passed=None)
    return Verdict(target=target, measured=text(value), passed=ok(value))


def _extra_ms(both: str) -> Callable[[float], str]:
    return lambda extra: f"{extra * 1e3:+.2f} ms ({both})"


def evaluate_targets(figures: Figures, orders_rss: float | None) -> list[Verdict]:
    """Each of the issue's targets against the medians of one run.

    Args:
        figures: config name → metric → median.
        orders_rss: RSS growth with one million orders tracked, in bytes (None: not measured).

    Returns:
        One verdict per target and configuration it applies to.
    """
    verdicts: list[Verdict] = []
    for config in TRACING_ON:
        cpu = ratio(figures, config, AIOHTTP, "cpu_us")
        dropped = _get(figures, config, "spans_dropped") or 0.0
        cpu_target = f"{config}: CPU/request ≤ {MAX_TRACING_CPU_RATIO} × plain aiohttp"
        if cpu is not None and dropped:
            # A dropped span was never encoded nor sent: the CPU figure is of less work than
            # tracing every request, so it cannot pass, however low it is.
            verdicts.append(
                Verdict(
                    target=cpu_target,
                    measured=f"{cpu:.2f} × with {dropped:,.0f} spans dropped: not comparable",
                    passed=False,
                )
            )
        else:
            verdicts.append(
                _check(cpu_target, cpu, lambda r: f"{r:.2f} ×", lambda r: r <= MAX_TRACING_CPU_RATIO)
            )
        p99 = _get(figures, config, "p99_1")
        base = _get(figures, AIOHTTP, "p99_1")
        extra = None if p99 is None or base is None else p99 - base
        both = f"{_fmt(p99, 2, 1e3)} vs {_fmt(base, 2, 1e3)} ms"
        verdicts.append(
            _check(
                f"{config}: p99 @1 conn ≤ plain aiohttp + 0.5 ms",
                extra,
                _extra_ms(both),
                lambda e: e <= MAX_P99_EXTRA,
            )
        )
    verdicts.append(
        _check(
            f"proxy-off: CPU/request ≤ {MAX_OFF_CPU_RATIO} × plain aiohttp",
            ratio(figures, "proxy-off", AIOHTTP, "cpu_us"),
            lambda r: f"{r:.2f} ×",
            lambda r: r <= MAX_OFF_CPU_RATIO,
        )
    )
    for direction in ("download", "upload"):
        share = ratio(figures, "proxy-http", NGINX, f"{direction}_mbps")
        verdicts.append(
            _check(
                f"proxy-http: 256 MiB {direction} ≥ 50 % of nginx's MB/s",
                share,
                lambda s: f"{s * 100:.0f} %",
                lambda s: s >= MIN_STREAM_SHARE,
            )
        )
        growth = _get(figures, "proxy-http", f"{direction}_rss_growth")
        verdicts.append(
            _check(
                f"proxy-http: RSS growth in the {direction} < 16 MiB",
                growth,
                lambda g: f"{g / MIB:.1f} MiB",
                lambda g: g < MAX_STREAM_GROWTH,
            )
        )
    verdicts.append(
        _check(
            f"--workers 2 ≥ {MIN_WORKERS_SPEEDUP} × the requests/s of one worker",
            ratio(figures, "workers-2", "workers-1", "rps_64"),
            lambda r: f"{r:.2f} ×",
            lambda r: r >= MIN_WORKERS_SPEEDUP,
        )
    )
    idle = [v for c in PROXIES if (v := _get(figures, c, "idle_rss")) is not None]
    verdicts.append(
        _check(
            "idle RSS < 80 MiB (largest mes-trace-proxy config)",
            max(idle) if idle else None,
            lambda v: f"{v / MIB:.1f} MiB",
            lambda v: v < MAX_IDLE_RSS,
        )
    )
    startup = [v for c in PROXIES if (v := _get(figures, c, "startup")) is not None]
    verdicts.append(
        _check(
            "start-up to ready < 1 s (slowest mes-trace-proxy config)",
            max(startup) if startup else None,
            lambda v: f"{v * 1e3:.0f} ms",
            lambda v: v < MAX_STARTUP,
        )
    )
    verdicts.append(
        _check(
            "1 million tracked orders < 300 MiB",
            orders_rss,
            lambda v: f"{v / MIB:.0f} MiB",
            lambda v: v < MAX_ORDERS_RSS,
        )
    )
    return verdicts


def _row(cells: Iterable[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    align = ["---"] + ["---:"] * (len(header) - 1)
    return [_row(header), _row(align), *(_row(r) for r in rows)]


def render_markdown(
    figures: Figures,
    *,
    orders: Mapping[str, float] | None,
    verdicts: Sequence[Verdict],
    heading: str,
) -> str:
    """The results as markdown: request path, memory and streaming, workers, orders, targets.

    Args:
        figures: config name → metric → median.
        orders: the order-book measurement (``orders``, ``rss_growth_bytes``, ``bytes_per_order``,
            ``apply_us``), or None.
        verdicts: from :func:`evaluate_targets`.
        heading: a first line saying what run this was.

    Returns:
        The markdown text.
    """
    lines = [heading, ""]
    foreign = [v for one in figures.values() for k, v in one.items() if k.startswith("foreign_")]
    if foreign and max(foreign) > NOISY_LOAD:
        lines += [
            f"**Noisy machine:** processes outside the benchmark used up to {max(foreign):.2f} cores "
            "during a measurement (column *other load*, in cores); latency percentiles suffer "
            "first, CPU per request least.",
            "",
        ]
    present = [(c, label) for c, label in CONFIGS if c in figures]
    lines.append("### Request path: PUT of a 150-byte status change with a `traceparent`")
    lines.append("")
    lines += _table(
        [
            "config",
            "req/s @64",
            "× aiohttp",
            "p50 @64 ms",
            "p99 @64 ms",
            "p50 @1 ms",
            "p99 @1 ms",
            "CPU µs/req",
            "× aiohttp",
            "× nginx",
            "spans dropped",
            "other load @64/@1",
        ],
        [
            [
                label,
                _fmt(_get(figures, c, "rps_64")),
                _fmt(ratio(figures, c, AIOHTTP, "rps_64"), 2),
                _fmt(_get(figures, c, "p50_64"), 2, 1e3),
                _fmt(_get(figures, c, "p99_64"), 2, 1e3),
                _fmt(_get(figures, c, "p50_1"), 2, 1e3),
                _fmt(_get(figures, c, "p99_1"), 2, 1e3),
                _fmt(_get(figures, c, "cpu_us"), 0),
                _fmt(ratio(figures, c, AIOHTTP, "cpu_us"), 2),
                _fmt(ratio(figures, c, NGINX, "cpu_us"), 1),
                _fmt(_get(figures, c, "spans_dropped")),
                f"{_fmt(_get(figures, c, 'foreign_64'), 2)} / {_fmt(_get(figures, c, 'foreign_1'), 2)}",
            ]
            for c, label in present
        ],
    )
    lines += ["", "### Memory, start-up and streaming (256 MiB each way)", ""]
    lines += _table(
        [
            "config",
            "idle RSS MiB",
            "peak RSS MiB",
            "start-up ms",
            "download MB/s",
            "% nginx",
            "RSS growth MiB",
            "upload MB/s",
            "% nginx",
            "RSS growth MiB",
        ],
        [
            [
                label,
                _fmt(_get(figures, c, "idle_rss"), 1, 1 / MIB),
                _fmt(_get(figures, c, "peak_rss"), 1, 1 / MIB),
                _fmt(_get(figures, c, "startup"), 0, 1e3),
                _fmt(_get(figures, c, "download_mbps")),
                _fmt(ratio(figures, c, NGINX, "download_mbps"), 0, 100),
                _fmt(_get(figures, c, "download_rss_growth"), 1, 1 / MIB),
                _fmt(_get(figures, c, "upload_mbps")),
                _fmt(ratio(figures, c, NGINX, "upload_mbps"), 0, 100),
                _fmt(_get(figures, c, "upload_rss_growth"), 1, 1 / MIB),
            ]
            for c, label in present
        ],
    )
    workers = [(c, label) for c, label in WORKERS if c in figures]
    if workers:
        lines += ["", "### Workers (mes-trace-proxy, tracing on over OTLP/HTTP, both cores)", ""]
        lines += _table(
            ["config", "req/s @64", "× 1 worker", "CPU µs/req"],
            [
                [
                    label,
                    _fmt(_get(figures, c, "rps_64")),
                    _fmt(ratio(figures, c, "workers-1", "rps_64"), 2),
                    _fmt(_get(figures, c, "cpu_us")),
                ]
                for c, label in workers
            ],
        )
    if orders is not None:
        lines += [
            "",
            "### Order book",
            "",
            f"{orders['orders']:,.0f} orders ({orders['changes']:,.0f} status changes): "
            f"RSS grew {orders['rss_growth_bytes'] / MIB:,.0f} MiB "
            f"({orders['bytes_per_order']:.0f} bytes per order); `OrderBook.apply` took "
            f"{orders['apply_us']:.1f} µs on average.",
        ]
    lines += ["", "### Targets (issue 6)", ""]
    lines += _table(
        ["target", "measured", "result"],
        [
            [v.target, v.measured, "—" if v.passed is None else ("pass" if v.passed else "**FAIL**")]
            for v in verdicts
        ],
    )
    return "\n".join(lines) + "\n"
