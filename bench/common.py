"""What the cluster benchmarks share: a cluster, ``gpuyard run`` as a child process,
kubectl."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from localcluster.cluster import (
    REPO_ROOT,
    ClusterState,
    LocalCluster,
    binaries_dir,
    cache_dir,
    free_port,
)


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


@contextmanager
def cluster() -> Iterator[ClusterState]:
    """The running cluster ``GPUYARD_CLUSTER_STATE`` names, else one of the benchmark's
    own, started here and stopped afterwards."""
    given = os.environ.get("GPUYARD_CLUSTER_STATE")
    if given:
        yield ClusterState.load(Path(given).parent)
        return
    name = f"bench-{os.getpid()}"
    local = LocalCluster(cache_dir() / "clusters" / name, name)
    state = local.up()
    try:
        yield state
    finally:
        local.down()


def install_crds(state: ClusterState) -> None:
    """gpuyard's CRDs, established."""
    kubectl(state, "apply", "--server-side", "--force-conflicts", "-f", str(REPO_ROOT / "crds"))
    for crd in ("aiservices.gpuyard.io", "gpupools.gpuyard.io"):
        kubectl(state, "wait", "--for=condition=Established", f"crd/{crd}", "--timeout=60s")


class OperatorProcess:
    """``gpuyard run`` against ``state``, on free loopback ports, with ``env`` on top of
    the benchmarks' common settings; started here, stopped by ``stop`` (and by nothing
    else). ``python_options`` go before ``-m gpuyard.cli`` (for example cProfile's)."""

    def __init__(
        self,
        state: ClusterState,
        log_path: Path,
        env: Mapping[str, str],
        python_options: Sequence[str] = (),
    ) -> None:
        self.metrics_port = free_port()
        self.health_port = free_port()
        self.log_path = log_path
        with log_path.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, *python_options, "-m", "gpuyard.cli", "run"],
                env={
                    **os.environ,
                    "GPUYARD_KUBECONFIG": state.kubeconfig,
                    "GPUYARD_METRICS_PORT": str(self.metrics_port),
                    "GPUYARD_METRICS_ADDRESS": "127.0.0.1",
                    "GPUYARD_HEALTH_PORT": str(self.health_port),
                    "GPUYARD_HEALTH_ADDRESS": "127.0.0.1",
                    "GPUYARD_PROMETHEUS_URL": state.prometheus_url,
                    "GPUYARD_LOG_LEVEL": "WARNING",
                    "GPUYARD_USAGE_STDOUT": "false",
                    **env,
                },
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + 60
        while not self._healthy():
            if self.process.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"the operator did not start; log:\n{tail}")
            time.sleep(0.2)

    def _healthy(self) -> bool:
        try:
            url = f"http://127.0.0.1:{self.health_port}/healthz"
            with urllib.request.urlopen(url, timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def metrics(self) -> str:
        """The operator's /metrics page."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            return str(response.read().decode())

    def stop(self) -> None:
        """SIGINT, the signal Kopf and a cProfile run both end cleanly on."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def kubectl(state: ClusterState, *args: str, stdin: str | None = None) -> str:
    """Run the cluster's kubectl; its output, or CalledProcessError."""
    binary = binaries_dir(build=False) / "kubectl"
    return subprocess.run(
        [str(binary), f"--kubeconfig={state.kubeconfig}", *args],
        input=stdin,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
