"""Tests for the CRM and dashboard traffic simulator, run against a real reference MES on loopback."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from pytest_aiohttp import AiohttpServer

from mes_trace_proxy.sim import crm
from mes_trace_proxy.sim.crm import CrmProgress, CrmSimConfig, CrmSummary, run_traffic
from mes_trace_proxy.sim.mes import MES_STATE, MesSimConfig, MesState, build_app

# Bounds every run: far above what a handful of orders at time scale 0.02 needs (< 1 s).
RUN_CAP = 10.0
# Runs expected to complete get a settle of 2 s real (100 x FAST): never waited for when all
# goes well, yet a loaded machine cannot end them early. Runs expected to settle use 0.25 s.
SETTLE_SLOW = 100.0
SETTLE_FAST = 5.0
# 0.02: the lifecycle's ~5 s of simulated delays take ~0.1 s, still in a realistic order.
FAST = 0.02


@dataclass(frozen=True, slots=True)
class Run:
    summary: CrmSummary
    mes: MesState
    spans: tuple[ReadableSpan, ...]
    progress: tuple[CrmProgress, ...]


RunCrm = Callable[..., Awaitable[Run]]


@pytest.fixture
def callback_sock() -> Iterator[socket.socket]:
    """A socket bound to 127.0.0.1:0 for the CRM callback server, so MES can know its URL first."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    yield sock
    sock.close()


@pytest.fixture
def run_crm(aiohttp_server: AiohttpServer, callback_sock: socket.socket) -> RunCrm:
    """Factory: start a real MES calling back to the CRM socket, then run CRM traffic against it."""

    async def run(mes_fields: dict[str, Any] | None = None, **crm_fields: Any) -> Run:
        host, port = callback_sock.getsockname()
        mes_cfg = MesSimConfig(crm_url=f"http://{host}:{port}", time_scale=FAST, **(mes_fields or {}))
        server: TestServer = await aiohttp_server(build_app(mes_cfg))
        exporter = InMemorySpanExporter()
        progress: list[CrmProgress] = []
        fields: dict[str, Any] = {
            "orders": 6,
            "rate": 0.0,
            "time_scale": FAST,
            "duration": RUN_CAP,
            "settle": SETTLE_SLOW,
        }
        cfg = CrmSimConfig(target_url=str(server.make_url("")), **(fields | crm_fields))
        summary = await asyncio.wait_for(
            run_traffic(
                cfg, on_progress=progress.append, span_exporter=exporter, callback_sock=callback_sock
            ),
            RUN_CAP + 5.0,
        )
        return Run(summary, server.app[MES_STATE], exporter.get_finished_spans(), tuple(progress))

    return run


async def test_orders_reach_a_terminal_status_without_faults(run_crm: RunCrm) -> None:
    """With no faults every order ends CLOSED or CANCELLED and the run says it completed."""
    run = await run_crm(cancel_share=0.3, upload_share=0.5, check_share=0.5)
    summary = run.summary
    assert summary.stopped_by == "completed"
    assert summary.orders_started == 6
    assert set(summary.final_status) <= {"CLOSED", "CANCELLED"}
    assert sum(summary.final_status.values()) == 6
    assert summary.prices_received == 6
    assert summary.errors == {}
    assert set(summary.responses) <= {200, 201, 202}
    for order_id in (f"ORD-0-{n:05d}" for n in range(6)):
        record = run.mes.store.get(order_id)
        assert record is not None
        assert record.status in {"CLOSED", "CANCELLED"}


async def test_lost_price_calculations_leave_orders_submitted(run_crm: RunCrm) -> None:
    """With price-drop-rate 1.0 every order stays SUBMITTED and the run ends by settling."""
    run = await run_crm({"price_drop_rate": 1.0}, upload_share=0.0, settle=SETTLE_FAST)
    assert run.summary.stopped_by == "settled"
    assert dict(run.summary.final_status) == {"SUBMITTED": 6}
    assert run.summary.prices_received == 0
    assert run.mes.stats.prices_dropped == 6


async def test_hidden_approved_orders_are_never_taken_into_work(run_crm: RunCrm) -> None:
    """With pickup-drop-rate 1.0 orders stop at MANUFACTURING_APPROVED: the dashboard never sees them."""
    # 0.5 s of quiet: the orders must first get through pricing and approval to be left behind.
    run = await run_crm({"pickup_drop_rate": 1.0}, orders=3, settle=25.0)
    assert dict(run.summary.final_status) == {"MANUFACTURING_APPROVED": 3}


async def test_overload_is_retried_and_counted(run_crm: RunCrm) -> None:
    """With overload-rate 1.0 each call is retried max_retries times, counted as 503, and the run ends."""
    run = await run_crm(
        {"overload_rate": 1.0},
        orders=2,
        upload_share=0.0,
        check_share=0.0,
        dashboard=False,
        settle=SETTLE_FAST,
    )
    assert dict(run.summary.final_status) == {"NEW": 2}
    assert dict(run.summary.responses) == {503: 6}
    assert run.summary.requests_sent == 6


async def test_resets_are_counted_as_errors(run_crm: RunCrm) -> None:
    """With reset-rate 1.0 the run still ends and counts the dropped connections as errors."""
    run = await run_crm(
        {"reset_rate": 1.0}, orders=2, upload_share=0.0, check_share=0.0, dashboard=False, settle=SETTLE_FAST
    )
    assert dict(run.summary.final_status) == {"NEW": 2}
    assert sum(run.summary.errors.values()) == run.summary.requests_sent == 6


async def test_traceparent_reaches_mes_on_traced_calls_only(run_crm: RunCrm) -> None:
    """CRM and operator calls carry a traceparent of a CRM/dashboard CLIENT span; listing polls carry none."""
    run = await run_crm(orders=3)
    client_spans = {
        format(span.context.span_id, "016x"): span for span in run.spans if span.kind is SpanKind.CLIENT
    }
    polls = [r for r in run.mes.received if (r.method, r.path) == ("GET", "/api/v1/orders")]
    traced = [r for r in run.mes.received if (r.method, r.path) != ("GET", "/api/v1/orders")]
    assert traced
    assert polls
    assert all(r.traceparent is None for r in polls)
    for request in traced:
        assert request.traceparent is not None
        version, trace_id, span_id, flags = request.traceparent.split("-")
        span = client_spans[span_id]
        assert version == "00"
        assert int(flags, 16) & 0x01  # sampled (the SDK may also set 0x02, "random trace id")
        assert trace_id == format(span.context.trace_id, "032x")


async def test_spans_name_operations_per_service(run_crm: RunCrm) -> None:
    """CRM operations are crm-api spans, operator actions mes-dashboard spans, each with the order id."""
    run = await run_crm(orders=2, cancel_share=0.0, upload_share=1.0, check_share=1.0)
    by_service: dict[str, set[str]] = {}
    for span in run.spans:
        assert span.resource.attributes["service.name"] in {"crm-api", "mes-dashboard"}
        by_service.setdefault(str(span.resource.attributes["service.name"]), set()).add(span.name)
    assert by_service["crm-api"] >= {
        "crm upload-model",
        "crm submit-order",
        "crm check-order",
        "crm receive-price",
        "crm approve-order",
        "POST",
    }
    assert by_service["mes-dashboard"] >= {
        "mes-dashboard take-order",
        "mes-dashboard complete-order",
        "mes-dashboard pack-order",
        "mes-dashboard ship-order",
        "mes-dashboard close-order",
        "PUT",
        "PATCH",
    }
    operations = [s for s in run.spans if s.kind is SpanKind.INTERNAL]
    assert all(s.attributes is not None and s.attributes["mes.order.id"] for s in operations)


async def test_no_personal_data_in_spans(run_crm: RunCrm) -> None:
    """The fake customer in bodies never appears in any CRM or dashboard span attribute or event."""
    run = await run_crm(orders=4, pii_share=1.0)
    dumped = "\n".join(span.to_json() for span in run.spans)
    assert "crm submit-order" in dumped
    for canary in ("Canary", "example.com", "+7 900"):
        assert canary not in dumped


async def test_progress_reports_every_status_change(run_crm: RunCrm) -> None:
    """on_progress sees each order's statuses move, ending with all orders terminal."""
    run = await run_crm(orders=2, cancel_share=0.0)
    assert run.progress[-1].orders_started == 2
    assert dict(run.progress[-1].statuses) == {"CLOSED": 2}
    seen = {status for snapshot in run.progress for status in snapshot.statuses}
    assert {"SUBMITTED", "PRICE_CALCULATED", "MANUFACTURING_APPROVED", "MANUFACTURING_STARTED"} <= seen


class Relay:
    """A minimal HTTP reverse proxy: strips a path prefix, forwards to upstream, copies the answer."""

    def __init__(self, upstream: str, prefix: str = "") -> None:
        self.upstream = upstream.rstrip("/")
        self.prefix = prefix
        self.session: aiohttp.ClientSession | None = None

    async def _session(self, app: web.Application) -> AsyncIterator[None]:
        async with aiohttp.ClientSession() as self.session:
            yield

    async def _forward(self, request: web.Request) -> web.Response:
        assert self.session is not None
        url = self.upstream + request.path_qs.removeprefix(self.prefix)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in {"host", "content-length"}}
        body = await request.read()
        async with self.session.request(request.method, url, headers=headers, data=body) as upstream:
            return web.Response(
                status=upstream.status,
                body=await upstream.read(),
                headers={"Content-Type": upstream.headers.get("Content-Type", "application/octet-stream")},
            )

    def app(self) -> web.Application:
        app = web.Application()
        app.cleanup_ctx.append(self._session)
        app.router.add_route("*", "/{tail:.*}", self._forward)
        return app


async def test_traffic_flows_through_reverse_proxies(
    aiohttp_server: AiohttpServer, callback_sock: socket.socket
) -> None:
    """CRM and MES know each other only by URL: through a prefixed ingress relay and an egress relay."""
    host, port = callback_sock.getsockname()
    egress: TestServer = await aiohttp_server(Relay(f"http://{host}:{port}").app())
    mes_cfg = MesSimConfig(crm_url=str(egress.make_url("")), time_scale=FAST)
    mes_server: TestServer = await aiohttp_server(build_app(mes_cfg))
    ingress: TestServer = await aiohttp_server(Relay(str(mes_server.make_url("")), "/mes").app())
    cfg = CrmSimConfig(
        target_url=str(ingress.make_url("/mes")),
        orders=3,
        rate=0.0,
        time_scale=FAST,
        cancel_share=0.0,
        settle=SETTLE_SLOW,
        duration=RUN_CAP,
    )
    summary = await asyncio.wait_for(run_traffic(cfg, callback_sock=callback_sock), RUN_CAP + 5.0)
    assert dict(summary.final_status) == {"CLOSED": 3}
    assert summary.prices_received == 3


async def test_run_stops_when_asked(aiohttp_server: AiohttpServer, callback_sock: socket.socket) -> None:
    """Setting the stop event ends a run that would otherwise wait for its duration cap."""
    server: TestServer = await aiohttp_server(build_app(MesSimConfig(price_drop_rate=1.0)))
    stop = asyncio.Event()
    cfg = CrmSimConfig(target_url=str(server.make_url("")), orders=1, rate=0.0, settle=3600.0)

    def ready(url: str) -> None:
        stop.set()  # stop as soon as the callback server is up

    summary = await asyncio.wait_for(
        run_traffic(cfg, on_ready=ready, stop=stop, callback_sock=callback_sock), RUN_CAP
    )
    assert summary.stopped_by == "signal"


async def test_callback_api_validates_and_knows_its_orders(
    aiohttp_server: AiohttpServer, callback_sock: socket.socket
) -> None:
    """The CRM callback API answers 400 for malformed bodies and 404 for orders it did not start."""
    server: TestServer = await aiohttp_server(build_app(MesSimConfig(price_drop_rate=1.0)))
    stop = asyncio.Event()
    answers: list[int] = []
    cfg = CrmSimConfig(
        target_url=str(server.make_url("")), orders=1, rate=0.0, settle=3600.0, dashboard=False
    )

    async def probe(url: str) -> None:
        cases = (
            ("PUT", "/api/orders/ORD-0-00000/price", {"price": "ten", "currency": "EUR"}),
            ("PUT", "/api/orders/ORD-0-00000/price", {"price": True, "currency": "EUR"}),
            ("PUT", "/api/orders/OTHER/price", {"price": 10, "currency": "EUR"}),
            ("POST", "/api/orders/ORD-0-00000/events", {"state": "x"}),
            ("POST", "/api/orders/OTHER/events", {"status": "CLOSED"}),
            ("POST", "/api/orders/ORD-0-00000/events", {"status": "CLOSED"}),
        )
        try:
            async with aiohttp.ClientSession() as session:
                for method, path, body in cases:
                    async with session.request(method, url + path, json=body) as resp:
                        answers.append(resp.status)
        finally:
            stop.set()

    probes: set[asyncio.Task[None]] = set()

    def ready(url: str) -> None:
        probes.add(asyncio.get_running_loop().create_task(probe(url), name="probe"))

    summary = await asyncio.wait_for(
        run_traffic(cfg, on_ready=ready, stop=stop, callback_sock=callback_sock), RUN_CAP
    )
    await asyncio.gather(*probes)
    assert answers == [400, 400, 404, 400, 404, 200]
    assert summary.events_received == 1


def test_canary_customer_shapes() -> None:
    """The planted customer has the documented name, e-mail and phone shapes."""
    assert crm.canary_customer(7) == {
        "name": "Ivan Canary",
        "email": "canary.7@example.com",
        "phone": "+7 900 000-00-07",
    }


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        pytest.param({"target_url": "ftp://mes"}, "target_url", id="bad-target"),
        pytest.param({"pii_share": 1.5}, "pii_share", id="share-above-one"),
        pytest.param({"concurrency": 0}, "concurrency", id="no-concurrency"),
        pytest.param({"duration": 0.0}, "duration", id="no-duration"),
        pytest.param({"time_scale": float("nan")}, "time_scale", id="nan-scale"),
        pytest.param({"otlp_protocol": "thrift"}, "otlp_protocol", id="bad-protocol"),
        pytest.param({"order_prefix": "a/b"}, "order_prefix", id="prefix-with-slash"),
    ],
)
def test_invalid_config_is_refused(fields: dict[str, Any], message: str) -> None:
    """Out-of-range values cannot make a CrmSimConfig."""
    with pytest.raises(ValueError, match=message):
        CrmSimConfig(**({"target_url": "http://127.0.0.1:8080"} | fields))


@pytest.mark.parametrize(
    ("argv", "environ", "endpoint", "protocol"),
    [
        pytest.param([], {}, None, "http/protobuf", id="no-export"),
        pytest.param(
            [], {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, "http://c:4318", "http/protobuf", id="env"
        ),
        pytest.param(
            ["--otlp-endpoint", "http://c:4317", "--otlp-protocol", "grpc"],
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://other:4318"},
            "http://c:4317",
            "grpc",
            id="flags-win",
        ),
        pytest.param([], {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, None, "grpc", id="env-protocol"),
    ],
)
def test_cli_flags_and_environment_become_config(
    argv: list[str], environ: dict[str, str], endpoint: str | None, protocol: str
) -> None:
    """Flags win over OTEL_EXPORTER_OTLP_* variables; neither means no export."""
    parser = argparse.ArgumentParser()
    crm.add_arguments(parser)
    cfg = crm.config_from_args(parser.parse_args([*argv, "--listen", "127.0.0.1:0"]), environ)
    assert (cfg.otlp_endpoint, cfg.otlp_protocol, cfg.listen_port) == (endpoint, protocol, 0)


async def test_module_runs_and_prints_a_summary(aiohttp_server: AiohttpServer) -> None:
    """`python -m mes_trace_proxy.sim.crm` prints its ready line, then a JSON summary, and exits 0."""
    server: TestServer = await aiohttp_server(build_app(MesSimConfig(price_drop_rate=1.0)))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mes_trace_proxy.sim.crm", "--proxy", str(server.make_url("")),
        "--listen", "127.0.0.1:0", "--orders", "2", "--rate", "0", "--time-scale", "0.01",
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONWARNINGS": "error", "OTEL_EXPORTER_OTLP_ENDPOINT": ""},
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        out, _ = await asyncio.wait_for(proc.communicate(), 20.0)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    ready, summary = (json.loads(line) for line in out.decode().splitlines())
    assert ready["listen"].startswith("http://127.0.0.1:")
    assert (proc.returncode, summary["final_status"], summary["stopped_by"]) == (
        0,
        {"SUBMITTED": 2},
        "settled",
    )


def test_summary_is_json_ready() -> None:
    """as_dict turns status-code keys into strings so the summary line is valid JSON."""
    summary = CrmSummary(
        orders_started=1,
        final_status={"CLOSED": 1},
        requests_sent=3,
        responses={200: 3},
        errors={},
        prices_received=1,
        events_received=0,
        elapsed_seconds=0.12345,
        stopped_by="completed",
    )
    assert json.loads(json.dumps(summary.as_dict()))["responses"] == {"200": 3}
