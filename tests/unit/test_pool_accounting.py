"""Pool accounting from Node and Pod JSON: converters, selectors, taints and the numbers."""

from __future__ import annotations

from typing import Any

import pytest
from sample_objects import make_pool, pool_spec

from gpuyard.api.common import LabelSelector, Toleration
from gpuyard.logic.pool_accounting import (
    NodeInfo,
    PodInfo,
    PoolUsage,
    Taint,
    compute_pool_usage,
    effective_requests,
    namespace_matches,
    node_info_from_dict,
    parse_integer_quantity,
    pod_info_from_dict,
    tolerates,
)

GPU = "nvidia.com/gpu"
POOL_LABELS = {"gpuyard.io/pool": "a100"}


@pytest.mark.parametrize(
    ("quantity", "expected"),
    [
        ("8", 8),
        (8, 8),
        ("0", 0),
        ("1k", 1000),
        ("16Gi", 16 * 2**30),
        ("2M", 2_000_000),
        ("1e3", 1000),
        ("1.5k", 1500),
        ("3900m", None),  # millicores are not whole
        ("1.5", None),
        ("", None),
        ("lots", None),
        ("NaN", None),
        (True, None),
        (None, None),
        (1.0, None),
    ],
)
def test_parse_integer_quantity(quantity: object, expected: int | None) -> None:
    assert parse_integer_quantity(quantity) == expected


def node_json(
    name: str,
    *,
    labels: dict[str, str] | None = None,
    gpus: str | None = "8",
    ready: str | None = "True",
    unschedulable: bool | None = None,
    taints: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    allocatable = {"cpu": "3900m", "memory": "16Gi", "pods": "110"}
    if gpus is not None:
        allocatable[GPU] = gpus
    spec: dict[str, Any] = {}
    if unschedulable is not None:
        spec["unschedulable"] = unschedulable
    if taints is not None:
        spec["taints"] = taints
    conditions = [{"type": "MemoryPressure", "status": "False"}]
    if ready is not None:
        conditions.append({"type": "Ready", "status": ready})
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": POOL_LABELS if labels is None else labels},
        "spec": spec,
        "status": {"allocatable": allocatable, "conditions": conditions},
    }


def test_node_info_from_dict() -> None:
    node = node_info_from_dict(
        node_json(
            "gpu-1",
            unschedulable=True,
            taints=[
                {"key": GPU, "effect": "NoSchedule"},
                {"key": "spot", "value": "true", "effect": "NoExecute"},
            ],
        )
    )

    assert node == NodeInfo(
        name="gpu-1",
        labels=POOL_LABELS,
        ready=True,
        unschedulable=True,
        allocatable={GPU: 8, "memory": 16 * 2**30, "pods": 110},
        taints=(Taint(GPU, "NoSchedule"), Taint("spot", "NoExecute", "true")),
    )


@pytest.mark.parametrize(
    ("ready", "expected"), [("True", True), ("False", False), ("Unknown", False), (None, False)]
)
def test_node_readiness(ready: str | None, expected: bool) -> None:
    assert node_info_from_dict(node_json("n", ready=ready)).ready is expected


def test_converters_survive_sparse_objects() -> None:
    assert node_info_from_dict({"metadata": {"name": "bare"}}) == NodeInfo(name="bare")
    assert pod_info_from_dict({"metadata": {"name": "p", "namespace": "ns"}}) == PodInfo(
        name="p", namespace="ns"
    )


def container_json(
    requests: dict[str, Any] | None = None, limits: dict[str, Any] | None = None, **extra: Any
) -> dict[str, Any]:
    resources: dict[str, Any] = {}
    if requests is not None:
        resources["requests"] = requests
    if limits is not None:
        resources["limits"] = limits
    return {"name": "c", "image": "x", "resources": resources, **extra}


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        pytest.param({"containers": [container_json({GPU: "2"})]}, {GPU: 2}, id="one-container"),
        pytest.param(
            {"containers": [container_json({GPU: "2"}), container_json({GPU: 1})]},
            {GPU: 3},
            id="containers-add-up",
        ),
        pytest.param(
            {"containers": [container_json(limits={GPU: "4"})]},
            {GPU: 4},
            id="limit-stands-in-for-request",
        ),
        pytest.param(
            {"containers": [container_json({"cpu": "500m", "memory": "1Gi"})]},
            {"memory": 2**30},
            id="fractional-cpu-dropped",
        ),
        pytest.param(
            {
                "initContainers": [container_json({GPU: "4"})],
                "containers": [container_json({GPU: "1"})],
            },
            {GPU: 4},
            id="larger-init-container-wins",
        ),
        pytest.param(
            {
                "initContainers": [
                    container_json({GPU: "1"}, restartPolicy="Always"),
                    container_json({GPU: "2"}),
                ],
                "containers": [container_json({GPU: "1"})],
            },
            {GPU: 3},
            id="sidecar-counts-with-later-init-and-with-containers",
        ),
        pytest.param(
            {
                "initContainers": [container_json({GPU: "1"}, restartPolicy="Always")],
                "containers": [container_json({GPU: "2"})],
            },
            {GPU: 3},
            id="sidecar-adds-to-containers",
        ),
        pytest.param({"containers": [container_json({GPU: "0"})]}, {}, id="zero-dropped"),
        pytest.param({}, {}, id="no-containers"),
    ],
)
def test_effective_requests(spec: dict[str, Any], expected: dict[str, int]) -> None:
    assert effective_requests(spec) == expected


def pod_json(
    name: str,
    *,
    namespace: str = "team-a",
    node: str | None = "gpu-1",
    gpus: str = "1",
    phase: str = "Running",
    labels: dict[str, str] | None = None,
) -> dict[str, Any]:
    spec: dict[str, Any] = {"containers": [container_json({GPU: gpus, "cpu": "2"})]}
    if node is not None:
        spec["nodeName"] = node
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels or {}},
        "spec": spec,
        "status": {"phase": phase},
    }


def test_pod_info_from_dict() -> None:
    pod = pod_info_from_dict(
        pod_json(
            "llama-abc",
            gpus="2",
            labels={"gpuyard.io/service": "llama", "gpuyard.io/pool": "a100", "x": "y"},
        )
    )

    assert pod == PodInfo(
        name="llama-abc",
        namespace="team-a",
        node_name="gpu-1",
        phase="Running",
        requests={GPU: 2, "cpu": 2},
        service="llama",
        pool="a100",
    )


def test_pod_without_status_is_pending_and_unbound() -> None:
    raw = pod_json("p", node=None)
    del raw["status"]

    pod = pod_info_from_dict(raw)

    assert (pod.phase, pod.node_name) == ("Pending", None)


def selector(**fields: Any) -> LabelSelector:
    return LabelSelector.model_validate(fields)


@pytest.mark.parametrize(
    ("label_selector", "labels", "expected"),
    [
        (None, {}, True),
        (selector(), {"any": "thing"}, True),
        (selector(matchLabels={"team": "ml"}), {"team": "ml", "x": "y"}, True),
        (selector(matchLabels={"team": "ml"}), {"team": "web"}, False),
        (selector(matchLabels={"team": "ml"}), {}, False),
        (
            selector(matchExpressions=[{"key": "team", "operator": "In", "values": ["ml", "ai"]}]),
            {"team": "ai"},
            True,
        ),
        (
            selector(matchExpressions=[{"key": "team", "operator": "In", "values": ["ml"]}]),
            {},
            False,
        ),
        (
            selector(matchExpressions=[{"key": "team", "operator": "NotIn", "values": ["web"]}]),
            {"team": "ml"},
            True,
        ),
        (
            selector(matchExpressions=[{"key": "team", "operator": "NotIn", "values": ["web"]}]),
            {},
            True,
        ),
        (
            selector(matchExpressions=[{"key": "team", "operator": "NotIn", "values": ["web"]}]),
            {"team": "web"},
            False,
        ),
        (selector(matchExpressions=[{"key": "gpu", "operator": "Exists"}]), {"gpu": ""}, True),
        (selector(matchExpressions=[{"key": "gpu", "operator": "Exists"}]), {}, False),
        (selector(matchExpressions=[{"key": "gpu", "operator": "DoesNotExist"}]), {}, True),
        (
            selector(matchExpressions=[{"key": "gpu", "operator": "DoesNotExist"}]),
            {"gpu": "no"},
            False,
        ),
        (
            selector(
                matchLabels={"team": "ml"},
                matchExpressions=[{"key": "env", "operator": "In", "values": ["prod"]}],
            ),
            {"team": "ml", "env": "dev"},
            False,
        ),
    ],
)
def test_namespace_matches(
    label_selector: LabelSelector | None, labels: dict[str, str], expected: bool
) -> None:
    assert namespace_matches(label_selector, labels) is expected


def toleration(**fields: Any) -> Toleration:
    return Toleration.model_validate(fields)


@pytest.mark.parametrize(
    ("given", "taint", "expected"),
    [
        (toleration(operator="Exists"), Taint("anything", "NoExecute", "v"), True),
        (toleration(operator="Exists", effect="NoSchedule"), Taint("k", "NoExecute"), False),
        (toleration(key="k", operator="Exists"), Taint("k", "NoSchedule", "v"), True),
        (toleration(key="k", operator="Exists"), Taint("other", "NoSchedule"), False),
        (toleration(key="k", value="v"), Taint("k", "NoSchedule", "v"), True),
        (toleration(key="k", value="v"), Taint("k", "NoSchedule", "w"), False),
        (toleration(key="k"), Taint("k", "NoSchedule"), True),  # empty value equals empty
        (toleration(key="k", value="v", effect="NoExecute"), Taint("k", "NoSchedule", "v"), False),
    ],
)
def test_tolerates(given: Toleration, taint: Taint, expected: bool) -> None:
    assert tolerates(given, taint) is expected


def tolerating_pool() -> Any:
    return make_pool(
        pool_spec(tolerations=[{"key": GPU, "operator": "Exists", "effect": "NoSchedule"}])
    )


def test_pool_usage_counts_what_the_scheduler_would() -> None:
    nodes = [
        node_json("gpu-1"),
        node_json("gpu-2", taints=[{"key": GPU, "effect": "NoSchedule"}]),  # tolerated
        node_json("gpu-3", gpus="4", ready="False"),
        node_json("gpu-4", unschedulable=True),
        node_json("gpu-5", taints=[{"key": "maintenance", "effect": "NoExecute"}]),
        node_json("gpu-6", taints=[{"key": "spot", "effect": "PreferNoSchedule"}], gpus="2"),
        node_json("other-pool", labels={"gpuyard.io/pool": "h100"}),
        node_json("no-device-plugin", gpus=None),  # selected, ready, but adds no GPUs
    ]
    llama = {"gpuyard.io/service": "llama", "gpuyard.io/pool": "a100"}
    pods = [
        pod_json("llama-1", gpus="2", labels=llama),
        pod_json("llama-2", gpus="2", node=None, phase="Pending", labels=llama),
        pod_json("train", namespace="team-b", gpus="4"),
        pod_json("stuck", gpus="2", node="gpu-3"),  # NotReady node: held, not available
        pod_json("done", gpus="8", phase="Succeeded"),
        pod_json("failed", gpus="8", node="gpu-2", phase="Failed"),
        pod_json("elsewhere", gpus="8", node="other-pool"),
        pod_json(
            "queued-elsewhere", node=None, phase="Pending", labels={"gpuyard.io/pool": "h100"}
        ),
        pod_json("unlabelled-pending", node=None, phase="Pending"),
    ]

    usage = compute_pool_usage(
        tolerating_pool(),
        [node_info_from_dict(node) for node in nodes],
        [pod_info_from_dict(pod) for pod in pods],
    )

    assert usage == PoolUsage(
        nodes=7,
        ready_nodes=4,
        capacity=18,
        allocated=8,
        available=12,
        largest_node_gpus=8,
        free_gpus_by_node={"gpu-1": 2, "gpu-2": 8, "gpu-6": 2, "no-device-plugin": 0},
        allocated_by_namespace={"team-a": 6, "team-b": 4},
        allocated_by_service={("team-a", "llama"): 4},
        bound_by_service={("team-a", "llama"): 2},
    )
    assert usage.namespace_allocated("team-a") == 6
    assert usage.namespace_allocated("team-a", excluding_service="llama") == 2
    assert usage.namespace_allocated("team-c") == 0


def test_untolerated_taint_keeps_a_node_out_of_capacity() -> None:
    nodes = [node_info_from_dict(node_json("gpu-1", taints=[{"key": GPU, "effect": "NoSchedule"}]))]

    usage = compute_pool_usage(make_pool(), nodes, [])

    assert (usage.nodes, usage.ready_nodes, usage.capacity) == (1, 0, 0)


def test_over_committed_node_has_nothing_free_rather_than_a_negative_count() -> None:
    # The device plugin can report fewer GPUs than running pods hold (a GPU fell off the bus).
    nodes = [node_info_from_dict(node_json("gpu-1", gpus="2"))]
    pods = [pod_info_from_dict(pod_json("p", gpus="3"))]

    usage = compute_pool_usage(make_pool(), nodes, pods)

    assert (usage.capacity, usage.allocated, usage.available) == (2, 3, 0)


def test_empty_pool() -> None:
    usage = compute_pool_usage(make_pool(), [], [])

    assert (usage.nodes, usage.capacity, usage.available, usage.largest_node_gpus) == (0, 0, 0, 0)
    assert usage.replicas_that_fit(1) == 0


@pytest.mark.parametrize(
    ("gpus_per_replica", "expected"), [(1, 12), (2, 6), (3, 2), (4, 2), (8, 1), (9, 0)]
)
def test_replicas_that_fit_respects_node_boundaries(gpus_per_replica: int, expected: int) -> None:
    usage = PoolUsage(
        nodes=3,
        ready_nodes=3,
        capacity=24,
        allocated=12,
        available=12,
        largest_node_gpus=8,
        free_gpus_by_node={"a": 2, "b": 8, "c": 2},
        allocated_by_namespace={},
        allocated_by_service={},
    )

    assert usage.replicas_that_fit(gpus_per_replica) == expected


def test_replicas_that_fit_needs_a_positive_size() -> None:
    with pytest.raises(ValueError, match="must be positive"):
        compute_pool_usage(make_pool(), [], []).replicas_that_fit(0)
