"""The words of an AIService's `status.recommendation`: why the autoscaler chose a replica
count (`reason`) and what held it back (`limitedBy`).

They are API: dashboards, alerts and `kubectl get -o jsonpath` read them, so they are
defined here, where the CRD and docs/api.md are generated from, and the field
descriptions list them from these enums. docs/autoscaling.md explains each one.
"""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    """What drove the recommendation (CamelCase, for status and Events)."""

    ABOVE_TARGET = "MetricAboveTarget"
    BELOW_TARGET = "MetricBelowTarget"
    AT_TARGET = "MetricAtTarget"
    IDLE = "IdleScaleToZero"
    WOKEN = "DemandWakesFromZero"
    NO_DEMAND = "NoDemandAtZero"
    NO_WAKE_METRIC = "NoWakeMetric"
    PODS_NOT_READY = "PodsNotReady"
    NO_METRICS = "NoMetricsConfigured"
    HOLD = "MetricsUnavailableHold"
    SCALE_UP_ONLY = "MetricsUnavailableScaleUpOnly"
    FALLBACK = "MetricsUnavailableFallback"
    MANUAL = "ManualReplicas"


class LimitingFactor(StrEnum):
    """What kept the desired count from the metric recommendation: the last stage to move it."""

    METRICS_UNAVAILABLE = "MetricsUnavailable"
    NO_WAKE_METRIC = "NoWakeMetric"
    PODS_NOT_READY = "PodsNotReady"
    SCALE_TO_ZERO_DELAY = "ScaleToZeroDelay"
    #: A scale-down (or to zero) waits while a replica is starting: it would remove it.
    REPLICAS_STARTING = "ReplicasStarting"
    STABILIZATION_WINDOW = "StabilizationWindow"
    RATE_LIMIT = "RateLimit"
    MIN_REPLICAS = "MinReplicas"
    MAX_REPLICAS = "MaxReplicas"
    BUDGET = "Budget"
    CAPACITY = "Capacity"
    QUOTA = "Quota"


def word_list(words: type[StrEnum]) -> str:
    """The values of `words` as prose: `A, B or C`."""
    values = [member.value for member in words]
    return f"{', '.join(values[:-1])} or {values[-1]}"
