"""The autoscaler: one loop for every AIService, not a timer per object.

Each tick sends a fixed set of PromQL queries (three GPU series, plus one per distinct
tenant metric declaration, whatever the number of services), maps the series to services
through the cached pods, decides every service with the pure ``decide`` (twice: once to
learn what each service wants, once with its fair share of the pool), and hands changed
decisions to the service reconcile, which applies them and writes the status.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
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
    ScalingPolicy,
    ScalingState,
    decide,
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


@dataclass
class _Candidate:
    key: ServiceKey
    pool: GPUPool
    policy: ScalingPolicy
    samples: dict[MetricSpec, MetricSample]
    state: ScalingState


async def autoscale_forever(op: Operator) -> None:
    interval = op.settings.autoscale_interval
    while True:
        started = time.monotonic()
        try:
            await tick(op, datetime.now(UTC))
        except Exception:  # the loop must outlive any one bad tick
            logger.exception("autoscaler tick failed")
            op.metrics.autoscaler_errors.labels(stage="tick").inc()
        elapsed = time.monotonic() - started
        op.metrics.autoscaler_tick_seconds.observe(elapsed)
        op.metrics.autoscaler_last_tick.set(time.time())
        await asyncio.sleep(max(0.0, interval - elapsed))


def _tenant_query(spec: MetricSpec, window_seconds: int) -> str | None:
    source = spec.prometheus
    if source is None:
        return None
    return prometheus_metric_group_query(
        source.metric, source.label_map, source.aggregation, window_seconds=window_seconds
    )


async def tick(op: Operator, now: datetime) -> None:
    candidates = _candidates(op)
    window = op.settings.metrics_window_seconds
    queries: dict[str, str] = {
        series.value: query for series, query in gpu_queries(window_seconds=window).items()
    }
    for candidate in candidates:
        for spec in candidate.policy.metrics:
            query = _tenant_query(spec, window)
            if query is not None:
                queries[query] = query
    answers = await _run_queries(op, queries)

    gpu_values: dict[str, Mapping[tuple[str, str], float] | str] = {}
    for series in GpuSeries:
        gpu_values[series.value] = _parsed(answers[series.value], parse_vector_response)
    pods_by_service = _ready_pods_by_service(op)
    for candidate in candidates:
        candidate.samples = _samples(
            candidate,
            gpu_values=gpu_values,
            answers=answers,
            pods_by_service=pods_by_service,
            now=now,
            window_seconds=window,
        )

    # Pass 1: what each service wants, ignoring the pool. Pass 2: each one's fair share.
    wanted = {c.key: decide(c.samples, c.state, c.policy, None, now) for c in candidates}
    shares: dict[ServiceKey, int] = {}
    by_pool: dict[str, list[_Candidate]] = defaultdict(list)
    for candidate in candidates:
        by_pool[candidate.pool.name].append(candidate)
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
        share = share_pool_capacity(usage.available, requests)
        for request, candidate in zip(requests, members, strict=True):
            shares[candidate.key] = share[request.key]
    for candidate in candidates:
        decision = decide(
            candidate.samples, candidate.state, candidate.policy, shares.get(candidate.key), now
        )
        _record(op, candidate.key, decision)


def _candidates(op: Operator) -> list[_Candidate]:
    candidates = []
    for key in op.caches.service_keys():
        body = op.caches.service(key)
        if body is None or key in op.not_accepted:
            continue
        try:
            service = AIService.from_mapping(body)
        except ValidationError:
            continue  # the service reconcile reports it
        pool_body = op.caches.pool(service.spec.pool)
        if pool_body is None:
            continue
        try:
            pool = GPUPool.from_mapping(pool_body)
            policy = scaling_policy(service.spec, pool)
        except (ValidationError, ValueError):
            continue
        live = op.caches.deployment(key)
        if live is None:
            continue  # not created yet: nothing to resize
        current = int(live["spec"].get("replicas") or 0)
        ready = int((live.get("status") or {}).get("readyReplicas") or 0)
        state = op.scaling_states.get(key) or ScalingState(current, ready)
        candidates.append(_Candidate(key, pool, policy, {}, state.observed(current, ready)))
    return candidates


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


def _samples(
    candidate: _Candidate,
    *,
    gpu_values: Mapping[str, Any],
    answers: Mapping[str, Any],
    pods_by_service: Mapping[ServiceKey, list[str]],
    now: datetime,
    window_seconds: int,
) -> dict[MetricSpec, MetricSample]:
    samples: dict[MetricSpec, MetricSample] = {}
    namespace = candidate.key[0]
    pods = pods_by_service.get(candidate.key, [])
    for spec in candidate.policy.metrics:
        if spec.type is MetricType.PROMETHEUS:
            query = _tenant_query(spec, window_seconds)
            grouped = _parsed(answers[query], parse_grouped_response) if query else None
            if isinstance(grouped, str):
                samples[spec] = MetricSample.unavailable(grouped)
            elif grouped is not None and candidate.key in grouped:
                samples[spec] = MetricSample.service_total(grouped[candidate.key], now)
            else:
                # Silence is not zero demand: a wake signal must be exported even when idle.
                samples[spec] = MetricSample.unavailable("NoSeries")
            continue
        if not pods:
            continue  # decide() knows a GPU metric has nothing to read without pods
        series = (
            GpuSeries.MEMORY.value
            if spec.type is MetricType.GPU_MEMORY
            else candidate.pool.spec.utilization_metric
        )
        values = gpu_values[series]
        if isinstance(values, str):
            samples[spec] = MetricSample.unavailable(values)
            continue
        found = {pod: values[(namespace, pod)] for pod in pods if (namespace, pod) in values}
        if not found:
            samples[spec] = MetricSample.unavailable("NoSeries")
        elif all(math.isnan(v) for v in found.values()):
            samples[spec] = MetricSample.unavailable("NaN")
        else:
            samples[spec] = MetricSample.per_pod(found, now)
    return samples


def _record(op: Operator, key: ServiceKey, decision: Decision) -> None:
    op.scaling_states[key] = decision.state
    previous = op.decisions.get(key)
    op.decisions[key] = decision
    op.metrics.autoscaler_desired_replicas.labels(namespace=key[0], service=key[1]).set(
        decision.desired_replicas
    )
    if previous is None or _visible(previous) != _visible(decision):
        op.metrics.autoscaler_decisions.labels(reason=decision.reason.value).inc()
        op.service_queue.add(key)


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
    )


def _rounded(value: float | None) -> float | None:
    # Status shows one decimal; a utilisation wobbling below it must not rewrite it.
    return None if value is None or not math.isfinite(value) else round(value, 1)
