"""What can be set from outside the file: the flags and variables of every option, and the defaults.

``OPTIONS`` is the one table of single-valued options (flag, variable, config-file key); the
docs test checks it against docs/configuration.md, and the CLI builds its flags from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from mes_trace_proxy.config.model import Limits


@dataclass(frozen=True, slots=True)
class _Option:
    """A flag and an env var that override one config-file key."""

    dest: str
    flag: str
    env: str
    path: tuple[str | int, ...]
    #: the flag's ``--help`` text (the variable is appended by the CLI)
    help: str
    #: the flag takes no value and sets the key to false (``--no-access-log``)
    switch_off: bool = False


_L0, _L1 = ("listeners", 0), ("listeners", 1)

#: Every single-valued option: the table the docs test checks against docs/configuration.md and
#: the CLI builds its flags from. A new one is one row here (and its key in config/keys.py).
OPTIONS: Final = (
    _Option(
        "listen",
        "--listen",
        "MES_PROXY_LISTEN",
        (*_L0, "listen"),
        "ingress listener HOST:PORT (CRM and dashboard → MES) [default 127.0.0.1:8080]",
    ),
    _Option(
        "upstream",
        "--upstream",
        "MES_PROXY_UPSTREAM",
        (*_L0, "upstream"),
        "MES base URL, http:// or https:// (required)",
    ),
    _Option(
        "egress_listen",
        "--egress-listen",
        "MES_PROXY_EGRESS_LISTEN",
        (*_L1, "listen"),
        "egress listener HOST:PORT (MES → CRM)",
    ),
    _Option(
        "egress_upstream",
        "--egress-upstream",
        "MES_PROXY_EGRESS_UPSTREAM",
        (*_L1, "upstream"),
        "CRM base URL for the egress listener",
    ),
    _Option(
        "admin_listen",
        "--admin-listen",
        "MES_PROXY_ADMIN_LISTEN",
        ("admin", "listen"),
        "admin listener HOST:PORT: /healthz /readyz /metrics [default 127.0.0.1:9901]",
    ),
    _Option(
        "workers",
        "--workers",
        "MES_PROXY_WORKERS",
        ("server", "workers"),
        "processes sharing the listen sockets (SO_REUSEPORT) [default 1]",
    ),
    _Option(
        "grace_period",
        "--grace-period",
        "MES_PROXY_GRACE_PERIOD",
        ("server", "grace_period"),
        "drain time on SIGTERM, e.g. 20s [default 20s]",
    ),
    _Option(
        "log_level",
        "--log-level",
        "MES_PROXY_LOG_LEVEL",
        ("server", "log_level"),
        "debug, info, warning or error [default info]",
    ),
    _Option(
        "access_log",
        "--no-access-log",
        "MES_PROXY_ACCESS_LOG",
        ("server", "access_log"),
        "do not write the JSON access log",
        switch_off=True,
    ),
    _Option(
        "user_id_key_file",
        "--user-id-key-file",
        "MES_PROXY_USER_ID_KEY_FILE",
        ("privacy", "user_id_key_file"),
        "file holding the HMAC key for enduser.id (no key: no user id recorded)",
    ),
    _Option(
        "state",
        "--state",
        "MES_PROXY_STATE",
        ("watchdog", "state"),
        "order state: memory, sqlite:///PATH or redis://HOST:PORT/DB",
    ),
    _Option(
        "check_interval",
        "--check-interval",
        "MES_PROXY_CHECK_INTERVAL",
        ("watchdog", "check_interval"),
        "how often the watchdog looks for stuck orders, e.g. 10s",
    ),
    _Option(
        "jaeger_url",
        "--jaeger-url",
        "MES_PROXY_JAEGER_URL",
        ("watchdog", "jaeger_url"),
        "Jaeger UI base URL for links on the admin page",
    ),
    _Option(
        "correlation",
        "--correlation",
        "MES_PROXY_CORRELATION",
        ("watchdog", "correlation"),
        "link, trace-per-order or off",
    ),
    _Option(
        "tls_cert",
        "--tls-cert",
        "MES_PROXY_TLS_CERT",
        (*_L0, "tls", "cert_file"),
        "PEM certificate chain: serve TLS on the ingress listener (reloaded on change and SIGHUP)",
    ),
    _Option(
        "tls_key",
        "--tls-key",
        "MES_PROXY_TLS_KEY",
        (*_L0, "tls", "key_file"),
        "PEM private key for --tls-cert",
    ),
    _Option(
        "upstream_ca",
        "--upstream-ca",
        "MES_PROXY_UPSTREAM_CA",
        (*_L0, "upstream_tls", "ca_file"),
        "PEM CA bundle that signs the https:// upstream's certificate",
    ),
    _Option(
        "upstream_cert",
        "--upstream-cert",
        "MES_PROXY_UPSTREAM_CERT",
        (*_L0, "upstream_tls", "cert_file"),
        "PEM client certificate for mTLS to the upstream",
    ),
    _Option(
        "upstream_key",
        "--upstream-key",
        "MES_PROXY_UPSTREAM_KEY",
        (*_L0, "upstream_tls", "key_file"),
        "PEM private key for --upstream-cert",
    ),
    _Option(
        "max_body_size",
        "--max-body-size",
        "MES_PROXY_MAX_BODY_SIZE",
        (*_L0, "limits", "max_body_size"),
        "largest request body accepted, e.g. 1GiB (0: no limit) [default 1GiB]",
    ),
    _Option(
        "max_connections",
        "--max-connections",
        "MES_PROXY_MAX_CONNECTIONS",
        (*_L0, "limits", "max_connections"),
        "open connections accepted by the ingress listener [default 4096]",
    ),
    _Option(
        "underscore_lookalikes",
        "--underscore-lookalikes",
        "MES_PROXY_UNDERSCORE_LOOKALIKES",
        (*_L0, "underscore_lookalikes"),
        "header names with _ that read as framing or forwarding fields: drop or refuse [default drop]",
    ),
    _Option(
        "underscore_headers",
        "--underscore-headers",
        "MES_PROXY_UNDERSCORE_HEADERS",
        (*_L0, "underscore_headers"),
        "every other header name with _: pass, drop or refuse [default pass]",
    ),
    _Option(
        "admin_token_file",
        "--admin-token-file",
        "MES_PROXY_ADMIN_TOKEN_FILE",
        ("admin", "tokens_file"),
        "ROLE:TOKEN lines; admin endpoints but /healthz, /readyz then need a bearer token",
    ),
    _Option(
        "trusted_callers",
        "--trusted-callers",
        "MES_PROXY_TRUSTED_CALLERS",
        ("privacy", "trusted_callers"),
        "comma-separated CIDRs whose trace context is continued [default *]",
    ),
    _Option(
        "client_span",
        "--client-span",
        "MES_PROXY_CLIENT_SPAN",
        ("tracing", "client_span"),
        "who makes the CLIENT span: sdk or instrumentation (the contrib package) [default sdk]",
    ),
    _Option(
        "amqp_url",
        "--amqp-url",
        "MES_PROXY_AMQP_URL",
        ("messages", "amqp_url"),
        "RabbitMQ URL, amqp:// or amqps://, for the message path (docs/messages.md) [default off]",
    ),
    _Option(
        "observe_dead_letter_exchange",
        "--observe-dead-letter-exchange",
        "MES_PROXY_OBSERVE_DEAD_LETTER_EXCHANGE",
        ("messages", "observe_exchange"),
        "observe mode: bind a queue of the proxy's own to this dead-letter exchange",
    ),
)
ENV_USER_ID_KEY: Final = "MES_PROXY_USER_ID_KEY"
ENV_DWELL_LIMITS: Final = "MES_PROXY_DWELL_LIMITS"
FLAG_DWELL_LIMIT: Final = "--dwell-limit"
ENV_DEAD_LETTER_QUEUES: Final = "MES_PROXY_DEAD_LETTER_QUEUES"
FLAG_DEAD_LETTER_QUEUE: Final = "--dead-letter-queue"
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
# nginx's client_body_timeout: a minute without a byte of the body is a stalled caller.
DEFAULT_BODY_READ_TIMEOUT: Final = 60.0
DEFAULT_LIMITS: Final = Limits(
    max_line_size=DEFAULT_MAX_LINE_SIZE,
    max_header_size=DEFAULT_MAX_HEADER_SIZE,
    max_headers=DEFAULT_MAX_HEADERS,
    max_body_size=DEFAULT_MAX_BODY_SIZE,
    header_read_timeout=DEFAULT_HEADER_READ_TIMEOUT,
    idle_timeout=DEFAULT_IDLE_TIMEOUT,
    max_connections=DEFAULT_MAX_CONNECTIONS,
    body_read_timeout=DEFAULT_BODY_READ_TIMEOUT,
)
