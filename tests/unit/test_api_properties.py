"""Property tests: random specs against the models and the builders.

Whatever a tenant writes, the operator either refuses it with a pydantic ValidationError or
builds children the API server will take: names and label values within 63 characters, and
label keys of the right shape. The label rules here are restated from the Kubernetes API
conventions on purpose, independent of the patterns in `gpuyard.api.common`.
"""

from __future__ import annotations

import re
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from gpuyard.api.pool import GPUPool, GPUPoolSpec
from gpuyard.api.service import AIService, AIServiceSpec
from gpuyard.logic.children import build_deployment, build_service, owner_reference

PROPERTY_SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

_LABEL_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_DNS_1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")


def is_label_value(value: str) -> bool:
    return len(value) <= 63 and (value == "" or _LABEL_NAME.fullmatch(value) is not None)


def is_label_key(key: str) -> bool:
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not _DNS_SUBDOMAIN.fullmatch(prefix)):
        return False
    return 0 < len(name) <= 63 and _LABEL_NAME.fullmatch(name) is not None


def assert_labels_valid(labels: dict[str, str]) -> None:
    for key, value in labels.items():
        assert is_label_key(key), key
        assert is_label_value(value), (key, value)


# --- Strategies: mostly well-formed, often not --------------------------------------------

dns_labels = st.from_regex(r"\A[a-z]([-a-z0-9]{0,61}[a-z0-9])?\Z")
names = st.one_of(dns_labels, st.text(max_size=80))
label_keys = st.one_of(
    st.sampled_from(["gpuyard.io/pool", "node.kubernetes.io/instance-type", "zone", "a/b/c"]),
    st.from_regex(r"\A([a-z]{1,20}\.)?[a-z]{1,10}/[A-Za-z0-9][-A-Za-z0-9_.]{0,70}\Z"),
    st.text(max_size=20),
)
label_values = st.one_of(
    st.from_regex(r"\A[A-Za-z0-9]([-A-Za-z0-9_.]{0,70}[A-Za-z0-9])?\Z"), st.text(max_size=10)
)
decimals = st.one_of(
    st.from_regex(r"\A[0-9]{1,10}(\.[0-9]{1,7})?\Z"),
    st.sampled_from(["0", "0.0", "1e3", "-1", ""]),
    st.floats(allow_nan=True),
    st.integers(),
)
counts = st.integers(min_value=-2, max_value=1002)
images = st.one_of(
    st.sampled_from(
        [
            "vllm/vllm-openai:v0.6.3",
            "nvcr.io/nvidia/tritonserver:24.05-py3",
            "localhost:5000/m",
            "Bad Image",
        ]
    ),
    st.text(max_size=30),
)


def optional(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(st.none(), strategy)


def drop_none(strategy: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    return strategy.map(lambda d: {k: v for k, v in d.items() if v is not None})


prometheus_sources = drop_none(
    st.fixed_dictionaries(
        {
            "metric": st.one_of(st.just("vllm:num_requests_waiting"), st.text(max_size=12)),
            "labels": optional(
                st.dictionaries(
                    st.one_of(st.just("model"), st.text(max_size=8)),
                    st.text(max_size=8),
                    max_size=3,
                )
            ),
            "aggregation": optional(st.sampled_from(["sum", "avg", "max", "median"])),
            "targetPerReplica": decimals,
            "activationValue": optional(decimals),
        }
    )
)
metrics = drop_none(
    st.fixed_dictionaries(
        {
            "type": st.sampled_from(["GPUUtilization", "GPUMemory", "Prometheus", "CPU"]),
            "targetPercent": optional(st.integers(-1, 101)),
            "prometheus": optional(prometheus_sources),
        }
    )
)
scaling_rules = drop_none(
    st.fixed_dictionaries(
        {},
        optional={
            "stabilizationWindowSeconds": st.integers(-1, 3601),
            "maxStepPercent": st.integers(-1, 1001),
            "maxStepReplicas": counts,
            "periodSeconds": st.integers(0, 1801),
        },
    )
)
autoscaling = drop_none(
    st.fixed_dictionaries(
        {},
        optional={
            "mode": st.sampled_from(["Auto", "Recommend", "Off", "auto"]),
            "tolerancePercent": st.integers(-1, 101),
            "metrics": st.lists(metrics, max_size=3),
            "scaleUp": scaling_rules,
            "scaleDown": scaling_rules,
            "scaleToZeroAfterSeconds": st.integers(-1, 86401),
            "onMetricsUnavailable": drop_none(
                st.fixed_dictionaries(
                    {
                        "policy": st.sampled_from(["Hold", "ScaleUpOnly", "Fallback", "Panic"]),
                        "fallbackReplicas": optional(counts),
                    }
                )
            ),
        },
    )
)
containers = drop_none(
    st.fixed_dictionaries(
        {"image": images},
        optional={
            "command": st.lists(st.text(max_size=10), max_size=3),
            "args": st.lists(st.text(max_size=10), max_size=3),
            "env": st.lists(
                st.fixed_dictionaries(
                    {
                        "name": st.one_of(
                            st.sampled_from(["A", "B", "HF_HOME", "NVIDIA_VISIBLE_DEVICES"]),
                            st.text(max_size=5),
                        ),
                        "value": st.text(max_size=5),
                    }
                ),
                max_size=3,
            ),
            "port": st.integers(-1, 65536),
            "resources": st.fixed_dictionaries(
                {},
                optional={
                    "cpu": st.sampled_from(["4", "500m", "1.5", "lots"]),
                    "memory": st.sampled_from(["16Gi", "1e9", "512Mi"]),
                },
            ),
            "readinessProbe": st.fixed_dictionaries(
                {
                    "httpGet": st.fixed_dictionaries(
                        {},
                        optional={
                            "path": st.sampled_from(["/", "/health", "health"]),
                            "port": st.integers(0, 65536),
                        },
                    )
                },
                optional={"periodSeconds": st.integers(0, 301)},
            ),
            "securityContext": st.just({"privileged": True}),  # never allowed
        },
    )
)
service_specs = drop_none(
    st.fixed_dictionaries(
        {"pool": names, "container": containers},
        optional={
            "gpusPerReplica": st.integers(-1, 17),
            "minReplicas": counts,
            "maxReplicas": counts,
            "replicas": counts,
            "autoscaling": autoscaling,
            "budget": st.fixed_dictionaries({"maxCostPerHour": decimals}),
        },
    )
)
tolerations = drop_none(
    st.fixed_dictionaries(
        {},
        optional={
            "key": label_keys,
            "operator": st.sampled_from(["Exists", "Equal", "Gt"]),
            "value": label_values,
            "effect": st.sampled_from(["NoSchedule", "PreferNoSchedule", "NoExecute", "Always"]),
            "tolerationSeconds": st.integers(-1, 100),
        },
    )
)
pool_specs = drop_none(
    st.fixed_dictionaries(
        {
            "gpuType": names,
            "nodeSelector": st.dictionaries(label_keys, label_values, max_size=3),
            "price": st.fixed_dictionaries(
                {"perGpuHour": decimals},
                optional={"currency": st.sampled_from(["USD", "EUR", "usd"])},
            ),
        },
        optional={
            "resourceName": st.sampled_from(
                ["nvidia.com/gpu", "nvidia.com/mig-1g.10gb", "gpu", "kubernetes.io/gpu"]
            ),
            "tolerations": st.lists(tolerations, max_size=3),
            "maxGpusPerNamespace": st.integers(-1, 100),
        },
    )
)


# --- Plausible objects: valid by construction, at the edges of every bound ---------------

max_length_dns_1035 = st.from_regex(r"\A[a-z]([-a-z0-9]{0,61}[a-z0-9])?\Z")
max_length_dns_1123 = st.from_regex(r"\A[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\Z")
valid_label_keys = st.one_of(
    st.from_regex(r"\A[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?\Z"),
    st.from_regex(
        r"\A[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?(\.[a-z0-9]{1,63}){0,2}/"
        r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?\Z"
    ),
)
valid_label_values = st.from_regex(r"\A(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?\Z")
valid_images = st.one_of(
    st.sampled_from(["vllm/vllm-openai:v0.6.3", "localhost:5000/m@sha256:" + "0" * 64]),
    st.from_regex(r"\A[a-z0-9]{1,20}(/[a-z0-9]{1,20}){0,3}(:[A-Za-z0-9_][-A-Za-z0-9_.]{0,127})?\Z"),
)
wake_up_metric = {
    "type": "Prometheus",
    "prometheus": {"metric": "vllm:num_requests_waiting", "targetPerReplica": "4"},
}


@st.composite
def plausible_service_specs(draw: st.DrawFn) -> dict[str, Any]:
    min_replicas = draw(st.integers(0, 1000))
    max_replicas = draw(st.integers(max(1, min_replicas), 1000))
    port = draw(optional(st.integers(1, 65535)))
    container: dict[str, Any] = {"image": draw(valid_images)}
    if port is not None:
        container["port"] = port
        container["readinessProbe"] = {"httpGet": {"path": draw(st.sampled_from(["/", "/health"]))}}
    if draw(st.booleans()):
        container["resources"] = {"cpu": "4", "memory": "64Gi"}
    if draw(st.booleans()):
        container["env"] = [{"name": "HF_HOME", "value": draw(st.text(max_size=20))}]
    return {
        "pool": draw(max_length_dns_1123),
        "gpusPerReplica": draw(st.integers(1, 16)),
        "container": container,
        "minReplicas": min_replicas,
        "maxReplicas": max_replicas,
        "autoscaling": {
            "mode": draw(st.sampled_from(["Auto", "Recommend", "Off"])),
            "metrics": [wake_up_metric],
        },
    }


@st.composite
def plausible_pool_specs(draw: st.DrawFn) -> dict[str, Any]:
    return {
        "gpuType": draw(max_length_dns_1123),
        "resourceName": draw(
            st.sampled_from(["nvidia.com/gpu", "nvidia.com/mig-3g.40gb", "amd.com/gpu"])
        ),
        "nodeSelector": draw(
            st.dictionaries(valid_label_keys, valid_label_values, min_size=1, max_size=16)
        ),
        "tolerations": [
            {"key": draw(valid_label_keys), "operator": "Exists", "effect": "NoSchedule"}
        ],
        "price": {"perGpuHour": "2.5"},
    }


# --- Properties ---------------------------------------------------------------------------


def check_children(service: AIService, pool: GPUPool, replicas: int) -> None:
    """Everything the API server would check on the children that the models could miss."""
    owner = owner_reference(service)

    deployment = build_deployment(service, pool, replicas, owner)
    network_service = build_service(service, pool, owner)

    assert len(deployment["metadata"]["name"]) <= 63
    assert _DNS_1035.fullmatch(deployment["metadata"]["name"])
    assert_labels_valid(deployment["metadata"]["labels"])
    template = deployment["spec"]["template"]
    assert_labels_valid(template["metadata"]["labels"])
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert_labels_valid(selector)
    assert selector.items() <= template["metadata"]["labels"].items()
    assert_labels_valid(template["spec"]["nodeSelector"])
    for toleration in template["spec"].get("tolerations", []):
        assert "key" not in toleration or is_label_key(toleration["key"])
    [container] = template["spec"]["containers"]
    resources = container["resources"]
    assert resources["requests"] == resources["limits"]
    assert resources["limits"][pool.spec.resource_name] == str(service.spec.gpus_per_replica)
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    if network_service is None:
        assert service.spec.container.port is None
    else:
        assert network_service["metadata"]["name"] == deployment["metadata"]["name"]
        assert network_service["spec"]["selector"] == selector
        assert 1 <= network_service["spec"]["ports"][0]["port"] <= 65535


@PROPERTY_SETTINGS
@given(spec=service_specs)
def test_service_validation_only_ever_raises_validation_error(spec: dict[str, Any]) -> None:
    try:
        parsed = AIServiceSpec.model_validate(spec)
    except ValidationError:
        return
    assert AIServiceSpec.model_validate(parsed.to_json()) == parsed


@PROPERTY_SETTINGS
@given(spec=pool_specs)
def test_pool_validation_only_ever_raises_validation_error(spec: dict[str, Any]) -> None:
    try:
        parsed = GPUPoolSpec.model_validate(spec)
    except ValidationError:
        return
    assert_labels_valid(dict(parsed.node_selector))
    assert GPUPoolSpec.model_validate(parsed.to_json()) == parsed


@PROPERTY_SETTINGS
@given(
    service_name=names,
    namespace=names,
    service_spec=service_specs,
    pool_name=names,
    pool_spec=pool_specs,
    replicas=st.integers(0, 1000),
)
def test_whatever_the_models_accept_builds_valid_children(
    *,
    service_name: str,
    namespace: str,
    service_spec: dict[str, Any],
    pool_name: str,
    pool_spec: dict[str, Any],
    replicas: int,
) -> None:
    try:
        service = AIService.model_validate(
            {
                "metadata": {"name": service_name, "namespace": namespace, "uid": "u"},
                "spec": service_spec,
            }
        )
        pool = GPUPool.model_validate({"metadata": {"name": pool_name}, "spec": pool_spec})
    except ValidationError:
        return
    check_children(service, pool, replicas)


@PROPERTY_SETTINGS
@given(
    service_name=max_length_dns_1035,
    namespace=max_length_dns_1123,
    service_spec=plausible_service_specs(),
    pool_name=max_length_dns_1123,
    pool_spec=plausible_pool_specs(),
    replicas=st.integers(0, 1000),
)
def test_plausible_objects_at_every_bound_are_accepted_and_build_valid_children(
    *,
    service_name: str,
    namespace: str,
    service_spec: dict[str, Any],
    pool_name: str,
    pool_spec: dict[str, Any],
    replicas: int,
) -> None:
    service = AIService.model_validate(
        {
            "metadata": {"name": service_name, "namespace": namespace, "uid": "u"},
            "spec": service_spec,
        }
    )
    pool = GPUPool.model_validate({"metadata": {"name": pool_name}, "spec": pool_spec})

    check_children(service, pool, replicas)
