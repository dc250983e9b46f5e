"""AIService reconcile: admission, children by server-side apply, status — in that order.

Level-triggered: the same function runs for a create, an update, a hand edit of a child,
a pool that changed, a restart. It reads everything from the caches, asks the pure core
what should exist, and writes only differences. A service the pool refuses gets
``Accepted=False`` and its children are neither created nor changed.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from gpuyard.api.pool import GPUPool, GPUPoolStatus
from gpuyard.api.service import AIService
from gpuyard.handlers.context import Operator, ServiceKey
from gpuyard.logic.admission import AdmissionResult, check_service
from gpuyard.logic.children import build_deployment, build_service, owner_reference, selector_string
from gpuyard.logic.conditions import (
    accepted_condition,
    apply_conditions,
    capacity_condition,
    ready_condition,
)
from gpuyard.logic.drift import needs_apply, with_applied_hash
from gpuyard.logic.pool_accounting import PoolUsage, compute_pool_usage
from gpuyard.logic.replicas import target_replicas
from gpuyard.logic.status import service_status, status_patch

logger = logging.getLogger(__name__)


async def reconcile_service(op: Operator, key: ServiceKey) -> None:
    namespace, name = key
    body = op.caches.service(key)
    if body is None:
        # Deleted: the garbage collector removes the children through their owner reference.
        op.forget_service(key)
        return
    now = datetime.now(UTC)
    generation = body["metadata"].get("generation")
    current_status: dict[str, Any] = body.get("status") or {}

    try:
        service = AIService.from_mapping(body)
    except ValidationError as error:
        await _refuse(op, key, body, AdmissionResult(False, "InvalidSpec", _explain(error)), now)
        return
    pool_body = op.caches.pool(service.spec.pool)
    pool = None
    if pool_body is not None:
        try:
            pool = GPUPool.from_mapping(pool_body)
        except ValidationError:
            pool = None
    usage = _pool_usage(op, pool) if pool is not None else None
    pool_status = _status_of(usage) if usage is not None else None
    namespace_allocated = (
        usage.namespace_allocated(namespace, excluding_service=name) if usage else 0
    )
    admission = check_service(
        service, pool, pool_status, op.caches.namespace_labels(namespace) or {}, namespace_allocated
    )
    if not admission.accepted or pool is None or usage is None:
        await _refuse(op, key, body, admission, now)
        return
    op.not_accepted.pop(key, None)

    live = op.caches.deployment(key)
    live_replicas = live["spec"].get("replicas") if live else None
    decision = op.decisions.get(key)
    replicas = target_replicas(
        service.spec,
        decided=decision.desired_replicas if decision is not None else None,
        persisted=current_status.get("desiredReplicas"),
        live=live_replicas,
    )
    owner = owner_reference(service)
    deployment = with_applied_hash(build_deployment(service, pool, replicas, owner))
    if needs_apply(deployment, live):
        await op.io(op.kube.apply, deployment)
    network = build_service(service, pool, owner)
    live_network = op.caches.network_service(key)
    if network is not None:
        network = with_applied_hash(network)
        if needs_apply(network, live_network):
            await op.io(op.kube.apply, network)
    elif live_network is not None:
        await op.io(op.kube.delete, "v1", "Service", namespace, name)

    live_status = (live or {}).get("status") or {}
    current_replicas = int(live_status.get("replicas") or 0)
    ready_replicas = int(live_status.get("readyReplicas") or 0)
    placed = usage.allocated_by_service.get(key, 0) // service.spec.gpus_per_replica
    capacity = capacity_condition(
        wanted_replicas=replicas,
        placed_replicas=placed,
        gpus_per_replica=service.spec.gpus_per_replica,
        available_gpus=usage.available,
        pool_name=pool.name,
        resource_name=pool.spec.resource_name,
        fitting_replicas=usage.replicas_that_fit(service.spec.gpus_per_replica),
    )
    ready = ready_condition(
        admission=admission,
        desired_replicas=replicas,
        ready_replicas=ready_replicas,
        current_replicas=current_replicas,
        updated_replicas=int(live_status.get("updatedReplicas") or 0),
        capacity=capacity,
    )
    conditions = apply_conditions(
        current_status.get("conditions"),
        [accepted_condition(admission), capacity, ready],
        generation,
        now,
    )
    desired_status = service_status(
        observed_generation=generation,
        replicas=current_replicas,
        ready_replicas=ready_replicas,
        desired_replicas=replicas,
        selector=selector_string(service),
        gpu_type=pool.spec.gpu_type,
        conditions=conditions,
    )
    await _write_status(op, key, current_status, desired_status)


async def _refuse(
    op: Operator, key: ServiceKey, body: dict[str, Any], admission: AdmissionResult, now: datetime
) -> None:
    """Say why in the status; create and change nothing else."""
    if op.not_accepted.get(key) != admission.reason:
        logger.warning(
            "AIService %s/%s not accepted: %s: %s", *key, admission.reason, admission.message
        )
    op.not_accepted[key] = admission.reason
    current_status: dict[str, Any] = body.get("status") or {}
    generation = body["metadata"].get("generation")
    conditions = apply_conditions(
        current_status.get("conditions"),
        [
            accepted_condition(admission),
            ready_condition(
                admission=admission,
                desired_replicas=0,
                ready_replicas=0,
                current_replicas=0,
                updated_replicas=0,
            ),
        ],
        generation,
        now,
    )
    desired = service_status(observed_generation=generation, conditions=conditions)
    await _write_status(op, key, current_status, desired)


async def _write_status(
    op: Operator, key: ServiceKey, current: dict[str, Any], desired: dict[str, Any]
) -> None:
    patch = status_patch(current, desired)
    if patch:
        await op.io(op.kube.patch_status, "aiservices", key[0], key[1], patch)


def _pool_usage(op: Operator, pool: GPUPool) -> PoolUsage:
    # The pool reconcile keeps this current on every node or pod event; computing it here
    # only covers a service reconciled before its pool's first reconcile.
    usage = op.pool_usage.get(pool.name)
    if usage is None:
        usage = compute_pool_usage(pool, op.caches.all_nodes(), op.caches.all_gpu_pods())
        op.pool_usage[pool.name] = usage
    return usage


def _status_of(usage: PoolUsage) -> GPUPoolStatus:
    return GPUPoolStatus(
        nodes=usage.nodes,
        ready_nodes=usage.ready_nodes,
        capacity=usage.capacity,
        allocated=usage.allocated,
        available=usage.available,
        largest_node_gpus=usage.largest_node_gpus,
    )


def _explain(error: ValidationError) -> str:
    parts = []
    for item in error.errors()[:3]:
        where = ".".join(str(part) for part in item["loc"])
        parts.append(f"{where}: {item['msg']}")
    return "spec is invalid: " + "; ".join(parts)
