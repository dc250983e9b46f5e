"""Leader election on a ``coordination.k8s.io/v1`` Lease, as pure rules.

The same rules as client-go's ``leaderelection`` package, which every controller-runtime
operator (and KEDA, and cert-manager) runs:

- A Lease is free when it names no holder, and expired when it has not changed for its
  ``leaseDurationSeconds`` *as measured by the candidate's own clock since it first saw
  that version*. The times written in the Lease are for people: comparing them with the
  local clock would trust two machines' clocks to agree.
- The leader renews every retry period. It keeps leading only while its last successful
  renewal is younger than the renew deadline, which is shorter than the Lease duration:
  a leader cut off from the API server stops writing (the fence closes) before any
  candidate may take the Lease, so two leaders never write at once.

Times here are ``time.monotonic()`` seconds for deadlines and aware datetimes for what is
written into the Lease; both are arguments, so every rule is a table-driven test.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
from enum import StrEnum


@dataclass(frozen=True, slots=True, kw_only=True)
class LeaseTimings:
    """The three settings of an election (client-go's names and defaults: 15 s, 10 s, 2 s)."""

    duration_seconds: int = 15
    renew_deadline_seconds: float = 10.0
    retry_period_seconds: float = 2.0

    def __post_init__(self) -> None:
        if self.duration_seconds < 1:
            raise ValueError("the Lease duration must be at least 1 s")
        if not self.duration_seconds > self.renew_deadline_seconds:
            # The gap is the fence's margin: a leader stops writing this long before a
            # candidate may take over.
            raise ValueError(
                f"the renew deadline ({self.renew_deadline_seconds} s) must be shorter "
                f"than the Lease duration ({self.duration_seconds} s)"
            )
        if not self.renew_deadline_seconds > self.retry_period_seconds > 0:
            raise ValueError(
                f"the retry period ({self.retry_period_seconds} s) must be positive and "
                f"shorter than the renew deadline ({self.renew_deadline_seconds} s)"
            )


@dataclass(frozen=True, slots=True, kw_only=True)
class LeaseRecord:
    """The spec of a Lease: who holds it, since when, and for how long at a time."""

    holder: str | None
    duration_seconds: int
    acquire_time: datetime | None = None
    renew_time: datetime | None = None
    transitions: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Observation:
    """A version of the Lease, and when this candidate first saw it (monotonic seconds)."""

    record: LeaseRecord
    resource_version: str
    seen_at: float


def observe(
    previous: Observation | None, record: LeaseRecord, resource_version: str, now: float
) -> Observation:
    """The observation after reading ``record``: a version already seen keeps the time it
    was first seen, so a Lease that stops changing expires on this candidate's clock."""
    if previous is not None and previous.resource_version == resource_version:
        return previous
    return Observation(record=record, resource_version=resource_version, seen_at=now)


class Verdict(StrEnum):
    """What a candidate may do with the Lease it observed."""

    #: Nobody holds it, or its holder let it expire: take it.
    FREE = "Free"
    #: This candidate holds it already (it renews, or it restarted with the same identity).
    MINE = "Mine"
    #: Someone else holds it and renews it: stand by.
    HELD = "Held"


def verdict(observation: Observation, identity: str, now: float) -> Verdict:
    record = observation.record
    if record.holder == identity:
        return Verdict.MINE
    if not record.holder:
        return Verdict.FREE
    if now >= observation.seen_at + record.duration_seconds:
        return Verdict.FREE
    return Verdict.HELD


def seconds_until_expiry(observation: Observation, now: float) -> float:
    """How long a candidate must still wait before the observed holder's Lease expires."""
    return max(0.0, observation.seen_at + observation.record.duration_seconds - now)


def acquired(
    record: LeaseRecord | None, identity: str, timings: LeaseTimings, now: datetime
) -> LeaseRecord:
    """The Lease as this candidate writes it to take it over (or to create it)."""
    if record is None:
        return LeaseRecord(
            holder=identity,
            duration_seconds=timings.duration_seconds,
            acquire_time=now,
            renew_time=now,
            transitions=0,
        )
    if record.holder == identity:
        return renewed(record, timings, now)
    return LeaseRecord(
        holder=identity,
        duration_seconds=timings.duration_seconds,
        acquire_time=now,
        renew_time=now,
        transitions=record.transitions + 1,
    )


def renewed(record: LeaseRecord, timings: LeaseTimings, now: datetime) -> LeaseRecord:
    return replace(record, duration_seconds=timings.duration_seconds, renew_time=now)


def released(record: LeaseRecord, now: datetime) -> LeaseRecord:
    """The Lease as a leader leaves it on a clean shutdown: held by nobody, and, for a
    candidate of an older version that reads only the duration, expiring in a second."""
    return replace(record, holder=None, duration_seconds=1, acquire_time=now, renew_time=now)


class Fence:
    """Whether this process may write: only while it leads and its last renewal is younger
    than the renew deadline.

    The deadline runs from when the renewal was *sent*: the API server may have applied it
    at any moment after, so counting from the answer could outlast the Lease as other
    candidates see it.
    """

    def __init__(self) -> None:
        self._open_until: float | None = None

    def extend(self, renewal_sent_at: float, timings: LeaseTimings) -> None:
        self._open_until = renewal_sent_at + timings.renew_deadline_seconds

    def close(self) -> None:
        self._open_until = None

    def is_open(self, now: float) -> bool:
        return self._open_until is not None and now < self._open_until

    def closes_in(self, now: float) -> float:
        """Seconds until the fence closes unless renewed (0 when closed)."""
        return 0.0 if self._open_until is None else max(0.0, self._open_until - now)
