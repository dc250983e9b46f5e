"""From an AIService and its pool to the autoscaler's policy: one field to one field.

Table-driven: a spec (camelCase, as a tenant writes it) and the policy ``decide`` gets. A
property test then checks that every spec the API accepts maps to a policy: a spec that the
models accept but the policy refused would leave its service silently never autoscaled.
"""

from __future__ import annotations

from dataclasses import replace
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from sample_objects import make_pool, make_service, pool_spec, service_spec

from gpuyard.logic.autoscale import (
    MetricSpec,
    MetricType,
    Mode,
    PrometheusMetric,
    ScalingBehavior,
    ScalingPolicy,
    UnavailablePolicy,
)
from gpuyard.logic.policy import scaling_policy
from gpuyard.logic.promql import Aggregation

#: What the sample service (one replica, no metrics) on the sample pool (2.50 per GPU-hour)
#: maps to: the API's defaults, spelt out once.
DEFAULTS = ScalingPolicy(
    min_replicas=1,
    max_replicas=1,
    manual_replicas=None,
    mode=Mode.AUTO,
    tolerance_percent=10,
    metrics=(),
    scale_up=ScalingBehavior(
        stabilization_window_seconds=0, max_step_percent=100, max_step_replicas=4, period_seconds=15
    ),
    scale_down=ScalingBehavior(
        stabilization_window_seconds=300,
        max_step_percent=100,
        max_step_replicas=4,
        period_seconds=15,
    ),
    scale_to_zero_after_seconds=300,
    on_metrics_unavailable=UnavailablePolicy.HOLD,
    fallback_replicas=None,
    gpus_per_replica=1,
    price_per_gpu_hour=Decimal("2.50"),
    max_cost_per_hour=None,
)

UTIL: dict[str, Any] = {"type": "GPUUtilization", "targetPercent": 60}
MEMORY: dict[str, Any] = {"type": "GPUMemory", "targetPercent": 80}
QUEUE: dict[str, Any] = {
    "type": "Prometheus",
    "prometheus": {"metric": "vllm:num_requests_waiting", "targetPerReplica": "8"},
}
QUEUE_SPEC = MetricSpec(
    MetricType.PROMETHEUS,
    prometheus=PrometheusMetric("vllm:num_requests_waiting", target_per_replica=8.0),
)
UTIL_SPEC = MetricSpec(MetricType.GPU_UTILIZATION, target_percent=60)
SCALING = {"minReplicas": 1, "maxReplicas": 4, "autoscaling": {"metrics": [UTIL]}}

CASES: dict[str, tuple[dict[str, Any], dict[str, Any], dict[str, Any]]] = {
    "defaults": ({}, {}, {}),
    "bounds-and-manual-replicas": (
        {"minReplicas": 2, "maxReplicas": 5, "replicas": 3, "autoscaling": {"mode": "Off"}},
        {},
        {"min_replicas": 2, "max_replicas": 5, "manual_replicas": 3, "mode": Mode.OFF},
    ),
    "gpu-metrics-in-order": (
        {"maxReplicas": 4, "autoscaling": {"metrics": [MEMORY, UTIL]}},
        {},
        {
            "max_replicas": 4,
            "metrics": (MetricSpec(MetricType.GPU_MEMORY, target_percent=80), UTIL_SPEC),
        },
    ),
    "prometheus-defaults": (
        {"minReplicas": 0, "maxReplicas": 4, "autoscaling": {"metrics": [QUEUE]}},
        {},
        {"min_replicas": 0, "max_replicas": 4, "metrics": (QUEUE_SPEC,)},
    ),
    "prometheus-every-field": (
        {
            "minReplicas": 0,
            "maxReplicas": 4,
            "autoscaling": {
                "metrics": [
                    {
                        "type": "Prometheus",
                        "prometheus": {
                            "metric": "gpuyard_sim_requests_in_flight",
                            "labels": {"model": "llama", "gateway": 'a"b\\c'},
                            "aggregation": "max",
                            "targetPerReplica": "0.5",
                            "activationValue": "2.25",
                        },
                    }
                ]
            },
        },
        {},
        {
            "min_replicas": 0,
            "max_replicas": 4,
            "metrics": (
                MetricSpec(
                    MetricType.PROMETHEUS,
                    prometheus=PrometheusMetric(
                        "gpuyard_sim_requests_in_flight",
                        target_per_replica=0.5,
                        # Sorted by name, whatever the order in the spec.
                        labels=(("gateway", 'a"b\\c'), ("model", "llama")),
                        aggregation=Aggregation.MAX,
                        activation_value=2.25,
                    ),
                ),
            ),
        },
    ),
    "the-same-metric-twice-counts-once": (
        {
            "minReplicas": 0,
            "maxReplicas": 4,
            "autoscaling": {
                "metrics": [
                    QUEUE,
                    UTIL,
                    {**QUEUE, "prometheus": {**QUEUE["prometheus"], "targetPerReplica": "8.0"}},
                ]
            },
        },
        {},
        {"min_replicas": 0, "max_replicas": 4, "metrics": (QUEUE_SPEC, UTIL_SPEC)},
    ),
    "windows-steps-and-periods": (
        {
            **SCALING,
            "autoscaling": {
                "metrics": [UTIL],
                "scaleUp": {
                    "stabilizationWindowSeconds": 30,
                    "maxStepPercent": 50,
                    "maxStepReplicas": 2,
                    "periodSeconds": 60,
                },
                "scaleDown": {"stabilizationWindowSeconds": 10, "maxStepPercent": 0},
            },
        },
        {},
        {
            "max_replicas": 4,
            "metrics": (UTIL_SPEC,),
            "scale_up": ScalingBehavior(
                stabilization_window_seconds=30,
                max_step_percent=50,
                max_step_replicas=2,
                period_seconds=60,
            ),
            "scale_down": ScalingBehavior(
                stabilization_window_seconds=10,
                max_step_percent=0,
                max_step_replicas=4,
                period_seconds=15,
            ),
        },
    ),
    "tolerance-and-idle-time": (
        {
            **SCALING,
            "autoscaling": {
                "metrics": [UTIL],
                "tolerancePercent": 0,
                "scaleToZeroAfterSeconds": 0,
                "mode": "Recommend",
            },
        },
        {},
        {
            "max_replicas": 4,
            "metrics": (UTIL_SPEC,),
            "tolerance_percent": 0,
            "scale_to_zero_after_seconds": 0,
            "mode": Mode.RECOMMEND,
        },
    ),
    "scale-up-only": (
        {
            **SCALING,
            "autoscaling": {"metrics": [UTIL], "onMetricsUnavailable": {"policy": "ScaleUpOnly"}},
        },
        {},
        {
            "max_replicas": 4,
            "metrics": (UTIL_SPEC,),
            "on_metrics_unavailable": UnavailablePolicy.SCALE_UP_ONLY,
        },
    ),
    "fallback": (
        {
            **SCALING,
            "autoscaling": {
                "metrics": [UTIL],
                "onMetricsUnavailable": {"policy": "Fallback", "fallbackReplicas": 2},
            },
        },
        {},
        {
            "max_replicas": 4,
            "metrics": (UTIL_SPEC,),
            "on_metrics_unavailable": UnavailablePolicy.FALLBACK,
            "fallback_replicas": 2,
        },
    ),
    "money-stays-exact": (
        {"gpusPerReplica": 2, "budget": {"maxCostPerHour": "0.30"}},
        {"price": {"perGpuHour": "0.10"}},
        {
            "gpus_per_replica": 2,
            "price_per_gpu_hour": Decimal("0.10"),
            "max_cost_per_hour": Decimal("0.30"),
        },
    ),
    "six-decimal-price-and-zero-budget": (
        {"budget": {"maxCostPerHour": "0"}},
        {"price": {"perGpuHour": "0.123456"}},
        {"price_per_gpu_hour": Decimal("0.123456"), "max_cost_per_hour": Decimal(0)},
    ),
}


@pytest.mark.parametrize(("service", "pool", "changes"), CASES.values(), ids=CASES.keys())
def test_scaling_policy(
    service: dict[str, Any], pool: dict[str, Any], changes: dict[str, Any]
) -> None:
    got = scaling_policy(make_service(service_spec(**service)).spec, make_pool(pool_spec(**pool)))
    assert got == replace(DEFAULTS, **changes)


def test_money_is_decimal_and_metric_targets_are_float() -> None:
    got = scaling_policy(
        make_service(service_spec(budget={"maxCostPerHour": "0.30"}, **SCALING)).spec,
        make_pool(pool_spec(price={"perGpuHour": "0.10"})),
    )
    assert isinstance(got.price_per_gpu_hour, Decimal)
    assert isinstance(got.max_cost_per_hour, Decimal)
    # 0.3 / 0.1 in floats is 2.9999999999999996: a float budget would lose a replica.
    assert got.max_cost_per_hour / got.price_per_gpu_hour == 3


# --- whatever the API accepts maps to a policy --------------------------------------------------

_LABEL_NAMES = st.one_of(
    st.sampled_from(["model", "gateway", "job", "exported_service", "_x"]),
    st.from_regex(r"[a-zA-Z_][a-zA-Z0-9_]{0,127}", fullmatch=True),
)
_DECIMALS = st.from_regex(r"[0-9]{1,9}(\.[0-9]{1,6})?", fullmatch=True)
_PROMETHEUS = st.fixed_dictionaries(
    {
        "metric": st.one_of(
            st.sampled_from(["q", "sum", "vllm:num_requests_waiting"]),
            st.from_regex(r"[a-zA-Z_:][a-zA-Z0-9_:]{0,199}", fullmatch=True),
        ),
        "targetPerReplica": st.one_of(st.sampled_from(["1", "1.0", "0.000001"]), _DECIMALS),
    },
    optional={
        "labels": st.dictionaries(_LABEL_NAMES, st.text(max_size=256), max_size=8),
        "aggregation": st.sampled_from(["sum", "avg", "max"]),
        "activationValue": _DECIMALS,
    },
)
_METRICS = st.one_of(
    st.fixed_dictionaries({"type": st.just("Prometheus"), "prometheus": _PROMETHEUS}),
    st.fixed_dictionaries(
        {
            "type": st.sampled_from(["GPUUtilization", "GPUMemory"]),
            "targetPercent": st.integers(1, 100),
        }
    ),
)
_RULES = st.fixed_dictionaries(
    {},
    optional={
        "stabilizationWindowSeconds": st.integers(0, 3600),
        "maxStepPercent": st.integers(0, 1000),
        "maxStepReplicas": st.integers(0, 1000),
        "periodSeconds": st.integers(1, 1800),
    },
)


@st.composite
def _accepted_specs(draw: st.DrawFn) -> dict[str, Any]:
    minimum = draw(st.integers(0, 1000))
    maximum = draw(st.integers(max(1, minimum), 1000))
    # Small lists drawn from few values: the same metric listed twice is a real input.
    metrics = draw(
        st.lists(st.one_of(st.sampled_from([QUEUE, UTIL, MEMORY]), _METRICS), max_size=8)
    )
    unavailable = draw(
        st.one_of(
            st.just({}),
            st.sampled_from([{"policy": "Hold"}, {"policy": "ScaleUpOnly"}]),
            st.builds(
                lambda n: {"policy": "Fallback", "fallbackReplicas": n},
                st.integers(minimum, maximum),
            ),
        )
    )
    autoscaling = {
        "mode": draw(st.sampled_from(["Auto", "Recommend", "Off"])),
        "metrics": metrics,
        "tolerancePercent": draw(st.integers(0, 100)),
        "scaleUp": draw(_RULES),
        "scaleDown": draw(_RULES),
        "scaleToZeroAfterSeconds": draw(st.integers(0, 86400)),
        "onMetricsUnavailable": unavailable,
    }
    spec = service_spec(
        gpusPerReplica=draw(st.integers(1, 16)),
        minReplicas=minimum,
        maxReplicas=maximum,
        autoscaling=autoscaling,
    )
    if draw(st.booleans()):
        spec["replicas"] = draw(st.integers(0, 1000))
    if draw(st.booleans()):
        spec["budget"] = {"maxCostPerHour": draw(_DECIMALS)}
    return spec


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=_accepted_specs(), price=_DECIMALS)
def test_every_spec_the_api_accepts_maps_to_a_policy(spec: dict[str, Any], price: str) -> None:
    try:
        service = make_service(spec)
    except ValidationError:
        reject()  # the API would refuse it too (say, minReplicas 0 with GPU metrics only)
    policy = scaling_policy(service.spec, make_pool(pool_spec(price={"perGpuHour": price})))
    listed = [
        (m.type, m.target_percent, m.prometheus.metric if m.prometheus else None)
        for m in service.spec.autoscaling.metrics or ()
    ]
    mapped = [
        (m.type.value, m.target_percent, m.prometheus.metric if m.prometheus else None)
        for m in policy.metrics
    ]
    # Every listed metric is there, in the order first listed; exact copies count once.
    assert set(mapped) == set(listed)
    assert len(policy.metrics) == len(set(policy.metrics))
    assert (policy.min_replicas, policy.max_replicas) == (
        service.spec.min_replicas,
        service.spec.max_replicas,
    )
