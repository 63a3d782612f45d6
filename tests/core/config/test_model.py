"""Tests for config.model: the frozen values, their derived fields and check-config's masked dump."""

from __future__ import annotations

import dataclasses

import pytest

from mes_trace_proxy.core.config.model import ConfigError, HostPort, Upstream, is_loopback


@pytest.mark.parametrize(
    ("host", "port", "text"),
    [("127.0.0.1", 8080, "127.0.0.1:8080"), ("::1", 9901, "[::1]:9901"), ("mes", 0, "mes:0")],
)
def test_hostport_prints_as_it_is_written(host: str, port: int, text: str) -> None:
    """IPv6 hosts get brackets, so the text parses back to the same address."""
    assert str(HostPort(host=host, port=port)) == text


@pytest.mark.parametrize(
    ("scheme", "host", "port", "base_path", "host_header", "origin"),
    [
        ("http", "mes", 80, "", "mes", "http://mes"),
        ("http", "mes", 8080, "/api", "mes:8080", "http://mes:8080/api"),
        ("https", "mes", 443, "", "mes", "https://mes"),
        ("https", "::1", 8443, "", "[::1]:8443", "https://[::1]:8443"),
    ],
)
def test_upstream_derives_host_and_origin(
    scheme: str, host: str, port: int, base_path: str, host_header: str, origin: str
) -> None:
    """host_header and origin are computed at construction and cannot be passed in."""
    upstream = Upstream(url="x", scheme=scheme, host=host, port=port, base_path=base_path)
    assert (upstream.host_header, upstream.origin) == (host_header, origin)
    assert "host_header" not in {f.name for f in dataclasses.fields(Upstream) if f.init}
    with pytest.raises(dataclasses.FrozenInstanceError):
        upstream.port = 1  # type: ignore[misc]


def test_config_error_keeps_key_and_message_apart() -> None:
    """The key is machine-readable; the text reads 'key: message'."""
    error = ConfigError("listeners[1].upstream", "is required")
    assert (error.key, error.message, str(error)) == (
        "listeners[1].upstream",
        "is required",
        "listeners[1].upstream: is required",
    )


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("localhost", True),
        ("127.0.0.1", True),
        ("127.8.9.1", True),
        ("::1", True),
        ("0.0.0.0", False),
        ("10.0.0.1", False),
        ("mes.internal", False),
        ("::", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    """Loopback addresses and the name localhost; every other name or address is not."""
    assert is_loopback(host) is loopback
