"""Tests for config.overlay: the merged document, its precedence and whom it blames for a key."""

from __future__ import annotations

import pytest

from mes_trace_proxy.config.model import ConfigError
from mes_trace_proxy.config.overlay import (
    _Doc,
    _dwell_items,
    _key_text,
    _mapping,
    _missing_key,
    _overlay,
    _string_list,
)


@pytest.mark.parametrize(
    ("path", "text"),
    [
        (("server",), "server"),
        (("server", "workers"), "server.workers"),
        (("listeners", 1, "upstream"), "listeners[1].upstream"),
        (("listeners", 0, "limits", "max_body_size"), "listeners[0].limits.max_body_size"),
    ],
)
def test_key_text(path: tuple[str | int, ...], text: str) -> None:
    """Paths print the way docs/configuration.md writes keys."""
    assert _key_text(path) == text


def test_set_creates_the_path_and_remembers_its_origin() -> None:
    """Setting a deep key builds the lists and mappings on the way; the key is then blamed on its setter."""
    doc = _Doc({})
    doc.set(("listeners", 1, "tls", "cert_file"), "c.pem", "--egress-tls")
    assert doc.data == {"listeners": [{}, {"tls": {"cert_file": "c.pem"}}]}
    assert doc.key("listeners", 1, "tls", "cert_file") == "--egress-tls"
    # A child of an overridden key is blamed on the same flag; a sibling is not.
    assert doc.key("listeners", 1, "tls", "cert_file", "x") == "--egress-tls"
    assert doc.key("listeners", 1, "tls", "key_file") == "listeners[1].tls.key_file"


@pytest.mark.parametrize(
    ("data", "path", "blamed"),
    [
        pytest.param(
            {"listeners": {"a": 1}}, ("listeners", 0, "listen"), "listeners", id="list-is-a-mapping"
        ),
        pytest.param({"server": [1]}, ("server", "workers"), "server", id="mapping-is-a-list"),
    ],
)
def test_set_into_a_malformed_file_blames_the_file_key(
    data: dict[str, object], path: tuple[str | int, ...], blamed: str
) -> None:
    """An override cannot land in a file section of the wrong shape: the file's key is named."""
    with pytest.raises(ConfigError) as info:
        _Doc(data).set(path, "x", "--flag")
    assert info.value.key == blamed


def test_overlay_order_is_file_then_env_then_flag() -> None:
    """The variable replaces the file's value; the flag replaces the variable's; each is remembered."""
    doc = _Doc({"server": {"workers": 2, "log_level": "debug", "grace_period": "5s"}})
    _overlay(
        doc,
        flags={"workers": "4", "log_level": None},
        environ={"MES_PROXY_WORKERS": "3", "MES_PROXY_LOG_LEVEL": "error", "MES_PROXY_GRACE_PERIOD": ""},
    )
    server = doc.data["server"]
    assert server == {"workers": "4", "log_level": "error", "grace_period": "5s"}
    assert doc.key("server", "workers") == "--workers"
    assert doc.key("server", "log_level") == "MES_PROXY_LOG_LEVEL"
    assert doc.key("server", "grace_period") == "server.grace_period"


def test_overlay_merges_dwell_limits_per_status() -> None:
    """Dwell limits merge status by status: the flag wins for its status, the variable keeps the others."""
    doc = _Doc({"lifecycle": {"dwell_limits": {"A": "1m", "B": "2m"}}})
    _overlay(doc, flags={"dwell_limit": ["A=5m"]}, environ={"MES_PROXY_DWELL_LIMITS": "A=3m,C=4m"})
    assert doc.data["lifecycle"] == {"dwell_limits": {"A": "5m", "B": "2m", "C": "4m"}}
    assert doc.key("lifecycle", "dwell_limits", "A") == "--dwell-limit"
    assert doc.key("lifecycle", "dwell_limits", "C") == "MES_PROXY_DWELL_LIMITS"


@pytest.mark.parametrize(
    ("text", "items"),
    [("A=1m", [("A", "1m")]), (" A = 1m , B=2h,", [("A", "1m"), ("B", "2h")]), ("", [])],
)
def test_dwell_items(text: str, items: list[tuple[str, str]]) -> None:
    """STATUS=DURATION pairs, comma-separated, blanks ignored."""
    assert _dwell_items(text, "X") == items


@pytest.mark.parametrize("text", ["A", "=1m", "A:1m"])
def test_dwell_items_name_their_origin(text: str) -> None:
    """A malformed pair is blamed on the flag or variable it came from."""
    with pytest.raises(ConfigError) as info:
        _dwell_items(text, "MES_PROXY_DWELL_LIMITS")
    assert info.value.key == "MES_PROXY_DWELL_LIMITS"


def test_missing_key_names_every_way_to_set_it() -> None:
    """An unset required key lists its flag and variable; one a flag set is blamed on that flag only."""
    doc = _Doc({})
    assert (
        _missing_key(doc, ("listeners", 0, "upstream"))
        == "--upstream / MES_PROXY_UPSTREAM / listeners[0].upstream"
    )
    assert _missing_key(doc, ("listeners", 2, "upstream")) == "listeners[2].upstream"
    doc.set(("listeners", 0, "upstream"), "", "--upstream")
    assert _missing_key(doc, ("listeners", 0, "upstream")) == "--upstream"


def test_section_and_mapping_refuse_unknown_keys() -> None:
    """Unknown keys are named with the allowed ones; absent sections read as empty."""
    doc = _Doc({"server": {"workerz": 2}, "tracing": None})
    with pytest.raises(ConfigError) as info:
        doc.section("server")
    assert info.value.key == "server.workerz"
    assert "workers" in info.value.message
    assert doc.section("tracing") == {}
    with pytest.raises(ConfigError) as info:
        _mapping(doc, {"tls": {"cert": "x"}}, ("listeners", 0, "tls"), frozenset({"cert_file"}))
    assert info.value.key == "listeners[0].tls.cert"
    assert _mapping(doc, {}, ("listeners", 0, "tls"), frozenset({"cert_file"})) is None


@pytest.mark.parametrize(
    ("raw", "items"),
    [("a, b,,c", ("a", "b", "c")), (["a", " b "], ("a", "b")), (None, ("default",))],
)
def test_string_list_from_file_or_flag(raw: object, items: tuple[str, ...]) -> None:
    """A YAML list, or a comma-separated string from a flag or variable."""
    section = {} if raw is None else {"query_allow": raw}
    assert _string_list(_Doc({}), section, ("privacy", "query_allow"), ("default",)) == items


def test_string_list_rejects_other_shapes() -> None:
    """A list with a non-string item names the key."""
    with pytest.raises(ConfigError) as info:
        _string_list(_Doc({}), {"query_allow": ["a", 1]}, ("privacy", "query_allow"), ())
    assert info.value.key == "privacy.query_allow"
