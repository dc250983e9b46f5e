"""Whether an AIService may run, for the reasons OpenAPI and CEL cannot see.

The CRD already refuses a malformed spec. What it cannot know needs other objects: whether
the pool exists, admits the namespace, has a node big enough for one replica, and whether
the namespace's quota can hold even `minReplicas`. The answer becomes the `Accepted`
condition; every refusal says what to change.

A budget too small for `minReplicas` is deliberately *not* a refusal: the autoscaler lets the
budget win and reports `BudgetLimited` (docs/autoscaling.md), so the service keeps running
within what its owner agreed to pay.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from gpuyard.api.pool import GPUPool, GPUPoolStatus
from gpuyard.api.service import AIService
from gpuyard.logic.pool_accounting import namespace_matches, pool_unit

ACCEPTED = "Accepted"
POOL_NOT_FOUND = "PoolNotFound"
NAMESPACE_NOT_ALLOWED = "NamespaceNotAllowed"
GPUS_PER_REPLICA_EXCEED_NODE = "GpusPerReplicaExceedNode"
QUOTA_EXCEEDED = "QuotaExceeded"
PRIORITY_CLASS_NOT_ALLOWED = "PriorityClassNotAllowed"


@dataclass(frozen=True)
class AdmissionResult:
    """The verdict: a CamelCase reason and a message a person can act on."""

    accepted: bool
    reason: str
    message: str


def _refuse(reason: str, message: str) -> AdmissionResult:
    return AdmissionResult(accepted=False, reason=reason, message=message)


def check_service(
    service: AIService,
    pool: GPUPool | None,
    pool_status: GPUPoolStatus | None,
    namespace_labels: Mapping[str, str],
    namespace_allocated: int,
) -> AdmissionResult:
    """Check `service` against its pool.

    `pool` is None when the GPUPool named in spec.pool does not exist; `pool_status` is None
    until the pool has been observed once. `namespace_allocated` counts the GPUs of the pool
    that the service's namespace holds *without this service's own pods* (see
    `PoolUsage.namespace_allocated(..., excluding_service=...)`).
    """
    spec = service.spec
    if pool is None:
        return _refuse(
            POOL_NOT_FOUND,
            f'GPUPool "{spec.pool}" does not exist: set spec.pool to one of the pools that '
            "`kubectl get gpupools` lists, or ask the cluster administrator to create it",
        )
    if not namespace_matches(pool.spec.namespace_selector, namespace_labels):
        return _refuse(
            NAMESPACE_NOT_ALLOWED,
            f'GPUPool "{pool.name}" does not admit namespace "{service.namespace}": the '
            "namespace's labels do not match the pool's namespaceSelector; ask the cluster "
            "administrator to label the namespace, or choose another pool",
        )
    allowed_classes = pool.spec.priority_class_names or ()
    if spec.priority_class_name is not None and spec.priority_class_name not in allowed_classes:
        offered = ", ".join(allowed_classes) if allowed_classes else "none"
        return _refuse(
            PRIORITY_CLASS_NOT_ALLOWED,
            f'GPUPool "{pool.name}" does not offer PriorityClass "{spec.priority_class_name}" '
            f"(it offers {offered}): a priority may preempt other teams' replicas on the "
            "pool, so only the pool's spec.priorityClassNames may be used; remove "
            "spec.priorityClassName or ask the cluster administrator to list it",
        )
    gpus = spec.gpus_per_replica
    resource = pool_unit(pool)
    largest = pool_status.largest_node_gpus if pool_status is not None else None
    ready_nodes = pool_status.ready_nodes if pool_status is not None else None
    # With no ready node at all the pool is down, not too small: CapacityLimited says so,
    # and the spec stays accepted.
    if largest is not None and ready_nodes and gpus > largest:
        return _refuse(
            GPUS_PER_REPLICA_EXCEED_NODE,
            f"each replica requests {gpus} {resource} but the largest ready node of GPUPool "
            f'"{pool.name}" has {largest}: lower spec.gpusPerReplica to {largest} or less, or '
            "choose a pool with bigger nodes",
        )
    quota = pool.spec.max_gpus_per_namespace
    needed = spec.min_replicas * gpus
    if quota is not None and namespace_allocated + needed > quota:
        return _refuse(
            QUOTA_EXCEEDED,
            f"minReplicas {spec.min_replicas} x {gpus} {resource} needs {needed}, but "
            f'namespace "{service.namespace}" may hold {quota} of GPUPool "{pool.name}" and '
            f"other workloads there already hold {namespace_allocated}: lower minReplicas or "
            "gpusPerReplica, or free GPUs in the namespace",
        )
    return AdmissionResult(
        accepted=True,
        reason=ACCEPTED,
        message=f'runs on GPUPool "{pool.name}" ({pool.spec.gpu_type}, {resource})',
    )
