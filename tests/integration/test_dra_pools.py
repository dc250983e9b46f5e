"""GPUPools on Dynamic Resource Allocation, against the real scheduler and API server.

Every test makes DRA nodes of its own (`dra_gpu_node` + `resource_slice`), as NVIDIA's DRA
driver would publish them, and removes them afterwards: no test shares a node. The
DeviceClass gpu.nvidia.com is the one the local cluster installs.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes.client import ApiClient, CustomObjectsApi

from device_selector_table import SELECTOR_TABLE
from gpuyard.api.names import POOL_LABEL
from gpuyard.api.pool import DevicePool
from gpuyard.io.kube import make_api_client
from gpuyard.logic.devices import device_matches, device_selector_cel, slice_info_from_dict
from localcluster.cluster import ClusterState
from localcluster.topology import (
    DRA_DRIVER,
    GPU_RESOURCE,
    dra_gpu_node,
    gpu_node,
    resource_slice,
)
from support import Kubectl, wait_until

pytestmark = pytest.mark.usefixtures("running_operator")

TOLERATION = {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}
#: The acceptance bound: a pool's status follows a slice, claim or node change this fast.
STATUS_LAG_SECONDS = 1.0


class DraRig:
    """DRA nodes, their slices and pools of one test, deleted at its end."""

    def __init__(self, kubectl: Kubectl, stem: str, api: ApiClient) -> None:
        self.kubectl = kubectl
        self.stem = stem
        self.objects = CustomObjectsApi(api)
        self.nodes: list[str] = []
        self.pools: list[str] = []

    def node(self, index: int, *, gpus: int, gpu_type: str = "h100-80gb") -> str:
        """A DRA node labelled for this rig's pool, with its ResourceSlice."""
        name = f"gpu-{self.stem}-{index}"
        self.nodes.append(name)
        node = dra_gpu_node(name, pool=self.stem, gpus=gpus, gpu_type=gpu_type)
        self.kubectl.apply(json.dumps(node))
        self.publish(resource_slice(name, gpus=gpus, gpu_type=gpu_type))
        wait_until(lambda: self.node_ready(name), what=f"node {name} to be Ready")
        return name

    def publish(self, slice_object: dict[str, Any]) -> None:
        self.kubectl.apply(json.dumps(slice_object))

    def node_ready(self, name: str) -> bool:
        node = self.kubectl.json("get", "node", name)
        conditions = node["status"].get("conditions") or []
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

    def pool(self, purpose: str, **devices: Any) -> str:
        name = f"{self.stem}-{purpose}"
        manifest = {
            "apiVersion": "gpuyard.io/v1alpha1",
            "kind": "GPUPool",
            "metadata": {"name": name},
            "spec": {
                "gpuType": "h100-80gb",
                "nodeSelector": {POOL_LABEL: self.stem},
                "tolerations": [TOLERATION],
                "price": {"perGpuHour": "4.00"},
                "devices": {"deviceClassName": DRA_DRIVER, **devices},
            },
        }
        self.kubectl.apply(json.dumps(manifest))
        self.pools.append(name)
        return name

    def pool_status(self, name: str) -> dict[str, Any]:
        body = self.objects.get_cluster_custom_object("gpuyard.io", "v1alpha1", "gpupools", name)
        return dict(body.get("status") or {})

    def counts(self, name: str) -> tuple[int | None, ...]:
        status = self.pool_status(name)
        return tuple(
            status.get(key) for key in ("capacity", "allocated", "available", "largestNodeGpus")
        )

    def cleanup(self) -> None:
        for pool in self.pools:
            self.kubectl.run("delete", "gpupool", pool, "--wait=false", check=False)
        for node in self.nodes:
            self.kubectl.run("delete", "node", node, "--wait=false", check=False)
            self.kubectl.run(
                "delete", "resourceslice", f"{node}-{DRA_DRIVER}", "--wait=false", check=False
            )


@pytest.fixture
def rig(kubectl: Kubectl, namespace: str, cluster: ClusterState) -> Iterator[DraRig]:
    # Node names and pool names from the namespace's random suffix: unique per test.
    stem = "dra-" + namespace.rsplit("-", 1)[1]
    made = DraRig(kubectl, stem, make_api_client(cluster.kubeconfig, pool_size=2))
    try:
        yield made
    finally:
        made.cleanup()


def pinned_pod(name: str, node: str, **spec: Any) -> dict[str, Any]:
    """A pod held to `node` (kwok runs it), with the GPU taint tolerated."""
    container: dict[str, Any] = {"name": "main", "image": "registry.k8s.io/pause:3.10"}
    if "limits" in spec:
        container["resources"] = {"limits": spec.pop("limits")}
    if "claims" in spec:
        container["resources"] = {"claims": [{"name": c["name"]} for c in spec["claims"]]}
        spec["resourceClaims"] = spec.pop("claims")
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": node},
            "tolerations": [TOLERATION],
            "containers": [container],
            **spec,
        },
    }


def claim(name: str, *, cel: str | None = None) -> dict[str, Any]:
    exactly: dict[str, Any] = {"deviceClassName": DRA_DRIVER}
    if cel is not None:
        exactly["selectors"] = [{"cel": {"expression": cel}}]
    return {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceClaim",
        "metadata": {"name": name},
        "spec": {"devices": {"requests": [{"name": "gpu", "exactly": exactly}]}},
    }


def pod_node(kubectl: Kubectl, namespace: str, name: str) -> str | None:
    return kubectl.json("get", "pod", "-n", namespace, name)["spec"].get("nodeName")


def unschedulable(kubectl: Kubectl, namespace: str, name: str) -> bool:
    conditions = kubectl.json("get", "pod", "-n", namespace, name)["status"].get("conditions")
    return any(
        c["type"] == "PodScheduled" and c.get("reason") == "Unschedulable" for c in conditions or []
    )


def allocated(kubectl: Kubectl, namespace: str, name: str) -> bool:
    body = kubectl.json("get", "resourceclaim", "-n", namespace, name)
    return bool((body.get("status") or {}).get("allocation"))


def within_lag(rig: DraRig, pool: str, expected: tuple[int, ...], what: str) -> float:
    """Seconds until the pool's counts are `expected`, failing past the acceptance bound."""
    started = time.monotonic()
    wait_until(
        lambda: rig.counts(pool) == expected,
        timeout=STATUS_LAG_SECONDS,
        interval=0.05,
        what=f"{what}: pool {pool} (capacity, allocated, available, largest) = {expected}",
    )
    return time.monotonic() - started


def test_the_cluster_serves_gpus_from_dra_and_the_device_plugin_side_by_side(
    kubectl: Kubectl, namespace: str, rig: DraRig
) -> None:
    dra = rig.node(0, gpus=2)
    plugin = f"gpu-{rig.stem}-plugin"
    rig.nodes.append(plugin)
    kubectl.apply(json.dumps(gpu_node(plugin, pool=f"{rig.stem}-p", gpus=2, gpu_type="l4")))
    wait_until(lambda: rig.node_ready(plugin), what=f"node {plugin} to be Ready")
    kubectl.apply(json.dumps(pinned_pod("on-dra", dra, limits={GPU_RESOURCE: "1"})), namespace)
    kubectl.apply(
        json.dumps(pinned_pod("on-plugin", plugin, limits={GPU_RESOURCE: "1"})), namespace
    )

    wait_until(lambda: pod_node(kubectl, namespace, "on-dra"), what="the DRA pod to be bound")
    wait_until(lambda: pod_node(kubectl, namespace, "on-plugin"), what="the plugin pod bound")
    # KEP-5004: the scheduler made a claim for the pod on the DRA node only; the node that
    # advertises nvidia.com/gpu keeps serving it from its allocatable, DeviceClass or not.
    on_dra = kubectl.json("get", "pod", "-n", namespace, "on-dra")["status"]
    on_plugin = kubectl.json("get", "pod", "-n", namespace, "on-plugin")["status"]
    claim_name = on_dra["extendedResourceClaimStatus"]["resourceClaimName"]
    assert allocated(kubectl, namespace, claim_name)
    assert "extendedResourceClaimStatus" not in on_plugin


def test_a_dra_pool_counts_devices_and_follows_slices_claims_and_nodes(
    kubectl: Kubectl, namespace: str, rig: DraRig
) -> None:
    small = rig.node(0, gpus=2)
    rig.node(1, gpus=4)
    pool = rig.pool("count")
    wait_until(lambda: rig.counts(pool) == (6, 0, 6, 4), what="the pool's first count")
    status = rig.pool_status(pool)
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True"
    assert "devices of DeviceClass gpu.nvidia.com" in ready["message"]

    # Another tenant's claim on the pool's devices counts too: it holds them.
    kubectl.apply(json.dumps(claim("held")), namespace)
    kubectl.apply(
        json.dumps(
            pinned_pod("holder", small, claims=[{"name": "gpu", "resourceClaimName": "held"}])
        ),
        namespace,
    )
    wait_until(lambda: allocated(kubectl, namespace, "held"), what="the claim's allocation")
    claim_lag = within_lag(rig, pool, (6, 1, 5, 4), "after the claim's allocation")

    # The driver publishes a third device on the small node.
    grown = resource_slice(small, gpus=3, gpu_type="h100-80gb", generation=2)
    rig.publish(grown)
    slice_lag = within_lag(rig, pool, (7, 1, 6, 4), "after the slice grew")

    # The big node goes away, and its devices with it (its slice may stay behind).
    kubectl("delete", "node", rig.nodes[1], "--wait=false")
    node_lag = within_lag(rig, pool, (3, 1, 2, 3), "after the node went")
    print(f"status lag: claim {claim_lag:.3f}s, slice {slice_lag:.3f}s, node {node_lag:.3f}s")


def test_a_replica_bigger_than_any_node_is_refused_with_the_largest_device_count(
    kubectl: Kubectl, namespace: str, rig: DraRig
) -> None:
    rig.node(0, gpus=2)
    rig.node(1, gpus=3)
    pool = rig.pool("admit")
    wait_until(lambda: rig.counts(pool)[3] == 3, what="the pool's largest node")
    service = {
        "apiVersion": "gpuyard.io/v1alpha1",
        "kind": "AIService",
        "metadata": {"name": "too-big"},
        "spec": {
            "pool": pool,
            "gpusPerReplica": 4,
            "container": {"image": "vllm/vllm-openai:v0.6.3"},
        },
    }
    kubectl.apply(json.dumps(service), namespace)

    def accepted() -> dict[str, Any] | None:
        body = kubectl.json("get", "aiservice", "-n", namespace, "too-big")
        conditions = (body.get("status") or {}).get("conditions") or []
        return next((c for c in conditions if c["type"] == "Accepted"), None)

    verdict = wait_until(accepted, what="the service's Accepted condition")
    assert (verdict["status"], verdict["reason"]) == ("False", "GpusPerReplicaExceedNode")
    assert "4 devices of DeviceClass gpu.nvidia.com" in verdict["message"]
    assert "lower spec.gpusPerReplica to 3 or less" in verdict["message"]
    # Refused means no half-made children.
    deployments = kubectl.json("get", "deployments", "-n", namespace)["items"]
    assert deployments == []


def test_a_class_gpuyard_cannot_read_makes_the_pool_say_so(
    kubectl: Kubectl, namespace: str, rig: DraRig
) -> None:
    rig.node(0, gpus=2)
    name = f"{rig.stem}.example.com"
    expression = 'device.driver.startsWith("gpu.")'
    device_class = {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "DeviceClass",
        "metadata": {"name": name},
        "spec": {"selectors": [{"cel": {"expression": expression}}]},
    }
    kubectl.apply(json.dumps(device_class))
    try:
        pool = rig.pool("odd")
        patch = {"spec": {"devices": {"deviceClassName": name}}}
        kubectl("patch", "gpupool", pool, "--type=merge", "-p", json.dumps(patch))

        def ready() -> dict[str, Any] | None:
            conditions = rig.pool_status(pool).get("conditions") or []
            found = next((c for c in conditions if c["type"] == "Ready"), None)
            return found if found and found["reason"] == "DeviceClassUnsupported" else None

        condition = wait_until(ready, what="Ready=False DeviceClassUnsupported")
        assert condition["status"] == "False"
        assert expression in condition["message"]
        assert rig.counts(pool)[0] == 0
    finally:
        kubectl.run("delete", "deviceclass", name, "--wait=false", check=False)


def test_the_generated_cel_allocates_what_the_python_matcher_counts(
    kubectl: Kubectl, namespace: str, rig: DraRig
) -> None:
    # One device per row, as in the unit table's H100: the driver's attributes plus an int
    # attribute and a qualified one, so that every row has something to decide on.
    name = f"gpu-{rig.stem}-cel"
    rig.nodes.append(name)
    published = resource_slice(name, gpus=len(SELECTOR_TABLE), gpu_type="h100-80gb")
    for index, device in enumerate(published["spec"]["devices"]):
        device["attributes"]["index"] = {"int": index}
        device["attributes"]["resource.kubernetes.io/pcieRoot"] = {"string": "pci0000:00"}
    kubectl.apply(json.dumps(dra_gpu_node(name, pool=rig.stem, gpus=0, gpu_type="h100-80gb")))
    rig.publish(copy.deepcopy(published))
    wait_until(lambda: rig.node_ready(name), what=f"node {name} to be Ready")
    info = slice_info_from_dict(published)
    assert info is not None
    # Every device but `index` is alike; the int row compares against "0" on each.
    device = info.devices[0]

    expected: dict[str, bool] = {}
    for row, (selector, in_table) in enumerate(SELECTOR_TABLE):
        pool_devices = DevicePool.model_validate(
            {"deviceClassName": DRA_DRIVER, "selector": selector}
        )
        matches = device_matches(device, pool_devices.selector)
        assert matches is in_table, selector
        expected[f"row-{row}"] = matches
        kubectl.apply(
            json.dumps(claim(f"row-{row}", cel=device_selector_cel(pool_devices))), namespace
        )
        pod = pinned_pod(
            f"row-{row}", name, claims=[{"name": "gpu", "resourceClaimName": f"row-{row}"}]
        )
        kubectl.apply(json.dumps(pod), namespace)

    def decided() -> dict[str, bool] | None:
        seen: dict[str, bool] = {}
        for pod in expected:
            if pod_node(kubectl, namespace, pod):
                seen[pod] = True
            elif unschedulable(kubectl, namespace, pod):
                seen[pod] = False
        return seen if len(seen) == len(expected) else None

    assert wait_until(decided, timeout=90, what="the scheduler to decide every row") == expected
