"""Times as people and machines read them: ISO 8601 in UTC, and durations in their largest units."""

from __future__ import annotations

import datetime
from typing import Final

__all__ = ["human_duration", "iso_utc"]

_UNITS: Final = (("d", 86400), ("h", 3600), ("min", 60), ("s", 1))


def iso_utc(epoch: float) -> str:
    """``2024-05-01T12:00:00.000Z``: ISO 8601 in UTC, to the millisecond."""
    moment = datetime.datetime.fromtimestamp(epoch, datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def human_duration(seconds: float) -> str:
    """A duration for people, in its largest unit and the next one: ``2 d 3 h``, ``1 h``, ``45 s``."""
    total = max(0, int(seconds))
    for index, (name, size) in enumerate(_UNITS):
        if total >= size or size == 1:
            text = f"{total // size} {name}"
            if index + 1 < len(_UNITS):
                next_name, next_size = _UNITS[index + 1]
                rest = total % size // next_size
                if rest:
                    text += f" {rest} {next_name}"
            return text
    raise AssertionError("unreachable: the last unit is one second")
