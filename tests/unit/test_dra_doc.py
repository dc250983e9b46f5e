"""docs/dra.md: its GPUPools are valid, and its ResourceClaimTemplate is the builder's shape."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from sample_objects import make_service, service_spec

from gpuyard.api.pool import GPUPool
from gpuyard.logic.children import build_claim_template, owner_reference

DOC = Path(__file__).resolve().parents[2] / "docs" / "dra.md"


def blocks(kind: str) -> list[dict[str, Any]]:
    found = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", DOC.read_text(), re.S)]
    return [b for b in found if b.get("kind") == kind]


def test_the_pools_of_the_page_validate_in_both_request_modes() -> None:
    pools = [GPUPool.from_mapping(body) for body in blocks("GPUPool")]
    modes = sorted(p.spec.devices.request for p in pools if p.spec.devices is not None)
    assert modes == ["ClaimTemplate", "ExtendedResource"]


def test_the_template_of_the_page_has_the_shape_the_operator_builds() -> None:
    [shown] = blocks("ResourceClaimTemplate")
    claim_pool = next(
        p for p in map(GPUPool.from_mapping, blocks("GPUPool"))
        if p.spec.devices is not None and p.spec.devices.request == "ClaimTemplate"
    )  # fmt: skip
    service = make_service(service_spec(gpusPerReplica=2))
    built = build_claim_template(service, claim_pool, owner_reference(service))
    assert built is not None
    assert shown["apiVersion"] == built["apiVersion"]
    [shown_request] = shown["spec"]["spec"]["devices"]["requests"]
    [built_request] = built["spec"]["spec"]["devices"]["requests"]
    assert shown_request.keys() == built_request.keys()
    assert shown_request["exactly"].keys() == built_request["exactly"].keys()
    assert shown_request["exactly"]["count"] == built_request["exactly"]["count"]
    assert shown_request["name"] == built_request["name"]
