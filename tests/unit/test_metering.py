"""The pure meter: windows, rounding, prices, ids, marks and pod parsing."""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpuyard.logic.metering import (
    MAX_PRICE_POINTS,
    MAX_UTILIZATION_WINDOWS,
    Account,
    MeterConfig,
    MeteringError,
    NodeDown,
    PodLifetime,
    PoolPricing,
    PricePoint,
    ServiceMark,
    UsageRecord,
    advance_mark,
    closed_through,
    cut_records,
    epoch_floor,
    from_epoch,
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
    record_from_json,
    record_from_line,
    record_id,
    record_to_json,
    record_to_line,
    utilization_span,
    window_cost,
    with_utilization,
)

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
EPOCH_2020 = datetime(2020, 1, 1, tzinfo=UTC)


def at(seconds: float) -> datetime:
    """T0 plus `seconds` (fractions allowed: pods do not start on whole seconds)."""
    return T0 + timedelta(seconds=seconds)


def lifetime(
    bound: float = 0,
    ended: float | None = None,
    *,
    gpus: int = 1,
    uid: str = "uid-a",
    service: str = "llm",
    prices: tuple[PricePoint, ...] = (PricePoint(EPOCH_2020, Decimal("2.50")),),
) -> PodLifetime:
    return PodLifetime(
        cluster_id="c1",
        pod_uid=uid,
        pod_name=f"pod-{uid}",
        namespace="team-a",
        service=service,
        pool="a100",
        gpu_type="a100-80gb",
        gpus=gpus,
        bound_at=at(bound),
        ended_at=None if ended is None else at(ended),
        prices=prices,
        currency="USD",
    )


def usd_mark(through: datetime, gpu_seconds: int = 0, cost: str = "0") -> ServiceMark:
    return ServiceMark(
        reported_through=through,
        gpu_seconds=gpu_seconds,
        costs={"USD": Decimal(cost)},
        currency="USD",
    )


def windows(records: list[UsageRecord]) -> list[tuple[float, float, int]]:
    return [
        ((r.start - T0).total_seconds(), (r.end - T0).total_seconds(), r.seconds) for r in records
    ]


# --------------------------------------------------------------------------- windows


def test_windows_align_to_wall_clock_and_only_closed_ones_are_cut() -> None:
    pod = lifetime(bound=0)
    assert windows(cut_records(pod, None, at(180))) == [(0, 60, 60), (60, 120, 60), (120, 180, 60)]
    # 12:02:59 closes nothing beyond 12:02:00.
    assert windows(cut_records(pod, None, at(179))) == [(0, 60, 60), (60, 120, 60)]


def test_pod_starting_and_ending_inside_one_window_gets_one_record_after_it_closes() -> None:
    pod = lifetime(bound=10.9, ended=40.2)
    assert cut_records(pod, None, at(59)) == []
    (record,) = cut_records(pod, None, at(60))
    assert windows([record]) == [(0, 60, 30)]  # floor(40.2) - floor(10.9)


def test_pod_spanning_many_windows_sums_to_its_floored_lifetime() -> None:
    pod = lifetime(bound=30.7, ended=7210.2)
    records = cut_records(pod, None, at(7260))
    assert len(records) == 121
    assert (records[0].seconds, records[-1].seconds) == (30, 10)
    assert all(r.seconds == 60 for r in records[1:-1])
    assert sum(r.seconds for r in records) == 7210 - 30


def test_window_length_is_configurable_down_to_one_second() -> None:
    pod = lifetime(bound=0.5, ended=3.5)
    assert windows(cut_records(pod, None, at(10), window_seconds=1)) == [
        (0, 1, 1),
        (1, 2, 1),
        (2, 3, 1),
    ]
    with pytest.raises(MeteringError):
        cut_records(pod, None, at(10), window_seconds=0)


def test_gpu_count_multiplies_seconds_and_cost() -> None:
    (record,) = cut_records(lifetime(bound=0, ended=60, gpus=4), None, at(60))
    assert (record.gpus, record.seconds, record.gpu_seconds) == (4, 60, 240)
    assert record.cost == Decimal("0.166666667")  # 240 * 2.50 / 3600, half-even at 1e-9


def test_mark_cuts_only_windows_after_it_and_clips_an_off_grid_mark() -> None:
    pod = lifetime(bound=0)
    assert windows(cut_records(pod, at(60), at(180))) == [(60, 120, 60), (120, 180, 60)]
    # After a change of window length a mark may sit off the grid: the first window
    # starts at the mark, so records never overlap the ones before it.
    clipped = cut_records(pod, at(90), at(180))
    assert windows(clipped) == [(90, 120, 30), (120, 180, 60)]


# --------------------------------------------------------------------------- rounding and prices


@pytest.mark.parametrize(
    ("gpu_seconds", "per_gpu_hour", "cost"),
    [
        (3600, "2.50", "2.500000000"),
        (1, "2.50", "0.000694444"),  # 0.000694444(4...) rounds down
        (5, "2.50", "0.003472222"),  # 0.003472222(2...) rounds down
        (7, "2.50", "0.004861111"),
        # Exact ties at the 1e-9 digit go to the even neighbour (banker's rounding):
        (1, "0.000009", "0.000000002"),  # 2.5e-9
        (3, "0.000009", "0.000000008"),  # 7.5e-9
        (0, "9.99", "0.000000000"),
    ],
)
def test_cost_rounding_is_half_even_at_one_nano_unit(
    gpu_seconds: int, per_gpu_hour: str, cost: str
) -> None:
    result = window_cost(gpu_seconds, Decimal(per_gpu_hour))
    assert result == Decimal(cost)
    assert format(result, "f") == cost


def test_price_change_applies_from_the_first_window_starting_at_or_after_it() -> None:
    prices = (PricePoint(EPOCH_2020, Decimal("2.00")), PricePoint(at(30), Decimal("3.00")))
    records = cut_records(lifetime(bound=0, prices=prices), None, at(180))
    # The window 12:00 started before the change at 12:00:30: still the old price.
    assert [r.unit_price for r in records] == [Decimal("2.00"), Decimal("3.00"), Decimal("3.00")]
    on_boundary = (PricePoint(EPOCH_2020, Decimal("2.00")), PricePoint(at(60), Decimal("3.00")))
    records = cut_records(lifetime(bound=0, prices=on_boundary), None, at(120))
    assert [r.unit_price for r in records] == [Decimal("2.00"), Decimal("3.00")]
    assert records[1].cost == Decimal("0.050000000")


def test_windows_before_the_first_known_price_use_it() -> None:
    prices = (PricePoint(at(3600), Decimal("4.00")),)
    (record,) = cut_records(lifetime(bound=0, ended=60, prices=prices), None, at(60))
    assert record.unit_price == Decimal("4.00")


def test_price_schedule_must_increase_and_be_non_negative() -> None:
    with pytest.raises(MeteringError):
        lifetime(prices=(PricePoint(at(10), Decimal(1)), PricePoint(at(10), Decimal(2))))
    with pytest.raises(MeteringError):
        PricePoint(at(0), Decimal("-1"))
    with pytest.raises(MeteringError):
        lifetime(prices=())


def test_pool_price_change_supersedes_later_points() -> None:
    history = (PricePoint(EPOCH_2020, Decimal(2)),)
    later = observe_price(history, Decimal(3), created=EPOCH_2020, now=at(60))
    # Seen at an earlier moment (a clock step back): it supersedes the later observation.
    changed = observe_price(later, Decimal(5), created=EPOCH_2020, now=at(30))
    assert [p.per_gpu_hour for p in changed] == [Decimal(2), Decimal(5)]


def test_an_hour_metered_window_by_window_costs_the_hourly_price() -> None:
    # An hour of 8 GPUs at 2.50 costs 20 (what the budget cap counts with), up to the
    # stated rounding: at most half a nano-unit per record (here 60 x 1/3 nano).
    records = cut_records(lifetime(bound=0, ended=3600, gpus=8), None, at(3600))
    assert {r.cost for r in records} == {Decimal("0.333333333")}
    drift = 8 * Decimal("2.50") - sum(r.cost for r in records)
    assert drift == Decimal("0.00000002")
    assert drift <= len(records) * Decimal("0.5e-9")


# --------------------------------------------------------------------------- ids


def test_ids_are_deterministic_distinct_and_documented() -> None:
    first = cut_records(lifetime(bound=0), None, at(600))
    again = cut_records(lifetime(bound=0), None, at(600))
    assert [r.id for r in first] == [r.id for r in again]
    other_pod = cut_records(lifetime(bound=0, uid="uid-b"), None, at(600))
    ids = {r.id for r in first} | {r.id for r in other_pod}
    assert len(ids) == len(first) + len(other_pod)
    start = epoch_floor(T0)
    material = json.dumps(["gpuyard.io/usage/v1", "c1", "uid-a", start, start + 60])
    assert first[0].id == hashlib.sha256(material.encode()).hexdigest()[:32]
    assert first[0].id == record_id("c1", "uid-a", start, start + 60)
    assert record_id("c2", "uid-a", start, start + 60) != first[0].id


def test_a_pod_that_ends_later_keeps_the_ids_of_windows_already_cut() -> None:
    running = cut_records(lifetime(bound=0), None, at(120))
    ended = cut_records(lifetime(bound=0, ended=90), None, at(120))
    assert running[0] == ended[0]
    assert running[1].id == ended[1].id  # same window, same id, fewer seconds
    assert (running[1].seconds, ended[1].seconds) == (60, 30)


# --------------------------------------------------------------------------- marks and ticks


def test_advance_mark_sums_acknowledged_records_once() -> None:
    records = cut_records(lifetime(bound=0, gpus=2), None, at(120))
    mark = advance_mark(None, [*records, records[0]], at(120))
    assert mark == usd_mark(at(120), 240, "0.166666666")
    later = cut_records(lifetime(bound=0, gpus=2), mark.reported_through, at(180))
    assert advance_mark(mark, later, at(180)).gpu_seconds == 360
    assert advance_mark(mark, [], at(240)) == replace(mark, reported_through=at(240))


@pytest.mark.parametrize(
    "problem",
    ["backwards", "before-mark", "after-through", "two-services"],
)
def test_advance_mark_refuses_what_would_corrupt_totals(problem: str) -> None:
    mark = usd_mark(at(60), 60, "0.041666667")
    records = cut_records(lifetime(bound=0), None, at(180))
    cases: dict[str, tuple[list[UsageRecord], datetime]] = {
        "backwards": ([], at(0)),
        "before-mark": (records[:1], at(180)),
        "after-through": (records[1:], at(120)),
        "two-services": ([records[1], replace(records[2], service="other")], at(180)),
    }
    acknowledged, through = cases[problem]
    with pytest.raises(MeteringError):
        advance_mark(mark, acknowledged, through)


def test_closed_through_waits_for_settling() -> None:
    assert closed_through(at(64.9), 60, settle_seconds=5) == at(0)
    assert closed_through(at(65), 60, settle_seconds=5) == at(60)
    assert closed_through(at(65), 60) == at(60)
    assert closed_through(at(7), 1, settle_seconds=2) == at(5)


def test_plan_tick_emits_from_each_mark_and_caps_catch_up() -> None:
    config = MeterConfig(window_seconds=60, settle_seconds=0, max_windows_per_tick=3)
    pods = [lifetime(bound=0, uid="p1"), lifetime(bound=130, uid="p2", service="sd")]
    marks = {Account("team-a", "llm"): ServiceMark(at(60))}
    batches = plan_tick(pods, marks, at(600), config)
    by_key = {b.key: b for b in batches}
    llm, sd = by_key[Account("team-a", "llm")], by_key[Account("team-a", "sd")]
    assert (llm.through, windows(list(llm.records))) == (
        at(240),
        [(60, 120, 60), (120, 180, 60), (180, 240, 60)],
    )
    # No mark: from the pod's binding, capped from the window it falls in.
    assert (sd.through, windows(list(sd.records))) == (
        at(300),
        [(120, 180, 50), (180, 240, 60), (240, 300, 60)],
    )


def test_plan_tick_moves_an_idle_service_mark_and_never_backwards() -> None:
    key = Account("team-a", "idle")
    (batch,) = plan_tick([], {key: ServiceMark(at(0))}, at(125), MeterConfig(settle_seconds=0))
    assert (batch.key, batch.records, batch.through) == (key, (), at(120))
    assert plan_tick([], {key: ServiceMark(at(600))}, at(125)) == []


def test_re_emission_after_a_crash_repeats_the_same_ids() -> None:
    """The meter emits, the sink stores, the process dies before the mark is saved."""
    config = MeterConfig(settle_seconds=0)
    pods = [lifetime(bound=5, ended=250, uid="p1"), lifetime(bound=70, uid="p2", gpus=2)]
    key = Account("team-a", "llm")
    sink: list[UsageRecord] = []
    persisted: dict[Account, ServiceMark] = {}

    (batch,) = plan_tick(pods, persisted, at(120), config)
    sink.extend(batch.records)
    persisted[key] = advance_mark(None, batch.records, batch.through)

    (in_flight,) = plan_tick(pods, persisted, at(240), config)
    sink.extend(in_flight.records)  # delivered, but the mark update is lost: crash

    (replayed,) = plan_tick(pods, persisted, at(300), config)
    assert {r.id for r in in_flight.records} <= {r.id for r in replayed.records}
    sink.extend(replayed.records)
    persisted[key] = advance_mark(persisted[key], replayed.records, replayed.through)

    unique = {r.id: r for r in sink}
    assert len(unique) < len(sink)  # duplicates happened, and all carry known ids
    truth = sum(p.billed_seconds(at(300)) * p.gpus for p in pods)
    assert sum(r.gpu_seconds for r in unique.values()) == truth == persisted[key].gpu_seconds


def test_a_pod_that_lived_and_died_while_the_operator_was_down_is_billed() -> None:
    pool = PoolPricing("a100", "a100-80gb", "USD", (PricePoint(EPOCH_2020, Decimal("2.50")),))
    pod = pod_dict(
        phase="Succeeded",
        scheduled="2024-05-01T12:00:10Z",
        finished=["2024-05-01T12:02:20Z"],
    )
    life = pod_lifetime_from_dict(pod, pool, service="llm", cluster_id="c1")
    assert life is not None
    mark = ServiceMark(at(0))  # persisted before the outage
    (batch,) = plan_tick(
        [life], {life.account: mark}, at(3600), MeterConfig(max_windows_per_tick=120)
    )
    assert sum(r.seconds for r in batch.records) == 130
    new_mark = advance_mark(mark, batch.records, batch.through)
    assert is_fully_reported(life, new_mark)
    assert not is_fully_reported(life, mark)


# --------------------------------------------------------------------------- property


@settings(max_examples=300, deadline=None)
@given(
    bound_us=st.integers(min_value=0, max_value=10**12),
    duration_us=st.integers(min_value=0, max_value=3 * 86400 * 10**6),
    window=st.sampled_from([1, 7, 60, 300, 3600]),
    split=st.floats(min_value=0, max_value=1),
)
def test_records_sum_to_the_floored_lifetime_and_never_overlap(
    bound_us: int, duration_us: int, window: int, split: float
) -> None:
    # At most ~3000 windows per example keeps the run short at 1 s windows.
    duration_us = min(duration_us, window * 3000 * 10**6 + duration_us % 10**6)
    bound = EPOCH_2020 + timedelta(microseconds=bound_us)
    ended = bound + timedelta(microseconds=duration_us)
    pod = replace(lifetime(), bound_at=bound, ended_at=ended)
    through = ended + timedelta(seconds=window)
    records = cut_records(pod, None, through, window)

    total = sum(r.seconds for r in records)
    assert total == epoch_floor(ended) - epoch_floor(bound)
    assert abs(total - duration_us / 10**6) < 1
    for previous, record in itertools.pairwise(records):
        assert previous.end <= record.start
    for record in records:
        assert 0 < record.seconds <= window
        assert epoch_floor(record.start) % window == 0
        assert record.end - record.start == timedelta(seconds=window)
        assert record.gpu_seconds == record.seconds
    assert len({r.id for r in records}) == len(records)

    # Cutting in two ticks around any mark on the grid gives exactly the same records.
    mark_s = epoch_floor(bound) + int(split * (epoch_floor(through) - epoch_floor(bound)))
    mark = from_epoch(mark_s - mark_s % window)
    first = cut_records(pod, None, mark, window)
    second = cut_records(pod, mark, through, window)
    assert first + second == records


# --------------------------------------------------------------------------- utilisation, JSON


def test_utilisation_sets_idle_seconds_without_changing_the_id() -> None:
    (record,) = cut_records(lifetime(bound=0, ended=60, gpus=2), None, at(60))
    measured = with_utilization(record, Decimal("37.5"))
    assert (measured.id, measured.avg_utilization, measured.idle_gpu_seconds) == (
        record.id,
        Decimal("37.5"),
        75,  # 120 - 45
    )
    assert with_utilization(record, Decimal(130)).idle_gpu_seconds == 0
    assert measured.billing_fields() == record.billing_fields()


@pytest.mark.parametrize(
    ("reading", "percent", "idle"),
    [
        (37.504, Decimal("37.50"), 75),  # quantized to 0.01, then 120 x 37.5 % busy
        (37.505, Decimal("37.51"), 75),  # the float nearest 37.505 lies just above it
        (100.0, Decimal("100.00"), 0),
        (250.0, Decimal("100.00"), 0),  # the exporter's glitches are clamped, not billed
        (-1.0, Decimal("0.00"), 120),
        (1e308, Decimal("100.00"), 0),
    ],
)
def test_measured_quantizes_and_clamps_the_reading(
    reading: float, percent: Decimal, idle: int
) -> None:
    (record,) = cut_records(lifetime(bound=0, ended=60, gpus=2), None, at(60))
    result = measured(record, reading)
    assert (result.avg_utilization, result.idle_gpu_seconds) == (percent, idle)
    assert result.billing_fields() == record.billing_fields()


@pytest.mark.parametrize("reading", [None, float("nan"), float("inf"), float("-inf")])
def test_measured_leaves_a_record_unmeasured_without_a_finite_reading(
    reading: float | None,
) -> None:
    (record,) = cut_records(lifetime(bound=0, ended=60), None, at(60))
    assert measured(record, reading) == record


def test_utilization_span_covers_every_record_end_on_the_window_grid() -> None:
    records = cut_records(lifetime(bound=30, ended=200), None, at(240))
    records += cut_records(lifetime(bound=100, uid="uid-b"), None, at(300))
    start, end = utilization_span(records, 60) or (0, 0)
    assert (start, end) == (epoch_floor(at(60)), epoch_floor(at(300)))
    assert {epoch_floor(r.end) for r in records} <= set(range(start, end + 1, 60))
    assert utilization_span([], 60) is None


def test_utilization_span_keeps_the_newest_windows_a_range_query_can_hold() -> None:
    pod = lifetime(bound=0)
    (oldest,) = cut_records(pod, None, at(1), 1)
    (newest,) = cut_records(pod, at(86_399), at(86_400), 1)
    start, end = utilization_span([oldest, newest], 1) or (0, 0)
    assert end == epoch_floor(newest.end)
    assert end - start == MAX_UTILIZATION_WINDOWS - 1  # one query's worth; older go unmeasured


def test_record_json_round_trip_uses_strings_for_money_and_z_times() -> None:
    (record,) = cut_records(
        lifetime(bound=0, ended=1, prices=(PricePoint(EPOCH_2020, Decimal("0.000001")),)),
        None,
        at(60),
    )
    data = record_to_json(record)
    assert data["cost"] == "0.000000000"  # not "0E-9"
    assert data["unit_price"] == "0.000001"
    assert (data["start"], data["end"]) == ("2024-05-01T12:00:00Z", "2024-05-01T12:01:00Z")
    assert record_from_json(data) == record
    measured = with_utilization(record, Decimal("50"))
    line = record_to_line(measured)
    assert "\n" not in line
    assert " " not in line
    assert record_from_line(line) == measured


@pytest.mark.parametrize(
    "broken",
    [
        {"cost": 0.1},
        {"gpus": "1"},
        {"start": "2024-05-01T12:00:00"},  # naive
        {"schema": "other"},
        {"unit_price": "NaN"},
    ],
)
def test_record_json_rejects_lossy_or_ambiguous_input(broken: dict[str, Any]) -> None:
    (record,) = cut_records(lifetime(bound=0, ended=60), None, at(60))
    with pytest.raises(MeteringError):
        record_from_json({**record_to_json(record), **broken})


def test_mark_round_trips_through_status_usage() -> None:
    mark = usd_mark(at(120), 240, "0.333333334")
    usage = mark_to_status(mark)
    assert usage == {
        "gpuSeconds": 240,
        "cost": "0.333333334",
        "currency": "USD",
        "reportedThrough": "2024-05-01T12:02:00Z",
    }
    assert mark_from_status(usage) == mark
    assert mark_from_status(None) is None
    assert mark_from_status({}) is None


def test_naive_datetimes_are_refused() -> None:
    with pytest.raises(MeteringError):
        closed_through(datetime(2024, 5, 1), 60)  # noqa: DTZ001


# --------------------------------------------------------------------------- pods


A100 = PoolPricing(
    name="a100",
    gpu_type="a100-80gb",
    currency="USD",
    prices=(PricePoint(EPOCH_2020, Decimal("2.50")),),
    node_selector=(("gpuyard.io/pool", "a100"),),
)
MIG = PoolPricing(
    name="mig",
    gpu_type="a100-1g10gb",
    currency="EUR",
    prices=(PricePoint(EPOCH_2020, Decimal("0.40")),),
    resource_name="nvidia.com/mig-1g.10gb",
    node_selector=(("gpuyard.io/pool", "a100"), ("nvidia.com/mig.config", "all-1g.10gb")),
)


def pod_dict(
    *,
    phase: str = "Running",
    scheduled: str | None = "2024-05-01T12:00:00Z",
    scheduled_status: str = "True",
    finished: list[str] | None = None,
    running: int = 0,
    deletion: str | None = None,
    pool: str = "a100",
    containers: list[dict[str, Any]] | None = None,
    init_containers: list[dict[str, Any]] | None = None,
    conditions: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    statuses: list[dict[str, Any]] = [
        {"name": f"c{i}", "state": {"terminated": {"exitCode": 0, "finishedAt": f}}}
        for i, f in enumerate(finished or [])
    ]
    statuses += [{"name": f"r{i}", "state": {"running": {}}} for i in range(running)]
    pod_conditions = list(conditions or [])
    if scheduled is not None:
        pod_conditions.append(
            {"type": "PodScheduled", "status": scheduled_status, "lastTransitionTime": scheduled}
        )
    metadata: dict[str, Any] = {
        "name": "llm-7d9f-abcde",
        "namespace": "team-a",
        "uid": "0b1c2d3e",
        "labels": {"gpuyard.io/service": "llm", "gpuyard.io/pool": pool},
    }
    if deletion:
        metadata["deletionTimestamp"] = deletion
    return {
        "metadata": metadata,
        "spec": {
            "nodeName": "gpu-node-1",
            "containers": containers
            or [{"name": "main", "resources": {"limits": {"nvidia.com/gpu": "2"}}}],
            **({"initContainers": init_containers} if init_containers else {}),
        },
        "status": {"phase": phase, "conditions": pod_conditions, "containerStatuses": statuses},
    }


def test_running_pod_is_billed_from_its_binding_with_gpus_from_limits() -> None:
    life = pod_lifetime_from_dict(pod_dict(running=1), A100, service="llm", cluster_id="c1")
    assert life is not None
    assert (life.bound_at, life.ended_at, life.gpus) == (T0, None, 2)
    assert (life.namespace, life.service, life.pool, life.gpu_type) == (
        "team-a",
        "llm",
        "a100",
        "a100-80gb",
    )
    assert (life.pod_uid, life.pod_name, life.currency) == ("0b1c2d3e", "llm-7d9f-abcde", "USD")


def test_terminated_pod_ends_at_its_last_container_finish() -> None:
    pod = pod_dict(phase="Succeeded", finished=["2024-05-01T12:05:00Z", "2024-05-01T12:06:30Z"])
    life = pod_lifetime_from_dict(pod, A100, service="llm", cluster_id="c1")
    assert life is not None
    assert life.ended_at == at(390)


def test_terminating_pod_holds_its_gpus_until_its_containers_stop() -> None:
    pod = pod_dict(running=1, deletion="2024-05-01T12:10:30Z")
    life = pod_lifetime_from_dict(pod, A100, service="llm", cluster_id="c1")
    assert life is not None
    assert life.ended_at is None
    # The object vanished before we saw final statuses (force delete, lost node).
    gone = pod_lifetime_from_dict(pod, A100, service="llm", cluster_id="c1", gone_at=at(900))
    assert gone is not None
    assert gone.ended_at == at(630)
    early = pod_lifetime_from_dict(pod, A100, service="llm", cluster_id="c1", gone_at=at(620))
    assert early is not None
    assert early.ended_at == at(620)


def test_failed_pod_without_container_times_ends_at_its_last_condition() -> None:
    pod = pod_dict(
        phase="Failed",
        conditions=[
            {
                "type": "DisruptionTarget",
                "status": "True",
                "lastTransitionTime": "2024-05-01T12:03:00Z",
            }
        ],
    )
    life = pod_lifetime_from_dict(pod, A100, service="llm", cluster_id="c1")
    assert life is not None
    assert life.ended_at == at(180)


def test_finish_before_binding_by_clock_skew_is_clamped() -> None:
    pod = pod_dict(phase="Failed", finished=["2024-05-01T11:59:58Z"])
    life = pod_lifetime_from_dict(pod, A100, service="llm", cluster_id="c1")
    assert life is not None
    assert life.ended_at == life.bound_at


@pytest.mark.parametrize(
    "pod",
    [
        pod_dict(scheduled=None) | {"spec": {"containers": []}},
        pod_dict(scheduled_status="False"),
        pod_dict(containers=[{"name": "cpu-only", "resources": {"requests": {"cpu": "1"}}}]),
    ],
    ids=["unbound", "unschedulable", "no-gpu"],
)
def test_pods_without_pool_gpus_are_not_billable(pod: dict[str, Any]) -> None:
    assert pod_lifetime_from_dict(pod, A100, service="llm", cluster_id="c1") is None


def test_mig_pool_counts_its_own_resource_and_init_containers_like_the_scheduler() -> None:
    mig = "nvidia.com/mig-1g.10gb"
    pod = pod_dict(
        pool="mig",
        containers=[
            {"name": "a", "resources": {"requests": {mig: "1"}, "limits": {mig: "1"}}},
            {"name": "b", "resources": {"limits": {mig: 1, "nvidia.com/gpu": "4"}}},
        ],
        init_containers=[
            {"name": "warm", "resources": {"limits": {mig: "3"}}},
            {"name": "side", "restartPolicy": "Always", "resources": {"limits": {mig: "1"}}},
        ],
    )
    life = pod_lifetime_from_dict(pod, MIG, service="llm", cluster_id="c1")
    # max(apps 2 + sidecar 1, init 3 + sidecars before it 0) = 3
    assert life is not None
    assert (life.gpus, life.currency) == (3, "EUR")


def test_fractional_gpu_request_is_refused() -> None:
    pod = pod_dict(containers=[{"name": "a", "resources": {"limits": {"nvidia.com/gpu": "0.5"}}}])
    with pytest.raises(MeteringError):
        pod_lifetime_from_dict(pod, A100, service="llm", cluster_id="c1")


# --------------------------------------------------------------------------- who pays


A100_NODE = {"gpuyard.io/pool": "a100", "kubernetes.io/hostname": "gpu-node-1"}
L4 = replace(A100, name="l4", gpu_type="l4", node_selector=(("gpuyard.io/pool", "l4"),))


def test_the_pool_is_the_one_whose_nodes_hold_the_gpus_whatever_the_labels_say() -> None:
    pod = pod_dict(pool="l4")  # a tenant relabelled it: the node still is an a100 node
    assert pool_holding(A100_NODE, pod["spec"], [L4, A100]) == (A100, 2)
    assert pool_holding({"gpuyard.io/pool": "l4"}, pod["spec"], [L4, A100]) == (L4, 2)
    assert pool_holding({"other": "node"}, pod["spec"], [L4, A100]) is None


def test_a_pool_whose_resource_the_pod_does_not_request_holds_none_of_its_gpus() -> None:
    pod = pod_dict()  # nvidia.com/gpu only
    mig_node = {**A100_NODE, "nvidia.com/mig.config": "all-1g.10gb"}
    assert pool_holding(mig_node, pod["spec"], [MIG]) is None
    assert pool_holding(mig_node, pod["spec"], [MIG, A100]) == (A100, 2)


def test_overlapping_pools_prefer_the_services_own_then_the_most_specific_then_a_name() -> None:
    spec = pod_dict()["spec"]
    broad = replace(A100, name="broad", node_selector=(("gpuyard.io/pool", "a100"),))
    narrow = replace(A100, name="narrow", node_selector=tuple(sorted(A100_NODE.items())))
    twin = replace(broad, name="twin")
    assert pool_holding(A100_NODE, spec, [broad, narrow])[0] is narrow  # type: ignore[index]
    assert pool_holding(A100_NODE, spec, [broad, narrow], preferred="broad")[0] is broad  # type: ignore[index]
    assert pool_holding(A100_NODE, spec, [twin, broad])[0] is broad  # type: ignore[index]
    assert pool_holding(A100_NODE, spec, [replace(A100, node_selector=())]) is None


def test_labels_of_the_pod_are_never_read_for_billing() -> None:
    pod = pod_dict(pool="unknown")
    pod["metadata"]["labels"] = {"gpuyard.io/service": "someone-else"}
    life = pod_lifetime_from_dict(pod, A100, service="llm", cluster_id="c1")
    assert life is not None
    assert (life.service, life.pool, life.account) == ("llm", "a100", Account("team-a", "llm"))


def test_a_pod_of_no_service_is_unmanaged_usage_of_its_namespace_on_its_pool() -> None:
    life = pod_lifetime_from_dict(pod_dict(running=1), A100, service=None, cluster_id="c1")
    assert life is not None
    assert life.account == Account("team-a", "", "a100")
    assert life.account.unmanaged
    (record, *_) = cut_records(life, None, at(120))
    assert (record.service, record.unmanaged, record.account) == ("", True, life.account)
    data = record_to_json(record)
    assert (data["service"], data["unmanaged"], data["pool"]) == ("", True, "a100")
    assert record_from_json(data) == record
    with pytest.raises(MeteringError, match="unmanaged"):
        record_from_json({**data, "unmanaged": False})


# --------------------------------------------------------------------------- node loss


def test_a_ready_node_is_no_reason_to_wait() -> None:
    assert node_down(True, None, at(1000), 300) is None


def test_a_node_down_within_the_grace_holds_its_pods_windows() -> None:
    down = node_down(False, at(130), at(300), 300)
    assert down == NodeDown(since=at(130), lost=False)
    life = pod_lifetime_from_dict(
        pod_dict(running=1), A100, service="llm", cluster_id="c1", node=down
    )
    assert life is not None
    assert (life.ended_at, life.held_from) == (None, at(130))
    config = MeterConfig(settle_seconds=0)
    (batch,) = plan_tick([life], {}, at(300), config)
    # Windows after the one holding the moment the node left Ready wait for the verdict.
    assert (batch.through, windows(list(batch.records))) == (at(120), [(0, 60, 60), (60, 120, 60)])


def test_a_node_lost_past_the_grace_ends_billing_when_it_left_ready() -> None:
    down = node_down(False, at(130.7), at(431), 300)
    assert down == NodeDown(since=at(130.7), lost=True)
    life = pod_lifetime_from_dict(
        pod_dict(running=1), A100, service="llm", cluster_id="c1", node=down
    )
    assert life is not None
    assert (life.ended_at, life.held_from) == (at(130.7), None)
    (batch,) = plan_tick([life], {}, at(600), MeterConfig(settle_seconds=0))
    assert sum(r.seconds for r in batch.records) == 130
    # A pod that ended before its node went keeps its own end.
    ended = pod_dict(phase="Succeeded", finished=["2024-05-01T12:01:00Z"])
    early = pod_lifetime_from_dict(ended, A100, service="llm", cluster_id="c1", node=down)
    assert early is not None
    assert early.ended_at == at(60)


def test_a_node_that_never_reported_is_down_from_now() -> None:
    assert node_down(False, None, at(10), 300) == NodeDown(since=at(10), lost=False)
    assert node_down(False, None, at(10), 0) == NodeDown(since=at(10), lost=True)


# --------------------------------------------------------------------------- backlogs


def test_a_backlog_of_an_hour_for_a_thousand_pods_drains_in_bounded_batches() -> None:
    """60 windows x 1,000 pods = 60,000 records behind: batches of at most 10,000 (whole
    windows), each advancing the mark, until the mark reaches the last closed window."""
    pods = [lifetime(bound=0, uid=f"p{i:04}") for i in range(1000)]
    key = Account("team-a", "llm")
    marks = {key: usd_mark(at(0))}
    config = MeterConfig(settle_seconds=0, max_windows_per_tick=60, max_records_per_batch=10_000)
    ticks = 0
    delivered: set[str] = set()
    while marks[key].reported_through < at(3600):
        (batch,) = plan_tick(pods, marks, at(3600), config)
        assert 0 < len(batch.records) <= 10_000
        assert {epoch_floor(r.end) for r in batch.records} <= set(
            range(epoch_floor(marks[key].reported_through) + 60, epoch_floor(batch.through) + 1, 60)
        )
        delivered.update(r.id for r in batch.records)
        marks[key] = advance_mark(marks[key], batch.records, batch.through)
        ticks += 1
    assert ticks == 6
    assert len(delivered) == 60_000
    assert marks[key].gpu_seconds == 3600 * 1000


def test_one_window_bigger_than_a_batch_still_goes_whole() -> None:
    pods = [lifetime(bound=0, uid=f"p{i}") for i in range(30)]
    config = MeterConfig(settle_seconds=0, max_records_per_batch=10)
    (batch,) = plan_tick(pods, {}, at(180), config)
    assert (batch.through, len(batch.records)) == (at(60), 30)


# --------------------------------------------------------------------------- currencies


def test_a_service_billed_in_two_currencies_keeps_a_total_in_each() -> None:
    (usd,) = cut_records(lifetime(bound=0, ended=60), None, at(60))
    (eur,) = cut_records(lifetime(bound=60, ended=120, uid="b"), None, at(120))
    eur = replace(eur, currency="EUR", cost=Decimal("0.010000000"))
    mark = advance_mark(advance_mark(None, [usd], at(60)), [eur], at(120))
    assert mark.costs == {"EUR": Decimal("0.01"), "USD": usd.cost}
    assert (mark.currency, mark.cost, mark.gpu_seconds) == ("EUR", Decimal("0.01"), 120)
    usage = mark_to_status(mark)
    assert (usage["currency"], usage["cost"]) == ("EUR", "0.010000000")
    assert usage["costByCurrency"] == {"EUR": "0.010000000", "USD": "0.041666667"}
    assert mark_from_status(usage) == mark


# --------------------------------------------------------------------------- price history


def test_a_price_history_starts_at_creation_and_records_each_change_once() -> None:
    first = observe_price((), Decimal("2.50"), created=at(0), now=at(500))
    assert first == (PricePoint(at(0), Decimal("2.50")),)
    assert observe_price(first, Decimal("2.50"), created=at(0), now=at(900)) == first
    changed = observe_price(first, Decimal("3"), created=at(0), now=at(1000))
    assert changed == (*first, PricePoint(at(1000), Decimal(3)))
    stored = price_history_to_status(changed)
    assert stored[1] == {"effectiveFrom": "2024-05-01T12:16:40Z", "perGpuHour": "3"}
    assert price_history_from_status(stored) == changed
    with pytest.raises(MeteringError):
        price_history_from_status([{"effectiveFrom": "yesterday", "perGpuHour": "1"}])


def test_a_price_history_keeps_its_newest_points() -> None:
    history: tuple[PricePoint, ...] = ()
    for step in range(MAX_PRICE_POINTS + 5):
        history = observe_price(history, Decimal(step), created=at(0), now=at(step))
    assert len(history) == MAX_PRICE_POINTS
    assert history[-1] == PricePoint(at(MAX_PRICE_POINTS + 4), Decimal(MAX_PRICE_POINTS + 4))
