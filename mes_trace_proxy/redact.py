"""Personal-data scrubbing for every request or response value bound for telemetry.

Pattern redaction of values, paths and queries; query and header allow-lists; keyed HMAC pseudonyms.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final
from urllib.parse import unquote, unquote_plus

from mes_trace_proxy.cards import CARD_MIN_DIGITS, holds_card
from mes_trace_proxy.textfold import fold

__all__ = [
    "DEFAULT_HEADER_ALLOW",
    "DEFAULT_MARKER",
    "DEFAULT_QUERY_ALLOW",
    "DEFAULT_REDACT_KEYS",
    "MAX_HEADER_CHARS_PER_REQUEST",
    "NEVER_HEADERS",
    "NEVER_HEADER_FRAGMENTS",
    "PrivacyPolicy",
    "Redactor",
    "is_never_header",
    "pseudonymize",
    "user_id_from_headers",
]

# ── policy defaults ────────────────────────────────────────────────────────────────────────────

DEFAULT_REDACT_KEYS: Final[tuple[str, ...]] = (
    "name",
    "fullName",
    "firstName",
    "lastName",
    "email",
    "phone",
    "address",
    "passport",
    "customer*",
)
DEFAULT_QUERY_ALLOW: Final[tuple[str, ...]] = ("status", "page", "size", "sort")
DEFAULT_HEADER_ALLOW: Final[tuple[str, ...]] = (
    "content-type",
    "content-length",
    "accept",
    "user-agent",
    "x-request-id",
)
DEFAULT_MARKER: Final = "[REDACTED]"
# Longer than any order id, status, path segment or User-Agent worth exporting, and it bounds the
# scan cost of one value (the card check is O(length x 19)); a longer value becomes the marker.
DEFAULT_MAX_VALUE_LENGTH: Final = 1024
# Below this a value cannot hold an order id or status we want to keep next to the marker.
_MIN_MAX_VALUE_LENGTH: Final = 64

# Credential-bearing headers: never recorded, whatever the allow-list says.
NEVER_HEADERS: Final[tuple[str, ...]] = (
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
    "x-api-key",
    "api-key",
    "x-auth-token",
)
# A header whose lowercased name contains one of these is a credential too (x-csrf-token, ...).
NEVER_HEADER_FRAGMENTS: Final[tuple[str, ...]] = (
    "token",
    "secret",
    "api-key",
    "apikey",
    "api_key",
    "password",
    "cookie",
    "authorization",
)

# ── detection tables ───────────────────────────────────────────────────────────────────────────
# Possessive quantifiers and the lookbehinds (a match starts only where its token starts) keep
# every scan linear in the input: no position is rescanned after a failed attempt.
_LOCAL = r"[\w.+\-]"
# RFC 5321 §4.1.2: a local part is a dot-string or a quoted string ('"ivan canary"@...'), and
# the domain a name or an address literal ('[192.0.2.1]', '[IPv6:2001:db8::1]').
_QUOTED_LOCAL = r'"(?:[^"\\\r\n]++|\\.)*+"'
_DOMAIN = r"(?:[\w\-]++(?:\.[\w\-]++)+|\[[0-9A-Za-z.:\-]++\])"
# '%40' too: an encoded '@' in a value that was never decoded is still an address.
_EMAIL: Final = rf"(?:(?<!{_LOCAL}){_LOCAL}++|{_QUOTED_LOCAL})(?:@|%40){_DOMAIN}"
# A digit run: digit groups joined by 1-3 separators ("8 (900) 123-45-67", "+33 1.23.45.67.89").
# A '+' run needs 7 digits (the shortest E.164 numbers), a bare run 10 (the shortest shape in
# _NATIONAL_PHONE_SHAPES); each run is then judged window by window in _run_is_personal.
_SEP = r"[ ().\-]{1,3}+"
_RUN: Final = (
    rf"(?<![0-9])(?:\+[ (]{{0,2}}+[0-9](?:{_SEP}[0-9]|[0-9]){{6,}}+|[0-9](?:{_SEP}[0-9]|[0-9]){{9,}}+)"
)
_RUN_SPLIT: Final = r"([^0-9]+)"
# A run wholly inside a UUID is hex, not a number: "...-a716-446655440000" holds a 15-digit run.
_UUID: Final = r"(?<![0-9A-Za-z])[0-9A-Fa-f]{8}(?:-[0-9A-Fa-f]{4}){3}-[0-9A-Fa-f]{12}(?![0-9A-Za-z])"

# Fast path: with no '@', '%' or '+' and at most 9 ASCII digits neither _EMAIL nor _RUN can
# match, so such a value (statuses, routes, short ids) skips the scan. Exact, not a heuristic.
_PLAIN: Final = r"(?:[^0-9@%+]*+[0-9]){0,9}+[^0-9@%+]*+"

# National phone shapes: digit-group sizes (as written between separators) of an 11-digit
# Russian number with its trunk prefix, and of the 10-digit one without it, mapped to the
# leading digits each may start with. International numbers need no table: any '+' run of 7+
# digits is a phone. Trade-off for long digit runs: a bare 11-digit run starting with 7 or 8
# (an order number, say) cannot be told from a mobile number and is redacted; every other long
# run (epoch milliseconds, amounts in kopecks, 12-digit ids) is kept unless it is a Luhn-valid
# card length, so national formats of other countries written without '+' ("(212) 555-0100")
# are not caught.
_NATIONAL_PHONE_SHAPES: Final[Mapping[tuple[int, ...], str]] = MappingProxyType(
    {
        (11,): "78",  # 89001234567
        (1, 10): "78",  # 8 9001234567
        (1, 3, 7): "78",  # 8 900 1234567
        (1, 3, 3, 4): "78",  # 8 900 123 4567
        (1, 3, 3, 2, 2): "78",  # 8 (900) 123-45-67
        (4, 3, 2, 2): "78",  # 8900 123 45 67
        (3, 3, 2, 2): "9",  # (900) 123-45-67
    }
)
# A run longer than this is redacted whole, unexamined. It bounds the work of one value: the
# phone and card checks of a 1,020-character run of "411 411 ..." took ~1 ms each (120 such
# header values cost 86-130 ms a request). Little is lost: the longest personal shapes (a
# 19-digit card in groups with 3-character separators, a phone with its trunk prefix) stay
# under 40 characters, and a long run of digit groups almost always holds a Luhn-valid 13-19
# digit window anyway (each passes with odds 1 in 10), so it was redacted before as well.
_MAX_RUN_CHARS: Final = 128

# The characters of recorded header values one request may have scanned. The allow-listed headers
# of an ordinary request hold a few hundred; a caller who repeats one of them (128 fields of 1,020
# characters fit the parser's limits) would otherwise choose how much work a request costs. Past
# the budget a value becomes the marker unread, so one request's header redaction costs at most
# about eight worst-case values.
MAX_HEADER_CHARS_PER_REQUEST: Final = 8192

# Key normalisation for redact_keys: "full_name", "Full-Name" and "fullName" are one key.
_KEY_NOISE: Final = r"[\s_.\-]+"

# ── identity ───────────────────────────────────────────────────────────────────────────────────
# aiohttp's default max_field_size is 8190 bytes, so a longer Authorization header never reaches
# us through it; the cap also bounds base64 and JSON work when someone raises that limit.
_MAX_TOKEN_CHARS: Final = 8192
# RFC 5321 caps an e-mail address, the longest common user id, at 254 octets; longer is not an id.
_MAX_USER_ID_CHARS: Final = 256
# 16 bytes = 128 bits: the birthday bound gives ~1.5e-21 odds of any collision among 10^9 users
# (64 bits would already give ~3% there), and 32 hex chars stay short enough for every span.
_PSEUDONYM_BYTES: Final = 16


def is_never_header(name: str) -> bool:
    """Tell whether a header carries credentials and so may never be recorded.

    Args:
        name: A header name, any case.

    Returns:
        True for the names in NEVER_HEADERS and any name containing a NEVER_HEADER_FRAGMENTS part.
    """
    lowered = name.strip().lower()
    return lowered in NEVER_HEADERS or any(part in lowered for part in NEVER_HEADER_FRAGMENTS)


@dataclass(frozen=True, slots=True, kw_only=True)
class PrivacyPolicy:
    """What may leave the proxy: personal keys, allowed query parameters and headers, the marker.

    Attributes:
        redact_keys: JSON member names whose values are personal; '*' is a wildcard, matching
            ignores case and the separators '_', '-', '.' and spaces.
        query_allow: Query parameters kept in url.query (case-insensitive); all others are dropped.
        header_allow: Headers recorded (case-insensitive); never a credential header.
        user_id_header: The header carrying the raw user id; never recordable either.
        marker: What replaces a personal value. Its first and last characters must not be able
            to join a neighbour into a new match (letters, digits, '.', '+', '-', '%', '@',
            parentheses, spaces), which keeps redaction idempotent.
        max_value_length: Values longer than this become the marker.

    Raises:
        ValueError: On an allow-listed credential header or an unusable marker or length.
    """

    redact_keys: tuple[str, ...] = DEFAULT_REDACT_KEYS
    query_allow: tuple[str, ...] = DEFAULT_QUERY_ALLOW
    header_allow: tuple[str, ...] = DEFAULT_HEADER_ALLOW
    user_id_header: str = "x-user-id"
    marker: str = DEFAULT_MARKER
    max_value_length: int = DEFAULT_MAX_VALUE_LENGTH

    def __post_init__(self) -> None:
        for header in self.header_allow:
            if is_never_header(header) or header.strip().lower() == self.user_id_header.lower():
                raise ValueError(f"header_allow: {header!r} carries credentials or a raw user id")
        if not self.marker or any(
            re.fullmatch(r"[\w\s.+%@()\-]", ch) for ch in (self.marker[0], self.marker[-1])
        ):
            raise ValueError(f"marker: {self.marker!r} must start and end with a character like '[' or ']'")
        if self.max_value_length < _MIN_MAX_VALUE_LENGTH:
            raise ValueError(f"max_value_length: {self.max_value_length} is below {_MIN_MAX_VALUE_LENGTH}")


# Answers of Redactor.value kept for values seen again (see Redactor.__init__).
_MEMO_SIZE: Final = 4096


class Redactor:
    """Scrubs values, paths, queries, headers and JSON scalars under one PrivacyPolicy.

    Detected in free text: e-mail addresses (also with '%40'), phone numbers ('+' followed by
    7+ digits in any grouping; Russian national shapes, see _NATIONAL_PHONE_SHAPES) and
    Luhn-valid 13-19 digit card numbers (see cards.CARD_MIN_GROUP). Kept: UUIDs (shielded
    explicitly), ISO timestamps, prices, versions and ids such as ORD-2026-000123 (no shape
    above fits them). A value that is not ASCII is also read folded (textfold.fold: NFKC
    without format characters), so fullwidth forms, no-break spaces and zero-width characters
    hide nothing; Arabic-Indic and other non-ASCII digits still pass.
    Names and addresses have no pattern: they are caught only by key (json_scalar) or by
    never being recorded (dropped query parameters and headers).
    """

    __slots__ = (
        "_email",
        "_header_allow",
        "_key_noise",
        "_keys",
        "_marker",
        "_marker_template",
        "_max",
        "_memo",
        "_phone",
        "_plain",
        "_query_allow",
        "_run",
        "_run_split",
        "_uuid",
        "policy",
    )

    def __init__(self, policy: PrivacyPolicy | None = None) -> None:
        """Compile every pattern of the policy once.

        Args:
            policy: The policy; the defaults when omitted.

        Raises:
            ValueError: When the marker itself looks personal.
        """
        self.policy: Final = policy or PrivacyPolicy()
        self._marker = self.policy.marker
        # re.sub reads backslashes in a replacement string as escapes; the marker is literal.
        self._marker_template = self._marker.replace("\\", "\\\\")
        self._max = self.policy.max_value_length
        self._email = re.compile(_EMAIL)
        self._run = re.compile(_RUN)
        self._run_split = re.compile(_RUN_SPLIT)
        self._phone = re.compile("|".join(map(_shape_pattern, _NATIONAL_PHONE_SHAPES.items())))
        self._uuid = re.compile(_UUID)
        self._plain = re.compile(_PLAIN)
        self._key_noise = re.compile(_KEY_NOISE)
        globs = [
            re.escape(self._key_noise.sub("", k.casefold())).replace(r"\*", ".*")
            for k in self.policy.redact_keys
        ]
        self._keys = re.compile("|".join(globs) if globs else "(?!)", re.DOTALL)
        self._query_allow = frozenset(name.casefold() for name in self.policy.query_allow)
        self._header_allow = frozenset(name.strip().lower() for name in self.policy.header_allow)
        # value() answers for the same order id and status several times per request; the last
        # few thousand answers are kept (in memory only, like the request itself), and the
        # table is emptied when full, so it stays bounded whatever callers send.
        self._memo: dict[str, str] = {}
        if self.value(self._marker) != self._marker:
            raise ValueError(f"marker: {self._marker!r} would itself be redacted")

    # ── free text ──────────────────────────────────────────────────────────────────────────────

    def value(self, s: str) -> str:
        """Replace every e-mail address, phone number and card number in a value by the marker.

        Args:
            s: A decoded value (header value, JSON string, path segment, query value).

        Returns:
            The value with each personal item replaced; the marker alone when it is too long.
        """
        memo = self._memo
        known = memo.get(s)
        if known is not None:
            return known
        if len(memo) >= _MEMO_SIZE:
            memo.clear()
        memo[s] = out = self._scrub(s)
        return out

    def _scrub(self, s: str) -> str:
        # The cap comes before any pattern: it bounds the work one value can cost.
        if len(s) > self._max:
            return self._marker
        out = self._scan(s)
        if not s.isascii():
            # What only the folded reading shows (a phone spaced with U+00A0, an address with a
            # zero-width space or a fullwidth '@') was written to hide, or pasted from a word
            # processor: the whole value becomes the marker, as a personal path segment or query
            # value does. When both readings find the same, the plain finds are kept exactly.
            folded = fold(s)
            if folded != s:
                # NFKC can lengthen text (one character up to 18): the cap holds here too.
                if len(folded) > self._max:
                    return self._marker
                if out == s:
                    # Nothing plain: one find in the folded reading settles it.
                    if self._holds_personal(folded):
                        return self._marker
                else:
                    found = self._scan(folded)
                    if found != folded and found != fold(out):
                        return self._marker
        return out

    def _scan(self, s: str) -> str:
        # UUIDs are common order ids and their hex can hold long digit runs: skip the scan.
        if self._plain.fullmatch(s) is not None or self._uuid.fullmatch(s) is not None:
            return s
        out = s
        # E-mail first, so the digits of "79001234567@mail.ru" go with the address.
        if "@" in out or "%40" in out:
            out = self._email.sub(self._marker_template, out)
        out = self._replace_runs(out)
        # Markers can be longer than what they replace; re-checking keeps value() idempotent.
        return out if len(out) <= self._max else self._marker

    def _replace_runs(self, s: str) -> str:
        """Replace each personal digit run by the marker, unless it lies inside a UUID."""
        spans = self._personal_runs(s)
        if not spans:
            return s
        pieces: list[str] = []
        last = 0
        for start, end in spans:
            pieces.append(s[last:start])
            pieces.append(self._marker)
            last = end
        pieces.append(s[last:])
        return "".join(pieces)

    def _holds_personal(self, s: str) -> bool:
        """Whether ``s`` holds anything :meth:`_scan` would replace; stops at the first find."""
        if self._plain.fullmatch(s) is not None or self._uuid.fullmatch(s) is not None:
            return False
        if ("@" in s or "%40" in s) and self._email.search(s) is not None:
            return True
        return bool(self._personal_runs(s, first=True))

    def _personal_runs(self, s: str, *, first: bool = False) -> list[tuple[int, int]]:
        """The spans of the digit runs that are phones or cards, outside UUIDs, in order
        (only the first one with ``first``)."""
        spans: list[tuple[int, int]] = []
        uuids: list[tuple[int, int]] | None = None
        for match in self._run.finditer(s):
            if not self._run_is_personal(match.group()):
                continue
            start, end = match.span()
            if uuids is None:
                # Rare path (a personal-looking run); found once per value, not once per run.
                uuids = [u.span() for u in self._uuid.finditer(s)]
            if not any(low <= start and end <= high for low, high in uuids):
                spans.append((start, end))
                if first:
                    break
        return spans

    def _run_is_personal(self, run: str) -> bool:
        """Tell whether a digit run is, or holds at a group boundary, a phone or a card number."""
        if run[0] == "+" or len(run) > _MAX_RUN_CHARS or self._phone.search(run) is not None:
            return True
        if len(run) < CARD_MIN_DIGITS:
            return False
        parts = self._run_split.split(run)
        return holds_card(parts[0::2], parts[1::2])

    def _is_personal(self, decoded: str) -> bool:
        return len(decoded) > self._max or self.value(decoded) != decoded

    # ── keys and JSON ──────────────────────────────────────────────────────────────────────────

    def key_is_personal(self, key: str) -> bool:
        """Tell whether a JSON member name (or any token of an RFC 6901 pointer) is personal.

        Args:
            key: A member name ("fullName"), or a pointer ("/customer/id") whose tokens are each
                checked, so everything under a personal member is personal too.

        Returns:
            True when a name matches redact_keys, ignoring case and '_', '-', '.', spaces.
        """
        if key.startswith("/"):
            # RFC 6901 section 4: "~1" is '/', "~0" is '~'.
            tokens = (t.replace("~1", "/").replace("~0", "~") for t in key[1:].split("/"))
            return any(self._keys.fullmatch(self._key_noise.sub("", t.casefold())) for t in tokens)
        return self._keys.fullmatch(self._key_noise.sub("", key.casefold())) is not None

    def json_scalar(self, key: str | None, value: object) -> str | None:
        """Turn a value a rule pulled from a JSON body into an exportable string.

        Args:
            key: Its member name or JSON Pointer, if known.
            value: The parsed JSON value.

        Returns:
            None for null, objects, arrays and anything else not a JSON scalar; the marker under a
            personal key; otherwise the text (booleans spelled as in JSON) scrubbed by value().
        """
        if isinstance(value, str):
            text = value
        elif isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, int | float):
            try:
                text = str(value)
            except ValueError:  # an int beyond sys.get_int_max_str_digits()
                return self._marker
        else:
            return None
        if key is not None and self.key_is_personal(key):
            return self._marker
        return self.value(text)

    # ── URL parts and headers ──────────────────────────────────────────────────────────────────

    def path(self, raw_path: str) -> str:
        """Scrub a raw (percent-encoded) path for url.path, keeping its slashes.

        A segment that holds anything personal once percent-decoded becomes the marker as a
        whole; other segments stay exactly as sent. Anything from '?' or '#' on is dropped:
        the query has its own allow-list (query()).

        Args:
            raw_path: The path as received, possibly with a query.

        Returns:
            The scrubbed path.
        """
        for delimiter in "?#":
            cut = raw_path.find(delimiter)
            if cut >= 0:
                raw_path = raw_path[:cut]
        if self._plain.fullmatch(raw_path) is not None:
            return raw_path
        # No pattern crosses a '/', so one clean scan of an undecoded path clears every segment.
        if "%" not in raw_path and len(raw_path) <= self._max and self.value(raw_path) == raw_path:
            return raw_path
        return "/".join([self._segment(seg) for seg in raw_path.split("/")])

    def _segment(self, raw: str) -> str:
        if self._plain.fullmatch(raw) is not None:
            return raw
        decoded = unquote(raw, errors="replace") if "%" in raw else raw
        return self._marker if self._is_personal(decoded) else raw

    def query(self, raw_query: str) -> str:
        """Keep only allow-listed query parameters, their values scrubbed, for url.query.

        Other parameters are dropped entirely rather than masked: their names can be personal
        too (?email=...), and a dropped pair cannot leak through a badly encoded value. A kept
        value holding anything personal becomes the marker as a whole. Never raises: malformed
        percent-encoding, '&&' and '='-less parameters are taken as they come.

        Args:
            raw_query: The query string as received, without '?'.

        Returns:
            The kept 'name=value' pairs as sent, joined by '&'.
        """
        kept: list[str] = []
        for part in raw_query.split("&"):
            name, eq, raw_value = part.partition("=")
            if not part or unquote_plus(name, errors="replace").casefold() not in self._query_allow:
                continue
            if raw_value and self._query_value_is_personal(raw_value):
                raw_value = self._marker
            kept.append(f"{name}{eq}{raw_value}")
        return "&".join(kept)

    def _query_value_is_personal(self, raw: str) -> bool:
        if self._plain.fullmatch(raw) is not None:
            return False
        if self._is_personal(unquote_plus(raw, errors="replace")):
            return True
        # A client that sends a literal '+' unencoded ("+44 20 7946 0958") means a plus, not a space.
        return "+" in raw and self._is_personal(unquote(raw, errors="replace"))

    def headers(self, pairs: Iterable[tuple[str, str]]) -> dict[str, tuple[str, ...]]:
        """Keep allow-listed headers only, values scrubbed; credential headers never appear.

        Args:
            pairs: Header (name, value) pairs in arrival order, repeats allowed.

        Returns:
            Lowercased name to its scrubbed values in arrival order; once the values read reach
            MAX_HEADER_CHARS_PER_REQUEST characters, each further value is the marker, unread.
        """
        kept: dict[str, list[str]] = {}
        budget = MAX_HEADER_CHARS_PER_REQUEST
        for name, value in pairs:
            lowered = name.lower()
            if lowered in self._header_allow:
                budget -= len(value)
                kept.setdefault(lowered, []).append(self.value(value) if budget >= 0 else self._marker)
        return {name: tuple(values) for name, values in kept.items()}


def _shape_pattern(shape: tuple[tuple[int, ...], str]) -> str:
    """Regex for one _NATIONAL_PHONE_SHAPES entry, bounded by non-digits."""
    sizes, leads = shape
    first = f"[{leads}][0-9]{{{sizes[0] - 1}}}"
    rest = "".join(f"{_SEP}[0-9]{{{size}}}" for size in sizes[1:])
    return f"(?<![0-9]){first}{rest}(?![0-9])"


# ── identity ───────────────────────────────────────────────────────────────────────────────────


def pseudonymize(key: bytes, user_id: str) -> str:
    """Keyed, stable pseudonym of a user id for enduser.id.

    Args:
        key: The HMAC key (privacy.user_id_key_file); without it there is no pseudonym.
        user_id: The raw user id.

    Returns:
        The first 16 bytes of HMAC-SHA256(key, user_id) as 32 lowercase hex characters.

    Raises:
        ValueError: On an empty key: an unkeyed hash of a user id is reversed by guessing ids.
    """
    if not key:
        raise ValueError("pseudonymize needs a non-empty key")
    # surrogatepass: header text decoded with surrogateescape must hash, not raise.
    digest = hmac.new(key, user_id.encode("utf-8", "surrogatepass"), hashlib.sha256).digest()
    return digest[:_PSEUDONYM_BYTES].hex()


def user_id_from_headers(
    headers: Mapping[str, str] | Iterable[tuple[str, str]],
    *,
    header_name: str = "x-user-id",
) -> str | None:
    """Find the raw user id behind a call: the user-id header, else the JWT 'sub' claim.

    The JWT comes from 'Authorization: Bearer <jwt>'; its payload is read, never verified, and
    garbage of any kind gives None, never an exception.

    Args:
        headers: A header mapping or (name, value) pairs; names match case-insensitively.
        header_name: The header carrying the user id.

    Returns:
        The stripped, non-empty user id of at most 256 characters, or None.
    """
    wanted = header_name.lower()
    items: Iterable[tuple[str, str]] = headers.items() if isinstance(headers, Mapping) else headers
    direct: str | None = None
    authorization: str | None = None
    for name, value in items:
        lowered = name.lower()
        if direct is None and lowered == wanted:
            direct = value
        elif authorization is None and lowered == "authorization":
            authorization = value
    user_id = _bounded_id(direct) if direct is not None else None
    if user_id is None and authorization is not None:
        user_id = _jwt_subject(authorization)
    return user_id


def _bounded_id(text: str) -> str | None:
    if len(text) > _MAX_USER_ID_CHARS:
        return None
    stripped = text.strip()
    return stripped or None


def _jwt_subject(authorization: str) -> str | None:
    """Read 'sub' from a Bearer JWS (RFC 7515 compact form) without verifying it."""
    if len(authorization) > _MAX_TOKEN_CHARS:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    # RFC 7235: the auth scheme is case-insensitive. A JWE (5 segments) has an encrypted payload.
    segments = token.strip().split(".")
    if scheme.lower() != "bearer" or len(segments) != 3:
        return None
    payload = segments[1]
    try:
        # RFC 7515 section 2: base64url without padding; restore it before decoding.
        raw = base64.b64decode(payload + "=" * (-len(payload) % 4), altchars=b"-_", validate=True)
        claims = json.loads(raw)
    except (ValueError, RecursionError):  # binascii.Error, JSON and UTF errors are ValueErrors
        return None
    subject = claims.get("sub") if isinstance(claims, dict) else None
    return _bounded_id(subject) if isinstance(subject, str) else None
