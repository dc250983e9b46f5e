"""Leader election around Kopf: every replica watches, only the Lease holder writes.

Kopf has no Lease support, and its own peering pauses every operator of equal priority
when two run; gpuyard runs Kopf standalone in every replica and takes the Lease around it
(docs/high-availability.md says why). A standby's Kopf keeps its watches and indices, so
a new leader's caches are warm the moment it leads; its work queues collect keys but run
nothing, and its autoscaler and meter do not run.

``Elector.run`` campaigns until it holds the Lease, calls ``on_lead``, renews every retry
period, and returns once leadership is lost: when the fence closed (no renewal for the
renew deadline) or someone else took the Lease. The fence is what every write asks
(``Kube.may_write``), so a leader that is cut off stops writing on its own clock, before
any candidate's clock lets it take over.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime

from gpuyard.io.lease import LeaseClient, LeaseConflictError
from gpuyard.io.metrics import OperatorMetrics
from gpuyard.logic.leadership import (
    Fence,
    LeaseRecord,
    LeaseTimings,
    Observation,
    Verdict,
    acquired,
    observe,
    released,
    renewed,
    seconds_until_expiry,
    verdict,
)

logger = logging.getLogger("gpuyard.leadership")

#: Tries to release the Lease on shutdown, each after reading it again on a conflict.
RELEASE_ATTEMPTS = 3


class Elector:
    """One replica's part in the election."""

    def __init__(
        self,
        lease: LeaseClient,
        identity: str,
        timings: LeaseTimings,
        metrics: OperatorMetrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.lease = lease
        self.identity = identity
        self.timings = timings
        self.metrics = metrics
        self.clock = clock
        self.fence = Fence()
        #: The holder as last read (None: nobody, or not read yet).
        self.holder: str | None = None
        self._record: LeaseRecord | None = None
        self._version = ""
        #: Whether the Lease is (as far as this replica knows) written in its name: set on
        #: taking it, cleared on losing it. The fence may close earlier (a shutdown).
        self._holds = False

    @property
    def leading(self) -> bool:
        return self.fence.is_open(self.clock())

    def may_write(self) -> bool:
        return self.fence.is_open(self.clock())

    async def run(self, on_lead: Callable[[], None]) -> None:
        """Campaign, lead, renew; return when leadership is lost."""
        await self._acquire()
        self._holds = True
        self.holder = self.identity
        self.metrics.leader.set(1)
        self.metrics.leader_transitions.labels(to="leader").inc()
        logger.info(
            "leading: %s holds Lease %s/%s (transition %d)",
            self.identity, self.lease.namespace, self.lease.name,
            self._record.transitions if self._record else 0,
        )  # fmt: skip
        on_lead()
        await self._renew_until_lost()
        self._holds = False
        self.fence.close()
        self.metrics.leader.set(0)
        self.metrics.leader_transitions.labels(to="standby").inc()

    async def release(self) -> None:
        """Give the Lease up (a clean shutdown): the fence closes first, so nothing is
        written after the standby may have taken over."""
        self.fence.close()
        self.metrics.leader.set(0)
        if not self._holds or self._record is None:
            return
        self._holds = False
        # A renewal sent just before the shutdown may land after it was cancelled (its
        # thread runs on), leaving the version read here behind: a conflict then means
        # "read again", and the Lease is released if it still names this replica.
        for _ in range(RELEASE_ATTEMPTS):
            try:
                await asyncio.to_thread(
                    self.lease.update,
                    released(self._record, datetime.now(UTC)),
                    self._version,
                    self.timings.retry_period_seconds,
                )
            except LeaseConflictError:
                try:
                    if await self._still_mine():
                        continue
                except Exception as error:  # noqa: BLE001 - the Lease then expires on its own
                    logger.warning("could not release Lease %s: %r", self.lease.name, error)
                return  # another replica holds it already: nothing to give up
            except Exception as error:  # noqa: BLE001 - the Lease then expires on its own
                logger.warning("could not release Lease %s: %r", self.lease.name, error)
                return
            logger.info("released Lease %s/%s", self.lease.namespace, self.lease.name)
            return
        logger.warning("could not release Lease %s: it kept changing", self.lease.name)

    async def _acquire(self) -> None:
        observation: Observation | None = None
        announced: str | None = None
        retry = self.timings.retry_period_seconds
        while True:
            try:
                found = await asyncio.to_thread(self.lease.get, retry)
                if found is None:
                    if await self._write(acquired(None, self.identity, self.timings, _now()), None):
                        return
                    continue
                record, version = found
                observation = observe(observation, record, version, self.clock())
                self.holder = record.holder
                if verdict(observation, self.identity, self.clock()) is not Verdict.HELD:
                    taken = acquired(record, self.identity, self.timings, _now())
                    if await self._write(taken, version):
                        return
                    continue
                if record.holder != announced:
                    logger.info("standing by: Lease %s is held by %s", self.lease.name,
                                record.holder)  # fmt: skip
                    announced = record.holder
                await self._wait(observation)
            except LeaseConflictError:
                continue  # another candidate wrote first: read again
            except Exception as error:  # noqa: BLE001 - the API server may be away for minutes
                logger.warning("could not read Lease %s: %r", self.lease.name, error)
                await asyncio.sleep(retry)

    async def _wait(self, observation: Observation) -> None:
        """Until the Lease changes, its holder's time is up, or a retry period passed."""
        remaining = seconds_until_expiry(observation, self.clock())
        if remaining < 1:
            await asyncio.sleep(remaining)
            return
        # Watches time out in whole seconds; a short one keeps a standby's shutdown short.
        timeout = min(remaining, max(1.0, self.timings.retry_period_seconds))
        await asyncio.to_thread(self.lease.wait_for_change, observation.resource_version, timeout)

    async def _write(self, record: LeaseRecord, version: str | None) -> bool:
        """Write the Lease to take or renew it; whether it was written. The fence opens
        from the moment the request was sent."""
        sent = self.clock()
        timeout = max(0.5, self.fence.closes_in(sent) or self.timings.renew_deadline_seconds)
        if version is None:
            self._version = await asyncio.to_thread(self.lease.create, record, timeout)
        else:
            self._version = await asyncio.to_thread(self.lease.update, record, version, timeout)
        self._record = record
        self.fence.extend(sent, self.timings)
        return True

    async def _renew_until_lost(self) -> None:
        retry = self.timings.retry_period_seconds
        last_attempt = self.clock()
        while True:
            await asyncio.sleep(max(0.0, last_attempt + retry - self.clock()))
            last_attempt = self.clock()
            if not self.fence.is_open(last_attempt):
                logger.error(
                    "lost leadership: Lease %s not renewed for %.1f s; no more writes",
                    self.lease.name, self.timings.renew_deadline_seconds,
                )  # fmt: skip
                return
            assert self._record is not None
            try:
                await self._write(renewed(self._record, self.timings, _now()), self._version)
            except LeaseConflictError:
                if not await self._still_mine():
                    logger.error("lost leadership: Lease %s is now held by %s",
                                 self.lease.name, self.holder)  # fmt: skip
                    return
            except Exception as error:  # noqa: BLE001 - retried until the fence closes
                logger.warning(
                    "could not renew Lease %s (writes stop in %.1f s): %r",
                    self.lease.name, self.fence.closes_in(self.clock()), error,
                )  # fmt: skip

    async def _still_mine(self) -> bool:
        """After a conflict on renewal: a renewal of ours that was applied but whose answer
        was lost leaves the Lease ours at a newer version; anything else means it is not."""
        found = await asyncio.to_thread(self.lease.get, self.timings.retry_period_seconds)
        if found is None:
            self.holder = None
            return False
        record, version = found
        self.holder = record.holder
        if record.holder != self.identity:
            return False
        self._record, self._version = record, version
        return True


def _now() -> datetime:
    return datetime.now(UTC)
