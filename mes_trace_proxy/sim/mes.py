"""Reference MES simulator: the routes of docs/mes-api.md over an in-memory order store.

Seeded fault injection (lost price calculations, hidden approved orders, slowness, overload,
connection resets) reproduces the failures the proxy's watchdog exists to find.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import hashlib
import json
import logging
import math
import random
import signal
import socket
import struct
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any, Final
from urllib.parse import quote

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Handler

__all__ = [
    "MES_STATE",
    "MesSimConfig",
    "MesState",
    "MesStats",
    "OrderRecord",
    "OrderStore",
    "ReceivedRequest",
    "TaskOwner",
    "add_arguments",
    "bound_url",
    "build_app",
    "config_from_args",
    "main",
    "parse_listen",
    "share_hit",
    "stop_on_signals",
]

_LOG: Final = logging.getLogger(__name__)

FILE_UPLOADED: Final = "FILE_UPLOADED"
SUBMITTED: Final = "SUBMITTED"
PRICE_CALCULATED: Final = "PRICE_CALCULATED"
MANUFACTURING_APPROVED: Final = "MANUFACTURING_APPROVED"

HEALTH_PATH: Final = "/api/v1/health"
# Statuses are short upper-case names; a bound keeps a hostile body from bloating the store.
_STATUS_MAX_LEN: Final = 64
# Order ids in the reference CRM are ~20 characters; 128 leaves room for other schemes.
_ORDER_ID_MAX_LEN: Final = 128
# A dashboard screen shows a few dozen rows; 50 matches the reference dashboard's page.
_DEFAULT_PAGE_SIZE: Final = 50
# Bounds one listing answer so a typo cannot make the simulator serialise every order.
_MAX_PAGE_SIZE: Final = 1000
# 64 KiB is aiohttp's stream high-water mark: one read from the socket, one hash update.
_CHUNK: Final = 64 * 1024
# A large 3D model is tens of MiB; 1 MiB by default keeps download tests quick.
_DEFAULT_DOWNLOAD: Final = 1024 * 1024
# 1 GiB bounds a mistyped ?size= while still allowing proxy streaming benchmarks.
_MAX_DOWNLOAD: Final = 1024 * 1024 * 1024
# Five events are enough to see them arrive one by one without a long-lived stream.
_DEFAULT_SSE_COUNT: Final = 5
# Bounds an SSE stream a client asked for by query parameter.
_MAX_SSE_COUNT: Final = 1000
# 200 ms apart makes the one-by-one arrival visible in a browser and in traces.
_DEFAULT_SSE_INTERVAL: Final = 0.2
# One hour bounds how long an SSE stream asked for by query parameter may idle between events.
_MAX_SSE_INTERVAL_MS: Final = 3_600_000
# Jewellery pieces in the reference shop cost from 50 to 5000 EUR.
_PRICE_RANGE: Final = (50.0, 5000.0)
# Log-normal sigma 0.25: latency is right-skewed like a real service, p99 about 1.8x median.
_JITTER_SIGMA: Final = 0.25
# Enough recent requests for a test to inspect headers without growing without bound.
_DEFAULT_RECORD_LIMIT: Final = 1024


def share_hit(seed: int, kind: str, key: str, rate: float) -> bool:
    """Decide a per-key fault deterministically, independent of request order.

    Args:
        seed: the simulator seed.
        kind: the fault family ("price-drop", "pickup-drop"), so decisions are independent.
        key: what the decision is about, usually an order id.
        rate: the share of keys that are hit, 0..1.

    Returns:
        True for about ``rate`` of all keys; the same answer for the same arguments.
    """
    if rate <= 0.0:
        return False
    if rate >= 1.0:
        return True
    digest = hashlib.blake2b(f"{seed}:{kind}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64 < rate


def _unit(seed: int, kind: str, key: str) -> float:
    digest = hashlib.blake2b(f"{seed}:{kind}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def _check_share(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a share between 0 and 1, got {value}")


@dataclass(frozen=True, slots=True, kw_only=True)
class MesSimConfig:
    """Everything the simulated MES does; validated on construction.

    All delays are in seconds of simulated time and are multiplied by ``time_scale``.
    """

    crm_url: str | None = None
    # Seed 0: the same flags give the same faults on the same orders, run after run.
    seed: int = 0
    # 0.1 runs the whole lifecycle ten times faster; tests use about 0.02.
    time_scale: float = 1.0
    # One second: visible as a gap in a Jaeger timeline, short enough for a demo.
    price_delay: float = 1.0
    price_drop_rate: float = 0.0
    pickup_drop_rate: float = 0.0
    slow_rate: float = 0.0
    # Two seconds: slow enough to show in latency histograms, under any sane proxy timeout.
    slow_seconds: float = 2.0
    overload_rate: float = 0.0
    reset_rate: float = 0.0
    # No base latency by default: tests and benchmarks measure the proxy, not the simulator.
    latency_ms: float = 0.0
    # One second: the shortest Retry-After HTTP can say (RFC 9110 section 10.2.3, whole seconds).
    retry_after: int = 1
    # Ten seconds: a callback to CRM slower than this is a failure, as it would be for MES.
    callback_timeout: float = 10.0
    record_limit: int = _DEFAULT_RECORD_LIMIT

    def __post_init__(self) -> None:
        for name in ("price_drop_rate", "pickup_drop_rate", "slow_rate", "overload_rate", "reset_rate"):
            _check_share(name, getattr(self, name))
        for name in ("time_scale", "price_delay", "slow_seconds", "latency_ms", "callback_timeout"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0.0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if self.retry_after < 0 or self.record_limit < 0:
            raise ValueError("retry_after and record_limit must be >= 0")
        if self.crm_url is not None and not self.crm_url.startswith(("http://", "https://")):
            raise ValueError(f"crm_url must be an http:// or https:// URL, got {self.crm_url!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class OrderRecord:
    """What MES keeps about an order: no body, nothing personal."""

    order_id: str
    status: str
    price: float | None = None
    updated: float


@dataclass(frozen=True, slots=True, kw_only=True)
class ReceivedRequest:
    """One request as MES saw it, kept for tests that check propagation."""

    method: str
    path: str
    traceparent: str | None
    user_id: str | None


@dataclass(slots=True)
class MesStats:
    """Counters of what the simulator did, for tests and the demo."""

    prices_dropped: int = 0
    callbacks_sent: int = 0
    callbacks_failed: int = 0
    events_sent: int = 0
    resets: int = 0
    overloads: int = 0
    slowed: int = 0


class OrderStore:
    """In-memory orders with a per-status index, so a listing never scans every order."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._orders: dict[str, OrderRecord] = {}
        # dicts as insertion-ordered sets: listings come out oldest first, pages are stable.
        self._by_status: dict[str, dict[str, None]] = collections.defaultdict(dict)

    def __len__(self) -> int:
        return len(self._orders)

    def get(self, order_id: str) -> OrderRecord | None:
        """Return the order, or None when MES does not know it."""
        return self._orders.get(order_id)

    def records(self) -> tuple[OrderRecord, ...]:
        """Return every order, hidden ones included, in the order MES first saw them (the demo)."""
        return tuple(self._orders.values())

    def set_status(self, order_id: str, status: str, *, price: float | None = None) -> OrderRecord:
        """Create or update an order's status (and price, when given); return the new record."""
        old = self._orders.get(order_id)
        if old is not None:
            del self._by_status[old.status][order_id]
            if price is None:
                price = old.price
        record = OrderRecord(order_id=order_id, status=status, price=price, updated=self._clock())
        self._orders[order_id] = record
        self._by_status[status][order_id] = None
        return record

    def listing(
        self, status: str | None, hidden: Callable[[OrderRecord], bool], page: int, size: int
    ) -> tuple[OrderRecord, ...]:
        """Return one page of orders (optionally of one status), leaving out hidden ones."""
        ids: Iterator[str] = iter(self._orders if status is None else self._by_status.get(status, {}))
        visible = (rec for rec in map(self._orders.__getitem__, ids) if not hidden(rec))
        return tuple(islice(visible, page * size, (page + 1) * size))


class TaskOwner:
    """Owns background tasks: names them, keeps strong references, cancels and awaits them."""

    def __init__(self, on_done: Callable[[], None] | None = None) -> None:
        self._tasks: set[asyncio.Task[None]] = set()
        self._on_done = on_done
        self._closed = False

    def __len__(self) -> int:
        return len(self._tasks)

    def spawn(self, coro: Coroutine[Any, Any, None], *, name: str) -> asyncio.Task[None]:
        """Start ``coro`` as a named task owned by this object.

        Args:
            coro: the coroutine to run.
            name: the task name (shows in debug output and error logs).

        Returns:
            The task.

        Raises:
            RuntimeError: the owner is closed.
        """
        if self._closed:
            coro.close()
            raise RuntimeError(f"task owner closed, not starting {name}")
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def start(self, coro: Coroutine[Any, Any, None], *, name: str) -> None:
        """Like ``spawn``, for callers that never need the task itself.

        Args:
            coro: the coroutine to run.
            name: the task name.

        Raises:
            RuntimeError: the owner is closed.
        """
        _ = self.spawn(coro, name=name)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            # Type only: exception text may quote a body, and bodies may hold personal data.
            _LOG.error("background task %s failed: %s", task.get_name(), type(exc).__name__)
        if self._on_done is not None:
            self._on_done()

    async def join(self) -> None:
        """Wait until every task, including any started meanwhile, has finished."""
        while self._tasks:
            await asyncio.wait(tuple(self._tasks))

    async def aclose(self) -> None:
        """Cancel every task and wait for all of them to finish; refuse new ones."""
        self._closed = True
        while self._tasks:
            tasks = tuple(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


@dataclass(frozen=True, slots=True)
class _Fault:
    reset: bool
    overload: bool
    delay: float


class MesState:
    """Per-app runtime state: the store, the seeded RNG, the callback session and tasks."""

    def __init__(self, cfg: MesSimConfig) -> None:
        self.cfg = cfg
        self.store = OrderStore(time.time)
        self.stats = MesStats()
        self.tasks = TaskOwner()
        self.received: collections.deque[ReceivedRequest] = collections.deque(maxlen=cfg.record_limit)
        self.session: aiohttp.ClientSession | None = None
        self._rng = random.Random(cfg.seed)
        self._event_tails: dict[str, asyncio.Task[None]] = {}
        self.model_block = random.Random(cfg.seed).randbytes(_CHUNK)
        self.crm_base = None if cfg.crm_url is None else cfg.crm_url.rstrip("/")

    def draw_fault(self) -> _Fault:
        """Draw this request's faults; always four draws, so the sequence depends only on the seed."""
        cfg, rng = self.cfg, self._rng
        reset = rng.random() < cfg.reset_rate
        overload = rng.random() < cfg.overload_rate
        slow = rng.random() < cfg.slow_rate
        jitter = rng.lognormvariate(0.0, _JITTER_SIGMA)
        delay = cfg.latency_ms / 1000.0 * jitter + (cfg.slow_seconds if slow else 0.0)
        if slow:
            self.stats.slowed += 1
        return _Fault(reset=reset, overload=overload, delay=delay * cfg.time_scale)

    def pickup_hidden(self, record: OrderRecord) -> bool:
        """True when an approved order is hidden from the dashboard (design note, problem 3)."""
        return record.status == MANUFACTURING_APPROVED and share_hit(
            self.cfg.seed, "pickup-drop", record.order_id, self.cfg.pickup_drop_rate
        )

    def request_price(self, order_id: str) -> None:
        """Schedule the asynchronous price calculation, unless this order's is lost."""
        if share_hit(self.cfg.seed, "price-drop", order_id, self.cfg.price_drop_rate):
            self.stats.prices_dropped += 1
            return
        self.tasks.start(self._price_job(order_id), name=f"mes-price-{order_id}")

    async def _price_job(self, order_id: str) -> None:
        await asyncio.sleep(self.cfg.price_delay * self.cfg.time_scale)
        low, high = _PRICE_RANGE
        price = round(low + (high - low) * _unit(self.cfg.seed, "price", order_id), 2)
        if self.crm_base is not None:
            url = f"{self.crm_base}/api/orders/{quote(order_id, safe='')}/price"
            if not await self._callback("PUT", url, {"price": price, "currency": "EUR"}, order_id):
                return
        current = self.store.get(order_id)
        # The approval may already have arrived: never move an order back to PRICE_CALCULATED.
        if current is not None and current.status == SUBMITTED:
            self.store.set_status(order_id, PRICE_CALCULATED, price=price)

    def report_status(self, order_id: str, status: str) -> None:
        """Tell CRM about a status change, in order per order id, when a CRM URL is set."""
        if self.crm_base is None:
            return
        previous = self._event_tails.get(order_id)
        task = self.tasks.spawn(self._event_job(previous, order_id, status), name=f"mes-event-{order_id}")
        self._event_tails[order_id] = task
        task.add_done_callback(lambda done: self._forget_tail(order_id, done))

    def _forget_tail(self, order_id: str, task: asyncio.Task[None]) -> None:
        if self._event_tails.get(order_id) is task:
            del self._event_tails[order_id]

    async def _event_job(self, previous: asyncio.Task[None] | None, order_id: str, status: str) -> None:
        if previous is not None:
            # Events for one order go out in the order they happened, like a real outbox.
            await asyncio.wait((previous,))
        url = f"{self.crm_base}/api/orders/{quote(order_id, safe='')}/events"
        if await self._callback("POST", url, {"status": status}, order_id):
            self.stats.events_sent += 1

    async def _callback(self, method: str, url: str, body: Mapping[str, object], order_id: str) -> bool:
        if self.session is None:
            raise RuntimeError("MES callback session is not running")
        self.stats.callbacks_sent += 1
        try:
            async with self.session.request(method, url, json=body) as resp:
                await resp.read()
                ok = 200 <= resp.status < 300
                if not ok:
                    _LOG.warning("CRM callback %s for order %s answered %d", method, order_id, resp.status)
        except (aiohttp.ClientError, TimeoutError) as exc:
            ok = False
            _LOG.warning("CRM callback %s for order %s failed: %s", method, order_id, type(exc).__name__)
        if not ok:
            self.stats.callbacks_failed += 1
        return ok


MES_STATE: Final = web.AppKey("mes_state", MesState)


def _json_error(status: int, message: str, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


class _BadRequest(Exception):
    """A client error, carrying its answer; turned into a response by the handler wrapper."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


async def _json_object(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError) as exc:
        raise _BadRequest(400, "body is not valid JSON") from exc
    if not isinstance(body, dict):
        raise _BadRequest(400, "body must be a JSON object")
    return body


def _text_field(body: Mapping[str, Any], name: str, limit: int) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value or len(value) > limit:
        raise _BadRequest(400, f"{name} must be a non-empty string of at most {limit} characters")
    return value


def _order_answer(record: OrderRecord, status: int = 200) -> web.Response:
    return web.json_response({"orderId": record.order_id, "status": record.status}, status=status)


def _known(state: MesState, request: web.Request) -> OrderRecord:
    record = state.store.get(request.match_info["orderId"])
    if record is None:
        raise _BadRequest(404, "order not found")
    return record


def _int_query(request: web.Request, name: str, default: int, high: int, *, low: int = 0) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise _BadRequest(400, f"{name} must be an integer") from exc
    if not low <= value <= high:
        raise _BadRequest(400, f"{name} must be between {low} and {high}")
    return value


async def _health(request: web.Request) -> web.StreamResponse:
    return web.json_response({"status": "ok"})


async def _create_order(request: web.Request) -> web.StreamResponse:
    state = request.app[MES_STATE]
    body = await _json_object(request)
    order_id = _text_field(body, "orderId", _ORDER_ID_MAX_LEN)
    status = _text_field(body, "status", _STATUS_MAX_LEN)
    # The rest of the body (the customer) is deliberately dropped: MES keeps only what it needs.
    return _order_answer(state.store.set_status(order_id, status), status=201)


async def _list_orders(request: web.Request) -> web.StreamResponse:
    state = request.app[MES_STATE]
    page = _int_query(request, "page", 0, sys.maxsize)
    size = _int_query(request, "size", _DEFAULT_PAGE_SIZE, _MAX_PAGE_SIZE, low=1)
    records = state.store.listing(request.query.get("status"), state.pickup_hidden, page, size)
    items = [{"orderId": rec.order_id, "status": rec.status} for rec in records]
    return web.json_response({"items": items, "page": page})


async def _get_order(request: web.Request) -> web.StreamResponse:
    return _order_answer(_known(request.app[MES_STATE], request))


async def _change_status(request: web.Request) -> web.StreamResponse:
    state = request.app[MES_STATE]
    record = _known(state, request)
    status = _text_field(await _json_object(request), "status", _STATUS_MAX_LEN)
    record = state.store.set_status(record.order_id, status)
    state.report_status(record.order_id, status)
    return _order_answer(record)


async def _price_calculation(request: web.Request) -> web.StreamResponse:
    state = request.app[MES_STATE]
    order_id = request.match_info["orderId"]
    # The body may carry the customer; read and discard it so the connection stays reusable.
    await request.read()
    record = state.store.set_status(order_id, SUBMITTED)
    state.request_price(order_id)
    return _order_answer(record, status=202)


async def _upload_model(request: web.Request) -> web.StreamResponse:
    state = request.app[MES_STATE]
    order_id = request.match_info["orderId"]
    if request.content_type != "application/octet-stream":
        raise _BadRequest(415, "model must be sent as application/octet-stream")
    digest, count = hashlib.sha256(), 0
    async for chunk in request.content.iter_chunked(_CHUNK):
        digest.update(chunk)
        count += len(chunk)
    if state.store.get(order_id) is None:
        state.store.set_status(order_id, FILE_UPLOADED)
    return web.json_response({"orderId": order_id, "bytes": count, "sha256": digest.hexdigest()})


async def _download_model(request: web.Request) -> web.StreamResponse:
    state = request.app[MES_STATE]
    _known(state, request)
    size = _int_query(request, "size", _DEFAULT_DOWNLOAD, _MAX_DOWNLOAD)
    resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    resp.content_length = size
    await resp.prepare(request)
    block = state.model_block
    for offset in range(0, size, _CHUNK):
        await resp.write(block[: min(_CHUNK, size - offset)])
    await resp.write_eof()
    return resp


async def _events(request: web.Request) -> web.StreamResponse:
    state = request.app[MES_STATE]
    count = _int_query(request, "count", _DEFAULT_SSE_COUNT, _MAX_SSE_COUNT)
    # An explicit ?interval_ms= is taken as asked (tests need it exact); the default is scaled.
    default_ms = round(_DEFAULT_SSE_INTERVAL * state.cfg.time_scale * 1000.0)
    interval = _int_query(request, "interval_ms", default_ms, _MAX_SSE_INTERVAL_MS) / 1000.0
    resp = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"},
    )
    await resp.prepare(request)
    try:
        for seq in range(count):
            if seq:
                await asyncio.sleep(interval)
            payload = json.dumps({"seq": seq, "orders": len(state.store)})
            # Each write goes to the transport at once: events arrive one by one (WHATWG SSE).
            await resp.write(f"id: {seq}\ndata: {payload}\n\n".encode())
        await resp.write_eof()
    except ConnectionResetError:
        pass  # the dashboard closed the stream; nothing to clean up
    return resp


async def _websocket(request: web.Request) -> web.StreamResponse:
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    async for msg in ws:
        if msg.type is aiohttp.WSMsgType.TEXT:
            await ws.send_str(msg.data)
        elif msg.type is aiohttp.WSMsgType.BINARY:
            await ws.send_bytes(msg.data)
    return ws


_ROUTES: Final[tuple[tuple[str, str, Handler], ...]] = (
    ("GET", HEALTH_PATH, _health),
    ("POST", "/api/v1/orders", _create_order),
    ("GET", "/api/v1/orders", _list_orders),
    ("GET", "/api/v1/orders/{orderId}", _get_order),
    ("PATCH", "/api/v1/orders/{orderId}", _change_status),
    ("PUT", "/api/v1/orders/{orderId}/status", _change_status),
    ("POST", "/api/v1/orders/{orderId}/price-calculation", _price_calculation),
    ("POST", "/api/v1/orders/{orderId}/model", _upload_model),
    ("GET", "/api/v1/orders/{orderId}/model", _download_model),
    ("GET", "/api/v1/events", _events),
    ("GET", "/api/v1/ws", _websocket),
)


def _reset(request: web.Request) -> None:
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        # SO_LINGER with a zero timeout turns close() into a TCP RST, as a crashing MES would.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


@web.middleware
async def _fault_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    state = request.app[MES_STATE]
    state.received.append(
        ReceivedRequest(
            method=request.method,
            path=request.path,
            traceparent=request.headers.get("traceparent"),
            user_id=request.headers.get("X-User-Id"),
        )
    )
    if request.path != HEALTH_PATH:
        fault = state.draw_fault()
        if fault.delay > 0.0:
            await asyncio.sleep(fault.delay)
        if fault.reset:
            state.stats.resets += 1
            _reset(request)
            return web.Response(status=500)  # never sent: the transport is gone
        if fault.overload:
            state.stats.overloads += 1
            return _json_error(503, "MES overloaded", {"Retry-After": str(state.cfg.retry_after)})
    try:
        return await handler(request)
    except _BadRequest as exc:
        return _json_error(exc.status, exc.message)


async def _callback_session(app: web.Application) -> AsyncIterator[None]:
    state = app[MES_STATE]
    state.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=state.cfg.callback_timeout))
    yield
    try:
        await state.tasks.aclose()
    finally:
        await state.session.close()
        state.session = None


def build_app(cfg: MesSimConfig) -> web.Application:
    """Build the simulated MES application.

    Args:
        cfg: what the simulator does and which faults it injects.

    Returns:
        An aiohttp application; its state lives under ``MES_STATE``.
    """
    app = web.Application(middlewares=(_fault_middleware,))
    app[MES_STATE] = MesState(cfg)
    for method, path, handler in _ROUTES:
        app.router.add_route(method, path, handler)
    app.cleanup_ctx.append(_callback_session)
    return app


def parse_listen(value: str) -> tuple[str, int]:
    """Parse ``HOST:PORT`` (``[v6]:PORT`` for IPv6); port 0 asks the OS for a free port.

    Args:
        value: the flag value.

    Returns:
        (host, port).

    Raises:
        argparse.ArgumentTypeError: the value is not HOST:PORT.
    """
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.removeprefix("[").removesuffix("]"), int(port)


def bound_url(addresses: Sequence[Any]) -> str:
    """Return the ``http://`` URL of the first bound address of a runner.

    Args:
        addresses: ``AppRunner.addresses`` (socket names).

    Returns:
        The base URL, with the real port when port 0 was asked for.

    Raises:
        RuntimeError: nothing is bound.
    """
    if not addresses:
        raise RuntimeError("no listening socket")
    host, port = addresses[0][0], addresses[0][1]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def stop_on_signals(stop: asyncio.Event) -> Callable[[], None]:
    """Set ``stop`` on SIGINT or SIGTERM.

    Args:
        stop: the event to set.

    Returns:
        A function that removes the handlers again.
    """
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)

    def remove() -> None:
        for sig in signals:
            loop.remove_signal_handler(sig)

    return remove


def _share(value: str) -> float:
    try:
        share = float(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {value!r}") from exc
    if not 0.0 <= share <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {value!r}")
    return share


def _non_negative(value: str) -> float:
    try:
        number = float(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value!r}") from exc
    if not (math.isfinite(number) and number >= 0.0):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value!r}")
    return number


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``simulate-mes`` flags to ``parser``.

    Args:
        parser: the (sub)command parser.
    """
    defaults = MesSimConfig()
    parser.add_argument(
        "--listen",
        type=parse_listen,
        default=parse_listen("127.0.0.1:8081"),
        metavar="HOST:PORT",
        help="where MES listens (port 0: any free port)",
    )
    parser.add_argument(
        "--crm-url",
        default=None,
        metavar="URL",
        help="CRM base URL for price and status callbacks (the proxy's egress listener)",
    )
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed for every random choice")
    parser.add_argument(
        "--time-scale",
        type=_non_negative,
        default=defaults.time_scale,
        help="multiplies every simulated delay (0.1 = ten times faster)",
    )
    parser.add_argument(
        "--price-delay",
        type=_non_negative,
        default=defaults.price_delay,
        metavar="SECONDS",
        help="time MES takes to calculate a price",
    )
    parser.add_argument(
        "--price-drop-rate",
        type=_share,
        default=0.0,
        metavar="SHARE",
        help="share of price calculations never answered (design note, problem 2)",
    )
    parser.add_argument(
        "--pickup-drop-rate",
        type=_share,
        default=0.0,
        metavar="SHARE",
        help="share of approved orders hidden from the dashboard (problem 3)",
    )
    parser.add_argument(
        "--slow-rate",
        type=_share,
        default=0.0,
        metavar="SHARE",
        help="share of requests delayed by --slow-seconds",
    )
    parser.add_argument(
        "--slow-seconds",
        type=_non_negative,
        default=defaults.slow_seconds,
        metavar="SECONDS",
        help="extra delay of a slow request",
    )
    parser.add_argument(
        "--overload-rate",
        type=_share,
        default=0.0,
        metavar="SHARE",
        help="share of requests answered 503 with Retry-After",
    )
    parser.add_argument(
        "--reset-rate",
        type=_share,
        default=0.0,
        metavar="SHARE",
        help="share of requests whose connection is reset",
    )
    parser.add_argument(
        "--latency-ms",
        type=_non_negative,
        default=defaults.latency_ms,
        metavar="MS",
        help="median base latency of every request (log-normal jitter)",
    )


def config_from_args(args: argparse.Namespace) -> MesSimConfig:
    """Turn parsed ``simulate-mes`` flags into a config.

    Args:
        args: the namespace from a parser prepared by ``add_arguments``.

    Returns:
        The config.

    Raises:
        ValueError: a value is out of range.
    """
    return MesSimConfig(
        crm_url=args.crm_url,
        seed=args.seed,
        time_scale=args.time_scale,
        price_delay=args.price_delay,
        price_drop_rate=args.price_drop_rate,
        pickup_drop_rate=args.pickup_drop_rate,
        slow_rate=args.slow_rate,
        slow_seconds=args.slow_seconds,
        overload_rate=args.overload_rate,
        reset_rate=args.reset_rate,
        latency_ms=args.latency_ms,
    )


async def _serve(cfg: MesSimConfig, host: str, port: int) -> None:
    stop = asyncio.Event()
    remove = stop_on_signals(stop)
    # No access log: the demo's log is the proxy's, and a simulator line adds only noise.
    runner = web.AppRunner(build_app(cfg), handle_signals=False, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        print(json.dumps({"listen": bound_url(runner.addresses)}), flush=True)
        await stop.wait()
    finally:
        remove()
        await runner.cleanup()


def main(args: argparse.Namespace) -> int:
    """Run the simulated MES until SIGINT or SIGTERM.

    Prints one JSON line ``{"listen": "http://HOST:PORT"}`` on stdout once bound.

    Args:
        args: the namespace from a parser prepared by ``add_arguments``.

    Returns:
        0 after a clean stop, 2 for an invalid configuration.
    """
    try:
        cfg = config_from_args(args)
    except ValueError as exc:
        print(f"simulate-mes: {exc}", file=sys.stderr)
        return 2
    host, port = args.listen
    try:
        asyncio.run(_serve(cfg, host, port))
    except OSError as exc:
        print(f"simulate-mes: cannot listen on {host}:{port}: {exc.strerror}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m mes_trace_proxy.sim.mes", description=__doc__)
    add_arguments(_parser)
    raise SystemExit(main(_parser.parse_args()))
