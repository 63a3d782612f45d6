"""The merged document: the config file overlaid with variables, then flags, and who set each key.

Precedence, highest first: flag, environment variable, config file, default. :class:`_Doc`
remembers the flag or variable behind every overridden key, so an error names the source the
user wrote, not the file key it landed on.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

from mes_trace_proxy.config.keys import _SECTION_KEYS
from mes_trace_proxy.config.model import ConfigError
from mes_trace_proxy.config.options import (
    ENV_DEAD_LETTER_QUEUES,
    ENV_DWELL_LIMITS,
    FLAG_DEAD_LETTER_QUEUE,
    FLAG_DWELL_LIMIT,
    OPTIONS,
)

_T = TypeVar("_T")


def _key_text(path: Sequence[str | int]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


class _Doc:
    """The merged document and, for each overridden key, the flag or env var it came from."""

    def __init__(self, data: dict[str, object]) -> None:
        self.data = data
        self.origins: dict[tuple[str | int, ...], str] = {}

    def key(self, *path: str | int) -> str:
        """The name to blame for a path: the flag or env var that set it, else the file key."""
        for length in range(len(path), 0, -1):
            origin = self.origins.get(tuple(path[:length]))
            if origin is not None:
                return origin
        return _key_text(path)

    def set(self, path: Sequence[str | int], value: object, origin: str) -> None:
        node: object = self.data
        for depth, part in enumerate(path):
            last = depth == len(path) - 1
            if isinstance(part, int):
                # The file may hold anything here (``listeners: {..}``): blame its key.
                if not isinstance(node, list):
                    raise ConfigError(_key_text(path[:depth]), "expected a list")
                while len(node) <= part:
                    node.append({})
                if last:
                    node[part] = value
                    break
                child = node[part]
                if child is None:
                    child = node[part] = [] if isinstance(path[depth + 1], int) else {}
            else:
                if not isinstance(node, dict):
                    raise ConfigError(_key_text(path[:depth]), "expected a mapping")
                if last:
                    node[part] = value
                    break
                child = node.get(part)
                if child is None:
                    child = node[part] = [] if isinstance(path[depth + 1], int) else {}
            node = child
        self.origins[tuple(path)] = origin

    def section(self, name: str) -> Mapping[str, object]:
        raw = self.data.get(name, {})
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            raise ConfigError(self.key(name), "expected a mapping")
        allowed = _SECTION_KEYS[name]
        for item in raw:
            if item not in allowed:
                raise ConfigError(self.key(name, item), f"unknown key; allowed: {', '.join(sorted(allowed))}")
        return raw


def _get(
    doc: _Doc,
    section: Mapping[str, object],
    path: tuple[str | int, ...],
    parse: Callable[[object], _T],
    default: _T,
) -> _T:
    """Parse ``section[path[-1]]`` (or return ``default``), blaming the right key on failure."""
    raw = section.get(str(path[-1]))
    if raw is None:
        return default
    try:
        return parse(raw)
    except ValueError as exc:
        raise ConfigError(doc.key(*path), str(exc)) from None


def _dwell_items(text: str, origin: str) -> list[tuple[str, str]]:
    items = []
    for part in text.split(","):
        if not part.strip():
            continue
        status, sep, duration = part.partition("=")
        if not sep or not status.strip():
            raise ConfigError(origin, f"{part.strip()!r}: expected STATUS=DURATION, e.g. SUBMITTED=15m")
        items.append((status.strip(), duration.strip()))
    return items


def _overlay(doc: _Doc, flags: Mapping[str, object], environ: Mapping[str, str]) -> None:
    """Apply environment variables, then flags, over the file document."""
    for option in OPTIONS:
        value = environ.get(option.env)
        if value:
            doc.set(option.path, value, option.env)
    if environ.get(ENV_DWELL_LIMITS):
        for status, duration in _dwell_items(environ[ENV_DWELL_LIMITS], ENV_DWELL_LIMITS):
            doc.set(("lifecycle", "dwell_limits", status), duration, ENV_DWELL_LIMITS)
    for option in OPTIONS:
        flag_value = flags.get(option.dest)
        if flag_value is not None:
            doc.set(option.path, flag_value, option.flag)
    raw_flags = flags.get("dwell_limit") or []
    if not isinstance(raw_flags, list | tuple):
        raise ConfigError(FLAG_DWELL_LIMIT, "expected STATUS=DURATION values")
    for item in raw_flags:
        for status, duration in _dwell_items(str(item), FLAG_DWELL_LIMIT):
            doc.set(("lifecycle", "dwell_limits", status), duration, FLAG_DWELL_LIMIT)
    # Dead-letter queues: the variable's comma list, or the repeated flag, replaces the file's list.
    queues = flags.get("dead_letter_queue")
    if isinstance(queues, list | tuple) and queues:
        doc.set(("messages", "dead_letter_queues"), [str(q) for q in queues], FLAG_DEAD_LETTER_QUEUE)
    elif environ.get(ENV_DEAD_LETTER_QUEUES):
        doc.set(("messages", "dead_letter_queues"), environ[ENV_DEAD_LETTER_QUEUES], ENV_DEAD_LETTER_QUEUES)


def _missing_key(doc: _Doc, path: tuple[str | int, ...]) -> str:
    """A required key nobody set: also name the flag and variable that would set it, if any."""
    key = doc.key(*path)
    for option in OPTIONS:
        if option.path == path and key == _key_text(path):
            return f"{option.flag} / {option.env} / {key}"
    return key


def _mapping(
    doc: _Doc, raw: Mapping[str, object], path: tuple[str | int, ...], allowed: frozenset[str]
) -> dict[str, object] | None:
    """``raw[path[-1]]`` as a mapping with only ``allowed`` keys, or ``None`` when absent."""
    value = raw.get(str(path[-1]))
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ConfigError(doc.key(*path), f"expected a mapping of {', '.join(sorted(allowed))}")
    for item in value:
        if item not in allowed:
            raise ConfigError(doc.key(*path, item), f"unknown key; allowed: {', '.join(sorted(allowed))}")
    return value


def _section_source(doc: _Doc, path: tuple[str | int, ...], section: Mapping[str, object]) -> str:
    """Whom to blame for a whole section: the flags or variables that set its members, else its key."""
    origins = [doc.origins[(*path, item)] for item in section if (*path, item) in doc.origins]
    return ", ".join(dict.fromkeys(origins)) if origins else doc.key(*path)


def _string_list(
    doc: _Doc, section: Mapping[str, object], path: tuple[str, str], default: tuple[str, ...]
) -> tuple[str, ...]:
    """A list of strings from the file, or a comma-separated one from a flag or variable."""
    raw = section.get(path[1])
    if raw is None:
        return default
    if isinstance(raw, str):
        items = raw.split(",")
    elif isinstance(raw, list) and all(isinstance(item, str) for item in raw):
        items = raw
    else:
        raise ConfigError(doc.key(*path), "expected a list of strings")
    return tuple(item.strip() for item in items if item.strip())
