"""The dead-letter watcher: consumes dead letters (own mode) or copies (observe mode) into the held store.

Own mode consumes the named dead-letter queues themselves and declares nothing (a queue that
does not exist is logged, counted and retried). Observe mode declares one durable queue of
the proxy's own, bound to the dead-letter exchange, so existing dead-letter consumers keep
working unchanged. Either way a message is acked only once the held store has it, so a crash
loses nothing (the broker redelivers, and the stable key makes the second write a no-op).

The watcher is a background task: ``start`` returns at once, and nothing in the HTTP path
ever waits on it. When the broker goes away it reconnects with exponential back-off.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

import aio_pika
import aiormq.exceptions
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage, AbstractQueue

from mes_trace_proxy.messages.deadletter import Message, MessageRules
from mes_trace_proxy.messages.held import HeldStore
from mes_trace_proxy.messages.record import HeldMessage, hold

__all__ = ["Watcher", "WatcherSettings", "WatcherStats", "incoming_properties", "incoming_to_message"]

_log = logging.getLogger(__name__)

#: 5 s to connect: a broker on the LAN answers in milliseconds; longer means it is down.
CONNECT_TIMEOUT_S: Final = 5.0


@dataclass(frozen=True, slots=True, kw_only=True)
class WatcherSettings:
    """What the watcher consumes, and how it retries."""

    url: str
    #: own mode: dead-letter queues to consume (declared by whoever owns the topology)
    queues: tuple[str, ...] = ()
    #: observe mode: the dead-letter exchange to bind ``observe_queue`` to
    observe_exchange: str | None = None
    observe_queue: str = "mes-trace-proxy.dead-letters"
    #: unacked messages per queue; the store write is the per-message cost
    prefetch: int = 64
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    ssl_context: ssl.SSLContext | None = field(default=None, repr=False)

    @property
    def shown_url(self) -> str:
        """The URL without user and password, for logs and ``/config``."""
        scheme, sep, rest = self.url.partition("://")
        return f"{scheme}{sep}{rest.rpartition('@')[2]}" if sep else "***"


@dataclass(slots=True)
class WatcherStats:
    """Counters the metrics read (labels are queue names and reason words, never order ids)."""

    dead_lettered: Counter[tuple[str, str]] = field(default_factory=Counter)
    problems: Counter[str] = field(default_factory=Counter)
    store_failures: int = 0
    connects: int = 0
    connected: bool = False


def incoming_properties(message: AbstractIncomingMessage) -> dict[str, object]:
    """The basic properties worth re-publishing (everything but headers), as plain values."""
    props: dict[str, object] = {
        "content_type": message.content_type,
        "content_encoding": message.content_encoding,
        "delivery_mode": int(message.delivery_mode) if message.delivery_mode is not None else None,
        "priority": message.priority,
        "correlation_id": message.correlation_id,
        "reply_to": message.reply_to,
        "message_id": message.message_id,
        "timestamp": message.timestamp,
        "type": message.type,
        "app_id": message.app_id,
        "user_id": message.user_id,
    }
    return {k: v for k, v in props.items() if v is not None}


def incoming_to_message(message: AbstractIncomingMessage) -> Message:
    """The plain :class:`Message` the pure core reads."""
    return Message(
        body=message.body,
        headers=dict(message.headers or {}),
        exchange=message.exchange or "",
        routing_key=message.routing_key or "",
        message_id=message.message_id,
        correlation_id=message.correlation_id,
    )


def _closed(connection: AbstractConnection) -> bool:
    """Read afresh each time (a helper, so the type checker does not carry a narrowed value)."""
    return bool(connection.is_closed)


class Watcher:
    """Consumes dead letters into a :class:`HeldStore`.

    Args:
        settings: the broker and queues.
        store: where held messages go; a message is acked only after ``store.put`` returns.
        rules: message rules for order id and status.
        clock: wall-clock seconds (``time.time``), for the time a message was received.
        describe: called with each message before it is stored; returns it with what it adds
            (the dead-letter span's ids), so one write keeps both.
        on_stored: called with each held message once stored and acked (order book, log).
    """

    def __init__(
        self,
        settings: WatcherSettings,
        store: HeldStore,
        rules: MessageRules,
        *,
        clock: Callable[[], float],
        describe: Callable[[HeldMessage], HeldMessage] | None = None,
        on_stored: Callable[[HeldMessage], None] | None = None,
    ) -> None:
        self.settings = settings
        self.stats = WatcherStats()
        self._store = store
        self._rules = rules
        self._clock = clock
        self._describe = describe
        self._on_stored = on_stored
        self._task: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()

    @property
    def queue_names(self) -> tuple[str, ...]:
        """The queues consumed: the own-mode queues and, in observe mode, the proxy's own queue."""
        observe = (self.settings.observe_queue,) if self.settings.observe_exchange else ()
        return self.settings.queues + observe

    def start(self) -> None:
        """Start the background task (returns at once; the broker may well be down)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="mes-dead-letter-watcher")

    async def stop(self) -> None:
        """Cancel the task and close the connection (unacked messages go back to the broker)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def wait_connected(self) -> None:
        """Return once the watcher is consuming (tests and the demo; the proxy never waits on it)."""
        await self._connected.wait()

    async def _run(self) -> None:
        delay = self.settings.backoff_initial_s
        while True:
            try:
                connection = await aio_pika.connect(
                    self.settings.url, timeout=CONNECT_TIMEOUT_S, ssl_context=self.settings.ssl_context,
                    client_properties={"connection_name": "mes-trace-proxy dead-letter watcher"},
                )  # fmt: skip
            except (TimeoutError, OSError, aiormq.exceptions.AMQPError) as exc:
                _log.warning(
                    "dead-letter watcher: cannot connect to %s (%s); retrying in %.1f s",
                    self.settings.shown_url, type(exc).__name__, delay,
                )  # fmt: skip
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.settings.backoff_max_s) * random.uniform(0.8, 1.0)  # noqa: S311  (jitter, not a secret)
                continue
            delay = self.settings.backoff_initial_s
            await self._session(connection)
            self._connected.clear()
            self.stats.connected = False

    async def _session(self, connection: AbstractConnection) -> None:
        """Consume until the connection closes; every queue has its own channel and retry loop."""
        self.stats.connects += 1
        closed = asyncio.Event()
        connection.close_callbacks.add(lambda *_: closed.set())
        _log.info(
            "dead-letter watcher: connected to %s, consuming %s",
            self.settings.shown_url,
            ", ".join(self.queue_names),
        )
        tasks = [asyncio.create_task(self._consume_forever(connection, name)) for name in self.queue_names]
        try:
            await closed.wait()
            _log.warning("dead-letter watcher: connection to %s lost; reconnecting", self.settings.shown_url)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            with contextlib.suppress(Exception):
                await connection.close()

    async def _consume_forever(self, connection: AbstractConnection, name: str) -> None:
        delay = self.settings.backoff_initial_s
        while not _closed(connection):
            try:
                channel = await connection.channel()
                await channel.set_qos(prefetch_count=self.settings.prefetch)
                queue = await self._queue(channel, name)
                self._connected.set()
                self.stats.connected = True
                delay = self.settings.backoff_initial_s
                await self._consume(queue)
            except aiormq.exceptions.ChannelNotFoundEntity:
                self.stats.problems["missing_queue"] += 1
                _log.error(
                    "dead-letter watcher: queue or exchange for %r does not exist on the broker "
                    "(own mode declares nothing); retrying in %.1f s", name, delay,
                )  # fmt: skip
            except aiormq.exceptions.ChannelAccessRefused:
                self.stats.problems["access_refused"] += 1
                _log.error(
                    "dead-letter watcher: access to %r refused (see docs/messages.md, permissions)", name
                )
            except (aiormq.exceptions.AMQPError, ConnectionError) as exc:
                if _closed(connection):
                    return
                _log.warning("dead-letter watcher: channel for %r failed (%s)", name, type(exc).__name__)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.settings.backoff_max_s)

    async def _queue(self, channel: AbstractChannel, name: str) -> AbstractQueue:
        if name == self.settings.observe_queue and self.settings.observe_exchange:
            # Observe mode: the one thing the proxy declares is its own queue and its binding.
            exchange = await channel.get_exchange(self.settings.observe_exchange, ensure=True)
            queue = await channel.declare_queue(name, durable=True)
            await queue.bind(exchange, routing_key="#")
            return queue
        return await channel.get_queue(name, ensure=True)

    async def _consume(self, queue: AbstractQueue) -> None:
        # One task per message, at most ``prefetch`` at once (the broker sends no more unacked),
        # so the store can commit many in one transaction instead of one commit per message.
        running: set[asyncio.Task[None]] = set()
        try:
            async with queue.iterator() as messages:
                async for incoming in messages:
                    task = asyncio.create_task(self._handle(incoming, queue.name))
                    running.add(task)
                    task.add_done_callback(running.discard)
        finally:
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)

    async def _handle(self, incoming: AbstractIncomingMessage, queue_name: str) -> None:
        held = hold(
            incoming_to_message(incoming),
            incoming_properties(incoming),
            consumed_from=queue_name,
            rules=self._rules,
            now=self._clock(),
        )
        if self._describe is not None:
            held = self._describe(held)
        try:
            await self._store.put(held)
        except Exception as exc:
            self.stats.store_failures += 1
            _log.error(
                "dead-letter watcher: store failed (%s); message left on %s, pausing",
                type(exc).__name__,
                queue_name,
            )
            await incoming.nack(requeue=True)
            await asyncio.sleep(self.settings.backoff_initial_s)
            return
        await incoming.ack()
        death = held.death
        self.stats.dead_lettered[
            (death.queue if death else queue_name, death.reason if death else "unknown")
        ] += 1
        if held.problem is not None:
            self.stats.problems[held.problem] += 1
        if self._on_stored is not None:
            try:
                self._on_stored(held)
            except Exception:  # a failing observer must not stop consumption; the message is safe
                _log.exception("dead-letter watcher: on_stored failed")
