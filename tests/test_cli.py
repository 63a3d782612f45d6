"""Tests for the command line: exit statuses, config errors naming their key on stderr, and JSON output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mes_trace_proxy import __version__, native
from mes_trace_proxy.cli import main

MES = "http://mes.internal:8081"
USER_KEY = "cli-user-id-key-0123456789abcdef-canary"
REDIS_PASSWORD = "cli-redis-pa55word-canary"


def _check_json(stdout: str) -> dict[str, object]:
    """The JSON document check-config prints before its closing line."""
    document, _, tail = stdout.rpartition("\nconfiguration OK")
    assert tail == "\n"
    parsed = json.loads(document)
    assert isinstance(parsed, dict)
    return parsed


def test_check_config_happy_path(capsys: pytest.CaptureFixture[str]) -> None:
    """check-config exits 0 and prints the effective configuration as JSON, secrets masked."""
    status = main(
        [
            "check-config",
            "--upstream",
            MES,
            "--egress-listen",
            "127.0.0.1:8090",
            "--egress-upstream",
            "http://crm.internal:8080",
            "--state",
            f"redis://:{REDIS_PASSWORD}@redis:6379/0",
            "--dwell-limit",
            "SUBMITTED=20m",
            "--no-access-log",
        ],
        environ={"MES_PROXY_USER_ID_KEY": USER_KEY, "MES_PROXY_LOG_LEVEL": "debug"},
    )
    out, err = capsys.readouterr()
    assert status == 0
    assert err == ""
    assert USER_KEY not in out
    assert REDIS_PASSWORD not in out
    described = _check_json(out)
    assert [item["name"] for item in described["listeners"]] == ["ingress", "egress"]  # type: ignore[attr-defined]
    privacy = described["privacy"]
    assert isinstance(privacy, dict)
    assert {key: privacy[key] for key in ("user_id_header", "user_id_key", "user_id_key_source")} == {
        "user_id_header": "X-User-Id",
        "user_id_key": "***",
        "user_id_key_source": "MES_PROXY_USER_ID_KEY",
    }
    assert described["server"] == {
        "workers": 1,
        "grace_period": 20.0,
        "log_level": "debug",
        "access_log": False,
    }
    lifecycle = described["lifecycle"]
    assert isinstance(lifecycle, dict)
    assert lifecycle["dwell_limits"]["SUBMITTED"] == 1200.0


def test_check_config_schema_prints_the_schema_and_loads_nothing(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """--schema prints the committed JSON Schema and exits 0: no upstream needed, no config file read."""
    broken = tmp_path / "broken.yaml"
    broken.write_text("listeners: 7\n", encoding="utf-8")
    assert main(["check-config", "--schema", "--config", str(broken)], environ={}) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert out == (Path(__file__).parent.parent / "docs" / "config.schema.json").read_text(encoding="utf-8")
    schema = json.loads(out)
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    assert "listeners" in schema["properties"]


def test_check_config_reads_the_config_file_and_key_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--config and the key file it names are read from disk; the key stays masked."""
    key_file = tmp_path / "user-id-key"
    key_file.write_text(USER_KEY + "\n")
    config = tmp_path / "proxy.yaml"
    config.write_text(
        "listeners:\n"
        f"  - upstream: {MES}\n"
        "    listen: 127.0.0.1:18080\n"
        f"privacy:\n  user_id_key_file: {key_file}\n"
    )
    assert main(["check-config", "--config", str(config)], environ={}) == 0
    out = capsys.readouterr().out
    assert USER_KEY not in out
    described = _check_json(out)
    assert described["listeners"][0]["listen"] == "127.0.0.1:18080"  # type: ignore[index]
    assert described["privacy"]["user_id_key"] == "***"  # type: ignore[index]


BAD_CONFIGS: tuple[tuple[str, list[str], dict[str, str], str], ...] = (
    ("missing-upstream", [], {}, "--upstream / MES_PROXY_UPSTREAM / listeners[0].upstream"),
    ("bad-listen-flag", ["--upstream", MES, "--listen", "nowhere"], {}, "--listen"),
    ("bad-listen-env", ["--upstream", MES], {"MES_PROXY_LISTEN": "nowhere"}, "MES_PROXY_LISTEN"),
    ("bad-workers", ["--upstream", MES, "--workers", "many"], {}, "--workers"),
    ("bad-dwell-flag", ["--upstream", MES, "--dwell-limit", "SUBMITTED"], {}, "--dwell-limit"),
    ("bad-dwell-env", ["--upstream", MES], {"MES_PROXY_DWELL_LIMITS": "X=1m"}, "MES_PROXY_DWELL_LIMITS"),
    ("credentials", ["--upstream", "http://u:hunter2@mes"], {}, "--upstream"),
    ("short-key", ["--upstream", MES], {"MES_PROXY_USER_ID_KEY": "short"}, "MES_PROXY_USER_ID_KEY"),
    ("missing-config-env", [], {"MES_PROXY_CONFIG": "/nonexistent/proxy.yaml"}, "MES_PROXY_CONFIG"),
)


COMMANDS: tuple[tuple[str, int], ...] = (("check-config", 1), ("serve", 2), ("explain", 2))


@pytest.mark.parametrize(
    ("command", "status", "argv", "environ", "key"),
    [
        pytest.param(command, status, argv, environ, key, id=f"{command}-{name}")
        for command, status in COMMANDS
        for name, argv, environ, key in BAD_CONFIGS
        # explain puts in a placeholder upstream: it never connects.
        if not (command == "explain" and name == "missing-upstream")
    ],
)
def test_bad_config_exit_status_and_key(
    command: str,
    status: int,
    argv: list[str],
    environ: dict[str, str],
    key: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A bad configuration exits 2 (check-config: 1) with one stderr line naming the key; nothing starts."""
    if command == "explain":
        argv = ["GET", "/api/v1/health", *argv]
    assert main([command, *argv], environ=environ) == status
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"mes-trace-proxy: configuration error: {key}: ")
    assert err.count("\n") == 1
    assert "hunter2" not in err


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A YAML syntax error names --config, the file and the line."""
    config = tmp_path / "broken.yaml"
    config.write_text("listeners:\n  - upstream: http://mes\n    listen: [unclosed\nadmin: {}\n")
    assert main(["check-config", "--config", str(config)], environ={}) == 1
    err = capsys.readouterr().err
    assert f"--config: {config} is not valid YAML (line " in err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("- upstream: http://mes\n", "top level must be a mapping", id="list"),
        pytest.param("listenerz: []\n", "listenerz", id="unknown-key"),
    ],
)
def test_config_file_shape_errors(
    text: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A config file of the wrong shape is refused with the reason on stderr."""
    config = tmp_path / "proxy.yaml"
    config.write_text(text)
    assert main(["serve", "--config", str(config), "--upstream", MES], environ={}) == 2
    assert message in capsys.readouterr().err


def test_config_file_not_utf8(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A config file that is not UTF-8 text is a configuration error, not a traceback."""
    config = tmp_path / "latin1.yaml"
    config.write_bytes(b"listeners:\n  - upstream: http://mes\xff\n")
    assert main(["check-config", "--config", str(config)], environ={}) == 1
    assert f"--config: {config} is not UTF-8 text" in capsys.readouterr().err


def test_empty_config_file_is_no_settings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An empty config file means defaults, not an error."""
    config = tmp_path / "empty.yaml"
    config.write_text("# nothing yet\n")
    assert main(["check-config", "--config", str(config), "--upstream", MES], environ={}) == 0
    assert "configuration OK" in capsys.readouterr().out


def test_missing_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A config file that does not exist names --config and the path."""
    missing = tmp_path / "nope.yaml"
    assert main(["check-config", "--config", str(missing), "--upstream", MES], environ={}) == 1
    err = capsys.readouterr().err
    assert f"--config: cannot read {missing}" in err


def test_flag_beats_env_beats_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Through the real parser: --listen beats MES_PROXY_LISTEN, which beats the file (MES_PROXY_CONFIG)."""
    config = tmp_path / "proxy.yaml"
    config.write_text(
        f"listeners:\n  - upstream: {MES}\n    listen: 127.0.0.1:1001\nadmin:\n  listen: 127.0.0.1:1009\n"
    )
    environ = {"MES_PROXY_CONFIG": str(config)}
    listens = []
    for argv, env in (
        ([], environ),
        ([], {**environ, "MES_PROXY_LISTEN": "127.0.0.1:1002"}),
        (["--listen", "127.0.0.1:1003"], {**environ, "MES_PROXY_LISTEN": "127.0.0.1:1002"}),
    ):
        assert main(["check-config", *argv], environ=env) == 0
        listens.append(_check_json(capsys.readouterr().out)["listeners"][0]["listen"])  # type: ignore[index]
    assert listens == ["127.0.0.1:1001", "127.0.0.1:1002", "127.0.0.1:1003"]


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    """--version prints the program, the version and which build runs, and exits 0."""
    with pytest.raises(SystemExit) as info:
        main(["--version"], environ={})
    assert info.value.code == 0
    assert capsys.readouterr().out == f"mes-trace-proxy {__version__} ({native.current().reason})\n"


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param([], id="no-command"),
        pytest.param(["frobnicate"], id="unknown-command"),
        pytest.param(["serve", "--bogus"], id="unknown-flag"),
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """argparse usage errors exit 2 with usage on stderr."""
    with pytest.raises(SystemExit) as info:
        main(argv, environ={})
    assert info.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_explain_prints_the_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """explain needs no upstream, reads body files and prints the report as JSON."""
    body = tmp_path / "body.json"
    body.write_text('{"status": "SHIPPED", "email": "jane.roe@example.com"}')
    response = tmp_path / "response.json"
    response.write_text('{"orderId": "A-1", "status": "PACKAGING"}')
    status = main(
        [
            "explain",
            "put",
            "/api/v1/orders/A-1/status?page=1",
            "-H",
            "Content-Type: application/json",
            "--body",
            str(body),
            "--response-body",
            str(response),
        ],
        environ={},
    )
    out = capsys.readouterr().out
    assert status == 0
    report = json.loads(out)
    assert report["rule"] == "set-status"
    assert report["span_name"] == "PUT /api/v1/orders/{orderId}/status"
    assert report["attributes"]["mes.order.status"] == "SHIPPED"
    assert report["attributes"]["mes.order.status.observed"] == "PACKAGING"
    assert report["attributes"]["url.query"] == "page=1"
    assert "jane.roe" not in out


def test_explain_keeps_the_config_files_upstream(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """explain's placeholder upstream never replaces the one the config file names."""
    config = tmp_path / "proxy.yaml"
    config.write_text(f"listeners:\n  - upstream: {MES}\n")
    assert main(["explain", "GET", "/api/v1/health", "--config", str(config)], environ={}) == 0
    assert json.loads(capsys.readouterr().out)["upstream"] == MES


@pytest.mark.parametrize(
    ("argv", "key"),
    [
        pytest.param(["-H", "no-colon"], "--header", id="bad-header"),
        pytest.param(["--body", "/nonexistent/body.json"], "--body", id="missing-body"),
        pytest.param(["--response-body", "/nonexistent/r.json"], "--response-body", id="missing-response"),
        pytest.param(["--listener", "erp"], "--listener", id="unknown-listener"),
    ],
)
def test_explain_argument_errors(argv: list[str], key: str, capsys: pytest.CaptureFixture[str]) -> None:
    """explain's own bad arguments exit 2 naming the flag."""
    assert main(["explain", "GET", "/api/v1/health", *argv], environ={}) == 2
    assert capsys.readouterr().err.startswith(f"mes-trace-proxy: configuration error: {key}: ")


def test_explain_refusal(capsys: pytest.CaptureFixture[str]) -> None:
    """A target the proxy refuses is reported as refused, still exit 0 (explain succeeded)."""
    assert main(["explain", "GET", "//evil.example/x"], environ={}) == 0
    assert json.loads(capsys.readouterr().out)["refused"]["status"] == 400
