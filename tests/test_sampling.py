"""Tests for sampling: the per-route sampler and the sampler OTEL_TRACES_SAMPLER names."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    Decision,
    ParentBased,
    Sampler,
    TraceIdRatioBased,
)
from opentelemetry.trace import SpanKind

from mes_trace_proxy.sampling import RouteSampler, default_sampler
from mes_trace_proxy.tracing import RouteSampler as ReExported


@pytest.mark.parametrize(
    ("route", "kind", "expected"),
    [
        ("/api/v1/orders", SpanKind.SERVER, Decision.DROP),
        ("/api/v1/orders/{orderId}/status", SpanKind.SERVER, Decision.RECORD_AND_SAMPLE),
        ("/other", SpanKind.SERVER, Decision.DROP),
        ("/api/v1/orders/{orderId}/status", SpanKind.CLIENT, Decision.DROP),
    ],
    ids=["per-route-zero", "per-route-always", "default-for-unknown", "client-spans-follow-default"],
)
def test_route_sampler_overrides_default_by_route(route: str, kind: SpanKind, expected: Decision) -> None:
    """A per-route sampler wins for SERVER spans carrying http.route; others get the default."""
    sampler = RouteSampler(
        ALWAYS_OFF, {"/api/v1/orders": ALWAYS_OFF, "/api/v1/orders/{orderId}/status": ALWAYS_ON}
    )
    result = sampler.should_sample(None, 1234, "name", kind, {"http.route": route})
    assert result.decision is expected


def test_route_sampler_exposes_what_the_span_factory_compiles() -> None:
    """default and per_route are what the factory reads; per_route is a read-only view."""
    sampler = RouteSampler(ALWAYS_ON, {"/a": ALWAYS_OFF})
    assert sampler.default is ALWAYS_ON
    assert dict(sampler.per_route) == {"/a": ALWAYS_OFF}
    with pytest.raises(TypeError):
        sampler.per_route["/b"] = ALWAYS_ON  # type: ignore[index]
    assert sampler.get_description() == "RouteSampler{default=AlwaysOnSampler,routes=1}"
    assert ReExported is RouteSampler  # tracing.RouteSampler keeps working


def _described(sampler: Sampler) -> str:
    """The sampler's description, read through the base class's typed signature."""
    return sampler.get_description()


@pytest.mark.parametrize(
    ("environ", "description"),
    [
        ({}, _described(ParentBased(ALWAYS_ON))),
        ({"OTEL_TRACES_SAMPLER": "always_off"}, ALWAYS_OFF.get_description()),
        ({"OTEL_TRACES_SAMPLER": " Always_On "}, ALWAYS_ON.get_description()),
        (
            {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.25"},
            TraceIdRatioBased(0.25).get_description(),
        ),
        (
            {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.5"},
            _described(ParentBased(TraceIdRatioBased(0.5))),
        ),
    ],
    ids=["default", "always-off", "case-and-spaces", "ratio", "parent-based-ratio"],
)
def test_default_sampler_follows_the_specification_names(environ: dict[str, str], description: str) -> None:
    """OTEL_TRACES_SAMPLER/_ARG give the SDK's samplers; parentbased_always_on when unset."""
    sampler: Sampler = default_sampler(environ)
    assert sampler.get_description() == description


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"OTEL_TRACES_SAMPLER": "sometimes"}, "OTEL_TRACES_SAMPLER='sometimes'"),
        ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "half"}, "not a number"),
        ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "1.5"}, "from 0 to 1"),
    ],
    ids=["unknown-name", "not-a-number", "out-of-range"],
)
def test_default_sampler_names_the_bad_variable(environ: dict[str, str], message: str) -> None:
    """A sampler the SDK would not accept is refused with the variable named."""
    with pytest.raises(ValueError, match=message):
        default_sampler(environ)
