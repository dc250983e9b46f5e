"""The pydantic models of both kinds: defaults, bounds, patterns and cross-field rules."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import kopf
import pytest
from pydantic import ValidationError
from sample_objects import make_pool, make_service, pool_spec, service_spec

from gpuyard.api.common import ApiModel
from gpuyard.api.formats import parse_decimal
from gpuyard.api.pool import GPUPool, GPUPoolSpec
from gpuyard.api.service import AIService, AIServiceSpec

PROMETHEUS_METRIC = {
    "type": "Prometheus",
    "prometheus": {"metric": "vllm:num_requests_waiting", "targetPerReplica": "8"},
}
GPU_METRIC = {"type": "GPUUtilization", "targetPercent": 70}


def test_minimal_service_spec_gets_every_default() -> None:
    spec = AIServiceSpec.model_validate(service_spec())

    assert spec.to_json() == {
        "pool": "a100",
        "gpusPerReplica": 1,
        "container": {"image": "vllm/vllm-openai:v0.6.3"},
        "minReplicas": 1,
        "maxReplicas": 1,
        "autoscaling": {
            "mode": "Auto",
            "tolerancePercent": 10,
            "scaleUp": {
                "stabilizationWindowSeconds": 0,
                "maxStepPercent": 100,
                "maxStepReplicas": 4,
                "periodSeconds": 15,
            },
            "scaleDown": {
                "stabilizationWindowSeconds": 300,
                "maxStepPercent": 100,
                "maxStepReplicas": 4,
                "periodSeconds": 15,
            },
            "scaleToZeroAfterSeconds": 300,
            "onMetricsUnavailable": {"policy": "Hold"},
        },
        "automountServiceAccountToken": False,
        "disruptionBudget": {"enabled": True, "maxUnavailable": 1},
    }


def test_minimal_pool_spec_gets_every_default() -> None:
    spec = GPUPoolSpec.model_validate(pool_spec())

    assert spec.to_json() == {
        "gpuType": "a100-80gb",
        "resourceName": "nvidia.com/gpu",
        "nodeSelector": {"gpuyard.io/pool": "a100"},
        "price": {"perGpuHour": "2.50", "currency": "USD"},
        "utilizationMetric": "DCGM_FI_DEV_GPU_UTIL",
    }


def test_full_service_spec_round_trips() -> None:
    full = service_spec(
        gpusPerReplica=2,
        container={
            "image": "registry.example.com:5000/ml/llama@sha256:" + "a" * 64,
            "command": ["python", "-m", "vllm.entrypoints.openai.api_server"],
            "args": ["--model", "meta-llama/Llama-3-8B"],
            "env": [{"name": "HF_HOME", "value": "/cache"}, {"name": "EMPTY", "value": ""}],
            "port": 8000,
            "resources": {"cpu": "8", "memory": "64Gi"},
            "readinessProbe": {
                "httpGet": {"path": "/health", "port": 8000},
                "initialDelaySeconds": 30,
                "periodSeconds": 5,
                "failureThreshold": 6,
            },
        },
        minReplicas=0,
        maxReplicas=8,
        replicas=2,
        autoscaling={
            "mode": "Recommend",
            "tolerancePercent": 5,
            "metrics": [
                GPU_METRIC,
                {"type": "GPUMemory", "targetPercent": 80},
                {
                    "type": "Prometheus",
                    "prometheus": {
                        "metric": "vllm:num_requests_waiting",
                        "labels": {"model_name": "llama"},
                        "aggregation": "max",
                        "targetPerReplica": "8.5",
                        "activationValue": "0.5",
                    },
                },
            ],
            "scaleUp": {"stabilizationWindowSeconds": 10, "maxStepReplicas": 2},
            "scaleDown": {"periodSeconds": 60},
            "scaleToZeroAfterSeconds": 600,
            "onMetricsUnavailable": {"policy": "Fallback", "fallbackReplicas": 2},
        },
        budget={"maxCostPerHour": "40"},
    )

    spec = AIServiceSpec.model_validate(full)

    assert AIServiceSpec.model_validate(spec.to_json()) == spec
    assert spec.autoscaling.scale_down.stabilization_window_seconds == 300
    assert spec.autoscaling.scale_up.max_step_percent == 100


@pytest.mark.parametrize(
    "spec",
    [
        pytest.param(service_spec(minReplicas=3, maxReplicas=3), id="fixed-size-needs-no-metric"),
        pytest.param(
            service_spec(minReplicas=0, maxReplicas=2, autoscaling={"mode": "Off"}),
            id="off-needs-no-metric",
        ),
        pytest.param(
            service_spec(
                minReplicas=0, maxReplicas=2, autoscaling={"metrics": [PROMETHEUS_METRIC]}
            ),
            id="zero-with-prometheus-wakes",
        ),
        pytest.param(
            service_spec(
                minReplicas=0,
                maxReplicas=2,
                autoscaling={"mode": "Recommend", "metrics": [GPU_METRIC]},
            ),
            id="zero-in-recommend-mode-with-gpu-metric",
        ),
        pytest.param(
            service_spec(
                container={"image": "x", "port": 80, "readinessProbe": {"httpGet": {}}},
            ),
            id="probe-port-from-container",
        ),
        pytest.param(
            service_spec(maxReplicas=3, autoscaling={"metrics": [GPU_METRIC]}, replicas=0),
            id="replicas-zero",
        ),
        pytest.param(
            service_spec(
                maxReplicas=3,
                autoscaling={
                    "metrics": [GPU_METRIC],
                    "onMetricsUnavailable": {"policy": "Fallback", "fallbackReplicas": 3},
                },
            ),
            id="fallback-at-max",
        ),
        pytest.param(service_spec(container={"image": "localhost:5000/a/b:c"}), id="registry-port"),
        pytest.param(service_spec(budget={"maxCostPerHour": "0.000001"}), id="tiny-budget"),
        pytest.param(
            # The toolkit reads exactly NVIDIA_*: other names that mention it are the tenant's.
            service_spec(
                container={
                    "image": "x",
                    "env": [
                        {"name": "nvidia_visible_devices"},
                        {"name": "MY_NVIDIA_VISIBLE_DEVICES"},
                        {"name": "NVIDIA"},
                        {"name": "CUDA_VISIBLE_DEVICES"},
                        {"name": "CUDA_VERSION_USED"},
                    ],
                }
            ),
            id="env-names-the-gpu-runtime-ignores",
        ),
    ],
)
def test_valid_service_specs(spec: dict[str, Any]) -> None:
    AIServiceSpec.model_validate(spec)


SERVICE_REJECTIONS = [
    ("missing-pool", service_spec(pool=None), "Field required"),
    ("pool-uppercase", service_spec(pool="A100"), "should match pattern"),
    ("pool-too-long", service_spec(pool="a" * 64), "at most 63 characters"),
    ("unknown-field", service_spec(gpus=1), "Extra inputs are not permitted"),
    ("gpus-zero", service_spec(gpusPerReplica=0), "greater than or equal to 1"),
    ("gpus-too-many", service_spec(gpusPerReplica=17), "less than or equal to 16"),
    ("gpus-as-float", service_spec(gpusPerReplica=1.5), "valid integer"),
    # Strict like the API server: no string or boolean stands in for a number.
    ("gpus-as-string", service_spec(gpusPerReplica="3"), "valid integer"),
    ("gpus-as-bool", service_spec(gpusPerReplica=True), "valid integer"),
    ("min-above-max", service_spec(minReplicas=2), "minReplicas must not exceed maxReplicas"),
    ("max-zero", service_spec(maxReplicas=0), "greater than or equal to 1"),
    ("replicas-too-many", service_spec(replicas=1001), "less than or equal to 1000"),
    ("bad-image", service_spec(container={"image": "Not An Image"}), "should match pattern"),
    ("empty-image", service_spec(container={"image": ""}), "at least 1 character"),
    ("image-too-long", service_spec(container={"image": "a" * 513}), "at most 512 characters"),
    (
        "too-many-args",
        service_spec(container={"image": "x", "args": ["a"] * 65}),
        "at most 64 items",
    ),
    (
        "env-duplicate",
        service_spec(container={"image": "x", "env": [{"name": "A"}, {"name": "A"}]}),
        "env names must be unique; repeated: A",
    ),
    (
        "env-bad-name",
        service_spec(container={"image": "x", "env": [{"name": "1A"}]}),
        "should match pattern",
    ),
    *[
        (
            f"env-read-by-the-gpu-runtime-{name}",
            service_spec(container={"image": "x", "env": [{"name": "A"}, {"name": name}]}),
            "env names starting with NVIDIA_ and CUDA_VERSION are reserved: the NVIDIA "
            "container toolkit reads them",
        )
        for name in (
            "NVIDIA_VISIBLE_DEVICES",
            "NVIDIA_DRIVER_CAPABILITIES",
            "NVIDIA_REQUIRE_CUDA",
            "NVIDIA_DISABLE_REQUIRE",
            "NVIDIA_MIG_CONFIG_DEVICES",
            "NVIDIA_MIG_MONITOR_DEVICES",
            "NVIDIA_IMEX_CHANNELS",
            "NVIDIA_",
            "CUDA_VERSION",
        )
    ],
    ("port-zero", service_spec(container={"image": "x", "port": 0}), "greater than or equal"),
    (
        "bad-cpu",
        service_spec(container={"image": "x", "resources": {"cpu": "lots"}}),
        "should match pattern",
    ),
    (
        "probe-without-port",
        service_spec(container={"image": "x", "readinessProbe": {"httpGet": {"path": "/"}}}),
        "a probe's httpGet.port or tcpSocket.port is required when the container has no port",
    ),
    (
        "startup-probe-tcp-without-port",
        service_spec(container={"image": "x", "startupProbe": {"tcpSocket": {}}}),
        "a probe's httpGet.port or tcpSocket.port is required",
    ),
    (
        "probe-with-two-handlers",
        service_spec(
            container={
                "image": "x",
                "port": 8000,
                "livenessProbe": {"httpGet": {"path": "/"}, "exec": {"command": ["true"]}},
            }
        ),
        "a probe needs exactly one of httpGet, tcpSocket and exec",
    ),
    (
        "probe-without-handler",
        service_spec(container={"image": "x", "port": 8000, "startupProbe": {}}),
        "a probe needs exactly one of httpGet, tcpSocket and exec",
    ),
    (
        "env-value-and-value-from",
        service_spec(
            container={
                "image": "x",
                "env": [
                    {
                        "name": "HF_TOKEN",
                        "value": "hf_x",
                        "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}},
                    }
                ],
            }
        ),
        "an env entry takes value or valueFrom, not both",
    ),
    (
        "env-value-from-two-sources",
        service_spec(
            container={
                "image": "x",
                "env": [
                    {
                        "name": "HF_TOKEN",
                        "valueFrom": {
                            "secretKeyRef": {"name": "hf", "key": "token"},
                            "configMapKeyRef": {"name": "hf", "key": "token"},
                        },
                    }
                ],
            }
        ),
        "valueFrom needs exactly one of secretKeyRef and configMapKeyRef",
    ),
    (
        "env-secret-of-another-namespace",
        service_spec(
            container={
                "image": "x",
                "env": [
                    {
                        "name": "HF_TOKEN",
                        "valueFrom": {
                            "secretKeyRef": {"name": "hf", "key": "token", "namespace": "other"}
                        },
                    }
                ],
            }
        ),
        "Extra inputs are not permitted",
    ),
    (
        "env-from-two-sources",
        service_spec(
            container={
                "image": "x",
                "envFrom": [
                    {"prefix": "APP_", "secretRef": {"name": "a"}, "configMapRef": {"name": "b"}}
                ],
            }
        ),
        "envFrom entries need exactly one of secretRef and configMapRef",
    ),
    *[
        (
            f"env-from-prefix-{prefix}",
            service_spec(
                container={
                    "image": "x",
                    "envFrom": [{"prefix": prefix, "configMapRef": {"name": "settings"}}],
                }
            ),
            "envFrom prefix must not let a key form a name starting with NVIDIA_",
        )
        for prefix in ("NVIDIA_", "NV", "NVIDIA_X_", "CUDA_", "C")
    ],
    (
        "env-from-without-prefix",
        service_spec(container={"image": "x", "envFrom": [{"configMapRef": {"name": "s"}}]}),
        "Field required",
    ),
    (
        "volume-of-two-kinds",
        service_spec(
            volumes=[{"name": "v", "emptyDir": {}, "secret": {"secretName": "s"}}],
        ),
        "a volume needs exactly one of persistentVolumeClaim, emptyDir, configMap, secret",
    ),
    (
        "volume-host-path",
        service_spec(volumes=[{"name": "root", "hostPath": {"path": "/"}}]),
        "Extra inputs are not permitted",
    ),
    (
        "volume-item-escapes",
        service_spec(
            volumes=[
                {
                    "name": "v",
                    "configMap": {"name": "c", "items": [{"key": "k", "path": "a/../../etc"}]},
                }
            ],
        ),
        "path may not contain a '..' segment",
    ),
    (
        "memory-volume-without-memory-limit",
        service_spec(volumes=[{"name": "shm", "emptyDir": {"medium": "Memory"}}]),
        "an emptyDir of medium Memory needs container.resources.memory",
    ),
    (
        "mount-of-unknown-volume",
        service_spec(
            container={"image": "x", "volumeMounts": [{"name": "cache", "mountPath": "/cache"}]}
        ),
        "every container.volumeMounts entry must name a volume of spec.volumes",
    ),
    (
        "mount-sub-path-escapes",
        service_spec(
            volumes=[{"name": "cache", "emptyDir": {}}],
            container={
                "image": "x",
                "volumeMounts": [{"name": "cache", "mountPath": "/c", "subPath": ".."}],
            },
        ),
        "subPath may not contain a '..' segment",
    ),
    (
        "mount-relative-path",
        service_spec(
            volumes=[{"name": "cache", "emptyDir": {}}],
            container={"image": "x", "volumeMounts": [{"name": "cache", "mountPath": "cache"}]},
        ),
        "should match pattern",
    ),
    (
        "mount-path-twice",
        service_spec(
            volumes=[{"name": "a", "emptyDir": {}}, {"name": "b", "emptyDir": {}}],
            container={
                "image": "x",
                "volumeMounts": [
                    {"name": "a", "mountPath": "/data"},
                    {"name": "b", "mountPath": "/data"},
                ],
            },
        ),
        "volumeMounts mount paths must be unique; repeated: /data",
    ),
    (
        "privileged",
        service_spec(container={"image": "x", "securityContext": {"privileged": True}}),
        "Extra inputs are not permitted",
    ),
    (
        "non-root-as-root",
        service_spec(
            container={"image": "x", "securityContext": {"runAsNonRoot": True, "runAsUser": 0}}
        ),
        "runAsNonRoot true contradicts runAsUser 0",
    ),
    (
        "seccomp-unconfined",
        service_spec(
            container={"image": "x", "securityContext": {"seccompProfile": {"type": "Unconfined"}}}
        ),
        "Input should be 'RuntimeDefault'",
    ),
    (
        "host-network",
        service_spec(hostNetwork=True),
        "Extra inputs are not permitted",
    ),
    *[
        (
            f"pod-{field}-reserved-{key}",
            service_spec(**{field: {key: "x"}}),
            f"{field} keys may not lie in the gpuyard.io, kubernetes.io, k8s.io domains",
        )
        for field in ("podLabels", "podAnnotations")
        for key in (
            "gpuyard.io/service",
            "app.kubernetes.io/name",
            "controller.kubernetes.io/pod-deletion-cost",
            "sim.gpuyard.io/x",
            "x.k8s.io/y",
        )
    ],
    (
        "disruption-budget-zero",
        service_spec(disruptionBudget={"maxUnavailable": 0}),
        "greater than or equal to 1",
    ),
    (
        "probe-relative-path",
        service_spec(
            container={"image": "x", "readinessProbe": {"httpGet": {"path": "health", "port": 1}}}
        ),
        "should match pattern",
    ),
    (
        "prometheus-type-without-block",
        service_spec(maxReplicas=2, autoscaling={"metrics": [{"type": "Prometheus"}]}),
        "prometheus is required when type is Prometheus",
    ),
    (
        "gpu-type-with-prometheus-block",
        service_spec(
            maxReplicas=2,
            autoscaling={
                "metrics": [{**GPU_METRIC, "prometheus": PROMETHEUS_METRIC["prometheus"]}]
            },
        ),
        "prometheus is required when type is Prometheus and not allowed otherwise",
    ),
    (
        "gpu-type-without-target",
        service_spec(maxReplicas=2, autoscaling={"metrics": [{"type": "GPUMemory"}]}),
        "targetPercent is required for types GPUUtilization and GPUMemory",
    ),
    (
        "prometheus-with-target-percent",
        service_spec(
            maxReplicas=2, autoscaling={"metrics": [{**PROMETHEUS_METRIC, "targetPercent": 50}]}
        ),
        "not allowed for Prometheus",
    ),
    (
        "target-percent-zero",
        service_spec(maxReplicas=2, autoscaling={"metrics": [{**GPU_METRIC, "targetPercent": 0}]}),
        "greater than or equal to 1",
    ),
    (
        "target-per-replica-zero",
        service_spec(
            maxReplicas=2,
            autoscaling={
                "metrics": [
                    {"type": "Prometheus", "prometheus": {"metric": "m", "targetPerReplica": "0.0"}}
                ]
            },
        ),
        "targetPerReplica must be greater than zero",
    ),
    (
        "target-per-replica-float",
        service_spec(
            maxReplicas=2,
            autoscaling={
                "metrics": [
                    {"type": "Prometheus", "prometheus": {"metric": "m", "targetPerReplica": 2.5}}
                ]
            },
        ),
        "valid string",
    ),
    (
        "prometheus-namespace-label",
        service_spec(
            maxReplicas=2,
            autoscaling={
                "metrics": [
                    {
                        "type": "Prometheus",
                        "prometheus": {
                            "metric": "m",
                            "targetPerReplica": "1",
                            "labels": {"namespace": "other-team"},
                        },
                    }
                ]
            },
        ),
        "labels may not match namespace, exported_namespace, pod, exported_pod, service",
    ),
    (
        "prometheus-service-label",
        service_spec(
            maxReplicas=2,
            autoscaling={
                "metrics": [
                    {
                        "type": "Prometheus",
                        "prometheus": {
                            "metric": "m",
                            "targetPerReplica": "1",
                            "labels": {"service": "someone-elses"},
                        },
                    }
                ]
            },
        ),
        "(the operator scopes every query to the service itself)",
    ),
    (
        "prometheus-dunder-label",
        service_spec(
            maxReplicas=2,
            autoscaling={
                "metrics": [
                    {
                        "type": "Prometheus",
                        "prometheus": {
                            "metric": "m",
                            "targetPerReplica": "1",
                            "labels": {"__name__": "other_metric"},
                        },
                    }
                ]
            },
        ),
        "nor names starting with __",
    ),
    (
        "prometheus-bad-label-name",
        service_spec(
            maxReplicas=2,
            autoscaling={
                "metrics": [
                    {
                        "type": "Prometheus",
                        "prometheus": {
                            "metric": "m",
                            "targetPerReplica": "1",
                            "labels": {"model-name": "x"},
                        },
                    }
                ]
            },
        ),
        "should match pattern",
    ),
    (
        "prometheus-bad-metric-name",
        service_spec(
            maxReplicas=2,
            autoscaling={
                "metrics": [
                    {
                        "type": "Prometheus",
                        "prometheus": {"metric": "up{}", "targetPerReplica": "1"},
                    }
                ]
            },
        ),
        "should match pattern",
    ),
    (
        "gpu-utilization-twice",
        service_spec(maxReplicas=2, autoscaling={"metrics": [GPU_METRIC, GPU_METRIC]}),
        "metrics may hold each of GPUUtilization and GPUMemory at most once",
    ),
    (
        "too-many-metrics",
        service_spec(maxReplicas=2, autoscaling={"metrics": [PROMETHEUS_METRIC] * 9}),
        "at most 8 items",
    ),
    (
        "fallback-policy-without-replicas",
        service_spec(autoscaling={"onMetricsUnavailable": {"policy": "Fallback"}}),
        "fallbackReplicas is required when policy is Fallback",
    ),
    (
        "fallback-replicas-with-hold",
        service_spec(autoscaling={"onMetricsUnavailable": {"fallbackReplicas": 1}}),
        "fallbackReplicas is required when policy is Fallback and not allowed otherwise",
    ),
    (
        "fallback-above-max",
        service_spec(
            autoscaling={"onMetricsUnavailable": {"policy": "Fallback", "fallbackReplicas": 2}}
        ),
        "fallbackReplicas must lie between minReplicas and maxReplicas",
    ),
    (
        "scalable-without-metrics",
        service_spec(maxReplicas=4),
        "autoscaling.metrics needs at least one metric",
    ),
    (
        "zero-without-wake-up-metric",
        service_spec(minReplicas=0, maxReplicas=2, autoscaling={"metrics": [GPU_METRIC]}),
        "minReplicas 0 with mode Auto needs a Prometheus metric",
    ),
    ("bad-mode", service_spec(autoscaling={"mode": "Manual"}), "'Auto', 'Recommend' or 'Off'"),
    (
        "step-percent-too-big",
        service_spec(autoscaling={"scaleUp": {"maxStepPercent": 1001}}),
        "less than or equal to 1000",
    ),
    (
        "period-zero",
        service_spec(autoscaling={"scaleDown": {"periodSeconds": 0}}),
        "greater than or equal to 1",
    ),
    ("budget-as-float", service_spec(budget={"maxCostPerHour": 12.5}), "valid string"),
    (
        "budget-too-precise",
        service_spec(budget={"maxCostPerHour": "1.1234567"}),
        "should match pattern",
    ),
    ("budget-negative", service_spec(budget={"maxCostPerHour": "-1"}), "should match pattern"),
]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [pytest.param(spec, expected, id=case) for case, spec, expected in SERVICE_REJECTIONS],
)
def test_invalid_service_specs_are_refused_with_a_clear_message(
    spec: dict[str, Any], expected: str
) -> None:
    with pytest.raises(ValidationError) as refused:
        AIServiceSpec.model_validate(spec)
    assert expected in str(refused.value)


POOL_REJECTIONS = [
    ("missing-price", pool_spec(price=None), "Field required"),
    ("empty-node-selector", {**pool_spec(), "nodeSelector": {}}, "at least 1 item"),
    ("bad-node-selector-key", pool_spec(nodeSelector={"bad key": "x"}), "should match pattern"),
    ("bad-node-selector-value", pool_spec(nodeSelector={"k": "-x"}), "should match pattern"),
    ("gpu-type-uppercase", pool_spec(gpuType="A100"), "should match pattern"),
    ("resource-without-domain", pool_spec(resourceName="gpu"), "should match pattern"),
    (
        "resource-in-kubernetes-io",
        pool_spec(resourceName="kubernetes.io/gpu"),
        "resourceName must be an extended resource outside the kubernetes.io domain",
    ),
    (
        "resource-in-kubernetes-io-subdomain",
        pool_spec(resourceName="node.kubernetes.io/gpu"),
        "outside the kubernetes.io domain",
    ),
    ("price-as-float", pool_spec(price={"perGpuHour": 2.5}), "valid string"),
    ("price-exponent", pool_spec(price={"perGpuHour": "1e3"}), "should match pattern"),
    ("price-ten-digits", pool_spec(price={"perGpuHour": "1234567890"}), "should match pattern"),
    ("currency-lowercase", pool_spec(price={"currency": "usd"}), "should match pattern"),
    (
        "toleration-exists-with-value",
        pool_spec(tolerations=[{"key": "k", "operator": "Exists", "value": "v"}]),
        "value must be empty when operator is Exists",
    ),
    (
        "toleration-equal-without-key",
        pool_spec(tolerations=[{"value": "v"}]),
        "key is required when operator is Equal",
    ),
    (
        "toleration-seconds-without-no-execute",
        pool_spec(tolerations=[{"key": "k", "effect": "NoSchedule", "tolerationSeconds": 5}]),
        "tolerationSeconds only applies to effect NoExecute",
    ),
    (
        "toleration-bad-effect",
        pool_spec(tolerations=[{"key": "k", "effect": "Sometimes"}]),
        "'NoSchedule', 'PreferNoSchedule' or 'NoExecute'",
    ),
    (
        "selector-in-without-values",
        pool_spec(namespaceSelector={"matchExpressions": [{"key": "team", "operator": "In"}]}),
        "values must be non-empty for operators In and NotIn",
    ),
    (
        "selector-exists-with-values",
        pool_spec(
            namespaceSelector={
                "matchExpressions": [{"key": "team", "operator": "Exists", "values": ["a"]}]
            }
        ),
        "and empty for Exists and DoesNotExist",
    ),
    ("negative-quota", pool_spec(maxGpusPerNamespace=-1), "greater than or equal to 0"),
    ("bad-utilization-metric", pool_spec(utilizationMetric="GPU_UTIL"), "DCGM_FI_DEV_GPU_UTIL"),
    (
        "too-many-tolerations",
        pool_spec(tolerations=[{"operator": "Exists"}] * 17),
        "at most 16 items",
    ),
    (
        "device-selector-with-extended-resource",
        pool_spec(
            devices={
                "deviceClassName": "gpu.nvidia.com",
                "request": "ExtendedResource",
                "selector": {"attributes": {"productName": "NVIDIA H100"}},
            }
        ),
        "devices.selector needs request ClaimTemplate",
    ),
]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [pytest.param(spec, expected, id=case) for case, spec, expected in POOL_REJECTIONS],
)
def test_invalid_pool_specs_are_refused_with_a_clear_message(
    spec: dict[str, Any], expected: str
) -> None:
    with pytest.raises(ValidationError) as refused:
        GPUPoolSpec.model_validate(spec)
    assert expected in str(refused.value)


def _all_api_models() -> list[type[ApiModel]]:
    found: list[type[ApiModel]] = []
    pending = list(ApiModel.__subclasses__())
    while pending:
        model = pending.pop()
        pending.extend(model.__subclasses__())
        if model.__module__.startswith("gpuyard."):  # not the tests' own small models
            found.append(model)
    return found


def test_every_cross_field_rule_has_a_rejection_case() -> None:
    # Each CEL rule has a Python twin; a rule that no case above breaks could be wrong in
    # both without anyone noticing.
    fragments = [expected for _, _, expected in [*SERVICE_REJECTIONS, *POOL_REJECTIONS]]
    messages = {rule.message for model in _all_api_models() for rule in model.cel_rules}

    untested = sorted(m for m in messages if not any(fragment in m for fragment in fragments))

    assert len(messages) >= 12
    assert untested == []


@pytest.mark.parametrize(
    ("name", "accepted"),
    [
        ("llama", True),
        ("llama-3-8b", True),
        ("a" * 63, True),
        ("a" * 64, False),
        ("3-llama", False),  # a Service name must start with a letter
        ("llama.v3", False),
        ("Llama", False),
        ("llama-", False),
    ],
)
def test_service_names_must_fit_a_service_name(name: str, accepted: bool) -> None:
    if accepted:
        assert make_service(name=name).name == name
    else:
        with pytest.raises(ValidationError):
            make_service(name=name)


@pytest.mark.parametrize(
    ("name", "accepted"),
    [("a100", True), ("3090", True), ("a" * 63, True), ("a" * 64, False), ("a100.east", False)],
)
def test_pool_names_must_fit_a_label_value(name: str, accepted: bool) -> None:
    if accepted:
        assert make_pool(name=name).name == name
    else:
        with pytest.raises(ValidationError):
            make_pool(name=name)


def test_whole_objects_ignore_server_metadata_but_not_unknown_spec_fields() -> None:
    body = {
        "apiVersion": "gpuyard.io/v1alpha1",
        "kind": "AIService",
        "metadata": {
            "name": "llama",
            "namespace": "team-a",
            "uid": "u",
            "resourceVersion": "42",
            "managedFields": [{"manager": "kubectl"}],
        },
        "spec": service_spec(),
        "status": {"anything": "goes"},
    }
    service = AIService.model_validate(body)
    assert (service.name, service.namespace, service.metadata.uid) == ("llama", "team-a", "u")

    with pytest.raises(ValidationError):
        AIService.model_validate({**body, "spec": service_spec(surprise=True)})
    with pytest.raises(ValidationError):
        GPUPool.model_validate({"metadata": {"name": "a100"}, "spec": pool_spec(), "kind": "Pod"})


def test_decimal_helpers_are_exact() -> None:
    pool = make_pool(pool_spec(price={"perGpuHour": "0.1"}))
    spec = AIServiceSpec.model_validate(
        service_spec(
            maxReplicas=2,
            autoscaling={
                "metrics": [
                    {
                        "type": "Prometheus",
                        "prometheus": {
                            "metric": "m",
                            "targetPerReplica": "0.3",
                            "activationValue": "0.000001",
                        },
                    }
                ]
            },
            budget={"maxCostPerHour": "999999999.999999"},
        )
    )
    prometheus = (spec.autoscaling.metrics or [])[0].prometheus
    assert prometheus is not None

    assert pool.spec.price.per_gpu_hour_decimal * 3 == Decimal("0.3")
    assert prometheus.target_per_replica_decimal == Decimal("0.3")
    assert prometheus.activation_value_decimal == Decimal("0.000001")
    assert spec.budget is not None
    assert spec.budget.max_cost_per_hour_decimal == Decimal("999999999.999999")
    assert parse_decimal("007.50") == Decimal("7.5")


def test_kopf_views_validate_through_from_mapping() -> None:
    # Kopf hands handlers read-only mapping views; strict validation wants dicts.
    body = kopf.Body(
        {
            "apiVersion": "gpuyard.io/v1alpha1",
            "kind": "AIService",
            "metadata": {"name": "llama", "namespace": "team-a", "uid": "u"},
            "spec": service_spec(container={"env": [{"name": "A", "value": "1"}]}),
        }
    )
    with pytest.raises(ValidationError):
        AIServiceSpec.model_validate(body.spec)

    assert AIServiceSpec.from_mapping(body.spec) == AIService.from_mapping(body).spec
    assert (
        GPUPool.from_mapping(kopf.Body({"metadata": {"name": "a100"}, "spec": pool_spec()})).name
        == "a100"
    )
