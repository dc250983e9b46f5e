"""Usage records as the meter cuts them, from a scripted pod lifetime: what the report and
ledger unit tests read back."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from gpuyard.logic.metering import PodLifetime, PricePoint, UsageRecord, cut_records

T0 = datetime(2024, 5, 1, 23, 0, tzinfo=UTC)


def pod_records(
    *,
    uid: str,
    namespace: str = "team-a",
    service: str = "llm",
    pool: str = "a100",
    gpus: int = 1,
    price: str = "2.40",
    currency: str = "USD",
    minutes: int = 120,
    start_minute: int = 0,
) -> list[UsageRecord]:
    """The records of one pod that ran ``minutes`` from ``start_minute`` after T0."""
    life = PodLifetime(
        cluster_id="c1",
        pod_uid=uid,
        pod_name=f"{service}-{uid}",
        namespace=namespace,
        service=service,
        pool=pool,
        gpu_type=f"{pool}-gpu",
        gpus=gpus,
        bound_at=T0 + timedelta(minutes=start_minute),
        ended_at=T0 + timedelta(minutes=start_minute + minutes),
        prices=(PricePoint(T0, Decimal(price)),),
        currency=currency,
        # A warm start: ready once bound, so no GPU-second is a cold start's.
        ready_at=T0 + timedelta(minutes=start_minute),
    )
    return cut_records(life, None, T0 + timedelta(days=2))
