"""Config for the security sections (TLS, limits, admin tokens, privacy lists): defaults and error keys.

Kept apart from tests/core/config/test_config.py, which holds the per-option precedence table these
options also have rows in.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import pytest

from mes_trace_proxy.app import trust_policy
from mes_trace_proxy.cli import read_default_rules
from mes_trace_proxy.core.config import DEFAULT_LIMITS, Config, ConfigError, load_config
from mes_trace_proxy.core.redact import DEFAULT_HEADER_ALLOW, Redactor

DEFAULTS = read_default_rules()
MES = "http://mes.internal:8081"
CERT = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
KEY = b"-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n"
FILES = {
    "/tls/proxy.crt": CERT,
    "/tls/proxy.key": KEY,
    "/tls/rsa.key": b"-----BEGIN RSA PRIVATE KEY-----\nMIIE\n-----END RSA PRIVATE KEY-----\n",
    "/tls/locked.key": b"-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIE\n-----END ENCRYPTED PRIVATE KEY-----\n",
    "/tls/empty": b"",
}


def _load(
    doc: Mapping[str, object] | None = None,
    *,
    flags: Mapping[str, object] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    def read_file(path: str) -> bytes:
        if path not in FILES:
            raise FileNotFoundError(2, "No such file or directory", path)
        return FILES[path]

    return load_config(
        flags={"upstream": MES, **(flags or {})},
        environ=environ or {},
        file_doc=doc,
        defaults=DEFAULTS,
        read_file=read_file,
    )


def _listener_doc(**fields: object) -> dict[str, object]:
    return {"listeners": [{"upstream": MES, **fields}]}


def test_defaults_are_secure_and_documented() -> None:
    """Without options: no TLS, the documented limits, trust every caller, no admin tokens."""
    config = _load()
    ingress = config.listeners[0]
    assert ingress.tls is None
    assert ingress.upstream_tls is None
    assert ingress.limits == DEFAULT_LIMITS
    assert DEFAULT_LIMITS.max_body_size == 1024**3
    assert DEFAULT_LIMITS.max_line_size != DEFAULT_LIMITS.max_header_size
    assert config.privacy.trusted_callers == ("*",)
    assert config.privacy.header_allow == DEFAULT_HEADER_ALLOW
    assert not config.admin.tokens.enabled


def test_tls_pair_from_flags_and_rsa_keys() -> None:
    """--tls-cert and --tls-key make a TLS listener; PKCS#1 ("RSA PRIVATE KEY") files are keys too."""
    tls = _load(flags={"tls_cert": "/tls/proxy.crt", "tls_key": "/tls/rsa.key"}).listeners[0].tls
    assert tls is not None
    assert (tls.cert_file, tls.key_file, tls.source) == (
        "/tls/proxy.crt",
        "/tls/rsa.key",
        "--tls-cert, --tls-key",
    )


@pytest.mark.parametrize(
    ("doc", "flags", "key", "words"),
    [
        pytest.param(
            _listener_doc(tls={"cert_file": "/tls/missing.crt", "key_file": "/tls/proxy.key"}),
            {},
            "listeners[0].tls.cert_file",
            "cannot read",
            id="missing-cert-file",
        ),
        pytest.param(
            {}, {"tls_cert": "/tls/missing.crt"}, "--tls-cert", "cannot read", id="missing-cert-flag"
        ),
        pytest.param(
            _listener_doc(tls={"cert_file": "/tls/proxy.crt"}),
            {},
            "listeners[0].tls.key_file",
            "required",
            id="no-key",
        ),
        pytest.param(
            _listener_doc(tls={"cert_file": "/tls/proxy.crt", "key_file": "/tls/locked.key"}),
            {},
            "listeners[0].tls.key_file",
            "encrypted",
            id="encrypted-key",
        ),
        pytest.param(
            _listener_doc(tls={"cert_file": "/tls/proxy.key", "key_file": "/tls/proxy.key"}),
            {},
            "listeners[0].tls.cert_file",
            "no PEM certificate",
            id="key-as-cert",
        ),
        pytest.param(
            _listener_doc(tls={"cert_file": "/tls/proxy.crt", "key_file": "/tls/empty"}),
            {},
            "listeners[0].tls.key_file",
            "no PEM private key",
            id="empty-key",
        ),
        pytest.param(
            _listener_doc(tls={"cert_file": "/tls/proxy.crt", "key_file": "/tls/proxy.key", "ca": "x"}),
            {},
            "listeners[0].tls.ca",
            "unknown key",
            id="unknown-tls-key",
        ),
        pytest.param(_listener_doc(tls="on"), {}, "listeners[0].tls", "mapping", id="tls-not-mapping"),
        pytest.param(
            _listener_doc(upstream_tls={"ca_file": "/tls/proxy.crt"}),
            {},
            "listeners[0].upstream_tls",
            "https://",
            id="upstream-tls-on-http",
        ),
        pytest.param(
            {}, {"upstream_ca": "/tls/proxy.crt"}, "--upstream-ca", "https://", id="ca-flag-on-http"
        ),
        pytest.param(
            {
                "listeners": [
                    {"upstream": "https://mes:8443", "upstream_tls": {"cert_file": "/tls/proxy.crt"}}
                ]
            },
            {"upstream": "https://mes:8443"},
            "listeners[0].upstream_tls.key_file",
            "both",
            id="client-cert-without-key",
        ),
        pytest.param(
            {"listeners": [{"upstream": "https://mes:8443", "upstream_tls": {"verify": "sometimes"}}]},
            {"upstream": "https://mes:8443"},
            "listeners[0].upstream_tls.verify",
            "boolean",
            id="verify-not-bool",
        ),
        pytest.param(
            _listener_doc(limits={"max_headers": "many"}),
            {},
            "listeners[0].limits.max_headers",
            "whole number",
            id="max-headers",
        ),
        pytest.param(
            _listener_doc(limits={"max_line_size": 0}),
            {},
            "listeners[0].limits.max_line_size",
            "at least 1",
            id="line-size-zero",
        ),
        pytest.param(
            _listener_doc(limits={"idle_timeout": "0s"}),
            {},
            "listeners[0].limits.idle_timeout",
            "longer than zero",
            id="idle-zero",
        ),
        pytest.param(
            _listener_doc(limits={"header_read_timeout": "soon"}),
            {},
            "listeners[0].limits.header_read_timeout",
            "duration",
            id="header-timeout-word",
        ),
        pytest.param(
            _listener_doc(limits={"max_body": "1GiB"}),
            {},
            "listeners[0].limits.max_body",
            "unknown key",
            id="unknown-limit",
        ),
        pytest.param(
            {"privacy": {"header_allow": ["content-type", "Authorization"]}},
            {},
            "privacy.header_allow",
            "credentials",
            id="allow-authorization",
        ),
        pytest.param(
            {"privacy": {"header_allow": ["x-user-id"]}},
            {},
            "privacy.header_allow",
            "user id",
            id="allow-raw-user-id",
        ),
        pytest.param(
            {"privacy": {"header_allow": ["bad header"]}},
            {},
            "privacy.header_allow",
            "not a valid header name",
            id="allow-bad-name",
        ),
        pytest.param(
            {"privacy": {"query_allow": "status"}},
            {},
            None,
            None,
            id="query-allow-string-is-a-list",
        ),
        pytest.param(
            {"privacy": {"redact_keys": [1, 2]}},
            {},
            "privacy.redact_keys",
            "list of strings",
            id="redact-keys-not-strings",
        ),
        pytest.param(
            {"privacy": {"trusted_callers": ["10.0.0.0/8", "intranet"]}},
            {},
            "privacy.trusted_callers",
            "'intranet'",
            id="trusted-bad-entry",
        ),
        pytest.param(
            {},
            {"trusted_callers": "10.0.0.0/8,300.1.1.1"},
            "--trusted-callers",
            "'300.1.1.1'",
            id="trusted-bad-flag",
        ),
    ],
)
def test_each_bad_value_names_its_key(
    doc: dict[str, object], flags: dict[str, object], key: str | None, words: str | None
) -> None:
    """Every bad TLS, limit or privacy value is a ConfigError naming the key, flag or variable."""
    if key is None:
        _load(doc, flags=flags)
        return
    with pytest.raises(ConfigError) as info:
        _load(doc, flags=flags)
    assert info.value.key == key
    assert words is not None
    assert words in info.value.message


def test_limits_from_the_file() -> None:
    """Every limit is read with its unit; max_body_size 0 turns the body limit off."""
    limits = (
        _load(
            _listener_doc(
                limits={
                    "max_line_size": "4KiB",
                    "max_header_size": "32KiB",
                    "max_headers": 64,
                    "max_body_size": 0,
                    "header_read_timeout": "5s",
                    "idle_timeout": "2m",
                    "max_connections": 100,
                }
            )
        )
        .listeners[0]
        .limits
    )
    assert (limits.max_line_size, limits.max_header_size, limits.max_headers) == (4096, 32768, 64)
    assert limits.max_body_size is None
    assert (limits.header_read_timeout, limits.idle_timeout, limits.max_connections) == (5.0, 120.0, 100)


def test_privacy_lists_reach_the_redactor() -> None:
    """query_allow, header_allow and redact_keys from the config are what the redactor applies."""
    config = _load(
        {
            "privacy": {
                "query_allow": ["orderType"],
                "header_allow": ["X-Request-Id"],
                "redact_keys": ["engraving*"],
            }
        }
    )
    redactor = Redactor(config.privacy.policy())
    assert redactor.query("orderType=RING&status=NEW") == "orderType=RING"
    assert redactor.headers([("X-Request-Id", "r-1"), ("User-Agent", "crm")]) == {"x-request-id": ("r-1",)}
    assert redactor.json_scalar("engravingText", "For Anna") == "[REDACTED]"
    assert redactor.json_scalar("name", "kept: not configured any more") == "kept: not configured any more"


@pytest.mark.parametrize(
    ("callers", "trusted", "untrusted"),
    [
        (["*"], ["127.0.0.1", "203.0.113.9", None], []),
        ([], [], ["127.0.0.1", "10.1.2.3"]),
        (["10.0.0.0/8", "127.0.0.1"], ["10.1.2.3", "127.0.0.1"], ["192.168.1.1", "127.0.0.2", None]),
    ],
    ids=["star", "empty-trusts-none", "cidrs"],
)
def test_trusted_callers_become_the_trust_policy(
    callers: list[str], trusted: list[str | None], untrusted: list[str | None]
) -> None:
    """'*' trusts everyone, an empty list no one, CIDRs and addresses exactly themselves."""
    policy = trust_policy(_load({"privacy": {"trusted_callers": callers}}).privacy.trusted_callers)
    assert all(policy.trusts(address) for address in trusted)
    assert not any(policy.trusts(address) for address in untrusted)


def test_describe_shows_security_settings_without_secrets(tmp_path: object) -> None:
    """check-config's dump names TLS files, limits and the token count, never a token."""
    FILES["/tokens"] = b"admin:the-one-admin-token-0123\n"
    try:
        config = _load(
            _listener_doc(tls={"cert_file": "/tls/proxy.crt", "key_file": "/tls/proxy.key"}),
            flags={"admin_token_file": "/tokens"},
        )
    finally:
        del FILES["/tokens"]
    described = config.describe()
    text = repr(described)
    assert "the-one-admin-token" not in text
    assert "the-one-admin-token" not in repr(config)
    assert described["admin"] == {"listen": "127.0.0.1:9901", "tokens_file": "/tokens", "tokens": 1}
    listener = described["listeners"][0]  # type: ignore[index]
    assert listener["tls"] == {"cert_file": "/tls/proxy.crt", "key_file": "/tls/proxy.key"}
    assert listener["limits"]["max_body_size"] == 1024**3


# Every URL-valued setting /config and check-config show, with a password and a secret-named
# query parameter in it where the loader takes them (an upstream takes neither: refused).
# (id, flags, environment, where in describe(), what it shows)
URL_SETTINGS: Final[tuple[tuple[str, dict[str, object], dict[str, str], tuple[str | int, ...], str], ...]] = (
    (
        "state-password-and-query",
        {"state": "redis://u:pa55-canary@r:6379/0?password=pa55-canary&db=1"},
        {},
        ("watchdog", "state"),
        "redis://u:***@r:6379/0?password=***&db=1",
    ),
    (
        "jaeger-token-query",
        {"jaeger_url": "https://jaeger:16686/?token=t0k-canary&lang=en"},
        {},
        ("watchdog", "jaeger_url"),
        "https://jaeger:16686/?token=***&lang=en",
    ),
    (
        "jaeger-password-and-access-token",
        {"jaeger_url": "http://j:pa55-canary@jaeger/?ACCESS_TOKEN=t0k-canary"},
        {},
        ("watchdog", "jaeger_url"),
        "http://j:***@jaeger/?ACCESS_TOKEN=***",
    ),
    (
        "jaeger-signed-link",
        {"jaeger_url": "http://jaeger/?api_key=k-canary&sig=s-canary&signature=s-canary"},
        {},
        ("watchdog", "jaeger_url"),
        "http://jaeger/?api_key=***&sig=***&signature=***",
    ),
    (
        "amqp-password-and-query",
        {},
        {
            "MES_PROXY_AMQP_URL": "amqps://u:pa55-canary@rabbit:5671/mes?apikey=k-canary&heartbeat=30",
            "MES_PROXY_DEAD_LETTER_QUEUES": "mes.dead-letters",
        },
        ("messages", "amqp_url"),
        "amqps://u:***@rabbit:5671/mes?apikey=***&heartbeat=30",
    ),
    ("upstream-plain", {}, {}, ("listeners", 0, "upstream"), MES),
)


@pytest.mark.parametrize(
    ("flags", "environ", "path", "shown"),
    [row[1:] for row in URL_SETTINGS],
    ids=[row[0] for row in URL_SETTINGS],
)
def test_describe_masks_credentials_in_every_url(
    flags: dict[str, object], environ: dict[str, str], path: tuple[str | int, ...], shown: str
) -> None:
    """/config shows each URL with its password and secret-named query parameters as ***, the rest
    as written."""
    described = _load(flags=flags, environ=environ).describe()
    value: Any = described
    for step in path:
        value = value[step]
    assert value == shown
    assert "canary" not in repr(described)


@pytest.mark.parametrize(
    ("rule", "field"),
    [
        ({"order_id": "body:/customer/id", "status": "body:/status"}, "order_id"),
        ({"order_id": "path:id", "status": "body:/buyer/email"}, "status"),
        ({"order_id": "path:id", "observed_status": "response:/fullName"}, "observed_status"),
        ({"order_id": "query:phone"}, "order_id"),
        ({"order_id": "header:Authorization"}, "order_id"),
        ({"order_id": "header:X-User-Id"}, "order_id"),
        ({"order_id": "response_header:Set-Cookie"}, "order_id"),
    ],
    ids=[
        "body-customer",
        "body-email",
        "response-name",
        "query-phone",
        "authorization",
        "user-id",
        "set-cookie",
    ],
)
def test_rules_may_not_read_personal_sources(rule: dict[str, str], field: str) -> None:
    """A rule that would export a personal key, a credential or the raw user id fails naming the rule."""
    doc = {"rule_sets": {"mine": [{"name": "r", "method": "PUT", "route": "/o/{id}", **rule}]}}
    with pytest.raises(ConfigError) as info:
        _load({**doc, **_listener_doc(rules="mine")})
    assert info.value.key == f"rule_sets.mine[0].{field}"
    inline = {"listeners": [{"upstream": MES, "rules": [{"name": "r", "route": "/o/{id}", **rule}]}]}
    with pytest.raises(ConfigError) as inline_info:
        _load(inline)
    assert inline_info.value.key == f"listeners[0].rules[0].{field}"


def test_custom_redact_keys_govern_rule_sources() -> None:
    """With redact_keys changed, a source is judged by the configured keys, not the defaults."""
    doc = {
        "privacy": {"redact_keys": ["engraving*"]},
        "listeners": [
            {"upstream": MES, "rules": [{"name": "r", "route": "/o/{id}", "order_id": "body:/customerRef"}]}
        ],
    }
    assert _load(doc).listeners[0].rules.rules[0].order_id is not None
    doc["privacy"] = {"redact_keys": ["customer*"]}
    with pytest.raises(ConfigError):
        _load(doc)
