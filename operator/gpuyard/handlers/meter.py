"""The meter: one loop that bills every GPU-second held on every pool's nodes.

Each tick turns the cached GPU pods into lifetimes (bound-at to ended-at, from the pods'
own timestamps), priced by the pool whose nodes hold them and billed to the AIService that
owns them (or, for a pod of no AIService, to its namespace as unmanaged usage). The pure
``plan_tick`` says which closed windows each account has not yet reported; each account's
records then go to the sinks in a task of its own, and only after every sink acknowledged
does the account's high-water mark move. A crash between emit and mark re-emits the same
records with the same ids; a sink that is down holds that account's mark where it is, and
nobody else's.

Marks and prices live where a restart finds them: an AIService's mark in its
``status.usage``, a namespace's unmanaged usage and each pool's price history in the
GPUPool's ``status.billing``. The meter holds every metered pod with the
``gpuyard.io/metering`` finalizer until the pod's last second is behind its mark, and every
GPUPool until no pod on its nodes is left to bill, so what ends while the operator is down
is still there, with its timestamps and its price, when the operator returns.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from kubernetes.client import ApiException
from pydantic import ValidationError

from gpuyard import API_GROUP, API_VERSION
from gpuyard.api.formats import parse_time
from gpuyard.api.names import METERING_FINALIZER
from gpuyard.api.pool import GPUPool
from gpuyard.handlers.context import Operator
from gpuyard.io.prometheus import PrometheusUnavailableError
from gpuyard.io.sinks import MultiSink, MultiSinkError, SinkRejectedError
from gpuyard.logic.claimed_devices import (
    ClaimedDeviceError,
    HeldDevice,
    allocated_devices,
    devices_from_text,
    devices_to_text,
    pod_claim_names,
)
from gpuyard.logic.metering import (
    Account,
    MeterConfig,
    MeteringError,
    PodLifetime,
    PoolPricing,
    ServiceBatch,
    ServiceMark,
    UsageRecord,
    advance_mark,
    device_mean,
    epoch_floor,
    is_fully_reported,
    mark_from_status,
    mark_to_status,
    measured,
    node_down,
    observe_price,
    plan_tick,
    pod_lifetime_from_dict,
    pool_holding,
    price_history_from_status,
    price_history_to_status,
    utilization_span,
)
from gpuyard.logic.ownership import OwnerNotKnownError, owning_service
from gpuyard.logic.promql import (
    GpuSeries,
    PodKey,
    PrometheusResponseError,
    gpu_utilization_by_uuid_query,
    gpu_utilization_query,
    parse_matrix_response,
    parse_uuid_matrix_response,
)

logger = logging.getLogger(__name__)

#: Reasons of the UsageReported condition (and of the UsageNotReported event).
REPORTED = "Reported"
SINK_UNAVAILABLE = "SinkUnavailable"
SINK_REJECTED = "SinkRejected"
METERING_FAILED = "MeteringFailed"
#: How long a pod's owner may be unknown to the caches before the pod counts as unmanaged.
OWNER_WAIT_SECONDS = 30
#: The AIService a pod is billed to, written by the meter with its finalizer: it outlives
#: the ReplicaSet and Deployment of a deleted service, whose pods may still be unbilled
#: when the operator restarts. Read only when those owners are gone.
BILLED_TO_ANNOTATION = "gpuyard.io/billed-to"
#: The DRA devices a pod is billed for (JSON, see gpuyard.logic.claimed_devices), written
#: with the finalizer: a pod's claims are deleted with it, possibly before a restarted
#: operator has read them. Read only when the claims are gone; the pods admission policy
#: keeps tenants from writing gpuyard.io/ annotations.
BILLED_DEVICES_ANNOTATION = "gpuyard.io/billed-devices"


#: The parts of a pod's status the meter reads: its lifecycle, and the claims it holds.
_METERED_POD_STATUS = (
    "phase",
    "conditions",
    "containerStatuses",
    "resourceClaimStatuses",
    "extendedResourceClaimStatus",
)


def slim_pod(body: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of a Pod the meter reads; the cache keeps only these."""
    metadata = body.get("metadata", {})
    spec = body.get("spec", {})
    status = body.get("status", {})
    kept_metadata = (
        "name", "namespace", "uid", "resourceVersion", "labels", "annotations",
        "ownerReferences", "deletionTimestamp", "finalizers",
    )  # fmt: skip
    return {
        "metadata": {key: metadata.get(key) for key in kept_metadata},
        "spec": {
            "nodeName": spec.get("nodeName"),
            "resourceClaims": spec.get("resourceClaims") or [],
            "containers": [
                {"resources": c.get("resources", {})} for c in spec.get("containers", [])
            ],
            "initContainers": [
                {"resources": c.get("resources", {}), "restartPolicy": c.get("restartPolicy")}
                for c in spec.get("initContainers", [])
            ],
        },
        "status": {key: status.get(key) for key in _METERED_POD_STATUS},
    }


async def meter_forever(op: Operator) -> None:
    while True:
        started = time.monotonic()
        try:
            await meter_tick(op, datetime.now(UTC))
        except Exception:  # the loop must outlive any one bad tick
            logger.exception("meter tick failed")
            op.metrics.meter_errors.labels(stage="tick").inc()
        op.metrics.meter_tick_seconds.observe(time.monotonic() - started)
        await asyncio.sleep(max(0.0, op.settings.meter_interval - (time.monotonic() - started)))


@dataclass
class _Pods:
    """The tick's view of the metered pods."""

    lifetimes: list[PodLifetime] = field(default_factory=list)
    #: The same lifetimes by account.
    by_account: dict[Account, list[PodLifetime]] = field(default_factory=lambda: defaultdict(list))
    #: The cached (or last seen) pod behind each lifetime, by uid.
    bodies: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Accounts with a pod that could not be priced: their marks must not move past it.
    blocked: dict[Account, str] = field(default_factory=dict)
    #: Namespaces with a pod whose owner is not known yet: any of their accounts may be
    #: the pod's, so none of their marks may move past it.
    held_namespaces: set[str] = field(default_factory=set)

    def add(self, lifetime: PodLifetime, body: dict[str, Any]) -> None:
        self.lifetimes.append(lifetime)
        self.by_account[lifetime.account].append(lifetime)
        self.bodies[lifetime.pod_uid] = body


async def meter_tick(op: Operator, now: datetime) -> None:
    """Plan every account's closed windows and start the deliveries of those that are
    not already delivering; release what is fully billed."""
    sinks = op.sinks
    if sinks is None:
        return
    pools = await _pools(op, now)
    pods = await _pods(op, pools, now)
    await _hold(op, pods)
    busy = {key for key, task in op.deliveries.items() if not task.done()}
    # Unmanaged usage is planned while its namespace has pods on the pool; its mark stays
    # in the pool's status for the next pod.
    accounts = set(pods.by_account)
    accounts.update(Account(namespace, name) for namespace, name in op.caches.service_keys())
    marks = {key: mark for key in accounts if (mark := _mark(op, key)) is not None}
    for key in accounts - busy:
        await _release_reported(op, pods, key, marks.get(key))
    skipped = busy | set(pods.blocked)
    skipped.update(key for key in accounts if key.namespace in pods.held_namespaces)
    for key, why in pods.blocked.items():
        await _report(op, key, (METERING_FAILED, why), now)
    config = MeterConfig(
        window_seconds=op.settings.usage_window_seconds,
        max_records_per_batch=op.settings.meter_max_records_per_batch,
    )
    planned = plan_tick(
        [lifetime for lifetime in pods.lifetimes if lifetime.account not in skipped],
        {key: mark for key, mark in marks.items() if key not in skipped},
        now,
        config,
    )
    for batch in await _with_utilization(op, planned):
        op.deliveries[batch.key] = asyncio.create_task(
            _deliver(op, sinks, batch, marks.get(batch.key), pods),
            name=f"meter {batch.key}",
        )
    await _write_unmanaged_gpus(op, pods)
    await _release_pools(op, pods)
    live = accounts | busy
    for key in [key for key in op.marks if key not in live]:
        del op.marks[key]  # no service and no pod left: nothing more to bill
    for key in [key for key, task in op.deliveries.items() if task.done()]:
        del op.deliveries[key]


# --------------------------------------------------------------------------- pools


async def _pools(op: Operator, now: datetime) -> dict[str, PoolPricing]:
    """Every pool's price schedule, from the history in its status plus the price its spec
    names now; a new price is written to the history before anything is billed at it, so
    a restart prices every window as before. Every pool is held by the meter's finalizer
    (see `_release_pools`)."""
    pricing: dict[str, PoolPricing] = {}
    for name in op.caches.pool_names():
        body = op.caches.pool(name)
        if body is None:
            continue
        try:
            pool = GPUPool.from_mapping(body)
            billing = (body.get("status") or {}).get("billing") or {}
            stored = price_history_from_status(billing.get("priceHistory"))
        except (ValidationError, MeteringError) as error:
            op.metrics.meter_errors.labels(stage="pool").inc()
            logger.error("GPUPool %s cannot price usage: %s", name, error)
            continue
        # The cache may not show our last write yet: the later of the two histories wins.
        written = op.price_histories.get(name, ())
        newer = written and (not stored or written[-1].effective_from > stored[-1].effective_from)
        history = written if newer else stored
        created = body["metadata"].get("creationTimestamp")
        prices = observe_price(
            history,
            pool.spec.price.per_gpu_hour_decimal,
            created=parse_time(created) if created else now,
            now=now,
        )
        if prices != history:
            try:
                await op.io(
                    op.kube.patch_status, "gpupools", None, name,
                    {"billing": {"priceHistory": price_history_to_status(prices)}},
                )  # fmt: skip
                op.price_histories[name] = prices
            except ApiException as error:
                # Billing at a price a restart would not find again is worse than waiting.
                op.metrics.meter_errors.labels(stage="price").inc()
                logger.warning("price history of GPUPool %s not saved: %s", name, error)
                prices = history or prices[:1]
        meta = body["metadata"]
        if METERING_FINALIZER not in (meta.get("finalizers") or ()) and not meta.get(
            "deletionTimestamp"
        ):
            await _set_finalizers(op, body, [*(meta.get("finalizers") or []), METERING_FINALIZER])
        pricing[name] = PoolPricing(
            name=name,
            gpu_type=pool.spec.gpu_type,
            currency=pool.spec.price.currency,
            prices=prices,
            resource_name=pool.spec.resource_name,
            node_selector=tuple(sorted(pool.spec.node_selector.items())),
            device_class=pool.spec.devices.device_class_name if pool.spec.devices else None,
        )
    return pricing


async def _release_pools(op: Operator, pods: _Pods) -> None:
    """Let a deleted pool go once no pod on its nodes is left to bill (its price goes
    with it)."""
    in_use = {lifetime.pool for lifetime in pods.lifetimes} | set(op.pod_pools.values())
    for name in op.caches.pool_names():
        body = op.caches.pool(name)
        if body is None or name in in_use:
            continue
        finalizers = list(body["metadata"].get("finalizers") or [])
        if body["metadata"].get("deletionTimestamp") and METERING_FINALIZER in finalizers:
            await _set_finalizers(op, body, [f for f in finalizers if f != METERING_FINALIZER])


# --------------------------------------------------------------------------- pods


async def _pods(op: Operator, pools: Mapping[str, PoolPricing], now: datetime) -> _Pods:
    """The billable lifetime of every pod on a pool's nodes, live or gone."""
    pods = _Pods()
    cached: list[tuple[dict[str, Any], datetime | None]]
    cached = [(pod, None) for pod in op.caches.all_metered_pods()]
    cached += [(pod, gone_at) for pod, gone_at in op.gone_pods.values()]
    for pod, gone_at in cached:
        metadata = pod["metadata"]
        node_name = pod["spec"].get("nodeName")
        if not node_name:
            if gone_at is not None or metadata.get("deletionTimestamp"):
                await _release(op, pod)  # never bound: nothing to bill
            continue
        namespace = metadata.get("namespace") or ""
        try:
            service = _owner(op, metadata, now)
        except OwnerNotKnownError:
            pods.held_namespaces.add(namespace)
            continue
        try:
            lifetime = _lifetime(op, pod, pools, service=service, gone_at=gone_at, now=now)
        except MeteringError as error:
            op.metrics.meter_errors.labels(stage="unpriced").inc()
            logger.error("pod %s/%s cannot be metered: %s", namespace, metadata["name"], error)
            if service is not None:
                pods.blocked[Account(namespace, service)] = f"pod {metadata['name']}: {error}"
            if gone_at is not None or metadata.get("deletionTimestamp"):
                # Holding the pod would not price it; it would only block its namespace.
                await _release(op, pod)
            continue
        if lifetime is None:
            if gone_at is not None or metadata.get("deletionTimestamp"):
                await _release(op, pod)  # holds none of a pool's GPUs
            continue
        op.pod_services[metadata["uid"]] = service
        pods.add(lifetime, pod)
    # What was decided about a pod is kept while the pod is seen (a released pod may stay
    # in the cache a moment: it must not be decided anew and billed again elsewhere).
    seen = {pod["metadata"]["uid"] for pod, _ in cached}
    for remembered in (op.pod_pools, op.pod_services, op.owner_wait, op.pod_ready, op.pod_devices):
        for uid in remembered.keys() - seen:
            del remembered[uid]
    return pods


def _owner(op: Operator, metadata: Mapping[str, Any], now: datetime) -> str | None:
    """The AIService a pod is billed to, decided once for the pod's life: a pod that a
    tenant re-parents (or whose Deployment loses its owner for a moment) keeps billing
    where it started, so no window is billed twice or never.

    After a restart the decision is read back from the pod's `gpuyard.io/billed-to`
    annotation when its owner chain no longer leads to a service (an orphan, or a pod of
    a deleted service whose owners went first). An owner the caches do not hold yet is
    waited for (`OwnerNotKnownError`) a short while, then taken as none.
    """
    uid = metadata["uid"]
    if uid in op.pod_services:
        return op.pod_services[uid]
    namespace = metadata.get("namespace") or ""
    billed_to = (metadata.get("annotations") or {}).get(BILLED_TO_ANNOTATION) or None
    try:
        service = owning_service(metadata, functools.partial(op.caches.owner_metadata, namespace))
    except OwnerNotKnownError:
        waiting_since = op.owner_wait.setdefault(uid, now)
        if not billed_to and (now - waiting_since).total_seconds() < OWNER_WAIT_SECONDS:
            raise
        service = None
    op.owner_wait.pop(uid, None)
    return service or billed_to


def _lifetime(
    op: Operator,
    pod: dict[str, Any],
    pools: Mapping[str, PoolPricing],
    *,
    service: str | None,
    gone_at: datetime | None,
    now: datetime,
) -> PodLifetime | None:
    """One pod's lifetime, priced by the pool of the node that holds it.

    The pool is decided once per pod, as its owner is: relabelling a node (or creating an
    overlapping pool) changes the price of new pods, never of running ones. A node gone
    from the API (deleted after it was lost) no longer says which pool it was in: the pool
    decided earlier stands in, else the owning AIService's.
    """
    uid = pod["metadata"]["uid"]
    node = op.caches.node(pod["spec"]["nodeName"])
    devices = _pod_devices(op, pod, pools)
    pool = pools.get(op.pod_pools.get(uid) or "")
    if pool is None:  # the pod's first tick (or its pool went): decide it now
        preferred = _service_pool(op, pod["metadata"].get("namespace") or "", service)
        if node is not None:
            held = pool_holding(
                node.labels, pod["spec"], pools.values(), preferred=preferred, devices=devices
            )
            if held is None:
                return None
            pool = held[0]
        else:
            pool = pools.get(preferred or "")
    if pool is None:
        raise MeteringError(f"node {pod['spec']['nodeName']} is unknown and so is its pool")
    down = None
    if node is not None:
        grace = op.settings.node_lost_grace_seconds
        down = node_down(node.ready, node.not_ready_since, now, grace)
    lifetime = pod_lifetime_from_dict(
        pod,
        pool,
        service=service,
        cluster_id=op.settings.cluster_id,
        gone_at=gone_at,
        node=down,
        first_ready_at=op.pod_ready.get(uid),
        devices=devices.get(pool.device_class or "", ()),
    )
    if lifetime is not None:
        op.pod_pools[uid] = pool.name
        if lifetime.ready_at is not None:
            # Its first Ready ends its start for good: a pod that turns unready at its end
            # (a kubelet stopping it does so) was not starting then.
            op.pod_ready.setdefault(uid, lifetime.ready_at)
    return lifetime


def _pod_devices(
    op: Operator, pod: Mapping[str, Any], pools: Mapping[str, PoolPricing]
) -> dict[str, tuple[HeldDevice, ...]]:
    """The DRA devices a pod holds, by the DeviceClass of each DRA pool, read when the pod
    is first seen with its claims allocated and fixed then (an allocation never changes
    while the pod lives). The claims go with the pod, possibly before its last second is
    billed: the devices are kept in memory, and in the pod's annotation for a restart."""
    uid = pod["metadata"]["uid"]
    if uid in op.pod_devices:
        return op.pod_devices[uid]
    classes = {pool.device_class for pool in pools.values() if pool.device_class is not None}
    names = pod_claim_names(pod)
    if not classes or not names:
        return {}
    namespace = pod["metadata"].get("namespace") or ""
    node = pod["spec"].get("nodeName") or ""
    claims = [op.caches.resource_claim(namespace, name) for name in names]

    def uuid_of(driver: str, pool: str, device: str) -> str:
        return op.caches.device_uuid(node, driver, pool, device)

    if all(claim is not None for claim in claims):
        found = {
            device_class: tuple(
                sorted(
                    device
                    for claim in claims
                    if claim is not None
                    for device in allocated_devices(claim, device_class, uuid_of)
                )
            )
            for device_class in classes
        }
        if any(found.values()):
            op.pod_devices[uid] = found
            return found
    # A claim is gone (or not allocated yet as far as the cache knows): what the meter wrote
    # on the pod when it first billed it, if it did.
    written = (pod["metadata"].get("annotations") or {}).get(BILLED_DEVICES_ANNOTATION)
    if written:
        try:
            recorded = devices_from_text(written)
        except ClaimedDeviceError as error:
            logger.error("pod %s has an unreadable %s: %s", uid, BILLED_DEVICES_ANNOTATION, error)
            return {}
        return dict.fromkeys(classes, recorded)
    return {}


def _service_pool(op: Operator, namespace: str, service: str | None) -> str | None:
    if service is None:
        return None
    body = op.caches.service((namespace, service))
    pool = ((body or {}).get("spec") or {}).get("pool")
    return str(pool) if pool else None


async def _hold(op: Operator, pods: _Pods) -> None:
    """Put the metering finalizer on every metered pod that lacks it, so that a pod that
    ends while the operator is down waits, with its timestamps, to be billed."""
    for lifetime in pods.lifetimes:
        pod = pods.bodies[lifetime.pod_uid]
        meta = pod["metadata"]
        finalizers = list(meta.get("finalizers") or [])
        if METERING_FINALIZER in finalizers or meta.get("deletionTimestamp"):
            continue
        if lifetime.pod_uid in op.gone_pods:
            continue
        marks = {BILLED_TO_ANNOTATION: lifetime.service} if lifetime.service else {}
        if lifetime.devices:
            marks[BILLED_DEVICES_ANNOTATION] = devices_to_text(lifetime.devices)
        await _set_finalizers(op, pod, [*finalizers, METERING_FINALIZER], marks or None)


def _over(pod: Mapping[str, Any], gone: bool) -> bool:
    """Whether a pod is over: deleted, gone or finished. A pod billed to its end because
    its node was lost is still held until someone deletes it."""
    finished = (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed")
    return gone or finished or bool(pod["metadata"].get("deletionTimestamp"))


async def _release_reported(
    op: Operator, pods: _Pods, key: Account, mark: ServiceMark | None
) -> None:
    """Let go of the account's pods that are over and billed to their last second."""
    for lifetime in pods.by_account.get(key, ()):
        pod = pods.bodies[lifetime.pod_uid]
        if is_fully_reported(lifetime, mark) and _over(pod, lifetime.pod_uid in op.gone_pods):
            await _release(op, pod)


async def _release(op: Operator, pod: dict[str, Any]) -> None:
    """Forget a fully billed pod, and let it go if our finalizer holds it."""
    metadata = pod["metadata"]
    finalizers = list(metadata.get("finalizers") or [])
    if METERING_FINALIZER in finalizers:
        await _set_finalizers(op, pod, [f for f in finalizers if f != METERING_FINALIZER])
    op.gone_pods.pop(metadata["uid"], None)


async def _set_finalizers(
    op: Operator,
    body: Mapping[str, Any],
    finalizers: list[str],
    annotations: Mapping[str, str] | None = None,
) -> None:
    """Change a pod's or a pool's finalizers (and add `annotations`); an object that
    changed or went meanwhile is left for the next tick, which sees it anew."""
    metadata = body["metadata"]
    namespace = metadata.get("namespace")
    if namespace:
        resource, path = "pods", f"/api/v1/namespaces/{namespace}/pods/{metadata['name']}"
    else:
        resource = "gpupools"
        path = f"/apis/{API_GROUP}/{API_VERSION}/gpupools/{metadata['name']}"
    try:
        await op.io(op.kube.set_finalizers, resource, path, metadata, finalizers, annotations)
    except ApiException as error:
        if error.status not in (404, 409, 422):
            raise


# --------------------------------------------------------------------------- marks


def _unmanaged_usage(op: Operator, pool: str) -> list[Mapping[str, Any]]:
    billing = ((op.caches.pool(pool) or {}).get("status") or {}).get("billing") or {}
    return list(billing.get("unmanagedUsage") or ())


def _stored_mark(op: Operator, key: Account) -> ServiceMark | None:
    if not key.unmanaged:
        body = op.caches.service((key.namespace, key.service))
        return mark_from_status(((body or {}).get("status") or {}).get("usage"))
    for entry in _unmanaged_usage(op, key.pool):
        if entry.get("namespace") == key.namespace:
            return mark_from_status(entry)
    return None


def _mark(op: Operator, key: Account) -> ServiceMark | None:
    """The newer of the mark we wrote last and the one in the cached status (the cache
    may lag our own write by a watch event). Once a service is gone, the mark we wrote
    last still covers the pods its finalizers hold; a service re-created under the same
    name while they are held carries their totals on (the mark follows the name)."""
    try:
        stored = _stored_mark(op, key)
    except MeteringError as error:
        logger.error("usage mark of %s is unreadable, starting from its pods: %s", key, error)
        stored = None
    written = op.marks.get(key)
    if written is None:
        return stored
    if stored is None or stored.reported_through < written.reported_through:
        return written
    return stored


async def _save_mark(op: Operator, key: Account, mark: ServiceMark) -> None:
    op.marks[key] = mark
    if mark.currency is None:
        # Nothing was billed yet (only empty windows, e.g. before the first pod's first
        # whole second), and the status requires a currency. Kept in memory; after a
        # restart the meter re-plans those windows from the pods and finds them empty.
        return
    if key.unmanaged:
        if op.caches.pool(key.pool) is not None:
            # A merge patch replaces the whole list: the entries of namespaces with no pods
            # left are carried over from the stored status, the others come from memory.
            entries = {str(e.get("namespace")): dict(e) for e in _unmanaged_usage(op, key.pool)}
            for account, account_mark in op.marks.items():
                if account.unmanaged and account.pool == key.pool and account_mark.currency:
                    entries[account.namespace] = {
                        "namespace": account.namespace,
                        **mark_to_status(account_mark),
                    }
            patch = {"billing": {"unmanagedUsage": [entries[ns] for ns in sorted(entries)]}}
            await op.io(op.kube.patch_status, "gpupools", None, key.pool, patch)
        return
    if op.caches.service((key.namespace, key.service)) is None:
        # The service is gone: there is no status to keep a mark in. Its pods' records
        # were delivered; until their finalizers are released a restart re-sends them
        # with the same ids, which is what ids are for.
        return
    await op.io(
        op.kube.patch_status,
        "aiservices",
        key.namespace,
        key.service,
        {"usage": mark_to_status(mark)},
    )


async def _write_unmanaged_gpus(op: Operator, pods: _Pods) -> None:
    """How many GPUs pods of no AIService hold on each pool, in the pool's status."""
    held: dict[str, int] = defaultdict(int)
    for lifetime in pods.lifetimes:
        if lifetime.service == "" and lifetime.ended_at is None:
            held[lifetime.pool] += lifetime.gpus
    for name in op.caches.pool_names():
        body = op.caches.pool(name)
        billing = ((body or {}).get("status") or {}).get("billing") or {}
        if body is not None and billing.get("unmanagedGpus") != held[name]:
            try:
                patch = {"billing": {"unmanagedGpus": held[name]}}
                await op.io(op.kube.patch_status, "gpupools", None, name, patch)
            except ApiException as error:
                logger.warning("unmanaged GPUs of GPUPool %s not written: %s", name, error)


# --------------------------------------------------------------------------- delivery


async def _with_utilization(op: Operator, batches: list[ServiceBatch]) -> list[ServiceBatch]:
    """The batches with each record's average GPU utilisation over its window, from one
    range query per utilisation series in use (at most two, whatever the number of pods).
    Utilisation is information, not a billed quantity: without Prometheus, or when it
    fails, records go out unmeasured rather than late."""
    records = [record for batch in batches for record in batch.records]
    width = op.settings.usage_window_seconds
    span = utilization_span(records, width)
    if op.prometheus is None or span is None:
        return batches
    series_of_pool = _utilization_series_by_pool(op)
    exporter = op.settings.gpu_exporter_matchers
    readings: dict[str, dict[PodKey, dict[int, float]]] = {}
    by_gpu: dict[str, dict[str, dict[int, float]]] = {}
    for series in {series_of_pool.get(record.pool, GpuSeries.GPU_UTIL) for record in records}:
        query = gpu_utilization_query(GpuSeries(series), window_seconds=width, exporter=exporter)
        uuid_query = gpu_utilization_by_uuid_query(
            GpuSeries(series), window_seconds=width, exporter=exporter
        )
        try:
            body = await op.io(op.prometheus.query_range, query, *span, width)
            readings[series] = parse_matrix_response(body)
            if uuid_query is not None and any(record.devices for record in records):
                body = await op.io(op.prometheus.query_range, uuid_query, *span, width)
                by_gpu[series] = parse_uuid_matrix_response(body)
        except (PrometheusUnavailableError, PrometheusResponseError) as error:
            op.metrics.meter_errors.labels(stage="utilization").inc()
            logger.warning("usage goes out without utilisation: %s", error)

    def reading(record: UsageRecord) -> float | None:
        series = series_of_pool.get(record.pool, GpuSeries.GPU_UTIL)
        at = epoch_floor(record.end)
        uuids = [device.uuid for device in record.devices if device.uuid]
        if uuids and series in by_gpu:
            # The devices' own series, by the UUIDs their slices give: a pod label (which
            # the exporter may not map for DRA devices) is not needed, and no series of
            # a GPU the pod does not hold can count for it.
            return device_mean(by_gpu[series], uuids, at)
        by_pod = readings.get(series, {})
        return by_pod.get((record.namespace, record.pod), {}).get(at)

    return [
        replace(batch, records=tuple(measured(record, reading(record)) for record in batch.records))
        for batch in batches
    ]


def _utilization_series_by_pool(op: Operator) -> dict[str, str]:
    """Which DCGM series measures each pool's utilisation (the pool's own choice)."""
    chosen: dict[str, str] = {}
    for name in op.caches.pool_names():
        body = op.caches.pool(name)
        metric = (body or {}).get("spec", {}).get("utilizationMetric")
        if metric in (GpuSeries.GPU_UTIL, GpuSeries.GR_ENGINE_ACTIVE):
            chosen[name] = metric
    return chosen


async def _deliver(
    op: Operator, sinks: MultiSink, batch: ServiceBatch, mark: ServiceMark | None, pods: _Pods
) -> None:
    """Emit one account's batch, save its new mark and release the pods it finished.

    Whatever fails here fails for this account alone: the next tick sends the same
    records, with the same ids, from the unchanged mark, and every other account's
    delivery goes on meanwhile.
    """
    now = datetime.now(UTC)
    try:
        async with op.delivery_slots:
            await sinks.emit(batch.records)
        new_mark = advance_mark(mark, batch.records, batch.through)
        await _save_mark(op, batch.key, new_mark)
    except asyncio.CancelledError:
        raise
    except Exception as error:  # noqa: BLE001 - one account's failure never stops the meter
        reason = _failure_reason(error)
        op.metrics.meter_errors.labels(stage=_failure_stage(error)).inc()
        logger.warning("usage of %s not reported, will retry: %s", batch.key, error)
        await _report(op, batch.key, (reason, _describe(error)), now)
        # The lag grows while the sinks are away: reported usage still ends at the mark
        # that holds (or, before a first mark, where the unreported records begin).
        held = mark.reported_through if mark else min((r.start for r in batch.records), default=now)
        _set_lag(op, batch.key, now - held)
        return
    await _report(op, batch.key, None, now)
    _set_lag(op, batch.key, now - new_mark.reported_through)
    await _release_reported(op, pods, batch.key, new_mark)


def _set_lag(op: Operator, key: Account, lag: timedelta) -> None:
    if not key.unmanaged:
        op.metrics.metering_lag.labels(namespace=key.namespace, service=key.service).set(
            lag.total_seconds()
        )


def _failure_stage(error: Exception) -> str:
    if isinstance(error, MultiSinkError):
        return "sink"
    if isinstance(error, ApiException):
        return "mark"
    return "delivery"


def _failure_reason(error: Exception) -> str:
    if isinstance(error, MultiSinkError):
        if all(isinstance(e, SinkRejectedError) for e in error.failures.values()):
            return SINK_REJECTED
        return SINK_UNAVAILABLE
    return METERING_FAILED


def _describe(error: Exception) -> str:
    text = str(error) or type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."


async def _report(
    op: Operator, key: Account, problem: tuple[str, str] | None, now: datetime
) -> None:
    """Remember how the account's last delivery went; on a change, have the service show
    it (its UsageReported condition) and say it in an Event when it starts failing."""
    if key in op.usage_problems and op.usage_problems[key] == problem:
        return
    op.usage_problems[key] = problem
    if not key.unmanaged:
        op.service_queue.add((key.namespace, key.service))
    if problem is None:
        return
    if key.unmanaged:
        involved = op.caches.pool(key.pool)
    else:
        involved = op.caches.service((key.namespace, key.service))
    if involved is not None:
        reason, message = problem
        await op.io(
            op.kube.post_event, involved, "UsageNotReported",
            f"usage of {key} not reported ({reason}): {message}", now, "Warning",
        )  # fmt: skip
