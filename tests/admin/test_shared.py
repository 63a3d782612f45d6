"""The process's shared objects: what a fresh one holds, and that the composition root builds it."""

from __future__ import annotations

import time

from mes_trace_proxy import app
from mes_trace_proxy.admin.shared import Readiness, Shared


def test_a_fresh_readiness_is_not_ready() -> None:
    """Nothing is bound, nothing drains and no upstream has answered until the lifecycle says so."""
    readiness = Readiness()
    assert (readiness.listeners_bound, readiness.draining, readiness.last_upstream_answer) == (
        False,
        False,
        {},
    )
    assert Readiness().last_upstream_answer is not readiness.last_upstream_answer


def test_the_composition_root_hands_out_the_same_classes() -> None:
    """app.py re-exports these, so `from mes_trace_proxy.app import Shared` keeps working."""
    assert app.Shared is Shared
    assert app.Readiness is Readiness
    fields = set(Shared.__dataclass_fields__)
    assert {"config", "tracing", "metrics", "readiness", "watchdog", "messages"} <= fields
    assert Shared.__dataclass_fields__["clock"].default is time.time
