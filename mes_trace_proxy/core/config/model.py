"""The configuration model: the frozen values :func:`~mes_trace_proxy.core.config.load_config` builds.

Every section of the config file becomes one dataclass here; :class:`Config` holds them all and
prints itself, secrets masked, for ``check-config``.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Final

from mes_trace_proxy.core.admin_auth import TokenTable
from mes_trace_proxy.core.forwarding import upstream_host_value
from mes_trace_proxy.core.framing import NameAction
from mes_trace_proxy.core.lifecycle import Lifecycle
from mes_trace_proxy.core.messages.settings import MessagesConfig
from mes_trace_proxy.core.redact import (
    DEFAULT_HEADER_ALLOW,
    DEFAULT_QUERY_ALLOW,
    DEFAULT_REDACT_KEYS,
    PrivacyPolicy,
)
from mes_trace_proxy.core.rules import CompiledRules
from mes_trace_proxy.core.url_secrets import mask_url


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
        # Both are read on every request: formatted once here, by the one Host formatter.
        host_header = upstream_host_value(self.scheme, self.host, self.port)
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
    #: a field name with "_" that folds onto a framing, hop-by-hop or forwarding field (framing.py)
    underscore_lookalikes: NameAction = NameAction.DROP
    #: every other field name with "_"
    underscore_headers: NameAction = NameAction.PASS


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
    messages: MessagesConfig = field(default_factory=MessagesConfig)

    def describe(self) -> dict[str, object]:
        """The effective configuration as plain data with secrets masked (``check-config``)."""
        return {
            "listeners": [_describe_listener(lst) for lst in self.listeners],
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
                "state": mask_url(self.watchdog.state),
                "check_interval": self.watchdog.check_interval,
                "jaeger_url": mask_url(self.watchdog.jaeger_url),
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
            # The AMQP URL without its password (messages/settings.py).
            "messages": self.messages.describe(),
            "lifecycle": {
                "statuses": list(self.lifecycle.statuses),
                "cancel": self.lifecycle.cancel,
                "terminal": sorted(self.lifecycle.terminal),
                "dwell_limits": dict(self.lifecycle.dwell_limits),
            },
        }


def _describe_listener(lst: ListenerConfig) -> dict[str, object]:
    """One listener in ``check-config``'s output."""
    return {
        "name": lst.name,
        "listen": str(lst.listen),
        # The loader refuses a user or a query here; masked all the same, as every URL is.
        "upstream": mask_url(lst.upstream.url),
        "rules": lst.rule_set,
        "rule_count": len(lst.rules.rules),
        "host_header": "preserve" if lst.preserve_host else "upstream",
        "forwarded_headers": lst.forwarded_headers,
        "underscore_lookalikes": lst.underscore_lookalikes.value,
        "underscore_headers": lst.underscore_headers.value,
        "trace_id_header": lst.trace_id_header or "",
        "traceresponse": lst.traceresponse,
        "timeouts": {
            "connect": lst.timeouts.connect,
            "read": lst.timeouts.read,
            "total": lst.timeouts.total,
        },
        "inspect_body_limit": lst.inspect_body_limit,
        "tls": ({"cert_file": lst.tls.cert_file, "key_file": lst.tls.key_file} if lst.tls else None),
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
            "max_connections_per_client": lst.limits.max_connections_per_client or 0,
            "body_read_timeout": lst.limits.body_read_timeout or 0.0,
        },
    }


def is_loopback(host: str) -> bool:
    """True when ``host`` is a loopback address or ``localhost``."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
