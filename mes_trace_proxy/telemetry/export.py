"""The OTLP span export path: spans encoded as they end, sent in batches from the event loop.

The SDK's exporters encode a whole batch at once in a worker thread, which holds the GIL
against the event loop for milliseconds (the p99 in docs/performance.md). Here each span is
encoded when it ends (``otlp_encode``, about 10 µs), and a task on the proxy's own loop joins
and sends the bytes: OTLP/HTTP with aiohttp, OTLP/gRPC with grpc.aio (``otlp_transport``;
the settings from ``OTEL_EXPORTER_OTLP_*`` are read by ``otlp_settings``, both re-exported
here).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from opentelemetry.context import Context
from opentelemetry.sdk.trace import SpanProcessor

from mes_trace_proxy.telemetry.otlp_encode import EncodableSpan, EncodedSpan, OtlpSpanEncoder
from mes_trace_proxy.telemetry.otlp_settings import DEFAULT_TIMEOUT, OtlpSettings, otlp_settings
from mes_trace_proxy.telemetry.otlp_transport import (
    MAX_IN_FLIGHT,
    Attempt,
    GrpcTransport,
    HttpTransport,
    Transport,
    make_transport,
)

__all__ = [
    "MAX_IN_FLIGHT",
    "Attempt",
    "ExportStats",
    "GrpcTransport",
    "HttpTransport",
    "OtlpExportProcessor",
    "OtlpSettings",
    "SpanEncoder",
    "Transport",
    "make_transport",
    "otlp_settings",
]

log = logging.getLogger("mes_trace_proxy.export")

#: First back-off between attempts; doubled each time, with ±50 % jitter so replicas that
#: lost the collector together do not come back in step. Half a second lets a restarting
#: collector come up without the queue filling at the proxy's usual span rate.
FIRST_BACKOFF: Final = 0.5
#: While the collector keeps failing, one warning per this many seconds instead of per batch.
FAILURE_LOG_INTERVAL: Final = 60.0


@dataclass(slots=True)
class ExportStats:
    """Counters of the export path, read by ``/metrics``."""

    queued: int = 0
    exported: int = 0
    dropped_queue_full: int = 0
    failed: int = 0


class SpanEncoder(Protocol):
    """What the processor needs of an encoder: :class:`OtlpSpanEncoder`, or a test's stand-in."""

    # mypyc: a Protocol, so an interpreted stand-in passes (native.py, constraint 2).

    def encode_span(self, span: EncodableSpan) -> EncodedSpan:
        """One finished span, encoded."""
        ...

    def assemble(self, spans: Sequence[EncodedSpan]) -> bytes:
        """An export request of encoded spans."""
        ...


class OtlpExportProcessor(SpanProcessor):
    """Encodes each sampled span as it ends and exports batches from a task on the event loop.

    Bounded like the SDK's batch processor (``OTEL_BSP_*``): a queue of encoded spans, batches
    by size or delay, up to ``MAX_IN_FLIGHT`` exports at once. Every span is counted once as exported, dropped
    (queue full) or failed (the collector refused it, or it could not be sent before its
    deadline or before shutdown ended). :meth:`start` binds it to the running loop; spans
    that end before that wait in the queue.
    """

    def __init__(
        self,
        transport: Transport,
        *,
        max_queue_size: int,
        max_batch: int,
        delay_seconds: float,
        export_timeout_seconds: float,
        send_timeout_seconds: float = DEFAULT_TIMEOUT,
        encoder: SpanEncoder | None = None,
    ) -> None:
        self._transport = transport
        self._encoder = encoder or OtlpSpanEncoder()
        self._queue: collections.deque[EncodedSpan] = collections.deque()
        self._max_queue = max_queue_size
        self._max_batch = max_batch
        self._delay = delay_seconds
        self._shutdown_budget = export_timeout_seconds
        self._send_timeout = send_timeout_seconds
        self.stats = ExportStats()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._flush_task: asyncio.Task[None] | None = None
        self._slots = asyncio.Semaphore(MAX_IN_FLIGHT)
        #: exports in flight and the spans each carries (counted as failed if shutdown cancels it)
        self._in_flight: dict[asyncio.Task[None], int] = {}
        self._stopping = False
        self._closed = False
        self._failing_since: float | None = None
        self._last_warning = 0.0

    # ── SpanProcessor, called wherever a span ends ─────────────────────────────────────────

    def on_start(self, span: object, parent_context: Context | None = None) -> None:
        """Nothing to do at start."""

    def on_end(self, span: EncodableSpan) -> None:
        """Encode a finished sampled span into the queue; count it as dropped when the queue is full.

        Any span the encoder can read will do: the SDK's ``ReadableSpan``, or the proxy's lean
        ``spans.ProxySpan``, which ``SpanFactory`` hands over directly.
        """
        context = span.context
        if context is None or not context.trace_flags.sampled:
            return
        queue = self._queue
        if len(queue) >= self._max_queue or self._closed:
            self.stats.dropped_queue_full += 1
            return
        try:
            encoded = self._encoder.encode_span(span)
        except Exception:
            # A span the encoder cannot read is lost, counted and logged, never raised into
            # the request that ended it.
            log.exception("encoding a span failed; it is not exported")
            self.stats.failed += 1
            return
        queue.append(encoded)
        self.stats.queued += 1
        if len(queue) >= self._max_batch:
            self._notify()

    def _notify(self) -> None:
        wake = self._wake
        if wake is None or wake.is_set():
            return
        if threading.get_ident() == self._loop_thread:
            wake.set()
        elif self._loop is not None:
            # A closed loop raises RuntimeError; the queue is then reported at shutdown.
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(wake.set)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Export what is queued; from another thread, wait for it up to ``timeout_millis``.

        On the loop's own thread nothing can be waited for: the flush is scheduled and the
        answer is whether the queue was already empty. Use :meth:`flush` there.
        """
        loop = self._loop
        if loop is None or loop.is_closed() or not loop.is_running():
            return not self._queue
        if threading.get_ident() == self._loop_thread:
            self._flush_task = loop.create_task(self.flush())
            return not self._queue
        future = asyncio.run_coroutine_threadsafe(self.flush(), loop)
        try:
            future.result(timeout_millis / 1000)
        except TimeoutError:
            return False
        return not self._queue

    def shutdown(self) -> None:
        """Flush and stop, as the SDK's provider asks; :meth:`aclose` is the loop-side form."""
        loop = self._loop
        if self._closed:
            return
        if loop is not None and loop.is_running() and threading.get_ident() != self._loop_thread:
            future = asyncio.run_coroutine_threadsafe(self.aclose(), loop)
            try:
                future.result(self._shutdown_budget + 1)
            except TimeoutError:
                log.error("span export did not finish within OTEL_BSP_EXPORT_TIMEOUT")
            return
        self._close_unstarted()

    # ── the loop side ──────────────────────────────────────────────────────────────────────

    def start(self) -> None:
        """Start the export task on the running loop (call from inside it, once)."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._loop_thread = threading.get_ident()
        self._wake = asyncio.Event()
        self._task = loop.create_task(self._run(), name="otlp-export")
        if len(self._queue) >= self._max_batch:
            self._wake.set()

    async def flush(self) -> None:
        """Export everything queued now and wait until every export in flight has finished."""
        await self._drain()
        while self._in_flight:
            await asyncio.wait(set(self._in_flight))

    async def _drain(self) -> None:
        """Start exports for everything queued, full batches first and then the rest."""
        while self._queue:
            await self._start_batch()

    async def aclose(self) -> None:
        """Export what is queued within ``OTEL_BSP_EXPORT_TIMEOUT``, count the rest as failed, close."""
        if self._closed:
            return
        self._stopping = True
        task = self._task
        if task is None:
            self._close_unstarted()
            return
        assert self._wake is not None
        self._wake.set()
        try:
            await asyncio.wait_for(asyncio.shield(task), self._shutdown_budget)
        except TimeoutError:
            cancelled = dict(self._in_flight)
            for running in (task, *cancelled):
                running.cancel()
            await asyncio.gather(task, *cancelled, return_exceptions=True)
            # The exports cut short never counted their spans; some never even started.
            self.stats.failed += sum(count for export, count in cancelled.items() if export.cancelled())
            log.error(
                "span export did not finish within OTEL_BSP_EXPORT_TIMEOUT (%.1f s)", self._shutdown_budget
            )
        self._closed = True
        lost = len(self._queue)
        if lost:
            self.stats.failed += lost
            self._queue.clear()
            log.error("%d spans were not exported before shutdown", lost)
        await self._transport.aclose()

    def _close_unstarted(self) -> None:
        self._closed = True
        lost = len(self._queue)
        if lost:
            self.stats.failed += lost
            self._queue.clear()
            log.error("%d spans were never exported: the export task was not started", lost)

    async def _run(self) -> None:
        assert self._wake is not None
        wake = self._wake
        while True:
            timed_out = False
            try:
                await asyncio.wait_for(wake.wait(), self._delay)
            except TimeoutError:
                timed_out = True
            wake.clear()
            if self._stopping:
                await self.flush()
                if not self._queue:
                    return
            elif timed_out:
                await self._drain()
            else:
                # Woken by a full batch: send full batches and let the rest wait its delay.
                while len(self._queue) >= self._max_batch:
                    await self._start_batch()

    async def _start_batch(self) -> None:
        """Take one batch off the queue and send it in a task of its own, once a slot is free."""
        await self._slots.acquire()
        queue = self._queue
        count = min(len(queue), self._max_batch)
        if not count:
            self._slots.release()
            return
        batch = [queue.popleft() for _ in range(count)]
        try:
            body = self._encoder.assemble(batch)
        except Exception:
            log.exception("assembling an export request failed; %d spans lost", count)
            self.stats.failed += count
            self._slots.release()
            return
        task = asyncio.get_running_loop().create_task(self._send_batch(body, count))
        self._in_flight[task] = count
        task.add_done_callback(self._export_done)

    def _export_done(self, task: asyncio.Task[None]) -> None:
        self._in_flight.pop(task, None)

    async def _send_batch(self, body: bytes, count: int) -> None:
        try:
            await self._send(body, count)
        finally:
            self._slots.release()

    async def _send(self, body: bytes, count: int) -> None:
        """Send one request, retrying what may succeed later until its deadline."""
        deadline = time.monotonic() + self._send_timeout
        backoff = FIRST_BACKOFF
        while True:
            remaining = deadline - time.monotonic()
            attempt = await self._transport.send(body, max(remaining, 0.001))
            if attempt.ok:
                self.stats.exported += count - attempt.rejected
                self.stats.failed += attempt.rejected
                if attempt.rejected:
                    log.warning(
                        "collector rejected %d of %d spans: %s", attempt.rejected, count, attempt.reason[:200]
                    )
                self._recovered()
                return
            wait = attempt.retry_after
            if wait is None:
                wait = backoff * random.uniform(0.5, 1.5)  # noqa: S311 - jitter, not a secret
            backoff *= 2
            # Retries go on during shutdown too: aclose bounds them by OTEL_BSP_EXPORT_TIMEOUT.
            if not attempt.retryable or time.monotonic() + wait >= deadline:
                self.stats.failed += count
                self._failed(attempt.reason, count)
                return
            await asyncio.sleep(wait)

    def _failed(self, reason: str, count: int) -> None:
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
        if now - self._last_warning >= FAILURE_LOG_INTERVAL:
            self._last_warning = now
            log.warning(
                "span export failed (%s); %d spans lost, %d lost in all so far",
                reason,
                count,
                self.stats.failed,
            )

    def _recovered(self) -> None:
        if self._failing_since is not None:
            log.warning("span export works again after %.0f s", time.monotonic() - self._failing_since)
            self._failing_since = None
            self._last_warning = 0.0
