"""gpuyard next to KEDA + the HPA: one load profile, one cluster, one run, measured.

What runs: on the local cluster (Kubernetes v1.37.2, kwok nodes, the real Prometheus
scraping the DCGM simulator every second), KEDA v2.21.0's operator and metrics adapter
(``localcluster up --keda``), and a ``gpuyard run`` started here. Two AIServices on the
a100 pool get the same simulated load at the same moments:

- **gpuyard**: mode ``Auto``, ``minReplicas: 0``, ``maxReplicas: 6``, every autoscaling
  setting at its default (tolerance 10 %, no scale-up window, a 300 s scale-down window,
  scale to zero after 300 s idle) and two metrics: ``GPUUtilization`` at 50 % and the
  simulator's ``gpuyard_sim_requests_in_flight`` at ``targetPerReplica: 0.5`` (the metric
  that can wake a service at zero, as docs/autoscaling.md asks).
- **KEDA + HPA**: an AIService in mode ``Off`` (gpuyard builds its Deployment from
  ``spec.replicas`` and nothing else) and a ScaledObject whose ``scaleTargetRef`` is the
  AIService, through its ``/scale`` subresource, with KEDA's own defaults
  (``pollingInterval`` 30 s, ``cooldownPeriod`` 300 s, no ``advanced`` section: the HPA's
  default behaviour, 300 s scale-down window) and two Prometheus triggers on the same
  series:

  * ``avg(avg_over_time(DCGM_FI_DEV_GPU_UTIL{job="dcgm-exporter",namespace=NS}[30s]))``,
    ``metricType: Value``, ``threshold: 50``. For a ``Value`` external metric the HPA
    computes ``ceil(ready pods x value / target)``, unless the ratio is within the
    tolerance (``getUsageRatioReplicaCount`` in kubernetes/kubernetes
    pkg/controller/podautoscaler/replica_calculator.go), which for the mean utilisation per
    GPU is gpuyard's proportional rule ``ceil(mean / target x ready pods)``.
    ``AverageValue`` on the *sum* would give the same in a steady state,
    ``ceil(sum / target)``, but the sum still holds a removed pod's series for the 30 s of
    the window and would ask for replicas that serve nothing; the mean is what a careful
    user would write. The same 30 s window as gpuyard's default
    (``GPUYARD_METRICS_WINDOW_SECONDS``: dcgm-exporter collects every 30 s).
  * ``sum(gpuyard_sim_requests_in_flight{namespace=NS,service=S})``, ``metricType:
    AverageValue``, ``threshold: 0.5``, ``activationThreshold: 0``: the HPA's
    ``ceil(total / 0.5)`` (tolerance against ``total / (0.5 x current replicas)``, the same
    file), gpuyard's ``ceil(total / targetPerReplica)``; KEDA's activation
    (above 0) is gpuyard's ``activationValue`` 0.

  Both sides thus ask for the same count from the same readings, with the same 10 %
  tolerance, and both take the larger of their two metrics.

Phases, in one run on one cluster: **defaults** (gpuyard's real defaults:
``GPUYARD_AUTOSCALE_INTERVAL`` 5 s, the chart's ``autoscaleIntervalSeconds: 5``; KEDA's and
the HPA's as above, the controller manager's ``--horizontal-pod-autoscaler-sync-period``
left at 15 s), then **tuned**: gpuyard at a 1 s interval, the ScaledObjects at
``pollingInterval: 1`` (an integer number of seconds: 1 is KEDA's lowest), the controller
manager restarted with ``--horizontal-pod-autoscaler-sync-period=1s``. The flag's
validation only asks for a positive duration (``ValidateHPAControllerConfiguration`` in
kubernetes/kubernetes), so no lower bound is enforced; below the 1 s scrape interval no
sync can read anything new, and 1 s matches the other two. The windows, tolerances and
cooldowns stay at their defaults in both phases: removing them would make both flap.

The profile (``peers_model.profile``): 1 replica's worth of load, steps up to 2 and 4, a
noisy plateau around 4, a step down to 2, quiet until zero, a wake to 2. A step lasts until
both services have reached their count (so the 300 s windows set the length), bounded.
For each step and service:

- *reaction*: from the moment the load is set until the Deployment's ``spec.replicas`` (a
  watch) is the new count;
- *floor*: until Prometheus shows it: polled every 0.5 s, the utilisation of the pods that
  ran when the step began and the requests in flight, put through the rule both sides
  share (``peers_model.proposal``); for a step to zero, until the series show no demand.
  No autoscaler reading this Prometheus can know sooner;
- *wake*: from demand at zero to the first replica (``spec.replicas`` above 0).

Over the profile: replica changes over the noisy plateau (flaps), and GPU-seconds (the
Deployment's ``status.replicas``, the pods that hold GPUs, times one GPU) and their cost at
the pool's 2.50 per GPU-hour.

Load (after the first phase's profile): 1, 10 and 100 services on each side, each at one
replica's load, settled, then a measured window (the next phase measures the 100 again with
its own settings before its profile): queries per minute to Prometheus (each side reaches
Prometheus through its own counting proxy started here, so every query is attributed), and
writes per minute to the API server from the audit log (write verbs; the local cluster's
audit policy leaves out Events and Leases), attributed by namespace (each service has its
own) and, outside those, by user agent.

Usage (a cluster with KEDA and room for 200 one-GPU pods, reused through
GPUYARD_CLUSTER_STATE; nothing else may run an operator on it meanwhile)::

    PYTHONPATH=hack .venv/bin/python -m localcluster --name peers up --keda \\
        --topology a100=30x8:a100-80gb
    export GPUYARD_CLUSTER_STATE=~/.cache/gpuyard/clusters/peers/state.json
    make bench-peers                   # the full run, 45 minutes or more on 2 CPUs
    make bench-peers ARGS=--quick      # a smoke check: one step, one service, a minute

The raw data goes to ``--out`` (JSON), the table to stdout (Markdown, for
bench/RESULTS.md), the replica curves to ``--png``.
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import platform
import secrets
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import kubernetes
import matplotlib
import matplotlib.pyplot as plt
from kubernetes.client import ApiClient

from common import OperatorProcess, cluster, install_crds, kubectl, log
from gpuyard.logic.promql import GpuExporter, gpu_utilization_query, parse_vector_response
from localcluster.cluster import (
    GPU_EXPORTER_MATCHERS,
    HPA_SYNC_PERIOD_FLAG,
    REPO_ROOT,
    ClusterState,
    LocalCluster,
    audit_writes,
    binaries_dir,
)
from localcluster.jsonhttp import http_json
from peers_model import (
    IN_FLIGHT_PER_REPLICA,
    MAX_REPLICAS,
    TARGET_PERCENT,
    Reading,
    Segment,
    changes_between,
    first_above_zero,
    first_reaching_or_past,
    floor,
    integral,
    is_step,
    p50_p95,
    profile,
    ratio,
    replicas_for,
    value_at,
)

IMAGE = "registry.example/llm:1"
WAKE_METRIC = "gpuyard_sim_requests_in_flight"
WINDOW = 30  # gpuyard's default metrics window, and the triggers' range
PRICE_PER_GPU_HOUR = 2.50  # examples/pools.yaml, pool a100
SYSTEMS = ("gpuyard", "keda")
KCM = "kube-controller-manager"
DEFAULT_HPA_SYNC_SECONDS = 15.0  # Kubernetes' default, which the local cluster keeps


@dataclass(frozen=True)
class Phase:
    name: str
    gpuyard_interval: float
    keda_polling: int | None  # None: leave KEDA's default (30 s)
    hpa_sync: float | None  # seconds; None: the controller manager's default (15 s)


PHASES = {
    "defaults": Phase("defaults", 5.0, None, None),
    "tuned": Phase("tuned", 1.0, 1, 1.0),
}


# --- the objects -------------------------------------------------------------------------------


def aiservice(name: str, system: str) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "pool": "a100",
        "gpusPerReplica": 1,
        "container": {"image": IMAGE},
        "minReplicas": 0,
        "maxReplicas": MAX_REPLICAS,
    }
    if system == "gpuyard":
        spec["autoscaling"] = {
            "metrics": [
                {"type": "GPUUtilization", "targetPercent": int(TARGET_PERCENT)},
                {
                    "type": "Prometheus",
                    "prometheus": {
                        "metric": WAKE_METRIC,
                        "targetPerReplica": str(IN_FLIGHT_PER_REPLICA),
                        "activationValue": "0",
                    },
                },
            ]
        }
    else:
        spec["autoscaling"] = {"mode": "Off"}
        spec["replicas"] = 1
    return {
        "apiVersion": "gpuyard.io/v1alpha1",
        "kind": "AIService",
        "metadata": {"name": name},
        "spec": spec,
    }


def scaled_object(
    namespace: str, name: str, prometheus: str, polling: int | None
) -> dict[str, Any]:
    utilisation = (
        f"avg(avg_over_time(DCGM_FI_DEV_GPU_UTIL{{{GPU_EXPORTER_MATCHERS},"
        f'namespace="{namespace}"}}[{WINDOW}s]))'
    )
    in_flight = f'sum({WAKE_METRIC}{{namespace="{namespace}",service="{name}"}})'
    spec: dict[str, Any] = {
        "scaleTargetRef": {"apiVersion": "gpuyard.io/v1alpha1", "kind": "AIService", "name": name},
        "minReplicaCount": 0,
        "maxReplicaCount": MAX_REPLICAS,
        "triggers": [
            {
                "type": "prometheus",
                "metricType": "Value",
                "metadata": {
                    "serverAddress": prometheus,
                    "query": utilisation,
                    "threshold": str(int(TARGET_PERCENT)),
                },
            },
            {
                "type": "prometheus",
                "metricType": "AverageValue",
                "metadata": {
                    "serverAddress": prometheus,
                    "query": in_flight,
                    "threshold": str(IN_FLIGHT_PER_REPLICA),
                    "activationThreshold": "0",
                },
            },
        ],
    }
    if polling is not None:
        spec["pollingInterval"] = polling
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


# --- counting proxies --------------------------------------------------------------------------


class CountingProxy:
    """Forwards HTTP requests to Prometheus and counts the queries: one per client, so that
    every query is attributed to the system that sent it."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.queries = 0
        self._lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _forward(self) -> None:
                if self.path.startswith("/api/v1/query"):
                    with proxy._lock:
                        proxy.queries += 1
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                request = urllib.request.Request(
                    proxy.upstream + self.path, data=body, method=self.command
                )
                if self.headers.get("Content-Type"):
                    request.add_header("Content-Type", self.headers["Content-Type"])
                try:
                    with urllib.request.urlopen(request, timeout=30) as response:
                        status, payload = response.status, response.read()
                        kind = response.headers.get("Content-Type", "application/json")
                except urllib.error.HTTPError as error:
                    status, payload = error.code, error.read()
                    kind = error.headers.get("Content-Type", "application/json")
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = _forward  # noqa: N815 (the names http.server calls)
            do_POST = _forward  # noqa: N815

            def log_message(self, *_: Any) -> None:
                return

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def count(self) -> int:
        with self._lock:
            return self.queries

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# --- what is recorded --------------------------------------------------------------------------


class DeploymentCurves:
    """Every change of every bench Deployment's ``spec.replicas`` and ``status.replicas``,
    with the time it was seen, from one watch over all namespaces."""

    def __init__(self, client: ApiClient, prefix: str) -> None:
        self.apps = kubernetes.client.AppsV1Api(client)
        self.prefix = prefix
        self.spec: dict[str, list[tuple[float, int]]] = defaultdict(list)
        self.status: dict[str, list[tuple[float, int]]] = defaultdict(list)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _record(self, deployment: Any, at: float) -> None:
        namespace = str(deployment.metadata.namespace)
        if not namespace.startswith(self.prefix):
            return
        for curves, replicas in (
            (self.spec, deployment.spec.replicas),
            (self.status, deployment.status.replicas),
        ):
            value = int(replicas or 0)
            curve = curves[namespace]
            if not curve or curve[-1][1] != value:
                curve.append((at, value))

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                listed = self.apps.list_deployment_for_all_namespaces()
                with self._lock:
                    for item in listed.items:
                        self._record(item, time.time())
                watch = kubernetes.watch.Watch()
                for event in watch.stream(
                    self.apps.list_deployment_for_all_namespaces,
                    resource_version=listed.metadata.resource_version,
                    timeout_seconds=60,
                ):
                    at = time.time()
                    if self._stop.is_set():
                        watch.stop()
                        break
                    if event["type"] in ("ADDED", "MODIFIED"):
                        with self._lock:
                            self._record(event["object"], at)
            except Exception as error:  # noqa: BLE001 (the watch restarts on anything)
                log(f"deployment watch restarts: {error}")
                time.sleep(1)

    def spec_of(self, namespace: str) -> list[tuple[float, int]]:
        with self._lock:
            return list(self.spec[namespace])

    def status_of(self, namespace: str) -> list[tuple[float, int]]:
        with self._lock:
            return list(self.status[namespace])

    def current(self, namespace: str) -> int | None:
        with self._lock:
            curve = self.spec.get(namespace)
            return curve[-1][1] if curve else None

    def stop(self) -> None:
        self._stop.set()


class FloorPoller:
    """Polls Prometheus directly (not through a proxy) every 0.5 s for the profile's
    services: the utilisation of the pods each had when its step began, and the requests in
    flight."""

    def __init__(self, state: ClusterState, namespaces: dict[str, str]) -> None:
        self.state = state
        self.namespaces = namespaces  # namespace -> service name
        exporter = GpuExporter.parse(GPU_EXPORTER_MATCHERS)
        self.utilisation_query = gpu_utilization_query(window_seconds=WINDOW, exporter=exporter)
        self.pods: dict[str, tuple[str, ...]] = dict.fromkeys(namespaces, ())
        self.readings: dict[str, list[Reading]] = defaultdict(list)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _query(self, promql: str) -> dict[str, Any]:
        url = f"{self.state.prometheus_url}/api/v1/query?" + urllib.parse.urlencode(
            {"query": promql}
        )
        with urllib.request.urlopen(url, timeout=5) as response:
            body: dict[str, Any] = json.load(response)
        return body

    def set_pods(self, namespace: str, pods: tuple[str, ...]) -> None:
        with self._lock:
            self.pods[namespace] = pods

    def _run(self) -> None:
        in_flight_query = f"sum by (namespace) ({WAKE_METRIC})"
        while not self._stop.wait(0.5):
            try:
                at = time.time()
                values = parse_vector_response(self._query(self.utilisation_query))
                flights = {
                    str(r["metric"].get("namespace")): float(r["value"][1])
                    for r in self._query(in_flight_query)["data"]["result"]
                }
            except (OSError, ValueError, KeyError) as error:
                log(f"floor poll failed: {error}")
                continue
            with self._lock:
                for namespace, pods in self.pods.items():
                    utilisation = tuple(
                        values[(namespace, pod)] for pod in pods if (namespace, pod) in values
                    )
                    reading = Reading(at, utilisation, flights.get(namespace, 0.0))
                    self.readings[namespace].append(reading)

    def readings_of(self, namespace: str) -> list[Reading]:
        with self._lock:
            return list(self.readings[namespace])

    def stop(self) -> None:
        self._stop.set()


# --- the cluster side --------------------------------------------------------------------------


def set_hpa_sync_period(state: ClusterState, seconds: float | None) -> None:
    """The HPA's sync period is a controller-manager flag: restart it with ``seconds``, or
    with the default (15 s) when ``seconds`` is None and some other period was set."""
    state_dir = Path(state.state_dir)
    command = ClusterState.load(state_dir).commands[KCM]
    current = [a for a in command if a.startswith(HPA_SYNC_PERIOD_FLAG)]
    wanted = [] if seconds is None else [f"{HPA_SYNC_PERIOD_FLAG}{seconds:g}s"]
    if current == wanted or (seconds is None and not current):
        return
    LocalCluster(state_dir, state.name).set_hpa_sync_period(
        DEFAULT_HPA_SYNC_SECONDS if seconds is None else seconds
    )
    period = DEFAULT_HPA_SYNC_SECONDS if seconds is None else seconds
    log(f"kube-controller-manager restarted, HPA sync period {period:g} s")


def set_load(state: ClusterState, namespace: str, name: str, load: float) -> None:
    http_json("PUT", f"{state.dcgm_sim_url}/load/{namespace}/{name}", {"load": load})


@dataclass
class Pair:
    """One service per system, under the same load."""

    namespaces: dict[str, str]  # system -> namespace
    name: str = "svc"


def create_pair(bench: Bench, prefix: str, phase: Phase, load: float) -> Pair:
    """Through the Python client: a hundred pairs through kubectl would take minutes."""
    pair = Pair({system: f"{prefix}-{system[0]}" for system in bench.systems})
    custom = kubernetes.client.CustomObjectsApi(bench.client)
    for system, namespace in pair.namespaces.items():
        bench.core.create_namespace({"metadata": {"name": namespace}})
        set_load(bench.state, namespace, pair.name, load)
        custom.create_namespaced_custom_object(
            "gpuyard.io", "v1alpha1", namespace, "aiservices", aiservice(pair.name, system)
        )
        if system == "keda":
            body = scaled_object(
                namespace, pair.name, bench.proxies["keda"].url, phase.keda_polling
            )
            custom.create_namespaced_custom_object(
                "keda.sh", "v1alpha1", namespace, "scaledobjects", body
            )
    return pair


def retune(bench: Bench, namespaces: list[str], phase: Phase) -> None:
    """Give the ScaledObjects in ``namespaces`` the phase's pollingInterval."""
    custom = kubernetes.client.CustomObjectsApi(bench.client)
    for namespace in namespaces:
        custom.patch_namespaced_custom_object(
            "keda.sh", "v1alpha1", namespace, "scaledobjects", "svc",
            {"spec": {"pollingInterval": phase.keda_polling or 30}},
        )  # fmt: skip


def wait_until(condition: Any, timeout: float, what: str, *, required: bool = True) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            if not required:
                log(f"went on after {timeout:.0f}s without {what}")
                return
            raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.25)


def running_pods(core: Any, namespace: str) -> tuple[str, ...]:
    pods = core.list_namespaced_pod(namespace, field_selector="status.phase=Running").items
    return tuple(str(p.metadata.name) for p in pods if p.metadata.deletion_timestamp is None)


# --- one phase ---------------------------------------------------------------------------------


@dataclass
class StepResult:
    segment: str
    before: int
    after: int
    at: float
    reaction: dict[str, float | None] = field(default_factory=dict)
    floor: dict[str, float | None] = field(default_factory=dict)
    wake: dict[str, float | None] = field(default_factory=dict)


def _since(at: float | None, start: float) -> float | None:
    return None if at is None else at - start


@dataclass
class Bench:
    """What every part of one run shares."""

    state: ClusterState
    client: ApiClient
    curves: DeploymentCurves
    proxies: dict[str, CountingProxy]
    run_id: str
    seed: int
    systems: tuple[str, ...] = SYSTEMS  # both, but for a smoke run of one side alone

    def __post_init__(self) -> None:
        self.core = kubernetes.client.CoreV1Api(self.client)

    def pods(self, namespace: str) -> tuple[str, ...]:
        return running_pods(self.core, namespace)

    def settled(self, namespaces: list[str], count: int | None) -> bool:
        """Every Deployment asks for ``count`` (at least one with ``count`` None), and as
        many pods run."""
        for ns in namespaces:
            asked = self.curves.current(ns) or 0
            running = len(self.pods(ns))
            if (
                (asked < 1 or running < 1)
                if count is None
                else (asked != count or running != count)
            ):
                return False
        return True

    def run_step(self, segments: list[Segment], index: int, namespaces: list[str]) -> None:
        """Hold a step until every service has reached its count (bounded), then settle."""
        segment, started = segments[index], time.time()
        deadline = started + segment.timeout
        before = segments[index - 1].count
        while time.time() < deadline and not all(
            first_reaching_or_past(self.curves.spec_of(ns), started, before, segment.count)
            for ns in namespaces
        ):
            time.sleep(0.25)
        reached = {
            ns: first_reaching_or_past(self.curves.spec_of(ns), started, before, segment.count)
            for ns in namespaces
        }
        log(f"{segment.name}: reached after " + ", ".join(
            f"{ns}: {_s(_since(at, started))}" for ns, at in reached.items()))  # fmt: skip
        time.sleep(max(segment.settle, started + segment.seconds - time.time()))

    def measure_steps(self, steps: list[StepResult], pair: Pair, poller: FloorPoller) -> None:
        for step in steps:
            for system, ns in pair.namespaces.items():
                spec = self.curves.spec_of(ns)
                reached = first_reaching_or_past(spec, step.at, step.before, step.after)
                step.reaction[system] = _since(reached, step.at)
                shown = floor(poller.readings_of(ns), step.at, step.before, step.after)
                step.floor[system] = _since(shown, step.at)
                if step.before == 0:
                    step.wake[system] = _since(first_above_zero(spec, step.at), step.at)
            figures = [f"{s} reaction {_s(step.reaction[s])} floor {_s(step.floor[s])}"
                       for s in pair.namespaces]  # fmt: skip
            log(f"{step.segment}: " + ", ".join(figures))

    def profile(self, phase: Phase, segments: list[Segment]) -> dict[str, Any]:
        pair = create_pair(self, f"peers-{self.run_id}-{phase.name}", phase, segments[0].load)
        namespaces = list(pair.namespaces.values())
        first = segments[0].count
        log(f"[{phase.name}] waiting for both services to settle at {first} replica(s)")
        wait_until(lambda: self.settled(namespaces, first), 300, "the services to settle")
        time.sleep(WINDOW + 5)  # the utilisation window filled with the starting load
        poller = FloorPoller(self.state, dict.fromkeys(namespaces, pair.name))
        loads: list[tuple[float, float]] = []
        steps: list[StepResult] = []
        plateaus: list[tuple[str, float, float]] = []
        started = time.time()
        try:
            for index, segment in enumerate(segments):
                before = segments[index - 1].count if index else first
                for ns in namespaces:
                    poller.set_pods(ns, self.pods(ns))
                segment_start = time.time()
                for offset, load in segment.loads(self.seed):
                    time.sleep(max(0.0, segment_start + offset - time.time()))
                    loads.append((time.time(), load))
                    for ns in namespaces:
                        set_load(self.state, ns, pair.name, load)
                if is_step(segments, index):
                    log(f"[{phase.name}] {segment.name}: load {segment.load:g}, "
                        f"{before} -> {segment.count}")  # fmt: skip
                    steps.append(StepResult(segment.name, before, segment.count, segment_start))
                    self.run_step(segments, index, namespaces)
                else:
                    time.sleep(max(0.0, segment_start + segment.seconds - time.time()))
                    if segment.noise:
                        plateaus.append((segment.name, segment_start, time.time()))
            ended = time.time()
        finally:
            poller.stop()
        self.measure_steps(steps, pair, poller)
        spec = {s: self.curves.spec_of(ns) for s, ns in pair.namespaces.items()}
        pods = {s: self.curves.status_of(ns) for s, ns in pair.namespaces.items()}
        gpu_seconds = {s: integral(pods[s], started, ended) for s in pair.namespaces}
        return {
            "phase": asdict(phase),
            "namespaces": pair.namespaces,
            "started": started,
            "ended": ended,
            "loads": loads,
            "steps": [asdict(s) for s in steps],
            "plateaus": plateaus,
            "flaps": {
                s: sum(changes_between(spec[s], start, end) for _, start, end in plateaus)
                for s in pair.namespaces
            },
            "gpu_seconds": gpu_seconds,
            "cost": {s: v * PRICE_PER_GPU_HOUR / 3600 for s, v in gpu_seconds.items()},
            "curves": spec,
            "pods": pods,
        }

    def grow(self, phase: Phase, size: int, sides: dict[str, list[str]]) -> None:
        """Add pairs at one replica's load until each side has ``size`` services."""
        while len(sides["gpuyard"]) < size:
            prefix = f"peers-{self.run_id}-{phase.name}-{len(sides['gpuyard'])}"
            for system, ns in create_pair(self, prefix, phase, 50).namespaces.items():
                sides[system].append(ns)

    def count(self, phase: Phase, sides: dict[str, list[str]], window: float) -> dict[str, Any]:
        """Once every service runs, ``window`` seconds of queries and writes per side."""
        size = len(sides["gpuyard"])
        every = [ns for system in self.systems for ns in sides[system]]
        log(f"[{phase.name}] load: {size} service(s) per side, settling")
        wait_until(lambda: self.settled(every, None), 900, f"{size} services per side")
        time.sleep(15)  # the last creations' status writes done
        counts = {s: self.proxies[s].count() for s in self.systems}
        start = time.time()
        time.sleep(window)
        end = time.time()
        queries = {
            s: (self.proxies[s].count() - counts[s]) * 60 / (end - start) for s in self.systems
        }
        time.sleep(3)  # the audit log is written in batches of at most 1 s
        writes = writes_by_side(self.state, start, end, {s: tuple(sides[s]) for s in self.systems})
        per_minute = {s: sum(w.values()) * 60 / (end - start) for s, w in writes.items()}
        log(f"[{phase.name}] at {size}: queries/min {queries}, writes/min {per_minute}")
        return {"services": size, "seconds": end - start, "queries_per_minute": queries,
                "writes_per_minute": per_minute, "writes_by_agent": writes}  # fmt: skip


def recompute_reactions(phase: dict[str, Any]) -> None:
    """Reactions again from a saved phase's curves (with this code's definition)."""
    for step in phase["steps"]:
        for system, curve in phase["curves"].items():
            points = [(float(t), int(v)) for t, v in curve]
            reached = first_reaching_or_past(points, step["at"], step["before"], step["after"])
            step["reaction"][system] = _since(reached, step["at"])


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}s"


def writes_by_side(state: ClusterState, start: float, end: float,
                   sides: dict[str, tuple[str, ...]]) -> dict[str, dict[str, int]]:  # fmt: skip
    """Audit-logged writes received in ``[start, end)``: per side, per user agent family.
    A write in one of a side's namespaces is that side's, whoever made it; a write
    elsewhere is the side's whose agent made it (KEDA's operator, gpuyard)."""
    counts: dict[str, dict[str, int]] = {side: defaultdict(int) for side in sides}
    for event in audit_writes(state, ""):
        received = _timestamp(event.get("requestReceivedTimestamp", ""))
        if not start <= received < end:
            continue
        agent = str(event.get("userAgent", "")).split("/")[0].split(" ")[0] or "?"
        namespace = str(event.get("objectRef", {}).get("namespace", ""))
        user = str(event.get("user", {}).get("username", ""))
        side = next((s for s, names in sides.items() if namespace in names), None)
        if side is None and ("keda" in agent.lower() or "keda" in user):
            side = "keda"
        elif side is None and agent.lower() in ("gpuyard", "kopf"):
            side = "gpuyard"
        if side is not None:
            counts[side][agent] += 1
    return {side: dict(c) for side, c in counts.items()}


def _timestamp(text: str) -> float:
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


@contextmanager
def operator(
    state: ClusterState, phase: Phase, proxy: CountingProxy, log_dir: Path
) -> Iterator[None]:
    env = {
        "GPUYARD_PROMETHEUS_URL": proxy.url,
        "GPUYARD_GPU_EXPORTER_MATCHERS": GPU_EXPORTER_MATCHERS,
        "GPUYARD_AUTOSCALE_INTERVAL": f"{phase.gpuyard_interval:g}",
    }
    process = OperatorProcess(state, log_dir / f"operator-{phase.name}.log", env)
    try:
        yield
    finally:
        process.stop()


def bench_namespaces(state: ClusterState, run_id: str) -> list[str]:
    listed = json.loads(kubectl(state, "get", "namespaces", "-o", "json"))
    names = [str(item["metadata"]["name"]) for item in listed["items"]]
    return [name for name in names if name.startswith(f"peers-{run_id}")]


def cleanup(state: ClusterState, run_id: str) -> None:
    for name in bench_namespaces(state, run_id):
        if name:
            subprocess.run(
                [*kubectl_base(state), "delete", "namespace", name, "--wait=false"],
                check=False, capture_output=True,
            )  # fmt: skip
            with suppress(OSError):
                http_json("DELETE", f"{state.dcgm_sim_url}/load/{name}/svc")


def kubectl_base(state: ClusterState) -> list[str]:
    return [str(binaries_dir(build=False) / "kubectl"), f"--kubeconfig={state.kubeconfig}"]


def keda_ready(state: ClusterState) -> None:
    try:
        kubectl(state, "get", "crd", "scaledobjects.keda.sh")
        kubectl(state, "get", "--raw", "/apis/external.metrics.k8s.io/v1beta1")
    except subprocess.CalledProcessError as error:
        raise SystemExit(
            "KEDA is not running on this cluster (the ScaledObject CRD or the external "
            f"metrics API is missing): start the cluster with --keda\n{error.stderr}"
        ) from error


# --- the report --------------------------------------------------------------------------------


def summarise(result: dict[str, Any]) -> dict[str, Any]:
    """The figures of one phase: reaction and floor percentiles, wake, flaps, cost."""
    summary: dict[str, Any] = {}
    steps = result["steps"]
    for system in result["namespaces"]:
        measured = [s for s in steps if s["reaction"][system] is not None]
        beyond = [s["reaction"][system] - s["floor"][system] for s in measured
                  if s["floor"][system] is not None]  # fmt: skip
        ups = [s["reaction"][system] for s in measured if s["after"] > s["before"]]
        wakes = [s["wake"][system] for s in steps if s["wake"].get(system) is not None]
        summary[system] = {
            "steps": len(steps),
            "reached": len(measured),
            "reaction": p50_p95([s["reaction"][system] for s in measured]) if measured else None,
            "reaction_up": p50_p95(ups) if ups else None,
            "beyond_floor": p50_p95(beyond) if beyond else None,
            "wake": wakes[0] if wakes else None,
            "flaps": result["flaps"][system],
            "gpu_seconds": result["gpu_seconds"][system],
            "cost": result["cost"][system],
        }
    floors = [s["floor"]["gpuyard"] for s in steps if s["floor"]["gpuyard"] is not None]
    summary["floor"] = p50_p95(floors) if floors else None
    return summary


def _pair(value: tuple[float, float] | None) -> str:
    return "-" if value is None else f"{value[0]:.1f} / {value[1]:.1f} s"


def _r(numerator: float | None, denominator: float | None) -> str:
    if numerator is None or denominator is None:
        return "-"
    return f"{ratio(numerator, denominator):.2f}"


def _seconds(value: float | None, default: str) -> str:
    return default if value is None else f"{value:g} s"


def _n(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _p95(value: tuple[float, float] | None) -> float | None:
    return None if value is None else value[1]


def phase_rows(phase: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """``(measure, gpuyard, KEDA + HPA, ratio KEDA+HPA / gpuyard)`` for one phase."""
    s = summarise(phase)
    g, k = (s.get(system, dict.fromkeys(s["gpuyard"])) for system in SYSTEMS)
    rows = [
        ("reaction p50 / p95, all steps", _pair(g["reaction"]), _pair(k["reaction"]),
         _r(_p95(k["reaction"]), _p95(g["reaction"])) + " (p95)"),
        ("reaction p50 / p95, steps up", _pair(g["reaction_up"]), _pair(k["reaction_up"]),
         _r(_p95(k["reaction_up"]), _p95(g["reaction_up"])) + " (p95)"),
        ("reaction minus floor p50 / p95", _pair(g["beyond_floor"]), _pair(k["beyond_floor"]),
         _r(_p95(k["beyond_floor"]), _p95(g["beyond_floor"])) + " (p95)"),
        ("demand at zero to first replica", _s(g["wake"]), _s(k["wake"]), _r(k["wake"], g["wake"])),
        ("replica changes over the noisy plateau", _n(g["flaps"], "d"), _n(k["flaps"], "d"),
         _r(k["flaps"], g["flaps"])),
        ("GPU-seconds over the profile", _n(g["gpu_seconds"], ".0f"),
         _n(k["gpu_seconds"], ".0f"), _r(k["gpu_seconds"], g["gpu_seconds"])),
        ("cost at 2.50 per GPU-hour", _n(g["cost"], ".3f"), _n(k["cost"], ".3f"),
         _r(k["cost"], g["cost"])),
    ]  # fmt: skip
    for row in phase.get("load", []):
        q, w, n = row["queries_per_minute"], row["writes_per_minute"], row["services"]
        rows.append((f"Prometheus queries/min at {n} service(s)", _n(q["gpuyard"], ".0f"),
                     _n(q.get("keda"), ".0f"), _r(q.get("keda"), q["gpuyard"])))  # fmt: skip
        rows.append((f"API server writes/min at {n} service(s)", _n(w["gpuyard"], ".0f"),
                     _n(w.get("keda"), ".0f"), _r(w.get("keda"), w["gpuyard"])))  # fmt: skip
    return rows


def markdown(run: dict[str, Any]) -> str:
    lines = []
    for phase in run["phases"]:
        p, s = phase["phase"], summarise(phase)
        lines += [
            f"**{p['name']}**: gpuyard interval {p['gpuyard_interval']:g} s, KEDA "
            f"pollingInterval {p['keda_polling'] or '30 s (default)'}, HPA sync period "
            f"{_seconds(p['hpa_sync'], '15 s (default)')}; {s['gpuyard']['steps']} steps, "
            f"Prometheus floor p50 / p95 {_pair(s['floor'])}",
            "",
            "| measure | gpuyard | KEDA + HPA | KEDA+HPA / gpuyard |",
            "|---|---:|---:|---:|",
            *(f"| {' | '.join(row)} |" for row in phase_rows(phase)),
            "",
            "| step: reaction / floor | gpuyard | KEDA + HPA |",
            "|---|---:|---:|",
        ]
        for step in phase["steps"]:
            cells = [f"{_s(step['reaction'].get(x))} / {_s(step['floor'].get(x))}"
                     for x in SYSTEMS]  # fmt: skip
            lines.append(f"| {step['segment']} | {' | '.join(cells)} |")
        for row in phase.get("load", []):
            agents = json.dumps(row["writes_by_agent"])
            lines.append(f"\nWrites by agent at {row['services']} service(s) over "
                         f"{row['seconds']:.0f} s: `{agents}`")  # fmt: skip
        lines.append("")
    return "\n".join(lines)


def step_curve(
    curve: list[list[float]], start: float, end: float
) -> tuple[list[float], list[float]]:
    """A recorded curve as x (seconds from ``start``) and y lists for a step plot."""
    # A curve recorded from the profile's start on (the load's) begins with its first value.
    before = [(t, int(v)) for t, v in curve if t <= start] or [(start, int(curve[0][1]))]
    xs, ys = [0.0], [float(value_at(before, start))]
    for t, v in curve:
        if start < t <= end:
            xs.append(t - start)
            ys.append(float(v))
    return [*xs, end - start], [*ys, ys[-1]]


def draw(run: dict[str, Any], path: Path) -> None:
    matplotlib.use("Agg")
    phases = run["phases"]
    figure, axes = plt.subplots(len(phases), 1, figsize=(10, 3.6 * len(phases)), squeeze=False)
    for axis, phase in zip(axes[:, 0], phases, strict=True):
        start, end = phase["started"], phase["ended"]
        wanted = [[t, replicas_for(v)] for t, v in phase["loads"]]
        xs, ys = step_curve(wanted, start, end)
        axis.step(xs, ys, where="post", color="0.6", linestyle=":",
                  label="what the load asks for, ceil(load / 50 %)")  # fmt: skip
        for system, colour, label in (("gpuyard", "tab:blue", "gpuyard"),
                                      ("keda", "tab:orange", "KEDA + HPA")):  # fmt: skip
            if system not in phase["curves"]:
                continue
            xs, ys = step_curve(phase["curves"][system], start, end)
            axis.step(xs, ys, where="post", color=colour, label=f"{label}: spec.replicas")
        p = phase["phase"]
        axis.set_title(f"{p['name']}: gpuyard {p['gpuyard_interval']:g} s interval; "
                       f"KEDA poll {p['keda_polling'] or 30} s, "
                       f"HPA sync {_seconds(p['hpa_sync'], '15 s')}")  # fmt: skip
        axis.set_xlabel("seconds into the profile")
        axis.set_ylabel("replicas")
        axis.legend(loc="upper right", fontsize="small")
        axis.grid(alpha=0.3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "load_average": list(os.getloadavg()),
            "platform": platform.platform()}  # fmt: skip


# --- main ---------------------------------------------------------------------------------------


def run_phases(bench: Bench, args: argparse.Namespace, run: dict[str, Any], log_dir: Path) -> None:
    """Each phase with its own operator and sync period. The first builds the load part's
    services (1, 10, 100 per side, the profile's pair among them) after its profile; a later
    phase first measures them at their largest size with its own settings (the
    ScaledObjects retuned), then deletes them and runs its own profile on a quiet cluster."""
    segments = profile(quick=args.quick)
    sizes = [1] if args.quick else [int(n) for n in args.sizes.split(",") if n]
    window = 20.0 if args.quick else args.load_window
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sides: dict[str, list[str]] | None = None
    for name in args.phases.split(","):
        phase = PHASES[name]
        set_hpa_sync_period(bench.state, phase.hpa_sync)
        with operator(bench.state, phase, bench.proxies["gpuyard"], log_dir):
            rows = []
            if sides is not None:
                if "keda" in sides:
                    retune(bench, sides["keda"], phase)
                rows.append(bench.count(phase, sides, window))
                run["pending"] = {"phase": name, "load": rows}
                args.out.write_text(json.dumps(run, indent=1))
                # While the operator runs: its finalizers release the services and pods.
                cleanup(bench.state, bench.run_id)
                wait_until(lambda: not bench_namespaces(bench.state, bench.run_id), 240,
                           "the load part's namespaces gone", required=False)  # fmt: skip
            result = bench.profile(phase, segments)
            result["machine_after_profile"] = machine()
            if sides is None:
                sides = {s: [ns] for s, ns in result["namespaces"].items()}
                for size in sizes:
                    bench.grow(phase, size, sides)
                    rows.append(bench.count(phase, sides, window))
            result["load"] = rows
            result["machine_after_load"] = machine()
            run["phases"].append(result)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(run, indent=1))
            if name == args.phases.split(",")[-1]:
                cleanup(bench.state, bench.run_id)
                wait_until(lambda: not bench_namespaces(bench.state, bench.run_id), 900,
                           "the namespaces to go")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one step, one service: a smoke run")
    parser.add_argument("--phases", default="defaults,tuned")
    parser.add_argument("--sizes", default="1,10,100", help="services per side for the load part")
    parser.add_argument("--load-window", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=19)
    parser.add_argument("--out", type=Path, default=Path("out/bench-peers.json"))
    parser.add_argument("--png", type=Path, default=Path("out/peers-replicas.png"))
    parser.add_argument("--render", type=Path, help="only print and draw a saved --out file")
    parser.add_argument("--gpuyard-only", action="store_true",
                        help="no KEDA: a smoke run of gpuyard's side alone")  # fmt: skip
    args = parser.parse_args()
    if args.render:
        saved = json.loads(args.render.read_text())
        for phase in saved["phases"]:
            recompute_reactions(phase)
        print(markdown(saved))
        draw(saved, args.png)
        return 0
    run_id = secrets.token_hex(2)
    log_dir = Path(tempfile.mkdtemp(prefix=f"bench-peers-{run_id}-"))
    run: dict[str, Any] = {"run_id": run_id, "seed": args.seed, "quick": args.quick,
                           "machine_before": machine(), "phases": []}  # fmt: skip
    with cluster() as state:
        systems = ("gpuyard",) if args.gpuyard_only else SYSTEMS
        if "keda" in systems:
            keda_ready(state)
        install_crds(state)
        kubectl(state, "apply", "-f", str(REPO_ROOT / "examples" / "pools.yaml"))
        client: ApiClient = kubernetes.config.new_client_from_config(config_file=state.kubeconfig)
        proxies = {s: CountingProxy(state.prometheus_url) for s in SYSTEMS}
        bench = Bench(state, client, DeploymentCurves(client, f"peers-{run_id}"), proxies,
                      run_id, args.seed, systems)  # fmt: skip
        log(f"run {run_id}; operator logs in {log_dir}")
        try:
            run_phases(bench, args, run, log_dir)
        finally:
            cleanup(state, run_id)
            set_hpa_sync_period(state, None)
            bench.curves.stop()
            for proxy in proxies.values():
                proxy.close()
            client.close()
    run["machine_after"] = machine()
    args.out.write_text(json.dumps(run, indent=1))
    print(markdown(run))
    draw(run, args.png)
    log(f"raw data in {args.out}, replica curves in {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
