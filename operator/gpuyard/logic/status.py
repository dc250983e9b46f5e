"""Status documents of both kinds, and the patch that brings a stored status up to date.

Statuses are assembled through the status models, so a field the CRD would prune or refuse
fails here, in a unit test, instead of vanishing on the way to the API server. The patch
holds only the top-level fields that differ: an empty patch means the handler writes
nothing, which keeps a second reconcile with nothing changed free of write calls.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from gpuyard.api.common import Condition
from gpuyard.api.formats import format_time
from gpuyard.api.pool import GPUPoolStatus
from gpuyard.api.service import (
    AIServiceStatus,
    RecommendationStatus,
    StartupStatus,
    UsageTotals,
)
from gpuyard.logic.conditions import apply_conditions, pool_kstatus_conditions, pool_ready_condition
from gpuyard.logic.pool_accounting import PoolUsage


def pool_status(
    usage: PoolUsage,
    *,
    previous: Mapping[str, Any] | None,
    observed_generation: int | None,
    resource_name: str,
    now: datetime,
) -> dict[str, Any]:
    """The GPUPool status for `usage`, its Ready condition (and kstatus's Reconciling and
    Stalled) merged into `previous`'s."""
    previous_conditions = (previous or {}).get("conditions")
    ready = pool_ready_condition(usage, resource_name=resource_name)
    conditions = apply_conditions(
        previous_conditions,
        [ready, *pool_kstatus_conditions(ready)],
        observed_generation,
        now,
    )
    return pool_usage_status(
        usage, observed_generation=observed_generation, conditions=_condition_models(conditions)
    ).to_json()


def pool_usage_status(
    usage: PoolUsage,
    *,
    observed_generation: int | None = None,
    conditions: list[Condition] | None = None,
) -> GPUPoolStatus:
    """A GPUPool status holding `usage`'s counts (all that admission reads of it)."""
    return GPUPoolStatus(
        observed_generation=observed_generation,
        nodes=usage.nodes,
        ready_nodes=usage.ready_nodes,
        capacity=usage.capacity,
        allocated=usage.allocated,
        available=usage.available,
        largest_node_gpus=usage.largest_node_gpus,
        conditions=conditions,
    )


def service_status(
    *,
    observed_generation: int | None = None,
    replicas: int | None = None,
    ready_replicas: int | None = None,
    desired_replicas: int | None = None,
    selector: str | None = None,
    gpu_type: str | None = None,
    recommendation: RecommendationStatus | None = None,
    last_scale_time: datetime | None = None,
    usage: UsageTotals | None = None,
    conditions: Sequence[Mapping[str, Any]] | None = None,
    startup: StartupStatus | None = None,
) -> dict[str, Any]:
    """The AIService status fields a writer owns, as Kubernetes JSON.

    Several loops write parts of this status (reconcile, autoscaler, metering); each passes
    only its own fields, and `status_patch` leaves the others alone.
    """
    return AIServiceStatus(
        observed_generation=observed_generation,
        replicas=replicas,
        ready_replicas=ready_replicas,
        desired_replicas=desired_replicas,
        selector=selector,
        gpu_type=gpu_type,
        recommendation=recommendation,
        last_scale_time=(
            None if last_scale_time is None else format_time(last_scale_time, whole_seconds=True)
        ),
        usage=usage,
        conditions=_condition_models(conditions),
        startup=startup,
    ).to_json()


def _condition_models(conditions: Sequence[Mapping[str, Any]] | None) -> list[Condition] | None:
    if conditions is None:
        return None
    return [Condition.model_validate(condition) for condition in conditions]


def status_patch(current: Mapping[str, Any] | None, desired: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON merge patch for the status subresource: the top-level fields of `desired` whose
    values differ from `current`. Fields `desired` does not mention are left alone.

    Whole top-level values are sent, never a nested diff: a merge patch replaces lists, so
    `conditions` must always travel complete.
    """
    existing = current or {}
    return {
        key: _merge_value(existing.get(key), value)
        for key, value in desired.items()
        if existing.get(key) != value
    }


def apply_merge_patch(
    current: Mapping[str, Any] | None, patch: Mapping[str, Any]
) -> dict[str, Any]:
    """What the API server stores after the JSON merge patch ``patch`` (RFC 7386)."""
    result = dict(current or {})
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        elif isinstance(value, Mapping):
            base = result.get(key)
            result[key] = apply_merge_patch(base if isinstance(base, Mapping) else {}, value)
        else:
            result[key] = value
    return result


def _merge_value(current: Any, desired: Any) -> Any:
    """``desired`` as a merge-patch value over ``current``: a merge patch merges nested
    objects, so a key that ``desired`` no longer has must be sent as null, or the stored
    object keeps it (a stale ``recommendation.limitedBy``, say)."""
    if not isinstance(current, Mapping) or not isinstance(desired, Mapping):
        return desired
    merged = {key: _merge_value(current.get(key), value) for key, value in desired.items()}
    merged.update({key: None for key in current if key not in desired})
    return merged
