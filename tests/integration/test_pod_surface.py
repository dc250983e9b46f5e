"""The pod surface of real inference servers on the real local cluster: the examples run
with their Secrets, volumes, probes and identity; Pod Security "restricted" namespaces;
the disruption budget."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import yaml

from conftest import OperatorProcess
from localcluster.cluster import REPO_ROOT
from support import Kubectl, wait_until
from test_core import aiservice, get, manifest, service_pods, wait_condition, wait_running

RESTRICTED = "pod-security.kubernetes.io/enforce=restricted"


def example(name: str) -> list[dict[str, Any]]:
    return list(yaml.safe_load_all((REPO_ROOT / "examples" / name).read_text()))


def the_service(objects: list[dict[str, Any]]) -> dict[str, Any]:
    [service] = [obj for obj in objects if obj["kind"] == "AIService"]
    return service


@pytest.fixture
def volume_for(kubectl: Kubectl, namespace: str) -> Iterator[Callable[[dict[str, Any]], None]]:
    """Make a PersistentVolume bound in advance to a claim of the namespace, as a cluster
    administrator (or a provisioner) would; the local cluster has no storage provisioner.
    kwok runs the pods without mounting anything, so the volume's source does not matter."""
    made: list[str] = []

    def make(claim: dict[str, Any]) -> None:
        name = f"{namespace}-{claim['metadata']['name']}"[:63]
        volume = {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": name},
            "spec": {
                "capacity": {"storage": "500Gi"},
                "accessModes": claim["spec"]["accessModes"],
                "persistentVolumeReclaimPolicy": "Retain",
                "storageClassName": "",
                "claimRef": {"namespace": namespace, "name": claim["metadata"]["name"]},
                "hostPath": {"path": f"/srv/{name}"},
            },
        }
        kubectl.apply(json.dumps(volume))
        made.append(name)
        # Bound before any pod asks for it: the scheduler retries a pod that found its
        # claim unbound only after a back-off of minutes.
        kubectl.apply(json.dumps(claim), namespace)
        wait_until(
            lambda: (
                kubectl.json("get", "pvc", "-n", namespace, claim["metadata"]["name"])
                .get("status", {})
                .get("phase")
                == "Bound"
            ),
            what=f"claim {claim['metadata']['name']} to bind",
        )

    yield make
    for name in made:
        kubectl.run("delete", "pv", name, "--wait=false", check=False)


def deployment(kubectl: Kubectl, namespace: str, name: str) -> dict[str, Any]:
    found: dict[str, Any] = kubectl.json("get", "deployment", "-n", namespace, name)
    return found


def test_the_vllm_example_runs_with_its_whole_pod_surface(
    kubectl: Kubectl,
    namespace: str,
    running_operator: OperatorProcess,
    pools: None,
    volume_for: Callable[[dict[str, Any]], None],
) -> None:
    kubectl("create", "secret", "generic", "hf-token", "-n", namespace, "--from-literal=token=hf_x")
    kubectl(
        "create", "secret", "docker-registry", "registry-credentials", "-n", namespace,
        "--docker-server=https://index.docker.io/v1/", "--docker-username=team",
        "--docker-password=secret",
    )  # fmt: skip
    [claim] = [obj for obj in example("vllm.yaml") if obj["kind"] == "PersistentVolumeClaim"]
    volume_for(claim)

    kubectl("apply", "-n", namespace, "-f", str(REPO_ROOT / "examples" / "vllm.yaml"))

    [pod] = wait_running(kubectl, namespace, "llama", 1)
    template = deployment(kubectl, namespace, "llama")["spec"]["template"]
    for spec in (template["spec"], pod["spec"]):
        [server] = spec["containers"]
        token = next(env for env in server["env"] if env["name"] == "HF_TOKEN")
        assert token["valueFrom"]["secretKeyRef"]["name"] == "hf-token", token
        assert "value" not in token
        volumes = {volume["name"]: volume for volume in spec["volumes"]}
        assert volumes["model-cache"]["persistentVolumeClaim"]["claimName"] == "llama-model-cache"
        assert volumes["shm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Gi"}
        mounts = {mount["mountPath"]: mount["name"] for mount in server["volumeMounts"]}
        assert mounts == {"/models": "model-cache", "/dev/shm": "shm"}
        startup = server["startupProbe"]
        assert startup["httpGet"] == {"path": "/health", "port": 8000, "scheme": "HTTP"}
        assert startup["periodSeconds"] * startup["failureThreshold"] == 900
        assert server["readinessProbe"]["httpGet"]["path"] == "/health"
        assert server["livenessProbe"]["timeoutSeconds"] == 5
        assert server["resources"]["limits"]["ephemeral-storage"] == "20Gi"
        assert server["securityContext"]["allowPrivilegeEscalation"] is False
        assert server["securityContext"]["capabilities"] == {"drop": ["ALL"]}
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert spec["imagePullSecrets"] == [{"name": "registry-credentials"}]
        assert spec["serviceAccountName"] == "llama-inference"
        assert spec["automountServiceAccountToken"] is False
        assert spec["terminationGracePeriodSeconds"] == 120
    assert pod["metadata"]["labels"]["model"] == "llama-3.1-8b-instruct"
    budget = kubectl.json("get", "pdb", "-n", namespace, "llama")
    assert budget["spec"]["maxUnavailable"] == 1


def test_the_triton_example_runs_where_pod_security_is_restricted(
    kubectl: Kubectl,
    namespace: str,
    running_operator: OperatorProcess,
    pools: None,
    volume_for: Callable[[dict[str, Any]], None],
) -> None:
    kubectl("label", "namespace", namespace, RESTRICTED)
    objects = example("triton.yaml")
    volume_for(next(obj for obj in objects if obj["kind"] == "PersistentVolumeClaim"))
    # The example scales to zero without demand; one replica shows that its pod passes.
    the_service(objects)["spec"]["minReplicas"] = 1

    kubectl.apply(manifest(*objects), namespace)

    [pod] = wait_running(kubectl, namespace, "triton", 1)
    [server] = pod["spec"]["containers"]
    assert server["securityContext"]["runAsNonRoot"] is True
    assert pod["spec"]["securityContext"]["fsGroup"] == 1000


def test_a_service_that_breaks_pod_security_says_why_and_makes_no_pods(
    kubectl: Kubectl, namespace: str, running_operator: OperatorProcess
) -> None:
    kubectl("label", "namespace", namespace, RESTRICTED)

    kubectl.apply(manifest(aiservice("rootful", replicas=1)), namespace)

    refused = wait_condition(kubectl, namespace, "rootful", "Ready", "False", reason="PodsRefused")
    [ready] = [c for c in refused["status"]["conditions"] if c["type"] == "Ready"]
    assert 'violates PodSecurity "restricted:latest"' in ready["message"], ready
    assert "runAsNonRoot" in ready["message"], ready
    assert service_pods(kubectl, namespace, "rootful") == []
    accepted = [c for c in refused["status"]["conditions"] if c["type"] == "Accepted"]
    assert accepted[0]["status"] == "True", accepted

    compliant = {"runAsNonRoot": True, "runAsUser": 1000}
    patch = json.dumps({"spec": {"container": {"securityContext": compliant}}})
    kubectl("patch", "ais", "rootful", "-n", namespace, "--type=merge", "-p", patch)

    wait_running(kubectl, namespace, "rootful", 1)


def test_a_host_path_pruned_for_a_lax_client_leaves_a_volume_that_is_refused(
    kubectl: Kubectl, namespace: str
) -> None:
    # Without strict field validation the API server drops the unknown hostPath (with a
    # warning) instead of refusing it; the volume is then of no kind, which its rule refuses.
    service = aiservice("lax")
    service["spec"]["volumes"] = [{"name": "root", "hostPath": {"path": "/"}}]

    result = kubectl.run(
        "apply", "--validate=false", "-n", namespace, "-f", "-",
        stdin=manifest(service), check=False,
    )  # fmt: skip

    assert result.returncode != 0, result.stdout
    assert "a volume needs exactly one of persistentVolumeClaim" in result.stderr, result.stderr
    assert get(kubectl, "ais", "-n", namespace, "lax") is None


def test_the_disruption_budget_follows_the_spec(
    kubectl: Kubectl, namespace: str, running_operator: OperatorProcess
) -> None:
    kubectl.apply(manifest(aiservice("budgeted", replicas=2, max_replicas=4)), namespace)

    def budget() -> dict[str, Any] | None:
        return get(kubectl, "pdb", "-n", namespace, "budgeted")

    def max_unavailable(expected: int) -> Callable[[], bool]:
        return lambda: (budget() or {}).get("spec", {}).get("maxUnavailable") == expected

    wait_until(max_unavailable(1), what="the budget of a service of up to 4 replicas")
    selector = (budget() or {})["spec"]["selector"]["matchLabels"]
    assert selector == {"gpuyard.io/service": "budgeted", "app.kubernetes.io/instance": "budgeted"}

    def change(spec: dict[str, Any]) -> None:
        patch = json.dumps({"spec": spec})
        kubectl("patch", "ais", "budgeted", "-n", namespace, "--type=merge", "-p", patch)

    change({"disruptionBudget": {"maxUnavailable": 2}})
    wait_until(max_unavailable(2), what="the budget to follow maxUnavailable")
    change({"disruptionBudget": {"enabled": False}})
    wait_until(lambda: budget() is None, what="the budget to go when turned off")
    change({"disruptionBudget": {"enabled": True}, "replicas": 1, "maxReplicas": 1})
    wait_running(kubectl, namespace, "budgeted", 1)
    assert budget() is None
