"""Scaling decisions: from metric samples to a desired replica count, one service at a time.

Pure: the caller passes the samples of this tick, the state carried from the previous tick,
the pool capacity share and ``now``; :func:`decide` returns a :class:`Decision` holding the
state to carry on. The stages, in order: per-metric proposals (HPA's proportional rule with a
tolerance), idle scale-to-zero or wake-from-zero, the metrics-unavailable policy,
stabilisation windows, rate limits, the wait for replicas in the middle of their start,
min/max, budget, pool capacity. docs/autoscaling.md is the long form, with the defaults
and a worked example.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from decimal import Decimal
from enum import StrEnum
from functools import cached_property
from typing import NamedTuple, TypeVar

from gpuyard.api.reasons import LimitingFactor, Reason
from gpuyard.logic.promql import Aggregation, validate_tenant_selector

__all__ = [
    "DEFAULT_MAX_SAMPLE_AGE",
    "DEFAULT_SCALE_DOWN",
    "DEFAULT_SCALE_UP",
    "IDLE_GPU_UTILIZATION_PERCENT",
    "Decision",
    "MetricReading",
    "MetricSample",
    "MetricSpec",
    "MetricType",
    "Mode",
    "PoolRequest",
    "PrometheusMetric",
    "ReadingStatus",
    "Recommendation",
    "ScaleEvent",
    "ScalingBehavior",
    "ScalingPolicy",
    "ScalingState",
    "UnavailablePolicy",
    "budget_max_replicas",
    "decide",
    "repeated_state",
    "repeats",
    "share_pool_capacity",
]

# A pod whose GPUs average less than this shows no demand. Idle inference servers read 0 %;
# the margin absorbs a stray kernel without keeping an idle service awake.
IDLE_GPU_UTILIZATION_PERCENT = 1.0

# A sample older than this is stale: two dcgm-exporter collection periods.
DEFAULT_MAX_SAMPLE_AGE = timedelta(seconds=60)

# Float ratios such as 0.07 / 0.01 = 7.000000000000001 must not add a replica, and a ratio of
# exactly 1 + tolerance must count as inside it: compare and round with this slack.
_EPSILON = 1e-9

# A proposal above any possible maxReplicas (1000 in the schema); it also keeps an
# enormous metric value from reaching math.ceil as infinity.
_REPLICA_CEILING = 1_000_000


class Mode(StrEnum):
    AUTO = "Auto"
    RECOMMEND = "Recommend"
    OFF = "Off"


class MetricType(StrEnum):
    GPU_UTILIZATION = "GPUUtilization"
    GPU_MEMORY = "GPUMemory"
    PROMETHEUS = "Prometheus"


class UnavailablePolicy(StrEnum):
    HOLD = "Hold"
    SCALE_UP_ONLY = "ScaleUpOnly"
    FALLBACK = "Fallback"


class ReadingStatus(StrEnum):
    OK = "Ok"
    UNAVAILABLE = "Unavailable"
    # Pods exist but none is ready: a model still loading has no meaningful GPU reading.
    PODS_NOT_READY = "PodsNotReady"
    # Zero replicas: a per-pod GPU metric has nothing to read and cannot show demand.
    NO_PODS = "NoPods"


@dataclass(frozen=True)
class PrometheusMetric:
    """``autoscaling.metrics[].prometheus``. Targets are floats: metric values are floats."""

    metric: str
    target_per_replica: float
    labels: tuple[tuple[str, str], ...] = ()
    aggregation: Aggregation = Aggregation.SUM
    activation_value: float = 0.0

    def __post_init__(self) -> None:
        names = [name for name, _ in self.labels]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate label matcher in {names}")
        # Sorted, so that specs equal as maps are equal (and hash equal) as dataclasses.
        object.__setattr__(self, "labels", tuple(sorted(self.labels)))
        validate_tenant_selector(self.metric, dict(self.labels))
        if not (math.isfinite(self.target_per_replica) and self.target_per_replica > 0):
            raise ValueError("targetPerReplica must be a positive finite number")
        if not (math.isfinite(self.activation_value) and self.activation_value >= 0):
            raise ValueError("activationValue must be a non-negative finite number")

    @property
    def label_map(self) -> dict[str, str]:
        return dict(self.labels)


@dataclass(frozen=True)
class MetricSpec:
    """One entry of ``autoscaling.metrics``."""

    type: MetricType
    target_percent: int | None = None
    prometheus: PrometheusMetric | None = None

    def __post_init__(self) -> None:
        if self.type is MetricType.PROMETHEUS:
            if self.prometheus is None or self.target_percent is not None:
                raise ValueError("a Prometheus metric takes `prometheus` and no targetPercent")
        elif self.target_percent is None or not 1 <= self.target_percent <= 100:
            raise ValueError(f"{self.type} needs targetPercent 1..100")
        elif self.prometheus is not None:
            raise ValueError(f"{self.type} takes no `prometheus` block")

    @cached_property
    def name(self) -> str:
        """How status and Events name the metric."""
        if self.prometheus is None:
            return self.type.value
        labels = ",".join(f"{k}={v!r}" for k, v in self.prometheus.labels)
        return self.prometheus.metric + (f"{{{labels}}}" if labels else "")

    @cached_property
    def target(self) -> float:
        if self.prometheus is not None:
            return self.prometheus.target_per_replica
        return float(self.target_percent or 0)


@dataclass(frozen=True, kw_only=True)
class ScalingBehavior:
    """``autoscaling.scaleUp`` / ``scaleDown``.

    Per ``period_seconds`` the count may move by the larger of ``max_step_percent`` of the
    count at the start of the period and ``max_step_replicas`` (HPA's ``selectPolicy: Max``);
    both 0 disables the direction.
    """

    stabilization_window_seconds: int
    max_step_percent: int = 100
    max_step_replicas: int = 4
    period_seconds: int = 15

    def __post_init__(self) -> None:
        if min(self.stabilization_window_seconds, self.max_step_percent) < 0:
            raise ValueError("windows and steps cannot be negative")
        if self.max_step_replicas < 0 or self.period_seconds < 1:
            raise ValueError("maxStepReplicas >= 0 and periodSeconds >= 1 are required")

    @cached_property
    def window(self) -> timedelta:
        return timedelta(seconds=self.stabilization_window_seconds)

    @cached_property
    def period(self) -> timedelta:
        return timedelta(seconds=self.period_seconds)


DEFAULT_SCALE_UP = ScalingBehavior(stabilization_window_seconds=0)
DEFAULT_SCALE_DOWN = ScalingBehavior(stabilization_window_seconds=300)


@dataclass(frozen=True, kw_only=True)
class ScalingPolicy:
    """An AIService's scaling fields, one to one with the API (docs/api.md).

    ``manual_replicas`` is ``spec.replicas`` (mode Off); ``price_per_gpu_hour`` comes from
    the pool; ``max_cost_per_hour`` is ``budget.maxCostPerHour``.
    """

    min_replicas: int = 1
    max_replicas: int = 1
    manual_replicas: int | None = None
    mode: Mode = Mode.AUTO
    tolerance_percent: int = 10
    metrics: tuple[MetricSpec, ...] = ()
    scale_up: ScalingBehavior = DEFAULT_SCALE_UP
    scale_down: ScalingBehavior = DEFAULT_SCALE_DOWN
    scale_to_zero_after_seconds: int = 300
    on_metrics_unavailable: UnavailablePolicy = UnavailablePolicy.HOLD
    fallback_replicas: int | None = None
    gpus_per_replica: int = 1
    price_per_gpu_hour: Decimal = Decimal(0)
    max_cost_per_hour: Decimal | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
            raise ValueError("0 <= minReplicas <= maxReplicas and maxReplicas >= 1 required")
        if self.manual_replicas is not None and self.manual_replicas < 0:
            raise ValueError("replicas cannot be negative")
        if not 0 <= self.tolerance_percent <= 100:
            raise ValueError("tolerancePercent must be 0..100")
        if len(set(self.metrics)) != len(self.metrics):
            raise ValueError("the same metric is listed twice")
        if self.scale_to_zero_after_seconds < 0 or self.gpus_per_replica < 1:
            raise ValueError("scaleToZeroAfterSeconds >= 0 and gpusPerReplica >= 1 required")
        fallback = self.on_metrics_unavailable is UnavailablePolicy.FALLBACK
        if fallback != (self.fallback_replicas is not None):
            raise ValueError("fallbackReplicas is required with Fallback and only with it")
        if self.fallback_replicas is not None and self.fallback_replicas < 0:
            raise ValueError("fallbackReplicas cannot be negative")
        for amount in (self.price_per_gpu_hour, self.max_cost_per_hour):
            if amount is not None and not (amount.is_finite() and amount >= 0):
                raise ValueError("prices and budgets must be finite and non-negative")

    @cached_property
    def history_span(self) -> timedelta:
        """How long a recommendation can matter: the longer stabilisation window."""
        return max(self.scale_up.window, self.scale_down.window)

    @cached_property
    def events_span(self) -> timedelta:
        """How long a scale event can matter: the longer rate-limit period."""
        return max(self.scale_up.period, self.scale_down.period)

    @cached_property
    def metric_set(self) -> frozenset[MetricSpec]:
        """``metrics`` as a set, for membership tests."""
        return frozenset(self.metrics)

    @cached_property
    def prometheus_metrics(self) -> tuple[MetricSpec, ...]:
        """The request-level metrics: each distinct one is one query per tick."""
        return tuple(spec for spec in self.metrics if spec.prometheus is not None)


# The values a decision is made of (MetricSample, ScalingState, MetricReading, Decision) are
# not frozen, unlike the policy types: a frozen dataclass costs several times as much to
# build, and a tick builds these for every service it decides. Nothing changes them once
# built.
@dataclass(slots=True, kw_only=True)
class MetricSample:
    """What the tick read for one metric of one service. Build with the class methods.

    GPU metrics carry ``pod_values``: each *ready* pod's average over its GPUs, in percent.
    Pods still starting are left out, and :func:`decide` treats every pod it lacks a value
    for conservatively (see :func:`decide`). Prometheus metrics carry the service's
    ``total``. A failed query, or a series the caller could not map, is ``unavailable``
    with a CamelCase reason.
    """

    pod_values: Mapping[str, float] | None = None
    total: float | None = None
    unavailable_reason: str | None = None
    observed_at: datetime | None = None

    def __post_init__(self) -> None:
        kinds = (
            (self.pod_values is not None)
            + (self.total is not None)
            + (self.unavailable_reason is not None)
        )
        if kinds != 1:
            raise ValueError("a sample is per-pod values, a total, or unavailable")
        if self.unavailable_reason is None and self.observed_at is None:
            raise ValueError("an available sample needs observed_at")

    @classmethod
    def per_pod(cls, values: Mapping[str, float], observed_at: datetime) -> MetricSample:
        return cls(pod_values=dict(values), observed_at=observed_at)

    @classmethod
    def service_total(cls, value: float, observed_at: datetime) -> MetricSample:
        return cls(total=value, observed_at=observed_at)

    @classmethod
    def unavailable(cls, reason: str) -> MetricSample:
        return cls(unavailable_reason=reason)


class Recommendation(NamedTuple):
    time: datetime
    replicas: int


class ScaleEvent(NamedTuple):
    time: datetime
    from_replicas: int
    to_replicas: int


@dataclass(slots=True, kw_only=True)
class ScalingState:
    """What one tick hands to the next. Refresh ``current_replicas``, ``ready_replicas`` and
    ``starting_replicas`` from the Deployment and its pods before each call
    (:meth:`observed`).

    ``starting_replicas`` counts the pods in the middle of their start: bound to a node (so
    holding their GPUs), not ready yet, not being deleted. They are capacity on its way: a
    scale-down or a scale to zero waits for them (see :func:`decide`).
    """

    current_replicas: int
    ready_replicas: int
    starting_replicas: int = 0
    recommendations: tuple[Recommendation, ...] = ()
    scale_events: tuple[ScaleEvent, ...] = ()
    last_demand_time: datetime | None = None
    last_scale_time: datetime | None = None

    def __post_init__(self) -> None:
        if min(self.current_replicas, self.ready_replicas, self.starting_replicas) < 0:
            raise ValueError("replica counts cannot be negative")

    def observed(
        self, current_replicas: int, ready_replicas: int, starting_replicas: int = 0
    ) -> ScalingState:
        if (
            current_replicas == self.current_replicas
            and ready_replicas == self.ready_replicas
            and starting_replicas == self.starting_replicas
        ):
            return self
        return replace(
            self,
            current_replicas=current_replicas,
            ready_replicas=ready_replicas,
            starting_replicas=starting_replicas,
        )


@dataclass(slots=True, kw_only=True)
class MetricReading:
    """How :func:`decide` judged one metric. ``value``: mean percent over the reporting pods
    (GPU) or the service total (Prometheus); ``replicas``: what this metric alone asks for."""

    metric: str
    type: MetricType
    status: ReadingStatus
    target: float
    value: float | None = None
    replicas: int | None = None
    # True/False: shows demand or not; None: this metric says nothing about demand.
    demand: bool | None = None
    reason: str | None = None


@dataclass(slots=True, kw_only=True)
class Decision:
    desired_replicas: int
    # After the metrics-unavailable policy, before windows, rate limits and caps.
    recommended_replicas: int
    current_replicas: int
    mode: Mode
    reason: Reason
    limiting_factor: LimitingFactor | None
    metric: str | None
    current_value: float | None
    target_value: float | None
    capacity_limited: bool
    # GPUs the pool lacks for what the policy wanted (before the budget), when capacity binds.
    missing_gpus: int
    budget_limited: bool
    # None in mode Off: no metric was consulted (condition status Unknown).
    metrics_available: bool | None
    metrics_unavailable_reason: str | None
    #: What drove the recommendation, in words; None when it is the deciding metric against
    #: its target (:attr:`message` words that).
    why: str | None
    readings: tuple[MetricReading, ...]
    state: ScalingState
    #: Whether the namespace's quota on the pool cut the count, and the GPUs it lacks.
    quota_limited: bool = False
    quota_missing_gpus: int = 0
    #: The count before the quota cut: the service's claim in its namespace's fair shares.
    quota_wanted_replicas: int | None = None

    @property
    def apply(self) -> bool:
        """Whether the caller should set the Deployment's replicas to ``desired_replicas``."""
        return self.mode is not Mode.RECOMMEND and self.desired_replicas != self.current_replicas

    @property
    def message(self) -> str:
        """The decision in words, for conditions and Events."""
        why = self.why
        if why is None:
            why = f"{self.metric} is {self.current_value:g} for a target of {self.target_value:g}"
        parts = [why]
        if self.limiting_factor is not None:
            parts.append(f"limited by {self.limiting_factor.value}")
        if self.capacity_limited:
            parts.append(f"the pool lacks {self.missing_gpus} GPU(s)")
        if self.budget_limited:
            parts.append("the budget caps the replicas")
        if self.quota_limited:
            parts.append(f"the namespace quota lacks {self.quota_missing_gpus} GPU(s)")
        desired, current = self.desired_replicas, self.current_replicas
        verb = "keep" if desired == current else f"scale from {current} to"
        return f"{'; '.join(parts)}: {verb} {desired} replica(s)"


def _ceil(value: float) -> int:
    if value >= _REPLICA_CEILING:
        return _REPLICA_CEILING
    return max(0, math.ceil(round(value, 9)))


def _within(ratio: float, tolerance: float) -> bool:
    return abs(ratio - 1.0) <= tolerance + _EPSILON


def _unavailable(spec: MetricSpec, reason: str, demand: bool | None = True) -> MetricReading:
    # An unreadable metric may hide demand, so it keeps the idle clock from running.
    return MetricReading(
        metric=spec.name,
        type=spec.type,
        status=ReadingStatus.UNAVAILABLE,
        target=spec.target,
        demand=demand,
        reason=reason,
    )


def _read_gpu(
    spec: MetricSpec, values: Mapping[str, float], state: ScalingState, tolerance: float
) -> MetricReading:
    target = spec.target
    # A negative or non-finite per-pod value (NaN fails both comparisons) is a broken
    # series: that pod counts as missing.
    total, reporting, peak = 0.0, 0, 0.0
    for value in values.values():
        if 0.0 <= value < math.inf:
            total += value
            reporting += 1
            peak = max(peak, value)
    if not reporting:
        if state.ready_replicas == 0:
            return MetricReading(
                metric=spec.name,
                type=spec.type,
                status=ReadingStatus.PODS_NOT_READY,
                target=target,
                demand=True,
            )
        return _unavailable(spec, "NoValidSeries" if values else "NoSeries")
    current = state.current_replicas
    mean = total / reporting
    ratio = mean / target
    # HPA's rule for pods without a value (starting, unready, or not scraped): assume they
    # run at the target when the others ask to scale down and idle when they ask to scale up,
    # then drop any move that this reverses or brings within the tolerance.
    missing = max(0, current - reporting)
    pods = reporting + missing
    # At exactly the target, filling at target keeps the ratio at 1: no move either way.
    filled_total = total + target * missing if ratio <= 1 else total
    filled = filled_total / (pods * target)
    if _within(filled, tolerance) or (ratio > 1) != (filled > 1):
        replicas = current
    else:
        replicas = _ceil(filled * pods)
        replicas = min(replicas, current) if filled < 1 else max(replicas, current)
    demand: bool | None = None
    if spec.type is MetricType.GPU_UTILIZATION:
        demand = missing > 0 or peak >= IDLE_GPU_UTILIZATION_PERCENT
    # GPU memory stays high while a loaded model idles: it is no demand signal either way.
    return MetricReading(
        metric=spec.name,
        type=spec.type,
        status=ReadingStatus.OK,
        target=target,
        value=mean,
        replicas=replicas,
        demand=demand,
    )


def _read_prometheus(
    spec: MetricSpec, metric: PrometheusMetric, total: float, current: int, tolerance: float
) -> MetricReading:
    if not math.isfinite(total):
        return _unavailable(spec, "NotFinite")
    if total < 0:
        # Queue lengths, in-flight requests and rates cannot be negative.
        return _unavailable(spec, "NegativeValue")
    target = metric.target_per_replica
    demand = total > metric.activation_value
    if current == 0:
        replicas = max(1, _ceil(total / target)) if demand else 0
    elif _within(total / (target * current), tolerance):
        replicas = current
    else:
        replicas = _ceil(total / target)
    return MetricReading(
        metric=spec.name,
        type=spec.type,
        status=ReadingStatus.OK,
        target=target,
        value=total,
        replicas=replicas,
        demand=demand,
    )


def _read(
    spec: MetricSpec,
    sample: MetricSample | None,
    state: ScalingState,
    *,
    tolerance: float,
    now: datetime,
    max_age: timedelta,
) -> MetricReading:
    gpu = spec.prometheus is None
    problem = "NoSample" if sample is None else sample.unavailable_reason
    if sample is not None and problem is None and gpu != (sample.pod_values is not None):
        raise ValueError(f"{spec.name}: sample kind does not match the metric type")
    if gpu and state.current_replicas == 0 and (sample is None or problem is None):
        # Only a failed query marks a pod-less GPU metric unavailable: that is what lets the
        # metrics-unavailable policy act at zero when Prometheus itself is down.
        return MetricReading(
            metric=spec.name, type=spec.type, status=ReadingStatus.NO_PODS, target=spec.target
        )
    if sample is not None and problem is None:
        if sample.observed_at is not None and now - sample.observed_at > max_age:
            problem = "Stale"
        elif sample.pod_values is not None:
            return _read_gpu(spec, sample.pod_values, state, tolerance)
        elif spec.prometheus is not None and sample.total is not None:
            total, current = sample.total, state.current_replicas
            return _read_prometheus(spec, spec.prometheus, total, current, tolerance)
    return _unavailable(spec, problem or "NoSample")


def budget_max_replicas(policy: ScalingPolicy) -> int | None:
    """The most replicas ``budget.maxCostPerHour`` pays for, or None without a binding budget."""
    if policy.max_cost_per_hour is None:
        return None
    per_replica = policy.price_per_gpu_hour * policy.gpus_per_replica
    if per_replica == 0:
        return None
    # Decimal floor division is exact here: no float rounding at the budget's edge.
    return int(policy.max_cost_per_hour // per_replica)


def _cutoff(now: datetime, span: timedelta) -> datetime:
    """An entry is in a window of ``span`` while ``cutoff < time <= now``: as in the HPA,
    strictly newer than now - window, so an entry exactly one window old has expired."""
    return now - span


def _with_recommendation(
    history: tuple[Recommendation, ...], newest: Recommendation
) -> tuple[Recommendation, ...]:
    """``history`` with ``newest`` appended, folding it into an equal last entry.

    Stabilisation takes the lowest and highest recommendation inside each window. An entry
    followed by a newer one of the same value changes neither while time moves forward: any
    window that holds the older holds the newer too. Folding them as they arrive keeps a
    steady service's history at a few entries instead of one per tick of the scale-down
    window (60 at the defaults, 300 with a 1 s interval), each one filtered every tick.
    """
    if history and history[-1].replicas == newest.replicas and history[-1].time <= newest.time:
        return (*history[:-1], newest)
    return (*history, newest)


def _stabilize(
    current: int,
    proposal: int,
    history: Sequence[Recommendation],
    now: datetime,
    policy: ScalingPolicy,
) -> int:
    """HPA's stabilisation: never below the lowest recommendation of the scale-up window
    nor above the highest of the scale-down window, the new one included in both."""
    up_cut = _cutoff(now, policy.scale_up.window)
    down_cut = _cutoff(now, policy.scale_down.window)
    up_floor = down_ceiling = proposal
    for entry in history:
        if entry.time <= now:
            if up_cut < entry.time:
                up_floor = min(up_floor, entry.replicas)
            if down_cut < entry.time:
                down_ceiling = max(down_ceiling, entry.replicas)
    return min(max(current, up_floor), down_ceiling)


def _rate_limited(
    current: int, wanted: int, events: Sequence[ScaleEvent], now: datetime, policy: ScalingPolicy
) -> int:
    """HPA's rate rule: measured from the count at the start of the period, so several small
    steps inside one period add up to at most one allowed step."""
    if wanted > current:
        rule = policy.scale_up
        cut = _cutoff(now, rule.period)
        recent = [e for e in events if cut < e.time <= now]
        start = max(0, current - sum(max(0, e.to_replicas - e.from_replicas) for e in recent))
        # From zero, percent is taken of one replica so that any positive percent can wake.
        by_percent = start + -(-max(start, 1) * rule.max_step_percent // 100)
        limit = max(by_percent, start + rule.max_step_replicas)
        return min(wanted, max(limit, current))
    if wanted < current:
        rule = policy.scale_down
        cut = _cutoff(now, rule.period)
        recent = [e for e in events if cut < e.time <= now]
        start = current + sum(max(0, e.from_replicas - e.to_replicas) for e in recent)
        by_percent = start * (100 - rule.max_step_percent) // 100
        limit = max(0, min(by_percent, start - rule.max_step_replicas))
        return max(wanted, min(limit, current))
    return wanted


def _has_demand(readings: Sequence[MetricReading]) -> bool:
    # With no metric that can show demand (none configured, or GPU memory only), the service
    # is never idle: scale-to-zero needs evidence of no demand, not absence of evidence.
    signalled = False
    for reading in readings:
        if reading.demand:
            return True
        signalled = signalled or reading.demand is not None
    return not signalled


class _Outcome:
    """The value moving through the stages, with the last stage that moved it."""

    def __init__(self, value: int, factor: LimitingFactor | None) -> None:
        self.value = value
        self.factor = factor

    def stage(self, value: int, factor: LimitingFactor) -> None:
        if value != self.value:
            self.value = value
            self.factor = factor


@dataclass(slots=True, kw_only=True)
class _Caps:
    capacity_limited: bool
    missing_gpus: int
    budget_limited: bool
    quota_limited: bool = False
    quota_missing_gpus: int = 0
    quota_wanted_replicas: int | None = None


_UNCAPPED = _Caps(capacity_limited=False, missing_gpus=0, budget_limited=False)


def _apply_caps(
    outcome: _Outcome,
    current: int,
    policy: ScalingPolicy,
    capacity_max_replicas: int | None,
    quota_max_replicas: int | None = None,
) -> _Caps:
    if (
        capacity_max_replicas is None
        and policy.max_cost_per_hour is None
        and quota_max_replicas is None
    ):
        return _UNCAPPED
    wanted = before_quota = outcome.value
    # The namespace quota, like the budget, is a promise: it may cut below the current
    # count and minReplicas. What it cuts is no shortage of the pool.
    quota_cap = quota_max_replicas
    quota_missing = 0
    if quota_cap is not None:
        quota_missing = max(0, wanted - quota_cap) * policy.gpus_per_replica
        wanted = min(wanted, quota_cap)  # the budget and the pool judge what the quota lets
    budget_cap = budget_max_replicas(policy)
    # The budget is a promise about spend: it may cut below current replicas and below
    # minReplicas. Capacity only stops growth: replicas already running keep their GPUs.
    capacity_cap = None if capacity_max_replicas is None else max(capacity_max_replicas, current)
    if budget_cap is not None:
        outcome.stage(min(outcome.value, budget_cap), LimitingFactor.BUDGET)
    if quota_cap is not None:
        # After the budget: it becomes the limiting factor only when strictly tighter.
        outcome.stage(min(outcome.value, quota_cap), LimitingFactor.QUOTA)
    if capacity_cap is not None:
        # Applied after the budget, so it becomes the limiting factor only when strictly
        # tighter; a tie reports Budget, the limit the owner chose.
        outcome.stage(min(outcome.value, capacity_cap), LimitingFactor.CAPACITY)
    capacity_limited = capacity_cap is not None and wanted > capacity_cap
    missing = (wanted - capacity_cap) * policy.gpus_per_replica if capacity_cap is not None else 0
    return _Caps(
        capacity_limited=capacity_limited,
        missing_gpus=max(0, missing),
        budget_limited=budget_cap is not None and wanted > budget_cap,
        quota_limited=quota_missing > 0,
        quota_missing_gpus=quota_missing,
        quota_wanted_replicas=before_quota if quota_cap is not None else None,
    )


def _prune(state: ScalingState, policy: ScalingPolicy, now: datetime) -> ScalingState:
    """The state without the recommendations and scale events too old to matter."""
    recommendations = _in_window(state.recommendations, _cutoff(now, policy.history_span), now)
    events = _in_window(state.scale_events, _cutoff(now, policy.events_span), now)
    if recommendations is state.recommendations and events is state.scale_events:
        return state
    return replace(state, recommendations=recommendations, scale_events=events)


_Timed = TypeVar("_Timed", Recommendation, ScaleEvent)


def _in_window(entries: tuple[_Timed, ...], cut: datetime, now: datetime) -> tuple[_Timed, ...]:
    """The entries with ``cut < time <= now``; ``entries`` itself when none is outside."""
    for entry in entries:
        if not cut < entry.time <= now:
            return tuple(e for e in entries if cut < e.time <= now)
    return entries


def _next_state(
    state: ScalingState,
    history: tuple[Recommendation, ...],
    now: datetime,
    scaled_to: int | None,
    demand: bool,
) -> ScalingState:
    """What a decision carries to the next tick; ``scaled_to`` is the count applied now."""
    current = state.current_replicas
    events = state.scale_events
    last_scale_time = state.last_scale_time
    if scaled_to is not None:
        events += (ScaleEvent(time=now, from_replicas=current, to_replicas=scaled_to),)
        current, last_scale_time = scaled_to, now
    # The idle clock restarts on demand (or on doubt), at zero, and on a fresh state.
    demand_time = now if demand or state.last_demand_time is None else state.last_demand_time
    return ScalingState(
        current_replicas=current,
        ready_replicas=state.ready_replicas,
        starting_replicas=state.starting_replicas,
        recommendations=history,
        scale_events=events,
        last_demand_time=demand_time,
        last_scale_time=last_scale_time,
    )


def _finish(
    *,
    policy: ScalingPolicy,
    state: ScalingState,
    history: tuple[Recommendation, ...],
    now: datetime,
    outcome: _Outcome,
    caps: _Caps,
    recommended: int,
    reason: Reason,
    why: str | None,
    readings: tuple[MetricReading, ...],
    deciding: MetricReading | None,
    metrics_available: bool | None,
    unavailable_reason: str | None,
    demand: bool,
) -> Decision:
    current = state.current_replicas
    desired = outcome.value
    applied = policy.mode is not Mode.RECOMMEND and desired != current
    new_state = _next_state(state, history, now, desired if applied else None, demand)
    return Decision(
        desired_replicas=desired,
        recommended_replicas=recommended,
        current_replicas=current,
        mode=policy.mode,
        reason=reason,
        limiting_factor=outcome.factor,
        metric=deciding.metric if deciding else None,
        current_value=deciding.value if deciding else None,
        target_value=deciding.target if deciding else None,
        capacity_limited=caps.capacity_limited,
        missing_gpus=caps.missing_gpus,
        budget_limited=caps.budget_limited,
        quota_limited=caps.quota_limited,
        quota_missing_gpus=caps.quota_missing_gpus,
        quota_wanted_replicas=caps.quota_wanted_replicas,
        metrics_available=metrics_available,
        metrics_unavailable_reason=unavailable_reason,
        why=why,
        readings=readings,
        state=new_state,
    )


def _decide_manual(
    state: ScalingState,
    policy: ScalingPolicy,
    capacity_max_replicas: int | None,
    quota_max_replicas: int | None,
    now: datetime,
) -> Decision:
    # Mode Off: spec.replicas as `kubectl scale`, an HPA or KEDA set it, not clamped to
    # min/max (those bound the autoscaler, and maxReplicas defaults to 1). Budget and pool
    # capacity still apply: they are promises of the operator, whoever picks the count.
    current = state.current_replicas
    target = current if policy.manual_replicas is None else policy.manual_replicas
    outcome = _Outcome(target, factor=None)
    caps = _apply_caps(outcome, current, policy, capacity_max_replicas, quota_max_replicas)
    return _finish(
        policy=policy,
        state=state,
        history=state.recommendations,
        now=now,
        outcome=outcome,
        caps=caps,
        recommended=target,
        reason=Reason.MANUAL,
        why="autoscaling is Off; spec.replicas "
        + ("is unset" if policy.manual_replicas is None else f"is {policy.manual_replicas}"),
        readings=(),
        deciding=None,
        metrics_available=None,
        unavailable_reason=None,
        demand=True,
    )


@dataclass(slots=True, kw_only=True)
class _Proposal:
    replicas: int
    reason: Reason
    # None: the deciding metric against its target (see Decision.why).
    why: str | None
    factor: LimitingFactor | None = None
    # Idle scale-to-zero runs on its own timer, so it skips the scale-down window.
    idle: bool = False
    # Hold keeps the count as it is: no window or rate limit applies to "no change".
    hold: bool = False


def _propose_at_zero(
    readings: Sequence[MetricReading], deciding: MetricReading | None
) -> _Proposal:
    replicas = deciding.replicas if deciding and deciding.replicas is not None else 0
    if not any(r.type is MetricType.PROMETHEUS for r in readings):
        return _Proposal(
            replicas=0,
            reason=Reason.NO_WAKE_METRIC,
            why="at zero replicas and no Prometheus metric can show demand (GPU metrics need pods)",
            factor=LimitingFactor.NO_WAKE_METRIC,
        )
    if deciding is not None and replicas > 0:
        return _Proposal(
            replicas=replicas, reason=Reason.WOKEN, why=f"{deciding.metric} shows demand at zero"
        )
    return _Proposal(
        replicas=0, reason=Reason.NO_DEMAND, why="no demand above the activation value at zero"
    )


def _propose_running(
    state: ScalingState,
    policy: ScalingPolicy,
    judged: Sequence[MetricReading],
    deciding: MetricReading | None,
    now: datetime,
) -> _Proposal:
    current = state.current_replicas
    if deciding is not None and deciding.replicas is not None:
        replicas = deciding.replicas
        reason = Reason.AT_TARGET
        if replicas != current:
            reason = Reason.ABOVE_TARGET if replicas > current else Reason.BELOW_TARGET
        proposal = _Proposal(replicas=replicas, reason=reason, why=None)
    elif any(r.status is ReadingStatus.PODS_NOT_READY for r in judged):
        proposal = _Proposal(
            replicas=current,
            reason=Reason.PODS_NOT_READY,
            why="no pod is ready to report GPU metrics yet",
            factor=LimitingFactor.PODS_NOT_READY,
        )
    else:
        proposal = _Proposal(
            replicas=current, reason=Reason.NO_METRICS, why="no metric can be read"
        )
    if policy.min_replicas > 0:
        return proposal
    since = state.last_demand_time or now
    idle_for = now - since
    if not _has_demand(judged) and idle_for >= timedelta(
        seconds=policy.scale_to_zero_after_seconds
    ):
        return _Proposal(
            replicas=0,
            reason=Reason.IDLE,
            why=f"no demand for {int(idle_for.total_seconds())}s",
            idle=True,
        )
    if proposal.replicas == 0:
        # Only the idle timer takes a service to zero, never the proportional rule.
        return replace(proposal, replicas=1, factor=LimitingFactor.SCALE_TO_ZERO_DELAY)
    return proposal


def _on_unavailable(
    unavailable: Sequence[MetricReading],
    deciding: MetricReading | None,
    policy: ScalingPolicy,
    current: int,
) -> _Proposal:
    names = ", ".join(f"{r.metric} ({r.reason})" for r in unavailable)
    readable = deciding.replicas if deciding and deciding.replicas is not None else None
    factor = LimitingFactor.METRICS_UNAVAILABLE
    rule = policy.on_metrics_unavailable
    if rule is UnavailablePolicy.HOLD:
        return _Proposal(
            replicas=current,
            reason=Reason.HOLD,
            why=f"metrics unavailable: {names}; holding",
            factor=factor,
            hold=True,
        )
    if rule is UnavailablePolicy.SCALE_UP_ONLY:
        # The metrics still readable may scale up, never down: what cannot be seen may be the
        # load that keeps the current replicas busy.
        replicas = max(current, readable or 0)
        return _Proposal(
            replicas=replicas,
            reason=Reason.SCALE_UP_ONLY,
            why=f"metrics unavailable: {names}; scaling up only",
            factor=factor,
        )
    # Fallback is a floor while blind, not a ceiling: a metric still readable that asks for
    # more wins (KEDA's fallback overrides such a metric: kedacore/keda#6659).
    fallback = policy.fallback_replicas or 0
    return _Proposal(
        replicas=max(fallback, readable or 0),
        reason=Reason.FALLBACK,
        why=f"metrics unavailable: {names}; falling back to {fallback}",
        factor=factor,
    )


def _limit(
    proposal: _Proposal,
    state: ScalingState,
    history: Sequence[Recommendation],
    policy: ScalingPolicy,
    now: datetime,
) -> _Outcome:
    current = state.current_replicas
    outcome = _Outcome(proposal.replicas, factor=proposal.factor)
    # A proposal to keep the current count passes every window unchanged (the lowest
    # recommendation in a window is at most the proposal, the highest at least), and every
    # rate limit: both are skipped then.
    if not proposal.hold and proposal.replicas != current:
        if not proposal.idle:
            stabilized = _stabilize(current, proposal.replicas, history, now, policy)
            outcome.stage(stabilized, LimitingFactor.STABILIZATION_WINDOW)
        limited = _rate_limited(current, outcome.value, state.scale_events, now, policy)
        outcome.stage(limited, LimitingFactor.RATE_LIMIT)
    keep = _starting_floor(state)
    if outcome.value < keep:
        outcome.stage(keep, LimitingFactor.REPLICAS_STARTING)
    if outcome.value < policy.min_replicas:
        outcome.stage(policy.min_replicas, LimitingFactor.MIN_REPLICAS)
    if outcome.value > policy.max_replicas:
        outcome.stage(policy.max_replicas, LimitingFactor.MAX_REPLICAS)
    return outcome


def _starting_floor(state: ScalingState) -> int:
    """The fewest replicas a scale-down may leave while replicas are starting (0: none is).

    A Deployment scaling down deletes pods not bound to a node first, then pods not ready,
    and only then ready ones (the ReplicaSet controller's ranking, ahead of any
    pod-deletion-cost): any cut below the pods that hold a node would remove a replica in
    the middle of its start. So while one is starting, a scale-down may remove only the
    pods not bound yet, and waits for the rest until no start is in progress; then it
    removes ready replicas, as the windows still ask. A scale to zero waits the same way.
    """
    if state.starting_replicas == 0:
        return 0
    return min(state.current_replicas, state.ready_replicas + state.starting_replicas)


def _judge(
    readings: Sequence[MetricReading],
) -> tuple[list[MetricReading], MetricReading | None]:
    """The unavailable readings, and the one that decides: of the readings that ask for a
    count, the one asking for most replicas (the first listed wins a tie)."""
    unavailable: list[MetricReading] = []
    deciding: MetricReading | None = None
    for reading in readings:
        if reading.status is ReadingStatus.UNAVAILABLE:
            unavailable.append(reading)
        elif (
            reading.status is ReadingStatus.OK
            and reading.replicas is not None
            and (deciding is None or reading.replicas > (deciding.replicas or 0))
        ):
            deciding = reading
    return unavailable, deciding


def decide(
    samples: Mapping[MetricSpec, MetricSample],
    state: ScalingState,
    policy: ScalingPolicy,
    capacity_max_replicas: int | None,
    now: datetime,
    *,
    max_sample_age: timedelta = DEFAULT_MAX_SAMPLE_AGE,
    quota_max_replicas: int | None = None,
) -> Decision:
    """Decide one service's replica count for this tick.

    ``samples`` maps each of ``policy.metrics`` to its sample (a missing entry reads as
    unavailable, except a GPU metric at zero replicas, which has nothing to read).
    ``capacity_max_replicas`` is this service's share of the pool from
    :func:`share_pool_capacity`, or None when unknown. ``quota_max_replicas`` is what the
    namespace's quota on the pool lets it run (``logic.quota``), or None without a quota.
    ``now`` must be timezone-aware.

    Pods without a GPU value (``ready_replicas < current_replicas``, or a scrape gap) are
    handled as the HPA handles missing pods: assumed at target when the others ask to scale
    down, idle when they ask to scale up; while no pod is ready at all the service holds
    (reason PodsNotReady), which does not count as metrics being unavailable.

    While ``state.starting_replicas`` are in the middle of their start, a scale-down (to
    zero included) waits rather than remove one (limiting factor ReplicasStarting): see
    ``_starting_floor``. The budget and the quota still cut.
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    if capacity_max_replicas is not None and capacity_max_replicas < 0:
        raise ValueError("capacity_max_replicas cannot be negative")
    if quota_max_replicas is not None and quota_max_replicas < 0:
        raise ValueError("quota_max_replicas cannot be negative")
    if not policy.metric_set.issuperset(samples):
        unknown = [spec.name for spec in samples if spec not in policy.metric_set]
        raise ValueError(f"samples for metrics the policy does not list: {unknown}")
    fresh = not state.recommendations
    state = _prune(state, policy, now)
    current = state.current_replicas
    if policy.mode is Mode.OFF:
        return _decide_manual(state, policy, capacity_max_replicas, quota_max_replicas, now)

    tolerance = policy.tolerance_percent / 100
    readings = tuple([
        _read(spec, samples.get(spec), state, tolerance=tolerance, now=now, max_age=max_sample_age)
        for spec in policy.metrics
    ])  # fmt: skip
    judged = readings
    if current == 0 and any(r.type is MetricType.PROMETHEUS for r in readings):
        # At zero only request-level metrics can speak; GPU metrics have no pods.
        judged = tuple(r for r in readings if r.type is MetricType.PROMETHEUS)
    unavailable, deciding = _judge(judged)

    if current == 0:
        proposal = _propose_at_zero(readings, deciding)
    else:
        proposal = _propose_running(state, policy, judged, deciding, now)
    if unavailable:
        proposal = _on_unavailable(unavailable, deciding, policy, current)

    history = state.recommendations
    if fresh and current > 0:
        # A fresh state (operator restart, mode switch) starts its windows now at the current
        # count, so that losing the history cannot skip a scale-down window.
        history = (Recommendation(time=now, replicas=current),)
    outcome = _limit(proposal, state, history, policy, now)
    caps = _apply_caps(outcome, current, policy, capacity_max_replicas, quota_max_replicas)
    # Only what the metrics said goes into the window history: a hold, a fallback or a
    # pod-less guess is no observation of load.
    if deciding is not None and not unavailable:
        history = _with_recommendation(
            history, Recommendation(time=now, replicas=proposal.replicas)
        )
    return _finish(
        policy=policy,
        state=state,
        history=history,
        now=now,
        outcome=outcome,
        caps=caps,
        recommended=proposal.replicas,
        reason=proposal.reason,
        why=proposal.why,
        readings=readings,
        deciding=deciding,
        metrics_available=not unavailable,
        unavailable_reason=unavailable[0].reason if unavailable else None,
        demand=current == 0 or _has_demand(judged),
    )


def repeats(decision: Decision, policy: ScalingPolicy) -> bool:
    """Whether ``decision`` is a fixed point: called again at any later ``now`` with samples
    of the same values (observed at that ``now``), the same policy, the same replica counts,
    any capacity share and the state it returned, :func:`decide` returns an equal decision,
    whose state :func:`repeated_state` computes without deciding.

    True, when nothing limits it, for a service at its target, and for one at zero that no
    metric asks to wake: each proposes its current count, which every window, rate limit and
    cap lets through whatever the history (see ``_limit``), and a capacity share never cuts
    below the current count. Only the idle clock could move the first, so a service that
    may scale to zero must show demand; at zero the idle clock does not run.
    """
    if decision.limiting_factor is not None:
        return False
    if decision.reason is Reason.AT_TARGET:
        return policy.min_replicas > 0 or _has_demand(decision.readings)
    return decision.reason is Reason.NO_DEMAND


def repeated_state(
    state: ScalingState, decision: Decision, policy: ScalingPolicy, now: datetime
) -> ScalingState:
    """The state :func:`decide` returns at ``now`` when ``decision`` :func:`repeats`, given the
    state it returned. Moving that state on once, to the last of several ticks, gives what
    deciding at each of them in turn gives: each tick only drops what expired and dates the
    last recommendation (and the demand) afresh."""
    state = _prune(state, policy, now)
    history = _with_recommendation(
        state.recommendations, Recommendation(time=now, replicas=decision.recommended_replicas)
    )
    # As in decide: at zero the idle clock stands still (it restarts on every tick).
    demand = decision.current_replicas == 0 or _has_demand(decision.readings)
    return _next_state(state, history, now, None, demand)


@dataclass(frozen=True, kw_only=True)
class PoolRequest:
    """One service competing for a pool's free GPUs this tick."""

    key: str
    gpus_per_replica: int
    current_replicas: int
    # The count the service would run without the pool limit: the desired replicas of a
    # decide() call with capacity_max_replicas=None.
    wanted_replicas: int

    def __post_init__(self) -> None:
        if self.gpus_per_replica < 1 or min(self.current_replicas, self.wanted_replicas) < 0:
            raise ValueError(f"{self.key}: gpusPerReplica >= 1 and counts >= 0 required")


@dataclass(order=True, kw_only=True)
class _Bidder:
    held_gpus: int
    gpus_per_replica: int
    key: str
    replicas: int = field(compare=False)
    wanted: int = field(compare=False)


def share_pool_capacity(
    pool_available_gpus: int, requests: Sequence[PoolRequest]
) -> dict[str, int]:
    """Share a pool's free GPUs among the services that want more; return each one's maximum
    replica count for :func:`decide`.

    Fairness is max-min on GPUs held (water-filling in whole replicas): the next replica goes
    to the service holding the fewest GPUs, ties to the smaller replica and then to the key,
    so the result does not depend on the order of ``requests``. A service whose replica no
    longer fits in what is left drops out, and smaller replicas take the rest. Nothing is
    taken back: every maximum is at least the current count. GPUs left after every want is
    met are added to each maximum as headroom (what is left, in whole replicas of that
    service), so a maximum below what a service wanted means the pool really was the limit.
    """
    keys = [r.key for r in requests]
    if len(set(keys)) != len(keys):
        raise ValueError("duplicate service key")
    free = max(0, pool_available_gpus)
    allocated = {r.key: r.current_replicas for r in requests}
    heap = [
        _Bidder(
            held_gpus=r.current_replicas * r.gpus_per_replica,
            gpus_per_replica=r.gpus_per_replica,
            key=r.key,
            replicas=r.current_replicas,
            wanted=r.wanted_replicas,
        )
        for r in requests
        if r.wanted_replicas > r.current_replicas
    ]
    heapq.heapify(heap)
    while heap and free > 0:
        bidder = heapq.heappop(heap)
        if bidder.gpus_per_replica > free:
            continue
        free -= bidder.gpus_per_replica
        bidder.replicas += 1
        bidder.held_gpus += bidder.gpus_per_replica
        allocated[bidder.key] = bidder.replicas
        if bidder.replicas < bidder.wanted:
            heapq.heappush(heap, bidder)
    return {r.key: allocated[r.key] + free // r.gpus_per_replica for r in requests}
