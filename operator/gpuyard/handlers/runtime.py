"""Start-up and the Kopf wiring: every Kopf registration of gpuyard is in ``build_registry``.

Kopf does the watching; its in-memory indices are gpuyard's informer caches (nodes, GPU
pods, pools, services, children, namespaces), kept current from the watch streams, so
no reconcile ever lists the cluster. Watch events only enqueue keys; the work queues
(``workqueue.py``) run the reconcilers in ``pools.py`` and ``services.py``.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import secrets
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import kopf
import psycopg
from prometheus_client import start_http_server
from pythonjsonlogger.json import JsonFormatter

from gpuyard import API_GROUP, API_VERSION
from gpuyard.api.names import SERVICE_LABEL, ServiceKey
from gpuyard.config import Settings
from gpuyard.handlers.autoscaler import autoscale_forever
from gpuyard.handlers.context import Caches, Operator
from gpuyard.handlers.leadership import Elector
from gpuyard.handlers.meter import meter_forever, slim_pod
from gpuyard.handlers.pools import reconcile_pool
from gpuyard.handlers.services import reconcile_service
from gpuyard.handlers.workqueue import WorkQueue
from gpuyard.io.kube import Kube, connection_info, make_api_client
from gpuyard.io.lease import LeaseClient
from gpuyard.io.metrics import OperatorMetrics
from gpuyard.io.pgledger import ConnectionSource, PostgresSink, SchemaError, migrate_database
from gpuyard.io.prometheus import Prometheus
from gpuyard.io.sinks import (
    HttpCloudEventsSink,
    LedgerFileSink,
    MultiSink,
    PrometheusSink,
    SinkConfigError,
    StdoutSink,
    UsageSink,
)
from gpuyard.logic.devices import (
    claim_allocations_from_dict,
    class_selection,
    slice_info_from_dict,
)
from gpuyard.logic.pool_accounting import node_info_from_dict, pod_info_from_dict

logger = logging.getLogger("gpuyard")

MANAGED = {"app.kubernetes.io/managed-by": "gpuyard"}
CACHE_IDS = (
    "pools",
    "services",
    "services_by_pool",
    "nodes",
    "gpu_pods",
    "deployments",
    "network_services",
    "disruption_budgets",
    "namespaces",
    "metered_pods",
    "replicasets",
    "deployment_owners",
    "claim_templates_by_service",
    "resource_claims",
    "resource_slices",
    "allocated_devices",
    "device_classes",
)
#: How long a standby keeps the last state of a deleted pod for its own first meter tick
#: as leader: a pod the leader had not billed yet when it died is billed from this.
STANDBY_GONE_POD_HORIZON_SECONDS = 3600
SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
#: How long a stepping-down leader waits for its writes in flight before it releases.
WRITES_DRAIN_SECONDS = 5.0


def holds_extended_resource(spec: Any, **_: Any) -> bool:
    """Only pods that ask for an extended resource (a GPU, a MIG slice) can count against
    a pool; leaving every other pod out keeps the cache small on a busy cluster."""
    for container in spec.get("containers", []):
        limits = (container.get("resources") or {}).get("limits") or {}
        if any("/" in resource for resource in limits):
            return True
    return False


# -- caches: each returns {key: value} for one object; Kopf keeps the index current ------


def index_pool(name: str, body: Any, **_: Any) -> dict[str, Any]:
    return {name: dict(body)}


#: Kept out of the cached AIServices: nothing reads them, and each repeats the shape of the
#: spec (the managed fields by field, kubectl's last applied copy as JSON), which for a real
#: server's pod surface is most of the object's size.
_UNREAD_SERVICE_METADATA = ("managedFields",)
_UNREAD_SERVICE_ANNOTATION = "kubectl.kubernetes.io/last-applied-configuration"


def index_service(namespace: str | None, name: str, body: Any, **_: Any) -> dict[ServiceKey, Any]:
    metadata = {
        key: value for key, value in body["metadata"].items() if key not in _UNREAD_SERVICE_METADATA
    }
    annotations = metadata.get("annotations") or {}
    if _UNREAD_SERVICE_ANNOTATION in annotations:
        metadata["annotations"] = {
            key: value for key, value in annotations.items() if key != _UNREAD_SERVICE_ANNOTATION
        }
    return {(namespace or "", name): {**body, "metadata": metadata}}


def index_service_by_pool(
    namespace: str | None, name: str, spec: Any, **_: Any
) -> dict[str, ServiceKey]:
    return {str(spec.get("pool", "")): (namespace or "", name)}


def index_node(name: str, body: Any, **_: Any) -> dict[str, Any]:
    return {name: node_info_from_dict(dict(body))}


def index_gpu_pod(body: Any, spec: Any, **_: Any) -> dict[str, Any]:
    # Keyed by node; pods not yet bound under "": a pending replica still counts against
    # its namespace's quota in the pool it asked for.
    return {spec.get("nodeName") or "": pod_info_from_dict(dict(body))}


# DRA objects are cached as the few fields accounting reads (a slice's devices keep their
# attributes and capacity, a claim only the devices it holds): a cluster has a slice per
# GPU node and a claim per GPU pod, and whole bodies would cost as much as the pods do.


def index_resource_slice(body: Any, **_: Any) -> dict[str, Any]:
    info = slice_info_from_dict(dict(body))
    return {info.node_name: info} if info is not None else {}


def index_allocated_devices(body: Any, **_: Any) -> dict[Any, Any]:
    return dict(claim_allocations_from_dict(dict(body)))


def index_device_class(name: str, body: Any, **_: Any) -> dict[str, Any]:
    return {name: class_selection(dict(body))}


def index_child(namespace: str | None, name: str, body: Any, **_: Any) -> dict[ServiceKey, Any]:
    return {(namespace or "", name): dict(body)}


def index_claim_template(
    namespace: str | None, labels: Any, body: Any, **_: Any
) -> dict[ServiceKey, Any]:
    """A service's claim templates by service: their names end in a hash of the claim."""
    service = labels.get(SERVICE_LABEL)
    return {(namespace or "", service): dict(body)} if service else {}


def may_hold_gpus(spec: Any, **_: Any) -> bool:
    """A pod the meter must see: one asking for an extended resource (a device plugin's GPU,
    or one a DeviceClass maps to DRA devices) or naming ResourceClaims (DRA devices)."""
    return holds_extended_resource(spec) or bool(spec.get("resourceClaims"))


def index_resource_claim(
    namespace: str | None, name: str, body: Any, **_: Any
) -> dict[tuple[str, str], Any]:
    """The parts of a ResourceClaim that say what it holds: which class each request
    asked for, and what the scheduler allocated."""
    spec = body.get("spec") or {}
    status = body.get("status") or {}
    return {
        (namespace or "", name): {
            "spec": {"devices": {"requests": (spec.get("devices") or {}).get("requests") or []}},
            "status": {
                "allocation": {
                    "devices": {
                        "results": ((status.get("allocation") or {}).get("devices") or {}).get(
                            "results"
                        )
                        or []
                    }
                },
                "reservedFor": status.get("reservedFor") or [],
            },
        }
    }


def register_dra_reads(r: kopf.OperatorRegistry) -> None:
    """ResourceClaims by name, for the meter: what a pod on a DRA pool holds, by request (the
    pool accounting's `allocated_devices` keys them by device, without their requests).
    Each device's UUID comes from the slices accounting indexes (`resource_slices`)."""
    kopf.index("resource.k8s.io", "v1", "resourceclaims", id="resource_claims", registry=r)(
        index_resource_claim
    )


def register_claim_children(r: kopf.OperatorRegistry) -> None:
    """The ResourceClaimTemplates gpuyard makes for services on ClaimTemplate DRA pools."""
    kopf.index(
        "resource.k8s.io", "v1", "resourceclaimtemplates", labels=MANAGED,
        id="claim_templates_by_service", registry=r,
    )(index_claim_template)  # fmt: skip
    kopf.on.event("resource.k8s.io", "v1", "resourceclaimtemplates", labels=MANAGED, registry=r)(
        on_child_event
    )


def index_namespace(name: str, labels: Any, **_: Any) -> dict[str, dict[str, str]]:
    return {name: dict(labels)}


def index_metered_pod(uid: str, body: Any, **_: Any) -> dict[str, dict[str, Any]]:
    return {uid: slim_pod(body)}


def index_owner_links(
    namespace: str | None, name: str, meta: Any, **_: Any
) -> dict[ServiceKey, dict[str, Any]]:
    # Only what the meter's ownership chain reads (a busy cluster has many ReplicaSets and
    # Deployments), from every one of them: a label would be a tenant's to remove.
    return {
        (namespace or "", name): {
            "name": name,
            "uid": meta.get("uid"),
            "ownerReferences": list(meta.get("ownerReferences") or []),
        }
    }


# -- start-up and shutdown ---------------------------------------------------------------


class NoDiffBase(kopf.DiffBaseStorage):
    """Kopf's diff base, kept by nobody.

    Before every event's handlers, Kopf deep-copies the body into an "essence" and diffs
    it with the last one, for change handlers (``on.create``, ``on.update``, ``on.field``)
    and daemons. gpuyard has none of them, only indices and ``on.event``, so nothing reads
    that diff; building it was a third of the operator's CPU while services were created
    (bench/RESULTS.md). A change handler added later needs Kopf's default storage back.
    """

    def build(
        self, *, body: kopf.Body, extra_fields: Iterable[Any] | None = None
    ) -> kopf.BodyEssence:
        del body, extra_fields  # nothing is built from them
        return {}

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        del body
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        del body, patch, essence


def login(memo: Any, **kwargs: Any) -> Any:
    """Kopf's watches use the same identity as gpuyard's own calls."""
    config: Settings = memo["config"]
    if config.kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        # In a pod: Kopf's own loader re-reads the projected token, which rotates.
        return kopf.login_with_service_account(**kwargs)
    kubeconfig = str(config.kubeconfig) if config.kubeconfig else None
    return connection_info(make_api_client(kubeconfig, pool_size=1))


async def startup(settings: kopf.OperatorSettings, memo: Any, **indices: Any) -> None:
    config: Settings = memo["config"]
    settings.peering.standalone = True
    settings.persistence.diffbase_storage = NoDiffBase()
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    settings.networking.request_timeout = 60
    metrics = OperatorMetrics()
    kubeconfig = str(config.kubeconfig) if config.kubeconfig else None
    identity: str = memo["identity"]
    client = make_api_client(kubeconfig, pool_size=config.workers * 2, identity=identity)
    caches = Caches(**{name: indices[name] for name in CACHE_IDS})
    elector: Elector | None = None
    if config.leader_election:
        # A client of its own: renewals must not wait behind a burst of reconciles.
        lease_client = make_api_client(kubeconfig, pool_size=2, identity=identity)
        lease = LeaseClient(lease_client, lease_namespace(config), config.lease_name)
        elector = Elector(lease, identity, config.lease_timings(), metrics)
    memo["elector"] = elector
    operator = Operator(
        settings=config,
        kube=Kube(client, metrics, elector.may_write if elector else lambda: True),
        metrics=metrics,
        caches=caches,
        prometheus=Prometheus(config.prometheus_url) if config.prometheus_url else None,
    )
    await migrate_at_start(config)
    operator.sinks = build_sinks(config, metrics, memo.get("http_sink"))
    operator.pool_queue = WorkQueue("pool", lambda key: reconcile_pool(operator, key))
    operator.service_queue = WorkQueue("service", lambda key: reconcile_service(operator, key))
    for queue in (operator.pool_queue, operator.service_queue):
        queue.on_result = operator.record_reconcile
    memo["operator"] = operator
    if config.metrics_port:
        start_http_server(config.metrics_port, config.metrics_address, registry=metrics.registry)
        logger.info("metrics on %s:%d/metrics", config.metrics_address, config.metrics_port)


async def cleanup(memo: Any, **_: Any) -> None:
    """Stop writing, then give the Lease up: the standby may lead at once."""
    operator: Operator | None = memo.get("operator")
    elector: Elector | None = memo.get("elector")
    if operator is None:
        return
    if elector is not None:
        elector.fence.close()
    campaign = memo["lifecycle"].campaign
    tasks = [*operator.tasks, *operator.deliveries.values(), *([campaign] if campaign else [])]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    deadline = time.monotonic() + WRITES_DRAIN_SECONDS
    while operator.kube.writes_in_flight() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if elector is not None:
        await elector.release()
    # Kopf waits on the stop flag in a task of its own, and gives such a task 5 s to end
    # before it cancels it: raising the flag lets the process exit now.
    memo["lifecycle"].stop.set()


def keep_caches_out_of_gc() -> None:
    """Called once the caches hold every object of the cluster, which live as long as the
    operator: moving them out of the collector's sight (and collecting less often) keeps
    full collections from rescanning them on every autoscaler tick. bench/autoscale.py
    measures the tick under the same settings."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


@dataclass
class Lifecycle:
    """What every handler of the process shares about its run.

    Kopf gives each object's handlers a shallow copy of the memo: a key set in one
    handler is not seen by the next, so shared state lives in this one object.
    """

    #: Kopf's stop flag. An asyncio.Event, bound to Kopf's loop on first use: Kopf waits
    #: for a threading.Event in a worker thread, which would then hold up the exit.
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    #: The election's task once the caches are complete (None without an election).
    campaign: asyncio.Task[None] | None = None
    caches_complete: bool = False
    lost_leadership: bool = False


def started(memo: Any) -> Operator:
    """The operator, once its caches are complete.

    Kopf delivers no event before every index is filled, so the first event is the moment
    the caches are complete: the replica may then lead (at once without an election, else
    once it holds the Lease).
    """
    operator: Operator = memo["operator"]
    lifecycle: Lifecycle = memo["lifecycle"]
    if not lifecycle.caches_complete:
        lifecycle.caches_complete = True
        keep_caches_out_of_gc()
        elector: Elector | None = memo["elector"]
        if elector is None:
            lead(operator)
        else:
            lifecycle.campaign = asyncio.create_task(_campaign(lifecycle, elector, operator))
    return operator


def lead(operator: Operator) -> None:
    """Start the work only the leader does, from everything the caches hold."""
    workers = operator.settings.workers
    operator.tasks = [
        asyncio.create_task(operator.pool_queue.run(max(2, workers // 4))),
        asyncio.create_task(operator.service_queue.run(workers)),
        asyncio.create_task(_resync(operator)),
        asyncio.create_task(autoscale_forever(operator)),
        asyncio.create_task(meter_forever(operator)),
    ]
    _enqueue_everything(operator)


async def _campaign(lifecycle: Lifecycle, elector: Elector, operator: Operator) -> None:
    """Lead when elected; on losing the Lease, stop the whole process.

    A deposed leader's queues, scaling history and marks in memory are of a time when it
    led: rather than carry them into a second term, it exits (as controller-runtime's
    managers do) and comes back, through its restart policy, as a fresh standby.
    """
    await elector.run(on_lead=lambda: lead(operator))
    for task in operator.tasks:
        task.cancel()
    lifecycle.lost_leadership = True
    lifecycle.stop.set()


def lease_namespace(config: Settings) -> str:
    if config.lease_namespace:
        return config.lease_namespace
    if os.environ.get("POD_NAMESPACE"):
        return os.environ["POD_NAMESPACE"]
    try:
        with open(SERVICE_ACCOUNT_NAMESPACE) as file:
            return file.read().strip()
    except OSError:
        return "default"


def instance_identity(config: Settings) -> str:
    """Unique per process: a replica that restarts is a new candidate, never mistaken
    for the holder its previous life was."""
    if config.instance_id:
        return config.instance_id
    base = os.environ.get("POD_NAME") or socket.gethostname()
    return f"{base}_{secrets.token_hex(4)}"


# -- events only enqueue keys (level-triggered reconciles do the work) -------------------


async def on_service_event(namespace: str | None, name: str, memo: Any, **_: Any) -> None:
    # Kopf updates the indices before it calls event handlers: the cache holds this event's
    # body. Most events of a service echo gpuyard's own status write, and are skipped. A
    # service without its Deployment (a new one) goes before status work.
    operator = started(memo)
    key = (namespace or "", name)
    if operator.service_changed(key):
        operator.service_queue.add(key, urgent=operator.caches.deployment(key) is None)


async def on_deployment_event(
    namespace: str | None, name: str, labels: Any, memo: Any, **_: Any
) -> None:
    # Most events of a Deployment are its controller's status updates, which change
    # nothing the service reports: skipped.
    owner = labels.get(SERVICE_LABEL)
    if owner:
        operator = started(memo)
        key = (namespace or "", owner)
        if owner != name or operator.deployment_changed(key):
            operator.service_queue.add(key)


async def on_child_event(namespace: str | None, labels: Any, memo: Any, **_: Any) -> None:
    owner = labels.get(SERVICE_LABEL)
    if owner:
        started(memo).service_queue.add((namespace or "", owner))


async def on_pool_event(name: str, memo: Any, **_: Any) -> None:
    operator = started(memo)
    operator.pool_queue.add(name)
    for key in operator.caches.services_of_pool(name):
        operator.service_queue.add(key)


async def on_capacity_event(memo: Any, **_: Any) -> None:
    """A node, a GPU pod or a DRA object changed: every pool recounts (the queue folds
    bursts)."""
    operator = started(memo)
    for pool in operator.caches.pool_names():
        operator.pool_queue.add(pool)


async def on_metered_pod_event(type: str, uid: str, body: Any, memo: Any, **_: Any) -> None:
    """Keep a deleted pod until its last seconds are billed (a finalizer usually keeps it
    in the cache; a pod without one, or force-deleted, still has its last state here)."""
    if type == "DELETED":
        operator = started(memo)
        now = datetime.now(UTC)
        operator.gone_pods[uid] = (slim_pod(body), now)
        if not operator.tasks:
            _forget_long_gone(operator.gone_pods, now)


def _forget_long_gone(gone: dict[str, tuple[dict[str, Any], datetime]], now: datetime) -> None:
    """On a standby, which bills nothing: keep only the recent (the dict is in order of
    deletion, so the old ones are at its start)."""
    while gone:
        uid, (_, gone_at) = next(iter(gone.items()))
        if (now - gone_at).total_seconds() < STANDBY_GONE_POD_HORIZON_SECONDS:
            return
        del gone[uid]


async def on_namespace_event(name: str, memo: Any, **_: Any) -> None:
    operator = started(memo)
    for key in operator.caches.services_in_namespace(name):
        operator.service_queue.add(key)


def queue_depths(memo: Any, **_: Any) -> dict[str, int]:
    operator: Operator | None = memo.get("operator")
    if operator is None:
        return {}
    return {"pools": len(operator.pool_queue), "services": len(operator.service_queue)}


def leadership(memo: Any, **_: Any) -> dict[str, Any]:
    """Who leads, in the /healthz body (Kopf refreshes it at most every 10 s)."""
    elector: Elector | None = memo.get("elector")
    if elector is None:
        return {"leader": True, "election": False, "identity": memo.get("identity")}
    return {"leader": elector.leading, "identity": elector.identity, "holder": elector.holder}


async def _resync(operator: Operator) -> None:
    """Reconcile everything now and then, so a lost event costs minutes, not forever."""
    while True:
        await asyncio.sleep(operator.settings.resync_seconds)
        _enqueue_everything(operator)


def _enqueue_everything(operator: Operator) -> None:
    for pool in operator.caches.pool_names():
        operator.pool_queue.add(pool)
    for key in operator.caches.service_keys():
        operator.service_queue.add(key)


def build_registry() -> kopf.OperatorRegistry:
    """All handlers, on a registry of their own (nothing is registered at import)."""
    registry = kopf.OperatorRegistry()
    r = registry
    kopf.index(API_GROUP, API_VERSION, "gpupools", id="pools", registry=r)(index_pool)
    kopf.index(API_GROUP, API_VERSION, "aiservices", id="services", registry=r)(index_service)
    kopf.index(API_GROUP, API_VERSION, "aiservices", id="services_by_pool", registry=r)(
        index_service_by_pool
    )
    kopf.index("", "v1", "nodes", id="nodes", registry=r)(index_node)
    kopf.index("", "v1", "pods", when=may_hold_gpus, id="gpu_pods", registry=r)(index_gpu_pod)
    kopf.index("apps", "v1", "deployments", labels=MANAGED, id="deployments", registry=r)(
        index_child
    )
    kopf.index("", "v1", "services", labels=MANAGED, id="network_services", registry=r)(index_child)
    kopf.index(
        "policy", "v1", "poddisruptionbudgets", labels=MANAGED, id="disruption_budgets", registry=r
    )(index_child)
    kopf.index("", "v1", "namespaces", id="namespaces", registry=r)(index_namespace)
    # Every pod that may hold a pool's GPUs is metered, labelled or not: billing must not
    # depend on anything a tenant can write.
    kopf.index("", "v1", "pods", when=may_hold_gpus, id="metered_pods", registry=r)(
        index_metered_pod
    )
    dra = "resource.k8s.io"
    kopf.index(dra, "v1", "resourceslices", id="resource_slices", registry=r)(index_resource_slice)
    kopf.index(dra, "v1", "resourceclaims", id="allocated_devices", registry=r)(
        index_allocated_devices
    )
    kopf.index(dra, "v1", "deviceclasses", id="device_classes", registry=r)(index_device_class)
    kopf.index("apps", "v1", "replicasets", id="replicasets", registry=r)(index_owner_links)
    kopf.index("apps", "v1", "deployments", id="deployment_owners", registry=r)(index_owner_links)

    register_claim_children(r)
    register_dra_reads(r)

    kopf.on.login(registry=r)(login)
    kopf.on.startup(registry=r)(startup)
    kopf.on.cleanup(registry=r)(cleanup)
    kopf.on.probe(id="queues", registry=r)(queue_depths)
    kopf.on.probe(id="leadership", registry=r)(leadership)

    kopf.on.event(API_GROUP, API_VERSION, "aiservices", registry=r)(on_service_event)
    kopf.on.event("apps", "v1", "deployments", labels=MANAGED, registry=r)(on_deployment_event)
    kopf.on.event("", "v1", "services", labels=MANAGED, registry=r)(on_child_event)
    kopf.on.event("policy", "v1", "poddisruptionbudgets", labels=MANAGED, registry=r)(
        on_child_event
    )
    kopf.on.event(API_GROUP, API_VERSION, "gpupools", registry=r)(on_pool_event)
    kopf.on.event("", "v1", "nodes", registry=r)(on_capacity_event)
    kopf.on.event("", "v1", "pods", when=may_hold_gpus, registry=r)(on_capacity_event)
    # A slice, a claim's allocation or a class changes what DRA pools have and hold.
    for plural in ("resourceslices", "resourceclaims", "deviceclasses"):
        kopf.on.event(dra, "v1", plural, registry=r)(on_capacity_event)
    kopf.on.event("", "v1", "namespaces", registry=r)(on_namespace_event)
    kopf.on.event("", "v1", "pods", when=may_hold_gpus, registry=r)(on_metered_pod_event)
    return registry


def build_sinks(
    config: Settings, metrics: OperatorMetrics, http: HttpCloudEventsSink | None = None
) -> MultiSink:
    """Where usage records go: Prometheus counters always, plus the configured sinks."""
    sinks: dict[str, UsageSink] = {"prometheus": PrometheusSink(metrics.registry)}
    if config.usage_stdout:
        sinks["stdout"] = StdoutSink()
    if config.usage_ledger is not None:
        sinks["ledger"] = LedgerFileSink(config.usage_ledger)
    if (source := postgres_source(config)) is not None:
        sinks["postgres"] = PostgresSink(
            source,
            migrate=config.usage_ledger_migrate,
            duplicates=metrics.ledger_duplicates,
            conflicts=metrics.ledger_conflicts,
        )
    if http is not None:
        sinks["http"] = http
    return MultiSink(sinks)


def postgres_source(config: Settings) -> ConnectionSource | None:
    """How to reach the PostgreSQL ledger, or None when it is off."""
    if config.usage_ledger_dsn_file is not None:
        return ConnectionSource(dsn_file=config.usage_ledger_dsn_file)
    if config.usage_ledger_postgres_env:
        return ConnectionSource()
    return None


async def migrate_at_start(config: Settings) -> None:
    """Bring the PostgreSQL ledger's schema up to date before the meter starts.

    Not fatal: an unreachable database must not stop scaling and quota work. The sink
    migrates again when it connects (with the same setting), so the schema is current
    before its first insert either way; until then the marks hold the records.
    """
    source = postgres_source(config)
    if source is None or not config.usage_ledger_migrate:
        return
    try:
        result = await migrate_database(source)
    except (psycopg.Error, OSError, SchemaError, SinkConfigError) as exc:
        logger.error("usage ledger migration at start-up failed (%s): %s", source.describe(), exc)
        return
    if result.applied:
        logger.info("usage ledger schema migrated to version %d", result.after)
    else:
        logger.info("usage ledger schema at version %d", result.after)


def build_http_sink(config: Settings) -> HttpCloudEventsSink | None:
    """The CloudEvents sink, built before Kopf starts: an unreadable headers file or CA
    bundle stops the operator at once with the file and line, not in a retried handler."""
    if not config.usage_http_url:
        return None
    sink = HttpCloudEventsSink(
        config.usage_http_url,
        source=f"gpuyard/{config.cluster_id}",
        headers_file=config.usage_http_headers_file,
        ca_file=config.usage_http_ca_file,
        allow_insecure=config.usage_http_allow_insecure,
        max_attempts=config.usage_http_max_attempts,
        timeout=config.usage_http_timeout_seconds,
        max_connections=config.usage_http_max_connections,
        # Room for everything the meter may deliver at once, so that only a window larger
        # than all of it has to go alone (and none is ever refused for want of room).
        max_in_flight=config.meter_concurrency * config.meter_max_records_per_batch,
    )
    logger.info(
        "usage records go to %s with headers %s",
        sink.url,
        ", ".join(sink.header_names) or "(none from a file)",
    )
    return sink


def configure_logging(settings: Settings) -> None:
    handler = logging.StreamHandler()
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level)
    # Kopf logs every watch event at DEBUG and every handler at INFO; gpuyard logs what matters.
    logging.getLogger("kopf").setLevel(max(logging.WARNING, root.level))


def run_operator(settings: Settings) -> None:
    """Run until SIGTERM/SIGINT: watch, reconcile, serve /healthz and /metrics."""
    configure_logging(settings)
    identity = instance_identity(settings)
    logger.info("gpuyard starting (cluster id %s, identity %s)", settings.cluster_id, identity)
    liveness = (
        f"http://{settings.health_address}:{settings.health_port}/healthz"
        if settings.health_port
        else None
    )
    http_sink = build_http_sink(settings)
    lifecycle = Lifecycle()
    memo = kopf.Memo(config=settings, http_sink=http_sink, identity=identity, lifecycle=lifecycle)
    kopf.run(
        registry=build_registry(),
        clusterwide=True,
        # No Kopf peering: it would pause every replica of equal priority. The Lease
        # decides who writes (handlers/leadership.py).
        standalone=True,
        liveness_endpoint=liveness,
        memo=memo,
        stop_flag=lifecycle.stop,
    )
    if lifecycle.lost_leadership:
        raise SystemExit("gpuyard: lost leadership; exiting to come back as a standby")
