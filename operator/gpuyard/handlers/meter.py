"""The meter: one loop that bills every GPU-second of every AIService's pods.

Each tick turns the cached pods into lifetimes (bound-at to ended-at, from the pods' own
timestamps), asks the pure ``plan_tick`` which closed windows each service has not yet
reported, hands those records to the sinks, and only after every sink acknowledged moves
the service's high-water mark in ``status.usage``. A crash between emit and mark re-emits
the same records with the same ids; a sink that is down holds the mark where it is.

The mark lives in the AIService's status because it belongs to the service, is read back
with the service at no extra cost, survives operator restarts, and disappears with the
service. Pods carry a finalizer (see ``logic.children``) that the meter removes once a
pod's last second is behind the mark, so a pod that ends while the operator is down is
still there, with its timestamps, when the operator returns.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from kubernetes.client import ApiException
from pydantic import ValidationError

from gpuyard.api.pool import GPUPool
from gpuyard.handlers.context import Operator
from gpuyard.io.prometheus import PrometheusUnavailableError
from gpuyard.io.sinks import MultiSink, SinkError
from gpuyard.logic.children import METERING_FINALIZER
from gpuyard.logic.metering import (
    MeterConfig,
    MeteringError,
    PodLifetime,
    PoolPricing,
    PricePoint,
    ServiceBatch,
    ServiceKey,
    ServiceMark,
    UsageRecord,
    advance_mark,
    epoch_floor,
    is_fully_reported,
    mark_from_status,
    mark_to_status,
    measured,
    parse_time,
    plan_tick,
    pod_lifetime_from_dict,
    utilization_span,
)
from gpuyard.logic.promql import (
    GpuSeries,
    PodKey,
    PrometheusResponseError,
    gpu_utilization_query,
    parse_matrix_response,
)

logger = logging.getLogger(__name__)


def slim_pod(body: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of a Pod the meter reads; the cache keeps only these."""
    metadata = body.get("metadata", {})
    spec = body.get("spec", {})
    status = body.get("status", {})
    return {
        "metadata": {
            key: metadata.get(key)
            for key in ("name", "namespace", "uid", "labels", "deletionTimestamp", "finalizers")
        },
        "spec": {
            "nodeName": spec.get("nodeName"),
            "containers": [
                {"resources": c.get("resources", {})} for c in spec.get("containers", [])
            ],
            "initContainers": [
                {"resources": c.get("resources", {}), "restartPolicy": c.get("restartPolicy")}
                for c in spec.get("initContainers", [])
            ],
        },
        "status": {key: status.get(key) for key in ("phase", "conditions", "containerStatuses")},
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


def _pricing(op: Operator, now: datetime) -> dict[str, PoolPricing]:
    """Every pool's price schedule. A price change applies from the first window that
    starts after the operator saw it; the schedule is kept in memory, and after a restart
    the current price applies from the mark on (see docs/metering.md)."""
    # A pool deleted while its pods still run keeps the price it had: they are billed
    # at it until they end (after a restart that price is gone; see _lifetimes).
    pricing: dict[str, PoolPricing] = dict(op.price_schedules)
    for name in op.caches.pool_names():
        body = op.caches.pool(name)
        if body is None:
            continue
        try:
            pool = GPUPool.from_mapping(body)
        except ValidationError:
            continue
        price = pool.spec.price.per_gpu_hour_decimal
        known = op.price_schedules.get(name)
        if known is None:
            created = body["metadata"].get("creationTimestamp")
            since = parse_time(created) if created else now
            known = PoolPricing(
                name, pool.spec.gpu_type, pool.spec.price.currency,
                (PricePoint(since, price),), pool.spec.resource_name,
            )  # fmt: skip
        elif known.prices[-1].per_gpu_hour != price:
            known = known.with_price(PricePoint(now, price))
        op.price_schedules[name] = known
        pricing[name] = known
    return pricing


def _mark(op: Operator, key: ServiceKey) -> ServiceMark | None:
    """The newer of the mark we wrote last and the one in the cached status (the cache
    may lag our own write by a watch event). Once the service is gone, the mark we wrote
    last still covers the pods its finalizers hold; a service re-created under the same
    name while they are held carries their totals on (the mark follows the name)."""
    body = op.caches.service((key.namespace, key.service))
    stored = mark_from_status((body or {}).get("status", {}).get("usage")) if body else None
    written = op.marks.get(key)
    if written is None:
        return stored
    if stored is None or stored.reported_through < written.reported_through:
        return written
    return stored


async def meter_tick(op: Operator, now: datetime) -> None:
    sinks = op.sinks
    if sinks is None:
        return
    lifetimes, pods_by_uid = await _lifetimes(op, now)
    services = {lifetime.key for lifetime in lifetimes}
    services.update(ServiceKey(namespace, name) for namespace, name in op.caches.service_keys())
    marks = {key: mark for key in services if (mark := _mark(op, key)) is not None}
    config = MeterConfig(window_seconds=op.settings.usage_window_seconds)
    batches = await _with_utilization(op, plan_tick(lifetimes, marks, now, config))
    for batch in batches:
        mark = await _deliver(op, sinks, batch, marks.get(batch.key))
        if mark is not None:
            marks[batch.key] = mark
            op.metrics.metering_lag.labels(namespace=batch.key[0], service=batch.key[1]).set(
                (now - mark.reported_through).total_seconds()
            )
    for lifetime in lifetimes:
        if is_fully_reported(lifetime, marks.get(lifetime.key)):
            await _release(op, pods_by_uid[lifetime.pod_uid], lifetime.pod_uid)
    for key in set(op.marks) - services:
        del op.marks[key]  # no service and no pod left: nothing more to bill


async def _lifetimes(
    op: Operator, now: datetime
) -> tuple[list[PodLifetime], dict[str, dict[str, Any]]]:
    """The billable lifetime of every pod the meter knows, live or gone, by pod uid."""
    pricing = _pricing(op, now)
    lifetimes: list[PodLifetime] = []
    pods_by_uid: dict[str, dict[str, Any]] = {}
    pods: list[tuple[dict[str, Any], datetime | None]]
    pods = [(pod, None) for pod in op.caches.all_metered_pods()]
    pods += [(pod, gone_at) for pod, gone_at in op.gone_pods.values()]
    for pod, gone_at in pods:
        uid = pod["metadata"]["uid"]
        try:
            lifetime = pod_lifetime_from_dict(
                pod, pricing, cluster_id=op.settings.cluster_id, gone_at=gone_at
            )
        except MeteringError as error:
            op.metrics.meter_errors.labels(stage="unpriced").inc()
            logger.error("pod %s cannot be metered: %s", pod["metadata"].get("name"), error)
            if gone_at is not None or pod["metadata"].get("deletionTimestamp"):
                # Holding the pod would not price it; it would only block its namespace.
                await _release(op, pod, uid)
            continue
        if lifetime is not None:
            lifetimes.append(lifetime)
            pods_by_uid[uid] = pod
        elif gone_at is not None or pod["metadata"].get("deletionTimestamp"):
            # Never bound (deleted while Pending), so nothing to bill: without this the
            # finalizer would hold the pod forever, and namespace deletion with it.
            await _release(op, pod, uid)
    return lifetimes, pods_by_uid


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
    readings: dict[str, dict[PodKey, dict[int, float]]] = {}
    for series in {series_of_pool.get(record.pool, GpuSeries.GPU_UTIL) for record in records}:
        query = gpu_utilization_query(GpuSeries(series), window_seconds=width)
        try:
            body = await op.io(op.prometheus.query_range, query, *span, width)
            readings[series] = parse_matrix_response(body)
        except (PrometheusUnavailableError, PrometheusResponseError) as error:
            op.metrics.meter_errors.labels(stage="utilization").inc()
            logger.warning("usage goes out without utilisation: %s", error)

    def reading(record: UsageRecord) -> float | None:
        by_pod = readings.get(series_of_pool.get(record.pool, GpuSeries.GPU_UTIL), {})
        return by_pod.get((record.namespace, record.pod), {}).get(epoch_floor(record.end))

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
    op: Operator, sinks: MultiSink, batch: ServiceBatch, mark: ServiceMark | None
) -> ServiceMark | None:
    """Emit one service's batch and save its new mark; None when either failed (the
    next tick sends the same records, with the same ids, from the unchanged mark)."""
    try:
        await sinks.emit(batch.records)
    except SinkError as error:
        op.metrics.meter_errors.labels(stage="sink").inc()
        logger.warning("usage of %s/%s not delivered, will retry: %s", *batch.key, error)
        return None
    new_mark = advance_mark(mark, batch.records, batch.through)
    try:
        await _save_mark(op, batch.key, new_mark)
    except ApiException as error:
        # One service's status write must not stall every other service's metering.
        op.metrics.meter_errors.labels(stage="mark").inc()
        logger.warning("usage mark of %s/%s not saved, will retry: %s", *batch.key, error)
        return None
    return new_mark


async def _save_mark(op: Operator, key: ServiceKey, mark: ServiceMark) -> None:
    if op.caches.service((key.namespace, key.service)) is None or mark.currency is None:
        # The service is gone: there is no status to keep a mark in. Its pods' records
        # were delivered; until their finalizers are released a restart re-sends them
        # with the same ids, which is what ids are for.
        # No currency: nothing was billed yet (only empty windows, e.g. before the first
        # pod's first whole second), and the CRD requires one. Kept in memory; after a
        # restart the meter re-plans those windows from the pods and finds them empty.
        op.marks[key] = mark
        return
    await op.io(
        op.kube.patch_status,
        "aiservices",
        key.namespace,
        key.service,
        {"usage": mark_to_status(mark)},
    )
    op.marks[key] = mark


async def _release(op: Operator, pod: dict[str, Any], uid: str) -> None:
    """Forget a fully billed pod, and let it go if our finalizer holds it."""
    metadata = pod["metadata"]
    finalizers = list(metadata.get("finalizers") or [])
    if METERING_FINALIZER in finalizers:
        try:
            await op.io(
                op.kube.remove_finalizer, metadata["namespace"], metadata["name"],
                uid, finalizers, METERING_FINALIZER,
            )  # fmt: skip
        except ApiException as error:
            if error.status not in (404, 409, 422):
                raise
            return  # changed or gone meanwhile: the next tick looks again
    op.gone_pods.pop(uid, None)
