"""Every key the config file takes: its kind of value, its default and what it means.

The one definition of the file's shape. Derived from it: the loader's unknown-key checks
(``_TOP_KEYS``, ``_SECTION_KEYS``, ``_LISTENER_KEYS`` …), the JSON Schema that
``mes-trace-proxy check-config --schema`` prints (:mod:`mes_trace_proxy.config.schema`), and
the whole parsing of the plain sections (``server``, ``watchdog``, ``tracing``, a listener's
``limits`` and ``timeouts``): each key is read with its kind's parser and its default. A
:class:`Kind` carries both the parser and the JSON Schema fragment, written side by side;
tests/test_config_keys.py holds sample values against both.

To add an option:

- a config-file key: one :class:`Key` row here (kind, meaning, default) and one field of the
  same name in its section's dataclass (config/model.py); a plain section (server, watchdog,
  tracing, listeners[].limits) then parses it with no further code, and
  docs/config.schema.json is regenerated with ``mes-trace-proxy check-config --schema``;
- a flag and a variable for it: one row in ``OPTIONS`` (config/options.py) with its help text;
- its line in docs/configuration.md (tests/test_docs.py checks that it is there).

A new plain section is a :class:`Section` here, its :class:`Key` in ``FILE_SECTIONS``, its
dataclass and field of :class:`~mes_trace_proxy.config.Config`, and one
``_plain(doc, "name", NAME, NameConfig)`` line in ``load_config``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

from mes_trace_proxy.config.model import CLIENT_SPAN_MODES
from mes_trace_proxy.config.options import (
    DEFAULT_ADMIN_LISTEN,
    DEFAULT_BODY_READ_TIMEOUT,
    DEFAULT_CHECK_INTERVAL,
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_GRACE_PERIOD,
    DEFAULT_HEADER_READ_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_INSPECT_LIMIT,
    DEFAULT_JAEGER_URL,
    DEFAULT_LISTEN,
    DEFAULT_MAX_BODY_SIZE,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_HEADER_SIZE,
    DEFAULT_MAX_HEADERS,
    DEFAULT_MAX_LINE_SIZE,
    DEFAULT_READ_TIMEOUT,
    DEFAULT_RETENTION,
    DEFAULT_STATE,
)
from mes_trace_proxy.config.values import (
    _DURATION,
    _SIZE,
    HEADER_TOKEN,
    _count,
    _parse_bool,
    _parse_client_span,
    _parse_correlation,
    _parse_hostport,
    _parse_http_url,
    _parse_log_level,
    _parse_state,
    _parse_upstream,
    _parse_workers,
    parse_duration,
    parse_size,
)
from mes_trace_proxy.rules import _RULE_KEYS, SourceKind

__all__ = ["FILE_SECTIONS", "RULES", "Key", "Kind", "ListOf", "MapOf", "Section"]


@dataclass(frozen=True, slots=True)
class Kind:
    """One kind of value: the loader's parser for it (if a plain one) and its JSON Schema."""

    schema: Mapping[str, object]
    #: raises ValueError with the text that follows the key in the error; ``None`` where a
    #: section parser in config/sections.py checks the value with its neighbours
    parse: Callable[[object], object] | None = None


@dataclass(frozen=True, slots=True)
class Section:
    """A mapping with a fixed set of keys; anything else is an unknown key."""

    keys: tuple[Key, ...]
    #: whether YAML may leave it empty (``tracing:`` with its keys commented out): the loader
    #: reads that as "all defaults" for sections, but a listener or a rule must be a mapping
    nullable: bool = True

    def names(self) -> frozenset[str]:
        """The keys it allows."""
        return frozenset(key.name for key in self.keys)

    def key(self, name: str) -> Key:
        """The row of one key."""
        return next(key for key in self.keys if key.name == name)


@dataclass(frozen=True, slots=True)
class ListOf:
    """A list of one kind of item."""

    item: Kind | Section
    min_items: int = 0


@dataclass(frozen=True, slots=True)
class MapOf:
    """A mapping of free names (rule-set names, statuses) to one kind of value."""

    value: Kind | ListOf


@dataclass(frozen=True, slots=True)
class Key:
    """One key: its value's shape, what it means (the schema's description) and its default."""

    name: str
    value: Kind | Section | ListOf | MapOf
    doc: str
    #: the default the loader uses (``None``: none, or one the section parser works out)
    default: object = None


# ── kinds of value ──────────────────────────────────────────────────────────────────────────


def _positive(parse: Callable[[object], float]) -> Callable[[object], float]:
    def positive(value: object) -> float:
        number = parse(value)
        if number <= 0:
            raise ValueError("must be longer than zero")
        return number

    return positive


def _at_least_one_byte(value: object) -> int:
    size = parse_size(value)
    if size < 1:
        raise ValueError("must be at least 1 byte")
    return size


def _count_or_zero(value: object) -> int:
    """A whole number of at least 1, or 0 (a cap turned off)."""
    text = str(value).strip()
    return 0 if not isinstance(value, bool) and text and set(text) == {"0"} else _count(value)


def _bare(pattern: re.Pattern[str]) -> str:
    """A Python regex as JSON Schema writes it: the same text (ECMA 262 reads these alike)."""
    return pattern.pattern


# A duration or size that is not zero: a digit other than 0 somewhere in it.
_NONZERO: Final = r"(?=[^1-9]*[1-9])"
_PORT: Final = r"(?:[0-9]{1,4}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"
_PORT_NOT_ZERO: Final = (
    r"(?:[1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"
)

DURATION: Final = Kind(
    {"type": ["number", "string"], "minimum": 0, "pattern": _bare(_DURATION)}, parse_duration
)
POSITIVE_DURATION: Final = Kind(
    {"type": ["number", "string"], "exclusiveMinimum": 0, "pattern": "^" + _NONZERO + _bare(_DURATION)[1:]},
    _positive(parse_duration),
)
SIZE: Final = Kind({"type": ["integer", "string"], "minimum": 0, "pattern": _bare(_SIZE)}, parse_size)
POSITIVE_SIZE: Final = Kind(
    {"type": ["integer", "string"], "minimum": 1, "pattern": "^" + _NONZERO + _bare(_SIZE)[1:]},
    _at_least_one_byte,
)
COUNT: Final = Kind(
    {"type": ["integer", "string"], "minimum": 1, "pattern": r"^\s*0*[1-9][0-9]*\s*$"}, _count
)
COUNT_OR_ZERO: Final = Kind(
    {"type": ["integer", "string"], "minimum": 0, "pattern": r"^\s*[0-9]+\s*$"}, _count_or_zero
)
WORKERS: Final = Kind(
    {
        "type": ["integer", "string"],
        "minimum": 1,
        "maximum": 64,
        "pattern": r"^\s*0*(?:[1-9]|[1-5][0-9]|6[0-4])\s*$",
    },
    _parse_workers,
)
BOOL: Final = Kind(
    {"anyOf": [{"type": "boolean"}, {"enum": ["true", "false", "yes", "no", "on", "off", "1", "0"]}]},
    _parse_bool,
)
HOSTPORT: Final = Kind(
    {
        "type": "string",
        "pattern": r"^\s*(?:\[[^\]\s]+\]|[^\s\[\]]+):" + _PORT + r"\s*$",
        "examples": ["127.0.0.1:8080", "0.0.0.0:8080", "[::1]:8080"],
    },
    _parse_hostport,
)
UPSTREAM_URL: Final = Kind(
    {
        "type": "string",
        "pattern": r"^\s*https?://(?:[^/?#@\s:\[\]]+|\[[0-9A-Fa-f:.]+\])(?::"
        + _PORT_NOT_ZERO
        + r")?(?:/[^?#\s]*)?\s*$",
        "examples": ["http://127.0.0.1:8081", "https://mes.internal/base"],
    },
    _parse_upstream,
)
HTTP_URL: Final = Kind({"type": "string", "pattern": r"^\s*https?://[^/?#\s]+"}, _parse_http_url)
STATE: Final = Kind(
    {
        "type": "string",
        "pattern": r"^\s*(?:memory\s*|(?:sqlite:///|rediss?://|unix://).*)$",
        "examples": ["memory", "sqlite:///./mes-trace-proxy-orders.db", "redis://redis:6379/0"],
    },
    _parse_state,
)
FILE: Final = Kind({"type": "string"})
TEXT: Final = Kind({"type": "string", "minLength": 1})
SCALAR_TEXT: Final = Kind({"type": ["string", "number"]})
_HEADER_NAME_PATTERN: Final = "^" + HEADER_TOKEN.pattern + "$"
HEADER_NAME: Final = Kind({"type": "string", "pattern": _HEADER_NAME_PATTERN})
#: a list in the file, or the comma-separated string a flag or variable gives
STRINGS: Final = Kind({"type": ["array", "string"], "items": {"type": "string"}})
HEADER_NAMES: Final = Kind(
    {"type": ["array", "string"], "items": {"type": "string", "pattern": _HEADER_NAME_PATTERN}}
)
STATUS_NAMES: Final = Kind({"type": "array", "items": {"type": "string", "minLength": 1}})


def _enum(parse: Callable[[object], str], values: tuple[str, ...]) -> Kind:
    return Kind({"enum": list(values)}, parse)


# ── the rules a listener or a rule set holds (rules.py parses them) ──────────────────────────

_SOURCE: Final = {
    "type": "string",
    "pattern": "^(?:" + "|".join(kind.value for kind in SourceKind) + "):",
}
#: rules.py's keys and the shape of each (held to _RULE_KEYS below and by tests/test_config_keys.py)
RULE: Final = Section(
    (
        Key("name", TEXT, "names the span's route and the rule in explain; default: the route"),
        Key(
            "method",
            Kind(
                {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1}]}
            ),
            'an HTTP method, a list of them, or "*" (the default: every method)',
        ),
        Key(
            "route",
            Kind({"type": "string", "pattern": r"^/[^?#]*$"}),
            "path template; {name} matches one segment",
        ),
        Key(
            "order_id",
            Kind(_SOURCE),
            "where the order id comes from: path:, query:, header:, body:/ptr, const: …",
        ),
        Key("status", Kind(_SOURCE), "where the status this call sets comes from"),
        Key("observed_status", Kind(_SOURCE), "where the status MES answers with comes from"),
        Key("sample", Kind({"type": "number", "minimum": 0, "maximum": 1}), "per-rule sampling ratio"),
    ),
    nullable=False,
)
RULES: Final = ListOf(RULE)
assert RULE.names() == _RULE_KEYS, "RULE must describe exactly rules.py's keys"

# ── the file ─────────────────────────────────────────────────────────────────────────────────

TLS: Final = Section(
    (
        Key("cert_file", FILE, "PEM certificate chain, leaf first; serve HTTPS (with key_file)"),
        Key("key_file", FILE, "PEM private key, unencrypted"),
    )
)
UPSTREAM_TLS: Final = Section(
    (
        Key("ca_file", FILE, "PEM CA bundle that signed the upstream's certificate (default: the system's)"),
        Key("cert_file", FILE, "client certificate for mTLS (with key_file)"),
        Key("key_file", FILE, "its private key"),
        Key("verify", BOOL, "check the upstream's certificate and host name (false: a lab setting)", True),
    )
)
LIMITS: Final = Section(
    (
        Key("max_line_size", POSITIVE_SIZE, "request target bytes; longer gets 414", DEFAULT_MAX_LINE_SIZE),
        Key(
            "max_header_size",
            POSITIVE_SIZE,
            "bytes of one header field; longer gets 431",
            DEFAULT_MAX_HEADER_SIZE,
        ),
        Key("max_headers", COUNT, "header fields per request; more gets 431", DEFAULT_MAX_HEADERS),
        Key("max_body_size", SIZE, "request body bytes; larger gets 413; 0: no limit", DEFAULT_MAX_BODY_SIZE),
        Key(
            "header_read_timeout",
            POSITIVE_DURATION,
            "first byte to end of the header section; slower gets 408",
            DEFAULT_HEADER_READ_TIMEOUT,
        ),
        Key(
            "idle_timeout",
            POSITIVE_DURATION,
            "keep-alive connection idle this long is closed",
            DEFAULT_IDLE_TIMEOUT,
        ),
        Key(
            "max_connections",
            COUNT,
            "open connections; at the cap the longest-idle one closes, with none idle new ones get 503",
            DEFAULT_MAX_CONNECTIONS,
        ),
        Key(
            "max_connections_per_client",
            COUNT_OR_ZERO,
            "open connections from one source address; more get 503; 0: no cap",
            0,
        ),
        Key(
            "body_read_timeout",
            DURATION,
            "a request body sending no byte this long gets 408; 0s: no limit",
            DEFAULT_BODY_READ_TIMEOUT,
        ),
    )
)
TIMEOUTS: Final = Section(
    (
        Key("connect", DURATION, "connecting to the upstream; 0s: no limit", DEFAULT_CONNECT_TIMEOUT),
        Key("read", DURATION, "between two reads from the upstream; 0s: no limit", DEFAULT_READ_TIMEOUT),
        Key("total", DURATION, "the whole upstream exchange; 0s: no limit", 0.0),
    )
)
LISTENER: Final = Section(
    (
        Key(
            "name",
            Kind({"type": "string"}),
            "names the listener in spans, logs and metrics (ingress, egress)",
        ),
        Key("listen", HOSTPORT, "HOST:PORT; required after the first listener", DEFAULT_LISTEN),
        Key("upstream", UPSTREAM_URL, "http:// or https:// base URL of the service behind this listener"),
        Key(
            "rules",
            Kind({"anyOf": [{"type": "string"}, {"$ref": "#/definitions/rules"}]}),
            "a rule set named under rule_sets, or an inline list of rules",
        ),
        Key("host_header", Kind({"enum": ["upstream", "preserve"]}), "Host sent upstream", "upstream"),
        Key("forwarded_headers", BOOL, "append X-Forwarded-For/-Proto/-Host and Forwarded", True),
        Key(
            "underscore_lookalikes",
            Kind({"enum": ["drop", "refuse"]}),
            "a field name with '_' that reads as a framing, hop-by-hop or forwarding field: drop or refuse",
            "drop",
        ),
        Key(
            "underscore_headers",
            Kind({"enum": ["pass", "drop", "refuse"]}),
            "every other field name with '_': pass, drop or refuse",
            "pass",
        ),
        Key(
            "trace_id_header",
            Kind({"type": ["string", "null"], "pattern": "^(?:|" + HEADER_TOKEN.pattern + ")$"}),
            'response header carrying the trace id; "" turns it off',
            "X-Trace-Id",
        ),
        Key("traceresponse", BOOL, "W3C traceresponse header on every answer", True),
        Key("timeouts", TIMEOUTS, "upstream timeouts"),
        Key(
            "inspect_body_limit",
            SIZE,
            "JSON bodies up to this size are read for order facts",
            DEFAULT_INSPECT_LIMIT,
        ),
        Key("tls", TLS, "serve HTTPS on this listener"),
        Key("upstream_tls", UPSTREAM_TLS, "TLS and mTLS to an https:// upstream"),
        Key("limits", LIMITS, "what the listener accepts before it refuses or disconnects"),
    ),
    nullable=False,
)
SERVICE: Final = Section(
    (
        Key("name", TEXT, "service.name of every span; OTEL_SERVICE_NAME wins", "mes-api"),
        Key("namespace", SCALAR_TEXT, "service.namespace"),
        Key("environment", SCALAR_TEXT, "deployment.environment.name"),
    )
)
ADMIN: Final = Section(
    (
        Key(
            "listen",
            HOSTPORT,
            "the admin listener: health, metrics, orders API and page",
            DEFAULT_ADMIN_LISTEN,
        ),
        Key(
            "tokens_file",
            FILE,
            "ROLE:TOKEN lines; then every admin route but the probes needs a bearer token",
        ),
    )
)
LIFECYCLE: Final = Section(
    (
        Key(
            "statuses",
            ListOf(Kind({"type": "string", "minLength": 1}), 1),
            "the forward path of statuses, in order",
        ),
        Key("cancel", Kind({"type": ["string", "null"]}), "the side exit from any non-terminal status"),
        Key("terminal", STATUS_NAMES, "statuses after which nothing should change"),
        Key(
            "entry",
            Kind({"type": ["array", "null"], "items": {"type": "string"}}),
            "where new orders first appear",
        ),
        Key(
            "dwell_limits",
            MapOf(POSITIVE_DURATION),
            "STATUS: DURATION; an order longer in that status is stuck",
        ),
    )
)
WATCHDOG: Final = Section(
    (
        Key("state", STATE, "where order state persists: memory, sqlite:///PATH, redis://…", DEFAULT_STATE),
        Key(
            "check_interval",
            POSITIVE_DURATION,
            "how often stuck orders are looked for",
            DEFAULT_CHECK_INTERVAL,
        ),
        Key("jaeger_url", HTTP_URL, "Jaeger UI base URL for the admin page's links", DEFAULT_JAEGER_URL),
        Key(
            "correlation",
            _enum(_parse_correlation, ("link", "trace-per-order", "off")),
            "how an order's spans are tied together",
            "link",
        ),
        Key(
            "retention",
            POSITIVE_DURATION,
            "closed and cancelled orders are forgotten after this",
            DEFAULT_RETENTION,
        ),
    )
)
PRIVACY: Final = Section(
    (
        Key("user_id_header", HEADER_NAME, "header holding the caller's user id", "X-User-Id"),
        Key("user_id_key_file", FILE, "file with the HMAC key for enduser.id; no key, no user id"),
        Key("query_allow", STRINGS, "query parameters recorded in url.query"),
        Key("header_allow", HEADER_NAMES, "request headers recorded on spans"),
        Key("redact_keys", STRINGS, "personal JSON keys: never recorded, never an order id"),
        Key("trusted_callers", STRINGS, 'CIDRs whose trace context is continued; "*" trusts every caller'),
    )
)
SERVER: Final = Section(
    (
        Key("workers", WORKERS, "processes sharing the listen sockets (SO_REUSEPORT)", 1),
        Key("grace_period", DURATION, "drain time on SIGTERM", DEFAULT_GRACE_PERIOD),
        Key("log_level", _enum(_parse_log_level, ("debug", "info", "warning", "error")), "log level", "info"),
        Key("access_log", BOOL, "JSON access log on stdout", True),
    )
)
TRACING: Final = Section(
    (
        Key(
            "client_span",
            _enum(_parse_client_span, CLIENT_SPAN_MODES),
            "who makes the CLIENT span: sdk (lean) or instrumentation (the contrib package)",
            "sdk",
        ),
    )
)
#: The message path (docs/messages.md); mes_trace_proxy/messages/settings.py parses and checks it.
MESSAGES: Final = Section(
    (
        Key(
            "amqp_url",
            Kind({"type": "string", "pattern": r"^\s*amqps?://"}),
            "RabbitMQ URL; the message path is off without it",
        ),
        Key("amqp_password_file", FILE, "file holding the AMQP password (or MES_PROXY_AMQP_PASSWORD)"),
        Key(
            "tls",
            Kind({"type": "object", "properties": {n: {"type": "string"} for n in ("ca", "cert", "key")}}),
            "CA, client certificate and key files for amqps://",
        ),
        Key("dead_letter_queues", STRINGS, "own mode: the dead-letter queues the proxy consumes"),
        Key(
            "observe_exchange", TEXT, "observe mode: the dead-letter exchange the proxy's own queue binds to"
        ),
        Key(
            "observe_queue",
            TEXT,
            "observe mode: the proxy's own durable queue",
            "mes-trace-proxy.dead-letters",
        ),
        Key(
            "prefetch",
            Kind({"type": "integer", "minimum": 1, "maximum": 10000}),
            "unacked messages per queue",
            64,
        ),
        Key("restore_expiration", BOOL, "re-drive with the message's original per-message TTL", False),
        Key(
            "message_rules",
            Kind({"type": "array", "items": {"type": "object"}}),
            "where a message's order id and status come from",
        ),
        Key(
            "auto_redrive",
            Kind({"type": "object"}),
            "queue → {attempts, backoff, reasons}: opt-in automatic re-drive",
        ),
    )
)
#: The whole file.
FILE_SECTIONS: Final = Section(
    (
        Key("service", SERVICE, "resource facts of every span"),
        Key(
            "listeners", ListOf(LISTENER, 1), "the proxy's listeners; the first is ingress, the second egress"
        ),
        Key("admin", ADMIN, "the admin listener"),
        Key(
            "rule_sets",
            MapOf(RULES),
            "name → list of rules; a set named here replaces the default of that name",
        ),
        Key("lifecycle", LIFECYCLE, "the order lifecycle the watchdog checks"),
        Key("watchdog", WATCHDOG, "the stuck-order watchdog and order state"),
        Key("privacy", PRIVACY, "what may leave the proxy about a user"),
        Key("server", SERVER, "process-level settings"),
        Key("tracing", TRACING, "how the proxy makes its spans (exporters: the OTEL_* variables)"),
        Key("messages", MESSAGES, "the message path: RabbitMQ dead letters held, traced and re-driven"),
    )
)


def _section(name: str) -> Section:
    value = FILE_SECTIONS.key(name).value
    assert isinstance(value, Section)
    return value


# The key sets the loader checks unknown keys against, derived from the definition above.
_TOP_KEYS: Final = FILE_SECTIONS.names()
_LISTENER_KEYS: Final = LISTENER.names()
_SECTION_KEYS: Final[Mapping[str, frozenset[str]]] = MappingProxyType(
    {key.name: key.value.names() for key in FILE_SECTIONS.keys if isinstance(key.value, Section)}
)
_TLS_KEYS: Final = TLS.names()
_UPSTREAM_TLS_KEYS: Final = UPSTREAM_TLS.names()
_LIMIT_KEYS: Final = LIMITS.names()
_TIMEOUT_KEYS: Final = TIMEOUTS.names()
