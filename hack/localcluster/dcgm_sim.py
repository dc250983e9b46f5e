"""A DCGM exporter simulator for the local cluster's fake (kwok) GPU nodes.

NVIDIA's dcgm-exporter runs on every GPU node and serves one series per GPU and field,
labelled with the pod that holds the GPU. The local cluster has no GPUs, so this process
plays that part for all kwok nodes at once: it follows Nodes and Pods through the API
server and serves, for every GPU held by a Running pod on a fake GPU node, the series that
dcgm-exporter serves, with the same names, HELP/TYPE text and labels:

    DCGM_FI_DEV_GPU_UTIL           gauge, percent 0-100, an integer as DCGM reports it
    DCGM_FI_DEV_FB_USED            gauge, MiB
    DCGM_FI_DEV_FB_FREE            gauge, MiB (used + free = the model's framebuffer)
    DCGM_FI_PROF_GR_ENGINE_ACTIVE  gauge, ratio 0-1
    DCGM_FI_DEV_POWER_USAGE        gauge, watts, idle..TDP interpolated by utilisation

    labels: gpu, UUID, pci_bus_id, device, modelName, [GPU_I_PROFILE, GPU_I_ID for MIG],
            Hostname, container, namespace, pod

A fake GPU node is a Node labelled ``type=kwok``; its GPU model comes from its
``gpuyard.io/gpu-type`` label (else ``nvidia.com/gpu.product``; ``nvidia.com/gpu.memory``
overrides the framebuffer size). A pod holds one device per unit of any ``nvidia.com/*``
extended resource in its containers' limits (requests when limits are absent). Devices get
indices on their node that a pod keeps while it lives; freed indices are reused, lowest
first. UUIDs are derived from node name and index, so they are stable across restarts.

A GPU held through a ResourceClaim (DRA, NVIDIA's driver ``gpu.nvidia.com``) is the device
the claim's allocation names: the simulator follows ResourceClaims and ResourceSlices too,
and serves such a device with the ``uuid`` attribute its slice publishes as ``UUID`` and the
number in its name (``gpu-N``) as ``gpu``, labelled with the pod and namespace of the pod
whose claims hold it, as dcgm-exporter does with pod mapping on. A pod whose
``nvidia.com/gpu`` the scheduler served from DRA devices (KEP-5004) shows those devices
only, not also a device-plugin GPU per unit of its limit.
A MIG resource such as ``nvidia.com/mig-1g.10gb`` is simulated as its own device with the
slice's framebuffer and ``GPU_I_PROFILE``/``GPU_I_ID`` labels.

Load model
----------
Load is set per *service* = (namespace, service name); a pod's service is its
``gpuyard.io/service`` label, else its ``app`` label. Load is in GPU-percent of demand:
load 300 is three GPUs' worth of full work. Every GPU held by the service's serving pods
shows utilisation ``min(100, load / total GPUs of those pods)``: 300 over 4 GPUs is 75 %
each, 300 over 2 GPUs is 100 % each (demand exceeds capacity). A serving pod is a Running
pod whose Ready condition is True (or that has no Ready condition at all, as a pod written
by hand); a pod still starting (Running, Ready False: its model is loading) holds its GPUs
but serves none of the load, so they show 0 %, as do GPUs of a pod without a service, or
of a service without load. Framebuffer use is a base of 10 % of the
framebuffer (weights and CUDA context) plus 80 % scaled by utilisation; power is idle
watts plus (TDP - idle) scaled by utilisation. An optional deterministic jitter (off by
default) moves busy GPUs' utilisation by up to +/- N points, from a hash of UUID and time.

Independent of pods, every service with a load set exports
``gpuyard_sim_requests_in_flight{namespace, service} = load / 100``: the unit is one
request that keeps one GPU fully busy, so load 300 is 3 requests in flight. It exists at
zero replicas, which makes it the autoscaler's "wake from zero" signal.

HTTP API (binds 127.0.0.1 unless told otherwise)
------------------------------------------------
    GET    /metrics                   Prometheus text exposition format 0.0.4
    GET    /healthz                   200 once Pods and Nodes are listed, else 503
    GET    /load                      {"loads": [{"namespace", "service", "load",
                                                  "requestsInFlight"}, ...]}
    GET    /load/<ns>/<svc>           one entry, or 404
    PUT    /load/<ns>/<svc>           body {"load": <number 0..1000000>}, returns the entry
    DELETE /load/<ns>/<svc>           204, also when nothing was set (idempotent)

Run it as ``python -m localcluster.dcgm_sim --kubeconfig K --listen 127.0.0.1:PORT``
(PORT 0 picks a free port; the bound address is printed on stdout).

``--exported-labels`` renames ``pod``/``namespace``/``container`` to ``exported_pod``/
``exported_namespace``/``exported_container``, which is what a Prometheus that does not
honour the exporter's labels stores when its target already has those labels.

Kubernetes side: one thread per kind lists (raw JSON, no model objects) and then watches
from the list's resourceVersion, bookmarks on, re-listing on 410 Gone or any error. A watch
reacts within milliseconds and costs nothing when idle, where a 0.5 s poll of a few hundred
pods would re-transfer and re-parse them all twice a second on a 2-core machine that is
also running the control plane and the benchmarks. Pods are watched with the field selector
``status.phase=Running``; the API server sends DELETED when a pod leaves that set.

Everything from API dicts to exposition text is pure (``fake_gpu_nodes``, ``gpu_pods``,
``assign_gpus``, ``gpu_devices``, ``device_readings``, ``render_exposition``,
``handle_load_api``); the watchers and the HTTP server are thin shells around them.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http
import json
import logging
import math
import re
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Final, Protocol

from gpuyard.api.names import SERVICE_LABEL, ServiceKey
from localcluster.topology import GPU_PRODUCT_LABEL, GPU_TYPE_LABEL

log = logging.getLogger("localcluster.dcgm_sim")

FAKE_NODE_LABEL: Final = ("type", "kwok")
GPU_MEMORY_LABEL: Final = "nvidia.com/gpu.memory"
APP_LABEL: Final = "app"
NVIDIA_RESOURCE_PREFIX: Final = "nvidia.com/"

MAX_LOAD: Final = 1_000_000.0
MAX_BODY_BYTES: Final = 64 * 1024

# Framebuffer in use = (base + span * utilisation) of the total: a served model holds its
# weights and CUDA context even when idle, and activations grow with the work in flight.
FB_BASE_FRACTION: Final = 0.10
FB_SPAN_FRACTION: Final = 0.80

_UUID_NAMESPACE: Final = uuid.UUID("5f0c7a3e-2d1b-4c8e-9a47-6b1e0d3c2f19")
_MIG_RESOURCE = re.compile(
    r"^mig-(?P<profile>(?P<slices>\d+)g\.(?P<gb>\d+)gb(?:[.+][a-z0-9+.]+)?)$"
)
# A Kubernetes label value: the form a service name takes on a pod.
_LABEL_VALUE = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


# --------------------------------------------------------------------------- GPU models


@dataclass(frozen=True)
class GpuModel:
    """What DCGM would report about one GPU model.

    Framebuffer sizes are what DCGM reports for the product; idle and maximum (TDP) watts
    are round figures from the data sheets, close enough for dashboards and cost demos.
    """

    name: str
    fb_total_mib: int
    idle_watts: float
    max_watts: float


GPU_MODELS: Final[Mapping[str, GpuModel]] = {
    "a100-80gb": GpuModel("NVIDIA A100-SXM4-80GB", 81920, 60.0, 400.0),
    "a100-40gb": GpuModel("NVIDIA A100-SXM4-40GB", 40960, 55.0, 400.0),
    "h100-80gb": GpuModel("NVIDIA H100 80GB HBM3", 81559, 70.0, 700.0),
    "h200": GpuModel("NVIDIA H200", 143771, 75.0, 700.0),
    "l40s": GpuModel("NVIDIA L40S", 46068, 35.0, 350.0),
    "l4": GpuModel("NVIDIA L4", 23034, 16.0, 72.0),
    "a10g": GpuModel("NVIDIA A10G", 23028, 25.0, 300.0),
    "t4": GpuModel("Tesla T4", 15360, 10.0, 70.0),
}
GENERIC_MODEL: Final = GpuModel("NVIDIA Simulated GPU", 16384, 30.0, 300.0)


def _product_key(name: str) -> str:
    # GPU feature discovery writes the product with dashes where DCGM has spaces.
    return name.replace(" ", "-").lower()


_MODELS_BY_PRODUCT: Final = {_product_key(m.name): m for m in GPU_MODELS.values()}


def gpu_model_for_labels(labels: Mapping[str, str]) -> GpuModel:
    """The GPU model a node's labels describe; unknown products get generic figures."""
    model = GPU_MODELS.get(labels.get(GPU_TYPE_LABEL, ""))
    product = labels.get(GPU_PRODUCT_LABEL, "")
    if model is None and product:
        model = _MODELS_BY_PRODUCT.get(_product_key(product)) or replace(
            GENERIC_MODEL, name=product
        )
    model = model or GENERIC_MODEL
    memory = labels.get(GPU_MEMORY_LABEL, "")
    if memory.isdigit() and int(memory) > 0:
        model = replace(model, fb_total_mib=int(memory))
    return model


# --------------------------------------------------------------------------- API dicts


def _labels(obj: Mapping[str, Any]) -> Mapping[str, str]:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return labels if isinstance(labels, Mapping) else {}


@dataclass(frozen=True)
class FakeNode:
    name: str
    model: GpuModel


def fake_gpu_nodes(nodes: Iterable[Mapping[str, Any]]) -> dict[str, FakeNode]:
    """Node name -> FakeNode for every Node labelled ``type=kwok``."""
    result: dict[str, FakeNode] = {}
    for node in nodes:
        labels = _labels(node)
        name = (node.get("metadata") or {}).get("name")
        if name and labels.get(FAKE_NODE_LABEL[0]) == FAKE_NODE_LABEL[1]:
            result[name] = FakeNode(name=name, model=gpu_model_for_labels(labels))
    return result


@dataclass(frozen=True)
class GpuRequest:
    """``count`` devices of ``resource`` held by one container."""

    container: str
    resource: str
    count: int


@dataclass(frozen=True)
class ClaimedGpu:
    """A DRA device a pod's claims hold: its number on the node, UUID and container."""

    index: int
    uuid: str
    container: str


@dataclass(frozen=True)
class GpuPod:
    """A Running pod on a fake GPU node that holds at least one device."""

    key: str
    namespace: str
    name: str
    node: str
    service: str | None
    requests: tuple[GpuRequest, ...]
    created: str = ""
    #: False while the pod is starting (Ready False): it holds GPUs but serves no load.
    serving: bool = True
    #: DRA devices held through the pod's claims (their numbers are the slice's own).
    claimed: tuple[ClaimedGpu, ...] = ()

    @property
    def plugin_devices(self) -> int:
        """Devices of a device plugin, to be given numbers on the node."""
        return sum(r.count for r in self.requests)

    @property
    def total(self) -> int:
        return self.plugin_devices + len(self.claimed)


def service_of(pod: Mapping[str, Any]) -> str | None:
    """The service a pod belongs to for the load model: its gpuyard label, else ``app``."""
    labels = _labels(pod)
    return labels.get(SERVICE_LABEL) or labels.get(APP_LABEL) or None


def is_serving(pod: Mapping[str, Any]) -> bool:
    """Whether a Running pod serves its service's load: its Ready condition is True, or it
    has none (a pod written by hand)."""
    for condition in (pod.get("status") or {}).get("conditions") or ():
        if isinstance(condition, Mapping) and condition.get("type") == "Ready":
            return condition.get("status") == "True"
    return True


def _whole_quantity(value: object) -> int:
    # Extended resources are whole numbers; anything else cannot be a device count.
    text = str(value).strip()
    return int(text) if text.isdigit() else 0


def _gpu_requests(spec: Mapping[str, Any]) -> tuple[GpuRequest, ...]:
    found: list[GpuRequest] = []
    for container in spec.get("containers") or []:
        resources = container.get("resources") or {}
        # The API server copies limits into requests for extended resources; a pod dict
        # written by hand may carry only one of them.
        amounts = resources.get("limits") or resources.get("requests") or {}
        for resource in sorted(amounts):
            count = _whole_quantity(amounts[resource])
            if resource.startswith(NVIDIA_RESOURCE_PREFIX) and count > 0:
                found.append(GpuRequest(container.get("name", ""), resource, count))
    return tuple(found)


#: The DRA driver whose devices the simulator serves (NVIDIA's).
DRA_DRIVER: Final = "gpu.nvidia.com"


def published_gpus(slices: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str], tuple[int, str]]:
    """(pool, device) -> (number, UUID) of every device NVIDIA's driver publishes."""
    found: dict[tuple[str, str], tuple[int, str]] = {}
    for item in slices:
        spec = item.get("spec") or {}
        if spec.get("driver") != DRA_DRIVER:
            continue
        pool = str((spec.get("pool") or {}).get("name") or "")
        for device in spec.get("devices") or ():
            name = str(device.get("name") or "")
            uuid_value = ((device.get("attributes") or {}).get("uuid") or {}).get("string")
            number = name.rsplit("-", 1)[-1]
            if name and isinstance(uuid_value, str) and number.isdigit():
                found[(pool, name)] = (int(number), uuid_value)
    return found


def _claim_container(spec: Mapping[str, Any]) -> str:
    """The container that uses the pod's claims: the first that names one, else the first
    that asks for an NVIDIA resource (an extended resource served from DRA), else the first."""
    containers = list(spec.get("containers") or ())
    for container in containers:
        if (container.get("resources") or {}).get("claims"):
            return str(container.get("name", ""))
    for container in containers:
        limits = (container.get("resources") or {}).get("limits") or {}
        if any(str(name).startswith(NVIDIA_RESOURCE_PREFIX) for name in limits):
            return str(container.get("name", ""))
    return str(containers[0].get("name", "")) if containers else ""


def claimed_gpus(
    pod: Mapping[str, Any],
    claims: Mapping[tuple[str, str], Mapping[str, Any]],
    published: Mapping[tuple[str, str], tuple[int, str]],
) -> tuple[ClaimedGpu, ...]:
    """The published GPUs the pod's allocated claims hold (from its status, where the
    claim controller and the scheduler name them)."""
    namespace = (pod.get("metadata") or {}).get("namespace", "")
    status = pod.get("status") or {}
    names = [entry.get("resourceClaimName") for entry in status.get("resourceClaimStatuses") or ()]
    names.append((status.get("extendedResourceClaimStatus") or {}).get("resourceClaimName"))
    names += [
        e.get("resourceClaimName") for e in (pod.get("spec") or {}).get("resourceClaims") or ()
    ]
    container = _claim_container(pod.get("spec") or {})
    held: dict[str, ClaimedGpu] = {}
    for name in names:
        claim = claims.get((namespace, str(name))) if name else None
        allocation = ((claim or {}).get("status") or {}).get("allocation") or {}
        for result in (allocation.get("devices") or {}).get("results") or ():
            if result.get("driver") != DRA_DRIVER or result.get("adminAccess"):
                continue
            known = published.get((str(result.get("pool")), str(result.get("device"))))
            if known is not None:
                held[known[1]] = ClaimedGpu(known[0], known[1], container)
    return tuple(sorted(held.values(), key=lambda gpu: gpu.index))


def gpu_pods(
    pods: Iterable[Mapping[str, Any]],
    nodes: Mapping[str, FakeNode],
    claims: Mapping[tuple[str, str], Mapping[str, Any]] | None = None,
    slices: Iterable[Mapping[str, Any]] = (),
) -> list[GpuPod]:
    """The Running pods on fake GPU nodes that hold devices, in allocation order."""
    published = published_gpus(slices)
    result: list[GpuPod] = []
    for pod in pods:
        metadata = pod.get("metadata") or {}
        spec = pod.get("spec") or {}
        node = str(spec.get("nodeName") or "")
        if (pod.get("status") or {}).get("phase") != "Running" or node not in nodes:
            continue
        claimed = claimed_gpus(pod, claims or {}, published)
        # An nvidia.com/gpu the scheduler served from DRA devices is those devices.
        requests = () if claimed else _gpu_requests(spec)
        if not requests and not claimed:
            continue
        namespace, name = metadata.get("namespace", ""), metadata.get("name", "")
        result.append(
            GpuPod(
                key=metadata.get("uid") or f"{namespace}/{name}",
                namespace=namespace,
                name=name,
                node=node,
                service=service_of(pod),
                requests=requests,
                created=metadata.get("creationTimestamp") or "",
                serving=is_serving(pod),
                claimed=claimed,
            )
        )
    # RFC 3339 timestamps in UTC sort as strings; older pods get the lower indices.
    result.sort(key=lambda p: (p.created, p.namespace, p.name, p.key))
    return result


# --------------------------------------------------------------------------- allocation


@dataclass(frozen=True)
class Slot:
    """The device indices a pod holds on its node."""

    node: str
    indices: tuple[int, ...]


Allocation = Mapping[str, Slot]


def assign_gpus(previous: Allocation, pods: Sequence[GpuPod]) -> dict[str, Slot]:
    """Give every pod device indices on its node, keeping those it already holds.

    A pod keeps its slot while it exists on the same node with the same device count;
    pods that are gone free theirs, and new pods take the lowest free indices in the
    order of ``pods``.
    """
    used: dict[str, set[int]] = {}
    allocation: dict[str, Slot] = {}
    newcomers: list[GpuPod] = []
    for pod in pods:
        old = previous.get(pod.key)
        taken = used.setdefault(pod.node, set())
        if (
            old is not None
            and old.node == pod.node
            and len(old.indices) == pod.plugin_devices
            and taken.isdisjoint(old.indices)
        ):
            allocation[pod.key] = old
            taken.update(old.indices)
        else:
            newcomers.append(pod)
    for pod in newcomers:
        taken = used[pod.node]
        indices: list[int] = []
        candidate = 0
        while len(indices) < pod.plugin_devices:
            if candidate not in taken:
                indices.append(candidate)
            candidate += 1
        taken.update(indices)
        allocation[pod.key] = Slot(pod.node, tuple(indices))
    return allocation


def gpu_uuid(node: str, index: int) -> str:
    """A stable, dcgm-shaped UUID for device ``index`` of ``node``."""
    return f"GPU-{uuid.uuid5(_UUID_NAMESPACE, f'{node}/{index}')}"


@dataclass(frozen=True)
class GpuDevice:
    """One simulated device and the pod container that holds it."""

    node: str
    index: int
    model: GpuModel
    resource: str
    namespace: str
    pod: str
    container: str
    service: str | None
    service_gpus: int = 0  # devices held by all serving pods of the same service
    mig_profile: str | None = None
    serving: bool = True  # False while its pod is starting: it shows no load
    published_uuid: str = ""  # a DRA device's UUID, as its ResourceSlice publishes it

    @property
    def uuid(self) -> str:
        return self.published_uuid or gpu_uuid(self.node, self.index)


def _device_shape(model: GpuModel, resource: str) -> tuple[GpuModel, str | None]:
    match = _MIG_RESOURCE.match(resource.removeprefix(NVIDIA_RESOURCE_PREFIX))
    if match is None:
        return model, None
    # A MIG slice has its share of framebuffer; power is scaled by the same share.
    fb = int(match["gb"]) * 1024
    share = min(1.0, fb / model.fb_total_mib)
    sliced = GpuModel(model.name, fb, model.idle_watts * share, model.max_watts * share)
    return sliced, match["profile"]


def gpu_devices(
    pods: Sequence[GpuPod], nodes: Mapping[str, FakeNode], allocation: Allocation
) -> list[GpuDevice]:
    """Expand pods and their slots into devices, sorted by node and index."""
    service_gpus: dict[tuple[str, str], int] = {}
    for pod in pods:
        if pod.service is not None and pod.serving:
            key = (pod.namespace, pod.service)
            service_gpus[key] = service_gpus.get(key, 0) + pod.total
    devices: list[GpuDevice] = []
    for pod in pods:
        slot = allocation.get(pod.key)
        if slot is None or pod.node not in nodes:
            continue
        indices = iter(slot.indices)
        for request in pod.requests:
            model, profile = _device_shape(nodes[pod.node].model, request.resource)
            for _ in range(request.count):
                devices.append(
                    GpuDevice(
                        node=pod.node,
                        index=next(indices),
                        model=model,
                        resource=request.resource,
                        namespace=pod.namespace,
                        pod=pod.name,
                        container=request.container,
                        service=pod.service,
                        service_gpus=service_gpus.get((pod.namespace, pod.service or ""), 0),
                        mig_profile=profile,
                        serving=pod.serving,
                    )
                )
        for gpu in pod.claimed:
            devices.append(
                GpuDevice(
                    node=pod.node,
                    index=gpu.index,
                    model=nodes[pod.node].model,
                    resource=DRA_DRIVER,
                    namespace=pod.namespace,
                    pod=pod.name,
                    container=gpu.container,
                    service=pod.service,
                    service_gpus=service_gpus.get((pod.namespace, pod.service or ""), 0),
                    serving=pod.serving,
                    published_uuid=gpu.uuid,
                )
            )
    devices.sort(key=lambda d: (d.node, d.index))
    return devices


# --------------------------------------------------------------------------- load model


def utilisation(load: float, service_gpus: int) -> float:
    """Percent busy of each of ``service_gpus`` GPUs sharing ``load`` GPU-percent."""
    if service_gpus <= 0 or load <= 0:
        return 0.0
    return min(100.0, load / service_gpus)


def _jitter(device_uuid: str, now: float, amplitude: float) -> float:
    # Deterministic in (device, second), so two scrapes in the same second agree and a
    # test that fixes ``now`` sees fixed values.
    digest = hashlib.sha256(f"{device_uuid}/{math.floor(now)}".encode()).digest()
    unit = int.from_bytes(digest[:8], "big") / 2.0**64
    return amplitude * (2.0 * unit - 1.0)


@dataclass(frozen=True)
class Reading:
    """The values of the five simulated fields for one device."""

    gpu_util: int
    fb_used_mib: int
    fb_free_mib: int
    gr_engine_active: float
    power_watts: float


def reading_for(utilisation_percent: float, model: GpuModel) -> Reading:
    """Field values of a ``model`` device that is ``utilisation_percent`` busy."""
    busy = max(0.0, min(100.0, utilisation_percent)) / 100.0
    used = round(model.fb_total_mib * (FB_BASE_FRACTION + FB_SPAN_FRACTION * busy))
    return Reading(
        gpu_util=round(busy * 100.0),
        fb_used_mib=used,
        fb_free_mib=model.fb_total_mib - used,
        gr_engine_active=round(busy, 6),
        power_watts=round(model.idle_watts + (model.max_watts - model.idle_watts) * busy, 3),
    )


def device_readings(
    devices: Sequence[GpuDevice],
    loads: Mapping[ServiceKey, float],
    *,
    now: float = 0.0,
    jitter: float = 0.0,
) -> list[tuple[GpuDevice, Reading]]:
    """Each device with the reading its service's load gives it."""
    result: list[tuple[GpuDevice, Reading]] = []
    for device in devices:
        load = 0.0
        if device.service and device.serving:
            load = loads.get((device.namespace, device.service), 0.0)
        busy = utilisation(load, device.service_gpus)
        if jitter > 0 and busy > 0:
            busy = max(0.0, min(100.0, busy + _jitter(device.uuid, now, jitter)))
        result.append((device, reading_for(busy, device.model)))
    return result


# --------------------------------------------------------------------------- exposition


@dataclass(frozen=True)
class Field:
    name: str
    help: str
    value: Callable[[Reading], float]


# HELP texts as dcgm-exporter's default counters CSV has them, so dashboards match.
FIELDS: Final[tuple[Field, ...]] = (
    Field("DCGM_FI_DEV_POWER_USAGE", "Power draw (in W).", lambda r: r.power_watts),
    Field("DCGM_FI_DEV_GPU_UTIL", "GPU utilization (in %).", lambda r: r.gpu_util),
    Field("DCGM_FI_DEV_FB_FREE", "Framebuffer memory free (in MiB).", lambda r: r.fb_free_mib),
    Field("DCGM_FI_DEV_FB_USED", "Framebuffer memory used (in MiB).", lambda r: r.fb_used_mib),
    Field(
        "DCGM_FI_PROF_GR_ENGINE_ACTIVE",
        "Ratio of time the graphics engine is active.",
        lambda r: r.gr_engine_active,
    ),
)
REQUESTS_IN_FLIGHT: Final = "gpuyard_sim_requests_in_flight"
REQUESTS_IN_FLIGHT_HELP: Final = (
    "Simulated requests in flight per service: the load set on the DCGM simulator divided "
    "by 100; one request keeps one GPU fully busy."
)


def escape_label_value(value: str) -> str:
    """Escape a label value for the text exposition format."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _format_value(value: float) -> str:
    if math.isfinite(value) and value == int(value) and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


def _label_set(pairs: Iterable[tuple[str, str]]) -> str:
    return ",".join(f'{k}="{escape_label_value(v)}"' for k, v in pairs)


def _owner_labels(exported: bool) -> tuple[str, str, str]:
    prefix = "exported_" if exported else ""
    return f"{prefix}container", f"{prefix}namespace", f"{prefix}pod"


def device_labels(device: GpuDevice, *, exported_labels: bool = False) -> list[tuple[str, str]]:
    """The labels dcgm-exporter puts on a device's series, in its order."""
    pairs = [
        ("gpu", str(device.index)),
        ("UUID", device.uuid),
        # Bus ids count from 1 on the simulated nodes; real ones depend on the board.
        ("pci_bus_id", f"00000000:{device.index + 1:02X}:00.0"),
        ("device", f"nvidia{device.index}"),
        ("modelName", device.model.name),
    ]
    if device.mig_profile is not None:
        pairs += [("GPU_I_PROFILE", device.mig_profile), ("GPU_I_ID", str(device.index))]
    container, namespace, pod = _owner_labels(exported_labels)
    pairs += [
        ("Hostname", device.node),
        (container, device.container),
        (namespace, device.namespace),
        (pod, device.pod),
    ]
    return pairs


def render_exposition(
    readings: Sequence[tuple[GpuDevice, Reading]],
    loads: Mapping[ServiceKey, float],
    *,
    exported_labels: bool = False,
) -> str:
    """Prometheus text exposition (format 0.0.4) of device readings and service loads."""
    lines: list[str] = []
    for fld in FIELDS:
        lines += [f"# HELP {fld.name} {fld.help}", f"# TYPE {fld.name} gauge"]
        for device, reading in readings:
            labels = _label_set(device_labels(device, exported_labels=exported_labels))
            lines.append(f"{fld.name}{{{labels}}} {_format_value(fld.value(reading))}")
    namespace_label = _owner_labels(exported_labels)[1]
    lines += [
        f"# HELP {REQUESTS_IN_FLIGHT} {REQUESTS_IN_FLIGHT_HELP}",
        f"# TYPE {REQUESTS_IN_FLIGHT} gauge",
    ]
    for (namespace, service), load in sorted(loads.items()):
        labels = _label_set([(namespace_label, namespace), ("service", service)])
        lines.append(f"{REQUESTS_IN_FLIGHT}{{{labels}}} {_format_value(load / 100.0)}")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class RenderOptions:
    exported_labels: bool = False
    jitter: float = 0.0  # utilisation points, +/-; 0 turns jitter off


def render_cluster(
    pods: Iterable[Mapping[str, Any]],
    nodes: Iterable[Mapping[str, Any]],
    loads: Mapping[ServiceKey, float],
    previous: Allocation,
    *,
    options: RenderOptions | None = None,
    now: float = 0.0,
    claims: Iterable[Mapping[str, Any]] = (),
    slices: Iterable[Mapping[str, Any]] = (),
) -> tuple[str, dict[str, Slot]]:
    """API dicts and loads -> (exposition text, allocation to pass in next time)."""
    options = options or RenderOptions()
    fake = fake_gpu_nodes(nodes)
    by_name = {
        (
            (c.get("metadata") or {}).get("namespace", ""),
            (c.get("metadata") or {}).get("name", ""),
        ): c
        for c in claims
    }
    holders = gpu_pods(pods, fake, by_name, slices)
    allocation = assign_gpus(previous, holders)
    devices = gpu_devices(holders, fake, allocation)
    readings = device_readings(devices, loads, now=now, jitter=options.jitter)
    return render_exposition(readings, loads, exported_labels=options.exported_labels), allocation


# --------------------------------------------------------------------------- load API


class LoadError(ValueError):
    """A load request that cannot be honoured; the message is shown to the caller."""


def validate_service_key(namespace: str, service: str) -> ServiceKey:
    """Check a (namespace, service) pair the way the API server would check them."""
    if not _DNS_LABEL.match(namespace):
        raise LoadError(
            f"namespace {namespace!r} is not a DNS label "
            "(lowercase letters, digits and '-', at most 63 characters)"
        )
    if not _LABEL_VALUE.match(service):
        raise LoadError(
            f"service {service!r} is not a label value "
            "(letters, digits, '-', '_' and '.', at most 63 characters, "
            "starting and ending with a letter or digit)"
        )
    return namespace, service


def parse_load_body(body: bytes) -> float:
    """The load in a ``PUT /load/...`` body: ``{"load": <number>}``."""
    try:
        document = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise LoadError(f"body is not JSON: {error}") from None
    if not isinstance(document, dict):
        raise LoadError('body must be a JSON object such as {"load": 300}')
    unknown = sorted(set(document) - {"load"})
    if unknown:
        raise LoadError(f"unknown field(s) {', '.join(unknown)}; only 'load' is accepted")
    if "load" not in document:
        raise LoadError('missing field "load" (GPU-percent of demand, e.g. {"load": 300})')
    load = document["load"]
    # bool is an int in Python but never a load.
    if isinstance(load, bool) or not isinstance(load, int | float):
        raise LoadError(f'"load" must be a number, got {json.dumps(load)}')
    if not math.isfinite(load) or not 0 <= load <= MAX_LOAD:
        raise LoadError(f'"load" must be between 0 and {MAX_LOAD:.0f}, got {load}')
    return float(load)


class LoadStore(Protocol):
    def get(self, key: ServiceKey) -> float | None: ...
    def set(self, key: ServiceKey, load: float) -> None: ...
    def delete(self, key: ServiceKey) -> None: ...
    def snapshot(self) -> dict[ServiceKey, float]: ...


class LoadTable:
    """Loads per service, safe to use from the HTTP server's threads."""

    def __init__(self, initial: Mapping[ServiceKey, float] | None = None) -> None:
        self._lock = threading.Lock()
        self._loads: dict[ServiceKey, float] = dict(initial or {})

    def get(self, key: ServiceKey) -> float | None:
        with self._lock:
            return self._loads.get(key)

    def set(self, key: ServiceKey, load: float) -> None:
        with self._lock:
            self._loads[key] = load

    def delete(self, key: ServiceKey) -> None:
        with self._lock:
            self._loads.pop(key, None)

    def snapshot(self) -> dict[ServiceKey, float]:
        with self._lock:
            return dict(self._loads)


@dataclass(frozen=True)
class ApiResponse:
    status: int
    body: Mapping[str, Any] | None = None
    headers: Mapping[str, str] = field(default_factory=dict)


def _entry(key: ServiceKey, load: float) -> dict[str, Any]:
    shown: float | int = int(load) if load == int(load) else load
    return {
        "namespace": key[0],
        "service": key[1],
        "load": shown,
        "requestsInFlight": load / 100.0,
    }


def _error(status: http.HTTPStatus, message: str, **headers: str) -> ApiResponse:
    return ApiResponse(status, {"error": message}, headers)


def _load_collection(method: str, loads: LoadStore) -> ApiResponse:
    if method != "GET":
        return _error(http.HTTPStatus.METHOD_NOT_ALLOWED, "use GET on /load", Allow="GET")
    entries = [_entry(k, v) for k, v in sorted(loads.snapshot().items())]
    return ApiResponse(http.HTTPStatus.OK, {"loads": entries})


def _load_item(method: str, key: ServiceKey, body: bytes, loads: LoadStore) -> ApiResponse:
    if method == "DELETE":
        loads.delete(key)
        return ApiResponse(http.HTTPStatus.NO_CONTENT)
    if method == "PUT":
        loads.set(key, parse_load_body(body))
    elif method != "GET":
        return _error(
            http.HTTPStatus.METHOD_NOT_ALLOWED,
            f"use GET, PUT or DELETE on /load/<namespace>/<service>, not {method}",
            Allow="GET, PUT, DELETE",
        )
    current = loads.get(key)
    if current is None:
        return _error(http.HTTPStatus.NOT_FOUND, f"no load set for {key[0]}/{key[1]}")
    return ApiResponse(http.HTTPStatus.OK, _entry(key, current))


def handle_load_api(method: str, path: str, body: bytes, loads: LoadStore) -> ApiResponse:
    """Serve the ``/load`` API: routing, validation and the change to ``loads``."""
    parts = [p for p in path.split("?", 1)[0].split("/") if p]
    if parts == ["load"]:
        return _load_collection(method, loads)
    if len(parts) != 3 or parts[0] != "load":
        return _error(
            http.HTTPStatus.NOT_FOUND,
            f"no such path {path!r}; use /load or /load/<namespace>/<service>",
        )
    try:
        return _load_item(method, validate_service_key(parts[1], parts[2]), body, loads)
    except LoadError as error:
        return _error(http.HTTPStatus.BAD_REQUEST, str(error))


# --------------------------------------------------------------------------- state


class ObjectCache:
    """The current objects of one kind, kept from a list and the watch that follows it."""

    def __init__(self) -> None:
        self._objects: dict[str, Mapping[str, Any]] = {}
        self.synced = False

    @staticmethod
    def key(obj: Mapping[str, Any]) -> str:
        metadata = obj.get("metadata") or {}
        return str(metadata.get("uid") or f"{metadata.get('namespace')}/{metadata.get('name')}")

    def replace(self, items: Iterable[Mapping[str, Any]]) -> None:
        self._objects = {self.key(o): o for o in items}
        self.synced = True

    def apply(self, event_type: str, obj: Mapping[str, Any]) -> None:
        if event_type == "DELETED":
            self._objects.pop(self.key(obj), None)
        elif event_type in {"ADDED", "MODIFIED"}:
            self._objects[self.key(obj)] = obj

    def values(self) -> list[Mapping[str, Any]]:
        return list(self._objects.values())


class SimulatorState:
    """Nodes, pods, loads and the device allocation; every method is thread-safe."""

    def __init__(self, options: RenderOptions | None = None) -> None:
        self.options = options or RenderOptions()
        self.loads = LoadTable()
        self._lock = threading.Lock()
        self._caches = {
            kind: ObjectCache() for kind in ("pods", "nodes", "resourceclaims", "resourceslices")
        }
        self._allocation: dict[str, Slot] = {}

    def replace(self, kind: str, items: Iterable[Mapping[str, Any]]) -> None:
        with self._lock:
            self._caches[kind].replace(items)

    def apply(self, kind: str, event_type: str, obj: Mapping[str, Any]) -> None:
        with self._lock:
            self._caches[kind].apply(event_type, obj)

    @property
    def synced(self) -> bool:
        # Pods and nodes only: a cluster without DRA (no resource.k8s.io/v1) serves its
        # device-plugin GPUs all the same, and claims only add devices once listed.
        with self._lock:
            return self._caches["pods"].synced and self._caches["nodes"].synced

    def render(self, now: float) -> str:
        loads = self.loads.snapshot()
        with self._lock:
            text, self._allocation = render_cluster(
                self._caches["pods"].values(),
                self._caches["nodes"].values(),
                loads,
                self._allocation,
                options=self.options,
                now=now,
                claims=self._caches["resourceclaims"].values(),
                slices=self._caches["resourceslices"].values(),
            )
        return text


# --------------------------------------------------------------------------- HTTP


def _handler_class(state: SimulatorState) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "gpuyard-dcgm-sim"

        def _send(self, status: int, body: bytes, content_type: str, **headers: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _send_text(self, status: int, text: str) -> None:
            self._send(status, text.encode(), "text/plain; charset=utf-8")

        def _serve_get(self) -> None:
            path = self.path.split("?", 1)[0].rstrip("/")
            if path == "/metrics":
                text = state.render(time.time())
                self._send(200, text.encode(), "text/plain; version=0.0.4; charset=utf-8")
            elif path == "/healthz":
                if state.synced:
                    self._send_text(200, "ok\n")
                else:
                    self._send_text(503, "waiting for the first list of Pods and Nodes\n")
            else:
                self._serve_load_api()

        def _serve_load_api(self) -> None:
            length_header = self.headers.get("Content-Length") or "0"
            length = int(length_header) if length_header.isdigit() else -1
            if length < 0:
                response = _error(http.HTTPStatus.BAD_REQUEST, "bad Content-Length")
            elif length > MAX_BODY_BYTES:
                response = _error(
                    http.HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                    f"body larger than {MAX_BODY_BYTES} bytes",
                )
            else:
                body = self.rfile.read(length) if length > 0 else b""
                response = handle_load_api(self.command, self.path, body, state.loads)
            payload = b"" if response.body is None else json.dumps(response.body).encode()
            self._send(response.status, payload, "application/json", **response.headers)

        do_GET = _serve_get  # noqa: N815 - the name BaseHTTPRequestHandler dispatches to
        do_HEAD = _serve_get  # noqa: N815
        do_PUT = _serve_load_api  # noqa: N815
        do_DELETE = _serve_load_api  # noqa: N815
        do_POST = _serve_load_api  # noqa: N815 - answered with 405 by the API
        do_PATCH = _serve_load_api  # noqa: N815

        def log_message(self, format: str, *args: Any) -> None:
            # Prometheus scrapes every second; access lines belong at debug level.
            log.debug("%s " + format, self.address_string(), *args)

    return Handler


class _IPv6HTTPServer(ThreadingHTTPServer):
    # The standard library's servers are IPv4 unless the class says otherwise.
    address_family = socket.AF_INET6


def make_server(state: SimulatorState, host: str, port: int) -> ThreadingHTTPServer:
    """An HTTP server for ``state``, bound but not yet serving."""
    server_class = _IPv6HTTPServer if ":" in host else ThreadingHTTPServer
    server = server_class((host, port), _handler_class(state))
    server.daemon_threads = True
    return server


# --------------------------------------------------------------------------- Kubernetes


def _iter_json_lines(response: Any) -> Iterator[Mapping[str, Any]]:
    buffer = b""
    for chunk in response.stream(amt=None, decode_content=True):
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            if line.strip():
                yield json.loads(line)


class WatchExpired(Exception):  # noqa: N818 - a control-flow signal, not an error
    """The watch's resourceVersion is gone: list again."""


def follow_watch(list_fn: Any, kind: str, state: SimulatorState, rv: str, **kwargs: Any) -> str:
    """Follow one watch request from ``rv`` until the server closes it; return the last rv."""
    response = list_fn(
        watch=True,
        resource_version=rv,
        allow_watch_bookmarks=True,
        timeout_seconds=60,
        _preload_content=False,
        # The read timeout outlasts timeout_seconds so only a dead connection trips it.
        _request_timeout=(10, 90),
        **kwargs,
    )
    try:
        for event in _iter_json_lines(response):
            obj = event.get("object") or {}
            if event.get("type") == "ERROR":
                if obj.get("code") == http.HTTPStatus.GONE:
                    raise WatchExpired
                raise RuntimeError(f"watch {kind}: {obj.get('reason')}: {obj.get('message')}")
            rv = (obj.get("metadata") or {}).get("resourceVersion") or rv
            if event.get("type") != "BOOKMARK":
                state.apply(kind, str(event.get("type")), obj)
    finally:
        # Closing drops a half-read stream instead of returning it to the pool.
        response.close()
        response.release_conn()
    return rv


def run_informer(
    list_fn: Any, kind: str, state: SimulatorState, stop: threading.Event, **kwargs: Any
) -> None:
    """List, then watch from the list's resourceVersion, re-listing on 410 or errors."""
    backoff = 0.2
    while not stop.is_set():
        try:
            listed = json.loads(list_fn(_preload_content=False, _request_timeout=30, **kwargs).data)
            state.replace(kind, listed.get("items") or [])
            rv = listed["metadata"]["resourceVersion"]
            backoff = 0.2
            while not stop.is_set():
                rv = follow_watch(list_fn, kind, state, rv, **kwargs)
        except WatchExpired:
            log.info("watch %s: resourceVersion expired, listing again", kind)
        except Exception as error:
            # The server may also answer a watch from an expired version with HTTP 410.
            if getattr(error, "status", None) == http.HTTPStatus.GONE:
                log.info("watch %s: resourceVersion expired, listing again", kind)
                continue
            # Any other failure: a dead informer would silently freeze the metrics.
            log.exception("watch %s failed; retrying in %.1fs", kind, backoff)
            # Backoff between retries, not a wait for a condition; stop cuts it short.
            stop.wait(backoff)
            backoff = min(backoff * 2, 5.0)


def start_informers(
    state: SimulatorState, kubeconfig: str | None, stop: threading.Event
) -> list[threading.Thread]:
    """Start the Node, Pod, ResourceClaim and ResourceSlice watchers as daemon threads."""
    # Imported here so the pure functions and their tests do not pay for the client.
    from kubernetes import client, config  # noqa: PLC0415

    threads = []
    watched: list[tuple[str, str, str, dict[str, str]]] = [
        ("nodes", "CoreV1Api", "list_node", {}),
        (
            "pods", "CoreV1Api", "list_pod_for_all_namespaces",
            {"field_selector": "status.phase=Running"},
        ),
        ("resourceclaims", "ResourceV1Api", "list_resource_claim_for_all_namespaces", {}),
        ("resourceslices", "ResourceV1Api", "list_resource_slice", {}),
    ]  # fmt: skip
    for kind, api_class, method, kwargs in watched:
        # One client per thread: urllib3 pools are shared state best kept apart.
        api_client = config.new_client_from_config(config_file=kubeconfig)  # type: ignore[no-untyped-call]
        list_fn = getattr(getattr(client, api_class)(api_client), method)
        thread = threading.Thread(
            target=run_informer,
            args=(list_fn, kind, state, stop),
            kwargs=kwargs,
            name=f"dcgm-sim-{kind}",
            daemon=True,
        )
        thread.start()
        threads.append(thread)
    return threads


# --------------------------------------------------------------------------- CLI


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (or ``:PORT`` for 127.0.0.1) -> (host, port)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m localcluster.dcgm_sim",
        description="Serve simulated dcgm-exporter metrics for the local cluster's kwok GPU "
        "nodes, with utilisation driven by per-service load (see docs/dcgm-simulator.md).",
    )
    parser.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, ~/.kube)")
    parser.add_argument(
        "--listen",
        type=parse_listen,
        default=("127.0.0.1", 9400),
        metavar="HOST:PORT",
        help="address to serve on (default 127.0.0.1:9400; port 0 picks a free one)",
    )
    parser.add_argument(
        "--exported-labels",
        action="store_true",
        help="name the owner labels exported_pod/exported_namespace/exported_container, "
        "as Prometheus stores them when it does not honour the exporter's labels",
    )
    parser.add_argument(
        "--jitter",
        type=float,
        default=0.0,
        metavar="POINTS",
        help="deterministic +/- jitter on busy GPUs' utilisation, in percent points (default 0)",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the simulator until SIGINT or SIGTERM."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    host, port = args.listen
    state = SimulatorState(
        RenderOptions(exported_labels=args.exported_labels, jitter=max(0.0, args.jitter))
    )
    stop = threading.Event()
    server = make_server(state, host, port)
    bound_host, bound_port = host, server.server_port
    if bound_host not in {"127.0.0.1", "::1", "localhost"}:
        log.warning("listening on %s: the load API has no authentication", bound_host)
    start_informers(state, args.kubeconfig, stop)
    serving = threading.Thread(target=server.serve_forever, name="dcgm-sim-http", daemon=True)
    serving.start()
    print(f"dcgm-sim listening on http://{bound_host}:{bound_port}", flush=True)

    def request_stop(signum: int, _frame: object) -> None:
        log.info("signal %d: stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    with contextlib.suppress(KeyboardInterrupt):
        stop.wait()
    server.shutdown()
    server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
