"""Scaling decisions, table-driven with an injected clock, plus multi-tick scenarios.

Unless a case says otherwise: one GPU utilisation metric with a 60 % target, replicas 1..10,
10 % tolerance, no stabilisation windows, HPA-like rate limits (up: max(100 %, 4) per 15 s,
down: max(100 %, 4) per 15 s).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpuyard.api.reasons import LimitingFactor, Reason
from gpuyard.logic.autoscale import (
    Decision,
    MetricSample,
    MetricSpec,
    MetricType,
    Mode,
    PoolRequest,
    PrometheusMetric,
    ReadingStatus,
    Recommendation,
    ScaleEvent,
    ScalingBehavior,
    ScalingPolicy,
    ScalingState,
    UnavailablePolicy,
    budget_max_replicas,
    decide,
    repeated_state,
    repeats,
    share_pool_capacity,
)

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


UTIL = MetricSpec(MetricType.GPU_UTILIZATION, target_percent=60)
MEMORY = MetricSpec(MetricType.GPU_MEMORY, target_percent=80)
QUEUE = MetricSpec(
    MetricType.PROMETHEUS, prometheus=PrometheusMetric("queue_length", target_per_replica=10.0)
)
INFLIGHT = MetricSpec(
    MetricType.PROMETHEUS,
    prometheus=PrometheusMetric("inflight", target_per_replica=10.0, activation_value=5.0),
)
# At its target of 10 per replica, a total of 10 still shows no demand.
QUIET = MetricSpec(
    MetricType.PROMETHEUS,
    prometheus=PrometheusMetric("inflight", target_per_replica=10.0, activation_value=20.0),
)
HUNDREDTH = MetricSpec(
    MetricType.PROMETHEUS, prometheus=PrometheusMetric("rps", target_per_replica=0.01)
)


def behavior(
    window: int = 0, *, percent: int = 100, replicas: int = 4, period: int = 15
) -> ScalingBehavior:
    """Scale-up or scale-down rules: a stabilisation window of ``window`` seconds, at most
    the larger of ``percent`` % and ``replicas`` replicas per ``period`` seconds."""
    return ScalingBehavior(
        stabilization_window_seconds=window,
        max_step_percent=percent,
        max_step_replicas=replicas,
        period_seconds=period,
    )


NOW = behavior()
BASE = ScalingPolicy(min_replicas=1, max_replicas=10, metrics=(UTIL,), scale_up=NOW, scale_down=NOW)
Q = replace(BASE, metrics=(QUEUE,))
ZERO = replace(BASE, min_replicas=0)
ZQ = replace(Q, min_replicas=0)
HOLD, UP_ONLY, FALLBACK = UnavailablePolicy
# 5 per replica (2 GPUs at 2.5): 12 buys 2 replicas, 15 buys 3.
PRICED = replace(Q, gpus_per_replica=2, price_per_gpu_hour=Decimal("2.5"))


def policy(base: ScalingPolicy = BASE, **changes: Any) -> ScalingPolicy:
    return replace(base, **changes)


def state(current: int, ready: int | None = None, **changes: Any) -> ScalingState:
    ready = current if ready is None else ready
    return replace(ScalingState(current_replicas=current, ready_replicas=ready), **changes)


def pods(*values: float, observed: datetime = T0) -> MetricSample:
    return MetricSample.per_pod({f"pod-{i}": v for i, v in enumerate(values)}, observed)


def total(value: float, observed: datetime = T0) -> MetricSample:
    return MetricSample.service_total(value, observed)


def down(unavailable: str = "PrometheusUnreachable") -> MetricSample:
    return MetricSample.unavailable(unavailable)


@dataclass(frozen=True)
class Case:
    id: str
    policy: ScalingPolicy
    state: ScalingState
    samples: Mapping[MetricSpec, MetricSample]
    expect: Mapping[str, Any] = field(default_factory=dict)
    capacity: int | None = None


def case(
    id: str,
    pol: ScalingPolicy,
    st_: ScalingState,
    samples: Mapping[MetricSpec, MetricSample],
    desired: int,
    *,
    capacity: int | None = None,
    **expect: Any,
) -> Case:
    return Case(id, pol, st_, samples, {"desired_replicas": desired, **expect}, capacity)


MA = {"metrics_available": True}
UNAVAILABLE = {"metrics_available": False, "limiting_factor": LimitingFactor.METRICS_UNAVAILABLE}
NO_FACTOR = {"limiting_factor": None}

CASES = [
    # --- the proportional rule and its tolerance ---
    case("proportional-up", BASE, state(2), {UTIL: pods(90, 90)}, 3,
         reason=Reason.ABOVE_TARGET, metric="GPUUtilization", current_value=90.0,
         target_value=60.0, recommended_replicas=3, **NO_FACTOR, **MA),
    case("proportional-down", BASE, state(4), {UTIL: pods(15, 15, 15, 15)}, 1,
         reason=Reason.BELOW_TARGET, **NO_FACTOR),
    case("tolerance-edge-up-holds", BASE, state(4), {UTIL: pods(66, 66, 66, 66)}, 4,
         reason=Reason.AT_TARGET),
    case("just-above-tolerance", BASE, state(4), {UTIL: pods(66.1, 66.1, 66.1, 66.1)}, 5),
    case("tolerance-edge-down-holds", BASE, state(10), {UTIL: pods(*[54] * 10)}, 10,
         reason=Reason.AT_TARGET),
    case("just-below-tolerance", BASE, state(10), {UTIL: pods(*[53.9] * 10)}, 9,
         reason=Reason.BELOW_TARGET),
    case("zero-tolerance", policy(tolerance_percent=0), state(1), {UTIL: pods(61)}, 2),
    case("prometheus-total-per-replica", Q, state(2), {QUEUE: total(45)}, 5,
         metric="queue_length", current_value=45.0, target_value=10.0),
    case("prometheus-within-tolerance", Q, state(2), {QUEUE: total(21)}, 2),
    # 0.07 / 0.01 is 7.000000000000001 in floats: still 7 replicas, not 8.
    case("float-noise-adds-no-replica", policy(metrics=(HUNDREDTH,)), state(2),
         {HUNDREDTH: total(0.07)}, 6, recommended_replicas=7,
         limiting_factor=LimitingFactor.RATE_LIMIT),
    case("most-replicas-wins", policy(metrics=(UTIL, QUEUE)), state(2),
         {UTIL: pods(90, 90), QUEUE: total(50)}, 5, metric="queue_length"),
    case("tie-goes-to-first-listed", policy(metrics=(UTIL, QUEUE)), state(2),
         {UTIL: pods(90, 90), QUEUE: total(30)}, 3, metric="GPUUtilization"),
    # --- pods without values: HPA's conservative fill ---
    case("missing-pods-at-target-on-the-way-down", BASE, state(4), {UTIL: pods(30, 30, 30)}, 3),
    case("unready-pods-idle-on-the-way-up-reversal-holds", BASE, state(4, 2),
         {UTIL: pods(90, 90)}, 4, reason=Reason.AT_TARGET),
    case("unready-pods-still-above-target", BASE, state(4, 3), {UTIL: pods(100, 100, 100)}, 5),
    case("at-target-with-missing-pods-holds", BASE, state(4), {UTIL: pods(60, 60)}, 4),
    case("nan-pod-counts-as-missing", BASE, state(4), {UTIL: pods(math.nan, 10, 10, 10)}, 2),
    case("negative-pod-counts-as-missing", BASE, state(4), {UTIL: pods(-5, 10, 10, 10)}, 2),
    case("no-pod-ready-holds", BASE, state(2, 0), {UTIL: pods()}, 2,
         reason=Reason.PODS_NOT_READY, limiting_factor=LimitingFactor.PODS_NOT_READY, **MA),
    case("ready-pods-without-series", BASE, state(2), {UTIL: pods()}, 2, reason=Reason.HOLD,
         metrics_unavailable_reason="NoSeries", **UNAVAILABLE),
    case("only-broken-values", BASE, state(2), {UTIL: pods(math.nan, math.inf)}, 2,
         metrics_unavailable_reason="NoValidSeries", **UNAVAILABLE),
    # --- unreadable values ---
    case("total-nan", Q, state(3), {QUEUE: total(math.nan)}, 3,
         metrics_unavailable_reason="NotFinite", **UNAVAILABLE),
    case("total-plus-inf", Q, state(3), {QUEUE: total(math.inf)}, 3,
         metrics_unavailable_reason="NotFinite", **UNAVAILABLE),
    case("total-minus-inf", Q, state(3), {QUEUE: total(-math.inf)}, 3,
         metrics_unavailable_reason="NotFinite", **UNAVAILABLE),
    case("total-negative", Q, state(3), {QUEUE: total(-1)}, 3,
         metrics_unavailable_reason="NegativeValue", **UNAVAILABLE),
    case("stale-sample", Q, state(3), {QUEUE: total(100, observed=at(-61))}, 3,
         metrics_unavailable_reason="Stale", **UNAVAILABLE),
    case("sample-exactly-max-age-is-fresh", Q, state(3), {QUEUE: total(100, observed=at(-60))},
         7, recommended_replicas=10, limiting_factor=LimitingFactor.RATE_LIMIT, **MA),
    case("missing-sample", policy(metrics=(UTIL, QUEUE)), state(3), {UTIL: pods(60, 60, 60)}, 3,
         metrics_unavailable_reason="NoSample", **UNAVAILABLE),
    case("query-failed", BASE, state(3), {UTIL: down("PrometheusUnreachable")}, 3,
         reason=Reason.HOLD, metrics_unavailable_reason="PrometheusUnreachable", **UNAVAILABLE),
    # --- metrics-unavailable policies with replicas running ---
    case("scale-up-only-follows-readable-metrics-up",
         policy(metrics=(UTIL, QUEUE), on_metrics_unavailable=UP_ONLY), state(3),
         {UTIL: pods(90, 90, 90), QUEUE: down()}, 5, reason=Reason.SCALE_UP_ONLY, **UNAVAILABLE),
    case("scale-up-only-never-down",
         policy(metrics=(UTIL, QUEUE), on_metrics_unavailable=UP_ONLY), state(3),
         {UTIL: pods(10, 10, 10), QUEUE: down()}, 3, reason=Reason.SCALE_UP_ONLY),
    case("scale-up-only-blind", policy(on_metrics_unavailable=UP_ONLY), state(3),
         {UTIL: down()}, 3, reason=Reason.SCALE_UP_ONLY),
    case("fallback-goes-to-n",
         policy(on_metrics_unavailable=FALLBACK, fallback_replicas=2), state(5),
         {UTIL: down()}, 2, reason=Reason.FALLBACK, **UNAVAILABLE),
    case("fallback-is-a-floor-not-a-ceiling",
         policy(metrics=(UTIL, QUEUE), on_metrics_unavailable=FALLBACK, fallback_replicas=2),
         state(3), {UTIL: pods(90, 90, 90), QUEUE: down()}, 5, reason=Reason.FALLBACK),
    case("fallback-clamped-to-max",
         policy(on_metrics_unavailable=FALLBACK, fallback_replicas=20), state(8),
         {UTIL: down()}, 10, limiting_factor=LimitingFactor.MAX_REPLICAS),
    # --- zero replicas ---
    case("gpu-only-at-zero-has-no-wake-metric", ZERO, state(0), {UTIL: pods()}, 0,
         reason=Reason.NO_WAKE_METRIC, limiting_factor=LimitingFactor.NO_WAKE_METRIC, **MA),
    case("gpu-only-at-zero-without-samples", ZERO, state(0), {}, 0,
         reason=Reason.NO_WAKE_METRIC, **MA),
    case("gpu-only-at-zero-prometheus-down-holds", ZERO, state(0), {UTIL: down()}, 0,
         reason=Reason.HOLD, **UNAVAILABLE),
    case("gpu-only-at-zero-prometheus-down-falls-back",
         policy(ZERO, on_metrics_unavailable=FALLBACK, fallback_replicas=2), state(0),
         {UTIL: down()}, 2, reason=Reason.FALLBACK, **UNAVAILABLE),
    case("no-demand-at-zero", ZQ, state(0), {QUEUE: total(0)}, 0, reason=Reason.NO_DEMAND,
         **NO_FACTOR, **MA),
    case("small-demand-wakes-to-one", ZQ, state(0), {QUEUE: total(0.5)}, 1,
         reason=Reason.WOKEN, metric="queue_length"),
    case("demand-wakes-proportionally", ZQ, state(0), {QUEUE: total(35)}, 4, **NO_FACTOR),
    case("wake-is-rate-limited", ZQ, state(0), {QUEUE: total(55)}, 4, recommended_replicas=6,
         limiting_factor=LimitingFactor.RATE_LIMIT),
    case("activation-value-is-exclusive", policy(ZERO, metrics=(INFLIGHT,)), state(0),
         {INFLIGHT: total(5)}, 0, reason=Reason.NO_DEMAND),
    case("above-activation-wakes", policy(ZERO, metrics=(INFLIGHT,)), state(0),
         {INFLIGHT: total(5.01)}, 1, reason=Reason.WOKEN),
    case("stale-at-zero-holds", ZQ, state(0), {QUEUE: total(100, observed=at(-120))}, 0,
         reason=Reason.HOLD, metrics_unavailable_reason="Stale", **UNAVAILABLE),
    case("stale-at-zero-falls-back",
         policy(ZQ, on_metrics_unavailable=FALLBACK, fallback_replicas=2), state(0),
         {QUEUE: total(100, observed=at(-120))}, 2, reason=Reason.FALLBACK),
    case("stale-at-zero-scale-up-only", policy(ZQ, on_metrics_unavailable=UP_ONLY), state(0),
         {QUEUE: total(100, observed=at(-120))}, 0, reason=Reason.SCALE_UP_ONLY),
    case("gpu-unreadable-at-zero-ignored-when-a-wake-metric-reads",
         policy(ZERO, metrics=(UTIL, QUEUE)), state(0), {UTIL: down(), QUEUE: total(15)}, 2,
         reason=Reason.WOKEN, **MA),
    case("min-raised-while-at-zero", Q, state(0), {QUEUE: total(0)}, 1,
         limiting_factor=LimitingFactor.MIN_REPLICAS),
    # --- scale to zero (minReplicas 0, 300 s idle) ---
    case("idle-exactly-the-delay-scales-to-zero", ZERO, state(1, last_demand_time=at(-300)),
         {UTIL: pods(0)}, 0, reason=Reason.IDLE, **NO_FACTOR),
    case("idle-one-second-short", ZERO, state(1, last_demand_time=at(-299)), {UTIL: pods(0)}, 1,
         limiting_factor=LimitingFactor.SCALE_TO_ZERO_DELAY),
    case("below-one-percent-is-idle", ZERO, state(1, last_demand_time=at(-300)),
         {UTIL: pods(0.5)}, 0, reason=Reason.IDLE),
    case("one-percent-is-demand", ZERO, state(1, last_demand_time=at(-300)), {UTIL: pods(1.0)},
         1, **NO_FACTOR),
    case("demand-on-another-metric-blocks-idle", policy(ZERO, metrics=(UTIL, QUEUE)),
         state(1, last_demand_time=at(-300)), {UTIL: pods(0), QUEUE: total(3)}, 1),
    case("gpu-memory-alone-never-idles", policy(ZERO, metrics=(MEMORY,)),
         state(1, last_demand_time=at(-1000)), {MEMORY: pods(10)}, 1),
    case("unreadable-metrics-never-idle", ZERO, state(1, last_demand_time=at(-1000)),
         {UTIL: down()}, 1, reason=Reason.HOLD),
    case("missing-pod-may-hide-demand", ZERO, state(2, 1, last_demand_time=at(-1000)),
         {UTIL: pods(0)}, 1, reason=Reason.BELOW_TARGET, **NO_FACTOR),
    case("idle-skips-the-scale-down-window",
         policy(ZERO, scale_down=behavior(300)),
         state(2, recommendations=(Recommendation(at(-10), 2),), last_demand_time=at(-400)),
         {UTIL: pods(0, 0)}, 0, reason=Reason.IDLE),
    case("idle-respects-the-rate-limit",
         policy(ZERO, scale_down=behavior(percent=50, replicas=1)),
         state(4, last_demand_time=at(-400)), {UTIL: pods(0, 0, 0, 0)}, 2,
         reason=Reason.IDLE, limiting_factor=LimitingFactor.RATE_LIMIT),
    case("fresh-state-starts-the-idle-clock", ZERO, state(1), {UTIL: pods(0)}, 1),
    # --- stabilisation windows ---
    case("scale-down-window-holds", policy(scale_down=behavior(300)),
         state(5, recommendations=(Recommendation(at(-200), 5),)), {UTIL: pods(*[12] * 5)}, 5,
         recommended_replicas=1, limiting_factor=LimitingFactor.STABILIZATION_WINDOW),
    case("scale-down-window-boundary-expires", policy(scale_down=behavior(300)),
         state(5, recommendations=(Recommendation(at(-300), 5), Recommendation(at(-299), 4))),
         {UTIL: pods(*[12] * 5)}, 4, limiting_factor=LimitingFactor.STABILIZATION_WINDOW),
    case("scale-down-window-expired", policy(scale_down=behavior(300)),
         state(5, recommendations=(Recommendation(at(-300), 5),)), {UTIL: pods(*[12] * 5)}, 1,
         **NO_FACTOR),
    case("scale-up-window-holds", policy(scale_up=behavior(60)),
         state(2, recommendations=(Recommendation(at(-30), 2),)), {UTIL: pods(90, 90)}, 2,
         limiting_factor=LimitingFactor.STABILIZATION_WINDOW),
    case("scale-up-window-boundary-expires", policy(scale_up=behavior(60)),
         state(2, recommendations=(Recommendation(at(-60), 2),)), {UTIL: pods(90, 90)}, 3),
    case("fresh-state-seeds-the-scale-down-window", policy(scale_down=behavior(300)),
         state(5), {UTIL: pods(*[12] * 5)}, 5,
         limiting_factor=LimitingFactor.STABILIZATION_WINDOW),
    # --- rate limits ---
    case("scale-up-rate", Q, state(2), {QUEUE: total(100)}, 6,
         limiting_factor=LimitingFactor.RATE_LIMIT),
    case("scale-up-rate-counts-the-period", Q,
         state(6, scale_events=(ScaleEvent(at(-10), 2, 6),)), {QUEUE: total(100)}, 6,
         limiting_factor=LimitingFactor.RATE_LIMIT),
    case("scale-up-period-boundary-expires", Q,
         state(6, scale_events=(ScaleEvent(at(-15), 2, 6),)), {QUEUE: total(100)}, 10,
         **NO_FACTOR),
    case("scale-up-percent-rounds-up", policy(Q, scale_up=behavior(percent=10, replicas=0)),
         state(3), {QUEUE: total(100)}, 4),
    case("scale-up-disabled", policy(Q, scale_up=behavior(percent=0, replicas=0)), state(2),
         {QUEUE: total(100)}, 2, limiting_factor=LimitingFactor.RATE_LIMIT),
    case("scale-down-rate",
         policy(Q, scale_down=behavior(percent=50, replicas=1, period=60)), state(10),
         {QUEUE: total(10)}, 5, limiting_factor=LimitingFactor.RATE_LIMIT),
    case("scale-down-rate-counts-the-period",
         policy(Q, scale_down=behavior(percent=50, replicas=0, period=60)),
         state(5, scale_events=(ScaleEvent(at(-30), 10, 5),)), {QUEUE: total(10)}, 5,
         limiting_factor=LimitingFactor.RATE_LIMIT),
    case("scale-down-disabled", policy(Q, scale_down=behavior(percent=0, replicas=0)), state(10),
         {QUEUE: total(10)}, 10, limiting_factor=LimitingFactor.RATE_LIMIT),
    # --- min / max ---
    case("max-replicas", Q, state(8), {QUEUE: total(200)}, 10,
         limiting_factor=LimitingFactor.MAX_REPLICAS),
    case("min-replicas", policy(Q, min_replicas=2), state(3), {QUEUE: total(5)}, 2,
         limiting_factor=LimitingFactor.MIN_REPLICAS),
    case("max-lowered-below-current", policy(max_replicas=3), state(5), {UTIL: pods(*[60] * 5)},
         3, limiting_factor=LimitingFactor.MAX_REPLICAS),
    # --- budget and pool capacity ---
    case("budget", policy(PRICED, max_cost_per_hour=Decimal(12)), state(2), {QUEUE: total(50)},
         2, limiting_factor=LimitingFactor.BUDGET, budget_limited=True, capacity_limited=False),
    case("capacity", PRICED, state(2), {QUEUE: total(50)}, 3, capacity=3,
         limiting_factor=LimitingFactor.CAPACITY, capacity_limited=True, missing_gpus=4,
         budget_limited=False),
    case("capacity-and-budget-capacity-tighter", policy(PRICED, max_cost_per_hour=Decimal(15)),
         state(1), {QUEUE: total(50)}, 2, capacity=2, limiting_factor=LimitingFactor.CAPACITY,
         capacity_limited=True, budget_limited=True, missing_gpus=6),
    case("capacity-and-budget-budget-tighter", policy(PRICED, max_cost_per_hour=Decimal(12)),
         state(1), {QUEUE: total(50)}, 2, capacity=3, limiting_factor=LimitingFactor.BUDGET,
         capacity_limited=True, budget_limited=True, missing_gpus=4),
    case("capacity-and-budget-tie-reports-budget", policy(PRICED, max_cost_per_hour=Decimal(12)),
         state(1), {QUEUE: total(50)}, 2, capacity=2, limiting_factor=LimitingFactor.BUDGET,
         capacity_limited=True, budget_limited=True),
    case("capacity-never-removes-replicas", PRICED, state(5), {QUEUE: total(50)}, 5, capacity=2,
         capacity_limited=False, missing_gpus=0, **NO_FACTOR),
    case("budget-cuts-below-current-and-min",
         policy(PRICED, min_replicas=3, max_cost_per_hour=Decimal(12)), state(4),
         {QUEUE: total(40)}, 2, limiting_factor=LimitingFactor.BUDGET),
    # 0.3 / 0.1 is 2.9999999999999996 in floats; Decimal keeps the third replica.
    case("budget-exact-in-decimal",
         policy(Q, price_per_gpu_hour=Decimal("0.1"), max_cost_per_hour=Decimal("0.3")),
         state(1), {QUEUE: total(50)}, 3, limiting_factor=LimitingFactor.BUDGET),
    case("free-budget-when-price-is-zero", policy(Q, max_cost_per_hour=Decimal(0)), state(1),
         {QUEUE: total(50)}, 5, budget_limited=False),
    case("full-pool-keeps-zero", ZQ, state(0), {QUEUE: total(15)}, 0, capacity=0,
         limiting_factor=LimitingFactor.CAPACITY, capacity_limited=True, missing_gpus=2),
    # --- modes ---
    case("recommend-computes-like-auto", policy(mode=Mode.RECOMMEND), state(2),
         {UTIL: pods(90, 90)}, 3, apply=False),
    case("auto-applies", BASE, state(2), {UTIL: pods(90, 90)}, 3, apply=True),
    case("off-uses-spec-replicas-unclamped", policy(mode=Mode.OFF, manual_replicas=17), state(2),
         {UTIL: pods(90, 90)}, 17, reason=Reason.MANUAL, metrics_available=None, readings=(),
         apply=True),
    case("off-without-spec-replicas-keeps-current", policy(mode=Mode.OFF), state(4), {}, 4,
         reason=Reason.MANUAL, apply=False),
    case("off-to-zero", policy(mode=Mode.OFF, manual_replicas=0), state(4), {}, 0),
    case("off-respects-the-budget",
         policy(PRICED, mode=Mode.OFF, manual_replicas=7, max_cost_per_hour=Decimal(12)),
         state(2), {}, 2, limiting_factor=LimitingFactor.BUDGET, budget_limited=True),
    case("off-respects-capacity", policy(PRICED, mode=Mode.OFF, manual_replicas=7), state(2), {},
         4, capacity=4, limiting_factor=LimitingFactor.CAPACITY, missing_gpus=6),
]  # fmt: skip


@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_decide(c: Case) -> None:
    decision = decide(c.samples, c.state, c.policy, c.capacity, T0)
    actual = {name: getattr(decision, name) for name in c.expect}
    assert actual == dict(c.expect), decision.message


AUTO_CASES = [c for c in CASES if c.policy.mode is Mode.AUTO]


@pytest.mark.parametrize("c", AUTO_CASES, ids=[c.id for c in AUTO_CASES])
def test_recommend_decides_like_auto_and_changes_nothing(c: Case) -> None:
    auto = decide(c.samples, c.state, c.policy, c.capacity, T0)
    recommend = decide(c.samples, c.state, replace(c.policy, mode=Mode.RECOMMEND), c.capacity, T0)
    assert recommend.desired_replicas == auto.desired_replicas
    assert (recommend.reason, recommend.limiting_factor) == (auto.reason, auto.limiting_factor)
    assert not recommend.apply
    assert recommend.state.current_replicas == c.state.current_replicas
    assert set(recommend.state.scale_events) <= set(c.state.scale_events)
    # The window history is the same: a later switch to Auto sees what Recommend saw.
    assert recommend.state.recommendations == auto.state.recommendations


def test_auto_records_the_change_it_asks_for() -> None:
    decision = decide({UTIL: pods(90, 90)}, state(2), BASE, None, T0)
    assert decision.apply
    assert decision.state.current_replicas == 3
    assert decision.state.scale_events == (ScaleEvent(T0, 2, 3),)
    assert decision.state.last_scale_time == T0
    # The fresh state's seed (the count at the first tick) precedes the new recommendation.
    assert decision.state.recommendations == (Recommendation(T0, 2), Recommendation(T0, 3))
    assert "scale from 2 to 3" in decision.message


def test_nothing_to_change_records_nothing() -> None:
    before = state(4, last_scale_time=at(-100), last_demand_time=at(-5))
    decision = decide({UTIL: pods(60, 60, 60, 60)}, before, BASE, None, T0)
    assert not decision.apply
    assert decision.state.scale_events == ()
    assert decision.state.last_scale_time == at(-100)
    assert decision.state.last_demand_time == T0


def test_hold_records_no_recommendation() -> None:
    # A hold is no observation of load: it must not pin a later scale-down window.
    history = (Recommendation(at(-5), 3),)
    pol = policy(scale_down=behavior(300))
    decision = decide({UTIL: down()}, state(3, recommendations=history), pol, None, T0)
    assert decision.state.recommendations == history


def test_state_history_is_pruned_to_the_windows() -> None:
    pol = policy(scale_down=behavior(300))
    old = state(
        2,
        recommendations=(Recommendation(at(-301), 9), Recommendation(at(-100), 2)),
        scale_events=(ScaleEvent(at(-16), 1, 2), ScaleEvent(at(-14), 1, 2)),
    )
    decision = decide({UTIL: pods(60, 60)}, old, pol, None, T0)
    # The expired entry is gone; the new one folds into the equal entry before it.
    assert decision.state.recommendations == (Recommendation(T0, 2),)
    assert decision.state.scale_events == (ScaleEvent(at(-14), 1, 2),)


def test_idle_clock_keeps_its_start_while_idle() -> None:
    decision = decide({UTIL: pods(0)}, state(1, last_demand_time=at(-100)), ZERO, None, T0)
    assert decision.state.last_demand_time == at(-100)


def test_readings_explain_each_metric() -> None:
    decision = decide(
        {UTIL: pods(90, 30), MEMORY: pods(40, 40)},
        state(2),
        policy(metrics=(UTIL, MEMORY)),
        None,
        T0,
    )
    util, memory = decision.readings
    assert (util.status, util.value, util.replicas, util.demand) == (ReadingStatus.OK, 60, 2, True)
    assert (memory.value, memory.replicas, memory.demand) == (40, 1, None)


def test_metric_names_for_status() -> None:
    spec = MetricSpec(
        MetricType.PROMETHEUS,
        prometheus=PrometheusMetric("q", 1.0, labels=(("z", "1"), ("a", "2"))),
    )
    assert spec.name == "q{a='2',z='1'}"
    assert spec.prometheus is not None
    assert spec.prometheus.label_map == {"a": "2", "z": "1"}


# --- scenarios over many ticks -------------------------------------------------------------


def run_ticks(
    pol: ScalingPolicy, start: ScalingState, load: Any, seconds: range
) -> list[tuple[int, Decision]]:
    """Tick every ``seconds`` step with ``load(t)`` as the queue total; apply each decision."""
    current = start
    out = []
    for t in seconds:
        decision = decide({QUEUE: total(load(t), observed=at(t))}, current, pol, None, at(t))
        out.append((t, decision))
        current = decision.state.observed(decision.desired_replicas, decision.desired_replicas)
    return out


def test_scale_up_at_once_and_down_only_after_the_window() -> None:
    pol = policy(Q, scale_down=behavior(300))
    ticks = run_ticks(pol, state(2), lambda t: 50 if t < 60 else 10, range(0, 400, 15))
    desired = {t: d.desired_replicas for t, d in ticks}
    assert desired[0] == 5
    # The last recommendation of 5 is from t=45; it leaves the window at exactly t=345.
    assert all(desired[t] == 5 for t in range(15, 345, 15))
    assert desired[345] == 1
    assert ticks[10][1].limiting_factor is LimitingFactor.STABILIZATION_WINDOW


def test_idle_to_zero_and_woken_by_demand() -> None:
    pol = policy(ZQ, scale_down=behavior(300))
    ticks = run_ticks(pol, state(1), lambda t: 25 if t >= 450 else 0, range(0, 500, 15))
    desired = {t: d.desired_replicas for t, d in ticks}
    assert all(desired[t] == 1 for t in range(0, 300, 15))
    assert desired[300] == 0
    assert ticks[20][1].reason is Reason.IDLE
    assert all(desired[t] == 0 for t in range(315, 450, 15))
    assert desired[450] == 3
    assert ticks[30][1].reason is Reason.WOKEN


def test_flapping_load_does_not_flap_replicas() -> None:
    pol = policy(Q, scale_down=behavior(300))
    ticks = run_ticks(pol, state(5), lambda t: 50 if (t // 15) % 2 else 10, range(0, 600, 15))
    assert {d.desired_replicas for _, d in ticks} == {5}


# --- a decision that repeats itself need not be made again --------------------------------

_REPEAT_POLICIES = st.builds(
    lambda metrics, minimum, mode, window, idle, budget: replace(
        BASE,
        metrics=metrics,
        min_replicas=minimum,
        max_replicas=6,
        mode=mode,
        scale_down=behavior(window),
        scale_to_zero_after_seconds=idle,
        price_per_gpu_hour=Decimal(1),
        max_cost_per_hour=budget,
    ),
    st.sampled_from([(UTIL,), (QUEUE,), (UTIL, QUEUE), (MEMORY, INFLIGHT), (QUIET,), ()]),
    st.integers(0, 2),
    st.sampled_from([Mode.AUTO, Mode.RECOMMEND]),
    st.sampled_from([0, 60, 300]),
    st.sampled_from([0, 120]),
    st.sampled_from([None, Decimal(3)]),
)
# Phases of load, each held for some ticks so that ticks often read the same values: (GPU
# utilisation of every pod, queue total, ticks, seconds between them, a replica count
# someone else sets as the phase starts, or None).
_PHASES = st.lists(
    st.tuples(
        st.sampled_from([0.0, 30.0, 60.0, 63.0, 95.0]),
        st.sampled_from([0.0, 6.0, 10.0, 30.0]),
        st.integers(1, 8),
        st.sampled_from([5, 15, 60, 301]),
        st.one_of(st.none(), st.integers(0, 6)),
    ),
    min_size=1,
    max_size=8,
)


def _read_at(
    pol: ScalingPolicy, now: datetime, pods_running: int, util: float, queue: float
) -> dict[MetricSpec, MetricSample]:
    samples: dict[MetricSpec, MetricSample] = {}
    for spec in pol.metrics:
        if spec.prometheus is not None:
            samples[spec] = total(queue, observed=now)
        elif pods_running:
            samples[spec] = pods(*[util] * pods_running, observed=now)
    return samples


@settings(max_examples=400, deadline=None)
@given(pol=_REPEAT_POLICIES, start=st.integers(0, 6), phases=_PHASES)
def test_a_repeating_decision_is_what_deciding_again_returns(
    pol: ScalingPolicy, start: int, phases: list[tuple[float, float, int, int, int | None]]
) -> None:
    """The autoscaler's shortcut, checked against deciding on every tick. While the last
    decision repeats and the load stays, it is kept, with the state it was made with; once
    either changes, that state is moved on to the last tick the decision held, and deciding
    from it returns what deciding on every tick does, state included."""
    full = kept = state(start)
    last: tuple[Decision, tuple[float, float]] | None = None  # and the load it read
    held_at: datetime | None = None
    now = T0
    ticks = [
        (util, queue, seconds, scaled if tick == 0 else None)
        for util, queue, count, seconds, scaled in phases
        for tick in range(count)
    ]
    for util, queue, seconds, scaled_by_someone in ticks:
        now += timedelta(seconds=seconds)
        current = full.current_replicas if scaled_by_someone is None else scaled_by_someone
        full, kept = full.observed(current, current), kept.observed(current, current)
        samples = _read_at(pol, now, current, util, queue)
        decided = decide(samples, full, pol, None, now)
        if (
            last is not None
            and repeats(last[0], pol)
            and last[1] == (util, queue)
            and last[0].current_replicas == current == last[0].state.ready_replicas
        ):
            held_at = now
            assert replace(last[0], state=decided.state) == decided
            assert repeated_state(kept, last[0], pol, now) == decided.state
        else:
            if last is not None and held_at is not None:
                kept = repeated_state(kept, last[0], pol, held_at)
            made = decide(samples, kept, pol, None, now)
            assert made == decided
            last, kept, held_at = (made, (util, queue)), made.state, None
        full = decided.state


def test_at_target_or_asleep_repeats_and_what_time_or_a_limit_can_move_does_not() -> None:
    at_target = {UTIL: pods(60, 60)}
    steady = decide(at_target, state(2), BASE, None, T0)
    assert steady.reason is Reason.AT_TARGET
    assert repeats(steady, BASE)
    # At zero with nothing asking for a replica. Without a wake metric a limit holds it
    # there (NoWakeMetric), and limited decisions are made on every tick.
    asleep = decide({QUEUE: total(0)}, state(0), ZQ, None, T0)
    assert asleep.reason is Reason.NO_DEMAND
    assert repeats(asleep, ZQ)
    assert not repeats(decide({}, state(0), ZERO, None, T0), ZERO)
    # At target but showing no demand, and allowed to reach zero: the idle clock moves it.
    idle_policy = policy(ZERO, metrics=(QUIET,))
    idle = decide({QUIET: total(10)}, state(1), idle_policy, None, T0)
    assert idle.reason is Reason.AT_TARGET
    assert not repeats(idle, idle_policy)
    assert repeats(idle, policy(idle_policy, min_replicas=1))
    # Held by a window, or capped by maxReplicas or the budget: the limit may move it.
    windowed = policy(Q, scale_down=behavior(300))
    first = decide({QUEUE: total(50)}, state(5), windowed, None, T0)
    held = decide({QUEUE: total(10)}, first.state, windowed, None, at(15))
    assert held.limiting_factor is LimitingFactor.STABILIZATION_WINDOW
    capped = policy(max_replicas=1)
    budgeted = policy(price_per_gpu_hour=Decimal(1), max_cost_per_hour=Decimal(1))
    assert not repeats(held, windowed)
    assert not repeats(decide(at_target, state(2), capped, None, T0), capped)
    assert not repeats(decide(at_target, state(2), budgeted, None, T0), budgeted)
    # Blind: the metrics-unavailable policy decides, not the metric.
    assert not repeats(decide({UTIL: down()}, state(1), BASE, None, T0), BASE)


# --- budget helpers ------------------------------------------------------------------------


def test_budget_helpers() -> None:
    pol = policy(PRICED, max_cost_per_hour=Decimal("14.99"))
    assert budget_max_replicas(pol) == 2
    assert budget_max_replicas(PRICED) is None


# --- sharing a pool ------------------------------------------------------------------------


def req(key: str, gpus: int, current: int, wanted: int) -> PoolRequest:
    return PoolRequest(
        key=key, gpus_per_replica=gpus, current_replicas=current, wanted_replicas=wanted
    )


@pytest.mark.parametrize(
    ("free", "requests", "expected"),
    [
        pytest.param(100, [req("a", 1, 1, 3), req("b", 2, 0, 2)], {"a": 97, "b": 49}, id="room"),
        pytest.param(
            6, [req("a", 1, 4, 10), req("b", 1, 0, 10)], {"a": 5, "b": 5}, id="level-up-the-lowest"
        ),
        pytest.param(
            4, [req("a", 2, 0, 5), req("b", 1, 0, 5)], {"a": 1, "b": 2}, id="fair-by-gpus"
        ),
        pytest.param(
            8,
            [req("big", 8, 0, 1), req("small", 1, 0, 8)],
            {"big": 0, "small": 8},
            id="whole-replicas-smaller-first-on-ties",
        ),
        pytest.param(
            9,
            [req("big", 8, 0, 1), req("small", 1, 0, 1)],
            {"big": 1, "small": 1},
            id="both-fit",
        ),
        pytest.param(
            3, [req("a", 1, 5, 2), req("b", 1, 0, 1)], {"a": 7, "b": 3}, id="no-take-back"
        ),
        pytest.param(-4, [req("a", 1, 2, 5)], {"a": 2}, id="overcommitted-pool"),
        pytest.param(5, [], {}, id="nobody"),
    ],
)
def test_share_pool_capacity(
    free: int, requests: list[PoolRequest], expected: dict[str, int]
) -> None:
    assert share_pool_capacity(free, requests) == expected


def test_share_pool_rejects_duplicate_keys() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        share_pool_capacity(4, [req("a", 1, 0, 1), req("a", 1, 0, 2)])


_REQUESTS = st.lists(
    st.tuples(st.integers(1, 8), st.integers(0, 6), st.integers(0, 12)), max_size=6
).map(lambda rows: [req(f"s{i}", g, c, w) for i, (g, c, w) in enumerate(rows)])


@given(free=st.integers(-2, 60), requests=_REQUESTS, seed=st.randoms())
def test_share_pool_properties(free: int, requests: list[PoolRequest], seed: Any) -> None:
    result = share_pool_capacity(free, requests)
    shuffled = list(requests)
    seed.shuffle(shuffled)
    assert share_pool_capacity(free, shuffled) == result
    granted = {
        r.key: max(0, min(result[r.key], r.wanted_replicas) - r.current_replicas) for r in requests
    }
    # Never more GPUs than the pool has, never less than a service holds.
    assert sum(granted[r.key] * r.gpus_per_replica for r in requests) <= max(0, free)
    assert all(result[r.key] >= r.current_replicas for r in requests)
    left = max(0, free) - sum(granted[r.key] * r.gpus_per_replica for r in requests)
    for r in requests:
        if result[r.key] < r.wanted_replicas:
            # Work-conserving: a service short of its want could not fit one more replica.
            assert left < r.gpus_per_replica
        else:
            # A satisfied service's maximum adds what is left, in its own replicas.
            headroom = left // r.gpus_per_replica
            assert result[r.key] == max(r.current_replicas, r.wanted_replicas) + headroom
    # Max-min on GPUs held: when another service got its last replica, a service left short
    # (and still able to fit one then) held at least as many GPUs as that other one had.
    for short, other in itertools.permutations(requests, 2):
        if (
            result[short.key] < short.wanted_replicas
            and granted[other.key] > 0
            and short.gpus_per_replica <= left + other.gpus_per_replica
        ):
            allocated = other.current_replicas + granted[other.key]
            other_before_last = (allocated - 1) * other.gpus_per_replica
            assert other_before_last <= result[short.key] * short.gpus_per_replica


# --- validation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes",
    [
        {"min_replicas": 3, "max_replicas": 2},
        {"min_replicas": -1},
        {"max_replicas": 0, "min_replicas": 0},
        {"manual_replicas": -1},
        {"tolerance_percent": 101},
        {"metrics": (UTIL, UTIL)},
        {"scale_to_zero_after_seconds": -1},
        {"gpus_per_replica": 0},
        {"on_metrics_unavailable": FALLBACK},
        {"fallback_replicas": 2},
        {"on_metrics_unavailable": FALLBACK, "fallback_replicas": -1},
        {"price_per_gpu_hour": Decimal(-1)},
        {"max_cost_per_hour": Decimal("NaN")},
    ],
)
def test_invalid_policies(changes: dict[str, Any]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - one message per rule
        replace(BASE, **changes)


@pytest.mark.parametrize(
    "build",
    [
        lambda: MetricSpec(MetricType.GPU_UTILIZATION),
        lambda: MetricSpec(MetricType.GPU_MEMORY, target_percent=0),
        lambda: MetricSpec(MetricType.GPU_UTILIZATION, target_percent=101),
        lambda: MetricSpec(MetricType.PROMETHEUS, target_percent=50),
        lambda: MetricSpec(
            MetricType.GPU_UTILIZATION, target_percent=50, prometheus=QUEUE.prometheus
        ),
        lambda: PrometheusMetric("q", 0.0),
        lambda: PrometheusMetric("q", math.inf),
        lambda: PrometheusMetric("q", 1.0, activation_value=-1),
        lambda: PrometheusMetric("q", 1.0, labels=(("a", "1"), ("a", "2"))),
        lambda: PrometheusMetric("q", 1.0, labels=(("namespace", "other"),)),
        lambda: PrometheusMetric("bad-name", 1.0),
        lambda: ScalingBehavior(stabilization_window_seconds=-1),
        lambda: ScalingBehavior(stabilization_window_seconds=0, period_seconds=0),
        MetricSample,
        lambda: MetricSample(total=1.0, unavailable_reason="X"),
        lambda: MetricSample(total=1.0),
        lambda: ScalingState(current_replicas=-1, ready_replicas=0),
        lambda: PoolRequest(key="a", gpus_per_replica=0, current_replicas=0, wanted_replicas=1),
    ],
)
def test_invalid_inputs(build: Any) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - one message per rule
        build()


def test_equal_prometheus_specs_are_one_key() -> None:
    one = PrometheusMetric("q", 1.0, labels=(("b", "2"), ("a", "1")))
    two = PrometheusMetric("q", 1.0, labels=(("a", "1"), ("b", "2")))
    assert one == two
    assert hash(one) == hash(two)


@pytest.mark.parametrize(
    ("samples", "message"),
    [
        ({QUEUE: total(1)}, "does not list"),
        ({UTIL: total(1)}, "sample kind"),
    ],
)
def test_decide_rejects_mismatched_samples(
    samples: dict[MetricSpec, MetricSample], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        decide(samples, state(1), BASE, None, T0)


def test_decide_rejects_a_wrong_kind_for_prometheus() -> None:
    with pytest.raises(ValueError, match="sample kind"):
        decide({QUEUE: pods(1)}, state(1), Q, None, T0)


def test_decide_needs_an_aware_clock_and_sane_capacity() -> None:
    with pytest.raises(ValueError, match="timezone"):
        decide({}, state(1), BASE, None, datetime(2025, 1, 1))  # noqa: DTZ001 - the point
    with pytest.raises(ValueError, match="capacity"):
        decide({}, state(1), BASE, -1, T0)
