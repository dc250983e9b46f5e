"""Billing a tenant cannot bend (issue 13), on the real cluster.

The price of a GPU-second comes from the pool whose nodes hold it and its payer from
ownership, never from a label; a bare pod on a pool's nodes is billed as unmanaged usage
of its namespace; a deleted pool keeps its price until its pods are billed, across a
restart; a pool's currency is fixed; a slow or moving service delays nobody else; a node
lost past the grace ends its pods' billing where it left Ready.

Each test runs an operator of its own with 1 s usage windows against a ledger and a
CloudEvents receiver (see metering_support.py), and checks the records second by second
against the pods' own timestamps. Pools and GPU nodes a test needs beyond the example
pools (a100, l4) are its own (``fleet``), removed after it.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from conftest import OperatorProcess, flush_audit
from gpuyard.api.formats import parse_time
from gpuyard.api.names import POOL_LABEL
from gpuyard.logic.metering import (
    MeterConfig,
    PricePoint,
    UsageRecord,
    epoch_floor,
    price_history_from_status,
    record_from_json,
)
from localcluster.cluster import ClusterState, free_port
from localcluster.topology import gpu_node
from metering_support import (
    GPU,
    IMAGE,
    METER_INTERVAL,
    METERING_FINALIZER,
    SERVICE_LABEL,
    PodTruth,
    PodWatch,
    Receiver,
    Rig,
    aiservice,
    compare,
    ledger_copies,
    ledger_lines,
    meter_errors,
    open_rig,
    price_in_force,
    received_copies,
    unique_records,
    usage_mark,
    wait_all_billed,
)
from support import Kubectl, wait_until

#: The example pools (examples/pools.yaml) on the local cluster's default topology.
A100 = "a100"
L4 = "l4"
WINDOW = 1
#: How long after a window ends the meter waits before cutting it.
SETTLE_SECONDS = MeterConfig().settle_seconds
CURRENCY_MESSAGE = (
    "price.currency cannot be changed: create a new GPUPool with the new currency and move "
    "services to it (spec.pool)"
)
#: kwok keeps a node's lease renewed only while the node carries this label (cluster.py,
#: --manage-nodes-with-label-selector); without renewals kube-controller-manager marks it
#: Ready=Unknown after its node-monitor-grace-period (50 s).
KWOK_LABEL = ("type", "kwok")
NODE_MONITOR_TIMEOUT = 120.0


@pytest.fixture
def rig(cluster: ClusterState, operator: OperatorProcess, tmp_path: Path) -> Iterator[Rig]:
    with open_rig(cluster, operator, tmp_path) as found:
        yield found


# --- pools and nodes of the test's own -----------------------------------------------------------


@dataclass(frozen=True)
class Node:
    name: str
    #: The labels that select this node alone (a pool's nodeSelector).
    selector: dict[str, str]


@dataclass
class Fleet:
    """GPUPools and kwok GPU nodes that one test makes for itself; `clean` removes them."""

    kubectl: Kubectl
    stem: str = field(default_factory=lambda: f"t-{secrets.token_hex(3)}")
    pools: list[str] = field(default_factory=list)
    nodes: list[str] = field(default_factory=list)

    def node(self, *, gpus: int = 1) -> Node:
        """A GPU node of its own, Ready, that only a pool with its selector selects."""
        label = f"{self.stem}-{len(self.nodes)}"
        name = f"gpu-{label}"
        self.kubectl.apply(json.dumps(gpu_node(name, pool=label, gpus=gpus, gpu_type="l4")))
        self.nodes.append(name)
        wait_until(lambda: ready_since(self.kubectl, name) is None, what=f"node {name} to be Ready")
        return Node(name, {POOL_LABEL: label})

    def pool(
        self,
        purpose: str,
        *,
        node_selector: Mapping[str, str],
        per_gpu_hour: str,
        currency: str = "USD",
        resource_name: str = GPU,
        gpu_type: str = "l4",
    ) -> str:
        name = f"{self.stem}-{purpose}"
        manifest = {
            "apiVersion": "gpuyard.io/v1alpha1",
            "kind": "GPUPool",
            "metadata": {"name": name},
            "spec": {
                "gpuType": gpu_type,
                "resourceName": resource_name,
                "nodeSelector": dict(node_selector),
                "tolerations": [{"key": GPU, "operator": "Exists", "effect": "NoSchedule"}],
                "price": {"perGpuHour": per_gpu_hour, "currency": currency},
            },
        }
        self.kubectl.apply(json.dumps(manifest))
        self.pools.append(name)
        return name

    def clean(self) -> None:
        for name in self.pools:
            self.kubectl.run("delete", "gpool", name, "--wait=false", check=False)
        for name in self.pools:
            try:
                # The session's operator lets each go once nothing on its nodes is unbilled.
                wait_until(lambda name=name: not exists(self.kubectl, "gpool", name), timeout=60)
            except AssertionError:
                # A failed test may leave pods behind: do not leave the pool to later tests.
                patch = json.dumps({"metadata": {"finalizers": None}})
                self.kubectl.run("patch", "gpool", name, "--type=merge", "-p", patch, check=False)
        for name in self.nodes:
            self.kubectl.run("delete", "node", name, "--wait=false", check=False)


@pytest.fixture
def fleet(kubectl: Kubectl) -> Iterator[Fleet]:
    made = Fleet(kubectl)
    try:
        yield made
    finally:
        made.clean()


@pytest.fixture
def elsewhere(kubectl: Kubectl, namespace: str) -> Iterator[str]:
    """A second namespace of the test's own."""
    name = f"{namespace}-elsewhere"
    kubectl("create", "namespace", name)
    yield name
    kubectl.run("delete", "namespace", name, "--wait=false", check=False)


# --- reading the cluster -------------------------------------------------------------------------


def exists(kubectl: Kubectl, *what: str) -> bool:
    return kubectl.run("get", *what, check=False).returncode == 0


def ready_since(kubectl: Kubectl, node: str) -> datetime | None:
    """When the node's Ready condition left True, or None while it is True."""
    conditions = kubectl.json("get", "node", node).get("status", {}).get("conditions") or []
    ready = next((c for c in conditions if c.get("type") == "Ready"), {})
    if ready.get("status") == "True":
        return None
    return parse_time(ready["lastTransitionTime"]) if ready.get("lastTransitionTime") else None


def pool_billing(kubectl: Kubectl, pool: str) -> dict[str, Any]:
    billing: dict[str, Any] = (kubectl.json("get", "gpool", pool).get("status") or {}).get(
        "billing"
    ) or {}
    return billing


def price_history(kubectl: Kubectl, pool: str) -> tuple[PricePoint, ...]:
    return price_history_from_status(pool_billing(kubectl, pool).get("priceHistory"))


def service_status(kubectl: Kubectl, namespace: str, service: str) -> dict[str, Any]:
    status: dict[str, Any] = (
        kubectl.json("get", "ais", "-n", namespace, service).get("status") or {}
    )
    return status


def usage_condition(kubectl: Kubectl, namespace: str, service: str) -> dict[str, Any] | None:
    conditions = service_status(kubectl, namespace, service).get("conditions") or []
    return next((c for c in conditions if c.get("type") == "UsageReported"), None)


def controlled(pod: Mapping[str, Any]) -> bool:
    """Whether the pod has a controller (its ReplicaSet releases it when its labels no
    longer match the selector)."""
    return any(ref.get("controller") for ref in pod["metadata"].get("ownerReferences") or ())


def finalizers(pod: Mapping[str, Any]) -> list[str]:
    return list(pod["metadata"].get("finalizers") or [])


def running(pods: PodWatch, service: str, count: int, node: str | None = None) -> bool:
    live = pods.live(service)
    return len(live) == count and all(
        pod["status"].get("phase") == "Running"
        and (node is None or pod["spec"].get("nodeName") == node)
        for pod in live
    )


def wait_running(pods: PodWatch, service: str, count: int, node: str | None = None) -> None:
    where = f" on {node}" if node else ""
    wait_until(
        lambda: running(pods, service, count, node),
        timeout=90,
        what=f"{count} running pods of {service}{where}",
    )


def wait_recorded(
    ledger: Path, which: Callable[[UsageRecord], bool], through: float, what: str
) -> None:
    """Wait until the ledger holds a record that `which` selects whose window ends at or
    after `through` (epoch seconds): the meter has billed that far."""
    wait_until(
        lambda: any(which(r) and r.end.timestamp() >= through for r in ledger_copies(ledger)),
        timeout=60,
        what=f"{what} billed through {through:.0f}",
    )


def wait_mark(kubectl: Kubectl, namespace: str, service: str, through: float) -> None:
    """Wait until the service's reported-through time is at or after `through`."""

    def past() -> bool:
        mark = usage_mark(kubectl, namespace, service)
        return mark is not None and parse_time(mark).timestamp() >= through

    wait_until(past, timeout=60, what=f"{service}'s usage mark to pass {through:.0f}")


def assert_exact(truth: Mapping[str, PodTruth], rig: Rig, namespace: str) -> None:
    """Ledger and receiver both bill every second of every pod exactly once (within 1 s
    of the pods' own timestamps per pod), and no id has two different contents."""
    for what, copies in (
        ("ledger", ledger_copies(rig.ledger)),
        ("HTTP receiver", received_copies(rig.receiver)),
    ):
        found = compare(truth, copies, namespace)
        print(found.line(what))
        assert all(abs(d) <= 1 for d in found.difference.values()), found.difference
        found.assert_exact(what)


def billed(rig: Rig, namespace: str) -> list[UsageRecord]:
    """The namespace's records in the ledger, one per id, oldest window first."""
    records = unique_records(ledger_copies(rig.ledger), namespace)
    return sorted(records.values(), key=lambda r: (r.start, r.pod_uid))


def assert_unmanaged_field(rig: Rig, namespace: str) -> None:
    """Every record says whether it is unmanaged, and it is exactly when it names no
    service."""
    for data in ledger_lines(rig.ledger):
        if data["namespace"] == namespace:
            assert data.get("unmanaged") is (data["service"] == ""), data


def bare_pod(name: str, node_selector: Mapping[str, str]) -> dict[str, Any]:
    """A pod of no owner that copies a pool's placement and asks for one of its GPUs."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "nodeSelector": dict(node_selector),
            "tolerations": [{"key": GPU, "operator": "Exists", "effect": "NoSchedule"}],
            "containers": [{"name": "main", "image": IMAGE, "resources": {"limits": {GPU: "1"}}}],
        },
    }


def writes_to_pod(
    operator: OperatorProcess, namespace: str, name: str
) -> list[tuple[str, float, int]]:
    """(verb, when, HTTP status) of the operator's writes to the pod itself (not a
    subresource), from the API server's audit log."""
    return [
        (
            write["verb"],
            parse_time(write["stageTimestamp"]).timestamp(),
            int(write.get("responseStatus", {}).get("code", 0)),
        )
        for write in operator.writes()
        if write.get("objectRef", {}).get("resource") == "pods"
        and write["objectRef"].get("namespace") == namespace
        and write["objectRef"].get("name") == name
        and not write["objectRef"].get("subresource")
    ]


def first_receipts(receiver: Receiver, subject: str) -> dict[str, tuple[float, UsageRecord]]:
    """The first arrival (wall time) of each record of CloudEvents subject `subject`."""
    found: dict[str, tuple[float, UsageRecord]] = {}
    for received, event in receiver.received():
        if event["subject"] == subject and event["id"] not in found:
            found[event["id"]] = (received, record_from_json(event["data"]))
    return found


def lateness(receipts: Mapping[str, tuple[float, UsageRecord]]) -> list[tuple[float, float]]:
    """(window end, seconds from the window's end to its record's first arrival)."""
    return sorted(
        (record.end.timestamp(), received - record.end.timestamp())
        for received, record in receipts.values()
    )


# --- price and identity from facts a tenant cannot write ---------------------------------------


def assert_no_gpuyard_admission_policy(kubectl: Kubectl) -> None:
    bindings = kubectl.json("get", "validatingadmissionpolicybindings")["items"]
    # The operator's own policies (-operator-children, -operator-finalizers) match only
    # requests of its ServiceAccount, never an admin's edits.
    names = [
        b["metadata"]["name"]
        for b in bindings
        if "gpuyard" in b["metadata"]["name"] and "-operator-" not in b["metadata"]["name"]
    ]
    if names:
        pytest.fail(f"this test edits pods as an admin would with the policy off; found {names}")


@pytest.mark.slow
def test_relabelled_pods_bill_at_the_price_of_the_pool_that_holds_their_gpus(
    kubectl: Kubectl, namespace: str, rig: Rig, fleet: Fleet
) -> None:
    assert_no_gpuyard_admission_policy(kubectl)
    # A pool on the a100 nodes too, but for a MIG resource the pods do not request.
    mig = fleet.pool(
        "mig",
        node_selector={POOL_LABEL: A100},
        per_gpu_hour="0.01",
        resource_name="nvidia.com/mig-1g.10gb",
        gpu_type="a100-80gb",
    )
    steps: list[tuple[str, float]] = []
    with rig.pods(namespace) as pods, rig.operator(window_seconds=WINDOW) as meter:
        kubectl.apply(json.dumps(aiservice("train", A100, 1, 2)), namespace)
        wait_running(pods, "train", 2)
        pod = pods.live("train")[0]
        uid, name = pod["metadata"]["uid"], pod["metadata"]["name"]

        def of_pod(record: UsageRecord) -> bool:
            return record.pod_uid == uid

        wait_recorded(rig.ledger, of_pod, time.time(), f"pod {name}")
        # A cheaper pool, a pool of another resource, a pool that does not exist.
        for pool in (L4, mig, "no-such-pool"):
            kubectl("label", "pod", "-n", namespace, name, f"{POOL_LABEL}={pool}", "--overwrite")
            steps.append((f"pool label {pool}", time.time()))
            wait_recorded(rig.ledger, of_pod, time.time() + 2, f"{name} labelled {pool}")
        # Out of the ReplicaSet's selector: it lets the pod go and starts another.
        kubectl("label", "pod", "-n", namespace, name, f"{SERVICE_LABEL}-")
        orphaned = wait_until(
            lambda: next((t for t, state in pods.history(uid) if not controlled(state)), None),
            what=f"the ReplicaSet to release {name}",
        )
        steps.append(("orphaned", orphaned))
        wait_running(pods, "train", 2)
        wait_recorded(rig.ledger, of_pod, time.time() + 2, f"the orphan {name}")
        # A restart forgets what the meter had decided in memory: the pod must still bill
        # where it started.
        meter.kill()
        meter.start()
        steps.append(("restarted", time.time()))
        wait_recorded(rig.ledger, of_pod, time.time() + 2, f"the orphan {name} after a restart")
        kubectl("scale", "-n", namespace, "ais/train", "--replicas=0")
        kubectl("delete", "pod", "-n", namespace, name, "--wait=false")
        wait_all_billed(pods, timeout=60)
        truth = pods.truth()
        a100_prices = price_history(kubectl, A100)
        a100_currency = kubectl.json("get", "gpool", A100)["spec"]["price"]["currency"]

    print(f"\n{len(truth)} pods; steps {steps}")
    assert len(truth) == 3  # two replicas and the one started in the orphan's place
    assert_exact(truth, rig, namespace)
    assert_unmanaged_field(rig, namespace)
    records = billed(rig, namespace)
    for record in records:
        # Whatever its labels said, the GPUs were on an a100 node.
        assert record.pool == A100, record
        assert record.gpu_type == "a100-80gb", record
        assert record.unit_price == price_in_force(a100_prices, record.start), record
        assert record.currency == a100_currency, record
    # Every pod's seconds are train's, the relabelled one's too: its owner was decided when
    # it started, and a tenant who takes it out of its ReplicaSet (or relabels it) does
    # not move its bill, not even across a restart.
    assert {r.service for r in records} == {"train"}
    assert all(not r.unmanaged for r in records)
    relabelled = [r for r in records if r.pod_uid == uid]
    assert relabelled[-1].start.timestamp() >= orphaned + 2


@pytest.mark.slow
def test_a_bare_pod_on_a_pool_node_is_counted_and_billed_as_unmanaged_usage(
    kubectl: Kubectl, namespace: str, rig: Rig, fleet: Fleet
) -> None:
    node = fleet.node(gpus=2)
    pool = fleet.pool("bare", node_selector=node.selector, per_gpu_hour="1.30")
    with rig.pods(namespace) as pods, rig.operator(window_seconds=WINDOW) as meter:
        kubectl.apply(json.dumps(bare_pod("solo", node.selector)), namespace)
        wait_until(
            lambda: [p for p in pods.pods() if p["status"].get("phase") == "Running"],
            what="the bare pod to run",
        )
        [pod] = pods.pods()
        uid = pod["metadata"]["uid"]
        assert pod["spec"]["nodeName"] == node.name
        wait_until(
            lambda: pool_billing(kubectl, pool).get("unmanagedGpus") == 1,
            what="the pool to count the bare pod's GPU as unmanaged",
        )
        wait_until(
            lambda: METERING_FINALIZER in finalizers(pods.last(uid)),
            what="the meter to hold the bare pod with its finalizer",
        )
        wait_recorded(rig.ledger, lambda r: r.pod_uid == uid, time.time() + 2, "the bare pod")
        deleted = time.time()
        kubectl("delete", "pod", "-n", namespace, "solo", "--wait=false")
        wait_all_billed(pods, timeout=60)
        truth = pods.truth()
        flush_audit(kubectl, meter, namespace)
        pod_patches = writes_to_pod(meter, namespace, "solo")
        ended = truth[uid].ended
        assert ended is not None

        def entry() -> dict[str, Any] | None:
            usage = pool_billing(kubectl, pool).get("unmanagedUsage") or []
            found = next((u for u in usage if u.get("namespace") == namespace), None)
            done = found and parse_time(found["reportedThrough"]).timestamp() >= ended
            return found if done else None

        unmanaged = wait_until(entry, what="the namespace's unmanaged usage mark on the pool")
        wait_until(
            lambda: pool_billing(kubectl, pool).get("unmanagedGpus") == 0,
            what="the pool to count no unmanaged GPU once the pod is gone",
        )
        prices = price_history(kubectl, pool)

    assert_exact(truth, rig, namespace)
    assert_unmanaged_field(rig, namespace)
    records = billed(rig, namespace)
    assert records
    for record in records:
        assert (record.service, record.unmanaged, record.pool) == ("", True, pool), record
        assert record.unit_price == price_in_force(prices, record.start) == Decimal("1.30")
        assert record.currency == "USD"
    print(f"\nunmanaged usage on {pool}: {unmanaged}")
    assert unmanaged["gpuSeconds"] == sum(r.gpu_seconds for r in records)
    assert Decimal(unmanaged["cost"]) == sum(r.cost for r in records)
    assert unmanaged["currency"] == "USD"
    # Held by the meter while it ran (its own patch added the finalizer), and let go once
    # billed (a second patch removed it: the pod could not have gone otherwise). The watch
    # cannot show the removal: a pod's DELETED event carries its state before it.
    assert any(METERING_FINALIZER in finalizers(state) for _, state in pods.history(uid))
    # A patch whose test failed (the kubelet moved the pod's resourceVersion between the
    # meter's look and its write) is answered 422 and made again from a fresh look; no
    # other refusal (403 from RBAC or the operator's admission policy) may happen.
    done = [(verb, when) for verb, when, code in pod_patches if code < 300]
    assert all(code == 422 for _, _, code in pod_patches if code >= 300), pod_patches
    assert [verb for verb, _ in done] == ["patch", "patch"], pod_patches
    assert done[0][1] < deleted <= done[1][1], (pod_patches, deleted)


# --- prices that outlive a pool and a restart -----------------------------------------------------


@pytest.mark.slow
def test_a_pool_deleted_while_its_pods_run_bills_them_at_its_last_price_across_a_restart(
    kubectl: Kubectl, namespace: str, rig: Rig, fleet: Fleet
) -> None:
    node = fleet.node(gpus=2)
    pool = fleet.pool("gone", node_selector=node.selector, per_gpu_hour="4.20")
    moments: dict[str, float] = {}
    with rig.pods(namespace) as pods, rig.operator(window_seconds=WINDOW) as meter:
        kubectl.apply(json.dumps(aiservice("infer", pool, 1, 2)), namespace)
        wait_running(pods, "infer", 2)
        wait_mark(kubectl, namespace, "infer", time.time() + 2)
        # A price change first, so that "the last price" is not the only one.
        patch = json.dumps({"spec": {"price": {"perGpuHour": "5.10"}}})
        kubectl("patch", "gpool", pool, "--type=merge", "-p", patch)
        moments["price changed"] = time.time()

        def two_prices() -> tuple[PricePoint, ...] | None:
            history = price_history(kubectl, pool)
            return history if len(history) == 2 else None

        prices = wait_until(two_prices, what="the new price in the pool's price history")
        wait_mark(kubectl, namespace, "infer", time.time() + 2)

        kubectl("delete", "gpool", pool, "--wait=false")
        moments["pool deleted"] = time.time()
        wait_mark(kubectl, namespace, "infer", time.time() + 2)
        terminating = kubectl.json("get", "gpool", pool)
        assert terminating["metadata"].get("deletionTimestamp"), terminating["metadata"]
        assert METERING_FINALIZER in terminating["metadata"]["finalizers"]
        assert running(pods, "infer", 2)

        meter.kill()
        meter.start()
        moments["restarted"] = time.time()
        wait_mark(kubectl, namespace, "infer", time.time() + 3)
        assert exists(kubectl, "gpool", pool), "the pool went while its pods were unbilled"
        kubectl("delete", "ais", "-n", namespace, "infer", "--wait=false")
        wait_all_billed(pods, timeout=60)
        truth = pods.truth()
        wait_until(lambda: not exists(kubectl, "gpool", pool), what="the billed pool to go")

    print(f"\nprices {prices}; moments {moments}")
    assert_exact(truth, rig, namespace)
    records = billed(rig, namespace)
    for record in records:
        assert (record.pool, record.currency) == (pool, "USD"), record
        assert record.unit_price == price_in_force(prices, record.start), record
        # The pods still stopping after their AIService went are billed to it all the same.
        assert record.service == "infer", record
    assert [p.per_gpu_hour for p in prices] == [Decimal("4.20"), Decimal("5.10")]
    # The pods held their GPUs on both sides of the restart, billed at the last price.
    after_restart = [r for r in records if r.start.timestamp() >= moments["restarted"]]
    assert after_restart
    assert {r.unit_price for r in after_restart} == {Decimal("5.10")}
    assert any(r.unit_price == Decimal("4.20") for r in records)


def test_a_currency_change_is_refused_with_its_message(
    kubectl: Kubectl, running_operator: OperatorProcess, fleet: Fleet
) -> None:
    pool = fleet.pool("money", node_selector={POOL_LABEL: fleet.stem}, per_gpu_hour="1.00")
    patch = json.dumps({"spec": {"price": {"currency": "EUR"}}})
    refused = kubectl.run("patch", "gpool", pool, "--type=merge", "-p", patch, check=False)
    assert refused.returncode != 0
    assert CURRENCY_MESSAGE in refused.stderr, refused.stderr
    assert kubectl.json("get", "gpool", pool)["spec"]["price"]["currency"] == "USD"
    # Only the currency is fixed: the price itself may change.
    patch = json.dumps({"spec": {"price": {"perGpuHour": "1.25"}}})
    kubectl("patch", "gpool", pool, "--type=merge", "-p", patch)


# --- one account never delays another -----------------------------------------------------------

#: How late (after its window closed and settled) a record may reach the receiver and
#: still be on time: a few meter ticks.
ON_TIME_SECONDS = SETTLE_SECONDS + 6 * METER_INTERVAL
#: How long deleting a pod may take while the meter is busy elsewhere (kwok stops its
#: containers, the meter bills its last window after the settle, then lets it go).
PROMPT_DELETION_SECONDS = SETTLE_SECONDS + 4 * WINDOW + 6.0


@pytest.mark.slow
def test_a_service_moving_between_pools_never_delays_another_service(
    kubectl: Kubectl, namespace: str, elsewhere: str, rig: Rig, fleet: Fleet
) -> None:
    usd_node, eur_node = fleet.node(), fleet.node()
    usd = fleet.pool("usd", node_selector=usd_node.selector, per_gpu_hour="1.10")
    eur = fleet.pool("eur", node_selector=eur_node.selector, per_gpu_hour="0.90", currency="EUR")
    pool_of_node = {usd_node.name: usd, eur_node.name: eur}
    with (
        rig.pods(namespace) as pods,
        rig.pods(elsewhere) as other_pods,
        rig.operator(window_seconds=WINDOW),
    ):
        kubectl.apply(json.dumps(aiservice("mover", usd, 1, 1)), namespace)
        kubectl.apply(json.dumps(aiservice("steady", L4, 1, 1)), namespace)
        kubectl.apply(json.dumps(aiservice("bystander", L4, 1, 1)), elsewhere)
        wait_running(pods, "mover", 1, usd_node.name)
        wait_running(pods, "steady", 1)
        wait_running(other_pods, "bystander", 1)
        wait_recorded(rig.ledger, lambda r: r.service == "mover", time.time(), "mover")

        def move_to(pool: str) -> None:
            patch = json.dumps({"spec": {"pool": pool}})
            kubectl("patch", "ais", "-n", namespace, "mover", "--type=merge", "-p", patch)

        def billed_on(pool: str, node: Node) -> None:
            wait_running(pods, "mover", 1, node.name)
            wait_recorded(
                rig.ledger, lambda r: r.service == "mover", time.time() + 2, f"mover on {pool}"
            )

        move_to(eur)
        # While the mover's pod is replaced, a pod in another namespace goes.
        [bystander] = other_pods.live("bystander")
        uid, name = bystander["metadata"]["uid"], bystander["metadata"]["name"]
        started = time.monotonic()
        kubectl("delete", "pod", "-n", elsewhere, name, "--wait=false")
        wait_until(lambda: other_pods.gone(uid), timeout=60, what="the bystander's pod to go")
        deletion_took = time.monotonic() - started
        billed_on(eur, eur_node)
        move_to(usd)
        billed_on(usd, usd_node)
        kubectl("scale", "-n", namespace, "ais/mover", "ais/steady", "--replicas=0")
        kubectl("scale", "-n", elsewhere, "ais/bystander", "--replicas=0")
        wait_all_billed(pods, timeout=60)
        wait_all_billed(other_pods, timeout=60)
        truth = pods.truth()
        wait_mark(kubectl, namespace, "mover", max(p.ended or 0 for p in truth.values()))
        usage = service_status(kubectl, namespace, "mover")["usage"]
        prices = {name: price_history(kubectl, name) for name in (usd, eur)}

    assert_exact(truth, rig, namespace)
    records = billed(rig, namespace)
    moved = [r for r in records if r.service == "mover"]
    # Each window at the price of the pool whose node held the pod then.
    for record in moved:
        pool = pool_of_node[truth[record.pod_uid].node]
        assert record.pool == pool, record
        assert record.unit_price == price_in_force(prices[pool], record.start), record
        assert record.currency == {usd: "USD", eur: "EUR"}[pool], record
    by_currency = {
        currency: sum((r.cost for r in moved if r.currency == currency), Decimal(0))
        for currency in ("USD", "EUR")
    }
    print(f"\nmover's usage {usage}; ledger {by_currency}")
    assert all(by_currency.values())
    assert {k: Decimal(v) for k, v in usage["costByCurrency"].items()} == by_currency
    # The totals are in the currency of the latest window (back on the USD pool).
    assert usage["currency"] == "USD"
    assert Decimal(usage["cost"]) == by_currency["USD"]
    assert usage["gpuSeconds"] == sum(r.gpu_seconds for r in moved)

    late = lateness(first_receipts(rig.receiver, f"{namespace}/steady"))
    print(f"steady's records: {len(late)}, latest {max(s for _, s in late):.1f} s after the end")
    print(f"the bystander's pod went in {deletion_took:.1f} s")
    assert len(late) >= 10
    assert all(seconds <= ON_TIME_SECONDS for _, seconds in late), late
    assert deletion_took <= PROMPT_DELETION_SECONDS


@pytest.mark.slow
def test_a_blackholed_receiver_for_one_service_delays_no_other(
    kubectl: Kubectl, namespace: str, rig: Rig
) -> None:
    receiver = rig.receiver
    observed: list[tuple[str, str]] = []

    def condition_is(status: str) -> bool:
        condition = usage_condition(kubectl, namespace, "stuck") or {}
        seen = (condition.get("status", ""), condition.get("reason", ""))
        if seen[0] and (not observed or observed[-1] != seen):
            observed.append(seen)
        return seen[0] == status

    # Pinned, not the defaults: the assertions below reason about one delivery's attempts.
    attempts, timeout = 4, 10
    env = {
        "GPUYARD_USAGE_HTTP_MAX_ATTEMPTS": str(attempts),
        "GPUYARD_USAGE_HTTP_TIMEOUT_SECONDS": str(timeout),
    }
    with rig.pods(namespace) as pods, rig.operator(window_seconds=WINDOW, env=env) as meter:
        kubectl.apply(json.dumps(aiservice("stuck", L4, 1, 1)), namespace)
        kubectl.apply(json.dumps(aiservice("free", L4, 1, 1)), namespace)
        wait_running(pods, "stuck", 1)
        wait_running(pods, "free", 1)
        # How late free's records are with every receiver answering.
        wait_until(
            lambda: len(first_receipts(receiver, f"{namespace}/free")) >= 10,
            what="ten of free's windows delivered",
        )
        wait_until(lambda: condition_is("True"), what="stuck's usage reported")
        blackholed = time.time()
        receiver.blackhole(lambda events: any(e["subject"] == f"{namespace}/stuck" for e in events))
        # Only once one delivery's retries are spent does the service say so.
        wait_until(
            lambda: condition_is("False"), timeout=240, interval=1, what="UsageReported False"
        )
        released = time.time()
        receiver.blackhole(None)
        wait_until(lambda: condition_is("True"), timeout=120, interval=1, what="UsageReported True")
        kubectl("scale", "-n", namespace, "ais/stuck", "ais/free", "--replicas=0")
        wait_all_billed(pods, timeout=60)
        truth = pods.truth()
        wait_mark(kubectl, namespace, "stuck", max(p.ended or 0 for p in truth.values()))
        sink_errors = meter_errors(meter, "sink")
        events = kubectl.json(
            "get", "events", "-n", namespace, "--field-selector",
            "involvedObject.kind=AIService,involvedObject.name=stuck,reason=UsageNotReported",
        )["items"]  # fmt: skip

    late = lateness(first_receipts(receiver, f"{namespace}/free"))
    before = [seconds for end, seconds in late if end < blackholed]
    during = [seconds for end, seconds in late if blackholed <= end <= released]
    print(
        f"\nblackhole {released - blackholed:.0f} s, {receiver.held} requests held; free late "
        f"by at most {max(before):.1f} s before, {max(during):.1f} s during; "
        f"stuck's UsageReported {observed}"
    )
    # The blackhole outlasted every attempt of one delivery: a meter that waited for it
    # would have held free's records that long.
    assert released - blackholed >= attempts * timeout
    assert receiver.held >= attempts
    assert len(during) >= attempts * timeout // WINDOW - 2
    assert max(during) <= max(before) + METER_INTERVAL + 1.0, (before, during)
    # Nothing of stuck's was lost: the ledger and the receiver hold every second.
    assert_exact(truth, rig, namespace)
    assert ("False", "SinkUnavailable") in observed
    assert observed[-1] == ("True", "Reported")
    assert sink_errors >= 1
    assert events
    assert all(event["type"] == "Warning" for event in events)


@pytest.mark.slow
def test_a_redirecting_receiver_loses_nothing_and_a_bearer_token_comes_from_its_file(
    kubectl: Kubectl, namespace: str, rig: Rig
) -> None:
    """A receiver answers 307 for a while (never followed: nothing counts as delivered),
    then takes records again; throughout, it demands the bearer token the operator reads
    from a headers file (the file a Secret mounts in the chart), rotated on the way."""
    receiver = rig.receiver
    headers = rig.directory / "sink-headers"
    headers.write_text("# mounted from a Secret\nAuthorization: Bearer first-token\n")
    receiver.authorization = "Bearer first-token"
    env = {"GPUYARD_USAGE_HTTP_HEADERS_FILE": str(headers)}
    subject = f"{namespace}/moved"
    with rig.pods(namespace) as pods, rig.operator(window_seconds=WINDOW, env=env):
        kubectl.apply(json.dumps(aiservice("moved", L4, 1, 1)), namespace)
        wait_running(pods, "moved", 1)
        wait_until(
            lambda: len(first_receipts(receiver, subject)) >= 3, what="three windows delivered"
        )
        receiver.redirect_to = f"http://127.0.0.1:{free_port()}/elsewhere"
        redirected_from = len(first_receipts(receiver, subject))
        wait_until(
            lambda: (usage_condition(kubectl, namespace, "moved") or {}).get("status") == "False",
            timeout=240,
            interval=1,
            what="UsageReported False while the receiver redirects",
        )
        assert len(first_receipts(receiver, subject)) == redirected_from  # nothing accepted
        # The token rotates (as the kubelet rewrites a Secret's file) while it redirects.
        receiver.authorization = "Bearer second-token"
        headers.write_text("Authorization: Bearer second-token\n")
        wait_until(
            lambda: "Bearer second-token" in receiver.authorizations,
            timeout=120,
            what="the rotated token in a request",
        )
        receiver.redirect_to = None
        wait_until(
            lambda: (usage_condition(kubectl, namespace, "moved") or {}).get("status") == "True",
            timeout=120,
            interval=1,
            what="UsageReported True once it stops redirecting",
        )
        kubectl("scale", "-n", namespace, "ais/moved", "--replicas=0")
        wait_all_billed(pods, timeout=60)
        truth = pods.truth()
        wait_mark(kubectl, namespace, "moved", max(p.ended or 0 for p in truth.values()))

    print(f"\nreceiver answers {dict(receiver.answers)}")
    assert receiver.answers[307] >= 1
    assert receiver.answers[401] == 0  # every request carried the token of its moment
    sent = {token for token in receiver.authorizations if token is not None}
    assert sent == {"Bearer first-token", "Bearer second-token"}
    assert None not in receiver.authorizations
    # Every second of the pod is at the receiver and in the ledger, once.
    assert_exact(truth, rig, namespace)


# --- node loss -----------------------------------------------------------------------------------


def stop_heartbeat(kubectl: Kubectl, node: str) -> datetime:
    """Make kwok stop renewing the node's lease; returns when the node left Ready."""
    kubectl("label", "node", node, f"{KWOK_LABEL[0]}-")
    return wait_until(
        lambda: ready_since(kubectl, node),
        timeout=NODE_MONITOR_TIMEOUT,
        interval=1,
        what=f"node {node} to leave Ready",
    )


def start_heartbeat(kubectl: Kubectl, node: str) -> None:
    kubectl("label", "node", node, "=".join(KWOK_LABEL))
    wait_until(lambda: ready_since(kubectl, node) is None, what=f"node {node} Ready again")


@pytest.mark.slow
def test_a_node_lost_past_the_grace_ends_billing_at_the_transition(
    kubectl: Kubectl, namespace: str, rig: Rig, fleet: Fleet
) -> None:
    grace = 5
    node = fleet.node()
    pool = fleet.pool("lost", node_selector=node.selector, per_gpu_hour="2.00")
    env = {"GPUYARD_NODE_LOST_GRACE_SECONDS": str(grace)}
    with rig.pods(namespace) as pods, rig.operator(window_seconds=WINDOW, env=env):
        kubectl.apply(json.dumps(aiservice("far", pool, 1, 1)), namespace)
        wait_running(pods, "far", 1)
        [pod] = pods.live("far")
        uid, name = pod["metadata"]["uid"], pod["metadata"]["name"]
        wait_mark(kubectl, namespace, "far", time.time() + 2)
        left_ready = stop_heartbeat(kubectl, node.name)
        # Past the grace the meter bills the pod up to the transition and moves on ...
        wait_mark(kubectl, namespace, "far", left_ready.timestamp() + grace + 2)
        # ... but holds the pod until someone deletes it.
        assert METERING_FINALIZER in finalizers(pods.last(uid))
        kubectl("scale", "-n", namespace, "ais/far", "--replicas=0")
        wait_until(
            lambda: (
                pods.last(uid)["metadata"].get("deletionTimestamp")
                and METERING_FINALIZER not in finalizers(pods.last(uid))
            ),
            what="the meter to let the deleted pod go",
        )
        # No kubelet on a lost node finishes the deletion: the node controller's job.
        kubectl("delete", "pod", "-n", namespace, name, "--grace-period=0", "--force")
        wait_all_billed(pods, timeout=60)
        truth = pods.truth()

    transition = epoch_floor(left_ready)
    print(f"\nnode {node.name} left Ready at {left_ready}; pod {truth[uid]}")
    assert truth[uid].ended is None  # it never stopped by itself: the node took it
    assert_exact({uid: replace(truth[uid], ended=transition)}, rig, namespace)
    last = max(r.end for r in billed(rig, namespace) if r.seconds > 0)
    assert epoch_floor(last) <= transition + WINDOW


@pytest.mark.slow
def test_a_node_back_within_the_grace_changes_nothing(
    kubectl: Kubectl, namespace: str, rig: Rig, fleet: Fleet
) -> None:
    node = fleet.node()
    pool = fleet.pool("blip", node_selector=node.selector, per_gpu_hour="2.00")
    env = {"GPUYARD_NODE_LOST_GRACE_SECONDS": "120"}
    with rig.pods(namespace) as pods, rig.operator(window_seconds=WINDOW, env=env):
        kubectl.apply(json.dumps(aiservice("near", pool, 1, 1)), namespace)
        wait_running(pods, "near", 1)
        wait_mark(kubectl, namespace, "near", time.time() + 2)
        left_ready = stop_heartbeat(kubectl, node.name)
        transition = epoch_floor(left_ready)
        held_at = transition - transition % WINDOW
        # Let windows after the transition close and settle: none of them may be billed
        # while the node is down (there is no event to wait for: it is an absence).
        wait_until(
            lambda: time.time() >= transition + SETTLE_SECONDS + 4 * WINDOW,
            what="windows after the transition to settle",
        )
        during = billed(rig, namespace)
        mark = usage_mark(kubectl, namespace, "near")
        start_heartbeat(kubectl, node.name)
        back = time.time()
        wait_mark(kubectl, namespace, "near", back + 2)
        kubectl("scale", "-n", namespace, "ais/near", "--replicas=0")
        wait_all_billed(pods, timeout=60)
        truth = pods.truth()

    print(f"\nnode {node.name} down from {left_ready} for {back - left_ready.timestamp():.0f} s")
    assert during
    assert all(r.end.timestamp() <= held_at for r in during), during[-3:]
    assert mark is not None
    assert parse_time(mark).timestamp() <= held_at
    # Back within the grace: every second billed, as if nothing had happened.
    assert_exact(truth, rig, namespace)
