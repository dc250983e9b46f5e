"""The election's rules: when a Lease may be taken, and when a leader must stop writing."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from gpuyard.logic.leadership import (
    Fence,
    LeaseRecord,
    LeaseTimings,
    Verdict,
    acquired,
    observe,
    released,
    renewed,
    seconds_until_expiry,
    verdict,
)

TIMINGS = LeaseTimings()
T0 = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)


def held_by(holder: str | None, duration: int = 15, transitions: int = 0) -> LeaseRecord:
    return LeaseRecord(
        holder=holder,
        duration_seconds=duration,
        acquire_time=T0,
        renew_time=T0,
        transitions=transitions,
    )


def test_the_defaults_are_client_go_s() -> None:
    assert (TIMINGS.duration_seconds, TIMINGS.renew_deadline_seconds) == (15, 10.0)
    assert TIMINGS.retry_period_seconds == 2.0


@pytest.mark.parametrize(
    ("duration", "deadline", "retry", "message"),
    [
        (10, 10.0, 2.0, "renew deadline"),
        (10, 12.0, 2.0, "renew deadline"),
        (15, 10.0, 10.0, "retry period"),
        (15, 10.0, 0.0, "retry period"),
        (0, 0.5, 0.1, "at least 1 s"),
    ],
)
def test_timings_that_would_let_two_leaders_write_are_refused(
    duration: int, deadline: float, retry: float, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        LeaseTimings(
            duration_seconds=duration, renew_deadline_seconds=deadline, retry_period_seconds=retry
        )


@pytest.mark.parametrize(
    ("holder", "seconds_since_seen", "expected"),
    [
        (None, 0, Verdict.FREE),
        ("me", 0, Verdict.MINE),
        ("me", 100, Verdict.MINE),
        ("other", 0, Verdict.HELD),
        ("other", 14.9, Verdict.HELD),
        ("other", 15, Verdict.FREE),
        ("other", 60, Verdict.FREE),
    ],
)
def test_a_lease_is_taken_when_free_or_unchanged_for_its_duration(
    holder: str | None, seconds_since_seen: float, expected: Verdict
) -> None:
    observation = observe(None, held_by(holder), "7", now=100.0)
    assert verdict(observation, "me", now=100.0 + seconds_since_seen) is expected


def test_expiry_runs_on_the_candidates_clock_not_on_the_times_in_the_lease() -> None:
    # The holder's clock is an hour behind: its renewTime looks ancient, yet it renews.
    stale_clock = LeaseRecord(
        holder="other", duration_seconds=15, renew_time=T0 - timedelta(hours=1)
    )
    observation = observe(None, stale_clock, "7", now=100.0)
    assert verdict(observation, "me", now=101.0) is Verdict.HELD


def test_a_version_seen_again_keeps_the_time_it_was_first_seen() -> None:
    first = observe(None, held_by("other"), "7", now=100.0)
    again = observe(first, held_by("other"), "7", now=110.0)
    assert again.seen_at == 100.0
    assert seconds_until_expiry(again, now=110.0) == 5.0
    assert verdict(again, "me", now=115.0) is Verdict.FREE


def test_a_renewal_restarts_the_candidates_wait() -> None:
    first = observe(None, held_by("other"), "7", now=100.0)
    renewal = observe(first, renewed(held_by("other"), TIMINGS, T0), "8", now=112.0)
    assert renewal.seen_at == 112.0
    assert verdict(renewal, "me", now=120.0) is Verdict.HELD


def test_taking_over_counts_a_transition_and_renewing_does_not() -> None:
    now = T0 + timedelta(minutes=1)
    taken = acquired(held_by("other", transitions=3), "me", TIMINGS, now)
    assert (taken.holder, taken.transitions, taken.acquire_time) == ("me", 4, now)
    again = acquired(taken, "me", TIMINGS, now + timedelta(seconds=2))
    assert (again.transitions, again.acquire_time) == (4, now)
    assert again.renew_time == now + timedelta(seconds=2)
    created = acquired(None, "me", TIMINGS, now)
    assert (created.holder, created.transitions, created.duration_seconds) == ("me", 0, 15)


def test_a_released_lease_is_free_at_once() -> None:
    lease = released(held_by("me", transitions=2), T0)
    assert lease.holder is None
    assert lease.transitions == 2
    assert verdict(observe(None, lease, "9", now=0.0), "other", now=0.0) is Verdict.FREE


def test_the_fence_closes_at_the_renew_deadline_counted_from_when_the_renewal_was_sent() -> None:
    fence = Fence()
    assert not fence.is_open(0.0)
    fence.extend(renewal_sent_at=100.0, timings=TIMINGS)
    assert fence.is_open(100.0)
    assert fence.is_open(109.99)
    assert not fence.is_open(110.0)
    assert fence.closes_in(104.0) == 6.0
    fence.close()
    assert not fence.is_open(101.0)
    assert fence.closes_in(101.0) == 0.0


def test_the_fence_closes_before_any_candidate_may_take_the_lease() -> None:
    # The leader's renewal is sent at 100 and reaches a candidate at once, the earliest
    # any candidate can see it: the leader still stops writing first.
    fence = Fence()
    fence.extend(renewal_sent_at=100.0, timings=TIMINGS)
    candidate_view = observe(None, held_by("leader"), "8", now=100.0)
    first_free = 100.0 + seconds_until_expiry(candidate_view, now=100.0)
    assert not fence.is_open(first_free)
    assert first_free - 100.0 - TIMINGS.renew_deadline_seconds == 5.0
