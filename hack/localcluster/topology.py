"""The simulated GPU nodes of the local cluster: which pools, how many nodes, how many GPUs.

The default is two pools, as on a small real cluster: two 8-GPU A100 nodes and two 4-GPU
L4 nodes, plus one CPU-only node for workloads that need no GPU (the operator itself when
it is installed in the cluster). A topology can be given as a compact string,
``POOL=NODESxGPUS:GPU-TYPE[,...]``, e.g. ``a100=2x8:a100-80gb,l4=2x4:l4``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from gpuyard.api.names import POOL_LABEL

GPU_RESOURCE = "nvidia.com/gpu"
GPU_TYPE_LABEL = "gpuyard.io/gpu-type"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
# Real GPU nodes are usually tainted so that pods which do not ask for a GPU stay off
# them; the simulated ones are too, so a pool's tolerations matter here as in production.
GPU_TAINT = {"key": GPU_RESOURCE, "value": "present", "effect": "NoSchedule"}

# Marketing names as NVIDIA's device plugin labels them (nvidia.com/gpu.product).
GPU_PRODUCTS = {
    "a100-80gb": "NVIDIA-A100-SXM4-80GB",
    "a100-40gb": "NVIDIA-A100-SXM4-40GB",
    "h100-80gb": "NVIDIA-H100-80GB-HBM3",
    "l4": "NVIDIA-L4",
    "t4": "Tesla-T4",
}

DEFAULT_TOPOLOGY = "a100=2x8:a100-80gb,l4=2x4:l4"

_POOL_SPEC = re.compile(
    r"^(?P<pool>[a-z0-9]([-a-z0-9]*[a-z0-9])?)=(?P<nodes>[0-9]+)x(?P<gpus>[0-9]+)"
    r":(?P<type>[a-z0-9]([-a-z0-9]*[a-z0-9])?)$"
)


@dataclass(frozen=True)
class PoolTopology:
    """One pool of identical simulated GPU nodes."""

    pool: str
    nodes: int
    gpus_per_node: int
    gpu_type: str

    def node_names(self) -> list[str]:
        return [f"gpu-{self.pool}-{index}" for index in range(self.nodes)]


def parse_topology(text: str) -> list[PoolTopology]:
    """Parse ``a100=2x8:a100-80gb,l4=2x4:l4``; raise ValueError naming the bad part."""
    pools = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        match = _POOL_SPEC.match(part)
        if not match:
            raise ValueError(
                f"bad pool {part!r}: expected POOL=NODESxGPUS:GPU-TYPE, e.g. a100=2x8:a100-80gb"
            )
        pool = PoolTopology(
            pool=match["pool"],
            nodes=int(match["nodes"]),
            gpus_per_node=int(match["gpus"]),
            gpu_type=match["type"],
        )
        if not 1 <= pool.nodes <= 500 or not 1 <= pool.gpus_per_node <= 16:
            raise ValueError(f"bad pool {part!r}: 1-500 nodes of 1-16 GPUs each")
        pools.append(pool)
    if not pools:
        raise ValueError("the topology names no pool")
    if len({p.pool for p in pools}) != len(pools):
        raise ValueError(f"pool names repeat in {text!r}")
    return pools


def _node(name: str, labels: dict[str, str], capacity: dict[str, str], taints: list[Any]) -> Any:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {
                "type": "kwok",
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                **labels,
            },
            # kwok manages only nodes it is told to; this label selects them (see cluster.py).
            "annotations": {"kwok.x-k8s.io/node": "fake"},
        },
        "spec": {"taints": taints},
        # The API server keeps the status given at creation, as when a kubelet registers.
        "status": {"capacity": capacity, "allocatable": capacity},
    }


def node_manifests(pools: list[PoolTopology]) -> list[Any]:
    """Node objects for every pool, plus one CPU-only node."""
    nodes = [
        _node(
            "cpu-0",
            {"node-role.kubernetes.io/system": ""},
            {"cpu": "16", "memory": "64Gi", "ephemeral-storage": "200Gi", "pods": "110"},
            [],
        )
    ]
    for pool in pools:
        nodes.extend(
            gpu_node(name, pool=pool.pool, gpus=pool.gpus_per_node, gpu_type=pool.gpu_type)
            for name in pool.node_names()
        )
    return nodes


def gpu_node(name: str, *, pool: str, gpus: int, gpu_type: str) -> Any:
    """One simulated GPU node labelled for `pool`, tainted like a real GPU node (tests add
    nodes of their own with it, to take one down without touching anyone else's pods)."""
    labels = {
        POOL_LABEL: pool,
        GPU_TYPE_LABEL: gpu_type,
        GPU_PRODUCT_LABEL: GPU_PRODUCTS.get(gpu_type, gpu_type),
    }
    # Local disk as a GPU node's NVMe holds it: inference pods ask for ephemeral-storage.
    capacity = {
        "cpu": "64",
        "memory": "512Gi",
        "ephemeral-storage": "2Ti",
        "pods": "110",
        GPU_RESOURCE: str(gpus),
    }
    return _node(name, labels, capacity, [GPU_TAINT])
