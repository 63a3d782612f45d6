"""Request framing and field-name policy: what must never reach MES ambiguous.

The upstream connections are pooled and shared by every caller, so a request that MES frames
differently from the proxy poisons the next caller's answer (request smuggling, CL.TE and
TE.CL). aiohttp's request parser (llhttp, strict mode) already refuses the obfuscated
``Transfer-Encoding`` and ``Content-Length`` forms a smuggling scanner sends: whitespace or
control characters around names and values, folded lines, doubled or conflicting fields, both
fields at once. Two gaps remain, and this module closes them:

* **Names with ``_``.** CGI, WSGI and PHP servers (and nginx or Apache in front of them) read a
  field name with ``-`` and ``_`` folded together, so ``Transfer_Encoding: chunked`` is, to
  them, ``Transfer-Encoding``; the proxy's parser does not see it as one and would forward it
  beside a ``Content-Length``. A name that folds onto a framing, hop-by-hop or proxy-written
  field (a *lookalike*) is never forwarded: dropped, or refused with a 400. Other names with
  ``_`` pass by default, or are all dropped or refused (:class:`UnderscorePolicy`).
* **Codings beside ``chunked``.** The parser accepts ``Transfer-Encoding: gzip, chunked``; the
  proxy removes the chunked coding and frames the body again, so MES would get gzip bytes with
  no word that they are gzip. Only ``chunked`` alone is forwarded (:func:`check_framing`).

Everything here is computed once at start-up; on an ordinary request (no ``_`` in a name,
no refusal configured, no ``Transfer-Encoding``) :func:`check_framing` returns at once.
"""

from __future__ import annotations

import enum
import itertools
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final

from mes_trace_proxy.problems import ClientRejection, Rejection, rejection

__all__ = [
    "DEFAULT_UNDERSCORE",
    "FRAMING_FIELDS",
    "HOP_BY_HOP",
    "LOOKALIKES",
    "PROXY_WRITTEN",
    "TOKEN",
    "NameAction",
    "UnderscorePolicy",
    "check_framing",
    "closes_connection",
    "is_token",
    "lookalike_names",
    "name_action_parser",
]

# RFC 9110 §5.6.2: token = 1*tchar, the grammar of field names (§5.1), methods (§9.1) and
# list tokens. One definition for the whole package; match it with fullmatch() or is_token():
# a "^...$" pattern with re.match would also accept a name followed by "\n".
TOKEN: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def is_token(text: str) -> bool:
    """True when ``text`` is an RFC 9110 §5.6.2 token (a valid field name), nothing more."""
    return TOKEN.fullmatch(text) is not None


# RFC 9110 §7.6.1: fields that describe one connection and must not be forwarded.
# Proxy-Connection and Keep-Alive are the pre-standard ones it names; TE (§10.1.4),
# Transfer-Encoding (RFC 9112 §6.1) and Upgrade (§7.8) are hop-by-hop by definition.
# Trailer (§6.6.2) goes too: the upstream client frames the body itself (chunked or by
# length) and sends no trailer section, so announcing one would be false.
# Proxy-Authenticate/-Authorization (§11.7.1-2) are addressed to this proxy, never to MES.
# TE is dropped even as "TE: trailers" (the gRPC case): that token promises the upstream
# that we will accept and relay trailers, which the proxy's HTTP/1.1 client cannot keep;
# gRPC needs HTTP/2 end to end and is not proxied here anyway.
HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authenticate",
        "proxy-authorization",
    }
)
# RFC 9112 §6: the fields that say where a message body ends.
FRAMING_FIELDS: Final = frozenset({"content-length", "transfer-encoding"})
# What the proxy itself writes upstream (forwarding.ForwardPolicy), and the WebSocket handshake
# fields its relay writes on the upgrade leg: a caller must not be able to spoof any of them by
# spelling it with "_".
PROXY_WRITTEN: Final = frozenset(
    {
        "host",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "forwarded",
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-extensions",
        "sec-websocket-accept",
        "sec-websocket-protocol",
    }
)
_RESERVED: Final = HOP_BY_HOP | FRAMING_FIELDS | PROXY_WRITTEN


def lookalike_names(names: Iterable[str]) -> frozenset[str]:
    """Every lower-case spelling of ``names`` with one or more ``-`` written as ``_``.

    A name that reads as one of ``names`` once ``_`` is read as ``-`` and case is ignored is
    exactly one of these, lower-cased: so a lookup of ``name.lower()`` in the result is the
    whole test, with no per-request string work.

    Args:
        names: lower-case field names.

    Returns:
        The lookalikes (``transfer_encoding`` for ``transfer-encoding``; all three of
        ``x_forwarded_for``, ``x-forwarded_for``, ``x_forwarded-for`` for ``x-forwarded-for``).
    """
    out: set[str] = set()
    for name in names:
        pieces = name.split("-")
        for joins in itertools.product("-_", repeat=len(pieces) - 1):
            if "_" in joins:
                out.add(pieces[0] + "".join(j + p for j, p in zip(joins, pieces[1:], strict=True)))
    return frozenset(out)


#: The lookalikes of every framing, hop-by-hop and proxy-written field.
LOOKALIKES: Final = lookalike_names(_RESERVED)


class NameAction(enum.Enum):
    """What the proxy does with a request field whose name contains ``_``."""

    #: forwarded as received
    PASS = "pass"  # noqa: S105 (a setting's value, not a password)
    #: removed from what is forwarded; the request goes on without it
    DROP = "drop"
    #: the request is answered 400 and nothing is forwarded
    REFUSE = "refuse"


def name_action_parser(*allowed: NameAction) -> Callable[[object], NameAction]:
    """A config value parser for one of ``allowed`` (``drop``, ...).

    Raises (from the parser):
        ValueError: another value, with the allowed ones in the message.
    """

    def parse(value: object) -> NameAction:
        for action in allowed:
            if str(value).strip().lower() == action.value:
                return action
        raise ValueError(f"{value!r}: use {' or '.join(a.value for a in allowed)}")

    return parse


@dataclass(frozen=True, slots=True, kw_only=True)
class UnderscorePolicy:
    """A listener's handling of field names with ``_``; built once at start-up.

    Attributes:
        lookalikes: for a name that folds onto a framing, hop-by-hop or proxy-written field
            (:data:`LOOKALIKES`): ``DROP`` (the default) or ``REFUSE``; never ``PASS``.
        others: for every other name with ``_``: ``PASS`` (the default), ``DROP`` or
            ``REFUSE``. ``REFUSE`` here refuses lookalikes too.
        dropped: the lower-case names :func:`forwarding.upstream_request_headers` removes by
            table lookup (the lookalikes, unless they are refused).
        drop_all: every other name with ``_`` is removed as well.
        refuse_lookalikes: a lookalike is answered 400.
        refuse_all: any name with ``_`` is answered 400.
    """

    lookalikes: NameAction = NameAction.DROP
    others: NameAction = NameAction.PASS
    dropped: frozenset[str] = field(init=False)
    drop_all: bool = field(init=False)
    refuse_lookalikes: bool = field(init=False)
    refuse_all: bool = field(init=False)

    def __post_init__(self) -> None:
        """Derive the lookup sets and flags.

        Raises:
            ValueError: if ``lookalikes`` is ``PASS``: they are never forwarded.
        """
        if self.lookalikes is NameAction.PASS:
            raise ValueError(
                "a name that folds onto a framing or proxy field is never forwarded: drop or refuse"
            )
        refuse_all = self.others is NameAction.REFUSE
        refuse_lookalikes = refuse_all or self.lookalikes is NameAction.REFUSE
        object.__setattr__(self, "refuse_all", refuse_all)
        object.__setattr__(self, "refuse_lookalikes", refuse_lookalikes)
        object.__setattr__(self, "drop_all", self.others is NameAction.DROP)
        object.__setattr__(self, "dropped", frozenset() if refuse_lookalikes else LOOKALIKES)


#: The default: lookalikes dropped, other names with "_" forwarded.
DEFAULT_UNDERSCORE: Final = UnderscorePolicy()

# Fixed answers: the detail names the rule, never the field, whose name or value came from
# the caller.
_REJECT_LOOKALIKE: Final = rejection(
    ClientRejection.BAD_REQUEST,
    detail=(
        "A header field name with '_' reads as a framing, hop-by-hop or forwarding field "
        "to servers that fold '_' into '-'; it is not accepted."
    ),
)
_REJECT_UNDERSCORE: Final = rejection(
    ClientRejection.BAD_REQUEST,
    detail="Header field names with '_' are not accepted by this proxy.",
)
_REJECT_CODING: Final = rejection(
    ClientRejection.BAD_REQUEST,
    detail="Transfer-Encoding other than chunked alone is not accepted.",
)
# The caller and the proxy may disagree on where this request ends: the connection closes
# after the answer instead of reading what follows as the next request (RFC 9112 §6.1, §9.6).
_CLOSING: Final = (_REJECT_LOOKALIKE, _REJECT_UNDERSCORE, _REJECT_CODING)
_TRANSFER_ENCODING: Final = "transfer-encoding"
_CHUNKED: Final = "chunked"


def check_framing(
    headers: Sequence[tuple[str, str]], *, chunked: bool, policy: UnderscorePolicy
) -> Rejection | None:
    """Refuse what would reach MES ambiguous, or what the listener's policy refuses.

    Run after the parser (which refuses conflicting or obfuscated framing fields) and before
    anything is forwarded.

    Args:
        headers: the request's fields in received order.
        chunked: the parser framed the body by ``Transfer-Encoding: chunked``.
        policy: the listener's :class:`UnderscorePolicy`.

    Returns:
        ``None`` to forward; a 400 when ``Transfer-Encoding`` holds a coding beside
        ``chunked`` (RFC 9112 §6.1: the proxy would have to drop it), or when a name with
        ``_`` is one the policy refuses.
    """
    if chunked and not _chunked_alone(headers):
        return _REJECT_CODING
    if not policy.refuse_lookalikes:
        return None
    for name, _ in headers:
        if "_" in name:
            if policy.refuse_all:
                return _REJECT_UNDERSCORE
            if name.lower() in LOOKALIKES:
                return _REJECT_LOOKALIKE
    return None


def closes_connection(refusal: Rejection) -> bool:
    """True for a :func:`check_framing` refusal: answer it, then close the connection."""
    return any(refusal is closing for closing in _CLOSING)


def _chunked_alone(headers: Sequence[tuple[str, str]]) -> bool:
    """True when the ``Transfer-Encoding`` list is exactly ``chunked`` (RFC 9110 §5.6.1:
    empty list elements and optional whitespace are allowed; codings are case-insensitive)."""
    codings: list[str] = []
    for name, value in headers:
        if len(name) == len(_TRANSFER_ENCODING) and name.lower() == _TRANSFER_ENCODING:
            codings.extend(c for item in value.split(",") if (c := item.strip(" \t").lower()))
    return codings == [_CHUNKED]
