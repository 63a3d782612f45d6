"""Admin access control: bearer tokens with roles, from a ``ROLE:TOKEN`` file, checked in constant time.

Pure: the shell reads the file and the ``Authorization`` header and asks :func:`authorize`;
the answer table below says which status, problem and ``WWW-Authenticate`` value to send.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

__all__ = [
    "ANSWERS",
    "MIN_TOKEN_LENGTH",
    "PLACEHOLDER_MARKER",
    "Answer",
    "Role",
    "TokenError",
    "TokenTable",
    "Verdict",
    "WarningGate",
    "authorize",
    "parse_tokens",
]


class Role(enum.IntEnum):
    """What a token may do; a higher role includes every lower one."""

    VIEWER = 1
    ADMIN = 2


_ROLE_NAMES: Final[Mapping[str, Role]] = MappingProxyType({"viewer": Role.VIEWER, "admin": Role.ADMIN})

# 16 characters of a generated token (``openssl rand -hex 16`` gives 32) are at least 64 bits
# of entropy for hex and 96 for base64: beyond online guessing. Shorter is a password someone
# typed, and we refuse it rather than let it guard the state purge.
MIN_TOKEN_LENGTH: Final = 16
# RFC 6750 §2.1: b64token = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="
_B64TOKEN_CHARS: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~+/=")
# Longer than any token worth having; bounds the hashing work an unauthenticated caller causes.
_MAX_TOKEN_LENGTH: Final = 4096
# The marker of the placeholders shipped in k8s/base/mes-trace-proxy-admin-tokens.yaml (and any
# copied from it): public, so a token holding it opens nothing but is refused outright.
PLACEHOLDER_MARKER: Final = "changeme"
# What every refusal of a weak token tells the operator to do instead.
_GENERATE: Final = "generate one with `openssl rand -hex 32`"


class TokenError(ValueError):
    """The tokens file is unusable; the message names the line, never the token."""


@dataclass(frozen=True, slots=True)
class TokenTable:
    """SHA-256 digests of the accepted tokens and their roles; empty means no access control.

    Digests, not tokens: comparing equal-length digests hides the tokens' lengths too, and a
    dump of this object shows nothing that opens the admin API.
    """

    entries: tuple[tuple[bytes, Role], ...] = ()

    def __repr__(self) -> str:
        return f"TokenTable({len(self.entries)} tokens)"

    @property
    def enabled(self) -> bool:
        """Whether tokens are required at all."""
        return bool(self.entries)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def parse_tokens(text: str) -> TokenTable:
    """Parse a tokens file: one ``ROLE:TOKEN`` per line; blank lines and ``#`` comments ignored.

    Args:
        text: the file's contents.

    Returns:
        The table (at least one token).

    Raises:
        TokenError: naming the line of a bad role, a placeholder (``CHANGEME``), short or
            malformed token, a token listed twice, or a file with no token at all.
    """
    entries: list[tuple[bytes, Role]] = []
    seen: set[bytes] = set()
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        role_name, sep, token = stripped.partition(":")
        role = _ROLE_NAMES.get(role_name.strip().lower())
        if not sep or role is None:
            raise TokenError(f"line {number}: expected ROLE:TOKEN with ROLE one of {', '.join(_ROLE_NAMES)}")
        token = token.strip()
        if PLACEHOLDER_MARKER in token.lower():
            raise TokenError(
                f"line {number}: the {role.name.lower()} token is a published placeholder (CHANGEME): "
                + _GENERATE
            )
        if len(token) < MIN_TOKEN_LENGTH:
            raise TokenError(
                f"line {number}: a token shorter than {MIN_TOKEN_LENGTH} characters is no secret: {_GENERATE}"
            )
        if len(token) > _MAX_TOKEN_LENGTH:
            raise TokenError(f"line {number}: a token must be at most {_MAX_TOKEN_LENGTH} characters")
        if not set(token) <= _B64TOKEN_CHARS:
            raise TokenError(f"line {number}: a token may hold only letters, digits and -._~+/=")
        digest = _digest(token)
        if digest in seen:
            raise TokenError(f"line {number}: this token is already listed")
        seen.add(digest)
        entries.append((digest, role))
    if not entries:
        raise TokenError("no ROLE:TOKEN line: an empty file would leave the admin API closed to all")
    return TokenTable(tuple(entries))


class Verdict(enum.Enum):
    """The outcome of one access check."""

    ALLOWED = "allowed"
    #: no bearer credentials at all (RFC 6750 §3.1: no error code)
    MISSING = "missing"
    #: credentials that match no token
    INVALID = "invalid_token"
    #: a valid token whose role is too low
    FORBIDDEN = "insufficient_scope"


def authorize(table: TokenTable, authorization: str | None, required: Role | None) -> Verdict:
    """Check an ``Authorization`` header against the table for a route that needs ``required``.

    Every token is compared, match or not, with :func:`hmac.compare_digest` over equal-length
    digests: the time taken says nothing about which token, if any, came close.

    Args:
        table: the accepted tokens; when empty, every request is allowed.
        authorization: the request's ``Authorization`` header value, if any.
        required: the route's role, or ``None`` for a route open to all (the probes).

    Returns:
        The verdict.
    """
    if required is None or not table.enabled:
        return Verdict.ALLOWED
    if authorization is None:
        return Verdict.MISSING
    # RFC 6750 §2.1 and RFC 9110 §11.1: the scheme name is case-insensitive.
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return Verdict.MISSING
    token = token.strip()
    if not token or len(token) > _MAX_TOKEN_LENGTH:
        return Verdict.INVALID
    digest = _digest(token)
    role: Role | None = None
    for known, known_role in table.entries:
        if hmac.compare_digest(known, digest):
            role = known_role
    if role is None:
        return Verdict.INVALID
    return Verdict.ALLOWED if role >= required else Verdict.FORBIDDEN


@dataclass(frozen=True, slots=True, kw_only=True)
class Answer:
    """The HTTP answer to a refused check."""

    status: int
    slug: str
    title: str
    detail: str
    www_authenticate: str | None


_REALM: Final = 'Bearer realm="mes-trace-proxy admin"'

# RFC 6750 §3: 401 with a challenge for missing or bad credentials (error="invalid_token" when
# some were sent), 403 with error="insufficient_scope" when the token is good but too weak.
ANSWERS: Final[Mapping[Verdict, Answer]] = MappingProxyType(
    {
        Verdict.MISSING: Answer(
            status=401,
            slug="admin_unauthenticated",
            title="Authentication required",
            detail="Send 'Authorization: Bearer <token>' with a token from the admin tokens file.",
            www_authenticate=_REALM,
        ),
        Verdict.INVALID: Answer(
            status=401,
            slug="admin_invalid_token",
            title="Invalid token",
            detail="The bearer token is not one this proxy accepts.",
            www_authenticate=f'{_REALM}, error="invalid_token"',
        ),
        Verdict.FORBIDDEN: Answer(
            status=403,
            slug="admin_forbidden",
            title="Role not allowed",
            detail="This endpoint needs the admin role.",
            www_authenticate=f'{_REALM}, error="insufficient_scope"',
        ),
    }
)


class WarningGate:
    """One warning per ``interval`` seconds; the ones held back are counted into the next.

    A client guessing tokens would otherwise write a warning per guess: the log it fills is
    the one an operator reads. Time is an argument (pure core).
    """

    __slots__ = ("_interval", "_next", "held_back")

    def __init__(self, interval: float) -> None:
        """Let a warning through at most every ``interval`` seconds."""
        self._interval = interval
        self._next = float("-inf")
        #: warnings held back since the last one let through
        self.held_back = 0

    def allow(self, now: float) -> int | None:
        """Whether to warn now.

        Args:
            now: a monotonic clock reading, in seconds.

        Returns:
            ``None`` to stay quiet (counted), else how many were held back before this one.
        """
        if now < self._next:
            self.held_back += 1
            return None
        self._next = now + self._interval
        held, self.held_back = self.held_back, 0
        return held
