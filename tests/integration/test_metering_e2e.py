"""Usage metering on the real cluster: the ledger against the pods' own timestamps.

The rig (an operator of the test's own with 1-2 s windows, a ledger and a CloudEvents
receiver) and the ground truth (the pods' own timestamps, from a watch) are described in
metering_support.py, which the billing-integrity tests share.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path

import pytest

from conftest import Loads, OperatorProcess
from gpuyard.api.formats import parse_time
from gpuyard.io.ledger import read_ledger
from gpuyard.logic.metering import epoch_floor
from localcluster.cluster import ClusterState
from metering_support import (
    PodTruth,
    Receiver,
    Rig,
    Scenario,
    aiservice,
    compare,
    ledger_copies,
    meter_errors,
    open_rig,
    received_copies,
    usage_mark,
    wait_all_billed,
)
from support import Kubectl, wait_until

#: Set to replay the crash test's kill moments (the seed is printed either way).
SEED_ENV = "GPUYARD_METER_CRASH_SEED"


@pytest.fixture
def rig(cluster: ClusterState, operator: OperatorProcess, tmp_path: Path) -> Iterator[Rig]:
    with open_rig(cluster, operator, tmp_path) as found:
        yield found


def ledger_totals(path: Path, namespace: str) -> dict[str, tuple[int, Decimal]]:
    """GPU-seconds and cost per service of the deduplicated ledger."""
    contents = read_ledger(path)
    assert not contents.conflicts, contents.conflicts
    totals: dict[str, tuple[int, Decimal]] = {}
    for record in contents.records:
        if record.namespace == namespace:
            seconds, cost = totals.get(record.service, (0, Decimal(0)))
            totals[record.service] = (seconds + record.gpu_seconds, cost + record.cost)
    return totals


def status_totals(kubectl: Kubectl, namespace: str, service: str) -> tuple[int, Decimal]:
    usage = kubectl.json("get", "ais", "-n", namespace, service)["status"]["usage"]
    return int(usage["gpuSeconds"]), Decimal(usage["cost"])


def wait_marks_past(
    kubectl: Kubectl, namespace: str, services: list[str], truth: Mapping[str, PodTruth]
) -> None:
    """Wait until each service's reported-through time is past its last pod's end."""
    for service in services:
        last = max(p.ended or 0 for p in truth.values() if p.service == service)

        def caught_up(service: str = service, last: int = last) -> bool:
            through = usage_mark(kubectl, namespace, service)
            return through is not None and epoch_floor(parse_time(through)) >= last

        wait_until(caught_up, timeout=60, what=f"{service}'s usage mark to pass its last pod")


def cli_totals(ledger: Path, namespace: str) -> dict[str, tuple[int, Decimal]]:
    """What `gpuyard usage --format json` reports per service."""
    command = ["usage", "--ledger", str(ledger), "--namespace", namespace, "--format", "json"]
    output = subprocess.run(
        [sys.executable, "-m", "gpuyard.cli", *command],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return {
        row["service"]: (row["gpu_seconds"], Decimal(row["cost"]))
        for row in json.loads(output)["rows"]
    }


def gpu_seconds_metric(operator: OperatorProcess, namespace: str) -> dict[str, float]:
    """`gpuyard_gpu_seconds_total` per service of `namespace`, from the operator's /metrics."""
    found: dict[str, float] = {}
    for line in operator.metrics().splitlines():
        if line.startswith("gpuyard_gpu_seconds_total{") and f'namespace="{namespace}"' in line:
            labels, value = line.rsplit(" ", 1)
            service = labels.split('service="', 1)[1].split('"', 1)[0]
            found[service] = found.get(service, 0.0) + float(value)
    return found


# --- the tests -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_ledger_matches_the_pods_own_timestamps(
    kubectl: Kubectl, namespace: str, rig: Rig
) -> None:
    ledger, receiver = rig.ledger, rig.receiver
    metric_samples: list[float] = []
    with rig.pods(namespace) as pods, rig.operator(window_seconds=2) as meter:

        def hold(step: str) -> None:
            # The scenario itself: the pods hold their GPUs a while before the next change.
            time.sleep(2.5)
            metric_samples.append(sum(gpu_seconds_metric(meter, namespace).values()))

        scenario = Scenario(kubectl, namespace, pods, hold)
        scenario.run()
        wait_all_billed(pods, timeout=60)
        truth = pods.truth()
        wait_marks_past(kubectl, namespace, ["chat", "train"], truth)
        metric = gpu_seconds_metric(meter, namespace)
        errors = meter_errors(meter)
        statuses = {name: status_totals(kubectl, namespace, name) for name in ("chat", "train")}

    in_ledger = compare(truth, ledger_copies(ledger), namespace)
    at_receiver = compare(truth, received_copies(receiver), namespace)
    print(f"\n{len(truth)} pods over {len(scenario.steps)} steps")
    print(in_ledger.line("ledger"))
    print(at_receiver.line("HTTP receiver"))
    for name, difference in sorted(in_ledger.difference.items()):
        pod = next(p for p in truth.values() if p.name == name)
        print(f"  {name}: {pod.ended - pod.bound if pod.ended else '?'} s true, {difference:+d}")

    # Within 1 s per pod, as promised; in fact exact, since both sides floor the same stamps.
    assert all(abs(d) <= 1 for d in in_ledger.difference.values()), in_ledger.difference
    assert len(truth) >= 10  # pods of every step (other tests may hold some l4 GPUs)
    in_ledger.assert_exact("ledger")
    at_receiver.assert_exact("HTTP receiver")
    # Nothing crashed, so nothing was sent twice, and no tick failed.
    assert in_ledger.duplicates == at_receiver.duplicates == 0
    assert errors == 0

    totals = ledger_totals(ledger, namespace)
    print(f"ledger totals {totals}; status {statuses}; metric {metric}")
    # A recreated service continues its predecessor's totals: the ledger knows services by
    # name, and so does the mark the operator kept for it.
    assert statuses == totals
    assert cli_totals(ledger, namespace) == totals
    assert metric == {name: float(seconds) for name, (seconds, _) in totals.items()}
    # The counter moved while the pods ran, not only at the end (the first window closes
    # settle_seconds after it ends, so the first sample may still be 0).
    assert sorted(metric_samples) == metric_samples
    middle = metric_samples[len(metric_samples) // 2]
    assert 0 < middle < metric_samples[-1] < metric["chat"] + metric["train"]


@pytest.mark.slow
def test_records_show_how_busy_the_paid_gpus_were(
    kubectl: Kubectl, namespace: str, rig: Rig, load: Loads
) -> None:
    """Each record carries its window's average utilisation from Prometheus, so the GPU-
    seconds paid for but idle are visible: busy at 60 %, then idle at 0 %."""
    load.set(namespace, "chat", 120)  # one replica with 2 GPUs: 60 % on each

    def utilisations() -> list[Decimal]:
        contents = read_ledger(rig.ledger) if rig.ledger.exists() else None
        records = sorted(
            (r for r in (contents.records if contents else []) if r.namespace == namespace),
            key=lambda r: r.start,
        )
        return [r.avg_utilization for r in records if r.avg_utilization is not None]

    with rig.operator(window_seconds=2):
        kubectl.apply(json.dumps(aiservice("chat", "l4", 2, 1)), namespace)
        wait_until(
            lambda: utilisations().count(Decimal("60.00")) >= 3, what="three windows at 60 %"
        )
        load.set(namespace, "chat", 0)
        wait_until(lambda: utilisations()[-1:] == [Decimal(0)], what="a window at 0 %")

    contents = read_ledger(rig.ledger)
    assert not contents.conflicts, contents.conflicts
    records = [r for r in contents.records if r.namespace == namespace]
    measured = [r for r in records if r.avg_utilization is not None]
    print(f"\n{len(measured)} of {len(records)} records measured: {utilisations()}")
    # Only a window before the pod's first scraped sample may lack a reading.
    assert len(records) - len(measured) <= 2
    assert all(Decimal(0) <= percent <= Decimal(60) for percent in utilisations())
    busy = [r for r in measured if r.avg_utilization == Decimal(60)]
    idle = [r for r in measured if r.avg_utilization == Decimal(0)]
    for record in busy:  # 40 % of the GPU-seconds, rounded half-even like the meter does
        idle_share = (Decimal(record.gpu_seconds) * Decimal("0.4")).to_integral_value(
            ROUND_HALF_EVEN
        )
        assert record.idle_gpu_seconds == idle_share, record
    assert all(r.idle_gpu_seconds == r.gpu_seconds for r in idle)
    assert busy[-1].start < idle[0].start  # the readings follow the load, in order


@dataclass
class Chaos:
    """Kills the operator with SIGKILL at seeded random moments and starts it again."""

    meter: OperatorProcess
    receiver: Receiver
    rng: random.Random
    kills: int = 0
    in_flight_kills: int = 0
    log: list[str] = field(default_factory=list)

    def kill(self, moment: Callable[[], bool] | None = None, what: str = "") -> None:
        """Kill at a random moment, or once `moment()` holds, and start again."""
        if moment is None:
            time.sleep(self.rng.uniform(0.1, 1.5))  # the random moment, not a wait
        else:
            wait_until(moment, timeout=30, interval=0.02, what=what)
        busy = self.receiver.busy()
        self.meter.kill()
        self.kills += 1
        self.in_flight_kills += busy
        self.log.append(f"{'in-flight ' if busy else ''}kill {self.kills}")
        self.meter.start()

    def round(self, step: str, kills: int, *, in_flight: bool = True) -> None:
        for _ in range(kills):
            if in_flight and self.rng.random() < 0.4:
                # A batch reaches the receiver every tick; kill while one awaits its answer.
                self.kill(self.receiver.busy, "a batch in flight")
            else:
                self.kill()
        self.log.append(f"-- {step}")

    def outage(self, kubectl: Kubectl, namespace: str) -> float:
        """Take the receiver down for a stretch, killing the operator meanwhile: first it
        answers 503, then nothing listens on its port. Returns how long it was down."""
        started = time.monotonic()
        self.receiver.set(unavailable=True)
        for _ in range(2):
            refused = self.receiver.refused()

            def sending(refused: int = refused) -> bool:
                return self.receiver.refused() > refused

            # Kill only once this run of the operator has been refused: it was sending.
            self.kill(sending, "a 503")
        mark = usage_mark(kubectl, namespace, "chat")
        self.receiver.close()
        self.log.append("-- receiver answers 503")
        for _ in range(2):
            self.kill()
        # Nothing was acknowledged, so the mark stood still.
        assert usage_mark(kubectl, namespace, "chat") == mark
        self.receiver.set(unavailable=False)
        self.receiver.listen()
        self.log.append("-- receiver not listening")
        return time.monotonic() - started


@pytest.mark.slow
def test_no_window_is_lost_or_billed_twice_across_kills_and_a_sink_outage(
    kubectl: Kubectl, namespace: str, rig: Rig
) -> None:
    seed = int(os.environ.get(SEED_ENV) or random.SystemRandom().randrange(2**32))
    print(f"\n{SEED_ENV}={seed}")
    ledger, receiver = rig.ledger, rig.receiver
    # A slow receiver keeps a batch in flight for a good part of every tick.
    receiver.set(delay=0.3)
    outage: list[float] = []
    started = time.monotonic()
    with rig.pods(namespace) as pods, rig.operator(window_seconds=1) as meter:
        chaos = Chaos(meter, receiver, random.Random(seed))

        def between(step: str) -> None:
            if step == "chat scaled down to 1":
                outage.append(chaos.outage(kubectl, namespace))
            chaos.round(step, 2)

        scenario = Scenario(kubectl, namespace, pods, between)
        scenario.run()
        # Kills while the meter catches up with the last pods (which may all be billed
        # already: then no batch is sent, so none can be in flight).
        chaos.round("catching up", 2, in_flight=False)
        wait_all_billed(pods, timeout=120)
        truth = pods.truth()
        wait_marks_past(kubectl, namespace, ["chat"], truth)
        status = status_totals(kubectl, namespace, "chat")

    in_ledger = compare(truth, ledger_copies(ledger), namespace)
    at_receiver = compare(truth, received_copies(receiver), namespace)
    print(" / ".join(chaos.log))
    print(
        f"{chaos.kills} kills ({chaos.in_flight_kills} with a batch in flight), "
        f"{len(truth)} pods, receiver down for {outage[0]:.0f} s, "
        f"receiver answers {dict(receiver.answers)}, "
        f"{time.monotonic() - started:.0f} s"
    )
    print(in_ledger.line("ledger"))
    print(at_receiver.line("HTTP receiver"))

    assert chaos.kills >= 20
    assert chaos.in_flight_kills >= 3
    assert receiver.answers[503] >= 2
    in_ledger.assert_exact("ledger")
    at_receiver.assert_exact("HTTP receiver")
    # The kills did make the meter send records again: the duplicates were exercised.
    assert in_ledger.duplicates + at_receiver.duplicates > 0

    totals = ledger_totals(ledger, namespace)
    print(f"ledger totals {totals}; chat's status {status}")
    # chat lived through every kill; its mark and totals were saved only after the sinks
    # acknowledged, so they count each record once. (train was deleted and recreated, and
    # a kill in between loses the mark its predecessor left in memory.)
    assert status == totals["chat"]
    assert cli_totals(ledger, namespace) == totals
