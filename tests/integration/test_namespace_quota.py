"""Tenants stay in their lane: a pool's namespace quota holds at every replica change, and
a revoked admission stops the service (issue 15, parts 3 and 4).

The operator runs as in the autoscaler tests (a tick every second, a 5 s metrics window);
the quota test brings a pool of its own on one node and samples, every second, the GPUs
the namespace's pods hold on it, counted as the kubelet counts them: every pod not
finished, terminating ones included.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable

from conftest import Loads, OperatorProcess
from support import Kubectl, wait_until
from test_autoscaler import (
    CAPACITY_NODE,
    GPU,
    autoscaled,
    condition,
    delete_and_wait,
    get,
    has_condition,
    manifest,
    own_pool,
    replicas,
    running_pods,
    utilisation,
    wait_replicas,
    wait_status,
)

__all__ = ["own_pool"]  # the fixture, imported so that this module's tests can use it


def gpus_of_namespace(kubectl: Kubectl, namespace: str, pool: str) -> int:
    """GPUs the namespace's pods hold on the pool: bound to its node, or pending for it."""
    held = 0
    for pod in get(kubectl, "pods", "-n", namespace)["items"]:
        if pod["status"].get("phase") in ("Succeeded", "Failed"):
            continue
        node = pod["spec"].get("nodeName")
        labels = pod["metadata"].get("labels") or {}
        if node != CAPACITY_NODE and not (node is None and labels.get("gpuyard.io/pool") == pool):
            continue
        for container in pod["spec"]["containers"]:
            held += int(container.get("resources", {}).get("limits", {}).get(GPU, 0))
    return held


class Sampler:
    """Samples a count every second in a thread; ``peak`` is the highest seen."""

    def __init__(self, observe: Callable[[], int]) -> None:
        self.observe = observe
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            self.samples.append(self.observe())
            self._stop.wait(max(0.0, 1.0 - (time.monotonic() - started)))

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    @property
    def peak(self) -> int:
        return max(self.samples, default=0)


def event_reasons(kubectl: Kubectl, namespace: str, name: str) -> list[str]:
    events = get(
        kubectl, "events", "-n", namespace, "--field-selector", f"involvedObject.name={name}"
    )["items"]
    return [event["reason"] for event in events]


def test_the_quota_holds_under_the_autoscaler_and_kubectl_scale(
    kubectl: Kubectl,
    namespace: str,
    running_operator: OperatorProcess,
    load: Loads,
    own_pool: Callable[..., str],
) -> None:
    quota = 2
    quota_pool = own_pool(CAPACITY_NODE, maxGpusPerNamespace=quota)
    load.set(namespace, "auto", 800)  # eight GPUs' worth: it wants every replica it may have
    auto = autoscaled(
        "auto",
        quota_pool,
        [utilisation(50)],
        max_replicas=4,
        autoscaling={"scaleUp": {"maxStepReplicas": 4}},
    )
    manual = autoscaled("manual", quota_pool, [utilisation(50)], mode="Off", replicas=1)
    try:
        with Sampler(lambda: gpus_of_namespace(kubectl, namespace, quota_pool)) as sampler:
            # Alone, the autoscaled service takes the whole quota and no more.
            kubectl.apply(manifest(auto), namespace)
            found = wait_status(
                kubectl,
                namespace,
                "auto",
                has_condition("QuotaLimited", "True", "QuotaCapsReplicas"),
                what="auto: QuotaLimited=True",
                timeout=90,
            )
            wait_replicas(kubectl, namespace, "auto", quota, timeout=90)
            found = get(kubectl, "ais", "-n", namespace, "auto")
            assert found["status"]["recommendation"]["limitedBy"] == "Quota"
            assert "QuotaLimited" in event_reasons(kubectl, namespace, "auto")

            # A second service of the namespace: the two share the quota, one GPU each.
            kubectl.apply(manifest(manual), namespace)
            wait_replicas(kubectl, namespace, "manual", 1, timeout=90)
            wait_replicas(kubectl, namespace, "auto", 1, timeout=90)

            # kubectl scale in mode Off past the quota is clamped, with the condition.
            kubectl("scale", "-n", namespace, "ais/manual", f"--replicas={quota + 2}")
            found = wait_status(
                kubectl,
                namespace,
                "manual",
                has_condition("QuotaLimited", "True", "QuotaCapsReplicas"),
                what="manual: QuotaLimited=True",
            )
            assert "4 replicas wanted, 1 allowed" in condition(found, "QuotaLimited")["message"]
            wait_until(
                lambda: sampler.samples[-5:].count(quota) == 5,
                timeout=60,
                what="the namespace to settle at its quota",
            )
            assert replicas(kubectl, namespace, "manual") == 1
            assert replicas(kubectl, namespace, "auto") == 1
        assert sampler.peak <= quota, sampler.samples
        assert len(sampler.samples) >= 5  # it did sample (each sample is a kubectl call)
    finally:
        delete_and_wait(kubectl, namespace, "auto")
        delete_and_wait(kubectl, namespace, "manual")


def test_a_namespace_dropped_from_the_pool_goes_to_zero_and_comes_back(
    kubectl: Kubectl,
    namespace: str,
    running_operator: OperatorProcess,
    own_pool: Callable[..., str],
) -> None:
    label = "gpuyard.io/team"
    kubectl("label", "namespace", namespace, f"{label}={namespace}")
    pool = own_pool(CAPACITY_NODE, namespaceSelector={"matchLabels": {label: namespace}})
    service = autoscaled("tenant", pool, [utilisation(50)], mode="Off", replicas=2)
    kubectl.apply(manifest(service), namespace)
    try:
        wait_replicas(kubectl, namespace, "tenant", 2, timeout=90)
        uid = get(kubectl, "deployment", "-n", namespace, "tenant")["metadata"]["uid"]

        def revoked(what: str) -> None:
            wait_replicas(kubectl, namespace, "tenant", 0, timeout=30)
            found = wait_status(
                kubectl,
                namespace,
                "tenant",
                has_condition("Accepted", "False", "NamespaceNotAllowed"),
                what=f"Accepted=False after {what}",
                timeout=30,
            )
            assert condition(found, "Ready")["reason"] == "NamespaceNotAllowed"
            wait_until(
                lambda: "NamespaceNotAllowed" in event_reasons(kubectl, namespace, "tenant"),
                timeout=30,
                what="the revocation Event",
            )
            # Nothing else of it is deleted: the same Deployment, at zero.
            assert get(kubectl, "deployment", "-n", namespace, "tenant")["metadata"]["uid"] == uid

        def granted() -> None:
            wait_replicas(kubectl, namespace, "tenant", 2, timeout=90)
            wait_status(
                kubectl,
                namespace,
                "tenant",
                has_condition("Accepted", "True"),
                what="Accepted=True again",
            )

        # The namespace loses its label.
        kubectl("label", "namespace", namespace, f"{label}-")
        revoked("the label went")
        kubectl("label", "namespace", namespace, f"{label}={namespace}")
        granted()

        # The pool's selector changes.
        closed = json.dumps({"spec": {"namespaceSelector": {"matchLabels": {label: "other"}}}})
        kubectl("patch", "gpool", pool, "--type=merge", "-p", closed)
        revoked("the selector changed")
        opened = json.dumps({"spec": {"namespaceSelector": {"matchLabels": {label: namespace}}}})
        kubectl("patch", "gpool", pool, "--type=merge", "-p", opened)
        granted()
        assert len(running_pods(kubectl, namespace, "tenant")) == 2
    finally:
        delete_and_wait(kubectl, namespace, "tenant")
