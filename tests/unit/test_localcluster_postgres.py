"""The local cluster's PostgreSQL: its state keys, its export line, and `down` stopping it
(the rest of `up` needs the cluster binaries; tests/integration covers it)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import psycopg

from localcluster import postgres
from localcluster.cluster import STATE_FILE, ClusterState, LocalCluster


def state(state_dir: Path, **extra: str) -> ClusterState:
    return ClusterState(
        name="pg", state_dir=str(state_dir), kubeconfig="k", apiserver_url="https://a",
        prometheus_url="http://p", dcgm_sim_url="http://d", prometheus_targets_dir="t",
        topology="x", kubernetes_version="v", **extra,
    )  # fmt: skip


def test_the_dsn_is_exported_only_when_a_server_runs(tmp_path: Path) -> None:
    assert "GPUYARD_TEST_POSTGRES_DSN" not in state(tmp_path).env()
    with_pg = state(tmp_path, postgres_dsn="postgresql://gpuyard@127.0.0.1:5/gpuyard")
    assert with_pg.env()["GPUYARD_TEST_POSTGRES_DSN"] == "postgresql://gpuyard@127.0.0.1:5/gpuyard"


def test_a_state_file_from_before_postgres_still_loads(tmp_path: Path) -> None:
    old = asdict(state(tmp_path))
    del old["postgres_dsn"], old["postgres_dir"]
    (tmp_path / STATE_FILE).write_text(json.dumps(old))
    assert ClusterState.load(tmp_path).postgres_dsn == ""


def test_down_stops_the_clusters_postgres(
    tmp_path: Path, pg_server: postgres.PostgresServer
) -> None:
    del pg_server  # only its skip-or-fail decision: initdb is here
    state_dir = tmp_path / "cluster"
    state_dir.mkdir()
    server = postgres.start_new(state_dir)
    with psycopg.connect(server.dsn) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    state(state_dir, postgres_dsn=server.dsn, postgres_dir=server.base_dir).save()

    LocalCluster(state_dir, name="pg").down(quiet=True)

    assert not postgres.accepts_connections(server)
    assert not state_dir.exists()
