"""The PostgreSQL usage ledger against the local cluster's real PostgreSQL: stopped for two
minutes while pods run, it loses nothing.

While the database is away, the meter's deliveries fail, the marks in ``status.usage``
hold, ``gpuyard_metering_lag_seconds`` shows the delay and the rest of the operator goes on
(a service is scaled meanwhile). Once the database is back, metering catches up, and the
table holds every second of every pod, by the pods' own timestamps, once. The chart's
``GpuyardUsageSinkFailing`` alert on the same counter is tested with promtool
(tests/unit/test_chart.py).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from conftest import OperatorProcess
from gpuyard.api.formats import parse_time
from localcluster import postgres
from localcluster.cluster import ClusterState
from metering_support import (
    Rig,
    Scenario,
    aiservice,
    compare,
    meter_errors,
    open_rig,
    postgres_conflicts,
    postgres_copies,
    usage_mark,
    wait_all_billed,
)
from support import Kubectl, wait_until

OUTAGE_SECONDS = 120


@pytest.fixture
def rig(cluster: ClusterState, operator: OperatorProcess, tmp_path: Path) -> Iterator[Rig]:
    with open_rig(cluster, operator, tmp_path) as found:
        yield found


def metering_lag(operator: OperatorProcess, namespace: str, service: str) -> float | None:
    labels = f'namespace="{namespace}",service="{service}"'
    for line in operator.metrics().splitlines():
        if line.startswith(f"gpuyard_metering_lag_seconds{{{labels}}}"):
            return float(line.rsplit(" ", 1)[1])
    return None


@pytest.mark.slow
def test_postgres_stopped_for_two_minutes_loses_nothing_and_shows_the_delay(
    kubectl: Kubectl, namespace: str, rig: Rig, cluster: ClusterState
) -> None:
    server = postgres.PostgresServer.load(Path(cluster.postgres_dir))
    with rig.pods(namespace) as pods, rig.operator(1, rig.postgres_env()) as meter:
        scenario = Scenario(kubectl, namespace, pods, lambda _: None)
        scenario.apply(aiservice("chat", "l4", 1, 2))
        scenario.settled("chat", 2)
        wait_until(
            lambda: postgres_copies(rig.postgres_dsn, namespace),
            timeout=60,
            what="the first records in PostgreSQL",
        )
        errors_before = meter_errors(meter, "sink")
        postgres.stop(server)
        try:
            stopped = time.monotonic()
            held = usage_mark(kubectl, namespace, "chat")
            # The operator goes on without its ledger: a scale-up takes effect.
            scenario.scale("chat", 3)
            scenario.settled("chat", 3)
            lags: list[float] = []
            # The outage lasts its two minutes; meanwhile the mark must not move.
            while time.monotonic() - stopped < OUTAGE_SECONDS:
                assert usage_mark(kubectl, namespace, "chat") == held
                lag = metering_lag(meter, namespace, "chat")
                if lag is not None:
                    lags.append(lag)
                time.sleep(1)  # the sampling interval of a fixed-length outage, not a wait
            failed = meter_errors(meter, "sink") - errors_before
        finally:
            postgres.start(server)
        back = datetime.now(UTC)

        # Caught up: the mark passes the moment the database came back, and the lag is
        # small again.
        wait_until(
            lambda: (
                (mark := usage_mark(kubectl, namespace, "chat")) is not None
                and parse_time(mark) >= back
            ),
            timeout=90,
            what="metering to catch up after the outage",
        )
        caught_up_lag = metering_lag(meter, namespace, "chat")
        scenario.scale("chat", 0)
        scenario.settled("chat", 0)
        wait_all_billed(pods, timeout=120)
        truth = pods.truth()

    print(
        f"outage {OUTAGE_SECONDS} s: {failed:.0f} failed deliveries, lag up to "
        f"{max(lags):.0f} s, {caught_up_lag} s once caught up"
    )
    assert failed > 0
    # The delay shows: the lag grew through the outage, beyond what the outage added.
    assert max(lags) >= OUTAGE_SECONDS - 20, lags
    assert caught_up_lag is not None
    assert caught_up_lag < 30
    in_postgres = compare(truth, postgres_copies(rig.postgres_dsn, namespace), namespace)
    print(in_postgres.line("postgres"))
    in_postgres.assert_exact("postgres")
    assert postgres_conflicts(rig.postgres_dsn, namespace) == []
