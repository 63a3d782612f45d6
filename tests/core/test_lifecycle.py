"""Tests for the order-status table: classification, dwell limits and validation."""

from __future__ import annotations

import dataclasses
from types import MappingProxyType
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mes_trace_proxy.core.lifecycle import ANOMALIES, REFERENCE_LIFECYCLE, Lifecycle, TransitionKind

K = TransitionKind

CLASSIFY_CASES: tuple[tuple[str | None, str, TransitionKind], ...] = (
    (None, "SUBMITTED", K.FIRST),
    (None, "FILE_UPLOADED", K.FIRST),
    (None, "PRICE_CALCULATED", K.UNKNOWN_ORDER),
    (None, "MANUFACTURING_STARTED", K.UNKNOWN_ORDER),
    (None, "CLOSED", K.UNKNOWN_ORDER),
    (None, "CANCELLED", K.UNKNOWN_ORDER),
    (None, "ON_HOLD", K.UNKNOWN_STATUS),
    ("FILE_UPLOADED", "SUBMITTED", K.FORWARD),
    ("SUBMITTED", "PRICE_CALCULATED", K.FORWARD),
    ("SHIPPED", "CLOSED", K.FORWARD),
    ("SUBMITTED", "SUBMITTED", K.REPEAT),
    ("CLOSED", "CLOSED", K.REPEAT),
    ("CANCELLED", "CANCELLED", K.REPEAT),
    ("MANUFACTURING_APPROVED", "MANUFACTURING_COMPLETED", K.SKIP),
    ("FILE_UPLOADED", "CLOSED", K.SKIP),
    ("PACKAGING", "SUBMITTED", K.BACKWARD),
    ("PRICE_CALCULATED", "SUBMITTED", K.BACKWARD),
    ("SUBMITTED", "CANCELLED", K.CANCEL),
    ("SHIPPED", "CANCELLED", K.CANCEL),
    ("CLOSED", "SHIPPED", K.AFTER_TERMINAL),
    ("CLOSED", "CANCELLED", K.AFTER_TERMINAL),
    ("CANCELLED", "SUBMITTED", K.AFTER_TERMINAL),
    ("SUBMITTED", "ON_HOLD", K.UNKNOWN_STATUS),
    ("ON_HOLD", "SUBMITTED", K.UNKNOWN_STATUS),
    ("ON_HOLD", "ON_HOLD", K.REPEAT),
    ("CLOSED", "ON_HOLD", K.UNKNOWN_STATUS),
)


@pytest.mark.parametrize(
    ("prev", "new", "kind"), CLASSIFY_CASES, ids=[f"{p}->{n}" for p, n, _ in CLASSIFY_CASES]
)
def test_classify_reference(prev: str | None, new: str, kind: TransitionKind) -> None:
    """The reference lifecycle classifies each kind of move as the doc describes."""
    assert REFERENCE_LIFECYCLE.classify(prev, new) is kind


def test_every_kind_is_covered_by_the_table() -> None:
    """The classification table exercises every transition kind at least once."""
    assert {kind for _, _, kind in CLASSIFY_CASES} == set(TransitionKind)


@pytest.mark.parametrize("kind", list(TransitionKind), ids=str)
def test_anomaly_flag(kind: TransitionKind) -> None:
    """Exactly skip, backward, after-terminal and the two unknowns are anomalies."""
    expected = kind in {K.SKIP, K.BACKWARD, K.AFTER_TERMINAL, K.UNKNOWN_STATUS, K.UNKNOWN_ORDER}
    assert kind.anomaly is expected
    assert (kind in ANOMALIES) is expected


def test_kind_values_are_label_safe() -> None:
    """Kind values are lower-case snake case, usable as metric labels as they are."""
    for kind in TransitionKind:
        assert kind.value == kind.name.lower()
        assert str(kind) == kind.value


REFERENCE_LIMITS = (
    ("SUBMITTED", 15 * 60.0),
    ("MANUFACTURING_APPROVED", 2 * 3600.0),
    ("MANUFACTURING_STARTED", 72 * 3600.0),
    ("MANUFACTURING_COMPLETED", 24 * 3600.0),
    ("PACKAGING", 24 * 3600.0),
    ("SHIPPED", 14 * 86400.0),
    ("FILE_UPLOADED", None),
    ("PRICE_CALCULATED", None),
    ("CLOSED", None),
    ("CANCELLED", None),
    ("ON_HOLD", None),
)


@pytest.mark.parametrize(("status", "limit"), REFERENCE_LIMITS, ids=[s for s, _ in REFERENCE_LIMITS])
def test_reference_dwell_limits(status: str, limit: float | None) -> None:
    """The reference dwell limits match docs/mes-api.md."""
    assert REFERENCE_LIFECYCLE.dwell_limit(status) == limit


@pytest.mark.parametrize(
    ("status", "terminal"),
    [("CLOSED", True), ("CANCELLED", True), ("SHIPPED", False), ("ON_HOLD", False)],
    ids=["closed", "cancelled", "shipped", "unknown"],
)
def test_is_terminal(status: str, terminal: bool) -> None:
    """Only CLOSED and CANCELLED are terminal in the reference lifecycle."""
    assert REFERENCE_LIFECYCLE.is_terminal(status) is terminal


def test_known_lists_path_then_cancel() -> None:
    """``known`` is the forward path followed by the cancel status."""
    assert REFERENCE_LIFECYCLE.known == (*REFERENCE_LIFECYCLE.statuses, "CANCELLED")


def test_entry_defaults_to_first_two_statuses() -> None:
    """Without ``entry``, the first two statuses are normal first sightings."""
    lifecycle = Lifecycle(statuses=("A", "B", "C"))
    assert lifecycle.entry_statuses == frozenset({"A", "B"})
    assert lifecycle.classify(None, "B") is K.FIRST
    assert lifecycle.classify(None, "C") is K.UNKNOWN_ORDER


def test_entry_is_configurable() -> None:
    """A configured entry set replaces the default."""
    lifecycle = Lifecycle(statuses=("A", "B", "C"), entry=frozenset({"A"}))
    assert lifecycle.classify(None, "A") is K.FIRST
    assert lifecycle.classify(None, "B") is K.UNKNOWN_ORDER


def test_no_cancel_status() -> None:
    """A lifecycle without a cancel status treats any other status as unknown."""
    lifecycle = Lifecycle(statuses=("A", "B"), terminal=frozenset({"B"}))
    assert lifecycle.classify("A", "CANCELLED") is K.UNKNOWN_STATUS
    assert lifecycle.classify("B", "A") is K.AFTER_TERMINAL


def test_inputs_are_normalised_to_immutable_types() -> None:
    """Lists and dicts from YAML become a tuple, frozensets and a read-only mapping."""
    raw: dict[str, Any] = {
        "statuses": ["A", "B", "C"],
        "terminal": ["C"],
        "entry": ["A"],
        "dwell_limits": {"A": 5},
    }
    lifecycle = Lifecycle(**raw)
    assert lifecycle.statuses == ("A", "B", "C")
    assert lifecycle.terminal == frozenset({"C"})
    assert isinstance(lifecycle.dwell_limits, MappingProxyType)
    raw["dwell_limits"]["A"] = 99
    assert lifecycle.dwell_limit("A") == 5
    with pytest.raises(dataclasses.FrozenInstanceError):
        lifecycle.cancel = "X"  # type: ignore[misc]


INVALID: tuple[tuple[str, dict[str, Any], str], ...] = (
    ("empty", {"statuses": ()}, "must not be empty"),
    ("duplicate", {"statuses": ("A", "B", "A")}, "'A' is listed twice"),
    ("blank-status", {"statuses": ("A", "")}, "non-empty string"),
    ("cancel-in-path", {"statuses": ("A", "X"), "cancel": "X"}, "must not be listed in statuses"),
    ("unknown-terminal", {"statuses": ("A", "B"), "terminal": frozenset({"Z"})}, "terminal status 'Z'"),
    ("unknown-entry", {"statuses": ("A", "B"), "entry": frozenset({"Z"})}, "entry status 'Z'"),
    ("empty-entry", {"statuses": ("A", "B"), "entry": frozenset()}, "entry statuses must not be empty"),
    ("limit-unknown", {"statuses": ("A", "B"), "dwell_limits": {"Z": 1.0}}, "unknown status 'Z'"),
    (
        "limit-terminal",
        {"statuses": ("A", "B"), "terminal": frozenset({"B"}), "dwell_limits": {"B": 1.0}},
        "terminal status 'B'",
    ),
    ("limit-zero", {"statuses": ("A", "B"), "dwell_limits": {"A": 0}}, "positive number"),
    ("limit-negative", {"statuses": ("A", "B"), "dwell_limits": {"A": -1.0}}, "positive number"),
    ("limit-nan", {"statuses": ("A", "B"), "dwell_limits": {"A": float("nan")}}, "positive number"),
    ("limit-inf", {"statuses": ("A", "B"), "dwell_limits": {"A": float("inf")}}, "positive number"),
    ("limit-bool", {"statuses": ("A", "B"), "dwell_limits": {"A": True}}, "positive number"),
    ("limit-str", {"statuses": ("A", "B"), "dwell_limits": {"A": "15m"}}, "positive number"),
)


@pytest.mark.parametrize(("kwargs", "message"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_lifecycle_names_the_problem(kwargs: dict[str, Any], message: str) -> None:
    """An invalid lifecycle cannot be built, and the error says what is wrong."""
    with pytest.raises(ValueError, match=message):
        Lifecycle(**kwargs)


def test_cancel_as_terminal_is_valid() -> None:
    """The cancel status may be terminal without being listed in the forward path."""
    lifecycle = Lifecycle(statuses=("A", "B"), cancel="X", terminal=frozenset({"B", "X"}))
    assert lifecycle.classify("A", "X") is K.CANCEL
    assert lifecycle.classify("X", "A") is K.AFTER_TERMINAL


@given(prev=st.one_of(st.none(), st.text(max_size=12)), new=st.text(max_size=12))
def test_classify_never_raises(prev: str | None, new: str) -> None:
    """Any pair of strings classifies to some kind; unknown new statuses are never ordinary."""
    kind = REFERENCE_LIFECYCLE.classify(prev, new)
    assert isinstance(kind, TransitionKind)
    if new not in REFERENCE_LIFECYCLE.known and prev != new:
        assert kind is K.UNKNOWN_STATUS
