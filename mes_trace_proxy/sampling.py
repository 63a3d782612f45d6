"""Sampling: the sampler ``OTEL_TRACES_SAMPLER`` names, overridden per rule's route.

``tracing.build_tracing`` builds the provider's sampler from these; ``spans.SpanFactory``
compiles a ``RouteSampler`` to ratio bounds once, so a decision on the hot path is one
comparison. Kept apart from tracing.py so the span factory can read the sampler's type
without importing the module that builds the factory.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Final

from opentelemetry import trace as trace_api
from opentelemetry.context import Context
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    ParentBased,
    Sampler,
    SamplingResult,
    TraceIdRatioBased,
)
from opentelemetry.trace import Link, SpanKind
from opentelemetry.util.types import Attributes

from mes_trace_proxy.attributes import HTTP_ROUTE

__all__ = ["RouteSampler", "default_sampler"]


class RouteSampler(Sampler):
    """The SDK's sampler, overridden per rule: polling at 1 %, every status change always.

    The decision is keyed by the ``http.route`` attribute the proxy passes when it starts
    the SERVER span, so the override costs one dict lookup. Per-rule ratios are explicit
    (not parent-based): the operator asked for exactly that share of that route.
    """

    def __init__(self, default: Sampler, per_route: Mapping[str, Sampler]) -> None:
        self._default = default
        self._per_route = dict(per_route)

    @property
    def default(self) -> Sampler:
        """The sampler of every span not routed (``OTEL_TRACES_SAMPLER``)."""
        return self._default

    @property
    def per_route(self) -> Mapping[str, Sampler]:
        """The SERVER spans' samplers by ``http.route`` (read-only view)."""
        return MappingProxyType(self._per_route)

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: trace_api.TraceState | None = None,
    ) -> SamplingResult:
        sampler = self._default
        if kind is SpanKind.SERVER and attributes:
            route = attributes.get(HTTP_ROUTE)
            if route is not None:
                sampler = self._per_route.get(str(route), self._default)
        return sampler.should_sample(parent_context, trace_id, name, kind, attributes, links, trace_state)

    def get_description(self) -> str:
        return f"RouteSampler{{default={self._default.get_description()},routes={len(self._per_route)}}}"


_SAMPLERS: Final[Mapping[str, Callable[[float], Sampler]]] = {
    "always_on": lambda ratio: ALWAYS_ON,
    "always_off": lambda ratio: ALWAYS_OFF,
    "traceidratio": lambda ratio: TraceIdRatioBased(ratio),
    "parentbased_always_on": lambda ratio: ParentBased(ALWAYS_ON),
    "parentbased_always_off": lambda ratio: ParentBased(ALWAYS_OFF),
    "parentbased_traceidratio": lambda ratio: ParentBased(TraceIdRatioBased(ratio)),
}


def default_sampler(environ: Mapping[str, str]) -> Sampler:
    """The SDK's default sampler as ``OTEL_TRACES_SAMPLER``/``_ARG`` name it (specification §Sampler).

    Read from the given environment rather than the SDK's own lookup of ``os.environ``, so a
    test or an embedder can set it; the names and the default are the specification's.

    Raises:
        ValueError: an unknown sampler name or a ratio outside 0..1.
    """
    name = environ.get("OTEL_TRACES_SAMPLER", "parentbased_always_on").strip().lower()
    factory = _SAMPLERS.get(name)
    if factory is None:
        raise ValueError(f"OTEL_TRACES_SAMPLER={name!r}: use one of {', '.join(_SAMPLERS)}")
    raw = environ.get("OTEL_TRACES_SAMPLER_ARG", "1.0")
    try:
        ratio = float(raw)
    except ValueError:
        raise ValueError(f"OTEL_TRACES_SAMPLER_ARG={raw!r} is not a number") from None
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"OTEL_TRACES_SAMPLER_ARG={raw!r} must be from 0 to 1")
    return factory(ratio)
