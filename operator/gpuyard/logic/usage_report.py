"""Usage reports from usage records: filter, group, total, render as text.

Pure: records in, text or data out. The time series a chart draws (`cumulative_series`,
`service_series`) are built here; drawing them is `gpuyard.report`'s job, an optional
extra with a plotting library. Every amount in tables, CSV and JSON is an exact decimal.

Rules: a record belongs to the time range, day and hour its window *starts* in (UTC);
rows never add up different currencies (currency is always part of the group); GPU-hours
are `gpu_seconds / 3600` quantized to 1e-6 half-even; average utilisation is weighted by
GPU-seconds over the records that carry one, quantized to 0.01.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

from gpuyard.api.formats import format_decimal, format_time, require_utc
from gpuyard.logic.metering import UsageRecord

GROUP_FIELDS = ("namespace", "service", "pool", "gpu_type", "pod", "devices", "day", "hour")
DEFAULT_GROUP_BY = ("namespace", "service")
GPU_HOURS_QUANTUM = Decimal("1e-6")
UTILIZATION_QUANTUM = Decimal("0.01")


# --------------------------------------------------------------------------- filter


@dataclass(frozen=True, slots=True)
class ReportFilter:
    """Which records a report covers. `since` is inclusive, `until` exclusive, both
    compared with the record's window start."""

    namespace: str | None = None
    service: str | None = None
    pool: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    def matches(self, record: UsageRecord) -> bool:
        return (
            (self.namespace is None or record.namespace == self.namespace)
            and (self.service is None or record.service == self.service)
            and (self.pool is None or record.pool == self.pool)
            and (self.since is None or record.start >= require_utc(self.since))
            and (self.until is None or record.start < require_utc(self.until))
        )


def filter_records(records: Iterable[UsageRecord], flt: ReportFilter) -> list[UsageRecord]:
    return [r for r in records if flt.matches(r)]


def parse_group_by(text: str) -> tuple[str, ...]:
    """`"namespace,service"` -> ("namespace", "service"); unknown fields raise ValueError."""
    fields = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [f for f in fields if f not in GROUP_FIELDS]
    if unknown:
        raise ValueError(
            f"cannot group by {', '.join(unknown)}; choose from {', '.join(GROUP_FIELDS)}"
        )
    if len(set(fields)) != len(fields):
        raise ValueError(f"group-by fields repeat: {text!r}")
    return fields


def _group_value(record: UsageRecord, name: str) -> str:
    if name == "day":
        return record.start.astimezone(UTC).strftime("%Y-%m-%d")
    if name == "hour":
        return record.start.astimezone(UTC).strftime("%Y-%m-%dT%H:00Z")
    if name == "devices":
        # A DRA pod's GPUs by UUID (else by device name); "" for a device plugin's GPUs,
        # which have no identity in the API.
        return ",".join(
            device.uuid or f"{device.pool}/{device.device}" for device in record.devices
        )
    return str(getattr(record, name))


# --------------------------------------------------------------------------- summary


@dataclass(frozen=True, slots=True)
class UsageRow:
    group: tuple[str, ...]
    currency: str
    records: int
    gpu_seconds: int
    cost: Decimal
    start: datetime
    end: datetime
    idle_gpu_seconds: int | None = None
    avg_utilization: Decimal | None = None
    #: The GPU-seconds spent starting (cold starts): information, like utilisation.
    starting_gpu_seconds: int = 0

    @property
    def gpu_hours(self) -> Decimal:
        return (Decimal(self.gpu_seconds) / 3600).quantize(GPU_HOURS_QUANTUM, ROUND_HALF_EVEN)


@dataclass(frozen=True, slots=True)
class UsageReport:
    group_by: tuple[str, ...]
    rows: tuple[UsageRow, ...]
    totals: tuple[UsageRow, ...]
    """One row per currency, with an empty group."""


def _row(group: tuple[str, ...], currency: str, records: Sequence[UsageRecord]) -> UsageRow:
    measured = [r for r in records if r.avg_utilization is not None]
    idle = [r.idle_gpu_seconds for r in records if r.idle_gpu_seconds is not None]
    utilization = None
    measured_seconds = sum(r.gpu_seconds for r in measured)
    if measured_seconds:
        weighted = sum(
            (
                Decimal(r.gpu_seconds) * r.avg_utilization
                for r in measured
                if r.avg_utilization is not None
            ),
            Decimal(0),
        )
        utilization = (weighted / measured_seconds).quantize(UTILIZATION_QUANTUM, ROUND_HALF_EVEN)
    return UsageRow(
        group=group,
        currency=currency,
        records=len(records),
        gpu_seconds=sum(r.gpu_seconds for r in records),
        cost=sum((r.cost for r in records), Decimal(0)),
        start=min(r.start for r in records),
        end=max(r.end for r in records),
        idle_gpu_seconds=sum(idle) if idle else None,
        avg_utilization=utilization,
        starting_gpu_seconds=sum(r.starting_gpu_seconds for r in records),
    )


def summarize(
    records: Iterable[UsageRecord], group_by: Sequence[str] = DEFAULT_GROUP_BY
) -> UsageReport:
    group_by = tuple(group_by)
    parse_group_by(",".join(group_by))
    groups: dict[tuple[tuple[str, ...], str], list[UsageRecord]] = {}
    by_currency: dict[str, list[UsageRecord]] = {}
    for record in records:
        group = tuple(_group_value(record, name) for name in group_by)
        groups.setdefault((group, record.currency), []).append(record)
        by_currency.setdefault(record.currency, []).append(record)
    rows = tuple(_row(g, c, rs) for (g, c), rs in sorted(groups.items()))
    totals = tuple(_row((), c, rs) for c, rs in sorted(by_currency.items()))
    return UsageReport(group_by, rows, totals)


# --------------------------------------------------------------------------- text renderings

VALUE_COLUMNS = (
    "currency", "records", "gpu_seconds", "gpu_hours", "cost", "idle_gpu_seconds",
    "avg_utilization", "starting_gpu_seconds",
)  # fmt: skip


def row_values(row: UsageRow) -> list[str]:
    return [
        row.currency,
        str(row.records),
        str(row.gpu_seconds),
        format_decimal(row.gpu_hours),
        format_decimal(row.cost),
        "" if row.idle_gpu_seconds is None else str(row.idle_gpu_seconds),
        "" if row.avg_utilization is None else format_decimal(row.avg_utilization),
        str(row.starting_gpu_seconds),
    ]


def render_table(report: UsageReport) -> str:
    """An aligned plain-text table with a TOTAL line per currency."""
    header = [*report.group_by, *VALUE_COLUMNS]
    body = [[*row.group, *row_values(row)] for row in report.rows]
    pad = [""] * max(len(report.group_by) - 1, 0)
    label = ["TOTAL", *pad] if report.group_by else []
    totals = [[*label, *row_values(row)] for row in report.totals]
    widths = [max(len(cells[i]) for cells in [header, *body, *totals]) for i in range(len(header))]
    numeric = set(range(len(report.group_by) + 1, len(header)))

    def line(cells: Sequence[str]) -> str:
        parts = [
            c.rjust(w) if i in numeric else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    out = [line(header), rule, *(line(cells) for cells in body)]
    if totals:
        out += [rule, *(line(cells) for cells in totals)]
    if not body:
        out.append("(no usage records match)")
    return "\n".join(out) + "\n"


class _TextCollector:
    """What `csv.writer` writes to: it keeps the text, so no file or stream is needed."""

    def __init__(self) -> None:
        self.parts: list[str] = []

    def write(self, text: str) -> None:
        self.parts.append(text)


def render_csv(report: UsageReport) -> str:
    """RFC 4180 CSV, one line per row, no totals (spreadsheets sum for themselves)."""
    buffer = _TextCollector()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([*report.group_by, *VALUE_COLUMNS, "start", "end"])
    for row in report.rows:
        writer.writerow(
            [*row.group, *row_values(row), format_time(row.start), format_time(row.end)]
        )
    return "".join(buffer.parts)


def _row_json(row: UsageRow, group_by: Sequence[str]) -> dict[str, Any]:
    data: dict[str, Any] = dict(zip(group_by, row.group, strict=True))
    data.update(
        currency=row.currency,
        records=row.records,
        gpu_seconds=row.gpu_seconds,
        gpu_hours=format_decimal(row.gpu_hours),
        cost=format_decimal(row.cost),
        start=format_time(row.start),
        end=format_time(row.end),
        idle_gpu_seconds=row.idle_gpu_seconds,
        avg_utilization=None
        if row.avg_utilization is None
        else format_decimal(row.avg_utilization),
        starting_gpu_seconds=row.starting_gpu_seconds,
    )
    return data


def render_json(report: UsageReport) -> str:
    """JSON with decimals as strings, so no consumer rounds money through a float."""
    document = {
        "group_by": list(report.group_by),
        "rows": [_row_json(r, report.group_by) for r in report.rows],
        "totals": [_row_json(r, ()) for r in report.totals],
    }
    return json.dumps(document, indent=2) + "\n"


# --------------------------------------------------------------------------- time series


@dataclass(frozen=True, slots=True)
class CumulativePoint:
    time: datetime
    gpu_seconds: int
    cost: tuple[tuple[str, Decimal], ...]
    """Cumulative cost per currency, sorted by currency."""


def cumulative_series(
    records: Iterable[UsageRecord], max_points: int = 400
) -> list[CumulativePoint]:
    """Cumulative GPU-seconds and cost over time; usage counts at its window's end.

    The first point is zero at the earliest window start. Beyond `max_points`, evenly
    spaced points are kept (always the first and the last): a cumulative curve is
    monotone, so thinning it keeps its shape and its final value exact.
    """
    ordered = sorted(records, key=lambda r: r.end)
    if not ordered:
        return []
    currencies = sorted({r.currency for r in ordered})
    totals = dict.fromkeys(currencies, Decimal(0))
    gpu_seconds = 0
    points = [CumulativePoint(min(r.start for r in ordered), 0, tuple(totals.items()))]
    for index, record in enumerate(ordered):
        gpu_seconds += record.gpu_seconds
        totals[record.currency] += record.cost
        last_at_time = index + 1 == len(ordered) or ordered[index + 1].end != record.end
        if last_at_time:
            points.append(CumulativePoint(record.end, gpu_seconds, tuple(totals.items())))
    if len(points) > max_points >= 2:
        step = (len(points) - 1) / (max_points - 1)
        points = [points[round(i * step)] for i in range(max_points)]
    return points


@dataclass(frozen=True, slots=True)
class ServiceSeries:
    """One service's cumulative usage over time: one line of a usage chart."""

    namespace: str
    service: str
    points: tuple[CumulativePoint, ...]

    @property
    def name(self) -> str:
        return f"{self.namespace}/{self.service}"


def service_series(records: Iterable[UsageRecord], max_points: int = 400) -> list[ServiceSeries]:
    """`cumulative_series` of each service (namespace and name), sorted by service.

    Each series starts at zero at that service's own first window, not at the report's:
    a service that started later has no usage to draw before then.
    """
    by_service: dict[tuple[str, str], list[UsageRecord]] = {}
    for record in records:
        by_service.setdefault((record.namespace, record.service), []).append(record)
    return [
        ServiceSeries(namespace, service, tuple(cumulative_series(mine, max_points)))
        for (namespace, service), mine in sorted(by_service.items())
    ]
