"""How many GPUs a pool has, holds and can still give, computed from Nodes and Pods.

The handlers pass the Kubernetes JSON of Nodes and Pods straight from the API; the
converters below keep only what accounting needs, so the arithmetic is tested on small
frozen records rather than on whole API objects.

The numbers follow what the scheduler will actually do:
- a node counts as *ready* only if a new pod could land on it: Ready, not cordoned, and every
  NoSchedule/NoExecute taint tolerated by the pool's tolerations;
- a pod holds GPUs from the moment it is bound to a node until it has finished (Succeeded or
  Failed), terminating pods included, because the kubelet frees its devices only then;
- a pod's request is the *effective* request the scheduler computes: the larger of the
  regular containers (plus restartable init containers, "sidecars") and the largest init
  container, with the limit standing in for a missing request of an extended resource.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from gpuyard.api.common import LabelSelector, Toleration
from gpuyard.api.formats import InvalidValueError, parse_quantity, parse_time
from gpuyard.api.names import POOL_LABEL, SERVICE_LABEL
from gpuyard.api.pool import GPUPool
from gpuyard.logic.devices import (
    ClaimHolder,
    DeviceInventory,
    current_devices,
    device_matches,
)

FINISHED_PHASES = frozenset({"Succeeded", "Failed"})
#: Taint effects that keep new pods off a node; PreferNoSchedule only discourages.
BLOCKING_EFFECTS = frozenset({"NoSchedule", "NoExecute"})


def parse_integer_quantity(value: object) -> int | None:
    """A Kubernetes quantity as a whole number, or None when it is not one (such as `500m`
    CPU) or does not parse. Extended resources are always whole numbers."""
    amount = parse_quantity(value)
    if amount is None or amount != amount.to_integral_value():
        return None
    return int(amount)


# --- Records -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Taint:
    """A node taint."""

    key: str
    effect: str
    value: str = ""


@dataclass(frozen=True)
class NodeInfo:
    """What accounting needs to know about a Node."""

    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    ready: bool = False
    unschedulable: bool = False
    #: Whole-number allocatable resources, by resource name.
    allocatable: Mapping[str, int] = field(default_factory=dict)
    taints: tuple[Taint, ...] = ()
    #: When the Ready condition last left True (None while Ready, or never reported): the
    #: meter ends billing of the node's pods there once the node stays down (node loss).
    not_ready_since: datetime | None = None


@dataclass(frozen=True)
class PodInfo:
    """What accounting needs to know about a Pod."""

    name: str
    namespace: str
    node_name: str | None = None
    phase: str = "Pending"
    #: Effective whole-number requests, by resource name (only those that are whole numbers).
    requests: Mapping[str, int] = field(default_factory=dict)
    #: The `gpuyard.io/service` label: which AIService the pod belongs to, if any.
    service: str | None = None
    #: The `gpuyard.io/pool` label: which pool the pod asked for, if any.
    pool: str | None = None
    #: The pod's Ready condition: the autoscaler reads GPU metrics of ready pods only.
    ready: bool = False
    #: Whether the pod is being deleted (``metadata.deletionTimestamp`` set).
    terminating: bool = False
    #: When it was bound (``PodScheduled`` True) and when it last turned Ready, if it is.
    bound_at: datetime | None = None
    ready_at: datetime | None = None
    #: A container restarted or waits for something other than its creation (an image
    #: that cannot be pulled, a crash loop): the pod is failing to start, not starting.
    failing: bool = False

    @property
    def starting(self) -> bool:
        """In the middle of its start: holding a node's GPUs, not ready yet, not going, and
        not failing (a pod that cannot start must not hold a scale-down forever)."""
        return (
            self.node_name is not None
            and not self.ready
            and not self.terminating
            and not self.failing
            and self.phase in ("Pending", "Running")
        )

    @property
    def seconds_to_ready(self) -> float | None:
        """From binding to Ready, for a ready pod whose timestamps both parse."""
        if self.bound_at is None or self.ready_at is None:
            return None
        return max(0.0, (self.ready_at - self.bound_at).total_seconds())


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _sequence(value: object) -> Sequence[Any]:
    return value if isinstance(value, list | tuple) else ()


def node_info_from_dict(obj: Mapping[str, Any]) -> NodeInfo:
    """A NodeInfo from a Node's Kubernetes JSON."""
    metadata, spec, status = (_mapping(obj.get(key)) for key in ("metadata", "spec", "status"))
    ready_condition = next(
        (
            _mapping(condition)
            for condition in _sequence(status.get("conditions"))
            if _mapping(condition).get("type") == "Ready"
        ),
        {},
    )
    ready = ready_condition.get("status") == "True"
    allocatable = {
        name: amount
        for name, quantity in _mapping(status.get("allocatable")).items()
        if (amount := parse_integer_quantity(quantity)) is not None
    }
    taints = tuple(
        Taint(
            key=str(_mapping(taint).get("key", "")),
            effect=str(_mapping(taint).get("effect", "")),
            value=str(_mapping(taint).get("value") or ""),
        )
        for taint in _sequence(spec.get("taints"))
    )
    return NodeInfo(
        name=str(metadata.get("name", "")),
        labels={str(k): str(v) for k, v in _mapping(metadata.get("labels")).items()},
        ready=ready,
        unschedulable=bool(spec.get("unschedulable", False)),
        allocatable=allocatable,
        taints=taints,
        not_ready_since=None if ready else _timestamp(ready_condition.get("lastTransitionTime")),
    )


def _timestamp(value: object) -> datetime | None:
    """An RFC 3339 timestamp in UTC, or None when absent or unreadable."""
    if not isinstance(value, str):
        return None
    try:
        return parse_time(value)
    except InvalidValueError:
        return None


def _container_requests(container: Mapping[str, Any]) -> dict[str, int]:
    resources = _mapping(container.get("resources"))
    # An extended resource given only as a limit is requested at that limit (the API
    # server defaults requests from limits).
    merged = {**_mapping(resources.get("limits")), **_mapping(resources.get("requests"))}
    return {
        name: amount
        for name, quantity in merged.items()
        if (amount := parse_integer_quantity(quantity)) is not None
    }


def effective_requests(spec: Mapping[str, Any]) -> dict[str, int]:
    """A pod's effective requests as the scheduler computes them (KEP-753 sidecars included):
    the larger of the regular containers plus sidecars, and of each init container plus the
    sidecars started before it."""
    sidecars: dict[str, int] = defaultdict(int)
    init_peak: dict[str, int] = defaultdict(int)
    for raw in _sequence(spec.get("initContainers")):
        container = _mapping(raw)
        requests = _container_requests(container)
        if container.get("restartPolicy") == "Always":
            for name, amount in requests.items():
                sidecars[name] += amount
                init_peak[name] = max(init_peak[name], sidecars[name])
        else:
            for name in requests.keys() | sidecars.keys():
                init_peak[name] = max(init_peak[name], requests.get(name, 0) + sidecars[name])
    regular: dict[str, int] = defaultdict(int)
    for raw in _sequence(spec.get("containers")):
        for name, amount in _container_requests(_mapping(raw)).items():
            regular[name] += amount
    names = regular.keys() | sidecars.keys() | init_peak.keys()
    totals = {name: max(regular[name] + sidecars[name], init_peak[name]) for name in names}
    return {name: amount for name, amount in totals.items() if amount}


def pod_info_from_dict(obj: Mapping[str, Any]) -> PodInfo:
    """A PodInfo from a Pod's Kubernetes JSON."""
    metadata, spec, status = (_mapping(obj.get(key)) for key in ("metadata", "spec", "status"))
    labels = _mapping(metadata.get("labels"))
    node_name = spec.get("nodeName")
    service = labels.get(SERVICE_LABEL)
    pool = labels.get(POOL_LABEL)
    bound_at = _transition_time(_condition(status, "PodScheduled"))
    ready_at = _transition_time(_condition(status, "Ready"))
    return PodInfo(
        name=str(metadata.get("name", "")),
        namespace=str(metadata.get("namespace", "")),
        node_name=str(node_name) if node_name else None,
        phase=str(status.get("phase") or "Pending"),
        requests=effective_requests(spec),
        service=str(service) if service is not None else None,
        pool=str(pool) if pool is not None else None,
        ready=ready_at is not None or _condition(status, "Ready").get("status") == "True",
        terminating=bool(metadata.get("deletionTimestamp")),
        bound_at=bound_at,
        ready_at=ready_at,
        failing=_failing(status),
    )


#: Why a container waits while it is being started normally.
_STARTING_WAITS = frozenset({"ContainerCreating", "PodInitializing"})


def _failing(status: Mapping[str, Any]) -> bool:
    for key in ("initContainerStatuses", "containerStatuses"):
        for raw in _sequence(status.get(key)):
            container = _mapping(raw)
            if container.get("restartCount"):
                return True
            waiting = _mapping(_mapping(container.get("state")).get("waiting"))
            if waiting and waiting.get("reason") not in _STARTING_WAITS:
                return True
    return False


def _condition(status: Mapping[str, Any], kind: str) -> Mapping[str, Any]:
    for raw in _sequence(status.get("conditions")):
        condition = _mapping(raw)
        if condition.get("type") == kind:
            return condition
    return {}


def _transition_time(condition: Mapping[str, Any]) -> datetime | None:
    """When a True condition last turned True (None: not True, or no parsable time)."""
    if condition.get("status") != "True":
        return None
    try:
        return parse_time(str(condition.get("lastTransitionTime") or ""))
    except InvalidValueError:
        return None


# --- Selectors and taints ------------------------------------------------------------------


def namespace_matches(selector: LabelSelector | None, labels: Mapping[str, str]) -> bool:
    """Whether a namespace with `labels` is selected. No selector selects every namespace,
    and so does an empty one, as in Kubernetes."""
    if selector is None:
        return True
    for key, value in (selector.match_labels or {}).items():
        if labels.get(key) != value:
            return False
    for requirement in selector.match_expressions or ():
        present = requirement.key in labels
        values = requirement.values or []
        if requirement.operator == "Exists":
            holds = present
        elif requirement.operator == "DoesNotExist":
            holds = not present
        elif requirement.operator == "In":
            holds = present and labels[requirement.key] in values
        else:  # NotIn: also satisfied when the label is absent
            holds = not present or labels[requirement.key] not in values
        if not holds:
            return False
    return True


def tolerates(toleration: Toleration, taint: Taint) -> bool:
    """Whether `toleration` tolerates `taint`, with Kubernetes' matching rules."""
    if toleration.effect is not None and toleration.effect != taint.effect:
        return False
    if toleration.key is None:
        # Only operator Exists may omit the key; it then tolerates every taint.
        return toleration.operator == "Exists"
    if toleration.key != taint.key:
        return False
    return toleration.operator == "Exists" or (toleration.value or "") == taint.value


def node_in_pool(node: NodeInfo, pool: GPUPool) -> bool:
    """Whether the pool's node selector selects `node`."""
    return all(node.labels.get(key) == value for key, value in pool.spec.node_selector.items())


def node_accepts_pool_pods(node: NodeInfo, pool: GPUPool) -> bool:
    """Whether a new pod of the pool could be scheduled on `node` (capacity aside)."""
    if not node.ready or node.unschedulable:
        return False
    tolerations = pool.spec.tolerations or ()
    return all(
        any(tolerates(toleration, taint) for toleration in tolerations)
        for taint in node.taints
        if taint.effect in BLOCKING_EFFECTS
    )


# --- The pool's numbers --------------------------------------------------------------------


@dataclass(frozen=True)
class PoolUsage:
    """A pool's GPUs as observed: the numbers of its status and the per-namespace split
    that quota checks need."""

    nodes: int
    ready_nodes: int
    capacity: int
    allocated: int
    available: int
    largest_node_gpus: int
    #: Free GPUs on each ready node, by node name: whether a replica fits depends on one
    #: node having enough, not on the pool's total.
    free_gpus_by_node: Mapping[str, int]
    #: GPUs of the pool held or awaited by each namespace's pods.
    allocated_by_namespace: Mapping[str, int]
    #: The same, by (namespace, AIService name), for pods of an AIService.
    allocated_by_service: Mapping[tuple[str, str], int]
    #: GPUs an AIService's pods hold on the pool's nodes (bound pods only): its placed
    #: replicas, as opposed to those still waiting for a node.
    bound_by_service: Mapping[tuple[str, str], int] = field(default_factory=dict)
    #: What the pool counts, for messages: its resourceName, or its DeviceClass's devices
    #: (a label, not a number: left out of comparisons).
    unit: str = field(default="", compare=False)
    #: Why a DRA pool's devices cannot be counted (reason, message); None when they can.
    device_problem: tuple[str, str] | None = None

    def namespace_allocated(self, namespace: str, *, excluding_service: str | None = None) -> int:
        """GPUs `namespace` holds in the pool, leaving out one service's own pods (so a
        service is not counted against itself when its admission is checked again)."""
        total = self.allocated_by_namespace.get(namespace, 0)
        if excluding_service is not None:
            total -= self.allocated_by_service.get((namespace, excluding_service), 0)
        return total

    def replicas_that_fit(self, gpus_per_replica: int) -> int:
        """How many more replicas of `gpus_per_replica` GPUs the free GPUs can hold."""
        if gpus_per_replica <= 0:
            msg = f"gpus_per_replica must be positive, got {gpus_per_replica}"
            raise ValueError(msg)
        return sum(free // gpus_per_replica for free in self.free_gpus_by_node.values())


def pool_unit(pool: GPUPool) -> str:
    """What the pool's numbers count, as messages name it."""
    devices = pool.spec.devices
    if devices is None:
        return pool.spec.resource_name
    matching = " matching spec.devices.selector" if devices.selector is not None else ""
    return f"devices of DeviceClass {devices.device_class_name}{matching}"


@dataclass(frozen=True)
class _DeviceCount:
    """A DRA pool's devices on each node: how many it may use, and which claims hold them."""

    on_node: Mapping[str, int]
    held_on_node: Mapping[str, int]
    holders: tuple[ClaimHolder, ...]
    #: Nodes whose extended resource the device plugin serves, not DRA (KEP-5004).
    plugin_nodes: frozenset[str]
    problem: tuple[str, str] | None = None


def _count_devices(
    pool: GPUPool, pool_nodes: Mapping[str, NodeInfo], inventory: DeviceInventory | None
) -> _DeviceCount:
    devices = pool.spec.devices
    assert devices is not None
    resource = pool.spec.resource_name
    name = devices.device_class_name
    selection = inventory.device_class(name) if inventory is not None else None
    empty = _DeviceCount(on_node={}, held_on_node={}, holders=(), plugin_nodes=frozenset())
    if selection is None:
        return replace(
            empty,
            problem=(
                "DeviceClassNotFound",
                f"DeviceClass {name} does not exist: install the DRA driver's DeviceClass or fix "
                "spec.devices.deviceClassName",
            ),
        )
    if selection.unsupported_expression is not None:
        return replace(
            empty,
            problem=(
                "DeviceClassUnsupported",
                f"gpuyard cannot count the devices of DeviceClass {name}: its selector "
                f"{selection.unsupported_expression!r} is not of the form device.driver == "
                '"<driver>" (optionally && device.attributes["<domain>"].<name> == "<value>"); '
                "use a DeviceClass of that form for the pool",
            ),
        )
    extended = devices.request == "ExtendedResource"
    if extended and selection.extended_resource_name != resource:
        return replace(
            empty,
            problem=(
                "DeviceClassMismatch",
                f"spec.devices.request is ExtendedResource, but DeviceClass {name} maps "
                f"{selection.extended_resource_name or 'no extended resource'}, not "
                f"{resource}: set the class's spec.extendedResourceName to {resource}, or use "
                "request ClaimTemplate",
            ),
        )
    on_node: dict[str, int] = {}
    held_on_node: dict[str, int] = {}
    holders: list[ClaimHolder] = []
    plugin_nodes = set()
    for node_name, node in pool_nodes.items():
        # KEP-5004: the scheduler serves an extended resource from the device plugin on a
        # node that advertises it in allocatable, and from the class's devices elsewhere.
        if extended and node.allocatable.get(resource, 0) > 0:
            plugin_nodes.add(node_name)
            continue
        count = held = 0
        for key, device in current_devices(inventory.slices_on(node_name) if inventory else ()):
            if not selection.selects(device) or not device_matches(device, devices.selector):
                continue
            count += 1
            holder = inventory.holder(key) if inventory is not None else None
            if holder is not None:
                held += 1
                holders.append(holder)
        on_node[node_name], held_on_node[node_name] = count, held
    return _DeviceCount(
        on_node=on_node,
        held_on_node=held_on_node,
        holders=tuple(holders),
        plugin_nodes=frozenset(plugin_nodes),
    )


def compute_pool_usage(
    pool: GPUPool,
    nodes: Iterable[NodeInfo],
    pods: Iterable[PodInfo],
    devices: DeviceInventory | None = None,
) -> PoolUsage:
    """The pool's usage from every Node and every (GPU-requesting) Pod of the cluster, and
    for a DRA pool (spec.devices) from the ResourceSlices and ResourceClaims in `devices`.

    Pods count against a namespace once bound to one of the pool's nodes, or, while still
    pending, when labelled for the pool: a quota must also hold the replicas waiting for
    GPUs, or a namespace could queue past it.

    A DRA pool's node offers the devices of its slices that the DeviceClass and the pool's
    selector take; a device is allocated while any claim (of any namespace) holds it. With
    request ExtendedResource the pods still ask for resourceName and count per namespace
    as above, but their GPUs on DRA nodes are counted from the claims the scheduler made
    for them, not twice. With ClaimTemplate the claims also give the namespace split.
    """
    resource = pool.spec.resource_name
    pool_nodes = {node.name: node for node in nodes if node_in_pool(node, pool)}
    usable = {name for name, node in pool_nodes.items() if node_accepts_pool_pods(node, pool)}
    dra = _count_devices(pool, pool_nodes, devices) if pool.spec.devices is not None else None

    held_on_node: dict[str, int] = defaultdict(int)
    by_namespace: dict[str, int] = defaultdict(int)
    by_service: dict[tuple[str, str], int] = defaultdict(int)
    bound_by_service: dict[tuple[str, str], int] = defaultdict(int)
    counts_pods = (
        dra is None
        or pool.spec.devices is None
        or (pool.spec.devices.request == "ExtendedResource")
    )
    for pod in pods if counts_pods else ():
        amount = pod.requests.get(resource, 0)
        if amount <= 0 or pod.phase in FINISHED_PHASES:
            continue
        if pod.node_name is not None:
            if pod.node_name not in pool_nodes:
                continue
            if dra is None or pod.node_name in dra.plugin_nodes:
                held_on_node[pod.node_name] += amount
        elif pod.pool != pool.name:
            continue
        by_namespace[pod.namespace] += amount
        if pod.service is not None:
            by_service[(pod.namespace, pod.service)] += amount
            if pod.node_name is not None:
                bound_by_service[(pod.namespace, pod.service)] += amount

    allocatable = {
        name: dra.on_node.get(name, 0)
        if dra is not None and name not in dra.plugin_nodes
        else pool_nodes[name].allocatable.get(resource, 0)
        for name in usable
    }
    for name, held in dra.held_on_node.items() if dra is not None else ():
        held_on_node[name] += held
    for holder in dra.holders if dra is not None and not counts_pods else ():
        by_namespace[holder.namespace] += 1
        if holder.service is not None:
            by_service[(holder.namespace, holder.service)] += 1
            bound_by_service[(holder.namespace, holder.service)] += 1
    free = {name: max(0, allocatable[name] - held_on_node[name]) for name in usable}
    return PoolUsage(
        nodes=len(pool_nodes),
        ready_nodes=len(usable),
        capacity=sum(allocatable.values()),
        allocated=sum(held_on_node.values()),
        available=sum(free.values()),
        largest_node_gpus=max(allocatable.values(), default=0),
        free_gpus_by_node=free,
        allocated_by_namespace=dict(by_namespace),
        allocated_by_service=dict(by_service),
        bound_by_service=dict(bound_by_service),
        unit=pool_unit(pool),
        device_problem=dra.problem if dra is not None else None,
    )
