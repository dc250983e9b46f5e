"""Uninstalling leaves nothing behind: `gpuyard release-finalizers` on the real local cluster,
alone and as the chart's pre-delete hook during a real `helm uninstall`.

The local cluster's pods are simulated by kwok: it marks a pod Running, and its containers
never execute. For the hook, the test therefore plays the kubelet for exactly that pod: it
runs the pod's command here, with a token of the hook's own ServiceAccount (so the hook's
RBAC is what is tested), and then reports the container's exit through the pod's status
subresource, as a kubelet would. kwok's stages (hack/localcluster/kwok-stages.yaml) act only
on Pending pods and on pods being deleted, so they leave that status alone.

gpuyard's own operator (the session's `operator`) watches the same cluster and would put the
finalizer back on pods it meters, so each test stops it first and starts it again after.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from chart_support import (
    CHART,
    DIST_INSTALL,
    DIST_NAMESPACE,
    REPO_ROOT,
    Helm,
    service_account_kubeconfig,
)
from conftest import OperatorProcess
from localcluster.cluster import ClusterState, binaries_dir
from support import Kubectl, wait_until

METERING = "gpuyard.io/metering"
OTHER = "example.com/keep"
GPUYARD = Path(sys.executable).parent / "gpuyard"
RESTRICTED = "pod-security.kubernetes.io/enforce=restricted"


def bare_pod(name: str, finalizers: list[str]) -> dict[str, Any]:
    """A pod on the CPU node (kwok runs it), hardened enough for a "restricted" namespace."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "finalizers": finalizers},
        "spec": {
            "nodeName": "cpu-0",
            "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [
                {
                    "name": "main",
                    "image": "example.com/app:1",
                    "securityContext": {
                        "allowPrivilegeEscalation": False,
                        "runAsUser": 1000,
                        "capabilities": {"drop": ["ALL"]},
                    },
                }
            ],
        },
    }


def pool_with_finalizers(name: str, finalizers: list[str]) -> dict[str, Any]:
    return {
        "apiVersion": "gpuyard.io/v1alpha1",
        "kind": "GPUPool",
        "metadata": {"name": name, "finalizers": finalizers},
        "spec": {
            "gpuType": "a100-80gb",
            "nodeSelector": {"gpuyard.io/pool": f"{name}-none"},
            "price": {"perGpuHour": "1.00", "currency": "USD"},
        },
    }


def finalizers_of(kubectl: Kubectl, *target: str) -> list[str] | None:
    """The object's finalizers, or None once it is gone."""
    result = kubectl.run("get", *target, "-o", "json", check=False)
    if result.returncode != 0:
        assert "NotFound" in result.stderr, result.stderr
        return None
    found: list[str] = json.loads(result.stdout)["metadata"].get("finalizers") or []
    return found


def holders(kubectl: Kubectl) -> list[str]:
    """Every pod and GPUPool in the cluster that carries the metering finalizer."""
    held = []
    for kind in ("pods", "gpupools"):
        for obj in kubectl.json("get", kind, "--all-namespaces")["items"]:
            if METERING in (obj["metadata"].get("finalizers") or []):
                held.append(
                    f"{kind} {obj['metadata'].get('namespace', '')}/{obj['metadata']['name']}"
                )
    return held


def gone(kubectl: Kubectl, *target: str) -> bool:
    return finalizers_of(kubectl, *target) is None


@pytest.fixture
def no_operator(operator: OperatorProcess) -> Iterator[None]:
    """No gpuyard operator runs during the test (it would put finalizers back); the
    session's is started again afterwards if it was running."""
    was_running = operator.process is not None and operator.process.poll() is None
    operator.stop()
    yield
    if was_running:
        operator.start()


@pytest.fixture
def cleanup(kubectl: Kubectl) -> Iterator[list[tuple[str, ...]]]:
    """Objects a test gave a finalizer of its own: it is removed afterwards, so that the
    namespace (and the pool) can go."""
    targets: list[tuple[str, ...]] = []
    yield targets
    for target in targets:
        kubectl.run(
            "patch", *target, "--type=merge", "-p", '{"metadata":{"finalizers":null}}', check=False
        )
        if target[0] == "gpupool":
            kubectl.run("delete", *target, "--ignore-not-found", "--wait=false", check=False)


def release_finalizers(
    cluster: ClusterState, *args: str, kubeconfig: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(GPUYARD), "release-finalizers", *args],
        env={**os.environ, "KUBECONFIG": kubeconfig or cluster.kubeconfig},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.mark.usefixtures("no_operator")
def test_release_finalizers_removes_only_gpuyards_finalizer(
    cluster: ClusterState,
    kubectl: Kubectl,
    namespace: str,
    cleanup: list[tuple[str, ...]],
) -> None:
    pool = f"release-{secrets.token_hex(3)}"
    kubectl.apply(
        yaml.safe_dump_all(
            [
                bare_pod("shared", [METERING, OTHER]),
                bare_pod("ours", [METERING]),
                bare_pod("ended", [METERING]),
                bare_pod("theirs", [OTHER]),
            ]
        ),
        namespace,
    )
    kubectl.apply(yaml.safe_dump(pool_with_finalizers(pool, [OTHER, METERING])))
    cleanup += [("pod", "shared", "-n", namespace), ("pod", "theirs", "-n", namespace)]
    cleanup.append(("gpupool", pool))
    # Deleted while held: it stays Terminating until the finalizer goes.
    kubectl("delete", "pod", "ended", "-n", namespace, "--wait=false")

    # Two per page: the three holders cannot come in one page, so releasing all of them
    # shows that the listing follows its continue tokens.
    result = release_finalizers(cluster, "--page-size", "2")

    assert result.returncode == 0, result.stdout + result.stderr
    assert "stop: no --stop-deployment given: assuming no operator is running" in result.stdout
    assert f"check: no pod and no GPUPool carries {METERING} any more" in result.stdout
    assert finalizers_of(kubectl, "pod", "shared", "-n", namespace) == [OTHER]
    assert finalizers_of(kubectl, "pod", "ours", "-n", namespace) == []
    assert finalizers_of(kubectl, "pod", "theirs", "-n", namespace) == [OTHER]
    assert finalizers_of(kubectl, "gpupool", pool) == [OTHER]
    wait_until(
        lambda: gone(kubectl, "pod", "ended", "-n", namespace),
        timeout=30,
        what="the deleted pod to go once released",
    )
    assert holders(kubectl) == []
    # Nothing is left to do: a second run releases nothing and succeeds.
    again = release_finalizers(cluster)
    assert again.returncode == 0, again.stderr
    assert f"released: {METERING} from 0 pods" in again.stdout


@pytest.mark.usefixtures("no_operator")
def test_release_finalizers_lets_a_running_operator_bill_then_stops_it(
    cluster: ClusterState, kubectl: Kubectl, namespace: str
) -> None:
    # Nothing else in the cluster waits for its bill, so the wait below is about our pod.
    assert release_finalizers(cluster).returncode == 0
    # An operator stand-in: a Deployment with a ready pod (kwok), which this test lets
    # bill by removing the finalizer, as the meter does once a pod's last second is billed.
    kubectl(
        "create", "deployment", "operator", "-n", namespace, "--image=example.com/operator:1"
    )  # fmt: skip
    wait_until(
        lambda: kubectl.json("get", "deployment", "operator", "-n", namespace)["status"].get(
            "readyReplicas"
        ),
        timeout=60,
        what="the stand-in operator to be ready",
    )
    kubectl.apply(yaml.safe_dump(bare_pod("ended", [METERING])), namespace)
    kubectl.apply(yaml.safe_dump(bare_pod("running", [METERING])), namespace)
    kubectl("delete", "pod", "ended", "-n", namespace, "--wait=false")

    command = subprocess.Popen(
        [
            str(GPUYARD), "release-finalizers", "--stop-deployment", f"{namespace}/operator",
            "--billing-timeout", "60",
        ],
        env={**os.environ, "KUBECONFIG": cluster.kubeconfig, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert command.stdout is not None
        first = command.stdout.readline()
        assert first == "billing: waiting up to 60s for the operator to bill 1 object that ended\n"
        # The operator bills the pod that ended and lets it go.
        kubectl(
            "patch", "pod", "ended", "-n", namespace, "--type=json",
            "-p", json.dumps([{"op": "remove", "path": "/metadata/finalizers"}]),
        )  # fmt: skip
        out, err = command.communicate(timeout=120)
    finally:
        if command.poll() is None:
            command.kill()
            command.wait()

    assert command.returncode == 0, first + out + err
    lines = out.splitlines()
    # Billed well before the deadline: the wait ends when nothing is left to bill.
    assert lines[0].startswith("billing: the operator billed and released 1 of 1 object"), out
    seconds = int(lines[0].rsplit(" in ", 1)[1].removesuffix("s"))
    assert seconds < 30, out
    assert lines[1].startswith(
        f"stop: deployment {namespace}/operator scaled from 1 to 0; no pod of it is left"
    ), out
    assert kubectl.json("get", "deployment", "operator", "-n", namespace)["spec"]["replicas"] == 0
    assert lines[2].startswith(f"released: {METERING} from 1 pod ("), out
    assert finalizers_of(kubectl, "pod", "running", "-n", namespace) == []


@pytest.mark.usefixtures("no_operator")
def test_release_finalizers_fails_clearly_when_a_release_is_refused(
    cluster: ClusterState, kubectl: Kubectl, namespace: str, tmp_path: Path
) -> None:
    # An account that may see pods but not patch them: the release is refused.
    account = f"{namespace}-read-pods"
    rbac = [
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": "reader", "namespace": namespace},
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": account},
            "rules": [
                {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]},
                {"apiGroups": ["gpuyard.io"], "resources": ["gpupools"], "verbs": ["get", "list"]},
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": account},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": account,
            },
            "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": namespace}],
        },
    ]
    manifest = yaml.safe_dump_all(rbac)
    kubectl.apply(manifest)
    try:
        assert release_finalizers(cluster).returncode == 0  # only our pod is left to release
        kubectl.apply(yaml.safe_dump(bare_pod("held", [METERING])), namespace)
        token = kubectl("create", "token", "reader", "-n", namespace).strip()
        config = service_account_kubeconfig(cluster.kubeconfig, token, tmp_path / "kubeconfig")

        result = release_finalizers(cluster, kubeconfig=str(config))

        assert result.returncode == 1, result.stdout + result.stderr
        assert f"released: {METERING} from 0 pods (" in result.stdout
        assert f"1 could not be released: {namespace}/held (403 Forbidden: " in result.stdout
        assert result.stderr.strip() == (
            f"gpuyard release-finalizers: error: {METERING} is still on 1 object "
            f"(pod {namespace}/held): 1 release failed (see above)"
        )
        assert finalizers_of(kubectl, "pod", "held", "-n", namespace) == [METERING]
    finally:
        kubectl.run("delete", "-f", "-", "--ignore-not-found", stdin=manifest, check=False)
        kubectl.run(
            "patch", "pod", "held", "-n", namespace, "--type=merge",
            "-p", '{"metadata":{"finalizers":null}}', check=False,
        )  # fmt: skip


# --- helm uninstall ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def helm(cluster: ClusterState, tmp_path_factory: pytest.TempPathFactory) -> Helm:
    return Helm(
        binaries_dir(build=False) / "helm", tmp_path_factory.mktemp("helm"), cluster.kubeconfig
    )


def hook_pod(kubectl: Kubectl, namespace: str, job: str) -> dict[str, Any] | None:
    """The hook Job's pod once kwok has it Running (its containers "started")."""
    pods = kubectl.json("get", "pods", "-n", namespace, "-l", f"batch.kubernetes.io/job-name={job}")
    running = [p for p in pods["items"] if p["status"].get("phase") == "Running"]
    return running[0] if running else None


def play_kubelet(
    kubectl: Kubectl, cluster: ClusterState, pod: dict[str, Any], workdir: Path
) -> subprocess.CompletedProcess[str]:
    """Run the pod's only container here, as its ServiceAccount, and report its end."""
    namespace = pod["metadata"]["namespace"]
    [container] = pod["spec"]["containers"]
    assert container["command"][0] == "gpuyard", container["command"]
    account = pod["spec"]["serviceAccountName"]
    token = kubectl("create", "token", account, "-n", namespace).strip()
    config = service_account_kubeconfig(cluster.kubeconfig, token, workdir / "hook-kubeconfig")
    started = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    result = subprocess.run(
        [str(GPUYARD), *container["command"][1:], *container.get("args", [])],
        env={**os.environ, "KUBECONFIG": str(config)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    finished = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    terminated = {
        "exitCode": result.returncode,
        "reason": "Completed" if result.returncode == 0 else "Error",
        "startedAt": started,
        "finishedAt": finished,
    }
    status = {
        "status": {
            "phase": "Succeeded" if result.returncode == 0 else "Failed",
            "conditions": [
                {"type": "Ready", "status": "False", "reason": "PodCompleted"},
                {"type": "ContainersReady", "status": "False", "reason": "PodCompleted"},
            ],
            "containerStatuses": [
                {
                    "name": container["name"],
                    "ready": False,
                    "started": False,
                    "state": {"running": None, "terminated": terminated},
                }
            ],
        }
    }
    kubectl(
        "patch", "pod", pod["metadata"]["name"], "-n", namespace, "--subresource=status",
        "--type=strategic", "-p", json.dumps(status),
    )  # fmt: skip
    return result


@pytest.mark.usefixtures("no_operator")
def test_helm_uninstall_leaves_no_pod_or_pool_held(
    helm: Helm,
    kubectl: Kubectl,
    cluster: ClusterState,
    namespace: str,
    cleanup: list[tuple[str, ...]],
) -> None:
    # The hook's pod must pass Pod Security "restricted", like the operator's.
    kubectl("label", "namespace", namespace, RESTRICTED)
    # Nothing else in the cluster waits for its bill, so the hook's wait is about ours.
    assert release_finalizers(cluster).returncode == 0
    release = f"un-{secrets.token_hex(3)}"
    fullname = f"{release}-gpuyard"
    job = f"{fullname}-release-finalizers"
    pool = f"uninstall-{secrets.token_hex(3)}"
    uninstall: subprocess.Popen[str] | None = None
    try:
        # Held before the install: the release's admission policies let no one but its
        # operator (and its hook) touch gpuyard's finalizer on a pod.
        kubectl.apply(
            yaml.safe_dump_all([bare_pod("running", [METERING]), bare_pod("ended", [METERING])]),
            namespace,
        )
        kubectl.apply(yaml.safe_dump(pool_with_finalizers(pool, [METERING])))
        cleanup.append(("gpupool", pool))
        install = helm.run(
            "install", release, str(CHART), "--namespace", namespace,
            # The session's CRDs stay as they are; the kwok "operator" never bills, so the
            # billing wait is kept short.
            "--set", "crds.install=false", "--set", "uninstall.billingTimeoutSeconds=3",
            "--wait", "--timeout", "120s",
        )  # fmt: skip
        assert "`helm uninstall` first runs a Job" in install.stdout
        # Both wait for their bill: a pod that ended, a pool being deleted.
        kubectl("delete", "pod", "ended", "-n", namespace, "--wait=false")
        kubectl("delete", "gpupool", pool, "--wait=false")

        uninstall = subprocess.Popen(
            [
                str(helm.binary), "uninstall", release, "--namespace", namespace,
                "--wait", "--timeout", "180s",
            ],
            env=helm.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip

        def job_pod() -> dict[str, Any] | None:
            assert uninstall is not None
            if uninstall.poll() is not None:
                raise AssertionError(f"helm uninstall ended early: {uninstall.communicate()}")
            return hook_pod(kubectl, namespace, job)

        pod = wait_until(job_pod, timeout=120, what="the pre-delete hook's pod to run")
        run = play_kubelet(kubectl, cluster, pod, helm.home)
        out, err = uninstall.communicate(timeout=180)

        assert run.returncode == 0, run.stdout + run.stderr
        assert uninstall.returncode == 0, out + err
    finally:
        if uninstall is not None and uninstall.poll() is None:
            uninstall.kill()
            uninstall.wait()
        helm.run("uninstall", release, "--namespace", namespace, "--no-hooks", check=False)

    # What the hook did, in order. The operator's pod was ready (kwok) but billed nothing.
    lines = run.stdout.splitlines()
    assert lines[0] == "billing: waiting up to 3s for the operator to bill 2 objects that ended"
    assert lines[1].endswith(
        "2 still unbilled at the deadline, released unbilled: "
        f"GPUPool {pool}, pod {namespace}/ended"
    ), run.stdout
    assert lines[2].startswith(
        f"stop: deployment {namespace}/{fullname} scaled from 2 to 0; no pod of it is left"
    ), run.stdout
    assert lines[-1] == f"check: no pod and no GPUPool carries {METERING} any more"

    assert holders(kubectl) == []
    # What was being deleted went; a deletion now completes.
    wait_until(
        lambda: gone(kubectl, "pod", "ended", "-n", namespace) and gone(kubectl, "gpupool", pool),
        timeout=30,
        what="the deleted pod and pool to go",
    )
    kubectl("delete", "pod", "running", "-n", namespace, "--wait=true", "--timeout=60s")
    # The hook's objects went with the succeeded Job.
    for kind, name, scope in (
        ("job", job, ["-n", namespace]),
        ("serviceaccount", job, ["-n", namespace]),
        ("role", job, ["-n", namespace]),
        ("rolebinding", job, ["-n", namespace]),
        ("clusterrole", job, []),
        ("clusterrolebinding", job, []),
        ("deployment", fullname, ["-n", namespace]),
    ):
        assert kubectl.run("get", kind, name, *scope, check=False).returncode != 0, (kind, name)


# --- plain manifests -------------------------------------------------------------------


DIST_POLICIES = (
    "gpuyard-pods",
    "gpuyard-workloads",
    "gpuyard-deployment-scale",
    "gpuyard-operator-children",
    "gpuyard-operator-finalizers",
)


def documented_plain_manifest_commands() -> list[list[str]]:
    """The commands docs/metering.md gives for uninstalling dist/install.yaml."""
    text = (REPO_ROOT / "docs" / "metering.md").read_text()
    section = text.split("### With plain manifests", 1)[1]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]
    return [shlex.split(line) for line in block.splitlines() if line.strip()]


@pytest.mark.usefixtures("no_operator")
def test_the_documented_plain_manifest_uninstall_keeps_the_crds_and_no_finalizer(
    cluster: ClusterState, kubectl: Kubectl, namespace: str, cleanup: list[tuple[str, ...]]
) -> None:
    if kubectl.run("get", "namespace", DIST_NAMESPACE, check=False).returncode == 0:
        pytest.skip(f"namespace {DIST_NAMESPACE} is in use on this cluster")
    commands = documented_plain_manifest_commands()
    assert [command[0] for command in commands] == ["kubectl", "gpuyard", *["kubectl"] * 4]
    pool = f"plain-{secrets.token_hex(3)}"
    try:
        # Held before the install: its admission policies let no one but its operator put
        # gpuyard's finalizer on a pod.
        assert release_finalizers(cluster).returncode == 0  # nothing else left to release
        kubectl.apply(yaml.safe_dump(bare_pod("held", [METERING])), namespace)
        kubectl.apply(yaml.safe_dump(pool_with_finalizers(pool, [METERING])))
        cleanup.append(("gpupool", pool))
        # Server-side, as the file's header says; forced, since the session applied the CRDs.
        kubectl("apply", "--server-side", "--force-conflicts", "-f", str(DIST_INSTALL))
        wait_until(
            lambda: kubectl.json("get", "deployment", "gpuyard", "-n", DIST_NAMESPACE)[
                "status"
            ].get("readyReplicas"),
            timeout=60,
            what="the operator of dist/install.yaml to be ready",
        )

        for command in commands:
            if command[0] == "gpuyard":
                assert command[1] == "release-finalizers", command
                result = release_finalizers(cluster, *command[2:])
                assert result.returncode == 0, result.stdout + result.stderr
                assert "stop: deployment gpuyard-system/gpuyard scaled from 2 to 0" in result.stdout
            else:
                kubectl(*command[1:], "--timeout=120s")
    finally:
        kubectl.run("delete", "namespace", DIST_NAMESPACE, "--ignore-not-found", check=False)
        kubectl.run(
            "delete", "clusterrole,clusterrolebinding", "gpuyard", "--ignore-not-found",
            check=False,
        )  # fmt: skip
        for kind in ("validatingadmissionpolicybinding", "validatingadmissionpolicy"):
            kubectl.run("delete", kind, *DIST_POLICIES, "--ignore-not-found", check=False)

    assert holders(kubectl) == []
    kubectl("delete", "pod", "held", "-n", namespace, "--wait=true", "--timeout=60s")
    # Nothing of the file is left behind but the CRDs: no admission policy, no binding.
    for kind in ("validatingadmissionpolicybinding", "validatingadmissionpolicy"):
        left = kubectl("get", kind, *DIST_POLICIES, "--ignore-not-found", "-o", "name")
        assert left.strip() == "", left
    # The CRDs stay, and with them the users' pools.
    for crd in ("aiservices.gpuyard.io", "gpupools.gpuyard.io"):
        assert kubectl.run("get", "crd", crd, check=False).returncode == 0, crd
    assert finalizers_of(kubectl, "gpupool", pool) == []
    assert gone(kubectl, "namespace", DIST_NAMESPACE)
