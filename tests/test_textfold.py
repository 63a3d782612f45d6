"""Tests for textfold: what the redactor's patterns read of text that is not ASCII."""

from __future__ import annotations

import unicodedata

import pytest

from mes_trace_proxy.textfold import FOLD_TABLE, fold


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("+7\u00a0900\u00a0123", "+7 900 123"),
        ("+7\u202f900\u2007123\u3000", "+7 900 123 "),
        ("ivan\u200b.canary\u00ad@exa\u2060mple.com\ufeff", "ivan.canary@example.com"),
        ("ivan\uff20example.com", "ivan@example.com"),
        ("\uff0b\uff17\uff19\uff10\uff10", "+7900"),
        ("8\u2011900\u2013123\u221245", "8-900-123-45"),
        ("\u202eevil\u202c", "evil"),
        ("Заказ №5", "Заказ No5"),
        ("٠١٢", "٠١٢"),
        ("plain ascii", "plain ascii"),
    ],
    ids=[
        "no-break-space",
        "other-spaces",
        "format-characters",
        "fullwidth-at",
        "fullwidth-digits",
        "dashes",
        "bidi-override",
        "numero-sign",
        "arabic-indic-digits-stay",
        "ascii",
    ],
)
def test_fold(text: str, expected: str) -> None:
    """NFKC, format characters removed, dashes as '-'."""
    assert fold(text) == expected


def test_fold_is_idempotent() -> None:
    """Folding folded text changes nothing (so redaction stays idempotent)."""
    sample = "".join(chr(c) for c in range(0x80, 0x3000) if unicodedata.category(chr(c)) != "Cs")
    once = fold(sample)
    assert fold(once) == once


def test_format_table_covers_the_running_unicode() -> None:
    """Every Cf character of this Python's unicodedata is removed before matching."""
    cf = {c for c in range(0x110000) if unicodedata.category(chr(c)) == "Cf"}
    assert {c for c, v in FOLD_TABLE.items() if v is None} >= cf
