"""The one frozen configuration, loaded once from flags, environment and the config file.

:func:`load_config` is pure: the CLI reads the files and hands over their parsed contents,
the environment as a mapping and the flags as a mapping. Precedence, highest first: flag,
environment variable, config file, default. Every error is a :class:`ConfigError` naming
the flag, the variable or the config-file key it came from.
"""

from __future__ import annotations

import copy
import ipaddress
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final, TypeVar
from urllib.parse import urlsplit

from mes_trace_proxy.admin_auth import TokenError, TokenTable, parse_tokens
from mes_trace_proxy.lifecycle import REFERENCE_LIFECYCLE, Lifecycle
from mes_trace_proxy.redact import (
    DEFAULT_HEADER_ALLOW,
    DEFAULT_QUERY_ALLOW,
    DEFAULT_REDACT_KEYS,
    PrivacyPolicy,
    Redactor,
    is_never_header,
)
from mes_trace_proxy.rules import CompiledRules, RuleError, SourceKind, compile_rules, format_pointer

__all__ = [
    "AdminConfig",
    "Config",
    "ConfigError",
    "HostPort",
    "Limits",
    "ListenerConfig",
    "PrivacyConfig",
    "ServerConfig",
    "ServerTls",
    "ServiceConfig",
    "Timeouts",
    "TracingConfig",
    "Upstream",
    "UpstreamTls",
    "WatchdogConfig",
    "load_config",
    "parse_duration",
    "parse_size",
]


_T = TypeVar("_T")


class ConfigError(Exception):
    """Invalid configuration; ``key`` is the flag, env var or file key at fault."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


# ── value types ─────────────────────────────────────────────────────────────────────────


@dataclass(frozen=True, slots=True, kw_only=True)
class HostPort:
    """A listen address."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Upstream:
    """Where a listener forwards to."""

    url: str
    scheme: str
    host: str
    port: int
    #: a path prefix to put before every forwarded path ("" for none)
    base_path: str
    #: the Host value for this upstream: the port only when not the scheme's default
    host_header: str = field(init=False)
    #: ``scheme://host[:port]base_path``: what the CLIENT span's ``url.full`` starts with
    origin: str = field(init=False)

    def __post_init__(self) -> None:
        # Both are read on every request: formatted once here.
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        host_header = host if self.port == default else f"{host}:{self.port}"
        object.__setattr__(self, "host_header", host_header)
        object.__setattr__(self, "origin", f"{self.scheme}://{host_header}{self.base_path}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Timeouts:
    """Upstream timeouts in seconds; ``None`` means no limit."""

    connect: float | None
    read: float | None
    total: float | None


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerTls:
    """TLS served on a proxy listener; the files are re-read on SIGHUP and when they change."""

    cert_file: str
    key_file: str
    #: the key (or flag, or variable) to name when the files turn out unusable at start-up
    source: str


@dataclass(frozen=True, slots=True, kw_only=True)
class UpstreamTls:
    """TLS towards the upstream: whom to trust and, for mTLS, the client certificate."""

    ca_file: str | None
    cert_file: str | None
    key_file: str | None
    verify: bool
    source: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """What one listener accepts from a caller before it refuses or disconnects."""

    #: request target (URI) bytes; longer gets 414
    max_line_size: int
    #: bytes of one header field (name and value); longer gets 431
    max_header_size: int
    #: header fields per request; more gets 431
    max_headers: int
    #: request body bytes; more gets 413 (``None``: no limit)
    max_body_size: int | None
    #: seconds from a request's first byte to the end of its header section; then 408
    header_read_timeout: float
    #: seconds a keep-alive connection may sit idle between requests
    idle_timeout: float
    #: open connections; beyond it the longest-idle one is closed, or new ones get 503
    max_connections: int
    #: open connections from one source address; beyond it new ones get 503 (``None``: no cap)
    max_connections_per_client: int | None = None
    #: seconds a request body may go without a byte before 408 (``None``: no limit)
    body_read_timeout: float | None = 60.0


@dataclass(frozen=True, slots=True, kw_only=True)
class ListenerConfig:
    """One proxy listener: where it listens, where it forwards, which rules it applies."""

    name: str
    listen: HostPort
    upstream: Upstream
    rules: CompiledRules
    rule_set: str
    preserve_host: bool
    forwarded_headers: bool
    trace_id_header: str | None
    traceresponse: bool
    timeouts: Timeouts
    inspect_body_limit: int
    limits: Limits
    tls: ServerTls | None = None
    upstream_tls: UpstreamTls | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class AdminConfig:
    """The admin listener."""

    listen: HostPort
    #: ``ROLE:TOKEN`` lines; when set, every endpoint but the probes needs a bearer token
    tokens_file: str | None = None
    #: the tokens read at start-up (SIGHUP re-reads the file); never printed
    tokens: TokenTable = field(default_factory=TokenTable, repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceConfig:
    """Resource facts: the design note's "static facts: node, environment"."""

    name: str
    namespace: str | None
    environment: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class PrivacyConfig:
    """What may leave the proxy about a user."""

    user_id_header: str
    #: HMAC key for ``enduser.id``; never printed (``repr=False``)
    user_id_key: bytes | None = field(default=None, repr=False)
    user_id_key_source: str | None = None
    query_allow: tuple[str, ...] = DEFAULT_QUERY_ALLOW
    header_allow: tuple[str, ...] = DEFAULT_HEADER_ALLOW
    redact_keys: tuple[str, ...] = DEFAULT_REDACT_KEYS
    #: CIDRs whose trace context (and baggage) is continued; ``*`` trusts every caller
    trusted_callers: tuple[str, ...] = ("*",)

    def policy(self) -> PrivacyPolicy:
        """The redactor's policy (validated when the config was loaded)."""
        return PrivacyPolicy(
            redact_keys=self.redact_keys,
            query_allow=self.query_allow,
            header_allow=self.header_allow,
            user_id_header=self.user_id_header,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class WatchdogConfig:
    """The stuck-order watchdog."""

    state: str
    check_interval: float
    jaeger_url: str
    correlation: str
    retention: float


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerConfig:
    """Process-level settings."""

    workers: int
    grace_period: float
    log_level: str
    access_log: bool


#: ``tracing.client_span``: who makes the CLIENT span around the upstream call. ``sdk`` (the
#: default) starts it directly with the SDK; ``instrumentation`` lets the card's
#: opentelemetry-instrumentation-aiohttp-client make it, shaped to match (docs/performance.md).
CLIENT_SPAN_MODES: Final = ("sdk", "instrumentation")


@dataclass(frozen=True, slots=True, kw_only=True)
class TracingConfig:
    """How the proxy makes its spans (the exporters stay the SDK's ``OTEL_*`` variables)."""

    client_span: str = "sdk"


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """Everything the proxy needs, validated; built only by :func:`load_config`."""

    listeners: tuple[ListenerConfig, ...]
    admin: AdminConfig
    service: ServiceConfig
    privacy: PrivacyConfig
    watchdog: WatchdogConfig
    server: ServerConfig
    lifecycle: Lifecycle
    tracing: TracingConfig = TracingConfig()

    def describe(self) -> dict[str, object]:
        """The effective configuration as plain data with secrets masked (``check-config``)."""
        return {
            "listeners": [
                {
                    "name": lst.name,
                    "listen": str(lst.listen),
                    "upstream": lst.upstream.url,
                    "rules": lst.rule_set,
                    "rule_count": len(lst.rules.rules),
                    "host_header": "preserve" if lst.preserve_host else "upstream",
                    "forwarded_headers": lst.forwarded_headers,
                    "trace_id_header": lst.trace_id_header or "",
                    "traceresponse": lst.traceresponse,
                    "timeouts": {
                        "connect": lst.timeouts.connect,
                        "read": lst.timeouts.read,
                        "total": lst.timeouts.total,
                    },
                    "inspect_body_limit": lst.inspect_body_limit,
                    "tls": (
                        {"cert_file": lst.tls.cert_file, "key_file": lst.tls.key_file} if lst.tls else None
                    ),
                    "upstream_tls": (
                        {
                            "ca_file": lst.upstream_tls.ca_file,
                            "cert_file": lst.upstream_tls.cert_file,
                            "key_file": lst.upstream_tls.key_file,
                            "verify": lst.upstream_tls.verify,
                        }
                        if lst.upstream_tls
                        else None
                    ),
                    "limits": {
                        "max_line_size": lst.limits.max_line_size,
                        "max_header_size": lst.limits.max_header_size,
                        "max_headers": lst.limits.max_headers,
                        "max_body_size": lst.limits.max_body_size or 0,
                        "header_read_timeout": lst.limits.header_read_timeout,
                        "idle_timeout": lst.limits.idle_timeout,
                        "max_connections": lst.limits.max_connections,
                    },
                }
                for lst in self.listeners
            ],
            "admin": {
                "listen": str(self.admin.listen),
                "tokens_file": self.admin.tokens_file,
                # How many, never which: the tokens open the admin API.
                "tokens": len(self.admin.tokens.entries),
            },
            "service": {
                "name": self.service.name,
                "namespace": self.service.namespace,
                "environment": self.service.environment,
            },
            "privacy": {
                "user_id_header": self.privacy.user_id_header,
                "user_id_key": "***" if self.privacy.user_id_key else None,
                "user_id_key_source": self.privacy.user_id_key_source,
                "query_allow": list(self.privacy.query_allow),
                "header_allow": list(self.privacy.header_allow),
                "redact_keys": list(self.privacy.redact_keys),
                "trusted_callers": list(self.privacy.trusted_callers),
            },
            "watchdog": {
                "state": _mask_url(self.watchdog.state),
                "check_interval": self.watchdog.check_interval,
                "jaeger_url": _mask_url(self.watchdog.jaeger_url),
                "correlation": self.watchdog.correlation,
                "retention": self.watchdog.retention,
            },
            "server": {
                "workers": self.server.workers,
                "grace_period": self.server.grace_period,
                "log_level": self.server.log_level,
                "access_log": self.server.access_log,
            },
            "tracing": {"client_span": self.tracing.client_span},
            "lifecycle": {
                "statuses": list(self.lifecycle.statuses),
                "cancel": self.lifecycle.cancel,
                "terminal": sorted(self.lifecycle.terminal),
                "dwell_limits": dict(self.lifecycle.dwell_limits),
            },
        }


# The userinfo password runs to the last '@' of the authority (urlsplit reads it so, and
# so does redis-py); redis-py also takes ``?password=``.
_URL_PASSWORD: Final = re.compile(r"(://[^:/?#@]*:)[^/?#]*@")
_QUERY_PASSWORD: Final = re.compile(r"([?&]password=)[^&#]*", re.IGNORECASE)


def _mask_url(url: str) -> str:
    """Hide a password in ``redis://user:secret@host`` or ``redis://host?password=secret``."""
    return _QUERY_PASSWORD.sub(r"\1***", _URL_PASSWORD.sub(r"\1***@", url))


# ── scalar parsers ──────────────────────────────────────────────────────────────────────

_DURATION: Final = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_SIZE: Final = re.compile(r"^\s*(\d+)\s*(B|KiB|MiB|GiB|KB|MB|GB)?\s*$")
_SIZE_UNITS: Final = {
    None: 1,
    "B": 1,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
}


def parse_duration(value: object) -> float:
    """``15m`` → 900.0; bare numbers are seconds.

    Raises:
        ValueError: not a non-negative duration.
    """
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration (use e.g. 500ms, 10s, 15m, 2h, 7d)")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        found = _DURATION.match(str(value))
        if found is None:
            raise ValueError(f"{value!r} is not a duration (use e.g. 500ms, 10s, 15m, 2h, 7d)")
        seconds = float(found.group(1)) * _DURATION_UNITS[found.group(2)]
    # YAML's .nan and .inf, or 400 digits, would pass a '< 0' check and stall every timer.
    if not math.isfinite(seconds):
        raise ValueError(f"{value!r} is not a finite duration")
    if seconds < 0:
        raise ValueError(f"{value!r} is negative")
    return seconds


def parse_size(value: object) -> int:
    """``64KiB`` → 65536; bare numbers are bytes.

    Raises:
        ValueError: not a non-negative size.
    """
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    found = _SIZE.match(str(value))
    if found is None:
        raise ValueError(f"{value!r} is not a size (use e.g. 65536, 64KiB, 1MiB)")
    return int(found.group(1)) * _SIZE_UNITS[found.group(2)]


def _parse_bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in {"1", "true", "yes", "on"}:
        return True
    if text in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"{value!r} is not a boolean (use true or false)")


def _parse_hostport(value: object) -> HostPort:
    text = str(value).strip()
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"{text!r}: expected [IPv6]:PORT")
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError(f"{text!r}: expected HOST:PORT, e.g. 127.0.0.1:8080")
    if not host:
        raise ValueError(f"{text!r}: the host is empty (use 0.0.0.0 for every interface)")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{text!r}: the port must be a number from 0 to 65535")
    return HostPort(host=host, port=int(port_text))


def _parse_upstream(value: object) -> Upstream:
    text = str(value).strip()
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"{text!r} must be an http:// or https:// URL")
    if not parts.hostname:
        raise ValueError(f"{text!r} has no host")
    if parts.query or parts.fragment:
        raise ValueError(f"{text!r}: an upstream URL takes no query or fragment")
    if parts.username or parts.password:
        raise ValueError("credentials in the upstream URL would leak into logs; use a header instead")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{text!r} has an invalid port") from None
    if port == 0:
        # "or default" would quietly turn ":0" into 80; nothing can be reached on port 0.
        raise ValueError(f"{text!r} has an invalid port")
    if port is None:
        port = 443 if parts.scheme == "https" else 80
    return Upstream(
        url=text, scheme=parts.scheme, host=parts.hostname, port=port, base_path=parts.path.rstrip("/")
    )


def _parse_log_level(value: object) -> str:
    text = str(value).strip().lower()
    if text not in ("debug", "info", "warning", "error"):
        raise ValueError(f"{value!r}: use debug, info, warning or error")
    return text


def _parse_correlation(value: object) -> str:
    text = str(value).strip().lower()
    if text not in ("link", "trace-per-order", "off"):
        raise ValueError(f"{value!r}: use link, trace-per-order or off")
    return text


def _parse_client_span(value: object) -> str:
    text = str(value).strip().lower()
    if text not in CLIENT_SPAN_MODES:
        raise ValueError(f"{value!r}: use {' or '.join(CLIENT_SPAN_MODES)}")
    return text


def _parse_state(value: object) -> str:
    text = str(value).strip()
    if text == "memory" or text.startswith(("sqlite:///", "redis://", "rediss://", "unix://")):
        return text
    raise ValueError(f"{text!r}: use memory, sqlite:///PATH or redis://HOST:PORT/DB")


def _parse_http_url(value: object) -> str:
    text = str(value).strip().rstrip("/")
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"{text!r} must be an http:// or https:// URL")
    return text


def _parse_workers(value: object) -> int:
    try:
        workers = int(str(value))
    except ValueError:
        raise ValueError(f"{value!r} is not a whole number") from None
    if not 1 <= workers <= 64:
        raise ValueError(f"{workers} is out of range 1..64")
    return workers


# ── sources: flags and environment variables ────────────────────────────────────────────


@dataclass(frozen=True, slots=True)
class _Option:
    """A flag and an env var that override one config-file key."""

    dest: str
    flag: str
    env: str
    path: tuple[str | int, ...]


#: Every single-valued option: the table the docs test checks against docs/configuration.md.
OPTIONS: Final = (
    _Option("listen", "--listen", "MES_PROXY_LISTEN", ("listeners", 0, "listen")),
    _Option("upstream", "--upstream", "MES_PROXY_UPSTREAM", ("listeners", 0, "upstream")),
    _Option("egress_listen", "--egress-listen", "MES_PROXY_EGRESS_LISTEN", ("listeners", 1, "listen")),
    _Option(
        "egress_upstream", "--egress-upstream", "MES_PROXY_EGRESS_UPSTREAM", ("listeners", 1, "upstream")
    ),
    _Option("admin_listen", "--admin-listen", "MES_PROXY_ADMIN_LISTEN", ("admin", "listen")),
    _Option("workers", "--workers", "MES_PROXY_WORKERS", ("server", "workers")),
    _Option("grace_period", "--grace-period", "MES_PROXY_GRACE_PERIOD", ("server", "grace_period")),
    _Option("log_level", "--log-level", "MES_PROXY_LOG_LEVEL", ("server", "log_level")),
    _Option("access_log", "--no-access-log", "MES_PROXY_ACCESS_LOG", ("server", "access_log")),
    _Option(
        "user_id_key_file",
        "--user-id-key-file",
        "MES_PROXY_USER_ID_KEY_FILE",
        ("privacy", "user_id_key_file"),
    ),
    _Option("state", "--state", "MES_PROXY_STATE", ("watchdog", "state")),
    _Option("check_interval", "--check-interval", "MES_PROXY_CHECK_INTERVAL", ("watchdog", "check_interval")),
    _Option("jaeger_url", "--jaeger-url", "MES_PROXY_JAEGER_URL", ("watchdog", "jaeger_url")),
    _Option("correlation", "--correlation", "MES_PROXY_CORRELATION", ("watchdog", "correlation")),
    _Option("tls_cert", "--tls-cert", "MES_PROXY_TLS_CERT", ("listeners", 0, "tls", "cert_file")),
    _Option("tls_key", "--tls-key", "MES_PROXY_TLS_KEY", ("listeners", 0, "tls", "key_file")),
    _Option(
        "upstream_ca", "--upstream-ca", "MES_PROXY_UPSTREAM_CA", ("listeners", 0, "upstream_tls", "ca_file")
    ),
    _Option(
        "upstream_cert",
        "--upstream-cert",
        "MES_PROXY_UPSTREAM_CERT",
        ("listeners", 0, "upstream_tls", "cert_file"),
    ),
    _Option(
        "upstream_key",
        "--upstream-key",
        "MES_PROXY_UPSTREAM_KEY",
        ("listeners", 0, "upstream_tls", "key_file"),
    ),
    _Option(
        "max_body_size",
        "--max-body-size",
        "MES_PROXY_MAX_BODY_SIZE",
        ("listeners", 0, "limits", "max_body_size"),
    ),
    _Option(
        "max_connections",
        "--max-connections",
        "MES_PROXY_MAX_CONNECTIONS",
        ("listeners", 0, "limits", "max_connections"),
    ),
    _Option("admin_token_file", "--admin-token-file", "MES_PROXY_ADMIN_TOKEN_FILE", ("admin", "tokens_file")),
    _Option(
        "trusted_callers", "--trusted-callers", "MES_PROXY_TRUSTED_CALLERS", ("privacy", "trusted_callers")
    ),
    _Option("client_span", "--client-span", "MES_PROXY_CLIENT_SPAN", ("tracing", "client_span")),
)
ENV_USER_ID_KEY: Final = "MES_PROXY_USER_ID_KEY"
ENV_DWELL_LIMITS: Final = "MES_PROXY_DWELL_LIMITS"
FLAG_DWELL_LIMIT: Final = "--dwell-limit"
ENV_CONFIG: Final = "MES_PROXY_CONFIG"

# Defaults, each with its reason.
DEFAULT_LISTEN: Final = "127.0.0.1:8080"  # loopback: exposing the proxy is a deliberate act
DEFAULT_ADMIN_LISTEN: Final = "127.0.0.1:9901"  # Envoy's admin port habit; loopback by default
DEFAULT_GRACE_PERIOD: Final = 20.0  # under Kubernetes' default 30 s termination grace
DEFAULT_CHECK_INTERVAL: Final = 10.0  # far below the shortest reference dwell limit (15 min)
DEFAULT_RETENTION: Final = 7 * 86400.0  # closed orders stay visible for a week of incident review
DEFAULT_INSPECT_LIMIT: Final = 64 * 1024  # status-change bodies are ~150 B; 64 KiB is generous
DEFAULT_CONNECT_TIMEOUT: Final = 5.0  # a sidecar's upstream is on loopback: 5 s means it is down
DEFAULT_READ_TIMEOUT: Final = 60.0  # MES price calculations are asynchronous; no call should idle 60 s
DEFAULT_STATE: Final = "sqlite:///./mes-trace-proxy-orders.db"
DEFAULT_JAEGER_URL: Final = "http://localhost:16686"
DEFAULT_RULE_SETS: Final = ("mes", "crm")  # rule set per listener position when none is named
# RFC 9112 §3: "RECOMMENDED that all HTTP senders and recipients support ... request-line
# lengths of 8000 octets"; 8 KiB honours that and no MES route comes near it.
DEFAULT_MAX_LINE_SIZE: Final = 8 * 1024
# One header field, name and value: a bearer JWT with many claims or a CRM's cookies can pass
# 8 KiB, and the proxy should not be the stricter hop; 16 KiB still bounds the parser's
# buffer. Differing from the line limit also lets the refusal say which limit was hit.
DEFAULT_MAX_HEADER_SIZE: Final = 16 * 1024
# aiohttp's own default; browsers and HTTP clients send 10-30 fields.
DEFAULT_MAX_HEADERS: Final = 128
# Jewellery 3D models (STL, 3MF, OBJ with textures) run to a few hundred MiB; 1 GiB leaves room
# and still stops an endless upload from holding a connection and an upstream socket forever.
DEFAULT_MAX_BODY_SIZE: Final = 1024**3
# A client on the same network sends its request head in one packet; 10 s covers three TCP
# retransmissions of a lost one (RFC 6298 §2: 1 s initial RTO, doubling: 1 + 2 + 4 s) and frees
# a slow-loris slot soon after.
DEFAULT_HEADER_READ_TIMEOUT: Final = 10.0
# nginx's keepalive_timeout default, and above the idle timeouts of the CRM's client pools,
# so a caller rarely reuses a connection the proxy is closing.
DEFAULT_IDLE_TIMEOUT: Final = 75.0
# Far above the tens of connections CRM and the dashboard keep open and a benchmark's
# thousand; an idle aiohttp connection costs a few KiB, so 4096 of them stay well inside a
# sidecar's memory and under container open-file limits (4096 + the 256 upstream sockets).
DEFAULT_MAX_CONNECTIONS: Final = 4096
DEFAULT_LIMITS: Final = Limits(
    max_line_size=DEFAULT_MAX_LINE_SIZE,
    max_header_size=DEFAULT_MAX_HEADER_SIZE,
    max_headers=DEFAULT_MAX_HEADERS,
    max_body_size=DEFAULT_MAX_BODY_SIZE,
    header_read_timeout=DEFAULT_HEADER_READ_TIMEOUT,
    idle_timeout=DEFAULT_IDLE_TIMEOUT,
    max_connections=DEFAULT_MAX_CONNECTIONS,
)

_TOP_KEYS: Final = frozenset(
    {"service", "listeners", "admin", "rule_sets", "lifecycle", "watchdog", "privacy", "server", "tracing"}
)
_LISTENER_KEYS: Final = frozenset(
    {
        "name",
        "listen",
        "upstream",
        "rules",
        "host_header",
        "forwarded_headers",
        "trace_id_header",
        "traceresponse",
        "timeouts",
        "inspect_body_limit",
        "tls",
        "upstream_tls",
        "limits",
    }
)
_SECTION_KEYS: Final[Mapping[str, frozenset[str]]] = MappingProxyType(
    {
        "service": frozenset({"name", "namespace", "environment"}),
        "admin": frozenset({"listen", "tokens_file"}),
        "lifecycle": frozenset({"statuses", "cancel", "terminal", "entry", "dwell_limits"}),
        "watchdog": frozenset({"state", "check_interval", "jaeger_url", "correlation", "retention"}),
        "privacy": frozenset(
            {
                "user_id_header",
                "user_id_key_file",
                "query_allow",
                "header_allow",
                "redact_keys",
                "trusted_callers",
            }
        ),
        "server": frozenset({"workers", "grace_period", "log_level", "access_log"}),
        "tracing": frozenset({"client_span"}),
    }
)


def _key_text(path: Sequence[str | int]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


class _Doc:
    """The merged document and, for each overridden key, the flag or env var it came from."""

    def __init__(self, data: dict[str, object]) -> None:
        self.data = data
        self.origins: dict[tuple[str | int, ...], str] = {}

    def key(self, *path: str | int) -> str:
        """The name to blame for a path: the flag or env var that set it, else the file key."""
        for length in range(len(path), 0, -1):
            origin = self.origins.get(tuple(path[:length]))
            if origin is not None:
                return origin
        return _key_text(path)

    def set(self, path: Sequence[str | int], value: object, origin: str) -> None:
        node: object = self.data
        for depth, part in enumerate(path):
            last = depth == len(path) - 1
            if isinstance(part, int):
                # The file may hold anything here (``listeners: {..}``): blame its key.
                if not isinstance(node, list):
                    raise ConfigError(_key_text(path[:depth]), "expected a list")
                while len(node) <= part:
                    node.append({})
                if last:
                    node[part] = value
                    break
                child = node[part]
                if child is None:
                    child = node[part] = [] if isinstance(path[depth + 1], int) else {}
            else:
                if not isinstance(node, dict):
                    raise ConfigError(_key_text(path[:depth]), "expected a mapping")
                if last:
                    node[part] = value
                    break
                child = node.get(part)
                if child is None:
                    child = node[part] = [] if isinstance(path[depth + 1], int) else {}
            node = child
        self.origins[tuple(path)] = origin

    def section(self, name: str) -> Mapping[str, object]:
        raw = self.data.get(name, {})
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            raise ConfigError(self.key(name), "expected a mapping")
        allowed = _SECTION_KEYS[name]
        for item in raw:
            if item not in allowed:
                raise ConfigError(self.key(name, item), f"unknown key; allowed: {', '.join(sorted(allowed))}")
        return raw


def _get(
    doc: _Doc,
    section: Mapping[str, object],
    path: tuple[str | int, ...],
    parse: Callable[[object], _T],
    default: _T,
) -> _T:
    """Parse ``section[path[-1]]`` (or return ``default``), blaming the right key on failure."""
    raw = section.get(str(path[-1]))
    if raw is None:
        return default
    try:
        return parse(raw)
    except ValueError as exc:
        raise ConfigError(doc.key(*path), str(exc)) from None


def _dwell_items(text: str, origin: str) -> list[tuple[str, str]]:
    items = []
    for part in text.split(","):
        if not part.strip():
            continue
        status, sep, duration = part.partition("=")
        if not sep or not status.strip():
            raise ConfigError(origin, f"{part.strip()!r}: expected STATUS=DURATION, e.g. SUBMITTED=15m")
        items.append((status.strip(), duration.strip()))
    return items


def _overlay(doc: _Doc, flags: Mapping[str, object], environ: Mapping[str, str]) -> None:
    """Apply environment variables, then flags, over the file document."""
    for option in OPTIONS:
        value = environ.get(option.env)
        if value:
            doc.set(option.path, value, option.env)
    if environ.get(ENV_DWELL_LIMITS):
        for status, duration in _dwell_items(environ[ENV_DWELL_LIMITS], ENV_DWELL_LIMITS):
            doc.set(("lifecycle", "dwell_limits", status), duration, ENV_DWELL_LIMITS)
    for option in OPTIONS:
        flag_value = flags.get(option.dest)
        if flag_value is not None:
            doc.set(option.path, flag_value, option.flag)
    raw_flags = flags.get("dwell_limit") or []
    if not isinstance(raw_flags, list | tuple):
        raise ConfigError(FLAG_DWELL_LIMIT, "expected STATUS=DURATION values")
    for item in raw_flags:
        for status, duration in _dwell_items(str(item), FLAG_DWELL_LIMIT):
            doc.set(("lifecycle", "dwell_limits", status), duration, FLAG_DWELL_LIMIT)


def _missing_key(doc: _Doc, path: tuple[str | int, ...]) -> str:
    """A required key nobody set: also name the flag and variable that would set it, if any."""
    key = doc.key(*path)
    for option in OPTIONS:
        if option.path == path and key == _key_text(path):
            return f"{option.flag} / {option.env} / {key}"
    return key


def _listener(
    doc: _Doc,
    index: int,
    raw: object,
    rule_sets: Mapping[str, CompiledRules],
    read_file: Callable[[str], bytes] | None = None,
) -> ListenerConfig:
    base = ("listeners", index)
    if not isinstance(raw, dict):
        raise ConfigError(doc.key(*base), "expected a mapping with at least listen and upstream")
    for item in raw:
        if item not in _LISTENER_KEYS:
            raise ConfigError(
                doc.key(*base, item), f"unknown key; allowed: {', '.join(sorted(_LISTENER_KEYS))}"
            )
    default_name = ("ingress", "egress")[index] if index < 2 else f"listener{index}"
    name = str(raw.get("name") or default_name)
    if raw.get("upstream") in (None, ""):
        raise ConfigError(
            _missing_key(doc, (*base, "upstream")), "is required: the URL of the service behind this listener"
        )
    listen_default = DEFAULT_LISTEN if index == 0 else None
    if raw.get("listen") in (None, "") and listen_default is None:
        raise ConfigError(
            _missing_key(doc, (*base, "listen")), "is required for every listener after the first"
        )
    # Later listeners have no default (checked above), so the fallback is only ever the first's.
    listen = _get(
        doc, raw, (*base, "listen"), _parse_hostport, _parse_hostport(listen_default or DEFAULT_LISTEN)
    )
    upstream = _get(doc, raw, (*base, "upstream"), _parse_upstream, _parse_upstream("http://unset"))
    rules_raw = raw.get("rules")
    if rules_raw is None:
        rules_raw = DEFAULT_RULE_SETS[index] if index < len(DEFAULT_RULE_SETS) else None
    if isinstance(rules_raw, str):
        compiled = rule_sets.get(rules_raw)
        if compiled is None:
            raise ConfigError(
                doc.key(*base, "rules"), f"no rule set {rules_raw!r}; defined: {', '.join(sorted(rule_sets))}"
            )
        rule_set_name = rules_raw
    elif rules_raw is None:
        compiled, rule_set_name = CompiledRules([]), "none"
    else:
        try:
            compiled = compile_rules(rules_raw, key=doc.key(*base, "rules"))
        except RuleError as exc:
            raise ConfigError(exc.key, exc.message) from None
        rule_set_name = "inline"
    host_header = str(raw.get("host_header", "upstream"))
    if host_header not in ("upstream", "preserve"):
        raise ConfigError(doc.key(*base, "host_header"), f"{host_header!r}: use upstream or preserve")
    trace_header = raw.get("trace_id_header", "X-Trace-Id")
    if trace_header is not None and not isinstance(trace_header, str):
        raise ConfigError(doc.key(*base, "trace_id_header"), 'expected a header name or ""')
    if trace_header and not re.match(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$", trace_header):
        raise ConfigError(doc.key(*base, "trace_id_header"), f"{trace_header!r} is not a valid header name")
    timeouts_raw = raw.get("timeouts") or {}
    if not isinstance(timeouts_raw, dict):
        raise ConfigError(doc.key(*base, "timeouts"), "expected a mapping of connect, read, total")
    for item in timeouts_raw:
        if item not in ("connect", "read", "total"):
            raise ConfigError(doc.key(*base, "timeouts", item), "unknown key; allowed: connect, read, total")

    def timeout(name: str, default: float) -> float | None:
        value = _get(doc, timeouts_raw, (*base, "timeouts", name), parse_duration, default)
        return None if value == 0 else value

    inspect = _get(doc, raw, (*base, "inspect_body_limit"), parse_size, DEFAULT_INSPECT_LIMIT)
    return ListenerConfig(
        name=name,
        listen=listen,
        upstream=upstream,
        rules=compiled,
        rule_set=rule_set_name,
        preserve_host=host_header == "preserve",
        forwarded_headers=_get(doc, raw, (*base, "forwarded_headers"), _parse_bool, True),
        trace_id_header=trace_header or None,
        traceresponse=_get(doc, raw, (*base, "traceresponse"), _parse_bool, True),
        timeouts=Timeouts(
            connect=timeout("connect", DEFAULT_CONNECT_TIMEOUT),
            read=timeout("read", DEFAULT_READ_TIMEOUT),
            total=timeout("total", 0.0),
        ),
        inspect_body_limit=inspect,
        limits=_limits(doc, raw, base),
        tls=_server_tls(doc, raw, base, read_file),
        upstream_tls=_upstream_tls(doc, raw, base, upstream, read_file),
    )


def _rule_sets(doc: _Doc, defaults: Mapping[str, object]) -> dict[str, CompiledRules]:
    raw_sets: dict[str, object] = {}
    default_sets = defaults.get("rule_sets") or {}
    assert isinstance(default_sets, dict)
    raw_sets.update(default_sets)
    own = doc.data.get("rule_sets") or {}
    if not isinstance(own, dict):
        raise ConfigError(doc.key("rule_sets"), "expected a mapping of rule-set name to a list of rules")
    raw_sets.update(own)
    compiled = {}
    for name, rules in raw_sets.items():
        try:
            compiled[str(name)] = compile_rules(rules, key=f"rule_sets.{name}")
        except RuleError as exc:
            raise ConfigError(exc.key, exc.message) from None
    return compiled


def _lifecycle(doc: _Doc) -> Lifecycle:
    section = doc.section("lifecycle")
    base = REFERENCE_LIFECYCLE
    statuses = section.get("statuses", list(base.statuses))
    if not isinstance(statuses, list) or not statuses or not all(isinstance(s, str) and s for s in statuses):
        raise ConfigError(doc.key("lifecycle", "statuses"), "expected a non-empty list of status names")
    cancel = section.get("cancel", base.cancel)
    if cancel is not None and not isinstance(cancel, str):
        raise ConfigError(doc.key("lifecycle", "cancel"), "expected a status name")
    all_statuses = [*statuses, *([cancel] if cancel and cancel not in statuses else [])]
    custom = "statuses" in section
    # With a lifecycle of their own, users get the reference terminal statuses that exist in
    # it, and the Lifecycle's own default entry (its first two statuses).
    terminal = section.get("terminal", sorted(s for s in base.terminal if s in all_statuses))
    entry_default: list[str] | None = None if custom else sorted(base.entry_statuses)
    entry = section.get("entry", entry_default)
    for name, value in (("terminal", terminal), ("entry", entry)):
        if value is None:
            continue
        if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
            raise ConfigError(doc.key("lifecycle", name), "expected a list of status names")
        unknown = [s for s in value if s not in all_statuses]
        if unknown:
            raise ConfigError(doc.key("lifecycle", name), f"{unknown[0]!r} is not in lifecycle.statuses")
    limits_raw = section.get("dwell_limits")
    limits: dict[str, float] = {}
    if "statuses" not in section:
        limits.update(base.dwell_limits)
    if limits_raw is not None:
        if not isinstance(limits_raw, dict):
            raise ConfigError(doc.key("lifecycle", "dwell_limits"), "expected a mapping of STATUS: DURATION")
        for status, duration in limits_raw.items():
            key = doc.key("lifecycle", "dwell_limits", status)
            if status not in all_statuses:
                raise ConfigError(key, f"{status!r} is not a lifecycle status ({', '.join(all_statuses)})")
            if isinstance(terminal, list) and status in terminal:
                # Checked here, not only by Lifecycle, so the flag or env var that set it is named.
                raise ConfigError(
                    key, f"{status!r} is terminal: an order never leaves it, so it has no limit"
                )
            try:
                seconds = parse_duration(duration)
            except ValueError as exc:
                raise ConfigError(key, str(exc)) from None
            if seconds <= 0:
                raise ConfigError(key, "a dwell limit must be longer than zero")
            limits[status] = seconds
    assert isinstance(terminal, list)
    assert entry is None or isinstance(entry, list)
    try:
        return Lifecycle(
            statuses=tuple(statuses),
            cancel=cancel,
            terminal=frozenset(terminal),
            entry=None if entry is None else frozenset(entry),
            dwell_limits=MappingProxyType(limits),
        )
    except ValueError as exc:
        raise ConfigError(doc.key("lifecycle"), str(exc)) from None


def load_config(
    *,
    flags: Mapping[str, object],
    environ: Mapping[str, str],
    file_doc: Mapping[str, object] | None,
    defaults: Mapping[str, object],
    read_file: Callable[[str], bytes] | None = None,
) -> Config:
    """Build the one :class:`Config`.

    Args:
        flags: parsed command-line flags by ``dest`` (``None`` or absent when not given).
        environ: the process environment.
        file_doc: the parsed YAML config file, or ``None``.
        defaults: the parsed default rules document (``defaults/rules.yaml``).
        read_file: reads a file the config names (the user-id key, the admin tokens, TLS PEM
            files); ``None`` forbids reading key and token files and skips the PEM checks.

    Returns:
        The validated configuration.

    Raises:
        ConfigError: naming the flag, variable or key of the first problem found.
    """
    if file_doc is not None and not isinstance(file_doc, Mapping):
        raise ConfigError("config file", "the top level must be a mapping")
    doc = _Doc(copy.deepcopy(dict(file_doc or {})))
    for item in doc.data:
        if item not in _TOP_KEYS:
            raise ConfigError(str(item), f"unknown top-level key; allowed: {', '.join(sorted(_TOP_KEYS))}")
    _overlay(doc, flags, environ)

    rule_sets = _rule_sets(doc, defaults)
    listeners_raw = doc.data.get("listeners")
    if listeners_raw is None:
        listeners_raw = [{}]
    if not isinstance(listeners_raw, list) or not listeners_raw:
        raise ConfigError(doc.key("listeners"), "expected a non-empty list of listeners")
    listeners = tuple(_listener(doc, i, raw, rule_sets, read_file) for i, raw in enumerate(listeners_raw))
    seen: dict[str, int] = {}
    for index, lst in enumerate(listeners):
        if lst.name in seen:
            raise ConfigError(
                doc.key("listeners", index, "name"), f"{lst.name!r} is used by listener {seen[lst.name]}"
            )
        seen[lst.name] = index

    admin = doc.section("admin")
    admin_listen = _get(
        doc, admin, ("admin", "listen"), _parse_hostport, _parse_hostport(DEFAULT_ADMIN_LISTEN)
    )
    ports = [(lst.listen, doc.key("listeners", i, "listen")) for i, lst in enumerate(listeners)]
    ports.append((admin_listen, doc.key("admin", "listen")))
    bound: dict[tuple[str, int], str] = {}
    for address, key in ports:
        if address.port == 0:
            continue
        if (address.host, address.port) in bound:
            raise ConfigError(key, f"{address} is already used by {bound[(address.host, address.port)]}")
        bound[(address.host, address.port)] = key

    service = doc.section("service")
    server = doc.section("server")
    watchdog = doc.section("watchdog")
    privacy = doc.section("privacy")
    tracing = doc.section("tracing")

    key_source: str | None = None
    secret: bytes | None = None
    if environ.get(ENV_USER_ID_KEY):
        secret, key_source = environ[ENV_USER_ID_KEY].encode(), ENV_USER_ID_KEY
    key_file = privacy.get("user_id_key_file")
    if key_file and not (environ.get(ENV_USER_ID_KEY) and ("privacy", "user_id_key_file") not in doc.origins):
        origin = doc.key("privacy", "user_id_key_file")
        if read_file is None:
            raise ConfigError(origin, "reading key files is not allowed here")
        try:
            secret = read_file(str(key_file)).strip()
        except OSError as exc:
            raise ConfigError(origin, f"cannot read {key_file}: {exc.strerror or exc}") from None
        key_source = origin
    if secret is not None and len(secret) < 16:
        # A short key makes the pseudonym guessable by brute force over user ids.
        raise ConfigError(key_source or ENV_USER_ID_KEY, "the user-id key must be at least 16 bytes")

    user_header = str(privacy.get("user_id_header", "X-User-Id"))
    if not re.match(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$", user_header):
        raise ConfigError(doc.key("privacy", "user_id_header"), f"{user_header!r} is not a valid header name")

    service_name = service.get("name", "mes-api")
    if not isinstance(service_name, str) or not service_name:
        raise ConfigError(doc.key("service", "name"), "expected a non-empty string")

    def opt_str(section: Mapping[str, object], path: tuple[str, str]) -> str | None:
        value = section.get(path[1])
        if value is None:
            return None
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise ConfigError(doc.key(*path), "expected a string")
        return str(value)

    privacy_config = _privacy(doc, privacy, user_header, secret, key_source)
    _check_rule_sources(doc, listeners, privacy_config)
    return Config(
        listeners=listeners,
        admin=_admin(doc, admin, admin_listen, read_file),
        service=ServiceConfig(
            name=service_name,
            namespace=opt_str(service, ("service", "namespace")),
            environment=opt_str(service, ("service", "environment")),
        ),
        privacy=privacy_config,
        watchdog=WatchdogConfig(
            state=_get(doc, watchdog, ("watchdog", "state"), _parse_state, DEFAULT_STATE),
            check_interval=_positive(doc, watchdog, ("watchdog", "check_interval"), DEFAULT_CHECK_INTERVAL),
            jaeger_url=_get(doc, watchdog, ("watchdog", "jaeger_url"), _parse_http_url, DEFAULT_JAEGER_URL),
            correlation=_get(doc, watchdog, ("watchdog", "correlation"), _parse_correlation, "link"),
            retention=_positive(doc, watchdog, ("watchdog", "retention"), DEFAULT_RETENTION),
        ),
        server=ServerConfig(
            workers=_get(doc, server, ("server", "workers"), _parse_workers, 1),
            grace_period=_get(doc, server, ("server", "grace_period"), parse_duration, DEFAULT_GRACE_PERIOD),
            log_level=_get(doc, server, ("server", "log_level"), _parse_log_level, "info"),
            access_log=_get(doc, server, ("server", "access_log"), _parse_bool, True),
        ),
        lifecycle=_lifecycle(doc),
        tracing=TracingConfig(
            client_span=_get(doc, tracing, ("tracing", "client_span"), _parse_client_span, "sdk"),
        ),
    )


def _positive(doc: _Doc, section: Mapping[str, object], path: tuple[str, str], default: float) -> float:
    value = _get(doc, section, path, parse_duration, default)
    if value <= 0:
        raise ConfigError(doc.key(*path), "must be longer than zero")
    return value


def is_loopback(host: str) -> bool:
    """True when ``host`` is a loopback address or ``localhost``."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ── security sections: TLS, limits, admin tokens, privacy lists ─────────────────────────

_HEADER_NAME: Final = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_TLS_KEYS: Final = frozenset({"cert_file", "key_file"})
_UPSTREAM_TLS_KEYS: Final = frozenset({"ca_file", "cert_file", "key_file", "verify"})
_LIMIT_KEYS: Final = frozenset(
    {
        "max_line_size",
        "max_header_size",
        "max_headers",
        "max_body_size",
        "header_read_timeout",
        "idle_timeout",
        "max_connections",
    }
)
# What a PEM file of each kind must hold (RFC 7468 §5 certificates, §10/§11 private keys).
_PEM_CERT: Final = b"-----BEGIN CERTIFICATE-----"
_PEM_KEY: Final = re.compile(rb"-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----")
_PEM_ENCRYPTED: Final = (b"ENCRYPTED PRIVATE KEY", b"Proc-Type: 4,ENCRYPTED")


def _mapping(
    doc: _Doc, raw: Mapping[str, object], path: tuple[str | int, ...], allowed: frozenset[str]
) -> dict[str, object] | None:
    """``raw[path[-1]]`` as a mapping with only ``allowed`` keys, or ``None`` when absent."""
    value = raw.get(str(path[-1]))
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ConfigError(doc.key(*path), f"expected a mapping of {', '.join(sorted(allowed))}")
    for item in value:
        if item not in allowed:
            raise ConfigError(doc.key(*path, item), f"unknown key; allowed: {', '.join(sorted(allowed))}")
    return value


def _section_source(doc: _Doc, path: tuple[str | int, ...], section: Mapping[str, object]) -> str:
    """Whom to blame for a whole section: the flags or variables that set its members, else its key."""
    origins = [doc.origins[(*path, item)] for item in section if (*path, item) in doc.origins]
    return ", ".join(dict.fromkeys(origins)) if origins else doc.key(*path)


def _pem_file(
    doc: _Doc,
    section: Mapping[str, object],
    path: tuple[str | int, ...],
    kind: str,
    read_file: Callable[[str], bytes] | None,
) -> str | None:
    """The path at ``section[path[-1]]``, checked to hold a PEM ``kind`` when files may be read."""
    value = section.get(str(path[-1]))
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ConfigError(doc.key(*path), "expected a file path")
    if read_file is None:
        # Pure callers (tests, explain) skip the check; start-up builds the TLS context and
        # names the same key if the file is unusable.
        return value
    try:
        data = read_file(value)
    except OSError as exc:
        raise ConfigError(doc.key(*path), f"cannot read {value}: {exc.strerror or exc}") from None
    if kind == "certificate" and _PEM_CERT not in data:
        raise ConfigError(doc.key(*path), f"{value} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
    if kind == "key":
        if any(marker in data for marker in _PEM_ENCRYPTED):
            # A passphrase would have to be typed at every start and reload; there is no one to type it.
            raise ConfigError(
                doc.key(*path), f"{value} is an encrypted key; give the proxy an unencrypted one"
            )
        if _PEM_KEY.search(data) is None:
            raise ConfigError(
                doc.key(*path), f"{value} holds no PEM private key (-----BEGIN PRIVATE KEY-----)"
            )
    return value


def _server_tls(
    doc: _Doc,
    raw: Mapping[str, object],
    base: tuple[str | int, ...],
    read_file: Callable[[str], bytes] | None,
) -> ServerTls | None:
    path = (*base, "tls")
    section = _mapping(doc, raw, path, _TLS_KEYS)
    if section is None:
        return None
    cert = _pem_file(doc, section, (*path, "cert_file"), "certificate", read_file)
    key = _pem_file(doc, section, (*path, "key_file"), "key", read_file)
    if cert is None:
        raise ConfigError(doc.key(*path, "cert_file"), "is required to serve TLS (with key_file)")
    if key is None:
        raise ConfigError(doc.key(*path, "key_file"), "is required to serve TLS (with cert_file)")
    return ServerTls(cert_file=cert, key_file=key, source=_section_source(doc, path, section))


def _upstream_tls(
    doc: _Doc,
    raw: Mapping[str, object],
    base: tuple[str | int, ...],
    upstream: Upstream,
    read_file: Callable[[str], bytes] | None,
) -> UpstreamTls | None:
    path = (*base, "upstream_tls")
    section = _mapping(doc, raw, path, _UPSTREAM_TLS_KEYS)
    if section is None:
        return None
    if upstream.scheme != "https":
        raise ConfigError(
            _section_source(doc, path, section), f"needs an https:// upstream, not {upstream.url}"
        )
    ca = _pem_file(doc, section, (*path, "ca_file"), "certificate", read_file)
    cert = _pem_file(doc, section, (*path, "cert_file"), "certificate", read_file)
    key = _pem_file(doc, section, (*path, "key_file"), "key", read_file)
    if (cert is None) != (key is None):
        missing = "key_file" if key is None else "cert_file"
        raise ConfigError(doc.key(*path, missing), "a client certificate needs both cert_file and key_file")
    verify = _get(doc, section, (*path, "verify"), _parse_bool, True)
    return UpstreamTls(
        ca_file=ca, cert_file=cert, key_file=key, verify=verify, source=_section_source(doc, path, section)
    )


def _count(value: object) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a whole number")
    try:
        number = int(str(value).strip())
    except ValueError:
        raise ValueError(f"{value!r} is not a whole number") from None
    if number < 1:
        raise ValueError(f"{number} must be at least 1")
    return number


def _limits(doc: _Doc, raw: Mapping[str, object], base: tuple[str | int, ...]) -> Limits:
    path = (*base, "limits")
    section = _mapping(doc, raw, path, _LIMIT_KEYS) or {}
    d = DEFAULT_LIMITS

    def size(name: str, default: int) -> int:
        value = _get(doc, section, (*path, name), parse_size, default)
        if value < 1:
            raise ConfigError(doc.key(*path, name), "must be at least 1 byte")
        return value

    def seconds(name: str, default: float) -> float:
        value = _get(doc, section, (*path, name), parse_duration, default)
        if value <= 0:
            raise ConfigError(doc.key(*path, name), "must be longer than zero")
        return value

    body = _get(doc, section, (*path, "max_body_size"), parse_size, DEFAULT_MAX_BODY_SIZE)
    return Limits(
        max_line_size=size("max_line_size", d.max_line_size),
        max_header_size=size("max_header_size", d.max_header_size),
        max_headers=_get(doc, section, (*path, "max_headers"), _count, d.max_headers),
        # 0 turns the body limit off, as 0s turns an upstream timeout off.
        max_body_size=body or None,
        header_read_timeout=seconds("header_read_timeout", d.header_read_timeout),
        idle_timeout=seconds("idle_timeout", d.idle_timeout),
        max_connections=_get(doc, section, (*path, "max_connections"), _count, d.max_connections),
    )


def _admin(
    doc: _Doc, admin: Mapping[str, object], listen: HostPort, read_file: Callable[[str], bytes] | None
) -> AdminConfig:
    tokens_file = admin.get("tokens_file")
    if tokens_file is None or tokens_file == "":
        return AdminConfig(listen=listen)
    key = doc.key("admin", "tokens_file")
    if not isinstance(tokens_file, str):
        raise ConfigError(key, "expected a file path")
    if read_file is None:
        raise ConfigError(key, "reading token files is not allowed here")
    try:
        text = read_file(tokens_file).decode("utf-8")
    except OSError as exc:
        raise ConfigError(key, f"cannot read {tokens_file}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(key, f"{tokens_file} is not UTF-8 text") from None
    try:
        tokens = parse_tokens(text)
    except TokenError as exc:
        raise ConfigError(key, f"{tokens_file}: {exc}") from None
    return AdminConfig(listen=listen, tokens_file=tokens_file, tokens=tokens)


def _string_list(
    doc: _Doc, section: Mapping[str, object], path: tuple[str, str], default: tuple[str, ...]
) -> tuple[str, ...]:
    """A list of strings from the file, or a comma-separated one from a flag or variable."""
    raw = section.get(path[1])
    if raw is None:
        return default
    if isinstance(raw, str):
        items = raw.split(",")
    elif isinstance(raw, list) and all(isinstance(item, str) for item in raw):
        items = raw
    else:
        raise ConfigError(doc.key(*path), "expected a list of strings")
    return tuple(item.strip() for item in items if item.strip())


def _privacy(
    doc: _Doc, privacy: Mapping[str, object], user_header: str, secret: bytes | None, key_source: str | None
) -> PrivacyConfig:
    headers = _string_list(doc, privacy, ("privacy", "header_allow"), DEFAULT_HEADER_ALLOW)
    for name in headers:
        if not _HEADER_NAME.match(name):
            raise ConfigError(doc.key("privacy", "header_allow"), f"{name!r} is not a valid header name")
    callers = _string_list(doc, privacy, ("privacy", "trusted_callers"), ("*",))
    for item in callers:
        if item == "*":
            continue
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ConfigError(
                doc.key("privacy", "trusted_callers"), f"{item!r} is not an address, a CIDR or *"
            ) from None
    config = PrivacyConfig(
        user_id_header=user_header,
        user_id_key=secret,
        user_id_key_source=key_source,
        query_allow=_string_list(doc, privacy, ("privacy", "query_allow"), DEFAULT_QUERY_ALLOW),
        header_allow=headers,
        redact_keys=_string_list(doc, privacy, ("privacy", "redact_keys"), DEFAULT_REDACT_KEYS),
        trusted_callers=callers,
    )
    try:
        # Building the redactor compiles every pattern: a policy that cannot work fails here.
        Redactor(config.policy())
    except ValueError as exc:
        field_name = str(exc).partition(":")[0]
        key = field_name if field_name in ("header_allow", "query_allow", "redact_keys") else "header_allow"
        raise ConfigError(doc.key("privacy", key), str(exc).partition(": ")[2] or str(exc)) from None
    return config


def _check_rule_sources(doc: _Doc, listeners: Sequence[ListenerConfig], privacy: PrivacyConfig) -> None:
    """Refuse a rule that would export a personal value as an order id or status.

    ``privacy.redact_keys`` names personal JSON members, query parameters, path parameters and
    headers; credential headers and the user-id header are personal too. A rule reading one
    would put a name or an e-mail address into ``mes.order.id``, the order book and the admin
    pages, so it is a configuration error rather than something to redact per request.

    Raises:
        ConfigError: naming the rule's source key.
    """
    redactor = Redactor(privacy.policy())
    user_header = privacy.user_id_header.lower()
    for index, listener in enumerate(listeners):
        if listener.rule_set == "inline":
            base = doc.key("listeners", index, "rules")
        elif listener.rule_set == "none":
            continue
        else:
            base = f"rule_sets.{listener.rule_set}"
        for position, rule in enumerate(listener.rules.rules):
            for field_name in ("order_id", "status", "observed_status"):
                source = getattr(rule, field_name)
                if source is None or source.kind is SourceKind.CONST:
                    continue
                if source.kind in (SourceKind.BODY, SourceKind.RESPONSE):
                    personal = redactor.key_is_personal(format_pointer(source.pointer))
                else:
                    personal = redactor.key_is_personal(source.name)
                    if source.kind in (SourceKind.HEADER, SourceKind.RESPONSE_HEADER):
                        personal = (
                            personal or is_never_header(source.name) or source.name.lower() == user_header
                        )
                if personal:
                    raise ConfigError(
                        f"{base}[{position}].{field_name}",
                        f"{source.spec} is personal data or a credential (privacy.redact_keys); "
                        "it cannot be an order id or a status",
                    )
