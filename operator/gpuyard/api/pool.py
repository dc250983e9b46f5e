"""GPUPool: a cluster-scoped set of GPU nodes of one type, with a price per GPU-hour.

The spec says which nodes belong to the pool (a node selector), how the pool's pods reach
them (tolerations, the extended resource to request), who may use the pool and how much
(namespace selector, per-namespace quota) and what a GPU-hour costs. The status is computed
by the operator from real Nodes and Pods (see `gpuyard.logic.pool_accounting`).
"""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Final, Literal

from pydantic import Field, StringConstraints

from gpuyard.api.common import (
    DNS1123_LABEL_PATTERN,
    DNS1123_SUBDOMAIN_PATTERN,
    DNS_LABEL_MAX_LENGTH,
    AmountString,
    ApiModel,
    ApiObject,
    CelRule,
    ConditionList,
    CurrencyCode,
    DecimalString,
    DnsLabel,
    DnsSubdomain,
    ExtendedResourceName,
    Generation,
    LabelMap,
    LabelSelector,
    ObjectMeta,
    Timestamp,
    Toleration,
)
from gpuyard.api.formats import parse_decimal
from gpuyard.api.names import DEFAULT_RESOURCE_NAME
from gpuyard.api.workload import Quantity

KIND: Final = "GPUPool"
PLURAL = "gpupools"
#: GPU counts are bounded so that every sum the operator makes fits comfortably in an int64.
MAX_GPU_COUNT = 10_000_000
MAX_NODE_COUNT = 1_000_000

#: A pool's name becomes the value of the `gpuyard.io/pool` label on every child, so it must
#: be a valid label value as well as an object name: an RFC 1123 label.
POOL_NAME_PATTERN = DNS1123_LABEL_PATTERN
POOL_NAME_MAX_LENGTH = DNS_LABEL_MAX_LENGTH


#: A transition rule: totals summed in one currency must never silently change unit.
CURRENCY_IMMUTABLE: Final = {
    "x-kubernetes-validations": [
        {
            "rule": "self == oldSelf",
            "message": "price.currency cannot be changed: create a new GPUPool with the new "
            "currency and move services to it (spec.pool)",
        }
    ]
}


class Price(ApiModel):
    """What one GPU of the pool costs per hour."""

    per_gpu_hour: DecimalString
    """Price of one GPU-hour, a decimal string such as "2.75" (never a float). A change
    applies from the first usage window that starts after the operator sees it."""
    currency: Annotated[CurrencyCode, Field(json_schema_extra=CURRENCY_IMMUTABLE)] = "USD"
    """ISO 4217 currency code of every amount derived from this price; fixed for the
    pool's life (a new currency is a new pool)."""

    @property
    def per_gpu_hour_decimal(self) -> Decimal:
        """The price as an exact decimal."""
        return parse_decimal(self.per_gpu_hour)


#: A device attribute or capacity name as DRA spells it (resource.k8s.io/v1 QualifiedName):
#: a C identifier of at most 32 characters, optionally after a DNS-subdomain domain and a
#: slash. A short name is read in the driver's own domain, as the API server does in CEL.
DEVICE_ATTRIBUTE_NAME_PATTERN = (
    rf"^({DNS1123_SUBDOMAIN_PATTERN.strip('^$')}/)?[A-Za-z_][A-Za-z0-9_]{{0,31}}$"
)
#: 63 characters of domain, the slash, 32 of identifier.
DEVICE_ATTRIBUTE_NAME_MAX_LENGTH = 96
#: Printable ASCII only: the value lands inside a CEL string literal, and with no control
#: characters or non-ASCII text the only characters to escape are the quote and the backslash.
#: DRA bounds a string attribute to 64 characters, so a longer value could never match.
DEVICE_ATTRIBUTE_VALUE_PATTERN = r"^[ -~]*$"
DEVICE_ATTRIBUTE_VALUE_MAX_LENGTH = 64
#: Few keys, so the generated CEL (and its cost in the API server) stays small.
MAX_DEVICE_SELECTOR_KEYS = 8

DeviceAttributeName = Annotated[
    str,
    StringConstraints(
        max_length=DEVICE_ATTRIBUTE_NAME_MAX_LENGTH, pattern=DEVICE_ATTRIBUTE_NAME_PATTERN
    ),
    Field(description="a device attribute name"),
]
DeviceAttributeValue = Annotated[
    str,
    StringConstraints(
        max_length=DEVICE_ATTRIBUTE_VALUE_MAX_LENGTH, pattern=DEVICE_ATTRIBUTE_VALUE_PATTERN
    ),
]


class DeviceSelector(ApiModel):
    """Which of the class's devices the pool's services may get, by attribute and capacity."""

    attributes: (
        Annotated[
            dict[DeviceAttributeName, DeviceAttributeValue],
            Field(min_length=1, max_length=MAX_DEVICE_SELECTOR_KEYS),
        ]
        | None
    ) = None
    """String attributes a device must have with exactly these values, such as
    productName: NVIDIA H100 80GB HBM3. A short name is in the driver's domain
    (gpu.nvidia.com for NVIDIA's driver); a name with a domain prefix is used as written."""
    min_capacity: (
        Annotated[
            dict[DeviceAttributeName, Quantity],
            Field(min_length=1, max_length=MAX_DEVICE_SELECTOR_KEYS),
        ]
        | None
    ) = None
    """Least capacity a device must have, such as memory: 40Gi; same naming as attributes."""


def _selector_only_with_claim_template(devices: DevicePool) -> bool:
    return devices.request != "ExtendedResource" or devices.selector is None


class DevicePool(ApiModel):
    """The pool's GPUs come from Dynamic Resource Allocation: devices in ResourceSlices."""

    cel_rules = (
        CelRule(
            rule="self.request != 'ExtendedResource' || !has(self.selector)",
            message="devices.selector needs request ClaimTemplate: with ExtendedResource the "
            "scheduler makes the claim from the DeviceClass alone and cannot narrow it",
            holds=_selector_only_with_claim_template,
            field_path=".selector",
        ),
    )

    device_class_name: DnsSubdomain
    """The DeviceClass whose devices make the pool, such as gpu.nvidia.com."""
    request: Literal["ClaimTemplate", "ExtendedResource"] = "ClaimTemplate"
    """How the pool's pods get devices. ClaimTemplate: each pod gets a ResourceClaim from a
    ResourceClaimTemplate the operator writes for the service. ExtendedResource: pods request
    resourceName in their limits and the scheduler serves it from the DeviceClass whose
    extendedResourceName it is (Kubernetes DRAExtendedResource)."""
    selector: DeviceSelector | None = None
    """Narrows the class's devices (ClaimTemplate only); absent means every device of the
    class on the pool's nodes."""


def _outside_kubernetes_io(spec: GPUPoolSpec) -> bool:
    domain = spec.resource_name.split("/", 1)[0]
    return domain != "kubernetes.io" and not domain.endswith(".kubernetes.io")


class GPUPoolSpec(ApiModel):
    """A set of GPU nodes of one type, with a price, offered to some or all namespaces."""

    cel_rules = (
        CelRule(
            rule="!self.resourceName.startsWith('kubernetes.io/') && "
            "!self.resourceName.contains('.kubernetes.io/')",
            message="resourceName must be an extended resource outside the kubernetes.io "
            "domain, such as nvidia.com/gpu",
            holds=_outside_kubernetes_io,
            field_path=".resourceName",
        ),
    )

    gpu_type: DnsLabel
    """GPU model of the pool's nodes, such as a100-80gb; shown to users and in usage records."""
    resource_name: ExtendedResourceName = DEFAULT_RESOURCE_NAME
    """Extended resource the pods request: nvidia.com/gpu, or a MIG resource such as
    nvidia.com/mig-1g.10gb. With devices.request ExtendedResource, the name the DeviceClass
    maps; with ClaimTemplate, unused."""
    devices: DevicePool | None = None
    """The pool's GPUs are DRA devices of a DeviceClass; absent means a device-plugin pool
    whose nodes advertise resourceName in their allocatable."""
    node_selector: Annotated[LabelMap, Field(min_length=1, max_length=16)]
    """Labels that select the pool's nodes; also the pods' nodeSelector."""
    tolerations: Annotated[list[Toleration], Field(max_length=16)] | None = None
    """Tolerations added to the pool's pods, typically for a taint on the GPU nodes."""
    price: Price
    """Price per GPU-hour used for usage records and budgets."""
    namespace_selector: LabelSelector | None = None
    """Namespaces allowed to use the pool; absent means every namespace."""
    max_gpus_per_namespace: Annotated[int, Field(ge=0, le=MAX_GPU_COUNT)] | None = None
    """Quota: most GPUs of this pool that one namespace may hold, at every replica change
    (the namespace's services share it fairly; lowering it scales them down); absent means
    no quota."""
    priority_class_names: Annotated[list[DnsSubdomain], Field(max_length=16)] | None = None
    """PriorityClasses the pool's services may name in spec.priorityClassName; absent means
    none (a priority may preempt other teams' replicas, so the platform team chooses)."""
    utilization_metric: Literal["DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_PROF_GR_ENGINE_ACTIVE"] = (
        "DCGM_FI_DEV_GPU_UTIL"
    )
    """DCGM series measuring utilisation; DCGM_FI_PROF_GR_ENGINE_ACTIVE for MIG slices,
    where DCGM_FI_DEV_GPU_UTIL is not reported."""


Count = Annotated[int, Field(ge=0, le=MAX_GPU_COUNT)]
NodeCount = Annotated[int, Field(ge=0, le=MAX_NODE_COUNT)]
#: Matches logic.metering.MAX_PRICE_POINTS, which trims the history to it.
MAX_PRICE_POINTS = 100
MAX_UNMANAGED_NAMESPACES = 1000


class PricePoint(ApiModel):
    """The pool's price from one moment on."""

    effective_from: Timestamp
    """Windows starting at or after this moment are priced at perGpuHour."""
    per_gpu_hour: DecimalString
    """Price of one GPU-hour."""


class UnmanagedUsage(ApiModel):
    """What one namespace's pods of no AIService have used of the pool's GPUs."""

    namespace: DnsLabel
    """The namespace billed."""
    gpu_seconds: Annotated[int, Field(ge=0, le=2**53)]
    """GPU-seconds held."""
    cost: AmountString
    """Their cost, a decimal string in currency."""
    currency: CurrencyCode | None = None
    """ISO 4217 code of cost (absent until the first record)."""
    reported_through: Timestamp
    """Usage up to this moment is included."""


class PoolBilling(ApiModel):
    """What the meter keeps about the pool (written by the meter alone)."""

    price_history: Annotated[list[PricePoint], Field(max_length=MAX_PRICE_POINTS)] | None = None
    """Every price the operator has seen, oldest first: it prices each window by the point in
    force at the window's start, after restarts too."""
    unmanaged_gpus: Count | None = None
    """GPUs held on the pool's nodes by pods that belong to no AIService (billed as
    unmanaged usage of their namespace)."""
    unmanaged_usage: (
        Annotated[list[UnmanagedUsage], Field(max_length=MAX_UNMANAGED_NAMESPACES)] | None
    ) = None
    """Usage of pods of no AIService, per namespace."""


class GPUPoolStatus(ApiModel):
    """The pool as the operator last observed it."""

    observed_generation: Generation | None = None
    """The metadata.generation this status was computed from."""
    nodes: NodeCount | None = None
    """Nodes matching the node selector."""
    ready_nodes: NodeCount | None = None
    """Nodes that can take new pods: Ready, not cordoned, every blocking taint tolerated."""
    capacity: Count | None = None
    """Allocatable GPUs on the ready nodes."""
    allocated: Count | None = None
    """GPUs requested by pods that run, or are about to run, on the pool's nodes."""
    available: Count | None = None
    """GPUs free on the ready nodes."""
    largest_node_gpus: Count | None = None
    """Most allocatable GPUs on one ready node: the largest replica the pool can hold."""
    conditions: ConditionList | None = None
    """Ready tells whether the pool has nodes to schedule on; Reconciling (waiting for
    nodes) and Stalled (never True) say it as kstatus (Flux) reads it."""
    billing: PoolBilling | None = None
    """Prices seen and unmanaged usage, kept by the meter."""


class PoolMeta(ObjectMeta):
    """GPUPool metadata, with the name restricted to what a label value can hold."""

    name: Annotated[
        str,
        StringConstraints(min_length=1, max_length=POOL_NAME_MAX_LENGTH, pattern=POOL_NAME_PATTERN),
    ]


class GPUPool(ApiObject):
    """A whole GPUPool object as the API returns it."""

    kind: Literal["GPUPool"] = KIND
    metadata: PoolMeta
    spec: GPUPoolSpec
