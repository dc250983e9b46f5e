"""`gpuyard usage`: report GPU usage and cost from a ledger file.

Plug into the main CLI with `add_usage_parser(subparsers)` (it sets `func=run_usage`),
or run standalone through `usage_command(argv)`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gpuyard.api.formats import parse_time
from gpuyard.io.ledger import LedgerCorruptError, read_ledger
from gpuyard.logic.metering import MeteringError
from gpuyard.logic.usage_report import (
    DEFAULT_GROUP_BY,
    GROUP_FIELDS,
    ReportFilter,
    chart_model,
    filter_records,
    parse_group_by,
    render_csv,
    render_html,
    render_json,
    render_png,
    render_table,
    summarize,
)

_RENDERERS = {"table": render_table, "csv": render_csv, "json": render_json}


def _time_arg(text: str) -> datetime:
    """RFC 3339 (`2024-05-01T12:00:00Z`) or a UTC day (`2024-05-01`)."""
    try:
        if len(text) == len("YYYY-MM-DD"):
            return datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=UTC)
        return parse_time(text)
    except (ValueError, MeteringError) as exc:
        raise argparse.ArgumentTypeError(f"not a UTC day or RFC 3339 time: {text!r}") from exc


def _group_by_arg(text: str) -> tuple[str, ...]:
    try:
        return parse_group_by(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def configure_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--ledger", required=True, type=Path, help="ledger file (JSON lines)")
    parser.add_argument("--namespace", help="only this namespace")
    parser.add_argument("--service", help="only this AIService")
    parser.add_argument("--pool", help="only this GPUPool")
    parser.add_argument(
        "--since", type=_time_arg, help="windows starting at or after (UTC day or RFC 3339)"
    )
    parser.add_argument("--until", type=_time_arg, help="windows starting before (exclusive)")
    parser.add_argument(
        "--group-by",
        type=_group_by_arg,
        default=DEFAULT_GROUP_BY,
        help=f"comma-separated, from {','.join(GROUP_FIELDS)} (default: namespace,service)",
    )
    parser.add_argument("--format", choices=sorted(_RENDERERS), default="table")
    parser.add_argument(
        "--chart", type=Path, help="also write a chart: .png for an image, otherwise HTML"
    )
    parser.set_defaults(func=run_usage)
    return parser


def add_usage_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `usage` on the `add_subparsers()` object of the main `gpuyard` parser."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "usage",
        help="report GPU usage and cost from a ledger",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return configure_parser(parser)


def run_usage(args: argparse.Namespace) -> int:
    """Exit status 0 on success, 1 when the ledger cannot be read."""
    try:
        ledger = read_ledger(args.ledger)
    except (OSError, LedgerCorruptError) as exc:
        print(f"gpuyard usage: {exc}", file=sys.stderr)
        return 1
    if ledger.torn_tail:
        print("gpuyard usage: ignored an incomplete last line (crash mid-write)", file=sys.stderr)
    if ledger.conflicts:
        print(
            f"gpuyard usage: {len(ledger.conflicts)} id(s) appear with different amounts; "
            f"the first copy was used: {', '.join(ledger.conflicts[:5])}",
            file=sys.stderr,
        )
    flt = ReportFilter(args.namespace, args.service, args.pool, args.since, args.until)
    records = filter_records(ledger.records, flt)
    sys.stdout.write(_RENDERERS[args.format](summarize(records, args.group_by)))
    if args.chart is not None:
        if args.chart.suffix.lower() == ".png":
            args.chart.write_bytes(render_png(chart_model(records, title="GPU usage")))
        else:
            args.chart.write_text(render_html(records), encoding="utf-8")
    return 0


def usage_command(argv: Sequence[str] | None = None) -> int:
    parser = configure_parser(argparse.ArgumentParser(prog="gpuyard usage", description=__doc__))
    args = parser.parse_args(argv)
    return run_usage(args)
