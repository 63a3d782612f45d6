"""Tests for extract: RFC 6901 evaluation, which JSON values become facts, and bodies that are not JSON."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict

from mes_trace_proxy.core.extract import (
    MAX_VALUE_LENGTH,
    NO_FACTS,
    OrderFacts,
    _parse_json,
    is_json_content_type,
    read_pointer,
    request_facts,
    response_facts,
)
from mes_trace_proxy.core.rules import RouteMatch, compile_rules, parse_pointer

# RFC 6901 §5, verbatim.
RFC6901_DOC: dict[str, object] = {
    "foo": ["bar", "baz"],
    "": 0,
    "a/b": 1,
    "c%d": 2,
    "e^f": 3,
    "g|h": 4,
    "i\\j": 5,
    'k"l': 6,
    " ": 7,
    "m~n": 8,
}

RFC6901_EXAMPLES: tuple[tuple[str, object], ...] = (
    ("", RFC6901_DOC),
    ("/foo", ["bar", "baz"]),
    ("/foo/0", "bar"),
    ("/", 0),
    ("/a~1b", 1),
    ("/c%d", 2),
    ("/e^f", 3),
    ("/g|h", 4),
    ("/i\\j", 5),
    ('/k"l', 6),
    ("/ ", 7),
    ("/m~0n", 8),
)


@pytest.mark.parametrize(
    ("pointer", "expected"), RFC6901_EXAMPLES, ids=[repr(p) for p, _ in RFC6901_EXAMPLES]
)
def test_rfc6901_section5_examples(pointer: str, expected: object) -> None:
    """Every example of RFC 6901 §5 evaluates to the value the RFC lists."""
    assert read_pointer(RFC6901_DOC, parse_pointer(pointer)) == expected


# The same examples seen as facts: only scalars survive, numbers as their JSON text.
FACT_EXAMPLES: tuple[tuple[str, str | None], ...] = (
    ("", None),
    ("/foo", None),
    ("/foo/0", "bar"),
    ("/", "0"),
    ("/a~1b", "1"),
    ("/m~0n", "8"),
    ('/k"l', "6"),
)


def _match(spec: str, *, order_id: str | None = None, route: str = "/o") -> RouteMatch:
    rule: dict[str, object] = {"name": "r", "route": route, "status": spec}
    if order_id is not None:
        rule["order_id"] = order_id
    rules = compile_rules([rule], key="rules")
    match = rules.match("POST", route.replace("{id}", "A-1"))
    assert match is not None
    return match


def _status(spec: str, body: bytes | None) -> str | None:
    return request_facts(_match(spec), raw_query="", headers=CIMultiDict(), body=body).status


@pytest.mark.parametrize(("pointer", "fact"), FACT_EXAMPLES, ids=[repr(p) for p, _ in FACT_EXAMPLES])
def test_rfc6901_examples_as_facts(pointer: str, fact: str | None) -> None:
    """Objects and arrays never become facts; scalars do, as text."""
    assert _status(f"body:{pointer}", json.dumps(RFC6901_DOC).encode()) == fact


ARRAY_CASES: tuple[tuple[str, str, object], ...] = (
    ("first", "/0", "a"),
    ("last", "/2", "c"),
    ("past-the-end", "/3", None),
    ("dash-names-no-element", "/-", None),
    ("leading-zero", "/01", None),
    ("double-zero", "/00", None),
    ("negative", "/-1", None),
    ("plus-sign", "/+1", None),
    ("space", "/ 1", None),
    ("decimal", "/1.0", None),
    ("hex", "/0x1", None),
    ("superscript-digit", "/\u00b2", None),
    ("arabic-indic-digit", "/\u0661", None),
    ("fullwidth-digit", "/\uff11", None),
    ("huge-index", "/" + "9" * 5000, None),
    ("empty-token", "/", None),
)


@pytest.mark.parametrize(
    ("pointer", "expected"), [c[1:] for c in ARRAY_CASES], ids=[c[0] for c in ARRAY_CASES]
)
def test_array_index_rules(pointer: str, expected: object) -> None:
    """RFC 6901 §4: an array index is ASCII decimal without leading zeros; anything else resolves to None."""
    assert read_pointer(["a", "b", "c"], parse_pointer(pointer)) == expected


@pytest.mark.parametrize(
    ("document", "pointer"),
    [
        pytest.param({"a": 1}, "/b", id="missing-member"),
        pytest.param({"a": 1}, "/a/b", id="through-a-number"),
        pytest.param({"a": "text"}, "/a/0", id="into-a-string"),
        pytest.param({"a": None}, "/a/b", id="through-null"),
        pytest.param(None, "/a", id="no-document"),
        pytest.param({"0": "x"}, "/00", id="object-keys-are-exact"),
    ],
)
def test_unresolved_pointers_are_none(document: object, pointer: str) -> None:
    """A pointer that does not resolve yields None instead of raising (§7 leaves handling to us)."""
    assert read_pointer(document, parse_pointer(pointer)) is None


def test_numeric_token_on_object_is_a_member_name() -> None:
    """On an object, "0" is a member name, not an index (§4)."""
    assert read_pointer({"0": "zero"}, ("0",)) == "zero"


BODIES: tuple[tuple[str, bytes | None], ...] = (
    ("none", None),
    ("empty", b""),
    ("text", b"status=SHIPPED"),
    ("truncated", b'{"status": "SHI'),
    ("invalid-utf8", b'{"status": "\xff\xfe"}'),
    ("binary", bytes(range(256))),
    ("deep-arrays", b"[" * 100_000),
    ("deep-objects", b'{"a":' * 100_000),
    ("deep-but-closed", b"[" * 50_000 + b"]" * 50_000),
    ("json-string", b'"SHIPPED"'),
    ("json-null", b"null"),
    ("json-array", b'[{"status": "SHIPPED"}]'),
    ("trailing-garbage", b'{"status": "SHIPPED"} x'),
    ("huge-int", b'{"status": ' + b"9" * 5000 + b"}"),
)


@pytest.mark.parametrize("body", [b for _, b in BODIES], ids=[i for i, _ in BODIES])
def test_bodies_that_hold_no_status(body: bytes | None) -> None:
    """Non-JSON, garbage, too deep or wrongly shaped bodies yield no fact and never raise."""
    assert _status("body:/status", body) is None


VALUES: tuple[tuple[str, object, str | None], ...] = (
    ("string", "SHIPPED", "SHIPPED"),
    ("int", 42, "42"),
    ("negative-int", -7, "-7"),
    ("float", 1250.5, "1250.5"),
    ("true", True, "true"),
    ("false", False, "false"),
    ("null", None, None),
    ("empty-string", "", None),
    ("object", {"code": "SHIPPED"}, None),
    ("array", ["SHIPPED"], None),
    ("empty-object", {}, None),
    ("at-limit", "S" * MAX_VALUE_LENGTH, "S" * MAX_VALUE_LENGTH),
    ("over-limit", "S" * (MAX_VALUE_LENGTH + 1), None),
    ("unicode", "\u0413\u041e\u0422\u041e\u0412", "\u0413\u041e\u0422\u041e\u0412"),
)


@pytest.mark.parametrize(("value", "fact"), [v[1:] for v in VALUES], ids=[v[0] for v in VALUES])
def test_which_values_become_facts(value: object, fact: str | None) -> None:
    """Scalars up to 128 characters become text facts; objects, arrays, null and long values never do."""
    assert _status("body:/status", json.dumps({"status": value}).encode()) == fact


def test_utf16_json_is_read() -> None:
    """JSON in UTF-16 with a BOM is JSON (RFC 8259 §8.1 readers may accept it; json.loads does)."""
    assert _status("body:/status", '{"status": "SHIPPED"}'.encode("utf-16")) == "SHIPPED"


SOURCE_CASES: tuple[tuple[str, str, str, tuple[tuple[str, str], ...], str | None], ...] = (
    ("query", "query:order", "order=A-7&x=1", (), "A-7"),
    ("query-first-wins", "query:order", "order=A-7&order=B-8", (), "A-7"),
    ("query-decoded", "query:order", "order=A%2F7+x", (), "A/7 x"),
    ("query-blank-skipped", "query:order", "order=&order=B-8", (), "B-8"),
    ("query-absent", "query:order", "x=1", (), None),
    ("query-empty", "query:order", "", (), None),
    ("header-any-case", "header:X-Order-Id", "", (("x-order-id", "A-9"),), "A-9"),
    ("header-absent", "header:X-Order-Id", "", (), None),
    ("header-too-long", "header:X-Order-Id", "", (("X-Order-Id", "A" * 200),), None),
    ("const", "const:SUBMITTED", "", (), "SUBMITTED"),
)


@pytest.mark.parametrize(
    ("spec", "query", "headers", "fact"), [c[1:] for c in SOURCE_CASES], ids=[c[0] for c in SOURCE_CASES]
)
def test_request_sources(
    spec: str, query: str, headers: tuple[tuple[str, str], ...], fact: str | None
) -> None:
    """query:, header: and const: sources read the request as documented."""
    facts = request_facts(_match(spec), raw_query=query, headers=CIMultiDict(headers), body=None)
    assert facts.status == fact


def test_rule_without_sources_gives_no_facts() -> None:
    """A rule that reads nothing returns the shared empty facts without touching the body."""
    rules = compile_rules([{"route": "/health"}], key="rules")
    match = rules.match("GET", "/health")
    assert match is not None
    assert request_facts(match, raw_query="", headers=CIMultiDict(), body=b"[" * 10) is NO_FACTS


def test_response_sources_are_not_read_from_the_request() -> None:
    """Before the response, response: and response_header: sources stay unresolved."""
    match = _match("response:/status", order_id="response_header:X-Order-Id")
    facts = request_facts(
        match, raw_query="", headers=CIMultiDict({"X-Order-Id": "A-1"}), body=b'{"status":"X"}'
    )
    assert facts == OrderFacts()


def _respond(
    match: RouteMatch, before: OrderFacts, body: bytes | None, headers: dict[str, str] | None = None
) -> OrderFacts:
    return response_facts(
        match,
        before,
        raw_query="",
        request_headers=CIMultiDict(),
        response_headers=CIMultiDict(headers or {}),
        response_body=body,
    )


def test_response_fills_id_and_status_only_it_knows() -> None:
    """An id and a status sourced from the response are filled in once the response arrives."""
    match = _match("response_header:X-Status", order_id="response:/orderId")
    after = _respond(match, OrderFacts(), b'{"orderId": "A-5"}', {"x-status": "SUBMITTED"})
    assert after == OrderFacts(order_id="A-5", status="SUBMITTED")


def test_response_keeps_request_facts() -> None:
    """What the request said is kept; the response adds the observed status."""
    rules = compile_rules(
        [
            {
                "route": "/o/{id}",
                "order_id": "path:id",
                "status": "body:/status",
                "observed_status": "response:/status",
            }
        ],
        key="rules",
    )
    match = rules.match("PUT", "/o/A-1")
    assert match is not None
    before = request_facts(match, raw_query="", headers=CIMultiDict(), body=b'{"status": "SHIPPED"}')
    after = _respond(match, before, b'{"status": "PACKAGING", "orderId": "B-2"}')
    assert after == OrderFacts(order_id="A-1", status="SHIPPED", observed_status="PACKAGING")
    assert _respond(match, before, None) == OrderFacts(order_id="A-1", status="SHIPPED")
    assert _respond(match, before, b"<html>502</html>") == OrderFacts(order_id="A-1", status="SHIPPED")


def test_response_without_response_sources_returns_before() -> None:
    """A rule with no response sources returns the request facts object unchanged."""
    match = _match("body:/status")
    before = OrderFacts(status="X")
    assert _respond(match, before, b'{"status": "Y"}') is before


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param("application/json", True, id="json"),
        pytest.param("application/json; charset=utf-8", True, id="json-charset"),
        pytest.param("Application/JSON ;charset=UTF-8", True, id="case-and-spacing"),
        pytest.param("application/problem+json", True, id="problem-json"),
        pytest.param("application/vnd.mes.order+json; v=2", True, id="vendor-suffix"),
        pytest.param("text/json", False, id="text-json"),
        pytest.param("application/jsonp", False, id="jsonp"),
        pytest.param("application/json-seq", False, id="json-seq"),
        pytest.param("application/x-ndjson", False, id="ndjson"),
        pytest.param("application/octet-stream", False, id="octet-stream"),
        pytest.param("multipart/form-data; boundary=x", False, id="multipart"),
        pytest.param("+json", False, id="bare-suffix"),
        pytest.param("", False, id="empty"),
        pytest.param(None, False, id="none"),
    ],
)
def test_is_json_content_type(value: str | None, expected: bool) -> None:
    """application/json and application/*+json (RFC 6839 §3.1) count as JSON; nothing else does."""
    assert is_json_content_type(value) is expected


# Bodies where orjson and the standard library disagree or one of them refuses: the reading is
# always json.loads's (orjson is only the fast path for what it reads the same way).
_READ_AS_THE_STANDARD_LIBRARY_DOES: tuple[tuple[str, bytes], ...] = (
    ("plain", b'{"status": "SHIPPED"}'),
    ("utf8-bom", b'\xef\xbb\xbf{"status": "SHIPPED"}'),
    ("utf16-bom", '{"status": "SHIPPED"}'.encode("utf-16")),
    ("utf32", '{"status": "SHIPPED"}'.encode("utf-32")),
    ("int-past-64-bits", b'{"status": "SHIPPED", "barcode": 123456789012345678901234567890}'),
    ("negative-int-past-64-bits", b'{"n": -123456789012345678901234567890}'),
    ("u64-max", b'{"n": 18446744073709551615}'),
    ("infinity", b'{"status": "SHIPPED", "weight": Infinity}'),
    ("huge-float", b'{"weight": 1e400}'),
    ("lone-surrogate", b'{"status": "SHIPPED", "note": "\\ud800"}'),
    ("surrogate-pair", b'{"note": "\\ud83d\\udc8d"}'),
    ("duplicate-keys", b'{"status": "SUBMITTED", "status": "SHIPPED"}'),
    ("deep", b"[" * 200 + b"]" * 200),
    ("not-json", b"status=SHIPPED"),
    ("invalid-utf8", b'{"status": "\xff"}'),
    ("trailing-garbage", b'{"status": "SHIPPED"} x'),
)


@pytest.mark.parametrize(
    "body",
    [b for _, b in _READ_AS_THE_STANDARD_LIBRARY_DOES],
    ids=[n for n, _ in _READ_AS_THE_STANDARD_LIBRARY_DOES],
)
def test_bodies_read_as_json_loads_reads_them(body: bytes) -> None:
    """The fast parser never changes what a body says: every case equals json.loads (or both refuse)."""
    try:
        expected: object = json.loads(body)
    except ValueError:
        expected = None
    assert repr(_parse_json(body)) == repr(expected)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4),
    max_leaves=20,
)


@given(_JSON)
def test_any_json_document_reads_as_json_loads_reads_it(document: object) -> None:
    """Generated documents (any ints, floats, text with escapes) read the same both ways."""
    for body in (json.dumps(document).encode(), json.dumps(document, ensure_ascii=False).encode()):
        assert repr(_parse_json(body)) == repr(json.loads(body))
