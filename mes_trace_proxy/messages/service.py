"""The message path inside the proxy: held store, watcher, re-drive, auto policy, order index, metrics.

``server.running`` builds one :class:`MessagePath` when ``--amqp-url`` is set, starts it after
the listeners are up and stops it before they drain; ``start`` never waits on the broker (the
watcher connects, and reconnects, in the background). The admin API reads the per-order index
(``dead_letter``, ``flagged``) without touching the store, and re-drives through it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Final
from urllib.parse import quote, urlsplit

from opentelemetry import trace as trace_api
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from mes_trace_proxy.messages.held import HeldStore, open_held_store
from mes_trace_proxy.messages.record import FlaggedOrder, HeldMessage, HeldSummary, with_span
from mes_trace_proxy.messages.redrive import OUTCOMES, REDRIVE_COUNT_HEADER, Redriver, RedriveResult
from mes_trace_proxy.messages.settings import MessagesConfig, auto_redrive_delay
from mes_trace_proxy.messages.spans import dead_letter_span
from mes_trace_proxy.messages.watcher import Watcher, WatcherSettings
from mes_trace_proxy.orders import OrderBook

__all__ = ["DEAD_LETTER_MESSAGE", "METRIC_FAMILIES", "MessagePath", "amqp_url_with_secret", "tls_context"]

log = logging.getLogger("mes_trace_proxy.messages")

DEAD_LETTER_MESSAGE: Final = "order dead-lettered"
#: How many held messages the index loads at start (and, with Redis, refreshes): far above
#: what an incident leaves behind; beyond it the store still has them all.
INDEX_LIMIT: Final = 100_000
#: With a shared (Redis) store, how often the index picks up what other replicas held or re-drove.
SHARED_REFRESH_S: Final = 10.0
ENV_PASSWORD: Final = "MES_PROXY_AMQP_PASSWORD"  # noqa: S105  (the variable's name, not a secret)
#: The metric families the message path exposes on /metrics, by Prometheus type (the alert
#: rules and the dashboard may name only these; tests/test_monitoring.py checks).
METRIC_FAMILIES: Final = {
    "mes_messages_dead_lettered": "counter",
    "mes_messages_problems": "counter",
    "mes_messages_held": "gauge",
    "mes_messages_redrives": "counter",
    "mes_messages_broker_connected": "gauge",
}


def amqp_url_with_secret(url: str, password_file: str | None, environ: Mapping[str, str]) -> str:
    """The URL to connect with: the password from a file or the environment when the URL has none.

    Raises:
        OSError: the password file cannot be read (start-up stops, naming the file).
    """
    parts = urlsplit(url)
    if parts.password is not None:
        return url
    secret: str | None = None
    if password_file is not None:
        with open(password_file, encoding="utf-8") as handle:
            secret = handle.read().strip()
    elif environ.get(ENV_PASSWORD):
        secret = environ[ENV_PASSWORD]
    if secret is None:
        return url
    user = parts.username or "guest"
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{quote(user, safe='')}:{quote(secret, safe='')}@{host}").geturl()


def tls_context(config: MessagesConfig) -> ssl.SSLContext | None:
    """The client TLS context for ``amqps://`` (CA and client certificate from the config)."""
    if config.amqp_url is None or not config.amqp_url.startswith("amqps://"):
        return None
    context = ssl.create_default_context(cafile=config.tls_ca)
    if config.tls_cert is not None:
        context.load_cert_chain(config.tls_cert, config.tls_key)
    return context


class _Collector(Collector):
    """Prometheus families for the message path, read from the watcher's and re-driver's counters."""

    def __init__(self, path: MessagePath) -> None:
        self._path = path

    def collect(self) -> Iterator[Metric]:
        path = self._path
        dead = CounterMetricFamily(
            "mes_messages_dead_lettered", "Dead letters held, by the queue they died in and the reason",
            labels=["queue", "reason"],
        )  # fmt: skip
        for (queue, reason), count in sorted(path.watcher.stats.dead_lettered.items()):
            dead.add_metric([queue, reason], count)
        yield dead
        problems = CounterMetricFamily(
            "mes_messages_problems",
            "Dead letters held with a problem, or broker trouble, by kind",
            labels=["kind"],
        )
        for kind, count in sorted(path.watcher.stats.problems.items()):
            problems.add_metric([kind], count)
        problems.add_metric(["store_failure"], path.watcher.stats.store_failures)
        yield problems
        yield GaugeMetricFamily(
            "mes_messages_held",
            "Dead letters held for re-drive (those with an order id; the store keeps the rest too)",
            value=path.held_count,
        )
        redrives = CounterMetricFamily("mes_messages_redrives", "Re-drives by outcome", labels=["outcome"])
        for outcome in OUTCOMES:
            redrives.add_metric([outcome], path.redriver.outcomes[outcome])
        yield redrives
        yield GaugeMetricFamily(
            "mes_messages_broker_connected", "1 while the watcher is connected to RabbitMQ",
            value=1 if path.watcher.stats.connected else 0,
        )  # fmt: skip


class MessagePath:
    """Everything the message path runs, built from the ``messages`` section.

    Args:
        config: the ``messages`` section (``enabled``).
        state_url: the ``--state`` URL; held messages live beside the order records.
        tracer: for dead-letter and re-drive spans.
        redact: the privacy redactor's ``value``.
        book: the order book (links to the order's last span; "moved on" checks), or ``None``.
        environ: for ``MES_PROXY_AMQP_PASSWORD``.
    """

    def __init__(
        self,
        config: MessagesConfig,
        *,
        state_url: str,
        tracer: trace_api.Tracer,
        redact: Callable[[str], str],
        book: OrderBook | None,
        environ: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if config.amqp_url is None:
            raise ValueError("MessagePath needs messages.amqp_url")
        env = os.environ if environ is None else environ
        url = amqp_url_with_secret(config.amqp_url, config.amqp_password_file, env)
        context = tls_context(config)
        self.config = config
        self.store: HeldStore = open_held_store(state_url)
        self._shared_store = state_url.split("://")[0] in {"redis", "rediss", "unix"}
        self._tracer = tracer
        self._redact = redact
        self._book = book
        self._clock = clock
        # order id → its held messages, oldest first; a tuple (most orders have one) is 4x
        # smaller than a dict per order, and changes are rare.
        self._index: dict[str, tuple[HeldSummary, ...]] = {}
        #: called with each held message once stored (the demo and tests watch them arrive)
        self.listeners: list[Callable[[HeldMessage], None]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._refresher: asyncio.Task[None] | None = None
        settings = WatcherSettings(
            url=url, queues=config.dead_letter_queues, observe_exchange=config.observe_exchange,
            observe_queue=config.observe_queue, prefetch=config.prefetch, ssl_context=context,
        )  # fmt: skip
        self.watcher = Watcher(
            settings, self.store, config.rules, clock=clock, describe=self._describe, on_stored=self._stored
        )
        self.redriver = Redriver(
            url, self.store, tracer, redact=redact, clock=clock, ssl_context=context,
            restore_expiration=config.restore_expiration,
        )  # fmt: skip
        self.collector = _Collector(self)

    # ── lifecycle ──────────────────────────────────────────────────────────────────────────

    async def start(self) -> None:
        """Load the index (a local read) and start the watcher; never waits on the broker."""
        try:
            await self.load_index()
        except Exception as exc:  # a store that is down now is retried by the refresher / watcher
            log.error("held dead letters could not be loaded: %s", type(exc).__name__)
        self.watcher.start()
        if self._shared_store:
            self._refresher = asyncio.create_task(self._refresh(), name="mes-held-refresh")
        log.info(
            "message path started",
            extra={"amqp": self.watcher.settings.shown_url, "queues": list(self.watcher.queue_names)},
        )

    async def stop(self) -> None:
        """Stop consuming, cancel pending automatic re-drives, close connections and the store."""
        await self.watcher.stop()
        tasks = [*self._tasks, *([self._refresher] if self._refresher else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.redriver.close()
        with contextlib.suppress(Exception):
            await self.store.close()

    async def _refresh(self) -> None:
        while True:
            await asyncio.sleep(SHARED_REFRESH_S)
            try:
                fresh = await self.store.summaries(INDEX_LIMIT)
            except Exception as exc:
                log.warning("held dead letters refresh failed: %s", type(exc).__name__)
                continue
            # Swapped in one step: readers never see a half-built index.
            previous, self._index = self._index, {}
            self._load(fresh)
            del previous

    async def load_index(self) -> None:
        """Read the held messages' summaries (up to INDEX_LIMIT) into the per-order index."""
        self._load(await self.store.summaries(INDEX_LIMIT))

    def _add(self, summary: HeldSummary) -> None:
        if summary.order_id is None:
            return
        others = tuple(h for h in self._index.get(summary.order_id, ()) if h.key != summary.key)
        self._index[summary.order_id] = tuple(
            sorted((*others, summary), key=lambda h: (h.received_at, h.key))
        )

    def _load(self, held: Iterable[HeldSummary]) -> None:
        for message in held:
            if message.order_id is not None:
                self._add(message)

    # ── the watcher's hooks ────────────────────────────────────────────────────────────────

    def _describe(self, held: HeldMessage) -> HeldMessage:
        view = self._book.get(held.order_id) if self._book is not None and held.order_id else None
        ref = dead_letter_span(
            self._tracer, held, order_span=view.span if view is not None else None, redact=self._redact
        )
        return with_span(held, ref.trace_id, ref.span_id)

    def _stored(self, held: HeldMessage) -> None:
        death = held.death
        log.warning(
            DEAD_LETTER_MESSAGE,
            extra={
                "event": "order.dead_lettered",
                "order_id": self._redact(held.order_id) if held.order_id else None,
                "cause": self._redact(held.cause),
                "queue": death.queue if death else held.consumed_from,
                "reason": death.reason if death else held.problem,
                "count": death.count if death else 0,
                "trace_id": format(held.span_trace_id, "032x"),
                "span_id": format(held.span_id, "016x"),
            },
        )
        for listener in self.listeners:
            listener(held)
        if held.order_id is None:
            return
        self._add(held.summary())
        self._schedule_auto(held)

    def _schedule_auto(self, held: HeldMessage) -> None:
        death = held.death
        count = held.headers.get(REDRIVE_COUNT_HEADER, 0)
        delay = auto_redrive_delay(
            self.config.auto_redrive,
            queue=death.queue if death else None,
            reason=death.reason if death else None,
            redriven=count if isinstance(count, int) else 0,
        )
        if delay is None or held.order_id is None:
            return
        task = asyncio.create_task(self._auto(held.order_id, delay), name="mes-auto-redrive")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _auto(self, order_id: str, delay: float) -> None:
        await asyncio.sleep(delay)
        await self.redrive(order_id, who="auto-policy")

    # ── what the admin API reads and does ──────────────────────────────────────────────────

    @property
    def held_count(self) -> int:
        """Held messages with an order (the index; messages without an order id are in the store only)."""
        return sum(len(v) for v in self._index.values())

    def held_for(self, order_id: str) -> list[HeldSummary]:
        """The order's held messages, oldest first."""
        return list(self._index.get(order_id, ()))

    def dead_letter(self, order_id: str) -> dict[str, object] | None:
        """The ``dead_letter`` object of the order's latest held message, or ``None``."""
        held = self.held_for(order_id)
        return held[-1].dead_letter_object() if held else None

    def moved_on(self, held: HeldSummary) -> bool:
        """Whether the order changed status after the message died (then it is no longer flagged)."""
        if self._book is None or held.order_id is None:
            return False
        view = self._book.get(held.order_id)
        return view is not None and view.since > held.received_at

    def flagged(self) -> list[FlaggedOrder]:
        """Dead-lettered orders that have not moved on, oldest dead letter first."""
        found: list[FlaggedOrder] = []
        for order_id in self._index:
            held = self.held_for(order_id)
            if not held or self.moved_on(held[-1]):
                continue
            view = self._book.get(order_id) if self._book is not None else None
            found.append(
                FlaggedOrder(
                    order_id=order_id,
                    status=view.status if view is not None else held[-1].status,
                    since=held[0].received_at,
                    dead_letter=held[-1].dead_letter_object(),
                )
            )
        return sorted(found, key=lambda f: (f.since, f.order_id))

    async def redrive(self, order_id: str, *, who: str) -> RedriveResult:
        """Re-drive the order's held messages (at most once each); the index follows the outcome."""
        result = await self.redriver.redrive_order(order_id, who=who)
        gone = {key for key, outcome in result.outcomes if outcome in {"redriven", "nothing_held"}}
        # No outcome at all: another replica re-drove them already.
        kept = tuple(h for h in self._index.get(order_id, ()) if result.outcomes and h.key not in gone)
        if kept:
            self._index[order_id] = kept
        else:
            self._index.pop(order_id, None)
        return result
