"""Run ``mes-trace-proxy serve`` as a real child process and read its bound ports from its log."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field

READY_MESSAGE = "mes-trace-proxy ready"


@dataclass(slots=True)
class ProxyProcess:
    """A running proxy child: its PID, listener URLs and everything it printed."""

    process: asyncio.subprocess.Process
    listeners: dict[str, str]
    admin: str
    lines: list[str] = field(default_factory=list)
    _pump: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        """The child's PID."""
        return self.process.pid

    def url(self, name: str = "ingress") -> str:
        """``http://host:port`` of a listener."""
        return f"http://{self.listeners[name]}"

    @property
    def admin_url(self) -> str:
        """``http://host:port`` of the admin listener."""
        return f"http://{self.admin}"

    def status_kib(self, key: str) -> int:
        """A ``/proc/<pid>/status`` field in KiB (VmRSS, VmHWM)."""
        with open(f"/proc/{self.pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
        raise KeyError(key)

    def json_lines(self) -> list[dict[str, object]]:
        """Every JSON object the child printed so far."""
        out = []
        for line in self.lines:
            with contextlib.suppress(ValueError):
                value = json.loads(line)
                if isinstance(value, dict):
                    out.append(value)
        return out


async def _read_lines(stream: asyncio.StreamReader, sink: list[str]) -> None:
    while True:
        line = await stream.readline()
        if not line:
            return
        sink.append(line.decode("utf-8", "replace").rstrip("\n"))


@contextlib.asynccontextmanager
async def proxy_process(
    args: Sequence[str], env: Mapping[str, str] | None = None, *, start_timeout: float = 20.0
) -> AsyncIterator[ProxyProcess]:
    """Start ``python -m mes_trace_proxy serve ARGS``; stop it by PID (SIGTERM, then SIGKILL)."""
    child_env = {"PATH": os.environ.get("PATH", ""), "PYTHONUNBUFFERED": "1"}
    child_env.update(env or {})
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mes_trace_proxy",
        "serve",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=child_env,
    )
    assert process.stdout is not None
    lines: list[str] = []
    started: ProxyProcess | None = None
    try:
        async with asyncio.timeout(start_timeout):
            while True:
                raw = await process.stdout.readline()
                if not raw:
                    raise RuntimeError("proxy exited before it was ready:\n" + "\n".join(lines))
                line = raw.decode("utf-8", "replace").rstrip("\n")
                lines.append(line)
                with contextlib.suppress(ValueError):
                    record = json.loads(line)
                    if isinstance(record, dict) and record.get("message") == READY_MESSAGE:
                        break
        listeners = record["listeners"]
        assert isinstance(listeners, dict)
        started = ProxyProcess(process=process, listeners=listeners, admin=str(record["admin"]), lines=lines)
        started._pump = asyncio.ensure_future(_read_lines(process.stdout, lines))
        yield started
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), 30)
            except TimeoutError:
                process.kill()
                await process.wait()
        if started is not None and started._pump is not None:
            await started._pump
