"""GPUPool reconcile: status from the cached Nodes and Pods, written only when it changes."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from pydantic import ValidationError

from gpuyard.api.pool import GPUPool
from gpuyard.handlers.context import Operator
from gpuyard.logic.conditions import find_condition
from gpuyard.logic.pool_accounting import compute_pool_usage
from gpuyard.logic.status import pool_status, status_patch

logger = logging.getLogger(__name__)


async def reconcile_pool(op: Operator, name: str) -> None:
    body = op.caches.pool(name)
    if body is None:
        op.forget_pool(name)
        return
    try:
        pool = GPUPool.from_mapping(body)
    except ValidationError as error:
        # Admission validates with the same rules; this is a pool stored before a
        # stricter version of gpuyard, and it must not stop the others.
        logger.error("GPUPool %s does not validate, skipped: %s", name, error)
        return
    usage = compute_pool_usage(pool, op.caches.all_nodes(), op.caches.all_gpu_pods(), op.caches)
    previous_usage = op.pool_usage.get(name)
    op.pool_usage[name] = usage
    current = body.get("status") or {}
    desired = pool_status(
        usage,
        previous=current,
        observed_generation=body["metadata"].get("generation"),
        resource_name=pool.spec.resource_name,
        now=datetime.now(UTC),
    )
    patch = status_patch(current, desired)
    if patch:
        await op.io(op.kube.patch_status, "gpupools", None, name, patch)
    for state in ("capacity", "allocated", "available"):
        op.metrics.pool_gpus.labels(pool=name, gpu_type=pool.spec.gpu_type, state=state).set(
            getattr(usage, state)
        )
    if previous_usage is None or previous_usage.available != usage.available:
        # Freed or taken GPUs change only the services that wait for GPUs or hold a
        # CapacityLimited or QuotaLimited verdict; every other service of the pool is unaffected.
        for key in op.caches.services_of_pool(name):
            service = op.caches.service(key)
            status = (service or {}).get("status") or {}
            conditions = status.get("conditions")
            waiting = (status.get("readyReplicas") or 0) < (status.get("desiredReplicas") or 0)
            # A service the namespace quota cuts may grow into GPUs its siblings just freed.
            limited = any(
                (find_condition(conditions, kind) or {}).get("status") == "True"
                for kind in ("CapacityLimited", "QuotaLimited")
            )
            if waiting or limited:
                op.service_queue.add(key)
