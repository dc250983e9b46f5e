"""How long gpuyard takes to turn N AIServices into N Deployments, against the client alone.

For each N, in the same run and on the same cluster:

1. *direct*: N Deployments created with the Kubernetes Python client, 8 at a time, in a
   fresh namespace: the floor, what the API server and etcd need to store them;
2. *gpuyard*: N AIServices created the same way in another fresh namespace, and the
   operator (``gpuyard run``, started by this script so that its memory is its own)
   creates their Deployments.

Both clocks run from the first create until a watch on the namespace has seen all N
Deployments. The Deployments of (1) are the ones gpuyard builds for the AIServices of
(2), without the owner reference and the managed-by label (which would make the garbage
collector or gpuyard act on them). The services run in mode Off with 0 replicas, so what
is measured is the operator's reconcile path, not the scheduler or the simulated nodes.

The operator's peak RSS is its ``VmHWM`` from ``/proc/<pid>/status``.

Usage (a running cluster is reused through GPUYARD_CLUSTER_STATE, else one is started
and stopped)::

    PYTHONPATH=hack .venv/bin/python bench/reconcile.py --n 100 --n 1000

``--template vllm`` gives every service (and every direct Deployment) the pod surface of
``examples/vllm.yaml`` (Secret env, volumes and mounts, three probes, pull secret,
ServiceAccount, security context, pod labels) instead of a bare image.

``--pool dra`` runs the services on a GPUPool of DRA nodes instead (``--dra-nodes`` of
them, 8 GPUs each, each with its ResourceSlice as NVIDIA's DRA driver publishes it; the
pool counts their devices through the DeviceClass gpu.nvidia.com), so that the operator
also caches and watches ResourceSlices, ResourceClaims and DeviceClasses. Run it beside a
default run to compare the two kinds of pool: the ratio and the peak RSS of each.

``--profile FILE`` runs the operator under cProfile (its event loop thread) and writes the
statistics to FILE when it stops; ``--workers`` passes ``GPUYARD_WORKERS``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import kubernetes
import yaml
from kubernetes.client import ApiClient, ApiException
from urllib3.exceptions import HTTPError

from common import OperatorProcess, cluster, install_crds, log
from gpuyard.api.pool import GPUPool
from gpuyard.api.service import AIService
from gpuyard.logic.children import MANAGED_BY_LABEL, build_deployment, owner_reference
from gpuyard.logic.drift import with_applied_hash
from localcluster.cluster import (
    ClusterState,
    cache_dir,
)
from localcluster.topology import DRA_DRIVER, dra_gpu_node, resource_slice

IMAGE = "registry.example/llm:1"
VLLM_EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "vllm.yaml"
CLIENT_CONCURRENCY = 8
WAIT_TIMEOUT = 900.0


# --- the objects -----------------------------------------------------------------------


def _vllm_surface() -> dict[str, Any]:
    """The vLLM example's spec, less what would change the measured path: it scales by hand
    to 0 replicas, so no pod, claim or PodDisruptionBudget is made, and has no Service."""
    [service] = [
        obj for obj in yaml.safe_load_all(VLLM_EXAMPLE.read_text()) if obj["kind"] == "AIService"
    ]
    spec: dict[str, Any] = service["spec"]
    surface = {key: value for key, value in spec.items() if key not in SCALING_FIELDS}
    # No port, so no Service per AIService: 1,000 ClusterIPs would not fit the local
    # cluster's service range, and the Services are not the pod template. The probes name
    # the port themselves instead.
    container = dict(surface["container"])
    port = container.pop("port")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        container[probe] = {
            **container[probe],
            "httpGet": {**container[probe]["httpGet"], "port": port},
        }
    return {**surface, "container": container}


SCALING_FIELDS = ("pool", "gpusPerReplica", "minReplicas", "maxReplicas", "autoscaling")
TEMPLATES: dict[str, Callable[[], dict[str, Any]]] = {
    "minimal": lambda: {"container": {"image": IMAGE}},
    "vllm": _vllm_surface,
}


def service_body(name: str, pool: str, surface: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "gpuyard.io/v1alpha1",
        "kind": "AIService",
        "metadata": {"name": name},
        "spec": {
            **surface,
            "pool": pool,
            "gpusPerReplica": 1,
            "minReplicas": 0,
            "maxReplicas": 1,
            "replicas": 0,
            "autoscaling": {"mode": "Off"},
        },
    }


def pool_body(name: str, *, dra: bool = False) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "gpuType": "l4",
        "nodeSelector": {"gpuyard.io/pool": "l4"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}],
        "price": {"perGpuHour": "0.80"},
    }
    if dra:
        spec |= {
            "nodeSelector": {"gpuyard.io/pool": name},
            "devices": {"deviceClassName": DRA_DRIVER},
        }
    return {
        "apiVersion": "gpuyard.io/v1alpha1",
        "kind": "GPUPool",
        "metadata": {"name": name},
        "spec": spec,
    }


@contextmanager
def dra_nodes(client: ApiClient, pool: str, count: int) -> Iterator[None]:
    """`count` DRA nodes of 8 GPUs for `pool`, with their ResourceSlices, removed after."""
    core = kubernetes.client.CoreV1Api(client)
    custom = kubernetes.client.CustomObjectsApi(client)
    names = [f"bench-dra-{pool}-{index}" for index in range(count)]
    for name in names:
        core.create_node(dra_gpu_node(name, pool=pool, gpus=8, gpu_type="l4"))
        custom.create_cluster_custom_object(
            "resource.k8s.io", "v1", "resourceslices", resource_slice(name, gpus=8, gpu_type="l4")
        )
    log(f"{count} DRA nodes of 8 GPUs for pool {pool}")
    try:
        yield
    finally:
        for name in names:
            core.delete_node(name)
            custom.delete_cluster_custom_object(
                "resource.k8s.io", "v1", "resourceslices", f"{name}-{DRA_DRIVER}"
            )


def direct_deployment(
    name: str, namespace: str, pool: dict[str, Any], surface: dict[str, Any]
) -> dict[str, Any]:
    """The Deployment gpuyard builds for ``service_body(name)``, as a plain user would post
    it: no owner reference (its owner does not exist) and not labelled as gpuyard's."""
    body = {**service_body(name, pool["metadata"]["name"], surface)}
    body["metadata"] = {"name": name, "namespace": namespace, "uid": "bench", "generation": 1}
    service = AIService.from_mapping(body)
    deployment = with_applied_hash(
        build_deployment(service, GPUPool.from_mapping(pool), 0, owner_reference(service))
    )
    metadata = deployment["metadata"]
    del metadata["ownerReferences"]
    metadata["labels"][MANAGED_BY_LABEL] = "bench"
    deployment["spec"]["template"]["metadata"]["labels"][MANAGED_BY_LABEL] = "bench"
    return deployment


# --- the operator under test -----------------------------------------------------------


def peak_memory(operator: OperatorProcess) -> dict[str, int]:
    """VmHWM (peak) and VmRSS (now) of the operator, in KiB."""
    found = {}
    for line in Path(f"/proc/{operator.process.pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in {"VmHWM", "VmRSS"}:
            found[key] = int(value.split()[0])
    return found


def counters(operator: OperatorProcess) -> dict[str, float]:
    """Reconciles and API writes so far, from the operator's /metrics."""
    totals: dict[str, float] = {}
    for line in operator.metrics().splitlines():
        for prefix, name in (
            ("gpuyard_reconciles_total{", "reconciles"),
            ("gpuyard_kubernetes_writes_total{", "writes"),
        ):
            if line.startswith(prefix):
                key = name + line[len(prefix) - 1 : line.index("}") + 1]
                totals[key] = totals.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
    return totals


# --- measuring -------------------------------------------------------------------------


class DeploymentWatch(threading.Thread):
    """Counts the Deployments that appear in a namespace, from a raw watch stream (no
    client models: decoding a thousand of them would load the benchmark's own CPU)."""

    def __init__(self, client: ApiClient, namespace: str, expected: int) -> None:
        super().__init__(daemon=True)
        self.apps = kubernetes.client.AppsV1Api(client)
        self.namespace = namespace
        self.expected = expected
        self.seen: set[str] = set()
        self.done_at: float | None = None
        self.error: BaseException | None = None
        existing = self.apps.list_namespaced_deployment(namespace, _preload_content=False)
        listing = json.loads(existing.data)
        self.resource_version = listing["metadata"]["resourceVersion"]
        self.seen.update(item["metadata"]["name"] for item in listing["items"])
        self.finished = threading.Event()

    def run(self) -> None:
        try:
            response = self.apps.list_namespaced_deployment(
                self.namespace,
                watch=True,
                resource_version=self.resource_version,
                allow_watch_bookmarks=False,
                timeout_seconds=int(WAIT_TIMEOUT),
                _preload_content=False,
                _request_timeout=WAIT_TIMEOUT + 30,
            )
            buffer = b""
            for chunk in response.stream(65536):
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    if line and self._record(json.loads(line)):
                        response.release_conn()
                        return
        except (OSError, ValueError, ApiException, HTTPError) as error:  # see wait()
            self.error = error
        finally:
            self.finished.set()

    def _record(self, event: dict[str, Any]) -> bool:
        if event.get("type") in {"ADDED", "MODIFIED"}:
            self.seen.add(event["object"]["metadata"]["name"])
        if len(self.seen) >= self.expected and self.done_at is None:
            self.done_at = time.monotonic()
            return True
        return False

    def wait(self) -> float:
        if not self.finished.wait(WAIT_TIMEOUT + 60):
            raise TimeoutError(f"{len(self.seen)}/{self.expected} Deployments after the wait")
        if self.done_at is None:
            raise RuntimeError(
                f"watch ended at {len(self.seen)}/{self.expected} Deployments: {self.error!r}"
            )
        return self.done_at


@dataclass
class Timing:
    created: float  # seconds until the last create call returned
    ready: float  # seconds until all N Deployments existed
    cpu: dict[str, float]  # CPU seconds each process used meanwhile


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_snapshot(pids: dict[str, int]) -> dict[str, float]:
    found = {}
    for name, pid in pids.items():
        try:
            found[name] = cpu_seconds(pid)
        except (FileNotFoundError, ProcessLookupError):
            continue
    return found


def timed_creation(
    client: ApiClient, namespace: str, n: int, create: Callable[[int], Any], pids: dict[str, int]
) -> Timing:
    watch = DeploymentWatch(client, namespace, n)
    watch.start()
    cpu_before = cpu_snapshot(pids)
    started = time.monotonic()
    with ThreadPoolExecutor(CLIENT_CONCURRENCY) as pool:
        list(pool.map(create, range(n)))
    created = time.monotonic() - started
    ready = watch.wait() - started
    cpu_after = cpu_snapshot(pids)
    cpu = {name: round(cpu_after[name] - cpu_before[name], 1) for name in cpu_after}
    return Timing(created=created, ready=ready, cpu=cpu)


@contextmanager
def fresh_namespace(client: ApiClient, stem: str) -> Iterator[str]:
    core = kubernetes.client.CoreV1Api(client)
    name = f"bench-{stem}-{secrets.token_hex(3)}"
    core.create_namespace({"metadata": {"name": name}})
    try:
        yield name
    finally:
        core.delete_namespace(name, propagation_policy="Background")


def wait_namespaces_gone(client: ApiClient, names: list[str], timeout: float = 600) -> None:
    """Let the cluster settle between rounds: a namespace being emptied loads the API
    server and the operator, which would bill the next round."""
    core = kubernetes.client.CoreV1Api(client)
    deadline = time.monotonic() + timeout
    for name in names:
        while time.monotonic() < deadline:
            try:
                core.read_namespace(name)
            except kubernetes.client.ApiException as error:
                if error.status == 404:
                    break
                raise
            time.sleep(1)
        else:
            log(f"namespace {name} still there after {timeout:.0f}s; going on")


def wait_idle(operator: OperatorProcess, timeout: float = 600) -> None:
    """Until the operator's reconcile count stops moving for two seconds."""
    deadline = time.monotonic() + timeout
    last, still_since = -1.0, time.monotonic()
    while time.monotonic() < deadline:
        count = sum(v for k, v in counters(operator).items() if k.startswith("reconciles"))
        if count != last:
            last, still_since = count, time.monotonic()
        elif time.monotonic() - still_since >= 2:
            return
        time.sleep(0.5)


def measure(
    client: ApiClient,
    operator: OperatorProcess,
    pool: dict[str, Any],
    n: int,
    *,
    pids: dict[str, int],
    surface: dict[str, Any],
) -> dict[str, Any]:
    custom = kubernetes.client.CustomObjectsApi(client)
    apps = kubernetes.client.AppsV1Api(client)
    pool_name = pool["metadata"]["name"]
    namespaces = []
    with fresh_namespace(client, f"direct-{n}") as namespace:
        namespaces.append(namespace)
        direct = timed_creation(
            client,
            namespace,
            n,
            lambda i: apps.create_namespaced_deployment(
                namespace,
                direct_deployment(f"svc-{i}", namespace, pool, surface),
                _preload_content=False,
            ),
            pids,
        )
        log(f"N={n} direct: {direct.ready:.2f}s (creates returned after {direct.created:.2f}s)")
    before = counters(operator)
    with fresh_namespace(client, f"ais-{n}") as namespace:
        namespaces.append(namespace)
        gpuyard = timed_creation(
            client,
            namespace,
            n,
            lambda i: custom.create_namespaced_custom_object(
                "gpuyard.io",
                "v1alpha1",
                namespace,
                "aiservices",
                service_body(f"svc-{i}", pool_name, surface),
                _preload_content=False,
            ),
            pids,
        )
        log(f"N={n} gpuyard: {gpuyard.ready:.2f}s (creates returned after {gpuyard.created:.2f}s)")
        after_ready = counters(operator)
        wait_idle(operator)
        after_idle = counters(operator)
    memory = peak_memory(operator)
    wait_namespaces_gone(client, namespaces)
    return {
        "n": n,
        "direct_s": round(direct.ready, 2),
        "direct_creates_s": round(direct.created, 2),
        "gpuyard_s": round(gpuyard.ready, 2),
        "gpuyard_creates_s": round(gpuyard.created, 2),
        "ratio": round(gpuyard.ready / direct.ready, 2),
        "operator_peak_rss_mib": round(memory["VmHWM"] / 1024, 1),
        "operator_rss_mib": round(memory["VmRSS"] / 1024, 1),
        "direct_cpu_s": direct.cpu,
        "gpuyard_cpu_s": gpuyard.cpu,
        "until_ready": _delta(before, after_ready),
        "until_idle": _delta(before, after_idle),
    }


def _delta(before: dict[str, float], after: dict[str, float]) -> dict[str, int]:
    return {
        key: int(value - before.get(key, 0.0))
        for key, value in sorted(after.items())
        if value - before.get(key, 0.0)
    }


# --- main ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, action="append", help="services per round (repeat)")
    parser.add_argument("--workers", type=int, help="GPUYARD_WORKERS of the operator")
    parser.add_argument("--profile", type=Path, help="cProfile the operator into this file")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument(
        "--pool",
        choices=("device-plugin", "dra"),
        default="device-plugin",
        help="the services' GPUPool: the l4 nodes' device plugin, or DRA nodes of its own",
    )
    parser.add_argument("--dra-nodes", type=int, default=50, help="DRA nodes of --pool dra")
    parser.add_argument(
        "--template", choices=sorted(TEMPLATES), default="minimal", help="the services' pod surface"
    )
    args = parser.parse_args(argv)
    surface = TEMPLATES[args.template]()
    rounds = args.n or [100, 1000]

    with cluster() as state, contextlib.ExitStack() as stack:
        client = kubernetes.config.new_client_from_config(config_file=state.kubeconfig)
        client.configuration.connection_pool_maxsize = CLIENT_CONCURRENCY * 2
        install_crds(state)
        custom = kubernetes.client.CustomObjectsApi(client)
        dra = args.pool == "dra"
        pool = pool_body(f"bench-{secrets.token_hex(3)}", dra=dra)
        pool_name = pool["metadata"]["name"]
        nodes = dra_nodes(client, pool_name, args.dra_nodes) if dra else contextlib.nullcontext()
        stack.enter_context(nodes)
        custom.create_cluster_custom_object("gpuyard.io", "v1alpha1", "gpupools", pool)
        env = {}
        if args.workers:
            env["GPUYARD_WORKERS"] = str(args.workers)
        profile = ["-m", "cProfile", "-o", str(args.profile.resolve())] if args.profile else []
        log_path = Path(cache_dir() / "bench-operator.log")
        log(f"operator log: {log_path}")
        operator = OperatorProcess(state, log_path, env, profile)
        results = []
        try:
            wait_idle(operator)
            pids = {
                **{name: state.pids[name] for name in ("kube-apiserver", "etcd")},
                "kube-controller-manager": state.pids["kube-controller-manager"],
                "operator": operator.process.pid,
                "bench": os.getpid(),
            }
            for n in rounds:
                results.append(measure(client, operator, pool, n, pids=pids, surface=surface))
        finally:
            operator.stop()
            custom.delete_cluster_custom_object(
                "gpuyard.io", "v1alpha1", "gpupools", pool["metadata"]["name"]
            )
    report(
        results, state, args.template, f"{args.pool} ({args.dra_nodes} nodes)" if dra else args.pool
    )
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


def report(
    results: list[dict[str, Any]], state: ClusterState, template: str, pool_kind: str
) -> None:
    print(f"# {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, Kubernetes {state.kubernetes_version}")
    print(
        f"# client concurrency {CLIENT_CONCURRENCY}; services in mode Off with 0 replicas; "
        f"pod template {template}; pool {pool_kind}"
    )
    print(f"# {os.cpu_count()} CPUs, load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    header = (
        f"{'N':>6} {'direct s':>9} {'gpuyard s':>10} {'ratio':>6} "
        f"{'peak RSS MiB':>13} {'RSS MiB':>8}"
    )
    print(header)
    for r in results:
        print(
            f"{r['n']:>6} {r['direct_s']:>9.2f} {r['gpuyard_s']:>10.2f} {r['ratio']:>6.2f} "
            f"{r['operator_peak_rss_mib']:>13.1f} {r['operator_rss_mib']:>8.1f}"
        )
    for r in results:
        print(f"# N={r['n']} CPU seconds while measuring, direct:  {r['direct_cpu_s']}")
        print(f"# N={r['n']} CPU seconds while measuring, gpuyard: {r['gpuyard_cpu_s']}")
    for r in results:
        print(f"# N={r['n']} operator work until all Deployments existed: {r['until_ready']}")
        print(f"# N={r['n']} operator work until idle: {r['until_idle']}")


if __name__ == "__main__":
    sys.exit(main())
