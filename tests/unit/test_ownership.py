"""The ownership chain that bills a pod to an AIService: Pod -> ReplicaSet -> Deployment ->
AIService, controller references only, each UID-checked."""

from __future__ import annotations

from typing import Any

import pytest

from gpuyard.logic.ownership import OwnerNotKnownError, controller_ref, owning_service


def ref(kind: str, name: str, uid: str, *, api: str = "apps/v1", controller: bool = True) -> Any:
    return {"apiVersion": api, "kind": kind, "name": name, "uid": uid, "controller": controller}


OBJECTS: dict[tuple[str, str], dict[str, Any]] = {
    ("ReplicaSet", "llm-7d9f"): {
        "name": "llm-7d9f",
        "uid": "rs-1",
        "ownerReferences": [ref("Deployment", "llm", "dep-1")],
    },
    ("Deployment", "llm"): {
        "name": "llm",
        "uid": "dep-1",
        "ownerReferences": [ref("AIService", "llm", "ais-1", api="gpuyard.io/v1alpha1")],
    },
    ("AIService", "llm"): {"name": "llm", "uid": "ais-1"},
    ("ReplicaSet", "own-rs"): {
        "name": "own-rs",
        "uid": "rs-2",
        "ownerReferences": [ref("Deployment", "tenant-app", "dep-2")],
    },
    ("Deployment", "tenant-app"): {"name": "tenant-app", "uid": "dep-2"},
}


def lookup(kind: str, name: str) -> dict[str, Any] | None:
    return OBJECTS.get((kind, name))


def pod(*owners: Any) -> dict[str, Any]:
    return {"name": "p", "uid": "pod-1", "ownerReferences": list(owners)}


def test_a_replica_of_an_aiservice_is_billed_to_it() -> None:
    assert owning_service(pod(ref("ReplicaSet", "llm-7d9f", "rs-1")), lookup) == "llm"


@pytest.mark.parametrize(
    "metadata",
    [
        pod(),  # a bare pod
        pod(ref("ReplicaSet", "llm-7d9f", "rs-1", controller=False)),  # not its controller
        pod(ref("ReplicaSet", "own-rs", "rs-2")),  # a tenant's own Deployment
        pod(ref("StatefulSet", "llm-7d9f", "rs-1")),  # another kind
        pod(ref("ReplicaSet", "llm-7d9f", "rs-1", api="other.io/v1")),  # another group
    ],
    ids=["bare", "not-controller", "tenant-deployment", "kind", "group"],
)
def test_a_pod_whose_chain_breaks_belongs_to_no_service(metadata: dict[str, Any]) -> None:
    assert owning_service(metadata, lookup) is None


@pytest.mark.parametrize(
    "owner",
    [ref("ReplicaSet", "llm-new", "rs-9"), ref("ReplicaSet", "llm-7d9f", "rs-old")],
    ids=["not-yet-cached", "gone-namesake-recreated"],
)
def test_an_owner_the_caches_do_not_hold_is_not_the_same_as_none(owner: Any) -> None:
    with pytest.raises(OwnerNotKnownError, match=f"ReplicaSet {owner['name']}"):
        owning_service(pod(owner), lookup)


def test_labels_play_no_part() -> None:
    labelled = {**pod(), "labels": {"gpuyard.io/service": "llm", "gpuyard.io/pool": "a100"}}
    assert owning_service(labelled, lookup) is None


def test_controller_ref_reads_the_controller_only() -> None:
    metadata = pod(ref("ReplicaSet", "a", "1", controller=False), ref("ReplicaSet", "b", "2"))
    found = controller_ref(metadata)
    assert found is not None
    assert (found.kind, found.name, found.uid, found.group) == ("ReplicaSet", "b", "2", "apps")
    assert controller_ref({}) is None
