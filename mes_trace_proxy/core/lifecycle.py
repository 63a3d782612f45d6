"""The order-status table: which status follows which, and how long each may last.

Pure: no I/O and no clock. ``classify(prev, new)`` is two dict look-ups in a table built once.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final

__all__ = [
    "ANOMALIES",
    "REFERENCE_LIFECYCLE",
    "Lifecycle",
    "TransitionKind",
]


class TransitionKind(enum.StrEnum):
    """How a new status relates to the previous one (values are metric-label safe)."""

    FIRST = "first"
    """First status seen for an order, and it is one of the lifecycle's entry statuses."""
    FORWARD = "forward"
    """The next status in lifecycle order."""
    REPEAT = "repeat"
    """The same status again (a retry, or a read confirming what we know)."""
    SKIP = "skip"
    """Forward, but past one or more statuses."""
    BACKWARD = "backward"
    """To an earlier status."""
    CANCEL = "cancel"
    """To the cancel status from a non-terminal one."""
    AFTER_TERMINAL = "after_terminal"
    """Any change after a terminal status."""
    UNKNOWN_STATUS = "unknown_status"
    """The new status, or the one it leaves, is not in the lifecycle."""
    UNKNOWN_ORDER = "unknown_order"
    """First sighting of an order, and it is mid-lifecycle: it was created behind our back."""

    @property
    def anomaly(self) -> bool:
        """True for the kinds worth a span event and a metric."""
        return self in ANOMALIES


ANOMALIES: Final[frozenset[TransitionKind]] = frozenset(
    {
        TransitionKind.SKIP,
        TransitionKind.BACKWARD,
        TransitionKind.AFTER_TERMINAL,
        TransitionKind.UNKNOWN_STATUS,
        TransitionKind.UNKNOWN_ORDER,
    }
)

_Table = Mapping[str | None, Mapping[str, TransitionKind]]


@dataclass(frozen=True, slots=True, kw_only=True)
class Lifecycle:
    """An order lifecycle: forward path, cancel exit, terminal statuses and dwell limits.

    ``statuses`` is the forward path in order; ``cancel`` is a side exit that may follow any
    non-terminal status and must not be listed in ``statuses``. ``entry`` are the statuses
    that are a normal *first sighting*: ``None`` means the first two statuses, because in the
    reference lifecycle the first one (``FILE_UPLOADED``) is set by the Shop API, which never
    passes the proxy, so an order normally first appears at the second (``SUBMITTED``).

    Raises:
        ValueError: naming the problem (duplicate or empty status, cancel listed in the path,
            terminal or entry status unknown, dwell limit for an unknown or terminal status,
            non-positive or non-finite limit).
    """

    statuses: tuple[str, ...]
    cancel: str | None = None
    terminal: frozenset[str] = frozenset()
    entry: frozenset[str] | None = None
    dwell_limits: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    _table: _Table = field(init=False, repr=False, compare=False)
    _known: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Normalise container types so a Lifecycle built from YAML lists is still immutable.
        statuses = tuple(self.statuses)
        object.__setattr__(self, "statuses", statuses)
        object.__setattr__(self, "terminal", frozenset(self.terminal))
        object.__setattr__(self, "dwell_limits", MappingProxyType(dict(self.dwell_limits)))
        if not statuses:
            raise ValueError("lifecycle: statuses must not be empty")
        seen: set[str] = set()
        for status in statuses:
            if not isinstance(status, str) or not status:
                raise ValueError(f"lifecycle: status {status!r} must be a non-empty string")
            if status in seen:
                raise ValueError(f"lifecycle: status {status!r} is listed twice")
            seen.add(status)
        if self.cancel is not None:
            if not self.cancel:
                raise ValueError("lifecycle: cancel status must be a non-empty string or null")
            if self.cancel in seen:
                raise ValueError(
                    f"lifecycle: cancel status {self.cancel!r} must not be listed in statuses "
                    "(it is a side exit, not a step of the forward path)"
                )
        known = (*statuses, self.cancel) if self.cancel is not None else statuses
        object.__setattr__(self, "_known", known)
        if stray := sorted(self.terminal - set(known)):
            raise ValueError(f"lifecycle: terminal status {stray[0]!r} is not in statuses or cancel")
        entry = frozenset(statuses[:2]) if self.entry is None else frozenset(self.entry)
        object.__setattr__(self, "entry", entry)
        if not entry:
            raise ValueError("lifecycle: entry statuses must not be empty")
        if stray := sorted(entry - seen):
            raise ValueError(f"lifecycle: entry status {stray[0]!r} is not in statuses")
        for status, limit in self.dwell_limits.items():
            if status not in known:
                raise ValueError(f"lifecycle: dwell limit for unknown status {status!r}")
            if status in self.terminal:
                raise ValueError(f"lifecycle: dwell limit for terminal status {status!r}")
            valid = isinstance(limit, int | float) and not isinstance(limit, bool)
            if not valid or not math.isfinite(limit) or limit <= 0:
                raise ValueError(
                    f"lifecycle: dwell limit for {status!r} must be a positive number of seconds, "
                    f"got {limit!r}"
                )
        object.__setattr__(self, "_table", _build_table(statuses, self.cancel, self.terminal, entry))

    @property
    def known(self) -> tuple[str, ...]:
        """Every status of the lifecycle: the forward path, then the cancel status."""
        return self._known

    @property
    def entry_statuses(self) -> frozenset[str]:
        """The resolved entry statuses (``entry``, or the first two statuses when it was None)."""
        assert self.entry is not None  # resolved in __post_init__
        return self.entry

    def classify(self, prev: str | None, new: str) -> TransitionKind:
        """Classify the move from ``prev`` (None: order not seen before) to ``new``.

        Args:
            prev: The order's current status, or None for an order seen for the first time.
            new: The status the order moves to.

        Returns:
            The transition kind; never raises, whatever the strings are.
        """
        row = self._table.get(prev)
        if row is None:
            # ``prev`` is outside the lifecycle (adopted from MES): we cannot judge the move.
            return TransitionKind.REPEAT if prev == new else TransitionKind.UNKNOWN_STATUS
        return row.get(new, TransitionKind.UNKNOWN_STATUS)

    def dwell_limit(self, status: str) -> float | None:
        """Seconds an order may stay in ``status``, or None when it may stay forever."""
        return self.dwell_limits.get(status)

    def is_terminal(self, status: str) -> bool:
        """True when no change is expected after ``status``."""
        return status in self.terminal


def _build_table(
    statuses: tuple[str, ...], cancel: str | None, terminal: frozenset[str], entry: frozenset[str]
) -> _Table:
    """Precompute ``classify`` for every (prev, new) pair of known statuses."""
    index = {status: i for i, status in enumerate(statuses)}
    known = (*statuses, cancel) if cancel is not None else statuses
    table: dict[str | None, Mapping[str, TransitionKind]] = {
        None: MappingProxyType(
            {new: TransitionKind.FIRST if new in entry else TransitionKind.UNKNOWN_ORDER for new in known}
        )
    }
    for prev in known:
        row: dict[str, TransitionKind] = {}
        for new in known:
            if new == prev:
                kind = TransitionKind.REPEAT
            elif prev in terminal:
                kind = TransitionKind.AFTER_TERMINAL
            elif new == cancel:
                kind = TransitionKind.CANCEL
            elif prev == cancel:
                # A non-terminal cancel status (unusual config) followed by a path status.
                kind = TransitionKind.BACKWARD
            else:
                step = index[new] - index[prev]
                kind = (
                    TransitionKind.FORWARD
                    if step == 1
                    else TransitionKind.SKIP
                    if step > 1
                    else TransitionKind.BACKWARD
                )
            row[new] = kind
        table[prev] = MappingProxyType(row)
    return MappingProxyType(table)


_MINUTE: Final = 60.0
_HOUR: Final = 60 * _MINUTE
_DAY: Final = 24 * _HOUR

REFERENCE_LIFECYCLE: Final = Lifecycle(
    # Order and meaning: /work/shared/docs/mes-api.md, "Order statuses (in lifecycle order)".
    statuses=(
        "FILE_UPLOADED",
        "SUBMITTED",
        "PRICE_CALCULATED",
        "MANUFACTURING_APPROVED",
        "MANUFACTURING_STARTED",
        "MANUFACTURING_COMPLETED",
        "PACKAGING",
        "SHIPPED",
        "CLOSED",
    ),
    # mes-api.md: "`CANCELLED` may follow any non-terminal status"; CLOSED and CANCELLED end it.
    cancel="CANCELLED",
    terminal=frozenset({"CLOSED", "CANCELLED"}),
    # FILE_UPLOADED is set by the Shop API, which never passes the proxy (mes-api.md "set by").
    entry=frozenset({"FILE_UPLOADED", "SUBMITTED"}),
    # Every number below: mes-api.md, "Default dwell limits".
    dwell_limits={
        "SUBMITTED": 15 * _MINUTE,  # price calculation lost or MES overloaded (problem 2)
        "MANUFACTURING_APPROVED": 2 * _HOUR,  # operator never took it into work (problem 3)
        "MANUFACTURING_STARTED": 72 * _HOUR,
        "MANUFACTURING_COMPLETED": 24 * _HOUR,
        "PACKAGING": 24 * _HOUR,
        "SHIPPED": 14 * _DAY,
    },
)
