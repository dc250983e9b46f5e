"""Drift detection: a second reconcile writes nothing, a hand edit of ours is reapplied."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from sample_objects import make_pool, make_service, pool_spec, service_spec

from gpuyard.logic.children import build_deployment, owner_reference
from gpuyard.logic.drift import (
    APPLIED_HASH_ANNOTATION,
    contains,
    fields_taken_over,
    needs_apply,
    with_applied_hash,
)

POOL = make_pool(
    pool_spec(tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}])
)


def desired_deployment(replicas: int = 2, **spec: Any) -> dict[str, Any]:
    service = make_service(
        service_spec(
            gpusPerReplica=2,
            container={"port": 8000, "resources": {"cpu": "0.5", "memory": "1Gi"}},
            **spec,
        )
    )
    return with_applied_hash(build_deployment(service, POOL, replicas, owner_reference(service)))


def as_served(desired: dict[str, Any]) -> dict[str, Any]:
    """`desired` as the API server returns it after an apply: defaults filled in, other
    managers' fields and status added, quantities in canonical form."""
    live = copy.deepcopy(desired)
    live["metadata"].update(uid="d85fc4e7", resourceVersion="1104", generation=1)
    live["metadata"]["annotations"]["deployment.kubernetes.io/revision"] = "1"
    live["spec"]["progressDeadlineSeconds"] = 600
    pod = live["spec"]["template"]["spec"]
    pod.update(
        dnsPolicy="ClusterFirst",
        restartPolicy="Always",
        schedulerName="default-scheduler",
        terminationGracePeriodSeconds=30,
    )
    [container] = pod["containers"]
    container.update(imagePullPolicy="IfNotPresent", terminationMessagePath="/dev/termination-log")
    for amounts in container["resources"].values():
        amounts["cpu"] = "500m"
        amounts["memory"] = "1073741824"
    live["status"] = {"replicas": 2, "readyReplicas": 2, "observedGeneration": 1}
    return live


def container_of(deployment: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = deployment["spec"]["template"]["spec"]["containers"][0]
    return result


def test_nothing_exists_yet() -> None:
    assert needs_apply(desired_deployment(), None)


def test_what_the_server_returns_is_no_drift() -> None:
    desired = desired_deployment()

    assert not needs_apply(desired, as_served(desired))


def test_the_hash_covers_the_whole_object_and_nothing_else() -> None:
    first, second = desired_deployment(), desired_deployment()
    hashes = {
        d["metadata"]["annotations"][APPLIED_HASH_ANNOTATION]
        for d in (first, second, desired_deployment(replicas=3))
    }

    assert first == second
    assert len(hashes) == 2
    assert len(first["metadata"]["annotations"][APPLIED_HASH_ANNOTATION]) == 16


def test_a_changed_desired_object_is_applied() -> None:
    live = as_served(desired_deployment(replicas=2))

    assert needs_apply(desired_deployment(replicas=3), live)


def test_a_field_we_stop_setting_changes_the_hash() -> None:
    # The live object still holds everything the new desired object holds; only the hash
    # tells that the port must go (server-side apply then removes it).
    service = make_service(service_spec(gpusPerReplica=2))
    without_port = with_applied_hash(build_deployment(service, POOL, 2, owner_reference(service)))
    live = as_served(desired_deployment())

    assert contains(live, without_port | {"metadata": live["metadata"]})
    assert needs_apply(without_port, live)


def test_a_lost_hash_annotation_is_applied() -> None:
    desired = desired_deployment()
    live = as_served(desired)
    del live["metadata"]["annotations"][APPLIED_HASH_ANNOTATION]

    assert needs_apply(desired, live)


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(lambda d: container_of(d).update(image="evil/miner:latest"), id="image"),
        pytest.param(
            lambda d: container_of(d)["resources"]["limits"].update({"nvidia.com/gpu": "8"}),
            id="gpu-limit",
        ),
        pytest.param(
            lambda d: d["spec"]["template"]["spec"]["nodeSelector"].update(
                {"gpuyard.io/pool": "l4"}
            ),
            id="node-selector-value",
        ),
        pytest.param(
            lambda d: d["spec"]["template"]["spec"].pop("nodeSelector"),
            id="node-selector-removed",
        ),
        pytest.param(lambda d: d["spec"].update(replicas=7), id="replicas"),
        pytest.param(
            lambda d: d["spec"]["template"]["spec"]["tolerations"].append(
                {"key": "x", "operator": "Exists"}
            ),
            id="list-grew",
        ),
        pytest.param(lambda d: container_of(d).pop("ports"), id="list-removed"),
        pytest.param(
            lambda d: container_of(d)["securityContext"]["capabilities"].update(drop=[]),
            id="list-emptied",
        ),
        pytest.param(
            lambda d: d["spec"]["template"]["spec"].update(automountServiceAccountToken=True),
            id="false-flipped",
        ),
        pytest.param(
            lambda d: container_of(d)["resources"]["limits"].update(memory="1G"),
            id="decimal-vs-binary-suffix",
        ),
    ],
)
def test_a_hand_edit_is_drift(edit: Any) -> None:
    desired = desired_deployment()
    live = as_served(desired)
    edit(live)

    assert needs_apply(desired, live)


def test_a_list_of_different_length_is_drift() -> None:
    assert not contains([1, 2], [1, 2, 3])
    assert not contains([1, 2, 3], [1, 2])
    assert contains([{"a": 1, "b": 2}], [{"a": 1}])


def test_extra_live_fields_are_no_drift() -> None:
    desired = {"spec": {"a": 1, "nested": {"b": "x"}}, "list": [{"name": "c"}]}
    live = {
        "spec": {"a": 1, "extra": True, "nested": {"b": "x", "defaulted": 30}},
        "list": [{"name": "c", "protocol": "TCP"}],
        "status": {"replicas": 3},
    }

    assert contains(live, desired)


@pytest.mark.parametrize("empty", [0, "", False, None, [], {}])
def test_omitempty_zero_values_absent_from_live_are_no_drift(empty: Any) -> None:
    assert contains({"other": 1}, {"other": 1, "field": empty})


def test_a_non_empty_value_absent_from_live_is_drift() -> None:
    assert not contains({}, {"field": 1})
    assert not contains({}, {"field": [0]})
    assert not contains({}, {"field": {"key": ""}})


@pytest.mark.parametrize(
    ("desired", "live"),
    [
        ("0.5", "500m"),
        ("1Gi", "1073741824"),
        ("1024Mi", "1Gi"),
        ("1k", "1000"),
        ("2", "2"),
        ("8", 8),
        ("1.5Gi", "1536Mi"),
    ],
)
def test_equal_quantities_in_another_form_are_no_drift(desired: str, live: Any) -> None:
    assert contains({"q": live}, {"q": desired})


@pytest.mark.parametrize(
    ("desired", "live"),
    [
        ("0.5", "5"),
        ("1Gi", "1G"),
        ("1", "1m"),
        ("vllm/vllm-openai:v0.6.3", "vllm/vllm-openai:v0.6.4"),
        ("Always", "IfNotPresent"),
    ],
)
def test_different_values_are_drift(desired: str, live: str) -> None:
    assert not contains({"q": live}, {"q": desired})


def test_type_mismatches_are_drift() -> None:
    assert not contains({"a": "text"}, {"a": {"b": 1}})
    assert not contains({"a": {"b": 1}}, {"a": [1]})
    assert not contains({"a": True}, {"a": "true"})
    assert not contains({"a": None}, {"a": {"b": 1}})


def _entry(manager: str, operation: str, fields: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "manager": manager,
        "operation": operation,
        "apiVersion": "apps/v1",
        "time": "2026-12-02T10:00:00Z",
        "fieldsType": "FieldsV1",
        "fieldsV1": fields,
        **extra,
    }


def test_the_fields_of_our_create_become_our_apply_entry() -> None:
    created = _entry("gpuyard", "Update", {"f:spec": {"f:replicas": {}, "f:template": {}}})
    controller = _entry(
        "kube-controller-manager", "Update", {"f:status": {"f:replicas": {}}}, subresource="status"
    )
    taken = fields_taken_over([created, controller], "gpuyard")
    assert taken == [
        {**created, "operation": "Apply"},
        controller,
    ]


def test_an_existing_apply_entry_absorbs_our_update_fields() -> None:
    applied = _entry("gpuyard", "Apply", {"f:spec": {"f:replicas": {}}})
    updated = _entry("gpuyard", "Update", {"f:spec": {"f:paused": {}}, "f:metadata": {}})
    taken = fields_taken_over([applied, _entry("kubectl", "Update", {}), updated], "gpuyard")
    assert taken is not None
    ours = [entry for entry in taken if entry["manager"] == "gpuyard"]
    assert len(ours) == 1
    assert ours[0]["operation"] == "Apply"
    assert ours[0]["fieldsV1"] == {"f:spec": {"f:replicas": {}, "f:paused": {}}, "f:metadata": {}}
    assert [entry["manager"] for entry in taken] == ["gpuyard", "kubectl"]


def test_nothing_to_take_over_without_an_update_entry_of_ours() -> None:
    assert fields_taken_over(None, "gpuyard") is None
    assert fields_taken_over([_entry("gpuyard", "Apply", {})], "gpuyard") is None
    status = _entry("gpuyard", "Update", {"f:status": {}}, subresource="status")
    assert fields_taken_over([status, _entry("kubectl", "Update", {})], "gpuyard") is None
