"""The docs keep up with the code: every flag, variable and config key is in docs/configuration.md.

Flags, variables and keys are read from the code's own tables (the argument parsers,
``config.OPTIONS`` and ``ENV_*``, the loader's key sets, the rule schema, the demo's options),
so an option added to the code without a line in the docs fails here. Every relative link in
README.md and docs/*.md must point at a file (and heading) that exists.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Final

import pytest

from bench import soak
from mes_trace_proxy import native
from mes_trace_proxy.cli import build_parser
from mes_trace_proxy.core import config, rules
from mes_trace_proxy.demo import runner as demo
from mes_trace_proxy.sim import otlp_sink

REPO: Final = Path(__file__).resolve().parents[1]
CONFIG_DOC: Final = REPO / "docs" / "configuration.md"
LINKED_DOCS: Final = (REPO / "README.md", *sorted((REPO / "docs").glob("*.md")))
HEADING: Final = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$", re.MULTILINE)
# [text](target) and ![alt](target), not inside inline code; target up to a space or ")".
INLINE_LINK: Final = re.compile(r"(?<!`)!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK: Final = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$", re.MULTILINE)
FENCE: Final = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
EXTERNAL: Final = ("http://", "https://", "mailto:")

# Other command lines a user runs, each documented under a heading naming its program.
OTHER_PROGRAMS: Final = (
    ("python -m mes_trace_proxy.demo", demo.build_parser),
    ("python -m mes_trace_proxy.sim.otlp_sink", otlp_sink.build_parser),
    ("python -m bench.soak", soak.build_parser),
)


def _token(name: str) -> re.Pattern[str]:
    """``name`` as a whole word: ``--listen`` must not match inside ``--egress-listen``."""
    return re.compile(rf"(?<![\w-]){re.escape(name)}(?![\w-])")


def _sections(text: str) -> dict[str, str]:
    """Heading text → the text up to the next heading of the same or a higher level."""
    found = list(HEADING.finditer(text))
    sections = {}
    for index, match in enumerate(found):
        level = len(match[1])
        end = next((m.start() for m in found[index + 1 :] if len(m[1]) <= level), len(text))
        sections[match[2]] = text[match.end() : end]
    return sections


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    """Every option string of a parser except help."""
    return {
        flag
        for action in parser._actions
        if not isinstance(action, argparse._HelpAction)
        for flag in action.option_strings
    }


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    """The CLI's subcommand parsers by name."""
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _documented_in(sections: Mapping[str, str], program: str) -> str:
    """The text of every section whose heading names ``program`` in backticks."""
    return "\n".join(body for heading, body in sections.items() if f"`{program}" in heading)


def undocumented_flags(
    text: str, commands: Mapping[str, argparse.ArgumentParser], shared_with: str | None = None
) -> list[str]:
    """Flags missing from the section of their command (shared proxy flags may live in ``shared_with``'s).

    Args:
        text: the whole configuration document.
        commands: program or subcommand name → its parser.
        shared_with: a command whose section also documents the flags other commands share with it.

    Returns:
        ``"command --flag"`` for each flag not found.
    """
    sections = _sections(text)
    shared = _flags(commands[shared_with]) if shared_with else set()
    missing = []
    for name, parser in commands.items():
        own = _documented_in(sections, name)
        common = _documented_in(sections, shared_with) if shared_with else ""
        for flag in sorted(_flags(parser)):
            where = own + (common if flag in shared else "")
            if not _token(flag).search(where):
                missing.append(f"{name} {flag}")
    return missing


def _cli_commands() -> dict[str, argparse.ArgumentParser]:
    return {f"mes-trace-proxy {name}": parser for name, parser in _subcommands().items()}


def _env_names() -> list[str]:
    """Every variable the proxy and the demo read by name."""
    names = [option.env for option in config.OPTIONS]
    names += [
        value for key, value in vars(config).items() if key.startswith("ENV_") and isinstance(value, str)
    ]
    names += [option.env for option in demo.OPTIONS]
    names.append(native.PURE_ENV)
    return sorted(set(names))


def _config_keys() -> Iterator[str]:
    """Every config-file key the loader accepts, as a dotted path (``listeners[].timeouts.read``)."""
    yield from sorted(config._TOP_KEYS)
    for section, keys in sorted(config._SECTION_KEYS.items()):
        yield from (f"{section}.{key}" for key in sorted(keys))
    yield from (f"listeners[].{key}" for key in sorted(config._LISTENER_KEYS))
    yield from (f"listeners[].timeouts.{f.name}" for f in dataclasses.fields(config.Timeouts))


def _missing(names: Iterable[str], text: str) -> list[str]:
    return [name for name in names if not _token(name).search(text)]


# ── flags, variables, keys ──────────────────────────────────────────────────────────────────


def test_every_subcommand_flag_is_documented_in_its_section() -> None:
    """Each flag of every subcommand (serve, check-config, explain, simulators) is in its section."""
    text = CONFIG_DOC.read_text(encoding="utf-8")
    commands = _cli_commands()
    assert {"mes-trace-proxy serve", "mes-trace-proxy simulate-crm"} <= set(commands)
    assert undocumented_flags(text, commands, shared_with="mes-trace-proxy serve") == []


@pytest.mark.parametrize(("program", "parser"), OTHER_PROGRAMS, ids=[p for p, _ in OTHER_PROGRAMS])
def test_every_other_program_flag_is_documented(
    program: str, parser: Callable[[], argparse.ArgumentParser]
) -> None:
    """The demo's and the OTLP sink's flags are each in the section naming that program."""
    text = CONFIG_DOC.read_text(encoding="utf-8")
    assert undocumented_flags(text, {program: parser()}) == []


def test_top_level_flags_are_documented() -> None:
    """``mes-trace-proxy --version`` is mentioned too."""
    assert _missing(sorted(_flags(build_parser())), CONFIG_DOC.read_text(encoding="utf-8")) == []


def test_every_environment_variable_is_documented() -> None:
    """Each MES_PROXY_* and DEMO_* variable the code reads by name is in the document."""
    names = _env_names()
    assert "MES_PROXY_DWELL_LIMITS" in names
    assert "DEMO_SECONDS" in names
    assert _missing(names, CONFIG_DOC.read_text(encoding="utf-8")) == []


def test_every_config_file_key_is_documented() -> None:
    """Each key the loader accepts is listed by its dotted path."""
    keys = list(_config_keys())
    assert "watchdog.state" in keys
    assert "listeners[].timeouts.connect" in keys
    assert _missing(keys, CONFIG_DOC.read_text(encoding="utf-8")) == []


def test_every_rule_key_and_source_is_documented() -> None:
    """The Rules section shows every rule key and every order-id/status source kind."""
    rules_text = _sections(CONFIG_DOC.read_text(encoding="utf-8"))["Rules"]
    keys = [f"{key}:" for key in sorted(rules._RULE_KEYS)]
    sources = [f"`{kind.value}:" for kind in rules.SourceKind]
    assert _missing(keys, rules_text) == []
    assert [source for source in sources if source not in rules_text] == []


def test_a_new_flag_without_docs_is_caught() -> None:
    """The checker reports a flag added to a parser that the document does not mention."""
    text = CONFIG_DOC.read_text(encoding="utf-8")
    commands = _cli_commands()
    commands["mes-trace-proxy simulate-mes"].add_argument("--brand-new-knob")
    commands["mes-trace-proxy serve"].add_argument("--another-new-knob")
    assert undocumented_flags(text, commands, shared_with="mes-trace-proxy serve") == [
        "mes-trace-proxy serve --another-new-knob",
        "mes-trace-proxy simulate-mes --brand-new-knob",
    ]


def test_a_flag_in_another_commands_section_does_not_count() -> None:
    """simulate-crm's --listen is not documented by serve's --listen: sections are per command."""
    text = "## `mes-trace-proxy serve`\n`--listen`\n## `mes-trace-proxy simulate-crm`\nnothing\n"
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen")
    assert undocumented_flags(text, {"mes-trace-proxy simulate-crm": parser}) == [
        "mes-trace-proxy simulate-crm --listen"
    ]


# ── links ─────────────────────────────────────────────────────────────────────────────────


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _links(path: Path) -> list[str]:
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    text = re.sub(r"`[^`\n]*`", "", text)  # links inside inline code are examples, not links
    return [*INLINE_LINK.findall(text), *REFERENCE_LINK.findall(text)]


def _relative_links() -> Iterator[tuple[Path, str]]:
    for path in LINKED_DOCS:
        for target in _links(path):
            if not target.startswith(EXTERNAL):
                yield path, target


LINKS: Final = tuple(_relative_links())


def test_the_docs_have_relative_links_to_check() -> None:
    """The link checker finds links at all (a broken pattern would pass every file)."""
    assert any(path.name == "README.md" for path, _ in LINKS)
    assert _links(REPO / "README.md")


@pytest.mark.parametrize(("source", "target"), LINKS, ids=[f"{p.relative_to(REPO)}->{t}" for p, t in LINKS])
def test_relative_link_points_at_an_existing_file_and_heading(source: Path, target: str) -> None:
    """Each relative link resolves to a file in the repository, and its #anchor to a heading there."""
    path_part, _, anchor = target.partition("#")
    resolved = (source.parent / path_part).resolve() if path_part else source
    assert resolved.exists(), f"{source.relative_to(REPO)} links to missing {target}"
    assert resolved.is_relative_to(REPO), f"{target} leaves the repository"
    if anchor and resolved.suffix == ".md":
        headings = {
            _slug(m[2]) for m in HEADING.finditer(FENCE.sub("", resolved.read_text(encoding="utf-8")))
        }
        assert anchor in headings, (
            f"{source.relative_to(REPO)}: no heading #{anchor} in {path_part or 'itself'}"
        )
