"""A real PostgreSQL for the usage ledger's tests: one server per test session (started by
hack/localcluster/postgres.py in a temporary directory), a fresh database per test.

Without Debian's postgresql package the tests that need it are skipped with the reason;
with GPUYARD_REQUIRE_POSTGRES=1 (set by .ci/run) they fail instead, so CI cannot pass
without running them.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from localcluster import postgres

_databases = itertools.count(1)


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[postgres.PostgresServer]:
    try:
        postgres.bin_dir()
    except postgres.PostgresMissingError as exc:
        if os.environ.get(postgres.REQUIRE_ENV) == "1":
            pytest.fail(str(exc))
        pytest.skip(str(exc))
    server = postgres.start_new(tmp_path_factory.mktemp("postgres"))
    yield server
    postgres.stop(server)


def restarted(server: postgres.PostgresServer) -> None:
    """Start a server a test stopped (the session's server must be up for the next)."""
    if not postgres.running(server):
        postgres.start(server)


@pytest.fixture
def pg_dsn(pg_server: postgres.PostgresServer) -> Iterator[str]:
    """The DSN of a new, empty database on the session's server."""
    restarted(pg_server)
    name = f"test_{os.getpid()}_{next(_databases)}"
    with psycopg.connect(pg_server.dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield pg_server.dsn.rsplit("/", 1)[0] + f"/{name}"
    restarted(pg_server)  # a test that stopped it must not take the next one down
    with psycopg.connect(pg_server.dsn, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


@pytest.fixture
def pg_state_dir(pg_server: postgres.PostgresServer) -> Path:
    return Path(pg_server.base_dir)
