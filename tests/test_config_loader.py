"""Tests for config.loader: the checks across sections (test_config.py: per-option precedence)."""

from __future__ import annotations

import pytest

from mes_trace_proxy.cli import read_default_rules
from mes_trace_proxy.config.loader import load_config
from mes_trace_proxy.config.model import Config, ConfigError

DEFAULTS = read_default_rules()
MES = "http://mes:8081"


def _load(file_doc: object = None, flags: dict[str, object] | None = None, **environ: str) -> Config:
    return load_config(flags=flags or {}, environ=environ, file_doc=file_doc, defaults=DEFAULTS)  # type: ignore[arg-type]


def _error(file_doc: object = None, flags: dict[str, object] | None = None, **environ: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        _load(file_doc, flags, **environ)
    return info.value


@pytest.mark.parametrize(
    ("file_doc", "key"),
    [
        pytest.param(["listeners"], "config file", id="top-level-list"),
        pytest.param({"listener": []}, "listener", id="unknown-top-level-key"),
        pytest.param({"listeners": []}, "listeners", id="no-listeners"),
        pytest.param(
            {"listeners": [{"upstream": MES}, {"name": "ingress", "listen": "127.0.0.1:1", "upstream": MES}]},
            "listeners[1].name",
            id="duplicate-name",
        ),
        pytest.param(
            {"listeners": [{"upstream": MES, "listen": "127.0.0.1:9901"}]}, "admin.listen", id="same-port"
        ),
        pytest.param(
            {"listeners": [{"upstream": MES}], "service": {"name": ""}}, "service.name", id="service-name"
        ),
    ],
)
def test_cross_section_errors_name_the_key(file_doc: object, key: str) -> None:
    """The checks that span sections (names, addresses) name the later key."""
    assert _error(file_doc).key == key


def test_the_file_document_is_not_modified() -> None:
    """Overrides go into a copy: the caller's parsed YAML is left as it was."""
    file_doc = {"listeners": [{"upstream": MES}]}
    config = _load(file_doc, {"listen": "127.0.0.1:0"})
    assert file_doc == {"listeners": [{"upstream": MES}]}
    assert config.listeners[0].listen.port == 0


def test_user_id_key_length_and_source() -> None:
    """A key shorter than 16 bytes is refused naming the variable; a long one is kept."""
    assert _error(None, {"upstream": MES}, MES_PROXY_USER_ID_KEY="short").key == "MES_PROXY_USER_ID_KEY"
    config = _load(None, {"upstream": MES}, MES_PROXY_USER_ID_KEY="k" * 16)
    assert config.privacy.user_id_key == b"k" * 16
    assert config.privacy.user_id_key_source == "MES_PROXY_USER_ID_KEY"
