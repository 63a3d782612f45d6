"""Tests for cards: the Luhn window check against an obviously right, slow reference."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mes_trace_proxy.cards import holds_card


def luhn_valid(digits: str) -> bool:
    """Independent Luhn check (ISO/IEC 7812-1 annex B), digit by digit from the right."""
    total = 0
    for index, char in enumerate(reversed(digits)):
        digit = int(char) * (2 if index % 2 else 1)
        total += digit - 9 if digit > 9 else digit
    return total % 10 == 0


def reference_holds_card(groups: list[str], separators: list[str]) -> bool:
    """Every window checked digit by digit with the independent Luhn: slow, obviously right."""
    for start in range(len(groups)):
        for end in range(start, len(groups)):
            window = groups[start : end + 1]
            joints = separators[start:end]
            digits = "".join(window)
            if (
                13 <= len(digits) <= 19
                and digits[0] != "0"
                and all(len(g) >= 3 for g in window)
                and all(j and set(j) <= {" ", "-"} and len(j) <= 3 for j in joints)
                and luhn_valid(digits)
            ):
                return True
    return False


@pytest.mark.parametrize(
    ("groups", "separators", "card"),
    [
        (["4111111111111111"], [], True),
        (["4111111111111112"], [], False),
        (["4111", "1111", "1111", "1111"], [" ", " ", " "], True),
        (["4111", "1111", "1111", "1111"], [" ", ".", " "], False),
        (["3782", "822463", "10005"], ["-", "-", "-"][:2], True),
        (["12", "4111", "1111", "1111", "1111", "7"], [" ", " ", " ", " ", " "], True),
        (["0000", "0000", "0000", "0000"], [" ", " ", " "], False),
        (["41", "11", "11", "11", "11", "11", "11", "11"], [" "] * 7, False),
        (["4111", "1111", "1111", "1111"], [" - ", "  ", "-"], True),
        (["4111", "1111", "1111", "1111"], [" -  ", " ", " "], False),
    ],
    ids=[
        "unbroken",
        "luhn-invalid",
        "four-groups",
        "dot-is-not-a-card-separator",
        "amex-groups",
        "inside-a-longer-run",
        "mii-zero",
        "two-digit-groups",
        "mixed-separators",
        "separator-too-long",
    ],
)
def test_holds_card(groups: list[str], separators: list[str], card: bool) -> None:
    """Card-shaped, Luhn-valid windows only."""
    assert holds_card(groups, separators) is card
    assert reference_holds_card(groups, separators) is card


@given(
    st.lists(st.text(alphabet="0123456789", min_size=1, max_size=8), min_size=1, max_size=12),
    st.lists(st.sampled_from([" ", "-", "  ", " - ", ".", "(", ") "]), min_size=11, max_size=11),
)
@settings(max_examples=400, deadline=None)
def test_windows_match_the_reference(groups: list[str], separators: list[str]) -> None:
    """The prefix-sum check finds a card exactly when the brute-force reference does."""
    joints = separators[: len(groups) - 1]
    assert holds_card(groups, joints) == reference_holds_card(groups, joints)


@pytest.mark.parametrize("unit", ["411", "412", "4111", "1234"])
def test_long_runs_of_one_group_match_the_reference(unit: str) -> None:
    """255 equal groups, the security test's shape: the same answer as the reference."""
    groups = [unit] * (1020 // (len(unit) + 1))
    joints = [" "] * (len(groups) - 1)
    assert holds_card(groups, joints) == reference_holds_card(groups, joints)
