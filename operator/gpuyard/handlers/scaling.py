"""What the operator keeps of each service's autoscaling, and the one place that changes it.

A :class:`ScalingBook` holds one :class:`ServiceScaling` per service: its spec and pool
parsed once per generation, the replica counts of its Deployment, the last decision and
what status shows of it, the state carried to the next decision, and whether that decision
repeats itself. The autoscaler's tick (``handlers.autoscaler``) records its decisions here;
the service reconcile reads the decision it applies, and asks for one at once for a service
in mode Off; a deleted service is forgotten.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from gpuyard.api.names import ServiceKey
from gpuyard.api.pool import GPUPool
from gpuyard.api.service import AIService
from gpuyard.logic.autoscale import (
    Decision,
    MetricSpec,
    ScalingPolicy,
    ScalingState,
    decide,
    repeated_state,
    repeats,
)
from gpuyard.logic.policy import scaling_policy
from gpuyard.logic.promql import GpuSeries


@dataclass(frozen=True)
class Unavailable:
    """Why a metric cannot be read: a CamelCase reason such as ``NoSeries``, ``NaN`` or
    ``PrometheusUnreachable``, which the MetricsAvailable condition shows."""

    reason: str


#: What the tick read for one metric of one service: each ready pod's value (GPU metrics),
#: the service's total (Prometheus metrics), or why there is none.
Read = dict[str, float] | float | Unavailable


@dataclass(frozen=True, kw_only=True)
class ScalingSpec:
    """What the autoscaler needs of a service and its pool."""

    pool_name: str
    #: The pool's DCGM series for GPU utilisation (MIG slices report another one).
    utilization_series: GpuSeries
    policy: ScalingPolicy
    #: The pool's maxGpusPerNamespace (None: no quota).
    namespace_quota: int | None = None


@dataclass(slots=True, kw_only=True)
class Repeating:
    """What a decision that :func:`~gpuyard.logic.autoscale.repeats` was decided from, and
    the last tick at which it held without being decided again (None: none yet)."""

    policy: ScalingPolicy
    reads: Mapping[MetricSpec, Read]
    held_at: datetime | None = None


@dataclass(slots=True, kw_only=True)
class ServiceScaling:
    """Everything the operator keeps of one service's autoscaling."""

    #: The cached AIService and GPUPool bodies ``spec`` was parsed from, and their uids and
    #: generations (None when either lacks one: such objects are parsed on every change).
    body: Mapping[str, Any] | None = None
    pool_body: Mapping[str, Any] | None = None
    stamp: tuple[Any, ...] | None = None
    #: None when the spec does not parse (the service reconcile reports what is wrong).
    spec: ScalingSpec | None = None
    #: The Deployment body the replica counts were read from.
    deployment: Mapping[str, Any] | None = None
    current_replicas: int = 0
    ready_replicas: int = 0
    #: The latest decision, which the service reconcile applies, and what status shows of
    #: it (a change of anything else writes nothing).
    decision: Decision | None = None
    shown: tuple[Any, ...] | None = None
    #: What the autoscaler carries to the service's next decision (None: nothing yet).
    state: ScalingState | None = None
    #: Set while ``decision`` repeats itself: while the service reads the same values under
    #: the same policy and replica counts, deciding again would return the same decision.
    repeating: Repeating | None = None


class ScalingBook:
    """One :class:`ServiceScaling` per service, changed only through these methods."""

    def __init__(self) -> None:
        self._services: dict[ServiceKey, ServiceScaling] = {}
        # One instance per distinct metric declaration: the tick keys its queries, answers
        # and samples by declaration, and equal ones then are the same object.
        self._metric_specs: dict[MetricSpec, MetricSpec] = {}

    # -- for the service reconcile -----------------------------------------------------------

    def decision(self, key: ServiceKey) -> Decision | None:
        """The latest decision for the service, or None before the first one."""
        scaling = self._services.get(key)
        return scaling.decision if scaling is not None else None

    def decide_off(
        self,
        key: ServiceKey,
        *,
        service: AIService,
        pool: GPUPool,
        live: Mapping[str, Any] | None,
        now: datetime,
    ) -> Decision:
        """Decide a service in mode Off that has no decision yet.

        Mode Off needs no metric, so its decision (manual replicas, the budget cap) is known
        at once: the first status write then holds every condition, instead of a second
        write one autoscaler tick later. It is made as if already applied, so that it reads
        as the steady state it leads to ("keep N"), the same after every restart, not as the
        step to it.
        """
        current = service.spec.replicas
        if current is None:
            current = int(live["spec"].get("replicas") or 0) if live else 0
        ready = int(((live or {}).get("status") or {}).get("readyReplicas") or 0)
        state = ScalingState(current_replicas=current, ready_replicas=ready)
        decision = decide({}, state, scaling_policy(service.spec, pool), None, now)
        scaling = self._services.setdefault(key, ServiceScaling())
        scaling.decision, scaling.shown = decision, _visible(decision)
        scaling.repeating = None
        return decision

    def forget(self, key: ServiceKey) -> None:
        """Drop everything kept of a deleted service."""
        self._services.pop(key, None)

    # -- for the autoscaler's tick -----------------------------------------------------------

    def retain(self, keys: Iterable[ServiceKey]) -> None:
        """Forget the services not among ``keys`` (those the caches no longer hold)."""
        for key in self._services.keys() - set(keys):
            del self._services[key]

    def track(
        self, key: ServiceKey, body: Mapping[str, Any], pool_body: Mapping[str, Any]
    ) -> ScalingSpec | None:
        """The service's spec from these bodies, parsed again only when the service or its
        pool has a new uid or generation (the API server moves the generation on every
        spec change); None when it does not parse."""
        scaling = self._services.setdefault(key, ServiceScaling())
        # The caches replace a body on each watch event and never change one in place, so
        # only a new body can hold a new spec.
        if scaling.body is not body or scaling.pool_body is not pool_body:
            stamp = _stamp(body, pool_body)
            if stamp is None or stamp != scaling.stamp:
                scaling.spec = self._parse(body, pool_body)
            scaling.body, scaling.pool_body, scaling.stamp = body, pool_body, stamp
        return scaling.spec

    def state_to_decide(
        self,
        key: ServiceKey,
        *,
        deployment: Mapping[str, Any],
        policy: ScalingPolicy,
        reads: Mapping[MetricSpec, Read],
        now: datetime,
        starting: int = 0,
    ) -> ScalingState | None:
        """The state to decide a tracked service from at ``now``, with the replica counts of
        its ``deployment`` and the number of its pods ``starting`` (bound, not ready, not
        being deleted); None while its last decision repeats itself (nothing to decide), and
        for a service deleted while the tick read its metrics.

        A repeating decision holds while the service reads what it read when the decision
        was made, under the same policy and replica counts. Once it stops holding, the
        carried state is first moved on to the last tick at which it held
        (:func:`~gpuyard.logic.autoscale.repeated_state`), so that the next decision is the
        one that deciding on every tick would have made.
        """
        scaling = self._services.get(key)
        if scaling is None:
            return None
        if deployment is not scaling.deployment:
            scaling.deployment = deployment
            scaling.current_replicas = int(deployment["spec"].get("replicas") or 0)
            scaling.ready_replicas = int((deployment.get("status") or {}).get("readyReplicas") or 0)
        current, ready = scaling.current_replicas, scaling.ready_replicas
        state = scaling.state or ScalingState(current_replicas=current, ready_replicas=ready)
        state = state.observed(current, ready, starting)
        repeating, decision = scaling.repeating, scaling.decision
        if repeating is None or decision is None:
            return state
        if (
            policy is repeating.policy
            and current == decision.current_replicas
            and ready == decision.state.ready_replicas
            and starting == decision.state.starting_replicas
            and reads == repeating.reads
        ):
            repeating.held_at = now
            return None
        scaling.repeating = None
        if repeating.held_at is not None:
            state = repeated_state(state, decision, repeating.policy, repeating.held_at)
        return state

    def record(
        self,
        key: ServiceKey,
        decision: Decision,
        *,
        policy: ScalingPolicy,
        reads: Mapping[MetricSpec, Read],
    ) -> bool:
        """Keep the tick's decision for a tracked service; whether status would show a
        change (the service reconcile then has something to write); False for a service
        deleted meanwhile, which keeps nothing."""
        scaling = self._services.get(key)
        if scaling is None:
            return False
        shown = _visible(decision)
        changed = shown != scaling.shown
        scaling.decision, scaling.shown, scaling.state = decision, shown, decision.state
        scaling.repeating = None
        if repeats(decision, policy):
            scaling.repeating = Repeating(policy=policy, reads=reads)
        return changed

    def _parse(self, body: Mapping[str, Any], pool_body: Mapping[str, Any]) -> ScalingSpec | None:
        try:
            service = AIService.from_mapping(body)
            pool = GPUPool.from_mapping(pool_body)
            policy = scaling_policy(service.spec, pool)
        except (ValidationError, ValueError):
            return None
        metrics = tuple(self._metric_specs.setdefault(spec, spec) for spec in policy.metrics)
        return ScalingSpec(
            pool_name=pool.name,
            utilization_series=GpuSeries(pool.spec.utilization_metric),
            policy=replace(policy, metrics=metrics),
            namespace_quota=pool.spec.max_gpus_per_namespace,
        )


def _stamp(body: Mapping[str, Any], pool_body: Mapping[str, Any]) -> tuple[Any, ...] | None:
    service, pool = body.get("metadata") or {}, pool_body.get("metadata") or {}
    stamp = (service.get("uid"), service.get("generation"), pool.get("uid"), pool.get("generation"))
    return None if None in stamp else stamp


def _visible(decision: Decision) -> tuple[Any, ...]:
    """What status shows of a decision: a change of anything else writes nothing."""
    return (
        decision.desired_replicas,
        decision.recommended_replicas,
        decision.reason,
        decision.limiting_factor,
        decision.metric,
        _tenths(decision.current_value),
        decision.capacity_limited,
        decision.missing_gpus,
        decision.budget_limited,
        decision.quota_limited,
        decision.quota_missing_gpus,
        decision.metrics_available,
        decision.metrics_unavailable_reason,
        # The message is shown by the conditions that are not in their quiet state
        # (MetricsAvailable not True, BudgetLimited, CapacityLimited or QuotaLimited True):
        # there it must stay current, or a restart would find it stale and write it.
        decision.message
        if decision.metrics_available is not True
        or decision.budget_limited
        or decision.capacity_limited
        or decision.quota_limited
        else None,
    )


def _tenths(value: float | None) -> int | None:
    """The value in tenths: a utilisation wobbling by less must not rewrite the status."""
    if value is None:
        return None
    tenths = value * 10
    return round(tenths) if math.isfinite(tenths) else None  # an overflow to inf is None too
