"""The pure parts of bench/peers.py: the profile, and what is computed from the curves."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

# bench/ is not a package: its modules import each other by name, as the benchmarks run.
from peers_model import (
    Reading,
    Segment,
    changes_between,
    first_above_zero,
    first_reaching,
    first_reaching_or_past,
    floor,
    idle,
    integral,
    is_step,
    profile,
    proposal,
    replicas_for,
    value_at,
)

CURVE = [(10.0, 1), (20.0, 2), (25.0, 3), (40.0, 2)]


def test_the_profile_steps_up_and_down_has_a_noisy_plateau_goes_to_zero_and_wakes() -> None:
    segments = profile()
    counts = [s.count for s in segments]
    assert counts == [1, 2, 4, 4, 2, 0, 2]
    steps = [s.name for i, s in enumerate(segments) if is_step(segments, i)]
    assert steps == ["up 1 to 2", "up 2 to 4", "down 4 to 2", "quiet to zero", "wake to 2"]
    noisy = [s for s in segments if s.noise]
    assert len(noisy) == 1
    assert not is_step(segments, segments.index(noisy[0]))


def test_the_quick_profile_is_one_step_and_a_short_plateau() -> None:
    segments = profile(quick=True)
    assert [i for i in range(len(segments)) if is_step(segments, i)] == [1]
    assert sum(s.seconds for s in segments) < 60


def test_noise_is_the_same_for_the_same_seed_and_stays_within_its_bounds() -> None:
    plateau = Segment("p", 200, 60, noise=30, noise_period=5)
    first, again, other = plateau.loads(19), plateau.loads(19), plateau.loads(20)
    assert first == again
    assert first != other
    assert [offset for offset, _ in first] == [5.0 * i for i in range(12)]
    assert all(170 <= load <= 230 for _, load in first)
    assert Segment("s", 100, 5).loads(19) == [(0.0, 100)]


@pytest.mark.parametrize(
    ("load", "count"), [(0, 0), (1, 1), (50, 1), (50.0000000001, 1), (51, 2), (200, 4)]
)
def test_replicas_for_a_load(load: float, count: int) -> None:
    assert replicas_for(load) == count


def test_curve_values_and_the_first_time_a_count_is_reached() -> None:
    assert value_at(CURVE, 5) == 0
    assert value_at(CURVE, 20) == 2
    assert value_at(CURVE, 30) == 3
    assert first_reaching(CURVE, 15, 3) == 25.0
    assert first_reaching(CURVE, 22, 2) == 22  # already there when the step began
    assert first_reaching(CURVE, 15, 5) is None
    assert first_above_zero(CURVE, 0) == 10.0
    assert first_above_zero([(0.0, 0), (7.5, 2)], 3) == 7.5


def test_flaps_count_every_change_within_the_window() -> None:
    assert changes_between(CURVE, 15, 45) == 3
    assert changes_between(CURVE, 20, 30) == 1  # the change at the window's start is before it
    assert changes_between(CURVE, 41, 90) == 0


def test_the_integral_of_a_step_curve() -> None:
    # 1 x 10 s (10-20), 2 x 5 s, 3 x 15 s, 2 x 10 s (40-50)
    assert integral(CURVE, 0, 50) == pytest.approx(10 + 10 + 45 + 20)
    assert integral(CURVE, 22, 30) == pytest.approx(2 * 3 + 3 * 5)


@pytest.mark.parametrize(
    ("utilisation", "in_flight", "current", "expected"),
    [
        ((50.0,), 0.5, 1, 1),  # at target
        ((100.0,), 1.0, 1, 2),  # one GPU full: two replicas
        ((54.0, 54.0), 1.08, 2, 2),  # within the tolerance
        ((100.0, 100.0), 1.0, 2, 4),  # the GPU metric asks for more: the larger wins
        ((25.0, 25.0, 25.0, 25.0), 1.0, 4, 2),
        ((), 1.0, 0, 2),  # at zero only the request metric wakes
        ((), 0.2, 0, 1),
        ((), 0.0, 0, 0),
    ],
)
def test_the_proposal_both_sides_share(
    utilisation: tuple[float, ...], in_flight: float, current: int, expected: int
) -> None:
    assert proposal(utilisation, in_flight, current) == expected


def test_the_floor_is_the_first_reading_that_shows_the_new_count() -> None:
    readings = [
        Reading(9.0, (100.0,), 1.0),  # before the step: ignored
        Reading(10.5, (50.0,), 0.5),
        Reading(11.0, (60.0,), 1.0),
        Reading(12.0, (100.0,), 1.0),
    ]
    assert floor(readings, 10, 1, 2) == 11.0  # the request metric shows it first
    assert floor(readings, 10, 1, 3) is None
    quiet = [Reading(1.0, (30.0,), 0.0), Reading(2.0, (0.5,), 0.0)]
    assert floor(quiet, 0, 1, 0) == 2.0  # to zero: once the series show no demand
    assert idle((), 0.0)
    assert not idle((0.5,), 0.1)


def test_a_step_is_reached_once_the_count_is_reached_or_passed() -> None:
    overshoot = [(0.0, 2), (10.0, 3), (12.0, 5), (50.0, 4)]
    assert first_reaching(overshoot, 5, 4) == 50.0
    assert first_reaching_or_past(overshoot, 5, 2, 4) == 12.0
    down = [(0.0, 4), (30.0, 1)]
    assert first_reaching_or_past(down, 5, 4, 2) == 30.0
    assert first_reaching_or_past(down, 5, 4, 0) is None
