"""Tests for config.options: the option table is consistent with itself and with the file's keys."""

from __future__ import annotations

import pytest

from mes_trace_proxy.config.keys import (
    _LIMIT_KEYS,
    _LISTENER_KEYS,
    _SECTION_KEYS,
    _TLS_KEYS,
    _TOP_KEYS,
    _UPSTREAM_TLS_KEYS,
)
from mes_trace_proxy.config.options import (
    DEFAULT_LIMITS,
    DEFAULT_MAX_BODY_SIZE,
    ENV_CONFIG,
    ENV_DWELL_LIMITS,
    ENV_USER_ID_KEY,
    FLAG_DWELL_LIMIT,
    OPTIONS,
    _Option,
)


def _file_key_exists(path: tuple[str | int, ...]) -> bool:
    """Whether the loader accepts ``path`` as a config-file key."""
    head, *rest = path
    if head == "listeners":
        index, key, *deeper = rest
        if not isinstance(index, int) or key not in _LISTENER_KEYS:
            return False
        nested = {"tls": _TLS_KEYS, "upstream_tls": _UPSTREAM_TLS_KEYS, "limits": _LIMIT_KEYS}
        if not deeper:
            return key not in nested
        return len(deeper) == 1 and key in nested and deeper[0] in nested[str(key)]
    return head in _TOP_KEYS and len(rest) == 1 and rest[0] in _SECTION_KEYS.get(str(head), frozenset())


@pytest.mark.parametrize("option", OPTIONS, ids=[option.dest for option in OPTIONS])
def test_every_option_overrides_a_real_file_key(option: _Option) -> None:
    """A flag or variable sets a key the file also takes, so all three sources meet in one place."""
    assert _file_key_exists(option.path), option


def test_the_key_check_can_fail() -> None:
    """The helper above rejects keys the loader would refuse."""
    assert not _file_key_exists(("server", "color"))
    assert not _file_key_exists(("listeners", 0, "limits", "max_colour"))
    assert not _file_key_exists(("listeners", 0, "tls"))


def test_names_are_unique_and_spelled_alike() -> None:
    """One dest, one flag, one variable per option; flags are --kebab-case, variables MES_PROXY_*."""
    for attribute in ("dest", "flag", "env", "path"):
        values = [getattr(option, attribute) for option in OPTIONS]
        assert len(values) == len(set(values)), attribute
    for option in OPTIONS:
        assert option.flag.startswith("--")
        assert option.flag == option.flag.lower()
        assert option.env.startswith("MES_PROXY_")
        assert option.env == option.env.upper()
    extra = {ENV_CONFIG, ENV_DWELL_LIMITS, ENV_USER_ID_KEY}
    assert not extra & {option.env for option in OPTIONS}
    assert FLAG_DWELL_LIMIT not in {option.flag for option in OPTIONS}


def test_default_limits_use_the_documented_body_limit() -> None:
    """The default limits are built from the named defaults (1 GiB bodies)."""
    assert DEFAULT_LIMITS.max_body_size == DEFAULT_MAX_BODY_SIZE == 1024**3
