"""The usage chart (`gpuyard usage --chart`): cumulative GPU-hours and cost per service
over time, and the HTML page around it."""

from __future__ import annotations

import html
from collections.abc import Sequence
from datetime import UTC

from matplotlib.axes import Axes
from matplotlib.dates import AutoDateLocator, ConciseDateFormatter
from matplotlib.figure import Figure

from gpuyard.api.formats import format_time
from gpuyard.logic.metering import UsageRecord
from gpuyard.logic.usage_report import VALUE_COLUMNS, row_values, service_series, summarize
from gpuyard.report.figures import color_at, inline_svg, new_figure

#: One line style per currency, so that a service billed in two keeps its one colour.
_CURRENCY_STYLES = ("-", "--", ":", "-.")
NO_USAGE = "no usage records match"


def _time_axis(axes: Axes) -> None:
    locator = AutoDateLocator(tz=UTC)
    axes.xaxis.set_major_locator(locator)
    axes.xaxis.set_major_formatter(ConciseDateFormatter(locator, tz=UTC))
    axes.set_xlabel("Time (UTC)")


def usage_figure(
    records: Sequence[UsageRecord],
    *,
    title: str = "GPU usage",
    width: int = 960,
    height: int = 640,
) -> Figure:
    """Two panels over one time axis, one line per service (namespace/name) in each:
    cumulative GPU-hours, and cumulative cost (a line per currency the service used).
    Usage counts at the end of its window."""
    figure = new_figure(width, height)
    figure.suptitle(title)
    every_series = service_series(records, max_points=max(2, width))
    if not every_series:
        figure.text(0.5, 0.5, NO_USAGE, ha="center", va="center")
        return figure
    usage_axes, cost_axes = figure.subplots(2, 1, sharex=True)
    currencies = sorted({record.currency for record in records})
    for index, series in enumerate(every_series):
        color = color_at(index)
        times = [point.time for point in series.points]
        usage_axes.plot(
            times,
            [point.gpu_seconds / 3600 for point in series.points],
            color=color,
            label=series.name,
        )
        for currency, _ in series.points[-1].cost:
            label = series.name if len(currencies) == 1 else f"{series.name} ({currency})"
            cost_axes.plot(
                times,
                [float(dict(point.cost)[currency]) for point in series.points],
                color=color,
                linestyle=_CURRENCY_STYLES[currencies.index(currency) % len(_CURRENCY_STYLES)],
                label=label,
            )
    usage_axes.set_title("Cumulative GPU-hours per service", loc="left")
    usage_axes.set_ylabel("GPU-hours")
    cost_axes.set_title("Cumulative cost per service", loc="left")
    cost_axes.set_ylabel(f"Cost ({currencies[0]})" if len(currencies) == 1 else "Cost")
    for axes in (usage_axes, cost_axes):
        # Cumulative amounts start at zero; the top is matplotlib's autoscaled one.
        axes.set_ylim(bottom=0)
        axes.grid(color="0.9")
        axes.legend(loc="upper left", title="namespace/service", fontsize="small")
    _time_axis(cost_axes)
    return figure


def render_html(records: Sequence[UsageRecord], *, title: str = "gpuyard GPU usage") -> str:
    """A self-contained HTML page: the chart as inline SVG and a summary table. No
    scripts, no external resources, so it can be mailed or archived as a single file."""
    esc = html.escape
    report = summarize(records, ("namespace", "service"))
    svg = inline_svg(usage_figure(records, title=title))
    span = ""
    if records:
        first, last = min(r.start for r in records), max(r.end for r in records)
        span = f", {format_time(first)} to {format_time(last)}"
    header = "".join(f"<th>{esc(c)}</th>" for c in [*report.group_by, *VALUE_COLUMNS])
    rows = "".join(
        "<tr>" + "".join(f"<td>{esc(v)}</td>" for v in [*row.group, *row_values(row)]) + "</tr>"
        for row in report.rows
    )
    totals = "".join(
        "<tr class='total'>"
        + "".join(f"<td>{esc(v)}</td>" for v in ["TOTAL", "", *row_values(row)])
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
svg {{ max-width: 100%; height: auto; }}
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
