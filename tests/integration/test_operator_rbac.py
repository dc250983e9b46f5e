"""The operator's own token cannot be turned into cluster-admin: with the session
operator's ServiceAccount (the chart's ClusterRole, the chart's operator admission
policies, conftest.chart_service_account), the writes gpuyard makes are admitted and the
ones an attacker holding the token would try are refused by the policies, each with the
policy's message.

Deployments and Services are tried as server-side dry runs (nothing is created even if a
policy failed to refuse); pod and GPUPool patches go through gpuyard's own
``Kube.set_finalizers``, the exact JSON patches the meter sends.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes.client import ApiClient, ApiException

from conftest import TEST_RELEASE
from gpuyard.io.kube import Kube, request_json
from gpuyard.io.metrics import OperatorMetrics
from support import Kubectl

FINALIZER = "gpuyard.io/metering"
BILLED_TO = "gpuyard.io/billed-to"
MANAGED = {"app.kubernetes.io/managed-by": "gpuyard"}
CHILDREN_POLICY = f"ValidatingAdmissionPolicy '{TEST_RELEASE}-operator-children'"
FINALIZERS_POLICY = f"ValidatingAdmissionPolicy '{TEST_RELEASE}-operator-finalizers'"
MERGE_PATCH = "application/merge-patch+json"
# Merges the containers list by name: only the image changes.
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"
DRY_RUN = [("dryRun", "All")]


def refused(call: Any, policy: str, *expected: str) -> None:
    """Check that `call` is refused by `policy`, with a message holding `expected`."""
    with pytest.raises(ApiException) as caught:
        call()
    error = caught.value
    message = json.loads(error.body or "{}").get("message", "")
    assert error.status == 403, (error.status, message)
    assert f"{policy} with binding" in message, message
    assert "denied request" in message, message
    for text in expected:
        assert text in message, message


def deployment(
    namespace: str,
    name: str,
    *,
    labels: dict[str, str],
    pod: dict[str, Any] | None = None,
    security: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A Deployment shaped as gpuyard builds one (no token, no escalation, no capability),
    with `pod` and `security` merged into its pod spec and container's securityContext."""
    container = {
        "name": "main",
        "image": "registry.example/server:1",
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            **(security or {}),
        },
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "automountServiceAccountToken": False,
                    "containers": [container],
                    **(pod or {}),
                },
            },
        },
    }


def create_dry_run(api: ApiClient, obj: dict[str, Any]) -> Any:
    group = "/api/v1" if obj["apiVersion"] == "v1" else f"/apis/{obj['apiVersion']}"
    plural = {"Deployment": "deployments", "Service": "services"}[obj["kind"]]
    namespace = obj["metadata"]["namespace"]
    return request_json(
        api, "POST", f"{group}/namespaces/{namespace}/{plural}", body=obj, query=DRY_RUN
    )


def patch(
    api: ApiClient,
    path: str,
    body: dict[str, Any],
    *,
    content_type: str = MERGE_PATCH,
    dry_run: bool = False,
) -> Any:
    query = DRY_RUN if dry_run else None
    return request_json(api, "PATCH", path, body=body, content_type=content_type, query=query)


@pytest.fixture
def kube(operator_api: ApiClient) -> Kube:
    """gpuyard's own Kubernetes calls, with the operator's token."""
    return Kube(operator_api, OperatorMetrics())


@pytest.fixture
def bare_pod(kubectl: Kubectl, namespace: str) -> Iterator[str]:
    """A pod the admin made, stripped of every finalizer at the end so that its namespace
    can go."""
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "target", "namespace": namespace, "labels": {"app": "target"}},
        "spec": {"containers": [{"name": "main", "image": "registry.example/server:1"}]},
    }
    kubectl.apply(json.dumps(pod), namespace)
    yield "target"
    release = '{"metadata":{"finalizers":null}}'
    kubectl.run(
        "patch", "pod", "target", "-n", namespace, "--type=merge", "-p", release, check=False
    )


def test_a_privileged_deployment_in_kube_system_is_refused(operator_api: ApiClient) -> None:
    # What a stolen token would create: every host door at once. The managed-by label
    # does not help it.
    evil = deployment(
        "kube-system",
        "node-shell",
        labels=MANAGED,
        pod={
            "hostNetwork": True,
            "hostPID": True,
            "serviceAccountName": "kube-proxy",
            "volumes": [{"name": "root", "hostPath": {"path": "/"}}],
        },
        # (the API server refuses privileged without escalation as invalid)
        security={
            "privileged": True,
            "allowPrivilegeEscalation": True,
            "capabilities": {"add": ["SYS_ADMIN"]},
        },
    )

    refused(
        lambda: create_dry_run(operator_api, evil),
        CHILDREN_POLICY,
        "Deployment kube-system/node-shell holds hostNetwork, hostPID",
        "serviceAccountName kube-proxy in a system namespace",
        "volume root of a kind an AIService cannot ask for",
        "privileged container main",
        "privilege escalation in container main",
        "capabilities added to container main",
    )


@pytest.mark.parametrize(
    ("pod", "security", "expected"),
    [
        ({"hostIPC": True}, {}, "hostIPC"),
        (
            {
                "volumes": [
                    {
                        "name": "token",
                        "projected": {"sources": [{"serviceAccountToken": {"path": "token"}}]},
                    }
                ]
            },
            {},
            "volume token of a kind an AIService cannot ask for",
        ),
        ({}, {"allowPrivilegeEscalation": True}, "privilege escalation in container main"),
        ({}, {"seccompProfile": {"type": "Unconfined"}}, "seccomp Unconfined in container main"),
    ],
    ids=["host-ipc", "token-volume", "escalation", "unconfined"],
)
def test_a_pod_template_gpuyard_would_not_build_is_refused(
    operator_api: ApiClient,
    namespace: str,
    pod: dict[str, Any],
    security: dict[str, Any],
    expected: str,
) -> None:
    refused(
        lambda: create_dry_run(
            operator_api,
            deployment(namespace, "server", labels=MANAGED, pod=pod, security=security),
        ),
        CHILDREN_POLICY,
        f"Deployment {namespace}/server holds {expected}",
    )


def test_a_tenant_service_account_and_token_pass_outside_system_namespaces(
    operator_api: ApiClient, namespace: str
) -> None:
    # An AIService may name a ServiceAccount of its namespace and ask for its token, and
    # carry the five volume kinds it offers; the policy lets gpuyard write that.
    volumes = [
        {"name": "cache", "persistentVolumeClaim": {"claimName": "cache"}},
        {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}},
        {"name": "config", "configMap": {"name": "config"}},
        {"name": "token", "secret": {"secretName": "token"}},
        {
            "name": "scratch",
            "ephemeral": {
                "volumeClaimTemplate": {
                    "spec": {
                        "accessModes": ["ReadWriteOnce"],
                        "resources": {"requests": {"storage": "1Gi"}},
                    }
                }
            },
        },
    ]
    pod = {"serviceAccountName": "inference", "automountServiceAccountToken": True}
    create_dry_run(
        operator_api,
        deployment(namespace, "server", labels=MANAGED, pod={**pod, "volumes": volumes}),
    )

    refused(
        lambda: create_dry_run(
            operator_api, deployment("kube-system", "server", labels=MANAGED, pod=pod)
        ),
        CHILDREN_POLICY,
        "serviceAccountName inference in a system namespace",
        "a mounted ServiceAccount token in a system namespace",
    )


def test_a_host_port_is_refused(operator_api: ApiClient, namespace: str) -> None:
    server = deployment(namespace, "server", labels=MANAGED)
    server["spec"]["template"]["spec"]["containers"][0]["ports"] = [
        {"containerPort": 8000, "hostPort": 8000}
    ]

    refused(
        lambda: create_dry_run(operator_api, server),
        CHILDREN_POLICY,
        "a hostPort in container main",
    )


def test_only_gpuyards_own_deployments_and_services_are_written(
    operator_api: ApiClient, namespace: str
) -> None:
    # The shape gpuyard builds passes: the refusals below are the policy's, not RBAC's.
    create_dry_run(operator_api, deployment(namespace, "server", labels=MANAGED))

    refused(
        lambda: create_dry_run(operator_api, deployment(namespace, "server", labels={})),
        CHILDREN_POLICY,
        f"Deployment {namespace}/server does not carry the label",
    )
    # Somebody else's Service: not deleted, however it is named.
    refused(
        lambda: request_json(
            operator_api, "DELETE", "/api/v1/namespaces/default/services/kubernetes", query=DRY_RUN
        ),
        CHILDREN_POLICY,
        "Service default/kubernetes is not gpuyard's",
    )
    exposed = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "server", "namespace": namespace, "labels": MANAGED},
        "spec": {"type": "NodePort", "selector": {"app": "server"}, "ports": [{"port": 80}]},
    }
    refused(
        lambda: create_dry_run(operator_api, exposed),
        CHILDREN_POLICY,
        f"Service {namespace}/server holds type NodePort",
    )


def test_the_operator_may_patch_a_pod_only_to_hold_and_release_it(
    kube: Kube, kubectl: Kubectl, operator_api: ApiClient, namespace: str, bare_pod: str
) -> None:
    path = f"/api/v1/namespaces/{namespace}/pods/{bare_pod}"

    def metadata() -> dict[str, Any]:
        found: dict[str, Any] = kubectl.json("get", "pod", "-n", namespace, bare_pod)["metadata"]
        return found

    # A new image or a new label: what a stolen token would do to a running pod.
    new_image = {"spec": {"containers": [{"name": "main", "image": "registry.example/evil:1"}]}}
    refused(
        lambda: patch(operator_api, path, new_image, content_type=STRATEGIC_MERGE_PATCH),
        FINALIZERS_POLICY,
        f"pods {namespace}/{bare_pod} changes spec",
    )
    refused(
        lambda: patch(operator_api, path, {"metadata": {"labels": {"app": "other"}}}),
        FINALIZERS_POLICY,
        "changes labels",
    )
    rebilled = {"metadata": {"annotations": {BILLED_TO: "someone-else"}}}
    refused(
        lambda: patch(operator_api, path, rebilled),
        FINALIZERS_POLICY,
        f"annotation {BILLED_TO} without adding the finalizer",
    )

    # The meter's hold: the finalizer, and the service it bills the pod to, in one patch.
    kube.set_finalizers("pods", path, metadata(), [FINALIZER], {BILLED_TO: "server"})
    held = metadata()
    assert held["finalizers"] == [FINALIZER]
    assert held["annotations"][BILLED_TO] == "server"
    assert held["labels"] == {"app": "target"}

    # Another controller's finalizer is not the operator's to add.
    refused(
        lambda: kube.set_finalizers("pods", path, held, [FINALIZER, "example.com/hold"]),
        FINALIZERS_POLICY,
        "changes other finalizers",
    )

    # The meter's release.
    kube.set_finalizers("pods", path, metadata(), [])
    assert not metadata().get("finalizers")


def test_the_operator_may_not_reprice_a_pool(operator_api: ApiClient, pools: None) -> None:
    cheaper = {"spec": {"price": {"perGpuHour": "0.01"}}}

    refused(
        lambda: patch(operator_api, "/apis/gpuyard.io/v1alpha1/gpupools/l4", cheaper, dry_run=True),
        FINALIZERS_POLICY,
        "the request for gpupools l4 changes spec",
    )
