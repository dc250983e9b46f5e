"""The local cluster is real: versions, GPU nodes, scheduling, garbage collection, metrics."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from gpuyard.api.names import POOL_LABEL
from localcluster.cluster import REPO_ROOT, ClusterState, LocalCluster, cache_dir, process_alive
from localcluster.jsonhttp import http_json
from localcluster.topology import DEFAULT_TOPOLOGY, GPU_RESOURCE, parse_topology
from support import Kubectl, prometheus_query, wait_until


def pinned(name: str) -> str:
    text = (REPO_ROOT / "hack" / "versions.env").read_text()
    match = re.search(rf"^{name}=(\S+)$", text, re.MULTILINE)
    assert match, f"{name} missing from hack/versions.env"
    return match.group(1)


def gpu_deployment(name: str, pool: str, gpus: int, replicas: int) -> str:
    return json.dumps(
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": name},
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": {"app": name}},
                "template": {
                    "metadata": {"labels": {"app": name}},
                    "spec": {
                        "nodeSelector": {POOL_LABEL: pool},
                        "tolerations": [{"key": GPU_RESOURCE, "operator": "Exists"}],
                        "containers": [
                            {
                                "name": "model",
                                "image": "registry.example/llm:1",
                                "resources": {"limits": {GPU_RESOURCE: str(gpus)}},
                            }
                        ],
                    },
                },
            },
        }
    )


def pods(kubectl: Kubectl, namespace: str, selector: str) -> list[Any]:
    items: list[Any] = kubectl.json("get", "pods", "-n", namespace, "-l", selector)["items"]
    return items


def test_server_reports_the_pinned_version(kubectl: Kubectl) -> None:
    version = kubectl.json("version")
    assert version["serverVersion"]["gitVersion"] == pinned("K8S_VERSION")


def test_gpu_nodes_advertise_their_gpus(kubectl: Kubectl, cluster: ClusterState) -> None:
    nodes = kubectl.json("get", "nodes")["items"]
    by_pool: dict[str, list[int]] = {}
    for node in nodes:
        pool = node["metadata"]["labels"].get(POOL_LABEL)
        if pool:
            by_pool.setdefault(pool, []).append(int(node["status"]["allocatable"][GPU_RESOURCE]))
    expected = {p.pool: [p.gpus_per_node] * p.nodes for p in parse_topology(cluster.topology)}
    assert by_pool == expected
    table = kubectl(
        "get",
        "nodes",
        "-o",
        "custom-columns=NAME:.metadata.name,GPU:.status.capacity.nvidia\\.com/gpu",
    )
    assert "gpu-a100-0" in table
    assert " 8" in table


def test_gpu_pods_are_scheduled_and_excess_stays_pending(kubectl: Kubectl, namespace: str) -> None:
    l4 = next(p for p in parse_topology(DEFAULT_TOPOLOGY) if p.pool == "l4")
    # One whole node per pod, one pod more than there are nodes.
    kubectl.apply(gpu_deployment("fill", "l4", l4.gpus_per_node, l4.nodes + 1), namespace)

    def settled() -> tuple[list[Any], list[Any]] | None:
        items = pods(kubectl, namespace, "app=fill")
        running = [p for p in items if p["status"].get("phase") == "Running"]
        pending = [p for p in items if p["status"].get("phase") == "Pending"]
        if len(running) == l4.nodes and len(pending) == 1:
            return running, pending
        return None

    running, pending = wait_until(settled, timeout=90, what="pool l4 to fill up")
    assert {p["spec"]["nodeName"] for p in running} == set(l4.node_names())
    for pod in running:
        assert pod["spec"]["containers"][0]["resources"]["limits"][GPU_RESOURCE] == str(
            l4.gpus_per_node
        )
    condition = wait_until(
        lambda: next(
            (
                c
                for c in _conditions_of(kubectl, namespace, pending[0])
                if c["type"] == "PodScheduled"
            ),
            None,
        ),
        what="the scheduler's verdict on the excess pod",
    )
    assert condition["status"] == "False"
    assert condition["reason"] == "Unschedulable"
    assert f"Insufficient {GPU_RESOURCE}" in condition["message"]


def _conditions_of(kubectl: Kubectl, namespace: str, pod: Any) -> list[Any]:
    current = kubectl.json("get", "pod", "-n", namespace, pod["metadata"]["name"])
    conditions: list[Any] = current["status"].get("conditions", [])
    return conditions


def test_deleting_a_deployment_collects_its_replicasets_and_pods(
    kubectl: Kubectl, namespace: str
) -> None:
    kubectl.apply(gpu_deployment("short-lived", "a100", 1, 2), namespace)
    wait_until(
        lambda: (
            len(
                [
                    p
                    for p in pods(kubectl, namespace, "app=short-lived")
                    if p["status"].get("phase") == "Running"
                ]
            )
            == 2
        ),
        what="two running pods",
    )
    assert kubectl.json("get", "replicasets", "-n", namespace)["items"], "no ReplicaSet was made"
    kubectl("delete", "deployment", "short-lived", "-n", namespace, "--wait=false")
    wait_until(
        lambda: (
            not kubectl.json("get", "replicasets", "-n", namespace)["items"]
            and not pods(kubectl, namespace, "app=short-lived")
        ),
        what="garbage collection of the ReplicaSet and its pods",
    )


def test_dcgm_series_follow_the_load_and_go_stale(
    kubectl: Kubectl, namespace: str, cluster: ClusterState
) -> None:
    kubectl.apply(gpu_deployment("llm", "a100", 2, 1), namespace)
    pod = wait_until(
        lambda: next(
            (
                p
                for p in pods(kubectl, namespace, "app=llm")
                if p["status"].get("phase") == "Running"
            ),
            None,
        ),
        what="a running GPU pod",
    )
    pod_name = pod["metadata"]["name"]
    query = f'DCGM_FI_DEV_GPU_UTIL{{namespace="{namespace}",pod="{pod_name}"}}'

    def utilisation(expected: float) -> list[Any] | None:
        series = prometheus_query(cluster.prometheus_url, query)
        values = [float(s["value"][1]) for s in series]
        return series if len(series) == 2 and all(v == expected for v in values) else None

    # Load is in GPU-percent of demand: 150 spread over the pod's 2 GPUs is 75 % each.
    http_json("PUT", f"{cluster.dcgm_sim_url}/load/{namespace}/llm", {"load": 150})
    series = wait_until(lambda: utilisation(75.0), timeout=60, what="75 % on both GPUs")
    labels = series[0]["metric"]
    for label in (
        "gpu",
        "UUID",
        "device",
        "modelName",
        "Hostname",
        "pod",
        "namespace",
        "container",
    ):
        assert label in labels, f"label {label} missing from {labels}"
    assert labels["Hostname"] == pod["spec"]["nodeName"]

    http_json("PUT", f"{cluster.dcgm_sim_url}/load/{namespace}/llm", {"load": 40})
    wait_until(lambda: utilisation(20.0), timeout=60, what="20 % on both GPUs")

    kubectl("delete", "deployment", "llm", "-n", namespace)
    wait_until(
        lambda: prometheus_query(cluster.prometheus_url, query) == [],
        timeout=60,
        what="the series to go stale once the pod is gone",
    )


@pytest.mark.slow
def test_cluster_down_leaves_no_process_and_no_directory(tmp_path: Path) -> None:
    state_dir = cache_dir() / "clusters" / f"down-test-{tmp_path.name}"
    cluster = LocalCluster(state_dir, name="down-test")
    try:
        state = cluster.up(topology="tiny=1x1:l4")
        started = dict(state.pids)
        assert set(started) == {
            "etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok",
            "dcgm-sim", "prometheus",
        }  # fmt: skip
        assert all(process_alive(pid) for pid in started.values())
    finally:
        stopped = cluster.down()
    assert sorted(stopped) == sorted(started.values())
    still_running = {name: pid for name, pid in started.items() if process_alive(pid)}
    assert still_running == {}
    assert not state_dir.exists()
