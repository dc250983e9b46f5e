"""Scaling that knows about cold starts (logic.autoscale): a replica not ready yet is
capacity on its way. Table cases for the rule, then a tick-by-tick model of a Deployment
whose pods take a minute to become ready, as the local cluster's kwok stages make them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from gpuyard.api.reasons import LimitingFactor, Reason
from gpuyard.logic.autoscale import (
    MetricSample,
    MetricSpec,
    MetricType,
    Mode,
    PrometheusMetric,
    ScalingBehavior,
    ScalingPolicy,
    ScalingState,
    decide,
)

T0 = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
UTIL = MetricSpec(MetricType.GPU_UTILIZATION, target_percent=50)
INFLIGHT = MetricSpec(
    MetricType.PROMETHEUS,
    prometheus=PrometheusMetric("inflight", target_per_replica=1.0, activation_value=0.5),
)
NOW = ScalingBehavior(stabilization_window_seconds=0)
BASE = ScalingPolicy(min_replicas=1, max_replicas=10, metrics=(UTIL,), scale_up=NOW, scale_down=NOW)
ZERO = replace(
    BASE, min_replicas=0, metrics=(INFLIGHT,), scale_to_zero_after_seconds=5, max_replicas=10
)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def state(current: int, ready: int, starting: int) -> ScalingState:
    return ScalingState(current_replicas=current, ready_replicas=ready, starting_replicas=starting)


def per_pod(*values: float) -> dict[MetricSpec, MetricSample]:
    return {UTIL: MetricSample.per_pod({f"p{i}": v for i, v in enumerate(values)}, T0)}


def in_flight(value: float, when: datetime = T0) -> dict[MetricSpec, MetricSample]:
    return {INFLIGHT: MetricSample.service_total(value, when)}


# --- the rule, case by case --------------------------------------------------------------------


def test_a_scale_down_waits_while_a_replica_is_starting() -> None:
    # Two ready pods at 10 % ask for one replica; two more are starting: removing any pod
    # now would remove a starting one (the ReplicaSet deletes unready pods first).
    decision = decide(per_pod(10, 10), state(4, 2, 2), BASE, None, T0)
    assert decision.recommended_replicas < 4
    assert decision.desired_replicas == 4
    assert decision.limiting_factor is LimitingFactor.REPLICAS_STARTING
    assert "limited by ReplicasStarting" in decision.message


def test_once_no_replica_is_starting_the_scale_down_goes_ahead() -> None:
    decision = decide(per_pod(10, 10, 10, 10), state(4, 4, 0), BASE, None, T0)
    assert decision.desired_replicas == 1
    assert decision.limiting_factor is None


def test_pods_not_bound_to_a_node_may_go_while_others_start() -> None:
    # Five asked for, one ready, one starting, three Pending without a node (no GPU for
    # them): those three hold nothing and have started nothing, so they may go.
    policy = replace(BASE, metrics=(INFLIGHT,))
    decision = decide(in_flight(1), state(5, 1, 1), policy, None, T0)
    assert decision.desired_replicas == 2
    assert decision.limiting_factor is LimitingFactor.REPLICAS_STARTING


def test_a_scale_up_is_not_held_by_a_start() -> None:
    # Both ready pods run at 100 %; the starting pod counts as idle capacity on its way
    # (as the HPA fills a missing pod on a scale-up): 200 GPU-% at 50 % needs 4 replicas.
    decision = decide(per_pod(100, 100), state(3, 2, 1), BASE, None, T0)
    assert decision.desired_replicas == 4
    assert decision.reason is Reason.ABOVE_TARGET


def test_the_same_demand_adds_nothing_while_the_replicas_it_asked_for_start() -> None:
    # One ready pod at 100 % asked for two; while the second starts the demand it reads is
    # what the two will serve: no third replica for the same load.
    decision = decide(per_pod(100), state(2, 1, 1), BASE, None, T0)
    assert decision.desired_replicas == 2


def test_never_to_zero_while_a_replica_is_starting() -> None:
    # Idle for longer than scaleToZeroAfterSeconds, but the one replica is still starting.
    quiet = ScalingState(
        current_replicas=1, ready_replicas=0, starting_replicas=1, last_demand_time=at(-60)
    )
    decision = decide(in_flight(0), quiet, ZERO, None, T0)
    assert decision.reason is Reason.IDLE
    assert decision.desired_replicas == 1
    assert decision.limiting_factor is LimitingFactor.REPLICAS_STARTING
    # Ready: the idle timer has run out long ago, so it goes at once.
    ready = decide(in_flight(0, at(1)), replace(decision.state, ready_replicas=1,
                   starting_replicas=0), ZERO, None, at(1))  # fmt: skip
    assert ready.desired_replicas == 0
    assert ready.reason is Reason.IDLE


def test_the_budget_still_cuts_a_starting_replica() -> None:
    # The budget is a promise about spend: it is no scale-down of the autoscaler's.
    priced = replace(BASE, price_per_gpu_hour=Decimal(2), max_cost_per_hour=Decimal(4))
    decision = decide(per_pod(50, 50), state(3, 2, 1), priced, None, T0)
    assert decision.desired_replicas == 2
    assert decision.limiting_factor is LimitingFactor.BUDGET


def test_manual_mode_follows_spec_replicas() -> None:
    manual = replace(BASE, mode=Mode.OFF, manual_replicas=1)
    decision = decide({}, state(3, 1, 2), manual, None, T0)
    assert decision.desired_replicas == 1


# --- a Deployment whose pods take a minute to start ----------------------------------------------


@dataclass
class Pod:
    name: str
    ready_at: float


@dataclass
class ColdDeployment:
    """Pods ready ``delay`` seconds after they are asked for; scale-downs remove pods as the
    ReplicaSet controller ranks them (not ready before ready, then the newest first)."""

    delay: float
    pods: list[Pod] = field(default_factory=list)
    made: int = 0
    #: Pods removed in the middle of their start (must stay empty).
    killed_starting: list[str] = field(default_factory=list)
    desired: list[int] = field(default_factory=list)
    state: ScalingState | None = None

    def ready(self, t: float) -> list[Pod]:
        return [p for p in self.pods if p.ready_at <= t]

    def resize(self, count: int, t: float) -> None:
        while len(self.pods) < count:
            self.made += 1
            self.pods.append(Pod(f"p{self.made}", t + self.delay))
        while len(self.pods) > count:
            victim = max(self.pods, key=lambda p: (p.ready_at > t, p.ready_at))
            if victim.ready_at > t:
                self.killed_starting.append(victim.name)
            self.pods.remove(victim)

    def run(self, policy: ScalingPolicy, load: float | None, utilisation_load: float | None,
            seconds: range) -> ScalingState:  # fmt: skip
        current = self.state or ScalingState(current_replicas=len(self.pods), ready_replicas=0)
        for t in seconds:
            ready = self.ready(t)
            current = current.observed(len(self.pods), len(ready), len(self.pods) - len(ready))
            samples: dict[MetricSpec, MetricSample] = {}
            if utilisation_load is not None and ready:
                # The simulator's rule: the load spreads over the serving pods only.
                busy = min(100.0, utilisation_load / len(ready))
                samples[UTIL] = MetricSample.per_pod({p.name: busy for p in ready}, at(t))
            if load is not None:
                samples[INFLIGHT] = MetricSample.service_total(load, at(t))
            decision = decide(samples, current, policy, None, at(t))
            self.desired.append(decision.desired_replicas)
            self.resize(decision.desired_replicas, t)
            current = decision.state
        self.state = current
        return current


@pytest.mark.parametrize("load", [100, 150, 300, 450])
def test_a_load_step_asks_for_no_more_than_the_final_load_needs(load: int) -> None:
    # GPU utilisation at a 50 % target: `load` GPU-% needs ceil(load / 50) replicas. Ready
    # pods saturate at 100 %, so each step is at most a doubling, and waits for its pods.
    needed = math.ceil(load / 50)
    cold = ColdDeployment(delay=60, pods=[Pod("p0", -1)])
    cold.run(BASE, None, load, range(0, 400))
    assert cold.desired[-1] == needed
    assert max(cold.desired) == needed, cold.desired
    assert cold.killed_starting == []


def test_a_load_drop_during_the_start_removes_only_ready_replicas() -> None:
    cold = ColdDeployment(delay=60)
    cold.resize(1, -100)
    policy = replace(BASE, metrics=(INFLIGHT,))
    # Three requests: 1 -> 3; the two new pods start for 60 s. Then one request only.
    cold.run(policy, 3, None, range(0, 10))
    assert len(cold.pods) == 3
    held = cold.run(policy, 1, None, range(10, 59))
    assert len(cold.pods) == 3  # both still starting: nothing may go
    assert held.starting_replicas == 2
    cold.run(policy, 1, None, range(59, 80))
    assert len(cold.pods) == 1
    assert cold.killed_starting == []


def test_the_idle_scale_to_zero_waits_for_the_start() -> None:
    cold = ColdDeployment(delay=60)
    cold.run(ZERO, 1, None, range(0, 5))  # woken: one pod starting until t=60
    assert len(cold.pods) == 1
    cold.run(ZERO, 0, None, range(5, 60))  # idle from t=5, past the 5 s idle time at t=10
    assert len(cold.pods) == 1
    cold.run(ZERO, 0, None, range(60, 62))
    assert cold.pods == []
    assert cold.killed_starting == []
