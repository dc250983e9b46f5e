"""The operator under test: ``gpuyard run`` as a real process against the local cluster.

One operator serves the whole session (it is cluster-wide, like a real install); tests
that restart or kill it use ``operator.restart()`` / ``operator.kill()`` and get it back
running for the next test.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from kubernetes.client import ApiClient

from chart_support import Helm, operator_policy_manifest, rbac_manifest, service_account_kubeconfig
from gpuyard.io.kube import make_api_client
from localcluster.cluster import (
    GPU_EXPORTER_MATCHERS,
    REPO_ROOT,
    ClusterState,
    audit_writes,
    binaries_dir,
    free_port,
)
from localcluster.jsonhttp import http_json
from support import Kubectl, wait_until

OPERATOR_USER_AGENT = "gpuyard/"
# Not "gpuyard": test_helm.py installs releases of that name, whose cluster-scoped
# ClusterRole would collide with this one.
TEST_RELEASE = "gpuyard-tests"
#: The namespace of the session operator's ServiceAccount.
OPERATOR_NAMESPACE = "gpuyard-tests"


class OperatorProcess:
    """A running ``gpuyard run``; its log is kept for the test report."""

    def __init__(
        self,
        cluster: ClusterState,
        log_dir: Path,
        extra_env: dict[str, str],
        kubeconfig: str | None = None,
        name: str = "operator",
    ) -> None:
        self.cluster = cluster
        self.kubeconfig = kubeconfig or cluster.kubeconfig
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self.extra_env = extra_env
        self.process: subprocess.Popen[bytes] | None = None
        self.identity = ""
        self.metrics_port = 0
        self.health_port = 0

    def start(self, *, lead: bool = True) -> None:
        """Start the process; with ``lead``, return once it leads (a replica that starts
        while another leads stands by)."""
        self.metrics_port, self.health_port = free_port(), free_port()
        env = self.environment()
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "gpuyard.cli", "run"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        self.identity = env.get("GPUYARD_INSTANCE_ID") or env["POD_NAME"]
        wait_until(self.healthy, timeout=60, what="the operator's /healthz")
        if lead:
            wait_until(self.leads, timeout=60, what=f"{self.name} to lead")

    def environment(self) -> dict[str, str]:
        """The process's environment, once its ports are chosen."""
        return {
            **os.environ,
            "GPUYARD_KUBECONFIG": self.kubeconfig,
            "GPUYARD_METRICS_PORT": str(self.metrics_port),
            "GPUYARD_METRICS_ADDRESS": "127.0.0.1",
            "GPUYARD_HEALTH_PORT": str(self.health_port),
            "GPUYARD_HEALTH_ADDRESS": "127.0.0.1",
            "GPUYARD_PROMETHEUS_URL": self.cluster.prometheus_url,
            # As a real install is configured: only the exporter's job names workloads.
            "GPUYARD_GPU_EXPORTER_MATCHERS": GPU_EXPORTER_MATCHERS,
            "GPUYARD_LOG_LEVEL": "INFO",
            # The simulator is scraped every second: react in seconds, as a test should.
            "GPUYARD_AUTOSCALE_INTERVAL": "1",
            "GPUYARD_METRICS_WINDOW_SECONDS": "5",
            # A deleted pod goes once its last usage window is billed: keep windows short.
            "GPUYARD_USAGE_WINDOW_SECONDS": "5",
            "GPUYARD_METER_INTERVAL": "1",
            # The chart's Lease, named after its release, where its Role lets it be. Short
            # timings: a test that kills the operator gets a leader back in seconds.
            "GPUYARD_LEASE_NAMESPACE": OPERATOR_NAMESPACE,
            "GPUYARD_LEASE_NAME": TEST_RELEASE,
            "GPUYARD_LEASE_DURATION_SECONDS": "6",
            "GPUYARD_LEASE_RENEW_DEADLINE_SECONDS": "4",
            "GPUYARD_LEASE_RETRY_PERIOD_SECONDS": "1",
            "GPUYARD_INSTANCE_ID": f"{self.name}-{time.monotonic_ns()}",
            **self.extra_env,
        }

    def leads(self) -> bool:
        """Whether this replica holds the Lease (its gpuyard_leader gauge)."""
        return any(line == "gpuyard_leader 1.0" for line in self.metrics().splitlines())

    def healthy(self) -> bool:
        if self.process is None or self.process.poll() is not None:
            raise AssertionError(f"the operator exited; log:\n{self.log_tail()}")
        try:
            url = f"http://127.0.0.1:{self.health_port}/healthz"
            with urllib.request.urlopen(url, timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            return str(response.read().decode())

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def writes(self) -> list[dict[str, Any]]:
        """Write requests the API server answered for the operator (from its audit log)."""
        return audit_writes(self.cluster, OPERATOR_USER_AGENT)


@pytest.fixture(scope="session")
def crds(kubectl: Kubectl) -> None:
    kubectl("apply", "--server-side", "--force-conflicts", "-f", str(REPO_ROOT / "crds"))
    for name in ("aiservices.gpuyard.io", "gpupools.gpuyard.io"):
        kubectl("wait", "--for=condition=Established", f"crd/{name}", "--timeout=60s")


@pytest.fixture(scope="session")
def pools(kubectl: Kubectl, crds: None) -> None:
    """The example pools, matching the local cluster's default topology."""
    kubectl("apply", "-f", str(REPO_ROOT / "examples" / "pools.yaml"))


@pytest.fixture(scope="session")
def chart_service_account(
    cluster: ClusterState, kubectl: Kubectl, tmp_path_factory: pytest.TempPathFactory
) -> str:
    """A kubeconfig holding a token of the Helm chart's ServiceAccount, bound to exactly
    the chart's ClusterRole and held by the chart's operator admission policies.

    The operator under test runs with it, so the whole integration suite proves that the
    chart's RBAC is enough and that the policies let through everything the operator does
    (a missing verb or an over-strict rule fails a test, not a production install).
    """
    home = tmp_path_factory.mktemp("helm")
    helm = Helm(binaries_dir(build=False) / "helm", home, cluster.kubeconfig)
    namespace = OPERATOR_NAMESPACE
    kubectl.run("create", "namespace", namespace, check=False)
    kubectl.apply(rbac_manifest(helm, namespace, release=TEST_RELEASE), namespace)
    kubectl.apply(operator_policy_manifest(helm, namespace, release=TEST_RELEASE))
    token = kubectl("create", "token", TEST_RELEASE, "-n", namespace, "--duration=24h").strip()
    config = str(service_account_kubeconfig(cluster.kubeconfig, token, home / "kubeconfig"))
    wait_until(
        lambda: operator_policies_enforced(Kubectl(kubectl.binary, config), namespace),
        timeout=60,
        what="the operator's admission policies to be enforced",
    )
    return config


def operator_policies_enforced(as_operator: Kubectl, namespace: str) -> bool:
    """Whether the operator's policies refuse it a Deployment that is not gpuyard's (a dry
    run: nothing is created either way). A new policy is enforced once the API server's
    informers have seen it, a moment after it is created."""
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "operator-policy-probe", "namespace": namespace},
        "spec": {
            "selector": {"matchLabels": {"app": "probe"}},
            "template": {
                "metadata": {"labels": {"app": "probe"}},
                "spec": {"containers": [{"name": "main", "image": "registry.example/p:1"}]},
            },
        },
    }
    result = as_operator.run(
        "create", "--dry-run=server", "-f", "-", stdin=json.dumps(deployment), check=False
    )
    if result.returncode == 0:
        return False
    assert "denied request" in result.stderr, result.stderr
    return True


@pytest.fixture(scope="session")
def operator_api(chart_service_account: str) -> ApiClient:
    """An API client with the session operator's own token: requests made as the operator
    makes them."""
    return make_api_client(chart_service_account, pool_size=1)


@pytest.fixture(scope="session")
def operator(
    cluster: ClusterState,
    crds: None,
    pools: None,
    chart_service_account: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[OperatorProcess]:
    process = OperatorProcess(
        cluster, tmp_path_factory.mktemp("operator"), {}, kubeconfig=chart_service_account
    )
    process.start()
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture
def running_operator(operator: OperatorProcess) -> OperatorProcess:
    """The session's operator, started again if an earlier test stopped it."""
    if operator.process is None or operator.process.poll() is not None:
        operator.process = None
        operator.start()
    return operator


def reconciles(operator: OperatorProcess, kind: str = "service") -> float:
    """How many reconciles of ``kind`` the operator has finished (from its /metrics)."""
    total = 0.0
    for line in operator.metrics().splitlines():
        if line.startswith("gpuyard_reconciles_total{") and f'kind="{kind}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def flush_audit(kubectl: Kubectl, operator: OperatorProcess, namespace: str) -> None:
    """Wait until the audit log holds everything written so far.

    The API server writes its audit log in batches; a write of our own that shows up
    in the log proves every earlier one is there too.
    """
    marker = f"audit-marker-{time.monotonic_ns()}"
    kubectl("create", "configmap", marker, "-n", namespace)
    wait_until(
        lambda: any(
            e.get("objectRef", {}).get("name") == marker
            for e in audit_writes(operator.cluster, "kubectl")
        ),
        timeout=30,
        what="the audit log to catch up",
    )


class Loads:
    """Loads set on the DCGM simulator by one test, removed after it."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.keys: set[tuple[str, str]] = set()

    def set(self, namespace: str, service: str, load: float) -> None:
        self.keys.add((namespace, service))
        http_json("PUT", f"{self.url}/load/{namespace}/{service}", {"load": load})

    def clear(self) -> None:
        for namespace, service in self.keys:
            # The simulator may have gone with the cluster: nothing left to clear then.
            with contextlib.suppress(urllib.error.URLError):
                http_json("DELETE", f"{self.url}/load/{namespace}/{service}")


@pytest.fixture
def load(cluster: ClusterState) -> Iterator[Loads]:
    loads = Loads(cluster.dcgm_sim_url)
    yield loads
    loads.clear()


class HealthCheck:
    """gpuyard-health (hack/health): kstatus and Argo CD's Lua engine reading objects."""

    #: The Argo CD health scripts docs/gitops.md ships, by kind.
    SCRIPTS: ClassVar[dict[str, Path]] = {
        "AIService": REPO_ROOT / "docs" / "argocd" / "health-aiservice.lua",
        "GPUPool": REPO_ROOT / "docs" / "argocd" / "health-gpupool.lua",
    }

    def __init__(self, binary: str) -> None:
        self.binary = binary

    def read(self, objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Per object, in order: its kind and name, kstatus's `{status, message}` and Argo
        CD's `{status, message}`."""
        scripts = [arg for kind, path in self.SCRIPTS.items() for arg in ("-lua", f"{kind}={path}")]
        result = subprocess.run(
            [self.binary, *scripts],
            input=json.dumps(objects),
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        read: list[dict[str, Any]] = json.loads(result.stdout)
        return read


@pytest.fixture(scope="session")
def health_check() -> HealthCheck:
    """Built once per machine into ~/.cache/gpuyard (a cold build: about half a minute)."""
    built = subprocess.run(
        ["bash", str(REPO_ROOT / "hack" / "build-health-check.sh")],
        stdout=subprocess.PIPE,
        text=True,
        check=True,
        timeout=600,
    )
    return HealthCheck(built.stdout.strip())
