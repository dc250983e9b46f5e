"""The namespace quota of a pool, read from the caches for one service's reconcile.

The rules are pure (``logic.quota``); this module only gathers what they need: the
namespace's other services on the pool, what each holds now (its Deployment's replicas or
its pods, whichever is more) and what each wants (``Operator.quota_wants``, written by
their own reconciles), and the GPUs of the namespace's pods that no AIService owns.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gpuyard.api.names import ServiceKey
from gpuyard.handlers.context import Operator
from gpuyard.logic.pool_accounting import PoolUsage
from gpuyard.logic.quota import QuotaClaim, QuotaVerdict, quota_verdict


@dataclass(frozen=True, kw_only=True)
class NamespaceOnPool:
    """A service's namespace on its pool: the claims of its services and other pods."""

    key: ServiceKey
    #: The service's own GPUs held now, and its siblings' claims.
    held_gpus: int
    siblings: list[QuotaClaim]
    unmanaged_gpus: int
    #: GPUs the other services are sure to keep: each one's minReplicas, or less if it
    #: holds less (what admission checks a new minReplicas against).
    siblings_minimum_gpus: int

    @property
    def admission_gpus(self) -> int:
        """The GPUs that admission counts against a new service's minReplicas."""
        return self.unmanaged_gpus + self.siblings_minimum_gpus

    def verdict(
        self, quota: int | None, *, gpus_per_replica: int, wanted_replicas: int
    ) -> QuotaVerdict:
        """What the quota lets the service run when it wants ``wanted_replicas``."""
        own = QuotaClaim(
            key=_name(self.key),
            gpus_per_replica=gpus_per_replica,
            wanted_replicas=wanted_replicas,
            held_gpus=self.held_gpus,
        )
        return quota_verdict(
            quota, key=own.key, claims=[own, *self.siblings], unmanaged_gpus=self.unmanaged_gpus
        )


def namespace_on_pool(
    op: Operator,
    key: ServiceKey,
    *,
    pool_name: str,
    usage: PoolUsage,
    gpus_per_replica: int,
) -> NamespaceOnPool:
    namespace = key[0]
    siblings = []
    minimum = 0
    for sibling in op.caches.services_of_pool(pool_name):
        body = op.caches.service(sibling)
        if sibling == key or sibling[0] != namespace or body is None:
            continue
        spec: Mapping[str, Any] = body.get("spec") or {}
        gpus = _count(spec.get("gpusPerReplica"), 1) or 1
        held = _held(op, usage, sibling, gpus)
        wanted = op.quota_wants.get(sibling)
        if wanted is None:  # not reconciled since the start: what it runs
            wanted = held // gpus
        siblings.append(
            QuotaClaim(
                key=_name(sibling), gpus_per_replica=gpus, wanted_replicas=wanted, held_gpus=held
            )
        )
        if sibling not in op.not_accepted:
            minimum += min(held, _count(spec.get("minReplicas"), 1) * gpus)
    managed = sum(gpus for (ns, _), gpus in usage.allocated_by_service.items() if ns == namespace)
    unmanaged = max(0, usage.allocated_by_namespace.get(namespace, 0) - managed)
    return NamespaceOnPool(
        key=key,
        held_gpus=_held(op, usage, key, gpus_per_replica),
        siblings=siblings,
        unmanaged_gpus=unmanaged,
        siblings_minimum_gpus=minimum,
    )


def _held(op: Operator, usage: PoolUsage, key: ServiceKey, gpus_per_replica: int) -> int:
    deployment = op.caches.deployment(key)
    replicas = _count((deployment or {}).get("spec", {}).get("replicas"), 0)
    return max(replicas * gpus_per_replica, usage.allocated_by_service.get(key, 0))


def _count(value: Any, default: int) -> int:
    return value if isinstance(value, int) and value >= 0 else default


def _name(key: ServiceKey) -> str:
    return f"{key[0]}/{key[1]}"
