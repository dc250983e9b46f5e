"""One autoscaler tick, in-process: ``handlers.autoscaler.tick`` with only its I/O replaced.

The fakes stand in for what the tick reads from the outside and nothing else: Kopf's
indices become plain dicts of ``{key: [object]}`` (as Kopf stores them), Prometheus becomes
a function from the query text to a canned JSON body. The work queue, the metrics registry,
pool accounting, parsing and ``decide`` are the real ones, and the Kubernetes client is a
stub that fails the test if the tick touches it.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpuyard.api.names import ServiceKey
from gpuyard.api.pool import GPUPool
from gpuyard.api.reasons import LimitingFactor, Reason
from gpuyard.api.service import AIService
from gpuyard.config import Settings
from gpuyard.handlers.autoscaler import Autoscaler, pool_is_no_limit
from gpuyard.handlers.context import Caches, Operator
from gpuyard.handlers.workqueue import WorkQueue
from gpuyard.io.kube import Kube
from gpuyard.io.metrics import OperatorMetrics
from gpuyard.io.prometheus import Prometheus, PrometheusUnavailableError
from gpuyard.logic.autoscale import (
    Decision,
    MetricSample,
    MetricSpec,
    MetricType,
    Mode,
    ScalingBehavior,
    ScalingPolicy,
    ScalingState,
    decide,
)
from gpuyard.logic.policy import scaling_policy
from gpuyard.logic.pool_accounting import NodeInfo, PodInfo, compute_pool_usage
from gpuyard.logic.promql import (
    Aggregation,
    GpuSeries,
    gpu_queries,
    prometheus_metric_group_query,
)

NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
WINDOW = 5
GPU = "nvidia.com/gpu"
UTIL_QUERY = gpu_queries(window_seconds=WINDOW)[GpuSeries.GPU_UTIL]

Body = dict[str, Any]
Answer = Body | PrometheusUnavailableError


def vector(series: list[tuple[dict[str, str], float | str]]) -> Body:
    result = [
        {"metric": labels, "value": [NOW.timestamp(), v if isinstance(v, str) else repr(v)]}
        for labels, v in series
    ]
    return {"status": "success", "data": {"resultType": "vector", "result": result}}


EMPTY = vector([])


class FakePrometheus:
    """Answers each query from ``answers`` (empty vector when absent); counts the queries."""

    def __init__(self, answers: dict[str, Answer]) -> None:
        self.answers = answers
        self.queries: list[str] = []
        self._lock = threading.Lock()  # the tick asks from worker threads

    def query(self, promql: str) -> Body:
        with self._lock:
            self.queries.append(promql)
        answer = self.answers.get(promql, EMPTY)
        if isinstance(answer, PrometheusUnavailableError):
            raise answer
        return answer


class NoKube:
    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the tick called the Kubernetes API ({name})")


@dataclass
class World:
    """The cluster as the caches see it, built service by service."""

    pools: dict[str, Body] = field(default_factory=dict)
    nodes: dict[str, NodeInfo] = field(default_factory=dict)
    services: dict[ServiceKey, Body] = field(default_factory=dict)
    deployments: dict[ServiceKey, Body] = field(default_factory=dict)
    pods: list[PodInfo] = field(default_factory=list)
    gpu_values: dict[tuple[str, str], float | str] = field(default_factory=dict)
    placed: dict[str, int] = field(default_factory=dict)

    def pool(self, name: str, nodes: int = 1, gpus_per_node: int = 4) -> None:
        self.pools[name] = {
            "apiVersion": "gpuyard.io/v1alpha1",
            "kind": "GPUPool",
            "metadata": {"name": name, "uid": f"uid-{name}", "generation": 1},
            "spec": {
                "gpuType": "l4",
                "nodeSelector": {"gpuyard.io/pool": name},
                "price": {"perGpuHour": "0.80"},
            },
        }
        for index in range(nodes):
            node = f"{name}-node-{index}"
            self.nodes[node] = NodeInfo(
                node, {"gpuyard.io/pool": name}, ready=True, allocatable={GPU: gpus_per_node}
            )

    def service(
        self,
        namespace: str,
        name: str,
        *,
        pool: str,
        replicas: int,
        utilisation: list[float | str] | None = None,
        metrics: list[Body] | None = None,
        gpus: int = 1,
        **spec: Any,
    ) -> ServiceKey:
        """A service with ``replicas`` running, ready pods; ``utilisation`` is each pod's GPU
        series (None: no series at all)."""
        key = (namespace, name)
        self.services[key] = {
            "apiVersion": "gpuyard.io/v1alpha1",
            "kind": "AIService",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "uid": f"uid-{namespace}-{name}",
                "generation": 1,
            },
            "spec": {
                "pool": pool,
                "gpusPerReplica": gpus,
                "container": {"image": "vllm/vllm-openai:v0.6.3"},
                "minReplicas": 1,
                "maxReplicas": 10,
                "autoscaling": {
                    "metrics": metrics or [{"type": "GPUUtilization", "targetPercent": 50}],
                    "scaleUp": {"maxStepReplicas": 100},
                },
                **spec,
            },
        }
        self.deployments[key] = {
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"replicas": replicas},
            "status": {"replicas": replicas, "readyReplicas": replicas},
        }
        nodes = [n for n, info in self.nodes.items() if info.labels["gpuyard.io/pool"] == pool]
        for index in range(replicas):
            pod = f"{name}-{index}"
            # Round robin over the pool's nodes, like a scheduler spreading the load.
            slot = self.placed.get(pool, 0)
            self.placed[pool] = slot + 1
            self.pods.append(
                PodInfo(
                    pod,
                    namespace,
                    nodes[slot % len(nodes)],
                    "Running",
                    {GPU: gpus},
                    service=name,
                    pool=pool,
                    ready=True,
                )
            )
            if utilisation is not None:
                self.gpu_values[(namespace, pod)] = utilisation[index % len(utilisation)]
        return key

    def gpu_answer(self) -> Body:
        return vector(
            [({"namespace": ns, "pod": pod}, v) for (ns, pod), v in self.gpu_values.items()]
        )

    def operator(self, answers: dict[str, Answer], **settings: Any) -> Harness:
        indices: dict[str, Any] = {f.name: {} for f in fields(Caches)}
        indices["pools"] = {name: [body] for name, body in self.pools.items()}
        indices["services"] = {key: [body] for key, body in self.services.items()}
        indices["deployments"] = {key: [body] for key, body in self.deployments.items()}
        indices["nodes"] = {name: [info] for name, info in self.nodes.items()}
        gpu_pods: dict[str, list[PodInfo]] = {}
        for pod in self.pods:
            gpu_pods.setdefault(pod.node_name or "", []).append(pod)
        indices["gpu_pods"] = gpu_pods
        prometheus = FakePrometheus(answers)
        op = Operator(
            settings=Settings.model_construct(
                autoscale_interval=1.0, metrics_window_seconds=WINDOW, **settings
            ),
            kube=cast(Kube, NoKube()),
            metrics=OperatorMetrics(),
            caches=Caches(**indices),
            prometheus=cast(Prometheus, prometheus),
        )
        harness = Harness(op, prometheus, Autoscaler(op))
        op.service_queue = WorkQueue("service", harness.reconcile)
        for name, body in self.pools.items():
            # What the pool reconcile keeps current, from the same pure accounting.
            op.pool_usage[name] = compute_pool_usage(
                GPUPool.from_mapping(body), self.nodes.values(), self.pods
            )
        return harness


@dataclass
class Harness:
    op: Operator
    prometheus: FakePrometheus
    autoscaler: Autoscaler
    reconciled: list[ServiceKey] = field(default_factory=list)

    async def reconcile(self, key: ServiceKey) -> None:
        # The service reconcile would apply the decision; here it only says it was asked.
        self.reconciled.append(key)

    async def _tick(self, now: datetime = NOW) -> set[ServiceKey]:
        del self.reconciled[:]
        await self.autoscaler.tick(now)
        queue = self.op.service_queue
        worker = asyncio.create_task(queue.run(1))
        while not queue.is_idle():
            await asyncio.sleep(0)
        worker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await worker
        return set(self.reconciled)

    def ticks(self, count: int = 1) -> list[set[ServiceKey]]:
        """Run ``count`` ticks on one event loop; each one's keys handed to the reconcile."""
        with asyncio.Runner() as runner:
            return [runner.run(self._tick()) for _ in range(count)]

    def ticks_reading(
        self, gpu_answers: list[Body], first: int = 0
    ) -> list[dict[ServiceKey, Decision]]:
        """One tick per answer to the utilisation query, 5 s apart from tick number ``first``:
        the decisions after each."""
        seen = []
        with asyncio.Runner() as runner:
            for index, answer in enumerate(gpu_answers, start=first):
                self.prometheus.answers[UTIL_QUERY] = answer
                runner.run(self._tick(tick_time(index)))
                seen.append(self.decisions)
        return seen

    @property
    def decisions(self) -> dict[ServiceKey, Decision]:
        """Each cached service's latest decision, as the service reconcile reads it."""
        decisions = {}
        for key in self.op.caches.service_keys():
            decision = self.op.scaling.decision(key)
            if decision is not None:
                decisions[key] = decision
        return decisions

    def sample(self, name: str, **labels: str) -> float | None:
        return self.op.metrics.registry.get_sample_value(name, labels)

    def tick_services(self) -> dict[str, float | None]:
        """How many services the last tick decided (made) and kept (repeated)."""
        name = "gpuyard_autoscaler_tick_services"
        return {kind: self.sample(name, decision=kind) for kind in ("made", "repeated")}


def tick_time(index: int) -> datetime:
    return NOW + timedelta(seconds=5 * index)


def queue_metric(name: str, model: str) -> Body:
    return {
        "type": "Prometheus",
        "prometheus": {"metric": name, "labels": {"model": model}, "targetPerReplica": "10"},
    }


def tenant_query(name: str, model: str, namespaces: Iterable[str] = ("ns",)) -> str:
    return prometheus_metric_group_query(
        name, {"model": model}, Aggregation.SUM, namespaces, window_seconds=WINDOW
    )


# --- a constant number of queries per tick ---------------------------------------------------

DECLARATIONS = [("queue_length", "llama"), ("queue_length", "mistral")]


def _fleet(services: int) -> tuple[World, dict[str, Answer]]:
    """``services`` services over two pools, each with GPU utilisation and one of two
    tenant metric declarations."""
    world = World()
    world.pool("l4", nodes=max(1, services // 2), gpus_per_node=4)
    world.pool("a100", nodes=max(1, services // 2), gpus_per_node=4)
    tenant: dict[tuple[str, str], list[tuple[dict[str, str], float | str]]] = {}
    for index in range(services):
        metric, model = DECLARATIONS[index % len(DECLARATIONS)]
        namespace, name = f"team-{index % 7}", f"svc-{index}"
        world.service(
            namespace,
            name,
            pool=("l4", "a100")[index % 2],
            replicas=1,
            utilisation=[50.0],
            metrics=[
                {"type": "GPUUtilization", "targetPercent": 50},
                queue_metric(metric, model),
            ],
        )
        tenant.setdefault((metric, model), []).append(
            ({"namespace": namespace, "service": name}, 10.0)
        )
    answers: dict[str, Answer] = {UTIL_QUERY: world.gpu_answer()}
    for (metric, model), series in tenant.items():
        namespaces = {labels["namespace"] for labels, _ in series}
        answers[tenant_query(metric, model, namespaces)] = vector(series)
    return world, answers


@pytest.mark.parametrize("services", [10, 1000])
def test_queries_per_tick_are_three_plus_one_per_tenant_metric(services: int) -> None:
    world, answers = _fleet(services)
    harness = world.operator(answers)

    [reconciled] = harness.ticks()

    gpu = set(gpu_queries(window_seconds=WINDOW).values())
    tenant = {query for query in answers if query != UTIL_QUERY}
    assert len(tenant) == len(DECLARATIONS)
    assert len(harness.prometheus.queries) == 3 + len(DECLARATIONS)
    assert set(harness.prometheus.queries) == gpu | tenant
    assert harness.sample("gpuyard_prometheus_queries_total") == 3 + len(DECLARATIONS)
    # Every service read both of its metrics: nothing missing, nothing to change.
    assert len(harness.decisions) == services
    assert all(d.metrics_available for d in harness.decisions.values())
    assert {d.desired_replicas for d in harness.decisions.values()} == {1}
    # A first decision is news: every service goes to the reconcile once.
    assert reconciled == set(world.services)


@pytest.mark.parametrize("namespace_label", ["namespace", "tenant_namespace"])
def test_a_tenant_query_reads_only_the_namespaces_that_declare_it(namespace_label: str) -> None:
    world = World()
    world.pool("l4", nodes=4)
    # Two services declare the same metric with different targets: one query for both.
    team_a = world.service("team-a", "svc", pool="l4", replicas=1, metrics=[QUEUE])
    llama_elsewhere = {**QUEUE, "prometheus": {**QUEUE["prometheus"], "targetPerReplica": "5"}}
    team_b = world.service("team-b", "svc", pool="l4", replicas=1, metrics=[llama_elsewhere])
    world.service("team-c", "svc", pool="l4", replicas=1, metrics=[queue_metric("q", "other")])
    world.service("team-d", "svc", pool="l4", replicas=1, utilisation=[50.0])
    llama = prometheus_metric_group_query(
        "queue_length", {"model": "llama"}, Aggregation.SUM, ["team-a", "team-b"],
        window_seconds=WINDOW, namespace_label=namespace_label,
    )  # fmt: skip
    other = prometheus_metric_group_query(
        "q", {"model": "other"}, Aggregation.SUM, ["team-c"],
        window_seconds=WINDOW, namespace_label=namespace_label,
    )  # fmt: skip
    answer = vector(
        [
            ({namespace_label: "team-a", "service": "svc"}, 20.0),
            ({namespace_label: "team-b", "service": "svc"}, 20.0),
            # A label of the series itself, beside its target's, moves no one.
            ({"exported_namespace": "team-a", "service": "svc"}, 1000.0),
        ]
    )
    harness = world.operator({llama: answer}, tenant_namespace_label=namespace_label)

    harness.ticks()

    tenant = set(harness.prometheus.queries) - set(gpu_queries(window_seconds=WINDOW).values())
    assert tenant == {llama, other}
    assert harness.decisions[team_a].desired_replicas == 2  # 20 / 10
    assert harness.decisions[team_b].desired_replicas == 4  # 20 / 5


def test_gpu_only_services_cost_the_three_gpu_queries() -> None:
    world = World()
    world.pool("l4", nodes=4)
    for index in range(12):
        world.service("team-a", f"svc-{index}", pool="l4", replicas=1, utilisation=[50.0])
    harness = world.operator({UTIL_QUERY: world.gpu_answer()})
    harness.ticks()
    assert sorted(harness.prometheus.queries) == sorted(gpu_queries(window_seconds=WINDOW).values())


def test_a_second_tick_with_nothing_new_queues_nothing() -> None:
    world, answers = _fleet(10)
    harness = world.operator(answers)
    first, second = harness.ticks(2)
    assert len(first) == 10
    assert second == set()
    assert len(harness.prometheus.queries) == 2 * (3 + len(DECLARATIONS))


def test_a_service_at_its_target_is_decided_again_only_once_its_load_moves() -> None:
    world = World()
    world.pool("l4", nodes=4)
    busy, steady = (
        world.service("team-a", name, pool="l4", replicas=1, utilisation=[50.0])
        for name in ("busy", "steady")
    )
    at_target = dict(world.gpu_values)
    world.gpu_values[("team-a", "busy-0")] = 100.0
    loaded = dict(world.gpu_values)
    loads = [at_target, at_target, at_target, loaded, loaded]

    harness = world.operator({})
    remembering = harness.ticks_reading([vector_of(load) for load in loads])
    deciding_always = deciding_every_tick(world, loads)

    # Each tick leaves the decisions that deciding every service on every tick leaves. One
    # made anew carries the same state too; one repeated still carries the state it was made
    # with, moved on only once it stops holding (so the busy one's state at tick 3 shows it).
    for remembered, always in zip(remembering, deciding_always, strict=True):
        assert {k: replace(d, state=always[k].state) for k, d in remembered.items()} == always
    assert remembering[3][busy] == deciding_always[3][busy]
    # The decision at target was made once.
    assert all(decisions[steady] is remembering[0][steady] for decisions in remembering)
    busy_decisions = [decisions[busy] for decisions in remembering]
    assert busy_decisions[2] is busy_decisions[0]
    assert busy_decisions[3].desired_replicas == 2
    assert busy_decisions[3] is not busy_decisions[0]
    # The last tick kept the steady one's decision and made the busy one's again: scaling
    # up, it no longer repeated.
    assert harness.tick_services() == {"made": 1, "repeated": 1}


def vector_of(load: dict[tuple[str, str], float | str]) -> Body:
    return vector([({"namespace": ns, "pod": pod}, v) for (ns, pod), v in load.items()])


def deciding_every_tick(
    world: World, loads: list[dict[tuple[str, str], float | str]]
) -> list[dict[ServiceKey, Decision]]:
    """What deciding every service on every tick leaves, from ``decide`` alone: each tick
    reads each pod's utilisation from ``loads`` (no pool here is short of GPUs, so no share
    cuts a decision)."""
    policies = {
        key: scaling_policy(
            AIService.from_mapping(body).spec,
            GPUPool.from_mapping(world.pools[body["spec"]["pool"]]),
        )
        for key, body in world.services.items()
    }
    counts = {key: world.deployments[key]["spec"]["replicas"] for key in world.services}
    states = {
        key: ScalingState(current_replicas=count, ready_replicas=count)
        for key, count in counts.items()
    }
    seen = []
    for index, load in enumerate(loads):
        now = tick_time(index)
        decisions = {}
        for key, policy in policies.items():
            values = {
                pod.name: float(load[pod.namespace, pod.name])
                for pod in world.pods
                if (pod.namespace, pod.service) == key
            }
            samples = {metric: MetricSample.per_pod(values, now) for metric in policy.metrics}
            state = states[key].observed(counts[key], counts[key])
            decisions[key] = decide(samples, state, policy, None, now)
            states[key] = decisions[key].state
        seen.append(decisions)
    return seen


def _decided_twice() -> tuple[World, ServiceKey, Harness, Body]:
    """One service at its target, whose decision the second tick kept as repeating."""
    world = World()
    world.pool("l4", nodes=4)
    key = world.service("team-a", "svc", pool="l4", replicas=1, utilisation=[50.0])
    harness, answer = world.operator({}), world.gpu_answer()
    first, second = harness.ticks_reading([answer, answer])
    assert first[key].desired_replicas == 1
    assert second[key] is first[key]
    assert harness.tick_services() == {"made": 0, "repeated": 1}
    return world, key, harness, answer


def test_a_changed_spec_is_decided_again_under_the_same_load() -> None:
    world, key, harness, answer = _decided_twice()
    changed = copy.deepcopy(world.services[key])
    changed["metadata"]["generation"] = 2
    changed["spec"]["minReplicas"] = 2  # the metrics, and so the samples, stay the same
    harness.op.caches.services[key] = [changed]
    harness.ticks_reading([answer], first=2)
    assert harness.decisions[key].desired_replicas == 2


def test_a_forgotten_decision_is_made_again() -> None:
    _, key, harness, answer = _decided_twice()
    harness.op.forget_service(key)  # as a reconcile of a deletion does
    harness.ticks_reading([answer], first=2)
    assert harness.decisions[key].desired_replicas == 1


class ForgettingPrometheus(FakePrometheus):
    """Answers as FakePrometheus, after the service reconcile of a deletion has run: the
    service goes while the tick reads its metrics."""

    def __init__(self, answers: dict[str, Answer], op: Operator, key: ServiceKey) -> None:
        super().__init__(answers)
        self.op, self.key = op, key

    def query(self, promql: str) -> Body:
        self.op.forget_service(self.key)
        return super().query(promql)


def test_a_service_deleted_while_the_tick_reads_its_metrics_is_skipped() -> None:
    world = World()
    world.pool("l4")
    gone = world.service("ns", "gone", pool="l4", replicas=1, utilisation=[90.0])
    kept = world.service("ns", "kept", pool="l4", replicas=1, utilisation=[90.0])
    harness = world.operator({})
    harness.prometheus = ForgettingPrometheus({UTIL_QUERY: world.gpu_answer()}, harness.op, gone)
    harness.op.prometheus = cast(Prometheus, harness.prometheus)
    harness.ticks()
    assert gone not in harness.decisions
    assert harness.decisions[kept].desired_replicas == 2


def test_a_service_asleep_at_zero_is_decided_again_once_its_wake_metric_moves() -> None:
    world = World()
    world.pool("l4", nodes=4)
    key = world.service("team-a", "svc", pool="l4", replicas=0, metrics=[QUEUE], minReplicas=0)
    harness = world.operator({})
    queue = {"namespace": "team-a", "service": "svc"}
    team_a_query = tenant_query("queue_length", "llama", ["team-a"])
    harness.prometheus.answers[team_a_query] = vector([(queue, 0.0)])
    asleep = harness.ticks_reading([EMPTY, EMPTY])
    assert asleep[0][key].reason is Reason.NO_DEMAND
    assert asleep[1][key] is asleep[0][key]  # not decided again

    harness.prometheus.answers[team_a_query] = vector([(queue, 25.0)])
    [woken] = harness.ticks_reading([EMPTY], first=2)
    assert woken[key].reason is Reason.WOKEN
    assert woken[key].desired_replicas == 3


# --- what cannot be read is unavailable, never zero --------------------------------------------


def _reading(decision: Decision) -> tuple[bool | None, str | None]:
    return decision.metrics_available, decision.metrics_unavailable_reason


QUEUE = queue_metric("queue_length", "llama")
QUEUE_QUERY = tenant_query("queue_length", "llama")
UNREACHABLE = PrometheusUnavailableError("PrometheusUnreachable", "connection refused")
ERROR_BODY: Body = {"status": "error", "errorType": "timeout", "error": "query timed out"}


@dataclass(frozen=True)
class Case:
    utilisation: list[float | str] | None
    tenant: Answer | None  # None: the service has no tenant metric
    gpu_answer: Answer | None = None  # None: the series built from `utilisation`
    expected: tuple[bool | None, str | None] = (True, None)


UNAVAILABLE_CASES = {
    "readable": Case([50.0], vector([({"namespace": "ns", "service": "svc"}, 10.0)])),
    "gpu-nan-on-every-pod": Case(["NaN", "NaN"], None, expected=(False, "NaN")),
    "gpu-nan-on-one-pod-is-a-missing-pod": Case(["NaN", 50.0], None),
    "gpu-no-series-for-the-pods": Case(None, None, expected=(False, "NoSeries")),
    "gpu-series-of-other-pods-only": Case(
        None,
        None,
        gpu_answer=vector([({"namespace": "other", "pod": "svc-0"}, 50.0)]),
        expected=(False, "NoSeries"),
    ),
    "gpu-two-series-for-one-pod": Case(
        None,
        None,
        gpu_answer=vector(
            [
                ({"namespace": "ns", "pod": "svc-0"}, 50.0),
                ({"exported_namespace": "ns", "exported_pod": "svc-0"}, 60.0),
            ]
        ),
        expected=(False, "DuplicateSeries"),
    ),
    "gpu-query-unreachable": Case(
        [50.0], None, gpu_answer=UNREACHABLE, expected=(False, "PrometheusUnreachable")
    ),
    "gpu-query-error-body": Case(
        [50.0], None, gpu_answer=ERROR_BODY, expected=(False, "PrometheusError")
    ),
    "gpu-query-matrix-answer": Case(
        [50.0],
        None,
        gpu_answer={"status": "success", "data": {"resultType": "matrix", "result": []}},
        expected=(False, "UnexpectedResultType"),
    ),
    "tenant-empty-result": Case([50.0], EMPTY, expected=(False, "NoSeries")),
    "tenant-only-other-services": Case(
        [50.0],
        vector([({"namespace": "ns", "service": "other"}, 10.0)]),
        expected=(False, "NoSeries"),
    ),
    "tenant-nan": Case(
        [50.0],
        vector([({"namespace": "ns", "service": "svc"}, "NaN")]),
        expected=(False, "NotFinite"),
    ),
    "tenant-inf": Case(
        [50.0],
        vector([({"namespace": "ns", "service": "svc"}, "+Inf")]),
        expected=(False, "NotFinite"),
    ),
    "tenant-unreachable": Case([50.0], UNREACHABLE, expected=(False, "PrometheusUnreachable")),
}


@pytest.mark.parametrize("case", UNAVAILABLE_CASES.values(), ids=UNAVAILABLE_CASES.keys())
def test_nan_empty_and_failed_answers_are_unavailable(case: Case) -> None:
    world = World()
    world.pool("l4")
    metrics = [{"type": "GPUUtilization", "targetPercent": 50}]
    if case.tenant is not None:
        metrics.append(QUEUE)
    replicas = 2 if case.utilisation is None else len(case.utilisation)
    key = world.service(
        "ns", "svc", pool="l4", replicas=replicas, utilisation=case.utilisation, metrics=metrics
    )
    answers: dict[str, Answer] = {UTIL_QUERY: case.gpu_answer or world.gpu_answer()}
    if case.tenant is not None:
        answers[QUEUE_QUERY] = case.tenant
    harness = world.operator(answers)

    harness.ticks()

    decision = harness.decisions[key]
    assert _reading(decision) == case.expected
    if case.expected[0] is False:
        # The default policy holds, whatever the metrics would have said.
        assert decision.reason is Reason.HOLD
        assert decision.desired_replicas == replicas
    if case.expected[1] == "PrometheusUnreachable":
        assert harness.sample("gpuyard_autoscaler_errors_total", stage="query") == 1


def test_one_failed_query_leaves_the_other_services_readable() -> None:
    world = World()
    world.pool("l4", nodes=2)
    gpu_only = world.service("ns", "gpu-only", pool="l4", replicas=1, utilisation=[50.0])
    tenant = world.service(
        "ns",
        "tenant",
        pool="l4",
        replicas=1,
        utilisation=[50.0],
        metrics=[{"type": "GPUUtilization", "targetPercent": 50}, QUEUE],
    )
    harness = world.operator({UTIL_QUERY: world.gpu_answer(), QUEUE_QUERY: UNREACHABLE})
    harness.ticks()
    assert _reading(harness.decisions[gpu_only]) == (True, None)
    assert _reading(harness.decisions[tenant]) == (False, "PrometheusUnreachable")


def test_a_service_at_zero_wakes_on_its_tenant_metric_alone() -> None:
    world = World()
    world.pool("l4")
    key = world.service(
        "ns",
        "svc",
        pool="l4",
        replicas=0,
        minReplicas=0,
        metrics=[{"type": "GPUUtilization", "targetPercent": 50}, QUEUE],
    )
    series = vector([({"namespace": "ns", "service": "svc"}, 25.0)])
    harness = world.operator({UTIL_QUERY: EMPTY, QUEUE_QUERY: series})
    harness.ticks()
    decision = harness.decisions[key]
    assert (decision.reason, decision.desired_replicas) == (Reason.WOKEN, 3)
    assert decision.metrics_available is True


# --- fair share of a pool ------------------------------------------------------------------------


def test_free_gpus_are_shared_fairly_among_the_services_that_want_them() -> None:
    """Two 4-GPU nodes; `a` holds 1 GPU, `b` 3, `steady` 0 more wanted. 4 GPUs are free and
    both `a` and `b` want 6 replicas (of 1 GPU): water-filling gives `a` three (it held the
    fewest) and `b` one, so both end at 4 and each lacks 2 GPUs."""
    world = World()
    world.pool("l4", nodes=2, gpus_per_node=4)
    world.pool("other", nodes=1, gpus_per_node=8)
    ten = [{"type": "GPUUtilization", "targetPercent": 10}]
    a = world.service("ns", "a", pool="l4", replicas=1, utilisation=[60.0], metrics=ten)
    b = world.service("ns", "b", pool="l4", replicas=3, utilisation=[20.0], metrics=ten)
    steady = world.service("ns", "steady", pool="l4", replicas=0, utilisation=[], minReplicas=0,
                           autoscaling={"mode": "Recommend", "metrics": ten})  # fmt: skip
    alone = world.service("ns", "alone", pool="other", replicas=1, utilisation=[60.0], metrics=ten)
    harness = world.operator({UTIL_QUERY: world.gpu_answer()})
    assert harness.op.pool_usage["l4"].available == 4

    harness.ticks()

    decisions = harness.decisions
    for key in (a, b):
        decision = decisions[key]
        assert decision.recommended_replicas == 6
        assert decision.desired_replicas == 4, key
        assert decision.capacity_limited
        assert decision.missing_gpus == 2
    # A pool with room is no limit.
    assert decisions[alone].desired_replicas == 6
    assert not decisions[alone].capacity_limited
    assert decisions[steady].mode is Mode.RECOMMEND
    assert not decisions[steady].capacity_limited


def test_replicas_a_namespace_quota_cuts_take_no_free_gpus_from_the_pool() -> None:
    """Two 4-GPU nodes and a quota of 3 GPUs per namespace. `q` (namespace z) holds its 3;
    `capped` (x) and `p` (y) hold 1 each and want 6, of which the quota lets each run 3.
    The 3 free GPUs are shared over what the quota lets them run: `capped` gets 2 more
    and is limited by the quota alone, `p` gets 1 more and lacks one GPU of the pool (not
    the four that wanting 6 would claim)."""
    world = World()
    world.pool("l4", nodes=2, gpus_per_node=4)
    world.pools["l4"]["spec"]["maxGpusPerNamespace"] = 3
    ten = [{"type": "GPUUtilization", "targetPercent": 10}]
    q = world.service("z", "q", pool="l4", replicas=3, utilisation=[10.0], metrics=ten)
    capped = world.service("x", "capped", pool="l4", replicas=1, utilisation=[60.0], metrics=ten)
    p = world.service("y", "p", pool="l4", replicas=1, utilisation=[60.0], metrics=ten)
    harness = world.operator({UTIL_QUERY: world.gpu_answer()})
    assert harness.op.pool_usage["l4"].available == 3

    harness.ticks()

    decisions = harness.decisions
    assert decisions[q].desired_replicas == 3
    assert not decisions[q].quota_limited
    first, second = decisions[capped], decisions[p]
    assert (first.desired_replicas, second.desired_replicas) == (3, 2)
    assert first.limiting_factor is LimitingFactor.QUOTA
    assert (first.quota_limited, first.quota_missing_gpus) == (True, 3)
    assert not first.capacity_limited
    assert second.limiting_factor is LimitingFactor.CAPACITY
    assert (second.capacity_limited, second.missing_gpus) == (True, 1)
    assert (second.quota_limited, second.quota_wanted_replicas) == (True, 6)


def test_a_lowered_quota_cuts_below_the_current_count() -> None:
    world = World()
    world.pool("l4", nodes=1, gpus_per_node=8)
    world.pools["l4"]["spec"]["maxGpusPerNamespace"] = 2
    ten = [{"type": "GPUUtilization", "targetPercent": 10}]
    big = world.service("x", "big", pool="l4", replicas=5, utilisation=[10.0], metrics=ten)
    harness = world.operator({UTIL_QUERY: world.gpu_answer()})

    harness.ticks()

    decision = harness.decisions[big]
    assert decision.desired_replicas == 2
    assert decision.limiting_factor is LimitingFactor.QUOTA
    assert decision.quota_missing_gpus == 3


def test_the_share_counts_gpus_not_replicas() -> None:
    """3 free GPUs; `big` (2 GPUs per replica) and `small` (1) each hold 2 GPUs and want more.
    `big` gets one replica (2 GPUs), `small` the last GPU: neither takes it all."""
    world = World()
    world.pool("l4", nodes=1, gpus_per_node=7)
    ten = [{"type": "GPUUtilization", "targetPercent": 10}]
    big = world.service("ns", "big", pool="l4", replicas=1, gpus=2, utilisation=[100.0],
                        metrics=ten)  # fmt: skip
    small = world.service("ns", "small", pool="l4", replicas=2, utilisation=[100.0], metrics=ten)
    harness = world.operator({UTIL_QUERY: world.gpu_answer()})
    assert harness.op.pool_usage["l4"].available == 3

    harness.ticks()

    decisions = harness.decisions
    assert (decisions[big].desired_replicas, decisions[small].desired_replicas) == (2, 3)
    assert decisions[big].missing_gpus == (10 - 2) * 2
    assert decisions[small].missing_gpus == 10 - 3


def test_the_tick_is_not_fooled_by_the_order_of_the_caches() -> None:
    world = World()
    world.pool("l4", nodes=2, gpus_per_node=4)
    ten = [{"type": "GPUUtilization", "targetPercent": 10}]
    world.service("ns", "a", pool="l4", replicas=1, utilisation=[60.0], metrics=ten)
    world.service("ns", "b", pool="l4", replicas=3, utilisation=[20.0], metrics=ten)
    harness = world.operator({UTIL_QUERY: world.gpu_answer()})
    harness.ticks()
    forward = {k: d.desired_replicas for k, d in harness.decisions.items()}
    assert forward == {("ns", "a"): 4, ("ns", "b"): 4}

    world.services = dict(reversed(world.services.items()))
    world.pods.reverse()
    harness = world.operator({UTIL_QUERY: world.gpu_answer()})
    harness.ticks()
    assert {k: d.desired_replicas for k, d in harness.decisions.items()} == forward


# --- the second decide is skipped only where it would change nothing ------------------------

UTIL_SPEC = MetricSpec(MetricType.GPU_UTILIZATION, target_percent=50)
_POLICIES = st.builds(
    lambda maximum, budget, gpus: ScalingPolicy(
        min_replicas=1,
        max_replicas=maximum,
        metrics=(UTIL_SPEC,),
        scale_up=ScalingBehavior(stabilization_window_seconds=0, max_step_replicas=100),
        scale_down=ScalingBehavior(stabilization_window_seconds=0),
        gpus_per_replica=gpus,
        price_per_gpu_hour=Decimal("2.5"),
        max_cost_per_hour=budget,
    ),
    st.integers(1, 12),
    st.one_of(st.none(), st.sampled_from([Decimal(0), Decimal(5), Decimal("12.5"), Decimal(40)])),
    st.integers(1, 4),
)


@settings(max_examples=300, deadline=None)
@given(
    policy=_POLICIES,
    current=st.integers(1, 8),
    values=st.lists(st.floats(0, 100), min_size=1, max_size=8),
    share=st.integers(0, 12),
)
def test_skipping_the_second_decide_changes_nothing(
    policy: ScalingPolicy, current: int, values: list[float], share: int
) -> None:
    samples = {UTIL_SPEC: MetricSample.per_pod({f"p{i}": v for i, v in enumerate(values)}, NOW)}
    state = ScalingState(current_replicas=current, ready_replicas=current)
    first = decide(samples, state, policy, None, NOW)
    second = decide(samples, state, policy, share, NOW)
    if pool_is_no_limit(first, share):
        assert second == first
    if not first.budget_limited:
        # Without a budget cut the shortcut misses none: each second decide that would
        # return the first decision unchanged is skipped.
        assert pool_is_no_limit(first, share) == (second == first)
