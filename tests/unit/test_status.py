"""Status documents and the patch that updates them (empty when nothing changed)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError

from gpuyard.api.service import RecommendationStatus, UsageTotals
from gpuyard.logic.conditions import ConditionUpdate, apply_conditions
from gpuyard.logic.pool_accounting import PoolUsage
from gpuyard.logic.status import (
    apply_merge_patch,
    pool_status,
    service_status,
    status_patch,
)

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
USAGE = PoolUsage(
    nodes=3,
    ready_nodes=2,
    capacity=16,
    allocated=10,
    available=6,
    largest_node_gpus=8,
    free_gpus_by_node={"a": 2, "b": 4},
    allocated_by_namespace={"team-a": 10},
    allocated_by_service={("team-a", "llama"): 10},
)


def test_pool_status() -> None:
    status = pool_status(
        USAGE, previous=None, observed_generation=4, resource_name="nvidia.com/gpu", now=T0
    )

    assert status == {
        "observedGeneration": 4,
        "nodes": 3,
        "readyNodes": 2,
        "capacity": 16,
        "allocated": 10,
        "available": 6,
        "largestNodeGpus": 8,
        "conditions": [
            {
                "type": "Ready",
                "status": "True",
                "observedGeneration": 4,
                "lastTransitionTime": "2024-05-01T12:00:00Z",
                "reason": "NodesReady",
                "message": "2/3 nodes ready, 6/16 nvidia.com/gpu free",
            },
            {
                "type": "Reconciling",
                "status": "False",
                "observedGeneration": 4,
                "lastTransitionTime": "2024-05-01T12:00:00Z",
                "reason": "Reconciled",
                "message": "nothing is under way: Ready holds the outcome",
            },
            {
                "type": "Stalled",
                "status": "False",
                "observedGeneration": 4,
                "lastTransitionTime": "2024-05-01T12:00:00Z",
                "reason": "NotStalled",
                "message": "nothing that needs a person stops the reconcile",
            },
        ],
    }


def test_second_reconcile_with_nothing_changed_writes_nothing() -> None:
    first = pool_status(
        USAGE, previous=None, observed_generation=4, resource_name="nvidia.com/gpu", now=T0
    )
    second = pool_status(
        USAGE,
        previous=first,
        observed_generation=4,
        resource_name="nvidia.com/gpu",
        now=T0 + timedelta(minutes=10),
    )

    assert status_patch(first, second) == {}


def test_changed_pool_usage_patches_only_what_changed() -> None:
    first = pool_status(
        USAGE, previous=None, observed_generation=4, resource_name="nvidia.com/gpu", now=T0
    )
    later = T0 + timedelta(minutes=1)
    second = pool_status(
        replace(USAGE, allocated=12, available=4),
        previous=first,
        observed_generation=4,
        resource_name="nvidia.com/gpu",
        now=later,
    )

    patch = status_patch(first, second)

    assert set(patch) == {"allocated", "available", "conditions"}
    # Same Ready status: the transition time stays, the message moves on.
    assert patch["conditions"][0]["lastTransitionTime"] == "2024-05-01T12:00:00Z"
    assert patch["conditions"][0]["message"] == "2/3 nodes ready, 4/16 nvidia.com/gpu free"


def test_pool_going_down_moves_the_transition_time() -> None:
    first = pool_status(
        USAGE, previous=None, observed_generation=1, resource_name="nvidia.com/gpu", now=T0
    )
    down = replace(USAGE, ready_nodes=0, capacity=0, available=0, free_gpus_by_node={})

    second = pool_status(
        down,
        previous=first,
        observed_generation=1,
        resource_name="nvidia.com/gpu",
        now=T0 + timedelta(seconds=30),
    )

    ready, reconciling, stalled = second["conditions"]
    assert (ready["status"], ready["reason"]) == ("False", "NoReadyNodes")
    assert ready["lastTransitionTime"] == "2024-05-01T12:00:30Z"
    # Waiting for nodes is work under way to kstatus, never a stall.
    assert (reconciling["status"], reconciling["reason"]) == ("True", "NoReadyNodes")
    assert reconciling["lastTransitionTime"] == "2024-05-01T12:00:30Z"
    assert (stalled["status"], stalled["lastTransitionTime"]) == ("False", "2024-05-01T12:00:00Z")


def test_service_status_with_every_field() -> None:
    conditions = apply_conditions(
        None, [ConditionUpdate("Ready", "True", "ReplicasReady", "2/2 replicas ready")], 7, T0
    )

    status = service_status(
        observed_generation=7,
        replicas=2,
        ready_replicas=2,
        desired_replicas=2,
        selector="app.kubernetes.io/instance=llama,gpuyard.io/service=llama",
        gpu_type="a100-80gb",
        recommendation=RecommendationStatus(
            replicas=3,
            reason="MetricAboveTarget",
            metric="GPUUtilization",
            current_value="91.5",
            target_value="70",
            limited_by="Capacity",
            time="2024-05-01T12:00:00Z",
        ),
        last_scale_time=T0,
        usage=UsageTotals(
            gpu_seconds=7200,
            cost="5",
            currency="USD",
            reported_through="2024-05-01T12:00:00Z",
        ),
        conditions=conditions,
    )

    assert status == {
        "observedGeneration": 7,
        "replicas": 2,
        "readyReplicas": 2,
        "desiredReplicas": 2,
        "selector": "app.kubernetes.io/instance=llama,gpuyard.io/service=llama",
        "gpuType": "a100-80gb",
        "recommendation": {
            "replicas": 3,
            "reason": "MetricAboveTarget",
            "metric": "GPUUtilization",
            "currentValue": "91.5",
            "targetValue": "70",
            "limitedBy": "Capacity",
            "time": "2024-05-01T12:00:00Z",
        },
        "lastScaleTime": "2024-05-01T12:00:00Z",
        "usage": {
            "gpuSeconds": 7200,
            "cost": "5",
            "currency": "USD",
            "reportedThrough": "2024-05-01T12:00:00Z",
        },
        "conditions": conditions,
    }


def test_service_status_holds_only_the_fields_given() -> None:
    # The autoscaler writes its own part; the reconcile's part is left alone by the patch.
    stored = {"observedGeneration": 3, "readyReplicas": 1, "desiredReplicas": 1}
    autoscaler_part = service_status(desired_replicas=2, last_scale_time=T0)

    assert autoscaler_part == {"desiredReplicas": 2, "lastScaleTime": "2024-05-01T12:00:00Z"}
    assert status_patch(stored, autoscaler_part) == autoscaler_part


@pytest.mark.parametrize(
    "fields",
    [
        {"replicas": -1},
        {"desired_replicas": 1001},
        {"gpu_type": "A100"},
        {"conditions": [{"type": "Ready", "status": "Maybe"}]},
    ],
)
def test_service_status_refuses_what_the_crd_would(fields: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        service_status(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("current", "desired", "patch"),
    [
        (None, {"replicas": 1}, {"replicas": 1}),
        ({}, {}, {}),
        ({"replicas": 1, "selector": "a=b"}, {"replicas": 1}, {}),
        ({"replicas": 1}, {"replicas": 2}, {"replicas": 2}),
        ({"usage": {"cost": "1"}}, {"usage": {"cost": "1"}}, {}),
        ({"usage": {"cost": "1"}}, {"usage": {"cost": "1.5"}}, {"usage": {"cost": "1.5"}}),
        (
            {"conditions": [{"type": "A"}, {"type": "B"}]},
            {"conditions": [{"type": "A"}]},
            {"conditions": [{"type": "A"}]},
        ),
    ],
)
def test_status_patch(
    current: dict[str, object] | None, desired: dict[str, object], patch: dict[str, object]
) -> None:
    assert status_patch(current, desired) == patch


def test_status_patch_clears_nested_keys_the_new_value_no_longer_has() -> None:
    # A JSON merge patch merges objects: without an explicit null, limitedBy would stay.
    current = {
        "recommendation": {"replicas": 2, "reason": "MetricAtTarget", "limitedBy": "MinReplicas"}
    }
    desired = {"recommendation": {"replicas": 2, "reason": "MetricAtTarget"}}
    assert status_patch(current, desired) == {
        "recommendation": {"replicas": 2, "reason": "MetricAtTarget", "limitedBy": None}
    }
    assert status_patch(desired, desired) == {}


def test_a_patch_applied_as_the_api_server_does_yields_the_desired_status() -> None:
    current = {"replicas": 1, "recommendation": {"replicas": 2, "limitedBy": "MinReplicas"}}
    desired = {"replicas": 3, "recommendation": {"replicas": 2}}
    stored = apply_merge_patch(current, status_patch(current, desired))
    assert stored == {"replicas": 3, "recommendation": {"replicas": 2}}
    assert status_patch(stored, desired) == {}
