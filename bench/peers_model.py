"""The pure parts of ``bench/peers.py``: the load profile, and what is computed from the
recorded curves (reaction, Prometheus floor, flaps, GPU-seconds). No I/O, no clock: the
unit tests in ``tests/unit/test_bench_peers_model.py`` drive them with tables."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from stats import percentile

#: Both systems are asked for the same thing: 50 % GPU utilisation per replica (one GPU per
#: replica) and half a request in flight per replica, which is the same demand in the
#: simulator's units (load 100 = one GPU fully busy = one request in flight).
TARGET_PERCENT = 50.0
IN_FLIGHT_PER_REPLICA = 0.5
TOLERANCE = 0.1  # both the HPA's default and gpuyard's
MAX_REPLICAS = 6


def replicas_for(load: float) -> int:
    """The count the load asks for once every window has passed: ``ceil(load / 50)``."""
    return 0 if load <= 0 else math.ceil(round(load / TARGET_PERCENT, 9))


@dataclass(frozen=True)
class Segment:
    """One part of the profile. ``load`` is held from the segment's start; a noisy segment
    moves it by up to ``noise`` every ``noise_period`` seconds, from a seeded generator, so
    every system sees the same sequence. A segment that is a *step* (its count differs from
    the one before) lasts until every system has reached its count and ``settle`` more
    seconds have passed, but at least ``seconds`` and at most ``timeout``."""

    name: str
    load: float
    seconds: float
    noise: float = 0.0
    noise_period: float = 5.0
    settle: float = 3.0
    timeout: float = 600.0

    @property
    def count(self) -> int:
        return replicas_for(self.load)

    def loads(self, seed: int) -> list[tuple[float, float]]:
        """``(offset, load)`` changes within the segment, the first at offset 0."""
        if not self.noise:
            return [(0.0, self.load)]
        rng = random.Random(f"{seed}-{self.name}")
        changes, offset = [], 0.0
        while offset < self.seconds:
            changes.append((offset, self.load + rng.uniform(-self.noise, self.noise)))
            offset += self.noise_period
        return changes


def profile(quick: bool = False) -> list[Segment]:
    """Steps up and down, a noisy plateau, a quiet period to zero, a wake.

    The holds after a step down and before zero are as long as the peers' default
    scale-down window (300 s for both the HPA and gpuyard) and KEDA's ``cooldownPeriod``
    (300 s) make them: a step ends as soon as every system has reached its count. The
    noisy plateau moves the load by up to ±15 % every 5 s around 4 replicas' worth: within
    the 10 % tolerance most of the time, across it now and then."""
    if quick:
        return [
            Segment("start", 50, 5),
            Segment("up 1 to 2", 100, 5, timeout=120),
            Segment("noisy plateau at 2", 100, 20, noise=15),
        ]
    return [
        Segment("start", 50, 5),
        Segment("up 1 to 2", 100, 5, timeout=180),
        Segment("up 2 to 4", 200, 5, timeout=180),
        Segment("noisy plateau at 4", 200, 90, noise=30),
        Segment("down 4 to 2", 100, 5, timeout=480),
        Segment("quiet to zero", 0, 5, timeout=600),
        Segment("wake to 2", 100, 5, timeout=180),
    ]


def is_step(segments: Sequence[Segment], index: int) -> bool:
    """A segment whose count differs from the previous one's: a step to measure."""
    return index > 0 and segments[index].count != segments[index - 1].count


# --- curves ----------------------------------------------------------------------------------

#: ``(time, replicas)``, sorted by time: one entry per observed change.
Curve = Sequence[tuple[float, int]]


def value_at(curve: Curve, at: float) -> int:
    """The curve's value at ``at`` (the last change at or before it), 0 before the first."""
    value = 0
    for t, v in curve:
        if t > at:
            break
        value = v
    return value


def first_reaching(curve: Curve, since: float, count: int) -> float | None:
    """The first time at or after ``since`` the curve equals ``count``."""
    if value_at(curve, since) == count:
        return since
    for t, v in curve:
        if t > since and v == count:
            return t
    return None


def first_reaching_or_past(curve: Curve, since: float, before: int, after: int) -> float | None:
    """The first time at or after ``since`` the curve has moved from ``before`` as far as
    ``after`` or beyond (an autoscaler that overshoots has reacted too; the overshoot shows
    in the flaps and the GPU-seconds)."""

    def there(value: int) -> bool:
        return value >= after if after > before else value <= after

    if there(value_at(curve, since)):
        return since
    return next((t for t, v in curve if t > since and there(v)), None)


def first_above_zero(curve: Curve, since: float) -> float | None:
    """The first time at or after ``since`` the curve is above zero."""
    if value_at(curve, since) > 0:
        return since
    for t, v in curve:
        if t > since and v > 0:
            return t
    return None


def changes_between(curve: Curve, start: float, end: float) -> int:
    """How many times the value changed within ``(start, end]``: each is a replica change."""
    changes, previous = 0, value_at(curve, start)
    for t, v in curve:
        if start < t <= end and v != previous:
            changes += 1
            previous = v
    return changes


def integral(curve: Curve, start: float, end: float) -> float:
    """The area under the step curve from ``start`` to ``end`` (replica-seconds)."""
    area, at, value = 0.0, start, value_at(curve, start)
    for t, v in curve:
        if t <= start:
            continue
        if t >= end:
            break
        area += value * (t - at)
        at, value = t, v
    return area + value * (end - at)


# --- the Prometheus floor ----------------------------------------------------------------------


def proposal(utilisation: Sequence[float], in_flight: float, current: int) -> int:
    """What the HPA's rule and gpuyard's both propose from these readings, before any
    window, rate limit or idle timer: the larger of the GPU metric's ``ceil(mean / target
    x pods)`` and the request metric's ``ceil(total / per replica)``, each kept at the
    current count when within the tolerance. At zero, only the request metric wakes."""
    if current == 0:
        return (
            max(1, math.ceil(round(in_flight / IN_FLIGHT_PER_REPLICA, 9))) if in_flight > 0 else 0
        )
    asks = []
    if utilisation:
        ratio = sum(utilisation) / len(utilisation) / TARGET_PERCENT
        within = abs(ratio - 1) <= TOLERANCE + 1e-9
        asks.append(current if within else math.ceil(round(ratio * len(utilisation), 9)))
    ratio = in_flight / (IN_FLIGHT_PER_REPLICA * current)
    within = abs(ratio - 1) <= TOLERANCE + 1e-9
    asks.append(current if within else math.ceil(round(in_flight / IN_FLIGHT_PER_REPLICA, 9)))
    return max(asks)


def idle(utilisation: Sequence[float], in_flight: float) -> bool:
    """What both systems call no demand: every GPU below 1 % and no request in flight."""
    return in_flight <= 0 and all(u < 1 for u in utilisation)


@dataclass(frozen=True)
class Reading:
    """One poll of Prometheus for one service: the GPU utilisation of the pods that ran
    when the step began (each over the metrics window), and the requests in flight."""

    at: float
    utilisation: tuple[float, ...]
    in_flight: float


def floor(readings: Sequence[Reading], since: float, before: int, after: int) -> float | None:
    """The first reading at or after ``since`` from which the new count can be known: the
    proposal from ``before`` replicas is ``after``, or, for a step to zero, the series show
    no demand (the idle timer that follows is each system's own delay)."""
    for reading in readings:
        if reading.at < since:
            continue
        if after == 0:
            if idle(reading.utilisation, reading.in_flight):
                return reading.at
        elif proposal(reading.utilisation, reading.in_flight, before) == after:
            return reading.at
    return None


# --- summaries -----------------------------------------------------------------------------------


def p50_p95(values: Sequence[float]) -> tuple[float, float]:
    ordered = sorted(values)
    return percentile(ordered, 50), percentile(ordered, 95)


def ratio(numerator: float, denominator: float) -> float:
    """``numerator / denominator``; infinite when only the denominator is zero."""
    if denominator == 0:
        return math.nan if numerator == 0 else math.inf
    return numerator / denominator
