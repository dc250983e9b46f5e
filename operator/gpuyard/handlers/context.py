"""What every reconciler gets: settings, the API client, metrics and the informer caches."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ParamSpec, TypeVar

from gpuyard.api.names import ServiceKey
from gpuyard.api.pool import GPUPool
from gpuyard.config import Settings
from gpuyard.handlers.scaling import ScalingBook
from gpuyard.handlers.workqueue import WorkQueue
from gpuyard.io.kube import Kube
from gpuyard.io.metrics import OperatorMetrics
from gpuyard.io.prometheus import Prometheus
from gpuyard.io.sinks import MultiSink
from gpuyard.logic.claimed_devices import HeldDevice, device_uuid
from gpuyard.logic.devices import ClaimHolder, ClassSelection, DeviceKey, SliceInfo
from gpuyard.logic.metering import Account, PricePoint, ServiceMark
from gpuyard.logic.news import deployment_read, service_read, status_read
from gpuyard.logic.pool_accounting import NodeInfo, PoolUsage
from gpuyard.logic.startup import Start

P = ParamSpec("P")
R = TypeVar("R")


def _single(store: Any) -> Any | None:
    """The one value of a Kopf store, or None: these indices are keyed by object name, so
    each store holds at most one value."""
    return next(iter(store), None) if store is not None else None


@dataclass
class Caches:
    """Kopf's indices, read-only views kept current by the watch streams."""

    pools: Any
    services: Any
    services_by_pool: Any
    nodes: Any
    gpu_pods: Any
    deployments: Any
    network_services: Any
    disruption_budgets: Any
    namespaces: Any
    metered_pods: Any
    replicasets: Any
    deployment_owners: Any
    #: The services' ResourceClaimTemplates, by service: a service has several while a
    #: rollout moves its pods from one claim spec to the next.
    claim_templates_by_service: Any = field(default_factory=dict)
    resource_claims: Any = field(default_factory=dict)
    #: DRA: ResourceSlices by node, allocated devices by (driver, pool, device), and
    #: DeviceClasses by name. Empty where nothing indexes them (unit tests, benchmarks of
    #: device-plugin pools), which is a cluster with no DRA devices.
    resource_slices: Any = field(default_factory=dict)
    allocated_devices: Any = field(default_factory=dict)
    device_classes: Any = field(default_factory=dict)

    def pool(self, name: str) -> dict[str, Any] | None:
        return _single(self.pools.get(name))

    def service(self, key: ServiceKey) -> dict[str, Any] | None:
        return _single(self.services.get(key))

    def deployment(self, key: ServiceKey) -> dict[str, Any] | None:
        return _single(self.deployments.get(key))

    def network_service(self, key: ServiceKey) -> dict[str, Any] | None:
        return _single(self.network_services.get(key))

    def disruption_budget(self, key: ServiceKey) -> dict[str, Any] | None:
        return _single(self.disruption_budgets.get(key))

    def claim_templates(self, key: ServiceKey) -> list[dict[str, Any]]:
        return list(self.claim_templates_by_service.get(key, ()))

    def resource_claim(self, namespace: str, name: str) -> dict[str, Any] | None:
        return _single(self.resource_claims.get((namespace, name)))

    def device_uuid(self, node: str, driver: str, pool: str, device: str) -> str:
        """The `uuid` attribute of a device in `node`'s ResourceSlices ("" without one)."""
        for info in self.slices_on(node):
            if (info.driver, info.pool) == (driver, pool):
                for published in info.devices:
                    if published.name == device:
                        return device_uuid(published)
        return ""

    def namespace_labels(self, name: str) -> dict[str, str] | None:
        return _single(self.namespaces.get(name))

    def pool_names(self) -> list[str]:
        return list(self.pools)

    def service_keys(self) -> list[ServiceKey]:
        return list(self.services)

    def services_of_pool(self, pool: str) -> list[ServiceKey]:
        return list(self.services_by_pool.get(pool, ()))

    def services_in_namespace(self, namespace: str) -> list[ServiceKey]:
        return [key for key in self.services if key[0] == namespace]

    def node(self, name: str) -> NodeInfo | None:
        return _single(self.nodes.get(name))

    def owner_metadata(self, namespace: str, kind: str, name: str) -> dict[str, Any] | None:
        """The metadata of a pod's possible owner, for the ownership chain of the meter."""
        if kind == "ReplicaSet":
            return _single(self.replicasets.get((namespace, name)))
        if kind == "Deployment":
            return _single(self.deployment_owners.get((namespace, name)))
        if kind == "AIService":
            body = self.service((namespace, name))
            return body["metadata"] if body is not None else None
        return None

    def all_nodes(self) -> Iterator[Any]:
        for name in list(self.nodes):
            node = _single(self.nodes.get(name))
            if node is not None:
                yield node

    def all_metered_pods(self) -> Iterator[dict[str, Any]]:
        for uid in list(self.metered_pods):
            pod = _single(self.metered_pods.get(uid))
            if pod is not None:
                yield pod

    def all_gpu_pods(self) -> Iterator[Any]:
        for node in list(self.gpu_pods):
            yield from list(self.gpu_pods.get(node, ()))

    # The DeviceInventory of gpuyard.logic.devices: pool accounting reads DRA through these.

    def slices_on(self, node: str) -> Iterable[SliceInfo]:
        return list(self.resource_slices.get(node, ()))

    def holder(self, device: DeviceKey) -> ClaimHolder | None:
        return _single(self.allocated_devices.get(device))

    def device_class(self, name: str) -> ClassSelection | None:
        return _single(self.device_classes.get(name))

    def all_device_classes(self) -> Iterable[ClassSelection]:
        return [found for name in list(self.device_classes) if (found := self.device_class(name))]


@dataclass
class Operator:
    """One running operator; Kopf's memo holds it."""

    settings: Settings
    kube: Kube
    metrics: OperatorMetrics
    caches: Caches
    prometheus: Prometheus | None = None
    sinks: MultiSink | None = None
    pool_queue: WorkQueue[str] = field(init=False)
    service_queue: WorkQueue[ServiceKey] = field(init=False)
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    #: Each pool's usage as its last reconcile computed it (services read it, O(1)).
    pool_usage: dict[str, PoolUsage] = field(default_factory=dict)
    #: Each pool as the service reconcile last parsed it, with the resourceVersion parsed
    #: (None: the pool does not parse).
    parsed_pools: dict[str, tuple[str | None, GPUPool | None]] = field(default_factory=dict)
    #: Each service's autoscaling: the autoscaler's decisions, which the service reconcile
    #: applies, and what the autoscaler carries from one tick to the next.
    scaling: ScalingBook = field(default_factory=ScalingBook)
    #: The last usage mark the meter wrote per account (the cache may lag the write).
    marks: dict[Account, ServiceMark] = field(default_factory=dict)
    #: Pods seen deleted but not yet fully billed: uid -> (last state, when seen gone).
    gone_pods: dict[str, tuple[dict[str, Any], datetime]] = field(default_factory=dict)
    #: Each pool's price history as the meter last wrote it (the cache may lag the write).
    price_histories: dict[str, tuple[PricePoint, ...]] = field(default_factory=dict)
    #: The pool each metered pod's node belonged to when last seen (for a deleted node).
    pod_pools: dict[str, str] = field(default_factory=dict)
    #: The AIService each metered pod is billed to (None: unmanaged), decided once.
    pod_services: dict[str, str | None] = field(default_factory=dict)
    #: The DRA devices each metered pod holds, by DeviceClass, fixed once seen allocated:
    #: its claims may go before its last second is billed (they are deleted with the pod).
    pod_devices: dict[str, dict[str, tuple[HeldDevice, ...]]] = field(default_factory=dict)
    #: When each metered pod was first seen Ready: its start ended there (its records'
    #: starting GPU-seconds stop there, whatever its readiness later).
    pod_ready: dict[str, datetime] = field(default_factory=dict)
    #: Since when each pod's owner has been unknown to the caches.
    owner_wait: dict[str, datetime] = field(default_factory=dict)
    #: Each account's delivery in progress: a slow sink delays only its own account.
    deliveries: dict[Account, asyncio.Task[None]] = field(default_factory=dict)
    #: Each account's last delivery outcome: None when it went through, else why not
    #: (a reason and a message); services show it as their UsageReported condition.
    usage_problems: dict[Account, tuple[str, str] | None] = field(default_factory=dict)
    #: Each service's status fields as the service reconcile last wrote them.
    own_status: dict[ServiceKey, dict[str, Any]] = field(default_factory=dict)
    #: What the last reconcile of each service read of it (``logic.news``: the metadata
    #: and spec, then the status), and of its Deployment; an event that changes none of
    #: it needs no reconcile.
    service_reads: dict[ServiceKey, tuple[tuple[Any, ...], dict[str, Any]]] = field(
        default_factory=dict
    )
    deployment_reads: dict[ServiceKey, tuple[Any, ...]] = field(default_factory=dict)
    #: The replicas each service would run without its namespace's quota, as its last
    #: reconcile computed them (0 while refused): its claim in its siblings' fair shares.
    quota_wants: dict[ServiceKey, int] = field(default_factory=dict)
    #: Each service's recent cold starts (``logic.startup``), which its status shows; kept
    #: by the autoscaler, which sees every pod change.
    startups: dict[ServiceKey, tuple[Start, ...]] = field(default_factory=dict)
    #: Services refused at the last reconcile, with the reason (for logs and metrics).
    not_accepted: dict[ServiceKey, str] = field(default_factory=dict)

    #: Bounds the deliveries in flight at once (GPUYARD_METER_CONCURRENCY).
    delivery_slots: asyncio.Semaphore = field(init=False)

    def __post_init__(self) -> None:
        self.delivery_slots = asyncio.Semaphore(self.settings.meter_concurrency)

    async def io(self, call: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        """Run a blocking API call in a worker thread.

        Reconciles run on the event loop, where reading Kopf's caches is safe; only the
        network calls of the (synchronous) Kubernetes client leave it.
        """
        return await asyncio.to_thread(call, *args, **kwargs)

    def forget_pool(self, name: str) -> None:
        self.pool_usage.pop(name, None)
        self.parsed_pools.pop(name, None)
        self.metrics.pool_gpus.clear()

    def forget_service(self, key: ServiceKey) -> None:
        for state in ("desired", "ready"):
            with contextlib.suppress(KeyError):
                self.metrics.service_replicas.remove(key[0], key[1], state)
        self.scaling.forget(key)
        self.own_status.pop(key, None)
        self.service_reads.pop(key, None)
        self.deployment_reads.pop(key, None)
        self.usage_problems.pop(Account(*key), None)
        self.quota_wants.pop(key, None)
        self.startups.pop(key, None)
        self.set_refused(key, None)

    def remember_reads(self, key: ServiceKey, body: Mapping[str, Any]) -> None:
        """Record the AIService body a reconcile of ``key`` starts from."""
        self.service_reads[key] = (service_read(body), status_read(body.get("status")))

    def remember_deployment(self, key: ServiceKey, live: Mapping[str, Any] | None) -> None:
        """Record the Deployment a reconcile of ``key`` read (None: none, or not read)."""
        if live is None:
            self.deployment_reads.pop(key, None)
        else:
            self.deployment_reads[key] = deployment_read(live)

    def service_changed(self, key: ServiceKey) -> bool:
        """Whether the cached AIService holds anything its last reconcile did not read:
        a status other than the one that reconcile wrote (or read, if it wrote none)
        counts, the meter's usage and the API server's bookkeeping do not."""
        body = self.caches.service(key)
        reads = self.service_reads.get(key)
        if body is None or reads is None:
            return True
        read, status = reads
        own = self.own_status.get(key)
        expected = status_read(own) if own is not None else status
        return service_read(body) != read or status_read(body.get("status")) != expected

    def deployment_changed(self, key: ServiceKey) -> bool:
        """Whether the cached Deployment of ``key`` holds anything the service's last
        reconcile did not read (its controller's conditions and observed generation do
        not count)."""
        live = self.caches.deployment(key)
        read = self.deployment_reads.get(key)
        return live is None or read is None or deployment_read(live) != read

    def set_refused(self, key: ServiceKey, reason: str | None) -> None:
        """Record whether a service is refused (and why), for logs and the metric."""
        if reason is None:
            self.not_accepted.pop(key, None)
        else:
            self.not_accepted[key] = reason
        self.metrics.services_not_accepted.clear()
        for refused in self.not_accepted.values():
            self.metrics.services_not_accepted.labels(reason=refused).inc()

    def record_reconcile(self, kind: str, seconds: float, ok: bool) -> None:
        self.metrics.reconciles.labels(kind=kind, result="ok" if ok else "error").inc()
        self.metrics.reconcile_seconds.labels(kind=kind).observe(seconds)
