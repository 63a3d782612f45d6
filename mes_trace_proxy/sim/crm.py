"""CRM traffic simulator: drives orders through the MES lifecycle with its own spans (``crm-api``).

It also serves the CRM callback API that MES calls back, and plays the operator dashboard
(``mes-dashboard`` spans) that takes approved orders into work. It knows MES only by URL.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import math
import os
import random
import socket
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final
from urllib.parse import quote, urlsplit

import aiohttp
from aiohttp import web
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.semconv.attributes.error_attributes import ERROR_TYPE
from opentelemetry.semconv.attributes.http_attributes import (
    HTTP_REQUEST_METHOD,
    HTTP_REQUEST_RESEND_COUNT,
    HTTP_RESPONSE_STATUS_CODE,
    HTTP_ROUTE,
)
from opentelemetry.semconv.attributes.url_attributes import URL_FULL
from opentelemetry.trace import Link, SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from mes_trace_proxy.sim.mes import TaskOwner, bound_url, parse_listen, stop_on_signals

__all__ = [
    "CANARY_NAME",
    "CRM_SERVICE",
    "DASHBOARD_SERVICE",
    "CrmProgress",
    "CrmSimConfig",
    "CrmSummary",
    "add_arguments",
    "canary_customer",
    "config_from_args",
    "main",
    "run_traffic",
]

CRM_SERVICE: Final = "crm-api"
DASHBOARD_SERVICE: Final = "mes-dashboard"
# Fake personal data planted in bodies: any span, log or metric containing it is a privacy bug.
CANARY_NAME: Final = "Ivan Canary"
# The proxy's key, so one Jaeger tag search finds an order's spans in every service.
ORDER_ID_ATTRIBUTE: Final = "mes.order.id"

NEW: Final = "NEW"  # created in CRM, not (yet) accepted by MES
FILE_UPLOADED: Final = "FILE_UPLOADED"
SUBMITTED: Final = "SUBMITTED"
PRICE_CALCULATED: Final = "PRICE_CALCULATED"
MANUFACTURING_APPROVED: Final = "MANUFACTURING_APPROVED"
CLOSED: Final = "CLOSED"
CANCELLED: Final = "CANCELLED"
_TERMINAL: Final = frozenset({CLOSED, CANCELLED})

# Gateway answers and overload are worth a retry; MES (or the proxy) said "not now", not "no".
_RETRY_STATUSES: Final = frozenset({502, 503, 504})
# Caps an honoured Retry-After, so one hostile header cannot park a simulated order for hours.
_MAX_RETRY_WAIT: Final = 30.0
# First retry after 0.2 s (doubling): quick enough for a demo, slow enough not to hammer MES.
_BACKOFF: Final = 0.2
# However fast the time scale, wait this long for stragglers: loopback jitter under load
# must not end a run while a price callback is still on its way.
_MIN_SETTLE: Final = 0.25
_LISTING_PATH: Final = f"/api/v1/orders?status={MANUFACTURING_APPROVED}&page=0"
_STATUS_PATHS: Final = MappingProxyType({"PUT": "/api/v1/orders/{}/status", "PATCH": "/api/v1/orders/{}"})
_OTLP_PROTOCOLS: Final = ("http/protobuf", "grpc")


@dataclass(frozen=True, slots=True)
class _Step:
    status: str
    method: str
    action: str


# The operator dashboard's work on one order, in lifecycle order (docs/mes-api.md).
_OPERATOR_STEPS: Final = (
    _Step("MANUFACTURING_STARTED", "PUT", "take-order"),
    _Step("MANUFACTURING_COMPLETED", "PUT", "complete-order"),
    _Step("PACKAGING", "PATCH", "pack-order"),
    _Step("SHIPPED", "PUT", "ship-order"),
    _Step(CLOSED, "PUT", "close-order"),
)
_CANCEL_STEP: Final = _Step(CANCELLED, "PUT", "cancel-order")


def canary_customer(n: int) -> dict[str, str]:
    """Return the fake customer planted in order ``n``'s bodies.

    Args:
        n: the order number.

    Returns:
        Name, e-mail and phone in shapes a scrubber must recognise.
    """
    return {"name": CANARY_NAME, "email": f"canary.{n}@example.com", "phone": f"+7 900 000-00-{n % 100:02d}"}


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass(frozen=True, slots=True, kw_only=True)
class CrmSimConfig:
    """Everything the CRM and dashboard simulator does; validated on construction.

    Simulated delays are in seconds and multiplied by ``time_scale``; ``duration`` is real time.
    """

    target_url: str
    listen_host: str = "127.0.0.1"
    # 8082: next to the reference MES on 8081 and the proxy on 8080.
    listen_port: int = 8082
    # Twenty orders show every path through the lifecycle in a demo within a minute.
    orders: int = 20
    # Five new orders a second; 0 starts them all at once.
    rate: float = 5.0
    # Two minutes: the demo's full lifecycle at time scale 1 takes well under one.
    duration: float = 120.0
    # 32 requests in flight: enough to load the proxy, below aiohttp's 100-connection default.
    concurrency: int = 32
    # Seed 0: two runs with the same flags make the same orders, plans and ids.
    seed: int = 0
    # 1.0: simulated delays as written; 0.1 runs the lifecycle ten times faster.
    time_scale: float = 1.0
    otlp_endpoint: str | None = None
    otlp_protocol: str = "http/protobuf"
    # Half the orders carry a customer in the submit body: enough canaries to catch a leak.
    pii_share: float = 0.5
    # A third upload a model first, so streaming is part of ordinary traffic.
    upload_share: float = 0.3
    # 64 KiB: a small model; big uploads belong to the benchmark, not to lifecycle traffic.
    model_kib: int = 64
    # A third of customers look their order up once, as real ones refresh the page.
    check_share: float = 0.3
    # One in twenty is cancelled along the way, so CANCELLED shows in every demo.
    cancel_share: float = 0.05
    # Half a second for the customer to confirm a price, and per operator step.
    confirm_delay: float = 0.5
    operator_delay: float = 0.5
    # The dashboard refreshes twice a second, like an operator's auto-refreshing screen.
    poll_interval: float = 0.5
    # Five seconds of silence ends a run: several times the slowest simulated step
    # (MES's 1 s price delay), so only lost or hidden orders are left behind.
    settle: float = 5.0
    # Two retries of overload and gateway errors, as a typical HTTP client library does.
    max_retries: int = 2
    # 30 s: longer than any slowness MES injects, shorter than a demo run.
    request_timeout: float = 30.0
    order_prefix: str = "ORD"
    dashboard: bool = True

    def __post_init__(self) -> None:
        _check(self.target_url.startswith(("http://", "https://")), "target_url must be an http(s) URL")
        _check(0 <= self.listen_port <= 65535, "listen_port must be 0..65535")
        _check(self.orders >= 0 and self.max_retries >= 0 and self.model_kib >= 0, "counts must be >= 0")
        _check(self.concurrency >= 1, "concurrency must be >= 1")
        _check(math.isfinite(self.duration) and self.duration > 0, "duration must be > 0")
        for name in ("pii_share", "upload_share", "check_share", "cancel_share"):
            _check(0.0 <= getattr(self, name) <= 1.0, f"{name} must be a share between 0 and 1")
        for name in ("rate", "time_scale", "confirm_delay", "operator_delay", "poll_interval", "settle"):
            value = getattr(self, name)
            _check(math.isfinite(value) and value >= 0.0, f"{name} must be a finite number >= 0")
        _check(self.request_timeout > 0, "request_timeout must be > 0")
        _check(self.otlp_protocol in _OTLP_PROTOCOLS, f"otlp_protocol must be one of {_OTLP_PROTOCOLS}")
        _check(
            bool(self.order_prefix) and "/" not in self.order_prefix, "order_prefix must be a path-safe word"
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class CrmProgress:
    """A snapshot passed to the progress callback on every order status change."""

    orders_started: int
    statuses: Mapping[str, int]
    requests_sent: int


@dataclass(frozen=True, slots=True, kw_only=True)
class CrmSummary:
    """What a run did; MES faults show here as counts, never as a failure of the run."""

    orders_started: int
    final_status: Mapping[str, int]
    requests_sent: int
    responses: Mapping[int, int]
    errors: Mapping[str, int]
    prices_received: int
    events_received: int
    elapsed_seconds: float
    stopped_by: str  # completed | settled | duration | signal

    def as_dict(self) -> dict[str, Any]:
        """Return the summary as a JSON-ready dict (status codes as string keys)."""
        return {
            "orders_started": self.orders_started,
            "final_status": dict(self.final_status),
            "requests_sent": self.requests_sent,
            "responses": {str(code): count for code, count in self.responses.items()},
            "errors": dict(self.errors),
            "prices_received": self.prices_received,
            "events_received": self.events_received,
            "elapsed_seconds": round(self.elapsed_seconds, 3),
            "stopped_by": self.stopped_by,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class _Plan:
    """Everything random about one order, drawn up front so scheduling cannot change it."""

    n: int
    order_id: str
    user_id: str
    operator_id: str
    upload: bool
    pii: bool
    check: bool
    cancel_at: int | None


def _plan(cfg: CrmSimConfig, n: int) -> _Plan:
    rng = random.Random(f"{cfg.seed}:{n}")
    cancel = rng.random() < cfg.cancel_share
    return _Plan(
        n=n,
        order_id=f"{cfg.order_prefix}-{cfg.seed}-{n:05d}",
        user_id=f"user-{rng.randrange(1, 1000):03d}",
        operator_id=f"operator-{rng.randrange(1, 10):02d}",
        upload=rng.random() < cfg.upload_share,
        pii=rng.random() < cfg.pii_share,
        check=rng.random() < cfg.check_share,
        # Cancelled after being taken into work and before closing: step 1..len-1.
        cancel_at=rng.randrange(1, len(_OPERATOR_STEPS)) if cancel else None,
    )


@dataclass(frozen=True, slots=True)
class _Reply:
    status: int
    body: Any

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


class _Ledger:
    """CRM's own view of each order's status (set by itself and by its dashboard)."""

    def __init__(self, on_change: Callable[[], None]) -> None:
        self.status: dict[str, str] = {}
        self.counts: collections.Counter[str] = collections.Counter()
        self._on_change = on_change

    def set(self, order_id: str, status: str) -> None:
        old = self.status.get(order_id)
        if old is not None:
            self.counts[old] -= 1
        self.status[order_id] = status
        self.counts[status] += 1
        self._on_change()

    def terminal(self) -> int:
        return sum(self.counts[status] for status in _TERMINAL)


def _exporter(cfg: CrmSimConfig) -> SpanExporter | None:
    if cfg.otlp_endpoint is None:
        return None
    if cfg.otlp_protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        return GrpcExporter(endpoint=cfg.otlp_endpoint, insecure=cfg.otlp_endpoint.startswith("http://"))
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

    # A base endpoint gets the signal path appended, as OTEL_EXPORTER_OTLP_ENDPOINT does.
    endpoint = cfg.otlp_endpoint
    if urlsplit(endpoint).path in ("", "/"):
        endpoint = endpoint.rstrip("/") + "/v1/traces"
    return HttpExporter(endpoint=endpoint)


def _provider(service: str, cfg: CrmSimConfig, exporter: SpanExporter | None) -> TracerProvider:
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service}))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    else:
        otlp = _exporter(cfg)
        if otlp is not None:
            provider.add_span_processor(BatchSpanProcessor(otlp))
    return provider


class _Traffic:
    """One run: the session, tracers, ledger, counters and every task it started."""

    def __init__(
        self,
        cfg: CrmSimConfig,
        session: aiohttp.ClientSession,
        crm: Tracer,
        dashboard: Tracer,
        on_progress: Callable[[CrmProgress], None] | None,
    ) -> None:
        self.cfg = cfg
        self.session = session
        self.crm = crm
        self.dashboard_tracer = dashboard
        self.propagator = TraceContextTextMapPropagator()
        self.base = cfg.target_url.rstrip("/")
        self.on_progress = on_progress
        self.ledger = _Ledger(self._changed)
        self.plans: dict[str, _Plan] = {}
        self.taken: set[str] = set()
        self.work = TaskOwner(on_done=self._touch)
        self.loops = TaskOwner()
        self.slots = asyncio.Semaphore(cfg.concurrency)
        self.model = random.Random(cfg.seed).randbytes(cfg.model_kib * 1024)
        self.requests_sent = 0
        self.responses: collections.Counter[int] = collections.Counter()
        self.errors: collections.Counter[str] = collections.Counter()
        self.prices_received = 0
        self.events_received = 0
        self.started_at = time.monotonic()
        self.last_activity = self.started_at
        self._wake = asyncio.Event()

    def _touch(self) -> None:
        self.last_activity = time.monotonic()
        self._wake.set()

    def _changed(self) -> None:
        self._touch()
        if self.on_progress is not None:
            self.on_progress(
                CrmProgress(
                    orders_started=len(self.plans),
                    statuses=MappingProxyType(+self.ledger.counts),
                    requests_sent=self.requests_sent,
                )
            )

    def _scaled(self, seconds: float) -> float:
        return seconds * self.cfg.time_scale

    async def call(
        self,
        tracer: Tracer | None,
        method: str,
        path: str,
        *,
        user_id: str,
        json_body: object = None,
        data: bytes | None = None,
    ) -> _Reply | None:
        """Send one request, retrying overload and gateway errors; None when it never got through."""
        url = self.base + path
        for attempt in range(self.cfg.max_retries + 1):
            wait, reply = await self._attempt(tracer, method, url, attempt, user_id, json_body, data)
            if wait is None or attempt == self.cfg.max_retries:
                return reply
            await asyncio.sleep(wait)
        return None

    async def _attempt(
        self,
        tracer: Tracer | None,
        method: str,
        url: str,
        attempt: int,
        user_id: str,
        json_body: object,
        data: bytes | None,
    ) -> tuple[float | None, _Reply | None]:
        headers = {"X-User-Id": user_id}
        if data is not None:
            headers["Content-Type"] = "application/octet-stream"
        backoff = self._scaled(_BACKOFF * 2**attempt)
        span = None
        if tracer is not None:
            attributes: dict[str, str | int] = {HTTP_REQUEST_METHOD: method, URL_FULL: url}
            if attempt:
                attributes[HTTP_REQUEST_RESEND_COUNT] = attempt
            # Semantic conventions name an HTTP client span by its method alone (low cardinality).
            span = tracer.start_span(method, kind=SpanKind.CLIENT, attributes=attributes)
            self.propagator.inject(headers, context=trace.set_span_in_context(span))
        self.requests_sent += 1
        try:
            return await self._exchange(span, method, url, headers, json_body, data, backoff)
        finally:
            if span is not None:
                span.end()

    async def _exchange(
        self,
        span: trace.Span | None,
        method: str,
        url: str,
        headers: dict[str, str],
        json_body: object,
        data: bytes | None,
        backoff: float,
    ) -> tuple[float | None, _Reply | None]:
        try:
            async with (
                self.slots,
                self.session.request(method, url, json=json_body, data=data, headers=headers) as resp,
            ):
                body = await resp.json() if resp.content_type == "application/json" else await resp.read()
                reply = _Reply(resp.status, body)
                retry_after = resp.headers.get("Retry-After", "")
        except (aiohttp.ClientConnectionError, TimeoutError) as exc:
            self._failed(span, type(exc).__name__)
            return backoff, None
        except (aiohttp.ClientError, ValueError) as exc:
            self._failed(span, type(exc).__name__)
            return None, None
        self.responses[reply.status] += 1
        if span is not None:
            span.set_attribute(HTTP_RESPONSE_STATUS_CODE, reply.status)
            if reply.status >= 400:
                span.set_attribute(ERROR_TYPE, str(reply.status))
                span.set_status(Status(StatusCode.ERROR))
        if reply.status not in _RETRY_STATUSES:
            return None, reply
        wait = self._scaled(float(retry_after)) if retry_after.isdigit() else backoff
        return min(wait, _MAX_RETRY_WAIT), reply

    def _failed(self, span: trace.Span | None, error: str) -> None:
        self.errors[error] += 1
        if span is not None:
            span.set_attribute(ERROR_TYPE, error)
            span.set_status(Status(StatusCode.ERROR))

    async def launch(self) -> None:
        """Start the orders at the configured rate; each runs as its own task."""
        for n in range(self.cfg.orders):
            if self.cfg.rate > 0:
                delay = self.started_at + n / self.cfg.rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            plan = _plan(self.cfg, n)
            self.plans[plan.order_id] = plan
            self.ledger.set(plan.order_id, NEW)
            self.work.start(self.submit(plan), name=f"crm-order-{plan.order_id}")

    async def submit(self, plan: _Plan) -> None:
        """Upload the model (sometimes), submit for pricing, and sometimes look the order up."""
        quoted = quote(plan.order_id, safe="")
        attributes = {ORDER_ID_ATTRIBUTE: plan.order_id}
        if plan.upload:
            with self.crm.start_as_current_span("crm upload-model", attributes=attributes):
                reply = await self.call(
                    self.crm, "POST", f"/api/v1/orders/{quoted}/model", user_id=plan.user_id, data=self.model
                )
            if reply is not None and reply.ok:
                self.ledger.set(plan.order_id, FILE_UPLOADED)
        body: dict[str, object] = {"orderId": plan.order_id, "material": "silver-925", "quantity": 1}
        if plan.pii:
            body["customer"] = canary_customer(plan.n)
        with self.crm.start_as_current_span("crm submit-order", attributes=attributes):
            reply = await self.call(
                self.crm,
                "POST",
                f"/api/v1/orders/{quoted}/price-calculation",
                user_id=plan.user_id,
                json_body=body,
            )
        if reply is None or not reply.ok:
            return
        # The price callback may already have moved the order on; never move it back.
        if self.ledger.status.get(plan.order_id) in (NEW, FILE_UPLOADED):
            self.ledger.set(plan.order_id, SUBMITTED)
        if plan.check:
            with self.crm.start_as_current_span("crm check-order", attributes=attributes):
                await self.call(self.crm, "GET", f"/api/v1/orders/{quoted}", user_id=plan.user_id)

    def price_received(self, order_id: str, price_span: trace.SpanContext) -> None:
        """Record a price and, unless it is a duplicate, let the customer confirm it later."""
        self.prices_received += 1
        if self.ledger.status.get(order_id) not in (NEW, FILE_UPLOADED, SUBMITTED):
            return
        self.ledger.set(order_id, PRICE_CALCULATED)
        self.work.start(self.approve(self.plans[order_id], price_span), name=f"crm-approve-{order_id}")

    async def approve(self, plan: _Plan, price_span: trace.SpanContext) -> None:
        """After the customer's pause, hand the order to MES as MANUFACTURING_APPROVED."""
        await asyncio.sleep(self._scaled(self.cfg.confirm_delay))
        body = {
            "orderId": plan.order_id,
            "status": MANUFACTURING_APPROVED,
            "customer": canary_customer(plan.n),
        }
        # A new trace: confirming is the customer's own later action, linked to the price it answers.
        with self.crm.start_as_current_span(
            "crm approve-order",
            context=Context(),
            links=(Link(price_span),),
            attributes={ORDER_ID_ATTRIBUTE: plan.order_id},
        ):
            reply = await self.call(self.crm, "POST", "/api/v1/orders", user_id=plan.user_id, json_body=body)
        if reply is not None and reply.ok:
            self.ledger.set(plan.order_id, MANUFACTURING_APPROVED)

    async def poll_dashboard(self) -> None:
        """Poll the approved-orders listing and take each new order of this run into work."""
        while True:
            # Polls carry no trace context: high volume, low value, as in docs/mes-api.md.
            reply = await self.call(None, "GET", _LISTING_PATH, user_id="operator-00")
            items = reply.body.get("items", ()) if reply is not None and isinstance(reply.body, dict) else ()
            for item in items:
                order_id = item.get("orderId") if isinstance(item, dict) else None
                plan = self.plans.get(order_id) if isinstance(order_id, str) else None
                if plan is not None and plan.order_id not in self.taken:
                    self.taken.add(plan.order_id)
                    self.work.start(self.operate(plan), name=f"dashboard-{plan.order_id}")
            await asyncio.sleep(self._scaled(self.cfg.poll_interval))

    async def operate(self, plan: _Plan) -> None:
        """Move one order through the operator steps; a failed step leaves it where it is."""
        quoted = quote(plan.order_id, safe="")
        for index, planned in enumerate(_OPERATOR_STEPS):
            if index:
                await asyncio.sleep(self._scaled(self.cfg.operator_delay))
            step = _CANCEL_STEP if plan.cancel_at == index else planned
            with self.dashboard_tracer.start_as_current_span(
                f"{DASHBOARD_SERVICE} {step.action}", attributes={ORDER_ID_ATTRIBUTE: plan.order_id}
            ):
                reply = await self.call(
                    self.dashboard_tracer,
                    step.method,
                    _STATUS_PATHS[step.method].format(quoted),
                    user_id=plan.operator_id,
                    json_body={"status": step.status},
                )
            if reply is None or not reply.ok:
                if index == 0:
                    self.taken.discard(plan.order_id)  # a later poll offers it again
                return
            self.ledger.set(plan.order_id, step.status)
            if step is _CANCEL_STEP:
                return

    async def _relay(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self._touch()

    async def run(self, stop: asyncio.Event | None) -> str:
        """Run until every order is terminal, nothing moved for the settle time, the cap, or stop.

        Returns:
            Why the run ended: completed, settled, duration or signal.
        """
        cfg = self.cfg
        deadline = self.started_at + cfg.duration
        settle = max(self._scaled(cfg.settle), _MIN_SETTLE)
        if stop is not None:
            self.loops.start(self._relay(stop), name="crm-stop-relay")
        if cfg.dashboard:
            self.loops.start(self.poll_dashboard(), name="dashboard-poll")
        self.work.start(self.launch(), name="crm-launch")
        while True:
            self._wake.clear()
            now = time.monotonic()
            if stop is not None and stop.is_set():
                return "signal"
            if len(self.plans) == cfg.orders and self.ledger.terminal() == cfg.orders:
                return "completed"
            if now >= deadline:
                return "duration"
            timeout = deadline - now
            if not self.work:
                quiet_for = now - self.last_activity
                if quiet_for >= settle:
                    return "settled"
                timeout = min(timeout, settle - quiet_for)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    async def aclose(self) -> None:
        """Stop polling and cancel every order still in flight."""
        await self.loops.aclose()
        await self.work.aclose()

    def summary(self, stopped_by: str) -> CrmSummary:
        """Freeze the counters into a summary."""
        return CrmSummary(
            orders_started=len(self.plans),
            final_status=MappingProxyType(dict(sorted((+self.ledger.counts).items()))),
            requests_sent=self.requests_sent,
            responses=MappingProxyType(dict(sorted(self.responses.items()))),
            errors=MappingProxyType(dict(sorted(self.errors.items()))),
            prices_received=self.prices_received,
            events_received=self.events_received,
            elapsed_seconds=time.monotonic() - self.started_at,
            stopped_by=stopped_by,
        )


_TRAFFIC: Final = web.AppKey("crm_traffic", _Traffic)


async def _callback_body(request: web.Request) -> dict[str, Any] | None:
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError):
        return None
    return body if isinstance(body, dict) else None


def _server_span(request: web.Request, name: str, route: str) -> trace.Span:
    traffic = request.app[_TRAFFIC]
    return traffic.crm.start_span(
        name,
        context=traffic.propagator.extract(request.headers),
        kind=SpanKind.SERVER,
        attributes={
            HTTP_REQUEST_METHOD: request.method,
            HTTP_ROUTE: route,
            ORDER_ID_ATTRIBUTE: request.match_info["orderId"],
        },
    )


def _answer(span: trace.Span, status: int, body: Mapping[str, object]) -> web.Response:
    span.set_attribute(HTTP_RESPONSE_STATUS_CODE, status)
    if status >= 500:
        span.set_status(Status(StatusCode.ERROR))
    span.end()
    return web.json_response(body, status=status)


async def _receive_price(request: web.Request) -> web.Response:
    traffic = request.app[_TRAFFIC]
    order_id = request.match_info["orderId"]
    span = _server_span(request, "crm receive-price", "/api/orders/{orderId}/price")
    body = await _callback_body(request) or {}
    price, currency = body.get("price"), body.get("currency")
    if not isinstance(price, int | float) or isinstance(price, bool) or not isinstance(currency, str):
        return _answer(span, 400, {"error": "price must be a number and currency a string"})
    if order_id not in traffic.plans:
        return _answer(span, 404, {"error": "order not found"})
    traffic.price_received(order_id, span.get_span_context())
    return _answer(span, 200, {"orderId": order_id, "accepted": True})


async def _receive_event(request: web.Request) -> web.Response:
    traffic = request.app[_TRAFFIC]
    order_id = request.match_info["orderId"]
    span = _server_span(request, "crm receive-event", "/api/orders/{orderId}/events")
    body = await _callback_body(request)
    if body is None or not isinstance(body.get("status"), str):
        return _answer(span, 400, {"error": "status must be a string"})
    if order_id not in traffic.plans:
        return _answer(span, 404, {"error": "order not found"})
    # The ledger already has the dashboard's own view; MES's report is counted, not re-applied,
    # so a late event can never move an order backwards here.
    traffic.events_received += 1
    return _answer(span, 200, {"orderId": order_id, "accepted": True})


def _callback_app(traffic: _Traffic) -> web.Application:
    app = web.Application()
    app[_TRAFFIC] = traffic
    app.router.add_put("/api/orders/{orderId}/price", _receive_price)
    app.router.add_post("/api/orders/{orderId}/events", _receive_event)
    return app


async def run_traffic(
    cfg: CrmSimConfig,
    *,
    on_progress: Callable[[CrmProgress], None] | None = None,
    on_ready: Callable[[str], None] | None = None,
    span_exporter: SpanExporter | None = None,
    callback_sock: socket.socket | None = None,
    stop: asyncio.Event | None = None,
) -> CrmSummary:
    """Serve the CRM callback API and drive ``cfg.orders`` orders through the lifecycle.

    Args:
        cfg: the run's configuration.
        on_progress: called with a snapshot on every order status change.
        on_ready: called with the callback server's URL once it is bound.
        span_exporter: receives every span (synchronously) instead of OTLP; for tests.
        callback_sock: an already bound socket for the callback server, instead of
            ``cfg.listen_host``/``cfg.listen_port``, so a caller can give MES the URL first.
        stop: when set, the run ends early (SIGINT/SIGTERM in ``main``).

    Returns:
        The summary; orders left behind by MES faults are counted in their last status.

    Raises:
        OSError: the callback server cannot bind.
    """
    providers = (_provider(CRM_SERVICE, cfg, span_exporter), _provider(DASHBOARD_SERVICE, cfg, span_exporter))
    try:
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=cfg.concurrency),
            timeout=aiohttp.ClientTimeout(total=cfg.request_timeout),
        ) as session:
            traffic = _Traffic(
                cfg,
                session,
                providers[0].get_tracer(__name__),
                providers[1].get_tracer(__name__),
                on_progress,
            )
            runner = web.AppRunner(_callback_app(traffic), handle_signals=False, access_log=None)
            await runner.setup()
            try:
                site: web.BaseSite = (
                    web.SockSite(runner, callback_sock)
                    if callback_sock is not None
                    else web.TCPSite(runner, cfg.listen_host, cfg.listen_port)
                )
                await site.start()
                if on_ready is not None:
                    on_ready(bound_url(runner.addresses))
                stopped_by = await traffic.run(stop)
            finally:
                await runner.cleanup()
                await traffic.aclose()
    finally:
        for provider in providers:
            # shutdown() flushes over the network; keep the event loop free meanwhile.
            await asyncio.to_thread(provider.shutdown)
    return traffic.summary(stopped_by)


def _share(value: str) -> float:
    try:
        share = float(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {value!r}") from exc
    if not 0.0 <= share <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {value!r}")
    return share


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``simulate-crm`` flags to ``parser``.

    Args:
        parser: the (sub)command parser.
    """
    d = CrmSimConfig(target_url="http://127.0.0.1:8080")
    parser.add_argument(
        "--proxy",
        default=d.target_url,
        metavar="URL",
        help="where CRM and the dashboard send MES calls: the proxy's ingress, or MES itself",
    )
    parser.add_argument(
        "--listen",
        type=parse_listen,
        default=(d.listen_host, d.listen_port),
        metavar="HOST:PORT",
        help="CRM callback API (the proxy's egress upstream)",
    )
    parser.add_argument("--orders", type=int, default=d.orders, help="orders to drive through the lifecycle")
    parser.add_argument(
        "--rate", type=float, default=d.rate, help="orders started per second (0: all at once)"
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=d.duration,
        metavar="SECONDS",
        help="hard cap on the run's wall-clock time",
    )
    parser.add_argument("--concurrency", type=int, default=d.concurrency, help="requests in flight at most")
    parser.add_argument("--seed", type=int, default=d.seed, help="seed for every random choice")
    parser.add_argument(
        "--time-scale",
        type=float,
        default=d.time_scale,
        help="multiplies every simulated delay (0.1 = ten times faster)",
    )
    parser.add_argument(
        "--otlp-endpoint",
        default=None,
        metavar="URL",
        help="OTLP base URL for CRM and dashboard spans (default: OTEL_EXPORTER_OTLP_ENDPOINT; "
        "neither: no export)",
    )
    parser.add_argument(
        "--otlp-protocol",
        choices=_OTLP_PROTOCOLS,
        default=None,
        help="default: OTEL_EXPORTER_OTLP_PROTOCOL, else http/protobuf",
    )
    parser.add_argument(
        "--pii-share",
        type=_share,
        default=d.pii_share,
        metavar="SHARE",
        help="share of orders whose submit body carries a fake customer",
    )
    parser.add_argument(
        "--cancel-share",
        type=_share,
        default=d.cancel_share,
        metavar="SHARE",
        help="share of orders the operator cancels",
    )
    parser.add_argument(
        "--order-prefix",
        default=d.order_prefix,
        help="order ids are PREFIX-SEED-NNNNN; change it (or the seed) to rerun against one MES",
    )
    parser.add_argument("--no-dashboard", dest="dashboard", action="store_false",
                        help="do not play the operator dashboard")  # fmt: skip


def config_from_args(args: argparse.Namespace, environ: Mapping[str, str]) -> CrmSimConfig:
    """Turn parsed ``simulate-crm`` flags (and the OTLP environment) into a config.

    Args:
        args: the namespace from a parser prepared by ``add_arguments``.
        environ: the environment, for ``OTEL_EXPORTER_OTLP_ENDPOINT`` and ``_PROTOCOL``.

    Returns:
        The config.

    Raises:
        ValueError: a value is out of range.
    """
    host, port = args.listen
    protocol = args.otlp_protocol or environ.get(
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    )
    return CrmSimConfig(
        target_url=args.proxy,
        listen_host=host,
        listen_port=port,
        orders=args.orders,
        rate=args.rate,
        duration=args.duration,
        concurrency=args.concurrency,
        seed=args.seed,
        time_scale=args.time_scale,
        otlp_endpoint=args.otlp_endpoint or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or None,
        otlp_protocol=protocol,
        pii_share=args.pii_share,
        cancel_share=args.cancel_share,
        order_prefix=args.order_prefix,
        dashboard=args.dashboard,
    )


async def _main(cfg: CrmSimConfig) -> CrmSummary:
    stop = asyncio.Event()
    remove = stop_on_signals(stop)
    try:
        return await run_traffic(
            cfg, on_ready=lambda url: print(json.dumps({"listen": url}), flush=True), stop=stop
        )
    finally:
        remove()


def main(args: argparse.Namespace) -> int:
    """Run the CRM and dashboard traffic once; print a ready line and a JSON summary line.

    Args:
        args: the namespace from a parser prepared by ``add_arguments``.

    Returns:
        0 when the run happened (MES faults included), 1 when the callback server cannot
        bind, 2 for an invalid configuration.
    """
    try:
        cfg = config_from_args(args, os.environ)
    except ValueError as exc:
        print(f"simulate-crm: {exc}", file=sys.stderr)
        return 2
    try:
        summary = asyncio.run(_main(cfg))
    except OSError as exc:
        print(
            f"simulate-crm: cannot listen on {cfg.listen_host}:{cfg.listen_port}: {exc.strerror}",
            file=sys.stderr,
        )
        return 1
    print(json.dumps(summary.as_dict()), flush=True)
    return 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m mes_trace_proxy.sim.crm", description=__doc__)
    add_arguments(_parser)
    raise SystemExit(main(_parser.parse_args()))
