"""The CLIENT span by opentelemetry-instrumentation-aiohttp-client (``tracing.client_span: instrumentation``).

By default ``proxy.handle`` starts the CLIENT span with the SDK. In this mode the contrib
package's trace config, bound to the proxy's own tracer provider, makes it, shaped to match.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Final

import aiohttp
from multidict import CIMultiDict
from opentelemetry import context as context_api
from opentelemetry.context import Context
from opentelemetry.propagate import get_global_textmap
from opentelemetry.propagators.textmap import TextMapPropagator
from opentelemetry.trace import Span, Status, StatusCode, TracerProvider
from opentelemetry.util.types import AttributeValue
from yarl import URL

from mes_trace_proxy.core.attributes import ERROR_TYPE, URL_FULL

__all__ = ["ClientSpanPlan", "current_plan", "instrumentation_trace_configs", "upstream_context"]

# The plan rides in the OpenTelemetry context the proxy attaches around the upstream call:
# the contrib's hooks receive only (span, params), and the context is what they run in.
_PLAN: Final = context_api.create_key("mes-trace-proxy.client-span-plan")
# What the SDK-mode path copies from its propagator onto the upstream request (proxy.py).
_TRACE_FIELDS: Final = ("traceparent", "tracestate")
# The global propagator's fields with OTEL_PROPAGATORS unset (tracecontext,baggage).
_DEFAULT_GLOBAL_FIELDS: Final = frozenset({"traceparent", "tracestate", "baggage"})


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientSpanPlan:
    """How one upstream call's CLIENT span must look; the instrumentation hooks apply it."""

    #: the span name, ``{method} {route}`` as the SERVER span's
    name: str
    #: the start attributes the SDK-mode span gets (``None`` when the SERVER span does not record)
    attributes: Mapping[str, AttributeValue] | None
    #: the headers the proxy forwards, before any propagator wrote to them
    headers: CIMultiDict[str]


def upstream_context(server_context: Context, plan: ClientSpanPlan) -> Context:
    """The context to attach around the upstream call: the SERVER span as parent, and the plan.

    Args:
        server_context: the context holding the SERVER span.
        plan: the CLIENT span's name, attributes and the forwarded headers.

    Returns:
        A new context; attach it for the duration of ``session.request``.
    """
    return context_api.set_value(_PLAN, plan, server_context)


def current_plan() -> ClientSpanPlan | None:
    """The plan of the upstream call running in the current context, if the proxy made one."""
    plan = context_api.get_value(_PLAN)
    return plan if isinstance(plan, ClientSpanPlan) else None


def _url_filter(url: URL) -> str:
    """``url.full`` from the start: the raw URL (unredacted query) never enters the span."""
    plan = current_plan()
    if plan is None or plan.attributes is None:
        return str(url.with_query(None))
    return str(plan.attributes[URL_FULL])


def _request_hook(span: Span, params: aiohttp.TraceRequestStartParams) -> None:
    """Our name and our attributes over the contrib's (``PUT`` → ``PUT /api/v1/orders/{orderId}``)."""
    plan = current_plan()
    if plan is None:
        return
    span.update_name(plan.name)
    if plan.attributes is not None:
        span.set_attributes(plan.attributes)


def _response_hook(
    error_type: Callable[[BaseException], str],
) -> Callable[[Span, aiohttp.TraceRequestEndParams | aiohttp.TraceRequestExceptionParams], None]:
    def hook(span: Span, params: aiohttp.TraceRequestEndParams | aiohttp.TraceRequestExceptionParams) -> None:
        # A response needs nothing: the contrib then sets http.response.status_code, and for
        # 4xx/5xx error.type and ERROR exactly as the SDK-mode span gets them. A failure gets
        # our low-cardinality error.type instead of the exception's class name.
        if isinstance(params, aiohttp.TraceRequestExceptionParams):
            kind = error_type(params.exception)
            span.set_attribute(ERROR_TYPE, kind)
            span.set_status(Status(StatusCode.ERROR, kind))

    return hook


def _reinjector(propagator: TextMapPropagator, global_fields: frozenset[str]) -> aiohttp.TraceConfig:
    """A trace config run after the contrib's: MES gets our propagator's headers, not the global one's.

    The contrib injects with the process-global propagator. Where that one writes fields
    the proxy would not (``OTEL_PROPAGATORS=b3``…), they go back to what the caller sent,
    and ``traceparent``/``tracestate`` come from the proxy's propagator, as in SDK mode.
    """

    async def on_request_start(
        session: aiohttp.ClientSession, context: SimpleNamespace, params: aiohttp.TraceRequestStartParams
    ) -> None:
        plan = current_plan()
        if plan is None:
            return
        headers = params.headers
        for name in global_fields:
            sent = plan.headers.getall(name, [])
            headers.popall(name, None)
            for value in sent:
                headers.add(name, value)
        carrier: dict[str, str] = {}
        # The current context holds the contrib's CLIENT span (it attached it before injecting).
        propagator.inject(carrier)
        for name in _TRACE_FIELDS:
            ours = carrier.get(name)
            if ours is not None:
                headers[name] = ours

    config = aiohttp.TraceConfig()
    config.on_request_start.append(on_request_start)
    config.freeze()
    return config


def instrumentation_trace_configs(
    provider: TracerProvider,
    propagator: TextMapPropagator,
    *,
    error_type: Callable[[BaseException], str],
) -> tuple[aiohttp.TraceConfig, ...]:
    """The trace configs that make the CLIENT span with opentelemetry-instrumentation-aiohttp-client.

    The contrib's ``create_trace_config`` is bound to ``provider`` (never the global one) and
    to no meter (the proxy's metrics are its own); stable HTTP semantic conventions
    (``http.request.method``, ``url.full``, ``http.response.status_code``, ``error.type``)
    whatever ``OTEL_SEMCONV_STABILITY_OPT_IN`` says, as the SDK-mode span has them.

    Args:
        provider: the proxy's tracer provider.
        propagator: the proxy's propagator (``Tracing.propagator``).
        error_type: maps an upstream call's exception to the span's ``error.type``.

    Returns:
        The configs for ``aiohttp.ClientSession(trace_configs=...)``, in order.
    """
    # Imported here: the package (and wrapt) load only when this mode is chosen.
    from opentelemetry.instrumentation._semconv import _StabilityMode
    from opentelemetry.instrumentation.aiohttp_client import create_trace_config
    from opentelemetry.metrics import NoOpMeterProvider

    configs = [
        create_trace_config(
            url_filter=_url_filter,
            request_hook=_request_hook,
            response_hook=_response_hook(error_type),
            tracer_provider=provider,
            meter_provider=NoOpMeterProvider(),
            sem_conv_opt_in_mode=_StabilityMode.HTTP,
        )
    ]
    global_propagator = get_global_textmap()
    global_fields = frozenset(global_propagator.fields)
    if propagator is not global_propagator or not global_fields <= _DEFAULT_GLOBAL_FIELDS:
        # Checked once here: the global propagator is set at import from OTEL_PROPAGATORS.
        configs.append(_reinjector(propagator, global_fields))
    return tuple(configs)
