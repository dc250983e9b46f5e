"""The local cluster's topology: parsing and the Node objects it becomes."""

from __future__ import annotations

import pytest

from gpuyard.api.names import POOL_LABEL
from localcluster.topology import (
    DEFAULT_TOPOLOGY,
    GPU_RESOURCE,
    PoolTopology,
    node_manifests,
    parse_topology,
    resource_slice_manifests,
)


def test_default_topology_is_two_pools() -> None:
    assert parse_topology(DEFAULT_TOPOLOGY) == [
        PoolTopology("a100", 2, 8, "a100-80gb"),
        PoolTopology("l4", 2, 4, "l4"),
    ]


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("", "names no pool"),
        ("a100=2x8", "expected POOL=NODESxGPUS:GPU-TYPE"),
        ("A100=2x8:a100", "expected POOL=NODESxGPUS:GPU-TYPE"),
        ("a100=0x8:a100", "1-500 nodes of 1-16 GPUs"),
        ("a100=1x17:a100", "1-500 nodes of 1-16 GPUs"),
        ("a=1x1:l4,a=1x2:l4", "repeat"),
    ],
)
def test_bad_topologies_are_refused_with_the_reason(text: str, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        parse_topology(text)


def test_nodes_carry_pool_labels_gpu_capacity_and_the_gpu_taint() -> None:
    nodes = node_manifests(parse_topology("tiny=2x3:l4"))
    by_name = {node["metadata"]["name"]: node for node in nodes}
    assert set(by_name) == {"cpu-0", "gpu-tiny-0", "gpu-tiny-1"}
    gpu = by_name["gpu-tiny-1"]
    assert gpu["metadata"]["labels"][POOL_LABEL] == "tiny"
    assert gpu["metadata"]["labels"]["type"] == "kwok"
    assert gpu["status"]["allocatable"][GPU_RESOURCE] == "3"
    assert gpu["spec"]["taints"] == [
        {"key": GPU_RESOURCE, "value": "present", "effect": "NoSchedule"}
    ]
    cpu = by_name["cpu-0"]
    assert GPU_RESOURCE not in cpu["status"]["capacity"]
    assert cpu["spec"]["taints"] == []


def test_a_dra_pool_has_no_gpu_in_allocatable_and_a_slice_per_node() -> None:
    pools = parse_topology("a100=1x8:a100-80gb,h100=2x2:h100-80gb:dra")
    assert pools[1] == PoolTopology("h100", 2, 2, "h100-80gb", dra=True)
    by_name = {node["metadata"]["name"]: node for node in node_manifests(pools)}
    dra_node = by_name["gpu-h100-0"]
    assert GPU_RESOURCE not in dra_node["status"]["allocatable"]
    assert dra_node["spec"]["taints"] == by_name["gpu-a100-0"]["spec"]["taints"]
    slices = resource_slice_manifests(pools)
    assert [s["spec"]["nodeName"] for s in slices] == ["gpu-h100-0", "gpu-h100-1"]
    first = slices[0]["spec"]
    assert first["driver"] == "gpu.nvidia.com"
    assert first["pool"]["name"] == "gpu-h100-0"
    assert [d["name"] for d in first["devices"]] == ["gpu-0", "gpu-1"]
    device = first["devices"][0]
    assert device["attributes"]["productName"] == {"string": "NVIDIA H100 80GB HBM3"}
    assert device["attributes"]["uuid"]["string"].startswith("GPU-")
    assert device["capacity"] == {"memory": {"value": "80Gi"}}
    # Stable across runs, distinct across devices and nodes.
    uuids = {d["attributes"]["uuid"]["string"] for s in slices for d in s["spec"]["devices"]}
    assert len(uuids) == 4
    assert resource_slice_manifests(pools) == slices
