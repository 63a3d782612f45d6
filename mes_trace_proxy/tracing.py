"""The tracer provider, built from the Config and the SDK's ``OTEL_*`` variables, and its export path.

The provider is returned to the composition root, never installed globally, so two proxies
can live in one process (tests) and nothing else in the process can swap it.
"""

from __future__ import annotations

import collections
import logging
import os
import socket
import threading
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from opentelemetry import trace as trace_api
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.context import Context
from opentelemetry.propagate import get_global_textmap
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.propagators.textmap import TextMapPropagator
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    Sampler,
    TraceIdRatioBased,
)
from opentelemetry.semconv.attributes.service_attributes import SERVICE_NAME, SERVICE_VERSION
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from mes_trace_proxy import __version__
from mes_trace_proxy.config import Config
from mes_trace_proxy.correlation import OrderTraceIds
from mes_trace_proxy.export import ExportStats, OtlpExportProcessor, make_transport, otlp_settings
from mes_trace_proxy.sampling import RouteSampler, default_sampler
from mes_trace_proxy.span_context import span_context
from mes_trace_proxy.spans import SpanFactory

__all__ = [
    "BatchExportProcessor",
    "ExportStats",
    "RouteSampler",
    "Tracing",
    "build_tracing",
    "is_default_w3c",
    "resource_attributes",
]

log = logging.getLogger("mes_trace_proxy.tracing")

# Resource keys not in the stable semconv module yet (incubating names, stable strings).
_SERVICE_NAMESPACE: Final = "service.namespace"
_SERVICE_INSTANCE_ID: Final = "service.instance.id"
_DEPLOYMENT_ENVIRONMENT: Final = "deployment.environment.name"
_HOST_NAME: Final = "host.name"
#: Kubernetes downward-API variables → resource attributes (the design note's "node").
K8S_ENV: Final = (
    ("K8S_POD_NAME", "k8s.pod.name"),
    ("K8S_NAMESPACE_NAME", "k8s.namespace.name"),
    ("K8S_NODE_NAME", "k8s.node.name"),
)

# The SDK's defaults for OTEL_BSP_* (specification §Batching processor) — 2048 spans queued,
# every 5 s — except the batch: 128 spans per export instead of 512. Spans are encoded as they
# end, so a batch only joins and sends bytes, but it does so in one step of the event loop: in
# the benchmark (docs/performance.md) 512-span batches saved 12 µs of CPU per request against
# 64 and added 0.6 ms to the p99 at one connection; 128 keeps most of the saving for 0.05 ms.
# The variables still override every value.
_BSP_DEFAULTS: Final = {
    "OTEL_BSP_MAX_QUEUE_SIZE": 2048,
    "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": 128,
    "OTEL_BSP_SCHEDULE_DELAY": 5000,
    "OTEL_BSP_EXPORT_TIMEOUT": 30000,
}


def resource_attributes(config: Config, environ: Mapping[str, str]) -> dict[str, str]:
    """The resource attributes we set; ``OTEL_RESOURCE_ATTRIBUTES``/``OTEL_SERVICE_NAME`` win."""
    attrs = {
        SERVICE_NAME: config.service.name,
        SERVICE_VERSION: __version__,
        _SERVICE_INSTANCE_ID: str(uuid.uuid4()),
        _HOST_NAME: socket.gethostname(),
    }
    if config.service.namespace:
        attrs[_SERVICE_NAMESPACE] = config.service.namespace
    if config.service.environment:
        attrs[_DEPLOYMENT_ENVIRONMENT] = config.service.environment
    for env, key in K8S_ENV:
        if environ.get(env):
            attrs[key] = environ[env]
    return attrs


class BatchExportProcessor(SpanProcessor):
    """A bounded batch processor that counts what it drops: ``OTEL_TRACES_EXPORTER=console`` only.

    Not the default: OTLP, the default exporter, goes through ``export.OtlpExportProcessor``
    (see :func:`_processors`, where the choice is made). This one serves the SDK's
    ``SpanExporter`` interface, which the console exporter needs.

    Like the SDK's ``BatchSpanProcessor`` (one worker thread, a bounded deque, batches by
    size or delay) but every lost span is counted, so a dead collector shows up in
    ``/metrics`` instead of in silence. ``on_end`` is O(1) and never blocks the event loop.
    """

    def __init__(
        self,
        exporter: SpanExporter,
        *,
        max_queue_size: int,
        max_batch: int,
        delay_seconds: float,
        export_timeout_seconds: float,
    ) -> None:
        self._exporter = exporter
        self._queue: collections.deque[ReadableSpan] = collections.deque()
        self._max_queue = max_queue_size
        self._max_batch = max_batch
        self._delay = delay_seconds
        self._timeout = export_timeout_seconds
        self._wake = threading.Event()
        self._flush_done = threading.Condition()
        self._flush_requested = 0
        self._flush_served = 0
        self._stopping = False
        self.stats = ExportStats()
        self._thread = threading.Thread(target=self._run, name="mes-trace-proxy-export", daemon=True)
        self._thread.start()

    def on_start(self, span: object, parent_context: Context | None = None) -> None:
        """Nothing to do at start."""

    def on_end(self, span: ReadableSpan) -> None:
        """Queue a finished sampled span; count it as dropped when the queue is full."""
        context = span.context
        if context is None or not context.trace_flags.sampled:
            return
        if len(self._queue) >= self._max_queue:
            self.stats.dropped_queue_full += 1
            return
        self._queue.append(span)
        self.stats.queued += 1
        if len(self._queue) >= self._max_batch:
            self._wake.set()

    def _export_batch(self) -> None:
        batch: list[ReadableSpan] = []
        while self._queue and len(batch) < self._max_batch:
            batch.append(self._queue.popleft())
        if not batch:
            return
        try:
            result = self._exporter.export(batch)
        except Exception:
            # An exporter must not raise, but a broken one must not kill the worker either.
            log.exception("span exporter raised; %d spans lost", len(batch))
            result = SpanExportResult.FAILURE
        if result is SpanExportResult.SUCCESS:
            self.stats.exported += len(batch)
        else:
            self.stats.failed += len(batch)

    def _run(self) -> None:
        while True:
            self._wake.wait(self._delay)
            self._wake.clear()
            while self._queue:
                self._export_batch()
                if self._stopping and not self._queue:
                    break
            with self._flush_done:
                self._flush_served = self._flush_requested
                self._flush_done.notify_all()
            if self._stopping:
                return

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Export everything queued now; wait at most ``timeout_millis``."""
        with self._flush_done:
            self._flush_requested += 1
            ticket = self._flush_requested
            self._wake.set()
            return self._flush_done.wait_for(lambda: self._flush_served >= ticket, timeout_millis / 1000)

    def shutdown(self) -> None:
        """Flush what is queued, then stop the worker and the exporter."""
        self._stopping = True
        self._wake.set()
        self._thread.join(self._timeout)
        self._exporter.shutdown()


def _env_int(environ: Mapping[str, str], name: str) -> int:
    raw = environ.get(name)
    if raw is None or raw == "":
        return _BSP_DEFAULTS[name]
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a whole number") from None
    if value <= 0:
        raise ValueError(f"{name}={raw!r} must be positive")
    return value


def _processors(environ: Mapping[str, str]) -> list[OtlpExportProcessor | BatchExportProcessor]:
    """One counting processor per ``OTEL_TRACES_EXPORTER`` entry: the one place the choice is made.

    ``otlp`` -- the default, when the variable is unset -- goes through our own export path
    (``export.OtlpExportProcessor``: spans encoded as they end, sent from the event loop);
    ``console`` keeps the SDK's exporter in :class:`BatchExportProcessor`'s worker thread,
    since it is for debugging and its cost does not matter; ``none`` adds nothing.

    Raises:
        ValueError: an unknown exporter or protocol, or an unusable ``OTEL_EXPORTER_OTLP_*``.
    """
    names = [n.strip() for n in environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",") if n.strip()]
    processors: list[OtlpExportProcessor | BatchExportProcessor] = []
    for name in names:
        if name == "none":
            continue
        # Read only when something exports, as the SDK does: OTEL_BSP_* are ignored otherwise.
        max_queue_size = _env_int(environ, "OTEL_BSP_MAX_QUEUE_SIZE")
        max_batch = _env_int(environ, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE")
        delay_seconds = _env_int(environ, "OTEL_BSP_SCHEDULE_DELAY") / 1000
        export_timeout_seconds = _env_int(environ, "OTEL_BSP_EXPORT_TIMEOUT") / 1000
        if name == "console":
            processors.append(
                BatchExportProcessor(
                    ConsoleSpanExporter(),
                    max_queue_size=max_queue_size,
                    max_batch=max_batch,
                    delay_seconds=delay_seconds,
                    export_timeout_seconds=export_timeout_seconds,
                )
            )
        elif name == "otlp":
            protocol = environ.get(
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
                environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ).strip()
            settings = otlp_settings(environ, protocol)
            processors.append(
                OtlpExportProcessor(
                    make_transport(settings),
                    max_queue_size=max_queue_size,
                    max_batch=max_batch,
                    delay_seconds=delay_seconds,
                    export_timeout_seconds=export_timeout_seconds,
                    send_timeout_seconds=settings.timeout,
                )
            )
        else:
            raise ValueError(f"OTEL_TRACES_EXPORTER={name!r}: use otlp, console or none")
    return processors


@dataclass(frozen=True, slots=True, kw_only=True)
class Tracing:
    """What the request path needs from tracing, built once."""

    provider: TracerProvider
    tracer: trace_api.Tracer
    propagator: TextMapPropagator
    processors: tuple[OtlpExportProcessor | BatchExportProcessor, ...]
    #: the provider's id generator (a root span's trace id is chosen by ``spans.start(trace_id=)``)
    ids: IdGenerator
    #: the proxy's own SERVER and CLIENT spans, made lean on the provider's configuration
    spans: SpanFactory

    #: whether any span will ever leave the process (an exporter or an extra processor)
    exporting: bool = True
    #: the propagators are the default W3C pair (trace context, baggage): the request path
    #: reads and writes ``traceparent`` itself (``tracecontext.parse_traceparent``)
    w3c: bool = True

    def passthrough(
        self, parent: trace_api.SpanContext | None, trace_id: int | None = None
    ) -> trace_api.Span:
        """A non-recording span that carries the trace on when nothing is exported.

        It continues the parent's trace id, flags and tracestate with a new span id (a new
        trace, unsampled, when there is no parent), so callers and MES still get coherent
        ``traceparent``/``traceresponse`` headers at the cost of two random numbers, not
        of building spans nobody will see.

        Args:
            parent: the parent's context (the caller's, or the SERVER span's), if any.
            trace_id: the trace id of a root (``trace-per-order``); ignored with a valid parent.
        """
        ids = self.ids
        if parent is not None and parent.is_valid:
            trace, flags, state = parent.trace_id, parent.trace_flags, parent.trace_state
        else:
            trace = trace_id if trace_id is not None else ids.generate_trace_id()
            flags, state = _NOT_SAMPLED, _NO_STATE
        # The checked SpanContext constructor costs more than the ids it holds.
        return trace_api.NonRecordingSpan(span_context(trace, ids.generate_span_id(), flags, state))

    @property
    def service_name(self) -> str:
        """``service.name`` as exported (``OTEL_SERVICE_NAME`` wins over the config)."""
        return str(self.provider.resource.attributes.get(SERVICE_NAME, ""))

    def export_stats(self) -> ExportStats:
        """Counters summed over every exporter."""
        total = ExportStats()
        for processor in self.processors:
            total.queued += processor.stats.queued
            total.exported += processor.stats.exported
            total.dropped_queue_full += processor.stats.dropped_queue_full
            total.failed += processor.stats.failed
        return total

    def start(self) -> None:
        """Start the export tasks on the running loop (the lifecycle calls it once, at start-up)."""
        for processor in self.processors:
            if isinstance(processor, OtlpExportProcessor):
                processor.start()

    async def aclose(self) -> None:
        """Export what is queued (within ``OTEL_BSP_EXPORT_TIMEOUT``) and close the exporters, on the loop."""
        for processor in self.processors:
            if isinstance(processor, OtlpExportProcessor):
                await processor.aclose()

    def shutdown(self) -> None:
        """Flush every queued span and stop the exporters (blocking; call off the loop)."""
        self.provider.shutdown()


_NOT_SAMPLED: Final = trace_api.TraceFlags(trace_api.TraceFlags.DEFAULT)
_NO_STATE: Final = trace_api.TraceState()


def is_default_w3c(propagator: TextMapPropagator) -> bool:
    """Whether ``propagator`` is the SDK's default: W3C trace context, optionally with W3C baggage.

    ``OTEL_PROPAGATORS`` naming anything else (b3, jaeger, ...) keeps the propagators in charge
    of every request.
    """
    parts = getattr(propagator, "_propagators", None) if isinstance(propagator, CompositePropagator) else None
    kinds = [type(p) for p in parts] if parts is not None else [type(propagator)]
    return kinds in (
        [TraceContextTextMapPropagator, W3CBaggagePropagator],
        [TraceContextTextMapPropagator],
    )


def build_tracing(
    config: Config,
    environ: Mapping[str, str] | None = None,
    *,
    extra_processors: Sequence[SpanProcessor] = (),
) -> Tracing:
    """Build the provider, samplers, processors and exporters.

    Args:
        config: the proxy configuration (service facts, rules with per-rule sampling).
        environ: the environment to read ``OTEL_*`` from (default ``os.environ``).
        extra_processors: more span processors (tests' in-memory exporters, embedders).

    Returns:
        The tracing bundle; call :meth:`Tracing.shutdown` on exit.

    Raises:
        ValueError: an ``OTEL_*`` variable has a value the SDK would not accept.
    """
    env = os.environ if environ is None else environ
    per_route: dict[str, Sampler] = {}
    for listener in config.listeners:
        for rule in listener.rules.rules:
            if rule.sample is not None and rule.route not in per_route:
                per_route[rule.route] = TraceIdRatioBased(rule.sample)
            elif rule.status is not None and rule.route not in per_route:
                # Every status change is recorded whatever the default ratio: it is what the
                # watchdog links stuck orders to.
                per_route[rule.route] = ALWAYS_ON
    processors = _processors(env)
    sampler: Sampler = RouteSampler(default_sampler(env), per_route)
    if not processors and not extra_processors:
        # Nothing will be exported: the proxy's own spans become pass-through ones (see
        # Tracing.passthrough); anything else started (watchdog, WebSocket) records nothing.
        sampler = ALWAYS_OFF
    resource = Resource.create(resource_attributes(config, env))
    ids = OrderTraceIds()
    # Read from the environment as the provider would; given to the span factory as well.
    limits = SpanLimits()
    provider = TracerProvider(resource=resource, sampler=sampler, id_generator=ids, span_limits=limits)
    for processor in processors:
        provider.add_span_processor(processor)
    for extra in extra_processors:
        provider.add_span_processor(extra)
    tracer = provider.get_tracer("mes_trace_proxy", __version__)
    spans = SpanFactory(
        provider,
        processors=(*processors, *extra_processors),
        limits=limits,
        scope_name="mes_trace_proxy",
        scope_version=__version__,
    )
    propagator = get_global_textmap()
    return Tracing(
        provider=provider,
        tracer=tracer,
        propagator=propagator,
        processors=tuple(processors),
        ids=ids,
        spans=spans,
        exporting=bool(processors or extra_processors),
        w3c=is_default_w3c(propagator),
    )
