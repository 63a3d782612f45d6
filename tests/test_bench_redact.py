"""bench.redact: the worst-case inputs are what they claim, and the benchmark runs end to end."""

from __future__ import annotations

import pytest

from bench import redact as bench
from mes_trace_proxy.redact import DEFAULT_MARKER, Redactor


@pytest.mark.parametrize("case", sorted(bench.WORST_CASES))
def test_crafted_values_are_distinct_and_under_the_cap(case: str) -> None:
    """Every value is distinct (the memo cannot help) and just under the 1,024-character cap."""
    values = [v for _, v in bench.crafted_values(case)]
    assert len(values) == bench.VALUES == len(set(values))
    assert all(len(v) == bench.VALUE_LENGTH for v in values)


def test_the_security_tests_input_is_redacted() -> None:
    """The first case is the reported one, and redaction of it ends in the marker."""
    [(_, value)] = bench.crafted_values("411-groups", 1)
    assert value.startswith("411 411 ")
    assert Redactor().value(value) == DEFAULT_MARKER


def test_main_prints_one_line_per_case(capsys: pytest.CaptureFixture[str]) -> None:
    """A short run prints the ordinary row and the chosen case."""
    assert bench.main(["--rounds", "1", "--values", "2", "--case", "emails"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert [row.split()[0] for row in rows] == ["case", "ordinary", "emails"]
