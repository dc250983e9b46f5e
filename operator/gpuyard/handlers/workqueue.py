"""A de-duplicating work queue with retries, as controller-runtime's, on asyncio.

Kopf tells us *that* something changed (watch events on AIServices, Deployments, pools,
nodes, pods); what to do is always the same: reconcile the whole object. So every event
only enqueues a key, bursts collapse into one reconcile per key, one key is never
reconciled twice at once, and a failure is retried with exponential backoff instead of
being lost. One bad object delays only itself.

Keys added as ``urgent`` (a service whose Deployment does not exist yet) go before the
others: creating what is missing is what users wait for, while most other work only
brings a status up to date.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)

logger = logging.getLogger(__name__)


class WorkQueue(Generic[K]):
    """Keys waiting for a reconcile; ``run`` drains them with a fixed number of workers."""

    def __init__(
        self,
        name: str,
        reconcile: Callable[[K], Awaitable[None]],
        *,
        base_delay: float = 0.5,
        max_delay: float = 60.0,
    ) -> None:
        self.name = name
        self._reconcile = reconcile
        self._base_delay = base_delay
        self._max_delay = max_delay
        # Two lanes, urgent first. A key promoted to the urgent lane keeps its entry in the
        # other one; whichever entry comes second finds the key no longer queued and is
        # dropped. ``_entries`` counts the entries of both lanes.
        self._urgent: deque[K] = deque()
        self._normal: deque[K] = deque()
        self._entries = asyncio.Semaphore(0)
        self._queued: set[K] = set()
        self._queued_urgent: set[K] = set()
        self._active: set[K] = set()
        self._again: set[K] = set()  # changed while being reconciled: go round once more
        self._failures: dict[K, int] = {}
        self._retry_handles: dict[K, asyncio.TimerHandle] = {}
        self.reconciles = 0
        self.errors = 0
        self.on_result: Callable[[str, float, bool], None] | None = None

    def add(self, key: K, *, urgent: bool = False) -> None:
        """Ask for a reconcile of ``key`` soon (``urgent``: before every key that is not); a
        no-op when one is already queued, in a lane at least as urgent."""
        if key in self._active:
            self._again.add(key)
        elif key not in self._queued:
            self._queued.add(key)
            self._put(key, urgent=urgent)
        elif urgent and key not in self._queued_urgent:
            self._put(key, urgent=True)

    def _put(self, key: K, *, urgent: bool) -> None:
        if urgent:
            self._queued_urgent.add(key)
            self._urgent.append(key)
        else:
            self._normal.append(key)
        self._entries.release()

    async def _next(self) -> K:
        """The next queued key, urgent ones first."""
        while True:
            await self._entries.acquire()
            key = self._urgent.popleft() if self._urgent else self._normal.popleft()
            if key in self._queued:
                self._queued.discard(key)
                self._queued_urgent.discard(key)
                return key

    def add_after(self, key: K, delay: float) -> None:
        loop = asyncio.get_running_loop()
        previous = self._retry_handles.pop(key, None)
        if previous is not None:
            previous.cancel()
        self._retry_handles[key] = loop.call_later(delay, self._retry, key)

    def _retry(self, key: K) -> None:
        self._retry_handles.pop(key, None)
        self.add(key)

    def __len__(self) -> int:
        return len(self._queued)

    def is_idle(self) -> bool:
        return not self._queued and not self._active and not self._again

    async def run(self, workers: int) -> None:
        await asyncio.gather(*(self._worker() for _ in range(workers)))

    async def _worker(self) -> None:
        while True:
            key = await self._next()
            self._active.add(key)
            started = time.monotonic()
            ok = True
            try:
                await self._reconcile(key)
            except asyncio.CancelledError:
                raise
            except Exception:  # one bad object must never stop the others
                ok = False
                self.errors += 1
                failures = self._failures.get(key, 0) + 1
                self._failures[key] = failures
                delay = min(self._max_delay, self._base_delay * 2 ** (failures - 1))
                logger.exception(
                    "%s %s failed (%d in a row); retrying in %.1fs", self.name, key, failures, delay
                )
                self.add_after(key, delay)
            else:
                self._failures.pop(key, None)
            finally:
                self.reconciles += 1
                self._active.discard(key)
                if self.on_result is not None:
                    self.on_result(self.name, time.monotonic() - started, ok)
                if key in self._again:
                    self._again.discard(key)
                    self.add(key)
