"""Shared fixtures: a recording upstream, the OTLP sink, and a factory for running proxies.

Every server binds 127.0.0.1 port 0 and the real port is read back; nothing waits on a
sleep for readiness.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, Protocol

import pytest
from aiohttp.test_utils import TestServer

from mes_trace_proxy.cli import read_default_rules
from mes_trace_proxy.config import Config, load_config
from mes_trace_proxy.server import RunningProxy, running
from mes_trace_proxy.sim.otlp_sink import OtlpSink
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
