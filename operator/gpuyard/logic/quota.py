"""How many replicas a namespace's quota on a pool lets each of its services run.

A pool's ``maxGpusPerNamespace`` caps the GPUs that all of a namespace's pods hold on the
pool, at every replica change, not only at admission: whoever picks the count (the
autoscaler, ``kubectl scale`` in mode Off, a tenant scaling the Deployment by hand), the
service reconcile applies no more than :func:`quota_verdict` allows.

Two rules make the cap hold and share it:

- **Fair.** The quota, less what the namespace's other pods (not of an AIService) hold, is
  shared max-min on GPUs among the namespace's services of the pool, up to what each
  wants, in whole replicas: the next replica goes to the service holding the fewest GPUs.
  A service that wants less leaves the rest to the others.
- **Never over, even on the way.** A service grows only into what its siblings do not hold
  now: its share is also capped by the quota less their current GPUs. A sibling above its
  fair share is scaled down by its own reconcile; only then can this one grow into it. So
  the sum never exceeds the quota at any step, only the order of the steps matters.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True, kw_only=True)
class QuotaClaim:
    """One of the namespace's services on the pool, as its reconcile sees it."""

    key: str
    gpus_per_replica: int
    #: The replicas it would run without the quota (spec, autoscaler, bounds applied).
    wanted_replicas: int
    #: The GPUs it holds or has asked for now: the larger of its Deployment's replicas and
    #: its pods, so a pod still being created or still terminating counts.
    held_gpus: int

    def __post_init__(self) -> None:
        if self.gpus_per_replica < 1 or min(self.wanted_replicas, self.held_gpus) < 0:
            raise ValueError(f"{self.key}: gpusPerReplica >= 1 and counts >= 0 required")


@dataclass(frozen=True, kw_only=True)
class QuotaVerdict:
    """What the quota lets one service run."""

    #: The most replicas it may run now; None without a quota.
    max_replicas: int | None
    #: Whether the quota cuts what it wants.
    limited: bool
    #: The GPUs it lacks for what it wants (0 when not limited).
    missing_gpus: int
    #: Its fair share in replicas, which it reaches once its siblings are at theirs.
    fair_replicas: int | None
    #: Whether it is held below its fair share (and what it wants) by GPUs its siblings
    #: hold above theirs: their reconciles must scale them down first.
    waits_for_siblings: bool = False


NO_QUOTA = QuotaVerdict(max_replicas=None, limited=False, missing_gpus=0, fair_replicas=None)


@dataclass(order=True, kw_only=True)
class _Share:
    held_gpus: int
    gpus_per_replica: int
    key: str
    replicas: int = field(compare=False)
    wanted: int = field(compare=False)


def fair_quota_shares(quota_gpus: int, claims: Sequence[QuotaClaim]) -> dict[str, int]:
    """Each service's fair share of ``quota_gpus``, in replicas, never above what it wants.

    Water-filling from zero: the next replica goes to the service holding the fewest GPUs
    of the shares so far, ties to the smaller replica and then to the key, so the result
    does not depend on the order of ``claims``. A service whose next replica no longer fits
    drops out, and smaller replicas take the rest.
    """
    keys = [claim.key for claim in claims]
    if len(set(keys)) != len(keys):
        raise ValueError("duplicate service key")
    left = max(0, quota_gpus)
    shares = dict.fromkeys(keys, 0)
    heap = [
        _Share(
            held_gpus=0,
            gpus_per_replica=c.gpus_per_replica,
            key=c.key,
            replicas=0,
            wanted=c.wanted_replicas,
        )
        for c in claims
        if c.wanted_replicas > 0
    ]
    heapq.heapify(heap)
    while heap and left > 0:
        share = heapq.heappop(heap)
        if share.gpus_per_replica > left:
            continue
        left -= share.gpus_per_replica
        share.replicas += 1
        share.held_gpus += share.gpus_per_replica
        shares[share.key] = share.replicas
        if share.replicas < share.wanted:
            heapq.heappush(heap, share)
    return shares


def quota_verdict(
    quota: int | None, *, key: str, claims: Sequence[QuotaClaim], unmanaged_gpus: int
) -> QuotaVerdict:
    """What the quota lets the service ``key`` (one of ``claims``) run now.

    ``claims`` are all of the namespace's services on the pool, ``unmanaged_gpus`` the
    GPUs its other pods hold there (a Deployment of the tenant's own, say): those come off
    the quota first, since gpuyard cannot scale them.
    """
    if quota is None:
        return NO_QUOTA
    claim = next(c for c in claims if c.key == key)
    shareable = quota - unmanaged_gpus
    fair = fair_quota_shares(shareable, claims)[key]
    siblings_hold = sum(c.held_gpus for c in claims if c.key != key)
    free_now = max(0, shareable - siblings_hold) // claim.gpus_per_replica
    allowed = min(fair, free_now)
    wanted = claim.wanted_replicas
    limited = allowed < wanted
    return QuotaVerdict(
        max_replicas=allowed,
        limited=limited,
        missing_gpus=(wanted - allowed) * claim.gpus_per_replica if limited else 0,
        fair_replicas=fair,
        waits_for_siblings=allowed < min(wanted, fair),
    )
