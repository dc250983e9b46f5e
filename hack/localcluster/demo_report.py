"""The demo's report: a chart of load, replicas and cost per service over the story, an
HTML page around it, and the check that the bill adds up.

Takes the snapshots the driver recorded, the story's verdicts and the ledger's records;
returns a matplotlib Figure (drawn by ``gpuyard.report.timeline``), HTML text and a
``BillingCheck``. Everything but the drawing is pure.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Final

from matplotlib.figure import Figure

from gpuyard.api.formats import format_decimal, parse_time
from gpuyard.logic.metering import UsageRecord
from gpuyard.report.figures import inline_svg
from gpuyard.report.timeline import Line, Panel, elapsed_label, timeline_figure
from localcluster.demo_story import Snapshot, Verdict

#: The demo's services keep their colours from one report to the next.
COLORS: Final = {"chat": "tab:blue", "embeddings": "tab:green", "finetune": "tab:orange"}
OTHER_COLORS: Final = ("tab:purple", "tab:red", "tab:brown")
TOTAL_COLOR: Final = "0.45"


def color_of(name: str, index: int) -> str:
    return COLORS.get(name, OTHER_COLORS[index % len(OTHER_COLORS)])


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


def report_panels(
    snapshots: Sequence[Snapshot],
    records: Sequence[UsageRecord],
    story_start: datetime,
    *,
    namespace: str,
    services: Sequence[str],
    currency: str = "USD",
) -> list[Panel]:
    """Load, ready replicas and cumulative cost, one line per service (and the total
    cost); each service is named namespace/name, its cost line with its final amount."""
    curves = cost_curves(records, story_start)
    finals = {name: points[-1][1] for name, points in curves.items()}

    def label(name: str) -> str:
        return f"{namespace}/{name}"

    return [
        Panel(
            "Load (GPU-% of demand)",
            [
                Line(
                    label(name), [(s.t, s.service(name).load) for s in snapshots], color_of(name, i)
                )
                for i, name in enumerate(services)
            ],
        ),
        Panel(
            "Ready replicas",
            [
                Line(
                    label(name),
                    [(s.t, float(s.service(name).ready)) for s in snapshots],
                    color_of(name, i),
                )
                for i, name in enumerate(services)
            ],
        ),
        Panel(
            f"Cumulative cost ({currency})",
            [
                *(
                    Line(
                        f"{label(name)} {finals.get(name, 0.0):.4f}",
                        curves.get(name, []),
                        color_of(name, i),
                    )
                    for i, name in enumerate(services)
                ),
                Line(f"total {finals.get('total', 0.0):.4f}", curves.get("total", []), TOTAL_COLOR),
            ],
        ),
    ]


def report_figure(
    snapshots: Sequence[Snapshot],
    records: Sequence[UsageRecord],
    story_start: datetime,
    phase_starts: Sequence[tuple[float, str]],
    *,
    namespace: str,
    services: Sequence[str],
    currency: str = "USD",
    title: str = "gpuyard demo",
) -> Figure:
    """Three panels over the story's time axis, the phases marked: 960 x 760 pixels."""
    panels = report_panels(
        snapshots, records, story_start, namespace=namespace, services=services, currency=currency
    )
    return timeline_figure(
        panels,
        title=title,
        phase_starts=phase_starts,
        xlabel="Time since the story began (m:ss)",
        width=960,
        height=760,
    )


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
    figure: Figure,
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
{inline_svg(figure)}
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
