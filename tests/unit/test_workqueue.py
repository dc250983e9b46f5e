"""The work queue: one reconcile per burst of a key, urgent keys first."""

from __future__ import annotations

import asyncio

from gpuyard.handlers.workqueue import WorkQueue


def _drain(adds: list[tuple[str, bool]]) -> list[str]:
    """The order one worker reconciles the keys added (key, urgent) before it starts."""

    async def run() -> list[str]:
        done: list[str] = []

        async def reconcile(key: str) -> None:
            done.append(key)

        queue: WorkQueue[str] = WorkQueue("test", reconcile)
        for key, urgent in adds:
            queue.add(key, urgent=urgent)
        worker = asyncio.create_task(queue.run(1))
        async with asyncio.timeout(5):
            while not queue.is_idle():
                await asyncio.sleep(0)
        worker.cancel()
        return done

    return asyncio.run(run())


def test_keys_are_reconciled_once_in_the_order_added() -> None:
    assert _drain([("a", False), ("b", False), ("a", False), ("c", False)]) == ["a", "b", "c"]


def test_urgent_keys_go_first() -> None:
    adds = [("status-1", False), ("new-1", True), ("status-2", False), ("new-2", True)]
    assert _drain(adds) == ["new-1", "new-2", "status-1", "status-2"]


def test_a_queued_key_made_urgent_moves_up_and_runs_once() -> None:
    adds = [("a", False), ("b", False), ("b", True), ("b", False), ("b", True)]
    assert _drain(adds) == ["b", "a"]


def test_an_urgent_key_added_again_without_urgency_stays_urgent() -> None:
    assert _drain([("a", False), ("b", True), ("b", False)]) == ["b", "a"]
