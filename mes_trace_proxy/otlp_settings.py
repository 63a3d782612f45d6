"""OTLP exporter settings: the ``OTEL_EXPORTER_OTLP_*`` variables read once, at start-up.

The specification's names, defaults and precedence (the ``_TRACES_`` variable over the general
one); every value the SDK would refuse stops start-up with the variable named.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final
from urllib.parse import unquote, urlsplit

__all__ = [
    "DEFAULT_GRPC_ENDPOINT",
    "DEFAULT_HTTP_ENDPOINT",
    "DEFAULT_TIMEOUT",
    "OtlpSettings",
    "otlp_settings",
]

#: The SDK's OTLP timeout when no variable sets one (seconds, the Python SDK's unit for it).
DEFAULT_TIMEOUT: Final = 10.0
DEFAULT_HTTP_ENDPOINT: Final = "http://localhost:4318/v1/traces"
DEFAULT_GRPC_ENDPOINT: Final = "http://localhost:4317"

_COMPRESSIONS: Final = ("none", "gzip", "deflate")
_PROXY_VARIABLES: Final = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


@dataclass(frozen=True, slots=True, kw_only=True)
class OtlpSettings:
    """The exporter's ``OTEL_EXPORTER_OTLP_*`` settings, read and checked once at start-up."""

    protocol: str
    endpoint: str
    headers: tuple[tuple[str, str], ...] = ()
    compression: str = "none"
    timeout: float = DEFAULT_TIMEOUT
    certificate: str | None = None
    client_key: str | None = None
    client_certificate: str | None = None
    #: gRPC only: plaintext instead of TLS
    insecure: bool = False
    #: OTLP/HTTP only: honour http(s)_proxy, as requests did (off unless one is set)
    trust_env: bool = False


def _variable(environ: Mapping[str, str], suffix: str) -> tuple[str, str] | None:
    """The traces-specific variable if set, else the generic one, with the name that gave it."""
    for name in (f"OTEL_EXPORTER_OTLP_TRACES_{suffix}", f"OTEL_EXPORTER_OTLP_{suffix}"):
        value = environ.get(name, "").strip()
        if value:
            return name, value
    return None


def _headers(name: str, raw: str) -> tuple[tuple[str, str], ...]:
    """``key=value,key2=value2`` with percent-encoded values (the W3C Baggage format the spec names).

    Raises:
        ValueError: a pair without ``=`` or with an empty key, naming the variable.
    """
    out = []
    for pair in raw.split(","):
        if not pair.strip():
            continue
        key, sep, value = pair.partition("=")
        key = unquote(key).strip().lower()
        if not sep or not key or any(c in key for c in " \t\r\n:"):
            raise ValueError(f"{name}: {pair.strip()!r} is not a key=value pair")
        out.append((key, unquote(value).strip()))
    return tuple(out)


def otlp_settings(environ: Mapping[str, str], protocol: str) -> OtlpSettings:
    """Read the OTLP exporter variables as the specification and the Python SDK define them.

    ``OTEL_EXPORTER_OTLP_TRACES_*`` wins over ``OTEL_EXPORTER_OTLP_*``; the generic endpoint
    gets ``/v1/traces`` appended for OTLP/HTTP, the signal-specific one is used as given.

    Args:
        environ: the environment to read.
        protocol: ``http/protobuf`` or ``grpc``.

    Returns:
        The checked settings.

    Raises:
        ValueError: a value the exporter cannot use, naming its variable.
    """
    if protocol not in ("http/protobuf", "grpc"):
        raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: use grpc or http/protobuf")
    traces = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
    generic = environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    if protocol == "http/protobuf":
        endpoint = traces or (generic.rstrip("/") + "/v1/traces" if generic else DEFAULT_HTTP_ENDPOINT)
        source = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT" if traces else "OTEL_EXPORTER_OTLP_ENDPOINT"
        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{source}={endpoint!r}: OTLP/HTTP needs an http:// or https:// URL")
    else:
        endpoint = traces or generic or DEFAULT_GRPC_ENDPOINT
    found = _variable(environ, "HEADERS")
    headers = _headers(*found) if found else ()
    compression = "none"
    found = _variable(environ, "COMPRESSION")
    if found:
        name, compression = found[0], found[1].lower()
        if compression not in _COMPRESSIONS or (protocol == "grpc" and compression == "deflate"):
            allowed = "none or gzip" if protocol == "grpc" else ", ".join(_COMPRESSIONS)
            raise ValueError(f"{name}={found[1]!r}: use {allowed}")
    timeout = DEFAULT_TIMEOUT
    found = _variable(environ, "TIMEOUT")
    if found:
        try:
            timeout = float(found[1])
        except ValueError:
            raise ValueError(f"{found[0]}={found[1]!r} is not a number of seconds") from None
        if not timeout > 0:
            raise ValueError(f"{found[0]}={found[1]!r} must be positive")
    files = {}
    for suffix in ("CERTIFICATE", "CLIENT_KEY", "CLIENT_CERTIFICATE"):
        found = _variable(environ, suffix)
        files[suffix] = found[1] if found else None
    if (files["CLIENT_KEY"] is None) != (files["CLIENT_CERTIFICATE"] is None):
        raise ValueError(
            "OTEL_EXPORTER_OTLP_CLIENT_KEY and OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE go together: set both"
        )
    found = _variable(environ, "INSECURE")
    insecure_raw = found[1].lower() if found else ""
    scheme = urlsplit(endpoint).scheme if "://" in endpoint else ""
    # The gRPC exporter's rule: the scheme decides when there is one, the variable otherwise.
    insecure = scheme == "http" or (scheme == "" and insecure_raw == "true")
    return OtlpSettings(
        protocol=protocol,
        endpoint=endpoint,
        headers=headers,
        compression=compression,
        timeout=timeout,
        certificate=files["CERTIFICATE"],
        client_key=files["CLIENT_KEY"],
        client_certificate=files["CLIENT_CERTIFICATE"],
        insecure=insecure,
        trust_env=any(environ.get(n) or environ.get(n.upper()) for n in _PROXY_VARIABLES),
    )
