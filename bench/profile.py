"""Profile mes-trace-proxy under wrk load with py-spy: ``python -m bench.profile``.

The proxy runs as in ``bench.run`` (pinned, nginx upstream, OTLP to the discarding sink);
py-spy samples it without pausing it (``--nonblocking``) while wrk drives 64 connections.
The collapsed stacks are summarised into the top frames by own and by total time, and own
time by component (aiohttp server, aiohttp client, SDK spans, export, our code, ...).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import shutil
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Final

from bench.run import QUICK, RESULTS, TARGETS, ensure_tools, environment, log, run_wrk, start_subject

__all__ = [
    "Stack",
    "by_component",
    "component",
    "inclusive",
    "main",
    "parse_collapsed",
    "short_frame",
    "top_frames",
]

Stack = tuple[tuple[str, ...], int]

# py-spy's raw (collapsed) format: "frame;frame;...;frame COUNT", each frame "function (file:line)".
_FRAME: Final = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>[0-9]+))?\)$")
_SITE: Final = re.compile(r"^.*?/(?:site-packages|dist-packages)/")
_STDLIB: Final = re.compile(r"^.*?/lib/python3\.[0-9]+/")
_REPO: Final = re.compile(r"^.*?/(?=(?:mes_trace_proxy|bench)/)")

NATIVE: Final = "(no Python frame)"
EXPORT_COMPONENT: Final = "span export (encoding, transport)"
#: Where own time goes, by the file of the innermost Python frame; the first match wins.
COMPONENTS: Final = (
    ("mes_trace_proxy/export.py", EXPORT_COMPONENT),
    ("mes_trace_proxy/otlp_transport.py", EXPORT_COMPONENT),
    ("mes_trace_proxy/otlp_encode.py", EXPORT_COMPONENT),
    ("mes_trace_proxy/otlp_wire.py", EXPORT_COMPONENT),
    ("mes_trace_proxy/", "our code (mes_trace_proxy)"),
    ("bench/peers/", "the peer's own handler"),
    ("aiohttp/web_", "aiohttp server"),
    ("aiohttp/client", "aiohttp client"),
    ("aiohttp/connector", "aiohttp client"),
    ("aiohttp/", "aiohttp shared (parser, writer, streams)"),
    ("opentelemetry/exporter/", EXPORT_COMPONENT),
    ("opentelemetry/proto/", EXPORT_COMPONENT),
    ("google/protobuf/", EXPORT_COMPONENT),
    ("requests/", EXPORT_COMPONENT),
    ("urllib3/", EXPORT_COMPONENT),
    ("http/client.py", EXPORT_COMPONENT),
    ("grpc/", EXPORT_COMPONENT),
    ("opentelemetry/", "OpenTelemetry API/SDK (spans, context, propagation)"),
    ("multidict/", "multidict / yarl"),
    ("yarl/", "multidict / yarl"),
    ("prometheus_client/", "metrics (prometheus_client)"),
    ("json/", "access log (json, logging)"),
    ("logging/", "access log (json, logging)"),
    ("asyncio/", "event loop (asyncio, uvloop)"),
    ("uvloop/", "event loop (asyncio, uvloop)"),
    ("threading.py", "threads"),
)


def short_frame(frame: str) -> str:
    """``function (file:line)`` with the file shortened to its package path and the line dropped.

    Functions are summed over their lines, so one function is one entry in the tables.
    """
    found = _FRAME.match(frame)
    if found is None:
        return frame
    path = found.group("file")
    for pattern in (_SITE, _REPO, _STDLIB):
        shortened = pattern.sub("", path, count=1)
        if shortened != path:
            path = shortened
            break
    return f"{found.group('func')} ({path})"


def parse_collapsed(text: str) -> list[Stack]:
    """Parse py-spy's raw output into (frames outermost first, sample count).

    Raises:
        ValueError: a line does not end in a count.
    """
    stacks: list[Stack] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        frames, sep, count = line.rpartition(" ")
        if not sep or not count.isdigit():
            raise ValueError(f"not a collapsed-stack line: {line[:120]!r}")
        # A sample with no Python frame at all (a native thread, or between frames) is kept.
        names = tuple(short_frame(f) for f in frames.split(";")) if frames.strip() else (NATIVE,)
        stacks.append((names, int(count)))
    return stacks


#: Entry frames every sample of a thread passes through (start-up, the loop's run, a thread's
#: bootstrap): 100 % of their thread by construction, so they are left out of the total table.
ENTRY_FILES: Final = (
    "<frozen runpy>",
    "mes_trace_proxy/__main__.py",
    "mes_trace_proxy/cli.py",
    "mes_trace_proxy/server.py",
    "asyncio/runners.py",
    "threading.py",
)


def top_frames(
    stacks: Iterable[Stack], limit: int, skip_total: Sequence[str] = ENTRY_FILES
) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    """The functions with the most own time (innermost frame) and the most total time (anywhere).

    A function that appears twice in one stack (recursion) counts once for its total; equal
    shares are ordered by name. Frames from files in ``skip_total`` are left out of the total
    table (they still count for own time).

    Returns:
        (own, total): each a list of (frame, share of all samples), largest first.
    """
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for frames, count in stacks:
        samples += count
        if frames:
            own[frames[-1]] += count
        for frame in set(frames):
            if not any(marker in frame for marker in skip_total):
                total[frame] += count
    if not samples:
        return [], []

    def largest(counts: Counter[str]) -> list[tuple[str, float]]:
        # Ties break by name, so the same stacks always give the same table.
        ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:limit]
        return [(frame, n / samples) for frame, n in ranked]

    return largest(own), largest(total)


def component(frame: str) -> str:
    """The component a frame's file belongs to (see :data:`COMPONENTS`)."""
    found = _FRAME.match(frame)
    path = found.group("file") if found else frame
    for marker, name in COMPONENTS:
        if marker in path:
            return name
    return "other"


#: Functions whose total (inclusive) time tells where a traced request's cost goes.
FOCUS: Final = (
    ("handle", "our handler, with everything it calls"),
    ("_Connection.data_received", "the listener's server and the upstream client: bytes parsed"),
    ("IncomingRequest.send", "the listener's server: the answer written"),
    ("_Call.__aenter__", "lean upstream client: the exchange up to the answer's head"),
    ("ClientSession._request", "aiohttp client (WebSocket, --client-span instrumentation, OTLP/HTTP)"),
    ("_parent", "ours: the caller's traceparent read"),
    ("SpanFactory.start", "lean spans: starting the two spans"),
    ("ProxySpan.end", "lean spans: ending them (encoding included)"),
    ("ProxySpan.add_event", "lean spans: the status-change and anomaly events"),
    ("_server_attributes", "ours: SERVER span attributes"),
    ("upstream_request_headers", "ours: forwarded headers"),
    ("request_facts", "ours: order id and status from the request"),
    ("response_facts", "ours: the status MES answered"),
    ("_record_order", "ours: order book and its span verdicts"),
    ("ProxyMetrics.request_done", "ours: Prometheus metrics"),
    ("AccessLog.request", "ours: the JSON access-log line (queued; written in batches)"),
    ("BatchExportProcessor._run", "export thread, all of it (console exporter)"),
    ("OtlpSpanEncoder.encode_span", "export: OTLP encoding as each span ends"),
    ("OtlpExportProcessor._start_batch", "export: joining a batch"),
    ("OtlpExportProcessor._send_batch", "export: sending it, retries included"),
)


def inclusive(stacks: Iterable[Stack], functions: Iterable[str]) -> list[tuple[str, float]]:
    """The share of samples in which each named function is on the stack (file ignored).

    Returns:
        (function, share) in the order given.
    """
    wanted = tuple(functions)
    hits: Counter[str] = Counter()
    samples = 0
    for frames, count in stacks:
        samples += count
        names = {frame.partition(" (")[0] for frame in frames}
        for function in wanted:
            if function in names:
                hits[function] += count
    return [(function, hits[function] / samples if samples else 0.0) for function in wanted]


EXPORT_THREAD: Final = "BatchExportProcessor._run"


def by_component(stacks: Iterable[Stack]) -> list[tuple[str, float]]:
    """Own time by component, as shares of all samples, largest first.

    Everything on the export thread counts as span export, whatever its innermost frame (the
    SDK's span properties, ``requests``' environment and netrc look-ups, socket reads).
    """
    shares: Counter[str] = Counter()
    samples = 0
    for frames, count in stacks:
        samples += count
        if any(frame.partition(" (")[0] == EXPORT_THREAD for frame in frames):
            shares[EXPORT_COMPONENT] += count
        else:
            shares[component(frames[-1]) if frames else "other"] += count
    return [(name, n / samples) for name, n in shares.most_common()] if samples else []


def render(stacks: Sequence[Stack], limit: int, heading: str) -> str:
    """The profile summary as markdown."""
    own, total = top_frames(stacks, limit)
    samples = sum(count for _, count in stacks)
    lines = [heading, "", f"{samples:,} samples of busy time (idle excluded).", ""]
    lines += ["| own % | function (own time) |", "| ---: | --- |"]
    lines += [f"| {share * 100:.1f} | `{frame}` |" for frame, share in own]
    lines += ["", "| total % | function (total time) |", "| ---: | --- |"]
    lines += [f"| {share * 100:.1f} | `{frame}` |" for frame, share in total]
    lines += ["", "| total % | function | what it is |", "| ---: | --- | --- |"]
    meaning = dict(FOCUS)
    lines += [
        f"| {share * 100:.1f} | `{name}` | {meaning[name]} |" for name, share in inclusive(stacks, meaning)
    ]
    lines += ["", "| own % | component |", "| ---: | --- |"]
    lines += [f"| {share * 100:.1f} | {name} |" for name, share in by_component(stacks)]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Profile one configuration under load; print and write ``profile.md`` and the raw stacks."""
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument(
        "--config",
        default="proxy-http",
        # Python processes only: py-spy has nothing to say about nginx.
        choices=[n for n, t in TARGETS.items() if t.kind in ("proxy", "aiohttp")],
    )
    parser.add_argument("--seconds", type=int, default=20, help="sampling time under load")
    # 250 Hz: 5,000 samples in 20 s, enough for 0.1 % resolution, and py-spy stays light.
    parser.add_argument("--rate", type=int, default=250, help="samples per second")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        raise SystemExit("bench.profile: py-spy is missing; pip install -c constraints.txt -e '.[bench]'")
    ensure_tools(install=True)
    args.output.mkdir(parents=True, exist_ok=True)
    raw = args.output / f"profile-{args.config}.txt"
    settings = dataclasses.replace(QUICK, blob_mib=1)
    with environment(settings) as env:
        subject = start_subject(env, TARGETS[args.config])
        try:
            assert subject.pid is not None
            run_wrk(env, subject.url, 64, 3)
            # wrk runs on its own thread of the harness and outlasts the sampling on both ends.
            load = threading.Thread(
                target=run_wrk, args=(env, subject.url, 64, args.seconds + 3), daemon=True
            )
            load.start()
            pinned = ["taskset", "-c", ",".join(map(str, env.load_cpus))] if env.load_cpus else []
            log(f"sampling {args.config} (pid {subject.pid}) for {args.seconds} s")
            subprocess.run(
                [
                    *pinned,
                    py_spy,
                    "record",
                    "--pid",
                    str(subject.pid),
                    "--rate",
                    str(args.rate),
                    "--duration",
                    str(args.seconds),
                    "--nonblocking",
                    "--full-filenames",
                    "--format",
                    "raw",
                    "--output",
                    str(raw),
                ],
                check=True,
                capture_output=True,
                timeout=args.seconds + 60,
            )
            load.join(timeout=args.seconds + 40)
        finally:
            for child in subject.children:
                child.stop()
    stacks = parse_collapsed(raw.read_text())
    text = render(stacks, args.top, f"## py-spy profile of {args.config} under wrk, 64 connections")
    (args.output / f"profile-{args.config}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
