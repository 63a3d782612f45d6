"""Command line: ``serve``, ``check-config``, ``explain``, ``explain-message``, ``simulate-mes``/``-crm``.

Only this module prints and exits. It reads the config file, the default rules and secret
files, hands them to the pure :func:`~mes_trace_proxy.core.config.load_config`, and turns a
:class:`~mes_trace_proxy.core.config.ConfigError` into exit status 2 with the key named.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Final

import yaml

from mes_trace_proxy import __version__, native
from mes_trace_proxy.core.config import (
    ENV_CONFIG,
    FLAG_DEAD_LETTER_QUEUE,
    FLAG_DWELL_LIMIT,
    OPTIONS,
    Config,
    ConfigError,
    load_config,
)

__all__ = ["build_parser", "load_from_args", "main"]

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2
EXIT_INTERRUPTED: Final = 130  # the shell's convention for a run ended by Ctrl+C (128 + SIGINT)


def read_default_rules() -> dict[str, object]:
    """The packaged default rule sets (``defaults/rules.yaml``)."""
    text = resources.files("mes_trace_proxy").joinpath("defaults/rules.yaml").read_text(encoding="utf-8")
    doc = yaml.safe_load(text)
    assert isinstance(doc, dict)
    return doc


def _read_config_file(path: str, origin: str) -> dict[str, object]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(origin, f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(origin, f"{path} is not UTF-8 text (byte {exc.start})") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise ConfigError(origin, f"{path} is not valid YAML{where}") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ConfigError(origin, f"{path}: the top level must be a mapping")
    return doc


def load_from_args(args: argparse.Namespace, environ: Mapping[str, str]) -> Config:
    """Read files named by flags or env, then build the Config.

    Raises:
        ConfigError: naming the flag, variable or key at fault.
    """
    if args.config:
        file_doc: dict[str, object] | None = _read_config_file(args.config, "--config")
    elif environ.get(ENV_CONFIG):
        file_doc = _read_config_file(environ[ENV_CONFIG], ENV_CONFIG)
    else:
        file_doc = None
    flags = {option.dest: getattr(args, option.dest, None) for option in OPTIONS}
    flags["dwell_limit"] = getattr(args, "dwell_limit", None)
    flags["dead_letter_queue"] = getattr(args, "dead_letter_queue", None)
    return load_config(
        flags=flags,
        environ=environ,
        file_doc=file_doc,
        defaults=read_default_rules(),
        read_file=lambda path: Path(path).read_bytes(),
    )


def _add_proxy_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help=f"YAML config file (env {ENV_CONFIG})")
    for option in OPTIONS:
        help_text = f"{option.help} (env {option.env})"
        if option.switch_off:
            parser.add_argument(
                option.flag, dest=option.dest, action="store_const", const=False, default=None, help=help_text
            )
        else:
            parser.add_argument(option.flag, dest=option.dest, default=None, help=help_text)
    parser.add_argument(
        FLAG_DWELL_LIMIT,
        dest="dwell_limit",
        action="append",
        metavar="STATUS=DURATION",
        help="dwell limit for a status, repeatable, e.g. SUBMITTED=15m (env MES_PROXY_DWELL_LIMITS)",
    )
    parser.add_argument(
        FLAG_DEAD_LETTER_QUEUE,
        dest="dead_letter_queue",
        action="append",
        metavar="NAME",
        help="own mode: a dead-letter queue to consume, repeatable (env MES_PROXY_DEAD_LETTER_QUEUES)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser."""
    from mes_trace_proxy.sim import crm, mes

    parser = argparse.ArgumentParser(
        prog="mes-trace-proxy",
        description="Tracing sidecar reverse proxy for the MES API: order-aware OpenTelemetry spans.",
    )
    parser.add_argument(
        "--version", action="version", version=f"mes-trace-proxy {__version__} ({native.current().reason})"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the proxy")
    _add_proxy_flags(serve)

    check = sub.add_parser("check-config", help="validate and print the effective configuration")
    check.add_argument(
        "--schema", action="store_true", help="print the config file's JSON Schema and exit (loads nothing)"
    )
    _add_proxy_flags(check)

    explain = sub.add_parser("explain", help="show the rule, span name and attributes for a request")
    explain.add_argument("method", help="HTTP method, e.g. PUT")
    explain.add_argument("target", help="path and query, e.g. /api/v1/orders/A-1/status")
    explain.add_argument("--header", "-H", action="append", default=[], metavar="NAME:VALUE")
    explain.add_argument(
        "--body",
        metavar="FILE",
        help="request body file; read as JSON with -H 'Content-Type: application/json' or a *.json name",
    )
    explain.add_argument(
        "--response-body", metavar="FILE", help="response body file, to show observed status"
    )
    explain.add_argument("--listener", default=None, help="listener name [default: the first]")
    _add_proxy_flags(explain)

    explain_message = sub.add_parser(
        "explain-message", help="show what the proxy makes of one dead letter (order, cause, span)"
    )
    explain_message.add_argument("--body", metavar="FILE", required=True, help="the message body file")
    explain_message.add_argument("--header", "-H", action="append", default=[], metavar="NAME:VALUE")
    explain_message.add_argument("--x-death", metavar="FILE", help="the x-death header as a JSON list")
    explain_message.add_argument("--routing-key", default="", help="the routing key it was delivered with")
    explain_message.add_argument("--message-id", default=None, help="the message_id property")
    explain_message.add_argument("--correlation-id", default=None, help="the correlation_id property")
    explain_message.add_argument(
        "--queue",
        default="mes.dead-letters",
        help="the queue it was consumed from [default mes.dead-letters]",
    )
    _add_proxy_flags(explain_message)

    sim_mes = sub.add_parser("simulate-mes", help="run the reference MES simulator")
    mes.add_arguments(sim_mes)
    sim_crm = sub.add_parser("simulate-crm", help="drive CRM and dashboard traffic through the proxy")
    crm.add_arguments(sim_crm)
    return parser


def _cmd_serve(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    from mes_trace_proxy.server import run
    from mes_trace_proxy.telemetry.logs import configure_logging

    config = load_from_args(args, environ)
    configure_logging(config.server.log_level)
    return run(config)


def _cmd_check_config(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    if args.schema:
        from mes_trace_proxy.core.config.schema import schema_text

        sys.stdout.write(schema_text())
        return EXIT_OK
    config = load_from_args(args, environ)
    json.dump(config.describe(), sys.stdout, indent=2)
    sys.stdout.write("\nconfiguration OK\n")
    return EXIT_OK


def _cmd_explain(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    from mes_trace_proxy.explain import explain

    try:
        config = load_from_args(args, environ)
    except ConfigError as exc:
        # explain never connects anywhere, so a missing upstream gets a placeholder; one set by
        # the config file must not be overridden by it (a flag would beat the file).
        if args.upstream is not None or not exc.key.startswith("--upstream /"):
            raise
        args.upstream = "http://upstream.invalid"
        config = load_from_args(args, environ)
    headers: list[tuple[str, str]] = []
    for item in args.header:
        name, sep, value = item.partition(":")
        if not sep or not name.strip():
            raise ConfigError("--header", f"{item!r}: expected NAME:VALUE")
        headers.append((name.strip(), value.strip()))

    def read(path: str | None, flag: str) -> bytes | None:
        if path is None:
            return None
        try:
            return Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(flag, f"cannot read {path}: {exc.strerror or exc}") from None

    report = explain(
        config,
        method=args.method.upper(),
        target=args.target,
        headers=headers,
        body=read(args.body, "--body"),
        response_body=read(args.response_body, "--response-body"),
        listener=args.listener,
        body_file=args.body,
    )
    json.dump(report, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")
    return EXIT_OK


def _cmd_explain_message(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    from mes_trace_proxy.core.messages.deadletter import Message
    from mes_trace_proxy.core.messages.explain import explain_message, format_report, parse_headers
    from mes_trace_proxy.core.redact import Redactor

    if args.upstream is None:
        args.upstream = "http://upstream.invalid"  # nothing is forwarded: any upstream will do
    config = load_from_args(args, environ)
    try:
        body = Path(args.body).read_bytes()
        x_death = Path(args.x_death).read_text(encoding="utf-8") if args.x_death else None
    except OSError as exc:
        raise ConfigError("--body / --x-death", f"cannot read: {exc.strerror or exc}") from None
    try:
        headers = parse_headers(args.header, x_death)
    except ValueError as exc:
        raise ConfigError("--header / --x-death", str(exc)) from None
    message = Message(
        body=body, headers=headers, routing_key=args.routing_key, message_id=args.message_id,
        correlation_id=args.correlation_id,
    )  # fmt: skip
    redact = Redactor(config.privacy.policy()).value
    report = explain_message(config.messages.rules, message, consumed_from=args.queue, redact=redact)
    sys.stdout.write(format_report(report) + "\n")
    return EXIT_OK


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    env = os.environ if environ is None else environ
    parser = build_parser()
    args = parser.parse_args(argv)
    commands: dict[str, Callable[[argparse.Namespace, Mapping[str, str]], int]] = {
        "serve": _cmd_serve,
        "check-config": _cmd_check_config,
        "explain": _cmd_explain,
        "explain-message": _cmd_explain_message,
    }
    try:
        if args.command in commands:
            return commands[args.command](args, env)
        from mes_trace_proxy.sim import crm, mes

        runner = mes.main if args.command == "simulate-mes" else crm.main
        return runner(args)
    except ConfigError as exc:
        print(f"mes-trace-proxy: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE if args.command != "check-config" else EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
