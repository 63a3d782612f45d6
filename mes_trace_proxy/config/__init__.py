"""The one frozen configuration, loaded once from flags, environment and the config file.

:func:`load_config` is pure: the CLI reads the files and hands over their parsed contents,
the environment as a mapping and the flags as a mapping. Precedence, highest first: flag,
environment variable, config file, default. Every error is a :class:`ConfigError` naming
the flag, the variable or the config-file key it came from.

The package, by concern:

- ``model``: the frozen dataclasses (:class:`Config` and one per section) and :class:`ConfigError`;
- ``values``: scalar parsers (durations, sizes, addresses, URLs, enumerations);
- ``options``: the table of flags and variables (``OPTIONS``) and the defaults;
- ``keys``: every key the file takes, with its kind (parser and JSON Schema), default and meaning;
- ``schema``: the JSON Schema of the file, rendered from ``keys`` (``check-config --schema``);
- ``overlay``: the file overlaid with variables and flags, remembering who set each key;
- ``sections``: one parser per section (listeners, rule sets, lifecycle, TLS, limits, admin,
  privacy);
- ``loader``: :func:`load_config`, which puts them together.

Everything users and the rest of the package import is re-exported here:
``from mes_trace_proxy.config import X`` is the import path to use.
"""

from __future__ import annotations

from mes_trace_proxy.config.keys import _LISTENER_KEYS, _SECTION_KEYS, _TOP_KEYS
from mes_trace_proxy.config.loader import load_config
from mes_trace_proxy.config.model import (
    CLIENT_SPAN_MODES,
    AdminConfig,
    Config,
    ConfigError,
    HostPort,
    Limits,
    ListenerConfig,
    PrivacyConfig,
    ServerConfig,
    ServerTls,
    ServiceConfig,
    Timeouts,
    TracingConfig,
    Upstream,
    UpstreamTls,
    WatchdogConfig,
    is_loopback,
)
from mes_trace_proxy.config.options import (
    DEFAULT_ADMIN_LISTEN,
    DEFAULT_CHECK_INTERVAL,
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_GRACE_PERIOD,
    DEFAULT_HEADER_READ_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_INSPECT_LIMIT,
    DEFAULT_JAEGER_URL,
    DEFAULT_LIMITS,
    DEFAULT_LISTEN,
    DEFAULT_MAX_BODY_SIZE,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_HEADER_SIZE,
    DEFAULT_MAX_HEADERS,
    DEFAULT_MAX_LINE_SIZE,
    DEFAULT_READ_TIMEOUT,
    DEFAULT_RETENTION,
    DEFAULT_RULE_SETS,
    DEFAULT_STATE,
    ENV_CONFIG,
    ENV_DEAD_LETTER_QUEUES,
    ENV_DWELL_LIMITS,
    ENV_USER_ID_KEY,
    FLAG_DEAD_LETTER_QUEUE,
    FLAG_DWELL_LIMIT,
    OPTIONS,
)
from mes_trace_proxy.config.values import parse_duration, parse_size

__all__ = [
    "CLIENT_SPAN_MODES",
    "DEFAULT_ADMIN_LISTEN",
    "DEFAULT_CHECK_INTERVAL",
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_GRACE_PERIOD",
    "DEFAULT_HEADER_READ_TIMEOUT",
    "DEFAULT_IDLE_TIMEOUT",
    "DEFAULT_INSPECT_LIMIT",
    "DEFAULT_JAEGER_URL",
    "DEFAULT_LIMITS",
    "DEFAULT_LISTEN",
    "DEFAULT_MAX_BODY_SIZE",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_MAX_HEADERS",
    "DEFAULT_MAX_HEADER_SIZE",
    "DEFAULT_MAX_LINE_SIZE",
    "DEFAULT_READ_TIMEOUT",
    "DEFAULT_RETENTION",
    "DEFAULT_RULE_SETS",
    "DEFAULT_STATE",
    "ENV_CONFIG",
    "ENV_DEAD_LETTER_QUEUES",
    "ENV_DWELL_LIMITS",
    "ENV_USER_ID_KEY",
    "FLAG_DEAD_LETTER_QUEUE",
    "FLAG_DWELL_LIMIT",
    "OPTIONS",
    "_LISTENER_KEYS",
    "_SECTION_KEYS",
    "_TOP_KEYS",
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
    "is_loopback",
    "load_config",
    "parse_duration",
    "parse_size",
]
