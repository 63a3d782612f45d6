"""Payment card numbers inside runs of digit groups: the card check of the redactor.

Pure and linear in the run: the Luhn sums of every prefix are computed once, in C over bytes,
so each window of groups is checked in constant time.
"""

from __future__ import annotations

from itertools import accumulate, product
from typing import Final

__all__ = ["CARD_MAX_DIGITS", "CARD_MIN_DIGITS", "CARD_MIN_GROUP", "holds_card"]

# Payment card numbers (ISO/IEC 7812 PANs as issued by card networks) are 13 to 19 digits.
CARD_MIN_DIGITS: Final = 13
CARD_MAX_DIGITS: Final = 19
# Cards are printed unbroken or in groups of 4-6 digits (4-4-4-4, 4-6-5, 4-4-4-4-3) joined by
# spaces or dashes; dots and parentheses mean something else (versions, prices, phones).
# Requiring groups of 3+ digits keeps dates ("2026-01-15 2026-01-16") and lists of small
# numbers from ever forming a 13-19 digit window.
CARD_MIN_GROUP: Final = 3
# Every separator redact._SEP admits that is made of spaces and dashes only ("4111  1111", "4111 - 1111").
_CARD_SEPARATORS: Final = frozenset("".join(p) for n in (1, 2, 3) for p in product(" -", repeat=n))
# Major industry identifier 0 is not issued to card networks; excluding it keeps zero-padded ids
# ("0000000000001234", Luhn-valid by accident) out of the card check.
_CARD_FIRST_DIGITS: Final = "123456789"
# Luhn: each ASCII digit mapped to the digit sum of its double, for bytes.translate.
_LUHN_DOUBLED: Final = bytes.maketrans(b"0123456789", b"0246813579")


def holds_card(groups: list[str], separators: list[str]) -> bool:
    """Tell whether some window of consecutive digit groups is a card-shaped, Luhn-valid number.

    The Luhn sums of every prefix are computed once (in C, over bytes), so each window is
    checked in constant time; a window spans at most six groups (19 digits in groups of 3+).

    Args:
        groups: The digit groups of a run.
        separators: The separators between them (one fewer).

    Returns:
        True when a window of 13-19 digits, starting with 1-9, made of 3+ digit groups joined by
        spaces or dashes, passes the Luhn check.
    """
    sizes = [len(g) for g in groups]
    if sum(sizes) < CARD_MIN_DIGITS:
        return False
    # Only a stretch of 3+ digit groups joined by card separators can hold a card: when none
    # reaches 13 digits (most runs: dates, ids beside short numbers) nothing more is built.
    longest = stretch = 0
    for index, size in enumerate(sizes):
        if size < CARD_MIN_GROUP:
            stretch = 0
            continue
        joined = (
            index > 0 and sizes[index - 1] >= CARD_MIN_GROUP and separators[index - 1] in _CARD_SEPARATORS
        )
        stretch = stretch + size if joined else size
        longest = max(longest, stretch)
    if longest < CARD_MIN_DIGITS:
        return False
    plain = "".join(groups).encode("ascii")
    doubled = plain.translate(_LUHN_DOUBLED)
    # Digit sums with the even (odd) indexes doubled, as running totals: each byte is an ASCII
    # digit, so a window's sum carries 48 per digit, taken off below.
    even = bytearray(plain)
    even[0::2] = doubled[0::2]
    odd = bytearray(plain)
    odd[1::2] = doubled[1::2]
    even_sums = list(accumulate(even, initial=0))
    odd_sums = list(accumulate(odd, initial=0))
    offsets = list(accumulate(sizes, initial=0))
    count = len(groups)
    for start in range(count):
        if groups[start][0] not in _CARD_FIRST_DIGITS:
            continue
        first = offsets[start]
        for end in range(start, count):
            if sizes[end] < CARD_MIN_GROUP or (end > start and separators[end - 1] not in _CARD_SEPARATORS):
                break
            stop = offsets[end + 1]
            length = stop - first
            if length > CARD_MAX_DIGITS:
                break
            # Luhn doubles every second digit from the right: index i when i and stop have the
            # same parity.
            sums = odd_sums if stop & 1 else even_sums
            if length >= CARD_MIN_DIGITS and (sums[stop] - sums[first] - 48 * length) % 10 == 0:
                return True
    return False
