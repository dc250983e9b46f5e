"""The autoscaler end to end: the real Prometheus scraping the DCGM simulator, the operator
as a process ticking every second over a 5 s metrics window (tests/integration/conftest.py).

A test sets a service's load on the simulator (GPU-percent of demand: load 150 keeps one
and a half GPUs busy, spread over the service's pods) and watches the Deployment and the
AIService's status follow. Each test has its namespace; a test that needs a known number
of free GPUs brings a pool of its own on one node and frees the node before it ends.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import Loads, OperatorProcess, flush_audit
from localcluster.cluster import ClusterState, LocalCluster
from support import Kubectl, wait_until

GPU = "nvidia.com/gpu"
IMAGE = "registry.example/llm:1"
#: A node of the l4 pool (4 GPUs) that the capacity test gives a pool of its own. The core
#: tests use it too (one test at a time), so the test reads what others hold on it.
CAPACITY_NODE = "gpu-l4-1"
WAKE_METRIC = "gpuyard_sim_requests_in_flight"


# --- helpers ---------------------------------------------------------------------------------


def utilisation(target: int) -> dict[str, Any]:
    return {"type": "GPUUtilization", "targetPercent": target}


def in_flight(target: str = "1", activation: str = "0") -> dict[str, Any]:
    """The simulator's request metric: load / 100, exported per service even with no pods."""
    return {
        "type": "Prometheus",
        "prometheus": {
            "metric": WAKE_METRIC,
            "targetPerReplica": target,
            "activationValue": activation,
        },
    }


def autoscaled(
    name: str,
    pool: str,
    metrics: list[dict[str, Any]],
    *,
    min_replicas: int = 1,
    max_replicas: int = 3,
    mode: str = "Auto",
    scale_down_window: int = 0,
    **spec: Any,
) -> dict[str, Any]:
    autoscaling: dict[str, Any] = {
        "mode": mode,
        "metrics": metrics,
        "scaleDown": {"stabilizationWindowSeconds": scale_down_window},
    }
    autoscaling.update(spec.pop("autoscaling", {}))
    return {
        "apiVersion": "gpuyard.io/v1alpha1",
        "kind": "AIService",
        "metadata": {"name": name},
        "spec": {
            "pool": pool,
            "gpusPerReplica": 1,
            "container": {"image": IMAGE},
            "minReplicas": min_replicas,
            "maxReplicas": max_replicas,
            "autoscaling": autoscaling,
            **spec,
        },
    }


def manifest(*objects: dict[str, Any]) -> str:
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": list(objects)})


def get(kubectl: Kubectl, *args: str) -> dict[str, Any]:
    found: dict[str, Any] = kubectl.json("get", *args)
    return found


def condition(obj: dict[str, Any], kind: str) -> dict[str, Any]:
    """The condition of type ``kind``, or an empty dict."""
    conditions = (obj.get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c["type"] == kind), {})


def replicas(kubectl: Kubectl, namespace: str, name: str) -> int | None:
    result = kubectl.run("get", "deployment", "-n", namespace, name, "-o", "json", check=False)
    if result.returncode != 0:
        return None
    count: int = json.loads(result.stdout)["spec"].get("replicas", 1)
    return count


def running_pods(kubectl: Kubectl, namespace: str, name: str) -> list[dict[str, Any]]:
    pods: list[dict[str, Any]] = get(
        kubectl, "pods", "-n", namespace, "-l", f"gpuyard.io/service={name}"
    )["items"]
    return [
        p
        for p in pods
        if p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")
    ]


def wait_replicas(
    kubectl: Kubectl, namespace: str, name: str, count: int, timeout: float = 60
) -> None:
    """The Deployment asks for ``count`` replicas and exactly that many pods run."""
    wait_until(
        lambda: (
            replicas(kubectl, namespace, name) == count
            and len(running_pods(kubectl, namespace, name)) == count
        ),
        timeout=timeout,
        what=f"{count} running replica(s) of {name}",
    )


def wait_status(
    kubectl: Kubectl,
    namespace: str,
    name: str,
    check: Callable[[dict[str, Any]], bool],
    *,
    what: str,
    timeout: float = 60,
) -> dict[str, Any]:
    def current() -> dict[str, Any] | None:
        service = get(kubectl, "ais", "-n", namespace, name)
        return service if check(service) else None

    return wait_until(current, timeout=timeout, what=what)


def has_condition(kind: str, status: str, reason: str | None = None) -> Callable[[Any], bool]:
    def check(service: dict[str, Any]) -> bool:
        found = condition(service, kind)
        return found.get("status") == status and reason in (None, found.get("reason"))

    return check


def holds(observe: Callable[[], object], expected: object, seconds: float, what: str) -> None:
    """Assert ``observe()`` stays ``expected`` for ``seconds`` (polled: a negative wait, not
    a sleep)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        seen = observe()
        left = deadline - time.monotonic()
        assert seen == expected, f"{what} stopped holding {left:.1f}s early: saw {seen!r}"
        time.sleep(0.25)


@pytest.fixture
def own_pool(kubectl: Kubectl) -> Iterator[Callable[..., str]]:
    """Makes GPUPools on one node; deletes their services' pods and the pools afterwards,
    so the node is free for the next test."""
    made: list[str] = []

    def make(node: str, **spec: Any) -> str:
        name = f"t-as-{len(made)}-{time.monotonic_ns() % 10**6}"
        made.append(name)
        pool = {
            "apiVersion": "gpuyard.io/v1alpha1",
            "kind": "GPUPool",
            "metadata": {"name": name},
            "spec": {
                "gpuType": "l4",
                "nodeSelector": {"kubernetes.io/hostname": node},
                "tolerations": [{"key": GPU, "operator": "Exists", "effect": "NoSchedule"}],
                "price": {"perGpuHour": "0.80"},
                **spec,
            },
        }
        kubectl.apply(manifest(pool))
        return name

    yield make
    for name in made:
        kubectl.run("delete", "gpupool", name, "--wait=false", check=False)


@pytest.fixture
def components(cluster: ClusterState) -> LocalCluster:
    """Stops and starts processes of the running cluster."""
    return LocalCluster(Path(cluster.state_dir), name=cluster.name)


def gpus_held_on(kubectl: Kubectl, node: str, excluding_namespace: str) -> int:
    pods = get(kubectl, "pods", "-A", "--field-selector", f"spec.nodeName={node}")["items"]
    held = 0
    for pod in pods:
        if pod["metadata"]["namespace"] == excluding_namespace:
            continue
        if pod["status"].get("phase") in ("Succeeded", "Failed"):
            continue
        for container in pod["spec"]["containers"]:
            held += int(container.get("resources", {}).get("limits", {}).get(GPU, 0))
    return held


def delete_and_wait(kubectl: Kubectl, namespace: str, name: str) -> None:
    kubectl.run("delete", "ais", name, "-n", namespace, "--wait=false", check=False)
    wait_until(
        lambda: (
            not get(kubectl, "pods", "-n", namespace, "-l", f"gpuyard.io/service={name}")["items"]
        ),
        timeout=90,
        what=f"the pods of {name} to go",
    )


# --- load moves the replicas ---------------------------------------------------------------------


def test_load_scales_up_at_once_and_down_only_after_the_window(
    kubectl: Kubectl, namespace: str, running_operator: OperatorProcess, load: Loads
) -> None:
    window = 10
    # Load 30 on one GPU reads 30 %, under the 50 % target: one replica (minReplicas).
    load.set(namespace, "chat", 30)
    service = autoscaled("chat", "a100", [utilisation(50)], scale_down_window=window)
    kubectl.apply(manifest(service), namespace)
    wait_replicas(kubectl, namespace, "chat", 1)
    wait_status(kubectl, namespace, "chat", has_condition("MetricsAvailable", "True"),
                what="the metric to be read")  # fmt: skip

    # Load 150: one GPU at 100 % asks for 2, two at 75 % for 3 (maxReplicas).
    load.set(namespace, "chat", 150)
    wait_replicas(kubectl, namespace, "chat", 3)
    events = get(kubectl, "events", "-n", namespace, "--field-selector",
                 "involvedObject.name=chat,reason=ScaledUp")["items"]  # fmt: skip
    assert events, "no ScaledUp event"
    assert all(e["type"] == "Normal" for e in events)
    assert any(re.match(r"1 -> [23] replicas: GPUUtilization is", e["message"]) for e in events), [
        e["message"] for e in events
    ]
    assert {e["source"]["component"] for e in events} == {"gpuyard"}

    # Load 30 on three GPUs reads 10 %: one replica is enough, but only after the window.
    lowered = time.monotonic()
    load.set(namespace, "chat", 30)
    seen: list[dict[str, Any]] = []

    def chat_replicas() -> int | None:
        seen.append(get(kubectl, "ais", "-n", namespace, "chat")["status"])
        return replicas(kubectl, namespace, "chat")

    # The last recommendation of 3 comes at most one tick before the load drops.
    holds(chat_replicas, 3, window - 2, "three replicas inside the scale-down window")
    held = [s["recommendation"] for s in seen if "recommendation" in s]
    assert any(r.get("limitedBy") == "StabilizationWindow" and r["replicas"] == 3 for r in held), (
        held[-3:]
    )
    wait_until(lambda: (replicas(kubectl, namespace, "chat") or 3) < 3, what="a scale-down")
    assert time.monotonic() - lowered >= window - 1
    wait_replicas(kubectl, namespace, "chat", 1)
    # The way down may pass through 2, a recommendation made while the 5 s metric window
    # was still draining: it too stays in the scale-down window (as in the HPA).
    down = get(kubectl, "events", "-n", namespace, "--field-selector",
               "involvedObject.name=chat,reason=ScaledDown")["items"]  # fmt: skip
    steps = sorted(e["message"].split(" replicas")[0] for e in down)
    assert steps in (["3 -> 1"], ["2 -> 1", "3 -> 2"]), [e["message"] for e in down]


def test_idle_scales_to_zero_and_the_request_metric_wakes_it(
    kubectl: Kubectl, namespace: str, running_operator: OperatorProcess, load: Loads
) -> None:
    idle_after = 8
    load.set(namespace, "burst", 100)  # one request in flight: one replica
    service = autoscaled(
        "burst",
        "a100",
        [in_flight(target="1", activation="0.5")],
        min_replicas=0,
        max_replicas=3,
        autoscaling={"scaleToZeroAfterSeconds": idle_after},
    )
    kubectl.apply(manifest(service), namespace)
    wait_replicas(kubectl, namespace, "burst", 1)

    # 0.4 requests in flight: under the activation value, so no demand.
    quiet = time.monotonic()
    load.set(namespace, "burst", 40)
    wait_replicas(kubectl, namespace, "burst", 0, timeout=idle_after + 60)
    assert time.monotonic() - quiet >= idle_after - 1  # not before the idle time
    zero = wait_status(
        kubectl,
        namespace,
        "burst",
        lambda s: s["status"].get("recommendation", {}).get("reason") == "NoDemandAtZero",
        what="the service to report no demand at zero",
    )
    assert zero["status"]["desiredReplicas"] == 0
    assert condition(zero, "Ready")["reason"] == "ScaledToZero"
    assert condition(zero, "MetricsAvailable")["status"] == "True"

    # The request metric exists with no pod at all: 2.5 requests wake it, up to 3 replicas
    # (the first tick may see the 5 s average on its way up and wake it to fewer).
    load.set(namespace, "burst", 250)
    wait_replicas(kubectl, namespace, "burst", 3)
    woken = get(kubectl, "ais", "-n", namespace, "burst")
    assert woken["status"]["desiredReplicas"] == 3
    events = get(kubectl, "events", "-n", namespace, "--field-selector",
                 "involvedObject.name=burst,reason=ScaledUp")["items"]  # fmt: skip
    wakes = [e["message"] for e in events if e["message"].startswith("0 -> ")]
    # Woken twice from zero: when created, and after idling to zero.
    assert len(wakes) == 2, [e["message"] for e in events]
    assert all(f"{WAKE_METRIC} shows demand at zero" in m for m in wakes), wakes


# --- limits: the pool and the budget ---------------------------------------------------------


def test_a_pool_that_fills_up_stops_the_scale_up(
    kubectl: Kubectl,
    namespace: str,
    running_operator: OperatorProcess,
    load: Loads,
    own_pool: Callable[..., str],
) -> None:
    pool = own_pool(CAPACITY_NODE)
    load.set(namespace, "hungry", 800)  # eight GPUs' worth: every replica at 100 %
    service = autoscaled(
        "hungry",
        pool,
        [utilisation(50)],
        max_replicas=8,
        autoscaling={"scaleUp": {"maxStepReplicas": 8}},
    )
    kubectl.apply(manifest(service), namespace)
    try:

        def capped() -> tuple[dict[str, Any], int] | None:
            found = get(kubectl, "ais", "-n", namespace, "hungry")
            limited = condition(found, "CapacityLimited")
            missing = re.search(r"the pool lacks (\d+) GPU\(s\)", limited.get("message", ""))
            fits = 4 - gpus_held_on(kubectl, CAPACITY_NODE, excluding_namespace=namespace)
            running = len(running_pods(kubectl, namespace, "hungry"))
            if limited.get("status") != "True" or missing is None or running != fits:
                return None
            # Eight wanted, one GPU each; until every new pod reports, its missing GPU
            # series counts as idle (as in the HPA) and the autoscaler wants fewer.
            if int(missing.group(1)) != 8 - running:
                return None
            return found, running

        found, running = wait_until(capped, timeout=90, what="CapacityLimited=True")
        assert running >= 1
        # Never more replicas than the pool has GPUs for: nothing is left Pending.
        assert replicas(kubectl, namespace, "hungry") == running
        assert found["status"]["desiredReplicas"] == running
        limited = condition(found, "CapacityLimited")
        assert limited["reason"] == "InsufficientGPUs"
        assert found["status"]["recommendation"]["limitedBy"] == "Capacity"
        pending = [p for p in get(kubectl, "pods", "-n", namespace)["items"]
                   if p["status"].get("phase") == "Pending"]  # fmt: skip
        assert pending == []
    finally:
        delete_and_wait(kubectl, namespace, "hungry")


def test_a_budget_stops_the_scale_up(
    kubectl: Kubectl, namespace: str, running_operator: OperatorProcess, load: Loads
) -> None:
    # The a100 pool charges 2.50 per GPU-hour: 5.00 an hour pays for two replicas.
    load.set(namespace, "thrifty", 400)
    service = autoscaled(
        "thrifty", "a100", [utilisation(50)], max_replicas=4, budget={"maxCostPerHour": "5.00"}
    )
    kubectl.apply(manifest(service), namespace)

    found = wait_status(
        kubectl,
        namespace,
        "thrifty",
        has_condition("BudgetLimited", "True", "BudgetCapsReplicas"),
        what="BudgetLimited=True",
    )
    wait_replicas(kubectl, namespace, "thrifty", 2)
    holds(lambda: replicas(kubectl, namespace, "thrifty"), 2, 3, "the budget's two replicas")
    found = get(kubectl, "ais", "-n", namespace, "thrifty")
    assert found["status"]["desiredReplicas"] == 2
    assert found["status"]["recommendation"]["limitedBy"] == "Budget"
    assert "the budget caps the replicas" in condition(found, "BudgetLimited")["message"]
    assert condition(found, "CapacityLimited").get("status") != "True"


# --- metrics unavailable -----------------------------------------------------------------------


def test_without_prometheus_replicas_hold_and_scaling_resumes_after(
    kubectl: Kubectl,
    namespace: str,
    running_operator: OperatorProcess,
    load: Loads,
    components: LocalCluster,
) -> None:
    load.set(namespace, "steady", 100)  # two GPUs at 50 %: two replicas
    kubectl.apply(manifest(autoscaled("steady", "a100", [utilisation(50)])), namespace)
    wait_replicas(kubectl, namespace, "steady", 2)
    wait_status(kubectl, namespace, "steady", has_condition("MetricsAvailable", "True"),
                what="the metric to be read")  # fmt: skip

    components.stop_component("prometheus")
    try:
        blind = wait_status(
            kubectl,
            namespace,
            "steady",
            has_condition("MetricsAvailable", "False", "PrometheusUnreachable"),
            what="MetricsAvailable=False",
        )
        assert "holding" in condition(blind, "MetricsAvailable")["message"]
        assert blind["status"]["recommendation"]["reason"] == "MetricsUnavailableHold"
        # More load while blind changes nothing: Hold keeps the count, whatever it is.
        load.set(namespace, "steady", 300)
        holds(lambda: replicas(kubectl, namespace, "steady"), 2, 5, "two replicas held")
    finally:
        components.start_component("prometheus")

    wait_status(
        kubectl,
        namespace,
        "steady",
        has_condition("MetricsAvailable", "True", "MetricsRead"),
        what="MetricsAvailable=True again",
        timeout=90,
    )
    wait_replicas(kubectl, namespace, "steady", 3)  # 300 asks for 6; maxReplicas is 3


# --- Recommend mode -------------------------------------------------------------------------------


def test_recommend_mode_writes_the_recommendation_and_nothing_else(
    kubectl: Kubectl,
    namespace: str,
    running_operator: OperatorProcess,
    load: Loads,
) -> None:
    load.set(namespace, "dry-run", 50)
    service = autoscaled("dry-run", "a100", [utilisation(50)], mode="Recommend", max_replicas=4)
    kubectl.apply(manifest(service), namespace)
    wait_replicas(kubectl, namespace, "dry-run", 1)
    wait_status(kubectl, namespace, "dry-run", has_condition("MetricsAvailable", "True"),
                what="the metric to be read")  # fmt: skip
    deployment = get(kubectl, "deployment", "-n", namespace, "dry-run")
    flush_audit(kubectl, running_operator, namespace)
    before = len(running_operator.writes())

    load.set(namespace, "dry-run", 300)  # one GPU at 100 %: Auto would go to 2, then 4
    recommended = wait_status(
        kubectl,
        namespace,
        "dry-run",
        lambda s: s["status"].get("recommendation", {}).get("replicas", 0) >= 2,
        what="a recommendation to scale up",
    )
    recommendation = recommended["status"]["recommendation"]
    assert recommendation["reason"] == "MetricAboveTarget"
    assert recommendation["metric"] == "GPUUtilization"
    assert recommendation["targetValue"] == "50"
    holds(lambda: replicas(kubectl, namespace, "dry-run"), 1, 3, "the Deployment unchanged")

    flush_audit(kubectl, running_operator, namespace)
    writes = [
        w
        for w in running_operator.writes()[before:]
        if w.get("objectRef", {}).get("namespace") == namespace
    ]
    touched = {(w["objectRef"]["resource"], w["objectRef"].get("subresource")) for w in writes}
    assert touched == {("aiservices", "status")}, json.dumps(writes, indent=1)[:2000]
    after = get(kubectl, "deployment", "-n", namespace, "dry-run")
    assert after["metadata"]["generation"] == deployment["metadata"]["generation"]
    assert after["spec"]["replicas"] == 1
    scaled = get(kubectl, "events", "-n", namespace, "--field-selector",
                 "involvedObject.name=dry-run")["items"]  # fmt: skip
    assert not [e for e in scaled if e["reason"] in ("ScaledUp", "ScaledDown")]


# --- what the operator says about itself ------------------------------------------------------


def _samples(text: str, name: str) -> dict[str, float]:
    found = {}
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            series, value = line.rsplit(" ", 1)
            found[series] = float(value)
    return found


def test_the_operator_exports_its_autoscaler_metrics(
    kubectl: Kubectl, namespace: str, running_operator: OperatorProcess, load: Loads
) -> None:
    load.set(namespace, "watched", 50)
    kubectl.apply(manifest(autoscaled("watched", "a100", [utilisation(50)])), namespace)
    wait_replicas(kubectl, namespace, "watched", 1)
    wait_status(kubectl, namespace, "watched", has_condition("MetricsAvailable", "True"),
                what="the metric to be read")  # fmt: skip
    first = running_operator.metrics()

    def ticked() -> str | None:
        text = running_operator.metrics()
        before = _samples(first, "gpuyard_autoscaler_tick_duration_seconds_count")
        now = _samples(text, "gpuyard_autoscaler_tick_duration_seconds_count")
        return text if sum(now.values()) > sum(before.values()) else None

    text = wait_until(ticked, timeout=30, what="another autoscaler tick")
    decisions = _samples(text, "gpuyard_autoscaler_decisions_total")
    assert any('reason="' in series for series in decisions), decisions
    assert sum(decisions.values()) >= 1
    queries = _samples(text, "gpuyard_prometheus_queries_total")
    ticks = _samples(text, "gpuyard_autoscaler_tick_duration_seconds_count")
    # At least the three GPU queries per tick, every tick.
    assert sum(queries.values()) >= 3 * sum(ticks.values()) > 0
    assert _samples(text, "gpuyard_autoscaler_tick_duration_seconds_bucket")
    desired = _samples(text, "gpuyard_autoscaler_desired_replicas")
    assert (
        desired[f'gpuyard_autoscaler_desired_replicas{{namespace="{namespace}",service="watched"}}']
        == 1
    )
