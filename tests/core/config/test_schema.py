"""Tests for config.schema: the published JSON Schema is current and every example config passes it."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Final

import jsonschema
import pytest
import yaml

from mes_trace_proxy.core.config import OPTIONS, ConfigError, load_config
from mes_trace_proxy.core.config.keys import _TOP_KEYS
from mes_trace_proxy.core.config.schema import config_schema, schema_text

REPO: Final = Path(__file__).resolve().parents[3]
SCHEMA_FILE: Final = REPO / "docs" / "config.schema.json"
YAML_BLOCK: Final = re.compile(r"^```ya?ml\n(.*?)^```", re.MULTILINE | re.DOTALL)
VALIDATOR: Final = jsonschema.Draft7Validator(config_schema())
RULES_VALIDATOR: Final = jsonschema.Draft7Validator({**config_schema(), "$ref": "#/definitions/rules"})


def _problems(validator: jsonschema.Draft7Validator, doc: object) -> list[str]:
    return [
        f"{'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}" for e in validator.iter_errors(doc)
    ]


def _is_config(doc: object) -> bool:
    """A YAML document that is (part of) a proxy config file: a mapping of top-level keys only."""
    return isinstance(doc, dict) and bool(doc) and set(doc) <= _TOP_KEYS


def _is_rule_list(doc: object) -> bool:
    return (
        isinstance(doc, list)
        and bool(doc)
        and all(isinstance(item, dict) and "route" in item for item in doc)
    )


#: Where the repository keeps files (not .venv, build output or demo output beside them).
FOLDERS: Final = ("docs", "k8s", "mes_trace_proxy", "bench", "scripts", "tests")


def _files(*suffixes: str) -> list[Path]:
    """The repository's files with one of ``suffixes``: at the top and in its source folders."""
    found = [path for path in REPO.iterdir() if path.suffix in suffixes]
    for folder in FOLDERS:
        found += [path for path in (REPO / folder).rglob("*") if path.suffix in suffixes]
    return sorted(found)


def _doc_blocks() -> Iterator[tuple[str, object]]:
    """Every ```yaml block of the Markdown documentation, by file and line."""
    for path in _files(".md"):
        text = path.read_text(encoding="utf-8")
        for match in YAML_BLOCK.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            yield f"{path.relative_to(REPO)}:{line}", yaml.safe_load(match[1])


def _yaml_documents() -> Iterator[tuple[str, object]]:
    """Every document of every tracked YAML file, and every *.yaml entry of a ConfigMap in them."""
    for path in _files(".yaml", ".yml"):
        for index, doc in enumerate(yaml.safe_load_all(path.read_text(encoding="utf-8"))):
            where = f"{path.relative_to(REPO)}#{index}"
            yield where, doc
            if isinstance(doc, dict) and doc.get("kind") == "ConfigMap":
                for name, text in (doc.get("data") or {}).items():
                    if name.endswith((".yaml", ".yml")):
                        yield f"{where} data.{name}", yaml.safe_load(text)


def _compose_configs() -> Iterator[tuple[str, object]]:
    """The configuration each compose service running `serve` gets from MES_PROXY_* variables, as a file."""
    compose = yaml.safe_load((REPO / "compose.yaml").read_text(encoding="utf-8"))
    by_env = {option.env: option.path for option in OPTIONS}
    for name, service in compose["services"].items():
        if "serve" not in (service.get("command") or []):
            continue
        doc: dict[str, Any] = {}
        for variable, value in (service.get("environment") or {}).items():
            if variable.startswith("MES_PROXY_"):
                assert variable in by_env, f"compose.yaml {name}: {variable} sets no config key"
                _put(doc, by_env[variable], value)
        yield f"compose.yaml services.{name}", doc


def _put(doc: dict[str, Any], path: tuple[str | int, ...], value: object) -> None:
    node: Any = doc
    for part, following in zip(path, (*path[1:], None), strict=True):
        if following is None:
            node[part] = value
        elif isinstance(part, int):
            while len(node) <= part:
                node.append({})
            node = node[part]
        else:
            node = node.setdefault(part, [] if isinstance(following, int) else {})


def _examples() -> dict[str, list[tuple[str, object]]]:
    found: dict[str, list[tuple[str, object]]] = {"config": [], "rules": []}
    for where, doc in [*_doc_blocks(), *_yaml_documents(), *_compose_configs()]:
        if _is_config(doc) or where.startswith("compose.yaml services."):
            found["config"].append((where, doc))
        elif _is_rule_list(doc):
            found["rules"].append((where, doc))
    return found


EXAMPLES: Final = _examples()


def test_the_committed_schema_is_current() -> None:
    """docs/config.schema.json is what check-config --schema prints (regenerate it with that command)."""
    assert SCHEMA_FILE.read_text(encoding="utf-8") == schema_text(), (
        "run: mes-trace-proxy check-config --schema > docs/config.schema.json"
    )


def test_the_schema_is_valid_draft_07() -> None:
    """The schema itself passes the draft-07 meta-schema, so editors can use it."""
    jsonschema.Draft7Validator.check_schema(json.loads(SCHEMA_FILE.read_text(encoding="utf-8")))


def test_examples_are_found_everywhere() -> None:
    """The search finds the docs example, the README's, the ConfigMap's, compose's and the default rules."""
    places = {where.split(":")[0].split("#")[0].split(" ")[0] for where, _ in EXAMPLES["config"]}
    assert {
        "docs/configuration.md",
        "README.md",
        "k8s/base/mes-trace-proxy-config.yaml",
        "compose.yaml",
        "mes_trace_proxy/defaults/rules.yaml",
    } <= places
    assert any(where.startswith("docs/configuration.md") for where, _ in EXAMPLES["rules"])


@pytest.mark.parametrize(("where", "doc"), EXAMPLES["config"], ids=[w for w, _ in EXAMPLES["config"]])
def test_every_example_config_validates(where: str, doc: object) -> None:
    """Each config in the repository (docs, README, ConfigMap, compose, default rules) passes the schema."""
    assert _problems(VALIDATOR, doc) == []


@pytest.mark.parametrize(("where", "doc"), EXAMPLES["rules"], ids=[w for w, _ in EXAMPLES["rules"]])
def test_every_example_rule_list_validates(where: str, doc: object) -> None:
    """A documented list of rules passes the schema's rule definition."""
    assert _problems(RULES_VALIDATOR, doc) == []


@pytest.mark.parametrize(
    ("doc", "where"),
    [
        pytest.param({"listener": []}, "(top)", id="unknown-top-level-key"),
        pytest.param({"server": {"workerz": 2}}, "server", id="unknown-section-key"),
        pytest.param({"server": {"workers": 65}}, "server/workers", id="workers-out-of-range"),
        pytest.param({"server": {"grace_period": "20 seconds"}}, "server/grace_period", id="duration-words"),
        pytest.param({"listeners": []}, "listeners", id="no-listeners"),
        pytest.param({"listeners": [None]}, "listeners/0", id="null-listener"),
        pytest.param({"listeners": [{"listen": "8080"}]}, "listeners/0/listen", id="port-only"),
        pytest.param({"listeners": [{"upstream": "ftp://x"}]}, "listeners/0/upstream", id="upstream-scheme"),
        pytest.param(
            {"listeners": [{"limits": {"max_body_size": "1TiB"}}]},
            "listeners/0/limits/max_body_size",
            id="size-unit",
        ),
        pytest.param(
            {"listeners": [{"rules": [{"name": "x"}]}]}, "listeners/0/rules", id="rule-without-route"
        ),
        pytest.param(
            {"rule_sets": {"mes": [{"route": "/a", "order_id": "cookie:x"}]}},
            "rule_sets/mes/0/order_id",
            id="source-kind",
        ),
        pytest.param({"watchdog": {"check_interval": "0s"}}, "watchdog/check_interval", id="zero-interval"),
        pytest.param(
            {"lifecycle": {"dwell_limits": {"SUBMITTED": -1}}},
            "lifecycle/dwell_limits/SUBMITTED",
            id="negative-dwell",
        ),
        pytest.param({"tracing": {"client_span": "otel"}}, "tracing/client_span", id="client-span-mode"),
    ],
)
def test_the_schema_refuses_what_the_loader_refuses(doc: dict[str, object], where: str) -> None:
    """Each of these is refused by the schema at the key the loader would name, and by the loader."""
    errors = list(VALIDATOR.iter_errors(doc))
    assert errors, "the schema accepted it"
    assert where in {"/".join(map(str, e.absolute_path)) or "(top)" for e in errors}
    full = {"listeners": [{"upstream": "http://mes:8081"}], **doc}
    if "listeners" in doc and isinstance(doc["listeners"], list) and doc["listeners"]:
        first = doc["listeners"][0]
        full["listeners"] = [{"upstream": "http://mes:8081", **first} if isinstance(first, dict) else first]
    with pytest.raises(ConfigError):
        load_config(flags={}, environ={}, file_doc=full, defaults=_defaults())


def _defaults() -> Mapping[str, object]:
    from mes_trace_proxy.cli import read_default_rules

    return read_default_rules()
