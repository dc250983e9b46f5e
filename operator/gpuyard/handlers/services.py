"""AIService reconcile: admission, children (created, then kept by server-side apply), status.

Level-triggered: the same function runs for a create, an update, a hand edit of a child,
a pool that changed, a restart. It reads everything from the caches, asks the pure core
what should exist, and writes only differences. A service the pool refuses gets
``Accepted=False``: its children are not created, and a Deployment it already has is
scaled to zero (nothing else of it changes), so a revoked admission stops its GPUs. The
namespace's quota on the pool caps the replicas applied at every change (``handlers.quota``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from kubernetes.client import ApiException
from pydantic import ValidationError

from gpuyard import FIELD_MANAGER
from gpuyard.api.names import ServiceKey
from gpuyard.api.pool import GPUPool
from gpuyard.api.reasons import LimitingFactor
from gpuyard.api.service import AIService
from gpuyard.handlers.context import Operator
from gpuyard.handlers.quota import NamespaceOnPool, namespace_on_pool
from gpuyard.logic.admission import AdmissionResult, check_service
from gpuyard.logic.autoscale import Decision, Mode
from gpuyard.logic.children import (
    DRA_API_VERSION,
    build_claim_template,
    build_deployment,
    build_disruption_budget,
    build_service,
    owner_reference,
    selector_string,
    stale_claim_templates,
)
from gpuyard.logic.conditions import (
    QUOTA_LIMITED,
    SCALE_REQUEST_IGNORED,
    ConditionUpdate,
    accepted_condition,
    apply_conditions,
    capacity_condition,
    find_condition,
    pods_refused,
    quota_condition,
    ready_condition,
    scale_request_condition,
    service_kstatus_conditions,
    usage_reported_condition,
)
from gpuyard.logic.drift import (
    fields_taken_over,
    foreign_template_fields,
    needs_apply,
    updated_beside_applied,
    with_applied_hash,
)
from gpuyard.logic.metering import Account
from gpuyard.logic.pool_accounting import PoolUsage, compute_pool_usage
from gpuyard.logic.quota import QuotaVerdict
from gpuyard.logic.replicas import target_replicas
from gpuyard.logic.scaling_status import autoscaler_conditions, recommendation
from gpuyard.logic.startup import startup_status
from gpuyard.logic.status import (
    apply_merge_patch,
    pool_usage_status,
    service_status,
    status_patch,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Accepted:
    """An accepted service, with everything its reconcile read from the caches."""

    key: ServiceKey
    body: dict[str, Any]
    service: AIService
    pool: GPUPool
    usage: PoolUsage
    admission: AdmissionResult
    decision: Decision | None
    live: dict[str, Any] | None
    now: datetime
    tenant: NamespaceOnPool


@dataclass(frozen=True)
class _Applied:
    """The replica count applied, and what the namespace's quota made of the wanted one."""

    replicas: int
    wanted: int
    quota: QuotaVerdict
    #: Whether the quota cut the count applied here (below what spec or decision asked).
    cut_by_quota: bool


async def reconcile_service(op: Operator, key: ServiceKey) -> None:
    body = op.caches.service(key)
    if body is None:
        # Deleted: the garbage collector removes the children through their owner reference.
        op.forget_service(key)
        return
    op.remember_reads(key, body)
    own = op.own_status.get(key)
    if own is not None:
        # Watch events of our own earlier writes arrive after those writes, some of them
        # after later ones: a status from the cache can be older than what we last wrote,
        # and would make us write again. Our last write is what is stored.
        body = {**body, "status": {**(body.get("status") or {}), **own}}
    now = datetime.now(UTC)
    try:
        service = AIService.from_mapping(body)
    except ValidationError as error:
        await _refuse(op, key, body, AdmissionResult(False, "InvalidSpec", _explain(error)), now)
        return
    pool = _pool(op, service.spec.pool)
    usage = _pool_usage(op, pool) if pool is not None else None
    tenant = None
    if pool is not None and usage is not None:
        gpus = service.spec.gpus_per_replica
        tenant = namespace_on_pool(op, key, pool_name=pool.name, usage=usage, gpus_per_replica=gpus)
    admission = check_service(
        service,
        pool,
        pool_usage_status(usage) if usage is not None else None,
        op.caches.namespace_labels(key[0]) or {},
        # Siblings count with what they are sure to keep, not with all they hold: the
        # quota is shared fairly, and they give back what is above their share.
        tenant.admission_gpus if tenant is not None else 0,
    )
    if not admission.accepted or pool is None or usage is None or tenant is None:
        await _refuse(op, key, body, admission, now)
        return
    if key in op.not_accepted:
        op.set_refused(key, None)
    live = op.caches.deployment(key)
    op.remember_deployment(key, live)
    decision = _decision(op, key, service=service, pool=pool, live=live, now=now)
    accepted = _Accepted(key, body, service, pool, usage, admission, decision, live, now, tenant)
    refused = await _make_claim_template(op, accepted)
    if refused is not None:
        # Never half-made children: a Deployment whose pods name a template that does not
        # exist would leave every new pod Pending. What runs keeps running as it is.
        await _refuse(op, key, body, refused, now, stop=False)
        return
    applied = await _apply_children(op, accepted)
    replicas = applied.replicas
    ready = int(((accepted.live or {}).get("status") or {}).get("readyReplicas") or 0)
    op.metrics.service_replicas.labels(key[0], key[1], "desired").set(replicas)
    op.metrics.service_replicas.labels(key[0], key[1], "ready").set(ready)
    if live is None:
        # Just created. The status waits for the reconcile that the Deployment's first
        # watch event brings: it queues behind every service still waiting for its
        # Deployment (the work queue's urgent lane), and finds the Deployment cached.
        return
    stored_conditions = (body.get("status") or {}).get("conditions")
    was_limited = find_condition(stored_conditions, QUOTA_LIMITED)
    was_ignored = find_condition(stored_conditions, SCALE_REQUEST_IGNORED)
    desired = _desired_status(op, accepted, applied)
    await _write_status(op, key, body, desired)
    ignored = find_condition(desired.get("conditions"), SCALE_REQUEST_IGNORED) or {}
    if ignored.get("status") == "True" and (was_ignored or {}).get("status") != "True":
        await op.io(
            op.kube.post_event, body, SCALE_REQUEST_IGNORED, ignored.get("message", ""), now,
            "Warning",
        )  # fmt: skip
    if applied.quota.limited and (was_limited or {}).get("status") != "True":
        limited = find_condition(desired.get("conditions"), QUOTA_LIMITED) or {}
        await op.io(
            op.kube.post_event, body, QUOTA_LIMITED, limited.get("message", ""), now, "Warning"
        )


async def _apply_children(op: Operator, it: _Accepted) -> _Applied:
    """Apply the Deployment (and Service) where they differ; return the replica count."""
    live_replicas = it.live["spec"].get("replicas") if it.live else None
    wanted = target_replicas(
        it.service.spec,
        decided=it.decision.desired_replicas if it.decision is not None else None,
        persisted=(it.body.get("status") or {}).get("desiredReplicas"),
        live=live_replicas,
    )
    # Whoever chose `wanted` (the autoscaler, `kubectl scale` in mode Off), the namespace's
    # quota on the pool caps what is applied. The siblings' fair shares read the claim: what
    # it would run without the quota (the autoscaler's count before its quota cut).
    claim = wanted
    if it.decision is not None and it.service.spec.autoscaling.mode == "Auto":
        claim = max(wanted, it.decision.quota_wanted_replicas or 0)
    op.quota_wants[it.key] = claim
    gpus = it.service.spec.gpus_per_replica
    quota = it.tenant.verdict(
        it.pool.spec.max_gpus_per_namespace, gpus_per_replica=gpus, wanted_replicas=claim
    )
    replicas = wanted
    if quota.max_replicas is not None and quota.max_replicas < wanted:
        replicas = quota.max_replicas
    if quota.waits_for_siblings:
        # Siblings hold part of this one's fair share: their reconciles give it back.
        for sibling in op.caches.services_of_pool(it.pool.name):
            if sibling[0] == it.key[0] and sibling != it.key:
                op.service_queue.add(sibling)
    owner = owner_reference(it.service)
    deployment = with_applied_hash(build_deployment(it.service, it.pool, replicas, owner))
    live, reclaim = await _remove_foreign_fields(op, deployment, it.live)
    if reclaim or needs_apply(deployment, live):
        await _apply(op, deployment, live)
        if live_replicas is not None and live_replicas != replicas:
            await _announce_scale(op, it, live_replicas, replicas, quota)
    await _apply_optional(
        op, it.key, build_service(it.service, it.pool, owner), op.caches.network_service(it.key),
        api_version="v1", kind="Service",
    )  # fmt: skip
    await _apply_optional(
        op, it.key, build_disruption_budget(it.service, it.pool, owner),
        op.caches.disruption_budget(it.key), api_version="policy/v1", kind="PodDisruptionBudget",
    )  # fmt: skip
    await _delete_stale_claim_templates(op, it)
    return _Applied(replicas=replicas, wanted=claim, quota=quota, cut_by_quota=replicas < wanted)


#: Create refusals of a ResourceClaimTemplate that a retry will not mend: the condition says
#: why (no RBAC for the kind, an invalid CEL selector, a namespace quota on claims).
_LASTING_REFUSALS = frozenset({400, 403, 404, 422})
#: How soon a refused template is tried again: no watch event says that a quota was raised
#: or a role granted, and the refusal must not wait for the periodic resync.
CLAIM_TEMPLATE_RETRY_SECONDS = 10.0


async def _make_claim_template(op: Operator, it: _Accepted) -> AdmissionResult | None:
    """Create the service's ResourceClaimTemplate, before the Deployment that names it;
    None when it exists (or none is needed), else why it could not be made."""
    template = build_claim_template(it.service, it.pool, owner_reference(it.service))
    if template is None:
        return None
    name = template["metadata"]["name"]
    live = next(
        (t for t in op.caches.claim_templates(it.key) if t["metadata"]["name"] == name), None
    )
    if live is not None:
        if _ours(live, template):
            return None
        # A namesake that someone with `edit` made, labelled as gpuyard's: its claims would
        # take whatever it asks. It goes, and this service's own takes its place.
        logger.warning("ResourceClaimTemplate %s/%s is not gpuyard's; replacing it", *it.key)
        await op.io(op.kube.delete, DRA_API_VERSION, "ResourceClaimTemplate", it.key[0], name)
    try:
        await op.io(op.kube.create, template)
    except ApiException as error:
        if error.status == 409:  # made by an earlier reconcile; the cache is behind
            return None
        if error.status not in _LASTING_REFUSALS:
            raise
        message = f"ResourceClaimTemplate {name} cannot be created: {_api_message(error)}"
        op.service_queue.add_after(it.key, CLAIM_TEMPLATE_RETRY_SECONDS)
        return AdmissionResult(False, "ClaimTemplateRefused", message)
    return None


async def _delete_stale_claim_templates(op: Operator, it: _Accepted) -> None:
    """Delete the templates of earlier claim specs once the rollout no longer needs them."""
    wanted = build_claim_template(it.service, it.pool, owner_reference(it.service))
    names = [live["metadata"]["name"] for live in op.caches.claim_templates(it.key)]
    wanted_name = wanted["metadata"]["name"] if wanted is not None else None
    for name in stale_claim_templates(wanted_name, names, it.live):
        await op.io(op.kube.delete, DRA_API_VERSION, "ResourceClaimTemplate", it.key[0], name)


def _ours(live: dict[str, Any], desired: dict[str, Any]) -> bool:
    """Whether a stored template is the one gpuyard made: owned by the service (same uid)
    and holding exactly the claim it builds. Exactly: a field added beside gpuyard's (an
    `adminAccess`, a driver `config`) would change what every replica's claim gets."""
    owners = live["metadata"].get("ownerReferences") or ()
    uid = desired["metadata"]["ownerReferences"][0]["uid"]
    owned = any(owner.get("uid") == uid and owner.get("controller") for owner in owners)
    return owned and (live.get("spec") or {}).get("spec") == desired["spec"]["spec"]


def _api_message(error: ApiException) -> str:
    """The API server's own message of a refusal (its Status body), else its reason."""
    try:
        body = json.loads(error.body or "{}")
    except ValueError:
        body = {}
    message = body.get("message") if isinstance(body, dict) else None
    return str(message or error.reason or error.status)[:500]


async def _apply_optional(
    op: Operator,
    key: ServiceKey,
    desired: dict[str, Any] | None,
    live: dict[str, Any] | None,
    *,
    api_version: str,
    kind: str,
) -> None:
    """Apply a child the spec may do without (None: delete one left from an earlier spec)."""
    if desired is not None:
        desired = with_applied_hash(desired)
        if needs_apply(desired, live):
            await _apply(op, desired, live)
    elif live is not None:
        await op.io(op.kube.delete, api_version, kind, key[0], key[1])


async def _remove_foreign_fields(
    op: Operator, desired: dict[str, Any], live: dict[str, Any] | None
) -> tuple[dict[str, Any] | None, bool]:
    """Remove what other managers added to the Deployment's pod template (gpuyard owns all
    of it, see gpuyard.logic.drift); return the Deployment as it is then, and whether it
    needs an apply all the same: another manager holds a field gpuyard sets, or a write of
    gpuyard's other than an apply (a removal, whose default the API server filled back in)
    recorded fields as gpuyard's ``Update``, which the apply takes over and lets go, so that
    gpuyard keeps its one ``Apply`` entry.

    One JSON patch, tested against the resourceVersion read: the indices of list items it
    names hold, and the pod template it leaves is gpuyard's, which the admission policy on
    gpuyard's writes asks even of a patch that removes.
    """
    if live is None:
        return None, False
    foreign = foreign_template_fields(live, desired, FIELD_MANAGER)
    if foreign.removals:
        version = live["metadata"]["resourceVersion"]
        patched = await op.io(op.kube.remove_fields, desired, version, foreign.removals)
        if patched is None:
            # The cache is behind what is stored: the watch event of the newer version
            # brings another reconcile, which sees what is there.
            return live, False
        live = patched
    managed = live["metadata"].get("managedFields")
    return live, foreign.taken_from_us or updated_beside_applied(managed, FIELD_MANAGER)


async def _apply(op: Operator, desired: dict[str, Any], live: dict[str, Any] | None) -> None:
    """Create a missing child (a create costs the API server a third of an apply), else
    server-side apply it, after taking over the fields its create recorded."""
    if live is None:
        await op.io(op.kube.create, desired)
        return
    metadata = live["metadata"]
    taken_over = fields_taken_over(metadata.get("managedFields"), FIELD_MANAGER)
    if taken_over is not None:
        await op.io(op.kube.take_over_fields, desired, metadata["resourceVersion"], taken_over)
    await op.io(op.kube.apply, desired)


def _desired_status(op: Operator, it: _Accepted, applied: _Applied) -> dict[str, Any]:
    replicas = applied.replicas
    current_status: dict[str, Any] = it.body.get("status") or {}
    live_status = (it.live or {}).get("status") or {}
    current_replicas = int(live_status.get("replicas") or 0)
    ready_replicas = int(live_status.get("readyReplicas") or 0)
    gpus = it.service.spec.gpus_per_replica
    placement = capacity_condition(
        wanted_replicas=replicas,
        placed_replicas=it.usage.bound_by_service.get(it.key, 0) // gpus,
        gpus_per_replica=gpus,
        available_gpus=it.usage.available,
        pool_name=it.pool.name,
        resource_name=it.pool.spec.resource_name,
        fitting_replicas=it.usage.replicas_that_fit(gpus),
    )
    decision = it.decision
    if (
        decision is not None
        and applied.cut_by_quota
        and decision.mode is not Mode.RECOMMEND  # a recommendation applies nothing
        and replicas < decision.desired_replicas
    ):
        # The quota cut what the autoscaler (or spec.replicas) asked for here, not in the
        # decision (a sibling's claim moved since, or mode Off): the recommendation says so.
        decision = replace(
            decision, desired_replicas=replicas, limiting_factor=LimitingFactor.QUOTA
        )
    quota = quota_condition(
        applied.quota,
        quota=it.pool.spec.max_gpus_per_namespace,
        wanted_replicas=applied.wanted,
        namespace=it.key[0],
        pool_name=it.pool.name,
        resource_name=it.pool.spec.resource_name,
    )
    scaling = autoscaler_conditions(decision)
    scale_request = scale_request_condition(
        it.service.spec.autoscaling.mode,
        it.service.spec.replicas,
        shown=find_condition(current_status.get("conditions"), SCALE_REQUEST_IGNORED) is not None,
    )
    # The autoscaler's verdict on capacity (the pool cut what it wanted) outranks the
    # placement check, which only sees replicas already asked for.
    capacity = next((c for c in scaling if c.type == placement.type), placement)
    ready = ready_condition(
        admission=it.admission,
        desired_replicas=replicas,
        ready_replicas=ready_replicas,
        current_replicas=current_replicas,
        updated_replicas=int(live_status.get("updatedReplicas") or 0),
        capacity=capacity,
        pods_refused=pods_refused(live_status),
    )
    generation = it.body["metadata"].get("generation")
    conditions = apply_conditions(
        current_status.get("conditions"),
        [accepted_condition(it.admission), ready, *service_kstatus_conditions(ready), capacity]
        + ([quota] if quota is not None else [])
        + ([scale_request] if scale_request is not None else [])
        + [c for c in scaling if c.type != capacity.type]
        + _usage_conditions(op, it.key),
        generation,
        it.now,
    )
    return service_status(
        observed_generation=generation,
        replicas=current_replicas,
        ready_replicas=ready_replicas,
        desired_replicas=replicas,
        selector=selector_string(it.service),
        gpu_type=it.pool.spec.gpu_type,
        recommendation=recommendation(decision, current_status.get("recommendation"), it.now),
        last_scale_time=it.decision.state.last_scale_time if it.decision else None,
        conditions=conditions,
        # None (no start seen since this operator started) leaves what status shows.
        startup=startup_status(op.startups.get(it.key, ())),
    )


async def _refuse(
    op: Operator,
    key: ServiceKey,
    body: dict[str, Any],
    admission: AdmissionResult,
    now: datetime,
    *,
    stop: bool = True,
) -> None:
    """Say why in the status, and (`stop`) scale a Deployment the service already has to
    zero (a revoked admission stops its GPUs); create, delete and change nothing else, so
    that a re-grant brings it back as its spec and load ask."""
    op.remember_deployment(key, None)  # not read: each of its events reconciles
    op.quota_wants[key] = 0
    if op.not_accepted.get(key) != admission.reason:
        logger.warning(
            "AIService %s/%s not accepted: %s: %s", *key, admission.reason, admission.message
        )
    op.set_refused(key, admission.reason)
    live = op.caches.deployment(key)
    running = int(((live or {}).get("spec") or {}).get("replicas") or 0)
    if stop and live is not None and running > 0:
        await op.io(op.kube.scale_deployment, key[0], key[1], 0)
        message = f"{running} -> 0 replicas: not accepted: {admission.message}"
        await op.io(op.kube.post_event, body, admission.reason, message, now, "Warning")
    current_status: dict[str, Any] = body.get("status") or {}
    generation = body["metadata"].get("generation")
    ready = ready_condition(
        admission=admission,
        desired_replicas=0,
        ready_replicas=0,
        current_replicas=0,
        updated_replicas=0,
    )
    conditions = apply_conditions(
        current_status.get("conditions"),
        [
            accepted_condition(admission),
            ready,
            *service_kstatus_conditions(ready),
            *_usage_conditions(op, key),
        ],
        generation,
        now,
    )
    desired = service_status(observed_generation=generation, conditions=conditions)
    await _write_status(op, key, body, desired)


async def _write_status(
    op: Operator, key: ServiceKey, body: dict[str, Any], desired: dict[str, Any]
) -> None:
    """Patch the status fields that differ from the cached ``body``'s, and record them in
    the cached body.

    The cache learns of the write only with the next watch event. A reconcile that runs
    before it (the Deployment's first events come in the meantime) would otherwise start
    from the old status and write again, with new lastTransitionTimes. A merge patch
    replaces whole top-level fields, so the cached status becomes exactly what is stored;
    the next watch event replaces the cached body altogether.
    """
    current: dict[str, Any] = body.get("status") or {}
    patch = status_patch(current, desired)
    if patch:
        await op.io(op.kube.patch_status, "aiservices", key[0], key[1], patch)
        body["status"] = apply_merge_patch(current, patch)
        # The meter owns status.usage; every other field is this reconcile's alone.
        op.own_status[key] = {k: v for k, v in body["status"].items() if k != "usage"}


def _usage_conditions(op: Operator, key: ServiceKey) -> list[ConditionUpdate]:
    """UsageReported, once the meter has tried to deliver the service's usage."""
    account = Account(*key)
    if account not in op.usage_problems:
        return []
    return [usage_reported_condition(op.usage_problems[account])]


def _decision(
    op: Operator,
    key: ServiceKey,
    *,
    service: AIService,
    pool: GPUPool,
    live: dict[str, Any] | None,
    now: datetime,
) -> Decision | None:
    """The autoscaler's decision; in mode Off, made at once when it has none yet (mode Off
    needs no metric, so the first status write can hold every condition)."""
    decision = op.scaling.decision(key)
    if decision is None and service.spec.autoscaling.mode == "Off":
        decision = op.scaling.decide_off(key, service=service, pool=pool, live=live, now=now)
    return decision


def _pool(op: Operator, name: str) -> GPUPool | None:
    """The pool, parsed once per resourceVersion: its many services share the parse."""
    body = op.caches.pool(name)
    if body is None:
        op.parsed_pools.pop(name, None)
        return None
    version = body["metadata"].get("resourceVersion")
    parsed = op.parsed_pools.get(name)
    if version is not None and parsed is not None and parsed[0] == version:
        return parsed[1]
    try:
        pool: GPUPool | None = GPUPool.from_mapping(body)
    except ValidationError:
        pool = None  # the pool reconcile logs it; for its services it is as good as absent
    op.parsed_pools[name] = (version, pool)
    return pool


def _pool_usage(op: Operator, pool: GPUPool) -> PoolUsage:
    # The pool reconcile keeps this current on every node or pod event; computing it here
    # only covers a service reconciled before its pool's first reconcile.
    usage = op.pool_usage.get(pool.name)
    if usage is None:
        usage = compute_pool_usage(pool, op.caches.all_nodes(), op.caches.all_gpu_pods(), op.caches)
        op.pool_usage[pool.name] = usage
    return usage


def _explain(error: ValidationError) -> str:
    parts = []
    for item in error.errors()[:3]:
        where = ".".join(str(part) for part in item["loc"])
        parts.append(f"{where}: {item['msg']}")
    return "spec is invalid: " + "; ".join(parts)


async def _announce_scale(
    op: Operator, it: _Accepted, before: int, after: int, quota: QuotaVerdict
) -> None:
    """A Kubernetes Event on the AIService for each scale, saying why."""
    why = it.decision.message if it.decision is not None else "spec changed"
    if quota.limited:
        why = f'the namespace quota of GPUPool "{it.pool.name}" allows {quota.max_replicas}'
    reason = "ScaledUp" if after > before else "ScaledDown"
    message = f"{before} -> {after} replicas: {why}"
    await op.io(op.kube.post_event, it.body, reason, message, it.now)
