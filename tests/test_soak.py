"""The soak's growth rule (bench/soak.py): a least-squares trend over the second half, judged
against a significance threshold and an hourly budget."""

from __future__ import annotations

import math
import random

import pytest

from bench.soak import BUDGETS, Sample, main, trend, verdict


def _samples(rss: list[float], *, fds: float = 40.0, tasks: float = 10.0) -> list[Sample]:
    """One sample every 10 s with the given RSS series and flat descriptors and tasks."""
    return [
        Sample(
            minute=i / 6,
            rss_mib=value,
            fds=fds,
            tasks=tasks,
            orders=1200.0,
            requests=i * 1500.0,
            spans_exported=0.0,
            spans_lost=0.0,
        )
        for i, value in enumerate(rss)
    ]


@pytest.mark.parametrize(
    ("points", "per_hour", "t_sign"),
    [
        pytest.param([(0.0, 5.0), (1.0, 5.0), (2.0, 5.0)], 0.0, 0, id="flat"),
        pytest.param([(0.0, 0.0), (1.0, 1.0), (2.0, 2.0), (3.0, 3.0)], 60.0, 1, id="perfect-rise"),
        pytest.param([(0.0, 3.0), (1.0, 2.0), (2.0, 1.0)], -60.0, -1, id="perfect-fall"),
        pytest.param([(0.0, 1.0), (1.0, 2.0)], 0.0, 0, id="too-few-points"),
        pytest.param([(1.0, 1.0), (1.0, 2.0), (1.0, 3.0)], 0.0, 0, id="one-instant"),
    ],
)
def test_trend_table(points: list[tuple[float, float]], per_hour: float, t_sign: int) -> None:
    """Slopes are per hour; a perfect line has an infinite t-statistic; degenerate input gives 0."""
    fitted = trend(points)
    assert fitted.per_hour == pytest.approx(per_hour)
    if t_sign == 0:
        assert fitted.t_stat == 0.0
    else:
        assert math.isinf(fitted.t_stat)
        assert math.copysign(1, fitted.t_stat) == t_sign


def test_steady_noisy_series_is_bounded() -> None:
    """RSS wobbling by a few MiB around a flat line over 30 minutes is not growth."""
    noise = random.Random(7)
    judged = verdict(_samples([80 + noise.uniform(-3, 3) for _ in range(181)]))
    assert not any(unbounded for _, unbounded in judged.values())


def test_warm_up_then_flat_is_bounded() -> None:
    """Growth confined to the first half (pools filling, order book reaching its size) passes."""
    rss = [50 + min(i, 60) * 0.5 for i in range(181)]  # +30 MiB in 10 minutes, then flat
    fitted, unbounded = verdict(_samples(rss))["rss_mib"]
    assert fitted.per_hour == pytest.approx(0.0, abs=1e-9)
    assert not unbounded


def test_short_run_warm_up_lasts_three_minutes() -> None:
    """In a 5-minute run, growth that stops at minute 3 (past the half) is still warm-up."""
    rss = [50 + min(i, 18) * 0.5 for i in range(31)]  # +9 MiB over the first 3 minutes, then flat
    fitted, unbounded = verdict(_samples(rss))["rss_mib"]
    assert fitted.per_hour == pytest.approx(0.0, abs=1e-9)
    assert not unbounded


def test_steady_leak_in_the_second_half_fails() -> None:
    """1 MiB a minute that keeps going (60 MiB/h, over the 32 MiB/h budget) is flagged even with noise."""
    noise = random.Random(3)
    judged = verdict(_samples([60 + i / 6 + noise.uniform(-1, 1) for i in range(181)]))
    fitted, unbounded = judged["rss_mib"]
    assert unbounded
    assert fitted.per_hour == pytest.approx(60, rel=0.1)
    assert not judged["fds"][1]


def test_slow_creep_under_budget_passes() -> None:
    """A significant but small creep (6 MiB/h) is within budget."""
    fitted, unbounded = verdict(_samples([60 + i / 60 for i in range(181)]))["rss_mib"]
    assert fitted.t_stat > 3
    assert not unbounded


def test_leaking_descriptors_fail() -> None:
    """One descriptor more each minute is an unbounded series of descriptors."""
    samples = [
        Sample(
            minute=i / 6,
            rss_mib=80.0,
            fds=40 + i // 6,
            tasks=10.0,
            orders=0.0,
            requests=0.0,
            spans_exported=0.0,
            spans_lost=0.0,
        )
        for i in range(181)
    ]
    assert verdict(samples)["fds"][1]


def test_every_budget_is_judged() -> None:
    """The verdict names every budgeted series, and nothing for an empty run."""
    assert set(verdict(_samples([1.0] * 10))) == {b.name for b in BUDGETS}
    assert verdict([]) == {}


@pytest.mark.parametrize(
    ("argv", "environ"),
    [
        pytest.param(["--minutes", "0.5"], {}, id="too-short"),
        pytest.param([], {"SOAK_MINUTES": "soon"}, id="env-not-a-number"),
    ],
)
def test_bad_duration_is_exit_2(argv: list[str], environ: dict[str, str]) -> None:
    """A run shorter than a minute or an unreadable SOAK_MINUTES stops with exit status 2."""
    assert main(argv, environ) == 2
