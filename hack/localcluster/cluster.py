"""Bring a real Kubernetes control plane up and down on loopback, without Docker.

The processes are the real ones, built by ``hack/build-binaries.sh``: etcd,
kube-apiserver (RBAC authorization, service-account keys and client-certificate
authentication, as controller-runtime's envtest configures it), kube-controller-manager
(so Deployments become ReplicaSets and Pods, and garbage collection works),
kube-scheduler, kwok (fake GPU nodes, pods marked Running), Prometheus (Debian's package),
the DCGM exporter simulator and PostgreSQL (Debian's package; the usage ledger's
database, ``GPUYARD_TEST_POSTGRES_DSN``). Every port is a free loopback port.

A cluster lives in one state directory: certificates, data, logs, ``kubeconfig`` and
``state.json`` (the PIDs and addresses). ``down`` stops every PID it recorded and removes
the directory, so nothing is left behind.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

import yaml

from localcluster import keda, postgres
from localcluster.topology import (
    DEFAULT_TOPOLOGY,
    DEVICE_CLASS,
    node_manifests,
    parse_topology,
    resource_slice_manifests,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO_ROOT / "hack" / "build-binaries.sh"
STAGES_FILE = Path(__file__).with_name("kwok-stages.yaml")
CONTROLLER_MANAGER_KUBECONFIG = "controller-manager.kubeconfig"
HPA_SYNC_PERIOD_FLAG = "--horizontal-pod-autoscaler-sync-period="
STATE_FILE = "state.json"
STARTUP_TIMEOUT = 120.0
# Processes this Python process started, whichever LocalCluster started them, kept so they
# can be waited for: no zombies, and no ResourceWarning from a handle dropped while its
# process runs (a test may restart a component through an object of its own).
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}
WRITE_VERBS = ["create", "update", "patch", "delete", "deletecollection"]
AUDIT_POLICY = {
    "apiVersion": "audit.k8s.io/v1",
    "kind": "Policy",
    "omitStages": ["RequestReceived"],
    "rules": [
        # Leases and events are heartbeats and chatter, not reconcile writes.
        {"level": "None", "resources": [{"group": "coordination.k8s.io"}]},
        {"level": "None", "resources": [{"group": "", "resources": ["events"]}]},
        {"level": "None", "resources": [{"group": "events.k8s.io"}]},
        {"level": "Metadata", "verbs": WRITE_VERBS},
    ],
}


def cache_dir() -> Path:
    explicit = os.environ.get("GPUYARD_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "gpuyard"


def default_state_dir(name: str) -> Path:
    return cache_dir() / "clusters" / name


def log(message: str) -> None:
    print(f"[cluster] {message}", file=sys.stderr, flush=True)


@dataclass
class ClusterState:
    """What ``up`` wrote and ``down`` reads: enough to reach and to stop the cluster."""

    name: str
    state_dir: str
    kubeconfig: str
    apiserver_url: str
    prometheus_url: str
    dcgm_sim_url: str
    prometheus_targets_dir: str
    topology: str
    kubernetes_version: str
    pids: dict[str, int] = field(default_factory=dict)
    # How each process was started, so one can be stopped and started again (a test that
    # takes Prometheus away, say) by any process that reads this state.
    commands: dict[str, list[str]] = field(default_factory=dict)
    environments: dict[str, dict[str, str]] = field(default_factory=dict)
    # The PostgreSQL usage ledger's server (hack/localcluster/postgres.py): started and
    # stopped with pg_ctl, which daemonises it, so it has no entry in `pids`. Empty in the
    # state of a cluster started before it existed.
    postgres_dsn: str = ""
    postgres_dir: str = ""
    # KEDA's version and namespace when the cluster was started with it (`up --keda`).
    keda_version: str = ""
    keda_namespace: str = ""

    def save(self) -> None:
        path = Path(self.state_dir) / STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        tmp.replace(path)

    @classmethod
    def load(cls, state_dir: Path) -> ClusterState:
        return cls(**json.loads((state_dir / STATE_FILE).read_text()))

    def env(self) -> dict[str, str]:
        """Environment variables through which tests, the demo and the operator find it."""
        return {
            "KUBECONFIG": self.kubeconfig,
            "GPUYARD_CLUSTER_STATE": str(Path(self.state_dir) / STATE_FILE),
            "GPUYARD_PROMETHEUS_URL": self.prometheus_url,
            "GPUYARD_GPU_EXPORTER_MATCHERS": GPU_EXPORTER_MATCHERS,
            "GPUYARD_DCGM_SIM_URL": self.dcgm_sim_url,
            **({"GPUYARD_TEST_POSTGRES_DSN": self.postgres_dsn} if self.postgres_dsn else {}),
        }


def free_port() -> int:
    # The kernel picks an unused port; the short window before the process binds it is
    # acceptable on a developer machine and in CI, where nothing else races for ports.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def binaries_dir(build: bool = True) -> Path:
    """The directory holding the pinned binaries, building them first if asked."""
    args = ["bash", str(BUILD_SCRIPT)]
    if not build:
        args.append("--print-dir")
    # The build script prints its progress on stderr, which we pass through untouched.
    out = subprocess.run(args, check=True, stdout=subprocess.PIPE, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _make_ca(pki: Path, name: str, common_name: str) -> None:
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "30",
        "-keyout", f"{name}.key", "-out", f"{name}.crt", "-subj", f"/CN={common_name}", cwd=pki,
    )  # fmt: skip


def _sign(pki: Path, name: str, subject: str, ext: str, ca: str = "ca") -> None:
    """A key and a certificate ``name`` for ``subject``, signed by the CA ``ca`` of `pki`."""
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
        "-out", f"{name}.csr", "-subj", subject, cwd=pki,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
        "-CAcreateserial", "-days", "30", "-out", f"{name}.crt", "-extfile", ext, cwd=pki,
    )  # fmt: skip


def make_certificates(pki: Path) -> None:
    """A CA, the API server's serving certificate and client certificates for the admin
    and for kube-controller-manager.

    Client certificates with ``O=system:masters`` are how envtest and kubeadm give the
    cluster's own components and the admin full access while RBAC stays on for everyone
    else (the operator's ServiceAccount among them). The controller-manager authenticates
    as ``system:kube-controller-manager``, the name a real cluster gives it: without
    --use-service-account-credentials every controller acts under that name, and gpuyard's
    admission policy lets it copy gpuyard's pod templates by that name.
    """
    pki.mkdir(parents=True)
    _make_ca(pki, "ca", "gpuyard-local-ca")
    (pki / "serving.ext").write_text(
        "subjectAltName=IP:127.0.0.1,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,"
        "DNS:kubernetes.default,DNS:kubernetes.default.svc\n"
        "extendedKeyUsage=serverAuth\n"
    )
    (pki / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for name, subject, ext in (
        ("apiserver", "/CN=kube-apiserver", "serving.ext"),
        ("admin", "/O=system:masters/CN=gpuyard-admin", "client.ext"),
        ("controller-manager", "/O=system:masters/CN=system:kube-controller-manager", "client.ext"),
    ):
        _sign(pki, name, subject, ext)
    _openssl("genrsa", "-out", "sa.key", "2048", cwd=pki)
    _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)


#: The name in the front-proxy client certificate, the only one the API server's
#: aggregator may present to an extension API server (--requestheader-allowed-names).
FRONT_PROXY_CLIENT: Final = "front-proxy-client"


def make_aggregation_certificates(pki: Path) -> None:
    """The aggregation layer's own CA and the client certificate the API server proxies with.

    kubeadm keeps the front proxy's CA apart from the cluster CA: an extension API server
    trusts the X-Remote-User headers of any client this CA signed, so a certificate the
    cluster CA signs for a person must not pass for the proxy.
    """
    _make_ca(pki, "front-proxy-ca", "gpuyard-local-front-proxy-ca")
    _sign(pki, FRONT_PROXY_CLIENT, f"/CN={FRONT_PROXY_CLIENT}", "client.ext", ca="front-proxy-ca")


def aggregation_flags(pki: Path) -> list[str]:
    """kube-apiserver flags that turn the aggregation layer on (APIServices such as KEDA's
    external metrics), as kubeadm sets them.

    --enable-aggregator-routing stays off: it would route to a Service's endpoints, and
    EndpointSlices refuse loopback addresses. Without it the aggregator resolves a Service of
    type ExternalName to https://<externalName>:<the APIService's port> (ResolveCluster in
    k8s.io/apiserver pkg/util/proxy), so `externalName: localhost` reaches a local process.
    """
    return [
        f"--requestheader-client-ca-file={pki / 'front-proxy-ca.crt'}",
        f"--requestheader-allowed-names={FRONT_PROXY_CLIENT}",
        "--requestheader-username-headers=X-Remote-User",
        "--requestheader-group-headers=X-Remote-Group",
        "--requestheader-extra-headers-prefix=X-Remote-Extra-",
        f"--proxy-client-cert-file={pki / f'{FRONT_PROXY_CLIENT}.crt'}",
        f"--proxy-client-key-file={pki / f'{FRONT_PROXY_CLIENT}.key'}",
    ]


def make_keda_certificates(pki: Path, certs: Path) -> Path:
    """KEDA's serving/mTLS pair in the layout it reads (ca.crt, tls.crt, tls.key), and the
    client certificates of its two processes; returns the directory of the pair.

    Both processes get system:masters, like the cluster's own components (see
    make_certificates): these tests are about gpuyard's scale subresource and KEDA's
    metrics path, and KEDA's least-privilege ClusterRoles live in its Helm chart, which is
    not installed here. Their own common names keep them apart in the audit log.
    """
    certs.mkdir()
    (pki / "keda-serving.ext").write_text(keda.serving_extensions())
    for name, subject, ext in (
        ("keda-serving", "/CN=keda-metrics-apiserver", "keda-serving.ext"),
        (keda.OPERATOR, f"/O=system:masters/CN={keda.OPERATOR}", "client.ext"),
        (keda.ADAPTER, f"/O=system:masters/CN={keda.ADAPTER}", "client.ext"),
    ):
        _sign(pki, name, subject, ext)
    shutil.copy(pki / "ca.crt", certs / "ca.crt")
    shutil.copy(pki / "keda-serving.crt", certs / "tls.crt")
    shutil.copy(pki / "keda-serving.key", certs / "tls.key")
    return certs


def write_kubeconfig(path: Path, server: str, pki: Path, client: str = "admin") -> None:
    """A kubeconfig that authenticates with the client certificate `client` of `pki`."""

    def data(name: str) -> str:
        return base64.b64encode((pki / name).read_bytes()).decode()

    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "gpuyard-local",
                "cluster": {"server": server, "certificate-authority-data": data("ca.crt")},
            }
        ],
        "users": [
            {
                "name": f"gpuyard-{client}",
                "user": {
                    "client-certificate-data": data(f"{client}.crt"),
                    "client-key-data": data(f"{client}.key"),
                },
            }
        ],
        "contexts": [
            {
                "name": "gpuyard-local",
                "context": {"cluster": "gpuyard-local", "user": f"gpuyard-{client}"},
            }
        ],
        "current-context": "gpuyard-local",
    }
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)


#: The DCGM simulator's scrape job, and the operator setting that trusts only its series.
#: Targets registered under targets/ belong to job "local", so none can pass for it (unless
#: it publishes a job label itself: that job honours labels, see docs/autoscaling.md).
DCGM_EXPORTER_JOB: Final = "dcgm-exporter"
GPU_EXPORTER_MATCHERS: Final = f'job="{DCGM_EXPORTER_JOB}"'

#: Where a tenant's own scrape targets are registered (a JSON file per target group, under
#: the targets directory), and their job. Prometheus does not honour their labels, so each
#: target's ``namespace`` label, which the file gives as Kubernetes service discovery would,
#: is the target's own and a series claiming another arrives as ``exported_namespace``: the
#: scrape configuration that docs/autoscaling.md asks of a real install.
TENANT_TARGETS_SUBDIR: Final = "tenants"
TENANT_TARGETS_JOB: Final = "tenant-targets"


def tenant_targets_dir(state: ClusterState) -> Path:
    """The file-discovery directory of the tenants' own scrape targets."""
    return Path(state.prometheus_targets_dir) / TENANT_TARGETS_SUBDIR


def prometheus_config(path: Path, sim_address: str, targets_dir: Path, scrape_seconds: int) -> None:
    config = {
        "global": {
            "scrape_interval": f"{scrape_seconds}s",
            "evaluation_interval": f"{scrape_seconds}s",
        },
        "scrape_configs": [
            {
                "job_name": DCGM_EXPORTER_JOB,
                # dcgm-exporter's pod/namespace labels name the workload, not the exporter:
                # keep them as they are, as a ServiceMonitor with honorLabels does. The
                # simulator's per-service request gauge comes this way too, as from a
                # cluster gateway the administrator trusts to speak for every namespace.
                "honor_labels": True,
                "static_configs": [{"targets": [sim_address]}],
            },
            {
                # Other scrape targets (the operator's metrics, test doubles) are registered
                # at run time by dropping a JSON file here. This job honours labels, so its
                # targets are trusted to name any namespace; a tenant's own targets belong
                # in the tenants' job below.
                "job_name": "local",
                "honor_labels": True,
                "file_sd_configs": [
                    {"files": [str(targets_dir / "*.json")], "refresh_interval": "1s"}
                ],
            },
            {
                "job_name": TENANT_TARGETS_JOB,
                "honor_labels": False,
                "file_sd_configs": [
                    {
                        "files": [str(targets_dir / TENANT_TARGETS_SUBDIR / "*.json")],
                        "refresh_interval": "1s",
                    }
                ],
            },
        ],
    }
    path.write_text(yaml.safe_dump(config))


def _https_ok(url: str, pki: Path) -> bool:
    context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    context.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
    try:
        with urllib.request.urlopen(url, context=context, timeout=2) as response:  # noqa: S310
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def wait_for(
    what: str, check: Callable[[], bool], process: subprocess.Popen[bytes], logfile: Path
) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if check():
            return
        if process.poll() is not None:
            tail = logfile.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{what} exited with {process.returncode}; log tail:\n{tail}")
        time.sleep(0.2)
    raise TimeoutError(f"{what} not ready after {STARTUP_TIMEOUT:.0f}s; see {logfile}")


class LocalCluster:
    """Start and stop one local cluster; ``up`` returns the state that ``down`` needs."""

    def __init__(self, state_dir: Path, name: str = "default") -> None:
        self.state_dir = state_dir
        self.name = name

    def _start(
        self,
        state: ClusterState,
        name: str,
        args: list[str],
        env: dict[str, str] | None = None,
        recorded_env: tuple[str, ...] = ("PYTHONPATH",),
    ) -> subprocess.Popen[bytes]:
        logfile = self.state_dir / "logs" / f"{name}.log"
        with logfile.open("ab") as out:
            # A session of its own: `make cluster-up` returns while the cluster runs on, and
            # a Ctrl-C in the terminal does not reach the control plane.
            process = subprocess.Popen(
                args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, cwd=self.state_dir, env=env,
            )  # fmt: skip
        _CHILDREN[process.pid] = process
        state.pids[name] = process.pid
        state.commands[name] = list(args)
        if env is not None:
            state.environments[name] = {k: v for k, v in env.items() if k in recorded_env}
        state.save()
        return process

    def stop_component(self, name: str) -> None:
        """Stop one process of the cluster (to test what happens without it)."""
        state = ClusterState.load(self.state_dir)
        pid = state.pids[name]
        _terminate(name, pid)
        child = _CHILDREN.pop(pid, None)
        if child is not None:
            child.wait()

    def start_component(self, name: str) -> subprocess.Popen[bytes]:
        """Start a stopped process again, with the command line it first had."""
        state = ClusterState.load(self.state_dir)
        if process_alive(state.pids[name]):
            raise RuntimeError(f"{name} is running already")
        env = state.environments.get(name)
        return self._start(
            state, name, state.commands[name], {**os.environ, **env} if env else None
        )

    def set_hpa_sync_period(self, seconds: float) -> None:
        """Restart kube-controller-manager with another HPA sync period.

        The cluster keeps Kubernetes' default (15 s) unless asked: that is what the HPA
        does for KEDA's users, and a comparison with gpuyard must not tune it silently.
        """
        name = "kube-controller-manager"
        self.stop_component(name)
        state = ClusterState.load(self.state_dir)
        state.commands[name] = [
            arg for arg in state.commands[name] if not arg.startswith(HPA_SYNC_PERIOD_FLAG)
        ] + [f"{HPA_SYNC_PERIOD_FLAG}{seconds:g}s"]
        state.save()
        process = self.start_component(name)
        [port] = [
            arg.removeprefix("--secure-port=")
            for arg in state.commands[name]
            if arg.startswith("--secure-port=")
        ]
        wait_for(
            name,
            functools.partial(_insecure_ok, f"https://127.0.0.1:{port}/healthz"),
            process,
            self.state_dir / "logs" / f"{name}.log",
        )

    def up(
        self, topology: str = DEFAULT_TOPOLOGY, scrape_seconds: int = 1, *, with_keda: bool = False
    ) -> ClusterState:
        """Start the cluster; with ``with_keda``, KEDA's operator and metrics adapter too
        (built beforehand by ``make keda``)."""
        pools = parse_topology(topology)
        keda_bins = keda.binaries_dir() if with_keda else None
        if keda_bins is not None and (why := keda.missing(keda_bins)):
            raise keda.KedaMissingError(why)
        if (self.state_dir / STATE_FILE).exists():
            raise RuntimeError(f"a cluster already runs from {self.state_dir}; bring it down first")
        if self.state_dir.exists():
            # Only the logs of a start-up that failed are left in a directory without a
            # state file; they have been reported, and a fresh start needs a clean slate.
            shutil.rmtree(self.state_dir)
        started = time.monotonic()
        bins = binaries_dir(build=True)
        version = bins.name.split("-")[1]
        self.state_dir.mkdir(parents=True, exist_ok=True)
        for sub in ("logs", "etcd", "prometheus", "targets", f"targets/{TENANT_TARGETS_SUBDIR}"):
            (self.state_dir / sub).mkdir(exist_ok=True)
        pki = self.state_dir / "pki"
        make_certificates(pki)
        make_aggregation_certificates(pki)

        ports = {name: free_port() for name in (
            "etcd", "etcd-peer", "apiserver", "controller-manager", "scheduler", "kwok",
            "prometheus", "dcgm-sim",
        )}  # fmt: skip
        server = f"https://127.0.0.1:{ports['apiserver']}"
        kubeconfig = self.state_dir / "kubeconfig"
        write_kubeconfig(kubeconfig, server, pki)
        write_kubeconfig(self.state_dir / CONTROLLER_MANAGER_KUBECONFIG, server, pki,
                         client="controller-manager")  # fmt: skip
        state = ClusterState(
            name=self.name,
            state_dir=str(self.state_dir),
            kubeconfig=str(kubeconfig),
            apiserver_url=server,
            prometheus_url=f"http://127.0.0.1:{ports['prometheus']}",
            dcgm_sim_url=f"http://127.0.0.1:{ports['dcgm-sim']}",
            prometheus_targets_dir=str(self.state_dir / "targets"),
            topology=topology,
            kubernetes_version=version,
        )
        state.save()
        try:
            self._start_all(
                state=state, bins=bins, pki=pki, ports=ports, kubeconfig=kubeconfig,
                pools=pools, scrape_seconds=scrape_seconds,
            )  # fmt: skip
            if keda_bins is not None:
                self._start_keda(state, bins=bins, keda_bins=keda_bins, pki=pki)
        except BaseException:
            log("start-up failed; stopping what was started")
            self.down(quiet=True, keep_logs_on_failure=True)
            raise
        log(f"cluster {self.name!r} up in {time.monotonic() - started:.1f}s")
        return state

    def _start_all(
        self,
        *,
        state: ClusterState,
        bins: Path,
        pki: Path,
        ports: dict[str, int],
        kubeconfig: Path,
        pools: list[Any],
        scrape_seconds: int,
    ) -> None:
        logs = self.state_dir / "logs"
        etcd_url = f"http://127.0.0.1:{ports['etcd']}"
        log(f"etcd on {etcd_url}")
        etcd = self._start(state, "etcd", [
            str(bins / "etcd"), "--name=local", f"--data-dir={self.state_dir / 'etcd'}",
            f"--listen-client-urls={etcd_url}", f"--advertise-client-urls={etcd_url}",
            f"--listen-peer-urls=http://127.0.0.1:{ports['etcd-peer']}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{ports['etcd-peer']}",
            f"--initial-cluster=local=http://127.0.0.1:{ports['etcd-peer']}",
            "--unsafe-no-fsync", "--log-level=warn", "--quota-backend-bytes=4294967296",
        ])  # fmt: skip
        wait_for("etcd", lambda: _http_ok(f"{etcd_url}/health"), etcd, logs / "etcd.log")

        audit_policy = self.state_dir / "audit-policy.yaml"
        audit_policy.write_text(yaml.safe_dump(AUDIT_POLICY))
        log(f"kube-apiserver on {state.apiserver_url}")
        apiserver = self._start(state, "kube-apiserver", [
            str(bins / "kube-apiserver"),
            f"--etcd-servers={etcd_url}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
            f"--secure-port={ports['apiserver']}",
            f"--cert-dir={pki}",
            f"--tls-cert-file={pki / 'apiserver.crt'}",
            f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            "--authorization-mode=RBAC",
            "--service-cluster-ip-range=10.0.0.0/24",
            "--allow-privileged=true",
            # The endpoint reconciler refuses a loopback address; nothing here needs the
            # `kubernetes` Service to have endpoints (no pod really runs).
            "--endpoint-reconciler-type=none",
            # Benchmarks create a thousand objects at once; the defaults (400/200) would
            # measure API priority and fairness rather than gpuyard.
            "--max-requests-inflight=2000", "--max-mutating-requests-inflight=1000",
            "--profiling=false",
            # Every write request is recorded, so tests can prove that a reconcile with
            # nothing to do really writes nothing (see audit_writes()).
            f"--audit-policy-file={audit_policy}",
            f"--audit-log-path={self.state_dir / 'logs' / 'audit.jsonl'}",
            "--audit-log-format=json", "--audit-log-mode=batch",
            "--audit-log-batch-max-wait=1s",
            *aggregation_flags(pki),
            "--v=1",
        ])  # fmt: skip
        wait_for(
            "kube-apiserver",
            lambda: _https_ok(f"{state.apiserver_url}/readyz", pki),
            apiserver,
            logs / "kube-apiserver.log",
        )

        common = [
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            "--leader-elect=false",
            "--bind-address=127.0.0.1",
            "--kube-api-qps=200", "--kube-api-burst=400",
        ]  # fmt: skip
        log("kube-controller-manager")
        controller_manager = self._start(state, "kube-controller-manager", [
            str(bins / "kube-controller-manager"), *common,
            # Its own name, not the admin's (see make_certificates).
            f"--kubeconfig={self.state_dir / CONTROLLER_MANAGER_KUBECONFIG}",
            f"--secure-port={ports['controller-manager']}",
            f"--service-account-private-key-file={pki / 'sa.key'}",
            f"--root-ca-file={pki / 'ca.crt'}",
            "--use-service-account-credentials=false",
            "--controllers=*,-csrsigning",
            "--concurrent-deployment-syncs=10", "--concurrent-replicaset-syncs=10",
            "--concurrent-gc-syncs=40",
            "--v=1",
        ])  # fmt: skip
        log("kube-scheduler")
        scheduler = self._start(state, "kube-scheduler", [
            str(bins / "kube-scheduler"), *common, f"--kubeconfig={kubeconfig}",
            f"--secure-port={ports['scheduler']}",
            "--v=1",
        ])  # fmt: skip
        for name, process, port in (
            ("kube-controller-manager", controller_manager, ports["controller-manager"]),
            ("kube-scheduler", scheduler, ports["scheduler"]),
        ):
            wait_for(
                name,
                functools.partial(_insecure_ok, f"https://127.0.0.1:{port}/healthz"),
                process,
                logs / f"{name}.log",
            )

        log("kwok (simulated nodes and pods)")
        kwok = self._start(state, "kwok", [
            str(bins / "kwok"),
            f"--kubeconfig={kubeconfig}",
            f"--config={STAGES_FILE}",
            "--manage-all-nodes=false",
            "--manage-nodes-with-label-selector=type=kwok",
            "--node-lease-duration-seconds=40",
            "--cidr=10.244.0.0/16",
            "--node-ip=10.240.0.1",
            f"--server-address=127.0.0.1:{ports['kwok']}",
        ])  # fmt: skip
        wait_for(
            "kwok", lambda: _http_ok(f"http://127.0.0.1:{ports['kwok']}/healthz"), kwok,
            logs / "kwok.log",
        )  # fmt: skip
        self.kubectl(
            bins, kubeconfig, "apply", "-f", "-", stdin=yaml.safe_dump_all(node_manifests(pools))
        )
        described = (
            f"{p.pool} {p.nodes}x{p.gpus_per_node} {p.gpu_type}{' (DRA)' if p.dra else ''}"
            for p in pools
        )
        log(f"nodes: {', '.join(described)}")
        self._wait_nodes_ready(bins, kubeconfig, 1 + sum(p.nodes for p in pools))
        self._publish_dra_devices(bins, kubeconfig, pools)

        log(f"DCGM exporter simulator on {state.dcgm_sim_url}")
        sim_address = state.dcgm_sim_url.removeprefix("http://")
        sim = self._start(state, "dcgm-sim", [
            sys.executable, "-m", "localcluster.dcgm_sim",
            f"--kubeconfig={kubeconfig}", f"--listen={sim_address}",
        ], env={**os.environ, "PYTHONPATH": str(REPO_ROOT / "hack")})  # fmt: skip
        wait_for(
            "dcgm-sim",
            lambda: _http_ok(f"{state.dcgm_sim_url}/healthz"),
            sim,
            logs / "dcgm-sim.log",
        )

        log(f"prometheus on {state.prometheus_url}")
        prom_config = self.state_dir / "prometheus.yml"
        prometheus_config(
            prom_config, sim_address, Path(state.prometheus_targets_dir), scrape_seconds
        )
        prometheus = self._start(state, "prometheus", [
            shutil.which("prometheus") or "/usr/bin/prometheus",
            f"--config.file={prom_config}",
            f"--storage.tsdb.path={self.state_dir / 'prometheus'}",
            f"--web.listen-address={state.prometheus_url.removeprefix('http://')}",
            "--storage.tsdb.retention.time=1d",
            "--web.enable-lifecycle",
            "--log.level=warn",
        ])  # fmt: skip
        wait_for(
            "prometheus", lambda: _http_ok(f"{state.prometheus_url}/-/ready"), prometheus,
            logs / "prometheus.log",
        )  # fmt: skip

        try:
            server = postgres.init(self.state_dir)
        except postgres.PostgresMissingError as missing:
            # The cluster is whole without it; only the PostgreSQL ledger's tests need it.
            log(f"no postgresql ({missing}); GPUYARD_TEST_POSTGRES_DSN stays unset")
            return
        # Recorded before it starts, so that `down` stops it after a failed start too.
        state.postgres_dir = server.base_dir
        state.save()
        postgres.start(server)
        postgres.create_database(server)
        state.postgres_dsn = server.dsn
        state.save()
        log(f"postgresql on {server.dsn}")

    def _publish_dra_devices(self, bins: Path, kubeconfig: Path, pools: list[Any]) -> None:
        """The DeviceClass gpu.nvidia.com (always: tests add DRA nodes of their own) and the
        ResourceSlices of the DRA pools' nodes, as NVIDIA's DRA driver would publish them. No
        kubelet plugin runs: kwok's pods never touch a device, and the scheduler allocates
        from slices alone."""
        manifests = [DEVICE_CLASS, *resource_slice_manifests(pools)]
        self.kubectl(bins, kubeconfig, "apply", "-f", "-", stdin=yaml.safe_dump_all(manifests))
        slices = len(manifests) - 1
        log(f"DeviceClass {DEVICE_CLASS['metadata']['name']}, {slices} ResourceSlice(s)")

    def _start_keda(self, state: ClusterState, *, bins: Path, keda_bins: Path, pki: Path) -> None:
        """KEDA's CRDs, namespace, operator and adapter; returns once the external metrics
        APIService is Available."""
        logs = self.state_dir / "logs"
        kubeconfig = Path(state.kubeconfig)
        certs = make_keda_certificates(pki, self.state_dir / keda.CERTS_SUBDIR)
        identities = {}
        for name in (keda.OPERATOR, keda.ADAPTER):
            identities[name] = self.state_dir / f"{name}.kubeconfig"
            write_kubeconfig(identities[name], state.apiserver_url, pki, client=name)
        log(f"keda {keda.version(keda_bins)}: CRDs")
        crds = keda_bins / "crd"
        # Server-side: the ScaledObject CRD is too large for kubectl's last-applied annotation.
        self.kubectl(bins, kubeconfig, "apply", "--server-side", "-f", str(crds))
        self.kubectl(bins, kubeconfig, "wait", "--for=condition=Established", "--timeout=60s",
                     "-f", str(crds))  # fmt: skip
        ports = {name: free_port() for name in (
            "grpc", "operator-metrics", "operator-probe", "adapter", "adapter-metrics",
        )}  # fmt: skip
        self.kubectl(bins, kubeconfig, "apply", "-f", "-", stdin=yaml.safe_dump_all(
            keda.manifests((pki / "ca.crt").read_bytes(), ports["adapter"])
        ))  # fmt: skip
        recorded = (*keda.ENVIRONMENT, "KUBECONFIG")
        log(f"keda-operator (gRPC metrics service on 127.0.0.1:{ports['grpc']})")
        operator = self._start(state, keda.OPERATOR, keda.operator_args(
            keda_bins / keda.OPERATOR, certs, grpc_port=ports["grpc"],
            metrics_port=ports["operator-metrics"], probe_port=ports["operator-probe"],
        ), env={
            **os.environ, **keda.ENVIRONMENT, "KUBECONFIG": str(identities[keda.OPERATOR]),
        }, recorded_env=recorded)  # fmt: skip
        wait_for(
            keda.OPERATOR,
            lambda: _http_ok(f"http://127.0.0.1:{ports['operator-probe']}/readyz"),
            operator,
            logs / f"{keda.OPERATOR}.log",
        )
        log(f"keda-adapter on https://127.0.0.1:{ports['adapter']}")
        adapter = self._start(state, keda.ADAPTER, keda.adapter_args(
            keda_bins / keda.ADAPTER, certs, identities[keda.ADAPTER],
            secure_port=ports["adapter"], grpc_port=ports["grpc"],
            metrics_port=ports["adapter-metrics"],
        ), env={
            **os.environ, **keda.ENVIRONMENT, "KUBECONFIG": str(identities[keda.ADAPTER]),
        }, recorded_env=recorded)  # fmt: skip

        def available() -> bool:
            apiservice = json.loads(self.kubectl(
                bins, kubeconfig, "get", "apiservice", keda.EXTERNAL_METRICS_APISERVICE,
                "-o", "json",
            ))  # fmt: skip
            return keda.apiservice_available(apiservice)

        wait_for(f"APIService {keda.EXTERNAL_METRICS_APISERVICE}", available, adapter,
                 logs / f"{keda.ADAPTER}.log")  # fmt: skip
        state.keda_version = keda.version(keda_bins)
        state.keda_namespace = keda.NAMESPACE
        state.save()
        log(f"keda {state.keda_version}: {keda.EXTERNAL_METRICS_APISERVICE} Available")

    @staticmethod
    def kubectl(bins: Path, kubeconfig: Path, *args: str, stdin: str | None = None) -> str:
        result = subprocess.run(
            [str(bins / "kubectl"), f"--kubeconfig={kubeconfig}", *args],
            input=stdin, capture_output=True, text=True, check=False,
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)} failed: {result.stderr.strip()}")
        return result.stdout

    def _wait_nodes_ready(self, bins: Path, kubeconfig: Path, count: int) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        jsonpath = '{range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"\\n"}{end}'
        while time.monotonic() < deadline:
            out = self.kubectl(bins, kubeconfig, "get", "nodes", "-o", f"jsonpath={jsonpath}")
            if out.split().count("True") == count:
                return
            time.sleep(0.3)
        raise TimeoutError(f"{count} nodes not Ready after {STARTUP_TIMEOUT:.0f}s")

    def down(self, quiet: bool = False, keep_logs_on_failure: bool = False) -> list[int]:
        """Stop every recorded process and remove the state directory; return the PIDs."""
        path = self.state_dir / STATE_FILE
        if not path.exists():
            if not quiet:
                log(f"no cluster runs from {self.state_dir}")
            return []
        state = ClusterState.load(self.state_dir)
        if state.postgres_dir:
            try:
                postgres.stop(postgres.PostgresServer.load(Path(state.postgres_dir)))
            except (OSError, RuntimeError) as error:
                log(f"postgresql did not stop cleanly: {error}")
        # Stop in reverse start order so that clients go before the servers they call.
        pids = list(state.pids.items())[::-1]
        for name, pid in pids:
            _terminate(name, pid)
            child = _CHILDREN.pop(pid, None)
            if child is not None:
                child.wait()
        if keep_logs_on_failure:
            log(f"logs kept in {self.state_dir / 'logs'}")
            (self.state_dir / STATE_FILE).unlink()
        else:
            shutil.rmtree(self.state_dir, ignore_errors=True)
        if not quiet:
            log(f"cluster {state.name!r} down")
        return [pid for _, pid in pids]


def audit_writes(state: ClusterState, user_agent_prefix: str) -> list[dict[str, Any]]:
    """Write requests the API server has answered for clients whose user agent matches."""
    path = Path(state.state_dir) / "logs" / "audit.jsonl"
    writes = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue  # the batch writer may be mid-line
            if event.get("userAgent", "").startswith(user_agent_prefix):
                writes.append(event)
    return writes


def _insecure_ok(url: str) -> bool:
    # The controller-manager and scheduler serve /healthz with a self-signed certificate
    # of their own; the check only asks whether they answer.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(url, context=context, timeout=2) as response:  # noqa: S310
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is gone for every purpose but reaping.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _terminate(name: str, pid: int, grace: float = 10.0) -> None:
    if not process_alive(pid):
        return
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and process_alive(pid):
        _reap(pid)
        time.sleep(0.1)
    if process_alive(pid):
        log(f"{name} (pid {pid}) ignored SIGTERM; killing it")
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        while process_alive(pid):
            _reap(pid)
            time.sleep(0.05)
    _reap(pid)


def _reap(pid: int) -> None:
    # Processes started by this very Python process must be waited for, or they linger as
    # zombies; those started by an earlier `cluster-up` are not our children.
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
