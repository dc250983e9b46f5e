"""The PostgreSQL usage ledger: a `UsageSink` that keeps each record once, by its id.

`PostgresSink.emit` writes a batch in one transaction and returns after its COMMIT, so
the meter advances a mark only over records that are durable in the database. Records
are keyed by their deterministic id and never overwritten:

- a new id is inserted;
- an id already stored with the same billed fields (`UsageRecord.billing_fields`, which
  leave utilisation out, as the file ledger's reader does) is a *duplicate*: a re-emit
  after a restart or a retry, counted and otherwise ignored;
- an id already stored with different billed fields is a *conflict*: a bug, since ids
  are deterministic. The stored copy stays; the new copy is set aside in
  `gpuyard_usage_conflicts`, counted and logged as an error, and the batch is still
  acknowledged. Refusing it instead would hold the account's mark forever — the meter
  re-cuts the same record, with the same id, from the unchanged mark on every tick — and
  the other records behind it would never be billed. The file ledger behaves the same
  way (its reader keeps the first copy and reports the conflict).

A database that cannot be reached, or a statement that fails, rolls the transaction
back and raises `SinkUnavailableError`: nothing of the batch is committed, the marks
hold, and the meter sends the same records again on a later tick.

The schema is created and upgraded by `migrate`, an ordered list of SQL steps applied
under a transaction-level advisory lock, so that replicas starting together are safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from prometheus_client import Counter
from psycopg import sql

from gpuyard.logic.metering import UsageRecord, record_from_json, record_to_json
from gpuyard.logic.usage_report import ReportFilter

from .sinks import SinkConfigError, SinkUnavailableError

logger = logging.getLogger(__name__)

CONFLICTS_TABLE = "gpuyard_usage_conflicts"
#: pg_advisory_xact_lock key of migrations: the first 8 bytes of "gpuyard1" as an int64.
MIGRATION_LOCK_KEY = int.from_bytes(b"gpuyard1", "big", signed=True)
CONNECT_TIMEOUT_SECONDS = 5
#: A statement that runs longer fails the batch (retried later) instead of hanging the
#: account's delivery: 10,000 records take well under a second (bench/RESULTS.md).
STATEMENT_TIMEOUT_MS = 60_000
DSN_SCHEMES = ("postgresql://", "postgres://")

#: Schema steps; version N is MIGRATIONS[N - 1]. Append only: a released step never
#: changes, since databases that applied it will not apply it again.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE gpuyard_usage_records (
        id               text PRIMARY KEY,
        -- Insertion order: reports read records in the order they were first stored,
        -- as the file ledger's reader does.
        seq              bigint GENERATED ALWAYS AS IDENTITY UNIQUE,
        cluster_id       text NOT NULL,
        namespace        text NOT NULL,
        service          text NOT NULL,
        pool             text NOT NULL,
        gpu_type         text NOT NULL,
        pod              text NOT NULL,
        pod_uid          text NOT NULL,
        gpus             integer NOT NULL,
        window_start     timestamptz NOT NULL,
        window_end       timestamptz NOT NULL,
        seconds          integer NOT NULL,
        gpu_seconds      numeric NOT NULL,
        unit_price       numeric NOT NULL,
        cost             numeric NOT NULL,
        currency         text NOT NULL,
        avg_utilization  numeric,
        idle_gpu_seconds bigint,
        -- The record exactly as the meter emitted it (decimals as strings): what reports
        -- read and what a re-emitted copy is compared with.
        record           jsonb NOT NULL,
        stored_at        timestamptz NOT NULL DEFAULT now()
    );
    CREATE INDEX gpuyard_usage_records_namespace_service_start
        ON gpuyard_usage_records (namespace, service, window_start);
    CREATE INDEX gpuyard_usage_records_start ON gpuyard_usage_records (window_start);
    -- Copies of an id that arrived with other billed fields than the stored one.
    CREATE TABLE gpuyard_usage_conflicts (
        id         text NOT NULL,
        record     jsonb NOT NULL,
        digest     text NOT NULL,
        seen_at    timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (id, digest)
    );
    """,
    # The GPU-seconds of cold starts, as a column that dashboards can sum (0: none; rows
    # stored before it had none either, as their records carry no such field).
    """
    ALTER TABLE gpuyard_usage_records
        ADD COLUMN starting_gpu_seconds bigint NOT NULL DEFAULT 0;
    """,
    # The DRA devices behind a record's GPUs (driver, pool, device, uuid; docs/dra.md), so
    # that "who held GPU-<uuid> when" is one indexed query (`devices @> '[{"uuid": ...}]'`).
    # Rows stored before it, and GPUs of a device plugin, have none: an empty array.
    """
    ALTER TABLE gpuyard_usage_records
        ADD COLUMN devices jsonb NOT NULL DEFAULT '[]'::jsonb;
    CREATE INDEX gpuyard_usage_records_devices
        ON gpuyard_usage_records USING gin (devices jsonb_path_ops);
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)

# A batch is copied into a temporary table (COPY: the fastest way in, 10,000 rows in a
# fraction of a second), then inserted from there in one statement. The temporary table
# lives as long as the session; ON COMMIT DELETE ROWS empties it at each COMMIT, and IF NOT
# EXISTS makes it on whichever server session a pooler hands us. Its name changes with its
# columns (v2: starting_gpu_seconds, v3: devices), so a pooled session that an older
# gpuyard left its table in is no trap for a newer one.
_COLUMNS = (
    "id, cluster_id, namespace, service, pool, gpu_type, pod, pod_uid, gpus, window_start, "
    "window_end, seconds, gpu_seconds, unit_price, cost, currency, avg_utilization, "
    "idle_gpu_seconds, starting_gpu_seconds, devices, record"
)
_CREATE_INCOMING = """
    CREATE TEMPORARY TABLE IF NOT EXISTS gpuyard_incoming_v3 (
        id text, cluster_id text, namespace text, service text, pool text, gpu_type text,
        pod text, pod_uid text, gpus integer, window_start timestamptz,
        window_end timestamptz, seconds integer, gpu_seconds numeric, unit_price numeric,
        cost numeric, currency text, avg_utilization numeric, idle_gpu_seconds bigint,
        starting_gpu_seconds bigint, devices jsonb, record jsonb
    ) ON COMMIT DELETE ROWS
"""
_COPY_INCOMING = "COPY gpuyard_incoming_v3 (" + _COLUMNS + ") FROM STDIN"
_INSERT = """
    INSERT INTO gpuyard_usage_records (
        id, cluster_id, namespace, service, pool, gpu_type, pod, pod_uid, gpus,
        window_start, window_end, seconds, gpu_seconds, unit_price, cost, currency,
        avg_utilization, idle_gpu_seconds, starting_gpu_seconds, devices, record
    )
    SELECT
        id, cluster_id, namespace, service, pool, gpu_type, pod, pod_uid, gpus,
        window_start, window_end, seconds, gpu_seconds, unit_price, cost, currency,
        avg_utilization, idle_gpu_seconds, starting_gpu_seconds, devices, record
    FROM gpuyard_incoming_v3
    ON CONFLICT (id) DO NOTHING
    RETURNING id
"""
# The copies whose id is stored with other billed fields (UsageRecord.billing_fields),
# compared in the database: set aside, never written over the stored record. Every such
# copy is returned, a repeat of one set aside before too, so that each one is counted.
_SET_ASIDE_CONFLICTS = """
    WITH differing AS (
        SELECT i.id, i.record
        FROM gpuyard_incoming_v3 i JOIN gpuyard_usage_records r ON r.id = i.id
        WHERE (i.namespace, i.service, i.pool, i.pod_uid, i.gpus, i.window_start,
               i.window_end, i.gpu_seconds, i.unit_price, i.cost, i.currency)
              IS DISTINCT FROM
              (r.namespace, r.service, r.pool, r.pod_uid, r.gpus, r.window_start,
               r.window_end, r.gpu_seconds, r.unit_price, r.cost, r.currency)
    ), set_aside AS (
        INSERT INTO gpuyard_usage_conflicts (id, record, digest)
        SELECT id, record, md5(record::text) FROM differing
        ON CONFLICT DO NOTHING
    )
    SELECT id FROM differing
"""
_CREATE_VERSION_TABLE = """
    CREATE TABLE IF NOT EXISTS gpuyard_schema_version (
        version integer PRIMARY KEY,
        applied_at timestamptz NOT NULL DEFAULT now()
    )
"""
_STATEMENT_TIMEOUT = "SELECT set_config('statement_timeout', %s, true)"
_RECORD_VERSION = "INSERT INTO gpuyard_schema_version (version) VALUES (%s)"
_MAX_VERSION = "SELECT coalesce(max(version), 0) FROM gpuyard_schema_version"
_HAS_VERSION_TABLE = "SELECT to_regclass('gpuyard_schema_version') IS NOT NULL"


class SchemaError(RuntimeError):
    """The database's schema is not one this code can use."""


class SchemaTooNewError(SchemaError):
    """The database was migrated by a newer gpuyard than this one."""


def is_dsn(text: str) -> bool:
    """Whether `text` names a PostgreSQL database (a URI) rather than a ledger file."""
    return text.startswith(DSN_SCHEMES)


def redact_dsn(dsn: str) -> str:
    """The DSN without its password, for logs and errors (URI and key=value forms)."""
    if is_dsn(dsn):
        dsn = re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", dsn)
        return re.sub(r"([?&]password=)[^&]*", r"\1***", dsn)
    return re.sub(r"(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", r"\1***", dsn)


def read_dsn_file(path: Path) -> str:
    """The DSN a Secret's file holds (surrounding whitespace dropped)."""
    try:
        dsn = path.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError:
        raise SinkConfigError(f"{path}: not UTF-8 text") from None
    if not dsn:
        raise SinkConfigError(f"{path}: empty, expected a PostgreSQL connection string")
    return dsn


@dataclass(frozen=True)
class ConnectionSource:
    """Where a connection string comes from: given, in a file (read on every connect, so
    a rotated Secret is picked up at the next reconnect), or neither — then libpq's
    environment variables (PGHOST, PGUSER, PGPASSWORD, PGPASSFILE, PGSSLMODE, ...)."""

    dsn: str | None = None
    dsn_file: Path | None = None

    def __post_init__(self) -> None:
        if self.dsn is not None and self.dsn_file is not None:
            raise SinkConfigError("give a DSN or a DSN file, not both")

    def conninfo(self) -> str:
        if self.dsn is not None:
            return self.dsn
        if self.dsn_file is not None:
            return read_dsn_file(self.dsn_file)
        return ""  # libpq reads PG* variables for everything not given

    def describe(self) -> str:
        if self.dsn is not None:
            return redact_dsn(self.dsn)
        if self.dsn_file is not None:
            return f"the DSN in {self.dsn_file}"
        return "libpq's PG* environment"


_CONNECT_OPTIONS: dict[str, Any] = {
    "connect_timeout": CONNECT_TIMEOUT_SECONDS,
    "application_name": "gpuyard",
    # A server that vanishes without a FIN (a node lost) is noticed in about a minute
    # rather than at the kernel's two-hour default.
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
}


# --------------------------------------------------------------------------- migrations


@dataclass(frozen=True)
class MigrationResult:
    before: int
    after: int

    @property
    def applied(self) -> list[int]:
        return list(range(self.before + 1, self.after + 1))


async def migrate(
    conn: psycopg.AsyncConnection[Any], steps: Sequence[str] = MIGRATIONS
) -> MigrationResult:
    """Apply the steps the database lacks, in one transaction, and record their versions.

    The transaction-level advisory lock serialises concurrent migrations (two replicas
    starting at once): the second waits, then finds nothing left to do. Idempotent. A
    database at a version beyond `steps` raises `SchemaTooNewError` and is left as it is.
    """
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_KEY,))
        await conn.execute(_CREATE_VERSION_TABLE)
        before = await _version(conn)
        if before > len(steps):
            raise SchemaTooNewError(
                f"the database's usage ledger schema is version {before}; this gpuyard "
                f"knows versions up to {len(steps)}: upgrade gpuyard"
            )
        for version in range(before + 1, len(steps) + 1):
            await conn.execute(steps[version - 1].encode())
            await conn.execute(_RECORD_VERSION, (version,))
    return MigrationResult(before, len(steps))


async def _version(conn: psycopg.AsyncConnection[Any]) -> int:
    cursor = await conn.execute(_MAX_VERSION)
    row = await cursor.fetchone()
    return int(row[0]) if row else 0


async def schema_version(conn: psycopg.AsyncConnection[Any]) -> int:
    """The database's schema version; 0 when it was never migrated."""
    cursor = await conn.execute(_HAS_VERSION_TABLE)
    row = await cursor.fetchone()
    if not row or not row[0]:
        return 0
    return await _version(conn)


async def migrate_database(source: ConnectionSource) -> MigrationResult:
    """Connect, migrate, disconnect (operator start-up and `gpuyard db migrate`)."""
    async with await psycopg.AsyncConnection.connect(source.conninfo(), **_CONNECT_OPTIONS) as conn:
        return await migrate(conn)


# --------------------------------------------------------------------------- the sink


@dataclass
class EmitOutcome:
    """What the last emit did (for tests and logs)."""

    inserted: int = 0
    duplicates: int = 0
    conflicts: list[str] = field(default_factory=list)


def _rows(records: Sequence[UsageRecord]) -> Iterator[tuple[Any, ...]]:
    for record in records:
        yield (
            record.id, record.cluster_id, record.namespace, record.service, record.pool,
            record.gpu_type, record.pod, record.pod_uid, record.gpus, record.start,
            record.end, record.seconds, record.gpu_seconds, record.unit_price, record.cost,
            record.currency, record.avg_utilization, record.idle_gpu_seconds,
            record.starting_gpu_seconds,
            json.dumps([device.to_json() for device in record.devices], separators=(",", ":")),
            json.dumps(record_to_json(record), separators=(",", ":")),
        )  # fmt: skip


class PostgresSink:
    """Usage records into PostgreSQL, one transaction per emit, acknowledged at COMMIT.

    With `migrate`, every new connection first brings the schema up to date; without it,
    a schema of another version makes every emit fail (`SinkUnavailableError`) until
    `gpuyard db migrate` runs.

    One connection, opened on first use and again after it is lost; emits take turns on
    it (a COPY and one INSERT, plus for re-emitted ids one comparison in SQL). When a
    connection that had worked fails, the emit is tried once more on a new one at once: a
    server restart then costs no meter tick. A commit whose answer was lost may have
    happened; the retry then finds duplicates, which are no-ops.
    """

    def __init__(
        self,
        source: ConnectionSource,
        *,
        migrate: bool = False,
        duplicates: Counter | None = None,
        conflicts: Counter | None = None,
    ) -> None:
        self.source = source
        self.migrate = migrate
        self._duplicates = duplicates
        self._conflicts = conflicts
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._lock = asyncio.Lock()
        self.last = EmitOutcome()

    async def emit(self, records: Sequence[UsageRecord]) -> None:
        if not records:
            return
        async with self._lock:
            reused = self._conn is not None and not self._conn.closed
            try:
                outcome = await self._emit_on(await self._connection(), records)
            except psycopg.OperationalError as exc:
                await self._drop()
                if not reused:
                    raise SinkUnavailableError(self._unavailable(exc)) from exc
                try:
                    outcome = await self._emit_on(await self._connection(), records)
                except (psycopg.Error, OSError, SchemaError, SinkConfigError) as retry_exc:
                    await self._drop()
                    raise SinkUnavailableError(self._unavailable(retry_exc)) from retry_exc
            except (psycopg.Error, OSError, SchemaError, SinkConfigError) as exc:
                await self._drop()
                raise SinkUnavailableError(self._unavailable(exc)) from exc
            except asyncio.CancelledError:
                # Cut off mid-transaction: the connection's state is unknown, so it goes.
                await self._drop()
                raise
        self.last = outcome
        if self._duplicates is not None and outcome.duplicates:
            self._duplicates.inc(outcome.duplicates)
        if outcome.conflicts:
            if self._conflicts is not None:
                self._conflicts.inc(len(outcome.conflicts))
            logger.error(
                "usage ledger: %d record id(s) already stored with different billed fields; "
                "the stored copies were kept, the new ones set aside in %s: %s",
                len(outcome.conflicts), CONFLICTS_TABLE, ", ".join(outcome.conflicts[:10]),
            )  # fmt: skip

    def _unavailable(self, exc: BaseException) -> str:
        return f"PostgreSQL ledger ({self.source.describe()}): {type(exc).__name__}: {exc}"

    async def _connection(self) -> psycopg.AsyncConnection[Any]:
        if self._conn is not None and not self._conn.closed:
            return self._conn
        # The DSN file is read again on every connect: a rotated Secret takes effect here.
        conn = await psycopg.AsyncConnection.connect(
            self.source.conninfo(), autocommit=True, **_CONNECT_OPTIONS
        )
        try:
            if self.migrate:
                # Cheap when current (a lock and a max()); it covers a database that was
                # unreachable when the operator started.
                await migrate(conn)
            version = await schema_version(conn)
        except BaseException:
            await conn.close()
            raise
        if version != SCHEMA_VERSION:
            await conn.close()
            raise SchemaError(
                f"the usage ledger schema is version {version}, this gpuyard writes version "
                f"{SCHEMA_VERSION}: run `gpuyard db migrate` (or start with "
                "GPUYARD_USAGE_LEDGER_MIGRATE=true)"
            )
        self._conn = conn
        return conn

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error, OSError):  # it is gone either way
                await conn.close()

    async def _emit_on(
        self, conn: psycopg.AsyncConnection[Any], records: Sequence[UsageRecord]
    ) -> EmitOutcome:
        outcome = EmitOutcome()
        async with conn.transaction():
            await conn.execute(_STATEMENT_TIMEOUT, (str(STATEMENT_TIMEOUT_MS),))
            await conn.execute(_CREATE_INCOMING)
            async with conn.cursor().copy(_COPY_INCOMING) as copy:
                for row in _rows(records):
                    await copy.write_row(row)
            cursor = await conn.execute(_INSERT)
            inserted = {row[0] for row in await cursor.fetchall()}
            outcome.inserted = len(inserted)
            if outcome.inserted < len(records):
                # Ids stored before, or twice in this batch: duplicates unless they differ.
                cursor = await conn.execute(_SET_ASIDE_CONFLICTS)
                outcome.conflicts = [str(row[0]) for row in await cursor.fetchall()]
                outcome.duplicates = len(records) - outcome.inserted - len(outcome.conflicts)
        return outcome

    async def aclose(self) -> None:
        async with self._lock:
            await self._drop()


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True, slots=True)
class StoredUsage:
    records: tuple[UsageRecord, ...]
    """The records the filter selects, in the order they were first stored."""
    conflicts: tuple[str, ...] = ()
    """Ids of those records that were also emitted with different billed fields."""


def _where(flt: ReportFilter) -> tuple[sql.Composable, list[Any]]:
    """The filter as a WHERE clause on `r` (the records table) and its parameters."""
    clauses: list[sql.Composable] = []
    params: list[Any] = []
    for column, value in (
        ("namespace", flt.namespace), ("service", flt.service), ("pool", flt.pool),
    ):  # fmt: skip
        if value is not None:
            clauses.append(sql.SQL("r.{} = %s").format(sql.Identifier(column)))
            params.append(value)
    if flt.since is not None:
        clauses.append(sql.SQL("r.window_start >= %s"))
        params.append(flt.since)
    if flt.until is not None:
        clauses.append(sql.SQL("r.window_start < %s"))
        params.append(flt.until)
    if not clauses:
        return sql.SQL(""), params
    return sql.SQL(" WHERE ") + sql.SQL(" AND ").join(clauses), params


def read_usage(source: ConnectionSource, flt: ReportFilter) -> StoredUsage:
    """The records a report covers, filtered in the database (`gpuyard usage --from`).

    Raises psycopg.Error (unreachable, no such table) and SchemaError (a schema this
    gpuyard does not know)."""
    where, params = _where(flt)
    records_query = sql.SQL("SELECT r.record FROM gpuyard_usage_records r{} ORDER BY r.seq").format(
        where
    )
    conflicts_query = sql.SQL(
        "SELECT DISTINCT c.id FROM gpuyard_usage_conflicts c "
        "JOIN gpuyard_usage_records r ON r.id = c.id{} ORDER BY c.id"
    ).format(where)
    with psycopg.connect(source.conninfo(), **_CONNECT_OPTIONS) as conn:
        conn.read_only = True
        version = _sync_version(conn)
        if version == 0:
            raise SchemaError("the database holds no usage ledger (never migrated)")
        if version > SCHEMA_VERSION:
            raise SchemaTooNewError(
                f"the usage ledger schema is version {version}; this gpuyard reads versions "
                f"up to {SCHEMA_VERSION}: upgrade gpuyard"
            )
        with conn.cursor() as cursor:
            cursor.execute(records_query, params)
            records = tuple(record_from_json(row[0]) for row in cursor)
            cursor.execute(conflicts_query, params)
            conflicts = tuple(str(row[0]) for row in cursor)
    return StoredUsage(records, conflicts)


def _sync_version(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute(_HAS_VERSION_TABLE).fetchone()
    if not row or not row[0]:
        return 0
    row = conn.execute(_MAX_VERSION).fetchone()
    return int(row[0]) if row else 0


def stored_ids(source: ConnectionSource) -> list[str]:
    """Every stored id (tests and the bench count with it)."""
    with psycopg.connect(source.conninfo(), **_CONNECT_OPTIONS) as conn:
        return [str(row[0]) for row in conn.execute("SELECT id FROM gpuyard_usage_records")]
