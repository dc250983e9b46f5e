"""Helm and chart helpers shared by the chart's unit and integration tests.

Every Helm call runs the pinned binary from the cluster binaries' build directory, with
Helm's cache, configuration and data directories under a temporary directory: a test run
writes nothing under the user's home.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import yaml

from localcluster.cluster import binaries_dir

REPO_ROOT = Path(__file__).resolve().parents[1]
CHART = REPO_ROOT / "charts" / "gpuyard"
DIST_INSTALL = REPO_ROOT / "dist" / "install.yaml"
RENDER_INSTALL = REPO_ROOT / "hack" / "render-install.sh"
DIST_NAMESPACE = "gpuyard-system"


def kube_version() -> str:
    """The pinned Kubernetes version (hack/versions.env), which `helm template` renders for."""
    text = (REPO_ROOT / "hack" / "versions.env").read_text()
    match = re.search(r"^K8S_VERSION=v?(\S+)$", text, re.MULTILINE)
    assert match, "K8S_VERSION missing from hack/versions.env"
    return match.group(1)


def helm_binary() -> Path | None:
    """The pinned helm, or None when `make binaries` has not built it yet."""
    binary = binaries_dir(build=False) / "helm"
    return binary if binary.exists() else None


class Helm:
    """Runs the pinned helm with its state under `home`."""

    def __init__(self, binary: Path, home: Path, kubeconfig: str | None = None) -> None:
        self.binary = binary
        self.home = home
        self.env = {
            **os.environ,
            "HELM_CACHE_HOME": str(home / "cache"),
            "HELM_CONFIG_HOME": str(home / "config"),
            "HELM_DATA_HOME": str(home / "data"),
        }
        if kubeconfig:
            self.env["KUBECONFIG"] = kubeconfig

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(self.binary), *args],
            capture_output=True,
            text=True,
            check=False,
            env=self.env,
            timeout=300,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed: {result.stderr}")
        return result

    def values_file(self, values: dict[str, Any]) -> str:
        """`values` as a file for `-f` (JSON is YAML)."""
        handle, path = tempfile.mkstemp(suffix=".yaml", dir=self.home)
        with os.fdopen(handle, "w") as out:
            json.dump(values, out)
        return path

    def template_text(
        self,
        values: dict[str, Any] | None = None,
        *extra: str,
        release: str = "gpuyard",
        namespace: str = DIST_NAMESPACE,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        args = ["template", release, str(CHART), "--namespace", namespace]
        args += ["--kube-version", kube_version()]
        if values is not None:
            args += ["-f", self.values_file(values)]
        return self.run(*args, *extra, check=check)

    def template(
        self,
        values: dict[str, Any] | None = None,
        *extra: str,
        release: str = "gpuyard",
        namespace: str = DIST_NAMESPACE,
    ) -> list[dict[str, Any]]:
        """The rendered objects of the chart."""
        text = self.template_text(values, *extra, release=release, namespace=namespace).stdout
        return documents(text)


def documents(text: str) -> list[dict[str, Any]]:
    """The objects of a multi-document YAML stream (empty documents left out)."""
    return [doc for doc in yaml.safe_load_all(text) if doc]


def of_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [obj for obj in objects if obj["kind"] == kind]


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    [obj] = of_kind(objects, kind)
    return obj


def kinds_and_names(objects: list[dict[str, Any]]) -> set[tuple[str, str]]:
    return {(obj["kind"], obj["metadata"]["name"]) for obj in objects}


def rbac_manifest(helm: Helm, namespace: str, release: str = "gpuyard") -> str:
    """The chart's ServiceAccount, ClusterRole, ClusterRoleBinding and the Lease's Role for
    `namespace`: what a test applies to run the operator with exactly the chart's
    permissions."""
    return helm.template_text(
        None,
        "--show-only", "templates/serviceaccount.yaml",
        "--show-only", "templates/clusterrole.yaml",
        "--show-only", "templates/clusterrolebinding.yaml",
        "--show-only", "templates/role.yaml",
        release=release,
        namespace=namespace,
    ).stdout  # fmt: skip


def operator_policy_manifest(helm: Helm, namespace: str, release: str = "gpuyard") -> str:
    """The chart's admission policies that hold the operator's ServiceAccount (of
    `release` in `namespace`) to what it builds, with their bindings."""
    return helm.template_text(
        None,
        "--show-only", "templates/operator-policy.yaml",
        release=release,
        namespace=namespace,
    ).stdout  # fmt: skip


def service_account_kubeconfig(
    admin_kubeconfig: str, token: str, path: Path, user: str = "service-account"
) -> Path:
    """A kubeconfig for the admin's cluster that authenticates with a ServiceAccount token
    (`kubectl create token`). Unlike impersonation, it holds for every client in a process,
    Kopf's watches included."""
    admin = yaml.safe_load(Path(admin_kubeconfig).read_text())
    context = next(c for c in admin["contexts"] if c["name"] == admin["current-context"])
    cluster = next(c for c in admin["clusters"] if c["name"] == context["context"]["cluster"])
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [cluster],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": user, "context": {"cluster": cluster["name"], "user": user}}],
        "current-context": user,
    }
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path
