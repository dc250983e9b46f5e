"""docs/inference-servers.md shows the Deployment gpuyard builds from examples/vllm.yaml: its
trimmed YAML must stay a part of what the builder really makes."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from gpuyard.api.pool import GPUPool
from gpuyard.api.service import AIService
from gpuyard.logic.children import build_deployment, owner_reference
from gpuyard.logic.drift import contains

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "inference-servers.md"


def _document(path: str, kind: str, name: str) -> dict[str, Any]:
    [found] = [
        document
        for document in yaml.safe_load_all((ROOT / path).read_text())
        if document["kind"] == kind and document["metadata"]["name"] == name
    ]
    return {**found, "metadata": {**found["metadata"], "namespace": "team-a", "uid": "u"}}


def test_the_trimmed_deployment_in_the_doc_is_what_gpuyard_builds() -> None:
    pool = GPUPool.from_mapping(_document("examples/pools.yaml", "GPUPool", "a100"))
    service = AIService.from_mapping(_document("examples/vllm.yaml", "AIService", "llama"))
    built = build_deployment(service, pool, 1, owner_reference(service))
    [shown] = re.findall(r"Trimmed.*?```yaml\n(.*?)```", DOC.read_text(), flags=re.DOTALL)

    trimmed = yaml.safe_load(shown)

    assert trimmed["spec"]["template"]["spec"]["containers"], "the doc shows the container"
    assert contains(built, trimmed), "docs/inference-servers.md shows fields gpuyard does not build"
