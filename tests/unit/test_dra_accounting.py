"""Pool accounting of DRA pools: devices from ResourceSlices, allocations from claims."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sample_objects import make_pool, make_service, pool_spec, service_spec

from gpuyard.logic.admission import GPUS_PER_REPLICA_EXCEED_NODE, check_service
from gpuyard.logic.conditions import pool_ready_condition
from gpuyard.logic.devices import (
    ClaimHolder,
    ClassSelection,
    DeviceKey,
    SliceInfo,
    claim_allocations_from_dict,
    class_selection,
    slice_info_from_dict,
)
from gpuyard.logic.pool_accounting import NodeInfo, PodInfo, compute_pool_usage
from gpuyard.logic.status import pool_usage_status
from localcluster.topology import DEVICE_CLASS, resource_slice

GPU = "nvidia.com/gpu"
DRIVER = "gpu.nvidia.com"
LABELS = {"gpuyard.io/pool": "a100"}


@dataclass
class Inventory:
    """A DeviceInventory over plain dicts, as the operator's caches hold it."""

    slices: dict[str, list[SliceInfo]] = field(default_factory=dict)
    claims: dict[DeviceKey, ClaimHolder] = field(default_factory=dict)
    classes: dict[str, ClassSelection] = field(
        default_factory=lambda: {DRIVER: class_selection(DEVICE_CLASS)}
    )

    def slices_on(self, node: str) -> Iterable[SliceInfo]:
        return self.slices.get(node, [])

    def holder(self, device: DeviceKey) -> ClaimHolder | None:
        return self.claims.get(device)

    def device_class(self, name: str) -> ClassSelection | None:
        return self.classes.get(name)

    def add_node(self, node: str, gpus: int, gpu_type: str = "a100-80gb") -> None:
        info = slice_info_from_dict(resource_slice(node, gpus=gpus, gpu_type=gpu_type))
        assert info is not None
        self.slices.setdefault(node, []).append(info)

    def allocate(self, node: str, *devices: int, namespace: str = "team-a", **labels: str) -> None:
        claim = {
            "metadata": {"namespace": namespace, "name": f"c-{node}", "labels": labels},
            "status": {
                "allocation": {
                    "devices": {
                        "results": [
                            {"request": "gpu", "driver": DRIVER, "pool": node, "device": f"gpu-{i}"}
                            for i in devices
                        ]
                    }
                }
            },
        }
        self.claims.update(claim_allocations_from_dict(claim))


def dra_node(
    name: str, *, ready: bool = True, allocatable: Mapping[str, int] | None = None
) -> NodeInfo:
    return NodeInfo(
        name=name, labels=LABELS, ready=ready, allocatable=dict(allocatable or {}), taints=()
    )


def dra_pool(**devices: Any) -> Any:
    return make_pool(pool_spec(devices={"deviceClassName": DRIVER, **devices}))


def test_capacity_is_matching_devices_of_ready_nodes_and_allocated_any_claims() -> None:
    inventory = Inventory()
    inventory.add_node("n1", 4)
    inventory.add_node("n2", 2)
    inventory.add_node("down", 8)
    inventory.allocate("n1", 0, 1, namespace="other-team")
    inventory.allocate("n2", 0, namespace="team-a", **{"gpuyard.io/service": "llm"})
    nodes = [dra_node("n1"), dra_node("n2"), dra_node("down", ready=False)]

    usage = compute_pool_usage(dra_pool(), nodes, [], inventory)

    assert (usage.nodes, usage.ready_nodes) == (3, 2)
    assert (usage.capacity, usage.allocated, usage.available) == (6, 3, 3)
    assert usage.largest_node_gpus == 4
    assert usage.free_gpus_by_node == {"n1": 2, "n2": 1}
    assert usage.allocated_by_namespace == {"other-team": 2, "team-a": 1}
    assert usage.allocated_by_service == {("team-a", "llm"): 1}
    assert usage.device_problem is None


def test_a_node_gone_takes_its_devices_out() -> None:
    inventory = Inventory()
    inventory.add_node("n1", 4)
    inventory.add_node("gone", 4)
    usage = compute_pool_usage(dra_pool(), [dra_node("n1")], [], inventory)
    assert (usage.nodes, usage.capacity) == (1, 4)


def test_the_pool_selector_narrows_devices() -> None:
    inventory = Inventory()
    inventory.add_node("a100", 2, "a100-40gb")
    inventory.add_node("h100", 2, "h100-80gb")
    nodes = [dra_node("a100"), dra_node("h100")]
    by_memory = dra_pool(selector={"minCapacity": {"memory": "80Gi"}})
    by_name = dra_pool(selector={"attributes": {"productName": "NVIDIA A100-SXM4-40GB"}})
    assert compute_pool_usage(by_memory, nodes, [], inventory).free_gpus_by_node == {
        "a100": 0,
        "h100": 2,
    }
    assert compute_pool_usage(by_name, nodes, [], inventory).capacity == 2


def test_only_the_newest_generation_of_a_driver_pool_counts() -> None:
    inventory = Inventory()
    for generation, gpus in ((1, 8), (2, 2)):
        info = slice_info_from_dict(
            resource_slice("n1", gpus=gpus, gpu_type="l4", generation=generation)
        )
        assert info is not None
        inventory.slices.setdefault("n1", []).append(info)
    assert compute_pool_usage(dra_pool(), [dra_node("n1")], [], inventory).capacity == 2


def test_device_plugin_nodes_keep_serving_the_extended_resource() -> None:
    # KEP-5004: a node advertising the resource serves it from the device plugin.
    inventory = Inventory()
    inventory.add_node("dra", 2)
    inventory.allocate("dra", 0)
    nodes = [dra_node("plugin", allocatable={GPU: 8}), dra_node("dra")]
    pods = [
        PodInfo(
            name="p1", namespace="team-a", node_name="plugin", phase="Running", requests={GPU: 3}
        ),
        # On the DRA node the scheduler's claim holds the device: counted once, from it.
        PodInfo(name="p2", namespace="team-a", node_name="dra", phase="Running", requests={GPU: 1}),
    ]
    usage = compute_pool_usage(dra_pool(request="ExtendedResource"), nodes, pods, inventory)
    assert usage.free_gpus_by_node == {"plugin": 5, "dra": 1}
    assert (usage.capacity, usage.allocated) == (10, 4)
    assert usage.allocated_by_namespace == {"team-a": 4}


def test_a_class_that_cannot_be_read_is_reported_not_guessed() -> None:
    inventory = Inventory()
    inventory.add_node("n1", 4)
    inventory.classes[DRIVER] = class_selection(
        {"spec": {"selectors": [{"cel": {"expression": "device.driver.startsWith('gpu')"}}]}}
    )
    usage = compute_pool_usage(dra_pool(), [dra_node("n1")], [], inventory)
    assert usage.capacity == 0
    ready = pool_ready_condition(usage, resource_name=GPU)
    assert (ready.status, ready.reason) == ("False", "DeviceClassUnsupported")
    assert "device.driver.startsWith('gpu')" in ready.message


def test_a_missing_or_mismatched_class_is_reported() -> None:
    inventory = Inventory(classes={})
    missing = compute_pool_usage(dra_pool(), [dra_node("n1")], [], inventory)
    assert missing.device_problem is not None
    assert missing.device_problem[0] == "DeviceClassNotFound"
    inventory.classes[DRIVER] = class_selection({"spec": {"selectors": []}})
    mismatched = compute_pool_usage(dra_pool(request="ExtendedResource"), [], [], inventory)
    assert mismatched.device_problem is not None
    assert mismatched.device_problem[0] == "DeviceClassMismatch"


def test_no_matching_device_says_so() -> None:
    usage = compute_pool_usage(dra_pool(), [dra_node("n1")], [], Inventory())
    ready = pool_ready_condition(usage, resource_name=GPU)
    assert (ready.status, ready.reason) == ("False", "NoMatchingDevices")
    assert "devices of DeviceClass gpu.nvidia.com" in ready.message


def test_admission_compares_gpus_per_replica_with_the_largest_node() -> None:
    inventory = Inventory()
    inventory.add_node("n1", 2)
    pool = dra_pool()
    usage = compute_pool_usage(pool, [dra_node("n1")], [], inventory)
    service = make_service(service_spec(gpusPerReplica=3))
    verdict = check_service(service, pool, pool_usage_status(usage), {}, 0)
    assert not verdict.accepted
    assert verdict.reason == GPUS_PER_REPLICA_EXCEED_NODE
    assert "3 devices of DeviceClass gpu.nvidia.com" in verdict.message
    assert "lower spec.gpusPerReplica to 2" in verdict.message


def test_device_plugin_pools_ignore_dra_devices() -> None:
    inventory = Inventory()
    inventory.add_node("n1", 4)
    pool = make_pool()
    node = NodeInfo(name="n1", labels=LABELS, ready=True, allocatable={GPU: 8})
    with_devices = compute_pool_usage(pool, [node], [], inventory)
    assert with_devices == compute_pool_usage(pool, [node], [])
    assert with_devices.capacity == 8
