"""Conditions: Kubernetes conventions for merging, and what each condition says."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from gpuyard.logic.admission import AdmissionResult
from gpuyard.logic.conditions import (
    UNDER_WAY,
    ConditionUpdate,
    accepted_condition,
    apply_conditions,
    capacity_condition,
    find_condition,
    kstatus_conditions,
    pods_refused,
    pool_kstatus_conditions,
    pool_ready_condition,
    ready_condition,
    scale_request_condition,
    service_kstatus_conditions,
    set_condition,
)
from gpuyard.logic.pool_accounting import PoolUsage

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
T1 = T0 + timedelta(minutes=5)
ACCEPTED = AdmissionResult(accepted=True, reason="Accepted", message="runs")
REFUSED = AdmissionResult(accepted=False, reason="PoolNotFound", message="no pool")


def ready(
    status: str, reason: str = "ReplicasReady", message: str = "1/1", generation: int = 1
) -> dict[str, Any]:
    return {
        "type": "Ready",
        "status": status,
        "observedGeneration": generation,
        "lastTransitionTime": "2024-05-01T12:00:00Z",
        "reason": reason,
        "message": message,
    }


def test_new_condition_is_appended_with_now() -> None:
    conditions = set_condition(
        [ready("True")],
        "Accepted",
        status="True",
        reason="Accepted",
        message="runs",
        observed_generation=3,
        now=T1,
    )

    assert conditions == [
        ready("True"),
        {
            "type": "Accepted",
            "status": "True",
            "observedGeneration": 3,
            "lastTransitionTime": "2024-05-01T12:05:00Z",
            "reason": "Accepted",
            "message": "runs",
        },
    ]


def test_same_status_keeps_transition_time_but_updates_the_rest() -> None:
    previous = [ready("False", "ReplicasNotReady", "0/1")]

    conditions = set_condition(
        previous,
        "Ready",
        status="False",
        reason="WaitingForGPUs",
        message="0/1; more GPUs",
        observed_generation=2,
        now=T1,
    )

    assert conditions == [
        {**ready("False", "WaitingForGPUs", "0/1; more GPUs", generation=2)},
    ]
    assert previous == [ready("False", "ReplicasNotReady", "0/1")]  # input untouched


def test_status_change_moves_transition_time() -> None:
    [condition] = set_condition(
        [ready("False")],
        "Ready",
        status="True",
        reason="ReplicasReady",
        message="1/1",
        observed_generation=1,
        now=T1,
    )

    assert condition["lastTransitionTime"] == "2024-05-01T12:05:00Z"


def test_unchanged_decision_yields_an_equal_list() -> None:
    first = apply_conditions(
        None,
        [
            ConditionUpdate("Accepted", "True", "Accepted", "runs"),
            ConditionUpdate("Ready", "True", "ReplicasReady", "1/1"),
        ],
        1,
        T0,
    )
    again = apply_conditions(
        first,
        [
            ConditionUpdate("Ready", "True", "ReplicasReady", "1/1"),
            ConditionUpdate("Accepted", "True", "Accepted", "runs"),
        ],
        1,
        T1,
    )

    assert again == first
    assert [c["type"] for c in again] == ["Accepted", "Ready"]


def test_other_conditions_are_kept_in_place() -> None:
    foreign = {
        "type": "MetricsAvailable",
        "status": "True",
        "lastTransitionTime": "2024-01-01T00:00:00Z",
        "reason": "Fresh",
        "message": "",
    }
    conditions = apply_conditions(
        [foreign, ready("True")], [ConditionUpdate("Ready", "False", "RollingOut", "x")], 1, T1
    )

    assert conditions[0] == foreign
    assert conditions[1]["status"] == "False"
    assert find_condition(conditions, "Ready") == conditions[1]
    assert find_condition(conditions, "Missing") is None
    assert find_condition(None, "Ready") is None


def test_no_generation_leaves_observed_generation_out() -> None:
    [condition] = set_condition(
        None, "Ready", status="True", reason="Ok", message="", observed_generation=None, now=T0
    )

    assert "observedGeneration" not in condition


@pytest.mark.parametrize("reason", ["not camel", "Has Space", "", "9Lives"])
def test_malformed_reason_is_refused_before_it_reaches_the_api(reason: str) -> None:
    with pytest.raises(ValidationError):
        set_condition(
            None, "Ready", status="True", reason=reason, message="", observed_generation=1, now=T0
        )


def test_naive_now_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        set_condition(
            None,
            "Ready",
            status="True",
            reason="Ok",
            message="",
            observed_generation=1,
            now=datetime(2024, 5, 1),  # noqa: DTZ001 - the point of the test
        )


@pytest.mark.parametrize(
    ("admission", "expected"),
    [
        (ACCEPTED, ConditionUpdate("Accepted", "True", "Accepted", "runs")),
        (REFUSED, ConditionUpdate("Accepted", "False", "PoolNotFound", "no pool")),
    ],
)
def test_accepted_condition(admission: AdmissionResult, expected: ConditionUpdate) -> None:
    assert accepted_condition(admission) == expected


@pytest.mark.parametrize(
    ("wanted", "placed", "gpus", "available", "fitting", "status", "reason", "message"),
    [
        (
            3,
            3,
            2,
            0,
            None,
            "False",
            "SufficientGPUs",
            'GPUPool "a100" can place every wanted replica',
        ),
        (
            4,
            2,
            2,
            4,
            None,
            "False",
            "SufficientGPUs",
            'GPUPool "a100" can place every wanted replica',
        ),
        (
            2,
            4,
            2,
            0,
            None,
            "False",
            "SufficientGPUs",
            'GPUPool "a100" can place every wanted replica',
        ),
        (
            4,
            1,
            2,
            2,
            None,
            "True",
            "InsufficientGPUs",
            'GPUPool "a100" needs 4 more nvidia.com/gpu: 3 replicas of 2 nvidia.com/gpu wait for '
            "placement and 2 are free",
        ),
        (
            1,
            0,
            4,
            1,
            None,
            "True",
            "InsufficientGPUs",
            'GPUPool "a100" needs 3 more nvidia.com/gpu: 1 replica of 4 nvidia.com/gpu waits for '
            "placement and 1 is free",
        ),
        (
            2,
            0,
            4,
            8,
            1,
            "True",
            "FragmentedGPUs",
            'GPUPool "a100" has 8 nvidia.com/gpu free, but spread over nodes so that only 1 more '
            "replica of 4 fit: 2 replicas of 4 nvidia.com/gpu wait for placement",
        ),
        (2, 0, 4, 8, 2, "False", "SufficientGPUs", 'GPUPool "a100" can place every wanted replica'),
    ],
)
def test_capacity_condition(
    *,
    wanted: int,
    placed: int,
    gpus: int,
    available: int,
    fitting: int | None,
    status: str,
    reason: str,
    message: str,
) -> None:
    condition = capacity_condition(
        wanted_replicas=wanted,
        placed_replicas=placed,
        gpus_per_replica=gpus,
        available_gpus=available,
        pool_name="a100",
        resource_name="nvidia.com/gpu",
        fitting_replicas=fitting,
    )

    assert condition == ConditionUpdate("CapacityLimited", status, reason, message)  # type: ignore[arg-type]


LIMITED = ConditionUpdate("CapacityLimited", "True", "InsufficientGPUs", "needs 2 more GPUs")
NOT_LIMITED = ConditionUpdate("CapacityLimited", "False", "SufficientGPUs", "fine")


@pytest.mark.parametrize(
    ("admission", "desired", "ready_count", "current", "updated", "capacity", "expected"),
    [
        (REFUSED, 2, 2, 2, 2, None, ("False", "PoolNotFound", "no pool")),
        (ACCEPTED, 0, 0, 0, 0, None, ("True", "ScaledToZero", "scaled to zero replicas")),
        (ACCEPTED, 0, 1, 1, 0, None, ("True", "ScaledToZero", "scaled to zero replicas")),
        (ACCEPTED, 3, 3, 3, 3, None, ("True", "ReplicasReady", "3/3 replicas ready")),
        (ACCEPTED, 3, 4, 4, 4, None, ("True", "ReplicasReady", "4/3 replicas ready")),
        (
            ACCEPTED,
            3,
            3,
            3,
            1,
            None,
            ("False", "RollingOut", "1/3 replicas run the current spec, 3/3 replicas ready"),
        ),
        # Scaling up from 1 to 3 is not a rollout: every existing pod is up to date.
        (ACCEPTED, 3, 1, 1, 1, None, ("False", "ReplicasNotReady", "1/3 replicas ready")),
        (ACCEPTED, 3, 1, 3, 3, NOT_LIMITED, ("False", "ReplicasNotReady", "1/3 replicas ready")),
        (
            ACCEPTED,
            3,
            1,
            3,
            3,
            LIMITED,
            ("False", "WaitingForGPUs", "1/3 replicas ready; needs 2 more GPUs"),
        ),
    ],
)
def test_ready_condition(
    *,
    admission: AdmissionResult,
    desired: int,
    ready_count: int,
    current: int,
    updated: int,
    capacity: ConditionUpdate | None,
    expected: tuple[str, str, str],
) -> None:
    condition = ready_condition(
        admission=admission,
        desired_replicas=desired,
        ready_replicas=ready_count,
        current_replicas=current,
        updated_replicas=updated,
        capacity=capacity,
    )

    assert (condition.type, condition.status, condition.reason, condition.message) == (
        "Ready",
        *expected,
    )


def usage(nodes: int, ready_nodes: int, capacity: int, available: int) -> PoolUsage:
    return PoolUsage(
        nodes=nodes,
        ready_nodes=ready_nodes,
        capacity=capacity,
        allocated=capacity - available,
        available=available,
        largest_node_gpus=8 if capacity else 0,
        free_gpus_by_node={},
        allocated_by_namespace={},
        allocated_by_service={},
    )


@pytest.mark.parametrize(
    ("observed", "status", "reason", "message"),
    [
        (
            usage(0, 0, 0, 0),
            "False",
            "NoMatchingNodes",
            "no node matches spec.nodeSelector: label the GPU nodes or fix the selector",
        ),
        (
            usage(3, 0, 0, 0),
            "False",
            "NoReadyNodes",
            "none of the 3 matching nodes can take pods: each is NotReady, cordoned, or has a "
            "NoSchedule/NoExecute taint the pool does not tolerate",
        ),
        (
            usage(1, 1, 0, 0),
            "False",
            "NoAllocatableGPUs",
            "no ready node reports allocatable nvidia.com/gpu: check the device plugin on the "
            "nodes, or spec.resourceName",
        ),
        (usage(3, 2, 16, 6), "True", "NodesReady", "2/3 nodes ready, 6/16 nvidia.com/gpu free"),
    ],
)
def test_pool_ready_condition(observed: PoolUsage, status: str, reason: str, message: str) -> None:
    assert pool_ready_condition(observed, resource_name="nvidia.com/gpu") == ConditionUpdate(
        "Ready",
        status,  # type: ignore[arg-type]
        reason,
        message,
    )


FORBIDDEN = (
    'pods "llama-5d8f" is forbidden: violates PodSecurity "restricted:latest": runAsNonRoot != true'
)


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        ({}, None),
        ({"conditions": [{"type": "Available", "status": "True"}]}, None),
        ({"conditions": [{"type": "ReplicaFailure", "status": "False"}]}, None),
        (
            {
                "conditions": [
                    {"type": "ReplicaFailure", "status": "True", "reason": "FailedCreate",
                     "message": FORBIDDEN}
                ]
            },
            FORBIDDEN,
        ),
    ],
    ids=["no-conditions", "available", "failure-cleared", "forbidden"],
)  # fmt: skip
def test_pods_refused_reads_the_replica_failure(
    status: dict[str, Any], expected: str | None
) -> None:
    assert pods_refused(status) == expected


def test_refused_pods_outrank_a_rollout_in_ready() -> None:
    condition = ready_condition(
        admission=ACCEPTED,
        desired_replicas=2,
        ready_replicas=0,
        current_replicas=1,
        updated_replicas=0,
        pods_refused=FORBIDDEN,
    )

    assert (condition.status, condition.reason) == ("False", "PodsRefused")
    assert (
        condition.message
        == f"0/2 replicas ready; the API server refuses the replicas' pods: {FORBIDDEN}"
    )


def test_refused_pods_do_not_matter_once_every_replica_is_ready() -> None:
    condition = ready_condition(
        admission=ACCEPTED,
        desired_replicas=2,
        ready_replicas=2,
        current_replicas=2,
        updated_replicas=2,
        pods_refused=FORBIDDEN,
    )

    assert condition.reason == "ReplicasReady"


# --- Reconciling and Stalled, for kstatus ------------------------------------------------


def _statuses(updates: list[ConditionUpdate]) -> dict[str, tuple[str, str]]:
    return {update.type: (update.status, update.reason) for update in updates}


def test_a_ready_service_neither_reconciles_nor_stalls() -> None:
    ready = ConditionUpdate("Ready", "True", "ReplicasReady", "2/2 replicas ready")

    assert _statuses(service_kstatus_conditions(ready)) == {
        "Reconciling": ("False", "Reconciled"),
        "Stalled": ("False", "NotStalled"),
    }


@pytest.mark.parametrize("reason", sorted(UNDER_WAY))
def test_work_under_way_is_reconciling_with_readys_reason(reason: str) -> None:
    ready = ConditionUpdate("Ready", "False", reason, "1/3 replicas ready")

    reconciling, stalled = service_kstatus_conditions(ready)

    assert reconciling == ConditionUpdate("Reconciling", "True", reason, "1/3 replicas ready")
    assert (stalled.type, stalled.status) == ("Stalled", "False")


@pytest.mark.parametrize(
    "reason",
    [
        "PoolNotFound",
        "NamespaceNotAllowed",
        "GpusPerReplicaExceedNode",
        "QuotaExceeded",
        "PriorityClassNotAllowed",
        "InvalidSpec",
        "PodsRefused",
    ],
)
def test_a_refusal_stalls_with_the_reason(reason: str) -> None:
    ready = ConditionUpdate("Ready", "False", reason, "what to change")

    reconciling, stalled = service_kstatus_conditions(ready)

    assert stalled == ConditionUpdate("Stalled", "True", reason, "what to change")
    assert (reconciling.type, reconciling.status, reconciling.reason) == (
        "Reconciling",
        "False",
        "Stalled",
    )


def test_a_refused_service_stalls_from_its_ready_decision() -> None:
    ready = ready_condition(
        admission=REFUSED,
        desired_replicas=0,
        ready_replicas=0,
        current_replicas=0,
        updated_replicas=0,
    )

    assert _statuses(service_kstatus_conditions(ready))["Stalled"] == ("True", "PoolNotFound")


def test_ready_unknown_is_reconciling() -> None:
    ready = ConditionUpdate("Ready", "Unknown", "FirstReconcile", "not yet known")

    assert _statuses(service_kstatus_conditions(ready))["Reconciling"] == (
        "True",
        "FirstReconcile",
    )


def test_stalled_takes_readys_reason_and_message() -> None:
    ready = ConditionUpdate("Ready", "False", "PodsRefused", "forbidden")

    assert kstatus_conditions(ready, stalled=True)[1] == ConditionUpdate(
        "Stalled", "True", "PodsRefused", "forbidden"
    )


@pytest.mark.parametrize(
    ("observed", "reconciling"),
    [
        (usage(0, 0, 0, 0), ("True", "NoMatchingNodes")),
        (usage(2, 0, 0, 0), ("True", "NoReadyNodes")),
        (usage(2, 2, 0, 0), ("True", "NoAllocatableGPUs")),
        (usage(2, 2, 16, 16), ("False", "Reconciled")),
    ],
)
def test_a_pool_waiting_for_nodes_reconciles_and_never_stalls(
    observed: PoolUsage, reconciling: tuple[str, str]
) -> None:
    ready = pool_ready_condition(observed, resource_name="nvidia.com/gpu")

    assert _statuses(pool_kstatus_conditions(ready)) == {
        "Reconciling": reconciling,
        "Stalled": ("False", "NotStalled"),
    }


def test_reconciling_and_stalled_are_valid_conditions() -> None:
    # Through the model, as a status write goes: reasons CamelCase, messages short enough.
    updates = [
        *service_kstatus_conditions(ConditionUpdate("Ready", "True", "ReplicasReady", "2/2")),
        *service_kstatus_conditions(ConditionUpdate("Ready", "False", "PoolNotFound", "none")),
    ]

    conditions = apply_conditions(None, updates, 1, T0)

    assert [c["type"] for c in conditions] == ["Reconciling", "Stalled"]
    assert [c["status"] for c in conditions] == ["False", "True"]


@pytest.mark.parametrize(
    ("mode", "spec_replicas", "shown", "expected"),
    [
        # Nobody asked through the scale subresource: no condition at all.
        ("Auto", None, False, None),
        # Mode Off applies spec.replicas: nothing to say unless it was said before.
        ("Off", 3, False, None),
        ("Auto", 3, False, ("True", "AutoscalingModeAuto")),
        ("Recommend", 0, True, ("True", "AutoscalingModeRecommend")),
        ("Off", 3, True, ("False", "AutoscalingModeOff")),
        ("Auto", None, True, ("False", "NoScaleRequest")),
    ],
)
def test_scale_request_condition(
    mode: str, spec_replicas: int | None, shown: bool, expected: tuple[str, str] | None
) -> None:
    update = scale_request_condition(mode, spec_replicas, shown=shown)

    if expected is None:
        assert update is None
        return
    assert update is not None
    assert (update.type, update.status, update.reason) == ("ScaleRequestIgnored", *expected)
    if update.status == "True":
        assert f"spec.replicas asks for {spec_replicas} replica" in update.message
        assert f"autoscaling.mode is {mode}" in update.message
