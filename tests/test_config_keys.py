"""Tests for config.keys: each kind's JSON Schema never approves a value its parser refuses."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any, Final

import jsonschema
import pytest

from mes_trace_proxy.config import Config, Limits, ServerConfig, Timeouts, TracingConfig, WatchdogConfig
from mes_trace_proxy.config.keys import (
    FILE_SECTIONS,
    LIMITS,
    RULE,
    SERVER,
    TIMEOUTS,
    TRACING,
    WATCHDOG,
    Key,
    Kind,
    ListOf,
    MapOf,
    Section,
)
from mes_trace_proxy.config.schema import _property
from mes_trace_proxy.rules import _RULE_KEYS

#: Values of every shape the keys take, good and bad, to hold each kind's schema against its parser.
SAMPLES: Final[tuple[object, ...]] = (
    0,
    1,
    -1,
    2,
    64,
    65,
    1.5,
    0.25,
    -0.5,
    True,
    False,
    None,
    [],
    ["a"],
    {},
    "",
    " ",
    "0",
    "1",
    "01",
    "64",
    "65",
    "-1",
    "1.5",
    "abc",
    "0s",
    "10s",
    "500ms",
    "1.5h",
    "15m",
    "7d",
    " 10 s ",
    "1w",
    "10S",
    "1h30m",
    "0.0s",
    "0.001ms",
    "0B",
    "64KiB",
    "1GiB",
    "1 KiB",
    "1kib",
    "1TiB",
    "1KB",
    "0KiB",
    "true",
    "false",
    "yes",
    "no",
    "on",
    "off",
    "maybe",
    "TRUE",
    "127.0.0.1:8080",
    "0.0.0.0:0",
    "[::1]:9901",
    "::1:80",
    ":80",
    "h:65536",
    "h:http",
    "localhost:65535",
    "http://mes:8081",
    "https://mes/base",
    "http://[::1]:8081",
    "http://u:p@mes",
    "http://mes:0",
    "http://mes:99999",
    "http://mes?x=1",
    "http://mes#f",
    "ftp://x",
    "http://",
    "HTTP://mes",
    "memory",
    "sqlite:///x.db",
    "redis://h/0",
    "rediss://h/0",
    "unix:///r.sock",
    "postgres://x",
    "sqlite:/x",
    "link",
    "trace-per-order",
    "LINK",
    "debug",
    "info",
    "warning",
    "error",
    "sdk",
    "instrumentation",
)


def _plain_kinds(value: Key | Section | ListOf | MapOf | Kind) -> Iterator[tuple[str, Kind]]:
    """Every kind with a parser anywhere in the definition, by the key it serves."""
    if isinstance(value, Key):
        for where, kind in _plain_kinds(value.value):
            yield (f"{value.name}.{where}" if where else value.name), kind
    elif isinstance(value, Section):
        for key in value.keys:
            yield from _plain_kinds(key)
    elif isinstance(value, ListOf):
        yield from _plain_kinds(value.item)
    elif isinstance(value, MapOf):
        yield from (("*", kind) for _, kind in _plain_kinds(value.value))
    elif value.parse is not None:
        yield "", value


KINDS: Final = list(_plain_kinds(FILE_SECTIONS))


def _parses(kind: Kind, value: object) -> bool:
    assert kind.parse is not None
    try:
        kind.parse(value)
    except ValueError:
        return False
    return True


def test_there_are_kinds_to_check() -> None:
    """Durations, sizes, counts, addresses, URLs, booleans and enumerations all have parsers."""
    assert len(KINDS) >= 25


@pytest.mark.parametrize(("where", "kind"), KINDS, ids=[where for where, _ in KINDS])
def test_the_schema_approves_only_what_the_parser_accepts(where: str, kind: Kind) -> None:
    """An editor that says a value is fine never sees the proxy refuse it; the reverse may happen.

    The schema may be stricter (it asks for ``true``, not ``"YES"``), never looser.
    """
    validator = jsonschema.Draft7Validator(dict(kind.schema))
    looser = [value for value in SAMPLES if validator.is_valid(value) and not _parses(kind, value)]
    assert looser == []
    # And it is not vacuous: some sample passes both.
    assert any(validator.is_valid(value) and _parses(kind, value) for value in SAMPLES)


def test_the_rule_definition_covers_rules_keys() -> None:
    """The schema's rule has exactly the keys rules.py accepts."""
    assert RULE.names() == _RULE_KEYS


@pytest.mark.parametrize(
    ("section", "model"),
    [
        (SERVER, ServerConfig),
        (WATCHDOG, WatchdogConfig),
        (TRACING, TracingConfig),
        (LIMITS, Limits),
        (TIMEOUTS, Timeouts),
    ],
    ids=["server", "watchdog", "tracing", "limits", "timeouts"],
)
def test_plain_sections_match_their_dataclass(section: Section, model: Any) -> None:
    """A plain section is parsed key by key into a field of the same name, so the two must agree.

    A field added to the dataclass without its Key row (or the reverse) fails here.
    """
    assert section.names() == {field.name for field in dataclasses.fields(model)}
    for key in section.keys:
        assert isinstance(key.value, Kind), key.name
        assert key.value.parse is not None, key.name


def test_every_top_level_section_is_a_field_of_config() -> None:
    """The file's top-level keys are Config's fields, plus rule_sets (compiled into the listeners)."""
    assert FILE_SECTIONS.names() == {field.name for field in dataclasses.fields(Config)} | {"rule_sets"}


def _keys_with_defaults(value: Key | Section | ListOf | MapOf | Kind) -> Iterator[Key]:
    if isinstance(value, Key):
        if value.default is not None:
            yield value
        yield from _keys_with_defaults(value.value)
    elif isinstance(value, Section):
        for key in value.keys:
            yield from _keys_with_defaults(key)
    elif isinstance(value, ListOf):
        yield from _keys_with_defaults(value.item)


DEFAULTED: Final = list(_keys_with_defaults(FILE_SECTIONS))


@pytest.mark.parametrize("key", DEFAULTED, ids=[key.name for key in DEFAULTED])
def test_the_schema_shows_each_default_as_a_valid_value(key: Key) -> None:
    """The schema's ``default`` (``7d``, ``1GiB``) passes the key's schema and means the loader's default."""
    shown = _property(key)["default"]
    assert isinstance(key.value, Kind)
    assert jsonschema.Draft7Validator(dict(key.value.schema)).is_valid(shown)
    if key.value.parse is not None:
        assert key.value.parse(shown) == key.value.parse(key.default)
