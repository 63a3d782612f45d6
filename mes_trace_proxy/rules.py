"""Rules: which route a call is, and where its order id and status come from.

A rule file is compiled once at start-up into :class:`CompiledRules`, a trie of path
segments, so matching a request walks its path once instead of trying every regex.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import unquote

from mes_trace_proxy.framing import is_token

__all__ = [
    "CompiledRules",
    "RouteMatch",
    "Rule",
    "RuleError",
    "Source",
    "SourceKind",
    "compile_rules",
    "parse_pointer",
]


class RuleError(ValueError):
    """A rule in the configuration is invalid; ``key`` names it (``rule_sets.mes[2].route``)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


class SourceKind(enum.Enum):
    """Where a value is read from."""

    PATH = "path"
    QUERY = "query"
    HEADER = "header"
    BODY = "body"
    RESPONSE = "response"
    RESPONSE_HEADER = "response_header"
    CONST = "const"


@dataclass(frozen=True, slots=True, kw_only=True)
class Source:
    """A compiled source spec such as ``path:orderId`` or ``body:/status``."""

    kind: SourceKind
    #: path parameter, query parameter, or lower-cased header name
    name: str = ""
    #: RFC 6901 reference tokens, already unescaped
    pointer: tuple[str, ...] = ()
    #: the constant for ``const:``
    value: str = ""

    @property
    def spec(self) -> str:
        """The source as written in the config (for ``explain`` and ``check-config``)."""
        if self.kind in (SourceKind.BODY, SourceKind.RESPONSE):
            return f"{self.kind.value}:{format_pointer(self.pointer)}"
        if self.kind is SourceKind.CONST:
            return f"const:{self.value}"
        return f"{self.kind.value}:{self.name}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Rule:
    """One compiled rule."""

    name: str
    #: upper-case methods, or ``None`` for any method
    methods: frozenset[str] | None
    #: the route template as written (``/api/v1/orders/{orderId}/status``): ``http.route``
    route: str
    order_id: Source | None = None
    status: Source | None = None
    observed_status: Source | None = None
    #: per-rule sampling ratio; ``None`` leaves the decision to the SDK's sampler
    sample: float | None = None
    needs_request_body: bool = False
    needs_response_body: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class RouteMatch:
    """A request matched to a rule, with the raw (still percent-encoded) path parameters."""

    rule: Rule
    params: Mapping[str, str] = field(default_factory=dict)

    def param(self, name: str) -> str | None:
        """The percent-decoded path parameter ``name``, or ``None``."""
        raw = self.params.get(name)
        return None if raw is None else unquote(raw, errors="replace")


# A template parameter is a whole segment "{name}"; partial-segment parameters would make
# matching ambiguous and no reference route needs them.
_PARAM: Final = re.compile(r"^\{([A-Za-z_][A-Za-z0-9_]*)\}$")
_METHOD: Final = re.compile(r"^[A-Z][A-Z0-9_-]*$")
_SOURCE_KINDS: Final = {kind.value: kind for kind in SourceKind}
_RULE_KEYS: Final = frozenset({"name", "method", "route", "order_id", "status", "observed_status", "sample"})


def parse_pointer(text: str) -> tuple[str, ...]:
    """Parse an RFC 6901 JSON Pointer into reference tokens.

    Args:
        text: ``""`` (the whole document) or a string starting with ``/``.

    Returns:
        The unescaped tokens (``~1`` → ``/`` and then ``~0`` → ``~``, in that order, §4).

    Raises:
        ValueError: the pointer does not start with ``/`` or has a bad ``~`` escape.
    """
    if text == "":
        return ()
    if not text.startswith("/"):
        raise ValueError(f"JSON Pointer {text!r} must start with '/' (RFC 6901 §3)")
    tokens = text[1:].split("/")
    for token in tokens:
        # §3: '~' is only valid as '~0' or '~1'.
        if re.search(r"~(?![01])", token):
            raise ValueError(f"JSON Pointer {text!r} has an invalid '~' escape (RFC 6901 §3)")
    return tuple(t.replace("~1", "/").replace("~0", "~") for t in tokens)


def format_pointer(tokens: Sequence[str]) -> str:
    """The inverse of :func:`parse_pointer`."""
    return "".join("/" + t.replace("~", "~0").replace("/", "~1") for t in tokens)


def _parse_source(key: str, raw: object, params: Sequence[str]) -> Source:
    if not isinstance(raw, str) or ":" not in raw:
        raise RuleError(
            key,
            f"expected 'KIND:ARG' with KIND one of {', '.join(_SOURCE_KINDS)}; got {raw!r}",
        )
    kind_text, _, arg = raw.partition(":")
    kind = _SOURCE_KINDS.get(kind_text.strip())
    if kind is None:
        raise RuleError(key, f"unknown source kind {kind_text!r}; use one of {', '.join(_SOURCE_KINDS)}")
    if kind in (SourceKind.BODY, SourceKind.RESPONSE):
        try:
            return Source(kind=kind, pointer=parse_pointer(arg))
        except ValueError as exc:
            raise RuleError(key, str(exc)) from None
    if kind is SourceKind.CONST:
        if not arg:
            raise RuleError(key, "const: needs a value")
        return Source(kind=kind, value=arg)
    if not arg:
        raise RuleError(key, f"{kind.value}: needs a name")
    if kind is SourceKind.PATH and arg not in params:
        raise RuleError(
            key, f"path parameter {arg!r} is not in the route (has: {', '.join(params) or 'none'})"
        )
    if kind in (SourceKind.HEADER, SourceKind.RESPONSE_HEADER):
        if not is_token(arg):  # RFC 9110 §5.1: a field name is a token
            raise RuleError(key, f"{arg!r} is not a valid header name")
        arg = arg.lower()
    return Source(kind=kind, name=arg)


def _parse_methods(key: str, raw: object) -> frozenset[str] | None:
    if raw is None or raw == "*":
        return None
    items = [raw] if isinstance(raw, str) else raw
    if not isinstance(items, list) or not items:
        raise RuleError(key, "expected a method, a list of methods, or '*'")
    methods = set()
    for item in items:
        if not isinstance(item, str) or not _METHOD.match(item.upper()):
            raise RuleError(key, f"{item!r} is not an HTTP method")
        methods.add(item.upper())
    return frozenset(methods)


def _parse_route(key: str, raw: object) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Split a route template into segments; return (segments, parameter names)."""
    if not isinstance(raw, str) or not raw.startswith("/"):
        raise RuleError(key, f"a route must be a path starting with '/'; got {raw!r}")
    if "?" in raw or "#" in raw:
        raise RuleError(key, "a route is a path only; match query parameters with a 'query:' source")
    segments = tuple(raw.split("/")[1:])
    params: list[str] = []
    for segment in segments:
        if "{" in segment or "}" in segment:
            found = _PARAM.match(segment)
            if found is None:
                raise RuleError(
                    key, f"segment {segment!r}: a parameter must be a whole segment like {{orderId}}"
                )
            if found.group(1) in params:
                raise RuleError(key, f"parameter {found.group(1)!r} appears twice")
            params.append(found.group(1))
    return segments, tuple(params)


def _parse_rule(key: str, raw: object) -> tuple[Rule, tuple[str, ...]]:
    if not isinstance(raw, Mapping):
        raise RuleError(key, "a rule must be a mapping with at least 'route'")
    unknown = sorted(set(raw) - _RULE_KEYS)
    if unknown:
        raise RuleError(f"{key}.{unknown[0]}", f"unknown key; allowed: {', '.join(sorted(_RULE_KEYS))}")
    segments, params = _parse_route(f"{key}.route", raw.get("route"))
    name = raw.get("name", raw["route"])
    if not isinstance(name, str) or not name:
        raise RuleError(f"{key}.name", "must be a non-empty string")
    sources: dict[str, Source | None] = {}
    for field_name in ("order_id", "status", "observed_status"):
        value = raw.get(field_name)
        sources[field_name] = None if value is None else _parse_source(f"{key}.{field_name}", value, params)
    sample = raw.get("sample")
    if sample is not None:
        if isinstance(sample, bool) or not isinstance(sample, int | float) or not 0.0 <= sample <= 1.0:
            raise RuleError(f"{key}.sample", f"must be a number from 0 to 1; got {sample!r}")
        sample = float(sample)
    used = [s for s in sources.values() if s is not None]
    rule = Rule(
        name=name,
        methods=_parse_methods(f"{key}.method", raw.get("method")),
        route=raw["route"],
        order_id=sources["order_id"],
        status=sources["status"],
        observed_status=sources["observed_status"],
        sample=sample,
        needs_request_body=any(s.kind is SourceKind.BODY for s in used),
        needs_response_body=any(s.kind is SourceKind.RESPONSE for s in used),
    )
    return rule, segments


class _Node:
    """A trie node: literal children, at most one parameter child, rules ending here."""

    __slots__ = ("literal", "param", "param_name", "rules")

    def __init__(self) -> None:
        self.literal: dict[str, _Node] = {}
        self.param: _Node | None = None
        self.param_name = ""
        self.rules: list[Rule] = []


class CompiledRules:
    """Rules compiled into a segment trie.

    Literal segments win over parameters (``/orders/health`` before ``/orders/{id}``), and
    among rules with the same template the first listed that accepts the method wins.
    """

    __slots__ = ("_root", "rules")

    def __init__(self, rules: Sequence[tuple[Rule, tuple[str, ...], str]]) -> None:
        self._root = _Node()
        self.rules: tuple[Rule, ...] = tuple(rule for rule, _, _ in rules)
        for rule, segments, key in rules:
            node = self._root
            for segment in segments:
                found = _PARAM.match(segment)
                if found is None:
                    node = node.literal.setdefault(segment, _Node())
                    continue
                if node.param is None:
                    node.param = _Node()
                    node.param_name = found.group(1)
                elif node.param_name != found.group(1):
                    # Two templates sharing a prefix must name the parameter alike, or one
                    # segment would bind two names.
                    raise RuleError(
                        f"{key}.route",
                        f"parameter {{{found.group(1)}}} conflicts with {{{node.param_name}}} "
                        "at the same position in another route",
                    )
                node = node.param
            node.rules.append(rule)

    def match(self, method: str, path: str) -> RouteMatch | None:
        """Match a request to a rule.

        Args:
            method: the request method, upper case.
            path: the raw path without the query string, still percent-encoded.

        Returns:
            The match, or ``None`` when no rule covers the path and method.
        """
        if not path.startswith("/"):
            return None
        segments = path.split("/")
        found: list[tuple[str, str]] = []
        # First the path the full search tries first (a literal segment before a parameter),
        # in one loop; only when it ends nowhere does the search backtrack through the rest.
        node = self._root
        for index in range(1, len(segments)):
            segment = segments[index]
            child = node.literal.get(segment)
            if child is not None:
                node = child
            elif node.param is not None and segment:
                found.append((node.param_name, segment))
                node = node.param
            else:
                break
        else:
            for rule in node.rules:
                if rule.methods is None or method in rule.methods:
                    return RouteMatch(rule=rule, params=dict(found))
        found.clear()
        hit = self._walk(self._root, segments, 1, method, found)
        if hit is None:
            return None
        return RouteMatch(rule=hit, params=dict(found))

    def _walk(
        self, node: _Node, segments: list[str], index: int, method: str, found: list[tuple[str, str]]
    ) -> Rule | None:
        if index == len(segments):
            for rule in node.rules:
                if rule.methods is None or method in rule.methods:
                    return rule
            return None
        segment = segments[index]
        child = node.literal.get(segment)
        if child is not None:
            hit = self._walk(child, segments, index + 1, method, found)
            if hit is not None:
                return hit
        if node.param is not None and segment:
            found.append((node.param_name, segment))
            hit = self._walk(node.param, segments, index + 1, method, found)
            if hit is not None:
                return hit
            found.pop()
        return None


def compile_rules(raw: object, *, key: str) -> CompiledRules:
    """Compile a list of rule mappings (as parsed from YAML).

    Args:
        raw: the list under ``rule_sets.NAME`` or a listener's inline ``rules``.
        key: the config key of that list, used in error messages.

    Returns:
        The compiled rules.

    Raises:
        RuleError: naming the key of the first invalid rule.
    """
    if not isinstance(raw, list):
        raise RuleError(key, "expected a list of rules")
    parsed = []
    for index, item in enumerate(raw):
        rule, segments = _parse_rule(f"{key}[{index}]", item)
        parsed.append((rule, segments, f"{key}[{index}]"))
    return CompiledRules(parsed)
