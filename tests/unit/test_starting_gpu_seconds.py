"""The GPU-seconds a pod spends starting (logic.metering): the part of each record held
between binding and the pod's first turn to Ready."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from gpuyard.logic.metering import (
    PodLifetime,
    PoolPricing,
    PricePoint,
    cut_records,
    pod_lifetime_from_dict,
    ready_at,
    record_from_json,
    record_to_json,
    with_utilization,
)

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
PRICES = (PricePoint(datetime(2020, 1, 1, tzinfo=UTC), Decimal("2.50")),)
A100 = PoolPricing(
    name="a100",
    gpu_type="a100-80gb",
    currency="USD",
    prices=PRICES,
    node_selector=(("gpuyard.io/pool", "a100"),),
)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def stamp(seconds: float) -> str:
    return at(seconds).strftime("%Y-%m-%dT%H:%M:%SZ")


def lifetime(
    bound: float, ready: float | None, ended: float | None = None, gpus: int = 2
) -> PodLifetime:
    return PodLifetime(
        cluster_id="c1",
        pod_uid="uid-a",
        pod_name="llm-a",
        namespace="team-a",
        service="llm",
        pool="a100",
        gpu_type="a100-80gb",
        gpus=gpus,
        bound_at=at(bound),
        ended_at=None if ended is None else at(ended),
        prices=PRICES,
        currency="USD",
        ready_at=None if ready is None else at(ready),
    )


def pod(ready: str | None, ready_status: str = "True") -> dict[str, Any]:
    conditions = [{"type": "PodScheduled", "status": "True", "lastTransitionTime": stamp(3)}]
    if ready is not None:
        conditions.append({"type": "Ready", "status": ready_status, "lastTransitionTime": ready})
    return {
        "metadata": {"name": "llm-a", "namespace": "team-a", "uid": "uid-a"},
        "spec": {
            "nodeName": "gpu-1",
            "containers": [{"name": "main", "resources": {"limits": {"nvidia.com/gpu": "1"}}}],
        },
        "status": {"phase": "Running", "conditions": conditions},
    }


def test_the_windows_before_ready_are_starting_and_the_one_across_it_in_part() -> None:
    # Bound at 3 s, ready at 63.5 s (floored to 63), windows of 10 s, cut through 100 s.
    records = cut_records(lifetime(3, 63.5), None, at(100), window_seconds=10)
    starting = [r.starting_gpu_seconds for r in records]
    assert starting == [14, 20, 20, 20, 20, 20, 6, 0, 0, 0]
    assert sum(starting) == (63 - 3) * 2
    assert all(0 <= r.starting_gpu_seconds <= r.gpu_seconds for r in records)


def test_a_pod_not_ready_yet_is_starting_in_every_closed_window() -> None:
    records = cut_records(lifetime(0, None), None, at(30), window_seconds=10)
    assert [r.starting_gpu_seconds for r in records] == [20, 20, 20]


def test_a_pod_that_never_became_ready_started_all_its_life() -> None:
    records = cut_records(lifetime(0, None, ended=25), None, at(60), window_seconds=10)
    assert sum(r.starting_gpu_seconds for r in records) == sum(r.gpu_seconds for r in records)


def test_a_warm_start_has_no_starting_seconds() -> None:
    records = cut_records(lifetime(0, 0), None, at(30), window_seconds=10)
    assert [r.starting_gpu_seconds for r in records] == [0, 0, 0]


def test_starting_seconds_are_information_not_billing() -> None:
    cold = cut_records(lifetime(0, 25), None, at(30), window_seconds=10)
    warm = cut_records(lifetime(0, 0), None, at(30), window_seconds=10)
    assert [r.billing_fields() for r in cold] == [r.billing_fields() for r in warm]
    assert [r.id for r in cold] == [r.id for r in warm]
    # Utilisation leaves them alone.
    assert with_utilization(cold[0], Decimal(40)).starting_gpu_seconds == 20


def test_records_carry_starting_seconds_through_json_and_omit_zero() -> None:
    cold, warm = cut_records(lifetime(0, 10), None, at(20), window_seconds=10)
    assert record_to_json(cold)["starting_gpu_seconds"] == 20
    assert "starting_gpu_seconds" not in record_to_json(warm)
    assert record_from_json(record_to_json(cold)) == cold
    assert record_from_json(record_to_json(warm)).starting_gpu_seconds == 0


def test_the_start_ends_at_the_ready_condition_or_at_the_first_ready_seen() -> None:
    assert ready_at(pod(stamp(63))) == at(63)
    assert ready_at(pod(stamp(63), "False")) is None
    assert ready_at(pod(None)) is None
    life = pod_lifetime_from_dict(pod(stamp(63)), A100, service="llm", cluster_id="c1")
    assert life is not None
    assert life.ready_at == at(63)
    # Unready at its end (a kubelet stopping it), after the meter saw it ready at 63 s.
    again = pod_lifetime_from_dict(
        pod(stamp(200), "False"), A100, service="llm", cluster_id="c1", first_ready_at=at(63)
    )
    assert again is not None
    assert again.ready_at == at(63)
    # A ready time before binding (clocks differ) ends the start at binding.
    early = pod_lifetime_from_dict(pod(stamp(1)), A100, service="llm", cluster_id="c1")
    assert early is not None
    assert early.ready_at == at(3)
