"""The JSON Schema of the config file, rendered from the key definitions in config/keys.py.

``mes-trace-proxy check-config --schema`` prints it; docs/config.schema.json is the same text,
checked by tests/test_config_schema.py, for editors to validate the YAML as it is typed
(``# yaml-language-server: $schema=…`` at the top of the file).

The schema is the file's shape: which keys exist and what each value may look like. It cannot
see what the loader checks across keys (a listener address used twice, a terminal status with
a dwell limit, a rule reading personal data): ``check-config`` remains the full check.
"""

from __future__ import annotations

import json
from typing import Final

from mes_trace_proxy.config.keys import (
    DURATION,
    FILE_SECTIONS,
    POSITIVE_DURATION,
    POSITIVE_SIZE,
    RULES,
    SIZE,
    Key,
    Kind,
    ListOf,
    MapOf,
    Section,
)

__all__ = ["SCHEMA_ID", "config_schema", "schema_text"]

#: Draft-07: the newest draft every common editor's YAML and JSON support understands.
DRAFT: Final = "http://json-schema.org/draft-07/schema#"
SCHEMA_ID: Final = "https://mes-trace-proxy.invalid/config.schema.json"
_RULES_REF: Final = {"$ref": "#/definitions/rules"}


def _node(value: Kind | Section | ListOf | MapOf) -> dict[str, object]:
    if value is RULES:
        return dict(_RULES_REF)
    if isinstance(value, Kind):
        return dict(value.schema)
    if isinstance(value, Section):
        return {
            "type": ["object", "null"] if value.nullable else "object",
            "additionalProperties": False,
            "properties": {key.name: _property(key) for key in value.keys},
        }
    if isinstance(value, ListOf):
        out: dict[str, object] = {"type": "array", "items": _node(value.item)}
        if value.min_items:
            out["minItems"] = value.min_items
        return out
    return {"type": ["object", "null"], "additionalProperties": _node(value.value)}


_DURATION_UNITS: Final = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))
_SIZE_UNITS: Final = (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024))


def _shown_default(key: Key) -> object:
    """The default as a user would write it: ``7d`` rather than 604800.0, ``1GiB`` rather than bytes."""
    value = key.default
    if key.value in (DURATION, POSITIVE_DURATION) and isinstance(value, float) and value.is_integer():
        seconds = int(value)
        # Minutes only from ten up, so the docs' "60s" reads as "60s" here too.
        fits = (
            u for u, n in _DURATION_UNITS if seconds and seconds % n == 0 and (u != "m" or seconds >= 600)
        )
        unit = next(fits, "s")
        return f"{seconds // dict(_DURATION_UNITS)[unit]}{unit}"
    if key.value in (SIZE, POSITIVE_SIZE) and isinstance(value, int):
        unit, size = next(((u, n) for u, n in _SIZE_UNITS if value and value % n == 0), ("B", 1))
        return f"{value // size}{unit}"
    return value


def _property(key: Key) -> dict[str, object]:
    out: dict[str, object] = {"description": key.doc}
    if key.default is not None:
        out["default"] = _shown_default(key)
    out.update(_node(key.value))
    return out


def config_schema() -> dict[str, object]:
    """The JSON Schema (draft-07) of the config file, as plain data."""
    rules = _node(RULES.item)
    rules["required"] = ["route"]
    out: dict[str, object] = {
        "$schema": DRAFT,
        "$id": SCHEMA_ID,
        "title": "mes-trace-proxy configuration file",
        "description": (
            "The YAML file given with --config or MES_PROXY_CONFIG. Flags and MES_PROXY_* variables "
            "win over it; `mes-trace-proxy check-config` checks what this schema cannot "
            "(docs/configuration.md)."
        ),
    }
    out.update(_node(FILE_SECTIONS))
    # The top level is a mapping (an empty file is fine, but not a null document).
    out["type"] = "object"
    out["definitions"] = {"rules": {"type": "array", "items": rules}}
    return out


def schema_text() -> str:
    """The schema as the committed file holds it: two-space JSON, keys in definition order."""
    return json.dumps(config_schema(), indent=2, ensure_ascii=False) + "\n"
