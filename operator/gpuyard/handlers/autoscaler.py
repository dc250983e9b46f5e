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
import functools
import gc
import logging
import math
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, cast

from pydantic import ValidationError

from gpuyard.api.names import ServiceKey
from gpuyard.api.pool import GPUPool
from gpuyard.api.service import AIService
from gpuyard.handlers.context import Operator
from gpuyard.io.prometheus import Prometheus, PrometheusUnavailableError
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
    PodKey,
    PrometheusResponseError,
    gpu_queries,
    parse_grouped_response,
    parse_vector_by_owner,
    prometheus_metric_group_query,
)

logger = logging.getLogger(__name__)


# Read for every metric of every service on every tick: bound once, as Python 3.11 routes a
# read of an enum member from its class through EnumType.__getattr__ (see logic.autoscale).
_GPU_MEMORY, _MEMORY_SERIES = MetricType.GPU_MEMORY, GpuSeries.MEMORY.value

#: A parsed answer: by (namespace, service), each one's total (tenant metrics) or its ready
#: pods' values (GPU metrics, :func:`parse_vector_by_owner`); or why there is none.
_Grouped = Mapping[ServiceKey, Any] | str

#: What the tick read for one metric of one service: each ready pod's value (GPU metrics),
#: the service's total (Prometheus metrics), or why there is none.
_Read = dict[str, float] | float | str


@dataclass(slots=True)
class _Candidate:
    key: ServiceKey
    entry: _Entry
    pool_name: str
    utilization_series: str
    policy: ScalingPolicy
    state: ScalingState
    reads: dict[MetricSpec, _Read] = field(default_factory=dict)
    samples: dict[MetricSpec, MetricSample] = field(default_factory=dict)


@dataclass(slots=True)
class _Repeating:
    """What a recorded decision that :func:`repeats` was decided from, and the last tick at
    which it held without being made again (None: none yet)."""

    policy: ScalingPolicy
    reads: dict[MetricSpec, _Read]
    held_at: datetime | None = None

    def holds_for(self, candidate: _Candidate, decision: Decision) -> bool:
        return (
            candidate.policy is self.policy
            and candidate.state.current_replicas == decision.current_replicas
            and candidate.state.ready_replicas == decision.state.ready_replicas
            and candidate.reads == self.reads
        )


class TickMemory:
    """What the loop keeps from one tick to the next, to redo only what changed: an
    :class:`_Entry` per service (``entries``), one instance per distinct metric declaration
    (``specs``: the tick keys its queries and answers by spec, and an identical object is
    found without comparing fields), and which service each ready pod serves."""

    def __init__(self) -> None:
        self.entries: dict[ServiceKey, _Entry] = {}
        self.specs: dict[MetricSpec, MetricSpec] = {}
        self.ready_pods = _ReadyPods([])

    def ready_pods_of(self, op: Operator) -> _ReadyPods:
        """The ready pods, rebuilt only when the cached pods changed: comparing the lists
        costs a tenth of building the map (the same objects compare by identity)."""
        pods = list(op.caches.all_gpu_pods())
        if pods != self.ready_pods.pods:
            self.ready_pods = _ReadyPods(pods)
        return self.ready_pods

    @property
    def repeating(self) -> set[ServiceKey]:
        """The services whose last decision repeats itself."""
        return {key for key, entry in self.entries.items() if entry.repeating is not None}

    def parse(self, body: Mapping[str, Any], pool_body: Mapping[str, Any]) -> _Parsed | None:
        parsed = _parse(body, pool_body)
        if parsed is None:
            return None
        metrics = tuple(self.specs.setdefault(spec, spec) for spec in parsed.policy.metrics)
        return replace(parsed, policy=replace(parsed.policy, metrics=metrics))


@dataclass(slots=True)
class _Entry:
    """What the loop keeps of one service.

    ``parsed``: its spec and policy, reused while the service and its pool keep their uid
    and generation (the API server bumps the generation on every spec change): parsing and
    validating every AIService on every tick would cost more than deciding them. Objects
    without a uid or generation are parsed again when the cache holds a new body.

    ``recorded`` and ``shown``: the decision the loop recorded last and what status shows of
    it (:func:`_visible`), so that the next decision is compared with it at the cost of one.

    ``repeating``: set while the recorded decision repeats itself (:func:`repeats`). While what
    the tick reads for the service, its policy and its replica counts stay the same,
    deciding it again would return the same decision with its state moved on; the tick only
    notes when that was, and moves the state on once, when the decision stops holding
    (:func:`repeated_state` gives the same state for the last such tick as for each in turn).
    """

    body: Mapping[str, Any]
    pool_body: Mapping[str, Any]
    stamp: tuple[Any, ...] | None
    parsed: _Parsed | None
    # The Deployment body the replica counts (spec, ready) were read from.
    deployment: Mapping[str, Any] | None = None
    counts: tuple[int, int] = (0, 0)
    recorded: Decision | None = None
    shown: tuple[Any, ...] | None = None
    repeating: _Repeating | None = None


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
    with _collector_paused():
        await _tick(op, now, memory or TickMemory())


@contextmanager
def _collector_paused() -> Iterator[None]:
    """No cyclic garbage collection while the tick runs.

    A tick allocates hundreds of thousands of objects at 10,000 services (decoded answers,
    readings, decisions) and frees them by reference counting, but each allocation counts
    towards the collector's threshold: left on, it scans them once or more per tick and
    finds no cycle to free, which was a seventh of the tick's CPU time. Collection is
    deferred, not skipped: the next allocation past the threshold after the tick collects.
    The pause spans the queries too, so it lasts at most their timeout plus the decisions
    (the reconciles that run meanwhile have their cycles collected after it).
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


async def _tick(op: Operator, now: datetime, memory: TickMemory) -> None:
    services = _services(op, memory)
    window = op.settings.metrics_window_seconds
    ready_pods = memory.ready_pods_of(op)
    # Each query by its name, with the parser of its answer: a GPU answer is grouped by the
    # service of each ready pod as it is parsed.
    by_service = functools.partial(parse_vector_by_owner, owners=ready_pods.owners)
    queries: dict[str, tuple[str, Callable[[Mapping[str, Any]], object]]] = {
        series.value: (query, by_service)
        for series, query in gpu_queries(window_seconds=window).items()
    }
    # Each distinct tenant metric is built, sent and parsed once per tick, not per service.
    tenant_queries: dict[MetricSpec, str] = {}
    for _, _, parsed in services:
        for spec in parsed.policy.prometheus_metrics:
            if spec not in tenant_queries and spec.prometheus is not None:
                tenant_queries[spec] = _tenant_query(spec.prometheus, window)
    for query in tenant_queries.values():
        queries[query] = (query, parse_grouped_response)
    answers = await _run_queries(op, queries)
    gpu_values = {series.value: cast(_Grouped, answers[series.value]) for series in GpuSeries}
    tenant_values = {spec: cast(_Grouped, answers[query]) for spec, query in tenant_queries.items()}

    # Pass 1: what each service wants, ignoring the pool; a service that wants no more than
    # it runs is settled at once (only growth competes for free GPUs, see _fair_shares).
    # Pass 2: each growing one's fair share, deciding again those whose share cuts it. A
    # service whose last decision repeats itself is not decided again: it keeps its count
    # (at its target, or asleep at zero), so it neither grows nor can be cut.
    shown: Counter[str] = Counter()  # decisions that change a status, by reason
    made = repeated = 0
    growing: list[tuple[_Candidate, Decision]] = []
    for key, entry, parsed in services:
        candidate = _candidate(op, key, entry, parsed)
        if candidate is None:
            continue
        candidate.reads = _reads(candidate, gpu_values, tenant_values, ready_pods.services)
        if _repeat(candidate, op.decisions.get(key), now):
            repeated += 1
            continue
        made += 1
        candidate.samples = _samples(candidate.reads, now)
        wanted = decide(candidate.samples, candidate.state, candidate.policy, None, now)
        if wanted.desired_replicas > candidate.state.current_replicas:
            growing.append((candidate, wanted))
        else:
            _settle(op, candidate, wanted, shown)
    op.metrics.autoscaler_services.labels(decision="made").set(made)
    op.metrics.autoscaler_services.labels(decision="repeated").set(repeated)
    shares = _fair_shares(op, growing)
    for candidate, wanted in growing:
        capacity = shares.get(candidate.key)
        decision = wanted
        if not pool_is_no_limit(wanted, capacity):
            decision = decide(candidate.samples, candidate.state, candidate.policy, capacity, now)
        _settle(op, candidate, decision, shown)
    for reason, count in shown.items():
        op.metrics.autoscaler_decisions.labels(reason=reason).inc(count)


def _settle(op: Operator, candidate: _Candidate, decision: Decision, shown: Counter[str]) -> None:
    if _record(op, candidate, decision):
        shown[decision.reason.value] += 1
    if repeats(decision, candidate.policy):
        candidate.entry.repeating = _Repeating(candidate.policy, candidate.reads)


def _repeat(candidate: _Candidate, recorded: Decision | None, now: datetime) -> bool:
    """Whether the service's last decision holds at ``now``; when it stops holding, the
    candidate's state is brought to the last tick at which it did."""
    entry = candidate.entry
    repeating, decision = entry.repeating, entry.recorded  # set together by _settle
    if repeating is None or decision is None:
        return False
    ours = recorded is decision  # else someone decided (or forgot) since
    if ours and repeating.holds_for(candidate, decision):
        repeating.held_at = now
        return True
    entry.repeating = None
    if ours and repeating.held_at is not None:
        candidate.state = repeated_state(
            candidate.state, decision, repeating.policy, repeating.held_at
        )
    return False


def _fair_shares(op: Operator, growing: list[tuple[_Candidate, Decision]]) -> dict[ServiceKey, int]:
    """Each growing service's maximum replicas from its pool's free GPUs.

    Only growth competes for free GPUs: a service that wants no more than it runs neither
    takes from the others nor can be cut (capacity never takes back), so it is left out
    and keeps its first decision.
    """
    by_pool: dict[str, list[tuple[_Candidate, Decision]]] = defaultdict(list)
    for candidate, wanted in growing:
        by_pool[candidate.pool_name].append((candidate, wanted))
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


def _services(op: Operator, memory: TickMemory) -> list[tuple[ServiceKey, _Entry, _Parsed]]:
    """The accepted services whose spec and pool parse, with what the loop keeps of them."""
    services = []
    previous, kept = memory.entries, {}
    pools: dict[str, Mapping[str, Any] | None] = {}  # a few pools serve many services
    for key in op.caches.service_keys():
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
        entry = previous.get(key)
        if entry is None:
            entry = _Entry(body, pool_body, _stamp(body, pool_body), memory.parse(body, pool_body))
        elif entry.body is not body or entry.pool_body is not pool_body:
            # The caches replace a body on each watch event and never change one: the same
            # objects hold the same spec, and only new ones need a look at their generation.
            stamp = _stamp(body, pool_body)
            if stamp is None or entry.stamp != stamp:
                entry.parsed = memory.parse(body, pool_body)
            entry.body, entry.pool_body, entry.stamp = body, pool_body, stamp
        kept[key] = entry
        if entry.parsed is not None:  # else the service reconcile reports what is wrong
            services.append((key, entry, entry.parsed))
    memory.entries = kept  # services gone since the last tick drop out
    return services


def _candidate(op: Operator, key: ServiceKey, entry: _Entry, parsed: _Parsed) -> _Candidate | None:
    live = op.caches.deployment(key)
    if live is None:
        return None  # not created yet: nothing to resize
    if live is not entry.deployment:  # a new body: the counts may have moved
        entry.deployment = live
        entry.counts = (
            int(live["spec"].get("replicas") or 0),
            int((live.get("status") or {}).get("readyReplicas") or 0),
        )
    current, ready = entry.counts
    state = op.scaling_states.get(key) or ScalingState(current, ready)
    return _Candidate(
        key, entry, parsed.pool_name, parsed.utilization_series, parsed.policy,
        state.observed(current, ready),
    )  # fmt: skip


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


async def _run_queries(
    op: Operator, queries: Mapping[str, tuple[str, Callable[[Mapping[str, Any]], object]]]
) -> dict[str, object]:
    """Every query of the tick, concurrently, each answer parsed where it was fetched (so
    that the decoded body is garbage before the decisions start): a parsed answer or the
    CamelCase reason there is none."""
    if op.prometheus is None:
        return dict.fromkeys(queries, "PrometheusNotConfigured")
    names = list(queries)
    started = time.monotonic()
    prometheus = op.prometheus
    results = await asyncio.gather(
        *(op.io(_fetch, prometheus, query, parse) for query, parse in queries.values()),
        return_exceptions=True,
    )
    op.metrics.prometheus_query_seconds.observe(time.monotonic() - started)
    op.metrics.prometheus_queries.inc(len(names))
    answers: dict[str, object] = {}
    for name, result in zip(names, results, strict=True):
        if isinstance(result, PrometheusResponseError):
            answers[name] = result.reason
        elif isinstance(result, PrometheusUnavailableError):
            op.metrics.autoscaler_errors.labels(stage="query").inc()
            answers[name] = result.reason
        elif isinstance(result, BaseException):
            op.metrics.autoscaler_errors.labels(stage="query").inc()
            answers[name] = "PrometheusError"
        else:
            answers[name] = result
    return answers


def _fetch(
    prometheus: Prometheus, query: str, parse: Callable[[Mapping[str, Any]], object]
) -> object:
    return parse(prometheus.query(query))


class _ReadyPods:
    """Which service each ready, running pod serves (a GPU metric reads those pods only)."""

    def __init__(self, pods: list[Any]) -> None:
        self.pods = pods  # the cached pod objects this was built from
        #: (namespace, pod) -> (the pod's service, its name), for parse_vector_by_owner.
        self.owners: dict[PodKey, tuple[ServiceKey, str]] = {}
        #: The services with a ready pod (a GPU metric of one without reads nothing).
        self.services: set[ServiceKey] = set()
        for pod in pods:
            if pod.service and pod.ready and pod.phase == "Running":
                service = (pod.namespace, pod.service)
                self.services.add(service)
                self.owners[pod.namespace, pod.name] = (service, pod.name)


def _reads(
    candidate: _Candidate,
    gpu_values: Mapping[str, _Grouped],
    tenant_values: Mapping[MetricSpec, _Grouped],
    with_ready_pods: set[ServiceKey],
) -> dict[MetricSpec, _Read]:
    reads: dict[MetricSpec, _Read] = {}
    key = candidate.key
    for spec in candidate.policy.metrics:
        if spec.prometheus is not None:  # a Prometheus metric
            grouped = tenant_values[spec]
            if isinstance(grouped, str):
                reads[spec] = grouped
            else:
                # Silence is not zero demand: a wake signal must be exported even when idle.
                reads[spec] = grouped.get(key, "NoSeries")
            continue
        if key not in with_ready_pods:
            continue  # decide() knows a GPU metric has nothing to read without pods
        series = _MEMORY_SERIES if spec.type is _GPU_MEMORY else candidate.utilization_series
        values = gpu_values[series]
        if isinstance(values, str):
            reads[spec] = values
            continue
        found = values.get(key)
        if found is None:
            reads[spec] = "NoSeries"
            continue
        for value in found.values():
            if not math.isnan(value):
                reads[spec] = found
                break
        else:
            reads[spec] = "NaN"
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


def _record(op: Operator, candidate: _Candidate, decision: Decision) -> bool:
    """Keep the decision; hand it to the service reconcile if status would show a change."""
    key, entry = candidate.key, candidate.entry
    op.scaling_states[key] = decision.state
    previous = op.decisions.get(key)
    op.decisions[key] = decision
    if previous is None or previous.desired_replicas != decision.desired_replicas:
        op.metrics.autoscaler_desired_replicas.labels(namespace=key[0], service=key[1]).set(
            decision.desired_replicas
        )
    shown = _visible(decision)
    # What status shows of the previous decision, unless someone else decided since.
    before = entry.shown if previous is entry.recorded else None
    if before is None and previous is not None:
        before = _visible(previous)
    entry.recorded, entry.shown = decision, shown
    if before == shown:
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


def _rounded(value: float | None) -> int | None:
    """The value in tenths: a utilisation wobbling by less must not rewrite the status.
    (``round(value * 10)`` is an integer rounding; ``round(value, 1)`` formats the float to
    a string and back, several times the cost, for every decided service on every tick.)"""
    if value is None:
        return None
    tenths = value * 10
    return round(tenths) if math.isfinite(tenths) else None  # an overflow to inf is None too
