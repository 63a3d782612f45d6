"""Tests for ``make demo``: its settings, the proxy command it builds, and real runs in a subprocess."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Final

import aiohttp
import pytest

from mes_trace_proxy.cli import build_parser as build_cli_parser
from mes_trace_proxy.cli import load_from_args
from mes_trace_proxy.demo import runner as demo
from mes_trace_proxy.demo.messages import HOW_TO_ENABLE
from mes_trace_proxy.demo.runner import OPTIONS, DemoError, load_demo_config, proxy_argv, proxy_environment
from mes_trace_proxy.sim import crm
from mes_trace_proxy.sim.mes import share_hit
from mes_trace_proxy.sim.rabbitmq import rabbitmq_script

# A cold interpreter with every import, four seconds of traffic and the drain: well under this.
RUN_TIMEOUT: Final = 90.0
# After SIGTERM the demo stops the proxy (2 s drain) and prints its summary.
STOP_TIMEOUT: Final = 30.0
# A short run that still shows the whole story: 40 orders at 10 a second, the lifecycle twenty
# times faster, and a one-second dwell limit so orders left behind early are found stuck.
FAST_RUN: Final = ("--seconds", "4", "--time-scale", "0.05", "--rate", "10", "--dwell", "1s")
ORDER_ID: Final = re.compile(r"\bORD-0-\d{5}\b")
SUMMARY_LABELS: Final = (
    "  requests:",
    "  spans exported:",
    "  orders by status",
    "  stuck orders:",
    "  open them:",
)


def _clean_environ(**extra: str) -> dict[str, str]:
    """The test's environment without the developer's demo, proxy or collector settings."""
    prefixes = ("DEMO_", "MES_PROXY_", "OTEL_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    # The demo runs with another working directory: this checkout's code, not an installed copy.
    repo = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo, env.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return env


def _run_demo(args: list[str], env: Mapping[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run the demo to its end; on a timeout stop it by PID with SIGTERM so it stops its own child."""
    process = subprocess.Popen(
        [sys.executable, "-m", "mes_trace_proxy.demo", *args],
        cwd=cwd,
        env=dict(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = process.communicate(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.terminate()
        try:
            out, err = process.communicate(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            out, err = process.communicate()
        pytest.fail(f"demo did not finish in {RUN_TIMEOUT} s:\n{out}\n{err}")
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


# ── settings ─────────────────────────────────────────────────────────────────────────────────


def test_defaults_are_the_documented_ones() -> None:
    """With no flag and no variable the demo runs 60 s, two orders a second, 10 s dwell limits."""
    cfg = load_demo_config({}, {})
    assert (cfg.seconds, cfg.rate, cfg.dwell, cfg.keep) == (60.0, 2.0, 10.0, False)
    assert cfg.orders == 112  # two a second for the first 56 s: the last has 4 s to finish
    assert dict(cfg.dwell_limits) == {"SUBMITTED": 10.0, "MANUFACTURING_APPROVED": 10.0}
    assert cfg.output == Path("demo-output")


def test_flag_beats_variable_beats_default() -> None:
    """A flag wins over its variable, and the variable over the default; DEMO_KEEP=1 keeps."""
    environ = {"DEMO_SECONDS": "30", "DEMO_RATE": "5", "DEMO_KEEP": "1"}
    cfg = load_demo_config({"seconds": "7"}, environ)
    assert (cfg.seconds, cfg.rate, cfg.keep) == (7.0, 5.0, True)


# One value each kind must refuse; every option's kind is covered (the test below checks).
BAD_VALUES: Final = {
    "seconds": "0",
    "bool": "maybe",
    "rate": "-1",
    "scale": "fast",
    "int": "1.5",
    "duration": "0s",
    "share": "1.5",
    "listen": "8080",
    "path": None,  # any text is a path
    "url": "ftp://jaeger",
}


@pytest.mark.parametrize(
    "option", [o for o in OPTIONS if BAD_VALUES[o.kind] is not None], ids=lambda o: o.dest
)
@pytest.mark.parametrize("source", ["flag", "env"])
def test_a_bad_value_names_its_flag_or_variable(option: demo.DemoOption, source: str) -> None:
    """Each bad setting is refused with the flag or the variable it came from named."""
    bad = BAD_VALUES[option.kind]
    assert bad is not None
    flags, environ = ({option.dest: bad}, {}) if source == "flag" else ({}, {option.env: bad})
    with pytest.raises(DemoError) as caught:
        load_demo_config(flags, environ)
    assert caught.value.key == (option.flag if source == "flag" else option.env)


def test_every_option_kind_has_a_bad_value_case() -> None:
    """A new kind of option cannot slip past the bad-value test above."""
    assert {option.kind for option in OPTIONS} <= set(BAD_VALUES)


def test_bad_setting_exits_2_with_the_flag_named(capsys: pytest.CaptureFixture[str]) -> None:
    """`--seconds 0` stops before anything starts: exit 2 and a one-line message, no traceback."""
    assert demo.main(["--seconds", "0"], environ={}) == demo.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("demo: --seconds: ")
    assert "Traceback" not in err


def test_proxy_command_is_accepted_by_the_real_cli(tmp_path: Path) -> None:
    """The proxy's argv parses with the real CLI and loads: both listeners, admin, limits, SQLite state."""
    cfg = load_demo_config({"dwell": "3s"}, {})
    argv = proxy_argv(
        cfg, mes_url="http://127.0.0.1:1", crm_url="http://127.0.0.1:2", state=tmp_path / "o.db", python="py"
    )
    assert argv[:4] == ["py", "-m", "mes_trace_proxy", "serve"]
    config = load_from_args(build_cli_parser().parse_args(argv[3:]), environ={})
    assert [(lst.name, lst.upstream.url, lst.listen.port) for lst in config.listeners] == [
        ("ingress", "http://127.0.0.1:1", 0),
        ("egress", "http://127.0.0.1:2", 0),
    ]
    assert config.admin.listen.port == 0
    assert config.lifecycle.dwell_limit("SUBMITTED") == 3.0
    assert config.lifecycle.dwell_limit("MANUFACTURING_APPROVED") == 3.0
    assert config.watchdog.state == f"sqlite:///{tmp_path / 'o.db'}"
    assert config.watchdog.check_interval == demo.CHECK_INTERVAL
    assert config.server.grace_period == 2.0


def test_proxy_environment_aims_spans_at_the_sink() -> None:
    """The shell's MES_PROXY_* and OTLP settings are dropped; the sink and a fast export delay go in."""
    environ = {
        "MES_PROXY_CONFIG": "/etc/x.yaml",
        "OTEL_EXPORTER_OTLP_HEADERS": "a=b",
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc",
        "OTEL_SERVICE_NAME": "mes-api-demo",
        "PATH": "/bin",
    }
    env = proxy_environment(environ, "http://127.0.0.1:5/v1/traces")
    assert env == {
        "OTEL_SERVICE_NAME": "mes-api-demo",
        "PATH": "/bin",
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:5/v1/traces",
        "OTEL_BSP_SCHEDULE_DELAY": demo.BSP_DELAY_MS,
        "PYTHONUNBUFFERED": "1",
    }


def test_proxy_environment_keeps_the_users_collector() -> None:
    """With OTEL_EXPORTER_OTLP_ENDPOINT set, the user's collector settings reach the proxy as they are."""
    environ = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://jaeger:4317", "OTEL_BSP_SCHEDULE_DELAY": "100"}
    assert demo.external_endpoint(environ) == "http://jaeger:4317"
    env = proxy_environment(environ, None)
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4317"
    assert env["OTEL_BSP_SCHEDULE_DELAY"] == "100"


# ── real runs ────────────────────────────────────────────────────────────────────────────────


def _stuck_ids(stdout: str) -> list[str]:
    """The order ids the summary lists under 'stuck orders:'."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("  stuck orders:"))
    ids = []
    for line in lines[start + 1 :]:
        if not line.startswith("      "):
            break
        ids += ORDER_ID.findall(line)
    return ids


def test_demo_runs_summarises_and_writes_clean_spans(tmp_path: Path) -> None:
    """A short run exits 0 with the summary; the file has order spans from both listeners and no canary."""
    out = tmp_path / "out"
    result = _run_demo([*FAST_RUN, "--output", str(out)], _clean_environ(), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    for label in SUMMARY_LABELS:
        assert any(line.startswith(label) for line in result.stdout.splitlines()), label
    assert f"{out / 'spans.jsonl'}" in result.stdout or "out/spans.jsonl" in result.stdout

    spans = [json.loads(line) for line in (out / "spans.jsonl").read_text(encoding="utf-8").splitlines()]
    proxy_server = [
        s for s in spans if s["resource"].get("service.name") == "mes-api" and s["kind"] == "SERVER"
    ]
    with_order = [s for s in proxy_server if "mes.order.id" in s["attributes"]]
    assert with_order
    routes = {s["attributes"].get("http.route") for s in with_order}
    assert "/api/v1/orders/{orderId}/price-calculation" in routes  # CRM → proxy ingress → MES
    assert "/api/orders/{orderId}/price" in routes  # MES → proxy egress → CRM
    assert {s["resource"].get("service.name") for s in spans} >= {"mes-api", "crm-api"}
    text = (out / "spans.jsonl").read_text(encoding="utf-8")
    assert crm.CANARY_NAME not in text
    assert "@example.com" not in text

    # The most overdue stuck order is one the MES simulator's faults hit (seed 0, 10 % each);
    # the early ones are past any doubt about the end of the run.
    stuck = _stuck_ids(result.stdout)
    assert stuck
    assert share_hit(0, "price-drop", stuck[0], 0.1) or share_hit(0, "pickup-drop", stuck[0], 0.1)
    assert "mes-trace-proxy ready" in (out / "proxy.log").read_text(encoding="utf-8")
    # The message path: with rabbitmq-server, dead letters listed with causes and one re-drive;
    # without it, one line that says how to turn it on.
    if rabbitmq_script() is not None:
        assert "price request expired in mes.price.requests after 1 s" in result.stdout
        assert "re-drive ORD-MQ-0001: redriven; MES priced it: back on track" in result.stdout
    else:
        assert HOW_TO_ENABLE in result.stdout


async def _read_until(stream: asyncio.StreamReader, marker: str, timeout: float) -> str:  # noqa: ASYNC109
    """Lines from ``stream`` up to the one holding ``marker``; fails after ``timeout`` seconds."""
    seen: list[str] = []

    async def read() -> str:
        while line := (await stream.readline()).decode():
            seen.append(line)
            if marker in line:
                return "".join(seen)
        raise AssertionError(f"{marker!r} never came:\n{''.join(seen)}")

    return await asyncio.wait_for(read(), timeout)


async def test_keep_serves_the_admin_until_a_signal(tmp_path: Path) -> None:
    """With --keep the proxy's admin answers after the summary, and SIGINT ends the demo with 0."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mes_trace_proxy.demo",
        *FAST_RUN[2:],
        "--seconds",
        "1",
        "--keep",
        "--output",
        str(tmp_path / "out"),
        cwd=tmp_path,
        env=_clean_environ(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    try:
        shown = await _read_until(process.stdout, "Kept running", RUN_TIMEOUT)
        assert "  stuck orders:" in shown
        admin = re.search(r"Kept running \(DEMO_KEEP\): admin (http://\S+?)/,", shown)
        assert admin is not None
        async with aiohttp.ClientSession() as session, session.get(f"{admin[1]}/healthz") as response:
            assert response.status == 200
        process.send_signal(signal.SIGINT)
        await asyncio.wait_for(process.wait(), STOP_TIMEOUT)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A loopback port this test holds open, so whoever else asks for it finds it busy."""
    with socket.create_server(("127.0.0.1", 0)) as sock:
        yield sock.getsockname()[1]


@pytest.mark.parametrize(
    ("variable", "who"),
    [("DEMO_ADMIN_LISTEN", "admin listener"), ("DEMO_MES_LISTEN", "MES simulator")],
    ids=["proxy-child", "simulator"],
)
def test_busy_fixed_port_is_a_clear_message(tmp_path: Path, busy_port: int, variable: str, who: str) -> None:
    """A fixed port that is taken ends the demo with exit 1 and one clear line, no traceback."""
    env = _clean_environ(**{variable: f"127.0.0.1:{busy_port}"})
    result = _run_demo(["--seconds", "2", "--output", str(tmp_path / "out")], env, cwd=tmp_path)
    assert result.returncode == demo.EXIT_FAILED
    assert "Traceback" not in result.stderr
    assert who in result.stderr
    assert f"cannot listen on 127.0.0.1:{busy_port}" in result.stderr
    assert variable in result.stderr
