"""From an AIService and its pool to the autoscaler's policy: the API mapped onto
``logic.autoscale``'s dataclasses, one field to one field."""

from __future__ import annotations

from gpuyard.api.pool import GPUPool
from gpuyard.api.service import AIServiceSpec, ScalingRules
from gpuyard.logic.autoscale import (
    MetricSpec,
    MetricType,
    Mode,
    PrometheusMetric,
    ScalingBehavior,
    ScalingPolicy,
    UnavailablePolicy,
)
from gpuyard.logic.promql import Aggregation


def _behavior(rules: ScalingRules) -> ScalingBehavior:
    return ScalingBehavior(
        stabilization_window_seconds=rules.stabilization_window_seconds,
        max_step_percent=rules.max_step_percent,
        max_step_replicas=rules.max_step_replicas,
        period_seconds=rules.period_seconds,
    )


def scaling_policy(spec: AIServiceSpec, pool: GPUPool) -> ScalingPolicy:
    autoscaling = spec.autoscaling
    metrics = []
    for metric in autoscaling.metrics or ():
        source = metric.prometheus
        prometheus = None
        if source is not None:
            prometheus = PrometheusMetric(
                metric=source.metric,
                # Floats from here on: metric values are floats, and the exact decimal
                # matters only for money (budget and price stay Decimal).
                target_per_replica=float(source.target_per_replica_decimal),
                labels=tuple(sorted((source.labels or {}).items())),
                aggregation=Aggregation(source.aggregation),
                activation_value=float(source.activation_value_decimal),
            )
        entry = MetricSpec(
            type=MetricType(metric.type),
            target_percent=metric.target_percent,
            prometheus=prometheus,
        )
        # The API lets a Prometheus metric be listed twice (or as "1" and "1.0"): the copies
        # would ask for the same replicas, so one is kept rather than refusing the service.
        if entry not in metrics:
            metrics.append(entry)
    unavailable = autoscaling.on_metrics_unavailable
    return ScalingPolicy(
        min_replicas=spec.min_replicas,
        max_replicas=spec.max_replicas,
        manual_replicas=spec.replicas,
        mode=Mode(autoscaling.mode),
        tolerance_percent=autoscaling.tolerance_percent,
        metrics=tuple(metrics),
        scale_up=_behavior(autoscaling.scale_up),
        scale_down=_behavior(autoscaling.scale_down),
        scale_to_zero_after_seconds=autoscaling.scale_to_zero_after_seconds,
        on_metrics_unavailable=UnavailablePolicy(unavailable.policy),
        fallback_replicas=unavailable.fallback_replicas,
        gpus_per_replica=spec.gpus_per_replica,
        price_per_gpu_hour=pool.spec.price.per_gpu_hour_decimal,
        max_cost_per_hour=spec.budget.max_cost_per_hour_decimal if spec.budget else None,
    )
