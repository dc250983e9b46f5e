"""Only the DCGM exporter's own series speak for a pod (issue 15, docs/autoscaling.md).

A rogue exporter in a tenant's namespace, a second scrape target of the local Prometheus,
publishes DCGM_FI_DEV_GPU_UTIL at 100 % for another tenant's pod, in both spellings: with
the victim's plain ``namespace``/``pod`` labels (honoured, as a ServiceMonitor with
honorLabels keeps them) and as ``exported_namespace``/``exported_pod`` beside its own
target labels. The operator under test trusts only the simulator's job
(``GPUYARD_GPU_EXPORTER_MATCHERS``, tests/integration/conftest.py), so neither the victim's
replicas nor the utilisation in its usage records move, while the simulator's series still
drive both.
"""

from __future__ import annotations

import json
import time
import urllib.parse
from collections.abc import Iterator
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path
from typing import Any

import pytest

from conftest import Loads, OperatorProcess
from gpuyard.io.ledger import read_ledger
from gpuyard.logic.metering import UsageRecord
from gpuyard.logic.promql import gpu_utilization_query, parse_vector_response
from localcluster.cluster import DCGM_EXPORTER_JOB, ClusterState
from localcluster.jsonhttp import http_json
from metering_support import Rig, open_rig
from scrape_support import ScrapeTarget, sample_line
from support import Kubectl, wait_until

IMAGE = "registry.example/llm:1"
SERVICE = "chat"
TARGET_PERCENT = 50
#: One GPU at 40 % (under the 50 % target): one replica, as long as only the simulator counts.
REAL_LOAD = 40
FORGED_PERCENT = 100
#: The conftest operator's GPUYARD_METRICS_WINDOW_SECONDS and GPUYARD_AUTOSCALE_INTERVAL.
METRICS_WINDOW_SECONDS = 5
AUTOSCALE_INTERVAL = 1


def rogue_exporter(cluster: ClusterState, tenant_namespace: str) -> ScrapeTarget:
    """A target in a tenant's namespace of the local Prometheus's ``local`` job (file-based
    discovery, ``targets/*.json``)."""
    return ScrapeTarget(
        Path(cluster.prometheus_targets_dir) / f"rogue-{tenant_namespace}.json",
        {"namespace": tenant_namespace, "pod": "rogue-exporter"},
    )


def forge(rogue: ScrapeTarget, namespace: str, pod: str) -> None:
    """Claim ``namespace/pod``'s GPU is 100 % busy, in both label spellings."""
    plain = {"gpu": "0", "UUID": "GPU-rogue-0", "namespace": namespace, "pod": pod}
    exported = {
        "gpu": "1",
        "UUID": "GPU-rogue-1",
        "exported_namespace": namespace,
        "exported_pod": pod,
    }
    rogue.exposition = "\n".join(
        [
            "# TYPE DCGM_FI_DEV_GPU_UTIL gauge",
            sample_line("DCGM_FI_DEV_GPU_UTIL", plain, FORGED_PERCENT),
            sample_line("DCGM_FI_DEV_GPU_UTIL", exported, FORGED_PERCENT),
            "",
        ]
    )


@pytest.fixture
def rig(cluster: ClusterState, operator: OperatorProcess, tmp_path: Path) -> Iterator[Rig]:
    with open_rig(cluster, operator, tmp_path) as found:
        yield found


def autoscaled_service() -> dict[str, Any]:
    return {
        "apiVersion": "gpuyard.io/v1alpha1",
        "kind": "AIService",
        "metadata": {"name": SERVICE},
        "spec": {
            "pool": "a100",
            "gpusPerReplica": 1,
            "container": {"image": IMAGE},
            "minReplicas": 1,
            "maxReplicas": 3,
            "autoscaling": {
                "metrics": [{"type": "GPUUtilization", "targetPercent": TARGET_PERCENT}],
                "scaleDown": {"stabilizationWindowSeconds": 0},
            },
        },
    }


def running_pods(kubectl: Kubectl, namespace: str) -> list[str]:
    pods = kubectl.json("get", "pods", "-n", namespace, "-l", f"gpuyard.io/service={SERVICE}")
    return sorted(
        pod["metadata"]["name"]
        for pod in pods["items"]
        if pod["status"].get("phase") == "Running" and not pod["metadata"].get("deletionTimestamp")
    )


def desired_replicas(kubectl: Kubectl, namespace: str) -> int:
    deployment = kubectl.json("get", "deployment", "-n", namespace, SERVICE)
    count: int = deployment["spec"]["replicas"]
    return count


def recommended_value(kubectl: Kubectl, namespace: str) -> Decimal | None:
    """The GPU utilisation the autoscaler last decided on, as its status shows it."""
    status = kubectl.json("get", "ais", "-n", namespace, SERVICE).get("status") or {}
    value = (status.get("recommendation") or {}).get("currentValue")
    return Decimal(value) if value is not None else None


def prometheus_query(cluster: ClusterState, query: str) -> Any:
    url = f"{cluster.prometheus_url}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    return http_json("GET", url)


def autoscaler_ticks(operator: OperatorProcess) -> float:
    for line in operator.metrics().splitlines():
        if line.startswith("gpuyard_autoscaler_tick_duration_seconds_count "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def measured_records(ledger: Path, namespace: str, pod: str, since: float) -> list[UsageRecord]:
    """The pod's usage records of windows that start at or after ``since`` and carry a
    utilisation reading, oldest first."""
    if not ledger.exists():
        return []
    records = [
        record
        for record in read_ledger(ledger).records
        if record.namespace == namespace
        and record.pod == pod
        and record.start.timestamp() >= since
        and record.avg_utilization is not None
    ]
    return sorted(records, key=lambda record: record.start)


@pytest.mark.slow
def test_a_rogue_exporter_moves_neither_replicas_nor_usage_of_another_tenant(
    kubectl: Kubectl, namespace: str, cluster: ClusterState, rig: Rig, load: Loads
) -> None:
    load.set(namespace, SERVICE, REAL_LOAD)
    with rig.operator(window_seconds=2) as operator:
        kubectl.apply(json.dumps(autoscaled_service()), namespace)
        [pod] = wait_until(
            lambda: running_pods(kubectl, namespace), timeout=90, what="the service's pod"
        )
        wait_until(
            lambda: recommended_value(kubectl, namespace) == REAL_LOAD,
            what=f"the autoscaler to read {REAL_LOAD} %",
        )

        with rogue_exporter(cluster, tenant_namespace=f"{namespace}-tenant") as rogue:
            forge(rogue, namespace, pod)

            # Both forgeries are in Prometheus, and read by plain labels from every job (as
            # a query that does not know the exporter would), the victim's pod looks busier.
            def forged_series() -> list[dict[str, str]]:
                query = f'DCGM_FI_DEV_GPU_UTIL{{job!="{DCGM_EXPORTER_JOB}"}}'
                result = prometheus_query(cluster, query)["data"]["result"]
                return [item["metric"] for item in result if item["value"][1] == "100"]

            found = wait_until(
                lambda: len(forged_series()) == 2 and forged_series(),
                what="Prometheus to scrape the rogue exporter",
            )
            assert {(m.get("namespace"), m.get("pod")) for m in found} == {
                (namespace, pod),
                (f"{namespace}-tenant", "rogue-exporter"),
            }
            unprotected = gpu_utilization_query(window_seconds=METRICS_WINDOW_SECONDS)
            wait_until(
                lambda: (
                    abs(
                        parse_vector_response(prometheus_query(cluster, unprotected)).get(
                            (namespace, pod), 0.0
                        )
                        - (REAL_LOAD + FORGED_PERCENT) / 2
                    )
                    < 0.01
                ),
                what="the forged samples to fill a whole metrics window",
            )
            forged_from = time.time()

            # Two metrics windows of ticks with the forgery in place: the victim stays at
            # one replica, sized by the simulator's 40 % alone.
            ticks = autoscaler_ticks(operator)
            enough = 2 * METRICS_WINDOW_SECONDS / AUTOSCALE_INTERVAL

            def unmoved_for_enough_ticks() -> bool:
                assert desired_replicas(kubectl, namespace) == 1
                assert recommended_value(kubectl, namespace) == REAL_LOAD
                return autoscaler_ticks(operator) >= ticks + enough

            wait_until(unmoved_for_enough_ticks, what=f"{enough:.0f} autoscaler ticks")

            # The meter reads the same series: each window of the pod shows the real 40 %.
            records = wait_until(
                lambda: (
                    measured
                    if len(measured := measured_records(rig.ledger, namespace, pod, forged_from))
                    >= 3
                    else None
                ),
                what="three measured usage windows with the forgery in place",
            )
            assert {record.avg_utilization for record in records} == {Decimal(REAL_LOAD)}
            for record in records:  # the busy share rounded half-even, as the meter does
                busy = (Decimal(record.gpu_seconds) * REAL_LOAD / 100).to_integral_value(
                    ROUND_HALF_EVEN
                )
                assert record.idle_gpu_seconds == record.gpu_seconds - busy, record

            # The simulator's series still drive the service: load 150 is one GPU at 100 %,
            # then two at 75 %, then three at 50 % (maxReplicas).
            raised = time.time()
            load.set(namespace, SERVICE, 150)
            wait_until(
                lambda: (
                    desired_replicas(kubectl, namespace) == 3
                    and len(running_pods(kubectl, namespace)) == 3
                ),
                timeout=90,
                what="three replicas for the real load",
            )
            busier = wait_until(
                lambda: [
                    record
                    for record in measured_records(rig.ledger, namespace, pod, raised)
                    if record.avg_utilization is not None
                    and record.avg_utilization >= TARGET_PERCENT
                ],
                what="a usage window of the pod at the real, higher utilisation",
            )
            assert all(
                record.avg_utilization is not None and record.avg_utilization <= 100
                for record in busier
            )
