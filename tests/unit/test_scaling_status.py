"""What an AIService's status says about the autoscaler: conditions and the recommendation.

Table-driven: each row is a decision as ``decide`` could return it and what status shows.
"""

from __future__ import annotations

import math
import re
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpuyard.api.common import MEASUREMENT_PATTERN
from gpuyard.api.reasons import LimitingFactor, Reason
from gpuyard.api.service import RecommendationStatus
from gpuyard.logic.autoscale import Decision, Mode, ScalingState
from gpuyard.logic.conditions import ConditionUpdate
from gpuyard.logic.scaling_status import autoscaler_conditions, format_measurement, recommendation

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)

BASE = Decision(
    desired_replicas=3,
    recommended_replicas=3,
    current_replicas=2,
    mode=Mode.AUTO,
    reason=Reason.ABOVE_TARGET,
    limiting_factor=None,
    metric="GPUUtilization",
    current_value=90.0,
    target_value=60.0,
    capacity_limited=False,
    missing_gpus=0,
    budget_limited=False,
    metrics_available=True,
    metrics_unavailable_reason=None,
    why=None,
    readings=(),
    state=ScalingState(current_replicas=2, ready_replicas=2),
)


def decision(**changes: Any) -> Decision:
    return replace(BASE, **changes)


# --- format_measurement ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (None, None),
        (math.nan, None),
        (math.inf, None),
        (-math.inf, None),
        (1e15, None),
        (-1e15, None),
        (0.0, "0"),
        (-0.0, "0"),
        (-0.001, "0"),
        (1e-9, "0"),
        (3.0, "3"),
        (61.5, "61.5"),
        (60.25, "60.25"),
        (0.125, "0.12"),
        (2.0 / 3.0, "0.67"),
        (-3.5, "-3.5"),
        (100.0, "100"),
        # The largest double below 1e15 still fits the API's 15 integer digits.
        (math.nextafter(1e15, 0), "999999999999999.88"),
    ],
)
def test_format_measurement(value: float | None, shown: str | None) -> None:
    assert format_measurement(value) == shown


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_every_formatted_measurement_fits_the_api_and_the_value(value: float) -> None:
    shown = format_measurement(value)
    if shown is None:
        assert not math.isfinite(value) or abs(value) >= 1e15
        return
    assert re.fullmatch(MEASUREMENT_PATTERN, shown), shown
    assert abs(float(shown) - value) <= 0.005 + abs(value) * 1e-15
    assert shown != "-0"


# --- conditions --------------------------------------------------------------------------------

AVAILABLE = ConditionUpdate("MetricsAvailable", "True", "MetricsRead", "every metric was read")
WITHIN_BUDGET = ConditionUpdate(
    "BudgetLimited", "False", "WithinBudget", "the budget allows the wanted replicas"
)
# Each message is worded from the decision's fields (Decision.message): what drove it (the
# deciding metric unless `why` says otherwise), what limited it, and the resulting count.
METRIC = "GPUUtilization is 90 for a target of 60"
BLIND = "metrics unavailable: GPUUtilization (PrometheusUnreachable); holding: keep 2 replica(s)"
CAPPED = f"{METRIC}; limited by Budget; the budget caps the replicas: keep 2 replica(s)"
SHORT = f"{METRIC}; limited by Capacity; the pool lacks 4 GPU(s): scale from 2 to 3 replica(s)"
BOTH = f"{METRIC}; the pool lacks 2 GPU(s); the budget caps the replicas: keep 2 replica(s)"
OFF = "autoscaling is Off; spec.replicas is 2: keep 2 replica(s)"
HOLDING = "metrics unavailable: GPUUtilization (PrometheusUnreachable); holding"


CONDITIONS: dict[str, tuple[Decision | None, list[ConditionUpdate]]] = {
    "no-decision-yet": (None, []),
    "metrics-read": (decision(), [AVAILABLE, WITHIN_BUDGET]),
    "mode-off-consults-no-metric": (
        decision(
            mode=Mode.OFF,
            reason=Reason.MANUAL,
            metrics_available=None,
            desired_replicas=2,
            why="autoscaling is Off; spec.replicas is 2",
        ),
        [ConditionUpdate("MetricsAvailable", "Unknown", "AutoscalingOff", OFF), WITHIN_BUDGET],
    ),
    "unavailable-with-its-reason": (
        decision(
            metrics_available=False,
            metrics_unavailable_reason="PrometheusUnreachable",
            desired_replicas=2,
            why=HOLDING,
        ),
        [
            ConditionUpdate("MetricsAvailable", "False", "PrometheusUnreachable", BLIND),
            WITHIN_BUDGET,
        ],
    ),
    "unavailable-without-a-reason": (
        decision(metrics_available=False, desired_replicas=2, why=HOLDING),
        [ConditionUpdate("MetricsAvailable", "False", "MetricsUnavailable", BLIND), WITHIN_BUDGET],
    ),
    "budget-binds": (
        decision(budget_limited=True, limiting_factor=LimitingFactor.BUDGET, desired_replicas=2),
        [AVAILABLE, ConditionUpdate("BudgetLimited", "True", "BudgetCapsReplicas", CAPPED)],
    ),
    "capacity-binds": (
        decision(
            capacity_limited=True,
            missing_gpus=4,
            limiting_factor=LimitingFactor.CAPACITY,
        ),
        [
            AVAILABLE,
            WITHIN_BUDGET,
            ConditionUpdate("CapacityLimited", "True", "InsufficientGPUs", SHORT),
        ],
    ),
    "both-bind": (
        decision(capacity_limited=True, missing_gpus=2, budget_limited=True, desired_replicas=2),
        [
            AVAILABLE,
            ConditionUpdate("BudgetLimited", "True", "BudgetCapsReplicas", BOTH),
            ConditionUpdate("CapacityLimited", "True", "InsufficientGPUs", BOTH),
        ],
    ),
}


@pytest.mark.parametrize(("given_decision", "expected"), CONDITIONS.values(), ids=CONDITIONS.keys())
def test_autoscaler_conditions(
    given_decision: Decision | None, expected: list[ConditionUpdate]
) -> None:
    assert autoscaler_conditions(given_decision) == expected


def test_capacity_is_left_to_the_placement_check_unless_the_pool_cut_the_decision() -> None:
    # The reconcile's own check reports capacity for replicas already asked for; the
    # autoscaler speaks only when it wanted more than the pool could give.
    types = [c.type for c in autoscaler_conditions(decision(missing_gpus=0))]
    assert "CapacityLimited" not in types


# --- the recommendation block -------------------------------------------------------------------

FRESH = {
    "replicas": 3,
    "reason": "MetricAboveTarget",
    "metric": "GPUUtilization",
    "currentValue": "90",
    "targetValue": "60",
    "time": "2025-03-01T12:00:00Z",
}

RECOMMENDATIONS: dict[str, tuple[Decision | None, dict[str, Any] | None, dict[str, Any] | None]] = {
    "no-decision": (None, None, None),
    "mode-off-shows-none": (decision(mode=Mode.OFF), FRESH, None),
    "first": (decision(), None, FRESH),
    "recommend-mode-shows-it-too": (decision(mode=Mode.RECOMMEND), None, FRESH),
    "limited": (
        decision(limiting_factor=LimitingFactor.STABILIZATION_WINDOW),
        None,
        {**FRESH, "limitedBy": "StabilizationWindow"},
    ),
    "no-deciding-metric": (
        decision(metric=None, current_value=None, target_value=None, reason=Reason.HOLD),
        None,
        {"replicas": 3, "reason": "MetricsUnavailableHold", "time": FRESH["time"]},
    ),
    "not-finite-value-left-out": (
        decision(current_value=math.nan),
        None,
        {k: v for k, v in FRESH.items() if k != "currentValue"},
    ),
    "unchanged-keeps-its-time": (
        decision(),
        {**FRESH, "time": "2025-03-01T11:00:00Z"},
        {**FRESH, "time": "2025-03-01T11:00:00Z"},
    ),
    "a-wobble-below-two-decimals-keeps-its-time": (
        decision(current_value=90.001),
        {**FRESH, "time": "2025-03-01T11:00:00Z"},
        {**FRESH, "time": "2025-03-01T11:00:00Z"},
    ),
    "a-new-value-moves-the-time": (
        decision(current_value=91.0),
        {**FRESH, "time": "2025-03-01T11:00:00Z"},
        {**FRESH, "currentValue": "91"},
    ),
    "a-new-limit-moves-the-time": (
        decision(limiting_factor=LimitingFactor.BUDGET),
        {**FRESH, "time": "2025-03-01T11:00:00Z"},
        {**FRESH, "limitedBy": "Budget"},
    ),
    "a-lifted-limit-moves-the-time": (
        decision(),
        {**FRESH, "limitedBy": "Budget", "time": "2025-03-01T11:00:00Z"},
        FRESH,
    ),
}


@pytest.mark.parametrize(
    ("given_decision", "previous", "expected"),
    RECOMMENDATIONS.values(),
    ids=RECOMMENDATIONS.keys(),
)
def test_recommendation(
    given_decision: Decision | None,
    previous: dict[str, Any] | None,
    expected: dict[str, Any] | None,
) -> None:
    shown = recommendation(given_decision, previous, T0)
    assert (shown.to_json() if shown is not None else None) == expected


def test_an_unchanged_recommendation_is_byte_equal_a_tick_later() -> None:
    """So that the status patch is empty: nothing is written for a decision that did not
    change."""
    first = recommendation(decision(), None, T0)
    assert first is not None
    later = recommendation(decision(), first.to_json(), T0 + timedelta(minutes=5))
    assert later == first
    assert isinstance(later, RecommendationStatus)
