"""What the metering tests share: the pods' own truth, a billing receiver, and an operator
of the test's own with a fast meter.

Each metering test runs an operator of its own (``Rig.operator``) with 1-2 s usage
windows, a ledger in ``tmp_path`` and an HTTP sink pointing at a CloudEvents receiver on
loopback, in place of the session's operator, which is stopped meanwhile (two operators on
one cluster fight over the same objects) and started again afterwards.

The ground truth is what the pods say about themselves: a pod holds its GPUs from its
``PodScheduled`` ``lastTransitionTime`` to its containers' ``finishedAt``, both floored
to whole seconds. A watch keeps every pod of the test's namespace as last seen; the
``gpuyard.io/metering`` finalizer keeps each pod, in its final state, until the meter has
billed it, so the watch sees that state before the pod goes.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from kubernetes import client, config, watch
from kubernetes.client import ApiException

from conftest import OperatorProcess
from gpuyard.api.formats import parse_time
from gpuyard.io.pgledger import ConnectionSource, read_usage
from gpuyard.logic.metering import (
    MeteringError,
    PricePoint,
    UsageRecord,
    epoch_floor,
    record_from_json,
    record_from_line,
)
from gpuyard.logic.usage_report import ReportFilter
from localcluster.cluster import ClusterState, free_port
from support import Kubectl, wait_until

GPU = "nvidia.com/gpu"
IMAGE = "registry.example/llm:1"
SERVICE_LABEL = "gpuyard.io/service"
METERING_FINALIZER = "gpuyard.io/metering"
#: The meter's tick in the tests' operators (GPUYARD_METER_INTERVAL).
METER_INTERVAL = 0.5


def price_in_force(prices: Sequence[PricePoint], at: datetime) -> Decimal:
    """The price per GPU-hour docs/metering.md bills a window starting at `at` with: the
    latest point effective at or before it; before the first point, the first point."""
    effective = [point for point in prices if point.effective_from <= at]
    return (effective[-1] if effective else prices[0]).per_gpu_hour


# --- ground truth: the pods as they saw themselves ----------------------------------------------


@dataclass(frozen=True)
class PodTruth:
    """One pod's billable interval, in whole epoch seconds ``[bound, ended)``."""

    uid: str
    name: str
    #: The pod's service label as last seen (for display and waiting; billing never reads
    #: it): empty for a bare pod or one whose label was removed.
    service: str
    node: str
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
        service=labels_of(pod).get(SERVICE_LABEL, ""),
        node=pod["spec"].get("nodeName") or "",
        gpus=gpus,
        bound=epoch_floor(parse_time(scheduled["lastTransitionTime"])),
        ended=epoch_floor(max(finished)) if finished else None,
    )


def labels_of(obj: Mapping[str, Any]) -> dict[str, str]:
    return dict(obj["metadata"].get("labels") or {})


class PodWatch:
    """Every pod of one namespace as last seen (deleted ones included), from a watch, and
    each pod's states in the order they came with the wall time they came at."""

    def __init__(self, kubeconfig: str, namespace: str) -> None:
        self.namespace = namespace
        # The Kubernetes client carries no annotations for these calls.
        api_client = config.new_client_from_config(config_file=kubeconfig)  # type: ignore[no-untyped-call]
        self._api = client.CoreV1Api(api_client)
        self._pods: dict[str, dict[str, Any]] = {}
        self._history: dict[str, list[tuple[float, dict[str, Any]]]] = {}
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

    def _seen(self, pod: dict[str, Any]) -> None:
        uid = pod["metadata"]["uid"]
        with self._lock:
            self._pods[uid] = pod
            self._history.setdefault(uid, []).append((time.time(), pod))

    def _list(self) -> str:
        # Raw JSON rather than the client's models: the truth is in the API's own fields.
        response: Any = self._api.list_namespaced_pod(self.namespace, _preload_content=False)
        body = json.loads(response.data)
        for pod in body["items"]:
            self._seen(pod)
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
                        self._seen(pod)
                        if event["type"] == "DELETED":
                            with self._lock:
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

    def gone(self, uid: str) -> bool:
        self.check()
        with self._lock:
            return uid in self._gone

    def last(self, uid: str) -> dict[str, Any]:
        """The pod as last seen."""
        self.check()
        with self._lock:
            return self._pods[uid]

    def history(self, uid: str) -> list[tuple[float, dict[str, Any]]]:
        """(wall time seen, state) of every state of the pod seen, oldest first."""
        self.check()
        with self._lock:
            return list(self._history.get(uid, ()))

    def live(self, service: str) -> list[dict[str, Any]]:
        """The pods labelled for the service that are not being deleted."""
        return [
            pod
            for pod in self.pods()
            if labels_of(pod).get(SERVICE_LABEL) == service
            and not pod["metadata"].get("deletionTimestamp")
        ]

    def truth(self) -> dict[str, PodTruth]:
        """Every pod that was ever bound, by uid, from its last seen state."""
        self.check()
        with self._lock:
            found = {uid: pod_truth(pod) for uid, pod in self._pods.items()}
        return {uid: truth for uid, truth in found.items() if truth is not None}


def wait_all_billed(pods: PodWatch, timeout: float) -> None:
    """Every pod gone: the meter released each one's finalizer, so each is fully billed."""
    wait_until(
        lambda: not pods.pods(),
        timeout=timeout,
        interval=0.5,
        what="the meter to bill and release every pod",
    )


# --- the billing system's end: a CloudEvents receiver ------------------------------------------

#: Which requests a receiver holds unanswered, by the events they carry.
HoldRule = Callable[[list[dict[str, Any]]], bool]


class Receiver:
    """An OpenMeter-like ``POST /api/v1/events`` on loopback that a test can slow down, make
    answer 503, blackhole for some requests, or take off the network altogether (nothing
    listening on its port)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/api/v1/events"
        self.delay = 0.0
        self.unavailable = False
        #: Requests whose events this matches get no answer at all while it does.
        self.hold: HoldRule | None = None
        #: (receipt wall time, CloudEvent) of every event of every accepted request.
        self.events: list[tuple[float, dict[str, Any]]] = []
        self.answers: Counter[int] = Counter()
        self.in_flight = 0
        #: Requests held unanswered so far (each dropped, never acknowledged).
        self.held = 0
        #: While set, every request is answered 307 to this URL (a receiver being moved).
        self.redirect_to: str | None = None
        #: While set, a request without exactly this Authorization header gets 401.
        self.authorization: str | None = None
        #: The Authorization header of every request, in order (None when absent).
        self.authorizations: list[str | None] = []
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._closing = False
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def listen(self) -> None:
        receiver = self
        with self._lock:
            self._closing = False

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                received = time.time()
                if receiver._held(json.loads(body)):
                    # A blackhole: the connection stays open and unanswered until the rule
                    # no longer matches, then it is dropped without a word.
                    self.close_connection = True
                    return
                with receiver._lock:
                    unavailable, delay = receiver.unavailable, receiver.delay
                    redirect_to, wanted = receiver.redirect_to, receiver.authorization
                    receiver.authorizations.append(self.headers.get("Authorization"))
                if redirect_to is not None or (
                    wanted is not None and self.headers.get("Authorization") != wanted
                ):
                    status = 307 if redirect_to is not None else 401
                    with contextlib.suppress(OSError):
                        self.send_response(status)
                        if redirect_to is not None:
                            self.send_header("Location", redirect_to)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                    with receiver._lock:
                        receiver.answers[status] += 1
                    return
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

    def _held(self, events: list[dict[str, Any]]) -> bool:
        """Whether to blackhole a request carrying `events`; waits until it may be dropped."""
        with self._changed:
            rule = self.hold
            if rule is None or not rule(events):
                return False
            self.held += 1
            self._changed.wait_for(
                lambda: self._closing or self.hold is None or not self.hold(events)
            )
            return True

    def close(self) -> None:
        """Stop listening: the sender gets "connection refused"."""
        with self._changed:
            self._closing = True  # held requests are dropped, so the server can close
            self._changed.notify_all()
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

    def blackhole(self, rule: HoldRule | None) -> None:
        """Hold the requests `rule` matches unanswered from now on; None answers them all
        again (the held ones are dropped, unanswered)."""
        with self._changed:
            self.hold = rule
            self._changed.notify_all()

    def busy(self) -> bool:
        with self._lock:
            return self.in_flight > 0

    def refused(self) -> int:
        with self._lock:
            return self.answers[503]

    def received(self) -> list[tuple[float, dict[str, Any]]]:
        with self._lock:
            return list(self.events)


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

    @property
    def postgres_dsn(self) -> str:
        """The local cluster's PostgreSQL; every test shares its table, by namespace."""
        return self.cluster.postgres_dsn

    def postgres_env(self) -> dict[str, str]:
        """Settings that add the PostgreSQL ledger, its DSN in a file as a Secret gives it."""
        path = self.directory / "postgres.dsn"
        path.write_text(self.postgres_dsn + "\n")
        path.chmod(0o600)
        return {"GPUYARD_USAGE_LEDGER_DSN_FILE": str(path)}

    def pods(self, namespace: str) -> PodWatch:
        return PodWatch(self.cluster.kubeconfig, namespace)

    @contextlib.contextmanager
    def operator(
        self, window_seconds: int, env: Mapping[str, str] | None = None
    ) -> Iterator[OperatorProcess]:
        """An operator of the test's own with a fast meter (and `env` on top), in place of
        the session's (which is started again afterwards if it was running)."""
        session = self.session_operator
        was_running = session.process is not None and session.process.poll() is None
        session.stop()
        process = OperatorProcess(
            self.cluster,
            self.directory,
            {
                "GPUYARD_USAGE_WINDOW_SECONDS": str(window_seconds),
                "GPUYARD_METER_INTERVAL": str(METER_INTERVAL),
                "GPUYARD_USAGE_LEDGER": str(self.ledger),
                "GPUYARD_USAGE_HTTP_URL": self.receiver.url,
                # The receiver is a plain-http server on loopback.
                "GPUYARD_USAGE_HTTP_ALLOW_INSECURE": "true",
                "GPUYARD_USAGE_STDOUT": "false",
                **(env or {}),
            },
        )
        try:
            process.start()
            yield process
        finally:
            process.stop()
            if was_running:
                session.start()


@contextlib.contextmanager
def open_rig(
    cluster: ClusterState, session_operator: OperatorProcess, directory: Path
) -> Iterator[Rig]:
    """A rig whose receiver listens until the test is over (the `rig` fixture's body)."""
    receiver = Receiver()
    receiver.listen()
    try:
        yield Rig(cluster, session_operator, receiver, directory)
    finally:
        receiver.close()


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


# --- the scenario: pods come and go ------------------------------------------------------------

#: The l4 pool has 8 GPUs on the local cluster; more replicas than that stay Pending.
L4_GPUS = 8


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
    #: Ids whose copies are not identical records, and a few such pairs to show.
    conflicts: set[str] = field(default_factory=set)
    conflicting: list[tuple[UsageRecord, UsageRecord]] = field(default_factory=list)

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
        assert not found, f"{what}: {found}; e.g. {self.conflicting}"
        assert self.billed_gpu_seconds == self.truth_gpu_seconds, self.line(what)


def unique_records(copies: list[UsageRecord], namespace: str) -> dict[str, UsageRecord]:
    """The namespace's records by id (the first copy of each)."""
    unique: dict[str, UsageRecord] = {}
    for record in copies:
        if record.namespace == namespace:
            unique.setdefault(record.id, record)
    return unique


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
                if len(result.conflicting) < 2:
                    result.conflicting.append((first, record))
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
    return [record_from_json(data) for data in ledger_lines(path)]


def postgres_copies(dsn: str, namespace: str) -> list[UsageRecord]:
    """The PostgreSQL ledger's records of ``namespace``: one per id (the table's key), read
    as `gpuyard usage --from` reads them."""
    return list(read_usage(ConnectionSource(dsn=dsn), ReportFilter(namespace=namespace)).records)


def postgres_conflicts(dsn: str, namespace: str) -> list[str]:
    """Ids of ``namespace`` that arrived a second time with other billed fields."""
    stored = read_usage(ConnectionSource(dsn=dsn), ReportFilter(namespace=namespace))
    return list(stored.conflicts)


def ledger_lines(path: Path) -> list[dict[str, Any]]:
    """Every line of the ledger as its JSON object (a torn last line is skipped); none
    while the ledger does not exist yet."""
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    found = []
    for number, line in enumerate(lines, start=1):
        try:
            record_from_line(line)
        except MeteringError:
            assert number == len(lines), f"ledger line {number} is corrupt"
            assert not line.endswith("\n"), f"the last ledger line is corrupt: {line!r}"
            continue
        found.append(json.loads(line))
    return found


def received_copies(receiver: Receiver) -> list[UsageRecord]:
    copies = []
    for _, event in receiver.received():
        record = record_from_json(event["data"])
        assert event["id"] == record.id
        copies.append(record)
    return copies


def usage_mark(kubectl: Kubectl, namespace: str, service: str) -> str | None:
    status = kubectl.json("get", "ais", "-n", namespace, service).get("status", {})
    mark: str | None = (status.get("usage") or {}).get("reportedThrough")
    return mark


def meter_errors(operator: OperatorProcess, stage: str | None = None) -> float:
    """`gpuyard_meter_errors_total` over every stage (tick, sink, mark, ...) or one."""
    prefix = "gpuyard_meter_errors_total{"
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in operator.metrics().splitlines()
        if line.startswith(prefix) and (stage is None or f'stage="{stage}"' in line)
    )
