"""``load_config``: the file, the variables and the flags in; one frozen :class:`Config` out.

Pure: the CLI reads the files and hands over their parsed contents, the environment as a
mapping and the flags as a mapping.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Mapping

from mes_trace_proxy.config.model import (
    Config,
    ConfigError,
    ServerConfig,
    ServiceConfig,
    TracingConfig,
    WatchdogConfig,
)
from mes_trace_proxy.config.options import (
    _TOP_KEYS,
    DEFAULT_ADMIN_LISTEN,
    DEFAULT_CHECK_INTERVAL,
    DEFAULT_GRACE_PERIOD,
    DEFAULT_JAEGER_URL,
    DEFAULT_RETENTION,
    DEFAULT_STATE,
    ENV_USER_ID_KEY,
)
from mes_trace_proxy.config.overlay import _Doc, _get, _overlay, _positive
from mes_trace_proxy.config.sections import (
    _admin,
    _check_rule_sources,
    _lifecycle,
    _listener,
    _privacy,
    _rule_sets,
)
from mes_trace_proxy.config.values import (
    _parse_bool,
    _parse_client_span,
    _parse_correlation,
    _parse_hostport,
    _parse_http_url,
    _parse_log_level,
    _parse_state,
    _parse_workers,
    parse_duration,
)


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
