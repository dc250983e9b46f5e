"""The meter's pure core: pod lifetimes -> priced, idempotent usage records.

Nothing here reads a clock, a file or the network: `now` and `through` are arguments, so
every rule below is a table-driven unit test. The rules, stated once (docs/metering.md
repeats them for users):

- **Who pays, at what price.** A pod's GPUs are priced by the pool whose nodes hold them
  (`pool_holding`: the pod's node matched against the pools' node selectors) and billed to
  the AIService that controls the pod through its ReplicaSet and Deployment
  (`logic.ownership`), never by the pod's labels. A pod of no AIService is *unmanaged*
  usage of its namespace on that pool: billed all the same.
- **Billed interval.** A pod holds its GPUs from `bound_at` (the `PodScheduled`
  condition's `lastTransitionTime`) until `ended_at` (see `pod_lifetime_from_dict`).
  Both ends are floored to whole seconds, so a pod's billed seconds are
  `floor(ended_at) - floor(bound_at)`: never more than the truth, less by under 1 s.
- **Node loss.** While a pod's node is not Ready, its account's windows from the one
  holding that moment wait (`NodeDown`); past the grace the pod's billing ends at the
  moment the node left Ready, and if the node returns within the grace nothing changes.
- **Windows.** Records are cut per pod per window of `window_seconds`, aligned to
  multiples of `window_seconds` since the Unix epoch (so 60 s windows start on the minute,
  3600 s windows on the hour, UTC). A window is cut only once closed (`end <= through`).
  A window starting before a mark that is off the grid (after the window length changed)
  is clipped to start at the mark, so records never overlap.
- **Ids.** `record_id` = the first 32 hex digits (128 bits) of SHA-256 over the JSON
  array `["gpuyard.io/usage/v1", cluster_id, pod_uid, start, end]` (epoch seconds). The
  same pod and window always give the same id; different pods or windows never collide
  in practice (birthday bound ~2^64 records).
- **Prices.** A pool's price schedule is a list of `PricePoint`s. A window is priced by
  the latest point whose `effective_from` is at or before the window's start: a change
  takes effect from the first window starting at or after it, never mid-record. Windows
  before the first point use the first point. The schedule is kept in the pool's status
  (`observe_price`), so a restart prices every window as before it.
- **Rounding.** `cost = gpu_seconds * per_gpu_hour / 3600`, quantized to 1e-9 with
  ROUND_HALF_EVEN, computed in a 50-digit decimal context. A sum of record costs differs
  from the cost of the summed seconds by at most 0.5e-9 per record.
- **Marks.** A `ServiceMark` says every window of an account (`Account`: a service, or a
  namespace's unmanaged usage of one pool) ending at or before `reported_through` was
  acknowledged by the sink. `plan_tick` cuts only windows after the mark, so after a crash
  the meter re-emits from the mark, with the same ids. A batch holds at most
  `max_records_per_batch` records but always one whole window, so any backlog drains.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal, localcontext
from typing import Any, NamedTuple

from gpuyard.api.formats import (
    InvalidValueError,
    format_decimal,
    format_time,
    parse_decimal,
    parse_time,
    require_utc,
)
from gpuyard.api.names import DEFAULT_RESOURCE_NAME
from gpuyard.logic.claimed_devices import ClaimedDeviceError, HeldDevice
from gpuyard.logic.claimed_devices import nested as _get

DEFAULT_WINDOW_SECONDS = 60
MIN_WINDOW_SECONDS = 1
COST_QUANTUM = Decimal("1e-9")
ID_HEX_DIGITS = 32
UTILIZATION_QUANTUM = Decimal("0.01")
# Prometheus refuses a range query of more than 11,000 points per series.
MAX_UTILIZATION_WINDOWS = 10_000
RECORD_SCHEMA = "gpuyard.io/usage/v1"
#: A pool's status keeps this many price points; older ones price no open window.
MAX_PRICE_POINTS = 100

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_SECOND = timedelta(seconds=1)
_SECONDS_PER_HOUR = 3600
_TERMINAL_PHASES = frozenset({"Succeeded", "Failed"})


class MeteringError(ValueError):
    """Input the meter refuses to bill from, rather than guess."""


# The meter's callers catch MeteringError to skip a pod, a pool or a ledger line (and count
# it) rather than guess, so a malformed time or decimal that the shared readers of
# gpuyard.api.formats refuse (InvalidValueError) is re-raised as one.


def _utc(moment: datetime, name: str = "time") -> datetime:
    try:
        return require_utc(moment, name)
    except InvalidValueError as error:
        raise MeteringError(str(error)) from error


def _time(text: str) -> datetime:
    try:
        return parse_time(text)
    except InvalidValueError as error:
        raise MeteringError(str(error)) from error


def _decimal(text: object, name: str) -> Decimal:
    try:
        return parse_decimal(text, name=name)
    except InvalidValueError as error:
        raise MeteringError(str(error)) from error


# --------------------------------------------------------------------------- time


def epoch_floor(value: datetime) -> int:
    """Whole seconds since the epoch, floored (exact: no float on the way)."""
    return (_utc(value) - _EPOCH) // _ONE_SECOND


def from_epoch(seconds: int) -> datetime:
    return _EPOCH + timedelta(seconds=seconds)


def check_window_seconds(window_seconds: int) -> int:
    if isinstance(window_seconds, bool) or not isinstance(window_seconds, int):
        raise MeteringError(f"window_seconds must be an int, got {window_seconds!r}")
    if window_seconds < MIN_WINDOW_SECONDS:
        raise MeteringError(f"window_seconds must be >= {MIN_WINDOW_SECONDS}")
    return window_seconds


def closed_through(now: datetime, window_seconds: int, settle_seconds: int = 0) -> datetime:
    """The latest window boundary at or before `now - settle_seconds`.

    `settle_seconds` lets the watch cache catch up: a pod bound (or terminated) just
    before a boundary may reach the operator a moment after it, and a window is cut
    exactly once per mark advance.
    """
    check_window_seconds(window_seconds)
    if settle_seconds < 0:
        raise MeteringError("settle_seconds must be >= 0")
    seconds = epoch_floor(now) - settle_seconds
    return from_epoch(seconds - seconds % window_seconds)


# --------------------------------------------------------------------------- prices


@dataclass(frozen=True, slots=True)
class PricePoint:
    """A pool's price per GPU-hour from `effective_from` on."""

    effective_from: datetime
    per_gpu_hour: Decimal

    def __post_init__(self) -> None:
        object.__setattr__(self, "effective_from", _utc(self.effective_from))
        if not self.per_gpu_hour.is_finite() or self.per_gpu_hour < 0:
            raise MeteringError(f"per_gpu_hour must be finite and >= 0: {self.per_gpu_hour}")


def _check_schedule(prices: Sequence[PricePoint]) -> tuple[PricePoint, ...]:
    schedule = tuple(prices)
    if not schedule:
        raise MeteringError("a price schedule needs at least one price point")
    starts = [p.effective_from for p in schedule]
    if any(a >= b for a, b in itertools.pairwise(starts)):
        raise MeteringError("price points must have strictly increasing effective_from")
    return schedule


def window_cost(gpu_seconds: int, per_gpu_hour: Decimal) -> Decimal:
    with localcontext() as ctx:
        ctx.prec = 50
        exact = Decimal(gpu_seconds) * per_gpu_hour / _SECONDS_PER_HOUR
        return exact.quantize(COST_QUANTUM, rounding=ROUND_HALF_EVEN)


@dataclass(frozen=True, slots=True)
class PoolPricing:
    """What the meter needs from a GPUPool: identity, nodes, GPU resource and prices."""

    name: str
    gpu_type: str
    currency: str
    prices: tuple[PricePoint, ...]
    resource_name: str = DEFAULT_RESOURCE_NAME
    #: The pool's nodeSelector as sorted pairs: the nodes whose GPUs it prices.
    node_selector: tuple[tuple[str, str], ...] = ()
    #: A DRA pool's DeviceClass: its pods' GPUs are their claims' devices of this class
    #: (see gpuyard.logic.claimed_devices), whatever their limits say.
    device_class: str | None = None

    def gpus_held(self, pod_spec: Mapping[str, Any], devices: Mapping[str, Sequence[Any]]) -> int:
        """How many of the pool's GPUs a pod holds: its devices of the pool's class on a DRA
        pool (an ExtendedResource pod's limit names the same GPUs: counted once), else its
        request of the pool's resource."""
        if self.device_class is not None:
            return len(devices.get(self.device_class, ()))
        return gpu_request(pod_spec, self.resource_name)

    def __post_init__(self) -> None:
        object.__setattr__(self, "prices", _check_schedule(self.prices))
        if len(self.currency) != 3 or not self.currency.isupper():
            raise MeteringError(f"currency must be an ISO 4217 code: {self.currency!r}")

    def selects(self, node_labels: Mapping[str, str]) -> bool:
        """Whether the pool's node selector selects a node with `node_labels`."""
        return bool(self.node_selector) and all(
            node_labels.get(key) == value for key, value in self.node_selector
        )


def observe_price(
    history: Sequence[PricePoint], price: Decimal, *, created: datetime, now: datetime
) -> tuple[PricePoint, ...]:
    """A pool's price schedule after seeing its spec price at `now`.

    An empty history starts at the pool's creation. A price that differs from the last
    point applies from `now`, the moment the operator first saw it, so that it takes
    effect from the first window starting at or after then. Only the newest
    `MAX_PRICE_POINTS` points are kept: older ones price no window still open.
    """
    if not history:
        return (PricePoint(created, price),)
    schedule = _check_schedule(history)
    if schedule[-1].per_gpu_hour == price:
        return schedule
    kept = tuple(p for p in schedule if p.effective_from < _utc(now))
    return (*kept, PricePoint(now, price))[-MAX_PRICE_POINTS:]


def price_history_to_status(prices: Sequence[PricePoint]) -> list[dict[str, str]]:
    """The `status.billing.priceHistory` list of a GPUPool."""
    return [
        {
            "effectiveFrom": format_time(p.effective_from),
            "perGpuHour": format_decimal(p.per_gpu_hour),
        }
        for p in prices
    ]


def price_history_from_status(entries: Any) -> tuple[PricePoint, ...]:
    """The price points stored in a GPUPool's status; raises MeteringError when broken."""
    if not entries:
        return ()
    if not isinstance(entries, Sequence):
        raise MeteringError(f"status.billing.priceHistory must be a list: {entries!r}")
    points = tuple(
        PricePoint(
            _time(str(_get(entry, "effectiveFrom"))),
            _decimal(_get(entry, "perGpuHour"), "perGpuHour"),
        )
        for entry in entries
    )
    return _check_schedule(points)


def pool_holding(
    node_labels: Mapping[str, str],
    pod_spec: Mapping[str, Any],
    pools: Iterable[PoolPricing],
    *,
    preferred: str | None = None,
    devices: Mapping[str, Sequence[HeldDevice]] | None = None,
) -> tuple[PoolPricing, int] | None:
    """The pool whose nodes hold the pod's GPUs, with the number of GPUs it holds; None
    when no pool selects the pod's node, or none of those pools' resource is requested.
    `devices` are the pod's allocated DRA devices by DeviceClass (see `PoolPricing.gpus_held`).

    Pools may overlap (two selectors matching one node). The pod's own AIService's pool
    wins among the matches (`preferred`; a tenant can only choose among pools that really
    hold the node), then the most specific selector, then the first name: a fixed rule,
    so that the same pod is priced the same way on every tick and after every restart.
    """

    def rank(pool: PoolPricing) -> tuple[bool, int, str]:
        return pool.name != preferred, -len(pool.node_selector), pool.name

    holding = [
        (pool, gpus)
        for pool in pools
        if pool.selects(node_labels) and (gpus := pool.gpus_held(pod_spec, devices or {})) >= 1
    ]
    return min(holding, key=lambda match: rank(match[0]), default=None)


# --------------------------------------------------------------------------- lifetimes


@dataclass(frozen=True, slots=True)
class NodeDown:
    """A pod's node has not been Ready since `since`; `lost` once the grace has passed."""

    since: datetime
    lost: bool

    def __post_init__(self) -> None:
        object.__setattr__(self, "since", _utc(self.since, "since"))


def node_down(
    ready: bool, not_ready_since: datetime | None, now: datetime, grace_seconds: int
) -> NodeDown | None:
    """What a node's readiness means for billing the pods on it.

    A node whose Ready condition is not True since T holds its pods' billing from T on: the
    node may come back (a network blip, a kubelet restart), and then every second counts,
    or stay gone, and then billing ends at T. `grace_seconds` decides which (300 s, like
    the default toleration of an unreachable node). A node without a transition time (it
    never reported) is taken as down since `now`.
    """
    if ready:
        return None
    since = _utc(not_ready_since) if not_ready_since is not None else _utc(now)
    return NodeDown(since=since, lost=(_utc(now) - since).total_seconds() >= grace_seconds)


class Account(NamedTuple):
    """Whose usage a record is: an AIService (`service` set), or the GPUs a namespace holds
    on one pool outside any AIService (unmanaged usage: `service` empty, `pool` set). Each
    account has one mark; an unmanaged one lives in its pool's status."""

    namespace: str
    service: str = ""
    pool: str = ""

    @property
    def unmanaged(self) -> bool:
        return not self.service

    def __str__(self) -> str:
        if self.service:
            return f"{self.namespace}/{self.service}"
        return f"{self.namespace} (unmanaged, pool {self.pool})"


def account_of(namespace: str, service: str | None, pool: str) -> Account:
    """The account a pod of `service` (None: of no AIService) on `pool` bills to."""
    return Account(namespace, service) if service else Account(namespace, "", pool)


@dataclass(frozen=True, slots=True)
class PodLifetime:
    """The billable life of one GPU pod."""

    cluster_id: str
    pod_uid: str
    pod_name: str
    namespace: str
    #: The AIService that controls the pod; empty for unmanaged usage.
    service: str
    pool: str
    gpu_type: str
    gpus: int
    bound_at: datetime
    ended_at: datetime | None
    prices: tuple[PricePoint, ...]
    currency: str
    #: The pod's node is down since then: its account's windows from here on wait.
    held_from: datetime | None = None
    #: When the pod's start ended (it first turned Ready); None while it is still starting.
    #: The GPU-seconds held before are its cold start's (`starting_gpu_seconds`).
    ready_at: datetime | None = None
    #: The DRA devices the pod holds on a DRA pool (their number is `gpus`); empty on a
    #: device-plugin pool, whose GPUs have no identity in the API.
    devices: tuple[HeldDevice, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "bound_at", _utc(self.bound_at, "bound_at"))
        if self.ready_at is not None:
            object.__setattr__(self, "ready_at", max(_utc(self.ready_at), self.bound_at))
        if self.ended_at is not None:
            ended = _utc(self.ended_at, "ended_at")
            # Clocks differ (kubelet's finishedAt vs the scheduler's bind time): a pod
            # never ends before it was bound.
            object.__setattr__(self, "ended_at", max(ended, self.bound_at))
        if self.held_from is not None:
            object.__setattr__(self, "held_from", _utc(self.held_from, "held_from"))
        object.__setattr__(self, "prices", _check_schedule(self.prices))
        if self.gpus < 1:
            raise MeteringError(f"gpus must be >= 1, got {self.gpus}")

    @property
    def account(self) -> Account:
        return account_of(self.namespace, self.service, self.pool)

    def billed_seconds(self, through: datetime) -> int:
        """Floor-based seconds held up to `through` (the ground truth records must sum to)."""
        end = epoch_floor(through)
        if self.ended_at is not None:
            end = min(end, epoch_floor(self.ended_at))
        return max(0, end - epoch_floor(self.bound_at))


def _optional_time(value: Any) -> datetime | None:
    return _time(value) if isinstance(value, str) and value else None


def _bound_at(pod: Mapping[str, Any]) -> datetime | None:
    for condition in _get(pod, "status", "conditions") or ():
        if _get(condition, "type") == "PodScheduled":
            if _get(condition, "status") != "True":
                return None
            return _optional_time(_get(condition, "lastTransitionTime"))
    # A pod created with spec.nodeName skips the scheduler; the kubelet's startTime is
    # then the first moment the node holds it.
    if _get(pod, "spec", "nodeName"):
        return _optional_time(_get(pod, "status", "startTime"))
    return None


def ready_at(pod: Mapping[str, Any]) -> datetime | None:
    """When the pod last turned Ready, while its Ready condition is True (else None)."""
    for condition in _get(pod, "status", "conditions") or ():
        if _get(condition, "type") == "Ready":
            if _get(condition, "status") != "True":
                return None
            return _optional_time(_get(condition, "lastTransitionTime"))
    return None


def _quantity_count(value: Any) -> int:
    if value is None:
        return 0
    amount = _decimal(value if isinstance(value, (str, int)) else str(value), "gpu request")
    if amount != amount.to_integral_value() or amount < 0:
        raise MeteringError(f"an extended resource request must be a whole number: {value!r}")
    return int(amount)


def _container_gpus(container: Any, resource_name: str) -> int:
    # Extended resources cannot be overcommitted: requests equal limits, and a missing
    # request defaults to the limit.
    requests = _get(container, "resources", "requests") or {}
    limits = _get(container, "resources", "limits") or {}
    return _quantity_count(requests.get(resource_name, limits.get(resource_name)))


def gpu_request(pod_spec: Mapping[str, Any], resource_name: str) -> int:
    """The pod's effective request of `resource_name`, as the scheduler computes it.

    max(sum of app containers + restartable init containers (sidecars),
        each plain init container + the sidecars started before it).
    """
    sidecars = 0
    init_peak = 0
    for init in pod_spec.get("initContainers") or ():
        gpus = _container_gpus(init, resource_name)
        if _get(init, "restartPolicy") == "Always":
            sidecars += gpus
        else:
            init_peak = max(init_peak, sidecars + gpus)
    apps = sum(_container_gpus(c, resource_name) for c in pod_spec.get("containers") or ())
    return max(apps + sidecars, init_peak)


def _terminated_finish_times(status: Mapping[str, Any]) -> list[datetime]:
    times: list[datetime] = []
    for key in ("containerStatuses", "initContainerStatuses"):
        for container in status.get(key) or ():
            finished = _optional_time(_get(container, "state", "terminated", "finishedAt"))
            if finished is not None:
                times.append(finished)
    return times


def _ended_at(pod: Mapping[str, Any], gone_at: datetime | None) -> datetime | None:
    status = _get(pod, "status") or {}
    containers = status.get("containerStatuses") or ()
    all_terminated = bool(containers) and all(
        _get(c, "state", "terminated") is not None for c in containers
    )
    deletion = _optional_time(_get(pod, "metadata", "deletionTimestamp"))
    if status.get("phase") in _TERMINAL_PHASES or all_terminated:
        finished = _terminated_finish_times(status)
        if finished:
            return max(finished)
        # Terminal without container times (evicted before start, node lost): the last
        # condition change is when the kubelet or the node controller gave up on it.
        transitions = [
            t
            for c in status.get("conditions") or ()
            if (t := _optional_time(_get(c, "lastTransitionTime"))) is not None
        ]
        fallback = [t for t in (max(transitions, default=None), deletion, gone_at) if t]
        return fallback[0] if fallback else None
    if gone_at is not None:
        # Deleted without final container statuses (force delete, lost node). For pods
        # deletionTimestamp is the grace deadline, after which the kubelet kills it.
        return min(deletion, _utc(gone_at)) if deletion else _utc(gone_at)
    return None


def pod_lifetime_from_dict(
    pod: Mapping[str, Any],
    pool: PoolPricing,
    *,
    service: str | None,
    cluster_id: str,
    gone_at: datetime | None = None,
    node: NodeDown | None = None,
    first_ready_at: datetime | None = None,
    devices: Sequence[HeldDevice] = (),
) -> PodLifetime | None:
    """The billable lifetime of a Pod (Kubernetes JSON) whose GPUs `pool` holds (see
    `pool_holding`), billed to `service` (None: unmanaged usage of its namespace); None
    when it is not bound yet or requests none of the pool's resource.

    Its start ends at `first_ready_at` (when the caller saw it turn Ready before), else
    when its Ready condition turned True (`ready_at`); a pod not ready is still starting.
    A pod that is ready again after a spell of unreadiness the caller did not see counts
    as starting until its last turn to Ready.

    `ended_at`, precisely:
    1. phase Succeeded/Failed, or every app container's current state is `terminated`:
       the latest `finishedAt` over app and init containers; without any, the latest
       condition `lastTransitionTime`, else `deletionTimestamp`, else `gone_at`.
    2. otherwise, if the caller saw the object disappear (`gone_at`, e.g. the DELETED
       watch event's time): min(`deletionTimestamp`, `gone_at`).
    3. otherwise None: still holding GPUs, including while Terminating (a pod being
       deleted keeps its GPUs until its containers stop).
    A `node` lost past its grace ends the pod at the moment the node left Ready, unless
    it ended earlier; a node down within the grace holds the pod's windows from then on.
    On a DRA pool the pod's GPUs are `devices` (its claims' devices of the pool's class),
    and a pod with none is not billed yet (its claim is not seen allocated).
    """
    bound_at = _bound_at(pod)
    if bound_at is None:
        return None
    held = tuple(sorted(devices)) if pool.device_class is not None else ()
    gpus = (
        len(held)
        if pool.device_class is not None
        else gpu_request(_get(pod, "spec") or {}, pool.resource_name)
    )
    if gpus < 1:
        return None
    uid = _get(pod, "metadata", "uid")
    if not uid:
        raise MeteringError("a bound pod without metadata.uid cannot get stable record ids")
    ended_at = _ended_at(pod, gone_at)
    held_from = None
    if node is not None and node.lost:
        ended_at = node.since if ended_at is None else min(_utc(ended_at), node.since)
    elif node is not None and ended_at is None:
        held_from = node.since
    return PodLifetime(
        cluster_id=cluster_id,
        pod_uid=str(uid),
        pod_name=str(_get(pod, "metadata", "name") or ""),
        namespace=str(_get(pod, "metadata", "namespace") or ""),
        service=service or "",
        pool=pool.name,
        gpu_type=pool.gpu_type,
        gpus=gpus,
        bound_at=bound_at,
        ended_at=ended_at,
        prices=pool.prices,
        currency=pool.currency,
        held_from=held_from,
        ready_at=first_ready_at or ready_at(pod),
        devices=held,
    )


# --------------------------------------------------------------------------- records


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """GPU usage of one pod in one window: the unit a billing system ingests."""

    id: str
    cluster_id: str
    namespace: str
    #: The AIService billed; empty for unmanaged usage (a pod of no AIService).
    service: str
    pool: str
    gpu_type: str
    pod: str
    pod_uid: str
    gpus: int
    start: datetime
    end: datetime
    seconds: int
    gpu_seconds: int
    unit_price: Decimal
    cost: Decimal
    currency: str
    avg_utilization: Decimal | None = None
    idle_gpu_seconds: int | None = None
    #: The part of `gpu_seconds` held while the pod was starting (bound, not ready yet):
    #: what its cold start cost. Information, like utilisation: not a billed quantity.
    starting_gpu_seconds: int = 0
    #: The DRA devices behind `gpus` (driver, pool, device, UUID), sorted; empty for GPUs of
    #: a device plugin. Identity, not a billed quantity: `gpus` is what is billed.
    devices: tuple[HeldDevice, ...] = ()

    @property
    def account(self) -> Account:
        return account_of(self.namespace, self.service, self.pool)

    @property
    def unmanaged(self) -> bool:
        return not self.service

    def billing_fields(self) -> tuple[object, ...]:
        """What must be identical for two records with one id (utilisation may differ)."""
        return (
            self.id, self.namespace, self.service, self.pool, self.pod_uid, self.gpus,
            self.start, self.end, self.gpu_seconds, self.unit_price, self.cost, self.currency,
        )  # fmt: skip


def record_id(cluster_id: str, pod_uid: str, start: int, end: int) -> str:
    """Deterministic record id; a JSON array keeps the fields unambiguous."""
    material = json.dumps([RECORD_SCHEMA, cluster_id, pod_uid, start, end])
    return hashlib.sha256(material.encode()).hexdigest()[:ID_HEX_DIGITS]


def cut_records(
    lifetime: PodLifetime,
    from_mark: datetime | None,
    through: datetime,
    window_seconds: int = DEFAULT_WINDOW_SECONDS,
) -> list[UsageRecord]:
    """Records of `lifetime` for the closed windows after `from_mark` up to `through`.

    A window is closed when its end <= `through`. `from_mark` None means "from the
    pod's binding". Windows without a held second produce no record.
    """
    width = check_window_seconds(window_seconds)
    limit = epoch_floor(through)
    mark = None if from_mark is None else epoch_floor(from_mark)
    active_from = epoch_floor(lifetime.bound_at)
    active_to = limit if lifetime.ended_at is None else min(epoch_floor(lifetime.ended_at), limit)
    lo = active_from if mark is None else max(active_from, mark)
    if active_to <= lo:
        return []
    starts = [p.effective_from for p in lifetime.prices]
    # Held seconds before `ready` are the pod's start; a pod not ready yet is starting still.
    ready = active_to if lifetime.ready_at is None else epoch_floor(lifetime.ready_at)
    records: list[UsageRecord] = []
    grid = lo - lo % width
    while grid < active_to and grid + width <= limit:
        start = grid if mark is None else max(grid, mark)
        end = grid + width
        held_from, held_to = max(start, lo), min(end, active_to)
        seconds = held_to - held_from
        if seconds > 0:
            point = lifetime.prices[max(bisect.bisect_right(starts, from_epoch(start)) - 1, 0)]
            starting = max(0, min(held_to, ready) - held_from)
            records.append(
                _record(lifetime, start, end, seconds, point.per_gpu_hour, starting=starting)
            )
        grid = end
    return records


def _record(
    lifetime: PodLifetime, start: int, end: int, seconds: int, price: Decimal, *, starting: int = 0
) -> UsageRecord:
    gpu_seconds = seconds * lifetime.gpus
    return UsageRecord(
        id=record_id(lifetime.cluster_id, lifetime.pod_uid, start, end),
        cluster_id=lifetime.cluster_id,
        namespace=lifetime.namespace,
        service=lifetime.service,
        pool=lifetime.pool,
        gpu_type=lifetime.gpu_type,
        pod=lifetime.pod_name,
        pod_uid=lifetime.pod_uid,
        gpus=lifetime.gpus,
        start=from_epoch(start),
        end=from_epoch(end),
        seconds=seconds,
        gpu_seconds=gpu_seconds,
        unit_price=price,
        cost=window_cost(gpu_seconds, price),
        currency=lifetime.currency,
        starting_gpu_seconds=starting * lifetime.gpus,
        devices=lifetime.devices,
    )


def with_utilization(record: UsageRecord, avg_percent: Decimal) -> UsageRecord:
    """The record with the window's average GPU utilisation (0..100, clamped) and the
    idle GPU-seconds it implies, rounded half-even to whole seconds. The id is unchanged:
    utilisation is information, not a billed quantity.
    """
    if not avg_percent.is_finite():
        raise MeteringError(f"utilisation must be finite: {avg_percent}")
    percent = min(max(avg_percent, Decimal(0)), Decimal(100))
    with localcontext() as ctx:
        ctx.prec = 50
        busy = (Decimal(record.gpu_seconds) * percent / 100).to_integral_value(ROUND_HALF_EVEN)
    return replace(record, avg_utilization=percent, idle_gpu_seconds=record.gpu_seconds - int(busy))


def utilization_span(records: Iterable[UsageRecord], window_seconds: int) -> tuple[int, int] | None:
    """The first and last window end (epoch seconds) to measure utilisation at: one range
    query with step `window_seconds` evaluates exactly at every record's end, since ends
    lie on the window grid. One query holds at most the newest `MAX_UTILIZATION_WINDOWS`
    windows; records older than that (a long catch-up) stay unmeasured.
    """
    ends = [epoch_floor(record.end) for record in records]
    if not ends:
        return None
    last = max(ends)
    oldest = last - (MAX_UTILIZATION_WINDOWS - 1) * check_window_seconds(window_seconds)
    return max(min(ends), oldest), last


def device_mean(
    readings: Mapping[str, Mapping[int, float]], uuids: Sequence[str], at: int
) -> float | None:
    """The mean utilisation at `at` of the GPUs `uuids` (a pod's devices), or None unless
    every one of them has a reading: a mean of some would pass one GPU's load off as all's."""
    values = [readings.get(uuid, {}).get(at) for uuid in uuids]
    if not values or any(value is None for value in values):
        return None
    return sum(value for value in values if value is not None) / len(values)


def measured(record: UsageRecord, percent: float | None) -> UsageRecord:
    """`record` with the utilisation Prometheus reported for its window, quantized to 0.01;
    no reading, NaN or an infinity leaves it unmeasured rather than guessed."""
    if percent is None or not math.isfinite(percent):
        return record
    clamped = Decimal(min(max(percent, 0.0), 100.0))
    return with_utilization(record, clamped.quantize(UTILIZATION_QUANTUM, ROUND_HALF_EVEN))


# --------------------------------------------------------------------------- JSON


def record_to_json(record: UsageRecord) -> dict[str, Any]:
    """Plain JSON: decimals as fixed-point strings, times RFC 3339 UTC with `Z`."""
    data: dict[str, Any] = {
        "schema": RECORD_SCHEMA,
        "id": record.id,
        "cluster_id": record.cluster_id,
        "namespace": record.namespace,
        "service": record.service,
        "unmanaged": record.unmanaged,
        "pool": record.pool,
        "gpu_type": record.gpu_type,
        "pod": record.pod,
        "pod_uid": record.pod_uid,
        "gpus": record.gpus,
        "start": format_time(record.start),
        "end": format_time(record.end),
        "seconds": record.seconds,
        "gpu_seconds": record.gpu_seconds,
        "unit_price": format_decimal(record.unit_price),
        "cost": format_decimal(record.cost),
        "currency": record.currency,
    }
    if record.avg_utilization is not None:
        data["avg_utilization"] = format_decimal(record.avg_utilization)
    if record.idle_gpu_seconds is not None:
        data["idle_gpu_seconds"] = record.idle_gpu_seconds
    if record.starting_gpu_seconds:
        data["starting_gpu_seconds"] = record.starting_gpu_seconds
    if record.devices:
        data["devices"] = [device.to_json() for device in record.devices]
    return data


def _field(data: Mapping[str, Any], name: str, kind: type) -> Any:
    value = data.get(name)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise MeteringError(f"record field {name!r} must be {kind.__name__}, got {value!r}")
    return value


def record_from_json(data: Mapping[str, Any]) -> UsageRecord:
    if data.get("schema") != RECORD_SCHEMA:
        raise MeteringError(f"unknown record schema {data.get('schema')!r}")
    util = data.get("avg_utilization")
    idle = data.get("idle_gpu_seconds")
    starting = data.get("starting_gpu_seconds", 0)
    unmanaged = data.get("unmanaged", not data.get("service"))
    if unmanaged is not (not data.get("service")):
        raise MeteringError("a record is unmanaged exactly when it names no service")
    # Records written before devices were recorded have none: GPUs of a device plugin.
    listed = data.get("devices", [])
    if not isinstance(listed, list):
        raise MeteringError(f"record field 'devices' must be a list, got {listed!r}")
    try:
        devices = tuple(sorted(HeldDevice.from_json(item) for item in listed))
    except ClaimedDeviceError as error:
        raise MeteringError(str(error)) from error
    return UsageRecord(
        id=_field(data, "id", str),
        cluster_id=_field(data, "cluster_id", str),
        namespace=_field(data, "namespace", str),
        service=_field(data, "service", str),
        pool=_field(data, "pool", str),
        gpu_type=_field(data, "gpu_type", str),
        pod=_field(data, "pod", str),
        pod_uid=_field(data, "pod_uid", str),
        gpus=_field(data, "gpus", int),
        start=_time(_field(data, "start", str)),
        end=_time(_field(data, "end", str)),
        seconds=_field(data, "seconds", int),
        gpu_seconds=_field(data, "gpu_seconds", int),
        unit_price=_decimal(_field(data, "unit_price", str), "unit_price"),
        cost=_decimal(_field(data, "cost", str), "cost"),
        currency=_field(data, "currency", str),
        avg_utilization=None if util is None else _decimal(util, "avg_utilization"),
        idle_gpu_seconds=None if idle is None else _field(data, "idle_gpu_seconds", int),
        starting_gpu_seconds=starting and _field(data, "starting_gpu_seconds", int),
        devices=devices,
    )


def record_to_line(record: UsageRecord) -> str:
    """One JSON line (sorted keys, no spaces, no newline)."""
    return json.dumps(record_to_json(record), sort_keys=True, separators=(",", ":"))


def record_from_line(line: str) -> UsageRecord:
    try:
        data = json.loads(line)
    except json.JSONDecodeError as exc:
        raise MeteringError(f"not a JSON record: {exc}") from exc
    if not isinstance(data, dict):
        raise MeteringError("a record line must hold a JSON object")
    return record_from_json(data)


# --------------------------------------------------------------------------- marks


@dataclass(frozen=True, slots=True)
class ServiceMark:
    """An account's high-water mark: windows ending <= `reported_through` are
    acknowledged, and the totals are the sum of exactly those records.

    `costs` holds a total per currency: a service that moves to a pool of another currency
    keeps what it cost in the first one. `currency` is that of the latest billed record.
    """

    reported_through: datetime
    gpu_seconds: int = 0
    costs: Mapping[str, Decimal] = field(default_factory=dict)
    currency: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "reported_through", _utc(self.reported_through))
        object.__setattr__(self, "costs", dict(sorted(self.costs.items())))

    @property
    def cost(self) -> Decimal:
        """The total in `currency`."""
        return self.costs.get(self.currency, Decimal(0)) if self.currency else Decimal(0)


def advance_mark(
    mark: ServiceMark | None, acknowledged: Iterable[UsageRecord], through: datetime
) -> ServiceMark:
    """The mark after the sink acknowledged `acknowledged`, all windows up to `through`.

    Records are deduplicated by id. Refuses (MeteringError) records of several accounts,
    records outside (mark, through] and a mark moving backwards: each would make the
    totals disagree with the ledger.
    """
    through = _utc(through, "through")
    if mark is not None and through < mark.reported_through:
        raise MeteringError("a mark never moves backwards")
    records = sorted({r.id: r for r in acknowledged}.values(), key=lambda r: (r.end, r.id))
    if len({r.account for r in records}) > 1:
        raise MeteringError("a mark belongs to one account; got records of several")
    currency = mark.currency if mark is not None else None
    gpu_seconds = mark.gpu_seconds if mark is not None else 0
    costs = dict(mark.costs) if mark is not None else {}
    for record in records:
        if record.end > through or (mark is not None and record.start < mark.reported_through):
            raise MeteringError(f"record {record.id} lies outside the window being acknowledged")
        currency = record.currency
        gpu_seconds += record.gpu_seconds
        costs[currency] = costs.get(currency, Decimal(0)) + record.cost
    return ServiceMark(
        reported_through=through, gpu_seconds=gpu_seconds, costs=costs, currency=currency
    )


def mark_to_status(mark: ServiceMark) -> dict[str, Any]:
    """The usage block of a mark: an AIService's `status.usage` (docs/api.md), and the
    same fields in a GPUPool's `status.billing.unmanagedUsage`."""
    usage: dict[str, Any] = {
        "gpuSeconds": mark.gpu_seconds,
        "cost": format_decimal(mark.cost),
        "reportedThrough": format_time(mark.reported_through),
    }
    if mark.currency is not None:
        usage["currency"] = mark.currency
    if len(mark.costs) > 1:
        usage["costByCurrency"] = {code: format_decimal(cost) for code, cost in mark.costs.items()}
    return usage


def mark_from_status(usage: Mapping[str, Any] | None) -> ServiceMark | None:
    """The mark stored in a usage block, or None when the account was never metered."""
    if not usage or not usage.get("reportedThrough"):
        return None
    gpu_seconds = usage.get("gpuSeconds", 0)
    if isinstance(gpu_seconds, bool) or not isinstance(gpu_seconds, int):
        raise MeteringError(f"usage.gpuSeconds must be an int: {gpu_seconds!r}")
    currency = usage.get("currency") or None
    stored = usage.get("costByCurrency")
    if isinstance(stored, Mapping) and stored:
        costs = {str(code): _decimal(cost, "usage.costByCurrency") for code, cost in stored.items()}
    elif currency is not None:
        costs = {currency: _decimal(usage.get("cost", "0"), "usage.cost")}
    else:
        costs = {}
    return ServiceMark(
        reported_through=_time(str(usage["reportedThrough"])),
        gpu_seconds=gpu_seconds,
        costs=costs,
        currency=currency,
    )


def is_fully_reported(lifetime: PodLifetime, mark: ServiceMark | None) -> bool:
    """True once every second of an ended pod is behind its account's mark: the meter
    may forget the pod (and remove its metering finalizer)."""
    if lifetime.ended_at is None or mark is None:
        return False
    return epoch_floor(lifetime.ended_at) <= epoch_floor(mark.reported_through)


# --------------------------------------------------------------------------- ticks


@dataclass(frozen=True, slots=True)
class MeterConfig:
    window_seconds: int = DEFAULT_WINDOW_SECONDS
    # How long after a window closes the meter waits before cutting it (watch lag).
    settle_seconds: int = 5
    # Caps one account's catch-up per tick in windows (bounds the utilisation query) ...
    max_windows_per_tick: int = 60
    # ... and in records (bounds one delivery); one whole window always goes, however
    # many pods it has, so no backlog is too large to drain.
    max_records_per_batch: int = 10_000

    def __post_init__(self) -> None:
        check_window_seconds(self.window_seconds)
        if self.settle_seconds < 0 or self.max_windows_per_tick < 1:
            raise MeteringError("settle_seconds must be >= 0 and max_windows_per_tick >= 1")
        if self.max_records_per_batch < 1:
            raise MeteringError("max_records_per_batch must be >= 1")


@dataclass(frozen=True, slots=True)
class ServiceBatch:
    """What to emit for one account this tick; after the sink acknowledges `records`,
    the new mark is `advance_mark(old_mark, records, through)`."""

    key: Account
    records: tuple[UsageRecord, ...]
    through: datetime


def plan_tick(
    lifetimes: Iterable[PodLifetime],
    marks: Mapping[Account, ServiceMark],
    now: datetime,
    config: MeterConfig | None = None,
) -> list[ServiceBatch]:
    """Which windows to emit this tick, per account, given the marks.

    Each account's windows run from its mark (or, with no mark, from its earliest bound
    pod) to the last closed window, capped at `max_windows_per_tick` windows and then at
    `max_records_per_batch` records (never less than one window), and held at the window
    of a pod whose node is down (`PodLifetime.held_from`). An account with a mark and no
    pods still gets an empty batch so its `reported_through` moves. Re-running with the
    same marks (after a crash) yields the same records and ids.
    """
    config = config or MeterConfig()
    width = config.window_seconds
    through = closed_through(now, width, config.settle_seconds)
    by_account: dict[Account, list[PodLifetime]] = {key: [] for key in marks}
    for lifetime in lifetimes:
        by_account.setdefault(lifetime.account, []).append(lifetime)
    batches: list[ServiceBatch] = []
    for key in sorted(by_account):
        pods = by_account[key]
        mark = marks.get(key)
        if mark is not None:
            start = epoch_floor(mark.reported_through)
        elif pods:
            start = min(epoch_floor(p.bound_at) for p in pods)
        else:
            continue
        # A window holds at most one record per pod: so many windows fit in one batch.
        fitting = max(1, config.max_records_per_batch // max(1, len(pods)))
        windows = min(config.max_windows_per_tick, fitting)
        limit = min(epoch_floor(through), start - start % width + width * windows)
        for held in (p.held_from for p in pods if p.held_from is not None):
            held_second = epoch_floor(held)
            limit = min(limit, held_second - held_second % width)
        if mark is not None and limit <= start:
            continue
        from_mark = mark.reported_through if mark is not None else None
        service_through = from_epoch(limit)
        records = [r for p in pods for r in cut_records(p, from_mark, service_through, width)]
        records.sort(key=lambda r: (r.start, r.pod_uid))
        batches.append(ServiceBatch(key, tuple(records), service_through))
    return batches
