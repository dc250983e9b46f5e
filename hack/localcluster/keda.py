"""KEDA on the local cluster, when asked (``localcluster up --keda``): the pieces as data.

KEDA's operator and its external metrics adapter (built by ``hack/build-keda.sh`` from
KEDA_VERSION's module) run as local processes, like the rest of the control plane. What a
Helm install does with Services, Secrets and cert rotation is done here by hand:

- one certificate, signed by the cluster CA, serves the adapter's API and both ends of the
  operator's gRPC metrics service (KEDA reads ``ca.crt``, ``tls.crt`` and ``tls.key`` from
  ``--cert-dir``, pkg/metricsservice/utils/tls.go, and uses the pair for mutual TLS);
- the APIService ``v1beta1.external.metrics.k8s.io`` names a Service of type ExternalName
  pointing at ``localhost``, which the aggregator resolves to the adapter's loopback port
  (see ``cluster.aggregation_flags``).

This module only builds file contents, command lines and manifests; ``cluster.py`` runs
them.
"""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path
from typing import Any, Final

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO_ROOT / "hack" / "build-keda.sh"

NAMESPACE: Final = "keda"
#: The Service the APIService names; KEDA's own manifests use this name.
METRICS_SERVICE: Final = "keda-metrics-apiserver"
EXTERNAL_METRICS_APISERVICE: Final = "v1beta1.external.metrics.k8s.io"
OPERATOR: Final = "keda-operator"
ADAPTER: Final = "keda-adapter"
CERTS_SUBDIR: Final = "keda-certs"
#: Set to 1 (CI does) to make the KEDA compatibility tests fail, not skip, without KEDA.
REQUIRE_ENV: Final = "GPUYARD_REQUIRE_KEDA"
#: Environment the two processes read (pkg/util/env_resolver.go and watch.go): their
#: namespace, where cluster-scoped objects' Secrets live, and "every namespace" to watch.
ENVIRONMENT: Final = {
    "POD_NAMESPACE": NAMESPACE,
    "KEDA_CLUSTER_OBJECT_NAMESPACE": NAMESPACE,
    "WATCH_NAMESPACE": "",
}


class KedaMissingError(RuntimeError):
    """KEDA's binaries or CRDs are not in the cache: run `make keda`."""


def binaries_dir() -> Path:
    """Where ``make keda`` puts KEDA_VERSION's binaries and CRDs (nothing is built here)."""
    out = subprocess.run(
        ["bash", str(BUILD_SCRIPT), "--print-dir"], check=True, stdout=subprocess.PIPE, text=True
    )
    return Path(out.stdout.strip().splitlines()[-1])


def missing(directory: Path) -> str | None:
    """Why KEDA cannot start from ``directory``, or None when everything is there."""
    for name in (OPERATOR, ADAPTER):
        if not (directory / name).exists():
            return f"{directory / name} is missing: run `make keda`"
    if not list((directory / "crd").glob("*.yaml")):
        return f"KEDA's CRDs are missing from {directory / 'crd'}: run `make keda`"
    return None


def version(directory: Path) -> str:
    return directory.name.removeprefix("keda-")


def serving_extensions() -> str:
    """openssl extensions of the certificate both KEDA processes serve and dial with.

    The aggregator checks the adapter's certificate against ``<service>.<namespace>.svc``,
    the adapter dials the operator's gRPC service at 127.0.0.1; the gRPC service asks its
    clients for a certificate of the same CA, so the pair is a client's too.
    """
    return (
        f"subjectAltName=DNS:{METRICS_SERVICE}.{NAMESPACE}.svc,DNS:localhost,IP:127.0.0.1\n"
        "extendedKeyUsage=serverAuth,clientAuth\n"
    )


def operator_args(
    binary: Path, certs: Path, *, grpc_port: int, metrics_port: int, probe_port: int
) -> list[str]:
    # KEDA v2.21.0's cmd/operator/main.go flags. Its cert rotation would write a Secret and
    # patch webhooks and the APIService with a CA of its own; ours are made at start-up.
    return [
        str(binary),
        "--leader-elect=false",
        "--enable-cert-rotation=false",
        "--enable-webhook-patching=false",
        "--enable-apiservice-patching=false",
        f"--cert-dir={certs}",
        f"--ca-dir={certs}",
        f"--metrics-service-bind-address=127.0.0.1:{grpc_port}",
        f"--metrics-bind-address=127.0.0.1:{metrics_port}",
        f"--health-probe-bind-address=127.0.0.1:{probe_port}",
        "--zap-log-level=info",
        "--zap-encoder=console",
    ]


def adapter_args(
    binary: Path, certs: Path, kubeconfig: Path, *, secure_port: int, grpc_port: int,
    metrics_port: int,
) -> list[str]:  # fmt: skip
    # KEDA v2.21.0's cmd/adapter/main.go flags plus the generic API server's. Delegated
    # authentication and authorization go through the same kubeconfig: the API server's
    # front-proxy CA is read from kube-system/extension-apiserver-authentication.
    return [
        str(binary),
        "--bind-address=127.0.0.1",
        f"--secure-port={secure_port}",
        f"--tls-cert-file={certs / 'tls.crt'}",
        f"--tls-private-key-file={certs / 'tls.key'}",
        f"--cert-dir={certs}",
        f"--metrics-service-address=127.0.0.1:{grpc_port}",
        f"--port={metrics_port}",
        f"--authentication-kubeconfig={kubeconfig}",
        f"--authorization-kubeconfig={kubeconfig}",
        f"--lister-kubeconfig={kubeconfig}",
        "--zap-log-level=info",
        "--zap-encoder=console",
    ]


def manifests(ca_certificate: bytes, adapter_port: int) -> list[dict[str, Any]]:
    """The namespace, the ExternalName Service and the external metrics APIService."""
    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}},
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": METRICS_SERVICE, "namespace": NAMESPACE},
            # No endpoints needed: the aggregator dials https://localhost:<spec.service.port>.
            "spec": {"type": "ExternalName", "externalName": "localhost"},
        },
        {
            "apiVersion": "apiregistration.k8s.io/v1",
            "kind": "APIService",
            "metadata": {"name": EXTERNAL_METRICS_APISERVICE},
            "spec": {
                "group": "external.metrics.k8s.io",
                "version": "v1beta1",
                "groupPriorityMinimum": 100,
                "versionPriority": 100,
                "service": {"namespace": NAMESPACE, "name": METRICS_SERVICE, "port": adapter_port},
                "caBundle": base64.b64encode(ca_certificate).decode(),
            },
        },
    ]


def apiservice_available(apiservice: dict[str, Any]) -> bool:
    conditions = (apiservice.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Available" and c.get("status") == "True" for c in conditions)
