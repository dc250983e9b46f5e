"""Which watch events bring something the service reconcile reads (logic.news)."""

from __future__ import annotations

import copy
from typing import Any

from gpuyard.logic.news import deployment_read, service_read, status_read


def _service() -> dict[str, Any]:
    return {
        "apiVersion": "gpuyard.io/v1alpha1",
        "kind": "AIService",
        "metadata": {
            "name": "chat",
            "namespace": "team-a",
            "uid": "u1",
            "generation": 1,
            "resourceVersion": "10",
            "labels": {"team": "a"},
            "managedFields": [{"manager": "kubectl"}],
        },
        "spec": {"pool": "l4", "replicas": 1},
        "status": {"observedGeneration": 1, "usage": {"gpuSeconds": "0"}},
    }


def _deployment() -> dict[str, Any]:
    return {
        "metadata": {"name": "chat", "generation": 1, "resourceVersion": "20"},
        "spec": {"replicas": 1},
        "status": {
            "observedGeneration": 1,
            "replicas": 1,
            "readyReplicas": 0,
            "conditions": [{"type": "Progressing", "status": "True"}],
        },
    }


def test_bookkeeping_and_status_are_not_what_the_reconcile_reads_of_a_service() -> None:
    body = _service()
    echo = copy.deepcopy(body)
    echo["metadata"]["resourceVersion"] = "11"
    echo["metadata"]["managedFields"].append({"manager": "gpuyard"})
    echo["status"]["conditions"] = [{"type": "Ready"}]
    assert service_read(echo) == service_read(body)


def test_a_spec_label_or_generation_change_of_a_service_is_read() -> None:
    body = _service()
    for path, value in (
        (("spec", "replicas"), 2),
        (("metadata", "generation"), 2),
        (("metadata", "labels"), {"team": "b"}),
    ):
        changed = copy.deepcopy(body)
        changed[path[0]][path[1]] = value
        assert service_read(changed) != service_read(body), path


def test_the_meters_usage_is_not_read_of_the_status() -> None:
    assert status_read({"replicas": 1, "usage": {"gpuSeconds": "5"}}) == {"replicas": 1}
    assert status_read(None) == {}
    assert status_read({"replicas": 1}) != status_read({"replicas": 2})


def test_a_deployment_status_update_without_new_replica_counts_is_not_read() -> None:
    live = _deployment()
    update = copy.deepcopy(live)
    update["metadata"]["resourceVersion"] = "21"
    update["status"]["conditions"].append({"type": "Available", "status": "False"})
    update["status"]["observedGeneration"] = 2
    assert deployment_read(update) == deployment_read(live)


def test_the_api_servers_refusal_of_the_pods_is_read() -> None:
    # The ReplicaFailure condition comes in a status update of its own, replica counts
    # unchanged: skipping it would leave Ready at ReplicasNotReady instead of PodsRefused
    # (and Stalled unset) until some other event.
    live = _deployment()
    refused = copy.deepcopy(live)
    refused["status"]["conditions"].append(
        {"type": "ReplicaFailure", "status": "True", "reason": "FailedCreate", "message": "no"}
    )
    assert deployment_read(refused) != deployment_read(live)


def test_the_deployment_controllers_revision_annotation_is_not_read() -> None:
    live = _deployment()
    live["metadata"]["annotations"] = {"gpuyard.io/applied-hash": "abc"}
    rolled = copy.deepcopy(live)
    rolled["metadata"]["annotations"]["deployment.kubernetes.io/revision"] = "1"
    assert deployment_read(rolled) == deployment_read(live)
    rolled["metadata"]["annotations"]["gpuyard.io/applied-hash"] = "def"
    assert deployment_read(rolled) != deployment_read(live)


def test_new_replica_counts_spec_or_metadata_of_a_deployment_are_read() -> None:
    live = _deployment()
    for part, key, value in (
        ("status", "readyReplicas", 1),
        ("status", "updatedReplicas", 1),
        ("status", "replicas", 2),
        ("spec", "replicas", 2),
        ("metadata", "annotations", {"gpuyard.io/applied-hash": "abc"}),
    ):
        changed = copy.deepcopy(live)
        changed[part][key] = value
        assert deployment_read(changed) != deployment_read(live), (part, key)
