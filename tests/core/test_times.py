"""Times for people and machines: a table of durations and the ISO 8601 form."""

from __future__ import annotations

import pytest

from mes_trace_proxy.core.times import human_duration, iso_utc

T0 = 1_700_000_000.0


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0 s"),
        (-5, "0 s"),
        (45.9, "45 s"),
        (60, "1 min"),
        (61, "1 min 1 s"),
        (3900, "1 h 5 min"),
        (3659, "1 h"),
        (7200, "2 h"),
        (86400 * 2 + 3 * 3600 + 59, "2 d 3 h"),
    ],
)
def test_human_duration(seconds: float, text: str) -> None:
    """Durations read as their two largest units, never negative."""
    assert human_duration(seconds) == text


def test_iso_utc_is_utc_with_milliseconds() -> None:
    """Times are ISO 8601 in UTC with a Z, to the millisecond."""
    assert iso_utc(T0 + 0.25) == "2023-11-14T22:13:20.250Z"
