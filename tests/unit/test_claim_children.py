"""The ResourceClaimTemplate of a service on a DRA pool, and the pod template that uses it."""

from __future__ import annotations

from typing import Any

from sample_objects import SERVICE_UID, make_pool, make_service, pool_spec, service_spec

from gpuyard.logic.children import (
    CLAIM_NAME,
    build_claim_template,
    build_deployment,
    claim_template_name,
    owner_reference,
    stale_claim_templates,
)

CLAIM_POOL = pool_spec(
    devices={
        "deviceClassName": "gpu.nvidia.com",
        "selector": {"attributes": {"productName": "NVIDIA H100 80GB HBM3"}},
    }
)
EXTENDED_POOL = pool_spec(
    devices={"deviceClassName": "gpu.nvidia.com", "request": "ExtendedResource"}
)


def _template(gpus: int = 2, pool: dict[str, Any] = CLAIM_POOL) -> dict[str, Any] | None:
    service = make_service(service_spec(gpusPerReplica=gpus))
    return build_claim_template(service, make_pool(pool), owner_reference(service))


def _pod(gpus: int = 2, pool: dict[str, Any] = CLAIM_POOL) -> dict[str, Any]:
    service = make_service(service_spec(gpusPerReplica=gpus))
    built = build_deployment(service, make_pool(pool), 1, owner_reference(service))
    spec: dict[str, Any] = built["spec"]["template"]["spec"]
    return spec


def test_a_claim_template_pool_gets_a_template_owned_by_the_service() -> None:
    template = _template()
    assert template is not None
    name = template["metadata"]["name"]
    assert name.startswith("llama-")
    assert len(name) == len("llama-") + 10
    assert template["apiVersion"] == "resource.k8s.io/v1"
    assert template["metadata"]["ownerReferences"][0]["uid"] == SERVICE_UID
    assert template["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "gpuyard"
    assert template["spec"]["metadata"]["labels"]["gpuyard.io/service"] == "llama"
    [request] = template["spec"]["spec"]["devices"]["requests"]
    assert request["name"] == CLAIM_NAME
    exactly = request["exactly"]
    assert exactly["deviceClassName"] == "gpu.nvidia.com"
    assert exactly["allocationMode"] == "ExactCount"
    assert exactly["count"] == 2
    [selector] = exactly["selectors"]
    assert '"NVIDIA H100 80GB HBM3"' in selector["cel"]["expression"]


def test_the_pods_claim_through_the_template_and_ask_no_extended_resource() -> None:
    pod = _pod()
    template = _template()
    assert template is not None
    assert pod["resourceClaims"] == [
        {"name": CLAIM_NAME, "resourceClaimTemplateName": template["metadata"]["name"]}
    ]
    [container] = pod["containers"]
    assert container["resources"]["claims"] == [{"name": CLAIM_NAME}]
    assert "nvidia.com/gpu" not in container["resources"]["limits"]
    assert "nvidia.com/gpu" not in container["resources"]["requests"]


def test_an_extended_resource_pool_changes_nothing_in_the_pod() -> None:
    assert _template(pool=EXTENDED_POOL) is None
    pod = _pod(pool=EXTENDED_POOL)
    assert "resourceClaims" not in pod
    [container] = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert "claims" not in container["resources"]
    assert _pod(pool=EXTENDED_POOL) == _pod(pool=pool_spec())


def test_a_device_plugin_pool_has_no_template() -> None:
    assert _template(pool=pool_spec()) is None


def test_a_changed_claim_is_a_new_template_name() -> None:
    # A template's spec is immutable: what a replica claims is in the name.
    one, two = _template(gpus=1), _template(gpus=2)
    assert one is not None
    assert two is not None
    assert one["metadata"]["name"] != two["metadata"]["name"]
    service = make_service(service_spec(gpusPerReplica=2))
    assert claim_template_name(service, make_pool(CLAIM_POOL)) == two["metadata"]["name"]


def _deployment(template: str | None, *, generation: int, observed: int, updated: int) -> Any:
    claims = [{"name": CLAIM_NAME, "resourceClaimTemplateName": template}] if template else []
    return {
        "metadata": {"generation": generation},
        "spec": {"template": {"spec": {"resourceClaims": claims}}},
        "status": {"observedGeneration": observed, "replicas": 2, "updatedReplicas": updated},
    }


def test_an_old_template_goes_only_after_the_rollout_to_the_new_one() -> None:
    live = ["llama-new", "llama-old"]
    # The cached Deployment still names the old template: our apply is not seen yet.
    assert (
        stale_claim_templates(
            "llama-new", live, _deployment("llama-old", generation=1, observed=1, updated=2)
        )
        == []
    )
    # Named, but not observed by the controller yet, or old replicas left.
    assert (
        stale_claim_templates(
            "llama-new", live, _deployment("llama-new", generation=2, observed=1, updated=0)
        )
        == []
    )
    assert (
        stale_claim_templates(
            "llama-new", live, _deployment("llama-new", generation=2, observed=2, updated=1)
        )
        == []
    )
    assert stale_claim_templates(
        "llama-new", live, _deployment("llama-new", generation=2, observed=2, updated=2)
    ) == ["llama-old"]
    # A pool that left DRA: the last template goes after the rollout away from it.
    assert stale_claim_templates(
        None, ["llama-old"], _deployment(None, generation=3, observed=3, updated=2)
    ) == ["llama-old"]
    assert stale_claim_templates(None, ["llama-old"], None) == []
