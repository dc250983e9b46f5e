"""The DCGM simulator serves GPUs held through ResourceClaims with their slice's UUIDs."""

from __future__ import annotations

from typing import Any

from test_dcgm_sim import node, parse, pod

from localcluster.dcgm_sim import render_cluster
from localcluster.topology import gpu_uuid, resource_slice


def claim(name: str, *devices: str, admin: bool = False) -> dict[str, Any]:
    results = [
        {"request": "gpus", "driver": "gpu.nvidia.com", "pool": "gpu-d", "device": d}
        | ({"adminAccess": True} if admin else {})
        for d in devices
    ]
    return {
        "metadata": {"name": name, "namespace": "team"},
        "status": {"allocation": {"devices": {"results": results}}},
    }


def dra_pod(name: str, claim_name: str, *, extended: bool = False) -> dict[str, Any]:
    body = pod(name, "gpu-d", gpus=1)
    if extended:
        body["status"]["extendedResourceClaimStatus"] = {"resourceClaimName": claim_name}
    else:
        body["spec"]["containers"][0]["resources"] = {"claims": [{"name": "gpus"}]}
        body["status"]["resourceClaimStatuses"] = [
            {"name": "gpus", "resourceClaimName": claim_name}
        ]
    return body


def series(pods: list[dict[str, Any]], claims: list[dict[str, Any]]) -> list[dict[str, str]]:
    text, _ = render_cluster(
        pods,
        [node("gpu-d", "h100-80gb")],
        {},
        {},
        claims=claims,
        slices=[resource_slice("gpu-d", gpus=4, gpu_type="h100-80gb")],
    )
    return [labels for labels, _ in parse(text)["DCGM_FI_DEV_GPU_UTIL"]]


def test_a_claimed_gpu_has_its_slice_uuid_number_and_the_pods_labels() -> None:
    [labels] = series([dra_pod("llama-0", "llama-0-gpus-x")], [claim("llama-0-gpus-x", "gpu-2")])
    assert labels["UUID"] == gpu_uuid("gpu-d", 2)
    assert (labels["gpu"], labels["pod"], labels["namespace"], labels["container"]) == (
        "2", "llama-0", "team", "server",
    )  # fmt: skip


def test_an_extended_resource_served_from_dra_is_its_devices_only() -> None:
    # Its limit says nvidia.com/gpu: 1; the scheduler's claim holds gpu-3: one GPU, not two.
    found = series(
        [dra_pod("embed-0", "embed-0-ext", extended=True)], [claim("embed-0-ext", "gpu-3")]
    )
    assert [labels["UUID"] for labels in found] == [gpu_uuid("gpu-d", 3)]


def test_admin_access_and_unallocated_claims_hold_no_gpu() -> None:
    assert series([dra_pod("mon-0", "mon")], [claim("mon", "gpu-0", admin=True)]) == []
    assert series([dra_pod("wait-0", "pending")], []) == []
