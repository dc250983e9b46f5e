"""The PostgreSQL usage ledger against a real PostgreSQL (tests/unit/conftest.py): inserts,
duplicates and conflicts, a server that goes away and comes back, migrations, a
10,000-record batch, and `gpuyard usage --from` against `--ledger` on the same records."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
from pydantic import ValidationError

from gpuyard.cli import build_parser, main
from gpuyard.config import Settings
from gpuyard.handlers.runtime import build_sinks, migrate_at_start, postgres_source
from gpuyard.io.metrics import OperatorMetrics
from gpuyard.io.pgledger import (
    MIGRATIONS,
    SCHEMA_VERSION,
    ConnectionSource,
    PostgresSink,
    SchemaError,
    SchemaTooNewError,
    migrate,
    migrate_database,
    read_usage,
    redact_dsn,
    schema_version,
    stored_ids,
)
from gpuyard.io.sinks import LedgerFileSink, SinkUnavailableError
from gpuyard.logic.claimed_devices import HeldDevice
from gpuyard.logic.metering import UsageRecord
from gpuyard.logic.usage_report import ReportFilter
from gpuyard.usage_cli import usage_command
from localcluster import postgres
from record_support import T0, pod_records


def mixed_records() -> list[UsageRecord]:
    """Two namespaces, three services, two pools, unmanaged usage, across midnight."""
    return [
        *pod_records(uid="a1", gpus=2),
        *pod_records(uid="a2", service="embed", pool="l4", price="0.80", minutes=30),
        *pod_records(uid="b1", namespace="team-b", service="llm", minutes=200),
        *pod_records(uid="u1", namespace="team-b", service="", minutes=45),
    ]


def count(dsn: str, table: str = "gpuyard_usage_records") -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
        return int(row[0]) if row else -1


def sample(metrics: OperatorMetrics, name: str) -> float:
    return metrics.registry.get_sample_value(name) or 0.0


def sink_for(dsn: str, metrics: OperatorMetrics | None = None, **kwargs: Any) -> PostgresSink:
    metrics = metrics or OperatorMetrics()
    return PostgresSink(
        ConnectionSource(dsn=dsn),
        duplicates=metrics.ledger_duplicates,
        conflicts=metrics.ledger_conflicts,
        **kwargs,
    )


async def emit_all(sink: PostgresSink, *batches: list[UsageRecord]) -> None:
    try:
        for batch in batches:
            await sink.emit(batch)
    finally:
        await sink.aclose()


# --------------------------------------------------------------------------- writing


def test_records_are_stored_once_and_read_back_exactly(pg_dsn: str) -> None:
    records = mixed_records()
    metrics = OperatorMetrics()

    asyncio.run(emit_all(sink_for(pg_dsn, metrics, migrate=True), records))

    stored = read_usage(ConnectionSource(dsn=pg_dsn), ReportFilter())
    assert list(stored.records) == records
    assert stored.conflicts == ()
    assert sample(metrics, "gpuyard_ledger_duplicates_total") == 0


def test_an_identical_copy_is_a_counted_no_op(pg_dsn: str) -> None:
    records = pod_records(uid="a1")
    metrics = OperatorMetrics()
    # Utilisation is not a billed field: a retry may have it where the first try had not.
    with_util = [replace(records[0], avg_utilization=Decimal("42.5"), idle_gpu_seconds=30)]

    asyncio.run(emit_all(sink_for(pg_dsn, metrics, migrate=True), records, records, with_util))

    assert count(pg_dsn) == len(records)
    assert sample(metrics, "gpuyard_ledger_duplicates_total") == len(records) + 1
    assert sample(metrics, "gpuyard_ledger_conflicts_total") == 0
    assert read_usage(ConnectionSource(dsn=pg_dsn), ReportFilter()).records[0] == records[0]


def test_starting_gpu_seconds_are_a_column_and_survive_the_round_trip(pg_dsn: str) -> None:
    cold = [replace(r, starting_gpu_seconds=40) for r in pod_records(uid="c1", minutes=1)]
    warm = pod_records(uid="w1", minutes=1)
    asyncio.run(emit_all(sink_for(pg_dsn, OperatorMetrics(), migrate=True), cold + warm))

    with psycopg.connect(pg_dsn) as conn:
        rows = conn.execute(
            "SELECT pod_uid, starting_gpu_seconds FROM gpuyard_usage_records ORDER BY pod_uid"
        ).fetchall()
    assert rows == [("c1", 40), ("w1", 0)]
    stored = read_usage(ConnectionSource(dsn=pg_dsn), ReportFilter()).records
    assert sorted(stored, key=lambda r: r.pod_uid) == cold + warm


def test_dra_devices_are_a_queryable_column_and_survive_the_round_trip(pg_dsn: str) -> None:
    gpu = HeldDevice("gpu.nvidia.com", "h100-0", "gpu-1", "GPU-5f2c")
    dra = [replace(r, devices=(gpu,)) for r in pod_records(uid="d1", minutes=1)]
    plugin = pod_records(uid="p1", minutes=1)
    asyncio.run(emit_all(sink_for(pg_dsn, OperatorMetrics(), migrate=True), dra + plugin))

    with psycopg.connect(pg_dsn) as conn:
        rows = conn.execute(
            "SELECT pod_uid FROM gpuyard_usage_records WHERE devices @> %s::jsonb",
            ('[{"uuid": "GPU-5f2c"}]',),
        ).fetchall()
        empty = conn.execute(
            "SELECT count(*) FROM gpuyard_usage_records WHERE devices = '[]'::jsonb"
        ).fetchone()
    assert rows == [("d1",)] * len(dra)
    assert empty == (len(plugin),)
    stored = read_usage(ConnectionSource(dsn=pg_dsn), ReportFilter()).records
    assert sorted(stored, key=lambda r: r.pod_uid) == dra + plugin


def test_copies_within_one_batch_are_stored_once(pg_dsn: str) -> None:
    records = pod_records(uid="a1", minutes=3)
    metrics = OperatorMetrics()

    asyncio.run(emit_all(sink_for(pg_dsn, metrics, migrate=True), [*records, *records]))

    assert count(pg_dsn) == 3
    assert sample(metrics, "gpuyard_ledger_duplicates_total") == 3


def test_a_different_copy_is_a_conflict_that_never_overwrites(
    pg_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    records = pod_records(uid="a1", minutes=5)
    metrics = OperatorMetrics()
    changed = replace(records[2], cost=records[2].cost + 1, gpu_seconds=records[2].gpu_seconds + 1)
    fresh = pod_records(uid="a2", minutes=5)

    # The batch with the conflicting copy is acknowledged: its other records are stored,
    # and the meter's mark may move on.
    asyncio.run(emit_all(sink_for(pg_dsn, metrics, migrate=True), records, [changed, *fresh]))

    stored = read_usage(ConnectionSource(dsn=pg_dsn), ReportFilter())
    assert list(stored.records) == [*records, *fresh]
    assert stored.conflicts == (changed.id,)
    assert sample(metrics, "gpuyard_ledger_conflicts_total") == 1
    assert count(pg_dsn, "gpuyard_usage_conflicts") == 1
    assert any(r.levelname == "ERROR" and changed.id in r.getMessage() for r in caplog.records)


def test_a_batch_of_ten_thousand_records_goes_in_one_emit(pg_dsn: str) -> None:
    records = [r for pod in range(100) for r in pod_records(uid=f"p{pod}", minutes=100)]
    assert len(records) == 10_000
    metrics = OperatorMetrics()
    sink = sink_for(pg_dsn, metrics, migrate=True)

    async def scenario() -> tuple[float, float]:
        try:
            started = time.monotonic()
            await sink.emit(records)
            first = time.monotonic() - started
            started = time.monotonic()
            await sink.emit(records)  # all duplicates: read back and compared
            return first, time.monotonic() - started
        finally:
            await sink.aclose()

    first, again = asyncio.run(scenario())

    assert count(pg_dsn) == 10_000
    assert sample(metrics, "gpuyard_ledger_duplicates_total") == 10_000
    print(f"10,000 records: {first:.2f}s new, {again:.2f}s as duplicates")


# --------------------------------------------------------------------------- failures


def test_a_stopped_server_fails_the_emit_then_a_restart_takes_it(
    pg_dsn: str, pg_server: postgres.PostgresServer
) -> None:
    first, second = pod_records(uid="a1", minutes=3), pod_records(uid="a2", minutes=4)
    sink = sink_for(pg_dsn, migrate=True)

    async def scenario() -> tuple[int, SinkUnavailableError]:
        try:
            await sink.emit(first)
            await asyncio.to_thread(postgres.stop, pg_server)
            started = time.monotonic()
            with pytest.raises(SinkUnavailableError) as failure:
                await sink.emit(second)
            assert time.monotonic() - started < 15  # a refused connection fails fast
            await asyncio.to_thread(postgres.start, pg_server)
            stored_while_down = await asyncio.to_thread(count, pg_dsn)
            await sink.emit(second)  # the same sink reconnects
            return stored_while_down, failure.value
        finally:
            await sink.aclose()

    stored_while_down, failure = asyncio.run(scenario())

    assert stored_while_down == 3  # nothing of the failed batch was committed
    assert count(pg_dsn) == 7
    assert "PostgreSQL ledger" in str(failure)


def test_a_server_restart_between_emits_costs_no_failure(
    pg_dsn: str, pg_server: postgres.PostgresServer
) -> None:
    sink = sink_for(pg_dsn, migrate=True)

    async def scenario() -> None:
        try:
            await sink.emit(pod_records(uid="a1", minutes=2))
            await asyncio.to_thread(postgres.stop, pg_server)
            await asyncio.to_thread(postgres.start, pg_server)
            # The old connection is dead; the emit retries once on a new one.
            await sink.emit(pod_records(uid="a2", minutes=2))
        finally:
            await sink.aclose()

    asyncio.run(scenario())

    assert count(pg_dsn) == 4


def test_an_unreachable_database_is_unavailable_and_its_password_stays_out(
    pg_server: postgres.PostgresServer,
) -> None:
    # A port nothing listens on (the server's, while it is stopped).
    postgres.stop(pg_server)
    try:
        dsn = f"postgresql://gpuyard:s3cret-pw@127.0.0.1:{pg_server.port}/gpuyard"
        sink = PostgresSink(ConnectionSource(dsn=dsn))
        with pytest.raises(SinkUnavailableError) as failure:
            asyncio.run(emit_all(sink, pod_records(uid="a1", minutes=1)))
    finally:
        postgres.start(pg_server)

    assert "s3cret-pw" not in str(failure.value)
    assert redact_dsn(dsn) == f"postgresql://gpuyard:***@127.0.0.1:{pg_server.port}/gpuyard"
    assert redact_dsn("host=db password='a b' user=x") == "host=db password=*** user=x"
    assert redact_dsn("postgresql://db/x?password=pw&sslmode=require") == (
        "postgresql://db/x?password=***&sslmode=require"
    )


def test_the_dsn_file_is_read_again_at_each_connect(
    pg_dsn: str, pg_server: postgres.PostgresServer, tmp_path: Path
) -> None:
    dsn_file = tmp_path / "dsn"
    dsn_file.write_text(pg_dsn.replace(f":{pg_server.port}/", ":1/") + "\n")
    sink = PostgresSink(ConnectionSource(dsn_file=dsn_file), migrate=True)

    async def scenario() -> None:
        try:
            with pytest.raises(SinkUnavailableError):
                await sink.emit(pod_records(uid="a1", minutes=2))
            dsn_file.write_text(pg_dsn + "\n")  # the Secret is fixed (rotated)
            await sink.emit(pod_records(uid="a1", minutes=2))
        finally:
            await sink.aclose()

    asyncio.run(scenario())

    assert count(pg_dsn) == 2


def test_without_migration_an_empty_database_is_refused_until_migrated(pg_dsn: str) -> None:
    sink = sink_for(pg_dsn, migrate=False)

    async def scenario() -> None:
        try:
            with pytest.raises(SinkUnavailableError, match="gpuyard db migrate"):
                await sink.emit(pod_records(uid="a1", minutes=2))
            await migrate_database(ConnectionSource(dsn=pg_dsn))
            await sink.emit(pod_records(uid="a1", minutes=2))
        finally:
            await sink.aclose()

    asyncio.run(scenario())

    assert stored_ids(ConnectionSource(dsn=pg_dsn)) == [
        r.id for r in pod_records(uid="a1", minutes=2)
    ]


# --------------------------------------------------------------------------- migrations


def test_migrations_are_idempotent(pg_dsn: str) -> None:
    source = ConnectionSource(dsn=pg_dsn)

    first = asyncio.run(migrate_database(source))
    second = asyncio.run(migrate_database(source))

    assert first.applied == list(range(1, SCHEMA_VERSION + 1))
    assert second.applied == []
    with psycopg.connect(pg_dsn) as conn:
        versions = [row[0] for row in conn.execute("SELECT version FROM gpuyard_schema_version")]
    assert versions == list(range(1, len(MIGRATIONS) + 1))


def test_two_connections_migrating_at_once_apply_each_step_once(pg_dsn: str) -> None:
    # A slow first step: without the lock, the second migration would start it too and
    # fail on the table the first one is creating.
    steps = ("SELECT pg_sleep(0.5); CREATE TABLE probe (x int)", "ALTER TABLE probe ADD y int")

    async def one() -> list[int]:
        async with await psycopg.AsyncConnection.connect(pg_dsn) as conn:
            return (await migrate(conn, steps)).applied

    async def both() -> list[list[int]]:
        return list(await asyncio.gather(one(), one()))

    results = asyncio.run(both())

    assert sorted(results) == [[], [1, 2]]
    with psycopg.connect(pg_dsn) as conn:
        versions = [row[0] for row in conn.execute("SELECT version FROM gpuyard_schema_version")]
        columns = conn.execute("SELECT count(*) FROM information_schema.columns "
                               "WHERE table_name = 'probe'").fetchone()  # fmt: skip
    assert versions == [1, 2]
    assert columns == (2,)


def test_a_newer_schema_is_refused_and_left_alone(pg_dsn: str) -> None:
    source = ConnectionSource(dsn=pg_dsn)
    asyncio.run(migrate_database(source))
    with psycopg.connect(pg_dsn) as conn:
        conn.execute("INSERT INTO gpuyard_schema_version (version) VALUES (%s)", (99,))

    with pytest.raises(SchemaTooNewError, match="version 99"):
        asyncio.run(migrate_database(source))
    with pytest.raises(SinkUnavailableError, match="version 99"):
        asyncio.run(emit_all(sink_for(pg_dsn, migrate=True), pod_records(uid="a", minutes=1)))
    with pytest.raises(SchemaTooNewError):
        read_usage(source, ReportFilter())

    async def version() -> int:
        async with await psycopg.AsyncConnection.connect(pg_dsn) as conn:
            return await schema_version(conn)

    assert asyncio.run(version()) == 99


def test_db_migrate_command_prints_versions_and_exit_codes(
    pg_dsn: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dsn_file = tmp_path / "dsn"
    dsn_file.write_text(pg_dsn)

    assert main(["db", "migrate", "--dsn", pg_dsn]) == 0
    every = ", ".join(str(v) for v in range(1, SCHEMA_VERSION + 1))
    assert f"applied schema version(s) {every};" in capsys.readouterr().out
    assert main(["db", "migrate", "--dsn-file", str(dsn_file)]) == 0
    assert f"nothing to apply; the schema is at version {SCHEMA_VERSION}" in (
        capsys.readouterr().out
    )

    with psycopg.connect(pg_dsn) as conn:
        conn.execute("INSERT INTO gpuyard_schema_version (version) VALUES (7)")
    assert main(["db", "migrate", "--dsn", pg_dsn]) == 3
    assert "upgrade gpuyard" in capsys.readouterr().err
    assert main(["db", "migrate", "--dsn", "postgresql://nobody@127.0.0.1:1/x"]) == 1
    assert main(["db", "migrate", "--dsn-file", str(tmp_path / "missing")]) == 1


def test_db_migrate_uses_libpq_environment_by_default(
    pg_dsn: str, pg_server: postgres.PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PGHOST", "127.0.0.1")
    monkeypatch.setenv("PGPORT", str(pg_server.port))
    monkeypatch.setenv("PGUSER", postgres.SUPERUSER)
    monkeypatch.setenv("PGDATABASE", pg_dsn.rsplit("/", 1)[1])

    assert main(["db", "migrate"]) == 0
    assert count(pg_dsn, "gpuyard_schema_version") == SCHEMA_VERSION


# --------------------------------------------------------------------------- the operator


def test_the_operator_migrates_at_start_and_adds_the_postgres_sink(
    pg_dsn: str, tmp_path: Path
) -> None:
    dsn_file = tmp_path / "dsn"
    dsn_file.write_text(pg_dsn)
    config = Settings(usage_ledger_dsn_file=dsn_file, usage_stdout=False)
    metrics = OperatorMetrics()

    asyncio.run(migrate_at_start(config))
    sinks = build_sinks(config, metrics)
    conflicting = replace(pod_records(uid="a", minutes=1)[0], cost=Decimal(9))
    sink = sinks.sinks["postgres"]
    assert isinstance(sink, PostgresSink)
    asyncio.run(emit_all(sink, pod_records(uid="a", minutes=1), [conflicting]))

    assert sorted(sinks.sinks) == ["postgres", "prometheus"]
    assert count(pg_dsn, "gpuyard_schema_version") == SCHEMA_VERSION
    assert sample(metrics, "gpuyard_ledger_conflicts_total") == 1


def test_a_database_down_at_start_does_not_stop_the_operator(
    pg_server: postgres.PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    config = Settings(usage_ledger_postgres_env=True)
    postgres.stop(pg_server)
    try:
        with pytest.MonkeyPatch.context() as env:
            env.setenv("PGHOST", "127.0.0.1")
            env.setenv("PGPORT", str(pg_server.port))
            asyncio.run(migrate_at_start(config))  # logs, does not raise
    finally:
        postgres.start(pg_server)
    assert any("migration at start-up failed" in r.getMessage() for r in caplog.records)


def test_ledger_settings() -> None:
    assert Settings().usage_postgres_enabled is False
    assert Settings().usage_ledger_migrate is True
    assert postgres_source(Settings()) is None
    assert postgres_source(Settings(usage_ledger_postgres_env=True)) == ConnectionSource()
    assert postgres_source(Settings(usage_ledger_dsn_file=Path("/s/dsn"))) == ConnectionSource(
        dsn_file=Path("/s/dsn")
    )
    # A file ledger and PostgreSQL together: two sinks.
    both = Settings(usage_ledger=Path("/l/u.jsonl"), usage_ledger_postgres_env=True)
    assert sorted(build_sinks(both, OperatorMetrics()).sinks) == [
        "ledger", "postgres", "prometheus", "stdout",
    ]  # fmt: skip
    with pytest.raises(ValidationError, match="not both"):
        Settings(usage_ledger_dsn_file=Path("/s/dsn"), usage_ledger_postgres_env=True)


def test_ledger_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUYARD_USAGE_LEDGER_DSN_FILE", "/etc/gpuyard/postgres/dsn")
    monkeypatch.setenv("GPUYARD_USAGE_LEDGER_MIGRATE", "false")
    settings = Settings()
    assert settings.usage_ledger_dsn_file == Path("/etc/gpuyard/postgres/dsn")
    assert settings.usage_ledger_migrate is False
    assert settings.usage_postgres_enabled


def test_an_empty_dsn_file_is_unavailable_not_a_crash(tmp_path: Path) -> None:
    (tmp_path / "dsn").write_text("\n")
    sink = PostgresSink(ConnectionSource(dsn_file=tmp_path / "dsn"))
    with pytest.raises(SinkUnavailableError, match="empty"):
        asyncio.run(emit_all(sink, pod_records(uid="a", minutes=1)))


# --------------------------------------------------------------------------- reports


@pytest.fixture
def both_ledgers(pg_dsn: str, tmp_path: Path) -> tuple[Path, str]:
    """The same records, with repeats, in a ledger file and in PostgreSQL."""
    records = mixed_records()
    path = tmp_path / "usage.jsonl"

    async def write() -> None:
        await emit_all(sink_for(pg_dsn, migrate=True), records, records[:10])
        ledger = LedgerFileSink(path)
        await ledger.emit(records)
        await ledger.emit(records[:10])
        await ledger.aclose()

    asyncio.run(write())
    return path, pg_dsn


FILTERS = [
    [],
    ["--namespace", "team-b"],
    ["--service", "llm"],
    ["--namespace", "team-a", "--service", "embed"],
    ["--pool", "l4"],
    ["--since", "2024-05-02"],
    ["--until", "2024-05-02T00:30:00Z"],
    ["--since", "2024-05-01T23:30:00Z", "--until", "2024-05-02", "--group-by", "pool,day"],
    ["--namespace", "x' OR '1'='1"],  # a value, never SQL
]


@pytest.mark.parametrize("fmt", ["table", "csv", "json"])
@pytest.mark.parametrize("filters", FILTERS, ids=lambda f: " ".join(f) or "all")
def test_usage_from_postgres_equals_usage_from_the_ledger_file(
    both_ledgers: tuple[Path, str],
    fmt: str,
    filters: list[str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    path, dsn = both_ledgers
    assert usage_command(["--ledger", str(path), "--format", fmt, *filters]) == 0
    from_file = capsys.readouterr().out
    assert usage_command(["--from", dsn, "--format", fmt, *filters]) == 0
    from_database = capsys.readouterr().out
    assert usage_command(["--from", str(path), "--format", fmt, *filters]) == 0

    assert from_database == from_file
    assert capsys.readouterr().out == from_file


def test_usage_from_postgres_draws_the_same_chart(
    both_ledgers: tuple[Path, str], tmp_path: Path
) -> None:
    path, dsn = both_ledgers
    assert usage_command(["--ledger", str(path), "--chart", str(tmp_path / "file.html")]) == 0
    assert usage_command(["--from", dsn, "--chart", str(tmp_path / "db.html")]) == 0
    assert (tmp_path / "db.html").read_text() == (tmp_path / "file.html").read_text()


def test_usage_from_a_bare_scheme_uses_the_libpq_environment(
    both_ledgers: tuple[Path, str],
    pg_server: postgres.PostgresServer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path, dsn = both_ledgers
    assert usage_command(["--ledger", str(path), "--format", "csv"]) == 0
    from_file = capsys.readouterr().out
    monkeypatch.setenv("PGHOST", "127.0.0.1")
    monkeypatch.setenv("PGPORT", str(pg_server.port))
    monkeypatch.setenv("PGUSER", postgres.SUPERUSER)
    monkeypatch.setenv("PGDATABASE", dsn.rsplit("/", 1)[1])

    assert usage_command(["--from", "postgresql://", "--format", "csv"]) == 0
    assert capsys.readouterr().out == from_file


def test_usage_filters_run_in_the_database(both_ledgers: tuple[Path, str]) -> None:
    _, dsn = both_ledgers
    flt = ReportFilter(namespace="team-b", service="", since=T0 + timedelta(minutes=30))
    stored = read_usage(ConnectionSource(dsn=dsn), flt)
    assert stored.records
    assert all(r.namespace == "team-b" and r.unmanaged for r in stored.records)
    assert all(r.start >= T0 + timedelta(minutes=30) for r in stored.records)


def test_usage_from_an_unreachable_or_empty_database_fails(
    pg_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert usage_command(["--from", "postgresql://gpuyard@127.0.0.1:1/gpuyard"]) == 1
    assert "PostgreSQL ledger" in capsys.readouterr().err
    assert usage_command(["--from", pg_dsn]) == 1
    assert "never migrated" in capsys.readouterr().err
    with pytest.raises(SchemaError):
        read_usage(ConnectionSource(dsn=pg_dsn), ReportFilter())


def test_usage_from_postgres_reports_conflicts(
    pg_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    records = pod_records(uid="a1", minutes=2)
    changed = replace(records[0], cost=records[0].cost * 2)
    asyncio.run(emit_all(sink_for(pg_dsn, migrate=True), records, [changed]))

    assert usage_command(["--from", pg_dsn]) == 0
    assert f"1 id(s) appear with different amounts; the first copy was used: {changed.id}" in (
        capsys.readouterr().err
    )


# --------------------------------------------------------------------------- parsing


def test_command_line_parsing() -> None:
    parser = build_parser()
    args = parser.parse_args(["usage", "--from", "postgres://db/ledger"])
    assert args.source == "postgres://db/ledger"
    assert args.ledger is None
    args = parser.parse_args(["db", "migrate", "--dsn-file", "/s/dsn"])
    assert args.dsn_file == Path("/s/dsn")
    assert args.dsn is None
    for argv in (
        ["usage"],
        ["usage", "--ledger", "a", "--from", "b"],
        ["db"],
        ["db", "migrate", "--dsn", "x", "--dsn-file", "y"],
    ):
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args(argv)
        assert exit_.value.code == 2
