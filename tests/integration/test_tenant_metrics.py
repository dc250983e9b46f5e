"""A tenant metric speaks only for its scrape target's namespace (issue 15, docs/autoscaling.md).

Two tenants declare the same Prometheus metric. The victim's own target, registered with
the local Prometheus as Kubernetes service discovery would register it (target labels
``namespace`` and ``service``, labels not honoured), publishes its queue length. A rogue
target in the attacker's namespace publishes the same metric labelled with the victim's
namespace and service at a high value; Prometheus stores that claim as
``exported_namespace`` beside the rogue target's own namespace. The victim's replicas and
recommendation follow its own series alone, the claim counts for the attacker's service,
and the victim's own series still drives it.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest

from conftest import OperatorProcess
from localcluster.cluster import ClusterState, tenant_targets_dir
from localcluster.jsonhttp import http_json
from scrape_support import ScrapeTarget, sample_line
from support import Kubectl, wait_until

IMAGE = "registry.example/llm:1"
SERVICE = "chat"
METRIC = "gpuyard_test_queue_length"
#: The victim's own queue: one replica's worth at a target of 1 per replica.
OWN_QUEUE = 1
#: What the rogue claims for the victim: read as the victim's, it would ask for maxReplicas.
CLAIMED_QUEUE = 50
MAX_REPLICAS = 3
#: The conftest operator's GPUYARD_METRICS_WINDOW_SECONDS and GPUYARD_AUTOSCALE_INTERVAL.
METRICS_WINDOW_SECONDS = 5
AUTOSCALE_INTERVAL = 1


def tenant_target(cluster: ClusterState, name: str, labels: dict[str, str]) -> ScrapeTarget:
    """A target of the local Prometheus's tenant job (file-based discovery, labels not
    honoured), with ``labels`` as its target labels."""
    return ScrapeTarget(tenant_targets_dir(cluster) / f"{name}.json", labels)


def publish(target: ScrapeTarget, value: float, **labels: str) -> None:
    """Serve one gauge sample of METRIC with ``labels`` of the series' own."""
    target.exposition = f"# TYPE {METRIC} gauge\n{sample_line(METRIC, labels, value)}\n"


@pytest.fixture
def attacker(kubectl: Kubectl, namespace: str) -> Iterator[str]:
    name = f"{namespace}-attacker"
    kubectl("create", "namespace", name)
    yield name
    kubectl.run("delete", "namespace", name, "--wait=false", check=False)


def queued_service() -> dict[str, Any]:
    return {
        "apiVersion": "gpuyard.io/v1alpha1",
        "kind": "AIService",
        "metadata": {"name": SERVICE},
        "spec": {
            "pool": "a100",
            "gpusPerReplica": 1,
            "container": {"image": IMAGE, "port": 8000},
            "minReplicas": 1,
            "maxReplicas": MAX_REPLICAS,
            "autoscaling": {
                "metrics": [
                    {
                        "type": "Prometheus",
                        "prometheus": {"metric": METRIC, "targetPerReplica": "1"},
                    }
                ],
                "scaleDown": {"stabilizationWindowSeconds": 0},
            },
        },
    }


def desired_replicas(kubectl: Kubectl, namespace: str) -> int | None:
    result = kubectl.run("get", "deployment", "-n", namespace, SERVICE, "-o", "json", check=False)
    if result.returncode != 0:
        return None
    count: int = json.loads(result.stdout)["spec"]["replicas"]
    return count


def recommended_value(kubectl: Kubectl, namespace: str) -> Decimal | None:
    """The metric value the autoscaler last decided on, as the service's status shows it."""
    status = kubectl.json("get", "ais", "-n", namespace, SERVICE).get("status") or {}
    value = (status.get("recommendation") or {}).get("currentValue")
    return Decimal(value) if value is not None else None


def prometheus_query(cluster: ClusterState, query: str) -> list[dict[str, Any]]:
    url = f"{cluster.prometheus_url}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    result: list[dict[str, Any]] = http_json("GET", url)["data"]["result"]
    return result


def autoscaler_ticks(operator: OperatorProcess) -> float:
    for line in operator.metrics().splitlines():
        if line.startswith("gpuyard_autoscaler_tick_duration_seconds_count "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.slow
def test_a_series_claiming_another_namespace_does_not_move_that_namespaces_service(
    kubectl: Kubectl,
    namespace: str,
    attacker: str,
    cluster: ClusterState,
    running_operator: OperatorProcess,
) -> None:
    victim = namespace
    own = tenant_target(cluster, f"own-{victim}", {"namespace": victim, "service": SERVICE})
    rogue = tenant_target(cluster, f"rogue-{attacker}", {"namespace": attacker, "pod": "rogue"})
    publish(own, OWN_QUEUE)
    publish(rogue, CLAIMED_QUEUE, namespace=victim, service=SERVICE)
    with own, rogue:
        # Both tenants declare the metric, so both namespaces are in the one query's scope:
        # only the key by the target's namespace keeps the claim out of the victim's total.
        kubectl.apply(json.dumps(queued_service()), victim)
        kubectl.apply(json.dumps(queued_service()), attacker)

        # The claim is in Prometheus, as exported_namespace beside the rogue's own namespace,
        # and has filled a whole metrics window.
        claim = f'{METRIC}{{exported_namespace="{victim}"}}'
        [stored] = wait_until(
            lambda: prometheus_query(cluster, claim), what="Prometheus to scrape the rogue"
        )
        assert (stored["metric"]["namespace"], stored["metric"]["service"]) == (attacker, SERVICE)
        window = f"avg_over_time({claim}[{METRICS_WINDOW_SECONDS}s])"
        wait_until(
            lambda: (
                [s["value"][1] for s in prometheus_query(cluster, window)] == [str(CLAIMED_QUEUE)]
            ),
            what="the claimed samples to fill a whole metrics window",
        )

        # Two metrics windows of ticks with the claim in place: the victim stays at one
        # replica, sized by its own series.
        wait_until(
            lambda: recommended_value(kubectl, victim) is not None,
            what="the victim's first recommendation",
        )
        ticks = autoscaler_ticks(running_operator)
        enough = 2 * METRICS_WINDOW_SECONDS / AUTOSCALE_INTERVAL

        def victim_unmoved_for_enough_ticks() -> bool:
            assert desired_replicas(kubectl, victim) == 1
            assert recommended_value(kubectl, victim) == OWN_QUEUE
            return autoscaler_ticks(running_operator) >= ticks + enough

        wait_until(victim_unmoved_for_enough_ticks, what=f"{enough:.0f} autoscaler ticks")

        # The claim counts where its target lives: the attacker's own service grows.
        wait_until(
            lambda: (
                desired_replicas(kubectl, attacker) == MAX_REPLICAS
                and recommended_value(kubectl, attacker) == CLAIMED_QUEUE
            ),
            timeout=60,
            what="the attacker's service to read its own claim",
        )

        # The victim's own series still drives it.
        publish(own, 2)
        wait_until(
            lambda: (
                desired_replicas(kubectl, victim) == 2 and recommended_value(kubectl, victim) == 2
            ),
            timeout=60,
            what="the victim's own queue to scale it to two replicas",
        )
