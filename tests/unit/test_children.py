"""The Deployment and Service an AIService owns, checked by their dict output."""

from __future__ import annotations

from typing import Any

import pytest
from sample_objects import SERVICE_UID, make_pool, make_service, pool_spec, service_spec

from gpuyard.logic.children import (
    build_deployment,
    build_disruption_budget,
    build_service,
    child_labels,
    owner_reference,
    selector_labels,
    selector_string,
)

OWNER = {
    "apiVersion": "gpuyard.io/v1alpha1",
    "kind": "AIService",
    "name": "llama",
    "uid": SERVICE_UID,
    "controller": True,
    "blockOwnerDeletion": True,
}
LABELS = {
    "app.kubernetes.io/name": "llama",
    "app.kubernetes.io/instance": "llama",
    "app.kubernetes.io/component": "inference",
    "app.kubernetes.io/managed-by": "gpuyard",
    "gpuyard.io/service": "llama",
    "gpuyard.io/pool": "a100",
}
SELECTOR = {"gpuyard.io/service": "llama", "app.kubernetes.io/instance": "llama"}


def deployment_for(
    spec: dict[str, Any], pool: dict[str, Any] | None = None, replicas: int = 1
) -> dict[str, Any]:
    service = make_service(spec)
    return build_deployment(service, make_pool(pool), replicas, owner_reference(service))


def pod_spec(deployment: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = deployment["spec"]["template"]["spec"]
    return spec


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    [only] = pod_spec(deployment)["containers"]
    result: dict[str, Any] = only
    return result


def test_minimal_deployment() -> None:
    assert deployment_for(service_spec(), replicas=2) == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": "llama",
            "namespace": "team-a",
            "labels": LABELS,
            "ownerReferences": [OWNER],
        },
        "spec": {
            "replicas": 2,
            "revisionHistoryLimit": 3,
            "selector": {"matchLabels": SELECTOR},
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1},
            },
            "template": {
                "metadata": {"labels": LABELS},
                "spec": {
                    "containers": [
                        {
                            "name": "inference",
                            "image": "vllm/vllm-openai:v0.6.3",
                            "resources": {
                                "limits": {"nvidia.com/gpu": "1"},
                                "requests": {"nvidia.com/gpu": "1"},
                            },
                            "securityContext": {
                                "allowPrivilegeEscalation": False,
                                "capabilities": {"drop": ["ALL"]},
                            },
                            "terminationMessagePolicy": "FallbackToLogsOnError",
                        }
                    ],
                    "nodeSelector": {"gpuyard.io/pool": "a100"},
                    "automountServiceAccountToken": False,
                    "enableServiceLinks": False,
                    "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
                },
            },
        },
    }


@pytest.mark.parametrize(
    ("spec", "pool", "expected_resources"),
    [
        pytest.param(
            service_spec(gpusPerReplica=4),
            None,
            {"nvidia.com/gpu": "4"},
            id="gpus-only",
        ),
        pytest.param(
            service_spec(container={"resources": {"cpu": "8", "memory": "64Gi"}}),
            None,
            {"nvidia.com/gpu": "1", "cpu": "8", "memory": "64Gi"},
            id="cpu-and-memory",
        ),
        pytest.param(
            service_spec(container={"resources": {"memory": "500Mi"}}),
            None,
            {"nvidia.com/gpu": "1", "memory": "500Mi"},
            id="memory-only",
        ),
        pytest.param(
            service_spec(gpusPerReplica=2),
            pool_spec(resourceName="nvidia.com/mig-1g.10gb"),
            {"nvidia.com/mig-1g.10gb": "2"},
            id="mig-resource",
        ),
    ],
)
def test_requests_equal_limits(
    spec: dict[str, Any], pool: dict[str, Any] | None, expected_resources: dict[str, str]
) -> None:
    resources = container(deployment_for(spec, pool))["resources"]

    assert resources == {"limits": expected_resources, "requests": expected_resources}


def test_container_block_is_carried_over() -> None:
    spec = service_spec(
        container={
            "command": ["python", "-m", "server"],
            "args": ["--port", "8000"],
            "env": [{"name": "HF_HOME", "value": "/cache"}, {"name": "EMPTY"}],
            "port": 8000,
            "readinessProbe": {
                "httpGet": {"path": "/health"},
                "initialDelaySeconds": 20,
                "periodSeconds": 5,
                "failureThreshold": 12,
            },
        }
    )

    built = container(deployment_for(spec))

    assert built["command"] == ["python", "-m", "server"]
    assert built["args"] == ["--port", "8000"]
    assert built["env"] == [{"name": "HF_HOME", "value": "/cache"}, {"name": "EMPTY"}]
    assert built["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    assert built["readinessProbe"] == {
        "httpGet": {"path": "/health", "port": 8000},
        "initialDelaySeconds": 20,
        "periodSeconds": 5,
        "timeoutSeconds": 1,
        "failureThreshold": 12,
    }


def test_probe_port_of_its_own_wins_over_the_container_port() -> None:
    spec = service_spec(
        container={"port": 8000, "readinessProbe": {"httpGet": {"path": "/ready", "port": 9000}}}
    )

    assert container(deployment_for(spec))["readinessProbe"]["httpGet"] == {
        "path": "/ready",
        "port": 9000,
    }


def test_absent_optional_container_fields_are_not_set() -> None:
    # Server-side apply would otherwise claim ownership of empty fields.
    built = container(deployment_for(service_spec()))

    assert not {"command", "args", "env", "ports", "readinessProbe"} & built.keys()
    assert "tolerations" not in pod_spec(deployment_for(service_spec()))


def test_pool_placement_goes_to_the_pod() -> None:
    pool = pool_spec(
        nodeSelector={"gpuyard.io/pool": "a100", "topology.kubernetes.io/zone": "eu-1"},
        tolerations=[
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
            {"key": "spot", "value": "true", "effect": "NoExecute", "tolerationSeconds": 30},
        ],
    )

    pod = pod_spec(deployment_for(service_spec(), pool))

    assert pod["nodeSelector"] == {
        "gpuyard.io/pool": "a100",
        "topology.kubernetes.io/zone": "eu-1",
    }
    assert pod["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
        {
            "key": "spot",
            "operator": "Equal",
            "value": "true",
            "effect": "NoExecute",
            "tolerationSeconds": 30,
        },
    ]


@pytest.mark.parametrize("replicas", [0, 1, 1000])
def test_replicas_are_taken_as_given(replicas: int) -> None:
    assert deployment_for(service_spec(), replicas=replicas)["spec"]["replicas"] == replicas


def test_negative_replicas_are_a_bug() -> None:
    with pytest.raises(ValueError, match="must not be negative"):
        deployment_for(service_spec(), replicas=-1)


def test_owner_reference_needs_a_uid() -> None:
    with pytest.raises(ValueError, match="has no uid"):
        owner_reference(make_service(uid=None))


def test_selector_is_stable_and_a_subset_of_the_pod_labels() -> None:
    service = make_service()
    pool = make_pool()
    other_pool = make_pool(name="h100")

    assert selector_labels(service).items() <= child_labels(service, pool).items()
    # Moving the service to another pool changes labels but never the immutable selector.
    deployment = build_deployment(service, other_pool, 1, owner_reference(service))
    assert deployment["spec"]["selector"]["matchLabels"] == SELECTOR
    assert deployment["spec"]["template"]["metadata"]["labels"]["gpuyard.io/pool"] == "h100"
    assert selector_string(service) == "app.kubernetes.io/instance=llama,gpuyard.io/service=llama"


def test_service_for_a_container_with_a_port() -> None:
    service = make_service(service_spec(container={"port": 8000}))

    assert build_service(service, make_pool(), owner_reference(service)) == {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": "llama",
            "namespace": "team-a",
            "labels": LABELS,
            "ownerReferences": [OWNER],
        },
        "spec": {
            "type": "ClusterIP",
            "selector": SELECTOR,
            "ports": [{"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def test_no_service_without_a_port() -> None:
    service = make_service()

    assert build_service(service, make_pool(), owner_reference(service)) is None


def test_builders_do_not_share_mutable_state() -> None:
    service = make_service()
    pool = make_pool()
    first = build_deployment(service, pool, 1, owner_reference(service))
    first["metadata"]["labels"]["tampered"] = "yes"
    pod_spec(first)["nodeSelector"]["tampered"] = "yes"
    container(first)["resources"]["limits"]["cpu"] = "1"

    second = build_deployment(service, pool, 1, owner_reference(service))

    assert "tampered" not in second["metadata"]["labels"]
    assert "tampered" not in pod_spec(second)["nodeSelector"]
    assert "cpu" not in container(second)["resources"]["requests"]
    assert "tampered" not in pool.spec.node_selector


# --- the pod surface of a real inference server --------------------------------------------

SERVER = service_spec(
    container={
        "port": 8000,
        "env": [
            {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}},
            {
                "name": "MODEL",
                "valueFrom": {"configMapKeyRef": {"name": "model", "key": "id", "optional": True}},
            },
        ],
        "envFrom": [{"prefix": "APP_", "configMapRef": {"name": "settings"}}],
        "resources": {"cpu": "8", "memory": "64Gi", "ephemeral-storage": "50Gi"},
        "startupProbe": {
            "httpGet": {"path": "/health"},
            "periodSeconds": 10,
            "failureThreshold": 60,
        },
        "livenessProbe": {"tcpSocket": {}, "periodSeconds": 20},
        "readinessProbe": {"exec": {"command": ["/bin/ready"]}},
        "volumeMounts": [
            {"name": "cache", "mountPath": "/root/.cache/huggingface"},
            {"name": "shm", "mountPath": "/dev/shm"},
        ],
        "securityContext": {
            "runAsUser": 1000,
            "runAsGroup": 1000,
            "runAsNonRoot": True,
            "fsGroup": 1000,
            "readOnlyRootFilesystem": True,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    },
    volumes=[
        {"name": "cache", "persistentVolumeClaim": {"claimName": "model-cache"}},
        {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}},
    ],
    imagePullSecrets=[{"name": "registry"}],
    serviceAccountName="inference",
    terminationGracePeriodSeconds=120,
    priorityClassName="inference-high",
    podLabels={"team": "search", "app": "llama"},
    podAnnotations={"example.com/owner": "search"},
)


def test_a_real_servers_container_carries_its_surface() -> None:
    built = container(deployment_for(SERVER))

    assert built["env"] == [
        {
            "name": "HF_TOKEN",
            "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token", "optional": False}},
        },
        {
            "name": "MODEL",
            "valueFrom": {"configMapKeyRef": {"name": "model", "key": "id", "optional": True}},
        },
    ]
    assert built["envFrom"] == [
        {"prefix": "APP_", "configMapRef": {"name": "settings", "optional": False}}
    ]
    assert built["resources"]["limits"] == {
        "nvidia.com/gpu": "1",
        "cpu": "8",
        "memory": "64Gi",
        "ephemeral-storage": "50Gi",
    }
    assert built["startupProbe"] == {
        "httpGet": {"path": "/health", "port": 8000},
        "initialDelaySeconds": 0,
        "periodSeconds": 10,
        "timeoutSeconds": 1,
        "failureThreshold": 60,
    }
    assert built["livenessProbe"]["tcpSocket"] == {"port": 8000}
    assert built["readinessProbe"]["exec"] == {"command": ["/bin/ready"]}
    assert built["volumeMounts"] == [
        {"name": "cache", "mountPath": "/root/.cache/huggingface", "readOnly": False},
        {"name": "shm", "mountPath": "/dev/shm", "readOnly": False},
    ]
    assert built["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "runAsUser": 1000,
        "runAsGroup": 1000,
        "runAsNonRoot": True,
        "readOnlyRootFilesystem": True,
    }


def test_a_real_servers_pod_carries_its_surface() -> None:
    deployment = deployment_for(SERVER)
    pod = pod_spec(deployment)

    assert pod["volumes"] == [
        {"name": "cache", "persistentVolumeClaim": {"claimName": "model-cache", "readOnly": False}},
        {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}},
    ]
    assert pod["imagePullSecrets"] == [{"name": "registry"}]
    assert pod["serviceAccountName"] == "inference"
    assert pod["automountServiceAccountToken"] is False
    assert pod["terminationGracePeriodSeconds"] == 120
    assert pod["priorityClassName"] == "inference-high"
    assert pod["securityContext"] == {"seccompProfile": {"type": "RuntimeDefault"}, "fsGroup": 1000}
    metadata = deployment["spec"]["template"]["metadata"]
    assert metadata["labels"] == {**LABELS, "team": "search", "app": "llama"}
    assert metadata["annotations"] == {"example.com/owner": "search"}


def test_the_token_is_mounted_only_when_asked() -> None:
    asked = service_spec(serviceAccountName="reader", automountServiceAccountToken=True)

    assert pod_spec(deployment_for(asked))["automountServiceAccountToken"] is True
    assert pod_spec(deployment_for(service_spec()))["automountServiceAccountToken"] is False


def test_a_per_replica_claim_is_built_from_its_template() -> None:
    claim = {
        "volumeClaimTemplate": {
            "spec": {
                "accessModes": ["ReadWriteOnce"],
                "storageClassName": "local-nvme",
                "resources": {"requests": {"storage": "200Gi"}},
            }
        }
    }
    spec = service_spec(volumes=[{"name": "scratch", "ephemeral": claim}])

    assert pod_spec(deployment_for(spec))["volumes"] == [{"name": "scratch", "ephemeral": claim}]


def test_a_budget_keeps_replicas_of_a_service_that_can_grow() -> None:
    service = make_service(
        service_spec(
            maxReplicas=4, autoscaling={"mode": "Off"}, disruptionBudget={"maxUnavailable": 2}
        )
    )

    budget = build_disruption_budget(service, make_pool(), owner_reference(service))

    assert budget is not None
    assert budget["metadata"] == {
        "name": "llama",
        "namespace": "team-a",
        "labels": LABELS,
        "ownerReferences": [OWNER],
    }
    assert budget["spec"] == {
        "maxUnavailable": 2,
        "selector": {"matchLabels": SELECTOR},
        "unhealthyPodEvictionPolicy": "AlwaysAllow",
    }


@pytest.mark.parametrize(
    "spec",
    [
        service_spec(maxReplicas=1),
        service_spec(
            maxReplicas=4, autoscaling={"mode": "Off"}, disruptionBudget={"enabled": False}
        ),
    ],
    ids=["one-replica", "turned-off"],
)
def test_no_budget_for_one_replica_or_when_turned_off(spec: dict[str, Any]) -> None:
    service = make_service(spec)

    assert build_disruption_budget(service, make_pool(), owner_reference(service)) is None
