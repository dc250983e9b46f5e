"""`gpuyard usage`: report GPU usage and cost from a ledger file or the PostgreSQL ledger.

`--ledger FILE` reads a JSON-lines ledger; `--from` takes a file too, or a
`postgresql://` (or `postgres://`) connection URI, whose filters run in the database.
`--from postgresql://` alone connects with libpq's PG* environment variables.

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

import psycopg

from gpuyard.api.formats import parse_time
from gpuyard.io.ledger import LedgerCorruptError, read_ledger
from gpuyard.io.pgledger import ConnectionSource, SchemaError, is_dsn, read_usage
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
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ledger", type=Path, help="ledger file (JSON lines)")
    source.add_argument(
        "--from",
        dest="source",
        metavar="FILE|DSN",
        help="a ledger file, or the PostgreSQL ledger as postgresql://[user@]host[:port]/db "
        "(a password is better kept in PGPASSWORD or ~/.pgpass than on a command line)",
    )
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


def _read_file(path: Path, flt: ReportFilter) -> list[UsageRecord] | None:
    try:
        ledger = read_ledger(path)
    except (OSError, LedgerCorruptError) as exc:
        print(f"gpuyard usage: {exc}", file=sys.stderr)
        return None
    if ledger.torn_tail:
        print("gpuyard usage: ignored an incomplete last line (crash mid-write)", file=sys.stderr)
    _warn_conflicts(ledger.conflicts)
    return filter_records(ledger.records, flt)


def _read_database(dsn: str, flt: ReportFilter) -> list[UsageRecord] | None:
    try:
        stored = read_usage(ConnectionSource(dsn=dsn), flt)
    except (psycopg.Error, SchemaError) as exc:
        # psycopg's messages name the host and the user, never the password.
        print(f"gpuyard usage: PostgreSQL ledger: {exc}".rstrip(), file=sys.stderr)
        return None
    _warn_conflicts(stored.conflicts)
    return list(stored.records)


def _warn_conflicts(conflicts: Sequence[str]) -> None:
    if conflicts:
        print(
            f"gpuyard usage: {len(conflicts)} id(s) appear with different amounts; "
            f"the first copy was used: {', '.join(conflicts[:5])}",
            file=sys.stderr,
        )


def run_usage(args: argparse.Namespace) -> int:
    """Exit status 0 on success, 1 when the ledger cannot be read, 2 when a chart is asked
    for without the report extra."""
    if args.chart is not None and (missing := _chart_library_missing()) is not None:
        print(missing, file=sys.stderr)
        return MISSING_EXTRA
    flt = ReportFilter(args.namespace, args.service, args.pool, args.since, args.until)
    source: str | None = getattr(args, "source", None)
    if source is not None and is_dsn(source):
        records = _read_database(source, flt)
    else:
        records = _read_file(Path(source) if source is not None else args.ledger, flt)
    if records is None:
        return 1
    sys.stdout.write(_RENDERERS[args.format](summarize(records, args.group_by)))
    if args.chart is not None:
        write_chart(args.chart, records)
    return 0


def usage_command(argv: Sequence[str] | None = None) -> int:
    parser = configure_parser(argparse.ArgumentParser(prog="gpuyard usage", description=__doc__))
    args = parser.parse_args(argv)
    return run_usage(args)
