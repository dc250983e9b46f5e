"""The simulated GPU nodes of the local cluster: which pools, how many nodes, how many GPUs.

The default is two pools, as on a small real cluster: two 8-GPU A100 nodes and two 4-GPU
L4 nodes, plus one CPU-only node for workloads that need no GPU (the operator itself when
it is installed in the cluster). A topology can be given as a compact string,
``POOL=NODESxGPUS:GPU-TYPE[:dra][,...]``, e.g. ``a100=2x8:a100-80gb,l4=2x4:l4``.

A pool marked ``:dra`` has nodes whose GPUs come from Dynamic Resource Allocation, as with
NVIDIA's DRA driver for GPUs (kubernetes-sigs/dra-driver-nvidia-gpu, `GpuInfo.GetDevice` in
its gpu-kubelet-plugin, read on the main branch in December 2026): the Node advertises no
``nvidia.com/gpu``, and a ResourceSlice of driver ``gpu.nvidia.com`` (pool named after the
node) lists one device ``gpu-<minor>`` per GPU with the driver's attributes and its
``memory`` capacity.
"""

from __future__ import annotations

import re
import uuid
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

#: The DRA driver of NVIDIA GPUs, and the DeviceClass the local cluster always installs.
DRA_DRIVER = "gpu.nvidia.com"
DEVICE_CLASS: dict[str, Any] = {
    "apiVersion": "resource.k8s.io/v1",
    "kind": "DeviceClass",
    "metadata": {"name": DRA_DRIVER},
    "spec": {
        "selectors": [{"cel": {"expression": f'device.driver == "{DRA_DRIVER}"'}}],
        # KEP-5004: a pod asking nvidia.com/gpu is served from this class on nodes that do
        # not advertise the resource; nodes that do keep the device plugin.
        "extendedResourceName": GPU_RESOURCE,
    },
}

# What NVIDIA's driver reports for each GPU model (productName is NVML's name, memory the
# board's, architecture and compute capability from the CUDA documentation).
DRA_PRODUCTS: dict[str, tuple[str, str, str, str]] = {
    # gpu type: (productName, architecture, cudaComputeCapability, memory)
    "a100-80gb": ("NVIDIA A100-SXM4-80GB", "Ampere", "8.0.0", "80Gi"),
    "a100-40gb": ("NVIDIA A100-SXM4-40GB", "Ampere", "8.0.0", "40Gi"),
    "h100-80gb": ("NVIDIA H100 80GB HBM3", "Hopper", "9.0.0", "80Gi"),
    "l4": ("NVIDIA L4", "Ada Lovelace", "8.9.0", "24Gi"),
    "t4": ("Tesla T4", "Turing", "7.5.0", "16Gi"),
}
DRA_DRIVER_VERSION = "570.124.6"
DRA_CUDA_DRIVER_VERSION = "12.8.0"

_POOL_SPEC = re.compile(
    r"^(?P<pool>[a-z0-9]([-a-z0-9]*[a-z0-9])?)=(?P<nodes>[0-9]+)x(?P<gpus>[0-9]+)"
    r":(?P<type>[a-z0-9]([-a-z0-9]*[a-z0-9])?)(?P<dra>:dra)?$"
)


@dataclass(frozen=True)
class PoolTopology:
    """One pool of identical simulated GPU nodes."""

    pool: str
    nodes: int
    gpus_per_node: int
    gpu_type: str
    dra: bool = False
    """GPUs published as DRA devices in a ResourceSlice instead of in allocatable."""

    def node_names(self) -> list[str]:
        return [f"gpu-{self.pool}-{index}" for index in range(self.nodes)]


def parse_topology(text: str) -> list[PoolTopology]:
    """Parse ``a100=2x8:a100-80gb,l4=2x4:l4``; raise ValueError naming the bad part."""
    pools = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        match = _POOL_SPEC.match(part)
        if not match:
            raise ValueError(
                f"bad pool {part!r}: expected POOL=NODESxGPUS:GPU-TYPE[:dra], "
                "e.g. a100=2x8:a100-80gb or h100=2x2:h100-80gb:dra"
            )
        pool = PoolTopology(
            pool=match["pool"],
            nodes=int(match["nodes"]),
            gpus_per_node=int(match["gpus"]),
            gpu_type=match["type"],
            dra=match["dra"] is not None,
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
    """Node objects for every pool, plus one CPU-only node (see `resource_slice_manifests`
    for the devices of DRA pools)."""
    nodes = [
        _node(
            "cpu-0",
            {"node-role.kubernetes.io/system": ""},
            {"cpu": "16", "memory": "64Gi", "ephemeral-storage": "200Gi", "pods": "110"},
            [],
        )
    ]
    for pool in pools:
        make_node = dra_gpu_node if pool.dra else gpu_node
        nodes.extend(
            make_node(name, pool=pool.pool, gpus=pool.gpus_per_node, gpu_type=pool.gpu_type)
            for name in pool.node_names()
        )
    return nodes


def resource_slice_manifests(pools: list[PoolTopology]) -> list[Any]:
    """The ResourceSlice of every node of the DRA pools."""
    return [
        resource_slice(name, gpus=pool.gpus_per_node, gpu_type=pool.gpu_type)
        for pool in pools
        if pool.dra
        for name in pool.node_names()
    ]


def gpu_node(name: str, *, pool: str, gpus: int, gpu_type: str) -> Any:
    """One simulated GPU node labelled for `pool`, tainted like a real GPU node (tests add
    nodes of their own with it, to take one down without touching anyone else's pods)."""
    return _gpu_node(name, pool=pool, gpu_type=gpu_type, extended={GPU_RESOURCE: str(gpus)})


def dra_gpu_node(name: str, *, pool: str, gpus: int, gpu_type: str) -> Any:
    """A GPU node whose GPUs are DRA devices: labelled and tainted like `gpu_node`, with no
    GPU in its allocatable; its devices are in `resource_slice(name, ...)` (`gpus` is taken
    for the same call shape as gpu_node's)."""
    del gpus
    return _gpu_node(name, pool=pool, gpu_type=gpu_type, extended={})


def _gpu_node(name: str, *, pool: str, gpu_type: str, extended: dict[str, str]) -> Any:
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
        **extended,
    }
    return _node(name, labels, capacity, [GPU_TAINT])


def gpu_uuid(node: str, minor: int) -> str:
    """A GPU UUID as NVML writes it, stable for a node name and device number."""
    return f"GPU-{uuid.uuid5(uuid.NAMESPACE_DNS, f'{minor}.{node}.gpuyard.local')}"


def resource_slice(
    node: str, *, gpus: int, gpu_type: str, name: str | None = None, generation: int = 1
) -> Any:
    """The ResourceSlice NVIDIA's DRA driver would publish for `node`: one full-GPU device
    per GPU, in a pool named after the node."""
    product, architecture, compute_capability, memory = DRA_PRODUCTS.get(
        gpu_type, (GPU_PRODUCTS.get(gpu_type, gpu_type), "Unknown", "8.0.0", "16Gi")
    )
    devices = [
        {
            "name": f"gpu-{minor}",
            "attributes": {
                "type": {"string": "gpu"},
                "uuid": {"string": gpu_uuid(node, minor)},
                "productName": {"string": product},
                "brand": {"string": "Nvidia"},
                "architecture": {"string": architecture},
                "cudaComputeCapability": {"version": compute_capability},
                "driverVersion": {"version": DRA_DRIVER_VERSION},
                "cudaDriverVersion": {"version": DRA_CUDA_DRIVER_VERSION},
                "pcieBusID": {"string": f"0000:{0x18 + minor:02x}:00.0"},
            },
            "capacity": {"memory": {"value": memory}},
        }
        for minor in range(gpus)
    ]
    return {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceSlice",
        "metadata": {"name": name or f"{node}-{DRA_DRIVER}"},
        "spec": {
            "driver": DRA_DRIVER,
            "nodeName": node,
            "pool": {"name": node, "generation": generation, "resourceSliceCount": 1},
            "devices": devices,
        },
    }
