"""Children of the benchmark: started pinned to CPUs, watched for their ready line, stopped by PID.

Each child's stdout is read by a thread that hands the first lines to the harness (ready lines,
ports) and then drains the rest, as a container runtime drains a pipe, so an access log can
never fill the pipe and stall the process under test. stderr goes to a file in the temp dir.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Final

__all__ = ["Child", "ChildFailed", "free_port", "wait_for_port"]

# The ready lines come first; later lines (access log) are only drained.
_KEPT_LINES: Final = 200
_DRAIN_BYTES: Final = 1 << 16
# SIGTERM first; a child still alive after this is killed (nginx and the sink stop in ms,
# the proxy drains idle keep-alive connections only, as wrk has gone by then).
STOP_TIMEOUT: Final = 15.0


class ChildFailed(RuntimeError):
    """A child exited early or never became ready; the message carries its stderr's tail."""


def free_port() -> int:
    """A port the kernel just handed out on 127.0.0.1, released again.

    Only for children that cannot report the port they bound: nginx (it takes its port from
    its config) and ``--workers N`` proxies (each worker binding port 0 would get its own port).
    Another process could take it in between; on loopback in a benchmark that is accepted.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for_port(port: int, timeout: float, child: Child | None = None) -> float:
    """Connect to 127.0.0.1:port until it accepts (nginx has no ready line to wait on).

    Returns:
        The monotonic time it first accepted.

    Raises:
        ChildFailed: the child exited, or the port did not accept within ``timeout``.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return time.monotonic()
        except OSError:
            pass
        if child is not None:
            child.check_alive()
        if time.monotonic() > deadline:
            raise ChildFailed(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")
        time.sleep(0.005)  # nginx binds in milliseconds; this only bounds the polling rate


class Child:
    """One started child process, pinned to ``cpus``; stop it with :meth:`stop`."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        workdir: Path,
        cpus: Sequence[int] | None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.name = name
        self.stderr_path = workdir / f"{name}.stderr"
        self._lines: queue.Queue[str | None] = queue.Queue()
        pinned = ["taskset", "-c", ",".join(map(str, cpus))] if cpus else []
        full_env = dict(os.environ)
        full_env.update(env or {})
        with self.stderr_path.open("wb") as stderr:
            # taskset execs the program: the PID is the program's own.
            self.started = time.monotonic()
            self.popen = subprocess.Popen(
                [*pinned, *argv],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr,
                env=full_env,
                cwd=workdir,
            )
        assert self.popen.stdout is not None
        self._reader = threading.Thread(
            target=self._read, args=(self.popen.stdout,), name=f"drain-{name}", daemon=True
        )
        self._reader.start()

    @property
    def pid(self) -> int:
        """The child's PID."""
        return self.popen.pid

    def _read(self, stream: IO[bytes]) -> None:
        kept = 0
        with contextlib.suppress(OSError, ValueError):
            while kept < _KEPT_LINES:
                line = stream.readline()
                if not line:
                    break
                self._lines.put(line.decode("utf-8", "replace"))
                kept += 1
            # read1 returns whatever the pipe holds now instead of waiting for a full block.
            read = getattr(stream, "read1", stream.read)
            while read(_DRAIN_BYTES):
                pass
        self._lines.put(None)

    def stderr_tail(self, limit: int = 2000) -> str:
        """The end of what the child wrote to stderr."""
        try:
            return self.stderr_path.read_text(errors="replace")[-limit:]
        except OSError:
            return ""

    def check_alive(self) -> None:
        """Raise :class:`ChildFailed` if the child has exited."""
        code = self.popen.poll()
        if code is not None:
            raise ChildFailed(f"{self.name} exited with {code}: {self.stderr_tail()}")

    def wait_json(self, accept: Callable[[dict[str, object]], bool], timeout: float) -> dict[str, object]:
        """The first JSON line on stdout that ``accept`` takes.

        Raises:
            ChildFailed: the child exited or printed no such line within ``timeout``.
        """
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ChildFailed(f"{self.name}: no ready line in {timeout:.0f} s: {self.stderr_tail()}")
            try:
                line = self._lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                self.popen.wait(timeout=5)
                self.check_alive()
                raise ChildFailed(f"{self.name} closed stdout: {self.stderr_tail()}")
            with contextlib.suppress(ValueError):
                doc = json.loads(line)
                if isinstance(doc, dict) and accept(doc):
                    return doc

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM the child (by its PID), wait, SIGKILL if it lingers; returns its exit status."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.popen.pid, signal.SIGKILL)
                self.popen.wait(timeout=timeout)
        self._reader.join(timeout=5)
        return self.popen.returncode
