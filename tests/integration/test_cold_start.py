"""Cold starts end to end: pods that take 60 s to become ready (the local cluster's kwok
stages hold a pod Running but not Ready for its start-up delay), and an autoscaler that
counts them as capacity on its way.

One minute of starts serves every check, with two services side by side (one asks for
its delay by a pod annotation, the other by its container's environment):

- ``cold`` gets a load step to three requests in flight (three replicas), and its load
  falls to one request while they start: the scale-down to one waits for the starts, then
  removes ready replicas.
- ``nap`` wakes for one request, which ends while its replica starts: the idle scale to
  zero waits for the start too.

Then the status shows the time to ready, and the records the GPU-seconds spent starting,
both checked against the pods' own timestamps and the simulated delay. An operator of the
test's own writes a ledger (``metering_support.Rig``).
"""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import Loads, OperatorProcess
from gpuyard.api.formats import parse_time
from gpuyard.logic.metering import epoch_floor
from localcluster.cluster import ClusterState
from metering_support import PodWatch, Rig, ledger_copies, open_rig, wait_all_billed
from support import Kubectl, wait_until
from test_autoscaler import autoscaled, delete_and_wait, get, in_flight, manifest, replicas

#: The simulated start-up: how long each pod stays Running but not Ready.
DELAY = 60
#: The acceptance margin for the observed time to ready.
MARGIN = 2
USAGE_WINDOW = 5
READY_AFTER_ANNOTATION = "sim.localcluster.test/ready-after"


@pytest.fixture
def rig(cluster: ClusterState, operator: OperatorProcess, tmp_path: Path) -> Iterator[Rig]:
    with open_rig(cluster, operator, tmp_path) as found:
        yield found


def cold_service(name: str, *, by_annotation: bool) -> dict[str, Any]:
    """A service whose pods take DELAY to start, asked for by a pod annotation or by the
    container's environment (the simulator reads either)."""
    service = autoscaled(
        name,
        "a100",
        [in_flight(target="1", activation="0.5")],
        min_replicas=0,
        max_replicas=4,
        autoscaling={"scaleToZeroAfterSeconds": 5},
    )
    if by_annotation:
        service["spec"]["podAnnotations"] = {READY_AFTER_ANNOTATION: f"{DELAY}s"}
    else:
        service["spec"]["container"]["env"] = [{"name": "SIM_READY_AFTER", "value": f"{DELAY}s"}]
    return service


def condition_of(pod: dict[str, Any], kind: str) -> dict[str, Any]:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c.get("type") == kind), {})


def is_ready(pod: dict[str, Any]) -> bool:
    return condition_of(pod, "Ready").get("status") == "True"


def of_service(pods: PodWatch, service: str) -> list[dict[str, Any]]:
    """Every pod of the service ever bound, by its last state (gone ones included)."""
    return [pods.last(uid) for uid, truth in pods.truth().items() if truth.service == service]


def seconds_to_ready(pod: dict[str, Any]) -> int:
    """From the pod's own stamps: PodScheduled to Ready, in whole seconds."""
    bound = parse_time(condition_of(pod, "PodScheduled")["lastTransitionTime"])
    ready = parse_time(condition_of(pod, "Ready")["lastTransitionTime"])
    return epoch_floor(ready) - epoch_floor(bound)


def gpu_util_of(sim_url: str, pod: str) -> list[float]:
    """The simulator's DCGM_FI_DEV_GPU_UTIL of each GPU the pod holds."""
    with urllib.request.urlopen(f"{sim_url}/metrics", timeout=5) as response:
        text = response.read().decode()
    return [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("DCGM_FI_DEV_GPU_UTIL{") and f'pod="{pod}"' in line
    ]


def deleted_while_starting(pods: PodWatch, uid: str) -> bool:
    """Whether the pod's first state with a deletionTimestamp was not Ready."""
    for _, state in pods.history(uid):
        if state["metadata"].get("deletionTimestamp"):
            return not is_ready(state)
    return False


@pytest.mark.slow
def test_cold_starts_count_as_capacity_on_its_way(
    kubectl: Kubectl, namespace: str, cluster: ClusterState, rig: Rig, load: Loads
) -> None:
    with rig.pods(namespace) as pods, rig.operator(window_seconds=USAGE_WINDOW):
        load.set(namespace, "cold", 300)  # three requests in flight: three replicas
        load.set(namespace, "nap", 100)  # one request: one replica
        services = (
            cold_service("cold", by_annotation=True),
            cold_service("nap", by_annotation=False),
        )
        kubectl.apply(manifest(*services), namespace)

        def starting(service: str, count: int) -> list[dict[str, Any]] | None:
            live = pods.live(service)
            running = [p for p in live if (p.get("status") or {}).get("phase") == "Running"]
            if len(running) != count or any(is_ready(p) for p in running):
                return None
            return running

        cold_pods = wait_until(lambda: starting("cold", 3), timeout=30, what="3 cold starts")
        wait_until(lambda: starting("nap", 1), timeout=30, what="nap's cold start")
        # A starting pod holds its GPU but serves none of the load.
        for pod in cold_pods:
            assert gpu_util_of(cluster.dcgm_sim_url, pod["metadata"]["name"]) == [0.0]

        # The demand falls while the replicas start: cold needs one, nap none.
        load.set(namespace, "cold", 100)
        load.set(namespace, "nap", 0)
        seen_replicas: dict[str, list[tuple[float, int]]] = {"cold": [], "nap": []}
        limits: dict[str, set[str]] = {"cold": set(), "nap": set()}

        def every_start_ended() -> bool:
            for service in ("cold", "nap"):
                count = replicas(kubectl, namespace, service)
                if count is not None:
                    seen_replicas[service].append((time.time(), count))
                found = get(kubectl, "ais", "-n", namespace, service)
                limited = (found["status"].get("recommendation") or {}).get("limitedBy")
                if limited:
                    limits[service].add(limited)
            # Ever ready, not ready now: once the last start ends, the scale-down may
            # remove ready replicas before the next poll.
            started = of_service(pods, "cold") + of_service(pods, "nap")
            return len(started) == 4 and all(
                any(is_ready(state) for _, state in pods.history(pod["metadata"]["uid"]))
                for pod in started
            )

        wait_until(every_start_ended, timeout=DELAY + 30, interval=0.5, what="every start to end")
        # The load step asked for no more than the final load (three); while they started,
        # neither the lower demand nor idleness removed any replica. Counts read after
        # the last start ended (to the second the pods' stamps carry) may have moved on.
        last_ready = max(
            epoch_floor(parse_time(condition_of(pod, "Ready")["lastTransitionTime"]))
            for service in ("cold", "nap")
            for pod in of_service(pods, service)
        )
        during = {
            service: {count for seen, count in samples if seen < last_ready}
            for service, samples in seen_replicas.items()
        }
        assert during == {"cold": {3}, "nap": {1}}, seen_replicas
        assert "ReplicasStarting" in limits["cold"], limits
        assert "ReplicasStarting" in limits["nap"], limits

        # Started: the scale-down and the scale to zero go ahead, removing ready replicas.
        wait_until(lambda: len(pods.live("cold")) == 1, timeout=30, what="cold at 1")
        wait_until(lambda: not pods.live("nap"), timeout=30, what="nap at zero")
        assert replicas(kubectl, namespace, "cold") == 1
        assert replicas(kubectl, namespace, "nap") == 0

        cold = get(kubectl, "ais", "-n", namespace, "cold")["status"]
        nap = get(kubectl, "ais", "-n", namespace, "nap")["status"]
        started = {name: of_service(pods, name) for name in ("cold", "nap")}
        truth = {p["metadata"]["uid"]: seconds_to_ready(p) for ps in started.values() for p in ps}
        print(f"\ntime to ready: cold {cold.get('startup')}, nap {nap.get('startup')}; "
              f"pods {sorted(truth.values())}")  # fmt: skip
        assert all(abs(seconds - DELAY) <= MARGIN for seconds in truth.values()), truth
        assert cold["startup"]["samples"] == 3
        assert nap["startup"]["samples"] == 1
        for status in (cold, nap):
            assert abs(status["startup"]["lastSeconds"] - DELAY) <= MARGIN, status["startup"]
            assert abs(status["startup"]["medianSeconds"] - DELAY) <= MARGIN, status["startup"]
        cold_truth = sorted(seconds_to_ready(p) for p in started["cold"])
        assert cold["startup"]["medianSeconds"] == cold_truth[1]
        assert nap["startup"]["lastSeconds"] == seconds_to_ready(started["nap"][0])

        # Nothing was deleted in the middle of its start.
        uids = [p["metadata"]["uid"] for ps in started.values() for p in ps]
        assert len(uids) == 4
        assert [uid for uid in uids if deleted_while_starting(pods, uid)] == []

        # The records: every pod's starting GPU-seconds are its bound-to-ready seconds.
        delete_and_wait(kubectl, namespace, "cold")
        delete_and_wait(kubectl, namespace, "nap")
        wait_all_billed(pods, timeout=60)

    records = [r for r in ledger_copies(rig.ledger) if r.namespace == namespace]
    unique = {r.id: r for r in records}.values()
    starting_by_pod: dict[str, int] = {}
    for record in unique:
        starting_by_pod[record.pod_uid] = (
            starting_by_pod.get(record.pod_uid, 0) + record.starting_gpu_seconds
        )
        assert 0 <= record.starting_gpu_seconds <= record.gpu_seconds
    print(f"starting GPU-seconds by pod {sorted(starting_by_pod.values())}")
    assert starting_by_pod == truth
    assert all(abs(seconds - DELAY) <= MARGIN for seconds in starting_by_pod.values())
    # The rest of each pod's GPU-seconds is what it held once ready.
    held = sum(r.gpu_seconds for r in unique)
    assert held > sum(starting_by_pod.values())
