"""How the redactor reads text that is not ASCII: NFKC, without format characters.

Personal data written with look-alike characters (a phone spaced with U+00A0, an address with
a zero-width space or a fullwidth commercial at) must not slip past patterns written for
ASCII. Pure; the table is built once at import.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

__all__ = ["FOLD_TABLE", "FORMAT_RANGES", "fold"]

# The format characters (Unicode category Cf) of Unicode 14, as ranges; tests check them
# against the running unicodedata, so a newer Unicode that adds some fails loudly.
FORMAT_RANGES: Final = (
    (0x00AD, 0x00AD),
    (0x0600, 0x0605),
    (0x061C, 0x061C),
    (0x06DD, 0x06DD),
    (0x070F, 0x070F),
    (0x0890, 0x0891),
    (0x08E2, 0x08E2),
    (0x180E, 0x180E),
    (0x200B, 0x200F),
    (0x202A, 0x202E),
    (0x2060, 0x2064),
    (0x2066, 0x206F),
    (0xFEFF, 0xFEFF),
    (0xFFF9, 0xFFFB),
    (0x110BD, 0x110BD),
    (0x110CD, 0x110CD),
    (0x13430, 0x1343F),
    (0x1BCA0, 0x1BCA3),
    (0x1D173, 0x1D17A),
    (0xE0001, 0xE0001),
    (0xE0020, 0xE007F),
)
# The dashes a phone number is written with besides "-": hyphen, non-breaking hyphen, figure
# dash, en dash, em dash, horizontal bar, minus sign. NFKC keeps them.
_DASHES: Final = "\u2010\u2011\u2012\u2013\u2014\u2015\u2212"
FOLD_TABLE: Final[Mapping[int, str | None]] = MappingProxyType(
    {
        **{code: None for first, last in FORMAT_RANGES for code in range(first, last + 1)},
        **{ord(dash): "-" for dash in _DASHES},
    }
)


def fold(s: str) -> str:
    """What the redactor's patterns read of a non-ASCII value.

    NFKC: fullwidth forms ("\\uff20" for "@", fullwidth digits), no-break and other
    spaces become ASCII. Then the format characters go (soft hyphen, zero-width space and
    joiners, bidi controls: they render as nothing but split a match), and the dashes above
    become "-". Linear in the value; NFKC may lengthen it (one character up to 18).

    Args:
        s: any text.

    Returns:
        The folded text (``s`` itself when there was nothing to fold).
    """
    # Format characters out before NFKC too: one between a letter and a combining mark would
    # otherwise keep them apart until a second folding composed them.
    return unicodedata.normalize("NFKC", s.translate(FOLD_TABLE)).translate(FOLD_TABLE)
