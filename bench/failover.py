"""How long the operator is without a leader when its leader dies or stops.

On the local cluster, two ``gpuyard run`` replicas under one Lease with the chart's default
timings (15 s duration, 10 s renew deadline, 2 s retry period), and a few AIServices and a
GPUPool for them to reconcile. Each round stops the leader with a signal and measures,
from the signal, until the standby has finished its first reconcile (its
``gpuyard_reconciles_total`` moves): the *failover*. The stopped replica is started again
and becomes the standby, as a kubelet would restart it.

- *SIGKILL*: the leader cannot release the Lease; the standby may take it only once it
  has seen the Lease unrenewed for its whole duration. The *floor* of a round is what was
  left of the Lease at the kill (its last ``renewTime`` plus the duration, read from the API
  server just before the signal): no standby that respects the Lease can lead sooner. The
  failover minus the floor is gpuyard's own delay (noticing, the takeover write, the
  first reconcile). Target: p95 at most the duration plus 2 s.
- *SIGTERM*: the leader stops writing, releases the Lease and exits; the standby is
  watching the Lease and takes it at once. Target: p95 at most 2 s.

The ratio printed is each p95 over its target (at most 1 meets it).

Usage (a running cluster is reused through GPUYARD_CLUSTER_STATE; nothing else may run an
operator on it meanwhile)::

    PYTHONPATH=hack .venv/bin/python bench/failover.py --kills 10
"""

from __future__ import annotations

import argparse
import json
import secrets
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common import OperatorProcess, cluster, install_crds, kubectl, log
from localcluster.cluster import ClusterState

LEASE_NAMESPACE = "default"
DURATION, RENEW_DEADLINE, RETRY_PERIOD = 15, 10, 2
TARGETS = {"SIGKILL": DURATION + 2.0, "SIGTERM": 2.0}
SERVICES = 5


def reconciles(replica: OperatorProcess) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in replica.metrics().splitlines()
        if line.startswith("gpuyard_reconciles_total{")
    )


def leads(replica: OperatorProcess) -> bool:
    return "gpuyard_leader 1.0" in replica.metrics().splitlines()


def lease_spec(state: ClusterState, lease: str) -> dict[str, Any]:
    body = kubectl(state, "get", "lease", lease, "-n", LEASE_NAMESPACE, "-o", "json")
    spec: dict[str, Any] = json.loads(body)["spec"]
    return spec


def renew_time(state: ClusterState, lease: str) -> datetime:
    return datetime.fromisoformat(lease_spec(state, lease)["renewTime"].replace("Z", "+00:00"))


def lease_left(state: ClusterState, lease: str) -> float:
    """Seconds until the Lease expires unless it is renewed, by its own record."""
    spec = lease_spec(state, lease)
    renewed = datetime.fromisoformat(spec["renewTime"].replace("Z", "+00:00"))
    expires = renewed.timestamp() + float(spec["leaseDurationSeconds"])
    return expires - datetime.now(UTC).timestamp()


class Pair:
    def __init__(self, state: ClusterState, directory: Path, lease: str) -> None:
        self.state, self.directory = state, directory
        self.env = {
            "GPUYARD_LEASE_NAMESPACE": LEASE_NAMESPACE,
            "GPUYARD_LEASE_NAME": lease,
            "GPUYARD_LEASE_DURATION_SECONDS": str(DURATION),
            "GPUYARD_LEASE_RENEW_DEADLINE_SECONDS": str(RENEW_DEADLINE),
            "GPUYARD_LEASE_RETRY_PERIOD_SECONDS": str(RETRY_PERIOD),
            # For the "standing by" line (see ready_standby).
            "GPUYARD_LOG_LEVEL": "INFO",
        }
        self.replicas = [self._start(name) for name in ("a", "b")]
        self.wait_for_one_leader()

    def _start(self, name: str) -> OperatorProcess:
        return OperatorProcess(
            self.state, self.directory / f"replica-{name}.log", {**self.env, "POD_NAME": name}
        )

    def wait_for_one_leader(self) -> None:
        wait_for(lambda: sum(leads(r) for r in self.replicas) == 1, "single leader")

    def ready_standby(self, standby: OperatorProcess, lease: str) -> None:
        """Until the standby has seen the leader renew. A standby counts the holder's time
        from its own sight of the last renewal; killing the leader before its standby
        (restarted by the previous round) has seen one would add the standby's start-up to
        the failover: two failures at once, not the one measured here."""
        wait_for(lambda: "standing by: Lease" in standby.log_path.read_text(), "standby")
        seen = datetime.now(UTC)
        wait_for(lambda: renew_time(self.state, lease) > seen, "renewal", timeout=DURATION)

    def fail_over(self, sig: signal.Signals, lease: str) -> tuple[float, float]:
        """Stop the leader with ``sig``; (seconds to the standby's first reconcile, what
        was left of the Lease at the signal)."""
        [leader] = [r for r in self.replicas if leads(r)]
        [standby] = [r for r in self.replicas if r is not leader]
        self.ready_standby(standby, lease)
        before = reconciles(standby)
        # A released Lease is free at once; a killed leader's runs out.
        floor = lease_left(self.state, lease) if sig == signal.SIGKILL else 0.0
        leader.process.send_signal(sig)
        died = time.monotonic()
        wait_for(lambda: reconciles(standby) > before, "takeover", timeout=DURATION * 4)
        took = time.monotonic() - died
        leader.process.wait(timeout=60)
        index = self.replicas.index(leader)
        self.replicas[index] = self._start("ab"[index])
        return took, max(0.0, floor)

    def stop(self) -> None:
        for replica in self.replicas:
            replica.stop()


def wait_for(check: Callable[[], bool], what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"no {what} after {timeout:.0f} s")
        time.sleep(0.05)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=10, help="rounds per signal (default 10)")
    args = parser.parse_args(argv)
    lease = f"bench-failover-{secrets.token_hex(3)}"
    namespace = f"bench-failover-{secrets.token_hex(3)}"
    results: dict[str, list[tuple[float, float]]] = {"SIGKILL": [], "SIGTERM": []}
    with cluster() as state, tempfile.TemporaryDirectory() as directory:
        install_crds(state)
        kubectl(state, "create", "namespace", namespace)
        for n in range(SERVICES):
            kubectl(state, "apply", "-n", namespace, "-f", "-", stdin=json.dumps(service(n)))
        pair = Pair(state, Path(directory), lease)
        try:
            for round_ in range(args.kills):
                for name, sig in (("SIGKILL", signal.SIGKILL), ("SIGTERM", signal.SIGTERM)):
                    took, floor = pair.fail_over(sig, lease)
                    results[name].append((took, floor))
                    log(f"round {round_ + 1} {name}: failover {took:.2f} s (floor {floor:.2f} s)")
                    # Both replicas up and one leading before the next signal.
                    pair.wait_for_one_leader()
        finally:
            pair.stop()
            kubectl(state, "delete", "namespace", namespace, "--wait=false")
            kubectl(state, "delete", "lease", lease, "-n", LEASE_NAMESPACE, "--ignore-not-found")
    report(results, args.kills)
    return 0


def service(n: int) -> dict[str, Any]:
    return {
        "apiVersion": "gpuyard.io/v1alpha1",
        "kind": "AIService",
        "metadata": {"name": f"svc-{n}"},
        "spec": {
            "pool": "l4",
            "gpusPerReplica": 1,
            "container": {"image": "registry.example/bench:1"},
            "minReplicas": 0,
            "maxReplicas": 1,
            "replicas": 0,
            "autoscaling": {"mode": "Off"},
        },
    }


def report(results: dict[str, list[tuple[float, float]]], kills: int) -> None:
    timings = f"{DURATION} s / {RENEW_DEADLINE} s / {RETRY_PERIOD} s"
    print(f"# {kills} rounds per signal; Lease duration / renew deadline / retry: {timings}")
    print("| signal | p50 | p95 | max | floor p50 | own delay p50 | target | p95 / target |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, rounds in results.items():
        took = [t for t, _ in rounds]
        floors = [f for _, f in rounds]
        own = [t - f for t, f in rounds]
        p95 = percentile(took, 0.95)
        print(
            f"| {name} | {statistics.median(took):.2f} s | {p95:.2f} s | {max(took):.2f} s "
            f"| {statistics.median(floors):.2f} s | {statistics.median(own):.2f} s "
            f"| {TARGETS[name]:.0f} s | {p95 / TARGETS[name]:.2f} |"
        )
    print("failovers:", json.dumps({n: [round(t, 2) for t, _ in r] for n, r in results.items()}))


if __name__ == "__main__":
    sys.exit(main())
