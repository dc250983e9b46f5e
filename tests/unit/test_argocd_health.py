"""The Argo CD health checks in docs/argocd/, run by Lua 5.1 (Argo CD embeds gopher-lua, a
Lua 5.1) against AIServices and GPUPools in every state. The conditions come from gpuyard's
own condition logic, so a new Ready reason fails here until it is classified as work under
way (Reconciling) or a stall. tests/integration/test_gitops_health.py runs the same scripts
in gopher-lua itself, and kstatus, on objects of the real cluster."""

from __future__ import annotations

import itertools
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from lupa import lua51  # type: ignore[import-untyped]  # lupa ships no type hints

from gpuyard.logic import admission
from gpuyard.logic.admission import AdmissionResult
from gpuyard.logic.conditions import (
    UNDER_WAY,
    ConditionUpdate,
    accepted_condition,
    apply_conditions,
    capacity_condition,
    pool_kstatus_conditions,
    pool_ready_condition,
    ready_condition,
    service_kstatus_conditions,
)
from gpuyard.logic.pool_accounting import PoolUsage

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = {
    "AIService": REPO_ROOT / "docs" / "argocd" / "health-aiservice.lua",
    "GPUPool": REPO_ROOT / "docs" / "argocd" / "health-gpupool.lua",
}
NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
ACCEPTED = AdmissionResult(accepted=True, reason="Accepted", message='runs on GPUPool "a100"')
# Every reason admission can refuse a service with: its module-level CamelCase constants.
REFUSALS = sorted(
    value
    for name, value in vars(admission).items()
    if name.isupper() and isinstance(value, str) and value != admission.ACCEPTED
)


def health(kind: str, obj: dict[str, Any]) -> tuple[str, str]:
    """What Argo CD would show: (status, message)."""
    lua = lua51.LuaRuntime()
    lua.globals().obj = lua.table_from(obj, recursive=True)
    result = lua.execute(SCRIPTS[kind].read_text())
    return str(result["status"]), str(result["message"])


def with_status(
    kind: str,
    updates: list[ConditionUpdate],
    *,
    generation: int = 3,
    observed: int | None = 3,
    condition_generation: int | None = 3,
) -> dict[str, Any]:
    status: dict[str, Any] = {
        "conditions": apply_conditions(None, updates, condition_generation, NOW),
    }
    if observed is not None:
        status["observedGeneration"] = observed
    return {
        "apiVersion": "gpuyard.io/v1alpha1",
        "kind": kind,
        "metadata": {"name": "llama", "namespace": "team-a", "generation": generation},
        "status": status,
    }


def service(*updates: ConditionUpdate, **kwargs: Any) -> dict[str, Any]:
    return with_status("AIService", list(updates), **kwargs)


def serving(
    desired: int,
    ready: int,
    current: int,
    updated: int,
    refused_pods: str | None = None,
    **capacity: Any,
) -> list[ConditionUpdate]:
    """Accepted, Ready, Reconciling and Stalled of an accepted service with these replica
    counts (desired, and the Deployment's ready, existing and updated pods)."""
    limited = capacity_condition(**capacity) if capacity else None
    decided = ready_condition(
        admission=ACCEPTED,
        desired_replicas=desired,
        ready_replicas=ready,
        current_replicas=current,
        updated_replicas=updated,
        capacity=limited,
        pods_refused=refused_pods,
    )
    return [accepted_condition(ACCEPTED), decided, *service_kstatus_conditions(decided)]


def pool_usage(nodes: int, ready_nodes: int, capacity: int, allocated: int = 0) -> PoolUsage:
    return PoolUsage(
        nodes=nodes,
        ready_nodes=ready_nodes,
        capacity=capacity,
        allocated=allocated,
        available=capacity - allocated,
        largest_node_gpus=8 if capacity else 0,
        free_gpus_by_node={},
        allocated_by_namespace={},
        allocated_by_service={},
    )


# --- AIService -----------------------------------------------------------------------------

WAITING_FOR_GPUS = {
    "wanted_replicas": 3,
    "placed_replicas": 1,
    "gpus_per_replica": 4,
    "available_gpus": 2,
    "pool_name": "a100",
    "resource_name": "nvidia.com/gpu",
}


@pytest.mark.parametrize(
    ("obj", "expected", "message"),
    [
        (service(*serving(2, 2, 2, 2)), "Healthy", "ReplicasReady: 2/2 replicas ready"),
        (service(*serving(0, 0, 0, 0)), "Healthy", "ScaledToZero"),
        (
            {
                "apiVersion": "gpuyard.io/v1alpha1",
                "kind": "AIService",
                "metadata": {"generation": 1},
            },
            "Progressing",
            "Waiting for gpuyard to observe the service",
        ),
        (service(*serving(2, 2, 2, 2), observed=None), "Progressing", "observe the service"),
        (service(*serving(2, 2, 2, 2), observed=2), "Progressing", "observe generation 3"),
        (service(accepted_condition(ACCEPTED)), "Progressing", "Waiting for the Ready condition"),
        (
            service(*serving(2, 2, 2, 2), condition_generation=2),
            "Progressing",
            "Ready condition of generation 3",
        ),
        (service(*serving(3, 1, 3, 1)), "Progressing", "RollingOut: 1/3 replicas run the current"),
        (service(*serving(3, 1, 3, 3)), "Progressing", "ReplicasNotReady: 1/3 replicas ready"),
        (
            service(*serving(3, 1, 1, 1, **WAITING_FOR_GPUS)),
            "Progressing",
            'WaitingForGPUs: 1/3 replicas ready; GPUPool "a100" needs 6 more',
        ),
        (
            service(
                accepted_condition(ACCEPTED),
                ConditionUpdate("Ready", "Unknown", "Reconciling", "first reconcile"),
            ),
            "Progressing",
            "Reconciling",
        ),
        (
            service(*serving(1, 0, 0, 0, refused_pods='violates PodSecurity "restricted"')),
            "Degraded",
            "PodsRefused: 0/1 replicas ready; the API server refuses the replicas' pods: violates",
        ),
        (
            # Written by a gpuyard without Reconciling and Stalled: read as kstatus reads it.
            service(
                accepted_condition(ACCEPTED),
                ConditionUpdate("Ready", "False", "DeploymentFailed", "image pull backoff"),
            ),
            "Progressing",
            "DeploymentFailed: image pull backoff",
        ),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_aiservice_health(obj: dict[str, Any], expected: str, message: str) -> None:
    status, text = health("AIService", obj)

    assert status == expected
    assert message in text


# InvalidSpec: a spec stored before a stricter gpuyard, which the operator cannot parse.
@pytest.mark.parametrize("reason", [*REFUSALS, "InvalidSpec"])
def test_refused_aiservice_is_degraded_with_the_reason(reason: str) -> None:
    refused = AdmissionResult(accepted=False, reason=reason, message="what to change")
    ready = ready_condition(
        admission=refused,
        desired_replicas=0,
        ready_replicas=0,
        current_replicas=0,
        updated_replicas=0,
    )
    obj = service(accepted_condition(refused), ready, *service_kstatus_conditions(ready))

    assert health("AIService", obj) == ("Degraded", f"{reason}: what to change")


def test_a_refusal_without_stalled_is_still_degraded() -> None:
    # A status an older gpuyard wrote, before an upgraded one reconciles the service again.
    refused = AdmissionResult(accepted=False, reason=admission.POOL_NOT_FOUND, message="no pool")

    assert health("AIService", service(accepted_condition(refused)))[0] == "Degraded"


def test_accepted_false_wins_over_a_stale_ready_true() -> None:
    refused = AdmissionResult(accepted=False, reason=admission.QUOTA_EXCEEDED, message="quota")
    obj = service(*serving(2, 2, 2, 2), accepted_condition(refused))

    assert health("AIService", obj)[0] == "Degraded"


def test_every_ready_reason_of_an_accepted_service_is_classified_on_purpose() -> None:
    # Every Ready=False that ready_condition produces for an accepted service is either
    # work under way (Progressing) or pods the API server refuses (Degraded): a new reason
    # lands in neither set until someone decides which it is.
    produced = set()
    for desired, ready, current, updated, limited, refused in itertools.product(
        range(3), range(3), range(3), range(3), [False, True], [None, "forbidden"]
    ):
        capacity = WAITING_FOR_GPUS if limited else {}
        updates = serving(desired, ready, current, updated, refused, **capacity)
        if updates[1].status == "False":
            produced.add(updates[1].reason)
            expected = "Progressing" if updates[1].reason in UNDER_WAY else "Degraded"
            assert health("AIService", service(*updates))[0] == expected, updates[1]

    assert produced == UNDER_WAY | {"PodsRefused"}


# --- GPUPool -------------------------------------------------------------------------------


def pool(usage: PoolUsage, **kwargs: Any) -> dict[str, Any]:
    ready = pool_ready_condition(usage, resource_name="nvidia.com/gpu")
    obj = with_status("GPUPool", [ready, *pool_kstatus_conditions(ready)], **kwargs)
    del obj["metadata"]["namespace"]
    return obj


@pytest.mark.parametrize(
    ("obj", "expected", "reason"),
    [
        (pool(pool_usage(2, 2, 16, 4)), "Healthy", "NodesReady: 2/2 nodes ready, 12/16"),
        # Waiting for nodes: a node group scaling from zero brings them.
        (pool(pool_usage(0, 0, 0)), "Progressing", "NoMatchingNodes"),
        (pool(pool_usage(2, 0, 0)), "Progressing", "NoReadyNodes"),
        (pool(pool_usage(2, 2, 0)), "Progressing", "NoAllocatableGPUs"),
        (pool(pool_usage(2, 2, 16), observed=2), "Progressing", "observe generation 3"),
        (pool(pool_usage(2, 2, 16), observed=None), "Progressing", "observe the pool"),
        (
            {"apiVersion": "gpuyard.io/v1alpha1", "kind": "GPUPool", "metadata": {"generation": 1}},
            "Progressing",
            "observe the pool",
        ),
        (with_status("GPUPool", []), "Progressing", "Waiting for the Ready condition"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_gpupool_health(obj: dict[str, Any], expected: str, reason: str) -> None:
    status, text = health("GPUPool", obj)

    assert status == expected
    assert reason in text


# --- the docs ship the same scripts --------------------------------------------------------


def test_gitops_doc_embeds_the_scripts_unchanged() -> None:
    doc = (REPO_ROOT / "docs" / "gitops.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", doc, re.DOTALL)
    [configmap] = [
        obj
        for block in blocks
        for obj in yaml.safe_load_all(block)
        if isinstance(obj, dict) and obj.get("metadata", {}).get("name") == "argocd-cm"
    ]

    assert configmap["data"] == {
        f"resource.customizations.health.gpuyard.io_{kind}": path.read_text()
        for kind, path in SCRIPTS.items()
    }
