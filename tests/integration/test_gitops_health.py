"""GitOps tools read gpuyard's status as they really do (issue 19): kstatus, the library
behind Flux's health checks, and Argo CD's Lua engine (gopher-lua) running the health
scripts of docs/argocd/, both through hack/health, on AIServices and GPUPools of the real
cluster in each state the suite produces.

Every object is created first and the test waits for all of them at once, then reads them
with one run of the program: the states cost one settle, not one each.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from conftest import HealthCheck, OperatorProcess
from support import Kubectl, wait_until
from test_core import (
    L4_NODE,
    L4_NODE_GPUS,
    REFUSED_BY_THE_OPERATOR,
    Pools,
    Refusal,
    aiservice,
    condition,
    get,
    manifest,
)

# isort: split
# test_core's fixtures: the session's pools, deleted once their pods are gone.
from test_core import gpu_pools, session_pools  # noqa: F401

RESTRICTED = "pod-security.kubernetes.io/enforce=restricted"


@dataclass(frozen=True)
class Expected:
    """An object and how each tool must read it once the operator has settled on `ready`."""

    resource: str  # "ais" or "gpool"
    name: str
    namespace: str | None
    #: Ready's reason for the object's current generation: the operator has settled.
    ready: str
    kstatus: str
    argocd: str

    def settled(self, obj: dict[str, Any] | None) -> bool:
        """Whether `obj`'s status says `ready` for its current generation, with the kstatus
        conditions written beside it."""
        if obj is None:
            return False
        generation = obj["metadata"]["generation"]
        ready = condition(obj, "Ready") or {}
        written = [condition(obj, kind) for kind in ("Ready", "Reconciling", "Stalled")]
        return (
            ready.get("reason") == self.ready
            and (obj.get("status") or {}).get("observedGeneration") == generation
            and all(c is not None and c.get("observedGeneration") == generation for c in written)
        )

    def get(self, kubectl: Kubectl) -> dict[str, Any] | None:
        where = ["-n", self.namespace] if self.namespace else []
        return get(kubectl, self.resource, *where, self.name)


@pytest.fixture
def restricted_namespace(kubectl: Kubectl) -> Iterator[str]:
    """A second namespace of the test's own, enforcing Pod Security "restricted"."""
    name = f"t-gitops-restricted-{secrets.token_hex(3)}"
    kubectl("create", "namespace", name)
    kubectl("label", "namespace", name, RESTRICTED)
    yield name
    kubectl.run("delete", "namespace", name, "--wait=false", check=False)


def test_kstatus_and_argo_cd_read_every_state_of_both_kinds(
    *,
    kubectl: Kubectl,
    namespace: str,
    restricted_namespace: str,
    running_operator: OperatorProcess,
    gpu_pools: Pools,  # noqa: F811  # the fixture imported above
    health_check: HealthCheck,
) -> None:
    expected: list[Expected] = []

    def service(spec: dict[str, Any], ready: str, kstatus: str, argocd: str, ns: str) -> None:
        kubectl.apply(manifest(spec), ns)
        expected.append(Expected("ais", spec["metadata"]["name"], ns, ready, kstatus, argocd))

    def pool(name: str, ready: str, kstatus: str, argocd: str) -> None:
        expected.append(Expected("gpool", name, None, ready, kstatus, argocd))

    # Serving as the spec says.
    service(aiservice("ready", "a100"), "ReplicasReady", "Current", "Healthy", namespace)
    service(aiservice("idle", "a100", replicas=0), "ScaledToZero", "Current", "Healthy", namespace)
    pool("a100", "NodesReady", "Current", "Healthy")

    # Work under way. A pool of one 4-GPU node, and two replicas of 4 GPUs: one at most is
    # placed, the other waits for GPUs.
    single = gpu_pools.create({"kubernetes.io/hostname": L4_NODE})
    waiting = aiservice("waiting", single, gpus=L4_NODE_GPUS, replicas=2)
    service(waiting, "WaitingForGPUs", "InProgress", "Progressing", namespace)
    pool(single, "NodesReady", "Current", "Healthy")
    # A replica whose claim does not exist (yet) stays Pending, unscheduled, as it starts.
    starting = aiservice("starting", "a100")
    starting["spec"]["volumes"] = [
        {"name": "models", "persistentVolumeClaim": {"claimName": "not-provisioned-yet"}}
    ]
    service(starting, "ReplicasNotReady", "InProgress", "Progressing", namespace)
    # No node matches (yet): a node group scaling from zero would bring them.
    nowhere = gpu_pools.create({"gpuyard.io/pool": f"none-{secrets.token_hex(3)}"})
    pool(nowhere, "NoMatchingNodes", "InProgress", "Progressing")

    # Refusals that last until someone acts: each of the operator's bad-input table, and
    # pods the API server refuses.
    for param in REFUSED_BY_THE_OPERATOR:
        [case] = param.values
        assert isinstance(case, Refusal)
        refused = case.arrange(kubectl, namespace, gpu_pools)
        refused["metadata"]["name"] = f"refused-{case.reason.lower()}"
        service(refused, case.reason, "Failed", "Degraded", namespace)
    rootful = aiservice("rootful", "a100")
    service(rootful, "PodsRefused", "Failed", "Degraded", restricted_namespace)

    objects = _all_settled(kubectl, expected)
    read = health_check.read(objects)

    seen = {
        (item["kind"], item["name"]): (item["kstatus"]["status"], item["argocd"]["status"])
        for item in read
    }
    assert seen == {
        ("AIService" if e.resource == "ais" else "GPUPool", e.name): (e.kstatus, e.argocd)
        for e in expected
    }
    for obj, item, e in zip(objects, read, expected, strict=True):
        if e.argocd != "Healthy":
            # Argo CD names the reason, so a person sees what to do without kubectl.
            assert item["argocd"]["message"].startswith(f"{e.ready}: "), item
        if e.kstatus == "Failed":
            # kstatus (and so Flux's failure) carries the refusal's message.
            stalled = condition(obj, "Stalled") or {}
            assert item["kstatus"]["message"] == stalled.get("message"), item


def _all_settled(kubectl: Kubectl, expected: list[Expected]) -> list[dict[str, Any]]:
    """The objects, once every one has settled; the timeout names those that did not."""
    pending: list[str] = []

    def check() -> list[dict[str, Any]] | None:
        objects = [e.get(kubectl) for e in expected]
        pending[:] = [
            f"{e.name}: {(condition(obj or {}, 'Ready') or {}).get('reason')} (wants {e.ready})"
            for e, obj in zip(expected, objects, strict=True)
            if not e.settled(obj)
        ]
        return None if pending else [obj for obj in objects if obj is not None]

    try:
        return wait_until(check, timeout=120, what="every object to settle on its Ready reason")
    except AssertionError as error:
        raise AssertionError(f"{error}; not settled: {pending}") from None
