"""The benchmark harness's pure parts: wrk and /proc parsing, ratios, targets, tables, profiles.

No load runs here: the figures themselves come from ``make bench``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import nginx, report
from bench.procfs import Memory, parse_stat, parse_status, parse_system_busy
from bench.profile import by_component, component, inclusive, parse_collapsed, short_frame, top_frames
from bench.run import parse_span_counts, rotated
from bench.wrk import STATUS_BODY, WRK_SCRIPT, parse_duration, parse_wrk_output, wrk_command

WRK_64 = """Running 10s test @ http://127.0.0.1:41235
  1 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    12.31ms    3.02ms  61.83ms   85.17%
    Req/Sec     5.21k   312.45     5.80k    71.00%
  Latency Distribution
     50%   11.86ms
     75%   13.27ms
     90%   15.40ms
     99%   24.13ms
  51873 requests in 10.00s, 9.94MB read
Requests/sec:   5186.34
Transfer/sec:      0.99MB
"""

WRK_1_WITH_ERRORS = """Running 6s test @ http://127.0.0.1:41235
  1 threads and 1 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   402.11us  101.20us   2.01ms   91.00%
    Req/Sec     2.48k    80.11     2.60k    70.00%
  Latency Distribution
     50%  381.00us
     75%  410.00us
     90%  455.00us
     99%    1.02ms
  14880 requests in 6.00s, 2.85MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 4
Requests/sec:   2479.87
Transfer/sec:    486.12KB
"""

STAT = (
    "4242 (python -m mes (x) y) S 4200 4242 4200 0 -1 4194560 18012 0 0 0 "
    "1234 567 8 9 20 0 3 0 98765 301989888 13579 18446744073709551615 1 1 0 0 0 0 0 16781312 2 0 0 0 "
    "17 0 0 0 0 0 0 0 0 0 0 0 0 0 0\n"
)

STATUS = """Name:\tpython
Umask:\t0022
State:\tS (sleeping)
VmPeak:\t  512000 kB
VmHWM:\t   64000 kB
VmRSS:\t   52000 kB
Threads:\t3
"""


def test_parse_wrk_output_64_connections() -> None:
    """A --latency report yields totals, rate and every percentile in seconds."""
    result = parse_wrk_output(WRK_64)
    assert result.requests == 51873
    assert result.duration == pytest.approx(10.0)
    assert result.requests_per_second == pytest.approx(5186.34)
    assert (result.p50, result.p75, result.p90, result.p99) == pytest.approx(
        (11.86e-3, 13.27e-3, 15.40e-3, 24.13e-3)
    )
    assert result.errors == 0


def test_parse_wrk_output_counts_errors_and_microseconds() -> None:
    """Socket errors and non-2xx answers are counted; `us` percentiles are microseconds."""
    result = parse_wrk_output(WRK_1_WITH_ERRORS)
    assert result.p50 == pytest.approx(381e-6)
    assert result.p99 == pytest.approx(1.02e-3)
    assert (result.non_2xx, result.socket_errors, result.errors) == (4, 3, 7)


def test_parse_wrk_output_without_latency_flag_is_refused() -> None:
    """wrk run without --latency has no distribution: the parser says so instead of guessing."""
    text = WRK_64.replace("     99%   24.13ms\n", "")
    with pytest.raises(ValueError, match=r"\[99\] percentiles"):
        parse_wrk_output(text)
    with pytest.raises(ValueError, match="no request totals"):
        parse_wrk_output("unable to connect to 127.0.0.1:1 Connection refused\n")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("812.00us", 812e-6), ("1.23ms", 1.23e-3), ("10.00s", 10.0), ("1.50m", 90.0), ("2h", 7200.0)],
    ids=["us", "ms", "s", "m", "h"],
)
def test_parse_duration(text: str, seconds: float) -> None:
    """Every unit wrk prints converts to seconds."""
    assert parse_duration(text) == pytest.approx(seconds)


def test_parse_duration_rejects_other_text() -> None:
    """A value without a wrk unit is an error."""
    with pytest.raises(ValueError, match="not a wrk duration"):
        parse_duration("12 parsecs")


def test_wrk_command_and_script() -> None:
    """The command asks for --latency on one thread; the script PUTs the ~150-byte body with a traceparent."""
    argv = wrk_command("http://127.0.0.1:1", "/tmp/s.lua", connections=64, seconds=10)
    assert argv[:4] == ["wrk", "--latency", "-t1", "-c64"]
    assert "-d10s" in argv
    assert argv[-1] == "http://127.0.0.1:1"
    assert 140 <= len(STATUS_BODY) <= 160
    assert '"PUT"' in WRK_SCRIPT
    assert "traceparent" in WRK_SCRIPT
    assert "/status" in WRK_SCRIPT


def test_parse_stat_with_parentheses_and_spaces_in_the_command() -> None:
    """The command may hold spaces and ')': fields are counted from the last ')'."""
    stat = parse_stat(STAT)
    assert (stat.pid, stat.comm, stat.ppid) == (4242, "python -m mes (x) y", 4200)
    assert (stat.utime, stat.stime, stat.cutime, stat.cstime) == (1234, 567, 8, 9)
    assert stat.ticks == 1234 + 567 + 8 + 9


def test_parse_stat_rejects_garbage() -> None:
    """Something that is not a stat line is an error, not zeros."""
    with pytest.raises(ValueError, match="not a /proc/PID/stat line"):
        parse_stat("hello")
    with pytest.raises(ValueError, match="fields"):
        parse_stat("1 (x) S 0 1")


def test_parse_status_reads_rss_and_peak_in_bytes() -> None:
    """VmRSS and VmHWM are read in kB and returned in bytes."""
    assert parse_status(STATUS) == Memory(rss=52000 * 1024, hwm=64000 * 1024)
    with pytest.raises(ValueError, match="VmRSS"):
        parse_status("Name:\tkthreadd\nState:\tS\n")


def test_parse_system_busy_excludes_idle_and_iowait() -> None:
    """Busy ticks are user+nice+system+irq+softirq+steal, not idle or iowait."""
    text = "cpu  100 2 30 5000 40 5 6 7 0 0\ncpu0 50 1 15 2500 20 2 3 3 0 0\nintr 1 2 3\n"
    assert parse_system_busy(text) == 100 + 2 + 30 + 5 + 6 + 7
    with pytest.raises(ValueError, match="cpu line"):
        parse_system_busy("intr 1\n")


def test_parse_span_counts() -> None:
    """The export counters are read by outcome from the proxy's /metrics."""
    text = (
        "# TYPE mes_proxy_spans counter\n"
        'mes_proxy_spans_total{outcome="queued"} 60000.0\n'
        'mes_proxy_spans_total{outcome="exported"} 59488.0\n'
        'mes_proxy_spans_total{outcome="dropped_queue_full"} 12.0\n'
        'mes_proxy_requests_total{listener="ingress"} 3.0\n'
    )
    assert parse_span_counts(text) == {"queued": 60000.0, "exported": 59488.0, "dropped_queue_full": 12.0}


def test_rotated_order_differs_per_round() -> None:
    """Each round starts with a different configuration and keeps every one."""
    items = ["a", "b", "c"]
    assert rotated(items, 0) == ["a", "b", "c"]
    assert rotated(items, 1) == ["b", "c", "a"]
    assert rotated(items, 4) == ["b", "c", "a"]
    assert rotated([], 3) == []


def test_medians_over_rounds() -> None:
    """Each metric's median is taken over the rounds that have it."""
    rounds = {"aiohttp": [{"cpu_us": 150.0, "rps_64": 5000.0}, {"cpu_us": 170.0}, {"cpu_us": 160.0}]}
    assert report.medians(rounds) == {"aiohttp": {"cpu_us": 160.0, "rps_64": 5000.0}}


FIGURES: dict[str, dict[str, float]] = {
    "nginx": {"cpu_us": 12.0, "rps_64": 40000.0, "download_mbps": 1000.0, "upload_mbps": 600.0},
    "aiohttp": {"cpu_us": 160.0, "rps_64": 5000.0, "p99_1": 0.5e-3},
    "proxy-off": {"cpu_us": 150.0, "idle_rss": 50 * report.MIB, "startup": 0.4},
    "proxy-http": {
        "cpu_us": 436.0,
        "rps_64": 2000.0,
        "p99_1": 12e-3,
        "download_mbps": 600.0,
        "upload_mbps": 250.0,
        "download_rss_growth": 2 * report.MIB,
        "upload_rss_growth": 20 * report.MIB,
        "idle_rss": 60 * report.MIB,
        "startup": 0.5,
        "foreign_64": 0.3,
    },
    "workers-1": {"rps_64": 2000.0},
    "workers-2": {"rps_64": 3600.0},
}


def test_ratio() -> None:
    """Ratios divide by the base configuration; missing or zero figures give None."""
    assert report.ratio(FIGURES, "proxy-http", "aiohttp", "cpu_us") == pytest.approx(436 / 160)
    assert report.ratio(FIGURES, "proxy-http", "nginx", "cpu_us") == pytest.approx(436 / 12)
    assert report.ratio(FIGURES, "proxy-grpc", "aiohttp", "cpu_us") is None
    assert report.ratio({"a": {"x": 1.0}, "b": {"x": 0.0}}, "a", "b", "x") is None


def test_evaluate_targets() -> None:
    """Each target passes or fails on its threshold, and is unmeasured when its figure is missing."""
    verdicts = {v.target: v for v in report.evaluate_targets(FIGURES, orders_rss=250 * report.MIB)}
    assert verdicts["proxy-http: CPU/request ≤ 1.15 × plain aiohttp"].passed is False
    assert verdicts["proxy-http: CPU/request ≤ 1.15 × plain aiohttp"].measured == "2.73 ×"
    assert verdicts["proxy-http: p99 @1 conn ≤ plain aiohttp + 0.5 ms"].passed is False
    assert verdicts["proxy-grpc: CPU/request ≤ 1.15 × plain aiohttp"].passed is None
    assert verdicts["proxy-off: CPU/request ≤ 1.0 × plain aiohttp"].passed is True
    assert verdicts["proxy-http: 256 MiB download ≥ 50 % of nginx's MB/s"].passed is True
    assert verdicts["proxy-http: 256 MiB upload ≥ 50 % of nginx's MB/s"].passed is False
    assert verdicts["proxy-http: RSS growth in the download < 16 MiB"].passed is True
    assert verdicts["proxy-http: RSS growth in the upload < 16 MiB"].passed is False
    assert verdicts["--workers 2 ≥ 1.7 × the requests/s of one worker"].passed is True
    assert verdicts["idle RSS < 80 MiB (largest mes-trace-proxy config)"].measured == "60.0 MiB"
    assert verdicts["start-up to ready < 1 s (slowest mes-trace-proxy config)"].measured == "500 ms"
    assert verdicts["1 million tracked orders < 300 MiB"].passed is True


def test_a_run_that_dropped_spans_cannot_pass_the_cpu_target() -> None:
    """A low CPU figure bought by dropping spans fails, and says why."""
    cheap = {
        **FIGURES,
        "proxy-http": {**FIGURES["proxy-http"], "cpu_us": 170.0, "spans_dropped": 75_574.0},
    }
    verdict = {v.target: v for v in report.evaluate_targets(cheap, orders_rss=None)}[
        "proxy-http: CPU/request ≤ 1.15 × plain aiohttp"
    ]
    assert verdict.passed is False
    assert verdict.measured == "1.06 × with 75,574 spans dropped: not comparable"
    clean = {**cheap, "proxy-http": {**cheap["proxy-http"], "spans_dropped": 0.0}}
    verdict = {v.target: v for v in report.evaluate_targets(clean, orders_rss=None)}[
        "proxy-http: CPU/request ≤ 1.15 × plain aiohttp"
    ]
    assert verdict.passed is True


def test_render_markdown_has_ratios_targets_and_noise_warning() -> None:
    """The tables carry the figures, both ratio columns, the verdicts and the noisy-machine warning."""
    verdicts = report.evaluate_targets(FIGURES, orders_rss=None)
    orders = {"orders": 1e6, "changes": 4.5e6, "rss_growth_bytes": 350 * report.MIB, "bytes_per_order": 367.0}
    text = report.render_markdown(
        FIGURES, orders={**orders, "apply_us": 3.5}, verdicts=verdicts, heading="## run"
    )
    lines = text.splitlines()
    http_row = next(line for line in lines if line.startswith("| mes-trace-proxy, tracing on, OTLP/HTTP |"))
    cells = [cell.strip() for cell in http_row.strip("|").split("|")]
    # req/s, × aiohttp, 4 latencies, CPU µs, × aiohttp, × nginx
    assert cells[1:3] == ["2,000", "0.40"]
    assert cells[7:10] == ["436", "2.73", "36.3"]
    assert "**Noisy machine:**" in text
    assert "| --workers 2, not pinned | 3,600 | 1.80 | — |" in text
    assert "1,000,000 orders" in text
    assert "| 1 million tracked orders < 300 MiB | not measured | — |" in text
    assert "**FAIL**" in text
    assert "| nginx proxy_pass, keep-alive pool | 40,000 | 8.00 |" in text


def test_nginx_configs() -> None:
    """The upstream answers the status route and reads uploads whole; the peer keeps a pool and streams."""
    upstream = nginx.upstream_config(prefix=Path("/tmp/b"), port=8081, blob=Path("/tmp/b/m"))
    assert "listen 127.0.0.1:8081" in upstream
    assert nginx.STATUS_ANSWER in upstream
    assert "echo_read_request_body;" in upstream
    assert "master_process off;" in upstream
    assert upstream.count("{") == upstream.count("}")
    peer = nginx.peer_config(prefix=Path("/tmp/b"), port=8080, upstream_port=8081)
    assert "server 127.0.0.1:8081;" in peer
    assert "keepalive 64;" in peer
    assert "proxy_request_buffering off;" in peer
    assert peer.count("{") == peer.count("}")


RAW_PROFILE = (
    "_run (/usr/lib/python3.11/asyncio/runners.py:118);handle (/work/x/mes_trace_proxy/proxy.py:300);"
    "write (/work/x/mes_trace_proxy/logs.py:80) 30\n"
    "_run (/usr/lib/python3.11/asyncio/runners.py:118);handle (/work/x/mes_trace_proxy/proxy.py:310);"
    "_request (/v/lib/python3.11/site-packages/aiohttp/client.py:700) 50\n"
    "BatchExportProcessor._run (/work/x/mes_trace_proxy/tracing.py:206);"
    "export (/v/lib/python3.11/site-packages/opentelemetry/exporter/otlp/proto/http/trace_exporter/"
    "__init__.py:179);_encode_span (/v/lib/python3.11/site-packages/opentelemetry/exporter/otlp/proto/"
    "common/_internal/trace_encoder/__init__.py:90) 20\n"
    "BatchExportProcessor._run (/work/x/mes_trace_proxy/tracing.py:206);exists (<frozen genericpath>:19) 10\n"
    " 4\n"
)


def test_short_frame_drops_lines_and_prefixes() -> None:
    """Files are shortened to their package path and the line number is dropped."""
    assert (
        short_frame("_request (/v/lib/python3.11/site-packages/aiohttp/client.py:700)")
        == "_request (aiohttp/client.py)"
    )
    assert short_frame("handle (/work/x/mes_trace_proxy/proxy.py:300)") == "handle (mes_trace_proxy/proxy.py)"
    assert short_frame("run (/usr/lib/python3.11/asyncio/runners.py:118)") == "run (asyncio/runners.py)"
    assert short_frame("<module> (<frozen runpy>)") == "<module> (<frozen runpy>)"


def test_profile_top_frames_and_components() -> None:
    """Own time is the innermost frame's, total time any frame's; components follow the file."""
    stacks = parse_collapsed(RAW_PROFILE)
    own, total = top_frames(stacks, 3)
    assert [frame for frame, _ in own] == [
        "_request (aiohttp/client.py)",
        "write (mes_trace_proxy/logs.py)",
        "_encode_span (opentelemetry/exporter/otlp/proto/common/_internal/trace_encoder/__init__.py)",
    ]
    assert [share for _, share in own] == pytest.approx([50 / 114, 30 / 114, 20 / 114])
    # The loop's entry frame (asyncio/runners.py) is on every stack of its thread: left out.
    assert [frame for frame, _ in total[:2]] == [
        "handle (mes_trace_proxy/proxy.py)",
        "_request (aiohttp/client.py)",
    ]
    assert [share for _, share in total[:2]] == pytest.approx([80 / 114, 50 / 114])
    shares = dict(by_component(stacks))
    assert shares["aiohttp client"] == pytest.approx(50 / 114)
    assert shares["our code (mes_trace_proxy)"] == pytest.approx(30 / 114)
    assert shares["span export (encoding, transport)"] == pytest.approx(30 / 114)
    assert shares["other"] == pytest.approx(4 / 114)
    assert component("f (opentelemetry/sdk/trace/__init__.py)") == (
        "OpenTelemetry API/SDK (spans, context, propagation)"
    )
    assert inclusive(stacks, ["handle", "_encode_span", "absent"]) == [
        ("handle", pytest.approx(80 / 114)),
        ("_encode_span", pytest.approx(20 / 114)),
        ("absent", 0.0),
    ]
    with pytest.raises(ValueError, match="collapsed-stack"):
        parse_collapsed("no count here\n")


async def test_handler_benchmark_runs_the_real_handler_against_its_stand_ins(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """bench.handler drives proxy.handle: every request answered, the order book fed, spans exported."""
    import asyncio

    from bench import handler

    async with handler._proxy("none", None, access_log=False) as state:
        per_request = await handler._one_round(state, 50)
        assert per_request > 0
        assert state.orders is not None
        assert len(state.orders) == 50
        conn = handler._Sink()
        (message, payload), *_ = handler._requests(1, asyncio.get_running_loop())
        from mes_trace_proxy.http1 import IncomingRequest
        from mes_trace_proxy.proxy import handle

        await handle(state, IncomingRequest(conn, message, payload))
        assert conn.written > len(handler.ANSWER.split(b"\r\n\r\n")[1])
    capsys.readouterr()
