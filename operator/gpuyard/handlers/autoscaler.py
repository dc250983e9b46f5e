"""The autoscaler: one loop for every AIService, not a timer per object.

Each tick sends a fixed set of PromQL queries (three GPU series, plus one per distinct
tenant metric declaration, whatever the number of services), maps the series to services
through the cached pods, decides each service with the pure ``decide`` (once to learn what
it wants, and again with its fair share of the pool where that share cuts it), and hands
changed decisions to the service reconcile, which applies them and writes the status. A
service at its target, or asleep at zero, that reads what it read at the last tick is not
decided again: its decision would be the same (``logic.autoscale.repeats``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from gpuyard.api.pool import GPUPool
from gpuyard.api.service import AIService
from gpuyard.handlers.context import Operator, ServiceKey
from gpuyard.io.prometheus import PrometheusUnavailableError
from gpuyard.logic.autoscale import (
    Decision,
    MetricSample,
    MetricSpec,
    MetricType,
    PoolRequest,
    PrometheusMetric,
    ScalingPolicy,
    ScalingState,
    decide,
    repeated_state,
    repeats,
    share_pool_capacity,
)
from gpuyard.logic.policy import scaling_policy
from gpuyard.logic.promql import (
    GpuSeries,
    PrometheusResponseError,
    gpu_queries,
    parse_grouped_response,
    parse_vector_response,
    prometheus_metric_group_query,
)

logger = logging.getLogger(__name__)


#: What the tick read for one metric of one service: each ready pod's value (GPU metrics),
#: the service's total (Prometheus metrics), or why there is none.
_Read = dict[str, float] | float | str


@dataclass(slots=True)
class _Candidate:
    key: ServiceKey
    pool_name: str
    utilization_series: str
    policy: ScalingPolicy
    state: ScalingState
    reads: dict[MetricSpec, _Read] = field(default_factory=dict)
    samples: dict[MetricSpec, MetricSample] = field(default_factory=dict)


@dataclass(slots=True)
class _Repeating:
    """A decision that :func:`repeats`, what it was decided from, and the last tick at which
    it held without being made again (None: none yet)."""

    policy: ScalingPolicy
    reads: dict[MetricSpec, _Read]
    decision: Decision
    held_at: datetime | None = None

    def holds_for(self, candidate: _Candidate) -> bool:
        return (
            candidate.policy is self.policy
            and candidate.state.current_replicas == self.decision.current_replicas
            and candidate.state.ready_replicas == self.decision.state.ready_replicas
            and candidate.reads == self.reads
        )


class TickMemory:
    """What the loop keeps from one tick to the next, to redo only what changed.

    ``entries``: each service's parsed spec and policy, reused while the service and its pool
    keep their uid and generation (the API server bumps the generation on every spec change):
    parsing and validating every AIService on every tick would cost more than deciding them.
    Objects without a uid or generation are parsed again when the cache holds a new body.

    ``repeating``: the services whose last decision repeats itself (:func:`repeats`). While
    what the tick reads for one, its policy and its replica counts stay the same, deciding it
    again would return the same decision with its state moved on; the tick only notes when
    that was, and moves the state on once, when the decision stops holding
    (:func:`repeated_state` gives the same state for the last such tick as for each in turn).
    """

    def __init__(self) -> None:
        self.entries: dict[ServiceKey, _Entry] = {}
        # One instance per distinct metric declaration: the tick keys its queries and
        # answers by spec, and an identical object is found without comparing fields.
        self.specs: dict[MetricSpec, MetricSpec] = {}
        self.repeating: dict[ServiceKey, _Repeating] = {}

    def parse(self, body: Mapping[str, Any], pool_body: Mapping[str, Any]) -> _Parsed | None:
        parsed = _parse(body, pool_body)
        if parsed is None:
            return None
        metrics = tuple(self.specs.setdefault(spec, spec) for spec in parsed.policy.metrics)
        return replace(parsed, policy=replace(parsed.policy, metrics=metrics))

    def repeat(self, candidate: _Candidate, recorded: Decision | None, now: datetime) -> bool:
        """Whether the service's last decision holds at ``now``; when it stops holding, the
        candidate's state is brought to the last tick at which it did."""
        repeating = self.repeating.get(candidate.key)
        if repeating is None:
            return False
        ours = recorded is repeating.decision  # else someone decided (or forgot) since
        if ours and repeating.holds_for(candidate):
            repeating.held_at = now
            return True
        del self.repeating[candidate.key]
        if ours and repeating.held_at is not None:
            candidate.state = repeated_state(
                candidate.state, repeating.decision, repeating.policy, repeating.held_at
            )
        return False

    def remember(self, candidate: _Candidate, decision: Decision) -> None:
        if repeats(decision, candidate.policy):
            self.repeating[candidate.key] = _Repeating(candidate.policy, candidate.reads, decision)


@dataclass(slots=True)
class _Entry:
    body: Mapping[str, Any]
    pool_body: Mapping[str, Any]
    stamp: tuple[Any, ...] | None
    parsed: _Parsed | None


@dataclass(frozen=True)
class _Parsed:
    """What the tick needs of a service and its pool, taken from the models once per
    generation: even attribute reads on the pydantic models add up at 10,000 services."""

    pool_name: str
    utilization_series: str
    policy: ScalingPolicy


async def autoscale_forever(op: Operator) -> None:
    interval = op.settings.autoscale_interval
    memory = TickMemory()
    while True:
        started = time.monotonic()
        try:
            await tick(op, datetime.now(UTC), memory)
        except Exception:  # the loop must outlive any one bad tick
            logger.exception("autoscaler tick failed")
            op.metrics.autoscaler_errors.labels(stage="tick").inc()
        elapsed = time.monotonic() - started
        op.metrics.autoscaler_tick_seconds.observe(elapsed)
        op.metrics.autoscaler_last_tick.set(time.time())
        await asyncio.sleep(max(0.0, interval - elapsed))


def _tenant_query(source: PrometheusMetric, window_seconds: int) -> str:
    return prometheus_metric_group_query(
        source.metric, source.label_map, source.aggregation, window_seconds=window_seconds
    )


async def tick(op: Operator, now: datetime, memory: TickMemory | None = None) -> None:
    memory = memory or TickMemory()
    candidates = _candidates(op, memory)
    window = op.settings.metrics_window_seconds
    queries: dict[str, str] = {
        series.value: query for series, query in gpu_queries(window_seconds=window).items()
    }
    # Each distinct tenant metric is built, sent and parsed once per tick, not per service.
    tenant_queries: dict[MetricSpec, str] = {}
    for candidate in candidates:
        for spec in candidate.policy.prometheus_metrics:
            if spec not in tenant_queries and spec.prometheus is not None:
                tenant_queries[spec] = _tenant_query(spec.prometheus, window)
    for query in tenant_queries.values():
        queries[query] = query
    answers = await _run_queries(op, queries)

    gpu_values: dict[str, Mapping[tuple[str, str], float] | str] = {}
    for series in GpuSeries:
        gpu_values[series.value] = _parsed(answers[series.value], parse_vector_response)
    grouped = {
        query: _parsed(answers[query], parse_grouped_response)
        for query in set(tenant_queries.values())
    }
    tenant_values = {spec: grouped[query] for spec, query in tenant_queries.items()}
    pods_by_service = _ready_pods_by_service(op)

    # Pass 1: what each service wants, ignoring the pool. Pass 2: each one's fair share, for
    # the services whose share cuts what they want (the others keep their first decision).
    # A service whose last decision repeats itself is not decided again: it keeps its count
    # (at its target, or asleep at zero), so it neither grows nor can be cut.
    wanted: dict[ServiceKey, Decision] = {}
    decided: list[_Candidate] = []
    for candidate in candidates:
        candidate.reads = _reads(
            candidate,
            gpu_values=gpu_values,
            tenant_values=tenant_values,
            pods_by_service=pods_by_service,
        )
        if memory.repeat(candidate, op.decisions.get(candidate.key), now):
            continue
        candidate.samples = _samples(candidate.reads, now)
        wanted[candidate.key] = decide(
            candidate.samples, candidate.state, candidate.policy, None, now
        )
        decided.append(candidate)
    op.metrics.autoscaler_services.labels(decision="made").set(len(decided))
    op.metrics.autoscaler_services.labels(decision="repeated").set(len(candidates) - len(decided))
    shares = _fair_shares(op, decided, wanted)
    shown: Counter[str] = Counter()  # decisions that change a status, by reason
    for candidate in decided:
        first = wanted[candidate.key]
        capacity = shares.get(candidate.key)
        decision = first
        if not pool_is_no_limit(first, capacity):
            decision = decide(candidate.samples, candidate.state, candidate.policy, capacity, now)
        if _record(op, candidate.key, decision):
            shown[decision.reason.value] += 1
        memory.remember(candidate, decision)
    for reason, count in shown.items():
        op.metrics.autoscaler_decisions.labels(reason=reason).inc(count)


def _fair_shares(
    op: Operator, candidates: list[_Candidate], wanted: Mapping[ServiceKey, Decision]
) -> dict[ServiceKey, int]:
    """Each growing service's maximum replicas from its pool's free GPUs.

    Only growth competes for free GPUs: a service that wants no more than it runs neither
    takes from the others nor can be cut (capacity never takes back), so it is left out
    and keeps its first decision.
    """
    by_pool: dict[str, list[_Candidate]] = defaultdict(list)
    for candidate in candidates:
        if wanted[candidate.key].desired_replicas > candidate.state.current_replicas:
            by_pool[candidate.pool_name].append(candidate)
    shares: dict[ServiceKey, int] = {}
    for pool_name, members in by_pool.items():
        usage = op.pool_usage.get(pool_name)
        if usage is None:
            continue
        requests = [
            PoolRequest(
                key=f"{c.key[0]}/{c.key[1]}",
                gpus_per_replica=c.policy.gpus_per_replica,
                current_replicas=c.state.current_replicas,
                wanted_replicas=wanted[c.key].desired_replicas,
            )
            for c in members
        ]
        # Replicas asked for but not yet bound hold no node's GPUs yet, though they count
        # in every current count: their GPUs are spoken for, not free.
        pending = max(0, sum(usage.allocated_by_namespace.values()) - usage.allocated)
        free = max(0, usage.available - pending)
        share = share_pool_capacity(free, requests)
        for request, candidate in zip(requests, members, strict=True):
            # Free GPUs spread over nodes hold fewer whole replicas than their sum.
            gpus = candidate.policy.gpus_per_replica
            fits = min(usage.replicas_that_fit(gpus), free // gpus)
            shares[candidate.key] = min(share[request.key], request.current_replicas + fits)
    return shares


def pool_is_no_limit(wanted: Decision, share: int | None) -> bool:
    """Whether ``decide`` with this capacity share would return ``wanted`` unchanged.

    ``decide`` caps the count at ``max(share, current)`` after the budget. Without a budget
    cut, the count before the caps is ``wanted.desired_replicas``; a cap at or above it moves
    nothing and flags nothing, so the second call can be skipped (most services, most
    ticks). With a budget cut the count before the caps is unknown here: decide again.
    """
    if share is None:
        return True
    return not wanted.budget_limited and max(share, wanted.current_replicas) >= (
        wanted.desired_replicas
    )


def _candidates(op: Operator, memory: TickMemory) -> list[_Candidate]:
    candidates = []
    previous, kept = memory.entries, {}
    for key in op.caches.service_keys():
        body = op.caches.service(key)
        if body is None or key in op.not_accepted:
            continue
        pool_name = (body.get("spec") or {}).get("pool")
        pool_body = op.caches.pool(pool_name) if isinstance(pool_name, str) else None
        if pool_body is None:
            continue
        entry = previous.get(key)
        # The caches replace a body on each watch event and never change one: the same
        # objects hold the same spec, and only new ones need a look at their generation.
        if entry is None or entry.body is not body or entry.pool_body is not pool_body:
            stamp = _stamp(body, pool_body)
            if entry is None or stamp is None or entry.stamp != stamp:
                entry = _Entry(body, pool_body, stamp, memory.parse(body, pool_body))
            else:
                entry = _Entry(body, pool_body, stamp, entry.parsed)
        kept[key] = entry
        parsed = entry.parsed
        if parsed is None:
            continue  # the service reconcile reports what is wrong with the spec
        live = op.caches.deployment(key)
        if live is None:
            continue  # not created yet: nothing to resize
        current = int(live["spec"].get("replicas") or 0)
        ready = int((live.get("status") or {}).get("readyReplicas") or 0)
        state = op.scaling_states.get(key) or ScalingState(current, ready)
        candidate = _Candidate(
            key, parsed.pool_name, parsed.utilization_series, parsed.policy,
            state.observed(current, ready),
        )  # fmt: skip
        candidates.append(candidate)
    # Services gone since the last tick drop out.
    memory.entries = kept
    for gone in memory.repeating.keys() - kept.keys():
        del memory.repeating[gone]
    return candidates


def _stamp(body: Mapping[str, Any], pool_body: Mapping[str, Any]) -> tuple[Any, ...] | None:
    service, pool = body.get("metadata") or {}, pool_body.get("metadata") or {}
    stamp = (service.get("uid"), service.get("generation"), pool.get("uid"), pool.get("generation"))
    return None if None in stamp else stamp


def _parse(body: Mapping[str, Any], pool_body: Mapping[str, Any]) -> _Parsed | None:
    try:
        service = AIService.from_mapping(body)
        pool = GPUPool.from_mapping(pool_body)
        policy = scaling_policy(service.spec, pool)
        return _Parsed(pool.name, pool.spec.utilization_metric, policy)
    except (ValidationError, ValueError):
        return None


async def _run_queries(op: Operator, queries: dict[str, str]) -> dict[str, Any]:
    """Every query of the tick, concurrently; each answer is a body or an error reason."""
    if op.prometheus is None:
        return dict.fromkeys(queries, "PrometheusNotConfigured")
    names = list(queries)
    started = time.monotonic()
    results = await asyncio.gather(
        *(op.io(op.prometheus.query, queries[name]) for name in names), return_exceptions=True
    )
    op.metrics.prometheus_query_seconds.observe(time.monotonic() - started)
    op.metrics.prometheus_queries.inc(len(names))
    answers: dict[str, Any] = {}
    for name, result in zip(names, results, strict=True):
        if isinstance(result, PrometheusUnavailableError):
            op.metrics.autoscaler_errors.labels(stage="query").inc()
            answers[name] = result.reason
        elif isinstance(result, BaseException):
            op.metrics.autoscaler_errors.labels(stage="query").inc()
            answers[name] = "PrometheusError"
        else:
            answers[name] = result
    return answers


def _parsed(answer: Any, parse: Any) -> Any:
    """The parsed answer, or the CamelCase reason it is unusable."""
    if isinstance(answer, str):
        return answer
    try:
        return parse(answer)
    except PrometheusResponseError as error:
        return error.reason


def _ready_pods_by_service(op: Operator) -> dict[ServiceKey, list[str]]:
    pods: dict[ServiceKey, list[str]] = defaultdict(list)
    for pod in op.caches.all_gpu_pods():
        if pod.service and pod.ready and pod.phase == "Running":
            pods[(pod.namespace, pod.service)].append(pod.name)
    return pods


def _reads(
    candidate: _Candidate,
    *,
    gpu_values: Mapping[str, Any],
    tenant_values: Mapping[MetricSpec, Mapping[ServiceKey, float] | str],
    pods_by_service: Mapping[ServiceKey, list[str]],
) -> dict[MetricSpec, _Read]:
    reads: dict[MetricSpec, _Read] = {}
    namespace = candidate.key[0]
    pods = pods_by_service.get(candidate.key, [])
    for spec in candidate.policy.metrics:
        if spec.prometheus is not None:  # a Prometheus metric
            grouped = tenant_values[spec]
            if isinstance(grouped, str):
                reads[spec] = grouped
            else:
                # Silence is not zero demand: a wake signal must be exported even when idle.
                reads[spec] = grouped.get(candidate.key, "NoSeries")
            continue
        if not pods:
            continue  # decide() knows a GPU metric has nothing to read without pods
        series = (
            GpuSeries.MEMORY.value
            if spec.type is MetricType.GPU_MEMORY
            else candidate.utilization_series
        )
        values = gpu_values[series]
        if isinstance(values, str):
            reads[spec] = values
            continue
        found: dict[str, float] = {}
        numbers = False
        for pod in pods:
            value = values.get((namespace, pod))
            if value is not None:
                found[pod] = value
                numbers = numbers or not math.isnan(value)
        reads[spec] = found if numbers else "NaN" if found else "NoSeries"
    return reads


def _samples(reads: Mapping[MetricSpec, _Read], now: datetime) -> dict[MetricSpec, MetricSample]:
    samples: dict[MetricSpec, MetricSample] = {}
    for spec, read in reads.items():
        if isinstance(read, str):
            samples[spec] = MetricSample.unavailable(read)
        elif isinstance(read, float):
            samples[spec] = MetricSample.service_total(read, now)
        else:
            samples[spec] = MetricSample(pod_values=read, observed_at=now)  # ours: no copy
    return samples


def _record(op: Operator, key: ServiceKey, decision: Decision) -> bool:
    """Keep the decision; hand it to the service reconcile if status would show a change."""
    op.scaling_states[key] = decision.state
    previous = op.decisions.get(key)
    op.decisions[key] = decision
    if previous is None or previous.desired_replicas != decision.desired_replicas:
        op.metrics.autoscaler_desired_replicas.labels(namespace=key[0], service=key[1]).set(
            decision.desired_replicas
        )
    if previous is not None and _visible(previous) == _visible(decision):
        return False
    op.service_queue.add(key)
    return True


def _visible(decision: Decision) -> tuple[Any, ...]:
    """What status shows of a decision: a change of anything else writes nothing."""
    return (
        decision.desired_replicas,
        decision.recommended_replicas,
        decision.reason,
        decision.limiting_factor,
        decision.metric,
        _rounded(decision.current_value),
        decision.capacity_limited,
        decision.missing_gpus,
        decision.budget_limited,
        decision.metrics_available,
        decision.metrics_unavailable_reason,
        # The message is shown by the conditions that are not in their quiet state
        # (MetricsAvailable not True, BudgetLimited or CapacityLimited True): there it
        # must stay current, or a restart would find it stale and write it.
        decision.message
        if decision.metrics_available is not True
        or decision.budget_limited
        or decision.capacity_limited
        else None,
    )


def _rounded(value: float | None) -> float | None:
    # Status shows one decimal; a utilisation wobbling below it must not rewrite it.
    return None if value is None or not math.isfinite(value) else round(value, 1)
