"""gpuyard core on the real cluster: pools, services, children, status.

The cluster is shared with other tests that may hold GPUs at the same time, so no test
assumes a pool is empty: expectations are computed from the pool's status and the pods
actually bound, or the test brings a pool of its own (a single node, by hostname).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from conftest import OperatorProcess, flush_audit, reconciles
from localcluster.cluster import REPO_ROOT, audit_writes
from support import Kubectl, wait_until

GPU = "nvidia.com/gpu"
IMAGE = "registry.example/llm:1"
GPU_TOLERATION = {"key": GPU, "operator": "Exists", "effect": "NoSchedule"}
#: A node of the l4 pool (4 GPUs) that tests give a pool of its own.
L4_NODE = "gpu-l4-1"
L4_NODE_GPUS = 4
TERMINAL_PHASES = ("Succeeded", "Failed")


def condition(obj: dict, kind: str) -> dict | None:
    return next((c for c in obj.get("status", {}).get("conditions", []) if c["type"] == kind), None)


def aiservice(
    name: str,
    pool: str = "l4",
    *,
    gpus: int = 1,
    replicas: int | None = 1,
    min_replicas: int = 0,
    max_replicas: int = 4,
    port: int | None = None,
    image: str = IMAGE,
) -> dict[str, Any]:
    """An AIService in mode Off: `replicas` is what runs, as `kubectl scale` would set it."""
    container: dict[str, Any] = {"image": image}
    if port is not None:
        container["port"] = port
    spec: dict[str, Any] = {
        "pool": pool,
        "gpusPerReplica": gpus,
        "container": container,
        "minReplicas": min_replicas,
        "maxReplicas": max_replicas,
        "autoscaling": {"mode": "Off"},
    }
    if replicas is not None:
        spec["replicas"] = replicas
    return {
        "apiVersion": "gpuyard.io/v1alpha1",
        "kind": "AIService",
        "metadata": {"name": name},
        "spec": spec,
    }


def gpupool(name: str, node_selector: dict[str, str], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "gpuyard.io/v1alpha1",
        "kind": "GPUPool",
        "metadata": {"name": name},
        "spec": {
            "gpuType": "l4",
            "nodeSelector": node_selector,
            "tolerations": [GPU_TOLERATION],
            "price": {"perGpuHour": "0.80"},
            **spec,
        },
    }


def manifest(*objects: dict[str, Any]) -> str:
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": list(objects)})


def get(kubectl: Kubectl, *args: str) -> dict[str, Any] | None:
    """An object, or None when it does not exist."""
    result = kubectl.run("get", *args, "-o", "json", check=False)
    if result.returncode != 0:
        assert "NotFound" in result.stderr, result.stderr
        return None
    found: dict[str, Any] = json.loads(result.stdout)
    return found


def service_pods(kubectl: Kubectl, namespace: str, name: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = kubectl.json(
        "get", "pods", "-n", namespace, "-l", f"gpuyard.io/service={name}"
    )["items"]
    return items


def wait_condition(
    kubectl: Kubectl,
    namespace: str,
    name: str,
    kind: str,
    status: str,
    *,
    reason: str | None = None,
    timeout: float = 60,
) -> dict[str, Any]:
    """The service once its `kind` condition has `status` (and `reason`) for its current
    generation."""

    def check() -> dict[str, Any] | None:
        service = get(kubectl, "ais", "-n", namespace, name)
        found = condition(service or {}, kind)
        if (
            service is not None
            and found is not None
            and found["status"] == status
            and (reason is None or found["reason"] == reason)
            and found.get("observedGeneration") == service["metadata"]["generation"]
        ):
            return service
        return None

    return wait_until(check, timeout=timeout, what=f"{kind}={status} ({reason}) on {name}")


def wait_running(kubectl: Kubectl, namespace: str, name: str, replicas: int) -> list[Any]:
    """The service's pods once exactly `replicas` of them run and Ready says so."""
    wait_condition(kubectl, namespace, name, "Ready", "True")

    def running() -> list[Any] | None:
        pods = [
            pod
            for pod in service_pods(kubectl, namespace, name)
            if not pod["metadata"].get("deletionTimestamp")
        ]
        phases = [pod["status"].get("phase") for pod in pods]
        return pods if phases == ["Running"] * replicas else None

    return wait_until(running, what=f"{replicas} running pods of {name}")


def children(kubectl: Kubectl, namespace: str, name: str) -> dict[str, list[str]]:
    """Names of everything in `namespace` that belongs to service `name`."""
    selector = f"gpuyard.io/service={name}"
    found = {}
    for kind in ("deployments", "services", "replicasets", "pods"):
        items = kubectl.json("get", kind, "-n", namespace, "-l", selector)["items"]
        found[kind] = [item["metadata"]["name"] for item in items]
    return found


def pool_status(kubectl: Kubectl, name: str) -> dict[str, Any]:
    """The pool's status once the operator has computed it for the current generation."""

    def check() -> dict[str, Any] | None:
        pool = get(kubectl, "gpool", name)
        status = (pool or {}).get("status") or {}
        current = (
            pool is not None
            and status.get("observedGeneration") == (pool["metadata"]["generation"])
        )
        return status if current and "capacity" in status else None

    return wait_until(check, what=f"the status of GPUPool {name}")


def gpus_bound_to(kubectl: Kubectl, node: str) -> int:
    """GPUs held by the pods bound to `node` that have not finished, in every namespace."""
    pods = kubectl.json("get", "pods", "-A", "--field-selector", f"spec.nodeName={node}")["items"]
    total = 0
    for pod in pods:
        if pod["status"].get("phase") in TERMINAL_PHASES:
            continue
        for container in pod["spec"]["containers"]:
            total += int(container.get("resources", {}).get("limits", {}).get(GPU, 0))
    return total


def operator_writes(operator: OperatorProcess, namespace: str) -> list[dict[str, Any]]:
    """Writes of the operator (gpuyard's own calls and Kopf's) to objects in `namespace`."""
    events = audit_writes(operator.cluster, "gpuyard/") + audit_writes(operator.cluster, "kopf/")
    return [e for e in events if e.get("objectRef", {}).get("namespace") == namespace]


class Pools:
    """GPUPools that tests create, deleted at the end of the session."""

    def __init__(self, kubectl: Kubectl) -> None:
        self.kubectl = kubectl
        self.names: list[str] = []

    def new_name(self) -> str:
        """A fresh pool name, deleted at the end whoever creates the pool."""
        name = f"t-pool-{secrets.token_hex(3)}"
        self.names.append(name)
        return name

    def create(self, node_selector: dict[str, str], **spec: Any) -> str:
        name = self.new_name()
        self.kubectl.apply(manifest(gpupool(name, node_selector, **spec)))
        return name

    def pods_left(self) -> list[str]:
        pods = self.kubectl.json("get", "pods", "-A", "-l", "gpuyard.io/pool")["items"]
        names = set(self.names)
        return [
            f"{pod['metadata']['namespace']}/{pod['metadata']['name']}"
            for pod in pods
            if pod["metadata"]["labels"]["gpuyard.io/pool"] in names
        ]

    def delete_all(self) -> None:
        # The meter prices a pod's last usage window with its pool and only then lets the
        # pod go (its finalizer), so a pool is deleted once the namespaces of the tests
        # that used it have emptied.
        try:
            wait_until(
                lambda: not self.pods_left(),
                timeout=180,
                interval=2,
                what="the pods of the tests' pools to be gone",
            )
        finally:
            for name in self.names:
                self.kubectl.run("delete", "gpupool", name, "--wait=false", check=False)


@pytest.fixture(scope="session")
def session_pools(kubectl: Kubectl, operator: OperatorProcess) -> Iterator[Pools]:
    # Depends on `operator` so that the operator still runs (and meters) at teardown.
    pools = Pools(kubectl)
    yield pools
    pools.delete_all()


@pytest.fixture
def gpu_pools(session_pools: Pools, running_operator: OperatorProcess) -> Pools:
    """Creates GPUPools for a test (`create(selector, **spec)`)."""
    return session_pools


@pytest.fixture
def quiet_operator(
    operator: OperatorProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    """The operator alone, with usage marks written once an hour instead of every minute.

    Tests that count the operator's writes need this: the meter legitimately patches
    ``status.usage`` of every service with running pods once per usage window, and the
    audit log cannot tell that write from a reconcile's. The session's operator is
    stopped meanwhile (two operators would both reconcile) and started again after.
    """
    operator.stop()
    quiet = OperatorProcess(
        operator.cluster,
        tmp_path_factory.mktemp("quiet-operator"),
        {"GPUYARD_USAGE_WINDOW_SECONDS": "3600"},
        kubeconfig=operator.kubeconfig,
    )
    try:
        quiet.start()
        yield quiet
    finally:
        quiet.stop()
        operator.start()


# --- the examples ---------------------------------------------------------------------------


def test_examples_run_on_their_pool(
    kubectl: Kubectl, namespace: str, running_operator: OperatorProcess
) -> None:
    kubectl("apply", "-n", namespace, "-f", str(REPO_ROOT / "examples" / "llm-chat.yaml"))
    kubectl("wait", "-n", namespace, "--for=condition=Ready", "ais/llm-chat", "--timeout=60s")
    pods = kubectl.json("get", "pods", "-n", namespace, "-l", "gpuyard.io/service=llm-chat")
    assert len(pods["items"]) == 1
    pod = pods["items"][0]
    assert pod["status"]["phase"] == "Running"
    a100_nodes = kubectl.json("get", "nodes", "-l", "gpuyard.io/pool=a100")["items"]
    assert pod["spec"]["nodeName"] in {node["metadata"]["name"] for node in a100_nodes}
    assert pod["spec"]["containers"][0]["resources"]["limits"][GPU] == "2"
    assert pod["spec"]["containers"][0]["resources"]["requests"][GPU] == "2"
    # The pool's capacity is what its simulated nodes advertise.
    status = pool_status(kubectl, "a100")
    assert status["capacity"] == sum(int(n["status"]["allocatable"][GPU]) for n in a100_nodes)
    assert status["capacity"] == 16
    assert status["nodes"] == status["readyNodes"] == len(a100_nodes) == 2
    table = kubectl("get", "ais", "-n", namespace)
    assert table.split("\n")[0].split()[:7] == [
        "NAME", "POOL", "GPUS", "READY", "DESIRED", "COST", "STATUS",
    ]  # fmt: skip
    assert "llm-chat   a100   2      1       1" in table
    assert table.split("\n")[1].split()[-2] == "True"


# --- capacity -------------------------------------------------------------------------------


def test_more_replicas_than_the_pool_holds_is_capacity_limited(
    kubectl: Kubectl,
    namespace: str,
    running_operator: OperatorProcess,
    gpu_pools: Pools,
) -> None:
    pool = gpu_pools.create({"kubernetes.io/hostname": L4_NODE})
    before = pool_status(kubectl, pool)
    assert before["capacity"] == L4_NODE_GPUS
    gpus = 2
    # Room for every free GPU, and two replicas more that cannot be placed.
    replicas = before["available"] // gpus + 2
    kubectl.apply(manifest(aiservice("big", pool, gpus=gpus, replicas=replicas)), namespace)

    def settled() -> tuple[dict[str, Any], int, int] | None:
        pods = service_pods(kubectl, namespace, "big")
        bound = sum(1 for pod in pods if pod["spec"].get("nodeName"))
        status = pool_status(kubectl, pool)
        held = gpus_bound_to(kubectl, L4_NODE)
        # The pool's numbers must agree with the pods the scheduler actually bound.
        if (
            len(pods) != replicas
            or status["allocated"] != held
            or status["available"] != status["capacity"] - held
            # The scheduler has placed every replica that fits.
            or status["available"] >= gpus
        ):
            return None
        missing = (replicas - bound) * gpus - status["available"]
        service = get(kubectl, "ais", "-n", namespace, "big") or {}
        limited = condition(service, "CapacityLimited") or {}
        wanted = f'GPUPool "{pool}" needs {missing} more {GPU}'
        if limited.get("status") == "True" and limited["message"].startswith(wanted):
            return service, bound, missing
        return None

    service, bound, missing = wait_until(settled, what="CapacityLimited with the missing GPUs")
    assert bound < replicas
    assert missing > 0
    assert condition(service, "CapacityLimited")["reason"] == "InsufficientGPUs"
    ready = condition(service, "Ready")
    assert ready["status"] == "False"
    assert ready["reason"] == "WaitingForGPUs"
    assert service["status"]["desiredReplicas"] == replicas
    unscheduled = [
        p for p in service_pods(kubectl, namespace, "big") if not p["spec"].get("nodeName")
    ]
    assert len(unscheduled) == replicas - bound

    # Freeing the GPUs gives them back to the pool.
    kubectl("delete", "ais", "big", "-n", namespace)

    def freed() -> bool:
        status = pool_status(kubectl, pool)
        held = gpus_bound_to(kubectl, L4_NODE)
        # A finished pod may stay a while for the meter (its finalizer), holding no GPU.
        done = all(
            pod["status"].get("phase") in TERMINAL_PHASES
            for pod in service_pods(kubectl, namespace, "big")
        )
        return done and status["allocated"] == held and status["available"] == L4_NODE_GPUS - held

    wait_until(freed, what="the pool's GPUs to come back")


# --- children follow the spec -----------------------------------------------------------------


HAND_EDITS = {
    "image": [
        {"op": "replace", "path": "/spec/template/spec/containers/0/image", "value": "evil/x:1"}
    ],
    "gpu-request": [
        {
            "op": "replace",
            "path": "/spec/template/spec/containers/0/resources/limits/nvidia.com~1gpu",
            "value": "3",
        },
        {
            "op": "replace",
            "path": "/spec/template/spec/containers/0/resources/requests/nvidia.com~1gpu",
            "value": "3",
        },
    ],
    "node-selector": [
        {
            "op": "replace",
            "path": "/spec/template/spec/nodeSelector/gpuyard.io~1pool",
            "value": "a100",
        }
    ],
    "node-selector-removed": [{"op": "remove", "path": "/spec/template/spec/nodeSelector"}],
    "tolerations-removed": [{"op": "remove", "path": "/spec/template/spec/tolerations"}],
}


@pytest.mark.parametrize("edit", HAND_EDITS.values(), ids=HAND_EDITS.keys())
def test_a_hand_edit_of_the_deployment_is_reverted(
    kubectl: Kubectl,
    namespace: str,
    running_operator: OperatorProcess,
    edit: list[dict[str, Any]],
) -> None:
    kubectl.apply(manifest(aiservice("edited")), namespace)
    wait_running(kubectl, namespace, "edited", 1)
    original = kubectl.json("get", "deployment", "-n", namespace, "edited")
    template = original["spec"]["template"]["spec"]

    kubectl("patch", "deployment", "-n", namespace, "edited", "--type=json", "-p", json.dumps(edit))

    def reverted() -> dict[str, Any] | None:
        live = kubectl.json("get", "deployment", "-n", namespace, "edited")
        edited = live["metadata"]["generation"] > original["metadata"]["generation"]
        return live if edited and live["spec"]["template"]["spec"] == template else None

    wait_until(reverted, what="the Deployment's pod template to be restored")
    pods = wait_running(kubectl, namespace, "edited", 1)
    [container] = pods[0]["spec"]["containers"]
    assert container["image"] == IMAGE
    assert container["resources"]["limits"][GPU] == "1"
    assert pods[0]["spec"]["nodeSelector"] == {"gpuyard.io/pool": "l4"}


def test_a_field_the_service_stops_asking_for_leaves_the_deployment(
    kubectl: Kubectl, namespace: str, running_operator: OperatorProcess
) -> None:
    """The Deployment is created with a plain create, whose fields are not server-side
    apply's to remove; the first apply after it takes them over, so they still go."""
    service = aiservice("trimmed", replicas=0)
    service["spec"]["container"]["args"] = ["--verbose"]
    kubectl.apply(manifest(service), namespace)

    def container() -> dict[str, Any] | None:
        deployment = get(kubectl, "deployment", "-n", namespace, "trimmed")
        if deployment is None:
            return None
        [found] = deployment["spec"]["template"]["spec"]["containers"]
        return dict(found)

    wait_until(lambda: (container() or {}).get("args") == ["--verbose"], what="the args")
    del service["spec"]["container"]["args"]
    kubectl.apply(manifest(service), namespace)

    wait_until(lambda: "args" not in (container() or {"args": 1}), what="the args to go")
    deployment = kubectl.json(
        "get", "deployment", "-n", namespace, "trimmed", "--show-managed-fields"
    )
    ours = [
        (entry["operation"], entry.get("subresource"))
        for entry in deployment["metadata"]["managedFields"]
        if entry["manager"] == "gpuyard"
    ]
    assert ours == [("Apply", None)], deployment["metadata"]["managedFields"]


#: Fields someone adds to the pod template beside gpuyard's, as `kubectl patch` arguments.
ADDED_BY_HAND: dict[str, list[str]] = {
    "node-selector": [
        "--type=json",
        "-p",
        json.dumps(
            [
                {
                    "op": "add",
                    "path": "/spec/template/spec/nodeSelector/kubernetes.io~1hostname",
                    "value": "cpu-0",
                }
            ]
        ),
    ],
    # A strategic merge patch, as `kubectl patch` sends by default: the containers list
    # is merged by name, so the sidecar joins gpuyard's container.
    "extra-container": [
        "-p",
        json.dumps(
            {
                "spec": {
                    "template": {
                        "spec": {
                            "containers": [{"name": "sidecar", "image": "registry.example/x:1"}]
                        }
                    }
                }
            }
        ),
    ],
    # A field the API server defaults: removed, it comes back as the default.
    "changed-default": [
        "-p",
        json.dumps({"spec": {"template": {"spec": {"terminationGracePeriodSeconds": 5}}}}),
    ],
    "toleration-volume-and-annotation": [
        "-p",
        json.dumps(
            {
                "spec": {
                    "template": {
                        "metadata": {"annotations": {"example.com/note": "by hand"}},
                        "spec": {
                            "tolerations": [{"key": "dedicated", "operator": "Exists"}],
                            "volumes": [{"name": "scratch", "emptyDir": {}}],
                        },
                    }
                }
            }
        ),
    ],
}


def template_owners(deployment: dict[str, Any]) -> list[tuple[str, str, str | None]]:
    """(manager, operation, subresource) of every managedFields entry that holds a field of
    the pod template."""
    return [
        (entry["manager"], entry["operation"], entry.get("subresource"))
        for entry in deployment["metadata"]["managedFields"]
        if "f:template" in entry.get("fieldsV1", {}).get("f:spec", {})
    ]


@pytest.mark.parametrize("patch", ADDED_BY_HAND.values(), ids=ADDED_BY_HAND.keys())
def test_fields_added_to_the_pod_template_by_hand_are_removed(
    kubectl: Kubectl, namespace: str, running_operator: OperatorProcess, patch: list[str]
) -> None:
    # Created with no replica, then scaled: the apply of the scale leaves gpuyard one
    # Apply entry (a create records its fields as gpuyard's Update).
    kubectl.apply(manifest(aiservice("pinned", replicas=0)), namespace)
    wait_until(lambda: get(kubectl, "deployment", "-n", namespace, "pinned"), what="the Deployment")
    kubectl("scale", "-n", namespace, "ais/pinned", "--replicas=1")
    wait_running(kubectl, namespace, "pinned", 1)
    original = kubectl.json("get", "deployment", "-n", namespace, "pinned", "--show-managed-fields")
    assert template_owners(original) == [("gpuyard", "Apply", None)]

    kubectl("patch", "deployment", "-n", namespace, "pinned", *patch)

    def restored() -> dict[str, Any] | None:
        live = kubectl.json("get", "deployment", "-n", namespace, "pinned", "--show-managed-fields")
        edited = live["metadata"]["generation"] > original["metadata"]["generation"]
        # gpuyard holds the whole template, in its one Apply entry: nobody else owns any of it.
        owned = template_owners(live) == [("gpuyard", "Apply", None)]
        same = live["spec"]["template"] == original["spec"]["template"]
        return live if edited and owned and same else None

    wait_until(restored, timeout=20, what="the added fields to be removed")
    pods = wait_running(kubectl, namespace, "pinned", 1)
    [container] = original["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in pods[0]["spec"]["containers"]] == [container["name"]]
    assert pods[0]["spec"]["nodeSelector"] == {"gpuyard.io/pool": "l4"}


def test_kubectl_rollout_restart_restarts_the_pods_once(
    kubectl: Kubectl, namespace: str, running_operator: OperatorProcess
) -> None:
    """Its annotation on the pod template is the one field of another manager gpuyard
    keeps: removing it would roll the pods a second time."""
    kubectl.apply(manifest(aiservice("restarted")), namespace)
    [before] = wait_running(kubectl, namespace, "restarted", 1)
    flush_audit(kubectl, running_operator, namespace)
    writes_before = len(operator_writes(running_operator, namespace))

    kubectl("rollout", "restart", "-n", namespace, "deployment/restarted")
    kubectl("rollout", "status", "-n", namespace, "deployment/restarted", "--timeout=60s")

    [after] = wait_running(kubectl, namespace, "restarted", 1)
    assert after["metadata"]["uid"] != before["metadata"]["uid"]
    flush_audit(kubectl, running_operator, namespace)
    deployment = kubectl.json("get", "deployment", "-n", namespace, "restarted")
    annotations = deployment["spec"]["template"]["metadata"].get("annotations") or {}
    assert "kubectl.kubernetes.io/restartedAt" in annotations
    # One rollout after the first: a template put back would be a third revision.
    assert deployment["metadata"]["annotations"]["deployment.kubernetes.io/revision"] == "2"
    written = [
        event
        for event in operator_writes(running_operator, namespace)[writes_before:]
        if event["objectRef"].get("resource") == "deployments"
    ]
    assert written == [], json.dumps(written, indent=1)[:2000]


def test_a_reconcile_with_nothing_to_do_writes_nothing(
    kubectl: Kubectl, namespace: str, quiet_operator: OperatorProcess
) -> None:
    kubectl("apply", "-n", namespace, "-f", str(REPO_ROOT / "examples" / "llm-chat.yaml"))
    kubectl("wait", "-n", namespace, "--for=condition=Ready", "ais/llm-chat", "--timeout=60s")
    # The autoscaler reads the new pod's GPU series a few seconds after it is Ready, and
    # says so in status: that write is due. Measure once the service has settled.
    kubectl(
        "wait", "-n", namespace, "--for=condition=MetricsAvailable", "ais/llm-chat",
        "--timeout=60s",
    )  # fmt: skip
    flush_audit(kubectl, quiet_operator, namespace)
    # Only this namespace: other tests' objects come and go meanwhile (pods finish, their
    # metering finalizers are removed), and writing for them is right.
    before = len(operator_writes(quiet_operator, namespace))
    done = reconciles(quiet_operator)
    # An annotation changes the object but not what gpuyard makes of it.
    kubectl("annotate", "-n", namespace, "ais/llm-chat", "touched=yes")
    wait_until(lambda: reconciles(quiet_operator) > done, what="a reconcile of the touched service")
    flush_audit(kubectl, quiet_operator, namespace)
    writes = operator_writes(quiet_operator, namespace)[before:]
    assert writes == [], json.dumps(writes, indent=1)[:2000]


def test_kubectl_scale_drives_a_service_in_mode_off(
    kubectl: Kubectl, namespace: str, running_operator: OperatorProcess
) -> None:
    kubectl.apply(manifest(aiservice("scaled", replicas=1)), namespace)
    wait_running(kubectl, namespace, "scaled", 1)

    kubectl("scale", "-n", namespace, "ais/scaled", "--replicas=3")
    wait_until(
        lambda: (
            kubectl.json("get", "deployment", "-n", namespace, "scaled")["spec"]["replicas"] == 3
        ),
        what="the Deployment to follow kubectl scale",
    )
    wait_running(kubectl, namespace, "scaled", 3)
    scale = kubectl.json("get", "ais", "-n", namespace, "scaled", "--subresource=scale")
    assert scale["spec"]["replicas"] == 3
    assert scale["status"]["replicas"] == 3
    assert scale["status"]["selector"] == (
        "app.kubernetes.io/instance=scaled,gpuyard.io/service=scaled"
    )

    kubectl("scale", "-n", namespace, "ais/scaled", "--replicas=0")
    service = wait_condition(kubectl, namespace, "scaled", "Ready", "True", reason="ScaledToZero")
    assert kubectl.json("get", "deployment", "-n", namespace, "scaled")["spec"]["replicas"] == 0
    assert service["status"]["desiredReplicas"] == 0
    # Each pod goes once the meter has billed its last second (its finalizer), which may
    # take a usage window; that it is being deleted is what scaling decides.
    wait_until(
        lambda: all(
            pod["metadata"].get("deletionTimestamp")
            for pod in service_pods(kubectl, namespace, "scaled")
        ),
        what="the pods to be deleted",
    )


def test_deleting_the_service_removes_everything_and_recreating_works(
    kubectl: Kubectl, namespace: str, running_operator: OperatorProcess
) -> None:
    service = manifest(aiservice("gone", port=8000))
    kubectl.apply(service, namespace)
    wait_running(kubectl, namespace, "gone", 1)
    owned = children(kubectl, namespace, "gone")
    assert owned["deployments"] == ["gone"]
    assert owned["services"] == ["gone"]
    assert len(owned["pods"]) == 1
    first_uid = kubectl.json("get", "ais", "-n", namespace, "gone")["metadata"]["uid"]

    kubectl("delete", "ais", "gone", "-n", namespace)
    empty: dict[str, list[str]] = {"deployments": [], "services": [], "replicasets": [], "pods": []}
    wait_until(
        lambda: children(kubectl, namespace, "gone") == empty,
        # Pods go once the meter has billed their last second: up to a usage window.
        timeout=150,
        what="the garbage collector to remove the service's children",
    )

    kubectl.apply(service, namespace)
    wait_running(kubectl, namespace, "gone", 1)
    uid = kubectl.json("get", "ais", "-n", namespace, "gone")["metadata"]["uid"]
    assert uid != first_uid
    for kind in ("deployment", "service"):
        [owner] = kubectl.json("get", kind, "-n", namespace, "gone")["metadata"]["ownerReferences"]
        assert owner["uid"] == uid


# --- bad input --------------------------------------------------------------------------------

LONG = "x" * 64


def with_spec(**changes: Any) -> dict[str, Any]:
    service = aiservice("bad")
    service["spec"].update(changes)
    return service


REFUSED_BY_THE_API_SERVER = [
    pytest.param(
        with_spec(gpusPerReplica=-1),
        "spec.gpusPerReplica",
        "greater than or equal to 1",
        id="negative-gpus",
    ),
    pytest.param(
        with_spec(gpusPerReplica=1000),
        "spec.gpusPerReplica",
        "less than or equal to 16",
        id="absurd-gpus",
    ),
    pytest.param(
        with_spec(minReplicas=-1),
        "spec.minReplicas",
        "greater than or equal to 0",
        id="negative-min-replicas",
    ),
    pytest.param(
        with_spec(maxReplicas=100_000),
        "spec.maxReplicas",
        "less than or equal to 1000",
        id="absurd-max-replicas",
    ),
    pytest.param(
        with_spec(replicas=-2),
        "spec.replicas",
        "greater than or equal to 0",
        id="negative-replicas",
    ),
    pytest.param(
        with_spec(minReplicas=3, maxReplicas=2),
        "spec.minReplicas",
        "minReplicas must not exceed maxReplicas",
        id="min-above-max",
    ),
    pytest.param(
        with_spec(container={"image": "Not An Image!"}),
        "spec.container.image",
        "should match",
        id="malformed-image",
    ),
    pytest.param(
        with_spec(container={"image": "Registry/LLM:1"}),
        "spec.container.image",
        "should match",
        id="image-with-uppercase-path",
    ),
    pytest.param(
        {**aiservice("bad"), "metadata": {"name": "a" + LONG}},
        "metadata.name",
        "Too long: may not be more than 63 bytes",
        id="name-over-63",
    ),
    pytest.param(
        with_spec(pool=LONG),
        "spec.pool",
        "Too long: may not be more than 63 bytes",
        id="pool-name-over-63",
    ),
    pytest.param(
        gpupool("p" + LONG, {"gpuyard.io/pool": "l4"}),
        "metadata.name",
        "Too long: may not be more than 63 bytes",
        id="pool-object-name-over-63",
    ),
    pytest.param(
        gpupool("t-bad-pool", {"gpuyard.io/pool": LONG}),
        "spec.nodeSelector",
        "Too long: may not be more than 63 bytes",
        id="node-selector-value-over-63",
    ),
    pytest.param(
        with_spec(
            container={"image": IMAGE, "env": [{"name": "NVIDIA_VISIBLE_DEVICES", "value": "all"}]}
        ),
        "spec.container.env[0].name",
        "the NVIDIA container toolkit reads them",
        id="env-read-by-the-gpu-runtime",
    ),
    pytest.param(
        with_spec(
            container={"image": IMAGE, "env": [{"name": "HF_HOME"}, {"name": "CUDA_VERSION"}]}
        ),
        "spec.container.env[1].name",
        "env names starting with NVIDIA_ and CUDA_VERSION are reserved",
        id="env-legacy-cuda-image",
    ),
    pytest.param(with_spec(gpuCount=2), "unknown field", "spec.gpuCount", id="unknown-field"),
    pytest.param(
        with_spec(container={"image": IMAGE, "securityContext": {"privileged": True}}),
        "unknown field",
        "spec.container.securityContext.privileged",
        id="privileged-container",
    ),
    pytest.param(
        with_spec(
            container={"image": IMAGE, "securityContext": {"capabilities": {"add": ["SYS_ADMIN"]}}}
        ),
        "unknown field",
        "spec.container.securityContext.capabilities",
        id="added-capabilities",
    ),
    pytest.param(
        with_spec(
            container={"image": IMAGE, "securityContext": {"allowPrivilegeEscalation": True}}
        ),
        "unknown field",
        "spec.container.securityContext.allowPrivilegeEscalation",
        id="privilege-escalation",
    ),
    pytest.param(
        with_spec(hostNetwork=True), "unknown field", "spec.hostNetwork", id="host-network"
    ),
    pytest.param(
        # A client that does not validate strictly gets the field pruned instead, and the
        # volume, left without a kind, is refused by its CEL rule (test_pod_surface.py).
        with_spec(volumes=[{"name": "root", "hostPath": {"path": "/"}}]),
        "unknown field",
        "spec.volumes[0].hostPath",
        id="host-path-volume",
    ),
    pytest.param(
        with_spec(volumes=[{"name": "nfs", "nfs": {"server": "10.0.0.1", "path": "/"}}]),
        "unknown field",
        "spec.volumes[0].nfs",
        id="volume-of-another-kind",
    ),
    pytest.param(
        with_spec(
            container={
                "image": IMAGE,
                "env": [
                    {
                        "name": "HF_TOKEN",
                        "valueFrom": {
                            "secretKeyRef": {"name": "hf", "key": "token", "namespace": "other"}
                        },
                    }
                ],
            }
        ),
        "unknown field",
        "spec.container.env[0].valueFrom.secretKeyRef.namespace",
        id="secret-of-another-namespace",
    ),
    pytest.param(
        with_spec(
            container={"image": IMAGE, "envFrom": [{"prefix": "NV", "configMapRef": {"name": "c"}}]}
        ),
        "spec.container.envFrom[0].prefix",
        "envFrom prefix must not let a key form a name starting with NVIDIA_",
        id="env-from-reaching-the-gpu-runtime",
    ),
    pytest.param(
        with_spec(container={"image": IMAGE, "volumeMounts": [{"name": "x", "mountPath": "/x"}]}),
        "spec.container.volumeMounts",
        "every container.volumeMounts entry must name a volume of spec.volumes",
        id="mount-of-no-volume",
    ),
    pytest.param(
        with_spec(volumes=[{"name": "shm", "emptyDir": {"medium": "Memory"}}]),
        "spec.volumes",
        "an emptyDir of medium Memory needs container.resources.memory",
        id="unbounded-memory-volume",
    ),
    pytest.param(
        with_spec(podAnnotations={"controller.kubernetes.io/pod-deletion-cost": "-1000"}),
        "spec.podAnnotations",
        "podAnnotations keys may not lie in the gpuyard.io, kubernetes.io, k8s.io domains",
        id="reserved-pod-annotation",
    ),
    pytest.param(
        with_spec(disruptionBudget={"maxUnavailable": 0}),
        "spec.disruptionBudget.maxUnavailable",
        "should be greater than or equal to 1",
        id="disruption-budget-blocking-drains",
    ),
]


@pytest.mark.parametrize(("obj", "where", "why"), REFUSED_BY_THE_API_SERVER)
def test_bad_input_is_refused_by_the_api_server(
    kubectl: Kubectl, namespace: str, obj: dict[str, Any], where: str, why: str
) -> None:
    result = kubectl.run("apply", "-n", namespace, "-f", "-", stdin=json.dumps(obj), check=False)

    assert result.returncode != 0, result.stdout
    assert where in result.stderr, result.stderr
    assert why in result.stderr, result.stderr
    name = obj["metadata"]["name"]
    kind = "ais" if obj["kind"] == "AIService" else "gpool"
    assert get(kubectl, kind, "-n", namespace, name) is None
    assert kubectl.json("get", "deployments,services", "-n", namespace)["items"] == []


@dataclass(frozen=True)
class Refusal:
    """A spec only the operator can judge: how to provoke the refusal and how to fix it."""

    reason: str
    #: Words the message must hold for a person to act on it.
    hint: str
    #: Makes the pools the case needs; returns the service to create.
    arrange: Callable[[Kubectl, str, Pools], dict[str, Any]]
    #: Fixes what was wrong, with kubectl, as a person would.
    fix: Callable[[Kubectl, str, dict[str, Any]], None]


def _missing_pool(kubectl: Kubectl, namespace: str, pools: Pools) -> dict[str, Any]:
    return aiservice("refused", pool=pools.new_name())


def _create_missing_pool(kubectl: Kubectl, namespace: str, service: dict[str, Any]) -> None:
    kubectl.apply(manifest(gpupool(service["spec"]["pool"], {"gpuyard.io/pool": "l4"})))


def _closed_pool(kubectl: Kubectl, namespace: str, pools: Pools) -> dict[str, Any]:
    pool = pools.create(
        {"gpuyard.io/pool": "l4"},
        namespaceSelector={"matchLabels": {"gpuyard.io/team": namespace}},
    )
    return aiservice("refused", pool=pool)


def _admit_namespace(kubectl: Kubectl, namespace: str, service: dict[str, Any]) -> None:
    kubectl("label", "namespace", namespace, f"gpuyard.io/team={namespace}")


def _too_many_gpus(kubectl: Kubectl, namespace: str, pools: Pools) -> dict[str, Any]:
    return aiservice("refused", pool="l4", gpus=8)


def _fewer_gpus(kubectl: Kubectl, namespace: str, service: dict[str, Any]) -> None:
    patch = json.dumps({"spec": {"gpusPerReplica": 2}})
    kubectl("patch", "ais", "refused", "-n", namespace, "--type=merge", "-p", patch)


def _small_quota(kubectl: Kubectl, namespace: str, pools: Pools) -> dict[str, Any]:
    pool = pools.create({"gpuyard.io/pool": "l4"}, maxGpusPerNamespace=1)
    return aiservice("refused", pool=pool, gpus=2, min_replicas=1)


def _raise_quota(kubectl: Kubectl, namespace: str, service: dict[str, Any]) -> None:
    patch = json.dumps({"spec": {"maxGpusPerNamespace": 2}})
    kubectl("patch", "gpool", service["spec"]["pool"], "--type=merge", "-p", patch)


def _priority_class(kubectl: Kubectl, namespace: str, pools: Pools) -> dict[str, Any]:
    service = aiservice("refused", pool="l4")
    service["spec"]["priorityClassName"] = "system-cluster-critical"
    return service


def _drop_priority_class(kubectl: Kubectl, namespace: str, service: dict[str, Any]) -> None:
    patch = json.dumps([{"op": "remove", "path": "/spec/priorityClassName"}])
    kubectl("patch", "ais", "refused", "-n", namespace, "--type=json", "-p", patch)


REFUSED_BY_THE_OPERATOR = [
    pytest.param(
        Refusal("PoolNotFound", "does not exist", _missing_pool, _create_missing_pool),
        id="pool-does-not-exist",
    ),
    pytest.param(
        Refusal("NamespaceNotAllowed", "namespaceSelector", _closed_pool, _admit_namespace),
        id="namespace-not-admitted",
    ),
    pytest.param(
        Refusal("GpusPerReplicaExceedNode", "has 4", _too_many_gpus, _fewer_gpus),
        id="gpus-exceed-largest-node",
    ),
    pytest.param(
        Refusal("QuotaExceeded", "may hold 1", _small_quota, _raise_quota),
        id="namespace-quota",
    ),
    pytest.param(
        Refusal(
            "PriorityClassNotAllowed",
            'does not offer PriorityClass "system-cluster-critical"',
            _priority_class,
            _drop_priority_class,
        ),
        id="priority-class-not-offered",
    ),
]


@pytest.mark.parametrize("case", REFUSED_BY_THE_OPERATOR)
def test_bad_input_is_not_accepted_and_creates_nothing_until_fixed(
    kubectl: Kubectl,
    namespace: str,
    running_operator: OperatorProcess,
    gpu_pools: Pools,
    case: Refusal,
) -> None:
    service = case.arrange(kubectl, namespace, gpu_pools)
    kubectl.apply(manifest(service), namespace)

    refused = wait_condition(kubectl, namespace, "refused", "Accepted", "False", reason=case.reason)
    accepted = condition(refused, "Accepted")
    assert case.hint in accepted["message"], accepted["message"]
    ready = condition(refused, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", case.reason)
    assert kubectl.json("get", "deployments,services,pods", "-n", namespace)["items"] == []

    case.fix(kubectl, namespace, service)
    wait_condition(kubectl, namespace, "refused", "Accepted", "True", reason="Accepted")
    [pod] = wait_running(kubectl, namespace, "refused", 1)
    gpus = kubectl.json("get", "ais", "-n", namespace, "refused")["spec"]["gpusPerReplica"]
    assert pod["spec"]["containers"][0]["resources"]["limits"][GPU] == str(gpus)


def test_the_namespace_quota_holds_when_the_service_is_scaled(
    kubectl: Kubectl, namespace: str, gpu_pools: Pools
) -> None:
    quota = 2
    pool = gpu_pools.create({"gpuyard.io/pool": "l4"}, maxGpusPerNamespace=quota)
    kubectl.apply(manifest(aiservice("greedy", pool=pool, replicas=1)), namespace)
    wait_running(kubectl, namespace, "greedy", 1)

    kubectl("scale", "-n", namespace, "ais/greedy", f"--replicas={quota + 2}")

    def reconciled() -> dict[str, Any] | None:
        service = kubectl.json("get", "ais", "-n", namespace, "greedy")
        ready = condition(service, "Ready") or {}
        return (
            service
            if ready.get("observedGeneration") == service["metadata"]["generation"]
            else None
        )

    service = wait_until(reconciled, what="the scaled service to be reconciled")
    deployment = kubectl.json("get", "deployment", "-n", namespace, "greedy")
    assert deployment["spec"]["replicas"] <= quota, service["status"]  # 1 GPU per replica
    limited = condition(service, "QuotaLimited")
    assert limited is not None, service["status"]
    assert (limited["status"], limited["reason"]) == ("True", "QuotaCapsReplicas")


def test_a_bad_service_does_not_stop_the_others(
    kubectl: Kubectl, namespace: str, running_operator: OperatorProcess
) -> None:
    kubectl.apply(
        manifest(
            aiservice("no-pool", pool=f"t-missing-{secrets.token_hex(3)}"),
            aiservice("too-big", pool="l4", gpus=16),
            aiservice("good", pool="l4"),
        ),
        namespace,
    )

    wait_running(kubectl, namespace, "good", 1)
    wait_condition(kubectl, namespace, "no-pool", "Accepted", "False", reason="PoolNotFound")
    wait_condition(
        kubectl, namespace, "too-big", "Accepted", "False", reason="GpusPerReplicaExceedNode"
    )
    deployments = kubectl.json("get", "deployments", "-n", namespace)["items"]
    assert [d["metadata"]["name"] for d in deployments] == ["good"]


# --- the operator's own life ------------------------------------------------------------------


def wait_operator_caught_up(kubectl: Kubectl, operator: OperatorProcess) -> None:
    """After a start: every AIService and GPUPool of the cluster has been reconciled once."""
    services = len(kubectl.json("get", "ais", "-A")["items"])
    pools = len(kubectl.json("get", "gpool")["items"])
    wait_until(
        lambda: (
            reconciles(operator, "service") >= services and reconciles(operator, "pool") >= pools
        ),
        what=f"the operator to reconcile {services} services and {pools} pools",
    )


def test_restarting_the_operator_writes_nothing(
    kubectl: Kubectl, namespace: str, quiet_operator: OperatorProcess
) -> None:
    kubectl.apply(
        manifest(aiservice("steady", port=8000), aiservice("idle", replicas=0)), namespace
    )
    wait_running(kubectl, namespace, "steady", 1)
    wait_condition(kubectl, namespace, "idle", "Ready", "True", reason="ScaledToZero")
    # The meter holds each new pod with its finalizer: a write the pod asks for, not the
    # restart, so it is let happen first.
    wait_until(
        lambda: all(
            "gpuyard.io/metering" in (pod["metadata"].get("finalizers") or [])
            for pod in service_pods(kubectl, namespace, "steady")
        ),
        what="the meter's finalizer on the running pod",
    )
    flush_audit(kubectl, quiet_operator, namespace)
    before = len(operator_writes(quiet_operator, namespace))
    assert before > 0  # the namespace's objects were written by the operator

    quiet_operator.restart()
    wait_operator_caught_up(kubectl, quiet_operator)
    flush_audit(kubectl, quiet_operator, namespace)

    writes = operator_writes(quiet_operator, namespace)[before:]
    assert writes == [], json.dumps(writes, indent=1)[:2000]
    assert condition(get(kubectl, "ais", "-n", namespace, "steady"), "Ready")["status"] == "True"


def test_changes_made_while_the_operator_is_down_are_reconciled_after(
    kubectl: Kubectl, namespace: str, running_operator: OperatorProcess
) -> None:
    kubectl.apply(manifest(aiservice("existing")), namespace)
    wait_running(kubectl, namespace, "existing", 1)

    running_operator.stop()
    try:
        kubectl("scale", "-n", namespace, "ais/existing", "--replicas=2")
        kubectl.apply(manifest(aiservice("created-meanwhile")), namespace)
        # Nobody reconciles: the new service has no Deployment yet.
        assert get(kubectl, "deployment", "-n", namespace, "created-meanwhile") is None
    finally:
        running_operator.start()

    wait_running(kubectl, namespace, "existing", 2)
    wait_running(kubectl, namespace, "created-meanwhile", 1)
    deployment = kubectl.json("get", "deployment", "-n", namespace, "existing")
    assert deployment["spec"]["replicas"] == 2


# --- pools follow their nodes -----------------------------------------------------------------


def test_a_pool_follows_its_nodes_when_one_is_cordoned(
    kubectl: Kubectl, running_operator: OperatorProcess, gpu_pools: Pools
) -> None:
    pool = gpu_pools.create({"kubernetes.io/hostname": L4_NODE})
    status = pool_status(kubectl, pool)
    assert (status["nodes"], status["readyNodes"], status["capacity"]) == (1, 1, L4_NODE_GPUS)
    l4_before = pool_status(kubectl, "l4")

    def ready_condition(name: str, status: str) -> dict[str, Any] | None:
        current = pool_status(kubectl, name)
        found = condition({"status": current}, "Ready")
        return current if found and found["status"] == status else None

    kubectl("cordon", L4_NODE)
    try:
        cordoned = wait_until(lambda: ready_condition(pool, "False"), what="the pool to go down")
        assert (cordoned["nodes"], cordoned["readyNodes"], cordoned["capacity"]) == (1, 0, 0)
        assert cordoned["available"] == 0
        assert condition({"status": cordoned}, "Ready")["reason"] == "NoReadyNodes"
        l4 = wait_until(
            lambda: (
                (s := pool_status(kubectl, "l4"))["readyNodes"] == l4_before["readyNodes"] - 1 and s
            ),
            what="the l4 pool to lose a node",
        )
        assert l4["capacity"] == l4_before["capacity"] - L4_NODE_GPUS
        assert l4["nodes"] == l4_before["nodes"]
    finally:
        kubectl("uncordon", L4_NODE)

    restored = wait_until(lambda: ready_condition(pool, "True"), what="the pool to come back")
    assert (restored["readyNodes"], restored["capacity"]) == (1, L4_NODE_GPUS)
    wait_until(
        lambda: pool_status(kubectl, "l4")["readyNodes"] == l4_before["readyNodes"],
        what="the l4 pool to get its node back",
    )
