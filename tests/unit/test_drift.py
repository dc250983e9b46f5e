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
    foreign_template_fields,
    needs_apply,
    updated_beside_applied,
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


# --- fields other managers added to the pod template ----------------------------------------

INFERENCE = 'k:{"name":"inference"}'
#: What the API server records of gpuyard's apply of `desired_deployment()` (the pod
#: template part, abridged): the container, keyed by name; nodeSelector and tolerations,
#: both atomic.
OUR_TEMPLATE: dict[str, Any] = {
    "f:metadata": {"f:labels": {"f:gpuyard.io/service": {}, "f:gpuyard.io/pool": {}}},
    "f:spec": {
        "f:containers": {
            INFERENCE: {
                ".": {},
                "f:image": {},
                "f:name": {},
                "f:ports": {
                    'k:{"containerPort":8000,"protocol":"TCP"}': {
                        ".": {},
                        "f:containerPort": {},
                        "f:name": {},
                        "f:protocol": {},
                    }
                },
                "f:resources": {"f:limits": {"f:nvidia.com/gpu": {}}},
            }
        },
        "f:nodeSelector": {},
        "f:tolerations": {},
    },
}


def in_template(fields: dict[str, Any]) -> dict[str, Any]:
    return {"f:spec": {"f:template": fields}}


def served(desired: dict[str, Any], *others: dict[str, Any]) -> dict[str, Any]:
    """`desired` as served, with gpuyard's apply, the Deployment controller's entries and
    `others` in its managedFields."""
    live = as_served(desired)
    live["apiVersion"] = "apps/v1"
    ours = _entry("gpuyard", "Apply", {"f:spec": {"f:replicas": {}, "f:template": OUR_TEMPLATE}})
    revision = _entry(
        "kube-controller-manager",
        "Update",
        {"f:metadata": {"f:annotations": {"f:deployment.kubernetes.io/revision": {}}}},
    )
    status = _entry(
        "kube-controller-manager", "Update", {"f:status": {"f:replicas": {}}}, subresource="status"
    )
    live["metadata"]["managedFields"] = [ours, revision, status, *others]
    return live


def removed(obj: dict[str, Any], pointers: list[str]) -> dict[str, Any]:
    """`obj` after a JSON patch of `remove` operations at `pointers`, applied in order."""
    result = copy.deepcopy(obj)
    for pointer in pointers:
        *parents, last = [
            part.replace("~1", "/").replace("~0", "~") for part in pointer.split("/")[1:]
        ]
        node: Any = result
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if isinstance(node, list):
            del node[int(last)]
        else:
            del node[last]
    return result


def test_a_template_only_gpuyard_wrote_has_no_foreign_fields() -> None:
    desired = desired_deployment()
    scaled = _entry("kubectl", "Update", {"f:spec": {"f:replicas": {}}}, subresource="scale")
    foreign = foreign_template_fields(served(desired, scaled), desired, "gpuyard")
    # The defaults the API server filled in (dnsPolicy, imagePullPolicy...) are nobody's.
    assert foreign.removals == []
    assert not foreign.taken_from_us


def test_an_added_container_is_removed_whole() -> None:
    """`kubectl patch` merges the containers list by name; the sidecar comes first."""
    desired = desired_deployment()
    sidecar = {"name": "sidecar", "image": "busybox", "imagePullPolicy": "Always"}
    patched = _entry(
        "kubectl-patch",
        "Update",
        in_template(
            {
                "f:spec": {
                    "f:containers": {
                        'k:{"name":"sidecar"}': {
                            ".": {},
                            "f:image": {},
                            "f:imagePullPolicy": {},
                            "f:name": {},
                        }
                    }
                }
            }
        ),
    )
    live = served(desired, patched)
    live["spec"]["template"]["spec"]["containers"].insert(0, sidecar)

    foreign = foreign_template_fields(live, desired, "gpuyard")

    assert foreign.removals == ["/spec/template/spec/containers/0"]
    assert not foreign.taken_from_us
    assert removed(live, foreign.removals)["spec"] == as_served(desired)["spec"]


def test_a_key_added_to_a_map_goes_and_the_map_stays() -> None:
    desired = desired_deployment()
    labelled = _entry(
        "kubectl-label",
        "Update",
        in_template({"f:metadata": {"f:labels": {"f:example.com/team": {}}}}),
    )
    live = served(desired, labelled)
    live["spec"]["template"]["metadata"]["labels"]["example.com/team"] = "a"

    foreign = foreign_template_fields(live, desired, "gpuyard")

    assert foreign.removals == ["/spec/template/metadata/labels/example.com~1team"]
    assert removed(live, foreign.removals)["spec"] == as_served(desired)["spec"]


def test_a_map_someone_created_goes_whole() -> None:
    desired = desired_deployment()
    annotated = _entry(
        "kubectl-patch",
        "Update",
        in_template({"f:metadata": {"f:annotations": {".": {}, "f:note": {}}}}),
    )
    live = served(desired, annotated)
    live["spec"]["template"]["metadata"]["annotations"] = {"note": "by hand"}

    assert foreign_template_fields(live, desired, "gpuyard").removals == [
        "/spec/template/metadata/annotations"
    ]


def test_fields_added_inside_our_container_go_and_the_container_stays() -> None:
    desired = desired_deployment()
    env = {".": {}, 'k:{"name":"DEBUG"}': {".": {}, "f:name": {}, "f:value": {}}}
    edited = _entry(
        "kubectl-edit",
        "Update",
        in_template(
            {"f:spec": {"f:containers": {INFERENCE: {"f:env": env, "f:imagePullPolicy": {}}}}}
        ),
    )
    live = served(desired, edited)
    container_of(live).update(env=[{"name": "DEBUG", "value": "1"}], imagePullPolicy="Always")

    foreign = foreign_template_fields(live, desired, "gpuyard")

    # imagePullPolicy comes back as the API server's default.
    assert sorted(foreign.removals) == [
        "/spec/template/spec/containers/0/env",
        "/spec/template/spec/containers/0/imagePullPolicy",
    ]


def test_later_list_items_are_removed_first() -> None:
    desired = desired_deployment()
    container = {".": {}, "f:image": {}, "f:name": {}}
    patched = _entry(
        "kubectl-patch",
        "Update",
        in_template(
            {
                "f:spec": {
                    "f:containers": {
                        'k:{"name":"a"}': container,
                        'k:{"name":"b"}': container,
                        INFERENCE: {"f:env": {".": {}}},
                    }
                }
            }
        ),
    )
    # Two managers' fields in one list: one walk orders them all.
    volumes = _entry(
        "argocd-controller",
        "Apply",
        in_template({"f:spec": {"f:volumes": {'k:{"name":"scratch"}': {".": {}, "f:name": {}}}}}),
    )
    live = served(desired, patched, volumes)
    pod = live["spec"]["template"]["spec"]
    ours = pod["containers"][0]
    ours["env"] = []
    pod["containers"] = [{"name": "a", "image": "x"}, ours, {"name": "b", "image": "x"}]
    pod["volumes"] = [{"name": "scratch", "emptyDir": {}}]

    foreign = foreign_template_fields(live, desired, "gpuyard")

    containers = [r for r in foreign.removals if "/containers/" in r]
    assert containers == [
        "/spec/template/spec/containers/2",
        "/spec/template/spec/containers/1/env",
        "/spec/template/spec/containers/0",
    ]
    # The list was there before (no "." of theirs): its item goes, the empty list is
    # dropped when stored.
    assert "/spec/template/spec/volumes/0" in foreign.removals
    assert (
        removed(live, foreign.removals)["spec"]["template"]["spec"]["containers"]
        == (as_served(desired)["spec"]["template"]["spec"]["containers"])
    )


@pytest.mark.parametrize(
    "shared",
    [
        {"f:spec": {"f:containers": {INFERENCE: {"f:image": {}}}}},
        {"f:spec": {"f:tolerations": {}}},
        {"f:metadata": {"f:labels": {"f:gpuyard.io/service": {}}}},
    ],
    ids=["image", "tolerations", "label"],
)
def test_a_field_gpuyard_owns_as_well_is_left_to_the_apply(shared: dict[str, Any]) -> None:
    desired = desired_deployment()
    foreign = foreign_template_fields(
        served(desired, _entry("sre", "Apply", in_template(shared))), desired, "gpuyard"
    )
    assert foreign.removals == []
    assert not foreign.taken_from_us


def test_a_field_gpuyard_sets_that_another_manager_took_is_taken_back() -> None:
    """A JSON patch adding a key to the atomic nodeSelector takes the whole map from
    gpuyard, and the live map still contains gpuyard's: only the owner says so."""
    desired = desired_deployment()
    pinned = _entry("kubectl-patch", "Update", in_template({"f:spec": {"f:nodeSelector": {}}}))
    live = served(desired, pinned)
    del live["metadata"]["managedFields"][0]["fieldsV1"]["f:spec"]["f:template"]["f:spec"][
        "f:nodeSelector"
    ]
    live["spec"]["template"]["spec"]["nodeSelector"]["kubernetes.io/hostname"] = "cpu-0"

    foreign = foreign_template_fields(live, desired, "gpuyard")

    assert foreign.removals == []  # the apply replaces the map whole
    assert foreign.taken_from_us
    assert not needs_apply(desired, live)  # what the apply would not have seen


def test_the_annotation_of_kubectl_rollout_restart_stays() -> None:
    desired = desired_deployment()
    restart = _entry(
        "kubectl-rollout",
        "Update",
        in_template(
            {
                "f:metadata": {
                    "f:annotations": {
                        ".": {},
                        "f:kubectl.kubernetes.io/restartedAt": {},
                        "f:other": {},
                    }
                }
            }
        ),
    )
    live = served(desired, restart)
    live["spec"]["template"]["metadata"]["annotations"] = {
        "kubectl.kubernetes.io/restartedAt": "2026-12-03T10:00:00Z",
        "other": "x",
    }

    foreign = foreign_template_fields(live, desired, "gpuyard")

    # The map holds the kept annotation: only the other one goes.
    assert foreign.removals == ["/spec/template/metadata/annotations/other"]
    assert not foreign.taken_from_us


def test_a_list_item_is_matched_to_ours_by_the_key_fields_ours_has() -> None:
    """A desired object may leave out what the API server defaults, such as a port's
    protocol, which the key of the live item holds."""
    desired = desired_deployment()
    del container_of(desired)["ports"][0]["protocol"]
    port = 'k:{"containerPort":8000,"protocol":"TCP"}'
    other = _entry(
        "sre",
        "Apply",
        in_template({"f:spec": {"f:containers": {INFERENCE: {"f:ports": {port: {".": {}}}}}}}),
    )
    live = served(desired, other)
    container_of(live)["ports"][0]["protocol"] = "TCP"
    del live["metadata"]["managedFields"][0]["fieldsV1"]["f:spec"]["f:template"]["f:spec"][
        "f:containers"
    ][INFERENCE]["f:ports"]

    assert foreign_template_fields(live, desired, "gpuyard").removals == []


def test_entries_that_cannot_hold_the_template_and_fields_already_gone_are_skipped() -> None:
    desired = desired_deployment()
    selector = in_template({"f:spec": {"f:hostNetwork": {}}})
    old_version = _entry("old-tool", "Update", selector, apiVersion="apps/v1beta2")
    status = _entry("some-controller", "Update", selector, subresource="status")
    gone = _entry("kubectl-patch", "Update", in_template({"f:spec": {"f:priority": {}}}))
    live = served(desired, old_version, status, gone)
    live["spec"]["template"]["spec"]["hostNetwork"] = True

    foreign = foreign_template_fields(live, desired, "gpuyard")

    assert foreign.removals == []
    assert not foreign.taken_from_us


def test_the_fields_of_our_create_count_as_ours() -> None:
    desired = desired_deployment()
    live = served(desired, _entry("sre", "Apply", in_template(OUR_TEMPLATE)))
    live["metadata"]["managedFields"][0]["operation"] = "Update"
    foreign = foreign_template_fields(live, desired, "gpuyard")
    assert foreign.removals == []
    assert not foreign.taken_from_us


def test_an_update_of_ours_beside_our_apply_is_for_the_apply_to_take_over() -> None:
    applied = _entry("gpuyard", "Apply", {"f:spec": {}})
    created = _entry("gpuyard", "Update", {"f:spec": {}})
    status = _entry("gpuyard", "Update", {"f:status": {}}, subresource="status")
    others = _entry("kubectl", "Update", {"f:spec": {}})
    assert updated_beside_applied([applied, others, created], "gpuyard")
    # The fields of a create alone are gpuyard's one entry until its first apply.
    assert not updated_beside_applied([created, others], "gpuyard")
    assert not updated_beside_applied([applied, status, others], "gpuyard")
    assert not updated_beside_applied(None, "gpuyard")


def test_fields_others_add_outside_the_pod_template_are_left_alone() -> None:
    desired = desired_deployment()
    other = _entry("sre", "Update", {"f:spec": {"f:minReadySeconds": {}, "f:paused": {}}})
    live = served(desired, other)
    live["spec"].update(minReadySeconds=10, paused=False)

    foreign = foreign_template_fields(live, desired, "gpuyard")

    assert foreign.removals == []
    assert not foreign.taken_from_us


def test_set_items_are_found_by_value_and_unreadable_keys_are_skipped() -> None:
    desired = desired_deployment()
    other = _entry(
        "sre",
        "Update",
        in_template(
            {"f:metadata": {"f:finalizers": {'v:"example.com/hold"': {}, "v:not json": {}}}}
        ),
    )
    live = served(desired, other)
    live["spec"]["template"]["metadata"]["finalizers"] = ["a", "example.com/hold"]

    foreign = foreign_template_fields(live, desired, "gpuyard")

    assert foreign.removals == ["/spec/template/metadata/finalizers/1"]
