"""What metering costs: CPU per meter tick, and the delay from a window's end to its sink.

1. **Cost per tick** (in process, no cluster): ``handlers.meter.meter_tick`` over 100, 1,000
   and 10,000 running GPU pods (10 pods per service), with Kopf's indices replaced by plain
   dicts, the Kubernetes client by a stub that accepts status patches, and the sinks by the
   real Prometheus counters plus a sink that only counts. CPU time is
   ``time.process_time()`` (every thread of the process, so the worker threads of status
   patches count too). Two ticks are measured:

   - *quiet*: no window closed since the last tick (11 ticks in 12 with the default 60 s
     windows and 5 s interval): the pods are parsed, nothing is cut;
   - *window*: one window closed: one record per pod is cut, measured (the utilisation
     range query, answered from a canned JSON body with one series per pod and decoded
     as the real client does), delivered, and one status patch per service is written.

   The baseline, measured in the same run, is what no meter can avoid: parsing the cached
   pods into lifetimes (``pod_lifetime_from_dict``). Ratios are against it.

2. **End to end** (needs a running local cluster with no other gpuyard operator on it):
   ``gpuyard run`` with 1 s usage windows, a CloudEvents receiver on loopback as its HTTP
   sink, and a few GPU pods; for every record, the receiver's receipt time minus the
   record's ``end``. A window is cut ``settle_seconds`` (5) after it ends, at the next
   meter tick, so the delay is bounded by settle_seconds + meter interval + one delivery.

    PYTHONPATH=hack .venv/bin/python bench/metering.py            # both parts
    PYTHONPATH=hack .venv/bin/python bench/metering.py --no-cluster

The cluster comes from ``GPUYARD_CLUSTER_STATE`` (printed by ``python -m localcluster up``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, cast

from common import OperatorProcess, install_crds
from common import kubectl as cluster_kubectl
from gpuyard.api.formats import format_time, parse_time
from gpuyard.config import Settings
from gpuyard.handlers.context import Caches, Operator
from gpuyard.handlers.meter import meter_tick, slim_pod
from gpuyard.handlers.workqueue import WorkQueue
from gpuyard.io.kube import Kube
from gpuyard.io.metrics import OperatorMetrics
from gpuyard.io.prometheus import Prometheus
from gpuyard.io.sinks import MultiSink, PrometheusSink
from gpuyard.logic.metering import (
    Account,
    MeterConfig,
    PodLifetime,
    PoolPricing,
    PricePoint,
    ServiceMark,
    UsageRecord,
    advance_mark,
    closed_through,
    mark_to_status,
    plan_tick,
    pod_lifetime_from_dict,
)
from gpuyard.logic.pool_accounting import NodeInfo
from localcluster.cluster import REPO_ROOT, ClusterState, free_port

WINDOW = 60
PODS_PER_SERVICE = 10
SIZES = (100, 1_000, 10_000)
# A tick's end, well after the pods started: the window [NOW - 65 s, NOW - 5 s) is closed.
NOW = datetime(2025, 3, 1, 12, 0, 5, 500_000, tzinfo=UTC)
POOLS = {
    "a100": ("a100-80gb", "2.50"),
    "l4": ("l4", "0.80"),
}

# --------------------------------------------------------------------------- cost per tick


class CountingSink:
    """Stands in for the ledger and HTTP sinks: acknowledges at once, keeps a count."""

    def __init__(self) -> None:
        self.records = 0
        self.measured = 0

    async def emit(self, records: Sequence[UsageRecord]) -> None:
        self.records += len(records)
        self.measured += sum(record.avg_utilization is not None for record in records)


LABELS = (("namespace", "namespace"), ("pod", "name"))


class CannedPrometheus:
    """Answers the meter's utilisation range query with one series per pod, decoded from
    JSON text as the real client decodes the HTTP body."""

    def __init__(self, pods: Sequence[dict[str, Any]], at: datetime) -> None:
        result = [
            {"metric": {key: pod["metadata"][name] for key, name in LABELS},
             "values": [[at.timestamp(), str(40 + index % 50)]]}
            for index, pod in enumerate(pods)
        ]  # fmt: skip
        data = {"resultType": "matrix", "result": result}
        self.body = json.dumps({"status": "success", "data": data})
        self.queries = 0

    def query_range(self, *_: object) -> dict[str, Any]:
        self.queries += 1
        decoded: dict[str, Any] = json.loads(self.body)
        return decoded

    async def aclose(self) -> None:
        return None


class StatusStub:
    """The Kubernetes client as far as the meter uses it for running pods."""

    def __init__(self) -> None:
        self.patches = 0

    def patch_status(self, *_: Any) -> None:
        self.patches += 1


CREATED = "2025-01-01T00:00:00Z"


def pool_body(name: str) -> dict[str, Any]:
    """A pool as the meter left it: its finalizer on, its price history written."""
    gpu_type, price = POOLS[name]
    return {
        "apiVersion": "gpuyard.io/v1alpha1",
        "kind": "GPUPool",
        "metadata": {
            "name": name,
            "creationTimestamp": CREATED,
            "finalizers": ["gpuyard.io/metering"],
        },
        "spec": {
            "gpuType": gpu_type,
            "nodeSelector": {"gpuyard.io/pool": name},
            "price": {"perGpuHour": price, "currency": "USD"},
        },
        "status": {
            "billing": {
                "priceHistory": [{"effectiveFrom": CREATED, "perGpuHour": price}],
                "unmanagedGpus": 0,
            }
        },
    }


def pool_of(service: int) -> str:
    return "a100" if service % 2 else "l4"


def owner_chain(service: int) -> dict[str, dict[str, Any]]:
    """The ReplicaSet, Deployment and AIService metadata that make a pod the service's."""
    name = f"svc-{service}"
    uid = f"{service:08d}"
    return {
        "ReplicaSet": {
            "name": f"{name}-7d9f",
            "uid": f"rs-{uid}",
            "ownerReferences": [owner_ref("apps/v1", "Deployment", name, f"dep-{uid}")],
        },
        "Deployment": {
            "name": name,
            "uid": f"dep-{uid}",
            "ownerReferences": [owner_ref("gpuyard.io/v1alpha1", "AIService", name, f"ais-{uid}")],
        },
        "AIService": {"name": name, "namespace": f"team-{service % 10}", "uid": f"ais-{uid}"},
    }


def owner_ref(api_version: str, kind: str, name: str, uid: str) -> dict[str, Any]:
    return {"apiVersion": api_version, "kind": kind, "name": name, "uid": uid, "controller": True}


def pod_body(index: int, started: datetime) -> dict[str, Any]:
    """A running gpuyard pod as the API server returns it (the meter slims it)."""
    service = index // PODS_PER_SERVICE
    pool = pool_of(service)
    replica_set = owner_chain(service)["ReplicaSet"]
    stamp = format_time(started + timedelta(seconds=index % 50))
    gpus = str(1 + service % 4)
    return {
        "metadata": {
            "name": f"svc-{service}-{index}",
            "namespace": f"team-{service % 10}",
            "uid": f"00000000-0000-4000-8000-{index:012d}",
            "labels": {"gpuyard.io/service": f"svc-{service}", "gpuyard.io/pool": pool},
            "finalizers": ["gpuyard.io/metering"],
            "resourceVersion": "1",
            "ownerReferences": [
                owner_ref("apps/v1", "ReplicaSet", replica_set["name"], replica_set["uid"])
            ],
        },
        "spec": {
            "nodeName": f"gpu-{pool}-{index % 8}",
            "containers": [
                {
                    "name": "model",
                    "image": "registry.example/llm:1",
                    "resources": {
                        "limits": {"nvidia.com/gpu": gpus, "memory": "16Gi"},
                        "requests": {"nvidia.com/gpu": gpus, "cpu": "2", "memory": "16Gi"},
                    },
                }
            ],
        },
        "status": {
            "phase": "Running",
            "startTime": stamp,
            "conditions": [
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": stamp},
                {"type": "Initialized", "status": "True", "lastTransitionTime": stamp},
                {"type": "ContainersReady", "status": "True", "lastTransitionTime": stamp},
                {"type": "Ready", "status": "True", "lastTransitionTime": stamp},
            ],
            "containerStatuses": [
                {"name": "model", "ready": True, "state": {"running": {"startedAt": stamp}}}
            ],
        },
    }


def operator_with(pods: int, mark_at: datetime) -> tuple[Operator, CountingSink, StatusStub]:
    """An Operator whose caches hold `pods` running pods, every service marked at `mark_at`."""
    settings = Settings(usage_window_seconds=WINDOW, usage_stdout=False, cluster_id="bench")
    metrics = OperatorMetrics()
    bodies = [slim_pod(pod_body(i, NOW - timedelta(hours=1))) for i in range(pods)]
    services: dict[tuple[str, str], list[dict[str, Any]]] = {}
    replica_sets: dict[tuple[str, str], list[dict[str, Any]]] = {}
    deployments: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for service in range(pods // PODS_PER_SERVICE):
        chain = owner_chain(service)
        namespace = chain["AIService"]["namespace"]
        services[(namespace, f"svc-{service}")] = [
            {"metadata": chain["AIService"], "spec": {"pool": pool_of(service)}, "status": {}}
        ]
        replica_sets[(namespace, chain["ReplicaSet"]["name"])] = [chain["ReplicaSet"]]
        deployments[(namespace, f"svc-{service}")] = [chain["Deployment"]]
    nodes = {
        f"gpu-{pool}-{index}": [
            NodeInfo(name=f"gpu-{pool}-{index}", labels={"gpuyard.io/pool": pool}, ready=True)
        ]
        for pool in POOLS
        for index in range(8)
    }
    caches = Caches(
        pools={name: [pool_body(name)] for name in POOLS},
        services=services,
        services_by_pool={},
        nodes=nodes,
        gpu_pods={},
        deployments={},
        network_services={},
        namespaces={},
        metered_pods={body["metadata"]["uid"]: [body] for body in bodies},
        replicasets=replica_sets,
        deployment_owners=deployments,
    )
    stub = StatusStub()
    sink = CountingSink()
    window_end = closed_through(NOW, WINDOW, MeterConfig().settle_seconds)
    operator = Operator(
        settings=settings,
        kube=cast(Kube, stub),  # running pods: the meter only patches statuses
        metrics=metrics,
        caches=caches,
        sinks=MultiSink({"prometheus": PrometheusSink(metrics.registry), "null": sink}),
        prometheus=cast(Prometheus, CannedPrometheus(bodies, window_end)),
    )
    # The meter asks for a service reconcile when a service's UsageReported changes.
    operator.service_queue = WorkQueue("service", _no_reconcile)
    set_marks(operator, mark_at)
    return operator, sink, stub


async def _no_reconcile(_: object) -> None:
    return None


def set_marks(operator: Operator, mark_at: datetime) -> None:
    """Every service's stored mark at `mark_at`, and nothing remembered in memory."""
    usage = mark_to_status(ServiceMark(reported_through=mark_at, currency="USD"))
    for (body,) in operator.caches.services.values():
        body["status"] = {"usage": usage}
    operator.marks.clear()


def cpu_seconds(run: Callable[[], object], repeat: int) -> float:
    """The least CPU time of `repeat` runs (the least disturbed by everything else)."""
    best = float("inf")
    for _ in range(repeat):
        started = time.process_time()
        run()
        best = min(best, time.process_time() - started)
    return best


def tick_costs(pods: int, repeat: int) -> dict[str, float]:
    through = closed_through(NOW, WINDOW, MeterConfig().settle_seconds)
    previous = through - timedelta(seconds=WINDOW)
    operator, sink, stub = operator_with(pods, previous)
    created = parse_time(CREATED)
    pricing = {
        name: PoolPricing(
            name=name,
            gpu_type=gpu_type,
            currency="USD",
            prices=(PricePoint(created, Decimal(price)),),
            node_selector=(("gpuyard.io/pool", name),),
        )
        for name, (gpu_type, price) in POOLS.items()
    }
    cached = list(operator.caches.all_metered_pods())
    loop = asyncio.new_event_loop()

    def baseline() -> None:
        for pod in cached:
            pool = pricing[pod["metadata"]["labels"]["gpuyard.io/pool"]]
            service = pod["metadata"]["labels"]["gpuyard.io/service"]
            pod_lifetime_from_dict(pod, pool, service=service, cluster_id="bench")

    async def tick_and_deliveries() -> None:
        # Deliveries run in tasks of their own: the tick's cost includes them.
        await meter_tick(operator, NOW)
        await asyncio.gather(*operator.deliveries.values())

    def window_tick() -> None:
        set_marks(operator, previous)
        loop.run_until_complete(tick_and_deliveries())

    def quiet_tick() -> None:
        loop.run_until_complete(tick_and_deliveries())

    try:
        costs = {"baseline": cpu_seconds(baseline, repeat)}
        costs["window"] = cpu_seconds(window_tick, repeat)
        # Check the window tick did what it claims: one record per pod, each with its
        # utilisation, from one range query; one patch per service.
        assert sink.records == sink.measured == pods * repeat, (sink.records, pods, repeat)
        assert cast(CannedPrometheus, operator.prometheus).queries == repeat
        assert stub.patches == len(operator.caches.services) * repeat
        set_marks(operator, through)
        costs["quiet"] = cpu_seconds(quiet_tick, repeat)
        assert sink.records == pods * repeat  # nothing new was cut
    finally:
        loop.close()
    return costs


def run_tick_bench(repeat: int) -> list[str]:
    lines = [
        f"meter_tick CPU time, {WINDOW} s windows, {PODS_PER_SERVICE} pods per service, "
        f"least of {repeat} runs",
        "",
        "| running pods | baseline: parse pods | quiet tick | ratio | window tick | ratio "
        "| window tick per pod |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    print("\n".join(lines), flush=True)
    for pods in SIZES:
        costs = tick_costs(pods, repeat)
        base = costs["baseline"]
        lines.append(
            f"| {pods:,} | {base * 1e3:.1f} ms | {costs['quiet'] * 1e3:.1f} ms "
            f"| {costs['quiet'] / base:.2f}x | {costs['window'] * 1e3:.1f} ms "
            f"| {costs['window'] / base:.2f}x | {costs['window'] / pods * 1e6:.0f} µs |"
        )
        print(lines[-1], flush=True)
    return lines


# --------------------------------------------------------------------------- end to end


class Receiver:
    """A CloudEvents endpoint that notes when each record arrived."""

    def __init__(self, port: int) -> None:
        self.arrivals: list[tuple[float, dict[str, Any]]] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                arrived = time.time()
                with receiver._lock:
                    receiver.arrivals.extend((arrived, e["data"]) for e in json.loads(body))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{port}/api/v1/events"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def take(self) -> list[tuple[float, dict[str, Any]]]:
        with self._lock:
            taken, self.arrivals = self.arrivals, []
        return taken


def wait_for(check: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.25)


@contextmanager
def operator_process(state: ClusterState, env: dict[str, str], log: Path) -> Iterator[None]:
    operator = OperatorProcess(state, log, env)
    try:
        yield
    finally:
        operator.stop()


def percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def run_backlog_bench(pods: int, hours: float) -> list[str]:
    """How a service of `pods` pods that is `hours` behind catches up: the batches
    plan_tick hands out from its mark (bounded by MeterConfig's records per batch, whole
    windows each) until the mark reaches the last closed window, with their CPU time."""
    config = MeterConfig()
    through = closed_through(NOW, WINDOW, config.settle_seconds)
    behind = through - timedelta(hours=hours)
    started = parse_time(CREATED)
    pool = PoolPricing(
        name="a100",
        gpu_type="a100-80gb",
        currency="USD",
        prices=(PricePoint(started, Decimal("2.50")),),
    )
    lifetimes = [
        PodLifetime(
            cluster_id="bench",
            pod_uid=f"pod-{index}",
            pod_name=f"llm-{index}",
            namespace="team-0",
            service="llm",
            pool="a100",
            gpu_type="a100-80gb",
            gpus=1,
            bound_at=started,
            ended_at=None,
            prices=pool.prices,
            currency="USD",
            ready_at=started,  # warm: the records carry no starting seconds
        )
        for index in range(pods)
    ]
    key = Account("team-0", "llm")
    marks = {key: ServiceMark(reported_through=behind, currency="USD")}
    sizes: list[int] = []
    cpu = time.process_time()
    while marks[key].reported_through < through:
        (batch,) = plan_tick(lifetimes, marks, NOW, config)
        sizes.append(len(batch.records))
        marks[key] = advance_mark(marks[key], batch.records, batch.through)
    cpu = time.process_time() - cpu
    lines = [
        f"catch-up of {hours:g} h for one service of {pods:,} pods ({WINDOW} s windows, "
        f"at most {config.max_records_per_batch:,} records per batch): {len(sizes)} batches "
        f"of {min(sizes):,}-{max(sizes):,} records, {sum(sizes):,} records in all, "
        f"planned in {cpu:.2f} s CPU ({cpu / len(sizes) * 1e3:.0f} ms per batch)"
    ]
    print("\n".join(lines), flush=True)
    return lines


def run_e2e_bench(seconds: float, intervals: Sequence[float]) -> list[str]:
    state = os.environ.get("GPUYARD_CLUSTER_STATE")
    if not state:
        raise SystemExit("set GPUYARD_CLUSTER_STATE (python -m localcluster up prints it)")
    cluster = ClusterState.load(Path(state).parent)

    def kubectl(*args: str, stdin: str | None = None) -> str:
        return cluster_kubectl(cluster, *args, stdin=stdin)

    namespace = f"bench-metering-{os.getpid()}"
    install_crds(cluster)
    kubectl("apply", "-f", str(REPO_ROOT / "examples" / "pools.yaml"))
    kubectl("create", "namespace", namespace)
    services = [("chat", "l4", 1, 3), ("train", "a100", 2, 2)]
    lines = [
        f"end-to-end delay, window end -> record at the HTTP sink: 1 s windows, "
        f"{sum(s[3] for s in services)} pods of {len(services)} services, {seconds:.0f} s "
        "per interval, settle_seconds 5",
        "",
        "| meter interval | records | windows | p50 | p95 | max | bound: settle + interval |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    print("\n".join(lines), flush=True)
    receiver = Receiver(free_port())
    log = Path(tempfile.mkdtemp(prefix="bench-metering-")) / "operator.log"
    try:
        for interval in intervals:
            env = {
                "GPUYARD_USAGE_WINDOW_SECONDS": "1",
                "GPUYARD_METER_INTERVAL": str(interval),
                "GPUYARD_USAGE_HTTP_URL": receiver.url,
                "GPUYARD_USAGE_HTTP_ALLOW_INSECURE": "true",  # a loopback receiver
            }
            with operator_process(cluster, env, log):
                items = [
                    {
                        "apiVersion": "gpuyard.io/v1alpha1",
                        "kind": "AIService",
                        "metadata": {"name": name},
                        "spec": {
                            "pool": pool,
                            "gpusPerReplica": gpus,
                            "container": {"image": "registry.example/llm:1"},
                            "minReplicas": 0,
                            "maxReplicas": 8,
                            "replicas": replicas,
                            "autoscaling": {"mode": "Off"},
                        },
                    }
                    for name, pool, gpus, replicas in services
                ]
                manifest = json.dumps({"apiVersion": "v1", "kind": "List", "items": items})
                kubectl("apply", "-n", namespace, "-f", "-", stdin=manifest)
                # Measure only once the meter is past its catch-up from the pods' start.
                wait_for(lambda: len(receiver.take()) > 0, 60, "the first records")
                time.sleep(10)  # the catch-up backlog drains; these arrivals are not measured
                receiver.take()
                time.sleep(seconds)  # the measurement period
                arrivals = receiver.take()
            delays = [
                arrived - parse_time(data["end"]).timestamp()
                for arrived, data in arrivals
                if data["namespace"] == namespace
            ]
            windows = {data["end"] for _, data in arrivals if data["namespace"] == namespace}
            lines.append(
                f"| {interval:g} s | {len(delays)} | {len(windows)} "
                f"| {statistics.median(delays):.2f} s | {percentile(delays, 0.95):.2f} s "
                f"| {max(delays):.2f} s | {5 + interval:g} s + delivery |"
            )
            print(lines[-1], flush=True)
    finally:
        # Scale to zero with an operator running, so the meter releases its finalizers.
        with operator_process(cluster, {"GPUYARD_METER_INTERVAL": "0.5"}, log):
            for name, *_ in services:
                kubectl("scale", "-n", namespace, f"ais/{name}", "--replicas=0")

            def released() -> bool:
                out = kubectl("get", "pods", "-n", namespace, "-o", "name")
                return not out.strip()

            wait_for(released, 120, "the pods to be billed and released")
        kubectl("delete", "namespace", namespace, "--wait=false")
        receiver.server.shutdown()
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5, help="runs per measurement")
    parser.add_argument("--no-cluster", action="store_true", help="skip the end-to-end part")
    parser.add_argument("--e2e-seconds", type=float, default=30, help="measured per interval")
    parser.add_argument(
        "--intervals", default="0.5,5", help="meter intervals to measure end to end (s)"
    )
    args = parser.parse_args(argv)
    print(
        f"# {datetime.now(UTC):%Y-%m-%d} on {platform.node()}, Python {platform.python_version()}"
    )
    print(f"# {os.cpu_count()} CPUs; command: {' '.join([Path(sys.argv[0]).name, *sys.argv[1:]])}")
    run_tick_bench(args.repeat)
    print()
    run_backlog_bench(pods=1_000, hours=1)
    if not args.no_cluster:
        print()
        run_e2e_bench(args.e2e_seconds, [float(i) for i in args.intervals.split(",")])
    return 0


if __name__ == "__main__":
    sys.exit(main())
