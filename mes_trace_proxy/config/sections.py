"""One parser per section of the config file: listeners, rule sets, lifecycle, TLS, limits, admin, privacy.

Each takes the merged document and returns a frozen model value, raising
:class:`ConfigError` with the key (or the flag, or the variable) at fault.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Final

from mes_trace_proxy.admin_auth import TokenError, parse_tokens
from mes_trace_proxy.config.keys import (
    _LIMIT_KEYS,
    _LISTENER_KEYS,
    _TIMEOUT_KEYS,
    _TLS_KEYS,
    _UPSTREAM_TLS_KEYS,
    LIMITS,
    TIMEOUTS,
    Kind,
    Section,
)
from mes_trace_proxy.config.model import (
    AdminConfig,
    ConfigError,
    HostPort,
    Limits,
    ListenerConfig,
    PrivacyConfig,
    ServerTls,
    Timeouts,
    Upstream,
    UpstreamTls,
)
from mes_trace_proxy.config.options import (
    DEFAULT_INSPECT_LIMIT,
    DEFAULT_LISTEN,
    DEFAULT_RULE_SETS,
)
from mes_trace_proxy.config.overlay import _Doc, _get, _mapping, _missing_key, _section_source, _string_list
from mes_trace_proxy.config.values import (
    HEADER_TOKEN,
    _parse_bool,
    _parse_hostport,
    _parse_upstream,
    parse_duration,
    parse_size,
)
from mes_trace_proxy.framing import NameAction, name_action_parser
from mes_trace_proxy.lifecycle import REFERENCE_LIFECYCLE, Lifecycle
from mes_trace_proxy.redact import (
    DEFAULT_HEADER_ALLOW,
    DEFAULT_QUERY_ALLOW,
    DEFAULT_REDACT_KEYS,
    Redactor,
    is_never_header,
)
from mes_trace_proxy.rules import CompiledRules, RuleError, SourceKind, compile_rules, format_pointer

# What a PEM file of each kind must hold (RFC 7468 §5 certificates, §10/§11 private keys).
_PEM_CERT: Final = b"-----BEGIN CERTIFICATE-----"
_PEM_KEY: Final = re.compile(rb"-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----")
_PEM_ENCRYPTED: Final = (b"ENCRYPTED PRIVATE KEY", b"Proc-Type: 4,ENCRYPTED")


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
    compiled, rule_set_name = _listener_rules(doc, raw, base, rule_sets)
    host_header = str(raw.get("host_header", "upstream"))
    if host_header not in ("upstream", "preserve"):
        raise ConfigError(doc.key(*base, "host_header"), f"{host_header!r}: use upstream or preserve")
    trace_header = raw.get("trace_id_header", "X-Trace-Id")
    if trace_header is not None and not isinstance(trace_header, str):
        raise ConfigError(doc.key(*base, "trace_id_header"), 'expected a header name or ""')
    if trace_header and not HEADER_TOKEN.fullmatch(trace_header):
        raise ConfigError(doc.key(*base, "trace_id_header"), f"{trace_header!r} is not a valid header name")
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
        timeouts=_timeouts(doc, raw, base),
        inspect_body_limit=inspect,
        limits=_limits(doc, raw, base),
        tls=_server_tls(doc, raw, base, read_file),
        upstream_tls=_upstream_tls(doc, raw, base, upstream, read_file),
        underscore_lookalikes=_get(
            doc, raw, (*base, "underscore_lookalikes"), _LOOKALIKE_ACTION, NameAction.DROP
        ),
        underscore_headers=_get(doc, raw, (*base, "underscore_headers"), _UNDERSCORE_ACTION, NameAction.PASS),
    )


# Lookalikes of framing and forwarding fields are never forwarded: drop or refuse only.
_LOOKALIKE_ACTION: Final = name_action_parser(NameAction.DROP, NameAction.REFUSE)
_UNDERSCORE_ACTION: Final = name_action_parser(NameAction.PASS, NameAction.DROP, NameAction.REFUSE)


def _listener_rules(
    doc: _Doc, raw: Mapping[str, object], base: tuple[str | int, ...], rule_sets: Mapping[str, CompiledRules]
) -> tuple[CompiledRules, str]:
    """The listener's rules and how they were given: a rule set's name, ``inline`` or ``none``."""
    index = base[-1]
    assert isinstance(index, int)
    rules_raw = raw.get("rules")
    if rules_raw is None:
        rules_raw = DEFAULT_RULE_SETS[index] if index < len(DEFAULT_RULE_SETS) else None
    if isinstance(rules_raw, str):
        compiled = rule_sets.get(rules_raw)
        if compiled is None:
            raise ConfigError(
                doc.key(*base, "rules"), f"no rule set {rules_raw!r}; defined: {', '.join(sorted(rule_sets))}"
            )
        return compiled, rules_raw
    if rules_raw is None:
        return CompiledRules([]), "none"
    try:
        return compile_rules(rules_raw, key=doc.key(*base, "rules")), "inline"
    except RuleError as exc:
        raise ConfigError(exc.key, exc.message) from None


def _timeouts(doc: _Doc, raw: Mapping[str, object], base: tuple[str | int, ...]) -> Timeouts:
    """Upstream timeouts; ``0s`` turns one off (``None``)."""
    path = (*base, "timeouts")
    section = raw.get("timeouts") or {}
    if not isinstance(section, dict):
        raise ConfigError(doc.key(*path), "expected a mapping of connect, read, total")
    for item in section:
        if item not in _TIMEOUT_KEYS:
            raise ConfigError(doc.key(*path, item), "unknown key; allowed: connect, read, total")
    values = _plain_values(doc, section, path, TIMEOUTS)
    return Timeouts(**{name: value or None for name, value in values.items()})  # type: ignore[arg-type]


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


# ── security sections: TLS, limits, admin tokens, privacy lists ─────────────────────────


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


def _plain_values(
    doc: _Doc, section: Mapping[str, object], path: tuple[str | int, ...], definition: Section
) -> dict[str, object]:
    """Each key of a plain section, read with its kind's parser or its default (config/keys.py)."""
    values: dict[str, object] = {}
    for key in definition.keys:
        assert isinstance(key.value, Kind), key.name
        assert key.value.parse is not None, key.name
        values[key.name] = _get(doc, section, (*path, key.name), key.value.parse, key.default)
    return values


def _limits(doc: _Doc, raw: Mapping[str, object], base: tuple[str | int, ...]) -> Limits:
    path = (*base, "limits")
    values = _plain_values(doc, _mapping(doc, raw, path, _LIMIT_KEYS) or {}, path, LIMITS)
    # 0 turns the body limit off, as 0s turns an upstream timeout off; the same for these two.
    values["max_body_size"] = values["max_body_size"] or None
    values["max_connections_per_client"] = values["max_connections_per_client"] or None
    values["body_read_timeout"] = values["body_read_timeout"] or None
    return Limits(**values)  # type: ignore[arg-type]


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


def _privacy(
    doc: _Doc, privacy: Mapping[str, object], user_header: str, secret: bytes | None, key_source: str | None
) -> PrivacyConfig:
    headers = _string_list(doc, privacy, ("privacy", "header_allow"), DEFAULT_HEADER_ALLOW)
    for name in headers:
        if not HEADER_TOKEN.fullmatch(name):
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
