"""``load_config``: the file, the variables and the flags in; one frozen :class:`Config` out.

Pure: the CLI reads the files and hands over their parsed contents, the environment as a
mapping and the flags as a mapping.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

from mes_trace_proxy.config.keys import _TOP_KEYS, SERVER, TRACING, WATCHDOG, Section
from mes_trace_proxy.config.model import (
    Config,
    ConfigError,
    HostPort,
    ListenerConfig,
    ServerConfig,
    ServiceConfig,
    TracingConfig,
    WatchdogConfig,
)
from mes_trace_proxy.config.options import DEFAULT_ADMIN_LISTEN, ENV_USER_ID_KEY
from mes_trace_proxy.config.overlay import _Doc, _get, _overlay
from mes_trace_proxy.config.sections import (
    _admin,
    _check_rule_sources,
    _lifecycle,
    _listener,
    _plain_values,
    _privacy,
    _rule_sets,
)
from mes_trace_proxy.config.values import HEADER_TOKEN, _parse_hostport
from mes_trace_proxy.messages.settings import MessagesConfig, MessagesConfigError, parse_messages
from mes_trace_proxy.rules import CompiledRules

_S = TypeVar("_S")


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

    # The order of the steps below is the order in which problems are reported.
    listeners = _listeners(doc, _rule_sets(doc, defaults), read_file)
    admin = doc.section("admin")
    admin_listen = _get(
        doc, admin, ("admin", "listen"), _parse_hostport, _parse_hostport(DEFAULT_ADMIN_LISTEN)
    )
    _check_addresses(doc, listeners, admin_listen)
    service = doc.section("service")
    for name in ("server", "watchdog"):
        doc.section(name)  # unknown keys are reported before any value
    privacy = doc.section("privacy")
    doc.section("tracing")
    secret, key_source = _user_id_key(doc, privacy, environ, read_file)
    user_header = str(privacy.get("user_id_header", "X-User-Id"))
    if not HEADER_TOKEN.fullmatch(user_header):
        raise ConfigError(doc.key("privacy", "user_id_header"), f"{user_header!r} is not a valid header name")
    service_name = service.get("name", "mes-api")
    if not isinstance(service_name, str) or not service_name:
        raise ConfigError(doc.key("service", "name"), "expected a non-empty string")
    privacy_config = _privacy(doc, privacy, user_header, secret, key_source)
    _check_rule_sources(doc, listeners, privacy_config)
    return Config(
        listeners=listeners,
        admin=_admin(doc, admin, admin_listen, read_file),
        service=ServiceConfig(
            name=service_name,
            namespace=_opt_str(doc, service, ("service", "namespace")),
            environment=_opt_str(doc, service, ("service", "environment")),
        ),
        privacy=privacy_config,
        watchdog=_plain(doc, "watchdog", WATCHDOG, WatchdogConfig),
        server=_plain(doc, "server", SERVER, ServerConfig),
        lifecycle=_lifecycle(doc),
        tracing=_plain(doc, "tracing", TRACING, TracingConfig),
        messages=_messages(doc),
    )


def _messages(doc: _Doc) -> MessagesConfig:
    """The ``messages`` section (messages/settings.py checks it), blaming the flag or variable."""
    try:
        return parse_messages(doc.section("messages"))
    except MessagesConfigError as exc:
        # "messages.amqp_url" → the flag or variable that set it, when one did.
        path = tuple(exc.key.split("[")[0].split("."))[:2]
        origin = doc.key(*path)
        raise ConfigError(origin if origin != ".".join(path) else exc.key, exc.message) from None


def _plain(doc: _Doc, name: str, definition: Section, build: Callable[..., _S]) -> _S:
    """A top-level section of plain keys, built into its dataclass (fields named as the keys)."""
    return build(**_plain_values(doc, doc.section(name), (name,), definition))


def _listeners(
    doc: _Doc, rule_sets: Mapping[str, CompiledRules], read_file: Callable[[str], bytes] | None
) -> tuple[ListenerConfig, ...]:
    """Every listener, with its rules; names must differ."""
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
    return listeners


def _check_addresses(doc: _Doc, listeners: Sequence[ListenerConfig], admin_listen: HostPort) -> None:
    """No two listeners (the admin one included) on one address; port 0 never collides."""
    ports = [(lst.listen, doc.key("listeners", i, "listen")) for i, lst in enumerate(listeners)]
    ports.append((admin_listen, doc.key("admin", "listen")))
    bound: dict[tuple[str, int], str] = {}
    for address, key in ports:
        if address.port == 0:
            continue
        if (address.host, address.port) in bound:
            raise ConfigError(key, f"{address} is already used by {bound[(address.host, address.port)]}")
        bound[(address.host, address.port)] = key


def _user_id_key(
    doc: _Doc,
    privacy: Mapping[str, object],
    environ: Mapping[str, str],
    read_file: Callable[[str], bytes] | None,
) -> tuple[bytes | None, str | None]:
    """The HMAC key for enduser.id and who gave it: the variable, or the key file (flag beats variable)."""
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
    return secret, key_source


def _opt_str(doc: _Doc, section: Mapping[str, object], path: tuple[str, str]) -> str | None:
    value = section.get(path[1])
    if value is None:
        return None
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        raise ConfigError(doc.key(*path), "expected a string")
    return str(value)
