"""What `gpuyard release-finalizers` decides, without a cluster: which objects it waits for,
the guarded patch that strips only gpuyard's finalizer, the Deployment's selector, and the
command's arguments and report lines."""

from __future__ import annotations

from typing import Any

import jsonpatch  # RFC 6902, as the API server applies a JSON patch
import pytest

from gpuyard.cli import build_parser
from gpuyard.logic.finalizer_release import (
    BillingWait,
    ReleaseTally,
    awaits_billing,
    belongs_to_deployment,
    holds_metering_finalizer,
    is_running,
    label_selector,
    object_key,
    parse_deployment_ref,
    release_patch,
)

METERING = "gpuyard.io/metering"


def pod(
    finalizers: list[str] | None = None,
    phase: str = "Running",
    deleting: bool = False,
    namespace: str | None = "team-a",
) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": "llm-0", "uid": "u-1"}
    if namespace:
        metadata["namespace"] = namespace
    if finalizers is not None:
        metadata["finalizers"] = finalizers
    if deleting:
        metadata["deletionTimestamp"] = "2025-01-01T00:00:00Z"
    return {"metadata": metadata, "status": {"phase": phase}}


@pytest.mark.parametrize(
    ("finalizers", "held"),
    [
        (None, False),
        ([], False),
        (["example.com/keep"], False),
        ([METERING], True),
        (["example.com/keep", METERING], True),
    ],
)
def test_holds_metering_finalizer(finalizers: list[str] | None, held: bool) -> None:
    assert holds_metering_finalizer(pod(finalizers)) is held


@pytest.mark.parametrize(
    ("obj", "awaited"),
    [
        (pod([METERING], phase="Running"), False),  # its window is still open
        (pod([METERING], phase="Pending"), False),
        (pod([METERING], phase="Running", deleting=True), True),
        (pod([METERING], phase="Succeeded"), True),
        (pod([METERING], phase="Failed"), True),
        (pod(["example.com/keep"], phase="Succeeded"), False),  # not gpuyard's to bill
        (pod(None, deleting=True), False),
        # A GPUPool has no phase: only a pool being deleted waits for its pods' bills.
        ({"metadata": {"name": "a100", "finalizers": [METERING]}}, False),
        (
            {"metadata": {"name": "a100", "finalizers": [METERING], "deletionTimestamp": "x"}},
            True,
        ),
    ],
)
def test_awaits_billing_only_what_has_ended_and_is_held(obj: dict[str, Any], awaited: bool) -> None:
    assert awaits_billing(obj) is awaited


def test_release_patch_removes_only_the_metering_finalizer_of_that_very_object() -> None:
    metadata = {"uid": "u-1", "finalizers": ["a.example/one", METERING, "b.example/two"]}

    assert release_patch(metadata) == [
        {"op": "test", "path": "/metadata/uid", "value": "u-1"},
        {
            "op": "test",
            "path": "/metadata/finalizers",
            "value": ["a.example/one", METERING, "b.example/two"],
        },
        {
            "op": "replace",
            "path": "/metadata/finalizers",
            "value": ["a.example/one", "b.example/two"],
        },
    ]


def test_release_patch_applies_to_the_object_seen_and_is_refused_once_it_changed() -> None:
    seen = {"metadata": {"uid": "u-1", "finalizers": [METERING, "example.com/keep"]}}
    patch = release_patch(seen["metadata"])

    assert jsonpatch.apply_patch(seen, patch)["metadata"]["finalizers"] == ["example.com/keep"]
    # Someone added a finalizer after we looked: the test op fails, nothing is lost.
    changed = {"metadata": {"uid": "u-1", "finalizers": [METERING, "example.com/keep", "new/x"]}}
    with pytest.raises(jsonpatch.JsonPatchTestFailed):
        jsonpatch.apply_patch(changed, patch)
    # Another object under the same name (deleted and created again) is not touched.
    recreated = {"metadata": {"uid": "u-2", "finalizers": [METERING, "example.com/keep"]}}
    with pytest.raises(jsonpatch.JsonPatchTestFailed):
        jsonpatch.apply_patch(recreated, patch)


def test_label_selector_of_a_deployment() -> None:
    selector = {
        "matchLabels": {"app.kubernetes.io/name": "gpuyard", "app.kubernetes.io/instance": "gy"}
    }

    assert (
        label_selector(selector) == "app.kubernetes.io/instance=gy,app.kubernetes.io/name=gpuyard"
    )


@pytest.mark.parametrize(
    ("selector", "message"),
    [
        ({}, "no matchLabels"),
        ({"matchLabels": {}}, "no matchLabels"),
        (
            {"matchLabels": {"a": "b"}, "matchExpressions": [{"key": "x", "operator": "Exists"}]},
            "matchExpressions is not supported",
        ),
    ],
)
def test_label_selector_refuses_what_it_cannot_express(
    selector: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        label_selector(selector)


def owned_pod(owner_kind: str, owner_name: str, template_hash: str | None) -> dict[str, Any]:
    labels = {"app.kubernetes.io/name": "gpuyard", "app.kubernetes.io/instance": "gy"}
    if template_hash:
        labels["pod-template-hash"] = template_hash
    owner = {"kind": owner_kind, "name": owner_name, "controller": True, "uid": "o-1"}
    return {"metadata": {"name": "p", "labels": labels, "ownerReferences": [owner]}}


@pytest.mark.parametrize(
    ("pod_", "belongs"),
    [
        (owned_pod("ReplicaSet", "gy-gpuyard-5d8f7", "5d8f7"), True),
        # The release's other pods share its labels: the uninstall hook's own pod...
        (owned_pod("Job", "gy-gpuyard-release-finalizers", None), False),
        # ... and a ReplicaSet of another Deployment whose name shares the prefix.
        (owned_pod("ReplicaSet", "gy-gpuyard-other-5d8f7", "5d8f7"), False),
        (owned_pod("ReplicaSet", "gy-gpuyard-5d8f7", "aaaaa"), False),
        ({"metadata": {"name": "bare", "labels": {"pod-template-hash": "5d8f7"}}}, False),
    ],
)
def test_only_the_deployments_own_pods_are_waited_for(pod_: dict[str, Any], belongs: bool) -> None:
    assert belongs_to_deployment(pod_, "gy-gpuyard") is belongs


@pytest.mark.parametrize(
    ("text", "expected"),
    [("gpuyard-system/gpuyard", ("gpuyard-system", "gpuyard")), ("ns/a-b", ("ns", "a-b"))],
)
def test_parse_deployment_ref(text: str, expected: tuple[str, str]) -> None:
    assert parse_deployment_ref(text) == expected


@pytest.mark.parametrize("text", ["gpuyard", "/gpuyard", "ns/", "a/b/c", ""])
def test_parse_deployment_ref_refuses_anything_but_namespace_slash_name(text: str) -> None:
    with pytest.raises(ValueError, match="expected NAMESPACE/NAME"):
        parse_deployment_ref(text)


@pytest.mark.parametrize(
    ("status", "running"),
    [
        ({}, False),
        ({"readyReplicas": 0}, False),
        ({"replicas": 1}, False),
        ({"readyReplicas": 1}, True),
    ],
)
def test_a_deployment_runs_when_it_has_a_ready_pod(status: dict[str, Any], running: bool) -> None:
    assert is_running({"status": status}) is running


def test_object_key_of_namespaced_and_cluster_scoped_objects() -> None:
    assert object_key(pod()) == "team-a/llm-0"
    assert object_key(pod(namespace=None)) == "llm-0"


def test_billing_wait_lines() -> None:
    assert BillingWait(awaited=(), unbilled=(), seconds=0.2).describe() == (
        "billing: nothing is waiting to be billed"
    )
    assert BillingWait(awaited=("pod a/x", "pod a/y"), unbilled=(), seconds=12.4).describe() == (
        "billing: the operator billed and released 2 of 2 objects that had ended, in 12s"
    )
    line = BillingWait(awaited=("pod a/x", "pod a/y"), unbilled=("pod a/y",), seconds=90).describe()
    assert line == (
        "billing: the operator billed and released 1 of 2 objects that had ended, in 90s; "
        "1 still unbilled at the deadline, released unbilled: pod a/y"
    )


def test_release_tally_lines() -> None:
    tally = ReleaseTally(kind="pod", scanned=1, released=["a/x"])
    assert tally.describe() == f"released: {METERING} from 1 pod (1 pod scanned)"

    many = ReleaseTally(
        kind="GPUPool",
        scanned=9,
        released=[],
        failed={f"pool-{i}": "403 Forbidden" for i in range(7)},
    )
    assert many.describe() == (
        f"released: {METERING} from 0 GPUPools (9 GPUPools scanned); 7 could not be released: "
        "pool-0 (403 Forbidden), pool-1 (403 Forbidden), pool-2 (403 Forbidden), "
        "pool-3 (403 Forbidden), pool-4 (403 Forbidden) and 2 more"
    )


def test_command_arguments() -> None:
    args = build_parser().parse_args(
        [
            "release-finalizers",
            "--stop-deployment",
            "gpuyard-system/gpuyard",
            "--billing-timeout",
            "5",
        ]
    )

    assert args.stop_deployment == ("gpuyard-system", "gpuyard")
    assert (args.billing_timeout, args.stop_timeout) == (5.0, 60.0)
    defaults = build_parser().parse_args(["release-finalizers"])
    assert (defaults.stop_deployment, defaults.billing_timeout) == (None, 90.0)
    assert defaults.page_size == 500


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--stop-deployment", "gpuyard"], "expected NAMESPACE/NAME, got 'gpuyard'"),
        (["--billing-timeout", "soon"], "not a number of seconds: 'soon'"),
        (["--stop-timeout", "-1"], "must be between 0 and 3600 seconds: '-1'"),
        (["--page-size", "0"], "must be a whole number from 1 to 5000: '0'"),
    ],
)
def test_command_refuses_bad_arguments_clearly(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["release-finalizers", *argv])

    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
