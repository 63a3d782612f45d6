"""Tests for config.sections: each section parser on a merged document, without the whole loader."""

from __future__ import annotations

import pytest

from mes_trace_proxy.config.model import ConfigError, HostPort
from mes_trace_proxy.config.options import DEFAULT_LIMITS
from mes_trace_proxy.config.overlay import _Doc
from mes_trace_proxy.config.sections import (
    _admin,
    _lifecycle,
    _limits,
    _listener,
    _pem_file,
    _rule_sets,
    _server_tls,
)
from mes_trace_proxy.rules import CompiledRules

ADMIN = HostPort(host="127.0.0.1", port=9901)
CERT = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
KEY = b"-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n"


def _files(**known: bytes) -> object:
    def read_file(path: str) -> bytes:
        if path not in known:
            raise FileNotFoundError(2, "No such file or directory", path)
        return known[path]

    return read_file


def _error(call: object, *args: object) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        call(*args)  # type: ignore[operator]
    return info.value


def test_listener_defaults_and_names() -> None:
    """The first listener takes the default address, the 'mes' rules and the name 'ingress'."""
    rules = {"mes": CompiledRules([])}
    listener = _listener(_Doc({}), 0, {"upstream": "http://mes:8081"}, rules)
    assert (listener.name, listener.rule_set, str(listener.listen)) == ("ingress", "mes", "127.0.0.1:8080")
    assert listener.limits == DEFAULT_LIMITS
    assert (listener.timeouts.connect, listener.timeouts.read, listener.timeouts.total) == (5.0, 60.0, None)


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        pytest.param(
            {"listen": "127.0.0.1:1"},
            "--egress-upstream / MES_PROXY_EGRESS_UPSTREAM / listeners[1].upstream",
            id="no-upstream",
        ),
        pytest.param(
            {"upstream": "http://x"},
            "--egress-listen / MES_PROXY_EGRESS_LISTEN / listeners[1].listen",
            id="later-listener-needs-listen",
        ),
        pytest.param(
            {"upstream": "http://x", "listen": "h:1", "rules": "nope"},
            "listeners[1].rules",
            id="unknown-rule-set",
        ),
        pytest.param(
            {"upstream": "http://x", "listen": "h:1", "colour": 1}, "listeners[1].colour", id="unknown-key"
        ),
        pytest.param(
            {"upstream": "http://x", "listen": "h:1", "timeouts": {"idle": 1}},
            "listeners[1].timeouts.idle",
            id="timeouts-key",
        ),
        pytest.param(
            {"upstream": "http://x", "listen": "h:1", "host_header": "x"},
            "listeners[1].host_header",
            id="host-header",
        ),
        pytest.param(
            {"upstream": "http://x", "listen": "h:1", "trace_id_header": "a b"},
            "listeners[1].trace_id_header",
            id="trace-header",
        ),
    ],
)
def test_listener_errors_name_the_key(raw: dict[str, object], key: str) -> None:
    """Every listener problem names its key."""
    assert _error(_listener, _Doc({}), 1, raw, {"crm": CompiledRules([])}).key == key


def test_limits_zero_body_size_means_no_limit() -> None:
    """max_body_size 0 turns the limit off; other limits must be positive."""
    limits = _limits(_Doc({}), {"limits": {"max_body_size": 0, "max_headers": 7}}, ("listeners", 0))
    assert (limits.max_body_size, limits.max_headers) == (None, 7)
    error = _error(_limits, _Doc({}), {"limits": {"idle_timeout": "0s"}}, ("listeners", 0))
    assert error.key == "listeners[0].limits.idle_timeout"


def test_pem_files_are_checked_when_readable() -> None:
    """A certificate file must hold a certificate; a key file an unencrypted key."""
    read = _files(**{"c.pem": CERT, "k.pem": KEY})
    path = ("listeners", 0, "tls", "cert_file")
    assert _pem_file(_Doc({}), {"cert_file": "c.pem"}, path, "certificate", read) == "c.pem"  # type: ignore[arg-type]
    error = _error(_pem_file, _Doc({}), {"cert_file": "k.pem"}, path, "certificate", read)
    assert (error.key, "no PEM certificate" in error.message) == ("listeners[0].tls.cert_file", True)
    # Without a reader (explain, tests) the path is taken as it is.
    assert _pem_file(_Doc({}), {"cert_file": "absent.pem"}, path, "certificate", None) == "absent.pem"


def test_server_tls_needs_both_files() -> None:
    """cert_file without key_file names key_file."""
    raw = {"tls": {"cert_file": "c.pem"}}
    error = _error(_server_tls, _Doc({}), raw, ("listeners", 0), _files(**{"c.pem": CERT}))
    assert error.key == "listeners[0].tls.key_file"


def test_admin_tokens_need_a_reader() -> None:
    """Without file access, a tokens file is refused naming the key; none at all is fine."""
    assert _admin(_Doc({}), {}, ADMIN, None).tokens_file is None
    assert _error(_admin, _Doc({}), {"tokens_file": "t"}, ADMIN, None).key == "admin.tokens_file"


def test_rule_sets_merge_defaults_and_name_bad_rules() -> None:
    """The file's rule sets join the defaults; a broken one is named by its set."""
    sets = _rule_sets(_Doc({"rule_sets": {"own": []}}), {"rule_sets": {"mes": []}})
    assert set(sets) == {"mes", "own"}
    error = _error(_rule_sets, _Doc({"rule_sets": {"own": "x"}}), {})
    assert error.key.startswith("rule_sets.own")


def test_lifecycle_of_ones_own() -> None:
    """Own statuses drop the reference dwell limits; a terminal status may have no limit."""
    lifecycle = _lifecycle(_Doc({"lifecycle": {"statuses": ["A", "B"], "dwell_limits": {"A": "1m"}}}))
    assert dict(lifecycle.dwell_limits) == {"A": 60.0}
    doc = _Doc({"lifecycle": {"statuses": ["A", "B"], "terminal": ["B"], "dwell_limits": {"B": "1m"}}})
    assert _error(_lifecycle, doc).key == "lifecycle.dwell_limits.B"


@pytest.mark.parametrize(
    ("doc", "key"),
    [
        pytest.param(
            {"listeners": [{"trace_id_header": "X-Trace-Id\n"}]},
            "listeners[0].trace_id_header",
            id="trace-id",
        ),
        pytest.param({"privacy": {"user_id_header": "X-User-Id\n"}}, "privacy.user_id_header", id="user-id"),
    ],
)
def test_a_header_name_with_a_trailing_newline_is_refused(doc: dict[str, object], key: str) -> None:
    """A header name is one whole token: "X-Id\\n" passed the old "^...$" check (re.match)."""
    from mes_trace_proxy.cli import read_default_rules
    from mes_trace_proxy.config import load_config

    listeners = doc.get("listeners", [{}])
    assert isinstance(listeners, list)
    file_doc = {**doc, "listeners": [{"upstream": "http://mes:8081", **listeners[0]}]}
    with pytest.raises(ConfigError) as info:
        load_config(flags={}, environ={}, file_doc=file_doc, defaults=read_default_rules())
    assert info.value.key == key
