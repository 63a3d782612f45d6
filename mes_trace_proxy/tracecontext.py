"""Incoming trace context: reading ``traceparent``, whom to trust, and the ids sent back.

Parsing ``traceparent``/``tracestate``/``baggage`` is the OpenTelemetry API propagators' job
(W3C Trace Context Level 1/2 and W3C Baggage), and they stay in charge whenever
``OTEL_PROPAGATORS`` names anything but the default pair. For the default pair, on the hot path,
:func:`parse_traceparent` and :func:`format_traceparent` do the same as the W3C propagator
(the same pattern, the same refusals, the same output; ``tests/test_tracecontext.py`` compares
them over generated headers) without building a ``Context`` for each request.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

__all__ = [
    "TrustPolicy",
    "format_span_id",
    "format_trace_id",
    "format_traceparent",
    "order_trace_id",
    "parse_traceparent",
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


def format_traceparent(trace_id: int, span_id: int, flags: int) -> str:
    """The ``traceparent`` value for a span, as the W3C propagator writes it (version 00)."""
    return f"00-{trace_id:032x}-{span_id:016x}-{flags:02x}"


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
