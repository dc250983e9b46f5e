"""Conditions, kept the way the Kubernetes API conventions (and Flux, and `kubectl wait`)
expect: one entry per type, a CamelCase reason, a message for people, and a
`lastTransitionTime` that moves only when the status does, so that re-deciding the same thing
writes nothing.

The `*_condition` functions decide what a condition says; `set_condition` and
`apply_conditions` merge those decisions into the list already stored.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from gpuyard.api.common import Condition
from gpuyard.api.formats import format_time
from gpuyard.logic.admission import AdmissionResult
from gpuyard.logic.pool_accounting import PoolUsage
from gpuyard.logic.quota import QuotaVerdict

READY = "Ready"
ACCEPTED = "Accepted"
CAPACITY_LIMITED = "CapacityLimited"
BUDGET_LIMITED = "BudgetLimited"
QUOTA_LIMITED = "QuotaLimited"
METRICS_AVAILABLE = "MetricsAvailable"
USAGE_REPORTED = "UsageReported"
#: A replica count asked through the scale subresource (kubectl scale, an HPA, KEDA) that
#: the service's autoscaling mode does not apply.
SCALE_REQUEST_IGNORED = "ScaleRequestIgnored"
# The abnormal-true pair that kstatus (Flux's health checks) reads before anything else.
RECONCILING = "Reconciling"
STALLED = "Stalled"

ConditionStatus = Literal["True", "False", "Unknown"]


@dataclass(frozen=True)
class ConditionUpdate:
    """What a condition should say now; its timestamps come from `set_condition`."""

    type: str
    status: ConditionStatus
    reason: str
    message: str


def find_condition(
    conditions: Sequence[Mapping[str, Any]] | None, condition_type: str
) -> Mapping[str, Any] | None:
    """The condition of `condition_type`, or None."""
    return next((c for c in conditions or () if c.get("type") == condition_type), None)


def set_condition(
    conditions: Sequence[Mapping[str, Any]] | None,
    condition_type: str,
    *,
    status: ConditionStatus,
    reason: str,
    message: str,
    observed_generation: int | None,
    now: datetime,
) -> list[dict[str, Any]]:
    """`conditions` with the `condition_type` entry set; the input is left untouched.

    `lastTransitionTime` becomes `now` only when the status changes (or the condition is
    new); other entries and the order of the list are kept, so an unchanged decision yields
    an equal list.
    """
    previous = find_condition(conditions, condition_type)
    transition_time = format_time(now, whole_seconds=True)
    if previous is not None and previous.get("status") == status:
        transition_time = str(previous.get("lastTransitionTime") or transition_time)
    # Validating through the model refuses a reason that is not CamelCase or a message that
    # is too long here, in a unit test, rather than as a failed status write.
    updated = Condition(
        type=condition_type,
        status=status,
        observed_generation=observed_generation,
        last_transition_time=transition_time,
        reason=reason,
        message=message,
    ).to_json()
    result = [dict(c) for c in conditions or ()]
    for index, condition in enumerate(result):
        if condition.get("type") == condition_type:
            result[index] = updated
            return result
    result.append(updated)
    return result


def apply_conditions(
    conditions: Sequence[Mapping[str, Any]] | None,
    updates: Iterable[ConditionUpdate],
    observed_generation: int | None,
    now: datetime,
) -> list[dict[str, Any]]:
    """`conditions` with every update set, in order."""
    result = [dict(c) for c in conditions or ()]
    for update in updates:
        result = set_condition(
            result,
            update.type,
            status=update.status,
            reason=update.reason,
            message=update.message,
            observed_generation=observed_generation,
            now=now,
        )
    return result


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def accepted_condition(admission: AdmissionResult) -> ConditionUpdate:
    """`Accepted`: the admission verdict as a condition."""
    return ConditionUpdate(
        type=ACCEPTED,
        status="True" if admission.accepted else "False",
        reason=admission.reason,
        message=admission.message,
    )


def capacity_condition(
    *,
    wanted_replicas: int,
    placed_replicas: int,
    gpus_per_replica: int,
    available_gpus: int,
    pool_name: str,
    resource_name: str,
    fitting_replicas: int | None = None,
) -> ConditionUpdate:
    """`CapacityLimited`: whether the pool can place the replicas the service wants.

    `wanted_replicas` is what the service would run if the pool were big enough (the
    recommendation before the capacity limit), `placed_replicas` the replicas already holding
    GPUs. `fitting_replicas`, when known (see `PoolUsage.replicas_that_fit`), accounts for
    free GPUs scattered over nodes such that no node has enough for one replica; without it
    the free GPUs are treated as one block.
    """
    unplaced = max(0, wanted_replicas - placed_replicas)
    fitting = available_gpus // gpus_per_replica if fitting_replicas is None else fitting_replicas
    short_replicas = max(0, unplaced - fitting)
    if short_replicas == 0:
        return ConditionUpdate(
            type=CAPACITY_LIMITED,
            status="False",
            reason="SufficientGPUs",
            # No counts here: they change with every pod in the pool, and a message that
            # changes would rewrite the status of every service in it.
            message=f'GPUPool "{pool_name}" can place every wanted replica',
        )
    missing_gpus = max(0, unplaced * gpus_per_replica - available_gpus)
    waiting = (
        f"{_plural(unplaced, 'replica')} of {gpus_per_replica} {resource_name} "
        f"{'waits' if unplaced == 1 else 'wait'} for placement"
    )
    if missing_gpus > 0:
        message = (
            f'GPUPool "{pool_name}" needs {missing_gpus} more {resource_name}: {waiting} and '
            f"{available_gpus} {'is' if available_gpus == 1 else 'are'} free"
        )
        reason = "InsufficientGPUs"
    else:
        message = (
            f'GPUPool "{pool_name}" has {available_gpus} {resource_name} free, but spread over '
            f"nodes so that only {_plural(fitting, 'more replica')} of {gpus_per_replica} "
            f"fit: {waiting}"
        )
        reason = "FragmentedGPUs"
    return ConditionUpdate(type=CAPACITY_LIMITED, status="True", reason=reason, message=message)


def quota_condition(
    verdict: QuotaVerdict,
    *,
    quota: int | None,
    wanted_replicas: int,
    namespace: str,
    pool_name: str,
    resource_name: str,
) -> ConditionUpdate | None:
    """`QuotaLimited`: whether the namespace's quota on the pool cuts the replicas the
    service wants; None when the pool sets no quota (the condition is then not shown)."""
    if quota is None or verdict.max_replicas is None:
        return None
    if not verdict.limited:
        return ConditionUpdate(
            QUOTA_LIMITED,
            "False",
            "WithinQuota",
            f'namespace "{namespace}" may hold {quota} {resource_name} of GPUPool '
            f'"{pool_name}", enough for every wanted replica',
        )
    shared = (
        ""
        if verdict.fair_replicas is None or verdict.fair_replicas <= verdict.max_replicas
        else f" (its fair share is {verdict.fair_replicas}, free once the namespace's other "
        "services are down to theirs)"
    )
    return ConditionUpdate(
        QUOTA_LIMITED,
        "True",
        "QuotaCapsReplicas",
        f"{_plural(wanted_replicas, 'replica')} wanted, {verdict.max_replicas} allowed{shared}: "
        f'namespace "{namespace}" may hold {quota} {resource_name} of GPUPool "{pool_name}" '
        f"and lacks {verdict.missing_gpus} for the rest; raise maxGpusPerNamespace or lower "
        "the replicas",
    )


def scale_request_condition(
    mode: str, spec_replicas: int | None, *, shown: bool
) -> ConditionUpdate | None:
    """`ScaleRequestIgnored`: whether a ``spec.replicas`` written through the scale
    subresource goes unapplied because gpuyard owns the count (mode Auto or Recommend).

    A tenant's ScaledObject or HPA on such a service would otherwise write into the void.
    The condition appears only once a request was ignored (``shown`` says it is in the
    status already), so a service nobody scales by hand carries none.
    """
    if mode != "Off" and spec_replicas is not None:
        return ConditionUpdate(
            SCALE_REQUEST_IGNORED,
            "True",
            f"AutoscalingMode{mode}",
            f"spec.replicas asks for {_plural(spec_replicas, 'replica')} (the scale "
            f"subresource: kubectl scale, an HPA or KEDA), but autoscaling.mode is {mode}: "
            "gpuyard sizes the service; set autoscaling.mode to Off to hand the count over",
        )
    if not shown:
        return None
    reason = "AutoscalingModeOff" if mode == "Off" else "NoScaleRequest"
    return ConditionUpdate(
        SCALE_REQUEST_IGNORED,
        "False",
        reason,
        "spec.replicas applies (autoscaling.mode is Off)"
        if mode == "Off"
        else "spec.replicas is unset: nothing asked through the scale subresource",
    )


def ready_condition(
    *,
    admission: AdmissionResult,
    desired_replicas: int,
    ready_replicas: int,
    current_replicas: int,
    updated_replicas: int,
    capacity: ConditionUpdate | None = None,
    pods_refused: str | None = None,
) -> ConditionUpdate:
    """`Ready`: whether the service serves as its current spec says.

    `current_replicas` and `updated_replicas` are the Deployment's status.replicas (pods that
    exist) and status.updatedReplicas (those of them on the current pod template): fewer
    updated than existing means old pods still run, a rollout. `capacity` is the
    CapacityLimited decision, whose message explains replicas that wait for GPUs.
    `pods_refused` is the API server's answer when it refuses to create the replicas' pods
    (the Deployment's ReplicaFailure condition), such as a Pod Security violation.
    """
    if not admission.accepted:
        return ConditionUpdate(READY, "False", admission.reason, admission.message)
    if desired_replicas == 0:
        return ConditionUpdate(READY, "True", "ScaledToZero", "scaled to zero replicas")
    progress = f"{ready_replicas}/{desired_replicas} replicas ready"
    if pods_refused is not None and ready_replicas < desired_replicas:
        # Before the rollout check: a new template whose pods are refused would otherwise
        # show as a rollout that never ends, without the reason.
        return ConditionUpdate(
            READY,
            "False",
            "PodsRefused",
            f"{progress}; the API server refuses the replicas' pods: {pods_refused}",
        )
    if updated_replicas < current_replicas:
        return ConditionUpdate(
            READY,
            "False",
            "RollingOut",
            f"{updated_replicas}/{current_replicas} replicas run the current spec, {progress}",
        )
    if ready_replicas >= desired_replicas:
        return ConditionUpdate(READY, "True", "ReplicasReady", progress)
    return _not_ready(progress, capacity)


def _not_ready(progress: str, capacity: ConditionUpdate | None) -> ConditionUpdate:
    if capacity is not None and capacity.status == "True":
        return ConditionUpdate(READY, "False", "WaitingForGPUs", f"{progress}; {capacity.message}")
    return ConditionUpdate(READY, "False", "ReplicasNotReady", progress)


#: Ready=False reasons of an accepted service that clear without a person: replicas roll
#: out, start, or wait for GPUs a full pool will free. Every other Ready=False (a spec the
#: operator refuses, pods the API server refuses) lasts until someone changes something.
UNDER_WAY = frozenset({"RollingOut", "ReplicasNotReady", "WaitingForGPUs"})


def kstatus_conditions(ready: ConditionUpdate, *, stalled: bool) -> list[ConditionUpdate]:
    """`Reconciling` and `Stalled`, as kstatus documents them, from the Ready decision.

    kstatus reads a custom resource by these two abnormal-true conditions (after checking
    status.observedGeneration): `Stalled=True` is Failed, `Reconciling=True` InProgress.
    A Ready=False alone is InProgress to it, so without them a refused service would keep
    a Flux Kustomization waiting for its whole timeout. `stalled` says that Ready=False
    lasts until a person acts; otherwise a Ready that is not True is work under way. The
    condition that is True carries Ready's reason and message; both are False when Ready
    is True.
    """
    if ready.status == "True":
        return [
            ConditionUpdate(
                RECONCILING, "False", "Reconciled", "nothing is under way: Ready holds the outcome"
            ),
            _NOT_STALLED,
        ]
    if stalled:
        return [
            ConditionUpdate(
                RECONCILING,
                "False",
                "Stalled",
                "nothing is under way until what Stalled names changes",
            ),
            ConditionUpdate(STALLED, "True", ready.reason, ready.message),
        ]
    return [ConditionUpdate(RECONCILING, "True", ready.reason, ready.message), _NOT_STALLED]


_NOT_STALLED = ConditionUpdate(
    STALLED, "False", "NotStalled", "nothing that needs a person stops the reconcile"
)


def service_kstatus_conditions(ready: ConditionUpdate) -> list[ConditionUpdate]:
    """`Reconciling` and `Stalled` of an AIService: every Ready=False reason outside
    `UNDER_WAY` (each refusal of admission, InvalidSpec, PodsRefused) is a stall."""
    return kstatus_conditions(
        ready, stalled=ready.status == "False" and ready.reason not in UNDER_WAY
    )


def pool_kstatus_conditions(ready: ConditionUpdate) -> list[ConditionUpdate]:
    """`Reconciling` and `Stalled` of a GPUPool: a pool refuses nothing, and a Ready=False
    pool waits for nodes (a node group scaling from zero, a node turning Ready, a device
    plugin starting), so it reconciles and never stalls."""
    return kstatus_conditions(ready, stalled=False)


def pods_refused(deployment_status: Mapping[str, Any]) -> str | None:
    """The API server's refusal of a Deployment's pods, from its ReplicaFailure condition
    (the ReplicaSet controller's FailedCreate), or None while pods can be created."""
    failure = find_condition(deployment_status.get("conditions"), "ReplicaFailure")
    if failure is None or failure.get("status") != "True":
        return None
    return str(failure.get("message") or failure.get("reason") or "ReplicaFailure")


def pool_ready_condition(usage: PoolUsage, *, resource_name: str) -> ConditionUpdate:
    """`Ready` of a GPUPool: whether any node can take the pool's pods."""
    if usage.device_problem is not None:
        reason, message = usage.device_problem
        return ConditionUpdate(READY, "False", reason, message)
    if usage.nodes == 0:
        return ConditionUpdate(
            READY,
            "False",
            "NoMatchingNodes",
            "no node matches spec.nodeSelector: label the GPU nodes or fix the selector",
        )
    if usage.ready_nodes == 0:
        return ConditionUpdate(
            READY,
            "False",
            "NoReadyNodes",
            f"none of the {_plural(usage.nodes, 'matching node')} can take pods: each is "
            "NotReady, cordoned, or has a NoSchedule/NoExecute taint the pool does not tolerate",
        )
    unit = usage.unit or resource_name
    if usage.capacity == 0 and unit != resource_name:
        return ConditionUpdate(
            READY,
            "False",
            "NoMatchingDevices",
            f"no ready node has {unit}: check that the DRA driver publishes ResourceSlices "
            "for the nodes, or the pool's spec.devices",
        )
    if usage.capacity == 0:
        return ConditionUpdate(
            READY,
            "False",
            "NoAllocatableGPUs",
            f"no ready node reports allocatable {resource_name}: check the device plugin "
            "on the nodes, or spec.resourceName",
        )
    return ConditionUpdate(
        READY,
        "True",
        "NodesReady",
        f"{usage.ready_nodes}/{usage.nodes} nodes ready, {usage.available}/{usage.capacity} "
        f"{unit} free",
    )


def usage_reported_condition(problem: tuple[str, str] | None) -> ConditionUpdate:
    """`UsageReported`: whether the service's last usage delivery reached every sink.

    `problem` is the reason and message of the last failure, or None after a success.
    Billing is not lost meanwhile: the mark waits, and the same records go out again.
    """
    if problem is None:
        return ConditionUpdate(
            type=USAGE_REPORTED,
            status="True",
            reason="Reported",
            message="usage records reach every sink",
        )
    reason, message = problem
    return ConditionUpdate(
        type=USAGE_REPORTED,
        status="False",
        reason=reason,
        message=f"usage waits to be reported, nothing is lost: {message}",
    )
