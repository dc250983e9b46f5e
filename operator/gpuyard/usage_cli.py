"""`gpuyard usage`: report GPU usage and cost from a ledger file.

Plug into the main CLI with `add_usage_parser(subparsers)` (it sets `func=run_usage`),
or run standalone through `usage_command(argv)`.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gpuyard.api.formats import parse_time
from gpuyard.io.ledger import LedgerCorruptError, read_ledger
from gpuyard.logic.metering import MeteringError, UsageRecord
from gpuyard.logic.usage_report import (
    DEFAULT_GROUP_BY,
    GROUP_FIELDS,
    ReportFilter,
    filter_records,
    parse_group_by,
    render_csv,
    render_json,
    render_table,
    summarize,
)

_RENDERERS = {"table": render_table, "csv": render_csv, "json": render_json}
#: Exit status for a chart asked for without the plotting extra installed.
MISSING_EXTRA = 2


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
        "--chart",
        type=Path,
        help="also write a chart: .png or .svg for an image, otherwise an HTML page "
        "(needs the report extra: pip install 'gpuyard[report]')",
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


def _chart_library_missing() -> str | None:
    """Why no chart can be drawn here, or None. The operator image leaves the plotting
    library out, so this is checked before the ledger is read, not hit mid-way."""
    if importlib.util.find_spec("matplotlib") is None:
        return (
            "gpuyard usage: --chart needs matplotlib, which is not installed; "
            "install the report extra: pip install 'gpuyard[report]'"
        )
    return None


def write_chart(path: Path, records: Sequence[UsageRecord]) -> None:
    """The chart in the format its suffix names: .png, .svg, otherwise an HTML page."""
    from gpuyard.report import figures, usage  # noqa: PLC0415 - the optional extra

    suffix = path.suffix.lower()
    if suffix == ".png":
        path.write_bytes(figures.png_bytes(usage.usage_figure(records, title="GPU usage")))
    elif suffix == ".svg":
        path.write_text(
            figures.svg_text(usage.usage_figure(records, title="GPU usage")), encoding="utf-8"
        )
    else:
        path.write_text(usage.render_html(records), encoding="utf-8")


def run_usage(args: argparse.Namespace) -> int:
    """Exit status 0 on success, 1 when the ledger cannot be read, 2 when a chart is asked
    for without the report extra."""
    if args.chart is not None and (missing := _chart_library_missing()) is not None:
        print(missing, file=sys.stderr)
        return MISSING_EXTRA
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
        write_chart(args.chart, records)
    return 0


def usage_command(argv: Sequence[str] | None = None) -> int:
    parser = configure_parser(argparse.ArgumentParser(prog="gpuyard usage", description=__doc__))
    args = parser.parse_args(argv)
    return run_usage(args)
