"""Admission of an AIService against its pool: each refusal, and its message."""

from __future__ import annotations

from typing import Any

import pytest
from sample_objects import make_pool, make_service, pool_spec, service_spec

from gpuyard.api.pool import GPUPoolStatus
from gpuyard.logic.admission import AdmissionResult, check_service

HEALTHY_POOL = GPUPoolStatus(nodes=2, ready_nodes=2, capacity=16, available=16, largest_node_gpus=8)
TEAM_LABELS = {"kubernetes.io/metadata.name": "team-a", "team": "ml"}
SCALABLE = {
    "maxReplicas": 4,
    "autoscaling": {"metrics": [{"type": "GPUUtilization", "targetPercent": 70}]},
}


def check(
    spec: dict[str, Any] | None = None,
    pool: dict[str, Any] | None = None,
    *,
    pool_exists: bool = True,
    pool_status: GPUPoolStatus | None = HEALTHY_POOL,
    namespace_labels: dict[str, str] | None = None,
    namespace_allocated: int = 0,
) -> AdmissionResult:
    return check_service(
        make_service(spec),
        make_pool(pool) if pool_exists else None,
        pool_status,
        TEAM_LABELS if namespace_labels is None else namespace_labels,
        namespace_allocated,
    )


def test_accepted() -> None:
    assert check() == AdmissionResult(
        accepted=True,
        reason="Accepted",
        message='runs on GPUPool "a100" (a100-80gb, nvidia.com/gpu)',
    )


def test_pool_not_found() -> None:
    result = check(pool_exists=False)

    assert (result.accepted, result.reason) == (False, "PoolNotFound")
    assert 'GPUPool "a100" does not exist' in result.message
    assert "kubectl get gpupools" in result.message


@pytest.mark.parametrize(
    ("namespace_selector", "accepted"),
    [
        ({"matchLabels": {"team": "ml"}}, True),
        ({"matchLabels": {"team": "web"}}, False),
        ({"matchExpressions": [{"key": "team", "operator": "In", "values": ["ml", "ai"]}]}, True),
        ({"matchExpressions": [{"key": "restricted", "operator": "Exists"}]}, False),
    ],
)
def test_namespace_selector(namespace_selector: dict[str, Any], accepted: bool) -> None:
    result = check(pool=pool_spec(namespaceSelector=namespace_selector))

    assert result.accepted is accepted
    if not accepted:
        assert result.reason == "NamespaceNotAllowed"
        assert 'GPUPool "a100" does not admit namespace "team-a"' in result.message


@pytest.mark.parametrize(
    ("gpus_per_replica", "pool_status", "reason"),
    [
        (8, HEALTHY_POOL, "Accepted"),
        (9, HEALTHY_POOL, "GpusPerReplicaExceedNode"),
        # A pool that is down is not too small: CapacityLimited reports it instead.
        (9, GPUPoolStatus(nodes=2, ready_nodes=0, largest_node_gpus=0), "Accepted"),
        (9, None, "Accepted"),  # not observed yet
    ],
)
def test_replica_must_fit_on_one_node(
    gpus_per_replica: int, pool_status: GPUPoolStatus | None, reason: str
) -> None:
    result = check(service_spec(gpusPerReplica=gpus_per_replica), pool_status=pool_status)

    assert result.reason == reason


def test_node_size_message_names_the_numbers() -> None:
    result = check(service_spec(gpusPerReplica=9))

    assert result.message == (
        "each replica requests 9 nvidia.com/gpu but the largest ready node of GPUPool "
        '"a100" has 8: lower spec.gpusPerReplica to 8 or less, or choose a pool with bigger nodes'
    )


@pytest.mark.parametrize(
    ("min_replicas", "gpus", "quota", "allocated", "reason"),
    [
        (1, 1, None, 1000, "Accepted"),  # no quota
        (2, 2, 8, 4, "Accepted"),  # exactly full
        (2, 2, 8, 5, "QuotaExceeded"),
        (0, 4, 8, 8, "Accepted"),  # scale-to-zero services fit any quota
        (1, 1, 0, 0, "QuotaExceeded"),
    ],
)
def test_namespace_quota_must_hold_min_replicas(
    min_replicas: int, gpus: int, quota: int | None, allocated: int, reason: str
) -> None:
    spec = service_spec(minReplicas=min_replicas, gpusPerReplica=gpus, **SCALABLE)
    if min_replicas == 0:
        spec["autoscaling"]["mode"] = "Off"
    pool = pool_spec(maxGpusPerNamespace=quota) if quota is not None else pool_spec()

    assert check(spec, pool, namespace_allocated=allocated).reason == reason


def test_quota_message_names_the_numbers() -> None:
    result = check(
        service_spec(minReplicas=2, gpusPerReplica=2, **SCALABLE),
        pool_spec(maxGpusPerNamespace=8),
        namespace_allocated=6,
    )

    assert result.message == (
        'minReplicas 2 x 2 nvidia.com/gpu needs 4, but namespace "team-a" may hold 8 of GPUPool '
        '"a100" and other workloads there already hold 6: lower minReplicas or gpusPerReplica, '
        "or free GPUs in the namespace"
    )


@pytest.mark.parametrize("budget", ["10", "0.000001"])
def test_budget_never_refuses_a_service(budget: str) -> None:
    # A budget below minReplicas is the autoscaler's to enforce (BudgetLimited), not ours.
    spec = service_spec(minReplicas=4, budget={"maxCostPerHour": budget}, **SCALABLE)

    assert check(spec).accepted


def test_first_failing_check_wins() -> None:
    # Namespace refused and too big for any node: the namespace is what to fix first.
    result = check(
        service_spec(gpusPerReplica=16),
        pool_spec(namespaceSelector={"matchLabels": {"team": "web"}}),
    )

    assert result.reason == "NamespaceNotAllowed"


@pytest.mark.parametrize(
    ("offered", "asked", "accepted"),
    [
        (None, None, True),
        (["inference-high"], "inference-high", True),
        (None, "inference-high", False),
        (["batch-low"], "system-cluster-critical", False),
    ],
    ids=["no-class", "offered", "pool-offers-none", "not-offered"],
)
def test_a_priority_class_must_be_one_the_pool_offers(
    offered: list[str] | None, asked: str | None, accepted: bool
) -> None:
    pool = pool_spec(priorityClassNames=offered) if offered else None
    spec = service_spec(priorityClassName=asked) if asked else None

    result = check(spec, pool)

    assert result.accepted is accepted
    if not accepted:
        assert result.reason == "PriorityClassNotAllowed"
        assert f'does not offer PriorityClass "{asked}"' in result.message
        assert "spec.priorityClassNames" in result.message
