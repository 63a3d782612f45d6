"""Tests for config.values: each scalar parser over a table of good and bad values, no loader."""

from __future__ import annotations

import re

import pytest

from mes_trace_proxy.config.model import HostPort
from mes_trace_proxy.config.values import (
    _count,
    _parse_bool,
    _parse_hostport,
    _parse_state,
    _parse_workers,
    parse_duration,
    parse_size,
)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        pytest.param("500ms", 0.5, id="ms"),
        pytest.param("10s", 10.0, id="s"),
        pytest.param("15m", 900.0, id="m"),
        pytest.param("2h", 7200.0, id="h"),
        pytest.param("7d", 604800.0, id="d"),
        pytest.param("1.5h", 5400.0, id="fraction"),
        pytest.param(" 10 s ", 10.0, id="spaces"),
        pytest.param("10", 10.0, id="bare-string"),
        pytest.param("0s", 0.0, id="zero"),
        pytest.param(10, 10.0, id="int"),
        pytest.param(0.25, 0.25, id="float"),
    ],
)
def test_parse_duration(value: object, seconds: float) -> None:
    """Durations take ms, s, m, h and d; bare numbers are seconds."""
    assert parse_duration(value) == seconds


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("", id="empty"),
        pytest.param("-1s", id="negative-string"),
        pytest.param(-5, id="negative-number"),
        pytest.param("1w", id="weeks"),
        pytest.param("10S", id="upper-case-unit"),
        pytest.param("ten", id="words"),
        pytest.param("1h30m", id="compound"),
        pytest.param("1e3s", id="exponent"),
        pytest.param(True, id="bool"),
        pytest.param(None, id="none"),
        pytest.param(float("nan"), id="nan"),
        pytest.param(float("inf"), id="inf"),
        pytest.param("9" * 400, id="overflows-to-inf"),
    ],
)
def test_parse_duration_rejects(value: object) -> None:
    """Anything else, including negative and non-finite values, is a ValueError."""
    with pytest.raises(ValueError, match=r"duration|negative"):
        parse_duration(value)


@pytest.mark.parametrize(
    ("value", "size"),
    [
        pytest.param("64KiB", 65536, id="KiB"),
        pytest.param("1MiB", 1024**2, id="MiB"),
        pytest.param("2GiB", 2 * 1024**3, id="GiB"),
        pytest.param("10B", 10, id="B"),
        pytest.param("1 KiB", 1024, id="space"),
        pytest.param("100", 100, id="bare-string"),
        pytest.param(100, 100, id="int"),
        pytest.param(0, 0, id="zero"),
        pytest.param("1KB", 1000, id="decimal-KB"),
    ],
)
def test_parse_size(value: object, size: int) -> None:
    """Sizes take B, KiB, MiB and GiB; bare numbers are bytes."""
    assert parse_size(value) == size


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("", id="empty"),
        pytest.param(-1, id="negative"),
        pytest.param("-1KiB", id="negative-string"),
        pytest.param("1.5KiB", id="fraction"),
        pytest.param(1.5, id="float"),
        pytest.param("1kib", id="wrong-case"),
        pytest.param("1TiB", id="unknown-unit"),
        pytest.param(True, id="bool"),
        pytest.param("lots", id="words"),
    ],
)
def test_parse_size_rejects(value: object) -> None:
    """Anything else is a ValueError."""
    with pytest.raises(ValueError, match="size"):
        parse_size(value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param(True, True, id="bool-true"),
        pytest.param(False, False, id="bool-false"),
        pytest.param("yes", True, id="yes"),
        pytest.param(" On ", True, id="on-spaces-case"),
        pytest.param("1", True, id="one"),
        pytest.param("false", False, id="false"),
        pytest.param("off", False, id="off"),
        pytest.param("0", False, id="zero"),
    ],
)
def test_parse_bool(value: object, expected: bool) -> None:
    """Booleans from YAML, or the words a flag or variable would carry."""
    assert _parse_bool(value) is expected


@pytest.mark.parametrize("value", ["", "maybe", "2", "truthy"])
def test_parse_bool_rejects(value: object) -> None:
    """Anything else is a ValueError that says what to use."""
    with pytest.raises(ValueError, match="true or false"):
        _parse_bool(value)


@pytest.mark.parametrize(
    ("value", "host", "port"),
    [
        pytest.param("127.0.0.1:8080", "127.0.0.1", 8080, id="ipv4"),
        pytest.param("0.0.0.0:0", "0.0.0.0", 0, id="port-zero"),
        pytest.param("[::1]:9901", "::1", 9901, id="ipv6"),
        pytest.param(" localhost:65535 ", "localhost", 65535, id="name-spaces"),
    ],
)
def test_parse_hostport(value: str, host: str, port: int) -> None:
    """HOST:PORT and [IPv6]:PORT."""
    assert _parse_hostport(value) == HostPort(host=host, port=port)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        pytest.param("8080", "expected HOST:PORT", id="no-host"),
        pytest.param(":8080", "the host is empty", id="empty-host"),
        pytest.param("[::1]8080", "expected [IPv6]:PORT", id="ipv6-no-colon"),
        pytest.param("h:65536", "0 to 65535", id="port-too-big"),
        pytest.param("h:http", "0 to 65535", id="port-name"),
    ],
)
def test_parse_hostport_rejects(value: str, message: str) -> None:
    """Each malformed address says what is wrong with it."""
    with pytest.raises(ValueError, match=re.escape(message)):
        _parse_hostport(value)


@pytest.mark.parametrize(("value", "number"), [(1, 1), ("64", 64), (" 3 ", 3)])
def test_count_and_workers_accept_whole_numbers(value: object, number: int) -> None:
    """Counts are whole numbers from one up; workers too, up to 64."""
    assert _count(value) == number
    assert _parse_workers(value) == number


@pytest.mark.parametrize("value", [0, -1, "1.5", "many", True])
def test_count_rejects(value: object) -> None:
    """Zero, negatives, fractions, words and booleans are not counts."""
    with pytest.raises(ValueError, match=r"whole number|at least 1"):
        _count(value)


@pytest.mark.parametrize("value", [0, 65, "x"])
def test_workers_range(value: object) -> None:
    """Workers stay within 1..64."""
    with pytest.raises(ValueError, match=r"whole number|1\.\.64"):
        _parse_workers(value)


@pytest.mark.parametrize(
    "value", ["memory", "sqlite:///./x.db", "redis://h:6379/0", "rediss://h/0", "unix:///r.sock?db=1"]
)
def test_parse_state_accepts_the_documented_stores(value: str) -> None:
    """The state URL schemes docs/configuration.md lists."""
    assert _parse_state(value) == value


@pytest.mark.parametrize("value", ["", "postgres://db", "sqlite:/x.db", "file.db"])
def test_parse_state_rejects_others(value: str) -> None:
    """Anything else names the accepted forms."""
    with pytest.raises(ValueError, match="use memory"):
        _parse_state(value)
