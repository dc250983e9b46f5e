"""What an AIService's status says about the autoscaler's decision: conditions and the
recommendation block. Pure, so every wording is unit-tested."""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from gpuyard.api.formats import format_time
from gpuyard.api.service import RecommendationStatus
from gpuyard.logic.autoscale import Decision, Mode
from gpuyard.logic.conditions import (
    BUDGET_LIMITED,
    CAPACITY_LIMITED,
    METRICS_AVAILABLE,
    ConditionUpdate,
)


def format_measurement(value: float | None) -> str | None:
    """A metric value for status: up to two decimals, no exponent; None when not finite."""
    if value is None or not math.isfinite(value) or abs(value) >= 1e15:
        return None
    text = f"{value:.2f}".rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


def autoscaler_conditions(decision: Decision | None) -> list[ConditionUpdate]:
    """``MetricsAvailable`` and ``BudgetLimited``, and ``CapacityLimited`` when the pool cut
    what the autoscaler wanted (the reconcile's own placement check covers the rest)."""
    if decision is None:
        return []
    updates = []
    if decision.metrics_available is None:
        updates.append(
            ConditionUpdate(METRICS_AVAILABLE, "Unknown", "AutoscalingOff", decision.message)
        )
    elif decision.metrics_available:
        updates.append(
            ConditionUpdate(METRICS_AVAILABLE, "True", "MetricsRead", "every metric was read")
        )
    else:
        reason = decision.metrics_unavailable_reason or "MetricsUnavailable"
        updates.append(ConditionUpdate(METRICS_AVAILABLE, "False", reason, decision.message))
    if decision.budget_limited:
        updates.append(
            ConditionUpdate(BUDGET_LIMITED, "True", "BudgetCapsReplicas", decision.message)
        )
    else:
        updates.append(
            ConditionUpdate(
                BUDGET_LIMITED, "False", "WithinBudget", "the budget allows the wanted replicas"
            )
        )
    if decision.capacity_limited:
        updates.append(
            ConditionUpdate(CAPACITY_LIMITED, "True", "InsufficientGPUs", decision.message)
        )
    return updates


def recommendation(
    decision: Decision | None, previous: Mapping[str, Any] | None, now: datetime
) -> RecommendationStatus | None:
    """The recommendation block; its ``time`` moves only when something else in it does,
    so an unchanged decision rewrites nothing."""
    if decision is None or decision.mode is Mode.OFF:
        return None
    fresh = RecommendationStatus(
        replicas=decision.desired_replicas,
        reason=decision.reason.value,
        metric=decision.metric,
        current_value=format_measurement(decision.current_value),
        target_value=format_measurement(decision.target_value),
        limited_by=decision.limiting_factor.value if decision.limiting_factor else None,
        time=format_time(now, whole_seconds=True),
    )
    if previous is not None:
        kept = {**fresh.to_json(), "time": previous.get("time")}
        if kept == dict(previous):
            return RecommendationStatus.from_mapping(previous)
    return fresh
