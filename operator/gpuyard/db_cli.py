"""`gpuyard db migrate`: create or upgrade the PostgreSQL usage ledger's tables.

The operator does the same at start-up unless GPUYARD_USAGE_LEDGER_MIGRATE=false; run this
where the operator's database role may not change the schema (a migration job with a
role that may). Safe to run while operators run, and from several places at once: the
steps are applied under an advisory lock, in one transaction.

The database comes from --dsn, from --dsn-file (a file holding the DSN, as mounted from
a Secret), or otherwise from libpq's environment (PGHOST, PGUSER, PGPASSWORD, ...).

Exit status: 0 when the schema is current (whether or not steps were applied), 1 when
the database cannot be reached or a step fails (nothing is applied then), 2 for a usage
error, 3 when the database's schema is newer than this gpuyard knows.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

import psycopg

from gpuyard.io.pgledger import (
    ConnectionSource,
    SchemaTooNewError,
    migrate_database,
)
from gpuyard.io.sinks import SinkConfigError

#: Exit status when the database was migrated by a newer gpuyard.
SCHEMA_TOO_NEW = 3


def add_db_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `db` (with its `migrate` command) on the main parser's subparsers."""
    db: argparse.ArgumentParser = subparsers.add_parser(
        "db",
        help="manage the PostgreSQL usage ledger's schema",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = db.add_subparsers(dest="db_command", required=True, metavar="COMMAND")
    migrate = commands.add_parser(
        "migrate",
        help="apply the schema steps the database lacks; print the versions applied",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    where = migrate.add_mutually_exclusive_group()
    where.add_argument("--dsn", help="postgresql://user@host:port/database")
    where.add_argument("--dsn-file", type=Path, help="a file holding the DSN (from a Secret)")
    migrate.set_defaults(func=run_migrate)
    return db


def run_migrate(args: argparse.Namespace) -> int:
    try:
        source = ConnectionSource(dsn=args.dsn, dsn_file=args.dsn_file)
        result = asyncio.run(migrate_database(source))
    except SchemaTooNewError as exc:
        print(f"gpuyard db migrate: {exc}", file=sys.stderr)
        return SCHEMA_TOO_NEW
    except (psycopg.Error, OSError, SinkConfigError) as exc:
        print(f"gpuyard db migrate: {exc}".rstrip(), file=sys.stderr)
        return 1
    if result.applied:
        applied = ", ".join(str(version) for version in result.applied)
        print(f"applied schema version(s) {applied}; the schema is at version {result.after}")
    else:
        print(f"nothing to apply; the schema is at version {result.after} (current)")
    return 0
