"""Tests for tracecontext (trust policy, traceresponse, order trace ids) and the W3C parsing it relies on."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st
from opentelemetry import trace
from opentelemetry.propagate import get_global_textmap
from opentelemetry.trace import SpanContext
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from mes_trace_proxy.tracecontext import (
    MAX_TRACESTATE_LENGTH,
    NO_TRACESTATE,
    ParsedTraceState,
    TrustPolicy,
    caller_traceparent,
    format_span_id,
    format_trace_id,
    format_traceparent,
    order_trace_id,
    parse_traceparent,
    parse_tracestate,
    traceresponse,
)

# ── trust policy ──────────────────────────────────────────────────────────────────────────

POLICY = TrustPolicy.from_cidrs(["10.0.0.0/8", " 192.0.2.7 ", "2001:db8::/32", "::1", "198.51.100.9/32", ""])

TRUST_CASES: tuple[tuple[str, str | None, bool], ...] = (
    ("v4-in-network", "10.20.30.40", True),
    ("v4-network-edge", "10.255.255.255", True),
    ("v4-outside", "11.0.0.1", False),
    ("v4-single-host", "192.0.2.7", True),
    ("v4-host-neighbour", "192.0.2.8", False),
    ("v4-slash-32-is-a-host", "198.51.100.9", True),
    ("v6-in-network", "2001:db8:1::5", True),
    ("v6-outside", "2001:db9::1", False),
    ("v6-single-host", "::1", True),
    ("v6-host-other-spelling", "0:0:0:0:0:0:0:1", True),
    ("v6-upper-case", "2001:DB8::5", True),
    ("v4-mapped-in-network", "::ffff:10.1.2.3", True),
    ("v4-mapped-host", "::ffff:192.0.2.7", True),
    ("v4-mapped-outside", "::ffff:11.0.0.1", False),
    ("hostname", "localhost", False),
    ("garbage", "not-an-ip", False),
    ("empty", "", False),
    ("unknown-peer", None, False),
)


@pytest.mark.parametrize(
    ("address", "trusted"), [c[1:] for c in TRUST_CASES], ids=[c[0] for c in TRUST_CASES]
)
def test_trust_policy(address: str | None, trusted: bool) -> None:
    """CIDRs and single hosts, v4 and v6 in any spelling, decide whose context is continued."""
    assert POLICY.trusts(address) is trusted


@pytest.mark.parametrize(
    "cidrs",
    [
        pytest.param([], id="empty-list"),
        pytest.param(["*"], id="star"),
        pytest.param(["10.0.0.0/8", "*"], id="star-among-others"),
        pytest.param(["  "], id="blank-only"),
    ],
)
def test_trust_everyone(cidrs: list[str]) -> None:
    """'*' or no list trusts every caller, even one with no known address."""
    policy = TrustPolicy.from_cidrs(cidrs)
    assert policy.trust_all
    assert policy.trusts(None)
    assert policy.trusts("203.0.113.1")


def test_default_policy_trusts_everyone() -> None:
    """The sidecar default continues every caller's context."""
    assert TrustPolicy().trusts("203.0.113.1")


@pytest.mark.parametrize(
    "entry",
    [
        pytest.param("10.0.0.0/33", id="prefix-too-long"),
        pytest.param("10.0.0.256", id="octet-out-of-range"),
        pytest.param("mes.internal", id="hostname"),
        pytest.param("10.0.0.0/8/8", id="two-slashes"),
        pytest.param("2001:db8::/129", id="v6-prefix-too-long"),
        pytest.param("**", id="double-star"),
    ],
)
def test_invalid_trust_entry(entry: str) -> None:
    """An entry that is neither an address, a network nor '*' is a ValueError at start-up."""
    with pytest.raises(ValueError, match=re.escape(entry.split("/")[0])):
        TrustPolicy.from_cidrs(["10.0.0.0/8", entry])


def test_host_bits_are_tolerated() -> None:
    """'10.1.2.3/8' means the network 10.0.0.0/8 (strict=False), as operators write it."""
    policy = TrustPolicy.from_cidrs(["10.1.2.3/8"])
    assert policy.trusts("10.200.0.1")


# ── ids sent back ─────────────────────────────────────────────────────────────────────────

TRACEPARENT = re.compile(r"00-[0-9a-f]{32}-[0-9a-f]{16}-0[01]")


@pytest.mark.parametrize(
    ("trace_id", "span_id", "sampled", "expected"),
    [
        pytest.param(
            0x0AF7651916CD43DD8448EB211C80319C,
            0xB7AD6B7169203331,
            True,
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            id="w3c-example-sampled",
        ),
        pytest.param(1, 1, False, f"00-{'0' * 31}1-{'0' * 15}1-00", id="zero-padded-unsampled"),
        pytest.param(2**128 - 1, 2**64 - 1, True, f"00-{'f' * 32}-{'f' * 16}-01", id="all-ones"),
    ],
)
def test_traceresponse(trace_id: int, span_id: int, sampled: bool, expected: str) -> None:
    """traceresponse is version-traceid-childid-flags in lower-case hex (Trace Context Level 2)."""
    value = traceresponse(trace_id, span_id, sampled)
    assert value == expected
    assert TRACEPARENT.fullmatch(value)


def test_formatted_ids() -> None:
    """Trace ids are 32 and span ids 16 lower-case hex digits, zero-padded."""
    assert format_trace_id(0xABC) == "0" * 29 + "abc"
    assert format_span_id(0xABC) == "0" * 13 + "abc"


ORDERS = ("A-1001", "A-1002", "a-1001", "deadbeef", "0", "", "\u0417\u0410\u041a\u0410\u0417-7")


@pytest.mark.parametrize("order_id", ORDERS)
def test_order_trace_id(order_id: str) -> None:
    """An order's trace id is stable, 128-bit, non-zero, and does not spell the order id."""
    value = order_trace_id(order_id)
    assert value == order_trace_id(order_id)
    assert 0 < value < 2**128
    assert SpanContext(trace_id=value, span_id=1, is_remote=False).is_valid
    # Short ids ("0") occur in any hex string by chance; a hex-looking id must not show through.
    if len(order_id) >= 4:
        assert order_id.lower() not in format_trace_id(value)


def test_order_trace_ids_differ() -> None:
    """Different orders (even differing in case only) and different salts give different traces."""
    ids = {order_trace_id(order) for order in ORDERS}
    assert len(ids) == len(ORDERS)
    assert order_trace_id("A-1001", salt="site-b") != order_trace_id("A-1001")


# ── W3C Trace Context through the propagator the proxy uses ──────────────────────────────

TRACE = "0af7651916cd43dd8448eb211c80319c"
SPAN = "b7ad6b7169203331"
VALID = f"00-{TRACE}-{SPAN}-01"


def _extract(carrier: dict[str, str]) -> SpanContext:
    """What proxy.py does: the global text map (tracecontext + baggage) over the request headers."""
    context = get_global_textmap().extract(carrier)
    return trace.get_current_span(context).get_span_context()


TRACEPARENT_CASES: tuple[tuple[str, str, bool], ...] = (
    ("valid", VALID, True),
    ("unsampled", f"00-{TRACE}-{SPAN}-00", True),
    ("upper-case-hex", f"00-{TRACE.upper()}-{SPAN}-01", False),
    ("upper-case-span", f"00-{TRACE}-{SPAN.upper()}-01", False),
    ("version-ff", f"ff-{TRACE}-{SPAN}-01", False),
    ("all-zero-trace-id", f"00-{'0' * 32}-{SPAN}-01", False),
    ("all-zero-span-id", f"00-{TRACE}-{'0' * 16}-01", False),
    ("future-version-extra-fields", f"01-{TRACE}-{SPAN}-01-what-the-future-holds", True),
    ("future-version-four-fields", f"cc-{TRACE}-{SPAN}-01", True),
    ("future-version-too-few-fields", f"01-{TRACE}-{SPAN}", False),
    ("version-00-extra-field", f"00-{TRACE}-{SPAN}-01-extra", False),
    ("short-trace-id", f"00-{TRACE[:-1]}-{SPAN}-01", False),
    ("long-span-id", f"00-{TRACE}-{SPAN}0-01", False),
    ("non-hex", f"00-{TRACE[:-1]}g-{SPAN}-01", False),
    ("underscores", f"00_{TRACE}_{SPAN}_01", False),
    ("empty", "", False),
)


@pytest.mark.parametrize(
    ("traceparent", "valid"), [c[1:] for c in TRACEPARENT_CASES], ids=[c[0] for c in TRACEPARENT_CASES]
)
def test_traceparent_parsing(traceparent: str, valid: bool) -> None:
    """The SDK's propagator follows W3C Trace Context §3.2 (and §4.3 for future versions).

    A higher version is parsed by its first four fields; version 00 with a fifth field,
    version ff, upper-case hex and all-zero ids are invalid and give no parent.
    """
    context = _extract({"traceparent": traceparent})
    assert context.is_valid is valid
    if valid:
        assert context.is_remote
        assert format_trace_id(context.trace_id) == TRACE
        assert format_span_id(context.span_id) == SPAN


def test_sampled_flag_is_read() -> None:
    """Only the sampled bit of trace-flags is kept; other bits are ignored."""
    assert _extract({"traceparent": VALID}).trace_flags.sampled
    assert not _extract({"traceparent": f"00-{TRACE}-{SPAN}-00"}).trace_flags.sampled
    assert _extract({"traceparent": f"00-{TRACE}-{SPAN}-09"}).trace_flags.sampled


def test_missing_traceparent_gives_no_parent() -> None:
    """No traceparent, even with a tracestate, means no parent: the proxy starts a new trace."""
    assert not _extract({}).is_valid
    assert not _extract({"tracestate": "congo=t61rcWkgMzE"}).is_valid


def test_valid_tracestate_is_kept() -> None:
    """A well-formed tracestate travels with its parent, members in order."""
    context = _extract({"traceparent": VALID, "tracestate": "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"})
    assert list(context.trace_state.items()) == [("congo", "t61rcWkgMzE"), ("rojo", "00f067aa0ba902b7")]


@pytest.mark.parametrize(
    "tracestate",
    [
        pytest.param(",".join(f"k{i}=v{i}" for i in range(33)), id="33-members"),
        pytest.param("a=1,a=2", id="duplicate-key"),
        pytest.param("Upper=1", id="upper-case-key"),
        pytest.param("a=1,=2", id="empty-key"),
    ],
)
def test_invalid_tracestate_is_dropped_but_parent_kept(tracestate: str) -> None:
    """W3C §3.3.1.1: an invalid tracestate is discarded whole; the traceparent still counts."""
    context = _extract({"traceparent": VALID, "tracestate": tracestate})
    assert context.is_valid
    assert format_trace_id(context.trace_id) == TRACE
    assert len(context.trace_state) == 0


def test_thirty_two_members_is_the_limit() -> None:
    """Exactly 32 list-members (§3.3.1.1's maximum) are kept."""
    context = _extract({"traceparent": VALID, "tracestate": ",".join(f"k{i}=v{i}" for i in range(32))})
    assert len(context.trace_state) == 32


def test_tracestate_over_512_characters_is_kept() -> None:
    """The SDK keeps a tracestate over 512 characters (6 members of 100-character values here).

    W3C §3.3.1.5 asks vendors to propagate at least 512 characters and *allows* (does not
    require) truncating beyond that, dropping members over 128 characters first; the SDK does
    not truncate, which the spec permits. The proxy passes it on as the SDK gives it.
    """
    tracestate = ",".join(f"k{i}={'x' * 100}" for i in range(6))
    assert len(tracestate) > 512
    context = _extract({"traceparent": VALID, "tracestate": tracestate})
    assert context.is_valid
    assert len(context.trace_state) == 6


@pytest.mark.parametrize(
    ("cidr", "address", "trusted"),
    [
        pytest.param("::ffff:0:0/128", "::ffff:0:0", True, id="mapped-host-as-written"),
        pytest.param("::ffff:0:0/128", "0:0:0:0:0:ffff:0:0", True, id="mapped-host-other-spelling"),
        pytest.param("::ffff:0:0/128", "0.0.0.0", True, id="mapped-host-ipv4-self"),
        pytest.param("::ffff:10.0.0.0/104", "10.9.8.7", True, id="mapped-network-ipv4-caller"),
        pytest.param("::ffff:10.0.0.0/104", "::ffff:10.9.8.7", True, id="mapped-network-mapped-caller"),
        pytest.param("::ffff:10.0.0.0/104", "11.0.0.1", False, id="mapped-network-outside"),
        pytest.param("10.0.0.0/8", "::ffff:10.1.1.1", True, id="ipv4-network-mapped-caller"),
    ],
)
def test_ipv4_mapped_entries_mean_their_ipv4_selves(cidr: str, address: str, trusted: bool) -> None:
    """An IPv4-mapped entry and caller are compared as IPv4, so no spelling changes the verdict."""
    assert TrustPolicy.from_cidrs([cidr]).trusts(address) is trusted


# ── the W3C fast path against the propagator it stands in for ──────────────────────────────────
_W3C = TraceContextTextMapPropagator()
_TRACEPARENTS = [
    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00",
    " \t00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-03\t ",
    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
    "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-future-part",
    "cc-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-09",
    "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    "00-00000000000000000000000000000000-b7ad6b7169203331-01",
    "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
    "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b716920333-01",
    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-1",
    "0-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\n",
    "",
    "garbage",
]


def _propagator_ids(value: str) -> tuple[int, int, int] | None:
    context = trace.get_current_span(_W3C.extract({"traceparent": value})).get_span_context()
    return (context.trace_id, context.span_id, int(context.trace_flags)) if context.is_valid else None


@pytest.mark.parametrize("value", _TRACEPARENTS)
def test_parse_traceparent_agrees_with_the_w3c_propagator(value: str) -> None:
    """Every accepted and refused shape is judged as opentelemetry's W3C propagator judges it."""
    assert parse_traceparent(value) == _propagator_ids(value)


@given(
    st.one_of(
        st.text(max_size=80),
        st.builds(
            "{}-{}-{}-{}{}".format,
            st.text("0123456789abcdefF", min_size=2, max_size=2),
            st.text("0123456789abcdef", min_size=31, max_size=33),
            st.text("0123456789abcdef", min_size=15, max_size=17),
            st.text("0123456789abcdef", min_size=1, max_size=3),
            st.sampled_from(["", "-", "-x", " ", "\t", "\n"]),
        ),
    )
)
def test_parse_traceparent_agrees_with_the_w3c_propagator_on_generated_values(value: str) -> None:
    """Generated near-misses: the fast path never accepts or reads what the propagator would not."""
    assert parse_traceparent(value) == _propagator_ids(value)


@pytest.mark.parametrize(
    ("trace_id", "span_id", "flags"), [(1, 1, 0), (2**128 - 1, 2**64 - 1, 255), (0xAB, 0xCD, 1)]
)
def test_format_traceparent_is_what_the_propagator_injects(trace_id: int, span_id: int, flags: int) -> None:
    """The same string as the W3C propagator writes for that span context."""
    carrier: dict[str, str] = {}
    context = SpanContext(trace_id, span_id, is_remote=False, trace_flags=trace.TraceFlags(flags))
    _W3C.inject(carrier, context=trace.set_span_in_context(trace.NonRecordingSpan(context)))
    assert format_traceparent(trace_id, span_id, flags) == carrier["traceparent"]


# ── every field of the message (the official W3C suite, docs/tracecontext.md) ────────────


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        pytest.param([VALID], (int(TRACE, 16), int(SPAN, 16), 1), id="one-field"),
        pytest.param([], None, id="no-field"),
        pytest.param([VALID, VALID], None, id="two-equal-fields"),
        pytest.param([VALID, f"00-{'1' * 32}-{SPAN}-01"], None, id="two-fields"),
        pytest.param([f"00-{TRACE}-{SPAN}-01-x"], None, id="one-invalid-field"),
    ],
)
def test_caller_traceparent_needs_exactly_one_field(
    values: list[str], expected: tuple[int, int, int] | None
) -> None:
    """traceparent is not a list (§3.2): two fields, even equal ones, are no trace context."""
    assert caller_traceparent(values) == expected


KEY_ALL = "abcdefghijklmnopqrstuvwxyz0123456789_-*/"
VALUE_ALL = "".join(map(chr, [*range(0x20, 0x2C), *range(0x2D, 0x3D), *range(0x3E, 0x7F)]))

#: (id, fields as received, members kept or None when the whole list is discarded)
TRACESTATE_CASES: tuple[tuple[str, list[str], list[tuple[str, str]] | None], ...] = (
    # The spec's own examples (W3C Trace Context §3.3.1, §3.3.1.3 and "Mutating the tracestate").
    (
        "spec-two-vendors",
        ["rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"],
        [("rojo", "00f067aa0ba902b7"), ("congo", "t61rcWkgMzE")],
    ),
    (
        "spec-updated-vendor-first",
        ["congo=ucfJifl5GOE,rojo=00f067aa0ba902b7"],
        [("congo", "ucfJifl5GOE"), ("rojo", "00f067aa0ba902b7")],
    ),
    (
        "spec-two-fields-one-list",
        ["rojo=00f067aa0ba902b7", "congo=t61rcWkgMzE"],
        [("rojo", "00f067aa0ba902b7"), ("congo", "t61rcWkgMzE")],
    ),
    (
        "spec-base64-value",
        ["congo=BleGNlZWRzIHRohbCBwbGVhc3VyZS4"],
        [("congo", "BleGNlZWRzIHRohbCBwbGVhc3VyZS4")],
    ),
    ("spec-tenant-at-vendor", ["fw529a3039@dt=FJ8b,rojo=1"], [("fw529a3039@dt", "FJ8b"), ("rojo", "1")]),
    # The suite's cases (test/test.py at w3c/trace-context acab820).
    (
        "fields-combined-in-order",
        ["foo=1,bar=2", "rojo=1,congo=2", "baz=3"],
        [("foo", "1"), ("bar", "2"), ("rojo", "1"), ("congo", "2"), ("baz", "3")],
    ),
    ("empty-field-alone", [""], []),
    ("empty-field-after", ["foo=1", ""], [("foo", "1")]),
    ("empty-field-before", ["", "foo=1"], [("foo", "1")]),
    ("empty-members", [",foo=1,, ,\t,bar=2,"], [("foo", "1"), ("bar", "2")]),
    ("ows-around-members", ["foo=1 \t , \t bar=2, \t baz=3"], [("foo", "1"), ("bar", "2"), ("baz", "3")]),
    ("ows-around-field", ["\t foo=1 \t"], [("foo", "1")]),
    ("duplicate-key-same-value", ["foo=1,foo=1"], [("foo", "1")]),
    ("duplicate-key-first-wins", ["foo=1,foo=2"], [("foo", "1")]),
    ("duplicate-key-across-fields", ["foo=1,bar=2", "foo=2"], [("foo", "1"), ("bar", "2")]),
    ("all-allowed-characters", [f"{KEY_ALL}={VALUE_ALL}"], [(KEY_ALL, VALUE_ALL)]),
    (
        "all-allowed-with-vendor",
        [f"{KEY_ALL}@a-z0-9_-*/={VALUE_ALL}"],
        [(f"{KEY_ALL}@a-z0-9_-*/", VALUE_ALL)],
    ),
    ("digit-first-key", ["0abc=1"], [("0abc", "1")]),
    ("at-last", ["foo@=1,bar=2"], [("foo@", "1"), ("bar", "2")]),
    ("at-twice", ["foo@@bar=1,bar=2"], [("foo@@bar", "1"), ("bar", "2")]),
    ("at-twice-apart", ["foo@bar@baz=1,bar=2"], [("foo@bar@baz", "1"), ("bar", "2")]),
    ("key-256", ["foo=1", "z" * 256 + "=1"], [("foo", "1"), ("z" * 256, "1")]),
    ("long-tenant-short-vendor", ["foo=1", "t" * 242 + "@v=1"], [("foo", "1"), ("t" * 242 + "@v", "1")]),
    ("short-tenant-long-vendor", ["foo=1", "t@" + "v" * 15 + "=1"], [("foo", "1"), ("t@" + "v" * 15, "1")]),
    ("value-256", ["foo=" + "x" * 256], [("foo", "x" * 256)]),
    (
        "32-members",
        [",".join(f"bar{i:02}={i:02}" for i in range(1, 33))],
        [(f"bar{i:02}", f"{i:02}") for i in range(1, 33)],
    ),
    # Discarded whole (the trace is kept: test_span_context.py).
    ("33-members", [",".join(f"bar{i:02}={i:02}" for i in range(1, 31)), "bar31=31,bar32=32,bar33=33"], None),
    ("key-257", ["foo=1", "z" * 257 + "=1"], None),
    ("at-first", ["@foo=1,bar=2"], None),
    ("upper-case-key", ["FOO=1"], None),
    ("dot-in-key", ["foo.bar=1"], None),
    ("space-in-key", ["foo =1"], None),
    ("equals-in-value", ["foo=bar=baz"], None),
    ("empty-value", ["foo=,bar=3"], None),
    ("del-in-value", ["foo=1", "bar=2\x7f"], None),
    ("value-257", ["foo=" + "x" * 257], None),
    ("non-ascii-value", ["foo=\u00e9"], None),
    ("no-equals", ["foo"], None),
    ("invalid-in-a-later-field", ["foo=1", "bar=2", "Baz=3"], None),
)


@pytest.mark.parametrize(
    ("values", "members"), [c[1:] for c in TRACESTATE_CASES], ids=[c[0] for c in TRACESTATE_CASES]
)
def test_parse_tracestate(values: list[str], members: list[tuple[str, str]] | None) -> None:
    """W3C Trace Context §3.3 with the editor's-draft key grammar: combined, validated, or discarded whole."""
    parsed = parse_tracestate(values)
    if members is None:
        assert parsed.members == ()
        assert parsed.problem is not None
    else:
        assert parsed == ParsedTraceState(tuple(members))


def test_tracestate_over_the_length_bound_is_not_read() -> None:
    """Fields longer than MAX_TRACESTATE_LENGTH in all are discarded before any member is parsed."""
    member = "k=" + "v" * 100
    fields = [",".join([member] * 20)] * 5
    assert sum(map(len, fields)) > MAX_TRACESTATE_LENGTH
    parsed = parse_tracestate(fields)
    assert parsed.members == ()
    assert parsed.problem == f"longer than {MAX_TRACESTATE_LENGTH} characters"


def test_no_tracestate_is_the_empty_parse() -> None:
    """No field at all parses to the shared empty value."""
    assert parse_tracestate([]) == NO_TRACESTATE


def test_personal_members_are_left_out_and_counted() -> None:
    """A member the predicate flags is dropped, the others stay, and a later duplicate cannot replace it."""
    flagged = {"crm=canary@example.com", "tel=79001234567"}
    parsed = parse_tracestate(
        ["rojo=1,crm=canary@example.com", "tel=79001234567,congo=2,crm=clean"], personal=flagged.__contains__
    )
    assert parsed == ParsedTraceState((("rojo", "1"), ("congo", "2")), None, 2)
