"""Usage metering on the real cluster: the ledger against the pods' own timestamps.

Each test runs an operator of its own (``OperatorProcess``) with 1-2 s usage windows, a
ledger in ``tmp_path`` and an HTTP sink pointing at a CloudEvents receiver on loopback,
in place of the session's operator, which is stopped meanwhile (two operators on one
cluster fight over the same objects) and started again afterwards.

The ground truth is what the pods say about themselves: a pod holds its GPUs from its
``PodScheduled`` ``lastTransitionTime`` to its containers' ``finishedAt``, both floored
to whole seconds. A watch keeps every pod of the test's namespace as last seen; the
``gpuyard.io/metering`` finalizer keeps each pod, in its final state, until the meter has
billed it, so the watch sees that state before the pod goes.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from decimal import ROUND_HALF_EVEN, Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, config, watch
from kubernetes.client import ApiException

from conftest import Loads, OperatorProcess
from gpuyard.io.ledger import read_ledger
from gpuyard.logic.metering import (
    MeteringError,
    UsageRecord,
    epoch_floor,
    parse_time,
    record_from_json,
    record_from_line,
)
from localcluster.cluster import ClusterState, free_port
from support import Kubectl, wait_until

GPU = "nvidia.com/gpu"
IMAGE = "registry.example/llm:1"
SERVICE_LABEL = "gpuyard.io/service"
#: The l4 pool has 8 GPUs on the local cluster; more replicas than that stay Pending.
L4_GPUS = 8
#: Set to replay the crash test's kill moments (the seed is printed either way).
SEED_ENV = "GPUYARD_METER_CRASH_SEED"


# --- ground truth: the pods as they saw themselves ----------------------------------------------


@dataclass(frozen=True)
class PodTruth:
    """One pod's billable interval, in whole epoch seconds ``[bound, ended)``."""

    uid: str
    name: str
    service: str
    gpus: int
    bound: int
    ended: int | None

    @property
    def gpu_seconds(self) -> int:
        assert self.ended is not None
        return (self.ended - self.bound) * self.gpus


def pod_truth(pod: Mapping[str, Any]) -> PodTruth | None:
    """The pod's interval from its own timestamps, or None when it was never bound."""
    status = pod.get("status") or {}
    scheduled = next(
        (c for c in status.get("conditions") or () if c.get("type") == "PodScheduled"), None
    )
    if scheduled is None or scheduled.get("status") != "True":
        return None
    finished = [
        parse_time(terminated["finishedAt"])
        for container in status.get("containerStatuses") or ()
        if (terminated := (container.get("state") or {}).get("terminated"))
        and terminated.get("finishedAt")
    ]
    gpus = sum(
        int((c.get("resources") or {}).get("limits", {}).get(GPU, 0))
        for c in pod["spec"]["containers"]
    )
    return PodTruth(
        uid=pod["metadata"]["uid"],
        name=pod["metadata"]["name"],
        service=pod["metadata"]["labels"][SERVICE_LABEL],
        gpus=gpus,
        bound=epoch_floor(parse_time(scheduled["lastTransitionTime"])),
        ended=epoch_floor(max(finished)) if finished else None,
    )


class PodWatch:
    """Every pod of one namespace as last seen (deleted ones included), from a watch."""

    def __init__(self, kubeconfig: str, namespace: str) -> None:
        self.namespace = namespace
        # The Kubernetes client carries no annotations for these calls.
        api_client = config.new_client_from_config(config_file=kubeconfig)  # type: ignore[no-untyped-call]
        self._api = client.CoreV1Api(api_client)
        self._pods: dict[str, dict[str, Any]] = {}
        self._gone: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pod-watch", daemon=True)
        self._version = ""
        self.error: BaseException | None = None

    def __enter__(self) -> PodWatch:
        self._version = self._list()
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self._api.api_client.close()

    def _list(self) -> str:
        # Raw JSON rather than the client's models: the truth is in the API's own fields.
        response: Any = self._api.list_namespaced_pod(self.namespace, _preload_content=False)
        body = json.loads(response.data)
        with self._lock:
            for pod in body["items"]:
                self._pods[pod["metadata"]["uid"]] = pod
        return str(body["metadata"]["resourceVersion"])

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    stream = watch.Watch().stream(  # type: ignore[no-untyped-call]
                        self._api.list_namespaced_pod,
                        self.namespace,
                        resource_version=self._version,
                        timeout_seconds=2,
                    )
                    for event in stream:
                        pod = event["raw_object"]
                        if event["type"] == "ERROR":
                            raise ApiException(status=pod.get("code"), reason=pod.get("message"))
                        self._version = pod["metadata"]["resourceVersion"]
                        with self._lock:
                            self._pods[pod["metadata"]["uid"]] = pod
                            if event["type"] == "DELETED":
                                self._gone.add(pod["metadata"]["uid"])
                except ApiException as error:
                    if error.status != 410:
                        raise
                    self._version = self._list()  # the watch fell too far behind
        except Exception as error:  # noqa: BLE001 - reported to the test by check()
            self.error = error

    def check(self) -> None:
        if self.error is not None:
            raise AssertionError(f"the pod watch failed: {self.error!r}")

    def pods(self) -> list[dict[str, Any]]:
        """Pods that still exist (Terminating ones included)."""
        self.check()
        with self._lock:
            return [pod for uid, pod in self._pods.items() if uid not in self._gone]

    def live(self, service: str) -> list[dict[str, Any]]:
        """The service's pods that are not being deleted."""
        return [
            pod
            for pod in self.pods()
            if pod["metadata"]["labels"].get(SERVICE_LABEL) == service
            and not pod["metadata"].get("deletionTimestamp")
        ]

    def truth(self) -> dict[str, PodTruth]:
        """Every pod that was ever bound, by uid, from its last seen state."""
        self.check()
        with self._lock:
            found = {uid: pod_truth(pod) for uid, pod in self._pods.items()}
        return {uid: truth for uid, truth in found.items() if truth is not None}


# --- the billing system's end: a CloudEvents receiver ------------------------------------------


class Receiver:
    """An OpenMeter-like ``POST /api/v1/events`` on loopback that a test can slow down, make
    answer 503, or take off the network altogether (nothing listening on its port)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/api/v1/events"
        self.delay = 0.0
        self.unavailable = False
        #: (receipt wall time, CloudEvent) of every event of every accepted request.
        self.events: list[tuple[float, dict[str, Any]]] = []
        self.answers: Counter[int] = Counter()
        self.in_flight = 0
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def listen(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                received = time.time()
                with receiver._lock:
                    unavailable, delay = receiver.unavailable, receiver.delay
                status = 503 if unavailable else 200
                if not unavailable:
                    events = json.loads(body)
                    with receiver._lock:
                        # Stored on receipt, answered later: a kill during the delay leaves
                        # records the sender never saw acknowledged, as with a lost answer.
                        receiver.events.extend((received, event) for event in events)
                        receiver.in_flight += 1
                    try:
                        # A slow receiver: the batch is in flight for this long.
                        time.sleep(delay)
                    finally:
                        with receiver._lock:
                            receiver.in_flight -= 1
                with contextlib.suppress(OSError):  # the sender may have been killed
                    self.send_response(status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                with receiver._lock:
                    receiver.answers[status] += 1

            def log_message(self, *_: Any) -> None:
                return None

        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop listening: the sender gets "connection refused"."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def set(self, *, delay: float | None = None, unavailable: bool | None = None) -> None:
        with self._lock:
            if delay is not None:
                self.delay = delay
            if unavailable is not None:
                self.unavailable = unavailable

    def busy(self) -> bool:
        with self._lock:
            return self.in_flight > 0

    def refused(self) -> int:
        with self._lock:
            return self.answers[503]

    def received(self) -> list[tuple[float, dict[str, Any]]]:
        with self._lock:
            return list(self.events)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    found = Receiver()
    found.listen()
    try:
        yield found
    finally:
        found.close()


# --- the operator under test --------------------------------------------------------------------


@dataclass
class Rig:
    """What a metering test runs against: the cluster, a receiver and a ledger path."""

    cluster: ClusterState
    session_operator: OperatorProcess
    receiver: Receiver
    directory: Path

    @property
    def ledger(self) -> Path:
        return self.directory / "usage.jsonl"

    def pods(self, namespace: str) -> PodWatch:
        return PodWatch(self.cluster.kubeconfig, namespace)

    @contextlib.contextmanager
    def operator(self, window_seconds: int) -> Iterator[OperatorProcess]:
        """An operator of the test's own with a fast meter, in place of the session's
        (which is started again afterwards if it was running)."""
        session = self.session_operator
        was_running = session.process is not None and session.process.poll() is None
        session.stop()
        process = OperatorProcess(
            self.cluster,
            self.directory,
            {
                "GPUYARD_USAGE_WINDOW_SECONDS": str(window_seconds),
                "GPUYARD_METER_INTERVAL": "0.5",
                "GPUYARD_USAGE_LEDGER": str(self.ledger),
                "GPUYARD_USAGE_HTTP_URL": self.receiver.url,
                # The receiver is a plain-http server on loopback.
                "GPUYARD_USAGE_HTTP_ALLOW_INSECURE": "true",
                "GPUYARD_USAGE_STDOUT": "false",
            },
        )
        try:
            process.start()
            yield process
        finally:
            process.stop()
            if was_running:
                session.start()


@pytest.fixture
def rig(
    cluster: ClusterState, operator: OperatorProcess, receiver: Receiver, tmp_path: Path
) -> Rig:
    return Rig(cluster, operator, receiver, tmp_path)


# --- the scenario: pods come and go ------------------------------------------------------------


def aiservice(name: str, pool: str, gpus: int, replicas: int) -> dict[str, Any]:
    """An AIService in mode Off, so `kubectl scale` decides how many replicas run."""
    return {
        "apiVersion": "gpuyard.io/v1alpha1",
        "kind": "AIService",
        "metadata": {"name": name},
        "spec": {
            "pool": pool,
            "gpusPerReplica": gpus,
            "container": {"image": IMAGE},
            "minReplicas": 0,
            "maxReplicas": 12,
            "replicas": replicas,
            "autoscaling": {"mode": "Off"},
        },
    }


@dataclass
class Scenario:
    """Scale up, scale down, delete a pod, delete and recreate a service, ask for more GPUs
    than the pool has, and scale to zero: two services, ``steps`` calls ``between`` after
    each change has settled (the e2e test holds the GPUs a while, the crash test kills)."""

    kubectl: Kubectl
    namespace: str
    pods: PodWatch
    between: Callable[[str], None]
    steps: list[str] = field(default_factory=list)

    def apply(self, *services: dict[str, Any]) -> None:
        items = {"apiVersion": "v1", "kind": "List", "items": list(services)}
        self.kubectl.apply(json.dumps(items), self.namespace)

    def scale(self, service: str, replicas: int) -> None:
        self.kubectl("scale", "-n", self.namespace, f"ais/{service}", f"--replicas={replicas}")

    def settled(self, service: str, replicas: int) -> None:
        """Wait until the service runs `replicas` pods: each bound one Running, the rest
        Pending without a node (no GPU left for them)."""

        def check() -> bool:
            deployment = self.kubectl.run(
                "get", "deployment", "-n", self.namespace, service, "-o", "json", check=False
            )
            if deployment.returncode != 0:
                return False
            if json.loads(deployment.stdout)["spec"]["replicas"] != replicas:
                return False
            pods = self.pods.live(service)
            return len(pods) == replicas and all(
                pod["status"].get("phase") == "Running" or not pod["spec"].get("nodeName")
                for pod in pods
            )

        wait_until(check, timeout=90, what=f"{service} to run {replicas} replicas")

    def step(self, name: str, *settled: tuple[str, int]) -> None:
        for service, replicas in settled:
            self.settled(service, replicas)
        self.steps.append(name)
        self.between(name)

    def run(self) -> None:
        self.apply(aiservice("chat", "l4", 1, 2), aiservice("train", "a100", 2, 1))
        self.step("created", ("chat", 2), ("train", 1))
        self.scale("chat", 4)
        self.step("chat scaled up to 4", ("chat", 4))
        self.scale("chat", 1)
        self.step("chat scaled down to 1", ("chat", 1))
        [pod] = self.pods.live("chat")
        self.kubectl("delete", "pod", "-n", self.namespace, pod["metadata"]["name"], "--wait=false")
        uid = pod["metadata"]["uid"]
        wait_until(
            lambda: all(p["metadata"]["uid"] != uid for p in self.pods.live("chat")),
            what="the pod to be deleted",
        )
        self.step("chat's pod deleted and replaced", ("chat", 1))
        self.scale("train", 3)
        self.step("train scaled up to 3", ("train", 3))
        self.kubectl("delete", "ais", "-n", self.namespace, "train")
        wait_until(
            lambda: (
                self.kubectl.run(
                    "get", "deployment", "-n", self.namespace, "train", check=False
                ).returncode
                != 0
            ),
            what="train's Deployment to be collected",
        )
        self.apply(aiservice("train", "a100", 2, 2))
        self.step("train deleted and recreated", ("train", 2))
        self.scale("chat", L4_GPUS + 2)
        self.step("chat asks for more GPUs than l4 has", ("chat", L4_GPUS + 2))
        self.scale("chat", 2)
        self.step("chat scaled down to 2", ("chat", 2))
        self.scale("chat", 0)
        self.scale("train", 0)
        self.step("both scaled to zero", ("chat", 0), ("train", 0))


def wait_all_billed(pods: PodWatch, timeout: float) -> None:
    """Every pod gone: the meter released each one's finalizer, so each is fully billed."""
    wait_until(
        lambda: not pods.pods(),
        timeout=timeout,
        interval=0.5,
        what="the meter to bill and release every pod",
    )


# --- comparing the records with the truth ------------------------------------------------------


@dataclass
class Comparison:
    truth_gpu_seconds: int = 0
    billed_gpu_seconds: int = 0
    records: int = 0
    duplicates: int = 0
    #: Pod-seconds of the truth that no record covers, or more than one covers.
    missing: dict[str, int] = field(default_factory=dict)
    doubled: dict[str, int] = field(default_factory=dict)
    #: Seconds records claim beyond what their window holds of the pod's interval.
    excess: dict[str, int] = field(default_factory=dict)
    #: Per pod: billed seconds minus true seconds.
    difference: dict[str, int] = field(default_factory=dict)
    unknown_pods: set[str] = field(default_factory=set)
    #: Ids whose copies are not identical records.
    conflicts: set[str] = field(default_factory=set)

    def line(self, what: str) -> str:
        return (
            f"{what}: ground truth {self.truth_gpu_seconds} GPU-s, billed "
            f"{self.billed_gpu_seconds} GPU-s, {self.records} records, "
            f"{self.duplicates} duplicates"
        )

    def assert_exact(self, what: str) -> None:
        problems = {
            "records of pods that were never bound": self.unknown_pods,
            "ids with differing copies": self.conflicts,
            "pod-seconds billed by no record": self.missing,
            "pod-seconds billed by more than one record": self.doubled,
            "seconds billed outside a pod's interval": self.excess,
        }
        found = {name: value for name, value in problems.items() if value}
        assert not found, f"{what}: {found}"
        assert self.billed_gpu_seconds == self.truth_gpu_seconds, self.line(what)


def compare(truth: Mapping[str, PodTruth], copies: list[UsageRecord], namespace: str) -> Comparison:
    """Deduplicate `copies` by id and check them second by second against the truth."""
    result = Comparison()
    unique: dict[str, UsageRecord] = {}
    for record in copies:
        if record.namespace != namespace:
            continue  # the operator bills the whole cluster; other tests' pods are theirs
        first = unique.setdefault(record.id, record)
        if first is not record:
            result.duplicates += 1
            if first != record:
                result.conflicts.add(record.id)
    result.records = len(unique)
    by_pod: dict[str, list[UsageRecord]] = {}
    for record in unique.values():
        by_pod.setdefault(record.pod_uid, []).append(record)
    result.unknown_pods = set(by_pod) - set(truth)
    for uid, pod in truth.items():
        assert pod.ended is not None, f"pod {pod.name} has no finishedAt in its last state"
        assert pod.gpus > 0, f"pod {pod.name} holds no GPU"
        result.truth_gpu_seconds += pod.gpu_seconds
        covered: Counter[int] = Counter()
        billed = 0
        for record in by_pod.get(uid, []):
            start, end = epoch_floor(record.start), epoch_floor(record.end)
            seconds = range(max(start, pod.bound), min(end, pod.ended))
            covered.update(seconds)
            billed += record.seconds
            result.billed_gpu_seconds += record.gpu_seconds
            assert record.gpu_seconds == record.seconds * pod.gpus, record
            if record.seconds > len(seconds):
                result.excess[pod.name] = result.excess.get(pod.name, 0) + record.seconds
        true_seconds = range(pod.bound, pod.ended)
        if missing := sum(1 for s in true_seconds if not covered[s]):
            result.missing[pod.name] = missing
        if doubled := sum(1 for s in true_seconds if covered[s] > 1):
            result.doubled[pod.name] = doubled
        result.difference[pod.name] = billed - len(true_seconds)
    return result


def ledger_copies(path: Path) -> list[UsageRecord]:
    """Every line of the ledger, duplicates included (a torn last line is skipped)."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    copies = []
    for number, line in enumerate(lines, start=1):
        try:
            copies.append(record_from_line(line))
        except MeteringError:
            assert number == len(lines), f"ledger line {number} is corrupt"
            assert not line.endswith("\n"), f"the last ledger line is corrupt: {line!r}"
    return copies


def received_copies(receiver: Receiver) -> list[UsageRecord]:
    copies = []
    for _, event in receiver.received():
        record = record_from_json(event["data"])
        assert event["id"] == record.id
        copies.append(record)
    return copies


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


def usage_mark(kubectl: Kubectl, namespace: str, service: str) -> str | None:
    status = kubectl.json("get", "ais", "-n", namespace, service).get("status", {})
    mark: str | None = (status.get("usage") or {}).get("reportedThrough")
    return mark


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


def meter_errors(operator: OperatorProcess) -> float:
    """`gpuyard_meter_errors_total` over every stage (tick, sink, mark)."""
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in operator.metrics().splitlines()
        if line.startswith("gpuyard_meter_errors_total{")
    )


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
