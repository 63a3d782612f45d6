"""Tests for otlp_settings: OTEL_EXPORTER_OTLP_* read as the specification says, bad values named."""

from __future__ import annotations

import pytest

from mes_trace_proxy.otlp_settings import otlp_settings

HTTP = "http/protobuf"


@pytest.mark.parametrize(
    ("environ", "protocol", "expected"),
    [
        pytest.param({}, HTTP, "http://localhost:4318/v1/traces", id="http-default"),
        pytest.param({}, "grpc", "http://localhost:4317", id="grpc-default"),
        pytest.param(
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318/"},
            HTTP,
            "http://c:4318/v1/traces",
            id="generic+path",
        ),
        pytest.param(
            {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:9/x", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://d"},
            HTTP,
            "http://c:9/x",
            id="traces-wins-as-given",
        ),
        pytest.param(
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}, "grpc", "http://c:4317", id="grpc-no-path"
        ),
    ],
)
def test_endpoint_follows_the_specification(environ: dict[str, str], protocol: str, expected: str) -> None:
    """The traces endpoint is used as given; the generic one gets /v1/traces for HTTP only."""
    assert otlp_settings(environ, protocol).endpoint == expected


@pytest.mark.parametrize(
    ("environ", "protocol", "named"),
    [
        pytest.param(
            {"OTEL_EXPORTER_OTLP_HEADERS": "novalue"}, HTTP, "OTEL_EXPORTER_OTLP_HEADERS", id="header"
        ),
        pytest.param(
            {"OTEL_EXPORTER_OTLP_TRACES_HEADERS": "=x"},
            HTTP,
            "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
            id="empty-key",
        ),
        pytest.param(
            {"OTEL_EXPORTER_OTLP_COMPRESSION": "brotli"}, HTTP, "OTEL_EXPORTER_OTLP_COMPRESSION", id="codec"
        ),
        pytest.param(
            {"OTEL_EXPORTER_OTLP_COMPRESSION": "deflate"},
            "grpc",
            "OTEL_EXPORTER_OTLP_COMPRESSION",
            id="grpc-deflate",
        ),
        pytest.param(
            {"OTEL_EXPORTER_OTLP_TIMEOUT": "soon"}, HTTP, "OTEL_EXPORTER_OTLP_TIMEOUT", id="timeout"
        ),
        pytest.param(
            {"OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "-1"},
            HTTP,
            "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
            id="negative",
        ),
        pytest.param(
            {"OTEL_EXPORTER_OTLP_CLIENT_KEY": "/k.pem"}, HTTP, "OTEL_EXPORTER_OTLP_CLIENT_KEY", id="half-pair"
        ),
        pytest.param(
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "collector:4318"}, HTTP, "OTEL_EXPORTER_OTLP_ENDPOINT", id="url"
        ),
        pytest.param({}, "http/json", "OTEL_EXPORTER_OTLP_PROTOCOL", id="protocol"),
    ],
)
def test_bad_values_are_refused_naming_the_variable(
    environ: dict[str, str], protocol: str, named: str
) -> None:
    """Every unusable OTEL_EXPORTER_OTLP_* value stops start-up with its variable's name."""
    with pytest.raises(ValueError, match=named):
        otlp_settings(environ, protocol)


def test_headers_are_percent_decoded_and_traces_variables_win() -> None:
    """Headers are W3C-baggage-style pairs with percent-encoded values; the traces variable wins."""
    settings = otlp_settings(
        {
            "OTEL_EXPORTER_OTLP_HEADERS": "ignored=1",
            "OTEL_EXPORTER_OTLP_TRACES_HEADERS": "Authorization=Bearer%20abc, x-tenant = a%3Db ,",
            "OTEL_EXPORTER_OTLP_COMPRESSION": "GZIP",
            "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "2.5",
        },
        HTTP,
    )
    assert settings.headers == (("authorization", "Bearer abc"), ("x-tenant", "a=b"))
    assert (settings.compression, settings.timeout) == ("gzip", 2.5)


@pytest.mark.parametrize(
    ("endpoint", "insecure_variable", "insecure"),
    [
        pytest.param("http://c:4317", "", True, id="http-scheme"),
        pytest.param("https://c:4317", "true", False, id="https-scheme-wins"),
        pytest.param("c:4317", "true", True, id="no-scheme-variable"),
        pytest.param("c:4317", "", False, id="no-scheme-default-tls"),
    ],
)
def test_grpc_plaintext_follows_the_scheme_then_the_variable(
    endpoint: str, insecure_variable: str, insecure: bool
) -> None:
    """gRPC uses TLS unless the endpoint says http:// or, without a scheme, OTEL_EXPORTER_OTLP_INSECURE."""
    environ = {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_EXPORTER_OTLP_INSECURE": insecure_variable}
    assert otlp_settings(environ, "grpc").insecure is insecure
