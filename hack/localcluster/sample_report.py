"""Redraw the README's picture: ``gpuyard usage --chart`` on a sample ledger.

    make report-image     # PYTHONPATH=hack .venv/bin/python -m localcluster.sample_report

The ledger is not recorded from a cluster: it is made here, the same every time, by the
meter's own pure code (``cut_records`` of a scripted day of pod lifetimes: a chat service
that grows with office hours and spikes at noon, embeddings that scale to zero at night, a
fine-tuning job in the afternoon). Then the real command draws it, as a person would run
it on an operator's ledger.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Final

from gpuyard.logic.metering import PodLifetime, PricePoint, UsageRecord, cut_records, record_to_line
from gpuyard.usage_cli import usage_command
from localcluster.cluster import REPO_ROOT

DAY: Final = datetime(2026, 3, 2, tzinfo=UTC)
WINDOW_SECONDS: Final = 300
IMAGE: Final = REPO_ROOT / "docs" / "images" / "usage-report.png"
#: The pools of examples/pools.yaml: (GPU type, price per GPU-hour in USD).
POOLS: Final = {"a100": ("a100-80gb", Decimal("2.50")), "l4": ("l4", Decimal("0.80"))}


@dataclass(frozen=True)
class Replicas:
    """`count` more replicas of a service, each holding `gpus`, from hour `start` to `end`."""

    namespace: str
    service: str
    pool: str
    gpus: int
    count: int
    start: float
    end: float


SCHEDULE: Final = (
    Replicas("ml-prod", "chat", "a100", gpus=2, count=1, start=0, end=24),
    Replicas("ml-prod", "chat", "a100", gpus=2, count=2, start=8, end=20),
    Replicas("ml-prod", "chat", "a100", gpus=2, count=3, start=11.5, end=14),
    Replicas("ml-prod", "embeddings", "l4", gpus=1, count=2, start=7, end=22),
    Replicas("research", "finetune", "a100", gpus=2, count=4, start=13, end=18.5),
)


def sample_records(schedule: Sequence[Replicas] = SCHEDULE) -> list[UsageRecord]:
    """Every closed window of every scripted pod, through the end of the day."""
    records = []
    for row, replicas in enumerate(schedule):
        gpu_type, price = POOLS[replicas.pool]
        for replica in range(replicas.count):
            name = f"{replicas.service}-{row}-{replica}"
            life = PodLifetime(
                cluster_id="sample",
                pod_uid=f"uid-{name}",
                pod_name=name,
                namespace=replicas.namespace,
                service=replicas.service,
                pool=replicas.pool,
                gpu_type=gpu_type,
                gpus=replicas.gpus,
                bound_at=DAY + timedelta(hours=replicas.start),
                ended_at=DAY + timedelta(hours=replicas.end),
                prices=(PricePoint(DAY, price),),
                currency="USD",
                ready_at=DAY + timedelta(hours=replicas.start),  # warm starts
            )
            records += cut_records(life, None, DAY + timedelta(days=1), WINDOW_SECONDS)
    return records


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=IMAGE, help=f"default: {IMAGE}")
    parser.add_argument("--ledger", type=Path, help="keep the sample ledger here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        ledger = args.ledger or Path(scratch) / "ledger.jsonl"
        ledger.write_text("".join(record_to_line(r) + "\n" for r in sample_records()))
        return usage_command(["--ledger", str(ledger), "--chart", str(args.out)])


if __name__ == "__main__":
    raise SystemExit(main())
