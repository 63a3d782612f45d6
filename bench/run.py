"""The benchmark beside nginx (issue 6): ``python -m bench.run [--quick]``, which ``make bench`` runs.

nginx is the MES-like upstream, wrk the load, the OTLP sink the discarding receiver; the
proxy under test runs pinned to one CPU and everything else on the other. Every configuration
is measured in each of several rounds, in rotated order, and the medians are reported with
ratios to the plain aiohttp passthrough and to nginx, in ``bench/results/latest.{md,json}``.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import importlib.metadata
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Final, Literal

from bench import nginx, report
from bench.procfs import reset_peak, system_busy_seconds, tree_cpu_seconds, tree_memory
from bench.procs import Child, ChildFailed, free_port, wait_for_port
from bench.wrk import WRK_SCRIPT, WrkResult, parse_wrk_output, wrk_command
from mes_trace_proxy import native

__all__ = ["Settings", "Target", "main", "parse_span_counts"]

REPO: Final = Path(__file__).resolve().parent.parent
RESULTS: Final = REPO / "bench" / "results"
Kind = Literal["direct", "nginx", "aiohttp", "proxy"]
Exporter = Literal["none", "http", "grpc"]
# Start-up of anything measured here takes well under this; past it the child is broken.
READY_TIMEOUT: Final = 20.0
# Each 256 MiB transfer runs twice per round and the faster counts (see measure_streaming).
TRANSFERS: Final = 2
# A 256 MiB transfer at even 20 MB/s ends well within this.
TRANSFER_TIMEOUT: Final = 60.0
_SPANS: Final = re.compile(r'^mes_proxy_spans_total\{outcome="([a-z_]+)"\} ([0-9.e+]+)$', re.MULTILINE)


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """How long and how often to measure."""

    rounds: int
    warmup: float
    seconds_64: float
    seconds_1: float
    blob_mib: int
    orders: int
    configs: tuple[str, ...]
    workers: bool
    streaming: bool


FULL: Final = Settings(
    # 3 rounds: the median of three interleaved runs rejects one disturbed run.
    rounds=3,
    warmup=2.0,
    # 10 s at 64 connections is 20-50k requests through a Python proxy: CPU ticks (10 ms)
    # then resolve the per-request cost to well under 1 %.
    seconds_64=10.0,
    # 6 s at 1 connection is over 10k requests: a stable p99.
    seconds_1=6.0,
    blob_mib=256,
    orders=1_000_000,
    configs=tuple(c for c, _ in report.CONFIGS),
    workers=True,
    streaming=True,
)
QUICK: Final = Settings(
    rounds=1,
    warmup=1.0,
    seconds_64=3.0,
    seconds_1=2.0,
    blob_mib=256,
    orders=1_000_000,
    configs=FULL.configs,
    workers=True,
    streaming=True,
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Target:
    """One configuration under test."""

    name: str
    kind: Kind
    exporter: Exporter = "none"
    flags: tuple[str, ...] = ()
    workers: int = 1
    #: ``memory``, or ``sqlite`` for a fresh SQLite file in the temp dir (the default store kind).
    state: Literal["memory", "sqlite"] = "memory"
    #: Run the Python sources even where the native build is installed (MES_TRACE_PROXY_PURE_PYTHON=1).
    pure: bool = False


TARGETS: Final = {
    t.name: t
    for t in (
        Target(name="direct", kind="direct"),
        Target(name="nginx", kind="nginx"),
        Target(name="aiohttp", kind="aiohttp"),
        Target(name="proxy-off", kind="proxy", exporter="none"),
        Target(name="proxy-http", kind="proxy", exporter="http"),
        Target(name="proxy-grpc", kind="proxy", exporter="grpc"),
        # The watchdog always runs; here it checks every second (default 10 s), so it surely
        # runs under load, and then again with the SQLite store written behind the hot path.
        Target(name="proxy-watchdog", kind="proxy", exporter="http", flags=("--check-interval", "1s")),
        Target(
            name="proxy-sqlite",
            kind="proxy",
            exporter="http",
            flags=("--check-interval", "1s"),
            state="sqlite",
        ),
        # What the JSON access log (one unbuffered line per request, as in the image) costs.
        Target(name="proxy-nolog", kind="proxy", exporter="http", flags=("--no-access-log",)),
        # The card's opentelemetry-instrumentation-aiohttp-client making the CLIENT span
        # (--client-span instrumentation), against proxy-http's lean SDK-made one.
        Target(
            name="proxy-contrib", kind="proxy", exporter="http", flags=("--client-span", "instrumentation")
        ),
        # The same as proxy-http with the native build switched off: what mypyc's compile saves.
        Target(name="proxy-pure", kind="proxy", exporter="http", pure=True),
        Target(name="workers-1", kind="proxy", exporter="http"),
        Target(name="workers-2", kind="proxy", exporter="http", workers=2),
    )
}


@dataclass(slots=True, kw_only=True)
class Env:
    """What every round shares: temp dir, upstream, sink, wrk script, CPU placement."""

    workdir: Path
    upstream_port: int
    blob: Path
    sink_http: str
    sink_grpc: str
    script: Path
    proxy_cpus: tuple[int, ...] | None
    load_cpus: tuple[int, ...] | None
    children: list[Child] = field(default_factory=list)
    #: proxies started so far (names each SQLite file uniquely)
    started: int = 0

    @property
    def upstream(self) -> str:
        """Base URL of the upstream nginx."""
        return f"http://127.0.0.1:{self.upstream_port}"


@dataclass(slots=True, kw_only=True)
class Subject:
    """A started configuration: where to send load, whose CPU to count, what to stop."""

    url: str
    pid: int | None
    admin: str | None = None
    startup: float | None = None
    children: list[Child] = field(default_factory=list)


def log(message: str) -> None:
    """Progress on stderr (stdout carries the final table)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ── tools ──────────────────────────────────────────────────────────────────────────────────────
def ensure_tools(install: bool) -> None:
    """Install nginx-light (with the echo module), wrk and curl from Debian's packages when missing.

    Raises:
        SystemExit: something is missing and cannot be installed here.
    """
    missing = [tool for tool in ("nginx", "wrk", "curl", "taskset") if shutil.which(tool) is None]
    if not nginx.ECHO_MODULE.exists():
        missing.append("nginx echo module")
    if not missing:
        return
    packages = ["nginx-light", "wrk", "curl"]
    if not install or os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise SystemExit(
            f"bench: missing {', '.join(missing)}; install them with "
            f"'sudo apt-get install {' '.join(packages)}' (Debian/Ubuntu) and run again"
        )
    log(f"installing {' '.join(packages)} (missing: {', '.join(missing)})")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, timeout=600)
    subprocess.run(["apt-get", "install", "-y", "-qq", *packages], check=True, env=env, timeout=900)
    still = [tool for tool in ("nginx", "wrk", "curl") if shutil.which(tool) is None]
    if still or not nginx.ECHO_MODULE.exists():
        raise SystemExit(f"bench: apt-get installed {packages} but {still or 'the echo module'} is missing")


def _version(argv: Sequence[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except OSError:
        return "not installed"
    text = (done.stdout + done.stderr).strip().splitlines()
    return text[0] if text else "unknown"


def machine_info() -> dict[str, str]:
    """The machine and the versions the figures belong to."""
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    packages = {}
    for name in (
        "aiohttp",
        "uvloop",
        "opentelemetry-sdk",
        "opentelemetry-exporter-otlp-proto-http",
        "grpcio",
    ):
        try:
            packages[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            packages[name] = "not installed"
    return {
        "cpu": model,
        "cpus": str(os.cpu_count()),
        "kernel": platform.release(),
        "python": platform.python_version(),
        # Which code the proxy rows ran: the native build, or the sources (docs/performance.md).
        "mes-trace-proxy build": native.current().reason,
        **packages,
        "nginx": _version(["nginx", "-v"]),
        "wrk": _version(["wrk", "-v"]),
    }


# ── shared environment ─────────────────────────────────────────────────────────────────────────
def _child_env() -> dict[str, str]:
    """The harness's environment minus anything that would reconfigure what is measured."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OTEL_", "MES_PROXY_", "MES_TRACE_PROXY_"))
        and k.lower() not in ("http_proxy", "https_proxy")
    }
    # Children run in the temp dir; `bench.peers` must still import from this checkout.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(REPO), env.get("PYTHONPATH"))))
    return env


def _start(env: Env, name: str, argv: Sequence[str], cpus: tuple[int, ...] | None, **extra: str) -> Child:
    base = _child_env()
    base.update(extra)
    child = Child(name, argv, workdir=env.workdir, cpus=cpus, env=base)
    env.children.append(child)
    return child


def _stop(env: Env, child: Child) -> None:
    child.stop()
    if child in env.children:
        env.children.remove(child)


def _write_blob(path: Path, mib: int) -> None:
    # Incompressible bytes, so nothing on the way can make the transfer cheaper than it is.
    block = os.urandom(1024 * 1024)
    with path.open("wb") as out:
        for _ in range(mib):
            out.write(block)


@contextlib.contextmanager
def environment(settings: Settings) -> Iterator[Env]:
    """Upstream nginx and the OTLP sink on the load CPU, the wrk script and the model file.

    Every child is stopped (by PID) on the way out, whatever happened.
    """
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) >= 2:
        proxy_cpus: tuple[int, ...] | None = (cpus[0],)
        load_cpus: tuple[int, ...] | None = (cpus[1],)
        # The harness itself (and so curl and py-spy, started from it) stays off the proxy's CPU.
        os.sched_setaffinity(0, {cpus[1]})
    else:
        log("warning: fewer than 2 CPUs; nothing is pinned and the figures mix proxy and load")
        proxy_cpus = load_cpus = None
    with tempfile.TemporaryDirectory(prefix="mes-bench-") as tmp:
        workdir = Path(tmp)
        blob = workdir / "model.bin"
        _write_blob(blob, settings.blob_mib)
        script = workdir / "status.lua"
        script.write_text(WRK_SCRIPT)
        upstream_port = free_port()
        conf = workdir / "upstream.conf"
        conf.write_text(nginx.upstream_config(prefix=workdir, port=upstream_port, blob=blob))
        for sub in ("upstream-temp", "peer-temp"):
            (workdir / sub).mkdir()
        env = Env(
            workdir=workdir,
            upstream_port=upstream_port,
            blob=blob,
            sink_http="",
            sink_grpc="",
            script=script,
            proxy_cpus=proxy_cpus,
            load_cpus=load_cpus,
        )
        try:
            upstream = _start(
                env, "upstream-nginx", ["nginx", "-p", str(workdir), "-c", str(conf)], load_cpus
            )
            wait_for_port(upstream_port, READY_TIMEOUT, upstream)
            sink = _start(
                env,
                "otlp-sink",
                [
                    sys.executable,
                    "-m",
                    "mes_trace_proxy.sim.otlp_sink",
                    "--discard",
                    "--http-port",
                    "0",
                    "--grpc-port",
                    "0",
                ],
                load_cpus,
            )
            ready = sink.wait_json(lambda d: "http_endpoint" in d, READY_TIMEOUT)
            env.sink_http = str(ready["http_endpoint"])
            env.sink_grpc = str(ready["grpc_endpoint"])
            yield env
        finally:
            for child in reversed(list(env.children)):
                _stop(env, child)


# ── one configuration ──────────────────────────────────────────────────────────────────────────
def _http(url: str, method: str = "GET", timeout: float = 5.0) -> tuple[int, bytes]:
    rest = url.removeprefix("http://")
    hostport, _, path = rest.partition("/")
    host, _, port = hostport.partition(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        connection.request(method, "/" + path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def _until_ok(url: str, child: Child, timeout: float = READY_TIMEOUT) -> float:
    """Request ``url`` until it answers 200; returns the monotonic time it did."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError, http.client.HTTPException):
            if _http(url)[0] == 200:
                return time.monotonic()
        child.check_alive()
        if time.monotonic() > deadline:
            raise ChildFailed(f"{child.name}: {url} did not answer 200 within {timeout:.0f} s")
        time.sleep(0.002)  # bounded poll between two attempts; the answer is the event we wait on


def _proxy_env(env: Env, exporter: Exporter) -> dict[str, str]:
    # Unbuffered stdout, as the Dockerfile sets it: each access-log line is one write(2).
    if exporter == "none":
        return {"OTEL_TRACES_EXPORTER": "none", "PYTHONUNBUFFERED": "1"}
    return {
        "PYTHONUNBUFFERED": "1",
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf" if exporter == "http" else "grpc",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": env.sink_http if exporter == "http" else env.sink_grpc,
    }


def start_subject(env: Env, target: Target, *, pinned: bool = True) -> Subject:
    """Start one configuration and wait until it serves; the start-up time is measured here.

    Raises:
        ChildFailed: it exited or never became ready.
    """
    if target.kind == "direct":
        return Subject(url=env.upstream, pid=None)
    if target.kind == "nginx":
        port = free_port()
        conf = env.workdir / "peer.conf"
        conf.write_text(nginx.peer_config(prefix=env.workdir, port=port, upstream_port=env.upstream_port))
        child = _start(env, "peer-nginx", ["nginx", "-p", str(env.workdir), "-c", str(conf)], env.proxy_cpus)
        url = f"http://127.0.0.1:{port}"
        wait_for_port(port, READY_TIMEOUT, child)
        ready = _until_ok(url + nginx.HEALTH_PATH, child)
        return Subject(url=url, pid=child.pid, startup=ready - child.started, children=[child])
    if target.kind == "aiohttp":
        child = _start(
            env,
            "aiohttp-passthrough",
            [sys.executable, "-m", "bench.peers.aiohttp_passthrough", "--upstream", env.upstream],
            env.proxy_cpus,
        )
        port = int(str(child.wait_json(lambda d: "port" in d, READY_TIMEOUT)["port"]))
        url = f"http://127.0.0.1:{port}"
        ready = _until_ok(url + nginx.HEALTH_PATH, child)
        return Subject(url=url, pid=child.pid, startup=ready - child.started, children=[child])
    # mes-trace-proxy: ports read back from its "ready" log line, except with several workers,
    # which must share one port chosen beforehand.
    # A fresh database each start: restoring the last run's orders would time the restore.
    state = f"sqlite:///{env.workdir}/orders-{env.started}.db" if target.state == "sqlite" else "memory"
    listen = f"127.0.0.1:{free_port()}" if target.workers > 1 else "127.0.0.1:0"
    admin = f"127.0.0.1:{free_port()}" if target.workers > 1 else "127.0.0.1:0"
    argv = [
        sys.executable,
        "-m",
        "mes_trace_proxy",
        "serve",
        "--listen",
        listen,
        "--admin-listen",
        admin,
        "--upstream",
        env.upstream,
        "--state",
        state,
        # wrk has closed its connections when we stop it: nothing to drain for long.
        "--grace-period",
        "2s",
        "--workers",
        str(target.workers),
        *target.flags,
    ]
    cpus = env.proxy_cpus if pinned else None
    extra = _proxy_env(env, target.exporter)
    if target.pure:
        extra[native.PURE_ENV] = "1"
    child = _start(env, target.name, argv, cpus, **extra)
    env.started += 1
    lines = [
        child.wait_json(lambda d: d.get("message") == "mes-trace-proxy ready", READY_TIMEOUT)
        for _ in range(target.workers)
    ]
    listeners = lines[0]["listeners"]
    assert isinstance(listeners, dict)
    url = f"http://{listeners['ingress']}"
    admin_url = f"http://{lines[0]['admin']}"
    ready = _until_ok(admin_url + "/readyz", child)
    return Subject(url=url, pid=child.pid, admin=admin_url, startup=ready - child.started, children=[child])


def parse_span_counts(text: str) -> dict[str, float]:
    """``mes_proxy_spans_total`` by outcome from a Prometheus text exposition."""
    return {outcome: float(value) for outcome, value in _SPANS.findall(text)}


def run_wrk(env: Env, url: str, connections: int, seconds: float) -> WrkResult:
    """One bounded wrk run on the load CPU.

    Raises:
        RuntimeError: wrk failed or printed no report.
    """
    argv = wrk_command(url, str(env.script), connections=connections, seconds=seconds)
    pinned = ["taskset", "-c", ",".join(map(str, env.load_cpus))] if env.load_cpus else []
    done = subprocess.run([*pinned, *argv], capture_output=True, text=True, timeout=seconds + 30)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    return parse_wrk_output(done.stdout)


def _cpu(subject: Subject) -> float:
    return tree_cpu_seconds(subject.pid) if subject.pid is not None else 0.0


def _ours() -> float:
    """CPU of the harness's whole tree: itself, nginx, the sink, the subject, reaped wrk/curl runs."""
    return tree_cpu_seconds(os.getpid())


def measure_load(env: Env, subject: Subject, settings: Settings) -> dict[str, float]:
    """Warm up, then 64 connections and 1 connection: rate, latency, CPU per request."""
    run_wrk(env, subject.url, 64, settings.warmup)
    out: dict[str, float] = {}
    for connections, seconds, suffix in ((64, settings.seconds_64, "64"), (1, settings.seconds_1, "1")):
        before, machine_before, ours_before = _cpu(subject), system_busy_seconds(), _ours()
        result = run_wrk(env, subject.url, connections, seconds)
        used = _cpu(subject) - before
        # CPU the rest of the machine used meanwhile, in cores: the measurement's noise floor.
        foreign = (system_busy_seconds() - machine_before) - (_ours() - ours_before)
        out[f"foreign_{suffix}"] = max(0.0, foreign / result.duration)
        if result.errors:
            log(f"  warning: {result.errors} failed requests at {connections} connections")
        out[f"rps_{suffix}"] = result.requests_per_second
        out[f"p50_{suffix}"] = result.p50
        out[f"p99_{suffix}"] = result.p99
        out[f"errors_{suffix}"] = float(result.errors)
        if subject.pid is not None and result.requests:
            out["cpu_us" if suffix == "64" else "cpu_us_1"] = used / result.requests * 1e6
    return out


def _curl(env: Env, argv: Sequence[str]) -> tuple[int, int, float]:
    """Run curl with ``-w '%{http_code} %{size_...} %{time_total}'``; (status, bytes, seconds)."""
    pinned = ["taskset", "-c", ",".join(map(str, env.load_cpus))] if env.load_cpus else []
    done = subprocess.run(
        [
            *pinned,
            "curl",
            "-sS",
            "--noproxy",
            "*",
            "--max-time",
            str(TRANSFER_TIMEOUT),
            "-o",
            "/dev/null",
            *argv,
        ],
        capture_output=True,
        text=True,
        timeout=TRANSFER_TIMEOUT + 10,
    )
    if done.returncode != 0:
        raise RuntimeError(f"curl failed ({done.returncode}): {done.stderr.strip()[-300:]}")
    status, size, seconds = done.stdout.split()
    return int(status), int(size), float(seconds)


def measure_streaming(env: Env, subject: Subject) -> dict[str, float]:
    """A 256 MiB download and upload through the subject: MB/s and RSS growth.

    Each transfer runs :data:`TRANSFERS` times and the fastest counts: a transfer lasts well
    under a second, so one burst of another process's work can halve a single figure, and the
    question asked is what the proxy can move. RSS growth is the peak over all of them.
    """
    out: dict[str, float] = {}
    expected = env.blob.stat().st_size
    transfers = (
        (
            "download",
            ["-w", "%{http_code} %{size_download} %{time_total}", subject.url + nginx.DOWNLOAD_PATH],
        ),
        (
            "upload",
            [
                "-w",
                "%{http_code} %{size_upload} %{time_total}",
                # curl waits up to 1 s for "100 Continue" before a large body unless told not to.
                "-H",
                "Expect:",
                "-H",
                "Content-Type: application/octet-stream",
                "-T",
                str(env.blob),
                subject.url + nginx.UPLOAD_PATH,
            ],
        ),
    )
    for name, argv in transfers:
        base = 0
        if subject.pid is not None:
            reset = reset_peak(subject.pid)
            memory = tree_memory(subject.pid)
            base = memory.rss if reset else memory.hwm
        for _ in range(TRANSFERS):
            status, size, seconds = _curl(env, argv)
            if status not in (200, 201) or size != expected:
                raise RuntimeError(f"{name}: HTTP {status}, {size} of {expected} bytes")
            out[f"{name}_mbps"] = max(out.get(f"{name}_mbps", 0.0), size / seconds / 1e6)
        if subject.pid is not None:
            out[f"{name}_rss_growth"] = float(max(0, tree_memory(subject.pid).hwm - base))
    return out


def measure_target(env: Env, target: Target, settings: Settings) -> dict[str, float]:
    """Everything measured for one configuration in one round."""
    subject = start_subject(env, target)
    try:
        out: dict[str, float] = {}
        if subject.startup is not None:
            out["startup"] = subject.startup
        if subject.pid is not None:
            out["idle_rss"] = float(tree_memory(subject.pid).rss)
        out.update(measure_load(env, subject, settings))
        if subject.admin is not None:
            spans = parse_span_counts(_http(subject.admin + "/metrics")[1].decode())
            out["spans_dropped"] = spans.get("dropped_queue_full", 0.0) + spans.get("export_failed", 0.0)
            out["spans_exported"] = spans.get("exported", 0.0)
        if subject.pid is not None:
            out["peak_rss"] = float(tree_memory(subject.pid).hwm)
        if settings.streaming:
            out.update(measure_streaming(env, subject))
        return out
    finally:
        for child in subject.children:
            _stop(env, child)


def measure_workers(env: Env, target: Target, settings: Settings) -> dict[str, float]:
    """Requests/s and CPU per request at 64 connections, the proxy not pinned."""
    subject = start_subject(env, target, pinned=False)
    try:
        run_wrk(env, subject.url, 64, settings.warmup)
        before = _cpu(subject)
        result = run_wrk(env, subject.url, 64, settings.seconds_64)
        used = _cpu(subject) - before
        return {"rps_64": result.requests_per_second, "cpu_us": used / max(1, result.requests) * 1e6}
    finally:
        for child in subject.children:
            _stop(env, child)


def measure_orders(env: Env, orders: int) -> dict[str, float]:
    """RSS of the order book with ``orders`` orders, in a fresh process on the proxy's CPU."""
    pinned = ["taskset", "-c", ",".join(map(str, env.proxy_cpus))] if env.proxy_cpus else []
    done = subprocess.run(
        [*pinned, sys.executable, "-m", "bench.orders_rss", "--orders", str(orders)],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    doc = json.loads(done.stdout.strip().splitlines()[-1])
    return {key: float(value) for key, value in doc.items()}


# ── the run ────────────────────────────────────────────────────────────────────────────────────
def rotated(items: Sequence[str], by: int) -> list[str]:
    """``items`` started at position ``by`` (mod length), so no configuration always goes first."""
    if not items:
        return []
    shift = by % len(items)
    return [*items[shift:], *items[:shift]]


def run(settings: Settings) -> dict[str, object]:
    """Measure everything ``settings`` asks for; returns the raw rounds, medians and verdicts."""
    rounds: dict[str, list[dict[str, float]]] = {}
    orders: dict[str, float] | None = None
    started = time.monotonic()
    with environment(settings) as env:
        for number in range(settings.rounds):
            for name in rotated(settings.configs, number):
                log(f"round {number + 1}/{settings.rounds}: {name}")
                rounds.setdefault(name, []).append(measure_target(env, TARGETS[name], settings))
            if settings.workers:
                for name in rotated(["workers-1", "workers-2"], number):
                    log(f"round {number + 1}/{settings.rounds}: {name}")
                    rounds.setdefault(name, []).append(measure_workers(env, TARGETS[name], settings))
        if settings.orders:
            log(f"order book with {settings.orders:,} orders")
            orders = measure_orders(env, settings.orders)
    figures = report.medians(rounds)
    verdicts = report.evaluate_targets(figures, orders["rss_growth_bytes"] if orders else None)
    return {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(time.monotonic() - started, 1),
        "settings": asdict(settings),
        "machine": machine_info(),
        "rounds": rounds,
        "medians": figures,
        "orders": orders,
        "verdicts": [asdict(v) for v in verdicts],
    }


def render(result: Mapping[str, object]) -> str:
    """The markdown report of one :func:`run` result."""
    settings = result["settings"]
    machine = result["machine"]
    assert isinstance(settings, dict)
    assert isinstance(machine, dict)
    heading = (
        f"## Benchmark run {result['when']} ({settings['rounds']} round(s), "
        f"{settings['seconds_64']:.0f} s at 64 connections, {settings['seconds_1']:.0f} s at 1; "
        f"medians; took {result['seconds']} s)\n\n"
        + "Machine: "
        + "; ".join(f"{k} {v}" for k, v in machine.items())
    )
    verdicts = [report.Verdict(**v) for v in result["verdicts"]]  # type: ignore[attr-defined]
    figures = result["medians"]
    orders = result["orders"]
    assert isinstance(figures, dict)
    return report.render_markdown(
        figures,
        orders=orders if isinstance(orders, dict) else None,
        verdicts=verdicts,
        heading=heading,
    )


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="1 round, short runs (about 2 minutes)")
    parser.add_argument("--rounds", type=int, help="override the number of rounds")
    parser.add_argument("--seconds", type=float, help="override the 64-connection run length")
    parser.add_argument(
        "--configs",
        help=f"comma-separated subset of {','.join(c for c, _ in report.CONFIGS)} (default: all)",
    )
    parser.add_argument("--no-workers", action="store_true", help="skip the --workers 2 comparison")
    parser.add_argument("--no-streaming", action="store_true", help="skip the 256 MiB transfers")
    parser.add_argument("--orders", type=int, help="orders for the order-book RSS (0 skips it)")
    parser.add_argument(
        "--no-install", action="store_true", help="never run apt-get; fail if tools are missing"
    )
    parser.add_argument(
        "--output", type=Path, default=RESULTS, help="directory for latest.md and latest.json"
    )
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    """The settings the flags ask for.

    Raises:
        SystemExit: an unknown configuration name.
    """
    base = QUICK if args.quick else FULL
    configs = base.configs
    if args.configs:
        configs = tuple(c.strip() for c in args.configs.split(",") if c.strip())
        unknown = [c for c in configs if c not in dict(report.CONFIGS)]
        if unknown:
            raise SystemExit(
                f"bench: unknown configuration(s) {unknown}; choose from {list(dict(report.CONFIGS))}"
            )
    return Settings(
        rounds=args.rounds or base.rounds,
        warmup=base.warmup,
        seconds_64=args.seconds or base.seconds_64,
        seconds_1=base.seconds_1,
        blob_mib=base.blob_mib,
        orders=base.orders if args.orders is None else args.orders,
        configs=configs,
        workers=base.workers and not args.no_workers,
        streaming=base.streaming and not args.no_streaming,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print the table, write ``latest.md`` and ``latest.json``."""
    args = build_parser().parse_args(argv)
    settings = settings_from_args(args)
    ensure_tools(install=not args.no_install)
    result = run(settings)
    text = render(result)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "latest.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.output / "latest.md").write_text(text)
    print(text)
    log(f"written {args.output / 'latest.md'} and latest.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
