"""`helm install` with the chart's defaults on the real local cluster: two operator pods,
exactly one leader, a PodDisruptionBudget, and `helm test` passes.

kwok marks the release's pods Running and never runs their containers, so this test plays
the kubelet for them: each operator pod's container runs here as a real `gpuyard run`, with
the environment the pod spec gives it (the downward API resolved as a kubelet would) and a
token of the chart's own ServiceAccount, so the chart's Role for the Lease is what is
tested. What a pod network would give each pod, its own ports, is given by choosing free
loopback ports per process. For `helm test`, the test pod's script runs here too; the
cluster DNS and kube-proxy it relies on are played by resolving the metrics Service
through its EndpointSlice (which kube-controller-manager keeps) to a pod, and that pod to
the loopback port its process listens on.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from chart_support import CHART, Helm, service_account_kubeconfig
from conftest import OperatorProcess
from localcluster.cluster import ClusterState, binaries_dir
from support import Kubectl, wait_until

OPERATOR_LABELS = "app.kubernetes.io/name=gpuyard,app.kubernetes.io/component=operator"


class PodProcess(OperatorProcess):
    """One operator pod's container, run here with the environment its spec gives it."""

    def __init__(self, pod: dict[str, Any], kubeconfig: str, cluster: ClusterState, log_dir: Path):
        super().__init__(
            cluster, log_dir, extra_env={}, kubeconfig=kubeconfig, name=pod["metadata"]["name"]
        )
        self.pod = pod

    def environment(self) -> dict[str, str]:
        [container] = self.pod["spec"]["containers"]
        # Nothing of the test session's own operator settings leaks in.
        env = {key: value for key, value in os.environ.items() if not key.startswith("GPUYARD_")}
        for item in container.get("env", []):
            env[item["name"]] = self._value(item)
        env |= {
            "GPUYARD_KUBECONFIG": self.kubeconfig,
            "GPUYARD_METRICS_ADDRESS": "127.0.0.1",
            "GPUYARD_METRICS_PORT": str(self.metrics_port),
            "GPUYARD_HEALTH_ADDRESS": "127.0.0.1",
            "GPUYARD_HEALTH_PORT": str(self.health_port),
        }
        return env

    def _value(self, item: dict[str, Any]) -> str:
        if "value" in item:
            return str(item["value"])
        path = item["valueFrom"]["fieldRef"]["fieldPath"]
        field = {"metadata.name": "name", "metadata.namespace": "namespace"}[path]
        return str(self.pod["metadata"][field])

    def healthz(self) -> dict[str, Any]:
        url = f"http://127.0.0.1:{self.health_port}/healthz"
        with urllib.request.urlopen(url, timeout=5) as response:
            body: dict[str, Any] = json.loads(response.read())
            return body


@pytest.fixture
def helm(cluster: ClusterState, tmp_path: Path) -> Helm:
    return Helm(binaries_dir(build=False) / "helm", tmp_path / "helm", cluster.kubeconfig)


@pytest.fixture
def stopped_session_operator(operator: OperatorProcess) -> Iterator[None]:
    """The release's operator reconciles the whole cluster: the session's stands aside."""
    was_running = operator.process is not None and operator.process.poll() is None
    operator.stop()
    yield
    if was_running:
        operator.start()


def ready_pods(kubectl: Kubectl, namespace: str) -> list[dict[str, Any]] | None:
    pods = kubectl.json("get", "pods", "-n", namespace, "-l", OPERATOR_LABELS)["items"]
    ready = [
        pod
        for pod in pods
        if any(
            c["type"] == "Ready" and c["status"] == "True"
            for c in pod["status"].get("conditions", [])
        )
        and pod["status"].get("podIP")
    ]
    return ready if len(ready) == 2 else None


def service_endpoint_pod(kubectl: Kubectl, namespace: str, service: str) -> str | None:
    """The name of a ready pod behind ``service``, as kube-proxy would pick one."""
    slices = kubectl.json(
        "get", "endpointslices", "-n", namespace, "-l", f"kubernetes.io/service-name={service}"
    )["items"]
    for endpoint_slice in slices:
        for endpoint in endpoint_slice.get("endpoints") or []:
            if endpoint.get("conditions", {}).get("ready") and endpoint.get("targetRef"):
                return str(endpoint["targetRef"]["name"])
    return None


def run_test_pod(
    kubectl: Kubectl, pod: dict[str, Any], service_ports: dict[str, int]
) -> subprocess.CompletedProcess[str]:
    """Run the `helm test` pod's script here, with its Service addresses resolved, and
    report its end through the pod's status, as the kubelet would."""
    [container] = pod["spec"]["containers"]
    command = list(container["command"])
    script = command[-1]
    for address, port in service_ports.items():
        script = script.replace(address, f"127.0.0.1:{port}")
    assert script != command[-1], f"the test pod's script names none of {list(service_ports)}"
    assert command[0] == "python", command
    result = subprocess.run(
        [sys.executable, *command[1:-1], script],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    phase = "Succeeded" if result.returncode == 0 else "Failed"
    status = {
        "status": {
            "phase": phase,
            "containerStatuses": [
                {
                    "name": container["name"],
                    "ready": False,
                    "state": {
                        "terminated": {
                            "exitCode": result.returncode,
                            "reason": "Completed" if result.returncode == 0 else "Error",
                        }
                    },
                }
            ],
        }
    }
    kubectl(
        "patch", "pod", pod["metadata"]["name"], "-n", pod["metadata"]["namespace"],
        "--subresource=status", "--type=strategic", "-p", json.dumps(status),
    )  # fmt: skip
    return result


@pytest.mark.usefixtures("stopped_session_operator")
def test_helm_install_with_defaults_runs_two_replicas_under_one_leader(
    helm: Helm, kubectl: Kubectl, cluster: ClusterState, namespace: str, tmp_path: Path
) -> None:
    release = f"ha-{secrets.token_hex(3)}"
    fullname = f"{release}-gpuyard"
    processes: list[PodProcess] = []
    helm_test: subprocess.Popen[str] | None = None
    try:
        # Defaults, but for the CRDs, which the session has applied already.
        helm.run(
            "install", release, str(CHART), "--namespace", namespace,
            "--set", "crds.install=false", "--wait", "--timeout", "120s",
        )  # fmt: skip
        deployment = kubectl.json("get", "deployment", fullname, "-n", namespace)
        assert deployment["spec"]["replicas"] == 2
        assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
        budget = kubectl.json("get", "poddisruptionbudget", fullname, "-n", namespace)
        assert budget["spec"]["maxUnavailable"] == 1
        # The Lease is the Role's, in the release namespace, not the ClusterRole's.
        role = kubectl.json("get", "role", f"{fullname}-leader-election", "-n", namespace)
        assert {"coordination.k8s.io"} == {g for r in role["rules"] for g in r["apiGroups"]}
        clusterrole = kubectl.json("get", "clusterrole", fullname)
        assert all("leases" not in r.get("resources", []) for r in clusterrole["rules"])

        pods = wait_until(
            lambda: ready_pods(kubectl, namespace), timeout=120, what="two ready operator pods"
        )
        account = pods[0]["spec"]["serviceAccountName"]
        token = kubectl("create", "token", account, "-n", namespace).strip()
        config = service_account_kubeconfig(cluster.kubeconfig, token, tmp_path / "kubeconfig")
        for pod in pods:
            process = PodProcess(pod, str(config), cluster, tmp_path)
            process.start(lead=False)
            processes.append(process)

        def one_leader() -> PodProcess | None:
            leading = [p for p in processes if p.leads()]
            assert len(leading) <= 1, [p.name for p in leading]
            return leading[0] if leading else None

        leader = wait_until(one_leader, timeout=60, what="one replica to lead")
        [standby] = [p for p in processes if p is not leader]
        lease = kubectl.json("get", "lease", fullname, "-n", namespace)
        assert lease["spec"]["holderIdentity"].startswith(f"{leader.name}_")
        assert lease["spec"]["leaseDurationSeconds"] == 15
        holder = lease["spec"]["holderIdentity"]
        # Kopf refreshes the probe body at most every 10 s: poll until it has.
        wait_until(
            lambda: (
                leader.healthz().get("leadership") == {"leader": True, "identity": holder,
                                                       "holder": holder}
                and standby.healthz().get("leadership", {}).get("leader") is False
                and standby.healthz()["leadership"]["holder"] == holder
            ),
            timeout=30,
            what="leadership in both /healthz bodies",
        )  # fmt: skip
        assert "gpuyard_leader 0.0" in standby.metrics().splitlines()
        leader_log, standby_log = leader.log_path.read_text(), standby.log_path.read_text()
        assert f"leading: {holder} holds Lease {namespace}/{fullname}" in leader_log
        assert f"standing by: Lease {fullname} is held by {holder}" in standby_log

        # `helm test`, with its pod played here once kwok has it running.
        helm_test = subprocess.Popen(
            [str(helm.binary), "test", release, "--namespace", namespace, "--timeout", "120s"],
            env=helm.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        test_pod_name = f"{fullname}-test-metrics"

        def running_test_pod() -> dict[str, Any] | None:
            assert helm_test is not None
            if helm_test.poll() is not None:
                raise AssertionError(f"helm test ended early: {helm_test.communicate()}")
            found = kubectl.run("get", "pod", test_pod_name, "-n", namespace, "-o", "json",
                                check=False)  # fmt: skip
            if found.returncode != 0:
                return None
            pod: dict[str, Any] = json.loads(found.stdout)
            return pod if pod["status"].get("phase") == "Running" else None

        test_pod = wait_until(running_test_pod, timeout=60, what="the helm test pod to run")
        service = kubectl.json("get", "service", f"{fullname}-metrics", "-n", namespace)
        endpoint = wait_until(
            lambda: service_endpoint_pod(kubectl, namespace, service["metadata"]["name"]),
            timeout=60,
            what="a ready endpoint of the metrics Service",
        )
        by_pod = {p.name: p.metrics_port for p in processes}
        port = service["spec"]["ports"][0]["port"]
        address = f"{service['metadata']['name']}.{namespace}.svc:{port}"
        run = run_test_pod(kubectl, test_pod, {address: by_pod[endpoint]})
        out, err = helm_test.communicate(timeout=120)

        assert run.returncode == 0, run.stdout + run.stderr
        assert helm_test.returncode == 0, out + err
        assert "Phase:          Succeeded" in out, out
    finally:
        if helm_test is not None and helm_test.poll() is None:
            helm_test.kill()
            helm_test.wait()
        for process in processes:
            process.stop()
        helm.run("uninstall", release, "--namespace", namespace, "--no-hooks", check=False)
