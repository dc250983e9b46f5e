"""The autoscaler: one loop for every AIService, not a timer per object.

Each tick sends a fixed set of PromQL queries (three GPU series, plus one per distinct
tenant metric declaration, whatever the number of services), maps the series to services
through the cached pods, decides each service with the pure ``decide`` (once to learn what
it wants, and again with its fair share of the pool where that share cuts it), records the
decisions in the operator's :class:`~gpuyard.handlers.scaling.ScalingBook`, and hands those
that change a status to the service reconcile, which applies them and writes the status. A
service whose last decision repeats itself, reading what it read then, is not decided
again (``logic.autoscale.repeats``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from gpuyard.api.names import ServiceKey
from gpuyard.handlers.context import Operator
from gpuyard.handlers.quota import namespace_on_pool
from gpuyard.handlers.scaling import Read, ScalingSpec, Unavailable
from gpuyard.io.prometheus import Prometheus, PrometheusUnavailableError
from gpuyard.logic.autoscale import (
    Decision,
    MetricSample,
    MetricSpec,
    MetricType,
    PoolRequest,
    ScalingState,
    decide,
    share_pool_capacity,
)
from gpuyard.logic.promql import (
    Aggregation,
    GpuSeries,
    PodKey,
    PrometheusResponseError,
    gpu_queries,
    parse_grouped_response,
    parse_vector_by_owner,
    prometheus_metric_group_query,
)
from gpuyard.logic.startup import observe_starts

logger = logging.getLogger(__name__)

K = TypeVar("K")
T = TypeVar("T")

#: A GPU answer: each service's ready pods and their values.
_PodValues = dict[ServiceKey, dict[str, float]]
#: A tenant metric's answer: each service's total.
_Totals = dict[ServiceKey, float]


@dataclass(slots=True, kw_only=True)
class _Candidate:
    """A service to decide in this tick."""

    key: ServiceKey
    spec: ScalingSpec
    state: ScalingState
    reads: dict[MetricSpec, Read]
    samples: dict[MetricSpec, MetricSample]
    #: What its namespace's quota on the pool lets it run (None: no quota).
    quota_max_replicas: int | None = None


class Autoscaler:
    """The loop, and which service each ready pod serves (rebuilt when the pods change).

    What it keeps of each service lives in the operator's scaling book, where the service
    reconcile reads it.
    """

    def __init__(self, op: Operator) -> None:
        self.op = op
        self._ready_pods = _ReadyPods([])

    async def run_forever(self) -> None:
        op = self.op
        interval = op.settings.autoscale_interval
        while True:
            started = time.monotonic()
            try:
                await self.tick(datetime.now(UTC))
            except Exception:  # the loop must outlive any one bad tick
                logger.exception("autoscaler tick failed")
                op.metrics.autoscaler_errors.labels(stage="tick").inc()
            elapsed = time.monotonic() - started
            op.metrics.autoscaler_tick_seconds.observe(elapsed)
            op.metrics.autoscaler_last_tick.set(time.time())
            await asyncio.sleep(max(0.0, interval - elapsed))

    async def tick(self, now: datetime) -> None:
        op = self.op
        services = _services(op)
        ready_pods = self._ready_pods_now()
        gpu_answers, tenant_answers = await _ask(op, services, ready_pods)

        # Pass 1: what each service wants, ignoring the pool; a service that wants no more
        # than it runs is settled at once (only growth competes for free GPUs, see
        # _fair_shares). Pass 2: each growing one's fair share, deciding again those whose
        # share cuts it. A service whose last decision repeats itself is not decided again:
        # it keeps its count (at its target, or asleep at zero), so it neither grows nor can
        # be cut.
        shown: Counter[str] = Counter()  # decisions that change a status, by reason
        made = repeated = 0
        growing: list[tuple[_Candidate, Decision]] = []
        for key, spec in services:
            deployment = op.caches.deployment(key)
            if deployment is None:
                continue  # not created yet: nothing to resize
            reads = _reads(key, spec, gpu_answers, tenant_answers, ready_pods.services)
            state = op.scaling.state_to_decide(
                key,
                deployment=deployment,
                policy=spec.policy,
                reads=reads,
                now=now,
                starting=ready_pods.starting.get(key, 0),
            )
            if state is None:
                repeated += 1
                continue
            made += 1
            candidate = _Candidate(
                key=key,
                spec=spec,
                state=state,
                reads=reads,
                samples=_samples(reads, now),
                quota_max_replicas=_quota_max_replicas(op, key, spec, state),
            )
            wanted = decide(
                candidate.samples,
                state,
                spec.policy,
                None,
                now,
                quota_max_replicas=candidate.quota_max_replicas,
            )
            if wanted.desired_replicas > state.current_replicas:
                growing.append((candidate, wanted))
            else:
                _settle(op, candidate, wanted, shown)
        op.metrics.autoscaler_services.labels(decision="made").set(made)
        op.metrics.autoscaler_services.labels(decision="repeated").set(repeated)
        shares = _fair_shares(op, growing)
        for candidate, wanted in growing:
            share = shares.get(candidate.key)
            decision = wanted
            if not pool_is_no_limit(wanted, share):
                policy = candidate.spec.policy
                decision = decide(
                    candidate.samples,
                    candidate.state,
                    policy,
                    share,
                    now,
                    quota_max_replicas=candidate.quota_max_replicas,
                )
            _settle(op, candidate, decision, shown)
        for reason, count in shown.items():
            op.metrics.autoscaler_decisions.labels(reason=reason).inc(count)

    def _ready_pods_now(self) -> _ReadyPods:
        pods = list(self.op.caches.all_gpu_pods())
        if pods != self._ready_pods.pods:
            self._ready_pods = _ReadyPods(pods)
            _observe_starts(self.op, self._ready_pods)
        return self._ready_pods


async def autoscale_forever(op: Operator) -> None:
    await Autoscaler(op).run_forever()


def _observe_starts(op: Operator, pods: _ReadyPods) -> None:
    """Add the starts of pods that turned Ready to their services' recent starts, and hand
    each service whose status.startup changes to the service reconcile."""
    for key, ready in pods.ready_by_service.items():
        recent = op.startups.get(key, ())
        updated = observe_starts(recent, ready)
        if updated is not recent:
            op.startups[key] = updated
            op.service_queue.add(key)


def _settle(op: Operator, candidate: _Candidate, decision: Decision, shown: Counter[str]) -> None:
    """Record the decision; hand it to the service reconcile if status would show a change."""
    key = candidate.key
    previous = op.scaling.decision(key)
    if previous is None or previous.desired_replicas != decision.desired_replicas:
        op.metrics.autoscaler_desired_replicas.labels(namespace=key[0], service=key[1]).set(
            decision.desired_replicas
        )
    if op.scaling.record(key, decision, policy=candidate.spec.policy, reads=candidate.reads):
        op.service_queue.add(key)
        shown[decision.reason.value] += 1


def _fair_shares(op: Operator, growing: list[tuple[_Candidate, Decision]]) -> dict[ServiceKey, int]:
    """Each growing service's maximum replicas from its pool's free GPUs.

    Only growth competes for free GPUs: a service that wants no more than it runs neither
    takes from the others nor can be cut (capacity never takes back), so it is left out
    and keeps its first decision.
    """
    by_pool: dict[str, list[tuple[_Candidate, Decision]]] = defaultdict(list)
    for candidate, wanted in growing:
        by_pool[candidate.spec.pool_name].append((candidate, wanted))
    shares: dict[ServiceKey, int] = {}
    for pool_name, members in by_pool.items():
        usage = op.pool_usage.get(pool_name)
        if usage is None:
            continue
        requests = [
            PoolRequest(
                key=f"{c.key[0]}/{c.key[1]}",
                gpus_per_replica=c.spec.policy.gpus_per_replica,
                current_replicas=c.state.current_replicas,
                wanted_replicas=wanted.desired_replicas,
            )
            for c, wanted in members
        ]
        # Replicas asked for but not yet bound hold no node's GPUs yet, though they count
        # in every current count: their GPUs are spoken for, not free.
        pending = max(0, sum(usage.allocated_by_namespace.values()) - usage.allocated)
        free = max(0, usage.available - pending)
        share = share_pool_capacity(free, requests)
        for request, (candidate, _) in zip(requests, members, strict=True):
            # Free GPUs spread over nodes hold fewer whole replicas than their sum.
            gpus = request.gpus_per_replica
            fits = min(usage.replicas_that_fit(gpus), free // gpus)
            shares[candidate.key] = min(share[request.key], request.current_replicas + fits)
    return shares


def _quota_max_replicas(
    op: Operator, key: ServiceKey, spec: ScalingSpec, state: ScalingState
) -> int | None:
    """What the namespace's quota on the pool lets the service run, whatever it wants: the
    decision is capped by it (limiting factor Quota) before the pool's free GPUs are shared,
    so replicas the quota cuts take no free GPUs from the services that can use them."""
    quota = spec.namespace_quota
    usage = op.pool_usage.get(spec.pool_name)
    if quota is None or usage is None:
        return None
    gpus = spec.policy.gpus_per_replica
    tenant = namespace_on_pool(
        op, key, pool_name=spec.pool_name, usage=usage, gpus_per_replica=gpus
    )
    # Asking for the most it could want gives its whole share: a share below it is the
    # same as the share of any smaller want, capped at that want.
    most = max(spec.policy.max_replicas, spec.policy.manual_replicas or 0, state.current_replicas)
    return tenant.verdict(quota, gpus_per_replica=gpus, wanted_replicas=most).max_replicas


def pool_is_no_limit(wanted: Decision, share: int | None) -> bool:
    """Whether ``decide`` with this capacity share would return ``wanted`` unchanged.

    ``decide`` caps the count at ``max(share, current)`` after the budget. Without a budget
    cut, the count before the caps is ``wanted.desired_replicas``; a cap at or above it moves
    nothing and flags nothing, so the second call can be skipped. With a budget or quota
    cut the count before the caps is unknown here: decide again.
    """
    if share is None:
        return True
    if wanted.budget_limited or wanted.quota_limited:
        return False
    return max(share, wanted.current_replicas) >= (wanted.desired_replicas)


def _services(op: Operator) -> list[tuple[ServiceKey, ScalingSpec]]:
    """The accepted services whose spec and pool parse, each with its parsed spec."""
    keys = op.caches.service_keys()
    op.scaling.retain(keys)
    services = []
    pools: dict[str, Mapping[str, Any] | None] = {}  # a few pools serve many services
    for key in keys:
        body = op.caches.service(key)
        if body is None or key in op.not_accepted:
            continue
        pool_name = (body.get("spec") or {}).get("pool")
        if not isinstance(pool_name, str):
            continue
        if pool_name not in pools:
            pools[pool_name] = op.caches.pool(pool_name)
        pool_body = pools[pool_name]
        if pool_body is None:
            continue
        spec = op.scaling.track(key, body, pool_body)
        if spec is not None:  # else the service reconcile reports what is wrong
            services.append((key, spec))
    return services


async def _ask(
    op: Operator, services: list[tuple[ServiceKey, ScalingSpec]], ready_pods: _ReadyPods
) -> tuple[dict[GpuSeries, _PodValues | Unavailable], dict[MetricSpec, _Totals | Unavailable]]:
    """Every query of the tick, concurrently: the GPU series, grouped by the service of each
    ready pod, and each tenant metric's totals by service."""
    window = op.settings.metrics_window_seconds
    gpu = gpu_queries(window_seconds=window, exporter=op.settings.gpu_exporter_matchers)
    tenant = _tenant_queries(
        services, window_seconds=window, namespace_label=op.settings.tenant_namespace_label
    )
    texts = {text: text for text in tenant.values()}
    by_service = functools.partial(parse_vector_by_owner, owners=ready_pods.owners)
    by_namespace = functools.partial(
        parse_grouped_response, namespace_label=op.settings.tenant_namespace_label
    )
    started = time.monotonic()
    gpu_answers, tenant_answers = await asyncio.gather(
        _answers(op, gpu, by_service), _answers(op, texts, by_namespace)
    )
    if op.prometheus is not None:
        op.metrics.prometheus_query_seconds.observe(time.monotonic() - started)
        op.metrics.prometheus_queries.inc(len(gpu) + len(texts))
    return gpu_answers, {metric: tenant_answers[text] for metric, text in tenant.items()}


#: What makes two tenant metric declarations one query: name, matchers and aggregation (the
#: target and activation value only matter to the decision).
_Selector = tuple[str, tuple[tuple[str, str], ...], Aggregation]


def _tenant_queries(
    services: list[tuple[ServiceKey, ScalingSpec]], *, window_seconds: int, namespace_label: str
) -> dict[MetricSpec, str]:
    """Each tenant metric's query: one per distinct declaration, not per service, scoped to
    the namespaces of the services that declare it (so it reads none of the shared
    Prometheus's other namespaces)."""
    namespaces: dict[_Selector, set[str]] = defaultdict(set)
    selectors: dict[MetricSpec, _Selector] = {}
    for (namespace, _), spec in services:
        for metric in spec.policy.prometheus_metrics:
            source = metric.prometheus
            if source is None:
                continue
            selector = (source.metric, source.labels, source.aggregation)
            selectors[metric] = selector
            namespaces[selector].add(namespace)
    texts: dict[_Selector, str] = {}
    for selector, declared_in in namespaces.items():
        metric_name, labels, aggregation = selector
        texts[selector] = prometheus_metric_group_query(
            metric_name,
            dict(labels),
            aggregation,
            declared_in,
            window_seconds=window_seconds,
            namespace_label=namespace_label,
        )
    return {metric: texts[selector] for metric, selector in selectors.items()}


async def _answers(
    op: Operator, queries: Mapping[K, str], parse: Callable[[Mapping[str, Any]], T]
) -> dict[K, T | Unavailable]:
    """Each query's parsed answer, or why there is none. Each answer is parsed in the
    worker thread that fetched it."""
    if op.prometheus is None:
        return dict.fromkeys(queries, Unavailable("PrometheusNotConfigured"))
    prometheus = op.prometheus
    results = await asyncio.gather(
        *(op.io(_fetch, prometheus, query, parse) for query in queries.values()),
        return_exceptions=True,
    )
    answers: dict[K, T | Unavailable] = {}
    for key, result in zip(queries, results, strict=True):
        if isinstance(result, PrometheusResponseError):
            answers[key] = Unavailable(result.reason)
        elif isinstance(result, PrometheusUnavailableError):
            op.metrics.autoscaler_errors.labels(stage="query").inc()
            answers[key] = Unavailable(result.reason)
        elif isinstance(result, BaseException):
            op.metrics.autoscaler_errors.labels(stage="query").inc()
            answers[key] = Unavailable("PrometheusError")
        else:
            answers[key] = result
    return answers


def _fetch(prometheus: Prometheus, query: str, parse: Callable[[Mapping[str, Any]], T]) -> T:
    return parse(prometheus.query(query))


class _ReadyPods:
    """Which service each ready, running pod serves (a GPU metric reads those pods only),
    and how many pods of each service are in the middle of their start."""

    def __init__(self, pods: list[Any]) -> None:
        self.pods = pods  # the cached pod objects this was built from
        #: (namespace, pod) -> (the pod's service, its name), for parse_vector_by_owner.
        self.owners: dict[PodKey, tuple[ServiceKey, str]] = {}
        #: The services with a ready pod (a GPU metric of one without reads nothing).
        self.services: set[ServiceKey] = set()
        #: Per service, its pods that hold a node but are not ready yet (ScalingState).
        self.starting: Counter[ServiceKey] = Counter()
        #: Per service, its ready pods (their starts feed status.startup).
        self.ready_by_service: dict[ServiceKey, list[Any]] = defaultdict(list)
        for pod in pods:
            if not pod.service:
                continue
            service = (pod.namespace, pod.service)
            if pod.starting:
                self.starting[service] += 1
            elif pod.ready and pod.phase == "Running":
                self.services.add(service)
                self.owners[pod.namespace, pod.name] = (service, pod.name)
                self.ready_by_service[service].append(pod)


def _reads(
    key: ServiceKey,
    spec: ScalingSpec,
    gpu_answers: Mapping[GpuSeries, _PodValues | Unavailable],
    tenant_answers: Mapping[MetricSpec, _Totals | Unavailable],
    with_ready_pods: set[ServiceKey],
) -> dict[MetricSpec, Read]:
    reads: dict[MetricSpec, Read] = {}
    for metric in spec.policy.metrics:
        if metric.prometheus is not None:
            totals = tenant_answers[metric]
            if isinstance(totals, Unavailable):
                reads[metric] = totals
            else:
                # Silence is not zero demand: a wake signal must be exported even when idle.
                reads[metric] = totals.get(key, Unavailable("NoSeries"))
            continue
        if key not in with_ready_pods:
            continue  # decide() knows a GPU metric has nothing to read without pods
        series = (
            GpuSeries.MEMORY if metric.type is MetricType.GPU_MEMORY else spec.utilization_series
        )
        answer = gpu_answers[series]
        if isinstance(answer, Unavailable):
            reads[metric] = answer
            continue
        values = answer.get(key)
        if values is None:
            reads[metric] = Unavailable("NoSeries")
        elif all(math.isnan(value) for value in values.values()):
            reads[metric] = Unavailable("NaN")
        else:
            reads[metric] = values
    return reads


def _samples(reads: Mapping[MetricSpec, Read], now: datetime) -> dict[MetricSpec, MetricSample]:
    samples: dict[MetricSpec, MetricSample] = {}
    for metric, read in reads.items():
        if isinstance(read, Unavailable):
            samples[metric] = MetricSample.unavailable(read.reason)
        elif isinstance(read, float):
            samples[metric] = MetricSample.service_total(read, now)
        else:
            samples[metric] = MetricSample(pod_values=read, observed_at=now)
    return samples
