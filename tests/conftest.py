"""Shared fixtures: a recording upstream, the OTLP sink, a factory for running proxies, a real
redis-server, and a wall clock tests move by hand.

Every server binds 127.0.0.1 port 0 and the real port is read back; nothing waits on a
sleep for readiness.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pytest
from aiohttp.test_utils import TestServer

from mes_trace_proxy.cli import read_default_rules
from mes_trace_proxy.config import Config, load_config
from mes_trace_proxy.server import RunningProxy, running
from mes_trace_proxy.sim.otlp_sink import OtlpSink

# The message-path fixtures (a real RabbitMQ broker, a running message path, an in-memory span
# recorder), usable from every module.
from tests.message_samples import span_recorder  # noqa: F401
from tests.rabbitmq import amqp_channel, own_rabbitmq, rabbitmq, running_path  # noqa: F401
from tests.upstream import RecordingUpstream, build_upstream


@pytest.fixture(scope="session")
def default_rules() -> dict[str, object]:
    """The packaged default rule sets."""
    return read_default_rules()


class MakeConfig(Protocol):
    """Builds a Config for tests from a config-file document and flags."""

    def __call__(
        self, upstream: str, *, doc: Mapping[str, object] | None = None, **flags: object
    ) -> Config: ...


@pytest.fixture
def make_config(default_rules: dict[str, object]) -> MakeConfig:
    """A factory: loopback port-0 listeners, memory state, and whatever the test overrides."""

    def make(upstream: str, *, doc: Mapping[str, object] | None = None, **flags: object) -> Config:
        base: dict[str, object] = {"listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0", "state": "memory"}
        base["upstream"] = upstream
        base.update(flags)
        return load_config(flags=base, environ={}, file_doc=dict(doc or {}), defaults=default_rules)

    return make


@pytest.fixture
async def recording_upstream() -> AsyncIterator[tuple[str, RecordingUpstream]]:
    """A real recording upstream on 127.0.0.1; yields its base URL and state."""
    app, state = build_upstream()
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()  # TestServer turns handler_cancellation on itself
    try:
        yield f"http://127.0.0.1:{server.port}", state
    finally:
        state.release.set()
        state.sse_next.set()
        await server.close()


@pytest.fixture
async def otlp_sink() -> AsyncIterator[OtlpSink]:
    """A real OTLP/HTTP and OTLP/gRPC receiver on loopback."""
    async with OtlpSink() as sink:
        yield sink


def otlp_env(sink: OtlpSink, protocol: str = "http/protobuf") -> dict[str, str]:
    """Environment that points the proxy's real OTLP exporter at the sink, exporting fast."""
    endpoint = sink.http_endpoint if protocol == "http/protobuf" else sink.grpc_endpoint
    return {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": endpoint,
        # Export every 50 ms so tests wait on spans, not on the 5 s default delay.
        "OTEL_BSP_SCHEDULE_DELAY": "50",
    }


StartProxy = Callable[..., Awaitable[RunningProxy]]


@pytest.fixture
async def start_proxy() -> AsyncIterator[StartProxy]:
    """A factory of running proxies; every one started is drained and flushed at teardown."""
    async with contextlib.AsyncExitStack() as stack:

        async def start(
            config: Config, environ: Mapping[str, str] | None = None, **kwargs: Any
        ) -> RunningProxy:
            env = dict(environ) if environ is not None else {"OTEL_TRACES_EXPORTER": "none"}
            return await stack.enter_async_context(running(config, environ=env, **kwargs))

        yield start


# ── a real redis-server ──────────────────────────────────────────────────────────────────────

START_TIMEOUT = 10.0  # seconds redis-server may take to say it is ready (it takes milliseconds)


class RedisServer:
    """A redis-server listening only on a unix socket in a private directory.

    No TCP port (``--port 0``), so there is no port to race for; readiness is its own
    "ready to accept connections" log line, not a sleep. ``kill`` ends it by PID; ``start``
    again serves the same socket path.
    """

    def __init__(self, binary: str, directory: Path) -> None:
        self.binary = binary
        self.directory = directory
        self.socket = directory / "redis.sock"
        self._proc: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The store URL for this server."""
        return f"unix://{self.socket}"

    def start(self) -> None:
        """Start the server and wait (bounded) until it accepts connections."""
        proc = subprocess.Popen(
            [
                self.binary,
                "--port", "0",
                "--unixsocket", str(self.socket),
                "--unixsocketperm", "700",
                "--dir", str(self.directory),
                "--save", "",
                "--appendonly", "no",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        ready = threading.Event()
        log: list[str] = []

        def read() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:  # drained to the end, so redis never blocks on a full pipe
                log.append(line)
                if "ready to accept connections" in line.lower():  # wording differs by version
                    ready.set()

        reader = threading.Thread(target=read, name="redis-server-log", daemon=True)
        reader.start()
        self._proc, self._reader = proc, reader
        if not ready.wait(START_TIMEOUT):
            self.kill()
            raise RuntimeError("redis-server did not become ready:\n" + "".join(log[-20:]))

    def kill(self) -> None:
        """End the server abruptly (SIGKILL, by PID), as a crash would."""
        proc, reader = self._proc, self._reader
        self._proc = self._reader = None
        if proc is None or reader is None:
            return
        proc.kill()
        proc.wait(timeout=START_TIMEOUT)
        reader.join(timeout=START_TIMEOUT)
        assert proc.stdout is not None
        proc.stdout.close()


@pytest.fixture
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A fresh redis-server on a unix socket; killed at the end of the test."""
    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail(
                "redis-server is not installed, and CI must run the Redis tests: install redis-server"
            )
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    # A short directory: unix socket paths are limited to about 100 bytes.
    server = RedisServer(binary, tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.kill()


# ── time ─────────────────────────────────────────────────────────────────────────────────────


@dataclass(slots=True)
class ManualClock:
    """A wall clock (epoch seconds) that moves only when a test says so."""

    now: float = 1_700_000_000.0  # 2023-11-14T22:13:20Z: any fixed instant will do

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        """Move the clock forward; returns the new time."""
        self.now += seconds
        return self.now
