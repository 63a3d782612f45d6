"""Incoming trace context: reading ``traceparent``/``tracestate``, whom to trust, the ids sent back.

Parsing ``traceparent``/``tracestate``/``baggage`` is the OpenTelemetry API propagators' job
(W3C Trace Context Level 1/2 and W3C Baggage), and they stay in charge whenever
``OTEL_PROPAGATORS`` names anything but the default pair. For the default pair, on the hot path,
:func:`parse_traceparent` and :func:`format_traceparent` do the same as the W3C propagator
(the same pattern, the same refusals, the same output; ``tests/test_tracecontext.py`` compares
them over generated headers) without building a ``Context`` for each request, and
:func:`caller_traceparent` / :func:`parse_tracestate` read *every* field of the message, as the
official W3C suite checks (docs/tracecontext.md): one ``traceparent`` exactly, and the
``tracestate`` fields combined in order, validated by the editor's-draft key grammar.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Final

__all__ = [
    "MAX_TRACESTATE_LENGTH",
    "MAX_TRACESTATE_MEMBERS",
    "NO_TRACESTATE",
    "ParsedTraceState",
    "TrustPolicy",
    "caller_traceparent",
    "format_span_id",
    "format_trace_id",
    "format_traceparent",
    "order_trace_id",
    "parse_traceparent",
    "parse_tracestate",
    "traceresponse",
]

# W3C Trace Context Level 2 §"traceresponse": version-traceid-childid-flags; we answer with
# the proxy's SERVER span so the caller can jump straight to it.
_VERSION: Final = "00"


def format_trace_id(trace_id: int) -> str:
    """32 lower-case hex digits (W3C Trace Context §3.2.2.3)."""
    return f"{trace_id:032x}"


def format_span_id(span_id: int) -> str:
    """16 lower-case hex digits (W3C Trace Context §3.2.2.4)."""
    return f"{span_id:016x}"


def traceresponse(trace_id: int, span_id: int, sampled: bool) -> str:
    """The ``traceresponse`` header value for a span."""
    return f"{_VERSION}-{trace_id:032x}-{span_id:016x}-{'01' if sampled else '00'}"


# The W3C propagator's own pattern (opentelemetry.trace.propagation.tracecontext): spaces and
# tabs around the value allowed, lower-case hex, and anything after a fourth "-" (which only a
# version after 00 may carry).
_TRACEPARENT: Final = re.compile(
    "^[ \t]*([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?[ \t]*$"
)
_INVALID_TRACE_ID: Final = "0" * 32
_INVALID_SPAN_ID: Final = "0" * 16


def parse_traceparent(value: str) -> tuple[int, int, int] | None:
    """The caller's trace id, span id and flags from a ``traceparent`` value, or ``None``.

    The W3C propagator's rules: version ``ff`` is refused, version ``00`` takes nothing after
    the flags, and all-zero ids are refused.

    Args:
        value: the first ``traceparent`` field's value as received.

    Returns:
        ``(trace_id, span_id, flags)`` or ``None`` when the value is not usable.
    """
    match = _TRACEPARENT.search(value)
    if match is None:
        return None
    version, trace_id, span_id, flags, remainder = match.groups()
    if trace_id == _INVALID_TRACE_ID or span_id == _INVALID_SPAN_ID:
        return None
    if version == "00" and remainder:
        return None
    if version == "ff":
        return None
    return int(trace_id, 16), int(span_id, 16), int(flags, 16)


def caller_traceparent(values: Sequence[str]) -> tuple[int, int, int] | None:
    """The caller's ids from *all* the message's ``traceparent`` fields, or ``None``.

    ``traceparent`` is a single value, not a list (W3C Trace Context §3.2): a message with two
    fields has no usable trace context, so the proxy starts a new trace (the suite's
    ``test_traceparent_duplicated``), whatever the two say.

    Args:
        values: every ``traceparent`` field's value, in the order received.
    """
    if len(values) != 1:
        return None
    return parse_traceparent(values[0])


def format_traceparent(trace_id: int, span_id: int, flags: int) -> str:
    """The ``traceparent`` value for a span, as the W3C propagator writes it (version 00)."""
    return f"00-{trace_id:032x}-{span_id:016x}-{flags:02x}"


# ── tracestate (W3C Trace Context §3.3) ────────────────────────────────────────────────────
#: §3.3.1.1: at most 32 list-members; a longer list is discarded whole.
MAX_TRACESTATE_MEMBERS: Final = 32
#: The combined fields' length beyond which the list is ignored unread: the OpenTelemetry
#: propagator's bound (``_TRACECONTEXT_MAXIMUM_TRACESTATE_LENGTH``), so reading a hostile
#: header costs at most this much.
MAX_TRACESTATE_LENGTH: Final = 8192
# The key grammar of the editor's draft, which the suite checks at its head (w3c/trace-context
# #584): a lower-case letter or a digit, then up to 255 of lcalpha / DIGIT / "_" / "-" / "*" /
# "/" / "@" -- so "foo@", "foo@@bar" and "t@" + 15 chars are keys, "@foo" is not. The
# OpenTelemetry SDKs check the older Level 1 shape (at most one "@", a tenant of 241 and a
# vendor of 14 characters); docs/tracecontext.md compares them.
_TRACESTATE_KEY: Final = r"[a-z0-9][_0-9a-z\-*/@]{0,255}"
# §3.3.1.3.2: up to 256 printable ASCII characters but "," and "=", the last not a space.
_TRACESTATE_VALUE: Final = r"[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]"
_TRACESTATE_MEMBER: Final = re.compile(f"({_TRACESTATE_KEY})=({_TRACESTATE_VALUE})")


@dataclass(frozen=True, slots=True)
class ParsedTraceState:
    """A caller's ``tracestate`` list as the proxy continues it.

    Attributes:
        members: ``(key, value)`` pairs, leftmost (most recent) first; empty when the list was
            absent, empty or discarded.
        problem: why the whole list was discarded (``None``: it was not).
        dropped: members left out because they carry personal data (see :func:`parse_tracestate`).
    """

    members: tuple[tuple[str, str], ...]
    problem: str | None = None
    dropped: int = 0


#: No ``tracestate``, or nothing left of it.
NO_TRACESTATE: Final = ParsedTraceState(())


def parse_tracestate(
    values: Sequence[str], *, personal: Callable[[str], bool] | None = None
) -> ParsedTraceState:
    """Combine and validate every ``tracestate`` field of a message (W3C Trace Context §3.3).

    Several fields are one list, in order (RFC 9110 §5.3). Empty fields and empty list-members
    are skipped (§3.3.1.1 allows them); spaces and tabs around a member are not part of it. A
    member that is not ``key=value`` by the grammar above, or more than
    :data:`MAX_TRACESTATE_MEMBERS` members, or more than :data:`MAX_TRACESTATE_LENGTH`
    characters in all, discard the whole list, never the trace (§3.3.1.2: "the vendor MUST
    discard the tracestate"). A key seen again keeps its first (leftmost, most recent) value
    and the other members stay: the suite accepts keeping one of them.

    Args:
        values: every ``tracestate`` field's value, in the order received.
        personal: tells whether a member (``key=value``) carries personal data; such a member is
            left out and counted in ``dropped`` (the rest of the list is kept).

    Returns:
        The members to continue, or the reason none are.
    """
    if sum(len(value) for value in values) > MAX_TRACESTATE_LENGTH:
        return ParsedTraceState((), f"longer than {MAX_TRACESTATE_LENGTH} characters")
    members: dict[str, str] = {}
    count = 0
    dropped = 0
    for value in values:
        for item in value.split(","):
            member = item.strip(" \t")
            if not member:
                continue
            match = _TRACESTATE_MEMBER.fullmatch(member)
            if match is None:
                return ParsedTraceState((), "a list-member is not key=value by the W3C grammar")
            count += 1
            if count > MAX_TRACESTATE_MEMBERS:
                return ParsedTraceState((), f"more than {MAX_TRACESTATE_MEMBERS} list-members")
            key = match.group(1)
            if key in members:
                continue
            if personal is not None and personal(member):
                dropped += 1
                # Remembered as seen, so a later member of the same key cannot stand in for it.
                members[key] = ""
                continue
            members[key] = match.group(2)
    return ParsedTraceState(tuple((k, v) for k, v in members.items() if v), None, dropped)


def order_trace_id(order_id: str, *, salt: str = "mes-trace-proxy") -> int:
    """A trace id derived from an order id, for the ``trace-per-order`` correlation mode.

    The same order always gets the same trace, so Jaeger shows its whole life as one trace.
    The id is a hash, so the order id itself is not readable from it; it is never zero
    (W3C §3.2.2.3 forbids the all-zero id).
    """
    digest = hashlib.sha256(f"{salt}\x00{order_id}".encode()).digest()
    value = int.from_bytes(digest[:16], "big")
    return value or 1


_IPV4_MAPPED: Final = ipaddress.IPv6Network("::ffff:0:0/96")


def _canonical_network(
    net: ipaddress.IPv4Network | ipaddress.IPv6Network,
) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """An IPv4-mapped IPv6 network (``::ffff:10.0.0.0/104``) as the IPv4 network it means.

    Callers' addresses are compared in their canonical form (a mapped address as its IPv4
    self), so the networks must be too, or one caller would be trusted under one spelling
    and not under another.
    """
    if isinstance(net, ipaddress.IPv6Network) and net.prefixlen >= 96 and net.subnet_of(_IPV4_MAPPED):
        mapped = net.network_address.ipv4_mapped
        assert mapped is not None
        return ipaddress.IPv4Network(f"{mapped}/{net.prefixlen - 96}")
    return net


@dataclass(frozen=True, slots=True, kw_only=True)
class TrustPolicy:
    """Which callers' trace context is continued; others start a new trace with a link.

    OpenTelemetry's guidance for public edges: do not let an untrusted caller choose your
    trace id or sampling, but keep the relation as a span link. ``trust_all`` is the
    default because a sidecar normally sits on a private network.
    """

    trust_all: bool = True
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    hosts: frozenset[str] = frozenset()

    @classmethod
    def from_cidrs(cls, cidrs: Iterable[str]) -> TrustPolicy:
        """Build a policy from CIDRs and addresses; ``*`` (or no list) trusts everyone.

        Raises:
            ValueError: an entry is not an address or network.
        """
        items = [c.strip() for c in cidrs if c.strip()]
        if not items or "*" in items:
            return cls(trust_all=True)
        networks = []
        hosts = set()
        for item in items:
            net = _canonical_network(ipaddress.ip_network(item, strict=False))
            # Single addresses go to a set: a set lookup is cheaper than a walk over networks.
            if net.num_addresses == 1:
                hosts.add(str(net.network_address))
            else:
                networks.append(net)
        return cls(trust_all=False, networks=tuple(networks), hosts=frozenset(hosts))

    def trusts(self, address: str | None) -> bool:
        """Whether context from ``address`` may be continued."""
        if self.trust_all:
            return True
        if not address:
            return False
        if address in self.hosts:
            return True
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        # A dual-stack listener reports IPv4 callers as "::ffff:10.0.0.5", and IPv6 has many
        # spellings ("0:0::1"); compare the canonical address, never the text as received.
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return str(ip) in self.hosts or any(ip in net for net in self.networks)
