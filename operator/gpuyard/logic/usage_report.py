"""Usage reports from usage records: filter, group, total, render.

Pure: records in, text or bytes out. Rendering a chart needs no plotting library — one
chart model (`chart_model`) is drawn either as inline SVG inside a self-contained HTML
page or as a PNG written with the standard library (`zlib`, `struct`) and a built-in
5x7 bitmap font. Chart coordinates are floats; every amount in tables, CSV and JSON is an
exact decimal.

Rules: a record belongs to the time range, day and hour its window *starts* in (UTC);
rows never add up different currencies (currency is always part of the group); GPU-hours
are `gpu_seconds / 3600` quantized to 1e-6 half-even; average utilisation is weighted by
GPU-seconds over the records that carry one, quantized to 0.01.
"""

from __future__ import annotations

import csv
import html
import io
import itertools
import json
import math
import struct
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

from gpuyard.api.formats import format_decimal, format_time, require_utc
from gpuyard.logic.metering import (
    UsageRecord,
    epoch_floor,
    from_epoch,
)

GROUP_FIELDS = ("namespace", "service", "pool", "gpu_type", "pod", "day", "hour")
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

_VALUE_COLUMNS = (
    "currency", "records", "gpu_seconds", "gpu_hours", "cost", "idle_gpu_seconds",
    "avg_utilization",
)  # fmt: skip


def _row_values(row: UsageRow) -> list[str]:
    return [
        row.currency,
        str(row.records),
        str(row.gpu_seconds),
        format_decimal(row.gpu_hours),
        format_decimal(row.cost),
        "" if row.idle_gpu_seconds is None else str(row.idle_gpu_seconds),
        "" if row.avg_utilization is None else format_decimal(row.avg_utilization),
    ]


def render_table(report: UsageReport) -> str:
    """An aligned plain-text table with a TOTAL line per currency."""
    header = [*report.group_by, *_VALUE_COLUMNS]
    body = [[*row.group, *_row_values(row)] for row in report.rows]
    pad = [""] * max(len(report.group_by) - 1, 0)
    label = ["TOTAL", *pad] if report.group_by else []
    totals = [[*label, *_row_values(row)] for row in report.totals]
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


def render_csv(report: UsageReport) -> str:
    """RFC 4180 CSV, one line per row, no totals (spreadsheets sum for themselves)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([*report.group_by, *_VALUE_COLUMNS, "start", "end"])
    for row in report.rows:
        writer.writerow(
            [*row.group, *_row_values(row), format_time(row.start), format_time(row.end)]
        )
    return buffer.getvalue()


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


# --------------------------------------------------------------------------- chart model


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
class Series:
    name: str
    color: tuple[int, int, int]
    points: tuple[tuple[float, float], ...]
    """Pixel coordinates, y growing downwards."""


@dataclass(frozen=True, slots=True)
class Panel:
    title: str
    left: int
    top: int
    width: int
    height: int
    series: tuple[Series, ...]
    y_ticks: tuple[tuple[float, str], ...]
    x_ticks: tuple[tuple[float, str], ...]
    markers: tuple[tuple[float, str], ...] = ()
    """Events on the time axis: a dashed vertical line at pixel x, its label (if any) right
    of the line, one text row above the panel's title (leave room for it)."""


@dataclass(frozen=True, slots=True)
class ChartModel:
    title: str
    width: int
    height: int
    panels: tuple[Panel, ...]


_PALETTE = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14))
_X_STEPS = (60, 300, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400, 172800, 604800)
_MAX_X_TICKS = 6


def nice_ticks(top: float, count: int = 5) -> tuple[list[float], int]:
    """Ticks 0..>=top on a 1/2/2.5/5 x 10^k grid, and the decimals their labels need."""
    if top <= 0:
        return [0.0, 1.0], 0
    raw = top / count
    exponent = math.floor(math.log10(raw))
    magnitude = 10.0**exponent
    mantissa = next(m for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw * (1 - 1e-12))
    step = mantissa * magnitude
    ticks = [i * step for i in range(math.ceil(top / step - 1e-9) + 1)]
    decimals = max(0, -exponent + (1 if mantissa == 2.5 else 0))
    if mantissa == 10:  # the step is 10^(exponent + 1): one decimal fewer
        decimals = max(0, decimals - 1)
    return ticks, decimals


def _x_ticks(first: int, last: int) -> tuple[list[int], str]:
    span = max(last - first, 1)
    step = next((s for s in _X_STEPS if span / s <= _MAX_X_TICKS), _X_STEPS[-1])
    while span / step > _MAX_X_TICKS:
        step *= 2
    ticks = list(range(first - first % step + step, last + 1, step))
    fmt = "%Y-%m-%d" if step >= 86400 and step % 86400 == 0 else "%m-%d %H:%M"
    return ticks, fmt


def chart_model(
    records: Iterable[UsageRecord], *, title: str = "GPU usage", width: int = 960, height: int = 640
) -> ChartModel:
    """Two stacked panels over one time axis: cumulative GPU-hours, cumulative cost."""
    points = cumulative_series(records, max_points=max(2, width))
    # The right margin leaves room for half of the last, centred time label.
    margin_left, margin_right, margin_top, gap, margin_bottom = 90, 50, 50, 70, 40
    panel_height = (height - margin_top - gap - margin_bottom) // 2
    plot_width = width - margin_left - margin_right
    if not points:
        return ChartModel(title, width, height, ())
    first, last = epoch_floor(points[0].time), epoch_floor(points[-1].time)
    last = max(last, first + 60)

    def x_at(t: datetime) -> float:
        return margin_left + (epoch_floor(t) - first) / (last - first) * plot_width

    tick_times, fmt = _x_ticks(first, last)
    x_ticks = tuple((x_at(from_epoch(t)), from_epoch(t).strftime(fmt)) for t in tick_times)
    hours = [(p.time, p.gpu_seconds / 3600) for p in points]
    currencies = [c for c, _ in points[-1].cost]
    costs = {c: [(p.time, float(dict(p.cost)[c])) for p in points] for c in currencies}
    specs = [
        ("Cumulative GPU-hours", [("GPU-hours", _PALETTE[0], hours)]),
        (
            "Cumulative cost",
            [
                (f"cost {c}", _PALETTE[(i + 1) % len(_PALETTE)], v)
                for i, (c, v) in enumerate(costs.items())
            ],
        ),
    ]
    panels = []
    for index, (panel_title, lines) in enumerate(specs):
        top = margin_top + index * (panel_height + gap)
        peak = max((y for _, _, values in lines for _, y in values), default=0.0)
        ticks, decimals = nice_ticks(peak)
        scale_top = ticks[-1]

        def y_at(value: float, top: int = top, scale_top: float = scale_top) -> float:
            return top + panel_height - value / scale_top * panel_height

        panels.append(
            Panel(
                title=panel_title,
                left=margin_left,
                top=top,
                width=plot_width,
                height=panel_height,
                series=tuple(
                    Series(name, color, tuple((x_at(t), y_at(v)) for t, v in values))
                    for name, color, values in lines
                ),
                y_ticks=tuple((y_at(t), f"{t:.{decimals}f}") for t in ticks),
                x_ticks=x_ticks,
            )
        )
    return ChartModel(title, width, height, tuple(panels))


# --------------------------------------------------------------------------- HTML + SVG


def _hex(color: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*color)


def render_svg(model: ChartModel) -> str:
    esc = html.escape
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{model.width}" height="{model.height}" '
        f'viewBox="0 0 {model.width} {model.height}" role="img" aria-label="{esc(model.title)}" '
        'font-family="sans-serif" font-size="12">',
        f'<rect width="{model.width}" height="{model.height}" fill="#ffffff"/>',
        f'<text x="{model.width / 2:.1f}" y="24" text-anchor="middle" font-size="16">'
        f"{esc(model.title)}</text>",
    ]
    if not model.panels:
        out.append(
            f'<text x="{model.width / 2:.1f}" y="{model.height / 2:.1f}" '
            'text-anchor="middle">no usage</text>'
        )
    for panel in model.panels:
        bottom = panel.top + panel.height
        right = panel.left + panel.width
        out.append(
            f'<text x="{panel.left}" y="{panel.top - 8}" font-weight="bold">'
            f"{esc(panel.title)}</text>"
        )
        for y, label in panel.y_ticks:
            out.append(
                f'<line x1="{panel.left}" y1="{y:.1f}" x2="{right}" y2="{y:.1f}" stroke="#e0e0e0"/>'
                f'<text x="{panel.left - 6}" y="{y + 4:.1f}" text-anchor="end">{esc(label)}</text>'
            )
        for x, label in panel.x_ticks:
            out.append(
                f'<line x1="{x:.1f}" y1="{bottom}" x2="{x:.1f}" y2="{bottom + 5}" stroke="#444"/>'
                f'<text x="{x:.1f}" y="{bottom + 18}" text-anchor="middle">{esc(label)}</text>'
            )
        out.append(
            f'<polyline points="{panel.left},{panel.top} {panel.left},{bottom} {right},{bottom}" '
            'fill="none" stroke="#444"/>'
        )
        for x, label in panel.markers:
            out.append(
                f'<line x1="{x:.1f}" y1="{panel.top}" x2="{x:.1f}" y2="{bottom}" '
                'stroke="#999" stroke-dasharray="3,3"/>'
            )
            if label:
                out.append(f'<text x="{x + 3:.1f}" y="{panel.top - 22}">{esc(label)}</text>')
        for index, series in enumerate(panel.series):
            coords = " ".join(f"{x:.1f},{y:.1f}" for x, y in series.points)
            color = _hex(series.color)
            out.append(
                f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="2"/>'
            )
            legend_y = panel.top + 14 + 16 * index
            out.append(
                f'<rect x="{panel.left + 10}" y="{legend_y - 9}" width="10" height="10" '
                f'fill="{color}"/>'
                f'<text x="{panel.left + 26}" y="{legend_y}">{esc(series.name)}</text>'
            )
    out.append("</svg>")
    return "\n".join(out)


def render_html(records: Sequence[UsageRecord], *, title: str = "gpuyard GPU usage") -> str:
    """A self-contained HTML page: the SVG chart and a summary table. No scripts, no
    external resources, so it can be mailed or archived as a single file."""
    esc = html.escape
    report = summarize(records, ("namespace", "service"))
    svg = render_svg(chart_model(records, title=title))
    span = ""
    if records:
        first, last = min(r.start for r in records), max(r.end for r in records)
        span = f", {format_time(first)} to {format_time(last)}"
    header = "".join(f"<th>{esc(c)}</th>" for c in [*report.group_by, *_VALUE_COLUMNS])
    rows = "".join(
        "<tr>" + "".join(f"<td>{esc(v)}</td>" for v in [*row.group, *_row_values(row)]) + "</tr>"
        for row in report.rows
    )
    totals = "".join(
        "<tr class='total'>"
        + "".join(f"<td>{esc(v)}</td>" for v in ["TOTAL", "", *_row_values(row)])
        + "</tr>"
        for row in report.totals
    )
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{esc(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin-top: 1em; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; }}
th:nth-child(-n+2), td:nth-child(-n+2) {{ text-align: left; }}
tr.total td {{ font-weight: bold; }}
</style>
</head>
<body>
<h1>{esc(title)}</h1>
<p>{len(records)} usage records{esc(span)} (UTC).
Usage counts at the end of its window.</p>
{svg}
<table>
<thead><tr>{header}</tr></thead>
<tbody>{rows}{totals}</tbody>
</table>
</body>
</html>
"""


# --------------------------------------------------------------------------- PNG

# A 5x7 bitmap font: 7 rows per glyph, 5 bits per row, most significant bit leftmost.
_FONT: dict[str, tuple[int, ...]] = {
    "0": (0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E),
    "1": (0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E),
    "2": (0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F),
    "3": (0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E),
    "4": (0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02),
    "5": (0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E),
    "6": (0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E),
    "7": (0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08),
    "8": (0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E),
    "9": (0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C),
    "A": (0x0E, 0x11, 0x11, 0x11, 0x1F, 0x11, 0x11),
    "B": (0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E),
    "C": (0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E),
    "D": (0x1C, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1C),
    "E": (0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F),
    "F": (0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10),
    "G": (0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F),
    "H": (0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11),
    "I": (0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E),
    "J": (0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C),
    "K": (0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11),
    "L": (0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F),
    "M": (0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11),
    "N": (0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11),
    "O": (0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E),
    "P": (0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10),
    "Q": (0x0E, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0D),
    "R": (0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11),
    "S": (0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E),
    "T": (0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04),
    "U": (0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E),
    "V": (0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04),
    "W": (0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0A),
    "X": (0x11, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x11),
    "Y": (0x11, 0x11, 0x11, 0x0A, 0x04, 0x04, 0x04),
    "Z": (0x1F, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1F),
    " ": (0, 0, 0, 0, 0, 0, 0),
    ".": (0, 0, 0, 0, 0, 0x0C, 0x0C),
    ":": (0, 0x0C, 0x0C, 0, 0x0C, 0x0C, 0),
    "-": (0, 0, 0, 0x1F, 0, 0, 0),
    "/": (0, 0x01, 0x02, 0x04, 0x08, 0x10, 0),
    "(": (0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02),
    ")": (0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08),
    ",": (0, 0, 0, 0, 0x0C, 0x04, 0x08),
    "%": (0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03),
    "_": (0, 0, 0, 0, 0, 0, 0x1F),
    "+": (0, 0x04, 0x04, 0x1F, 0x04, 0x04, 0),
    "?": (0x0E, 0x11, 0x01, 0x02, 0x04, 0, 0x04),
}
_GLYPH_ADVANCE = 6


class _Canvas:
    def __init__(self, width: int, height: int) -> None:
        self.width, self.height = width, height
        self.pixels = bytearray(b"\xff" * (width * height * 3))

    def dot(self, x: int, y: int, color: tuple[int, int, int]) -> None:
        if 0 <= x < self.width and 0 <= y < self.height:
            offset = (y * self.width + x) * 3
            self.pixels[offset : offset + 3] = bytes(color)

    def line(
        self,
        start: tuple[float, float],
        end: tuple[float, float],
        color: tuple[int, int, int],
        thick: int = 1,
    ) -> None:
        # Bresenham on rounded endpoints; thickness by stamping a small square.
        ax, ay, bx, by = round(start[0]), round(start[1]), round(end[0]), round(end[1])
        dx, dy = abs(bx - ax), -abs(by - ay)
        sx, sy = (1 if ax < bx else -1), (1 if ay < by else -1)
        error = dx + dy
        while True:
            for ox in range(thick):
                for oy in range(thick):
                    self.dot(ax + ox, ay + oy, color)
            if ax == bx and ay == by:
                return
            doubled = 2 * error
            if doubled >= dy:
                error += dy
                ax += sx
            if doubled <= dx:
                error += dx
                ay += sy

    def text(
        self, at: tuple[float, float], text: str, color: tuple[int, int, int], anchor: str = "start"
    ) -> None:
        """`at` is (x, baseline y); anchor is start, middle or end."""
        width = len(text) * _GLYPH_ADVANCE
        left = round(at[0]) - {"start": 0, "middle": width // 2, "end": width}[anchor]
        top = round(at[1]) - 7
        for index, char in enumerate(text.upper()):
            rows = _FONT.get(char, _FONT["?"])
            for row, bits in enumerate(rows):
                for column in range(5):
                    if bits & (0x10 >> column):
                        self.dot(left + index * _GLYPH_ADVANCE + column, top + row, color)

    def png(self) -> bytes:
        stride = self.width * 3
        raw = b"".join(
            b"\x00" + bytes(self.pixels[y * stride : (y + 1) * stride]) for y in range(self.height)
        )

        def chunk(kind: bytes, data: bytes) -> bytes:
            return (
                struct.pack(">I", len(data))
                + kind
                + data
                + struct.pack(">I", zlib.crc32(kind + data))
            )

        header = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)
        return (
            b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(raw, 9))
            + chunk(b"IEND", b"")
        )


_INK = (34, 34, 34)
_GRID = (224, 224, 224)
_MARKER = (153, 153, 153)


def render_png(model: ChartModel) -> bytes:
    """The chart as an 8-bit RGB PNG (labels upper-cased by the bitmap font)."""
    canvas = _Canvas(model.width, model.height)
    canvas.text((model.width / 2, 28), model.title, _INK, "middle")
    if not model.panels:
        canvas.text((model.width / 2, model.height / 2), "no usage", _INK, "middle")
    for panel in model.panels:
        bottom, right = panel.top + panel.height, panel.left + panel.width
        canvas.text((panel.left, panel.top - 8), panel.title, _INK)
        for y, label in panel.y_ticks:
            canvas.line((panel.left, y), (right, y), _GRID)
            canvas.text((panel.left - 6, y + 4), label, _INK, "end")
        for x, label in panel.x_ticks:
            canvas.line((x, bottom), (x, bottom + 5), _INK)
            canvas.text((x, bottom + 18), label, _INK, "middle")
        canvas.line((panel.left, panel.top), (panel.left, bottom), _INK)
        canvas.line((panel.left, bottom), (right, bottom), _INK)
        for x, label in panel.markers:
            for y in range(panel.top, bottom, 6):
                canvas.line((x, y), (x, min(y + 2, bottom)), _MARKER)
            if label:
                canvas.text((x + 3, panel.top - 22), label, _INK)
        for index, series in enumerate(panel.series):
            for start, end in itertools.pairwise(series.points):
                canvas.line(start, end, series.color, thick=2)
            legend_y = panel.top + 14 + 16 * index
            for row in range(legend_y - 9, legend_y + 1):
                canvas.line((panel.left + 10, row), (panel.left + 19, row), series.color)
            canvas.text((panel.left + 26, legend_y), series.name, _INK)
    return canvas.png()
