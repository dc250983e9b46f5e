"""What the PostgreSQL usage ledger costs per window, against the JSON-lines ledger file.

One window of 10,000 GPU pods is 10,000 usage records, which the meter hands to its sinks
in one emit (``GPUYARD_METER_MAX_RECORDS_PER_BATCH``). Measured, in the same run, the wall
time of that emit (it returns once the records are durable):

- baseline: ``LedgerFileSink``, one write and an fsync of the file;
- ``PostgresSink`` with new ids: COPY into a temporary table, one INSERT ... ON CONFLICT
  DO NOTHING, COMMIT (synchronous_commit on: the WAL is flushed before COMMIT returns);
- ``PostgresSink`` with ids already stored, the re-emit after a restart: the insert finds
  every id, and the stored copies are compared with the new ones in SQL.

Each emit also gets its CPU time in this process (``time.process_time()``), to separate
what the client spends encoding from what it waits for the server. PostgreSQL is a real
server started here (hack/localcluster/postgres.py) on loopback, in a temporary
directory, with Debian's default settings; it shares the machine's cores with this process.

    PYTHONPATH=hack .venv/bin/python bench/ledger.py [--records 10000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

from gpuyard.io.pgledger import ConnectionSource, PostgresSink, migrate_database
from gpuyard.io.sinks import LedgerFileSink
from gpuyard.logic.metering import PodLifetime, PricePoint, UsageRecord, cut_records
from localcluster import postgres

T0 = datetime(2026, 12, 3, 6, 0, tzinfo=UTC)


def window_records(pods: int, window: int) -> list[UsageRecord]:
    """One 60 s window of `pods` pods of one GPU each (every record has a new id)."""
    start = T0 + timedelta(minutes=window)
    records: list[UsageRecord] = []
    for index in range(pods):
        life = PodLifetime(
            cluster_id="bench",
            pod_uid=f"pod-{index:05d}",
            pod_name=f"llm-{index:05d}",
            namespace=f"team-{index % 20}",
            service=f"svc-{index // 10}",
            pool="a100",
            gpu_type="a100-80gb",
            gpus=1,
            bound_at=T0,
            ended_at=None,
            prices=(PricePoint(T0, Decimal("2.40")),),
            currency="USD",
            ready_at=T0,  # warm: the records carry no starting seconds
        )
        records.extend(cut_records(life, start, start + timedelta(minutes=1)))
    return records


async def timed(call: Callable[[], Awaitable[None]]) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    await call()
    return time.perf_counter() - wall, time.process_time() - cpu


def row(name: str, samples: list[tuple[float, float]], baseline: float, records: int) -> str:
    wall = statistics.median(s[0] for s in samples)
    cpu = statistics.median(s[1] for s in samples)
    fastest = min(s[0] for s in samples)
    return (
        f"| {name} | {wall * 1000:.0f} ms (min {fastest * 1000:.0f}) | {cpu * 1000:.0f} ms | "
        f"{records / wall:,.0f} | {wall / baseline:.2f}x |"
    )


async def measure(dsn: str, work: Path, records: int, repeat: int) -> list[str]:
    source = ConnectionSource(dsn=dsn)
    await migrate_database(source)
    ledger = LedgerFileSink(work / "usage.jsonl")
    sink = PostgresSink(source)
    batches = [window_records(records, window) for window in range(repeat + 1)]
    # Warm-up: the file is created, the connection opened, the temporary table made.
    await ledger.emit(batches[0])
    await sink.emit(batches[0])
    file_samples: list[tuple[float, float]] = []
    new_samples: list[tuple[float, float]] = []
    again_samples: list[tuple[float, float]] = []
    for batch in batches[1:]:
        file_samples.append(await timed(functools.partial(ledger.emit, batch)))
        new_samples.append(await timed(functools.partial(sink.emit, batch)))
        again_samples.append(await timed(functools.partial(sink.emit, batch)))
        assert sink.last.duplicates == len(batch)
    await ledger.aclose()
    await sink.aclose()
    baseline = statistics.median(s[0] for s in file_samples)
    return [
        f"{records:,} records per emit, {repeat} emits each, median wall time:",
        "",
        "| sink | wall per emit | CPU here | records/s | vs file |",
        "|---|---:|---:|---:|---:|",
        row("`LedgerFileSink` (baseline)", file_samples, baseline, records),
        row("`PostgresSink`, new ids", new_samples, baseline, records),
        row("`PostgresSink`, all duplicates", again_samples, baseline, records),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=10_000, help="records per emit")
    parser.add_argument("--repeat", type=int, default=5, help="emits per measurement")
    args = parser.parse_args(argv)
    print(
        f"# {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {platform.node()}, "
        f"Python {platform.python_version()}"
    )
    with tempfile.TemporaryDirectory(prefix="gpuyard-bench-ledger-") as scratch:
        work = Path(scratch)
        server = postgres.start_new(work)
        try:
            lines = asyncio.run(measure(server.dsn, work, args.records, args.repeat))
        finally:
            postgres.stop(server)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
