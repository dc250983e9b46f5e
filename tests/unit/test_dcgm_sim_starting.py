"""The DCGM simulator and kwok stages with a start-up delay: a starting pod holds its GPUs
but serves none of its service's load."""

from __future__ import annotations

from typing import Any

import yaml

from localcluster.cluster import STAGES_FILE
from localcluster.dcgm_sim import RenderOptions, is_serving, render_cluster


def gpu_node(name: str) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": {"type": "kwok", "gpuyard.io/gpu-type": "l4"}},
    }


def gpu_pod(name: str, ready: str | None) -> dict[str, Any]:
    status: dict[str, Any] = {"phase": "Running"}
    if ready is not None:
        status["conditions"] = [{"type": "Ready", "status": ready}]
    return {
        "metadata": {"name": name, "namespace": "team", "uid": name,
                     "labels": {"gpuyard.io/service": "chat"}},
        "spec": {"nodeName": "gpu-1", "containers": [
            {"name": "main", "resources": {"limits": {"nvidia.com/gpu": "1"}}}]},
        "status": status,
    }  # fmt: skip


def utilisation(text: str) -> dict[str, float]:
    found = {}
    for line in text.splitlines():
        if line.startswith("DCGM_FI_DEV_GPU_UTIL{"):
            pod = line.split('pod="', 1)[1].split('"', 1)[0]
            found[pod] = float(line.rsplit(" ", 1)[1])
    return found


def test_load_spreads_over_serving_pods_and_a_starting_pod_shows_none() -> None:
    pods = [gpu_pod("ready-1", "True"), gpu_pod("ready-2", "True"), gpu_pod("starting", "False")]
    text, _ = render_cluster(pods, [gpu_node("gpu-1")], {("team", "chat"): 150}, {},
                             options=RenderOptions())  # fmt: skip
    assert utilisation(text) == {"ready-1": 75.0, "ready-2": 75.0, "starting": 0.0}


def test_a_pod_without_a_ready_condition_serves() -> None:
    assert is_serving(gpu_pod("p", None))
    assert is_serving(gpu_pod("p", "True"))
    assert not is_serving(gpu_pod("p", "False"))


def test_the_stages_read_the_delay_from_the_annotation_or_the_environment() -> None:
    stages = {s["metadata"]["name"]: s for s in yaml.safe_load_all(STAGES_FILE.read_text())}
    delay = stages["gpuyard-pod-ready-after-delay"]["spec"]["delay"]["durationFrom"]["jq"]
    assert 'annotations["sim.localcluster.test/ready-after"]' in delay["expression"]
    assert '"SIM_READY_AFTER"' in delay["expression"]
    # Exactly one of the two ways from Pending applies to a pod: at once, or starting.
    running = stages["gpuyard-pod-running"]["spec"]["selector"]["matchExpressions"]
    starting = stages["gpuyard-pod-starting"]["spec"]["selector"]["matchExpressions"]
    assert {"key": delay["expression"], "operator": "DoesNotExist"} in running
    assert {"key": delay["expression"], "operator": "Exists"} in starting
