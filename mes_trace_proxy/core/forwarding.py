"""What a reverse proxy must change in forwarded headers, and which request targets it refuses.

The upstream is always the configured one: nothing a client sends (absolute-form targets,
``Host``, ``X-Forwarded-Host``, ``Forwarded``) can change where a request is forwarded.
"""

from __future__ import annotations

import enum
import functools
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final, TypeAlias
from urllib.parse import unquote

from mes_trace_proxy.core.framing import DEFAULT_UNDERSCORE, HOP_BY_HOP, TOKEN, UnderscorePolicy
from mes_trace_proxy.core.problems import ClientRejection, Rejection, rejection

__all__ = [
    "ALLOWED_METHODS",
    "HOP_BY_HOP",
    "ForwardPolicy",
    "HeaderList",
    "Headers",
    "check_header_values",
    "check_host_headers",
    "check_target",
    "downstream_response_headers",
    "upstream_host_value",
    "upstream_request_headers",
    "websocket_subprotocols",
]

Headers: TypeAlias = Sequence[tuple[str, str]]
HeaderList: TypeAlias = list[tuple[str, str]]

# RFC 6455 §4.1/§4.2.2: the handshake fields that belong to one WebSocket connection.
# The proxy terminates WebSocket on both legs (aiohttp's ws_connect generates its own key,
# version and extension offer), so the client's must not reach the upstream. The
# subprotocol list is passed separately: see websocket_subprotocols().
_WEBSOCKET_HANDSHAKE: Final = frozenset(
    {
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-extensions",
        "sec-websocket-accept",
        "sec-websocket-protocol",
    }
)

# W3C Trace Context §3.2/§3.3: the proxy injects its own CLIENT span's context.
_TRACE_HEADERS: Final = frozenset({"traceparent", "tracestate"})

# The de-facto X-Forwarded-* fields and RFC 7239 Forwarded. The proxy re-writes these and
# never reads them to pick an upstream.
_XFF: Final = "x-forwarded-for"
_XF_OVERWRITTEN: Final = frozenset({"x-forwarded-proto", "x-forwarded-host"})

# RFC 9110 §5.6.4: what a quoted-string can carry at all (qdtext plus quoted-pair).
_QUOTABLE: Final = re.compile(r"[\t\x20-\x7e\x80-\U0010ffff]*\Z")
# RFC 9110 §7.2 Host = uri-host [ ":" port ] with RFC 3986 §3.2.2 IP-literal (incl. RFC
# 6874 zone ids), IPv4 or reg-name. Empty is allowed: §7.2 sends it for URIs without
# an authority. The port is a TCP port, 0-65535 (RFC 793 §3.1): a longer run of digits is
# no address at all, and int() of 4,300 of them raises.
_HOST_VALUE: Final = re.compile(
    r"(?:\[(?:[0-9A-Fa-f:.]+(?:%25[A-Za-z0-9\-._~%]+)?|v[0-9A-Fa-f]+\.[A-Za-z0-9\-._~!$&'()*+,;=:]+)\]"
    r"|[A-Za-z0-9\-._~!$&'()*+,;=%]*)"
    r"(?::(?:6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[0-9]{1,4})?)?\Z"
)

# RFC 3986 §3.1 scheme ":"; a target starting this way is absolute-form (RFC 9112 §3.2.2).
_SCHEME_PREFIX: Final = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:")
# RFC 9112 §3.2.3 authority-form: host ":" port, used only by CONNECT.
_AUTHORITY_FORM: Final = re.compile(r"(?:\[[^\]/?#@\s]*\]|[^\[\]/?#@\s:]+):[0-9]+\Z")
# RFC 9112 §3.2 allows no whitespace, control or fragment in a request-target.
_RAW_FORBIDDEN: Final = re.compile(r"[\x00-\x20\x7f#]")
# A path with none of these needs no segment scan: the fast path for ordinary routes.
_PATH_NEEDS_SCAN: Final = re.compile(r"[%\\]|/\.")
# RFC 3986 §2.1: "%" must be followed by two hex digits.
_BAD_PERCENT: Final = re.compile(r"%(?![0-9A-Fa-f]{2})")
# After one decoding round a path segment must not hold controls or backslashes, nor a
# second round of encoded dots, slashes, backslashes or controls (double encoding).
_DECODED_FORBIDDEN: Final = re.compile(r"[\x00-\x1f\x7f\\]|%(?:2[eEfF]|5[cC]|[01][0-9A-Fa-f]|7[fF])")
# A path starting "/%2F" is "//..." (a network-path reference) once decoded.
_ENCODED_SLASH_START: Final = frozenset({"%2F", "%2f"})
# An encoded NUL in the query has no use but to truncate a C-string somewhere upstream.
_QUERY_NUL: Final = "%00"

# RFC 9110 §4.2.1/§4.2.2: the default ports, omitted from Host (§7.2).
_DEFAULT_PORTS: Final[Mapping[str, int]] = MappingProxyType({"http": 80, "https": 443, "ws": 80, "wss": 443})
_MAX_PORT: Final = 65535  # RFC 793 §3.1: ports are 16-bit.

# RFC 9110 §15.5.6: a 405 must list what is allowed. These are the methods the proxy
# forwards; CONNECT is refused and TRACE deliberately not advertised.
ALLOWED_METHODS: Final = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"

_NO_NAMES: Final[frozenset[str]] = frozenset()


def _bad_target(detail: str) -> Rejection:
    return rejection(ClientRejection.BAD_REQUEST_TARGET, detail=detail)


# Fixed answers: the detail never echoes the target, whose query may carry personal data.
_REJECT_CONNECT: Final = rejection(
    ClientRejection.METHOD_NOT_ALLOWED,
    detail="CONNECT is not accepted: this is a reverse proxy, not a tunnel.",
    headers=(("Allow", ALLOWED_METHODS),),
)
_REJECT_ABSOLUTE: Final = _bad_target("Absolute-form request targets are not accepted; send a path.")
_REJECT_AUTHORITY: Final = _bad_target("Authority-form request targets are only for CONNECT.")
_REJECT_ASTERISK: Final = _bad_target("The asterisk-form request target is only for OPTIONS.")
_REJECT_NOT_ORIGIN: Final = _bad_target("The request target must be a path starting with '/'.")
_REJECT_NETWORK_PATH: Final = _bad_target("The request target must not start with '//'.")
_REJECT_CHARS: Final = _bad_target("The request target contains whitespace, control or fragment characters.")
_REJECT_BACKSLASH: Final = _bad_target("The request path contains a backslash.")
_REJECT_PERCENT: Final = _bad_target("The request path contains a malformed percent-encoding.")
_REJECT_ENCODED: Final = _bad_target(
    "The request path contains encoded dot segments, slashes used to traverse, or control characters."
)
_REJECT_CLIMB: Final = _bad_target("The request path climbs above the root.")
_REJECT_QUERY_NUL: Final = _bad_target("The request query contains an encoded NUL.")
_REJECT_MULTI_HOST: Final = rejection(
    ClientRejection.BAD_REQUEST, detail="The request has more than one Host header field."
)
_REJECT_BAD_HOST: Final = rejection(ClientRejection.BAD_REQUEST, detail="The Host header field is not valid.")
_REJECT_NOT_UTF8: Final = rejection(
    ClientRejection.BAD_REQUEST,
    detail="A header field value holds bytes that are not UTF-8; they cannot be forwarded unchanged.",
)

# aiohttp decodes field values as UTF-8 with "surrogateescape": a byte that is not UTF-8
# (RFC 9110 §5.5 obs-text, a Latin-1 "é" say) becomes a lone surrogate U+DC80..U+DCFF, and
# aiohttp's header writer drops those silently when the request is forwarded.
# mypyc: chr(), no lone surrogate in a string literal (native.py, constraint 4).
_UNDECODED_BYTE: Final = re.compile("[" + chr(0xDC80) + "-" + chr(0xDCFF) + "]")


class _Action(enum.Enum):
    """What upstream_request_headers does with a field, looked up by lowercased name."""

    DROP = enum.auto()
    HOST = enum.auto()
    XFF = enum.auto()
    KEEP = enum.auto()  # kept even when a Connection option names it (Upgrade on upgrade)


@dataclass(frozen=True, slots=True, kw_only=True)
class ForwardPolicy:
    """How one listener rewrites request headers; built once at start-up.

    Forwarding fields follow nginx's usual ``proxy_set_header`` set-up and Envoy's edge
    mode (``use_remote_address``):

    * ``X-Forwarded-For`` is appended to: the client's chain is kept and our peer address
      is added last, so the right-most entry is the only one MES can trust.
    * ``X-Forwarded-Proto`` and ``X-Forwarded-Host`` are always overwritten with what this
      proxy saw, so a client cannot make MES believe a call came over TLS or to another host.
    * ``Forwarded`` (RFC 7239 §4) gets a new field line with one element, after the
      client's lines, which are kept as sent.

    When ``forwarded_headers`` is off, the client's fields of that family pass through
    untouched and none is added.

    ``underscore`` says what happens to field names with ``_`` (see :mod:`framing`): the
    lookalikes of framing, hop-by-hop and forwarding fields are dropped here by table lookup
    unless the policy refuses them (then :func:`framing.check_framing` answers 400 first).
    """

    upstream_host: str
    preserve_host: bool = False
    forwarded_headers: bool = True
    underscore: UnderscorePolicy = DEFAULT_UNDERSCORE
    _actions: Mapping[tuple[bool, bool], Mapping[str, _Action]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        """Validate, then build the four name→action tables (trace drop by upgrade).

        Raises:
            ValueError: if ``upstream_host`` is not a valid Host value.
        """
        if not self.upstream_host or not _HOST_VALUE.match(self.upstream_host):
            raise ValueError(f"upstream_host {self.upstream_host!r} is not a valid Host value")
        # Lookalikes hold "_", so no real field name below can overwrite their entry.
        base: dict[str, _Action] = dict.fromkeys(HOP_BY_HOP | self.underscore.dropped, _Action.DROP)
        if self.forwarded_headers:
            base.update(dict.fromkeys(_XF_OVERWRITTEN, _Action.DROP))
            base[_XFF] = _Action.XFF
        base["host"] = _Action.HOST
        tables: dict[tuple[bool, bool], Mapping[str, _Action]] = {}
        for drop_trace in (False, True):
            for upgrade in (False, True):
                table = dict(base)
                if drop_trace:
                    table.update(dict.fromkeys(_TRACE_HEADERS, _Action.DROP))
                if upgrade:
                    table.update(dict.fromkeys(_WEBSOCKET_HANDSHAKE, _Action.DROP))
                    table["upgrade"] = _Action.KEEP
                tables[(drop_trace, upgrade)] = MappingProxyType(table)
        object.__setattr__(self, "_actions", MappingProxyType(tables))


def _connection_options(headers: Headers) -> frozenset[str] | set[str]:
    """Return the lowercased field names listed in every Connection field (RFC 9110 §7.6.1).

    Connection = #connection-option; list elements are comma separated with optional
    whitespace, and empty elements are ignored (RFC 9110 §5.6.1).
    """
    named: set[str] | None = None
    for name, value in headers:
        if len(name) == len("connection") and name.lower() == "connection":
            for option in value.split(","):
                token = option.strip(" \t").lower()
                if token:
                    if named is None:
                        named = set()
                    named.add(token)
    return _NO_NAMES if named is None else named


def _quote(value: str) -> str | None:
    """RFC 9110 §5.6.4 quoted-string for an RFC 7239 §4 value; None if it cannot be quoted."""
    if TOKEN.fullmatch(value):  # RFC 9110 §5.6.4: a non-token value is quoted
        return value
    if not _QUOTABLE.match(value):
        return None
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


# A proxy sees few distinct (caller, scheme, Host) triples (CRM, the dashboard): each element is
# built once. An lru_cache, since it stays bounded whatever the callers send.
@functools.lru_cache(maxsize=256)
def _forwarded_element(client_ip: str, scheme: str, host: str | None) -> str:
    """One RFC 7239 §4 forwarded-element: ``for=...;proto=...;host=...``."""
    if not client_ip:
        node = "unknown"  # RFC 7239 §6.2: the peer address is not known (a Unix socket).
    elif ":" in client_ip:
        # RFC 7239 §6: an IPv6 node is bracketed, and since "[", "]" and ":" are not
        # token characters the whole value is a quoted-string.
        node = _quote(f"[{client_ip}]") or "unknown"
    else:
        node = _quote(client_ip) or "unknown"
    parts = [f"for={node}"]
    proto = scheme.lower()
    if TOKEN.fullmatch(proto):  # RFC 7239 §5.4: a URI scheme name, always a token.
        parts.append(f"proto={proto}")
    if host is not None:
        quoted = _quote(host)  # RFC 7239 §5.3: the Host as received; quoted when it has a port.
        if quoted is not None:
            parts.append(f"host={quoted}")
    return ";".join(parts)


def upstream_request_headers(
    headers: Headers,
    *,
    policy: ForwardPolicy,
    client_ip: str,
    scheme: str,
    host: str | None,
    drop_trace_headers: bool = False,
    upgrade: bool = False,
) -> HeaderList:
    """Produce the header fields to send upstream for one request.

    Every field that is not hop-by-hop is kept with its name, value and order as
    received, repeated fields included. Hop-by-hop fields (:data:`HOP_BY_HOP`) and every
    field named in a ``Connection`` option are removed (RFC 9110 §7.6.1); so are names with
    ``_`` as ``policy.underscore`` says. ``Content-Length`` is kept and ``Transfer-Encoding``
    dropped: the upstream client frames the body itself (by that length, or chunked), so
    exactly one framing reaches MES. Host takes the client's position, or comes first when
    the client sent none (RFC 9112 §3.2). Forwarding fields are appended as
    :class:`ForwardPolicy` describes.

    Args:
        headers: the request's fields in received order, names in received case; call
            :func:`check_host_headers` first (only the first Host is used).
        policy: the listener's policy.
        client_ip: the TCP peer address, or ``""`` when there is none.
        scheme: ``http`` or ``https``, as the client reached this proxy.
        host: the client's Host value as received, or ``None`` if it sent none.
        drop_trace_headers: remove incoming ``traceparent``/``tracestate`` because the
            caller injects its own CLIENT span context.
        upgrade: the request is a WebSocket upgrade that the caller forwards with
            aiohttp's ``ws_connect``: ``Upgrade`` is kept, ``Connection: Upgrade`` is
            added and the client's per-connection ``Sec-WebSocket-*`` handshake fields
            are removed (pass :func:`websocket_subprotocols` as ``protocols=``).

    Returns:
        A new list of ``(name, value)`` pairs.
    """
    actions = policy._actions[(drop_trace_headers, upgrade)]
    named = _connection_options(headers)
    host_value = host if policy.preserve_host and host is not None else policy.upstream_host
    # Only with the drop-them-all setting is a name searched for "_"; the lookalikes are in
    # the action table either way.
    drop_underscored = policy.underscore.drop_all
    out: HeaderList = []
    prior_xff: list[str] = []
    host_seen = False
    for name, value in headers:
        lname = name.lower()
        action = actions.get(lname)
        if action is None:
            if lname not in named and not (drop_underscored and "_" in lname):
                out.append((name, value))
        elif action is _Action.HOST:
            # A Connection option naming Host is ignored: Host is rewritten, never removed.
            if not host_seen:
                host_seen = True
                out.append((name, host_value))
        elif action is _Action.XFF:
            # A client listing X-Forwarded-For as a connection option asks us to drop its
            # chain; only our own entry then remains.
            if lname not in named:
                prior_xff.append(value)
        elif action is _Action.KEEP:
            out.append((name, value))
    if not host_seen:
        out.insert(0, ("Host", host_value))
    if policy.forwarded_headers:
        prior_xff.append(client_ip or "unknown")
        # RFC 9110 §5.3: several field lines of one list field may be combined with commas.
        out.append(("X-Forwarded-For", ", ".join(prior_xff)))
        out.append(("X-Forwarded-Proto", scheme.lower()))
        if host is not None:
            out.append(("X-Forwarded-Host", host))
        out.append(("Forwarded", _forwarded_element(client_ip, scheme, host)))
    if upgrade:
        # RFC 9110 §7.8: Upgrade is only meaningful with "Connection: upgrade".
        out.append(("Connection", "Upgrade"))
    return out


def downstream_response_headers(headers: Headers, drop: frozenset[str] = frozenset()) -> HeaderList:
    """Produce the header fields to send back to the client for one upstream response.

    Hop-by-hop fields and Connection-named fields are removed (RFC 9110 §7.6.1);
    everything else is kept in order, so several ``Set-Cookie`` fields stay separate
    (RFC 6265 §3: they must never be combined). ``Content-Length`` is kept and
    ``Transfer-Encoding`` dropped.

    Args:
        headers: the upstream response's fields in received order.
        drop: further lower-case names to remove (the fields the proxy sets itself).

    Returns:
        A new list of ``(name, value)`` pairs.
    """
    named = _connection_options(headers)
    if drop:
        named = named | drop
    return [
        (name, value)
        for name, value in headers
        if (lname := name.lower()) not in HOP_BY_HOP and lname not in named
    ]


def websocket_subprotocols(headers: Headers) -> tuple[str, ...]:
    """Return the client's offered WebSocket subprotocols in order (RFC 6455 §11.3.4).

    Args:
        headers: the upgrade request's fields.

    Returns:
        The tokens of every ``Sec-WebSocket-Protocol`` field, for ``ws_connect(protocols=)``.
    """
    found: list[str] = []
    for name, value in headers:
        if name.lower() == "sec-websocket-protocol":
            found.extend(p for option in value.split(",") if (p := option.strip(" \t")))
    return tuple(found)


def check_target(method: str, raw_target: str) -> Rejection | None:
    """Refuse request targets that would turn the proxy into an open proxy or escape the path.

    Accepted: origin-form (RFC 9112 §3.2.1) starting with exactly one ``/``, and the
    asterisk-form (§3.2.4) for OPTIONS. Refused: CONNECT (405); absolute-form (§3.2.2) and
    authority-form (§3.2.3); a leading ``//`` (a network-path reference, RFC 3986 §4.2,
    which URL joining turns into another host); whitespace, controls and ``#``; in the
    path, backslashes, malformed or double percent-encoding, encoded dot segments or
    slashes (``..%2f``, ``%2e%2e``), ``..;`` path-parameter tricks, and literal ``..``
    segments that climb above the root (RFC 3986 §5.2.4); an encoded NUL in the query.
    Ordinary encodings (``%20``, ``%2B``, UTF-8) pass.

    Args:
        method: the request method, case-sensitive (RFC 9110 §9.1).
        raw_target: the request-target exactly as received.

    Returns:
        ``None`` to forward, or the :class:`~mes_trace_proxy.core.problems.Rejection` to answer.
    """
    if method == "CONNECT":
        return _REJECT_CONNECT
    if raw_target == "*":
        return None if method == "OPTIONS" else _REJECT_ASTERISK
    if not raw_target.startswith("/"):
        if _AUTHORITY_FORM.match(raw_target):
            return _REJECT_AUTHORITY
        if _SCHEME_PREFIX.match(raw_target):
            return _REJECT_ABSOLUTE
        return _REJECT_NOT_ORIGIN
    if raw_target.startswith("//"):
        return _REJECT_NETWORK_PATH
    if _RAW_FORBIDDEN.search(raw_target):
        return _REJECT_CHARS
    path, sep, query = raw_target.partition("?")
    if sep and _QUERY_NUL in query:
        return _REJECT_QUERY_NUL
    if _PATH_NEEDS_SCAN.search(path):
        return _scan_path(path)
    return None


def _scan_path(path: str) -> Rejection | None:
    """The slow path of :func:`check_target` for paths with ``%``, ``\\`` or ``/.``."""
    # A raw backslash is not a URI character (RFC 3986 §2) and some servers read it as "/".
    if "\\" in path:
        return _REJECT_BACKSLASH
    if _BAD_PERCENT.search(path):
        return _REJECT_PERCENT
    # "/%2Fevil.example/" becomes a network-path reference once a server decodes it.
    if path[1:4] in _ENCODED_SLASH_START:
        return _REJECT_NETWORK_PATH
    depth = 0
    for segment in path[1:].split("/"):
        if "%" in segment:
            decoded = unquote(segment, errors="surrogateescape")
            if _DECODED_FORBIDDEN.search(decoded):
                return _REJECT_ENCODED
            # Any piece of the decoded segment that is a dot segment means the segment
            # changes meaning for a server that decodes before normalising.
            if any(_is_dot_segment(piece) for piece in decoded.split("/")):
                return _REJECT_ENCODED
            depth += 1
        elif _is_dot_segment(segment):
            if segment == "..":
                depth -= 1
                if depth < 0:
                    return _REJECT_CLIMB
            elif segment != ".":
                # "..;x" or ".;x": Tomcat and others strip the parameter and then
                # normalise, so the upstream would see a dot segment we did not count.
                return _REJECT_ENCODED
        else:
            depth += 1
    return None


def _is_dot_segment(segment: str) -> bool:
    """True for ``.``/``..``, also with a ``;`` path parameter (RFC 3986 §3.3)."""
    head = segment.partition(";")[0]
    return head in {".", ".."}


def check_host_headers(headers: Headers) -> Rejection | None:
    """Refuse a request whose Host fields are ambiguous or malformed (RFC 9112 §3.2).

    Args:
        headers: the request's fields.

    Returns:
        ``None`` if the Host fields are acceptable, else a 400 rejection.
    """
    value: str | None = None
    for name, field_value in headers:
        if len(name) == len("host") and name.lower() == "host":
            if value is not None:
                return _REJECT_MULTI_HOST
            value = field_value
    if value is None:
        return None
    if not _HOST_VALUE.match(value.strip(" \t")):
        return _REJECT_BAD_HOST
    return None


def check_header_values(values: Iterable[str]) -> Rejection | None:
    """Refuse a request whose header values hold bytes that were not UTF-8.

    They are legal obs-text (RFC 9110 §5.5), but the client library that forwards the
    request would drop them, so the upstream would get other values than were sent; a
    clear 400 loses nothing, a silently altered header might.

    Args:
        values: the request's field values as aiohttp decoded them (UTF-8, surrogateescape).

    Returns:
        ``None`` when every value can be forwarded byte for byte, else a 400 rejection.
    """
    for value in values:
        if not value.isascii() and _UNDECODED_BYTE.search(value):
            return _REJECT_NOT_UTF8
    return None


def upstream_host_value(scheme: str, host: str, port: int) -> str:
    """Format the Host value for an upstream URL (RFC 9110 §7.2).

    Args:
        scheme: ``http``, ``https``, ``ws`` or ``wss``.
        host: a name, IPv4 address or IPv6 address (bracketed or not).
        port: the TCP port; omitted from the value when it is the scheme's default.

    Returns:
        ``host`` or ``host:port``, with an IPv6 address in brackets.

    Raises:
        ValueError: if ``port`` is not 1-65535 or ``host`` is empty.
    """
    if not host:
        raise ValueError("upstream host is empty")
    if not 0 < port <= _MAX_PORT:
        raise ValueError(f"port {port} is out of range")
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    if _DEFAULT_PORTS.get(scheme.lower()) == port:
        return host
    return f"{host}:{port}"
