"""Small, valid GPUPool and AIService objects for the unit tests, with overrides.

Each test states only what it is about; everything else comes from here.
"""

from __future__ import annotations

import copy
from typing import Any

from gpuyard.api.pool import GPUPool
from gpuyard.api.service import AIService

SERVICE_UID = "5f0c3a43-3f9b-4c55-a5f7-2f3c1d1b9a10"


def deep_merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`base` with `overrides` merged in; a None override removes the key."""
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def service_spec(**overrides: Any) -> dict[str, Any]:
    """A minimal valid AIService spec (camelCase keys), with `overrides` merged in."""
    base = {"pool": "a100", "container": {"image": "vllm/vllm-openai:v0.6.3"}}
    return deep_merge(base, overrides)


def pool_spec(**overrides: Any) -> dict[str, Any]:
    """A minimal valid GPUPool spec (camelCase keys), with `overrides` merged in."""
    base = {
        "gpuType": "a100-80gb",
        "nodeSelector": {"gpuyard.io/pool": "a100"},
        "price": {"perGpuHour": "2.50"},
    }
    return deep_merge(base, overrides)


def make_service(
    spec: dict[str, Any] | None = None,
    *,
    name: str = "llama",
    namespace: str = "team-a",
    uid: str | None = SERVICE_UID,
    generation: int = 1,
) -> AIService:
    """A parsed AIService as a handler would get it from the API."""
    metadata: dict[str, Any] = {"name": name, "namespace": namespace, "generation": generation}
    if uid is not None:
        metadata["uid"] = uid
    return AIService.model_validate(
        {
            "apiVersion": "gpuyard.io/v1alpha1",
            "kind": "AIService",
            "metadata": metadata,
            "spec": service_spec() if spec is None else spec,
        }
    )


def make_pool(spec: dict[str, Any] | None = None, *, name: str = "a100") -> GPUPool:
    """A parsed GPUPool as a handler would get it from the API."""
    return GPUPool.model_validate(
        {
            "apiVersion": "gpuyard.io/v1alpha1",
            "kind": "GPUPool",
            "metadata": {"name": name, "generation": 1},
            "spec": pool_spec() if spec is None else spec,
        }
    )
