"""The demo's report: a chart of load, replicas and cost per service over the story, an
HTML page around it, and the check that the bill adds up.

Pure: takes the snapshots the driver recorded, the story's verdicts and the ledger's
records; returns a ``ChartModel`` (drawn by ``gpuyard.logic.usage_report``'s PNG and SVG
renderers, so there is no plotting dependency), HTML text and a ``BillingCheck``.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Final

from gpuyard.api.formats import format_decimal, parse_time
from gpuyard.logic.metering import UsageRecord
from gpuyard.logic.usage_report import ChartModel, Panel, Series, nice_ticks, render_svg
from localcluster.demo_story import Snapshot, Verdict

COLORS: Final = {
    "chat": (31, 119, 180),
    "embeddings": (44, 160, 44),
    "finetune": (255, 127, 14),
}
OTHER_COLORS: Final = ((148, 103, 189), (214, 39, 40), (140, 86, 75))
TOTAL_COLOR: Final = (110, 110, 110)
_X_STEPS: Final = (10, 15, 30, 60, 120, 300, 600)
_MAX_X_TICKS: Final = 10


def color_of(name: str, index: int) -> tuple[int, int, int]:
    return COLORS.get(name, OTHER_COLORS[index % len(OTHER_COLORS)])


def elapsed_label(seconds: float) -> str:
    whole = round(seconds)
    return f"{whole // 60}:{whole % 60:02d}"


def cost_curves(
    records: Sequence[UsageRecord], story_start: datetime
) -> dict[str, list[tuple[float, float]]]:
    """Cumulative cost per service (and ``total``) at each window's end, in story seconds."""
    curves: dict[str, list[tuple[float, float]]] = {}
    totals: dict[str, Decimal] = {}
    everything = Decimal(0)
    ordered = sorted(records, key=lambda r: (r.end, r.service))
    for record in ordered:
        t = (record.end - story_start).total_seconds()
        curve = curves.setdefault(
            record.service, [((record.start - story_start).total_seconds(), 0.0)]
        )
        totals[record.service] = totals.get(record.service, Decimal(0)) + record.cost
        everything += record.cost
        curve.append((t, float(totals[record.service])))
        curves.setdefault("total", [(t, 0.0)]).append((t, float(everything)))
    return curves


@dataclass(frozen=True)
class _Lines:
    title: str
    lines: list[tuple[str, tuple[int, int, int], list[tuple[float, float]]]]


def chart_model(
    snapshots: Sequence[Snapshot],
    records: Sequence[UsageRecord],
    story_start: datetime,
    phase_starts: Sequence[tuple[float, str]],
    *,
    services: Sequence[str],
    currency: str = "USD",
    title: str = "gpuyard demo",
    width: int = 960,
    height: int = 760,
) -> ChartModel:
    """Three panels over one time axis (story seconds): load, ready replicas, cost."""
    margin_left, margin_right, margin_top, gap, margin_bottom = 80, 40, 66, 56, 40
    panel_height = (height - margin_top - 2 * gap - margin_bottom) // 3
    plot_width = width - margin_left - margin_right
    curves = cost_curves(records, story_start)
    last = max([s.t for s in snapshots] + [p[-1][0] for p in curves.values() if p] + [60.0])

    def x_at(t: float) -> float:
        return margin_left + max(0.0, min(t, last)) / last * plot_width

    step = next((s for s in _X_STEPS if last / s <= _MAX_X_TICKS), _X_STEPS[-1])
    x_ticks = tuple((x_at(t), elapsed_label(t)) for t in range(0, int(last) + 1, step))
    finals = {name: points[-1][1] for name, points in curves.items()}
    specs = [
        _Lines(
            "LOAD (GPU-% OF DEMAND)",
            [
                (name, color_of(name, i), [(s.t, s.service(name).load) for s in snapshots])
                for i, name in enumerate(services)
            ],
        ),
        _Lines(
            "READY REPLICAS",
            [
                (name, color_of(name, i), [(s.t, float(s.service(name).ready)) for s in snapshots])
                for i, name in enumerate(services)
            ],
        ),
        _Lines(
            f"CUMULATIVE COST ({currency})",
            [
                (
                    f"{name} {finals.get(name, 0.0):.4f}",
                    color_of(name, i) if name != "total" else TOTAL_COLOR,
                    curves.get(name, []),
                )
                for i, name in enumerate([*services, "total"])
            ],
        ),
    ]
    panels = []
    for index, spec in enumerate(specs):
        top = margin_top + index * (panel_height + gap)
        peak = max((y for _, _, values in spec.lines for _, y in values), default=0.0)
        ticks, decimals = nice_ticks(peak, count=4)
        scale_top = ticks[-1]

        def y_at(value: float, top: int = top, scale_top: float = scale_top) -> float:
            return top + panel_height - value / scale_top * panel_height

        panels.append(
            Panel(
                title=spec.title,
                left=margin_left,
                top=top,
                width=plot_width,
                height=panel_height,
                series=tuple(
                    Series(name, color, tuple((x_at(t), y_at(v)) for t, v in values))
                    for name, color, values in spec.lines
                ),
                y_ticks=tuple((y_at(t), f"{t:.{decimals}f}") for t in ticks),
                x_ticks=x_ticks,
                # Phase names only above the first panel, where nothing else is written.
                # The first phase starts the axis; the others get a line and, above the
                # first panel, their name.
                markers=tuple(
                    (x_at(t), name.upper() if index == 0 else "") for t, name in phase_starts[1:]
                ),
            )
        )
    return ChartModel(title, width, height, tuple(panels))


# --------------------------------------------------------------------------- the bill


@dataclass(frozen=True)
class ServiceBill:
    service: str
    status_cost: Decimal
    status_gpu_seconds: int
    reported_through: str | None
    ledger_cost: Decimal
    """The ledger's records of this service that end at or before ``reported_through``."""
    ledger_gpu_seconds: int
    records_after: int
    """Records written after the mark (delivered, mark not yet saved): billed next tick."""


@dataclass(frozen=True)
class BillingCheck:
    currency: str
    ledger_total: Decimal
    ledger_records: int
    report_total: Decimal | None
    services: tuple[ServiceBill, ...]
    problems: tuple[str, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        return not self.problems

    def cost_line(self) -> str:
        shown = "missing" if self.report_total is None else format_decimal(self.report_total)
        verdict = "match" if self.ok else "MISMATCH"
        return (
            f"cost: report {shown} {self.currency}, ledger {format_decimal(self.ledger_total)} "
            f"{self.currency} in {self.ledger_records} usage records: {verdict}"
        )


@dataclass(frozen=True)
class StatusUsage:
    """An AIService's ``status.usage`` as read at the end."""

    cost: Decimal
    gpu_seconds: int
    reported_through: str | None
    currency: str


def check_billing(
    records: Sequence[UsageRecord],
    report_total: Decimal | None,
    usage: Mapping[str, StatusUsage],
) -> BillingCheck:
    """The usage report's total against the ledger's, and each service's ``status.usage``
    against the ledger's records up to that service's mark."""
    problems = []
    currencies = sorted({r.currency for r in records} | {u.currency for u in usage.values()})
    currency = currencies[0] if len(currencies) == 1 else "/".join(currencies) or "USD"
    if len(currencies) > 1:
        problems.append(f"more than one currency: {currency}")
    ledger_total = sum((r.cost for r in records), Decimal(0))
    if not records:
        problems.append("the ledger holds no usage records")
    if report_total is None:
        problems.append("the usage report has no TOTAL cost")
    elif report_total != ledger_total:
        problems.append(
            f"report total {format_decimal(report_total)} != ledger total "
            f"{format_decimal(ledger_total)}"
        )
    bills = []
    for service, status in sorted(usage.items()):
        mine = [r for r in records if r.service == service]
        through = parse_time(status.reported_through) if status.reported_through else None
        upto = [r for r in mine if through is not None and r.end <= through]
        bill = ServiceBill(
            service=service,
            status_cost=status.cost,
            status_gpu_seconds=status.gpu_seconds,
            reported_through=status.reported_through,
            ledger_cost=sum((r.cost for r in upto), Decimal(0)),
            ledger_gpu_seconds=sum(r.gpu_seconds for r in upto),
            records_after=len(mine) - len(upto),
        )
        bills.append(bill)
        said = (bill.status_cost, bill.status_gpu_seconds)
        if said != (bill.ledger_cost, bill.ledger_gpu_seconds):
            problems.append(
                f"{service}: status.usage says {format_decimal(bill.status_cost)} "
                f"({bill.status_gpu_seconds} GPU-s) but the ledger up to "
                f"{bill.reported_through} holds {format_decimal(bill.ledger_cost)} "
                f"({bill.ledger_gpu_seconds} GPU-s)"
            )
    return BillingCheck(
        currency, ledger_total, len(records), report_total, tuple(bills), tuple(problems)
    )


# --------------------------------------------------------------------------- HTML


def render_html(
    model: ChartModel,
    *,
    headline: str,
    verdicts: Sequence[Verdict],
    billing: BillingCheck,
    usage_table: str,
    files: Sequence[tuple[str, str]],
) -> str:
    """One self-contained page: no scripts, no external resources."""
    esc = html.escape
    rows = "".join(
        "<tr>"
        f"<td class='{'ok' if v.met else 'bad'}'>{'met' if v.met else 'MISSED'}</td>"
        f"<td>{esc(v.phase)}</td><td>{esc(elapsed_label(v.at or 0)) if v.at else ''}</td>"
        f"<td>{esc(v.title)}</td><td>{esc(v.detail)}</td></tr>"
        for v in verdicts
    )
    bills = "".join(
        f"<tr><td>{esc(b.service)}</td><td>{b.status_gpu_seconds}</td>"
        f"<td>{esc(format_decimal(b.status_cost))}</td><td>{b.ledger_gpu_seconds}</td>"
        f"<td>{esc(format_decimal(b.ledger_cost))}</td><td>{esc(b.reported_through or '')}</td>"
        "</tr>"
        for b in billing.services
    )
    problems = "".join(f"<li>{esc(p)}</li>" for p in billing.problems)
    links = "".join(f"<li><a href='{esc(href)}'>{esc(label)}</a></li>" for label, href in files)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>gpuyard demo report</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; max-width: 1000px; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }}
td.ok {{ color: #2a7a2a; font-weight: bold; }}
td.bad {{ color: #b22; font-weight: bold; }}
pre {{ background: #f6f6f6; padding: 1em; overflow-x: auto; }}
</style>
</head>
<body>
<h1>gpuyard demo report</h1>
<p>{esc(headline)}</p>
{render_svg(model)}
<h2>What was expected, and what happened</h2>
<table>
<thead><tr><th></th><th>phase</th><th>at</th><th>expected</th><th>observed</th></tr></thead>
<tbody>{rows}</tbody>
</table>
<h2>The bill</h2>
<p>{esc(billing.cost_line())}</p>
{f"<ul>{problems}</ul>" if problems else ""}
<table>
<thead><tr><th>service</th><th>status GPU-s</th><th>status cost</th><th>ledger GPU-s</th>
<th>ledger cost</th><th>reported through</th></tr></thead>
<tbody>{bills}</tbody>
</table>
<h3><code>gpuyard usage</code></h3>
<pre>{esc(usage_table)}</pre>
<h2>Files</h2>
<ul>{links}</ul>
</body>
</html>
"""
