"""AIServices on DRA pools, against the real scheduler, resource claim controller and meter.

Two tests, each with DRA nodes of its own (`DraRig`, as NVIDIA's driver would publish them):
a ClaimTemplate service that claims its devices, runs out of them and rolls to a new claim
template; and the billing of both request modes, per device, across an operator killed while
the pods and their claims go.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from conftest import Loads, OperatorProcess
from gpuyard.api.formats import parse_time
from gpuyard.api.pool import GPUPool
from gpuyard.api.service import AIService
from gpuyard.io.kube import make_api_client
from gpuyard.logic.children import claim_template_name
from gpuyard.logic.claimed_devices import HeldDevice
from gpuyard.logic.metering import epoch_floor
from localcluster.cluster import ClusterState
from localcluster.topology import DRA_PRODUCTS, gpu_uuid
from metering_support import Rig, aiservice, ledger_copies, open_rig
from support import Kubectl, wait_until
from test_dra_pools import DraRig, claim, pinned_pod

GPU = "nvidia.com/gpu"
TENANT = "dra-tenant"


@pytest.fixture
def dra(kubectl: Kubectl, namespace: str, cluster: ClusterState) -> Iterator[list[DraRig]]:
    """Two rigs (two pools' worth of DRA nodes), named from the namespace's suffix."""
    stem = "drs-" + namespace.rsplit("-", 1)[1]
    api = make_api_client(cluster.kubeconfig, pool_size=2)
    rigs = [DraRig(kubectl, f"{stem}{suffix}", api) for suffix in ("a", "b")]
    try:
        yield rigs
    finally:
        for rig in rigs:
            rig.cleanup()


def service_pods(kubectl: Kubectl, namespace: str, service: str) -> list[dict[str, Any]]:
    items = kubectl.json("get", "pods", "-n", namespace, "-l", f"gpuyard.io/service={service}")
    return [pod for pod in items["items"] if not pod["metadata"].get("deletionTimestamp")]


def claim_templates(kubectl: Kubectl, namespace: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = kubectl.json("get", "resourceclaimtemplates", "-n", namespace)[
        "items"
    ]
    return items


def held_devices(kubectl: Kubectl, namespace: str, pod: dict[str, Any]) -> list[HeldDevice]:
    """What the pod's claims hold, read from the API (the test's own truth)."""
    status = pod.get("status") or {}
    names = [s["resourceClaimName"] for s in status.get("resourceClaimStatuses") or ()]
    extended = (status.get("extendedResourceClaimStatus") or {}).get("resourceClaimName")
    names += [extended] if extended else []
    names += [
        c["resourceClaimName"]
        for c in pod["spec"].get("resourceClaims") or ()
        if "resourceClaimName" in c
    ]
    devices = []
    for name in names:
        body = kubectl.json("get", "resourceclaim", "-n", namespace, name)
        for result in body["status"]["allocation"]["devices"]["results"]:
            uuid = gpu_uuid(result["pool"], int(result["device"].rsplit("-", 1)[1]))
            devices.append(HeldDevice(result["driver"], result["pool"], result["device"], uuid))
    return sorted(devices)


def condition(kubectl: Kubectl, namespace: str, service: str, kind: str) -> dict[str, Any]:
    body = kubectl.json("get", "aiservice", "-n", namespace, service)
    found = [c for c in (body.get("status") or {}).get("conditions") or () if c["type"] == kind]
    return found[0] if found else {}


def test_a_claim_template_service_claims_its_devices_runs_out_and_rolls_to_a_new_template(
    kubectl: Kubectl, namespace: str, dra: list[DraRig], running_operator: OperatorProcess
) -> None:
    rig = dra[0]
    node = rig.node(0, gpus=2)
    product = DRA_PRODUCTS["h100-80gb"][0]
    pool = rig.pool("claims", selector={"attributes": {"productName": product}})
    service = aiservice("llama", pool, gpus=1, replicas=3)
    # A tenant with `edit` (which may write claim templates in 1.37) makes the template the
    # operator will want first, under its name (a hash anyone can compute), labelled as
    # gpuyard's, asking more of the pool: the operator replaces it with its own.
    kubectl("create", "rolebinding", "tenant-edit", "-n", namespace,
            "--clusterrole=edit", f"--user={TENANT}")  # fmt: skip
    parsed_pool = GPUPool.from_mapping(kubectl.json("get", "gpupool", pool))
    name = claim_template_name(AIService.from_mapping(
        {**service, "metadata": {"name": "llama", "namespace": namespace, "uid": "x"}}
    ), parsed_pool)  # fmt: skip
    forged = {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceClaimTemplate",
        "metadata": {"name": name, "labels": {
            "app.kubernetes.io/managed-by": "gpuyard", "gpuyard.io/service": "llama",
        }},
        "spec": {"spec": {"devices": {"requests": [
            {"name": "gpus", "exactly": {"deviceClassName": "gpu.nvidia.com", "count": 2}},
        ]}}},
    }  # fmt: skip
    kubectl(f"--as={TENANT}", "create", "-n", namespace, "-f", "-", stdin=json.dumps(forged))
    kubectl.apply(json.dumps(service), namespace)

    # The template first, owned by the service; then two replicas on the pool's two devices.
    def owned() -> list[dict[str, Any]] | None:
        found = claim_templates(kubectl, namespace)
        return found if found and found[0]["metadata"].get("ownerReferences") else None

    [template] = wait_until(owned, what="the service's own ResourceClaimTemplate")
    assert template["metadata"]["name"] == name
    assert template["metadata"]["ownerReferences"][0]["kind"] == "AIService"
    [request] = template["spec"]["spec"]["devices"]["requests"]
    assert request["exactly"]["count"] == 1
    assert product in request["exactly"]["selectors"][0]["cel"]["expression"]

    def placed() -> list[dict[str, Any]] | None:
        pods = service_pods(kubectl, namespace, "llama")
        running = [p for p in pods if p["spec"].get("nodeName")]
        return running if len(pods) == 3 and len(running) == 2 else None

    running = wait_until(placed, what="two of three replicas placed")
    # The session's operator runs as the chart's ServiceAccount, under its admission policy:
    # that policy lets it hold each pod with the devices it bills written beside.

    def held() -> bool:
        pods = [p for p in service_pods(kubectl, namespace, "llama") if p["spec"].get("nodeName")]
        return len(pods) == 2 and all(
            "gpuyard.io/metering" in (p["metadata"].get("finalizers") or ())
            and "gpuyard.io/billed-devices" in (p["metadata"].get("annotations") or {})
            for p in pods
        )

    wait_until(held, what="the finalizer and device annotation on both placed replicas")
    for pod in running:
        assert pod["spec"]["nodeName"] == node
        [container] = pod["spec"]["containers"]
        assert GPU not in (container["resources"].get("limits") or {})
        assert len(held_devices(kubectl, namespace, pod)) == 1
    # The third waits with the scheduler's reason, and the service says why.
    [pending] = [
        p for p in service_pods(kubectl, namespace, "llama") if not p["spec"].get("nodeName")
    ]
    scheduled = next(c for c in pending["status"]["conditions"] if c["type"] == "PodScheduled")
    assert scheduled["reason"] == "Unschedulable", scheduled
    limited = wait_until(
        lambda: (
            condition(kubectl, namespace, "llama", "CapacityLimited").get("status") == "True"
            and condition(kubectl, namespace, "llama", "CapacityLimited")
        ),
        what="CapacityLimited",
    )
    assert pool in limited["message"], limited

    # Two GPUs a replica: a new template (its spec is immutable), a rollout, the old one gone.
    kubectl("patch", "aiservice", "llama", "-n", namespace, "--type=merge",
            "-p", json.dumps({"spec": {"gpusPerReplica": 2, "replicas": 1}}))  # fmt: skip

    def rolled() -> dict[str, Any] | None:
        templates = claim_templates(kubectl, namespace)
        pods = service_pods(kubectl, namespace, "llama")
        if len(templates) != 1 or templates[0]["metadata"]["name"] == template["metadata"]["name"]:
            return None
        if len(pods) != 1 or not pods[0]["spec"].get("nodeName"):
            return None
        return pods[0]

    pod = wait_until(rolled, timeout=90, what="the rollout to a 2-GPU template, the old one gone")
    assert len(held_devices(kubectl, namespace, pod)) == 2


@pytest.fixture
def rig(cluster: ClusterState, operator: OperatorProcess, tmp_path: Path) -> Iterator[Rig]:
    with open_rig(cluster, operator, tmp_path) as found:
        yield found


def test_both_request_modes_are_billed_per_device_across_an_operator_killed_mid_way(
    kubectl: Kubectl, namespace: str, dra: list[DraRig], rig: Rig, load: Loads
) -> None:
    claims_rig, extended_rig = dra
    claims_node = claims_rig.node(0, gpus=3)
    extended_rig.node(0, gpus=2)
    claims_pool = claims_rig.pool("claims")
    extended_pool = extended_rig.pool("extended", request="ExtendedResource")
    # Both GPUs of llama's replica fully busy, embed's at half: the simulator serves them by
    # the UUIDs their slices publish, and the meter joins utilisation on those.
    load.set(namespace, "llama", 200)
    load.set(namespace, "embed", 50)
    with rig.operator(window_seconds=1) as operator:
        services = [aiservice("llama", claims_pool, 2, 1), aiservice("embed", extended_pool, 1, 1)]
        # A tenant's own claim and bare pod on the pool's third device: unmanaged usage.
        own = pinned_pod("own", claims_node, claims=[{"name": "gpu", "resourceClaimName": "own"}])
        own["metadata"]["labels"] = {"gpuyard.io/service": "own"}  # found like a service's
        items = [*services, claim("own"), own]
        kubectl.apply(json.dumps({"apiVersion": "v1", "kind": "List", "items": items}), namespace)

        def both_running() -> dict[str, dict[str, Any]] | None:
            pods = {s: service_pods(kubectl, namespace, s) for s in ("llama", "embed", "own")}
            if not all(
                len(p) == 1 and p[0]["status"].get("phase") == "Running" for p in pods.values()
            ):
                return None
            return {service: found[0] for service, found in pods.items()}

        pods = wait_until(both_running, timeout=60, what="one running replica of each service")
        # ExtendedResource: the Deployment asks nvidia.com/gpu as on any pool; the scheduler
        # made the claim. ClaimTemplate: the pod asks no extended resource.
        embed, llama = pods["embed"], pods["llama"]
        assert embed["spec"]["containers"][0]["resources"]["limits"][GPU] == "1"
        assert embed["status"]["extendedResourceClaimStatus"]["resourceClaimName"]
        assert GPU not in llama["spec"]["containers"][0]["resources"].get("limits", {})
        devices = {uid: held_devices(kubectl, namespace, pod) for pod in pods.values()
                   if (uid := pod["metadata"]["uid"])}  # fmt: skip
        assert sorted(len(d) for d in devices.values()) == [1, 1, 2]

        # The meter bills them, and has written their devices beside its finalizer.
        def annotated() -> bool:
            return all(
                "gpuyard.io/billed-devices" in (p["metadata"].get("annotations") or {})
                for s in ("llama", "embed", "own")
                for p in service_pods(kubectl, namespace, s)
            )

        wait_until(annotated, what="the meter's finalizer and device annotation on both pods")

        def measured() -> bool:
            found = {r.pod_uid for r in ledger_copies(rig.ledger) if r.avg_utilization}
            return found >= {pod["metadata"]["uid"] for pod in (embed, llama)}

        wait_until(measured, timeout=30, what="records of both pods measured by their GPUs' UUIDs")
        # Killed; the services go, their pods end and their claims are deleted meanwhile.
        operator.kill()
        for service in ("llama", "embed"):
            kubectl("delete", "aiservice", service, "-n", namespace, "--wait=false")
        kubectl("delete", "pod", "own", "-n", namespace, "--wait=false")
        kubectl("delete", "resourceclaim", "own", "-n", namespace, "--wait=false")

        def claims_gone() -> bool:
            return not kubectl.json("get", "resourceclaims", "-n", namespace)["items"]

        def ended() -> dict[str, dict[str, Any]] | None:
            items = kubectl.json("get", "pods", "-n", namespace)["items"]
            done = all(
                (s.get("state") or {}).get("terminated")
                for pod in items
                for s in pod["status"].get("containerStatuses") or [{}]
            )
            return {pod["metadata"]["uid"]: pod for pod in items} if done else None

        # The metering finalizer holds the pods, with their last timestamps; not their claims.
        last_states = wait_until(ended, timeout=60, what="both pods ended, held by the finalizer")
        assert set(last_states) == set(devices)
        wait_until(
            claims_gone, timeout=60, what="the pods' claims deleted while the operator is down"
        )
        operator.start()

        def released() -> bool:
            return not kubectl.json("get", "pods", "-n", namespace)["items"]

        wait_until(released, timeout=60, what="every pod billed to its end and released")

    records = [r for r in ledger_copies(rig.ledger) if r.namespace == namespace]
    for uid, pod in last_states.items():
        mine = {r.id: r for r in records if r.pod_uid == uid}.values()
        scheduled = next(c for c in pod["status"]["conditions"] if c["type"] == "PodScheduled")
        bound = epoch_floor(parse_time(scheduled["lastTransitionTime"]))
        finished = max(
            epoch_floor(parse_time(s["state"]["terminated"]["finishedAt"]))
            for s in pod["status"]["containerStatuses"]
        )
        held = devices[uid]
        # Within 1 s of the pod's own timestamps, for as many GPUs as it held devices.
        billed = sum(r.gpu_seconds for r in mine)
        assert abs(billed - (finished - bound) * len(held)) <= len(held), (
            pod["metadata"]["name"],
            billed,
        )
        assert all(r.gpus == len(held) and list(r.devices) == held for r in mine)
        assert all(device.uuid.startswith("GPU-") for device in held)
        service = pod["metadata"]["labels"]["gpuyard.io/service"]
        if service == "own":
            # Billed all the same, to its namespace (the meter never reads the label).
            assert all(r.unmanaged and r.service == "" for r in mine)
            continue
        utilisation = [r.avg_utilization for r in mine if r.avg_utilization is not None]
        busy = {"llama": Decimal(100), "embed": Decimal(50)}
        assert max(utilisation) == busy[service]
    assert {r.pod_uid for r in records} == set(last_states)


def test_the_autoscaler_asks_a_dra_pool_for_no_more_devices_than_it_has(
    kubectl: Kubectl, namespace: str, dra: list[DraRig], running_operator: OperatorProcess,
    load: Loads,
) -> None:  # fmt: skip
    rig = dra[0]
    rig.node(0, gpus=2)
    pool = rig.pool("auto")
    load.set(namespace, "hungry", 800)  # eight GPUs' worth: every replica at 100 %
    service = aiservice("hungry", pool, gpus=1, replicas=1)
    service["spec"].update(minReplicas=1, maxReplicas=8)
    del service["spec"]["replicas"]
    service["spec"]["autoscaling"] = {
        "mode": "Auto",
        "metrics": [{"type": "GPUUtilization", "targetPercent": 50}],
        "scaleUp": {"maxStepReplicas": 8},
    }
    # A namespace whose quota allows no claim template: no Deployment (never half-made
    # children), and the service says why; once the quota goes, the retry makes both.
    quota = {
        "apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "no-templates"},
        "spec": {"hard": {"count/resourceclaimtemplates.resource.k8s.io": "0"}},
    }  # fmt: skip
    kubectl.apply(json.dumps(quota), namespace)
    kubectl.apply(json.dumps(service), namespace)
    refused = wait_until(
        lambda: (
            condition(kubectl, namespace, "hungry", "Accepted").get("reason")
            == "ClaimTemplateRefused"
            and condition(kubectl, namespace, "hungry", "Accepted")
        ),
        what="Accepted=False ClaimTemplateRefused",
    )
    assert refused["status"] == "False"
    assert "exceeded quota" in refused["message"], refused
    assert kubectl.run("get", "deployment", "hungry", "-n", namespace, check=False).returncode
    kubectl("delete", "resourcequota", "no-templates", "-n", namespace)

    def capped() -> dict[str, Any] | None:
        found: dict[str, Any] = kubectl.json("get", "aiservice", "-n", namespace, "hungry")
        recommendation = (found.get("status") or {}).get("recommendation") or {}
        if recommendation.get("limitedBy") != "Capacity":
            return None
        return found

    found = wait_until(capped, timeout=60, what="the recommendation limited by Capacity")
    # Two devices, two replicas: the pool's devices, not the eight the load asks for.
    assert found["status"]["desiredReplicas"] == 2
    deployment = kubectl.json("get", "deployment", "-n", namespace, "hungry")
    assert deployment["spec"]["replicas"] == 2
    assert all(p["spec"].get("nodeName") for p in service_pods(kubectl, namespace, "hungry"))
