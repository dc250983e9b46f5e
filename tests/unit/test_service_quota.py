"""The service reconcile under a namespace quota, in-process: ``reconcile_service`` with the
caches as plain dicts and a Kubernetes client that records its writes (and applies them to
the cached Deployment, as the watch would).

Pool accounting, admission, the quota rules and the status are the real ones.
"""

from __future__ import annotations

import asyncio
import copy
from dataclasses import fields
from typing import Any, cast

from test_autoscaler_tick import World

from gpuyard.api.names import ServiceKey
from gpuyard.api.pool import GPUPool
from gpuyard.config import Settings
from gpuyard.handlers.context import Caches, Operator
from gpuyard.handlers.services import reconcile_service
from gpuyard.handlers.workqueue import WorkQueue
from gpuyard.io.kube import Kube
from gpuyard.io.metrics import OperatorMetrics
from gpuyard.logic.conditions import find_condition
from gpuyard.logic.pool_accounting import compute_pool_usage

Body = dict[str, Any]


class RecordingKube:
    """Records each write; applies Deployment writes to the cached Deployments."""

    def __init__(self, indices: dict[str, Any]) -> None:
        self.indices = indices
        self.events: list[tuple[str, str]] = []
        self.scaled: list[tuple[str, str, int]] = []

    def _store(self, obj: Body) -> None:
        if obj.get("kind") == "Deployment":
            meta = obj["metadata"]
            self.indices["deployments"][(meta["namespace"], meta["name"])] = [copy.deepcopy(obj)]

    def apply(self, obj: Body) -> None:
        self._store(obj)

    def create(self, obj: Body) -> None:
        self._store(obj)

    def scale_deployment(self, namespace: str, name: str, replicas: int) -> None:
        self.scaled.append((namespace, name, replicas))
        [live] = self.indices["deployments"][(namespace, name)]
        live["spec"]["replicas"] = replicas

    def patch_status(self, *_: Any) -> None:
        pass

    def post_event(self, _involved: Body, reason: str, message: str, *_: Any) -> None:
        self.events.append((reason, message))

    def delete(self, *_: Any) -> None:
        pass


def operator_for(world: World, namespace_labels: dict[str, dict[str, str]]) -> Operator:
    indices: dict[str, Any] = {f.name: {} for f in fields(Caches)}
    indices["pools"] = {name: [body] for name, body in world.pools.items()}
    indices["services"] = {key: [body] for key, body in world.services.items()}
    indices["deployments"] = {}
    indices["nodes"] = {name: [info] for name, info in world.nodes.items()}
    indices["namespaces"] = {name: [labels] for name, labels in namespace_labels.items()}
    by_pool: dict[str, list[ServiceKey]] = {}
    for key, body in world.services.items():
        by_pool.setdefault(body["spec"]["pool"], []).append(key)
    indices["services_by_pool"] = by_pool
    op = Operator(
        settings=Settings.model_construct(autoscale_interval=1.0, metrics_window_seconds=5),
        kube=cast(Kube, RecordingKube(indices)),
        metrics=OperatorMetrics(),
        caches=Caches(**indices),
        prometheus=None,
    )
    op.service_queue = WorkQueue("service", lambda key: reconcile_service(op, key))
    for name, body in world.pools.items():
        op.pool_usage[name] = compute_pool_usage(
            GPUPool.from_mapping(body), world.nodes.values(), []
        )
    return op


def reconcile(op: Operator, *keys: ServiceKey) -> None:
    async def run() -> None:
        for key in keys:
            await reconcile_service(op, key)

    asyncio.run(run())


def replicas(op: Operator, key: ServiceKey) -> int:
    deployment = op.caches.deployment(key)
    assert deployment is not None
    return int(deployment["spec"]["replicas"])


def condition(op: Operator, key: ServiceKey, kind: str) -> Any:
    status = op.own_status[key]
    return find_condition(status.get("conditions"), kind)


def quota_world(quota: int | None, **services: int) -> tuple[World, list[ServiceKey]]:
    world = World()
    world.pool("l4", nodes=2, gpus_per_node=4)
    if quota is not None:
        world.pools["l4"]["spec"]["maxGpusPerNamespace"] = quota
    world.pools["l4"]["spec"]["namespaceSelector"] = {"matchLabels": {"gpu": "yes"}}
    keys = []
    for name, count in services.items():
        key = world.service("team", name, pool="l4", replicas=0, autoscaling={"mode": "Off"})
        world.services[key]["spec"]["replicas"] = count  # as `kubectl scale ais` sets it
        keys.append(key)
    world.deployments.clear()
    world.pods.clear()
    return world, keys


ADMITTED = {"team": {"gpu": "yes"}}


def test_kubectl_scale_past_the_quota_is_clamped_with_a_condition_and_an_event() -> None:
    world, [greedy] = quota_world(2, greedy=5)
    op = operator_for(world, ADMITTED)
    reconcile(op, greedy)  # creates the Deployment
    reconcile(op, greedy)  # writes the status
    assert replicas(op, greedy) == 2
    limited = condition(op, greedy, "QuotaLimited")
    assert (limited["status"], limited["reason"]) == ("True", "QuotaCapsReplicas")
    assert "lacks 3" in limited["message"]
    kube = cast(RecordingKube, op.kube)
    assert [reason for reason, _ in kube.events] == ["QuotaLimited"]


def test_without_a_quota_nothing_is_clamped_and_no_condition_is_shown() -> None:
    world, [free] = quota_world(None, free=5)
    op = operator_for(world, ADMITTED)
    reconcile(op, free, free)
    assert replicas(op, free) == 5
    assert condition(op, free, "QuotaLimited") is None


def test_two_services_of_a_namespace_share_the_quota_and_never_exceed_it() -> None:
    world, [first, second] = quota_world(4, first=4, second=4)
    op = operator_for(world, ADMITTED)
    reconcile(op, first, first)
    assert replicas(op, first) == 4  # alone, it may take the whole quota
    for _ in range(3):  # the second arrives; each reconciles in turn
        for key in (second, first):
            reconcile(op, key)
            held = sum(replicas(op, k) for k in (first, second) if op.caches.deployment(k))
            assert held <= 4
    assert (replicas(op, first), replicas(op, second)) == (2, 2)


def test_a_lowered_quota_scales_down_and_a_raised_one_brings_back() -> None:
    world, [svc] = quota_world(4, svc=3)
    op = operator_for(world, ADMITTED)
    reconcile(op, svc, svc)
    assert replicas(op, svc) == 3
    op.caches.pools["l4"][0]["spec"]["maxGpusPerNamespace"] = 1
    op.caches.pools["l4"][0]["metadata"]["resourceVersion"] = "2"
    reconcile(op, svc)
    assert replicas(op, svc) == 1
    assert condition(op, svc, "QuotaLimited")["status"] == "True"
    op.caches.pools["l4"][0]["spec"]["maxGpusPerNamespace"] = 8
    op.caches.pools["l4"][0]["metadata"]["resourceVersion"] = "3"
    reconcile(op, svc)
    assert replicas(op, svc) == 3
    assert condition(op, svc, "QuotaLimited")["status"] == "False"


def test_a_namespace_dropped_from_the_selector_scales_to_zero_and_comes_back() -> None:
    world, [svc] = quota_world(None, svc=2)
    op = operator_for(world, ADMITTED)
    reconcile(op, svc, svc)
    assert replicas(op, svc) == 2
    op.caches.namespaces["team"] = [{}]  # the label is gone
    reconcile(op, svc)
    kube = cast(RecordingKube, op.kube)
    assert kube.scaled == [("team", "svc", 0)]
    assert replicas(op, svc) == 0
    accepted = condition(op, svc, "Accepted")
    assert (accepted["status"], accepted["reason"]) == ("False", "NamespaceNotAllowed")
    assert [reason for reason, _ in kube.events][-1] == "NamespaceNotAllowed"
    assert op.caches.deployment(svc) is not None  # nothing else of it is deleted
    reconcile(op, svc)
    assert kube.scaled == [("team", "svc", 0)]  # at zero: no second write
    op.caches.namespaces["team"] = [{"gpu": "yes"}]
    reconcile(op, svc)
    assert replicas(op, svc) == 2
    assert condition(op, svc, "Accepted")["status"] == "True"
