"""Tests for config: flag > env > file > default for every option, errors naming their source, secrets."""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import pytest

from mes_trace_proxy.cli import read_default_rules
from mes_trace_proxy.config import (
    DEFAULT_ADMIN_LISTEN,
    DEFAULT_LISTEN,
    OPTIONS,
    Config,
    ConfigError,
    load_config,
)

DEFAULTS = read_default_rules()
MES = "http://mes.internal:8081"
USER_KEY = "user-id-key-0123456789abcdef-canary"
REDIS_PASSWORD = "redis-pa55word-canary"


def _load(
    *,
    flags: Mapping[str, object] | None = None,
    environ: Mapping[str, str] | None = None,
    file_doc: Mapping[str, object] | None = None,
    files: Mapping[str, bytes] | None = None,
) -> Config:
    """load_config with defaults; ``files`` backs the injected read_file."""
    known = dict(files or {})

    def read_file(path: str) -> bytes:
        if path not in known:
            raise FileNotFoundError(2, "No such file or directory", path)
        return known[path]

    return load_config(
        flags=flags or {},
        environ=environ or {},
        file_doc=file_doc,
        defaults=DEFAULTS,
        read_file=read_file,
    )


def _error(**kwargs: object) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        _load(**kwargs)  # type: ignore[arg-type]
    return info.value


# ── precedence, one row per option ──────────────────────────────────────────────────────────


@dataclass(frozen=True, slots=True, kw_only=True)
class OptionCase:
    """Values for one OPTIONS entry: one per source, one that is invalid, and how to read it back."""

    file_key: str
    file: object
    env: str
    flag: object
    invalid: object
    read: Callable[[Config], object]
    #: what ``read`` gives when no source sets the option; None when the option is required
    default: object = None
    #: what ``read`` gives for each of file/env/flag when it differs from the value itself
    expect: tuple[object, object, object] | None = None
    #: the document the sources are laid over, when the option needs company (TLS pairs)
    base: dict[str, object] | None = None


_PEM_CERT = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
_PEM_KEY = b"-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n"
KEYS = {
    "/keys/file": b"file-key-0123456789abcdef\n",
    "/keys/env": b"env-key-0123456789abcdef",
    "/keys/flag": b"flag-key-0123456789abcdef",
    **{f"/tls/{source}.crt": _PEM_CERT for source in ("file", "env", "flag", "pair")},
    **{f"/tls/{source}.key": _PEM_KEY for source in ("file", "env", "flag", "pair")},
    "/tls/not-pem": b"hello",
    "/tokens/file": b"viewer:file-token-0123456789\n",
    "/tokens/env": b"# two\nviewer:env-token-0123456789\nadmin:env-token-abcdefghij\n",
    "/tokens/flag": (
        b"viewer:flag-token-0123456789\nadmin:flag-token-abcdefghij\nadmin:flag-token-0000000000\n"
    ),
    "/tokens/bad": b"root:flag-token-0123456789\n",
}
_HTTPS_MES = "https://mes.internal:8443"

CASES: dict[str, OptionCase] = {
    "listen": OptionCase(
        file_key="listeners[0].listen",
        file="127.0.0.1:1001",
        env="127.0.0.1:1002",
        flag="127.0.0.1:1003",
        invalid="no-port",
        read=lambda c: str(c.listeners[0].listen),
        default=DEFAULT_LISTEN,
    ),
    "upstream": OptionCase(
        file_key="listeners[0].upstream",
        file="http://file.example:1",
        env="http://env.example:1",
        flag="http://flag.example:1",
        invalid="ftp://mes.internal",
        read=lambda c: c.listeners[0].upstream.url,
    ),
    "egress_listen": OptionCase(
        file_key="listeners[1].listen",
        file="127.0.0.1:2001",
        env="127.0.0.1:2002",
        flag="127.0.0.1:2003",
        invalid="127.0.0.1:99999",
        read=lambda c: str(c.listeners[1].listen),
    ),
    "egress_upstream": OptionCase(
        file_key="listeners[1].upstream",
        file="http://crm-file:1",
        env="http://crm-env:1",
        flag="http://crm-flag:1",
        invalid="crm.internal:8080",
        read=lambda c: c.listeners[1].upstream.url,
    ),
    "admin_listen": OptionCase(
        file_key="admin.listen",
        file="127.0.0.1:3001",
        env="127.0.0.1:3002",
        flag="[::1]:3003",
        invalid=":3004",
        read=lambda c: str(c.admin.listen),
        default=DEFAULT_ADMIN_LISTEN,
    ),
    "workers": OptionCase(
        file_key="server.workers",
        file=2,
        env="3",
        flag="4",
        invalid="0",
        read=lambda c: c.server.workers,
        default=1,
        expect=(2, 3, 4),
    ),
    "grace_period": OptionCase(
        file_key="server.grace_period",
        file="5s",
        env="1m",
        flag="500ms",
        invalid="soon",
        read=lambda c: c.server.grace_period,
        default=20.0,
        expect=(5.0, 60.0, 0.5),
    ),
    "log_level": OptionCase(
        file_key="server.log_level",
        file="debug",
        env="WARNING",
        flag="error",
        invalid="loud",
        read=lambda c: c.server.log_level,
        default="info",
        expect=("debug", "warning", "error"),
    ),
    "access_log": OptionCase(
        file_key="server.access_log",
        file=False,
        env="true",
        flag=False,
        invalid="maybe",
        read=lambda c: c.server.access_log,
        default=True,
        expect=(False, True, False),
    ),
    "user_id_key_file": OptionCase(
        file_key="privacy.user_id_key_file",
        file="/keys/file",
        env="/keys/env",
        flag="/keys/flag",
        invalid="/keys/missing",
        read=lambda c: c.privacy.user_id_key,
        expect=(b"file-key-0123456789abcdef", KEYS["/keys/env"], KEYS["/keys/flag"]),
    ),
    "state": OptionCase(
        file_key="watchdog.state",
        file="memory",
        env="sqlite:///var/lib/orders.db",
        flag="redis://redis:6379/0",
        invalid="mysql://db/orders",
        read=lambda c: c.watchdog.state,
        default="sqlite:///./mes-trace-proxy-orders.db",
    ),
    "check_interval": OptionCase(
        file_key="watchdog.check_interval",
        file="1s",
        env="2s",
        flag=3,
        invalid="0s",
        read=lambda c: c.watchdog.check_interval,
        default=10.0,
        expect=(1.0, 2.0, 3.0),
    ),
    "jaeger_url": OptionCase(
        file_key="watchdog.jaeger_url",
        file="http://jaeger-file:16686",
        env="https://jaeger-env:16686/",
        flag="http://jaeger-flag:16686",
        invalid="ftp://jaeger",
        read=lambda c: c.watchdog.jaeger_url,
        default="http://localhost:16686",
        expect=("http://jaeger-file:16686", "https://jaeger-env:16686", "http://jaeger-flag:16686"),
    ),
    "correlation": OptionCase(
        file_key="watchdog.correlation",
        file="off",
        env="trace-per-order",
        flag="link",
        invalid="sideways",
        read=lambda c: c.watchdog.correlation,
        default="link",
    ),
    "client_span": OptionCase(
        file_key="tracing.client_span",
        file="instrumentation",
        env="SDK",
        flag="instrumentation",
        invalid="contrib",
        read=lambda c: c.tracing.client_span,
        default="sdk",
        expect=("instrumentation", "sdk", "instrumentation"),
    ),
    "tls_cert": OptionCase(
        file_key="listeners[0].tls.cert_file",
        file="/tls/file.crt",
        env="/tls/env.crt",
        flag="/tls/flag.crt",
        invalid="/tls/not-pem",
        read=lambda c: c.listeners[0].tls.cert_file if c.listeners[0].tls else None,
        base={"listeners": [{"upstream": MES, "tls": {"key_file": "/tls/pair.key"}}]},
    ),
    "tls_key": OptionCase(
        file_key="listeners[0].tls.key_file",
        file="/tls/file.key",
        env="/tls/env.key",
        flag="/tls/flag.key",
        invalid="/tls/file.crt",
        read=lambda c: c.listeners[0].tls.key_file if c.listeners[0].tls else None,
        base={"listeners": [{"upstream": MES, "tls": {"cert_file": "/tls/pair.crt"}}]},
    ),
    "upstream_ca": OptionCase(
        file_key="listeners[0].upstream_tls.ca_file",
        file="/tls/file.crt",
        env="/tls/env.crt",
        flag="/tls/flag.crt",
        invalid="/tls/missing.crt",
        read=lambda c: c.listeners[0].upstream_tls.ca_file if c.listeners[0].upstream_tls else None,
        base={"listeners": [{"upstream": _HTTPS_MES}]},
    ),
    "upstream_cert": OptionCase(
        file_key="listeners[0].upstream_tls.cert_file",
        file="/tls/file.crt",
        env="/tls/env.crt",
        flag="/tls/flag.crt",
        invalid="/tls/file.key",
        read=lambda c: c.listeners[0].upstream_tls.cert_file if c.listeners[0].upstream_tls else None,
        base={"listeners": [{"upstream": _HTTPS_MES, "upstream_tls": {"key_file": "/tls/pair.key"}}]},
    ),
    "upstream_key": OptionCase(
        file_key="listeners[0].upstream_tls.key_file",
        file="/tls/file.key",
        env="/tls/env.key",
        flag="/tls/flag.key",
        invalid="/tls/not-pem",
        read=lambda c: c.listeners[0].upstream_tls.key_file if c.listeners[0].upstream_tls else None,
        base={"listeners": [{"upstream": _HTTPS_MES, "upstream_tls": {"cert_file": "/tls/pair.crt"}}]},
    ),
    "max_body_size": OptionCase(
        file_key="listeners[0].limits.max_body_size",
        file="2MiB",
        env="3000",
        flag="0",
        invalid="huge",
        read=lambda c: c.listeners[0].limits.max_body_size,
        default=1024**3,
        expect=(2 * 1024**2, 3000, None),
    ),
    "max_connections": OptionCase(
        file_key="listeners[0].limits.max_connections",
        file=10,
        env="20",
        flag="30",
        invalid="0",
        read=lambda c: c.listeners[0].limits.max_connections,
        default=4096,
        expect=(10, 20, 30),
    ),
    "admin_token_file": OptionCase(
        file_key="admin.tokens_file",
        file="/tokens/file",
        env="/tokens/env",
        flag="/tokens/flag",
        invalid="/tokens/bad",
        read=lambda c: len(c.admin.tokens.entries),
        default=0,
        expect=(1, 2, 3),
    ),
    "underscore_lookalikes": OptionCase(
        file_key="listeners[0].underscore_lookalikes",
        file="refuse",
        env="DROP",
        flag="refuse",
        invalid="pass",
        read=lambda c: c.listeners[0].underscore_lookalikes.value,
        default="drop",
        expect=("refuse", "drop", "refuse"),
    ),
    "underscore_headers": OptionCase(
        file_key="listeners[0].underscore_headers",
        file="drop",
        env="Refuse",
        flag="pass",
        invalid="strip",
        read=lambda c: c.listeners[0].underscore_headers.value,
        default="pass",
        expect=("drop", "refuse", "pass"),
    ),
    "trusted_callers": OptionCase(
        file_key="privacy.trusted_callers",
        file=["10.0.0.0/8"],
        env="192.168.0.0/16, 127.0.0.1",
        flag="*",
        invalid="10.0.0.0/33",
        read=lambda c: c.privacy.trusted_callers,
        default=("*",),
        expect=(("10.0.0.0/8",), ("192.168.0.0/16", "127.0.0.1"), ("*",)),
    ),
    "amqp_url": OptionCase(
        file_key="messages.amqp_url",
        file="amqp://mes-trace-proxy@file.rabbit:5672/mes",
        env="amqp://env.rabbit:5672/",
        flag="amqps://flag.rabbit:5671/mes",
        invalid="http://rabbit.internal/",
        read=lambda c: c.messages.amqp_url,
        base={"listeners": [{"upstream": MES}], "messages": {"dead_letter_queues": ["mes.dead-letters"]}},
    ),
    "observe_dead_letter_exchange": OptionCase(
        file_key="messages.observe_exchange",
        file="mes.dlx.file",
        env="mes.dlx.env",
        flag="mes.dlx.flag",
        invalid="x" * 256,  # AMQP names are at most 255 bytes
        read=lambda c: c.messages.observe_exchange,
        base={"listeners": [{"upstream": MES}], "messages": {"amqp_url": "amqp://rabbit:5672/"}},
    ),
}
OPTION_BY_DEST = {option.dest: option for option in OPTIONS}
BASE_DOC: dict[str, object] = {
    "listeners": [
        {"upstream": MES},
        {"listen": "127.0.0.1:8090", "upstream": "http://crm.internal:8080"},
    ]
}


def _with(doc: dict[str, object], path: tuple[str | int, ...], value: object) -> dict[str, object]:
    out = copy.deepcopy(doc)
    node: object = out
    for part in path[:-1]:
        if isinstance(part, int):
            assert isinstance(node, list)
            node = node[part]
        else:
            assert isinstance(node, dict)
            node = node.setdefault(part, {})
    assert isinstance(node, dict)
    node[path[-1]] = value
    return out


def test_the_table_covers_every_option() -> None:
    """Every option in config.OPTIONS has a precedence row here, so a new option cannot go untested."""
    assert set(CASES) == set(OPTION_BY_DEST)


@pytest.mark.parametrize("dest", sorted(CASES))
def test_precedence_flag_env_file_default(dest: str) -> None:
    """For each option the flag beats the env var, which beats the file, which beats the default."""
    case, option = CASES[dest], OPTION_BY_DEST[dest]
    file_doc = _with(case.base or BASE_DOC, option.path, case.file)
    expect = case.expect or (case.file, case.env, case.flag)
    env = {option.env: case.env}
    flags = {option.dest: case.flag}
    assert case.read(_load(file_doc=file_doc, files=KEYS)) == expect[0]
    assert case.read(_load(file_doc=file_doc, environ=env, files=KEYS)) == expect[1]
    assert case.read(_load(file_doc=file_doc, environ=env, flags=flags, files=KEYS)) == expect[2]
    if case.default is not None:
        assert case.read(_load(file_doc=BASE_DOC)) == case.default


@pytest.mark.parametrize("source", ["file", "env", "flag"])
@pytest.mark.parametrize("dest", sorted(CASES))
def test_invalid_value_names_its_source(dest: str, source: str) -> None:
    """An invalid value is blamed on exactly the flag, env var or file key that supplied it."""
    case, option = CASES[dest], OPTION_BY_DEST[dest]
    # The lower-precedence sources hold valid values, to prove the winner alone is blamed.
    file_doc = _with(case.base or BASE_DOC, option.path, case.invalid if source == "file" else case.file)
    environ = {option.env: str(case.invalid if source == "env" else case.env)} if source != "file" else {}
    flags = {option.dest: case.invalid} if source == "flag" else {}
    error = _error(file_doc=file_doc, environ=environ, flags=flags, files=KEYS)
    assert error.key == {"file": case.file_key, "env": option.env, "flag": option.flag}[source]


@pytest.mark.parametrize(
    ("environ", "flags", "queues", "blamed"),
    [
        ({"MES_PROXY_DEAD_LETTER_QUEUES": "a, b"}, {}, ("a", "b"), None),
        ({"MES_PROXY_DEAD_LETTER_QUEUES": "a"}, {"dead_letter_queue": ["c", "d"]}, ("c", "d"), None),
        ({}, {"dead_letter_queue": ["c", "c"]}, None, "--dead-letter-queue"),
        ({"MES_PROXY_DEAD_LETTER_QUEUES": "a,a"}, {}, None, "MES_PROXY_DEAD_LETTER_QUEUES"),
    ],
)
def test_dead_letter_queues_from_the_flag_or_the_variable(
    environ: dict[str, str], flags: dict[str, object], queues: tuple[str, ...] | None, blamed: str | None
) -> None:
    """The repeated flag beats the comma list of the variable, which beats the file's list."""
    doc = _with(BASE_DOC, ("messages",), {"amqp_url": "amqp://rabbit/", "dead_letter_queues": ["file"]})
    if blamed is not None:
        assert _error(file_doc=doc, environ=environ, flags=flags).key == blamed
        return
    assert _load(file_doc=doc, environ=environ, flags=flags).messages.dead_letter_queues == queues


def test_the_amqp_password_never_shows_in_the_description() -> None:
    """/config and check-config show the AMQP URL without its password."""
    doc = _with(
        BASE_DOC, ("messages",), {"amqp_url": "amqp://proxy:s3cret@rabbit/", "dead_letter_queues": ["q"]}
    )
    described = _load(file_doc=doc).describe()
    assert "s3cret" not in repr(described)
    assert described["messages"]["amqp_url"] == "amqp://proxy:***@rabbit/"  # type: ignore[index]


def test_empty_env_value_is_unset() -> None:
    """An env var set to "" does not override the file (a blank compose entry is not a value)."""
    config = _load(file_doc=BASE_DOC, environ={"MES_PROXY_LISTEN": ""})
    assert str(config.listeners[0].listen) == DEFAULT_LISTEN


def test_defaults_without_a_file() -> None:
    """Only --upstream is needed: one ingress listener with the mes rules, the documented defaults."""
    config = _load(flags={"upstream": MES})
    assert len(config.listeners) == 1
    ingress = config.listeners[0]
    assert (ingress.name, ingress.rule_set, str(ingress.listen)) == ("ingress", "mes", DEFAULT_LISTEN)
    assert ingress.upstream.host_header == "mes.internal:8081"
    assert (ingress.timeouts.connect, ingress.timeouts.read, ingress.timeouts.total) == (5.0, 60.0, None)
    assert ingress.inspect_body_limit == 64 * 1024
    assert ingress.trace_id_header == "X-Trace-Id"
    assert config.privacy.user_id_key is None
    assert config.lifecycle.dwell_limits["SUBMITTED"] == 15 * 60
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.admin = config.admin  # type: ignore[misc]


def test_egress_listener_from_flags() -> None:
    """--egress-listen with --egress-upstream adds the egress listener with the crm rules."""
    config = _load(
        flags={"upstream": MES, "egress_listen": "127.0.0.1:8090", "egress_upstream": "http://crm:8080/base/"}
    )
    egress = config.listeners[1]
    assert (egress.name, egress.rule_set, str(egress.listen)) == ("egress", "crm", "127.0.0.1:8090")
    assert (egress.upstream.host, egress.upstream.port, egress.upstream.base_path) == ("crm", 8080, "/base")
    match = egress.rules.match("PUT", "/api/orders/A-1/price")
    assert match is not None
    assert match.rule.name == "price-reported"


@pytest.mark.parametrize(
    ("flags", "environ", "key"),
    [
        pytest.param({}, {}, "--upstream / MES_PROXY_UPSTREAM / listeners[0].upstream", id="upstream"),
        pytest.param(
            {"upstream": MES, "egress_listen": "127.0.0.1:8090"},
            {},
            "--egress-upstream / MES_PROXY_EGRESS_UPSTREAM / listeners[1].upstream",
            id="egress-upstream",
        ),
        pytest.param(
            {"upstream": MES},
            {"MES_PROXY_EGRESS_UPSTREAM": "http://crm:8080"},
            "--egress-listen / MES_PROXY_EGRESS_LISTEN / listeners[1].listen",
            id="egress-listen",
        ),
    ],
)
def test_missing_required_value_names_every_way_to_set_it(
    flags: dict[str, object], environ: dict[str, str], key: str
) -> None:
    """A missing upstream or egress address names the flag, the env var and the file key."""
    assert _error(flags=flags, environ=environ).key == key


UPSTREAM_ERRORS: tuple[tuple[str, str, str], ...] = (
    ("ftp", "ftp://mes.internal", "http:// or https://"),
    ("no-scheme", "mes.internal:8081", "http:// or https://"),
    ("ws", "ws://mes.internal", "http:// or https://"),
    ("no-host", "http://", "no host"),
    ("credentials", "http://svc:hunter2@mes.internal", "credentials"),
    ("user-only", "http://svc@mes.internal", "credentials"),
    ("query", "http://mes.internal/?x=1", "no query"),
    ("fragment", "http://mes.internal/#x", "no query"),
    ("bad-port", "http://mes.internal:99999", "invalid port"),
    ("port-zero", "http://mes.internal:0", "invalid port"),
)


@pytest.mark.parametrize(
    ("url", "message"), [c[1:] for c in UPSTREAM_ERRORS], ids=[c[0] for c in UPSTREAM_ERRORS]
)
def test_bad_upstreams(url: str, message: str) -> None:
    """Only plain http(s) upstream URLs are accepted; credentials are refused, not logged."""
    error = _error(flags={"upstream": url})
    assert error.key == "--upstream"
    assert message in error.message
    assert "hunter2" not in str(error)


@pytest.mark.parametrize(
    ("url", "scheme", "port", "host_header"),
    [
        pytest.param("http://mes", "http", 80, "mes", id="http-default-port"),
        pytest.param("https://mes", "https", 443, "mes", id="https-default-port"),
        pytest.param("https://mes:8443", "https", 8443, "mes:8443", id="https-port"),
        pytest.param("http://[::1]:8081", "http", 8081, "[::1]:8081", id="ipv6"),
    ],
)
def test_upstream_parts(url: str, scheme: str, port: int, host_header: str) -> None:
    """An upstream URL gives its scheme, port (default per scheme) and Host value."""
    upstream = _load(flags={"upstream": url}).listeners[0].upstream
    assert (upstream.scheme, upstream.port, upstream.host_header) == (scheme, port, host_header)


@pytest.mark.parametrize(
    ("flags", "file_doc", "key", "other"),
    [
        pytest.param(
            {"upstream": MES, "listen": "127.0.0.1:9901"},
            None,
            "admin.listen",
            "--listen",
            id="admin-vs-listen",
        ),
        pytest.param(
            {"upstream": MES, "egress_listen": "127.0.0.1:8080", "egress_upstream": MES},
            None,
            "--egress-listen",
            "listeners[0].listen",
            id="egress-vs-default-listen",
        ),
        pytest.param(
            {},
            {
                "listeners": [
                    {"listen": "[::1]:8080", "upstream": MES},
                    {"name": "b", "listen": "[::1]:8080", "upstream": MES},
                ]
            },
            "listeners[1].listen",
            "listeners[0].listen",
            id="file-ipv6",
        ),
    ],
)
def test_duplicate_listen_addresses(
    flags: dict[str, object], file_doc: dict[str, object] | None, key: str, other: str
) -> None:
    """Two listeners on one address fail naming both."""
    error = _error(flags=flags, file_doc=file_doc)
    assert error.key == key
    assert other in error.message


def test_port_zero_may_repeat() -> None:
    """Port 0 (the OS picks) never collides, so tests can ask for it everywhere."""
    config = _load(flags={"upstream": MES, "listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0"})
    assert config.listeners[0].listen.port == config.admin.listen.port == 0


def _one(**fields: object) -> dict[str, object]:
    """A file with one ingress listener holding ``fields``."""
    return {"listeners": [{"upstream": MES, **fields}]}


FILE_ERRORS: tuple[tuple[str, object, str], ...] = (
    ("unknown-top-level", {"listener": []}, "listener"),
    ("unknown-section-key", {"server": {"threads": 4}}, "server.threads"),
    ("unknown-watchdog-key", {"watchdog": {"interval": "1s"}}, "watchdog.interval"),
    ("unknown-tracing-key", {"tracing": {"exporter": "otlp"}}, "tracing.exporter"),
    ("tracing-not-mapping", {"tracing": "sdk"}, "tracing"),
    ("unknown-listener-key", _one(upstreams=[]), "listeners[0].upstreams"),
    ("unknown-timeout-key", _one(timeouts={"idle": "1s"}), "listeners[0].timeouts.idle"),
    ("section-not-mapping", {"server": ["workers"]}, "server"),
    ("listeners-empty", {"listeners": []}, "listeners"),
    ("listeners-mapping", {"listeners": {"upstream": MES}}, "listeners"),
    ("listener-not-mapping", {"listeners": ["http://mes"]}, "listeners[0]"),
    (
        "duplicate-listener-name",
        {"listeners": [{"upstream": MES}, {"name": "ingress", "listen": "127.0.0.1:1", "upstream": MES}]},
        "listeners[1].name",
    ),
    ("unknown-rule-set", _one(rules="erp"), "listeners[0].rules"),
    ("bad-inline-rules", _one(rules=[{"route": "x"}]), "listeners[0].rules[0].route"),
    ("bad-rule-set", {"rule_sets": {"mes": [{"route": "/o/{id}", "sample": 2}]}}, "rule_sets.mes[0].sample"),
    ("rule-sets-not-mapping", {"rule_sets": ["mes"]}, "rule_sets"),
    ("bad-host-header", _one(host_header="client"), "listeners[0].host_header"),
    ("bad-trace-id-header", _one(trace_id_header="X Trace"), "listeners[0].trace_id_header"),
    ("trace-id-header-number", _one(trace_id_header=5), "listeners[0].trace_id_header"),
    ("bad-body-limit", _one(inspect_body_limit="lots"), "listeners[0].inspect_body_limit"),
    ("bad-timeout", _one(timeouts={"read": "-1s"}), "listeners[0].timeouts.read"),
    ("infinite-timeout", _one(timeouts={"read": float("inf")}), "listeners[0].timeouts.read"),
    ("nan-interval", {"watchdog": {"check_interval": float("nan")}}, "watchdog.check_interval"),
    ("bad-forwarded", _one(forwarded_headers="sometimes"), "listeners[0].forwarded_headers"),
    ("bad-user-header", {"privacy": {"user_id_header": "X User"}}, "privacy.user_id_header"),
    ("service-name-empty", {"service": {"name": ""}}, "service.name"),
    ("service-namespace-list", {"service": {"namespace": ["a"]}}, "service.namespace"),
    ("zero-retention", {"watchdog": {"retention": 0}}, "watchdog.retention"),
    ("statuses-empty", {"lifecycle": {"statuses": []}}, "lifecycle.statuses"),
    ("terminal-unknown", {"lifecycle": {"terminal": ["DONE"]}}, "lifecycle.terminal"),
    (
        "dwell-unknown-status",
        {"lifecycle": {"dwell_limits": {"ON_HOLD": "1h"}}},
        "lifecycle.dwell_limits.ON_HOLD",
    ),
    (
        "dwell-terminal-status",
        {"lifecycle": {"dwell_limits": {"CLOSED": "1h"}}},
        "lifecycle.dwell_limits.CLOSED",
    ),
    ("dwell-zero", {"lifecycle": {"dwell_limits": {"SUBMITTED": "0s"}}}, "lifecycle.dwell_limits.SUBMITTED"),
    ("dwell-not-mapping", {"lifecycle": {"dwell_limits": ["SUBMITTED=1m"]}}, "lifecycle.dwell_limits"),
)


@pytest.mark.parametrize(("file_doc", "key"), [c[1:] for c in FILE_ERRORS], ids=[c[0] for c in FILE_ERRORS])
def test_file_errors_name_the_key(file_doc: dict[str, object], key: str) -> None:
    """Every invalid config-file value fails with a ConfigError naming its key."""
    flags = {} if "listeners" in file_doc else {"upstream": MES}
    assert _error(flags=flags, file_doc=file_doc).key == key


@pytest.mark.parametrize(
    ("file_doc", "flags", "environ", "key"),
    [
        pytest.param(
            {"listeners": {"a": 1}}, {"listen": "127.0.0.1:1"}, {}, "listeners", id="listeners-mapping"
        ),
        pytest.param(
            {"listeners": ["x"]}, {"listen": "127.0.0.1:1"}, {}, "listeners[0]", id="listener-string"
        ),
        pytest.param(
            {"admin": [1]}, {"upstream": MES, "admin_listen": "127.0.0.1:1"}, {}, "admin", id="admin"
        ),
        pytest.param(
            {"lifecycle": {"dwell_limits": [1]}},
            {"upstream": MES},
            {"MES_PROXY_DWELL_LIMITS": "SUBMITTED=1m"},
            "lifecycle.dwell_limits",
            id="dwell-limits-list",
        ),
    ],
)
def test_override_into_a_malformed_file_names_the_file_key(
    file_doc: dict[str, object], flags: dict[str, object], environ: dict[str, str], key: str
) -> None:
    """A flag or env var set under a file key of the wrong type blames that key (no AssertionError)."""
    assert _error(file_doc=file_doc, flags=flags, environ=environ).key == key


def test_null_sections_take_overrides() -> None:
    """``listeners: null`` or ``admin:`` left empty in YAML take flag values like absent keys."""
    config = _load(
        file_doc={"listeners": None, "admin": None, "lifecycle": None},
        flags={"upstream": MES, "admin_listen": "127.0.0.1:1"},
        environ={"MES_PROXY_DWELL_LIMITS": "SUBMITTED=1m"},
    )
    assert config.admin.listen.port == 1
    assert config.lifecycle.dwell_limits["SUBMITTED"] == 60.0


def test_top_level_must_be_a_mapping() -> None:
    """A config file whose top level is a list is refused, naming the file."""
    with pytest.raises(ConfigError) as info:
        load_config(flags={}, environ={}, file_doc=[1], defaults=DEFAULTS)  # type: ignore[arg-type]
    assert info.value.key == "config file"


# ── dwell limits ──────────────────────────────────────────────────────────────────────────


def test_dwell_limit_flag_is_repeatable_and_beats_env_and_file() -> None:
    """--dwell-limit values override MES_PROXY_DWELL_LIMITS, which overrides lifecycle.dwell_limits."""
    config = _load(
        file_doc={"lifecycle": {"dwell_limits": {"SUBMITTED": "1m", "PACKAGING": "1m", "SHIPPED": "1m"}}},
        environ={"MES_PROXY_DWELL_LIMITS": "SUBMITTED=2m, PACKAGING=2m,,"},
        flags={
            "upstream": MES,
            "dwell_limit": ["SUBMITTED=3m", "MANUFACTURING_STARTED=500ms,PRICE_CALCULATED=1d"],
        },
    )
    limits = config.lifecycle.dwell_limits
    assert limits["SHIPPED"] == 60.0
    assert limits["PACKAGING"] == 120.0
    assert limits["SUBMITTED"] == 180.0
    assert limits["MANUFACTURING_STARTED"] == 0.5
    assert limits["PRICE_CALCULATED"] == 86400.0
    # Untouched reference limits stay.
    assert limits["MANUFACTURING_APPROVED"] == 2 * 3600.0


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        pytest.param("500ms", 0.5, id="ms"),
        pytest.param("30s", 30.0, id="s"),
        pytest.param("15m", 900.0, id="m"),
        pytest.param("2h", 7200.0, id="h"),
        pytest.param("14d", 14 * 86400.0, id="d"),
        pytest.param("90", 90.0, id="bare-seconds"),
        pytest.param("1.5h", 5400.0, id="fraction"),
    ],
)
def test_dwell_limit_units(text: str, seconds: float) -> None:
    """MES_PROXY_DWELL_LIMITS takes the documented duration units."""
    config = _load(flags={"upstream": MES}, environ={"MES_PROXY_DWELL_LIMITS": f"SUBMITTED={text}"})
    assert config.lifecycle.dwell_limits["SUBMITTED"] == seconds


@pytest.mark.parametrize("source", ["env", "flag"])
@pytest.mark.parametrize(
    "text",
    [
        pytest.param("SUBMITTED", id="no-equals"),
        pytest.param("=15m", id="no-status"),
        pytest.param("SUBMITTED=", id="no-duration"),
        pytest.param("SUBMITTED=soon", id="bad-duration"),
        pytest.param("SUBMITTED=15w", id="bad-unit"),
        pytest.param("SUBMITTED=-1m", id="negative"),
        pytest.param("SUBMITTED=0s", id="zero"),
        pytest.param("ON_HOLD=1h", id="unknown-status"),
        pytest.param("CLOSED=1h", id="terminal-status"),
        pytest.param("SUBMITTED=1m,PACKAGING", id="second-item-bad"),
    ],
)
def test_dwell_limit_errors_name_their_source(text: str, source: str) -> None:
    """A bad dwell limit is blamed on MES_PROXY_DWELL_LIMITS or --dwell-limit, whichever gave it."""
    if source == "env":
        error = _error(flags={"upstream": MES}, environ={"MES_PROXY_DWELL_LIMITS": text})
        assert error.key == "MES_PROXY_DWELL_LIMITS"
    else:
        error = _error(flags={"upstream": MES, "dwell_limit": ["PACKAGING=1h", text]})
        assert error.key == "--dwell-limit"


def test_dwell_limit_flag_must_be_a_list() -> None:
    """The dwell_limit flag value is the argparse append list, nothing else."""
    assert _error(flags={"upstream": MES, "dwell_limit": "SUBMITTED=1m"}).key == "--dwell-limit"


# ── the user-id key and other secrets ─────────────────────────────────────────────────────


def test_user_id_key_from_env() -> None:
    """MES_PROXY_USER_ID_KEY is the key itself."""
    config = _load(flags={"upstream": MES}, environ={"MES_PROXY_USER_ID_KEY": USER_KEY})
    assert config.privacy.user_id_key == USER_KEY.encode()
    assert config.privacy.user_id_key_source == "MES_PROXY_USER_ID_KEY"


def test_user_id_key_file_is_read_and_stripped() -> None:
    """A key file is read through the injected reader and its trailing newline dropped."""
    config = _load(file_doc={**BASE_DOC, "privacy": {"user_id_key_file": "/keys/file"}}, files=KEYS)
    assert config.privacy.user_id_key == b"file-key-0123456789abcdef"
    assert config.privacy.user_id_key_source == "privacy.user_id_key_file"


def test_env_key_beats_a_key_file_named_in_the_file() -> None:
    """The env var key (env) wins over a key file named only in the config file (file)."""
    config = _load(
        file_doc={**BASE_DOC, "privacy": {"user_id_key_file": "/keys/missing"}},
        environ={"MES_PROXY_USER_ID_KEY": USER_KEY},
    )
    assert config.privacy.user_id_key == USER_KEY.encode()


def test_key_file_flag_beats_env_key() -> None:
    """--user-id-key-file (flag) wins over MES_PROXY_USER_ID_KEY (env)."""
    config = _load(
        flags={"upstream": MES, "user_id_key_file": "/keys/flag"},
        environ={"MES_PROXY_USER_ID_KEY": USER_KEY},
        files=KEYS,
    )
    assert config.privacy.user_id_key == KEYS["/keys/flag"]
    assert config.privacy.user_id_key_source == "--user-id-key-file"


@pytest.mark.parametrize(
    ("flags", "environ", "key"),
    [
        pytest.param({}, {"MES_PROXY_USER_ID_KEY": "short"}, "MES_PROXY_USER_ID_KEY", id="env-short"),
        pytest.param({"user_id_key_file": "/keys/short"}, {}, "--user-id-key-file", id="file-short"),
        pytest.param(
            {}, {"MES_PROXY_USER_ID_KEY_FILE": "/keys/short"}, "MES_PROXY_USER_ID_KEY_FILE", id="env-file"
        ),
    ],
)
def test_short_user_id_key_is_refused(flags: dict[str, object], environ: dict[str, str], key: str) -> None:
    """A key under 16 bytes (after stripping) is refused, naming where it came from, without echoing it."""
    error = _error(
        flags={"upstream": MES, **flags}, environ=environ, files={"/keys/short": b"  0123456789abc \n"}
    )
    assert error.key == key
    assert "16 bytes" in error.message
    assert "0123456789abc" not in str(error)
    assert "short" not in error.message


def test_key_files_need_a_reader() -> None:
    """Without read_file, load_config refuses to read a key file instead of touching the disk."""
    with pytest.raises(ConfigError) as info:
        load_config(
            flags={"upstream": MES, "user_id_key_file": "/keys/file"},
            environ={},
            file_doc=None,
            defaults=DEFAULTS,
        )
    assert info.value.key == "--user-id-key-file"


@pytest.mark.parametrize(
    ("state", "hidden"),
    [
        pytest.param(f"redis://:{REDIS_PASSWORD}@redis:6379/0", REDIS_PASSWORD, id="password-only"),
        pytest.param(f"redis://default:{REDIS_PASSWORD}@redis:6379/0", REDIS_PASSWORD, id="user-password"),
        pytest.param(f"rediss://u:{REDIS_PASSWORD}@x@redis:6379/0", REDIS_PASSWORD, id="at-in-password"),
        pytest.param(f"redis://redis:6379/0?password={REDIS_PASSWORD}", REDIS_PASSWORD, id="query-password"),
    ],
)
def test_describe_masks_secrets(state: str, hidden: str) -> None:
    """check-config's dump never contains the user-id key or a Redis password."""
    config = _load(
        flags={"upstream": MES, "state": state, "jaeger_url": f"http://ops:{REDIS_PASSWORD}@jaeger:16686"},
        environ={"MES_PROXY_USER_ID_KEY": USER_KEY},
    )
    dump = json.dumps(config.describe())
    assert USER_KEY not in dump
    assert hidden not in dump
    assert "redis" in dump
    assert "***" in dump
    assert USER_KEY not in repr(config)


def test_describe_is_plain_json() -> None:
    """describe() holds only JSON types and echoes the effective listeners."""
    config = _load(file_doc=BASE_DOC)
    described = config.describe()
    assert json.loads(json.dumps(described)) == described
    listeners = described["listeners"]
    assert isinstance(listeners, list)
    assert [item["name"] for item in listeners] == ["ingress", "egress"]


def test_custom_lifecycle_without_entry_uses_its_own_first_statuses(default_rules: dict[str, object]) -> None:
    """A lifecycle of the user's own needs no 'entry' or 'terminal': sensible defaults follow from it."""
    config = load_config(
        flags={"upstream": "http://mes:8080"},
        environ={},
        file_doc={"lifecycle": {"statuses": ["NEW", "MADE", "SENT"], "cancel": "VOID"}},
        defaults=default_rules,
    )
    assert config.lifecycle.entry_statuses == frozenset({"NEW", "MADE"})
    assert config.lifecycle.terminal == frozenset()


@pytest.mark.parametrize(
    ("url", "host_header", "origin"),
    [
        ("http://mes:8080", "mes:8080", "http://mes:8080"),
        ("http://mes:80/base", "mes", "http://mes/base"),
        ("https://mes:443", "mes", "https://mes"),
        ("https://mes:80", "mes:80", "https://mes:80"),
        ("http://[::1]:8081", "[::1]:8081", "http://[::1]:8081"),
    ],
)
def test_upstream_host_and_origin_are_formatted_once(url: str, host_header: str, origin: str) -> None:
    """Host drops the scheme's default port; origin is what url.full starts with."""
    upstream = _load(flags={"upstream": url}).listeners[0].upstream
    assert (upstream.host_header, upstream.origin) == (host_header, origin)
