"""``make demo``: the MES simulator, the real proxy (a child process) and CRM traffic, all on loopback.

It runs the traffic for a bounded time with a progress line, then prints what the proxy saw:
requests, spans exported, orders per status, stuck orders, and where to open them.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import logging
import math
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import BinaryIO, Final, TextIO, TypeVar
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

from mes_trace_proxy.core.config import parse_duration
from mes_trace_proxy.demo.messages import MessageDemo, MessageDemoResult, message_summary_lines
from mes_trace_proxy.demo.report import (
    DEFAULT_SERVICE,
    STUCK_REASONS,
    DemoResult,
    MetricsView,
    ProxyAddresses,
    SpanScan,
    choose_stuck,
    parse_metrics,
    parse_ready_line,
    problems,
    progress_line,
    scan_spans,
    show_path,
    stuck_in_store,
    summary_lines,
)
from mes_trace_proxy.sim import crm, mes
from mes_trace_proxy.sim.otlp_sink import OtlpSink
from mes_trace_proxy.telemetry.logs import JsonFormatter

__all__ = [
    "OPTIONS",
    "DemoConfig",
    "DemoError",
    "DemoOption",
    "DemoPaths",
    "build_parser",
    "external_endpoint",
    "load_demo_config",
    "main",
    "proxy_argv",
    "proxy_environment",
]

_T = TypeVar("_T")

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2
EXIT_INTERRUPTED: Final = 130  # the shell's convention for "ended by Ctrl+C"


# A day bounds a typo in DEMO_SECONDS; longer runs are the soak's job (make soak).
MAX_SECONDS: Final = 86400.0
# 1000 orders a second is a benchmark, not a demo (make bench).
MAX_RATE: Final = 1000.0
# The watchdog looks every second, so the summary is at most a second behind the orders.
CHECK_INTERVAL: Final = 1.0
# Loopback requests finish in milliseconds; a 2 s drain keeps Ctrl+C and the end quick.
GRACE_PERIOD: Final = "2s"
# The proxy exports every 0.5 s instead of the SDK's 5 s, so the progress line and the summary
# count spans that are already in the collector.
BSP_DELAY_MS: Final = "500"
# A cold Python start with every import takes 1-2 s; 30 s covers a loaded CI machine.
READY_TIMEOUT: Final = 30.0
# The proxy's 2 s drain plus its final span flush, with room to spare.
STOP_TIMEOUT: Final = 10.0
# After SIGKILL the kernel reaps at once; 5 s only guards against a wedged wait.
KILL_TIMEOUT: Final = 5.0
# Admin calls go over loopback; two seconds means the proxy is wedged.
HTTP_TIMEOUT: Final = 2.0
# Ten export periods of 0.5 s for the last spans to leave the proxy.
DRAIN_TIMEOUT: Final = 5.0
DRAIN_POLL: Final = 0.2  # five scrapes a second of a loopback endpoint cost nothing
# One order's simulated life from submit to CLOSED with the simulators' defaults: 1 s price,
# 0.5 s confirm, 0.5 s dashboard poll, four more 0.5 s operator steps.
LIFECYCLE_SECONDS: Final = 4.0
# A terminal gets one line redrawn every second; a log (CI, a pipe) a line every 5 s.
PROGRESS_TTY_EVERY: Final = 1.0
PROGRESS_LOG_EVERY: Final = 5.0
# The last lines of the proxy's stderr quoted when it fails to start.
STDERR_TAIL: Final = 20
# The proxy writes JSON lines of a few hundred bytes; 64 KiB reads, 1 MiB at most per line.
PUMP_CHUNK: Final = 64 * 1024
MAX_LINE: Final = 1024 * 1024
# Ctrl+C, `kill`, and a closed terminal: each stops the children by PID and prints the summary.
HANDLED_SIGNALS: Final = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class DemoError(Exception):
    """A problem the user can fix; ``key`` names the flag, variable or part at fault."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


# ── options: one table for flags, variables, defaults and parsers ──────────────────────────


@dataclass(frozen=True, slots=True, kw_only=True)
class DemoOption:
    """One demo setting: its flag, its environment variable, its default and how it is read."""

    dest: str
    flag: str
    env: str
    default: str
    kind: str
    help: str


#: Every demo setting; docs/configuration.md lists each flag and variable (tests/test_docs.py).
OPTIONS: Final = (
    DemoOption(
        dest="seconds", flag="--seconds", env="DEMO_SECONDS", default="60", kind="seconds",
        help="how long the CRM traffic runs, in seconds",
    ),
    DemoOption(
        dest="keep", flag="--keep", env="DEMO_KEEP", default="false", kind="bool",
        help="after the summary keep the proxy, its admin page and MES up until Ctrl+C",
    ),
    DemoOption(
        # Two orders a second: 120 orders a minute fill a Jaeger search page; a laptop barely notices.
        dest="rate", flag="--rate", env="DEMO_RATE", default="2", kind="rate",
        help="orders the CRM starts per second",
    ),
    DemoOption(
        dest="time_scale", flag="--time-scale", env="DEMO_TIME_SCALE", default="1", kind="scale",
        help="multiplies every simulated delay (0.05: twenty times faster); dwell limits stay real time",
    ),
    DemoOption(
        dest="seed", flag="--seed", env="DEMO_SEED", default="0", kind="int",
        help="seed of every random choice in MES and CRM (same seed, same stuck orders)",
    ),
    DemoOption(
        # Ten seconds: orders left behind in the first 50 s of a one-minute run are found stuck.
        dest="dwell", flag="--dwell", env="DEMO_DWELL", default="10s", kind="duration",
        help="dwell limit of SUBMITTED and MANUFACTURING_APPROVED (the reference: 15m and 2h)",
    ),
    DemoOption(
        # One order in ten stuck at each fault point: plainly visible, not the whole picture.
        dest="price_drop_rate", flag="--price-drop-rate", env="DEMO_PRICE_DROP_RATE", default="0.1",
        kind="share", help="share of price calculations MES never answers",
    ),
    DemoOption(
        dest="pickup_drop_rate", flag="--pickup-drop-rate", env="DEMO_PICKUP_DROP_RATE", default="0.1",
        kind="share", help="share of approved orders MES hides from the operator dashboard",
    ),
    DemoOption(
        dest="listen", flag="--listen", env="DEMO_LISTEN", default="127.0.0.1:0", kind="listen",
        help="proxy ingress listener (port 0: any free port)",
    ),
    DemoOption(
        dest="egress_listen", flag="--egress-listen", env="DEMO_EGRESS_LISTEN", default="127.0.0.1:0",
        kind="listen", help="proxy egress listener (MES → CRM)",
    ),
    DemoOption(
        dest="admin_listen", flag="--admin-listen", env="DEMO_ADMIN_LISTEN", default="127.0.0.1:0",
        kind="listen", help="proxy admin listener (page, /metrics, /orders/-/stuck)",
    ),
    DemoOption(
        dest="mes_listen", flag="--mes-listen", env="DEMO_MES_LISTEN", default="127.0.0.1:0",
        kind="listen", help="the MES simulator",
    ),
    DemoOption(
        dest="crm_listen", flag="--crm-listen", env="DEMO_CRM_LISTEN", default="127.0.0.1:0",
        kind="listen", help="the CRM simulator's callback API (the egress upstream)",
    ),
    DemoOption(
        dest="output", flag="--output", env="DEMO_OUTPUT", default="demo-output", kind="path",
        help="directory for spans.jsonl, proxy.log, simulators.log and the order state",
    ),
    DemoOption(
        dest="jaeger_url", flag="--jaeger-url", env="DEMO_JAEGER_URL", default="http://localhost:16686",
        kind="url", help="Jaeger UI base URL for the links printed and on the admin page",
    ),
)  # fmt: skip


def _number(text: str, low: float, high: float, *, low_open: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None
    too_low = value <= low if low_open else value < low
    if not math.isfinite(value) or too_low or value > high:
        bracket = "(" if low_open else "["
        raise ValueError(f"{text!r} is out of range {bracket}{low:g}, {high:g}]")
    return value


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"{text!r} is not a boolean (use 1 or 0)")


def _parse_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a whole number") from None


def _parse_dwell(text: str) -> float:
    seconds = parse_duration(text)
    if seconds <= 0:
        raise ValueError(f"{text!r}: a dwell limit must be longer than zero")
    return seconds


def _parse_listen(text: str) -> str:
    try:
        host, port = mes.parse_listen(text.strip())
    except argparse.ArgumentTypeError as exc:
        raise ValueError(str(exc)) from None
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _parse_url(text: str) -> str:
    parts = urlsplit(text.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"{text!r} must be an http:// or https:// URL")
    return text.strip().rstrip("/")


_KINDS: Final[Mapping[str, Callable[[str], object]]] = MappingProxyType(
    {
        "seconds": lambda text: _number(text, 0.0, MAX_SECONDS, low_open=True),
        "rate": lambda text: _number(text, 0.0, MAX_RATE, low_open=True),
        "scale": lambda text: _number(text, 0.0, 100.0, low_open=True),
        "share": lambda text: _number(text, 0.0, 1.0, low_open=False),
        "int": _parse_int,
        "bool": _parse_bool,
        "duration": _parse_dwell,
        "listen": _parse_listen,
        "path": lambda text: Path(text).expanduser(),
        "url": _parse_url,
    }
)


@dataclass(frozen=True, slots=True, kw_only=True)
class DemoConfig:
    """What one demo run does; built only by :func:`load_demo_config`."""

    seconds: float
    keep: bool
    rate: float
    time_scale: float
    seed: int
    dwell: float
    price_drop_rate: float
    pickup_drop_rate: float
    listen: str
    egress_listen: str
    admin_listen: str
    mes_listen: str
    crm_listen: str
    output: Path
    jaeger_url: str

    @property
    def orders(self) -> int:
        """Orders the CRM starts: ``rate`` a second, all early enough to finish within the run.

        The last one starts one order lifetime before the end (at most halfway through), so
        every order left behind at the end was left behind by a MES fault, not by the clock.
        """
        launch_window = max(self.seconds - LIFECYCLE_SECONDS * self.time_scale, self.seconds / 2)
        return max(1, math.ceil(self.rate * launch_window))

    @property
    def dwell_limits(self) -> Mapping[str, float]:
        """The demo's short dwell limits, for the statuses its faults leave orders in."""
        return MappingProxyType(dict.fromkeys(STUCK_REASONS, self.dwell))


def _typed(values: Mapping[str, object], key: str, kind: type[_T]) -> _T:
    value = values[key]
    assert isinstance(value, kind), (key, value)
    return value


def load_demo_config(flags: Mapping[str, object], environ: Mapping[str, str]) -> DemoConfig:
    """Build the run's settings: flag, then environment variable, then default.

    Args:
        flags: parsed flags by ``dest`` (``None`` when not given).
        environ: the process environment.

    Returns:
        The validated settings.

    Raises:
        DemoError: naming the flag or variable whose value is wrong.
    """
    values: dict[str, object] = {}
    for option in OPTIONS:
        raw, origin = option.default, f"default of {option.flag}"
        if environ.get(option.env, "") != "":
            raw, origin = environ[option.env], option.env
        flag_value = flags.get(option.dest)
        if flag_value is not None:
            raw, origin = str(flag_value), option.flag
        try:
            values[option.dest] = _KINDS[option.kind](raw)
        except ValueError as exc:
            raise DemoError(origin, str(exc)) from None
    return DemoConfig(
        seconds=_typed(values, "seconds", float),
        keep=_typed(values, "keep", bool),
        rate=_typed(values, "rate", float),
        time_scale=_typed(values, "time_scale", float),
        seed=_typed(values, "seed", int),
        dwell=_typed(values, "dwell", float),
        price_drop_rate=_typed(values, "price_drop_rate", float),
        pickup_drop_rate=_typed(values, "pickup_drop_rate", float),
        listen=_typed(values, "listen", str),
        egress_listen=_typed(values, "egress_listen", str),
        admin_listen=_typed(values, "admin_listen", str),
        mes_listen=_typed(values, "mes_listen", str),
        crm_listen=_typed(values, "crm_listen", str),
        output=_typed(values, "output", Path),
        jaeger_url=_typed(values, "jaeger_url", str),
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m mes_trace_proxy.demo`` argument parser (every value defaults to its variable)."""
    parser = argparse.ArgumentParser(
        prog="python -m mes_trace_proxy.demo",
        description="Run the MES simulator, the proxy and CRM traffic on loopback, then summarise.",
    )
    for option in OPTIONS:
        text = f"{option.help} (env {option.env}, default {option.default})"
        if option.kind == "bool":
            parser.add_argument(option.flag, dest=option.dest, action="store_const", const=True, help=text)
        else:
            parser.add_argument(option.flag, dest=option.dest, default=None, help=text)
    return parser


# ── the proxy child: command line, environment, ready line ─────────────────────────────────


def proxy_argv(cfg: DemoConfig, *, mes_url: str, crm_url: str, state: Path, python: str) -> list[str]:
    """The proxy's command line: both listeners, admin, short dwell limits, SQLite state.

    Args:
        cfg: the run's settings.
        mes_url: the MES simulator (ingress upstream).
        crm_url: the CRM callback API (egress upstream).
        state: the SQLite file for order state.
        python: the interpreter to run.

    Returns:
        The argv of ``python -m mes_trace_proxy serve``.
    """
    argv = [python, "-m", "mes_trace_proxy", "serve"]
    argv += ["--listen", cfg.listen, "--upstream", mes_url]
    argv += ["--egress-listen", cfg.egress_listen, "--egress-upstream", crm_url]
    argv += ["--admin-listen", cfg.admin_listen, "--state", f"sqlite:///{state}"]
    for status, seconds in cfg.dwell_limits.items():
        argv += ["--dwell-limit", f"{status}={seconds:g}s"]
    argv += ["--check-interval", f"{CHECK_INTERVAL:g}s", "--grace-period", GRACE_PERIOD]
    argv += ["--jaeger-url", cfg.jaeger_url]
    return argv


def external_endpoint(environ: Mapping[str, str]) -> str | None:
    """The collector the user runs (``OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT``), or None for the file."""
    return environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")


def proxy_environment(environ: Mapping[str, str], sink_endpoint: str | None) -> dict[str, str]:
    """The proxy child's environment: no ``MES_PROXY_*`` from the shell, spans aimed at the sink.

    Args:
        environ: the demo's environment.
        sink_endpoint: the OtlpSink's OTLP/HTTP traces URL, or None to keep the user's collector.

    Returns:
        The environment for the child.
    """
    # The demo's flags describe the whole proxy; a MES_PROXY_CONFIG left in the shell must not
    # add listeners or rules behind them.
    env = {k: v for k, v in environ.items() if not k.startswith("MES_PROXY_")}
    if sink_endpoint is not None:
        env = {k: v for k, v in env.items() if not k.startswith("OTEL_EXPORTER_OTLP_")}
        env["OTEL_TRACES_EXPORTER"] = "otlp"
        env["OTEL_EXPORTER_OTLP_PROTOCOL"] = "http/protobuf"
        env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] = sink_endpoint
    env.setdefault("OTEL_BSP_SCHEDULE_DELAY", BSP_DELAY_MS)
    # Access-log lines reach proxy.log as they happen, not when a pipe buffer fills.
    env["PYTHONUNBUFFERED"] = "1"
    return env


# ── running it ─────────────────────────────────────────────────────────────────────────────


@dataclass(frozen=True, slots=True, kw_only=True)
class DemoPaths:
    """The files a run writes, all under the output directory."""

    directory: Path
    spans: Path
    proxy_log: Path
    sim_log: Path
    state: Path

    @classmethod
    def under(cls, directory: Path) -> DemoPaths:
        """The paths in ``directory`` (made absolute, so the proxy child finds them too)."""
        base = directory.resolve()
        return cls(
            directory=base,
            spans=base / "spans.jsonl",
            proxy_log=base / "proxy.log",
            sim_log=base / "simulators.log",
            state=base / "orders.db",
        )

    def prepare(self) -> None:
        """Create the directory and remove the last run's files (the sink appends; the state persists)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        for stale in (self.spans, self.proxy_log, self.sim_log, self.state):
            stale.unlink(missing_ok=True)
            for suffix in ("-wal", "-shm"):
                stale.with_name(stale.name + suffix).unlink(missing_ok=True)


def _bind(address: str, what: str, option: DemoOption) -> socket.socket:
    host, port = mes.parse_listen(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        hint = f"; free it, or set {option.env} / {option.flag} to another port (0: any free port)"
        raise DemoError(what, f"cannot listen on {address}: {exc.strerror or exc}{hint}") from None
    return sock


def _option(dest: str) -> DemoOption:
    return next(option for option in OPTIONS if option.dest == dest)


class ProxyProcess:
    """The proxy as a child process: output pumped to a log file, its ready line read back."""

    def __init__(
        self, process: asyncio.subprocess.Process, log: BinaryIO, on_exit: Callable[[], None]
    ) -> None:
        self.process = process
        self._log = log
        self._tasks = mes.TaskOwner()
        self.stopping = False
        self.killed = False
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL)
        self.ready: asyncio.Future[ProxyAddresses] = asyncio.get_running_loop().create_future()
        assert process.stdout is not None
        assert process.stderr is not None
        self._tasks.start(self._pump(process.stdout, self._on_stdout), name="demo-proxy-stdout")
        self._tasks.start(self._pump(process.stderr, self.stderr_tail.append), name="demo-proxy-stderr")
        self.exited = self._tasks.spawn(self._wait(), name="demo-proxy-wait")
        self.exited.add_done_callback(lambda _task: None if self.stopping else on_exit())

    @classmethod
    async def start(
        cls, argv: Sequence[str], env: Mapping[str, str], log_path: Path, on_exit: Callable[[], None]
    ) -> ProxyProcess:
        """Start the proxy.

        Args:
            argv: its command line.
            env: its environment.
            log_path: where its stdout and stderr go.
            on_exit: called if it exits before :meth:`close` asked it to.

        Returns:
            The running child.

        Raises:
            DemoError: the interpreter cannot be started.
        """
        log = log_path.open("wb")
        try:
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=dict(env),
                # A process group of its own: Ctrl+C reaches the demo only, which then stops the
                # proxy by PID after the traffic, so the proxy never vanishes mid-run.
                process_group=0,
            )
        except OSError as exc:
            log.close()
            raise DemoError("proxy", f"cannot start {argv[0]}: {exc.strerror or exc}") from None
        return cls(process, log, on_exit)

    async def _wait(self) -> None:
        await self.process.wait()

    async def _pump(self, stream: asyncio.StreamReader, on_line: Callable[[str], None]) -> None:
        pending = b""
        while chunk := await stream.read(PUMP_CHUNK):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            if len(pending) > MAX_LINE:
                lines.append(pending)
                pending = b""
            for line in lines:
                self._log.write(line + b"\n")
                on_line(line.decode("utf-8", "replace"))
        if pending:
            self._log.write(pending + b"\n")
            on_line(pending.decode("utf-8", "replace"))
        self._log.flush()

    def _on_stdout(self, line: str) -> None:
        if not self.ready.done() and (addresses := parse_ready_line(line)) is not None:
            self.ready.set_result(addresses)

    def last_words(self) -> str:
        """The last non-empty line the proxy wrote to stderr."""
        return next((line for line in reversed(self.stderr_tail) if line.strip()), "no message on stderr")

    async def wait_ready(self, timeout: float) -> ProxyAddresses:  # noqa: ASYNC109
        """Wait for the ready line.

        Args:
            timeout: seconds to wait at most.

        Returns:
            The bound addresses.

        Raises:
            DemoError: the proxy exited first (a busy port, a bad flag) or took too long.
        """
        await asyncio.wait((self.ready, self.exited), timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if self.ready.done():
            return self.ready.result()
        if not self.exited.done():
            raise DemoError("proxy", f"not ready within {timeout:g} s")
        with contextlib.suppress(TimeoutError):  # every line of stderr read before it is quoted
            await asyncio.wait_for(self._tasks.join(), KILL_TIMEOUT)
        hint = ""
        if "cannot listen" in self.last_words():
            hint = " (free the port, or set DEMO_LISTEN, DEMO_EGRESS_LISTEN, DEMO_ADMIN_LISTEN to port 0)"
        raise DemoError(
            "proxy",
            f"exited with status {self.process.returncode} before it was ready: {self.last_words()}{hint}",
        )

    async def close(self) -> None:
        """SIGTERM by PID, wait for the drain, SIGKILL only if it hangs; then close the log."""
        self.stopping = True
        try:
            if self.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    self.process.send_signal(signal.SIGTERM)
                await asyncio.wait((self.exited,), timeout=STOP_TIMEOUT)
                if not self.exited.done():
                    self.killed = True
                    with contextlib.suppress(ProcessLookupError):
                        self.process.kill()
                    await asyncio.wait((self.exited,), timeout=KILL_TIMEOUT)
            with contextlib.suppress(TimeoutError):  # the pumps end at EOF, right after the exit
                await asyncio.wait_for(self._tasks.join(), KILL_TIMEOUT)
        finally:
            await self._tasks.aclose()
            self._log.close()
            if not self.ready.done():
                self.ready.cancel()


@contextlib.contextmanager
def _simulator_logs(path: Path) -> Iterator[None]:
    """Send the simulators', aiohttp's and the OTel SDK's log records to a file, not the terminal."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(JsonFormatter())
    names = ("mes_trace_proxy", "aiohttp", "opentelemetry")
    saved = []
    for name in names:
        logger = logging.getLogger(name)
        saved.append((logger, logger.propagate, logger.level))
        logger.addHandler(handler)
        logger.propagate = False
        logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        for logger, propagate, level in saved:
            logger.removeHandler(handler)
            logger.propagate = propagate
            logger.setLevel(level)
        handler.close()


class _Progress:
    """The latest CRM snapshot and proxy figures, printed as a redrawn line or a line every 5 s."""

    def __init__(self, out: TextIO, total: float) -> None:
        self._out = out
        self._total = total
        self._tty = out.isatty()
        self._drawn = False
        self.crm: crm.CrmProgress | None = None
        self.metrics: MetricsView | None = None

    def on_crm(self, snapshot: crm.CrmProgress) -> None:
        self.crm = snapshot

    async def run(self, session: aiohttp.ClientSession, admin: str, halt: asyncio.Event) -> None:
        started = time.monotonic()
        every = PROGRESS_TTY_EVERY if self._tty else PROGRESS_LOG_EVERY
        while not halt.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(halt.wait(), every)
            if halt.is_set():
                break
            self.metrics = await _scrape(session, admin) or self.metrics
            line = progress_line(
                elapsed=time.monotonic() - started,
                total=self._total,
                crm_progress=self.crm,
                metrics=self.metrics,
            )
            if self._tty:
                self._out.write(f"\r\x1b[2K{line}")
                self._drawn = True
            else:
                self._out.write(line + "\n")
            self._out.flush()

    def finish(self) -> None:
        if self._drawn:
            self._out.write("\n")
            self._out.flush()


async def _get(session: aiohttp.ClientSession, url: str) -> tuple[int, bytes] | None:
    try:
        async with session.get(url) as response:
            return response.status, await response.read()
    except (aiohttp.ClientError, TimeoutError):
        return None


async def _scrape(session: aiohttp.ClientSession, admin: str) -> MetricsView | None:
    answer = await _get(session, f"{admin}/metrics")
    if answer is None or answer[0] != 200:
        return None
    try:
        return parse_metrics(answer[1].decode("utf-8", "replace"))
    except ValueError:
        return None


async def _settled_metrics(session: aiohttp.ClientSession, admin: str) -> MetricsView | None:
    """The proxy's figures once its export queue is empty (or after DRAIN_TIMEOUT)."""
    deadline = time.monotonic() + DRAIN_TIMEOUT
    view = await _scrape(session, admin)
    while view is not None and not view.settled and time.monotonic() < deadline:
        await asyncio.sleep(DRAIN_POLL)
        view = await _scrape(session, admin)
    return view


def _scan_file(path: Path, service: str) -> SpanScan:
    with path.open(encoding="utf-8", errors="replace") as lines:
        return scan_spans(lines, service)


class _Run:
    """One demo run: owns every part it starts, and stops them in reverse order."""

    def __init__(self, cfg: DemoConfig, paths: DemoPaths, environ: Mapping[str, str], out: TextIO) -> None:
        self.cfg = cfg
        self.paths = paths
        self.environ = environ
        self.out = out
        self.endpoint = external_endpoint(environ)
        self.service = environ.get("OTEL_SERVICE_NAME") or DEFAULT_SERVICE
        self.interrupted = asyncio.Event()
        self.halt = asyncio.Event()  # ends the traffic: its time is up, a signal, or the proxy died
        self.release = asyncio.Event()  # ends DEMO_KEEP: a signal, or the proxy died
        self.proxy_died = False
        self.started = time.monotonic()
        # The message path (docs/messages.md): on when rabbitmq-server is installed here.
        self.message_demo: MessageDemo | None = None
        self.message_result: MessageDemoResult | None = None

    def say(self, line: str = "") -> None:
        self.out.write(line + "\n")
        self.out.flush()

    def on_signal(self) -> None:
        self.interrupted.set()
        self.halt.set()
        self.release.set()

    def died(self) -> bool:
        """The proxy exited without being asked to."""
        return self.proxy_died

    def on_proxy_exit(self) -> None:
        self.proxy_died = True
        self.halt.set()
        self.release.set()

    def _crm_export(self, sink: OtlpSink | None) -> tuple[str, str]:
        """Where the CRM simulator sends its own spans: the sink, or the user's collector."""
        if sink is not None:
            return sink.http_endpoint, "http/protobuf"
        assert self.endpoint is not None
        env_name = "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"
        if not self.environ.get(env_name):
            env_name = "OTEL_EXPORTER_OTLP_PROTOCOL"
        protocol = self.environ.get(env_name) or "http/protobuf"
        if protocol not in ("http/protobuf", "grpc"):
            raise DemoError(env_name, f"{protocol!r}: use grpc or http/protobuf")
        return self.endpoint, protocol

    async def run(self) -> int:
        """Start everything, drive the traffic, summarise, and stop everything again.

        Returns:
            The exit status.

        Raises:
            DemoError: a part could not start, or the proxy died during the run.
        """
        cfg, paths = self.cfg, self.paths
        printed = interrupted_early = False
        async with contextlib.AsyncExitStack() as stack:
            sink: OtlpSink | None = None
            if self.endpoint is None:
                sink = OtlpSink(grpc=False, jsonl_path=paths.spans, keep=False)
                try:
                    await sink.start()
                except OSError as exc:
                    raise DemoError(
                        "OTLP sink", f"cannot listen on 127.0.0.1: {exc.strerror or exc}"
                    ) from None
                stack.push_async_callback(sink.aclose)  # closed last: the proxy flushes into it
            crm_endpoint, crm_protocol = self._crm_export(sink)
            mes_sock = _bind(cfg.mes_listen, "MES simulator", _option("mes_listen"))
            stack.callback(mes_sock.close)
            crm_sock = _bind(cfg.crm_listen, "CRM simulator", _option("crm_listen"))
            stack.callback(crm_sock.close)
            mes_url, crm_url = (
                mes.bound_url([mes_sock.getsockname()]),
                mes.bound_url([crm_sock.getsockname()]),
            )
            session = await stack.enter_async_context(
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT), trust_env=False)
            )
            argv = proxy_argv(cfg, mes_url=mes_url, crm_url=crm_url, state=paths.state, python=sys.executable)
            if MessageDemo.available():
                self.message_demo = await MessageDemo.start()
                stack.push_async_callback(self.message_demo.close)  # after the proxy has stopped
                argv += self.message_demo.proxy_flags()
            env = proxy_environment(self.environ, sink.http_endpoint if sink is not None else None)
            proxy = await ProxyProcess.start(argv, env, paths.proxy_log, self.on_proxy_exit)
            stack.push_async_callback(proxy.close)
            addresses = await proxy.wait_ready(READY_TIMEOUT)
            ingress, egress = addresses.listeners["ingress"], addresses.listeners["egress"]
            mes_runner = await self._start_mes(mes_sock, egress)
            stack.push_async_callback(mes_runner.cleanup)  # MES stops before the proxy does
            self._header(mes_url, crm_url, addresses)

            crm_summary = await self._traffic(
                session, addresses.admin, ingress, crm_sock, crm_endpoint, crm_protocol
            )
            interrupted_early = self.interrupted.is_set()
            if self.proxy_died:
                raise DemoError(
                    "proxy",
                    f"exited with status {proxy.process.returncode} during the run: {proxy.last_words()}",
                )
            if not interrupted_early:
                # One watchdog period after the traffic, so the last orders past their limit count.
                await asyncio.sleep(CHECK_INTERVAL)
            result = await self._collect(session, addresses.admin, mes_runner, crm_summary, sink)
            if self.message_demo is not None and not interrupted_early:
                self.message_result = await self.message_demo.run(session, addresses.admin)
            if cfg.keep and not interrupted_early:
                self._print_summary(result)
                printed = True
                self.say()
                self.say(
                    f"Kept running (DEMO_KEEP): admin {addresses.admin}/, proxy {ingress}. Ctrl+C stops it."
                )
                await self.release.wait()
        if not printed:
            if sink is not None:  # counted again: the proxy flushed its last spans on the way out
                result = dataclasses.replace(result, spans=_scan_file(paths.spans, self.service))
            self._print_summary(result)
        failed = problems(result)
        if self.message_result is not None:
            failed.extend(self.message_result.problems)
        # Read again (not narrowed): the proxy may have died while the demo was kept running.
        if self.died():
            failed.append(f"the proxy exited while kept running: {proxy.last_words()}")
        elif proxy.killed or proxy.process.returncode not in (0, None):
            failed.append(f"the proxy did not stop cleanly (status {proxy.process.returncode})")
        for problem in failed:
            print(f"demo: {problem}", file=sys.stderr, flush=True)
        if interrupted_early:
            return EXIT_INTERRUPTED
        return EXIT_FAILED if failed else EXIT_OK

    async def _traffic(
        self,
        session: aiohttp.ClientSession,
        admin: str,
        ingress: str,
        crm_sock: socket.socket,
        otlp_endpoint: str,
        otlp_protocol: str,
    ) -> crm.CrmSummary:
        """The CRM and dashboard traffic for the run's time, with the progress line beside it."""
        cfg = self.cfg
        progress = _Progress(self.out, cfg.seconds)
        tasks = mes.TaskOwner()
        tasks.start(progress.run(session, admin, self.halt), name="demo-progress")
        try:
            return await crm.run_traffic(
                crm.CrmSimConfig(
                    target_url=ingress,
                    orders=cfg.orders,
                    rate=cfg.rate,
                    duration=cfg.seconds,
                    seed=cfg.seed,
                    time_scale=cfg.time_scale,
                    otlp_endpoint=otlp_endpoint,
                    otlp_protocol=otlp_protocol,
                ),
                on_progress=progress.on_crm,
                callback_sock=crm_sock,
                stop=self.halt,
            )
        finally:
            self.halt.set()
            await tasks.aclose()
            progress.finish()

    async def _start_mes(self, sock: socket.socket, egress: str) -> web.AppRunner:
        """The MES simulator on its pre-bound socket, calling the CRM back through the proxy's egress."""
        cfg = self.cfg
        app = mes.build_app(
            mes.MesSimConfig(
                crm_url=egress,
                seed=cfg.seed,
                time_scale=cfg.time_scale,
                price_drop_rate=cfg.price_drop_rate,
                pickup_drop_rate=cfg.pickup_drop_rate,
            )
        )
        runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await runner.setup()
        await web.SockSite(runner, sock).start()
        return runner

    def _header(self, mes_url: str, crm_url: str, addresses: ProxyAddresses) -> None:
        cfg = self.cfg
        limits = ", ".join(f"{status}={seconds:g}s" for status, seconds in cfg.dwell_limits.items())
        spans = (
            f"{self.endpoint} (OTEL_EXPORTER_OTLP_ENDPOINT)"
            if self.endpoint
            else f"{show_path(self.paths.spans)} (set OTEL_EXPORTER_OTLP_ENDPOINT to send them to Jaeger)"
        )
        self.say(f"mes-trace-proxy demo: {cfg.orders} orders over {cfg.seconds:g} s, all on loopback")
        self.say(
            f"  MES simulator   {mes_url}  ({cfg.price_drop_rate:.0%} of prices never answered, "
            f"{cfg.pickup_drop_rate:.0%} of approved orders hidden)"
        )
        self.say(f"  proxy ingress   {addresses.listeners['ingress']} → MES")
        self.say(f"  proxy egress    {addresses.listeners['egress']} → CRM callbacks {crm_url}")
        self.say(f"  proxy admin     {addresses.admin}  (/metrics, /healthz, /readyz)")
        self.say(f"  dwell limits    {limits}")
        self.say(f"  spans           → {spans}")
        self.say(f"  proxy log       {show_path(self.paths.proxy_log)}")

    async def _collect(
        self,
        session: aiohttp.ClientSession,
        admin: str,
        mes_runner: web.AppRunner,
        crm_summary: crm.CrmSummary,
        sink: OtlpSink | None,
    ) -> DemoResult:
        """Ask the proxy (metrics, stuck orders, page) and the MES simulator what the run did."""
        metrics = await _settled_metrics(session, admin)
        mes_app = mes_runner.app
        computed = stuck_in_store(mes_app[mes.MES_STATE].store.records(), self.cfg.dwell_limits, time.time())
        stuck = choose_stuck(await _get(session, f"{admin}/orders/-/stuck"), metrics, computed)
        page = await _get(session, f"{admin}/")
        return DemoResult(
            elapsed=time.monotonic() - self.started,
            crm_summary=crm_summary,
            metrics=metrics,
            stuck=stuck,
            spans=_scan_file(self.paths.spans, self.service) if sink is not None else None,
            spans_file=self.paths.spans if sink is not None else None,
            endpoint=self.endpoint,
            service=self.service,
            jaeger_url=self.cfg.jaeger_url,
            admin_url=admin,
            admin_page=page is not None and page[0] == 200,
            proxy_log=self.paths.proxy_log,
        )

    def _print_summary(self, result: DemoResult) -> None:
        self.say()
        for line in summary_lines(result):
            self.say(line)
        if self.message_demo is None or self.message_result is not None:
            for line in message_summary_lines(self.message_result):
                self.say(line)


async def _run(cfg: DemoConfig, environ: Mapping[str, str], out: TextIO) -> int:
    paths = DemoPaths.under(cfg.output)
    try:
        paths.prepare()
    except OSError as exc:
        raise DemoError(
            str(cfg.output), f"cannot prepare the output directory: {exc.strerror or exc}"
        ) from None
    demo = _Run(cfg, paths, environ, out)
    loop = asyncio.get_running_loop()
    for sig in HANDLED_SIGNALS:
        loop.add_signal_handler(sig, demo.on_signal)
    try:
        with _simulator_logs(paths.sim_log):
            return await demo.run()
    finally:
        for sig in HANDLED_SIGNALS:
            loop.remove_signal_handler(sig)


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Run the demo; returns the exit status (0 success, 1 failed, 2 bad setting, 130 Ctrl+C).

    Args:
        argv: arguments without the program name; None reads ``sys.argv``.
        environ: the environment; None reads ``os.environ``.

    Returns:
        The exit status.
    """
    env = os.environ if environ is None else environ
    args = build_parser().parse_args(argv)
    try:
        cfg = load_demo_config(vars(args), env)
    except DemoError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return asyncio.run(_run(cfg, env, sys.stdout))
    except DemoError as exc:
        print(f"demo: {exc.key}: {exc.message}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:  # Ctrl+C before the signal handlers were installed
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    raise SystemExit(main())
