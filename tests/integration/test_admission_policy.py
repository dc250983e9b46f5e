"""The chart's admission policies on the real local cluster: a tenant with the built-in
`edit` role cannot move gpuyard's marks (each refusal says what to do instead), while the
operator, the controllers that copy its pod templates, the scheduler, kwok and a tenant's
own objects go on as before.

The module owns the policies' life: they are rendered for the session operator's release
(its ServiceAccount is the one exempted), applied, and removed at the end, so the other
modules, which edit pods and Deployments as the admin, never run under them.
"""

from __future__ import annotations

import json
import secrets
import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from kubernetes.client import ApiClient

from chart_support import Helm
from conftest import OPERATOR_NAMESPACE, TEST_RELEASE
from gpuyard.io.kube import request_json
from localcluster.cluster import ClusterState, binaries_dir
from support import Kubectl, wait_until

#: A tenant: a user bound to the built-in `edit` ClusterRole in the test's namespace only.
TENANT = "tenant-alice"
FINALIZER = "gpuyard.io/metering"
SERVICE_LABEL = "gpuyard.io/service"
POOL_LABEL = "gpuyard.io/pool"
DENIED = "denied request"
SCALE_PROBE = "policy-probe-scale"

Result = subprocess.CompletedProcess[str]
Run = Callable[..., Result]


def refusal(result: Result, *expected: str) -> None:
    """Check that a policy refused the kubectl call, with a message holding `expected`."""
    assert result.returncode != 0, f"admitted: {result.stdout}"
    assert DENIED in result.stderr, result.stderr
    for text in expected:
        assert text in result.stderr, result.stderr


def admitted(result: Result) -> None:
    assert result.returncode == 0, result.stderr


def probe_pod(namespace: str, *, finalizer: bool = False) -> str:
    """A pod created with one of gpuyard's marks: its service label, or the metering
    finalizer."""
    marks: dict[str, Any] = (
        {"finalizers": [FINALIZER]} if finalizer else {"labels": {SERVICE_LABEL: "probe"}}
    )
    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "policy-probe", "namespace": namespace, **marks},
            "spec": {"containers": [{"name": "main", "image": "registry.example/probe:1"}]},
        }
    )


def probe_deployment(
    namespace: str, name: str = "policy-probe", *, marked: bool = True, replicas: int = 1
) -> str:
    """A Deployment whose pod template carries a gpuyard mark (or none)."""
    labels = {"app": name, **({SERVICE_LABEL: "probe"} if marked else {})}
    return json.dumps(
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {"containers": [{"name": "main", "image": "registry.example/p:1"}]},
                },
            },
        }
    )


class Probes:
    """One dry-run request per policy, each refused exactly while that policy is enforced.

    A policy takes a moment to be enforced after it is created (and to stop after it is
    deleted): the API server's policy informers must see it first.
    """

    def __init__(self, kubectl: Kubectl, namespace: str) -> None:
        self.kubectl = kubectl
        self.namespace = namespace

    def results(self) -> dict[str, bool]:
        """Per policy, whether its probe was refused."""
        dry = ["--dry-run=server", "-n", self.namespace]
        runs = {
            "pods": self.kubectl.run(
                "create", *dry, "-f", "-", stdin=probe_pod(self.namespace), check=False
            ),
            "workloads": self.kubectl.run(
                "create", *dry, "-f", "-", stdin=probe_deployment(self.namespace), check=False
            ),
            # A Deployment that requires gpuyard.io/service, created before the policies.
            "deployment-scale": self.kubectl.run(
                "scale", *dry, f"deployment/{SCALE_PROBE}", "--replicas=1", check=False
            ),
        }
        for name, result in runs.items():
            assert result.returncode == 0 or DENIED in result.stderr, (name, result.stderr)
        return {name: result.returncode != 0 for name, result in runs.items()}


@pytest.fixture(scope="module")
def policy_manifest(cluster: ClusterState, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The chart's policies and bindings for the session operator's release."""
    helm = Helm(
        binaries_dir(build=False) / "helm", tmp_path_factory.mktemp("helm"), cluster.kubeconfig
    )
    return helm.template_text(
        None,
        "--show-only", "templates/admissionpolicy.yaml",
        release=TEST_RELEASE,
        namespace=OPERATOR_NAMESPACE,
    ).stdout  # fmt: skip


@pytest.fixture(scope="module")
def policies(kubectl: Kubectl, policy_manifest: str) -> Iterator[None]:
    """The policies, enforced for the module's tests, gone (and no longer enforced) after."""
    probe_namespace = f"t-policy-probe-{secrets.token_hex(3)}"
    kubectl("create", "namespace", probe_namespace)
    kubectl.apply(probe_deployment(probe_namespace, SCALE_PROBE, replicas=0))
    probes = Probes(kubectl, probe_namespace)
    kubectl.apply(policy_manifest)
    try:
        wait_until(
            lambda: all(probes.results().values()), timeout=60, what="the policies to be enforced"
        )
        yield
    finally:
        kubectl.run("delete", "--ignore-not-found", "-f", "-", stdin=policy_manifest, check=False)
        wait_until(
            lambda: not any(probes.results().values()),
            timeout=60,
            what="the deleted policies to stop being enforced",
        )
        kubectl.run("delete", "namespace", probe_namespace, "--wait=false", check=False)


@pytest.fixture(scope="module")
def mig_pool(kubectl: Kubectl, policies: None) -> Iterator[str]:
    """A pool whose GPUs have another resource name than the pools the services use."""
    name = f"policy-mig-{secrets.token_hex(3)}"
    pool = {
        "apiVersion": "gpuyard.io/v1alpha1",
        "kind": "GPUPool",
        "metadata": {"name": name},
        "spec": {
            "gpuType": "a100-80gb",
            "resourceName": "nvidia.com/mig-1g.10gb",
            "nodeSelector": {POOL_LABEL: name},
            "price": {"perGpuHour": "0.40", "currency": "USD"},
        },
    }
    kubectl.apply(json.dumps(pool))
    yield name
    kubectl.run("delete", "gpupool", name, "--ignore-not-found", "--wait=false", check=False)


@pytest.fixture
def tenant(kubectl: Kubectl, namespace: str, policies: None) -> Run:
    """kubectl as the tenant: the admin's kubeconfig, impersonating a user who holds the
    built-in `edit` role in the test's namespace."""
    kubectl(
        "create", "rolebinding", "tenant-edit", "-n", namespace,
        "--clusterrole=edit", f"--user={TENANT}",
    )  # fmt: skip

    def run(*args: str, stdin: str | None = None) -> Result:
        return kubectl.run(f"--as={TENANT}", "-n", namespace, *args, stdin=stdin, check=False)

    return run


def aiservice(name: str, replicas: int) -> str:
    """A service in autoscaling mode Off on the l4 pool, as `kubectl scale ais` drives it."""
    return json.dumps(
        {
            "apiVersion": "gpuyard.io/v1alpha1",
            "kind": "AIService",
            "metadata": {"name": name},
            "spec": {
                "pool": "l4",
                "gpusPerReplica": 1,
                "container": {"image": "registry.example/llm:1"},
                "minReplicas": 0,
                "maxReplicas": 4,
                "replicas": replicas,
                "autoscaling": {"mode": "Off"},
            },
        }
    )


def service_pods(kubectl: Kubectl, namespace: str, service: str) -> list[dict[str, Any]]:
    """The service's pods that are not being deleted."""
    items: list[dict[str, Any]] = kubectl.json(
        "get", "pods", "-n", namespace, "-l", f"{SERVICE_LABEL}={service}"
    )["items"]
    return [pod for pod in items if "deletionTimestamp" not in pod["metadata"]]


def settled(
    kubectl: Kubectl, namespace: str, service: str, replicas: int
) -> list[dict[str, Any]] | None:
    """The service's pods if it runs exactly `replicas`, each bound and Running."""
    pods = service_pods(kubectl, namespace, service)
    done = len(pods) == replicas and all(
        pod["status"].get("phase") == "Running" and pod["spec"].get("nodeName") for pod in pods
    )
    return pods if done else None


def running(kubectl: Kubectl, namespace: str, service: str, replicas: int) -> list[dict[str, Any]]:
    return wait_until(
        lambda: settled(kubectl, namespace, service, replicas),
        timeout=90,
        what=f"{service} to run {replicas} pods",
    )


def pod_marks(kubectl: Kubectl, namespace: str, pod: str) -> tuple[dict[str, str], list[str]]:
    metadata = kubectl.json("get", "pod", "-n", namespace, pod)["metadata"]
    return metadata.get("labels", {}), metadata.get("finalizers", [])


def held(kubectl: Kubectl, namespace: str, pod: str) -> list[str]:
    """Wait until the meter holds the pod with its finalizer (it adds it once it sees the
    pod); the pod's finalizers then."""

    def finalizers() -> list[str] | None:
        found = pod_marks(kubectl, namespace, pod)[1]
        return found if FINALIZER in found else None

    return wait_until(finalizers, what=f"the meter's finalizer on pod {pod}")


def start_service(
    kubectl: Kubectl, namespace: str, name: str, replicas: int = 1
) -> list[dict[str, Any]]:
    kubectl.apply(aiservice(name, replicas), namespace)
    pods = running(kubectl, namespace, name, replicas)
    for pod in pods:
        held(kubectl, namespace, pod["metadata"]["name"])
    return pods


def remove_finalizer_patch(finalizers: list[str]) -> str:
    """A JSON patch that removes the metering finalizer, as a hand edit would."""
    path = f"/metadata/finalizers/{finalizers.index(FINALIZER)}"
    return json.dumps(
        [{"op": "test", "path": path, "value": FINALIZER}, {"op": "remove", "path": path}]
    )


@pytest.mark.usefixtures("running_operator")
def test_a_tenant_cannot_move_gpuyards_marks(
    kubectl: Kubectl, namespace: str, tenant: Run, mig_pool: str
) -> None:
    [pod] = start_service(kubectl, namespace, "llama")
    name = pod["metadata"]["name"]
    labels, finalizers = pod_marks(kubectl, namespace, name)
    assert labels[POOL_LABEL] == "l4"
    assert FINALIZER in finalizers
    deployment = kubectl.json("get", "deployment", "-n", namespace, "llama")
    change_the_service = "billing does not read them: change AIService llama instead"

    # Another pool (a cheaper or dearer price), one whose GPUs have another resource name,
    # a pool that does not exist: each refused, naming the label and the AIService to edit.
    for pool in ("a100", mig_pool, "no-such-pool"):
        refusal(
            tenant("label", "pod", name, f"{POOL_LABEL}={pool}", "--overwrite"),
            f"the gpuyard.io/ labels and annotations of pod {name} are set by gpuyard "
            f"(refused: {POOL_LABEL}); {change_the_service} (kubectl edit ais/llama)",
        )
    # Taking the pod out of its service (its ReplicaSet would orphan it).
    refusal(tenant("label", "pod", name, f"{SERVICE_LABEL}-"), f"(refused: {SERVICE_LABEL})")
    # An annotation of gpuyard's namespace.
    refusal(tenant("annotate", "pod", name, "gpuyard.io/billed=no"), "(refused: gpuyard.io/billed)")
    # The finalizer that holds the pod until its last second is billed.
    refusal(
        tenant("patch", "pod", name, "--type=json", "-p", remove_finalizer_patch(finalizers)),
        f"the gpuyard.io/metering finalizer of pod {name} is gpuyard's",
        f"delete the pod (kubectl delete pod {name}) and gpuyard releases it",
    )
    # The pod template of the Deployment gpuyard manages...
    refusal(
        tenant("set", "image", "deployment/llama", "inference=registry.example/other:2"),
        "the pod template of Deployment llama is gpuyard's: edit AIService llama instead "
        "(kubectl edit ais/llama)",
    )
    # ... its replica count, through the scale subresource and through the spec...
    scale_the_service = (
        "is set by gpuyard: scale AIService llama instead: kubectl scale ais/llama "
        "--replicas=3 (autoscaling mode Off; otherwise the autoscaler sets it)"
    )
    refusal(
        tenant("scale", "deployment", "llama", "--replicas=3"),
        f"the replica count of Deployment llama {scale_the_service}",
    )
    refusal(
        tenant("patch", "deployment", "llama", "-p", '{"spec": {"replicas": 3}}'),
        scale_the_service,
    )
    # ... and the label that makes it gpuyard's.
    refusal(
        tenant("label", "deployment", "llama", "app.kubernetes.io/managed-by-"),
        "(refused: app.kubernetes.io/managed-by): edit AIService llama instead",
    )
    # Nor may a tenant's own objects borrow the marks: a bare pod, a Deployment.
    refusal(
        tenant("create", "--dry-run=server", "-f", "-", stdin=probe_pod(namespace)),
        "pod policy-probe may not carry gpuyard.io/ labels or annotations "
        f"(refused: {SERVICE_LABEL})",
        "run the workload as an AIService",
    )
    refusal(
        tenant("create", "--dry-run=server", "-f", "-", stdin=probe_pod(namespace, finalizer=True)),
        "the gpuyard.io/metering finalizer is set by gpuyard, on the pods it bills, only",
    )
    refusal(
        tenant("create", "--dry-run=server", "-f", "-", stdin=probe_deployment(namespace)),
        "the pod template of Deployment policy-probe may not carry gpuyard's marks "
        f"(refused: {SERVICE_LABEL})",
    )

    # Nothing moved.
    assert pod_marks(kubectl, namespace, name) == (labels, finalizers)
    after = kubectl.json("get", "deployment", "-n", namespace, "llama")
    assert after["spec"] == deployment["spec"]
    assert after["metadata"]["labels"] == deployment["metadata"]["labels"]


@pytest.mark.usefixtures("running_operator")
def test_gpuyard_the_cluster_and_the_tenant_go_on_under_the_policies(
    kubectl: Kubectl, namespace: str, tenant: Run, operator_api: ApiClient
) -> None:
    [pod] = start_service(kubectl, namespace, "chat")
    name = pod["metadata"]["name"]

    # The operator's ServiceAccount passes these policies: it strips the finalizer, which
    # the meter (the operator, under the same account) then puts back by patch. Its own
    # policies let it change nothing else of a pod (test_operator_rbac.py), so relabelling
    # is no longer the operator's to try.
    uid = pod["metadata"]["uid"]
    finalizers = pod_marks(kubectl, namespace, name)[1]
    request_json(
        operator_api, "PATCH", f"/api/v1/namespaces/{namespace}/pods/{name}",
        body=json.loads(remove_finalizer_patch(finalizers)),
        content_type="application/json-patch+json",
    )  # fmt: skip
    held(kubectl, namespace, name)
    assert kubectl.json("get", "pod", "-n", namespace, name)["metadata"]["uid"] == uid

    # A tenant may label and annotate a gpuyard pod beyond gpuyard's marks, and hold it with
    # a finalizer of their own (the garbage collector's edits are of this kind).
    admitted(tenant("label", "pod", name, "team=search"))
    admitted(tenant("annotate", "pod", name, "example.com/owner=alice"))
    admitted(tenant("patch", "pod", name, "--type=json", "-p", json.dumps(
        [{"op": "add", "path": "/metadata/finalizers/-", "value": "example.com/hold"}]
    )))  # fmt: skip
    _, finalizers = pod_marks(kubectl, namespace, name)
    index = finalizers.index("example.com/hold")
    admitted(tenant("patch", "pod", name, "--type=json", "-p", json.dumps(
        [{"op": "remove", "path": f"/metadata/finalizers/{index}"}]
    )))  # fmt: skip
    # ... and do anything to pods and Deployments of their own.
    admitted(tenant("create", "-f", "-", stdin=probe_deployment(namespace, marked=False)))
    admitted(tenant("scale", "deployment", "policy-probe", "--replicas=2"))

    def own_pods() -> list[str]:
        return tenant("get", "pods", "-l", "app=policy-probe", "-o", "name").stdout.split()

    own = wait_until(own_pods, what="the tenant's own pods")
    admitted(tenant("label", own[0], "team=search", "tier=batch"))
    admitted(tenant("label", own[0], "team-"))

    # Scaling the AIService: the ReplicaSet controller creates the new pods, the scheduler
    # binds them (pods/binding) and kwok reports them Running (pods/status). The scheduler
    # and kwok run as the admin, whom the policies do not exempt.
    kubectl("scale", "-n", namespace, "ais/chat", "--replicas=3")
    running(kubectl, namespace, "chat", 3)

    # `kubectl rollout restart` replaces the pods through a new ReplicaSet.
    before = {p["metadata"]["uid"] for p in service_pods(kubectl, namespace, "chat")}
    admitted(tenant("rollout", "restart", "deployment/chat"))

    def restarted() -> bool:
        pods = settled(kubectl, namespace, "chat", 3)
        return pods is not None and before.isdisjoint(p["metadata"]["uid"] for p in pods)

    wait_until(restarted, timeout=120, what="the restarted rollout to replace every pod")

    # A tenant deletes a pod: it goes (the operator releases its finalizer) and is replaced.
    victim = service_pods(kubectl, namespace, "chat")[0]["metadata"]
    admitted(tenant("delete", "pod", victim["name"], "--wait=false"))
    wait_until(
        lambda: (
            kubectl.run("get", "pod", "-n", namespace, victim["name"], check=False).returncode != 0
        ),
        timeout=60,
        what="the deleted pod to go",
    )
    assert victim["uid"] not in {
        p["metadata"]["uid"] for p in running(kubectl, namespace, "chat", 3)
    }

    # Deleting the service: the garbage collector removes the Deployment, its ReplicaSets and
    # pods, and the operator releases each pod's finalizer.
    kubectl("delete", "ais", "-n", namespace, "chat", "--wait=false")
    wait_until(
        lambda: (
            not kubectl.json("get", "pods", "-n", namespace, "-l", f"{SERVICE_LABEL}=chat")["items"]
        ),
        timeout=90,
        what="the service's pods to be collected",
    )
