"""Cold starts: how long a service's replicas take from binding to Ready.

Pure: the caller passes the service's pods (as ``PodInfo``) and the starts it kept from
before; :func:`observe_starts` adds the pods that turned Ready since, and
:func:`startup_status` is what ``status.startup`` shows. A pod counts once, with its first
start seen: a later readiness flap is no new start.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from gpuyard.api.service import StartupStatus
from gpuyard.logic.pool_accounting import PodInfo

__all__ = ["RECENT_STARTS", "Start", "observe_starts", "startup_status"]

#: How many of the latest starts the median covers: enough to shrug off one slow node,
#: few enough to follow a new image whose model loads faster or slower.
RECENT_STARTS = 10


@dataclass(frozen=True, slots=True)
class Start:
    pod: str
    ready_at: datetime
    seconds: int


def observe_starts(recent: tuple[Start, ...], pods: Iterable[PodInfo]) -> tuple[Start, ...]:
    """``recent`` with the starts of ``pods`` it lacks, the latest :data:`RECENT_STARTS`
    by ready time (oldest first); ``recent`` itself when nothing is new."""
    known = {start.pod for start in recent}
    new = []
    for pod in pods:
        seconds = pod.seconds_to_ready
        if seconds is None or pod.ready_at is None or pod.name in known:
            continue
        known.add(pod.name)
        new.append(Start(pod=pod.name, ready_at=pod.ready_at, seconds=round(seconds)))
    if not new:
        return recent
    merged = sorted((*recent, *new), key=lambda start: (start.ready_at, start.pod))
    return tuple(merged[-RECENT_STARTS:])


def startup_status(recent: tuple[Start, ...]) -> StartupStatus | None:
    """What status shows of ``recent`` (None: no start seen yet)."""
    if not recent:
        return None
    return StartupStatus(
        last_seconds=recent[-1].seconds,
        median_seconds=statistics.median_low(start.seconds for start in recent),
        samples=len(recent),
    )
