"""Observed time to ready (logic.startup) and the pod facts it is read from."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from gpuyard.logic.pool_accounting import PodInfo, pod_info_from_dict
from gpuyard.logic.startup import RECENT_STARTS, observe_starts, startup_status

T0 = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def ready_pod(name: str, bound: float, ready: float) -> PodInfo:
    return PodInfo(
        name=name, namespace="team", node_name="gpu-1", phase="Running", service="llm",
        ready=True, bound_at=at(bound), ready_at=at(ready),
    )  # fmt: skip


def pod_json(**status: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "llm-a", "namespace": "team", "labels": {"gpuyard.io/service": "llm"}},
        "spec": {"nodeName": "gpu-1", "containers": []},
        "status": status,
    }


def test_pod_facts_of_a_starting_and_of_a_ready_pod() -> None:
    scheduled = {
        "type": "PodScheduled",
        "status": "True",
        "lastTransitionTime": "2026-01-05T09:00:00Z",
    }
    starting = pod_info_from_dict(pod_json(
        phase="Running",
        conditions=[scheduled, {"type": "Ready", "status": "False",
                                "lastTransitionTime": "2026-01-05T09:00:01Z"}],
    ))  # fmt: skip
    assert starting.starting
    assert not starting.ready
    assert starting.seconds_to_ready is None
    ready = pod_info_from_dict(pod_json(
        phase="Running",
        conditions=[scheduled, {"type": "Ready", "status": "True",
                                "lastTransitionTime": "2026-01-05T09:01:00Z"}],
    ))  # fmt: skip
    assert ready.ready
    assert not ready.starting
    assert ready.seconds_to_ready == 60


def test_only_a_bound_pod_that_is_not_going_is_starting() -> None:
    assert not PodInfo(name="a", namespace="t", node_name=None).starting  # no node: no GPUs
    assert not PodInfo(name="a", namespace="t", node_name="n", terminating=True).starting
    assert not PodInfo(name="a", namespace="t", node_name="n", phase="Failed").starting
    assert PodInfo(name="a", namespace="t", node_name="n", phase="Pending").starting


def test_status_shows_the_last_start_and_the_median() -> None:
    recent = observe_starts((), [ready_pod("a", 0, 60), ready_pod("b", 0, 61.4)])
    recent = observe_starts(recent, [ready_pod("c", 100, 190)])
    status = startup_status(recent)
    assert status is not None
    assert (status.last_seconds, status.median_seconds, status.samples) == (90, 61, 3)
    assert status.to_json() == {"lastSeconds": 90, "medianSeconds": 61, "samples": 3}


def test_a_pod_counts_once_and_nothing_new_changes_nothing() -> None:
    recent = observe_starts((), [ready_pod("a", 0, 60)])
    assert observe_starts(recent, [ready_pod("a", 0, 60)]) is recent
    # A readiness flap is no new start.
    assert observe_starts(recent, [ready_pod("a", 0, 500)]) is recent


def test_the_median_covers_the_latest_starts() -> None:
    recent: tuple = ()
    for i in range(RECENT_STARTS + 5):
        recent = observe_starts(recent, [ready_pod(f"p{i}", i * 100, i * 100 + 10 + i)])
    assert len(recent) == RECENT_STARTS
    assert [s.pod for s in recent] == [f"p{i}" for i in range(5, RECENT_STARTS + 5)]
    assert startup_status(()) is None


def test_a_pod_failing_to_start_is_not_starting() -> None:
    # It must not hold a scale-down (or a scale to zero) forever: a bad image, a crash loop.
    def pod(container: dict[str, Any]) -> PodInfo:
        return pod_info_from_dict(pod_json(phase="Pending", containerStatuses=[container]))

    creating = {"name": "main", "restartCount": 0,
                "state": {"waiting": {"reason": "ContainerCreating"}}}  # fmt: skip
    assert pod(creating).starting
    pull = {"name": "main", "restartCount": 0, "state": {"waiting": {"reason": "ImagePullBackOff"}}}
    assert not pod(pull).starting
    restarted = {"name": "main", "restartCount": 2, "state": {"running": {}}}
    assert not pod(restarted).starting
